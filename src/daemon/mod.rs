//! `tope-updater serve` (SPEC §5): recovery first, then the legacy HTTP API on `api.listen`.
//!
//! Threads: one tokio current-thread runtime serves HTTP and only reads memory (`progress`)
//! or hands work to blocking threads; at most one job thread (download, install, rollback)
//! runs at a time; the reporter thread delivers the outbox. The state-dir lock and the one
//! journal handle (`Held`) live as long as the process, so the CLI cannot start a second
//! transaction meanwhile (it gets `OPERATION_IN_PROGRESS`) and reads state through the API.

pub mod api;
pub mod conns;
pub mod fleet;
pub mod guard;
pub mod jobs;
pub mod peer;
pub mod progress;

use crate::config::Config;
use crate::driver::{Held, RecoverReport, Updater};
use crate::error::{Error, ErrorCode, Result};
use progress::{Progress, Snapshot, Stage};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Daemon {
    pub cfg: Config,
    pub held: Held,
    pub progress: Progress,
    /// The job thread, if one was started (finished or not).
    job: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// A job holds the slot from its start until it shows its result (`release`): a caller
    /// that sees `toInstall` or `success` may start the next one at once, even while the
    /// thread is still tidying up.
    running: AtomicBool,
    /// The request of the download job holding the slot, if that job is a download: the same
    /// request again is that download, not a conflict (SPEC §5 "idempotent for the same URL").
    downloading: Mutex<Option<crate::download::DownloadRequest>>,
    /// The version the running (or last) job is about, named in its reports.
    job_version: Mutex<Option<String>>,
    /// SIGTERM: jobs stop after their current atomic step.
    pub cancel: Arc<AtomicBool>,
    pub reporter: crate::reporter::Reporter,
    pub boot_id: String,
    /// The DDI feedback sender (`[ddi]` set), woken after each push.
    ddi_feedback: Mutex<Option<crate::wakeup::Worker>>,
    /// The DDI poller (`[ddi]` set), woken when a job ends or a trial is confirmed, so that
    /// the server hears of it without waiting for the next poll.
    ddi_poller: Mutex<Option<crate::wakeup::Worker>>,
    /// The fleet server canceled the running DDI download (also set at shutdown, so that a
    /// download passed this one flag stops for either; the job tells them apart by `cancel`).
    pub fleet_cancel: Arc<AtomicBool>,
    /// The fleet server canceled the running DDI install: it rolls back if its swap has not
    /// begun (`Updater::with_abort`). Never set by a shutdown, which only pauses.
    pub fleet_abort: Arc<AtomicBool>,
}

