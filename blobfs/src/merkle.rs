//! fs-verity Merkle trees and digests (SHA-256, 4096-byte blocks, no salt).
//!
//! This is the one implementation shared by mkfs, the image reader, the FUSE daemon and the
//! store. It produces exactly what the kernel's fs-verity and `fsverity digest` produce; the
//! algorithm is described in the kernel's `Documentation/filesystems/fsverity.rst`.
//!
//! Tree levels are stored root first (the kernel's and dm-verity's on-disk order): the single
//! top block comes first, the level that hashes the data blocks comes last. Every level is padded
//! with zeros to a whole block.

use rayon::prelude::*;
use sha2::{Digest as _, Sha256};
use std::io::{self, Read};

/// fs-verity data and tree block size used by blobfs.
pub const BLOCK_SIZE: usize = 4096;
/// SHA-256 output size.
pub const HASH_SIZE: usize = 32;
/// Hashes that fit in one tree block.
pub const HASHES_PER_BLOCK: usize = BLOCK_SIZE / HASH_SIZE;
/// `FS_VERITY_HASH_ALG_SHA256`.
pub const FS_VERITY_HASH_ALG_SHA256: u8 = 1;
/// log2(BLOCK_SIZE), as stored in the fs-verity descriptor.
const LOG_BLOCK_SIZE: u8 = 12;

/// A SHA-256 value: a block hash, a root hash, or a blob's fs-verity digest.
pub type Hash = [u8; HASH_SIZE];

/// SHA-256 of one block, zero-padded to `BLOCK_SIZE` when shorter (the last block of a file).
pub fn hash_block(data: &[u8]) -> Hash {
    debug_assert!(data.len() <= BLOCK_SIZE);
    let mut hasher = Sha256::new();
    hasher.update(data);
    if data.len() < BLOCK_SIZE {
        hasher.update(&ZERO_BLOCK[..BLOCK_SIZE - data.len()]);
    }
    hasher.finalize().into()
}

static ZERO_BLOCK: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];

/// The fs-verity file digest: SHA-256 of the 256-byte `fsverity_descriptor` for `size` and
/// `root`. This is the name of a blob.
pub fn fsverity_digest(size: u64, root: &Hash) -> Hash {
    let mut desc = [0u8; 256];
    desc[0] = 1; // version
    desc[1] = FS_VERITY_HASH_ALG_SHA256;
    desc[2] = LOG_BLOCK_SIZE;
    desc[3] = 0; // salt_size
    // desc[4..8]: reserved
    desc[8..16].copy_from_slice(&size.to_le_bytes());
    desc[16..16 + HASH_SIZE].copy_from_slice(root);
    // root_hash is 64 bytes wide, then salt[32] and reserved[144]: all zero.
    Sha256::digest(desc).into()
}

/// Number of data blocks of a blob of `size` bytes.
pub fn data_blocks(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE as u64)
}

/// Shape of a blob's Merkle tree: how many blocks each level has and where it is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeGeometry {
    size: u64,
    /// Blocks per level, bottom level (hashes of data blocks) first.
    level_blocks: Vec<u64>,
    /// Index of each level's first block within the stored tree, bottom level first.
    level_start: Vec<u64>,
}

impl TreeGeometry {
    /// Geometry for a blob of `size` bytes. A blob of at most one block has no tree: its root
    /// hash is the hash of its (padded) single block, or all zeros when it is empty.
    pub fn new(size: u64) -> TreeGeometry {
        let mut level_blocks = Vec::new();
        let mut items = data_blocks(size);
        if items > 1 {
            loop {
                let blocks = items.div_ceil(HASHES_PER_BLOCK as u64);
                level_blocks.push(blocks);
                if blocks == 1 {
                    break;
                }
                items = blocks;
            }
        }
        // Root first on disk: level i starts after all levels above it.
        let mut level_start = vec![0; level_blocks.len()];
        let mut next = 0;
        for level in (0..level_blocks.len()).rev() {
            level_start[level] = next;
            next += level_blocks[level];
        }
        TreeGeometry {
            size,
            level_blocks,
            level_start,
        }
    }

