//! The durable outbox of progress reports to device-api (SPEC §3, §5): every push and every
//! acknowledgement is one durable commit; `crate::reporter` delivers the rows in `seq`
//! order. See journal-format.md §2, §3, §5.2 and §5.6.

use super::records::{Record, Size, decode, encode};
use super::{COUNTERS, Journal};
use crate::error::Result;
use crate::limits::{OUTBOX_REPORTS_MAX, REPORT_TEXT_BYTES_MAX};
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

/// One report to device-api: the legacy callback body (`stage`, `progress`, `message`,
/// `error`) plus the transaction id, the boot id and the outbox sequence number. Stored in the
/// journal's `outbox` table as a record (journal-format.md §3); sent as `body_json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// One of the contract's stages: `idle, downloading, verifying, toInstall, installing,
    /// rebooting, success, failed`.
    pub stage: String,
    /// 0..=100 (sent clamped to 100).
    pub progress: u8,
    pub message: String,
    /// `"CODE: message"` when `stage == "failed"`, else `None`.
    pub error: Option<String>,
    /// The transaction this report belongs to, if any (a download is not a transaction).
    pub tx: Option<u64>,
    /// The kernel's boot id when the report was made (not when it was delivered).
    pub boot_id: String,
    /// Set by the push: the outbox sequence number, increasing, never reused.
    pub seq: u64,
    /// The one final report of a transaction (`Journal::outbox_push_final`); never dropped
    /// when the outbox is full.
    pub final_report: bool,
    /// The version the job is about (downloaded, installed, or rolled back to), sent as
    /// `"vX.Y.Z"` as the Python service did; `None` when no version is known (record V2).
    pub version: Option<String>,
}

pub(super) const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");

/// `counters` key: the `seq` the next push gets (absent: 1). Never decreases, so a `seq` is
/// never reused, not even after its report was acknowledged or dropped.
const OUTBOX_NEXT_SEQ: &str = "outbox_next_seq";
/// `counters` key: the highest transaction id whose final report was pushed (absent: none).
const OUTBOX_LAST_FINAL_TX: &str = "outbox_last_final_tx";

/// `Report` as record version 1 wrote it (no `version`).
#[derive(serde::Deserialize)]
struct ReportV1 {
    stage: String,
    progress: u8,
    message: String,
    error: Option<String>,
    tx: Option<u64>,
    boot_id: String,
    seq: u64,
    final_report: bool,
}

impl Record for Report {
    const VERSION: u32 = 1;

    fn decode_older(version: u32, body: &[u8], size: Size) -> std::result::Result<Self, String> {
        match version {
            0 => {
                let v1: ReportV1 = super::records::decode_body(body, size)?;
                Ok(Report {
                    stage: v1.stage,
                    progress: v1.progress,
                    message: v1.message,
                    error: v1.error,
                    tx: v1.tx,
                    boot_id: v1.boot_id,
                    seq: v1.seq,
                    final_report: v1.final_report,
                    // Reports queued by an older build name no version.
                    version: None,
                })
            }
            other => Err(format!("unknown record version {other}")),
        }
    }
}

/// Creates this module's tables (journal creation, and older journals on first write open).
pub(super) fn create_tables(wt: &WriteTransaction) -> std::result::Result<(), redb::TableError> {
    wt.open_table(OUTBOX)?;
    Ok(())
}

