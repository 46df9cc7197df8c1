//! The DDI client's durable state (issue 15): the server's actions this device took on, and
//! the feedback waiting to be delivered to the server. journal-format.md §2, §3, §5.9.
//!
//! The record types live here, with the journal, not in `crate::ddi` (which imports the
//! journal): a feedback is stored as the JSON body the server will receive, so the storage
//! layer needs none of the protocol's types.

use super::records::{Record, Size, decode, encode};
use super::{COUNTERS, Journal};
use crate::error::Result;
use crate::limits::{DDI_ACTIONS_KEPT, DDI_FEEDBACK_BODY_BYTES_MAX, DDI_FEEDBACK_MAX};
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

pub(super) const DDI_ACTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("ddi_actions");
pub(super) const DDI_FEEDBACK: TableDefinition<u64, &[u8]> = TableDefinition::new("ddi_feedback");
/// `counters` key: the `seq` the next feedback gets (absent: 1); never decreases.
const DDI_FEEDBACK_NEXT_SEQ: &str = "ddi_feedback_next_seq";

/// Where an action stands on this device. The discriminant is the bincode index on disk:
/// never renumber; a new state takes the next number (pinned by
/// `journal::records::tests::on_disk_enum_indexes_are_their_discriminants`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum DdiActionState {
    /// Its package is being downloaded.
    Downloading = 0,
    /// Downloaded and validated; waiting for the server's update permission or window.
    Downloaded = 1,
    /// Its install transaction (`DdiAction::tx`) has begun.
    Installing = 2,
    /// Committed, waiting for `confirm` (`confirm_required`): not final yet.
    AwaitingConfirm = 3,
    /// Final: installed (and confirmed when required).
    Succeeded = 4,
    /// Final: failed, refused, rolled back (also after the fact), or canceled.
    Failed = 5,
    Canceled = 6,
    Rejected = 7,
}

impl DdiActionState {
    /// Whether the action's final feedback is queued: it is never acted on again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            DdiActionState::Succeeded
                | DdiActionState::Failed
                | DdiActionState::Canceled
                | DdiActionState::Rejected
        )
    }
}

/// One action of the server, keyed by its id in `ddi_actions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdiAction {
    /// The server's action id (`ddi::protocol::check_action_id`: short, alphanumeric).
    pub id: String,
    /// The version the deployment installs (its chunk's `version`).
    pub version: String,
    /// The artifact's file name.
    pub artifact: String,
    pub state: DdiActionState,
    /// The install transaction, once begun: a later rollback of it reports the action failed.
    pub tx: Option<u64>,
    /// Wall-clock ms of the first and of the latest change (informational; pruning order).
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
}

impl Record for DdiAction {}

/// Which resource a feedback goes to. The discriminant is the bincode index on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum FeedbackTarget {
    /// `deploymentBase/{action}/feedback`
    Deployment = 0,
    /// `cancelAction/{action}/feedback`
    Cancel = 1,
}

/// One feedback waiting in `ddi_feedback`, keyed by `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdiFeedback {
    pub seq: u64,
    pub action: String,
    pub target: FeedbackTarget,
    /// A `proceeding` with progress: may be coalesced with the next one of the same action,
    /// and is the first dropped when the outbox is full.
    pub progress: bool,
    /// The JSON body, exactly as it will be POSTed.
    pub body: Vec<u8>,
}

impl Record for DdiFeedback {}

/// Creates this module's tables (journal creation, and older journals on first write open).
pub(super) fn create_tables(wt: &WriteTransaction) -> std::result::Result<(), redb::TableError> {
    wt.open_table(DDI_ACTIONS)?;
    wt.open_table(DDI_FEEDBACK)?;
    Ok(())
}

impl Journal {
    /// Every action this device knows, in id order. A journal without the table has none.
    pub fn ddi_actions(&self) -> Result<Vec<DdiAction>> {
        let own_key = |a: &DdiAction, id: &&str| a.id == *id;
        self.keyed_records(DDI_ACTIONS, usize::MAX, "ddi action", own_key)
    }

    pub fn ddi_action(&self, id: &str) -> Result<Option<DdiAction>> {
        Ok(self.ddi_actions()?.into_iter().find(|a| a.id == id))
    }

