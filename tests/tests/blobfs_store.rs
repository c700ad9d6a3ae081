//! The writable blob store, mounted for real: the write-once protocol, immutability, crash
//! safety, export, corruption and full disks.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use blobfs::merkle::MerkleTree;
use integration_tests::{FuseMount, bin, is_mounted, pseudo_random_bytes, run, run_ok};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier, Mutex};

fn name_of(data: &[u8]) -> String {
    hex::encode(MerkleTree::from_bytes(data).digest())
}

fn blobfs() -> Command {
    Command::new(bin("blobfs"))
}

struct StoreDir {
    _t: tempfile::TempDir,
    dir: PathBuf,
}

fn new_store() -> StoreDir {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("store");
    run_ok(blobfs().args(["store", "init"]).arg(&dir));
    StoreDir { _t: t, dir }
}

fn mount(dir: &Path, opts: &[&str]) -> FuseMount {
    FuseMount::start(|mp| {
        let mut c = blobfs();
        c.args(["store", "mount"])
            .arg(dir)
            .arg(mp)
            .arg("-f")
            .args(opts);
        c
    })
    .unwrap()
}

fn errno<T>(r: std::io::Result<T>) -> i32 {
    r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
}

fn create(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

#[test]
fn cp_and_dd_create_verified_blobs() {
    let s = new_store();
    let m = mount(&s.dir, &[]);
    let t = tempfile::tempdir().unwrap();
    for (i, size) in [0usize, 1, 4096, 4097, 1_000_000].iter().enumerate() {
        let data = pseudo_random_bytes(i as u64, *size);
        let src = t.path().join(format!("src{i}"));
        fs::write(&src, &data).unwrap();
        let name = name_of(&data);
        let tool = if i % 2 == 0 { "cp" } else { "dd" };
        if tool == "cp" {
            run_ok(Command::new("cp").arg(&src).arg(m.path.join(&name)));
        } else {
            run_ok(
                Command::new("dd")
                    .arg(format!("if={}", src.display()))
                    .arg(format!("of={}", m.path.join(&name).display()))
                    .arg("bs=64k")
                    .arg("status=none"),
            );
        }
        assert_eq!(
            fs::read(m.path.join(&name)).unwrap(),
            data,
            "{tool} size {size}"
        );
        let out = run_ok(
            Command::new("fsverity")
                .arg("measure")
                .arg(m.path.join(&name)),
        );
        assert!(out.starts_with(&format!("sha256:{name}")), "{out}");
    }
    assert_eq!(fs::read_dir(&m.path).unwrap().count(), 5);
    drop(m);
    let out = run_ok(blobfs().args(["store", "verify"]).arg(&s.dir));
    assert!(out.contains("OK, 5 blobs verified"), "{out}");
}

#[test]
fn wrong_content_is_eio_and_nothing_becomes_visible() {
    let s = new_store();
    let m = mount(&s.dir, &[]);
    let name = name_of(b"the real content");
    let mut f = create(&m.path.join(&name)).unwrap();
    f.write_all(b"other content").unwrap();
    // The check happens at flush (close) or fsync: it must report EIO.
    assert_eq!(errno(f.sync_all()), libc::EIO);
    drop(f);
    assert_eq!(errno(fs::metadata(m.path.join(&name))), libc::ENOENT);
    assert_eq!(fs::read_dir(&m.path).unwrap().count(), 0);
    // cp reports the failure too (close returns EIO).
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("x"), b"not it").unwrap();
    let out = run(Command::new("cp")
        .arg(t.path().join("x"))
        .arg(m.path.join(&name)));
    assert!(!out.status.success());
    // Nothing leaked: no staging files after the failed writes.
    assert_eq!(fs::read_dir(s.dir.join("staging")).unwrap().count(), 0);
    drop(m);
    let out = run_ok(blobfs().args(["store", "verify"]).arg(&s.dir));
    assert!(out.contains("OK, 0 blobs"), "{out}");
}

#[test]
fn names_must_be_digests_and_creation_is_exclusive() {
    let s = new_store();
    let m = mount(&s.dir, &[]);
    for bad in ["hello", &"A".repeat(64), &"0".repeat(63)] {
        assert_eq!(errno(create(&m.path.join(bad))), libc::EINVAL, "{bad}");
    }
    let data = b"exclusive".to_vec();
    let name = name_of(&data);
    fs::write(m.path.join(&name), &data).unwrap();
    assert_eq!(errno(create(&m.path.join(&name))), libc::EEXIST);
}

