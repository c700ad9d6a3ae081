//! `mkfs.blobfs`: thin binary over the `blobfs_mkfs` library.

use blobfs_mkfs::cli::Cli;
use blobfs_mkfs::{Options, build, write_manifest};
use clap::Parser;
use cli_common::CliError;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // -q drops the info lines too (one per skipped symlink can be thousands); warnings stay.
    cli_common::logging::init("mkfs.blobfs", cli.verbose + u8::from(!cli.quiet));
    cli_common::run("mkfs.blobfs", || run(&cli))
}

fn run(cli: &Cli) -> Result<(), CliError> {
    // Ctrl-C, SIGTERM and SIGHUP stop the build between steps; the temporary image is removed.
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(sig, cancel.clone()).map_err(CliError::failure)?;
    }
    let keys = cli
        .sign
        .iter()
        .map(|k| blobfs::sign::load_signing_key(k))
        .collect::<Result<Vec<_>, _>>()
        .map_err(CliError::failure)?;
    let opts = Options {
        inputs: &cli.paths,
        follow_symlinks: cli.follow_symlinks,
        threads: cli.threads,
        epoch: cli.epoch,
        keys: &keys,
        progress: !cli.quiet && blobfs_mkfs::stderr_is_tty(),
        fsync: cli.fsync,
    };
    let built = build(&cli.image, &opts, &cancel).map_err(CliError::failure)?;
    if let Some(path) = &cli.manifest {
        let mut f = std::fs::File::create(path)
            .map_err(|e| CliError::failure(format!("{}: {e}", path.display())))?;
        write_manifest(&mut f, &built.manifest)
            .and_then(|()| f.flush())
            .map_err(|e| CliError::failure(format!("{}: {e}", path.display())))?;
    }
    if cli.json {
        let files: Vec<_> = built
            .manifest
            .iter()
            .map(|m| {
                serde_json::json!({
                    "path": m.path.to_string_lossy(),
                    "digest": blobfs::hex_digest(&m.digest),
                    "size": m.size,
                })
            })
            .collect();
        let v = serde_json::json!({
            "image": cli.image.to_string_lossy(),
            "image_size": built.written.image_size,
            "blobs": built.written.blobs,
            "files": files,
            "skipped": built.skipped,
            "signed": !keys.is_empty(),
        });
        println!("{v}");
    } else if !cli.quiet {
        eprintln!(
            "{}: {} files, {} unique blobs, {} bytes{}{}",
            cli.image.display(),
            built.manifest.len(),
            built.written.blobs,
            built.written.image_size,
            if keys.is_empty() {
                ", unsigned"
            } else {
                ", signed"
            },
            if built.skipped > 0 {
                format!(", {} non-regular entries skipped", built.skipped)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}
