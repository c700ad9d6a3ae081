//! Tamper and truncation sweeps over a signed image: bits flipped in every region (header,
//! signature block, index, Merkle trees, blob data) at many offsets, truncations at every block
//! boundary and at random lengths, bytes appended, random multi-byte damage. After each change
//! the image is opened (with and without the signing key) and every blob read back.
//!
//! What must hold every time: no panic; a read that succeeds returns exactly the original
//! content; a change in an authenticated byte is detected (the open fails, or a read of the
//! blob that owns the byte fails), with the error that names what is wrong: the header, the
//! signature, the index hash, or the blob and block that failed verification.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use blobfs::format::{Entry, HEADER_SIZE, INDEX_OFFSET, SIGNATURE_BLOCK_OFFSET};
use blobfs::image::{Image, ImageError, OpenOptions, ReadError};
use blobfs::merkle::{BLOCK_SIZE, MerkleTree};
use blobfs::writer::{Content, ImageSettings, PreparedBlob, write_image};
use ed25519_dalek::SigningKey;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

const BS: u64 = BLOCK_SIZE as u64;

/// Deterministic xorshift, so a failure names a reproducible mutation.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    orig: Vec<u8>,
    key: SigningKey,
    /// digest -> content
    blobs: BTreeMap<[u8; 32], Vec<u8>>,
    entries: Vec<Entry>,
    tree_region: (u64, u64),
    data_region: (u64, u64),
    index_size: u64,
}

/// Blobs of the sizes where the format changes shape: empty, one partial block, exactly one
/// block (no tree), two blocks (one tree block), and more than 128 blocks (two tree levels).
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let key = SigningKey::from_bytes(&[42; 32]);
    let mut rng = Rng(0x5eed);
    let sizes = [0usize, 1, 4095, 4096, 4097, 100_000, 128 * 4096 + 1];
    let mut blobs = BTreeMap::new();
    let mut prepared = Vec::new();
    for size in sizes {
        let data = rng.bytes(size);
        let tree = MerkleTree::from_bytes(&data);
        blobs.insert(tree.digest(), data.clone());
        prepared.push(PreparedBlob {
            tree,
            content: Content::Memory(data),
        });
    }
    let settings = ImageSettings {
        epoch: 3,
        keys: std::slice::from_ref(&key),
        fsync: false,
    };
    write_image(&path, prepared, &settings, &|_| {}, &AtomicBool::new(false)).unwrap();
    let orig = fs::read(&path).unwrap();
    let image = Image::open(&path, &OpenOptions::default()).unwrap();
    let h = image.header().clone();
    Fixture {
        entries: image.entries().to_vec(),
        tree_region: (h.tree_offset, h.tree_offset + h.tree_size),
        data_region: (h.data_offset, h.data_offset + h.data_size),
        index_size: h.index_size,
        _dir: dir,
        path,
        orig,
        key,
        blobs,
    }
}

/// How one opened image behaved over a full read of every blob.
#[derive(Debug, Default)]
struct Reads {
    /// (blob digest, error) for every blob whose read failed.
    failed: Vec<([u8; 32], ReadError)>,
}

impl Fixture {
    fn opts(&self, with_key: bool) -> OpenOptions {
        OpenOptions {
            keys: if with_key {
                vec![self.key.verifying_key()]
            } else {
                Vec::new()
            },
            min_epoch: 0,
            tree_cache_bytes: Some(8 * BLOCK_SIZE),
            data_source: None,
        }
    }

    /// Read every blob whole and in two odd pieces; any byte returned must be the original.
    fn read_all(&self, image: &Image, what: &str) -> Reads {
        let mut reads = Reads::default();
        assert_eq!(image.entries().len(), self.blobs.len(), "{what}");
        for (i, e) in image.entries().iter().enumerate() {
            let want = &self.blobs[&e.digest];
            assert_eq!(
                e.size,
                want.len() as u64,
                "{what}: size of a verified entry"
            );
            match image.read_verified(i, 0, want.len() + 1) {
                Ok(got) => {
                    assert!(got == *want, "{what}: wrong bytes from a whole read");
                    // A whole small blob is checked against its digest without its stored
                    // tree, so a damaged tree can leave this read intact; verify_blob, which
                    // checks the stored tree too, must then report it.
                    if let Err(err) = image.verify_blob(i) {
                        reads.failed.push((e.digest, err));
                    }
                }
                Err(err) => {
                    assert!(image.verify_blob(i).is_err(), "{what}");
                    reads.failed.push((e.digest, err));
                }
            }
            let mid = want.len() as u64 / 2;
            if let Ok(got) = image.read_verified(i, mid.saturating_sub(3), 4099) {
                let s = mid.saturating_sub(3) as usize;
                assert!(
                    got[..] == want[s..(s + 4099).min(want.len())],
                    "{what}: wrong bytes from a partial read"
                );
            }
        }
        reads
    }

