//! Delta packages installed by real processes: SIGKILL at every crash point of a delta
//! install, and the daemon installing one through the legacy /download + /update story.
//!
//! Every package here is built by the real `tope-updater pack` (`--delta-from` for the delta)
//! from two source directories, v1 and v2, written by the test. The trees a device must hold
//! (all old, all new) are computed from those directories alone (`support::after_install`:
//! content, and the mode rules of the package format), never from the engine's output.
//!
//! The fixture covers every way a delta ships a file: a 6 MiB file patched in two 4 MiB
//! windows with an insertion between them, a small library patched in one window, a config
//! file changed and shipped whole, a new file in a new directory, and two files the device
//! already holds (not shipped at all; one of them with another mode in the v2 sources, which
//! the device's mode overrides). A factory file outside every package must never change.
//!
//! Run with `cargo test --features failpoints --test it delta_process -- --nocapture`.

use crate::daemon::{
    Daemon, Pkg, Rig, Snap, download, install, md5_hex, snap, started, update_body,
};
use crate::support::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const V1: &str = "1.0.0";
const V2: &str = "1.0.1";

/// A file no package names: every test checks it is left exactly as it was.
const FACTORY: (&str, &[u8], u32) =
    ("etc/machine-id", b"0123456789abcdef0123456789abcdef\n", 0o444);

// ---------------------------------------------------------------- the two versions

/// How `pack --delta-from v1` must ship a file of v2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ship {
    /// Changed, shipped as a patch against its v1 content.
    Patch,
    /// Changed or new, shipped as a full entry.
    Whole,
    /// The same content as in v1: not shipped, the device already holds it.
    OnDevice,
}

/// One file of a version's source directory.
struct SrcFile {
    /// Path inside the source directory, which is also its ZIP entry name.
    src: &'static str,
    /// Destination, relative to the allowed root.
    target: &'static str,
    content: Vec<u8>,
    /// Its mode in the source directory (`pack` gives the ZIP entry this mode).
    mode: u32,
}

struct Versions {
    v1: Vec<SrcFile>,
    v2: Vec<(SrcFile, Ship)>,
    /// A full package of the same version as v1 whose big file and library differ from
    /// both v1 and v2: a device that installed it holds the delta's bases only in its
    /// backup store.
    hotfix: Vec<SrcFile>,
}

/// The modules of both versions: a directory module, and two file modules.
fn modules(root: &Path) -> Value {
    let dst = |rel: &str| root.join(rel).to_str().unwrap().to_string();
    json!([
        {"name": "app", "src": "app/", "dst": dst("opt/app")},
        {"name": "lib", "src": "lib/libfoo.so", "dst": dst("opt/lib/libfoo.so")},
        {"name": "host", "src": "etc/hostname", "dst": dst("etc/hostname")},
    ])
}

/// Deterministic contents (incompressible, like code).
fn versions() -> Versions {
    let mut rng = XorShift::new(0xDE17_A000_0000_0014);
    // More than one 4 MiB window (limits::DELTA_WINDOW_BYTES): the patch has two windows.
    let big1 = rng.bytes(6 * 1024 * 1024 + 12_345);
    let mut big2 = big1.clone();
    for off in [1_000usize, 3 << 20, 5 << 20] {
        let r = rng.bytes(2_000);
        big2[off..off + 2_000].copy_from_slice(&r);
    }
    // An insertion before the second window shifts everything after it.
    let ins = rng.bytes(3_000);
    big2.splice(4 << 20..4 << 20, ins);
    let lib1 = rng.bytes(300 * 1024);
    let mut lib2 = lib1.clone();
    let r = rng.bytes(500);
    lib2[150_000..150_500].copy_from_slice(&r);
    let same = rng.bytes(64 * 1024);
    let host = b"printer-7\n".to_vec();
    let plugin = rng.bytes(20_000);
    let (big_hotfix, lib_hotfix) = (rng.bytes(big1.len()), rng.bytes(lib1.len()));
    let f = |src, target, content, mode| SrcFile { src, target, content, mode };
    let hotfix = vec![
        f("app/bin/big.bin", "opt/app/bin/big.bin", big_hotfix, 0o755),
        f("app/share/same.dat", "opt/app/share/same.dat", same.clone(), 0o644),
        f("app/etc/app.conf", "opt/app/etc/app.conf", b"level = 1\n".to_vec(), 0o640),
        f("lib/libfoo.so", "opt/lib/libfoo.so", lib_hotfix, 0o755),
        f("etc/hostname", "etc/hostname", host.clone(), 0o644),
    ];
    Versions {
        hotfix,
        v1: vec![
            f("app/bin/big.bin", "opt/app/bin/big.bin", big1, 0o755),
            f("app/share/same.dat", "opt/app/share/same.dat", same.clone(), 0o644),
            f("app/etc/app.conf", "opt/app/etc/app.conf", b"level = 1\n".to_vec(), 0o640),
            f("lib/libfoo.so", "opt/lib/libfoo.so", lib1, 0o755),
            f("etc/hostname", "etc/hostname", host.clone(), 0o644),
        ],
        v2: vec![
            (f("app/bin/big.bin", "opt/app/bin/big.bin", big2, 0o755), Ship::Patch),
            // Another mode in the sources: the device keeps its own (SPEC §3), so this file
            // is unchanged on the device and must be neither shipped nor rewritten.
            (f("app/share/same.dat", "opt/app/share/same.dat", same, 0o600), Ship::OnDevice),
            (
                f("app/etc/app.conf", "opt/app/etc/app.conf", b"level = 2\n".to_vec(), 0o600),
                Ship::Whole,
            ),
            (f("app/plugins/new.so", "opt/app/plugins/new.so", plugin, 0o750), Ship::Whole),
            (f("lib/libfoo.so", "opt/lib/libfoo.so", lib2, 0o700), Ship::Patch),
            (f("etc/hostname", "etc/hostname", host, 0o644), Ship::OnDevice),
        ],
    }
}

