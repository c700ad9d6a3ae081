//! On-disk structures of a blobfs image (see `FORMAT.md`; keep the two in step).
//!
//! Everything is little-endian with fixed offsets, encoded and decoded field by field: no
//! casting of untrusted bytes into structs, and no variable-length parsing before the header
//! checksum (and the signature, when a key is required) has been checked.

use crate::merkle::{BLOCK_SIZE, HASH_SIZE, Hash, TreeGeometry, data_blocks};
use sha2::{Digest as _, Sha256};

/// First eight bytes of every image. The high-bit first byte and the CR/LF make accidental
/// text-mode mangling detectable (as PNG does).
pub const MAGIC: [u8; 8] = *b"\x89BLOBFS\n";
/// Format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Encoded header length; the rest of block 0 is zero.
pub const HEADER_SIZE: usize = 256;
/// Bytes of the header covered by `header_sha256`.
const HEADER_HASHED: usize = HEADER_SIZE - HASH_SIZE;
/// The signature block is always block 1.
pub const SIGNATURE_BLOCK_OFFSET: u64 = BLOCK_SIZE as u64;
/// The index always starts at block 2.
pub const INDEX_OFFSET: u64 = 2 * BLOCK_SIZE as u64;
/// Size of one index entry.
pub const ENTRY_SIZE: usize = 64;
/// Magic of the signature block.
pub const SIGNATURE_MAGIC: [u8; 8] = *b"BLOBSIG\n";
/// Size of one signature slot: key id (SHA-256 of the raw public key) and ed25519 signature.
pub const SIGNATURE_SLOT_SIZE: usize = HASH_SIZE + 64;
/// Signature slots that fit in the signature block after its 16-byte head.
pub const MAX_SIGNATURES: usize = (BLOCK_SIZE - 16) / SIGNATURE_SLOT_SIZE;
/// Domain separation for signatures: a signature over a blobfs header cannot be replayed as a
/// signature over anything else made with the same key.
pub const SIGNATURE_CONTEXT: &[u8] = b"blobfs image header signature v1\0";

/// Incompatible feature bits known to this version (none yet): an image with any other
/// incompatible bit set is refused.
pub const INCOMPAT_KNOWN: u64 = 0;
/// Index entry flags known to this version (none yet).
pub const ENTRY_FLAGS_KNOWN: u32 = 0;

/// The fixed header in block 0.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Header {
    pub version: u32,
    pub block_size: u32,
    pub incompat_features: u64,
    pub compat_features: u64,
    /// Monotonic image generation for rollback protection (`-o min_epoch=`).
    pub epoch: u64,
    /// Exact length of the image in bytes.
    pub image_size: u64,
    pub blob_count: u64,
    pub index_offset: u64,
    pub index_size: u64,
    pub tree_offset: u64,
    pub tree_size: u64,
    pub data_offset: u64,
    pub data_size: u64,
    /// SHA-256 of the index region (`index_size` bytes at `index_offset`).
    pub index_sha256: Hash,
}

/// Why a header was refused. Messages say what is wrong in the terms of FORMAT.md.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("not a blobfs image (bad magic)")]
    BadMagic,
    #[error("unsupported blobfs format version {0} (this build reads version {VERSION})")]
    UnsupportedVersion(u32),
    #[error("header checksum mismatch: the header is corrupted")]
    Checksum,
    #[error("unsupported block size {0} (only 4096)")]
    BlockSize(u32),
    #[error("image uses unknown incompatible features {0:#x}")]
    UnknownFeatures(u64),
    #[error("header field {0} is inconsistent: {1}")]
    Layout(&'static str, String),
}

fn le_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

