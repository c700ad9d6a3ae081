//! loop-immutable with the FUSE backend on the host kernel (no ublk here): real loop devices and
//! ext4 images. In every case the image's SHA-256 and mtime must be unchanged and the audit log
//! must verify. Needs root.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use integration_tests::{bin, is_mounted, pseudo_random_bytes, run, run_ok, unmount, wait_until};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// A scratch directory with its own loop-immutable state directory, so `detach --all` on drop
/// only touches this test's devices, also when the test fails.
struct Env {
    t: tempfile::TempDir,
    mnt: PathBuf,
}

impl Env {
    fn new() -> Env {
        let t = tempfile::Builder::new()
            .prefix("loop-immutable.")
            .tempdir()
            .unwrap();
        let mnt = t.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        fs::create_dir(t.path().join("state")).unwrap();
        Env { t, mnt }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.t.path().join(name)
    }

    fn li(&self) -> Command {
        let mut c = Command::new(bin("loop-immutable"));
        c.env("LOOP_IMMUTABLE_STATE_DIR", self.p("state"));
        c
    }

    /// `loop-immutable ARGS` (FUSE backend added for attach and mount).
    fn run(&self, args: &[&str]) -> Output {
        let mut c = self.li();
        if matches!(args.first(), Some(&"attach" | &"mount")) {
            c.arg(args[0]).args(["--backend", "fuse"]).args(&args[1..]);
        } else {
            c.args(args);
        }
        run(&mut c)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "loop-immutable {args:?} failed with {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn devices(&self) -> usize {
        self.ok(&["list", "--json"]).lines().count()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            unmount(&self.mnt);
        }
        let _ = self.run(&["detach", "--all"]);
    }
}

/// SHA-256, mtime and ctime of a file.
fn stamp(p: &Path) -> (String, i64, i64, i64, i64) {
    let out = run_ok(Command::new("sha256sum").arg(p));
    let m = fs::metadata(p).unwrap();
    (
        out.split_whitespace().next().unwrap().to_string(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    )
}

/// A tree of files with known content, and an ext4 image built from it by mkfs (no mount).
fn make_tree(root: &Path, files: usize) {
    fs::create_dir_all(root.join("sub/deeper")).unwrap();
    for i in 0..files {
        let dir = if i % 3 == 0 {
            root.join("sub")
        } else {
            root.to_owned()
        };
        fs::write(
            dir.join(format!("f{i}")),
            pseudo_random_bytes(i as u64, 1000 + i * 997),
        )
        .unwrap();
    }
    fs::write(
        root.join("sub/deeper/big"),
        pseudo_random_bytes(99, 3 << 20),
    )
    .unwrap();
}

fn mkfs(img: &Path, tree: Option<&Path>) {
    let mut c = Command::new("mkfs.ext4");
    c.args(["-q", "-F", "-b", "1024"]);
    if let Some(t) = tree {
        c.arg("-d").arg(t);
    }
    run_ok(c.arg(img).arg("32M"));
}

fn same_tree(a: &Path, b: &Path) {
    // mkfs always adds lost+found.
    let out = run(Command::new("diff")
        .args(["-r", "--exclude=lost+found"])
        .arg(a)
        .arg(b));
    assert!(
        out.status.success(),
        "trees differ: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn verify_audit(env: &Env, log: &Path) -> String {
    let out = env.ok(&["verify-audit", log.to_str().unwrap()]);
    assert!(out.contains("chain intact"), "{out}");
    out
}

/// A journaled ext4 whose journal still holds the last files: copied from the live device
/// while mounted (as an acquisition of a running system would be), so `needs_recovery` is set.
fn make_dirty(env: &Env, img: &Path, files: usize) {
    let base = env.p("base.img");
    mkfs(&base, None);
    let m = env.p("base-mnt");
    fs::create_dir_all(&m).unwrap();
    let dev = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&base));
    let dev = dev.trim().to_string();
    let mounted = run(Command::new("mount").arg(&dev).arg(&m));
    if mounted.status.success() {
        for i in 0..files {
            fs::write(m.join(format!("entry{i}")), format!("entry {i}\n")).unwrap();
        }
        run_ok(Command::new("sync").arg("-f").arg(m.join("entry0")));
        run_ok(
            Command::new("dd")
                .arg(format!("if={dev}"))
                .arg(format!("of={}", img.display()))
                .args(["bs=1M", "status=none"]),
        );
        unmount(&m);
    }
    let _ = run(Command::new("losetup").arg("-d").arg(&dev));
    assert!(mounted.status.success(), "cannot mount the base image");
    let sb = run_ok(Command::new("dumpe2fs").arg("-h").arg(img));
    assert!(
        sb.contains("needs_recovery"),
        "the copy is not dirty:\n{sb}"
    );
    fs::remove_file(&base).unwrap();
}

