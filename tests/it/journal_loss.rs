//! Journal loss (SPEC §3 "The journal is not a single point of failure", journal-format.md
//! §5.5): an install is killed at crash points across the whole transaction, then
//! `<state>/journal.redb` is damaged — truncated to a random length, a random 4 KiB page
//! overwritten with random bytes, deleted, emptied, or zeroed — and `recover` must either
//! report `JOURNAL_CORRUPT` and roll the plan back from the redundant plan copy and the hashed
//! backups (all old), or, when redb still opens the file (the damage hit nothing it needs),
//! recover normally (all old or all new). The plan copy damaged as well means an operator is
//! needed; the plan copy damaged alone does not matter (the journal holds the plan).
//!
//! Random choices come from one seed, printed; set `TOPE_JOURNAL_SEED` to replay or vary.
//! Run with `cargo test --features failpoints --test it journal_loss -- --nocapture`.

#[cfg(not(feature = "failpoints"))]
#[test]
fn journal_loss_tests_need_the_failpoints_feature() {
    panic!(
        "the journal-loss tests crash installs at named crash points: \
         run `cargo test --features failpoints --test it journal_loss -- --nocapture`"
    );
}

#[cfg(feature = "failpoints")]
mod armed {
    use crate::support::XorShift as Rng;
    use crate::support::*;
    use serde_json::{Value, json};
    use std::collections::{BTreeMap, BTreeSet};
    use std::fmt;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::path::{Path, PathBuf};
    use std::time::Instant;
    use tope_updater::failpoint::CRASH_POINTS;

    // ---------------------------------------------------------------- randomness

    const DEFAULT_SEED: u64 = 0x10E5_10E5_2026_0005;

