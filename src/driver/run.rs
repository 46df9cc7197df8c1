//! The transaction loop: journal a phase, perform its effects, make them durable, ask the
//! engine for the next phase; on failure, undo.

use crate::engine::generation;
use crate::engine::known::{KnownFile, StagedIdentity, Timestamp};
use crate::engine::phase::Event;
use crate::engine::services;
use crate::engine::trial::Trial;
use crate::engine::{NewState, PathState, Phase, Plan, RollbackTarget, Target, TxKind};
use crate::error::{Error, ErrorCode, Result};
use crate::failpoint::hit;
use crate::fsutil;
use crate::journal::CommitEffects;
use crate::journal::records::TxRecord;
use crate::package::Package;
use crate::plancopy;
use crate::steplog;
use std::collections::BTreeMap;
use std::path::Path;

use super::{Outcome, TxAction, TxReport, Updater, report};

use super::effects::{split_stage, stage_one, swap_one, undo_one};
use super::transaction::Transaction;

impl Updater {
    pub(super) fn start(&mut self, plan: Plan, pkg: Option<Package>) -> Result<TxReport> {
        // The redundant copy first: if the journal is destroyed later, this is what recovery
        // rolls back from.
        plancopy::write(&self.state_dir, &plan)?;
        hit("plan.copy_written");
        let mut tx = Transaction::planned(plan);
        self.journal.begin(&mut tx.rec, &tx.plan)?;
        hit("enter.Planned");
        tracing::info!(
            tx = tx.rec.id,
            kind = %TxAction::of(&tx.plan.kind),
            targets = tx.plan.targets.len(),
            to = ?tx.plan.to_version,
            "transaction planned"
        );
        let summary = interrupted_summary(&tx);
        self.drive(tx, pkg).or_else(|error| {
            let shutdown = is_set(self.cancel.as_ref());
            Ok(summary.with(error, shutdown))
        })
    }

    /// Runs the transaction from its journaled phase to a terminal phase.
    pub(super) fn drive(&mut self, mut tx: Transaction, pkg: Option<Package>) -> Result<TxReport> {
        loop {
            if tx.phase() == Phase::RollingBack {
                return self.roll_back(tx);
            }
            let started = std::time::Instant::now();
            let performed = self.perform(&mut tx, pkg.as_ref());
            tracing::debug!(
                tx = tx.rec.id,
                phase = %tx.phase(),
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                "phase effects done"
            );
            match performed {
                Ok(()) if tx.phase() == Phase::Committed => {
                    tracing::info!(
                        tx = tx.rec.id,
                        to = ?tx.plan.to_version,
                        commits = tx.rec.commits,
                        "transaction committed"
                    );
                    // The end is durable and the plan copy gone: what it released can go.
                    self.collect_garbage();
                    return Ok(report(&tx.rec, &tx.plan, Outcome::Committed));
                }
                Err(e) if tx.phase() == Phase::Committed => {
                    // The commit is durable; only the plan copy's removal failed. The next
                    // open removes the stale copy (it names a transaction not in flight).
                    tracing::warn!(tx = tx.rec.id, error = %e, "committed, but the plan copy \
                        could not be removed yet");
                    return Ok(report(&tx.rec, &tx.plan, Outcome::Committed));
                }
                Ok(())
                    if tx.peek(Event::Done)? == Phase::Swapped && is_set(self.abort.as_ref()) =>
                {
                    // Canceled with nothing swapped yet: undone like a failed phase.
                    tracing::info!(tx = tx.rec.id, "canceled before the swap; rolling back");
                    let canceled = Error::new(
                        ErrorCode::Canceled,
                        "canceled by the fleet server before anything was swapped",
                    );
                    self.fail_phase(&mut tx, canceled)?;
                }
                Ok(()) => {
                    let next = tx.advance(self, Event::Done)?;
                    if is_set(self.cancel.as_ref()) && next != Phase::Committed {
                        // Shutdown requested: the phase is journaled, nothing of it has run.
                        return Err(Error::new(
                            ErrorCode::OperationInProgress,
                            format!("stopped at {next} for shutdown; it resumes at the next start"),
                        ));
                    }
                }
                Err(e) => {
                    tracing::error!(tx = tx.rec.id, phase = %tx.phase(), error = %e, "phase \
                        failed; rolling back");
                    self.fail_phase(&mut tx, e)?;
                }
            }
        }
    }

