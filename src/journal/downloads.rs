//! The durable state of the current download (SPEC §5), and the types its record holds (the
//! download work in `crate::download` fills them); see journal-format.md (table `downloads`,
//! record `DownloadRecord`, §5.7).

use super::Journal;
use super::records::{Record, Size, decode, decode_body, encode};
use crate::error::{Error, Result};
use redb::{TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

/// The body of `POST /api/v1.0/download` (contracts/updater-api.yaml `DownloadRequest`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadRequest {
    pub version: String,
    pub package_url: String,
    pub package_name: String,
    pub package_size: u64,
    /// 32 lowercase hex digits.
    pub package_md5: String,
}

impl DownloadRequest {
    /// What this request downloads: its fields, checked against `package_md5`. Not validated
    /// (see `download::validate`).
    pub fn spec(&self) -> DownloadSpec {
        DownloadSpec {
            version: self.version.clone(),
            package_url: self.package_url.clone(),
            package_name: self.package_name.clone(),
            package_size: self.package_size,
            expected: ExpectedHash::Md5(self.package_md5.clone()),
        }
    }
}

/// The hash a downloaded package must have, as lower-case hex digits: 32 for MD5, 40 for
/// SHA-1, 64 for SHA-256. A variant built directly is checked by `download::fetch` (and by the
/// journal when a record is written or read); the constructors check at once.
///
/// The variant index is part of the journal format (journal-format.md §3: 0 Md5, 1 Sha1,
/// 2 Sha256); new algorithms go at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpectedHash {
    Md5(String),
    Sha1(String),
    Sha256(String),
}

impl ExpectedHash {
    /// `md5`, `sha1` or `sha256` (as hawkBit names them in a deployment's `hashes`).
    pub fn algorithm(&self) -> &'static str {
        match self {
            ExpectedHash::Md5(_) => "md5",
            ExpectedHash::Sha1(_) => "sha1",
            ExpectedHash::Sha256(_) => "sha256",
        }
    }

    /// The expected digest, lower-case hex.
    pub fn hex(&self) -> &str {
        match self {
            ExpectedHash::Md5(h) | ExpectedHash::Sha1(h) | ExpectedHash::Sha256(h) => h,
        }
    }

    /// Hex digits of this algorithm's digest.
    fn hex_len(&self) -> usize {
        match self {
            ExpectedHash::Md5(_) => 32,
            ExpectedHash::Sha1(_) => 40,
            ExpectedHash::Sha256(_) => 64,
        }
    }

    /// Lower-case hex of the algorithm's length.
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        let (hex, len) = (self.hex(), self.hex_len());
        if hex.len() != len
            || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!(
                "expected {} hash must be {len} lower-case hexadecimal digits",
                self.algorithm()
            ));
        }
        Ok(())
    }
}

/// What one download fetches and how it is checked: the legacy request's fields with any
/// [`ExpectedHash`]. The legacy API's requests become one with [`DownloadRequest::spec`]; the
/// DDI client builds one per artifact with [`DownloadSpec::new`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadSpec {
    /// `MAJOR.MINOR.PATCH`: what `POST /update` names to install it.
    pub version: String,
    pub package_url: String,
    /// The file name under `<state_dir>/downloads/`.
    pub package_name: String,
    pub package_size: u64,
    pub expected: ExpectedHash,
}

impl DownloadSpec {
    pub fn new(
        version: impl Into<String>,
        package_url: impl Into<String>,
        package_name: impl Into<String>,
        package_size: u64,
        expected: ExpectedHash,
    ) -> Self {
        DownloadSpec {
            version: version.into(),
            package_url: package_url.into(),
            package_name: package_name.into(),
            package_size,
            expected,
        }
    }

    /// The legacy request this spec is, if it is checked by MD5 (the only kind the legacy
    /// API, and so the daemon's own resume at start-up, knows).
    pub fn legacy_request(&self) -> Option<DownloadRequest> {
        match &self.expected {
            ExpectedHash::Md5(md5) => Some(DownloadRequest {
                version: self.version.clone(),
                package_url: self.package_url.clone(),
                package_name: self.package_name.clone(),
                package_size: self.package_size,
                package_md5: md5.clone(),
            }),
            _ => None,
        }
    }
}

