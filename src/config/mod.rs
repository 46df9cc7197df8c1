//! Configuration (SPEC §6): TOML, every key defaulted, unknown keys rejected so typos are loud.

pub use crate::engine::recovery::RecoveryPolicy;
use crate::error::{Error, ErrorCode, Result};
use crate::limits::CONFIG_BYTES_MAX;

pub mod ddi;
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
    /// `Verified` re-reads every staged file from the medium (its pages dropped after the
    /// flush) instead of checking that each target is the staged inode: for SD cards and eMMC
    /// that acknowledge writes they lose.
    pub verify_from_media: bool,
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
    /// The hawkBit DDI client (`src/ddi`): off unless the table is present.
    pub ddi: Option<ddi::DdiConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: String,
    pub result_hold_s: u64,
    /// Web origins (`scheme://host[:port]`) whose requests are served. A request carrying any
    /// other `Origin` header is refused: it comes from a web page in a browser.
    pub allowed_origins: Vec<String>,
    /// Host names a request's `Host` may name besides loopback addresses and `localhost`
    /// (for a daemon deliberately bound to another address). Anything else is DNS rebinding.
    pub allowed_hosts: Vec<String>,
    /// When non-empty, only local processes running as one of these uids are served (the
    /// peer's uid read from `/proc/net/tcp*`); off by default, for drop-in compatibility.
    pub allowed_uids: Vec<u32>,
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
            verify_from_media: false,
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
            ddi: None,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: "127.0.0.1:12315".into(),
            result_hold_s: 60,
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            allowed_uids: Vec::new(),
        }
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

/// Where one effective setting came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyOrigin {
    File,
    Default,
}

/// Every setting by its dotted name (`state_dir`, `api.listen`, `services.klippy.start`) and
/// where it came from. An unset optional key and an empty table (`services`) are listed too.
pub type KeyOrigins = BTreeMap<String, KeyOrigin>;

impl Config {
    /// `--config PATH`, else `$TOPE_UPDATER_CONFIG`, else the default path if it exists, else
    /// defaults. A file named explicitly must exist.
    pub fn load(explicit: Option<&Path>) -> Result<(Config, ConfigSource)> {
        Config::load_with_origins(explicit).map(|(cfg, source, _)| (cfg, source))
    }