    /// Enters `RollingBack` for `error`. Staged files are never the only copy of anything (the
    /// package or the blobs are): dropping them first frees the space a full disk needs for
    /// the `RollingBack` commit. A crash right here is recovered like any other.
    fn fail_phase(&self, tx: &mut Transaction, error: Error) -> Result<()> {
        discard_staged(&tx.plan);
        tx.rec.error = Some(error);
        tx.advance(self, Event::Failed).map(drop)
    }

    /// Records in the end commit what it leaves unreferenced (`history` shows it). Only a
    /// count: an unreadable store dir records 0 rather than failing the commit.
    pub(super) fn note_freed(&self, rec: &mut TxRecord, fx: Option<&CommitEffects>) {
        match self.garbage_after(fx) {
            Ok(g) => {
                rec.freed_blobs = g.entries.len() as u64;
                rec.freed_bytes = g.bytes();
            }
            Err(e) => {
                tracing::warn!(tx = rec.id, error = %e, "could not list the backup store before \
                    the end commit");
            }
        }
    }

    /// The effects of the transaction's current phase.
    pub(super) fn perform(&mut self, tx: &mut Transaction, pkg: Option<&Package>) -> Result<()> {
        match tx.phase() {
            Phase::Planned => Ok(()),
            Phase::Staged => {
                tx.learnt.staged = self.stage(&mut tx.plan, pkg)?;
                tx.plan_changed = true;
                Ok(())
            }
            Phase::BackedUp => self.back_up(&tx.plan),
            Phase::Swapped => {
                tx.learnt.swapped_at = Some(Self::swap(&tx.plan)?);
                Ok(())
            }
            Phase::Verified => {
                let swapped_at = tx.learnt.swapped_at.take();
                let staged = std::mem::take(&mut tx.learnt.staged);
                tx.learnt.verified = Self::verify(&tx.plan, swapped_at, &staged)?;
                Ok(())
            }
            Phase::Committed => {
                steplog::remove(&self.state_dir)?;
                plancopy::remove(&self.state_dir)?;
                hit("commit.cleaned");
                Ok(())
            }
            Phase::ServicesStopped => self.stop_services(&tx.plan),
            Phase::PostCommands => self.run_post_commands(&mut tx.rec, &tx.plan),
            Phase::ServicesStarted => self.start_services(&tx.plan),
            phase @ (Phase::RollingBack
            | Phase::RolledBack
            | Phase::RollbackFailed
            | Phase::Confirmed) => Err(Error::internal(format!("perform called for {phase}"))),
        }
    }

    /// Stops the plan's services in descending `restart_order`. Idempotent: stopping a
    /// stopped service is a no-op, so recovery may repeat it.
    pub(super) fn stop_services(&mut self, plan: &Plan) -> Result<()> {
        for s in services::stop_order(&plan.modules) {
            self.services.stop(&s)?;
            hit("services.stopped_one");
        }
        Ok(())
    }

    /// Starts the plan's services in ascending `restart_order`; each must come up and stay up.
    pub(super) fn start_services(&mut self, plan: &Plan) -> Result<()> {
        for s in services::start_order(&plan.modules) {
            self.services.start(&s)?;
            hit("services.started_one");
        }
        Ok(())
    }

    /// Runs the post commands not yet done, recording each completion durably in the step
    /// log (one fdatasync per command, no journal commit), so a power cut re-runs only the
    /// command it interrupted. The count reaches the journal with the next phase commit.
    pub(super) fn run_post_commands(&mut self, rec: &mut TxRecord, plan: &Plan) -> Result<()> {
        let done = rec.post_cmds_done.max(steplog::completed(&self.state_dir, plan.tx_id)?);
        for c in services::remaining_post_commands(plan, done) {
            self.services.run_post_command(
                c.command,
                c.module,
                plan.tx_id,
                plan.to_version.as_deref(),
            )?;
            hit("post_cmd.ran");
            steplog::record(&self.state_dir, plan.tx_id, c.index)?;
            rec.post_cmds_done = c.index + 1;
            hit("post_cmd.recorded");
        }
        Ok(())
    }

