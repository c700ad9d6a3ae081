//! `blobfs`: mount, verify and inspect blobfs images; also `mount.blobfs` for mount(8).

use blobfs::cli::{Cli, Command, StoreCommand};
use blobfs::image::{Image, OpenOptions};
use blobfs::merkle::parse_digest;
use blobfs::mount::{Kind, MountRequest, mount};
use blobfs::sign;
use blobfs::store::{Added, Store};
use clap::Parser;
use cli_common::{CliError, options};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    // Installed as `mount.blobfs` too (a link to this binary): mount(8) runs helpers with its
    // own calling convention.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let helper = Path::new(&argv0).file_name().and_then(|n| n.to_str());
    if let Some(name @ ("mount.blobfs" | "mount.blobfs-store")) = helper {
        let kind = if name == "mount.blobfs" {
            Kind::Image
        } else {
            Kind::Store
        };
        cli_common::logging::init(name, 1);
        let args: Vec<_> = std::env::args_os().skip(1).collect();
        return cli_common::run(name, || {
            let req = blobfs::mount::parse_helper_args(&args)?;
            mount(&req, kind)
        });
    }
    let cli = Cli::parse();
    let daemon = matches!(
        cli.command,
        Command::Mount(_) | Command::Store(StoreCommand::Mount(_))
    );
    // Daemons log at info by default; one-shot tools only warn unless asked.
    cli_common::logging::init("blobfs", cli.verbose + u8::from(daemon));
    cli_common::run("blobfs", || run(cli.command))
}

fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Mount(a) => mount(
            &MountRequest {
                source: a.image,
                mountpoint: a.mountpoint,
                keys: a.keys,
                options: a.options.iter().flat_map(|o| options::parse(o)).collect(),
                foreground: a.foreground,
            },
            Kind::Image,
        ),
        Command::Store(c) => store_command(c),
        Command::Verify(a) => verify(&a.image, &a.keys),
        Command::Ls(a) => ls(&a.image, a.json),
        Command::Cat(a) => cat(&a.image, &a.digest),
        Command::Inspect(a) => inspect(&a.image, a.json),
        Command::Keygen(a) => keygen(&a.private, a.public),
    }
}

fn open(path: &Path, keys: &[PathBuf]) -> Result<Image, CliError> {
    let keys = keys
        .iter()
        .map(|k| sign::load_verifying_key(k))
        .collect::<Result<Vec<_>, _>>()
        .map_err(CliError::failure)?;
    Image::open(
        path,
        &OpenOptions {
            keys,
            ..OpenOptions::default()
        },
    )
    .map_err(CliError::failure)
}

fn verify(path: &Path, keys: &[PathBuf]) -> Result<(), CliError> {
    use rayon::prelude::*;
    let image = open(path, keys)?;
    let bad: Vec<String> = (0..image.entries().len())
        .into_par_iter()
        .filter_map(|i| image.verify_blob(i).err().map(|e| e.to_string()))
        .collect();
    for b in &bad {
        println!("BAD {b}");
    }
    let n = image.entries().len();
    match (bad.len(), image.signed_by()) {
        (0, Some(id)) => {
            println!(
                "{}: OK, {n} blobs verified, signed by key id {}",
                path.display(),
                hex::encode(&id[..8])
            );
            Ok(())
        }
        (0, None) => {
            println!(
                "{}: OK, {n} blobs verified (signature not checked: no --key given)",
                path.display()
            );
            Ok(())
        }
        (k, _) => Err(CliError::failure(format!(
            "{}: {k} of {n} blobs failed verification",
            path.display()
        ))),
    }
}

fn ls(path: &Path, json: bool) -> Result<(), CliError> {
    let image = open(path, &[])?;
    let mut out = std::io::stdout().lock();
    if json {
        let list: Vec<_> = image
            .entries()
            .iter()
            .map(|e| serde_json::json!({"digest": hex::encode(e.digest), "size": e.size}))
            .collect();
        writeln!(out, "{}", serde_json::Value::Array(list)).map_err(CliError::failure)?;
    } else {
        for e in image.entries() {
            writeln!(out, "{} {}", hex::encode(e.digest), e.size).map_err(CliError::failure)?;
        }
    }
    Ok(())
}

fn cat(path: &Path, digest: &str) -> Result<(), CliError> {
    let d = parse_digest(digest).ok_or_else(|| {
        CliError::usage(format!(
            "{digest:?} is not a digest (64 lowercase hex digits)"
        ))
    })?;
    let image = open(path, &[])?;
    let idx = image
        .find(&d)
        .ok_or_else(|| CliError::failure(format!("{}: no blob {digest}", path.display())))?;
    let size = image.entries()[idx].size;
    let mut out = std::io::stdout().lock();
    let step = 1 << 20;
    let mut offset = 0;
    while offset < size {
        let data = image
            .read_verified(idx, offset, step)
            .map_err(CliError::failure)?;
        out.write_all(&data).map_err(CliError::failure)?;
        offset += data.len() as u64;
    }
    out.flush().map_err(CliError::failure)
}

