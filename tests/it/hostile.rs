//! Hostile packages (SPEC §2). Every package is built inside its test, with the zip crate or,
//! where the writer refuses to produce the damage, by patching or assembling the bytes by hand.
//! Every one must be refused with its stable code and exit status 3 before any target file is
//! touched: the allowed root is byte-identical afterwards and nothing is installed.

use crate::support::*;
use std::io::Write;

/// An existing file at the destination most packages here would overwrite.
const TOOL: &str = "app/bin/tool";
const TOOL_OLD: &[u8] = b"#!/bin/sh\necho old tool\n";
/// Distinctive, so that a rewrite with the default 0644 would show in the snapshot.
const TOOL_MODE: u32 = 0o751;
const NEW_TOOL: &[u8] = b"#!/bin/sh\necho new tool\n";

// ---- the device and the common assertion ----

/// A device whose root already holds some files (with distinctive modes) and an empty
/// directory, so that any change to the tree shows in a snapshot.
fn device(extra_config: &str) -> Env {
    let env = Env::with_config(extra_config);
    env.put(TOOL, TOOL_OLD, TOOL_MODE);
    env.put("app/etc/app.conf", b"port = 8080\n", 0o640);
    env.put("app/data/state.db", &noise(b"state", 3000), 0o600);
    std::fs::create_dir_all(env.path("app/empty")).unwrap();
    env
}

/// Runs `tope-updater --json ARGS` and asserts the whole rejection contract: exit status 3,
/// `error: CODE: message` on stderr, the same code in the JSON on stdout, the allowed root
/// byte-identical (content, mode, type of every entry), no `.tope-` temporary left, and
/// `status` showing `installed` as the current version (None: nothing installed) and no
/// transaction in flight.
fn assert_rejected(env: &Env, args: &[&str], code: &str, installed: Option<&str>) -> Run {
    let before = tree(&env.root);
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let run = env.run(&full);
    assert_eq!(
        run.code,
        Some(3),
        "{args:?}: expected exit status 3 (rejected)\n{}",
        run.describe()
    );
    assert_eq!(
        run.error_code().as_deref(),
        Some(code),
        "{args:?}: expected `error: {code}: ...` on stderr\n{}",
        run.describe()
    );
    let json = run.json();
    assert_eq!(json["error"]["code"], code, "{args:?}: JSON on stdout\n{}", run.describe());
    assert_eq!(tree(&env.root), before, "{args:?}: the target tree changed\n{}", run.describe());
    assert_eq!(
        leftovers(&env.root),
        Vec::<String>::new(),
        "{args:?}: temporary files left behind\n{}",
        run.describe()
    );

    let status = env.run(&["--json", "status"]);
    assert_eq!(status.code, Some(0), "status failed:\n{}", status.describe());
    let s = status.json();
    assert!(s["in_flight"].is_null(), "{args:?}: a transaction is still in flight: {s}");
    match installed {
        None => assert!(s["current"].is_null(), "{args:?}: something is installed: {s}"),
        Some(v) => assert_eq!(s["current"]["version"], v, "{args:?}: current version changed: {s}"),
    }
    run
}

/// Installs the package at `pkg` and asserts the rejection contract on a device where nothing
/// is installed.
fn assert_install_rejected(env: &Env, pkg: &str, code: &str) -> Run {
    assert_rejected(env, &["install", pkg], code, None)
}

// ---- building packages ----

/// Incompressible bytes (so deflate cannot trip the ratio limit by accident).
fn noise(seed: &[u8], len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new().update(seed).finalize_xof().fill(&mut out);
    out
}

