//! Disk full (SPEC §3 Planned: the statvfs preflight; issue 5 item 2): on small loop-mounted
//! ext4 filesystems of their own, an install meets `ENOSPC` at each write of the transaction
//! in turn — the staged files, the backup store (copies when the state dir is on another
//! filesystem) and the journal's own growth — and must end in a clean rollback (tree byte-identical,
//! `DISK_FULL`, nothing in flight) or a clean success; a transaction left in flight (a journal
//! commit that could not grow the file) must be finished by `recover` once space is freed.
//!
//! The preflight counts bytes, not blocks: a package of many small files needs far more than
//! its byte count on a 4 KiB-block filesystem, which is what lets a filler file leave enough
//! free space to pass the preflight (new bytes + 1 MiB headroom) and still run out mid-way.
//!
//! Needs root (losetup, mount). Without root the tests fail, unless `TOPE_SKIP_ROOT_TESTS=1`,
//! in which case they print "skipped: needs root". Run with
//! `cargo test --features failpoints --test it diskfull -- --nocapture` to see which codes
//! were observed at which filler sizes.

use crate::support::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
/// `limits::FREE_SPACE_RESERVE_BYTES`: the headroom the preflight keeps free.
const HEADROOM: u64 = MIB;
const V2: &str = "2.0.0";

// ---------------------------------------------------------------- root and loop devices

