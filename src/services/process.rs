//! The `process` backend, for devices without systemd (SPEC §4): processes are found
//! through `/proc`, stopped with SIGTERM then SIGKILL, and started with the command
//! configured under `[services.NAME] start`.

use crate::config::ServiceConfig;
use crate::error::{Error, ErrorCode, Result};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// After SIGKILL, how long a process may take to disappear (the kernel tears down its
/// memory first; under load that takes a moment).
const KILL_GRACE: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(20);
/// The kernel keeps at most 15 bytes of a process name in `comm`.
const COMM_MAX: usize = 15;

/// How a service's processes are recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    /// `/proc/PID/comm` equals the name (cut to 15 bytes, as the kernel does).
    Comm(String),
    /// `/proc/PID/exe` is this path (also while the file is replaced: "(deleted)").
    Exe(PathBuf),
}

impl Matcher {
    pub fn for_service(name: &str, cfg: Option<&ServiceConfig>) -> Matcher {
        if let Some(exe) = cfg.and_then(|c| c.exe.clone()) {
            Matcher::Exe(exe)
        } else {
            let mut end = name.len().min(COMM_MAX);
            while !name.is_char_boundary(end) {
                end -= 1;
            }
            Matcher::Comm(name[..end].to_string())
        }
    }

    fn matches(&self, pid: &str) -> bool {
        let proc_dir = Path::new("/proc").join(pid);
        match self {
            Matcher::Comm(name) => std::fs::read_to_string(proc_dir.join("comm"))
                .is_ok_and(|c| c.trim_end_matches('\n') == name),
            Matcher::Exe(path) => std::fs::read_link(proc_dir.join("exe")).is_ok_and(|target| {
                let t = target.as_os_str().as_encoded_bytes();
                let t = t.strip_suffix(b" (deleted)").unwrap_or(t);
                t == path.as_os_str().as_encoded_bytes()
            }),
        }
    }
}

/// Live processes matching, never this process itself. Zombies and dead tasks count as
/// gone: they hold no resources and no file open, and cannot be signalled away anyway.
pub fn find(matcher: &Matcher) -> Vec<Pid> {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str() else { continue };
        if !pid.bytes().all(|b| b.is_ascii_digit())
            || pid == me
            || !matcher.matches(pid)
            || is_dead(pid)
        {
            continue;
        }
        if let Ok(n) = pid.parse() {
            out.push(Pid::from_raw(n));
        }
    }
    out
}

/// Zombie (`Z`) or dead (`X`/`x`), from the state field of `/proc/PID/stat` (after the last
/// `)`: the command name may itself contain parentheses). A vanished process is dead too.
fn is_dead(pid: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(Path::new("/proc").join(pid).join("stat")) else {
        return true;
    };
    let state = stat.rfind(')').and_then(|i| stat[i + 1..].trim_start().chars().next());
    matches!(state, Some('Z' | 'X' | 'x') | None)
}

fn signal(pid: Pid, sig: Signal, name: &str) -> Result<()> {
    match kill(pid, sig) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(Error::new(
            ErrorCode::ProcessKillFailed,
            format!("{name}: cannot send {sig} to process {pid}: {}", e.desc()),
        )),
    }
}

/// SIGTERM, wait up to `timeout`, SIGKILL, wait `KILL_GRACE`; every matching process must be
/// gone, as `/proc` shows it. Processes that appear meanwhile (a supervisor restarting one)
/// get the same treatment.
pub fn stop(name: &str, matcher: &Matcher, timeout: Duration) -> Result<()> {
    let mut termed: Vec<Pid> = Vec::new();
    let term_until = Instant::now() + timeout;
    loop {
        let live = find(matcher);
        if live.is_empty() {
            return Ok(());
        }
        if Instant::now() >= term_until {
            break;
        }
        let fresh: Vec<Pid> = live.into_iter().filter(|p| !termed.contains(p)).collect();
        for pid in fresh {
            tracing::info!(service = name, %pid, "SIGTERM");
            signal(pid, Signal::SIGTERM, name)?;
            termed.push(pid);
        }
        std::thread::sleep(POLL);
    }
    let kill_until = Instant::now() + KILL_GRACE;
    let mut killed: Vec<Pid> = Vec::new();
    loop {
        let live = find(matcher);
        if live.is_empty() {
            return Ok(());
        }
        if Instant::now() >= kill_until {
            let pids: Vec<String> = live.iter().map(std::string::ToString::to_string).collect();
            return Err(Error::new(
                ErrorCode::ProcessKillFailed,
                format!(
                    "{name}: process {} still running after SIGTERM, {} s and SIGKILL",
                    pids.join(", "),
                    timeout.as_secs_f64()
                ),
            ));
        }
        let fresh: Vec<Pid> = live.into_iter().filter(|p| !killed.contains(p)).collect();
        for pid in fresh {
            tracing::warn!(service = name, %pid, "did not stop on SIGTERM; SIGKILL");
            signal(pid, Signal::SIGKILL, name)?;
            killed.push(pid);
        }
        std::thread::sleep(POLL);
    }
}

/// Starts the service with its configured command unless a matching process already runs,
/// then requires a matching process to appear within `timeout` and to stay for `settle`.
pub fn start(
    name: &str,
    matcher: &Matcher,
    command: &str,
    timeout: Duration,
    settle: Duration,
) -> Result<()> {
    let failed = |why: String| Error::new(ErrorCode::ServiceStartFailed, format!("{name}: {why}"));
    if find(matcher).is_empty() {
        spawn_detached(command)
            .map_err(|e| failed(format!("cannot run start command {command:?}: {e}")))?;
        tracing::info!(service = name, command, "started");
    } else {
        tracing::info!(service = name, "already running");
    }
    let deadline = Instant::now() + timeout;
    let mut up_since: Option<Instant> = None;
    loop {
        let now = Instant::now();
        match (find(matcher).is_empty(), up_since) {
            (false, Some(t)) if now.duration_since(t) >= settle => return Ok(()),
            (false, None) => up_since = Some(now),
            (true, Some(_)) => {
                return Err(failed(format!(
                    "exited within {} ms of starting (start command {command:?})",
                    settle.as_millis()
                )));
            }
            _ => {}
        }
        if now >= deadline + settle {
            return Err(failed(format!(
                "no process appeared within {} s (start command {command:?})",
                timeout.as_secs_f64()
            )));
        }
        std::thread::sleep(POLL);
    }
}

/// Runs `command` with `/bin/sh -c` in its own process group with stdio on `/dev/null`, so it
/// outlives this process and never holds our terminal. A thread reaps it when it exits, so a
/// long-running updater (the daemon) collects no zombies.
fn spawn_detached(command: &str) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()?;
    std::thread::spawn(move || child.wait());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_names_are_cut_like_the_kernel_cuts_them() {
        assert_eq!(
            Matcher::for_service("a-very-long-service-name", None),
            Matcher::Comm("a-very-long-ser".into())
        );
        let cfg = ServiceConfig { start: None, exe: Some("/opt/x/bin".into()) };
        assert_eq!(Matcher::for_service("x", Some(&cfg)), Matcher::Exe("/opt/x/bin".into()));
    }

    #[test]
    fn this_process_is_never_found() {
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert!(!find(&Matcher::Comm(comm.trim_end().into())).contains(&nix::unistd::getpid()));
    }
}
