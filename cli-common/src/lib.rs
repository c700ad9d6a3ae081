//! Command-line plumbing shared by every tool of the project: logging through `tracing` in
//! plain, journald-friendly lines; exit codes; mount(8)-style `-o` option strings; and the
//! daemon life cycle of a FUSE server.

pub mod daemon;
pub mod logging;
pub mod options;

use std::process::ExitCode;

/// Exit status of a failed run (mount(8)/mkfs-style tools use 1 for runtime failures).
pub const EXIT_FAILURE: u8 = 1;
/// Exit status of a usage error (clap uses 2 as well).
pub const EXIT_USAGE: u8 = 2;

/// An error that knows which exit status it deserves.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub error: BoxError,
}

/// Any error; callers use anyhow or their own types and convert.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

impl CliError {
    pub fn usage(msg: impl Into<String>) -> CliError {
        CliError {
            code: EXIT_USAGE,
            error: msg.into().into(),
        }
    }

    pub fn failure(error: impl Into<BoxError>) -> CliError {
        CliError {
            code: EXIT_FAILURE,
            error: error.into(),
        }
    }
}

/// Run a tool's main function: print a failure as `PROG: error: ...` (with its causes) and map
/// it to its exit status.
pub fn run(prog: &str, main: impl FnOnce() -> Result<(), CliError>) -> ExitCode {
    match main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = e.error.to_string();
            let mut source = e.error.source();
            while let Some(s) = source {
                let s_text = s.to_string();
                if !msg.contains(&s_text) {
                    msg.push_str(": ");
                    msg.push_str(&s_text);
                }
                source = s.source();
            }
            eprintln!("{prog}: error: {msg}");
            ExitCode::from(e.code)
        }
    }
}