/// True when the test may run. Without root it fails loudly, unless the operator explicitly
/// asked to skip root-only tests; a skip is always printed.
fn have_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("TOPE_SKIP_ROOT_TESTS").as_deref() == Ok("1") {
        println!("{test}: skipped: needs root (TOPE_SKIP_ROOT_TESTS=1)");
        return false;
    }
    panic!(
        "{test} needs root: it loop-mounts small ext4 images (losetup, mount) to run out of space; \
         run the tests as root, or set TOPE_SKIP_ROOT_TESTS=1 to skip the root-only tests explicitly"
    );
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("cannot run {cmd} (needed by the disk-full tests): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A small ext4 filesystem in an image file, loop-mounted; unmounted and detached on drop
/// (also when the test panics). 4 KiB blocks and no root-reserved blocks, so that `statvfs`'s
/// available space is what any writer can use and small files cost a whole block.
struct LoopFs {
    mnt: PathBuf,
    dev: String,
    mounted: bool,
    /// Holds the image and the mount point; removed after the detach.
    _dir: tempfile::TempDir,
}

impl LoopFs {
    fn new(size_mib: u64) -> LoopFs {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let img = image.to_str().unwrap();
        sh("truncate", &["-s", &format!("{size_mib}M"), img]);
        sh("mkfs.ext4", &["-q", "-F", "-b", "4096", "-m", "0", img]);
        let dev = sh("losetup", &["--find", "--show", img]);
        let mut fs = LoopFs { mnt, dev, mounted: false, _dir: dir };
        sh("mount", &[&fs.dev, fs.mnt.to_str().unwrap()]);
        fs.mounted = true;
        fs
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            let ok = Command::new("umount").arg(&self.mnt).status().is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Bytes available on the filesystem holding `path`, exactly as the engine's preflight sees it.
fn avail(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).unwrap();
    st.blocks_available() as u64 * st.fragment_size() as u64
}

fn syncfs(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    nix::unistd::syncfs(&f).unwrap();
}

/// Allocates filler files in `dir` (real blocks, `fallocate`) until the filesystem has about
/// `target` bytes available; returns what is really available.
fn fill_to(dir: &Path, target: u64) -> u64 {
    syncfs(dir);
    for i in 0..4 {
        let a = avail(dir);
        if a <= target + 4 * KIB {
            break;
        }
        let len = (a - target) / (4 * KIB) * (4 * KIB);
        let f = std::fs::File::create(dir.join(format!("filler{i}"))).unwrap();
        nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, len as i64)
            .unwrap_or_else(|e| panic!("fallocate {len} bytes in {} ({a} available): {e}", dir.display()));
        drop(f);
        syncfs(dir);
    }
    avail(dir)
}

fn remove_fillers(dir: &Path) {
    for i in 0..4 {
        let _ = std::fs::remove_file(dir.join(format!("filler{i}")));
    }
    syncfs(dir);
}

// ---------------------------------------------------------------- the device and the package

/// xorshift64, for incompressible, reproducible content.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }

    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

/// Old files (relative path, content, mode) and the v2 package's content: three file modules,
/// one directory module of 500 small files (400 overwrite old small files, 100 are new in new
/// directories) and one new file in new directories.
struct Fixture {
    v1: Vec<(String, Vec<u8>, u32)>,
    /// (module name, dst relative to the root, content) for file modules.
    files: Vec<(&'static str, &'static str, Vec<u8>)>,
    /// (path relative to `www`, content) for the directory module.
    www: Vec<(String, Vec<u8>)>,
}

const OLD_SMALL: usize = 400;
const NEW_SMALL: usize = 100;

impl Fixture {
    fn new() -> Fixture {
        let mut rng = Rng(0xD15C_F011_2026_0005);
        let mut v1 = vec![
            ("bin/app".to_string(), rng.bytes(200 * KIB as usize), 0o755),
            ("lib/big.so".to_string(), rng.bytes(600 * KIB as usize), 0o644),
            ("etc/app.conf".to_string(), b"level = 1\n".to_vec(), 0o640),
            ("share/untouched".to_string(), b"never part of a package\n".to_vec(), 0o444),
        ];
        for i in 0..OLD_SMALL {
            let len = rng.range(100, 700);
            v1.push((format!("www/old/p{i:03}.html"), rng.bytes(len), 0o644));
        }
        let files = vec![
            ("app", "bin/app", rng.bytes(250 * KIB as usize)),
            ("big", "lib/big.so", rng.bytes(700 * KIB as usize)),
            ("conf", "etc/app.conf", b"level = 2\nextra = true\n".to_vec()),
            ("blob", "data/v2/blob.bin", rng.bytes(300 * KIB as usize)),
        ];
        let mut www = Vec::new();
        for i in 0..OLD_SMALL {
            let len = rng.range(200, 1200);
            www.push((format!("old/p{i:03}.html"), rng.bytes(len)));
        }
        for j in 0..NEW_SMALL {
            let len = rng.range(200, 1200);
            www.push((format!("new/n{}/q{j:03}.html", j % 5), rng.bytes(len)));
        }
        Fixture { v1, files, www }
    }

    /// Bytes the install writes beside its targets: the preflight's need on the root's
    /// filesystem.
    fn new_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.2.len() as u64).sum::<u64>() + self.www.iter().map(|f| f.1.len() as u64).sum::<u64>()
    }

    /// Bytes of old content the install replaces: the preflight's need on the backup store's
    /// filesystem when backups must be copies.
    fn old_bytes(&self) -> u64 {
        let targets: BTreeSet<String> =
            self.files.iter().map(|f| f.1.to_string()).chain(self.www.iter().map(|(rel, _)| format!("www/{rel}"))).collect();
        self.v1.iter().filter(|(p, _, _)| targets.contains(p)).map(|(_, c, _)| c.len() as u64).sum()
    }

    /// 4 KiB blocks the new files occupy while staged (all of them exist at once, beside the
    /// old files, just before the swap).
    fn new_blocks_bytes(&self) -> u64 {
        self.files
            .iter()
            .map(|f| f.2.len() as u64)
            .chain(self.www.iter().map(|f| f.1.len() as u64))
            .map(|n| n.div_ceil(4 * KIB) * 4 * KIB)
            .sum()
    }

    /// 4 KiB blocks the copies of the old files occupy in a backup store on another filesystem.
    fn old_blocks_bytes(&self) -> u64 {
        let targets: BTreeSet<String> =
            self.files.iter().map(|f| f.1.to_string()).chain(self.www.iter().map(|(rel, _)| format!("www/{rel}"))).collect();
        self.v1.iter().filter(|(p, _, _)| targets.contains(p)).map(|(_, c, _)| (c.len() as u64).div_ceil(4 * KIB) * 4 * KIB).sum()
    }

    fn seed_v1(&self, env: &Env) {
        for (rel, content, mode) in &self.v1 {
            env.put(rel, content, *mode);
        }
    }

    /// The package (every hash declared), written outside the small filesystems.
    fn package(&self, env: &Env) -> PathBuf {
        let mut mods = Vec::new();
        let mut entries: Vec<(String, &[u8])> = Vec::new();
        for (name, dst, content) in &self.files {
            let src = format!("files/{name}");
            mods.push(json!({"name": name, "src": src, "dst": env.dst(dst), "blake3": blake3_hex(content)}));
            entries.push((src, content));
        }
        let hashes: BTreeMap<&str, String> = self.www.iter().map(|(rel, c)| (rel.as_str(), blake3_hex(c))).collect();
        mods.push(json!({"name": "www", "src": "www/", "dst": env.dst("www"), "files": hashes}));
        entries.extend(self.www.iter().map(|(rel, c)| (format!("www/{rel}"), c.as_slice())));
        let manifest = json!({"version": V2, "modules": mods}).to_string();
        let files: Vec<(&str, &[u8])> = entries.iter().map(|(n, c)| (n.as_str(), *c)).collect();
        let path = env.pkg_path("v2.zip");
        write_package(&path, &manifest, &files);
        path
    }
}

