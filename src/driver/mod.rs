//! The driver: the one place where a transition is journaled and then performed.
//!
//! Write-ahead rule (STYLE rule 1): for every phase, `transaction::commit_phase` commits the
//! phase durably *before* `run::perform` starts its effects, and a phase's effects are made
//! durable (batched `syncfs`) before the next phase is entered. Recovery therefore knows, from
//! the journaled phase alone, which effects are complete and which may be partial.
//!
//! - `mod.rs`: opening the state dir (lock, journal, plan-copy reconciliation), shared types;
//! - `planning.rs`: package or generation → `Plan`, with every check before the journal;
//! - `transaction.rs`: the running transaction as a value, and the one place a phase change
//!   is committed (install, resume, rollback, give-up, confirm and trial expiry all go there);
//! - `run.rs`: the phase loop, each phase's effects, commit effects, rollback;
//! - `effects.rs`: the idempotent per-file effects (stage, swap, undo);
//! - `recovery.rs`: `recover`;
//! - `reports.rs`: `status` and `verify` (read-only).

use crate::config::Config;
use crate::engine::generation::{self, Generation};
use crate::engine::phase::Shape;
use crate::engine::{Phase, Plan, TxKind};
use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;
use crate::journal::Journal;
use crate::journal::records::TxRecord;
use crate::paths::AllowedRoots;
use crate::plancopy;
use crate::store::{BackupStore, GcStats};
use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

mod effects;
mod gc;
mod planning;
mod recovery;
pub mod reports;
mod run;
mod transaction;
mod trial;

pub use crate::clock::{boot_id, now_unix_ms};
pub use planning::check_rollback_target;
pub use reports::{GenerationSummary, InFlight, StatusReport, VerifyReport, status, verify_live};
pub use trial::ConfirmReport;

#[derive(Debug, Clone, Default)]
pub struct InstallOptions {
    /// The version the caller expects the package to be.
    pub version: Option<String>,
    pub allow_downgrade: bool,
    /// Install a package even though an earlier install of the same bytes was rolled back.
    pub force: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollbackTo {
    Previous,
    Factory,
    Version(String),
}

/// How a transaction ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Committed,
    /// Undone; `touched` says whether any target had been swapped before the rollback.
    RolledBack {
        error: Error,
        touched: bool,
    },
    /// Could not be undone: an operator is needed.
    RollbackFailed {
        error: Error,
    },
    /// Stopped part-way because the journal itself could not be written (a full disk, a
    /// failing device): the transaction stays in flight and `recover` finishes it.
    Interrupted {
        error: Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TxReport {
    pub tx: u64,
    pub kind: TxAction,
    pub from_version: Option<String>,
    pub to_version: Option<String>,
    pub targets: u32,
    pub commits: u32,
    #[serde(flatten)]
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum RecoverReport {
    /// No transaction in flight.
    Nothing,
    /// A transaction was finished (forward or back).
    Finished { report: TxReport, journal_lost: Option<Error> },
    /// A transaction waits for an operator (`recover --retry` after fixing the cause).
    NeedsOperator { tx: u64, error: Option<Error> },
    /// Nothing in flight; a trial install awaits confirmation (this boot counted).
    Trial { tx: u64, version: String, boots: u32, max_boots: u32 },
    /// A trial install ran `boots` boots unconfirmed and was rolled back.
    TrialExpired { version: String, boots: u32, report: TxReport },
}

/// Exclusive lock on `<state_dir>/lock`: one transaction at a time, across processes.
pub fn lock_state_dir(state_dir: &Path) -> Result<Flock<File>> {
    std::fs::create_dir_all(state_dir)
        .map_err(|e| Error::io(ErrorCode::InternalError, "create state dir", state_dir, &e))?;
    let path = state_dir.join("lock");
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(ErrorCode::InternalError, "open", &path, &e))?;
    Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| match errno {
        nix::errno::Errno::EWOULDBLOCK => Error::new(
            ErrorCode::OperationInProgress,
            "another tope-updater transaction is running",
        ),
        other => Error::io(ErrorCode::InternalError, "flock", &path, &other.into()),
    })
}

pub(super) use crate::clock::now_unix_ms as now_ms;

pub(super) fn shape(plan: &Plan) -> Shape {
    Shape { controls_services: plan.controls_services, runs_post_cmds: plan.runs_post_cmds }
}

/// What a transaction does, without its details: how reports, `status`, `history` and the
/// logs name it ("install", "rollback").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TxAction {
    Install,
    Rollback,
}

impl TxAction {
    pub fn of(kind: &TxKind) -> TxAction {
        match kind {
            TxKind::Install { .. } => TxAction::Install,
            TxKind::Rollback { .. } => TxAction::Rollback,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TxAction::Install => "install",
            TxAction::Rollback => "rollback",
        }
    }
}

