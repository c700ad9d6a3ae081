//! Tamper and truncation sweeps over a blob store: bits flipped in every object file and in
//! every stored Merkle tree (kept in the RocksDB index) at many offsets, object files truncated and extended. After each change the
//! store is opened afresh (an open store keeps verified tree blocks in memory, where a change
//! of the file cannot reach them), every blob is read back and `Store::verify` runs. What must hold: no panic, a read that succeeds
//! returns exactly the original content, a changed blob fails its reads (and only that blob),
//! and `verify` names it.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use blobfs::store::Store;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    /// digest -> content
    blobs: BTreeMap<[u8; 32], Vec<u8>>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    Store::init(&root).unwrap();
    let store = Store::open(&root).unwrap();
    let mut blobs = BTreeMap::new();
    for (i, size) in [1usize, 4095, 4097, 100_000, 128 * 4096 + 1]
        .into_iter()
        .enumerate()
    {
        let data = bytes(i as u64 + 1, size);
        let src = dir.path().join(format!("src{i}"));
        fs::write(&src, &data).unwrap();
        let digest = match store.put_file(&src).unwrap() {
            blobfs::store::Added::New(d) => d,
            other => panic!("{other:?}"),
        };
        blobs.insert(digest, data);
    }
    drop(store);
    Fixture {
        _dir: dir,
        root,
        blobs,
    }
}

impl Fixture {
    /// Read every blob; returns the digests whose reads failed.
    fn store(&self) -> Store {
        Store::open(&self.root).unwrap()
    }

    fn read_all(&self, what: &str) -> Vec<[u8; 32]> {
        let store = self.store();
        let mut failed = Vec::new();
        for (digest, want) in &self.blobs {
            let rec = store.get(digest).unwrap().unwrap();
            assert_eq!(rec.size, want.len() as u64, "{what}");
            let files = match store.open_blob(digest, rec.size) {
                Ok(f) => f,
                Err(_) => {
                    failed.push(*digest);
                    continue;
                }
            };
            // The whole blob at once (a small blob is then checked against its digest alone)
            // and block by block (through the stored tree).
            let mut ok = match store.read_verified(digest, rec.size, &files, 0, want.len()) {
                Ok(got) => {
                    assert!(got == *want, "{what}: wrong bytes");
                    true
                }
                Err(_) => false,
            };
            for (i, chunk) in want.chunks(4096).enumerate() {
                match store.read_verified(digest, rec.size, &files, i as u64 * 4096, 4096) {
                    Ok(got) => assert!(got == chunk, "{what}: wrong bytes in block {i}"),
                    Err(_) => ok = false,
                }
            }
            if !ok {
                failed.push(*digest);
            }
        }
        failed
    }

    /// The problems `verify` reports, which must all name `digest`.
    fn verify_names(&self, digest: &[u8; 32], what: &str) {
        let problems = self.store().verify().unwrap();
        assert!(!problems.is_empty(), "{what}: verify found nothing");
        let name = hex::encode(digest);
        for p in &problems {
            assert!(p.contains(&name), "{what}: {p}");
        }
    }
}

/// Flip one bit of a blob's stored tree, in the store's index (the store must be closed).
fn flip_tree(root: &Path, digest: &[u8; 32], pos: u64, bit: u8) {
    let db =
        rocksdb::DB::open_cf(&rocksdb::Options::default(), root.join("index"), ["trees"]).unwrap();
    let cf = db.cf_handle("trees").unwrap();
    let mut key = digest.to_vec();
    key.extend_from_slice(&(pos / 4096).to_be_bytes());
    let mut block = db.get_cf(cf, &key).unwrap().unwrap();
    block[(pos % 4096) as usize] ^= 1 << bit;
    db.put_cf(cf, &key, &block).unwrap();
}

fn tree_len(size: u64) -> u64 {
    blobfs::merkle::TreeGeometry::new(size).tree_bytes()
}

fn flip(path: &Path, pos: u64, bit: u8) {
    let f = File::options().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, pos).unwrap();
    b[0] ^= 1 << bit;
    f.write_all_at(&b, pos).unwrap();
}

#[test]
fn flipped_bits_in_object_files_and_trees_fail_exactly_that_blob() {
    let f = fixture();
    let mut flips = 0;
    let digests: Vec<[u8; 32]> = f.blobs.keys().copied().collect();
    for digest in &digests {
        let size = f.blobs[digest].len() as u64;
        let data = f.store().data_path(digest);
        let tree = tree_len(size);
        // false: the object file; true: the stored tree.
        for (in_tree, len, stride) in [(false, size, 1 + size / 97), (true, tree, 1 + tree / 61)] {
            let mut pos = 0;
            while pos < len {
                let bit = (pos % 8) as u8;
                let what = if in_tree {
                    format!("tree of {}: bit {bit} of byte {pos}", hex::encode(digest))
                } else {
                    format!("{}: bit {bit} of byte {pos}", data.display())
                };
                let toggle = || match in_tree {
                    true => flip_tree(&f.root, digest, pos, bit),
                    false => flip(&data, pos, bit),
                };
                toggle();
                flips += 1;
                assert_eq!(f.read_all(&what), vec![*digest], "{what}");
                f.verify_names(digest, &what);
                toggle();
                pos += stride;
            }
        }
    }
    assert!(f.read_all("restored").is_empty());
    assert!(f.store().verify().unwrap().is_empty());
    eprintln!("store tamper sweep: {flips} single-bit flips");
    assert!(flips > 300, "{flips}");
}

#[test]
fn truncated_or_extended_object_files_are_reported_and_never_read_as_other_bytes() {
    let f = fixture();
    let digests: Vec<[u8; 32]> = f.blobs.keys().copied().collect();
    for digest in &digests {
        let orig = f.blobs[digest].clone();
        let data = f.store().data_path(digest);
        let len = orig.len() as u64;
        for cut in [0, 1, len / 2, len - 1] {
            if cut >= len {
                continue;
            }
            let what = format!("{} cut to {cut}", data.display());
            File::options()
                .write(true)
                .open(&data)
                .unwrap()
                .set_len(cut)
                .unwrap();
            assert_eq!(f.read_all(&what), vec![*digest], "{what}");
            f.verify_names(digest, &what);
            fs::write(&data, &orig).unwrap();
        }
        // Bytes past the recorded size are never served; verify reports the length.
        let mut longer = orig.clone();
        longer.extend_from_slice(b"appended");
        fs::write(&data, &longer).unwrap();
        assert!(f.read_all("extended").is_empty());
        f.verify_names(digest, "extended");
        fs::write(&data, &orig).unwrap();
        // A missing object file.
        fs::remove_file(&data).unwrap();
        assert_eq!(f.read_all("removed"), vec![*digest]);
        f.verify_names(digest, "removed");
        fs::write(&data, &orig).unwrap();
    }
    assert!(f.store().verify().unwrap().is_empty());
}
