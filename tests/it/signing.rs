//! Signed packages (SPEC §2, issue 7): `keygen`, `pack --sign`, and every way a signature can
//! be wrong on install → `SIGNATURE_INVALID`, exit 3, nothing touched.

use crate::support::*;
use std::path::{Path, PathBuf};

struct Signed {
    env: Env,
    key: PathBuf,
    public: PathBuf,
    src: PathBuf,
}

/// A device that trusts a freshly made key (plus `extra` config), and a package source dir.
fn signed_device(extra: &str) -> Signed {
    let env = Env::new();
    let prefix = env.tmp.path().join("release");
    let out = env.ok(&["keygen", "-o", prefix.to_str().unwrap()]);
    assert!(out.contains("release.pub"), "{out}");
    let (key, public) = (env.tmp.path().join("release.key"), env.tmp.path().join("release.pub"));
    let mut cfg = std::fs::read_to_string(&env.config).unwrap();
    cfg += &format!("trusted_keys = [{:?}]\n{extra}\n", public.to_str().unwrap());
    std::fs::write(&env.config, cfg).unwrap();
    let src = env.tmp.path().join("src");
    std::fs::create_dir_all(src.join("bin")).unwrap();
    std::fs::write(src.join("bin/app"), b"app v2").unwrap();
    std::fs::write(
        src.join("manifest.json"),
        format!(
            r#"{{"version":"2.0.0","modules":[{{"name":"app","src":"bin/app","dst":"{}"}}]}}"#,
            env.dst("bin/app")
        ),
    )
    .unwrap();
    env.put("bin/app", b"app v1", 0o755);
    Signed { env, key, public, src }
}

fn assert_refused(env: &Env, pkg: &Path, code: &str) {
    let before = tree(&env.root);
    let r = env.run(&["install", pkg.to_str().unwrap()]);
    assert_eq!(r.code, Some(3), "{}", r.describe());
    assert_eq!(r.error_code().as_deref(), Some(code), "{}", r.describe());
    assert_eq!(tree(&env.root), before, "the tree changed after a refused package");
    assert!(
        env.ok(&["status", "--json"]).contains("\"current\":null"),
        "something was recorded as installed"
    );
}

/// Rewrites a package with one entry replaced (or dropped with `None`), keeping the rest.
fn rewrite(pkg: &Path, out: &Path, name: &str, content: Option<&[u8]>) {
    let mut zin = zip::ZipArchive::new(std::fs::File::open(pkg).unwrap()).unwrap();
    let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..zin.len() {
        let mut f = zin.by_index(i).unwrap();
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut buf).unwrap();
        entries.push((f.name().unwrap().to_string(), buf));
    }
    let mut w = zip::ZipWriter::new(std::fs::File::create(out).unwrap());
    for (n, bytes) in entries {
        let bytes = if n == name { content.map(<[u8]>::to_vec) } else { Some(bytes) };
        if let Some(b) = bytes {
            w.start_file(n.as_str(), zip::write::SimpleFileOptions::default()).unwrap();
            std::io::Write::write_all(&mut w, &b).unwrap();
        }
    }
    w.finish().unwrap();
}

fn read_entry(pkg: &Path, name: &str) -> Vec<u8> {
    let mut zin = zip::ZipArchive::new(std::fs::File::open(pkg).unwrap()).unwrap();
    let mut f = zin.by_name(name).unwrap();
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut buf).unwrap();
    buf
}

fn pack_signed(s: &Signed) -> PathBuf {
    let pkg = s.env.pkg_path("signed.zip");
    let out = s.env.ok(&[
        "pack",
        s.src.to_str().unwrap(),
        "-o",
        pkg.to_str().unwrap(),
        "--sign",
        s.key.to_str().unwrap(),
    ]);
    assert!(out.contains("signed"), "{out}");
    pkg
}

#[test]
fn a_package_signed_by_a_trusted_key_installs() {
    let s = signed_device("require_signature = true");
    let pkg = pack_signed(&s);
    assert_eq!(read_entry(&pkg, "manifest.json.sig").len(), 64);
    s.env.ok(&["install", pkg.to_str().unwrap()]);
    assert_eq!(s.env.read("bin/app").unwrap(), b"app v2");
}

#[test]
fn a_manifest_changed_after_signing_is_refused() {
    let s = signed_device("");
    let pkg = pack_signed(&s);
    let manifest =
        String::from_utf8(read_entry(&pkg, "manifest.json")).unwrap().replace("2.0.0", "2.0.1");
    let bad = s.env.pkg_path("tampered.zip");
    rewrite(&pkg, &bad, "manifest.json", Some(manifest.as_bytes()));
    assert_refused(&s.env, &bad, "SIGNATURE_INVALID");
}

