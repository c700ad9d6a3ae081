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
use std::sync::Arc;

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
                options: a
                    .options
                    .iter()
                    .flat_map(|o| options::parse(o))
                    .chain(a.remote.map(|url| options::MountOpt {
                        key: "remote".into(),
                        value: Some(url),
                    }))
                    .chain(a.cache.map(|dir| options::MountOpt {
                        key: "cache".into(),
                        value: Some(dir.display().to_string()),
                    }))
                    .chain(a.offline.then(|| options::MountOpt {
                        key: "offline".into(),
                        value: None,
                    }))
                    .collect(),
                foreground: a.foreground,
            },
            Kind::Image,
        ),
        Command::Store(c) => store_command(c),
        Command::Verify(a) => verify(&a.image, &a.keys, a.remote.as_deref()),
        Command::Ls(a) => ls(&a.image, a.json),
        Command::Cat(a) => cat(&a.image, &a.digest, a.remote.as_deref()),
        Command::Thin(a) => thin(&a.image, &a.thin),
        Command::Push(a) => push(&a.image, &a.url, a.timeout),
        Command::Inspect(a) => inspect(&a.image, a.json),
        Command::Keygen(a) => keygen(&a.private, a.public),
    }
}

fn open(path: &Path, keys: &[PathBuf]) -> Result<Image, CliError> {
    open_with(path, keys, None)
}

/// Open an image; with `remote`, a thin image reads its blob data from there.
fn open_with(path: &Path, keys: &[PathBuf], remote: Option<&str>) -> Result<Image, CliError> {
    let keys = keys
        .iter()
        .map(|k| sign::load_verifying_key(k))
        .collect::<Result<Vec<_>, _>>()
        .map_err(CliError::failure)?;
    let data_source = match remote {
        None => None,
        Some(url) => Some(Arc::new(
            blobfs::remote::Remote::open(url, Default::default()).map_err(CliError::failure)?,
        ) as Arc<dyn blobfs::image::BlobSource>),
    };
    Image::open(
        path,
        &OpenOptions {
            keys,
            data_source,
            ..OpenOptions::default()
        },
    )
    .map_err(CliError::failure)
}

