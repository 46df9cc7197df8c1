//! Delta packages (SPEC §2, issue 14): what pack ships, and installs that keep every guarantee.
//! Every expected tree is computed from the source directories (`support::after_install`),
//! never from the engine; every package is made by the real `pack`.

use crate::support::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// One version of the application: files under `app/` (a directory module) and `fw.bin` (a
/// file module), each with its mode in the source tree.
struct Version {
    name: &'static str,
    #[allow(clippy::struct_field_names, reason = "the manifest's key of the same name")]
    version: &'static str,
    app: Vec<(&'static str, Vec<u8>, u32)>,
    fw: Vec<u8>,
}

impl Version {
    /// Its source directory (manifest template and sources), as a build machine holds it.
    fn source(&self, env: &Env) -> PathBuf {
        let dir = env.tmp.path().join(format!("src-{}", self.name));
        let _ = std::fs::remove_dir_all(&dir);
        for (rel, content, mode) in &self.app {
            let p = dir.join("app").join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, content).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
        }
        std::fs::write(dir.join("fw.bin"), &self.fw).unwrap();
        let manifest = json!({"version": self.version, "modules": [
            {"name": "app", "src": "app/", "dst": env.dst("app")},
            {"name": "fw", "src": "fw.bin", "dst": env.dst("fw.bin")},
        ]});
        std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
        dir
    }

    /// The files an install of this version writes, for the oracle.
    fn new_files(&self) -> Vec<NewFile<'_>> {
        let mut v: Vec<NewFile> = self
            .app
            .iter()
            .map(|(rel, c, mode)| NewFile {
                rel: format!("app/{rel}"),
                content: c,
                manifest_mode: None,
                zip_mode: Some(*mode),
            })
            .collect();
        v.push(NewFile {
            rel: "fw.bin".into(),
            content: &self.fw,
            manifest_mode: None,
            zip_mode: Some(0o644),
        });
        v
    }
}

