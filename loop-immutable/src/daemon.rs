//! attach / detach / list / mount: the daemon's life cycle around a backend.
//!
//! `attach` without -f re-executes this program as the daemon (never fork(): see
//! cli_common::daemon); the daemon reports `device PATH` and then `ready` on its stdout pipe
//! once the device is live, and the caller prints the path. The daemon runs in a mount
//! namespace of its own (made private before any thread exists), so a filesystem mounted on its
//! device never holds a reference in the daemon's namespace, and the FUSE backend's mount is
//! invisible to everyone else.

use crate::audit::{self, AuditLog};
use crate::cli::{AttachOpts, Backend};
use crate::image::{Image, fmt_time};
use crate::overlay::{Engine, OverlayKind, check_not_image};
use crate::state::{self, State, Verdict};
use cli_common::CliError;
use cli_common::daemon::Daemon;
use serde_json::json;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const DAEMON: Daemon = Daemon::new("LOOP_IMMUTABLE_DAEMON_CHILD");

/// Called by a backend once its device is live: device path and ublk id.
pub type Ready = Box<dyn FnOnce(&str, Option<u32>) -> Result<(), CliError> + Send + Sync>;

fn fail(msg: impl Into<String>) -> CliError {
    CliError::failure(msg.into())
}

/// Re-run this program as the daemon and wait for its device path.
fn spawn() -> Result<String, CliError> {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let mut child = Command::new("/proc/self/exe")
        .arg0(argv0)
        .args(std::env::args_os().skip(1))
        .env(DAEMON.child_env, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| fail(format!("cannot start the daemon: {e}")))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| fail("daemon started without a readiness pipe"))?;
    let mut device = None;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if let Some(d) = line.strip_prefix("device ") {
            device = Some(d.to_string());
        } else if line == "ready" {
            return device.ok_or_else(|| fail("daemon reported no device"));
        }
    }
    let status = child.wait().ok().and_then(|s| s.code()).unwrap_or(1);
    std::process::exit(if status == 0 { 1 } else { status });
}

/// Give the daemon a private mount namespace. Must run before any thread is started
/// (unshare(CLONE_NEWNS) also unshares the fs struct, which fails in a threaded process).
fn private_mount_namespace() -> Result<(), CliError> {
    use nix::mount::{MsFlags, mount};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(|e| {
        fail(format!(
            "cannot create a mount namespace (run as root): {e}"
        ))
    })?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| fail(format!("cannot make the mount namespace private: {e}")))
}

fn overlay_kind(opts: &AttachOpts) -> OverlayKind {
    match (&opts.cow, opts.cow_mem) {
        (Some(p), _) => OverlayKind::File(std::path::absolute(p).unwrap_or_else(|_| p.clone())),
        (None, true) => OverlayKind::Memory,
        (None, false) => OverlayKind::None,
    }
}

fn overlay_name(k: &OverlayKind) -> String {
    match k {
        OverlayKind::None => "none".into(),
        OverlayKind::Memory => "memory".into(),
        OverlayKind::File(p) => p.display().to_string(),
    }
}

/// `attach` (and the daemon half of `mount`).
pub fn attach(image: &Path, opts: &AttachOpts, foreground: bool) -> Result<(), CliError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(fail(
            "loop-immutable must run as root (it creates block devices)",
        ));
    }
    if !(foreground || DAEMON.is_child()) {
        let dev = spawn()?;
        println!("{dev}");
        return Ok(());
    }
    serve(image, opts, |dev| {
        if DAEMON.is_child() {
            let mut out = std::io::stdout();
            let _ = writeln!(out, "device {dev}");
            let _ = out.flush();
            DAEMON.announce_ready();
        } else {
            println!("{dev}");
            let _ = std::io::stdout().flush();
        }
    })
}

