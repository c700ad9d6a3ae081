//! The kernel path: a detached mount of the whole filesystem, the subdir resolved inside it, and
//! a clone of only that subdir attached on the target.
//!
//! Order of operations (every step before the last can fail without leaving anything behind):
//! 1. open the target (`O_PATH|O_DIRECTORY`) and refuse one that is already a mount point;
//! 2. `fsopen(FSTYPE)`; attach an image file to a loop device (autoclear);
//! 3. `fsconfig` the source and options, `FSCONFIG_CMD_CREATE`, `fsmount` with the mount
//!    attributes: a detached mount, in no namespace anyone can see;
//! 4. `openat2(subdir, RESOLVE_BENEATH|RESOLVE_NO_XDEV|RESOLVE_NO_MAGICLINKS)` relative to it;
//! 5. `open_tree(OPEN_TREE_CLONE)` of the subdir (Linux 6.15+; older kernels: see
//!    [`clone_in_private_namespace`]), then the detached top level is closed and dissolves;
//! 6. with id maps, `mount_setattr(MOUNT_ATTR_IDMAP)` on the still-detached clone;
//! 7. `move_mount` of the clone onto the target fd: the one step that makes anything visible.

use crate::fuse::DAEMON;
use crate::idmap;
use crate::request::{self, FsParam, Plan, Request};
use cli_common::CliError;
use mount_api::loopdev::LoopDevice;
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, StatxAttributes, StatxFlags};
use rustix::io::Errno;
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MoveMountFlags, OpenTreeFlags, fsconfig_create, fsconfig_set_flag,
    fsconfig_set_string, fsmount, fsopen, move_mount, open_tree,
};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::Command;

/// Set (to anything) to take the pre-6.15 private-namespace path even on a newer kernel; for
/// testing that path.
pub const FORCE_NS_FALLBACK_ENV: &str = "SUBDIR_MOUNT_FORCE_NS_FALLBACK";

fn fail(msg: String) -> CliError {
    CliError::failure(msg)
}

/// Mount `req`. On error nothing is left mounted or attached.
pub fn mount(req: &Request) -> Result<(), CliError> {
    let plan = request::plan(req)?;
    let target = open_target(&req.target)?;
    let image = source_is_image(&req.source)?;
    let fstype = match &plan.fstype {
        Some(t) => t.clone(),
        None => probe_fstype(&req.source)?,
    };
    if req.fake {
        tracing::info!("-f given: not mounting");
        return Ok(());
    }
    // Everything that can be checked without mounting was checked by the command the user
    // ran; the FUSE daemon does the rest and reports its own errors before it detaches.
    if plan.fuse && !(req.foreground || DAEMON.is_child()) {
        return DAEMON.spawn();
    }
    DAEMON.start_child();
    let fs = fsopen(fstype.as_str(), FsOpenFlags::FSOPEN_CLOEXEC).map_err(|e| match e {
        Errno::NODEV => fail(format!(
            "unknown filesystem type {fstype:?} (not in /proc/filesystems)"
        )),
        e => fail(format!("fsopen({fstype}): {e}")),
    })?;
    // Declared before the mount fds are created, so on failure those are closed first and the
    // loop device is detached last.
    let loopdev = if image {
        Some(LoopDevice::attach(&req.source, plan.read_only).map_err(CliError::failure)?)
    } else {
        None
    };
    let device = match &loopdev {
        Some(l) => l.path().to_owned(),
        None => req.source.clone(),
    };
    let clone = detached_subdir(fs, &fstype, &device, req, &plan)?;
    let keep_loop = |loopdev: Option<LoopDevice>, holder: &str| {
        if let Some(l) = loopdev {
            tracing::info!(
                "{} is attached to {}, released when {holder}",
                req.source.display(),
                l.path().display(),
            );
            l.keep();
        }
    };
    if plan.fuse {
        keep_loop(loopdev, "the FUSE daemon exits (at unmount)");
        return crate::fuse::serve(clone, req, &plan, &fstype);
    }
    attach(clone, &fstype, req, &plan, &target)?;
    keep_loop(loopdev, &format!("{} is unmounted", req.target.display()));
    tracing::info!(
        "mounted {} of {} ({fstype}) on {}",
        plan.subdir,
        req.source.display(),
        req.target.display()
    );
    Ok(())
}

