//! One function per command: each opens what it needs, does the work through the library's
//! public pieces, prints through `render::Output`, and returns the exit status.

use super::daemon_client::from_daemon;
use super::render::{Output, annotate_config};
use super::{Cli, Cmd, Failure, exit, exit_for_report, init_logging, man_page};
use crate::config::{Config, ConfigSource, KeyOrigins};
use crate::driver::{self, InstallOptions, Outcome, RecoverReport, RollbackTo, Updater};
use crate::error::{Error, ErrorCode, Result};
use crate::journal::Journal;
use clap::CommandFactory;
use std::path::{Path, PathBuf};

type Exit = std::result::Result<u8, Failure>;

pub(super) fn dispatch(cli: Cli) -> Exit {
    // Generated from the argument definitions: no configuration needed.
    match &cli.cmd {
        Cmd::Completions { shell } => return completions(*shell),
        Cmd::Man => {
            man_page(&mut std::io::stdout().lock())
                .map_err(|e| Error::internal(format!("writing the man page: {e}")))?;
            return Ok(exit::DONE);
        }
        _ => {}
    }
    let (cfg, source, origins) =
        Config::load_with_origins(cli.config.as_deref()).map_err(Failure::Setup)?;
    init_logging(&cli, &cfg);
    let out = Output { json: cli.json };
    match cli.cmd {
        Cmd::Completions { .. } | Cmd::Man => Ok(exit::DONE),
        Cmd::Install { package, version, allow_downgrade, force } => {
            install(cfg, &out, &package, InstallOptions { version, allow_downgrade, force })
        }
        Cmd::Recover { retry, at_boot } => recover(cfg, &out, retry, at_boot),
        Cmd::Rollback { to } => rollback(cfg, &out, &to),
        Cmd::Confirm => confirm(cfg, &out),
        Cmd::Status => status(&cfg, &out),
        Cmd::History { limit } => history(&cfg, &out, limit),
        Cmd::Verify => verify(&cfg, &out),
        Cmd::Journal => journal(&cfg),
        Cmd::Gc => gc(cfg, &out),
        Cmd::Config => config(&cfg, &source, &origins, &out),
        Cmd::Pack { dir, output, version, sign, delta_from } => {
            pack(&out, &dir, &output, version.as_deref(), sign.as_deref(), &delta_from)
        }
        Cmd::Keygen { output } => keygen(&out, &output),
        Cmd::Demo { keep } => Ok(super::demo::run(keep, out.json)?),
        Cmd::Serve => {
            crate::daemon::serve(cfg)?;
            Ok(exit::DONE)
        }
    }
}

fn completions(shell: clap_complete::Shell) -> Exit {
    // Into a buffer first: clap_complete panics on a failed write (a closed pipe).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "tope-updater", &mut script);
    std::io::Write::write_all(&mut std::io::stdout().lock(), &script)
        .map_err(|e| Error::internal(format!("writing the completion script: {e}")))?;
    Ok(exit::DONE)
}

fn install(cfg: Config, out: &Output, package: &Path, options: InstallOptions) -> Exit {
    crate::gui::launch(&cfg);
    let bar =
        crate::logging::progress_wanted(out.json).then(crate::logging::InstallProgress::start);
    let result = Updater::open(cfg).and_then(|up| {
        let mut up = match &bar {
            Some(b) => up.with_observer(b.clone()),
            None => up,
        };
        up.install(package, &options)
    });
    if let Some(b) = &bar {
        b.finish();
    }
    let r = result?;
    out.tx_report(&r);
    Ok(exit_for_report(&r))
}

