//! A device's whole life (SPEC §3 "Committed", README "What a device holds"): nobody runs
//! `gc`, and still the state stays within its stated bound through hundreds of updates and
//! rollbacks, every kept generation and the factory baseline restore byte for byte, and a
//! cut inside the automatic collection loses no blob that is still needed.
//!
//! Expected contents are computed by the test from the version alone (`content`), never read
//! back from the engine.
//!
//! Run with `cargo test --features failpoints --test it longlife`.

use crate::support::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The application's files: a binary and a directory of pages.
const FILES: &[&str] =
    &["app/bin/app", "app/www/index.html", "app/www/a.html", "app/www/b.html", "app/www/c.html"];

/// What `file` holds in `version` ("factory" for the baseline): distinct per version and file,
/// a few KiB, deterministic.
fn content(version: &str, file: &str) -> Vec<u8> {
    let seed = blake3::hash(format!("{version}/{file}").as_bytes());
    let len = 2048 + (seed.as_bytes()[0] as usize) * 16;
    let mut out = format!("{file} {version}\n").into_bytes();
    while out.len() < len {
        out.extend_from_slice(seed.as_bytes());
    }
    out.truncate(len);
    out
}

fn tree_of(version: &str) -> BTreeMap<String, Vec<u8>> {
    FILES.iter().map(|f| (f.to_string(), content(version, f))).collect()
}

fn put_factory(env: &Env) {
    for (f, c) in tree_of("factory") {
        env.put(&f, &c, 0o644);
    }
}

/// One package: a single-file module for the binary, a directory module for the pages.
fn package(env: &Env, version: &str) -> std::path::PathBuf {
    let files = tree_of(version);
    let entries: Vec<(String, &[u8])> =
        files.iter().map(|(f, c)| (format!("files/{f}"), c.as_slice())).collect();
    let m = serde_json::json!({
        "version": version,
        "modules": [
            {"name": "bin", "src": "files/app/bin/app", "dst": env.dst("app/bin/app")},
            {"name": "www", "src": "files/app/www/", "dst": env.dst("app/www")},
        ],
    });
    let path = env.pkg_path(&format!("app-{version}.zip"));
    let refs: Vec<(&str, &[u8])> = entries.iter().map(|(n, c)| (n.as_str(), *c)).collect();
    write_package(&path, &m.to_string(), &refs);
    path
}

/// The live files, compared by content (the tree snapshot of `support` also checks modes).
fn assert_holds(env: &Env, version: &str, ctx: &str) {
    for (f, want) in tree_of(version) {
        let have = env.read(&f).unwrap_or_else(|| panic!("{ctx}: {f} is missing"));
        assert!(have == want, "{ctx}: {f} does not hold {version}'s content");
    }
}

