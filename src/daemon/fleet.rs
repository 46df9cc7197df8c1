//! The DDI client inside `serve` (issue 15): a poller thread asks the fleet server what to do
//! and runs a deployment as a job in the daemon's one job slot (so the legacy API and the
//! server never run two transactions), and every step's feedback goes through the journal's
//! `ddi_feedback` outbox, delivered by `ddi::sender`.
//!
//! The truth comes from the journal, not from memory: each poll first reconciles the actions
//! that are not final with the transactions that carry them (`reconcile`), so an install that
//! a power cut interrupted, a trial that `confirm` accepted or that boot-time recovery rolled
//! back, is reported exactly once, after the fact, whoever ended it.

use super::progress::{Snapshot, Stage};
use super::{Daemon, jobs};
use crate::ddi::client::{Client, ClientError};
use crate::ddi::decide::{self, Allowed, CancelStep, Course, Known, Step};
use crate::ddi::protocol::{ConfigData, DeploymentBase};
use crate::download::{DownloadSpec, ExpectedHash};
use crate::driver::{InstallOptions, Observer, Outcome};
use crate::engine::Phase;
use crate::journal::Journal;
use crate::journal::ddi::{DdiAction, DdiActionState, FeedbackTarget};
use crate::journal::records::TxRecord;
use crate::wakeup::{Wakeup, Worker};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// Starts the poller; it runs until stopped (`serve`'s shutdown).
pub fn start_poller(d: &Arc<Daemon>, client: Arc<Client>) -> Worker {
    let d = d.clone();
    Worker::start("ddi-poller", move |w| poll_loop(&d, &client, w))
}

fn poll_loop(d: &Arc<Daemon>, client: &Arc<Client>, w: &Wakeup) {
    let mut errors = 0u32;
    // In memory: after a restart the first poll sends configData again (cheap, and the
    // server's view is never older than this process).
    let mut config_sent_for: Option<String> = None;
    // The server's last suggested sleep: after errors the backoff never exceeds it.
    let mut server_sleep = None;
    while !w.stopping() {
        if let Err(e) = reconcile(d) {
            tracing::warn!(
                error = %e,
                "DDI: cannot reconcile the server's actions with the journal"
            );
        }
        match client.poll() {
            Ok(poll) => {
                errors = 0;
                server_sleep = poll.sleep().or(server_sleep);
                if let Err(e) = on_poll(d, client, &poll, &mut config_sent_for) {
                    tracing::warn!(error = %e, "DDI: cannot act on the poll");
                }
            }
            Err(e) => {
                errors = errors.saturating_add(1);
                tracing::warn!(errors, error = %e, "DDI: poll failed");
            }
        }
        let wait = decide::next_poll(server_sleep, errors, jitter());
        tracing::debug!(wait_ms = wait.as_millis() as u64, "DDI: next poll");
        if w.sleep(wait, true) {
            return;
        }
    }
}

/// A value in [-1, 1] that differs between devices and polls (not a secret; only spreads a
/// fleet's polls): the low bits of the clock mixed with the process id.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let h = blake3::hash(&[nanos.to_le_bytes(), std::process::id().to_le_bytes()].concat());
    let v = u32::from_le_bytes(h.as_bytes()[..4].try_into().unwrap_or([0; 4]));
    (f64::from(v) / f64::from(u32::MAX)) * 2.0 - 1.0
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The version installed now, as configData names it (`factory` before any install).
fn installed_version(journal: &Journal) -> crate::error::Result<String> {
    let id = journal.current_generation_id()?;
    Ok(journal
        .generations()?
        .into_iter()
        .find(|g| Some(g.id) == id)
        .map_or_else(|| "factory".into(), |g| g.version))
}

fn known(journal: &Journal, config_sent_for: Option<&str>) -> crate::error::Result<Known> {
    let actions = journal.ddi_actions()?;
    Ok(Known {
        finished_actions: actions
            .iter()
            .filter(|a| a.state.is_final())
            .map(|a| a.id.clone())
            .collect(),
        current: actions.iter().find(|a| !a.state.is_final()).map(|a| a.id.clone()),
        config_sent_for: config_sent_for.map(str::to_string),
        installed_version: installed_version(journal)?,
    })
}

