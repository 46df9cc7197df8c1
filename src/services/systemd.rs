//! The `systemd` backend (SPEC §4): `systemctl stop|start`, then `systemctl is-active` until
//! the unit is where it should be. The program is configurable (`systemctl = "..."`).

use super::command::{self, Finished};
use crate::error::{Error, ErrorCode, Result};
use std::process::Command;
use std::time::{Duration, Instant};

/// Between `is-active` polls. Each call costs a fork and a D-Bus round trip.
const POLL: Duration = Duration::from_millis(100);
/// Limit for one `is-active` call.
const QUERY_LIMIT: Duration = Duration::from_secs(10);
const UNIT_SUFFIXES: &[&str] = &[
    ".service",
    ".socket",
    ".target",
    ".timer",
    ".path",
    ".mount",
    ".automount",
    ".swap",
    ".slice",
    ".scope",
    ".device",
];

/// `device-api` → `device-api.service`; names with a unit suffix stay as they are.
pub fn unit_name(name: &str) -> String {
    if UNIT_SUFFIXES.iter().any(|s| name.ends_with(s)) {
        name.to_string()
    } else {
        format!("{name}.service")
    }
}

/// The unit this process runs in, from its cgroup (`0::/system.slice/NAME.service`).
pub fn own_unit() -> Option<String> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    cg.lines()
        .filter_map(|l| l.rsplit('/').next())
        .find(|u| u.ends_with(".service"))
        .map(str::to_string)
}

pub struct Systemctl {
    program: String,
    args: Vec<String>,
}

impl Systemctl {
    /// `spec` is the program and leading arguments, split at whitespace.
    pub fn new(spec: &str) -> Systemctl {
        let mut words = spec.split_whitespace().map(str::to_string);
        let program = words.next().unwrap_or_else(|| "systemctl".into());
        Systemctl { program, args: words.collect() }
    }

    fn run(&self, args: &[&str], limit: Duration) -> std::io::Result<Finished> {
        let mut c = Command::new(&self.program);
        c.args(&self.args).args(args);
        command::run(c, limit)
    }

    /// The unit's state as `is-active` prints it (`active`, `inactive`, `failed`,
    /// `activating`, ...). Unknown units are `inactive`.
    fn state(&self, unit: &str) -> std::io::Result<String> {
        let f = self.run(&["is-active", unit], QUERY_LIMIT)?;
        Ok(f.output().lines().next().unwrap_or("").trim().to_string())
    }

    /// Stops the unit and waits until it is not running. A unit that does not exist (a
    /// package installing it for the first time) counts as stopped.
    pub fn stop(&self, unit: &str, timeout: Duration) -> Result<()> {
        let failed =
            |why: String| Error::new(ErrorCode::ServiceStopFailed, format!("{unit}: {why}"));
        if own_unit().as_deref() == Some(unit) {
            tracing::warn!(
                unit,
                "this is tope-updater's own unit: not stopped (its new files take effect at its \
                next restart)"
            );
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        let stopped = self
            .run(&["stop", unit], timeout)
            .map_err(|e| failed(format!("cannot run {}: {e}", self.program)))?;
        if !stopped.success() {
            // Judged by the state below: "not loaded" is fine, anything else shows there.
            tracing::info!(
                unit,
                result = %stopped.describe(timeout),
                output = command::last_line(stopped.output()),
                "systemctl stop"
            );
        }
        loop {
            let state = self
                .state(unit)
                .map_err(|e| failed(format!("cannot run {}: {e}", self.program)))?;
            if matches!(state.as_str(), "inactive" | "failed" | "unknown" | "") {
                tracing::info!(unit, state, "stopped");
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(failed(format!(
                    "still {state} after {} s ({})",
                    timeout.as_secs_f64(),
                    command::last_line(stopped.output())
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Starts the unit and waits until it is active and stays active for `settle`.
    pub fn start(&self, unit: &str, timeout: Duration, settle: Duration) -> Result<()> {
        let failed =
            |why: String| Error::new(ErrorCode::ServiceStartFailed, format!("{unit}: {why}"));
        let deadline = Instant::now() + timeout;
        let started = self
            .run(&["start", unit], timeout)
            .map_err(|e| failed(format!("cannot run {}: {e}", self.program)))?;
        if !started.success() {
            return Err(failed(format!(
                "systemctl start: {} ({})",
                started.describe(timeout),
                command::last_line(started.output())
            )));
        }
        let mut active_since: Option<Instant> = None;
        loop {
            let state = self
                .state(unit)
                .map_err(|e| failed(format!("cannot run {}: {e}", self.program)))?;
            let now = Instant::now();
            match state.as_str() {
                "active" | "reloading" => match active_since {
                    Some(t) if now.duration_since(t) >= settle => {
                        tracing::info!(unit, "started");
                        return Ok(());
                    }
                    Some(_) => {}
                    None => active_since = Some(now),
                },
                "failed" | "inactive" => return Err(failed(format!("{state} after start"))),
                _ => active_since = None,
            }
            if now >= deadline + settle {
                return Err(failed(format!(
                    "not active {} s after start (state: {state})",
                    timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(POLL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names_get_service_appended_only_without_a_unit_suffix() {
        assert_eq!(unit_name("device-api"), "device-api.service");
        assert_eq!(unit_name("klippy.service"), "klippy.service");
        assert_eq!(unit_name("gui.target"), "gui.target");
        assert_eq!(unit_name("voice.app"), "voice.app.service");
    }

    #[test]
    fn the_program_string_is_split_into_program_and_arguments() {
        let s = Systemctl::new("  ssh  guest systemctl ");
        assert_eq!(s.program, "ssh");
        assert_eq!(s.args, ["guest", "systemctl"]);
    }
}
