//! An arbitrary byte string (after a mode byte) opened as a blobfs image, every blob read.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blobfs_fuzz::open_and_read(data));
