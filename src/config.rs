//! Configuration (SPEC §6): TOML, every key defaulted, unknown keys rejected so typos are loud.

use crate::error::{Error, ErrorCode, Result};
use crate::limits::CONFIG_BYTES_MAX;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/tope-updater/config.toml";
pub const CONFIG_ENV: &str = "TOPE_UPDATER_CONFIG";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceManager {
    Systemd,
    Process,
    None,
}

/// What `recover` does when both resuming and rolling back are possible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecoveryPolicy {
    Resume,
    Rollback,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub state_dir: PathBuf,
    pub allowed_roots: Vec<PathBuf>,
    pub service_manager: ServiceManager,
    pub systemctl: String,
    pub stop_timeout_s: u64,
    pub start_timeout_s: u64,
    /// A started service must stay active (running) this long to count as started: a
    /// `Type=simple` unit is "active" the moment it forks, even if it dies a moment later.
    pub start_settle_ms: u64,
    /// Time limit of each post command.
    pub post_cmd_timeout_s: u64,
    pub keep_generations: u32,
    pub recovery: RecoveryPolicy,
    pub require_signature: bool,
    pub trusted_keys: Vec<PathBuf>,
    pub confirm_required: bool,
    pub max_trial_boots: u32,
    /// Device model; a package naming a `compatible` must match it.
    pub compatible: Option<String>,
    pub max_package_bytes: u64,
    pub max_unpacked_bytes: u64,
    /// Largest allowed ratio of declared unpacked bytes to compressed bytes, per entry
    /// (entries under 64 KiB unpacked are exempt: tiny files compress absurdly well).
    pub max_compression_ratio: u64,
    pub max_recovery_attempts: u32,
    pub api: ApiConfig,
    pub reporter: ReporterConfig,
    pub download: DownloadConfig,
    pub log: LogConfig,
    pub gui: GuiConfig,
    pub services: BTreeMap<String, ServiceConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: String,
    pub result_hold_s: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReporterConfig {
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownloadConfig {
    pub trust_window_h: u64,
    pub retries: u32,
    pub allow_http: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub file: Option<PathBuf>,
    pub level: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuiConfig {
    pub command: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// Process backend: the shell command that starts the service (run with `/bin/sh -c`,
    /// detached).
    pub start: Option<String>,
    /// Process backend: find the service's processes by this executable path instead of by
    /// `/proc/PID/comm`.
    pub exe: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: PathBuf::from("/var/lib/tope-updater"),
            allowed_roots: vec![PathBuf::from("/opt/tope")],
            service_manager: ServiceManager::Systemd,
            systemctl: "systemctl".into(),
            stop_timeout_s: 10,
            start_timeout_s: 30,
            start_settle_ms: 1000,
            post_cmd_timeout_s: 300,
            keep_generations: 3,
            recovery: RecoveryPolicy::Resume,
            require_signature: false,
            trusted_keys: Vec::new(),
            confirm_required: false,
            max_trial_boots: 3,
            compatible: None,
            max_package_bytes: 2 * 1024 * 1024 * 1024,
            max_unpacked_bytes: 4 * 1024 * 1024 * 1024,
            max_compression_ratio: 250,
            max_recovery_attempts: 5,
            api: ApiConfig::default(),
            reporter: ReporterConfig::default(),
            download: DownloadConfig::default(),
            log: LogConfig::default(),
            gui: GuiConfig::default(),
            services: BTreeMap::new(),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig { listen: "127.0.0.1:12315".into(), result_hold_s: 60 }
    }
}

impl Default for ReporterConfig {
    fn default() -> Self {
        ReporterConfig { url: "http://127.0.0.1:9080/api/v1.0/ota/report".into() }
    }
}

impl Default for DownloadConfig {
    fn default() -> Self {
        DownloadConfig { trust_window_h: 24, retries: 3, allow_http: false }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { file: None, level: "info".into() }
    }
}

/// Where the effective configuration came from, for `tope-updater config`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum ConfigSource {
    Defaults,
    File(PathBuf),
}

