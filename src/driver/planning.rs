//! Planning: from a package (install) or a kept generation (rollback) to a `Plan`, with every
//! check that must pass before anything is journaled.

use crate::config::ServiceManager;
use crate::engine::generation::{self, Generation};
use crate::engine::plan::{ModulePlan, PackageRef, PatchRef};
use crate::engine::{NewFile, NewState, PathState, Plan, RollbackTarget, Source, Target, TxKind};
use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;
use crate::manifest::{Manifest, Patch};
use crate::package::{Content, DeployFile, Package};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::{InstallOptions, Journal, RollbackTo, TxReport, Updater, path_string};

impl Updater {
    pub fn install(&mut self, package: &Path, opts: &InstallOptions) -> Result<TxReport> {
        self.refuse_if_in_flight()?;
        let started = std::time::Instant::now();
        let mut pkg = Package::open(package, &self.cfg, &self.roots)?;
        tracing::debug!(
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            files = pkg.files.len(),
            "package validated"
        );
        let (_, current) = self.current_generation()?;
        self.check_acceptable(&pkg, current.as_ref(), opts)?;
        let dsts: Vec<String> =
            pkg.files.iter().map(|f| path_string(&f.dst)).collect::<Result<_>>()?;
        let olds = self.observe_old(&dsts.iter().map(String::as_str).collect::<Vec<_>>())?;
        let blake3 = pkg.identity()?;
        self.check_not_failed_before(&blake3, opts)?;
        let m = &pkg.manifest;
        let (euid, egid) = (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw());
        let mut targets = Vec::with_capacity(pkg.files.len());
        for ((f, old), path) in pkg.files.iter().zip(olds).zip(dsts) {
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
            let source = match &f.content {
                Content::Entry => Source::Package { entry: f.entry.clone() },
                Content::Delta { patches } => self.delta_source(f, patches, &old, m)?,
            };
            targets.push(Target { path, module: f.module, old, new: NewState::File(new), source });
        }
        targets.sort_by(|a, b| a.path.cmp(&b.path));
        let mut plan = Plan {
            tx_id: self.journal.next_tx_id()?,
            kind: TxKind::Install {
                package: PackageRef { path: path_string(&pkg.path)?, blake3, size: pkg.size },
            },
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
        self.decide_service_work(&mut plan)?;
        self.check_free_space(&plan)?;
        tracing::debug!(elapsed_ms = started.elapsed().as_secs_f64() * 1e3, "planned");
        self.start(plan, Some(pkg))
    }

    /// Where a file of a delta package comes from: content with its own hash (the live file,
    /// then a backup blob), else a patch whose base is the live file, else one whose base is
    /// a backup blob. The live file is the target's old content, which nothing changes before
    /// the swap (staging, which reads it, always precedes it); whatever is read, staging
    /// checks the result against the pinned hash.
    fn delta_source(
        &self,
        f: &DeployFile,
        patches: &[(Patch, u64)],
        old: &PathState,
        m: &Manifest,
    ) -> Result<Source> {
        let target = f.expected.ok_or_else(|| {
            Error::internal(format!("{}: a delta file without its hash", f.dst.display()))
        })?;
        let live = old.hash();
        let patch = |p: &Patch, size: u64| Some(PatchRef { entry: p.entry.clone(), size });
        if live == Some(target) {
            return Ok(Source::Delta { base: target, live: true, patch: None });
        }
        if self.store.has(&target) {
            return Ok(Source::Delta { base: target, live: false, patch: None });
        }
        if let Some((p, size)) = patches.iter().find(|(p, _)| live == Some(p.base)) {
            return Ok(Source::Delta { base: p.base, live: true, patch: patch(p, *size) });
        }
        if let Some((p, size)) = patches.iter().find(|(p, _)| self.store.has(&p.base)) {
            return Ok(Source::Delta { base: p.base, live: false, patch: patch(p, *size) });
        }
        let from = m
            .delta
            .as_ref()
            .map(|d| d.from_versions.join(", "))
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "its base".into());
        Err(Error::new(
            ErrorCode::DeltaBaseMissing,
            format!(
                "{}: this delta package builds it from the content of {from} ({}) or finds its \
                new content ({}), and this device holds neither, there or in its backups (the \
                file holds {}); nothing was changed: install the full package of version {}",
                f.dst.display(),
                if patches.is_empty() {
                    "no patch".to_string()
                } else {
                    patches.iter().map(|(p, _)| p.base.to_hex()).collect::<Vec<_>>().join(" or ")
                },
                target.to_hex(),
                live.map_or("nothing".to_string(), |h| h.to_hex()),
                m.version
            ),
        ))
    }

