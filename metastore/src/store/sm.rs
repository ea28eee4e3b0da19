//! The replicated state machine: keys with versions, sessions and their ephemeral keys, id
//! sequences, the watch history and the request-dedup table, all in RocksDB column families.
//!
//! [`SmShared`] is the read side that gRPC handlers use directly (RocksDB is thread-safe);
//! [`StateMachine`] is the write side owned by openraft. After each applied batch the in-memory
//! mirrors (applied revision, sessions, event floor) are updated and the batch's events are
//! broadcast to watchers, in that order, so a watcher that subscribes and then reads the
//! revision never misses an event.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{EntryPayload, StoredMembership};
use rocksdb::DB;
use tokio::sync::broadcast;

use super::apply::Applier;
use super::snapshot::{self, SnapshotBuilder};
use super::{be64, blocking, cf, handle, read_be64, sto_read};
use crate::error::MetaError;
use crate::types::{
    index_of, last_revision_of, revision_of, CommandResult, Entry, Event, EventBatch, KeyValue, LogId, NodeId,
    StorageError, StoredValue, TypeConfig,
};

pub(crate) const APPLIED: &[u8] = b"applied";
pub(crate) const MEMBERSHIP: &[u8] = b"membership";
pub(crate) const EVENT_FLOOR: &[u8] = b"event_floor";

/// What watchers are told after each applied batch.
#[derive(Clone, Debug)]
pub enum Notify {
    /// Events of one revision.
    Batch(Arc<EventBatch>),
    /// The state was replaced by a snapshot: re-read the history from where you are.
    Reset,
}

/// Retention settings of the state machine.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// How many log entries' worth of watch history to keep.
    pub event_revisions: u64,
}

/// Read access to the state machine, shared with the API handlers.
pub struct SmShared {
    pub(crate) db: Arc<DB>,
    applied_rev: AtomicU64,
    event_floor: AtomicU64,
    sessions: Mutex<HashMap<u64, u64>>,
    notify: broadcast::Sender<Notify>,
    pub(crate) retention: Retention,
}

impl SmShared {
    /// The highest revision of the last applied entry.
    pub fn revision(&self) -> u64 {
        self.applied_rev.load(Ordering::Acquire)
    }

    /// The oldest revision whose events are still kept.
    pub fn event_floor(&self) -> u64 {
        self.event_floor.load(Ordering::Acquire)
    }

    /// Subscribe to applied batches. Subscribe *before* reading [`Self::revision`].
    pub fn subscribe(&self) -> broadcast::Receiver<Notify> {
        self.notify.subscribe()
    }

