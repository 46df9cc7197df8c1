//! Phases of a transaction and the only legal transitions between them (SPEC §3).
//!
//! A phase is journaled *before* its side effects begin. So when the journal says phase P,
//! every effect of the phases before P is complete and durable, and P's own effects may be
//! partly done. Recovery relies on exactly that.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The discriminants are the variants' bincode indexes in journal records (journal-format.md):
/// never renumber or reuse one. Pinned by
/// `journal::records::tests::on_disk_enum_indexes_are_their_discriminants`.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Phase {
    Planned = 0,
    Staged = 1,
    ServicesStopped = 2,
    BackedUp = 3,
    Swapped = 4,
    PostCommands = 5,
    ServicesStarted = 6,
    Verified = 7,
    Committed = 8,
    RollingBack = 9,
    RolledBack = 10,
    RollbackFailed = 11,
    /// A committed trial install that `confirm` accepted (only with `confirm_required`).
    Confirmed = 12,
}

/// What happened to the current phase's effects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The phase's effects are complete and durable.
    Done,
    /// The phase's effects failed (or recovery decided to roll back).
    Failed,
    /// An operator asked to retry a rollback that had failed (`recover --retry`).
    OperatorRetry,
    /// Recovery used up `max_recovery_attempts`: stop and wait for an operator.
    GaveUp,
    /// The operator (or the application) confirmed a committed trial install.
    Confirmed,
}

/// Which optional phases have work. Phases without work are not journaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Shape {
    pub controls_services: bool,
    pub runs_post_cmds: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidTransition {
    pub from: Phase,
    pub event: Event,
}

impl fmt::Display for InvalidTransition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no transition from {:?} on {:?}", self.from, self.event)
    }
}

impl Phase {
    pub const ALL: [Phase; 13] = [
        Phase::Planned,
        Phase::Staged,
        Phase::ServicesStopped,
        Phase::BackedUp,
        Phase::Swapped,
        Phase::PostCommands,
        Phase::ServicesStarted,
        Phase::Verified,
        Phase::Committed,
        Phase::RollingBack,
        Phase::RolledBack,
        Phase::RollbackFailed,
        Phase::Confirmed,
    ];

    /// No further transition: the transaction is over (`RollbackFailed` waits for an operator).
    pub fn is_terminal(self) -> bool {
        match self {
            Phase::Committed | Phase::RolledBack | Phase::RollbackFailed | Phase::Confirmed => true,
            Phase::Planned
            | Phase::Staged
            | Phase::ServicesStopped
            | Phase::BackedUp
            | Phase::Swapped
            | Phase::PostCommands
            | Phase::ServicesStarted
            | Phase::Verified
            | Phase::RollingBack => false,
        }
    }

