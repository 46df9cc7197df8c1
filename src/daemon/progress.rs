//! What `GET /progress` answers, kept in memory (SPEC §5): the handler only takes a mutex
//! held for microseconds, never waits for disk or journal work.

use serde::Serialize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The legacy stages, spelled as the contract spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Stage {
    #[serde(rename = "idle")]
    Idle,
    #[serde(rename = "downloading")]
    Downloading,
    #[serde(rename = "verifying")]
    Verifying,
    #[serde(rename = "toInstall")]
    ToInstall,
    #[serde(rename = "installing")]
    Installing,
    #[serde(rename = "rebooting")]
    Rebooting,
    #[serde(rename = "success")]
    Success,
    #[serde(rename = "failed")]
    Failed,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Idle => "idle",
            Stage::Downloading => "downloading",
            Stage::Verifying => "verifying",
            Stage::ToInstall => "toInstall",
            Stage::Installing => "installing",
            Stage::Rebooting => "rebooting",
            Stage::Success => "success",
            Stage::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub stage: Stage,
    pub progress: u8,
    pub message: String,
    /// `CODE: message` when the stage is `failed`.
    pub error: Option<String>,
}

impl Snapshot {
    pub fn idle() -> Snapshot {
        Snapshot { stage: Stage::Idle, progress: 0, message: "Updater ready".into(), error: None }
    }
}

/// The current snapshot and when a result (success/failed) was reached.
pub struct Progress {
    inner: Mutex<(Snapshot, Option<Instant>)>,
    hold: Duration,
}

impl Progress {
    pub fn new(hold: Duration, initial: Snapshot) -> Progress {
        Progress { inner: Mutex::new((initial, None)), hold }
    }

    /// The snapshot as the GUI should see it: a result stays visible for `result_hold_s`,
    /// then the stage returns to idle (the last result stays in `/status`).
    pub fn get(&self) -> Snapshot {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match g.1 {
            Some(t) if t.elapsed() >= self.hold => Snapshot::idle(),
            _ => g.0.clone(),
        }
    }

    /// Sets the snapshot; returns whether the stage changed (a report is due).
    pub fn set(&self, s: Snapshot) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let changed = g.0.stage != s.stage;
        let result = matches!(s.stage, Stage::Success | Stage::Failed);
        g.1 = if result { Some(Instant::now()) } else { None };
        g.0 = s;
        changed
    }
}

/// Install progress as the legacy service showed it, from the engine's phases: staging fills
/// 0–75 by bytes, then stopping services 78, swapping 80, post commands 82, starting services
/// 85, verifying 95; 100 only with the final `success`.
pub fn install_percent_for_phase(phase: crate::engine::Phase) -> Option<(u8, &'static str)> {
    use crate::engine::Phase;
    match phase {
        Phase::Planned => Some((0, "Preparing installation")),
        Phase::Staged => Some((1, "Writing new files")),
        Phase::ServicesStopped => Some((78, "Stopping services")),
        Phase::BackedUp => Some((79, "Backing up old files")),
        Phase::Swapped => Some((80, "Replacing files")),
        Phase::PostCommands => Some((82, "Running post commands")),
        Phase::ServicesStarted => Some((85, "Starting services")),
        Phase::Verified => Some((95, "Verifying installed files")),
        Phase::RollingBack => Some((95, "Rolling back")),
        Phase::Committed | Phase::RolledBack | Phase::RollbackFailed | Phase::Confirmed => None,
    }
}

pub fn staged_percent(done: u64, total: u64) -> u8 {
    (done.min(total) * 75).checked_div(total).unwrap_or(75) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_is_held_then_reads_as_idle() {
        let p = Progress::new(Duration::from_millis(50), Snapshot::idle());
        assert!(p.set(Snapshot { stage: Stage::Success, progress: 100, message: "done".into(), error: None }));
        assert_eq!(p.get().stage, Stage::Success);
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(p.get().stage, Stage::Idle);
    }

    #[test]
    fn install_progress_only_grows_through_the_forward_phases() {
        use crate::engine::Phase;
        let mut last = 0;
        // The forward phases before Committed, in order.
        for p in Phase::ALL[..8].iter().copied() {
            let (pct, _) = install_percent_for_phase(p).unwrap();
            assert!(pct >= last, "{p}");
            last = pct;
        }
        assert_eq!(staged_percent(50, 100), 37);
        assert!(staged_percent(100, 100) < install_percent_for_phase(Phase::ServicesStopped).unwrap().0);
    }
}
