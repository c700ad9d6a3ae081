//! Verified reads of one blob, wherever its bytes live (an image, a store's files).
//!
//! Every data block returned has been hashed and compared with its leaf hash, and every tree
//! block on the way has been checked against its parent up to the blob's digest. Verified tree
//! blocks are kept in a bounded cache (their bytes, never just the fact that they were once
//! good: the storage may change underneath). Data blocks are not cached here.

use crate::merkle::{BLOCK_SIZE, HASH_SIZE, Hash, TreeGeometry, fsverity_digest, hash_block};
use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

/// Access to one blob's stored data (whole blocks, the last one zero-padded) and Merkle tree.
pub trait BlobBytes {
    fn read_data(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    fn read_tree(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// A blob to read: its expected digest and size, and where its bytes are.
pub struct Blob<B: BlobBytes> {
    /// Identifies the blob in the tree cache (unique per cache).
    pub key: u64,
    pub digest: Hash,
    pub size: u64,
    pub bytes: B,
}

/// Why a read failed. Both map to EIO for clients; the log says which.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("blob {digest}: {what} block {block} failed verification")]
    Corrupt {
        digest: String,
        what: &'static str,
        block: u64,
    },
    #[error("blob {digest}: reading its storage failed: {source}")]
    Io { digest: String, source: io::Error },
}

/// Read up to `len` bytes at `offset`, every block verified.
pub fn read_verified(
    blob: &Blob<impl BlobBytes>,
    cache: &TreeCache,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, ReadError> {
    read_checked(blob, cache, offset, len, true)
}

/// `read_verified`; `skip_tree` allows verifying a whole small blob against its digest alone,
/// without reading its stored tree.
fn read_checked(
    blob: &Blob<impl BlobBytes>,
    cache: &TreeCache,
    offset: u64,
    len: usize,
    skip_tree: bool,
) -> Result<Vec<u8>, ReadError> {
    if blob.size == 0 {
        // No block to check: the name itself must be that of empty content, or a blob named
        // after other content would read as an empty file.
        if blob.digest != fsverity_digest(0, &[0; HASH_SIZE]) {
            return Err(ReadError::Corrupt {
                digest: hex::encode(blob.digest),
                what: "empty blob",
                block: 0,
            });
        }
        return Ok(Vec::new());
    }
    if offset >= blob.size || len == 0 {
        return Ok(Vec::new());
    }
    let end = blob.size.min(offset.saturating_add(len as u64));
    let bs = BLOCK_SIZE as u64;
    let first = offset / bs;
    let last = (end - 1) / bs;
    let mut buf = vec![0u8; ((last - first + 1) * bs) as usize];
    blob.bytes
        .read_data(first * bs, &mut buf)
        .map_err(|source| ReadError::Io {
            digest: hex::encode(blob.digest),
            source,
        })?;
    let geometry = TreeGeometry::new(blob.size);
    // Every block of the blob is in hand and its tree is one block: rebuilding that block from
    // the data and checking it against the digest verifies every byte, without reading the
    // tree from storage (a second random read per small file on a cold cache). On a mismatch,
    // the block-by-block check below finds and reports the bad block.
    let all_blocks = first == 0 && end == blob.size;
    let verified = skip_tree && all_blocks && geometry.levels() == 1 && root_matches(blob, &buf);
    let mut leaf_block: Option<(u64, Arc<[u8]>)> = None;
    for (k, block) in buf.chunks(BLOCK_SIZE).enumerate() {
        if verified {
            break;
        }
        let index = first + k as u64;
        let hash = hash_block(block);
        let ok = if geometry.levels() == 0 {
            fsverity_digest(blob.size, &hash) == blob.digest
        } else {
            let (tb, off) = geometry.hash_location(0, index);
            let tree = match &leaf_block {
                Some((b, data)) if *b == tb => data.clone(),
                _ => {
                    let data = tree_block(blob, cache, &geometry, tb)?;
                    leaf_block = Some((tb, data.clone()));
                    data
                }
            };
            tree[off..off + HASH_SIZE] == hash
        };
        if !ok {
            return Err(ReadError::Corrupt {
                digest: hex::encode(blob.digest),
                what: "data",
                block: index,
            });
        }
    }
    let skip = (offset - first * bs) as usize;
    buf.truncate(skip + (end - offset) as usize);
    buf.drain(..skip);
    Ok(buf)
}

/// Whether `data` (every block of a blob whose tree is a single block, zero-padded to whole
/// blocks) hashes to the blob's digest.
fn root_matches(blob: &Blob<impl BlobBytes>, data: &[u8]) -> bool {
    let mut tree_block = [0u8; BLOCK_SIZE];
    for (dst, block) in tree_block
        .chunks_mut(HASH_SIZE)
        .zip(data.chunks(BLOCK_SIZE))
    {
        dst.copy_from_slice(&hash_block(block));
    }
    fsverity_digest(blob.size, &hash_block(&tree_block)) == blob.digest
}

/// A verified tree block: from the cache, or read and checked against its parent (recursively
/// up to the digest) and then cached.
fn tree_block(
    blob: &Blob<impl BlobBytes>,
    cache: &TreeCache,
    geometry: &TreeGeometry,
    block: u64,
) -> Result<Arc<[u8]>, ReadError> {
    if let Some(b) = cache.get(blob.key, block) {
        return Ok(b);
    }
    let mut data = vec![0u8; BLOCK_SIZE];
    blob.bytes
        .read_tree(block * BLOCK_SIZE as u64, &mut data)
        .map_err(|source| ReadError::Io {
            digest: hex::encode(blob.digest),
            source,
        })?;
    let hash = hash_block(&data);
    let (level, index) = geometry
        .block_position(block)
        .expect("tree block index comes from the geometry");
    let ok = if level + 1 == geometry.levels() {
        fsverity_digest(blob.size, &hash) == blob.digest
    } else {
        let (pb, off) = geometry.hash_location(level + 1, index);
        let parent = tree_block(blob, cache, geometry, pb)?;
        parent[off..off + HASH_SIZE] == hash
    };
    if !ok {
        return Err(ReadError::Corrupt {
            digest: hex::encode(blob.digest),
            what: "Merkle tree",
            block,
        });
    }
    let data: Arc<[u8]> = data.into();
    cache.insert(blob.key, block, data.clone());
    Ok(data)
}

/// Check every block of a blob and every block of its stored tree; returns the first problem.
pub fn verify_all(blob: &Blob<impl BlobBytes>, cache: &TreeCache) -> Result<(), ReadError> {
    if blob.size == 0 && blob.digest != fsverity_digest(0, &[0; HASH_SIZE]) {
        return Err(ReadError::Corrupt {
            digest: hex::encode(blob.digest),
            what: "empty blob",
            block: 0,
        });
    }
    let step = 1 << 20;
    let mut offset = 0;
    while offset < blob.size {
        // Through the stored tree even where the data alone would do: a damaged tree is a
        // damaged blob (partial reads need it).
        read_checked(blob, cache, offset, step, false)?;
        offset += step as u64;
    }
    Ok(())
}

/// (blob key, tree block) -> verified block contents.
type TreeBlocks = HashMap<(u64, u64), Arc<[u8]>>;

/// Verified Merkle tree blocks, bounded.
pub struct TreeCache {
    map: Mutex<TreeBlocks>,
    max_blocks: usize,
}

impl TreeCache {
    pub fn new(bytes: usize) -> TreeCache {
        TreeCache {
            map: Mutex::new(HashMap::new()),
            max_blocks: (bytes / BLOCK_SIZE).max(16),
        }
    }

    fn get(&self, key: u64, block: u64) -> Option<Arc<[u8]>> {
        self.lock().get(&(key, block)).cloned()
    }

    fn insert(&self, key: u64, block: u64, data: Arc<[u8]>) {
        let mut map = self.lock();
        if map.len() >= self.max_blocks {
            // Drop about half, arbitrarily: re-verifying a tree block is one read and one hash.
            let keep = self.max_blocks / 2;
            let victims: Vec<_> = map.keys().skip(keep).copied().collect();
            for k in victims {
                map.remove(&k);
            }
        }
        map.insert((key, block), data);
    }

    /// Forget everything about one blob (it was deleted; its key may be reused).
    pub fn forget(&self, key: u64) {
        self.lock().retain(|(k, _), _| *k != key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TreeBlocks> {
        // Only whole inserts and removes happen under the lock, so a poisoned one is intact.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blob with no stored bytes at all.
    struct NoBytes;
    impl BlobBytes for NoBytes {
        fn read_data(&self, _: u64, _: &mut [u8]) -> io::Result<()> {
            Err(io::ErrorKind::UnexpectedEof.into())
        }
        fn read_tree(&self, _: u64, _: &mut [u8]) -> io::Result<()> {
            Err(io::ErrorKind::UnexpectedEof.into())
        }
    }

    /// Found with the oracle of the image fuzz target: an index entry of size 0 named after
    /// other content read back as an empty file, since there was no block to check.
    #[test]
    fn empty_blob_must_carry_the_empty_digest() {
        let cache = TreeCache::new(0);
        let empty = fsverity_digest(0, &[0; HASH_SIZE]);
        let good = Blob {
            key: 0,
            digest: empty,
            size: 0,
            bytes: NoBytes,
        };
        assert_eq!(read_verified(&good, &cache, 0, 4096).unwrap(), b"");
        assert!(verify_all(&good, &cache).is_ok());
        let mut other = empty;
        other[0] ^= 1;
        let bad = Blob {
            key: 1,
            digest: other,
            size: 0,
            bytes: NoBytes,
        };
        let err = read_verified(&bad, &cache, 0, 4096).unwrap_err();
        assert!(
            matches!(
                err,
                ReadError::Corrupt {
                    what: "empty blob",
                    ..
                }
            ),
            "{err}"
        );
        assert!(verify_all(&bad, &cache).is_err());
    }

    /// A blob held in memory: data and tree as mkfs would store them.
    struct MemBytes {
        data: Vec<u8>,
        tree: Vec<u8>,
    }
    impl BlobBytes for MemBytes {
        fn read_data(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            buf.fill(0);
            let start = (offset as usize).min(self.data.len());
            let n = (self.data.len() - start).min(buf.len());
            buf[..n].copy_from_slice(&self.data[start..start + n]);
            Ok(())
        }
        fn read_tree(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let start = offset as usize;
            buf.copy_from_slice(&self.tree[start..start + buf.len()]);
            Ok(())
        }
    }

    fn mem_blob(data: Vec<u8>) -> Blob<MemBytes> {
        let t = crate::merkle::MerkleTree::from_bytes(&data);
        Blob {
            key: 7,
            digest: t.digest(),
            size: t.size,
            bytes: MemBytes { data, tree: t.tree },
        }
    }

    #[test]
    fn whole_small_blob_is_checked_against_its_digest_without_the_stored_tree() {
        let data: Vec<u8> = (0..3 * 4096 + 5).map(|i| (i * 31 % 251) as u8).collect();
        let mut blob = mem_blob(data.clone());
        assert_eq!(TreeGeometry::new(blob.size).levels(), 1);
        // A damaged stored tree: a whole read is still verified (and correct) through the
        // digest; a partial read needs the tree and fails; verify_all reports the tree.
        blob.bytes.tree[100] ^= 1;
        let cache = TreeCache::new(1 << 20);
        assert_eq!(read_verified(&blob, &cache, 0, 1 << 20).unwrap(), data);
        let err = read_verified(&blob, &cache, 4096, 4096).unwrap_err();
        assert!(
            matches!(
                err,
                ReadError::Corrupt {
                    what: "Merkle tree",
                    ..
                }
            ),
            "{err}"
        );
        assert!(verify_all(&blob, &TreeCache::new(1 << 20)).is_err());
        // Damaged data: the whole read falls back to the tree and names the bad block.
        let mut blob = mem_blob(data.clone());
        blob.bytes.data[2 * 4096 + 9] ^= 0x80;
        let err = read_verified(&blob, &TreeCache::new(1 << 20), 0, 1 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                ReadError::Corrupt {
                    what: "data",
                    block: 2,
                    ..
                }
            ),
            "{err}"
        );
        // A read from inside the first block to the end still holds every block (and must
        // still return only what was asked for).
        let blob = mem_blob(data.clone());
        assert_eq!(
            read_verified(&blob, &TreeCache::new(1 << 20), 100, 1 << 20).unwrap(),
            &data[100..]
        );
        // Reads that stop short of the end go block by block.
        let blob = mem_blob(data.clone());
        assert_eq!(
            read_verified(&blob, &TreeCache::new(1 << 20), 4000, 5000).unwrap(),
            &data[4000..9000]
        );
        assert!(verify_all(&blob, &TreeCache::new(1 << 20)).is_ok());
    }
}