fn recover(mut cfg: Config, out: &Output, retry: bool, at_boot: bool) -> Exit {
    if at_boot {
        cfg.service_manager = crate::config::ServiceManager::None;
    }
    let (mut up, lost) = Updater::open_for_recovery(cfg)?;
    let r = match (up.recover(retry)?, lost) {
        (RecoverReport::Finished { report, .. }, Some(l)) => {
            RecoverReport::Finished { report, journal_lost: Some(l) }
        }
        (RecoverReport::Nothing, Some(l)) => {
            let why = format!("{}; a fresh journal was started, nothing was in flight", l.message);
            return Err(Error::new(ErrorCode::JournalCorrupt, why).into());
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

fn rollback(cfg: Config, out: &Output, to: &str) -> Exit {
    let to = match to {
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
    let r = Updater::open(cfg)?.rollback(&to)?;
    out.tx_report(&r);
    Ok(exit_for_report(&r))
}

fn confirm(cfg: Config, out: &Output) -> Exit {
    let r = Updater::open(cfg)?.confirm()?;
    out.emit(&r, || match &r {
        driver::ConfirmReport::Confirmed { tx, version, boots } => {
            format!("confirmed: {version} (tx {tx}) is no longer a trial, after {boots} boot(s)")
        }
        driver::ConfirmReport::NothingToConfirm => {
            "confirm: nothing to confirm (no trial install)".into()
        }
    });
    Ok(exit::DONE)
}

fn status(cfg: &Config, out: &Output) -> Exit {
    let s = match read_journal(cfg) {
        Ok(Some(j)) => driver::status(&j, cfg.max_trial_boots)?,
        Ok(None) => driver::StatusReport {
            current: None,
            generations: vec![],
            factory_paths: 0,
            in_flight: None,
            last: None,
            trial: None,
            backups: driver::reports::BackupUsage::default(),
        },
        // The daemon holds the journal for its lifetime: ask it.
        Err(e) if e.code == ErrorCode::OperationInProgress => {
            ask_daemon(cfg, "/api/v1.0/status", &e)?
        }
        Err(e) => return Err(e.into()),
    };
    out.status(&s);
    Ok(exit::DONE)
}

fn history(cfg: &Config, out: &Output, limit: usize) -> Exit {
    let h = match read_journal(cfg) {
        Ok(Some(j)) => j.history(limit)?,
        Ok(None) => vec![],
        Err(e) if e.code == ErrorCode::OperationInProgress => {
            ask_daemon(cfg, &format!("/api/v1.0/history?limit={limit}"), &e)?
        }
        Err(e) => return Err(e.into()),
    };
    out.history(&h);
    Ok(exit::DONE)
}

/// The daemon's answer at `path`, when the journal is held (`busy`) by the daemon.
fn ask_daemon<T: serde::de::DeserializeOwned>(cfg: &Config, path: &str, busy: &Error) -> Result<T> {
    from_daemon(cfg, path).map_err(|d| {
        Error::new(
            busy.code,
            format!(
                "{}; asking the daemon at {} failed too: {}",
                busy.message, cfg.api.listen, d.message
            ),
        )
    })
}

fn verify(cfg: &Config, out: &Output) -> Exit {
    let r = match read_journal(cfg)? {
        Some(j) => driver::verify_live(&j)?,
        None => driver::VerifyReport { version: None, checked: 0, mismatches: vec![] },
    };
    out.verify(&r);
    if !r.mismatches.is_empty() {
        let why = format!(
            "{} of {} managed paths differ from the recorded state",
            r.mismatches.len(),
            r.checked
        );
        return Err(Error::new(ErrorCode::HashMismatch, why).into());
    }
    Ok(exit::DONE)
}

fn journal(cfg: &Config) -> Exit {
    let j = read_journal(cfg)?.ok_or_else(|| {
        Error::new(ErrorCode::ValidationError, format!("no journal in {}", cfg.state_dir.display()))
    })?;
    let dump = j.dump()?;
    // The dump is structured data; pretty JSON is its readable form too.
    println!(
        "{}",
        serde_json::to_string_pretty(&dump).map_err(|e| Error::internal(e.to_string()))?
    );
    Ok(exit::DONE)
}

fn gc(cfg: Config, out: &Output) -> Exit {
    let s = Updater::open(cfg)?.gc()?;
    out.emit(&s, || {
        format!("gc: removed {} backups ({} bytes), kept {}", s.removed, s.removed_bytes, s.kept)
    });
    Ok(exit::DONE)
}

#[allow(clippy::unnecessary_wraps, reason = "every command returns Exit, for dispatch")]
fn config(cfg: &Config, source: &ConfigSource, origins: &KeyOrigins, out: &Output) -> Exit {
    let src = match source {
        ConfigSource::Defaults => "built-in defaults (no config file)".to_string(),
        ConfigSource::File(p) => p.display().to_string(),
    };
    if out.json {
        println!("{}", serde_json::json!({ "source": src, "config": cfg, "keys": origins }));
    } else {
        println!(
            "# effective configuration, from {src}; each key says whether it came from the file \
            or is the default\n{}",
            annotate_config(&cfg.to_toml(), origins)
        );
    }
    Ok(exit::DONE)
}

fn pack(
    out: &Output,
    dir: &Path,
    output: &Path,
    version: Option<&str>,
    sign: Option<&Path>,
    delta_from: &[PathBuf],
) -> Exit {
    let r = crate::pack::pack(dir, output, version, sign, delta_from)?;
    out.emit(&r, || {
        let signed = if r.signed { ", signed" } else { "" };
        let mut s = format!(
            "packed {} files ({} bytes), version {}, into {}{signed}",
            r.files, r.bytes, r.version, r.output
        );
        if let Some(d) = &r.delta {
            s += &format!(
                "\ndelta from {}: {} files shipped whole, {} as patches, {} not shipped (already \
                on the device); entries {} bytes against {} for the full package ({:.1}x \
                smaller), package {} bytes",
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

fn keygen(out: &Output, output: &Path) -> Exit {
    let r = crate::signing::keygen(output)?;
    out.emit(&r, || {
        format!(
            "secret key: {} (keep it off the devices)\npublic key: {} (list it in trusted_keys on \
            the devices)",
            r.secret_key, r.public_key
        )
    });
    Ok(exit::DONE)
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
