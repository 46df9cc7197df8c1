//! Who may call the daemon (SPEC §5 "Who may call", SECURITY.md): hostile requests against the
//! real `tope-updater serve` on loopback, written byte for byte on a TCP socket (so every
//! header, the request target's form and the content type are exactly the attacker's).
//!
//! The device under attack is armed: a package is downloaded and waiting (`toInstall`), a second
//! one is on the package server, and the package's module carries a post command that would
//! leave a marker. Every hostile request, at every endpoint, must be answered `code` 400 with
//! `REQUEST_REFUSED` and a log line naming the header, and afterwards nothing has happened: no
//! job started, the package server saw no request, the journal's history and status are
//! unchanged, the tree is byte-identical and the marker is absent. Then the same actions sent
//! the legacy way (JSON, no Origin) do run, so the refusals are the guard's, not a broken setup.
//!
//! Run with `cargo test --features failpoints --test it api_guard`.

use crate::daemon::*;
use crate::support::*;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One answer read off the socket: the status code and the body parsed as JSON.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
}

/// Sends `head` (request line and headers, without the blank line) and `body` with
/// `Connection: close`, and reads the whole answer.
fn raw(d: &Daemon, head: &str, body: &str) -> Answer {
    let addr = d.base.strip_prefix("http://").unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let len = if body.is_empty() && head.starts_with("GET ") {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    write!(s, "{head}\r\n{len}Connection: close\r\n\r\n{body}").unwrap();
    let mut text = Vec::new();
    s.read_to_end(&mut text).unwrap_or_else(|e| panic!("{head}: {e}"));
    let text = String::from_utf8_lossy(&text).into_owned();
    let (status_line, rest) =
        text.split_once("\r\n").unwrap_or_else(|| panic!("{head}: no answer: {text:?}"));
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{status_line:?}"));
    let payload = rest.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let body = serde_json::from_str(payload).unwrap_or(Value::String(payload.to_string()));
    Answer { status, body }
}

fn port(d: &Daemon) -> u16 {
    d.base.rsplit(':').next().unwrap().parse().unwrap()
}

/// A refusal: the legacy envelope (HTTP 200, `code` 400) with `REQUEST_REFUSED` naming `what`.
fn assert_refused(a: &Answer, what: &str, ctx: &str) {
    assert_eq!(a.status, 200, "{ctx}: {a:?}");
    assert_eq!(a.body["code"], 400, "{ctx}: {a:?}");
    let msg = a.body["msg"].as_str().unwrap_or_else(|| panic!("{ctx}: no msg: {a:?}"));
    assert!(
        msg.starts_with("REQUEST_REFUSED: ") && msg.contains(what),
        "{ctx}: expected REQUEST_REFUSED naming {what:?}: {msg}"
    );
}

/// The device's observable state: what a refused request must leave unchanged.
#[derive(Debug, PartialEq)]
struct Observed {
    progress: Value,
    status: Value,
    history: Value,
    tree: std::collections::BTreeMap<String, String>,
    package_requests: usize,
}

fn observe(rig: &Rig, d: &Daemon) -> Observed {
    Observed {
        progress: d.get("/api/v1.0/progress"),
        status: d.get("/api/v1.0/status"),
        history: d.get("/api/v1.0/history"),
        tree: tree(&rig.env.root),
        package_requests: rig.server.hits().len(),
    }
}

/// `tope-updater journal --json` without the outbox's pending rows (device-api may acknowledge
/// them at any time; the counter of pushes, `outbox_next_seq`, stays in).
fn journal_state(rig: &Rig) -> Value {
    let mut v: Value = serde_json::from_str(&rig.env.ok(&["journal", "--json"])).unwrap();
    v.as_object_mut().unwrap().remove("outbox");
    assert!(v["counters"].to_string().contains("outbox_next_seq"), "{v}");
    v
}

/// A device with 1.0.0 installed by the CLI, 2.0.0 downloaded through the API and waiting
/// (`toInstall`), and 3.0.0 on the package server. Both packages' first module has a post
/// command that creates `marker`.
struct Armed {
    rig: Rig,
    d: Daemon,
    marker: std::path::PathBuf,
    v3: Pkg,
}

fn armed(setup: Setup) -> Armed {
    let rig = Rig::with(setup);
    rig.put(FACTORY);
    let marker = rig.env.tmp.path().join("post-cmd-ran");
    let with_marker = |m: &mut Value| {
        m["modules"][0]["post_cmds"] = json!([format!("touch {}", marker.display())]);
    };
    let v1 = build_pkg(&rig.env, "1.0.0", &small_modules("1.0.0"));
    let p1 = rig.env.pkg_path(&v1.name);
    std::fs::write(&p1, &v1.bytes).unwrap();
    rig.env.ok(&["install", p1.to_str().unwrap()]);
    let v2 = build_pkg_with(&rig.env, "2.0.0", &small_modules("2.0.0"), with_marker);
    let v3 = build_pkg_with(&rig.env, "3.0.0", &small_modules("3.0.0"), with_marker);
    rig.server.add(&v2);
    rig.server.add(&v3);
    let d = rig.start();
    download(&rig, &d, &v2);
    Armed { rig, d, marker, v3 }
}

/// Every POST endpoint with a body that would make it act on the armed device.
fn posts(a: &Armed) -> Vec<(&'static str, String)> {
    vec![
        ("/api/v1.0/download", a.rig.request(&a.v3)),
        ("/api/v1.0/update", json!({"version": "2.0.0"}).to_string()),
        ("/api/v1.0/rollback", json!({"to": "factory"}).to_string()),
        ("/api/v1.0/confirm", String::new()),
    ]
}

const GETS: &[&str] =
    &["/api/v1.0/progress", "/api/v1.0/status", "/api/v1.0/history", "/api/v1.0/no-such-path"];

#[test]
fn browser_borne_and_rebinding_requests_are_refused_at_every_endpoint_and_touch_nothing() {
    let mut a = armed(Setup::default());
    // Every journal record and counter of the armed device (read with the daemon stopped).
    a.d.sigterm();
    let journal_before = journal_state(&a.rig);
    a.d = a.rig.start();
    let (d, p) = (&a.d, port(&a.d));
    let local = format!("Host: 127.0.0.1:{p}");
    let evil_host = format!("Host: evil.example:{p}");
    let before = observe(&a.rig, d);
    assert_eq!(before.progress["data"]["stage"], "toInstall", "armed: {before:?}");

    // (extra headers, what the refusal names) for a POST with the endpoint's body.
    let post_cases: Vec<(String, &str)> = vec![
        (format!("{local}\r\nContent-Type: text/plain\r\nOrigin: http://evil.example"), "Origin"),
        (format!("{local}\r\nContent-Type: text/plain;charset=UTF-8"), "Content-Type"),
        (format!("{local}\r\nContent-Type: application/x-www-form-urlencoded"), "Content-Type"),
        (format!("{local}\r\nContent-Type: multipart/form-data; boundary=xyz"), "Content-Type"),
        (format!("{local}\r\nOrigin: http://evil.example"), "Origin"),
        (
            format!("{local}\r\nContent-Type: application/json\r\nOrigin: http://evil.example"),
            "Origin",
        ),
        (format!("{local}\r\nContent-Type: application/json\r\nOrigin: null"), "Origin"),
        (
            format!("{local}\r\nContent-Type: application/json\r\nOrigin: http://127.0.0.1:{p}"),
            "Origin",
        ),
        (format!("{evil_host}\r\nContent-Type: application/json"), "Host"),
        (format!("Host: 127.0.0.1.evil.example:{p}\r\nContent-Type: application/json"), "Host"),
        (format!("{local}\r\n{evil_host}\r\nContent-Type: application/json"), "Host"),
        ("Content-Type: application/json".to_string(), "Host"),
    ];
    let mut tried = 0;
    for (path, body) in posts(&a) {
        for (headers, what) in &post_cases {
            let ans = raw(d, &format!("POST {path} HTTP/1.1\r\n{headers}"), &body);
            assert_refused(&ans, what, &format!("POST {path} with {headers:?}"));
            tried += 1;
        }
        // Absolute-form target naming another host, with a loopback Host header.
        let ans = raw(
            d,
            &format!(
                "POST http://evil.example:{p}{path} HTTP/1.1\r\n{local}\r\n\
                 Content-Type: application/json"
            ),
            &body,
        );
        assert_refused(&ans, "Host", &format!("absolute-form POST {path}"));
        tried += 1;
    }
    for path in GETS {
        for headers in [
            format!("{local}\r\nOrigin: http://evil.example"),
            format!("{local}\r\nOrigin: null"),
            evil_host.clone(),
            "Host: evil.example".into(),
        ] {
            let ans = raw(d, &format!("GET {path} HTTP/1.1\r\n{headers}"), "");
            assert_refused(
                &ans,
                if headers.contains("Origin") { "Origin" } else { "Host" },
                &format!("GET {path} with {headers:?}"),
            );
            tried += 1;
        }
        let ans = raw(d, &format!("GET http://evil.example:{p}{path} HTTP/1.1\r\n{local}"), "");
        assert_refused(&ans, "Host", &format!("absolute-form GET {path}"));
        tried += 1;
    }
    assert_eq!(tried, 4 * 13 + 4 * 5);

    // Nothing happened: no job, no download, the journal and the tree as they were.
    assert_eq!(observe(&a.rig, d), before, "a refused request changed the device");
    assert!(!a.marker.exists(), "a post command ran");
    let log = d.log_text();
    for header in ["header=\"origin\"", "header=\"host\"", "header=\"content-type\""] {
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.contains("request refused") && l.contains(header)),
            "no warn line with {header}:\n{log}"
        );
    }
    assert!(!log.contains(&a.v3.md5), "a refused body was logged:\n{log}");

    // The journal holds nothing new: no transaction, no record, no report pushed
    // (`outbox_next_seq` counts every push), no download replaced.
    assert!(d.sigterm().success());
    assert_eq!(journal_state(&a.rig), journal_before, "a refused request changed the journal");
    a.d = a.rig.start();
    let d = &a.d;

    // The legacy way, the same actions run: the refusals above were the guard's.
    assert_eq!(
        d.post("/api/v1.0/update", &json!({"version": "2.0.0"}).to_string()),
        started("installing")
    );
    d.watch("the legacy update to succeed", |s| s.stage == "success");
    assert!(a.marker.exists(), "the package's post command runs when the request is admitted");
    assert_eq!(a.rig.env.read("voice-app/voice-app").unwrap(), b"voice-app 2.0.0\n");
}