// ---------------------------------------------------------------- a device on small filesystems

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Root and state dir on one small filesystem: backups are hard links.
    Same,
    /// Root on one small filesystem, state dir on another: backups are copies.
    Cross,
}

/// The device: `Env` pointing into the loop filesystems (config and packages stay in a
/// temporary directory on the ordinary disk).
struct Device {
    env: Env,
    layout: Layout,
    /// Holds the root (and in `Same` the state dir).
    a: LoopFs,
    /// Holds the state dir in `Cross`.
    b: Option<LoopFs>,
}

impl Device {
    fn new(layout: Layout) -> Device {
        let a = LoopFs::new(24);
        let b = (layout == Layout::Cross).then(|| LoopFs::new(24));
        let tmp = tempfile::tempdir().unwrap();
        let root = a.path("root");
        let state = match &b {
            None => a.path("state"),
            Some(b) => b.path("state"),
        };
        let config = tmp.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = {:?}\nallowed_roots = [{:?}]\nservice_manager = \"none\"\n",
                state.to_str().unwrap(),
                root.to_str().unwrap()
            ),
        )
        .unwrap();
        Device { env: Env { tmp, root, state, config }, layout, a, b }
    }

    /// The filesystem holding the state dir.
    fn state_fs(&self) -> &LoopFs {
        self.b.as_ref().unwrap_or(&self.a)
    }

    /// Back to v1 with an existing (empty) journal, no filler, everything on disk.
    fn reset(&self, fx: &Fixture) {
        for fs in [Some(&self.a), self.b.as_ref()].into_iter().flatten() {
            remove_fillers(&fs.mnt);
        }
        for d in [&self.env.root, &self.env.state] {
            if d.exists() {
                std::fs::remove_dir_all(d).unwrap();
            }
        }
        std::fs::create_dir(&self.env.root).unwrap();
        std::fs::set_permissions(&self.env.root, std::fs::Permissions::from_mode(0o755)).unwrap();
        fx.seed_v1(&self.env);
        // A device in service has a journal already: create it (nothing in flight).
        let r = self.env.run(&["recover", "--json"]);
        assert_eq!(r.code, Some(0), "setting up the journal:\n{}", r.describe());
        syncfs(&self.a.mnt);
        syncfs(&self.state_fs().mnt);
    }
}

// ---------------------------------------------------------------- checks

fn status(env: &Env, ctx: &str) -> Value {
    let r = env.run(&["status", "--json"]);
    assert_eq!(r.code, Some(0), "{ctx}: status must work:\n{}", r.describe());
    r.json()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Old,
    New,
}

/// Which whole side the tree is on; panics, naming the differing paths, on a mix.
fn side_of(env: &Env, old: &BTreeMap<String, String>, new: &BTreeMap<String, String>, ctx: &str) -> Side {
    let have = tree(&env.root);
    if &have == old {
        return Side::Old;
    }
    if &have == new {
        return Side::New;
    }
    let keys: BTreeSet<&String> = have.keys().chain(old.keys()).chain(new.keys()).collect();
    let not_old: Vec<&String> = keys.into_iter().filter(|k| have.get(*k) != old.get(*k)).collect();
    let (now_new, neither): (Vec<&String>, Vec<&String>) = not_old.into_iter().partition(|k| have.get(*k) == new.get(*k));
    let show =
        |v: &[&String]| v.iter().take(8).map(|k| format!("\n    {k}: have {:?}, old {:?}", have.get(*k), old.get(*k))).collect::<String>();
    panic!(
        "{ctx}: the tree is neither all old nor all new: {} paths are new, {} neither old nor new{}{}",
        now_new.len(),
        neither.len(),
        show(&now_new),
        show(&neither)
    );
}

