//! The driver: the one place where a transition is journaled and then performed.
//!
//! Write-ahead rule (STYLE rule 1): for every phase, `enter()` commits the phase durably
//! *before* `perform()` starts its effects, and a phase's effects are made durable (batched
//! `syncfs`) before the next phase is entered. Recovery therefore knows, from the journaled
//! phase alone, which effects are complete and which may be partial.

use crate::config::{Config, ServiceManager};
use crate::engine::generation::{self, Generation};
use crate::engine::phase::{Event, Shape, transition};
use crate::engine::plan::{ModulePlan, PackageRef, RestoreAction, SwapAction, restore_action, swap_action};
use crate::engine::recovery::{Decision, Inputs, ResumeNeeds, decide, resume_needs};
use crate::engine::{NewFile, NewState, PathState, Phase, Plan, RollbackTarget, Source, Target, TxKind};
use crate::error::{Error, ErrorCode, Result};
use crate::failpoint::hit;
use crate::fsutil::{self, CopyError, temp_path};
use crate::journal::records::TxRecord;
use crate::journal::{CommitEffects, Journal};
use crate::package::Package;
use crate::paths::AllowedRoots;
use crate::plancopy;
use crate::store::{BackupStore, GcStats};
use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TxReport {
    pub tx: u64,
    pub kind: &'static str,
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
}

/// Exclusive lock on `<state_dir>/lock`: one transaction at a time, across processes.
pub fn lock_state_dir(state_dir: &Path) -> Result<Flock<File>> {
    std::fs::create_dir_all(state_dir).map_err(|e| Error::io(ErrorCode::InternalError, "create state dir", state_dir, &e))?;
    let path = state_dir.join("lock");
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(ErrorCode::InternalError, "open", &path, &e))?;
    Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| match errno {
        nix::errno::Errno::EWOULDBLOCK => Error::new(ErrorCode::OperationInProgress, "another tope-updater transaction is running"),
        other => Error::io(ErrorCode::InternalError, "flock", &path, &other.into()),
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn shape(plan: &Plan) -> Shape {
    Shape { controls_services: plan.controls_services, runs_post_cmds: plan.runs_post_cmds }
}

fn kind_name(kind: &TxKind) -> &'static str {
    match kind {
        TxKind::Install { .. } => "install",
        TxKind::Rollback { .. } => "rollback",
    }
}

pub struct Updater {
    cfg: Config,
    roots: AllowedRoots,
    state_dir: PathBuf,
    journal: Journal,
    store: BackupStore,
    _lock: Flock<File>,
}

