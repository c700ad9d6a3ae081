//! An arbitrary option string split with `options::parse`: no panic, and re-escaping what it
//! returns gives back the same options.
#![no_main]

use cli_common::options::{self, MountOpt};

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace(',', "\\,")
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let opts = options::parse(&text);
    for o in &opts {
        assert!(!o.key.is_empty() || o.value.is_some(), "empty item kept");
        assert!(!o.key.contains('='), "key holds '=': {o:?}");
        let _ = options::is_fstab_only(&o.key) || options::is_vfs_flag(&o.key);
    }
    let joined = opts
        .iter()
        .map(|MountOpt { key, value }| match value {
            Some(v) => format!("{}={}", escape(key), escape(v)),
            None => escape(key),
        })
        .collect::<Vec<_>>()
        .join(",");
    assert_eq!(
        options::parse(&joined),
        opts,
        "does not round-trip via {joined:?}"
    );
});
