//! The read-only FUSE filesystem over an [`Image`].
//!
//! Every read goes through [`Image::read_verified`]; the kernel may keep the verified pages
//! (`FOPEN_KEEP_CACHE`) because the image behind a mount is immutable. A block that fails its
//! check is answered with EIO for that read only and logged with digest and block number.

use crate::image::{Image, ReadError};
use crate::merkle::{HASH_SIZE, Hash, data_blocks, parse_digest};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, IoctlFlags, KernelConfig, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

/// How blobs are presented.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Layout {
    /// Every blob in the root directory, named by its 64-hex digest.
    #[default]
    Flat,
    /// composefs object-store layout: `xx/<62 more hex digits>`.
    Objects,
}

/// Ownership shown for every file and directory.
#[derive(Clone, Copy, Debug)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// The image is immutable while mounted, so attributes and names can be cached for long.
const TTL: Duration = Duration::from_secs(3600);
const ROOT: u64 = 1;
/// Objects layout: directory `xx` has inode `DIR_BASE + 0xxx`.
const DIR_BASE: u64 = 2;
/// `FS_IOC_MEASURE_VERITY` = `_IOWR('f', 134, struct fsverity_digest)`.
pub const FS_IOC_MEASURE_VERITY: u32 = 0xC004_6686;
/// Extended attribute holding a blob's digest as 64 hex characters.
pub const DIGEST_XATTR: &str = "user.blobfs.digest";

/// Stable inode number of a blob: its digest's first eight bytes with the top bit set, so it
/// is the same in every image and mount that holds the blob and never collides with the root
/// or the object directories.
pub fn blob_ino(digest: &Hash) -> u64 {
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) | 1 << 63
}

pub struct BlobFs {
    image: Arc<Image>,
    layout: Layout,
    owner: Owner,
    /// Inode of each index entry; equal to `blob_ino` unless two digests share a prefix.
    inos: Vec<u64>,
    by_ino: HashMap<u64, usize>,
    /// Objects layout: entry range of each first digest byte present.
    prefixes: Vec<(u8, Range<usize>)>,
}

impl BlobFs {
    pub fn new(image: Arc<Image>, layout: Layout, owner: Owner) -> BlobFs {
        let mut by_ino = HashMap::with_capacity(image.entries().len());
        let mut inos = Vec::with_capacity(image.entries().len());
        for (i, e) in image.entries().iter().enumerate() {
            let mut ino = blob_ino(&e.digest);
            // A 64-bit prefix collision is possible for a hostile image (2^32 work); keep
            // inode numbers unique within the mount by probing, deterministically.
            while by_ino.contains_key(&ino) {
                tracing::warn!(
                    "blob {}: inode number collides with another blob; using the next free one",
                    hex::encode(e.digest)
                );
                ino = ino.wrapping_add(1) | 1 << 63;
            }
            by_ino.insert(ino, i);
            inos.push(ino);
        }
        let mut prefixes = Vec::new();
        let entries = image.entries();
        let mut start = 0;
        while start < entries.len() {
            let p = entries[start].digest[0];
            let end = start + entries[start..].partition_point(|e| e.digest[0] == p);
            prefixes.push((p, start..end));
            start = end;
        }
        BlobFs {
            image,
            layout,
            owner,
            inos,
            by_ino,
            prefixes,
        }
    }

    fn dir_attr(&self, ino: u64, subdirs: u32) -> FileAttr {
        self.attr(ino, FileType::Directory, 0o555, 0, 2 + subdirs)
    }

    fn blob_attr(&self, idx: usize) -> FileAttr {
        file_attr(
            self.inos[idx],
            self.image.entries()[idx].size,
            0o444,
            self.owner,
        )
    }

    fn attr(&self, ino: u64, kind: FileType, perm: u16, size: u64, nlink: u32) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: self.owner.uid,
            gid: self.owner.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn prefix_dir(&self, ino: u64) -> Option<&(u8, Range<usize>)> {
        if self.layout != Layout::Objects || !(DIR_BASE..DIR_BASE + 256).contains(&ino) {
            return None;
        }
        let p = (ino - DIR_BASE) as u8;
        self.prefixes.iter().find(|(q, _)| *q == p)
    }