    /// Writes `action` and, in the same durable commit, queues `feedback` (target, progress
    /// flag, JSON body) for it: the action's state and what the server hears of it never
    /// disagree after a crash. A final action's state cannot change any more (the call
    /// writes nothing and returns `false`). At most `DDI_ACTIONS_KEPT` final actions are
    /// kept: the oldest go in the same commit.
    pub fn ddi_record(
        &self,
        action: &DdiAction,
        feedback: Option<(FeedbackTarget, bool, Vec<u8>)>,
    ) -> Result<bool> {
        let wt = self.write()?;
        {
            let mut t = wt.open_table(DDI_ACTIONS).map_err(|e| self.storage(e))?;
            if let Some(old) = t.get(action.id.as_str()).map_err(|e| self.storage(e))? {
                let old: DdiAction = decode(old.value(), Size::Small, "ddi action")?;
                if old.state.is_final() {
                    // Nothing written: dropping `wt` aborts it.
                    return Ok(false);
                }
            }
            t.insert(action.id.as_str(), encode(action, Size::Small)?.as_slice())
                .map_err(|e| self.storage(e))?;
            self.prune_actions(&mut t)?;
        }
        if let Some((target, progress, body)) = feedback {
            self.push_feedback_in(&wt, &action.id, target, progress, body, DDI_FEEDBACK_MAX)?;
        }
        self.commit(wt)?;
        Ok(true)
    }

    /// Queues a feedback that changes no action (a cancel refused, configData is not one).
    pub fn ddi_push_feedback(
        &self,
        action: &str,
        target: FeedbackTarget,
        progress: bool,
        body: Vec<u8>,
    ) -> Result<u64> {
        self.ddi_push_feedback_capped(action, target, progress, body, DDI_FEEDBACK_MAX)
    }

    fn ddi_push_feedback_capped(
        &self,
        action: &str,
        target: FeedbackTarget,
        progress: bool,
        body: Vec<u8>,
        cap: u64,
    ) -> Result<u64> {
        let wt = self.write()?;
        let seq = self.push_feedback_in(&wt, action, target, progress, body, cap)?;
        self.commit(wt)?;
        Ok(seq)
    }

    fn prune_actions(&self, t: &mut redb::Table<&str, &[u8]>) -> Result<()> {
        let mut finals: Vec<(u64, String)> = Vec::new();
        for item in t.iter().map_err(|e| self.storage(e))? {
            let (k, v) = item.map_err(|e| self.storage(e))?;
            let a: DdiAction = decode(v.value(), Size::Small, "ddi action")?;
            if a.state.is_final() {
                finals.push((a.updated_unix_ms, k.value().to_string()));
            }
        }
        if finals.len() > DDI_ACTIONS_KEPT {
            finals.sort();
            for (_, id) in &finals[..finals.len() - DDI_ACTIONS_KEPT] {
                t.remove(id.as_str()).map_err(|e| self.storage(e))?;
            }
        }
        Ok(())
    }

    /// Assigns the next seq; when `cap` (`DDI_FEEDBACK_MAX`) feedbacks wait, drops the oldest
    /// progress one (or this one, if it is progress and none other is): final feedback is
    /// never dropped.
    fn push_feedback_in(
        &self,
        wt: &WriteTransaction,
        action: &str,
        target: FeedbackTarget,
        progress: bool,
        body: Vec<u8>,
        cap: u64,
    ) -> Result<u64> {
        if body.len() > DDI_FEEDBACK_BODY_BYTES_MAX {
            return Err(crate::error::Error::internal(format!(
                "a DDI feedback of {} bytes (at most {DDI_FEEDBACK_BODY_BYTES_MAX})",
                body.len()
            )));
        }
        let mut c = wt.open_table(COUNTERS).map_err(|e| self.storage(e))?;
        let seq =
            c.get(DDI_FEEDBACK_NEXT_SEQ).map_err(|e| self.storage(e))?.map_or(1, |v| v.value());
        c.insert(DDI_FEEDBACK_NEXT_SEQ, seq + 1).map_err(|e| self.storage(e))?;
        let mut t = wt.open_table(DDI_FEEDBACK).map_err(|e| self.storage(e))?;
        if t.len().map_err(|e| self.storage(e))? >= cap {
            let mut victim = None;
            for item in t.iter().map_err(|e| self.storage(e))? {
                let (k, v) = item.map_err(|e| self.storage(e))?;
                let old: DdiFeedback = decode(v.value(), Size::Small, "ddi feedback")?;
                if old.progress {
                    victim = Some(k.value());
                    break;
                }
            }
            match victim {
                Some(old) => {
                    t.remove(old).map_err(|e| self.storage(e))?;
                    tracing::warn!(
                        dropped_seq = old,
                        pushed_seq = seq,
                        "DDI feedback outbox full: dropped the oldest progress feedback"
                    );
                }
                None if progress => {
                    tracing::warn!(
                        dropped_seq = seq,
                        "DDI feedback outbox full of final feedback: dropped this progress feedback"
                    );
                    return Ok(seq);
                }
                None => {}
            }
        }
        let row = DdiFeedback { seq, action: action.to_string(), target, progress, body };
        t.insert(seq, encode(&row, Size::Small)?.as_slice()).map_err(|e| self.storage(e))?;
        Ok(seq)
    }

