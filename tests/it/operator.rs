//! The operator's side of the CLI (issue 7): `--help` examples, completions and the man page,
//! `config` with the source of each key, the log file, the GUI hook, and no progress bar when
//! stderr is not a terminal.

use crate::support::*;
use clap::CommandFactory;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn subcommands() -> Vec<String> {
    tope_updater::cli::Cli::command()
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| s.get_name().to_string())
        .collect()
}

/// The binary with no configuration at all (and none needed).
fn bare(args: &[&str]) -> Run {
    Run::from(
        Command::new(BIN)
            .args(args)
            .env_remove("TOPE_UPDATER_CONFIG")
            .env("NO_COLOR", "1")
            .output()
            .unwrap(),
    )
}

#[test]
fn every_subcommand_help_shows_examples() {
    let subs = subcommands();
    assert!(subs.len() >= 15, "{subs:?}");
    for sub in &subs {
        let r = bare(&[sub, "--help"]);
        assert_eq!(r.code, Some(0), "{}", r.describe());
        assert!(r.stdout.contains("Example"), "`{sub} --help` has no examples:\n{}", r.stdout);
        assert!(
            r.stdout.contains(&format!("tope-updater {sub}")),
            "`{sub} --help` examples use the command:\n{}",
            r.stdout
        );
    }
    assert!(
        bare(&["--help"]).stdout.contains("Exit statuses"),
        "the top-level help names the exit statuses"
    );
}

#[test]
fn completions_for_bash_zsh_and_fish_need_no_configuration() {
    for shell in ["bash", "zsh", "fish"] {
        // A config that cannot be read does not matter: completions come from the definitions.
        let r = bare(&["--config", "/nonexistent/config.toml", "completions", shell]);
        assert_eq!(r.code, Some(0), "{shell}: {}", r.describe());
        assert!(
            r.stdout.contains("tope-updater")
                && r.stdout.contains("rollback")
                && r.stdout.contains("allow-downgrade"),
            "{shell}"
        );
    }
    assert_eq!(bare(&["completions", "tcsh"]).code, Some(2), "an unknown shell is a usage error");
}

#[test]
fn the_man_page_is_roff_and_mentions_every_subcommand() {
    let r = bare(&["man"]);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    assert!(r.stdout.contains(".TH tope-updater 1"), "{}", &r.stdout[..r.stdout.len().min(400)]);
    for section in [".SH NAME", ".SH SYNOPSIS", ".SH COMMANDS", ".SH EXTRA"] {
        assert!(r.stdout.contains(section), "no {section}");
    }
    for sub in subcommands() {
        assert!(r.stdout.contains(&format!(".SS {sub}\n")), "the man page does not describe {sub}");
    }
    assert!(r.stdout.contains("\\-\\-allow\\-downgrade"), "subcommand options are in it");
    // man(1) renders it, when it is installed.
    let page = std::env::temp_dir().join(format!("tope-updater-{}.1", std::process::id()));
    std::fs::write(&page, &r.stdout).unwrap();
    if let Ok(o) = Command::new("man")
        .arg("-l")
        .arg(&page)
        .env("MANWIDTH", "80")
        .env("MANPAGER", "cat")
        .output()
        && o.status.success()
    {
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains("COMMANDS") && text.contains("tope-updater install"), "{text}");
    }
    let _ = std::fs::remove_file(page);
}

#[test]
fn config_says_which_keys_came_from_the_file() {
    let env = Env::with_config(
        "keep_generations = 2\n[api]\nlisten = \"127.0.0.1:1\"\n[services.klippy]\nstart = \"run\"",
    );
    let j = env.run(&["config", "--json"]).json();
    assert_eq!(j["source"], env.config.to_str().unwrap());
    assert_eq!(j["config"]["keep_generations"], 2);
    let keys = &j["keys"];
    for k in [
        "state_dir",
        "allowed_roots",
        "service_manager",
        "keep_generations",
        "api.listen",
        "services.klippy.start",
    ] {
        assert_eq!(keys[k], "file", "{k}: {keys}");
    }
    for k in [
        "max_recovery_attempts",
        "api.result_hold_s",
        "log.level",
        "log.file",
        "compatible",
        "gui.command",
        "services.klippy.exe",
    ] {
        assert_eq!(keys[k], "default", "{k}: {keys}");
    }

    let out = env.ok(&["config"]);
    let (head, body) = out.split_once('\n').unwrap();
    assert!(head.starts_with('#') && head.contains(env.config.to_str().unwrap()), "{head}");
    assert!(body.lines().any(|l| l == "keep_generations = 2  # file"), "{out}");
    assert!(body.lines().any(|l| l == "max_recovery_attempts = 5  # default"), "{out}");
    assert!(body.lines().any(|l| l == "listen = \"127.0.0.1:1\"  # file"), "{out}");
    assert!(
        body.lines().any(|l| l == "# compatible: unset  # default"),
        "unset keys are listed:\n{out}"
    );
    let t: toml::Table =
        toml::from_str(body).unwrap_or_else(|e| panic!("still TOML ({e}):\n{out}"));
    assert_eq!(t["api"]["result_hold_s"].as_integer(), Some(60));
}

#[test]
fn config_from_an_empty_file_says_every_key_is_the_default() {
    // An empty file (the default path may exist on this machine, so name one).
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let r = Run::from(
        Command::new(BIN)
            .args(["config", "--json"])
            .env("TOPE_UPDATER_CONFIG", &empty)
            .output()
            .unwrap(),
    );
    let j = r.json();
    let keys = j["keys"].as_object().unwrap();
    assert!(
        keys.len() >= 25 && keys.contains_key("state_dir") && keys.contains_key("api.listen"),
        "{keys:?}"
    );
    assert!(keys.values().all(|v| v == "default"), "{keys:?}");
}