/// Open, hash, log, serve until detached, then check the image again.
fn serve(
    image_path: &Path,
    opts: &AttachOpts,
    announce: impl FnOnce(&str) + Send + Sync + 'static,
) -> Result<(), CliError> {
    DAEMON.start_child();
    private_mount_namespace()?;
    let image = Image::open(image_path).map_err(CliError::failure)?;
    let size = image.size();
    if size < u64::from(opts.logical_block_size) {
        return Err(fail(format!(
            "image {} is smaller than one block ({size} bytes)",
            image_path.display()
        )));
    }
    if size % u64::from(opts.logical_block_size) != 0 {
        tracing::warn!(
            "image size {size} is not a multiple of {}: the last {} bytes are not visible",
            opts.logical_block_size,
            size % u64::from(opts.logical_block_size)
        );
    }
    if !image.noatime() {
        tracing::info!(
            "O_NOATIME not permitted on {}: reads may update its atime",
            image_path.display()
        );
    }
    tracing::info!("hashing {} ({size} bytes)", image.path().display());
    let sha = image
        .sha256()
        .map_err(|e| fail(format!("cannot read the image: {e}")))?;
    if let Some(want) = &opts.expect_sha256
        && *want != sha
    {
        return Err(fail(format!(
            "image {} has sha256 {sha}, expected {want}: refusing to attach",
            image_path.display()
        )));
    }
    let overlay = overlay_kind(opts);
    let audit = match &opts.audit {
        Some(p) => {
            let a = AuditLog::open(p).map_err(CliError::failure)?;
            check_not_image(&image, a.file(), "audit log").map_err(CliError::failure)?;
            Some(a)
        }
        None => None,
    };
    let id = image.identity().clone();
    let kind = format!("{:?}", image.kind()).to_lowercase();
    let image_name = image.path().display().to_string();
    let engine = Arc::new(Engine::new(image, &overlay, &sha, audit).map_err(CliError::failure)?);
    if let Some(mut a) = engine.audit() {
        a.append(
            "attach",
            json!({
                "image": image_name, "kind": kind, "size": size, "sha256": sha,
                "dev": id.dev, "ino": id.ino, "mtime": fmt_time(id.mtime),
                "ctime": fmt_time(id.ctime), "overlay": overlay_name(&overlay),
                "backend": opts.backend, "logical_block_size": opts.logical_block_size,
                "pid": std::process::id(),
                "host": std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()),
            }),
        )
        .and_then(|()| a.sync())
        .map_err(|e| fail(format!("audit log: {e}")))?;
    }
    let st = State {
        device: String::new(),
        pid: std::process::id(),
        backend: opts.backend,
        image: image_name.clone(),
        image_sha256: sha.clone(),
        overlay: overlay_name(&overlay),
        audit: opts.audit.as_ref().map(|p| {
            std::path::absolute(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string()
        }),
        read_only: !engine.writable(),
        logical_block_size: opts.logical_block_size,
        started: audit::now_rfc3339(),
        ublk_id: None,
    };
    let device = Arc::new(std::sync::Mutex::new(String::new()));
    let dev2 = device.clone();
    let ready: Ready = Box::new(move |dev: &str, ublk_id| {
        let mut st = st;
        st.device = dev.to_string();
        st.ublk_id = ublk_id;
        state::save(&st).map_err(|e| {
            fail(format!(
                "cannot record state in {}: {e}",
                state::dir().display()
            ))
        })?;
        *dev2.lock().unwrap_or_else(|e| e.into_inner()) = dev.to_string();
        tracing::info!(
            "{dev}: serving {} ({}, overlay {})",
            st.image,
            if st.read_only {
                "read-only"
            } else {
                "copy-on-write"
            },
            st.overlay
        );
        announce(dev);
        Ok(())
    });
    let served = match opts.backend {
        Backend::Ublk => crate::ublk::serve(engine.clone(), opts.logical_block_size, ready),
        Backend::Fuse => crate::fuse::serve(engine.clone(), opts.logical_block_size, ready),
    };
    let dev = device.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let verdict = finish(&engine, &dev, &sha);
    if !dev.is_empty() {
        state::remove(&dev);
    }
    served?;
    let v = verdict?;
    if !dev.is_empty() {
        let _ = state::save_verdict(&v);
    }
    if v.unchanged() {
        tracing::info!("{dev}: detached; image unchanged (sha256 {sha})");
        Ok(())
    } else {
        Err(fail(format!(
            "IMAGE CHANGED while attached: {}",
            v.changes.join("; ")
        )))
    }
}

/// After the device is gone: close the overlay, re-check and re-hash the image, log detach.
fn finish(engine: &Engine, dev: &str, sha: &str) -> Result<Verdict, CliError> {
    if let Err(e) = engine.close() {
        tracing::error!("closing the overlay: {e}");
    }
    let image = engine.image();
    let mut changes = match image.current_identity() {
        Ok(now) => image.identity().changes(&now),
        Err(e) => vec![format!("cannot stat the image: {e}")],
    };
    if !image.path_still_matches() {
        tracing::warn!(
            "{} now names another file (the original is what was served)",
            image.path().display()
        );
    }
    let now_sha = image
        .sha256()
        .unwrap_or_else(|e| format!("unreadable: {e}"));
    if now_sha != sha {
        changes.push(format!("sha256 changed: {sha} -> {now_sha}"));
    }
    for c in &changes {
        tracing::error!("IMAGE {} CHANGED: {c}", image.path().display());
    }
    let ext = engine.extents();
    if let Some(mut a) = engine.audit() {
        a.append(
            "detach",
            json!({"sha256": now_sha, "changes": changes, "overlay_ranges": ext.len(),
                   "overlay_bytes": ext.bytes()}),
        )
        .and_then(|()| a.sync())
        .map_err(|e| fail(format!("audit log: {e}")))?;
    }
    Ok(Verdict {
        device: dev.to_string(),
        image: image.path().display().to_string(),
        attach_sha256: sha.to_string(),
        detach_sha256: now_sha,
        changes,
    })
}