fn on_poll(
    d: &Arc<Daemon>,
    client: &Arc<Client>,
    poll: &crate::ddi::protocol::ControllerBase,
    config_sent_for: &mut Option<String>,
) -> crate::error::Result<()> {
    let journal = &d.held.journal;
    let known = known(journal, config_sent_for.as_deref())?;
    for step in decide::on_poll(poll, &known) {
        match step {
            Step::PutConfigData => {
                match client.put_config(&config_data(d, &known.installed_version)) {
                    Ok(()) => *config_sent_for = Some(known.installed_version.clone()),
                    Err(e) => tracing::warn!(error = %e, "DDI: configData not accepted"),
                }
            }
            Step::FetchCancel { action } => on_cancel(d, client, &action)?,
            Step::AlreadyFinished { action } => {
                tracing::debug!(action, "DDI: the server still lists a finished action");
            }
            Step::FetchDeployment { action } => on_deployment(d, client, &action)?,
        }
    }
    Ok(())
}

/// What the server learns about the device: its model, the version installed now, the engine.
fn config_data(d: &Daemon, installed: &str) -> ConfigData {
    // `sw_version` and `hw_boardname` are the keys SWUpdate's suricatta sends and gooseBit
    // reads (its installed version, and the hardware an assignment must be compatible with).
    let mut data = std::collections::BTreeMap::new();
    data.insert("sw_version".to_string(), installed.to_string());
    data.insert("engine".to_string(), format!("tope-updater {}", env!("CARGO_PKG_VERSION")));
    if let Some(c) = &d.cfg.compatible {
        data.insert("compatible".to_string(), c.clone());
        data.insert("hw_boardname".to_string(), c.clone());
    }
    ConfigData { mode: "replace", data }
}

/// Records `action` in state `state` with the feedback of `course`, in one durable commit,
/// and wakes the sender. `false` when the action was already final (nothing written).
fn record(
    d: &Daemon,
    action: &DdiAction,
    state: DdiActionState,
    course: &Course,
    target: FeedbackTarget,
) -> bool {
    let mut a = action.clone();
    a.state = state;
    a.updated_unix_ms = now_ms();
    let f = decide::feedback(course, a.updated_unix_ms);
    let body = match serde_json::to_vec(&f) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "DDI: cannot encode a feedback");
            return false;
        }
    };
    match d.held.journal.ddi_record(&a, Some((target, decide::is_progress(&f), body))) {
        Ok(written) => {
            if written {
                d.notify_ddi_feedback();
                tracing::info!(action = a.id, state = ?state, "DDI: action recorded");
            }
            written
        }
        Err(e) => {
            tracing::warn!(action = a.id, error = %e, "DDI: cannot record the action");
            false
        }
    }
}

fn new_action(id: &str, version: &str, artifact: &str) -> DdiAction {
    let now = now_ms();
    DdiAction {
        id: id.into(),
        version: version.into(),
        artifact: artifact.into(),
        state: DdiActionState::Downloading,
        tx: None,
        created_unix_ms: now,
        updated_unix_ms: now,
    }
}

fn on_deployment(d: &Arc<Daemon>, client: &Arc<Client>, action: &str) -> crate::error::Result<()> {
    if d.busy() {
        // The slot is taken (a legacy job, or this action's own job): the next poll asks again.
        tracing::debug!(action, "DDI: a job is running; the deployment waits for the next poll");
        return Ok(());
    }
    let existing = d.held.journal.ddi_action(action)?;
    if existing.as_ref().is_some_and(|a| {
        matches!(a.state, DdiActionState::Installing | DdiActionState::AwaitingConfirm)
    }) {
        // Its transaction carries it now; `reconcile` reports how it ends.
        return Ok(());
    }
    let deployment = match client.deployment(action) {
        Ok(dep) => dep,
        Err(ClientError::Transient(e)) => {
            tracing::warn!(action, error = e, "DDI: deploymentBase not fetched; next poll");
            return Ok(());
        }
        Err(ClientError::Withdrawn(e)) => {
            tracing::info!(
                action,
                error = e,
                "DDI: the deployment was withdrawn after the poll offered it; next poll"
            );
            return Ok(());
        }
        Err(ClientError::Refused(why)) => {
            reject(d, &existing.unwrap_or_else(|| new_action(action, "", "")), why);
            return Ok(());
        }
    };
    let (version, artifact_name) = match deployment.artifacts().next() {
        Some((chunk, a)) => (chunk.version.clone(), a.filename.clone()),
        None => (String::new(), String::new()),
    };
    let a = existing.unwrap_or_else(|| new_action(action, &version, &artifact_name));
    match decide::allowed(&deployment) {
        Allowed::Wait => tracing::info!(action, "DDI: download: skip; waiting"),
        Allowed::Reject(reason) => reject(d, &a, reason),
        Allowed::DownloadOnly if a.state == DdiActionState::Downloaded => {
            tracing::debug!(
                action,
                "DDI: downloaded; waiting for the update permission or the maintenance window"
            );
        }
        allowed => start_deployment(d, client, a, &deployment, allowed == Allowed::Install),
    }
    Ok(())
}

