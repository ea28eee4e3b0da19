//! The bookie's view of its ledgers: entry storage, the tail cache and per-ledger state
//! (fenced flag, LAC, master key), shared by the journals (which change it) and the request
//! handlers (which read it).
//!
//! A journal's writer hands each batch to the entry store on another thread and acks it once
//! the journal is synced, so an acknowledged entry may not be in the store yet: until it is,
//! reads find it among the batches in flight to the store (when the tail cache no longer has
//! it).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::error::Result;
use crate::storage::cache::TailCache;
use crate::storage::{EntryWrite, LedgerMeta, LedgerStorage, StoredEntry};

/// Batches handed to the entry store and not yet written there, by sequence number.
#[derive(Default)]
struct InFlight {
    next: u64,
    batches: VecDeque<(u64, Arc<Vec<EntryWrite>>)>,
}

/// Storage, cache and ledger state.
pub struct Ledgers {
    /// The entry store.
    pub storage: Arc<dyn LedgerStorage>,
    /// Recently written entries.
    pub cache: TailCache,
    metas: Mutex<HashMap<u64, LedgerMeta>>,
    in_flight: Mutex<InFlight>,
    stored: Condvar,
}

impl Ledgers {
    /// Wraps a store.
    pub fn new(storage: Arc<dyn LedgerStorage>, cache_bytes: usize) -> Self {
        Ledgers {
            storage,
            cache: TailCache::new(cache_bytes),
            metas: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(InFlight::default()),
            stored: Condvar::new(),
        }
    }

    /// Records a batch on its way to the entry store (readable from here until
    /// [`Self::end_store`]); returns its sequence number.
    pub fn begin_store(&self, entries: Arc<Vec<EntryWrite>>) -> u64 {
        let mut g = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let seq = g.next;
        g.next += 1;
        g.batches.push_back((seq, entries));
        seq
    }

    /// The batch `seq` is in the entry store (or failed to get there).
    pub fn end_store(&self, seq: u64) {
        let mut g = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        g.batches.retain(|(s, _)| *s != seq);
        self.stored.notify_all();
    }

    /// Waits until every batch handed to the entry store so far is written there (at most
    /// `limit`); `false` if some still were not.
    pub fn wait_stored(&self, limit: Duration) -> bool {
        let mut g = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let upto = g.next;
        let deadline = std::time::Instant::now() + limit;
        while g.batches.front().is_some_and(|(s, _)| *s < upto) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self.stored.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }

    fn in_flight_entry(&self, ledger: u64, entry: i64) -> Option<StoredEntry> {
        let g = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = g.batches.iter().rev().flat_map(|(_, b)| b.iter().rev());
        all.find(|e| e.ledger == ledger && e.entry == entry)
            .map(|e| StoredEntry { checksum: e.checksum, payload: e.payload.clone() })
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

    /// One entry: the tail cache first, then the batches on their way to the store, then the
    /// store. (A batch leaves the in-flight list only after it is written to the store, so an
    /// entry missed in the list is found in the store.)
    pub fn read_entry(&self, ledger: u64, entry: i64) -> Result<Option<StoredEntry>> {
        if let Some(e) = self.cache.get(ledger, entry) {
            return Ok(Some(e));
        }
        if let Some(e) = self.in_flight_entry(ledger, entry) {
            return Ok(Some(e));
        }
        self.storage.get_entry(ledger, entry)
    }

    /// Deletes a ledger everywhere, after the writes already on their way to the store (so
    /// none of them brings its entries back).
    pub fn delete(&self, ledger: u64) -> Result<()> {
        if !self.wait_stored(Duration::from_secs(30)) {
            tracing::warn!(ledger, "entry store writes still pending after 30 s; deleting the ledger anyway");
        }
        self.metas.lock().unwrap_or_else(|e| e.into_inner()).remove(&ledger);
        self.cache.remove_ledger(ledger);
        self.storage.delete_ledger(ledger)
    }

    /// Ledgers known to this bookie.
    pub fn ledgers(&self) -> Result<Vec<u64>> {
        self.storage.ledgers()
    }
}