impl Daemon {
    /// Whether a job is running.
    pub fn busy(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// The job has shown its result: another may start.
    pub fn release(&self) {
        *self.downloading.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.running.store(false, Ordering::SeqCst);
    }

    pub fn set_job_version(&self, v: Option<String>) {
        *self.job_version.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = v;
    }

    pub fn job_version(&self) -> Option<String> {
        self.job_version.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The request of the download that holds the slot, if one does.
    pub fn running_download(&self) -> Option<crate::download::DownloadRequest> {
        self.downloading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .filter(|_| self.busy())
    }

    /// Starts a download job (see `start_job`).
    pub fn start_download(self: &Arc<Self>, req: crate::download::DownloadRequest) -> Result<()> {
        let r = req.clone();
        self.start_job_for("download", Some(req), jobs::download_started(), move |d| {
            jobs::download_job(&d, r);
        })
    }

    /// Ends a job: queues its last report (`queue`), then frees the slot and shows `result`,
    /// all under the slot's lock. So the next job's first report is always queued after this
    /// one's, and a caller reacting to this report (or to `/progress`) is never refused as busy.
    pub fn end_job(&self, result: Snapshot, queue: impl FnOnce()) {
        {
            let _slot = self.job.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            queue();
            self.release();
            self.progress.set(result);
        }
        self.notify_ddi_poller();
    }

    /// Starts `work` on a job thread unless one runs (`OPERATION_IN_PROGRESS`). `first` is
    /// shown by `/progress` before this returns, so a poll right after the 200 never sees
    /// the previous operation's result as this one's.
    pub fn start_job(
        self: &Arc<Self>,
        what: &str,
        first: Snapshot,
        work: impl FnOnce(Arc<Daemon>) + Send + 'static,
    ) -> Result<()> {
        self.start_job_for(what, None, first, work)
    }

    fn start_job_for(
        self: &Arc<Self>,
        what: &str,
        download: Option<crate::download::DownloadRequest>,
        first: Snapshot,
        work: impl FnOnce(Arc<Daemon>) + Send + 'static,
    ) -> Result<()> {
        let mut slot = self.job.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.cancel.load(Ordering::SeqCst)
            || self
                .running
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            return Err(Error::new(
                ErrorCode::OperationInProgress,
                format!("Cannot start {what}, another operation is in progress"),
            ));
        }
        *self.downloading.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = download;
        // The previous thread has released the slot and may still be queuing its last report
        // (a quick commit); it is not joined here, on the runtime thread.
        self.progress.set(first);
        let me = self.clone();
        let spawned = std::thread::Builder::new().name(format!("job-{what}")).spawn(move || {
            work(me.clone());
            me.release();
        });
        match spawned {
            Ok(handle) => {
                *slot = Some(handle);
                Ok(())
            }
            Err(e) => {
                self.release();
                Err(Error::internal(format!("cannot start a job thread: {e}")))
            }
        }
    }

    /// An updater over the held state dir, observed and cancellable.
    pub fn updater(self: &Arc<Self>) -> Result<Updater> {
        Ok(Updater::on_held(self.cfg.clone(), &self.held)?
            .with_observer(Arc::new(jobs::InstallObserver { daemon: self.clone() }))
            .with_cancel(self.cancel.clone()))
    }

    /// Wakes the DDI poller: reconcile and poll now (no-op without `[ddi]`).
    pub fn notify_ddi_poller(&self) {
        if let Some(w) =
            self.ddi_poller.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref()
        {
            w.notify();
        }
    }

    /// Wakes the DDI feedback sender after a push (no-op without `[ddi]`).
    pub fn notify_ddi_feedback(&self) {
        if let Some(w) =
            self.ddi_feedback.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref()
        {
            w.notify();
        }
    }

    fn join_job(&self) {
        let handle = self.job.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// Runs the daemon until SIGTERM/SIGINT. Prints `listening on ADDR` once it accepts requests.
pub fn serve(cfg: Config) -> Result<()> {
    // Recovery first: an interrupted transaction is finished or undone before anything else.
    let (mut up, lost) = Updater::open_for_recovery(cfg.clone())?;
    if let Some(l) = &lost {
        tracing::error!(error = %l, "journal lost; recovered from the plan copy");
    }
    let recovered = up.recover(false)?;
    let held =
        up.into_held().ok_or_else(|| Error::internal("recovery did not hold the state dir"))?;
    let boot_id = crate::clock::boot_id().unwrap_or_default();
    let reporter = crate::reporter::Reporter::start(held.journal.clone(), &cfg);
    jobs::clean_consumed_download(&held);
    jobs::clean_stale_download(&held, cfg.download.trust_window_h);
    let initial = jobs::initial_snapshot(&held, &recovered);
    let ddi_client = match &cfg.ddi {
        Some(ddi) => Some(Arc::new(crate::ddi::client::Client::new(
            ddi,
            ddi.auth()?,
            Duration::from_secs(crate::limits::DDI_REQUEST_TIMEOUT_S),
        ))),
        None => None,
    };
    let ddi_feedback =
        ddi_client.as_ref().map(|c| crate::ddi::sender::start(held.journal.clone(), c.clone()));
    let daemon = Arc::new(Daemon {
        progress: Progress::new(Duration::from_secs(cfg.api.result_hold_s), initial),
        cfg,
        held,
        job: Mutex::new(None),
        running: AtomicBool::new(false),
        downloading: Mutex::new(None),
        job_version: Mutex::new(None),
        cancel: Arc::new(AtomicBool::new(false)),
        reporter,
        boot_id,
        ddi_feedback: Mutex::new(ddi_feedback),
        ddi_poller: Mutex::new(None),
        fleet_cancel: Arc::new(AtomicBool::new(false)),
        fleet_abort: Arc::new(AtomicBool::new(false)),
    });
    jobs::report_recovered(&daemon, &recovered);
    jobs::resume_download_if_any(&daemon);
    if let Some(c) = ddi_client {
        tracing::info!(controller = c.controller_url(), "DDI client started");
        *daemon.ddi_poller.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(fleet::start_poller(&daemon, c));
    }

    // One core stays with the HTTP thread, so GET /progress answers within a millisecond
    // while an install hashes and writes (SPEC §7).
    crate::parallel::reserve_cores(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| Error::internal(format!("cannot start the runtime: {e}")))?;
    let d = daemon.clone();
    rt.block_on(async move { api::run(d).await })?;
    stop(&daemon);
    Ok(())
}

/// After the server stopped (SIGTERM): lets the job finish its current step, stops the DDI
/// threads, then leaves.
fn stop(daemon: &Daemon) {
    daemon.cancel.store(true, Ordering::SeqCst);
    daemon.fleet_cancel.store(true, Ordering::SeqCst);
    // The poller holds the daemon: taken out and stopped here, not left to a drop.
    let poller = daemon.ddi_poller.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    if let Some(p) = poller {
        p.stop();
    }
    daemon.join_job();
    let sender =
        daemon.ddi_feedback.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    if let Some(s) = sender {
        s.stop();
    }
    let _ = std::fs::remove_file(addr_file(&daemon.cfg.state_dir));
    tracing::info!("stopped");
}

/// `<state_dir>/api.addr`: the address the running daemon listens on.
pub fn addr_file(state_dir: &std::path::Path) -> std::path::PathBuf {
    state_dir.join("api.addr")
}

/// For callers that want to know whether a recovery changed anything (tests, logs).
pub fn describe_recovered(r: &RecoverReport) -> &'static str {
    match r {
        RecoverReport::Nothing => "nothing in flight",
        RecoverReport::Finished { .. } => "finished an interrupted transaction",
        RecoverReport::NeedsOperator { .. } => "a transaction needs an operator",
        RecoverReport::Trial { .. } => "a trial install awaits confirmation",
        RecoverReport::TrialExpired { .. } => "rolled back an expired trial",
    }
}

pub fn snapshot_for_stage(stage: Stage, progress: u8, message: impl Into<String>) -> Snapshot {
    Snapshot { stage, progress, message: message.into(), error: None }
}
