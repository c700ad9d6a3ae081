//! Running a FUSE server as a mount(8)-style daemon: the command returns once the mount is live
//! (or fails with the server's own message and exit status), and the server then lives on,
//! detached, logging to syslog, and unmounts cleanly on SIGTERM/SIGINT/SIGHUP.
//!
//! The daemon is the same program re-executed with a marker in its environment, never a fork():
//! the parent may already have threads (logging, RocksDB), and forking those is unsound. Its
//! stdout is a pipe on which it writes one line once the mount is live.

use crate::CliError;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const READY: &str = "ready";

/// A daemon identified by the environment variable that marks its re-executed child.
#[derive(Debug, Clone, Copy)]
pub struct Daemon {
    pub child_env: &'static str,
}

impl Daemon {
    pub const fn new(child_env: &'static str) -> Daemon {
        Daemon { child_env }
    }

    /// Whether this process is the re-executed daemon child.
    pub fn is_child(&self) -> bool {
        std::env::var_os(self.child_env).is_some()
    }

    /// Re-run this program, with the same argv[0] and arguments, as the daemon child and wait
    /// until it reports that the mount is live. If it dies first it has printed its own error;
    /// this process then exits with the child's status.
    ///
    /// The program is re-executed through `/proc/self/exe`, which refers to the running binary
    /// itself: that works when the binary's directory is not searchable by the caller (an
    /// unprivileged user running a binary under a 0700 directory it was handed), and when the
    /// file was replaced by an upgrade since this process started.
    pub fn spawn(&self) -> Result<(), CliError> {
        // Keep argv[0]: multi-call binaries (`mount.blobfs`) dispatch on it.
        let argv0 = std::env::args_os().next().unwrap_or_default();
        let mut child = Command::new("/proc/self/exe")
            .arg0(argv0)
            .args(std::env::args_os().skip(1))
            .env(self.child_env, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| CliError::failure(format!("cannot start the mount daemon: {e}")))?;
        let Some(stdout) = child.stdout.take() else {
            return Err(CliError::failure(
                "mount daemon started without a readiness pipe",
            ));
        };
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        if line.trim() == READY {
            return Ok(());
        }
        let status = child.wait().ok().and_then(|s| s.code()).unwrap_or(1);
        std::process::exit(if status == 0 { 1 } else { status });
    }

    /// In the child, before mounting: leave the caller's session so a terminal hangup does not
    /// reach the daemon.
    pub fn start_child(&self) {
        if self.is_child() {
            let _ = nix::unistd::setsid();
        }
    }

    /// Once the mount is live: tell the waiting parent, then send logs to syslog and point
    /// stdout/stderr at /dev/null (the parent's terminal may be gone at any time).
    pub fn announce_ready(&self) {
        if !self.is_child() {
            return;
        }
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{READY}");
        let _ = out.flush();
        crate::logging::detach_to_syslog();
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            let _ = nix::unistd::dup2_stdout(&null);
            let _ = nix::unistd::dup2_stderr(&null);
        }
    }
}

/// Unmount `mountpoint` on SIGTERM, SIGINT or SIGHUP; the FUSE session then ends normally.
pub fn unmount_on_signals(mountpoint: &Path) -> Result<(), CliError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mountpoint: PathBuf =
        std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| CliError::failure(format!("cannot install signal handlers: {e}")))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                tracing::info!("signal {sig}: unmounting {}", mountpoint.display());
                unmount_gracefully(&mountpoint);
            }
        })
        .map_err(|e| CliError::failure(format!("cannot start the signal thread: {e}")))?;
    Ok(())
}

/// Unmount after a signal. A plain unmount can fail with EBUSY for a moment after a file was
/// closed (FUSE sends RELEASE asynchronously), so retry briefly; if still busy, detach lazily:
/// open files keep working and the session ends when the last one is closed. An unprivileged
/// daemon cannot umount2() at all and goes through the setuid fusermount3.
pub fn unmount_gracefully(mountpoint: &Path) {
    use nix::errno::Errno;
    use nix::mount::{MntFlags, umount2};
    let fusermount = |flags: &str| {
        Command::new("fusermount3")
            .arg(flags)
            .arg(mountpoint)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    for _ in 0..20 {
        match umount2(mountpoint, MntFlags::empty()) {
            Ok(()) => return,
            Err(Errno::EBUSY) => std::thread::sleep(Duration::from_millis(50)),
            Err(Errno::EPERM) if fusermount("-u") => return,
            Err(e) => {
                tracing::warn!("unmount of {} failed: {e}", mountpoint.display());
                break;
            }
        }
    }
    tracing::warn!("{} is busy; detaching it lazily", mountpoint.display());
    if umount2(mountpoint, MntFlags::MNT_DETACH).is_err() {
        let _ = fusermount("-uz");
    }
}