/// Open the mount point; it must be a directory and not already a mount point.
fn open_target(path: &Path) -> Result<OwnedFd, CliError> {
    let fd = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        let p = path.display();
        match e {
            Errno::NOENT => fail(format!("mount point {p} does not exist")),
            Errno::NOTDIR => fail(format!("mount point {p} is not a directory")),
            e => fail(format!("mount point {p}: {e}")),
        }
    })?;
    let st = rustix::fs::statx(&fd, "", AtFlags::EMPTY_PATH, StatxFlags::BASIC_STATS)
        .map_err(|e| fail(format!("mount point {}: {e}", path.display())))?;
    let mask = st.stx_attributes_mask;
    let attrs = st.stx_attributes;
    if mask.contains(StatxAttributes::MOUNT_ROOT) && attrs.contains(StatxAttributes::MOUNT_ROOT) {
        return Err(fail(format!(
            "mount point {} is busy: a filesystem is already mounted on it (unmount it first)",
            path.display()
        )));
    }
    Ok(fd)
}

/// True for an image file (to attach to a loop device), false for a block device.
fn source_is_image(source: &Path) -> Result<bool, CliError> {
    let meta = std::fs::metadata(source).map_err(|e| {
        fail(match e.kind() {
            std::io::ErrorKind::NotFound => format!("source {} does not exist", source.display()),
            _ => format!("source {}: {e}", source.display()),
        })
    })?;
    let ft = meta.file_type();
    if ft.is_block_device() {
        Ok(false)
    } else if ft.is_file() {
        Ok(true)
    } else {
        Err(fail(format!(
            "source {} is neither a block device nor an image file",
            source.display()
        )))
    }
}

/// Ask blkid for the filesystem type, as mount(8) does when no type is given.
fn probe_fstype(source: &Path) -> Result<String, CliError> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(source)
        .output();
    let t = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        _ => String::new(),
    };
    if t.is_empty() || t.contains(char::is_whitespace) {
        return Err(fail(format!(
            "cannot tell the filesystem type of {} (blkid found none): give -t FSTYPE",
            source.display()
        )));
    }
    tracing::debug!("{}: blkid says {t}", source.display());
    Ok(t)
}

/// Messages the filesystem left in the fs context (`e ext4: ...`), for error reports.
fn fs_log(fs: &OwnedFd) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = rustix::io::read(fs, &mut buf) {
        if n == 0 || out.len() > 32 {
            break;
        }
        out.push(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned());
    }
    out
}

fn with_log(msg: String, fs: &OwnedFd) -> CliError {
    let log = fs_log(fs);
    if log.is_empty() {
        fail(msg)
    } else {
        fail(format!("{msg} (kernel: {})", log.join("; ")))
    }
}

/// Steps 3 to 5 of the module documentation: a detached clone of the subdir, the only
/// reference to the filesystem that remains.
fn detached_subdir(
    fs: OwnedFd,
    fstype: &str,
    device: &Path,
    req: &Request,
    plan: &Plan,
) -> Result<OwnedFd, CliError> {
    let src = req.source.display();
    fsconfig_set_string(&fs, "source", device)
        .map_err(|e| with_log(format!("{fstype}: cannot use {src} as source: {e}"), &fs))?;
    if plan.read_only {
        fsconfig_set_flag(&fs, "ro")
            .map_err(|e| with_log(format!("{fstype}: option ro: {e}"), &fs))?;
    }
    for p in &plan.fs_params {
        let (r, name) = match p {
            FsParam::Flag(k) => (fsconfig_set_flag(&fs, k.as_str()), k.clone()),
            FsParam::String(k, v) => (
                fsconfig_set_string(&fs, k.as_str(), v.as_str()),
                format!("{k}={v}"),
            ),
        };
        r.map_err(|e| with_log(format!("{fstype}: mount option {name}: {e}"), &fs))?;
    }
    fsconfig_create(&fs).map_err(|e| {
        let hint = match e {
            Errno::INVAL => " (wrong filesystem type, bad option, or damaged filesystem)",
            Errno::ROFS => " (the device is read-only: use -o ro)",
            _ => "",
        };
        with_log(format!("cannot mount {src} as {fstype}: {e}{hint}"), &fs)
    })?;
    let top = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, plan.attrs)
        .map_err(|e| with_log(format!("fsmount of {src}: {e}"), &fs))?;
    drop(fs);
    let sub = resolve_subdir(&top, plan, req)?;
    let clone = clone_subdir(&top, &sub, &req.target)?;
    // The detached top level dissolves here: nothing but the clone remains.
    drop(sub);
    drop(top);
    Ok(clone)
}

/// Steps 6 and 7: idmap the clone if asked, then attach it on the target.
fn attach(
    clone: OwnedFd,
    fstype: &str,
    req: &Request,
    plan: &Plan,
    target: &OwnedFd,
) -> Result<(), CliError> {
    if plan.idmapped() {
        mount_api::set_idmap(
            clone.as_fd(),
            &idmap::proc_map_text(&plan.uid_map),
            &idmap::proc_map_text(&plan.gid_map),
            rustix::mount::MountAttrFlags::empty(),
        )
        .map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::EINVAL) {
                format!(" ({fstype} may not support idmapped mounts)")
            } else {
                String::new()
            };
            fail(format!("cannot make the mount idmapped: {e}{hint}"))
        })?;
        tracing::debug!("idmapped: uid {:?}, gid {:?}", plan.uid_map, plan.gid_map);
    }
    move_mount(
        &clone,
        "",
        target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(|e| fail(format!("cannot attach on {}: {e}", req.target.display())))
}

