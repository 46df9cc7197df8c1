//! The command line: argument parsing (clap), dispatch, rendering (human or `--json`), and
//! the mapping of outcomes to the exit statuses of SPEC §6.

use crate::config::{Config, ConfigSource, KeyOrigin, KeyOrigins};
use crate::driver::{self, InstallOptions, Outcome, RecoverReport, RollbackTo, TxReport, Updater};
use crate::error::{Error, ErrorCode, Result};
use crate::journal::Journal;
use clap::{CommandFactory, Parser, Subcommand};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Exit statuses (SPEC §6).
pub mod exit {
    pub const DONE: u8 = 0;
    pub const OTHER: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const REJECTED: u8 = 3;
    pub const ROLLED_BACK: u8 = 4;
    pub const NEEDS_OPERATOR: u8 = 5;
    pub const BUSY: u8 = 6;
}

#[derive(Parser, Debug)]
#[command(name = "tope-updater", version, about = "Transactional over-the-air updates for embedded Linux", after_help = EXAMPLES)]
pub struct Cli {
    /// Configuration file (default: $TOPE_UPDATER_CONFIG, else /etc/tope-updater/config.toml if it exists).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Machine-readable output on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// Log level (off, error, warn, info, debug, trace); default: [log] level from the config.
    #[arg(long, global = true, value_name = "LEVEL", value_parser = parse_level)]
    pub log_level: Option<tracing::level_filters::LevelFilter>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

const EXAMPLES: &str = "Examples:
  tope-updater demo                       install and roll back a demo app in a temporary root
  tope-updater keygen -o release          make release.key and release.pub
  tope-updater pack app/ -o app-1.2.3.zip --sign release.key
  tope-updater install app-1.2.3.zip      install a package (all or nothing)
  tope-updater rollback --to factory      restore every file to its state before the first update
  tope-updater confirm                    keep a trial install (confirm_required = true)
  tope-updater recover                    finish or undo an interrupted transaction (run at boot)
  tope-updater config                     the effective settings and where each came from

Every command prints `error: CODE: message` on stderr when it fails. Exit statuses: 0 done,
1 other failure, 2 usage, 3 package rejected (nothing touched), 4 failed and rolled back,
5 rollback failed (operator needed), 6 busy. `tope-updater COMMAND --help` has examples.";

fn parse_level(s: &str) -> std::result::Result<tracing::level_filters::LevelFilter, String> {
    s.parse().map_err(|_| format!("{s:?} is not one of off, error, warn, info, debug, trace"))
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Install a package: validate it completely, then deploy all modules or none.
    #[command(after_help = "Examples:
  tope-updater install app-1.2.3.zip
  tope-updater install app-1.2.3.zip --version 1.2.3     refuse a package of another version
  tope-updater install app-1.1.0.zip --allow-downgrade
  tope-updater install app-1.2.3.zip --json              the report as JSON on stdout

On a terminal a progress bar shows the phases on stderr. Exit 0 committed, 3 rejected
(nothing touched), 4 failed and rolled back, 5 rollback failed, 6 busy.")]
    Install {
        package: PathBuf,
        /// Refuse unless the package has exactly this version.
        #[arg(long)]
        version: Option<String>,
        /// Allow a version lower than the installed one.
        #[arg(long)]
        allow_downgrade: bool,
        /// Install a package whose earlier install was rolled back.
        #[arg(long)]
        force: bool,
    },
    /// Finish or roll back an interrupted transaction (run at boot, before the applications).
    #[command(after_help = "Examples:
  tope-updater recover             nothing in flight: exits 0 in milliseconds
  tope-updater recover --at-boot   from the boot unit: settle the files, leave services to the boot
  tope-updater recover --retry     after fixing what made a rollback fail (exit 5 before)")]
    Recover {
        /// Retry a rollback that failed and waits for an operator.
        #[arg(long)]
        retry: bool,
        /// Run from the boot unit, before the applications start: settle the files only.
        /// Services are neither stopped nor started (stopping a unit whose start is queued
        /// would cancel it; the boot starts them after this).
        #[arg(long)]
        at_boot: bool,
    },
    /// Restore an earlier generation: previous, factory, or a kept VERSION.
    #[command(after_help = "Examples:
  tope-updater rollback                  to the version before the current one
  tope-updater rollback --to 1.1.0       to a kept generation (see `status`)
  tope-updater rollback --to factory     every managed file as it was before the first update")]
    Rollback {
        #[arg(long, default_value = "previous", value_name = "previous|factory|VERSION")]
        to: String,
    },
    /// Accept the trial install (with `confirm_required`), so it is not rolled back at boot.
    #[command(after_help = "Example:
  tope-updater confirm     after checking the new version works; idempotent")]
    Confirm,
    /// Current, previous and factory versions; the transaction in flight; the trial.
    #[command(after_help = "Examples:
  tope-updater status
  tope-updater status --json | jq -r .current.version")]
    Status,
    /// Past transactions, newest first.
    #[command(after_help = "Examples:
  tope-updater history
  tope-updater history --limit 5 --json")]
    History {
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Re-hash the live files against the current generation.
    #[command(after_help = "Example:
  tope-updater verify      exit 0 if every managed file matches, 1 (HASH_MISMATCH) if not")]
    Verify,
    /// Dump every journal record.
    #[command(after_help = "Example:
  tope-updater journal > journal.json     for a bug report (JSON)")]
    Journal,
    /// Remove backups that no kept generation needs.
    #[command(after_help = "Example:
  tope-updater gc          after lowering keep_generations")]
    Gc,
    /// Print the effective configuration, and for each key whether it came from the file or
    /// is the default.
    #[command(after_help = "Examples:
  tope-updater config
  tope-updater --config ./test.toml config --json

The file is /etc/tope-updater/config.toml unless --config or $TOPE_UPDATER_CONFIG names
another; config.example.toml (in the source tree) lists every key with its default.")]
    Config,
    /// Build a package from DIR (holding manifest.json and the sources), filling in hashes.
    #[command(after_help = "Examples:
  tope-updater pack app/ -o app-1.2.3.zip
  tope-updater pack app/ -o app-1.2.3.zip --version 1.2.3 --sign release.key
  tope-updater pack app/ -o app-1.2.3-delta.zip --delta-from app-1.2.2.zip --sign release.key")]
    Pack {
        dir: PathBuf,
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        #[arg(long)]
        version: Option<String>,
        /// Sign the manifest with this secret key (from `keygen`): adds manifest.json.sig.
        #[arg(long, value_name = "KEYFILE")]
        sign: Option<PathBuf>,
        /// Make a delta package against this full package (repeatable, one per version the
        /// devices may have): files they already hold are not shipped, changed ones may be
        /// shipped as binary patches.
        #[arg(long = "delta-from", value_name = "BASE.zip")]
        delta_from: Vec<PathBuf>,
    },
    /// Make an ed25519 key pair for signing packages: PREFIX.key (secret) and PREFIX.pub.
    #[command(after_help = "Example:
  tope-updater keygen -o release     then copy release.pub to the devices (trusted_keys)
                                     and keep release.key on the build machine")]
    Keygen {
        #[arg(short = 'o', long = "output", value_name = "PREFIX")]
        output: PathBuf,
    },
    /// Run the daemon: recovery first, then the HTTP API on api.listen (SIGTERM stops it
    /// after the current step).
    #[command(after_help = "Examples:
  systemctl enable --now tope-updater.service     how it runs on a device
  tope-updater serve --log-level debug            in the foreground, for debugging")]
    Serve,
    /// Install a demo app into a temporary root, show status, roll back, verify.
    #[command(after_help = "Examples:
  tope-updater demo
  tope-updater demo --keep      and look at the temporary root afterwards")]
    Demo {
        /// Keep the temporary root afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Print a shell completion script for SHELL to stdout.
    #[command(after_help = "Examples:
  tope-updater completions bash > /usr/share/bash-completion/completions/tope-updater
  tope-updater completions zsh > /usr/share/zsh/vendor-completions/_tope-updater
  tope-updater completions fish > /usr/share/fish/vendor_completions.d/tope-updater.fish")]
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff) to stdout.
    #[command(after_help = "Examples:
  tope-updater man > /usr/share/man/man1/tope-updater.1
  tope-updater man | man -l -")]
    Man,
}

/// Runs the CLI; returns the exit status.
pub fn run(cli: Cli) -> u8 {
    let json = cli.json;
    let installs = matches!(cli.cmd, Cmd::Install { .. });
    match dispatch(cli) {
        Ok(code) => code,
        Err(Failure::Usage(e)) => {
            eprintln!("error: {}: {}", e.code, e.message);
            exit::USAGE
        }
        Err(failure @ (Failure::Error(_) | Failure::Setup(_))) => {
            let (e, installing) = match failure {
                Failure::Error(e) => (e, installs),
                Failure::Setup(e) | Failure::Usage(e) => (e, false),
            };
            eprintln!("error: {}: {}", e.code, e.message);
            if json {
                println!("{}", serde_json::json!({ "error": e }));
            }
            exit_for_error(&e, installing)
        }
    }
}

/// Exit 3 means "package rejected, nothing touched", so rejection codes map to it only for
/// `install`; elsewhere (a bad config file, a `verify` mismatch) they are plain failures.
pub fn exit_for_error(e: &Error, installing: bool) -> u8 {
    match e.code {
        ErrorCode::OperationInProgress => exit::BUSY,
        ErrorCode::RollbackFailed => exit::NEEDS_OPERATOR,
        c if c.is_rejection() && installing => exit::REJECTED,
        // Before any transaction: a package this device cannot hold (a dst through a file).
        ErrorCode::DeploymentFailed if installing => exit::REJECTED,
        _ => exit::OTHER,
    }
}

/// Why a command failed: bad arguments (exit 2), an unusable configuration (never "package
/// rejected"), or an operating error.
enum Failure {
    Usage(Error),
    Setup(Error),
    Error(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Error(e)
    }
}

pub fn exit_for_report(r: &TxReport) -> u8 {
    match &r.outcome {
        Outcome::Committed => exit::DONE,
        Outcome::RollbackFailed { .. } => exit::NEEDS_OPERATOR,
        // A rollback command that had to be undone did not restore what was asked for.
        Outcome::RolledBack { .. } if r.kind == crate::driver::TxAction::Rollback => exit::NEEDS_OPERATOR,
        Outcome::RolledBack { error, touched: false } if error.code.is_rejection() => exit::REJECTED,
        Outcome::RolledBack { .. } => exit::ROLLED_BACK,
        Outcome::Interrupted { .. } => exit::OTHER,
    }
}

/// Logs (see `logging`): `--log-level`, else the demo's `warn`, else `[log] level`; the
/// config's log file, if any.
fn init_logging(cli: &Cli, cfg: &Config) {
    use tracing::level_filters::LevelFilter;
    // The demo is for reading: only warnings and errors on stderr unless asked.
    let default = if matches!(cli.cmd, Cmd::Demo { .. }) { LevelFilter::WARN } else { cfg.log.level.parse().unwrap_or(LevelFilter::INFO) };
    crate::logging::init(cli.log_level.unwrap_or(default), cfg.log.file.as_deref());
}

/// The manual page: name, synopsis, description and global options of the top-level command,
/// then every subcommand with its full help (arguments, options, examples), then the examples.
pub fn man_page(w: &mut dyn std::io::Write) -> std::io::Result<()> {
    use clap_mangen::roff::{Roff, bold, roman};
    let cmd = Cli::command().disable_help_subcommand(true);
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    man.render_options_section(w)?;
    let mut roff = Roff::new();
    roff.control("SH", ["COMMANDS"]);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let mut sub = sub.clone().bin_name(format!("tope-updater {}", sub.get_name()));
        roff.control("SS", [sub.get_name()]);
        roff.text([bold(format!("tope-updater {}", sub.get_name()))]);
        roff.control("PP", []).control("nf", []);
        roff.text([roman(sub.render_long_help().to_string().trim_end())]);
        roff.control("fi", []);
    }
    roff.to_writer(w)?;
    man.render_extra_section(w)?;
    man.render_version_section(w)
}

fn dispatch(cli: Cli) -> std::result::Result<u8, Failure> {
    // Generated from the definitions above: no configuration needed.
    match &cli.cmd {
        Cmd::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a failed write (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "tope-updater", &mut script);
            std::io::Write::write_all(&mut std::io::stdout().lock(), &script)
                .map_err(|e| Error::internal(format!("writing the completion script: {e}")))?;
            return Ok(exit::DONE);
        }
        Cmd::Man => {
            man_page(&mut std::io::stdout().lock()).map_err(|e| Error::internal(format!("writing the man page: {e}")))?;
            return Ok(exit::DONE);
        }
        _ => {}
    }
    let (cfg, source, origins) = Config::load_with_origins(cli.config.as_deref()).map_err(Failure::Setup)?;
    init_logging(&cli, &cfg);
    let out = Output { json: cli.json };
    match cli.cmd {
        Cmd::Completions { .. } | Cmd::Man => Ok(exit::DONE),
        Cmd::Install { package, version, allow_downgrade, force } => {
            crate::gui::launch(&cfg);
            let bar = crate::logging::progress_wanted(out.json).then(crate::logging::InstallProgress::start);
            let result = Updater::open(cfg).and_then(|up| {
                let mut up = match &bar {
                    Some(b) => up.with_observer(b.clone()),
                    None => up,
                };
                up.install(&package, &InstallOptions { version, allow_downgrade, force })
            });
            if let Some(b) = &bar {
                b.finish();
            }
            let r = result?;
            out.tx_report(&r);
            Ok(exit_for_report(&r))
        }
        Cmd::Recover { retry, at_boot } => {
            let mut cfg = cfg;
            if at_boot {
                cfg.service_manager = crate::config::ServiceManager::None;
            }
            let (mut up, lost) = Updater::open_for_recovery(cfg)?;
            let r = up.recover(retry)?;
            let r = match (r, lost) {
                (RecoverReport::Finished { report, .. }, Some(l)) => RecoverReport::Finished { report, journal_lost: Some(l) },
                (RecoverReport::Nothing, Some(l)) => {
                    return Err(Error::new(
                        ErrorCode::JournalCorrupt,
                        format!("{}; a fresh journal was started, nothing was in flight", l.message),
                    )
                    .into());
                }
                (other, _) => other,
            };
            out.recover(&r);
            Ok(match &r {
                RecoverReport::Nothing | RecoverReport::Trial { .. } => exit::DONE,
                RecoverReport::TrialExpired { report, .. } => match &report.outcome {
                    // The install failed its trial and was rolled back.
                    Outcome::Committed => exit::ROLLED_BACK,
                    _ => exit_for_report(report),
                },
                RecoverReport::NeedsOperator { .. } => exit::NEEDS_OPERATOR,
                RecoverReport::Finished { report, .. } => match &report.outcome {
                    Outcome::Committed => exit::DONE,
                    Outcome::RolledBack { .. } => exit::ROLLED_BACK,
                    Outcome::RollbackFailed { .. } => exit::NEEDS_OPERATOR,
                    Outcome::Interrupted { .. } => exit::OTHER,
                },
            })
        }
        Cmd::Rollback { to } => {
            let to = match to.as_str() {
                "previous" => RollbackTo::Previous,
                "factory" => RollbackTo::Factory,
                v => {
                    crate::version::Version::parse(v).map_err(|_| {
                        Failure::Usage(Error::new(
                            ErrorCode::ValidationError,
                            format!("--to {v:?}: expected previous, factory or MAJOR.MINOR.PATCH"),
                        ))
                    })?;
                    RollbackTo::Version(v.to_string())
                }
            };
            let mut up = Updater::open(cfg)?;
            let r = up.rollback(&to)?;
            out.tx_report(&r);
            Ok(exit_for_report(&r))
        }
        Cmd::Confirm => {
            let mut up = Updater::open(cfg)?;
            let r = up.confirm()?;
            out.emit(&r, || match &r {
                driver::ConfirmReport::Confirmed { tx, version, boots } => {
                    format!("confirmed: {version} (tx {tx}) is no longer a trial, after {boots} boot(s)")
                }
                driver::ConfirmReport::NothingToConfirm => "confirm: nothing to confirm (no trial install)".into(),
            });
            Ok(exit::DONE)
        }
        Cmd::Status => {
            let s = match read_journal(&cfg) {
                Ok(Some(j)) => driver::status(&j, cfg.max_trial_boots)?,
                Ok(None) => driver::StatusReport {
                    current: None,
                    generations: vec![],
                    factory_paths: 0,
                    in_flight: None,
                    last: None,
                    trial: None,
                    backups: Default::default(),
                },
                // The daemon holds the journal for its lifetime: ask it.
                Err(e) if e.code == ErrorCode::OperationInProgress => from_daemon(&cfg, "/api/v1.0/status").map_err(|d| {
                    Error::new(e.code, format!("{}; asking the daemon at {} failed too: {}", e.message, cfg.api.listen, d.message))
                })?,
                Err(e) => return Err(e.into()),
            };
            out.status(&s);
            Ok(exit::DONE)
        }
        Cmd::History { limit } => {
            let h = match read_journal(&cfg) {
                Ok(Some(j)) => j.history(limit)?,
                Ok(None) => vec![],
                Err(e) if e.code == ErrorCode::OperationInProgress => from_daemon(&cfg, &format!("/api/v1.0/history?limit={limit}"))
                    .map_err(|d| {
                        Error::new(e.code, format!("{}; asking the daemon at {} failed too: {}", e.message, cfg.api.listen, d.message))
                    })?,
                Err(e) => return Err(e.into()),
            };
            out.history(&h);
            Ok(exit::DONE)
        }
        Cmd::Verify => {
            let r = match read_journal(&cfg)? {
                Some(j) => driver::verify_live(&j)?,
                None => driver::VerifyReport { version: None, checked: 0, mismatches: vec![] },
            };
            out.verify(&r);
            if r.mismatches.is_empty() {
                Ok(exit::DONE)
            } else {
                Err(Error::new(
                    ErrorCode::HashMismatch,
                    format!("{} of {} managed paths differ from the recorded state", r.mismatches.len(), r.checked),
                )
                .into())
            }
        }
        Cmd::Journal => {
            let j = read_journal(&cfg)?
                .ok_or_else(|| Error::new(ErrorCode::ValidationError, format!("no journal in {}", cfg.state_dir.display())))?;
            let dump = j.dump()?;
            // The dump is structured data; pretty JSON is its readable form too.
            println!("{}", serde_json::to_string_pretty(&dump).map_err(|e| Error::internal(e.to_string()))?);
            Ok(exit::DONE)
        }
        Cmd::Gc => {
            let mut up = Updater::open(cfg)?;
            let s = up.gc()?;
            out.emit(&s, || format!("gc: removed {} backups ({} bytes), kept {}", s.removed, s.removed_bytes, s.kept));
            Ok(exit::DONE)
        }
        Cmd::Config => {
            let src = match &source {
                ConfigSource::Defaults => "built-in defaults (no config file)".to_string(),
                ConfigSource::File(p) => p.display().to_string(),
            };
            if out.json {
                println!("{}", serde_json::json!({ "source": src, "config": cfg, "keys": origins }));
            } else {
                println!(
                    "# effective configuration, from {src}; each key says whether it came from the file or is the default\n{}",
                    annotate_config(&cfg.to_toml(), &origins)
                );
            }
            Ok(exit::DONE)
        }
        Cmd::Pack { dir, output, version, sign, delta_from } => {
            let r = crate::pack::pack(&dir, &output, version.as_deref(), sign.as_deref(), &delta_from)?;
            out.emit(&r, || {
                let mut s = format!(
                    "packed {} files ({} bytes), version {}, into {}{}",
                    r.files,
                    r.bytes,
                    r.version,
                    r.output,
                    if r.signed { ", signed" } else { "" }
                );
                if let Some(d) = &r.delta {
                    s += &format!(
                        "\ndelta from {}: {} files shipped whole, {} as patches, {} not shipped (already on the device); entries {} bytes against {} for the full package ({:.1}x smaller), package {} bytes",
                        d.from_versions.join(", "),
                        d.whole,
                        d.patched,
                        d.on_device,
                        d.entries_bytes,
                        d.full_entries_bytes,
                        d.full_entries_bytes as f64 / d.entries_bytes.max(1) as f64,
                        r.package_bytes
                    );
                }
                s
            });
            Ok(exit::DONE)
        }
        Cmd::Keygen { output } => {
            let r = crate::signing::keygen(&output)?;
            out.emit(&r, || {
                format!(
                    "secret key: {} (keep it off the devices)
public key: {} (list it in trusted_keys on the devices)",
                    r.secret_key, r.public_key
                )
            });
            Ok(exit::DONE)
        }
        Cmd::Demo { keep } => Ok(crate::demo::run(keep, out.json)?),
        Cmd::Serve => {
            crate::daemon::serve(cfg)?;
            Ok(exit::DONE)
        }
    }
}

