//! The blobfs FUSE daemon, mounted for real.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use integration_tests::{
    FuseMount, bin, is_mounted, manifest_blobs, mountinfo_line, pread, pseudo_random_bytes, run,
    run_ok, wait_until,
};
use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

struct Fixture {
    t: tempfile::TempDir,
    img: PathBuf,
    /// digest -> content
    blobs: HashMap<String, Vec<u8>>,
    pub_key: PathBuf,
}

impl Fixture {
    /// Blobs of boundary sizes, a multi-level one, and duplicates.
    fn new(signed: bool) -> Fixture {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        let sizes = [
            0usize,
            1,
            4095,
            4096,
            4097,
            100_000,
            128 * 4096 + 1,
            3 << 20,
        ];
        for (i, size) in sizes.iter().enumerate() {
            fs::write(
                src.join(format!("f{i}")),
                pseudo_random_bytes(i as u64, *size),
            )
            .unwrap();
        }
        fs::write(src.join("dup"), pseudo_random_bytes(1, 1)).unwrap();
        let img = t.path().join("img");
        let key = t.path().join("k.pem");
        run_ok(Command::new(bin("blobfs")).arg("keygen").arg(&key));
        let mut mkfs = Command::new(bin("mkfs-blobfs"));
        mkfs.arg("-q").arg("--manifest").arg(t.path().join("man"));
        if signed {
            mkfs.arg("--sign").arg(&key);
        }
        run_ok(mkfs.arg(&img).arg(&src));
        let blobs = manifest_blobs(&t.path().join("man"));
        Fixture {
            pub_key: t.path().join("k.pub.pem"),
            img,
            blobs,
            t,
        }
    }

    fn mount(&self, img: &Path, extra: &[&str]) -> Result<FuseMount, String> {
        FuseMount::start(|dir| {
            let mut c = Command::new(bin("blobfs"));
            c.arg("mount").arg(img).arg(dir).arg("-f").args(extra);
            c
        })
    }
}

