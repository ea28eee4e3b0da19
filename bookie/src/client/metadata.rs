//! Ledger metadata, stored as JSON at `/ledgers/<id>` and changed only by compare-and-swap on
//! its version.

use serde::{Deserialize, Serialize};

/// Metastore prefix of ledger metadata.
pub const LEDGERS_PREFIX: &str = "/ledgers/";

/// Metastore key of a ledger.
pub fn ledger_key(id: u64) -> String {
    format!("{LEDGERS_PREFIX}{id}")
}

/// Largest ensemble a ledger may have (the writer tracks positions as bits of a `u64`).
pub const MAX_ENSEMBLE: usize = 64;

/// Lifecycle of a ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LedgerState {
    /// Its writer may be appending.
    Open,
    /// A new writer is recovering it; the old writer's metadata changes fail.
    InRecovery,
    /// Sealed at `last_entry`.
    Closed,
}

/// Entries from `first_entry` on are striped over `bookies`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fragment {
    /// First entry of the fragment.
    pub first_entry: i64,
    /// Bookie ids, the ensemble (length E).
    pub bookies: Vec<String>,
}

/// A ledger's metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerMetadata {
    /// Ledger id.
    pub id: u64,
    /// E.
    pub ensemble_size: usize,
    /// Qw.
    pub write_quorum: usize,
    /// Qa.
    pub ack_quorum: usize,
    /// State.
    pub state: LedgerState,
    /// Last entry when closed (-1: empty).
    pub last_entry: i64,
    /// Fragments in entry order; never empty.
    pub fragments: Vec<Fragment>,
    /// Master key, hex.
    pub password: String,
    /// Who created it.
    #[serde(default)]
    pub created_by: String,
    /// Creation time, ms since the epoch.
    #[serde(default)]
    pub ctime_ms: u64,
    /// Application properties (the broker records the topic).
    #[serde(default)]
    pub custom: std::collections::BTreeMap<String, String>,
}

impl LedgerMetadata {
    /// The fragment holding `entry`.
    pub fn fragment_for(&self, entry: i64) -> &Fragment {
        let i = self.fragments.partition_point(|f| f.first_entry <= entry);
        &self.fragments[i.saturating_sub(1)]
    }

    /// The last fragment.
    pub fn last_fragment(&self) -> &Fragment {
        &self.fragments[self.fragments.len() - 1]
    }

    /// The bookies that store `entry`: `ensemble[(entry + i) mod E]` for `i < Qw`.
    pub fn write_set(&self, entry: i64) -> Vec<String> {
        write_set(&self.fragment_for(entry).bookies, self.write_quorum, entry)
    }

    /// The master key bytes.
    pub fn master_key(&self) -> Vec<u8> {
        decode_hex(&self.password)
    }

    /// Whether `E >= Qw >= Qa >= 1` and every fragment has E distinct bookies.
    pub fn check(&self) -> Result<(), &'static str> {
        if !(self.ensemble_size >= self.write_quorum && self.write_quorum >= self.ack_quorum && self.ack_quorum >= 1) {
            return Err("need E >= Qw >= Qa >= 1");
        }
        if self.ensemble_size > MAX_ENSEMBLE {
            return Err("an ensemble has at most 64 bookies");
        }
        if self.fragments.is_empty() {
            return Err("a ledger has at least one fragment");
        }
        for f in &self.fragments {
            let mut b = f.bookies.clone();
            b.sort();
            b.dedup();
            if f.bookies.len() != self.ensemble_size || b.len() != f.bookies.len() {
                return Err("every fragment needs E distinct bookies");
            }
        }
        Ok(())
    }
}

/// Positions in the ensemble that store `entry`.
pub fn write_set_positions(e: usize, qw: usize, entry: i64) -> impl Iterator<Item = usize> {
    let start = entry.rem_euclid(e as i64) as usize;
    (0..qw).map(move |i| (start + i) % e)
}

/// The bookies of `ensemble` that store `entry`.
pub fn write_set(ensemble: &[String], qw: usize, entry: i64) -> Vec<String> {
    write_set_positions(ensemble.len(), qw, entry).map(|p| ensemble[p].clone()).collect()
}

/// Lower-case hex.
pub fn encode_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn decode_hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md() -> LedgerMetadata {
        LedgerMetadata {
            id: 1,
            ensemble_size: 3,
            write_quorum: 2,
            ack_quorum: 2,
            state: LedgerState::Open,
            last_entry: -1,
            fragments: vec![
                Fragment { first_entry: 0, bookies: vec!["a".into(), "b".into(), "c".into()] },
                Fragment { first_entry: 10, bookies: vec!["a".into(), "d".into(), "c".into()] },
            ],
            password: encode_hex(b"\x01\xff"),
            created_by: String::new(),
            ctime_ms: 0,
            custom: Default::default(),
        }
    }

    #[test]
    fn write_sets_stripe_and_follow_fragments() {
        let m = md();
        assert_eq!(m.write_set(0), vec!["a", "b"]);
        assert_eq!(m.write_set(1), vec!["b", "c"]);
        assert_eq!(m.write_set(2), vec!["c", "a"]);
        assert_eq!(m.write_set(9), vec!["a", "b"]);
        assert_eq!(m.write_set(10), vec!["d", "c"]);
        assert_eq!(m.write_set(11), vec!["c", "a"]);
        assert_eq!(m.master_key(), vec![1, 255]);
        assert!(m.check().is_ok());
    }

    #[test]
    fn json_uses_protocol_names() {
        let s = serde_json::to_string(&md()).unwrap_or_default();
        assert!(s.contains("\"state\":\"OPEN\"") && s.contains("\"ensembleSize\":3"), "{s}");
        let mut bad = md();
        bad.fragments[1].bookies[1] = "a".into();
        assert!(bad.check().is_err());
        let mut wide = md();
        wide.ensemble_size = MAX_ENSEMBLE + 1;
        wide.fragments =
            vec![Fragment { first_entry: 0, bookies: (0..=MAX_ENSEMBLE).map(|i| format!("b{i}")).collect() }];
        assert_eq!(wide.check(), Err("an ensemble has at most 64 bookies"));
    }
}