    /// The seed (printed by every test), `TOPE_JOURNAL_SEED` (decimal or 0x-hex) if set. Each
    /// test mixes in its own salt so that the tests do not share their random choices.
    fn rng(test: &str, salt: u64) -> (u64, Rng) {
        let seed = match std::env::var("TOPE_JOURNAL_SEED") {
            Err(_) => DEFAULT_SEED,
            Ok(s) => {
                let s = s.trim();
                let parsed = match s.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => s.parse(),
                };
                parsed.unwrap_or_else(|e| panic!("TOPE_JOURNAL_SEED={s:?} is not a u64 ({e})"))
            }
        };
        println!("{test}: journal-loss seed = {seed:#x} (set TOPE_JOURNAL_SEED to replay or vary)");
        (seed, Rng::new(seed ^ salt.wrapping_mul(0x2545_F491_4F6C_DD1D)))
    }

    // ---------------------------------------------------------------- the device and the package

    const V2: &str = "2.0.0";

    /// The device before the install: three files the package overwrites (distinct modes), one
    /// it never touches.
    fn seed_v1(env: &Env) {
        env.put("bin/app", b"#!/bin/sh\necho app v1\n", 0o755);
        env.put("etc/app.conf", b"level = 1\n", 0o640);
        env.put("lib/libfoo.so", &pattern(1, 20_000), 0o644);
        env.put("share/untouched", b"never part of a package\n", 0o444);
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8).collect()
    }

    /// (name, destination under the root, content, manifest mode). Sorted by destination (the
    /// engine's order): bin/app, bin/helper, data/v2/nested/blob.bin, etc/app.conf, lib/libfoo.so.
    fn modules() -> Vec<(&'static str, &'static str, Vec<u8>, Option<&'static str>)> {
        vec![
            ("app", "bin/app", b"#!/bin/sh\necho app v2\n".to_vec(), Some("0750")),
            ("helper", "bin/helper", b"#!/bin/sh\necho helper\n".to_vec(), None),
            ("blob", "data/v2/nested/blob.bin", pattern(7, 64 * 1024), Some("0600")),
            ("conf", "etc/app.conf", b"level = 2\nextra = true\n".to_vec(), None),
            ("lib", "lib/libfoo.so", pattern(2, 30_000), None),
        ]
    }

    /// Targets; old targets among them (backed up).
    const TARGETS: u32 = 5;
    const OLD_TARGETS: u32 = 3;
    /// The module whose declared hash is wrong in the failing package: the fourth target, so
    /// three files are staged before the mismatch and the rollback passes all five.
    const WRONG: &str = "conf";

    /// Writes the v2 package (every hash declared); `failing`: one declared hash is wrong.
    fn package(env: &Env, failing: bool) -> PathBuf {
        let mut mods = Vec::new();
        let mut entries = Vec::new();
        for (name, dst, content, mode) in modules() {
            let src = format!("files/{name}");
            let hash = if failing && name == WRONG {
                blake3_hex(b"something else")
            } else {
                blake3_hex(&content)
            };
            let mut m = json!({"name": name, "src": src, "dst": env.dst(dst), "blake3": hash});
            if let Some(mode) = mode {
                m["mode"] = json!(mode);
            }
            mods.push(m);
            entries.push((src, content));
        }
        let manifest = json!({"version": V2, "modules": mods}).to_string();
        let files: Vec<(&str, &[u8])> =
            entries.iter().map(|(n, c)| (n.as_str(), c.as_slice())).collect();
        let path = env.pkg_path(if failing { "v2-bad.zip" } else { "v2.zip" });
        write_package(&path, &manifest, &files);
        path
    }

    fn p(path: &Path) -> &str {
        path.to_str().unwrap()
    }

    /// The trees before and after a clean install (relative paths, so any device compares).
    struct Sides {
        old: BTreeMap<String, String>,
        new: BTreeMap<String, String>,
    }

    fn sides() -> Sides {
        let env = Env::new();
        seed_v1(&env);
        let old = tree(&env.root);
        // The all-new side comes from the package rules (support::after_install), and a clean
        // install must end exactly there: the engine is checked against it, never its source.
        let mods = modules();
        let files: Vec<NewFile> = mods
            .iter()
            .map(|(_, dst, content, mode)| NewFile {
                rel: dst.to_string(),
                content,
                manifest_mode: mode.map(|m| u32::from_str_radix(m, 8).unwrap()),
                zip_mode: Some(0o644),
            })
            .collect();
        let new = after_install(&old, &files);
        assert_ne!(old, new, "fixture error: the install changes nothing");
        env.ok(&["install", p(&package(&env, false))]);
        assert_eq!(tree(&env.root), new, "a clean install ends at the package's tree");
        let bad = env.run(&["install", p(&package(&env, true)), "--json"]);
        assert!(
            matches!(bad.code, Some(3 | 4)),
            "fixture error: the failing package must fail:\n{}",
            bad.describe()
        );
        assert_eq!(
            bad.json()["error"]["code"],
            "HASH_MISMATCH",
            "fixture error:\n{}",
            bad.describe()
        );
        Sides { old, new }
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Side {
        Old,
        New,
    }

    /// Which whole side the tree under the root is on; panics, naming the paths, on a mix.
    fn side_of(env: &Env, sides: &Sides, ctx: &str) -> Side {
        let have = tree(&env.root);
        if have == sides.old {
            return Side::Old;
        }
        if have == sides.new {
            return Side::New;
        }
        let keys: BTreeSet<&String> =
            have.keys().chain(sides.old.keys()).chain(sides.new.keys()).collect();
        let diff: Vec<String> = keys
            .into_iter()
            .filter(|k| have.get(*k) != sides.old.get(*k) || have.get(*k) != sides.new.get(*k))
            .map(|k| {
                format!(
                    "  {k}: have {:?}, old {:?}, new {:?}",
                    have.get(k),
                    sides.old.get(k),
                    sides.new.get(k)
                )
            })
            .collect();
        panic!("{ctx}: the tree is neither all old nor all new:\n{}", diff.join("\n"));
    }

    // ---------------------------------------------------------------- crashing

    /// A crash point armed to fire on its `hit`-th pass (1-based), in the good or the failing
    /// install.
    #[derive(Debug, Clone, Copy)]
    struct Arm {
        point: &'static str,
        hit: u32,
        failing: bool,
    }

    impl Arm {
        fn new(point: &'static str, hit: u32, failing: bool) -> Arm {
            assert!(CRASH_POINTS.contains(&point), "{point} is not in CRASH_POINTS");
            Arm { point, hit, failing }
        }

        fn spec(&self) -> String {
            kill_at(self.point, self.hit)
        }
    }

    impl fmt::Display for Arm {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let which = if self.failing { "failing install" } else { "install" };
            if self.hit == 1 {
                write!(f, "{which} at {}", self.point)
            } else {
                write!(f, "{which} at {}#{}", self.point, self.hit)
            }
        }
    }

    /// Points across the whole transaction: after the `Planned` commit, mid staging, mid
    /// backup, mid swap, after the swap, at `Verified` and `Committed` (the plan copy is still
    /// there: it is removed after the final commit), and mid rollback of a failing install.
    fn arms() -> Vec<Arm> {
        assert_eq!(modules().len() as u32, TARGETS);
        vec![
            Arm::new("enter.Planned", 1, false),
            Arm::new("stage.file", 2, false),
            Arm::new("enter.Staged", 1, false),
            Arm::new("backup.file", OLD_TARGETS - 1, false),
            Arm::new("enter.BackedUp", 1, false),
            Arm::new("enter.Swapped", 1, false),
            Arm::new("swap.file", 2, false),
            Arm::new("swap.file", TARGETS, false),
            Arm::new("swap.synced", 1, false),
            Arm::new("enter.Verified", 1, false),
            Arm::new("enter.Committed", 1, false),
            Arm::new("stage.file", 3, true),
            Arm::new("enter.RollingBack", 1, true),
            Arm::new("rollback.file", 3, true),
        ]
    }

    /// A fresh device with v1, and the install killed at `arm`. Returns the device.
    fn crashed(arm: Arm, ctx: &str) -> Env {
        let env = Env::new();
        seed_v1(&env);
        let pkg = package(&env, arm.failing);
        let r = Run::from(
            env.command(&["install", p(&pkg)]).env("FAILPOINTS", arm.spec()).output().unwrap(),
        );
        assert_eq!(
            r.signal,
            Some(9),
            "{ctx}: the install must be killed at its crash point (never reached?):\n{}",
            r.describe()
        );
        assert!(
            r.stderr.contains(&format!("crash point {}: SIGKILL", arm.point)),
            "{ctx}: killed by another point:\n{}",
            r.describe()
        );
        assert!(
            plan_copy(&env).exists(),
            "{ctx}: the plan copy must exist while the transaction is in flight"
        );
        env
    }

    fn journal(env: &Env) -> PathBuf {
        env.state.join("journal.redb")
    }

    fn plan_copy(env: &Env) -> PathBuf {
        env.state.join("inflight.plan")
    }

    /// `journal.redb.corrupt-*` files in the state dir.
    fn asides(env: &Env) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&env.state)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name().unwrap().to_str().unwrap().starts_with("journal.redb.corrupt-")
            })
            .collect();
        v.sort();
        v
    }

    // ---------------------------------------------------------------- damage

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Damage {
        /// Truncated to a random length below its size.
        Truncate,
        /// One random 4 KiB page (of those the file has) overwritten with random bytes.
        OverwritePage,
        Delete,
        /// Replaced by an empty file.
        Empty,
        /// Every byte set to zero, length kept.
        Zeroed,
    }

    impl Damage {
        /// Whether redb could possibly still open the file: a cut past everything it needs,
        /// or a page it does not use. Deleted, empty and zeroed journals are always lost.
        fn may_leave_it_readable(self) -> bool {
            matches!(self, Damage::Truncate | Damage::OverwritePage)
        }
    }

    const PAGE: u64 = 4096;

    /// Damages the journal; returns a description (with the random choices) and the damaged
    /// bytes (`None` when deleted).
    fn damage_journal(env: &Env, d: Damage, rng: &mut Rng) -> (String, Option<Vec<u8>>) {
        let path = journal(env);
        let mut bytes = std::fs::read(&path).unwrap();
        let len = bytes.len() as u64;
        assert!(len > PAGE, "the journal is only {len} bytes");
        let what = match d {
            Damage::Truncate => {
                let to = rng.below(len);
                bytes.truncate(to as usize);
                format!("truncated from {len} to {to} bytes")
            }
            Damage::OverwritePage => {
                let pages = len.div_ceil(PAGE);
                let page = rng.below(pages);
                let start = (page * PAGE) as usize;
                let end = (start + PAGE as usize).min(bytes.len());
                let noise = rng.bytes(end - start);
                bytes[start..end].copy_from_slice(&noise);
                format!("page {page} of {pages} ({start}..{end}) overwritten with random bytes")
            }
            Damage::Delete => {
                std::fs::remove_file(&path).unwrap();
                return (format!("deleted ({len} bytes)"), None);
            }
            Damage::Empty => {
                bytes.clear();
                format!("replaced by an empty file (was {len} bytes)")
            }
            Damage::Zeroed => {
                bytes.fill(0);
                format!("all {len} bytes zeroed")
            }
        };
        std::fs::write(&path, &bytes).unwrap();
        (what, Some(bytes))
    }

    /// Damages the plan copy: one random byte flipped, or truncated to a random length.
    fn damage_plan_copy(env: &Env, rng: &mut Rng) -> String {
        let path = plan_copy(env);
        let mut bytes = std::fs::read(&path).unwrap();
        let len = bytes.len() as u64;
        if rng.below(2) == 0 {
            let at = rng.below(len) as usize;
            bytes[at] ^= 1 << rng.below(8);
            std::fs::write(&path, &bytes).unwrap();
            format!("plan copy: one bit flipped at byte {at} of {len}")
        } else {
            let to = rng.below(len);
            bytes.truncate(to as usize);
            std::fs::write(&path, &bytes).unwrap();
            format!("plan copy: truncated from {len} to {to} bytes")
        }
    }

    // ---------------------------------------------------------------- checks

    fn status(env: &Env, ctx: &str) -> Value {
        let r = env.run(&["status", "--json"]);
        assert_eq!(r.code, Some(0), "{ctx}: status must work:\n{}", r.describe());
        r.json()
    }

    /// What every case must end with, once `recover` has done its work: `status` works with
    /// nothing in flight, a second `recover` finds nothing and changes nothing, no `.tope-`
    /// leftovers anywhere, the side the tree is on matches `current`, and a fresh install of
    /// the package with `--force` succeeds and leaves the tree all new.
    fn after_recovery(env: &Env, sides: &Sides, side: Side, ctx: &str) {
        let s = status(env, ctx);
        assert!(s["in_flight"].is_null(), "{ctx}: still in flight after recover: {s}");
        let want_version = match side {
            Side::Old => Value::Null,
            Side::New => json!(V2),
        };
        assert_eq!(
            s["current"]["version"], want_version,
            "{ctx}: the tree is all {side:?} but status says {s}"
        );
        let snapshot = tree(&env.root);
        let again = env.run(&["recover", "--json"]);
        assert_eq!(
            again.code,
            Some(0),
            "{ctx}: a second recover must have nothing to do:\n{}",
            again.describe()
        );
        assert_eq!(
            again.json()["result"],
            "nothing",
            "{ctx}: a second recover did something:\n{}",
            again.describe()
        );
        assert_eq!(tree(&env.root), snapshot, "{ctx}: a second recover changed the tree");
        assert!(
            leftovers(&env.root).is_empty(),
            "{ctx}: temporary files left under the root: {:?}",
            leftovers(&env.root)
        );
        assert!(
            leftovers(&env.state).is_empty(),
            "{ctx}: temporary files left in the state dir: {:?}",
            leftovers(&env.state)
        );
        assert!(!plan_copy(env).exists(), "{ctx}: the plan copy outlived its transaction");

        let pkg = package(env, false);
        let r = env.run(&["install", p(&pkg), "--force", "--json"]);
        assert_eq!(
            r.code,
            Some(0),
            "{ctx}: a fresh install with --force must succeed:\n{}",
            r.describe()
        );
        assert_eq!(
            side_of(env, sides, ctx),
            Side::New,
            "{ctx}: the fresh install did not leave the tree all new"
        );
        assert_eq!(status(env, ctx)["current"]["version"], V2, "{ctx}: after the fresh install");
        assert!(
            leftovers(&env.root).is_empty(),
            "{ctx}: the fresh install left temporary files: {:?}",
            leftovers(&env.root)
        );
        let v = env.run(&["verify"]);
        assert_eq!(v.code, Some(0), "{ctx}: verify after the fresh install:\n{}", v.describe());
    }

    /// How one case ended, for the summary table.
    struct Seen {
        label: String,
        damage: String,
        detected: bool,
        exit: Option<i32>,
        side: Side,
    }

    /// `recover` after the journal was damaged: either it reports `JOURNAL_CORRUPT` (exit 4,
    /// rolled back from the plan copy, all old, the damaged file kept aside), or redb still
    /// opened the file and recovery was normal (all old or all new).
    fn recover_after_damage(
        env: &Env,
        sides: &Sides,
        d: Damage,
        damaged: Option<&[u8]>,
        ctx: &str,
    ) -> (bool, Option<i32>, Side) {
        let r = env.run(&["recover", "--json"]);
        let j = r.json();
        let detected = j["journal_lost"]["code"] == "JOURNAL_CORRUPT";
        let aside = asides(env);
        if detected {
            assert_eq!(
                r.code,
                Some(4),
                "{ctx}: JOURNAL_CORRUPT means rolled back from the plan copy (exit 4):\n{}",
                r.describe()
            );
            assert_eq!(j["result"], "finished", "{ctx}:\n{}", r.describe());
            assert_eq!(j["report"]["outcome"], "rolled_back", "{ctx}:\n{}", r.describe());
            assert_eq!(
                j["report"]["error"]["code"],
                "JOURNAL_CORRUPT",
                "{ctx}: the rollback names its cause:\n{}",
                r.describe()
            );
            let side = side_of(env, sides, ctx);
            assert_eq!(
                side,
                Side::Old,
                "{ctx}: rolled back from the plan copy, so every target must be old:\n{}",
                r.describe()
            );
            match damaged {
                None => assert!(
                    aside.is_empty(),
                    "{ctx}: nothing to move aside for a deleted journal: {aside:?}"
                ),
                Some(bytes) => {
                    assert_eq!(
                        aside.len(),
                        1,
                        "{ctx}: the damaged journal must be moved aside once: {aside:?}"
                    );
                    assert!(
                        std::fs::read(&aside[0]).unwrap() == bytes,
                        "{ctx}: the journal moved aside is not the damaged file as it was"
                    );
                }
            }
            let h = env.run(&["history", "--json"]);
            assert_eq!(h.code, Some(0), "{ctx}: history on the fresh journal:\n{}", h.describe());
            let last = &h.json()[0];
            assert_eq!(
                last["phase"], "RolledBack",
                "{ctx}: the fresh journal records the rolled-back transaction: {last}"
            );
            (true, r.code, side)
        } else {
            assert!(
                d.may_leave_it_readable(),
                "{ctx}: a journal {d:?} cannot be readable, \
                 yet recover did not report JOURNAL_CORRUPT:\n{}",
                r.describe()
            );
            assert!(
                aside.is_empty(),
                "{ctx}: a journal was moved aside but JOURNAL_CORRUPT was not reported: \
                 {aside:?}\n{}",
                r.describe()
            );
            assert!(
                matches!(r.code, Some(0 | 4)),
                "{ctx}: normal recovery must exit 0 or 4:\n{}",
                r.describe()
            );
            let side = side_of(env, sides, ctx);
            if r.code == Some(4) {
                assert_eq!(
                    side,
                    Side::Old,
                    "{ctx}: recover reported a rollback but the tree is all new:\n{}",
                    r.describe()
                );
            }
            (false, r.code, side)
        }
    }

    /// Every crash point × each damage in `damages`; failures are collected so that every case
    /// runs, then reported together with the table of outcomes.
    fn matrix(test: &str, salt: u64, damages: &[Damage]) -> Vec<Seen> {
        let started = Instant::now();
        let (seed, mut rng) = rng(test, salt);
        let sides = sides();
        let mut seen = Vec::new();
        let mut failures = Vec::new();
        for arm in arms() {
            for &d in damages {
                let label = format!("{arm}, journal {d:?}");
                let ctx = format!("{label} (seed {seed:#x})");
                let result = catch_unwind(AssertUnwindSafe(|| {
                    let env = crashed(arm, &ctx);
                    let (what, damaged) = damage_journal(&env, d, &mut rng);
                    let ctx = format!("{ctx}: journal {what}");
                    let (detected, exit, side) =
                        recover_after_damage(&env, &sides, d, damaged.as_deref(), &ctx);
                    after_recovery(&env, &sides, side, &ctx);
                    Seen { label: label.clone(), damage: what, detected, exit, side }
                }));
                match result {
                    Ok(s) => {
                        println!(
                            "  ok   {:<44} {:<58} {:<16} exit {:?}, all {:?}",
                            s.label,
                            s.damage,
                            if s.detected { "JOURNAL_CORRUPT" } else { "still readable" },
                            s.exit,
                            s.side
                        );
                        seen.push(s);
                    }
                    Err(e) => {
                        let msg = e
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| {
                                e.downcast_ref::<&str>().map(std::string::ToString::to_string)
                            })
                            .unwrap_or_else(|| "non-string panic".into());
                        println!("  FAIL {label}");
                        failures.push(msg);
                    }
                }
            }
        }
        let detected = seen.iter().filter(|s| s.detected).count();
        println!(
            "{test}: {} cases in {:.1} s, {detected} reported JOURNAL_CORRUPT, \
             {} failed (seed {seed:#x})",
            seen.len() + failures.len(),
            started.elapsed().as_secs_f64(),
            failures.len()
        );
        assert!(
            failures.is_empty(),
            "{} case(s) failed (seed {seed:#x}):\n\n{}",
            failures.len(),
            failures.join("\n\n")
        );
        seen
    }

    // ---------------------------------------------------------------- tests

    #[test]
    fn a_journal_deleted_emptied_or_zeroed_mid_transaction_is_reported_corrupt_and_rolled_back_from_the_plan_copy()
     {
        // `recover_after_damage` refuses a missed detection for these three.
        matrix("deleted/emptied/zeroed", 1, &[Damage::Delete, Damage::Empty, Damage::Zeroed]);
    }

    #[test]
    fn a_journal_truncated_at_a_random_length_mid_transaction_is_rolled_back_from_the_plan_copy_unless_redb_still_reads_it()
     {
        let seen = matrix("truncated", 2, &[Damage::Truncate, Damage::Truncate]);
        assert!(
            seen.iter().any(|s| s.detected),
            "no truncation was detected at all: the test exercised nothing"
        );
    }

    #[test]
    fn a_journal_with_a_random_page_overwritten_mid_transaction_is_rolled_back_from_the_plan_copy_unless_redb_still_reads_it()
     {
        let seen = matrix("page overwritten", 3, &[Damage::OverwritePage, Damage::OverwritePage]);
        assert!(
            seen.iter().any(|s| s.detected),
            "no overwritten page was detected at all: the test exercised nothing"
        );
    }

    /// Journal and plan copy both damaged: nothing records what to undo, so `recover` must stop
    /// for an operator (exit 5, `ROLLBACK_FAILED`) without touching the targets — and keep
    /// saying so on the next `recover` rather than forget the half-done transaction.
    #[test]
    fn a_damaged_plan_copy_together_with_a_lost_journal_needs_an_operator_and_recover_touches_nothing()
     {
        let (seed, mut rng) = rng("plan copy and journal", 4);
        let mut failures = Vec::new();
        let cases = [
            (Arm::new("enter.Planned", 1, false), Damage::Delete),
            (Arm::new("stage.file", 2, false), Damage::Zeroed),
            (Arm::new("swap.file", 2, false), Damage::Delete),
            (Arm::new("swap.file", 2, false), Damage::Empty),
            (Arm::new("enter.Verified", 1, false), Damage::Zeroed),
            (Arm::new("rollback.file", 3, true), Damage::Delete),
        ];
        for (arm, d) in cases {
            let label = format!("{arm}, journal {d:?}");
            let result = catch_unwind(AssertUnwindSafe(|| {
                let env = crashed(arm, &label);
                let (jwhat, _) = damage_journal(&env, d, &mut rng);
                let pwhat = damage_plan_copy(&env, &mut rng);
                let ctx = format!("{label} (seed {seed:#x}): journal {jwhat}, {pwhat}");
                let before = tree(&env.root);
                let copy = std::fs::read(plan_copy(&env)).unwrap();
                let mut seen_by_status = String::from("(not yet run)");
                for attempt in ["first", "second"] {
                    let r = env.run(&["recover"]);
                    let why = format!(
                        "{ctx}: {attempt} recover must stop for an operator \
                         (exit 5, ROLLBACK_FAILED) and touch nothing; \
                         status after the previous recover said: {seen_by_status}; \
                         {} temporary files under the root\n{}",
                        leftovers(&env.root).len(),
                        r.describe()
                    );
                    assert_eq!(r.code, Some(5), "{why}");
                    assert_eq!(r.error_code().as_deref(), Some("ROLLBACK_FAILED"), "{why}");
                    assert_eq!(
                        tree(&env.root),
                        before,
                        "{ctx}: {attempt} recover changed the targets without a plan"
                    );
                    assert_eq!(
                        std::fs::read(plan_copy(&env)).ok().as_deref(),
                        Some(copy.as_slice()),
                        "{ctx}: {attempt} recover removed or changed the damaged plan copy \
                         (the operator's evidence)"
                    );
                    let st = env.run(&["status", "--json"]);
                    seen_by_status = match st.code {
                        Some(0) => format!("in_flight = {}", st.json()["in_flight"]),
                        _ => format!("exit {:?} {:?}", st.code, st.error_code()),
                    };
                }
                let st = env.run(&["status"]);
                assert!(
                    matches!(st.code, Some(0 | 1 | 5)),
                    "{ctx}: status must not crash:\n{}",
                    st.describe()
                );
                println!(
                    "  ok   {label}: {jwhat}; {pwhat}; recover exit 5 twice; status exit {:?}",
                    st.code
                );
            }));
            if let Err(e) = result {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| "non-string panic".into());
                println!("  FAIL {label}");
                failures.push(msg);
            }
        }
        assert!(
            failures.is_empty(),
            "{} case(s) failed (seed {seed:#x}):\n\n{}",
            failures.len(),
            failures.join("\n\n")
        );
    }

    /// The plan copy damaged but the journal sound: the journal holds the plan, so recovery is
    /// the normal one (resume forward by default; the failing install rolls back).
    #[test]
    fn a_damaged_plan_copy_with_a_sound_journal_does_not_stop_normal_recovery() {
        let (seed, mut rng) = rng("plan copy only", 5);
        let sides = sides();
        let mut failures = Vec::new();
        for arm in arms() {
            let label = arm.to_string();
            let result = catch_unwind(AssertUnwindSafe(|| {
                let env = crashed(arm, &label);
                let pwhat = damage_plan_copy(&env, &mut rng);
                let ctx = format!("{label} (seed {seed:#x}): {pwhat}");
                let r = env.run(&["recover", "--json"]);
                assert!(
                    matches!(r.code, Some(0 | 4)),
                    "{ctx}: recover must succeed:\n{}",
                    r.describe()
                );
                let j = r.json();
                assert!(
                    j["journal_lost"].is_null(),
                    "{ctx}: the journal is sound, yet recover reported it lost:\n{}",
                    r.describe()
                );
                assert!(asides(&env).is_empty(), "{ctx}: a sound journal was moved aside");
                let side = side_of(&env, &sides, &ctx);
                // Resume is the default policy: past `Planned` an install with every input
                // present goes forward; the failing install can only roll back.
                let want = if arm.failing { Side::Old } else { Side::New };
                assert_eq!(
                    side,
                    want,
                    "{ctx}: recover left the tree all {side:?}:\n{}",
                    r.describe()
                );
                after_recovery(&env, &sides, side, &ctx);
                println!("  ok   {label}: {pwhat}; recover exit {:?}, all {side:?}", r.code);
            }));
            if let Err(e) = result {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| "non-string panic".into());
                println!("  FAIL {label}");
                failures.push(msg);
            }
        }
        assert!(
            failures.is_empty(),
            "{} case(s) failed (seed {seed:#x}):\n\n{}",
            failures.len(),
            failures.join("\n\n")
        );
    }
}