#[test]
fn every_blob_reads_back_exactly_sequential_random_and_mmap() {
    let f = Fixture::new(true);
    let key = f.pub_key.to_str().unwrap().to_owned();
    let m = f.mount(&f.img, &["--key", &key]).unwrap();
    let mut names: Vec<_> = fs::read_dir(&m.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut want: Vec<_> = f.blobs.keys().cloned().collect();
    want.sort();
    assert_eq!(names, want);
    for (digest, content) in &f.blobs {
        let p = m.path.join(digest);
        assert_eq!(
            &fs::read(&p).unwrap(),
            content,
            "sequential read of {digest}"
        );
        let file = fs::File::open(&p).unwrap();
        for k in 0..50u64 {
            let len = content.len() as u64;
            let off = if len == 0 {
                0
            } else {
                (k * 7919 * 4093) % (len + 10)
            };
            let n = (k as usize * 1031) % 70_000 + 1;
            let got = pread(&file, off, n).unwrap();
            let lo = (off as usize).min(content.len());
            let hi = (off as usize + n).min(content.len());
            assert_eq!(got, content[lo..hi], "pread {digest} at {off}+{n}");
        }
        if !content.is_empty() {
            // SAFETY: the mapping is read-only and the file is not modified during the test.
            #[allow(unsafe_code)]
            let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
            assert_eq!(&map[..], &content[..], "mmap of {digest}");
        }
    }
    let log = m.unmount();
    assert!(log.contains("signature verified"), "{log}");
}

#[test]
fn tampered_image_gives_eio_or_exact_bytes_never_other_bytes() {
    let f = Fixture::new(false);
    let orig = fs::read(&f.img).unwrap();
    let info = run_ok(
        Command::new(bin("blobfs"))
            .arg("inspect")
            .arg("--json")
            .arg(&f.img),
    );
    let field = |name: &str| -> u64 {
        let s = info.find(&format!("\"{name}\":{{")).unwrap();
        let rest = &info[s..];
        let o = rest.find("\"offset\":").unwrap() + 9;
        rest[o..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap()
    };
    let (tree_off, data_off) = (field("trees"), field("data"));
    let mut eio_seen = 0;
    for round in 0..8u64 {
        let copy = f.t.path().join(format!("tampered{round}"));
        fs::write(&copy, &orig).unwrap();
        let m = f.mount(&copy, &[]).unwrap();
        // Modify the image while it is mounted: the daemon reads it again for every block it
        // has not served yet, so every change must surface as EIO.
        let mut b = orig.clone();
        for k in 0..40u64 {
            let r = pseudo_random_bytes(round * 100 + k, 8);
            let x = u64::from_le_bytes(r.try_into().unwrap());
            let pos = if k % 3 == 0 {
                tree_off + x % (data_off - tree_off)
            } else {
                data_off + x % (orig.len() as u64 - data_off)
            };
            b[pos as usize] ^= 1 << (k % 8);
        }
        fs::write(&copy, &b).unwrap();
        for (digest, content) in &f.blobs {
            let file = fs::File::open(m.path.join(digest)).unwrap();
            for (i, chunk) in content.chunks(4096).enumerate() {
                match pread(&file, i as u64 * 4096, 4096) {
                    Ok(got) => assert_eq!(got, chunk, "wrong bytes: {digest} block {i}"),
                    Err(e) => {
                        assert_eq!(e, libc::EIO, "{digest} block {i}");
                        eio_seen += 1;
                    }
                }
            }
        }
        let log = m.unmount();
        assert!(
            eio_seen == 0 || log.contains("failed verification"),
            "{log}"
        );
    }
    assert!(eio_seen > 0, "no tampering was detected at all");
}

#[test]
fn corrupted_header_or_index_is_refused_at_mount() {
    let f = Fixture::new(false);
    let orig = fs::read(&f.img).unwrap();
    for pos in [0usize, 9, 60, 120, 230, 8192 + 3, 8192 + 40] {
        let mut b = orig.clone();
        b[pos] ^= 0x40;
        let copy = f.t.path().join("bad");
        fs::write(&copy, &b).unwrap();
        let err = f
            .mount(&copy, &[])
            .err()
            .unwrap_or_else(|| panic!("flip at {pos} mounted"));
        assert!(err.contains("blobfs: error:"), "{err}");
    }
    let copy = f.t.path().join("short");
    fs::write(&copy, &orig[..orig.len() - 4096]).unwrap();
    let err = f.mount(&copy, &[]).err().unwrap();
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn signature_enforcement_and_unsigned_warning() {
    let signed = Fixture::new(true);
    let unsigned = Fixture::new(false);
    let other = unsigned.pub_key.to_str().unwrap().to_owned();
    let err = signed.mount(&signed.img, &["--key", &other]).err().unwrap();
    assert!(err.contains("no valid signature"), "{err}");
    let key = signed.pub_key.to_str().unwrap().to_owned();
    let err = unsigned
        .mount(&unsigned.img, &["--key", &key])
        .err()
        .unwrap();
    assert!(err.contains("not signed"), "{err}");
    // -o key= works like --key.
    let err = signed
        .mount(&signed.img, &["-o", &format!("key={other}")])
        .err()
        .unwrap();
    assert!(err.contains("no valid signature"), "{err}");
    let m = unsigned.mount(&unsigned.img, &[]).unwrap();
    let log = m.unmount();
    assert!(log.contains("image is unsigned"), "{log}");
    // Exit status of the refused mount is 1, and nothing stays mounted.
    let dir = tempfile::tempdir().unwrap();
    let out = run(Command::new(bin("blobfs"))
        .arg("mount")
        .arg(&signed.img)
        .arg(dir.path())
        .arg("--key")
        .arg(&other));
    assert_eq!(out.status.code(), Some(1));
    assert!(!is_mounted(dir.path()));
}

#[test]
fn fsverity_measure_xattr_inodes_and_layouts() {
    let f = Fixture::new(false);
    let m = f.mount(&f.img, &[]).unwrap();
    let mut inodes = HashMap::new();
    for digest in f.blobs.keys() {
        let p = m.path.join(digest);
        let out = run_ok(Command::new("fsverity").arg("measure").arg(&p));
        assert_eq!(out.split(' ').next().unwrap(), format!("sha256:{digest}"));
        let x = xattr(&p, "user.blobfs.digest").unwrap();
        assert_eq!(x, digest.as_bytes());
        let meta = fs::metadata(&p).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o444);
        inodes.insert(digest.clone(), meta.ino());
    }
    assert_eq!(
        fs::metadata(&m.path).unwrap().mode() & 0o7777,
        0o555,
        "root dir mode"
    );
    drop(m);
    // Same inode numbers after a remount, and in the objects layout.
    let m = f
        .mount(&f.img, &["-o", "layout=objects,uid=123,gid=456"])
        .unwrap();
    for (digest, content) in &f.blobs {
        let p = m.path.join(&digest[..2]).join(&digest[2..]);
        let meta = fs::metadata(&p).unwrap();
        assert_eq!(meta.ino(), inodes[digest], "inode of {digest}");
        assert_eq!((meta.uid(), meta.gid()), (123, 456));
        assert_eq!(&fs::read(&p).unwrap(), content);
    }
    assert!(fs::metadata(m.path.join(f.blobs.keys().next().unwrap())).is_err());
}

fn xattr(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let out = run(Command::new("python3").arg("-c").arg(format!(
        "import os,sys; sys.stdout.buffer.write(os.getxattr({:?}, {:?}))",
        p.to_str().unwrap(),
        name
    )));
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(1)
    }
}

#[test]
fn writes_are_erofs_and_bad_names_enoent() {
    use std::io::ErrorKind;
    let f = Fixture::new(false);
    let m = f.mount(&f.img, &[]).unwrap();
    let digest = f.blobs.keys().next().unwrap();
    let p = m.path.join(digest);
    let errno = |r: std::io::Result<()>| r.unwrap_err().raw_os_error().unwrap();
    assert_eq!(errno(fs::write(m.path.join("new"), b"x")), libc::EROFS);
    assert_eq!(
        errno(fs::OpenOptions::new().write(true).open(&p).map(drop)),
        libc::EROFS
    );
    assert_eq!(errno(fs::remove_file(&p)), libc::EROFS);
    assert_eq!(errno(fs::create_dir(m.path.join("d"))), libc::EROFS);
    assert_eq!(
        errno(fs::set_permissions(
            &p,
            std::os::unix::fs::PermissionsExt::from_mode(0o777)
        )),
        libc::EROFS
    );
    for bad in ["nope", &digest.to_uppercase(), &"0".repeat(64)] {
        let e = fs::metadata(m.path.join(bad)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{bad}");
    }
    let out = run(Command::new("stat")
        .arg("-f")
        .arg("-c")
        .arg("%l %c")
        .arg(&m.path));
    assert!(out.status.success());
    let line = mountinfo_line(&m.path).unwrap();
    assert!(line.contains(" ro,") && line.contains(" - fuse"), "{line}");
}

#[test]
fn large_directory_lists_completely() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let n = 3000;
    for i in 0..n {
        fs::write(src.join(format!("{i}")), format!("blob number {i}")).unwrap();
    }
    let img = t.path().join("img");
    run_ok(
        Command::new(bin("mkfs-blobfs"))
            .arg("-q")
            .arg(&img)
            .arg(&src),
    );
    let m = FuseMount::start(|dir| {
        let mut c = Command::new(bin("blobfs"));
        c.arg("mount").arg(&img).arg(dir).arg("-f");
        c
    })
    .unwrap();
    let names: std::collections::HashSet<_> = fs::read_dir(&m.path)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), n);
    let out = run_ok(Command::new("find").arg(&m.path).arg("-type").arg("f"));
    assert_eq!(out.lines().count(), n);
}

