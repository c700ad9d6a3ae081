//! Ids stored inside extended attribute values: POSIX ACLs and v3 file capabilities carry uids
//! and gids of their own, which must be mapped like the owner of the file (the kernel does the
//! same for idmapped mounts). Every other attribute passes through unchanged.
//!
//! Both formats are the kernel's uapi ones, little-endian:
//! - `system.posix_acl_access` / `_default`: a `u32` version (2), then 8-byte entries
//!   `{u16 tag, u16 perm, u32 id}`; only `ACL_USER` (uid) and `ACL_GROUP` (gid) carry an id.
//! - `security.capability` revision 3 (`struct vfs_ns_cap_data`, 24 bytes): the last `u32` is
//!   the uid that is root in the namespace the capability is valid in. Revisions 1 and 2 carry
//!   no id.

use crate::IdMapper;
use fuser::Errno;
use std::borrow::Cow;

pub const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
pub const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";
pub const CAPABILITY: &[u8] = b"security.capability";

const ACL_VERSION: u32 = 2;
const ACL_USER: u16 = 0x02;
const ACL_GROUP: u16 = 0x08;
const VFS_CAP_REVISION_MASK: u32 = 0xff00_0000;
const VFS_CAP_REVISION_3: u32 = 0x0300_0000;
const VFS_CAP_V3_SIZE: usize = 24;

/// Which way a value travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Read from disk, shown to the caller.
    ToView,
    /// Set by the caller, stored on disk.
    ToDisk,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Map one id; an id the caller sets that has no disk id is EINVAL, as the kernel answers for
/// an ACL or capability naming an id outside the caller's user namespace.
fn map_id(map: &dyn IdMapper, id: u32, user: bool, dir: Direction) -> Result<u32, Errno> {
    match (dir, user) {
        (Direction::ToView, true) => Ok(map.uid_to_view(id)),
        (Direction::ToView, false) => Ok(map.gid_to_view(id)),
        (Direction::ToDisk, true) => map.uid_to_disk(id).ok_or(Errno::EINVAL),
        (Direction::ToDisk, false) => map.gid_to_disk(id).ok_or(Errno::EINVAL),
    }
}

/// Translate the ids inside the value of attribute `name`. Malformed ACLs and capabilities are
/// EINVAL in both directions: the kernel would refuse to set them, and a caller must never see
/// an id that was not mapped.
pub fn translate<'a>(
    name: &[u8],
    value: &'a [u8],
    map: &dyn IdMapper,
    dir: Direction,
) -> Result<Cow<'a, [u8]>, Errno> {
    if name == ACL_ACCESS || name == ACL_DEFAULT {
        translate_acl(value, map, dir).map(Cow::Owned)
    } else if name == CAPABILITY {
        translate_capability(value, map, dir)
    } else {
        Ok(Cow::Borrowed(value))
    }
}

fn translate_acl(value: &[u8], map: &dyn IdMapper, dir: Direction) -> Result<Vec<u8>, Errno> {
    if value.len() < 4 || !(value.len() - 4).is_multiple_of(8) || u32_at(value, 0) != ACL_VERSION {
        return Err(Errno::EINVAL);
    }
    let mut out = value.to_vec();
    for at in (4..value.len()).step_by(8) {
        let user = match u16_at(value, at) {
            ACL_USER => true,
            ACL_GROUP => false,
            _ => continue,
        };
        let id = map_id(map, u32_at(value, at + 4), user, dir)?;
        out[at + 4..at + 8].copy_from_slice(&id.to_le_bytes());
    }
    Ok(out)
}

