//! Entry storage: where entries live once the journal has made them durable.
//!
//! [`LedgerStorage`] is the contract every implementation keeps ([`entrylog::EntryLogStorage`]
//! by default, [`rocks::RocksStorage`] as the alternative, [`mem::MemStorage`] for tests); [`suite`] checks it against each. The journal is
//! the write-ahead log, so implementations need not make a write durable until
//! [`LedgerStorage::flush`]; after `flush` returns, everything written before it survives a
//! crash. Entries are checked against their checksum on every read: a stored entry that fails
//! it is [`BookieError::Corrupt`], never "absent".

pub mod cache;
pub mod entrylog;
pub mod mem;
pub mod rocks;
#[cfg(test)]
pub mod suite;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use crate::checksum::entry_checksum;
use crate::config::{StorageEngine, StorageSettings};
use crate::error::{BookieError, Result};

/// Per-ledger state a bookie keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerMeta {
    /// Normal adds are refused once set.
    pub fenced: bool,
    /// Highest LAC a writer piggybacked (-1: none).
    pub lac: i64,
    /// The ledger's master key (empty until the first add or fence).
    pub master_key: Vec<u8>,
}

impl LedgerMeta {
    /// A ledger this bookie has just heard of.
    pub fn new(master_key: &[u8]) -> Self {
        LedgerMeta { fenced: false, lac: -1, master_key: master_key.to_vec() }
    }

    /// Binary form: `[fenced u8][lac i64 LE][key]`.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(9 + self.master_key.len());
        v.push(u8::from(self.fenced));
        v.extend_from_slice(&self.lac.to_le_bytes());
        v.extend_from_slice(&self.master_key);
        v
    }

    /// Parses [`LedgerMeta::encode`]'s output.
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() < 9 || b[0] > 1 {
            return None;
        }
        let mut lac = [0u8; 8];
        lac.copy_from_slice(&b[1..9]);
        Some(LedgerMeta { fenced: b[0] == 1, lac: i64::from_le_bytes(lac), master_key: b[9..].to_vec() })
    }
}

/// An entry to store.
#[derive(Clone, Debug)]
pub struct EntryWrite {
    /// Ledger id.
    pub ledger: u64,
    /// Entry id (>= 0).
    pub entry: i64,
    /// The writer's checksum (see [`crate::checksum`]).
    pub checksum: u32,
    /// Payload.
    pub payload: Bytes,
}

/// Where [`LedgerStorage::write_ref`] put a payload, as the store encodes it.
pub type EntryRef = [u8; 20];

/// Finishes a [`LedgerStorage::sync_refs`].
pub type RefSync = Box<dyn FnOnce() -> Result<()> + Send>;

/// A stored entry, checksum verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEntry {
    /// The writer's checksum.
    pub checksum: u32,
    /// Payload.
    pub payload: Bytes,
}

impl StoredEntry {
    /// Verifies the checksum; a mismatch is corruption.
    pub fn verified(ledger: u64, entry: i64, checksum: u32, payload: Bytes) -> Result<Self> {
        if entry_checksum(ledger, entry, &payload) != checksum {
            return Err(BookieError::Corrupt { ledger, entry });
        }
        Ok(StoredEntry { checksum, payload })
    }
}