impl Config {
    /// `--config PATH`, else `$TOPE_UPDATER_CONFIG`, else the default path if it exists, else
    /// defaults. A file named explicitly must exist.
    pub fn load(explicit: Option<&Path>) -> Result<(Config, ConfigSource)> {
        let env = std::env::var_os(CONFIG_ENV).map(PathBuf::from);
        let (path, required) = match (explicit, env) {
            (Some(p), _) => (p.to_path_buf(), true),
            (None, Some(p)) => (p, true),
            (None, None) => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        if !required && !path.exists() {
            return Ok((Config::default(), ConfigSource::Defaults));
        }
        let bad = |msg: String| Error::new(ErrorCode::ValidationError, format!("config {}: {msg}", path.display()));
        let meta = std::fs::metadata(&path).map_err(|e| bad(e.to_string()))?;
        if meta.len() > CONFIG_BYTES_MAX {
            return Err(bad(format!("larger than {CONFIG_BYTES_MAX} bytes")));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let cfg = Config::parse(&text).map_err(|e| bad(e.message))?;
        Ok((cfg, ConfigSource::File(path)))
    }

    pub fn parse(text: &str) -> Result<Config> {
        let cfg: Config = toml::from_str(text).map_err(|e| Error::new(ErrorCode::ValidationError, e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::new(ErrorCode::ValidationError, m.to_string()));
        if !self.state_dir.is_absolute() {
            return bad("state_dir must be an absolute path");
        }
        if self.allowed_roots.is_empty() || self.allowed_roots.iter().any(|r| !r.is_absolute() || r == Path::new("/")) {
            return bad("allowed_roots must be non-empty absolute paths other than /");
        }
        if self.keep_generations == 0 {
            return bad("keep_generations must be at least 1");
        }
        if self.max_recovery_attempts == 0 {
            return bad("max_recovery_attempts must be at least 1");
        }
        if self.require_signature && self.trusted_keys.is_empty() {
            return bad("require_signature = true needs at least one trusted_keys entry");
        }
        if self.max_trial_boots == 0 {
            return bad("max_trial_boots must be at least 1");
        }
        if self.systemctl.split_whitespace().next().is_none() {
            return bad("systemctl must name a program");
        }
        if self.services.values().any(|s| s.exe.as_ref().is_some_and(|e| !e.is_absolute())) {
            return bad("[services.NAME] exe must be an absolute path");
        }
        if self.max_compression_ratio == 0 {
            return bad("max_compression_ratio must be at least 1");
        }
        if self.log.level.parse::<tracing::level_filters::LevelFilter>().is_err() {
            return bad("[log] level must be one of off, error, warn, info, debug, trace");
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_every_default() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn unknown_key_is_a_validation_error() {
        let e = Config::parse("stat_dir = \"/x\"").unwrap_err();
        assert_eq!(e.code, ErrorCode::ValidationError);
        assert!(e.message.contains("stat_dir"), "{}", e.message);
    }

    #[test]
    fn relative_state_dir_is_rejected() {
        assert_eq!(Config::parse("state_dir = \"var/x\"").unwrap_err().code, ErrorCode::ValidationError);
    }

    #[test]
    fn a_bad_log_level_is_a_validation_error() {
        let e = Config::parse("[log]\nlevel = \"loud\"").unwrap_err();
        assert_eq!(e.code, ErrorCode::ValidationError);
        assert!(e.message.contains("level"), "{}", e.message);
        assert_eq!(Config::parse("[log]\nlevel = \"DEBUG\"").unwrap().log.level, "DEBUG");
    }

    #[test]
    fn rendered_defaults_parse_back_to_defaults() {
        let text = Config::default().to_toml();
        assert_eq!(Config::parse(&text).unwrap(), Config::default());
    }
}