    fn root_attr(&self) -> FileAttr {
        let subdirs = match self.layout {
            Layout::Flat => 0,
            Layout::Objects => self.prefixes.len() as u32,
        };
        self.dir_attr(ROOT, subdirs)
    }

    fn getattr_of(&self, ino: u64) -> Option<FileAttr> {
        if ino == ROOT {
            return Some(self.root_attr());
        }
        if let Some((p, _)) = self.prefix_dir(ino) {
            return Some(self.dir_attr(DIR_BASE + u64::from(*p), 0));
        }
        self.by_ino.get(&ino).map(|&i| self.blob_attr(i))
    }

    fn blob_of(&self, ino: u64) -> Result<usize, Errno> {
        if ino == ROOT || self.prefix_dir(ino).is_some() {
            return Err(Errno::EISDIR);
        }
        self.by_ino.get(&ino).copied().ok_or(Errno::ENOENT)
    }

    fn lookup_name(&self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        let name = name.to_str().ok_or(Errno::ENOENT)?;
        let digest = match (self.layout, parent) {
            (Layout::Flat, ROOT) => parse_digest(name),
            (Layout::Objects, ROOT) => {
                let p = (name.len() == 2)
                    .then(|| parse_digest(&format!("{name}{}", "0".repeat(62))))
                    .flatten()
                    .ok_or(Errno::ENOENT)?[0];
                let ino = DIR_BASE + u64::from(p);
                return self.getattr_of(ino).ok_or(Errno::ENOENT);
            }
            (Layout::Objects, dir) => {
                let (p, _) = self.prefix_dir(dir).ok_or(Errno::ENOTDIR)?;
                parse_digest(&format!("{p:02x}{name}")).filter(|_| name.len() == 62)
            }
            _ => return Err(Errno::ENOTDIR),
        };
        let idx = digest
            .and_then(|d| self.image.find(&d))
            .ok_or(Errno::ENOENT)?;
        Ok(self.blob_attr(idx))
    }

    fn log_read_error(&self, e: &ReadError) {
        tracing::error!("{e}; returning EIO");
    }
}