/// Run `f` on SIGTERM, SIGINT or SIGHUP (from a thread of its own).
pub fn on_signals(f: impl Fn() + Send + 'static) -> Result<(), CliError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| fail(format!("cannot install signal handlers: {e}")))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                tracing::info!("signal {sig}: detaching");
                f();
            }
        })
        .map_err(|e| fail(format!("cannot start the signal thread: {e}")))?;
    Ok(())
}

/// The source device of the mount at `dir`, if `dir` is a mount point.
fn mounted_device(dir: &Path) -> Option<String> {
    let dir = std::fs::canonicalize(dir).ok()?;
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().rev().find_map(|l| {
        let mut f = l.split(' ');
        let mp = f.nth(4)?;
        if Path::new(mp) != dir {
            return None;
        }
        let rest = l.split(" - ").nth(1)?;
        rest.split(' ').nth(1).map(str::to_string)
    })
}

/// Where `dev` is mounted (in this namespace).
fn mount_points_of(dev: &str) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter(|l| l.split(" - ").nth(1).and_then(|r| r.split(' ').nth(1)) == Some(dev))
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .collect()
}

/// `detach TARGET` / `detach --all`.
pub fn detach(target: Option<&Path>, all: bool) -> Result<(), CliError> {
    if all {
        let mut failed = 0;
        for s in state::all() {
            if let Err(e) = detach_device(&s.device) {
                eprintln!("loop-immutable: error: {}: {}", s.device, e.error);
                failed += 1;
            }
        }
        return if failed == 0 {
            Ok(())
        } else {
            Err(fail(format!("{failed} device(s) not detached cleanly")))
        };
    }
    let Some(target) = target else {
        return Err(CliError::usage(
            "detach needs a device, a mount point or --all",
        ));
    };
    // A ublk device whose daemon was killed has lost its /dev node: match the name as given.
    let recorded = target.to_string_lossy();
    if !target.exists() && state::all().iter().any(|s| s.device == recorded) {
        return detach_device(&recorded);
    }
    let meta = std::fs::metadata(target).map_err(|e| fail(format!("{}: {e}", target.display())))?;
    let device = if meta.is_dir() {
        let dev = mounted_device(target)
            .ok_or_else(|| fail(format!("{} is not a mount point", target.display())))?;
        if !state::all().iter().any(|s| s.device == dev) {
            return Err(fail(format!(
                "{} is mounted from {dev}, which is not a loop-immutable device",
                target.display()
            )));
        }
        nix::mount::umount(target)
            .map_err(|e| fail(format!("cannot unmount {}: {e}", target.display())))?;
        dev
    } else {
        std::fs::canonicalize(target)
            .unwrap_or_else(|_| target.to_owned())
            .display()
            .to_string()
    };
    detach_device(&device)
}