#[test]
fn concurrent_creators_exactly_one_succeeds() {
    let s = new_store();
    let m = mount(&s.dir, &[]);
    let data = Arc::new(pseudo_random_bytes(77, 300_000));
    let path = m.path.join(name_of(&data));
    for _round in 0..3 {
        let _ = fs::remove_file(&path);
        let n = 6;
        let barrier = Arc::new(Barrier::new(n));
        let results = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..n)
            .map(|_| {
                let (b, r, d, p) = (barrier.clone(), results.clone(), data.clone(), path.clone());
                std::thread::spawn(move || {
                    b.wait();
                    let res = create(&p).and_then(|mut f| {
                        f.write_all(&d)?;
                        f.sync_all()
                    });
                    r.lock().unwrap().push(res.map_err(|e| e.raw_os_error()));
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let results = results.lock().unwrap();
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "{results:?}");
        assert!(
            results
                .iter()
                .all(|r| r.is_ok() || *r == Err(Some(libc::EEXIST))),
            "{results:?}"
        );
        assert_eq!(&fs::read(&path).unwrap(), &*data);
    }
}

#[test]
fn sealed_blobs_are_immutable_and_unlink_removes_them() {
    use std::os::unix::fs::PermissionsExt;
    let s = new_store();
    let m = mount(&s.dir, &[]);
    let data = b"immutable".to_vec();
    let name = name_of(&data);
    let p = m.path.join(&name);
    fs::write(&p, &data).unwrap();
    let w = fs::OpenOptions::new().write(true).open(&p);
    assert_eq!(errno(w), libc::EPERM);
    let t = fs::OpenOptions::new().write(true).truncate(true).open(&p);
    assert_eq!(errno(t), libc::EPERM);
    assert_eq!(
        errno(fs::set_permissions(&p, fs::Permissions::from_mode(0o666))),
        libc::EPERM
    );
    assert_eq!(
        errno(fs::rename(&p, m.path.join(name_of(b"x")))),
        libc::EPERM
    );
    assert_eq!(fs::read(&p).unwrap(), data);
    fs::remove_file(&p).unwrap();
    assert_eq!(errno(fs::metadata(&p)), libc::ENOENT);
    // Space is reclaimed at once.
    let objects: usize = fs::read_dir(s.dir.join("objects"))
        .unwrap()
        .map(|d| fs::read_dir(d.unwrap().path()).unwrap().count())
        .sum();
    assert_eq!(objects, 0);
    drop(m);
    // -o nodelete refuses unlink.
    let m = mount(&s.dir, &["-o", "nodelete"]);
    fs::write(m.path.join(&name), &data).unwrap();
    assert_eq!(errno(fs::remove_file(m.path.join(&name))), libc::EPERM);
}

#[test]
fn ftruncate_announces_the_size_and_the_completing_write_verifies() {
    let s = new_store();
    let m = mount(&s.dir, &[]);
    let data = pseudo_random_bytes(5, 200_000);
    let name = name_of(&data);
    let f = create(&m.path.join(&name)).unwrap();
    f.set_len(data.len() as u64).unwrap();
    let mut f = f;
    f.write_all(&data[..100_000]).unwrap();
    // Out-of-order writes are refused.
    use std::os::unix::fs::FileExt;
    assert_eq!(errno(f.write_at(b"x", 150_000)), libc::EINVAL);
    // Wrong final bytes: the completing write itself fails with EIO.
    let mut bad = data[100_000..].to_vec();
    bad[5] ^= 1;
    assert_eq!(errno(f.write_all(&bad)), libc::EIO);
    drop(f);
    assert_eq!(errno(fs::metadata(m.path.join(&name))), libc::ENOENT);
    // And the right bytes work.
    let mut f = create(&m.path.join(&name)).unwrap();
    f.set_len(data.len() as u64).unwrap();
    f.write_all(&data).unwrap();
    drop(f);
    assert_eq!(fs::read(m.path.join(&name)).unwrap(), data);
}

#[test]
fn export_is_byte_identical_to_mkfs() {
    let s = new_store();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let mut files = Vec::new();
    for (i, size) in [0usize, 10, 4096, 9000, 700_000].iter().enumerate() {
        let p = src.join(format!("f{i}"));
        fs::write(&p, pseudo_random_bytes(100 + i as u64, *size)).unwrap();
        files.push(p);
    }
    run_ok(blobfs().args(["store", "put"]).arg(&s.dir).args(&files));
    let key = t.path().join("k.pem");
    run_ok(blobfs().arg("keygen").arg(&key));
    let exported = t.path().join("exported.img");
    run_ok(
        blobfs()
            .args(["store", "export"])
            .arg(&s.dir)
            .arg(&exported)
            .arg("--sign")
            .arg(&key),
    );
    let built = t.path().join("mkfs.img");
    run_ok(
        Command::new(bin("mkfs-blobfs"))
            .arg("-q")
            .arg("--sign")
            .arg(&key)
            .arg(&built)
            .arg(&src),
    );
    assert!(fs::read(&exported).unwrap() == fs::read(&built).unwrap());
}

#[test]
fn corrupted_or_truncated_data_is_reported_and_reads_fail() {
    let s = new_store();
    let t = tempfile::tempdir().unwrap();
    let data = pseudo_random_bytes(9, 50_000);
    let src = t.path().join("f");
    fs::write(&src, &data).unwrap();
    run_ok(blobfs().args(["store", "put"]).arg(&s.dir).arg(&src));
    let name = name_of(&data);
    let obj = s.dir.join("objects").join(&name[..2]).join(&name[2..]);
    let mut bytes = fs::read(&obj).unwrap();
    bytes[30_000] ^= 4;
    fs::write(&obj, &bytes).unwrap();
    let out = run(blobfs().args(["store", "verify"]).arg(&s.dir));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("failed verification"));
    {
        let m = mount(&s.dir, &[]);
        let f = fs::File::open(m.path.join(&name)).unwrap();
        assert_eq!(
            integration_tests::pread(&f, 28_672, 4096).unwrap_err(),
            libc::EIO
        );
        assert_eq!(
            integration_tests::pread(&f, 0, 4096).unwrap(),
            data[..4096].to_vec()
        );
    }
    fs::write(&obj, &bytes[..10_000]).unwrap();
    let out = run(blobfs().args(["store", "verify"]).arg(&s.dir));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("index says"));
}

