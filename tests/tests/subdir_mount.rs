//! subdir-mount, mounting real ext4 images on the host kernel (needs root, loop devices).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use integration_tests::{
    bin, is_mounted, loop_devices_backed_by, mountinfo_line, run, run_ok, unmount, wait_until,
};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

const SECRET: &str = "TOP-LEVEL-SECRET-7d1c";

/// An ext4 image holding `/foobar/...`, a secret at the top level, and escape attempts. The
/// source tree is removed after mkfs, so the secret exists only inside the image.
struct Fixture {
    t: tempfile::TempDir,
    img: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let t = tempfile::Builder::new()
            .prefix("subdir.")
            .tempdir()
            .unwrap();
        let tree = t.path().join("tree");
        fs::create_dir_all(tree.join("foobar/sub")).unwrap();
        fs::write(tree.join("foobar/a.txt"), "hello\n").unwrap();
        fs::write(tree.join("foobar/sub/b"), "deep\n").unwrap();
        std::os::unix::fs::chown(tree.join("foobar/sub/b"), Some(1234), Some(2345)).unwrap();
        symlink("/", tree.join("foobar/esc")).unwrap();
        symlink("..", tree.join("foobar/up")).unwrap();
        fs::write(tree.join("secret"), SECRET).unwrap();
        symlink("..", tree.join("escape")).unwrap();
        symlink(".", tree.join("self")).unwrap();
        symlink("foobar", tree.join("link")).unwrap();
        let img = t.path().join("img");
        run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-d"])
                .arg(&tree)
                .arg(&img)
                .arg("16M"),
        );
        fs::remove_dir_all(&tree).unwrap();
        Fixture { t, img }
    }

    /// A fresh empty directory to mount on.
    fn dir(&self, name: &str) -> PathBuf {
        let p = self.t.path().join(name);
        fs::create_dir_all(&p).unwrap();
        p
    }

    /// Nothing of this image is attached to a loop device (autoclear may take a moment).
    fn assert_no_loop(&self) {
        assert!(
            wait_until(Duration::from_secs(10), || loop_devices_backed_by(
                &self.img
            )
            .is_empty()),
            "loop devices left for {}: {:?}",
            self.img.display(),
            loop_devices_backed_by(&self.img)
        );
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Undo whatever a failed test left behind, mounts first.
        let prefix = self.t.path().to_owned();
        for _ in 0..10 {
            let mounted: Vec<_> = integration_tests::mount_points()
                .into_iter()
                .filter(|p| p.starts_with(&prefix))
                .collect();
            if mounted.is_empty() {
                break;
            }
            for p in mounted.iter().rev() {
                unmount(p);
            }
        }
        for dev in loop_devices_backed_by(&self.img) {
            let _ = Command::new("losetup").arg("-d").arg(dev).status();
        }
    }
}

/// Unmounts on drop (also when the test fails).
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        for _ in 0..5 {
            if !is_mounted(&self.0) {
                break;
            }
            unmount(&self.0);
        }
    }
}

fn subdir_mount(args: &[&str], src: &Path, target: &Path) -> Output {
    run(Command::new(bin("subdir-mount"))
        .args(args)
        .arg(src)
        .arg(target))
}

fn mount_ok(args: &[&str], src: &Path, target: &Path) -> Mounted {
    let out = subdir_mount(args, src, target);
    assert!(
        out.status.success(),
        "subdir-mount {args:?} failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(target), "{} not mounted", target.display());
    Mounted(target.to_owned())
}

/// Plain umount(2), as `umount TARGET` does.
fn umount(m: Mounted) {
    nix::mount::umount(&m.0).unwrap();
    assert!(!is_mounted(&m.0));
}

/// The fields of a mountinfo line: (root, mount point, fs type, mount options).
fn fields(line: &str) -> (String, String, String, String) {
    let f: Vec<&str> = line.split(' ').collect();
    let sep = f.iter().position(|x| *x == "-").unwrap();
    (
        f[3].to_owned(),
        f[4].to_owned(),
        f[sep + 1].to_owned(),
        f[5].to_owned(),
    )
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// Every regular file reachable below `dir` without following symlinks or leaving the mount.
fn walk_files(dir: &Path, dev: u64, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let m = fs::symlink_metadata(&p).unwrap();
        if m.dev() != dev {
            continue;
        }
        if m.is_dir() {
            walk_files(&p, dev, out);
        } else if m.is_file() {
            out.push(p);
        }
    }
}

/// The mountinfo text of every mount namespace on the system (one task per namespace, all
/// tasks considered: a thread can have a namespace of its own).
fn all_mountinfo() -> Vec<String> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.filter_map(Result::ok) {
        if !p
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(tasks) = fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.filter_map(Result::ok) {
            let Ok(ns) = fs::read_link(t.path().join("ns/mnt")) else {
                continue;
            };
            if seen.insert(ns)
                && let Ok(text) = fs::read_to_string(t.path().join("mountinfo"))
            {
                out.push(text);
            }
        }
    }
    out
}

