//! Shared helpers for the integration tests: a temporary device (allowed root + state dir +
//! config), the real binary, packages built in the test, and tree snapshots.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_tope-updater");

/// A device in a temporary directory: `root` is the only allowed root, `state` the state dir.
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub state: PathBuf,
    pub config: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        Env::with_config("")
    }

    /// `extra` is appended to the generated config.toml (top-level keys only).
    pub fn with_config(extra: &str) -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let state = tmp.path().join("state");
        std::fs::create_dir_all(&root).unwrap();
        let config = tmp.path().join("config.toml");
        write_config(&config, &state, &root, extra);
        Env { tmp, root, state, config }
    }

    /// Absolute path of `rel` under the allowed root.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Destination string for a manifest.
    pub fn dst(&self, rel: &str) -> String {
        self.path(rel).to_str().unwrap().to_string()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("FAILPOINTS")
            .env("NO_COLOR", "1");
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(self.command(args).output().unwrap())
    }

    /// Runs and asserts exit status 0, returning stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(r.code, Some(0), "{args:?} failed:\n{}", r.describe());
        r.stdout
    }

    /// Writes a file under the root with a mode.
    pub fn put(&self, rel: &str, content: &[u8], mode: u32) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    pub fn read(&self, rel: &str) -> Option<Vec<u8>> {
        std::fs::read(self.path(rel)).ok()
    }

    /// A package file path inside the temp dir (outside the allowed root).
    pub fn pkg_path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
}

pub struct Run {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        use std::os::unix::process::ExitStatusExt;
        Run {
            code: o.status.code(),
            signal: o.status.signal(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    /// The stable code from the `error: CODE: message` line on stderr.
    pub fn error_code(&self) -> Option<String> {
        self.stderr
            .lines()
            .find_map(|l| l.strip_prefix("error: "))
            .and_then(|rest| rest.split(':').next())
            .map(str::to_string)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.describe()))
    }

    pub fn describe(&self) -> String {
        format!(
            "exit {:?} signal {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.signal, self.stdout, self.stderr
        )
    }
}

/// One ZIP entry for `zip_with`.
pub enum Entry<'a> {
    File(&'a str, &'a [u8]),
    FileMode(&'a str, &'a [u8], u32),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
}

/// Builds a ZIP in memory with the zip crate (deflate).
pub fn zip_with(entries: &[Entry]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for e in entries {
            match e {
                Entry::File(name, data) => {
                    z.start_file(*name, opts.unix_permissions(0o644)).unwrap();
                    z.write_all(data).unwrap();
                }
                Entry::FileMode(name, data, mode) => {
                    z.start_file(*name, opts.unix_permissions(*mode)).unwrap();
                    z.write_all(data).unwrap();
                }
                Entry::Dir(name) => z.add_directory(*name, opts).unwrap(),
                Entry::Symlink(name, target) => z.add_symlink(*name, *target, opts).unwrap(),
            }
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

/// A manifest with file modules `(name, src, dst)`.
pub fn manifest(version: &str, modules: &[(&str, &str, &str)]) -> String {
    let mods: Vec<serde_json::Value> = modules
        .iter()
        .map(|(n, s, d)| serde_json::json!({"name": n, "src": s, "dst": d}))
        .collect();
    serde_json::json!({"version": version, "modules": mods}).to_string()
}

/// Writes a package made of a manifest and files (`src` name → content) to `path`.
pub fn write_package(path: &Path, manifest: &str, files: &[(&str, &[u8])]) {
    let mut entries = vec![Entry::File("manifest.json", manifest.as_bytes())];
    entries.extend(files.iter().map(|(n, d)| Entry::File(n, d)));
    std::fs::write(path, zip_with(&entries)).unwrap();
}

/// Everything under `dir`: relative path → "dir <mode>" or "file <mode> <blake3>". Two equal
/// snapshots mean the trees are byte-identical in content, type and mode.
pub fn tree(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(dir).unwrap().to_str().unwrap().to_string();
            let mode = m.permissions().mode() & 0o7777;
            if m.is_dir() {
                out.insert(rel, format!("dir {mode:o}"));
                stack.push(p);
            } else if m.file_type().is_symlink() {
                out.insert(rel, format!("symlink {}", std::fs::read_link(&p).unwrap().display()));
            } else {
                out.insert(
                    rel,
                    format!("file {mode:o} {}", blake3::hash(&std::fs::read(&p).unwrap()).to_hex()),
                );
            }
        }
    }
    out
}

/// A file an install writes, as the independent oracle (`after_install`) sees it.
pub struct NewFile<'a> {
    /// Destination relative to the root.
    pub rel: String,
    pub content: &'a [u8],
    /// The module's `mode` in the manifest.
    pub manifest_mode: Option<u32>,
    /// The unix mode of its ZIP entry (`write_package` gives 0644).
    pub zip_mode: Option<u32>,
}

