//! Transactions (SPEC §3): installs and rollbacks restore exact trees (content, modes,
//! created directories), generations and `gc`, journal commits independent of the file count,
//! `verify`, the state lock, remembered failed packages, surviving the loss of the journal,
//! modes and ownership, and `config`.

use crate::support::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

// ---- building packages ----

/// One module of a test package.
enum M<'a> {
    /// name, destination relative to the root, content, manifest `mode`.
    File(&'a str, &'a str, &'a [u8], Option<&'a str>),
    /// name, destination directory relative to the root, (relative path, content) files.
    Dir(&'a str, &'a str, &'a [(&'a str, &'a [u8])]),
}

/// Writes a package carrying blake3 hashes for every file (as `pack` would) and returns its path.
fn build(env: &Env, file: &str, version: &str, modules: &[M]) -> PathBuf {
    let mut mods = Vec::new();
    let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
    for m in modules {
        match m {
            M::File(name, dst, content, mode) => {
                let src = format!("modules/{name}");
                let mut v = json!({
                    "name": name,
                    "src": src,
                    "dst": env.dst(dst),
                    "blake3": blake3_hex(content),
                });
                if let Some(mode) = mode {
                    v["mode"] = json!(mode);
                }
                mods.push(v);
                entries.push((src, content.to_vec()));
            }
            M::Dir(name, dst, files) => {
                let src = format!("trees/{name}/");
                let hashes: BTreeMap<&str, String> =
                    files.iter().map(|(rel, c)| (*rel, blake3_hex(c))).collect();
                mods.push(json!({"name": name, "src": src, "dst": env.dst(dst), "files": hashes}));
                entries.extend(files.iter().map(|(rel, c)| (format!("{src}{rel}"), c.to_vec())));
            }
        }
    }
    let manifest = json!({"version": version, "modules": mods}).to_string();
    let files: Vec<(&str, &[u8])> =
        entries.iter().map(|(n, c)| (n.as_str(), c.as_slice())).collect();
    let path = env.pkg_path(file);
    write_package(&path, &manifest, &files);
    path
}

/// The device before any install: distinctive modes, a directory with its own mode, and a
/// file no package ever touches.
fn seed_factory(env: &Env) {
    env.put("bin/app", b"factory app\n", 0o751);
    env.put("etc/app.conf", b"factory conf\n", 0o640);
    env.put("etc/secret", b"factory secret\n", 0o600);
    env.put("share/readme", b"never touched\n", 0o644);
    std::fs::set_permissions(env.path("etc"), std::fs::Permissions::from_mode(0o750)).unwrap();
}

/// v1: a new mode for an old file, an old file without mode, a directory module into new
/// nested directories, a new file four directories deep.
fn v1(env: &Env) -> PathBuf {
    build(
        env,
        "v1.zip",
        "1.0.0",
        &[
            M::File("app", "bin/app", b"app v1\n", Some("0755")),
            M::File("conf", "etc/app.conf", b"conf v1\n", None),
            M::Dir("lib", "lib/tope", &[("a.so", b"a v1\n"), ("sub/b.so", b"b v1\n")]),
            M::File("tool", "opt/x/y/z/tool", b"tool v1\n", Some("0700")),
        ],
    )
}

/// v2: overlaps v1 (app, lib), touches a factory file for the first time (secret), adds
/// files in new directories (lib/tope/sub/deep, var/data).
fn v2(env: &Env) -> PathBuf {
    build(
        env,
        "v2.zip",
        "2.0.0",
        &[
            M::File("app", "bin/app", b"app v2\n", Some("0700")),
            M::File("secret", "etc/secret", b"secret v2\n", Some("0644")),
            M::Dir(
                "lib",
                "lib/tope",
                &[
                    ("a.so", b"a v2\n"),
                    ("sub/b.so", b"b v1\n"),
                    ("sub/c.so", b"c v2\n"),
                    ("sub/deep/d.so", b"d v2\n"),
                ],
            ),
            M::File("data", "var/data/v2only", b"data v2\n", None),
        ],
    )
}

/// v3: app without mode (keeps v2's 0700), conf with a mode, lib grows a new subdirectory,
/// tool changes, a new file in new nested directories.
fn v3(env: &Env) -> PathBuf {
    build(
        env,
        "v3.zip",
        "3.0.0",
        &[
            M::File("app", "bin/app", b"app v3\n", None),
            M::File("conf", "etc/app.conf", b"conf v3\n", Some("0600")),
            M::Dir("lib", "lib/tope", &[("a.so", b"a v3\n"), ("v3/e.so", b"e v3\n")]),
            M::File("tool", "opt/x/y/z/tool", b"tool v3\n", Some("0750")),
            M::File("extra", "srv/a/b/c/v3file", b"v3 only\n", Some("0640")),
        ],
    )
}

/// Contents that only v3 ever deployed.
const V3_ONLY: &[&[u8]] =
    &[b"app v3\n", b"conf v3\n", b"a v3\n", b"e v3\n", b"tool v3\n", b"v3 only\n"];

fn v4(env: &Env) -> PathBuf {
    build(
        env,
        "v4.zip",
        "4.0.0",
        &[
            M::File("app", "bin/app", b"app v4\n", Some("0705")),
            M::File("four", "n4/deep/file", b"four\n", None),
        ],
    )
}

// ---- small helpers ----

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn mode_of(env: &Env, rel: &str) -> u32 {
    std::fs::symlink_metadata(env.path(rel)).unwrap().permissions().mode() & 0o7777
}

fn status(env: &Env) -> Value {
    let r = env.run(&["status", "--json"]);
    assert_eq!(r.code, Some(0), "status failed:\n{}", r.describe());
    r.json()
}

fn current_version(env: &Env) -> Option<String> {
    status(env)["current"]["version"].as_str().map(str::to_string)
}