    /// The blob and block a byte of the tree or data region belongs to.
    fn owner(&self, pos: u64) -> Option<(&Entry, &'static str, u64)> {
        self.entries.iter().find_map(|e| {
            let data_len = e.stored_data_len();
            let tree_len = blobfs::merkle::TreeGeometry::new(e.size).tree_bytes();
            if data_len > 0 && (e.data_offset..e.data_offset + data_len).contains(&pos) {
                return Some((e, "data", (pos - e.data_offset) / BS));
            }
            if tree_len > 0 && (e.tree_offset..e.tree_offset + tree_len).contains(&pos) {
                return Some((e, "Merkle tree", (pos - e.tree_offset) / BS));
            }
            None
        })
    }
}

/// Tally per region, printed at the end (`cargo test -- --nocapture` shows it).
#[derive(Default, Debug)]
struct Tally {
    mutations: u64,
    refused_at_open: u64,
    failed_reads: u64,
    harmless: u64,
}

fn write_at(path: &Path, pos: u64, bytes: &[u8]) {
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(bytes, pos)
        .unwrap();
}

#[test]
fn every_flipped_bit_is_refused_or_detected_and_never_returns_wrong_bytes() {
    let f = fixture();
    let hdr_end = HEADER_SIZE as u64;
    let sig = SIGNATURE_BLOCK_OFFSET;
    let index_end = INDEX_OFFSET + f.index_size;
    let regions: [(&str, u64, u64, u64); 8] = [
        // (name, start, end, stride): every byte of the small authenticated regions.
        ("header", 0, hdr_end, 1),
        ("header padding", hdr_end, BS, 61),
        ("signature block", sig, sig + BS, 7),
        ("index", INDEX_OFFSET, index_end, 1),
        ("index padding", index_end, f.tree_region.0, 59),
        ("trees", f.tree_region.0, f.tree_region.1, 13),
        ("data", f.data_region.0, f.data_region.1, 397),
        // The zero tail of the last block of the 4097-byte blob (hashed like any data).
        ("data padding", 0, 0, 0),
    ];
    let padding = {
        let e = f.entries.iter().find(|e| e.size == 4097).unwrap();
        (e.data_offset + 4097, e.data_offset + 2 * BS)
    };
    // One image opened before any change: it reads the file again for every block it serves,
    // so changes made underneath it must be caught too.
    let early = Image::open(&f.path, &f.opts(true)).unwrap();
    let mut tallies: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut rng = Rng(7);
    for (name, start, end, stride) in regions {
        let (start, end, stride) = if name == "data padding" {
            (padding.0, padding.1, 37)
        } else {
            (start, end, stride)
        };
        let tally = tallies.entry(name).or_default();
        let mut pos = start;
        while pos < end {
            let bit = rng.below(8) as u8;
            let what = format!("{name}: bit {bit} of byte {pos}");
            let orig = f.orig[pos as usize];
            write_at(&f.path, pos, &[orig ^ (1 << bit)]);
            tally.mutations += 1;
            let mut detected = false;
            for with_key in [true, false] {
                let opened = Image::open(&f.path, &f.opts(with_key));
                let image = match opened {
                    Ok(image) => image,
                    Err(e) => {
                        check_open_error(name, with_key, &e, &what);
                        if with_key {
                            tally.refused_at_open += 1;
                        }
                        detected = true;
                        continue;
                    }
                };
                let reads = f.read_all(&image, &what);
                if with_key && !reads.failed.is_empty() {
                    tally.failed_reads += 1;
                }
                detected |= !reads.failed.is_empty();
                check_read_errors(&f, name, pos, &reads, &what);
            }
            let early_reads = f.read_all(&early, &format!("{what} (opened before)"));
            if matches!(name, "trees" | "data" | "data padding") {
                check_read_errors(&f, name, pos, &early_reads, &what);
            }
            match name {
                // Bytes nothing reads: changing them must not matter at all.
                "header padding" | "index padding" => {
                    assert!(!detected, "{what}: unread byte made a difference");
                    tally.harmless += 1;
                }
                // Not authenticated by design (signatures can be added to a signed image): a
                // change can only make the required signature fail, checked above.
                "signature block" => tally.harmless += u64::from(!detected),
                _ => assert!(detected, "{what}: change went unnoticed"),
            }
            write_at(&f.path, pos, &[orig]);
            pos += stride;
        }
    }
    let total: u64 = tallies.values().map(|t| t.mutations).sum();
    eprintln!("tamper sweep: {total} single-bit flips");
    for (name, t) in &tallies {
        eprintln!("  {name:16} {t:?}");
    }
    assert!(total > 2000, "{total}");
    assert!(f.read_all(&early, "restored").failed.is_empty());
}

