//! Delivers the `ddi_feedback` outbox to the server, oldest first: coalesced progress is
//! removed unsent, a delivered or for-good-refused feedback is removed (one durable commit
//! each), a transient failure waits with backoff and tries the same feedback again.
//! journal-format.md §5.9.

use super::client::{Client, ClientError};
use super::decide::coalesce;
use crate::journal::Journal;
use crate::journal::ddi::FeedbackTarget;
use crate::limits::{DDI_FEEDBACK_BATCH, DDI_FEEDBACK_IDLE_POLL_S};
use crate::wakeup::{Wakeup, Worker};
use std::sync::Arc;
use std::time::Duration;

/// Starts the thread that delivers the outbox until stopped: a round whenever notified (a
/// push) or every `DDI_FEEDBACK_IDLE_POLL_S`; after a transient failure the same feedback
/// again after `backoff` (a push does not shorten it: the server is struggling). A journal
/// error ends the thread, logged; the feedback stays for the next start.
pub fn start(journal: Arc<Journal>, client: Arc<Client>) -> Worker {
    Worker::start("ddi-feedback", move |w| deliver_loop(&journal, &client, w))
}

fn deliver_loop(journal: &Journal, client: &Client, w: &Wakeup) {
    let mut failures = 0u32;
    while !w.stopping() {
        let round = match deliver_round(journal, client, DDI_FEEDBACK_BATCH) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "the DDI feedback outbox cannot be read; delivery \
                    stops until the next start");
                return;
            }
        };
        if let Some(why) = &round.retry {
            failures += 1;
            let wait = backoff(failures);
            tracing::warn!(
                failures,
                retry_in_s = wait.as_secs(),
                why,
                "DDI feedback not delivered; retrying"
            );
            if w.sleep(wait, false) {
                return;
            }
            continue;
        }
        failures = 0;
        let did = round.sent + round.coalesced + round.refused;
        if did > 0 {
            tracing::debug!(
                sent = round.sent,
                coalesced = round.coalesced,
                refused = round.refused,
                "DDI feedback delivered"
            );
            // More may wait beyond the batch: look again at once.
            continue;
        }
        if w.sleep(Duration::from_secs(DDI_FEEDBACK_IDLE_POLL_S), true) {
            return;
        }
    }
}

/// What one round of delivery did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Round {
    pub sent: usize,
    pub coalesced: usize,
    pub refused: usize,
    /// A transient error stopped the round (the feedback stays, first in line).
    pub retry: Option<String>,
}

/// Delivers up to `batch` waiting feedbacks, in order, stopping at the first transient error.
pub fn deliver_round(
    journal: &Journal,
    client: &Client,
    batch: usize,
) -> crate::error::Result<Round> {
    let pending = journal.ddi_feedback_pending(batch)?;
    let keys: Vec<(&str, bool)> = pending.iter().map(|f| (f.action.as_str(), f.progress)).collect();
    let keep = coalesce(&keys);
    let dropped: Vec<u64> =
        pending.iter().enumerate().filter(|(i, _)| !keep.contains(i)).map(|(_, f)| f.seq).collect();
    let mut round = Round { coalesced: dropped.len(), ..Round::default() };
    if !dropped.is_empty() {
        journal.ddi_feedback_remove(&dropped)?;
    }
    for i in keep {
        let f = &pending[i];
        match client.feedback_body(&f.action, f.target == FeedbackTarget::Cancel, &f.body) {
            Ok(()) => round.sent += 1,
            Err(ClientError::Refused(why) | ClientError::Withdrawn(why)) => {
                // The server will never take it (the action is gone, or closed on its side):
                // keeping it would block every later feedback.
                tracing::warn!(
                    seq = f.seq,
                    action = f.action,
                    why,
                    "DDI feedback refused by the server; dropped"
                );
                round.refused += 1;
            }
            Err(ClientError::Transient(why)) => {
                round.retry = Some(why);
                return Ok(round);
            }
        }
        journal.ddi_feedback_remove(&[f.seq])?;
    }
    Ok(round)
}

/// The wait before the next attempt after `failures` transient failures in a row.
pub fn backoff(failures: u32) -> Duration {
    let s =
        crate::limits::DDI_BACKOFF_S_MIN.saturating_mul(1u64 << failures.saturating_sub(1).min(20));
    Duration::from_secs(s.min(crate::limits::DDI_FEEDBACK_BACKOFF_S_MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feedback_backoff_doubles_from_five_seconds_and_stops_at_a_minute() {
        let s = |n| backoff(n).as_secs();
        assert_eq!((s(1), s(2), s(3), s(4)), (5, 10, 20, 40));
        assert_eq!((s(5), s(30), s(u32::MAX)), (60, 60, 60));
    }
}
