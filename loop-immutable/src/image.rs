//! The evidence: an image file or block device opened read-only, never anything else.
//!
//! The only descriptor this program ever holds on the image is the `O_RDONLY` one opened here
//! (with `O_NOATIME` when the caller owns the file or has CAP_FOWNER, so even reading it leaves
//! its access time alone). Its identity (device, inode, size, mtime, ctime) is recorded at
//! attach and compared again at detach.

use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What the image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    BlockDevice,
}

/// Everything that must not change while the image is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    /// For a block device: its device number.
    pub rdev: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl Identity {
    /// Human-readable differences from `later` (empty: unchanged). ctime alone is reported too:
    /// it moves on any write and cannot be set back from userspace.
    pub fn changes(&self, later: &Identity) -> Vec<String> {
        let mut out = Vec::new();
        if (self.dev, self.ino, self.rdev) != (later.dev, later.ino, later.rdev) {
            out.push(format!(
                "inode changed: {}:{} -> {}:{}",
                self.dev, self.ino, later.dev, later.ino
            ));
        }
        if self.size != later.size {
            out.push(format!("size changed: {} -> {}", self.size, later.size));
        }
        if self.mtime != later.mtime {
            out.push(format!(
                "mtime changed: {} -> {}",
                fmt_time(self.mtime),
                fmt_time(later.mtime)
            ));
        }
        if self.ctime != later.ctime {
            out.push(format!(
                "ctime changed: {} -> {}",
                fmt_time(self.ctime),
                fmt_time(later.ctime)
            ));
        }
        out
    }
}

pub fn fmt_time(t: (i64, i64)) -> String {
    format!("{}.{:09}", t.0, t.1)
}

/// An image opened for reading only.
#[derive(Debug)]
pub struct Image {
    file: File,
    path: PathBuf,
    kind: Kind,
    identity: Identity,
    noatime: bool,
}

impl Image {
    /// Open `path` read-only. Anything but a regular file or a block device is refused before
    /// it is opened (a FIFO or a device with side effects on open must never be touched).
    pub fn open(path: &Path) -> io::Result<Image> {
        let pre = std::fs::metadata(path)
            .map_err(|e| with_context(e, &format!("image {}", path.display())))?;
        let ft = pre.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "image {} is not a regular file or a block device",
                    path.display()
                ),
            ));
        }
        let open = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .custom_flags(flags | libc::O_NOCTTY | libc::O_NONBLOCK)
                .open(path)
        };
        // O_NOATIME is only permitted to the owner (or CAP_FOWNER): EPERM otherwise.
        let (file, noatime) = match open(libc::O_NOATIME) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => (open(0)?, false),
            Err(e) => return Err(with_context(e, &format!("image {}", path.display()))),
        };
        let meta = file.metadata()?;
        let ft = meta.file_type();
        // The path may have been swapped between the check and the open.
        let kind = if ft.is_file() {
            Kind::File
        } else if ft.is_block_device() {
            Kind::BlockDevice
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("image {} changed type while opening", path.display()),
            ));
        };
        let mut image = Image {
            file,
            path: std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned()),
            kind,
            identity: Identity {
                dev: 0,
                ino: 0,
                rdev: 0,
                size: 0,
                mtime: (0, 0),
                ctime: (0, 0),
            },
            noatime,
        };
        image.identity = image.current_identity()?;
        Ok(image)
    }

    /// fstat of the open descriptor now (size by seeking for block devices).
    pub fn current_identity(&self) -> io::Result<Identity> {
        let meta = self.file.metadata()?;
        let size = match self.kind {
            Kind::File => meta.len(),
            Kind::BlockDevice => (&self.file).seek(SeekFrom::End(0))?,
        };
        Ok(Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            rdev: meta.rdev(),
            size,
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        })
    }

    /// Whether `path` still names the same file (it may have been renamed over or deleted;
    /// the descriptor keeps serving the original either way).
    pub fn path_still_matches(&self) -> bool {
        std::fs::metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.identity.dev && m.ino() == self.identity.ino)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn size(&self) -> u64 {
        self.identity.size
    }

    pub fn noatime(&self) -> bool {
        self.noatime
    }

    /// Fill `buf` from `offset`; bytes past the end of the image read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// SHA-256 of the whole content, read through the same read-only descriptor.
    pub fn sha256(&self) -> io::Result<String> {
        sha256_reader(|buf, off| self.read_chunk(buf, off))
    }

    fn read_chunk(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        loop {
            match self.file.read_at(buf, offset) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    /// The descriptor, for backends that hand it to the kernel (it stays read-only).
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// SHA-256 of everything `read(buf, offset)` returns until it returns 0.
pub fn sha256_reader(
    mut read: impl FnMut(&mut [u8], u64) -> io::Result<usize>,
) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = read(&mut buf, off)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        off += n as u64;
    }
    Ok(hex::encode(hasher.finalize()))
}

/// SHA-256 of a file opened read-only (no O_NOATIME needed: used on copies and in tests).
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let f = File::open(path)?;
    sha256_reader(|buf, off| f.read_at(buf, off))
}

pub fn with_context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_file_or_block_device() {
        let dir = tempfile::tempdir().unwrap();
        let e = Image::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Opening a FIFO without a writer would block: it must be refused before opening.
        let e = Image::open(&fifo).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = Image::open(&dir.path().join("missing")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let e = Image::open(Path::new("/dev/null")).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn hashes_and_reads_past_the_end_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, b"abc").unwrap();
        let img = Image::open(&p).unwrap();
        assert_eq!(img.size(), 3);
        assert_eq!(
            img.sha256().unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut buf = [9u8; 6];
        img.read_at(&mut buf, 1).unwrap();
        assert_eq!(&buf, b"bc\0\0\0\0");
        assert!(
            img.current_identity()
                .unwrap()
                .changes(img.identity())
                .is_empty()
        );
        assert!(img.path_still_matches());
    }
}
