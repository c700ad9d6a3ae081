//! The only unsafe code of the crate: the loop-device ioctls, `mount_setattr(2)`, the
//! file-handle calls and `sync_file_range(2)`, which neither rustix nor nix wrap. Each function here is a thin, safe
//! wrapper around one call.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `<linux/loop.h>` ioctl numbers.
const LOOP_CLR_FD: libc::Ioctl = 0x4C01;
const LOOP_CONFIGURE: libc::Ioctl = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::Ioctl = 0x4C82;

pub const LO_FLAGS_READ_ONLY: u32 = 1;
pub const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` from `<linux/loop.h>` (LOOP_CONFIGURE, Linux 5.8).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

/// `struct mount_attr` from `<linux/mount.h>` (MOUNT_ATTR_SIZE_VER0).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const _: () = assert!(std::mem::size_of::<MountAttr>() == 32);

pub const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `ioctl(loop-control, LOOP_CTL_GET_FREE)`: the number of a free loop device (allocating one
/// if needed).
pub fn loop_ctl_get_free(control: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and only returns an int; the fd is valid for
    // the duration of the call (borrowed).
    let ret = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
    let n = check(ret.into())?;
    u32::try_from(n).map_err(|_| io::Error::from_raw_os_error(libc::ERANGE))
}

/// `ioctl(loop, LOOP_CONFIGURE)`: bind `backing` to the loop device with `flags`
/// (`LO_FLAGS_*`); `name` is recorded as the backing file name (truncated to 63 bytes).
pub fn loop_configure(
    dev: BorrowedFd<'_>,
    backing: BorrowedFd<'_>,
    flags: u32,
    block_size: u32,
    name: &[u8],
) -> io::Result<()> {
    let fd = u32::try_from(backing.as_raw_fd()).map_err(|_| io::Error::other("bad fd"))?;
    let mut file_name = [0u8; 64];
    let n = name.len().min(63);
    file_name[..n].copy_from_slice(&name[..n]);
    let config = LoopConfig {
        fd,
        block_size,
        info: LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: flags,
            lo_file_name: file_name,
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        },
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `config` is (layout checked
    // by the size assertions above); the kernel does not keep the pointer. Both fds are
    // borrowed, hence open, for the duration of the call.
    let ret = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            LOOP_CONFIGURE,
            &config as *const LoopConfig,
        )
    };
    check(ret.into()).map(drop)
}

/// `ioctl(loop, LOOP_CLR_FD)`: detach the backing file (deferred by the kernel until the last
/// opener closes the device if it is still in use).
pub fn loop_clr_fd(dev: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: LOOP_CLR_FD takes no argument; the fd is borrowed, hence open.
    let ret = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD) };
    check(ret.into()).map(drop)
}

/// `mount_setattr(mnt, "", AT_EMPTY_PATH, {attr_set: MOUNT_ATTR_IDMAP | other, userns_fd})`:
/// make the (detached) mount `mnt` idmapped through the user namespace `userns`, setting the
/// `other` `MOUNT_ATTR_*` flags in the same call.
pub fn mount_setattr_idmap(
    mnt: BorrowedFd<'_>,
    userns: BorrowedFd<'_>,
    other: u64,
) -> io::Result<()> {
    let userns_fd = u64::try_from(userns.as_raw_fd()).map_err(|_| io::Error::other("bad fd"))?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | other,
        attr_clr: 0,
        propagation: 0,
        userns_fd,
    };
    // SAFETY: mount_setattr reads `size` bytes of `struct mount_attr` from the pointer, which
    // is exactly `attr` (layout checked above); the path is a static NUL-terminated empty
    // string; both fds are borrowed, hence open, for the duration of the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mnt.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    check(ret).map(drop)
}

/// `MAX_HANDLE_SZ` from `<linux/exportfs.h>`.
const MAX_HANDLE_SZ: usize = 128;

/// `struct file_handle` with room for the largest handle.
#[repr(C)]
struct RawFileHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// A file handle: names an inode of a filesystem without holding it open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHandle {
    handle_type: i32,
    bytes: Vec<u8>,
}

/// `name_to_handle_at(fd, "", AT_EMPTY_PATH)`: the handle of the object `fd` refers to.
pub fn name_to_handle(fd: BorrowedFd<'_>) -> io::Result<FileHandle> {
    let mut raw = RawFileHandle {
        handle_bytes: MAX_HANDLE_SZ as u32,
        handle_type: 0,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `raw` is a `struct file_handle` whose `handle_bytes` announces exactly the room
    // it has; the path is a static NUL-terminated empty string (AT_EMPTY_PATH); `mount_id` is
    // a valid int; the fd is borrowed, hence open. The kernel keeps no pointer.
    let ret = unsafe {
        libc::name_to_handle_at(
            fd.as_raw_fd(),
            c"".as_ptr(),
            (&mut raw as *mut RawFileHandle).cast(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    check(ret.into())?;
    let n = (raw.handle_bytes as usize).min(MAX_HANDLE_SZ);
    Ok(FileHandle {
        handle_type: raw.handle_type,
        bytes: raw.f_handle[..n].to_vec(),
    })
}

/// `open_by_handle_at(mount, handle, flags)`: open the object named by `handle` on the
/// filesystem `mount` is on (needs CAP_DAC_READ_SEARCH). ESTALE if it no longer exists.
pub fn open_by_handle(
    mount: BorrowedFd<'_>,
    handle: &FileHandle,
    flags: i32,
) -> io::Result<OwnedFd> {
    let mut raw = RawFileHandle {
        handle_bytes: handle.bytes.len() as u32,
        handle_type: handle.handle_type,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    raw.f_handle[..handle.bytes.len()].copy_from_slice(&handle.bytes);
    // SAFETY: `raw` is a `struct file_handle` whose `handle_bytes` is at most MAX_HANDLE_SZ
    // (it came from name_to_handle); the fd is borrowed, hence open.
    let ret = unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            (&mut raw as *mut RawFileHandle).cast(),
            flags | libc::O_CLOEXEC,
        )
    };
    let fd = check(ret.into())?;
    // SAFETY: open_by_handle_at returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `dup3(src, dst, O_CLOEXEC)`: make descriptor number `dst` refer to the file `src` refers
/// to, atomically closing what `dst` referred to. Both are plain numbers; the caller makes sure
/// that whoever owns `dst` is fine with the swap.
pub fn replace_fd(src: RawFd, dst: RawFd) -> io::Result<()> {
    // SAFETY: dup3 reads and writes no memory of ours.
    check(unsafe { libc::dup3(src, dst, libc::O_CLOEXEC) }.into()).map(drop)
}

/// The pid of the process at the other end of the Unix socket under descriptor number `fd`
/// (`SO_PEERCRED`: the peer at connect or socketpair time). ENOTSOCK, EBADF as the call says.
pub fn socket_peer_pid(fd: RawFd) -> io::Result<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a valid `struct ucred` and `len` says exactly its size; the kernel
    // writes at most `len` bytes and keeps no pointer.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    check(ret.into())?;
    Ok(cred.pid)
}

/// `sync_file_range(fd, offset, len, SYNC_FILE_RANGE_WRITE)`: start writing back the dirty
/// pages of the range without waiting for them (len 0: to the end of the file). A writer that
/// fsyncs at the end calls this as it goes, so the disk works while it is still writing.
pub fn start_writeback(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let offset = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: sync_file_range reads and writes no memory of ours; the fd is borrowed, hence
    // open for the duration of the call.
    let ret =
        unsafe { libc::sync_file_range(fd.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
    check(ret.into()).map(drop)
}