/// Writes `bytes` as a package file beside (not under) the root; returns its path.
fn save(env: &Env, name: &str, bytes: &[u8]) -> String {
    let p = env.pkg_path(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_str().unwrap().to_string()
}

/// The manifest of a well-formed one-module package replacing `TOOL`.
fn tool_manifest(env: &Env, version: &str) -> String {
    manifest(version, &[("tool", "payload/tool", &env.dst(TOOL))])
}

/// A ZIP whose entries are all Stored (no compression), so sizes and CRCs sit in plain sight.
fn stored_zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .unix_permissions(0o644);
        for (name, data) in entries {
            z.start_file(*name, opts).unwrap();
            z.write_all(data).unwrap();
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

fn u16_at(b: &[u8], at: usize) -> usize {
    u16::from_le_bytes([b[at], b[at + 1]]) as usize
}

fn u32_at(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize
}

// Field offsets inside a local file header and a central directory record (APPNOTE 4.3.7, 4.3.12).
const LOCAL_CRC: usize = 14;
const LOCAL_COMPRESSED: usize = 18;
const CENTRAL_COMPRESSED: usize = 20;
const LOCAL_UNCOMPRESSED: usize = 22;
const CENTRAL_CRC: usize = 16;
const CENTRAL_UNCOMPRESSED: usize = 24;

/// (local header offset, central record offset) of entry `name`, found by walking the central
/// directory from the end-of-central-directory record.
fn headers_of(zip: &[u8], name: &str) -> (usize, usize) {
    let eocd = zip
        .windows(4)
        .rposition(|w| w == b"PK\x05\x06")
        .expect("no end of central directory record");
    let count = u16_at(zip, eocd + 10);
    let mut at = u32_at(zip, eocd + 16);
    for _ in 0..count {
        assert_eq!(&zip[at..at + 4], b"PK\x01\x02", "central record expected at {at}");
        let (n, x, c) = (u16_at(zip, at + 28), u16_at(zip, at + 30), u16_at(zip, at + 32));
        let local = u32_at(zip, at + 42);
        if &zip[at + 46..at + 46 + n] == name.as_bytes() {
            assert_eq!(&zip[local..local + 4], b"PK\x03\x04", "local header expected at {local}");
            assert_eq!(&zip[local + 30..local + 30 + u16_at(zip, local + 26)], name.as_bytes());
            return (local, at);
        }
        at += 46 + n + x + c;
    }
    panic!("no entry {name:?} in the central directory")
}

/// Overwrites one 32-bit field of entry `name` in both its local header and its central record,
/// so the two stay consistent with each other and only disagree with the data.
fn patch_u32(zip: &mut [u8], name: &str, local_field: usize, central_field: usize, value: u32) {
    let (local, central) = headers_of(zip, name);
    zip[local + local_field..local + local_field + 4].copy_from_slice(&value.to_le_bytes());
    zip[central + central_field..central + central_field + 4].copy_from_slice(&value.to_le_bytes());
}

/// Renames an entry in place (same length), in its local header and its central record.
fn rename_entry(zip: &mut [u8], from: &str, to: &str) {
    assert_eq!(from.len(), to.len(), "same-length names only");
    let hits: Vec<usize> = zip
        .windows(from.len())
        .enumerate()
        .filter(|(_, w)| *w == from.as_bytes())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        hits.len(),
        2,
        "{from:?} must appear exactly in the local header and the central record"
    );
    for i in hits {
        zip[i..i + to.len()].copy_from_slice(to.as_bytes());
    }
}

/// Checks that a lenient reader (the zip crate without header validation) can open the archive,
/// so the hostile package is damaged only in the way the test means.
fn assert_zip_opens(zip: &[u8]) {
    zip::ZipArchive::new(std::io::Cursor::new(zip.to_vec()))
        .expect("the crafted archive should still parse as a ZIP");
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

const DOS_TIME: u16 = 0;
const DOS_DATE: u16 = (1 << 5) | 1; // 1980-01-01

/// A Stored local file header followed by the name and the data.
fn local_entry(name: &str, data: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(b"PK\x03\x04");
    h.extend_from_slice(&20u16.to_le_bytes()); // version needed
    h.extend_from_slice(&0u16.to_le_bytes()); // flags
    h.extend_from_slice(&0u16.to_le_bytes()); // method: stored
    h.extend_from_slice(&DOS_TIME.to_le_bytes());
    h.extend_from_slice(&DOS_DATE.to_le_bytes());
    h.extend_from_slice(&crc32(data).to_le_bytes());
    h.extend_from_slice(&(data.len() as u32).to_le_bytes());
    h.extend_from_slice(&(data.len() as u32).to_le_bytes());
    h.extend_from_slice(&(name.len() as u16).to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes()); // extra length
    h.extend_from_slice(name.as_bytes());
    h.extend_from_slice(data);
    h
}

/// A ZIP assembled by hand: `body` (local entries) as is, then one central record per
/// `(name, data, local header offset)`, then the end record. Nothing stops two records from
/// pointing into the same bytes.
fn hand_zip(body: &[u8], central: &[(&str, &[u8], usize)]) -> Vec<u8> {
    let mut z = body.to_vec();
    let cd_start = z.len();
    for (name, data, offset) in central {
        z.extend_from_slice(b"PK\x01\x02");
        z.extend_from_slice(&((3u16 << 8) | 0x14).to_le_bytes()); // made by: Unix, zip 2.0
        z.extend_from_slice(&20u16.to_le_bytes());
        z.extend_from_slice(&0u16.to_le_bytes());
        z.extend_from_slice(&0u16.to_le_bytes());
        z.extend_from_slice(&DOS_TIME.to_le_bytes());
        z.extend_from_slice(&DOS_DATE.to_le_bytes());
        z.extend_from_slice(&crc32(data).to_le_bytes());
        z.extend_from_slice(&(data.len() as u32).to_le_bytes());
        z.extend_from_slice(&(data.len() as u32).to_le_bytes());
        z.extend_from_slice(&(name.len() as u16).to_le_bytes());
        z.extend_from_slice(&0u16.to_le_bytes()); // extra
        z.extend_from_slice(&0u16.to_le_bytes()); // comment
        z.extend_from_slice(&0u16.to_le_bytes()); // disk
        z.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
        z.extend_from_slice(&(0o100_644_u32 << 16).to_le_bytes()); // regular file, 0644
        z.extend_from_slice(&(*offset as u32).to_le_bytes());
        z.extend_from_slice(name.as_bytes());
    }
    let cd_size = z.len() - cd_start;
    z.extend_from_slice(b"PK\x05\x06");
    z.extend_from_slice(&0u16.to_le_bytes());
    z.extend_from_slice(&0u16.to_le_bytes());
    z.extend_from_slice(&(central.len() as u16).to_le_bytes());
    z.extend_from_slice(&(central.len() as u16).to_le_bytes());
    z.extend_from_slice(&(cd_size as u32).to_le_bytes());
    z.extend_from_slice(&(cd_start as u32).to_le_bytes());
    z.extend_from_slice(&0u16.to_le_bytes());
    z
}

/// A plain hand-assembled package: manifest + `payload/tool`.
fn hand_package(manifest: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = local_entry("manifest.json", manifest.as_bytes());
    let payload_at = body.len();
    body.extend(local_entry("payload/tool", payload));
    hand_zip(
        &body,
        &[("manifest.json", manifest.as_bytes(), 0), ("payload/tool", payload, payload_at)],
    )
}

// ---- control: the builders make packages the engine accepts ----

#[test]
fn untampered_packages_from_the_same_builders_install() {
    type Builder = fn(&str, &[u8]) -> Vec<u8>;
    let builders: [(&str, Builder); 3] = [
        ("deflate", |m, p| {
            zip_with(&[Entry::File("manifest.json", m.as_bytes()), Entry::File("payload/tool", p)])
        }),
        ("stored", |m, p| stored_zip(&[("manifest.json", m.as_bytes()), ("payload/tool", p)])),
        ("by hand", hand_package),
    ];
    for (what, build) in builders {
        let env = device("");
        let pkg = save(&env, "good.zip", &build(&tool_manifest(&env, "1.0.0"), NEW_TOOL));
        let out = env.run(&["install", &pkg]);
        assert_eq!(
            out.code,
            Some(0),
            "{what}: a well-formed package must install\n{}",
            out.describe()
        );
        assert_eq!(env.read(TOOL).as_deref(), Some(NEW_TOOL), "{what}");
    }
}

// ---- the container ----

#[test]
fn entries_with_parent_dir_components_are_rejected_and_nothing_changes() {
    let env = device("");
    for (i, evil) in
        ["../evil", "a/../../evil", "payload/../../../evil", "payload/.."].iter().enumerate()
    {
        let m = tool_manifest(&env, "1.0.0");
        let zip = zip_with(&[
            Entry::File("manifest.json", m.as_bytes()),
            Entry::File("payload/tool", NEW_TOOL),
            Entry::File(evil, b"pwned"),
        ]);
        let pkg = save(&env, &format!("dotdot-{i}.zip"), &zip);
        assert_install_rejected(&env, &pkg, "INVALID_PACKAGE");
        assert!(
            !env.tmp.path().join("evil").exists()
                && !env.tmp.path().parent().unwrap().join("evil").exists(),
            "{evil}"
        );
    }
}

#[test]
fn absolute_entry_name_is_rejected_and_nothing_changes() {
    let env = device("");
    let m = tool_manifest(&env, "1.0.0");
    let mut zip = zip_with(&[
        Entry::File("manifest.json", m.as_bytes()),
        Entry::File("payload/tool", NEW_TOOL),
        Entry::File("Xetc/evil", b"pwned"),
    ]);
    rename_entry(&mut zip, "Xetc/evil", "/etc/evil");
    assert_zip_opens(&zip);
    let pkg = save(&env, "absolute.zip", &zip);
    assert_install_rejected(&env, &pkg, "INVALID_PACKAGE");
}

#[test]
fn symlink_entry_is_rejected_even_when_no_module_uses_it() {
    let env = device("");
    let m = tool_manifest(&env, "1.0.0");
    for (i, (name, target)) in
        [("payload/link", "/etc/passwd"), ("payload/tool", "/etc/shadow")].iter().enumerate()
    {
        // First: an unreferenced symlink beside a good payload; second: the module's src itself.
        let mut entries = vec![Entry::File("manifest.json", m.as_bytes())];
        if *name != "payload/tool" {
            entries.push(Entry::File("payload/tool", NEW_TOOL));
        }
        entries.push(Entry::Symlink(name, target));
        let pkg = save(&env, &format!("symlink-{i}.zip"), &zip_with(&entries));
        assert_install_rejected(&env, &pkg, "INVALID_PACKAGE");
    }
}

#[test]
fn duplicate_entry_names_are_rejected_and_nothing_changes() {
    let env = device("");
    let m = tool_manifest(&env, "1.0.0");
    let mut zip = stored_zip(&[
        ("manifest.json", m.as_bytes()),
        ("payload/tool", NEW_TOOL),
        ("payload/toox", b"the other twin\n"),
    ]);
    rename_entry(&mut zip, "payload/toox", "payload/tool");
    assert_zip_opens(&zip);
    let pkg = save(&env, "duplicate.zip", &zip);
    assert_install_rejected(&env, &pkg, "INVALID_PACKAGE");
}

#[test]
fn two_manifests_under_one_name_are_rejected() {
    let env = device("");
    let first = tool_manifest(&env, "1.0.0");
    let second = manifest("1.0.0", &[("tool", "payload/tool", &env.dst("app/etc/app.conf"))]);
    let mut zip = stored_zip(&[
        ("manifest.json", first.as_bytes()),
        ("manifest.jsoX", second.as_bytes()),
        ("payload/tool", NEW_TOOL),
    ]);
    rename_entry(&mut zip, "manifest.jsoX", "manifest.json");
    assert_zip_opens(&zip);
    let pkg = save(&env, "two-manifests.zip", &zip);
    assert_install_rejected(&env, &pkg, "INVALID_PACKAGE");
}

/// A Stored payload of 1000 bytes whose declared uncompressed size says `declared`.
fn misdeclared_size_package(env: &Env, declared: u32) -> String {
    let payload = noise(b"payload", 1000);
    let m = tool_manifest(env, "1.0.0");
    let mut zip = stored_zip(&[("manifest.json", m.as_bytes()), ("payload/tool", &payload)]);
    patch_u32(&mut zip, "payload/tool", LOCAL_UNCOMPRESSED, CENTRAL_UNCOMPRESSED, declared);
    assert_zip_opens(&zip);
    save(env, &format!("size-{declared}.zip"), &zip)
}

#[test]
fn entry_longer_than_its_declared_size_is_rejected_and_nothing_changes() {
    let env = device("");
    let pkg = misdeclared_size_package(&env, 500);
    assert_install_rejected(&env, &pkg, "INVALID_PACKAGE");
}

#[test]
fn entry_shorter_than_its_declared_size_is_rejected_and_nothing_changes() {
    let env = device("");
    let pkg = misdeclared_size_package(&env, 1500);
    assert_install_rejected(&env, &pkg, "INVALID_PACKAGE");
}

#[test]
fn entry_with_a_corrupted_crc_is_rejected_and_nothing_changes() {
    let env = device("");
    let m = tool_manifest(&env, "1.0.0");
    let mut zip = stored_zip(&[("manifest.json", m.as_bytes()), ("payload/tool", NEW_TOOL)]);
    patch_u32(&mut zip, "payload/tool", LOCAL_CRC, CENTRAL_CRC, crc32(NEW_TOOL) ^ 0x0100_0001);
    assert_zip_opens(&zip);
    let pkg = save(&env, "crc.zip", &zip);
    assert_install_rejected(&env, &pkg, "INVALID_PACKAGE");
}

#[test]
fn zip_bomb_by_compression_ratio_is_rejected() {
    let env = device("max_compression_ratio = 100");
    let zeros = vec![0u8; 4 * 1024 * 1024];
    let m = tool_manifest(&env, "1.0.0");
    let zip = zip_with(&[
        Entry::File("manifest.json", m.as_bytes()),
        Entry::File("payload/tool", &zeros),
    ]);
    assert!(
        zip.len() * 100 < zeros.len(),
        "the bomb should compress more than 100:1 ({} bytes)",
        zip.len()
    );
    let pkg = save(&env, "ratio-bomb.zip", &zip);
    assert_install_rejected(&env, &pkg, "INVALID_PACKAGE");
}

#[test]
fn package_unpacking_beyond_max_unpacked_bytes_is_rejected() {
    let env = device("max_unpacked_bytes = 4096");
    let m = tool_manifest(&env, "1.0.0");
    let payload = noise(b"big", 8192);
    let zip = zip_with(&[
        Entry::File("manifest.json", m.as_bytes()),
        Entry::File("payload/tool", &payload),
    ]);
    let pkg = save(&env, "too-big-unpacked.zip", &zip);
    assert_install_rejected(&env, &pkg, "INVALID_PACKAGE");
}

#[test]
fn package_larger_than_max_package_bytes_is_rejected() {
    let env = device("max_package_bytes = 256");
    let m = tool_manifest(&env, "1.0.0");
    let zip = zip_with(&[
        Entry::File("manifest.json", m.as_bytes()),
        Entry::File("payload/tool", NEW_TOOL),
    ]);
    assert!(zip.len() > 256, "the package must exceed the limit ({} bytes)", zip.len());
    let pkg = save(&env, "too-big.zip", &zip);
    assert_install_rejected(&env, &pkg, "INVALID_PACKAGE");
}

fn good_zip(env: &Env) -> Vec<u8> {
    let m = tool_manifest(env, "1.0.0");
    zip_with(&[
        Entry::File("manifest.json", m.as_bytes()),
        Entry::File("payload/tool", &noise(b"tool", 5000)),
    ])
}

#[test]
fn archive_cut_in_half_is_rejected_and_nothing_changes() {
    let env = device("");
    let zip = good_zip(&env);
    let pkg = save(&env, "half.zip", &zip[..zip.len() / 2]);
    assert_install_rejected(&env, &pkg, "INVALID_PACKAGE");
}

#[test]
fn archive_missing_its_last_bytes_is_rejected_and_nothing_changes() {
    let env = device("");
    let zip = good_zip(&env);
    for cut in [1, 2, 10, 21, 22, 23, 60] {
        let pkg = save(&env, &format!("cut-{cut}.zip"), &zip[..zip.len() - cut]);
        assert_install_rejected(&env, &pkg, "INVALID_PACKAGE");
    }
}

#[test]
fn file_that_is_not_a_zip_is_rejected() {
    let env = device("");
    let cases: [(&str, Vec<u8>); 3] = [
        ("text", b"{\"version\":\"1.0.0\"}\nthis is not a zip\n".to_vec()),
        ("empty", Vec::new()),
        ("noise", noise(b"not a zip", 4096)),
    ];
    for (what, bytes) in cases {
        let pkg = save(&env, &format!("not-a-zip-{what}.zip"), &bytes);
        assert_install_rejected(&env, &pkg, "INVALID_PACKAGE");
    }
}

// ---- the manifest ----

#[test]
fn package_without_manifest_is_rejected_as_invalid_manifest() {
    let env = device("");
    let m = tool_manifest(&env, "1.0.0");
    // A manifest in a subdirectory, or under another case, is not the manifest.
    let zip = zip_with(&[
        Entry::File("payload/tool", NEW_TOOL),
        Entry::File("sub/manifest.json", m.as_bytes()),
        Entry::File("Manifest.json", m.as_bytes()),
    ]);
    let pkg = save(&env, "no-manifest.zip", &zip);
    assert_install_rejected(&env, &pkg, "INVALID_MANIFEST");
}

#[test]
fn manifest_over_one_mebibyte_is_rejected_as_invalid_manifest() {
    let env = device("");
    // Valid JSON in every other respect; Stored, so the ratio limit plays no part.
    let mut m: serde_json::Value = serde_json::from_str(&tool_manifest(&env, "1.0.0")).unwrap();
    m["padding"] = serde_json::Value::String(blake3_hex(b"x").repeat(1024 * 1024 / 64 + 1));
    let m = m.to_string();
    assert!(m.len() > 1024 * 1024);
    let pkg = save(
        &env,
        "big-manifest.zip",
        &stored_zip(&[("manifest.json", m.as_bytes()), ("payload/tool", NEW_TOOL)]),
    );
    assert_install_rejected(&env, &pkg, "INVALID_MANIFEST");
}

#[test]
fn non_utf8_manifest_is_rejected_as_invalid_manifest() {
    let env = device("");
    let m = tool_manifest(&env, "1.0.0").replace("\"tool\"", "\"to\u{1}ol\"");
    let bytes: Vec<u8> = m.bytes().map(|b| if b == 1 { 0xff } else { b }).collect();
    assert!(std::str::from_utf8(&bytes).is_err());
    let pkg = save(
        &env,
        "latin1.zip",
        &stored_zip(&[("manifest.json", &bytes), ("payload/tool", NEW_TOOL)]),
    );
    assert_install_rejected(&env, &pkg, "INVALID_MANIFEST");
}

#[test]
fn json_nesting_bomb_in_the_manifest_is_rejected_without_crashing() {
    let env = device("");
    let good = tool_manifest(&env, "1.0.0");
    let bomb = format!(
        "{},\"x\":{}{}}}",
        &good[..good.len() - 1],
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    // Stored: 200 KB of brackets would otherwise trip the compression-ratio limit first.
    let pkg = save(
        &env,
        "nesting.zip",
        &stored_zip(&[("manifest.json", bomb.as_bytes()), ("payload/tool", NEW_TOOL)]),
    );
    assert_install_rejected(&env, &pkg, "INVALID_MANIFEST");
}

#[test]
fn malformed_version_string_is_rejected_as_invalid_manifest() {
    let env = device("");
    for (i, v) in
        ["1.0", "v1.0.0", "1.0.0-rc1", "1.0.0.0", "", " 1.0.0", "1.a.0"].iter().enumerate()
    {
        let m = tool_manifest(&env, v);
        let zip = zip_with(&[
            Entry::File("manifest.json", m.as_bytes()),
            Entry::File("payload/tool", NEW_TOOL),
        ]);
        let pkg = save(&env, &format!("version-{i}.zip"), &zip);
        assert_install_rejected(&env, &pkg, "INVALID_MANIFEST");
    }
}

#[test]
fn manifest_with_no_modules_is_rejected_as_invalid_manifest() {
    let env = device("");
    let m = manifest("1.0.0", &[]);
    let pkg = save(
        &env,
        "empty.zip",
        &zip_with(&[
            Entry::File("manifest.json", m.as_bytes()),
            Entry::File("payload/tool", NEW_TOOL),
        ]),
    );
    assert_install_rejected(&env, &pkg, "INVALID_MANIFEST");
}

#[test]
fn duplicate_module_names_are_rejected_as_invalid_manifest() {
    let env = device("");
    let m = manifest(
        "1.0.0",
        &[
            ("tool", "payload/tool", &env.dst(TOOL)),
            ("tool", "payload/other", &env.dst("app/bin/other")),
        ],
    );
    let zip = zip_with(&[
        Entry::File("manifest.json", m.as_bytes()),
        Entry::File("payload/tool", NEW_TOOL),
        Entry::File("payload/other", b"other\n"),
    ]);
    let pkg = save(&env, "dup-modules.zip", &zip);
    assert_install_rejected(&env, &pkg, "INVALID_MANIFEST");
}

#[test]
fn module_src_missing_from_the_zip_is_rejected_as_invalid_package() {
    let env = device("");
    let m = manifest(
        "1.0.0",
        &[
            ("tool", "payload/tool", &env.dst(TOOL)),
            ("ghost", "payload/ghost", &env.dst("app/bin/ghost")),
        ],
    );
    let zip = zip_with(&[
        Entry::File("manifest.json", m.as_bytes()),
        Entry::File("payload/tool", NEW_TOOL),
    ]);
    let pkg = save(&env, "missing-src.zip", &zip);
    assert_install_rejected(&env, &pkg, "INVALID_PACKAGE");
}

// ---- destinations ----

/// A package with a good module for `TOOL` and a second module deploying to `dst`.
fn package_with_dst(env: &Env, name: &str, dst: &str) -> String {
    let m = manifest(
        "1.0.0",
        &[("tool", "payload/tool", &env.dst(TOOL)), ("evil", "payload/evil", dst)],
    );
    let zip = zip_with(&[
        Entry::File("manifest.json", m.as_bytes()),
        Entry::File("payload/tool", NEW_TOOL),
        Entry::File("payload/evil", b"pwned\n"),
    ]);
    save(env, name, &zip)
}

#[test]
fn dst_outside_the_allowed_roots_is_rejected() {
    let env = device("");
    let outside = env.tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let root = env.root.to_str().unwrap();
    // A sibling directory, a name sharing the root's string prefix, and the root itself.
    let dsts = [
        outside.join("evil").to_str().unwrap().to_string(),
        format!("{root}kit/evil"),
        root.to_string(),
    ];
    for (i, dst) in dsts.iter().enumerate() {
        let pkg = package_with_dst(&env, &format!("outside-{i}.zip"), dst);
        assert_install_rejected(&env, &pkg, "PATH_NOT_ALLOWED");
    }
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    assert!(!std::path::Path::new(&format!("{root}kit")).exists());
}

#[test]
fn relative_dst_is_rejected() {
    let env = device("");
    for (i, dst) in [TOOL, "./app/bin/tool", "", "app"].iter().enumerate() {
        let pkg = package_with_dst(&env, &format!("relative-{i}.zip"), dst);
        assert_install_rejected(&env, &pkg, "PATH_NOT_ALLOWED");
    }
}

#[test]
fn dst_with_dot_or_dot_dot_components_is_rejected() {
    let env = device("");
    // Both stay inside the root after normalisation, and both are refused anyway.
    for (i, dst) in
        [env.dst("app/../app/bin/new"), env.dst("app/bin/../../app/evil"), env.dst("app/./bin/new")]
            .iter()
            .enumerate()
    {
        let pkg = package_with_dst(&env, &format!("dotdot-dst-{i}.zip"), dst);
        assert_install_rejected(&env, &pkg, "PATH_NOT_ALLOWED");
    }
}

#[test]
fn dst_with_empty_component_is_rejected() {
    let env = device("");
    for (i, dst) in
        [env.dst("app//bin/new"), env.dst("app/bin/new/"), format!("/{}", env.dst("app/bin/new"))]
            .iter()
            .enumerate()
    {
        let pkg = package_with_dst(&env, &format!("slashes-{i}.zip"), dst);
        assert_install_rejected(&env, &pkg, "PATH_NOT_ALLOWED");
    }
}

#[test]
fn dst_with_nul_is_rejected() {
    let env = device("");
    let pkg = package_with_dst(&env, "nul.zip", &env.dst("app/bin/new\0.so"));
    assert_install_rejected(&env, &pkg, "PATH_NOT_ALLOWED");
}

#[test]
fn dst_through_a_symlink_leaving_the_root_is_rejected() {
    let env = device("");
    let outside = env.tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, env.path("app/escape")).unwrap();
    std::os::unix::fs::symlink("../outside", env.path("escape-relative")).unwrap();
    for (i, dst) in [
        env.dst("app/escape/evil"),
        env.dst("escape-relative/evil"),
        env.dst("app/escape/sub/evil"),
    ]
    .iter()
    .enumerate()
    {
        let pkg = package_with_dst(&env, &format!("escape-{i}.zip"), dst);
        assert_install_rejected(&env, &pkg, "PATH_NOT_ALLOWED");
    }
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "something was written outside the root"
    );
}

#[test]
fn dst_through_a_dangling_symlink_leaving_the_root_is_rejected() {
    // The symlink's target does not exist (yet): the path still resolves out of the root, and
    // must not be mistaken for a directory the transaction may create.
    let env = device("");
    let nowhere = env.tmp.path().join("nowhere");
    std::os::unix::fs::symlink(&nowhere, env.path("app/dangling")).unwrap();
    let pkg = package_with_dst(&env, "dangling.zip", &env.dst("app/dangling/evil"));
    assert_install_rejected(&env, &pkg, "PATH_NOT_ALLOWED");
    assert!(!nowhere.exists(), "something was created outside the root");
}

#[test]
fn dst_that_is_an_existing_directory_is_rejected() {
    let env = device("");
    for (i, dst) in [env.dst("app/bin"), env.dst("app/empty")].iter().enumerate() {
        let pkg = package_with_dst(&env, &format!("dir-{i}.zip"), dst);
        assert_install_rejected(&env, &pkg, "PATH_NOT_ALLOWED");
    }
}

#[test]
fn dst_that_is_an_existing_symlink_is_rejected() {
    let env = device("");
    let outside = env.tmp.path().join("outside-file");
    std::fs::write(&outside, b"outside\n").unwrap();
    // One symlink that stays inside the root, one that points out of it, one dangling.
    std::os::unix::fs::symlink("tool", env.path("app/bin/tool-link")).unwrap();
    std::os::unix::fs::symlink(&outside, env.path("app/bin/out-link")).unwrap();
    std::os::unix::fs::symlink(env.tmp.path().join("nowhere"), env.path("app/bin/dangling-link"))
        .unwrap();
    for (i, dst) in [
        env.dst("app/bin/tool-link"),
        env.dst("app/bin/out-link"),
        env.dst("app/bin/dangling-link"),
    ]
    .iter()
    .enumerate()
    {
        let pkg = package_with_dst(&env, &format!("link-{i}.zip"), dst);
        assert_install_rejected(&env, &pkg, "PATH_NOT_ALLOWED");
    }
    assert_eq!(std::fs::read(&outside).unwrap(), b"outside\n");
    assert!(!env.tmp.path().join("nowhere").exists());
}

// ---- content hashes ----

#[test]
fn module_content_not_matching_its_blake3_is_rejected_and_no_module_is_deployed() {
    let env = device("");
    let lib = noise(b"lib", 20_000);
    let bad = b"not what the manifest promised\n";
    // Targets are staged in path order: the two good files (one overwriting TOOL, one in a new
    // directory) are staged before the bad one (in another new directory) fails its hash.
    let m = serde_json::json!({
        "version": "1.0.0",
        "modules": [
            {
                "name": "tool",
                "src": "payload/tool",
                "dst": env.dst(TOOL),
                "blake3": blake3_hex(NEW_TOOL),
            },
            {
                "name": "lib",
                "src": "payload/lib.so",
                "dst": env.dst("app/lib/lib.so"),
                "blake3": blake3_hex(&lib),
            },
            {
                "name": "bad",
                "src": "payload/bad",
                "dst": env.dst("app/zz/bad"),
                "blake3": blake3_hex(b"something else"),
            },
        ]
    })
    .to_string();
    let zip = zip_with(&[
        Entry::File("manifest.json", m.as_bytes()),
        Entry::File("payload/tool", NEW_TOOL),
        Entry::File("payload/lib.so", &lib),
        Entry::File("payload/bad", bad),
    ]);
    let pkg = save(&env, "hash.zip", &zip);
    assert_install_rejected(&env, &pkg, "HASH_MISMATCH");
    assert_eq!(env.read(TOOL).as_deref(), Some(TOOL_OLD));
    assert!(
        !env.path("app/lib").exists() && !env.path("app/zz").exists(),
        "directories created for staging were left"
    );
}

/// A pinned Stored entry over 4 MiB is staged by pieces read straight from the package (not
/// through the ZIP crate's reader). Its declared sizes, compressed and uncompressed alike (so
/// the entry stays self-consistent), claim 4 KiB less or more than it holds: less deploys a
/// prefix, which its pinned hash refuses; more reaches into the next headers, which the
/// archive checks refuse before staging starts.
#[test]
fn a_large_pinned_stored_entry_claiming_another_size_is_rejected_and_nothing_changes() {
    for (delta, code) in [(-4096i64, "HASH_MISMATCH"), (4096, "INVALID_PACKAGE")] {
        let env = device("");
        let payload = noise(b"large", 5 * 1024 * 1024 + 17);
        let m = serde_json::json!({
            "version": "1.0.0",
            "modules": [{
                "name": "tool",
                "src": "payload/tool",
                "dst": env.dst(TOOL),
                "blake3": blake3_hex(&payload),
            }],
        })
        .to_string();
        let mut zip = stored_zip(&[("manifest.json", m.as_bytes()), ("payload/tool", &payload)]);
        let declared = u32::try_from(payload.len() as i64 + delta).unwrap();
        patch_u32(&mut zip, "payload/tool", LOCAL_UNCOMPRESSED, CENTRAL_UNCOMPRESSED, declared);
        patch_u32(&mut zip, "payload/tool", LOCAL_COMPRESSED, CENTRAL_COMPRESSED, declared);
        let pkg = save(&env, &format!("large{delta}.zip"), &zip);
        assert_install_rejected(&env, &pkg, code);
        assert_eq!(env.read(TOOL).as_deref(), Some(TOOL_OLD), "delta {delta}");
    }
}

// ---- versions and compatibility ----

#[test]
fn version_other_than_the_one_asked_for_is_rejected() {
    let env = device("");
    let pkg = save(&env, "v1.zip", &good_zip(&env));
    assert_rejected(&env, &["install", &pkg, "--version", "9.9.9"], "VERSION_MISMATCH", None);
}

fn compatible_package(env: &Env) -> String {
    let mut m: serde_json::Value = serde_json::from_str(&tool_manifest(env, "1.0.0")).unwrap();
    m["compatible"] = "printer-x1".into();
    let m = m.to_string();
    save(
        env,
        "compatible.zip",
        &zip_with(&[
            Entry::File("manifest.json", m.as_bytes()),
            Entry::File("payload/tool", NEW_TOOL),
        ]),
    )
}

#[test]
fn package_for_a_device_model_is_incompatible_when_none_is_configured() {
    let env = device("");
    let pkg = compatible_package(&env);
    assert_install_rejected(&env, &pkg, "INCOMPATIBLE");
}

#[test]
fn package_for_another_device_model_is_incompatible() {
    let env = device("compatible = \"printer-y2\"");
    let pkg = compatible_package(&env);
    assert_install_rejected(&env, &pkg, "INCOMPATIBLE");
}

#[test]
fn downgrade_is_refused_without_allow_downgrade_and_allowed_with_it() {
    let env = device("");
    let v2 = b"#!/bin/sh\necho tool 2.0.0\n";
    let v1 = b"#!/bin/sh\necho tool 1.0.0\n";
    let build = |version: &str, content: &[u8]| {
        let m = tool_manifest(&env, version);
        save(
            &env,
            &format!("{version}.zip"),
            &zip_with(&[
                Entry::File("manifest.json", m.as_bytes()),
                Entry::File("payload/tool", content),
            ]),
        )
    };
    let pkg2 = build("2.0.0", v2);
    let pkg1 = build("1.0.0", v1);
    env.ok(&["install", &pkg2]);
    assert_eq!(env.read(TOOL).as_deref(), Some(&v2[..]));

    assert_rejected(&env, &["install", &pkg1], "VERSION_MISMATCH", Some("2.0.0"));
    assert_eq!(env.read(TOOL).as_deref(), Some(&v2[..]));

    env.ok(&["install", &pkg1, "--allow-downgrade"]);
    assert_eq!(env.read(TOOL).as_deref(), Some(&v1[..]));
    let s = env.run(&["--json", "status"]).json();
    assert_eq!(s["current"]["version"], "1.0.0", "{s}");
}

// ---- overlapping entries ----

#[test]
fn entry_hidden_inside_another_entrys_data_is_rejected() {
    // A "non-quoted overlap": the Stored data of payload/outer is itself a complete local
    // header + data for payload/tool, and a second central record points into it. Every name
    // and size is consistent; only the byte ranges overlap.
    let env = device("");
    let m = tool_manifest(&env, "1.0.0");
    let inner = local_entry("payload/tool", NEW_TOOL);
    let mut body = local_entry("manifest.json", m.as_bytes());
    let outer_at = body.len();
    body.extend(local_entry("payload/outer", &inner));
    let inner_at = outer_at + 30 + "payload/outer".len();
    let zip = hand_zip(
        &body,
        &[
            ("manifest.json", m.as_bytes(), 0),
            ("payload/outer", &inner, outer_at),
            ("payload/tool", NEW_TOOL, inner_at),
        ],
    );
    // A naive reader would happily extract payload/tool from inside payload/outer.
    let mut a = zip::ZipArchive::new(std::io::Cursor::new(zip.clone())).unwrap();
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut a.by_name("payload/tool").unwrap(), &mut got).unwrap();
    assert_eq!(got, NEW_TOOL);
    let pkg = save(&env, "overlap.zip", &zip);
    assert_install_rejected(&env, &pkg, "INVALID_PACKAGE");
}

