//! Settings from the command line and `-o`, daemonizing, serving, clean shutdown.

use crate::cli::{Cli, Mode, UnmappedArg};
use cli_common::CliError;
use cli_common::daemon::{self, Daemon};
use cli_common::options::{self, MountOpt};
use fuse_passthrough::idmap::{self, IdMap, IdRange, Unmapped};
use fuse_passthrough::{Mapping, Options, PassthroughFs};
use fuser::{MountOption, SessionACL};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The re-executed daemon child is marked by this environment variable.
const DAEMON: Daemon = Daemon::new("IDMAP_OVERLAY_DAEMON_CHILD");

/// Everything the daemon needs, after parsing and checking.
#[derive(Debug)]
pub struct Settings {
    pub uid_map: Vec<IdRange>,
    pub gid_map: Vec<IdRange>,
    pub unmapped: Unmapped,
    /// Why the view is not injective (then the mount is read-only).
    pub read_only_reason: Option<String>,
    pub read_only: bool,
    pub acl: SessionACL,
    pub auto_unmount: bool,
    pub threads: usize,
    pub passthrough: bool,
    pub vfs: Vec<MountOption>,
    pub mode: Mode,
}

fn read_map_file(
    path: &Path,
    uids: &mut Vec<IdRange>,
    gids: &mut Vec<IdRange>,
) -> Result<(), CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("map file {}: {e}", path.display())))?;
    let (u, g) = idmap::parse_map_file(&text)
        .map_err(|e| CliError::usage(format!("map file {}: {e}", path.display())))?;
    uids.extend(u);
    gids.extend(g);
    Ok(())
}

/// Combine the command line and `-o` options; check the maps.
pub fn settings(cli: &Cli, opts: &[MountOpt]) -> Result<Settings, CliError> {
    let mut uid_map = cli.uid_map.clone();
    let mut gid_map = cli.gid_map.clone();
    for f in &cli.map_file {
        read_map_file(f, &mut uid_map, &mut gid_map)?;
    }
    let mut unmapped = match cli.unmapped {
        UnmappedArg::Overflow => Unmapped::Overflow,
        UnmappedArg::Identity => Unmapped::Identity,
    };
    let mut s = Settings {
        uid_map: Vec::new(),
        gid_map: Vec::new(),
        unmapped,
        read_only_reason: None,
        read_only: false,
        acl: SessionACL::All,
        auto_unmount: false,
        threads: 4,
        passthrough: true,
        vfs: Vec::new(),
        mode: if cli.kernel { Mode::Kernel } else { cli.mode },
    };
    for o in opts {
        let value = || {
            o.value
                .clone()
                .ok_or_else(|| CliError::usage(format!("mount option {} needs a value", o.key)))
        };
        let range = |v: String| {
            v.parse::<IdRange>()
                .map_err(|e| CliError::usage(format!("mount option {}: {e}", o.key)))
        };
        match o.key.as_str() {
            "uidmap" => uid_map.push(range(value()?)?),
            "gidmap" => gid_map.push(range(value()?)?),
            "mapfile" => read_map_file(Path::new(&value()?), &mut uid_map, &mut gid_map)?,
            "unmapped" => {
                unmapped = match value()?.as_str() {
                    "overflow" => Unmapped::Overflow,
                    "identity" => Unmapped::Identity,
                    v => {
                        return Err(CliError::usage(format!(
                            "unmapped={v}: expected overflow or identity"
                        )));
                    }
                }
            }
            "mode" => {
                s.mode = match value()?.as_str() {
                    "auto" => Mode::Auto,
                    "kernel" => Mode::Kernel,
                    "fuse" => Mode::Fuse,
                    v => {
                        return Err(CliError::usage(format!(
                            "mode={v}: expected auto, kernel or fuse"
                        )));
                    }
                }
            }
            "threads" => {
                s.threads = value()?
                    .parse::<usize>()
                    .map_err(|_| CliError::usage("mount option threads: not a number"))?
                    .clamp(1, 64);
            }
            "allow_other" => s.acl = SessionACL::All,
            "allow_root" => s.acl = SessionACL::RootAndOwner,
            "auto_unmount" => s.auto_unmount = true,
            "nopassthrough" => s.passthrough = false,
            "passthrough" => s.passthrough = true,
            "ro" => s.read_only = true,
            "rw" | "default_permissions" => {}
            "nosuid" => s.vfs.push(MountOption::NoSuid),
            "suid" => s.vfs.push(MountOption::Suid),
            "nodev" => s.vfs.push(MountOption::NoDev),
            "dev" => s.vfs.push(MountOption::Dev),
            "noexec" => s.vfs.push(MountOption::NoExec),
            "exec" => s.vfs.push(MountOption::Exec),
            "noatime" => s.vfs.push(MountOption::NoAtime),
            "atime" | "relatime" | "sync" | "async" | "dirsync" => {}
            k if options::is_fstab_only(k) => {}
            k => return Err(CliError::usage(format!("unknown mount option {k:?}"))),
        }
    }
    // Overlapping disk ranges are a usage error; overlapping view ranges are fine.
    idmap::classify("uid", &uid_map)?;
    idmap::classify("gid", &gid_map)?;
    let m = mapping_of(&uid_map, &gid_map, unmapped);
    s.read_only_reason = m
        .uid
        .non_injective_reason("uid")
        .or_else(|| m.gid.non_injective_reason("gid"));
    s.read_only |= s.read_only_reason.is_some();
    s.uid_map = uid_map;
    s.gid_map = gid_map;
    s.unmapped = unmapped;
    Ok(s)
}

