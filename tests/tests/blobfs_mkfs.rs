//! mkfs.blobfs and the offline `blobfs` tools against real files and the `fsverity` CLI.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use integration_tests::{bin, pseudo_random_bytes, run, run_ok};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn mkfs() -> Command {
    let mut c = Command::new(bin("mkfs-blobfs"));
    c.arg("-q");
    c
}

fn blobfs() -> Command {
    Command::new(bin("blobfs"))
}

/// Sizes around every boundary the fs-verity tree has, plus multi-level trees.
fn interesting_sizes() -> Vec<usize> {
    let mut sizes = vec![0, 1, 31, 4095, 4096, 4097, 8191, 8192, 8193];
    let level = 128 * 4096; // one full tree block of leaf hashes
    sizes.extend([level - 1, level, level + 1, 2 * level + 4095]);
    sizes.extend([128 * level + 1, 20 << 20]); // three levels, and 20 MiB
    sizes
}

/// A tree with hundreds of files of boundary and random sizes; returns its root.
fn make_tree(root: &Path, random_files: usize) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    for (i, size) in interesting_sizes().into_iter().enumerate() {
        let p = root.join(format!("edge/{i:02}-{size}"));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, pseudo_random_bytes(i as u64, size)).unwrap();
        paths.push(p);
    }
    for i in 0..random_files {
        let size = (pseudo_random_bytes(1000 + i as u64, 8)[0] as usize) * 397 % 70_000;
        let p = root.join(format!("rand/d{}/f{i}", i % 7));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, pseudo_random_bytes(5000 + i as u64, size)).unwrap();
        paths.push(p);
    }
    paths
}

fn manifest(path: &Path) -> HashMap<String, (String, u64)> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut it = l.splitn(3, ' ');
            let d = it.next().unwrap().to_owned();
            let s = it.next().unwrap().parse().unwrap();
            (it.next().unwrap().to_owned(), (d, s))
        })
        .collect()
}

#[test]
fn blob_names_equal_fsverity_digest_for_hundreds_of_files() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let paths = make_tree(&src, 300);
    let img = t.path().join("img");
    let man = t.path().join("manifest");
    run_ok(mkfs().arg("--manifest").arg(&man).arg(&img).arg(&src));
    let m = manifest(&man);
    assert_eq!(m.len(), paths.len());

    // The independent oracle: Debian's fsverity tool, in batches.
    for chunk in paths.chunks(100) {
        let out = run_ok(Command::new("fsverity").arg("digest").args(chunk));
        for line in out.lines() {
            let (d, p) = line.split_once(' ').unwrap();
            let want = d.strip_prefix("sha256:").unwrap();
            assert_eq!(m[p].0, want, "digest of {p}");
            assert_eq!(m[p].1, fs::metadata(p).unwrap().len());
        }
    }
    // Every blob listed by the image is one of those digests, stored once.
    let ls = run_ok(blobfs().arg("ls").arg(&img));
    let unique: std::collections::HashSet<_> = m.values().map(|v| v.0.clone()).collect();
    assert_eq!(ls.lines().count(), unique.len());
    run_ok(blobfs().arg("verify").arg(&img));
}

#[test]
fn identical_bytes_whatever_the_thread_count_input_order_and_fsync() {
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("a");
    let b = t.path().join("b");
    make_tree(&a, 60);
    make_tree(&b, 40);
    fs::write(b.join("dup-of-a"), pseudo_random_bytes(3, 10_000)).unwrap();
    let key = t.path().join("k.pem");
    run_ok(blobfs().arg("keygen").arg(&key));
    let one = t.path().join("one.img");
    let two = t.path().join("two.img");
    run_ok(
        mkfs()
            .args(["--threads", "1", "--sign"])
            .arg(&key)
            .arg(&one)
            .arg(&a)
            .arg(&b),
    );
    // --fsync sends the image to the disk while it is written (over 80 MiB here, so more
    // than once): the bytes must not change.
    run_ok(
        mkfs()
            .args(["--threads", "2", "--fsync", "--sign"])
            .arg(&key)
            .arg(&two)
            .arg(&b)
            .arg(&a),
    );
    assert!(
        fs::read(&one).unwrap() == fs::read(&two).unwrap(),
        "images differ"
    );
}