/// The open error must name the region that was changed.
fn check_open_error(region: &str, with_key: bool, e: &ImageError, what: &str) {
    let msg = e.to_string();
    let ok = match region {
        "header" => matches!(e, ImageError::Header { .. } | ImageError::Truncated { .. }),
        "signature block" => {
            matches!(e, ImageError::SignatureBlock { .. })
                || with_key
                    && matches!(
                        e,
                        ImageError::BadSignature { .. } | ImageError::Unsigned { .. }
                    )
        }
        "index" => matches!(e, ImageError::IndexHash { .. }),
        _ => false,
    };
    assert!(ok, "{what}: unexpected open error: {msg}");
    assert!(
        msg.contains("img"),
        "{what}: message does not name the image: {msg}"
    );
}

/// Reads fail only for the blob that owns a changed tree or data byte, at the right block.
fn check_read_errors(f: &Fixture, region: &str, pos: u64, reads: &Reads, what: &str) {
    if reads.failed.is_empty() {
        return;
    }
    assert!(
        matches!(region, "trees" | "data" | "data padding"),
        "{what}: reads failed after a change outside the trees and data: {:?}",
        reads.failed
    );
    let (owner, kind, block) = f.owner(pos).expect("changed byte belongs to a blob");
    assert_eq!(reads.failed.len(), 1, "{what}: {:?}", reads.failed);
    let (digest, err) = &reads.failed[0];
    assert_eq!(*digest, owner.digest, "{what}: another blob failed");
    match err {
        ReadError::Corrupt {
            digest: d,
            what: w,
            block: b,
        } => {
            assert_eq!(*d, hex::encode(owner.digest), "{what}");
            if kind == "data" {
                assert_eq!((*w, *b), ("data", block), "{what}: {err}");
            } else {
                assert_eq!(*w, "Merkle tree", "{what}: {err}");
            }
        }
        ReadError::Io { .. } => panic!("{what}: I/O error instead of a verification error: {err}"),
    }
}

#[test]
fn truncated_images_are_refused_and_appended_bytes_ignored() {
    let f = fixture();
    let len = f.orig.len() as u64;
    let mut lengths: Vec<u64> = (0..=len / BS).map(|b| b * BS).collect();
    lengths.extend([1, 255, 256, 257, 4095, 4097, 8191, 8193, len - 1]);
    let mut rng = Rng(11);
    lengths.extend((0..200).map(|_| rng.below(len)));
    for &l in &lengths {
        if l >= len {
            continue;
        }
        fs::write(&f.path, &f.orig[..l as usize]).unwrap();
        for with_key in [true, false] {
            let e = Image::open(&f.path, &f.opts(with_key)).unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(e, ImageError::Truncated { actual, .. } if actual == l),
                "length {l}: {msg}"
            );
            assert!(msg.contains("truncated"), "{msg}");
        }
    }
    // An image may sit on a larger device: what follows image_size is never read.
    for extra in [1usize, 4096, 10_000] {
        let mut b = f.orig.clone();
        b.extend(rng.bytes(extra));
        fs::write(&f.path, &b).unwrap();
        let image = Image::open(&f.path, &f.opts(true)).unwrap();
        assert!(f.read_all(&image, "appended").failed.is_empty());
    }
    eprintln!("truncation sweep: {} lengths", lengths.len());
}

