//! The GUI hook (legacy FR-022/023): when an install starts, `gui.command` is launched so the
//! device's screen can show the update (it polls `GET /api/v1.0/progress`).
//!
//! Fire and forget: the command runs with `/bin/sh -c`, in its own process group (a Ctrl-C or
//! a signal to the updater's group does not reach it), with stdin, stdout and stderr on
//! `/dev/null`. The update never waits for it; a background thread only reaps it (no zombie
//! in the daemon) and logs a warning if it fails. A command whose program does not exist, that
//! cannot be started, that fails or crashes changes nothing about the update: at most a
//! warning in the log.

use crate::config::Config;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Launches `gui.command` if it is set and its program exists. Never fails.
pub fn launch(cfg: &Config) {
    if let Some(command) = cfg.gui.command.as_deref() {
        let _ = spawn(command);
    }
}

/// Starts `command` detached; returns its pid, or `None` (after a warning) if it was not
/// started.
pub fn spawn(command: &str) -> Option<u32> {
    let Some(program) = command.split_whitespace().next() else {
        tracing::warn!("gui.command is empty: no GUI started");
        return None;
    };
    if find_program(program, std::env::var_os("PATH").as_deref()).is_none() {
        tracing::warn!(command, program, "gui.command: program not found; no GUI started");
        return None;
    }
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(command, error = %e, "gui.command could not be started");
            return None;
        }
    };
    let pid = child.id();
    tracing::info!(command, pid, "GUI started");
    let command = command.to_string();
    let reaper =
        std::thread::Builder::new().name("gui-reaper".into()).spawn(move || match child.wait() {
            Ok(status) if !status.success() => {
                tracing::warn!(command, %status, "gui.command ended with a failure");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(command, error = %e, "gui.command: waiting for it failed"),
        });
    if let Err(e) = reaper {
        // Only a zombie until the updater exits.
        tracing::warn!(error = %e, "gui.command: no thread to reap it");
    }
    Some(pid)
}

/// The executable `program` names: a path (with a `/`) as it is, a bare name looked up in
/// `path` (`$PATH`), like the shell does.
pub fn find_program(program: &str, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    let executable =
        |p: &Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    std::env::split_paths(path?).map(|dir| dir.join(program)).find(|p| executable(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

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
    fn programs_are_found_by_path_or_in_path() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("gui-app");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = dir.path().join("not-executable");
        std::fs::write(&plain, "").unwrap();
        let path = std::env::join_paths(["/nonexistent", dir.path().to_str().unwrap()]).unwrap();
        assert_eq!(find_program("gui-app", Some(&path)), Some(exe.clone()));
        assert_eq!(find_program(exe.to_str().unwrap(), None), Some(exe));
        assert_eq!(find_program("not-executable", Some(&path)), None);
        assert_eq!(find_program(plain.to_str().unwrap(), None), None);
        assert_eq!(find_program("gui-app", None), None);
        assert_eq!(find_program("/nonexistent/gui", Some(&path)), None);
    }

    #[test]
    fn an_existing_command_runs_detached_in_its_own_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("marker");
        let pid = spawn(&format!(
            "/bin/sh -c 'read -r _ _ _ _ pgrp _ < /proc/$$/stat; echo $pgrp > \
                {}.tmp; mv {0}.tmp {0}'",
            marker.display()
        ))
        .expect("started");
        assert!(wait_for(&marker), "the command ran");
        let pgid: u32 = std::fs::read_to_string(&marker).unwrap().trim().parse().unwrap_or(0);
        // `sh -c CMD` may exec CMD: either way the group is the one spawn created.
        assert_eq!(pgid, pid, "own process group");
    }

    #[test]
    fn a_missing_program_or_an_empty_command_is_not_started() {
        assert_eq!(spawn("/nonexistent/gui --fullscreen"), None);
        assert_eq!(spawn("no-such-gui-program-anywhere"), None);
        assert_eq!(spawn("   "), None);
    }
}
