//! Positions in a managed ledger and the list of ledgers they walk over.

use serde::{Deserialize, Serialize};

/// A position: `(ledger, entry)`. Ledger ids grow with each new ledger of a topic, so the
/// derived order is the order of the log. Entry -1 means "before the ledger's first entry".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pos {
    /// Ledger id.
    pub ledger_id: u64,
    /// Entry id.
    pub entry_id: i64,
}

impl Pos {
    /// A position.
    pub const fn new(ledger_id: u64, entry_id: i64) -> Self {
        Pos { ledger_id, entry_id }
    }
}

impl std::fmt::Display for Pos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.ledger_id, self.entry_id)
    }
}

/// The ledgers of a topic with their last entries (for the ledger being written: the last
/// confirmed one), oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerSpan {
    ledgers: Vec<(u64, i64)>,
}

impl LedgerSpan {
    /// From `(ledger id, last entry)` pairs in order.
    pub fn new(ledgers: Vec<(u64, i64)>) -> Self {
        debug_assert!(ledgers.windows(2).all(|w| w[0].0 < w[1].0), "ledger ids grow");
        LedgerSpan { ledgers }
    }

    /// The pairs.
    pub fn ledgers(&self) -> &[(u64, i64)] {
        &self.ledgers
    }

    /// Adds a ledger at the end.
    pub fn push(&mut self, ledger: u64, last: i64) {
        self.ledgers.push((ledger, last));
    }

    /// Forgets the ledgers before `ledger` (deleted).
    pub fn drop_before(&mut self, ledger: u64) {
        self.ledgers.retain(|l| l.0 >= ledger);
    }

    /// Sets the last entry of `ledger`.
    pub fn set_last(&mut self, ledger: u64, last: i64) {
        if let Some(l) = self.ledgers.iter_mut().find(|l| l.0 == ledger) {
            l.1 = last;
        }
    }

    /// The position before everything (what an `earliest` cursor has deleted up to).
    pub fn before_first(&self) -> Pos {
        Pos::new(self.ledgers.first().map(|l| l.0).unwrap_or(0), -1)
    }

    /// The last written position, or `before_first` when nothing is.
    pub fn last(&self) -> Pos {
        self.ledgers.iter().rev().find(|l| l.1 >= 0).map(|l| Pos::new(l.0, l.1)).unwrap_or_else(|| {
            // Nothing written: the position before the newest ledger's first entry.
            Pos::new(self.ledgers.last().map(|l| l.0).unwrap_or(0), -1)
        })
    }

    /// The first existing position after `p`.
    pub fn next(&self, p: Pos) -> Option<Pos> {
        let start = self.ledgers.partition_point(|l| l.0 < p.ledger_id);
        for &(id, last) in &self.ledgers[start..] {
            if id == p.ledger_id {
                if p.entry_id < last {
                    return Some(Pos::new(id, p.entry_id.max(-1) + 1));
                }
            } else if last >= 0 {
                return Some(Pos::new(id, 0));
            }
        }
        None
    }

    /// Whether `p` names an existing entry.
    pub fn contains(&self, p: Pos) -> bool {
        p.entry_id >= 0
            && self.ledgers.binary_search_by_key(&p.ledger_id, |l| l.0).is_ok_and(|i| p.entry_id <= self.ledgers[i].1)
    }

    /// How many entries lie after `p` (up to the last).
    pub fn entries_after(&self, p: Pos) -> u64 {
        self.ledgers
            .iter()
            .map(|&(id, last)| {
                if id < p.ledger_id {
                    0
                } else if id == p.ledger_id {
                    (last - p.entry_id.max(-1)).max(0) as u64
                } else {
                    (last + 1).max(0) as u64
                }
            })
            .sum()
    }

    /// Total entries.
    pub fn total_entries(&self) -> u64 {
        self.ledgers.iter().map(|l| (l.1 + 1).max(0) as u64).sum()
    }

    /// The entry with global index `i` (0-based over all ledgers).
    pub fn nth(&self, mut i: u64) -> Option<Pos> {
        for &(id, last) in &self.ledgers {
            let n = (last + 1).max(0) as u64;
            if i < n {
                return Some(Pos::new(id, i as i64));
            }
            i -= n;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_over_empty_ledgers() {
        let s = LedgerSpan::new(vec![(3, 1), (5, -1), (7, 0), (9, -1)]);
        assert_eq!(s.before_first(), Pos::new(3, -1));
        assert_eq!(s.next(Pos::new(3, -1)), Some(Pos::new(3, 0)));
        assert_eq!(s.next(Pos::new(3, 0)), Some(Pos::new(3, 1)));
        assert_eq!(s.next(Pos::new(3, 1)), Some(Pos::new(7, 0)));
        assert_eq!(s.next(Pos::new(5, -1)), Some(Pos::new(7, 0)));
        assert_eq!(s.next(Pos::new(4, 10)), Some(Pos::new(7, 0)));
        assert_eq!(s.next(Pos::new(7, 0)), None);
        assert_eq!(s.last(), Pos::new(7, 0));
        assert_eq!(s.entries_after(Pos::new(3, -1)), 3);
        assert_eq!(s.entries_after(Pos::new(3, 0)), 2);
        assert_eq!(s.entries_after(Pos::new(7, 0)), 0);
        assert_eq!(s.total_entries(), 3);
        assert_eq!(s.nth(2), Some(Pos::new(7, 0)));
        assert_eq!(s.nth(3), None);
        assert!(s.contains(Pos::new(3, 1)) && !s.contains(Pos::new(5, 0)) && !s.contains(Pos::new(3, -1)));
        assert_eq!(LedgerSpan::new(vec![(4, -1)]).last(), Pos::new(4, -1));
    }
}