/// The rendered configuration with `# file` or `# default` after each key; an unset optional
/// key (absent from TOML) becomes a comment line in its table. Each line is parsed as TOML on
/// its own to learn its key, so quoting stays TOML's business.
pub fn annotate_config(toml_text: &str, origins: &KeyOrigins) -> String {
    fn single_path(t: &toml::Table) -> Option<Vec<String>> {
        let (k, v) = t.iter().next().filter(|_| t.len() == 1)?;
        let mut path = vec![k.clone()];
        if let Some(inner) = v.as_table().filter(|i| !i.is_empty()) {
            path.extend(single_path(inner)?);
        }
        Some(path)
    }
    let label = |o: &KeyOrigin| match o {
        KeyOrigin::File => "file",
        KeyOrigin::Default => "default",
    };
    let parent = |k: &str| k.rsplit_once('.').map_or(String::new(), |(p, _)| p.to_string());
    let mut shown = std::collections::BTreeSet::new();
    // The unset keys of `section`, before the blank lines that end it.
    let flush = |lines: &mut Vec<String>, section: &str, shown: &mut std::collections::BTreeSet<String>| {
        let unset: Vec<(&String, &KeyOrigin)> = origins.iter().filter(|(k, _)| parent(k) == section && !shown.contains(*k)).collect();
        let at = lines.len() - lines.iter().rev().take_while(|l| l.is_empty()).count();
        let comments = unset.iter().map(|(k, o)| format!("# {}: unset  # {}", k.rsplit('.').next().unwrap_or(k), label(o)));
        lines.splice(at..at, comments.collect::<Vec<_>>());
        shown.extend(unset.into_iter().map(|(k, _)| k.clone()));
    };
    let mut section = String::new();
    let mut lines: Vec<String> = vec![];
    for line in toml_text.lines() {
        let path = toml::from_str::<toml::Table>(line).ok().as_ref().and_then(single_path);
        let name = match path {
            Some(path) if line.trim_start().starts_with('[') => {
                flush(&mut lines, &section, &mut shown);
                section = path.join(".");
                section.clone()
            }
            Some(path) if section.is_empty() => path.join("."),
            Some(path) => format!("{section}.{}", path.join(".")),
            None => String::new(),
        };
        // An empty table (`[services]` without services) is a setting of its own.
        match origins.get(&name) {
            Some(o) => {
                lines.push(format!("{line}  # {}", label(o)));
                shown.insert(name);
            }
            None => lines.push(line.to_string()),
        }
    }
    flush(&mut lines, &section, &mut shown);
    let rest: Vec<String> =
        origins.iter().filter(|(k, _)| !shown.contains(*k)).map(|(k, o)| format!("# {k}: unset  # {}", label(o))).collect();
    if !rest.is_empty() {
        lines.push(String::new());
        lines.extend(rest);
    }
    lines.join("\n")
}

