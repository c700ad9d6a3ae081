//! `--uid-map`/`--gid-map DISK:VIEW:COUNT` (shared by idmap-overlay and subdir-mount): ids
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

/// The ranges a kernel idmapped mount needs to show `ranges` with `unmapped` ids handled as
/// asked: the ranges themselves for the overflow mode (the kernel's own behaviour), plus
/// identity ranges over every disk id outside them for the identity mode. Only meaningful for
/// an injective view. `None` if that needs more extents than the kernel takes.
pub fn kernel_ranges(ranges: &[IdRange], unmapped: Unmapped) -> Option<Vec<IdRange>> {
    if ranges.is_empty() || unmapped == Unmapped::Overflow {
        return Some(ranges.to_vec());
    }
    let mut sorted = ranges.to_vec();
    sorted.sort_by_key(|r| r.disk);
    let mut out = ranges.to_vec();
    let mut next: u64 = 0;
    // The largest id is 4294967294: (uid_t)-1 is not an id.
    let end = u64::from(u32::MAX);
    for r in sorted
        .iter()
        .map(|r| (u64::from(r.disk), u64::from(r.count)))
    {
        if r.0 > next {
            out.push(identity_range(next, r.0 - next));
        }
        next = r.0 + r.1;
    }
    if next < end {
        out.push(identity_range(next, end - next));
    }
    (out.len() <= MAX_EXTENTS).then_some(out)
}

fn identity_range(first: u64, count: u64) -> IdRange {
    // Both fit: ids and counts stay below 2^32 - 1 by construction.
    let first = u32::try_from(first).unwrap_or(u32::MAX - 1);
    let count = u32::try_from(count).unwrap_or(u32::MAX - 1);
    IdRange {
        disk: first,
        view: first,
        count,
    }
}

/// The overflow id the kernel shows for ids without a mapping.
pub const OVERFLOW_ID: u32 = 65534;

/// How ids outside every range are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unmapped {
    /// As the overflow id 65534, like the kernel; they cannot be written through the view.
    #[default]
    Overflow,
    /// Unchanged.
    Identity,
}

/// One dimension (uids or gids) of a mapping, ready for lookups in both directions.
#[derive(Debug, Clone)]
pub struct IdMap {
    ranges: Vec<IdRange>,
    unmapped: Unmapped,
}

fn contains(first: u32, count: u32, id: u32) -> bool {
    id >= first && u64::from(id) < u64::from(first) + u64::from(count)
}

impl IdMap {
    /// A map over `ranges` (already checked with [`classify`]). No ranges is the identity.
    pub fn new(ranges: Vec<IdRange>, unmapped: Unmapped) -> IdMap {
        IdMap { ranges, unmapped }
    }