    /// Blob size this geometry describes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of tree levels (0 for blobs of at most one block).
    pub fn levels(&self) -> usize {
        self.level_blocks.len()
    }

    /// Total number of tree blocks.
    pub fn tree_blocks(&self) -> u64 {
        self.level_blocks.iter().sum()
    }

    /// Size of the stored tree in bytes.
    pub fn tree_bytes(&self) -> u64 {
        self.tree_blocks() * BLOCK_SIZE as u64
    }

    /// Where the hash of item `index` of `level` is stored, as (tree block, byte offset in it).
    /// Items of level 0 are the data blocks; items of level k > 0 are the blocks of level k-1.
    pub fn hash_location(&self, level: usize, index: u64) -> (u64, usize) {
        let per = HASHES_PER_BLOCK as u64;
        let block = self.level_start[level] + index / per;
        let offset = (index % per) as usize * HASH_SIZE;
        (block, offset)
    }

    /// Level and index within the level of stored tree block `block`.
    pub fn block_position(&self, block: u64) -> Option<(usize, u64)> {
        (0..self.levels()).find_map(|level| {
            let start = self.level_start[level];
            (block >= start && block < start + self.level_blocks[level])
                .then(|| (level, block - start))
        })
    }
}

/// A complete Merkle tree as stored in an image, plus its root hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MerkleTree {
    pub size: u64,
    pub root: Hash,
    /// Stored tree, root level first, `geometry().tree_bytes()` long.
    pub tree: Vec<u8>,
}

impl MerkleTree {
    /// Build the tree from the hashes of all data blocks (concatenated, 32 bytes each).
    pub fn from_leaf_hashes(size: u64, leaves: Vec<u8>) -> MerkleTree {
        let geometry = TreeGeometry::new(size);
        debug_assert_eq!(leaves.len() as u64, data_blocks(size) * HASH_SIZE as u64);
        if geometry.levels() == 0 {
            let root = match leaves.len() {
                0 => [0; HASH_SIZE],
                _ => leaves[..HASH_SIZE].try_into().expect("one hash"),
            };
            return MerkleTree {
                size,
                root,
                tree: Vec::new(),
            };
        }
        let mut tree = vec![0u8; geometry.tree_bytes() as usize];
        let mut items = leaves;
        for level in 0..geometry.levels() {
            let start = geometry.level_start[level] as usize * BLOCK_SIZE;
            let len = geometry.level_blocks[level] as usize * BLOCK_SIZE;
            let dest = &mut tree[start..start + len];
            dest[..items.len()].copy_from_slice(&items);
            items = hash_blocks(dest);
        }
        let root = items[..HASH_SIZE].try_into().expect("one root hash");
        MerkleTree { size, root, tree }
    }

    /// Hash `data` completely (in parallel for large inputs).
    pub fn from_bytes(data: &[u8]) -> MerkleTree {
        MerkleTree::from_leaf_hashes(data.len() as u64, hash_blocks(data))
    }

    /// Hash everything `reader` yields. `size_hint` (the expected length, if known) only sizes
    /// the read buffer: a fresh zeroed 4 MiB buffer per small file used to cost more than
    /// hashing it.
    pub fn from_reader(reader: &mut impl Read, size_hint: Option<u64>) -> io::Result<MerkleTree> {
        let mut hasher = LeafHasher::new();
        // One block more than the hint, so a file of exactly the hinted size ends in one read.
        let len = size_hint.map_or(CHUNK as u64, |s| {
            s.next_multiple_of(BLOCK_SIZE as u64)
                .saturating_add(BLOCK_SIZE as u64)
                .min(CHUNK as u64)
        });
        let mut buf = vec![0u8; len as usize];
        loop {
            let n = read_full(reader, &mut buf)?;
            hasher.update(&buf[..n]);
            if n < buf.len() {
                break;
            }
        }
        Ok(hasher.finish())
    }