/// Step 4: open the subdir inside the detached mount, refusing escapes.
fn resolve_subdir(top: &OwnedFd, plan: &Plan, req: &Request) -> Result<OwnedFd, CliError> {
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_XDEV | ResolveFlags::NO_MAGICLINKS;
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let s = &plan.subdir;
    let src = req.source.display();
    let mut attempts = 0;
    let sub = loop {
        match rustix::fs::openat2(top, plan.subdir_rel.as_str(), flags, Mode::empty(), resolve) {
            Ok(fd) => break fd,
            // A concurrent rename while resolving `..`: the kernel asks us to retry.
            Err(Errno::AGAIN) if attempts < 16 => attempts += 1,
            Err(e) => {
                return Err(fail(match e {
                    Errno::NOENT => format!("subdir {s} does not exist on {src}"),
                    Errno::NOTDIR => format!("subdir {s} on {src} is not a directory"),
                    Errno::XDEV => format!(
                        "subdir {s} on {src} leads outside the filesystem (through '..' or a \
                         symbolic link): refused"
                    ),
                    Errno::LOOP => format!(
                        "subdir {s} on {src}: a magic link, or too many levels of symbolic \
                         links: refused"
                    ),
                    Errno::NOSYS => "openat2 is not available (Linux 5.6 or later needed)".into(),
                    e => format!("cannot open subdir {s} on {src}: {e}"),
                }));
            }
        }
    };
    let id = |fd: &OwnedFd| rustix::fs::fstat(fd).map(|st| (st.st_dev, st.st_ino));
    let (a, b) = (id(top), id(&sub));
    if let (Ok(a), Ok(b)) = (a, b)
        && a == b
    {
        return Err(fail(format!(
            "subdir {s} on {src} is the top level of the filesystem: refused"
        )));
    }
    Ok(sub)
}

/// Step 5: a detached clone of the subdir.
fn clone_subdir(top: &OwnedFd, sub: &OwnedFd, target: &Path) -> Result<OwnedFd, CliError> {
    let flags = OpenTreeFlags::OPEN_TREE_CLONE
        | OpenTreeFlags::OPEN_TREE_CLOEXEC
        | OpenTreeFlags::AT_EMPTY_PATH;
    if std::env::var_os(FORCE_NS_FALLBACK_ENV).is_some() {
        tracing::info!("{FORCE_NS_FALLBACK_ENV} is set: using the private mount namespace path");
    } else {
        match open_tree(sub, "", flags) {
            Ok(fd) => return Ok(fd),
            Err(Errno::INVAL) => tracing::info!(
                "this kernel cannot clone from a detached mount (Linux < 6.15): attaching \
                 the filesystem in a private mount namespace instead"
            ),
            Err(e) => return Err(fail(format!("open_tree of the subdir: {e}"))),
        }
    }
    clone_in_private_namespace(top, sub, target)
}

/// Pre-6.15 kernels clone only from mounts in the caller's namespace. A helper thread (a
/// thread may unshare its mount namespace alone) enters a fresh mount namespace, makes every
/// mount in it private so nothing propagates out, attaches the top level there (on its copy
/// of the target), clones the subdir and exits; the namespace, and the top level's only
/// attachment with it, dies with the thread. The clone comes back as an fd (fds are shared by
/// all threads).
fn clone_in_private_namespace(
    top: &OwnedFd,
    sub: &OwnedFd,
    target: &Path,
) -> Result<OwnedFd, CliError> {
    use nix::mount::MsFlags;
    let flags = OpenTreeFlags::OPEN_TREE_CLONE
        | OpenTreeFlags::OPEN_TREE_CLOEXEC
        | OpenTreeFlags::AT_EMPTY_PATH;
    let work = || -> Result<OwnedFd, String> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
            .map_err(|e| format!("unshare(CLONE_NEWNS): {e}"))?;
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(|e| format!("making the private namespace's mounts private: {e}"))?;
        move_mount(
            top,
            "",
            rustix::fs::CWD,
            target,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .map_err(|e| format!("attaching in the private namespace: {e}"))?;
        open_tree(sub, "", flags).map_err(|e| format!("open_tree of the subdir: {e}"))
    };
    std::thread::scope(|s| s.spawn(work).join())
        .map_err(|_| fail("the private-namespace thread panicked".into()))?
        .map_err(|e| fail(format!("private mount namespace fallback: {e}")))
}
