//! Reading blobfs images: validation at open, and verified reads.
//!
//! An image is untrusted input. Opening it checks, in this order: the fixed header and its
//! checksum, the file length, the signature (when keys are given), the rollback epoch, the
//! index hash, then every index entry's bounds. Only then is anything variable-length used.
//! Reads go through [`Image::read_verified`], which checks every 4 KiB block against the blob's
//! Merkle tree up to its digest before returning a byte. Nothing is memory-mapped: an image
//! truncated or rewritten while in use yields I/O errors, not SIGBUS and not wrong data.

use crate::format::{
    self, ENTRY_SIZE, Entry, EntryError, HEADER_SIZE, Header, HeaderError, SignatureBlockError,
    SignatureSlot,
};
use crate::merkle::{BLOCK_SIZE, Hash};
use crate::sign;
pub use crate::verify::ReadError;
use crate::verify::{self, Blob, BlobBytes, TreeCache};
use ed25519_dalek::VerifyingKey;
use sha2::{Digest as _, Sha256};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest index this implementation loads (16.7 million blobs). A header that claims more is
/// refused before anything is allocated for it.
pub const MAX_INDEX_BYTES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {context}: {source}")]
    Io {
        path: String,
        context: &'static str,
        source: io::Error,
    },
    #[error("{0}: not a regular file or block device")]
    NotAFile(String),
    #[error(
        "{path}: image is truncated: header says {expected} bytes, file has {actual}{}",
        thin_hint(*actual, *data_offset)
    )]
    Truncated {
        data_offset: u64,
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: {source}")]
    Header { path: String, source: HeaderError },
    #[error("{path}: {source}")]
    SignatureBlock {
        path: String,
        source: SignatureBlockError,
    },
    #[error("{path}: image is not signed, but a signature by one of the given keys is required")]
    Unsigned { path: String },
    #[error(
        "{path}: no valid signature by any of the given keys (image signed by key ids: {present})"
    )]
    BadSignature { path: String, present: String },
    #[error("{path}: image epoch {epoch} is older than the required minimum {min} (rollback?)")]
    Rollback { path: String, epoch: u64, min: u64 },
    #[error("{path}: index of {size} bytes exceeds the supported maximum of {MAX_INDEX_BYTES}")]
    IndexTooLarge { path: String, size: u64 },
    #[error("{path}: index hash mismatch: the blob index is corrupted")]
    IndexHash { path: String },
    #[error("{path}: {source}")]
    Entry { path: String, source: EntryError },
}

fn thin_hint(actual: u64, data_offset: u64) -> &'static str {
    if actual == data_offset {
        " (a thin image: its blob data must come from a remote, --remote URL)"
    } else {
        ""
    }
}

/// Blob data kept outside the image, for thin images (see [`crate::remote`]). Untrusted: what
/// it returns is verified like data read from the image.
pub trait BlobSource: Send + Sync {
    /// Fill `buf` with the bytes of blob `digest` (of `size` bytes) from `offset`; bytes past
    /// the end of the blob read as zero.
    fn read(&self, digest: &Hash, size: u64, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// What must hold for an image to be accepted.
#[derive(Default, Clone)]
pub struct OpenOptions {
    /// If non-empty, the image must carry a valid signature by one of these keys.
    pub keys: Vec<VerifyingKey>,
    /// Refuse images whose epoch is lower.
    pub min_epoch: u64,
    /// Byte budget of the verified tree-block cache (default 64 MiB).
    pub tree_cache_bytes: Option<usize>,
    /// Where blob data comes from when the image is thin (header, signatures, index and trees
    /// only: the image cut at `data_offset`). With a source, a thin image is accepted and
    /// every blob's data is read from it; without, a thin image is refused as truncated.
    pub data_source: Option<Arc<dyn BlobSource>>,
}

impl std::fmt::Debug for OpenOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenOptions")
            .field("keys", &self.keys.len())
            .field("min_epoch", &self.min_epoch)
            .field("data_source", &self.data_source.is_some())
            .finish()
    }
}

/// An open, validated image.
pub struct Image {
    path: PathBuf,
    file: File,
    header: Header,
    encoded_header: [u8; HEADER_SIZE],
    signatures: Vec<SignatureSlot>,
    signed_by: Option<Hash>,
    entries: Vec<Entry>,
    cache: TreeCache,
    /// Set for a thin image: all blob data comes from here.
    remote_data: Option<Arc<dyn BlobSource>>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("path", &self.path)
            .field("blobs", &self.entries.len())
            .finish()
    }
}

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    file.read_exact_at(buf, offset)
}