/// The durable state of the current download: journal table `downloads`, key `"current"`
/// (journal-format.md §2, §3, §5.7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadRecord {
    /// What is being downloaded, as validated (record version 2; a version 1 record held the
    /// legacy request, decoded as its spec: `expected` is its MD5).
    pub request: DownloadSpec,
    /// `<state_dir>/downloads/<package_name>`, absolute, UTF-8.
    pub path: String,
    /// Bytes `[0, offset)` of the file were made durable (fdatasync) before this value was
    /// journaled; anything after it is untrusted. `offset <= package_size`.
    pub offset: u64,
    /// Set iff the whole file's hash matched `request.expected` (then `offset == package_size`):
    /// wall-clock ms since the epoch, the start of the trust window.
    pub verified_at_unix_ms: Option<u64>,
    /// Wall-clock ms when this download was first requested (informational).
    pub started_unix_ms: u64,
    /// Wall-clock ms of this record's commit (informational).
    pub updated_unix_ms: u64,
    /// The last attempt ended in an error (not a shutdown): the daemon does not resume it by
    /// itself at its next start; the same request again does (from `offset`).
    pub failed: bool,
}

impl DownloadRecord {
    /// Every byte of the package is on disk and journaled.
    pub fn is_complete(&self) -> bool {
        self.offset == self.request.package_size
    }

    pub fn is_verified(&self) -> bool {
        self.verified_at_unix_ms.is_some()
    }

    /// The invariants checked when the record is written and when it is read back.
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        if self.offset > self.request.package_size {
            return Err(format!(
                "offset {} is past package_size {}",
                self.offset, self.request.package_size
            ));
        }
        if self.verified_at_unix_ms.is_some() && !self.is_complete() {
            return Err(format!(
                "verified at offset {} of {}",
                self.offset, self.request.package_size
            ));
        }
        self.request.expected.check()
    }
}

pub(super) const DOWNLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("downloads");
/// The only key of `downloads`: one download at a time.
const CURRENT_DOWNLOAD: &str = "current";

/// `DownloadRecord` as record version 1 wrote it: the legacy request (its `package_md5` the
/// only hash), then the same fields as today.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct DownloadRecordV1 {
    request: DownloadRequest,
    path: String,
    offset: u64,
    verified_at_unix_ms: Option<u64>,
    started_unix_ms: u64,
    updated_unix_ms: u64,
    failed: bool,
}

impl Record for DownloadRecord {
    /// V2: `request` is a `DownloadSpec` (any `ExpectedHash`), journal-format.md §3.
    const VERSION: u32 = 1;

    fn decode_older(version: u32, body: &[u8], size: Size) -> std::result::Result<Self, String> {
        match version {
            0 => {
                let v1: DownloadRecordV1 = decode_body(body, size)?;
                Ok(DownloadRecord {
                    // Version 1 knew only the legacy request: checked by its MD5.
                    request: v1.request.spec(),
                    path: v1.path,
                    offset: v1.offset,
                    verified_at_unix_ms: v1.verified_at_unix_ms,
                    started_unix_ms: v1.started_unix_ms,
                    updated_unix_ms: v1.updated_unix_ms,
                    failed: v1.failed,
                })
            }
            other => Err(format!("unknown record version {other}")),
        }
    }
}

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
        let Some(v) = t.get(CURRENT_DOWNLOAD).map_err(|e| self.storage(e))? else {
            return Ok(None);
        };
        let rec: DownloadRecord = decode(v.value(), Size::Small, "download")?;
        rec.check().map_err(|why| self.corrupt(format!("download record: {why}")))?;
        Ok(Some(rec))
    }

    /// Replaces the current download record (one durable commit). The caller has made the
    /// file's first `offset` bytes durable (fdatasync) before calling.
    pub fn put_download(&self, rec: &DownloadRecord) -> Result<()> {
        rec.check().map_err(|why| {
            Error::internal(format!("refusing to journal a download record: {why}"))
        })?;
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

    /// Stores `rec` as record version 1, as builds before `ExpectedHash` wrote it (tests; `rec`
    /// must be checked by MD5).
    #[cfg(test)]
    pub(crate) fn put_download_v1(&self, rec: &DownloadRecord) -> Result<()> {
        self.put_download_bytes(&encode_v1(rec))
    }

    /// Stores `bytes` as the current download record, unchecked (tests: records of other builds).
    #[cfg(test)]
    pub(crate) fn put_download_bytes(&self, bytes: &[u8]) -> Result<()> {
        let wt = self.write()?;
        {
            let mut t = wt.open_table(DOWNLOADS).map_err(|e| self.storage(e))?;
            t.insert(CURRENT_DOWNLOAD, bytes).map_err(|e| self.storage(e))?;
        }
        self.commit(wt)
    }
}

/// The bytes of a version 1 record (what builds before `DownloadSpec` wrote), for tests.
#[cfg(test)]
fn encode_v1(rec: &DownloadRecord) -> Vec<u8> {
    let request = rec.request.legacy_request().expect("a version 1 record holds an MD5 request");
    let v1 = DownloadRecordV1 {
        request,
        path: rec.path.clone(),
        offset: rec.offset,
        verified_at_unix_ms: rec.verified_at_unix_ms,
        started_unix_ms: rec.started_unix_ms,
        updated_unix_ms: rec.updated_unix_ms,
        failed: rec.failed,
    };
    encode(&v1, Size::Small).unwrap()
}