/// Records the action rejected for `reason`, with its feedback to the deployment.
fn reject(d: &Daemon, a: &DdiAction, reason: String) {
    let course = Course::Rejected { reason };
    record(d, a, DdiActionState::Rejected, &course, FeedbackTarget::Deployment);
}

/// Checks the deployment's artifacts (rejecting the action whole if any is refused), then
/// starts the job that downloads and, when `install`, installs them.
fn start_deployment(
    d: &Arc<Daemon>,
    client: &Arc<Client>,
    a: DdiAction,
    deployment: &DeploymentBase,
    install: bool,
) {
    let specs = match specs_of(deployment) {
        Ok(s) => s,
        Err(reason) => return reject(d, &a, reason),
    };
    if let Some(e) = specs
        .iter()
        .find_map(|spec| crate::download::validate_spec(spec, &download_config(d)).err())
    {
        let reason = format!("action {}: {e}", a.id);
        return reject(d, &a, reason);
    }
    d.fleet_cancel.store(false, Ordering::SeqCst);
    d.fleet_abort.store(false, Ordering::SeqCst);
    let client = client.clone();
    let action = a.id.clone();
    let started = d.start_job("ddi", jobs::download_started(), move |d| {
        deployment_job(&d, &client, a, specs, install);
    });
    if let Err(e) = started {
        tracing::debug!(action, error = %e, "DDI: the job slot was taken meanwhile; next poll");
    }
}

/// The download rules for the server's artifacts: `[download]`'s, except that `[ddi]
/// allow_http` decides whether an artifact link may be plain http (the server chose it).
fn download_config(d: &Daemon) -> crate::config::Config {
    let mut cfg = d.cfg.clone();
    cfg.download.allow_http = d.cfg.ddi.as_ref().is_some_and(|x| x.allow_http);
    cfg
}

/// The downloads of the deployment's artifacts, each checked with the strongest hash it
/// gives, in the order they are tried: the smaller first (of two, the delta package).
fn specs_of(d: &DeploymentBase) -> Result<Vec<DownloadSpec>, String> {
    let mut specs = Vec::new();
    for (chunk, a) in d.artifacts() {
        let url = a.download_url().ok_or_else(|| {
            format!("action {}: artifact {:?} has no download link", d.id, a.filename)
        })?;
        let size = a
            .size
            .filter(|s| *s > 0)
            .ok_or_else(|| format!("action {}: artifact {:?} has no size", d.id, a.filename))?;
        let expected = match a.hashes.strongest() {
            Some(crate::ddi::protocol::ArtifactHash::Sha256(h)) => ExpectedHash::sha256(&h),
            Some(crate::ddi::protocol::ArtifactHash::Sha1(h)) => ExpectedHash::sha1(&h),
            Some(crate::ddi::protocol::ArtifactHash::Md5(h)) => ExpectedHash::md5(&h),
            None => {
                return Err(format!(
                    "action {}: artifact {:?} has no usable hash",
                    d.id, a.filename
                ));
            }
        }
        .map_err(|e| format!("action {}: {e}", d.id))?;
        specs.push(DownloadSpec::new(
            chunk.version.clone(),
            url,
            a.filename.clone(),
            size,
            expected,
        ));
    }
    if specs.windows(2).any(|w| w[0].version != w[1].version) {
        return Err(format!("action {}: its artifacts name different versions", d.id));
    }
    specs.sort_by_key(|s| s.package_size);
    Ok(specs)
}

