//! blobfs: a content-addressed filesystem of write-once blobs, each named by its fs-verity
//! SHA-256 digest and verified block by block on every read.
//!
//! The crate holds the on-disk format ([`format`]), the Merkle code shared by every writer and
//! reader ([`merkle`]), signatures ([`sign`]), the image reader ([`image`]) and writer
//! ([`writer`]), and the FUSE daemon ([`fuse`]).

pub mod format;
pub mod image;
pub mod merkle;
pub mod sign;
pub mod writer;