/// Version 1 as a record of its own (`VERSION` 0), so `encode` writes its envelope.
#[cfg(test)]
impl Record for DownloadRecordV1 {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn record() -> DownloadRecord {
        DownloadRecord {
            request: DownloadSpec::new(
                "1.2.3",
                "https://example.com/p.zip",
                "p.zip",
                300,
                ExpectedHash::Sha256("0123456789abcdef".repeat(4)),
            ),
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

    fn tiny(expected: ExpectedHash) -> DownloadRecord {
        DownloadRecord {
            request: DownloadSpec::new("1", "u", "n", 300, expected),
            path: "p".into(),
            offset: 7,
            verified_at_unix_ms: Some(9),
            started_unix_ms: 1,
            updated_unix_ms: 2,
            failed: true,
        }
    }

    /// Record version 2 (envelope 1): the spec's three strings and varint size, then
    /// `ExpectedHash` (variant index, hex string), then the fields of version 1.
    #[test]
    fn download_record_v2_golden_bytes() {
        let sha256 = "ab".repeat(32);
        let rec = tiny(ExpectedHash::Sha256(sha256.clone()));
        let mut golden = vec![1, 1, b'1', 1, b'u', 1, b'n', 251, 0x2c, 0x01, 2, 64];
        golden.extend(sha256.as_bytes());
        golden.extend([1, b'p', 7, 1, 9, 1, 2, 1]);
        assert_eq!(encode(&rec, Size::Small).unwrap(), golden);
        assert_eq!(decode::<DownloadRecord>(&golden, Size::Small, "t").unwrap(), rec);
        // The other variants' indexes: Md5 0, Sha1 1.
        let md5 = encode(&tiny(ExpectedHash::Md5("m".into())), Size::Small).unwrap();
        assert_eq!(
            md5,
            [1, 1, b'1', 1, b'u', 1, b'n', 251, 0x2c, 0x01, 0, 1, b'm', 1, b'p', 7, 1, 9, 1, 2, 1]
        );
        let sha1 = encode(&tiny(ExpectedHash::Sha1("s".into())), Size::Small).unwrap();
        assert_eq!(sha1[10..13], [1, 1, b's']);
    }

    /// Record version 1 (envelope 0), as builds before `ExpectedHash` wrote it: the legacy
    /// request's five fields, its MD5 last. It decodes as the same download checked by MD5.
    #[test]
    fn download_record_v1_golden_bytes_decode_as_md5() {
        let golden =
            [0, 1, b'1', 1, b'u', 1, b'n', 251, 0x2c, 0x01, 1, b'm', 1, b'p', 7, 1, 9, 1, 2, 1];
        let rec = decode::<DownloadRecord>(&golden, Size::Small, "t").unwrap();
        assert_eq!(rec, tiny(ExpectedHash::Md5("m".into())));
        assert_eq!(encode_v1(&rec), golden);
        // A version 1 body with a version 2 envelope (or the reverse) does not decode.
        let mut wrong = golden;
        wrong[0] = 1;
        assert_eq!(
            decode::<DownloadRecord>(&wrong, Size::Small, "t").unwrap_err().code,
            ErrorCode::JournalCorrupt
        );
        let mut v2 = encode(&rec, Size::Small).unwrap();
        v2[0] = 0;
        assert_eq!(
            decode::<DownloadRecord>(&v2, Size::Small, "t").unwrap_err().code,
            ErrorCode::JournalCorrupt
        );
    }

    /// A journal holding a version 1 record (an older build was downloading) reads it back.
    #[test]
    fn a_journaled_v1_record_reads_back_as_md5() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut rec = record();
        rec.request.expected = ExpectedHash::Md5("0123456789abcdef0123456789abcdef".into());
        j.put_download_bytes(&encode_v1(&rec)).unwrap();
        assert_eq!(j.download().unwrap(), Some(rec));
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
        for bad in [
            ExpectedHash::Sha256("ab".into()),
            ExpectedHash::Sha1("AB".repeat(20)),
            ExpectedHash::Md5("0".repeat(40)),
        ] {
            let mut rec = record();
            rec.request.expected = bad;
            assert_eq!(j.put_download(&rec).unwrap_err().code, ErrorCode::InternalError);
        }
        assert_eq!(j.download().unwrap(), None);
        // ... and on read.
        let mut rec = record();
        rec.request.expected = ExpectedHash::Sha1("x".into());
        j.put_download_bytes(&encode(&rec, Size::Small).unwrap()).unwrap();
        assert_eq!(j.download().unwrap_err().code, ErrorCode::JournalCorrupt);
    }
}
