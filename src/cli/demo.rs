//! `tope-updater demo`: the whole story in a temporary root, no privileges, no config file.
//! Version 1 of a small app is on the "device"; version 2 is packed, installed, inspected,
//! rolled back, and the tree is shown to be byte-identical to version 1 again.

use super::render::{Output, short};
use crate::config::{Config, ServiceManager};
use crate::driver::{self, InstallOptions, RollbackTo, Updater};
use crate::error::{Error, ErrorCode, Result};
use crate::journal::Journal;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    let io = |e| Error::io(ErrorCode::InternalError, "write", path, &e);
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new("/"))).map_err(io)?;
    std::fs::write(path, text).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)
}

/// Every file under `dir`: relative path → (blake3, mode).
fn snapshot(dir: &Path) -> Result<BTreeMap<String, (String, u32)>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)
            .map_err(|e| Error::io(ErrorCode::InternalError, "read dir", &d, &e))?
        {
            let e = e.map_err(|e| Error::io(ErrorCode::InternalError, "read dir", &d, &e))?;
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p)
                .map_err(|e| Error::io(ErrorCode::InternalError, "stat", &p, &e))?;
            if meta.is_dir() {
                out.insert(
                    format!("{}/", short(dir, &p)),
                    (String::new(), meta.permissions().mode() & 0o7777),
                );
                stack.push(p);
            } else {
                let h = crate::pack::file_hash(&p)?;
                out.insert(
                    short(dir, &p),
                    (h.to_hex()[..12].to_string(), meta.permissions().mode() & 0o7777),
                );
            }
        }
    }
    Ok(out)
}

fn show_tree(title: &str, tree: &BTreeMap<String, (String, u32)>) {
    println!("{title}");
    for (path, (hash, mode)) in tree {
        if hash.is_empty() {
            println!("    {path}");
        } else {
            println!("    {path:<40} {mode:04o}  blake3 {hash}…");
        }
    }
}

pub fn run(keep: bool, json: bool) -> Result<u8> {
    let root = std::env::temp_dir().join(format!("tope-updater-demo-{}", std::process::id()));
    let result = run_in(&root, json);
    if keep {
        println!("\n(demo root kept at {})", root.display());
    } else {
        let _ = std::fs::remove_dir_all(&root);
    }
    result
}

/// The source tree of version 2 under `root/build` (what a vendor packs).
fn write_version_2(root: &Path) -> Result<std::path::PathBuf> {
    let src = root.join("build/demo-app-2.0.0");
    write(&src.join("manifest.json"), &manifest(root), 0o644)?;
    write(
        &src.join("modules/demo-app/demo-app"),
        "#!/bin/sh\necho 'demo-app 2.0.0, now with a web UI'\n",
        0o755,
    )?;
    write(&src.join("modules/demo-app/demo-app.conf"), "greeting = hello\nweb = on\n", 0o640)?;
    write(&src.join("modules/web/index.html"), "<h1>demo-app 2</h1>\n", 0o644)?;
    write(&src.join("modules/web/js/app.js"), "console.log('v2');\n", 0o644)?;
    Ok(src)
}

fn run_in(root: &Path, json: bool) -> Result<u8> {
    let out = Output { json };
    let app = root.join("opt/tope/demo-app");
    let state = root.join("var/lib/tope-updater");
    let cfg = Config {
        state_dir: state.clone(),
        allowed_roots: vec![root.join("opt/tope")],
        service_manager: ServiceManager::None,
        ..Config::default()
    };
    println!(
        "demo root: {}  (allowed root /opt/tope, state dir /var/lib/tope-updater)\n",
        root.display()
    );

    write(&app.join("bin/demo-app"), "#!/bin/sh\necho 'demo-app 1.0.0'\n", 0o755)?;
    write(&app.join("etc/demo-app.conf"), "greeting = hello\n", 0o640)?;
    let v1 = snapshot(&app)?;
    show_tree("1. version 1 is on the device (nothing installed by tope-updater yet):", &v1);

    let src = write_version_2(root)?;
    let pkg = root.join("build/demo-app-2.0.0.zip");
    println!("\n2. $ tope-updater pack build/demo-app-2.0.0 -o build/demo-app-2.0.0.zip");
    let r = crate::pack::pack(&src, &pkg, None, None, &[])?;
    out.emit(&r, || {
        format!(
            "   packed {} files ({} bytes), version {}, every file hashed into the manifest",
            r.files, r.bytes, r.version
        )
    });

    println!("\n3. $ tope-updater install build/demo-app-2.0.0.zip");
    let installed = Updater::open(cfg.clone())?.install(&pkg, &InstallOptions::default())?;
    out.tx_report(&installed);
    if super::exit_for_report(&installed) != 0 {
        return Ok(super::exit_for_report(&installed));
    }
    show_tree("   the device now holds:", &snapshot(&app)?);

    println!("\n4. $ tope-updater status");
    out.status(&driver::status(&Journal::open(&state)?, cfg.max_trial_boots)?);

    println!("\n5. $ tope-updater rollback");
    let rolled = Updater::open(cfg.clone())?.rollback(&RollbackTo::Previous)?;
    out.tx_report(&rolled);

    println!("\n6. $ tope-updater verify");
    let j = Journal::open(&state)?;
    let v = driver::verify_live(&j)?;
    out.verify(&v);
    println!("\n7. $ tope-updater history");
    out.history(&j.history(10)?);
    drop(j);

    let after = snapshot(&app)?;
    show_tree("\n8. the device after the rollback:", &after);
    let identical = after == v1;
    println!(
        "\n   byte-identical to version 1 (content and modes, created files and directories \
        gone): {}",
        if identical { "yes" } else { "NO" }
    );
    if identical && v.mismatches.is_empty() {
        Ok(0)
    } else {
        Err(Error::internal("the demo's rollback did not restore version 1 exactly"))
    }
}

/// The package manifest; destinations live under the demo root, the demo's stand-in for `/`.
fn manifest(root: &Path) -> String {
    let dst = |p: &str| format!("{}/opt/tope/demo-app/{p}", root.display());
    serde_json::json!({
        "version": "2.0.0",
        "modules": [
            { "name": "demo-app", "src": "modules/demo-app/demo-app", "dst": dst("bin/demo-app"),
              "process_name": null, "restart_order": 1 },
            { "name": "demo-app-conf", "src": "modules/demo-app/demo-app.conf",
              "dst": dst("etc/demo-app.conf") },
            { "name": "web", "src": "modules/web/", "dst": dst("share/web") }
        ]
    })
    .to_string()
}