#[test]
fn a_payload_byte_changed_after_signing_is_refused_because_the_signed_manifest_hashes_it() {
    let s = signed_device("require_signature = true");
    let pkg = pack_signed(&s);
    let bad = s.env.pkg_path("payload.zip");
    rewrite(&pkg, &bad, "bin/app", Some(b"app v6"));
    assert_refused(&s.env, &bad, "HASH_MISMATCH");
}

#[test]
fn a_missing_signature_is_refused_when_required_and_accepted_otherwise() {
    let s = signed_device("require_signature = true");
    let pkg = pack_signed(&s);
    let unsigned = s.env.pkg_path("unsigned.zip");
    rewrite(&pkg, &unsigned, "manifest.json.sig", None);
    assert_refused(&s.env, &unsigned, "SIGNATURE_INVALID");
    // The same package on a device that does not require signatures installs.
    let lax = Env::with_config(&format!("trusted_keys = [{:?}]", s.public.to_str().unwrap()));
    let m = String::from_utf8(read_entry(&unsigned, "manifest.json"))
        .unwrap()
        .replace(&s.env.dst("bin/app"), &lax.dst("bin/app"));
    let lax_pkg = lax.pkg_path("unsigned.zip");
    rewrite(&unsigned, &lax_pkg, "manifest.json", Some(m.as_bytes()));
    lax.ok(&["install", lax_pkg.to_str().unwrap()]);
}

#[test]
fn a_signature_by_an_untrusted_key_is_refused() {
    let s = signed_device("");
    let other = s.env.tmp.path().join("other");
    s.env.ok(&["keygen", "-o", other.to_str().unwrap()]);
    let pkg = s.env.pkg_path("other.zip");
    s.env.ok(&[
        "pack",
        s.src.to_str().unwrap(),
        "-o",
        pkg.to_str().unwrap(),
        "--sign",
        &format!("{}.key", other.display()),
    ]);
    assert_refused(&s.env, &pkg, "SIGNATURE_INVALID");
}

#[test]
fn a_signature_of_the_wrong_length_is_refused() {
    let s = signed_device("");
    let pkg = pack_signed(&s);
    let bad = s.env.pkg_path("short.zip");
    rewrite(&pkg, &bad, "manifest.json.sig", Some(&[7u8; 63]));
    assert_refused(&s.env, &bad, "SIGNATURE_INVALID");
}

#[test]
fn a_signed_manifest_that_does_not_hash_every_file_is_refused() {
    let s = signed_device("");
    // A validly signed manifest whose module lacks its blake3 (signed here with the same key).
    let pkg = pack_signed(&s);
    let manifest = String::from_utf8(read_entry(&pkg, "manifest.json")).unwrap();
    let mut doc: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    doc["modules"][0].as_object_mut().unwrap().remove("blake3");
    let stripped = serde_json::to_vec(&doc).unwrap();
    let key = tope_updater::signing::load_signing_key(&s.key).unwrap();
    let sig = tope_updater::signing::sign(&key, &stripped);
    let tmp = s.env.pkg_path("step.zip");
    rewrite(&pkg, &tmp, "manifest.json", Some(&stripped));
    let bad = s.env.pkg_path("nohash.zip");
    rewrite(&tmp, &bad, "manifest.json.sig", Some(&sig));
    assert_refused(&s.env, &bad, "SIGNATURE_INVALID");
}

#[test]
fn require_signature_without_trusted_keys_is_a_config_error() {
    let env = Env::with_config("require_signature = true");
    let r = env.run(&["status"]);
    assert_eq!(r.code, Some(1), "{}", r.describe());
    assert_eq!(r.error_code().as_deref(), Some("VALIDATION_ERROR"), "{}", r.describe());
}

#[test]
fn keygen_refuses_to_overwrite_a_key() {
    let env = Env::new();
    let prefix = env.tmp.path().join("k");
    env.ok(&["keygen", "-o", prefix.to_str().unwrap()]);
    let before = std::fs::read(env.tmp.path().join("k.key")).unwrap();
    let r = env.run(&["keygen", "-o", prefix.to_str().unwrap()]);
    assert_eq!(r.code, Some(1), "{}", r.describe());
    assert_eq!(std::fs::read(env.tmp.path().join("k.key")).unwrap(), before);
}
