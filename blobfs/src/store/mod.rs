//! A writable blob store: each blob written exactly once, verified before it becomes visible,
//! indexed in RocksDB.
//!
//! Layout of a store directory:
//!
//! ```text
//! DIR/blobfs-store        marker with the store format version
//! DIR/index/              RocksDB: digest (32 bytes) -> Record; column family `trees`:
//!                         digest + tree block number (8 bytes, big-endian) -> 4096-byte block
//! DIR/objects/xx/REST     blob data, exactly `size` bytes (xx = first digest byte in hex)
//! DIR/staging/            blobs being added by `put`; anything here after a crash is garbage
//! ```
//!
//! A blob exists when, and only when, the index has its record. Writes through the mount go
//! straight to the blob's final path (the name is known at create); `put` hashes in staging and
//! renames. Durability order when sealing: the data file is fsynced and, where it was renamed,
//! its directory; then the record and the Merkle tree are written in one synced RocksDB batch.
//! So after a crash at any point, every blob the index names is complete and verified; data
//! files without a record are reclaimed by `gc` (and rewritten by the next create of that
//! name). Keeping trees in the index rather than in files of their own saves two fsyncs per
//! blob, which were most of the cost of small writes.

pub mod fuse;
mod record;

pub use record::Record;

use crate::merkle::{BLOCK_SIZE, Hash, LeafHasher, MerkleTree, TreeGeometry, hash_block};
use crate::verify::{self, Blob, BlobBytes, ReadError, TreeCache};
use crate::writer::{self, Content, FileStamp, ImageSettings, PreparedBlob, Written};
use ed25519_dalek::SigningKey;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const MARKER: &str = "blobfs-store";
const MARKER_TEXT: &str = "blobfs store format 2\n";
/// Stores of format 1 kept Merkle trees in files under `trees/`.
const MARKER_TEXT_V1: &str = "blobfs store format 1\n";
/// Column family holding the stored Merkle trees, one 4096-byte block per key.
const TREES_CF: &str = "trees";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{0}: not a blobfs store (run `blobfs store init`)")]
    NotAStore(String),
    #[error(
        "{0}: store of format 1, which this version cannot open (export it with the blobfs \
         that made it and put the blobs into a new store)"
    )]
    OldFormat(String),
    #[error("{0}: already a blobfs store or not empty")]
    Exists(String),
    #[error("index: {0}")]
    Index(String),
    #[error("blob {0}: index record is corrupted: {1}")]
    BadRecord(String, String),
    #[error("blob {0}: content does not match its name")]
    Mismatch(String),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Write(#[from] writer::WriteError),
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub struct Store {
    root: PathBuf,
    db: rocksdb::DB,
    cache: TreeCache,
    staging_seq: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("root", &self.root).finish()
    }
}

/// Outcome of adding a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    New(Hash),
    AlreadyPresent(Hash),
}

impl Store {
    /// Create an empty store in `dir` (created if missing; must be empty otherwise).
    pub fn init(dir: &Path) -> Result<(), StoreError> {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        if fs::read_dir(dir).map_err(io_at(dir))?.next().is_some() {
            return Err(StoreError::Exists(dir.display().to_string()));
        }
        for sub in ["objects", "staging"] {
            fs::create_dir(dir.join(sub)).map_err(io_at(dir))?;
        }
        drop(open_index(dir, true)?);
        let marker = dir.join(MARKER);
        fs::write(&marker, MARKER_TEXT).map_err(io_at(&marker))?;
        sync_dir(dir)
    }