impl Versions {
    fn v2_files(&self) -> impl Iterator<Item = &SrcFile> {
        self.v2.iter().map(|(f, _)| f)
    }
}

/// Writes a source directory (files with their modes, and the manifest template) for
/// destinations under `root`.
fn write_sources<'a>(
    dir: &Path,
    version: &str,
    files: impl Iterator<Item = &'a SrcFile>,
    root: &Path,
) {
    use std::os::unix::fs::PermissionsExt;
    for f in files {
        let p = dir.join(f.src);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, &f.content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(f.mode)).unwrap();
    }
    std::fs::write(
        dir.join("manifest.json"),
        json!({"version": version, "modules": modules(root)}).to_string(),
    )
    .unwrap();
}

/// `tope-updater --json pack DIR -o OUT [--delta-from BASE]`; its scratch files stay in `work`.
fn pack(work: &Path, dir: &Path, out: &Path, delta_from: Option<&Path>) -> Value {
    let mut c = Command::new(BIN);
    c.arg("--json").arg("pack").arg(dir).arg("-o").arg(out);
    if let Some(base) = delta_from {
        c.arg("--delta-from").arg(base);
    }
    c.env("TMPDIR", work)
        .env_remove("FAILPOINTS")
        .env_remove("TOPE_UPDATER_CONFIG")
        .env("NO_COLOR", "1");
    let r = Run::from(c.output().unwrap());
    assert_eq!(r.code, Some(0), "pack {}:\n{}", dir.display(), r.describe());
    r.json()
}

/// The packages of both versions for destinations under `root`, built in `work`.
struct Packages {
    v1: PathBuf,
    /// The hotfix (full, version v1).
    hotfix: PathBuf,
    /// v2 as a delta against `v1`.
    delta: PathBuf,
    /// v2 as a full package.
    full: PathBuf,
}

impl Packages {
    fn build(work: &Path, root: &Path, vs: &Versions) -> Packages {
        let started = Instant::now();
        let (src1, src2) = (work.join("src-v1"), work.join("src-v2"));
        write_sources(&src1, V1, vs.v1.iter(), root);
        write_sources(&src2, V2, vs.v2_files(), root);
        let p = Packages {
            v1: work.join("v1.zip"),
            hotfix: work.join("hotfix.zip"),
            delta: work.join("v2-delta.zip"),
            full: work.join("v2-full.zip"),
        };
        pack(work, &src1, &p.v1, None);
        let src_hotfix = work.join("src-hotfix");
        write_sources(&src_hotfix, V1, vs.hotfix.iter(), root);
        pack(work, &src_hotfix, &p.hotfix, None);
        pack(work, &src2, &p.full, None);
        let report = pack(work, &src2, &p.delta, Some(&p.v1));
        check_delta_shape(&p, vs, &report);
        println!(
            "packed: v1 {} bytes, v2 full {} bytes, v2 delta {} bytes ({} ms)",
            size(&p.v1),
            size(&p.full),
            size(&p.delta),
            started.elapsed().as_millis()
        );
        p
    }
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

fn zip_entry(zip: &mut zip::ZipArchive<std::fs::File>, name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    zip.by_name(name).unwrap_or_else(|e| panic!("{name}: {e}")).read_to_end(&mut out).unwrap();
    out
}

/// The delta package really is one, shipping each file the way the fixture means it to be
/// (so that no test here passes on a package that patches nothing): its manifest, its
/// entries and `pack`'s report all agree.
fn check_delta_shape(p: &Packages, vs: &Versions, report: &Value) {
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&p.delta).unwrap()).unwrap();
    let names: BTreeSet<String> = zip.file_names().map(|n| n.unwrap().to_string()).collect();
    let m: Value = serde_json::from_slice(&zip_entry(&mut zip, "manifest.json")).unwrap();
    assert_eq!(m["version"], V2, "{m:#}");
    // An engine that knows no deltas finds no module to deploy and refuses the package.
    assert_eq!(m["modules"], json!([]), "a delta package's top-level modules must be empty: {m:#}");
    let files = m["delta"]["files"].as_object().unwrap_or_else(|| panic!("no delta.files: {m:#}"));
    let mut patch_entries = BTreeSet::new();
    for (f, ship) in &vs.v2 {
        let d = files.get(f.src);
        let patches = d.map(|d| {
            d["patches"].as_array().unwrap_or_else(|| panic!("{}: no patches list: {m:#}", f.src))
        });
        match ship {
            Ship::Whole => {
                assert!(
                    d.is_none(),
                    "{} must be shipped whole, not built on the device: {m:#}",
                    f.src
                );
                assert!(
                    names.contains(f.src),
                    "{} is not an entry of the delta package: {names:?}",
                    f.src
                );
                assert_eq!(
                    zip_entry(&mut zip, f.src),
                    f.content,
                    "{}: the entry is not the file",
                    f.src
                );
            }
            Ship::OnDevice | Ship::Patch => {
                let d =
                    d.unwrap_or_else(|| panic!("{} should be built on the device: {m:#}", f.src));
                assert!(
                    !names.contains(f.src),
                    "{} is shipped whole although the device has its base",
                    f.src
                );
                assert_eq!(d["size"], f.content.len(), "{}: {d}", f.src);
                let patches = patches.unwrap();
                if *ship == Ship::OnDevice {
                    assert!(patches.is_empty(), "{} is on the device, yet patched: {d}", f.src);
                } else {
                    assert_eq!(patches.len(), 1, "{}: one patch (one base): {d}", f.src);
                    let base = vs.v1.iter().find(|o| o.target == f.target).unwrap();
                    assert_eq!(
                        patches[0]["base"],
                        blake3_hex(&base.content),
                        "{}: the patch's base is its v1 content",
                        f.src
                    );
                    let entry = patches[0]["entry"].as_str().unwrap().to_string();
                    let bytes = zip_entry(&mut zip, &entry);
                    assert!(
                        !f.content.starts_with(&bytes[..bytes.len().min(64)]),
                        "{}: patch entry {entry} holds the file itself",
                        f.src
                    );
                    assert!(
                        bytes.len() * 4 < f.content.len(),
                        "{}: a patch of {} bytes for {} bytes of small changes",
                        f.src,
                        bytes.len(),
                        f.content.len()
                    );
                    patch_entries.insert(entry);
                }
            }
        }
    }
    let big = vs.v2.iter().map(|(f, _)| f).find(|f| f.src == "app/bin/big.bin").unwrap();
    assert!(
        big.content.len() as u64 > tope_updater::limits::DELTA_WINDOW_BYTES,
        "the big file must span several patch windows"
    );
    let expected: BTreeSet<String> = ["manifest.json".to_string()]
        .into_iter()
        .chain(vs.v2.iter().filter(|(_, s)| *s == Ship::Whole).map(|(f, _)| f.src.to_string()))
        .chain(patch_entries)
        .collect();
    assert_eq!(names, expected, "the delta package's entries");
    let count = |s: Ship| vs.v2.iter().filter(|(_, k)| *k == s).count();
    let d = &report["delta"];
    assert_eq!(
        (&d["whole"], &d["patched"], &d["on_device"]),
        (&json!(count(Ship::Whole)), &json!(count(Ship::Patch)), &json!(count(Ship::OnDevice))),
        "pack's report: {report:#}"
    );
    assert!(
        size(&p.delta) * 20 < size(&p.full),
        "the delta ({} bytes) is not small against the full package ({})",
        size(&p.delta),
        size(&p.full)
    );
}

