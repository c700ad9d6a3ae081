//! A writable blob store: each blob written exactly once, verified before it becomes visible,
//! indexed in RocksDB.
//!
//! Layout of a store directory:
//!
//! ```text
//! DIR/blobfs-store        marker with the store format version
//! DIR/index/              RocksDB: digest (32 bytes) -> Record
//! DIR/objects/xx/REST     blob data, exactly `size` bytes (xx = first digest byte in hex)
//! DIR/trees/xx/REST       stored Merkle tree, root level first (absent for blobs <= 4 KiB)
//! DIR/staging/            blobs being written; anything here after a crash is garbage
//! ```
//!
//! Durability order when sealing a blob: data and tree are fsynced in staging, renamed into
//! place, the directories fsynced, and only then is the index record written with a synced
//! RocksDB write. So after a crash at any point, every blob the index names is complete and
//! verified; files without a record are reclaimed by `gc`.

pub mod fuse;
mod record;

pub use record::Record;

use crate::merkle::{BLOCK_SIZE, Hash, LeafHasher, MerkleTree, TreeGeometry, hash_block};
use crate::verify::{self, Blob, BlobBytes, ReadError, TreeCache};
use crate::writer::{self, Content, FileStamp, ImageSettings, PreparedBlob, Written};
use ed25519_dalek::SigningKey;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const MARKER: &str = "blobfs-store";
const MARKER_TEXT: &str = "blobfs store format 1\n";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{0}: not a blobfs store (run `blobfs store init`)")]
    NotAStore(String),
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
        for sub in ["objects", "trees", "staging"] {
            fs::create_dir(dir.join(sub)).map_err(io_at(dir))?;
        }
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        drop(
            rocksdb::DB::open(&opts, dir.join("index"))
                .map_err(|e| StoreError::Index(e.to_string()))?,
        );
        let marker = dir.join(MARKER);
        fs::write(&marker, MARKER_TEXT).map_err(io_at(&marker))?;
        sync_dir(dir)
    }

    /// Open a store. Leftovers of interrupted writes are removed.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        match fs::read_to_string(dir.join(MARKER)) {
            Ok(t) if t == MARKER_TEXT => {}
            _ => return Err(StoreError::NotAStore(dir.display().to_string())),
        }
        let opts = rocksdb::Options::default();
        let db = rocksdb::DB::open(&opts, dir.join("index")).map_err(|e| {
            StoreError::Index(format!(
                "{e} (is the store mounted or in use by another process?)"
            ))
        })?;
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

    pub fn tree_path(&self, digest: &Hash) -> PathBuf {
        let h = hex::encode(digest);
        self.root.join("trees").join(&h[..2]).join(&h[2..])
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

    /// Make a staged, already hashed blob permanent (see the module docs for the order).
    /// The caller has checked that `tree.digest()` is the name it wants.
    pub fn seal(
        &self,
        staged: &File,
        staged_path: &Path,
        tree: &MerkleTree,
    ) -> Result<Added, StoreError> {
        let digest = tree.digest();
        if self.get(&digest)?.is_some() {
            let _ = fs::remove_file(staged_path);
            return Ok(Added::AlreadyPresent(digest));
        }
        staged.sync_all().map_err(io_at(staged_path))?;
        let data_path = self.data_path(&digest);
        let tree_path = self.tree_path(&digest);
        if !tree.tree.is_empty() {
            let tmp = staged_path.with_extension("tree");
            let mut f = File::create(&tmp).map_err(io_at(&tmp))?;
            f.write_all(&tree.tree)
                .and_then(|()| f.sync_all())
                .map_err(io_at(&tmp))?;
            create_parent(&tree_path)?;
            fs::rename(&tmp, &tree_path).map_err(io_at(&tree_path))?;
            sync_dir(tree_path.parent().expect("has parent"))?;
        }
        create_parent(&data_path)?;
        fs::rename(staged_path, &data_path).map_err(io_at(&data_path))?;
        sync_dir(data_path.parent().expect("has parent"))?;
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db
            .put_opt(digest, Record { size: tree.size }.encode(), &wo)
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
        if self.get(digest)?.is_none() {
            return Ok(false);
        }
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db
            .delete_opt(digest, &wo)
            .map_err(|e| StoreError::Index(e.to_string()))?;
        let _ = fs::remove_file(self.data_path(digest));
        let _ = fs::remove_file(self.tree_path(digest));
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

    fn blob<'a>(&self, digest: &Hash, size: u64, files: &'a BlobFiles) -> Blob<&'a BlobFiles> {
        Blob {
            key: crate::fuse::blob_ino(digest),
            digest: *digest,
            size,
            bytes: files,
        }
    }

    /// Open the files of a sealed blob for reading.
    pub fn open_blob(&self, digest: &Hash, size: u64) -> io::Result<BlobFiles> {
        let data = File::open(self.data_path(digest))?;
        let tree = if TreeGeometry::new(size).levels() > 0 {
            Some(File::open(self.tree_path(digest))?)
        } else {
            None
        };
        Ok(BlobFiles { data, tree, size })
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
        for kind in ["objects", "trees"] {
            let top = self.root.join(kind);
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
            if let Some(t) = &files.tree {
                let mut t = t;
                t.read_to_end(&mut tree)
                    .map_err(io_at(&self.tree_path(&digest)))?;
            }
            let root = if !tree.is_empty() {
                hash_block(&tree[..BLOCK_SIZE.min(tree.len())])
            } else if rec.size > 0 {
                let mut block = vec![0u8; BLOCK_SIZE];
                (&files)
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

/// Open files of one sealed blob.
pub struct BlobFiles {
    data: File,
    tree: Option<File>,
    size: u64,
}

impl BlobBytes for &BlobFiles {
    /// The data file holds exactly `size` bytes; the zero padding of the last block is
    /// implied. A shorter file is an error, never silently padded.
    fn read_data(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let stored = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        self.data.read_exact_at(&mut buf[..stored], offset)?;
        buf[stored..].fill(0);
        Ok(())
    }

    fn read_tree(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match &self.tree {
            Some(t) => t.read_exact_at(buf, offset),
            None => Err(io::Error::other("blob has no tree file")),
        }
    }
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
        assert!(store.verify().unwrap().is_empty());
        fs::write(dir.join("staging/leftover"), b"x").unwrap();
        assert_eq!(store.verify().unwrap().len(), 1);
        assert_eq!(store.gc().unwrap().0, 1);
        let img = t.path().join("img");
        store.export(&img, 0, &[], &AtomicBool::new(false)).unwrap();
        assert!(store.remove(&d).unwrap());
        assert!(!store.data_path(&d).exists());
        assert!(store.list().unwrap().is_empty());
    }
}
