//! An arbitrary byte string decoded as a store index record.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blobfs_fuzz::store_record(data));
