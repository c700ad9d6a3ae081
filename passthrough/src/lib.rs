//! A FUSE filesystem that passes every request through to a SOURCE directory, showing owners
//! through an id mapping ([`IdMapper`]).
//!
//! Confinement: the daemon never resolves a path. It holds an `O_PATH` descriptor for every
//! object the kernel knows (its inode table, as virtiofsd does) and reaches a child only with
//! `openat2(parent, name, O_NOFOLLOW, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` of one name
//! component, so a directory swapped for a symlink while a request runs is seen as the symlink
//! it now is, never followed. Files are opened again through `/proc/self/fd/N` of their own
//! descriptor (only regular files and directories: the type of an inode never changes).
//!
//! Data: when the kernel and the daemon's privileges allow it, opened regular files use FUSE
//! passthrough (kernel >= 6.9, CAP_SYS_ADMIN), so reads and writes never reach the daemon;
//! otherwise `pread`/`pwrite` on the daemon's descriptor, from several threads.
//!
//! New objects are created by the daemon (root) and then given the caller's ids mapped back
//! to disk ids, so the mapping must be injective for a writable mount.

pub mod idmap;
pub mod xattr_ids;

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use idmap::IdMap;
use rustix::fs::{self as rfs, AtFlags, Gid, Mode, OFlags, ResolveFlags, Stat, Uid};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use xattr_ids::Direction;

/// Maps owner ids between the disk (SOURCE) and the view (the mount).
pub trait IdMapper: Send + Sync + 'static {
    fn uid_to_view(&self, disk: u32) -> u32;
    fn gid_to_view(&self, disk: u32) -> u32;
    /// The disk id to store for a view id; `None` if it has none (EOVERFLOW).
    fn uid_to_disk(&self, view: u32) -> Option<u32>;
    fn gid_to_disk(&self, view: u32) -> Option<u32>;
    /// Whether an object owned by these disk ids may be modified through the view (the kernel
    /// refuses writes to objects whose owner has no mapping).
    fn writable_owner(&self, _uid: u32, _gid: u32) -> bool {
        true
    }
}

/// Ids pass unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct Identity;

impl IdMapper for Identity {
    fn uid_to_view(&self, disk: u32) -> u32 {
        disk
    }
    fn gid_to_view(&self, disk: u32) -> u32 {
        disk
    }
    fn uid_to_disk(&self, view: u32) -> Option<u32> {
        Some(view)
    }
    fn gid_to_disk(&self, view: u32) -> Option<u32> {
        Some(view)
    }
}

/// A uid map and a gid map ([`IdMap`]).
#[derive(Debug, Clone)]
pub struct Mapping {
    pub uid: IdMap,
    pub gid: IdMap,
}

impl IdMapper for Mapping {
    fn uid_to_view(&self, disk: u32) -> u32 {
        self.uid.to_view(disk)
    }
    fn gid_to_view(&self, disk: u32) -> u32 {
        self.gid.to_view(disk)
    }
    fn uid_to_disk(&self, view: u32) -> Option<u32> {
        self.uid.to_disk(view)
    }
    fn gid_to_disk(&self, view: u32) -> Option<u32> {
        self.gid.to_disk(view)
    }
    fn writable_owner(&self, uid: u32, gid: u32) -> bool {
        self.uid.is_mapped(uid) && self.gid.is_mapped(gid)
    }
}

/// How the filesystem behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// Refuse every change with EROFS (mount read-only as well).
    pub read_only: bool,
    /// Use FUSE passthrough for file data when the kernel offers it.
    pub passthrough: bool,
    /// How long the kernel may cache attributes and names.
    pub ttl: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            read_only: false,
            passthrough: true,
            ttl: Duration::from_secs(1),
        }
    }
}

struct Inode {
    /// `O_PATH | O_NOFOLLOW` descriptor of the object, while the descriptor budget lasts.
    fd: Option<OwnedFd>,
    /// Beyond it, a file handle that is opened for each use: a tree with more objects than the
    /// process may have open files is still served (the kernel may keep every one of them
    /// looked up).
    handle: Option<mount_api::FileHandle>,
    /// `(st_dev, st_ino)`.
    key: (u64, u64),
    kind: FileType,
    /// The passthrough backing file shared by all open handles of this inode.
    backing: Mutex<Weak<BackingId>>,
}

#[derive(Default)]
struct Table {
    /// nodeid -> (inode, lookup count).
    nodes: HashMap<u64, (Arc<Inode>, u64)>,
    by_key: HashMap<(u64, u64), u64>,
    next: u64,
}