/// The journal agrees with the tree: nothing in flight, `current` is the tree's side, `verify`
/// passes, a `recover` finds nothing and changes nothing, no temporary file under the root or
/// in the state dir. Temporary files in the state dir are returned (reported together after
/// every level has run), everything else asserted.
fn consistent(env: &Env, side: Side, ctx: &str) -> Vec<String> {
    let s = status(env, ctx);
    assert!(s["in_flight"].is_null(), "{ctx}: a transaction is still in flight: {}", s["in_flight"]);
    let want = match side {
        Side::Old => Value::Null,
        Side::New => json!(V2),
    };
    assert_eq!(s["current"]["version"], want, "{ctx}: the tree is all {side:?} but status says {s}");
    let v = env.run(&["verify"]);
    assert_eq!(v.code, Some(0), "{ctx}: verify disagrees with the journal:\n{}", v.describe());
    let snapshot = tree(&env.root);
    let r = env.run(&["recover", "--json"]);
    assert_eq!(r.code, Some(0), "{ctx}: recover must find nothing to do:\n{}", r.describe());
    assert_eq!(r.json()["result"], "nothing", "{ctx}: recover did something:\n{}", r.describe());
    assert_eq!(tree(&env.root), snapshot, "{ctx}: recover changed the tree");
    assert!(leftovers(&env.root).is_empty(), "{ctx}: temporary files left under the root: {:?}", leftovers(&env.root));
    assert!(!env.state.join("inflight.plan").exists(), "{ctx}: the plan copy outlived its transaction");
    leftovers(&env.state)
}

/// The journal holds no transaction, no plan, and no transaction id was used up.
fn nothing_journaled(env: &Env, ctx: &str) {
    let dump: Value = serde_json::from_str(&env.ok(&["journal"])).unwrap();
    assert!(dump["transactions"] == json!([]) && dump["plans"] == json!([]), "{ctx}: a transaction was journaled: {dump}");
    let next = dump["counters"].as_array().unwrap().iter().find(|c| c[0] == "next_tx_id").map(|c| c[1].clone());
    assert_eq!(next, Some(json!(1)), "{ctx}: a transaction id was used: {dump}");
    assert!(status(env, ctx)["in_flight"].is_null());
    assert!(!env.state.join("inflight.plan").exists(), "{ctx}: a plan copy was written");
}

/// Where a failed install ran out, read from its error message.
fn where_it_ran_out(message: &str) -> &'static str {
    if message.contains(" bytes, ") && message.trim_end().ends_with(" available") {
        "preflight"
    } else if message.contains("journal") {
        "journal"
    } else if message.contains("backup") {
        "backup store"
    } else if message.contains("inflight.plan") {
        "plan copy"
    } else if message.contains(".tope-") {
        "staging"
    } else {
        "other"
    }
}

/// One run at one free-space level.
struct Observed {
    /// Bytes available when the install started, relative to the preflight threshold.
    above_threshold: i64,
    filler: u64,
    exit: Option<i32>,
    code: String,
    /// Where it ran out: the first failing write, then the one that ended the run if different.
    place: String,
    /// How the run ended: committed, rolled back, or in flight and then recovered.
    end: String,
    /// Problems reported after every level has run (the end state is still checked in
    /// full): (kind, example).
    findings: Vec<(String, String)>,
}