fn one_file_package(env: &Env, version: &str) -> String {
    let pkg = env.pkg_path(&format!("app-{version}.zip"));
    let content = format!("app {version}");
    write_package(
        &pkg,
        &manifest(version, &[("app", "app", &env.dst("bin/app"))]),
        &[("app", content.as_bytes())],
    );
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
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{command}: the install did not wait for the GUI"
        );
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
            assert!(
                r.stderr.contains("program not found"),
                "a missing program is a warning:\n{}",
                r.describe()
            );
        }
    }
    // The slow GUI outlived the install that started it, in a process group of its own (not
    // the updater's, which is this test's).
    assert!(wait_for(&pidfile), "the slow GUI started");
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let pgrp: i32 = stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(2))
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    assert!(pgrp > 0, "the slow GUI is still running: {stat:?}");
    assert_ne!(pgrp, nix::unistd::getpgrp().as_raw(), "the GUI has a process group of its own");
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgrp),
        nix::sys::signal::Signal::SIGKILL,
    );
}

fn log_file_env(log: &Path) -> Env {
    Env::with_config(&format!("[log]\nfile = {:?}\nlevel = \"info\"", log.to_str().unwrap()))
}

#[test]
fn the_log_file_gets_timestamped_lines_and_its_absence_is_only_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("logs/tope-updater.log");
    let env = log_file_env(&log);
    env.put("bin/app", b"app 1", 0o755);
    env.ok(&["install", &one_file_package(&env, "2.0.0")]);
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("transaction committed"))
        .unwrap_or_else(|| panic!("{text}"));
    let stamp = line.split_whitespace().next().unwrap();
    assert!(
        stamp.len() >= 20 && stamp.as_bytes()[10] == b'T' && stamp.ends_with('Z'),
        "ISO 8601 UTC: {line}"
    );
    assert_eq!(line.split_whitespace().nth(1), Some("INFO"), "{line}");
    assert!(!text.contains('\x1b'), "no colour in the file");

    // A log file under a regular file cannot be opened: a warning, and the update goes on.
    std::fs::write(tmp.path().join("plain"), b"").unwrap();
    let env = log_file_env(&tmp.path().join("plain/sub/x.log"));
    env.put("bin/app", b"app 1", 0o755);
    let r = env.run(&["install", &one_file_package(&env, "2.0.0")]);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    assert!(r.stderr.contains("warning: log file"), "{}", r.describe());
    assert!(
        r.stderr.contains("transaction committed"),
        "stderr still has the log:\n{}",
        r.describe()
    );
}

#[test]
fn log_levels_come_from_the_flag_then_the_config_and_bad_ones_are_refused() {
    let env = Env::with_config("[log]\nlevel = \"warn\"");
    env.put("bin/app", b"app 1", 0o755);
    let r = env.run(&["install", &one_file_package(&env, "2.0.0")]);
    assert!(!r.stderr.contains("INFO"), "[log] level = warn:\n{}", r.describe());
    let r = env.run(&["--log-level", "info", "rollback"]);
    assert!(r.stderr.contains("INFO"), "--log-level overrides the config:\n{}", r.describe());
    let r = env.run(&["--log-level", "loud", "status"]);
    assert_eq!(r.code, Some(2), "{}", r.describe());
    let bad = Env::with_config("[log]\nlevel = \"loud\"");
    let r = bad.run(&["status"]);
    assert_eq!(r.code, Some(1), "{}", r.describe());
    assert_eq!(r.error_code().as_deref(), Some("VALIDATION_ERROR"));
}

#[test]
fn when_stderr_is_the_journal_each_line_carries_its_priority_and_no_timestamp() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::with_config("[log]\nlevel = \"info\"");
    env.put("bin/app", b"app 1", 0o755);
    let pkg = one_file_package(&env, "2.0.0");
    let err_path = env.tmp.path().join("journal-stream");
    let err = std::fs::File::create(&err_path).unwrap();
    let meta = err.metadata().unwrap();
    let o = env
        .command(&["install", &pkg])
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(err)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let text = std::fs::read_to_string(&err_path).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("transaction committed"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.starts_with("<6>") && line.contains("INFO") && line.contains("tx=1"),
        "priority prefix, level, fields: {line}"
    );
    assert_eq!(
        line[3..].split_whitespace().next(),
        Some("INFO"),
        "journald stamps entries itself, no timestamp: {line}"
    );
    // The same stream, redirected: JOURNAL_STREAM no longer matches, plain lines.
    let other = env.tmp.path().join("other");
    let o = env
        .command(&["rollback"])
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(std::fs::File::create(&other).unwrap())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let text = std::fs::read_to_string(&other).unwrap();
    assert!(text.lines().all(|l| !l.starts_with('<')), "{text}");
}

#[test]
fn without_a_terminal_install_draws_no_progress_bar_and_logs_without_colour() {
    let env = Env::new();
    env.put("bin/app", b"app 1", 0o755);
    let pkg = one_file_package(&env, "2.0.0");
    // No NO_COLOR here: colour must depend on the terminal alone.
    let o = Command::new(BIN)
        .arg("--config")
        .arg(&env.config)
        .args(["install", &pkg])
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    let r = Run::from(o);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    assert!(
        !r.stderr.contains('\r') && !r.stderr.contains("Validating"),
        "no bar:\n{}",
        r.describe()
    );
    assert!(!r.stderr.contains('\x1b'), "no escapes in a pipe:\n{:?}", r.stderr);
    assert!(r.stderr.contains(" INFO transaction committed"), "{}", r.describe());
}