struct Signed {
    _t: tempfile::TempDir,
    img: PathBuf,
    key_a: PathBuf,
    pub_a: PathBuf,
    pub_b: PathBuf,
    unsigned: PathBuf,
}

fn signed_image() -> Signed {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    for i in 0..5 {
        fs::write(
            src.join(format!("f{i}")),
            pseudo_random_bytes(i, 3000 * i as usize),
        )
        .unwrap();
    }
    let key_a = t.path().join("a.pem");
    let key_b = t.path().join("b.pem");
    run_ok(blobfs().arg("keygen").arg(&key_a));
    run_ok(blobfs().arg("keygen").arg(&key_b));
    let img = t.path().join("signed.img");
    run_ok(mkfs().arg("--sign").arg(&key_a).arg(&img).arg(&src));
    let unsigned = t.path().join("unsigned.img");
    run_ok(mkfs().arg(&unsigned).arg(&src));
    Signed {
        img,
        key_a,
        pub_a: t.path().join("a.pub.pem"),
        pub_b: t.path().join("b.pub.pem"),
        unsigned,
        _t: t,
    }
}

fn verify_err(img: &Path, key: &Path) -> String {
    let out = run(blobfs().arg("verify").arg(img).arg("--key").arg(key));
    assert_eq!(
        out.status.code(),
        Some(1),
        "verify of {} should fail",
        img.display()
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn signatures_right_key_wrong_key_missing_signature() {
    let s = signed_image();
    let ok = run_ok(
        blobfs()
            .arg("verify")
            .arg(&s.img)
            .arg("--key")
            .arg(&s.pub_a),
    );
    assert!(ok.contains("signed by key id"), "{ok}");
    // The private key file works as a verification key too.
    run_ok(
        blobfs()
            .arg("verify")
            .arg(&s.img)
            .arg("--key")
            .arg(&s.key_a),
    );
    let e = verify_err(&s.img, &s.pub_b);
    assert!(e.contains("no valid signature"), "{e}");
    let e = verify_err(&s.unsigned, &s.pub_a);
    assert!(e.contains("not signed"), "{e}");
    // A key file that is not a key.
    let e = verify_err(&s.img, &s.img);
    assert!(e.contains("not an ed25519 key"), "{e}");
}

#[test]
fn any_flipped_bit_in_the_signed_region_or_truncation_is_refused() {
    let s = signed_image();
    let orig = fs::read(&s.img).unwrap();
    let copy = s.img.with_extension("bad");
    // Header (whole encoded header), signature slot, index: every byte of the header and a
    // sample across the signature and index.
    let mut positions: Vec<usize> = (0..256).collect();
    positions.extend((4096..4096 + 16 + 96).step_by(7));
    positions.extend((8192..8192 + 64 * 3).step_by(5));
    for pos in positions {
        let mut b = orig.clone();
        b[pos] ^= 0x10;
        fs::write(&copy, &b).unwrap();
        let out = run(blobfs().arg("verify").arg(&copy).arg("--key").arg(&s.pub_a));
        assert_eq!(out.status.code(), Some(1), "flip at {pos} accepted");
        assert!(!out.stderr.is_empty(), "no message for flip at {pos}");
    }
    for len in [0, 100, 4096, 8192, orig.len() / 2, orig.len() - 1] {
        fs::write(&copy, &orig[..len]).unwrap();
        let e = verify_err(&copy, &s.pub_a);
        assert!(
            e.contains("truncated") || e.contains("not a blobfs image"),
            "len {len}: {e}"
        );
    }
}

#[test]
fn data_and_tree_corruption_is_found_by_verify_and_cat() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("big"), pseudo_random_bytes(9, 3 << 20)).unwrap();
    let img = t.path().join("img");
    run_ok(mkfs().arg(&img).arg(&src));
    let info = run_ok(blobfs().arg("inspect").arg("--json").arg(&img));
    let tree_off = json_u64(&info, "trees", "offset");
    let data_off = json_u64(&info, "data", "offset");
    let digest = run_ok(blobfs().arg("ls").arg(&img));
    let digest = digest.split(' ').next().unwrap().to_owned();
    for pos in [tree_off + 100, data_off + 5, data_off + (2 << 20) + 77] {
        let mut b = fs::read(&img).unwrap();
        b[pos as usize] ^= 1;
        let bad = t.path().join("bad");
        fs::write(&bad, &b).unwrap();
        let out = run(blobfs().arg("verify").arg(&bad));
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stdout).contains("failed verification"));
        let out = run(blobfs().arg("cat").arg(&bad).arg(&digest));
        assert_eq!(out.status.code(), Some(1));
        // cat stops at the bad block: never more than the verified prefix.
        let good = pseudo_random_bytes(9, 3 << 20);
        assert!(good.starts_with(&out.stdout));
    }
    let out = run(blobfs().arg("cat").arg(&img).arg(&digest));
    assert!(out.status.success());
    assert!(out.stdout == pseudo_random_bytes(9, 3 << 20));
}