impl std::fmt::Display for TxAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a long-running caller (the daemon) learns while a transaction runs. Called from the
/// transaction's threads: implementations must be quick and must not block on I/O.
pub trait Observer: Send + Sync {
    /// A phase was journaled and its effects begin.
    fn phase(&self, tx: u64, phase: Phase);
    /// Staging progress: `done` of `total` new bytes written; `module` is the module of the
    /// file just written, numbered from 1 of `modules`.
    fn staged(&self, module: &str, index: usize, modules: usize, done: u64, total: u64);
}

pub struct Updater {
    cfg: Config,
    roots: AllowedRoots,
    state_dir: PathBuf,
    journal: Arc<Journal>,
    store: BackupStore,
    services: crate::services::Services,
    observer: Option<Arc<dyn Observer>>,
    /// Set by the daemon's SIGTERM: the transaction stops after journaling its current phase
    /// (it stays in flight; the next start resumes it).
    cancel: Option<Arc<AtomicBool>>,
    /// Set by the DDI client when the fleet server cancels the update: checked once, when the
    /// transaction would begin its swap; then it rolls back (`CANCELED`) instead. Later it
    /// is too late: the update finishes or rolls back as one transaction.
    abort: Option<Arc<AtomicBool>>,
    /// `None` when the caller holds the state-dir lock itself (the daemon, for its lifetime).
    lock: Option<Flock<File>>,
}

/// The state dir held open by a long-running process: the lock and the one journal handle
/// (redb allows one open per file and process).
pub struct Held {
    pub lock: Flock<File>,
    pub journal: Arc<Journal>,
}

impl Updater {
    /// Takes the lock and opens the journal. A damaged journal is `JOURNAL_CORRUPT`: only
    /// `recover` (see `open_for_recovery`) replaces it.
    pub fn open(cfg: Config) -> Result<Updater> {
        let lock = lock_state_dir(&cfg.state_dir)?;
        // A plan copy without a journal means the journal was lost mid-transaction: creating a
        // fresh journal here would make the copy look stale and delete the only record of
        // what to undo. Only `recover` may handle that.
        if !Journal::path_in(&cfg.state_dir).exists() && plancopy::path_in(&cfg.state_dir).exists()
        {
            return Err(Error::new(
                ErrorCode::JournalCorrupt,
                "the journal is missing but a transaction was in flight; run \
                `tope-updater recover`",
            ));
        }
        let journal = Journal::open(&cfg.state_dir)?;
        Updater::assemble(cfg, journal, lock)
    }

    /// Like `open`, but a damaged or missing journal does not stop recovery: the damaged
    /// file is moved aside, a fresh journal is started, and the transaction described by
    /// the redundant plan copy is put back in flight as a rollback. Returns the
    /// `JOURNAL_CORRUPT` error that was survived, if any.
    pub fn open_for_recovery(cfg: Config) -> Result<(Updater, Option<Error>)> {
        let lock = lock_state_dir(&cfg.state_dir)?;
        let path = Journal::path_in(&cfg.state_dir);
        let copy_exists = plancopy::path_in(&cfg.state_dir).exists();
        let lost = if !path.exists() && copy_exists {
            Error::new(
                ErrorCode::JournalCorrupt,
                format!("{} is missing but a transaction was in flight", path.display()),
            )
        } else {
            match Journal::open(&cfg.state_dir) {
                Ok(journal) => return Ok((Updater::assemble(cfg, journal, lock)?, None)),
                Err(e) if e.code == ErrorCode::JournalCorrupt => e,
                Err(e) => return Err(e),
            }
        };
        // Read the plan copy before touching anything: if it is unusable too, everything stays
        // as it is (every later command keeps saying so) until an operator steps in.
        let plan = plancopy::read(&cfg.state_dir).map_err(|copy_err| {
            Error::new(
                ErrorCode::RollbackFailed,
                format!(
                    "journal lost ({}) and the plan copy is unusable ({}): an operator must check \
                    the target files",
                    lost.message, copy_err.message
                ),
            )
        })?;
        if path.exists() {
            let aside = cfg.state_dir.join(format!("journal.redb.corrupt-{}", now_ms()));
            tracing::error!(error = %lost, moved_to = %aside.display(), "journal unreadable; \
                starting a fresh one");
            std::fs::rename(&path, &aside)
                .map_err(|io| Error::io(ErrorCode::JournalCorrupt, "move aside", &path, &io))?;
            fsutil::fsync_dir(&cfg.state_dir)?;
        }
        let journal = Journal::open(&cfg.state_dir)?;
        if let Some(plan) = plan {
            let mut tx = transaction::Transaction::imported(plan, &lost);
            journal.import_in_flight(&mut tx.rec, &tx.plan)?;
        }
        Ok((Updater::assemble(cfg, journal, lock)?, Some(lost)))
    }

