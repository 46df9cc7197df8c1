//! Writes the seed corpora under `fuzz/corpus/<target>/`: manifests from SPEC §2, small
//! packages made with the zip writer, journal records encoded by the engine's own `encode`,
//! and delta patches made by `make_patch` (both methods). Deterministic; rerun after a format
//! change and commit the result:
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use tope_updater::config::Config;
use tope_updater::engine::plan::{ModulePlan, PackageRef};
use tope_updater::engine::{FileMeta, Generation, Hash, NewFile, NewState, PathState, Phase, Plan, RollbackTarget, Source, Target, TxKind};
use tope_updater::error::{Error, ErrorCode};
use tope_updater::journal::records::{Size, TxRecord, encode};
use tope_updater_fuzz::ROOT;
use zip::write::SimpleFileOptions;

/// Seeds that must be accepted (`Some(true)`) or refused (`Some(false)`) by the code under
/// test, checked here so that a seed never silently stops reaching the deep paths.
fn put_checked(dir: &Path, name: &str, bytes: &[u8], accepted: bool, check: impl Fn(&[u8]) -> bool) {
    assert_eq!(check(bytes), accepted, "seed {name}: expected accepted = {accepted}");
    put(dir, name, bytes);
}

fn manifest_ok(b: &[u8]) -> bool {
    tope_updater::manifest::Manifest::parse(b).inspect(tope_updater_fuzz::check_manifest).is_ok()
}

fn put(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

const LEGACY: &str = r#"{ "version": "1.2.3",
  "modules": [
    { "name": "device-api", "src": "modules/device-api/device-api",
      "dst": "/opt/tope/device-api/device-api",
      "process_name": "device-api", "restart_order": 1,
      "post_cmds": ["systemctl daemon-reload"] } ] }
"#;

fn manifests(dir: &Path) {
    put_checked(dir, "legacy-spec", LEGACY.as_bytes(), true, manifest_ok);
    put_checked(
        dir,
        "legacy-two-modules",
        br#"{"version":"2.0.10","modules":[
 {"name":"gui","src":"modules/gui/gui","dst":"/opt/tope/gui/gui","process_name":"gui","restart_order":2,"post_cmds":[]},
 {"name":"conf","src":"modules/conf/","dst":"/opt/tope/conf","restart_order":-1}]}"#,
        true,
        manifest_ok,
    );
    put_checked(
        dir,
        "legacy-unknown-fields",
        br#"{"version":"1.0.0","builder":"ci","modules":[{"name":"a","src":"a","dst":"/opt/tope/a","x":1}]}"#,
        true,
        manifest_ok,
    );
    let h = Hash::of(b"hello\n").to_hex();
    put_checked(
        dir,
        "new-fields",
        format!(
            r#"{{"version":"3.1.4","compatible":"tope-board-7","min_from_version":"3.0.0","reboot":true,"modules":[
 {{"name":"fw","src":"fw.bin","dst":"/opt/tope/fw.bin","blake3":"{h}","mode":"0755","uid":0,"gid":1000}},
 {{"name":"web","src":"web/","dst":"/opt/tope/web","files":{{"index.html":"{h}","js/app.js":"{h}"}},"mode":"644"}}]}}"#
        )
        .as_bytes(),
        true,
        manifest_ok,
    );
    put_checked(
        dir,
        "reject-duplicate-name",
        br#"{"version":"1.0.0","modules":[{"name":"a","src":"a","dst":"/x"},{"name":"a","src":"b","dst":"/y"}]}"#,
        false,
        manifest_ok,
    );
    put_checked(dir, "reject-dotdot-src", br#"{"version":"1.0.0","modules":[{"name":"a","src":"../a","dst":"/x"}]}"#, false, manifest_ok);
    put_checked(
        dir,
        "reject-mode",
        br#"{"version":"1.0.0","modules":[{"name":"a","src":"a","dst":"/x","mode":"17777"}]}"#,
        false,
        manifest_ok,
    );
}