/// Whether a downloaded package is a delta package, and its version: its manifest only, as
/// a routing hint (the install validates the whole package, signature included).
fn package_kind(path: &std::path::Path) -> Result<decide::PackageKind, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut zip = zip::ZipArchive::new(f)
        .map_err(|e| format!("{}: not a ZIP package: {e}", path.display()))?;
    let entry = zip
        .by_name("manifest.json")
        .map_err(|e| format!("{}: manifest.json: {e}", path.display()))?;
    let mut text = Vec::new();
    entry
        .take(crate::limits::MANIFEST_BYTES_MAX)
        .read_to_end(&mut text)
        .map_err(|e| format!("{}: manifest.json: {e}", path.display()))?;
    let v: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| format!("{}: manifest.json: {e}", path.display()))?;
    Ok(decide::PackageKind {
        delta: v.get("delta").is_some(),
        version: v["version"].as_str().unwrap_or_default().to_string(),
    })
}

/// Downloads (or resumes) the artifact, then installs it as one transaction when allowed. Of
/// a delta package and its full twin, the delta is fetched and installed first; the full one
/// only when the device lacks the delta's base (`DELTA_BASE_MISSING`, refused before anything
/// was touched), and that is not reported as a failure.
fn deployment_job(
    d: &Arc<Daemon>,
    client: &Client,
    action: DdiAction,
    specs: Vec<DownloadSpec>,
    install: bool,
) {
    let pair = specs.len() == 2;
    for (i, spec) in specs.iter().enumerate() {
        d.set_job_version(Some(spec.version.clone()));
        let Some(path) = download_for(d, client, &action, spec) else { return };
        if pair
            && let Err(why) =
                package_kind(&path).and_then(|k| decide::pair_check(i, &k, &spec.version))
        {
            let reason = format!("action {}: {why}", action.id);
            record(
                d,
                &action,
                DdiActionState::Rejected,
                &Course::Rejected { reason: reason.clone() },
                FeedbackTarget::Deployment,
            );
            jobs::publish_end(
                d,
                jobs::failed(
                    &crate::error::Error::new(crate::error::ErrorCode::ValidationError, reason),
                    0,
                ),
            );
            return;
        }
        if !install {
            record(
                d,
                &action,
                DdiActionState::Downloaded,
                &Course::Downloaded,
                FeedbackTarget::Deployment,
            );
            let message = format!(
                "Fleet action {}: downloaded; installing when the server allows",
                action.id
            );
            jobs::publish_end(
                d,
                Snapshot { stage: Stage::Idle, progress: 100, message, error: None },
            );
            return;
        }
        let fallback = pair && i == 0;
        if install_for(d, action.clone(), path, spec.version.clone(), fallback) {
            return;
        }
        tracing::info!(
            action = action.id,
            "DDI: the device lacks the delta's base; fetching the full package"
        );
    }
}

/// Downloads `spec` with progress feedback; the file's path, or `None` when the job ended
/// (failed, canceled, or paused for shutdown; already recorded and shown).
fn download_for(
    d: &Arc<Daemon>,
    client: &Client,
    action: &DdiAction,
    spec: &DownloadSpec,
) -> Option<std::path::PathBuf> {
    let id = action.id.clone();
    record(
        d,
        action,
        DdiActionState::Downloading,
        &Course::Downloading { done: 0, total: spec.package_size },
        FeedbackTarget::Deployment,
    );
    let reported = AtomicU32::new(0);
    let progress = |done: u64, total: u64| download_progress(d, action, &reported, done, total);
    let fetched = crate::download::fetch_authorized(
        &d.held.journal,
        &download_config(d),
        spec,
        client.auth_for(&spec.package_url),
        &progress,
        &d.fleet_cancel,
    );
    match fetched {
        Ok(rec) => Some(std::path::PathBuf::from(rec.path)),
        Err(_) if d.cancel.load(Ordering::SeqCst) => {
            tracing::info!(
                action = id,
                "DDI: download paused for shutdown; the server's next offer resumes it"
            );
            None
        }
        Err(_) if d.fleet_cancel.load(Ordering::SeqCst) => {
            record(d, action, DdiActionState::Canceled, &Course::Canceled, FeedbackTarget::Cancel);
            jobs::publish_end(
                d,
                Snapshot {
                    stage: Stage::Idle,
                    progress: 0,
                    message: format!("Fleet action {id} canceled"),
                    error: None,
                },
            );
            None
        }
        Err(e) => {
            record(d, action, DdiActionState::Failed, &failed(&e), FeedbackTarget::Deployment);
            jobs::publish_end(d, jobs::failed_job(&e, 0, super::progress::Job::Download));
            None
        }
    }
}