// ---------------------------------------------------------------- the oracle

/// The tree after installing `files` over `before`, by the package rules alone.
fn oracle<'a>(
    before: &BTreeMap<String, String>,
    files: impl Iterator<Item = &'a SrcFile>,
) -> BTreeMap<String, String> {
    let files: Vec<NewFile> = files
        .map(|f| NewFile {
            rel: f.target.to_string(),
            content: &f.content,
            manifest_mode: None,
            zip_mode: Some(f.mode),
        })
        .collect();
    after_install(before, &files)
}

/// The tree after v1 (old) and the tree after v2 (new).
struct Trees {
    old: BTreeMap<String, String>,
    new: BTreeMap<String, String>,
}

impl Trees {
    /// `root` must hold the factory state.
    fn of(root: &Path, vs: &Versions) -> Trees {
        let factory = tree(root);
        let old = oracle(&factory, vs.v1.iter());
        let new = oracle(&old, vs.v2_files());
        assert_ne!(old, new);
        Trees { old, new }
    }
}

/// Puts the factory state on a device root.
fn factory(root: &Path) {
    let (rel, content, mode) = FACTORY;
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, content).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// What differs between the live tree and the two expected ones, path by path.
fn explain(
    live: &BTreeMap<String, String>,
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> String {
    let keys: BTreeSet<&String> = live.keys().chain(old.keys()).chain(new.keys()).collect();
    let show = |m: &BTreeMap<String, String>, k: &str| {
        m.get(k).map_or("absent".to_string(), |v| v.chars().take(22).collect())
    };
    let mut out = Vec::new();
    for k in keys {
        let (l, o, n) = (live.get(k), old.get(k), new.get(k));
        if l != o || l != n {
            let verdict = match (l == o, l == n) {
                (true, _) => "old",
                (_, true) => "new",
                _ => "NEITHER",
            };
            out.push(format!(
                "  {k}: {verdict} (live {}, old {}, new {})",
                show(live, k),
                show(old, k),
                show(new, k)
            ));
        }
    }
    out.join("\n")
}

// ---------------------------------------------------------------- 1. crash points

/// Without the crash points the first test does not exist: say so, rather than pass
/// silently with fewer tests.
#[cfg(not(feature = "failpoints"))]
#[test]
fn the_delta_crash_test_needs_the_failpoints_feature() {
    panic!(
        "the delta crash-point test needs the named crash points compiled in: \
         run `cargo test --features failpoints --test it delta_process`"
    );
}

#[cfg(feature = "failpoints")]
mod crash_points {
    use super::*;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use tope_updater::failpoint::CRASH_POINTS;

    /// The crash points only a rollback or `recover` passes; every other point of
    /// `CRASH_POINTS` is on a delta install's way and must kill it.
    const NOT_ON_AN_INSTALL: &[&str] = &[
        "enter.RollingBack",
        "rollback.file",
        "rollback.synced",
        "enter.RolledBack",
        "recover.attempt",
    ];

    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    enum Side {
        Old,
        New,
    }

    /// What the device holds when the delta install begins.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Start {
        /// v1, installed in full: every base is the live file.
        V1,
        /// v1, then the hotfix: the bases of the patched files are only in the backup store.
        Hotfix,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Policy {
        /// The default `recovery = "resume"`.
        Resume,
        /// `recovery = "rollback"`: everything in flight is undone.
        Rollback,
    }

    impl Policy {
        fn config(self) -> &'static str {
            match self {
                Policy::Resume => "",
                Policy::Rollback => "recovery = \"rollback\"",
            }
        }

        /// Where `recover` must take a delta install killed at `point`: before the journal
        /// knows the transaction nothing changed; once it is committed it stays; in between
        /// the policy decides.
        fn expected(self, point: &str) -> Side {
            match (point, self) {
                ("plan.copy_written", _) => Side::Old,
                ("enter.Committed" | "commit.cleaned", _) => Side::New,
                (_, Policy::Resume) => Side::New,
                (_, Policy::Rollback) => Side::Old,
            }
        }
    }

    /// One case: where the device starts, the recovery policy, where the delta install is
    /// killed, and optionally where the first `recover` is killed in turn.
    #[derive(Debug, Clone, Copy)]
    struct Case {
        start: Start,
        policy: Policy,
        install: Arm,
        recover: Option<Arm>,
    }

    impl std::fmt::Display for Case {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "[{:?}, {:?}] install killed at {}", self.start, self.policy, self.install)?;
            match self.recover {
                Some(r) => write!(f, ", recover killed at {r}"),
                None => Ok(()),
            }
        }
    }

    /// The shared fixture: one device root (the packages name it), a fresh state dir per case.
    struct Lab {
        work: tempfile::TempDir,
        root: PathBuf,
        pkgs: Packages,
        /// The tree before anything is installed.
        factory_tree: BTreeMap<String, String>,
        trees: Trees,
        /// The tree after v1 and the hotfix.
        hotfix_tree: BTreeMap<String, String>,
        /// Devices set up so far.
        devices: std::cell::Cell<u32>,
    }

    impl Lab {
        /// A device at the factory state with its own state dir and config.
        fn device(&self, extra: &str) -> Env {
            if self.root.exists() {
                std::fs::remove_dir_all(&self.root).unwrap();
            }
            std::fs::create_dir_all(&self.root).unwrap();
            factory(&self.root);
            assert_eq!(tree(&self.root), self.factory_tree);
            self.devices.set(self.devices.get() + 1);
            let tmp = tempfile::tempdir_in(self.work.path()).unwrap();
            let state = tmp.path().join("state");
            let config = tmp.path().join("config.toml");
            write_config(&config, &state, &self.root, extra);
            Env { tmp, root: self.root.clone(), state, config }
        }

        /// A device holding `start`, ready for the delta.
        fn prepared(&self, start: Start, extra: &str, ctx: &str) -> Env {
            let dev = self.device(extra);
            dev.ok(&["install", path(&self.pkgs.v1)]);
            if start == Start::Hotfix {
                dev.ok(&["install", path(&self.pkgs.hotfix)]);
            }
            assert_eq!(self.judge(&dev, start, &format!("{ctx}: before the delta")), Side::Old);
            dev
        }

        fn old(&self, start: Start) -> &BTreeMap<String, String> {
            match start {
                Start::V1 => &self.trees.old,
                Start::Hotfix => &self.hotfix_tree,
            }
        }

        /// The device must hold exactly the old or exactly the new tree (every file, mode and
        /// directory under the root: no mix, no torn file, no temporary file, no directory
        /// left behind, the factory file untouched), nothing in flight, and the matching
        /// current version.
        fn judge(&self, dev: &Env, start: Start, ctx: &str) -> Side {
            let live = tree(&self.root);
            let old = self.old(start);
            let side = if live == *old {
                Side::Old
            } else if live == self.trees.new {
                Side::New
            } else {
                panic!(
                    "{ctx}: the tree is neither all old nor all new:\n{}",
                    explain(&live, old, &self.trees.new)
                );
            };
            let st = status_of(dev, ctx);
            assert!(
                st["in_flight"].is_null(),
                "{ctx}: all {side:?}, but a transaction is in flight: {}",
                st["in_flight"]
            );
            let want = if side == Side::Old { V1 } else { V2 };
            assert_eq!(
                st["current"]["version"], want,
                "{ctx}: all {side:?}, but status shows {}",
                st["current"]
            );
            side
        }

        /// `verify` re-hashes every file of the current generation and finds them all.
        fn verify(&self, dev: &Env, side: Side, ctx: &str) {
            let v = dev.run(&["verify", "--json"]);
            assert_eq!(v.code, Some(0), "{ctx}: verify:\n{}", v.describe());
            let j = v.json();
            assert_eq!(j["mismatches"], json!([]), "{ctx}: verify: {j}");
            assert_eq!(j["version"], if side == Side::Old { V1 } else { V2 }, "{ctx}: verify: {j}");
        }
    }

    fn status_of(dev: &Env, ctx: &str) -> Value {
        let st = dev.run(&["status", "--json"]);
        assert_eq!(st.code, Some(0), "{ctx}: status --json:\n{}", st.describe());
        st.json()
    }

    fn path(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    /// Runs one case: the delta install killed, `recover` (itself killed first, if the case
    /// says so), the judgement, a second `recover` with nothing to do; then `verify`, and a
    /// rollback that must give back exactly the old tree (from the old side, the delta is
    /// first installed again: a device the crash left old is a valid base). Returns the side
    /// `recover` left.
    fn run_case(lab: &Lab, c: Case) -> Side {
        let ctx = c.to_string();
        let dev = lab.prepared(c.start, c.policy.config(), &ctx);
        let delta = path(&lab.pkgs.delta);
        expect_killed(&run_armed(&dev, &["install", delta], c.install), c.install, &ctx);
        if let Some(arm) = c.recover {
            expect_killed(&run_armed(&dev, &["recover"], arm), arm, &ctx);
        }
        let rec = dev.run(&["recover", "--json"]);
        assert!(
            matches!(rec.code, Some(0 | 4)),
            "{ctx}: recover should exit 0 or 4:\n{}",
            rec.describe()
        );
        let result = rec.json()["result"].as_str().unwrap_or_default().to_string();
        let side = lab.judge(&dev, c.start, &format!("{ctx}, after recover"));
        let expected = match c.recover {
            // A transaction that the interrupted recover committed stays new.
            Some(a) if matches!(a.point, "enter.Committed" | "commit.cleaned") => Side::New,
            _ => c.policy.expected(c.install.point),
        };
        assert_eq!(
            side,
            expected,
            "{ctx}: recover left the device all {side:?}, expected {expected:?}:\n{}",
            rec.describe()
        );
        match (rec.code, side) {
            (Some(4), Side::New) => {
                panic!("{ctx}: recover reported a rollback (exit 4) but the device is all new")
            }
            (Some(0), Side::Old) => assert_eq!(
                result, "nothing",
                "{ctx}: exit 0 and all old, yet recover did something"
            ),
            _ => {}
        }
        let again = dev.run(&["recover", "--json"]);
        assert_eq!(again.code, Some(0), "{ctx}: a second recover:\n{}", again.describe());
        assert_eq!(
            again.json()["result"],
            "nothing",
            "{ctx}: a second recover did something:\n{}",
            again.describe()
        );
        assert_eq!(lab.judge(&dev, c.start, &format!("{ctx}, after a second recover")), side);
        lab.verify(&dev, side, &format!("{ctx}, after recover"));

        if side == Side::Old {
            if rec.code == Some(4) {
                // Rolled back: the same bytes again need --force (no reinstall loops).
                let r = dev.run(&["install", delta]);
                assert_eq!(
                    (r.code, r.error_code().as_deref()),
                    (Some(3), Some("VALIDATION_ERROR")),
                    "{ctx}: reinstalling a rolled-back package without --force:\n{}",
                    r.describe()
                );
                assert!(r.stderr.contains("--force"), "{ctx}:\n{}", r.describe());
                assert_eq!(
                    lab.judge(&dev, c.start, &format!("{ctx}, after a refused reinstall")),
                    Side::Old
                );
            }
            let r = dev.run(&["install", delta, "--force", "--json"]);
            assert_eq!(
                r.code,
                Some(0),
                "{ctx}: installing the delta again on the old device:\n{}",
                r.describe()
            );
            assert_eq!(
                lab.judge(&dev, c.start, &format!("{ctx}, after installing the delta again")),
                Side::New
            );
            lab.verify(&dev, Side::New, &format!("{ctx}, after installing the delta again"));
        }
        let r = dev.run(&["rollback", "--json"]);
        assert_eq!(r.code, Some(0), "{ctx}: rollback:\n{}", r.describe());
        assert_eq!(
            lab.judge(&dev, c.start, &format!("{ctx}, after the rollback")),
            Side::Old,
            "{ctx}: rollback"
        );
        lab.verify(&dev, Side::Old, &format!("{ctx}, after the rollback"));
        side
    }

    /// The loop point armed one pass beyond its expected count must not fire: the install
    /// ends normally, all new (so the counts that the mid-loop and last arms rely on are
    /// exact, and unchanged files are indeed neither staged nor swapped).
    fn one_past_the_last_pass(lab: &Lab, arm: Arm) {
        let ctx = format!("delta install armed at {arm}, one pass more than expected");
        let dev = lab.prepared(Start::V1, "", &ctx);
        let r = run_armed(&dev, &["install", path(&lab.pkgs.delta), "--json"], arm);
        assert_eq!(
            (r.code, r.signal),
            (Some(0), None),
            "{ctx}: {} passed {} times or more (expected {})\n{}",
            arm.point,
            arm.hit,
            arm.hit - 1,
            r.describe()
        );
        assert_eq!(lab.judge(&dev, Start::V1, &ctx), Side::New);
    }

    #[test]
    fn sigkill_at_every_crash_point_of_a_delta_install_then_recover_leaves_all_old_or_all_new() {
        let started = Instant::now();
        let work = tempfile::tempdir().unwrap();
        let root = work.path().join("device").join("root");
        std::fs::create_dir_all(&root).unwrap();
        factory(&root);
        let vs = versions();
        let factory_tree = tree(&root);
        let trees = Trees::of(&root, &vs);
        let hotfix_tree = oracle(&trees.old, vs.hotfix.iter());
        assert_eq!(
            oracle(&hotfix_tree, vs.v2_files()),
            trees.new,
            "fixture: v2 over the hotfix is v2 over v1"
        );
        let pkgs = Packages::build(work.path(), &root, &vs);
        let lab = Lab {
            work,
            root,
            pkgs,
            factory_tree,
            trees,
            hotfix_tree,
            devices: std::cell::Cell::new(0),
        };

        // The baselines, with no crash. Over the hotfix, the live big file and library are
        // not the patches' bases: the install can only succeed from the backup store.
        for start in [Start::V1, Start::Hotfix] {
            let ctx = format!("baseline from {start:?}");
            let dev = lab.prepared(start, "", &ctx);
            let live_big =
                blake3_hex(&std::fs::read(lab.root.join("opt/app/bin/big.bin")).unwrap());
            assert_eq!(
                live_big == blake3_hex(&vs.v1[0].content),
                start == Start::V1,
                "{ctx}: fixture"
            );
            dev.ok(&["install", path(&lab.pkgs.delta)]);
            assert_eq!(lab.judge(&dev, start, &ctx), Side::New);
            lab.verify(&dev, Side::New, &ctx);
        }

        // Passes through the per-file points, from the trees alone: every target that
        // changes is staged and swapped (and only those: SPEC §3), each distinct old content
        // that changes is backed up once, every target is verified.
        let (old, new) = (&lab.trees.old, &lab.trees.new);
        let targets: BTreeSet<&str> =
            vs.v1.iter().map(|f| f.target).chain(vs.v2_files().map(|f| f.target)).collect();
        let changed = targets.iter().filter(|t| old.get(**t) != new.get(**t)).count() as u32;
        // Only targets that change are backed up (a kept file is never linked into the store).
        let old_contents: BTreeSet<&str> = targets
            .iter()
            .filter(|t| old.get(**t) != new.get(**t))
            .filter_map(|t| old.get(*t))
            .map(|d| d.rsplit(' ').next().unwrap())
            .collect();
        let loops: [(&str, u32); 4] = [
            ("stage.file", changed),
            ("backup.file", old_contents.len() as u32),
            ("swap.file", changed),
            ("verify.file", targets.len() as u32),
        ];
        assert!(
            changed >= 4 && (changed as usize) < targets.len(),
            "fixture: {changed} of {} targets change",
            targets.len()
        );

        // 1. Every crash point of the install (loop points at their first, third and last
        //    pass), under both recovery policies.
        let points: Vec<&'static str> =
            CRASH_POINTS.iter().copied().filter(|p| !NOT_ON_AN_INSTALL.contains(p)).collect();
        let mut cases = Vec::new();
        for policy in [Policy::Resume, Policy::Rollback] {
            for &point in &points {
                let mut hits = vec![1];
                if let Some((_, n)) = loops.iter().find(|(l, _)| *l == point) {
                    hits.extend([3.min(*n), *n]);
                    hits.sort_unstable();
                    hits.dedup();
                }
                cases.extend(hits.into_iter().map(|hit| Case {
                    start: Start::V1,
                    policy,
                    install: Arm::new(point, hit),
                    recover: None,
                }));
            }
        }
        // 2. The bases only in the backup store: killed while patching from them, mid-swap,
        //    and mid-verification.
        let n_stage = loops[0].1;
        for policy in [Policy::Resume, Policy::Rollback] {
            for (point, hit) in [
                ("enter.Planned", 1),
                ("stage.file", 1),
                ("stage.file", n_stage),
                ("stage.synced", 1),
                ("swap.file", 2),
                ("verify.file", 1),
            ] {
                cases.push(Case {
                    start: Start::Hotfix,
                    policy,
                    install: Arm::new(point, hit),
                    recover: None,
                });
            }
        }
        // 3. Killed right after `Planned`, so that `recover` applies every patch itself; then
        //    `recover` is killed too, anywhere on its way, and the next one must finish.
        for (point, hit) in [
            ("recover.attempt", 1),
            ("stage.file", 1),
            ("stage.file", n_stage),
            ("stage.synced", 1),
            ("backup.file", 1),
            ("swap.file", 2),
            ("verify.file", 1),
            ("enter.Committed", 1),
        ] {
            cases.push(Case {
                start: Start::V1,
                policy: Policy::Resume,
                install: Arm::new("enter.Planned", 1),
                recover: Some(Arm::new(point, hit)),
            });
        }

        let mut failures = Vec::new();
        let mut killed: BTreeSet<&str> = BTreeSet::new();
        let mut sides: BTreeMap<Side, usize> = BTreeMap::new();
        for c in &cases {
            let t = Instant::now();
            match catch_unwind(AssertUnwindSafe(|| run_case(&lab, *c))) {
                Ok(side) => {
                    println!("  ok   {c}: all {side:?} ({} ms)", t.elapsed().as_millis());
                    killed.insert(c.install.point);
                    *sides.entry(side).or_default() += 1;
                }
                Err(e) => {
                    println!("  FAIL {c}");
                    failures.push(format!("{c}: {}", panic_text(&*e)));
                }
            }
        }
        for (point, n) in loops {
            let arm = Arm::new(point, n + 1);
            match catch_unwind(AssertUnwindSafe(|| one_past_the_last_pass(&lab, arm))) {
                Ok(()) => println!("  ok   {arm} (one past the last pass) did not fire"),
                Err(e) => {
                    failures.push(format!("{arm} (one past the last pass): {}", panic_text(&*e)));
                }
            }
        }

        println!(
            "{} cases on {} devices in {:.1} s; loop passes {loops:?}; outcomes {sides:?}",
            cases.len() + loops.len(),
            lab.devices.get(),
            started.elapsed().as_secs_f64()
        );
        assert!(
            failures.is_empty(),
            "{} case(s) failed:\n\n{}",
            failures.len(),
            failures.join("\n\n")
        );
        let missed: Vec<&&str> = points.iter().filter(|p| !killed.contains(**p)).collect();
        assert!(missed.is_empty(), "crash points that never killed a delta install: {missed:?}");
        assert!(
            sides.contains_key(&Side::Old) && sides.contains_key(&Side::New),
            "the cases must end both ways: {sides:?}"
        );
    }

    fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(std::string::ToString::to_string))
            .unwrap_or_else(|| "non-string panic".into())
    }
}

