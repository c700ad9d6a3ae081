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
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

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
    let mut out = tmp.as_file();
    let w = io_err(tmp.path());

    let mut block0 = vec![0u8; BLOCK_SIZE];
    block0[..HEADER_SIZE].copy_from_slice(&encoded);
    out.write_all(&block0).map_err(&w)?;
    out.write_all(&format::encode_signature_block(&slots))
        .map_err(&w)?;
    write_padded(&mut out, &index).map_err(&w)?;
    for b in &blobs {
        out.write_all(&b.tree.tree).map_err(&w)?;
    }
    debug_assert_eq!(out.stream_position().ok(), Some(data_offset));
    let mut copied = 0u64;
    for (b, e) in blobs.iter().zip(&entries) {
        if cancel.load(Ordering::Relaxed) {
            return Err(WriteError::Cancelled);
        }
        if e.size == 0 {
            continue;
        }
        out.seek(SeekFrom::Start(e.data_offset)).map_err(&w)?;
        match &b.content {
            Content::Memory(data) => write_padded(&mut out, data).map_err(&w)?,
            Content::File { path, stamp } => {
                copy_file(path, stamp, e.size, &mut out, cancel)?;
                pad_to_block(&mut out, e.size).map_err(&w)?;
            }
        }
        copied += e.size;
        progress(copied);
    }
    out.sync_all().map_err(&w)?;
    tmp.persist(target).map_err(|e| WriteError::Io {
        path: target.display().to_string(),
        source: e.error,
    })?;
    // Make the rename itself durable.
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(&dir))?;
    Ok(Written {
        blobs: count,
        image_size: header.image_size,
        data_bytes: header.data_size,
    })
}

fn write_padded(out: &mut impl Write, data: &[u8]) -> io::Result<()> {
    out.write_all(data)?;
    let pad = data.len().next_multiple_of(BLOCK_SIZE) - data.len();
    out.write_all(&vec![0u8; pad])
}

fn pad_to_block(out: &mut impl Write, size: u64) -> io::Result<()> {
    let pad = size.next_multiple_of(BLOCK_SIZE as u64) - size;
    out.write_all(&vec![0u8; pad as usize])
}

/// Copy exactly `size` bytes of `path` (kernel-side copy where possible) and make sure the
/// file is the one that was hashed, unchanged before and after.
fn copy_file(
    path: &Path,
    stamp: &FileStamp,
    size: u64,
    out: &mut &File,
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
    let mut remaining = size;
    let mut reader = &src;
    while remaining > 0 {
        if cancel.load(Ordering::Relaxed) {
            return Err(WriteError::Cancelled);
        }
        let step = remaining.min(64 << 20);
        let n =
            io::copy(&mut Read::take(&mut reader, step), out).map_err(|source| WriteError::Io {
                path: shown(),
                source,
            })?;
        if n == 0 {
            return Err(WriteError::Changed(shown()));
        }
        remaining -= n;
    }
    if FileStamp::of(&src.metadata().map_err(rerr)?) != *stamp {
        return Err(WriteError::Changed(shown()));
    }
    Ok(())
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
