//! Service control (SPEC §4): the backend chosen by `service_manager`, and post commands.
//! Everything here does I/O; what to control and in which order is decided in
//! `engine::services`.

pub mod command;
pub mod process;
pub mod systemd;

use crate::config::{Config, ServiceManager};
use crate::engine::services::ServiceRef;
use crate::error::{Error, ErrorCode, Result};
use std::time::Duration;

pub struct Services {
    cfg: Config,
}

impl Services {
    pub fn new(cfg: &Config) -> Services {
        Services { cfg: cfg.clone() }
    }

    pub fn manager(&self) -> ServiceManager {
        self.cfg.service_manager
    }

    /// Before anything is journaled: every service can be started again by this backend.
    pub fn check_startable(&self, services: &[ServiceRef]) -> Result<()> {
        if self.cfg.service_manager != ServiceManager::Process {
            return Ok(());
        }
        for s in services {
            if self.start_command(&s.name).is_none() {
                return Err(Error::new(
                    ErrorCode::ServiceStartFailed,
                    format!(
                        "the package stops service {:?}, but the process backend cannot start it \
                        again: no [services.{:?}] start in the config",
                        s.name, s.name
                    ),
                ));
            }
        }
        Ok(())
    }

    fn start_command(&self, name: &str) -> Option<&str> {
        self.cfg.services.get(name).and_then(|c| c.start.as_deref())
    }

    fn matcher(&self, name: &str) -> process::Matcher {
        process::Matcher::for_service(name, self.cfg.services.get(name))
    }

    pub fn stop(&self, s: &ServiceRef) -> Result<()> {
        let timeout = Duration::from_secs(self.cfg.stop_timeout_s);
        // Logged only when something is stopped: with "none" (also `recover --at-boot`, where
        // the boot starts the services) a line would claim an action that never happens.
        if self.cfg.service_manager != ServiceManager::None {
            tracing::info!(service = s.name, "stopping");
        }
        match self.cfg.service_manager {
            ServiceManager::Systemd => systemd::Systemctl::new(&self.cfg.systemctl)
                .stop(&systemd::unit_name(&s.name), timeout),
            ServiceManager::Process => process::stop(&s.name, &self.matcher(&s.name), timeout),
            ServiceManager::None => Ok(()),
        }
    }

    pub fn start(&self, s: &ServiceRef) -> Result<()> {
        let timeout = Duration::from_secs(self.cfg.start_timeout_s);
        let settle = Duration::from_millis(self.cfg.start_settle_ms);
        if self.cfg.service_manager != ServiceManager::None {
            tracing::info!(service = s.name, "starting");
        }
        match self.cfg.service_manager {
            ServiceManager::Systemd => systemd::Systemctl::new(&self.cfg.systemctl).start(
                &systemd::unit_name(&s.name),
                timeout,
                settle,
            ),
            ServiceManager::Process => {
                let cmd = self.start_command(&s.name).ok_or_else(|| {
                    Error::new(
                        ErrorCode::ServiceStartFailed,
                        format!("{}: no [services.{:?}] start in the config", s.name, s.name),
                    )
                })?;
                process::start(&s.name, &self.matcher(&s.name), cmd, timeout, settle)
            }
            ServiceManager::None => Ok(()),
        }
    }

    /// Runs one post command with `/bin/sh -c` (as the legacy service did), cwd `/`, with
    /// the transaction's id and version in its environment; its output goes to the log.
    pub fn run_post_command(
        &self,
        command: &str,
        module: &str,
        tx: u64,
        version: Option<&str>,
    ) -> Result<()> {
        let limit = Duration::from_secs(self.cfg.post_cmd_timeout_s);
        let mut c = std::process::Command::new("/bin/sh");
        c.arg("-c")
            .arg(command)
            .current_dir("/")
            .env("TOPE_TX_ID", tx.to_string())
            .env("TOPE_VERSION", version.unwrap_or(""));
        tracing::info!(module, command, "post command");
        let failed = |why: String| {
            Error::new(
                ErrorCode::PostCmdFailed,
                format!("module {module}: post command {command:?} {why}"),
            )
        };
        let f = command::run(c, limit).map_err(|e| failed(format!("could not run: {e}")))?;
        for line in f.output().lines() {
            tracing::info!(target: "post_cmd", module, "{line}");
        }
        if f.success() {
            Ok(())
        } else {
            let last = command::last_line(f.output());
            Err(failed(if last.is_empty() {
                f.describe(limit)
            } else {
                format!("{}: {last}", f.describe(limit))
            }))
        }
    }
}
