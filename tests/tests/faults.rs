//! Faults under load: daemons killed with SIGKILL in the middle of heavy concurrent I/O, and
//! full disks under the blob store. What must hold: clients see ENOTCONN (or ECONNABORTED for
//! a request in flight) and never wrong bytes, a plain umount cleans up, a new mount works,
//! and nothing on disk is damaged.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use integration_tests::{FuseMount, bin, is_mounted, pread, pseudo_random_bytes, run, run_ok};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// What a client may see from a mount whose daemon was killed.
fn disconnected(errno: i32) -> bool {
    errno == libc::ENOTCONN || errno == libc::ECONNABORTED
}

/// Reader threads over `files` (path -> expected content) until `stop`: every successful read
/// must return the expected bytes; errors are counted, and before `killed` there must be none.
fn readers(
    files: Arc<BTreeMap<PathBuf, Vec<u8>>>,
    threads: usize,
    stop: Arc<AtomicBool>,
    killed: Arc<AtomicBool>,
) -> (Vec<thread::JoinHandle<()>>, Arc<AtomicU64>, Arc<AtomicU64>) {
    let reads = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let handles = (0..threads)
        .map(|t| {
            let (files, stop, killed) = (files.clone(), stop.clone(), killed.clone());
            let (reads, errors) = (reads.clone(), errors.clone());
            thread::spawn(move || {
                let names: Vec<&PathBuf> = files.keys().collect();
                let mut k = t as u64;
                while !stop.load(Ordering::Relaxed) {
                    k = k
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let path = names[(k >> 33) as usize % names.len()];
                    let want = &files[path];
                    let was_killed = killed.load(Ordering::SeqCst);
                    let result = fs::File::open(path)
                        .map_err(|e| e.raw_os_error().unwrap_or(-1))
                        .and_then(|f| {
                            let off = if want.is_empty() {
                                0
                            } else {
                                (k >> 7) % want.len() as u64 / 4096 * 4096
                            };
                            pread(&f, off, 64 << 10).map(|got| (off, got))
                        });
                    match result {
                        Ok((off, got)) => {
                            let s = off as usize;
                            let e = (s + got.len()).min(want.len());
                            assert!(got[..] == want[s..e], "wrong bytes from {}", path.display());
                            reads.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(errno) => {
                            assert!(
                                was_killed || killed.load(Ordering::SeqCst),
                                "{}: errno {errno} before the daemon was killed",
                                path.display()
                            );
                            assert!(disconnected(errno), "{}: errno {errno}", path.display());
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    (handles, reads, errors)
}

/// Run readers, kill the daemon once they have read a while, and check what they saw.
fn kill_under_load(m: &mut FuseMount, files: BTreeMap<PathBuf, Vec<u8>>) {
    let files = Arc::new(files);
    let stop = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(AtomicBool::new(false));
    let (handles, reads, errors) = readers(files.clone(), 8, stop.clone(), killed.clone());
    let start = Instant::now();
    while reads.load(Ordering::Relaxed) < 1000 && start.elapsed() < Duration::from_secs(60) {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        reads.load(Ordering::Relaxed) >= 200,
        "readers made no progress"
    );
    killed.store(true, Ordering::SeqCst);
    m.kill_daemon();
    // Keep reading against the dead mount for a moment: ENOTCONN, never a hang or wrong bytes.
    let after = errors.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    while errors.load(Ordering::Relaxed) < after + 50 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    assert!(
        errors.load(Ordering::Relaxed) > after,
        "no ENOTCONN after SIGKILL"
    );
    let e = fs::read_dir(&m.path).map(|_| ()).unwrap_err();
    assert!(disconnected(e.raw_os_error().unwrap()), "{e}");
}

fn sha(path: &Path) -> String {
    run_ok(Command::new("sha256sum").arg(path))
        .split(' ')
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn blobfs_daemon_killed_during_concurrent_reads() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    for (i, size) in [1usize, 4096, 100_000, 600_000, 2 << 20].iter().enumerate() {
        fs::write(
            src.join(format!("f{i}")),
            pseudo_random_bytes(50 + i as u64, *size),
        )
        .unwrap();
    }
    let img = t.path().join("img");
    let man = t.path().join("man");
    run_ok(
        Command::new(bin("mkfs-blobfs"))
            .arg("-q")
            .arg("--manifest")
            .arg(&man)
            .arg(&img)
            .arg(&src),
    );
    let digest_sum = sha(&img);
    let mount = || {
        FuseMount::start(|dir| {
            let mut c = Command::new(bin("blobfs"));
            c.arg("mount").arg(&img).arg(dir).arg("-f");
            c
        })
        .unwrap()
    };
    let expected = |m: &FuseMount| -> BTreeMap<PathBuf, Vec<u8>> {
        fs::read_to_string(&man)
            .unwrap()
            .lines()
            .map(|l| {
                let mut it = l.splitn(3, ' ');
                let d = it.next().unwrap();
                it.next();
                (m.path.join(d), fs::read(it.next().unwrap()).unwrap())
            })
            .collect()
    };
    let mut m = mount();
    let path = m.path.clone();
    let files = expected(&m);
    kill_under_load(&mut m, files);
    // A plain umount releases the dead mount.
    run_ok(Command::new("umount").arg(&path));
    assert!(!is_mounted(&path));
    drop(m);
    assert_eq!(sha(&img), digest_sum, "the image changed");
    // A new mount of the same image serves every blob exactly.
    let m = mount();
    for (p, want) in expected(&m) {
        assert!(fs::read(&p).unwrap() == want, "{}", p.display());
    }
    m.unmount();
}

#[test]
fn idmap_overlay_killed_during_concurrent_reads_and_writes() {
    let src = tempfile::Builder::new().prefix("idmap.").tempdir().unwrap();
    fs::set_permissions(src.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let mut originals = BTreeMap::new();
    for i in 0..12u64 {
        let name = format!("f{i}");
        let data = pseudo_random_bytes(900 + i, 1000 + (i as usize) * 40_000);
        fs::write(src.path().join(&name), &data).unwrap();
        std::os::unix::fs::chown(src.path().join(&name), Some(50000), Some(50000)).unwrap();
        originals.insert(name, data);
    }
    fs::create_dir(src.path().join("scratch")).unwrap();
    let mount = || {
        FuseMount::start(|mnt| {
            let mut c = Command::new(bin("idmap-overlay"));
            c.args(["--mode", "fuse", "--uid-map", "50000:1000:1"])
                .args(["--gid-map", "50000:1000:1", "-f"])
                .arg(src.path())
                .arg(mnt);
            c
        })
        .unwrap()
    };
    let mut m = mount();
    let path = m.path.clone();
    // Writers append to their own files in scratch/ while the readers run: after the kill the
    // source holds a prefix of what each wrote, whole records only up to the last success.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (dir, stop) = (path.join("scratch"), stop.clone());
            thread::spawn(move || {
                let mut done = 0u64;
                let record = [b'a' + w as u8; 4096];
                let Ok(mut f) = fs::File::create(dir.join(format!("w{w}"))) else {
                    return 0;
                };
                while !stop.load(Ordering::Relaxed) {
                    match std::io::Write::write_all(&mut f, &record) {
                        Ok(()) => done += 1,
                        Err(e) => {
                            assert!(disconnected(e.raw_os_error().unwrap_or(-1)), "{e}");
                            break;
                        }
                    }
                }
                done
            })
        })
        .collect();
    let files = originals
        .iter()
        .map(|(n, d)| (path.join(n), d.clone()))
        .collect();
    kill_under_load(&mut m, files);
    stop.store(true, Ordering::Relaxed);
    let written: Vec<u64> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    run_ok(Command::new("umount").arg(&path));
    assert!(!is_mounted(&path));
    drop(m);
    // The source: every file intact, owners unchanged; the writers' files hold at least what
    // was acknowledged, in whole records of the right byte.
    for (name, data) in &originals {
        let p = src.path().join(name);
        assert!(fs::read(&p).unwrap() == *data, "{name} changed");
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&fs::metadata(&p).unwrap()),
            50000
        );
    }
    for (w, n) in written.iter().enumerate() {
        let Ok(got) = fs::read(src.path().join(format!("scratch/w{w}"))) else {
            continue;
        };
        assert!(
            got.len() as u64 >= n * 4096,
            "writer {w}: acknowledged data lost"
        );
        assert!(
            got.iter().all(|&b| b == b'a' + w as u8),
            "writer {w}: foreign bytes"
        );
    }
    // And a new mount works.
    let m = mount();
    for (name, data) in &originals {
        assert!(fs::read(m.path.join(name)).unwrap() == *data, "{name}");
    }
    m.unmount();
}

/// A small tmpfs, unmounted on drop.
struct SmallFs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}
impl SmallFs {
    fn new(size: &str) -> SmallFs {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("fs");
        fs::create_dir(&dir).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size}").as_str()),
        )
        .expect("mount tmpfs (tests run as root)");
        SmallFs { path: dir, _dir: t }
    }
}
impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn store_put_on_a_full_disk_fails_cleanly_and_the_store_still_verifies() {
    let small = SmallFs::new("3m");
    let dir = small.path.join("store");
    let blobfs = || Command::new(bin("blobfs"));
    run_ok(blobfs().args(["store", "init"]).arg(&dir));
    let t = tempfile::tempdir().unwrap();
    let ok = t.path().join("ok");
    let big = t.path().join("big");
    fs::write(&ok, pseudo_random_bytes(3, 200_000)).unwrap();
    fs::write(&big, pseudo_random_bytes(4, 6 << 20)).unwrap();
    run_ok(blobfs().args(["store", "put"]).arg(&dir).arg(&ok));
    let out = run(blobfs().args(["store", "put"]).arg(&dir).arg(&big));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    // Nothing half-written is visible; gc reclaims the staging file if one was left.
    let listed = run_ok(blobfs().args(["store", "verify"]).arg(&dir));
    assert!(listed.contains("OK, 1 blobs"), "{listed}");
    run_ok(blobfs().args(["store", "gc"]).arg(&dir));
    let staging: Vec<_> = fs::read_dir(dir.join("staging")).unwrap().collect();
    assert!(staging.is_empty(), "{staging:?}");
    // Space freed: a blob that fits still goes in.
    let again = t.path().join("again");
    fs::write(&again, pseudo_random_bytes(5, 100_000)).unwrap();
    run_ok(blobfs().args(["store", "put"]).arg(&dir).arg(&again));
    let listed = run_ok(blobfs().args(["store", "verify"]).arg(&dir));
    assert!(listed.contains("OK, 2 blobs"), "{listed}");
}

#[test]
fn source_files_disappearing_under_idmap_overlay_while_in_use() {
    let src = tempfile::Builder::new().prefix("idmap.").tempdir().unwrap();
    fs::set_permissions(src.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let d = src.path().join("d");
    fs::create_dir(&d).unwrap();
    let old = |i: u64| pseudo_random_bytes(300 + i, 70_000);
    let new = |i: u64| pseudo_random_bytes(700 + i, 5_000);
    for i in 0..40 {
        fs::write(d.join(format!("f{i}")), old(i)).unwrap();
    }
    fs::write(src.path().join("keep"), b"still here").unwrap();
    let m = FuseMount::start(|mnt| {
        let mut c = Command::new(bin("idmap-overlay"));
        c.args(["--mode", "fuse", "--uid-map", "0:1000:1", "-f"])
            .arg(src.path())
            .arg(mnt);
        c
    })
    .unwrap();
    // Descriptors opened through the mount before anything disappears.
    let held: Vec<(u64, fs::File)> = (0..40)
        .step_by(3)
        .map(|i| (i, fs::File::open(m.path.join(format!("d/f{i}"))).unwrap()))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..4u64)
        .map(|t| {
            let (dir, stop) = (m.path.join("d"), stop.clone());
            thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let i = (n * 7 + t) % 40;
                    n += 1;
                    match fs::read(dir.join(format!("f{i}"))) {
                        Ok(got) => assert!(
                            got == old(i) || got == new(i),
                            "f{i}: bytes of neither version"
                        ),
                        Err(e) => {
                            let errno = e.raw_os_error().unwrap_or(-1);
                            assert!([libc::ENOENT, libc::ESTALE].contains(&errno), "f{i}: {e}");
                        }
                    }
                }
                n
            })
        })
        .collect();
    // Underneath: unlink, replace with other content, then remove the whole directory.
    for i in 0..40 {
        let p = d.join(format!("f{i}"));
        fs::remove_file(&p).unwrap();
        if i % 2 == 0 {
            fs::write(&p, new(i)).unwrap();
        }
        thread::sleep(Duration::from_millis(5));
    }
    fs::remove_dir_all(&d).unwrap();
    thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(reads > 40, "{reads}");
    // Files opened before keep their content (the inode lives while it is open) or fail;
    // never other bytes.
    for (i, f) in &held {
        match pread(f, 0, 70_000) {
            Ok(got) => assert!(got == old(*i), "held f{i}: wrong bytes"),
            Err(errno) => assert!([libc::ESTALE, libc::EIO].contains(&errno), "{errno}"),
        }
    }
    drop(held);
    // The daemon is alive and serves the rest. A removed file may still be found through the
    // kernel's entry cache for its timeout: then with its own old bytes.
    match fs::read(m.path.join("d/f1")) {
        Ok(got) => assert!(got == old(1), "removed f1: wrong bytes"),
        Err(e) => assert!(
            [libc::ENOENT, libc::ESTALE].contains(&e.raw_os_error().unwrap_or(-1)),
            "{e}"
        ),
    }
    assert_eq!(fs::read(m.path.join("keep")).unwrap(), b"still here");
    let log = m.unmount();
    assert!(!log.contains("panicked"), "{log}");
}