/// While the daemon runs it holds the journal open (redb allows one process); reporting
/// commands then ask its API on `api.listen` (loopback, short timeout).
/// Where to reach a daemon listening on `listen`: a daemon bound to all interfaces is asked on
/// loopback (its guard admits a loopback `Host`, not `0.0.0.0`).
fn reachable(listen: &str) -> String {
    match listen.parse::<std::net::SocketAddr>() {
        Ok(std::net::SocketAddr::V4(a)) if a.ip().is_unspecified() => format!("127.0.0.1:{}", a.port()),
        Ok(std::net::SocketAddr::V6(a)) if a.ip().is_unspecified() => format!("[::1]:{}", a.port()),
        _ => listen.to_string(),
    }
}

fn from_daemon<T: serde::de::DeserializeOwned>(cfg: &Config, path: &str) -> Result<T> {
    let listen = std::fs::read_to_string(crate::daemon::addr_file(&cfg.state_dir)).unwrap_or_else(|_| cfg.api.listen.clone());
    let url = format!("http://{}{path}", reachable(listen.trim()));
    let agent: ureq::Agent =
        ureq::Agent::config_builder().timeout_global(Some(std::time::Duration::from_secs(5))).proxy(None).build().into();
    let text = agent
        .get(&url)
        .call()
        .and_then(|mut r| r.body_mut().read_to_string())
        .map_err(|e| Error::new(ErrorCode::InternalError, format!("GET {url}: {e}")))?;
    let body: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::new(ErrorCode::InternalError, format!("GET {url}: {e}")))?;
    if body["code"] != 200 {
        return Err(Error::new(ErrorCode::InternalError, format!("GET {url}: {}", body["msg"])));
    }
    serde_json::from_value(body["data"].clone()).map_err(|e| Error::new(ErrorCode::InternalError, format!("GET {url}: {e}")))
}