#[test]
fn legacy_callers_loopback_hosts_and_listed_origins_are_served() {
    let rig = Rig::with(Setup {
        api_extra:
            "allowed_origins = [\"http://kiosk.local:8080\"]\nallowed_hosts = [\"printer.lan\"]"
                .into(),
        ..Setup::default()
    });
    let d = rig.start();
    let p = port(&d);
    for host in [
        format!("127.0.0.1:{p}"),
        format!("localhost:{p}"),
        format!("[::1]:{p}"),
        format!("[::ffff:127.0.0.1]:{p}"),
        format!("printer.lan:{p}"),
    ] {
        let ans = raw(&d, &format!("GET /api/v1.0/progress HTTP/1.1\r\nHost: {host}"), "");
        assert_eq!(
            (ans.status, &ans.body["data"]["stage"]),
            (200, &json!("idle")),
            "Host {host}: {ans:?}"
        );
    }
    let local = format!("Host: 127.0.0.1:{p}");
    // A listed origin with JSON is served; the same origin without a content type is not.
    let ans = raw(
        &d,
        &format!(
            "POST /api/v1.0/confirm HTTP/1.1\r\n{local}\r\nOrigin: http://kiosk.local:8080\r\n\
             Content-Type: application/json"
        ),
        "{}",
    );
    assert_eq!(
        ans.body,
        json!({"code": 200, "msg": "success", "data": {"result": "nothing_to_confirm"}}),
        "{ans:?}"
    );
    let ans = raw(
        &d,
        &format!("POST /api/v1.0/confirm HTTP/1.1\r\n{local}\r\nOrigin: http://kiosk.local:8080"),
        "",
    );
    assert_refused(&ans, "Content-Type", "a listed origin without a content type");
    // Legacy POSTs: no content type and no Origin (curl -X POST), or JSON with a charset.
    let ans = raw(&d, &format!("POST /api/v1.0/confirm HTTP/1.1\r\n{local}"), "");
    assert_eq!(ans.body["code"], 200, "{ans:?}");
    let ans = raw(
        &d,
        &format!(
            "POST /api/v1.0/rollback HTTP/1.1\r\n{local}\r\n\
             Content-Type: application/json; charset=utf-8"
        ),
        "{}",
    );
    assert_eq!(
        (ans.status, &ans.body["code"]),
        (200, &json!(404)),
        "NOTHING_TO_ROLL_BACK, in the legacy envelope: {ans:?}"
    );
    // Unknown paths stay plain 404s for admitted callers.
    assert_eq!(raw(&d, &format!("GET /nope HTTP/1.1\r\n{local}"), "").status, 404);
    // Unsigned packages and no allowed_uids: said once at start.
    let warned = d
        .log_text()
        .lines()
        .filter(|l| {
            l.contains("WARN") && l.contains("accepts unsigned packages from every local user")
        })
        .count();
    assert_eq!(warned, 1, "{}", d.log_text());
}

