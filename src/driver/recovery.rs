//! `recover`: find the transaction in flight and resume it or roll it back (SPEC §3).

use crate::engine::phase::Event;
use crate::engine::recovery::{Decision, Inputs, ResumeNeeds, decide, resume_needs};
use crate::engine::{NewFile, NewState, PathState, Phase, Plan, TxKind};
use crate::error::{Error, ErrorCode, Result};
use crate::failpoint::hit;
use crate::fsutil::{self, temp_path};
use crate::package::Package;
use std::path::Path;

use super::transaction::Transaction;
use super::{Outcome, RecoverReport, TxReport, Updater, report};

impl Updater {
    /// Finishes or rolls back the transaction in flight, if any (SPEC §3).
    pub fn recover(&mut self, retry: bool) -> Result<RecoverReport> {
        let Some((rec, plan)) = self.journal.active()? else {
            let report = self.check_trial()?.unwrap_or(RecoverReport::Nothing);
            // Blobs a cut in the middle of the last collection left behind (driver/gc.rs).
            self.collect_garbage();
            return Ok(report);
        };
        let mut tx = Transaction::resumed(rec, plan);
        if tx.phase() == Phase::RollbackFailed {
            if !retry {
                return Ok(RecoverReport::NeedsOperator { tx: tx.rec.id, error: tx.rec.error });
            }
            tx.rec.attempts = 0;
            tx.advance(self, Event::OperatorRetry)?;
        }
        tx.note_attempt(&self.journal)?;
        hit("recover.attempt");
        let (inputs, pkg) = self.check_inputs(resume_needs(tx.phase()), &tx.plan);
        let decision = decide(
            tx.phase(),
            tx.rec.attempts,
            self.cfg.max_recovery_attempts,
            self.cfg.recovery,
            &inputs,
        );
        tracing::info!(
            tx = tx.rec.id,
            phase = %tx.phase(),
            attempt = tx.rec.attempts,
            ?decision,
            "recovering"
        );
        let report = match decision {
            Decision::Nothing => return Ok(RecoverReport::Nothing),
            Decision::Resume => self.resume(tx, pkg)?,
            Decision::RollBack { reason } => self.roll_back_interrupted(tx, &reason)?,
            Decision::GiveUp { reason } => self.give_up(tx, &reason)?,
        };
        Ok(RecoverReport::Finished { report, journal_lost: None })
    }

    /// Finishes the transaction from its last committed phase.
    fn resume(&mut self, mut tx: Transaction, pkg: Option<Package>) -> Result<TxReport> {
        // Services stopped before the crash may have been started again by the reboot; the
        // files must not change under them, and ServicesStarted must start them on the new
        // version. Stopping is idempotent.
        let stopped_before =
            matches!(tx.phase(), Phase::BackedUp | Phase::Swapped | Phase::PostCommands);
        if tx.plan.controls_services
            && stopped_before
            && let Err(e) = self.stop_services(&tx.plan)
        {
            tx.rec.error = Some(e);
            tx.advance(self, Event::Failed)?;
        }
        self.drive(tx, pkg)
    }

    /// Rolls the transaction back (entering `RollingBack` first unless a rollback was already
    /// under way).
    fn roll_back_interrupted(&mut self, mut tx: Transaction, reason: &str) -> Result<TxReport> {
        if tx.phase() != Phase::RollingBack {
            super::run::discard_staged(&tx.plan);
            tx.rec.error = Some(Error::new(
                ErrorCode::DeploymentFailed,
                format!("interrupted in phase {}; {reason}", tx.phase()),
            ));
            tx.advance(self, Event::Failed)?;
        }
        self.roll_back(tx)
    }

    /// Stops trying: the transaction waits in `RollbackFailed` for an operator.
    fn give_up(&mut self, mut tx: Transaction, reason: &str) -> Result<TxReport> {
        let last = tx.rec.error.as_ref().map_or_else(|| "none".into(), ToString::to_string);
        let err = Error::new(ErrorCode::RollbackFailed, format!("{reason}; last error: {last}"));
        tx.rec.error = Some(err.clone());
        tx.advance(self, Event::GaveUp)?;
        Ok(report(&tx.rec, &tx.plan, Outcome::RollbackFailed { error: err }))
    }

    /// Whether what resuming needs is there (`ResumeNeeds`), and the reopened package.
    pub(super) fn check_inputs(
        &self,
        needs: ResumeNeeds,
        plan: &Plan,
    ) -> (Inputs, Option<Package>) {
        match needs {
            ResumeNeeds::Nothing => (Inputs::Available, None),
            ResumeNeeds::Source => match &plan.kind {
                TxKind::Install { package } => {
                    match Package::open(Path::new(&package.path), &self.cfg, &self.roots) {
                        Ok(mut p) => match p.is(&package.blake3) {
                            Ok(true) => (Inputs::Available, Some(p)),
                            Ok(false) => (
                                Inputs::Missing(format!("package {} has changed", package.path)),
                                None,
                            ),
                            Err(e) => {
                                (Inputs::Missing(format!("package {}: {e}", package.path)), None)
                            }
                        },
                        Err(e) => (Inputs::Missing(format!("package {}: {e}", package.path)), None),
                    }
                }
                TxKind::Rollback { .. } => {
                    let missing = plan.targets.iter().find_map(|t| match t.new {
                        NewState::File(NewFile { hash: Some(h), .. }) if !self.store.has(&h) => {
                            Some(t.path.clone())
                        }
                        _ => None,
                    });
                    match missing {
                        None => (Inputs::Available, None),
                        Some(p) => (Inputs::Missing(format!("backup for {p} is missing")), None),
                    }
                }
            },
            ResumeNeeds::StagedContent => {
                let checked = crate::parallel::try_map(&plan.targets, |t| {
                    let missing = |why: &str| {
                        Error::new(ErrorCode::DeploymentFailed, format!("{}: {why}", t.path))
                    };
                    let want =
                        t.new.settled().ok_or_else(|| missing("new hash was never recorded"))?;
                    if want == PathState::Absent {
                        return Ok(());
                    }
                    let target = Path::new(&t.path);
                    let staged_ok =
                        fsutil::observe(&temp_path(target, plan.tx_id)).is_ok_and(|s| s == want);
                    if !staged_ok && (fsutil::observe(target) != Ok(want)) {
                        return Err(missing(
                            "neither the staged nor the live file holds the new content",
                        ));
                    }
                    Ok(())
                });
                match checked {
                    Ok(_) => (Inputs::Available, None),
                    Err(e) => (Inputs::Missing(e.message), None),
                }
            }
        }
    }
}
