//! The daemon's jobs (download, install, rollback), the progress they show, and the reports
//! they send (SPEC §5). Every function here runs on a job thread or at start-up, never on
//! the async runtime: they commit to the journal.

use super::Daemon;
use super::progress::{self, Snapshot, Stage};
use crate::download::{self, DownloadRequest};
use crate::driver::{
    Held, InstallOptions, Observer, Outcome, RecoverReport, RollbackTo, TxAction, TxReport,
};
use crate::engine::Phase;
use crate::error::Error;
use crate::reporter::Report;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// Ends a job with `s`: its report is queued, then the slot freed and `s` shown (see
/// `Daemon::end_job` for why in that order and under the slot's lock).
pub(super) fn publish_end(d: &Daemon, s: Snapshot) {
    d.end_job(s.clone(), || push_report(d, &s, None, false));
}

/// Publishes a snapshot; a stage change also goes to the outbox.
pub fn publish(d: &Daemon, s: Snapshot, tx: Option<u64>) {
    if d.progress.set(s.clone()) {
        push_report(d, &s, tx, false);
    }
}

fn report_of(
    d: &Daemon,
    s: &Snapshot,
    tx: Option<u64>,
    final_report: bool,
    version: Option<String>,
) -> Report {
    Report {
        version,
        stage: s.stage.name().to_string(),
        progress: s.progress,
        message: s.message.clone(),
        error: s.error.clone(),
        tx,
        boot_id: d.boot_id.clone(),
        seq: 0,
        final_report,
    }
}

fn push_report(d: &Daemon, s: &Snapshot, tx: Option<u64>, final_report: bool) {
    match d.held.journal.outbox_push(report_of(d, s, tx, final_report, d.job_version())) {
        Ok(_) => d.reporter.notify(),
        // A report that cannot be journaled is logged; the update goes on (never blocked).
        Err(e) => tracing::warn!(error = %e, "could not queue a progress report"),
    }
}

/// The one final report of a transaction (again after a crash: the journal keeps it unique),
/// naming the version the transaction went to (for a failed one: the version it tried).
fn push_final(d: &Daemon, tx: u64, s: &Snapshot, version: Option<String>) {
    match d.held.journal.outbox_push_final(tx, report_of(d, s, Some(tx), true, version)) {
        Ok(_) => d.reporter.notify(),
        Err(e) => tracing::warn!(tx, error = %e, "could not queue the final report"),
    }
}

/// A failed job's snapshot, its error as the legacy clients read it.
pub(super) fn failed_job(error: &Error, progress: u8, job: progress::Job) -> Snapshot {
    let text = progress::legacy_error_text(error, job);
    Snapshot { stage: Stage::Failed, progress, message: text.clone(), error: Some(text) }
}

/// A failed install or rollback.
pub(super) fn failed(error: &Error, progress: u8) -> Snapshot {
    failed_job(error, progress, progress::Job::Transaction)
}

/// The snapshot a transaction's end shows, and its final report.
pub(super) fn ended(d: &Daemon, r: &TxReport) {
    let s = match &r.outcome {
        Outcome::Committed => Snapshot {
            stage: Stage::Success,
            progress: 100,
            message: match r.kind {
                TxAction::Rollback => format!(
                    "Rolled back to {}",
                    r.to_version.as_deref().unwrap_or("the factory state")
                ),
                TxAction::Install => "Update completed successfully".into(),
            },
            error: None,
        },
        Outcome::RolledBack { error, .. } | Outcome::RollbackFailed { error } => failed(error, 100),
        Outcome::Interrupted { error } => {
            // Shutdown or a journal failure: the transaction is still in flight; the next
            // start finishes it and sends the final report then.
            if d.cancel.load(Ordering::SeqCst)
                && error.code == crate::error::ErrorCode::OperationInProgress
            {
                tracing::info!(
                    tx = r.tx,
                    "transaction paused for shutdown; the next start resumes it"
                );
            } else {
                tracing::warn!(tx = r.tx, error = %error, "transaction interrupted");
            }
            d.progress.set(Snapshot {
                stage: Stage::Installing,
                progress: 0,
                message: "Interrupted; resuming at the next start".into(),
                error: None,
            });
            return;
        }
    };
    d.end_job(s.clone(), || push_final(d, r.tx, &s, r.to_version.clone()));
}

/// Maps engine phases to the legacy install progress.
pub struct InstallObserver {
    pub daemon: Arc<Daemon>,
}

impl Observer for InstallObserver {
    fn phase(&self, tx: u64, phase: Phase) {
        if let Some((pct, msg)) = progress::install_percent_for_phase(phase) {
            publish(
                &self.daemon,
                Snapshot {
                    stage: Stage::Installing,
                    progress: pct,
                    message: msg.into(),
                    error: None,
                },
                Some(tx),
            );
        }
    }

