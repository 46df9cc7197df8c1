//! Helpers shared by the fuzz targets: the manifest invariants, the package fixture root and
//! the package invariants. Nothing here is fuzzing-specific except that it panics on a
//! violated invariant, which is what libFuzzer reports as a crash.

pub mod delta;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tope_updater::config::Config;
use tope_updater::error::ErrorCode;
use tope_updater::manifest::{Manifest, ModuleSrc, check_relative};
use tope_updater::package::{Package, entry_reader};
use tope_updater::paths::AllowedRoots;
use tope_updater::version::Version;

// ---- manifest ----

/// Invariants every accepted manifest must satisfy (SPEC §2), then a round trip: the
/// manifest written back as JSON parses to the same value.
pub fn check_manifest(m: &Manifest) {
    assert_eq!(Version::parse(&m.version.to_string()).expect("version does not parse back"), m.version);
    if let Some(min) = m.min_from_version {
        assert_eq!(Version::parse(&min.to_string()).unwrap(), min);
    }
    assert!(!m.modules.is_empty(), "accepted a manifest without modules");
    let mut names = std::collections::BTreeSet::new();
    for module in &m.modules {
        assert!(names.insert(module.name.as_str()), "module name {:?} accepted twice", module.name);
        assert!(!module.name.is_empty() && !module.name.chars().any(char::is_control), "bad name {:?}", module.name);
        if let Some(mode) = module.mode {
            assert!(mode <= 0o7777, "mode {mode:o} beyond 07777");
        }
        let src = match &module.src {
            ModuleSrc::File(s) => {
                assert!(!s.ends_with('/'), "file src {s:?} ends with /");
                assert!(module.files.is_none(), "file module with a files map");
                s
            }
            ModuleSrc::Dir(s) => {
                assert!(s.ends_with('/'), "dir src {s:?} does not end with /");
                assert!(module.blake3.is_none(), "dir module with a blake3");
                s
            }
        };
        assert!(!src.starts_with('/'), "src {src:?} is absolute");
        assert!(!src.contains('\0') && !src.contains('\\'), "src {src:?} has NUL or backslash");
        let body = src.strip_suffix('/').unwrap_or(src);
        assert!(!body.is_empty());
        for c in body.split('/') {
            assert!(!c.is_empty() && c != "." && c != "..", "src {src:?} has component {c:?}");
        }
        assert!(check_relative("src", src, true).is_ok());
        for rel in module.files.iter().flat_map(|f| f.keys()) {
            assert!(check_relative("files key", rel, false).is_ok(), "files key {rel:?}");
            assert!(!rel.split('/').any(|c| c == ".."), "files key {rel:?}");
        }
        for c in &module.post_cmds {
            assert!(!c.trim().is_empty() && !c.contains('\0'), "post_cmd {c:?}");
        }
    }
    let again = Manifest::parse(&manifest_to_json(m)).expect("a manifest written back from an accepted one is rejected");
    let mut expected = m.clone();
    expected.unknown_fields.clear();
    assert_eq!(again, expected, "manifest round trip changed the value");
}

