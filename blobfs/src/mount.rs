//! `blobfs mount` and `mount.blobfs`: option handling, daemonizing, serving, clean shutdown.

use crate::fuse::{BlobFs, Layout, Owner};
use crate::image::{Image, OpenOptions};
use crate::sign;
use crate::store::Store;
use crate::store::fuse::{StoreFs, StoreMountOptions};
use cli_common::CliError;
use cli_common::daemon::{self, Daemon};
use cli_common::options::{self, MountOpt};
use fuser::{MountOption, SessionACL};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The re-executed daemon child is marked by this environment variable.
const DAEMON: Daemon = Daemon::new("BLOBFS_DAEMON_CHILD");

/// Everything a mount needs, after parsing.
#[derive(Debug, Clone)]
pub struct MountRequest {
    pub source: PathBuf,
    pub mountpoint: PathBuf,
    pub keys: Vec<PathBuf>,
    pub options: Vec<MountOpt>,
    pub foreground: bool,
}

/// What is being mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A read-only image (`blobfs mount`, `mount.blobfs`).
    Image,
    /// A writable store directory (`blobfs store mount`, `mount.blobfs-store`).
    Store,
}

#[derive(Debug)]
struct Settings {
    nodelete: bool,
    keys: Vec<PathBuf>,
    layout: Layout,
    owner: Owner,
    acl: SessionACL,
    auto_unmount: bool,
    min_epoch: u64,
    threads: usize,
    vfs: Vec<MountOption>,
    /// Blob data of a thin image comes from here.
    remote: Option<String>,
    remote_timeout: u64,
    /// A store caching the blobs fetched from the remote.
    cache: Option<PathBuf>,
    /// Serve only what the cache holds.
    offline: bool,
}

