//! Arbitrary mount(8) helper argument vectors (NUL-separated, any bytes) parsed and planned:
//! usage errors are fine, a panic is a bug, and an accepted plan is internally consistent.
#![no_main]

use rustix::mount::MountAttrFlags;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use subdir_mount::request::{parse_helper_args, plan};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let args: Vec<OsString> = data
        .split(|&b| b == 0)
        .map(|a| OsString::from_vec(a.to_vec()))
        .collect();
    let Ok((req, _verbose)) = parse_helper_args(&args) else {
        return;
    };
    let Ok(p) = plan(&req) else {
        return;
    };
    assert!(!p.subdir_rel.is_empty() && !p.subdir_rel.starts_with('/'));
    assert!(!p.subdir.contains('\0'));
    assert!(
        p.subdir_rel.split('/').any(|c| !c.is_empty() && c != "."),
        "plan for the top level: {:?}",
        p.subdir
    );
    assert_eq!(
        p.read_only,
        p.attrs.contains(MountAttrFlags::MOUNT_ATTR_RDONLY)
    );
    if p.many_to_one.is_some() {
        assert!(p.fuse, "many-to-one map without FUSE");
    }
});