/// Lines of `texts` that mount the top level (root `/`) of a loop device backed by `img`.
fn top_level_mounts(texts: &[String], img: &Path) -> Vec<String> {
    let want = fs::canonicalize(img).unwrap();
    let mut backing: HashMap<String, Option<PathBuf>> = HashMap::new();
    let mut bad = Vec::new();
    for line in texts.iter().flat_map(|t| t.lines()) {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 5 || f[3] != "/" || !line.contains(" - ext4 ") {
            continue;
        }
        let b = backing.entry(f[2].to_owned()).or_insert_with(|| {
            fs::read_to_string(format!("/sys/dev/block/{}/loop/backing_file", f[2]))
                .ok()
                .map(|s| PathBuf::from(s.trim_end()))
        });
        if b.as_deref() == Some(want.as_path()) {
            bad.push(line.to_owned());
        }
    }
    bad
}

#[test]
fn only_the_subdir_is_visible_and_the_top_level_is_never_attached() {
    let f = Fixture::new();
    let target = f.dir("mnt");
    // The detector works: a plain mount of the whole image is seen.
    run_ok(
        Command::new("mount")
            .args(["-o", "loop,ro"])
            .arg(&f.img)
            .arg(&target),
    );
    let whole = Mounted(target.clone());
    assert_eq!(top_level_mounts(&all_mountinfo(), &f.img).len(), 1);
    umount(whole);
    f.assert_no_loop();

    let m = mount_ok(&["-o", "subdir=/foobar"], &f.img, &target);

    assert_eq!(names(&target), ["a.txt", "esc", "sub", "up"]);
    assert_eq!(fs::read_to_string(target.join("a.txt")).unwrap(), "hello\n");
    assert_eq!(fs::read_to_string(target.join("sub/b")).unwrap(), "deep\n");
    let line = mountinfo_line(&target).unwrap();
    let (root, _, fstype, _) = fields(&line);
    assert_eq!(
        (root.as_str(), fstype.as_str()),
        ("/foobar", "ext4"),
        "{line}"
    );
    // TARGET/.. is TARGET's parent, not the filesystem's top level.
    let up = fs::metadata(target.join("..")).unwrap();
    let parent = fs::metadata(f.t.path()).unwrap();
    assert_eq!((up.dev(), up.ino()), (parent.dev(), parent.ino()));
    // The mount's root is not the image's root directory (ext4 inode 2).
    let top = fs::metadata(&target).unwrap();
    assert_ne!(top.ino(), 2);
    // The secret is nowhere in the mount, and the symlinks lead out of the image, not up.
    let mut files = Vec::new();
    walk_files(&target, top.dev(), &mut files);
    assert_eq!(files.len(), 2, "{files:?}");
    for p in &files {
        assert!(!fs::read_to_string(p).unwrap().contains(SECRET), "{p:?}");
    }
    for p in ["up/secret", "esc/secret", "../secret", "up/up/secret"] {
        assert!(fs::metadata(target.join(p)).is_err(), "{p} reachable");
    }
    assert_eq!(fs::metadata(target.join("up")).unwrap().ino(), parent.ino());
    assert!(top_level_mounts(&all_mountinfo(), &f.img).is_empty());
    umount(m);
    f.assert_no_loop();

    // Mount repeatedly while another thread scans the mountinfo of every mount namespace:
    // the top level must never show up anywhere, not even during set-up.
    let stop = Arc::new(AtomicBool::new(false));
    let scans = Arc::new(AtomicUsize::new(0));
    let scanner = {
        let (stop, scans, img) = (stop.clone(), scans.clone(), f.img.clone());
        std::thread::spawn(move || {
            let mut bad = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                bad.extend(top_level_mounts(&all_mountinfo(), &img));
                scans.fetch_add(1, Ordering::SeqCst);
            }
            bad
        })
    };
    for _ in 0..15 {
        let m = mount_ok(&["-o", "subdir=/foobar"], &f.img, &target);
        umount(m);
    }
    stop.store(true, Ordering::SeqCst);
    let bad = scanner.join().unwrap();
    assert!(bad.is_empty(), "top level seen: {bad:?}");
    assert!(scans.load(Ordering::SeqCst) > 0);
    f.assert_no_loop();
}

