//! A subscription's cursor: everything up to the mark-delete position is acknowledged; past
//! it, a set of individually acknowledged entries and, for batches acknowledged message by
//! message, the bits still unacknowledged (Pulsar's `ack_set`: a set bit is a message not yet
//! acknowledged).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::position::{LedgerSpan, Pos};

/// The cursor state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    mark_delete: Pos,
    acked: BTreeSet<Pos>,
    partial: BTreeMap<Pos, Vec<i64>>,
}

/// What is stored at `/topics/.../cursors/<subscription>`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CursorInfo {
    /// Everything up to here is acknowledged.
    pub mark_delete: Option<Pos>,
    /// Individually acknowledged ranges past the mark-delete position: `[ledger, first, last]`.
    #[serde(default)]
    pub acked_ranges: Vec<(u64, i64, i64)>,
    /// Batches partly acknowledged: the bits of messages still unacknowledged.
    #[serde(default)]
    pub batch_acks: Vec<BatchAck>,
    /// The subscription type it was created with (informational).
    #[serde(default)]
    pub sub_type: String,
    /// Subscription properties.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// One partly acknowledged batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchAck {
    /// Its entry.
    pub position: Pos,
    /// Unacknowledged bits (64 per word).
    pub ack_set: Vec<i64>,
}

/// Whether any message of a batch is left in `ack_set`.
fn any_left(ack_set: &[i64]) -> bool {
    ack_set.iter().any(|w| *w != 0)
}

impl Cursor {
    /// A cursor with everything up to `mark_delete` acknowledged.
    pub fn new(mark_delete: Pos) -> Self {
        Cursor { mark_delete, acked: BTreeSet::new(), partial: BTreeMap::new() }
    }

    /// The mark-delete position.
    pub fn mark_delete(&self) -> Pos {
        self.mark_delete
    }

    /// Whether the whole entry at `p` is acknowledged.
    pub fn is_acked(&self, p: Pos) -> bool {
        p <= self.mark_delete || self.acked.contains(&p)
    }

    /// The unacknowledged bits of a partly acknowledged batch.
    pub fn partial(&self, p: Pos) -> Option<&[i64]> {
        self.partial.get(&p).map(|v| v.as_slice())
    }

    /// Entries acknowledged past the mark-delete position.
    pub fn acked_count(&self) -> u64 {
        self.acked.len() as u64
    }

    /// Acknowledges one entry, or with `ack_set` some messages of its batch. Returns whether
    /// the whole entry is now acknowledged.
    pub fn ack(&mut self, p: Pos, ack_set: Option<&[i64]>, span: &LedgerSpan) -> bool {
        if self.is_acked(p) {
            return true;
        }
        if let Some(bits) = ack_set.filter(|b| any_left(b)) {
            let merged: Vec<i64> = match self.partial.get(&p) {
                Some(old) => (0..old.len().max(bits.len()))
                    .map(|i| old.get(i).copied().unwrap_or(0) & bits.get(i).copied().unwrap_or(0))
                    .collect(),
                None => bits.to_vec(),
            };
            if any_left(&merged) {
                self.partial.insert(p, merged);
                return false;
            }
        }
        self.partial.remove(&p);
        self.acked.insert(p);
        self.advance(span);
        true
    }

    /// Acknowledges everything up to `p` (cumulative ack). With `ack_set`, only part of `p`'s
    /// batch is acknowledged and the mark-delete position stops before it.
    pub fn ack_cumulative(&mut self, p: Pos, ack_set: Option<&[i64]>, span: &LedgerSpan) {
        let partial = ack_set.filter(|b| any_left(b));
        let upto = if partial.is_some() { Pos::new(p.ledger_id, p.entry_id - 1) } else { p };
        if upto > self.mark_delete {
            self.mark_delete = upto;
            self.acked = self.acked.split_off(&Pos::new(upto.ledger_id, upto.entry_id + 1));
            self.partial = self.partial.split_off(&Pos::new(upto.ledger_id, upto.entry_id + 1));
        }
        if partial.is_some() {
            self.ack(p, partial, span);
        }
        self.advance(span);
    }

    /// Moves the mark-delete position over acknowledged entries that follow it.
    fn advance(&mut self, span: &LedgerSpan) {
        while let Some(n) = span.next(self.mark_delete) {
            if !self.acked.remove(&n) {
                break;
            }
            self.mark_delete = n;
        }
    }

    /// Moves the mark-delete position up to `first` if it is before it (the entries before
    /// `first` are gone), dropping acknowledgements there.
    pub fn skip_to(&mut self, first: Pos, span: &LedgerSpan) {
        if self.mark_delete < first {
            self.mark_delete = first;
            let after = Pos::new(first.ledger_id, first.entry_id + 1);
            self.acked = self.acked.split_off(&after);
            self.partial = self.partial.split_off(&after);
            self.advance(span);
        }
    }

    /// Resets to `mark_delete` (seek, skip-all): forgets individual acknowledgements.
    pub fn reset(&mut self, mark_delete: Pos) {
        *self = Cursor::new(mark_delete);
    }

