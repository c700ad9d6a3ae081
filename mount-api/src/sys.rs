//! The only unsafe code of the crate: the loop-device ioctls and `mount_setattr(2)`, which
//! neither rustix nor nix wrap. Each function here is a thin, safe wrapper around one call.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

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
    name: &[u8],
) -> io::Result<()> {
    let fd = u32::try_from(backing.as_raw_fd()).map_err(|_| io::Error::other("bad fd"))?;
    let mut file_name = [0u8; 64];
    let n = name.len().min(63);
    file_name[..n].copy_from_slice(&name[..n]);
    let config = LoopConfig {
        fd,
        block_size: 0,
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
