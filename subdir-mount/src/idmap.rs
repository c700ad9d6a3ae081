//! `--uid-map`/`--gid-map` parsing lives in the shared `fuse-passthrough` crate.

pub use fuse_passthrough::idmap::*;