/// The manifest as `manifest.json` (new optional fields included), without unknown fields.
pub fn manifest_to_json(m: &Manifest) -> Vec<u8> {
    use serde_json::{Map, Value, json};
    let modules: Vec<Value> = m
        .modules
        .iter()
        .map(|module| {
            let mut o = Map::new();
            o.insert("name".into(), json!(module.name));
            o.insert(
                "src".into(),
                json!(match &module.src {
                    ModuleSrc::File(s) | ModuleSrc::Dir(s) => s,
                }),
            );
            o.insert("dst".into(), json!(module.dst));
            if let Some(p) = &module.process_name {
                o.insert("process_name".into(), json!(p));
            }
            if let Some(r) = module.restart_order {
                o.insert("restart_order".into(), json!(r));
            }
            o.insert("post_cmds".into(), json!(module.post_cmds));
            if let Some(h) = module.blake3 {
                o.insert("blake3".into(), json!(h.to_hex()));
            }
            if let Some(files) = &module.files {
                let f: Map<String, Value> = files.iter().map(|(k, h)| (k.clone(), json!(h.to_hex()))).collect();
                o.insert("files".into(), Value::Object(f));
            }
            if let Some(mode) = module.mode {
                o.insert("mode".into(), json!(format!("{mode:o}")));
            }
            if let Some(uid) = module.uid {
                o.insert("uid".into(), json!(uid));
            }
            if let Some(gid) = module.gid {
                o.insert("gid".into(), json!(gid));
            }
            Value::Object(o)
        })
        .collect();
    let mut top = Map::new();
    top.insert("version".into(), json!(m.version.to_string()));
    top.insert("modules".into(), Value::Array(modules));
    if let Some(c) = &m.compatible {
        top.insert("compatible".into(), json!(c));
    }
    if let Some(v) = m.min_from_version {
        top.insert("min_from_version".into(), json!(v.to_string()));
    }
    if m.reboot {
        top.insert("reboot".into(), json!(true));
    }
    serde_json::to_vec(&Value::Object(top)).unwrap()
}

// ---- package ----

/// Where the fuzzed packages deploy. A fixed path (not a random temp name) so that the seed
/// packages and the dictionary can name destinations under it.
pub const FUZZ_DIR: &str = "/tmp/tope-fuzz";
pub const ROOT: &str = "/tmp/tope-fuzz/root";

/// Per-process scratch files (the package under test, the plan copy): in memory when
/// /dev/shm is there, which roughly doubles the executions per second of the file targets.
pub fn scratch_dir() -> &'static Path {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let shm = Path::new("/dev/shm/tope-fuzz");
        let d = if std::fs::create_dir_all(shm).is_ok() { shm.to_path_buf() } else { PathBuf::from(FUZZ_DIR) };
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

struct Fixture {
    cfg: Config,
    roots: AllowedRoots,
    canonical_root: PathBuf,
    package_path: PathBuf,
}

/// The allowed root, populated with what hostile destinations aim at: a symlink out of the
/// root, one inside it, a dangling one, a symlink at a destination, a directory and files.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = Path::new(ROOT);
        let outside = Path::new(FUZZ_DIR).join("outside");
        for d in [root.join("dir/sub"), outside.clone()] {
            std::fs::create_dir_all(&d).unwrap();
        }
        for f in [root.join("file"), root.join("dir/file"), outside.join("file")] {
            if !f.exists() {
                std::fs::write(&f, b"old\n").unwrap();
            }
        }
        let links: [(&str, PathBuf); 5] = [
            ("escape", PathBuf::from("/")),
            ("out", outside.clone()),
            ("alias", PathBuf::from("dir")),
            ("dangling", PathBuf::from("/nonexistent-tope-fuzz/x")),
            ("link", PathBuf::from("file")),
        ];
        for (name, target) in links {
            match std::os::unix::fs::symlink(&target, root.join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => panic!("fixture symlink {name}: {e}"),
            }
        }
        let cfg = Config {
            allowed_roots: vec![root.to_path_buf()],
            max_package_bytes: 4 * 1024 * 1024,
            max_unpacked_bytes: 64 * 1024 * 1024,
            ..Config::default()
        };
        let roots = AllowedRoots::new(&cfg.allowed_roots);
        let package_path = scratch_dir().join(format!("package-{}.zip", std::process::id()));
        Fixture { cfg, roots, canonical_root: std::fs::canonicalize(root).unwrap(), package_path }
    })
}

/// Opens `bytes` as a package and checks what an accepted package promises. Returns whether
/// it was accepted.
pub fn check_package_bytes(bytes: &[u8]) -> bool {
    open_and_check(bytes, false).is_some()
}

