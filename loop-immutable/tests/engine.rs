//! Property tests of the overlay engine against an in-memory model, and the guarantee that the
//! image is never modified (content hash, mtime, ctime).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use loop_immutable::audit::{self, AuditLog};
use loop_immutable::image::{Image, sha256_file};
use loop_immutable::overlay::{self, Engine, OverlayKind};
use proptest::prelude::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

#[derive(Debug, Clone)]
enum Op {
    Read { off: u64, len: usize },
    Write { off: u64, len: usize, seed: u8 },
    Flush,
}

const SIZE: u64 = 300_000;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..SIZE + 100, 0usize..70_000).prop_map(|(off, len)| Op::Read { off, len }),
        (0..SIZE, 1usize..70_000, any::<u8>()).prop_map(|(off, len, seed)| Op::Write {
            off,
            len,
            seed
        }),
        Just(Op::Flush),
    ]
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8).wrapping_mul(31))
        .collect()
}

fn stamp(p: &Path) -> (String, i64, i64, i64, i64) {
    let m = std::fs::metadata(p).unwrap();
    (
        sha256_file(p).unwrap(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    )
}

/// Apply `ops` to an engine and to a Vec model; every read must agree, the image must not
/// change. Returns the engine's final extent count for the caller's checks.
fn run_model(kind: &OverlayKind, dir: &Path, ops: &[Op]) -> Result<(), TestCaseError> {
    let img_path = dir.join("image");
    std::fs::write(&img_path, pattern(7, SIZE as usize)).unwrap();
    let before = stamp(&img_path);
    let mut model = pattern(7, SIZE as usize);
    let log_path = dir.join("audit.jsonl");
    let mut writes = 0u64;
    {
        let image = Image::open(&img_path).unwrap();
        let sha = image.sha256().unwrap();
        let mut audit = AuditLog::open(&log_path).unwrap();
        audit
            .append(
                "attach",
                serde_json::json!({"image": "image", "sha256": sha}),
            )
            .unwrap();
        let engine = Engine::new(image, kind, &sha, Some(audit)).unwrap();
        for op in ops {
            match *op {
                Op::Read { off, len } => {
                    let mut buf = vec![0xAAu8; len];
                    engine.read_at(&mut buf, off).unwrap();
                    let mut want = vec![0u8; len];
                    let lo = (off.min(SIZE)) as usize;
                    let hi = (off + len as u64).min(SIZE) as usize;
                    want[..hi - lo].copy_from_slice(&model[lo..hi]);
                    prop_assert!(buf == want, "read {off}+{len} differs");
                }
                Op::Write { off, len, seed } => {
                    let data = pattern(seed, len);
                    let r = engine.write_at(&data, off);
                    match kind {
                        OverlayKind::None => {
                            prop_assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EROFS));
                        }
                        _ if off + len as u64 > SIZE => {
                            prop_assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ENOSPC));
                        }
                        _ => {
                            r.unwrap();
                            writes += 1;
                            model[off as usize..off as usize + len].copy_from_slice(&data);
                        }
                    }
                }
                Op::Flush => engine.flush().unwrap(),
            }
        }
        engine.close().unwrap();
    }
    prop_assert_eq!(stamp(&img_path), before.clone(), "the image changed");
    let report = audit::verify(&log_path).unwrap();
    prop_assert_eq!(report.entries, writes + 1);
    prop_assert_eq!(report.sessions[0].writes, writes);
    if let OverlayKind::File(p) = kind {
        // Reopening resumes the overlay: the merged view survives a restart.
        let image = Image::open(&img_path).unwrap();
        let sha = image.sha256().unwrap();
        let engine = Engine::new(image, kind, &sha, None).unwrap();
        let mut all = vec![0u8; SIZE as usize];
        engine.read_at(&mut all, 0).unwrap();
        prop_assert!(all == model, "merged view differs after reopening");
        // export writes exactly the model.
        let out = dir.join("export");
        let _ = std::fs::remove_file(&out);
        overlay::export(engine.image(), p, &out).unwrap();
        prop_assert!(std::fs::read(&out).unwrap() == model);
        prop_assert_eq!(stamp(&img_path), before, "the image changed");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn memory_overlay_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        run_model(&OverlayKind::Memory, dir.path(), &ops)?;
    }

    #[test]
    fn file_overlay_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let cow = dir.path().join("cow");
        run_model(&OverlayKind::File(cow), dir.path(), &ops)?;
    }

    #[test]
    fn no_overlay_is_read_only(ops in proptest::collection::vec(op(), 1..20)) {
        let dir = tempfile::tempdir().unwrap();
        run_model(&OverlayKind::None, dir.path(), &ops)?;
    }
}

#[test]
fn overlay_refuses_the_image_itself_and_foreign_images() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("image");
    std::fs::write(&img, pattern(1, 8192)).unwrap();
    // Linking changes the image's ctime: do it before taking the stamp.
    let link = dir.path().join("link");
    std::fs::hard_link(&img, &link).unwrap();
    let before = stamp(&img);
    let image = Image::open(&img).unwrap();
    let sha = image.sha256().unwrap();
    let e = Engine::new(image, &OverlayKind::File(img.clone()), &sha, None).unwrap_err();
    assert!(e.to_string().contains("exists and is not"), "{e}");
    // A hard link to the image is the image.
    std::fs::write(overlay::map_path(&link), "").unwrap();
    let image = Image::open(&img).unwrap();
    assert!(Engine::new(image, &OverlayKind::File(link.clone()), &sha, None).is_err());
    assert_eq!(stamp(&img), before);
    // An overlay made for another image is refused.
    let cow = dir.path().join("cow");
    let image = Image::open(&img).unwrap();
    let e = Engine::new(image, &OverlayKind::File(cow.clone()), &sha, None).unwrap();
    e.write_at(b"x", 0).unwrap();
    e.close().unwrap();
    drop(e);
    let other = dir.path().join("other");
    std::fs::write(&other, pattern(2, 8192)).unwrap();
    let image = Image::open(&other).unwrap();
    let sha2 = image.sha256().unwrap();
    let e = Engine::new(image, &OverlayKind::File(cow), &sha2, None).unwrap_err();
    assert!(e.to_string().contains("belongs to another image"), "{e}");
    // The audit log cannot be the image either: it would be appended to.
    assert_eq!(stamp(&img), before);
}

#[test]
fn torn_map_record_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("image");
    std::fs::write(&img, pattern(1, 8192)).unwrap();
    let cow = dir.path().join("cow");
    let image = Image::open(&img).unwrap();
    let sha = image.sha256().unwrap();
    let e = Engine::new(image, &OverlayKind::File(cow.clone()), &sha, None).unwrap();
    e.write_at(b"hello", 100).unwrap();
    drop(e); // no clean close: the map is the raw log
    let mp = overlay::map_path(&cow);
    let mut text = std::fs::read_to_string(&mp).unwrap();
    text.push_str("w 20");
    std::fs::write(&mp, text).unwrap();
    let m = overlay::read_map(&cow).unwrap();
    assert!(m.torn_tail);
    assert_eq!(m.extents.iter().collect::<Vec<_>>(), vec![(100, 105)]);
}