    /// Targets may have been modified: the swap has begun.
    pub fn has_swapped(self) -> bool {
        match self {
            Phase::Swapped
            | Phase::PostCommands
            | Phase::ServicesStarted
            | Phase::Verified
            | Phase::Committed
            | Phase::Confirmed => true,
            Phase::Planned
            | Phase::Staged
            | Phase::ServicesStopped
            | Phase::BackedUp
            | Phase::RollingBack
            | Phase::RolledBack
            | Phase::RollbackFailed => false,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Planned => "Planned",
            Phase::Staged => "Staged",
            Phase::ServicesStopped => "ServicesStopped",
            Phase::BackedUp => "BackedUp",
            Phase::Swapped => "Swapped",
            Phase::PostCommands => "PostCommands",
            Phase::ServicesStarted => "ServicesStarted",
            Phase::Verified => "Verified",
            Phase::Committed => "Committed",
            Phase::RollingBack => "RollingBack",
            Phase::RolledBack => "RolledBack",
            Phase::RollbackFailed => "RollbackFailed",
            Phase::Confirmed => "Confirmed",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The next phase. Exhaustive: every (phase, event) pair is either a transition or an error.
#[allow(
    clippy::too_many_lines,
    clippy::match_same_arms,
    reason = "the transition table: one arm per (phase, event), read row by row"
)]
pub fn transition(from: Phase, event: Event, shape: Shape) -> Result<Phase, InvalidTransition> {
    let invalid = Err(InvalidTransition { from, event });
    let services = |p| if shape.controls_services { p } else { skip(p, shape) };
    match (from, event) {
        (Phase::Planned, Event::Done) => Ok(Phase::Staged),
        (Phase::Staged, Event::Done) => Ok(services(Phase::ServicesStopped)),
        (Phase::ServicesStopped, Event::Done) => Ok(Phase::BackedUp),
        (Phase::BackedUp, Event::Done) => Ok(Phase::Swapped),
        (Phase::Swapped, Event::Done) => Ok(if shape.runs_post_cmds {
            Phase::PostCommands
        } else {
            services(Phase::ServicesStarted)
        }),
        (Phase::PostCommands, Event::Done) => Ok(services(Phase::ServicesStarted)),
        (Phase::ServicesStarted, Event::Done) => Ok(Phase::Verified),
        (Phase::Verified, Event::Done) => Ok(Phase::Committed),
        (Phase::RollingBack, Event::Done) => Ok(Phase::RolledBack),
        (Phase::RollingBack, Event::Failed) => Ok(Phase::RollbackFailed),
        (
            Phase::Planned
            | Phase::Staged
            | Phase::ServicesStopped
            | Phase::BackedUp
            | Phase::Swapped
            | Phase::PostCommands
            | Phase::ServicesStarted
            | Phase::Verified,
            Event::Failed,
        ) => Ok(Phase::RollingBack),
        (Phase::RollbackFailed, Event::OperatorRetry) => Ok(Phase::RollingBack),
        (Phase::Committed, Event::Confirmed) => Ok(Phase::Confirmed),
        (
            Phase::Planned
            | Phase::Staged
            | Phase::ServicesStopped
            | Phase::BackedUp
            | Phase::Swapped
            | Phase::PostCommands
            | Phase::ServicesStarted
            | Phase::Verified
            | Phase::RollingBack
            | Phase::RolledBack
            | Phase::RollbackFailed
            | Phase::Confirmed,
            Event::Confirmed,
        ) => invalid,
        (
            Phase::Planned
            | Phase::Staged
            | Phase::ServicesStopped
            | Phase::BackedUp
            | Phase::Swapped
            | Phase::PostCommands
            | Phase::ServicesStarted
            | Phase::Verified
            | Phase::RollingBack,
            Event::GaveUp,
        ) => Ok(Phase::RollbackFailed),
        (
            Phase::Committed | Phase::RolledBack | Phase::RollbackFailed | Phase::Confirmed,
            Event::GaveUp,
        ) => invalid,
        (
            Phase::Committed | Phase::RolledBack | Phase::RollbackFailed | Phase::Confirmed,
            Event::Done | Event::Failed,
        ) => invalid,
        (
            Phase::Planned
            | Phase::Staged
            | Phase::ServicesStopped
            | Phase::BackedUp
            | Phase::Swapped
            | Phase::PostCommands
            | Phase::ServicesStarted
            | Phase::Verified
            | Phase::Committed
            | Phase::RollingBack
            | Phase::RolledBack
            | Phase::Confirmed,
            Event::OperatorRetry,
        ) => invalid,
    }
}

/// The phase after a service phase that has no work.
fn skip(p: Phase, shape: Shape) -> Phase {
    match p {
        Phase::ServicesStopped => Phase::BackedUp,
        Phase::ServicesStarted => Phase::Verified,
        other => transition(other, Event::Done, shape).unwrap_or(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BARE: Shape = Shape { controls_services: false, runs_post_cmds: false };
    const FULL: Shape = Shape { controls_services: true, runs_post_cmds: true };

    fn forward(shape: Shape) -> Vec<Phase> {
        let mut p = Phase::Planned;
        let mut seen = vec![p];
        while !p.is_terminal() {
            p = transition(p, Event::Done, shape).unwrap();
            seen.push(p);
        }
        seen
    }

    #[test]
    fn full_shape_walks_every_forward_phase_in_spec_order() {
        assert_eq!(forward(FULL), Phase::ALL[..9].to_vec());
    }

    #[test]
    fn phases_without_work_are_skipped() {
        use Phase::*;
        assert_eq!(forward(BARE), vec![Planned, Staged, BackedUp, Swapped, Verified, Committed]);
    }

    #[test]
    fn any_failure_before_commit_rolls_back() {
        for p in Phase::ALL.into_iter().filter(|p| !p.is_terminal() && *p != Phase::RollingBack) {
            assert_eq!(transition(p, Event::Failed, BARE), Ok(Phase::RollingBack), "{p}");
        }
        assert_eq!(transition(Phase::RollingBack, Event::Failed, BARE), Ok(Phase::RollbackFailed));
        assert_eq!(transition(Phase::RollingBack, Event::Done, BARE), Ok(Phase::RolledBack));
    }

    #[test]
    fn terminal_phases_accept_no_event() {
        for p in [Phase::Committed, Phase::RolledBack, Phase::RollbackFailed, Phase::Confirmed] {
            assert!(transition(p, Event::Done, FULL).is_err());
            assert!(transition(p, Event::Failed, FULL).is_err());
        }
    }

    #[test]
    fn giving_up_stops_any_unfinished_transaction_for_an_operator() {
        for p in Phase::ALL.into_iter().filter(|p| !p.is_terminal()) {
            assert_eq!(transition(p, Event::GaveUp, FULL), Ok(Phase::RollbackFailed), "{p}");
        }
        assert!(transition(Phase::Committed, Event::GaveUp, FULL).is_err());
    }

    #[test]
    fn only_a_failed_rollback_can_be_retried() {
        assert_eq!(
            transition(Phase::RollbackFailed, Event::OperatorRetry, BARE),
            Ok(Phase::RollingBack)
        );
        assert!(transition(Phase::Swapped, Event::OperatorRetry, BARE).is_err());
    }

    #[test]
    fn only_a_committed_transaction_can_be_confirmed() {
        assert_eq!(transition(Phase::Committed, Event::Confirmed, FULL), Ok(Phase::Confirmed));
        for p in Phase::ALL.into_iter().filter(|p| *p != Phase::Committed) {
            assert!(transition(p, Event::Confirmed, FULL).is_err(), "{p}");
        }
        assert!(transition(Phase::Confirmed, Event::Done, FULL).is_err());
    }

    #[test]
    fn at_most_twelve_journaled_phases_per_transaction() {
        // Forward path plus a rollback from the last non-terminal phase.
        assert!(forward(FULL).len() + 2 <= 12);
    }
}
