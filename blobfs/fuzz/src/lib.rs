//! The blobfs reader, compiled from its own source files, and the fuzz harnesses over it.
//!
//! The modules below are the very files of `blobfs/src` (same paths relative to the crate
//! root, so their `crate::` imports resolve unchanged).

#![allow(dead_code, unused_imports)]

#[path = "../../src/format.rs"]
pub mod format;
#[path = "../../src/image.rs"]
pub mod image;
#[path = "../../src/merkle.rs"]
pub mod merkle;
#[path = "../../src/sign.rs"]
pub mod sign;
#[path = "../../src/verify.rs"]
pub mod verify;
#[path = "../../src/writer.rs"]
pub mod writer;

#[path = "../../src/store/record.rs"]
pub mod store_record;

use ed25519_dalek::SigningKey;
use format::{HEADER_SIZE, SIGNATURE_BLOCK_OFFSET};
use image::{Image, OpenOptions};
use merkle::{BLOCK_SIZE, MerkleTree, TreeGeometry};
use sha2::{Digest as _, Sha256};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::OnceLock;
use verify::ReadError;

/// The key the harness signs with (mode bit 4) and requires (mode bit 3).
fn harness_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::from_bytes(&[7; 32]))
}

/// Where each input is written before it is opened (the reader takes a path, like the daemon).
fn scratch_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        // scripts/fuzz points TMPDIR at a directory it removes afterwards.
        let dir = std::env::temp_dir();
        dir.join(format!("blobfs-fuzz.{}", std::process::id()))
    })
}

fn le_u64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Mode byte bits: which checksums the harness repairs after the fuzzer's mutation, so that
/// mutations reach the checks behind them instead of all dying at the first hash.
/// Header bytes covered by the header checksum (the checksum is the last 32).
const HEADER_HASHED: usize = HEADER_SIZE - 32;

const FIX_INDEX_HASH: u8 = 1;
const FIX_HEADER_SUM: u8 = 2;
const REQUIRE_KEY: u8 = 4;
const SIGN: u8 = 8;

/// Repair what the mode byte asks for (in the order a writer computes them).
pub fn fix_up(mode: u8, img: &mut [u8]) {
    if img.len() < HEADER_SIZE {
        return;
    }
    if mode & FIX_INDEX_HASH != 0
        && let (Some(off), Some(size)) = (le_u64(img, 64), le_u64(img, 72))
        && let Some(end) = off.checked_add(size)
        && end <= img.len() as u64
    {
        let sum: [u8; 32] = Sha256::digest(&img[off as usize..end as usize]).into();
        img[112..144].copy_from_slice(&sum);
    }
    if mode & FIX_HEADER_SUM != 0 {
        let sum: [u8; 32] = Sha256::digest(&img[..HEADER_HASHED]).into();
        img[HEADER_HASHED..HEADER_SIZE].copy_from_slice(&sum);
    }
    let sig_slot = SIGNATURE_BLOCK_OFFSET as usize + 16;
    if mode & SIGN != 0 && img.len() >= sig_slot + 96 {
        let header: [u8; HEADER_SIZE] = img[..HEADER_SIZE].try_into().expect("header bytes");
        let slot = sign::sign_header(harness_key(), &header);
        img[sig_slot..sig_slot + 32].copy_from_slice(&slot.key_id);
        img[sig_slot + 32..sig_slot + 96].copy_from_slice(&slot.signature);
    }
}

