//! `--uid-map`/`--gid-map DISK:VIEW:COUNT` (the syntax of idmap-overlay): ids
//! `DISK..DISK+COUNT-1` as stored on the filesystem are shown as `VIEW..VIEW+COUNT-1`.
//!
//! A kernel idmapped mount maps an on-disk id through the mount's user namespace as if it were
//! an id *inside* that namespace, and shows the id it maps to *outside*. So the namespace's
//! `uid_map` line for a range is `DISK VIEW COUNT` (`/proc/PID/uid_map` column order: inside,
//! outside, count). Ids outside every range show as the overflow id 65534 and cannot be written
//! through the mount. A dimension without any map (say `--uid-map` given, `--gid-map` not) is
//! the identity.

use cli_common::CliError;
use std::fmt;
use std::str::FromStr;

/// The kernel accepts at most this many extents per map (Linux 4.15+).
pub const MAX_EXTENTS: usize = 340;

/// One `DISK:VIEW:COUNT` range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub disk: u32,
    pub view: u32,
    pub count: u32,
}

impl fmt::Display for IdRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.disk, self.view, self.count)
    }
}

impl FromStr for IdRange {
    type Err = String;

    fn from_str(s: &str) -> Result<IdRange, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let [disk, view, count] = parts.as_slice() else {
            return Err(format!("{s:?}: expected DISK:VIEW:COUNT"));
        };
        let num = |what: &str, v: &str| -> Result<u32, String> {
            v.trim()
                .parse::<u32>()
                .map_err(|_| format!("{s:?}: {what} {v:?} is not a number"))
        };
        let r = IdRange {
            disk: num("DISK", disk)?,
            view: num("VIEW", view)?,
            count: num("COUNT", count)?,
        };
        if r.count == 0 {
            return Err(format!("{s:?}: COUNT must be at least 1"));
        }
        // (uid_t)-1 is not an id; the last id of a range must stay below it.
        let fits = |first: u32| u64::from(first) + u64::from(r.count) <= u64::from(u32::MAX);
        if !fits(r.disk) || !fits(r.view) {
            return Err(format!("{s:?}: range goes past the largest id 4294967294"));
        }
        Ok(r)
    }
}

fn overlap(a_first: u32, b_first: u32, a_count: u32, b_count: u32) -> bool {
    let (a0, b0) = (u64::from(a_first), u64::from(b_first));
    a0 < b0 + u64::from(b_count) && b0 < a0 + u64::from(a_count)
}

/// How a list of ranges can be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// No ranges: ids pass unchanged.
    Identity,
    /// Injective: a kernel idmapped mount can do it.
    OneToOne,
    /// Several disk ids share a view id: needs the FUSE path.
    ManyToOne,
}

/// Check a list of ranges. Overlapping disk ranges (one disk id shown as two view ids) are a
/// usage error; overlapping view ranges make the map many-to-one.
pub fn classify(kind: &str, ranges: &[IdRange]) -> Result<MapKind, CliError> {
    if ranges.is_empty() {
        return Ok(MapKind::Identity);
    }
    if ranges.len() > MAX_EXTENTS {
        return Err(CliError::usage(format!(
            "--{kind}-map: at most {MAX_EXTENTS} ranges are supported"
        )));
    }
    let mut many_to_one = false;
    for (i, a) in ranges.iter().enumerate() {
        for b in &ranges[i + 1..] {
            if overlap(a.disk, b.disk, a.count, b.count) {
                return Err(CliError::usage(format!(
                    "--{kind}-map {a} and {b}: the disk ranges overlap (a disk id can be shown \
                     as only one view id)"
                )));
            }
            many_to_one |= overlap(a.view, b.view, a.count, b.count);
        }
    }
    Ok(if many_to_one {
        MapKind::ManyToOne
    } else {
        MapKind::OneToOne
    })
}

/// The contents to write to `/proc/PID/uid_map` (or `gid_map`) of the mount's user namespace.
/// No ranges means the identity over every id.
pub fn proc_map_text(ranges: &[IdRange]) -> String {
    if ranges.is_empty() {
        return "0 0 4294967295\n".to_owned();
    }
    ranges
        .iter()
        .map(|r| format!("{} {} {}\n", r.disk, r.view, r.count))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> IdRange {
        s.parse().unwrap()
    }

    #[test]
    fn parses_ranges() {
        assert_eq!(
            r("0:1000:1"),
            IdRange {
                disk: 0,
                view: 1000,
                count: 1
            }
        );
        assert_eq!(r("0:0:4294967295").count, u32::MAX);
        for bad in [
            "",
            "1:2",
            "1:2:3:4",
            "a:1:1",
            "1:1:0",
            "-1:0:1",
            "4294967295:0:1",
        ] {
            assert!(bad.parse::<IdRange>().is_err(), "{bad}");
        }
        assert!("1:0:4294967295".parse::<IdRange>().is_err());
    }

    #[test]
    fn classifies_maps() {
        assert_eq!(classify("uid", &[]).unwrap(), MapKind::Identity);
        assert_eq!(
            classify("uid", &[r("0:1000:10"), r("10:2000:10")]).unwrap(),
            MapKind::OneToOne
        );
        // A swap is injective.
        assert_eq!(
            classify("uid", &[r("65534:1000:1"), r("1000:65534:1")]).unwrap(),
            MapKind::OneToOne
        );
        assert_eq!(
            classify("uid", &[r("65534:1000:1"), r("50000:1000:1")]).unwrap(),
            MapKind::ManyToOne
        );
        let e = classify("uid", &[r("0:1000:10"), r("9:3000:1")]).unwrap_err();
        assert_eq!(e.code, cli_common::EXIT_USAGE);
    }

    #[test]
    fn map_text_is_in_proc_column_order() {
        assert_eq!(
            proc_map_text(&[r("0:1000:1"), r("5:6:7")]),
            "0 1000 1\n5 6 7\n"
        );
        assert_eq!(proc_map_text(&[]), "0 0 4294967295\n");
    }
}
