//! The durable state of the current download (SPEC §5). Owned by the download work; see
//! journal-format.md (table `downloads`, record `DownloadRecord`, §5.7).

use super::Journal;
use super::records::{Record, Size, decode, encode};
use crate::download::DownloadRecord;
use crate::error::{Error, Result};
use redb::{TableDefinition, WriteTransaction};

pub(super) const DOWNLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("downloads");
/// The only key of `downloads`: one download at a time.
const CURRENT_DOWNLOAD: &str = "current";

impl Record for DownloadRecord {}

/// Creates this module's tables (journal creation, and older journals on first write open).
pub(super) fn create_tables(wt: &WriteTransaction) -> std::result::Result<(), redb::TableError> {
    wt.open_table(DOWNLOADS)?;
    Ok(())
}

impl Journal {
    /// The current download (in progress, or verified and waiting for `POST /update`), if any.
    /// A record that breaks its invariants is `JOURNAL_CORRUPT`.
    pub fn download(&self) -> Result<Option<DownloadRecord>> {
        let rt = self.read()?;
        let Some(t) = self.later_table(&rt, DOWNLOADS)? else { return Ok(None) };
        let Some(v) = t.get(CURRENT_DOWNLOAD).map_err(|e| self.storage(e))? else { return Ok(None) };
        let rec: DownloadRecord = decode(v.value(), Size::Small, "download")?;
        rec.check().map_err(|why| self.corrupt(format!("download record: {why}")))?;
        Ok(Some(rec))
    }

    /// Replaces the current download record (one durable commit). The caller has made the
    /// file's first `offset` bytes durable (fdatasync) before calling.
    pub fn put_download(&self, rec: &DownloadRecord) -> Result<()> {
        rec.check().map_err(|why| Error::internal(format!("refusing to journal a download record: {why}")))?;
        let bytes = encode(rec, Size::Small)?;
        let wt = self.write()?;
        {
            let mut t = wt.open_table(DOWNLOADS).map_err(|e| self.storage(e))?;
            t.insert(CURRENT_DOWNLOAD, bytes.as_slice()).map_err(|e| self.storage(e))?;
        }
        self.commit(wt)
    }

    /// Forgets the current download (one durable commit); absent is fine.
    pub fn clear_download(&self) -> Result<()> {
        let wt = self.write()?;
        {
            let mut t = wt.open_table(DOWNLOADS).map_err(|e| self.storage(e))?;
            t.remove(CURRENT_DOWNLOAD).map_err(|e| self.storage(e))?;
        }
        self.commit(wt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::download::DownloadRequest;
    use crate::error::ErrorCode;

    fn record() -> DownloadRecord {
        DownloadRecord {
            request: DownloadRequest {
                version: "1.2.3".into(),
                package_url: "https://example.com/p.zip".into(),
                package_name: "p.zip".into(),
                package_size: 300,
                package_md5: "0123456789abcdef0123456789abcdef".into(),
            },
            path: "/var/lib/tope-updater/downloads/p.zip".into(),
            offset: 100,
            verified_at_unix_ms: None,
            started_unix_ms: 1,
            updated_unix_ms: 2,
            failed: false,
        }
    }

    #[test]
    fn download_record_round_trips_and_clears() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.download().unwrap(), None);
        let mut rec = record();
        j.put_download(&rec).unwrap();
        assert_eq!(j.download().unwrap(), Some(rec.clone()));
        rec.offset = 300;
        rec.verified_at_unix_ms = Some(5);
        j.put_download(&rec).unwrap();
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.download().unwrap(), Some(rec));
        j.clear_download().unwrap();
        j.clear_download().unwrap();
        assert_eq!(j.download().unwrap(), None);
    }

    #[test]
    fn download_record_golden_bytes() {
        let rec = DownloadRecord {
            request: DownloadRequest {
                version: "1".into(),
                package_url: "u".into(),
                package_name: "n".into(),
                package_size: 300,
                package_md5: "m".into(),
            },
            path: "p".into(),
            offset: 7,
            verified_at_unix_ms: Some(9),
            started_unix_ms: 1,
            updated_unix_ms: 2,
            failed: true,
        };
        // envelope V1 = 0; five strings and a varint size; path; offset; Some(9); 1; 2; true.
        let golden = [0, 1, b'1', 1, b'u', 1, b'n', 251, 0x2c, 0x01, 1, b'm', 1, b'p', 7, 1, 9, 1, 2, 1];
        assert_eq!(encode(&rec, Size::Small).unwrap(), golden);
        assert_eq!(decode::<DownloadRecord>(&golden, Size::Small, "t").unwrap(), rec);
    }

    #[test]
    fn records_breaking_invariants_are_refused_on_write() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut rec = record();
        rec.offset = 301;
        assert_eq!(j.put_download(&rec).unwrap_err().code, ErrorCode::InternalError);
        let mut rec = record();
        rec.verified_at_unix_ms = Some(1);
        assert_eq!(j.put_download(&rec).unwrap_err().code, ErrorCode::InternalError);
        assert_eq!(j.download().unwrap(), None);
    }
}