/// `allowed_uids`: this test's own uid is the caller's. Listed → served; not listed → refused
/// before the handler (the download is never fetched).
#[test]
fn allowed_uids_serve_a_listed_caller_and_refuse_any_other() {
    let me = nix::unistd::geteuid().as_raw();
    let other = if me == 0 { 65534 } else { me + 1 };
    for (uids, admitted) in [(format!("[{me}]"), true), (format!("[{other}]"), false)] {
        let rig =
            Rig::with(Setup { api_extra: format!("allowed_uids = {uids}"), ..Setup::default() });
        let pkg = build_pkg(&rig.env, "2.0.0", &small_modules("2.0.0"));
        rig.server.add(&pkg);
        let d = rig.start();
        let ans = raw(
            &d,
            "POST /api/v1.0/download HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json",
            &rig.request(&pkg),
        );
        if admitted {
            assert_eq!(ans.body, started("downloading"), "uid {me} listed in {uids}: {ans:?}");
            d.wait_stage("toInstall");
            assert!(
                !d.log_text().contains("accepts unsigned packages"),
                "no warning once allowed_uids is set:\n{}",
                d.log_text()
            );
        } else {
            assert_refused(
                &ans,
                &format!("uid {me} is not in api.allowed_uids"),
                &format!("uid {me}, allowed_uids = {uids}"),
            );
            assert_refused(
                &raw(&d, "GET /api/v1.0/progress HTTP/1.1\r\nHost: 127.0.0.1", ""),
                "api.allowed_uids",
                "GET",
            );
            assert!(
                rig.server.hits().is_empty(),
                "a refused download was fetched: {:?}",
                rig.server.hits()
            );
            assert!(d.log_text().contains("header=\"peer uid\""), "{}", d.log_text());
        }
    }
}

