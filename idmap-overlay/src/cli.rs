//! Command-line interface of `idmap-overlay` (also used to generate its man page).

use clap::{Parser, ValueEnum};
use fuse_passthrough::idmap::IdRange;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "idmap-overlay",
    version,
    about = "Show a directory with its owners mapped: ids DISK..DISK+COUNT-1 under SOURCE appear \
             as VIEW.. at MOUNTPOINT. Several disk ranges may map onto the same view ids (then \
             the mount is read-only); an injective map gives a read-write mount that maps ids \
             back on chown and file creation. Data goes through FUSE passthrough at native speed.",
    after_help = "Unmapped ids show as 65534 (--unmapped=overflow, as the kernel does) and their \
                  files cannot be written or chowned through the view. The mount always uses \
                  default_permissions (the kernel checks access against the mapped owners) and \
                  allow_other (the point is to serve other users; use -o allow_root to restrict \
                  it). The daemon must run as root.\n\n\
                  Map file (--map-file, -o mapfile=): one range a line, `u DISK VIEW COUNT`, \
                  `g DISK VIEW COUNT` or `b DISK VIEW COUNT` (both); the numbers in \
                  /proc/PID/uid_map column order; `#` starts a comment.\n\n\
                  fstab: `SOURCE MOUNTPOINT fuse.idmap-overlay uidmap=65534:1000:1,\
                  uidmap=50000:1000:1 0 0` (repeat uidmap= / gidmap= for several ranges).\n\n\
                  Exit status: 0 success, 1 failure, 2 usage error."
)]
pub struct Cli {
    /// Directory whose contents are shown.
    pub source: PathBuf,
    /// Directory to mount on.
    pub mountpoint: PathBuf,
    /// Show disk uids DISK..DISK+COUNT-1 as VIEW..VIEW+COUNT-1 (repeatable; disk ranges must
    /// not overlap, view ranges may).
    #[arg(long = "uid-map", value_name = "DISK:VIEW:COUNT")]
    pub uid_map: Vec<IdRange>,
    /// The same for group ids.
    #[arg(long = "gid-map", value_name = "DISK:VIEW:COUNT")]
    pub gid_map: Vec<IdRange>,
    /// Read more ranges from a file (see below).
    #[arg(long = "map-file", value_name = "FILE")]
    pub map_file: Vec<PathBuf>,
    /// How ids outside every range are shown.
    #[arg(long, value_enum, default_value_t = UnmappedArg::Overflow)]
    pub unmapped: UnmappedArg,
    /// Mount options: uidmap=DISK:VIEW:COUNT, gidmap=..., mapfile=FILE, unmapped=MODE, ro,
    /// mode=MODE, allow_root, auto_unmount, threads=N, nopassthrough, and nosuid, nodev, noexec,
    /// noatime.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// How to serve the view: `kernel` is an idmapped bind mount (no daemon; needs an
    /// injective view and a source filesystem that supports idmapped mounts), `fuse` the FUSE
    /// daemon (any map), `auto` the kernel when it can, FUSE otherwise. Also -o mode=MODE.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,
    /// Short for --mode kernel.
    #[arg(long, conflicts_with = "mode")]
    pub kernel: bool,
    /// Stay in the foreground instead of detaching once the mount is live.
    #[arg(short, long)]
    pub foreground: bool,
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum UnmappedArg {
    /// Show them as 65534; not writable through the view.
    Overflow,
    /// Show them unchanged.
    Identity,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// A kernel idmapped mount when possible, else FUSE.
    Auto,
    /// A kernel idmapped mount (mount_setattr(MOUNT_ATTR_IDMAP)), or fail.
    Kernel,
    /// The FUSE passthrough daemon.
    Fuse,
}