#[test]
fn in_tree_symlinks_are_followed() {
    let f = Fixture::new();
    let target = f.dir("mnt");
    let m = mount_ok(&["-o", "subdir=/link/sub/../"], &f.img, &target);
    let (root, ..) = fields(&mountinfo_line(&target).unwrap());
    assert_eq!(root, "/foobar");
    assert_eq!(names(&target), ["a.txt", "esc", "sub", "up"]);
    umount(m);
    f.assert_no_loop();
}

/// Run a mount that must fail: exit status, message, and nothing left behind.
fn assert_refused(f: &Fixture, args: &[&str], src: &Path, target: &Path, code: i32, msg: &str) {
    let out = subdir_mount(args, src, target);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert!(err.contains(msg), "{args:?}: expected {msg:?} in {err:?}");
    assert!(err.starts_with("subdir-mount: error: "), "{err}");
    if target.exists() && !matches!(msg, "busy") {
        assert!(mountinfo_line(target).is_none(), "{args:?} left a mount");
    }
    f.assert_no_loop();
    assert!(top_level_mounts(&all_mountinfo(), &f.img).is_empty());
}

#[test]
fn escapes_and_bad_subdirs_are_refused_leaving_nothing_behind() {
    let f = Fixture::new();
    let target = f.dir("mnt");
    let cases = [
        ("/foobar/../..", "leads outside the filesystem"),
        ("/..", "leads outside the filesystem"),
        ("/foobar/esc", "leads outside the filesystem"),
        ("/foobar/esc/tmp", "leads outside the filesystem"),
        ("/escape", "leads outside the filesystem"),
        ("/foobar/up/..", "leads outside the filesystem"),
        ("/foobar/up", "is the top level"),
        ("/foobar/..", "is the top level"),
        ("/self", "is the top level"),
        ("/nope", "does not exist"),
        ("/foobar/nope", "does not exist"),
        ("/secret", "is not a directory"),
        ("/foobar/a.txt/x", "is not a directory"),
    ];
    for (subdir, msg) in cases {
        let opt = format!("subdir={subdir}");
        assert_refused(&f, &["-o", &opt], &f.img, &target, 1, msg);
    }
    for ro in [false, true] {
        let opt = format!("subdir=/nope{}", if ro { ",ro" } else { "" });
        assert_refused(&f, &["-o", &opt], &f.img, &target, 1, "does not exist");
    }
    assert_refused(&f, &["-o", "subdir=/"], &f.img, &target, 2, "top level");
    assert_refused(&f, &["-o", "ro"], &f.img, &target, 2, "subdir=PATH");
}