fn json_u64(text: &str, section: &str, field: &str) -> u64 {
    // Minimal extraction to keep serde out of the tests: `"section":{..."field":N`.
    let s = text.find(&format!("\"{section}\"")).unwrap();
    let rest = &text[s..];
    let f = rest.find(&format!("\"{field}\":")).unwrap() + field.len() + 3;
    rest[f..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

#[test]
fn special_files_are_skipped_and_symlinks_followed_only_when_asked() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("file"), b"content").unwrap();
    nix::unistd::mkfifo(
        &src.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    std::os::unix::fs::symlink(t.path().join("outside"), src.join("link")).unwrap();
    fs::write(t.path().join("outside"), b"outside").unwrap();
    let img = t.path().join("img");
    // A FIFO must not be opened: with a reader nobody writes to, that would hang forever.
    let out = run(Command::new("timeout")
        .arg("60")
        .arg(bin("mkfs-blobfs"))
        .arg(&img)
        .arg(&src));
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("skipping special file"), "{err}");
    assert!(err.contains("skipping symlink"), "{err}");
    assert_eq!(run_ok(blobfs().arg("ls").arg(&img)).lines().count(), 1);
    // -q keeps the warning about the FIFO but drops the per-symlink info lines.
    let out = run(Command::new("timeout")
        .arg("60")
        .arg(bin("mkfs-blobfs"))
        .arg("-q")
        .arg(&img)
        .arg(&src));
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("skipping special file"), "{err}");
    assert!(!err.contains("skipping symlink"), "{err}");
    run_ok(mkfs().arg("--follow-symlinks").arg(&img).arg(&src));
    assert_eq!(run_ok(blobfs().arg("ls").arg(&img)).lines().count(), 2);
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn failures_leave_no_partial_image_and_no_temp_file() {
    let t = tempfile::tempdir().unwrap();
    let out_dir = t.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    // Missing input.
    let out = run(mkfs()
        .arg(out_dir.join("img"))
        .arg(t.path().join("missing")));
    assert_eq!(out.status.code(), Some(1));
    assert!(dir_names(&out_dir).is_empty());
    // Usage error.
    let out = run(mkfs().arg(out_dir.join("img")));
    assert_eq!(out.status.code(), Some(2));

    // A full disk: a 1 MiB tmpfs as the target directory, 4 MiB of input.
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), pseudo_random_bytes(1, 4 << 20)).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &out_dir,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .expect("mount tmpfs (tests run as root)");
    let out = run(mkfs().arg(out_dir.join("img")).arg(&src));
    let names = dir_names(&out_dir);
    nix::mount::umount(&out_dir).unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No space left"), "{err}");
    assert!(names.is_empty(), "left behind: {names:?}");
}

#[test]
fn json_summary_and_manifest_escape_odd_names() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("tab\tand\nnewline"), b"x").unwrap();
    let img = t.path().join("img");
    let man = t.path().join("man");
    let out = run_ok(
        Command::new(bin("mkfs-blobfs"))
            .arg("--json")
            .arg("--manifest")
            .arg(&man)
            .arg(&img)
            .arg(&src),
    );
    assert!(out.contains("\"blobs\":1"), "{out}");
    let m = fs::read_to_string(&man).unwrap();
    assert_eq!(m.lines().count(), 1);
    assert!(m.contains("tab\\tand\\nnewline"), "{m}");
}