#[test]
fn two_central_records_for_one_local_header_are_rejected() {
    let env = device("");
    let m = manifest(
        "1.0.0",
        &[
            ("tool", "payload/tool", &env.dst(TOOL)),
            ("twin", "payload/twin", &env.dst("app/bin/twin")),
        ],
    );
    let mut body = local_entry("manifest.json", m.as_bytes());
    let tool_at = body.len();
    body.extend(local_entry("payload/tool", NEW_TOOL));
    let zip = hand_zip(
        &body,
        &[
            ("manifest.json", m.as_bytes(), 0),
            ("payload/tool", NEW_TOOL, tool_at),
            ("payload/twin", NEW_TOOL, tool_at),
        ],
    );
    assert_zip_opens(&zip);
    let pkg = save(&env, "twin-records.zip", &zip);
    assert_install_rejected(&env, &pkg, "INVALID_PACKAGE");
}

// ---- a package changed after validation ----

/// Without the crash points these tests do not exist: fail, and say so, rather than pass
/// silently with fewer tests.
#[cfg(not(feature = "failpoints"))]
#[test]
fn package_changed_after_validation_tests_need_the_failpoints_feature() {
    panic!(
        "the package-changed-after-validation tests need the named crash points compiled in: \
         run `cargo test --features failpoints --test it hostile`"
    );
}

