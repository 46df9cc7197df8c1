//! Pausing the real binary at a crash point, so that a test can change the world in the middle
//! of a transaction (fill the disk, change the package) and then let it run on. The binary is
//! started with `FAILPOINTS="<point>=1*sleep(ms)"`; the test waits until its main thread
//! sleeps there (the plan copy on disk), stops it with SIGSTOP (so the pause cannot run out on
//! a loaded machine), does its change, and resumes it with `Paused::finish`.

use crate::support::Run;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The system call the main thread of `pid` is blocked in (`/proc/<pid>/syscall`), if any.
pub fn syscall_of(pid: i32) -> Option<i64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/syscall")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// The fail crate's `sleep(ms)` is `thread::sleep`: `nanosleep`/`clock_nanosleep`. The
/// engine sleeps nowhere else.
pub fn sleeping(pid: i32) -> bool {
    matches!(
        syscall_of(pid),
        Some(n) if n == nix::libc::SYS_clock_nanosleep || n == nix::libc::SYS_nanosleep
    )
}

pub fn stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
        .unwrap_or(false)
}

pub fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

/// A command of ours, stopped (SIGSTOP) while it sleeps at its crash point. Killed if
/// dropped before `finish` (a failing test leaves no stopped process behind).
pub struct Paused {
    child: Option<Child>,
    out: PathBuf,
    err: PathBuf,
}

pub enum Spawned {
    Paused(Paused),
    /// It ended without being caught at the point: it passed it unseen (a loaded machine)
    /// or never reached it.
    Exited(Run),
    /// It was caught after the sleep had already ended; the run is worthless.
    Missed,
}

impl Paused {
    /// Lets it run to its end (at most two minutes) and returns what it did.
    pub fn finish(mut self) -> Run {
        let mut child = self.child.take().expect("finished twice");
        // Not reaped yet, so the pid is still ours.
        if child.try_wait().unwrap().is_none() {
            signal(child.id() as i32, nix::sys::signal::Signal::SIGCONT);
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the command did not end within two minutes after being resumed");
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        Run {
            code: status.code(),
            signal: status.signal(),
            stdout: std::fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.err).unwrap_or_default(),
        }
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `cmd` with `point` armed to sleep `sleep_ms`, waits until its plan copy exists
/// and it sleeps there, and stops it.
pub fn spawn_paused(
    mut cmd: Command,
    point: &str,
    sleep_ms: u64,
    state: &Path,
    scratch: &Path,
) -> Spawned {
    let out = scratch.join("stdout");
    let err = scratch.join("stderr");
    let mark = scratch.join("failpoint.mark");
    let _ = std::fs::remove_file(&mark);
    cmd.env("FAILPOINTS", format!("{point}=1*sleep({sleep_ms})"))
        .env("TOPE_FAILPOINT_MARK", &mark)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    let mut p = Paused { child: Some(cmd.spawn().unwrap()), out, err };
    let pid = p.child.as_ref().map(|c| c.id() as i32).unwrap_or_default();
    let plan_copy = state.join("inflight.plan");
    // The last point the engine reached is `point`: a sleep now is the armed one (the engine
    // sleeps elsewhere too, waiting out clock ticks).
    let at_point = || std::fs::read(&mark).is_ok_and(|m| m == point.as_bytes());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if p.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_some()) {
            return Spawned::Exited(p.finish());
        }
        if plan_copy.exists() && at_point() && sleeping(pid) {
            signal(pid, nix::sys::signal::Signal::SIGSTOP);
            let stop_deadline = Instant::now() + Duration::from_secs(10);
            while !stopped(pid) {
                assert!(Instant::now() < stop_deadline, "the command did not stop on SIGSTOP");
                std::thread::sleep(Duration::from_micros(200));
            }
            // Still in the sleep: nothing after the point has run.
            if at_point() && sleeping(pid) {
                return Spawned::Paused(p);
            }
            let _ = p.finish();
            return Spawned::Missed;
        }
        assert!(Instant::now() < deadline, "the command never reached {point} within a minute");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// How long the armed point sleeps: short, since the test stops the process (SIGSTOP) as
/// soon as it sees the sleep; longer on a retry when a loaded machine missed it.
pub const SLEEPS_MS: [u64; 3] = [40, 250, 2000];