/// Needs root (another user's process): `curl` run as `nobody` through `setpriv` is refused,
/// the same request from root is served.
#[test]
#[cfg_attr(
    tope_unprivileged,
    ignore = "needs root: runs curl as another user; run as root (README.md: Tests that need root)"
)]
fn allowed_uids_refuse_a_process_of_another_user() {
    crate::support::require_root(
        "allowed_uids_refuse_a_process_of_another_user",
        "it runs curl as nobody through setpriv",
    );
    let rig = Rig::with(Setup { api_extra: "allowed_uids = [0]".into(), ..Setup::default() });
    let d = rig.start();
    let url = format!("{}/api/v1.0/progress", d.base);
    let curl = |as_nobody: bool| {
        let mut c = if as_nobody {
            let mut c = std::process::Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", "curl"]);
            c
        } else {
            std::process::Command::new("curl")
        };
        let out = c
            .args(["-sS", "--noproxy", "*", "-w", "\n%{http_code}", &url])
            .output()
            .expect("curl and setpriv are installed (.ci/run)");
        assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.to_string(), serde_json::from_str::<Value>(body).unwrap())
    };
    let (code, body) = curl(true);
    assert_eq!((code.as_str(), &body["code"]), ("200", &json!(400)), "{body}");
    assert!(
        body["msg"]
            .as_str()
            .unwrap()
            .starts_with("REQUEST_REFUSED: the caller's uid 65534 is not in api.allowed_uids"),
        "{body}"
    );
    let (code, body) = curl(false);
    assert_eq!((code.as_str(), &body["data"]["stage"]), ("200", &json!("idle")), "{body}");
}
