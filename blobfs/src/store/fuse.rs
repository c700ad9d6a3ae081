//! The store mounted through FUSE, with the write-once protocol (modelled on Fuchsia's blobfs):
//!
//! 1. `open(NAME, O_CREAT|O_EXCL|O_WRONLY)` where NAME is the blob's 64-hex digest; any other
//!    name is EINVAL, an existing blob EEXIST, a blob another writer is creating EEXIST.
//! 2. Optionally `ftruncate(fd, SIZE)`: the write that reaches SIZE completes the blob.
//! 3. Write the content sequentially (a write at any other offset is EINVAL).
//! 4. The completing write, or else `fsync`/`close` (FUSE flush), checks the digest. On a
//!    mismatch that call fails with EIO and the blob is discarded. FUSE drops errors returned
//!    from release, so nothing relies on it.
//!
//! Until sealed, a blob is invisible (ENOENT, not listed). Sealed blobs are read with the same
//! verification as image blobs and can never be written, truncated, chmodded or renamed (EPERM).

use super::{Added, BlobFiles, Store, StoreError};
use crate::fuse::{
    DIGEST_XATTR, FS_IOC_MEASURE_VERITY, Owner, blob_ino, file_attr, measure_verity_reply,
    reply_xattr,
};
use crate::merkle::{Hash, LeafHasher, parse_digest};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, IoctlFlags, OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    WriteFlags,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

const ROOT: u64 = 1;
/// Sealed blobs never change; their attributes can be cached.
const TTL: Duration = Duration::from_secs(60);
/// Names being written must not be cached: other processes must keep getting ENOENT.
const NO_TTL: Duration = Duration::ZERO;

#[derive(Debug, Clone, Copy)]
pub struct StoreMountOptions {
    pub owner: Owner,
    /// Refuse unlink.
    pub nodelete: bool,
}

/// Sealed blobs known to the mount: inode -> (digest, size).
#[derive(Default)]
struct Sealed {
    by_ino: HashMap<u64, (Hash, u64)>,
    by_digest: HashMap<Hash, u64>,
}

enum WriterState {
    Open,
    Sealed,
    /// Discarded; later calls keep reporting why (ENOSPC stays ENOSPC).
    Failed(Errno),
}

struct Writer {
    digest: Hash,
    ino: u64,
    file: File,
    path: PathBuf,
    hasher: LeafHasher,
    expected: Option<u64>,
    state: WriterState,
    /// The descriptor table (FUSE lock owner) the data came from. Every close() of a copy
    /// of the descriptor sends FLUSH, including the close-on-exec of a child that a
    /// multi-threaded writer forks while writing; only a flush from the writer's own
    /// table completes the blob.
    owner: Option<u64>,
    /// The process (thread group) that created the blob. Until the first write reveals the
    /// writer's descriptor table, a flush is attributed by process instead: a child forked
    /// between create (or ftruncate) and the first write must not end the blob either.
    creator: Option<u32>,
}