fn verify(path: &Path, keys: &[PathBuf], remote: Option<&str>) -> Result<(), CliError> {
    use rayon::prelude::*;
    let image = open_with(path, keys, remote)?;
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

fn cat(path: &Path, digest: &str, remote: Option<&str>) -> Result<(), CliError> {
    let d = parse_digest(digest).ok_or_else(|| {
        CliError::usage(format!(
            "{digest:?} is not a digest (64 lowercase hex digits)"
        ))
    })?;
    let image = match remote {
        None => open(path, &[])?,
        Some(url) => {
            let remote =
                blobfs::remote::Remote::open(url, Default::default()).map_err(CliError::failure)?;
            Image::open(
                path,
                &OpenOptions {
                    data_source: Some(Arc::new(remote)),
                    ..OpenOptions::default()
                },
            )
            .map_err(CliError::failure)?
        }
    };
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
        StoreCommand::Prefetch { dir, remote, thin } => prefetch(&dir, &remote, &thin),
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

/// The thin image is the full image cut where blob data starts: header, signatures, index and
/// trees stay byte-identical, so every signature stays valid and no format change is needed.
fn thin(path: &Path, out: &Path) -> Result<(), CliError> {
    let image = open(path, &[])?;
    if image.is_thin() {
        return Err(CliError::failure(format!(
            "{} is already thin",
            path.display()
        )));
    }
    let len = image.header().data_offset;
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".blobfs-thin.")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .tempfile_in(dir)
        .map_err(|e| CliError::failure(format!("{}: cannot create a file: {e}", dir.display())))?;
    let mut src = std::io::Read::take(image.file(), len);
    let copied = std::io::copy(&mut src, tmp.as_file_mut())
        .and_then(|n| tmp.as_file().sync_all().map(|()| n))
        .map_err(|e| CliError::failure(format!("{}: {e}", out.display())))?;
    if copied != len {
        return Err(CliError::failure(format!(
            "{}: image shrank while it was copied",
            path.display()
        )));
    }
    tmp.persist(out)
        .map_err(|e| CliError::failure(format!("{}: {}", out.display(), e.error)))?;
    println!(
        "{}: {} blobs, {} bytes (full image {} bytes)",
        out.display(),
        image.entries().len(),
        len,
        image.header().image_size
    );
    Ok(())
}

/// Upload every blob the remote lacks. Blob bytes are read verified, so a corrupted local
/// image never poisons the remote.
fn push(path: &Path, url: &str, timeout: u64) -> Result<(), CliError> {
    use rayon::prelude::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    let image = open(path, &[])?;
    if image.is_thin() {
        return Err(CliError::failure(format!(
            "{} is thin: push the full image",
            path.display()
        )));
    }
    let remote = blobfs::remote::Remote::open(
        url,
        blobfs::remote::RemoteOptions {
            timeout: std::time::Duration::from_secs(timeout.max(1)),
            create_local_dir: true,
            ..Default::default()
        },
    )
    .map_err(CliError::failure)?;
    let total: u64 = image.entries().iter().map(|e| e.size).sum();
    let bar = bytes_bar(total, "pushing");
    let (sent, sent_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .map_err(CliError::failure)?;
    let failures: Vec<String> = pool.install(|| {
        (0..image.entries().len())
            .into_par_iter()
            .filter_map(|i| {
                let e = &image.entries()[i];
                let r = remote.has(&e.digest, e.size).and_then(|present| {
                    if present {
                        return Ok(());
                    }
                    remote.put(&e.digest, e.size, |off, len| {
                        image
                            .read_verified(i, off, len)
                            .map_err(|err| std::io::Error::other(err.to_string()))
                    })?;
                    sent.fetch_add(1, Ordering::Relaxed);
                    sent_bytes.fetch_add(e.size, Ordering::Relaxed);
                    Ok(())
                });
                bar.inc(e.size);
                r.err()
                    .map(|err| format!("{}: {err}", blobfs::hex_digest(&e.digest)))
            })
            .collect()
    });
    bar.finish_and_clear();
    for f in &failures {
        eprintln!("blobfs: push: {f}");
    }
    let n = image.entries().len() as u64;
    let sent = sent.into_inner();
    println!(
        "{url}: {sent} blobs uploaded ({} bytes), {} already there, {} failed",
        sent_bytes.into_inner(),
        n - sent - failures.len() as u64,
        failures.len()
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(CliError::failure(format!(
            "{} of {n} blobs not pushed; run the same command again to retry them",
            failures.len()
        )))
    }
}

/// Fill a store with every blob of an image from a remote; each is hashed on arrival and kept
/// only if it matches its digest.
fn prefetch(dir: &Path, url: &str, thin: &Path) -> Result<(), CliError> {
    use rayon::prelude::*;
    let remote =
        Arc::new(blobfs::remote::Remote::open(url, Default::default()).map_err(CliError::failure)?);
    let image = Image::open(
        thin,
        &OpenOptions {
            data_source: Some(remote.clone()),
            ..OpenOptions::default()
        },
    )
    .map_err(CliError::failure)?;
    let store = Store::open(dir).map_err(CliError::failure)?;
    let total: u64 = image.entries().iter().map(|e| e.size).sum();
    let bar = bytes_bar(total, "prefetching");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .map_err(CliError::failure)?;
    let results: Vec<Result<bool, String>> = pool.install(|| {
        image
            .entries()
            .par_iter()
            .map(|e| {
                let r = blobfs::remote_cache::fetch_into_store(&remote, &store, &e.digest, e.size)
                    .map(|a| matches!(a, Added::New(_)))
                    .map_err(|err| format!("{}: {err}", blobfs::hex_digest(&e.digest)));
                bar.inc(e.size);
                r
            })
            .collect()
    });
    bar.finish_and_clear();
    let fetched = results.iter().filter(|r| matches!(r, Ok(true))).count();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    for f in &failed {
        eprintln!("blobfs: prefetch: {f}");
    }
    println!(
        "{}: {fetched} blobs fetched, {} already cached, {} failed",
        dir.display(),
        results.len() - fetched - failed.len(),
        failed.len()
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CliError::failure(format!(
            "{} blobs not fetched; run the same command again to retry them",
            failed.len()
        )))
    }
}

/// A progress bar over bytes; indicatif draws it only when stderr is a terminal.
fn bytes_bar(total: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} [{{bar:30}}] {{binary_bytes}}/{{binary_total_bytes}} {{binary_bytes_per_sec}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}
