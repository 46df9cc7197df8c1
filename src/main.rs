//! `tope-updater`: parses arguments and maps the result to an exit status. Nothing else.

use clap::Parser;

fn main() -> std::process::ExitCode {
    tope_updater::failpoint::setup();
    let cli = match tope_updater::cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return std::process::ExitCode::from(if e.use_stderr() {
                tope_updater::cli::exit::USAGE
            } else {
                0
            });
        }
    };
    std::process::ExitCode::from(tope_updater::cli::run(cli))
}