#[test]
fn target_source_and_fstype_errors_are_clear_and_leave_nothing_behind() {
    let f = Fixture::new();
    let target = f.dir("mnt");
    let sub = ["-o", "subdir=/foobar"];
    let missing = f.t.path().join("missing");
    assert_refused(&f, &sub, &f.img, &missing, 1, "does not exist");
    assert_refused(&f, &sub, &f.img, &f.img, 1, "is not a directory");
    assert_refused(&f, &sub, &missing, &target, 1, "source");
    assert_refused(&f, &sub, f.t.path(), &target, 1, "neither a block device");
    let t = ["-t", "xfs", "-o", "subdir=/foobar"];
    assert_refused(&f, &t, &f.img, &target, 1, "cannot mount");
    let t = ["-t", "nosuchfs", "-o", "subdir=/foobar"];
    assert_refused(&f, &t, &f.img, &target, 1, "unknown filesystem type");
    let t = ["-o", "subdir=/foobar,frobnicate"];
    assert_refused(&f, &t, &f.img, &target, 1, "Unknown parameter 'frobnicate'");
    // Through FUSE, failures found by the daemon reach the caller with their status, and
    // nothing is left: no loop device, no daemon.
    let t = ["--fuse", "-o", "subdir=/nonexistent"];
    assert_refused(&f, &t, &f.img, &target, 1, "does not exist");
    let t = [
        "--uid-map",
        "0:1000:1",
        "--uid-map",
        "5:1000:1",
        "-o",
        "subdir=/escape",
    ];
    assert_refused(&f, &t, &f.img, &target, 1, "outside the filesystem");
    assert!(fuse_daemon_for(&target).is_none());
    let t = [
        "--gid-map",
        "0:1000:5",
        "--gid-map",
        "3:2000:1",
        "-o",
        "subdir=/foobar",
    ];
    assert_refused(&f, &t, &f.img, &target, 2, "overlap");

    // Busy: something is already mounted on the target.
    run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "busy"])
            .arg(&target),
    );
    let busy = Mounted(target.clone());
    let before = mountinfo_line(&target);
    assert_refused(&f, &sub, &f.img, &target, 1, "busy");
    let fuse = ["--fuse", "-o", "subdir=/foobar"];
    assert_refused(&f, &fuse, &f.img, &target, 1, "busy");
    assert_eq!(mountinfo_line(&target), before);
    drop(busy);
    assert!(!is_mounted(&target));
}

#[test]
fn works_under_shared_and_private_propagation() {
    let f = Fixture::new();
    for propagation in ["--make-shared", "--make-private"] {
        let parent = f.dir(&format!("parent{propagation}"));
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "sm"])
                .arg(&parent),
        );
        let _parent = Mounted(parent.clone());
        run_ok(Command::new("mount").arg(propagation).arg(&parent));
        // A peer of the parent: with shared propagation the mount appears there too.
        let peer = f.dir(&format!("peer{propagation}"));
        run_ok(Command::new("mount").arg("--bind").arg(&parent).arg(&peer));
        let _peer = Mounted(peer.clone());
        let target = parent.join("m");
        fs::create_dir(&target).unwrap();
        let m = mount_ok(&["-o", "subdir=/foobar"], &f.img, &target);
        let line = mountinfo_line(&target).unwrap();
        assert_eq!(fields(&line).0, "/foobar", "{line}");
        assert_eq!(fs::read_to_string(target.join("a.txt")).unwrap(), "hello\n");
        let in_peer = mountinfo_line(&peer.join("m"));
        if propagation == "--make-shared" {
            let l = in_peer.expect("propagated to the peer");
            assert_eq!(fields(&l).0, "/foobar", "{l}");
            assert!(line.contains(" shared:"), "{line}");
        } else {
            assert!(in_peer.is_none());
        }
        assert!(top_level_mounts(&all_mountinfo(), &f.img).is_empty());
        umount(m);
        assert!(!is_mounted(&peer.join("m")));
        f.assert_no_loop();
    }
}

#[test]
fn read_only_is_honoured_and_the_image_is_untouched() {
    let f = Fixture::new();
    let before = fs::read(&f.img).unwrap();
    let target = f.dir("mnt");
    let m = mount_ok(
        &["-o", "subdir=/foobar,ro,nosuid,nodev,noexec"],
        &f.img,
        &target,
    );
    let (_, _, _, opts) = fields(&mountinfo_line(&target).unwrap());
    let opts: Vec<&str> = opts.split(',').collect();
    for o in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(opts.contains(&o), "{o} missing from {opts:?}");
    }
    let e = fs::write(target.join("new"), "x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    let e = fs::write(target.join("a.txt"), "x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    // The loop device itself is read-only.
    let loops = loop_devices_backed_by(&f.img);
    assert_eq!(loops.len(), 1, "{loops:?}");
    let name = loops[0].file_name().unwrap().to_str().unwrap().to_owned();
    let ro = fs::read_to_string(format!("/sys/block/{name}/ro")).unwrap();
    assert_eq!(ro.trim(), "1");
    umount(m);
    f.assert_no_loop();
    assert!(
        fs::read(&f.img).unwrap() == before,
        "read-only mount changed the image"
    );

    // Read-write for comparison: writes land in the subdir.
    let m = mount_ok(&["-o", "subdir=/foobar"], &f.img, &target);
    fs::write(target.join("new"), "x").unwrap();
    umount(m);
    f.assert_no_loop();
}