fn mapping_of(uids: &[IdRange], gids: &[IdRange], unmapped: Unmapped) -> Mapping {
    Mapping {
        uid: IdMap::new(uids.to_vec(), unmapped),
        gid: IdMap::new(gids.to_vec(), unmapped),
    }
}

/// Validate, then serve in the foreground or as a daemon that returns once the mount is live.
pub fn mount(cli: &Cli) -> Result<(), CliError> {
    let opts: Vec<MountOpt> = cli.options.iter().flat_map(|o| options::parse(o)).collect();
    let s = settings(cli, &opts)?;
    for (what, p) in [("source", &cli.source), ("mount point", &cli.mountpoint)] {
        let meta = std::fs::metadata(p)
            .map_err(|e| CliError::failure(format!("{what} {}: {e}", p.display())))?;
        if !meta.is_dir() {
            return Err(CliError::failure(format!(
                "{what} {} is not a directory",
                p.display()
            )));
        }
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(CliError::failure(
            "idmap-overlay must run as root (it stores files under other users' ids)",
        ));
    }
    if s.mode != Mode::Fuse && !DAEMON.is_child() {
        match kernel_mount(cli, &s) {
            Ok(()) => return Ok(()),
            Err(KernelRefusal::Failed(e)) => return Err(e),
            Err(KernelRefusal::Unsuitable(why)) if s.mode == Mode::Kernel => {
                return Err(CliError::failure(format!("--mode kernel: {why}")));
            }
            Err(KernelRefusal::Unsuitable(why)) => tracing::info!("using FUSE: {why}"),
        }
    }
    if !(cli.foreground || DAEMON.is_child()) {
        return DAEMON.spawn();
    }
    serve(cli, &s)
}

/// Why the kernel path was not taken.
enum KernelRefusal {
    /// It cannot serve this view (auto mode then uses FUSE).
    Unsuitable(String),
    /// It should have worked and failed.
    Failed(CliError),
}

/// Serve the view as a kernel idmapped bind mount: no daemon, native speed for everything.
fn kernel_mount(cli: &Cli, s: &Settings) -> Result<(), KernelRefusal> {
    use KernelRefusal::{Failed, Unsuitable};
    use rustix::mount::MountAttrFlags;
    if let Some(why) = &s.read_only_reason {
        return Err(Unsuitable(format!(
            "the view is not injective ({why}) and kernel idmapped mounts are 1:1"
        )));
    }
    let too_many = || {
        Unsuitable(format!(
            "the map needs more than {} ranges with --unmapped=identity",
            idmap::MAX_EXTENTS
        ))
    };
    let uids = idmap::kernel_ranges(&s.uid_map, s.unmapped).ok_or_else(too_many)?;
    let gids = idmap::kernel_ranges(&s.gid_map, s.unmapped).ok_or_else(too_many)?;
    let mut attrs = MountAttrFlags::empty();
    if s.read_only {
        attrs |= MountAttrFlags::MOUNT_ATTR_RDONLY;
    }
    for o in &s.vfs {
        attrs |= match o {
            MountOption::NoSuid => MountAttrFlags::MOUNT_ATTR_NOSUID,
            MountOption::NoDev => MountAttrFlags::MOUNT_ATTR_NODEV,
            MountOption::NoExec => MountAttrFlags::MOUNT_ATTR_NOEXEC,
            MountOption::NoAtime => MountAttrFlags::MOUNT_ATTR_NOATIME,
            _ => MountAttrFlags::empty(),
        };
    }
    match mount_api::idmapped_bind(
        &cli.source,
        &cli.mountpoint,
        &idmap::proc_map_text(&uids),
        &idmap::proc_map_text(&gids),
        attrs,
    ) {
        Ok(()) => {
            tracing::info!(
                "mounted {} on {} (mode kernel: idmapped bind mount, no daemon; {}; {}; {})",
                cli.source.display(),
                cli.mountpoint.display(),
                describe("uid", &s.uid_map),
                describe("gid", &s.gid_map),
                if s.read_only {
                    "read-only"
                } else {
                    "read-write"
                }
            );
            Ok(())
        }
        Err(e) if e.raw_os_error() == Some(libc_einval()) => Err(Unsuitable(format!(
            "the filesystem of {} does not support idmapped mounts ({e})",
            cli.source.display()
        ))),
        Err(e) => Err(Failed(CliError::failure(format!(
            "idmapped mount of {} on {}: {e}",
            cli.source.display(),
            cli.mountpoint.display()
        )))),
    }
}