fn truncate(s: &mut String, max_bytes: usize) {
    if s.len() > max_bytes {
        let mut end = max_bytes;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

impl Journal {
    /// Appends `r` to the outbox in one durable commit and returns its `seq` (increasing,
    /// never reused). When `OUTBOX_REPORTS_MAX` reports are already waiting, the oldest
    /// non-final one is dropped in the same commit (logged); if every waiting report is final
    /// and `r` is not, `r` itself is dropped (its `seq` is still consumed). `r.final_report`
    /// is stored as `false`: final reports go through `outbox_push_final`.
    pub fn outbox_push(&self, r: Report) -> Result<u64> {
        self.outbox_push_capped(r, OUTBOX_REPORTS_MAX)
    }

    fn outbox_push_capped(&self, mut r: Report, cap: u64) -> Result<u64> {
        r.final_report = false;
        let wt = self.write()?;
        let seq = self.push_in(&wt, r, cap)?;
        self.commit(wt)?;
        Ok(seq)
    }

    /// Pushes the final report of transaction `tx` unless one was already pushed: in the same
    /// commit as the report, `counters.outbox_last_final_tx` becomes `tx`, and a call with a
    /// `tx` at or below it pushes nothing and returns `false`. So recovery may call it again
    /// after a crash, and final reports must be pushed in transaction order (transactions run
    /// one at a time with increasing ids). Sets `r.tx = Some(tx)` and `r.final_report = true`.
    pub fn outbox_push_final(&self, tx: u64, r: Report) -> Result<bool> {
        self.outbox_push_final_capped(tx, r, OUTBOX_REPORTS_MAX)
    }

    fn outbox_push_final_capped(&self, tx: u64, mut r: Report, cap: u64) -> Result<bool> {
        let wt = self.write()?;
        {
            let c = wt.open_table(COUNTERS).map_err(|e| self.storage(e))?;
            let last = c.get(OUTBOX_LAST_FINAL_TX).map_err(|e| self.storage(e))?.map(|v| v.value());
            if last.is_some_and(|last| last >= tx) {
                // Nothing written: dropping `wt` aborts it.
                return Ok(false);
            }
        }
        r.tx = Some(tx);
        r.final_report = true;
        self.push_in(&wt, r, cap)?;
        {
            let mut c = wt.open_table(COUNTERS).map_err(|e| self.storage(e))?;
            c.insert(OUTBOX_LAST_FINAL_TX, tx).map_err(|e| self.storage(e))?;
        }
        self.commit(wt)?;
        Ok(true)
    }

    /// Assigns the next seq, applies the bound, inserts (unless `r` itself is dropped).
    fn push_in(&self, wt: &WriteTransaction, mut r: Report, cap: u64) -> Result<u64> {
        truncate(&mut r.message, REPORT_TEXT_BYTES_MAX);
        if let Some(e) = r.error.as_mut() {
            truncate(e, REPORT_TEXT_BYTES_MAX);
        }
        let mut c = wt.open_table(COUNTERS).map_err(|e| self.storage(e))?;
        let seq = c.get(OUTBOX_NEXT_SEQ).map_err(|e| self.storage(e))?.map_or(1, |v| v.value());
        c.insert(OUTBOX_NEXT_SEQ, seq + 1).map_err(|e| self.storage(e))?;
        r.seq = seq;
        let mut t = wt.open_table(OUTBOX).map_err(|e| self.storage(e))?;
        if t.len().map_err(|e| self.storage(e))? >= cap {
            let mut victim = None;
            for item in t.iter().map_err(|e| self.storage(e))? {
                let (k, v) = item.map_err(|e| self.storage(e))?;
                let old: Report = decode(v.value(), Size::Small, "outbox")?;
                if !old.final_report {
                    victim = Some((k.value(), old.stage));
                    break;
                }
            }
            match victim {
                Some((old_seq, stage)) => {
                    t.remove(old_seq).map_err(|e| self.storage(e))?;
                    tracing::warn!(
                        dropped_seq = old_seq,
                        stage,
                        pushed_seq = seq,
                        cap,
                        "report outbox full: dropped the oldest progress report"
                    );
                }
                None if !r.final_report => {
                    tracing::warn!(
                        dropped_seq = seq,
                        stage = r.stage,
                        cap,
                        "report outbox full of final reports: dropped this progress report"
                    );
                    return Ok(seq);
                }
                // Final reports are never dropped: the outbox may exceed the cap by them.
                None => {}
            }
        }
        t.insert(seq, encode(&r, Size::Small)?.as_slice()).map_err(|e| self.storage(e))?;
        Ok(seq)
    }

    /// Up to `limit` waiting reports, oldest (lowest `seq`) first. A journal without the
    /// table (opened read-only before it existed) has none.
    pub fn outbox_pending(&self, limit: usize) -> Result<Vec<Report>> {
        self.keyed_records(OUTBOX, limit, "outbox", |r: &Report, seq| r.seq == *seq)
    }

    /// Number of waiting reports.
    pub fn outbox_len(&self) -> Result<u64> {
        let rt = self.read()?;
        match self.later_table(&rt, OUTBOX)? {
            Some(t) => t.len().map_err(|e| self.storage(e)),
            None => Ok(0),
        }
    }

    /// The highest transaction id whose final report was pushed.
    pub fn outbox_last_final_tx(&self) -> Result<Option<u64>> {
        self.counter(&self.read()?, OUTBOX_LAST_FINAL_TX)
    }

    /// Removes every waiting report with `seq` at or below `seq` (delivered and acknowledged,
    /// or rejected by the receiver), in one durable commit.
    pub fn outbox_ack(&self, seq: u64) -> Result<()> {
        let wt = self.write()?;
        {
            let mut t = wt.open_table(OUTBOX).map_err(|e| self.storage(e))?;
            t.retain_in(..=seq, |_, _| false).map_err(|e| self.storage(e))?;
        }
        self.commit(wt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::reporter::tests::report;

    fn seqs(j: &Journal) -> Vec<u64> {
        j.outbox_pending(usize::MAX).unwrap().iter().map(|r| r.seq).collect()
    }

    #[test]
    fn outbox_push_assigns_increasing_seqs_that_survive_reopen_and_ack() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path()).unwrap();
            assert_eq!(j.outbox_push(report("downloading", 0)).unwrap(), 1);
            assert_eq!(j.outbox_push(report("downloading", 5)).unwrap(), 2);
            assert_eq!(j.outbox_push(report("downloading", 10)).unwrap(), 3);
            j.outbox_ack(2).unwrap();
            assert_eq!(seqs(&j), vec![3]);
            j.outbox_ack(3).unwrap();
            assert_eq!(j.outbox_len().unwrap(), 0);
        }
        let j = Journal::open(dir.path()).unwrap();
        // An emptied outbox does not restart the numbering.
        assert_eq!(j.outbox_push(report("verifying", 100)).unwrap(), 4);
        let p = j.outbox_pending(10).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(
            (p[0].seq, p[0].stage.as_str(), p[0].progress, p[0].boot_id.as_str()),
            (4, "verifying", 100, "boot-a")
        );
    }

    /// A row whose record names another seq is a damaged journal, not a report to send.
    #[test]
    fn a_report_stored_under_another_seq_is_journal_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.outbox_push(report("downloading", 0)).unwrap();
        j.outbox_push(report("downloading", 5)).unwrap();
        let second = encode(&j.outbox_pending(2).unwrap()[1], Size::Small).unwrap();
        let wt = j.write().unwrap();
        wt.open_table(OUTBOX).unwrap().insert(1, second.as_slice()).unwrap();
        j.commit(wt).unwrap();
        let err = j.outbox_pending(10).unwrap_err();
        assert_eq!(err.code, crate::error::ErrorCode::JournalCorrupt, "{err}");
        assert!(err.message.contains("outbox row 1 holds another's record"), "{err}");
    }

    #[test]
    fn outbox_pending_is_oldest_first_and_limited() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        for p in 0..5 {
            j.outbox_push(report("downloading", p * 5)).unwrap();
        }
        let got = j.outbox_pending(3).unwrap();
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(got.iter().map(|r| r.progress).collect::<Vec<_>>(), vec![0, 5, 10]);
    }

    #[test]
    fn outbox_push_final_pushes_one_final_report_per_transaction_even_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path()).unwrap();
            assert_eq!(j.outbox_last_final_tx().unwrap(), None);
            // Only `outbox_push_final` makes a final report.
            let mut not_final = report("success", 100);
            not_final.final_report = true;
            j.outbox_push(not_final).unwrap();
            assert!(!j.outbox_pending(1).unwrap()[0].final_report);
            j.outbox_ack(1).unwrap();
            assert!(j.outbox_push_final(7, report("success", 100)).unwrap());
            assert!(!j.outbox_push_final(7, report("success", 100)).unwrap());
            assert_eq!(j.outbox_last_final_tx().unwrap(), Some(7));
        }
        // "After a crash": recovery calls it again.
        let j = Journal::open(dir.path()).unwrap();
        assert!(!j.outbox_push_final(7, report("failed", 100)).unwrap());
        // An older transaction's final report after a newer one's is refused too.
        assert!(j.outbox_push_final(9, report("failed", 40)).unwrap());
        assert!(!j.outbox_push_final(8, report("success", 100)).unwrap());
        let p = j.outbox_pending(usize::MAX).unwrap();
        assert_eq!(
            p.iter().map(|r| (r.seq, r.tx, r.final_report, r.stage.as_str())).collect::<Vec<_>>(),
            vec![(2, Some(7), true, "success"), (3, Some(9), true, "failed")]
        );
        // Acknowledging the report does not forget that it was pushed.
        j.outbox_ack(3).unwrap();
        assert!(!j.outbox_push_final(9, report("failed", 40)).unwrap());
        assert_eq!(j.outbox_last_final_tx().unwrap(), Some(9));
    }

    #[test]
    fn a_full_outbox_drops_the_oldest_progress_report_and_never_a_final_one() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let cap = 4;
        assert!(j.outbox_push_final_capped(1, report("success", 100), cap).unwrap()); // seq 1
        for p in [0, 5, 10] {
            j.outbox_push_capped(report("downloading", p), cap).unwrap(); // seqs 2, 3, 4
        }
        assert_eq!(seqs(&j), vec![1, 2, 3, 4]);
        // Full: the oldest progress report (seq 2) goes, the final one (seq 1) stays.
        assert_eq!(j.outbox_push_capped(report("downloading", 15), cap).unwrap(), 5);
        assert_eq!(seqs(&j), vec![1, 3, 4, 5]);
        // A final report also makes room by dropping progress only.
        assert!(j.outbox_push_final_capped(2, report("failed", 15), cap).unwrap()); // seq 6
        assert_eq!(seqs(&j), vec![1, 4, 5, 6]);
        // seqs 7, 8, 9
        for tx in 3..=5 {
            assert!(j.outbox_push_final_capped(tx, report("success", 100), cap).unwrap());
        }
        // Only final reports are left, and they exceed the cap rather than being dropped.
        assert_eq!(seqs(&j), vec![1, 6, 7, 8, 9]);
        // A progress report pushed now is itself the oldest non-final one: dropped, seq consumed.
        assert_eq!(j.outbox_push_capped(report("downloading", 20), cap).unwrap(), 10);
        assert_eq!(seqs(&j), vec![1, 6, 7, 8, 9]);
        assert!(j.outbox_pending(usize::MAX).unwrap().iter().all(|r| r.final_report));
        assert_eq!(j.outbox_push_capped(report("idle", 0), 100).unwrap(), 11);
    }

    #[test]
    fn outbox_push_cuts_long_texts_at_a_char_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut r = report("failed", 100);
        r.message = "é".repeat(REPORT_TEXT_BYTES_MAX); // 2 bytes each
        r.error = Some(format!("x{}", "é".repeat(REPORT_TEXT_BYTES_MAX)));
        j.outbox_push(r).unwrap();
        let got = &j.outbox_pending(1).unwrap()[0];
        assert_eq!(got.message.len(), REPORT_TEXT_BYTES_MAX);
        assert_eq!(got.error.as_ref().unwrap().len(), REPORT_TEXT_BYTES_MAX - 1);
    }

    #[test]
    fn a_report_record_has_the_documented_layout() {
        let mut r = Report {
            stage: "failed".into(),
            progress: 100,
            message: "m".into(),
            error: Some("E".into()),
            tx: Some(300),
            boot_id: "b".into(),
            seq: 2,
            final_report: true,
            version: Some("1".into()),
        };
        let bytes = encode(&r, Size::Small).unwrap();
        // V2 = 1; "failed"; 100; "m"; Some("E"); Some(300 = fb 2c 01); "b"; 2; true; Some("1").
        let mut golden = vec![1u8, 6];
        golden.extend(b"failed");
        golden.extend([100, 1, b'm', 1, 1, b'E', 1, 251, 0x2c, 0x01, 1, b'b', 2, 1, 1, 1, b'1']);
        assert_eq!(bytes, golden);
        assert_eq!(decode::<Report>(&bytes, Size::Small, "outbox").unwrap(), r);
        // The same report as an older build queued it (V1 = 0, no version) still decodes.
        let mut v1 = vec![0u8, 6];
        v1.extend(b"failed");
        v1.extend([100, 1, b'm', 1, 1, b'E', 1, 251, 0x2c, 0x01, 1, b'b', 2, 1]);
        r.version = None;
        assert_eq!(decode::<Report>(&v1, Size::Small, "outbox").unwrap(), r);
    }
}