// ---------------------------------------------------------------- 2-3. the daemon

/// A package file as the legacy /download contract names it.
fn served(path: &Path, version: &str, name: &str) -> Pkg {
    let bytes = std::fs::read(path).unwrap();
    Pkg { version: version.into(), name: name.into(), md5: md5_hex(&bytes), bytes }
}

/// A daemon device at the factory state, with v1 (full), v2 (delta) and v2 (full) packed for
/// its root and served by its package server.
struct DaemonLab {
    rig: Rig,
    _work: tempfile::TempDir,
    vs: Versions,
    trees: Trees,
    v1: Pkg,
    delta: Pkg,
    full: Pkg,
    paths: Packages,
}

impl DaemonLab {
    fn new() -> DaemonLab {
        let rig = Rig::new();
        factory(&rig.env.root);
        let vs = versions();
        let trees = Trees::of(&rig.env.root, &vs);
        let work = tempfile::tempdir().unwrap();
        let paths = Packages::build(work.path(), &rig.env.root, &vs);
        let v1 = served(&paths.v1, V1, &format!("tope-update-{V1}.zip"));
        let delta = served(&paths.delta, V2, &format!("tope-update-{V2}-delta.zip"));
        let full = served(&paths.full, V2, &format!("tope-update-{V2}.zip"));
        for p in [&v1, &delta, &full] {
            rig.server.add(p);
        }
        DaemonLab { rig, _work: work, vs, trees, v1, delta, full, paths }
    }

