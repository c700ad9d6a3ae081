//! Support for the integration tests: locating the built binaries, mounting FUSE filesystems
//! in fresh temporary directories with guaranteed cleanup, and small file helpers.
//!
//! Every mount made here is undone when its guard drops, also when a test fails or panics, so
//! the suite never leaves a stale mount behind.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a binary built from this workspace (`cargo build --workspace --bins` first; the
/// test command does that).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found: build the workspace binaries first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

/// Run a command to completion, capturing output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Run a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Mount points currently listed in this process's mount namespace.
pub fn mount_points() -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .collect()
}

/// The mountinfo line of the mount at `path`, if mounted.
pub fn mountinfo_line(path: &Path) -> Option<String> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines()
        .find(|l| l.split(' ').nth(4).map(unescape_mountinfo).as_deref() == path.to_str())
        .map(str::to_owned)
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn is_mounted(path: &Path) -> bool {
    mount_points().iter().any(|p| p == path)
}

/// Poll until `cond` holds or `timeout` passes. Short, growing pauses; no fixed sleeps.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// A FUSE mount served by a foreground child process. Dropping it unmounts (lazily if busy),
/// stops the daemon and removes the temporary mount point.
pub struct FuseMount {
    pub path: PathBuf,
    child: Option<Child>,
    /// The daemon's stderr, drained continuously: a daemon that logs a lot must never block
    /// on a full pipe.
    log: Option<std::thread::JoinHandle<String>>,
    _dir: tempfile::TempDir,
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> Option<std::thread::JoinHandle<String>> {
    r.map(|mut r| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    })
}

impl FuseMount {
    /// Start `cmd` (which must mount on the path given by `make_cmd` and stay in the
    /// foreground) and wait until the mount is live. On failure returns the daemon's output.
    pub fn start(make_cmd: impl FnOnce(&Path) -> Command) -> Result<FuseMount, String> {
        let dir = tempfile::Builder::new()
            .prefix("mnt.")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let path = dir.path().to_owned();
        let mut cmd = make_cmd(&path);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
        let log = drain(child.stderr.take());
        drop(drain(child.stdout.take()));
        let mut exited = None;
        let live = wait_until(Duration::from_secs(30), || {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                return true;
            }
            is_mounted(&path)
        });
        if let Some(status) = exited {
            let err = log.and_then(|h| h.join().ok()).unwrap_or_default();
            return Err(format!("daemon exited with {status}: {err}"));
        }
        if !live {
            let _ = child.kill();
            let _ = child.wait();
            return Err("mount did not appear within 30 s".into());
        }
        Ok(FuseMount {
            path,
            child: Some(child),
            log,
            _dir: dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Unmount and wait for the daemon; returns its stderr (for checking log lines).
    pub fn unmount(mut self) -> String {
        self.cleanup()
    }

    /// Kill the daemon with SIGKILL (the mount stays, dead, unless auto_unmount), once it has
    /// answered a request: the tests mean a daemon killed while serving, not one killed before
    /// fusermount3 has handed it the /dev/fuse descriptor.
    pub fn kill_daemon(&mut self) {
        let _ = fs::metadata(&self.path);
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn cleanup(&mut self) -> String {
        if is_mounted(&self.path) {
            unmount(&self.path);
        }
        if let Some(mut c) = self.child.take() {
            let exited = wait_until(Duration::from_secs(10), || {
                matches!(c.try_wait(), Ok(Some(_)))
            });
            if !exited {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        self.log
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Unmount `path`: plain umount first, lazy (MNT_DETACH) if it is busy or its daemon is gone.
pub fn unmount(path: &Path) {
    use nix::mount::{MntFlags, umount2};
    if umount2(path, MntFlags::empty()).is_err() {
        let _ = umount2(path, MntFlags::MNT_DETACH);
    }
    if is_mounted(path) {
        let _ = Command::new("fusermount3").arg("-uz").arg(path).status();
    }
}

/// Read a whole file, returning the errno on failure.
pub fn read_file(path: &Path) -> Result<Vec<u8>, i32> {
    fs::read(path).map_err(|e| e.raw_os_error().unwrap_or(-1))
}

/// pread exactly at `offset`; returns errno on failure.
pub fn pread(file: &fs::File, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.raw_os_error().unwrap_or(-1)),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
/// The blobs an `mkfs.blobfs --manifest` file names (`DIGEST SIZE PATH` lines): digest ->
/// the source file's contents.
pub fn manifest_blobs(manifest: &Path) -> std::collections::HashMap<String, Vec<u8>> {
    let text = fs::read_to_string(manifest).expect("manifest readable");
    text.lines()
        .map(|line| {
            let mut it = line.splitn(3, ' ');
            let digest = it.next().expect("digest").to_owned();
            let path = it.nth(1).expect("path");
            (digest, fs::read(path).expect("source file readable"))
        })
        .collect()
}

pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Loop devices (`/dev/loopN`) whose backing file is `file`, according to sysfs (what
/// `losetup -j FILE` reports).
pub fn loop_devices_backed_by(file: &Path) -> Vec<PathBuf> {
    let want = fs::canonicalize(file).unwrap_or_else(|_| file.to_owned());
    let Ok(dir) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter(|e| {
            fs::read_to_string(e.path().join("loop/backing_file"))
                .is_ok_and(|s| Path::new(s.trim_end()) == want)
        })
        .map(|e| Path::new("/dev").join(e.file_name()))
        .collect()
}