impl Header {
    /// Encode to the fixed 256-byte form, checksum included.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
        b[16..20].copy_from_slice(&self.block_size.to_le_bytes());
        // 20..24 reserved
        let fields = [
            self.incompat_features,
            self.compat_features,
            self.epoch,
            self.image_size,
            self.blob_count,
            self.index_offset,
            self.index_size,
            self.tree_offset,
            self.tree_size,
            self.data_offset,
            self.data_size,
        ];
        for (i, v) in fields.iter().enumerate() {
            let off = 24 + 8 * i;
            b[off..off + 8].copy_from_slice(&v.to_le_bytes());
        }
        b[112..144].copy_from_slice(&self.index_sha256);
        // 144..224 reserved
        let sum: Hash = Sha256::digest(&b[..HEADER_HASHED]).into();
        b[HEADER_HASHED..].copy_from_slice(&sum);
        b
    }

    /// Decode and check the header's own consistency (not yet against the file length).
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Result<Header, HeaderError> {
        if b[0..8] != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let version = le_u32(b, 8);
        if version != VERSION {
            return Err(HeaderError::UnsupportedVersion(version));
        }
        let sum: Hash = Sha256::digest(&b[..HEADER_HASHED]).into();
        if b[HEADER_HASHED..] != sum {
            return Err(HeaderError::Checksum);
        }
        if le_u32(b, 12) as usize != HEADER_SIZE {
            return Err(HeaderError::Layout(
                "header_size",
                format!("{} != {HEADER_SIZE}", le_u32(b, 12)),
            ));
        }
        if b[20..24] != [0; 4] || b[144..224].iter().any(|&x| x != 0) {
            return Err(HeaderError::Layout(
                "reserved",
                "reserved bytes are not zero".into(),
            ));
        }
        let h = Header {
            version,
            block_size: le_u32(b, 16),
            incompat_features: le_u64(b, 24),
            compat_features: le_u64(b, 32),
            epoch: le_u64(b, 40),
            image_size: le_u64(b, 48),
            blob_count: le_u64(b, 56),
            index_offset: le_u64(b, 64),
            index_size: le_u64(b, 72),
            tree_offset: le_u64(b, 80),
            tree_size: le_u64(b, 88),
            data_offset: le_u64(b, 96),
            data_size: le_u64(b, 104),
            index_sha256: b[112..144].try_into().expect("32 bytes"),
        };
        h.check_layout()?;
        Ok(h)
    }

    /// Regions must follow each other in order, block-aligned, without overflow, and sum to
    /// the image size; the index must be exactly `blob_count` entries.
    fn check_layout(&self) -> Result<(), HeaderError> {
        let bs = BLOCK_SIZE as u64;
        if self.block_size as usize != BLOCK_SIZE {
            return Err(HeaderError::BlockSize(self.block_size));
        }
        if self.incompat_features & !INCOMPAT_KNOWN != 0 {
            return Err(HeaderError::UnknownFeatures(
                self.incompat_features & !INCOMPAT_KNOWN,
            ));
        }
        let bad = |field, msg: String| Err(HeaderError::Layout(field, msg));
        if self.index_offset != INDEX_OFFSET {
            return bad(
                "index_offset",
                format!("{} != {INDEX_OFFSET}", self.index_offset),
            );
        }
        match self.blob_count.checked_mul(ENTRY_SIZE as u64) {
            Some(n) if n == self.index_size => {}
            _ => {
                return bad(
                    "index_size",
                    format!(
                        "{} bytes for {} entries of {ENTRY_SIZE}",
                        self.index_size, self.blob_count
                    ),
                );
            }
        }
        let index_end = self
            .index_size
            .checked_next_multiple_of(bs)
            .and_then(|padded| self.index_offset.checked_add(padded));
        if index_end != Some(self.tree_offset) {
            return bad("tree_offset", "does not follow the padded index".into());
        }
        let tree_end = self.tree_offset.checked_add(self.tree_size);
        if !self.tree_size.is_multiple_of(bs) || tree_end != Some(self.data_offset) {
            return bad("data_offset", "does not follow the tree region".into());
        }
        let data_end = self.data_offset.checked_add(self.data_size);
        if !self.data_size.is_multiple_of(bs) || data_end != Some(self.image_size) {
            return bad(
                "image_size",
                "regions do not add up to the image size".into(),
            );
        }
        Ok(())
    }

    /// The message a signature covers: a context string and the encoded header, which holds
    /// the index hash, which names every blob digest, which fixes every byte of every blob.
    pub fn signed_message(encoded: &[u8; HEADER_SIZE]) -> Vec<u8> {
        let mut msg = Vec::with_capacity(SIGNATURE_CONTEXT.len() + HEADER_SIZE);
        msg.extend_from_slice(SIGNATURE_CONTEXT);
        msg.extend_from_slice(encoded);
        msg
    }
}