    fn root(&self) -> &Path {
        &self.rig.env.root
    }

    /// The last transaction of `GET /history`.
    fn last_tx(&self, d: &Daemon) -> Value {
        let h = d.get("/api/v1.0/history");
        assert_eq!(h["code"], 200, "GET /history: {h}");
        h["data"][0].clone()
    }
}

/// Each file's inode, modification time and (with `ctime`) change time. The same inode and
/// mtime: the file was neither replaced nor rewritten. The same ctime too: not even its
/// mode, owner or link count changed (a backup by hard link changes the link count).
fn inodes(root: &Path, ctime: bool) -> BTreeMap<String, (u64, i64, i64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    tree(root)
        .into_keys()
        .map(|rel| {
            let m = std::fs::symlink_metadata(root.join(&rel)).unwrap();
            let c = if ctime { (m.ctime(), m.ctime_nsec()) } else { (0, 0) };
            (rel, (m.ino(), m.mtime(), m.mtime_nsec(), c.0, c.1))
        })
        .collect()
}

#[test]
fn a_delta_package_downloaded_through_the_legacy_api_installs_like_the_full_one() {
    let started = Instant::now();
    let lab = DaemonLab::new();
    let rig = &lab.rig;

    // A twin device installs the full v2 with the CLI: the reference the delta must match.
    let twin = Env::new();
    factory(&twin.root);
    let twin_work = tempfile::tempdir().unwrap();
    let twin_pkgs = {
        let (src1, src2) = (twin_work.path().join("src-v1"), twin_work.path().join("src-v2"));
        write_sources(&src1, V1, lab.vs.v1.iter(), &twin.root);
        write_sources(&src2, V2, lab.vs.v2_files(), &twin.root);
        let (p1, p2) = (twin_work.path().join("v1.zip"), twin_work.path().join("v2.zip"));
        pack(twin_work.path(), &src1, &p1, None);
        pack(twin_work.path(), &src2, &p2, None);
        (p1, p2)
    };
    twin.ok(&["install", twin_pkgs.0.to_str().unwrap()]);
    twin.ok(&["install", twin_pkgs.1.to_str().unwrap()]);
    assert_eq!(
        tree(&twin.root),
        lab.trees.new,
        "the full v2 installed by the CLI is the expected tree"
    );

    let d = rig.start();
    download(rig, &d, &lab.v1);
    install(&d, V1);
    assert_eq!(tree(lab.root()), lab.trees.old, "v1 through the daemon");
    assert_eq!(d.status()["current"]["version"], V1);
    let old_inodes = inodes(lab.root(), false);

    // The delta, the way device-api asks for any package: its md5 and size.
    let body: Value = serde_json::from_str(&rig.request(&lab.delta)).unwrap();
    assert_eq!(
        (&body["package_size"], &body["package_md5"]),
        (&json!(lab.delta.bytes.len()), &json!(lab.delta.md5))
    );
    download(rig, &d, &lab.delta);
    assert_eq!(
        std::fs::read(rig.downloaded(&lab.delta)).unwrap(),
        lab.delta.bytes,
        "the downloaded file is the delta package"
    );
    let served_delta: Vec<_> =
        rig.server.hits().into_iter().filter(|h| h.line.contains(&lab.delta.name)).collect();
    assert_eq!(served_delta.len(), 1, "one GET of the delta: {served_delta:?}");
    let seen = install(&d, V2);
    assert!(seen.iter().all(|s| s.error.is_none()), "{seen:#?}");

    // The tree: exactly the full package's, by hash and mode (and the same as the twin's).
    let live = tree(lab.root());
    assert_eq!(
        live,
        lab.trees.new,
        "the delta through the daemon:\n{}",
        explain(&live, &lab.trees.old, &lab.trees.new)
    );
    assert_eq!(live, tree(&twin.root), "the delta install differs from the full install");
    assert!(leftovers(lab.root()).is_empty());
    // Files the device already held were not rewritten (SPEC §3), the factory file neither.
    let now = inodes(lab.root(), false);
    for rel in lab
        .vs
        .v2
        .iter()
        .filter(|(_, s)| *s == Ship::OnDevice)
        .map(|(f, _)| f.target)
        .chain([FACTORY.0])
    {
        assert_eq!(
            now.get(rel),
            old_inodes.get(rel),
            "{rel} was rewritten although its content did not change"
        );
    }
    assert!(!rig.downloaded(&lab.delta).exists(), "the package is cleaned up after the commit");

    let st = d.status();
    assert_eq!(st["current"]["version"], V2, "{st}");
    assert!(st["in_flight"].is_null(), "{st}");
    let tx = st["current"]["tx"].as_u64().unwrap_or_else(|| panic!("{st}"));
    let last = lab.last_tx(&d);
    assert_eq!(
        (&last["id"], &last["to_version"], &last["from_version"], &last["phase"]),
        (&json!(tx), &json!(V2), &json!(V1), &json!("Committed")),
        "{last}"
    );
    assert_eq!(
        last["kind"]["Install"]["package"]["size"],
        lab.delta.bytes.len(),
        "the transaction installed the delta: {last}"
    );
    let got = rig.receiver.wait_for("the final report of the delta install", |r| {
        r.iter().any(|r| r["final"] == true && r["tx_id"] == tx)
    });
    let finals: Vec<&Value> =
        got.iter().filter(|r| r["final"] == true && r["tx_id"] == tx).collect();
    assert_eq!(finals.len(), 1, "{got:#?}");
    assert_eq!(
        (&finals[0]["stage"], &finals[0]["error"]),
        (&json!("success"), &Value::Null),
        "{got:#?}"
    );
    drop(d);

    // And the CLI sees the same, once the daemon is gone.
    let h = rig.env.run(&["history", "--json"]);
    assert_eq!(h.code, Some(0), "{}", h.describe());
    assert_eq!(h.json()[0]["to_version"], V2, "{}", h.describe());
    let v = rig.env.run(&["verify", "--json"]);
    assert_eq!(v.code, Some(0), "{}", v.describe());
    assert_eq!(
        (&v.json()["version"], &v.json()["mismatches"]),
        (&json!(V2), &json!([])),
        "{}",
        v.describe()
    );
    println!(
        "delta {} bytes against full {} bytes; test took {} ms",
        lab.delta.bytes.len(),
        lab.full.bytes.len(),
        started.elapsed().as_millis()
    );
}