/// The thread group of a thread id as FUSE reports it in request headers, or None when
/// /proc does not tell (the thread is gone, or /proc is another pid namespace's).
fn thread_group(tid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

enum Handle {
    Read(Arc<(Hash, u64, BlobFiles)>),
    Write(Arc<Mutex<Writer>>),
}

pub struct StoreFs {
    store: Arc<Store>,
    opts: StoreMountOptions,
    sealed: RwLock<Sealed>,
    /// Digests being written (for EEXIST between concurrent creators).
    writing: Mutex<HashMap<Hash, u64>>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data consistent, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl StoreFs {
    pub fn new(store: Arc<Store>, opts: StoreMountOptions) -> Result<StoreFs, StoreError> {
        let mut sealed = Sealed::default();
        for (digest, rec) in store.list()? {
            let mut ino = blob_ino(&digest);
            while sealed.by_ino.contains_key(&ino) {
                ino = ino.wrapping_add(1) | 1 << 63;
            }
            sealed.by_ino.insert(ino, (digest, rec.size));
            sealed.by_digest.insert(digest, ino);
        }
        Ok(StoreFs {
            store,
            opts,
            sealed: RwLock::new(sealed),
            writing: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        })
    }

    fn sealed(&self) -> std::sync::RwLockReadGuard<'_, Sealed> {
        self.sealed.read().unwrap_or_else(|e| e.into_inner())
    }

    fn sealed_mut(&self) -> std::sync::RwLockWriteGuard<'_, Sealed> {
        self.sealed.write().unwrap_or_else(|e| e.into_inner())
    }

    fn root_attr(&self) -> FileAttr {
        let mut a = file_attr(ROOT, 0, 0o755, self.opts.owner);
        a.kind = FileType::Directory;
        a.nlink = 2;
        a.blocks = 0;
        a
    }

    fn sealed_attr(&self, ino: u64) -> Option<FileAttr> {
        let (_, size) = *self.sealed().by_ino.get(&ino)?;
        Some(file_attr(ino, size, 0o444, self.opts.owner))
    }

    fn writer_attr(&self, w: &Writer) -> FileAttr {
        file_attr(w.ino, w.hasher.len(), 0o644, self.opts.owner)
    }

    fn new_fh(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, h);
        fh
    }

    fn writer(&self, fh: FileHandle) -> Option<Arc<Mutex<Writer>>> {
        match lock(&self.handles).get(&fh.0) {
            Some(Handle::Write(w)) => Some(w.clone()),
            _ => None,
        }
    }

    /// The writer of an inode being created. The kernel asks for its attributes without a
    /// handle too (permission checks during open), so handles are searched by inode.
    fn writer_of_ino(&self, ino: u64) -> Option<Arc<Mutex<Writer>>> {
        lock(&self.handles).values().find_map(|h| match h {
            Handle::Write(w) if lock(w).ino == ino => Some(w.clone()),
            _ => None,
        })
    }

    /// A flush or fsync: completes the blob, except before any data was written. Every
    /// close() of any descriptor sends FLUSH, and tools such as dd close a duplicate of the
    /// output descriptor before writing; the empty blob itself is completed here, though.
    /// `flusher` is the lock owner and thread id of a FLUSH (None for fsync, always meant).
    fn flush_writer(&self, w: &mut Writer, flusher: Option<(u64, u32)>) -> Result<(), Errno> {
        if let Some((owner, tid)) = flusher
            && matches!(w.state, WriterState::Open)
        {
            let foreign = match w.owner {
                Some(writer) => writer != owner,
                None => w
                    .creator
                    .zip(thread_group(tid))
                    .is_some_and(|(creator, flusher)| creator != flusher),
            };
            if foreign {
                tracing::debug!(
                    "blob {}: flush from another descriptor table (a forked child's close); not the end of the blob",
                    hex::encode(w.digest)
                );
                return Ok(());
            }
        }
        let empty_name = crate::merkle::fsverity_digest(0, &[0; 32]);
        if matches!(w.state, WriterState::Open)
            && w.hasher.is_empty()
            && w.expected.is_none()
            && w.digest != empty_name
        {
            return Ok(());
        }
        self.complete(w)
    }

    /// Check the digest of what was written and seal the blob, or discard it.
    fn complete(&self, w: &mut Writer) -> Result<(), Errno> {
        match w.state {
            WriterState::Sealed => return Ok(()),
            WriterState::Failed(e) => return Err(e),
            WriterState::Open => {}
        }
        let name = hex::encode(w.digest);
        if let Some(exp) = w.expected
            && exp != w.hasher.len()
        {
            tracing::warn!(
                "blob {name}: closed after {} of {exp} bytes; discarded",
                w.hasher.len()
            );
            return Err(self.fail(w, Errno::EIO));
        }
        let tree = std::mem::take(&mut w.hasher).finish();
        if tree.digest() != w.digest {
            tracing::warn!(
                "blob {name}: content does not match its name (digest {} of {} bytes); discarded",
                hex::encode(tree.digest()),
                tree.size
            );
            return Err(self.fail(w, Errno::EIO));
        }
        let _ = w.file.flush();
        match self.store.seal(&w.file, &w.path, &tree) {
            Ok(Added::New(_)) | Ok(Added::AlreadyPresent(_)) => {
                w.state = WriterState::Sealed;
                let mut s = self.sealed_mut();
                s.by_ino.insert(w.ino, (w.digest, tree.size));
                s.by_digest.insert(w.digest, w.ino);
                drop(s);
                lock(&self.writing).remove(&w.digest);
                tracing::info!("blob {name}: sealed ({} bytes)", tree.size);
                Ok(())
            }
            Err(e) => {
                tracing::error!("blob {name}: cannot seal: {e}");
                let errno = match &e {
                    StoreError::Io { source, .. } => Errno::from(source.kind()),
                    _ => Errno::EIO,
                };
                Err(self.fail(w, errno))
            }
        }
    }

    fn fail(&self, w: &mut Writer, errno: Errno) -> Errno {
        w.state = WriterState::Failed(errno);
        let _ = std::fs::remove_file(&w.path);
        lock(&self.writing).remove(&w.digest);
        errno
    }
}

fn io_errno(e: &std::io::Error) -> Errno {
    e.raw_os_error().map(Errno::from_i32).unwrap_or(Errno::EIO)
}