    /// The fs-verity digest (blob name).
    pub fn digest(&self) -> Hash {
        fsverity_digest(self.size, &self.root)
    }

    pub fn geometry(&self) -> TreeGeometry {
        TreeGeometry::new(self.size)
    }
}

/// Bytes read per step when hashing a stream; a multiple of the block size, large enough that
/// splitting it across threads pays off.
const CHUNK: usize = 4 << 20;
/// Below this, hashing in one thread is faster than handing blocks to rayon.
const PARALLEL_THRESHOLD: usize = 256 << 10;

/// Hash consecutive blocks of `data` (last one zero-padded); returns the hashes concatenated.
pub fn hash_blocks(data: &[u8]) -> Vec<u8> {
    let count = data.len().div_ceil(BLOCK_SIZE);
    let mut out = vec![0u8; count * HASH_SIZE];
    if data.len() >= PARALLEL_THRESHOLD {
        out.par_chunks_mut(HASH_SIZE)
            .zip(data.par_chunks(BLOCK_SIZE))
            .for_each(|(dst, block)| dst.copy_from_slice(&hash_block(block)));
    } else {
        for (dst, block) in out.chunks_mut(HASH_SIZE).zip(data.chunks(BLOCK_SIZE)) {
            dst.copy_from_slice(&hash_block(block));
        }
    }
    out
}

/// Incremental leaf hashing for streamed input. Input may come in pieces of any size.
#[derive(Default)]
pub struct LeafHasher {
    size: u64,
    leaves: Vec<u8>,
    partial: Vec<u8>,
}