impl Updater {
    /// Takes the lock and opens the journal. A damaged journal is `JOURNAL_CORRUPT`: only
    /// `recover` (see `open_for_recovery`) replaces it.
    pub fn open(cfg: Config) -> Result<Updater> {
        let lock = lock_state_dir(&cfg.state_dir)?;
        // A plan copy without a journal means the journal was lost mid-transaction: creating a
        // fresh journal here would make the copy look stale and delete the only record of
        // what to undo. Only `recover` may handle that.
        if !Journal::path_in(&cfg.state_dir).exists() && plancopy::path_in(&cfg.state_dir).exists() {
            return Err(Error::new(
                ErrorCode::JournalCorrupt,
                "the journal is missing but a transaction was in flight; run `tope-updater recover`",
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
        let (journal, lost) = if !path.exists() && copy_exists {
            let e = Error::new(ErrorCode::JournalCorrupt, format!("{} is missing but a transaction was in flight", path.display()));
            (Journal::open(&cfg.state_dir)?, Some(e))
        } else {
            match Journal::open(&cfg.state_dir) {
                Ok(j) => (j, None),
                Err(e) if e.code == ErrorCode::JournalCorrupt => {
                    let aside = cfg.state_dir.join(format!("journal.redb.corrupt-{}", now_ms()));
                    tracing::error!(error = %e, moved_to = %aside.display(), "journal unreadable; starting a fresh one");
                    std::fs::rename(&path, &aside).map_err(|io| Error::io(ErrorCode::JournalCorrupt, "move aside", &path, &io))?;
                    fsutil::fsync_dir(&cfg.state_dir)?;
                    (Journal::open(&cfg.state_dir)?, Some(e))
                }
                Err(e) => return Err(e),
            }
        };
        if let Some(lost_err) = &lost {
            match plancopy::read(&cfg.state_dir) {
                Ok(Some(plan)) => {
                    let mut rec = new_record(&plan);
                    rec.phase = Phase::RollingBack;
                    rec.phases.push(Phase::RollingBack);
                    rec.error =
                        Some(Error::new(ErrorCode::JournalCorrupt, format!("{}; rolled back from the plan copy", lost_err.message)));
                    journal.import_in_flight(&mut rec, &plan)?;
                }
                Ok(None) => {}
                Err(copy_err) => {
                    return Err(Error::new(
                        ErrorCode::RollbackFailed,
                        format!(
                            "journal lost ({}) and the plan copy is unusable ({}): an operator must check the target files",
                            lost_err.message, copy_err.message
                        ),
                    ));
                }
            }
        }
        Ok((Updater::assemble(cfg, journal, lock)?, lost))
    }

    fn assemble(cfg: Config, journal: Journal, lock: Flock<File>) -> Result<Updater> {
        let store = BackupStore::open(&cfg.state_dir)?;
        let up =
            Updater { roots: AllowedRoots::new(&cfg.allowed_roots), state_dir: cfg.state_dir.clone(), cfg, journal, store, _lock: lock };
        up.reconcile_plan_copy()?;
        Ok(up)
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// A plan copy whose transaction is not in flight is stale (a crash between the final
    /// commit and its removal, or before the `Planned` commit): remove it.
    fn reconcile_plan_copy(&self) -> Result<()> {
        let active = self.journal.active()?.map(|(rec, _)| rec.id);
        let copy_id = match plancopy::read(&self.state_dir) {
            Ok(None) => return Ok(()),
            Ok(Some(p)) => Some(p.tx_id),
            Err(e) => {
                tracing::warn!(error = %e, "removing an unreadable plan copy (the journal holds the plan)");
                None
            }
        };
        if copy_id.is_none() || copy_id != active {
            plancopy::remove(&self.state_dir)?;
        }
        Ok(())
    }

    fn refuse_if_in_flight(&self) -> Result<()> {
        match self.journal.active()? {
            None => Ok(()),
            Some((rec, _)) if rec.phase == Phase::RollbackFailed => Err(Error::new(
                ErrorCode::RollbackFailed,
                format!(
                    "transaction {} could not be rolled back and needs an operator; fix the cause, then run `tope-updater recover --retry`",
                    rec.id
                ),
            )),
            Some((rec, _)) => Err(Error::new(
                ErrorCode::OperationInProgress,
                format!("transaction {} was interrupted in phase {}; run `tope-updater recover` first", rec.id, rec.phase),
            )),
        }
    }

    fn current_generation(&self) -> Result<(Vec<Generation>, Option<Generation>)> {
        let gens = self.journal.generations()?;
        let id = self.journal.current_generation_id()?;
        let current = gens.iter().find(|g| Some(g.id) == id).cloned();
        Ok((gens, current))
    }

    // ---- install ----

    pub fn install(&mut self, package: &Path, opts: &InstallOptions) -> Result<TxReport> {
        self.refuse_if_in_flight()?;
        let started = std::time::Instant::now();
        let pkg = Package::open(package, &self.cfg, &self.roots)?;
        tracing::debug!(elapsed_ms = started.elapsed().as_secs_f64() * 1e3, files = pkg.files.len(), "package validated");
        let (_, current) = self.current_generation()?;
        self.check_acceptable(&pkg, current.as_ref(), opts)?;
        let m = &pkg.manifest;
        let uses_services = m.modules.iter().any(|m| m.process_name.is_some());
        if uses_services && self.cfg.service_manager != ServiceManager::None {
            tracing::warn!(
                "this build does not control services: process_name is recorded in the plan, but no service is stopped or started"
            );
        }
        if m.modules.iter().any(|m| !m.post_cmds.is_empty()) {
            tracing::warn!("this build does not run post_cmds: they are recorded in the plan only");
        }
        let (euid, egid) = (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw());
        let olds = crate::parallel::try_map(&pkg.files, |f| fsutil::observe(&f.dst))?;
        let mut targets = Vec::with_capacity(pkg.files.len());
        for (f, old) in pkg.files.iter().zip(olds) {
            let module = &m.modules[f.module as usize];
            let old_meta = match old {
                PathState::File(o) => Some(o),
                PathState::Absent => None,
            };
            let new = NewFile {
                hash: f.expected,
                size: f.size,
                mode: module.mode.or(old_meta.map(|o| o.mode)).or(f.zip_mode).unwrap_or(0o644),
                uid: module.uid.or(old_meta.map(|o| o.uid)).unwrap_or(euid),
                gid: module.gid.or(old_meta.map(|o| o.gid)).unwrap_or(egid),
            };
            targets.push(Target {
                path: path_string(&f.dst)?,
                module: f.module,
                old,
                new: NewState::File(new),
                source: Source::Package { entry: f.entry.clone() },
            });
        }
        targets.sort_by(|a, b| a.path.cmp(&b.path));
        let plan = Plan {
            tx_id: self.journal.next_tx_id()?,
            kind: TxKind::Install { package: PackageRef { path: path_string(&pkg.path)?, blake3: pkg.blake3, size: pkg.size } },
            from_version: current.as_ref().map(|g| g.version.clone()),
            to_version: Some(m.version.to_string()),
            modules: m
                .modules
                .iter()
                .map(|m| ModulePlan {
                    name: m.name.clone(),
                    process_name: m.process_name.clone(),
                    restart_order: m.restart_order,
                    post_cmds: m.post_cmds.clone(),
                })
                .collect(),
            created_dirs: missing_dirs(&targets),
            targets,
            removed_dirs: Vec::new(),
            controls_services: false,
            runs_post_cmds: false,
        };
        self.check_free_space(&plan)?;
        tracing::debug!(elapsed_ms = started.elapsed().as_secs_f64() * 1e3, "planned");
        self.start(plan, Some(pkg))
    }

    /// Version, compatibility and no-loop rules (SPEC §2, §3).
    fn check_acceptable(&self, pkg: &Package, current: Option<&Generation>, opts: &InstallOptions) -> Result<()> {
        let m = &pkg.manifest;
        if let Some(want) = &opts.version
            && *want != m.version.to_string()
        {
            return Err(Error::new(ErrorCode::VersionMismatch, format!("package is version {}, caller asked for {want}", m.version)));
        }
        if let Some(c) = &m.compatible {
            match &self.cfg.compatible {
                Some(mine) if mine == c => {}
                Some(mine) => return Err(Error::new(ErrorCode::Incompatible, format!("package is for {c:?}, this device is {mine:?}"))),
                None => {
                    return Err(Error::new(
                        ErrorCode::Incompatible,
                        format!("package is for {c:?}, and this device has no `compatible` configured"),
                    ));
                }
            }
        }
        if let Some(cur) = current {
            let cur_v = crate::version::Version::parse(&cur.version)?;
            if m.version < cur_v && !opts.allow_downgrade {
                return Err(Error::new(
                    ErrorCode::VersionMismatch,
                    format!("package {} is older than installed {}; use --allow-downgrade", m.version, cur.version),
                ));
            }
            if let Some(min) = m.min_from_version
                && cur_v < min
            {
                return Err(Error::new(
                    ErrorCode::VersionMismatch,
                    format!("package needs at least {min} installed, found {}", cur.version),
                ));
            }
        } else if let Some(min) = m.min_from_version {
            tracing::warn!(%min, "min_from_version set but no installed version is recorded (factory baseline); accepting");
        }
        if let Some(tx) = self.journal.failed_package(&pkg.blake3)?
            && !opts.force
        {
            return Err(Error::new(
                ErrorCode::ValidationError,
                format!("this package ({}) was installed by transaction {tx} and rolled back; use --force to try it again", pkg.blake3),
            ));
        }
        Ok(())
    }

    /// statvfs preflight: new content beside every target, plus copies of old content when
    /// the backup store is on another filesystem (hard links cost nothing).
    fn check_free_space(&self, plan: &Plan) -> Result<()> {
        let store_dev = fsutil::device_of(self.store.dir())?;
        let mut need: BTreeMap<u64, (u64, PathBuf)> = BTreeMap::new();
        let mut dev_of_parent: BTreeMap<&Path, u64> = BTreeMap::new();
        for t in &plan.targets {
            let p = Path::new(&t.path);
            let parent = p.parent().unwrap_or(p);
            let dev = match dev_of_parent.get(parent) {
                Some(d) => *d,
                None => *dev_of_parent.entry(parent).or_insert(fsutil::device_of(p)?),
            };
            if let NewState::File(f) = t.new {
                need.entry(dev).or_insert((0, p.to_path_buf())).0 += f.size;
            }
            if let (PathState::File(o), true) = (t.old, dev != store_dev) {
                need.entry(store_dev).or_insert((0, self.store.dir().to_path_buf())).0 += o.size;
            }
        }
        for (bytes, anchor) in need.values() {
            let avail = fsutil::available_bytes(anchor)?;
            if avail < bytes + crate::limits::FREE_SPACE_RESERVE_BYTES {
                return Err(Error::new(
                    ErrorCode::DiskFull,
                    format!("{} needs {bytes} bytes, {avail} available", fsutil::existing_ancestor(anchor).display()),
                ));
            }
        }
        Ok(())
    }

    // ---- rollback ----

    pub fn rollback(&mut self, to: &RollbackTo) -> Result<TxReport> {
        self.refuse_if_in_flight()?;
        let (gens, current) = self.current_generation()?;
        let factory = self.journal.factory()?;
        let nothing = |m: String| Error::new(ErrorCode::NothingToRollBack, m);
        let (target, rollback_to): (Option<&Generation>, RollbackTarget) = match to {
            RollbackTo::Previous => {
                let cur = current.as_ref().ok_or_else(|| nothing("nothing installed: already at the factory baseline".into()))?;
                match cur.parent {
                    None => (None, RollbackTarget::Factory),
                    Some(p) => {
                        let g = gens
                            .iter()
                            .find(|g| g.id == p)
                            .ok_or_else(|| nothing(format!("the previous generation ({p}) is no longer kept; use --to factory")))?;
                        (Some(g), RollbackTarget::Generation(g.id))
                    }
                }
            }
            RollbackTo::Factory => {
                if current.is_none() {
                    return Err(nothing("already at the factory baseline".into()));
                }
                (None, RollbackTarget::Factory)
            }
            RollbackTo::Version(v) => {
                let g = gens
                    .iter()
                    .rev()
                    .find(|g| g.version == *v && Some(g.id) != current.as_ref().map(|c| c.id))
                    .ok_or_else(|| nothing(format!("no kept generation other than the current one has version {v}")))?;
                (Some(g), RollbackTarget::Generation(g.id))
            }
        };
        let managed: Vec<&str> = generation::managed_paths(current.as_ref(), &factory).into_iter().collect();
        let observed = crate::parallel::try_map(&managed, |p| fsutil::observe(Path::new(p)))?;
        let mut targets = Vec::new();
        for (path, have) in managed.into_iter().zip(observed) {
            let want = generation::desired_state(path, target, &factory);
            if have == want {
                continue;
            }
            let (new, source) = match want {
                PathState::Absent => (NewState::Absent, Source::Nothing),
                PathState::File(m) => {
                    if !self.store.has(&m.hash) {
                        return Err(Error::new(
                            ErrorCode::RollbackFailed,
                            format!("the backup of {path} ({}) is missing; nothing was changed", m.hash),
                        ));
                    }
                    (NewState::File(NewFile { hash: Some(m.hash), size: m.size, mode: m.mode, uid: m.uid, gid: m.gid }), Source::Blob)
                }
            };
            targets.push(Target { path: path.to_string(), module: 0, old: have, new, source });
        }
        let plan = Plan {
            tx_id: self.journal.next_tx_id()?,
            kind: TxKind::Rollback { to: rollback_to },
            from_version: current.as_ref().map(|g| g.version.clone()),
            to_version: target.map(|g| g.version.clone()),
            modules: Vec::new(),
            created_dirs: missing_dirs(&targets),
            removed_dirs: generation::dirs_to_remove(current.as_ref(), target),
            targets,
            controls_services: false,
            runs_post_cmds: false,
        };
        self.check_free_space(&plan)?;
        self.start(plan, None)
    }

    // ---- the transaction loop ----

    fn start(&mut self, plan: Plan, pkg: Option<Package>) -> Result<TxReport> {
        let mut rec = new_record(&plan);
        // The redundant copy first: if the journal is destroyed later, this is what recovery
        // rolls back from.
        plancopy::write(&self.state_dir, &plan)?;
        hit("plan.copy_written");
        self.journal.begin(&mut rec, &plan)?;
        hit("enter.Planned");
        tracing::info!(tx = rec.id, kind = kind_name(&plan.kind), targets = plan.targets.len(), to = ?plan.to_version, "transaction planned");
        self.drive(rec, plan, pkg)
    }

    /// Runs the transaction from its journaled phase to a terminal phase.
    fn drive(&mut self, mut rec: TxRecord, mut plan: Plan, pkg: Option<Package>) -> Result<TxReport> {
        loop {
            if rec.phase == Phase::RollingBack {
                return self.roll_back(rec, plan);
            }
            let started = std::time::Instant::now();
            let performed = self.perform(rec.phase, &mut plan, pkg.as_ref());
            tracing::debug!(tx = rec.id, phase = %rec.phase, elapsed_ms = started.elapsed().as_secs_f64() * 1e3, "phase effects done");
            match performed {
                Ok(plan_changed) if rec.phase == Phase::Committed => {
                    let _ = plan_changed;
                    tracing::info!(tx = rec.id, to = ?plan.to_version, commits = rec.commits, "transaction committed");
                    return Ok(report(&rec, &plan, Outcome::Committed));
                }
                Ok(plan_changed) => {
                    let next = transition(rec.phase, Event::Done, shape(&plan)).map_err(|e| Error::internal(e.to_string()))?;
                    self.enter(&mut rec, next, &plan, plan_changed)?;
                }
                Err(e) => {
                    tracing::error!(tx = rec.id, phase = %rec.phase, error = %e, "phase failed; rolling back");
                    let next = transition(rec.phase, Event::Failed, shape(&plan)).map_err(|e| Error::internal(e.to_string()))?;
                    rec.error = Some(e);
                    self.enter(&mut rec, next, &plan, false)?;
                }
            }
        }
    }

    /// Journals `next` durably, then fires its crash point. Nothing of `next` has happened yet.
    fn enter(&mut self, rec: &mut TxRecord, next: Phase, plan: &Plan, plan_changed: bool) -> Result<()> {
        rec.phase = next;
        rec.phases.push(next);
        rec.updated_unix_ms = now_ms();
        if next == Phase::Committed {
            let fx = self.commit_effects(plan)?;
            self.journal.finish_committed(rec, fx)?;
        } else {
            self.journal.enter_phase(rec, plan_changed.then_some(plan))?;
        }
        hit(&format!("enter.{}", next.name()));
        Ok(())
    }

    /// The effects of one phase. Returns whether the plan changed (new hashes learnt).
    fn perform(&mut self, phase: Phase, plan: &mut Plan, pkg: Option<&Package>) -> Result<bool> {
        match phase {
            Phase::Planned => Ok(false),
            Phase::Staged => self.stage(plan, pkg).map(|()| true),
            Phase::BackedUp => self.back_up(plan).map(|()| false),
            Phase::Swapped => self.swap(plan).map(|()| false),
            Phase::Verified => self.verify(plan).map(|()| false),
            Phase::Committed => {
                plancopy::remove(&self.state_dir)?;
                hit("commit.cleaned");
                Ok(false)
            }
            Phase::ServicesStopped | Phase::PostCommands | Phase::ServicesStarted => {
                Err(Error::internal(format!("phase {phase} has no implementation in this build, and no plan of this build enters it")))
            }
            Phase::RollingBack | Phase::RolledBack | Phase::RollbackFailed => Err(Error::internal(format!("perform called for {phase}"))),
        }
    }

    /// Writes every new file beside its target, hashing while writing (on every core), then
    /// one syncfs per filesystem. Idempotent: staged files are recreated from scratch.
    fn stage(&mut self, plan: &mut Plan, pkg: Option<&Package>) -> Result<()> {
        for d in &plan.created_dirs {
            fsutil::make_dir(Path::new(d))?;
        }
        let (tx, store) = (plan.tx_id, &self.store);
        let hashes = crate::parallel::try_map_with(
            &plan.targets,
            || Ok(pkg.map(Package::archive)),
            |archive, t| stage_one(t, tx, archive.as_mut(), store),
        )?;
        for (t, hash) in plan.targets.iter_mut().zip(hashes) {
            if let (NewState::File(nf), Some(h)) = (&mut t.new, hash) {
                nf.hash = Some(h);
            }
        }
        #[cfg(not(feature = "powercut-negative-control"))]
        fsutil::sync_filesystems(plan.targets.iter().map(|t| Path::new(&t.path)))?;
        hit("stage.synced");
        Ok(())
    }

    /// Puts every old file into the backup store (hard link or verified copy), then one
    /// syncfs of the store's filesystem.
    fn back_up(&mut self, plan: &Plan) -> Result<()> {
        for t in &plan.targets {
            if let PathState::File(m) = t.old {
                self.store.put(Path::new(&t.path), &m.hash)?;
                hit("backup.file");
            }
        }
        fsutil::sync_filesystems([self.store.dir()])?;
        hit("backup.synced");
        Ok(())
    }

    /// Renames every staged file over its target (or removes the target), removes the
    /// directories a rollback empties, then one syncfs per filesystem. Directories are
    /// worked on in parallel (renames in one directory serialise on its lock anyway).
    fn swap(&mut self, plan: &Plan) -> Result<()> {
        let mut by_dir: BTreeMap<&Path, Vec<&Target>> = BTreeMap::new();
        for t in &plan.targets {
            let p = Path::new(&t.path);
            by_dir.entry(p.parent().unwrap_or(p)).or_default().push(t);
        }
        let groups: Vec<Vec<&Target>> = by_dir.into_values().collect();
        crate::parallel::try_map(&groups, |group| group.iter().try_for_each(|t| swap_one(t, plan.tx_id)))?;
        for d in &plan.removed_dirs {
            fsutil::remove_dir_if_empty(Path::new(d))?;
        }
        fsutil::sync_filesystems(plan.targets.iter().map(|t| Path::new(&t.path)))?;
        hit("swap.synced");
        Ok(())
    }

    /// Re-reads every target and compares it with the plan.
    fn verify(&mut self, plan: &Plan) -> Result<()> {
        crate::parallel::try_map(&plan.targets, |t| {
            let want = t.new.settled().ok_or_else(|| Error::internal(format!("{}: new hash unknown at verification", t.path)))?;
            let got = fsutil::observe(Path::new(&t.path))?;
            if got != want {
                return Err(Error::new(ErrorCode::HashMismatch, format!("{} does not hold its new content after the swap", t.path)));
            }
            hit("verify.file");
            Ok(())
        })?;
        Ok(())
    }

    fn commit_effects(&self, plan: &Plan) -> Result<CommitEffects> {
        let (gens, current) = self.current_generation()?;
        match &plan.kind {
            TxKind::Install { package } => {
                // A generation is named after the install that made it: unique and increasing.
                let id = plan.tx_id;
                let version = plan.to_version.clone().unwrap_or_default();
                let g = generation::after_install(current.as_ref(), id, plan, &version)
                    .ok_or_else(|| Error::internal("new hashes unknown at commit"))?;
                let factory = self.journal.factory()?;
                let mut ids: Vec<u64> = gens.iter().map(|g| g.id).collect();
                ids.push(id);
                Ok(CommitEffects {
                    factory_additions: generation::factory_additions(&factory, plan),
                    remove_generations: generation::prune(&ids, self.cfg.keep_generations as usize),
                    current: Some(id),
                    new_generation: Some(g),
                    clear_failed_package: Some(package.blake3),
                })
            }
            TxKind::Rollback { to } => {
                let keep_upto = match to {
                    RollbackTarget::Generation(id) => Some(*id),
                    RollbackTarget::Factory => None,
                };
                Ok(CommitEffects {
                    new_generation: None,
                    current: keep_upto,
                    remove_generations: gens.iter().map(|g| g.id).filter(|id| keep_upto.is_none_or(|k| *id > k)).collect(),
                    factory_additions: Vec::new(),
                    clear_failed_package: None,
                })
            }
        }
    }

    /// Undoes a transaction from whatever its targets hold now, then ends it.
    fn roll_back(&mut self, mut rec: TxRecord, plan: Plan) -> Result<TxReport> {
        let error = rec.error.clone().unwrap_or_else(|| Error::new(ErrorCode::DeploymentFailed, "rolled back"));
        match self.undo(&plan) {
            Ok(()) => {
                rec.phase = transition(Phase::RollingBack, Event::Done, shape(&plan)).map_err(|e| Error::internal(e.to_string()))?;
                rec.phases.push(rec.phase);
                rec.updated_unix_ms = now_ms();
                let failed_package = match &plan.kind {
                    TxKind::Install { package } => Some(package.blake3),
                    TxKind::Rollback { .. } => None,
                };
                self.journal.finish_rolled_back(&mut rec, failed_package)?;
                hit("enter.RolledBack");
                plancopy::remove(&self.state_dir)?;
                tracing::warn!(tx = rec.id, error = %error, "transaction rolled back");
                let touched = rec.phases.iter().any(|p| p.has_swapped());
                Ok(report(&rec, &plan, Outcome::RolledBack { error, touched }))
            }
            Err(e) => {
                rec.phase = transition(Phase::RollingBack, Event::Failed, shape(&plan)).map_err(|e| Error::internal(e.to_string()))?;
                rec.phases.push(rec.phase);
                rec.updated_unix_ms = now_ms();
                let err = Error::new(ErrorCode::RollbackFailed, format!("{}; it was rolling back because of {error}", e));
                rec.error = Some(err.clone());
                self.journal.enter_phase(&mut rec, None)?;
                tracing::error!(tx = rec.id, error = %err, "ROLLBACK FAILED: an operator is needed");
                Ok(report(&rec, &plan, Outcome::RollbackFailed { error: err }))
            }
        }
    }

    /// Puts every target back to its old state, judged by what it holds now (idempotent:
    /// a second run after a crash finds less to do), then one syncfs per filesystem.
    fn undo(&mut self, plan: &Plan) -> Result<()> {
        let (tx, store) = (plan.tx_id, &self.store);
        crate::parallel::try_map(&plan.targets, |t| undo_one(t, tx, store))?;
        for d in plan.created_dirs.iter().rev() {
            fsutil::remove_dir_if_empty(Path::new(d))?;
        }
        let anchors: Vec<&Path> = plan.targets.iter().map(|t| Path::new(&t.path)).collect();
        fsutil::sync_filesystems(anchors)?;
        hit("rollback.synced");
        Ok(())
    }

    // ---- recovery ----

    /// Finishes or rolls back the transaction in flight, if any (SPEC §3).
    pub fn recover(&mut self, retry: bool) -> Result<RecoverReport> {
        let Some((mut rec, plan)) = self.journal.active()? else { return Ok(RecoverReport::Nothing) };
        if rec.phase == Phase::RollbackFailed {
            if !retry {
                return Ok(RecoverReport::NeedsOperator { tx: rec.id, error: rec.error });
            }
            let next = transition(rec.phase, Event::OperatorRetry, shape(&plan)).map_err(|e| Error::internal(e.to_string()))?;
            rec.attempts = 0;
            self.enter(&mut rec, next, &plan, false)?;
        }
        rec.attempts += 1;
        rec.updated_unix_ms = now_ms();
        self.journal.enter_phase(&mut rec, None)?;
        hit("recover.attempt");
        let (inputs, pkg) = self.check_inputs(resume_needs(rec.phase), &plan);
        let decision = decide(rec.phase, rec.attempts, self.cfg.max_recovery_attempts, self.cfg.recovery, &inputs);
        tracing::info!(tx = rec.id, phase = %rec.phase, attempt = rec.attempts, ?decision, "recovering");
        let report = match decision {
            Decision::Nothing => return Ok(RecoverReport::Nothing),
            Decision::Resume => self.drive(rec, plan, pkg)?,
            Decision::RollBack { reason } => {
                if rec.phase != Phase::RollingBack {
                    rec.error = Some(Error::new(ErrorCode::DeploymentFailed, format!("interrupted in phase {}; {reason}", rec.phase)));
                    let next = transition(rec.phase, Event::Failed, shape(&plan)).map_err(|e| Error::internal(e.to_string()))?;
                    self.enter(&mut rec, next, &plan, false)?;
                }
                self.roll_back(rec, plan)?
            }
            Decision::GiveUp { reason } => {
                let err = Error::new(
                    ErrorCode::RollbackFailed,
                    format!("{reason}; last error: {}", rec.error.as_ref().map(|e| e.to_string()).unwrap_or_else(|| "none".into())),
                );
                rec.phase = Phase::RollbackFailed;
                rec.phases.push(Phase::RollbackFailed);
                rec.error = Some(err.clone());
                self.journal.enter_phase(&mut rec, None)?;
                report(&rec, &plan, Outcome::RollbackFailed { error: err })
            }
        };
        Ok(RecoverReport::Finished { report, journal_lost: None })
    }

    /// Whether what resuming needs is there (`ResumeNeeds`), and the reopened package.
    fn check_inputs(&self, needs: ResumeNeeds, plan: &Plan) -> (Inputs, Option<Package>) {
        match needs {
            ResumeNeeds::Nothing => (Inputs::Available, None),
            ResumeNeeds::Source => match &plan.kind {
                TxKind::Install { package } => match Package::open(Path::new(&package.path), &self.cfg, &self.roots) {
                    Ok(p) if p.blake3 == package.blake3 => (Inputs::Available, Some(p)),
                    Ok(_) => (Inputs::Missing(format!("package {} has changed", package.path)), None),
                    Err(e) => (Inputs::Missing(format!("package {}: {e}", package.path)), None),
                },
                TxKind::Rollback { .. } => {
                    let missing = plan.targets.iter().find_map(|t| match t.new {
                        NewState::File(NewFile { hash: Some(h), .. }) if !self.store.has(&h) => Some(t.path.clone()),
                        _ => None,
                    });
                    match missing {
                        None => (Inputs::Available, None),
                        Some(p) => (Inputs::Missing(format!("backup for {p} is missing")), None),
                    }
                }
            },
            ResumeNeeds::StagedContent => {
                let checked = crate::parallel::try_map(&plan.targets, |t| {
                    let missing = |why: &str| Error::new(ErrorCode::DeploymentFailed, format!("{}: {why}", t.path));
                    let want = t.new.settled().ok_or_else(|| missing("new hash was never recorded"))?;
                    if want == PathState::Absent {
                        return Ok(());
                    }
                    let target = Path::new(&t.path);
                    let staged_ok = fsutil::observe(&temp_path(target, plan.tx_id)).is_ok_and(|s| s == want);
                    if !staged_ok && (fsutil::observe(target) != Ok(want)) {
                        return Err(missing("neither the staged nor the live file holds the new content"));
                    }
                    Ok(())
                });
                match checked {
                    Ok(_) => (Inputs::Available, None),
                    Err(e) => (Inputs::Missing(e.message), None),
                }
            }
        }
    }

    // ---- gc ----

    /// Removes blobs that no kept generation and no factory entry references.
    pub fn gc(&mut self) -> Result<GcStats> {
        self.refuse_if_in_flight()?;
        let keep = generation::referenced_blobs(&self.journal.generations()?, &self.journal.factory()?);
        self.store.gc(&keep)
    }
}

/// Stages one target: its new content to `.tope-N-h.new`, checked against the plan, with its
/// mode and owner. Returns the content hash (`None` for a target whose new state is absent).
fn stage_one(
    t: &Target,
    tx: u64,
    archive: Option<&mut crate::package::Archive>,
    store: &BackupStore,
) -> Result<Option<crate::engine::Hash>> {
    let NewState::File(nf) = &t.new else { return Ok(None) };
    let target = Path::new(&t.path);
    let tmp = temp_path(target, tx);
    let file = fsutil::create_replacing(&tmp)?;
    let copied = match &t.source {
        Source::Package { entry } => {
            let archive = archive.ok_or_else(|| Error::internal("staging from a package that is not open"))?;
            let reader = crate::package::entry_reader(archive, entry, nf.size)?;
            fsutil::copy_hashed(reader, &file).map_err(|e| match e {
                CopyError::Read(e) => Error::new(ErrorCode::InvalidPackage, format!("entry {entry:?}: {e}")),
                CopyError::Write(e) => Error::io(ErrorCode::DeploymentFailed, "write", &tmp, &e),
            })
        }
        Source::Blob => {
            let hash = nf.hash.ok_or_else(|| Error::internal("blob source without a hash"))?;
            fsutil::copy_hashed(store.open_blob(&hash)?, &file).map_err(|e| match e {
                CopyError::Read(e) => Error::io(ErrorCode::RollbackFailed, "read backup", &store.blob_path(&hash), &e),
                CopyError::Write(e) => Error::io(ErrorCode::DeploymentFailed, "write", &tmp, &e),
            })
        }
        Source::Nothing => Err(Error::internal(format!("{} has new content but no source", t.path))),
    };
    let (hash, size) = copied?;
    if size != nf.size {
        return Err(Error::new(ErrorCode::InvalidPackage, format!("{}: {size} bytes staged, {} declared", t.path, nf.size)));
    }
    if let Some(expected) = nf.hash
        && expected != hash
    {
        return Err(Error::new(ErrorCode::HashMismatch, format!("content for {} hashes to {hash}, expected {expected}", t.path)));
    }
    fsutil::apply_meta(&file, &tmp, nf.mode, nf.uid, nf.gid)?;
    hit("stage.file");
    Ok(Some(hash))
}

/// Swaps one target: the staged file renamed over it, or the target removed.
fn swap_one(t: &Target, tx: u64) -> Result<()> {
    let target = Path::new(&t.path);
    let tmp = temp_path(target, tx);
    let staged = std::fs::symlink_metadata(&tmp).is_ok();
    let current = match (&t.new, staged) {
        (NewState::File(_), true) => None,
        _ => Some(fsutil::observe(target)?),
    };
    match swap_action(&t.new, staged, current.as_ref()) {
        SwapAction::Rename => std::fs::rename(&tmp, target).map_err(|e| Error::io(ErrorCode::DeploymentFailed, "rename", target, &e))?,
        SwapAction::Remove => {
            fsutil::remove_if_present(target)?;
        }
        SwapAction::Done => {}
        SwapAction::Lost => return Err(Error::new(ErrorCode::DeploymentFailed, format!("{}: staged content is missing", t.path))),
    }
    hit("swap.file");
    Ok(())
}

/// Puts one target back to its old state, judged by what it holds now.
fn undo_one(t: &Target, tx: u64, store: &BackupStore) -> Result<()> {
    let target = Path::new(&t.path);
    let tmp = temp_path(target, tx);
    fsutil::remove_if_present(&tmp)?;
    let current = fsutil::observe(target)?;
    match restore_action(&t.old, &current) {
        RestoreAction::Nothing => {}
        RestoreAction::Remove => {
            fsutil::remove_if_present(target)?;
        }
        RestoreAction::Restore => {
            let PathState::File(meta) = t.old else { unreachable!("restore_action returns Restore only for old files") };
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(ErrorCode::RollbackFailed, "create", parent, &e))?;
            }
            store.restore_to(&meta, &tmp)?;
            std::fs::rename(&tmp, target).map_err(|e| Error::io(ErrorCode::RollbackFailed, "rename", target, &e))?;
        }
    }
    hit("rollback.file");
    Ok(())
}

fn new_record(plan: &Plan) -> TxRecord {
    let now = now_ms();
    TxRecord {
        id: plan.tx_id,
        kind: plan.kind.clone(),
        from_version: plan.from_version.clone(),
        to_version: plan.to_version.clone(),
        phase: Phase::Planned,
        phases: vec![Phase::Planned],
        attempts: 0,
        error: None,
        targets: plan.targets.len() as u32,
        new_bytes: plan.new_bytes(),
        commits: 0,
        started_unix_ms: now,
        updated_unix_ms: now,
    }
}

fn report(rec: &TxRecord, plan: &Plan, outcome: Outcome) -> TxReport {
    TxReport {
        tx: rec.id,
        kind: kind_name(&plan.kind),
        from_version: rec.from_version.clone(),
        to_version: rec.to_version.clone(),
        targets: rec.targets,
        commits: rec.commits,
        outcome,
    }
}

fn path_string(p: &Path) -> Result<String> {
    p.to_str().map(str::to_string).ok_or_else(|| Error::new(ErrorCode::PathNotAllowed, format!("{} is not UTF-8", p.display())))
}

/// Ancestors of new files that do not exist yet, parents first.
fn missing_dirs(targets: &[Target]) -> Vec<String> {
    let mut dirs = BTreeSet::new();
    for t in targets.iter().filter(|t| matches!(t.new, NewState::File(_))) {
        let mut p = Path::new(&t.path).parent();
        while let Some(dir) = p {
            if std::fs::symlink_metadata(dir).is_ok() {
                break;
            }
            if let Some(s) = dir.to_str() {
                dirs.insert(s.to_string());
            }
            p = dir.parent();
        }
    }
    let mut out: Vec<String> = dirs.into_iter().collect();
    out.sort_by_key(|d| (d.matches('/').count(), d.clone()));
    out
}

/// Live files against the current generation (or the factory baseline).
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub version: Option<String>,
    pub checked: usize,
    pub mismatches: Vec<String>,
}

pub fn verify_live(journal: &Journal) -> Result<VerifyReport> {
    let gens = journal.generations()?;
    let id = journal.current_generation_id()?;
    let current = gens.iter().find(|g| Some(g.id) == id);
    let factory = journal.factory()?;
    let mut mismatches = Vec::new();
    let paths = generation::managed_paths(current, &factory);
    for path in &paths {
        let want = generation::desired_state(path, current, &factory);
        match fsutil::observe(Path::new(path)) {
            Ok(have) if have == want => {}
            Ok(PathState::Absent) => mismatches.push(format!("{path}: missing")),
            Ok(_) if want == PathState::Absent => mismatches.push(format!("{path}: should not exist")),
            Ok(_) => mismatches.push(format!("{path}: content, mode or owner differs")),
            Err(e) => mismatches.push(format!("{path}: {e}")),
        }
    }
    Ok(VerifyReport { version: current.map(|g| g.version.clone()), checked: paths.len(), mismatches })
}

/// What `status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub current: Option<GenerationSummary>,
    pub generations: Vec<GenerationSummary>,
    pub factory_paths: usize,
    pub in_flight: Option<InFlight>,
    pub last: Option<TxRecord>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerationSummary {
    pub id: u64,
    pub version: String,
    pub tx: u64,
    pub files: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct InFlight {
    pub tx: u64,
    pub kind: &'static str,
    pub phase: Phase,
    pub to_version: Option<String>,
    pub error: Option<Error>,
}

pub fn status(journal: &Journal) -> Result<StatusReport> {
    let gens = journal.generations()?;
    let id = journal.current_generation_id()?;
    let summary = |g: &Generation| GenerationSummary { id: g.id, version: g.version.clone(), tx: g.tx_id, files: g.files.len() };
    let in_flight = journal.active()?.map(|(rec, plan)| InFlight {
        tx: rec.id,
        kind: kind_name(&plan.kind),
        phase: rec.phase,
        to_version: rec.to_version,
        error: rec.error,
    });
    let last = journal.history(usize::MAX)?.into_iter().find(|r| r.phase.is_terminal() && r.phase != Phase::RollbackFailed);
    Ok(StatusReport {
        current: gens.iter().find(|g| Some(g.id) == id).map(summary),
        generations: gens.iter().map(summary).collect(),
        factory_paths: journal.factory()?.len(),
        in_flight,
        last,
    })
}
