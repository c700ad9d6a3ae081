//! Making `-o auto_unmount` reliable when a FUSE daemon is killed.
//!
//! With auto_unmount, fusermount3 stays behind the daemon, holding one end of a Unix socket
//! to it. When that socket closes it unmounts, but only if opening the mount point fails with
//! ENOTCONN, that is only if the FUSE connection is already dead (so that a clean unmount
//! followed by an autofs remount is never undone). The connection dies when the daemon's last
//! /dev/fuse descriptor is released. A killed process closes its descriptors in ascending
//! order, and the kernel runs the deferred releases in reverse (`task_work_run` is LIFO), so
//! the lowest descriptor is released last. fuser's end of the socket is numbered above the
//! /dev/fuse descriptor it received, so fusermount3 can wake while the connection is still
//! alive; its open() then fails with ECONNABORTED instead, and the dead mount stays.
//! Measured: 1 SIGKILL in 20 to 60 left the mount behind.
//!
//! The fix: [`reserve_low_fd`] before the session is created takes a descriptor number below
//! the ones the mount will use; [`LowFd::hold_new_socket`] afterwards moves the socket there
//! and leaves /dev/null under its old number (which fuser closes when it is done), so the
//! socket is released after every /dev/fuse descriptor.

use std::collections::HashSet;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// A descriptor number taken before the mount (holding /dev/null), with the sockets that
/// were open then. The socket the mount adds is told apart by being new: a socketpair's peer
/// credentials name its creator, this process, not fusermount3.
#[derive(Debug)]
pub struct LowFd {
    placeholder: Option<OwnedFd>,
    sockets_before: HashSet<(RawFd, String)>,
}

/// Call right before creating the FUSE session (with auto_unmount).
pub fn reserve_low_fd() -> LowFd {
    LowFd {
        placeholder: fs::File::open("/dev/null").ok().map(OwnedFd::from),
        sockets_before: sockets().into_iter().collect(),
    }
}

impl LowFd {
    /// After the session exists: move the one new socket of this process's own socketpair
    /// (fuser's end of the fusermount3 link) to the reserved number, for the rest of the
    /// process's life. Returns whether it did.
    pub fn hold_new_socket(mut self) -> bool {
        let Some(placeholder) = self.placeholder.take() else {
            return false;
        };
        let low = placeholder.as_raw_fd();
        let me = std::process::id() as i32;
        let new: Vec<RawFd> = sockets()
            .into_iter()
            .filter(|s| !self.sockets_before.contains(s))
            .map(|(fd, _)| fd)
            .filter(|&fd| crate::sys::socket_peer_pid(fd).is_ok_and(|pid| pid == me))
            .collect();
        let [fd] = new[..] else {
            tracing::debug!("auto_unmount: {} new sockets, none moved", new.len());
            return false;
        };
        if fd < low {
            return true; // already below the /dev/fuse descriptors it was opened before
        }
        // The socket moves to `low`, then /dev/null (still open under `low` until the first
        // dup3) takes its old number: nothing is ever closed that someone still uses.
        let null = match placeholder.try_clone() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("auto_unmount: cannot move the fusermount3 socket: {e}");
                return false;
            }
        };
        if let Err(e) = crate::sys::replace_fd(fd, low) {
            tracing::warn!("auto_unmount: cannot move the fusermount3 socket: {e}");
            return false;
        }
        // `low` now holds the socket for good: never closed by us.
        std::mem::forget(placeholder);
        if let Err(e) = crate::sys::replace_fd(null.as_raw_fd(), fd) {
            tracing::warn!("auto_unmount: socket copy left under {fd}: {e}");
        }
        tracing::debug!("auto_unmount: fusermount3 socket moved from {fd} to {low}");
        true
    }
}

/// This process's socket descriptors, with the inode text `socket:[N]` they refer to.
fn sockets() -> Vec<(RawFd, String)> {
    let Ok(dir) = fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| {
            let fd = entry.file_name().to_str()?.parse::<RawFd>().ok()?;
            let target = fs::read_link(entry.path())
                .ok()?
                .to_string_lossy()
                .into_owned();
            target.starts_with("socket:").then_some((fd, target))
        })
        .collect()
}
