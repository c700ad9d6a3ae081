//! `idmap-overlay SOURCE MOUNTPOINT`: see the `cli` module and the man page.

use clap::Parser;
use idmap_overlay::cli::Cli;
use mount_api::userns;
use std::process::ExitCode;

fn main() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if std::path::Path::new(&argv0).file_name() == Some(userns::HELPER_ARGV0.as_ref()) {
        return userns::helper_main();
    }
    let cli = Cli::parse();
    // A daemon: log at info by default.
    cli_common::logging::init("idmap-overlay", cli.verbose + 1);
    cli_common::run("idmap-overlay", || idmap_overlay::mount::mount(&cli))
}
