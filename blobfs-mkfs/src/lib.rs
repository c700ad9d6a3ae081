//! mkfs.blobfs: collect regular files from trees, hash them in parallel, write one image.
//!
//! Two passes, because the layout (blobs in digest order) is known only once every file is
//! hashed: hashing (parallel over files, and over blocks within large files, started while the
//! trees are still being walked) and writing (in digest order, one thread writing, the pool
//! gathering what is not in memory). Files up to 16 KiB are read into memory while they are
//! hashed (up to 1 GiB in all) and written from there; larger ones are read again, and
//! checked unchanged, when they are written. Keeping every file up to 64 MiB was measured too:
//! the page faults of the fresh memory cost more system time than the second read saved
//! (/usr/share, 622 MiB: 1.59-1.77 s against 1.40-1.47 s). The output depends only on the set
//! of file contents, the epoch and the keys.

pub mod cli;

use blobfs::merkle::{Hash, MerkleTree};
use blobfs::writer::{self, Content, FileStamp, ImageSettings, PreparedBlob, Written};
use ed25519_dalek::SigningKey;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use std::fs;
use std::io::{self, IsTerminal, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;

/// One manifest line: which source path became which blob.
#[derive(Debug, Clone)]
pub struct ManifestEntry {
    pub path: PathBuf,
    pub digest: Hash,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MkfsError {
    #[error("{path}: {source}")]
    Walk { path: String, source: io::Error },
    #[error("{path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{0}: not a regular file any more (replaced while mkfs was running?)")]
    NotRegular(String),
    #[error(transparent)]
    Write(#[from] writer::WriteError),
}

/// What to build.
pub struct Options<'a> {
    pub inputs: &'a [PathBuf],
    pub follow_symlinks: bool,
    pub threads: Option<usize>,
    pub epoch: u64,
    pub keys: &'a [SigningKey],
    /// Show progress bars (only sensible on a terminal).
    pub progress: bool,
    /// fsync the image before it is renamed into place.
    pub fsync: bool,
}

/// Result of a build.
#[derive(Debug)]
pub struct Built {
    pub written: Written,
    pub manifest: Vec<ManifestEntry>,
    pub skipped: u64,
}

/// Walk the inputs and hand every regular file to `found`, in a deterministic order (inputs in
/// the order given, each tree sorted by name); stops early when `found` returns false. Special
/// files are skipped with a warning and never opened; symlinks are skipped unless
/// `follow_symlinks`. Returns how many entries were skipped.
pub fn walk_files(
    inputs: &[PathBuf],
    follow_symlinks: bool,
    mut found: impl FnMut(PathBuf) -> bool,
) -> Result<u64, MkfsError> {
    let mut skipped = 0;
    for input in inputs {
        let walker = walkdir::WalkDir::new(input)
            .follow_links(follow_symlinks)
            .follow_root_links(follow_symlinks)
            .sort_by_file_name();
        for entry in walker {
            let entry = entry.map_err(|e| MkfsError::Walk {
                path: e.path().unwrap_or(input).display().to_string(),
                source: e
                    .into_io_error()
                    .unwrap_or_else(|| io::Error::other("symlink loop")),
            })?;
            let ft = entry.file_type();
            if ft.is_file() {
                if !found(entry.into_path()) {
                    return Ok(skipped);
                }
            } else if ft.is_dir() {
            } else if ft.is_symlink() {
                tracing::info!(
                    "skipping symlink {} (use --follow-symlinks)",
                    entry.path().display()
                );
                skipped += 1;
            } else {
                tracing::warn!("skipping special file {}", entry.path().display());
                skipped += 1;
            }
        }
    }
    Ok(skipped)
}

/// Files up to this size are read into memory while they are hashed and written from there:
/// the write pass then neither reopens nor re-reads them (for a tree of small files, opening
/// and re-reading every file was most of the writing time), and the bytes written are the
/// bytes hashed.
const KEEP_MAX_FILE: u64 = 16 << 10;
/// At most this much file data is kept in memory; the rest is read again when written.
const KEEP_BUDGET: u64 = 1 << 30;

/// Hash one file: returns its tree and either its bytes (when `keep` has room for them) or the
/// stamp that the write pass re-checks before copying it.
pub fn hash_file(path: &Path, keep: &AtomicU64) -> Result<(MerkleTree, Content), MkfsError> {
    let rerr = |source| MkfsError::Read {
        path: path.display().to_string(),
        source,
    };
    let changed = || writer::WriteError::Changed(path.display().to_string()).into();
    let mut f = writer::open_source(path).map_err(rerr)?;
    let meta = f.metadata().map_err(rerr)?;
    if !meta.is_file() {
        return Err(MkfsError::NotRegular(path.display().to_string()));
    }
    let stamp = FileStamp::of(&meta);
    let size = meta.len();
    if size <= KEEP_MAX_FILE && keep.fetch_add(size, Ordering::Relaxed) + size <= KEEP_BUDGET {
        // One byte more than the size, so a file that grew is noticed.
        let mut data = Vec::with_capacity(size as usize + 1);
        (&mut f)
            .take(size + 1)
            .read_to_end(&mut data)
            .map_err(rerr)?;
        if data.len() as u64 != size {
            return Err(changed());
        }
        return Ok((MerkleTree::from_bytes(&data), Content::Memory(data)));
    }
    let tree = MerkleTree::from_reader(&mut f, Some(size)).map_err(rerr)?;
    // No second fstat here: a change while hashing moves mtime/ctime past this stamp, and the
    // write pass compares the file with the stamp before and after copying it.
    if tree.size != stamp.size {
        return Err(changed());
    }
    Ok((
        tree,
        Content::File {
            path: path.to_owned(),
            stamp,
        },
    ))
}

fn bar(enabled: bool, len: u64, msg: &'static str) -> ProgressBar {
    if !enabled {
        return ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix} {msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_prefix(msg);
    pb
}

/// Build an image at `target` from `opts.inputs`.
pub fn build(target: &Path, opts: &Options<'_>, cancel: &AtomicBool) -> Result<Built, MkfsError> {
    match opts.threads {
        // Both passes (hashing, and copying into the image) run on this many threads.
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build()
            .map_err(|e| MkfsError::Read {
                path: "thread pool".into(),
                source: io::Error::other(e.to_string()),
            })?
            .install(|| build_in_pool(target, opts, cancel)),
        None => build_in_pool(target, opts, cancel),
    }
}

fn build_in_pool(
    target: &Path,
    opts: &Options<'_>,
    cancel: &AtomicBool,
) -> Result<Built, MkfsError> {
    let started = std::time::Instant::now();
    // The bar's total grows as the walk finds files (a stat per file: only when it is shown).
    let hashing = bar(opts.progress, 0, "hashing");
    let files_done = AtomicU64::new(0);
    let kept = AtomicU64::new(0);
    // Hashing starts while the trees are still being walked: the walk (a few hundred ms for
    // /usr/share, one thread) no longer comes before it. Results are put back in walk order.
    let (found_tx, found_rx) = mpsc::sync_channel::<(usize, PathBuf)>(1024);
    let (walked, hashed) = std::thread::scope(|scope| {
        let walker = scope.spawn(|| {
            let mut n = 0;
            let skipped = walk_files(opts.inputs, opts.follow_symlinks, |path| {
                if opts.progress {
                    hashing.inc_length(fs::symlink_metadata(&path).map_or(0, |m| m.len()));
                }
                n += 1;
                // A send fails only when hashing has stopped (an error): stop walking too.
                found_tx.send((n - 1, path)).is_ok()
            });
            drop(found_tx);
            skipped.map(|s| (s, started.elapsed()))
        });
        let hashed: Result<Vec<_>, MkfsError> = found_rx
            .into_iter()
            .par_bridge()
            .map(|(i, p)| {
                if cancel.load(Ordering::Relaxed) {
                    return Err(writer::WriteError::Cancelled.into());
                }
                let r = hash_file(&p, &kept)?;
                hashing.inc(r.0.size);
                let n = files_done.fetch_add(1, Ordering::Relaxed) + 1;
                hashing.set_message(format!("{n} files"));
                Ok((i, p, r))
            })
            .collect();
        let walked = walker.join().unwrap_or_else(|_| {
            Err(MkfsError::Walk {
                path: "walker thread".into(),
                source: io::Error::other("panicked"),
            })
        });
        (walked, hashed)
    });
    // A walk error explains a short hash run better than anything hashing says.
    let (skipped, walked) = walked?;
    let mut hashed = hashed?;
    hashed.sort_unstable_by_key(|h| h.0);
    let hashed_at = started.elapsed();
    hashing.finish_and_clear();

    let mut manifest = Vec::with_capacity(hashed.len());
    let mut blobs = Vec::with_capacity(hashed.len());
    for (_, path, (tree, content)) in hashed {
        manifest.push(ManifestEntry {
            path,
            digest: tree.digest(),
            size: tree.size,
        });
        blobs.push(PreparedBlob { tree, content });
    }
    let unique: u64 = {
        let mut seen = std::collections::HashSet::new();
        manifest
            .iter()
            .filter(|m| seen.insert(m.digest))
            .map(|m| m.size)
            .sum()
    };
    let writing = bar(opts.progress, unique, "writing");
    let written = writer::write_image(
        target,
        blobs,
        &ImageSettings {
            epoch: opts.epoch,
            keys: opts.keys,
            fsync: opts.fsync,
        },
        &|n| writing.set_position(n),
        cancel,
    )?;
    writing.finish_and_clear();
    tracing::debug!(
        "{} files: walk done at {:.3} s, hashing done at {:.3} s, writing {:.3} s",
        manifest.len(),
        walked.as_secs_f64(),
        hashed_at.as_secs_f64(),
        (started.elapsed() - hashed_at).as_secs_f64()
    );
    Ok(Built {
        written,
        manifest,
        skipped,
    })
}

/// Write the manifest: one line per source file, `DIGEST SIZE PATH`, the path escaped so that
/// any byte string survives (`\\`, `\n`, `\t`, `\xHH` for other control and non-UTF-8 bytes).
pub fn write_manifest(out: &mut impl Write, manifest: &[ManifestEntry]) -> io::Result<()> {
    for m in manifest {
        writeln!(
            out,
            "{} {} {}",
            blobfs::hex_digest(&m.digest),
            m.size,
            escape_path(&m.path)
        )?;
    }
    Ok(())
}

pub fn escape_path(p: &Path) -> String {
    let bytes = p.as_os_str().as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let text = String::from_utf8_lossy(bytes);
    if matches!(text, std::borrow::Cow::Borrowed(_)) {
        for c in text.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
                c => out.push(c),
            }
        }
    } else {
        for &b in bytes {
            match b {
                b'\\' => out.push_str("\\\\"),
                b'\n' => out.push_str("\\n"),
                b'\t' => out.push_str("\\t"),
                0x20..=0x7e => out.push(b as char),
                b => out.push_str(&format!("\\x{b:02x}")),
            }
        }
    }
    out
}

/// Is standard error a terminal (progress bars are shown only then)?
pub fn stderr_is_tty() -> bool {
    io::stderr().is_terminal()
}