fn opts(deflate: bool, mode: u32) -> SimpleFileOptions {
    let o = SimpleFileOptions::default().unix_permissions(mode);
    if deflate {
        o.compression_method(zip::CompressionMethod::Deflated).compression_level(Some(1))
    } else {
        o.compression_method(zip::CompressionMethod::Stored)
    }
}

/// A package: manifest plus `(name, content, deflate)` entries.
fn zip_of(manifest: &str, entries: &[(&str, &[u8], bool)]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    zip.start_file("manifest.json", opts(true, 0o644)).unwrap();
    zip.write_all(manifest.as_bytes()).unwrap();
    for (name, content, deflate) in entries {
        zip.start_file(*name, opts(*deflate, 0o755)).unwrap();
        zip.write_all(content).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

fn packages(dir: &Path) {
    let legacy = format!(
        r#"{{"version":"1.2.3","modules":[{{"name":"device-api","src":"modules/device-api/device-api","dst":"{ROOT}/device-api/device-api","process_name":"device-api","restart_order":1,"post_cmds":["systemctl daemon-reload"]}}]}}"#
    );
    let ok = tope_updater_fuzz::check_package_bytes;
    put_checked(
        dir,
        "legacy-one-file.zip",
        &zip_of(&legacy, &[("modules/device-api/device-api", b"#!/bin/sh\necho v1.2.3\n", false)]),
        true,
        ok,
    );
    let h1 = Hash::of(b"<html>\n").to_hex();
    let h2 = Hash::of(b"conf=1\n").to_hex();
    let hashed = format!(
        r#"{{"version":"2.0.0","modules":[
 {{"name":"web","src":"web/","dst":"{ROOT}/dir/web","files":{{"index.html":"{h1}","etc/app.conf":"{h2}"}}}},
 {{"name":"tool","src":"bin/tool","dst":"{ROOT}/dir/sub/tool","blake3":"{h1}","mode":"0755"}}]}}"#
    );
    put_checked(
        dir,
        "hashed-dir-module.zip",
        &zip_of(
            &hashed,
            &[("web/index.html", b"<html>\n", true), ("web/etc/app.conf", b"conf=1\n", false), ("bin/tool", b"<html>\n", true)],
        ),
        true,
        ok,
    );
    // Hostile: destination through the symlink out of the root, and an entry name with '..'.
    let escape = format!(r#"{{"version":"1.0.0","modules":[{{"name":"a","src":"a","dst":"{ROOT}/escape/etc/passwd"}}]}}"#);
    put_checked(dir, "hostile-symlink-dst.zip", &zip_of(&escape, &[("a", b"x", false)]), false, ok);
    let dotdot = format!(r#"{{"version":"1.0.0","modules":[{{"name":"a","src":"a","dst":"{ROOT}/a"}}]}}"#);
    put_checked(dir, "hostile-dotdot-entry.zip", &zip_of(&dotdot, &[("a", b"x", false), ("../evil", b"x", false)]), false, ok);
}

fn meta(h: u8) -> FileMeta {
    FileMeta { hash: Hash([h; 32]), size: 1000 + h as u64, mode: 0o644, uid: 0, gid: 1000 }
}

fn install_plan() -> Plan {
    Plan {
        tx_id: 7,
        kind: TxKind::Install {
            package: PackageRef { path: "/var/lib/tope-updater/incoming/p.zip".into(), blake3: Hash([9; 32]), size: 4096 },
        },
        from_version: Some("1.2.3".into()),
        to_version: Some("1.3.0".into()),
        modules: vec![ModulePlan {
            name: "device-api".into(),
            process_name: Some("device-api".into()),
            restart_order: Some(1),
            post_cmds: vec!["systemctl daemon-reload".into()],
        }],
        targets: vec![
            Target {
                path: "/opt/tope/device-api/device-api".into(),
                module: 0,
                old: PathState::File(meta(1)),
                new: NewState::File(NewFile { hash: Some(Hash([2; 32])), size: 20, mode: 0o755, uid: 0, gid: 0 }),
                source: Source::Package { entry: "modules/device-api/device-api".into() },
            },
            Target {
                path: "/opt/tope/device-api/new.conf".into(),
                module: 0,
                old: PathState::Absent,
                new: NewState::File(NewFile { hash: None, size: 7, mode: 0o644, uid: 0, gid: 0 }),
                source: Source::Package { entry: "modules/device-api/new.conf".into() },
            },
        ],
        created_dirs: vec!["/opt/tope/device-api".into()],
        removed_dirs: vec![],
        controls_services: true,
        runs_post_cmds: true,
    }
}

fn rollback_plan() -> Plan {
    Plan {
        tx_id: 8,
        kind: TxKind::Rollback { to: RollbackTarget::Factory },
        from_version: Some("1.3.0".into()),
        to_version: None,
        modules: vec![],
        targets: vec![
            Target { path: "/opt/tope/a".into(), module: 0, old: PathState::File(meta(3)), new: NewState::Absent, source: Source::Nothing },
            Target {
                path: "/opt/tope/b".into(),
                module: 0,
                old: PathState::Absent,
                new: NewState::File(NewFile { hash: Some(Hash([4; 32])), size: 1004, mode: 0o600, uid: 5, gid: 6 }),
                source: Source::Blob,
            },
        ],
        created_dirs: vec![],
        removed_dirs: vec!["/opt/tope/d/e".into(), "/opt/tope/d".into()],
        controls_services: false,
        runs_post_cmds: false,
    }
}

fn records(dir: &Path) {
    let tx = TxRecord {
        id: 7,
        kind: install_plan().kind,
        from_version: Some("1.2.3".into()),
        to_version: Some("1.3.0".into()),
        phase: Phase::RollingBack,
        phases: vec![Phase::Planned, Phase::Staged, Phase::ServicesStopped, Phase::BackedUp, Phase::Swapped, Phase::RollingBack],
        attempts: 2,
        error: Some(Error::new(ErrorCode::DeploymentFailed, "interrupted in phase Swapped")),
        targets: 2,
        new_bytes: 27,
        commits: 6,
        started_unix_ms: 1_790_000_000_000,
        updated_unix_ms: 1_790_000_000_500,
        post_cmds_done: 0,
        freed_blobs: 0,
        freed_bytes: 0,
    };
    put(dir, "tx-rolling-back", &encode(&tx, Size::Small).unwrap());
    let committed = TxRecord {
        id: 3,
        kind: TxKind::Rollback { to: RollbackTarget::Generation(2) },
        phase: Phase::Committed,
        phases: vec![Phase::Planned, Phase::Staged, Phase::BackedUp, Phase::Swapped, Phase::Verified, Phase::Committed],
        attempts: 0,
        error: None,
        ..tx.clone()
    };
    put(dir, "tx-committed", &encode(&committed, Size::Small).unwrap());
    put(dir, "plan-install", &encode(&install_plan(), Size::Large).unwrap());
    put(dir, "plan-rollback", &encode(&rollback_plan(), Size::Large).unwrap());
    let g = Generation {
        id: 7,
        version: "1.3.0".into(),
        tx_id: 7,
        parent: Some(4),
        files: BTreeMap::from([("/opt/tope/a".to_string(), meta(1)), ("/opt/tope/d/b".to_string(), meta(2))]),
        dirs: BTreeSet::from(["/opt/tope/d".to_string()]),
        services: BTreeMap::new(),
    };
    put(dir, "generation", &encode(&g, Size::Large).unwrap());
    put(dir, "pathstate-absent", &encode(&PathState::Absent, Size::Small).unwrap());
    put(dir, "pathstate-file", &encode(&PathState::File(meta(0xab)), Size::Small).unwrap());
    // A plan copy file, as `plancopy::write` lays it out.
    let payload = encode(&install_plan(), Size::Large).unwrap();
    let mut copy = b"TOPEPLN1".to_vec();
    copy.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    copy.extend_from_slice(&Hash::of(&payload).0);
    copy.extend_from_slice(&payload);
    put(dir, "plan-copy", &copy);
}

fn configs(dir: &Path) {
    put(dir, "defaults", Config::default().to_toml().as_bytes());
    put(dir, "empty", b"");
    put(
        dir,
        "device",
        br#"state_dir = "/data/tope-updater"
allowed_roots = ["/opt/tope", "/data/apps"]
service_manager = "process"
keep_generations = 5
recovery = "rollback"
compatible = "tope-board-7"
max_compression_ratio = 100

[api]
listen = "0.0.0.0:12315"

[services.device-api]
start = "/opt/tope/device-api/device-api --daemon"
"#,
    );
}

/// Seeds of `delta_apply`: patches `make_patch` makes between small inputs, in the raw layout
/// (`tope_updater_fuzz::delta::split_raw`). Each is checked to apply to its target; the set
/// must hold both methods (bsdiff wins on data like relocated code: a byte changed every few
/// bytes defeats zstd's matches but leaves bsdiff a stream of zeros).
fn deltas(dir: &Path) {
    use tope_updater_fuzz::delta::{self as d, Method};
    let _ = std::fs::remove_dir_all(dir);
    let mut methods = BTreeSet::new();
    let mut seed = |name: &str, base: Result<u8, &[u8]>, target: &[u8]| {
        let base_bytes = match base {
            Ok(i) => d::fixed_base(i),
            Err(b) => b.to_vec(),
        };
        let patch = d::seed_patch(&base_bytes, target);
        let m = d::methods(&patch, target.len() as u64, base_bytes.len() as u64);
        methods.extend(m.iter().map(|m| format!("{m:?}")));
        let bytes = d::join_raw(base, u32::try_from(target.len()).unwrap(), &patch);
        assert!(bytes.len() <= 8 * 1024, "seed {name} is {} bytes", bytes.len());
        println!("delta_apply/{name}: {} bytes, windows {m:?}", bytes.len());
        put(dir, name, &bytes);
    };
    let text = d::fixed_base(1);
    let edited = String::from_utf8(text.clone()).unwrap().replace("value-3", "value-33").replace("set -eu\n", "set -eux\nulimit -c 0\n");
    seed("text-edit", Ok(1), edited.as_bytes());
    seed("from-empty", Ok(0), b"#!/bin/sh\necho from nothing\n");
    seed("to-empty", Ok(1), b"");
    let mut noise = d::fixed_base(2);
    noise[1000..1100].copy_from_slice(&d::noise(100, 9));
    noise.splice(3000..3000, d::noise(77, 11));
    seed("noise-splice", Ok(2), &noise);
    // Relocated code: every address of the table moved by 0x40 (one byte in eight changes).
    let code = d::fixed_base(3);
    let mut relocated = code.clone();
    for chunk in relocated.chunks_exact_mut(8).skip(1) {
        if chunk[2] == 0x40 && chunk[3..].iter().all(|&b| b == 0) {
            chunk[0] = chunk[0].wrapping_add(0x40);
            if chunk[0] < 0x40 {
                chunk[1] = chunk[1].wrapping_add(1);
            }
        }
    }
    assert_ne!(relocated, code);
    seed("code-relocated", Ok(3), &relocated);
    // Shifted noise-like data: cut at the front, a byte in 40 perturbed.
    let mut shifted = code[333..].to_vec();
    for (i, b) in shifted.iter_mut().enumerate() {
        if i % 40 == 7 {
            *b ^= 0x10;
        }
    }
    seed("code-shifted", Ok(3), &shifted);
    // More than one window of output from a small base.
    let long: Vec<u8> = text.iter().copied().cycle().take(DELTA_WINDOW + 1000).collect();
    seed("text-two-windows", Ok(1), &long);
    // The base larger than a reference: one window from its middle, and all of it edited.
    let big = d::fixed_base(d::BIG_BASE);
    let mut excerpt = big[3_000_000..3_020_000].to_vec();
    excerpt[500..520].fill(0xee);
    seed("big-excerpt", Ok(d::BIG_BASE), &excerpt);
    let mut big_edit = big.clone();
    for at in [17, 4_000_000, 8_500_000] {
        big_edit[at..at + 64].copy_from_slice(&d::noise(64, at as u64));
    }
    seed("big-three-windows", Ok(d::BIG_BASE), &big_edit);
    // Bases carried in the input.
    let small = d::noise(1500, 21);
    let mut small_edit = small.clone();
    small_edit.splice(700..700, b"inserted".iter().copied());
    seed("input-base-edit", Err(&small), &small_edit);
    let small_code = d::code_like(3000, 22);
    let small_rel: Vec<u8> = small_code.iter().enumerate().map(|(i, &b)| if i % 13 == 5 { b.wrapping_add(1) } else { b }).collect();
    seed("input-base-bsdiff", Err(&small_code), &small_rel);
    for m in [Method::Zstd, Method::BsdiffZstd] {
        assert!(methods.contains(&format!("{m:?}")), "no delta seed uses {m:?}");
    }
    delta_dict(&Path::new(env!("CARGO_MANIFEST_DIR")).join("dict/delta_apply.dict"));
}

/// The dictionary of `delta_apply`: zstd magics, window headers, the limits as bincode
/// varints, bsdiff's extreme control words, declared sizes.
fn delta_dict(path: &Path) {
    use tope_updater::limits::*;
    use tope_updater_fuzz::delta::{self as d, Method, WindowHeader};
    let esc = |b: &[u8]| b.iter().map(|x| format!("\\x{x:02x}")).collect::<String>();
    let enc = |v: &dyn Fn(&mut Vec<u8>)| {
        let mut out = Vec::new();
        v(&mut out);
        esc(&out)
    };
    let mut s = String::from("# delta_apply: generated by examples/gen_corpus.rs (deltas)\n");
    s.push_str(&format!("zstd_frame=\"{}\"\n", esc(&0xFD2F_B528u32.to_le_bytes())));
    s.push_str(&format!("zstd_skippable=\"{}\"\n", esc(&0x184D_2A50u32.to_le_bytes())));
    for (name, method) in [("zstd", Method::Zstd), ("bsdiff", Method::BsdiffZstd)] {
        let h = WindowHeader { method, payload_len: 300 };
        s.push_str(&format!("window_{name}=\"{}\"\n", enc(&|o| d::encode(&h, o))));
    }
    for (name, v) in [
        ("window", DELTA_WINDOW_BYTES),
        ("ref_max", DELTA_REF_BYTES_MAX),
        ("payload_max", DELTA_PAYLOAD_BYTES_MAX),
        ("payload_max_plus_1", DELTA_PAYLOAD_BYTES_MAX + 1),
        ("stream_max", DELTA_BSDIFF_STREAM_BYTES_MAX),
        ("u64_max", u64::MAX),
    ] {
        s.push_str(&format!("varint_{name}=\"{}\"\n", enc(&|o| d::encode(&v, o))));
    }
    s.push_str(&format!("declared_window=\"{}\"\n", esc(&(DELTA_WINDOW_BYTES as u32).to_le_bytes())));
    s.push_str(&format!("declared_window_plus_1=\"{}\"\n", esc(&(DELTA_WINDOW_BYTES as u32 + 1).to_le_bytes())));
    s.push_str(&format!("bsdiff_len_huge=\"{}\"\n", esc(&i64::MAX.to_le_bytes())));
    s.push_str(&format!("bsdiff_seek_negative=\"{}\"\n", esc(&(1u64 << 63 | 1).to_le_bytes())));
    std::fs::write(path, s).unwrap();
}

const DELTA_WINDOW: usize = tope_updater::limits::DELTA_WINDOW_BYTES as usize;

/// `gen_corpus [DIR [CORPUS...]]`: writes every corpus (or the ones named) under DIR
/// (default: `fuzz/corpus`).
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let base = args.first().map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"));
    let only: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    let all: [(&str, fn(&Path)); 5] =
        [("manifest", manifests), ("package", packages), ("records", records), ("config", configs), ("delta_apply", deltas)];
    for name in &only {
        assert!(all.iter().any(|(n, _)| n == name), "no corpus {name:?}");
    }
    for (name, write) in all {
        if only.is_empty() || only.contains(&name) {
            write(&base.join(name));
        }
    }
    println!("seed corpora written under {}", base.display());
}
