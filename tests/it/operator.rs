//! The operator's side of the CLI (issue 7): the GUI hook.

use crate::support::*;
use std::path::Path;
use std::time::{Duration, Instant};

fn one_file_package(env: &Env, version: &str) -> String {
    let pkg = env.pkg_path(&format!("app-{version}.zip"));
    let content = format!("app {version}");
    write_package(&pkg, &manifest(version, &[("app", "app", &env.dst("bin/app"))]), &[("app", content.as_bytes())]);
    pkg.to_str().unwrap().to_string()
}

fn wait_for(p: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if p.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn the_gui_command_is_launched_when_an_install_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("gui-ran");
    let env = Env::with_config(&format!("gui.command = \"touch {}\"", marker.display()));
    env.put("bin/app", b"app 1", 0o755);
    let pkg = one_file_package(&env, "2.0.0");
    let j = env.run(&["install", &pkg, "--json"]).json();
    assert_eq!(j["outcome"], "committed");
    assert!(wait_for(&marker), "the GUI command ran");
    // Not for other commands.
    std::fs::remove_file(&marker).unwrap();
    env.ok(&["status"]);
    env.ok(&["rollback"]);
    std::thread::sleep(Duration::from_millis(200));
    assert!(!marker.exists(), "only an install starts the GUI");
}

#[test]
fn a_missing_failing_crashing_or_slow_gui_changes_nothing_about_the_install() {
    let tmp = tempfile::tempdir().unwrap();
    let pidfile = tmp.path().join("slow-gui.pid");
    let commands = [
        "/nonexistent/gui --fullscreen".to_string(),
        "no-such-gui-program".to_string(),
        "/bin/sh -c 'exit 7'".to_string(),
        "/bin/sh -c 'kill -SEGV $$'".to_string(),
        format!("/bin/sh -c 'echo $$ > {}; exec sleep 60'", pidfile.display()),
    ];
    for command in &commands {
        let env = Env::with_config(&format!("gui.command = {command:?}"));
        env.put("bin/app", b"app 1", 0o755);
        let before = tree(&env.root);
        let started = Instant::now();
        let r = env.run(&["install", &one_file_package(&env, "2.0.0"), "--json"]);
        assert_eq!(r.code, Some(0), "{command}: {}", r.describe());
        assert_eq!(r.json()["outcome"], "committed", "{command}");
        assert!(started.elapsed() < Duration::from_secs(30), "{command}: the install did not wait for the GUI");
        assert_eq!(env.read("bin/app").as_deref(), Some(&b"app 2.0.0"[..]));
        // A rejected package stays rejected (exit 3), nothing touched.
        env.ok(&["rollback"]);
        assert_eq!(tree(&env.root), before);
        let bad = env.pkg_path("bad.zip");
        std::fs::write(&bad, b"not a zip").unwrap();
        let r = env.run(&["install", bad.to_str().unwrap()]);
        assert_eq!(r.code, Some(3), "{command}: {}", r.describe());
        assert_eq!(tree(&env.root), before);
        if command.starts_with("/nonexistent") || command.starts_with("no-such") {
            assert!(r.stderr.contains("program not found"), "a missing program is a warning:\n{}", r.describe());
        }
    }
    // The slow GUI outlived the install that started it, in a process group of its own (not
    // the updater's, which is this test's).
    assert!(wait_for(&pidfile), "the slow GUI started");
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let pgrp: i32 = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(2)).and_then(|p| p.parse().ok()).unwrap_or(0);
    assert!(pgrp > 0, "the slow GUI is still running: {stat:?}");
    assert_ne!(pgrp, nix::unistd::getpgrp().as_raw(), "the GUI has a process group of its own");
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgrp), nix::sys::signal::Signal::SIGKILL);
}
