//! subdir-mount: mount one sub-directory of a filesystem without ever exposing its top level.
//!
//! The whole filesystem is only ever mounted detached (new mount API); the subdir is resolved
//! inside it with `openat2(RESOLVE_BENEATH|...)` and only a clone of the subdir is attached.
//! See [`mount`] for the sequence of steps, [`idmap`] for `--uid-map`/`--gid-map`.

pub mod cli;
mod fuse;
pub mod idmap;
pub mod mount;
pub mod request;