fn libc_einval() -> i32 {
    nix::errno::Errno::EINVAL as i32
}

fn describe(kind: &str, ranges: &[IdRange]) -> String {
    if ranges.is_empty() {
        return format!("{kind}s unchanged");
    }
    let list: Vec<String> = ranges.iter().map(ToString::to_string).collect();
    format!("{kind} map {}", list.join(" "))
}

fn serve(cli: &Cli, s: &Settings) -> Result<(), CliError> {
    DAEMON.start_child();
    let map = mapping_of(&s.uid_map, &s.gid_map, s.unmapped);
    let fs = PassthroughFs::new(
        &cli.source,
        Arc::new(map),
        Options {
            read_only: s.read_only,
            passthrough: s.passthrough,
            ttl: Duration::from_secs(1),
        },
    )
    .map_err(|e| CliError::failure(format!("source {}: {e}", cli.source.display())))?;
    let mut mount_options = vec![
        MountOption::FSName(cli.source.display().to_string()),
        MountOption::Subtype("idmap-overlay".into()),
        MountOption::DefaultPermissions,
        if s.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    mount_options.extend(s.vfs.iter().cloned());
    if s.auto_unmount {
        mount_options.push(MountOption::AutoUnmount);
    }
    let mut config = fuser::Config::default();
    config.mount_options = mount_options;
    config.acl = s.acl;
    config.n_threads = Some(s.threads);
    config.clone_fd = true;
    let low_fd = s.auto_unmount.then(mount_api::fusermount::reserve_low_fd);
    let session = fuser::Session::new(fs, &cli.mountpoint, &config).map_err(|e| {
        CliError::failure(format!("cannot mount on {}: {e}", cli.mountpoint.display()))
    })?;
    if let Some(low_fd) = low_fd {
        // So that a killed daemon's mount really goes (see mount_api::fusermount).
        low_fd.hold_new_socket();
    }
    daemon::unmount_on_signals(&cli.mountpoint)?;
    match &s.read_only_reason {
        Some(why) => tracing::warn!("the view is not injective ({why}): mounted read-only"),
        None if s.read_only => tracing::info!("mounted read-only (ro option)"),
        None => tracing::info!("the view is injective: mounted read-write"),
    }
    tracing::info!(
        "serving {} on {} (mode fuse; {}; {}; unmapped ids {})",
        cli.source.display(),
        cli.mountpoint.display(),
        describe("uid", &s.uid_map),
        describe("gid", &s.gid_map),
        match s.unmapped {
            Unmapped::Overflow => "shown as 65534",
            Unmapped::Identity => "unchanged",
        }
    );
    DAEMON.announce_ready();
    session
        .run()
        .map_err(|e| CliError::failure(format!("FUSE session failed: {e}")))?;
    tracing::info!("{} unmounted", cli.mountpoint.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Settings, CliError> {
        let mut argv = vec!["idmap-overlay", "src", "mnt"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| CliError::usage(e.to_string()))?;
        let opts: Vec<MountOpt> = cli.options.iter().flat_map(|o| options::parse(o)).collect();
        settings(&cli, &opts)
    }

    #[test]
    fn many_to_one_is_read_only() {
        let s = parse(&["--uid-map", "65534:1000:1", "--uid-map", "50000:1000:1"]).unwrap();
        assert!(s.read_only && s.read_only_reason.is_some());
        let s = parse(&["-o", "uidmap=65534:1000:1,uidmap=50000:1000:1"]).unwrap();
        assert!(s.read_only);
        let s = parse(&["--uid-map", "0:1000:10", "--gid-map", "0:1000:10"]).unwrap();
        assert!(!s.read_only);
        let s = parse(&["--unmapped", "identity", "--uid-map", "65534:1000:1"]).unwrap();
        assert!(s.read_only);
        let s = parse(&[
            "-o",
            "unmapped=identity,uidmap=65534:1000:1,uidmap=1000:65534:1",
        ])
        .unwrap();
        assert!(!s.read_only);
    }

    #[test]
    fn bad_maps_are_usage_errors() {
        for bad in [
            &["--uid-map", "0:1000:10", "--uid-map", "5:2000:1"][..],
            &["-o", "uidmap=1:2"],
            &["-o", "frobnicate"],
            &["-o", "unmapped=maybe"],
            &["-o", "mode=maybe"],
            &["--kernel", "--mode", "fuse"],
            &["--uid-map", "x:1:1"],
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.code, cli_common::EXIT_USAGE, "{bad:?}");
        }
    }
}