/// Open `data` (a mode byte, then image bytes) as an image and read every blob. Errors are
/// fine; a panic, a hang, a huge allocation, or bytes that do not hash to the blob's name are
/// bugs.
pub fn open_and_read(data: &[u8]) {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let mut img = bytes.to_vec();
    fix_up(mode, &mut img);
    let path = scratch_path();
    {
        let mut f = std::fs::File::create(path).expect("scratch file");
        f.write_all(&img).expect("write scratch file");
    }
    let opts = OpenOptions {
        keys: if mode & REQUIRE_KEY != 0 {
            vec![harness_key().verifying_key()]
        } else {
            Vec::new()
        },
        min_epoch: 0,
        // Small, so that eviction is exercised too.
        tree_cache_bytes: Some(16 * BLOCK_SIZE),
        data_source: None,
    };
    let image = match Image::open(path, &opts) {
        Ok(image) => image,
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.is_empty());
            return;
        }
    };
    let n = image.entries().len();
    for i in 0..n {
        let e = image.entries()[i].clone();
        assert_eq!(image.find(&e.digest), Some(i), "binary search disagrees");
        let whole = image.read_verified(i, 0, e.size as usize);
        let all = image.verify_blob(i);
        match &whole {
            Ok(bytes) => {
                assert_eq!(bytes.len() as u64, e.size, "short verified read");
                assert_eq!(
                    MerkleTree::from_bytes(bytes).digest(),
                    e.digest,
                    "verified bytes do not hash to the blob's name"
                );
                // An empty blob has no block to check, so only verify_blob judges its name.
                // A whole read of a blob with a one-block tree is checked against the digest
                // without the stored tree, so only verify_blob sees a damaged tree there.
                if e.size > 0 {
                    if let Err(err) = &all {
                        let one_block_tree = TreeGeometry::new(e.size).levels() == 1;
                        assert!(
                            one_block_tree
                                && matches!(
                                    err,
                                    ReadError::Corrupt {
                                        what: "Merkle tree",
                                        ..
                                    }
                                ),
                            "read verified but verify_blob failed: {err}"
                        );
                    }
                }
            }
            Err(err) => {
                assert!(!err.to_string().is_empty());
                assert!(all.is_err(), "read failed but verify_blob passed");
            }
        }
        // Partial reads at odd offsets return a slice of the same bytes.
        for (off, len) in [
            (1u64, 4095usize),
            (4095, 2),
            (e.size / 2, 5000),
            (e.size, 1),
        ] {
            if let (Ok(part), Ok(bytes)) = (image.read_verified(i, off, len), &whole) {
                let start = (off.min(e.size)) as usize;
                let end = (off.saturating_add(len as u64).min(e.size)) as usize;
                assert_eq!(&part[..], &bytes[start..end], "partial read differs");
            }
        }
    }
    drop(image);
}

/// Decode an index record; whatever decodes re-encodes to the same bytes.
pub fn store_record(data: &[u8]) {
    use store_record::Record;
    if let Ok(r) = Record::decode(data) {
        assert_eq!(&r.encode()[..], data, "record does not round-trip");
    }
}

/// Seed inputs for the `image` target: small real images (a mode byte, then the image) in the
/// shapes the format has: no blobs; empty, partial-block, one-block and two-block blobs;
/// unsigned with every checksum repair off, and signed by the harness key with it required.
pub fn seed_images() -> Vec<(String, Vec<u8>)> {
    use std::sync::atomic::AtomicBool;
    use writer::{Content, ImageSettings, PreparedBlob};
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut out = Vec::new();
    let sets: [(&str, &[usize], bool); 4] = [
        ("empty", &[], false),
        ("one-byte", &[1], false),
        ("shapes", &[0, 1, 4096, 4097], false),
        ("signed", &[0, 100, 8192 + 5], true),
    ];
    for (name, sizes, signed) in sets {
        let blobs = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let data: Vec<u8> = (0..n).map(|k| (k * 31 + i * 7) as u8).collect();
                PreparedBlob {
                    tree: MerkleTree::from_bytes(&data),
                    content: Content::Memory(data),
                }
            })
            .collect();
        let keys = [harness_key().clone()];
        let settings = ImageSettings {
            epoch: 1,
            keys: if signed { &keys } else { &[] },
            fsync: false,
        };
        let path = dir.path().join(name);
        writer::write_image(&path, blobs, &settings, &|_| {}, &AtomicBool::new(false))
            .expect("write seed image");
        let img = std::fs::read(&path).expect("read seed image");
        let modes: &[u8] = if signed {
            &[
                REQUIRE_KEY,
                REQUIRE_KEY | SIGN | FIX_HEADER_SUM | FIX_INDEX_HASH,
            ]
        } else {
            &[0, FIX_HEADER_SUM | FIX_INDEX_HASH]
        };
        for &mode in modes {
            let mut input = vec![mode];
            input.extend_from_slice(&img);
            out.push((format!("{name}-mode{mode}"), input));
        }
    }
    out
}