    /// Up to `limit` waiting feedbacks, oldest first.
    pub fn ddi_feedback_pending(&self, limit: usize) -> Result<Vec<DdiFeedback>> {
        self.keyed_records(DDI_FEEDBACK, limit, "ddi feedback", |f: &DdiFeedback, seq| {
            f.seq == *seq
        })
    }

    /// Removes the given feedbacks (delivered, coalesced away, or refused for good by the
    /// server), in one durable commit.
    pub fn ddi_feedback_remove(&self, seqs: &[u64]) -> Result<()> {
        let wt = self.write()?;
        {
            let mut t = wt.open_table(DDI_FEEDBACK).map_err(|e| self.storage(e))?;
            for s in seqs {
                t.remove(*s).map_err(|e| self.storage(e))?;
            }
        }
        self.commit(wt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(id: &str, state: DdiActionState, at: u64) -> DdiAction {
        DdiAction {
            id: id.into(),
            version: "2.0.0".into(),
            artifact: "app-2.0.0.zip".into(),
            state,
            tx: None,
            created_unix_ms: at,
            updated_unix_ms: at,
        }
    }

    /// A row whose record names another action is a damaged journal, not an action.
    #[test]
    fn an_action_stored_under_another_id_is_journal_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.ddi_record(&action("7", DdiActionState::Downloading, 1), None).unwrap();
        let other = encode(&action("8", DdiActionState::Downloading, 1), Size::Small).unwrap();
        let wt = j.write().unwrap();
        wt.open_table(DDI_ACTIONS).unwrap().insert("7", other.as_slice()).unwrap();
        j.commit(wt).unwrap();
        let err = j.ddi_actions().unwrap_err();
        assert_eq!(err.code, crate::error::ErrorCode::JournalCorrupt, "{err}");
        assert!(err.message.contains(r#"ddi action row "7" holds another's record"#), "{err}");
    }

    /// A feedback row whose record names another seq is a damaged journal, not one to send.
    #[test]
    fn a_feedback_stored_under_another_seq_is_journal_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.ddi_push_feedback("8", FeedbackTarget::Deployment, true, b"{}".to_vec()).unwrap();
        j.ddi_push_feedback("8", FeedbackTarget::Deployment, false, b"{}".to_vec()).unwrap();
        let second = encode(&j.ddi_feedback_pending(2).unwrap()[1], Size::Small).unwrap();
        let wt = j.write().unwrap();
        wt.open_table(DDI_FEEDBACK).unwrap().insert(1, second.as_slice()).unwrap();
        j.commit(wt).unwrap();
        let err = j.ddi_feedback_pending(10).unwrap_err();
        assert_eq!(err.code, crate::error::ErrorCode::JournalCorrupt, "{err}");
        assert!(err.message.contains("ddi feedback row 1 holds another's record"), "{err}");
    }

    #[test]
    fn an_action_and_its_feedback_are_written_together_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path()).unwrap();
            let a = action("8", DdiActionState::Downloading, 1);
            assert!(
                j.ddi_record(&a, Some((FeedbackTarget::Deployment, true, b"{\"p\":1}".to_vec())))
                    .unwrap()
            );
            let done = DdiAction { state: DdiActionState::Failed, tx: Some(3), ..a.clone() };
            assert!(
                j.ddi_record(
                    &done,
                    Some((FeedbackTarget::Deployment, false, b"{\"closed\":1}".to_vec()))
                )
                .unwrap()
            );
            // A final action does not change again, and queues nothing more.
            let again = DdiAction { state: DdiActionState::Succeeded, ..a };
            assert!(
                !j.ddi_record(&again, Some((FeedbackTarget::Deployment, false, b"{}".to_vec())))
                    .unwrap()
            );
        }
        let j = Journal::open(dir.path()).unwrap();
        let a = j.ddi_action("8").unwrap().unwrap();
        assert_eq!((a.state, a.tx), (DdiActionState::Failed, Some(3)));
        let f = j.ddi_feedback_pending(10).unwrap();
        assert_eq!(
            f.iter().map(|f| (f.seq, f.progress, f.body.as_slice())).collect::<Vec<_>>(),
            vec![(1, true, &b"{\"p\":1}"[..]), (2, false, &b"{\"closed\":1}"[..])]
        );
        j.ddi_feedback_remove(&[1]).unwrap();
        assert_eq!(
            j.ddi_feedback_pending(10).unwrap().iter().map(|f| f.seq).collect::<Vec<_>>(),
            vec![2]
        );
        // Seqs are never reused.
        assert_eq!(
            j.ddi_push_feedback("8", FeedbackTarget::Cancel, false, b"{}".to_vec()).unwrap(),
            3
        );
    }

    #[test]
    fn only_the_newest_final_actions_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        for i in 0..(DDI_ACTIONS_KEPT as u64 + 5) {
            j.ddi_record(&action(&format!("a{i}"), DdiActionState::Succeeded, 100 + i), None)
                .unwrap();
        }
        j.ddi_record(&action("live", DdiActionState::Installing, 1), None).unwrap();
        let ids: Vec<String> = j.ddi_actions().unwrap().into_iter().map(|a| a.id).collect();
        assert_eq!(ids.len(), DDI_ACTIONS_KEPT + 1);
        assert!(ids.contains(&"live".to_string()), "an action in progress is never pruned");
        assert!(
            !ids.contains(&"a0".to_string()) && ids.contains(&format!("a{}", DDI_ACTIONS_KEPT + 4))
        );
    }

    #[test]
    fn a_full_feedback_outbox_drops_progress_never_a_final_feedback() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let cap = 10;
        for i in 0..cap {
            j.ddi_push_feedback_capped(
                "1",
                FeedbackTarget::Deployment,
                i % 2 == 0,
                vec![b'0'; 2],
                cap,
            )
            .unwrap();
        }
        // Full: a final one replaces the oldest progress one (seq 1).
        let s = j
            .ddi_push_feedback_capped("1", FeedbackTarget::Deployment, false, b"{}".to_vec(), cap)
            .unwrap();
        let seqs: Vec<u64> =
            j.ddi_feedback_pending(usize::MAX).unwrap().iter().map(|f| f.seq).collect();
        assert_eq!(seqs.len() as u64, cap);
        assert!(!seqs.contains(&1) && seqs.contains(&s));
        // Only final ones left: a progress feedback is the one dropped.
        let finals: Vec<u64> = j
            .ddi_feedback_pending(usize::MAX)
            .unwrap()
            .iter()
            .filter(|f| f.progress)
            .map(|f| f.seq)
            .collect();
        j.ddi_feedback_remove(&finals).unwrap();
        while (j.ddi_feedback_pending(usize::MAX).unwrap().len() as u64) < cap {
            j.ddi_push_feedback_capped("1", FeedbackTarget::Deployment, false, b"{}".to_vec(), cap)
                .unwrap();
        }
        let p = j
            .ddi_push_feedback_capped("1", FeedbackTarget::Deployment, true, b"{}".to_vec(), cap)
            .unwrap();
        assert!(!j.ddi_feedback_pending(usize::MAX).unwrap().iter().any(|f| f.seq == p));
        assert!(
            j.ddi_push_feedback(
                "1",
                FeedbackTarget::Deployment,
                false,
                vec![b' '; DDI_FEEDBACK_BODY_BYTES_MAX + 1]
            )
            .is_err()
        );
    }

    #[test]
    fn ddi_records_golden_bytes() {
        // journal-format.md §3: envelope version 0, then bincode (varints; strings and byte
        // vectors length-first; enums by variant index; Option as 0 or 1 + value).
        let a = DdiAction {
            id: "8".into(),
            version: "2".into(),
            artifact: "a".into(),
            state: DdiActionState::AwaitingConfirm,
            tx: Some(3),
            created_unix_ms: 0x0102,
            updated_unix_ms: 0x0102,
        };
        let golden = [0, 1, b'8', 1, b'2', 1, b'a', 3, 1, 3, 251, 0x02, 0x01, 251, 0x02, 0x01];
        assert_eq!(encode(&a, Size::Small).unwrap(), golden);
        assert_eq!(decode::<DdiAction>(&golden, Size::Small, "t").unwrap(), a);
        let states = [
            DdiActionState::Downloading,
            DdiActionState::Downloaded,
            DdiActionState::Installing,
            DdiActionState::AwaitingConfirm,
            DdiActionState::Succeeded,
            DdiActionState::Failed,
            DdiActionState::Canceled,
            DdiActionState::Rejected,
        ];
        for (i, st) in states.into_iter().enumerate() {
            assert_eq!(
                encode(&DdiAction { state: st, ..a.clone() }, Size::Small).unwrap()[7],
                i as u8,
                "{st:?}"
            );
        }
        let f = DdiFeedback {
            seq: 7,
            action: "8".into(),
            target: FeedbackTarget::Cancel,
            progress: false,
            body: b"{}".to_vec(),
        };
        let golden = [0, 7, 1, b'8', 1, 0, 2, b'{', b'}'];
        assert_eq!(encode(&f, Size::Small).unwrap(), golden);
        assert_eq!(decode::<DdiFeedback>(&golden, Size::Small, "t").unwrap(), f);
    }
}