/// One fixed-size index entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub digest: Hash,
    pub size: u64,
    /// Absolute image offset of the blob's first data block.
    pub data_offset: u64,
    /// Absolute image offset of the blob's stored Merkle tree (root level first); 0 when the
    /// blob has no tree (at most one block).
    pub tree_offset: u64,
    pub flags: u32,
}

/// Why an index entry was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EntryError {
    #[error("entry {0}: index is not sorted by digest or has a duplicate digest")]
    Unsorted(u64),
    #[error("entry {0}: unknown flags {1:#x}")]
    Flags(u64, u32),
    #[error("entry {0}: reserved bytes are not zero")]
    Reserved(u64),
    #[error("entry {0} ({1}): {2} lies outside its region of the image")]
    OutOfBounds(u64, String, &'static str),
    #[error("entry {0} ({1}): {2} is not block-aligned")]
    Unaligned(u64, String, &'static str),
}

impl Entry {
    pub fn encode(&self) -> [u8; ENTRY_SIZE] {
        let mut b = [0u8; ENTRY_SIZE];
        b[0..32].copy_from_slice(&self.digest);
        b[32..40].copy_from_slice(&self.size.to_le_bytes());
        b[40..48].copy_from_slice(&self.data_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.tree_offset.to_le_bytes());
        b[56..60].copy_from_slice(&self.flags.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Entry {
        Entry {
            digest: b[0..32].try_into().expect("32 bytes"),
            size: le_u64(b, 32),
            data_offset: le_u64(b, 40),
            tree_offset: le_u64(b, 48),
            flags: le_u32(b, 56),
        }
    }

    /// Bytes of data region the blob occupies (whole blocks).
    pub fn stored_data_len(&self) -> u64 {
        data_blocks(self.size) * BLOCK_SIZE as u64
    }

    /// Check an entry (number `i`) against the header's regions: data and tree must lie wholly
    /// inside their region, block-aligned, with no arithmetic overflow.
    pub fn check(&self, i: u64, raw: &[u8], h: &Header) -> Result<(), EntryError> {
        let name = || hex::encode(self.digest);
        if self.flags & !ENTRY_FLAGS_KNOWN != 0 {
            return Err(EntryError::Flags(i, self.flags));
        }
        if raw[60..64] != [0; 4] {
            return Err(EntryError::Reserved(i));
        }
        let bs = BLOCK_SIZE as u64;
        let inside = |off: u64, len: u64, start: u64, size: u64| {
            off >= start && off.checked_add(len).is_some_and(|end| end <= start + size)
        };
        let data_len = data_blocks(self.size)
            .checked_mul(bs)
            .ok_or_else(|| EntryError::OutOfBounds(i, name(), "data"))?;
        if data_len > 0 {
            if !self.data_offset.is_multiple_of(bs) {
                return Err(EntryError::Unaligned(i, name(), "data"));
            }
            if !inside(self.data_offset, data_len, h.data_offset, h.data_size) {
                return Err(EntryError::OutOfBounds(i, name(), "data"));
            }
        }
        let tree_len = TreeGeometry::new(self.size).tree_bytes();
        if tree_len > 0 {
            if !self.tree_offset.is_multiple_of(bs) {
                return Err(EntryError::Unaligned(i, name(), "Merkle tree"));
            }
            if !inside(self.tree_offset, tree_len, h.tree_offset, h.tree_size) {
                return Err(EntryError::OutOfBounds(i, name(), "Merkle tree"));
            }
        }
        Ok(())
    }
}

/// One signature slot of the signature block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignatureSlot {
    /// SHA-256 of the signer's raw 32-byte ed25519 public key.
    pub key_id: Hash,
    pub signature: [u8; 64],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureBlockError {
    #[error("signature block has a bad magic")]
    BadMagic,
    #[error("signature block claims {0} signatures (at most {MAX_SIGNATURES})")]
    TooMany(u32),
    #[error("signature block has non-zero reserved bytes")]
    Reserved,
}

/// Encode the 4096-byte signature block (also for zero signatures).
pub fn encode_signature_block(slots: &[SignatureSlot]) -> Vec<u8> {
    assert!(slots.len() <= MAX_SIGNATURES, "too many signatures");
    let mut b = vec![0u8; BLOCK_SIZE];
    b[0..8].copy_from_slice(&SIGNATURE_MAGIC);
    b[8..12].copy_from_slice(&(slots.len() as u32).to_le_bytes());
    for (i, s) in slots.iter().enumerate() {
        let off = 16 + i * SIGNATURE_SLOT_SIZE;
        b[off..off + 32].copy_from_slice(&s.key_id);
        b[off + 32..off + SIGNATURE_SLOT_SIZE].copy_from_slice(&s.signature);
    }
    b
}

/// Decode the signature block; everything past the last slot must be zero.
pub fn decode_signature_block(b: &[u8]) -> Result<Vec<SignatureSlot>, SignatureBlockError> {
    if b.len() != BLOCK_SIZE || b[0..8] != SIGNATURE_MAGIC {
        return Err(SignatureBlockError::BadMagic);
    }
    let count = le_u32(b, 8);
    if count as usize > MAX_SIGNATURES {
        return Err(SignatureBlockError::TooMany(count));
    }
    let end = 16 + count as usize * SIGNATURE_SLOT_SIZE;
    if b[12..16] != [0; 4] || b[end..].iter().any(|&x| x != 0) {
        return Err(SignatureBlockError::Reserved);
    }
    Ok((0..count as usize)
        .map(|i| {
            let off = 16 + i * SIGNATURE_SLOT_SIZE;
            SignatureSlot {
                key_id: b[off..off + 32].try_into().expect("32 bytes"),
                signature: b[off + 32..off + SIGNATURE_SLOT_SIZE]
                    .try_into()
                    .expect("64 bytes"),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: VERSION,
            block_size: 4096,
            epoch: 7,
            blob_count: 2,
            index_offset: INDEX_OFFSET,
            index_size: 128,
            tree_offset: INDEX_OFFSET + 4096,
            tree_size: 4096,
            data_offset: INDEX_OFFSET + 8192,
            data_size: 8192,
            image_size: INDEX_OFFSET + 16384,
            index_sha256: [9; 32],
            ..Header::default()
        }
    }

    #[test]
    fn header_round_trip() {
        let h = sample();
        assert_eq!(Header::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn every_header_bit_flip_is_detected() {
        let enc = sample().encode();
        for byte in 0..HEADER_SIZE {
            for bit in 0..8 {
                let mut b = enc;
                b[byte] ^= 1 << bit;
                assert!(Header::decode(&b).is_err(), "flip at {byte}.{bit} accepted");
            }
        }
    }

    #[test]
    fn inconsistent_layouts_are_refused() {
        let mut h = sample();
        h.blob_count = u64::MAX / 2;
        assert!(matches!(
            Header::decode(&h.encode()),
            Err(HeaderError::Layout("index_size", _))
        ));
        let mut h = sample();
        h.image_size += 1;
        assert!(Header::decode(&h.encode()).is_err());
        let mut h = sample();
        h.incompat_features = 1;
        assert_eq!(
            Header::decode(&h.encode()),
            Err(HeaderError::UnknownFeatures(1))
        );
    }

    /// Found by the resource-limit test of `tests/tamper.rs`: an index of `u64::MAX / 64`
    /// entries overflowed while being padded to a block (a panic with overflow checks, a
    /// wrapped offset without).
    #[test]
    fn index_size_near_the_top_of_u64_is_refused_without_overflow() {
        let mut h = sample();
        h.blob_count = u64::MAX / ENTRY_SIZE as u64;
        h.index_size = h.blob_count * ENTRY_SIZE as u64;
        // What the padded index end wraps around to.
        h.tree_offset = INDEX_OFFSET;
        h.data_offset = INDEX_OFFSET;
        h.tree_size = 0;
        h.data_size = 0;
        h.image_size = INDEX_OFFSET;
        assert!(matches!(
            Header::decode(&h.encode()),
            Err(HeaderError::Layout("tree_offset", _))
        ));
    }

    #[test]
    fn signature_block_round_trip_and_limits() {
        let slots = vec![
            SignatureSlot {
                key_id: [1; 32],
                signature: [2; 64],
            };
            3
        ];
        let b = encode_signature_block(&slots);
        assert_eq!(decode_signature_block(&b), Ok(slots));
        let mut bad = b.clone();
        bad[8] = 200;
        assert_eq!(
            decode_signature_block(&bad),
            Err(SignatureBlockError::TooMany(200))
        );
        let mut trailing = b;
        trailing[4000] = 1;
        assert_eq!(
            decode_signature_block(&trailing),
            Err(SignatureBlockError::Reserved)
        );
    }
}