#[test]
fn a_child_spawned_while_writing_does_not_end_the_blob() {
    // The child's copy of the (close-on-exec) descriptor is closed at exec, which sends the
    // daemon a FLUSH: a flush from another descriptor table must not seal or discard.
    let s = new_store();
    let m = mount(&s.dir, &[]);
    let data = pseudo_random_bytes(7, 300_000);
    let path = m.path.join(name_of(&data));
    let mut f = create(&path).unwrap();
    f.write_all(&data[..100_000]).unwrap();
    assert!(Command::new("true").status().unwrap().success());
    f.write_all(&data[100_000..]).unwrap();
    let synced = f.sync_all();
    drop(f);
    let read = fs::read(&path);
    let log = m.unmount();
    assert!(synced.is_ok(), "fsync: {synced:?}; daemon log:\n{log}");
    assert_eq!(read.unwrap(), data, "daemon log:\n{log}");
}

#[test]
fn a_child_spawned_before_the_first_write_does_not_end_the_blob() {
    // Before any data arrives the daemon cannot know the writer's descriptor table, and the
    // size announced by ftruncate makes an early flush look like a short blob. Any test
    // thread spawning a process in that window used to make the first write fail with EIO.
    let s = new_store();
    let m = mount(&s.dir, &[]);
    let data = pseudo_random_bytes(8, 200_000);
    let path = m.path.join(name_of(&data));
    let mut f = create(&path).unwrap();
    f.set_len(data.len() as u64).unwrap();
    assert!(Command::new("true").status().unwrap().success());
    let written = f.write_all(&data);
    drop(f);
    let read = fs::read(&path);
    let log = m.unmount();
    assert!(written.is_ok(), "write: {written:?}; daemon log:\n{log}");
    assert_eq!(read.unwrap(), data, "daemon log:\n{log}");
}

