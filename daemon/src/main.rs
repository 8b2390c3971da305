//! `emberd`: see the library crate for everything it does.

use std::process::ExitCode;

fn main() -> ExitCode {
    emberd::engine::fix_malloc_threshold();
    match emberd::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain on one line, no backtrace: these are user errors.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