    /// Open a store. Leftovers of interrupted writes are removed.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        match fs::read_to_string(dir.join(MARKER)) {
            Ok(t) if t == MARKER_TEXT => {}
            Ok(t) if t == MARKER_TEXT_V1 => {
                return Err(StoreError::OldFormat(dir.display().to_string()));
            }
            _ => return Err(StoreError::NotAStore(dir.display().to_string())),
        }
        let db = open_index(dir, false)?;
        let store = Store {
            root: dir.to_owned(),
            db,
            cache: TreeCache::new(64 << 20),
            staging_seq: AtomicU64::new(0),
        };
        store.clear_staging()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn clear_staging(&self) -> Result<u64, StoreError> {
        let staging = self.root.join("staging");
        let mut removed = 0;
        for e in fs::read_dir(&staging).map_err(io_at(&staging))? {
            let e = e.map_err(io_at(&staging))?;
            removed += e.metadata().map(|m| m.len()).unwrap_or(0);
            fs::remove_file(e.path()).map_err(io_at(&e.path()))?;
        }
        Ok(removed)
    }

    pub fn data_path(&self, digest: &Hash) -> PathBuf {
        let h = hex::encode(digest);
        self.root.join("objects").join(&h[..2]).join(&h[2..])
    }

    fn trees(&self) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(TREES_CF)
            .expect("the index is always opened with its trees column family")
    }

    /// One block of a sealed blob's stored tree, as stored: the reader verifies it.
    fn tree_block(&self, digest: &Hash, block: u64) -> io::Result<Vec<u8>> {
        match self.db.get_cf(self.trees(), tree_key(digest, block)) {
            Ok(Some(v)) if v.len() == BLOCK_SIZE => Ok(v),
            Ok(Some(v)) => Err(io::Error::other(format!(
                "tree block {block} has {} bytes in the index",
                v.len()
            ))),
            Ok(None) => Err(io::Error::other(format!(
                "tree block {block} is missing from the index"
            ))),
            Err(e) => Err(io::Error::other(format!("index: {e}"))),
        }
    }

    /// The file a blob being written through the mount goes to: its final path, created or
    /// truncated (a file there without a record is a leftover of an interrupted write). The
    /// caller guarantees that no record exists for `digest` and that it is the only writer.
    pub fn blob_file(&self, digest: &Hash) -> Result<(File, PathBuf), StoreError> {
        let path = self.data_path(digest);
        if self.get(digest)?.is_some() {
            // Never truncate a sealed blob, whatever the caller believed.
            return Err(io_at(&path)(io::ErrorKind::AlreadyExists.into()));
        }
        create_parent(&path)?;
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_at(&path))?;
        Ok((f, path))
    }

    /// The record of a sealed blob.
    pub fn get(&self, digest: &Hash) -> Result<Option<Record>, StoreError> {
        match self.db.get(digest) {
            Ok(Some(v)) => Record::decode(&v)
                .map(Some)
                .map_err(|e| StoreError::BadRecord(hex::encode(digest), e)),
            Ok(None) => Ok(None),
            Err(e) => Err(StoreError::Index(e.to_string())),
        }
    }

    /// Every sealed blob in digest order. Corrupted records are reported, not skipped.
    pub fn list(&self) -> Result<Vec<(Hash, Record)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator(rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(|e| StoreError::Index(e.to_string()))?;
            let digest: Hash = k.as_ref().try_into().map_err(|_| {
                StoreError::BadRecord(hex::encode(&k), "key is not a 32-byte digest".into())
            })?;
            let rec =
                Record::decode(&v).map_err(|e| StoreError::BadRecord(hex::encode(digest), e))?;
            out.push((digest, rec));
        }
        Ok(out)
    }

    /// A new staging file for a blob being written.
    pub fn staging_file(&self) -> Result<(File, PathBuf), StoreError> {
        let n = self.staging_seq.fetch_add(1, Ordering::Relaxed);
        let path = self
            .root
            .join("staging")
            .join(format!("{}.{n}", std::process::id()));
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_at(&path))?;
        Ok((f, path))
    }

    /// Make a written, already hashed blob permanent (see the module docs for the order).
    /// `path` is a staging file or the blob's final path (`blob_file`). The caller has checked
    /// that `tree.digest()` is the name it wants.
    pub fn seal(&self, file: &File, path: &Path, tree: &MerkleTree) -> Result<Added, StoreError> {
        let digest = tree.digest();
        let data_path = self.data_path(&digest);
        let in_place = path == data_path;
        if self.get(&digest)?.is_some() {
            if !in_place {
                let _ = fs::remove_file(path);
            }
            return Ok(Added::AlreadyPresent(digest));
        }
        file.sync_all().map_err(io_at(path))?;
        create_parent(&data_path)?;
        if !in_place {
            fs::rename(path, &data_path).map_err(io_at(&data_path))?;
        }
        // Makes a rename durable; after an in-place write the fsync above has committed the
        // file's creation already (on journalling filesystems this costs next to nothing),
        // but the name must be durable before the record, whatever the filesystem.
        sync_dir(data_path.parent().expect("has parent"))?;
        let mut batch = rocksdb::WriteBatch::default();
        for (i, block) in tree.tree.chunks(BLOCK_SIZE).enumerate() {
            batch.put_cf(self.trees(), tree_key(&digest, i as u64), block);
        }
        batch.put(digest, Record { size: tree.size }.encode());
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db
            .write_opt(batch, &wo)
            .map_err(|e| StoreError::Index(e.to_string()))?;
        Ok(Added::New(digest))
    }

    /// Copy a file into the store (hashing the copy, so a source changing meanwhile cannot
    /// produce a blob that does not match its name).
    pub fn put_file(&self, path: &Path) -> Result<Added, StoreError> {
        let mut src = writer::open_source(path).map_err(io_at(path))?;
        if !src.metadata().map_err(io_at(path))?.is_file() {
            return Err(StoreError::Io {
                path: path.display().to_string(),
                source: io::Error::other("not a regular file"),
            });
        }
        let (mut staged, staged_path) = self.staging_file()?;
        let result = (|| {
            io::copy(&mut src, &mut staged).map_err(io_at(&staged_path))?;
            let mut hasher = LeafHasher::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut offset = 0;
            loop {
                let n = staged
                    .read_at(&mut buf, offset)
                    .map_err(io_at(&staged_path))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                offset += n as u64;
            }
            self.seal(&staged, &staged_path, &hasher.finish())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&staged_path);
        }
        result
    }

    /// Remove a blob: the record first (so it vanishes atomically), then its files.
    pub fn remove(&self, digest: &Hash) -> Result<bool, StoreError> {
        let Some(rec) = self.get(digest)? else {
            return Ok(false);
        };
        let mut batch = rocksdb::WriteBatch::default();
        batch.delete(digest);
        for block in 0..TreeGeometry::new(rec.size).tree_blocks() {
            batch.delete_cf(self.trees(), tree_key(digest, block));
        }
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db
            .write_opt(batch, &wo)
            .map_err(|e| StoreError::Index(e.to_string()))?;
        let _ = fs::remove_file(self.data_path(digest));
        self.cache.forget(crate::fuse::blob_ino(digest));
        Ok(true)
    }

    /// Verified read of a sealed blob.
    pub fn read_verified(
        &self,
        digest: &Hash,
        size: u64,
        files: &BlobFiles,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, ReadError> {
        verify::read_verified(&self.blob(digest, size, files), &self.cache, offset, len)
    }

    fn blob<'a>(&'a self, digest: &Hash, size: u64, files: &'a BlobFiles) -> Blob<StoredBlob<'a>> {
        Blob {
            key: crate::fuse::blob_ino(digest),
            digest: *digest,
            size,
            bytes: StoredBlob {
                store: self,
                digest: *digest,
                files,
            },
        }
    }

    /// Open the data file of a sealed blob for reading.
    pub fn open_blob(&self, digest: &Hash, size: u64) -> io::Result<BlobFiles> {
        let data = File::open(self.data_path(digest))?;
        Ok(BlobFiles { data, size })
    }

    /// Check every sealed blob completely, and look for files no record names. Returns the
    /// problems found (empty when the store is sound).
    pub fn verify(&self) -> Result<Vec<String>, StoreError> {
        let mut problems = Vec::new();
        let records = self.list()?;
        for (digest, rec) in &records {
            let name = hex::encode(digest);
            match self.open_blob(digest, rec.size) {
                Err(e) => problems.push(format!("blob {name}: cannot open its files: {e}")),
                Ok(files) => {
                    let len = files.data.metadata().map(|m| m.len()).unwrap_or(0);
                    if len != rec.size {
                        problems.push(format!(
                            "blob {name}: data file has {len} bytes, index says {}",
                            rec.size
                        ));
                    } else if let Err(e) =
                        verify::verify_all(&self.blob(digest, rec.size, &files), &self.cache)
                    {
                        problems.push(e.to_string());
                    }
                }
            }
        }
        for orphan in self.orphans(&records)? {
            problems.push(format!(
                "{}: not in the index (reclaim with `blobfs store gc`)",
                orphan.display()
            ));
        }
        Ok(problems)
    }

    fn orphans(&self, records: &[(Hash, Record)]) -> Result<Vec<PathBuf>, StoreError> {
        let known: std::collections::HashSet<String> =
            records.iter().map(|(d, _)| hex::encode(d)).collect();
        let mut out = Vec::new();
        let top = self.root.join("objects");
        for prefix in fs::read_dir(&top).map_err(io_at(&top))? {
            let prefix = prefix.map_err(io_at(&top))?.path();
            let Ok(entries) = fs::read_dir(&prefix) else {
                out.push(prefix);
                continue;
            };
            let p = prefix
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            for e in entries {
                let e = e.map_err(io_at(&prefix))?;
                let name = format!("{p}{}", e.file_name().to_string_lossy());
                if !known.contains(&name) {
                    out.push(e.path());
                }
            }
        }
        let staging = self.root.join("staging");
        for e in fs::read_dir(&staging).map_err(io_at(&staging))? {
            out.push(e.map_err(io_at(&staging))?.path());
        }
        Ok(out)
    }

    /// Remove every file that no record names (interrupted writes, crashed seals). Returns
    /// the number of files and bytes reclaimed.
    pub fn gc(&self) -> Result<(u64, u64), StoreError> {
        let records = self.list()?;
        let (mut files, mut bytes) = (0, 0);
        for orphan in self.orphans(&records)? {
            bytes += fs::symlink_metadata(&orphan).map(|m| m.len()).unwrap_or(0);
            if orphan.is_dir() {
                fs::remove_dir_all(&orphan).map_err(io_at(&orphan))?;
            } else {
                fs::remove_file(&orphan).map_err(io_at(&orphan))?;
            }
            files += 1;
        }
        Ok((files, bytes))
    }

    /// Write an image of every sealed blob; byte-identical to mkfs.blobfs over the same
    /// contents (the same writer lays it out).
    pub fn export(
        &self,
        image: &Path,
        epoch: u64,
        keys: &[SigningKey],
        cancel: &AtomicBool,
    ) -> Result<Written, StoreError> {
        let mut blobs = Vec::new();
        for (digest, rec) in self.list()? {
            let files = self
                .open_blob(&digest, rec.size)
                .map_err(io_at(&self.data_path(&digest)))?;
            let mut tree = Vec::new();
            for block in 0..TreeGeometry::new(rec.size).tree_blocks() {
                tree.extend_from_slice(
                    &self
                        .tree_block(&digest, block)
                        .map_err(io_at(&self.root.join("index")))?,
                );
            }
            let root = if !tree.is_empty() {
                hash_block(&tree[..BLOCK_SIZE.min(tree.len())])
            } else if rec.size > 0 {
                let mut block = vec![0u8; BLOCK_SIZE];
                self.blob(&digest, rec.size, &files)
                    .bytes
                    .read_data(0, &mut block)
                    .map_err(io_at(&self.data_path(&digest)))?;
                hash_block(&block)
            } else {
                [0; 32]
            };
            let merkle = MerkleTree {
                size: rec.size,
                root,
                tree,
            };
            if merkle.digest() != digest
                || merkle.tree.len() as u64 != TreeGeometry::new(rec.size).tree_bytes()
            {
                return Err(StoreError::Mismatch(hex::encode(digest)));
            }
            let path = self.data_path(&digest);
            let stamp = FileStamp::of(&files.data.metadata().map_err(io_at(&path))?);
            blobs.push(PreparedBlob {
                tree: merkle,
                content: Content::File { path, stamp },
            });
        }
        // The writer copies data as stored; a corrupted data file would make a bad image, so
        // check each blob completely first.
        for b in &blobs {
            let Content::File { path, .. } = &b.content else {
                continue;
            };
            let digest = b.digest();
            let files = self.open_blob(&digest, b.tree.size).map_err(io_at(path))?;
            verify::verify_all(&self.blob(&digest, b.tree.size, &files), &self.cache)?;
        }
        Ok(writer::write_image(
            image,
            blobs,
            &ImageSettings {
                epoch,
                keys,
                fsync: true,
            },
            &|_| {},
            cancel,
        )?)
    }
}

