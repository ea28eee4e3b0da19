//! The Raft log and vote in RocksDB.
//!
//! Appends go into RocksDB (readable at once; with `manual_wal_flush` the WAL record stays in
//! RocksDB's buffer) and their flush callbacks are handed to a syncer thread that calls
//! `flush_wal(true)` once for every group of callbacks waiting, then fires them: one write and
//! fdatasync covers many appends, and nothing is reported durable before it is.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::mpsc;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{RaftLogReader, Vote};
use rocksdb::{WriteBatch, WriteOptions, DB};

use super::{be64, blocking, cf, handle, read_be64, sto_read, sto_write};
use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

const VOTE: &[u8] = b"vote";
const PURGED: &[u8] = b"purged";
const COMMITTED: &[u8] = b"committed";

/// The Raft log store. Cheap to clone (readers share it).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    syncer: Arc<Syncer>,
    /// Purges wait until the state machine has applied what they remove (see `purge`).
    purge_guard: bool,
}

/// The WAL syncer thread and the way to it. When the last clone of the store goes, the
/// channel closes and the thread is joined, so its handle on the database is gone before the
/// store's owner drops its own: a thread left to close RocksDB on its own while the process
/// exits races RocksDB's static destructors, and the process aborts ("pthread lock: Invalid
/// argument").
/// `None` when the thread failed to start (appends then sync inline).
struct Syncer(Option<(mpsc::Sender<LogFlushed<TypeConfig>>, std::thread::JoinHandle<()>)>);

impl Drop for Syncer {
    fn drop(&mut self) {
        if let Some((tx, thread)) = self.0.take() {
            drop(tx);
            let _ = thread.join();
        }
    }
}