#[test]
fn one_to_one_id_maps_become_an_idmapped_mount() {
    let f = Fixture::new();
    let target = f.dir("mnt");
    let owners = |p: &str| {
        let m = fs::metadata(target.join(p)).unwrap();
        (m.uid(), m.gid())
    };
    let m = mount_ok(
        &[
            "--uid-map",
            "0:1000:1",
            "--gid-map",
            "0:2000:1",
            "-o",
            "subdir=/foobar",
        ],
        &f.img,
        &target,
    );
    let line = mountinfo_line(&target).unwrap();
    assert!(line.contains("idmapped"), "{line}");
    assert_eq!(fields(&line).0, "/foobar");
    assert_eq!(owners(""), (1000, 2000));
    assert_eq!(owners("a.txt"), (1000, 2000));
    // Unmapped ids show as the overflow id.
    assert_eq!(owners("sub/b"), (65534, 65534));
    // A new file by root (unmapped in the view) is refused, as the kernel does.
    assert!(fs::write(target.join("new"), "x").is_err());
    umount(m);
    f.assert_no_loop();

    // Only --uid-map: gids pass unchanged. Several ranges, and a swap.
    let m = mount_ok(
        &[
            "--uid-map",
            "1234:0:1",
            "--uid-map",
            "0:1234:1",
            "-o",
            "subdir=/foobar,uidmap=5000:6000:10",
        ],
        &f.img,
        &target,
    );
    assert_eq!(owners("a.txt"), (1234, 0));
    assert_eq!(owners("sub/b"), (0, 2345));
    umount(m);
    f.assert_no_loop();
    // No helper process is left.
    let helpers = fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|p| {
            fs::read(p.path().join("cmdline"))
                .is_ok_and(|c| c.starts_with(b"mount-api-userns-helper"))
        })
        .count();
    assert_eq!(helpers, 0);
}