/// The open data file of one sealed blob.
pub struct BlobFiles {
    data: File,
    size: u64,
}

impl BlobFiles {
    /// The blob's bytes at `offset`, zero past its end (a short file is an error).
    pub fn read_padded(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let stored = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        self.data.read_exact_at(&mut buf[..stored], offset)?;
        buf[stored..].fill(0);
        Ok(())
    }
}

/// A sealed blob's bytes: data from its file, tree blocks from the index.
pub struct StoredBlob<'a> {
    store: &'a Store,
    digest: Hash,
    files: &'a BlobFiles,
}

impl BlobBytes for StoredBlob<'_> {
    /// The data file holds exactly `size` bytes; the zero padding of the last block is
    /// implied. A shorter file is an error, never silently padded.
    fn read_data(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.files.read_padded(offset, buf)
    }

    fn read_tree(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let bs = BLOCK_SIZE as u64;
        if !offset.is_multiple_of(bs) || !buf.len().is_multiple_of(BLOCK_SIZE) {
            return Err(io::Error::other("tree reads are whole blocks"));
        }
        for (i, dst) in buf.chunks_mut(BLOCK_SIZE).enumerate() {
            dst.copy_from_slice(
                &self
                    .store
                    .tree_block(&self.digest, offset / bs + i as u64)?,
            );
        }
        Ok(())
    }
}