#[test]
fn read_only_attach_serves_a_clean_ext4_and_changes_nothing() {
    let env = Env::new();
    let tree = env.p("tree");
    make_tree(&tree, 40);
    let img = env.p("clean.img");
    mkfs(&img, Some(&tree));
    let before = stamp(&img);
    let log = env.p("audit.jsonl");
    let dev = env.ok(&[
        "attach",
        "--expect-sha256",
        &before.0,
        "--audit",
        log.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let dev = dev.trim();
    assert!(dev.starts_with("/dev/loop"), "{dev}");
    assert_eq!(env.devices(), 1);
    assert!(env.ok(&["list"]).contains(dev));
    // The kernel sees a read-only device: raw writes fail.
    let ro = run_ok(Command::new("blockdev").arg("--getro").arg(dev));
    assert_eq!(ro.trim(), "1");
    let w = run(Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={dev}"))
        .args(["bs=512", "count=1", "conv=notrunc", "status=none"]));
    assert!(!w.status.success());
    run_ok(
        Command::new("mount")
            .args(["-o", "ro"])
            .arg(dev)
            .arg(&env.mnt),
    );
    same_tree(&tree, &env.mnt);
    // Busy: detach refuses while mounted.
    let out = env.run(&["detach", dev]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is mounted on"));
    unmount(&env.mnt);
    let out = env.ok(&["detach", dev]);
    assert!(out.contains("unchanged"), "{out}");
    assert_eq!(env.devices(), 0);
    assert_eq!(stamp(&img), before, "the image changed");
    let v = verify_audit(&env, &log);
    assert!(v.contains("0 writes"), "{v}");
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("\"event\":\"attach\"") && text.contains("\"event\":\"detach\""));
    assert!(text.contains(&before.0));
}

#[test]
fn dirty_journal_needs_cow_and_replays_into_the_overlay() {
    let env = Env::new();
    let img = env.p("dirty.img");
    make_dirty(&env, &img, 52);
    let before = stamp(&img);
    let (imgs, mnt) = (img.to_str().unwrap(), env.mnt.to_str().unwrap());
    // Without an overlay the read-only device cannot replay the journal: refused, explained,
    // and nothing is left attached.
    let out = env.run(&["mount", imgs, mnt]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--cow"), "{err}");
    assert!(!is_mounted(&env.mnt));
    assert_eq!(env.devices(), 0);
    // With --cow every file is there.
    let cow = env.p("overlay");
    let log = env.p("audit.jsonl");
    let (cows, logs) = (cow.to_str().unwrap(), log.to_str().unwrap());
    env.ok(&[
        "mount", "--cow", cows, "--audit", logs, imgs, mnt, "-o", "rw",
    ]);
    for i in 0..52 {
        assert_eq!(
            fs::read_to_string(env.mnt.join(format!("entry{i}"))).unwrap(),
            format!("entry {i}\n")
        );
    }
    // Writes through the filesystem land in the overlay.
    fs::write(env.mnt.join("added"), b"written through --cow\n").unwrap();
    let out = env.ok(&["detach", mnt]);
    assert!(out.contains("unchanged"), "{out}");
    assert!(!is_mounted(&env.mnt));
    assert_eq!(env.devices(), 0);
    assert_eq!(stamp(&img), before, "the image changed");
    let v = verify_audit(&env, &log);
    assert!(!v.contains(" 0 writes"), "{v}");
    // diff lists the changed ranges; export gives a clean filesystem with every file.
    let diff = env.ok(&["diff", cows]);
    assert!(diff.lines().count() > 1, "{diff}");
    let merged = env.p("merged.img");
    env.ok(&["export", imgs, cows, merged.to_str().unwrap()]);
    run_ok(Command::new("e2fsck").arg("-fn").arg(&merged));
    let ls = run_ok(Command::new("debugfs").args(["-R", "ls -l /"]).arg(&merged));
    assert!(ls.contains("entry51") && ls.contains("added"), "{ls}");
    assert_eq!(stamp(&img), before, "the image changed");
    // The overlay resumes: attach again with it, everything still there, read-only mount now
    // works since the journal was replayed into the overlay.
    env.ok(&["mount", "--cow", cows, "--audit", logs, imgs, mnt]);
    assert_eq!(
        fs::read(env.mnt.join("added")).unwrap(),
        b"written through --cow\n"
    );
    env.ok(&["detach", mnt]);
    assert_eq!(stamp(&img), before, "the image changed");
    verify_audit(&env, &log);
}

#[test]
fn raw_writes_and_fsck_through_cow_memory() {
    let env = Env::new();
    let img = env.p("dirty.img");
    make_dirty(&env, &img, 10);
    let before = stamp(&img);
    let log = env.p("audit.jsonl");
    let dev = env.ok(&[
        "attach",
        "--cow-mem",
        "--audit",
        log.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let dev = dev.trim();
    let fsck = run(Command::new("e2fsck").arg("-fy").arg(dev));
    // 0: clean, 1: errors corrected (the journal replay counts).
    assert!(
        matches!(fsck.status.code(), Some(0 | 1)),
        "e2fsck: {fsck:?}"
    );
    let data = pseudo_random_bytes(5, 64 * 1024);
    fs::write(env.p("data"), &data).unwrap();
    run_ok(
        Command::new("dd")
            .arg(format!("if={}", env.p("data").display()))
            .arg(format!("of={dev}"))
            .args(["bs=4096", "seek=1000", "conv=notrunc,fsync", "status=none"]),
    );
    // Read back with O_DIRECT so the page cache cannot answer.
    let back = env.p("back");
    run_ok(
        Command::new("dd")
            .arg(format!("if={dev}"))
            .arg(format!("of={}", back.display()))
            .args([
                "bs=4096",
                "skip=1000",
                "count=16",
                "iflag=direct",
                "status=none",
            ]),
    );
    assert_eq!(fs::read(&back).unwrap(), data);
    env.ok(&["detach", dev]);
    assert_eq!(stamp(&img), before, "the image changed");
    let v = verify_audit(&env, &log);
    assert!(!v.contains(" 0 writes"), "{v}");
}

#[test]
fn killed_daemon_fails_io_with_eio_and_leaves_the_image_alone() {
    let env = Env::new();
    let img = env.p("img");
    // Large enough (sparse) that the writer below is still busy when the daemon dies.
    fs::write(&img, pseudo_random_bytes(3, 1 << 20)).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let before = stamp(&img);
    let log = env.p("audit.jsonl");
    let dev = env.ok(&[
        "attach",
        "--cow-mem",
        "--audit",
        log.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let dev = dev.trim().to_string();
    let list = env.ok(&["list", "--json"]);
    let pid: i32 = list
        .split("\"pid\":")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    // I/O in flight while the daemon dies.
    let writer = Command::new("dd")
        .arg("if=/dev/urandom")
        .arg(format!("of={dev}"))
        .args(["bs=64k", "oflag=direct", "status=none"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    let out = writer.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "dd survived the daemon's death");
    assert!(err.contains("Input/output error"), "{err}");
    let rd = run(Command::new("dd").arg(format!("if={dev}")).args([
        "of=/dev/null",
        "bs=4096",
        "count=1",
        "iflag=direct",
    ]));
    if !rd.status.success() {
        let err = String::from_utf8_lossy(&rd.stderr);
        assert!(err.contains("Input/output error"), "{err}");
    }
    assert!(wait_until(Duration::from_secs(10), || env
        .ok(&["list"])
        .contains("dead")));
    // detach cleans up after the dead daemon and closes the audit session.
    let out = env.ok(&["detach", &dev]);
    assert!(out.contains("unchanged"), "{out}");
    assert_eq!(env.devices(), 0);
    assert_eq!(stamp(&img), before, "the image changed");
    verify_audit(&env, &log);
    assert!(fs::read_to_string(&log).unwrap().contains("daemon_died"));
}

#[test]
fn refuses_bad_input_with_a_message() {
    let env = Env::new();
    let img = env.p("img");
    fs::write(&img, pseudo_random_bytes(1, 1 << 20)).unwrap();
    let before = stamp(&img);
    let imgs = img.to_str().unwrap();
    let garbage = env.p("garbage.log");
    fs::write(&garbage, "hello\n").unwrap();
    let garbage = garbage.to_str().unwrap();
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["attach", "--expect-sha256", &"0".repeat(64), imgs],
            1,
            "refusing to attach",
        ),
        (
            &["attach", "--expect-sha256", "xyz", imgs],
            2,
            "64 hexadecimal digits",
        ),
        (
            &["attach", "--logical-block-size", "1000", imgs],
            2,
            "512 or 4096",
        ),
        (&["attach", "--cow", imgs, imgs], 1, "overlay"),
        (&["attach", "--audit", imgs, imgs], 1, "audit log"),
        (
            &["attach", "--cow-mem", "--cow", "x", imgs],
            2,
            "cannot be used with",
        ),
        (
            &["attach", "/dev/null"],
            1,
            "not a regular file or a block device",
        ),
        (&["attach", "/nonexistent"], 1, "No such file"),
        (
            &["detach", "/dev/null"],
            1,
            "not attached by loop-immutable",
        ),
        (&["detach"], 2, "required"),
        (&["verify-audit", garbage], 1, "line 1: not JSON"),
        (&["verify-audit", imgs], 1, "incomplete"),
        (&["diff", imgs], 1, "overlay map"),
    ];
    for (args, code, msg) in cases {
        let out = env.run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: {err}");
    }
    assert_eq!(env.devices(), 0);
    assert_eq!(stamp(&img), before, "the image changed");
}

#[test]
fn an_external_change_is_reported_at_detach() {
    let env = Env::new();
    let img = env.p("img");
    fs::write(&img, pseudo_random_bytes(8, 1 << 20)).unwrap();
    let log = env.p("audit.jsonl");
    let dev = env.ok(&[
        "attach",
        "--audit",
        log.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let dev = dev.trim();
    // Someone else writes to the evidence while it is attached.
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"tampered", 4096).unwrap();
    drop(f);
    let out = env.run(&["detach", dev]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("CHANGED") && err.contains("sha256 changed"),
        "{err}"
    );
    assert_eq!(env.devices(), 0);
    // The chain itself is intact, but the session shows the change.
    let out = env.run(&["verify-audit", log.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("changed image"));
}
