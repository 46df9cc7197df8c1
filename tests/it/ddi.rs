//! The DDI client (issue 15) end to end: `tope-updater serve` with a `[ddi]` table, as a real
//! process, against real DDI servers on loopback:
//!
//! - `tests/ddi/spec_server.py`, which validates every request body against hawkBit's DDI
//!   OpenAPI spec and records every feedback in order (so the exact sequence is asserted),
//!   and can cancel;
//! - gooseBit 0.2.12 from PyPI (`tests/ddi/goosebit.sh`), an independent server.
//!
//! Both run from the venv `tests/ddi/goosebit.sh venv` makes (`target/ddi-venv`, or
//! `$DDI_VENV`); the first test that needs it makes it (pip, about a minute), under a lock.
//!
//! Run with `cargo test --features failpoints --test it ddi`.

use crate::daemon::{Daemon, PATIENCE, POLL};
use crate::support::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const DEV: &str = "tope-dev-1";
const TOKEN: &str = "tok-3f9a";

/// The venv's python, made once per test process (and once per machine: a marker file).
fn python() -> PathBuf {
    static VENV: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    VENV.get_or_init(|| {
        let venv = std::env::var_os("DDI_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(REPO).join("target/ddi-venv"));
        std::fs::create_dir_all(venv.parent().unwrap()).unwrap();
        // flock: test processes (nextest) and CI steps may make it at the same time.
        let lock = venv.with_extension("lock");
        let out = Command::new("flock")
            .arg(&lock)
            .arg(Path::new(REPO).join("tests/ddi/goosebit.sh"))
            .arg("venv")
            .env("DDI_VENV", &venv)
            .output()
            .expect("flock (util-linux) runs tests/ddi/goosebit.sh venv");
        assert!(
            out.status.success(),
            "tests/ddi/goosebit.sh venv failed (it needs python3 with venv and PyPI):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        venv.join("bin/python")
    })
    .clone()
}

fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    wait_within(PATIENCE, what, f)
}

/// gooseBit (Python, SQLite) on a machine loaded by the rest of the suite answers slowly.
const GOOSEBIT_PATIENCE: Duration = Duration::from_secs(300);

fn wait_within<T>(patience: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "gave up after {patience:?} waiting for {what}");
        std::thread::sleep(POLL.max(Duration::from_millis(100)));
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// `spec_server.py serve` on a free port, killed on drop.
struct SpecServer {
    child: Child,
    url: String,
    dir: PathBuf,
}

impl SpecServer {
    fn start(dir: &Path) -> SpecServer {
        std::fs::create_dir_all(dir).unwrap();
        let child = Command::new(python())
            .arg(Path::new(REPO).join("tests/ddi/spec_server.py"))
            .args(["serve", "--state-dir"])
            .arg(dir)
            .args([
                "--fresh-log",
                "--sleep",
                "00:00:01",
                "--target-token",
                &format!("{DEV}={TOKEN}"),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
            .spawn()
            .unwrap();
        let env_file = dir.join("server.env");
        let url = wait_for("spec_server.py to write server.env", || {
            std::fs::read_to_string(&env_file)
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("url=").map(str::to_string))
        });
        SpecServer { child, url, dir: dir.to_path_buf() }
    }

    fn ctl(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/_ctl/{path}", self.url);
        let a = agent();
        let r = match body {
            Some(b) => a
                .post(&url)
                .header("Content-Type", "application/json")
                .send(b.to_string().as_bytes()),
            None if method == "GET" => a.get(&url).call(),
            None => a.post(&url).send_empty(),
        };
        let mut r = r.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap();
        assert_eq!(status, 200, "{method} {url}: {text}\nserver log:\n{}", self.stderr());
        serde_json::from_str(&text).unwrap()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    fn deploy(&self, action: u32, artifacts: &[&Path], version: &str, extra: Value) -> Value {
        let mut req = json!({
            "controllerId": DEV,
            "actionId": action,
            "artifacts": artifacts.iter().map(|p| json!({"path": p})).collect::<Vec<_>>(),
            "version": version,
            "name": "tope-image",
        });
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        self.ctl("POST", "deployment", Some(req))
    }

    fn state(&self) -> Value {
        self.ctl("GET", "state", None)
    }

    fn action(&self, id: u32) -> Value {
        self.state()["actions"][id.to_string()].clone()
    }

    /// Every recorded DDI request of the device, in order.
    fn log(&self) -> Vec<Value> {
        self.ctl("GET", "log", None).as_array().unwrap().clone()
    }

    fn violations(&self) -> Value {
        self.ctl("GET", "violations", None)
    }
}

impl Drop for SpecServer {
    fn drop(&mut self) {
        // For the record (`--nocapture`): what the server recorded of each action.
        if !std::thread::panicking()
            && let Ok(mut r) = agent().get(format!("{}/_ctl/state", self.url)).call()
            && let Ok(text) = r.body_mut().read_to_string()
            && let Ok(state) = serde_json::from_str::<Value>(&text)
        {
            for (id, action) in state["actions"].as_object().into_iter().flatten() {
                show(&format!("action {id}"), action);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A device configured for the DDI server at `url` (plain http on loopback allowed by
/// `[ddi] allow_http` alone, for the server and its artifact links), with
/// its target token in a file. `top` goes to the config's top level.
fn device(url: &str, top: &str) -> Env {
    let env = Env::with_config(top);
    let token = env.tmp.path().join("ddi.token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let mut cfg = std::fs::read_to_string(&env.config).unwrap();
    cfg.push_str(&format!(
        "\n[api]\nlisten = \"127.0.0.1:0\"\n\n\
         [ddi]\nserver_url = {url:?}\ncontroller_id = {DEV:?}\n\
         token_file = {:?}\nallow_http = true\n",
        token.to_str().unwrap()
    ));
    std::fs::write(&env.config, cfg).unwrap();
    env
}

/// A package from `pack` (hashes pinned, signed as the device's config wants: unsigned here)
/// with one file module `app/bin` holding `content` (`module_extra`: more keys of the module).
fn package(env: &Env, version: &str, content: &[u8], module_extra: Value) -> PathBuf {
    let src = env.tmp.path().join(format!("src-{version}"));
    std::fs::create_dir_all(src.join("files")).unwrap();
    std::fs::write(src.join("files/bin"), content).unwrap();
    let mut man = json!({
        "version": version,
        "modules": [{"name": "app", "src": "files/bin", "dst": env.dst("app/bin")}],
    });
    for (k, v) in module_extra.as_object().unwrap() {
        man["modules"][0][k] = v.clone();
    }
    std::fs::write(src.join("manifest.json"), man.to_string()).unwrap();
    let out = env.pkg_path(&format!("app-{version}.zip"));
    env.ok(&["pack", src.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    out
}

/// The deployment feedback executions and results, in the order the server received them.
fn course(action: &Value) -> Vec<String> {
    action["feedback"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            format!(
                "{}/{}",
                f["status"]["execution"].as_str().unwrap(),
                f["status"]["result"]["finished"].as_str().unwrap()
            )
        })
        .collect()
}

fn details(action: &Value) -> Vec<String> {
    action["feedback"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| f["status"]["details"].as_array().cloned().unwrap_or_default())
        .map(|d| d.as_str().unwrap().to_string())
        .collect()
}

/// Prints what the server recorded for an action (for the record: `--nocapture`).
fn show(what: &str, action: &Value) {
    let lines: Vec<String> = action["feedback"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let st = &f["status"];
            format!(
                "{}/{} {:?}",
                st["execution"].as_str().unwrap(),
                st["result"]["finished"].as_str().unwrap(),
                st["details"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|d| d.as_str().unwrap().to_string())
                    .collect::<Vec<_>>()
            )
        })
        .collect();
    let cancel: Vec<String> = action["cancelFeedback"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            format!(
                "{}/{}",
                f["status"]["execution"].as_str().unwrap(),
                f["status"]["result"]["finished"].as_str().unwrap()
            )
        })
        .collect();
    println!(
        "RECORDED {what}: status {} | deployment feedback: {} | cancel feedback: {cancel:?}",
        action["status"],
        lines.join(" -> ")
    );
}

/// The configData bodies the device PUT, in order.
fn config_puts(server: &SpecServer) -> Vec<Value> {
    server
        .log()
        .into_iter()
        .filter(|r| r["method"] == "PUT" && r["path"].as_str().unwrap().ends_with("/configData"))
        .map(|r| r["body"].clone())
        .collect()
}

#[test]
fn a_deployment_is_downloaded_installed_and_reported_closed_success_with_every_request_as_the_spec_says()
 {
    let tmp = tempfile::tempdir().unwrap();
    let server = SpecServer::start(&tmp.path().join("spec"));
    let env = device(&server.url, "");
    env.put("app/bin", b"v1", 0o644);
    let before = tree(&env.root);
    let pkg = package(&env, "1.1.0", b"version 1.1.0 of the app", json!({}));
    let _d = Daemon::start(&env, None);
    server.deploy(7, &[&pkg], "1.1.0", json!({}));

    let action = wait_for("action 7 to be closed", || {
        Some(server.action(7)).filter(|a| a["active"] == false)
    });
    assert_eq!(action["status"], "FINISHED", "{action:#}");
    let course = course(&action);
    assert_eq!(course.first().map(String::as_str), Some("proceeding/none"), "{course:?}");
    assert_eq!(course.last().map(String::as_str), Some("closed/success"), "{course:?}");
    assert_eq!(
        course.iter().filter(|c| c.starts_with("closed")).count(),
        1,
        "exactly one final feedback: {course:?}"
    );
    let details = details(&action);
    // The 100 % feedback may be coalesced into the next one when the sender is still busy
    // with the one before (decide::coalesce), so only the wording is asserted.
    assert!(
        details.iter().any(|d| downloaded_percent(d).is_some()),
        "download progress in gooseBit's wording: {details:?}"
    );
    assert!(details.iter().any(|d| d == "installing: Swapped"), "install phases: {details:?}");
    assert_eq!(details.last().map(String::as_str), Some("installed 1.1.0"));

    // The tree is what the package says, from the package rules alone.
    let mut expected = before.clone();
    expected.insert(
        "app/bin".into(),
        format!("file 644 {}", blake3::hash(b"version 1.1.0 of the app").to_hex()),
    );
    assert_eq!(tree(&env.root), expected);

    // The server's view is brought in line: configData names the new version.
    let puts = wait_for("a configData naming 1.1.0", || {
        let p = config_puts(&server);
        p.iter().any(|b| b["data"]["sw_version"] == "1.1.0").then_some(p)
    });
    assert_eq!(
        puts[0]["data"]["sw_version"], "factory",
        "the first configData names the factory state: {puts:?}"
    );
    assert!(
        puts.iter().all(|b| b["data"]["engine"].as_str().unwrap().starts_with("tope-updater ")),
        "{puts:?}"
    );
    assert_eq!(server.violations(), json!([]), "every request conformed to the DDI spec");
    // The token went with every request; the artifact was downloaded once, whole.
    let log = server.log();
    let token = format!("TargetToken {TOKEN}");
    assert!(
        log.iter().all(|r| r["auth"] == token.as_str()),
        "a request without the token: {log:#?}"
    );
    let downloads =
        log.iter().filter(|r| r["path"].as_str().unwrap().contains("/artifacts/")).count();
    assert_eq!(downloads, 1, "{log:#?}");
}

fn file_entry(content: &[u8]) -> String {
    format!("file 644 {}", blake3::hash(content).to_hex())
}

/// A device at v1 (`app/bin` = "v1"), its daemon, and the tree it starts with.
fn v1_device(server: &SpecServer, top: &str) -> (Env, std::collections::BTreeMap<String, String>) {
    let env = device(&server.url, top);
    env.put("app/bin", b"v1", 0o644);
    let before = tree(&env.root);
    (env, before)
}

#[test]
fn a_trial_install_is_not_reported_success_until_confirmed_and_then_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let server = SpecServer::start(&tmp.path().join("spec"));
    let (env, _) = v1_device(&server, "confirm_required = true");
    let pkg = package(&env, "1.2.0", b"trial build", json!({}));
    let d = Daemon::start(&env, None);
    server.deploy(8, &[&pkg], "1.2.0", json!({}));
    let awaiting = wait_for("the awaiting-confirmation feedback", || {
        let a = server.action(8);
        details(&a)
            .iter()
            .any(|d| d.starts_with("installed; the result is final once"))
            .then_some(a)
    });
    assert_eq!(
        awaiting["active"], true,
        "not closed before confirm (rauc-hawkbit-updater #161): {awaiting:#}"
    );
    assert_eq!(env.read("app/bin").unwrap(), b"trial build");
    // No final feedback however long the trial runs: two more polls at least.
    std::thread::sleep(Duration::from_secs(12));
    let still = server.action(8);
    assert!(!course(&still).iter().any(|c| c.starts_with("closed")), "{:?}", course(&still));

    let r = d.post("/api/v1.0/confirm", "{}");
    assert_eq!(r["code"], 200, "{r}");
    let done = wait_for("action 8 closed after confirm", || {
        Some(server.action(8)).filter(|a| a["active"] == false)
    });
    assert_eq!(done["status"], "FINISHED");
    let c = course(&done);
    assert_eq!(c.iter().filter(|c| c.starts_with("closed")).count(), 1, "{c:?}");
    assert_eq!(c.last().map(String::as_str), Some("closed/success"));
    // Later polls add nothing.
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(course(&server.action(8)), c);
    assert_eq!(server.violations(), json!([]));
}

#[test]
fn a_trial_rolled_back_before_confirmation_is_reported_closed_failure_and_configdata_names_the_old_version()
 {
    let tmp = tempfile::tempdir().unwrap();
    let server = SpecServer::start(&tmp.path().join("spec"));
    let (env, before) = v1_device(&server, "confirm_required = true");
    let pkg = package(&env, "1.3.0", b"bad trial", json!({}));
    let d = Daemon::start(&env, None);
    server.deploy(9, &[&pkg], "1.3.0", json!({}));
    wait_for("the awaiting-confirmation feedback", || {
        details(&server.action(9))
            .iter()
            .any(|d| d.starts_with("installed; the result is final once"))
            .then_some(())
    });
    // The server first hears of 1.3.0 at the poll after the commit, which may come after the
    // feedback above: roll back only once it has (else the device never had to name 1.3.0,
    // and the factory state it names after the rollback is no news).
    wait_for("configData naming the trial version 1.3.0", || {
        config_puts(&server).iter().any(|b| b["data"]["sw_version"] == "1.3.0").then_some(())
    });
    let r = d.post("/api/v1.0/rollback", "{}");
    assert_eq!(r["code"], 200, "{r}");
    let done = wait_for("action 9 closed after the rollback", || {
        Some(server.action(9)).filter(|a| a["active"] == false)
    });
    assert_eq!(done["status"], "ERROR", "{done:#}");
    let c = course(&done);
    assert_eq!(c.last().map(String::as_str), Some("closed/failure"), "{c:?}");
    assert_eq!(c.iter().filter(|c| c.starts_with("closed")).count(), 1, "{c:?}");
    assert_eq!(tree(&env.root), before, "the rollback restored v1");
    wait_for("configData naming the factory state again after 1.3.0", || {
        let puts = config_puts(&server);
        let i = puts.iter().position(|b| b["data"]["sw_version"] == "1.3.0")?;
        puts[i + 1..].iter().any(|b| b["data"]["sw_version"] == "factory").then_some(())
    });
    assert_eq!(server.violations(), json!([]));
}

#[test]
fn a_failed_install_is_reported_once_with_its_error_code_and_never_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let server = SpecServer::start(&tmp.path().join("spec"));
    let (env, before) = v1_device(&server, "");
    let pkg = package(&env, "1.4.0", b"fails after the swap", json!({"post_cmds": ["exit 3"]}));
    let _d = Daemon::start(&env, None);
    server.deploy(10, &[&pkg], "1.4.0", json!({}));
    let done =
        wait_for("action 10 closed", || Some(server.action(10)).filter(|a| a["active"] == false));
    assert_eq!(done["status"], "ERROR", "{done:#}");
    let c = course(&done);
    assert_eq!(c.last().map(String::as_str), Some("closed/failure"), "{c:?}");
    let last = details(&done).last().cloned().unwrap();
    assert!(
        last.starts_with("POST_CMD_FAILED: "),
        "the stable error code leads the detail: {last}"
    );
    assert_eq!(tree(&env.root), before, "rolled back to v1");
    // The server stops offering it; the device neither downloads nor reports it again.
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(course(&server.action(10)), c);
    let downloads = artifact_gets(&server).len();
    assert_eq!(downloads, 1);
}

#[test]
fn an_artifact_whose_bytes_do_not_match_the_deployment_hash_fails_the_action_and_touches_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = SpecServer::start(&tmp.path().join("spec"));
    let (env, before) = v1_device(&server, "");
    let pkg = package(&env, "1.5.0", b"the real package", json!({}));
    server.deploy(11, &[&pkg], "1.5.0", json!({}));
    // The server's hashes are of the original; the bytes it serves now differ (same size).
    let mut bytes = std::fs::read(&pkg).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&pkg, &bytes).unwrap();
    let _d = Daemon::start(&env, None);
    let done =
        wait_for("action 11 closed", || Some(server.action(11)).filter(|a| a["active"] == false));
    assert_eq!(course(&done).last().map(String::as_str), Some("closed/failure"));
    let last = details(&done).last().cloned().unwrap();
    assert!(
        last.starts_with("HASH_MISMATCH: sha256 mismatch"),
        "sha256 is the strongest hash given: {last}"
    );
    assert_eq!(tree(&env.root), before);
    let left: Vec<_> = std::fs::read_dir(env.state.join("downloads"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "the mismatching download is deleted: {left:?}");
}

#[test]
fn a_deployment_of_three_artifacts_is_rejected_whole_before_any_download() {
    let tmp = tempfile::tempdir().unwrap();
    let server = SpecServer::start(&tmp.path().join("spec"));
    let (env, before) = v1_device(&server, "");
    let a = package(&env, "1.6.0", b"a", json!({}));
    let b = package(&env, "1.6.1", b"b", json!({}));
    let c = package(&env, "1.6.2", b"c", json!({}));
    let _d = Daemon::start(&env, None);
    server.deploy(12, &[&a, &b, &c], "1.6.0", json!({}));
    let rejected = wait_for("the rejected feedback", || {
        let act = server.action(12);
        course(&act).iter().any(|c| c == "rejected/failure").then_some(act)
    });
    let why = details(&rejected).join("|");
    assert!(why.contains("3 artifacts") && why.contains("all or nothing"), "{why}");
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(
        course(&server.action(12)),
        vec!["rejected/failure".to_string()],
        "rejected once, not in a loop"
    );
    assert!(
        !server.log().iter().any(|r| r["path"].as_str().unwrap().contains("/artifacts/")),
        "nothing downloaded"
    );
    assert_eq!(tree(&env.root), before);
    assert_eq!(server.violations(), json!([]));
}

/// The deploymentBase GETs of `action` the server answered, with their status.
fn deployment_gets(server: &SpecServer, action: u32) -> Vec<i64> {
    let tail = format!("/deploymentBase/{action}");
    server
        .log()
        .into_iter()
        .filter(|r| r["method"] == "GET" && r["path"].as_str().unwrap().ends_with(&tail))
        .map(|r| r["status"].as_i64().unwrap())
        .collect()
}

#[test]
fn a_deployment_withdrawn_between_the_poll_and_the_fetch_is_not_refused_and_installs_when_offered_again()
 {
    let tmp = tempfile::tempdir().unwrap();
    let server = SpecServer::start(&tmp.path().join("spec"));
    let (env, before) = v1_device(&server, "");
    let pkg = package(&env, "1.6.5", b"offered again", json!({}));
    server.deploy(16, &[&pkg], "1.6.5", json!({}));
    server.ctl("POST", "withdraw", Some(json!({"actionId": 16, "answer": 404})));
    let _d = Daemon::start(&env, None);
    // hawkBit's 404, then gooseBit's `null`: neither is the device's to refuse (the offer
    // changed after the poll); it asks again at the next polls.
    let answered =
        |status: i64| deployment_gets(&server, 16).iter().filter(|s| **s == status).count();
    wait_for("two deploymentBase fetches answered 404", || (answered(404) >= 2).then_some(()));
    server.ctl("POST", "withdraw", Some(json!({"actionId": 16, "answer": "null"})));
    wait_for("two deploymentBase fetches answered null", || (answered(200) >= 2).then_some(()));
    let a = server.action(16);
    assert_eq!(course(&a), Vec::<String>::new(), "no feedback about a withdrawn offer: {a:#}");
    assert!(artifact_gets(&server).is_empty(), "nothing downloaded");
    assert_eq!(tree(&env.root), before);

    server.ctl("POST", "withdraw", Some(json!({"actionId": 16, "answer": null})));
    let done =
        wait_for("action 16 closed", || Some(server.action(16)).filter(|a| a["active"] == false));
    assert_eq!(done["status"], "FINISHED", "{done:#}");
    assert_eq!(course(&done).last().map(String::as_str), Some("closed/success"));
    assert_eq!(tree(&env.root).get("app/bin"), Some(&file_entry(b"offered again")));
    assert_eq!(server.violations(), json!([]));
}

#[test]
fn outside_the_maintenance_window_it_downloads_only_then_installs_when_the_window_opens_without_downloading_again()
 {
    let tmp = tempfile::tempdir().unwrap();
    let server = SpecServer::start(&tmp.path().join("spec"));
    let (env, before) = v1_device(&server, "");
    let pkg = package(&env, "1.7.0", b"installed in the window", json!({}));
    let _d = Daemon::start(&env, None);
    server.deploy(13, &[&pkg], "1.7.0", json!({"maintenanceWindow": "unavailable"}));
    wait_for("the downloaded feedback", || {
        course(&server.action(13)).iter().any(|c| c == "downloaded/none").then_some(())
    });
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(tree(&env.root), before, "nothing installed outside the window");
    server.ctl("POST", "maintenance", Some(json!({"actionId": 13, "window": "available"})));
    let done =
        wait_for("action 13 closed", || Some(server.action(13)).filter(|a| a["active"] == false));
    assert_eq!(done["status"], "FINISHED", "{:?}", course(&done));
    assert_eq!(tree(&env.root).get("app/bin"), Some(&file_entry(b"installed in the window")));
    let downloads: Vec<_> = server
        .log()
        .into_iter()
        .filter(|r| r["path"].as_str().unwrap().contains("/artifacts/"))
        .collect();
    assert_eq!(downloads.len(), 1, "the verified download is reused: {downloads:#?}");
    assert_eq!(server.violations(), json!([]));
}

#[test]
fn a_cancel_before_the_install_is_confirmed_and_after_the_install_is_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let server = SpecServer::start(&tmp.path().join("spec"));
    let (env, before) = v1_device(&server, "confirm_required = true");
    let pkg = package(&env, "1.8.0", b"never installed", json!({}));
    let _d = Daemon::start(&env, None);
    // Downloaded, waiting for the window: canceled.
    server.deploy(14, &[&pkg], "1.8.0", json!({"maintenanceWindow": "unavailable"}));
    wait_for("the downloaded feedback", || {
        course(&server.action(14)).iter().any(|c| c == "downloaded/none").then_some(())
    });
    server.ctl("POST", "cancel", Some(json!({"actionId": 14})));
    let canceled = wait_for("action 14 canceled", || {
        Some(server.action(14)).filter(|a| a["status"] == "CANCELED")
    });
    let fb = canceled["cancelFeedback"].as_array().unwrap();
    assert_eq!(fb.len(), 1, "{canceled:#}");
    assert_eq!(
        (&fb[0]["status"]["execution"], &fb[0]["status"]["result"]["finished"]),
        (&json!("closed"), &json!("success"))
    );
    assert_eq!(tree(&env.root), before);

    // Installed (a trial awaiting confirmation): the cancel is refused, the action goes on.
    let pkg2 = package(&env, "1.9.0", b"installed, then a cancel", json!({}));
    server.deploy(15, &[&pkg2], "1.9.0", json!({}));
    wait_for("the awaiting-confirmation feedback", || {
        details(&server.action(15))
            .iter()
            .any(|d| d.starts_with("installed; the result is final once"))
            .then_some(())
    });
    server.ctl("POST", "cancel", Some(json!({"actionId": 15})));
    let refused = wait_for("the cancel refused", || {
        let a = server.action(15);
        (!a["cancelFeedback"].as_array().unwrap().is_empty()).then_some(a)
    });
    let fb = &refused["cancelFeedback"][0]["status"];
    assert_eq!(fb["execution"], "rejected", "{refused:#}");
    assert!(fb["details"][0].as_str().unwrap().contains("has begun"), "{fb}");
    assert_eq!(refused["status"], "RUNNING", "the cancel is withdrawn; the action goes on");
    assert_eq!(env.read("app/bin").unwrap(), b"installed, then a cancel");
    assert_eq!(server.violations(), json!([]));
}

/// gooseBit 0.2.12 (`tests/ddi/goosebit.sh`) with its state in `dir`, stopped on drop.
struct GooseBit {
    dir: PathBuf,
    url: String,
    _one: std::sync::MutexGuard<'static, ()>,
}

impl GooseBit {
    fn script(&self, args: &[&str]) -> String {
        goosebit_sh(&self.dir, args)
    }

    fn start(dir: &Path) -> GooseBit {
        python();
        // One gooseBit test at a time in this process: on a loaded machine two gooseBits
        // starting together were slow enough to trip over each other's port choice
        // (goosebit.sh now also checks the socket is its own), and each is a heavy process.
        static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let one = ONE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        std::fs::create_dir_all(dir).unwrap();
        let out = goosebit_sh(dir, &["start", dir.to_str().unwrap()]);
        let url = out
            .split_whitespace()
            .find_map(|w| w.strip_prefix("url="))
            .unwrap_or_else(|| panic!("goosebit.sh start: {out}"))
            .to_string();
        GooseBit { dir: dir.to_path_buf(), url, _one: one }
    }

    fn assign(&self, pkg: &Path, version: &str) {
        self.script(&[
            "seed",
            self.dir.to_str().unwrap(),
            "assign",
            "--device",
            DEV,
            "--file",
            pkg.to_str().unwrap(),
            "--version",
            version,
        ]);
    }

    fn device(&self) -> Value {
        serde_json::from_str(&self.script(&[
            "show",
            self.dir.to_str().unwrap(),
            "device",
            "--device",
            DEV,
        ]))
        .unwrap()
    }

    /// Requests to the artifact download resource in gooseBit's access log.
    fn downloads(&self) -> usize {
        std::fs::read_to_string(self.dir.join("server.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&format!("/{DEV}/download")))
            .count()
    }
}

impl Drop for GooseBit {
    fn drop(&mut self) {
        let _ = Command::new(Path::new(REPO).join("tests/ddi/goosebit.sh"))
            .arg("stop")
            .arg(&self.dir)
            .env("DDI_VENV", venv_dir())
            .output();
    }
}

fn venv_dir() -> PathBuf {
    python().parent().unwrap().parent().unwrap().to_path_buf()
}

fn goosebit_sh(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(Path::new(REPO).join("tests/ddi/goosebit.sh"))
        .args(args)
        .env("DDI_VENV", venv_dir())
        // Registered devices poll at the client's floor, not gooseBit's default minute.
        .env("GOOSEBIT_POLL_TIME", "00:00:01")
        // Not niced: beside a loaded test run a niced server answers too slowly.
        .env("DDI_NICE", "0")
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "goosebit.sh {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The percentage of a download progress detail in gooseBit's wording (`Downloaded N%`).
fn downloaded_percent(detail: &str) -> Option<u32> {
    detail.strip_prefix("Downloaded ")?.strip_suffix('%')?.parse().ok().filter(|p| *p <= 100)
}

#[test]
fn against_goosebit_an_assignment_is_installed_and_the_server_records_finished_then_a_failure_is_recorded_and_not_retried()
 {
    let tmp = tempfile::tempdir().unwrap();
    let gb = GooseBit::start(&tmp.path().join("gb"));
    let env = device(&gb.url, "");
    env.put("app/bin", b"v1", 0o644);
    let before = tree(&env.root);
    let pkg = package(&env, "1.1.0", b"from goosebit", json!({}));
    gb.assign(&pkg, "1.1.0");
    let d = Daemon::start(&env, None);
    let dev =
        wait_within(GOOSEBIT_PATIENCE, "gooseBit to record the device finished on 1.1.0", || {
            let dev = gb.device();
            (dev["last_state_name"] == "finished" && dev["sw_version"] == "1.1.0").then_some(dev)
        });
    assert_eq!(dev["progress"], 100, "{dev:#}");
    let log: Vec<&str> =
        dev["last_log_lines"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    // Download progress is in gooseBit's wording; which percentages arrive depends on how fast
    // gooseBit answered (a progress feedback still waiting when the next one comes is
    // coalesced into it: decide::coalesce), so none is required.
    let progress: Vec<&&str> = log.iter().filter(|l| l.starts_with("Downloaded")).collect();
    assert!(progress.iter().all(|l| downloaded_percent(l).is_some()), "{log:?}");
    assert!(log.contains(&"installed 1.1.0"), "{log:?}");
    let mut expected = before.clone();
    expected.insert("app/bin".into(), file_entry(b"from goosebit"));
    assert_eq!(tree(&env.root), expected);
    assert_eq!(gb.downloads(), 1);

    // A failing update: recorded as an error with the code, and not offered or fetched again.
    let bad = package(&env, "1.2.0", b"fails", json!({"post_cmds": ["exit 3"]}));
    gb.assign(&bad, "1.2.0");
    let dev = wait_within(GOOSEBIT_PATIENCE, "gooseBit to record the error", || {
        Some(gb.device()).filter(|d| d["last_state_name"] == "error")
    });
    assert!(dev["last_log"].as_str().unwrap().contains("POST_CMD_FAILED"), "{dev:#}");
    assert_eq!(dev["sw_version"], "1.1.0", "gooseBit keeps the version the device still runs");
    assert_eq!(tree(&env.root), expected, "rolled back to 1.1.0");
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(gb.downloads(), 2, "the failed assignment was fetched once");
    assert_eq!(gb.device()["last_state_name"], "error");
    drop(d);
}

#[cfg(feature = "failpoints")]
#[test]
fn a_daemon_killed_mid_swap_finishes_the_install_at_its_next_start_and_reports_closed_success_exactly_once()
 {
    let tmp = tempfile::tempdir().unwrap();
    let server = SpecServer::start(&tmp.path().join("spec"));
    let (env, _) = v1_device(&server, "");
    let pkg = package(&env, "2.0.0", b"survives a kill", json!({}));
    server.deploy(21, &[&pkg], "2.0.0", json!({}));
    run_until_killed(&env, "swap.file");
    let mid = server.action(21);
    assert_eq!(mid["active"], true, "{mid:#}");
    assert!(
        !course(&mid).iter().any(|c| c.starts_with("closed")),
        "no final feedback before the end: {:?}",
        course(&mid)
    );
    let st = env.run(&["status", "--json"]).json();
    assert_eq!(
        st["in_flight"]["phase"], "Swapped",
        "the kill landed inside the transaction, in its swap: {st:#}"
    );

    let _second = Daemon::start(&env, None);
    let done = wait_for("action 21 closed after the restart", || {
        Some(server.action(21)).filter(|a| a["active"] == false)
    });
    assert_eq!(done["status"], "FINISHED", "{done:#}");
    let c = course(&done);
    assert_eq!(c.iter().filter(|c| c.starts_with("closed")).count(), 1, "{c:?}");
    assert_eq!(tree(&env.root).get("app/bin"), Some(&file_entry(b"survives a kill")));
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(course(&server.action(21)), c, "nothing more after the end");
    let downloads = artifact_gets(&server).len();
    assert_eq!(downloads, 1, "the install resumed from the journal, not from a new download");
    assert_eq!(server.violations(), json!([]));
}

/// Runs the daemon armed to SIGKILL itself at `point` (first pass) and waits until it did.
#[cfg(feature = "failpoints")]
fn run_until_killed(env: &Env, point: &str) {
    use std::os::unix::process::ExitStatusExt;
    let d = Daemon::start(env, Some(&kill_at(point, 1)));
    let status = d.wait_exit();
    assert_eq!(status.signal(), Some(9), "killed at {point}: {status:?}\n{}", d.log_text());
}

/// `pack` of a one-file tree (`app/bin` = `content`) at `version`, against `bases` when given.
fn pack_app(env: &Env, name: &str, version: &str, content: &[u8], bases: &[&Path]) -> PathBuf {
    let src = env.tmp.path().join(format!("src-{name}"));
    std::fs::create_dir_all(src.join("files")).unwrap();
    std::fs::write(src.join("files/bin"), content).unwrap();
    let man = json!({
        "version": version,
        "modules": [{"name": "app", "src": "files/bin", "dst": env.dst("app/bin")}],
    });
    std::fs::write(src.join("manifest.json"), man.to_string()).unwrap();
    let out = env.pkg_path(&format!("{name}.zip"));
    let mut args = vec![
        "pack".to_string(),
        src.to_str().unwrap().into(),
        "-o".into(),
        out.to_str().unwrap().into(),
    ];
    for b in bases {
        args.extend(["--delta-from".to_string(), b.to_str().unwrap().to_string()]);
    }
    env.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    out
}

/// v1 and v2 of a 256 KiB file that differ in a few bytes, the full packages of both, and a
/// delta package of v2 against v1.
fn delta_set(env: &Env) -> (Vec<u8>, PathBuf, Vec<u8>, PathBuf, PathBuf) {
    let v1 = XorShift::new(0xdd1).bytes(256 * 1024);
    let mut v2 = v1.clone();
    for i in (0..v2.len()).step_by(64 * 1024) {
        v2[i] ^= 0x5a;
    }
    let full1 = pack_app(env, "app-1.0.0", "1.0.0", &v1, &[]);
    let full2 = pack_app(env, "app-2.0.0", "2.0.0", &v2, &[]);
    let delta2 = pack_app(env, "app-2.0.0-delta", "2.0.0", &v2, &[&full1]);
    let (d, f) =
        (std::fs::metadata(&delta2).unwrap().len(), std::fs::metadata(&full2).unwrap().len());
    assert!(d * 4 < f, "the delta ({d} B) is much smaller than the full package ({f} B)");
    (v1, full1, v2, full2, delta2)
}

fn artifact_gets(server: &SpecServer) -> Vec<String> {
    server
        .log()
        .into_iter()
        .filter(|r| r["method"] == "GET" && r["path"].as_str().unwrap().contains("/artifacts/"))
        .map(|r| r["path"].as_str().unwrap().rsplit('/').next().unwrap().to_string())
        .collect()
}

#[test]
fn a_delta_and_its_full_twin_install_from_the_delta_alone_when_the_device_holds_its_base() {
    let tmp = tempfile::tempdir().unwrap();
    let server = SpecServer::start(&tmp.path().join("spec"));
    let env = device(&server.url, "");
    let (_, full1, v2, full2, delta2) = delta_set(&env);
    env.ok(&["install", full1.to_str().unwrap()]);
    let _d = Daemon::start(&env, None);
    server.deploy(31, &[&full2, &delta2], "2.0.0", json!({}));
    let done =
        wait_for("action 31 closed", || Some(server.action(31)).filter(|a| a["active"] == false));
    assert_eq!(done["status"], "FINISHED", "{:?}", course(&done));
    assert_eq!(env.read("app/bin").unwrap(), v2);
    assert_eq!(
        artifact_gets(&server),
        vec!["app-2.0.0-delta.zip".to_string()],
        "only the delta was downloaded"
    );
    assert_eq!(server.violations(), json!([]));
}

#[test]
fn without_the_base_the_delta_is_refused_untouched_and_the_full_twin_is_installed_without_a_failure_report()
 {
    let tmp = tempfile::tempdir().unwrap();
    let server = SpecServer::start(&tmp.path().join("spec"));
    let env = device(&server.url, "");
    env.put("app/bin", b"a drifted device's own file", 0o644);
    let (_, _, v2, full2, delta2) = delta_set(&env);
    let _d = Daemon::start(&env, None);
    server.deploy(32, &[&full2, &delta2], "2.0.0", json!({}));
    let done =
        wait_for("action 32 closed", || Some(server.action(32)).filter(|a| a["active"] == false));
    assert_eq!(done["status"], "FINISHED", "{:?} {:?}", course(&done), details(&done));
    let c = course(&done);
    assert!(!c.iter().any(|c| c.ends_with("/failure")), "the fallback is not a failure: {c:?}");
    assert_eq!(c.iter().filter(|c| c.starts_with("closed")).count(), 1, "{c:?}");
    assert_eq!(env.read("app/bin").unwrap(), v2);
    assert_eq!(
        artifact_gets(&server),
        vec!["app-2.0.0-delta.zip".to_string(), "app-2.0.0.zip".to_string()],
        "the delta first, then the full"
    );
    // The engine never began a transaction for the delta: one install in the history.
    let history = env.run(&["history", "--json"]).json();
    assert_eq!(history.as_array().map(Vec::len), Some(1), "{history:#}");
}

#[test]
fn two_full_packages_in_one_deployment_are_rejected_whole_and_nothing_is_installed() {
    let tmp = tempfile::tempdir().unwrap();
    let server = SpecServer::start(&tmp.path().join("spec"));
    let env = device(&server.url, "");
    env.put("app/bin", b"v1", 0o644);
    let before = tree(&env.root);
    let a = pack_app(&env, "app-3.0.0-a", "3.0.0", b"first package", &[]);
    let b = pack_app(&env, "app-3.0.0-b", "3.0.0", b"second, larger package", &[]);
    let _d = Daemon::start(&env, None);
    server.deploy(33, &[&a, &b], "3.0.0", json!({}));
    let rejected = wait_for("the rejected feedback", || {
        let act = server.action(33);
        course(&act).iter().any(|c| c == "rejected/failure").then_some(act)
    });
    let why = details(&rejected).join("|");
    assert!(why.contains("not a delta package"), "{why}");
    assert_eq!(tree(&env.root), before);
    assert_eq!(env.run(&["history", "--json"]).json().as_array().map(Vec::len), Some(0));
}

/// Needs `failpoints` for the boot-id test seam (`TOPE_BOOT_ID_FILE`): a test cannot reboot.
#[cfg(feature = "failpoints")]
#[test]
fn a_trial_rolled_back_at_the_next_boot_is_reported_closed_failure_after_the_fact() {
    let tmp = tempfile::tempdir().unwrap();
    let server = SpecServer::start(&tmp.path().join("spec"));
    let (env, before) = v1_device(&server, "confirm_required = true\nmax_trial_boots = 1");
    let pkg = package(&env, "4.0.0", b"never confirmed", json!({}));
    let d = Daemon::start(&env, None);
    server.deploy(41, &[&pkg], "4.0.0", json!({}));
    wait_for("the awaiting-confirmation feedback", || {
        details(&server.action(41))
            .iter()
            .any(|d| d.starts_with("installed; the result is final once"))
            .then_some(())
    });
    // Power down (the daemon stops), then the next boot: its recover unit counts the boot and
    // rolls the unconfirmed trial back before the daemon starts.
    let status = d.sigterm();
    assert!(status.success(), "{status:?}");
    let boot = env.tmp.path().join("next-boot-id");
    std::fs::write(&boot, "a-later-boot\n").unwrap();
    let rec = Run::from(
        env.command(&["recover", "--at-boot", "--json"])
            .env("TOPE_BOOT_ID_FILE", &boot)
            .output()
            .unwrap(),
    );
    assert_eq!(rec.code, Some(4), "exit 4: rolled back\n{}", rec.describe());
    assert_eq!(rec.json()["result"], "trial_expired", "{}", rec.describe());
    assert_eq!(tree(&env.root), before, "the trial was rolled back at boot");
    assert_eq!(server.action(41)["active"], true, "the server has not heard yet");

    let _d = Daemon::start(&env, None);
    let done = wait_for("action 41 closed after the boot", || {
        Some(server.action(41)).filter(|a| a["active"] == false)
    });
    assert_eq!(done["status"], "ERROR", "{done:#}");
    let c = course(&done);
    assert_eq!(c.last().map(String::as_str), Some("closed/failure"), "{c:?}");
    assert_eq!(c.iter().filter(|c| c.starts_with("closed")).count(), 1, "{c:?}");
    let why = details(&done).last().cloned().unwrap();
    assert!(why.contains("rolled back by transaction 2"), "{why}");
    assert_eq!(server.violations(), json!([]));
}

/// A package of `len` incompressible bytes (stored), so that a throttled download takes a while.
fn big_package(env: &Env, version: &str, len: usize) -> (PathBuf, Vec<u8>) {
    let content = XorShift::new(0xb16).bytes(len);
    (package(env, version, &content, json!({})), content)
}

#[test]
fn a_daemon_killed_mid_download_resumes_with_range_and_the_server_sees_exactly_one_final_result() {
    let tmp = tempfile::tempdir().unwrap();
    let server = SpecServer::start(&tmp.path().join("spec"));
    let (env, _) = v1_device(&server, "");
    let (pkg, content) = big_package(&env, "5.0.0", 2 * 1024 * 1024);
    let total = std::fs::metadata(&pkg).unwrap().len();
    server.ctl("POST", "throttle", Some(json!({"bytesPerSecond": 400_000})));
    server.deploy(51, &[&pkg], "5.0.0", json!({}));
    let d = Daemon::start(&env, None);
    let part = env.state.join("downloads").join(pkg.file_name().unwrap());
    // Past the first durable checkpoint (a sixteenth of the package), well before the end.
    wait_for("a third of the download", || {
        std::fs::metadata(&part).ok().filter(|m| m.len() > total / 3).map(|_| ())
    });
    d.sigkill();
    let got = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    assert!(got < total, "killed mid-download ({got} of {total} bytes)");
    assert_eq!(server.action(51)["active"], true);

    server.ctl("POST", "throttle", Some(json!({"bytesPerSecond": 0})));
    let _d = Daemon::start(&env, None);
    let done = wait_for("action 51 closed after the restart", || {
        Some(server.action(51)).filter(|a| a["active"] == false)
    });
    assert_eq!(done["status"], "FINISHED", "{:?}", course(&done));
    assert_eq!(course(&done).iter().filter(|c| c.starts_with("closed")).count(), 1);
    assert_eq!(env.read("app/bin").unwrap(), content);
    let gets: Vec<Value> = server
        .log()
        .into_iter()
        .filter(|r| r["path"].as_str().unwrap().contains("/artifacts/"))
        .collect();
    assert_eq!(gets.len(), 2, "{gets:#?}");
    let resumed_at: u64 = gets[1]["range"]
        .as_str()
        .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
        .unwrap_or(0);
    assert!(
        resumed_at > 0 && resumed_at < total,
        "the second GET resumed with Range from the journaled offset: {:?}",
        gets[1]
    );
    assert_eq!(server.violations(), json!([]));
}

#[test]
fn with_the_server_down_for_a_while_the_feedback_waits_and_is_delivered_in_order_when_it_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let server = SpecServer::start(&tmp.path().join("spec"));
    let (env, _) = v1_device(&server, "");
    let (pkg, content) = big_package(&env, "6.0.0", 1024 * 1024);
    // A 7 s download: the server goes down while it runs even when this test's thread is slow
    // to act on the first feedback (CI under load took over 2 s, after a 2 s download had
    // ended and every feedback was delivered).
    server.ctl("POST", "throttle", Some(json!({"bytesPerSecond": 150_000})));
    server.deploy(61, &[&pkg], "6.0.0", json!({}));
    let _d = Daemon::start(&env, None);
    wait_for("the first feedback", || {
        (!server.action(61)["feedback"].as_array().unwrap().is_empty()).then_some(())
    });
    // Down while the device downloads and installs: its feedback cannot be delivered.
    server.ctl("POST", "down", Some(json!({"seconds": 8})));
    wait_for("the install to finish on the device", || {
        (env.read("app/bin").as_deref() == Some(content.as_slice())).then_some(())
    });
    let done = wait_for("action 61 closed once the server is back", || {
        Some(server.action(61)).filter(|a| a["active"] == false)
    });
    assert_eq!(done["status"], "FINISHED");
    let c = course(&done);
    assert_eq!(c.iter().filter(|c| c.starts_with("closed")).count(), 1, "{c:?}");
    assert_eq!(c.last().map(String::as_str), Some("closed/success"), "{c:?}");
    // In order: download progress only grows, then the install's phases, then the result.
    let d = details(&done);
    let pct: Vec<u32> = d
        .iter()
        .filter_map(|x| x.strip_prefix("Downloaded ")?.strip_suffix('%')?.parse().ok())
        .collect();
    assert!(pct.windows(2).all(|w| w[0] <= w[1]), "{d:?}");
    let first_install = d.iter().position(|x| x.starts_with("installing")).unwrap();
    let last_download = d.iter().rposition(|x| x.starts_with("Downloaded")).unwrap();
    assert!(last_download < first_install, "{d:?}");
    let refused = server.log().iter().filter(|r| r["status"] == 503).count();
    assert!(refused > 0, "some requests met the server down");
    assert_eq!(server.violations(), json!([]));
}

/// Needs `failpoints`: the install is held at `BackedUp` (a sleep there) long enough for the
/// server's cancel to reach it at the next poll.
#[cfg(feature = "failpoints")]
#[test]
fn a_cancel_during_the_install_before_its_swap_rolls_it_back_and_is_confirmed() {
    let tmp = tempfile::tempdir().unwrap();
    let server = SpecServer::start(&tmp.path().join("spec"));
    let (env, before) = v1_device(&server, "");
    let pkg = package(&env, "7.0.0", b"canceled mid-install", json!({}));
    let d = Daemon::start(&env, Some("enter.BackedUp=sleep(9000)"));
    server.deploy(71, &[&pkg], "7.0.0", json!({}));
    wait_for("the install to reach BackedUp", || {
        (d.status()["in_flight"]["phase"] == "BackedUp").then_some(())
    });
    server.ctl("POST", "cancel", Some(json!({"actionId": 71})));
    let canceled = wait_for("action 71 canceled", || {
        Some(server.action(71)).filter(|a| a["status"] == "CANCELED")
    });
    let fb = canceled["cancelFeedback"].as_array().unwrap();
    assert_eq!(fb.len(), 1, "{canceled:#}");
    assert_eq!(
        (&fb[0]["status"]["execution"], &fb[0]["status"]["result"]["finished"]),
        (&json!("closed"), &json!("success"))
    );
    assert!(
        !course(&canceled).iter().any(|c| c.starts_with("closed")),
        "no deployment result besides the cancel: {:?}",
        course(&canceled)
    );
    assert_eq!(tree(&env.root), before, "rolled back: nothing was swapped");
    let history = env.run(&["history", "--json"]).json();
    let last = &history.as_array().unwrap()[0];
    assert_eq!(
        (&last["phase"], &last["error"]["code"]),
        (&json!("RolledBack"), &json!("CANCELED")),
        "{history:#}"
    );
    assert_eq!(server.violations(), json!([]));
}

/// gooseBit keeps no feedback history (only the last state and the details appended to its
/// log), so these check what it shows: the state, the device's version, the log lines.
#[cfg(feature = "failpoints")]
#[test]
fn against_goosebit_a_trial_rolled_back_at_the_next_boot_becomes_an_error_and_the_old_version() {
    let tmp = tempfile::tempdir().unwrap();
    let gb = GooseBit::start(&tmp.path().join("gb"));
    let env = device(&gb.url, "confirm_required = true\nmax_trial_boots = 1");
    env.put("app/bin", b"v1", 0o644);
    let before = tree(&env.root);
    let pkg = package(&env, "1.1.0", b"a trial nobody confirms", json!({}));
    gb.assign(&pkg, "1.1.0");
    let d = Daemon::start(&env, None);
    let running =
        wait_within(GOOSEBIT_PATIENCE, "gooseBit to show the trial awaiting confirmation", || {
            let dev = gb.device();
            dev["last_log"]
                .as_str()
                .unwrap_or("")
                .contains("installed; the result is final once")
                .then_some(dev)
        });
    assert_eq!(running["last_state_name"], "running", "not finished before confirm: {running:#}");
    assert!(d.sigterm().success());
    let boot = env.tmp.path().join("next-boot-id");
    std::fs::write(&boot, "a-later-boot\n").unwrap();
    let rec = Run::from(
        env.command(&["recover", "--at-boot", "--json"])
            .env("TOPE_BOOT_ID_FILE", &boot)
            .output()
            .unwrap(),
    );
    assert_eq!(
        (rec.code, rec.json()["result"].clone()),
        (Some(4), json!("trial_expired")),
        "{}",
        rec.describe()
    );
    assert_eq!(tree(&env.root), before);
    let _d = Daemon::start(&env, None);
    let dev = wait_within(GOOSEBIT_PATIENCE, "gooseBit to record the error after the boot", || {
        Some(gb.device()).filter(|d| d["last_state_name"] == "error")
    });
    assert!(dev["last_log"].as_str().unwrap().contains("rolled back by transaction 2"), "{dev:#}");
    let dev = wait_within(GOOSEBIT_PATIENCE, "configData naming the factory state again", || {
        Some(gb.device()).filter(|d| d["sw_version"] == "factory")
    });
    assert_eq!(gb.downloads(), 1, "{dev:#}");
}

#[cfg(feature = "failpoints")]
#[test]
fn against_goosebit_a_daemon_killed_mid_swap_finishes_at_its_next_start_and_goosebit_records_it_finished()
 {
    let tmp = tempfile::tempdir().unwrap();
    let gb = GooseBit::start(&tmp.path().join("gb"));
    let env = device(&gb.url, "");
    env.put("app/bin", b"v1", 0o644);
    let pkg = package(&env, "1.1.0", b"survives a kill, with gooseBit", json!({}));
    gb.assign(&pkg, "1.1.0");
    run_until_killed(&env, "swap.file");
    assert_eq!(env.run(&["status", "--json"]).json()["in_flight"]["phase"], "Swapped");
    assert_ne!(gb.device()["last_state_name"], "finished");
    let _d = Daemon::start(&env, None);
    let dev =
        wait_within(GOOSEBIT_PATIENCE, "gooseBit to record the device finished on 1.1.0", || {
            Some(gb.device())
                .filter(|d| d["last_state_name"] == "finished" && d["sw_version"] == "1.1.0")
        });
    assert_eq!(env.read("app/bin").unwrap(), b"survives a kill, with gooseBit");
    assert_eq!(gb.downloads(), 1, "resumed from the journal, not downloaded again: {dev:#}");
}

/// Needs `failpoints`: killed after the action was recorded installing, before its
/// transaction began (`plan.copy_written`): nothing touched; the next start installs it.
#[cfg(feature = "failpoints")]
#[test]
fn a_daemon_killed_before_the_transaction_began_installs_at_its_next_start_from_the_kept_download()
{
    let tmp = tempfile::tempdir().unwrap();
    let server = SpecServer::start(&tmp.path().join("spec"));
    let (env, before) = v1_device(&server, "");
    let pkg = package(&env, "2.1.0", b"installed after a kill before the begin", json!({}));
    server.deploy(22, &[&pkg], "2.1.0", json!({}));
    run_until_killed(&env, "plan.copy_written");
    assert_eq!(tree(&env.root), before, "nothing touched");
    let _second = Daemon::start(&env, None);
    let done = wait_for("action 22 closed after the restart", || {
        Some(server.action(22)).filter(|a| a["active"] == false)
    });
    assert_eq!(done["status"], "FINISHED", "{:?}", course(&done));
    assert!(!course(&done).iter().any(|c| c.ends_with("/failure")), "{:?}", course(&done));
    assert_eq!(env.read("app/bin").unwrap(), b"installed after a kill before the begin");
    let downloads = artifact_gets(&server).len();
    assert_eq!(downloads, 1, "the verified download was kept");
    assert_eq!(server.violations(), json!([]));
}