    /// Open sessions and their TTLs.
    pub fn sessions(&self) -> HashMap<u64, u64> {
        self.sessions.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Opens a session as if its creation had been applied (tests of the lease logic).
    #[cfg(test)]
    pub(crate) fn open_session_for_test(&self, id: u64, ttl_ms: u64) {
        if let Ok(mut s) = self.sessions.lock() {
            s.insert(id, ttl_ms);
        }
    }

    /// A session's TTL if it is open.
    pub fn session_ttl(&self, id: u64) -> Option<u64> {
        self.sessions.lock().ok().and_then(|s| s.get(&id).copied())
    }

    /// Reads one key.
    pub fn get(&self, key: &str) -> Result<Option<StoredValue>, MetaError> {
        match self.db.get_cf(handle(&self.db, cf::KV), key.as_bytes()).map_err(MetaError::storage("reading a key"))? {
            Some(b) => Ok(Some(bincode::deserialize(&b).map_err(MetaError::codec("decoding a stored value"))?)),
            None => Ok(None),
        }
    }

    /// Keys with `prefix` strictly after `start_after`, at most `limit`; `true` if more follow.
    pub fn range(
        &self,
        prefix: &str,
        start_after: &str,
        limit: usize,
        keys_only: bool,
    ) -> Result<(Vec<KeyValue>, bool), MetaError> {
        let from = if start_after.as_bytes() > prefix.as_bytes() { start_after } else { prefix };
        let it = self.db.iterator_cf(
            handle(&self.db, cf::KV),
            rocksdb::IteratorMode::From(from.as_bytes(), rocksdb::Direction::Forward),
        );
        let mut out = Vec::new();
        for item in it {
            let (k, v) = item.map_err(MetaError::storage("scanning keys"))?;
            if !k.starts_with(prefix.as_bytes()) {
                break;
            }
            if !start_after.is_empty() && &*k <= start_after.as_bytes() {
                continue;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            let key = String::from_utf8_lossy(&k).into_owned();
            let mut value: StoredValue =
                bincode::deserialize(&v).map_err(MetaError::codec("decoding a stored value"))?;
            if keys_only {
                value.value.clear();
            }
            out.push(KeyValue { key, value });
        }
        Ok((out, false))
    }

    /// Events with revisions in `from..=to` whose keys start with `prefix`, grouped by revision
    /// (revisions with no matching event are left out).
    pub fn events_between(&self, from: u64, to: u64, prefix: &str) -> Result<Vec<EventBatch>, MetaError> {
        let mut out: Vec<EventBatch> = Vec::new();
        if from > to {
            return Ok(out);
        }
        let start = {
            let mut k = be64(from).to_vec();
            k.extend_from_slice(&0u32.to_be_bytes());
            k
        };
        let it = self.db.iterator_cf(
            handle(&self.db, cf::EVENTS),
            rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
        );
        for item in it {
            let (k, v) = item.map_err(MetaError::storage("reading watch history"))?;
            let rev = read_be64(&k).unwrap_or(u64::MAX);
            if rev > to {
                break;
            }
            let ev: Event = bincode::deserialize(&v).map_err(MetaError::codec("decoding an event"))?;
            if !ev.key.starts_with(prefix) {
                continue;
            }
            match out.last_mut() {
                Some(b) if b.revision == rev => b.events.push(ev),
                _ => out.push(EventBatch { revision: rev, events: vec![ev] }),
            }
        }
        Ok(out)
    }

    /// Reloads the mirrors from the database (at start and after a snapshot install).
    fn reload(&self) -> Result<(), StorageError> {
        let meta = handle(&self.db, cf::SM_META);
        let applied: Option<LogId> = match self.db.get_cf(meta, APPLIED).map_err(sto_read)? {
            Some(b) => bincode::deserialize(&b).map_err(sto_read)?,
            None => None,
        };
        let floor = self.db.get_cf(meta, EVENT_FLOOR).map_err(sto_read)?.and_then(|b| read_be64(&b)).unwrap_or(0);
        let mut sessions = HashMap::new();
        for item in self.db.iterator_cf(handle(&self.db, cf::SESSIONS), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(sto_read)?;
            if let (Some(id), Some(ttl)) = (read_be64(&k), read_be64(&v)) {
                sessions.insert(id, ttl);
            }
        }
        self.applied_rev.store(last_revision_of(applied.map(|l| l.index).unwrap_or(0)), Ordering::Release);
        self.event_floor.store(floor, Ordering::Release);
        if let Ok(mut s) = self.sessions.lock() {
            *s = sessions;
        }
        Ok(())
    }

    pub(crate) fn raise_event_floor(&self, floor: u64) {
        self.event_floor.fetch_max(floor, Ordering::AcqRel);
    }

    pub(crate) fn publish(
        &self,
        applied: u64,
        floor: u64,
        sessions: &HashMap<u64, Option<u64>>,
        events: Vec<EventBatch>,
    ) {
        if let Ok(mut s) = self.sessions.lock() {
            for (id, ttl) in sessions {
                match ttl {
                    Some(t) => s.insert(*id, *t),
                    None => s.remove(id),
                };
            }
        }
        self.event_floor.store(floor, Ordering::Release);
        self.applied_rev.store(applied, Ordering::Release);
        for b in events {
            // No receivers is fine: nobody is watching.
            let _ = self.notify.send(Notify::Batch(Arc::new(b)));
        }
    }

    pub(crate) fn reset(&self) -> Result<(), StorageError> {
        self.reload()?;
        let _ = self.notify.send(Notify::Reset);
        Ok(())
    }
}

/// The openraft state machine.
pub struct StateMachine {
    shared: Arc<SmShared>,
    snapshot_dir: PathBuf,
}

impl StateMachine {
    /// Opens the state machine over `db`; snapshots are kept in `snapshot_dir`.
    pub fn new(db: Arc<DB>, snapshot_dir: PathBuf, retention: Retention) -> Result<Self, StorageError> {
        std::fs::create_dir_all(&snapshot_dir).map_err(super::sto_write)?;
        let (notify, _) = broadcast::channel(4096);
        let shared = Arc::new(SmShared {
            db,
            applied_rev: AtomicU64::new(0),
            event_floor: AtomicU64::new(0),
            sessions: Mutex::new(HashMap::new()),
            notify,
            retention,
        });
        shared.reload()?;
        // A crash between saving a received snapshot and installing it: finish the install.
        let applied = index_of(shared.revision());
        let ahead =
            snapshot::load_meta(&snapshot_dir)?.is_some_and(|m| m.last_log_id.is_some_and(|l| l.index > applied));
        if let Some(snap) = if ahead { snapshot::load(&snapshot_dir)? } else { None } {
            tracing::info!(snapshot = ?snap.meta.last_log_id, applied, "installing the saved snapshot left half-done");
            snapshot::install(&shared.db, &snap.meta, snap.snapshot.get_ref())?;
            shared.reload()?;
        }
        Ok(StateMachine { shared, snapshot_dir })
    }

    /// The read side.
    pub fn shared(&self) -> Arc<SmShared> {
        self.shared.clone()
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, openraft::BasicNode>), StorageError> {
        let db = self.shared.db.clone();
        blocking(move || {
            let meta = handle(&db, cf::SM_META);
            let applied = match db.get_cf(meta, APPLIED).map_err(sto_read)? {
                Some(b) => bincode::deserialize(&b).map_err(sto_read)?,
                None => None,
            };
            let membership = match db.get_cf(meta, MEMBERSHIP).map_err(sto_read)? {
                Some(b) => bincode::deserialize(&b).map_err(sto_read)?,
                None => StoredMembership::default(),
            };
            Ok((applied, membership))
        })
        .await
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<CommandResult>>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let shared = self.shared.clone();
        blocking(move || {
            let mut applier = Applier::new(&shared);
            let mut results = Vec::with_capacity(entries.len());
            for e in entries {
                let index = e.log_id.index;
                let res = match e.payload {
                    EntryPayload::Blank => Vec::new(),
                    EntryPayload::Membership(m) => {
                        applier.set_membership(StoredMembership::new(Some(e.log_id), m));
                        Vec::new()
                    }
                    EntryPayload::Normal(p) => p
                        .commands
                        .into_iter()
                        .enumerate()
                        .map(|(i, cmd)| applier.apply(revision_of(index, i), cmd))
                        .collect::<Result<Vec<_>, _>>()?,
                };
                applier.set_applied(e.log_id);
                results.push(res);
            }
            applier.commit()?;
            Ok(results)
        })
        .await
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder::new(self.shared.db.clone(), self.snapshot_dir.clone())
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<std::io::Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(std::io::Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<std::io::Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let shared = self.shared.clone();
        let dir = self.snapshot_dir.clone();
        let meta = meta.clone();
        blocking(move || {
            let data = snapshot.into_inner();
            // File first: a crash between the two leaves a snapshot ahead of the state, which
            // start-up installs; the other order would leave state that no snapshot describes.
            snapshot::save(&dir, &meta, &data)?;
            snapshot::install(&shared.db, &meta, &data)?;
            shared.reset()
        })
        .await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let dir = self.snapshot_dir.clone();
        blocking(move || snapshot::load(&dir)).await
    }
}
