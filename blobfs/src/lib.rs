//! blobfs: a content-addressed filesystem of write-once blobs, each named by its fs-verity
//! SHA-256 digest and verified block by block on every read.
//!
//! The crate holds the on-disk format ([`format`]), the Merkle code shared by every writer and
//! reader ([`merkle`]), signatures ([`sign`]), the image reader ([`image`]) and writer
//! ([`writer`]), and the FUSE daemon ([`fuse`]).

pub mod cli;
pub mod format;
pub mod fuse;
pub mod image;
pub mod merkle;
#[cfg(feature = "store")]
pub mod mount;
#[cfg(feature = "remote")]
pub mod remote;
#[cfg(all(feature = "remote", feature = "store"))]
pub mod remote_cache;
pub mod sign;
pub mod verify;
pub mod writer;

/// A digest as blobs are named: 64 lowercase hex digits.
pub fn hex_digest(d: &merkle::Hash) -> String {
    hex::encode(d)
}
#[cfg(feature = "store")]
pub mod store;
