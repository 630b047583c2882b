//! `fieldllmd`: command line entry point. Flags are parsed here; the work is in the library.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging(args.verbose, args.serving());
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fieldllmd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
