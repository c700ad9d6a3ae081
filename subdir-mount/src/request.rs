//! What to mount, parsed from the command line or from mount(8)'s helper arguments, and
//! checked into a [`Plan`] before anything touches the system.

use crate::cli::Cli;
use crate::idmap::{self, IdRange, MapKind};
use cli_common::CliError;
use cli_common::options::{self, MountOpt};
use rustix::mount::MountAttrFlags;
use std::ffi::OsString;
use std::path::PathBuf;

/// A mount request as given by the user.
#[derive(Debug, Clone)]
pub struct Request {
    pub source: PathBuf,
    pub target: PathBuf,
    pub fstype: Option<String>,
    pub options: Vec<MountOpt>,
    pub uid_map: Vec<IdRange>,
    pub gid_map: Vec<IdRange>,
    pub fuse: bool,
    /// With FUSE, serve in the foreground.
    pub foreground: bool,
    /// mount(8) `-f`: check everything, mount nothing.
    pub fake: bool,
}

impl From<Cli> for Request {
    fn from(cli: Cli) -> Request {
        let mut opts: Vec<MountOpt> = cli.options.iter().flat_map(|o| options::parse(o)).collect();
        if cli.read_only {
            opts.push(MountOpt {
                key: "ro".into(),
                value: None,
            });
        }
        Request {
            source: cli.source,
            target: cli.target,
            fstype: cli.fstype,
            options: opts,
            uid_map: cli.uid_map,
            gid_map: cli.gid_map,
            fuse: cli.fuse,
            foreground: cli.foreground,
            fake: false,
        }
    }
}

/// One parameter for `fsconfig`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsParam {
    Flag(String),
    String(String, String),
}

/// A checked request.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The subdir as the user wrote it (for messages).
    pub subdir: String,
    /// The subdir relative to the filesystem's top (no leading `/`), never empty.
    pub subdir_rel: String,
    pub fstype: Option<String>,
    pub read_only: bool,
    /// Mount attributes for `fsmount` (MOUNT_ATTR_RDONLY is added when `read_only`).
    pub attrs: MountAttrFlags,
    pub fs_params: Vec<FsParam>,
    pub uid_map: Vec<IdRange>,
    pub gid_map: Vec<IdRange>,
    /// Serve through FUSE rather than attaching a kernel mount.
    pub fuse: bool,
    /// Why the view is not injective (then it goes through FUSE, read-only).
    pub many_to_one: Option<String>,
}

impl Plan {
    pub fn idmapped(&self) -> bool {
        !self.uid_map.is_empty() || !self.gid_map.is_empty()
    }
}