/// Runs the install once with about `free` bytes available on `fill_fs` and checks the
/// outcome. Returns what was observed.
#[allow(clippy::too_many_arguments)]
fn one_run(
    dev: &Device,
    fx: &Fixture,
    pkg: &Path,
    fill_fs: &LoopFs,
    threshold: u64,
    free: u64,
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> Observed {
    let env = &dev.env;
    dev.reset(fx);
    let before_fill = avail(&fill_fs.mnt);
    let free = fill_to(&fill_fs.mnt, free);
    let filler = before_fill.saturating_sub(free);
    let above = free as i64 - threshold as i64;
    let ctx = format!("{:?} layout, {} free on {} ({above:+} bytes from the preflight threshold)", dev.layout, free, fill_fs.mnt.display());
    assert_eq!(tree(&env.root), *old, "{ctx}: fixture error: the device is not at v1");
    let history_before = env.run(&["history", "--json"]).json().as_array().map(Vec::len).unwrap_or(0);

    let r = env.run(&["install", pkg.to_str().unwrap(), "--json"]);
    let code = r.error_code().unwrap_or_default();
    let message = r.stderr.lines().find_map(|l| l.strip_prefix("error: ")).unwrap_or("").to_string();
    // The first failure is logged when the phase fails ("phase failed; rolling back ...
    // error=CODE: message"); the one that ended the run is on the `error:` line.
    let first =
        r.stderr.lines().find(|l| l.contains("phase failed")).and_then(|l| l.split_once("error=")).map(|(_, e)| where_it_ran_out(e));
    let last = where_it_ran_out(&message);
    let place = match (r.code, first) {
        (Some(0), _) => String::new(),
        (_, Some(f)) if f != last => format!("{f}, then {last}"),
        _ => last.to_string(),
    };
    let ctx = format!("{ctx}: install exit {:?} {code} ({place})", r.code);
    let mut findings = Vec::new();
    if r.code != Some(0) && code != "DISK_FULL" {
        findings.push((
            format!("ENOSPC at the {last} reported as {code} instead of DISK_FULL"),
            format!("{ctx}: running out of space must be reported as DISK_FULL:\n{}", r.describe()),
        ));
    }
    let mut check = |side: Side, ctx: &str| {
        let left = consistent(env, side, ctx);
        if !left.is_empty() {
            findings.push((
                format!("temporary files left in the state dir after ENOSPC at the {place}"),
                format!("{ctx}: {left:?}\n{}", r.describe()),
            ));
        }
    };
    let end = match r.code {
        Some(0) => {
            assert!(above >= 0, "{ctx}: the install passed the preflight below its threshold:\n{}", r.describe());
            assert_eq!(side_of(env, old, new, &ctx), Side::New, "{ctx}: committed");
            check(Side::New, &ctx);
            "committed".to_string()
        }
        Some(3) | Some(4) => {
            assert_eq!(side_of(env, old, new, &ctx), Side::Old, "{ctx}: rolled back:\n{}", r.describe());
            check(Side::Old, &ctx);
            let history = env.run(&["history", "--json"]).json().as_array().map(Vec::len).unwrap_or(0);
            if place == "preflight" {
                assert!(above < 0, "{ctx}: refused by the preflight although enough space was free:\n{}", r.describe());
                assert_eq!(r.code, Some(3), "{ctx}: a preflight refusal touches nothing: exit 3:\n{}", r.describe());
                assert_eq!(history, history_before, "{ctx}: the preflight refusal journaled a transaction");
                "refused by the preflight".to_string()
            } else {
                assert_eq!(history, history_before + 1, "{ctx}: the rolled-back transaction must be in the history");
                let last = &env.run(&["history", "--json"]).json()[0];
                assert_eq!(last["phase"], "RolledBack", "{ctx}: {last}");
                assert_eq!(last["error"]["code"].as_str(), Some(code.as_str()), "{ctx}: the history names the cause: {last}");
                "rolled back".to_string()
            }
        }
        _ => {
            // The engine stopped without finishing (e.g. a journal commit could not grow the
            // file). It must still have said why, and `recover` must finish the job once
            // space is freed.
            assert_eq!(r.signal, None, "{ctx}: the install was killed:\n{}", r.describe());
            let s = status(env, &ctx);
            if s["in_flight"].is_null() {
                let side = side_of(env, old, new, &format!("{ctx}, nothing in flight"));
                check(side, &ctx);
                format!("stopped, nothing in flight, all {side:?}")
            } else {
                let phase = s["in_flight"]["phase"].as_str().unwrap_or("?").to_string();
                // First `recover` with the disk still full (a reboot before anyone freed
                // space): observed and reported; it must not be killed and must leave the
                // device recoverable.
                let early = env.run(&["recover", "--json"]);
                assert_eq!(early.signal, None, "{ctx}: recover on the full disk was killed:\n{}", early.describe());
                let early_code = early.error_code().unwrap_or_default();
                let early_note = format!("recover while full: exit {:?} {early_code}", early.code);
                let in_flight = !status(env, &ctx)["in_flight"].is_null();
                remove_fillers(&fill_fs.mnt);
                let ctx = format!("{ctx}, left in flight in {phase}, {early_note}");
                let rec = env.run(&["recover", "--json"]);
                if in_flight {
                    assert!(
                        matches!(rec.code, Some(0) | Some(4)),
                        "{ctx}: recover after freeing space must finish the transaction:\n{}",
                        rec.describe()
                    );
                } else {
                    assert_eq!(rec.code, Some(0), "{ctx}: nothing was left in flight:\n{}", rec.describe());
                }
                let side = side_of(env, old, new, &format!("{ctx}, then recovered"));
                if rec.code == Some(4) || (!in_flight && early.code == Some(4)) {
                    assert_eq!(side, Side::Old, "{ctx}: recover reported a rollback");
                }
                check(side, &format!("{ctx}, then recovered"));
                format!("left in flight in {phase}; {early_note}; with space freed, recover -> all {side:?}")
            }
        }
    };
    Observed { above_threshold: above, filler, exit: r.code, code, place, end, findings }
}

/// Steps the free space on `fill_fs` from just below the preflight threshold to past what a
/// clean install really uses, one install per step, and reports what each step ended with.
fn step_through(test: &str, layout: Layout, fill_state_fs: bool) -> Vec<Observed> {
    let started = Instant::now();
    let fx = Fixture::new();
    let dev = Device::new(layout);
    let pkg = fx.package(&dev.env);
    let fill_fs = if fill_state_fs { dev.state_fs() } else { &dev.a };
    // The preflight's need on the filled filesystem.
    // And the blocks the transaction really occupies there at its peak, at least.
    let (need, blocks) = match (layout, fill_state_fs) {
        (Layout::Same, _) | (Layout::Cross, false) => (fx.new_bytes(), fx.new_blocks_bytes()),
        (Layout::Cross, true) => (fx.old_bytes(), fx.old_blocks_bytes()),
    };
    let threshold = need + HEADROOM;

    // A clean install with room to spare: the two trees, and what it leaves used (the old
    // files it frees on the root's filesystem when the backups are copies elsewhere hide
    // its peak there, hence `blocks` too).
    dev.reset(&fx);
    let old = tree(&dev.env.root);
    let free_before = avail(&fill_fs.mnt);
    dev.env.ok(&["install", pkg.to_str().unwrap()]);
    syncfs(&fill_fs.mnt);
    let used = free_before - avail(&fill_fs.mnt);
    let new = tree(&dev.env.root);
    assert_ne!(old, new);
    println!(
        "{test}: {layout:?} layout, filling {}: preflight needs {need} + {HEADROOM} headroom = {threshold} bytes; \
         the files take {blocks} bytes in 4 KiB blocks; a clean install leaves {used} more bytes used",
        if fill_state_fs { "the state dir's filesystem" } else { "the root's filesystem" }
    );
    let peak = used.max(blocks);
    assert!(
        peak > threshold,
        "fixture error: the install needs at most {peak} bytes, no more than the preflight threshold {threshold}: \
         no free-space level can pass the preflight and then run out"
    );

    // Levels: just below the threshold, the threshold itself, then evenly up to past the peak.
    let lo = threshold - 8 * KIB;
    let hi = peak + 256 * KIB;
    let mut levels = vec![lo, threshold];
    let steps = 14;
    for i in 1..=steps {
        levels.push(threshold + (hi - threshold) * i / steps / (4 * KIB) * (4 * KIB));
    }
    levels.dedup();

    let mut seen = Vec::new();
    let mut failures = Vec::new();
    for free in levels {
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| one_run(&dev, &fx, &pkg, fill_fs, threshold, free, &old, &new)));
        match result {
            Ok(o) => {
                println!(
                    "  [{test}] {:>+9} bytes vs threshold (filler {:>9}): exit {:?} {:<14} {:<24} {}",
                    o.above_threshold, o.filler, o.exit, o.code, o.place, o.end
                );
                seen.push(o);
            }
            Err(e) => {
                let msg = e.downcast_ref::<String>().cloned().unwrap_or_else(|| "non-string panic".into());
                println!("  FAIL at {free} bytes free");
                failures.push(msg);
            }
        }
    }
    println!("{test}: {} runs in {:.1} s", seen.len() + failures.len(), started.elapsed().as_secs_f64());
    // Findings, grouped by kind: the levels where each was seen, and one example.
    let mut grouped: BTreeMap<&str, (Vec<i64>, &str)> = BTreeMap::new();
    for o in &seen {
        for (kind, example) in &o.findings {
            grouped.entry(kind.as_str()).or_insert_with(|| (Vec::new(), example.as_str())).0.push(o.above_threshold);
        }
    }
    for (kind, (levels, example)) in grouped {
        failures.push(format!("{kind}: at {} level(s) (bytes vs threshold {levels:?}); e.g.\n{example}", levels.len()));
    }
    assert!(failures.is_empty(), "{test}: {} run(s) failed:\n\n{}", failures.len(), failures.join("\n\n"));
    let ends: BTreeSet<&str> = seen.iter().map(|o| o.end.as_str()).collect();
    assert!(ends.contains("refused by the preflight"), "{test}: no level was refused by the preflight: {ends:?}");
    assert!(ends.contains("committed"), "{test}: no level let the install succeed: {ends:?}");
    assert!(
        seen.iter().any(|o| o.exit != Some(0) && o.place != "preflight"),
        "{test}: no level ran out of space after the preflight: the test exercised nothing: {ends:?}"
    );
    seen
}

