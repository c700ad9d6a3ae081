//! `subdir-mount`, also installed as `mount.subdir` for mount(8) and fstab.

use clap::Parser;
use mount_api::userns;
use std::path::Path;
use std::process::ExitCode;
use subdir_mount::cli::Cli;
use subdir_mount::{mount, request};

fn main() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let name = Path::new(&argv0).file_name().unwrap_or_default();
    if name == userns::HELPER_ARGV0 {
        return userns::helper_main();
    }
    if name == "mount.subdir" {
        let args: Vec<_> = std::env::args_os().skip(1).collect();
        return match request::parse_helper_args(&args) {
            Ok((req, verbose)) => {
                cli_common::logging::init("mount.subdir", verbose);
                cli_common::run("mount.subdir", || mount::mount(&req))
            }
            Err(e) => cli_common::run("mount.subdir", || Err(e)),
        };
    }
    let cli = Cli::parse();
    cli_common::logging::init("subdir-mount", cli.verbose);
    cli_common::run("subdir-mount", || mount::mount(&cli.into()))
}
