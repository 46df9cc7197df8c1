//! Disk full (SPEC §3 Planned: the statvfs preflight; issue 5 item 2), on small loop-mounted
//! ext4 filesystems of their own (4 KiB blocks, no reserved blocks; the images live on tmpfs
//! when there is one, so the engine's fsyncs stay cheap).
//!
//! The preflight counts whole blocks per file plus a journal reserve and 1 MiB headroom, so a
//! package that passes it does not run out of space by itself. Two tests pin the preflight: a
//! package bigger than the free space, and many tiny files whose bytes fit but whose blocks do
//! not, are refused before anything is journaled.
//!
//! To meet `ENOSPC` at every write of a transaction anyway, the other tests change the world
//! *after* the preflight: the real binary (built with the `failpoints` feature) is started
//! with `FAILPOINTS="<point>=1*sleep(ms)"`; the test sees it sleeping at that crash point (its
//! main thread in `nanosleep`, the plan copy on disk), stops it (SIGSTOP, so the pause cannot
//! run out on a loaded machine), fills the filesystem until exactly X bytes are available, and
//! lets it run to its end. Installs paused after each phase commit, a `rollback --to factory`
//! and `recover` itself (after an install killed mid-staging or mid-swap), with the root and
//! the state dir on one filesystem or on two (filling either). X steps from 0 upward in 4 KiB
//! steps (where the journal commits and directory blocks live), then doubles until the
//! transaction commits, then bisects the last gap down to 4 KiB and takes one more 4 KiB step
//! either side of the edge; one scenario instead gives each backup copy of a rollback in turn
//! exactly the last free blocks. Every run must end in one of:
//!
//! - committed: all new, journal consistent;
//! - rolled back with `DISK_FULL`: all old, the transaction `RolledBack` in the history with
//!   `DISK_FULL`, no `.tope-` file under the root or in the state dir, nothing in flight;
//! - interrupted (the journal itself could not be written; exit 1, `DISK_FULL`): in flight,
//!   every path whole (old or new); a `recover` on the still-full disk must not make it worse
//!   (never killed, never `RollbackFailed`, any end it reaches consistent), and after the filler
//!   is deleted a `recover` ends all old or all new with nothing in flight.
//!
//! Never a mixed tree after the final `recover`. A compact table of what each level ended with
//! is printed per scenario (`-- --nocapture`): free bytes, exit, code, outcome, where it ran
//! out (from the engine's messages), and the end after any recovery.
//!
//! Needs root (losetup, mount): built by another user, build.rs makes them `#[ignore]`d
//! ("needs root", counted in cargo's summary). Run with
//! `cargo test --features failpoints --test it diskfull -- --nocapture`.

use crate::support::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// The block size of the test filesystems (`mkfs.ext4 -b 4096`).
const BLOCK: u64 = 4 * KIB;
/// `limits::FREE_SPACE_RESERVE_BYTES`: the headroom the preflight keeps free.
const HEADROOM: u64 = MIB;
const V2: &str = "2.0.0";

// ---------------------------------------------------------------- root and loop devices

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (needed by the disk-full tests): {e}"));
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
/// available space is what any writer (root included) can use and small files cost a whole
/// block.
struct LoopFs {
    mnt: PathBuf,
    dev: String,
    mounted: bool,
    /// Holds the image and the mount point; removed after the detach.
    _dir: tempfile::TempDir,
}

impl LoopFs {
    fn new(size_mib: u64) -> LoopFs {
        // The image on tmpfs when there is one: the engine's many fsyncs then cost nothing on
        // the host's disk, and the tests stay fast. The filesystem under test is the same.
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("tope-diskfull-")
                .tempdir_in(shm)
                .or_else(|_| tempfile::tempdir())
                .unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
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

    fn filler(&self) -> PathBuf {
        self.mnt.join("filler")
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

/// Grows or shrinks one filler file (real blocks, `fallocate`) at the top of `fs` until
/// exactly `want` bytes are available; returns what is available in the end (`want` unless
/// less was free to begin with). A request the filesystem cannot meet in one piece (its
/// extent tree needs blocks too) is retried in smaller pieces.
fn fill_to(fs: &LoopFs, want: u64) -> u64 {
    let path = fs.filler();
    let f =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).unwrap();
    syncfs(&fs.mnt);
    let mut cap = u64::MAX;
    for _ in 0..32 {
        let have = avail(&fs.mnt);
        let len = f.metadata().unwrap().len();
        if have == want || (have < want && len == 0) {
            break;
        }
        if have > want {
            let more = (have - want).min(cap).max(BLOCK);
            match nix::fcntl::fallocate(
                &f,
                nix::fcntl::FallocateFlags::empty(),
                len as i64,
                more as i64,
            ) {
                Ok(()) => {}
                Err(nix::errno::Errno::ENOSPC) => cap = (more / 2).next_multiple_of(BLOCK),
                Err(e) => panic!(
                    "fallocate {more} more bytes in {} ({have} available): {e}",
                    path.display()
                ),
            }
        } else {
            f.set_len(len.saturating_sub(want - have)).unwrap();
        }
        f.sync_all().unwrap();
        syncfs(&fs.mnt);
    }
    avail(&fs.mnt)
}

fn remove_filler(fs: &LoopFs) {
    let _ = std::fs::remove_file(fs.filler());
    syncfs(&fs.mnt);
}

// ---------------------------------------------------------------- the device and the package

/// Old files (relative path, content, mode) and the v2 package's content: three file modules
/// that replace old files, one new file in new directories, and one directory module of small
/// files (most overwrite old small files, some are new in new directories).
struct Fixture {
    v1: Vec<(String, Vec<u8>, u32)>,
    /// (module name, dst relative to the root, content) for file modules.
    files: Vec<(&'static str, &'static str, Vec<u8>)>,
    /// (path relative to `www`, content) for the directory module.
    www: Vec<(String, Vec<u8>)>,
}

const OLD_SMALL: usize = 32;
const NEW_SMALL: usize = 8;
/// Long names make the plan, the generation and the factory rows big enough that the later
/// journal commits need new blocks, without the cost of more files.
const LONG: &str = "a-long-file-name-that-makes-every-journal-record-of-this-target-bigger-\
                    so-that-the-later-commits-of-the-transaction-need-new-blocks-of-the-\
                    journal-file-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

impl Fixture {
    fn new() -> Fixture {
        let mut rng = XorShift::new(0xD15C_F011_2026_0005);
        let mut v1 = vec![
            ("bin/app".to_string(), rng.bytes(120 * KIB as usize), 0o755),
            ("lib/big.so".to_string(), rng.bytes(300 * KIB as usize), 0o644),
            ("etc/app.conf".to_string(), b"level = 1\n".to_vec(), 0o640),
            ("share/untouched".to_string(), b"never part of a package\n".to_vec(), 0o444),
        ];
        for i in 0..OLD_SMALL {
            let len = rng.range(100, 700);
            v1.push((format!("www/old/p{i:03}-{LONG}.html"), rng.bytes(len), 0o644));
        }
        let files = vec![
            ("app", "bin/app", rng.bytes(150 * KIB as usize)),
            ("big", "lib/big.so", rng.bytes(350 * KIB as usize)),
            ("conf", "etc/app.conf", b"level = 2\nextra = true\n".to_vec()),
            ("blob", "data/v2/blob.bin", rng.bytes(100 * KIB as usize)),
        ];
        let mut www = Vec::new();
        for i in 0..OLD_SMALL {
            let len = rng.range(200, 1200);
            www.push((format!("old/p{i:03}-{LONG}.html"), rng.bytes(len)));
        }
        for j in 0..NEW_SMALL {
            let len = rng.range(200, 1200);
            www.push((format!("new/n{}/q{j:03}-{LONG}.html", j % 4), rng.bytes(len)));
        }
        Fixture { v1, files, www }
    }

    /// Bytes the install writes beside its targets.
    fn new_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.2.len() as u64).sum::<u64>()
            + self.www.iter().map(|f| f.1.len() as u64).sum::<u64>()
    }

