//! The fast paths of an install (SPEC §7) keep every guarantee: old-file hashes taken from
//! known-file records only while the file is provably unchanged, large stored entries staged
//! by pieces on both cores and still checked byte for byte, and a pinned package remembered by
//! its identity (manifest and entries) rather than by its ZIP bytes.

use crate::support::*;
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Above `treehash::PIECE_BYTES` (4 MiB), and not a whole number of pieces.
const LARGE: usize = 9 * 1024 * 1024 + 123;

/// A package with one pinned file module per `(name, dst, content)`, every entry stored
/// (uncompressed, as `pack` stores incompressible files), `content_in_zip` overriding what
/// the ZIP holds for a module (a tampered package).
fn stored_package(
    env: &Env,
    file: &str,
    version: &str,
    mods: &[(&str, &str, &[u8])],
    content_in_zip: &[(&str, &[u8])],
) -> PathBuf {
    let modules: Vec<Value> = mods
        .iter()
        .map(|(n, d, c)| {
            json!({
                "name": n,
                "src": format!("m/{n}"),
                "dst": env.dst(d),
                "blake3": blake3_hex(c),
            })
        })
        .collect();
    let manifest = json!({"version": version, "modules": modules}).to_string();
    let path = env.pkg_path(file);
    let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .unix_permissions(0o644);
    z.start_file("manifest.json", opts).unwrap();
    z.write_all(manifest.as_bytes()).unwrap();
    for (n, _, c) in mods {
        let bytes = content_in_zip.iter().find(|(m, _)| m == n).map(|(_, b)| *b).unwrap_or(c);
        z.start_file(format!("m/{n}"), opts).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
    path
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// path → hash of every known-file record.
fn known_files(env: &Env) -> std::collections::BTreeMap<String, String> {
    let r = env.run(&["journal"]);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    r.json()["known_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_str().unwrap().to_string(), e[1]["hash"].as_str().unwrap().to_string()))
        .collect()
}

/// The "old states observed" debug line of an install: (from records, read).
fn observed(r: &Run) -> (u64, u64) {
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("old states observed"))
        .unwrap_or_else(|| panic!("no observation line:\n{}", r.describe()));
    let field = |k: &str| {
        line.split(&format!("{k}="))
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap()
    };
    (field("from_records"), field("read"))
}

#[test]
fn an_update_takes_old_hashes_from_known_files_and_reads_again_a_file_changed_since_even_with_its_mtime_put_back()
 {
    let env = Env::new();
    let mut rng = XorShift::new(0x5eed_0001);
    let (big1, big2) = (rng.bytes(LARGE), rng.bytes(LARGE));
    env.put("img", &rng.bytes(1000), 0o644);
    env.put("conf", b"factory conf\n", 0o644);
    env.put("bin", b"factory bin\n", 0o755);
    let t0 = tree(&env.root);
    let v1 = stored_package(
        &env,
        "v1.zip",
        "1.0.0",
        &[("img", "img", &big1), ("conf", "conf", b"conf v1\n"), ("bin", "bin", b"bin v1\n")],
        &[],
    );
    let v2 = stored_package(
        &env,
        "v2.zip",
        "2.0.0",
        &[("img", "img", &big2), ("conf", "conf", b"conf v2\n"), ("bin", "bin", b"bin v2\n")],
        &[],
    );

    // The first install reads every old file (nothing is known yet) and records what its
    // verification read.
    let r = env.run(&["--log-level", "debug", "install", p(&v1)]);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    assert_eq!(observed(&r), (0, 3));
    let known = known_files(&env);
    assert_eq!(known.get(&env.dst("img")), Some(&blake3_hex(&big1)), "{known:?}");
    assert_eq!(known.get(&env.dst("conf")), Some(&blake3_hex(b"conf v1\n")));
    assert_eq!(known.get(&env.dst("bin")), Some(&blake3_hex(b"bin v1\n")));

    // Someone rewrites conf in place: same length, and its mtime put back. Only the ctime
    // (which no call can set) tells; the record must not vouch for it.
    let conf = env.path("conf");
    let mtime = std::fs::metadata(&conf).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let f = std::fs::OpenOptions::new().write(true).open(&conf).unwrap();
    (&f).write_all(b"CONF v1\n").unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    assert_eq!(std::fs::metadata(&conf).unwrap().modified().unwrap(), mtime);

    // Stopped right after the commit, before the collection: the backups are all there.
    let r: Run = env
        .command(&["--log-level", "debug", "install", p(&v2)])
        .env("FAILPOINTS", kill_at("gc.before_unlink", 1))
        .output()
        .unwrap()
        .into();
    assert_eq!(r.signal, Some(9), "killed at gc.before_unlink: {}", r.describe());
    assert_eq!(observed(&r), (2, 1), "img and bin from their records, conf read again");
    assert_eq!(env.read("img").unwrap(), big2);

    // The backup of conf is named by what conf really held. Had the stale record been
    // trusted, the edited inode would sit in the store under the hash of "conf v1".
    let blob =
        |content: &[u8]| std::fs::read(env.state.join("backups").join(blake3_hex(content))).ok();
    assert_eq!(
        blob(b"CONF v1\n").as_deref(),
        Some(&b"CONF v1\n"[..]),
        "the edited content is backed up under its own hash"
    );
    assert_eq!(blob(b"conf v1\n"), None, "no blob claims content it does not hold");
    assert_eq!(
        blob(&big1).map(|b| b == big1),
        Some(true),
        "img, vouched for by its record, is backed up intact"
    );
    // No generation names the edited content, so `recover` collects it; v1's img stays.
    env.ok(&["recover"]);
    assert_eq!(blob(b"CONF v1\n"), None, "an unreferenced blob is collected");
    assert_eq!(blob(&big1).map(|b| b == big1), Some(true), "generation 1's blob stays");
    env.ok(&["verify", "--json"]);
    env.ok(&["rollback", "--to", "factory"]);
    assert_eq!(tree(&env.root), t0, "the factory tree, byte for byte");
}

#[test]
fn a_large_stored_entry_is_staged_by_pieces_exactly_and_one_wrong_byte_in_it_is_hash_mismatch_touching_nothing()
 {
    let env = Env::new();
    let mut rng = XorShift::new(0x5eed_0002);
    let good = rng.bytes(LARGE);
    env.put("img", b"factory image\n", 0o640);
    env.put("small", b"factory small\n", 0o644);
    let t0 = tree(&env.root);

    let mut bad = good.clone();
    bad[LARGE / 2 + 7] ^= 0x40;
    let tampered = stored_package(
        &env,
        "bad.zip",
        "1.0.0",
        &[("img", "img", &good), ("small", "small", b"small v1\n")],
        &[("img", &bad)],
    );
    let r = env.run(&["install", p(&tampered), "--json"]);
    assert_eq!(r.code, Some(3), "{}", r.describe());
    assert_eq!(r.json()["error"]["code"].as_str(), Some("HASH_MISMATCH"), "{}", r.describe());
    assert_eq!(tree(&env.root), t0, "a rejected package touches nothing");
    assert!(leftovers(&env.root).is_empty(), "no staged file is left: {:?}", leftovers(&env.root));

    let ok = stored_package(
        &env,
        "good.zip",
        "1.0.1",
        &[("img", "img", &good), ("small", "small", b"small v1\n")],
        &[],
    );
    env.ok(&["install", p(&ok)]);
    assert_eq!(env.read("img").unwrap(), good, "every piece landed at its offset");
    assert_eq!(std::fs::metadata(env.path("img")).unwrap().len(), LARGE as u64);
    env.ok(&["verify"]);
    env.ok(&["rollback"]);
    assert_eq!(tree(&env.root), t0);
}

#[test]
fn a_failed_pinned_package_is_remembered_by_its_identity_so_a_repacked_copy_is_refused_too() {
    let env = Env::new();
    env.put("a", b"factory a\n", 0o644);
    let t0 = tree(&env.root);
    // The manifest pins content the ZIP does not hold: staging fails, the install rolls back.
    let mods: &[(&str, &str, &[u8])] = &[("a", "a", b"a v1\n")];
    let bad = stored_package(&env, "bad.zip", "1.0.0", mods, &[("a", b"a v1?\n")]);
    let r = env.run(&["install", p(&bad), "--json"]);
    assert_eq!(
        (r.code, r.json()["error"]["code"].as_str()),
        (Some(3), Some("HASH_MISMATCH")),
        "{}",
        r.describe()
    );
    let failed = env.run(&["journal"]).json()["failed_packages"].as_array().unwrap().clone();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_ne!(
        failed[0][0].as_str(),
        Some(blake3_hex(&std::fs::read(&bad).unwrap()).as_str()),
        "a pinned package is not named by its bytes"
    );

    // The same manifest and entries, packed again with deflate: other bytes, same package.
    let repacked = env.pkg_path("repacked.zip");
    let mut z = zip::ZipWriter::new(std::fs::File::create(&repacked).unwrap());
    let mut src = zip::ZipArchive::new(std::fs::File::open(&bad).unwrap()).unwrap();
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .unix_permissions(0o644);
    for i in 0..src.len() {
        let mut e = src.by_index(i).unwrap();
        let name = e.name().unwrap().to_string();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut bytes).unwrap();
        z.start_file(name, opts).unwrap();
        z.write_all(&bytes).unwrap();
    }
    z.finish().unwrap();
    assert_ne!(std::fs::read(&repacked).unwrap(), std::fs::read(&bad).unwrap());
    let r = env.run(&["install", p(&repacked)]);
    assert_eq!(
        (r.code, r.error_code().as_deref()),
        (Some(3), Some("VALIDATION_ERROR")),
        "{}",
        r.describe()
    );
    assert!(r.stderr.contains("--force"), "{}", r.describe());
    assert_eq!(tree(&env.root), t0);

    // A package with another manifest is another package: it installs.
    let fixed = stored_package(&env, "fixed.zip", "1.0.1", mods, &[]);
    env.ok(&["install", p(&fixed)]);
    assert_eq!(env.read("a").unwrap(), b"a v1\n");
}