/// The package is validated once and then read through the descriptor validation opened, but
/// whoever can write the file can still change it before staging reads it. The install is
/// paused at `enter.Staged` (validated, planned and journaled; nothing staged yet) and the
/// package is cut in half or has 4 KiB of its middle (the payload's data) overwritten in
/// place. Both ways of staging must refuse it with nothing changed: a large pinned Stored
/// entry, staged by pieces read straight from the package (a short read is
/// `INVALID_PACKAGE`, other bytes fail the pinned hash), and a Deflated entry without a
/// pinned hash, streamed through the ZIP reader (the inflater or the CRC refuses it).
#[cfg(feature = "failpoints")]
#[test]
fn a_package_changed_after_validation_is_refused_at_staging_and_nothing_changes() {
    use std::os::unix::fs::FileExt;
    for (pinned, overwrite, code) in [
        (true, false, "INVALID_PACKAGE"),
        (true, true, "HASH_MISMATCH"),
        (false, false, "INVALID_PACKAGE"),
        (false, true, "INVALID_PACKAGE"),
    ] {
        let ctx = format!("pinned {pinned}, overwrite {overwrite}");
        let (env, pkg, len, before, paused) = install_paused_at_staging(pinned);
        let file = std::fs::OpenOptions::new().write(true).open(&pkg).unwrap();
        let middle = len / 2;
        if overwrite {
            file.write_all_at(&noise(b"garbage", 4096), middle).unwrap();
        } else {
            file.set_len(middle).unwrap();
        }
        drop(file);
        let run = paused.finish();
        assert_eq!(
            run.code,
            Some(3),
            "{ctx}: expected exit status 3 (rejected)\n{}",
            run.describe()
        );
        assert_eq!(
            run.error_code().as_deref(),
            Some(code),
            "{ctx}: expected `error: {code}: ...`\n{}",
            run.describe()
        );
        assert_eq!(run.json()["error"]["code"], code, "{ctx}\n{}", run.describe());
        assert_eq!(tree(&env.root), before, "{ctx}: the target tree changed\n{}", run.describe());
        assert_eq!(
            leftovers(&env.root),
            Vec::<String>::new(),
            "{ctx}: temporary files left behind"
        );
        let s = env.run(&["--json", "status"]).json();
        assert!(s["in_flight"].is_null() && s["current"].is_null(), "{ctx}: {s}");
        let history = env.run(&["--json", "history"]).json();
        assert_eq!(history.as_array().map(Vec::len), Some(1), "{ctx}: {history}");
        assert_eq!(history[0]["phase"], "RolledBack", "{ctx}: {history}");
        assert_eq!(history[0]["error"]["code"], code, "{ctx}: {history}");
    }
}

