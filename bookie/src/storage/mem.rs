//! In-memory [`LedgerStorage`], the reference the conformance suite checks the RocksDB store
//! against. Nothing survives a restart.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{EntryWrite, LedgerMeta, LedgerStorage, StoredEntry};
use crate::error::Result;

/// Entries and states in ordered maps.
#[derive(Default)]
pub struct MemStorage {
    entries: Mutex<BTreeMap<(u64, i64), (u32, bytes::Bytes)>>,
    metas: Mutex<BTreeMap<u64, LedgerMeta>>,
}

impl MemStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl LedgerStorage for MemStorage {
    fn write(&self, entries: &[EntryWrite], states: &[(u64, LedgerMeta)]) -> Result<()> {
        let mut m = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for e in entries {
            m.insert((e.ledger, e.entry), (e.checksum, e.payload.clone()));
        }
        let mut s = self.metas.lock().unwrap_or_else(|e| e.into_inner());
        for (l, meta) in states {
            s.insert(*l, meta.clone());
        }
        Ok(())
    }

    fn get_entry(&self, ledger: u64, entry: i64) -> Result<Option<StoredEntry>> {
        let m = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match m.get(&(ledger, entry)) {
            None => Ok(None),
            Some((c, p)) => StoredEntry::verified(ledger, entry, *c, p.clone()).map(Some),
        }
    }

    fn ledger_meta(&self, ledger: u64) -> Result<Option<LedgerMeta>> {
        Ok(self.metas.lock().unwrap_or_else(|e| e.into_inner()).get(&ledger).cloned())
    }

    fn last_entry(&self, ledger: u64) -> Result<Option<i64>> {
        let m = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        Ok(m.range((ledger, 0)..=(ledger, i64::MAX)).next_back().map(|((_, e), _)| *e))
    }

    fn delete_ledger(&self, ledger: u64) -> Result<()> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).retain(|(l, _), _| *l != ledger);
        self.metas.lock().unwrap_or_else(|e| e.into_inner()).remove(&ledger);
        Ok(())
    }

    fn ledgers(&self) -> Result<Vec<u64>> {
        let mut v: Vec<u64> = self.metas.lock().unwrap_or_else(|e| e.into_inner()).keys().copied().collect();
        v.extend(self.entries.lock().unwrap_or_else(|e| e.into_inner()).keys().map(|(l, _)| *l));
        v.sort_unstable();
        v.dedup();
        Ok(v)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn conformance() {
        super::super::suite::run_all(|_dir| super::MemStorage::new(), false);
    }
}
