//! `idmap-overlay SOURCE MOUNTPOINT`: see the `cli` module and the man page.

use clap::Parser;
use idmap_overlay::cli::Cli;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A daemon: log at info by default.
    cli_common::logging::init("idmap-overlay", cli.verbose + 1);
    cli_common::run("idmap-overlay", || idmap_overlay::mount::mount(&cli))
}