pub fn plan(req: &Request) -> Result<Plan, CliError> {
    let mut subdir = None;
    let mut fstype = req.fstype.clone().filter(|t| !t.is_empty());
    let mut read_only = false;
    let mut attrs = MountAttrFlags::empty();
    let mut fs_params = Vec::new();
    let mut uid_map = req.uid_map.clone();
    let mut gid_map = req.gid_map.clone();
    let mut fuse = req.fuse;
    for o in &req.options {
        let value = || {
            o.value
                .clone()
                .ok_or_else(|| CliError::usage(format!("mount option {} needs a value", o.key)))
        };
        let no_value = || match &o.value {
            Some(_) => Err(CliError::usage(format!(
                "mount option {} takes no value",
                o.key
            ))),
            None => Ok(()),
        };
        let range = |v: String| {
            v.parse::<IdRange>()
                .map_err(|e| CliError::usage(format!("mount option {}: {e}", o.key)))
        };
        let atime = |attrs: &mut MountAttrFlags, set: MountAttrFlags| {
            attrs.remove(MountAttrFlags::MOUNT_ATTR__ATIME);
            attrs.insert(set);
        };
        match o.key.as_str() {
            "subdir" => subdir = Some(value()?),
            "fstype" => {
                let t = value()?;
                if let Some(other) = fstype.as_ref().filter(|f| **f != t) {
                    return Err(CliError::usage(format!(
                        "conflicting filesystem types {other:?} and {t:?}"
                    )));
                }
                fstype = Some(t);
            }
            "uidmap" => uid_map.push(range(value()?)?),
            "gidmap" => gid_map.push(range(value()?)?),
            "fuse" => fuse = true,
            "source" => {
                return Err(CliError::usage(
                    "the source is given as an argument, not as mount option source=",
                ));
            }
            "ro" => {
                no_value()?;
                read_only = true;
            }
            "rw" => {
                no_value()?;
                read_only = false;
            }
            "nosuid" => attrs.insert(MountAttrFlags::MOUNT_ATTR_NOSUID),
            "suid" => attrs.remove(MountAttrFlags::MOUNT_ATTR_NOSUID),
            "nodev" => attrs.insert(MountAttrFlags::MOUNT_ATTR_NODEV),
            "dev" => attrs.remove(MountAttrFlags::MOUNT_ATTR_NODEV),
            "noexec" => attrs.insert(MountAttrFlags::MOUNT_ATTR_NOEXEC),
            "exec" => attrs.remove(MountAttrFlags::MOUNT_ATTR_NOEXEC),
            "nosymfollow" => attrs.insert(MountAttrFlags::MOUNT_ATTR_NOSYMFOLLOW),
            "symfollow" => attrs.remove(MountAttrFlags::MOUNT_ATTR_NOSYMFOLLOW),
            "nodiratime" => attrs.insert(MountAttrFlags::MOUNT_ATTR_NODIRATIME),
            "diratime" => attrs.remove(MountAttrFlags::MOUNT_ATTR_NODIRATIME),
            "noatime" => atime(&mut attrs, MountAttrFlags::MOUNT_ATTR_NOATIME),
            "strictatime" => atime(&mut attrs, MountAttrFlags::MOUNT_ATTR_STRICTATIME),
            "relatime" | "atime" => atime(&mut attrs, MountAttrFlags::MOUNT_ATTR_RELATIME),
            k if options::is_fstab_only(k) => {}
            k => fs_params.push(match &o.value {
                Some(v) => FsParam::String(k.to_owned(), v.clone()),
                None => FsParam::Flag(k.to_owned()),
            }),
        }
    }
    let subdir = subdir
        .ok_or_else(|| CliError::usage("missing -o subdir=PATH (the sub-directory to mount)"))?;
    let subdir_rel = subdir.trim_start_matches('/').to_owned();
    if subdir_rel.is_empty() || subdir_rel.split('/').all(|c| c.is_empty() || c == ".") {
        return Err(CliError::usage(format!(
            "subdir={subdir:?} names the top level of the filesystem; use mount(8) for that"
        )));
    }
    if subdir.contains('\0') {
        return Err(CliError::usage("subdir contains a NUL byte"));
    }
    let mut many_to_one = None;
    for (kind, map) in [("uid", &uid_map), ("gid", &gid_map)] {
        if idmap::classify(kind, map)? == MapKind::ManyToOne && many_to_one.is_none() {
            many_to_one = idmap::IdMap::new(map.clone(), idmap::Unmapped::Overflow)
                .non_injective_reason(kind);
        }
    }
    fuse |= many_to_one.is_some();
    if read_only {
        attrs.insert(MountAttrFlags::MOUNT_ATTR_RDONLY);
    }
    Ok(Plan {
        subdir,
        subdir_rel,
        fstype,
        read_only,
        attrs,
        fs_params,
        uid_map,
        gid_map,
        fuse,
        many_to_one,
    })
}

const HELPER_USAGE: &str =
    "usage: mount.subdir SOURCE TARGET [-o subdir=PATH,fstype=TYPE,OPTIONS] [-t subdir.TYPE]";