    /// Writes every new file beside its target, hashing while writing (on every core), then
    /// one syncfs per filesystem. Idempotent: staged files are recreated from scratch.
    /// Large pinned stored entries are copied by pieces, so both cores share one large file.
    /// Returns the staged files' identities after the flush (`after_staging_flush`).
    pub(super) fn stage(
        &self,
        plan: &mut Plan,
        pkg: Option<&Package>,
    ) -> Result<BTreeMap<String, StagedIdentity>> {
        for d in &plan.created_dirs {
            fsutil::make_dir(Path::new(d))?;
        }
        let (tx, store) = (plan.tx_id, &self.store);
        let (total, done) = (plan.new_bytes(), std::sync::atomic::AtomicU64::new(0));
        let observer = self.observer.as_deref();
        let progress = |t: &Target| {
            if let (Some(o), NewState::File(f)) = (observer, t.new) {
                let now = done.fetch_add(f.size, std::sync::atomic::Ordering::Relaxed) + f.size;
                let name = plan.modules.get(t.module as usize).map_or("", |m| m.name.as_str());
                o.staged(name, t.module as usize + 1, plan.modules.len(), now, total);
            }
        };
        // Pass 1: every target whole, except the large ones that can be split.
        let first = crate::parallel::try_map_with(
            &plan.targets,
            || Ok(pkg.map(Package::archive)),
            |archive, t| {
                if t.unchanged() {
                    // Already there: nothing to write (SPEC §3).
                    progress(t);
                    return Ok(Staging::Done(t.old.hash()));
                }
                if let (Some(p), Some(a)) = (pkg, archive.as_mut())
                    && let Some(split) = split_stage(t, tx, p, a)?
                {
                    return Ok(Staging::Split(split));
                }
                let h = stage_one(t, tx, archive.as_mut(), store)?;
                progress(t);
                Ok(Staging::Done(h))
            },
        )?;
        let hashes = stage_split_pieces(first, &plan.targets, &progress)?;
        for (t, hash) in plan.targets.iter_mut().zip(hashes) {
            if let (NewState::File(nf), Some(h)) = (&mut t.new, hash) {
                nf.hash = Some(h);
            }
        }
        if !fsutil::negative_control("staging") {
            fsutil::sync_filesystems(plan.targets.iter().map(|t| Path::new(&t.path)))?;
        }
        let staged = after_staging_flush(plan, self.cfg.verify_from_media)?;
        hit("stage.synced");
        Ok(staged)
    }

    /// Puts every old file into the backup store (hard link or verified copy, on every
    /// core), then one syncfs of the store's filesystem.
    pub(super) fn back_up(&self, plan: &Plan) -> Result<()> {
        // One source per distinct content: two workers must never fill the same blob.
        let mut by_hash: BTreeMap<crate::engine::Hash, &str> = BTreeMap::new();
        // A target that keeps its content is not backed up: a hard link would make the blob
        // the live file itself, which an edit of the file would then change (and nothing
        // needs it: the path keeps that content, and whatever later changes it backs it up).
        for t in plan.targets.iter().filter(|t| !t.unchanged()) {
            if let PathState::File(m) = t.old {
                by_hash.entry(m.hash).or_insert(&t.path);
            }
        }
        let unique: Vec<(crate::engine::Hash, &str)> = by_hash.into_iter().collect();
        let store = &self.store;
        crate::parallel::try_map(&unique, |(hash, path)| {
            store.put(Path::new(path), hash)?;
            hit("backup.file");
            Ok(())
        })?;
        if !fsutil::negative_control("backups") {
            fsutil::sync_filesystems([self.store.dir()])?;
        }
        hit("backup.synced");
        Ok(())
    }

    /// Renames every staged file over its target (or removes the target), removes the
    /// directories a rollback empties, then one syncfs per filesystem. Directories are
    /// worked on in parallel (renames in one directory serialise on its lock anyway).
    /// Returns a clock reading taken after the last rename.
    pub(super) fn swap(plan: &Plan) -> Result<Timestamp> {
        let mut by_dir: BTreeMap<&Path, Vec<&Target>> = BTreeMap::new();
        for t in &plan.targets {
            let p = Path::new(&t.path);
            by_dir.entry(p.parent().unwrap_or(p)).or_default().push(t);
        }
        let groups: Vec<Vec<&Target>> = by_dir.into_values().collect();
        crate::parallel::try_map(&groups, |group| {
            group.iter().try_for_each(|t| swap_one(t, plan.tx_id))
        })?;
        for d in &plan.removed_dirs {
            fsutil::remove_dir_if_empty(Path::new(d))?;
        }
        // After the last change to a target and before the syncfs, which usually outlasts
        // the wait `verify` begins with.
        let swapped_at = crate::observe::precise_now();
        if !fsutil::negative_control("swap") {
            fsutil::sync_filesystems(plan.targets.iter().map(|t| Path::new(&t.path)))?;
        }
        hit("swap.synced");
        Ok(swapped_at)
    }

