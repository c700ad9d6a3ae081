//! `idmap-overlay`: show a SOURCE directory at MOUNTPOINT with owners mapped through
//! `--uid-map`/`--gid-map DISK:VIEW:COUNT` ranges. Several disk ranges may share view ids (then
//! the mount is read-only); data goes through FUSE passthrough. The filesystem itself is the
//! shared [`fuse_passthrough`] core; this crate is the command line and the daemon.

pub mod cli;
pub mod mount;