/// How long the concurrency soak runs (`SOAK_SECONDS`, default 15).
fn soak_time() -> Duration {
    let secs = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    Duration::from_secs(secs)
}

/// 16 threads against one idmap-overlay mount: each writes its own file at random offsets and
/// sizes, keeping a model of what it must contain, and reads back random ranges of its own
/// file and of a shared read-only set; everything is compared with the model. At the end the
/// source holds exactly the model.
#[test]
fn sixteen_threads_of_reads_and_writes_match_a_model() {
    let src = tempfile::Builder::new().prefix("idmap.").tempdir().unwrap();
    fs::set_permissions(src.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let shared: Vec<Vec<u8>> = (0..8)
        .map(|i| pseudo_random_bytes(5000 + i, 30_000 + i as usize * 10_000))
        .collect();
    for (i, d) in shared.iter().enumerate() {
        fs::write(src.path().join(format!("shared{i}")), d).unwrap();
    }
    let m = FuseMount::start(|mnt| {
        let mut c = Command::new(bin("idmap-overlay"));
        c.args([
            "--mode",
            "fuse",
            "--uid-map",
            "0:0:1",
            "--gid-map",
            "0:0:1",
            "-f",
        ])
        .arg(src.path())
        .arg(mnt);
        c
    })
    .unwrap();
    let shared = Arc::new(shared);
    let deadline = Instant::now() + soak_time();
    let workers: Vec<_> = (0..16u64)
        .map(|t| {
            let (root, shared) = (m.path.clone(), shared.clone());
            thread::spawn(move || {
                use std::os::unix::fs::FileExt;
                let path = root.join(format!("own{t}"));
                let f = fs::File::options()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .unwrap();
                let mut model: Vec<u8> = Vec::new();
                let mut x = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let mut rnd = move |n: u64| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % n.max(1)
                };
                let mut ops = 0u64;
                while Instant::now() < deadline {
                    match rnd(4) {
                        0 | 1 => {
                            let off = rnd(200_000);
                            let len = 1 + rnd(20_000) as usize;
                            let data = pseudo_random_bytes(rnd(u64::MAX), len);
                            f.write_all_at(&data, off).unwrap();
                            let end = off as usize + len;
                            if model.len() < end {
                                model.resize(end, 0);
                            }
                            model[off as usize..end].copy_from_slice(&data);
                        }
                        2 => {
                            let off = rnd(model.len() as u64 + 1);
                            let got = pread(&f, off, 1 + rnd(30_000) as usize).unwrap();
                            let s = off as usize;
                            let e = (s + got.len()).min(model.len());
                            assert!(got[..] == model[s..e], "own{t}: differs at {off}");
                            assert_eq!(e - s, got.len(), "own{t}: short read");
                        }
                        _ => {
                            let i = rnd(shared.len() as u64) as usize;
                            let got = fs::read(root.join(format!("shared{i}"))).unwrap();
                            assert!(got == shared[i], "shared{i} differs");
                        }
                    }
                    ops += 1;
                }
                (model, ops)
            })
        })
        .collect();
    let results: Vec<(Vec<u8>, u64)> = workers.into_iter().map(|h| h.join().unwrap()).collect();
    let log = m.unmount();
    assert!(!log.contains("panicked"), "{log}");
    let ops: u64 = results.iter().map(|r| r.1).sum();
    eprintln!("soak: {ops} operations by 16 threads");
    assert!(ops > 1000, "{ops}");
    for (t, (model, _)) in results.iter().enumerate() {
        let got = fs::read(src.path().join(format!("own{t}"))).unwrap();
        assert!(got == *model, "own{t}: the source differs from the model");
    }
}
