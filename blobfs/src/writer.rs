//! Writing images. Used by `mkfs.blobfs` and by `blobfs store export`, so both produce the same
//! bytes for the same blobs.
//!
//! The layout is a pure function of the set of blobs (sorted by digest), the epoch and the
//! signing keys: file order and thread count cannot change the output. The image is written to
//! a temporary file next to the target and renamed into place only when complete and synced.

use crate::format::{
    self, ENTRY_SIZE, Entry, HEADER_SIZE, Header, INDEX_OFFSET, MAX_SIGNATURES, VERSION,
};
use crate::merkle::{BLOCK_SIZE, Hash, MerkleTree};
use crate::sign;
use ed25519_dalek::SigningKey;
use rayon::prelude::*;
use sha2::{Digest as _, Sha256};
use std::fs::{self, File};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};

/// Identity of a source file when it was hashed. If any of it differs when the data is copied,
/// the file changed in between and the image would not match its index: refuse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl FileStamp {
    pub fn of(meta: &fs::Metadata) -> FileStamp {
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// Where a blob's bytes come from when the image is written.
#[derive(Clone, Debug)]
pub enum Content {
    /// A file that was hashed earlier; it must still match the stamp.
    File { path: PathBuf, stamp: FileStamp },
    /// Bytes in memory (tests, small generated blobs).
    Memory(Vec<u8>),
}

/// A hashed blob ready to be placed in an image.
#[derive(Clone, Debug)]
pub struct PreparedBlob {
    pub tree: MerkleTree,
    pub content: Content,
}

impl PreparedBlob {
    pub fn digest(&self) -> Hash {
        self.tree.digest()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{0}: the file changed while it was being read; run again")]
    Changed(String),
    #[error("interrupted: no image was written")]
    Cancelled,
    #[error("at most {MAX_SIGNATURES} signing keys are supported")]
    TooManyKeys,
}

/// Image-wide settings.
#[derive(Default)]
pub struct ImageSettings<'a> {
    pub epoch: u64,
    pub keys: &'a [SigningKey],
    /// fsync the image before renaming it into place. Off by default, as for mkfs.erofs and
    /// mksquashfs: after a power loss an unsynced image may be incomplete, and readers refuse
    /// an incomplete image (truncated or failing verification), never serve it.
    pub fsync: bool,
}

/// Summary of a written image.
#[derive(Debug, Clone)]
pub struct Written {
    pub blobs: u64,
    pub image_size: u64,
    pub data_bytes: u64,
}

/// Write an image of `blobs` (duplicates by digest are stored once) to `target`.
/// `progress` is told how many data bytes were copied; `cancel` aborts cleanly when set.
pub fn write_image(
    target: &Path,
    blobs: Vec<PreparedBlob>,
    settings: &ImageSettings<'_>,
    progress: &(dyn Fn(u64) + Sync),
    cancel: &AtomicBool,
) -> Result<Written, WriteError> {
    if settings.keys.len() > MAX_SIGNATURES {
        return Err(WriteError::TooManyKeys);
    }
    // Each digest is a SHA-256 of the blob's descriptor: computed once here, not at every
    // comparison of the sort (that was 0.4 s of a 45k-file mkfs).
    let mut blobs: Vec<(Hash, PreparedBlob)> = blobs.into_iter().map(|b| (b.digest(), b)).collect();
    blobs.sort_by_key(|a| a.0);
    blobs.dedup_by(|a, b| a.0 == b.0);

    let bs = BLOCK_SIZE as u64;
    let count = blobs.len() as u64;
    let index_size = count * ENTRY_SIZE as u64;
    let tree_offset = INDEX_OFFSET + index_size.next_multiple_of(bs);
    let mut entries = Vec::with_capacity(blobs.len());
    let mut next_tree = tree_offset;
    for (digest, b) in &blobs {
        let len = b.tree.tree.len() as u64;
        entries.push(Entry {
            digest: *digest,
            size: b.tree.size,
            data_offset: 0,
            tree_offset: if len > 0 { next_tree } else { 0 },
            flags: 0,
        });
        next_tree += len;
    }
    let data_offset = next_tree;
    let mut next_data = data_offset;
    for e in &mut entries {
        let len = e.stored_data_len();
        e.data_offset = if len > 0 { next_data } else { 0 };
        next_data += len;
    }
    let mut index = Vec::with_capacity(index_size as usize);
    for e in &entries {
        index.extend_from_slice(&e.encode());
    }
    let header = Header {
        version: VERSION,
        block_size: BLOCK_SIZE as u32,
        incompat_features: 0,
        compat_features: 0,
        epoch: settings.epoch,
        image_size: next_data,
        blob_count: count,
        index_offset: INDEX_OFFSET,
        index_size,
        tree_offset,
        tree_size: data_offset - tree_offset,
        data_offset,
        data_size: next_data - data_offset,
        index_sha256: Sha256::digest(&index).into(),
    };
    let encoded: [u8; HEADER_SIZE] = header.encode();
    let slots: Vec<_> = settings
        .keys
        .iter()
        .map(|k| sign::sign_header(k, &encoded))
        .collect();

    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let io_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| WriteError::Io {
            path: path.clone(),
            source,
        }
    };
    // Images are public, signed content: readable by all, like any file mkfs writes.
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .tempfile_in(&dir)
        .map_err(io_err(&dir))?;
    let out = tmp.as_file();
    let w = io_err(tmp.path());
    // Pre-size the file: block padding and gaps are then holes that read as zeros, and every
    // region can be written at its offset.
    out.set_len(header.image_size).map_err(&w)?;
    out.write_all_at(&encoded, 0).map_err(&w)?;
    out.write_all_at(
        &format::encode_signature_block(&slots),
        format::SIGNATURE_BLOCK_OFFSET,
    )
    .map_err(&w)?;
    out.write_all_at(&index, INDEX_OFFSET).map_err(&w)?;
    // Trees and blob data, in image order, gathered into runs of adjacent pieces.
    let mut pieces = Vec::with_capacity(blobs.len() * 2);
    for ((_, b), e) in blobs.iter().zip(&entries) {
        if !b.tree.tree.is_empty() {
            pieces.push((
                e.tree_offset,
                b.tree.tree.len() as u64,
                Piece::Bytes(&b.tree.tree),
                0,
            ));
        }
    }
    for ((_, b), e) in blobs.iter().zip(&entries).filter(|(_, e)| e.size > 0) {
        let piece = match &b.content {
            Content::Memory(data) => Piece::Bytes(data),
            Content::File { path, stamp } => Piece::File { path, stamp },
        };
        pieces.push((e.data_offset, e.stored_data_len(), piece, e.size));
    }
    let runs = gather_runs(pieces);
    // Every write to the image takes its inode lock: writing blob by blob from several threads
    // only spun on that lock, and doing everything from one thread left the per-file opens and
    // reads on one core. So the pool fills buffers of adjacent pieces (open, check, read) and
    // one thread does every write to the image, a few buffers circulating between them.
    let (job_tx, job_rx) = mpsc::sync_channel::<(Job<'_>, &Run<'_>)>(RUN_BUFFERS);
    let (free_tx, free_rx) = mpsc::sync_channel::<Vec<u8>>(RUN_BUFFERS);
    let free_rx = Mutex::new(free_rx);
    let writer_gone = || WriteError::Io {
        path: tmp.path().display().to_string(),
        source: io::Error::other("the image writer stopped"),
    };
    let w = &w;
    std::thread::scope(|scope| -> Result<(), WriteError> {
        let writer = scope.spawn(move || -> Result<(), WriteError> {
            let mut copied = 0;
            let mut unflushed = 0;
            for (job, run) in job_rx {
                match job {
                    Job::Filled(buf, len) => {
                        out.write_all_at(&buf[..len], run.start).map_err(w)?;
                        // A full pool (or no filler left) just drops the buffer.
                        let _ = free_tx.try_send(buf);
                    }
                    // Too large to buffer: copied in the kernel straight from the file.
                    Job::Copy(path, stamp, size) => {
                        copy_file(path, stamp, size, out, run.start, cancel)?
                    }
                    Job::Memory => write_run_vectored(out, run).map_err(w)?,
                }
                let data: u64 = run.pieces.iter().map(|p| p.2).sum();
                if data > 0 {
                    copied += data;
                    progress(copied);
                }
                // An image that will be fsynced is sent to the disk while the rest is still
                // being written, so the final fsync waits only for the last few runs.
                unflushed += run.len();
                if settings.fsync && unflushed >= WRITEBACK_BYTES {
                    mount_api::start_writeback(out.as_fd(), 0, 0).map_err(w)?;
                    unflushed = 0;
                }
            }
            Ok(())
        });
        let filled = runs.par_iter().try_for_each_with(job_tx, |job_tx, run| {
            if cancel.load(Ordering::Relaxed) {
                return Err(WriteError::Cancelled);
            }
            let job = match run.pieces.as_slice() {
                [(_, Piece::File { path, stamp }, size)] if run.len() > RUN_BYTES => {
                    Job::Copy(path, stamp, *size)
                }
                pieces if pieces.iter().all(|p| matches!(p.1, Piece::Bytes(_))) => Job::Memory,
                _ => {
                    // Never wait for a free buffer (only for room in the writer's queue, which
                    // bounds the buffers in flight): a wait here could outlast the writer.
                    let mut buf = free_rx
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .try_recv()
                        .unwrap_or_default();
                    let len = run.len() as usize;
                    fill_run(run, &mut buf, len)?;
                    Job::Filled(buf, len)
                }
            };
            job_tx.send((job, run)).map_err(|_| writer_gone())
        });
        // The fillers' senders are gone now, so the writer ends once it has written the rest.
        let written = writer.join().unwrap_or_else(|_| Err(writer_gone()));
        written.and(filled)
    })?;
    if settings.fsync {
        out.sync_all().map_err(&w)?;
    }
    tmp.persist(target).map_err(|e| WriteError::Io {
        path: target.display().to_string(),
        source: e.error,
    })?;
    if settings.fsync {
        // Make the rename itself durable.
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&dir))?;
    }
    Ok(Written {
        blobs: count,
        image_size: header.image_size,
        data_bytes: header.data_size,
    })
}

