//! The running transaction as a value, and the one place a phase change is committed.
//!
//! Write-ahead rule (STYLE rule 1): `commit_phase` is the only code that moves a transaction
//! to another phase. In this order it asks the pure state machine for the next phase, commits
//! that phase durably to the journal together with what the phase writes, fires the phase's
//! crash point, and tells the observer. The new phase's effects run only after it returns,
//! and they are made durable before the next call: so recovery knows, from the journaled
//! phase alone, which effects are complete and which may be partial.

use super::{Observer, Updater, now_ms, shape};
use crate::engine::known::{KnownFile, StagedIdentity, Timestamp};
use crate::engine::phase::{Event, Shape, transition};
use crate::engine::{Hash, Phase, Plan, TxKind};
use crate::error::{Error, ErrorCode, Result};
use crate::failpoint::hit;
use crate::journal::records::TxRecord;
use crate::journal::{CommitEffects, Journal};
use std::collections::BTreeMap;

/// A transaction this process runs: its journaled record and plan, and what its phases
/// learnt in this run for later phases.
pub(super) struct Transaction {
    pub rec: TxRecord,
    pub plan: Plan,
    /// A phase learnt something the plan must keep (the new files' hashes, at staging): the
    /// next phase commit writes the plan with the record.
    pub plan_changed: bool,
    pub learnt: Learnt,
}

/// What the phases of one run learn for its later phases. Never journaled: a resumed
/// transaction re-performs its journaled phase, which learns it again (or the later phase
/// falls back to reading the files).
#[derive(Default)]
pub(super) struct Learnt {
    /// What each file this run staged was after staging's flush (none with
    /// `verify_from_media`, or in a run that resumed after staging): `Verified` checks targets
    /// against these instead of reading them back.
    pub staged: BTreeMap<String, StagedIdentity>,
    /// Targets `Verified` read with a settled signature: the known-file records the
    /// `Committed` commit stores.
    pub verified: BTreeMap<String, KnownFile>,
    /// A coarse clock reading taken after the swap's last rename (`Verified` waits past it).
    pub swapped_at: Option<Timestamp>,
}

/// What the journal writes in the same commit as the new phase.
pub(super) enum PhaseCommit<'a> {
    /// The record, and the plan when a phase learnt something.
    Record { plan: Option<&'a Plan> },
    /// The end of a transaction that committed: generations, factory, known files, trial.
    Committed(Box<CommitEffects>),
    /// The end of a rollback: the package that failed is remembered (an install's).
    RolledBack { failed_package: Option<Hash> },
    /// A trial install accepted: the trial ends.
    Confirmed,
}

/// Moves `rec` to the phase `event` leads to: the pure transition; then `with` says what
/// the commit carries (it may note counts in the record); then the journal commit, the
/// phase's crash point and the observer. Nothing of the new phase has happened yet.
pub(super) fn commit_phase<'a>(
    journal: &Journal,
    observer: Option<&dyn Observer>,
    rec: &mut TxRecord,
    event: Event,
    shape: Shape,
    with: impl FnOnce(Phase, &mut TxRecord) -> Result<PhaseCommit<'a>>,
) -> Result<Phase> {
    let next = transition(rec.phase, event, shape).map_err(|e| Error::internal(e.to_string()))?;
    rec.phase = next;
    rec.phases.push(next);
    rec.updated_unix_ms = now_ms();
    match with(next, rec)? {
        PhaseCommit::Record { plan } => journal.save_tx(rec, plan)?,
        PhaseCommit::Committed(fx) => journal.finish_committed(rec, *fx)?,
        PhaseCommit::RolledBack { failed_package } => {
            journal.finish_rolled_back(rec, failed_package)?;
        }
        PhaseCommit::Confirmed => journal.confirm_trial(Some(rec))?,
    }
    hit(&format!("enter.{}", next.name()));
    if let Some(o) = observer {
        o.phase(rec.id, next);
    }
    Ok(next)
}

impl Transaction {
    /// A new transaction, in `Planned` (not journaled yet: `Journal::begin` does that).
    pub fn planned(plan: Plan) -> Transaction {
        let now = now_ms();
        let rec = TxRecord {
            id: plan.tx_id,
            kind: plan.kind.clone(),
            from_version: plan.from_version.clone(),
            to_version: plan.to_version.clone(),
            phase: Phase::Planned,
            phases: vec![Phase::Planned],
            attempts: 0,
            error: None,
            targets: plan.targets.len() as u32,
            new_bytes: plan.new_bytes(),
            commits: 0,
            started_unix_ms: now,
            updated_unix_ms: now,
            post_cmds_done: 0,
            freed_blobs: 0,
            freed_bytes: 0,
        };
        Transaction::resumed(rec, plan)
    }

    /// The transaction of a plan copy whose journal was lost, to be rolled back. Its history
    /// before the loss is unknown: `phases` starts at `RollingBack` (so the rollback treats
    /// services as possibly stopped, see `run::services_may_be_stopped`).
    pub fn imported(plan: Plan, lost: &Error) -> Transaction {
        let mut tx = Transaction::planned(plan);
        tx.rec.phase = Phase::RollingBack;
        tx.rec.phases = vec![Phase::RollingBack];
        tx.rec.error = Some(Error::new(
            ErrorCode::JournalCorrupt,
            format!("{}; rolled back from the plan copy", lost.message),
        ));
        tx
    }

    /// A transaction as the journal has it in flight.
    pub fn resumed(rec: TxRecord, plan: Plan) -> Transaction {
        Transaction { rec, plan, plan_changed: false, learnt: Learnt::default() }
    }

    pub fn phase(&self) -> Phase {
        self.rec.phase
    }

    /// The phase `event` would lead to, without entering it.
    pub fn peek(&self, event: Event) -> Result<Phase> {
        transition(self.rec.phase, event, shape(&self.plan))
            .map_err(|e| Error::internal(e.to_string()))
    }

    /// Enters the phase `event` leads to, with what that phase commits (`commit_phase`).
    pub fn advance(&mut self, up: &Updater, event: Event) -> Result<Phase> {
        let Transaction { rec, plan, plan_changed, learnt } = self;
        let plan: &Plan = plan;
        commit_phase(&up.journal, up.observer.as_deref(), rec, event, shape(plan), |next, rec| {
            Ok(match next {
                Phase::Committed => {
                    let fx = up.commit_effects(plan, std::mem::take(&mut learnt.verified))?;
                    up.note_freed(rec, Some(&fx));
                    PhaseCommit::Committed(Box::new(fx))
                }
                Phase::RolledBack => {
                    up.note_freed(rec, None);
                    let failed_package = match &plan.kind {
                        TxKind::Install { package } => Some(package.blake3),
                        TxKind::Rollback { .. } => None,
                    };
                    PhaseCommit::RolledBack { failed_package }
                }
                // A failed commit ends the run (the transaction stays in flight), so the flag
                // is not needed after it either way.
                _ => PhaseCommit::Record { plan: std::mem::take(plan_changed).then_some(plan) },
            })
        })
    }

    /// Records one more recovery attempt (no phase change): `max_recovery_attempts` counts
    /// these, so a transaction that crashes recovery every time is given up, not retried forever.
    pub fn note_attempt(&mut self, journal: &Journal) -> Result<()> {
        self.rec.attempts += 1;
        self.rec.updated_unix_ms = now_ms();
        journal.save_tx(&mut self.rec, None)
    }
}
