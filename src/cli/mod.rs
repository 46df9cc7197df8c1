//! The command line: arguments (`args`), one function per command (`commands`), what they
//! print (`render`), the daemon fallback of the reporting commands (`daemon_client`), the
//! `demo`, and the mapping of outcomes to the exit statuses of SPEC §6 (here).

use crate::config::Config;
use crate::driver::{Outcome, TxReport};
use crate::error::{Error, ErrorCode};
use clap::CommandFactory;

mod args;
mod commands;
mod daemon_client;
pub mod demo;
pub mod render;

pub use args::{Cli, Cmd};

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

/// Runs the CLI; returns the exit status.
pub fn run(cli: Cli) -> u8 {
    let json = cli.json;
    let installs = matches!(cli.cmd, Cmd::Install { .. });
    match commands::dispatch(cli) {
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
        Outcome::RolledBack { .. } if r.kind == crate::driver::TxAction::Rollback => {
            exit::NEEDS_OPERATOR
        }
        Outcome::RolledBack { error, touched: false } if error.code.is_rejection() => {
            exit::REJECTED
        }
        Outcome::RolledBack { .. } => exit::ROLLED_BACK,
        Outcome::Interrupted { .. } => exit::OTHER,
    }
}

/// Logs (see `logging`): `--log-level`, else the demo's `warn`, else `[log] level`; the
/// config's log file, if any.
fn init_logging(cli: &Cli, cfg: &Config) {
    use tracing::level_filters::LevelFilter;
    // The demo is for reading: only warnings and errors on stderr unless asked.
    let default = if matches!(cli.cmd, Cmd::Demo { .. }) {
        LevelFilter::WARN
    } else {
        cfg.log.level.parse().unwrap_or(LevelFilter::INFO)
    };
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
