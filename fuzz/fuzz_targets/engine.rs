//! The pure engine under arbitrary operation sequences, with its invariants checked after
//! every step:
//!
//! - `Transaction`: a transaction of a random shape starting at `Planned`, driven by
//!   Done/Failed/OperatorRetry events and by recovery runs (`decide` with random policy and
//!   inputs, applied the way `Driver::recover` applies it).
//! - `Decide`: `recovery::decide` on any phase and any attempt counts.
//! - `Actions`: `plan::swap_action` / `plan::restore_action`, applied to a one-path model and
//!   asked again (resuming after a crash must find nothing left to do).
//! - `History`: installs and rollbacks against a model device, using `generation::*` the way
//!   the driver does; after a rollback the device must equal its snapshot of the target.
//! - `Dirs`: `desired_state` and `dirs_to_remove` on arbitrary small generations.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::collections::{BTreeMap, BTreeSet};
use tope_updater::config::RecoveryPolicy;
use tope_updater::engine::generation::{self, Factory, Generation};
use tope_updater::engine::phase::{Event, Phase, Shape, transition};
use tope_updater::engine::plan::{
    FileMeta, Hash, NewFile, NewState, PackageRef, PathState, Plan, RestoreAction, Source, SwapAction, Target, TxKind, restore_action,
    swap_action,
};
use tope_updater::engine::recovery::{Decision, Inputs, decide};