/// A descriptor for an inode: its own, or one opened from its file handle for this use.
enum PathFd<'a> {
    Held(BorrowedFd<'a>),
    Opened(OwnedFd),
}

impl AsFd for PathFd<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            PathFd::Held(fd) => *fd,
            PathFd::Opened(fd) => fd.as_fd(),
        }
    }
}

struct Handle {
    fd: OwnedFd,
    _backing: Option<Arc<BackingId>>,
}

struct DirEntry {
    ino: u64,
    kind: FileType,
    name: Vec<u8>,
}

/// Node ids outside the source's own inode numbers start here.
const SYNTHETIC_BASE: u64 = 1 << 63;
const ROOT: u64 = 1;

/// The passthrough filesystem. Serve it with `fuser::Session`.
pub struct PassthroughFs {
    root_key: (u64, u64),
    table: Mutex<Table>,
    files: Mutex<HashMap<u64, Arc<Handle>>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_fh: AtomicU64,
    /// `/proc/self/fd`, to reopen `O_PATH` descriptors.
    proc_fd: OwnedFd,
    /// The source's root, for `open_by_handle_at`.
    mount_fd: OwnedFd,
    /// Inodes holding a descriptor, and how many may.
    held_fds: AtomicUsize,
    fd_budget: usize,
    map: Arc<dyn IdMapper>,
    opts: Options,
    passthrough_on: AtomicBool,
    passthrough_warned: AtomicBool,
}

fn errno(e: rustix::io::Errno) -> Errno {
    Errno::from_i32(e.raw_os_error())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn fstat(fd: BorrowedFd<'_>) -> Result<Stat, Errno> {
    rfs::statat(fd, "", AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW).map_err(errno)
}

fn kind_of(mode: u32) -> FileType {
    match rfs::FileType::from_raw_mode(mode) {
        rfs::FileType::Directory => FileType::Directory,
        rfs::FileType::Symlink => FileType::Symlink,
        rfs::FileType::Fifo => FileType::NamedPipe,
        rfs::FileType::Socket => FileType::Socket,
        rfs::FileType::CharacterDevice => FileType::CharDevice,
        rfs::FileType::BlockDevice => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec.clamp(0, 999_999_999) as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs())
    }
}

/// One path component: no separators, not `.` or `..`.
fn check_name(name: &OsStr) -> Result<(), Errno> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

/// Every object the kernel has looked up holds a descriptor here: raise the limit on open files
/// as far as allowed (`fs.nr_open` for root; the default 1024 is far too low for a tree of any
/// size, and the kernel keeps looked-up inodes until memory pressure makes it forget them).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let want = hard.max(nr_open);
    if soft < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err() {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) {
        tracing::debug!("open-file limit: {soft}");
    }
}

/// How many inodes may hold a descriptor. The rest of the open-file limit is kept for open
/// files and directory reads: a sixteenth of it, at least 1024, at most half. Past the budget,
/// inodes are kept as file handles, which cost an `open_by_handle_at` at every use: with a
/// 20000-file limit (where the hard limit cannot be raised) half the limit left a 20k-file
/// tree half on handles, and `tar c` of it 10% and `find -ls` 20% slower than this.
fn fd_budget() -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    let soft = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
    budget_for_limit(soft)
}

fn budget_for_limit(limit: u64) -> usize {
    let reserve = (limit / 16).max(1024).min(limit / 2);
    usize::try_from(limit - reserve)
        .unwrap_or(usize::MAX)
        .max(64)
}