    /// Bytes of old content the install replaces: what the backup store copies when it is on
    /// another filesystem.
    fn old_bytes(&self) -> u64 {
        let targets: BTreeSet<String> = self
            .files
            .iter()
            .map(|f| f.1.to_string())
            .chain(self.www.iter().map(|(rel, _)| format!("www/{rel}")))
            .collect();
        self.v1.iter().filter(|(p, _, _)| targets.contains(p)).map(|(_, c, _)| c.len() as u64).sum()
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
            mods.push(json!({
                "name": name,
                "src": src,
                "dst": env.dst(dst),
                "blake3": blake3_hex(content),
            }));
            entries.push((src, content));
        }
        let hashes: BTreeMap<&str, String> =
            self.www.iter().map(|(rel, c)| (rel.as_str(), blake3_hex(c))).collect();
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

/// The device: `Env` pointing into the loop filesystems (config, packages and captured
/// output stay in a temporary directory on the ordinary disk).
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
        let a = LoopFs::new(16);
        let b = (layout == Layout::Cross).then(|| LoopFs::new(16));
        let tmp = tempfile::tempdir().unwrap();
        let root = a.path("root");
        let state = match &b {
            None => a.path("state"),
            Some(b) => b.path("state"),
        };
        let config = tmp.path().join("config.toml");
        write_config(&config, &state, &root, "");
        Device { env: Env { tmp, root, state, config }, layout, a, b }
    }

    /// The filesystem holding the state dir.
    fn state_fs(&self) -> &LoopFs {
        self.b.as_ref().unwrap_or(&self.a)
    }

    /// Back to v1 with an existing (empty) journal, no filler, everything on disk.
    fn reset(&self, fx: &Fixture) {
        for fs in [Some(&self.a), self.b.as_ref()].into_iter().flatten() {
            remove_filler(fs);
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

/// Paths (relative to `dir`) of the engine's temporary files (`.tope-` prefix), by name only.
fn temp_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_name().to_string_lossy().starts_with(".tope-") {
                out.push(p.strip_prefix(dir).unwrap_or(&p).display().to_string());
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// No temporary file of the engine under the root or in the state dir (backup store included).
fn no_temp_files(env: &Env, ctx: &str) {
    let root = temp_files(&env.root);
    assert!(root.is_empty(), "{ctx}: temporary files left under the root: {root:?}");
    let state = temp_files(&env.state);
    assert!(state.is_empty(), "{ctx}: temporary files left in the state dir: {state:?}");
}

/// The journal holds no transaction, no plan, and no transaction id was used up.
fn nothing_journaled(env: &Env, ctx: &str) {
    let dump: Value = serde_json::from_str(&env.ok(&["journal"])).unwrap();
    assert!(
        dump["transactions"] == json!([]) && dump["plans"] == json!([]),
        "{ctx}: a transaction was journaled: {dump}"
    );
    let next = dump["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c[0] == "next_tx_id")
        .map(|c| c[1].clone());
    assert_eq!(next, Some(json!(1)), "{ctx}: a transaction id was used: {dump}");
    assert!(status(env, ctx)["in_flight"].is_null(), "{ctx}: something is in flight");
    assert!(!env.state.join("inflight.plan").exists(), "{ctx}: a plan copy was written");
}

/// A preflight refusal: exit 3, `DISK_FULL` with the free space named, nothing touched,
/// nothing journaled, no temporary file anywhere. Returns the bytes the preflight said it needs.
fn refused_by_preflight(
    env: &Env,
    r: &Run,
    free: u64,
    old: &BTreeMap<String, String>,
    ctx: &str,
) -> u64 {
    assert_eq!(r.code, Some(3), "{ctx}: refused, nothing touched: exit 3:\n{}", r.describe());
    assert_eq!(r.error_code().as_deref(), Some("DISK_FULL"), "{ctx}:\n{}", r.describe());
    let message = r.stderr.lines().find_map(|l| l.strip_prefix("error: DISK_FULL: ")).unwrap_or("");
    assert!(
        message.ends_with(&format!(" {free} available")),
        "{ctx}: the message names the free space ({free}):\n{}",
        r.describe()
    );
    let need = message
        .split_once(" needs ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| {
            panic!(
                "{ctx}: the message names the bytes needed (\"... needs N bytes ...\"):\n{}",
                r.describe()
            )
        });
    assert!(
        need > free,
        "{ctx}: refused although {free} bytes were available for {need}:\n{}",
        r.describe()
    );
    assert_eq!(tree(&env.root), *old, "{ctx}: the tree was touched");
    no_temp_files(env, ctx);
    // The preflight runs before the plan is journaled: no transaction, no plan, no id used.
    nothing_journaled(env, ctx);
    need
}

// ---------------------------------------------------------------- tests: the preflight

#[test]
#[cfg_attr(
    tope_unprivileged,
    ignore = "needs root: loop-mounts ext4 images; run as root (README.md: Tests that need root)"
)]
fn a_package_bigger_than_the_free_space_is_refused_by_the_preflight_before_anything_is_journaled() {
    const T: &str = "preflight";
    crate::support::require_root(
        T,
        "it loop-mounts small ext4 images (losetup, mount) to run out of space",
    );
    let fx = Fixture::new();
    for layout in [Layout::Same, Layout::Cross] {
        let dev = Device::new(layout);
        let env = &dev.env;
        let pkg = fx.package(env);
        dev.reset(&fx);
        let old = tree(&env.root);
        // Less free space than the new content alone.
        let free = fill_to(&dev.a, fx.new_bytes() / 2 / BLOCK * BLOCK);
        let ctx =
            format!("{:?} layout, {free} bytes free for {} new bytes", dev.layout, fx.new_bytes());
        let r = env.run(&["install", pkg.to_str().unwrap()]);
        refused_by_preflight(env, &r, free, &old, &ctx);

        if layout == Layout::Cross {
            // The backups need copies on the state dir's filesystem: the preflight counts them.
            remove_filler(&dev.a);
            let state_fs = dev.state_fs();
            let free = fill_to(state_fs, (fx.old_bytes() + HEADROOM / 2) / BLOCK * BLOCK);
            let ctx = format!(
                "Cross layout, {free} bytes free on the state dir's filesystem for {} old bytes",
                fx.old_bytes()
            );
            let r = env.run(&["install", pkg.to_str().unwrap()]);
            refused_by_preflight(env, &r, free, &old, &ctx);
            assert!(
                r.stderr.contains(env.state.to_str().unwrap()),
                "{ctx}: the message names the state dir:\n{}",
                r.describe()
            );
        }

        // With the space back, the same package installs.
        dev.reset(&fx);
        env.ok(&["install", pkg.to_str().unwrap()]);
        assert_eq!(status(env, "after freeing space")["current"]["version"], V2);
    }
}

#[test]
#[cfg_attr(
    tope_unprivileged,
    ignore = "needs root: loop-mounts ext4 images; run as root (README.md: Tests that need root)"
)]
fn many_tiny_files_whose_bytes_fit_but_whose_blocks_do_not_are_refused_by_the_preflight() {
    const T: &str = "preflight counts blocks";
    crate::support::require_root(
        T,
        "it loop-mounts small ext4 images (losetup, mount) to run out of space",
    );
    const FILES: u64 = 400;
    const SIZE: usize = 16;
    let dev = Device::new(Layout::Same);
    let env = &dev.env;
    let fx = Fixture::new();
    dev.reset(&fx);
    let old = tree(&env.root);
    // A directory module of 400 new 16-byte files: 6400 bytes, but 400 blocks once written.
    let mut rng = XorShift::new(0x7111_F11E);
    let tiny: Vec<(String, Vec<u8>)> =
        (0..FILES).map(|i| (format!("tiny/t{i:03}"), rng.bytes(SIZE))).collect();
    let hashes: BTreeMap<String, String> = tiny
        .iter()
        .map(|(n, c)| (n.trim_start_matches("tiny/").to_string(), blake3_hex(c)))
        .collect();
    let manifest = json!({
        "version": V2,
        "modules": [{"name": "tiny", "src": "tiny/", "dst": env.dst("tiny"), "files": hashes}],
    });
    let files: Vec<(&str, &[u8])> = tiny.iter().map(|(n, c)| (n.as_str(), c.as_slice())).collect();
    let pkg = env.pkg_path("tiny.zip");
    write_package(&pkg, &manifest.to_string(), &files);
    let bytes = FILES * SIZE as u64;
    let blocks = FILES * BLOCK;
    // Room for the bytes, the headroom and a generous 1 KiB per target for the journal, with
    // half a MiB to spare: a byte-counting preflight passes this; the blocks do not fit.
    let free = fill_to(&dev.a, (bytes + HEADROOM + FILES * KIB + MIB / 2).next_multiple_of(BLOCK));
    assert!(
        free > bytes + HEADROOM + FILES * KIB && free < blocks + HEADROOM,
        "fixture error: {free} bytes free"
    );
    let ctx = format!(
        "{FILES} files of {SIZE} bytes ({bytes} bytes, {blocks} in blocks), {free} bytes free"
    );
    let r = env.run(&["install", pkg.to_str().unwrap()]);
    let need = refused_by_preflight(env, &r, free, &old, &ctx);
    assert!(
        need >= blocks + HEADROOM,
        "{ctx}: the preflight asked for {need} bytes, less than the blocks plus the headroom"
    );

    // Exactly what the preflight asked for is enough: it passes, and the install commits.
    let free = fill_to(&dev.a, need);
    assert_eq!(free, need, "fixture error: could not leave exactly {need} bytes free");
    let r = env.run(&["install", pkg.to_str().unwrap(), "--json"]);
    assert_eq!(
        r.code,
        Some(0),
        "{ctx}: with the {need} bytes the preflight asked for, the install must commit:\n{}",
        r.describe()
    );
    let s = status(env, &ctx);
    assert_eq!(s["current"]["version"], V2, "{ctx}: {s}");
    assert!(s["in_flight"].is_null(), "{ctx}: {s}");
    for (rel, content) in &tiny {
        assert_eq!(env.read(rel).as_deref(), Some(content.as_slice()), "{ctx}: {rel}");
    }
    println!("{T}: {ctx}: refused (needs {need}); with {need} free the install committed");
}

