//! Running an external program with a time limit and captured output (post commands,
//! `systemctl`). The child gets its own process group, so a timeout kills everything it
//! started, and stdin is `/dev/null`, so nothing ever waits for a terminal.

use crate::limits::OUTPUT_KEPT_BYTES;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// After the command exits, how long to wait for its output pipes to close. A command that
/// leaves a background child holding them open must not hang the update.
const PIPE_GRACE: Duration = Duration::from_millis(300);

#[derive(Debug)]
pub enum Finished {
    Exited { status: ExitStatus, output: String },
    TimedOut { output: String },
}

impl Finished {
    pub fn success(&self) -> bool {
        matches!(self, Finished::Exited { status, .. } if status.success())
    }

    pub fn output(&self) -> &str {
        match self {
            Finished::Exited { output, .. } | Finished::TimedOut { output } => output,
        }
    }

    /// "exit status 3", "killed by signal 9", "timed out after 5 s".
    pub fn describe(&self, limit: Duration) -> String {
        use std::os::unix::process::ExitStatusExt;
        match self {
            Finished::Exited { status, .. } => match (status.code(), status.signal()) {
                (Some(c), _) => format!("exit status {c}"),
                (None, Some(s)) => format!("killed by signal {s}"),
                (None, None) => format!("{status}"),
            },
            Finished::TimedOut { .. } => format!("timed out after {} s", limit.as_secs_f64()),
        }
    }
}

/// Runs `cmd` to completion or until `limit`, then kills its whole process group.
pub fn run(mut cmd: Command, limit: Duration) -> std::io::Result<Finished> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let mut child = cmd.spawn()?;
    let (tx, rx) = mpsc::channel::<(usize, Vec<u8>)>();
    for (i, pipe) in [
        child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
        child.stderr.take().map(|p| Box::new(p) as _),
    ]
    .into_iter()
    .enumerate()
    {
        let Some(mut pipe) = pipe else { continue };
        let tx = tx.clone();
        // Chunks are sent as they arrive: output written before a background child took
        // over the pipe is kept even though the pipe never reaches EOF.
        std::thread::spawn(move || {
            let mut sent = 0;
            let mut buf = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let take = n.min(OUTPUT_KEPT_BYTES.saturating_sub(sent));
                if take > 0 && tx.send((i, buf[..take].to_vec())).is_err() {
                    break;
                }
                sent += take;
            }
        });
    }
    drop(tx);
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if status.is_none() {
        #[allow(clippy::cast_possible_wrap, reason = "a pid is below pid_max, at most 2^22")]
        let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
    }
    let mut streams = [Vec::new(), Vec::new()];
    let grace = Instant::now() + PIPE_GRACE;
    while let Ok((i, bytes)) = rx.recv_timeout(grace.saturating_duration_since(Instant::now())) {
        streams[i].extend(bytes);
    }
    let mut output = String::from_utf8_lossy(&streams[0]).into_owned();
    if !streams[1].is_empty() {
        if !output.is_empty() && !output.ends_with('\n') {
            output.push('\n');
        }
        output.push_str(&String::from_utf8_lossy(&streams[1]));
    }
    Ok(match status {
        Some(status) => Finished::Exited { status, output },
        None => Finished::TimedOut { output },
    })
}

/// The last line of some output, trimmed, for one-line error messages.
pub fn last_line(output: &str) -> &str {
    output.lines().rev().find(|l| !l.trim().is_empty()).map_or("", str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(script);
        c
    }

    #[test]
    fn captures_both_streams_and_the_exit_status() {
        let f = run(sh("echo out; echo err >&2; exit 3"), Duration::from_secs(10)).unwrap();
        assert!(!f.success());
        assert_eq!(f.describe(Duration::ZERO), "exit status 3");
        assert!(f.output().contains("out") && f.output().contains("err"), "{:?}", f.output());
    }

    #[test]
    fn a_timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        let script = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let f = run(sh(&script), Duration::from_millis(200)).unwrap();
        assert!(matches!(f, Finished::TimedOut { .. }), "{f:?}");
        std::thread::sleep(Duration::from_millis(2500));
        assert!(!marker.exists(), "a child of the timed-out command survived");
    }

    #[test]
    fn a_background_child_holding_the_pipes_does_not_hang_the_caller() {
        let started = Instant::now();
        let f = run(sh("sleep 20 & echo $!"), Duration::from_secs(10)).unwrap();
        let pid: i32 = f.output().trim().parse().unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        assert!(f.success());
        assert!(started.elapsed() < Duration::from_secs(10), "waited for the background child");
    }
}
