//! An arbitrary `--map-file` text: parsed, and every accepted map classified and looked up
//! both ways.
#![no_main]

use fuse_passthrough::idmap::parse_map_file;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match parse_map_file(&text) {
        Ok((uids, gids)) => {
            checks::check_ranges("uid", &uids);
            checks::check_ranges("gid", &gids);
        }
        Err(e) => assert!(e.starts_with("line "), "{e}"),
    }
});

#[path = "../src/checks.rs"]
mod checks;