impl LeafHasher {
    pub fn new() -> LeafHasher {
        LeafHasher::default()
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.size += data.len() as u64;
        if !self.partial.is_empty() {
            let take = (BLOCK_SIZE - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.partial.len() == BLOCK_SIZE {
                let hash = hash_block(&self.partial);
                self.leaves.extend_from_slice(&hash);
                self.partial.clear();
            }
        }
        let whole = data.len() / BLOCK_SIZE * BLOCK_SIZE;
        if whole > 0 {
            self.leaves.extend_from_slice(&hash_blocks(&data[..whole]));
        }
        self.partial.extend_from_slice(&data[whole..]);
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.size
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    pub fn finish(mut self) -> MerkleTree {
        if !self.partial.is_empty() {
            let hash = hash_block(&self.partial);
            self.leaves.extend_from_slice(&hash);
        }
        MerkleTree::from_leaf_hashes(self.size, self.leaves)
    }
}

/// Fill `buf` as far as the reader allows; returns fewer bytes only at end of input.
pub fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Parse a 64-character lowercase hex digest (the only accepted spelling of a blob name).
pub fn parse_digest(name: &str) -> Option<Hash> {
    if name.len() != 2 * HASH_SIZE
        || !name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; HASH_SIZE];
    hex::decode_to_slice(name, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_hex(data: &[u8]) -> String {
        hex::encode(MerkleTree::from_bytes(data).digest())
    }

    /// Vectors printed by `fsverity digest` (SHA-256, 4 KiB blocks, no salt).
    #[test]
    fn known_vectors() {
        let cases: [(Vec<u8>, &str); 7] = [
            (
                vec![],
                "3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95",
            ),
            (
                b"abc".to_vec(),
                "700b6bd8510f0b4f9bac8b9cf0459151a1c4a99f467892bb4bd289a67df8e19c",
            ),
            (
                vec![0; 4096],
                "babc284ee4ffe7f449377fbf6692715b43aec7bc39c094a95878904d34bac97e",
            ),
            (
                vec![0; 4097],
                "093756e4ea9683329106d4a16982682ed182c14bf076463a9e7f97305cbac743",
            ),
            (
                vec![0xff; 8192],
                "a8e44b2a98722077e099017ee98c81fd0a2050d3152c842d621d19907962d35f",
            ),
            (
                vec![0x61; 524289],
                "cc4f297494cf9e0b6f159db6d30a62d3fcc219fc9c0cbc2d8792bd264da4d9cb",
            ),
            (
                vec![0xff; 1 << 20],
                "035d720d4dbe9ab79e18382bf6bc740de116bdd63cfd53b10efac4332abe4ac3",
            ),
        ];
        for (data, want) in cases {
            assert_eq!(digest_hex(&data), want, "size {}", data.len());
        }
    }

    #[test]
    fn streaming_matches_one_shot_for_odd_piece_sizes() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 4096) as u8).collect();
        let whole = MerkleTree::from_bytes(&data);
        for piece in [1usize, 7, 4095, 4096, 4097, 65536, 299_999] {
            let mut h = LeafHasher::new();
            for chunk in data.chunks(piece) {
                h.update(chunk);
            }
            assert_eq!(h.finish(), whole, "piece {piece}");
        }
        // The size hint only sizes the buffer: wrong hints must not change the result.
        for hint in [None, Some(0), Some(5), Some(300_000), Some(1 << 40)] {
            let streamed = MerkleTree::from_reader(&mut &data[..], hint).unwrap();
            assert_eq!(streamed, whole, "hint {hint:?}");
        }
    }

    #[test]
    fn geometry_levels_and_locations() {
        assert_eq!(TreeGeometry::new(0).levels(), 0);
        assert_eq!(TreeGeometry::new(4096).levels(), 0);
        let g = TreeGeometry::new(4097);
        assert_eq!((g.levels(), g.tree_blocks()), (1, 1));
        // 129 blocks: two bottom blocks, one root block stored first.
        let g = TreeGeometry::new(129 * 4096);
        assert_eq!(g.levels(), 2);
        assert_eq!(g.tree_blocks(), 3);
        assert_eq!(g.hash_location(0, 0), (1, 0));
        assert_eq!(g.hash_location(0, 128), (2, 0));
        assert_eq!(g.hash_location(1, 1), (0, 32));
        assert_eq!(g.block_position(0), Some((1, 0)));
        assert_eq!(g.block_position(2), Some((0, 1)));
        assert_eq!(g.block_position(3), None);
    }

    #[test]
    fn tree_is_self_consistent() {
        let data = vec![0x5a; 200 * 4096 + 17];
        let t = MerkleTree::from_bytes(&data);
        let g = t.geometry();
        // Each stored block's hash appears at its parent location; the top block is the root.
        for block in 0..g.tree_blocks() {
            let (level, index) = g.block_position(block).unwrap();
            let start = block as usize * BLOCK_SIZE;
            let hash = hash_block(&t.tree[start..start + BLOCK_SIZE]);
            if level + 1 == g.levels() {
                assert_eq!(hash, t.root);
            } else {
                let (pb, off) = g.hash_location(level + 1, index);
                let p = pb as usize * BLOCK_SIZE + off;
                assert_eq!(&t.tree[p..p + HASH_SIZE], &hash);
            }
        }
    }

    #[test]
    fn parse_digest_accepts_only_lowercase_hex() {
        let ok = "3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95";
        assert!(parse_digest(ok).is_some());
        assert!(parse_digest(&ok.to_uppercase()).is_none());
        assert!(parse_digest(&ok[1..]).is_none());
        assert!(parse_digest(&format!("{}g", &ok[1..])).is_none());
    }

    /// The `fs-verity` crate is an independent implementation: agree with it on many sizes.
    #[test]
    fn agrees_with_fs_verity_crate() {
        use sha2_010::Digest as _;
        for size in [
            0usize,
            1,
            4095,
            4096,
            4097,
            8191,
            128 * 4096,
            128 * 4096 + 1,
            1 << 21,
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let mut oracle = fs_verity::FsVerityDigest::<sha2_010::Sha256>::new();
            oracle.update(&data);
            let want: [u8; 32] = oracle.finalize().into();
            assert_eq!(MerkleTree::from_bytes(&data).digest(), want, "size {size}");
        }
    }
}
