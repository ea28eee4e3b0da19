//! The bookie's view of its ledgers: entry storage, the tail cache and per-ledger state
//! (fenced flag, LAC, master key), shared by the journals (which change it) and the request
//! handlers (which read it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::storage::cache::TailCache;
use crate::storage::{LedgerMeta, LedgerStorage, StoredEntry};

/// Storage, cache and ledger state.
pub struct Ledgers {
    /// The entry store.
    pub storage: Arc<dyn LedgerStorage>,
    /// Recently written entries.
    pub cache: TailCache,
    metas: Mutex<HashMap<u64, LedgerMeta>>,
}

impl Ledgers {
    /// Wraps a store.
    pub fn new(storage: Arc<dyn LedgerStorage>, cache_bytes: usize) -> Self {
        Ledgers { storage, cache: TailCache::new(cache_bytes), metas: Mutex::new(HashMap::new()) }
    }

    /// A ledger's state, if known.
    pub fn meta(&self, ledger: u64) -> Result<Option<LedgerMeta>> {
        if let Some(m) = self.metas.lock().unwrap_or_else(|e| e.into_inner()).get(&ledger) {
            return Ok(Some(m.clone()));
        }
        let m = self.storage.ledger_meta(ledger)?;
        if let Some(m) = &m {
            self.metas.lock().unwrap_or_else(|e| e.into_inner()).entry(ledger).or_insert_with(|| m.clone());
        }
        Ok(m)
    }

    /// Publishes states the journal has written.
    pub fn publish(&self, states: &[(u64, LedgerMeta)]) {
        let mut g = self.metas.lock().unwrap_or_else(|e| e.into_inner());
        for (l, m) in states {
            g.insert(*l, m.clone());
        }
    }

    /// The LAC the writer last told this bookie (-1 when unknown).
    pub fn lac(&self, ledger: u64) -> Result<i64> {
        Ok(self.meta(ledger)?.map(|m| m.lac).unwrap_or(-1))
    }

    /// One entry: the tail cache first, then storage.
    pub fn read_entry(&self, ledger: u64, entry: i64) -> Result<Option<StoredEntry>> {
        if let Some(e) = self.cache.get(ledger, entry) {
            return Ok(Some(e));
        }
        self.storage.get_entry(ledger, entry)
    }

    /// Entries of one ledger, as [`Ledgers::read_entry`] gives each, until `budget` payload
    /// bytes are read: results for a prefix of `entries` (see
    /// [`LedgerStorage::get_entries`]). Those not in the tail cache are read from storage
    /// together, so adjacent ones can be read at once.
    pub fn read_entries(&self, ledger: u64, entries: &[i64], budget: usize) -> Vec<Result<Option<StoredEntry>>> {
        let mut out = Vec::with_capacity(entries.len());
        let mut left = budget.max(1);
        while out.len() < entries.len() && left > 0 {
            let at = out.len();
            if let Some(e) = self.cache.get(ledger, entries[at]) {
                left = left.saturating_sub(e.payload.len());
                out.push(Ok(Some(e)));
                continue;
            }
            // At least the one just missed (it may have been cached since).
            let misses = entries[at..].iter().skip(1).take_while(|&&e| !self.cache.contains(ledger, e)).count() + 1;
            for r in self.storage.get_entries(ledger, &entries[at..at + misses], left) {
                if let Ok(Some(e)) = &r {
                    left = left.saturating_sub(e.payload.len());
                }
                out.push(r);
            }
        }
        out
    }

    /// Deletes a ledger everywhere.
    pub fn delete(&self, ledger: u64) -> Result<()> {
        self.metas.lock().unwrap_or_else(|e| e.into_inner()).remove(&ledger);
        self.cache.remove_ledger(ledger);
        self.storage.delete_ledger(ledger)
    }

    /// Ledgers known to this bookie.
    pub fn ledgers(&self) -> Result<Vec<u64>> {
        self.storage.ledgers()
    }
}
