//! FUSE backend, for kernels without ublk: the engine is one file, `image`, on a FUSE mount in
//! the daemon's private mount namespace (nobody else sees it), and that file is attached to a
//! loop device, read-only unless there is an overlay. A killed daemon aborts the FUSE
//! connection: the loop device then fails every I/O with EIO, and autoclear releases it once
//! nothing holds it any more.

use crate::daemon::{Ready, on_signals};
use crate::overlay::Engine;
use cli_common::CliError;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use mount_api as sys;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

const FILE_INO: INodeNo = INodeNo(2);
const FILE_NAME: &str = "image";
const TTL: Duration = Duration::from_secs(3600);

struct ImageFs {
    engine: Arc<Engine>,
    time: SystemTime,
}

fn errno(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

impl ImageFs {
    fn attr(&self, ino: INodeNo) -> FileAttr {
        let dir = ino == INodeNo::ROOT;
        FileAttr {
            ino,
            size: if dir { 0 } else { self.engine.size() },
            blocks: if dir {
                0
            } else {
                self.engine.size().div_ceil(512)
            },
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind: if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: match (dir, self.engine.writable()) {
                (true, _) => 0o500,
                (false, true) => 0o600,
                (false, false) => 0o400,
            },
            nlink: if dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl Filesystem for ImageFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name.as_bytes() == FILE_NAME.as_bytes() {
            reply.entry(&TTL, &self.attr(FILE_INO), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT || ino == FILE_INO {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The file's size is the image's; nothing else about it can change either.
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        if size.is_some_and(|s| s != self.engine.size()) {
            return reply.error(if self.engine.writable() {
                Errno::EPERM
            } else {
                Errno::EROFS
            });
        }
        reply.attr(&TTL, &self.attr(ino));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        if flags.acc_mode() != OpenAccMode::O_RDONLY && !self.engine.writable() {
            return reply.error(Errno::EROFS);
        }
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let end = offset
            .saturating_add(u64::from(size))
            .min(self.engine.size());
        if offset >= end {
            return reply.data(&[]);
        }
        let mut buf = vec![0u8; (end - offset) as usize];
        match self.engine.read_at(&mut buf, offset) {
            Ok(()) => reply.data(&buf),
            Err(e) => {
                tracing::error!("read at {offset}: {e}");
                reply.error(errno(&e))
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.engine.write_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => {
                tracing::warn!("write at {offset}+{}: {e}", data.len());
                reply.error(errno(&e))
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _ds: bool, reply: ReplyEmpty) {
        match self.engine.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, FILE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

fn fail(msg: String) -> CliError {
    CliError::failure(msg)
}

/// Attach `file` to a free loop device.
fn attach_loop(
    file: &File,
    read_only: bool,
    block_size: u32,
    name: &str,
) -> Result<(File, String), CliError> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(|e| fail(format!("cannot open /dev/loop-control: {e}")))?;
    let mut flags = sys::LO_FLAGS_AUTOCLEAR;
    if read_only {
        flags |= sys::LO_FLAGS_READ_ONLY;
    }
    let mut last = String::from("no free loop device");
    // Another process may take the free device between GET_FREE and CONFIGURE: ask again.
    for _ in 0..16 {
        let n = sys::loop_ctl_get_free(control.as_fd())
            .map_err(|e| fail(format!("cannot allocate a loop device: {e}")))?;
        let path = format!("/dev/loop{n}");
        let dev = match OpenOptions::new().read(true).write(!read_only).open(&path) {
            Ok(d) => d,
            Err(e) => {
                last = format!("cannot open {path}: {e}");
                continue;
            }
        };
        match sys::loop_configure(
            dev.as_fd(),
            file.as_fd(),
            flags,
            block_size,
            name.as_bytes(),
        ) {
            Ok(()) => return Ok((dev, path)),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = format!("{path}: {e}"),
            Err(e) => return Err(fail(format!("cannot attach to {path}: {e}"))),
        }
    }
    Err(fail(last))
}

fn mount_dir(pid: u32) -> PathBuf {
    crate::state::dir().join(format!("fuse.{pid}"))
}

/// Clean up after daemon `pid`, which died: detach its loop device unless autoclear did it
/// already. The device number may have been reused since, so only a device still backed by
/// that daemon's FUSE file is touched.
pub fn release_loop(device: &str, pid: u32) {
    let dir = mount_dir(pid);
    let backing = format!(
        "/sys/block/{}/loop/backing_file",
        device.trim_start_matches("/dev/")
    );
    let ours = std::fs::read_to_string(&backing)
        .is_ok_and(|b| Path::new(b.trim_end()) == dir.join(FILE_NAME));
    if ours && let Ok(f) = File::open(device) {
        let _ = sys::loop_clr_fd(f.as_fd());
    }
    let _ = std::fs::remove_dir(dir);
}

/// Serve until a signal asks to detach.
pub fn serve(engine: Arc<Engine>, block_size: u32, ready: Ready) -> Result<(), CliError> {
    let dir = mount_dir(std::process::id());
    std::fs::create_dir_all(&dir)
        .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
    let result = serve_in(&engine, block_size, ready, &dir);
    let _ = std::fs::remove_dir(&dir);
    result
}

fn serve_in(
    engine: &Arc<Engine>,
    block_size: u32,
    ready: Ready,
    dir: &Path,
) -> Result<(), CliError> {
    let writable = engine.writable();
    let name = engine.image().path().display().to_string();
    let fs = ImageFs {
        engine: engine.clone(),
        time: SystemTime::now(),
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName(name.clone()),
        MountOption::Subtype("loop-immutable".into()),
        if writable {
            MountOption::RW
        } else {
            MountOption::RO
        },
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoExec,
    ];
    config.n_threads = Some(2);
    let session = fuser::Session::new(fs, dir, &config).map_err(|e| {
        fail(format!(
            "cannot mount the FUSE file (is /dev/fuse there?): {e}"
        ))
    })?;
    let bg = session
        .spawn()
        .map_err(|e| fail(format!("cannot start the FUSE session: {e}")))?;
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(dir.join(FILE_NAME))
        .map_err(|e| fail(format!("cannot open the FUSE file: {e}")))?;
    let (dev, path) = attach_loop(&file, !writable, block_size, &name)?;
    drop(file);
    let (tx, rx) = mpsc::channel::<()>();
    on_signals(move || {
        let _ = tx.send(());
    })?;
    ready(&path, None)?;
    let _ = rx.recv();
    // `detach` checked that nothing holds the device; the kernel defers the detach otherwise.
    if let Err(e) = sys::loop_clr_fd(dev.as_fd()) {
        tracing::warn!("detaching {path}: {e}");
    }
    drop(dev);
    // The loop device drops its file reference asynchronously: wait for it before unmounting.
    let sys_backing = format!(
        "/sys/block/{}/loop/backing_file",
        path.trim_start_matches("/dev/")
    );
    for _ in 0..200 {
        if !Path::new(&sys_backing).exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(bg);
    Ok(())
}