impl Image {
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Image, ImageError> {
        let p = || path.display().to_string();
        let io_err = |context| {
            move |source| ImageError::Io {
                path: path.display().to_string(),
                context,
                source,
            }
        };
        let file = File::open(path).map_err(io_err("cannot open"))?;
        let meta = file.metadata().map_err(io_err("cannot stat"))?;
        let ft = meta.file_type();
        let actual = if ft.is_file() {
            meta.len()
        } else if ft.is_block_device() {
            block_device_size(&file).map_err(io_err("cannot size block device"))?
        } else {
            return Err(ImageError::NotAFile(p()));
        };

        let mut encoded_header = [0u8; HEADER_SIZE];
        if actual < HEADER_SIZE as u64 {
            return Err(ImageError::Truncated {
                data_offset: u64::MAX,
                path: p(),
                expected: HEADER_SIZE as u64,
                actual,
            });
        }
        read_exact_at(&file, &mut encoded_header, 0).map_err(io_err("cannot read header"))?;
        let header = Header::decode(&encoded_header)
            .map_err(|source| ImageError::Header { path: p(), source })?;
        // A thin image ends where the data would start; it is read with a data source only.
        let thin = actual < header.image_size;
        if thin && (actual < header.data_offset || opts.data_source.is_none()) {
            return Err(ImageError::Truncated {
                data_offset: header.data_offset,
                path: p(),
                expected: header.image_size,
                actual,
            });
        }

        let mut sig_block = vec![0u8; BLOCK_SIZE];
        read_exact_at(&file, &mut sig_block, format::SIGNATURE_BLOCK_OFFSET)
            .map_err(io_err("cannot read signature block"))?;
        let signatures = format::decode_signature_block(&sig_block)
            .map_err(|source| ImageError::SignatureBlock { path: p(), source })?;
        let signed_by = if opts.keys.is_empty() {
            None
        } else if signatures.is_empty() {
            return Err(ImageError::Unsigned { path: p() });
        } else {
            match sign::find_valid_signature(&opts.keys, &signatures, &encoded_header) {
                Some(id) => Some(id),
                None => {
                    let present = signatures
                        .iter()
                        .map(|s| hex::encode(&s.key_id[..8]))
                        .collect::<Vec<_>>()
                        .join(", ");
                    return Err(ImageError::BadSignature { path: p(), present });
                }
            }
        };
        if header.epoch < opts.min_epoch {
            return Err(ImageError::Rollback {
                path: p(),
                epoch: header.epoch,
                min: opts.min_epoch,
            });
        }

        if header.index_size > MAX_INDEX_BYTES {
            return Err(ImageError::IndexTooLarge {
                path: p(),
                size: header.index_size,
            });
        }
        let mut index = vec![0u8; header.index_size as usize];
        read_exact_at(&file, &mut index, header.index_offset)
            .map_err(io_err("cannot read index"))?;
        if <[u8; 32]>::from(Sha256::digest(&index)) != header.index_sha256 {
            return Err(ImageError::IndexHash { path: p() });
        }
        let mut entries = Vec::with_capacity(header.blob_count as usize);
        for (i, raw) in index.chunks_exact(ENTRY_SIZE).enumerate() {
            let e = Entry::decode(raw);
            let i = i as u64;
            if let Some(prev) = entries.last().map(|p: &Entry| p.digest)
                && prev >= e.digest
            {
                return Err(ImageError::Entry {
                    path: p(),
                    source: EntryError::Unsorted(i),
                });
            }
            e.check(i, raw, &header)
                .map_err(|source| ImageError::Entry { path: p(), source })?;
            entries.push(e);
        }

        Ok(Image {
            path: path.to_owned(),
            file,
            header,
            encoded_header,
            signatures,
            signed_by,
            entries,
            cache: TreeCache::new(opts.tree_cache_bytes.unwrap_or(64 << 20)),
            remote_data: if thin { opts.data_source.clone() } else { None },
        })
    }

    /// Whether the image is thin (its blob data comes from the data source).
    pub fn is_thin(&self) -> bool {
        self.remote_data.is_some()
    }

    /// The underlying file (for copying regions of it).
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn encoded_header(&self) -> &[u8; HEADER_SIZE] {
        &self.encoded_header
    }

    pub fn signatures(&self) -> &[SignatureSlot] {
        &self.signatures
    }

    /// Key id of the required key that signed the image, if keys were required.
    pub fn signed_by(&self) -> Option<Hash> {
        self.signed_by
    }

    /// All blobs, sorted by digest.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Position of the blob named `digest`, by binary search.
    pub fn find(&self, digest: &Hash) -> Option<usize> {
        self.entries.binary_search_by(|e| e.digest.cmp(digest)).ok()
    }

    /// Read up to `len` bytes of blob `idx` at `offset`, every block verified.
    pub fn read_verified(&self, idx: usize, offset: u64, len: usize) -> Result<Vec<u8>, ReadError> {
        verify::read_verified(&self.blob(idx), &self.cache, offset, len)
    }

    /// Check every block of blob `idx`; returns the first problem.
    pub fn verify_blob(&self, idx: usize) -> Result<(), ReadError> {
        verify::verify_all(&self.blob(idx), &self.cache)
    }

    fn blob(&self, idx: usize) -> Blob<ImageBlob<'_>> {
        let e = &self.entries[idx];
        Blob {
            key: idx as u64,
            digest: e.digest,
            size: e.size,
            bytes: ImageBlob {
                file: &self.file,
                entry: e,
                remote: self.remote_data.as_deref(),
            },
        }
    }
}

/// Where one blob's bytes are inside the image file.
struct ImageBlob<'a> {
    file: &'a File,
    entry: &'a Entry,
    remote: Option<&'a dyn BlobSource>,
}

impl BlobBytes for ImageBlob<'_> {
    fn read_data(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match self.remote {
            Some(r) => r.read(&self.entry.digest, self.entry.size, offset, buf),
            None => self
                .file
                .read_exact_at(buf, self.entry.data_offset + offset),
        }
    }

    fn read_tree(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file
            .read_exact_at(buf, self.entry.tree_offset + offset)
    }
}

fn block_device_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::End(0))
}
