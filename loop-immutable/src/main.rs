//! `loop-immutable`: see the `cli` module and the man page.

use clap::Parser;
use cli_common::CliError;
use loop_immutable::cli::{Cli, Command};
use loop_immutable::image::Image;
use loop_immutable::{audit, daemon, overlay};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs at info by default; the short-lived commands only warn.
    let daemon_like = matches!(cli.command, Command::Attach { .. } | Command::Mount { .. });
    cli_common::logging::init("loop-immutable", cli.verbose + u8::from(daemon_like));
    cli_common::run("loop-immutable", || run(&cli))
}

fn run(cli: &Cli) -> Result<(), CliError> {
    match &cli.command {
        Command::Attach {
            image,
            opts,
            foreground,
        } => daemon::attach(image, opts, *foreground),
        Command::Detach { target, all } => daemon::detach(target.as_deref(), *all),
        Command::List { json } => daemon::list(*json),
        Command::Mount {
            image,
            dir,
            opts,
            options,
            fstype,
        } => daemon::mount(image, dir, opts, options, fstype.as_deref()),
        Command::Diff { overlay, json } => {
            let m = overlay::read_map(overlay).map_err(CliError::failure)?;
            for (a, b) in m.extents.iter() {
                if *json {
                    println!("{}", serde_json::json!({"offset": a, "length": b - a}));
                } else {
                    println!("{a}\t{}", b - a);
                }
            }
            if !*json {
                eprintln!(
                    "{} ranges, {} bytes changed (image size {}, sha256 {})",
                    m.extents.len(),
                    m.extents.bytes(),
                    m.header.image_size,
                    m.header.image_sha256
                );
            }
            Ok(())
        }
        Command::Export {
            image,
            overlay: ov,
            out,
        } => {
            let img = Image::open(image).map_err(CliError::failure)?;
            let sha = overlay::export(&img, ov, out).map_err(CliError::failure)?;
            println!("{sha}  {}", out.display());
            Ok(())
        }
        Command::VerifyAudit { log } => {
            let r = audit::verify(log).map_err(CliError::failure)?;
            let changed = r.changed_sessions();
            for s in &r.sessions {
                println!(
                    "session {}: sha256 {} at attach, {} at detach; {} writes ({} bytes)",
                    s.image,
                    s.attach_sha256,
                    s.detach_sha256.as_deref().unwrap_or("(no detach)"),
                    s.writes,
                    s.bytes_written
                );
            }
            if !changed.is_empty() {
                return Err(CliError::failure(format!(
                    "{} session(s) report a changed image",
                    changed.len()
                )));
            }
            println!("{}: {} entries, chain intact", log.display(), r.entries);
            Ok(())
        }
    }
}