/// Shows the download's progress, and sends it to the server every 10 %: a server keeps a
/// bounded number of status entries per action.
fn download_progress(d: &Daemon, action: &DdiAction, reported: &AtomicU32, done: u64, total: u64) {
    let pct = (done.min(total) * 100).checked_div(total).unwrap_or(0) as u32;
    d.progress.set(Snapshot {
        stage: Stage::Downloading,
        progress: pct as u8,
        message: format!(
            "Downloading package... {:.1} MB / {:.1} MB",
            done as f64 / 1e6,
            total as f64 / 1e6
        ),
        error: None,
    });
    let step = pct / 10 * 10;
    if step > reported.load(Ordering::Relaxed) {
        reported.store(step, Ordering::Relaxed);
        let course = Course::Downloading { done, total };
        record(d, action, DdiActionState::Downloading, &course, FeedbackTarget::Deployment);
    }
}

/// The failure feedback for an error: its stable code and its message.
fn failed(e: &crate::error::Error) -> Course {
    Course::Failed { code: e.code.as_str().into(), message: e.message.clone() }
}

/// Installs the package as one transaction and records how it ended. `false` only when
/// `fallback` is set and the engine refused the package for a missing delta base (nothing
/// recorded or shown: the caller goes on with the full package).
fn install_for(
    d: &Arc<Daemon>,
    action: DdiAction,
    package: std::path::PathBuf,
    version: String,
    fallback: bool,
) -> bool {
    // The transaction's id, known before it begins (only this job slot starts transactions):
    // a power cut from here on leaves an action that `reconcile` can match to its record.
    let tx = match d.held.journal.next_tx_id() {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "DDI: cannot read the next transaction id");
            jobs::publish_end(d, jobs::failed(&e, 0));
            return true;
        }
    };
    let mut action = action;
    action.tx = Some(tx);
    record(
        d,
        &action,
        DdiActionState::Installing,
        &Course::Phase { index: 0, count: PHASES, what: "starting".into() },
        FeedbackTarget::Deployment,
    );
    let observer = Arc::new(FleetObserver {
        inner: jobs::InstallObserver { daemon: d.clone() },
        daemon: d.clone(),
        action: action.clone(),
    });
    let result = d
        .updater()
        .map(|up| up.with_observer(observer).with_abort(d.fleet_abort.clone()))
        .and_then(|mut up| {
            up.install(
                &package,
                &InstallOptions { version: Some(version.clone()), ..Default::default() },
            )
        });
    match result {
        Ok(r) => {
            record_outcome(d, &action, &package, &r.outcome);
            jobs::ended(d, &r);
        }
        Err(e) if fallback && e.code == crate::error::ErrorCode::DeltaBaseMissing => {
            tracing::info!(
                action = action.id,
                error = %e,
                "DDI: delta package refused before anything was touched"
            );
            let _ = std::fs::remove_file(&package);
            return false;
        }
        Err(e) => {
            // Refused before the transaction began: nothing was touched.
            record(d, &action, DdiActionState::Failed, &failed(&e), FeedbackTarget::Deployment);
            jobs::publish_end(d, jobs::failed(&e, 0));
        }
    }
    true
}

/// Records how the action's transaction ended (an interrupted one is reported by `reconcile`
/// after the next start finishes it), and refuses a cancel that came after the swap began.
fn record_outcome(d: &Arc<Daemon>, action: &DdiAction, package: &std::path::Path, o: &Outcome) {
    let canceled = matches!(o, Outcome::RolledBack { error, .. }
        if error.code == crate::error::ErrorCode::Canceled);
    match o {
        Outcome::Committed => {
            if let Err(e) = d.held.journal.clear_download() {
                tracing::warn!(error = %e, "could not clear the download record");
            }
            let _ = std::fs::remove_file(package);
            conclude_committed(d, action);
        }
        Outcome::RolledBack { .. } if canceled => {
            record(d, action, DdiActionState::Canceled, &Course::Canceled, FeedbackTarget::Cancel);
        }
        Outcome::RolledBack { error, .. } | Outcome::RollbackFailed { error } => {
            record(d, action, DdiActionState::Failed, &failed(error), FeedbackTarget::Deployment);
        }
        Outcome::Interrupted { .. } => {}
    }
    if d.fleet_abort.load(Ordering::SeqCst) && !canceled {
        // The cancel came when the swap had begun: refused, the update stands as it ended.
        refuse_cancel(d, &action.id, decide::SWAP_BEGUN);
    }
}