fn inspect(path: &Path, json: bool) -> Result<(), CliError> {
    let image = open(path, &[])?;
    let h = image.header();
    let sigs: Vec<String> = image
        .signatures()
        .iter()
        .map(|s| hex::encode(s.key_id))
        .collect();
    let total: u64 = image.entries().iter().map(|e| e.size).sum();
    if json {
        let v = serde_json::json!({
            "version": h.version,
            "epoch": h.epoch,
            "image_size": h.image_size,
            "blobs": h.blob_count,
            "blob_bytes": total,
            "index": {"offset": h.index_offset, "size": h.index_size,
                      "sha256": hex::encode(h.index_sha256)},
            "trees": {"offset": h.tree_offset, "size": h.tree_size},
            "data": {"offset": h.data_offset, "size": h.data_size},
            "signatures": sigs,
        });
        println!("{v}");
    } else {
        println!("format version: {}", h.version);
        println!("epoch:          {}", h.epoch);
        println!("image size:     {} bytes", h.image_size);
        println!(
            "blobs:          {} ({} bytes of content)",
            h.blob_count, total
        );
        println!(
            "index:          {} bytes at {}, sha256 {}",
            h.index_size,
            h.index_offset,
            hex::encode(h.index_sha256)
        );
        println!("trees:          {} bytes at {}", h.tree_size, h.tree_offset);
        println!("data:           {} bytes at {}", h.data_size, h.data_offset);
        if sigs.is_empty() {
            println!("signatures:     none");
        }
        for s in sigs {
            println!("signature:      key id {s}");
        }
    }
    Ok(())
}

fn keygen(private: &Path, public: Option<PathBuf>) -> Result<(), CliError> {
    let public = public.unwrap_or_else(|| {
        let stem = private
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "key".into());
        private.with_file_name(format!("{stem}.pub.pem"))
    });
    let key = sign::generate_key_pair(private, &public).map_err(CliError::failure)?;
    println!(
        "wrote {} and {} (key id {})",
        private.display(),
        public.display(),
        hex::encode(sign::key_id(&key))
    );
    Ok(())
}

fn store_command(c: StoreCommand) -> Result<(), CliError> {
    let open = |dir: &Path| Store::open(dir).map_err(CliError::failure);
    match c {
        StoreCommand::Init { dir } => {
            Store::init(&dir).map_err(CliError::failure)?;
            println!("{}: empty store created", dir.display());
            Ok(())
        }
        StoreCommand::Mount(a) => mount(
            &MountRequest {
                source: a.dir,
                mountpoint: a.mountpoint,
                keys: Vec::new(),
                options: a.options.iter().flat_map(|o| options::parse(o)).collect(),
                foreground: a.foreground,
            },
            Kind::Store,
        ),
        StoreCommand::Put { dir, files } => {
            let store = open(&dir)?;
            for f in files {
                let (digest, note) = match store.put_file(&f).map_err(CliError::failure)? {
                    Added::New(d) => (d, ""),
                    Added::AlreadyPresent(d) => (d, " (already present)"),
                };
                println!("{} {}{note}", hex::encode(digest), f.display());
            }
            Ok(())
        }
        StoreCommand::Ls { dir } => {
            for (d, r) in open(&dir)?.list().map_err(CliError::failure)? {
                println!("{} {}", hex::encode(d), r.size);
            }
            Ok(())
        }
        StoreCommand::Verify { dir } => {
            let store = open(&dir)?;
            let problems = store.verify().map_err(CliError::failure)?;
            for p in &problems {
                println!("BAD {p}");
            }
            let n = store.list().map_err(CliError::failure)?.len();
            if problems.is_empty() {
                println!("{}: OK, {n} blobs verified", dir.display());
                Ok(())
            } else {
                Err(CliError::failure(format!(
                    "{}: {} problems found",
                    dir.display(),
                    problems.len()
                )))
            }
        }
        StoreCommand::Gc { dir } => {
            let (files, bytes) = open(&dir)?.gc().map_err(CliError::failure)?;
            println!("{}: reclaimed {files} files, {bytes} bytes", dir.display());
            Ok(())
        }
        StoreCommand::Export {
            dir,
            image,
            sign,
            epoch,
        } => {
            let keys = sign
                .iter()
                .map(|k| sign::load_signing_key(k))
                .collect::<Result<Vec<_>, _>>()
                .map_err(CliError::failure)?;
            let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(sig, cancel.clone()).map_err(CliError::failure)?;
            }
            let w = open(&dir)?
                .export(&image, epoch, &keys, &cancel)
                .map_err(CliError::failure)?;
            println!(
                "{}: {} blobs, {} bytes",
                image.display(),
                w.blobs,
                w.image_size
            );
            Ok(())
        }
    }
}