#[test]
fn daemon_mode_returns_when_live_and_sigterm_unmounts() {
    let f = Fixture::new(false);
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().to_owned();
    run_ok(
        Command::new(bin("blobfs"))
            .arg("mount")
            .arg(&f.img)
            .arg(&mp),
    );
    assert!(is_mounted(&mp), "mount not live when blobfs mount returned");
    let pid = daemon_pid(&mp).expect("daemon process");
    let digest = f.blobs.keys().next().unwrap();
    assert_eq!(&fs::read(mp.join(digest)).unwrap(), &f.blobs[digest]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(10), || !is_mounted(&mp)));
    assert!(wait_until(Duration::from_secs(10), || daemon_pid(&mp).is_none()));
}

#[test]
fn mount_helper_calling_convention() {
    let f = Fixture::new(true);
    let t = tempfile::tempdir().unwrap();
    let helper = t.path().join("mount.blobfs");
    std::os::unix::fs::symlink(bin("blobfs"), &helper).unwrap();
    let mp = t.path().join("mnt");
    fs::create_dir(&mp).unwrap();
    let opts = format!("ro,noauto,key={},layout=objects", f.pub_key.display());
    run_ok(
        Command::new(&helper)
            .arg(&f.img)
            .arg(&mp)
            .arg("-o")
            .arg(&opts),
    );
    let guard = Unmount(mp.clone());
    assert!(is_mounted(&mp));
    let digest = f.blobs.keys().next().unwrap();
    assert_eq!(
        &fs::read(mp.join(&digest[..2]).join(&digest[2..])).unwrap(),
        &f.blobs[digest]
    );
    drop(guard);
    let out = run(Command::new(&helper)
        .arg(&f.img)
        .arg(&mp)
        .arg("-o")
        .arg("frobnicate"));
    assert_eq!(out.status.code(), Some(2));
    assert!(!is_mounted(&mp));
}