/// The phases of an install as `proceeding` progress counts them (Planned .. Committed).
const PHASES: u32 = 9;

/// A committed install: final now, or a trial waiting for `confirm` (issue 15: success only
/// once the device has booted and confirmed the new version).
fn conclude_committed(d: &Daemon, action: &DdiAction) {
    let trial = d.held.journal.trial().ok().flatten();
    if trial.is_some_and(|t| Some(t.tx) == action.tx) {
        record(
            d,
            action,
            DdiActionState::AwaitingConfirm,
            &Course::AwaitingConfirm,
            FeedbackTarget::Deployment,
        );
    } else {
        record(
            d,
            action,
            DdiActionState::Succeeded,
            &Course::Succeeded { version: action.version.clone() },
            FeedbackTarget::Deployment,
        );
    }
}

/// The legacy progress plus a `proceeding` feedback per phase.
struct FleetObserver {
    inner: jobs::InstallObserver,
    daemon: Arc<Daemon>,
    action: DdiAction,
}

impl Observer for FleetObserver {
    fn phase(&self, tx: u64, phase: Phase) {
        self.inner.phase(tx, phase);
        if (phase as u32) < PHASES {
            let course =
                Course::Phase { index: phase as u32 + 1, count: PHASES, what: phase.to_string() };
            record(
                &self.daemon,
                &self.action,
                DdiActionState::Installing,
                &course,
                FeedbackTarget::Deployment,
            );
        }
    }

    fn staged(&self, module: &str, index: usize, modules: usize, done: u64, total: u64) {
        self.inner.staged(module, index, modules, done, total);
    }
}

/// Brings the actions that are not final in line with the journal's transactions: how an
/// install ended is known only there when the process that ran it died, and a trial's end
/// (confirmed, or rolled back at boot) comes long after the install job.
pub fn reconcile(d: &Daemon) -> crate::error::Result<()> {
    if d.busy() {
        // A running job records its own action's course.
        return Ok(());
    }
    let journal = &d.held.journal;
    let in_flight = journal.active()?.map(|(rec, _)| rec.id);
    // Only an install carries an action here: a download is driven again by the server's
    // next offer (and resumes from its journaled offset).
    let installs = journal.ddi_actions()?.into_iter().filter(|a| {
        matches!(a.state, DdiActionState::Installing | DdiActionState::AwaitingConfirm)
    });
    for a in installs {
        let Some(tx) = a.tx else { continue };
        if in_flight == Some(tx) {
            continue;
        }
        let is_trial = journal.trial()?.is_some_and(|t| t.tx == tx);
        // The id was taken before the transaction began: a record of another version under
        // it is a later transaction (the legacy API's), not this action's.
        let rec = journal.tx(tx)?.filter(|r| r.to_version.as_deref() == Some(a.version.as_str()));
        reconcile_one(d, a, rec, is_trial)?;
    }
    Ok(())
}

/// Records what the journal says of one install action's transaction `rec`, if it says more
/// than the action's state.
fn reconcile_one(
    d: &Daemon,
    a: DdiAction,
    rec: Option<TxRecord>,
    is_trial: bool,
) -> crate::error::Result<()> {
    let deployment = FeedbackTarget::Deployment;
    let Some(rec) = rec else {
        // Stopped before its transaction began: nothing was touched, and the verified
        // download is kept. Back to downloaded; the server's next offer installs it.
        let mut back = a;
        back.tx = None;
        record(d, &back, DdiActionState::Downloaded, &Course::Downloaded, deployment);
        return Ok(());
    };
    let awaiting = a.state == DdiActionState::AwaitingConfirm;
    let canceled = rec.error.as_ref().is_some_and(|e| e.code == crate::error::ErrorCode::Canceled);
    match rec.phase {
        Phase::Confirmed => {
            let course = Course::Succeeded { version: a.version.clone() };
            record(d, &a, DdiActionState::Succeeded, &course, deployment);
        }
        // Still a trial: its final feedback waits for `confirm` or its rollback.
        Phase::Committed if is_trial && !awaiting => {
            record(d, &a, DdiActionState::AwaitingConfirm, &Course::AwaitingConfirm, deployment);
        }
        Phase::Committed if is_trial => {}
        Phase::Committed if awaiting => {
            // The trial ended without `confirm`: a later transaction rolled it back.
            let (code, message) = rolled_back_by(&d.held.journal, rec.id)?;
            record(d, &a, DdiActionState::Failed, &Course::Failed { code, message }, deployment);
        }
        Phase::Committed => conclude_committed(d, &a),
        Phase::RolledBack if canceled => {
            record(d, &a, DdiActionState::Canceled, &Course::Canceled, FeedbackTarget::Cancel);
        }
        Phase::RolledBack | Phase::RollbackFailed => {
            let (code, message) = rec.error.map_or_else(
                || ("ROLLED_BACK".into(), "the install was rolled back".into()),
                |e| (e.code.as_str().to_string(), e.message),
            );
            record(d, &a, DdiActionState::Failed, &Course::Failed { code, message }, deployment);
        }
        _ => {}
    }
    Ok(())
}