fn history(env: &Env) -> Vec<Value> {
    let r = env.run(&["history", "--json", "--limit", "1000"]);
    assert_eq!(r.code, Some(0), "history failed:\n{}", r.describe());
    r.json().as_array().unwrap().clone()
}

fn journal_dump(env: &Env) -> Value {
    let r = env.run(&["journal"]);
    assert_eq!(r.code, Some(0), "journal failed:\n{}", r.describe());
    r.json()
}

fn blobs(env: &Env) -> BTreeSet<String> {
    std::fs::read_dir(env.state.join("backups"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

/// Asserts the tree under the root equals `want`, naming the paths that differ.
fn assert_tree(env: &Env, want: &BTreeMap<String, String>, what: &str) {
    let have = tree(&env.root);
    if &have != want {
        let keys: BTreeSet<&String> = have.keys().chain(want.keys()).collect();
        let diff: Vec<String> = keys
            .into_iter()
            .filter(|k| have.get(*k) != want.get(*k))
            .map(|k| format!("  {k}: have {:?}, want {:?}", have.get(k), want.get(k)))
            .collect();
        panic!("{what}: the tree differs:\n{}", diff.join("\n"));
    }
}

/// A transaction that ended rolled back, from its `--json` report.
fn assert_tx_failed(r: &Run, exit: i32, code: &str) {
    assert_eq!(r.code, Some(exit), "expected exit {exit}:\n{}", r.describe());
    let j = r.json();
    assert_eq!(
        (j["outcome"].as_str(), j["error"]["code"].as_str()),
        (Some("rolled_back"), Some(code)),
        "{}",
        r.describe()
    );
}

fn assert_code(r: &Run, exit: i32, code: &str) {
    assert_eq!(r.code, Some(exit), "expected exit {exit}:\n{}", r.describe());
    assert_eq!(r.error_code().as_deref(), Some(code), "expected {code}:\n{}", r.describe());
}

// ---- 1. exact rollbacks ----

#[test]
fn each_rollback_restores_the_previous_generation_exactly_down_to_the_factory_tree() {
    let env = Env::new();
    seed_factory(&env);
    let (pkg1, pkg2, pkg3) = (v1(&env), v2(&env), v3(&env));
    let t0 = tree(&env.root);

    env.ok(&["install", p(&pkg1)]);
    let t1 = tree(&env.root);
    assert_eq!(mode_of(&env, "bin/app"), 0o755, "v1's manifest mode replaces the factory 0751");
    assert_eq!(mode_of(&env, "etc/app.conf"), 0o640, "no mode in v1: the old file keeps its mode");
    assert_eq!(env.read("lib/tope/sub/b.so").unwrap(), b"b v1\n");
    assert_eq!(env.read("opt/x/y/z/tool").unwrap(), b"tool v1\n");

    env.ok(&["install", p(&pkg2)]);
    let t2 = tree(&env.root);
    assert_eq!(mode_of(&env, "etc/secret"), 0o644);
    assert_eq!(env.read("lib/tope/sub/deep/d.so").unwrap(), b"d v2\n");

    env.ok(&["install", p(&pkg3)]);
    let t3 = tree(&env.root);
    assert_eq!(mode_of(&env, "bin/app"), 0o700, "no mode in v3: keeps v2's mode");
    assert_eq!(mode_of(&env, "etc/app.conf"), 0o600);
    assert_eq!(env.read("srv/a/b/c/v3file").unwrap(), b"v3 only\n");
    assert!(t0 != t1 && t1 != t2 && t2 != t3, "every version changes the tree");
    assert_eq!(current_version(&env).as_deref(), Some("3.0.0"));

    env.ok(&["rollback"]);
    assert_tree(&env, &t2, "rollback from v3");
    assert_eq!(current_version(&env).as_deref(), Some("2.0.0"));
    assert!(!env.path("srv").exists(), "directories v3 created are removed");
    assert!(!env.path("lib/tope/v3").exists());
    assert_eq!(
        (env.read("etc/app.conf").unwrap(), mode_of(&env, "etc/app.conf")),
        (b"conf v1\n".to_vec(), 0o640)
    );

    env.ok(&["rollback"]);
    assert_tree(&env, &t1, "rollback from v2");
    assert_eq!(current_version(&env).as_deref(), Some("1.0.0"));
    assert!(!env.path("var").exists() && !env.path("lib/tope/sub/deep").exists());
    assert!(!env.path("lib/tope/sub/c.so").exists(), "a file v2 added is deleted");
    assert_eq!(
        (env.read("etc/secret").unwrap(), mode_of(&env, "etc/secret")),
        (b"factory secret\n".to_vec(), 0o600)
    );

    env.ok(&["rollback"]);
    assert_tree(&env, &t0, "rollback from v1");
    assert_eq!(current_version(&env), None);

    let r = env.run(&["rollback"]);
    assert_code(&r, 1, "NOTHING_TO_ROLL_BACK");
    assert_tree(&env, &t0, "a refused rollback");
    assert!(leftovers(&env.root).is_empty(), "{:?}", leftovers(&env.root));
}

#[test]
fn rollback_to_factory_from_v3_restores_the_pre_install_tree_and_modes_exactly() {
    let env = Env::new();
    seed_factory(&env);
    let t0 = tree(&env.root);
    for pkg in [v1(&env), v2(&env), v3(&env)] {
        env.ok(&["install", p(&pkg)]);
    }
    assert_eq!(mode_of(&env, "etc/secret"), 0o644);

    let r = env.run(&["rollback", "--to", "factory", "--json"]);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    assert_eq!(r.json()["outcome"], "committed");
    assert_tree(&env, &t0, "rollback --to factory");
    for (rel, content, mode) in [
        ("bin/app", &b"factory app\n"[..], 0o751),
        ("etc/app.conf", b"factory conf\n", 0o640),
        ("etc/secret", b"factory secret\n", 0o600),
        ("share/readme", b"never touched\n", 0o644),
    ] {
        assert_eq!((env.read(rel).unwrap(), mode_of(&env, rel)), (content.to_vec(), mode), "{rel}");
    }
    assert_eq!(mode_of(&env, "etc"), 0o750, "a pre-existing directory keeps its mode");
    for created in ["lib", "opt", "var", "srv"] {
        assert!(
            !env.path(created).exists(),
            "{created} was created by the installs and must be gone"
        );
    }
    let s = status(&env);
    assert!(s["current"].is_null(), "{s}");
    assert_eq!(s["generations"], json!([]), "{s}");
    assert_eq!(env.run(&["verify"]).code, Some(0), "the factory baseline verifies");
    assert!(leftovers(&env.root).is_empty());

    // The factory baseline is still known: a new install and a rollback return here again.
    env.ok(&["install", p(&v2(&env))]);
    env.ok(&["rollback", "--to", "factory"]);
    assert_tree(&env, &t0, "second rollback --to factory");
}

// ---- 2. rollback to a named version; nothing to roll back ----

#[test]
fn rollback_to_a_named_version_restores_that_generation_and_drops_the_newer_ones() {
    let env = Env::new();
    seed_factory(&env);
    env.ok(&["install", p(&v1(&env))]);
    let t1 = tree(&env.root);
    env.ok(&["install", p(&v2(&env))]);
    env.ok(&["install", p(&v3(&env))]);

    env.ok(&["rollback", "--to", "1.0.0"]);
    assert_tree(&env, &t1, "rollback --to 1.0.0");
    let s = status(&env);
    assert_eq!(s["current"]["version"], "1.0.0", "{s}");
    let kept: Vec<&str> = s["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["version"].as_str().unwrap())
        .collect();
    assert_eq!(kept, ["1.0.0"], "generations newer than the target are dropped");

    for (to, why) in [
        ("1.0.0", "the current version"),
        ("2.0.0", "a dropped generation"),
        ("9.9.9", "a never installed version"),
    ] {
        let r = env.run(&["rollback", "--to", to]);
        assert_code(&r, 1, "NOTHING_TO_ROLL_BACK");
        assert_tree(&env, &t1, why);
    }
}

#[test]
fn rollback_with_nothing_installed_is_nothing_to_roll_back_and_touches_nothing() {
    let env = Env::new();
    seed_factory(&env);
    let t0 = tree(&env.root);
    for args in [
        &["rollback"][..],
        &["rollback", "--to", "factory"],
        &["rollback", "--to", "previous"],
        &["rollback", "--to", "1.0.0"],
    ] {
        let r = env.run(args);
        assert_code(&r, 1, "NOTHING_TO_ROLL_BACK");
        assert_tree(&env, &t0, &format!("{args:?}"));
    }
    assert!(history(&env).is_empty(), "a refused rollback is not a transaction");
}

// ---- 3. keep_generations ----

#[test]
fn keep_generations_prunes_old_generations_but_factory_rollback_still_restores_everything() {
    let env = Env::with_config("keep_generations = 2");
    seed_factory(&env);
    let t0 = tree(&env.root);
    let mut trees = Vec::new();
    for pkg in [v1(&env), v2(&env), v3(&env), v4(&env)] {
        env.ok(&["install", p(&pkg)]);
        trees.push(tree(&env.root));
    }
    let s = status(&env);
    let kept: Vec<&str> = s["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["version"].as_str().unwrap())
        .collect();
    assert_eq!(kept, ["3.0.0", "4.0.0"], "{s}");

    let r = env.run(&["rollback", "--to", "1.0.0"]);
    assert_code(&r, 1, "NOTHING_TO_ROLL_BACK");
    assert_tree(&env, &trees[3], "refused rollback to a pruned generation");

    env.ok(&["rollback"]);
    assert_tree(&env, &trees[2], "rollback from v4 to the kept v3");
    let r = env.run(&["rollback"]);
    assert_code(&r, 1, "NOTHING_TO_ROLL_BACK");
    assert!(r.stderr.contains("factory"), "the refusal points at --to factory:\n{}", r.describe());
    assert_tree(&env, &trees[2], "refused rollback to v3's pruned parent");

    env.ok(&["rollback", "--to", "factory"]);
    assert_tree(&env, &t0, "rollback --to factory after pruning");
    assert!(leftovers(&env.root).is_empty());
}

// ---- 4. gc ----

#[test]
fn the_end_of_a_rollback_collects_exactly_the_blobs_no_kept_generation_needs() {
    let env = Env::new();
    seed_factory(&env);
    let t0 = tree(&env.root);
    env.ok(&["install", p(&v1(&env))]);
    let t1 = tree(&env.root);
    env.ok(&["install", p(&v2(&env))]);
    let t2 = tree(&env.root);
    env.ok(&["install", p(&v3(&env))]);
    let before = blobs(&env);
    let v3_only: BTreeSet<String> = V3_ONLY.iter().map(|c| blake3_hex(c)).collect();
    assert!(v3_only.is_disjoint(&before), "v3's content is live, not in the store: {before:?}");

    // The rollback backs v3's content up, and its end drops generation 3: nothing needs v3's
    // blobs any more, and the collection after the commit removed exactly those.
    env.ok(&["rollback"]);
    assert_tree(&env, &t2, "rollback to v2");
    assert_eq!(blobs(&env), before, "the store holds what it held before the rollback");
    let last = &env.run(&["history", "--json"]).json()[0];
    assert_eq!(last["freed_blobs"], json!(v3_only.len()), "{last}");
    let v3_bytes: usize = V3_ONLY.iter().map(|c| c.len()).sum();
    assert_eq!(last["freed_bytes"], json!(v3_bytes), "{last}");
    let st = env.run(&["status", "--json"]).json();
    assert_eq!(st["backups"]["blobs"], json!(before.len()), "{st}");

    // `gc` stays for operators; after the automatic collection it finds nothing.
    let r = env.run(&["gc", "--json"]);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    assert_eq!(
        (&r.json()["removed"], &r.json()["kept"]),
        (&json!(0), &json!(before.len())),
        "{}",
        r.describe()
    );
    assert_eq!(blobs(&env), before);

    // What remains is enough for every rollback that is still offered.
    env.ok(&["rollback"]);
    assert_tree(&env, &t1, "rollback to v1 after gc");
    env.ok(&["rollback", "--to", "factory"]);
    assert_tree(&env, &t0, "rollback --to factory after gc");
}

#[test]
fn gc_keeps_the_factory_blobs_when_every_generation_is_pruned() {
    let env = Env::with_config("keep_generations = 1");
    seed_factory(&env);
    let t0 = tree(&env.root);
    for pkg in [v1(&env), v2(&env), v3(&env)] {
        env.ok(&["install", p(&pkg)]);
    }
    // Each install's end pruned the generation before it and collected its backups.
    let h = env.run(&["history", "--json"]).json();
    let freed: Vec<u64> =
        h.as_array().unwrap().iter().rev().map(|t| t["freed_blobs"].as_u64().unwrap()).collect();
    assert_eq!(freed[0], 0, "the first install prunes nothing: {h}");
    assert!(freed[1] > 0 && freed[2] > 0, "v1's and v2's backups are no longer needed: {h}");
    let r = env.run(&["gc", "--json"]);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    assert_eq!(r.json()["removed"], 0, "nothing left for the operator's gc:\n{}", r.describe());
    for factory in [&b"factory app\n"[..], b"factory conf\n", b"factory secret\n"] {
        assert!(blobs(&env).contains(&blake3_hex(factory)), "a factory blob survives gc");
    }
    env.ok(&["rollback", "--to", "factory"]);
    assert_tree(&env, &t0, "rollback --to factory after gc");
}

// ---- 5. journal commits ----

/// Journal commits of the transaction with id `tx`, from `history --json`.
fn commits_of(env: &Env, tx: u64) -> (u64, u64) {
    let rec = history(env)
        .into_iter()
        .find(|r| r["id"] == json!(tx))
        .unwrap_or_else(|| panic!("no tx {tx} in history"));
    (rec["commits"].as_u64().unwrap(), rec["targets"].as_u64().unwrap())
}

fn install_json(env: &Env, pkg: &Path) -> Value {
    let r = env.run(&["install", p(pkg), "--json"]);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    r.json()
}

#[test]
fn journal_commits_per_transaction_are_bounded_and_do_not_grow_with_the_file_count() {
    let env = Env::new();
    // Ten single-file modules.
    let small: Vec<(String, String, Vec<u8>)> = (0..10)
        .map(|i| (format!("m{i}"), format!("small/f{i}"), format!("small {i}\n").into_bytes()))
        .collect();
    let mods: Vec<M> = small.iter().map(|(n, d, c)| M::File(n, d, c, None)).collect();
    let pkg_small = build(&env, "small.zip", "1.0.0", &mods);

    // 500 files in one directory module, built by `pack`.
    let src = env.tmp.path().join("bigsrc");
    for i in 0..500 {
        let f = src.join(format!("app/d{}/f{i}", i % 7));
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, format!("big file {i}\n")).unwrap();
    }
    let template = json!({
        "version": "0.0.0",
        "modules": [{"name": "many", "src": "app/", "dst": env.dst("many")}],
    });
    std::fs::write(src.join("manifest.json"), template.to_string()).unwrap();
    let pkg_big = env.pkg_path("big.zip");
    env.ok(&["pack", p(&src), "-o", p(&pkg_big), "--version", "2.0.0"]);

    let small_report = install_json(&env, &pkg_small);
    let big_report = install_json(&env, &pkg_big);
    assert_eq!(
        env.read("many/d6/f496").unwrap(),
        b"big file 496\n",
        "a directory module keeps the relative layout"
    );

    let (small_commits, small_targets) = commits_of(&env, small_report["tx"].as_u64().unwrap());
    let (big_commits, big_targets) = commits_of(&env, big_report["tx"].as_u64().unwrap());
    assert_eq!((small_targets, big_targets), (10, 500));
    assert_eq!(small_report["commits"], json!(small_commits), "the report and the history agree");
    assert_eq!(big_report["commits"], json!(big_commits));
    assert!((2..=12).contains(&small_commits), "{small_commits} commits");
    assert_eq!(small_commits, big_commits, "500 files take as many journal commits as 10");

    env.ok(&["rollback"]);
    let h = history(&env);
    assert_eq!(h.len(), 3);
    for rec in &h {
        let c = rec["commits"].as_u64().unwrap();
        assert!((2..=12).contains(&c), "transaction {} made {c} commits", rec["id"]);
    }
    assert_eq!(h[0]["targets"], 500, "the rollback undid 500 files: {}", h[0]);
    assert_eq!(
        h[0]["commits"],
        json!(big_commits),
        "a 500-file rollback takes as many commits as an install"
    );
}

// ---- 6. verify ----

#[test]
fn verify_detects_tampered_content_modes_and_missing_files_and_passes_once_restored() {
    let env = Env::new();
    seed_factory(&env);
    assert_eq!(env.run(&["verify"]).code, Some(0), "nothing installed: nothing to differ");
    env.ok(&["install", p(&v1(&env))]);
    let r = env.run(&["verify", "--json"]);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    assert_eq!(r.json()["mismatches"], json!([]));
    assert!(r.json()["checked"].as_u64().unwrap() >= 5);

    let app = env.read("bin/app").unwrap();
    env.put("bin/app", b"tampered\n", 0o755);
    let r = env.run(&["verify"]);
    assert_ne!(r.code, Some(0));
    assert_eq!(r.error_code().as_deref(), Some("HASH_MISMATCH"), "{}", r.describe());
    assert!(r.stdout.contains(&env.dst("bin/app")), "the report names the file:\n{}", r.describe());
    env.put("bin/app", &app, 0o755);
    assert_eq!(env.run(&["verify"]).code, Some(0), "restored content verifies");

    std::fs::set_permissions(env.path("bin/app"), std::fs::Permissions::from_mode(0o777)).unwrap();
    assert_eq!(
        env.run(&["verify"]).error_code().as_deref(),
        Some("HASH_MISMATCH"),
        "a changed mode is a mismatch"
    );
    std::fs::set_permissions(env.path("bin/app"), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(env.run(&["verify"]).code, Some(0));

    let tool = env.read("opt/x/y/z/tool").unwrap();
    std::fs::remove_file(env.path("opt/x/y/z/tool")).unwrap();
    let r = env.run(&["verify"]);
    assert_eq!(r.error_code().as_deref(), Some("HASH_MISMATCH"), "{}", r.describe());
    assert!(r.stdout.contains("missing"), "{}", r.describe());
    env.put("opt/x/y/z/tool", &tool, 0o700);
    assert_eq!(env.run(&["verify"]).code, Some(0));
}

// ---- 7. busy ----

#[test]
fn a_second_caller_gets_operation_in_progress_while_the_state_lock_is_held() {
    let env = Env::new();
    seed_factory(&env);
    env.ok(&["install", p(&v1(&env))]);
    let t1 = tree(&env.root);
    let pkg2 = v2(&env);
    let journal_before = std::fs::read(env.state.join("journal.redb")).unwrap();

    let lock_file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(env.state.join("lock"))
        .unwrap();
    let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .unwrap();

    for args in [
        &["install", p(&pkg2)][..],
        &["rollback"],
        &["rollback", "--to", "factory"],
        &["gc"],
        &["recover"],
    ] {
        let r = env.run(args);
        assert_code(&r, 6, "OPERATION_IN_PROGRESS");
    }
    assert_tree(&env, &t1, "while busy");
    assert_eq!(
        std::fs::read(env.state.join("journal.redb")).unwrap(),
        journal_before,
        "the journal is untouched"
    );
    assert_eq!(
        current_version(&env).as_deref(),
        Some("1.0.0"),
        "status still answers beside the lock"
    );

    drop(lock);
    env.ok(&["install", p(&pkg2)]);
    assert_eq!(current_version(&env).as_deref(), Some("2.0.0"));
}

// ---- 8. remembered failures ----

fn failed_packages(env: &Env) -> Vec<(String, u64)> {
    journal_dump(env)["failed_packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_str().unwrap().to_string(), e[1].as_u64().unwrap()))
        .collect()
}

#[test]
fn a_package_whose_install_was_rolled_back_is_refused_again_unless_forced() {
    let env = Env::new();
    seed_factory(&env);
    let t0 = tree(&env.root);
    // "conf" promises a hash its content does not have: staging fails, the install rolls back.
    let manifest = json!({"version": "1.0.0", "modules": [
        {
            "name": "app",
            "src": "app",
            "dst": env.dst("bin/app"),
            "blake3": blake3_hex(b"app v1\n"),
            "mode": "0755",
        },
        {
            "name": "conf",
            "src": "conf",
            "dst": env.dst("etc/app.conf"),
            "blake3": blake3_hex(b"something else"),
        },
        {"name": "new", "src": "new", "dst": env.dst("newdir/sub/file")},
    ]})
    .to_string();
    let bad = env.pkg_path("bad.zip");
    write_package(
        &bad,
        &manifest,
        &[("app", b"app v1\n"), ("conf", b"conf v1\n"), ("new", b"new\n")],
    );
    let bad_hash = blake3_hex(&std::fs::read(&bad).unwrap());

    let r = env.run(&["install", p(&bad), "--json"]);
    assert_tx_failed(&r, 3, "HASH_MISMATCH");
    assert_tree(&env, &t0, "failed install");
    assert!(!env.path("newdir").exists(), "a directory the failed install created is removed");
    let failed = failed_packages(&env);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, bad_hash, "the package is remembered by the blake3 of its bytes");
    let h = history(&env);
    assert_eq!((h.len(), h[0]["phase"].as_str()), (1, Some("RolledBack")), "{h:?}");
    assert_eq!(
        failed[0].1,
        h[0]["id"].as_u64().unwrap(),
        "remembered with the transaction that rolled it back"
    );

    let r = env.run(&["install", p(&bad)]);
    assert_code(&r, 3, "VALIDATION_ERROR");
    assert!(r.stderr.contains("--force") && r.stderr.contains("rolled back"), "{}", r.describe());
    assert_eq!(history(&env).len(), 1, "the refusal starts no transaction");
    assert_tree(&env, &t0, "refused reinstall");

    let r = env.run(&["install", p(&bad), "--force", "--json"]);
    assert_tx_failed(&r, 3, "HASH_MISMATCH");
    assert!(!r.stderr.contains("--force"), "--force gets past the refusal:\n{}", r.describe());
    assert_eq!(history(&env).len(), 2, "--force ran a second transaction");
    assert_tree(&env, &t0, "forced reinstall that fails again");
    let forced_tx = history(&env)[0]["id"].as_u64().unwrap();
    assert_eq!(
        failed_packages(&env),
        vec![(bad_hash.clone(), forced_tx)],
        "remembered now by the latest rollback"
    );

    // A different package (fixed hashes) is not affected by the memory of the bad one.
    let good = v1(&env);
    env.ok(&["install", p(&good)]);
    assert_eq!(current_version(&env).as_deref(), Some("1.0.0"));
    assert_eq!(
        failed_packages(&env),
        vec![(bad_hash, forced_tx)],
        "a good install does not forget the bad package"
    );
}

#[test]
fn a_failed_install_names_its_error_code_on_stderr_like_every_other_error() {
    // SPEC §6: the stable codes appear on the CLI as `error: CODE: message` on stderr.
    let env = Env::new();
    seed_factory(&env);
    let manifest = json!({"version": "1.0.0", "modules": [
        {
            "name": "conf",
            "src": "conf",
            "dst": env.dst("etc/app.conf"),
            "blake3": blake3_hex(b"something else"),
        },
    ]})
    .to_string();
    let bad = env.pkg_path("bad.zip");
    write_package(&bad, &manifest, &[("conf", b"conf v1\n")]);
    let r = env.run(&["install", p(&bad)]);
    assert_code(&r, 3, "HASH_MISMATCH");
}

#[test]
fn reinstalling_a_package_that_succeeded_is_not_refused() {
    let env = Env::new();
    seed_factory(&env);
    let pkg = v1(&env);
    env.ok(&["install", p(&pkg)]);
    let t1 = tree(&env.root);
    let r = env.run(&["install", p(&pkg)]);
    assert_eq!(
        r.code,
        Some(0),
        "the same version again is not a downgrade and not a failed package:\n{}",
        r.describe()
    );
    assert_tree(&env, &t1, "reinstall");
    assert!(failed_packages(&env).is_empty());
    assert_eq!(history(&env).len(), 2);
    assert_eq!(current_version(&env).as_deref(), Some("1.0.0"));
}

// ---- 9. losing the journal ----

#[test]
fn a_corrupt_journal_is_reported_and_only_recover_replaces_it() {
    let env = Env::new();
    seed_factory(&env);
    env.ok(&["install", p(&v1(&env))]);
    let t1 = tree(&env.root);
    let journal = env.state.join("journal.redb");
    let mut bytes = std::fs::read(&journal).unwrap();
    assert!(bytes.len() > 4096);
    bytes[..4096].iter_mut().enumerate().for_each(|(i, b)| *b = (i as u8).wrapping_mul(31) ^ 0xa5);
    std::fs::write(&journal, &bytes).unwrap();
    let pkg2 = v2(&env);

    for args in
        [&["status"][..], &["history"], &["verify"], &["install", p(&pkg2)], &["rollback"], &["gc"]]
    {
        let r = env.run(args);
        assert_code(&r, 1, "JOURNAL_CORRUPT");
    }
    assert_tree(&env, &t1, "commands on a corrupt journal");
    assert_eq!(std::fs::read(&journal).unwrap(), bytes, "the damaged journal is left as it was");
    assert!(!env.state.join("inflight.plan").exists());

    let r = env.run(&["recover"]);
    assert_code(&r, 1, "JOURNAL_CORRUPT");
    let aside: Vec<PathBuf> = std::fs::read_dir(&env.state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("journal.redb.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged file is moved aside");
    assert_eq!(std::fs::read(&aside[0]).unwrap(), bytes, "moved aside unchanged");
    assert_tree(&env, &t1, "recover with nothing in flight");

    let s = status(&env);
    assert!(s["current"].is_null() && s["in_flight"].is_null(), "a fresh journal: {s}");
    assert_eq!(
        env.run(&["recover"]).code,
        Some(0),
        "recover on the fresh journal has nothing to do"
    );
    env.ok(&["install", p(&pkg2)]);
    assert_eq!(current_version(&env).as_deref(), Some("2.0.0"));
    assert_eq!(env.read("etc/secret").unwrap(), b"secret v2\n");
}

/// Installs v1, then crashes the v2 install after its second swapped file. Returns the tree
/// before the v2 install and the v2 package.
fn crash_during_swap(env: &Env) -> (BTreeMap<String, String>, PathBuf) {
    seed_factory(env);
    env.ok(&["install", p(&v1(env))]);
    let t1 = tree(&env.root);
    let pkg2 = v2(env);
    let out = env
        .command(&["install", p(&pkg2)])
        .env("FAILPOINTS", "swap.file=1*off->return")
        .output()
        .unwrap();
    let r = Run::from(out);
    assert_eq!(r.signal, Some(9), "the install must die at the crash point:\n{}", r.describe());
    assert!(env.state.join("inflight.plan").exists(), "the plan copy exists while in flight");
    assert_ne!(tree(&env.root), t1, "the crash left a half-swapped tree");
    assert!(!leftovers(&env.root).is_empty(), "staged files were left behind by the crash");
    (t1, pkg2)
}

fn recover_after_journal_loss(env: &Env, t1: &BTreeMap<String, String>, pkg2: &Path) {
    let r = env.run(&["recover"]);
    assert_eq!(r.code, Some(4), "rolled back:\n{}", r.describe());
    assert!(
        r.stdout.contains("JOURNAL_CORRUPT") || r.stderr.contains("JOURNAL_CORRUPT"),
        "{}",
        r.describe()
    );
    assert_tree(env, t1, "recover after losing the journal");
    assert!(leftovers(&env.root).is_empty(), "{:?}", leftovers(&env.root));
    assert!(!env.state.join("inflight.plan").exists(), "the plan copy is removed once rolled back");

    let s = status(env);
    assert!(s["in_flight"].is_null(), "{s}");
    assert_eq!(s["last"]["phase"], "RolledBack", "{s}");
    assert_eq!(env.run(&["recover"]).code, Some(0), "a second recover has nothing to do");
    assert_tree(env, t1, "second recover");

    // The rolled-back package is remembered like any failed install; forced, it goes in.
    assert_code(&env.run(&["install", p(pkg2)]), 3, "VALIDATION_ERROR");
    env.ok(&["install", p(pkg2), "--force"]);
    assert_eq!(current_version(env).as_deref(), Some("2.0.0"));
    assert_eq!(env.read("lib/tope/sub/deep/d.so").unwrap(), b"d v2\n");
    assert_eq!(env.run(&["verify"]).code, Some(0));
}

#[test]
fn recover_rolls_back_from_the_plan_copy_when_the_journal_is_truncated_mid_transaction() {
    let env = Env::new();
    let (t1, pkg2) = crash_during_swap(&env);
    let journal =
        std::fs::File::options().write(true).open(env.state.join("journal.redb")).unwrap();
    journal.set_len(100).unwrap();
    drop(journal);

    let r = env.run(&["status"]);
    assert_code(&r, 1, "JOURNAL_CORRUPT");
    recover_after_journal_loss(&env, &t1, &pkg2);
    let aside = std::fs::read_dir(&env.state).unwrap().filter(|e| {
        e.as_ref().unwrap().file_name().to_str().unwrap().starts_with("journal.redb.corrupt-")
    });
    assert_eq!(aside.count(), 1, "the truncated journal is kept aside for inspection");
}

#[test]
fn recover_rolls_back_from_the_plan_copy_when_the_journal_is_deleted_mid_transaction() {
    let env = Env::new();
    let (t1, pkg2) = crash_during_swap(&env);
    std::fs::remove_file(env.state.join("journal.redb")).unwrap();
    recover_after_journal_loss(&env, &t1, &pkg2);
}

// ---- 10. modes and ownership ----

#[test]
fn manifest_mode_is_applied_else_an_old_file_keeps_its_mode_else_the_zip_mode_is_used() {
    let env = Env::new();
    env.put("bin/keep", b"old keep\n", 0o751);
    env.put("bin/set", b"old set\n", 0o640);
    let t0 = tree(&env.root);
    let m = |name: &str, dst: &str, mode: Option<&str>| {
        let mut v = json!({"name": name, "src": name, "dst": env.dst(dst)});
        if let Some(mode) = mode {
            v["mode"] = json!(mode);
        }
        v
    };
    let manifest = json!({"version": "1.0.0", "modules": [
        m("keep", "bin/keep", None),
        m("set", "bin/set", Some("0705")),
        m("new", "bin/new", None),
        m("newset", "bin/newset", Some("0604")),
        m("setgid", "bin/setgid", Some("2750")),
        {"name": "tree", "src": "tree/", "dst": env.dst("share/tree"), "mode": "0710"},
    ]})
    .to_string();
    let zip = zip_with(&[
        Entry::File("manifest.json", manifest.as_bytes()),
        Entry::FileMode("keep", b"new keep\n", 0o600),
        Entry::FileMode("set", b"new set\n", 0o777),
        Entry::FileMode("new", b"new new\n", 0o711),
        Entry::FileMode("newset", b"new newset\n", 0o777),
        Entry::FileMode("setgid", b"new setgid\n", 0o644),
        Entry::FileMode("tree/a", b"tree a\n", 0o644),
        Entry::FileMode("tree/sub/b", b"tree b\n", 0o666),
    ]);
    let pkg = env.pkg_path("modes.zip");
    std::fs::write(&pkg, zip).unwrap();
    env.ok(&["install", p(&pkg)]);

    assert_eq!(
        mode_of(&env, "bin/keep"),
        0o751,
        "no manifest mode: the overwritten file keeps its mode, not the zip's"
    );
    assert_eq!(
        mode_of(&env, "bin/set"),
        0o705,
        "the manifest mode wins over the old and the zip mode"
    );
    assert_eq!(
        mode_of(&env, "bin/new"),
        0o711,
        "a new file without manifest mode gets the zip entry's mode"
    );
    assert_eq!(mode_of(&env, "bin/newset"), 0o604, "the manifest mode wins over the zip mode");
    assert_eq!(mode_of(&env, "bin/setgid"), 0o2750, "special bits in a manifest mode are applied");
    assert_eq!(
        (mode_of(&env, "share/tree/a"), mode_of(&env, "share/tree/sub/b")),
        (0o710, 0o710),
        "a directory module's mode"
    );
    assert_eq!(env.read("bin/keep").unwrap(), b"new keep\n");
    assert_eq!(env.run(&["verify"]).code, Some(0));

    env.ok(&["rollback"]);
    assert_tree(&env, &t0, "rollback restores the old modes and removes the new files");
    assert_eq!((mode_of(&env, "bin/keep"), mode_of(&env, "bin/set")), (0o751, 0o640));
}

#[test]
#[cfg_attr(
    tope_unprivileged,
    ignore = "needs root: changes file owners; run as root (README.md: Tests that need root)"
)]
fn manifest_owner_is_applied_and_the_old_owner_comes_back_on_rollback() {
    crate::support::require_root(
        "manifest_owner_is_applied_and_the_old_owner_comes_back_on_rollback",
        "it chowns files to other users",
    );
    let env = Env::new();
    env.put("bin/owned", b"old owned\n", 0o640);
    env.put("bin/kept", b"old kept\n", 0o640);
    let chown = |rel: &str, uid: u32, gid: u32| {
        std::os::unix::fs::chown(env.path(rel), Some(uid), Some(gid)).unwrap();
    };
    let owner = |rel: &str| {
        let m = std::fs::metadata(env.path(rel)).unwrap();
        (m.uid(), m.gid())
    };
    chown("bin/owned", 1111, 1112);
    chown("bin/kept", 2221, 2222);
    let manifest = json!({"version": "1.0.0", "modules": [
        {
            "name": "owned",
            "src": "owned",
            "dst": env.dst("bin/owned"),
            "uid": 4321,
            "gid": 4322,
            "mode": "4750",
        },
        {"name": "kept", "src": "kept", "dst": env.dst("bin/kept")},
        {"name": "fresh", "src": "fresh", "dst": env.dst("bin/fresh"), "uid": 5555, "gid": 5556},
    ]})
    .to_string();
    let pkg = env.pkg_path("owners.zip");
    write_package(
        &pkg,
        &manifest,
        &[("owned", b"new owned\n"), ("kept", b"new kept\n"), ("fresh", b"new fresh\n")],
    );
    env.ok(&["install", p(&pkg)]);
    assert_eq!(owner("bin/owned"), (4321, 4322));
    assert_eq!(
        mode_of(&env, "bin/owned"),
        0o4750,
        "the mode is applied after chown, so set-uid survives"
    );
    assert_eq!(owner("bin/kept"), (2221, 2222), "no uid/gid: the old owner is kept");
    assert_eq!(owner("bin/fresh"), (5555, 5556));

    env.ok(&["rollback"]);
    assert_eq!(owner("bin/owned"), (1111, 1112), "rollback restores the old owner");
    assert_eq!(mode_of(&env, "bin/owned"), 0o640);
    assert_eq!(owner("bin/kept"), (2221, 2222));
    assert!(!env.path("bin/fresh").exists());
}

// ---- 12. config ----

#[test]
fn config_prints_the_effective_settings_as_toml_and_as_json() {
    let env = Env::with_config("keep_generations = 2");
    let out = env.ok(&["config"]);
    let (head, body) = out.split_once('\n').unwrap();
    assert!(
        head.starts_with('#') && head.contains(p(&env.config)),
        "the first line names the source: {head}"
    );
    let t: toml::Table = toml::from_str(body).unwrap_or_else(|e| panic!("not TOML ({e}):\n{out}"));
    assert_eq!(t["keep_generations"].as_integer(), Some(2), "a value from the file");
    assert_eq!(t["state_dir"].as_str(), Some(p(&env.state)));
    assert_eq!(t["service_manager"].as_str(), Some("none"));
    assert_eq!(t["max_recovery_attempts"].as_integer(), Some(5), "a default");
    assert_eq!(t["recovery"].as_str(), Some("resume"));

    let j = env.run(&["config", "--json"]).json();
    assert_eq!(j["source"], p(&env.config));
    assert_eq!(j["config"]["keep_generations"], 2);
    assert_eq!(j["config"]["state_dir"], p(&env.state));
    assert_eq!(j["config"]["allowed_roots"], json!([p(&env.root)]));
    assert_eq!(j["config"]["api"]["listen"], "127.0.0.1:12315", "defaults of nested tables too");
}

#[test]
fn an_unknown_config_key_is_a_validation_error_for_every_command() {
    let env = Env::with_config("keep_generationz = 2");
    seed_factory(&env);
    let t0 = tree(&env.root);
    let pkg = v1(&env);
    // A broken config is not a rejected package (exit 3): it is a plain failure, exit 1.
    for args in [&["config"][..], &["status"], &["install", p(&pkg)], &["recover"]] {
        let r = env.run(args);
        assert_code(&r, 1, "VALIDATION_ERROR");
        assert!(
            r.stderr.contains("keep_generationz"),
            "the message names the key:\n{}",
            r.describe()
        );
    }
    let r = env.run(&["config", "--json"]);
    assert_eq!(r.json()["error"]["code"], "VALIDATION_ERROR", "{}", r.describe());
    assert_tree(&env, &t0, "with a bad config");
    assert!(!env.state.exists(), "nothing was created in the state dir");
}

#[test]
fn exit_statuses_distinguish_usage_mismatch_and_rejection() {
    let env = Env::new();
    env.put("app/a", b"old", 0o644);
    // A malformed --to is a usage error.
    let r = env.run(&["rollback", "--to", "bogus"]);
    assert_code(&r, 2, "VALIDATION_ERROR");
    // verify finding a difference is a failure (1), not a rejected package (3).
    let pkg = env.pkg_path("p.zip");
    write_package(&pkg, &manifest("1.0.0", &[("a", "a", &env.dst("app/a"))]), &[("a", b"new")]);
    env.ok(&["install", pkg.to_str().unwrap()]);
    std::fs::write(env.path("app/a"), b"tampered").unwrap();
    assert_code(&env.run(&["verify"]), 1, "HASH_MISMATCH");
}

/// `tests/fixtures/journal-v1.redb` was written by format version 1 (install 1.0.0, install
/// 2.0.0, rollback to 1.0.0). Every later release must keep reading it (journal-format.md §7).
#[test]
fn a_journal_written_by_format_version_1_still_opens_and_reads() {
    let env = Env::new();
    std::fs::create_dir_all(&env.state).unwrap();
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/journal-v1.redb");
    std::fs::copy(fixture, env.state.join("journal.redb")).unwrap();

    let s = env.run(&["status", "--json"]).json();
    assert_eq!(s["current"]["version"], "1.0.0", "{s}");
    assert_eq!(s["generations"].as_array().unwrap().len(), 1, "{s}");
    assert_eq!(s["factory_paths"], 2, "{s}");
    assert_eq!(s["in_flight"], serde_json::Value::Null, "{s}");

    let h = env.run(&["history", "--json"]).json();
    let kinds: Vec<&str> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_object().unwrap().keys().next().unwrap().as_str())
        .collect();
    assert_eq!(kinds, ["Rollback", "Install", "Install"], "{h}");
    assert!(
        h.as_array().unwrap().iter().all(|r| r["phase"] == "Committed" && r["commits"] == 6),
        "{h}"
    );

    let dump: serde_json::Value = serde_json::from_str(&env.ok(&["journal"])).unwrap();
    assert_eq!(dump["format_version"], 1);
    assert_eq!(dump["generations"][0]["files"].as_object().unwrap().len(), 2, "{dump}");

    // Opening it for writing (integrity check, repair) works too.
    let r = env.run(&["recover", "--json"]);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    assert_eq!(r.json()["result"], "nothing");
    // The write open added the `trial` table (absent in the fixture) and V1 records still
    // decode beside it; records written from now on are V2.
    let dump: serde_json::Value = serde_json::from_str(&env.ok(&["journal"])).unwrap();
    assert_eq!(dump["trial"], serde_json::Value::Null, "{dump}");
    assert_eq!(dump["transactions"][0]["post_cmds_done"], 0, "{dump}");
    assert_eq!(dump["generations"][0]["services"], serde_json::json!({}), "{dump}");
}