#[test]
fn mount_helper_convention_for_fstab() {
    let f = Fixture::new();
    let target = f.dir("mnt");
    let helper = f.t.path().join("mount.subdir");
    symlink(bin("subdir-mount"), &helper).unwrap();
    let out = run(Command::new(&helper)
        .arg(&f.img)
        .arg(&target)
        .args([
            "-o",
            "fstype=ext4,subdir=/foobar,ro,noauto,nofail,x-systemd.foo=1",
        ])
        .args(["-t", "subdir"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = Mounted(target.clone());
    let line = mountinfo_line(&target).unwrap();
    assert_eq!(fields(&line).0, "/foobar");
    assert!(fields(&line).3.split(',').any(|o| o == "ro"), "{line}");
    umount(m);
    f.assert_no_loop();
    let out = run(Command::new(&helper).arg(&f.img).arg(&target).args([
        "-o",
        "subdir=/nope",
        "-t",
        "subdir.ext4",
    ]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("mount.subdir: error: ") && err.contains("does not exist"),
        "{err}"
    );
    f.assert_no_loop();
}

#[test]
fn block_device_source() {
    let f = Fixture::new();
    let target = f.dir("mnt");
    let dev = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&f.img));
    let dev = PathBuf::from(dev.trim());
    let m = mount_ok(&["-t", "ext4", "-o", "subdir=/foobar/sub"], &dev, &target);
    assert_eq!(names(&target), ["b"]);
    assert_eq!(fields(&mountinfo_line(&target).unwrap()).0, "/foobar/sub");
    umount(m);
    // A device the user attached stays attached; the fixture detaches it.
    assert_eq!(loop_devices_backed_by(&f.img), [dev]);
}

#[test]
fn private_namespace_fallback_for_older_kernels() {
    let f = Fixture::new();
    let target = f.dir("mnt");
    let out = run(Command::new(bin("subdir-mount"))
        .env("SUBDIR_MOUNT_FORCE_NS_FALLBACK", "1")
        .args(["-v", "--uid-map", "0:1000:1", "-o", "subdir=/foobar"])
        .arg(&f.img)
        .arg(&target));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let m = Mounted(target.clone());
    assert!(err.contains("private mount namespace path"), "{err}");
    let line = mountinfo_line(&target).unwrap();
    assert_eq!(fields(&line).0, "/foobar", "{line}");
    assert!(line.contains("idmapped"), "{line}");
    assert_eq!(names(&target), ["a.txt", "esc", "sub", "up"]);
    assert_eq!(fs::metadata(target.join("a.txt")).unwrap().uid(), 1000);
    assert!(top_level_mounts(&all_mountinfo(), &f.img).is_empty());
    umount(m);
    f.assert_no_loop();
    let out = run(Command::new(bin("subdir-mount"))
        .env("SUBDIR_MOUNT_FORCE_NS_FALLBACK", "1")
        .args(["-o", "subdir=/foobar/esc"])
        .arg(&f.img)
        .arg(&target));
    assert_eq!(out.status.code(), Some(1));
    assert!(mountinfo_line(&target).is_none());
    f.assert_no_loop();
}

/// The pid of the FUSE daemon serving `target`, found by its command line.
fn fuse_daemon_for(target: &Path) -> Option<u32> {
    let want = target.as_os_str().as_encoded_bytes();
    fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .find_map(|p| {
            let pid: u32 = p.file_name().to_str()?.parse().ok()?;
            let cmd = fs::read(p.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
            (args.first()?.ends_with(b"subdir-mount") && args.contains(&want)).then_some(pid)
        })
}

#[test]
fn many_to_one_maps_are_served_read_only_through_fuse() {
    let f = Fixture::new();
    let target = f.dir("mnt");
    let owners = |p: &str| {
        let m = fs::metadata(target.join(p)).unwrap();
        (m.uid(), m.gid())
    };
    // a.txt is owned by 0:0 and sub/b by 1234:2345 on disk: both are shown as 1000:1000.
    let m = mount_ok(
        &[
            "--uid-map",
            "0:1000:1",
            "--uid-map",
            "1234:1000:1",
            "-o",
            "subdir=/foobar,gidmap=0:1000:1,gidmap=2345:1000:1",
        ],
        &f.img,
        &target,
    );
    let line = mountinfo_line(&target).unwrap();
    assert!(line.contains(" - fuse"), "{line}");
    assert_eq!(owners("a.txt"), (1000, 1000));
    assert_eq!(owners("sub/b"), (1000, 1000));
    assert_eq!(fs::read_to_string(target.join("sub/b")).unwrap(), "deep\n");
    assert_eq!(names(&target), ["a.txt", "esc", "sub", "up"]);
    let e = fs::write(target.join("a.txt"), "x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    for p in ["up/secret", "esc/secret", "../secret"] {
        assert!(fs::metadata(target.join(p)).is_err(), "{p} reachable");
    }
    // The filesystem is attached nowhere, and not even the daemon's own descriptors lead
    // above the subdir: `..` of its root is the root.
    assert!(top_level_mounts(&all_mountinfo(), &f.img).is_empty());
    let pid = fuse_daemon_for(&target).expect("daemon running");
    let mut dirs = 0;
    for fd in fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let p = fd.unwrap().path();
        if fs::metadata(&p).is_ok_and(|m| m.is_dir())
            && let Ok(entries) = fs::read_dir(p.join(".."))
        {
            dirs += 1;
            for e in entries {
                let name = e.unwrap().file_name();
                assert_ne!(name.to_str(), Some("secret"), "{} leads up", p.display());
            }
        }
    }
    assert!(dirs > 0);
    // Plain umount ends the daemon and releases the loop device.
    umount(m);
    assert!(wait_until(Duration::from_secs(10), || fuse_daemon_for(
        &target
    )
    .is_none()));
    f.assert_no_loop();

    // --fuse without maps: read-write, and the write lands in the image.
    let m = mount_ok(&["--fuse", "-o", "subdir=/foobar"], &f.img, &target);
    assert!(mountinfo_line(&target).unwrap().contains(" - fuse"));
    fs::write(target.join("new.txt"), "through fuse\n").unwrap();
    umount(m);
    f.assert_no_loop();
    let m = mount_ok(&["-o", "subdir=/foobar"], &f.img, &target);
    assert_eq!(
        fs::read_to_string(target.join("new.txt")).unwrap(),
        "through fuse\n"
    );
    umount(m);
    f.assert_no_loop();
}