/// Bytes gathered in memory before one write to the image; larger pieces are copied alone.
const RUN_BYTES: u64 = 4 << 20;

/// Where the bytes of one region of the image come from.
enum Piece<'a> {
    Bytes(&'a [u8]),
    File {
        path: &'a Path,
        stamp: &'a FileStamp,
    },
}

/// Adjacent pieces of the image written with one `pwrite()`: offsets relative to `start`, and
/// the count of blob data bytes (for progress; 0 for trees). The last piece ends at `end`.
struct Run<'a> {
    start: u64,
    end: u64,
    pieces: Vec<(u64, Piece<'a>, u64)>,
}

impl Run<'_> {
    fn len(&self) -> u64 {
        self.end - self.start
    }
}

/// Group `(offset, stored length, piece, data bytes)`, sorted by offset, into runs of
/// adjacent pieces of about `RUN_BYTES`.
fn gather_runs(pieces: Vec<(u64, u64, Piece<'_>, u64)>) -> Vec<Run<'_>> {
    let mut runs: Vec<Run<'_>> = Vec::new();
    for (offset, stored, piece, data) in pieces {
        match runs.last_mut() {
            Some(run) if run.end == offset && run.len() + stored <= RUN_BYTES => {
                run.pieces.push((offset - run.start, piece, data));
                run.end += stored;
            }
            _ => runs.push(Run {
                start: offset,
                end: offset + stored,
                pieces: vec![(0, piece, data)],
            }),
        }
    }
    runs
}

/// What the image writer does with one run.
enum Job<'a> {
    /// Write the first `len` bytes of the buffer.
    Filled(Vec<u8>, usize),
    /// Copy the whole (hashed) file.
    Copy(&'a Path, &'a FileStamp, u64),
    /// Every piece of the run is in memory: written from there with one `pwritev()` per
    /// `IOV_MAX` pieces, without first gathering it into a buffer (one copy of the data less).
    Memory,
}

/// Dirty bytes after which an image that will be fsynced is sent on to the disk.
const WRITEBACK_BYTES: u64 = 32 << 20;

/// Most buffers one `pwritev()` takes (`IOV_MAX` on Linux).
const IOV_MAX: usize = 1024;

static ZEROS: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];

