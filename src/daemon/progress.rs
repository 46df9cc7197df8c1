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
        let g = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match g.1 {
            Some(t) if t.elapsed() >= self.hold => Snapshot::idle(),
            _ => g.0.clone(),
        }
    }

    /// The GUI has shown the result (`POST /return-to-system`): a `success` or `failed` reads
    /// as idle from now on, as once `result_hold_s` has passed; any other stage stays.
    pub fn acknowledge(&self) {
        let mut g = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if matches!(g.0.stage, Stage::Success | Stage::Failed) {
            *g = (Snapshot::idle(), None);
        }
    }

    /// Sets the snapshot; returns whether the stage changed (a report is due).
    pub fn set(&self, s: Snapshot) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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

/// Which job failed: the legacy clients know a few codes per job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    Download,
    /// An install or a rollback (a transaction).
    Transaction,
}

/// An error as the legacy clients read it in `/progress` and in reports (`CODE: message`):
/// codes `device-api` and the GUI know pass as they are; any other is wrapped under the one
/// the Python service used for that job (`DEPLOYMENT_FAILED: POST_CMD_FAILED: ...`), so the
/// fine-grained code is still in the text. `/status`, `/history`, the CLI and the journal keep
/// the fine-grained code alone.
pub fn legacy_error_text(e: &crate::error::Error, job: Job) -> String {
    use crate::error::ErrorCode::{
        DeploymentFailed, DiskFull, DownloadFailed, InvalidManifest, Md5Mismatch,
        PackageSizeMismatch, ProcessKillFailed,
    };
    let known = match job {
        Job::Download => {
            matches!(e.code, DownloadFailed | Md5Mismatch | DiskFull | PackageSizeMismatch)
        }
        Job::Transaction => matches!(
            e.code,
            DeploymentFailed | DiskFull | InvalidManifest | ProcessKillFailed | Md5Mismatch
        ),
    };
    let umbrella = match job {
        Job::Download => DownloadFailed,
        Job::Transaction => DeploymentFailed,
    };
    if known {
        format!("{}: {}", e.code, e.message)
    } else {
        format!("{umbrella}: {}: {}", e.code, e.message)
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
        assert!(p.set(Snapshot {
            stage: Stage::Success,
            progress: 100,
            message: "done".into(),
            error: None
        }));
        assert_eq!(p.get().stage, Stage::Success);
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(p.get().stage, Stage::Idle);
    }

    #[test]
    fn an_acknowledged_result_reads_as_idle_and_other_stages_stay() {
        let p = Progress::new(Duration::from_secs(600), Snapshot::idle());
        p.set(Snapshot {
            stage: Stage::ToInstall,
            progress: 100,
            message: "ready".into(),
            error: None,
        });
        p.acknowledge();
        assert_eq!(p.get().stage, Stage::ToInstall);
        p.set(Snapshot {
            stage: Stage::Failed,
            progress: 40,
            message: "x".into(),
            error: Some("x".into()),
        });
        p.acknowledge();
        assert_eq!(p.get(), Snapshot::idle());
    }

    #[test]
    fn legacy_clients_see_only_the_codes_they_know() {
        use crate::error::{Error, ErrorCode};
        let e = |c| Error::new(c, "why");
        assert_eq!(
            legacy_error_text(&e(ErrorCode::PostCmdFailed), Job::Transaction),
            "DEPLOYMENT_FAILED: POST_CMD_FAILED: why"
        );
        assert_eq!(
            legacy_error_text(&e(ErrorCode::ServiceStartFailed), Job::Transaction),
            "DEPLOYMENT_FAILED: SERVICE_START_FAILED: why"
        );
        assert_eq!(
            legacy_error_text(&e(ErrorCode::ProcessKillFailed), Job::Transaction),
            "PROCESS_KILL_FAILED: why"
        );
        assert_eq!(
            legacy_error_text(&e(ErrorCode::InvalidManifest), Job::Transaction),
            "INVALID_MANIFEST: why"
        );
        assert_eq!(
            legacy_error_text(&e(ErrorCode::DeploymentFailed), Job::Transaction),
            "DEPLOYMENT_FAILED: why"
        );
        assert_eq!(
            legacy_error_text(&e(ErrorCode::Md5Mismatch), Job::Download),
            "MD5_MISMATCH: why"
        );
        assert_eq!(
            legacy_error_text(&e(ErrorCode::PackageSizeMismatch), Job::Download),
            "PACKAGE_SIZE_MISMATCH: why"
        );
        assert_eq!(
            legacy_error_text(&e(ErrorCode::InternalError), Job::Download),
            "DOWNLOAD_FAILED: INTERNAL_ERROR: why"
        );
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
        assert!(
            staged_percent(100, 100) < install_percent_for_phase(Phase::ServicesStopped).unwrap().0
        );
    }
}