impl LogStore {
    /// Wraps the shared database and starts the WAL syncer thread, which ends (and is joined)
    /// when the last clone of the store is dropped.
    pub fn new(db: Arc<DB>) -> Self {
        let (tx, rx) = mpsc::channel::<LogFlushed<TypeConfig>>();
        let sync_db = db.clone();
        let spawned = std::thread::Builder::new().name("meta-wal-sync".into()).spawn(move || {
            let (mut syncs, mut appends) = (0u64, 0u64);
            while let Ok(first) = rx.recv() {
                let mut group = vec![first];
                group.extend(rx.try_iter());
                let res = sync_db.flush_wal(true);
                syncs += 1;
                appends += group.len() as u64;
                if syncs % 1000 == 0 {
                    tracing::debug!(syncs, appends, per_sync = appends as f64 / syncs as f64, "raft log group commit");
                }
                for cb in group {
                    let r = res.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string()));
                    cb.log_io_completed(r);
                }
            }
        });
        let syncer = match spawned {
            Ok(thread) => Syncer(Some((tx, thread))),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the WAL syncer thread; appends will sync inline");
                Syncer(None)
            }
        };
        LogStore { db, syncer: Arc::new(syncer), purge_guard: false }
    }

    /// Like [`Self::new`], with purges held back until the state machine's applied index
    /// covers them. A node uses this; the bare store (as openraft's conformance suite drives
    /// it, purging logs nothing was applied from) does not.
    pub fn guarded(db: Arc<DB>) -> Self {
        LogStore { purge_guard: true, ..Self::new(db) }
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        match self.db.get_cf(handle(&self.db, cf::RAFT), key).map_err(sto_read)? {
            Some(b) => Ok(Some(bincode::deserialize(&b).map_err(sto_read)?)),
            None => Ok(None),
        }
    }

    fn put_meta_sync<T: serde::Serialize>(&self, key: &[u8], v: &T) -> Result<(), StorageError> {
        let b = bincode::serialize(v).map_err(sto_write)?;
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.put_cf_opt(handle(&self.db, cf::RAFT), key, b, &wo).map_err(sto_write)
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StorageError> {
        let mut it = self.db.iterator_cf(handle(&self.db, cf::LOG), rocksdb::IteratorMode::End);
        match it.next() {
            Some(Ok((_, v))) => {
                let e: Entry = bincode::deserialize(&v).map_err(sto_read)?;
                Ok(Some(e.log_id))
            }
            Some(Err(e)) => Err(sto_read(e)),
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end: Bound<u64> = range.end_bound().cloned();
        let db = self.db.clone();
        blocking(move || {
            let mut out = Vec::new();
            let it = db.iterator_cf(
                handle(&db, cf::LOG),
                rocksdb::IteratorMode::From(&be64(start), rocksdb::Direction::Forward),
            );
            for item in it {
                let (k, v) = item.map_err(sto_read)?;
                let idx = read_be64(&k).unwrap_or(u64::MAX);
                let within = match end {
                    Bound::Included(e) => idx <= e,
                    Bound::Excluded(e) => idx < e,
                    Bound::Unbounded => true,
                };
                if !within {
                    break;
                }
                out.push(bincode::deserialize(&v).map_err(sto_read)?);
            }
            Ok(out)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let purged: Option<LogId> = self.get_meta(PURGED)?;
        let last = self.last_entry_id()?.or(purged);
        Ok(LogState { last_purged_log_id: purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let store = self.clone();
        let vote = *vote;
        blocking(move || store.put_meta_sync(VOTE, &vote)).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: openraft only uses it to re-apply faster after a restart.
        let b = bincode::serialize(&committed).map_err(sto_write)?;
        self.db.put_cf(handle(&self.db, cf::RAFT), COMMITTED, b).map_err(sto_write)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = WriteBatch::default();
        let h = handle(&self.db, cf::LOG);
        for e in entries {
            batch.put_cf(h, be64(e.log_id.index), bincode::serialize(&e).map_err(sto_write)?);
        }
        // With `manual_wal_flush` this write only touches memory (memtable and WAL buffer), so
        // it runs inline: the syncer's `flush_wal(true)` writes and fdatasyncs the buffer.
        self.db.write(batch).map_err(sto_write)?;
        let unsent = match &self.syncer.0 {
            Some((tx, _)) => tx.send(callback).err().map(|mpsc::SendError(cb)| cb),
            None => Some(callback),
        };
        if let Some(cb) = unsent {
            // No syncer (its thread failed to start): sync here.
            let r = self.db.flush_wal(true).map_err(|e| std::io::Error::other(e.to_string()));
            cb.log_io_completed(r);
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let db = self.db.clone();
        blocking(move || {
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(handle(&db, cf::LOG), be64(log_id.index), be64(u64::MAX));
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            db.write_opt(batch, &wo).map_err(sto_write)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let db = self.db.clone();
        let guard = self.purge_guard;
        blocking(move || {
            // openraft may ask to purge up to a snapshot whose installation is still running in
            // the state machine worker. The entries may only go once the applied state covers
            // them, so wait for it, then make it durable.
            let mut waited = std::time::Instant::now();
            while guard && applied_index(&db)? < log_id.index {
                std::thread::sleep(std::time::Duration::from_millis(5));
                if waited.elapsed() > std::time::Duration::from_secs(10) {
                    tracing::warn!(upto = log_id.index, "purge waits for the state machine to apply");
                    waited = std::time::Instant::now();
                }
            }
            db.flush_wal(true).map_err(sto_write)?;
            let mut batch = WriteBatch::default();
            batch.put_cf(handle(&db, cf::RAFT), PURGED, bincode::serialize(&log_id).map_err(sto_write)?);
            batch.delete_range_cf(handle(&db, cf::LOG), be64(0), be64(log_id.index + 1));
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            db.write_opt(batch, &wo).map_err(sto_write)
        })
        .await
    }
}

/// The state machine's applied index as stored (0 when nothing was applied).
fn applied_index(db: &DB) -> Result<u64, StorageError> {
    let applied: Option<LogId> =
        match db.get_cf(handle(db, cf::SM_META), crate::store::sm::APPLIED).map_err(sto_read)? {
            Some(b) => bincode::deserialize(&b).map_err(sto_read)?,
            None => None,
        };
    Ok(applied.map(|l| l.index).unwrap_or(0))
}