/// What a bookie's entry store must do.
pub trait LedgerStorage: Send + Sync + 'static {
    /// Stores entries and ledger states in one atomic batch (not yet durable).
    fn write(&self, entries: &[EntryWrite], states: &[(u64, LedgerMeta)]) -> Result<()>;
    /// Stores entries and ledger states like [`LedgerStorage::write`], but leaves the entries
    /// unindexed (unreadable from the store) and says where each went, in order, for
    /// [`LedgerStorage::index_refs`] to index once their journal records are durable (or
    /// [`LedgerStorage::forget_refs`] to give up). An index entry written earlier could reach
    /// the disk before the record it points at (RocksDB writes its memtable out whenever it
    /// fills) and, after a power loss that took both that record and its journal record, make
    /// the entry read as corrupt instead of absent. `None` (the default): the store keeps
    /// entries whole and has written and indexed them like `write`.
    fn write_unindexed(&self, entries: &[EntryWrite], states: &[(u64, LedgerMeta)]) -> Result<Option<Vec<EntryRef>>> {
        self.write(entries, states).map(|()| None)
    }
    /// One entry, verified; `None` when it was never stored (or its ledger was deleted).
    fn get_entry(&self, ledger: u64, entry: i64) -> Result<Option<StoredEntry>>;
    /// Entries of one ledger, each as [`LedgerStorage::get_entry`] gives it, in the order
    /// asked, until `budget` payload bytes have been read: the results are for a prefix of
    /// `entries` (at least one when any is asked). A store may read adjacent entries at once.
    fn get_entries(&self, ledger: u64, entries: &[i64], budget: usize) -> Vec<Result<Option<StoredEntry>>> {
        let mut out = Vec::with_capacity(entries.len());
        let mut left = budget.max(1);
        for &entry in entries {
            if left == 0 {
                break;
            }
            let r = self.get_entry(ledger, entry);
            if let Ok(Some(e)) = &r {
                left = left.saturating_sub(e.payload.len());
            }
            out.push(r);
        }
        out
    }
    /// A ledger's state, if the bookie knows the ledger.
    fn ledger_meta(&self, ledger: u64) -> Result<Option<LedgerMeta>>;
    /// Highest stored entry id of a ledger.
    fn last_entry(&self, ledger: u64) -> Result<Option<i64>>;
    /// Removes a ledger's entries and state.
    fn delete_ledger(&self, ledger: u64) -> Result<()>;
    /// Every ledger with state or entries here, ascending.
    fn ledgers(&self) -> Result<Vec<u64>>;
    /// Makes everything written so far durable.
    fn flush(&self) -> Result<()>;
    /// Stores one entry's payload now and says where it is, so the journal can record that
    /// instead of the payload and large payloads are written once. `None` (the default): the
    /// store cannot, and the journal carries the payload. The entry is readable once
    /// [`LedgerStorage::index_refs`] has indexed it (which the journal does only once its
    /// record and the payload are durable), and durable once a [`LedgerStorage::sync_refs`]
    /// begun after this returned has finished.
    fn write_ref(&self, _entry: &EntryWrite) -> Result<Option<EntryRef>> {
        Ok(None)
    }
    /// Indexes entries that [`LedgerStorage::write_ref`] or
    /// [`LedgerStorage::write_unindexed`] stored, as `(ledger, entry, where)`, except those of
    /// ledgers deleted since. Every entry stored so is passed here or to
    /// [`LedgerStorage::forget_refs`] once (a store may keep its place from being reclaimed
    /// until then).
    fn index_refs(&self, _refs: &[(u64, i64, EntryRef)]) -> Result<()> {
        Ok(())
    }
    /// Entries [`LedgerStorage::write_ref`] or [`LedgerStorage::write_unindexed`] stored that
    /// will never be indexed: their adds failed (a journal write or sync failed).
    fn forget_refs(&self, _refs: &[(u64, i64, EntryRef)]) {}
    /// Starts making every payload [`LedgerStorage::write_ref`] stored so far durable and
    /// returns what finishes it (waits for it): the journal runs its own fdatasync in between.
    fn sync_refs(&self) -> Result<RefSync> {
        Ok(Box::new(|| Ok(())))
    }
    /// Journal replay: indexes the entry a journal record points at, if the payload is still
    /// there, matches, and the entry is not stored already. False when it is not there (an
    /// add that was never acknowledged, or a ledger deleted since), or when the store does not
    /// keep references.
    fn adopt_ref(&self, _ledger: u64, _entry: i64, _checksum: u32, _at: &EntryRef) -> Result<bool> {
        Ok(false)
    }
    /// Bytes of files the store keeps for reuse: in use for the file system, free for the
    /// store (the read-only threshold counts them as free).
    fn reusable_bytes(&self) -> u64 {
        0
    }
    /// The journals' replay is flushed: background work that moves or frees stored data may
    /// start. Before that, the store's files must stay as they are: the index the replay
    /// rebuilds is not all there yet, and what it lacks looks dead.
    fn replay_done(&self) {}
    /// Gauges for `/metrics`: name, help, value.
    fn gauges(&self) -> Vec<(&'static str, &'static str, f64)> {
        Vec::new()
    }
}

/// Opens the entry store in `dir` with the engine it was created with, or (a new directory)
/// the configured one.
pub fn open(dir: &Path, settings: &StorageSettings) -> Result<Arc<dyn LedgerStorage>> {
    let engine = match (dir.join("entries.db").exists(), dir.join("index.db").exists()) {
        (true, false) => StorageEngine::Rocksdb,
        (false, true) => StorageEngine::EntryLogs,
        _ => settings.engine,
    };
    if engine != settings.engine {
        tracing::warn!(configured = ?settings.engine, found = ?engine, dir = %dir.display(),
            "the ledger directory was created with another storage engine; keeping it");
    }
    Ok(match engine {
        StorageEngine::EntryLogs => Arc::new(entrylog::EntryLogStorage::open(dir, settings)?),
        StorageEngine::Rocksdb => Arc::new(rocks::RocksStorage::open(dir, settings)?),
    })
}

/// Storage key of an entry: ledger and entry id big-endian, so keys sort by (ledger, entry).
pub fn entry_key(ledger: u64, entry: i64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&ledger.to_be_bytes());
    k[8..].copy_from_slice(&(entry as u64).to_be_bytes());
    k
}

/// Splits an entry key.
pub fn parse_entry_key(k: &[u8]) -> Option<(u64, i64)> {
    if k.len() != 16 {
        return None;
    }
    let mut l = [0u8; 8];
    let mut e = [0u8; 8];
    l.copy_from_slice(&k[..8]);
    e.copy_from_slice(&k[8..]);
    Some((u64::from_be_bytes(l), u64::from_be_bytes(e) as i64))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A ledger directory keeps the engine it was created with, whatever the setting says
    /// later; a new directory gets the configured one.
    #[test]
    fn a_directory_keeps_its_engine() {
        for (created, configured_later) in
            [(StorageEngine::Rocksdb, StorageEngine::EntryLogs), (StorageEngine::EntryLogs, StorageEngine::Rocksdb)]
        {
            let d = tempfile::tempdir().unwrap();
            let settings = |engine| StorageSettings { engine, compaction_interval_ms: 0, ..Default::default() };
            let payload = Bytes::from_static(b"kept");
            {
                let s = open(d.path(), &settings(created)).unwrap();
                let checksum = entry_checksum(1, 0, &payload);
                s.write(&[EntryWrite { ledger: 1, entry: 0, checksum, payload: payload.clone() }], &[]).unwrap();
                s.flush().unwrap();
            }
            let marker = match created {
                StorageEngine::Rocksdb => "entries.db",
                StorageEngine::EntryLogs => "index.db",
            };
            assert!(d.path().join(marker).exists(), "{created:?} made {marker}");
            let s = open(d.path(), &settings(configured_later)).unwrap();
            assert_eq!(s.get_entry(1, 0).unwrap().unwrap().payload, payload, "{created:?} then {configured_later:?}");
            drop(s);
            let other = match configured_later {
                StorageEngine::Rocksdb => "entries.db",
                StorageEngine::EntryLogs => "index.db",
            };
            assert!(!d.path().join(other).exists(), "no {other} was created next to {marker}");
        }
    }
}