    /// Checks every target against the plan: a file this run staged by its identity (it is
    /// still the staged inode, unwritten: its content was hashed while written and flushed
    /// before the swap), any other target by reading it (on every core, large files split).
    /// Returns the targets seen with a settled signature: they become known-file records at
    /// the commit.
    pub(super) fn verify(
        plan: &Plan,
        swapped_at: Option<Timestamp>,
        staged: &BTreeMap<String, StagedIdentity>,
    ) -> Result<BTreeMap<String, KnownFile>> {
        let paths: Vec<&str> = plan.targets.iter().map(|t| t.path.as_str()).collect();
        // Every rename of the swap settled (usually already true after its syncfs), so that
        // every target read here can be recorded. A resumed run waits from now.
        crate::observe::wait_past(swapped_at.unwrap_or_else(crate::observe::precise_now));
        // Targets this run staged are checked by identity; the others (kept files, a resumed
        // transaction, `verify_from_media`) are read back.
        let seen = crate::observe::observe_all(&paths, crate::observe::Source::Staged(staged))?;
        let by_identity = seen.iter().filter(|o| o.unread).count();
        tracing::debug!(
            targets = seen.len(),
            by_identity,
            read = seen.len() - by_identity,
            "targets verified"
        );
        let mut verified = BTreeMap::new();
        for (t, got) in plan.targets.iter().zip(seen) {
            let want = t.new.settled().ok_or_else(|| {
                Error::internal(format!("{}: new hash unknown at verification", t.path))
            })?;
            if got.state != want {
                return Err(Error::new(
                    ErrorCode::HashMismatch,
                    format!("{} does not hold its new content after the swap", t.path),
                ));
            }
            if let Some(k) = got.recordable {
                verified.insert(t.path.clone(), k);
            }
            hit("verify.file");
        }
        Ok(verified)
    }