    fn staged(&self, module: &str, index: usize, modules: usize, done: u64, total: u64) {
        // Memory only: staging progress is frequent and is not reported to device-api.
        self.daemon.progress.set(Snapshot {
            stage: Stage::Installing,
            progress: progress::staged_percent(done, total),
            message: format!("Deploying module {module} ({index}/{modules})"),
            error: None,
        });
    }
}

/// What `/progress` shows right after start-up.
pub fn initial_snapshot(held: &Held, recovered: &RecoverReport) -> Snapshot {
    match recovered {
        RecoverReport::Finished { report, .. } | RecoverReport::TrialExpired { report, .. } => {
            match &report.outcome {
                Outcome::Committed if report.kind == TxAction::Install => Snapshot {
                    stage: Stage::Success,
                    progress: 100,
                    message: "Update completed successfully".into(),
                    error: None,
                },
                Outcome::RolledBack { error, .. }
                | Outcome::RollbackFailed { error }
                | Outcome::Interrupted { error } => failed(error, 100),
                Outcome::Committed => Snapshot::idle(),
            }
        }
        RecoverReport::NeedsOperator { error: Some(e), .. } => failed(e, 100),
        // A transaction that ended just before a crash, its result never shown: show it.
        _ if let Some(s) = unreported_end(held) => s,
        _ => match held.journal.download() {
            Ok(Some(rec)) if rec.is_verified() => Snapshot {
                stage: Stage::ToInstall,
                progress: 100,
                message: "Package verified successfully, ready for installation".into(),
                error: None,
            },
            _ => Snapshot::idle(),
        },
    }
}

/// The result of the last transaction if its final report was never queued.
fn unreported_end(held: &Held) -> Option<Snapshot> {
    let last = held.journal.history(1).ok()?.into_iter().next()?;
    let reported = held.journal.outbox_last_final_tx().ok()?;
    if !last.phase.is_terminal() || reported.is_some_and(|r| r >= last.id) {
        return None;
    }
    Some(end_of_record(&last))
}

/// The result a finished transaction shows, from its journal record.
fn end_of_record(last: &crate::journal::records::TxRecord) -> Snapshot {
    match (&last.phase, &last.error, &last.kind) {
        (Phase::RolledBack | Phase::RollbackFailed, Some(e), _) => failed(e, 100),
        (_, _, crate::engine::TxKind::Rollback { .. }) => Snapshot {
            stage: Stage::Success,
            progress: 100,
            message: format!(
                "Rolled back to {}",
                last.to_version.as_deref().unwrap_or("the factory state")
            ),
            error: None,
        },
        _ => Snapshot {
            stage: Stage::Success,
            progress: 100,
            message: "Update completed successfully".into(),
            error: None,
        },
    }
}

/// Sends the final report of a transaction that recovery finished, and of the last
/// transaction if its end was never reported (a crash right after it, or the CLI ran it).
pub fn report_recovered(d: &Arc<Daemon>, recovered: &RecoverReport) {
    if let RecoverReport::Finished { report, .. } | RecoverReport::TrialExpired { report, .. } =
        recovered
    {
        ended(d, report);
    }
    if let Ok(Some(last)) = d.held.journal.history(1).map(|h| h.into_iter().next())
        && last.phase.is_terminal()
    {
        push_final(d, last.id, &end_of_record(&last), last.to_version.clone());
    }
}

/// Downloaded packages do not accumulate (SPEC §3, issue "a device's whole life"): at start-up
/// a verified package past its trust window, or whose file is gone, is removed with its record.
pub fn clean_stale_download(held: &Held, trust_window_h: u64) {
    let Ok(Some(rec)) = held.journal.download() else { return };
    let expired = download::is_expired(&rec, trust_window_h, crate::clock::now_unix_ms());
    if rec.is_verified() && (expired || !std::path::Path::new(&rec.path).exists()) {
        tracing::info!(
            path = rec.path,
            expired,
            "removing a downloaded package that can no longer be installed"
        );
        if let Err(e) = download::discard(&held.journal, &rec) {
            tracing::warn!(error = %e, "could not remove the stale download");
        }
    }
}

/// The package of a committed install is consumed (SPEC §3). After a crash between the
/// commit and the cleanup (or a recovery that finished the install), the start-up does it.
pub fn clean_consumed_download(held: &Held) {
    let (Ok(Some(rec)), Ok(Some(last))) =
        (held.journal.download(), held.journal.history(1).map(|h| h.into_iter().next()))
    else {
        return;
    };
    let committed = matches!(last.phase, Phase::Committed | Phase::Confirmed);
    if let crate::engine::TxKind::Install { package } = &last.kind
        && committed
        && package.path == rec.path
    {
        tracing::info!(
            tx = last.id,
            path = rec.path,
            "removing the package its committed install consumed"
        );
        if let Err(e) = held.journal.clear_download() {
            tracing::warn!(error = %e, "could not clear the download record");
        }
        let _ = std::fs::remove_file(&rec.path);
    }
}