/// The tree (as `tree` shows it) after a committed install over `before`, from the package
/// rules alone, never from the engine's output: each file holds its content with the module's
/// `mode`, else the mode of the file it replaces, else its ZIP entry's, else 0644 (README,
/// "Build and sign a package"); a directory the install creates is 0755; everything else
/// stays as it was.
pub fn after_install(
    before: &BTreeMap<String, String>,
    files: &[NewFile],
) -> BTreeMap<String, String> {
    let mut t = before.clone();
    for f in files {
        let old_mode = t
            .get(&f.rel)
            .and_then(|s| s.strip_prefix("file "))
            .and_then(|s| s.split(' ').next())
            .map(|m| {
                u32::from_str_radix(m, 8)
                    .unwrap_or_else(|e| panic!("oracle: bad mode {m:?} of {} ({e})", f.rel))
            });
        let mode = f.manifest_mode.or(old_mode).or(f.zip_mode).unwrap_or(0o644);
        let mut dir = String::new();
        for part in f.rel.split('/').collect::<Vec<_>>().split_last().expect("a path").1 {
            if !dir.is_empty() {
                dir.push('/');
            }
            dir.push_str(part);
            t.entry(dir.clone()).or_insert_with(|| "dir 755".to_string());
        }
        t.insert(f.rel.clone(), format!("file {mode:o} {}", blake3::hash(f.content).to_hex()));
    }
    t
}

/// Names of leftover temporary files (the engine's `.tope-` prefix) under `dir`.
pub fn leftovers(dir: &Path) -> Vec<String> {
    tree(dir)
        .into_keys()
        .filter(|k| k.rsplit('/').next().unwrap_or("").starts_with(".tope-"))
        .collect()
}

pub fn blake3_hex(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// xorshift64: deterministic, reproducible randomness for tests (seeds are printed), no
/// dependency.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(if seed == 0 { 0x9E37_79B9_7F4A_7C15 } else { seed })
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next() % n
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }

    /// `len` incompressible bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// The `FAILPOINTS` value (fail crate syntax) that SIGKILLs the process on the `hit`-th pass
/// (1-based) through crash point `point`.
pub fn kill_at(point: &str, hit: u32) -> String {
    match hit {
        1 => format!("{point}=return"),
        n => format!("{point}={}*off->return", n - 1),
    }
}

/// Writes a test config: `state`, the one allowed root `root`, no service manager, then `extra`.
pub fn write_config(config: &Path, state: &Path, root: &Path, extra: &str) {
    let text = format!(
        "state_dir = {:?}\nallowed_roots = [{:?}]\nservice_manager = \"none\"\n{extra}\n",
        state.to_str().unwrap(),
        root.to_str().unwrap()
    );
    std::fs::write(config, text).unwrap();
}

/// A crash point armed to SIGKILL the process on its `hit`-th pass (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arm {
    pub point: &'static str,
    pub hit: u32,
}

impl Arm {
    #[cfg(feature = "failpoints")]
    pub fn new(point: &'static str, hit: u32) -> Arm {
        assert!(
            tope_updater::failpoint::CRASH_POINTS.contains(&point),
            "{point} is not in CRASH_POINTS"
        );
        Arm { point, hit }
    }

    /// `FAILPOINTS` value (fail crate syntax).
    pub fn spec(&self) -> String {
        kill_at(self.point, self.hit)
    }
}

impl std::fmt::Display for Arm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.hit == 1 {
            write!(f, "{}", self.point)
        } else {
            write!(f, "{}#{}", self.point, self.hit)
        }
    }
}

/// Runs `args` with `arm` armed.
pub fn run_armed(env: &Env, args: &[&str], arm: Arm) -> Run {
    Run::from(env.command(args).env("FAILPOINTS", arm.spec()).output().unwrap())
}

/// The command must have been killed by its own crash point; exiting normally means the
/// point was never reached (or reached fewer times), which would prove nothing.
pub fn expect_killed(run: &Run, arm: Arm, ctx: &str) {
    assert_eq!(
        run.signal,
        Some(9),
        "{ctx}: crash point {arm} was armed but the process was not killed by it: \
         the point was never reached (or reached fewer times)\n{}",
        run.describe()
    );
    let marker = format!("crash point {}: SIGKILL", arm.point);
    assert!(
        run.stderr.contains(&marker),
        "{ctx}: killed, but not by crash point {arm}:\n{}",
        run.describe()
    );
}

// ---------------------------------------------------------------- root-only tests

/// The first line of every root-only test. build.rs compiles those tests as `#[ignore]`d
/// ("needs root") when the build does not run as root, so they only get here as root; a build
/// made by root and run by another user still fails loudly instead of passing untested.
pub fn require_root(test: &str, why: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "{test} needs root ({why}), but this build was made as root and runs as uid {}: \
         rebuild as this user (touch build.rs), or run the tests as root",
        nix::unistd::geteuid()
    );
}

/// build.rs decided at build time whether the root-only tests are ignored; this holds it to
/// who actually runs the tests, so root never silently skips them (a build made by another
/// user, reused by root) and another user never fails on them (the opposite).
#[test]
fn the_build_knows_whether_the_tests_run_as_root() {
    let running_as_root = nix::unistd::geteuid().is_root();
    let built_for_root = !cfg!(tope_unprivileged);
    assert_eq!(
        built_for_root,
        running_as_root,
        "the root-only tests were built {} but the tests run as uid {}: \
         touch build.rs and run again",
        if built_for_root { "to run (as root)" } else { "as ignored (not root)" },
        nix::unistd::geteuid()
    );
}
