//! Drop-in for the Python service where its clients look (issue "Drop-in for real"): black-box
//! tests against the real `serve`, each written from what the old service did and what its
//! clients (`device-api`, the progress GUI) read. See README "Differences from the Python
//! service" for what remains different, and why.
//!
//! Run with `cargo test --features failpoints --test it dropin`.

use crate::daemon::*;
use crate::support::*;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

/// The old GUI: polls `/progress`, reads `data.stage` (a missing `data` or stage reads as
/// `idle`), and exits on `success` or `failed`. Returns the stage it exited on and the `data`
/// it last read; panics if it would never exit.
fn legacy_gui(d: &Daemon) -> (String, Value) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let v = d.get("/api/v1.0/progress");
        let data = v.get("data").cloned().unwrap_or(json!({}));
        let stage = data.get("stage").and_then(Value::as_str).unwrap_or("idle").to_string();
        if stage == "success" || stage == "failed" {
            // The newer Qt GUI needs these, typed, too.
            assert!(data["progress"].is_u64() && data["message"].is_string(), "{v}");
            return (stage, data);
        }
        assert!(Instant::now() < deadline, "the legacy GUI would never exit; last answer {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_legacy_gui_exits_after_a_failed_and_after_a_successful_install() {
    let rig = Rig::new();
    rig.put(FACTORY);
    let bad = build_pkg_with(&rig.env, "1.0.0", &small_modules("1.0.0"), |m| {
        m["modules"][0]["post_cmds"] = json!(["exit 3"]);
    });
    let good = build_pkg(&rig.env, "1.0.1", &small_modules("1.0.1"));
    rig.server.add(&bad);
    rig.server.add(&good);
    let d = rig.start();

    download(&rig, &d, &bad);
    assert_eq!(
        d.post("/api/v1.0/update", &json!({"version": "1.0.0"}).to_string()),
        started("installing")
    );
    let (stage, data) = legacy_gui(&d);
    assert_eq!(stage, "failed", "{data}");
    assert!(
        data["message"]
            .as_str()
            .is_some_and(|e| e.starts_with("DEPLOYMENT_FAILED: POST_CMD_FAILED: ")),
        "{data}"
    );
    // The contract's failed shape stays, with the same values at the root.
    let v = d.get("/api/v1.0/progress");
    assert_eq!(
        (&v["code"], &v["stage"], &v["progress"], &v["msg"]),
        (&json!(500), &json!("failed"), &data["progress"], &data["message"]),
        "{v}"
    );

    download(&rig, &d, &good);
    assert_eq!(
        d.post("/api/v1.0/update", &json!({"version": "1.0.1"}).to_string()),
        started("installing")
    );
    let (stage, data) = legacy_gui(&d);
    assert_eq!(stage, "success", "{data}");
    assert_eq!(rig.env.read("voice-app/voice-app").unwrap(), b"voice-app 1.0.1\n");

    // The newest GUI's goodbye: the result reads as idle at once (result_hold_s is 600 s here).
    assert_eq!(d.progress().stage, "success");
    assert_eq!(
        d.post("/api/v1.0/return-to-system", "{}"),
        json!({"code": 200, "msg": "success", "data": null})
    );
    assert_eq!(d.progress().stage, "idle");
    assert_eq!(
        current_version(&d.status()).as_deref(),
        Some("1.0.1"),
        "the result stays in /status"
    );

    // Every report names the version its job is about, as the Python service's did.
    let reports =
        rig.receiver.wait_for("the success report", |r| r.iter().any(|r| r["stage"] == "success"));
    let versions: Vec<(&str, &str)> = reports
        .iter()
        .map(|r| {
            (
                r["stage"].as_str().unwrap(),
                r["version"].as_str().unwrap_or_else(|| panic!("no version: {r}")),
            )
        })
        .collect();
    let first_good = reports.iter().position(|r| r["version"] == "v1.0.1").unwrap();
    assert!(versions[..first_good].iter().all(|(_, v)| *v == "v1.0.0"), "{versions:?}");
    assert!(versions[first_good..].iter().all(|(_, v)| *v == "v1.0.1"), "{versions:?}");
    assert!(versions[..first_good].iter().any(|(s, _)| *s == "failed"), "{versions:?}");
}