fn parse_settings(req: &MountRequest, kind: Kind) -> Result<Settings, CliError> {
    let mut s = Settings {
        nodelete: false,
        keys: req.keys.clone(),
        layout: Layout::Flat,
        owner: Owner {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        },
        acl: SessionACL::Owner,
        auto_unmount: false,
        min_epoch: 0,
        threads: 4,
        vfs: Vec::new(),
        remote: None,
        remote_timeout: 30,
        cache: None,
        offline: false,
    };
    for o in &req.options {
        let value = |what: &str| {
            o.value
                .clone()
                .ok_or_else(|| CliError::usage(format!("mount option {} needs a {what}", o.key)))
        };
        let number = |what: &str| -> Result<u64, CliError> {
            value(what)?
                .parse()
                .map_err(|_| CliError::usage(format!("mount option {}: not a number", o.key)))
        };
        let image_only =
            |k: &str| CliError::usage(format!("mount option {k} applies to images, not stores"));
        match o.key.as_str() {
            "key" | "layout" | "min_epoch" | "remote" | "remote_timeout" if kind == Kind::Store => {
                return Err(image_only(&o.key));
            }
            "nodelete" if kind == Kind::Store => s.nodelete = true,
            "key" => s.keys.push(PathBuf::from(value("path")?)),
            "layout" => {
                s.layout = match value("layout")?.as_str() {
                    "flat" => Layout::Flat,
                    "objects" => Layout::Objects,
                    other => {
                        return Err(CliError::usage(format!(
                            "unknown layout {other:?} (expected flat or objects)"
                        )));
                    }
                }
            }
            "uid" => s.owner.uid = id_value(&value("uid")?)?,
            "gid" => s.owner.gid = id_value(&value("gid")?)?,
            "allow_other" => s.acl = SessionACL::All,
            "allow_root" => s.acl = SessionACL::RootAndOwner,
            "auto_unmount" => s.auto_unmount = true,
            "min_epoch" => s.min_epoch = number("number")?,
            "remote" => s.remote = Some(value("URL")?),
            "remote_timeout" => s.remote_timeout = number("number of seconds")?.max(1),
            "cache" => s.cache = Some(PathBuf::from(value("store directory")?)),
            "offline" => s.offline = true,
            "threads" => {
                s.threads = number("number")?.clamp(1, 64) as usize;
            }
            "rw" if kind == Kind::Image => {
                return Err(CliError::usage(
                    "blobfs images are read-only; the rw option is not supported",
                ));
            }
            "ro" if kind == Kind::Store => {
                return Err(CliError::usage(
                    "a store mount accepts new blobs; mount an exported image for read-only use",
                ));
            }
            "ro" | "rw" | "default_permissions" => {}
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
    if s.auto_unmount && s.acl == SessionACL::Owner {
        // fusermount implements auto_unmount and insists on allow_root or allow_other.
        s.acl = SessionACL::RootAndOwner;
    }
    Ok(s)
}

/// The data source of a thin image: the remote, the cache store in front of it, or the cache
/// alone when offline.
#[cfg(feature = "remote")]
fn remote_source(s: &Settings) -> Result<Option<Arc<dyn crate::image::BlobSource>>, CliError> {
    let remote = match &s.remote {
        Some(url) if !s.offline => {
            let opts = crate::remote::RemoteOptions {
                timeout: std::time::Duration::from_secs(s.remote_timeout),
                ..Default::default()
            };
            Some(crate::remote::Remote::open(url, opts).map_err(CliError::failure)?)
        }
        _ => None,
    };
    match &s.cache {
        Some(dir) => {
            let store = Store::open(dir).map_err(CliError::failure)?;
            Ok(Some(crate::remote_cache::CachedRemote::new(store, remote)))
        }
        None if s.offline => Err(CliError::usage(
            "the offline option needs a cache (cache=STORE, --cache STORE)",
        )),
        None => Ok(remote.map(|r| Arc::new(r) as Arc<dyn crate::image::BlobSource>)),
    }
}

#[cfg(not(feature = "remote"))]
fn remote_source(s: &Settings) -> Result<Option<Arc<dyn crate::image::BlobSource>>, CliError> {
    match (&s.remote, &s.cache) {
        (None, None) => Ok(None),
        _ => Err(CliError::usage(
            "this blobfs was built without remote support (feature remote)",
        )),
    }
}

fn id_value(v: &str) -> Result<u32, CliError> {
    v.parse()
        .map_err(|_| CliError::usage(format!("{v:?} is not a numeric user or group id")))
}

/// Validate, then serve in the foreground or as a daemon that returns once the mount is live.
pub fn mount(req: &MountRequest, kind: Kind) -> Result<(), CliError> {
    let settings = parse_settings(req, kind)?;
    let meta = std::fs::metadata(&req.mountpoint)
        .map_err(|e| CliError::failure(format!("mount point {}: {e}", req.mountpoint.display())))?;
    if !meta.is_dir() {
        return Err(CliError::failure(format!(
            "mount point {} is not a directory",
            req.mountpoint.display()
        )));
    }
    // Open (and so validate) the source before daemonizing, so a bad image, key or store is
    // reported by the command the user ran, with its exit status.
    let will_serve = req.foreground || DAEMON.is_child();
    match kind {
        Kind::Image => {
            let image = open_image(&req.source, &settings, will_serve)?;
            if !will_serve {
                // A cache store allows one process at a time: release it for the daemon.
                drop(image);
                return DAEMON.spawn();
            }
            let blobs = image.entries().len();
            let fs = BlobFs::new(Arc::new(image), settings.layout, settings.owner);
            serve(fs, req, &settings, true, &format!("{blobs} blobs"))
        }
        Kind::Store => {
            let store = Store::open(&req.source).map_err(CliError::failure)?;
            if !will_serve {
                // The index allows one process at a time: release it for the daemon.
                drop(store);
                return DAEMON.spawn();
            }
            let fs = StoreFs::new(
                Arc::new(store),
                StoreMountOptions {
                    owner: settings.owner,
                    nodelete: settings.nodelete,
                },
            )
            .map_err(CliError::failure)?;
            serve(fs, req, &settings, false, "store")
        }
    }
}

/// Open and validate the image; `report` logs how it was authenticated (only the process that
/// serves it does, so a daemonized mount does not log twice).
fn open_image(path: &Path, s: &Settings, report: bool) -> Result<Image, CliError> {
    let keys = s
        .keys
        .iter()
        .map(|k| sign::load_verifying_key(k))
        .collect::<Result<Vec<_>, _>>()
        .map_err(CliError::failure)?;
    let image = Image::open(
        path,
        &OpenOptions {
            keys,
            min_epoch: s.min_epoch,
            tree_cache_bytes: None,
            data_source: remote_source(s)?,
        },
    )
    .map_err(CliError::failure)?;
    if image.is_thin() && report {
        let cache = s
            .cache
            .as_ref()
            .map(|c| format!(", cached in {}", c.display()))
            .unwrap_or_default();
        let from = match (&s.remote, s.offline) {
            (Some(url), false) => url.clone(),
            _ => "the cache only (offline)".into(),
        };
        tracing::info!(
            "{}: thin image: blob data from {from}{cache}, every block verified",
            path.display()
        );
    }
    match image.signed_by().filter(|_| report) {
        _ if !report => {}
        Some(id) => tracing::info!(
            "{}: signature verified (key id {})",
            path.display(),
            hex::encode(&id[..8])
        ),
        None => tracing::warn!(
            "{}: image is unsigned (no --key given): every block is still checked against its \
             blob digest, but nothing vouches for which blobs the image contains",
            path.display()
        ),
    }
    Ok(image)
}

fn serve(
    fs: impl fuser::Filesystem,
    req: &MountRequest,
    s: &Settings,
    read_only: bool,
    what: &str,
) -> Result<(), CliError> {
    DAEMON.start_child();
    let mut mount_options = vec![
        MountOption::FSName(req.source.display().to_string()),
        MountOption::Subtype(if read_only { "blobfs" } else { "blobfs-store" }.into()),
        if read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
        MountOption::DefaultPermissions,
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
    let session = fuser::Session::new(fs, &req.mountpoint, &config).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied
            && !nix::unistd::geteuid().is_root()
        {
            " (unprivileged mounts need /dev/fuse to be mode 0666, as udev sets it, and \
             fusermount3 from the fuse3 package)"
        } else {
            ""
        };
        CliError::failure(format!(
            "cannot mount on {}: {e}{hint}",
            req.mountpoint.display()
        ))
    })?;
    if let Some(low_fd) = low_fd {
        // So that a killed daemon's mount really goes (see mount_api::fusermount).
        low_fd.hold_new_socket();
    }
    raise_readahead(&req.mountpoint);
    daemon::unmount_on_signals(&req.mountpoint)?;
    tracing::info!(
        "serving {} ({what}) on {}",
        req.source.display(),
        req.mountpoint.display()
    );
    DAEMON.announce_ready();
    session
        .run()
        .map_err(|e| CliError::failure(format!("FUSE session failed: {e}")))?;
    tracing::info!("{} unmounted", req.mountpoint.display());
    Ok(())
}

/// Read-ahead the size of the largest READ the daemon takes (1 MiB, FUSE_MAX_PAGES), instead
/// of the 128 KiB default of a FUSE mount's backing device: a sequential reader then costs a
/// quarter of the requests, each verified in one go. Root only (sysfs); failures only logged.
/// The device number comes from mountinfo: a stat of the mount point would wait for the
/// session, which has not started yet.
fn raise_readahead(mountpoint: &Path) {
    let Ok(canon) = std::fs::canonicalize(mountpoint) else {
        return;
    };
    let escaped = canon
        .to_string_lossy()
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let Some(dev) = info
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(4) == Some(&escaped.as_str())).then(|| f.get(2).map(|d| d.to_string()))
        })
        .flatten()
        .last()
    else {
        return;
    };
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, "1024") {
        tracing::debug!("read-ahead left at the default ({path}: {e})");
    }
}