    /// The state to store.
    pub fn to_info(&self, sub_type: &str, properties: &BTreeMap<String, String>) -> CursorInfo {
        let mut ranges: Vec<(u64, i64, i64)> = Vec::new();
        for p in &self.acked {
            match ranges.last_mut() {
                Some(r) if r.0 == p.ledger_id && r.2 + 1 == p.entry_id => r.2 = p.entry_id,
                _ => ranges.push((p.ledger_id, p.entry_id, p.entry_id)),
            }
        }
        CursorInfo {
            mark_delete: Some(self.mark_delete),
            acked_ranges: ranges,
            batch_acks: self.partial.iter().map(|(p, s)| BatchAck { position: *p, ack_set: s.clone() }).collect(),
            sub_type: sub_type.to_owned(),
            properties: properties.clone(),
        }
    }

    /// The cursor stored as `info`, or at `default` when it has no position.
    pub fn from_info(info: &CursorInfo, default: Pos) -> Self {
        let mut c = Cursor::new(info.mark_delete.unwrap_or(default));
        for &(l, a, b) in &info.acked_ranges {
            c.acked.extend((a..=b).map(|e| Pos::new(l, e)).filter(|p| *p > c.mark_delete));
        }
        for b in &info.batch_acks {
            if b.position > c.mark_delete {
                c.partial.insert(b.position, b.ack_set.clone());
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span() -> LedgerSpan {
        LedgerSpan::new(vec![(1, 4), (2, -1), (3, 9)])
    }

    #[test]
    fn individual_acks_advance_over_ledgers() {
        let s = span();
        let mut c = Cursor::new(s.before_first());
        assert!(c.ack(Pos::new(1, 1), None, &s));
        assert_eq!(c.mark_delete(), Pos::new(1, -1));
        for e in [0, 2, 3] {
            c.ack(Pos::new(1, e), None, &s);
        }
        assert_eq!(c.mark_delete(), Pos::new(1, 3));
        c.ack(Pos::new(3, 0), None, &s);
        assert_eq!(c.acked_count(), 1);
        c.ack(Pos::new(1, 4), None, &s);
        assert_eq!(c.mark_delete(), Pos::new(3, 0), "skips the empty ledger");
        assert_eq!(c.acked_count(), 0);
        assert!(c.is_acked(Pos::new(2, 0)) && !c.is_acked(Pos::new(3, 1)));
    }

    #[test]
    fn a_cursor_behind_deleted_ledgers_moves_to_the_first_left() {
        // Stored before ledger 1 was deleted: position 1:2, acks at 1:4 and 3:0, a batch at 1:3.
        let mut c = Cursor::new(Pos::new(1, 2));
        c.acked.extend([Pos::new(1, 4), Pos::new(3, 0)]);
        c.partial.insert(Pos::new(1, 3), vec![0b1]);
        let left = LedgerSpan::new(vec![(2, -1), (3, 9)]);
        c.skip_to(left.before_first(), &left);
        // Ledger 2 is empty and 3:0 was acknowledged: the position moves on to it.
        assert_eq!(c.mark_delete(), Pos::new(3, 0));
        assert_eq!(c.acked_count(), 0, "no acknowledgement left in deleted ledgers");
        assert_eq!(c.partial(Pos::new(1, 3)), None);
        // A cursor already past the first ledger left is not moved.
        let mut d = Cursor::new(Pos::new(3, 5));
        d.skip_to(left.before_first(), &left);
        assert_eq!(d.mark_delete(), Pos::new(3, 5));
    }

    #[test]
    fn batch_acks_combine_until_empty() {
        let s = span();
        let mut c = Cursor::new(s.before_first());
        // A batch of 3: bits 0..3 set = unacknowledged.
        assert!(!c.ack(Pos::new(1, 0), Some(&[0b110]), &s));
        assert_eq!(c.partial(Pos::new(1, 0)), Some(&[0b110][..]));
        assert!(!c.ack(Pos::new(1, 0), Some(&[0b011]), &s));
        assert_eq!(c.partial(Pos::new(1, 0)), Some(&[0b010][..]));
        assert!(c.ack(Pos::new(1, 0), Some(&[0b101]), &s));
        assert_eq!(c.mark_delete(), Pos::new(1, 0));
        assert_eq!(c.partial(Pos::new(1, 0)), None);
    }

    #[test]
    fn cumulative_acks_and_round_trip() {
        let s = span();
        let mut c = Cursor::new(s.before_first());
        for e in [5, 6, 8] {
            c.ack(Pos::new(3, e), None, &s);
        }
        c.ack(Pos::new(3, 9), Some(&[0b1]), &s);
        c.ack_cumulative(Pos::new(3, 2), None, &s);
        assert_eq!(c.mark_delete(), Pos::new(3, 2));
        let props = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let info = c.to_info("Shared", &props);
        assert_eq!(info.acked_ranges, vec![(3, 5, 6), (3, 8, 8)]);
        let json = serde_json::to_string(&info).unwrap_or_default();
        let back: CursorInfo = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(Cursor::from_info(&back, s.before_first()), c);
        // Cumulative with a partial batch stops before it.
        c.ack_cumulative(Pos::new(3, 7), Some(&[0b10]), &s);
        assert_eq!(c.mark_delete(), Pos::new(3, 6));
        assert_eq!(c.partial(Pos::new(3, 7)), Some(&[0b10][..]));
        c.ack(Pos::new(3, 7), None, &s);
        assert_eq!(c.mark_delete(), Pos::new(3, 8));
    }
}