impl Filesystem for BlobFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Larger readahead means fewer, larger verified reads for sequential access.
        if let Err(max) = config.set_max_readahead(1 << 20) {
            let _ = config.set_max_readahead(max);
        }
        // And READ requests as large as the readahead (without FUSE_MAX_PAGES the kernel caps
        // them at 32 pages, 128 KiB).
        let _ = config.add_capabilities(InitFlags::FUSE_MAX_PAGES);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_name(parent.0, name) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.getattr_of(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(Errno::EROFS);
        }
        match self.blob_of(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let idx = match self.blob_of(ino.0) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        match self.image.read_verified(idx, offset, size as usize) {
            Ok(data) => reply.data(&data),
            Err(e) => {
                self.log_read_error(&e);
                reply.error(Errno::EIO);
            }
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 == ROOT || self.prefix_dir(ino.0).is_some() {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
        } else if self.by_ino.contains_key(&ino.0) {
            reply.error(Errno::ENOTDIR);
        } else {
            reply.error(Errno::ENOENT);
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
        let entries = self.image.entries();
        // Position k in the listing: 0 ".", 1 "..", then children; an entry's offset is the
        // position of the next one, so a reader resumes exactly where it stopped.
        let (children, parent) = if ino.0 == ROOT {
            match self.layout {
                Layout::Flat => (0..entries.len(), ROOT),
                Layout::Objects => (0..self.prefixes.len(), ROOT),
            }
        } else if let Some((_, range)) = self.prefix_dir(ino.0) {
            (range.clone(), ROOT)
        } else {
            return reply.error(Errno::ENOTDIR);
        };
        let total = 2 + children.len() as u64;
        for pos in offset..total {
            let full = match pos {
                0 => reply.add(ino, pos + 1, FileType::Directory, "."),
                1 => reply.add(INodeNo(parent), pos + 1, FileType::Directory, ".."),
                _ => {
                    let k = children.start + (pos - 2) as usize;
                    if ino.0 == ROOT && self.layout == Layout::Objects {
                        let p = self.prefixes[k].0;
                        let name = format!("{p:02x}");
                        reply.add(
                            INodeNo(DIR_BASE + u64::from(p)),
                            pos + 1,
                            FileType::Directory,
                            name,
                        )
                    } else {
                        let hexname = hex::encode(entries[k].digest);
                        let name = match self.layout {
                            Layout::Flat => &hexname[..],
                            Layout::Objects => &hexname[2..],
                        };
                        reply.add(INodeNo(self.inos[k]), pos + 1, FileType::RegularFile, name)
                    }
                }
            };
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let h = self.image.header();
        let files = h.blob_count + 1 + self.prefixes.len() as u64;
        reply.statfs(h.image_size / 4096, 0, 0, files, 0, 4096, 64, 4096);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) {
            return reply.error(Errno::EROFS);
        }
        match self.getattr_of(ino.0) {
            Some(a) if a.kind == FileType::RegularFile && mask.contains(AccessFlags::X_OK) => {
                reply.error(Errno::EACCES)
            }
            Some(_) => reply.ok(),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let idx = match self.blob_of(ino.0) {
            Ok(i) if name == DIGEST_XATTR => i,
            Ok(_) | Err(Errno::EISDIR) => return reply.error(Errno::ENODATA),
            Err(e) => return reply.error(e),
        };
        let value = hex::encode(self.image.entries()[idx].digest);
        reply_xattr(reply, value.as_bytes(), size);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let names: &[u8] = match self.blob_of(ino.0) {
            Ok(_) => b"user.blobfs.digest\0",
            Err(Errno::EISDIR) => b"",
            Err(e) => return reply.error(e),
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
        let idx = match self.blob_of(ino.0) {
            Ok(i) => i,
            Err(_) => return reply.error(Errno::ENODATA),
        };
        match measure_verity_reply(&self.image.entries()[idx].digest, in_data, out_size) {
            Ok(out) => reply.ioctl(0, &out),
            Err(e) => reply.error(e),
        }
    }

    // Everything that would modify the filesystem: the mount is read-only by construction
    // (it is also mounted `ro`, so the kernel refuses most of these before they arrive).
    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
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
        reply.error(Errno::EROFS);
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
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
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
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
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
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
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
        reply.error(Errno::EROFS);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to flush on a read-only image. ENOSYS makes the kernel stop sending FLUSH
        // on every close, saving a round trip per file.
        reply.error(Errno::ENOSYS);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }
}

/// The answer to `FS_IOC_MEASURE_VERITY`: `struct fsverity_digest { u16 digest_algorithm;
/// u16 digest_size; u8 digest[]; }`. The caller sets digest_size to its buffer's capacity.
pub(crate) fn measure_verity_reply(
    digest: &Hash,
    in_data: &[u8],
    out_size: u32,
) -> Result<Vec<u8>, Errno> {
    let capacity = match in_data.get(2..4) {
        Some(b) => u16::from_le_bytes([b[0], b[1]]) as usize,
        None => return Err(Errno::EINVAL),
    };
    if capacity < HASH_SIZE || (out_size as usize) < 4 + HASH_SIZE {
        return Err(Errno::EOVERFLOW);
    }
    let mut out = Vec::with_capacity(4 + HASH_SIZE);
    out.extend_from_slice(&1u16.to_le_bytes()); // FS_VERITY_HASH_ALG_SHA256
    out.extend_from_slice(&(HASH_SIZE as u16).to_le_bytes());
    out.extend_from_slice(digest);
    Ok(out)
}

/// Attributes of a blob file, shared by image and store mounts so both look the same.
pub(crate) fn file_attr(ino: u64, size: u64, perm: u16, owner: Owner) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: data_blocks(size) * 8,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm,
        nlink: 1,
        uid: owner.uid,
        gid: owner.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// Answer a getxattr/listxattr: the size when asked for it, ERANGE when the buffer is short.
pub(crate) fn reply_xattr(reply: ReplyXattr, value: &[u8], size: u32) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if (size as usize) < value.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}
