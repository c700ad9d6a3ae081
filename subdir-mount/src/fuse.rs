//! The FUSE path: the detached clone of the subdir is served by the shared passthrough core
//! (with a many-to-one id map, or when `--fuse` is asked for). The clone's fd, held by this
//! daemon, is the only reference to the filesystem anywhere: it is attached in no mount
//! namespace, and its root is the subdir, so even `/proc/PID/fd/N/..` cannot climb above it.
//! When the FUSE mount goes away the daemon exits, the clone dissolves and the loop device
//! (autoclear) is released.

use crate::idmap::{IdMap, Unmapped};
use crate::request::{Plan, Request};
use cli_common::CliError;
use cli_common::daemon::{self, Daemon};
use fuse_passthrough::{Mapping, Options, PassthroughFs};
use fuser::{MountOption, SessionACL};
use rustix::mount::MountAttrFlags;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

/// The re-executed daemon child is marked by this environment variable.
pub(crate) const DAEMON: Daemon = Daemon::new("SUBDIR_MOUNT_DAEMON_CHILD");

/// Serve `root` (the subdir clone) on the target until it is unmounted.
pub(crate) fn serve(
    root: OwnedFd,
    req: &Request,
    plan: &Plan,
    fstype: &str,
) -> Result<(), CliError> {
    let map = Mapping {
        uid: IdMap::new(plan.uid_map.clone(), Unmapped::Overflow),
        gid: IdMap::new(plan.gid_map.clone(), Unmapped::Overflow),
    };
    let read_only = plan.read_only || plan.many_to_one.is_some();
    let fs = PassthroughFs::from_root(
        root,
        Arc::new(map),
        Options {
            read_only,
            passthrough: true,
            ttl: Duration::from_secs(1),
        },
    )
    .map_err(|e| CliError::failure(format!("serving subdir {}: {e}", plan.subdir)))?;
    let mut mount_options = vec![
        MountOption::FSName(req.source.display().to_string()),
        MountOption::Subtype("subdir".into()),
        MountOption::DefaultPermissions,
        if read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    for (attr, opt) in [
        (MountAttrFlags::MOUNT_ATTR_NOSUID, MountOption::NoSuid),
        (MountAttrFlags::MOUNT_ATTR_NODEV, MountOption::NoDev),
        (MountAttrFlags::MOUNT_ATTR_NOEXEC, MountOption::NoExec),
        (MountAttrFlags::MOUNT_ATTR_NOATIME, MountOption::NoAtime),
    ] {
        if plan.attrs.contains(attr) {
            mount_options.push(opt);
        }
    }
    let mut config = fuser::Config::default();
    config.mount_options = mount_options;
    // Like a kernel mount, the subdir serves every user; permissions are the kernel's.
    config.acl = SessionACL::All;
    config.n_threads = Some(4);
    config.clone_fd = true;
    let session = fuser::Session::new(fs, &req.target, &config)
        .map_err(|e| CliError::failure(format!("cannot mount on {}: {e}", req.target.display())))?;
    daemon::unmount_on_signals(&req.target)?;
    match &plan.many_to_one {
        Some(why) => tracing::warn!("the view is not injective ({why}): mounted read-only"),
        None => tracing::info!("FUSE requested"),
    }
    tracing::info!(
        "serving {} of {} ({fstype}) on {} through FUSE",
        plan.subdir,
        req.source.display(),
        req.target.display()
    );
    DAEMON.announce_ready();
    session
        .run()
        .map_err(|e| CliError::failure(format!("FUSE session failed: {e}")))?;
    tracing::info!("{} unmounted", req.target.display());
    Ok(())
}