    fn assemble(cfg: Config, journal: Journal, lock: Flock<File>) -> Result<Updater> {
        let up = Updater::build(cfg, Arc::new(journal), Some(lock))?;
        up.reconcile_plan_copy()?;
        Ok(up)
    }

    fn build(cfg: Config, journal: Arc<Journal>, lock: Option<Flock<File>>) -> Result<Updater> {
        let store = BackupStore::open(&cfg.state_dir)?;
        Ok(Updater {
            roots: AllowedRoots::new(&cfg.allowed_roots),
            state_dir: cfg.state_dir.clone(),
            services: crate::services::Services::new(&cfg),
            cfg,
            journal,
            store,
            observer: None,
            cancel: None,
            abort: None,
            lock,
        })
    }

    /// An updater over a state dir that `held` keeps open (the daemon: one per operation).
    pub fn on_held(cfg: Config, held: &Held) -> Result<Updater> {
        Updater::build(cfg, held.journal.clone(), None)
    }

    /// Keeps the lock and the journal for the process's lifetime (the daemon after recovery).
    pub fn into_held(self) -> Option<Held> {
        let journal = self.journal;
        self.lock.map(|lock| Held { lock, journal })
    }

    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Updater {
        self.observer = Some(observer);
        self
    }

    pub fn with_cancel(mut self, cancel: Arc<AtomicBool>) -> Updater {
        self.cancel = Some(cancel);
        self
    }

    /// See `abort`: a cancel that rolls the transaction back if it comes before the swap.
    pub fn with_abort(mut self, abort: Arc<AtomicBool>) -> Updater {
        self.abort = Some(abort);
        self
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// A plan copy whose transaction is not in flight is stale (a crash between the final
    /// commit and its removal, or before the `Planned` commit): remove it.
    fn reconcile_plan_copy(&self) -> Result<()> {
        // A power cut while the copy was being written leaves its temporary file: it never
        // became the copy (no transaction began), so it is only litter.
        if fsutil::remove_if_present(&plancopy::temp_path_in(&self.state_dir))? {
            fsutil::fsync_dir(&self.state_dir)?;
        }
        let active = self.journal.active()?.map(|(rec, _)| rec.id);
        let copy_id = match plancopy::read(&self.state_dir) {
            Ok(None) => return Ok(()),
            Ok(Some(p)) => Some(p.tx_id),
            Err(e) => {
                tracing::warn!(error = %e, "removing an unreadable plan copy (the journal holds \
                    the plan)");
                None
            }
        };
        if copy_id.is_none() || copy_id != active {
            plancopy::remove(&self.state_dir)?;
        }
        if active.is_none() {
            crate::steplog::remove(&self.state_dir)?;
        }
        Ok(())
    }

    pub(super) fn refuse_if_in_flight(&self) -> Result<()> {
        match self.journal.active()? {
            None => Ok(()),
            Some((rec, _)) if rec.phase == Phase::RollbackFailed => Err(Error::new(
                ErrorCode::RollbackFailed,
                format!(
                    "transaction {} could not be rolled back and needs an operator; fix the \
                    cause, then run `tope-updater recover --retry`",
                    rec.id
                ),
            )),
            Some((rec, _)) => Err(Error::new(
                ErrorCode::OperationInProgress,
                format!(
                    "transaction {} was interrupted in phase {}; run `tope-updater recover` first",
                    rec.id, rec.phase
                ),
            )),
        }
    }

    pub(super) fn current_generation(&self) -> Result<(Vec<Generation>, Option<Generation>)> {
        let gens = self.journal.generations()?;
        let id = self.journal.current_generation_id()?;
        let current = gens.iter().find(|g| Some(g.id) == id).cloned();
        Ok((gens, current))
    }

    /// Removes blobs that no kept generation and no factory entry references.
    pub fn gc(&mut self) -> Result<GcStats> {
        self.refuse_if_in_flight()?;
        let keep =
            generation::referenced_blobs(&self.journal.generations()?, &self.journal.factory()?);
        self.store.gc(&keep)
    }
}

pub(super) fn report(rec: &TxRecord, plan: &Plan, outcome: Outcome) -> TxReport {
    TxReport {
        tx: rec.id,
        kind: TxAction::of(&plan.kind),
        from_version: rec.from_version.clone(),
        to_version: rec.to_version.clone(),
        targets: rec.targets,
        commits: rec.commits,
        outcome,
    }
}

pub(super) fn path_string(p: &Path) -> Result<String> {
    p.to_str().map(str::to_string).ok_or_else(|| {
        Error::new(ErrorCode::PathNotAllowed, format!("{} is not UTF-8", p.display()))
    })
}