/// Key of one stored tree block: the digest, then the block number big-endian (so a blob's
/// blocks are adjacent and in order).
fn tree_key(digest: &Hash, block: u64) -> [u8; 40] {
    let mut key = [0u8; 40];
    key[..32].copy_from_slice(digest);
    key[32..].copy_from_slice(&block.to_be_bytes());
    key
}

/// Open (or with `create`, create) the RocksDB index with its column families.
fn open_index(dir: &Path, create: bool) -> Result<rocksdb::DB, StoreError> {
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(create);
    opts.create_missing_column_families(create);
    rocksdb::DB::open_cf(&opts, dir.join("index"), [TREES_CF]).map_err(|e| {
        StoreError::Index(format!(
            "{e} (is the store mounted or in use by another process?)"
        ))
    })
}

fn create_parent(path: &Path) -> Result<(), StoreError> {
    let parent = path.parent().expect("store paths have parents");
    if !parent.exists() {
        fs::create_dir_all(parent).map_err(io_at(parent))?;
        sync_dir(parent.parent().expect("has parent"))?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_rejects_garbage() {
        let r = Record { size: 12345 };
        assert_eq!(Record::decode(&r.encode()), Ok(r));
        assert!(Record::decode(&[]).is_err());
        let mut b = r.encode();
        b[1] = 9;
        assert!(Record::decode(&b).is_err());
        assert!(Record::decode(&[0; 17]).is_err());
    }

    #[test]
    fn put_verify_remove_gc_export() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("store");
        Store::init(&dir).unwrap();
        assert!(Store::init(&dir).is_err(), "init twice must fail");
        let store = Store::open(&dir).unwrap();
        let src = t.path().join("f");
        fs::write(&src, vec![7u8; 300_000]).unwrap();
        let Added::New(d) = store.put_file(&src).unwrap() else {
            panic!("first put must add")
        };
        assert_eq!(store.put_file(&src).unwrap(), Added::AlreadyPresent(d));
        // The mount's writer path never truncates a sealed blob.
        let err = store.blob_file(&d).unwrap_err();
        assert!(
            matches!(&err, StoreError::Io { source, .. } if source.kind() == io::ErrorKind::AlreadyExists),
            "{err}"
        );
        assert_eq!(fs::metadata(store.data_path(&d)).unwrap().len(), 300_000);
        assert!(store.verify().unwrap().is_empty());
        fs::write(dir.join("staging/leftover"), b"x").unwrap();
        assert_eq!(store.verify().unwrap().len(), 1);
        assert_eq!(store.gc().unwrap().0, 1);
        let img = t.path().join("img");
        store.export(&img, 0, &[], &AtomicBool::new(false)).unwrap();
        assert_eq!(store.tree_block(&d, 0).unwrap().len(), BLOCK_SIZE);
        assert!(store.remove(&d).unwrap());
        assert!(!store.data_path(&d).exists());
        assert!(store.list().unwrap().is_empty());
        // The tree went with the record.
        assert!(store.tree_block(&d, 0).is_err());
        drop(store);
        // A store of the first format (trees in files) is refused with a clear message.
        fs::write(dir.join(MARKER), MARKER_TEXT_V1).unwrap();
        let err = Store::open(&dir).unwrap_err();
        assert!(matches!(err, StoreError::OldFormat(_)), "{err}");
    }
}