    pub fn is_identity(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether `disk` has a mapping (unmapped ids in overflow mode do not).
    pub fn is_mapped(&self, disk: u32) -> bool {
        self.ranges.is_empty()
            || self.unmapped == Unmapped::Identity
            || self.ranges.iter().any(|r| contains(r.disk, r.count, disk))
    }

    /// The id shown for an on-disk id.
    pub fn to_view(&self, disk: u32) -> u32 {
        if self.ranges.is_empty() {
            return disk;
        }
        for r in &self.ranges {
            if contains(r.disk, r.count, disk) {
                return r.view + (disk - r.disk);
            }
        }
        match self.unmapped {
            Unmapped::Overflow => OVERFLOW_ID,
            Unmapped::Identity => disk,
        }
    }

    /// The on-disk id to store for a view id, if it has exactly one preimage (only meaningful
    /// for an injective map; for a many-to-one map the first range wins).
    pub fn to_disk(&self, view: u32) -> Option<u32> {
        if self.ranges.is_empty() {
            return Some(view);
        }
        for r in &self.ranges {
            if contains(r.view, r.count, view) {
                return Some(r.disk + (view - r.view));
            }
        }
        match self.unmapped {
            // An unmapped disk id shows as itself; a mapped disk id never does.
            Unmapped::Identity if !self.ranges.iter().any(|r| contains(r.disk, r.count, view)) => {
                Some(view)
            }
            _ => None,
        }
    }

    /// Why the view is not injective, if it is not: two disk ids shown as the same view id.
    pub fn non_injective_reason(&self, kind: &str) -> Option<String> {
        for (i, a) in self.ranges.iter().enumerate() {
            for b in &self.ranges[i + 1..] {
                if overlap(a.view, b.view, a.count, b.count) {
                    return Some(format!(
                        "--{kind}-map {a} and {b} show several disk ids as the same view id"
                    ));
                }
            }
        }
        if self.unmapped == Unmapped::Identity && !self.ranges.is_empty() {
            // Each mapped view id must not also be an unmapped disk id shown as itself.
            for r in &self.ranges {
                if let Some(id) = self.first_uncovered(r.view, r.count) {
                    return Some(format!(
                        "--{kind}-map {r} shows disk {kind} {} as {id}, but the unmapped disk \
                         {kind} {id} is shown as {id} too (--unmapped=identity)",
                        r.disk + (id - r.view)
                    ));
                }
            }
        }
        None
    }

    /// The first id of `first..first+count` that no disk range covers.
    fn first_uncovered(&self, first: u32, count: u32) -> Option<u32> {
        let end = u64::from(first) + u64::from(count);
        let mut sorted: Vec<&IdRange> = self.ranges.iter().collect();
        sorted.sort_by_key(|r| r.disk);
        let mut next = u64::from(first);
        for r in sorted {
            let (s, e) = (u64::from(r.disk), u64::from(r.disk) + u64::from(r.count));
            if e <= next {
                continue;
            }
            if s > next {
                break;
            }
            next = e;
            if next >= end {
                return None;
            }
        }
        (next < end).then_some(next as u32)
    }
}

/// Read maps from a file: one range a line, `u DISK VIEW COUNT` (uids), `g DISK VIEW COUNT`
/// (gids) or `b DISK VIEW COUNT` (both), the last three columns in `/proc/PID/uid_map` order.
/// A line without the letter is a uid range; `#` starts a comment.
pub fn parse_map_file(text: &str) -> Result<(Vec<IdRange>, Vec<IdRange>), String> {
    let (mut uids, mut gids) = (Vec::new(), Vec::new());
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words: Vec<&str> = line.split_whitespace().collect();
        let which = match words.first() {
            Some(&w) if matches!(w, "u" | "g" | "b") => {
                words.remove(0);
                w
            }
            _ => "u",
        };
        let r: IdRange = words
            .join(":")
            .parse()
            .map_err(|e| format!("line {}: {e}", n + 1))?;
        if which != "g" {
            uids.push(r);
        }
        if which != "u" {
            gids.push(r);
        }
    }
    Ok((uids, gids))
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
    fn maps_both_ways() {
        let m = IdMap::new(
            vec![r("65534:1000:1"), r("50000:1000:1")],
            Unmapped::Overflow,
        );
        assert_eq!(
            (m.to_view(65534), m.to_view(50000), m.to_view(7)),
            (1000, 1000, 65534)
        );
        assert!(m.non_injective_reason("uid").is_some());
        assert!(!m.is_mapped(7) && m.is_mapped(50000));
        let m = IdMap::new(vec![r("100:1000:10")], Unmapped::Overflow);
        assert_eq!((m.to_disk(1005), m.to_disk(5)), (Some(105), None));
        assert!(m.non_injective_reason("uid").is_none());
        // Identity for unmapped ids: a swap is injective, a lone map is not.
        let swap = IdMap::new(
            vec![r("65534:1000:1"), r("1000:65534:1")],
            Unmapped::Identity,
        );
        assert!(swap.non_injective_reason("uid").is_none());
        assert_eq!(
            (swap.to_disk(1000), swap.to_disk(5)),
            (Some(65534), Some(5))
        );
        let lone = IdMap::new(vec![r("65534:1000:1")], Unmapped::Identity);
        assert!(lone.non_injective_reason("uid").is_some());
        assert_eq!(lone.to_disk(65534), None);
        assert_eq!(IdMap::new(vec![], Unmapped::Overflow).to_view(7), 7);
    }

    #[test]
    fn parses_map_files() {
        let (u, g) = parse_map_file("# c\n u 0 1000 1\n\ng 5 6 7 # x\nb 9 9 1\n10 11 1\n").unwrap();
        assert_eq!(u, vec![r("0:1000:1"), r("9:9:1"), r("10:11:1")]);
        assert_eq!(g, vec![r("5:6:7"), r("9:9:1")]);
        assert!(parse_map_file("u 1 2").is_err());
    }

    #[test]
    fn map_text_is_in_proc_column_order() {
        assert_eq!(
            proc_map_text(&[r("0:1000:1"), r("5:6:7")]),
            "0 1000 1\n5 6 7\n"
        );
        assert_eq!(proc_map_text(&[]), "0 0 4294967295\n");
    }

    #[test]
    fn kernel_ranges_fill_gaps_with_identity() {
        let r = |s: &str| s.parse::<IdRange>().unwrap();
        let swap = [r("65534:1000:1"), r("1000:65534:1")];
        assert_eq!(
            kernel_ranges(&swap, Unmapped::Overflow).unwrap(),
            swap.to_vec()
        );
        let k = kernel_ranges(&swap, Unmapped::Identity).unwrap();
        assert_eq!(
            proc_map_text(&k),
            "65534 1000 1\n1000 65534 1\n0 0 1000\n1001 1001 64533\n65535 65535 4294901760\n"
        );
        let total: u64 = k.iter().map(|r| u64::from(r.count)).sum();
        assert_eq!(total, u64::from(u32::MAX));
        let many: Vec<IdRange> = (0..300)
            .map(|i| IdRange {
                disk: i * 10,
                view: i * 10,
                count: 1,
            })
            .collect();
        assert!(kernel_ranges(&many, Unmapped::Identity).is_none());
    }
}
