//! A user namespace carrying the id maps of an idmapped mount.
//!
//! A process has to be inside the namespace while its maps are written, and
//! `unshare(CLONE_NEWUSER)` refuses multi-threaded callers, so this program re-executes itself
//! (`/proc/self/exe`, argv[0] [`HELPER_ARGV0`]) as a tiny helper that unshares, reports
//! readiness on stdout and waits for stdin to close. The parent writes the maps into
//! `/proc/PID/{uid,gid}_map`, opens `/proc/PID/ns/user`, and ends the helper; the namespace
//! lives on through that fd. The helper is always reaped before [`create`] returns, and it also
//! exits by itself if the parent dies (its stdin closes).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

/// argv[0] of the helper process.
pub const HELPER_ARGV0: &str = "mount-api-userns-helper";
const READY: &str = "ready";

/// Entry point of the helper process.
pub fn helper_main() -> std::process::ExitCode {
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER) {
        eprintln!("{HELPER_ARGV0}: unshare(CLONE_NEWUSER): {e}");
        return std::process::ExitCode::FAILURE;
    }
    let mut out = io::stdout();
    let _ = writeln!(out, "{READY}");
    let _ = out.flush();
    // Wait for the parent to close our stdin (or die).
    let _ = io::stdin().read_to_end(&mut Vec::new());
    std::process::ExitCode::SUCCESS
}

/// Reaps the helper on every path.
struct Helper(Child);

impl Drop for Helper {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Create a user namespace with these maps (text in `/proc/PID/uid_map` format; an empty map
/// is written as the identity by the caller) and return an fd to it.
pub fn create(uid_map: &str, gid_map: &str) -> io::Result<OwnedFd> {
    let child = Command::new("/proc/self/exe")
        .arg0(HELPER_ARGV0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start the userns helper: {e}")))?;
    let mut helper = Helper(child);
    let pid = helper.0.id();
    let mut line = String::new();
    if let Some(out) = helper.0.stdout.take() {
        BufReader::new(out).read_line(&mut line)?;
    }
    if line.trim() != READY {
        return Err(io::Error::other(
            "the userns helper could not create a user namespace",
        ));
    }
    let write_map = |file: &str, text: &str| {
        let path = format!("/proc/{pid}/{file}");
        // The kernel takes the whole map in one write.
        let mut f = File::options().write(true).open(&path)?;
        f.write_all(text.as_bytes())
            .map_err(|e| io::Error::new(e.kind(), format!("writing {path} ({text:?}): {e}")))
    };
    write_map("uid_map", uid_map)?;
    write_map("gid_map", gid_map)?;
    let ns = File::open(format!("/proc/{pid}/ns/user"))?;
    drop(helper);
    Ok(ns.into())
}