/// A download that a restart or power cut interrupted continues by itself.
pub fn resume_download_if_any(d: &Arc<Daemon>) {
    if let Ok(Some(rec)) = d.held.journal.download()
        && !rec.is_verified()
        && !rec.failed
    {
        // Only a legacy (MD5) download is this daemon's own job to resume.
        let Some(req) = rec.request.legacy_request() else {
            tracing::info!(
                hash = rec.request.expected.algorithm(),
                offset = rec.offset,
                "an interrupted non-MD5 download is not resumed here"
            );
            return;
        };
        tracing::info!(
            url = req.package_url,
            offset = rec.offset,
            "resuming the interrupted download"
        );
        let _ = d.start_download(req);
    }
}

/// What `/progress` shows when a download starts.
pub fn download_started() -> Snapshot {
    Snapshot {
        stage: Stage::Downloading,
        progress: 0,
        message: "Downloading package...".into(),
        error: None,
    }
}

pub fn install_started() -> Snapshot {
    Snapshot {
        stage: Stage::Installing,
        progress: 0,
        message: "Preparing installation".into(),
        error: None,
    }
}

pub fn rollback_started() -> Snapshot {
    Snapshot { stage: Stage::Installing, progress: 0, message: "Rolling back".into(), error: None }
}

/// Shows a legacy download's progress; every 5 % goes to device-api too.
fn download_progress(d: &Daemon, last_reported: &AtomicU8, done: u64, total: u64) {
    let pct = (done.min(total) * 100).checked_div(total).unwrap_or(0) as u8;
    let msg = format!(
        "Downloading package... {:.1} MB / {:.1} MB",
        done as f64 / 1e6,
        total as f64 / 1e6
    );
    d.progress.set(Snapshot {
        stage: Stage::Downloading,
        progress: pct,
        message: msg.clone(),
        error: None,
    });
    let step = pct / 5 * 5;
    if step > last_reported.load(Ordering::Relaxed) {
        last_reported.store(step, Ordering::Relaxed);
        let report =
            Snapshot { stage: Stage::Downloading, progress: step, message: msg, error: None };
        push_report(d, &report, None, false);
    }
}

pub fn download_job(d: &Arc<Daemon>, req: DownloadRequest) {
    d.set_job_version(Some(req.version.clone()));
    push_report(d, &download_started(), None, false);
    let last_reported = AtomicU8::new(0);
    let progress = |done: u64, total: u64| download_progress(d, &last_reported, done, total);
    match download::run(&d.held.journal, &d.cfg, &req, &progress, &d.cancel) {
        Ok(_) => {
            publish(
                d,
                Snapshot {
                    stage: Stage::Verifying,
                    progress: 100,
                    message: "Verifying package integrity...".into(),
                    error: None,
                },
                None,
            );
            publish_end(
                d,
                Snapshot {
                    stage: Stage::ToInstall,
                    progress: 100,
                    message: "Package verified successfully, ready for installation".into(),
                    error: None,
                },
            );
        }
        Err(_) if d.cancel.load(Ordering::SeqCst) => {
            tracing::info!("download paused for shutdown; it resumes at the next start");
        }
        Err(e) => {
            // Not resumed by itself at the next start (the same request again resumes it).
            if let Ok(Some(mut rec)) = d.held.journal.download()
                && rec.request == req.spec()
            {
                rec.failed = true;
                if let Err(e) = d.held.journal.put_download(&rec) {
                    tracing::warn!(error = %e, "could not record the failed download");
                }
            }
            // A package of the wrong size was discarded: nothing of it is kept (the legacy
            // service showed 0 too).
            let pct = if e.code == crate::error::ErrorCode::PackageSizeMismatch {
                0
            } else {
                d.progress.get().progress
            };
            publish_end(d, failed_job(&e, pct, progress::Job::Download));
        }
    }
}

pub fn install_job(d: &Arc<Daemon>, package: std::path::PathBuf, version: String) {
    d.set_job_version(Some(version.clone()));
    crate::gui::launch(&d.cfg);
    push_report(d, &install_started(), None, false);
    let result = d.updater().and_then(|mut up| {
        up.install(&package, &InstallOptions { version: Some(version), ..Default::default() })
    });
    match result {
        Ok(r) => {
            if matches!(r.outcome, Outcome::Committed) {
                // The package is consumed: SPEC §3 "Committed: ... the package is cleaned up".
                if let Err(e) = d.held.journal.clear_download() {
                    tracing::warn!(error = %e, "could not clear the download record");
                }
                let _ = std::fs::remove_file(&package);
            }
            ended(d, &r);
        }
        // Refused before the transaction began: nothing was touched.
        Err(e) => publish_end(d, failed(&e, 0)),
    }
}

pub fn rollback_job(d: &Arc<Daemon>, to: RollbackTo) {
    // The version it returns to is known at its end (the final report names it).
    d.set_job_version(match &to {
        RollbackTo::Version(v) => Some(v.clone()),
        _ => None,
    });
    push_report(d, &rollback_started(), None, false);
    match d.updater().and_then(|mut up| up.rollback(&to)) {
        Ok(r) => ended(d, &r),
        Err(e) => publish_end(d, failed(&e, 0)),
    }
}