impl Filesystem for StoreFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let Some(digest) = name.to_str().and_then(parse_digest) else {
            return reply.error(Errno::ENOENT);
        };
        let ino = self.sealed().by_digest.get(&digest).copied();
        match ino.and_then(|i| self.sealed_attr(i)) {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino.0 == ROOT {
            return reply.attr(&TTL, &self.root_attr());
        }
        if let Some(a) = self.sealed_attr(ino.0) {
            return reply.attr(&TTL, &a);
        }
        if let Some(w) = fh
            .and_then(|fh| self.writer(fh))
            .or_else(|| self.writer_of_ino(ino.0))
        {
            let w = lock(&w);
            return reply.attr(&NO_TTL, &self.writer_attr(&w));
        }
        reply.error(Errno::ENOENT)
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let Some(digest) = name.to_str().and_then(parse_digest) else {
            tracing::info!("create {name:?}: not a digest (64 lowercase hex digits)");
            return reply.error(Errno::EINVAL);
        };
        if self.sealed().by_digest.contains_key(&digest) {
            return reply.error(Errno::EEXIST);
        }
        let ino = blob_ino(&digest);
        {
            let mut writing = lock(&self.writing);
            if writing.contains_key(&digest) {
                return reply.error(Errno::EEXIST);
            }
            writing.insert(digest, ino);
        }
        let (file, path) = match self.store.blob_file(&digest) {
            Ok(f) => f,
            Err(e) => {
                lock(&self.writing).remove(&digest);
                tracing::error!("create {}: {e}", hex::encode(digest));
                return reply.error(match &e {
                    StoreError::Io { source, .. } => Errno::from(source.kind()),
                    _ => Errno::EIO,
                });
            }
        };
        let w = Writer {
            digest,
            ino,
            file,
            path,
            hasher: LeafHasher::new(),
            expected: None,
            state: WriterState::Open,
            owner: None,
            creator: thread_group(req.pid()),
        };
        let attr = self.writer_attr(&w);
        let fh = self.new_fh(Handle::Write(Arc::new(Mutex::new(w))));
        reply.created(
            &NO_TTL,
            &attr,
            Generation(0),
            FileHandle(fh),
            FopenFlags::FOPEN_DIRECT_IO,
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 == ROOT {
            return reply.error(Errno::EISDIR);
        }
        let Some((digest, size)) = self.sealed().by_ino.get(&ino.0).copied() else {
            return reply.error(Errno::ENOENT);
        };
        if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            // Sealed blobs are immutable.
            return reply.error(Errno::EPERM);
        }
        match self.store.open_blob(&digest, size) {
            Ok(files) => {
                let fh = self.new_fh(Handle::Read(Arc::new((digest, size, files))));
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE)
            }
            Err(e) => {
                tracing::error!("blob {}: cannot open its files: {e}", hex::encode(digest));
                reply.error(Errno::EIO)
            }
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
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let h = match lock(&self.handles).get(&fh.0) {
            Some(Handle::Read(h)) => h.clone(),
            Some(Handle::Write(_)) => return reply.error(Errno::EBADF),
            None => return reply.error(Errno::EBADF),
        };
        let (digest, blob_size, files) = &*h;
        match self
            .store
            .read_verified(digest, *blob_size, files, offset, size as usize)
        {
            Ok(data) => reply.data(&data),
            Err(e) => {
                tracing::error!("{e}; returning EIO");
                reply.error(Errno::EIO)
            }
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
        lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(w) = self.writer(fh) else {
            return reply.error(Errno::EBADF);
        };
        let mut w = lock(&w);
        match w.state {
            WriterState::Open => {}
            WriterState::Sealed => return reply.error(Errno::EPERM),
            WriterState::Failed(e) => return reply.error(e),
        }
        if offset != w.hasher.len() {
            tracing::info!(
                "blob {}: write at {offset}, expected {}: blobs must be written sequentially",
                hex::encode(w.digest),
                w.hasher.len()
            );
            return reply.error(Errno::EINVAL);
        }
        if w.expected
            .is_some_and(|exp| offset + data.len() as u64 > exp)
        {
            return reply.error(Errno::EFBIG);
        }
        if let Err(e) = w.file.write_all(data) {
            let errno = io_errno(&e);
            tracing::error!(
                "blob {}: write failed: {e}; discarded",
                hex::encode(w.digest)
            );
            let errno = self.fail(&mut w, errno);
            return reply.error(errno);
        }
        w.hasher.update(data);
        if w.owner.is_none() {
            w.owner = lock_owner.map(|o| o.0);
        }
        if w.expected == Some(w.hasher.len())
            && let Err(e) = self.complete(&mut w)
        {
            return reply.error(e);
        }
        reply.written(data.len() as u32);
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let writer = fh
            .and_then(|fh| self.writer(fh))
            .or_else(|| self.writer_of_ino(ino.0));
        let Some(w) = writer else {
            return reply.error(if self.sealed_attr(ino.0).is_some() {
                Errno::EPERM
            } else {
                Errno::ENOENT
            });
        };
        let mut w = lock(&w);
        if !matches!(w.state, WriterState::Open) || mode.is_some() || uid.is_some() || gid.is_some()
        {
            return reply.error(Errno::EPERM);
        }
        // O_TRUNC on the new file arrives as a truncate to 0 before any data: not a size
        // announcement (an empty blob is made by closing without writing).
        if let Some(size) = size.filter(|&s| s > 0 || !w.hasher.is_empty()) {
            if size < w.hasher.len() {
                return reply.error(Errno::EINVAL);
            }
            w.expected = Some(size);
            if size == w.hasher.len()
                && size > 0
                && let Err(e) = self.complete(&mut w)
            {
                return reply.error(e);
            }
        }
        let mut attr = self.writer_attr(&w);
        if let Some(exp) = w.expected {
            attr.size = exp;
        }
        reply.attr(&NO_TTL, &attr);
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.writer(fh) {
            Some(w) => match self.flush_writer(&mut lock(&w), Some((lock_owner.0, req.pid()))) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            },
            None => reply.ok(),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.writer(fh) {
            Some(w) => match self.flush_writer(&mut lock(&w), None) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            },
            None => reply.ok(),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(Handle::Write(w)) = lock(&self.handles).remove(&fh.0) {
            let mut w = lock(&w);
            if matches!(w.state, WriterState::Open) {
                // Never completed (flush errors are not reported from here): discard.
                let _ = self.fail(&mut w, Errno::EIO);
            }
        }
        reply.ok();
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        if self.opts.nodelete {
            return reply.error(Errno::EPERM);
        }
        let Some(digest) = name.to_str().and_then(parse_digest) else {
            return reply.error(Errno::ENOENT);
        };
        match self.store.remove(&digest) {
            Ok(true) => {
                let mut s = self.sealed_mut();
                if let Some(ino) = s.by_digest.remove(&digest) {
                    s.by_ino.remove(&ino);
                }
                tracing::info!("blob {}: removed", hex::encode(digest));
                reply.ok()
            }
            Ok(false) => reply.error(Errno::ENOENT),
            Err(e) => {
                tracing::error!("unlink {}: {e}", hex::encode(digest));
                reply.error(Errno::EIO)
            }
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 == ROOT {
            reply.opened(FileHandle(0), FopenFlags::empty())
        } else {
            reply.error(Errno::ENOTDIR)
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
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut blobs: Vec<(Hash, u64)> = self
            .sealed()
            .by_digest
            .iter()
            .map(|(d, i)| (*d, *i))
            .collect();
        blobs.sort();
        let total = 2 + blobs.len() as u64;
        for pos in offset..total {
            let full = match pos {
                0 => reply.add(INodeNo(ROOT), 1, FileType::Directory, "."),
                1 => reply.add(INodeNo(ROOT), 2, FileType::Directory, ".."),
                _ => {
                    let (d, i) = blobs[(pos - 2) as usize];
                    reply.add(INodeNo(i), pos + 1, FileType::RegularFile, hex::encode(d))
                }
            };
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match nix::sys::statvfs::statvfs(self.store.root()) {
            Ok(v) => reply.statfs(
                v.blocks(),
                v.blocks_free(),
                v.blocks_available(),
                self.sealed().by_ino.len() as u64,
                v.files_free(),
                v.block_size() as u32,
                64,
                v.fragment_size() as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if ino.0 != ROOT && mask.contains(AccessFlags::W_OK) {
            return reply.error(Errno::EPERM);
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.sealed().by_ino.get(&ino.0) {
            Some((d, _)) if name == DIGEST_XATTR => {
                reply_xattr(reply, hex::encode(d).as_bytes(), size)
            }
            _ => reply.error(Errno::ENODATA),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let names: &[u8] = if self.sealed().by_ino.contains_key(&ino.0) {
            b"user.blobfs.digest\0"
        } else {
            b""
        };
        reply_xattr(reply, names, size);
    }

    fn ioctl(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: ReplyIoctl,
    ) {
        if cmd != FS_IOC_MEASURE_VERITY {
            return reply.error(Errno::ENOTTY);
        }
        let Some((digest, _)) = self.sealed().by_ino.get(&ino.0).copied() else {
            return reply.error(Errno::ENODATA);
        };
        match measure_verity_reply(&digest, in_data, out_size) {
            Ok(out) => reply.ioctl(0, &out),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EOPNOTSUPP);
    }
}
