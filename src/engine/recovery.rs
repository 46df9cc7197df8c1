//! What `recover` does with a transaction found in flight (SPEC §3).

use super::phase::Phase;
use serde::{Deserialize, Serialize};

/// What `recover` does when both resuming and rolling back are possible (config `recovery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecoveryPolicy {
    Resume,
    Rollback,
}

/// What resuming from a phase needs besides the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeNeeds {
    /// Staging may be incomplete: the package (or, for a rollback, the blobs) must still be
    /// there and match its hash.
    Source,
    /// Staging is complete: every target must hold its new content or have a staged file
    /// that verifies against the plan.
    StagedContent,
    /// The swap is complete; resuming re-verifies the live files.
    Nothing,
}

pub fn resume_needs(phase: Phase) -> ResumeNeeds {
    match phase {
        Phase::Planned | Phase::Staged => ResumeNeeds::Source,
        Phase::ServicesStopped | Phase::BackedUp | Phase::Swapped => ResumeNeeds::StagedContent,
        Phase::PostCommands
        | Phase::ServicesStarted
        | Phase::Verified
        | Phase::Committed
        | Phase::RollingBack
        | Phase::RolledBack
        | Phase::RollbackFailed
        | Phase::Confirmed => ResumeNeeds::Nothing,
    }
}

/// Whether the inputs that `resume_needs` named are there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inputs {
    Available,
    Missing(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Terminal already: nothing to do.
    Nothing,
    /// Continue forward from the journaled phase.
    Resume,
    /// Roll back (or continue rolling back).
    RollBack { reason: String },
    /// Too many attempts: stop at `RollbackFailed` and ask for an operator.
    GiveUp { reason: String },
}

/// `attempts` counts recovery runs for this transaction, including the current one.
pub fn decide(
    phase: Phase,
    attempts: u32,
    max_attempts: u32,
    policy: RecoveryPolicy,
    inputs: &Inputs,
) -> Decision {
    if phase.is_terminal() {
        return Decision::Nothing;
    }
    if attempts > max_attempts {
        return Decision::GiveUp {
            reason: format!(
                "recovery attempted {} times (max_recovery_attempts = {max_attempts})",
                attempts - 1
            ),
        };
    }
    if phase == Phase::RollingBack {
        return Decision::RollBack { reason: "a rollback was in progress".into() };
    }
    match (inputs, policy) {
        (Inputs::Missing(why), _) => Decision::RollBack { reason: format!("cannot resume: {why}") },
        (Inputs::Available, RecoveryPolicy::Resume) => Decision::Resume,
        (Inputs::Available, RecoveryPolicy::Rollback) => {
            Decision::RollBack { reason: "recovery = \"rollback\"".into() }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: Inputs = Inputs::Available;

    #[test]
    fn resumes_by_default_when_inputs_verify() {
        for p in [Phase::Planned, Phase::Staged, Phase::BackedUp, Phase::Swapped, Phase::Verified] {
            assert_eq!(decide(p, 1, 5, RecoveryPolicy::Resume, &OK), Decision::Resume, "{p}");
        }
    }

    #[test]
    fn rolls_back_when_an_input_is_missing_even_after_the_swap() {
        let missing = Inputs::Missing("staged file gone".into());
        assert!(matches!(
            decide(Phase::Swapped, 1, 5, RecoveryPolicy::Resume, &missing),
            Decision::RollBack { .. }
        ));
        assert!(matches!(
            decide(Phase::Staged, 1, 5, RecoveryPolicy::Resume, &missing),
            Decision::RollBack { .. }
        ));
    }

    #[test]
    fn policy_rollback_is_honoured() {
        assert!(matches!(
            decide(Phase::BackedUp, 1, 5, RecoveryPolicy::Rollback, &OK),
            Decision::RollBack { .. }
        ));
    }

    #[test]
    fn an_interrupted_rollback_continues_as_a_rollback() {
        assert!(matches!(
            decide(Phase::RollingBack, 2, 5, RecoveryPolicy::Resume, &OK),
            Decision::RollBack { .. }
        ));
    }

    #[test]
    fn gives_up_after_max_attempts_instead_of_looping() {
        assert!(matches!(
            decide(Phase::Swapped, 6, 5, RecoveryPolicy::Resume, &OK),
            Decision::GiveUp { .. }
        ));
        assert!(matches!(
            decide(Phase::RollingBack, 6, 5, RecoveryPolicy::Resume, &OK),
            Decision::GiveUp { .. }
        ));
        assert_eq!(decide(Phase::Swapped, 5, 5, RecoveryPolicy::Resume, &OK), Decision::Resume);
    }

    #[test]
    fn terminal_transactions_need_nothing() {
        for p in [Phase::Committed, Phase::RolledBack, Phase::RollbackFailed] {
            assert_eq!(decide(p, 99, 5, RecoveryPolicy::Resume, &OK), Decision::Nothing);
        }
    }
}