/// Packs `v` into `out` (a delta package when `bases` is not empty); returns pack's stdout.
fn pack(env: &Env, v: &Version, out: &str, bases: &[&Path]) -> String {
    let src = v.source(env);
    let out = env.pkg_path(out);
    let mut args = vec![
        "pack".to_string(),
        src.to_str().unwrap().into(),
        "-o".into(),
        out.to_str().unwrap().into(),
    ];
    for b in bases {
        args.extend(["--delta-from".to_string(), b.to_str().unwrap().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    env.ok(&args)
}

fn noise(seed: u64, len: usize) -> Vec<u8> {
    XorShift::new(seed).bytes(len)
}

/// `base` with a few bytes overwritten here and there and some inserted: what a rebuild of a
/// binary with a small fix looks like to a diff.
fn edited(base: &[u8], seed: u64) -> Vec<u8> {
    let mut rng = XorShift::new(seed);
    let mut out = base.to_vec();
    for _ in 0..8 {
        let at = rng.range(0, out.len() - 64);
        out[at..at + 32].copy_from_slice(&rng.bytes(32));
    }
    let at = rng.range(0, out.len());
    out.splice(at..at, rng.bytes(300));
    out
}

/// v1 → v2: a changed library, an unchanged one, a changed small config, a new script, and a
/// 5 MiB firmware image (two patch windows) with scattered changes.
fn versions() -> (Version, Version) {
    let lib = noise(1, 700_000);
    let same = noise(2, 300_000);
    let fw = noise(3, 5 << 20);
    let v1 = Version {
        name: "v1",
        version: "1.0.1",
        app: vec![
            ("lib/libapp.so", lib.clone(), 0o755),
            ("lib/libsame.so", same.clone(), 0o644),
            ("etc/app.conf", b"level = 1\n".to_vec(), 0o640),
        ],
        fw: fw.clone(),
    };
    let v2 = Version {
        name: "v2",
        version: "1.0.2",
        app: vec![
            ("lib/libapp.so", edited(&lib, 10), 0o755),
            ("lib/libsame.so", same, 0o644),
            ("etc/app.conf", b"level = 2\n".to_vec(), 0o640),
            ("bin/hook.sh", b"#!/bin/sh\necho hook\n".to_vec(), 0o755),
        ],
        fw: edited(&fw, 11),
    };
    (v1, v2)
}

fn history_len(env: &Env) -> usize {
    env.run(&["history", "--json"]).json().as_array().map_or(0, Vec::len)
}

#[test]
fn a_delta_install_gives_the_full_install_tree_from_a_tenth_of_the_bytes() {
    let (v1, v2) = versions();
    let (a, b) = (Env::new(), Env::new());
    // Device A gets the delta, device B the full package; both start from v1.
    let base_a = a.pkg_path("v1.zip");
    pack(&a, &v1, "v1.zip", &[]);
    pack(&b, &v1, "v1.zip", &[]);
    let report = pack(&a, &v2, "v2-delta.zip", &[&base_a]);
    pack(&b, &v2, "v2.zip", &[]);
    // The new script and the 10-byte config whole (a patch would not pay), the library and
    // the firmware as patches, the unchanged library not at all.
    assert!(report.contains("2 files shipped whole, 2 as patches, 1 not shipped"), "{report}");
    let (delta_len, full_len) = (
        std::fs::metadata(a.pkg_path("v2-delta.zip")).unwrap().len(),
        std::fs::metadata(b.pkg_path("v2.zip")).unwrap().len(),
    );
    assert!(delta_len * 10 <= full_len, "delta {delta_len} bytes, full {full_len}");

    for (env, pkg) in [(&a, "v2-delta.zip"), (&b, "v2.zip")] {
        env.ok(&["install", env.pkg_path("v1.zip").to_str().unwrap()]);
        let before = tree(&env.root);
        env.ok(&["install", env.pkg_path(pkg).to_str().unwrap()]);
        assert_eq!(tree(&env.root), after_install(&before, &v2.new_files()), "{pkg}");
        assert!(leftovers(&env.root).is_empty());
        env.ok(&["verify"]);
    }
    // And back: the delta install's rollback restores v1 exactly.
    let v1_tree = after_install(&BTreeMap::new(), &v1.new_files());
    a.ok(&["rollback"]);
    assert_eq!(tree(&a.root), v1_tree);
}

#[test]
fn files_that_already_hold_their_new_content_are_not_rewritten_by_delta_or_full_packages() {
    let (v1, v2) = versions();
    let env = Env::new();
    let base = env.pkg_path("v1.zip");
    pack(&env, &v1, "v1.zip", &[]);
    pack(&env, &v2, "v2.zip", &[]);
    pack(&env, &v2, "v2-delta.zip", &[&base]);
    for pkg in ["v2.zip", "v2-delta.zip"] {
        env.ok(&["install", base.to_str().unwrap()]);
        let same = env.path("app/lib/libsame.so");
        // Same inode, same mtime: not one byte written (the backup's hard link moves only the
        // ctime, a metadata update).
        let (ino, mtime) = {
            let m = std::fs::metadata(&same).unwrap();
            (m.ino(), (m.mtime(), m.mtime_nsec()))
        };
        let changed_ino = std::fs::metadata(env.path("app/lib/libapp.so")).unwrap().ino();
        env.ok(&["install", env.pkg_path(pkg).to_str().unwrap()]);
        let m = std::fs::metadata(&same).unwrap();
        assert_eq!(
            (m.ino(), (m.mtime(), m.mtime_nsec())),
            (ino, mtime),
            "{pkg}: the unchanged file was rewritten"
        );
        assert_ne!(
            std::fs::metadata(env.path("app/lib/libapp.so")).unwrap().ino(),
            changed_ino,
            "{pkg}: a changed file is a new inode"
        );
        env.ok(&["rollback"]);
    }
}

#[test]
fn a_base_held_only_in_the_backup_store_still_builds_the_new_version() {
    let (v1, v2) = versions();
    // v3: the delta is made against v1, but the device runs v2 (v1 is in its backups).
    let v3 = Version { name: "v3", version: "1.0.3", app: v1.app.clone(), fw: edited(&v1.fw, 12) };
    let env = Env::new();
    let base = env.pkg_path("v1.zip");
    pack(&env, &v1, "v1.zip", &[]);
    pack(&env, &v2, "v2.zip", &[]);
    pack(&env, &v3, "v3-delta.zip", &[&base]);
    env.ok(&["install", base.to_str().unwrap()]);
    env.ok(&["install", env.pkg_path("v2.zip").to_str().unwrap()]);
    let before = tree(&env.root);
    env.ok(&["install", env.pkg_path("v3-delta.zip").to_str().unwrap()]);
    // bin/hook.sh (from v2) stays: a package never removes files.
    assert_eq!(tree(&env.root), after_install(&before, &v3.new_files()));
    env.ok(&["verify"]);
}

#[test]
fn a_delta_against_two_bases_installs_on_a_device_at_either() {
    let (v1, v2) = versions();
    let v1b =
        Version { name: "v1b", version: "1.0.1", app: v1.app.clone(), fw: edited(&v1.fw, 13) };
    for at in ["v1.zip", "v1b.zip"] {
        let env = Env::new();
        let (b1, b1b) = (env.pkg_path("v1.zip"), env.pkg_path("v1b.zip"));
        pack(&env, &v1, "v1.zip", &[]);
        pack(&env, &v1b, "v1b.zip", &[]);
        let report = pack(&env, &v2, "v2-delta.zip", &[&b1, &b1b]);
        assert!(report.contains("delta from 1.0.1, 1.0.1"), "{report}");
        // Two firmware bases: two patches for it in the one package.
        let m: Value = serde_json::from_slice(
            &read_zip(&env.pkg_path("v2-delta.zip"))
                .into_iter()
                .find(|(n, _)| n == "manifest.json")
                .unwrap()
                .1,
        )
        .unwrap();
        assert_eq!(m["delta"]["files"]["fw.bin"]["patches"].as_array().unwrap().len(), 2);
        env.ok(&["install", env.pkg_path(at).to_str().unwrap()]);
        let before = tree(&env.root);
        env.ok(&["install", env.pkg_path("v2-delta.zip").to_str().unwrap()]);
        assert_eq!(tree(&env.root), after_install(&before, &v2.new_files()), "from {at}");
    }
}

#[test]
fn a_drifted_base_is_delta_base_missing_and_nothing_is_touched() {
    let (v1, v2) = versions();
    let env = Env::new();
    let base = env.pkg_path("v1.zip");
    pack(&env, &v1, "v1.zip", &[]);
    pack(&env, &v2, "v2-delta.zip", &[&base]);
    env.ok(&["install", base.to_str().unwrap()]);
    // Someone changed the library on the device: the patch has nothing to apply to.
    env.put("app/lib/libapp.so", b"patched by hand", 0o755);
    let (before, txs) = (tree(&env.root), history_len(&env));
    let r = env.run(&["install", env.pkg_path("v2-delta.zip").to_str().unwrap()]);
    assert_eq!(r.code, Some(3), "{}", r.describe());
    assert_eq!(r.error_code().as_deref(), Some("DELTA_BASE_MISSING"), "{}", r.describe());
    assert!(
        r.stderr.contains("libapp.so") && r.stderr.contains("full package of version 1.0.2"),
        "{}",
        r.describe()
    );
    assert_eq!(tree(&env.root), before);
    assert_eq!(history_len(&env), txs, "no transaction was begun");
}

/// The package's entries, by name.
fn read_zip(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut z = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    (0..z.len())
        .map(|i| {
            let mut e = z.by_index(i).unwrap();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            (e.name().unwrap().to_string(), data)
        })
        .collect()
}

fn write_zip(path: &Path, entries: &[(String, Vec<u8>)]) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    for (name, data) in entries {
        z.start_file(
            name.as_str(),
            zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored),
        )
        .unwrap();
        z.write_all(data).unwrap();
    }
    z.finish().unwrap();
}

/// A change to a package's manifest and entries.
type Edit = dyn FnOnce(&mut Value, &mut Vec<(String, Vec<u8>)>);

/// A copy of the delta package at `from`, with its manifest and entries passed through `edit`.
fn tampered(
    env: &Env,
    from: &Path,
    name: &str,
    edit: impl FnOnce(&mut Value, &mut Vec<(String, Vec<u8>)>),
) -> PathBuf {
    let mut entries = read_zip(from);
    let i = entries.iter().position(|(n, _)| n == "manifest.json").unwrap();
    let mut m: Value = serde_json::from_slice(&entries[i].1).unwrap();
    edit(&mut m, &mut entries);
    let i = entries.iter().position(|(n, _)| n == "manifest.json").unwrap();
    entries[i].1 = serde_json::to_vec(&m).unwrap();
    let out = env.pkg_path(name);
    write_zip(&out, &entries);
    out
}

/// A device at v1 and the v2 delta package.
fn device_at_v1() -> (Env, PathBuf) {
    let (v1, v2) = versions();
    let env = Env::new();
    let base = env.pkg_path("v1.zip");
    pack(&env, &v1, "v1.zip", &[]);
    pack(&env, &v2, "v2-delta.zip", &[&base]);
    env.ok(&["install", base.to_str().unwrap()]);
    let delta = env.pkg_path("v2-delta.zip");
    (env, delta)
}

/// Installs `pkg`, expecting exit 3 with `code`, and the tree and history untouched.
fn refused(env: &Env, pkg: &Path, code: &str, why: &str) {
    let (before, txs) = (tree(&env.root), history_len(env));
    let r = env.run(&["install", pkg.to_str().unwrap()]);
    assert_eq!(
        (r.code, r.error_code().as_deref()),
        (Some(3), Some(code)),
        "{why}:\n{}",
        r.describe()
    );
    assert_eq!(tree(&env.root), before, "{why}: the tree changed");
    assert!(leftovers(&env.root).is_empty(), "{why}: leftovers");
    // A refusal at staging ran a transaction (rolled back); one at validation ran none.
    assert!(history_len(env) <= txs + 1, "{why}");
}

#[test]
fn a_corrupted_patch_is_hash_mismatch_and_nothing_is_touched() {
    let (env, delta) = device_at_v1();
    // Damage the last bytes of every patch (its payload): whatever zstd or bsdiff make of
    // them, the pinned hash refuses it before anything is swapped.
    let bad = tampered(&env, &delta, "corrupt.zip", |_, entries| {
        for (name, data) in entries.iter_mut().filter(|(n, _)| n.starts_with(".tope-delta/")) {
            let n = data.len();
            for b in &mut data[n - 8..] {
                *b ^= 0x5a;
            }
            assert!(!name.is_empty());
        }
    });
    refused(&env, &bad, "HASH_MISMATCH", "damaged patch payload");
}

#[test]
fn hostile_delta_packages_are_refused_before_anything_is_touched() {
    let (env, delta) = device_at_v1();
    let patch_of = |m: &Value, key: &str| m["delta"]["files"][key]["patches"][0].clone();
    let pdst = env.dst("p");
    let cases: Vec<(&str, &str, Box<Edit>)> = vec![
        (
            "a patch entry missing from the archive",
            "INVALID_PACKAGE",
            Box::new(|_, e| e.retain(|(n, _)| !n.starts_with(".tope-delta/"))),
        ),
        (
            "a module that does not pin its files",
            "INVALID_MANIFEST",
            Box::new(|m, _| {
                m["delta"]["modules"][1].as_object_mut().unwrap().remove("blake3");
            }),
        ),
        (
            "a delta file no module deploys",
            "INVALID_MANIFEST",
            Box::new(|m, _| {
                m["delta"]["files"]["nowhere"] = json!({"size": 1, "patches": []});
            }),
        ),
        (
            "a patch that is also deployed as a file",
            "INVALID_MANIFEST",
            Box::new(move |m, e| {
                let entry = patch_of(m, "fw.bin")["entry"].as_str().unwrap().to_string();
                let pinned = blake3_hex(&e.iter().find(|(n, _)| *n == entry).unwrap().1);
                m["delta"]["modules"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": "p", "src": entry, "dst": pdst, "blake3": pinned}));
            }),
        ),
        (
            "an unknown delta format",
            "INVALID_MANIFEST",
            Box::new(|m, _| m["delta"]["format"] = json!(2)),
        ),
        (
            "modules outside delta as well",
            "INVALID_MANIFEST",
            Box::new(|m, _| m["modules"] = m["delta"]["modules"].clone()),
        ),
        (
            "a declared size other than the patch makes",
            "INVALID_PACKAGE",
            Box::new(|m, _| {
                let s = m["delta"]["files"]["fw.bin"]["size"].as_u64().unwrap();
                m["delta"]["files"]["fw.bin"]["size"] = json!(s + 1);
            }),
        ),
        (
            "a declared size over max_unpacked_bytes",
            "INVALID_PACKAGE",
            Box::new(|m, _| {
                m["delta"]["files"]["fw.bin"]["size"] = json!(u64::MAX / 2);
            }),
        ),
    ];
    for (i, (why, code, edit)) in cases.into_iter().enumerate() {
        let bad = tampered(&env, &delta, &format!("hostile-{i}.zip"), edit);
        refused(&env, &bad, code, why);
    }
}

#[test]
fn a_patch_naming_a_base_that_is_not_its_own_is_refused() {
    let (env, delta) = device_at_v1();
    // The manifest claims the firmware patch applies to the device's config file content
    // (which the device holds, so planning finds it); the patch itself says otherwise.
    let conf = blake3_hex(&env.read("app/etc/app.conf").unwrap());
    let bad = tampered(&env, &delta, "wrong-base.zip", |m, entries| {
        let entry =
            m["delta"]["files"]["fw.bin"]["patches"][0]["entry"].as_str().unwrap().to_string();
        // Make fw.bin's live content the claimed base: the config's bytes.
        m["delta"]["files"]["fw.bin"]["patches"][0]["base"] = json!(conf);
        assert!(entries.iter().any(|(n, _)| *n == entry));
    });
    let conf_bytes = env.read("app/etc/app.conf").unwrap();
    env.put("fw.bin", &conf_bytes, 0o644);
    // The patch holds no base of its own (the signed manifest names it): applied to other
    // content it decodes to an error or to other bytes, and the pinned hash refuses either.
    refused(&env, &bad, "HASH_MISMATCH", "a patch for another base");
}

#[test]
fn engines_that_do_not_know_deltas_refuse_the_package_whole() {
    let (env, delta) = device_at_v1();
    let m: Value = serde_json::from_slice(
        &read_zip(&delta).into_iter().find(|(n, _)| n == "manifest.json").unwrap().1,
    )
    .unwrap();
    // The top-level modules list is empty: the legacy service's schema (modules: at least
    // one) and every engine before deltas refuse it before touching anything.
    assert_eq!(m["modules"], json!([]));
    // What an engine that ignores unknown fields (as ours did, and SPEC §2 says) sees:
    let blind = tampered(&env, &delta, "blind.zip", |m, _| {
        m.as_object_mut().unwrap().remove("delta");
    });
    refused(&env, &blind, "INVALID_MANIFEST", "the delta package without its delta section");
    let r = env.run(&["install", blind.to_str().unwrap()]);
    assert!(r.stderr.contains("modules is empty"), "{}", r.describe());
}

#[test]
fn a_package_without_hashes_whose_content_is_already_there_leaves_nothing_staged() {
    // Without pinned hashes the engine learns that the content is unchanged only once it
    // has staged it: the staged copy is then swapped in like any other, never left behind.
    let env = Env::new();
    env.put("app/conf", b"same\n", 0o644);
    let pkg = env.pkg_path("legacy.zip");
    write_package(
        &pkg,
        &manifest("1.0.0", &[("conf", "conf", &env.dst("app/conf"))]),
        &[("conf", b"same\n")],
    );
    let before = tree(&env.root);
    env.ok(&["install", pkg.to_str().unwrap()]);
    assert_eq!(tree(&env.root), before);
    assert!(leftovers(&env.root).is_empty(), "{:?}", leftovers(&env.root));
    env.ok(&["verify"]);
}

#[test]
fn a_kept_file_edited_in_place_neither_damages_a_backup_nor_blocks_a_rollback() {
    // A file whose content an install keeps is not backed up (a hard link would make the
    // backup the live file itself, which an in-place edit then changes). Edited by hand
    // afterwards, a rollback leaves that edit (verify reports it) and restores the rest.
    let (v1, v2) = versions();
    let env = Env::new();
    pack(&env, &v1, "v1.zip", &[]);
    pack(&env, &v2, "v2.zip", &[]);
    env.ok(&["install", env.pkg_path("v1.zip").to_str().unwrap()]);
    env.ok(&["install", env.pkg_path("v2.zip").to_str().unwrap()]);
    let same = env.path("app/lib/libsame.so");
    for blob in std::fs::read_dir(env.state.join("backups")).unwrap() {
        let blob = blob.unwrap().path();
        assert_ne!(
            std::fs::metadata(&blob).unwrap().ino(),
            std::fs::metadata(&same).unwrap().ino(),
            "{} is the live file",
            blob.display()
        );
    }
    let mut f = std::fs::OpenOptions::new().append(true).open(&same).unwrap();
    f.write_all(b"edited in place").unwrap();
    drop(f);
    let edited = std::fs::read(&same).unwrap();
    let r = env.run(&["verify"]);
    assert_ne!(r.code, Some(0), "verify reports the edit:\n{}", r.describe());
    env.ok(&["rollback"]);
    let mut want = after_install(&BTreeMap::new(), &v1.new_files());
    want.insert("app/lib/libsame.so".into(), format!("file 644 {}", blake3_hex(&edited)));
    assert_eq!(tree(&env.root), want, "everything else is v1 again, the edit is left");
}
