//! An arbitrary audit log checked with `audit::verify_bytes`: a verdict or an error, never a
//! panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = loop_immutable::audit::verify_bytes(data) {
        assert!(!e.is_empty());
    }
});
