//! Crash safety (SPEC §3, §8): the real binary is killed with SIGKILL at every named crash
//! point — during an install, a rollback, the rollback inside a failing install, and
//! `recover` itself — and after `recover` every target must hold all its old content or all
//! its new content, with matching modes, no temporary files, no directories left behind,
//! nothing in flight and the matching current version.
//!
//! Run with `cargo test --features failpoints --test it crash -- --nocapture`.

#[cfg(not(feature = "failpoints"))]
#[test]
fn crash_tests_need_the_failpoints_feature() {
    panic!(
        "the crash-safety tests need the named crash points compiled in: \
         run `cargo test --features failpoints --test it crash -- --nocapture`"
    );
}

#[cfg(feature = "failpoints")]
mod armed {
    use crate::support::*;
    use std::collections::{BTreeMap, BTreeSet};
    use std::io::Write;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::path::{Path, PathBuf};
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    use tope_updater::failpoint::CRASH_POINTS;

    // ---------------------------------------------------------------- device states

    /// Content hash and permission bits of a regular file.
    type FileState = (String, u32);

    /// Everything under the allowed root that matters, plus the version `status` must show.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct DeviceState {
        /// `None`: the factory baseline (nothing installed).
        version: Option<String>,
        files: BTreeMap<String, FileState>,
        dirs: BTreeSet<String>,
    }

    impl DeviceState {
        fn new(version: Option<&str>, files: BTreeMap<String, FileState>) -> DeviceState {
            let mut dirs = BTreeSet::new();
            for rel in files.keys() {
                let mut p = Path::new(rel).parent();
                while let Some(d) = p {
                    if d.as_os_str().is_empty() {
                        break;
                    }
                    dirs.insert(d.to_str().unwrap().to_string());
                    p = d.parent();
                }
            }
            DeviceState { version: version.map(str::to_string), files, dirs }
        }
    }

    /// Which side of a transaction the device is on.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Side {
        /// Every target as before the transaction.
        Before,
        /// Every target as the transaction meant to leave it.
        After,
    }

    /// Regular files, directories and anything else (symlinks...) under `root`.
    fn observe(root: &Path) -> (BTreeMap<String, FileState>, BTreeSet<String>, Vec<String>) {
        let mut files = BTreeMap::new();
        let mut dirs = BTreeSet::new();
        let mut others = Vec::new();
        for (rel, desc) in tree(root) {
            let parts: Vec<&str> = desc.split(' ').collect();
            match parts[0] {
                "file" => {
                    files.insert(
                        rel,
                        (parts[2].to_string(), u32::from_str_radix(parts[1], 8).unwrap()),
                    );
                }
                "dir" => {
                    dirs.insert(rel);
                }
                _ => others.push(format!("{rel}: {desc}")),
            }
        }
        (files, dirs, others)
    }

    fn show(s: Option<&FileState>) -> String {
        match s {
            None => "absent".into(),
            Some((h, m)) => format!("{}.. mode {m:04o}", &h[..12]),
        }
    }

    /// `current` and `in_flight` from `status --json`.
    fn status(env: &Env, ctx: &str) -> (Option<String>, serde_json::Value) {
        let st = env.run(&["status", "--json"]);
        assert_eq!(st.code, Some(0), "{ctx}: status --json failed:\n{}", st.describe());
        let j = st.json();
        let current = match &j["current"] {
            serde_json::Value::Null => None,
            c => Some(
                c["version"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{ctx}: current without a version: {j}"))
                    .to_string(),
            ),
        };
        (current, j["in_flight"].clone())
    }

    /// The invariant: every target is old (possibly absent) or every target is new, by hash
    /// and mode; the whole tree equals that side (so no `.tope-` leftovers, no directory the
    /// transaction created when it is undone, nothing else touched); nothing is in flight
    /// and `current` is that side's version. Returns the side.
    fn check_all_or_nothing(
        env: &Env,
        before: &DeviceState,
        after: &DeviceState,
        ctx: &str,
    ) -> Side {
        let (files, dirs, others) = observe(&env.root);
        let left = leftovers(&env.root);
        assert!(left.is_empty(), "{ctx}: temporary files left under the root: {left:?}");
        assert!(others.is_empty(), "{ctx}: unexpected non-regular entries: {others:?}");

        let targets: BTreeSet<&String> = before
            .files
            .keys()
            .chain(after.files.keys())
            .filter(|p| before.files.get(*p) != after.files.get(*p))
            .collect();
        assert!(!targets.is_empty(), "{ctx}: fixture error: the transaction changes nothing");
        let mut olds = Vec::new();
        let mut news = Vec::new();
        let mut neither = Vec::new();
        for t in &targets {
            let (live, b, a) = (files.get(*t), before.files.get(*t), after.files.get(*t));
            if live == b {
                olds.push(t.as_str());
            } else if live == a {
                news.push(t.as_str());
            } else {
                let why = match live {
                    Some((h, _)) if Some(h) == b.map(|b| &b.0) => "old content with a wrong mode",
                    Some((h, _)) if Some(h) == a.map(|a| &a.0) => "new content with a wrong mode",
                    Some(_) => "content that is neither old nor new (torn?)",
                    None => "absent, but should exist on both sides",
                };
                neither.push(format!(
                    "{t}: {why}: live {}, old {}, new {}",
                    show(live),
                    show(b),
                    show(a)
                ));
            }
        }
        assert!(
            !(!neither.is_empty() || (!olds.is_empty() && !news.is_empty())),
            "{ctx}: targets are NOT all old or all new\n  old: {olds:?}\n  new: {news:?}\n  \
             neither:\n    {}",
            neither.join("\n    ")
        );
        let (side, want) =
            if news.is_empty() { (Side::Before, before) } else { (Side::After, after) };

        if files != want.files {
            let extra: Vec<_> = files.keys().filter(|k| !want.files.contains_key(*k)).collect();
            let missing: Vec<_> = want.files.keys().filter(|k| !files.contains_key(*k)).collect();
            let differ: Vec<_> = files
                .iter()
                .filter(|(k, v)| want.files.get(*k).is_some_and(|w| w != *v))
                .map(|(k, _)| k)
                .collect();
            panic!(
                "{ctx}: targets are all {side:?}, but other files differ: extra {extra:?}, \
                 missing {missing:?}, changed {differ:?}"
            );
        }
        if dirs != want.dirs {
            let extra: Vec<_> = dirs.difference(&want.dirs).collect();
            let missing: Vec<_> = want.dirs.difference(&dirs).collect();
            panic!(
                "{ctx}: files are all {side:?}, but directories differ: left behind {extra:?}, \
                 missing {missing:?}"
            );
        }

        let (current, in_flight) = status(env, ctx);
        assert!(
            in_flight.is_null(),
            "{ctx}: files are all {side:?} but a transaction is still in flight: {in_flight}"
        );
        assert_eq!(
            current, want.version,
            "{ctx}: files are all {side:?} but status shows current version {current:?}"
        );
        side
    }

    // ---------------------------------------------------------------- fixtures

    /// One file a package deploys.
    struct Deploy {
        entry: String,
        /// Destination relative to the root.
        target: String,
        content: Vec<u8>,
        zip_mode: u32,
    }

    struct Module {
        name: &'static str,
        /// Entry name (file module) or prefix ending in `/` (directory module).
        src: String,
        /// Relative to the root.
        dst: String,
        mode: Option<u32>,
        files: Vec<Deploy>,
    }

    impl Module {
        fn file(
            name: &'static str,
            entry: &str,
            dst: &str,
            mode: Option<u32>,
            zip_mode: u32,
            content: Vec<u8>,
        ) -> Module {
            Module {
                name,
                src: entry.into(),
                dst: dst.into(),
                mode,
                files: vec![Deploy { entry: entry.into(), target: dst.into(), content, zip_mode }],
            }
        }

        /// `files`: (path relative to the prefix and to `dst`, zip mode, content).
        fn dir(
            name: &'static str,
            prefix: &str,
            dst: &str,
            files: Vec<(String, u32, Vec<u8>)>,
        ) -> Module {
            assert!(prefix.ends_with('/'));
            let files = files
                .into_iter()
                .map(|(rel, zip_mode, content)| Deploy {
                    entry: format!("{prefix}{rel}"),
                    target: format!("{dst}/{rel}"),
                    content,
                    zip_mode,
                })
                .collect();
            Module { name, src: prefix.into(), dst: dst.into(), mode: None, files }
        }

        fn is_dir(&self) -> bool {
            self.src.ends_with('/')
        }
    }

    /// A device at "v1" (the factory baseline: some files, distinctive modes) and a "2.0.0"
    /// package over it. The package's data entries are zipped once; each device gets a copy
    /// with its own manifest appended (destinations are absolute, so they differ per device).
    struct Fixture {
        v1: Vec<(String, Vec<u8>, u32)>,
        modules: Vec<Module>,
        base_zip: Vec<u8>,
        v1_state: DeviceState,
        v2_state: DeviceState,
    }

    const V2: &str = "2.0.0";

    impl Fixture {
        fn new(
            v1: Vec<(String, Vec<u8>, u32)>,
            modules: Vec<Module>,
            method: zip::CompressionMethod,
        ) -> Fixture {
            let mut buf = std::io::Cursor::new(Vec::new());
            {
                let mut z = zip::ZipWriter::new(&mut buf);
                for d in modules.iter().flat_map(|m| &m.files) {
                    let opts = zip::write::SimpleFileOptions::default()
                        .compression_method(method)
                        .unix_permissions(d.zip_mode);
                    z.start_file(d.entry.as_str(), opts).unwrap();
                    z.write_all(&d.content).unwrap();
                }
                z.finish().unwrap();
            }
            let old: BTreeMap<String, FileState> =
                v1.iter().map(|(p, c, m)| (p.clone(), (blake3_hex(c), *m))).collect();
            let mut new = old.clone();
            for m in &modules {
                for d in &m.files {
                    // SPEC §3: modes are applied (manifest `mode`) or preserved (old file);
                    // a new file without a manifest mode gets the ZIP entry's mode.
                    let mode = m.mode.or(old.get(&d.target).map(|o| o.1)).unwrap_or(d.zip_mode);
                    new.insert(d.target.clone(), (blake3_hex(&d.content), mode));
                }
            }
            Fixture {
                v1_state: DeviceState::new(None, old),
                v2_state: DeviceState::new(Some(V2), new),
                v1,
                modules,
                base_zip: buf.into_inner(),
            }
        }

        /// Ten targets: four overwrite existing files (modes 0755, 0640, 0755, 0600), six are
        /// new, five of them in directories that do not exist yet (up to three levels deep);
        /// one directory module deploys five files under an existing directory.
        fn app() -> Fixture {
            let v1 = vec![
                ("opt/app/bin/app".to_string(), b"#!/bin/sh\necho app v1\n".to_vec(), 0o755),
                ("opt/app/etc/app.conf".to_string(), b"level = 1\n".to_vec(), 0o640),
                ("opt/app/lib/libfoo.so".to_string(), b"libfoo v1".to_vec(), 0o755),
                (
                    "opt/app/lib/libbar.so".to_string(),
                    b"libbar v1, a little longer".to_vec(),
                    0o600,
                ),
                (
                    "opt/app/share/readme.txt".to_string(),
                    b"not part of any package".to_vec(),
                    0o444,
                ),
                ("etc/hostname".to_string(), b"printer-7\n".to_vec(), 0o644),
            ];
            let pattern = |seed: u8, len: usize| {
                (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>()
            };
            let modules = vec![
                Module::file(
                    "app",
                    "files/app",
                    "opt/app/bin/app",
                    Some(0o750),
                    0o644,
                    b"#!/bin/sh\necho app v2 (new)\n".to_vec(),
                ),
                Module::file(
                    "conf",
                    "files/app.conf",
                    "opt/app/etc/app.conf",
                    None,
                    0o644,
                    b"level = 2\nextra = true\n".to_vec(),
                ),
                Module::file(
                    "helper",
                    "files/helper",
                    "opt/app/bin/helper",
                    None,
                    0o755,
                    b"#!/bin/sh\necho helper\n".to_vec(),
                ),
                Module::file(
                    "data",
                    "files/data.bin",
                    "opt/app/data/v2/nested/data.bin",
                    Some(0o600),
                    0o644,
                    pattern(7, 40_000),
                ),
                Module::file(
                    "unit",
                    "files/tope.service",
                    "etc/systemd/system/tope.service",
                    None,
                    0o644,
                    b"[Unit]\n".to_vec(),
                ),
                Module::dir(
                    "lib",
                    "lib/",
                    "opt/app/lib",
                    vec![
                        ("libfoo.so".into(), 0o644, b"libfoo v2".to_vec()),
                        ("libbar.so".into(), 0o644, pattern(3, 5000)),
                        ("plugins/a.so".into(), 0o755, b"plugin a".to_vec()),
                        ("plugins/b.so".into(), 0o644, b"plugin b".to_vec()),
                        ("plugins/deep/c.so".into(), 0o700, pattern(9, 3000)),
                    ],
                ),
            ];
            Fixture::new(v1, modules, zip::CompressionMethod::Deflated)
        }

        fn setup_v1(&self, env: &Env) {
            for (rel, content, mode) in &self.v1 {
                env.put(rel, content, *mode);
            }
        }

        /// Target paths in the engine's order (sorted by absolute path; the root prefix is
        /// common to all).
        fn targets_sorted(&self) -> Vec<&str> {
            let mut t: Vec<&str> =
                self.modules.iter().flat_map(|m| &m.files).map(|d| d.target.as_str()).collect();
            t.sort_unstable();
            t
        }

        fn n_targets(&self) -> u32 {
            self.targets_sorted().len() as u32
        }

        fn n_old_targets(&self) -> u32 {
            self.targets_sorted().iter().filter(|t| self.v1_state.files.contains_key(**t)).count()
                as u32
        }

        /// The manifest for `env`, with every hash declared; `wrong_hash_for` names a target
        /// whose declared hash is wrong.
        fn manifest(&self, env: &Env, wrong_hash_for: Option<&str>) -> String {
            let hash = |d: &Deploy| {
                if Some(d.target.as_str()) == wrong_hash_for {
                    blake3_hex(b"not the content")
                } else {
                    blake3_hex(&d.content)
                }
            };
            let modules: Vec<serde_json::Value> = self
                .modules
                .iter()
                .map(|m| {
                    let mut j =
                        serde_json::json!({"name": m.name, "src": m.src, "dst": env.dst(&m.dst)});
                    if m.is_dir() {
                        let files: serde_json::Map<String, serde_json::Value> = m
                            .files
                            .iter()
                            .map(|d| (d.entry[m.src.len()..].to_string(), hash(d).into()))
                            .collect();
                        j["files"] = files.into();
                    } else {
                        j["blake3"] = hash(&m.files[0]).into();
                    }
                    if let Some(mode) = m.mode {
                        j["mode"] = format!("{mode:04o}").into();
                    }
                    j
                })
                .collect();
            serde_json::json!({"version": V2, "modules": modules}).to_string()
        }

        /// Writes the package for `env` (outside the root) and returns its path.
        fn package(&self, env: &Env, wrong_hash_for: Option<&str>) -> String {
            let path: PathBuf =
                env.pkg_path(if wrong_hash_for.is_some() { "bad.zip" } else { "v2.zip" });
            std::fs::write(&path, &self.base_zip).unwrap();
            let f = std::fs::File::options().read(true).write(true).open(&path).unwrap();
            let mut z = zip::ZipWriter::new_append(f).unwrap();
            z.start_file(
                "manifest.json",
                zip::write::SimpleFileOptions::default().unix_permissions(0o644),
            )
            .unwrap();
            z.write_all(self.manifest(env, wrong_hash_for).as_bytes()).unwrap();
            z.finish().unwrap();
            path.to_str().unwrap().to_string()
        }
    }

    // ---------------------------------------------------------------- arming crash points

    /// Every point once; a loop point with `n` passes also at its 3rd (mid-loop) and last.
    fn arms(points: &[&'static str], loops: &[(&'static str, u32)]) -> Vec<Arm> {
        let mut out = Vec::new();
        for p in points {
            let mut hits = vec![1];
            if let Some((_, n)) = loops.iter().find(|(l, _)| l == p) {
                assert!(*n >= 1, "fixture error: loop point {p} has no pass");
                hits.extend([3.min(*n), *n]);
                hits.sort_unstable();
                hits.dedup();
            }
            out.extend(hits.into_iter().map(|h| Arm::new(p, h)));
        }
        out
    }

    /// `recover`, the invariant, the expected side, then a second `recover` that must find
    /// nothing to do and change nothing.
    fn recover_and_check(
        env: &Env,
        before: &DeviceState,
        after: &DeviceState,
        expected: Side,
        ctx: &str,
    ) -> Side {
        let rec = env.run(&["recover", "--json"]);
        assert!(
            matches!(rec.code, Some(0 | 4)),
            "{ctx}: recover should exit 0 or 4:\n{}",
            rec.describe()
        );
        let result = rec.json()["result"].as_str().unwrap_or_default().to_string();
        let side = check_all_or_nothing(env, before, after, &format!("{ctx}, after recover"));
        assert_eq!(
            side,
            expected,
            "{ctx}: recover left the device all {side:?}, expected all {expected:?}:\n{}",
            rec.describe()
        );
        match (rec.code, side) {
            (Some(4), Side::After) => {
                panic!("{ctx}: recover reported a rollback (exit 4) but the device is all After")
            }
            (Some(0), Side::Before) => {
                assert_eq!(
                    result,
                    "nothing",
                    "{ctx}: recover exit 0 and the device is all Before, yet it did something:\n{}",
                    rec.describe()
                );
            }
            _ => {}
        }
        let snapshot = tree(&env.root);
        let again = env.run(&["recover", "--json"]);
        assert_eq!(
            again.code,
            Some(0),
            "{ctx}: a second recover should have nothing to do:\n{}",
            again.describe()
        );
        assert_eq!(
            again.json()["result"],
            "nothing",
            "{ctx}: a second recover did something:\n{}",
            again.describe()
        );
        assert_eq!(tree(&env.root), snapshot, "{ctx}: a second recover changed the tree");
        assert_eq!(
            check_all_or_nothing(env, before, after, &format!("{ctx}, after a second recover")),
            side
        );
        side
    }

    // ---------------------------------------------------------------- bookkeeping

    #[derive(Default)]
    struct Tally {
        /// Point → scenarios in which it killed a process.
        killed: BTreeMap<&'static str, BTreeSet<&'static str>>,
        /// (scenario, arms) runs made.
        runs: usize,
        per_scenario: BTreeMap<&'static str, usize>,
        failures: Vec<String>,
    }

    impl Tally {
        fn killed_by(&mut self, arm: Arm, scenario: &'static str) {
            self.killed.entry(arm.point).or_default().insert(scenario);
        }

        /// Runs one (scenario, point) case; a failure is recorded and the others still run.
        fn case(&mut self, scenario: &'static str, label: String, f: impl FnOnce(&mut Tally)) {
            self.runs += 1;
            *self.per_scenario.entry(scenario).or_default() += 1;
            let start = Instant::now();
            if let Err(e) = catch_unwind(AssertUnwindSafe(|| f(self))) {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(std::string::ToString::to_string))
                    .unwrap_or_else(|| "non-string panic".into());
                self.failures.push(format!("[{scenario}] {label}: {msg}"));
                println!("  FAIL [{scenario}] {label}");
            } else {
                println!("  ok   [{scenario}] {label} ({} ms)", start.elapsed().as_millis());
            }
        }
    }

    /// Points an install or a rollback transaction passes on its way to `Committed`.
    const FORWARD_POINTS: &[&str] = &[
        "plan.copy_written",
        "enter.Planned",
        "enter.Staged",
        "stage.file",
        "stage.synced",
        "enter.BackedUp",
        "backup.file",
        "backup.synced",
        "enter.Swapped",
        "swap.file",
        "swap.synced",
        "enter.Verified",
        "verify.file",
        "enter.Committed",
        "commit.cleaned",
    ];

    // ---------------------------------------------------------------- scenarios

    /// The fixtures do what the scenarios assume, without any crash.
    fn baselines(fx: &Fixture) {
        let env = Env::new();
        fx.setup_v1(&env);
        assert_eq!(
            check_all_or_nothing(&env, &fx.v1_state, &fx.v2_state, "baseline: v1 device"),
            Side::Before
        );
        let pkg = fx.package(&env, None);
        env.ok(&["install", &pkg]);
        assert_eq!(
            check_all_or_nothing(&env, &fx.v1_state, &fx.v2_state, "baseline: clean install"),
            Side::After
        );
        env.ok(&["rollback", "--to", "factory"]);
        assert_eq!(
            check_all_or_nothing(
                &env,
                &fx.v2_state,
                &fx.v1_state,
                "baseline: clean rollback to factory"
            ),
            Side::After
        );

        let env = Env::new();
        fx.setup_v1(&env);
        let second = fx.targets_sorted()[1];
        let bad = fx.package(&env, Some(second));
        let r = env.run(&["install", &bad, "--json"]);
        assert!(
            matches!(r.code, Some(3 | 4)),
            "baseline: a wrong hash must fail the install:\n{}",
            r.describe()
        );
        let j = r.json();
        assert_eq!(j["outcome"], "rolled_back", "baseline: wrong hash:\n{}", r.describe());
        assert_eq!(j["error"]["code"], "HASH_MISMATCH", "baseline: wrong hash:\n{}", r.describe());
        assert_eq!(
            check_all_or_nothing(&env, &fx.v1_state, &fx.v2_state, "baseline: failed install"),
            Side::Before
        );
    }

    /// Install v2 over v1 with each point armed; `recover` resumes (default policy).
    fn install_scenario(fx: &Fixture, t: &mut Tally) {
        const S: &str = "install";
        let loops = [
            ("stage.file", fx.n_targets()),
            ("backup.file", fx.n_old_targets()),
            ("swap.file", fx.n_targets()),
            ("verify.file", fx.n_targets()),
        ];
        for arm in arms(FORWARD_POINTS, &loops) {
            t.case(S, arm.to_string(), |t| {
                let ctx = format!("[{S}] install killed at {arm}");
                let env = Env::new();
                fx.setup_v1(&env);
                let pkg = fx.package(&env, None);
                expect_killed(&run_armed(&env, &["install", &pkg], arm), arm, &ctx);
                t.killed_by(arm, S);
                // Before the journal knows the transaction there is nothing to resume.
                let expected =
                    if arm.point == "plan.copy_written" { Side::Before } else { Side::After };
                recover_and_check(&env, &fx.v1_state, &fx.v2_state, expected, &ctx);
            });
        }
    }

    /// v2 installed cleanly, then `rollback --to factory` with each point armed.
    fn rollback_scenario(fx: &Fixture, t: &mut Tally) {
        const S: &str = "rollback";
        // A rollback to factory stages the old files from backups, backs up every v2 file,
        // and swaps (renames or removes) every target.
        let loops = [
            ("stage.file", fx.n_old_targets()),
            ("backup.file", fx.n_targets()),
            ("swap.file", fx.n_targets()),
            ("verify.file", fx.n_targets()),
        ];
        for arm in arms(FORWARD_POINTS, &loops) {
            t.case(S, arm.to_string(), |t| {
                let ctx = format!("[{S}] rollback --to factory killed at {arm}");
                let env = Env::new();
                fx.setup_v1(&env);
                let pkg = fx.package(&env, None);
                env.ok(&["install", &pkg]);
                expect_killed(&run_armed(&env, &["rollback", "--to", "factory"], arm), arm, &ctx);
                t.killed_by(arm, S);
                let expected =
                    if arm.point == "plan.copy_written" { Side::Before } else { Side::After };
                recover_and_check(&env, &fx.v2_state, &fx.v1_state, expected, &ctx);
            });
        }
    }

    /// The transaction a recovery scenario interrupts.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Tx {
        /// `install` v2 over v1.
        Install,
        /// `rollback --to factory` after a clean install of v2.
        RollbackToFactory,
    }

    impl Tx {
        /// Prepares a fresh device and crashes the transaction at `base`. Returns the states
        /// before and after the transaction.
        fn crash<'f>(
            self,
            fx: &'f Fixture,
            env: &Env,
            base: Arm,
            t: &mut Tally,
            ctx: &str,
        ) -> (&'f DeviceState, &'f DeviceState) {
            fx.setup_v1(env);
            let pkg = fx.package(env, None);
            match self {
                Tx::Install => {
                    expect_killed(&run_armed(env, &["install", &pkg], base), base, ctx);
                    t.killed_by(base, "install");
                    (&fx.v1_state, &fx.v2_state)
                }
                Tx::RollbackToFactory => {
                    env.ok(&["install", &pkg]);
                    expect_killed(
                        &run_armed(env, &["rollback", "--to", "factory"], base),
                        base,
                        ctx,
                    );
                    t.killed_by(base, "rollback");
                    (&fx.v2_state, &fx.v1_state)
                }
            }
        }
    }

    /// A transaction is crashed at `base`; then `recover` itself is crashed at each point it
    /// can reach; then `recover` again must reach the same end.
    #[allow(clippy::too_many_arguments)]
    fn recovery_scenario(
        fx: &Fixture,
        t: &mut Tally,
        scenario: &'static str,
        config: &str,
        (tx, base): (Tx, Arm),
        points: &[&'static str],
        loops: &[(&'static str, u32)],
        expected: Side,
    ) {
        for arm in arms(points, loops) {
            t.case(scenario, arm.to_string(), |t| {
                let ctx =
                    format!("[{scenario}] {tx:?} killed at {base}, then recover killed at {arm}");
                let env = Env::with_config(config);
                let (before, after) = tx.crash(fx, &env, base, t, &ctx);
                expect_killed(&run_armed(&env, &["recover"], arm), arm, &ctx);
                t.killed_by(arm, scenario);
                let (_, in_flight) = status(&env, &ctx);
                let ended =
                    matches!(arm.point, "enter.Committed" | "commit.cleaned" | "enter.RolledBack");
                assert_eq!(
                    in_flight.is_null(),
                    ended,
                    "{ctx}: in flight after recover was killed: {in_flight}"
                );
                recover_and_check(&env, before, after, expected, &ctx);
            });
        }
    }

    fn recovery_scenarios(fx: &Fixture, t: &mut Tally) {
        let n = fx.n_targets();
        let install_loops = [
            ("stage.file", n),
            ("backup.file", fx.n_old_targets()),
            ("swap.file", n),
            ("verify.file", n),
        ];
        let undo = [
            "recover.attempt",
            "enter.RollingBack",
            "rollback.file",
            "rollback.synced",
            "enter.RolledBack",
        ];
        // Crashed right after `Planned`: resuming redoes every forward step.
        let mut from_planned = vec!["recover.attempt"];
        from_planned.extend(
            FORWARD_POINTS.iter().filter(|p| !matches!(**p, "plan.copy_written" | "enter.Planned")),
        );
        recovery_scenario(
            fx,
            t,
            "recover resuming from Planned",
            "",
            (Tx::Install, Arm::new("enter.Planned", 1)),
            &from_planned,
            &install_loops,
            Side::After,
        );
        // Crashed mid-swap: resuming finishes the swap (every target passes swap.file again).
        recovery_scenario(
            fx,
            t,
            "recover resuming mid-swap",
            "",
            (Tx::Install, Arm::new("swap.file", 3)),
            &[
                "recover.attempt",
                "swap.file",
                "swap.synced",
                "enter.Verified",
                "verify.file",
                "enter.Committed",
                "commit.cleaned",
            ],
            &install_loops,
            Side::After,
        );
        // recovery = "rollback": the mid-swap install is undone.
        recovery_scenario(
            fx,
            t,
            "recover rolling back mid-swap",
            "recovery = \"rollback\"",
            (Tx::Install, Arm::new("swap.file", 3)),
            &undo,
            &[("rollback.file", n)],
            Side::Before,
        );
        // recovery = "rollback" of an interrupted rollback transaction: v2 comes back from
        // the backups the rollback made of it.
        recovery_scenario(
            fx,
            t,
            "recover undoing a mid-swap rollback",
            "recovery = \"rollback\"",
            (Tx::RollbackToFactory, Arm::new("swap.file", 3)),
            &undo,
            &[("rollback.file", n)],
            Side::Before,
        );
    }

    /// The second target's declared hash is wrong: staging fails with `HASH_MISMATCH` and the
    /// install rolls itself back; crash it anywhere on that path.
    fn failing_install_scenario(fx: &Fixture, t: &mut Tally) {
        const S: &str = "failing install";
        let second = fx.targets_sorted()[1];
        let points = [
            "plan.copy_written",
            "enter.Planned",
            "enter.Staged",
            "stage.file",
            "enter.RollingBack",
            "rollback.file",
            "rollback.synced",
            "enter.RolledBack",
        ];
        // Only the first target is staged before the mismatch; undo passes every target.
        for arm in arms(&points, &[("stage.file", 1), ("rollback.file", fx.n_targets())]) {
            t.case(S, arm.to_string(), |t| {
                let ctx = format!("[{S}] install with a wrong hash for {second} killed at {arm}");
                let env = Env::new();
                fx.setup_v1(&env);
                let pkg = fx.package(&env, Some(second));
                expect_killed(&run_armed(&env, &["install", &pkg], arm), arm, &ctx);
                t.killed_by(arm, S);
                recover_and_check(&env, &fx.v1_state, &fx.v2_state, Side::Before, &ctx);
            });
        }
    }

    #[test]
    fn sigkill_at_every_crash_point_then_recover_leaves_every_target_all_old_or_all_new() {
        let started = Instant::now();
        let fx = Fixture::app();
        baselines(&fx);
        let mut t = Tally::default();
        install_scenario(&fx, &mut t);
        rollback_scenario(&fx, &mut t);
        recovery_scenarios(&fx, &mut t);
        failing_install_scenario(&fx, &mut t);

        let all: BTreeSet<&str> = CRASH_POINTS.iter().copied().collect();
        let reached: BTreeSet<&str> = t.killed.keys().copied().collect();
        let missing: Vec<&&str> = all.difference(&reached).collect();
        println!("crash points: {} in CRASH_POINTS, {} killed a process", all.len(), reached.len());
        for (p, scenarios) in &t.killed {
            println!("  {p:<18} {scenarios:?}");
        }
        println!(
            "{} (scenario, point) runs in {:.1} s: {:?}",
            t.runs,
            started.elapsed().as_secs_f64(),
            t.per_scenario
        );
        let mut problems = t.failures.clone();
        if !missing.is_empty() {
            problems.push(format!("crash points never reached by any scenario: {missing:?}"));
        }
        assert!(problems.is_empty(), "{} problem(s):\n\n{}", problems.len(), problems.join("\n\n"));
        assert_eq!(reached, all);
    }

    // ---------------------------------------------------------------- max_recovery_attempts

    #[test]
    fn recover_stops_at_rollback_failed_after_max_recovery_attempts_and_retry_then_rolls_back() {
        let fx = Fixture::app();
        let env = Env::with_config("max_recovery_attempts = 2");
        fx.setup_v1(&env);
        let pkg = fx.package(&env, None);
        let base = Arm::new("swap.file", 3);
        expect_killed(&run_armed(&env, &["install", &pkg], base), base, "install");
        let attempt = Arm::new("recover.attempt", 1);
        for n in 1..=2 {
            expect_killed(
                &run_armed(&env, &["recover"], attempt),
                attempt,
                &format!("recover attempt {n}"),
            );
        }
        let third = env.run(&["recover", "--json"]);
        assert_eq!(
            third.code,
            Some(5),
            "the third recover (max_recovery_attempts = 2) must stop for an operator:\n{}",
            third.describe()
        );
        let (_, in_flight) = status(&env, "after giving up");
        assert_eq!(in_flight["phase"], "RollbackFailed", "status after giving up: {in_flight}");

        // Without --retry it keeps saying so, and touches nothing.
        let snapshot = tree(&env.root);
        let again = env.run(&["recover"]);
        assert_eq!(again.code, Some(5), "recover without --retry:\n{}", again.describe());
        assert_eq!(tree(&env.root), snapshot, "recover without --retry changed the tree");

        let retry = env.run(&["recover", "--retry", "--json"]);
        assert_eq!(retry.code, Some(4), "recover --retry must roll back:\n{}", retry.describe());
        let side = check_all_or_nothing(&env, &fx.v1_state, &fx.v2_state, "after recover --retry");
        assert_eq!(side, Side::Before);
        let last = env.run(&["recover", "--json"]);
        assert_eq!(last.code, Some(0), "{}", last.describe());
        assert_eq!(last.json()["result"], "nothing");
    }

    // ---------------------------------------------------------------- random kills

    const DEFAULT_SEED: u64 = 0x7095_C0DE_2026_0001;

    fn seed() -> u64 {
        match std::env::var("TOPE_CRASH_SEED") {
            Err(_) => DEFAULT_SEED,
            Ok(s) => {
                let s = s.trim();
                let parsed = match s.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => s.parse(),
                };
                parsed.unwrap_or_else(|e| panic!("TOPE_CRASH_SEED={s:?} is not a u64 ({e})"))
            }
        }
    }

    /// 300 files of 1–16 KiB in nested directories as one directory module (a third of them
    /// exist in v1; the last fifty go to directories that do not exist yet) plus three 2 MiB
    /// file modules (two overwrite v1 files, one is new).
    fn big_fixture(rng: &mut XorShift) -> Fixture {
        let mut v1 = Vec::new();
        let mut tree_files = Vec::new();
        for i in 0..300u32 {
            let rel = if i < 250 {
                format!("d{}/e{}/f{i:03}.dat", i % 5, i % 7)
            } else {
                format!("new/g{}/f{i:03}.dat", i % 4)
            };
            let len = 1024 + rng.below(15 * 1024 + 1) as usize;
            if i < 250 && i % 3 == 0 {
                let old_len = 1024 + rng.below(15 * 1024 + 1) as usize;
                v1.push((format!("opt/big/tree/{rel}"), rng.bytes(old_len), 0o640));
            }
            tree_files.push((rel, 0o644, rng.bytes(len)));
        }
        const MIB2: usize = 2 * 1024 * 1024;
        v1.push(("opt/big/blob0.bin".into(), rng.bytes(MIB2), 0o755));
        v1.push(("opt/big/blob1.bin".into(), rng.bytes(MIB2), 0o640));
        let modules = vec![
            Module::dir("tree", "tree/", "opt/big/tree", tree_files),
            Module::file(
                "blob0",
                "blobs/blob0.bin",
                "opt/big/blob0.bin",
                None,
                0o644,
                rng.bytes(MIB2),
            ),
            Module::file(
                "blob1",
                "blobs/blob1.bin",
                "opt/big/blob1.bin",
                Some(0o600),
                0o644,
                rng.bytes(MIB2),
            ),
            Module::file(
                "blob2",
                "blobs/blob2.bin",
                "opt/big/new/deeper/blob2.bin",
                None,
                0o755,
                rng.bytes(MIB2),
            ),
        ];
        Fixture::new(v1, modules, zip::CompressionMethod::Stored)
    }

    /// An install whose stderr is watched for the engine's "transaction planned" line, logged
    /// just after the journal committed the transaction's beginning.
    struct WatchedInstall {
        child: std::process::Child,
        spawned: Instant,
        planned: std::sync::mpsc::Receiver<Instant>,
    }

    impl WatchedInstall {
        fn spawn(env: &Env, pkg: &str) -> WatchedInstall {
            use std::io::BufRead;
            let mut child = env
                .command(&["--log-level", "info", "install", pkg])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let spawned = Instant::now();
            let stderr = child.stderr.take().unwrap();
            let (tx, planned) = std::sync::mpsc::channel();
            // Drains stderr to the end so that the child never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in
                    std::io::BufReader::new(stderr).lines().map_while(std::result::Result::ok)
                {
                    if line.contains("transaction planned") {
                        let _ = tx.send(Instant::now());
                    }
                }
            });
            WatchedInstall { child, spawned, planned }
        }

        /// When the transaction began, if it did before the process ended.
        fn wait_planned(&self) -> Option<Instant> {
            self.planned.recv_timeout(Duration::from_secs(60)).ok()
        }
    }

    #[test]
    fn sigkill_at_random_moments_during_install_then_recover_leaves_all_old_or_all_new() {
        const ITERATIONS: usize = 15;
        let seed = seed();
        println!("random-kill seed = {seed:#x} (set TOPE_CRASH_SEED to replay or vary)");
        let mut rng = XorShift::new(seed);
        let fx = big_fixture(&mut rng);

        // Uninterrupted installs set the time scales: from the spawn to the end, and from the
        // transaction's beginning to the end (the fastest of three, so that a cold cache or a
        // busy machine does not push most kills past the end).
        let mut totals = Vec::new();
        let mut in_tx = Vec::new();
        for _ in 0..3 {
            let env = Env::new();
            fx.setup_v1(&env);
            let pkg = fx.package(&env, None);
            let mut install = WatchedInstall::spawn(&env, &pkg);
            let planned = install
                .wait_planned()
                .expect("an uninterrupted install logs \"transaction planned\"");
            let status = install.child.wait().unwrap();
            let end = Instant::now();
            totals.push(end - install.spawned);
            in_tx.push(end - planned);
            assert_eq!(status.code(), Some(0), "uninterrupted install: {status:?}");
            assert_eq!(
                check_all_or_nothing(&env, &fx.v1_state, &fx.v2_state, "uninterrupted install"),
                Side::After
            );
        }
        let full = *totals.iter().min().unwrap();
        let transaction = *in_tx.iter().min().unwrap();
        println!(
            "uninterrupted install of {} files: {:?} ms from the spawn, \
             {:?} ms of them in the transaction",
            fx.n_targets(),
            totals.iter().map(std::time::Duration::as_millis).collect::<Vec<_>>(),
            in_tx.iter().map(std::time::Duration::as_millis).collect::<Vec<_>>(),
        );

        let mut sides = BTreeMap::new();
        let mut kills = 0;
        let mut in_flight_kills = 0;
        let mut failures = Vec::new();
        for i in 0..ITERATIONS {
            // Most kills land at a random moment of the transaction, timed from its beginning
            // as this run logs it (planning takes a varying share of the whole); every fifth at
            // a random moment from the spawn, so that kills during planning are covered too.
            let from_spawn = i % 5 == 4;
            // Both recovery policies: every other iteration rolls back what it finds in flight.
            let policy = if i % 2 == 0 { "resume" } else { "rollback" };
            let scale = if from_spawn { full } else { transaction };
            let delay = Duration::from_micros(rng.below(scale.as_micros() as u64 + 1));
            let result = catch_unwind(AssertUnwindSafe(|| {
                let env = Env::with_config(&format!("recovery = {policy:?}"));
                fx.setup_v1(&env);
                let pkg = fx.package(&env, None);
                let mut install = WatchedInstall::spawn(&env, &pkg);
                if from_spawn {
                    std::thread::sleep(delay.saturating_sub(install.spawned.elapsed()));
                } else if let Some(planned) = install.wait_planned() {
                    std::thread::sleep(delay.saturating_sub(planned.elapsed()));
                }
                let _ = install.child.kill();
                let status = install.child.wait().unwrap();
                let killed = {
                    use std::os::unix::process::ExitStatusExt;
                    status.signal() == Some(9)
                };
                assert!(
                    killed || status.code() == Some(0),
                    "install neither finished nor was killed: {status:?}"
                );
                let anchor = if from_spawn { "the spawn" } else { "the transaction's beginning" };
                let ctx = format!(
                    "iteration {i} (seed {seed:#x}, recovery {policy}, kill {} ms after {anchor})",
                    delay.as_millis()
                );
                let rec = env.run(&["recover", "--json"]);
                assert!(matches!(rec.code, Some(0 | 4)), "{ctx}: recover:\n{}", rec.describe());
                // In flight: the journal held a transaction begun and not ended, which only
                // `recover` can tell (a kill before the journal was opened left nothing to do).
                let in_flight = rec.json()["result"] != "nothing";
                assert!(
                    killed || !in_flight,
                    "{ctx}: a finished install left a transaction in flight:\n{}",
                    rec.describe()
                );
                let side = check_all_or_nothing(&env, &fx.v1_state, &fx.v2_state, &ctx);
                if in_flight {
                    // What recover reports is what the tree shows: exit 4 = rolled back to the
                    // old contents, exit 0 = finished; and resume never rolls back a readable
                    // package's install.
                    let expected = if rec.code == Some(4) { Side::Before } else { Side::After };
                    assert_eq!(
                        side, expected,
                        "{ctx}: recover exit {:?} but the tree is all {side:?}",
                        rec.code
                    );
                    assert!(
                        policy == "rollback" || rec.code == Some(0),
                        "{ctx}: recovery = resume rolled back:\n{}",
                        rec.describe()
                    );
                }
                let again = env.run(&["recover", "--json"]);
                assert_eq!(again.code, Some(0), "{ctx}: second recover:\n{}", again.describe());
                assert_eq!(
                    again.json()["result"],
                    "nothing",
                    "{ctx}: second recover did something"
                );
                (killed, in_flight, rec.code, side, anchor)
            }));
            match result {
                Ok((killed, in_flight, code, side, anchor)) => {
                    println!(
                        "  iteration {i:>2}: kill {:>5} ms after {anchor} (of {} ms): {}; \
                         recover ({policy}) exit {code:?}; all {side:?}",
                        delay.as_millis(),
                        scale.as_millis(),
                        match (killed, in_flight) {
                            (true, true) => "killed in flight",
                            (true, false) => "killed before the transaction began",
                            _ => "had already finished",
                        }
                    );
                    *sides.entry(format!("{side:?}")).or_insert(0) += 1;
                    kills += usize::from(killed);
                    in_flight_kills += usize::from(in_flight);
                }
                Err(e) => {
                    let msg = e.downcast_ref::<String>().cloned().unwrap_or_else(|| "panic".into());
                    println!("  iteration {i:>2}: kill after {} ms: FAILED", delay.as_millis());
                    failures.push(msg);
                }
            }
        }
        println!(
            "random kills: {ITERATIONS} iterations, {kills} killed, {in_flight_kills} of them \
             with a transaction in flight, outcomes {sides:?}, seed {seed:#x}"
        );
        assert!(
            failures.is_empty(),
            "{} iteration(s) failed (seed {seed:#x}):\n\n{}",
            failures.len(),
            failures.join("\n\n")
        );
        // Only a kill inside the transaction tests recovery; a kill before the journal opened
        // or after the end proves nothing about it. Twelve of the fifteen are aimed inside.
        assert!(
            in_flight_kills >= ITERATIONS / 2,
            "only {in_flight_kills} of {ITERATIONS} kills landed inside the transaction \
             (seed {seed:#x}): the test exercised too little"
        );
    }
}