/// A device, a package with one 5 MiB payload (pinned and Stored, or unpinned and Deflated),
/// and its install paused at `enter.Staged`. A pause the test missed (a loaded machine) let
/// the install run on, so each retry starts over on a fresh device with a longer sleep.
/// Returns the device, the package path and length, the tree before, and the paused install.
#[cfg(feature = "failpoints")]
fn install_paused_at_staging(
    pinned: bool,
) -> (Env, String, u64, std::collections::BTreeMap<String, String>, crate::pause::Paused) {
    use crate::pause::{SLEEPS_MS, Spawned, spawn_paused};
    let payload = noise(b"changed later", 5 * 1024 * 1024 + 17);
    for sleep_ms in SLEEPS_MS {
        let env = device("");
        let zip = if pinned {
            let m = serde_json::json!({
                "version": "1.0.0",
                "modules": [{
                    "name": "tool",
                    "src": "payload/tool",
                    "dst": env.dst(TOOL),
                    "blake3": blake3_hex(&payload),
                }],
            })
            .to_string();
            stored_zip(&[("manifest.json", m.as_bytes()), ("payload/tool", &payload)])
        } else {
            let m = tool_manifest(&env, "1.0.0");
            zip_with(&[
                Entry::File("manifest.json", m.as_bytes()),
                Entry::File("payload/tool", &payload),
            ])
        };
        let pkg = save(&env, "changed.zip", &zip);
        let before = tree(&env.root);
        match spawn_paused(
            env.command(&["--json", "install", &pkg]),
            "enter.Staged",
            sleep_ms,
            &env.state,
            env.tmp.path(),
        ) {
            Spawned::Paused(p) => return (env, pkg, zip.len() as u64, before, p),
            Spawned::Exited(r) if sleep_ms == *SLEEPS_MS.last().unwrap() => {
                panic!("the install ended without pausing at enter.Staged:\n{}", r.describe())
            }
            Spawned::Exited(_) | Spawned::Missed => {}
        }
    }
    panic!("the pause at enter.Staged was missed {} times", SLEEPS_MS.len());
}
