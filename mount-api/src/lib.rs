//! The parts of the Linux mount machinery that neither rustix nor nix wrap, made safe: loop
//! devices ([`loopdev`]), file handles ([`name_to_handle`], [`open_by_handle`]), early
//! writeback for image writers ([`start_writeback`]) and idmapped mounts ([`set_idmap`], with the user namespace that
//! carries the maps from [`userns`]). All of the project's mount-related `unsafe` code is in
//! the private `sys` module, one small function per system call or ioctl.
//!
//! Used by subdir-mount (the subdir clone is idmapped before it is attached) and idmap-overlay
//! (its kernel mode). A program using [`userns`] must call [`userns::helper_main`] from `main`
//! when started as [`userns::HELPER_ARGV0`].

pub mod fusermount;
pub mod loopdev;
mod sys;
pub mod userns;

pub use sys::{
    FileHandle, LO_FLAGS_AUTOCLEAR, LO_FLAGS_READ_ONLY, loop_clr_fd, loop_configure,
    loop_ctl_get_free, name_to_handle, open_by_handle, start_writeback,
};

use rustix::mount::{MountAttrFlags, MoveMountFlags, OpenTreeFlags, move_mount, open_tree};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

/// Make the detached mount `mnt` (from `open_tree(OPEN_TREE_CLONE)` or `fsmount`) idmapped:
/// disk ids are shown through the maps, given as the text of `/proc/PID/uid_map` and
/// `gid_map` (lines `DISK VIEW COUNT`). The mount must not be attached yet, so nobody ever
/// sees it with the wrong owners. `attrs` (read-only, nosuid, ...) are set in the same call.
pub fn set_idmap(
    mnt: BorrowedFd<'_>,
    uid_map: &str,
    gid_map: &str,
    attrs: MountAttrFlags,
) -> io::Result<()> {
    let ns = userns::create(uid_map, gid_map)
        .map_err(|e| io::Error::new(e.kind(), format!("user namespace for the id map: {e}")))?;
    sys::mount_setattr_idmap(mnt, ns.as_fd(), u64::from(attrs.bits()))
}

/// Bind-mount the directory `source` on `target` with its ids mapped: a detached clone of
/// `source` (without its submounts) is idmapped, then attached in one step. EINVAL from the
/// idmapping usually means `source`'s filesystem does not support idmapped mounts.
pub fn idmapped_bind(
    source: &Path,
    target: &Path,
    uid_map: &str,
    gid_map: &str,
    attrs: MountAttrFlags,
) -> io::Result<()> {
    let clone = open_tree(
        rustix::fs::CWD,
        source,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )
    .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("open_tree: {e}")))?;
    set_idmap(clone.as_fd(), uid_map, gid_map, attrs)?;
    move_mount(
        &clone,
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("move_mount: {e}")))
}