    /// `load`, plus where each setting came from: the file is parsed a second time into a
    /// plain TOML table to see which keys it names.
    pub fn load_with_origins(
        explicit: Option<&Path>,
    ) -> Result<(Config, ConfigSource, KeyOrigins)> {
        let env = std::env::var_os(CONFIG_ENV).map(PathBuf::from);
        let (path, required) = match (explicit, env) {
            (Some(p), _) => (p.to_path_buf(), true),
            (None, Some(p)) => (p, true),
            (None, None) => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        if !required && !path.exists() {
            let cfg = Config::default();
            let origins = cfg.key_origins(&toml::Table::new());
            return Ok((cfg, ConfigSource::Defaults, origins));
        }
        let bad = |msg: String| {
            Error::new(ErrorCode::ValidationError, format!("config {}: {msg}", path.display()))
        };
        let meta = std::fs::metadata(&path).map_err(|e| bad(e.to_string()))?;
        if meta.len() > CONFIG_BYTES_MAX {
            return Err(bad(format!("larger than {CONFIG_BYTES_MAX} bytes")));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let cfg = Config::parse(&text).map_err(|e| bad(e.message))?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let origins = cfg.key_origins(&table);
        Ok((cfg, ConfigSource::File(path), origins))
    }

    /// Where each of this configuration's settings came from, given the table the file
    /// parsed to: a key the file names is `File`, every other one `Default`.
    pub fn key_origins(&self, file: &toml::Table) -> KeyOrigins {
        let mut out = KeyOrigins::new();
        if let Ok(serde_json::Value::Object(all)) = serde_json::to_value(self) {
            collect_origins(&all, Some(file), "", &mut out);
        }
        out
    }

    pub fn parse(text: &str) -> Result<Config> {
        let cfg: Config = toml::from_str(text)
            .map_err(|e| Error::new(ErrorCode::ValidationError, e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::new(ErrorCode::ValidationError, m.to_string()));
        if !self.state_dir.is_absolute() {
            return bad("state_dir must be an absolute path");
        }
        if self.allowed_roots.is_empty()
            || self.allowed_roots.iter().any(|r| !r.is_absolute() || r == Path::new("/"))
        {
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
        self.api.validate()?;
        self.ddi.as_ref().map_or(Ok(()), ddi::DdiConfig::validate)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

impl ApiConfig {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::new(ErrorCode::ValidationError, m));
        let max = crate::limits::API_ALLOW_LIST_MAX;
        if self.allowed_origins.len() > max
            || self.allowed_hosts.len() > max
            || self.allowed_uids.len() > max
        {
            return bad(format!(
                "[api] allowed_origins, allowed_hosts and allowed_uids hold at most {max} entries \
                each"
            ));
        }
        for o in &self.allowed_origins {
            if !is_origin(o) {
                return bad(format!(
                    "[api] allowed_origins entry {o:?}: expected scheme://host[:port] (http or \
                    https, no path); \"null\" is never allowed"
                ));
            }
        }
        for h in &self.allowed_hosts {
            if !is_host_name(h) {
                return bad(format!(
                    "[api] allowed_hosts entry {h:?}: expected a host name or IP address without \
                    a port"
                ));
            }
        }
        Ok(())
    }
}

/// Walks the effective settings (as JSON, so unset optional keys appear as null) beside the
/// file's table.
fn collect_origins(
    all: &serde_json::Map<String, serde_json::Value>,
    file: Option<&toml::Table>,
    prefix: &str,
    out: &mut KeyOrigins,
) {
    for (key, value) in all {
        let name = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        let in_file = file.and_then(|t| t.get(key));
        match value {
            serde_json::Value::Object(inner) if !inner.is_empty() => {
                collect_origins(inner, in_file.and_then(|v| v.as_table()), &name, out);
            }
            _ => {
                out.insert(
                    name,
                    if in_file.is_some() { KeyOrigin::File } else { KeyOrigin::Default },
                );
            }
        }
    }
}

/// `scheme://host[:port]` as a browser sends it in `Origin` (http or https, nothing after).
pub fn is_origin(o: &str) -> bool {
    let Ok(uri) = o.parse::<http::Uri>() else { return false };
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    let bare = uri.authority().is_some_and(|a| !a.as_str().contains('@'))
        && !o.ends_with('/')
        && uri.query().is_none();
    scheme_ok && bare && uri.path() == "/"
}

/// A host name or IP address as `api.allowed_hosts` holds it (no port, no brackets needed).
pub fn is_host_name(h: &str) -> bool {
    let inner = h.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(h);
    !inner.is_empty()
        && (inner.parse::<std::net::IpAddr>().is_ok()
            || inner.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'))
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
        assert_eq!(
            Config::parse("state_dir = \"var/x\"").unwrap_err().code,
            ErrorCode::ValidationError
        );
    }

    #[test]
    fn a_bad_log_level_is_a_validation_error() {
        let e = Config::parse("[log]\nlevel = \"loud\"").unwrap_err();
        assert_eq!(e.code, ErrorCode::ValidationError);
        assert!(e.message.contains("level"), "{}", e.message);
        assert_eq!(Config::parse("[log]\nlevel = \"DEBUG\"").unwrap().log.level, "DEBUG");
    }

    fn origins_of(text: &str) -> KeyOrigins {
        Config::parse(text).unwrap().key_origins(&toml::from_str(text).unwrap())
    }

    #[test]
    fn key_origins_say_which_keys_the_file_set_nested_tables_too() {
        let o = origins_of(
            "keep_generations = 2\n[api]\nlisten = \"0.0.0.0:1\"\n[services.klippy]\nstart = \
            \"run\"\n",
        );
        assert_eq!(o["keep_generations"], KeyOrigin::File);
        assert_eq!(o["state_dir"], KeyOrigin::Default);
        assert_eq!(o["api.listen"], KeyOrigin::File);
        assert_eq!(o["api.result_hold_s"], KeyOrigin::Default);
        assert_eq!(o["services.klippy.start"], KeyOrigin::File);
        assert_eq!(o["services.klippy.exe"], KeyOrigin::Default, "unset optional keys are listed");
        assert_eq!(o["compatible"], KeyOrigin::Default);
        assert_eq!(o["log.file"], KeyOrigin::Default);
        assert!(!o.contains_key("services"), "a non-empty table is listed by its keys");
        let d = origins_of("");
        assert!(d.values().all(|o| *o == KeyOrigin::Default), "{d:?}");
        assert_eq!(d["services"], KeyOrigin::Default, "an empty table is one entry");
        assert_eq!(
            d.len(),
            o.len() - 1,
            "the same keys, with services.klippy.{{start,exe}} for services"
        );
    }

    /// Dotted names of every key a TOML text names, commented-out ones (`# key = value`, under
    /// `# [table]` headers too) included; `services.NAME.` becomes `services.*.`.
    fn keys_named_in(text: &str) -> std::collections::BTreeSet<String> {
        fn leaves(t: &toml::Table, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
            for (k, v) in t {
                let name = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                match v.as_table() {
                    Some(inner) if !inner.is_empty() => leaves(inner, &name, out),
                    _ => {
                        out.insert(name);
                    }
                }
            }
        }
        let mut section = String::new();
        let mut out = std::collections::BTreeSet::new();
        for line in text.lines() {
            let content = line.trim_start().trim_start_matches('#').trim();
            let Ok(t) = toml::from_str::<toml::Table>(content) else { continue };
            if content.starts_with('[') {
                section = content.trim_matches(|c| c == '[' || c == ']').to_string();
                out.remove(&section);
                continue;
            }
            leaves(&t, &section, &mut out);
        }
        out.into_iter()
            .map(|k| match k.strip_prefix("services.").and_then(|r| r.split_once('.')) {
                Some((_, key)) => format!("services.*.{key}"),
                None => k,
            })
            .collect()
    }

    const EXAMPLE: &str = include_str!("../../config.example.toml");

    #[test]
    fn the_example_config_is_exactly_the_defaults() {
        assert_eq!(Config::parse(EXAMPLE).unwrap(), Config::default());
    }

    #[test]
    fn the_example_config_names_every_key_of_config() {
        let mut expected: std::collections::BTreeSet<String> =
            Config::default().key_origins(&toml::Table::new()).into_keys().collect();
        expected.remove("services");
        let service = serde_json::to_value(ServiceConfig::default()).unwrap();
        expected.extend(service.as_object().unwrap().keys().map(|k| format!("services.*.{k}")));
        // `[ddi]` is absent by default (off); the example names each of its keys, commented.
        expected.remove("ddi");
        let ddi = ddi::DdiConfig {
            server_url: String::new(),
            tenant: String::new(),
            controller_id: String::new(),
            token_file: None,
            gateway_token_file: None,
            allow_http: false,
        };
        expected.extend(
            serde_json::to_value(ddi)
                .unwrap()
                .as_object()
                .unwrap()
                .keys()
                .map(|k| format!("ddi.{k}")),
        );
        assert_eq!(
            keys_named_in(EXAMPLE),
            expected,
            "config.example.toml and the Config struct differ"
        );
    }

    #[test]
    fn the_commented_out_examples_are_valid_settings() {
        let uncommented: String = EXAMPLE
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if toml::from_str::<toml::Table>(rest).is_ok() => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let cfg =
            Config::parse(&uncommented).unwrap_or_else(|e| panic!("{}:\n{uncommented}", e.message));
        assert_eq!(cfg.compatible.as_deref(), Some("printer-model-x"));
        assert!(cfg.log.file.is_some() && cfg.gui.command.is_some());
        assert!(cfg.services["klippy"].start.is_some() && cfg.services["klippy"].exe.is_some());
        let ddi = cfg.ddi.expect("the [ddi] example");
        assert!(
            ddi.token_file.is_some() && ddi.gateway_token_file.is_none(),
            "one token file, the other stays an example"
        );
    }

    #[test]
    fn rendered_defaults_parse_back_to_defaults() {
        let text = Config::default().to_toml();
        assert_eq!(Config::parse(&text).unwrap(), Config::default());
    }
}