/// Parse the mount(8) helper calling convention:
/// `mount.blobfs SOURCE DIR [-sfnv] [-N NAMESPACE] [-o OPTIONS] [-t TYPE]`.
pub fn parse_helper_args(args: &[std::ffi::OsString]) -> Result<MountRequest, CliError> {
    let mut positional = Vec::new();
    let mut opts = Vec::new();
    let mut foreground = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("-o") => {
                let v = it
                    .next()
                    .ok_or_else(|| CliError::usage("-o needs an option string"))?;
                opts.extend(options::parse(&v.to_string_lossy()));
            }
            Some("-t" | "-N") => {
                it.next();
            }
            Some("-f") => foreground = true,
            Some("-s" | "-n" | "-v" | "-r" | "-w") => {}
            Some("-h" | "--help") => {
                return Err(CliError::usage(
                    "usage: mount.blobfs IMAGE DIR [-o key=PUB.pem,layout=objects,uid=N,...]\n       \
                     mount.blobfs-store STORE DIR [-o nodelete,uid=N,...]",
                ));
            }
            Some(s) if s.starts_with('-') && s.len() > 1 => {
                return Err(CliError::usage(format!("unknown option {s}")));
            }
            _ => positional.push(PathBuf::from(a)),
        }
    }
    let [image, mountpoint] = <[PathBuf; 2]>::try_from(positional)
        .map_err(|_| CliError::usage("usage: mount.blobfs[-store] SOURCE DIR [-o OPTIONS]"))?;
    Ok(MountRequest {
        source: image,
        mountpoint,
        keys: Vec::new(),
        options: opts,
        foreground,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(o: &str) -> MountRequest {
        MountRequest {
            source: "i".into(),
            mountpoint: "m".into(),
            keys: vec![],
            options: options::parse(o),
            foreground: true,
        }
    }

    #[test]
    fn options_are_parsed_and_checked() {
        let s = parse_settings(
            &req("ro,layout=objects,uid=7,gid=8,key=/k,noauto,nodev"),
            Kind::Image,
        )
        .unwrap();
        assert_eq!(s.layout, Layout::Objects);
        assert_eq!((s.owner.uid, s.owner.gid), (7, 8));
        assert_eq!(s.keys, vec![PathBuf::from("/k")]);
        for bad in ["rw", "layout=tree", "uid=bob", "frobnicate", "key"] {
            let e = parse_settings(&req(bad), Kind::Image).unwrap_err();
            assert_eq!(e.code, cli_common::EXIT_USAGE, "{bad}");
        }
        let s = parse_settings(&req("auto_unmount"), Kind::Image).unwrap();
        assert_eq!(s.acl, SessionACL::RootAndOwner);
        assert!(
            parse_settings(&req("nodelete,rw"), Kind::Store)
                .unwrap()
                .nodelete
        );
        for bad in ["ro", "key=/k", "layout=objects", "nodelete_typo"] {
            assert!(parse_settings(&req(bad), Kind::Store).is_err(), "{bad}");
        }
        assert!(parse_settings(&req("nodelete"), Kind::Image).is_err());
    }

    #[test]
    fn helper_arguments() {
        let args: Vec<std::ffi::OsString> =
            ["img", "/mnt", "-n", "-o", "ro,key=/k", "-t", "blobfs"]
                .iter()
                .map(Into::into)
                .collect();
        let r = parse_helper_args(&args).unwrap();
        assert_eq!(r.source, PathBuf::from("img"));
        assert_eq!(r.options.len(), 2);
        assert!(parse_helper_args(&args[..1]).is_err());
    }
}