/// Why a committed trial install is no longer current: the error of the first later
/// transaction (the rollback of an expired trial, or an operator's rollback).
fn rolled_back_by(journal: &Journal, tx: u64) -> crate::error::Result<(String, String)> {
    let later = journal.history(usize::MAX)?.into_iter().filter(|r| r.id > tx).min_by_key(|r| r.id);
    Ok(match later {
        Some(r) => match r.error {
            Some(e) => (
                e.code.as_str().to_string(),
                format!("rolled back by transaction {}: {}", r.id, e.message),
            ),
            None => (
                "ROLLED_BACK".into(),
                format!("rolled back by transaction {} before it was confirmed", r.id),
            ),
        },
        None => ("ROLLED_BACK".into(), "the trial ended without confirmation".into()),
    })
}

/// A cancel request: accepted while nothing has been swapped (downloading, downloaded, or an
/// action never started), rejected with the reason once its transaction has begun.
fn on_cancel(d: &Arc<Daemon>, client: &Client, cancel_id: &str) -> crate::error::Result<()> {
    let stop_id = match client.cancel(cancel_id) {
        Ok(c) => c.cancel_action.stop_id,
        Err(e) => {
            tracing::warn!(cancel_id, error = %e, "DDI: cancelAction not fetched");
            return Ok(());
        }
    };
    let journal = &d.held.journal;
    let a = journal.ddi_action(&stop_id)?;
    match decide::on_cancel(a.as_ref().map(|a| a.state), d.busy(), swap_begun(journal)?) {
        CancelStep::Nothing => {
            tracing::debug!(stop_id, "DDI: canceled already; its confirmation stands");
        }
        CancelStep::CancelNow => {
            let a = a.unwrap_or_else(|| new_action(&stop_id, "", ""));
            record(d, &a, DdiActionState::Canceled, &Course::Canceled, FeedbackTarget::Cancel);
        }
        // The running download stops at its next chunk; its job confirms the cancel.
        CancelStep::StopDownload => d.fleet_cancel.store(true, Ordering::SeqCst),
        CancelStep::AbortInstall => d.fleet_abort.store(true, Ordering::SeqCst),
        CancelStep::Refuse(reason) => refuse_cancel(d, cancel_id, reason),
    }
    Ok(())
}

/// Whether the transaction in flight has begun (or passed) its swap.
fn swap_begun(journal: &Journal) -> crate::error::Result<bool> {
    Ok(journal.active()?.is_some_and(|(rec, _)| rec.phases.contains(&Phase::Swapped)))
}

/// Refuses a cancel with the reason (`rejected` on the cancelAction).
fn refuse_cancel(d: &Daemon, cancel_id: &str, reason: &str) {
    let f = crate::ddi::protocol::Feedback::new(
        crate::ddi::protocol::Execution::Rejected,
        crate::ddi::protocol::Finished::Failure,
        None,
        vec![reason.to_string()],
        Some(now_ms()),
    );
    let pushed =
        serde_json::to_vec(&f).map_err(|e| crate::error::Error::internal(e.to_string())).and_then(
            |body| d.held.journal.ddi_push_feedback(cancel_id, FeedbackTarget::Cancel, false, body),
        );
    match pushed {
        Ok(_) => d.notify_ddi_feedback(),
        Err(e) => tracing::warn!(cancel_id, error = %e, "DDI: cannot queue the cancel refusal"),
    }
}