/// `check_package_bytes`, returning for an accepted package the content of every deployed
/// entry that read back completely (when `collect`; otherwise an empty map).
pub fn open_and_check(bytes: &[u8], collect: bool) -> Option<std::collections::BTreeMap<String, Vec<u8>>> {
    let fx = fixture();
    std::fs::write(&fx.package_path, bytes).unwrap();
    let pkg = match Package::open(&fx.package_path, &fx.cfg, &fx.roots) {
        Ok(p) => p,
        Err(e) => {
            // DEPLOYMENT_FAILED: a dst under an existing regular file of the allowed root (the
            // path is allowed, but this device cannot hold it), found before anything is touched.
            let not_deployable = e.code == ErrorCode::DeploymentFailed && e.message.contains("is not a directory");
            assert!(
                matches!(e.code, ErrorCode::InvalidPackage | ErrorCode::InvalidManifest | ErrorCode::PathNotAllowed) || not_deployable,
                "unexpected error code for hostile bytes: {e}"
            );
            return None;
        }
    };
    check_manifest(&pkg.manifest);
    assert!(!pkg.files.is_empty(), "an accepted package deploys nothing");
    let mut dsts = std::collections::BTreeSet::new();
    for f in &pkg.files {
        assert!((f.module as usize) < pkg.manifest.modules.len());
        assert!(check_relative("entry", &f.entry, false).is_ok(), "entry {:?}", f.entry);
        assert!(dsts.insert(f.dst.clone()), "two files deploy to {}", f.dst.display());
        check_dst(&fx.canonical_root, &f.dst);
        if let Some(mode) = f.zip_mode {
            assert!(mode <= 0o7777 && mode != 0);
        }
        match &pkg.manifest.modules[f.module as usize].src {
            ModuleSrc::File(s) => assert_eq!(&f.entry, s),
            ModuleSrc::Dir(p) => assert!(f.entry.starts_with(p.as_str()) && f.entry.len() > p.len()),
        }
    }
    let mut archive = pkg.archive();
    let mut contents = std::collections::BTreeMap::new();
    for f in &pkg.files {
        let Ok(mut r) = entry_reader(&mut archive, &f.entry, f.size) else { continue };
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        let mut content = Vec::new();
        let ok = loop {
            match r.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => {
                    if collect {
                        content.extend_from_slice(&buf[..n]);
                    }
                    total += n as u64;
                    assert!(total <= f.size, "entry {:?} yielded more than its declared {} bytes", f.entry, f.size);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break false,
            }
        };
        if ok {
            assert_eq!(total, f.size, "entry {:?} read to the end with {total} of {} bytes", f.entry, f.size);
            if collect {
                contents.insert(f.entry.clone(), content);
            }
        }
    }
    Some(contents)
}

/// A destination is strictly under the allowed root, and no existing ancestor of it leads
/// out of the root through a symlink; an existing destination is a regular file.
fn check_dst(root: &Path, dst: &Path) {
    assert!(dst.is_absolute() && dst.starts_with(root) && dst != root, "{} is not under {}", dst.display(), root.display());
    for c in dst.components() {
        assert!(matches!(c, std::path::Component::RootDir | std::path::Component::Normal(_)), "{} has {c:?}", dst.display());
    }
    let mut ancestor = dst.parent();
    while let Some(a) = ancestor {
        if std::fs::symlink_metadata(a).is_ok() {
            let real =
                std::fs::canonicalize(a).unwrap_or_else(|e| panic!("{}: ancestor {} does not resolve: {e}", dst.display(), a.display()));
            assert!(real.starts_with(root), "{}: ancestor {} resolves to {} outside the root", dst.display(), a.display(), real.display());
            assert_eq!(real, a, "{}: ancestor {} is reached through a symlink", dst.display(), a.display());
            break;
        }
        ancestor = a.parent();
    }
    if let Ok(m) = std::fs::symlink_metadata(dst) {
        assert!(m.file_type().is_file(), "{} exists and is not a regular file", dst.display());
    }
}