/// Apparent bytes of every file under `dir`.
fn bytes_under(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

fn blobs(env: &Env) -> BTreeSet<String> {
    std::fs::read_dir(env.state.join("backups"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

fn hashes_of(version: &str) -> BTreeSet<String> {
    tree_of(version).values().map(|c| blake3_hex(c)).collect()
}

fn size_of(version: &str) -> u64 {
    tree_of(version).values().map(|c| c.len() as u64).sum()
}

/// The journal's ceiling for this test's device (README "What a device holds"): 200
/// transaction records, K generations, the factory and the known files of 5 paths, no
/// reports (the CLI sends none): far below this.
const JOURNAL_CEILING: u64 = 2 << 20;

#[test]
fn hundreds_of_updates_and_rollbacks_stay_within_the_bound_and_every_kept_generation_restores() {
    const UPDATES: usize = 240;
    const K: u64 = 3;
    let env = Env::with_config(&format!("keep_generations = {K}"));
    put_factory(&env);
    let generation = (0..UPDATES).map(|i| size_of(&format!("1.0.{i}"))).max().unwrap();
    let bound = size_of("factory") + K * generation;
    let mut installed: Vec<String> = Vec::new();
    let mut worst = (0u64, 0u64);
    for i in 0..UPDATES {
        let v = format!("1.0.{i}");
        let pkg = package(&env, &v);
        env.ok(&["install", pkg.to_str().unwrap()]);
        std::fs::remove_file(&pkg).unwrap();
        installed.push(v);
        if i % 10 == 9 {
            env.ok(&["rollback"]);
            installed.pop();
        }
        let current = installed.last().cloned().unwrap_or_else(|| "factory".into());
        assert_holds(&env, &current, &format!("after update {i}"));
        // At rest, the store holds at most the factory baseline and K generations' content.
        let store = bytes_under(&env.state.join("backups"));
        let journal = std::fs::metadata(env.state.join("journal.redb")).unwrap().len();
        assert!(
            store <= bound,
            "after update {i}: backups {store} B > factory + {K} generations = {bound} B"
        );
        assert!(
            journal <= JOURNAL_CEILING,
            "after update {i}: journal.redb {journal} B > {JOURNAL_CEILING} B"
        );
        worst = (worst.0.max(store), worst.1.max(journal));
    }
    eprintln!(
        "{UPDATES} updates: backups at most {} B (bound {bound} B), journal at most {} B",
        worst.0, worst.1
    );
    let total = bytes_under(&env.state);
    assert!(total <= bound + JOURNAL_CEILING, "state dir {total} B");

    // The store holds exactly what the kept generations and the factory need.
    let st: Value = env.run(&["status", "--json"]).json();
    let kept: Vec<String> = st["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["version"].as_str().unwrap().to_string())
        .collect();
    assert!(!kept.is_empty() && kept.len() as u64 <= K, "{st}");
    let mut needed: BTreeSet<String> = hashes_of("factory");
    for v in &kept {
        needed.extend(hashes_of(v));
    }
    let have = blobs(&env);
    assert!(
        have.is_subset(&needed),
        "blobs nothing needs: {:?}",
        have.difference(&needed).collect::<Vec<_>>()
    );
    assert_eq!(st["backups"]["blobs"], serde_json::json!(have.len()), "{st}");
    // Some transactions freed what they released.
    let h = env.run(&["history", "--json", "--limit", "50"]).json();
    assert!(h.as_array().unwrap().iter().any(|t| t["freed_blobs"].as_u64().unwrap() > 0), "{h}");

    // Every kept generation, newest first, then the factory baseline, restore exactly.
    for v in kept.iter().rev().skip(1) {
        env.ok(&["rollback", "--to", v]);
        assert_holds(&env, v, &format!("rollback --to {v}"));
    }
    env.ok(&["rollback", "--to", "factory"]);
    assert_holds(&env, "factory", "rollback --to factory");
    assert!(leftovers(&env.root).is_empty());
}

/// Without the crash points these tests do not exist: fail, and say so, rather than pass
/// silently with fewer tests.
#[cfg(not(feature = "failpoints"))]
#[test]
fn collection_kill_tests_need_the_failpoints_feature() {
    panic!(
        "the kills inside the automatic collection need the named crash points compiled in: \
         run `cargo test --features failpoints --test it longlife`"
    );
}

/// SIGKILL inside the collection that follows a commit (before the first unlink, and after
/// one), then `recover`: nothing needed is lost, nothing unneeded is left, and every kept
/// generation and the factory baseline restore exactly.
#[cfg(feature = "failpoints")]
#[test]
fn a_kill_inside_the_collection_loses_no_needed_blob() {
    use tope_updater::failpoint::GC_CRASH_POINTS;
    let arms: Vec<(&str, u32)> =
        GC_CRASH_POINTS.iter().map(|p| (*p, 1)).chain([("gc.unlinked_one", 3)]).collect();
    for (point, hit) in arms {
        let env = Env::with_config("keep_generations = 2");
        put_factory(&env);
        for v in ["1.0.0", "1.0.1"] {
            env.ok(&["install", package(&env, v).to_str().unwrap()]);
        }
        // Installing 1.0.2 prunes 1.0.0: its content, backed up when 1.0.1 replaced it, goes.
        assert!(hashes_of("1.0.0").is_subset(&blobs(&env)));
        let pkg = package(&env, "1.0.2");
        let r: Run = env
            .command(&["install", pkg.to_str().unwrap()])
            .env("FAILPOINTS", kill_at(point, hit))
            .output()
            .unwrap()
            .into();
        assert_eq!(r.signal, Some(9), "{point} (hit {hit}) never reached: {}", r.describe());
        assert_holds(&env, "1.0.2", &format!("killed at {point}: the install is committed"));

        env.ok(&["recover"]);
        let mut needed = hashes_of("factory");
        needed.extend(hashes_of("1.0.1"));
        assert_eq!(
            blobs(&env),
            needed,
            "after a kill at {point} (hit {hit}) and recover: exactly what is needed"
        );
        let last = &env.run(&["history", "--json"]).json()[0];
        assert_eq!(last["freed_blobs"], serde_json::json!(hashes_of("1.0.0").len()), "{last}");

        env.ok(&["rollback"]);
        assert_holds(&env, "1.0.1", &format!("{point}: rollback to the kept 1.0.1"));
        env.ok(&["rollback", "--to", "factory"]);
        assert_holds(&env, "factory", &format!("{point}: rollback to factory"));
    }
}