fn detach_device(device: &str) -> Result<(), CliError> {
    let Some(s) = state::all().into_iter().find(|s| s.device == device) else {
        return Err(fail(format!(
            "{device} is not attached by loop-immutable (see `loop-immutable list`)"
        )));
    };
    if state::alive(s.pid) {
        // Refuse while something holds the device: stopping it would fail that user's I/O.
        let busy = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(device)
            .err()
            .is_some_and(|e| e.raw_os_error() == Some(libc::EBUSY));
        if busy {
            let mps = mount_points_of(device);
            return Err(fail(if mps.is_empty() {
                format!("{device} is in use")
            } else {
                format!(
                    "{device} is mounted on {}: unmount it first (or detach the mount point)",
                    mps.join(", ")
                )
            }));
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(s.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .map_err(|e| fail(format!("cannot signal daemon {}: {e}", s.pid)))?;
        // Detaching re-hashes the whole image: allow for a large one on a slow disk.
        let start = Instant::now();
        while state::alive(s.pid) {
            if start.elapsed() > Duration::from_secs(3600) {
                return Err(fail(format!("daemon {} did not exit", s.pid)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        state::remove(device);
        return report(state::take_verdict(device), device);
    }
    // The daemon died (killed): clean up after it and check the image ourselves.
    tracing::warn!("{device}: daemon {} is gone; cleaning up", s.pid);
    match s.backend {
        Backend::Ublk => crate::ublk::delete(s.ublk_id),
        Backend::Fuse => crate::fuse::release_loop(device, s.pid),
    }
    state::remove(device);
    let v = recheck_dead(&s)?;
    report(Some(v), device)
}

use std::os::unix::fs::OpenOptionsExt;

/// The daemon was killed: hash the image again and close its audit session.
fn recheck_dead(s: &State) -> Result<Verdict, CliError> {
    let image = Image::open(Path::new(&s.image)).map_err(CliError::failure)?;
    let sha = image.sha256().map_err(CliError::failure)?;
    let mut changes = Vec::new();
    if sha != s.image_sha256 {
        changes.push(format!("sha256 changed: {} -> {sha}", s.image_sha256));
    }
    if let Some(a) = &s.audit {
        let mut log = AuditLog::open(Path::new(a)).map_err(CliError::failure)?;
        log.append(
            "detach",
            json!({"sha256": sha, "changes": changes, "daemon_died": true, "pid": s.pid}),
        )
        .and_then(|()| log.sync())
        .map_err(CliError::failure)?;
    }
    Ok(Verdict {
        device: s.device.clone(),
        image: s.image.clone(),
        attach_sha256: s.image_sha256.clone(),
        detach_sha256: sha,
        changes,
    })
}

fn report(v: Option<Verdict>, device: &str) -> Result<(), CliError> {
    let Some(v) = v else {
        return Err(fail(format!(
            "{device}: the daemon exited without a verdict (see its log)"
        )));
    };
    if v.unchanged() {
        println!(
            "{device}: detached; {} unchanged (sha256 {})",
            v.image, v.detach_sha256
        );
        Ok(())
    } else {
        Err(fail(format!(
            "{device}: IMAGE {} CHANGED: {}",
            v.image,
            v.changes.join("; ")
        )))
    }
}

/// `list`.
pub fn list(json_out: bool) -> Result<(), CliError> {
    let all = state::all();
    if json_out {
        for s in &all {
            let mut v = serde_json::to_value(s).map_err(CliError::failure)?;
            v["alive"] = json!(state::alive(s.pid));
            println!("{v}");
        }
        return Ok(());
    }
    if all.is_empty() {
        return Ok(());
    }
    println!(
        "{:<14} {:>7} {:<5} {:<4} {:<10} IMAGE",
        "DEVICE", "PID", "STATE", "MODE", "OVERLAY"
    );
    for s in &all {
        println!(
            "{:<14} {:>7} {:<5} {:<4} {:<10} {}",
            s.device,
            s.pid,
            if state::alive(s.pid) { "live" } else { "dead" },
            if s.read_only { "ro" } else { "cow" },
            s.overlay,
            s.image
        );
    }
    Ok(())
}

/// `mount IMAGE DIR`: attach as a daemon, then mount(8) the device.
pub fn mount(
    image: &Path,
    dir: &Path,
    opts: &AttachOpts,
    options: &[String],
    fstype: Option<&str>,
) -> Result<(), CliError> {
    if DAEMON.is_child() {
        return attach(image, opts, false);
    }
    if !std::fs::metadata(dir).is_ok_and(|m| m.is_dir()) {
        return Err(fail(format!(
            "mount point {} is not a directory",
            dir.display()
        )));
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(fail(
            "loop-immutable must run as root (it creates block devices)",
        ));
    }
    let dev = spawn()?;
    let mut o = String::from("ro,nosuid,nodev,noexec");
    for x in options {
        o.push(',');
        o.push_str(x);
    }
    let mut cmd = Command::new("mount");
    if let Some(t) = fstype {
        cmd.arg("-t").arg(t);
    }
    let out = cmd
        .arg("-o")
        .arg(&o)
        .arg(&dev)
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| fail(format!("cannot run mount(8): {e}")));
    let ok = matches!(&out, Ok(o) if o.status.success());
    if ok {
        println!("{dev}");
        return Ok(());
    }
    let why = match out {
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
        Err(e) => e.error.to_string(),
    };
    let hint = if opts.cow.is_none() && !opts.cow_mem {
        "; the device is read-only: a filesystem that needs journal recovery cannot mount \
         without an overlay, retry with --cow FILE or --cow-mem to replay it there"
    } else {
        ""
    };
    if let Err(e) = detach_device(&dev) {
        eprintln!("loop-immutable: error: detaching {dev}: {}", e.error);
    }
    Err(fail(format!(
        "mounting {dev} on {} failed: {why}{hint}",
        dir.display()
    )))
}

/// The path given to --cow etc. as absolute (the daemon may change directory).
pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}
