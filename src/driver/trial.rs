//! Trial installs at run time: `confirm`, and the boot hook inside `recover` (SPEC §3).

use crate::engine::phase::{Event, Shape};
use crate::error::Result;
use crate::failpoint::hit;
use serde::Serialize;

use super::transaction::{PhaseCommit, commit_phase};
use super::{RecoverReport, RollbackTo, Updater, boot_id};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ConfirmReport {
    Confirmed { tx: u64, version: String, boots: u32 },
    NothingToConfirm,
}

impl Updater {
    /// Accepts the trial install: it is no longer rolled back at boot. Idempotent, so a
    /// health check may call it at every boot.
    pub fn confirm(&mut self) -> Result<ConfirmReport> {
        let Some(trial) = self.journal.trial()? else { return Ok(ConfirmReport::NothingToConfirm) };
        match self.journal.tx(trial.tx)? {
            Some(mut rec) => {
                let observer = self.observer.as_deref();
                commit_phase(
                    &self.journal,
                    observer,
                    &mut rec,
                    Event::Confirmed,
                    Shape::default(),
                    |_, _| Ok(PhaseCommit::Confirmed),
                )?;
            }
            // The trial's record was pruned: only the trial ends.
            None => self.journal.confirm_trial(None)?,
        }
        tracing::info!(tx = trial.tx, version = trial.version, "trial install confirmed");
        Ok(ConfirmReport::Confirmed { tx: trial.tx, version: trial.version, boots: trial.boots })
    }

    /// The boot hook: counts this boot for the trial, and rolls the trial back once it has
    /// run in more than `max_trial_boots` boots unconfirmed. `None`: no trial.
    pub(super) fn check_trial(&mut self) -> Result<Option<RecoverReport>> {
        let Some(mut trial) = self.journal.trial()? else { return Ok(None) };
        if let Some(counted) = trial.count_boot(&boot_id()?) {
            self.journal.update_trial(&counted)?;
            hit("trial.boot_counted");
            trial = counted;
        }
        let max = self.cfg.max_trial_boots;
        if !trial.expired(max) {
            tracing::info!(
                tx = trial.tx,
                version = trial.version,
                boots = trial.boots,
                max,
                "trial install not confirmed yet"
            );
            return Ok(Some(RecoverReport::Trial {
                tx: trial.tx,
                version: trial.version,
                boots: trial.boots,
                max_boots: max,
            }));
        }
        tracing::warn!(
            tx = trial.tx,
            version = trial.version,
            boots = trial.boots,
            max,
            "trial install never confirmed: rolling it back"
        );
        // Its commit marks the package failed and ends the trial (run::commit_effects).
        let report = self.rollback(&RollbackTo::Previous)?;
        Ok(Some(RecoverReport::TrialExpired { version: trial.version, boots: trial.boots, report }))
    }
}
