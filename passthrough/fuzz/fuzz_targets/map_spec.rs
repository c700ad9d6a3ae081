//! Arbitrary `--uid-map DISK:VIEW:COUNT` arguments (one per line): parsed, classified, and
//! when accepted, looked up both ways.
#![no_main]

use fuse_passthrough::idmap::IdRange;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut ranges = Vec::new();
    for arg in text.lines() {
        if let Ok(r) = arg.parse::<IdRange>() {
            assert_eq!(
                r.to_string().parse::<IdRange>(),
                Ok(r),
                "display round trip"
            );
            ranges.push(r);
        }
    }
    checks::check_ranges("uid", &ranges);
});

#[path = "../src/checks.rs"]
mod checks;
