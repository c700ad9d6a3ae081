//! A local cache for a remote: a blobfs store holding the blobs of a thin image that have been
//! fetched, so a second read is local and a machine can be prepared to go offline.
//!
//! Blobs are cached whole. A read of a blob that is not cached is served from the remote at
//! once (only the needed range), and the whole blob is queued for a background fetch into the
//! store. The store hashes what it receives and keeps it only if it matches the digest, so a
//! lying remote cannot fill the cache with bad data; and cached bytes are verified against
//! the thin image's trees on every read anyway, like any other blob data.

use crate::image::BlobSource;
use crate::merkle::{Hash, LeafHasher};
use crate::remote::Remote;
use crate::store::{Added, Store};
use std::collections::HashSet;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// Bytes per request when a whole blob is fetched.
const FETCH_CHUNK: usize = 8 << 20;

/// Blob data from a store, with a remote (unless offline) for what it lacks.
pub struct CachedRemote {
    store: Arc<Store>,
    remote: Option<Arc<Remote>>,
    queued: Mutex<HashSet<Hash>>,
    jobs: Mutex<Option<mpsc::SyncSender<(Hash, u64)>>>,
}

impl std::fmt::Debug for CachedRemote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedRemote")
            .field("store", &self.store.root())
            .field("remote", &self.remote.as_ref().map(|r| r.url()))
            .finish()
    }
}

impl CachedRemote {
    /// With `remote` None, only cached blobs can be read (`--offline`).
    pub fn new(store: Store, remote: Option<Remote>) -> Arc<CachedRemote> {
        let me = Arc::new(CachedRemote {
            store: Arc::new(store),
            remote: remote.map(Arc::new),
            queued: Mutex::new(HashSet::new()),
            jobs: Mutex::new(None),
        });
        if me.remote.is_some() {
            // A bounded queue: when it is full, a blob is simply not cached by this read.
            let (tx, rx) = mpsc::sync_channel::<(Hash, u64)>(1024);
            let worker = Arc::downgrade(&me);
            let spawned = std::thread::Builder::new()
                .name("cache-fill".into())
                .spawn(move || {
                    while let Ok((digest, size)) = rx.recv() {
                        let Some(me) = worker.upgrade() else { break };
                        me.fill(&digest, size);
                    }
                });
            match spawned {
                Ok(_) => *lock(&me.jobs) = Some(tx),
                Err(e) => tracing::warn!("cache: no background fetches ({e})"),
            }
        }
        me
    }

    fn fill(&self, digest: &Hash, size: u64) {
        if let Some(remote) = &self.remote {
            match fetch_into_store(remote, &self.store, digest, size) {
                Ok(_) => tracing::debug!("cache: {} stored", hex::encode(digest)),
                Err(e) => tracing::warn!("cache: {}: not cached: {e}", hex::encode(digest)),
            }
        }
        lock(&self.queued).remove(digest);
    }

    fn schedule(&self, digest: &Hash, size: u64) {
        if !lock(&self.queued).insert(*digest) {
            return;
        }
        let sent = lock(&self.jobs)
            .as_ref()
            .is_some_and(|tx| tx.try_send((*digest, size)).is_ok());
        if !sent {
            lock(&self.queued).remove(digest);
        }
    }

    fn read_cached(&self, digest: &Hash, size: u64, offset: u64, buf: &mut [u8]) -> bool {
        match self.store.get(digest) {
            Ok(Some(rec)) if rec.size == size => {}
            _ => return false,
        }
        match self
            .store
            .open_blob(digest, size)
            .and_then(|f| f.read_padded(offset, buf))
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("cache: {}: {e}; reading the remote", hex::encode(digest));
                false
            }
        }
    }
}

impl BlobSource for CachedRemote {
    fn read(&self, digest: &Hash, size: u64, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.read_cached(digest, size, offset, buf) {
            return Ok(());
        }
        let Some(remote) = &self.remote else {
            return Err(io::Error::other(format!(
                "offline, and blob {} is not in the cache {}",
                hex::encode(digest),
                self.store.root().display()
            )));
        };
        remote.read(digest, size, offset, buf)?;
        self.schedule(digest, size);
        Ok(())
    }
}

/// Fetch a whole blob from `remote` into `store`, keeping it only if its digest matches.
pub fn fetch_into_store(
    remote: &Remote,
    store: &Store,
    digest: &Hash,
    size: u64,
) -> Result<Added, String> {
    if matches!(store.get(digest), Ok(Some(r)) if r.size == size) {
        return Ok(Added::AlreadyPresent(*digest));
    }
    let (file, path) = store.staging_file().map_err(|e| e.to_string())?;
    let result = (|| {
        let mut hasher = LeafHasher::new();
        let mut buf = vec![0u8; FETCH_CHUNK.min(size as usize)];
        let mut offset = 0;
        while offset < size {
            let n = FETCH_CHUNK.min((size - offset) as usize);
            remote
                .read(digest, size, offset, &mut buf[..n])
                .map_err(|e| e.to_string())?;
            file.write_all_at(&buf[..n], offset)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            hasher.update(&buf[..n]);
            offset += n as u64;
        }
        let tree = hasher.finish();
        if tree.digest() != *digest {
            return Err(format!(
                "the remote's object has digest {}: refused",
                hex::encode(tree.digest())
            ));
        }
        store.seal(&file, &path, &tree).map_err(|e| e.to_string())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    result
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