// ---------------------------------------------------------------- tests

#[test]
fn a_package_bigger_than_the_free_space_is_refused_by_the_preflight_before_anything_is_journaled() {
    const T: &str = "preflight";
    if !have_root(T) {
        return;
    }
    let fx = Fixture::new();
    for layout in [Layout::Same, Layout::Cross] {
        let dev = Device::new(layout);
        let env = &dev.env;
        let pkg = fx.package(env);
        dev.reset(&fx);
        let old = tree(&env.root);
        // Less free space than the new content alone.
        let free = fill_to(&dev.a.mnt, fx.new_bytes() / 2);
        let ctx = format!("{layout:?} layout, {free} bytes free for {} new bytes", fx.new_bytes());
        let r = env.run(&["install", pkg.to_str().unwrap()]);
        assert_eq!(r.code, Some(3), "{ctx}: refused, nothing touched: exit 3:\n{}", r.describe());
        assert_eq!(r.error_code().as_deref(), Some("DISK_FULL"), "{ctx}:\n{}", r.describe());
        assert!(r.stderr.contains(&format!("{free} available")), "{ctx}: the message names the free space:\n{}", r.describe());
        assert_eq!(tree(&env.root), old, "{ctx}: the tree was touched");
        assert!(leftovers(&env.root).is_empty(), "{ctx}: {:?}", leftovers(&env.root));
        assert!(leftovers(&env.state).is_empty(), "{ctx}: {:?}", leftovers(&env.state));
        assert!(!env.state.join("inflight.plan").exists(), "{ctx}: a plan copy was written before the preflight");
        // The preflight runs before the plan is journaled: no transaction, no plan, no id used.
        nothing_journaled(env, &ctx);

        if layout == Layout::Cross {
            // The backups need copies on the state dir's filesystem: the preflight counts them.
            remove_fillers(&dev.a.mnt);
            let state_fs = dev.state_fs();
            let free = fill_to(&state_fs.mnt, fx.old_bytes() + HEADROOM / 2);
            let ctx = format!("Cross layout, {free} bytes free on the state dir's filesystem for {} old bytes", fx.old_bytes());
            let r = env.run(&["install", pkg.to_str().unwrap()]);
            assert_eq!(r.code, Some(3), "{ctx}: refused, nothing touched: exit 3:\n{}", r.describe());
            assert_eq!(r.error_code().as_deref(), Some("DISK_FULL"), "{ctx}:\n{}", r.describe());
            assert!(r.stderr.contains(env.state.to_str().unwrap()), "{ctx}: the message names the state dir:\n{}", r.describe());
            assert_eq!(tree(&env.root), old, "{ctx}: the tree was touched");
            nothing_journaled(env, &ctx);
        }

        // With the space back, the same package installs.
        dev.reset(&fx);
        env.ok(&["install", pkg.to_str().unwrap()]);
        assert_eq!(status(env, "after freeing space")["current"]["version"], V2);
    }
}

#[test]
fn running_out_of_space_at_any_write_with_root_and_state_on_one_filesystem_rolls_back_cleanly_or_recover_finishes() {
    const T: &str = "same filesystem";
    if !have_root(T) {
        return;
    }
    step_through(T, Layout::Same, false);
}

#[test]
fn running_out_of_space_while_staging_with_the_state_dir_on_another_filesystem_rolls_back_cleanly() {
    const T: &str = "cross, root full";
    if !have_root(T) {
        return;
    }
    step_through(T, Layout::Cross, false);
}

#[test]
fn running_out_of_space_for_backup_copies_and_the_journal_on_the_state_filesystem_rolls_back_cleanly_or_recover_finishes() {
    const T: &str = "cross, state full";
    if !have_root(T) {
        return;
    }
    step_through(T, Layout::Cross, true);
}