// ------------------------------------------------------------- tests: ENOSPC after the preflight

#[cfg(not(feature = "failpoints"))]
#[test]
fn disk_full_tests_need_the_failpoints_feature() {
    panic!(
        "the disk-full tests pause the real binary at crash points to fill the disk after the \
         preflight: run `cargo test --features failpoints --test it diskfull -- --nocapture`"
    );
}

#[cfg(feature = "failpoints")]
mod starved {
    use super::*;
    use crate::pause::{SLEEPS_MS, Spawned, spawn_paused};
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::time::{Duration, Instant};
    use tope_updater::failpoint::CRASH_POINTS;

    // ------------------------------------------------------------ scenarios

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Tx {
        /// `install v2.zip` from v1.
        Install,
        /// `rollback --to factory` after a clean install of v2.
        RollbackToFactory,
        /// `recover` after an install killed at the given crash spec.
        Recover { crash: &'static str },
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Fill {
        Root,
        State,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Levels {
        /// From 0 in single blocks (where the journal commits and directory blocks live), then
        /// doubling until the transaction commits, then bisecting the last gap to one block,
        /// plus one block either side of the edge.
        Explore,
        /// Exactly the space of the first 1, 2, 3, ... backup copies (whole blocks, in plan
        /// order): each copy in turn takes the last free block, so whatever it writes next
        /// (its rename into the store, which may need a new directory block, or the next
        /// copy) meets ENOSPC.
        EachBackupCopy,
    }

    #[derive(Debug, Clone, Copy)]
    struct Scenario {
        tx: Tx,
        pause: &'static str,
        fill: Fill,
        levels: Levels,
    }

    impl Scenario {
        fn name(&self, layout: Layout) -> String {
            let what = match self.tx {
                Tx::Install => "install".to_string(),
                Tx::RollbackToFactory => "rollback --to factory".to_string(),
                Tx::Recover { crash } => format!("recover after a crash at {crash}"),
            };
            let fs = match (layout, self.fill) {
                (Layout::Same, _) => "one filesystem",
                (Layout::Cross, Fill::Root) => "root's filesystem full",
                (Layout::Cross, Fill::State) => "state's filesystem full",
            };
            format!("{fs}: {what}, paused at {}", self.pause)
        }
    }

    /// The two ends of the transaction under test: the tree and the `current` version.
    struct Sides {
        old: BTreeMap<String, String>,
        new: BTreeMap<String, String>,
        old_version: Value,
        new_version: Value,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Side {
        Old,
        New,
    }

    impl Sides {
        fn version(&self, side: Side) -> &Value {
            match side {
                Side::Old => &self.old_version,
                Side::New => &self.new_version,
            }
        }

        /// Which whole side the tree is on (panics, naming the differing paths, on a mix),
        /// and the journal agrees (`consistent`).
        fn settled(&self, env: &Env, ctx: &str) -> Side {
            let have = tree(&env.root);
            let side = if have == self.old {
                Side::Old
            } else if have == self.new {
                Side::New
            } else {
                let keys: BTreeSet<&String> =
                    have.keys().chain(self.old.keys()).chain(self.new.keys()).collect();
                let not_old: Vec<&String> =
                    keys.into_iter().filter(|k| have.get(*k) != self.old.get(*k)).collect();
                let (now_new, neither): (Vec<&String>, Vec<&String>) =
                    not_old.into_iter().partition(|k| have.get(*k) == self.new.get(*k));
                let show = |v: &[&String]| {
                    v.iter()
                        .take(8)
                        .map(|k| {
                            format!(
                                "\n    {k}: have {:?}, old {:?}",
                                have.get(*k),
                                self.old.get(*k)
                            )
                        })
                        .collect::<String>()
                };
                panic!(
                    "{ctx}: the tree is neither all old nor all new: {} paths are new, \
                     {} neither old nor new{}{}",
                    now_new.len(),
                    neither.len(),
                    show(&now_new),
                    show(&neither)
                );
            };
            self.consistent(env, side, &have, ctx);
            side
        }

        /// The journal agrees with the tree (`have`) on `side`: nothing in flight, `current`
        /// is that side, `verify` passes, a `recover` finds nothing and changes nothing, no
        /// temporary file under the root or in the state dir, no plan copy.
        fn consistent(&self, env: &Env, side: Side, have: &BTreeMap<String, String>, ctx: &str) {
            let s = status(env, ctx);
            assert!(
                s["in_flight"].is_null(),
                "{ctx}: a transaction is still in flight: {}",
                s["in_flight"]
            );
            assert_eq!(
                &s["current"]["version"],
                self.version(side),
                "{ctx}: the tree is all {side:?} but status says {s}"
            );
            let v = env.run(&["verify"]);
            assert_eq!(
                v.code,
                Some(0),
                "{ctx}: verify disagrees with the journal:\n{}",
                v.describe()
            );
            let r = env.run(&["recover", "--json"]);
            assert_eq!(
                r.code,
                Some(0),
                "{ctx}: recover must find nothing to do:\n{}",
                r.describe()
            );
            assert_eq!(
                r.json()["result"],
                "nothing",
                "{ctx}: recover did something:\n{}",
                r.describe()
            );
            assert_eq!(tree(&env.root), *have, "{ctx}: recover changed the tree");
            no_temp_files(env, ctx);
            assert!(
                !env.state.join("inflight.plan").exists(),
                "{ctx}: the plan copy outlived its transaction"
            );
        }

        /// While a transaction is in flight the tree may mix old and new paths, but every path
        /// holds its whole old or whole new state (staged `.tope-` files aside): recoverable.
        fn recoverable(&self, env: &Env, ctx: &str) -> usize {
            let have = tree(&env.root);
            let keys: BTreeSet<&String> =
                have.keys().chain(self.old.keys()).chain(self.new.keys()).collect();
            let mut new = 0;
            for k in keys
                .into_iter()
                .filter(|k| !k.rsplit('/').next().unwrap_or("").starts_with(".tope-"))
            {
                let h = have.get(k);
                assert!(
                    h == self.old.get(k) || h == self.new.get(k),
                    "{ctx}: {k} is torn: have {h:?}, old {:?}, new {:?}",
                    self.old.get(k),
                    self.new.get(k)
                );
                new += usize::from(h != self.old.get(k));
            }
            new
        }
    }

    /// What one level ended with.
    struct Row {
        /// Bytes available on the filled filesystem when the command was resumed.
        free: u64,
        exit: Option<i32>,
        code: String,
        outcome: String,
        /// Where it ran out, from the engine's own messages.
        place: String,
        end: String,
        committed: bool,
        /// Problems that do not stop the run's checks, reported after every level has run:
        /// (kind, example).
        findings: Vec<(String, String)>,
    }

    /// Where a failure happened, read from the engine's log and error line: the phase that
    /// failed first (if one did) and what the final error was about.
    fn place_of(r: &Run) -> String {
        let first = r.stderr.lines().find(|l| l.contains("phase failed")).and_then(|l| {
            let phase = l.split_once("phase=")?.1.split_whitespace().next()?.to_string();
            Some(format!(
                "{phase}: {}",
                what_of(l.split_once("error=").map(|(_, e)| e).unwrap_or(""))
            ))
        });
        let last = r.stderr.lines().find_map(|l| l.strip_prefix("error: ")).map(what_of);
        match (first, last) {
            (Some(f), Some(l)) if !f.ends_with(&l) => format!("{f}, then {l}"),
            (Some(f), _) => f,
            (None, Some(l)) => l,
            (None, None) => String::new(),
        }
    }

    /// "op object" from an engine message (`CODE: op path: error`), e.g. "write staged file".
    fn what_of(message: &str) -> String {
        let m = match message.split_once(": ") {
            Some((code, rest)) if code.chars().all(|c| c.is_ascii_uppercase() || c == '_') => rest,
            _ => message,
        };
        let op = m.split_whitespace().next().unwrap_or("?");
        let path =
            m.split_whitespace().find(|w| w.starts_with('/')).unwrap_or("").trim_end_matches(':');
        if m.starts_with("journal") || path.ends_with("journal.redb") {
            "journal commit".into()
        } else if path.contains("/backups/") {
            format!("{op} backup")
        } else if path.ends_with("inflight.plan") {
            format!("{op} plan copy")
        } else if path.contains("/.tope-") {
            format!("{op} staged file")
        } else {
            format!("{op} {}", path.rsplit('/').next().unwrap_or("?"))
        }
    }

    fn exit_str(code: Option<i32>) -> String {
        code.map(|c| c.to_string()).unwrap_or_else(|| "-".into())
    }

    /// What a command reported on stdout (`--json`).
    struct Reported {
        /// `committed`, `rolled_back`, `rollback_failed`, `interrupted`; `error` for a command
        /// that failed outside a transaction (`{"error": ...}`); for `recover` also its
        /// `result` when it finished nothing.
        outcome: String,
        tx: Option<u64>,
        /// The error code in the report.
        code: String,
    }

    fn reported(r: &Run, tx: Tx) -> Reported {
        let doc: Value = serde_json::from_str(r.stdout.trim()).unwrap_or(Value::Null);
        let report = match tx {
            Tx::Recover { .. } if doc["result"] == "finished" => &doc["report"],
            Tx::Recover { .. } if doc["result"].is_string() => {
                return Reported {
                    outcome: doc["result"].as_str().unwrap_or("?").to_string(),
                    tx: None,
                    code: String::new(),
                };
            }
            _ => &doc,
        };
        let (outcome, error) = match report["outcome"].as_str() {
            Some(o) => (o.to_string(), &report["error"]),
            None if !doc["error"].is_null() => ("error".to_string(), &doc["error"]),
            None => ("?".to_string(), &Value::Null),
        };
        Reported {
            outcome,
            tx: report["tx"].as_u64(),
            code: error["code"].as_str().unwrap_or("").to_string(),
        }
    }

    /// (free, exit, code, outcome, place) of one run's command.
    type Seen = (u64, Option<i32>, String, String, String);

    struct Bench<'a> {
        test: &'a str,
        dev: &'a Device,
        fx: &'a Fixture,
        pkg: &'a Path,
        v1: BTreeMap<String, String>,
        v2: BTreeMap<String, String>,
        /// Pauses caught too late (the sleep had ended) and run again with a longer sleep.
        missed: std::cell::Cell<u32>,
        /// What the current run's command did, kept for the table if a later check fails:
        /// (free, exit, code, outcome, place).
        seen: std::cell::RefCell<Option<Seen>>,
    }

    impl Bench<'_> {
        fn sides(&self, tx: Tx) -> Sides {
            let (v1, v2) = (self.v1.clone(), self.v2.clone());
            match tx {
                Tx::Install | Tx::Recover { .. } => {
                    Sides { old: v1, new: v2, old_version: Value::Null, new_version: json!(V2) }
                }
                Tx::RollbackToFactory => {
                    Sides { old: v2, new: v1, old_version: json!(V2), new_version: Value::Null }
                }
            }
        }

        /// Sizes of the files the transaction copies into a backup store on another
        /// filesystem, in plan order (targets sorted by path): the content each replaces.
        fn backup_copies(&self, tx: Tx) -> Vec<u64> {
            let v2: BTreeMap<String, u64> = self
                .fx
                .files
                .iter()
                .map(|(_, dst, c)| (dst.to_string(), c.len() as u64))
                .chain(self.fx.www.iter().map(|(rel, c)| (format!("www/{rel}"), c.len() as u64)))
                .collect();
            match tx {
                // Rolling back to factory replaces every v2 file.
                Tx::RollbackToFactory => v2.into_values().collect(),
                // Installing replaces the v1 files the package overwrites.
                Tx::Install | Tx::Recover { .. } => {
                    let v1: BTreeMap<&str, u64> =
                        self.fx.v1.iter().map(|(p, c, _)| (p.as_str(), c.len() as u64)).collect();
                    v2.keys().filter_map(|p| v1.get(p.as_str()).copied()).collect()
                }
            }
        }

        fn fill_fs(&self, sc: &Scenario) -> &LoopFs {
            match sc.fill {
                Fill::Root => &self.dev.a,
                Fill::State => self.dev.state_fs(),
            }
        }

        /// One run: the device at the scenario's start, the command paused at its point, the
        /// filesystem filled to `level` bytes available (or left alone if fewer are free), the
        /// command resumed and its end checked. `None` if the pause was missed.
        fn run(&self, sc: &Scenario, level: u64, sleep_ms: u64) -> Option<Row> {
            let env = &self.dev.env;
            let pkg = self.pkg.to_str().unwrap();
            self.dev.reset(self.fx);
            let args: Vec<&str> = match sc.tx {
                Tx::Install => vec!["install", pkg, "--json"],
                Tx::RollbackToFactory => {
                    env.ok(&["install", pkg]);
                    vec!["rollback", "--to", "factory", "--json"]
                }
                Tx::Recover { crash } => {
                    let r = Run::from(
                        env.command(&["install", pkg]).env("FAILPOINTS", crash).output().unwrap(),
                    );
                    assert_eq!(
                        r.signal,
                        Some(9),
                        "fixture error: the install was not killed at {crash}:\n{}",
                        r.describe()
                    );
                    assert!(
                        !status(env, "after the crash")["in_flight"].is_null(),
                        "fixture error: nothing in flight after {crash}"
                    );
                    vec!["recover", "--json"]
                }
            };
            let sides = self.sides(sc.tx);
            let fs = self.fill_fs(sc);
            let paused = match spawn_paused(
                env.command(&args),
                sc.pause,
                sleep_ms,
                &env.state,
                env.tmp.path(),
            ) {
                Spawned::Paused(p) => p,
                Spawned::Missed => {
                    self.missed.set(self.missed.get() + 1);
                    return None;
                }
                // Never caught sleeping there: it passed the point unseen (a loaded machine), or
                // never reached it; the longest sleep tells them apart.
                Spawned::Exited(_) if sleep_ms < *SLEEPS_MS.last().unwrap() => {
                    self.missed.set(self.missed.get() + 1);
                    return None;
                }
                Spawned::Exited(r) => {
                    panic!("{args:?} ended without pausing at {}:\n{}", sc.pause, r.describe())
                }
            };
            let free = fill_to(fs, level);
            let ctx = format!("{}: {free} bytes free (level {level})", sc.name(self.dev.layout));
            let filler = std::fs::metadata(fs.filler()).map_or(0, |m| m.len());
            assert!(
                free == level || free < level && filler == 0,
                "{ctx}: could not leave exactly {level} bytes free"
            );
            let r = paused.finish();
            let Reported { outcome, tx, code } = reported(&r, sc.tx);
            let mut findings = Vec::new();
            if outcome != "committed" && r.error_code().as_deref() != Some(code.as_str()) {
                findings.push((
                    format!(
                        "{} ended {outcome} with {code} but stderr has no \
                         `error: {code}: ...` line (SPEC §6)",
                        args[0]
                    ),
                    format!("{} bytes free:\n{}", level, r.describe()),
                ));
            }
            let place = if outcome == "committed" { String::new() } else { place_of(&r) };
            let engine = r
                .stderr
                .lines()
                .find_map(|l| l.strip_prefix("error: "))
                .unwrap_or("no error line")
                .to_string();
            let ctx = format!("{ctx}: exit {:?} {code} {outcome} ({place}) [{engine}]", r.code);
            *self.seen.borrow_mut() =
                Some((free, r.code, code.clone(), outcome.clone(), place.clone()));
            assert_eq!(r.signal, None, "{ctx}: the command was killed:\n{}", r.describe());
            let end = match outcome.as_str() {
                "committed" => {
                    assert_eq!(r.code, Some(0), "{ctx}: a commit exits 0:\n{}", r.describe());
                    assert_eq!(sides.settled(env, &ctx), Side::New, "{ctx}: committed");
                    "all new".to_string()
                }
                "rolled_back" => {
                    let exits: &[i32] = match sc.tx {
                        Tx::Install => &[3, 4],
                        // A rollback command that had to be undone did not do what was asked.
                        Tx::RollbackToFactory => &[5],
                        Tx::Recover { .. } => &[4],
                    };
                    assert!(
                        r.code.is_some_and(|c| exits.contains(&c)),
                        "{ctx}: a rollback exits {exits:?}:\n{}",
                        r.describe()
                    );
                    assert_eq!(
                        code,
                        "DISK_FULL",
                        "{ctx}: running out of space is DISK_FULL:\n{}",
                        r.describe()
                    );
                    assert_eq!(
                        sides.settled(env, &ctx),
                        Side::Old,
                        "{ctx}: rolled back:\n{}",
                        r.describe()
                    );
                    let history = env.run(&["history", "--json"]).json();
                    let rec =
                        history.as_array().and_then(|h| h.iter().find(|t| t["id"].as_u64() == tx));
                    let rec = rec.unwrap_or_else(|| {
                        panic!("{ctx}: transaction {tx:?} is not in the history: {history}")
                    });
                    assert_eq!(rec["phase"], "RolledBack", "{ctx}: {rec}");
                    assert_eq!(
                        rec["error"]["code"], "DISK_FULL",
                        "{ctx}: the history names the cause: {rec}"
                    );
                    "all old".to_string()
                }
                "interrupted" | "error" => {
                    // The journal itself could not be written (or, for `recover`, not even its
                    // attempt): the transaction stays in flight for the next `recover`.
                    assert!(
                        outcome == "interrupted" || matches!(sc.tx, Tx::Recover { .. }),
                        "{ctx}:\n{}",
                        r.describe()
                    );
                    assert_eq!(
                        r.code,
                        Some(1),
                        "{ctx}: an interrupted transaction exits 1:\n{}",
                        r.describe()
                    );
                    assert_eq!(
                        code,
                        "DISK_FULL",
                        "{ctx}: running out of space is DISK_FULL:\n{}",
                        r.describe()
                    );
                    after_interruption(env, fs, &sides, &ctx)
                }
                _ => panic!("{ctx}: unexpected outcome:\n{}", r.describe()),
            };
            let committed = outcome == "committed";
            Some(Row { free, exit: r.code, code, outcome, place, end, committed, findings })
        }

        /// Runs `level`, retrying with longer sleeps if the pause was missed (a loaded
        /// machine); a panic becomes a failed row.
        fn level(&self, sc: &Scenario, level: u64, failures: &mut Vec<String>) -> Row {
            self.seen.borrow_mut().take();
            let result = catch_unwind(AssertUnwindSafe(|| {
                for sleep_ms in SLEEPS_MS {
                    if let Some(row) = self.run(sc, level, sleep_ms) {
                        return row;
                    }
                }
                panic!(
                    "{}: the pause at {} was missed {} times",
                    sc.name(self.dev.layout),
                    sc.pause,
                    SLEEPS_MS.len()
                );
            }));
            result.unwrap_or_else(|e| {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(std::string::ToString::to_string))
                    .unwrap_or_else(|| "non-string panic".into());
                failures.push(msg.clone());
                // The failed check is at the end of the message (the context comes first).
                let first: Vec<char> = msg.lines().next().unwrap_or("").chars().collect();
                let why: String = first[first.len().saturating_sub(150)..].iter().collect();
                let (free, exit, code, outcome, place) = self.seen.borrow_mut().take().unwrap_or((
                    level,
                    None,
                    String::new(),
                    String::new(),
                    String::new(),
                ));
                Row {
                    free,
                    exit,
                    code,
                    outcome,
                    place,
                    end: format!("FAILED: ...{why}"),
                    committed: false,
                    findings: Vec::new(),
                }
            })
        }

        /// Steps one scenario through its levels and prints what each ended with.
        fn scenario(&self, sc: Scenario, failures: &mut Vec<String>) {
            assert!(CRASH_POINTS.contains(&sc.pause), "{} is not a crash point", sc.pause);
            let started = Instant::now();
            let name = sc.name(self.dev.layout);
            self.dev.reset(self.fx);
            let cap = avail(&self.fill_fs(&sc).mnt).next_multiple_of(BLOCK);
            let mut rows: BTreeMap<u64, Row> = BTreeMap::new();
            let ok = |x: u64, rows: &mut BTreeMap<u64, Row>, failures: &mut Vec<String>| -> bool {
                let x = x.min(cap);
                rows.entry(x).or_insert_with(|| self.level(&sc, x, failures)).committed
            };
            let mut first_ok = None;
            match sc.levels {
                Levels::Explore => {
                    first_ok = (0..8).map(|i| i * BLOCK).find(|x| ok(*x, &mut rows, failures));
                    let mut x = 16 * BLOCK;
                    while first_ok.is_none() && x < 2 * cap {
                        if ok(x, &mut rows, failures) {
                            first_ok = Some(x.min(cap));
                        }
                        x *= 2;
                    }
                    if let Some(mut hi) = first_ok {
                        if let Some(mut lo) =
                            rows.range(..hi).rev().find(|(_, r)| !r.committed).map(|(k, _)| *k)
                        {
                            while hi - lo > BLOCK {
                                let mid = (lo + (hi - lo) / 2) / BLOCK * BLOCK;
                                if ok(mid, &mut rows, failures) {
                                    hi = mid;
                                } else {
                                    lo = mid;
                                }
                            }
                            ok(lo.saturating_sub(BLOCK), &mut rows, failures);
                        }
                        ok(hi + BLOCK, &mut rows, failures);
                    }
                }
                Levels::EachBackupCopy => {
                    let copies = self.backup_copies(sc.tx);
                    let mut levels = vec![0];
                    levels.extend(copies.iter().scan(0, |sum, size| {
                        *sum += size.next_multiple_of(BLOCK);
                        Some(*sum)
                    }));
                    // And room to spare: the journal's last commits need some too.
                    levels.push(levels.last().unwrap() + 64 * BLOCK);
                    for x in levels {
                        if ok(x, &mut rows, failures) && first_ok.is_none() {
                            first_ok = Some(x);
                        }
                    }
                }
            }
            print_table(self.test, &name, &rows, started.elapsed());
            // Findings, grouped by kind: the levels where each was seen, and one example.
            let mut grouped: BTreeMap<&str, (Vec<u64>, &str)> = BTreeMap::new();
            for (level, row) in &rows {
                for (kind, example) in &row.findings {
                    grouped
                        .entry(kind.as_str())
                        .or_insert_with(|| (Vec::new(), example.as_str()))
                        .0
                        .push(*level);
                }
            }
            for (kind, (levels, example)) in grouped {
                failures.push(format!(
                    "{name}: {kind}: at {} level(s) {levels:?}; e.g. at {example}",
                    levels.len()
                ));
            }
            if first_ok.is_none() {
                failures.push(format!(
                    "{name}: no level up to {cap} bytes free let the transaction commit"
                ));
            }
            if !rows.values().any(|r| !r.outcome.is_empty() && r.outcome != "committed") {
                failures.push(format!(
                    "{name}: no level ran out of space after the pause: \
                     the scenario exercised nothing"
                ));
            }
        }
    }

    /// The transaction was left in flight on a full disk: `recover` on the still-full disk
    /// must not make it worse, and with the space back `recover` must end it on one side.
    fn after_interruption(env: &Env, fs: &LoopFs, sides: &Sides, ctx: &str) -> String {
        let s = status(env, ctx);
        assert!(
            !s["in_flight"].is_null(),
            "{ctx}: an interrupted transaction must still be in flight: {s}"
        );
        let phase = s["in_flight"]["phase"].as_str().unwrap_or("?").to_string();
        sides.recoverable(env, &format!("{ctx}, in flight in {phase}"));
        let full = env.run(&["recover", "--json"]);
        let full_code = full.error_code().unwrap_or_default();
        let ctx = format!(
            "{ctx}, in flight in {phase}, then recover on the full disk: exit {:?} {full_code}",
            full.code
        );
        assert_eq!(
            full.signal,
            None,
            "{ctx}: recover on the full disk was killed:\n{}",
            full.describe()
        );
        let s = status(env, &ctx);
        let full_note = if s["in_flight"].is_null() {
            let side = sides.settled(env, &ctx);
            if full.code == Some(4) {
                assert_eq!(side, Side::Old, "{ctx}: recover reported a rollback");
            }
            format!("full: recover exit {} {full_code} -> all {side:?}", exit_str(full.code))
        } else {
            let now = s["in_flight"]["phase"].as_str().unwrap_or("?");
            assert_ne!(
                now, "RollbackFailed",
                "{ctx}: recover on a full disk gave up (RollbackFailed needs an operator): {s}"
            );
            sides.recoverable(env, &ctx);
            format!("full: recover exit {} {full_code}, in flight in {now}", exit_str(full.code))
        };
        remove_filler(fs);
        let fin = env.run(&["recover", "--json"]);
        let ctx = format!("{ctx}, then recover with the space back: exit {:?}", fin.code);
        assert_eq!(fin.signal, None, "{ctx}: killed:\n{}", fin.describe());
        if !matches!(fin.code, Some(0 | 4)) {
            // Say what a second attempt does, for the report; the first one had to succeed.
            let free = avail(&fs.mnt);
            let again = env.run(&["recover", "--json"]);
            panic!(
                "{ctx}: recover must end the transaction once space is freed \
                 ({free} bytes available):\n{}\n(a second recover then: {})",
                fin.describe(),
                again.describe()
            );
        }
        let side = sides.settled(env, &ctx);
        if fin.code == Some(4) {
            assert_eq!(side, Side::Old, "{ctx}: recover reported a rollback");
        }
        format!(
            "in flight ({phase}); {full_note}; freed: recover exit {} -> all {side:?}",
            exit_str(fin.code)
        )
    }

    /// One line per run of equal results: the free-space range, exit, code, outcome, where it
    /// ran out, and the end after any recovery.
    fn print_table(test: &str, name: &str, rows: &BTreeMap<u64, Row>, took: Duration) {
        let mut out =
            format!("[{test}] {name}: {} runs, {:.1} s\n", rows.len(), took.as_secs_f64());
        let mut groups: Vec<(u64, u64, &Row, usize)> = Vec::new();
        for row in rows.values() {
            match groups.last_mut() {
                Some((_, hi, r, n))
                    if r.exit == row.exit
                        && r.code == row.code
                        && r.outcome == row.outcome
                        && r.place == row.place
                        && r.end == row.end =>
                {
                    *hi = row.free;
                    *n += 1;
                }
                _ => groups.push((row.free, row.free, row, 1)),
            }
        }
        for (lo, hi, r, n) in groups {
            let range = if lo == hi { format!("{lo}") } else { format!("{lo}..{hi}") };
            let exit = exit_str(r.exit);
            out += &format!(
                "    {range:>17} B free ({n:>2} run{}): exit {exit} {:<9} {:<11} {:<28} {}\n",
                if n == 1 { " " } else { "s" },
                r.code,
                r.outcome,
                r.place,
                r.end
            );
        }
        print!("{out}");
    }

    /// Builds the device, the package and both trees, runs the scenarios, and fails with every
    /// failure found (the tables are printed first).
    fn bench(test: &str, layout: Layout, scenarios: &[Scenario]) {
        let started = Instant::now();
        let fx = Fixture::new();
        let dev = Device::new(layout);
        let pkg = fx.package(&dev.env);
        dev.reset(&fx);
        let v1 = tree(&dev.env.root);
        // The all-new side comes from the package rules (support::after_install), and a clean
        // install must end exactly there: the engine is checked against it, never its source.
        let files: Vec<NewFile> = fx
            .files
            .iter()
            .map(|(_, dst, content)| NewFile {
                rel: dst.to_string(),
                content,
                manifest_mode: None,
                zip_mode: Some(0o644),
            })
            .chain(fx.www.iter().map(|(rel, content)| NewFile {
                rel: format!("www/{rel}"),
                content,
                manifest_mode: None,
                zip_mode: Some(0o644),
            }))
            .collect();
        let v2 = after_install(&v1, &files);
        assert_ne!(v1, v2);
        dev.env.ok(&["install", pkg.to_str().unwrap()]);
        assert_eq!(tree(&dev.env.root), v2, "a clean install ends at the package's tree");
        let b = Bench {
            test,
            dev: &dev,
            fx: &fx,
            pkg: &pkg,
            v1,
            v2,
            missed: std::cell::Cell::default(),
            seen: std::cell::RefCell::default(),
        };
        let mut failures = Vec::new();
        for sc in scenarios {
            b.scenario(*sc, &mut failures);
        }
        println!(
            "[{test}] {} scenarios in {:.1} s ({} pause(s) caught late and run again)",
            scenarios.len(),
            started.elapsed().as_secs_f64(),
            b.missed.get()
        );
        assert!(
            failures.is_empty(),
            "{test}: {} failure(s):\n\n{}",
            failures.len(),
            failures.join("\n\n")
        );
    }

    const fn install(pause: &'static str, fill: Fill) -> Scenario {
        Scenario { tx: Tx::Install, pause, fill, levels: Levels::Explore }
    }

    const fn rollback(pause: &'static str, fill: Fill) -> Scenario {
        Scenario { tx: Tx::RollbackToFactory, pause, fill, levels: Levels::Explore }
    }

    const fn recover(crash: &'static str, fill: Fill) -> Scenario {
        Scenario {
            tx: Tx::Recover { crash },
            pause: "recover.attempt",
            fill,
            levels: Levels::Explore,
        }
    }

    /// The install killed in the middle of staging (the 6th staged file): `recover` restages.
    const CRASH_MID_STAGING: &str = "stage.file=5*off->return";
    /// The install killed in the middle of the swap (the 20th rename): `recover` finishes it.
    const CRASH_MID_SWAP: &str = "swap.file=19*off->return";

    #[test]
    #[cfg_attr(
        tope_unprivileged,
        ignore = "needs root: loop-mounts ext4 images; run as root \
                  (README.md: Tests that need root)"
    )]
    fn an_install_starved_after_each_phase_commit_on_one_filesystem_commits_or_rolls_back_cleanly_or_recover_finishes_it()
     {
        const T: &str = "one fs, install";
        crate::support::require_root(
            T,
            "it loop-mounts small ext4 images (losetup, mount) to run out of space",
        );
        bench(
            T,
            Layout::Same,
            &[
                install("enter.Planned", Fill::Root),
                install("enter.Staged", Fill::Root),
                install("enter.BackedUp", Fill::Root),
                install("enter.Swapped", Fill::Root),
                install("enter.Verified", Fill::Root),
            ],
        );
    }

    #[test]
    #[cfg_attr(
        tope_unprivileged,
        ignore = "needs root: loop-mounts ext4 images; run as root \
                  (README.md: Tests that need root)"
    )]
    fn a_rollback_and_a_recover_starved_on_one_filesystem_end_all_old_or_all_new() {
        const T: &str = "one fs, rollback/recover";
        crate::support::require_root(
            T,
            "it loop-mounts small ext4 images (losetup, mount) to run out of space",
        );
        bench(
            T,
            Layout::Same,
            &[
                rollback("enter.Planned", Fill::Root),
                recover(CRASH_MID_STAGING, Fill::Root),
                recover(CRASH_MID_SWAP, Fill::Root),
            ],
        );
    }

    #[test]
    #[cfg_attr(
        tope_unprivileged,
        ignore = "needs root: loop-mounts ext4 images; run as root \
                  (README.md: Tests that need root)"
    )]
    fn staging_and_restoring_starved_on_the_roots_filesystem_with_the_state_dir_elsewhere_roll_back_cleanly()
     {
        const T: &str = "cross, root full";
        crate::support::require_root(
            T,
            "it loop-mounts small ext4 images (losetup, mount) to run out of space",
        );
        bench(
            T,
            Layout::Cross,
            &[install("enter.Staged", Fill::Root), rollback("enter.Planned", Fill::Root)],
        );
    }

    #[test]
    #[cfg_attr(
        tope_unprivileged,
        ignore = "needs root: loop-mounts ext4 images; run as root \
                  (README.md: Tests that need root)"
    )]
    fn backup_copies_and_journal_commits_starved_on_the_state_filesystem_roll_back_cleanly_or_recover_finishes_them()
     {
        const T: &str = "cross, state full";
        crate::support::require_root(
            T,
            "it loop-mounts small ext4 images (losetup, mount) to run out of space",
        );
        bench(
            T,
            Layout::Cross,
            &[install("enter.BackedUp", Fill::State), recover(CRASH_MID_STAGING, Fill::State)],
        );
    }

    #[test]
    #[cfg_attr(
        tope_unprivileged,
        ignore = "needs root: loop-mounts ext4 images; run as root \
                  (README.md: Tests that need root)"
    )]
    fn each_backup_copy_of_a_rollback_taking_the_last_free_block_ends_cleanly_with_no_temporary_blob_left()
     {
        const T: &str = "cross, each copy";
        crate::support::require_root(
            T,
            "it loop-mounts small ext4 images (losetup, mount) to run out of space",
        );
        bench(
            T,
            Layout::Cross,
            &[Scenario {
                tx: Tx::RollbackToFactory,
                pause: "enter.BackedUp",
                fill: Fill::State,
                levels: Levels::EachBackupCopy,
            }],
        );
    }
}