/// Write a run whose pieces are all in memory, with zeros for block padding.
fn write_run_vectored(out: &File, run: &Run<'_>) -> io::Result<()> {
    let mut slices = Vec::with_capacity(run.pieces.len() * 2);
    let mut pieces = run.pieces.iter().peekable();
    while let Some((rel, piece, _)) = pieces.next() {
        let Piece::Bytes(data) = piece else {
            return Err(io::Error::other("a file piece in an in-memory run"));
        };
        let end = pieces.peek().map_or(run.len(), |p| p.0);
        slices.push(io::IoSlice::new(data));
        let mut pad = end - rel - data.len() as u64;
        while pad > 0 {
            let n = pad.min(BLOCK_SIZE as u64);
            slices.push(io::IoSlice::new(&ZEROS[..n as usize]));
            pad -= n;
        }
    }
    let mut at = run.start;
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let batch = rest.len().min(IOV_MAX);
        match rustix::io::pwritev(out, &rest[..batch], at) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                at += n as u64;
                io::IoSlice::advance_slices(&mut rest, n);
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Filled buffers queued for the image writer, and spare buffers kept for reuse.
const RUN_BUFFERS: usize = 4;

/// Fill `buf[..len]` with the bytes of `run`: its pieces, and zeros for block padding (what
/// the holes of a sparse write would read).
fn fill_run(run: &Run<'_>, buf: &mut Vec<u8>, len: usize) -> Result<(), WriteError> {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    let buf = &mut buf[..len];
    let mut pieces = run.pieces.iter().peekable();
    while let Some((rel, piece, size)) = pieces.next() {
        let end = pieces.peek().map_or(len, |p| p.0 as usize);
        let at = *rel as usize;
        let filled = match piece {
            Piece::Bytes(data) => {
                buf[at..at + data.len()].copy_from_slice(data);
                data.len()
            }
            Piece::File { path, stamp } => {
                read_file(path, stamp, &mut buf[at..at + *size as usize])?;
                *size as usize
            }
        };
        buf[at + filled..end].fill(0);
    }
    Ok(())
}

/// Read all of `path` into `buf` (exactly its hashed size), checking that the file is the one
/// that was hashed, unchanged before and after.
fn read_file(path: &Path, stamp: &FileStamp, buf: &mut [u8]) -> Result<(), WriteError> {
    let rerr = |source| WriteError::Io {
        path: path.display().to_string(),
        source,
    };
    let changed = || WriteError::Changed(path.display().to_string());
    let src = open_source(path).map_err(rerr)?;
    if FileStamp::of(&src.metadata().map_err(rerr)?) != *stamp {
        return Err(changed());
    }
    let mut done = 0;
    while done < buf.len() {
        match src.read_at(&mut buf[done..], done as u64) {
            Ok(0) => return Err(changed()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(rerr(e)),
        }
    }
    if FileStamp::of(&src.metadata().map_err(rerr)?) != *stamp {
        return Err(changed());
    }
    Ok(())
}

/// Copy exactly `size` bytes of `path` to `out` at `offset` (kernel-side copy where the
/// filesystems allow it) and make sure the file is the one that was hashed, unchanged before
/// and after.
fn copy_file(
    path: &Path,
    stamp: &FileStamp,
    size: u64,
    out: &File,
    offset: u64,
    cancel: &AtomicBool,
) -> Result<(), WriteError> {
    let shown = || path.display().to_string();
    let rerr = |source| WriteError::Io {
        path: path.display().to_string(),
        source,
    };
    let src = open_source(path).map_err(rerr)?;
    if FileStamp::of(&src.metadata().map_err(rerr)?) != *stamp {
        return Err(WriteError::Changed(shown()));
    }
    let mut off_in: i64 = 0;
    let mut off_out = offset as i64;
    let mut fallback = false;
    while (off_in as u64) < size {
        if cancel.load(Ordering::Relaxed) {
            return Err(WriteError::Cancelled);
        }
        let want = (size - off_in as u64).min(64 << 20) as usize;
        let n = if fallback {
            copy_by_buffer(&src, off_in as u64, out, off_out as u64, want).map_err(rerr)?
        } else {
            match nix::fcntl::copy_file_range(
                &src,
                Some(&mut off_in),
                out,
                Some(&mut off_out),
                want,
            ) {
                Ok(n) => {
                    // copy_file_range advanced both offsets itself.
                    if n == 0 {
                        return Err(WriteError::Changed(shown()));
                    }
                    continue;
                }
                Err(
                    nix::errno::Errno::EXDEV
                    | nix::errno::Errno::ENOSYS
                    | nix::errno::Errno::EINVAL
                    | nix::errno::Errno::EOPNOTSUPP,
                ) => {
                    fallback = true;
                    continue;
                }
                Err(e) => return Err(rerr(io::Error::from(e))),
            }
        };
        if n == 0 {
            return Err(WriteError::Changed(shown()));
        }
        off_in += n as i64;
        off_out += n as i64;
    }
    if FileStamp::of(&src.metadata().map_err(rerr)?) != *stamp {
        return Err(WriteError::Changed(shown()));
    }
    Ok(())
}

fn copy_by_buffer(src: &File, from: u64, out: &File, to: u64, len: usize) -> io::Result<usize> {
    let mut buf = vec![0u8; len.min(1 << 20)];
    let n = src.read_at(&mut buf, from)?;
    out.write_all_at(&buf[..n], to)?;
    Ok(n)
}

/// Open a source file for reading without following a final symlink and without blocking
/// (a FIFO swapped in after the walk must not hang mkfs; the stamp check then refuses it).
pub fn open_source(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
}
