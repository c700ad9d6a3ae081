//! Attaching an image file to a loop device (`/dev/loop-control` + `LOOP_CONFIGURE`).
//!
//! The device is configured with `LO_FLAGS_AUTOCLEAR`: the kernel detaches it when its last
//! opener closes it, so once the filesystem holds it, unmounting releases it. Until
//! [`LoopDevice::keep`] is called, dropping the guard detaches it explicitly.

use crate::sys;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// An attached loop device, detached on drop unless kept.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    dev: Option<File>,
}

impl LoopDevice {
    /// Attach `image` (opened read-only if `read_only`).
    pub fn attach(image: &Path, read_only: bool) -> io::Result<LoopDevice> {
        let backing = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(image)
            .map_err(|e| annotate(e, &format!("cannot open {}", image.display())))?;
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")
            .map_err(|e| annotate(e, "cannot open /dev/loop-control"))?;
        let mut flags = sys::LO_FLAGS_AUTOCLEAR;
        if read_only {
            flags |= sys::LO_FLAGS_READ_ONLY;
        }
        let name = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_owned());
        // Another process may take the free device between GET_FREE and CONFIGURE (EBUSY):
        // ask again.
        let mut last_err = None;
        for _ in 0..16 {
            let n = sys::loop_ctl_get_free(control.as_fd())
                .map_err(|e| annotate(e, "cannot allocate a loop device"))?;
            let path = PathBuf::from(format!("/dev/loop{n}"));
            let dev = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(d) => d,
                Err(e) => {
                    last_err = Some(annotate(e, &format!("cannot open {}", path.display())));
                    continue;
                }
            };
            match sys::loop_configure(
                dev.as_fd(),
                backing.as_fd(),
                flags,
                0,
                name.as_os_str().as_bytes(),
            ) {
                Ok(()) => {
                    tracing::debug!("attached {} to {}", image.display(), path.display());
                    return Ok(LoopDevice {
                        path,
                        dev: Some(dev),
                    });
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last_err = Some(e),
                Err(e) => {
                    return Err(annotate(
                        e,
                        &format!("cannot attach {} to {}", image.display(), path.display()),
                    ));
                }
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("no free loop device")))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The filesystem now holds the device: close our handle and leave its release to
    /// autoclear (at unmount).
    pub fn keep(mut self) {
        self.dev = None;
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Some(dev) = self.dev.take() {
            // If something still holds the device (a superblock being torn down), the kernel
            // defers the detach to its last close; autoclear is set anyway.
            if let Err(e) = sys::loop_clr_fd(dev.as_fd()) {
                tracing::debug!("detaching {}: {e}", self.path.display());
            } else {
                tracing::debug!("detached {}", self.path.display());
            }
        }
    }
}

fn annotate(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}