#[test]
fn full_disk_fails_the_write_and_leaves_the_store_consistent() {
    let t = tempfile::tempdir().unwrap();
    let fs_dir = t.path().join("small");
    fs::create_dir(&fs_dir).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &fs_dir,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=3m"),
    )
    .unwrap();
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _guard = Umount(fs_dir.clone());
    let dir = fs_dir.join("store");
    run_ok(blobfs().args(["store", "init"]).arg(&dir));
    let small = pseudo_random_bytes(1, 100_000);
    let big = pseudo_random_bytes(2, 8 << 20);
    {
        let m = mount(&dir, &[]);
        fs::write(m.path.join(name_of(&small)), &small).unwrap();
        let r = create(&m.path.join(name_of(&big))).and_then(|mut f| {
            f.write_all(&big)?;
            f.sync_all()
        });
        let got = errno(r);
        let gone = errno(fs::metadata(m.path.join(name_of(&big))));
        assert_eq!(fs::read(m.path.join(name_of(&small))).unwrap(), small);
        let log = m.unmount();
        assert_eq!(got, libc::ENOSPC, "daemon log:\n{log}");
        assert_eq!(gone, libc::ENOENT);
    }
    let out = run_ok(blobfs().args(["store", "verify"]).arg(&dir));
    assert!(out.contains("OK, 1 blobs"), "{out}");
}

#[test]
fn sigkill_at_random_points_keeps_every_acknowledged_blob_and_nothing_else() {
    let s = new_store();
    let mut acknowledged: Vec<(String, Vec<u8>)> = Vec::new();
    for round in 0..6u64 {
        let mut m = mount(&s.dir, &[]);
        let path = m.path.clone();
        let done = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let done = done.clone();
            std::thread::spawn(move || {
                for i in 0..10_000u64 {
                    let size = (i as usize * 7919 + round as usize * 13) % 400_000;
                    let data = pseudo_random_bytes(round * 100_000 + i, size);
                    let name = name_of(&data);
                    let r = create(&path.join(&name)).and_then(|mut f| {
                        f.write_all(&data)?;
                        f.sync_all()
                    });
                    match r {
                        Ok(()) => done.lock().unwrap().push((name, data)),
                        Err(_) => break,
                    }
                }
            })
        };
        // Let some blobs through, then kill at a point that varies per round.
        let target = 3 + round as usize * 2;
        integration_tests::wait_until(std::time::Duration::from_secs(60), || {
            done.lock().unwrap().len() >= target
        });
        std::thread::sleep(std::time::Duration::from_millis(round * 7 % 20));
        m.kill_daemon();
        writer.join().unwrap();
        drop(m);
        acknowledged.extend(done.lock().unwrap().drain(..));
        // After restart: every acknowledged blob is there and intact.
        let m = mount(&s.dir, &[]);
        for (name, data) in &acknowledged {
            assert_eq!(&fs::read(m.path.join(name)).unwrap(), data, "round {round}");
        }
        let listed = fs::read_dir(&m.path).unwrap().count();
        assert!(listed >= acknowledged.len());
        drop(m);
        // Every listed blob verifies; at most leftover files that gc reclaims.
        run_ok(blobfs().args(["store", "gc"]).arg(&s.dir));
        let out = run_ok(blobfs().args(["store", "verify"]).arg(&s.dir));
        assert!(out.contains("OK"), "{out}");
    }
    assert!(!acknowledged.is_empty());
}

#[test]
fn mount_helper_for_stores_and_daemon_mode() {
    let s = new_store();
    let t = tempfile::tempdir().unwrap();
    let helper = t.path().join("mount.blobfs-store");
    std::os::unix::fs::symlink(bin("blobfs"), &helper).unwrap();
    let mp = t.path().join("mnt");
    fs::create_dir(&mp).unwrap();
    run_ok(
        Command::new(&helper)
            .arg(&s.dir)
            .arg(&mp)
            .arg("-o")
            .arg("nodelete"),
    );
    assert!(is_mounted(&mp));
    let data = b"via helper".to_vec();
    fs::write(mp.join(name_of(&data)), &data).unwrap();
    // A second mount of the same store is refused (one process owns the index).
    let mp2 = t.path().join("mnt2");
    fs::create_dir(&mp2).unwrap();
    let out = run(blobfs().args(["store", "mount"]).arg(&s.dir).arg(&mp2));
    assert_eq!(out.status.code(), Some(1));
    assert!(!is_mounted(&mp2));
    integration_tests::unmount(&mp);
    assert!(integration_tests::wait_until(
        std::time::Duration::from_secs(10),
        || store_is_free(&s.dir)
    ));
    let out = run_ok(blobfs().args(["store", "ls"]).arg(&s.dir));
    assert!(out.contains(&name_of(&data)));
}

/// The daemon has exited and released the index (its lock).
fn store_is_free(dir: &Path) -> bool {
    run(blobfs().args(["store", "ls"]).arg(dir))
        .status
        .success()
}