struct Unmount(PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        integration_tests::unmount(&self.0);
        wait_until(Duration::from_secs(10), || daemon_pid(&self.0).is_none());
    }
}

#[test]
fn killed_daemon_with_auto_unmount_leaves_no_mount() {
    // Repeated: fusermount3 once lost a race with the daemon's exit about one kill in 20 to 60
    // (see mount_api::fusermount); a single kill would rarely show it.
    let f = Fixture::new(false);
    for round in 0..20 {
        let mut m = f.mount(&f.img, &["-o", "auto_unmount"]).unwrap();
        let path = m.path.clone();
        m.kill_daemon();
        assert!(
            wait_until(Duration::from_secs(10), || !is_mounted(&path)),
            "mount left behind after SIGKILL with auto_unmount (round {round})"
        );
    }
}

#[test]
fn killed_daemon_without_auto_unmount_gives_enotconn_and_cleans_up() {
    let f = Fixture::new(false);
    let mut m = f.mount(&f.img, &[]).unwrap();
    m.kill_daemon();
    let digest = f.blobs.keys().next().unwrap();
    let e = fs::read(m.path.join(digest)).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN));
    let path = m.path.clone();
    drop(m);
    assert!(!is_mounted(&path));
}

#[test]
fn unprivileged_user_mounts_with_fusermount() {
    let f = Fixture::new(false);
    // The image and its directory must be readable by the unprivileged user.
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let img = dir.path().join("img");
    fs::copy(&f.img, &img).unwrap();
    let mp = dir.path().join("mnt");
    fs::create_dir(&mp).unwrap();
    nix::unistd::chown(&mp, Some(65534.into()), Some(65534.into())).unwrap();
    let as_nobody = |args: &[&std::ffi::OsStr]| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
        c.args(args);
        c
    };
    let blobfs = bin("blobfs");
    run_ok(&mut as_nobody(&[
        blobfs.as_os_str(),
        "mount".as_ref(),
        img.as_os_str(),
        mp.as_os_str(),
    ]));
    let guard = Unmount(mp.clone());
    let line = mountinfo_line(&mp).expect("mounted");
    assert!(line.contains("user_id=65534"), "{line}");
    let digest = f.blobs.keys().next().unwrap();
    let file = mp.join(digest);
    let out = run(&mut as_nobody(&["cat".as_ref(), file.as_os_str()]));
    assert!(out.status.success());
    assert_eq!(&out.stdout, &f.blobs[digest]);
    run_ok(&mut as_nobody(&[
        "fusermount3".as_ref(),
        "-u".as_ref(),
        mp.as_os_str(),
    ]));
    assert!(!is_mounted(&mp));
    drop(guard);
}

/// The pid of the daemon serving `mountpoint`, found by its command line.
fn daemon_pid(mountpoint: &Path) -> Option<i32> {
    let want = mountpoint.as_os_str().as_encoded_bytes();
    for entry in fs::read_dir("/proc").ok()? {
        let entry = entry.ok()?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        let Ok(cmd) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        let is_blobfs = args
            .first()
            .is_some_and(|a| a.ends_with(b"blobfs") || a.ends_with(b"mount.blobfs"));
        if is_blobfs && args.contains(&want) {
            return Some(pid);
        }
    }
    None
}
