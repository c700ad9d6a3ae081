//! Command-line interface of `subdir-mount` (also used to generate its man page).

use crate::idmap::IdRange;
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "subdir-mount",
    version,
    about = "Mount one sub-directory of a filesystem without ever exposing its top level",
    long_about = "Mount one sub-directory of a filesystem without ever exposing its top level.\n\n\
        The filesystem is mounted detached (fsopen/fsconfig/fsmount), the sub-directory is \
        resolved inside it with openat2(RESOLVE_BENEATH|RESOLVE_NO_XDEV|RESOLVE_NO_MAGICLINKS), \
        and only a clone of that sub-directory (open_tree) is attached on TARGET (move_mount). \
        The top level of the filesystem is never attached in any mount namespace. On kernels \
        older than 6.15, which refuse to clone from a detached mount, the top level is \
        attached only inside a throwaway private mount namespace.\n\n\
        SOURCE is a block device or an image file; an image file is attached to a loop device \
        (read-only with -o ro) that is detached again when TARGET is unmounted, or at once if \
        the mount fails.\n\n\
        Installed as mount.subdir, it follows mount(8)'s helper convention, for fstab entries \
        such as: SOURCE TARGET subdir fstype=ext4,subdir=/foobar,ro 0 0",
    after_help = "Symbolic links: a subdir path may go through symbolic links that stay inside \
        the filesystem (relative ones that do not climb above its top); '..' or a symbolic \
        link leading outside (any absolute link, or a relative one climbing above the top) is \
        refused, as are magic links and crossing into other mounts. A subdir that resolves to the \
        top level itself (such as /a/.. or a link to .) is refused too.\n\n\
        Exit status: 0 success, 1 failure (nothing is left mounted or attached), 2 usage error."
)]
pub struct Cli {
    /// Filesystem type (as for mount -t); probed with blkid if not given. Also -o fstype=TYPE.
    #[arg(short = 't', long = "types", value_name = "FSTYPE")]
    pub fstype: Option<String>,
    /// Mount options: subdir=PATH (required); ro, rw, nosuid, nodev, noexec, noatime,
    /// relatime, strictatime, nodiratime, nosymfollow (mount attributes); fstype=TYPE;
    /// uidmap=DISK:VIEW:COUNT and gidmap=... (as --uid-map, for fstab). Everything else is
    /// passed to the filesystem with fsconfig (key=value as a string, key as a flag); fstab-only
    /// options (defaults, noauto, nofail, x-*, ...) are ignored.
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Mount read-only (same as -o ro).
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// Show on-disk user ids DISK..DISK+COUNT-1 as VIEW..VIEW+COUNT-1 (repeatable). An
    /// injective map becomes a kernel idmapped mount, a many-to-one map a read-only FUSE mount;
    /// ids outside every range show as 65534 and cannot be written. Without any --uid-map, user ids are shown unchanged.
    #[arg(long = "uid-map", value_name = "DISK:VIEW:COUNT")]
    pub uid_map: Vec<IdRange>,
    /// Same as --uid-map, for group ids.
    #[arg(long = "gid-map", value_name = "DISK:VIEW:COUNT")]
    pub gid_map: Vec<IdRange>,
    /// Serve the sub-directory through a FUSE passthrough daemon (also -o fuse). Chosen by
    /// itself for a many-to-one map (several disk ids shown as one view id), which kernel
    /// idmapped mounts cannot do; such a mount is read-only. The daemon holds the only
    /// reference to the filesystem; `umount TARGET` ends it and releases the loop device.
    #[arg(long)]
    pub fuse: bool,
    /// With FUSE: serve in the foreground instead of returning once the mount is live.
    #[arg(short = 'F', long)]
    pub foreground: bool,
    /// More log output (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Block device or filesystem image file.
    pub source: PathBuf,
    /// Directory to mount the sub-directory on.
    pub target: PathBuf,
}