    /// What the targets hold before the transaction: hashes from the known-file records
    /// where the stat signature still matches exactly, read (on every core) otherwise.
    fn observe_old(&self, paths: &[&str]) -> Result<Vec<PathState>> {
        let records = self.journal.known_files(paths.iter().copied())?;
        let seen = crate::observe::observe_all(paths, crate::observe::Source::Records(&records))?;
        let trusted = seen.iter().filter(|o| o.unread).count();
        tracing::debug!(
            paths = paths.len(),
            from_records = trusted,
            read = seen.len() - trusted,
            "old states observed"
        );
        Ok(seen.into_iter().map(|o| o.state).collect())
    }

    /// Which optional phases the plan has: service control when a module names a service and
    /// a backend is configured, post commands when a module has any (install only: a
    /// rollback plan has none). Refuses, before anything is touched, services the backend
    /// could not start again.
    fn decide_service_work(&self, plan: &mut Plan) -> Result<()> {
        let services = crate::engine::services::start_order(&plan.modules);
        plan.controls_services =
            !services.is_empty() && self.cfg.service_manager != ServiceManager::None;
        plan.runs_post_cmds = !crate::engine::services::post_commands(plan).is_empty();
        if plan.controls_services {
            self.services.check_startable(&services)?;
        }
        Ok(())
    }