#[test]
fn a_delta_package_whose_base_is_missing_is_refused_by_the_daemon_and_nothing_changes() {
    let t0 = Instant::now();
    let lab = DaemonLab::new();
    let rig = &lab.rig;
    rig.env.ok(&["install", lab.paths.v1.to_str().unwrap()]);
    assert_eq!(tree(lab.root()), lab.trees.old);

    // The device drifted: its big file is no longer v1's (same size, a few bytes changed),
    // and no backup holds v1's content (v1 was installed over nothing).
    let drifted = "opt/app/bin/big.bin";
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(lab.root().join(drifted)).unwrap();
        f.write_all_at(b"locally patched", 2 << 20).unwrap();
    }
    let before = tree(lab.root());
    assert_ne!(before, lab.trees.old);
    let before_inodes = inodes(lab.root(), true);

    // The CLI refuses it too, with its stable code and exit 3.
    let r = rig.env.run(&["install", lab.paths.delta.to_str().unwrap()]);
    assert_eq!(
        (r.code, r.error_code().as_deref()),
        (Some(3), Some("DELTA_BASE_MISSING")),
        "{}",
        r.describe()
    );
    assert_eq!(tree(lab.root()), before);

    let d = rig.start();
    download(rig, &d, &lab.delta);
    let ready = d.progress();
    assert_eq!(ready, snap("toInstall", 100, crate::daemon::READY));
    assert_eq!(d.post("/api/v1.0/update", &update_body(V2)), started("installing"));
    let seen = d.watch_after(Some(&ready), "stage failed", |s: &Snap| s.stage == "failed");
    let f = seen.last().unwrap();
    assert_eq!(f.code, 500, "{f:?}");
    assert!(f.message.contains("DELTA_BASE_MISSING"), "the failure must name the code: {f:?}");
    assert!(
        f.message.contains(&lab.root().join(drifted).display().to_string()),
        "the failure must name the file: {f:?}"
    );
    assert!(
        f.message.contains(&format!("full package of version {V2}")),
        "the failure must say which full package would do: {f:?}"
    );

    // Nothing changed: every byte, mode, inode and timestamp; no temporary file; no
    // transaction; still v1.
    assert_eq!(tree(lab.root()), before, "the refused delta changed the tree");
    assert_eq!(inodes(lab.root(), true), before_inodes, "the refused delta touched a file");
    let st = d.status();
    assert_eq!(st["current"]["version"], V1, "{st}");
    assert!(st["in_flight"].is_null(), "{st}");
    // Refused while planning: no transaction was begun (the last one is still v1's).
    assert_eq!(
        (&st["last"]["to_version"], &st["last"]["phase"]),
        (&json!(V1), &json!("Committed")),
        "{st}"
    );
    println!("the refusal, as /progress shows it: {}", f.message);
    let got =
        rig.receiver.wait_for("the failed report", |r| r.iter().any(|r| r["stage"] == "failed"));
    let failed: Vec<&Value> = got.iter().filter(|r| r["stage"] == "failed").collect();
    assert_eq!(failed.len(), 1, "{got:#?}");
    assert_eq!(failed[0]["error"], json!(f.message), "{got:#?}");

    // The full package the message names does the job on the drifted device.
    download(rig, &d, &lab.full);
    install(&d, V2);
    let live = tree(lab.root());
    assert_eq!(
        live,
        lab.trees.new,
        "the full v2 over the drifted device:\n{}",
        explain(&live, &lab.trees.old, &lab.trees.new)
    );
    println!("test took {} ms", t0.elapsed().as_millis());
}