#[derive(Arbitrary, Debug)]
enum Case {
    Transaction { controls_services: bool, runs_post_cmds: bool, max_attempts: u8, steps: Vec<Step> },
    Decide { phase: u8, attempts: u32, max_attempts: u32, rollback_policy: bool, missing: Option<String> },
    Actions { old: Option<AMeta>, current: Option<Option<AMeta>>, new: ANew, staged: bool },
    History { initial: Vec<(u8, AMeta)>, keep: u8, ops: Vec<HistOp> },
    Dirs { current: Option<AGen>, target: Option<AGen>, factory: Vec<(String, Option<AMeta>)>, probes: Vec<String> },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Step {
    Done,
    Failed,
    OperatorRetry,
    Recover { retry: bool, rollback_policy: bool, inputs_missing: bool },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct AMeta {
    hash: u8,
    mode: u16,
    uid: u8,
    gid: u8,
}

impl AMeta {
    fn meta(self) -> FileMeta {
        // Content determines size: one hash, one size.
        FileMeta {
            hash: Hash([self.hash; 32]),
            size: self.hash as u64 * 7,
            mode: self.mode as u32 & 0o7777,
            uid: self.uid as u32,
            gid: self.gid as u32,
        }
    }
}

fn state(m: Option<AMeta>) -> PathState {
    m.map_or(PathState::Absent, |m| PathState::File(m.meta()))
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum ANew {
    Absent,
    File { meta: AMeta, hash_known: bool },
}

impl ANew {
    fn new_state(self) -> NewState {
        match self {
            ANew::Absent => NewState::Absent,
            ANew::File { meta, hash_known } => {
                let m = meta.meta();
                NewState::File(NewFile { hash: hash_known.then_some(m.hash), size: m.size, mode: m.mode, uid: m.uid, gid: m.gid })
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
struct AGen {
    files: Vec<(String, AMeta)>,
    dirs: Vec<String>,
}

impl AGen {
    fn generation(&self, id: u64) -> Generation {
        Generation {
            id,
            version: "1.0.0".into(),
            tx_id: id,
            parent: None,
            files: self.files.iter().map(|(p, m)| (p.clone(), m.meta())).collect(),
            dirs: self.dirs.iter().cloned().collect(),
            services: Default::default(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum HistOp {
    Install(Vec<(u8, AMeta)>),
    RollbackPrevious,
    RollbackFactory,
    RollbackTo(u8),
}

fuzz_target!(|case: Case| match case {
    Case::Transaction { controls_services, runs_post_cmds, max_attempts, steps } => {
        transaction(Shape { controls_services, runs_post_cmds }, max_attempts as u32 % 8 + 1, &steps)
    }
    Case::Decide { phase, attempts, max_attempts, rollback_policy, missing } => {
        let inputs = missing.map_or(Inputs::Available, Inputs::Missing);
        check_decision(Phase::ALL[phase as usize % 12], attempts, max_attempts, policy(rollback_policy), &inputs);
    }
    Case::Actions { old, current, new, staged } => actions(state(old), current.map(state), new.new_state(), staged),
    Case::History { initial, keep, ops } => history(&initial, keep as usize % 4 + 1, &ops),
    Case::Dirs { current, target, factory, probes } => dirs(current.as_ref(), target.as_ref(), &factory, &probes),
});

fn policy(rollback: bool) -> RecoveryPolicy {
    if rollback { RecoveryPolicy::Rollback } else { RecoveryPolicy::Resume }
}

// ---- phases and recovery ----

fn is_forward(p: Phase) -> bool {
    p <= Phase::Committed
}

/// The forward phases a transaction of this shape journals, in order.
fn forward_path(shape: Shape) -> Vec<Phase> {
    Phase::ALL[..9]
        .iter()
        .copied()
        .filter(|p| match p {
            Phase::ServicesStopped | Phase::ServicesStarted => shape.controls_services,
            Phase::PostCommands => shape.runs_post_cmds,
            _ => true,
        })
        .collect()
}

struct Tx {
    shape: Shape,
    max_attempts: u32,
    phase: Phase,
    phases: Vec<Phase>,
    attempts: u32,
    retries: u32,
}

impl Tx {
    fn enter(&mut self, next: Phase) {
        self.phase = next;
        self.phases.push(next);
    }

    /// One event, checking the transition table's promises.
    fn event(&mut self, ev: Event) -> Option<Phase> {
        let from = self.phase;
        let r = transition(from, ev, self.shape);
        match (from, ev) {
            // Confirmation is the operator's, after the commit (no step generates it here).
            (Phase::Committed, Event::Confirmed) => assert_eq!(r, Ok(Phase::Confirmed)),
            (_, Event::Confirmed) | (Phase::Confirmed, _) => assert!(r.is_err(), "{from:?} on {ev:?}: {r:?}"),
            (Phase::Committed | Phase::RolledBack, _) => assert!(r.is_err(), "transition out of {from:?} on {ev:?}: {r:?}"),
            (Phase::RollbackFailed, Event::GaveUp) => assert!(r.is_err(), "gave up twice: {r:?}"),
            (_, Event::GaveUp) => assert_eq!(r, Ok(Phase::RollbackFailed), "giving up in {from:?}"),
            (Phase::RollbackFailed, Event::OperatorRetry) => assert_eq!(r, Ok(Phase::RollingBack)),
            (Phase::RollbackFailed, _) => assert!(r.is_err(), "{from:?} on {ev:?}: {r:?}"),
            (_, Event::OperatorRetry) => assert!(r.is_err(), "operator retry accepted in {from:?}"),
            (Phase::RollingBack, Event::Failed) => assert_eq!(r, Ok(Phase::RollbackFailed)),
            (_, Event::Failed) => assert_eq!(r, Ok(Phase::RollingBack), "failure in {from:?}"),
            (Phase::RollingBack, Event::Done) => assert_eq!(r, Ok(Phase::RolledBack)),
            (_, Event::Done) => {
                let path = forward_path(self.shape);
                let i = path.iter().position(|p| *p == from).expect("a forward phase the shape skips was entered");
                assert_eq!(r, Ok(path[i + 1]), "Done in {from:?} with {:?}", self.shape);
            }
        }
        if let Ok(next) = r {
            if ev == Event::Failed {
                assert!(matches!(next, Phase::RollingBack | Phase::RollbackFailed), "Failed led to {next:?}");
            }
            if ev == Event::OperatorRetry {
                self.attempts = 0;
                self.retries += 1;
            }
            self.enter(next);
        }
        r.ok()
    }

    /// `Driver::recover`, minus the I/O.
    fn recover(&mut self, retry: bool, policy: RecoveryPolicy, inputs: &Inputs) {
        if matches!(self.phase, Phase::Committed | Phase::RolledBack) {
            // Not in flight: `active()` finds nothing. decide agrees.
            assert_eq!(decide(self.phase, self.attempts + 1, self.max_attempts, policy, inputs), Decision::Nothing);
            return;
        }
        if self.phase == Phase::RollbackFailed {
            assert_eq!(decide(self.phase, self.attempts + 1, self.max_attempts, policy, inputs), Decision::Nothing);
            if !retry {
                return;
            }
            self.event(Event::OperatorRetry).expect("operator retry refused");
        }
        self.attempts += 1;
        let d = check_decision(self.phase, self.attempts, self.max_attempts, policy, inputs);
        match d {
            Decision::Nothing => unreachable!("in-flight transaction, decision Nothing"),
            Decision::Resume => {}
            Decision::RollBack { .. } => {
                if self.phase != Phase::RollingBack {
                    assert_eq!(self.event(Event::Failed), Some(Phase::RollingBack));
                }
            }
            Decision::GiveUp { .. } => assert_eq!(self.event(Event::GaveUp), Some(Phase::RollbackFailed)),
        }
    }

    fn check(&self) {
        assert_eq!(self.phases.last(), Some(&self.phase));
        let forward: Vec<Phase> = self.phases.iter().copied().filter(|p| is_forward(*p)).collect();
        assert!(forward.len() <= 12, "{} forward phases journaled", forward.len());
        // The forward phases are a prefix of the shape's path: none repeated, none skipped.
        let path = forward_path(self.shape);
        assert!(path.starts_with(&forward), "forward phases {forward:?} are not a prefix of {path:?}");
        // Once a rollback began, nothing goes forward again; terminal phases end the list.
        if let Some(i) = self.phases.iter().position(|p| !is_forward(*p)) {
            assert!(self.phases[i..].iter().all(|p| !is_forward(*p)), "forward phase after a rollback: {:?}", self.phases);
        }
        for (i, p) in self.phases.iter().enumerate() {
            if matches!(p, Phase::Committed | Phase::RolledBack) {
                assert_eq!(i + 1, self.phases.len(), "{p:?} is not the last phase: {:?}", self.phases);
            }
        }
        // At most 12 journaled phases per transaction, plus two per operator retry.
        assert!(self.phases.len() as u32 <= 10 + 2 * self.retries, "{} phases: {:?}", self.phases.len(), self.phases);
        // Recovery never loops: once attempts pass the maximum, the transaction stops.
        assert!(self.attempts <= self.max_attempts + 1);
        if self.attempts > self.max_attempts {
            assert!(self.phase.is_terminal(), "{} attempts and still {:?}", self.attempts, self.phase);
        }
        assert_eq!(self.phase.has_swapped(), is_forward(self.phase) && self.phase >= Phase::Swapped);
    }
}

fn transaction(shape: Shape, max_attempts: u32, steps: &[Step]) {
    let mut tx = Tx { shape, max_attempts, phase: Phase::Planned, phases: vec![Phase::Planned], attempts: 0, retries: 0 };
    tx.check();
    for step in steps.iter().take(256) {
        match *step {
            Step::Done => drop(tx.event(Event::Done)),
            Step::Failed => drop(tx.event(Event::Failed)),
            Step::OperatorRetry => drop(tx.event(Event::OperatorRetry)),
            Step::Recover { retry, rollback_policy, inputs_missing } => {
                let inputs = if inputs_missing { Inputs::Missing("gone".into()) } else { Inputs::Available };
                tx.recover(retry, policy(rollback_policy), &inputs)
            }
        }
        tx.check();
    }
}

fn check_decision(phase: Phase, attempts: u32, max: u32, policy: RecoveryPolicy, inputs: &Inputs) -> Decision {
    let d = decide(phase, attempts, max, policy, inputs);
    if phase.is_terminal() {
        assert_eq!(d, Decision::Nothing, "{phase:?}");
        return d;
    }
    assert_ne!(d, Decision::Nothing, "in-flight {phase:?} got Nothing");
    assert_eq!(matches!(d, Decision::GiveUp { .. }), attempts > max, "{phase:?} attempts {attempts} max {max}: {d:?}");
    if phase == Phase::RollingBack {
        assert!(d != Decision::Resume, "Resume for RollingBack");
    }
    let resumable = phase != Phase::RollingBack && attempts <= max && *inputs == Inputs::Available && policy == RecoveryPolicy::Resume;
    assert_eq!(d == Decision::Resume, resumable, "{phase:?} {attempts}/{max} {policy:?} {inputs:?}: {d:?}");
    d
}

// ---- per-path actions ----

fn actions(old: PathState, current: Option<PathState>, new: NewState, staged: bool) {
    // Rollback of one path: afterwards it holds its old state, and asking again finds nothing.
    let now = current.unwrap_or(PathState::Absent);
    let a = restore_action(&old, &now);
    assert_eq!(a == RestoreAction::Nothing, old == now, "{old:?} {now:?}: {a:?}");
    let after = match a {
        RestoreAction::Nothing => now,
        RestoreAction::Remove => {
            assert_eq!(old, PathState::Absent);
            PathState::Absent
        }
        RestoreAction::Restore => {
            assert!(matches!(old, PathState::File(_)));
            old
        }
    };
    assert_eq!(after, old);
    assert_eq!(restore_action(&old, &after), RestoreAction::Nothing);

    // Swap of one path.
    let a = swap_action(&new, staged, current.as_ref());
    let want = new.settled();
    match new {
        NewState::Absent => {
            assert_eq!(a == SwapAction::Done, current == Some(PathState::Absent), "{current:?}: {a:?}");
            assert!(matches!(a, SwapAction::Done | SwapAction::Remove));
        }
        NewState::File(_) if staged => assert_eq!(a, SwapAction::Rename),
        NewState::File(_) => {
            assert_eq!(a == SwapAction::Done, want.is_some() && want == current, "{want:?} {current:?}: {a:?}");
            assert!(matches!(a, SwapAction::Done | SwapAction::Lost));
        }
    }
    // After the action (a crash right after it), a resumed swap finds the work done.
    let after = match a {
        SwapAction::Rename | SwapAction::Remove | SwapAction::Done => want,
        SwapAction::Lost => return,
    };
    if let Some(after) = after {
        assert_eq!(swap_action(&new, false, Some(&after)), SwapAction::Done, "{new:?} after {a:?}");
    }
}

// ---- generations ----

const DIRS: [&str; 6] = ["/r", "/r/a", "/r/a/b", "/r/a/b/c", "/r/b", "/r/b/a"];
/// Directories present before any transaction.
const FACTORY_DIRS: [&str; 2] = ["/r", "/r/a"];

fn file_path(i: u8) -> String {
    format!("{}/{}", DIRS[(i as usize / 2) % DIRS.len()], if i.is_multiple_of(2) { "x" } else { "y" })
}

fn parent(p: &str) -> &str {
    &p[..p.rfind('/').unwrap()]
}

#[derive(Clone, PartialEq, Debug)]
struct Device {
    files: BTreeMap<String, PathState>,
    dirs: BTreeSet<String>,
}

impl Device {
    fn get(&self, p: &str) -> PathState {
        self.files.get(p).copied().unwrap_or(PathState::Absent)
    }

    fn set(&mut self, p: &str, s: PathState) {
        match s {
            PathState::Absent => drop(self.files.remove(p)),
            PathState::File(_) => {
                assert!(self.dirs.contains(parent(p)), "{p}: parent directory missing");
                self.files.insert(p.to_string(), s);
            }
        }
    }

    /// Directories missing on the way to `p`, parents first.
    fn missing_dirs(&self, p: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut d = parent(p);
        while !self.dirs.contains(d) {
            out.push(d.to_string());
            d = parent(d);
        }
        out.reverse();
        out
    }

    fn is_empty_dir(&self, d: &str) -> bool {
        let prefix = format!("{d}/");
        !self.files.keys().chain(self.dirs.iter()).any(|p| p.starts_with(&prefix))
    }
}

fn plan(tx_id: u64, kind: TxKind, targets: Vec<Target>, created_dirs: Vec<String>, removed_dirs: Vec<String>) -> Plan {
    Plan {
        tx_id,
        kind,
        from_version: None,
        to_version: Some(format!("{tx_id}.0.0")),
        modules: Vec::new(),
        targets,
        created_dirs,
        removed_dirs,
        controls_services: false,
        runs_post_cmds: false,
    }
}

struct Model {
    device: Device,
    factory: Factory,
    gens: Vec<Generation>,
    current: Option<u64>,
    /// The device right after each generation was committed, and before anything.
    snapshots: BTreeMap<u64, Device>,
    initial: Device,
    next_tx: u64,
    keep: usize,
}

impl Model {
    fn current_gen(&self) -> Option<&Generation> {
        self.current.map(|id| self.gens.iter().find(|g| g.id == id).expect("current generation not kept"))
    }

    fn install(&mut self, targets: &[(u8, AMeta)]) {
        let tx_id = self.next_tx;
        self.next_tx += 1;
        let wanted: BTreeMap<String, FileMeta> = targets.iter().take(16).map(|(i, m)| (file_path(*i), m.meta())).collect();
        let mut created = Vec::new();
        let mut probe = self.device.clone();
        for p in wanted.keys() {
            for d in probe.missing_dirs(p) {
                probe.dirs.insert(d.clone());
                created.push(d);
            }
        }
        let targets: Vec<Target> = wanted
            .iter()
            .map(|(p, m)| Target {
                path: p.clone(),
                module: 0,
                old: self.device.get(p),
                new: NewState::File(NewFile { hash: Some(m.hash), size: m.size, mode: m.mode, uid: m.uid, gid: m.gid }),
                source: Source::Package { entry: p.clone() },
            })
            .collect();
        let package = PackageRef { path: "/p.zip".into(), blake3: Hash([0; 32]), size: 0 };
        let plan = plan(tx_id, TxKind::Install { package }, targets, created, Vec::new());
        assert!(plan.new_hashes_known());
        // Swap.
        self.device.dirs.extend(plan.created_dirs.iter().cloned());
        for t in &plan.targets {
            self.device.set(&t.path, t.new.settled().unwrap());
        }
        // Commit effects, as `Driver::commit_effects` computes them.
        let prev = self.current_gen().cloned();
        let g = generation::after_install(prev.as_ref(), tx_id, &plan, &format!("{tx_id}.0.0")).expect("hashes known");
        assert_eq!(g.parent, prev.as_ref().map(|g| g.id));
        for t in &plan.targets {
            assert_eq!(Some(PathState::File(g.files[&t.path])), t.new.settled());
        }
        if let Some(prev) = &prev {
            assert!(prev.files.keys().all(|p| g.files.contains_key(p)), "install dropped a file");
            assert!(prev.dirs.is_subset(&g.dirs));
        }
        assert!(plan.created_dirs.iter().all(|d| g.dirs.contains(d)));
        let additions = generation::factory_additions(&self.factory, &plan);
        for (p, s) in &additions {
            assert!(!self.factory.contains_key(p));
            assert_eq!(*s, self.initial.get(p), "factory state of {p} is not what it held before any transaction");
        }
        self.factory.extend(additions);
        assert!(generation::factory_additions(&self.factory, &plan).is_empty());
        let mut ids: Vec<u64> = self.gens.iter().map(|g| g.id).collect();
        ids.push(g.id);
        let drop = generation::prune(&ids, self.keep);
        assert_eq!(drop.len(), ids.len().saturating_sub(self.keep));
        assert_eq!(drop[..], ids[..drop.len()], "prune drops the oldest");
        assert!(!drop.contains(&g.id));
        self.gens.push(g);
        self.gens.retain(|g| !drop.contains(&g.id));
        self.current = Some(tx_id);
        self.snapshots.insert(tx_id, self.device.clone());
    }

    /// `Driver::rollback` planning and its commit effects; `None` target = factory.
    fn rollback(&mut self, target: Option<u64>) {
        let tx_id = self.next_tx;
        self.next_tx += 1;
        let current = self.current_gen().cloned();
        let target_gen = target.map(|id| self.gens.iter().find(|g| g.id == id).unwrap().clone());
        let mut targets = Vec::new();
        for path in generation::managed_paths(current.as_ref(), &self.factory) {
            let want = generation::desired_state(path, target_gen.as_ref(), &self.factory);
            let have = self.device.get(path);
            if have == want {
                continue;
            }
            let new = match want {
                PathState::Absent => NewState::Absent,
                PathState::File(m) => NewState::File(NewFile { hash: Some(m.hash), size: m.size, mode: m.mode, uid: m.uid, gid: m.gid }),
            };
            targets.push(Target { path: path.to_string(), module: 0, old: have, new, source: Source::Blob });
        }
        let removed = generation::dirs_to_remove(current.as_ref(), target_gen.as_ref());
        check_dirs_to_remove(current.as_ref(), target_gen.as_ref(), &removed);
        let kind = TxKind::Rollback {
            to: target.map_or(tope_updater::engine::RollbackTarget::Factory, tope_updater::engine::RollbackTarget::Generation),
        };
        let plan = plan(tx_id, kind, targets, Vec::new(), removed);
        // Every blob the rollback needs is kept.
        let blobs = generation::referenced_blobs(&self.gens, &self.factory);
        for t in &plan.targets {
            if let Some(PathState::File(m)) = t.new.settled() {
                assert!(blobs.contains(&m.hash), "{}: blob {:?} needed by the rollback is not referenced", t.path, m.hash);
            }
        }
        // Swap, then remove emptied directories in the planned order.
        for t in &plan.targets {
            let s = t.new.settled().unwrap();
            if let PathState::File(_) = s {
                for d in self.device.missing_dirs(&t.path) {
                    self.device.dirs.insert(d);
                }
            }
            self.device.set(&t.path, s);
        }
        for d in &plan.removed_dirs {
            if self.device.is_empty_dir(d) {
                self.device.dirs.remove(d);
            }
        }
        // Commit effects.
        self.gens.retain(|g| target.is_some_and(|k| g.id <= k));
        self.current = target;
        let expected = match target {
            Some(id) => &self.snapshots[&id],
            None => &self.initial,
        };
        assert_eq!(&self.device, expected, "rollback to {target:?} did not restore the device");
    }

    fn check(&self) {
        let current = self.current_gen();
        for p in generation::managed_paths(current, &self.factory) {
            assert_eq!(generation::desired_state(p, current, &self.factory), self.device.get(p), "{p} differs from the current generation");
        }
        // Paths no transaction touched are as they were.
        for (p, s) in &self.initial.files {
            if !self.factory.contains_key(p) {
                assert_eq!(self.device.get(p), *s);
            }
        }
        let ids: Vec<u64> = self.gens.iter().map(|g| g.id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert!(ids.len() <= self.keep);
    }
}

fn history(initial: &[(u8, AMeta)], keep: usize, ops: &[HistOp]) {
    let mut device = Device { files: BTreeMap::new(), dirs: FACTORY_DIRS.iter().map(|d| d.to_string()).collect() };
    for (i, m) in initial.iter().take(12) {
        let p = file_path(*i);
        if device.dirs.contains(parent(&p)) {
            device.set(&p, PathState::File(m.meta()));
        }
    }
    let mut model = Model {
        initial: device.clone(),
        device,
        factory: Factory::new(),
        gens: Vec::new(),
        current: None,
        snapshots: BTreeMap::new(),
        next_tx: 1,
        keep,
    };
    model.check();
    for op in ops.iter().take(32) {
        match op {
            HistOp::Install(targets) => {
                if targets.is_empty() {
                    continue;
                }
                model.install(targets)
            }
            HistOp::RollbackPrevious => {
                let Some(cur) = model.current_gen() else { continue };
                match cur.parent {
                    None => model.rollback(None),
                    Some(p) if model.gens.iter().any(|g| g.id == p) => model.rollback(Some(p)),
                    Some(_) => continue,
                }
            }
            HistOp::RollbackFactory => {
                if model.current.is_none() {
                    continue;
                }
                model.rollback(None)
            }
            HistOp::RollbackTo(i) => {
                if model.gens.is_empty() {
                    continue;
                }
                let id = model.gens[*i as usize % model.gens.len()].id;
                if Some(id) == model.current {
                    continue;
                }
                model.rollback(Some(id))
            }
        }
        model.check();
    }
}

fn check_dirs_to_remove(current: Option<&Generation>, target: Option<&Generation>, out: &[String]) {
    let empty = BTreeSet::new();
    let now = current.map_or(&empty, |g| &g.dirs);
    let keep = target.map_or(&empty, |g| &g.dirs);
    let listed: BTreeSet<&String> = out.iter().collect();
    assert_eq!(listed.len(), out.len(), "a directory is listed twice: {out:?}");
    let expected: BTreeSet<&String> = now.difference(keep).collect();
    assert_eq!(listed, expected);
    for (i, a) in out.iter().enumerate() {
        for b in &out[i + 1..] {
            assert!(!b.starts_with(&format!("{a}/")), "{a} is listed before its descendant {b}: {out:?}");
        }
    }
}

fn dirs(current: Option<&AGen>, target: Option<&AGen>, factory: &[(String, Option<AMeta>)], probes: &[String]) {
    let current = current.map(|g| g.generation(2));
    let target = target.map(|g| g.generation(1));
    let removed = generation::dirs_to_remove(current.as_ref(), target.as_ref());
    check_dirs_to_remove(current.as_ref(), target.as_ref(), &removed);
    assert!(generation::dirs_to_remove(current.as_ref(), current.as_ref()).is_empty());
    let factory: Factory = factory.iter().map(|(p, m)| (p.clone(), state(*m))).collect();
    let managed = generation::managed_paths(current.as_ref(), &factory);
    for p in probes.iter().chain(factory.keys()).chain(current.iter().flat_map(|g| g.files.keys())) {
        let want = generation::desired_state(p, current.as_ref(), &factory);
        let expected = match current.as_ref().and_then(|g| g.files.get(p)) {
            Some(m) => PathState::File(*m),
            None => factory.get(p).copied().unwrap_or(PathState::Absent),
        };
        assert_eq!(want, expected, "{p}");
        assert_eq!(generation::desired_state(p, None, &factory), factory.get(p).copied().unwrap_or(PathState::Absent));
        if !managed.contains(p.as_str()) {
            assert_eq!(want, PathState::Absent, "{p} is unmanaged yet has a desired file");
        }
    }
    let blobs = generation::referenced_blobs(current.iter(), &factory);
    for p in &managed {
        if let Some(h) = generation::desired_state(p, current.as_ref(), &factory).hash() {
            assert!(blobs.contains(&h));
        }
    }
}