    /// What the `Committed` commit writes besides the record: for an install the new
    /// generation, factory additions, pruning and the trial; for a rollback the generations
    /// it drops. The known-file changes: a record for each target verified with a settled
    /// signature (`verified`), and no record for any other target (its old record, if any,
    /// describes an inode the swap replaced).
    pub(super) fn commit_effects(
        &self,
        plan: &Plan,
        mut verified: BTreeMap<String, KnownFile>,
    ) -> Result<CommitEffects> {
        let known_files: Vec<_> =
            plan.targets.iter().map(|t| (t.path.clone(), verified.remove(&t.path))).collect();
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
                let trial = if self.cfg.confirm_required {
                    Some(Trial::begin(id, &version, package.blake3, &crate::clock::boot_id()?))
                } else {
                    None
                };
                Ok(CommitEffects {
                    factory_additions: generation::factory_additions(&factory, plan),
                    remove_generations: generation::prune(&ids, self.cfg.keep_generations as usize),
                    current: Some(id),
                    new_generation: Some(g),
                    clear_failed_package: Some(package.blake3),
                    mark_failed_package: None,
                    trial,
                    known_files,
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
                    remove_generations: gens
                        .iter()
                        .map(|g| g.id)
                        .filter(|id| keep_upto.is_none_or(|k| *id > k))
                        .collect(),
                    factory_additions: Vec::new(),
                    clear_failed_package: None,
                    // Rolling back an expired trial: its package is not installed again
                    // without --force (no reinstall loops).
                    mark_failed_package: self
                        .journal
                        .trial()?
                        .filter(|t| t.expired(self.cfg.max_trial_boots))
                        .map(|t| (t.package, t.tx)),
                    trial: None,
                    known_files,
                })
            }
        }
    }

    /// Undoes a transaction from whatever its targets hold now, then ends it. When the
    /// transaction had begun to stop services, they are stopped (some may run the new
    /// version, or were restarted by a reboot), the files restored, and all started again on
    /// the old version.
    pub(super) fn roll_back(&mut self, mut tx: Transaction) -> Result<TxReport> {
        let error = tx
            .rec
            .error
            .clone()
            .unwrap_or_else(|| Error::new(ErrorCode::DeploymentFailed, "rolled back"));
        let restart = tx.plan.controls_services && services_may_be_stopped(&tx.rec);
        if restart {
            for s in services::stop_order(&tx.plan.modules) {
                // The files are restored even if a process will not die: old files under a
                // stuck process beat new ones, and the start below reports the service.
                if let Err(e) = self.services.stop(&s) {
                    tracing::error!(tx = tx.rec.id, service = s.name, error = %e, "could not stop \
                        the service for the rollback");
                }
            }
        }
        let undone = self.undo(&tx.plan).and_then(|()| {
            if restart {
                self.start_services(&tx.plan).map_err(|e| {
                    Error::new(
                        e.code,
                        format!(
                            "the old files are back, but a service did not start on them: {}",
                            e.message
                        ),
                    )
                })?;
                hit("rollback.services_started");
            }
            Ok(())
        });
        match undone {
            Ok(()) => {
                tx.advance(self, Event::Done)?;
                match steplog::remove(&self.state_dir)
                    .and_then(|()| plancopy::remove(&self.state_dir))
                {
                    // The backups of what was undone are no longer needed.
                    Ok(()) => self.collect_garbage(),
                    // The end is durable; the next open removes the stale copy.
                    Err(e) => {
                        tracing::warn!(tx = tx.rec.id, error = %e, "rolled back, but the plan \
                            copy could not be removed yet");
                    }
                }
                tracing::warn!(tx = tx.rec.id, error = %error, "transaction rolled back");
                let touched = tx.rec.phases.iter().any(|p| p.has_swapped());
                Ok(report(&tx.rec, &tx.plan, Outcome::RolledBack { error, touched }))
            }
            Err(e) => {
                let err = Error::new(
                    ErrorCode::RollbackFailed,
                    format!("{e}; it was rolling back because of {error}"),
                );
                tx.rec.error = Some(err.clone());
                tx.advance(self, Event::Failed)?;
                tracing::error!(tx = tx.rec.id, error = %err, "ROLLBACK FAILED: an operator is \
                    needed");
                Ok(report(&tx.rec, &tx.plan, Outcome::RollbackFailed { error: err }))
            }
        }
    }

    /// Puts every target back to its old state, judged by what it holds now (idempotent:
    /// a second run after a crash finds less to do), then one syncfs per filesystem.
    pub(super) fn undo(&mut self, plan: &Plan) -> Result<()> {
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
}

/// A target after the first staging pass.
enum Staging {
    Done(Option<crate::engine::Hash>),
    Split(super::effects::SplitStage),
}

/// Whether the transaction may have stopped services: it entered `ServicesStopped`, or its
/// history is unknown (imported from the plan copy after journal loss). Stopping and
/// starting a service that was never stopped costs a restart, never correctness.
fn services_may_be_stopped(rec: &TxRecord) -> bool {
    rec.phases.contains(&Phase::ServicesStopped) || rec.phases.first() != Some(&Phase::Planned)
}