#[test]
fn a_package_size_that_is_not_the_servers_fails_at_once_and_keeps_nothing() {
    let rig = Rig::new();
    let pkg = build_pkg(&rig.env, "1.0.0", &small_modules("1.0.0"));
    rig.server.add(&pkg);
    let d = rig.start();
    let mut req: Value = serde_json::from_str(&rig.request(&pkg)).unwrap();
    req["package_size"] = json!(999_999);
    for attempt in 1..=2 {
        assert_eq!(d.post("/api/v1.0/download", &req.to_string()), started("downloading"));
        let seen = d.watch_after(None, "the download to fail", |s| s.stage == "failed");
        let f = seen.last().unwrap();
        let want = format!(
            "PACKAGE_SIZE_MISMATCH: expected 999999 bytes, but the server's file has {} bytes",
            pkg.bytes.len()
        );
        assert_eq!(
            (f.progress, f.error.as_deref()),
            (0, Some(want.as_str())),
            "attempt {attempt}: {seen:?}"
        );
        // No retry: one GET per request, and each request starts afresh (no Range).
        let hits = rig.server.hits();
        assert_eq!(hits.len(), attempt, "{hits:?}");
        assert!(hits.iter().all(|h| h.range.is_none()), "{hits:?}");
        assert!(!rig.downloaded(&pkg).exists(), "the file is removed");
    }
    let report =
        rig.receiver.wait_for("the failed report", |r| r.iter().any(|r| r["stage"] == "failed"));
    let failed = report.iter().find(|r| r["stage"] == "failed").unwrap();
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .starts_with("PACKAGE_SIZE_MISMATCH: expected 999999 bytes"),
        "{failed}"
    );
    assert_code_is(
        &d.post("/api/v1.0/update", &json!({"version": "1.0.0"}).to_string()),
        409,
        "DOWNLOAD_INCOMPLETE: ",
    );
}

/// A server that sends more than `package_size` (no Content-Length, the body ends at close).
#[test]
fn a_body_longer_than_package_size_is_a_size_mismatch() {
    let rig = Rig::new();
    let d = rig.start();
    let body = vec![7u8; 5000];
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut head = [0u8; 4096];
        let _ = s.read(&mut head);
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/zip\r\nConnection: close\r\n\r\n",
        );
        let _ = s.write_all(&body);
    });
    let req = json!({
        "version": "1.0.0",
        "package_url": format!("http://127.0.0.1:{port}/ota/long.zip"),
        "package_name": "long.zip",
        "package_size": 4000,
        "package_md5": "0123456789abcdef0123456789abcdef",
    });
    assert_eq!(d.post("/api/v1.0/download", &req.to_string()), started("downloading"));
    let seen = d.watch_after(None, "the download to fail", |s| s.stage == "failed");
    let f = seen.last().unwrap();
    assert_eq!(
        f.error.as_deref(),
        Some("PACKAGE_SIZE_MISMATCH: expected 4000 bytes, but the server sent more bytes"),
        "{seen:?}"
    );
    assert!(!rig.env.state.join("downloads/long.zip").exists());
    server.join().unwrap();
}

fn assert_code_is(v: &Value, code: i64, prefix: &str) {
    assert_eq!(v["code"], code, "{v}");
    assert!(v["msg"].as_str().is_some_and(|m| m.starts_with(prefix)), "{v}");
}