/// Parse the mount(8) helper calling convention:
/// `mount.subdir SOURCE TARGET [-sfnvrw] [-N NAMESPACE] [-o OPTIONS] [-t TYPE]`. mount(8)
/// passes `-t subdir.TYPE` when the fstab type has a subtype; `-t subdir` names no type.
/// Returns the request and the verbosity.
pub fn parse_helper_args(args: &[OsString]) -> Result<(Request, u8), CliError> {
    let mut positional = Vec::new();
    let mut opts = Vec::new();
    let mut fstype = None;
    let mut fake = false;
    let mut verbose = 0u8;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("-o") => {
                let v = it
                    .next()
                    .ok_or_else(|| CliError::usage("-o needs an option string"))?;
                opts.extend(options::parse(&v.to_string_lossy()));
            }
            Some("-t") => {
                let v = it
                    .next()
                    .ok_or_else(|| CliError::usage("-t needs a type"))?
                    .to_string_lossy()
                    .into_owned();
                fstype = match v.split_once('.') {
                    Some(("subdir", sub)) => Some(sub.to_owned()),
                    None if v == "subdir" => None,
                    _ => Some(v),
                };
            }
            Some("-N") => {
                return Err(CliError::usage(
                    "mount.subdir: -N (mount in another namespace) is not supported",
                ));
            }
            Some("-r") => opts.push(MountOpt {
                key: "ro".into(),
                value: None,
            }),
            Some("-w") => opts.push(MountOpt {
                key: "rw".into(),
                value: None,
            }),
            Some("-h" | "--help") => return Err(CliError::usage(HELPER_USAGE)),
            Some(s) if s.starts_with('-') && s.len() > 1 && !s.starts_with("--") => {
                // Bundled single-letter flags such as -sn.
                for c in s[1..].chars() {
                    match c {
                        'f' => fake = true,
                        'v' => verbose = verbose.saturating_add(1),
                        's' | 'n' => {}
                        _ => return Err(CliError::usage(format!("unknown option -{c}"))),
                    }
                }
            }
            Some(s) if s.starts_with("--") => {
                return Err(CliError::usage(format!("unknown option {s}")));
            }
            _ => positional.push(PathBuf::from(a)),
        }
    }
    let [source, target] =
        <[PathBuf; 2]>::try_from(positional).map_err(|_| CliError::usage(HELPER_USAGE))?;
    Ok((
        Request {
            source,
            target,
            fstype,
            options: opts,
            uid_map: Vec::new(),
            gid_map: Vec::new(),
            fuse: false,
            foreground: false,
            fake,
        },
        verbose,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(o: &str) -> Request {
        Request {
            source: "img".into(),
            target: "/mnt".into(),
            fstype: None,
            options: options::parse(o),
            uid_map: vec![],
            gid_map: vec![],
            fuse: false,
            foreground: false,
            fake: false,
        }
    }

    #[test]
    fn options_split_into_attributes_and_fs_params() {
        let p = plan(&req(
            "subdir=/foobar,ro,nosuid,nodev,noexec,noatime,errors=remount-ro,noload,noauto,x-a=b",
        ))
        .unwrap();
        assert_eq!(p.subdir_rel, "foobar");
        assert!(p.read_only);
        assert_eq!(
            p.attrs,
            MountAttrFlags::MOUNT_ATTR_RDONLY
                | MountAttrFlags::MOUNT_ATTR_NOSUID
                | MountAttrFlags::MOUNT_ATTR_NODEV
                | MountAttrFlags::MOUNT_ATTR_NOEXEC
                | MountAttrFlags::MOUNT_ATTR_NOATIME
        );
        assert_eq!(
            p.fs_params,
            vec![
                FsParam::String("errors".into(), "remount-ro".into()),
                FsParam::Flag("noload".into())
            ]
        );
        let p = plan(&req("subdir=a/b,ro,rw,fstype=ext4,uidmap=0:1000:1")).unwrap();
        assert!(!p.read_only && p.attrs.is_empty());
        assert_eq!(p.fstype.as_deref(), Some("ext4"));
        assert_eq!(p.subdir_rel, "a/b");
        assert!(p.idmapped());
    }

    #[test]
    fn bad_requests_are_usage_errors() {
        for bad in [
            "ro",
            "subdir",
            "subdir=/",
            "subdir=//./",
            "subdir=/a,ro=1",
            "subdir=/a,source=/dev/x",
            "subdir=/a,uidmap=1:2",
            "subdir=/a,gidmap=0:1000:2,gidmap=1:2000:1",
        ] {
            let e = plan(&req(bad)).unwrap_err();
            assert_eq!(e.code, cli_common::EXIT_USAGE, "{bad}");
        }
        let mut r = req("subdir=/a,fstype=ext4");
        r.fstype = Some("xfs".into());
        assert!(plan(&r).is_err());
    }

    #[test]
    fn many_to_one_maps_and_fuse_option_choose_fuse() {
        let p = plan(&req("subdir=/a,uidmap=0:1000:1,uidmap=5:1000:1")).unwrap();
        assert!(p.fuse && p.many_to_one.is_some());
        let p = plan(&req("subdir=/a,fuse")).unwrap();
        assert!(p.fuse && p.many_to_one.is_none());
        let p = plan(&req("subdir=/a,uidmap=0:1000:1")).unwrap();
        assert!(!p.fuse);
    }

    #[test]
    fn helper_arguments() {
        let args: Vec<OsString> = [
            "/dev/sda1",
            "/home/u",
            "-sn",
            "-o",
            "fstype=ext4,subdir=/foobar,ro",
            "-t",
            "subdir",
        ]
        .iter()
        .map(Into::into)
        .collect();
        let (r, v) = parse_helper_args(&args).unwrap();
        assert_eq!(r.source, PathBuf::from("/dev/sda1"));
        assert_eq!(r.target, PathBuf::from("/home/u"));
        assert_eq!(r.fstype, None);
        assert_eq!(v, 0);
        let p = plan(&r).unwrap();
        assert_eq!(p.fstype.as_deref(), Some("ext4"));
        assert!(p.read_only);
        let args: Vec<OsString> = ["a", "b", "-t", "subdir.xfs", "-v"]
            .iter()
            .map(Into::into)
            .collect();
        let (r, v) = parse_helper_args(&args).unwrap();
        assert_eq!((r.fstype.as_deref(), v), (Some("xfs"), 1));
        assert!(parse_helper_args(&args[..1]).is_err());
        let args: Vec<OsString> = ["a", "b", "-N", "x"].iter().map(Into::into).collect();
        assert!(parse_helper_args(&args).is_err());
    }
}
