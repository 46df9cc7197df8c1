//! The command line's arguments (clap): every subcommand, its options and its examples.

// Doc comments here are clap's --help text, shown as written (no Markdown).
#![allow(clippy::doc_markdown)]

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "tope-updater", version, about = "Transactional over-the-air updates for \
    embedded Linux", after_help = EXAMPLES)]
pub struct Cli {
    /// Configuration file (default: $TOPE_UPDATER_CONFIG, else /etc/tope-updater/config.toml if
    /// it exists).
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