#[test]
fn a_dst_through_a_regular_file_is_deployment_failed_and_touches_nothing() {
    let env = Env::new();
    env.put("app", b"a file where the package wants a directory\n", 0o644);
    let before = tree(&env.root);
    let path = env.pkg_path("p.zip");
    write_package(
        &path,
        &manifest("1.0.0", &[("app", "files/bin", &env.dst("app/bin"))]),
        &[("files/bin", b"new\n")],
    );
    let r = env.run(&["install", path.to_str().unwrap()]);
    assert_eq!(
        (r.code, r.error_code().as_deref()),
        (Some(3), Some("DEPLOYMENT_FAILED")),
        "{}",
        r.describe()
    );
    assert!(r.stderr.contains("is not a directory"), "{}", r.describe());
    assert_eq!(tree(&env.root), before);

    // Through the daemon: the code the legacy clients know, not wrapped twice.
    let rig = Rig::new();
    rig.put(&[("app", b"a file\n")]);
    let pkg = build_pkg(
        &rig.env,
        "1.0.0",
        &[Module { name: "app", rel: "app/bin", content: b"new\n".to_vec() }],
    );
    rig.server.add(&pkg);
    let d = rig.start();
    download(&rig, &d, &pkg);
    assert_eq!(
        d.post("/api/v1.0/update", &json!({"version": "1.0.0"}).to_string()),
        started("installing")
    );
    let (stage, data) = legacy_gui(&d);
    assert_eq!(stage, "failed");
    let e = data["message"].as_str().unwrap();
    assert!(
        e.starts_with("DEPLOYMENT_FAILED: destination ") && e.contains("is not a directory"),
        "{data}"
    );
}

#[test]
fn get_root_is_the_health_document() {
    let rig = Rig::new();
    let d = rig.start();
    let v = d.get("/");
    assert_eq!((&v["status"], &v["service"]), (&json!("ok"), &json!("tope-updater")), "{v}");
    assert!(
        v["version"].is_string() && v["features"].as_array().is_some_and(|f| !f.is_empty()),
        "{v}"
    );
}

/// device-api sends its download again after our restart: the download the restart resumed
/// is that download (accepted), never a second one.
#[test]
fn the_same_download_asked_again_after_a_restart_is_the_resumed_one() {
    let rig = Rig::new();
    let pkg = download_pkg(&rig, 19);
    {
        let d = rig.start();
        download_to_half(&rig, &d, &pkg);
        d.sigkill();
    }
    // The next start resumes by itself; the server still holds the body at half.
    let d = rig.start();
    d.watch("the resumed download", |s| s.stage == "downloading");
    assert_eq!(d.post("/api/v1.0/download", &rig.request(&pkg)), started("downloading"));
    rig.server.set(|s| s.gate = None);
    d.wait_stage("toInstall");
    let hits = rig.server.hits();
    assert_eq!(hits.len(), 2, "the first GET and the resume, nothing more: {hits:?}");
    assert!(hits[1].range_start().is_some(), "{hits:?}");
    assert_eq!(std::fs::read(rig.downloaded(&pkg)).unwrap(), pkg.bytes);
}

/// The server's file changed size between a cut and the resume: its `Content-Range` total is
/// not `package_size`, so the resumed download fails at once and keeps nothing.
#[test]
fn a_resumed_download_whose_file_changed_size_is_a_size_mismatch() {
    let rig = Rig::new();
    let pkg = download_pkg(&rig, 23);
    {
        let d = rig.start();
        download_to_half(&rig, &d, &pkg);
        d.sigkill();
    }
    let mut longer = pkg.bytes.clone();
    longer.extend_from_slice(&[0u8; 1000]);
    rig.server.add(&Pkg {
        version: pkg.version.clone(),
        name: pkg.name.clone(),
        md5: pkg.md5.clone(),
        bytes: longer,
    });
    rig.server.set(|s| s.gate = None);
    let d = rig.start();
    let seen = d.watch_after(None, "the resumed download to fail", |s| s.stage == "failed");
    let f = seen.last().unwrap();
    let want = format!(
        "PACKAGE_SIZE_MISMATCH: expected {} bytes, but the server's file has {} bytes",
        pkg.bytes.len(),
        pkg.bytes.len() + 1000
    );
    assert_eq!((f.progress, f.error.as_deref()), (0, Some(want.as_str())), "{seen:?}");
    let hits = rig.server.hits();
    assert_eq!(hits.len(), 2, "no retry: {hits:?}");
    assert!(hits[1].range_start().is_some() && hits[1].status == 206, "{hits:?}");
    assert!(!rig.downloaded(&pkg).exists(), "the partial file is removed");
}