impl PassthroughFs {
    /// Serve `source`. Sets the process umask to 0: modes from the kernel are already masked.
    pub fn new(
        source: &Path,
        map: Arc<dyn IdMapper>,
        opts: Options,
    ) -> std::io::Result<PassthroughFs> {
        let root = rfs::open(
            source,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        PassthroughFs::from_root(root, map, opts)
    }

    /// Serve the tree below the directory `root` (an fd, for example the root of a detached
    /// mount that is attached nowhere else). Sets the process umask to 0.
    pub fn from_root(
        root: OwnedFd,
        map: Arc<dyn IdMapper>,
        opts: Options,
    ) -> std::io::Result<PassthroughFs> {
        let proc_fd = rfs::open(
            "/proc/self/fd",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let st = rfs::fstat(&root)?;
        nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        raise_fd_limit();
        let root_key = (st.st_dev, st.st_ino);
        let mut table = Table {
            next: SYNTHETIC_BASE,
            ..Table::default()
        };
        // open_by_handle_at wants a real descriptor on the filesystem, not an O_PATH one.
        let mount_fd = rfs::openat(
            &proc_fd,
            root.as_raw_fd().to_string(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let inode = Inode {
            fd: Some(root),
            handle: None,
            key: root_key,
            kind: FileType::Directory,
            backing: Mutex::new(Weak::new()),
        };
        table.nodes.insert(ROOT, (Arc::new(inode), 1 << 62));
        table.by_key.insert(root_key, ROOT);
        Ok(PassthroughFs {
            root_key,
            table: Mutex::new(table),
            files: Mutex::default(),
            dirs: Mutex::default(),
            next_fh: AtomicU64::new(1),
            proc_fd,
            mount_fd,
            held_fds: AtomicUsize::new(1),
            fd_budget: fd_budget(),
            map,
            passthrough_on: AtomicBool::new(false),
            passthrough_warned: AtomicBool::new(false),
            opts,
        })
    }

    /// Whether file data currently goes through FUSE passthrough.
    pub fn passthrough_active(&self) -> bool {
        self.passthrough_on.load(Ordering::Relaxed)
    }

    fn node(&self, ino: INodeNo) -> Result<Arc<Inode>, Errno> {
        lock(&self.table)
            .nodes
            .get(&ino.0)
            .map(|(n, _)| n.clone())
            .ok_or(Errno::ESTALE)
    }

    /// Add a looked-up object to the table (or count one more lookup of a known one).
    fn insert(&self, fd: OwnedFd, st: &Stat) -> u64 {
        let key = (st.st_dev, st.st_ino);
        let mut t = lock(&self.table);
        if let Some(&id) = t.by_key.get(&key)
            && let Some(entry) = t.nodes.get_mut(&id)
        {
            // A handle-only inode does not pin its inode number: after a delete the number
            // may name a new object, which the handle (with its generation) tells apart.
            let same = match &entry.0.handle {
                Some(h) => mount_api::name_to_handle(fd.as_fd()).is_ok_and(|new| new == *h),
                None => true,
            };
            if same {
                entry.1 += 1;
                return id;
            }
            t.by_key.remove(&key);
        }
        let id = if key == self.root_key {
            ROOT
        } else if key.0 == self.root_key.0
            && key.1 > ROOT
            && key.1 < SYNTHETIC_BASE
            && !t.nodes.contains_key(&key.1)
        {
            key.1
        } else {
            let id = t.next;
            t.next += 1;
            id
        };
        // Over budget, and on the source's own filesystem (the root is the mount fd for
        // open_by_handle_at): keep a file handle instead of the descriptor, if it has one.
        let over = self.held_fds.load(Ordering::Relaxed) >= self.fd_budget;
        let handle = (over && key.0 == self.root_key.0)
            .then(|| mount_api::name_to_handle(fd.as_fd()).ok())
            .flatten();
        let fd = match handle {
            Some(_) => None,
            None => {
                self.held_fds.fetch_add(1, Ordering::Relaxed);
                Some(fd)
            }
        };
        let inode = Inode {
            fd,
            handle,
            key,
            kind: kind_of(st.st_mode),
            backing: Mutex::new(Weak::new()),
        };
        t.nodes.insert(id, (Arc::new(inode), 1));
        t.by_key.insert(key, id);
        id
    }

    #[allow(clippy::unnecessary_cast)]
    fn attr(&self, id: u64, st: &Stat) -> FileAttr {
        FileAttr {
            ino: INodeNo(id),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: time(st.st_atime as i64, st.st_atime_nsec as i64),
            mtime: time(st.st_mtime as i64, st.st_mtime_nsec as i64),
            ctime: time(st.st_ctime as i64, st.st_ctime_nsec as i64),
            crtime: UNIX_EPOCH,
            kind: kind_of(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: self.map.uid_to_view(st.st_uid),
            gid: self.map.gid_to_view(st.st_gid),
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    fn do_lookup(&self, parent: &Inode, name: &OsStr) -> Result<FileAttr, Errno> {
        check_name(name)?;
        let fd = rfs::openat2(
            &self.path_fd(parent)?,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(errno)?;
        let st = fstat(fd.as_fd())?;
        let id = self.insert(fd, &st);
        Ok(self.attr(id, &st))
    }

    /// A descriptor for `node` (`O_PATH`): its own, or opened from its file handle.
    fn path_fd<'a>(&self, node: &'a Inode) -> Result<PathFd<'a>, Errno> {
        if let Some(fd) = &node.fd {
            return Ok(PathFd::Held(fd.as_fd()));
        }
        let h = node.handle.as_ref().ok_or(Errno::ESTALE)?;
        mount_api::open_by_handle(self.mount_fd.as_fd(), h, libc::O_PATH | libc::O_NOFOLLOW)
            .map(PathFd::Opened)
            .map_err(|e| Errno::from_i32(e.raw_os_error().unwrap_or(libc::ESTALE)))
    }

    /// Reopen an object for I/O. Only regular files and directories: a symlink would be
    /// followed by the `/proc` magic link.
    fn reopen(&self, node: &Inode, flags: OFlags) -> Result<OwnedFd, Errno> {
        if !matches!(node.kind, FileType::RegularFile | FileType::Directory) {
            return Err(Errno::EINVAL);
        }
        if let (None, Some(h)) = (&node.fd, &node.handle) {
            let flags = (flags | OFlags::CLOEXEC).bits() as i32;
            return mount_api::open_by_handle(self.mount_fd.as_fd(), h, flags)
                .map_err(|e| Errno::from_i32(e.raw_os_error().unwrap_or(libc::ESTALE)));
        }
        let fd = self.path_fd(node)?;
        rfs::openat(
            &self.proc_fd,
            fd.as_fd().as_raw_fd().to_string(),
            flags | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)
    }

    /// Refuse a change: read-only mount, or an object whose owner has no mapping.
    fn check_change(&self, node: &Inode, denied: Errno) -> Result<Stat, Errno> {
        if self.opts.read_only {
            return Err(Errno::EROFS);
        }
        let st = fstat(self.path_fd(node)?.as_fd())?;
        if !self.map.writable_owner(st.st_uid, st.st_gid) {
            return Err(denied);
        }
        Ok(st)
    }

    /// The caller's ids on disk.
    fn caller(&self, req: &Request) -> Result<(u32, u32), Errno> {
        let uid = self.map.uid_to_disk(req.uid()).ok_or(Errno::EOVERFLOW)?;
        let gid = self.map.gid_to_disk(req.gid()).ok_or(Errno::EOVERFLOW)?;
        Ok((uid, gid))
    }

    /// Give a new object the caller's ids (its group stays inherited under a setgid
    /// directory, as the kernel does).
    fn own(&self, fd: BorrowedFd<'_>, parent_st: &Stat, uid: u32, gid: u32) -> Result<(), Errno> {
        let gid = (parent_st.st_mode & 0o2000 == 0).then(|| Gid::from_raw(gid));
        rfs::chownat(
            fd,
            "",
            Some(Uid::from_raw(uid)),
            gid,
            AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(errno)
    }

    /// Create an object with `make`, own it, and return its entry.
    fn make_node(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        make: impl FnOnce(BorrowedFd<'_>) -> rustix::io::Result<()>,
    ) -> Result<FileAttr, Errno> {
        check_name(name)?;
        let p = self.node(parent)?;
        let pst = self.check_change(&p, Errno::EACCES)?;
        let (uid, gid) = self.caller(req)?;
        let pfd = self.path_fd(&p)?;
        make(pfd.as_fd()).map_err(errno)?;
        let fd = rfs::openat(
            &pfd,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)?;
        self.own(fd.as_fd(), &pst, uid, gid)?;
        let st = fstat(fd.as_fd())?;
        let id = self.insert(fd, &st);
        Ok(self.attr(id, &st))
    }

    fn backing_fd(&self, node: &Inode) -> Result<OwnedFd, Errno> {
        if !self.opts.read_only
            && let Ok(fd) = self.reopen(node, OFlags::RDWR)
        {
            return Ok(fd);
        }
        self.reopen(node, OFlags::RDONLY)
    }

    /// The inode's passthrough backing file, registered with the kernel on first use.
    fn backing(
        &self,
        node: &Inode,
        register: impl FnOnce(BorrowedFd<'_>) -> std::io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        if !self.passthrough_active() || node.kind != FileType::RegularFile {
            return None;
        }
        let mut slot = lock(&node.backing);
        if let Some(b) = slot.upgrade() {
            return Some(b);
        }
        let fd = self.backing_fd(node).ok()?;
        match register(fd.as_fd()) {
            Ok(b) => {
                let b = Arc::new(b);
                *slot = Arc::downgrade(&b);
                Some(b)
            }
            Err(e) => {
                if !self.passthrough_warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!("FUSE passthrough refused ({e}); serving data by read/write");
                }
                self.passthrough_on.store(false, Ordering::Relaxed);
                None
            }
        }
    }

    fn new_handle(&self, fd: OwnedFd, backing: Option<Arc<BackingId>>) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let h = Handle {
            fd,
            _backing: backing,
        };
        lock(&self.files).insert(fh, Arc::new(h));
        fh
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Errno> {
        lock(&self.files).get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    /// The caller's open flags, minus those that were already acted on by the kernel or must
    /// not reach the `/proc/self/fd` reopen: O_NOFOLLOW there would refuse the magic link
    /// itself (ELOOP), while the object is already known not to be a symlink.
    fn io_flags(flags: i32) -> OFlags {
        OFlags::from_bits_retain(flags as u32)
            & !(OFlags::CREATE | OFlags::EXCL | OFlags::NOCTTY | OFlags::TRUNC | OFlags::NOFOLLOW)
    }

    #[allow(clippy::too_many_arguments)]
    fn do_setattr(
        &self,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
    ) -> Result<FileAttr, Errno> {
        let node = self.node(ino)?;
        let st = self.check_change(&node, Errno::EPERM)?;
        // A chown to the current (view) owner keeps the disk owner: with a many-to-one view
        // the view id does not say which disk id it was.
        let new_uid = match uid {
            Some(v) if v != self.map.uid_to_view(st.st_uid) => {
                Some(self.map.uid_to_disk(v).ok_or(Errno::EOVERFLOW)?)
            }
            _ => None,
        };
        let new_gid = match gid {
            Some(v) if v != self.map.gid_to_view(st.st_gid) => {
                Some(self.map.gid_to_disk(v).ok_or(Errno::EOVERFLOW)?)
            }
            _ => None,
        };
        if new_uid.is_some() || new_gid.is_some() {
            rfs::chownat(
                &self.path_fd(&node)?,
                "",
                new_uid.map(Uid::from_raw),
                new_gid.map(Gid::from_raw),
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(errno)?;
        }
        if let Some(mode) = mode {
            if node.kind == FileType::Symlink {
                return Err(Errno::EOPNOTSUPP);
            }
            let fd = self.path_fd(&node)?;
            let path = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
            rfs::chmod(path, Mode::from_bits_retain(mode & 0o7777)).map_err(errno)?;
        }
        if let Some(size) = size {
            let fd = self.reopen(&node, OFlags::WRONLY)?;
            rfs::ftruncate(&fd, size).map_err(errno)?;
        }
        if atime.is_some() || mtime.is_some() {
            if node.kind == FileType::Symlink {
                return Err(Errno::EOPNOTSUPP);
            }
            let ts = |t: Option<TimeOrNow>| match t {
                None => rfs::Timespec {
                    tv_sec: 0,
                    tv_nsec: rfs::UTIME_OMIT,
                },
                Some(TimeOrNow::Now) => rfs::Timespec {
                    tv_sec: 0,
                    tv_nsec: rfs::UTIME_NOW,
                },
                Some(TimeOrNow::SpecificTime(t)) => {
                    let (sec, nsec) = match t.duration_since(UNIX_EPOCH) {
                        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
                        Err(e) => (-(e.duration().as_secs_f64().ceil() as i64), 0),
                    };
                    rfs::Timespec {
                        tv_sec: sec,
                        tv_nsec: nsec.into(),
                    }
                }
            };
            let times = rfs::Timestamps {
                last_access: ts(atime),
                last_modification: ts(mtime),
            };
            let fd = self.path_fd(&node)?;
            rfs::utimensat(
                &self.proc_fd,
                fd.as_fd().as_raw_fd().to_string(),
                &times,
                AtFlags::empty(),
            )
            .map_err(errno)?;
        }
        let st = fstat(self.path_fd(&node)?.as_fd())?;
        Ok(self.attr(ino.0, &st))
    }

    /// The kernel forgot `n` lookups of `id`; drop the object once none is left.
    fn drop_lookups(&self, id: u64, n: u64) {
        let mut t = lock(&self.table);
        let Some(entry) = t.nodes.get_mut(&id) else {
            return;
        };
        entry.1 = entry.1.saturating_sub(n);
        if entry.1 > 0 || id == ROOT {
            return;
        }
        let Some((node, _)) = t.nodes.remove(&id) else {
            return;
        };
        if node.fd.is_some() {
            self.held_fds.fetch_sub(1, Ordering::Relaxed);
        }
        // The key may already name a newer object (an inode number reused after a handle-only
        // inode was deleted): only remove it if it is still ours.
        if t.by_key.get(&node.key) == Some(&id) {
            t.by_key.remove(&node.key);
        }
    }

    /// The inode, a descriptor of it that lives as long as the caller keeps it, and its
    /// `/proc/self/fd` path (xattr calls do not take `O_PATH` descriptors).
    fn xattr_target(&self, ino: INodeNo) -> Result<(Arc<Inode>, OwnedFd, String), Errno> {
        let node = self.node(ino)?;
        if !matches!(node.kind, FileType::RegularFile | FileType::Directory) {
            return Err(Errno::ENOTSUP);
        }
        let fd = match self.path_fd(&node)? {
            PathFd::Held(fd) => rustix::io::fcntl_dupfd_cloexec(fd, 0).map_err(errno)?,
            PathFd::Opened(fd) => fd,
        };
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        Ok((node, fd, path))
    }
}

fn reply_sized(reply: ReplyXattr, size: u32, data: Result<Vec<u8>, Errno>) {
    match data {
        Err(e) => reply.error(e),
        Ok(d) if size == 0 => reply.size(d.len() as u32),
        Ok(d) if d.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(d) => reply.data(&d),
    }
}

impl Filesystem for PassthroughFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        let _ = config.add_capabilities(InitFlags::FUSE_CACHE_SYMLINKS);
        // Listings carry each entry's attributes, so `ls -l`, `find -ls` and `tar c` need no
        // LOOKUP round trip per entry (adaptive: plain READDIR when nothing is looked up).
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS);
        let _ = config.add_capabilities(InitFlags::FUSE_READDIRPLUS_AUTO);
        // The kernel then enforces ACLs (with mapped ids, as read through getxattr) instead of
        // mode bits alone, whose group class is only the ACL mask.
        let _ = config.add_capabilities(InitFlags::FUSE_POSIX_ACL);
        if self.opts.passthrough {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            self.passthrough_on.store(ok, Ordering::Relaxed);
            if ok {
                tracing::info!("file data: FUSE passthrough");
            } else {
                tracing::info!("file data: read/write (the kernel offers no FUSE passthrough)");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.node(parent).and_then(|p| self.do_lookup(&p, name)) {
            Ok(a) => reply.entry(&self.opts.ttl, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.drop_lookups(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self
            .node(ino)
            .and_then(|n| fstat(self.path_fd(&n)?.as_fd()).map(|st| self.attr(ino.0, &st)))
        {
            Ok(a) => reply.attr(&self.opts.ttl, &a),
            Err(e) => reply.error(e),
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
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.do_setattr(ino, mode, uid, gid, size, atime, mtime) {
            Ok(a) => reply.attr(&self.opts.ttl, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self.node(ino).and_then(|n| {
            rfs::readlinkat(&self.path_fd(&n)?, "", Vec::new())
                .map(|t| t.into_bytes())
                .map_err(errno)
        });
        match r {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self.make_node(req, parent, name, |dir| {
            rfs::mknodat(
                dir,
                name,
                rfs::FileType::from_raw_mode(mode),
                Mode::from_bits_retain(mode & 0o7777),
                u64::from(rdev),
            )
        });
        match r {
            Ok(a) => reply.entry(&self.opts.ttl, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.make_node(req, parent, name, |dir| {
            rfs::mkdirat(dir, name, Mode::from_bits_retain(mode & 0o7777))
        });
        match r {
            Ok(a) => reply.entry(&self.opts.ttl, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = check_name(name).and_then(|()| {
            let p = self.node(parent)?;
            self.check_change(&p, Errno::EACCES)?;
            rfs::unlinkat(&self.path_fd(&p)?, name, AtFlags::empty()).map_err(errno)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = check_name(name).and_then(|()| {
            let p = self.node(parent)?;
            self.check_change(&p, Errno::EACCES)?;
            rfs::unlinkat(&self.path_fd(&p)?, name, AtFlags::REMOVEDIR).map_err(errno)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.make_node(req, parent, link_name, |dir| {
            rfs::symlinkat(target, dir, link_name)
        });
        match r {
            Ok(a) => reply.entry(&self.opts.ttl, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = check_name(name)
            .and_then(|()| check_name(newname))
            .and_then(|()| {
                let p = self.node(parent)?;
                let np = self.node(newparent)?;
                self.check_change(&p, Errno::EACCES)?;
                self.check_change(&np, Errno::EACCES)?;
                rfs::renameat_with(
                    &self.path_fd(&p)?,
                    name,
                    &self.path_fd(&np)?,
                    newname,
                    rfs::RenameFlags::from_bits_retain(flags.bits()),
                )
                .map_err(errno)
            });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = check_name(newname).and_then(|()| {
            let n = self.node(ino)?;
            let np = self.node(newparent)?;
            self.check_change(&np, Errno::EACCES)?;
            self.check_change(&n, Errno::EPERM)?;
            let (nfd, npfd) = (self.path_fd(&n)?, self.path_fd(&np)?);
            rfs::linkat(&nfd, "", &npfd, newname, AtFlags::EMPTY_PATH).map_err(errno)?;
            self.do_lookup(&np, newname)
        });
        match r {
            Ok(a) => reply.entry(&self.opts.ttl, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = self.node(ino).and_then(|n| {
            if flags.acc_mode() != OpenAccMode::O_RDONLY {
                self.check_change(&n, Errno::EACCES)?;
            }
            let fd = self.reopen(&n, Self::io_flags(flags.0))?;
            Ok((n, fd))
        });
        match r {
            Ok((n, fd)) => match self.backing(&n, |b| reply.open_backing(b)) {
                Some(b) => {
                    let fh = self.new_handle(fd, Some(b.clone()));
                    reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &b);
                }
                None => {
                    let fh = self.new_handle(fd, None);
                    reply.opened(FileHandle(fh), FopenFlags::empty());
                }
            },
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = check_name(name).and_then(|()| {
            let p = self.node(parent)?;
            let pst = self.check_change(&p, Errno::EACCES)?;
            let (uid, gid) = self.caller(req)?;
            let oflags = OFlags::from_bits_retain(flags as u32) & !OFlags::NOCTTY
                | OFlags::CREATE
                | OFlags::NOFOLLOW
                | OFlags::CLOEXEC;
            let fd = rfs::openat(
                &self.path_fd(&p)?,
                name,
                oflags,
                Mode::from_bits_retain(mode & 0o7777),
            )
            .map_err(errno)?;
            self.own(fd.as_fd(), &pst, uid, gid)?;
            let path_fd = rfs::openat(
                &self.proc_fd,
                fd.as_raw_fd().to_string(),
                OFlags::PATH | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(errno)?;
            let st = fstat(fd.as_fd())?;
            let id = self.insert(path_fd, &st);
            let n = self.node(INodeNo(id))?;
            Ok((self.attr(id, &st), fd, n))
        });
        match r {
            Ok((a, fd, n)) => match self.backing(&n, |b| reply.open_backing(b)) {
                Some(b) => {
                    let fh = self.new_handle(fd, Some(b.clone()));
                    reply.created_passthrough(
                        &self.opts.ttl,
                        &a,
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::empty(),
                        &b,
                    );
                }
                None => {
                    let fh = self.new_handle(fd, None);
                    reply.created(
                        &self.opts.ttl,
                        &a,
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::empty(),
                    );
                }
            },
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let r = self.handle(fh).and_then(|h| {
            let mut buf = vec![0u8; size as usize];
            let mut done = 0;
            while done < buf.len() {
                match rustix::io::pread(&h.fd, &mut buf[done..], offset + done as u64) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(errno(e)),
                }
            }
            buf.truncate(done);
            Ok(buf)
        });
        match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = self.handle(fh).and_then(|h| {
            let mut done = 0;
            while done < data.len() {
                match rustix::io::pwrite(&h.fd, &data[done..], offset + done as u64) {
                    Ok(n) => done += n,
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(errno(e)),
                }
            }
            Ok(done as u32)
        });
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to do at close: data goes straight to the source files (no write-back
        // cache) and POSIX locks stay in the kernel (no lock requests). ENOSYS makes the
        // kernel stop sending FLUSH at all, which saves a synchronous round trip per close().
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        lock(&self.files).remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.handle(fh).and_then(|h| {
            if datasync {
                rfs::fdatasync(&h.fd).map_err(errno)
            } else {
                rfs::fsync(&h.fd).map_err(errno)
            }
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let r = self.node(ino).and_then(|n| {
            let fd = self.reopen(&n, OFlags::RDONLY | OFlags::DIRECTORY)?;
            let mut dir = rfs::Dir::new(fd).map_err(errno)?;
            let mut entries = Vec::new();
            while let Some(e) = dir.read() {
                let e = e.map_err(errno)?;
                entries.push(DirEntry {
                    ino: e.ino(),
                    kind: match e.file_type() {
                        rfs::FileType::Directory => FileType::Directory,
                        rfs::FileType::Symlink => FileType::Symlink,
                        rfs::FileType::Fifo => FileType::NamedPipe,
                        rfs::FileType::Socket => FileType::Socket,
                        rfs::FileType::CharacterDevice => FileType::CharDevice,
                        rfs::FileType::BlockDevice => FileType::BlockDevice,
                        _ => FileType::RegularFile,
                    },
                    name: e.file_name().to_bytes().to_vec(),
                });
            }
            Ok(entries)
        });
        match r {
            Ok(entries) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                lock(&self.dirs).insert(fh, Arc::new(entries));
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(entries) = lock(&self.dirs).get(&fh.0).cloned() else {
            reply.error(Errno::EBADF);
            return;
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(
                INodeNo(e.ino),
                i as u64 + 1,
                e.kind,
                OsStr::from_bytes(&e.name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(entries) = lock(&self.dirs).get(&fh.0).cloned() else {
            reply.error(Errno::EBADF);
            return;
        };
        let dir = match self.node(ino) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        let mut added = 0;
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let name = OsStr::from_bytes(&e.name);
            // The kernel takes no reference for `.` and `..`: attributes only, no lookup.
            let dots = e.name == b"." || e.name == b"..";
            let attr = if dots {
                match self.path_fd(&dir).and_then(|fd| fstat(fd.as_fd())) {
                    Ok(st) => FileAttr {
                        ino: INodeNo(e.ino),
                        ..self.attr(ino.0, &st)
                    },
                    Err(_) => continue,
                }
            } else {
                match self.do_lookup(&dir, name) {
                    Ok(a) => a,
                    // Removed since opendir: not listed.
                    Err(err) if err == Errno::ENOENT => continue,
                    Err(err) if added == 0 => return reply.error(err),
                    // Report the error on the next call, starting at this entry.
                    Err(_) => break,
                }
            };
            if reply.add(
                attr.ino,
                i as u64 + 1,
                name,
                &self.opts.ttl,
                &attr,
                Generation(0),
            ) {
                if !dots {
                    self.drop_lookups(attr.ino.0, 1);
                }
                break;
            }
            added += 1;
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.dirs).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.node(ino).and_then(|n| {
            let fd = self.reopen(&n, OFlags::RDONLY | OFlags::DIRECTORY)?;
            rfs::fsync(&fd).map_err(errno)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    #[allow(clippy::unnecessary_cast)]
    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self
            .node(ino)
            .and_then(|n| rfs::fstatfs(&self.path_fd(&n)?).map_err(errno))
        {
            Ok(s) => reply.statfs(
                s.f_blocks as u64,
                s.f_bfree as u64,
                s.f_bavail as u64,
                s.f_files as u64,
                s.f_ffree as u64,
                s.f_bsize as u32,
                s.f_namelen as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = self.xattr_target(ino).and_then(|(n, _fd, path)| {
            self.check_change(&n, Errno::EPERM)?;
            let value =
                xattr_ids::translate(name.as_bytes(), value, &*self.map, Direction::ToDisk)?;
            rfs::setxattr(
                path,
                name,
                &value,
                rfs::XattrFlags::from_bits_retain(flags as u32),
            )
            .map_err(errno)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let r = self.xattr_target(ino).and_then(|(_n, _fd, path)| {
            let len = rfs::getxattr_query(&path, name).map_err(errno)?;
            let mut buf = vec![0u8; len];
            let got = rfs::getxattr(&path, name, &mut buf[..]).map_err(errno)?;
            buf.truncate(got);
            let view = xattr_ids::translate(name.as_bytes(), &buf, &*self.map, Direction::ToView)?;
            Ok(view.into_owned())
        });
        let r = match r {
            Err(e) if e.code() == libc::ENOTSUP => Err(Errno::ENODATA),
            r => r,
        };
        reply_sized(reply, size, r);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let r = self.xattr_target(ino).and_then(|(_n, _fd, path)| {
            let len = rfs::listxattr_query(&path).map_err(errno)?;
            let mut buf = vec![0u8; len];
            let got = rfs::listxattr(&path, &mut buf[..]).map_err(errno)?;
            buf.truncate(got);
            Ok(buf)
        });
        let r = match r {
            Err(e) if e.code() == libc::ENOTSUP => Ok(Vec::new()),
            r => r,
        };
        reply_sized(reply, size, r);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.xattr_target(ino).and_then(|(n, _fd, path)| {
            self.check_change(&n, Errno::EPERM)?;
            rfs::removexattr(path, name).map_err(errno)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // Permission bits are checked by the kernel (default_permissions).
        match self.node(ino) {
            Ok(_) if mask.contains(AccessFlags::W_OK) && self.opts.read_only => {
                reply.error(Errno::EROFS)
            }
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::budget_for_limit;

    #[test]
    fn descriptor_budget_leaves_room_for_open_files() {
        // Small limits: half for inodes (the idmap-overlay test of trees larger than the
        // limit runs with 256).
        assert_eq!(budget_for_limit(256), 128);
        assert_eq!(budget_for_limit(1024), 512);
        // Larger ones keep 1024, or a sixteenth, for open files and directory reads.
        assert_eq!(budget_for_limit(4096), 3072);
        assert_eq!(budget_for_limit(20000), 18750);
        assert_eq!(budget_for_limit(1 << 20), (1 << 20) - (1 << 16));
        // Never below 64, whatever the limit says.
        assert_eq!(budget_for_limit(0), 64);
        assert_eq!(budget_for_limit(100), 64);
    }
}
