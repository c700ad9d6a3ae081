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
use sha2::{Digest as _, Sha256};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
    mut blobs: Vec<PreparedBlob>,
    settings: &ImageSettings<'_>,
    progress: &(dyn Fn(u64) + Sync),
    cancel: &AtomicBool,
) -> Result<Written, WriteError> {
    if settings.keys.len() > MAX_SIGNATURES {
        return Err(WriteError::TooManyKeys);
    }
    blobs.sort_by_key(|b| b.digest());
    blobs.dedup_by_key(|b| b.digest());

    let bs = BLOCK_SIZE as u64;
    let count = blobs.len() as u64;
    let index_size = count * ENTRY_SIZE as u64;
    let tree_offset = INDEX_OFFSET + index_size.next_multiple_of(bs);
    let mut entries = Vec::with_capacity(blobs.len());
    let mut next_tree = tree_offset;
    for b in &blobs {
        let len = b.tree.tree.len() as u64;
        entries.push(Entry {
            digest: b.digest(),
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
    for (b, e) in blobs.iter().zip(&entries) {
        if !b.tree.tree.is_empty() {
            out.write_all_at(&b.tree.tree, e.tree_offset).map_err(&w)?;
        }
    }
    let copied = AtomicU64::new(0);
    // One writer: every write to the image takes its inode lock, so parallel copies only spun
    // on that lock (15% of mkfs's CPU time on /usr/share before this was sequential).
    blobs
        .iter()
        .zip(entries.iter())
        .filter(|(_, e)| e.size > 0)
        .try_for_each(|(b, e)| -> Result<(), WriteError> {
            if cancel.load(Ordering::Relaxed) {
                return Err(WriteError::Cancelled);
            }
            match &b.content {
                Content::Memory(data) => out.write_all_at(data, e.data_offset).map_err(&w)?,
                Content::File { path, stamp } => {
                    copy_file(path, stamp, e.size, out, e.data_offset, cancel)?
                }
            }
            progress(copied.fetch_add(e.size, Ordering::Relaxed) + e.size);
            Ok(())
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