/// Opens the journal for reading. Read-only first, so reporting works beside a running
/// transaction's lock; if the file needs repair after a crash, repairs it under the lock.
fn read_journal(cfg: &Config) -> Result<Option<Journal>> {
    match Journal::open_read_only(&cfg.state_dir) {
        Ok(j) => Ok(j),
        Err(e) if e.code == ErrorCode::OperationInProgress => Err(e),
        Err(_) => {
            let _lock = driver::lock_state_dir(&cfg.state_dir)?;
            Journal::open(&cfg.state_dir).map(Some)
        }
    }
}

pub struct Output {
    pub json: bool,
}

impl Output {
    pub fn emit<T: Serialize>(&self, value: &T, human: impl FnOnce() -> String) {
        if self.json {
            println!("{}", serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")));
        } else {
            println!("{}", human());
        }
    }

    pub fn tx_report(&self, r: &TxReport) {
        self.emit(r, || render_tx(r));
        // A failed transaction is an error like any other: the stable code goes to stderr.
        if let Outcome::RolledBack { error, .. } | Outcome::RollbackFailed { error } | Outcome::Interrupted { error } = &r.outcome {
            eprintln!("error: {}: {}", error.code, error.message);
        }
    }

    pub fn recover(&self, r: &RecoverReport) {
        let failed = match r {
            RecoverReport::Finished { report, .. } => match &report.outcome {
                Outcome::RolledBack { error, .. } | Outcome::RollbackFailed { error } | Outcome::Interrupted { error } => Some(error),
                Outcome::Committed => None,
            },
            RecoverReport::NeedsOperator { error, .. } => error.as_ref(),
            RecoverReport::TrialExpired { report, .. } => match &report.outcome {
                Outcome::RolledBack { error, .. } | Outcome::RollbackFailed { error } | Outcome::Interrupted { error } => Some(error),
                Outcome::Committed => None,
            },
            RecoverReport::Nothing | RecoverReport::Trial { .. } => None,
        };
        if let Some(error) = failed {
            eprintln!("error: {}: {}", error.code, error.message);
        }
        self.emit(r, || match r {
            RecoverReport::Nothing => "recover: nothing in flight".into(),
            RecoverReport::NeedsOperator { tx, error } => format!(
                "recover: transaction {tx} NEEDS AN OPERATOR: {}\n  fix the cause, then run `tope-updater recover --retry`",
                error.as_ref().map(|e| e.to_string()).unwrap_or_default()
            ),
            RecoverReport::Finished { report, journal_lost } => {
                let lost = journal_lost.as_ref().map(|e| format!("recover: {e}\n")).unwrap_or_default();
                format!("{lost}recover: {}", render_tx(report))
            }
            RecoverReport::Trial { tx, version, boots, max_boots } => format!(
                "recover: nothing in flight; trial install of {version} (tx {tx}) not confirmed yet: boot {boots} of {max_boots} (run `tope-updater confirm` to keep it)"
            ),
            RecoverReport::TrialExpired { version, boots, report } => format!(
                "recover: trial install of {version} was not confirmed in {} boot(s) after its install: rolling it back\nrecover: {}",
                boots - 1,
                render_tx(report)
            ),
        });
    }

    pub fn status(&self, s: &driver::StatusReport) {
        self.emit(s, || {
            let mut o = String::new();
            match &s.current {
                Some(g) => o += &format!("current:     {} (generation {}, {} files)\n", g.version, g.id, g.files),
                None => o += "current:     factory baseline (nothing installed)\n",
            }
            let kept: Vec<String> = s.generations.iter().map(|g| format!("{} (gen {})", g.version, g.id)).collect();
            o += &format!("generations: {}\n", if kept.is_empty() { "none".into() } else { kept.join(", ") });
            o += &format!("factory:     {} paths recorded\n", s.factory_paths);
            o += &format!("backups:     {} blobs, {}\n", s.backups.blobs, human_bytes(s.backups.bytes));
            match &s.in_flight {
                Some(f) => {
                    o += &format!(
                        "in flight:   tx {} {} -> {} in phase {}{}\n",
                        f.tx,
                        f.kind,
                        f.to_version.as_deref().unwrap_or("factory"),
                        f.phase,
                        f.error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
                    )
                }
                None => o += "in flight:   none\n",
            }
            if let Some(t) = &s.trial {
                o += &format!(
                    "trial:       {} (tx {}) awaits `tope-updater confirm`: boot {} of {}\n",
                    t.version, t.tx, t.boots, t.max_boots
                );
            }
            if let Some(l) = &s.last {
                o += &format!(
                    "last:        tx {} {} -> {}: {}{}",
                    l.id,
                    kind_of(l),
                    l.to_version.as_deref().unwrap_or("factory"),
                    l.phase,
                    l.error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
                );
            }
            o.trim_end().to_string()
        });
    }

    pub fn history(&self, h: &[crate::journal::records::TxRecord]) {
        self.emit(&h, || {
            if h.is_empty() {
                return "no transactions".into();
            }
            h.iter()
                .map(|r| {
                    format!(
                        "tx {:>4}  {:<8} {:>8} -> {:<8} {:<15} {} files, {} commits{}{}",
                        r.id,
                        kind_of(r),
                        r.from_version.as_deref().unwrap_or("factory"),
                        r.to_version.as_deref().unwrap_or("factory"),
                        r.phase.name(),
                        r.targets,
                        r.commits,
                        if r.freed_blobs > 0 {
                            format!(", freed {} blobs ({})", r.freed_blobs, human_bytes(r.freed_bytes))
                        } else {
                            String::new()
                        },
                        r.error.as_ref().map(|e| format!("  [{e}]")).unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        });
    }

    pub fn verify(&self, r: &driver::VerifyReport) {
        self.emit(r, || {
            let head = format!("verify: {} managed paths against {}", r.checked, r.version.as_deref().unwrap_or("the factory baseline"));
            if r.mismatches.is_empty() { format!("{head}: all match") } else { format!("{head}:\n  {}", r.mismatches.join("\n  ")) }
        });
    }
}

fn kind_of(r: &crate::journal::records::TxRecord) -> crate::driver::TxAction {
    crate::driver::TxAction::of(&r.kind)
}

fn render_tx(r: &TxReport) -> String {
    let from = r.from_version.as_deref().unwrap_or("factory");
    let to = r.to_version.as_deref().unwrap_or("factory");
    match &r.outcome {
        Outcome::Committed => {
            format!("{} {from} -> {to}: committed (tx {}, {} files, {} journal commits)", r.kind, r.tx, r.targets, r.commits)
        }
        Outcome::RolledBack { error, touched } => format!(
            "{} {from} -> {to}: FAILED and rolled back (tx {}): {error}{}",
            r.kind,
            r.tx,
            if *touched { "" } else { "; no target file was changed" }
        ),
        Outcome::RollbackFailed { error } => {
            format!("{} {from} -> {to}: ROLLBACK FAILED (tx {}), an operator is needed: {error}", r.kind, r.tx)
        }
        Outcome::Interrupted { error } => format!(
            "{} {from} -> {to}: INTERRUPTED (tx {}), still in flight: fix the cause, then run `tope-updater recover`: {error}",
            r.kind, r.tx
        ),
    }
}

/// For `demo`: a path relative to the demo root, for readable output.
pub fn short(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).map(|r| format!("/{}", r.display())).unwrap_or_else(|_| p.display().to_string())
}

/// `1.5 MiB`, `300 B`: sizes as people read them.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(super::human_bytes(300), "300 B");
        assert_eq!(super::human_bytes(1536), "1.5 KiB");
        assert_eq!(super::human_bytes(200 << 20), "200.0 MiB");
    }

    #[test]
    fn a_daemon_on_all_interfaces_is_asked_on_loopback() {
        assert_eq!(super::reachable("0.0.0.0:12315"), "127.0.0.1:12315");
        assert_eq!(super::reachable("[::]:12315"), "[::1]:12315");
        assert_eq!(super::reachable("127.0.0.1:4000"), "127.0.0.1:4000");
        assert_eq!(super::reachable("192.168.1.5:12315"), "192.168.1.5:12315");
        assert_eq!(super::reachable("localhost:12315"), "localhost:12315");
    }
}