fn translate_capability<'a>(
    value: &'a [u8],
    map: &dyn IdMapper,
    dir: Direction,
) -> Result<Cow<'a, [u8]>, Errno> {
    if value.len() < 4 {
        return Err(Errno::EINVAL);
    }
    if u32_at(value, 0) & VFS_CAP_REVISION_MASK != VFS_CAP_REVISION_3 {
        return Ok(Cow::Borrowed(value));
    }
    if value.len() != VFS_CAP_V3_SIZE {
        return Err(Errno::EINVAL);
    }
    let root = map_id(map, u32_at(value, 20), true, dir)?;
    let mut out = value.to_vec();
    out[20..24].copy_from_slice(&root.to_le_bytes());
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Mapping;
    use crate::idmap::{IdMap, IdRange, Unmapped};

    fn mapping() -> Mapping {
        let r = |s: &str| s.parse::<IdRange>().unwrap();
        Mapping {
            uid: IdMap::new(vec![r("0:1000:10")], Unmapped::Overflow),
            gid: IdMap::new(vec![r("0:2000:10")], Unmapped::Overflow),
        }
    }

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = ACL_VERSION.to_le_bytes().to_vec();
        for &(tag, perm, id) in entries {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    const UNDEF: u32 = u32::MAX;

    #[test]
    fn acl_ids_map_both_ways() {
        let m = mapping();
        let disk = acl(&[
            (0x01, 7, UNDEF),
            (ACL_USER, 6, 3),
            (0x04, 5, UNDEF),
            (ACL_GROUP, 4, 4),
            (0x10, 7, UNDEF),
            (0x20, 0, UNDEF),
        ]);
        let view = translate(ACL_ACCESS, &disk, &m, Direction::ToView).unwrap();
        let want = acl(&[
            (0x01, 7, UNDEF),
            (ACL_USER, 6, 1003),
            (0x04, 5, UNDEF),
            (ACL_GROUP, 4, 2004),
            (0x10, 7, UNDEF),
            (0x20, 0, UNDEF),
        ]);
        assert_eq!(&*view, &want[..]);
        let back = translate(ACL_DEFAULT, &view, &m, Direction::ToDisk).unwrap();
        assert_eq!(&*back, &disk[..]);
        // Unmapped disk ids show as the overflow id; a view id without a disk id is EINVAL.
        let unmapped = acl(&[(ACL_USER, 6, 500)]);
        let v = translate(ACL_ACCESS, &unmapped, &m, Direction::ToView).unwrap();
        assert_eq!(&*v, &acl(&[(ACL_USER, 6, 65534)])[..]);
        let no_preimage = acl(&[(ACL_USER, 6, 5)]);
        let e = translate(ACL_ACCESS, &no_preimage, &m, Direction::ToDisk);
        assert_eq!(e.unwrap_err(), Errno::EINVAL);
    }

    #[test]
    fn malformed_acls_are_einval() {
        let m = mapping();
        for bad in [
            &[][..],
            &[2, 0, 0][..],
            &[1, 0, 0, 0][..],
            &[2, 0, 0, 0, 2, 0, 6][..],
        ] {
            for dir in [Direction::ToView, Direction::ToDisk] {
                assert_eq!(
                    translate(ACL_ACCESS, bad, &m, dir).unwrap_err(),
                    Errno::EINVAL
                );
            }
        }
    }

    #[test]
    fn v3_capability_root_id_maps_v2_passes() {
        let m = mapping();
        let mut v3 = (VFS_CAP_REVISION_3 | 1).to_le_bytes().to_vec();
        v3.extend_from_slice(&[0xaa; 16]);
        v3.extend_from_slice(&5u32.to_le_bytes());
        let view = translate(CAPABILITY, &v3, &m, Direction::ToView).unwrap();
        assert_eq!(u32_at(&view, 20), 1005);
        assert_eq!(&view[..20], &v3[..20]);
        let back = translate(CAPABILITY, &view, &m, Direction::ToDisk).unwrap();
        assert_eq!(&*back, &v3[..]);
        let mut v2 = 0x0200_0001u32.to_le_bytes().to_vec();
        v2.extend_from_slice(&[0x55; 16]);
        assert!(matches!(
            translate(CAPABILITY, &v2, &m, Direction::ToDisk).unwrap(),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            translate(CAPABILITY, &v3[..23], &m, Direction::ToView).unwrap_err(),
            Errno::EINVAL
        );
        let other = b"anything";
        assert_eq!(
            &*translate(b"user.x", other, &m, Direction::ToDisk).unwrap(),
            other
        );
    }
}
