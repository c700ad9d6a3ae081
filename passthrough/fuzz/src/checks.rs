//! What must hold for any list of ranges the parsers accepted.

use fuse_passthrough::idmap::{self, IdMap, IdRange, MapKind, Unmapped};

/// Ids worth probing for a list of ranges: every range edge and its neighbours, plus the ends
/// of the id space and the overflow id.
fn probes(ranges: &[IdRange]) -> Vec<u32> {
    let mut ids = vec![0, 1, idmap::OVERFLOW_ID, u32::MAX - 1, u32::MAX];
    for r in ranges.iter().take(32) {
        for first in [r.disk, r.view] {
            let last = first + (r.count - 1);
            ids.extend([
                first.wrapping_sub(1),
                first,
                first.wrapping_add(1),
                last,
                last.wrapping_add(1),
            ]);
        }
    }
    ids
}

pub fn check_ranges(kind: &str, ranges: &[IdRange]) {
    for r in ranges {
        assert!(r.count >= 1);
        assert!(u64::from(r.disk) + u64::from(r.count) <= u64::from(u32::MAX));
        assert!(u64::from(r.view) + u64::from(r.count) <= u64::from(u32::MAX));
    }
    let Ok(class) = idmap::classify(kind, ranges) else {
        return;
    };
    let _ = idmap::proc_map_text(ranges);
    let ids = probes(ranges);
    for unmapped in [Unmapped::Overflow, Unmapped::Identity] {
        let map = IdMap::new(ranges.to_vec(), unmapped);
        let injective = map.non_injective_reason(kind).is_none();
        if class == MapKind::ManyToOne {
            assert!(!injective, "many-to-one map called injective");
        }
        for &d in &ids {
            let v = map.to_view(d);
            if injective && map.is_mapped(d) {
                assert_eq!(
                    map.to_disk(v),
                    Some(d),
                    "{ranges:?} {unmapped:?}: {d} -> {v}"
                );
            }
        }
        if injective && let Some(k) = idmap::kernel_ranges(ranges, unmapped) {
            assert!(k.len() <= idmap::MAX_EXTENTS);
            assert!(
                idmap::classify(kind, &k).is_ok(),
                "kernel ranges overlap: {k:?}"
            );
            for r in &k {
                assert!(r.count >= 1, "empty kernel range in {k:?}");
                assert!(u64::from(r.disk) + u64::from(r.count) <= u64::from(u32::MAX));
            }
        }
    }
}