/// Truncation underneath an open image: reads of blocks now missing are I/O errors, never
/// short or zero-filled data.
#[test]
fn truncation_after_open_gives_errors_not_zeros() {
    let f = fixture();
    let image = Image::open(&f.path, &f.opts(true)).unwrap();
    let cut = f.data_region.0 + (f.data_region.1 - f.data_region.0) / 2;
    File::options()
        .write(true)
        .open(&f.path)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let reads = f.read_all(&image, "truncated after open");
    assert!(!reads.failed.is_empty());
    for (digest, err) in &reads.failed {
        let e = f.entries.iter().find(|e| e.digest == *digest).unwrap();
        assert!(e.data_offset + e.stored_data_len() > cut, "{err}");
    }
}

#[test]
fn random_multi_byte_damage_never_returns_wrong_bytes() {
    let f = fixture();
    let mut rng = Rng(99);
    let len = f.orig.len() as u64;
    let mut refused = 0;
    let mut failed = 0;
    let rounds = 300;
    for round in 0..rounds {
        let mut b = f.orig.clone();
        let n = 1 + rng.below(8);
        for _ in 0..n {
            // Half of the damage in the trees and data, where it survives the open.
            let pos = if rng.below(2) == 0 {
                f.tree_region.0 + rng.below(len - f.tree_region.0)
            } else {
                rng.below(len)
            };
            b[pos as usize] = rng.next() as u8;
        }
        fs::write(&f.path, &b).unwrap();
        for with_key in [true, false] {
            match Image::open(&f.path, &f.opts(with_key)) {
                Ok(image) => {
                    if !f
                        .read_all(&image, &format!("round {round}"))
                        .failed
                        .is_empty()
                    {
                        failed += 1;
                    }
                }
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    refused += 1;
                }
            }
        }
    }
    eprintln!(
        "random damage: {rounds} images, {refused} opens refused, {failed} with failed reads"
    );
    assert!(refused > 0 && failed > 0);
}

/// A consistent header whose index claims `blob_count` entries and nothing else.
fn huge_header(blob_count: u64) -> blobfs::format::Header {
    let index_size = blob_count * 64;
    // Padding the largest counts wraps around: the offsets a forger would write.
    let tree_offset = index_size
        .checked_next_multiple_of(BS)
        .map_or(INDEX_OFFSET, |n| INDEX_OFFSET.wrapping_add(n));
    blobfs::format::Header {
        version: blobfs::format::VERSION,
        block_size: BLOCK_SIZE as u32,
        blob_count,
        index_offset: INDEX_OFFSET,
        index_size,
        tree_offset,
        data_offset: tree_offset,
        image_size: tree_offset,
        ..Default::default()
    }
}

/// Headers claiming billions of blobs are refused before anything is allocated for them:
/// by the file length when the file is short, by the index limit when it is long enough
/// (a sparse file of more than 1 GiB).
#[test]
fn huge_counts_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge");
    let sig = blobfs::format::encode_signature_block(&[]);
    for (count, sparse_len) in [
        (1u64 << 40, 0u64),
        (u64::MAX / 64, 0),
        (((1u64 << 30) / 64) + 1, (1 << 30) + 4 * BS),
    ] {
        let h = huge_header(count);
        let f = File::create(&path).unwrap();
        f.write_all_at(&h.encode(), 0).unwrap();
        f.write_all_at(&sig, SIGNATURE_BLOCK_OFFSET).unwrap();
        if sparse_len > 0 {
            f.set_len(h.image_size.max(sparse_len)).unwrap();
        }
        drop(f);
        let e = Image::open(&path, &OpenOptions::default()).unwrap_err();
        let msg = e.to_string();
        if sparse_len > 0 {
            assert!(matches!(e, ImageError::IndexTooLarge { .. }), "{msg}");
        } else {
            assert!(
                matches!(e, ImageError::Truncated { .. } | ImageError::Header { .. }),
                "{count}: {msg}"
            );
        }
    }
}