/// After staging's flush: the identity of every staged file (`StagedIdentity`), or, with
/// `verify_from_media`, none, and the files' pages dropped so that `Verified` reads them
/// from the medium. Between here and `Verified` no process of ours writes them.
fn after_staging_flush(
    plan: &Plan,
    from_media: bool,
) -> Result<BTreeMap<String, crate::engine::known::StagedIdentity>> {
    use std::os::unix::fs::MetadataExt;
    let mut ids = BTreeMap::new();
    if !from_media {
        // Every staging write is done: once the coarse clock has passed this reading (a tick
        // at most, usually already over after the flush), each staged file's mtime is older
        // than any stamp a later write can get, so an unchanged mtime means unwritten.
        crate::observe::wait_past(crate::observe::precise_now());
    }
    for t in plan.targets.iter().filter(|t| !t.unchanged()) {
        let (NewState::File(nf), Some(hash)) = (&t.new, t.new.settled().and_then(|s| s.hash()))
        else {
            continue;
        };
        let tmp = fsutil::temp_path(Path::new(&t.path), plan.tx_id);
        if from_media {
            let f = std::fs::File::open(&tmp)
                .map_err(|e| Error::io(ErrorCode::DeploymentFailed, "open", &tmp, &e))?;
            // Clean pages only (after the flush): dropped, so the next read goes to the medium.
            nix::fcntl::posix_fadvise(
                &f,
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            )
            .map_err(|e| {
                Error::io(ErrorCode::DeploymentFailed, "fadvise", &tmp, &std::io::Error::from(e))
            })?;
            continue;
        }
        // Read before the stat: a write after it is stamped at or after this tick.
        let clock_before = crate::observe::coarse_now();
        let m = std::fs::symlink_metadata(&tmp)
            .map_err(|e| Error::io(ErrorCode::DeploymentFailed, "stat", &tmp, &e))?;
        let sig = crate::observe::signature(&m);
        if sig.size != nf.size {
            return Err(Error::new(
                ErrorCode::DeploymentFailed,
                format!("{} changed size after it was staged", tmp.display()),
            ));
        }
        if !crate::engine::known::StagedIdentity::settled(sig.mtime, clock_before) {
            // Written in this very tick after all (the wait above timed out, or the clock
            // stepped): `Verified` reads it instead.
            continue;
        }
        ids.insert(
            t.path.clone(),
            crate::engine::known::StagedIdentity {
                dev: sig.dev,
                ino: sig.ino,
                size: sig.size,
                mtime: sig.mtime,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                hash,
            },
        );
    }
    Ok(ids)
}

/// Removes every staged file of the plan, best effort (the undo removes any left over).
pub(super) fn discard_staged(plan: &Plan) {
    let _ = crate::parallel::try_map(&plan.targets, |t| {
        let _ = fsutil::remove_if_present(&fsutil::temp_path(Path::new(&t.path), plan.tx_id));
        Ok(())
    });
}

/// What to report if the loop stops with an error after the transaction was journaled.
pub(super) struct InterruptedSummary(TxReport);

pub(super) fn interrupted_summary(tx: &Transaction) -> InterruptedSummary {
    InterruptedSummary(report(&tx.rec, &tx.plan, Outcome::Committed))
}

impl InterruptedSummary {
    /// The loop stopped with the transaction in flight: a shutdown asked for between two
    /// phases (`shutdown`: an orderly stop, logged as such), or the journal (or the disk under
    /// it) failed.
    pub(super) fn with(mut self, error: Error, shutdown: bool) -> TxReport {
        if shutdown && error.code == ErrorCode::OperationInProgress {
            tracing::info!(tx = self.0.tx, reason = %error, "stopped between two steps for \
                shutdown; the next start or `tope-updater recover` resumes it");
        } else {
            tracing::error!(tx = self.0.tx, error = %error, "transaction interrupted; \
                `tope-updater recover` will finish it");
        }
        self.0.outcome = Outcome::Interrupted { error };
        self.0
    }
}

/// Whether an optional flag (shutdown, or a fleet server's cancel) is raised.
fn is_set(flag: Option<&std::sync::Arc<std::sync::atomic::AtomicBool>>) -> bool {
    flag.is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
}

/// Staging's second pass: the pieces of every split target, all in one pool; then each split
/// target finished with its merged hash. Returns the new hash of every target, in order.
fn stage_split_pieces(
    first: Vec<Staging>,
    targets: &[Target],
    progress: &dyn Fn(&Target),
) -> Result<Vec<Option<crate::engine::Hash>>> {
    let lens: Vec<Option<u64>> = first
        .iter()
        .map(|s| if let Staging::Split(split) = s { Some(split.size) } else { None })
        .collect();
    let merged = crate::treehash::hash_split(&lens, |i, off, len| match &first[i] {
        Staging::Split(split) => split.copy_piece(off, len),
        Staging::Done(_) => Err(Error::internal("piece of a target staged whole")),
    })?;
    let mut hashes = Vec::with_capacity(first.len());
    for ((s, t), merged) in first.into_iter().zip(targets).zip(merged) {
        hashes.push(match (s, merged) {
            (Staging::Done(h), _) => h,
            (Staging::Split(split), Some(h)) => {
                split.finish(t, h)?;
                progress(t);
                Some(h)
            }
            (Staging::Split(_), None) => {
                return Err(Error::internal("a split target without its hash"));
            }
        });
    }
    Ok(hashes)
}