    /// Version, compatibility and no-loop rules (SPEC §2, §3).
    pub(super) fn check_acceptable(
        &self,
        pkg: &Package,
        current: Option<&Generation>,
        opts: &InstallOptions,
    ) -> Result<()> {
        let m = &pkg.manifest;
        if let Some(want) = &opts.version
            && *want != m.version.to_string()
        {
            return Err(Error::new(
                ErrorCode::VersionMismatch,
                format!("package is version {}, caller asked for {want}", m.version),
            ));
        }
        if let Some(c) = &m.compatible {
            match &self.cfg.compatible {
                Some(mine) if mine == c => {}
                Some(mine) => {
                    return Err(Error::new(
                        ErrorCode::Incompatible,
                        format!("package is for {c:?}, this device is {mine:?}"),
                    ));
                }
                None => {
                    return Err(Error::new(
                        ErrorCode::Incompatible,
                        format!(
                            "package is for {c:?}, and this device has no `compatible` configured"
                        ),
                    ));
                }
            }
        }
        if let Some(cur) = current {
            let cur_v = crate::version::Version::parse(&cur.version)?;
            if m.version < cur_v && !opts.allow_downgrade {
                return Err(Error::new(
                    ErrorCode::VersionMismatch,
                    format!(
                        "package {} is older than installed {}; use --allow-downgrade",
                        m.version, cur.version
                    ),
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
            tracing::warn!(%min, "min_from_version set but no installed version is recorded \
                (factory baseline); accepting");
        }
        Ok(())
    }

    /// The no-loop rule (SPEC §3): a package whose install was rolled back needs `--force`.
    pub(super) fn check_not_failed_before(
        &self,
        blake3: &crate::engine::Hash,
        opts: &InstallOptions,
    ) -> Result<()> {
        if let Some(tx) = self.journal.failed_package(blake3)?
            && !opts.force
        {
            return Err(Error::new(
                ErrorCode::ValidationError,
                format!(
                    "this package ({blake3}) was installed by transaction {tx} and rolled back; \
                    use --force to try it again"
                ),
            ));
        }
        Ok(())
    }

    /// statvfs preflight: new content beside every target, plus copies of old content when
    /// the backup store is on another filesystem (hard links cost nothing).
    pub(super) fn check_free_space(&self, plan: &Plan) -> Result<()> {
        let store_dev = fsutil::device_of(self.store.dir())?;
        // Space is allocated in blocks, and thousands of small files waste most of their last
        // block: count whole blocks, or the preflight passes and staging hits ENOSPC.
        let mut need: BTreeMap<u64, Need> = BTreeMap::new();
        let mut dev_of_parent: BTreeMap<&Path, u64> = BTreeMap::new();
        // The state filesystem also takes the plan twice (journal and plan copy) and the
        // journal's growth; a generous per-target estimate plus the fixed reserve.
        need.entry(store_dev).or_insert_with(|| Need::at(self.store.dir())).bytes +=
            plan.targets.len() as u64 * PLAN_BYTES_PER_TARGET;
        for t in &plan.targets {
            let p = Path::new(&t.path);
            let parent = p.parent().unwrap_or(p);
            let dev = match dev_of_parent.get(parent) {
                Some(d) => *d,
                None => *dev_of_parent.entry(parent).or_insert(fsutil::device_of(p)?),
            };
            if let (NewState::File(f), false) = (t.new, t.unchanged()) {
                need.entry(dev).or_insert_with(|| Need::at(p)).add_file(f.size);
            }
            if let (PathState::File(o), true) = (t.old, dev != store_dev) {
                need.entry(store_dev)
                    .or_insert_with(|| Need::at(self.store.dir()))
                    .add_file(o.size);
            }
        }
        for n in need.values() {
            let (avail, block) = fsutil::available_bytes_and_block(&n.anchor)?;
            let bytes = n.bytes
                + n.files * block.saturating_sub(1)
                + crate::limits::FREE_SPACE_RESERVE_BYTES;
            let bytes = bytes.next_multiple_of(block.max(1));
            if avail < bytes {
                return Err(Error::new(
                    ErrorCode::DiskFull,
                    format!(
                        "{} needs {bytes} bytes (whole blocks), {avail} available",
                        fsutil::existing_ancestor(&n.anchor).display()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// How a rollback puts back `want` at `path`: from its backup blob, or by removing the
    /// file. `None`: nothing to do, because the blob is missing for a file no transaction
    /// changed between the two generations (`current_state` is `want` too).
    fn restore(
        &self,
        path: &str,
        want: &PathState,
        current_state: impl FnOnce() -> PathState,
    ) -> Result<Option<(NewState, Source)>> {
        let m = match want {
            PathState::Absent => return Ok(Some((NewState::Absent, Source::Nothing))),
            PathState::File(m) => m,
        };
        if !self.store.has(&m.hash) {
            if current_state() == *want {
                // No transaction between the two generations changed this path (an install
                // that kept a file's content keeps no backup of it): it was edited by hand
                // since. A rollback reverses transactions; it leaves that edit, which `verify`
                // reports, rather than fail as a whole.
                tracing::warn!(
                    path,
                    "edited since it was installed, and no backup holds its recorded content: \
                    left as it is"
                );
                return Ok(None);
            }
            return Err(Error::new(
                ErrorCode::RollbackFailed,
                format!("the backup of {path} ({}) is missing; nothing was changed", m.hash),
            ));
        }
        let file =
            NewFile { hash: Some(m.hash), size: m.size, mode: m.mode, uid: m.uid, gid: m.gid };
        Ok(Some((NewState::File(file), Source::Blob)))
    }

    pub fn rollback(&mut self, to: &RollbackTo) -> Result<TxReport> {
        self.refuse_if_in_flight()?;
        let (gens, current) = self.current_generation()?;
        let factory = self.journal.factory()?;
        let (target, rollback_to) = rollback_target(&gens, current.as_ref(), to)?;
        let managed: Vec<&str> =
            generation::managed_paths(current.as_ref(), &factory).into_iter().collect();
        let observed = self.observe_old(&managed)?;
        let mut targets = Vec::new();
        for (path, have) in managed.into_iter().zip(observed) {
            let want = generation::desired_state(path, target, &factory);
            if have == want {
                continue;
            }
            let current_state = || generation::desired_state(path, current.as_ref(), &factory);
            let Some((new, source)) = self.restore(path, &want, current_state)? else { continue };
            targets.push(Target { path: path.to_string(), module: 0, old: have, new, source });
        }
        let paths: Vec<&str> = targets.iter().map(|t| t.path.as_str()).collect();
        let (modules, owner) = generation::rollback_modules(&paths, current.as_ref(), target);
        for (t, m) in targets.iter_mut().zip(owner) {
            t.module = m;
        }
        let mut plan = Plan {
            tx_id: self.journal.next_tx_id()?,
            kind: TxKind::Rollback { to: rollback_to },
            from_version: current.as_ref().map(|g| g.version.clone()),
            to_version: target.map(|g| g.version.clone()),
            modules,
            created_dirs: missing_dirs(&targets),
            removed_dirs: generation::dirs_to_remove(current.as_ref(), target),
            targets,
            controls_services: false,
            runs_post_cmds: false,
        };
        self.decide_service_work(&mut plan)?;
        self.check_free_space(&plan)?;
        self.start(plan, None)
    }
}

/// Which kept generation (`None`: the factory baseline) `to` names, or `NOTHING_TO_ROLL_BACK`.
pub(super) fn rollback_target<'a>(
    gens: &'a [Generation],
    current: Option<&Generation>,
    to: &RollbackTo,
) -> Result<(Option<&'a Generation>, RollbackTarget)> {
    let nothing = |m: String| Error::new(ErrorCode::NothingToRollBack, m);
    match to {
        RollbackTo::Previous => {
            let cur = current.ok_or_else(|| {
                nothing("nothing installed: already at the factory baseline".into())
            })?;
            match cur.parent {
                None => Ok((None, RollbackTarget::Factory)),
                Some(p) => {
                    let g = gens.iter().find(|g| g.id == p).ok_or_else(|| {
                        nothing(format!(
                            "the previous generation ({p}) is no longer kept; use --to factory"
                        ))
                    })?;
                    Ok((Some(g), RollbackTarget::Generation(g.id)))
                }
            }
        }
        RollbackTo::Factory => {
            if current.is_none() {
                return Err(nothing("already at the factory baseline".into()));
            }
            Ok((None, RollbackTarget::Factory))
        }
        RollbackTo::Version(v) => {
            let g = gens
                .iter()
                .rev()
                .find(|g| g.version == *v && Some(g.id) != current.map(|c| c.id))
                .ok_or_else(|| {
                    nothing(format!(
                        "no kept generation other than the current one has version {v}"
                    ))
                })?;
            Ok((Some(g), RollbackTarget::Generation(g.id)))
        }
    }
}

/// Whether `rollback --to` has somewhere to go (the daemon answers 404 up front).
pub fn check_rollback_target(journal: &Journal, to: &RollbackTo) -> Result<()> {
    let gens = journal.generations()?;
    let id = journal.current_generation_id()?;
    let current = gens.iter().find(|g| Some(g.id) == id);
    rollback_target(&gens, current, to).map(|_| ())
}

/// Ancestors of new files that do not exist yet, parents first.
pub(super) fn missing_dirs(targets: &[Target]) -> Vec<String> {
    let mut dirs = BTreeSet::new();
    // Thousands of targets share a few parents: each directory is looked at once.
    let mut existing: BTreeSet<&Path> = BTreeSet::new();
    for t in targets.iter().filter(|t| matches!(t.new, NewState::File(_))) {
        let mut p = Path::new(&t.path).parent();
        while let Some(dir) = p {
            if existing.contains(dir) || dirs.contains(dir.to_str().unwrap_or_default()) {
                break;
            }
            if std::fs::symlink_metadata(dir).is_ok() {
                existing.insert(dir);
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

/// Journal and plan-copy bytes reserved per target by the free-space preflight (a target
/// encodes to about 150 bytes; redb's copy-on-write pages and the copy double it, twice).
const PLAN_BYTES_PER_TARGET: u64 = 1024;

/// Space one filesystem needs: bytes of content plus one partial block per file.
struct Need {
    anchor: PathBuf,
    bytes: u64,
    files: u64,
}

impl Need {
    fn at(anchor: &Path) -> Need {
        Need { anchor: anchor.to_path_buf(), bytes: 0, files: 0 }
    }

    fn add_file(&mut self, size: u64) {
        self.bytes += size;
        self.files += 1;
    }
}
