//! A set of byte ranges (`[start, end)`), kept merged: the ranges of an overlay that hold
//! written data.

use std::collections::BTreeMap;

/// Disjoint, non-adjacent half-open ranges, keyed by start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtentMap {
    ranges: BTreeMap<u64, u64>,
}

impl ExtentMap {
    pub fn new() -> ExtentMap {
        ExtentMap::default()
    }

    /// Add `[start, end)`, merging with overlapping and adjacent ranges.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        // A range starting before `start` may reach into (or touch) the new one.
        if let Some((&ps, &pe)) = self.ranges.range(..=s).next_back()
            && pe >= s
        {
            s = ps;
            e = e.max(pe);
        }
        // Swallow every range that starts inside (or right at the end of) the merged one.
        let inside: Vec<(u64, u64)> = self.ranges.range(s..=e).map(|(&a, &b)| (a, b)).collect();
        for (a, b) in inside {
            self.ranges.remove(&a);
            e = e.max(b);
        }
        self.ranges.insert(s, e);
    }

    /// The parts of `[start, end)` covered by the map, clipped to it, in order.
    pub fn overlapping(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if start >= end {
            return out;
        }
        if let Some((_, &pe)) = self.ranges.range(..start).next_back()
            && pe > start
        {
            out.push((start, pe.min(end)));
        }
        for (&a, &b) in self.ranges.range(start..end) {
            out.push((a, b.min(end)));
        }
        out
    }

    /// Every range, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&a, &b)| (a, b))
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Total number of bytes covered.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|(a, b)| b - a).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn merges_overlapping_and_adjacent() {
        let mut m = ExtentMap::new();
        m.insert(10, 20);
        m.insert(30, 40);
        m.insert(20, 25);
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![(10, 25), (30, 40)]);
        m.insert(5, 35);
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![(5, 40)]);
        assert_eq!(m.overlapping(0, 7), vec![(5, 7)]);
        assert_eq!(m.overlapping(39, 100), vec![(39, 40)]);
        assert!(m.overlapping(40, 100).is_empty());
        m.insert(7, 7);
        assert_eq!(m.len(), 1);
    }

    proptest! {
        #[test]
        fn matches_a_bitmap(ops in proptest::collection::vec((0u64..200, 0u64..40), 0..40),
                            q in (0u64..250, 0u64..250)) {
            let mut m = ExtentMap::new();
            let mut bits = vec![false; 260];
            for (s, l) in ops {
                m.insert(s, s + l);
                for b in &mut bits[s as usize..(s + l) as usize] {
                    *b = true;
                }
            }
            // Merged: disjoint, non-adjacent, ordered.
            let v: Vec<_> = m.iter().collect();
            for w in v.windows(2) {
                prop_assert!(w[0].1 < w[1].0);
            }
            let (a, b) = (q.0.min(q.1), q.0.max(q.1));
            let mut covered = vec![false; 260];
            for (s, e) in m.overlapping(a, b) {
                prop_assert!(a <= s && s < e && e <= b);
                for c in &mut covered[s as usize..e as usize] {
                    *c = true;
                }
            }
            for i in 0..260 {
                let want = bits[i] && (a as usize..b as usize).contains(&i);
                prop_assert_eq!(covered[i], want, "byte {}", i);
            }
            prop_assert_eq!(m.bytes(), bits.iter().filter(|b| **b).count() as u64);
        }
    }
}
