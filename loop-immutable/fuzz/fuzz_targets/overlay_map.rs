//! An arbitrary `FILE.map` (overlay extent log) read back with `overlay::read_map`: errors are
//! fine; an accepted map holds sorted, disjoint, merged extents inside the image, covering
//! exactly the bytes its records name.
#![no_main]

use loop_immutable::overlay::{map_path, read_map};
use std::path::PathBuf;
use std::sync::OnceLock;

fn data_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        // scripts/fuzz points TMPDIR at a directory it removes afterwards.
        let dir = std::env::temp_dir();
        dir.join(format!("loop-immutable-fuzz.{}", std::process::id()))
    })
}

/// The records of an accepted map, parsed naively (every line but a torn last one is valid).
fn records(data: &[u8]) -> Vec<(u64, u64)> {
    let text = String::from_utf8_lossy(data);
    text.split('\n')
        .skip(1)
        .filter_map(|l| {
            let mut it = l.split(' ');
            match (it.next(), it.next(), it.next(), it.next()) {
                (Some("w"), Some(a), Some(b), None) => Some((a.parse().ok()?, b.parse().ok()?)),
                _ => None,
            }
        })
        .collect()
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = data_path();
    std::fs::write(map_path(path), data).expect("write map");
    let Ok(map) = read_map(path) else {
        return;
    };
    let size = map.header.image_size;
    let mut prev_end = None;
    let mut total = 0u64;
    for (a, b) in map.extents.iter() {
        assert!(a < b && b <= size, "extent {a}..{b} outside 0..{size}");
        if let Some(p) = prev_end {
            assert!(a > p, "extents not merged or not sorted");
        }
        prev_end = Some(b);
        total += b - a;
    }
    assert_eq!(map.extents.bytes(), total);
    // Coverage against a bitmap model for small images.
    if size <= 1 << 14 {
        let mut model = vec![false; size as usize];
        for (a, b) in records(data) {
            if a < b && b <= size {
                model[a as usize..b as usize].fill(true);
            }
        }
        let mut got = vec![false; size as usize];
        for (a, b) in map.extents.iter() {
            got[a as usize..b as usize].fill(true);
        }
        assert!(got == model, "extents differ from the records");
    }
});
