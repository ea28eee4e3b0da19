//! Applying a batch of committed commands: one RocksDB write batch per openraft `apply` call,
//! with an overlay so later commands in the batch see the effects of earlier ones.
//!
//! Everything here is deterministic in the entries it is given, so every replica ends in the
//! same state with the same versions, events and answers.

use std::collections::{BTreeMap, HashMap};

use openraft::StoredMembership;
use rocksdb::WriteBatch;

use super::sm::{SmShared, APPLIED, EVENT_FLOOR, MEMBERSHIP};
use super::{be64, cf, handle, read_be64, sto_read, sto_write};
use crate::types::{
    index_of, last_revision_of, revision_of, Command, CommandResult, Event, EventBatch, LogId, NodeId, Op, Outcome,
    RequestKey, StorageError, StoredValue, TxnOp,
};

/// How often (in log entries) old events and dedup answers are pruned.
const PRUNE_EVERY: u64 = 1024;

/// For how many log entries a request's answer is returned to its retries. A cluster-wide
/// constant: whether a retry is a duplicate must not depend on a node's settings or on when it
/// happened to prune, or replicas would diverge.
pub const DEDUP_WINDOW: u64 = 100_000;

pub(crate) struct Applier<'a> {
    sm: &'a SmShared,
    kv: HashMap<String, Option<StoredValue>>,
    counters: HashMap<String, u64>,
    sessions: HashMap<u64, Option<u64>>,
    session_keys: HashMap<u64, BTreeMap<String, bool>>,
    dedup: HashMap<RequestKey, CommandResult>,
    events: Vec<EventBatch>,
    applied: Option<LogId>,
    membership: Option<StoredMembership<NodeId, openraft::BasicNode>>,
}

impl<'a> Applier<'a> {
    pub(crate) fn new(sm: &'a SmShared) -> Self {
        Applier {
            sm,
            kv: HashMap::new(),
            counters: HashMap::new(),
            sessions: HashMap::new(),
            session_keys: HashMap::new(),
            dedup: HashMap::new(),
            events: Vec::new(),
            applied: None,
            membership: None,
        }
    }

    pub(crate) fn set_applied(&mut self, id: LogId) {
        self.applied = Some(id);
    }

    pub(crate) fn set_membership(&mut self, m: StoredMembership<NodeId, openraft::BasicNode>) {
        self.membership = Some(m);
    }

    fn db(&self) -> &rocksdb::DB {
        &self.sm.db
    }

    fn get_kv(&self, key: &str) -> Result<Option<StoredValue>, StorageError> {
        if let Some(v) = self.kv.get(key) {
            return Ok(v.clone());
        }
        match self.db().get_cf(handle(self.db(), cf::KV), key.as_bytes()).map_err(sto_read)? {
            Some(b) => Ok(Some(bincode::deserialize(&b).map_err(sto_read)?)),
            None => Ok(None),
        }
    }

    fn session_exists(&self, id: u64) -> Result<bool, StorageError> {
        if let Some(v) = self.sessions.get(&id) {
            return Ok(v.is_some());
        }
        Ok(self.db().get_cf(handle(self.db(), cf::SESSIONS), be64(id)).map_err(sto_read)?.is_some())
    }

    fn version_of(&self, key: &str) -> Result<u64, StorageError> {
        Ok(self.get_kv(key)?.map(|v| v.version).unwrap_or(0))
    }

    fn emit(&mut self, rev: u64, ev: Event) {
        match self.events.last_mut() {
            Some(b) if b.revision == rev => b.events.push(ev),
            _ => self.events.push(EventBatch { revision: rev, events: vec![ev] }),
        }
    }

    fn bind(&mut self, session: u64, key: &str, bound: bool) {
        self.session_keys.entry(session).or_default().insert(key.to_owned(), bound);
    }

    fn put(&mut self, rev: u64, key: String, value: Vec<u8>, session: u64) -> Result<u64, StorageError> {
        let prev = self.get_kv(&key)?;
        if let Some(p) = &prev {
            if p.session != 0 && p.session != session {
                self.bind(p.session, &key, false);
            }
        }
        if session != 0 {
            self.bind(session, &key, true);
        }
        let sv = StoredValue {
            value,
            version: rev,
            create_revision: prev.map(|p| p.create_revision).unwrap_or(rev),
            session,
        };
        self.emit(rev, Event { key: key.clone(), value: Some(sv.clone()), session });
        self.kv.insert(key, Some(sv));
        Ok(rev)
    }

    fn delete(&mut self, rev: u64, key: &str) -> Result<bool, StorageError> {
        let Some(prev) = self.get_kv(key)? else {
            return Ok(false);
        };
        if prev.session != 0 {
            self.bind(prev.session, key, false);
        }
        self.emit(rev, Event { key: key.to_owned(), value: None, session: prev.session });
        self.kv.insert(key.to_owned(), None);
        Ok(true)
    }

    fn keys_of_session(&self, id: u64) -> Result<Vec<String>, StorageError> {
        let mut keys: BTreeMap<String, bool> = BTreeMap::new();
        let prefix = be64(id);
        let it = self.db().iterator_cf(
            handle(self.db(), cf::SESSION_KEYS),
            rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward),
        );
        for item in it {
            let (k, _) = item.map_err(sto_read)?;
            if !k.starts_with(&prefix) {
                break;
            }
            keys.insert(String::from_utf8_lossy(&k[8..]).into_owned(), true);
        }
        if let Some(overlay) = self.session_keys.get(&id) {
            for (k, bound) in overlay {
                keys.insert(k.clone(), *bound);
            }
        }
        Ok(keys.into_iter().filter(|(_, b)| *b).map(|(k, _)| k).collect())
    }

    /// Applies one command at revision `rev`.
    pub(crate) fn apply(&mut self, rev: u64, cmd: Command) -> Result<CommandResult, StorageError> {
        if let Some(req) = cmd.request {
            let remembered = match self.dedup.get(&req) {
                Some(r) => Some(r.clone()),
                None => match self.db().get_cf(handle(self.db(), cf::DEDUP), dedup_key(req)).map_err(sto_read)? {
                    Some(b) => Some(bincode::deserialize::<CommandResult>(&b).map_err(sto_read)?),
                    None => None,
                },
            };
            // Rows past the window may linger until pruned; they never count.
            if let Some(r) = remembered.filter(|r| index_of(rev) - index_of(r.revision) < DEDUP_WINDOW) {
                return Ok(r);
            }
        }
        let outcome = self.apply_op(rev, cmd.op)?;
        let result = CommandResult { revision: rev, outcome };
        if let Some(req) = cmd.request {
            self.dedup.insert(req, result.clone());
        }
        Ok(result)
    }

    fn apply_op(&mut self, rev: u64, op: Op) -> Result<Outcome, StorageError> {
        Ok(match op {
            Op::Put { key, value, expected, session } => {
                if let Some(exp) = expected {
                    let actual = self.version_of(&key)?;
                    if actual != exp {
                        return Ok(Outcome::BadVersion { key, expected: exp, actual });
                    }
                }
                if session != 0 && !self.session_exists(session)? {
                    return Ok(Outcome::NoSuchSession(session));
                }
                Outcome::Put { version: self.put(rev, key, value, session)? }
            }
            Op::Delete { key, expected } => {
                if let Some(exp) = expected {
                    let actual = self.version_of(&key)?;
                    if actual != exp {
                        return Ok(Outcome::BadVersion { key, expected: exp, actual });
                    }
                }
                Outcome::Deleted(self.delete(rev, &key)?)
            }
            Op::Txn { compares, ops } => {
                for (i, (key, exp)) in compares.iter().enumerate() {
                    let actual = self.version_of(key)?;
                    if actual != *exp {
                        return Ok(Outcome::Txn {
                            succeeded: false,
                            failed_compare: u32::try_from(i).unwrap_or(u32::MAX),
                            actual_version: actual,
                        });
                    }
                }
                for op in &ops {
                    if let TxnOp::Put { session, .. } = op {
                        if *session != 0 && !self.session_exists(*session)? {
                            return Ok(Outcome::NoSuchSession(*session));
                        }
                    }
                }
                for op in ops {
                    match op {
                        TxnOp::Put { key, value, session } => {
                            self.put(rev, key, value, session)?;
                        }
                        TxnOp::Delete { key } => {
                            self.delete(rev, &key)?;
                        }
                    }
                }
                Outcome::Txn { succeeded: true, failed_compare: 0, actual_version: 0 }
            }
            Op::NextId { name } => {
                let cur = match self.counters.get(&name) {
                    Some(v) => *v,
                    None => self
                        .db()
                        .get_cf(handle(self.db(), cf::COUNTERS), name.as_bytes())
                        .map_err(sto_read)?
                        .and_then(|b| read_be64(&b))
                        .unwrap_or(0),
                };
                self.counters.insert(name, cur + 1);
                Outcome::Id(cur)
            }
            Op::CreateSession { ttl_ms } => {
                self.sessions.insert(rev, Some(ttl_ms));
                Outcome::SessionCreated { id: rev, ttl_ms }
            }
            Op::CloseSession { id, expired } => {
                if !self.session_exists(id)? {
                    return Ok(Outcome::SessionClosed(false));
                }
                for key in self.keys_of_session(id)? {
                    if self.get_kv(&key)?.is_some_and(|v| v.session == id) {
                        self.delete(rev, &key)?;
                    }
                    self.bind(id, &key, false);
                }
                self.sessions.insert(id, None);
                tracing::debug!(session = id, expired, "session ended");
                Outcome::SessionClosed(true)
            }
        })
    }

    /// Writes the batch and publishes its effects to readers and watchers.
    pub(crate) fn commit(self) -> Result<(), StorageError> {
        let db = self.db();
        let mut batch = WriteBatch::default();
        for (k, v) in &self.kv {
            match v {
                Some(v) => batch.put_cf(handle(db, cf::KV), k.as_bytes(), bincode::serialize(v).map_err(sto_write)?),
                None => batch.delete_cf(handle(db, cf::KV), k.as_bytes()),
            }
        }
        for (name, next) in &self.counters {
            batch.put_cf(handle(db, cf::COUNTERS), name.as_bytes(), be64(*next));
        }
        for (id, ttl) in &self.sessions {
            match ttl {
                Some(t) => batch.put_cf(handle(db, cf::SESSIONS), be64(*id), be64(*t)),
                None => batch.delete_cf(handle(db, cf::SESSIONS), be64(*id)),
            }
        }
        for (id, keys) in &self.session_keys {
            for (k, bound) in keys {
                let mut sk = be64(*id).to_vec();
                sk.extend_from_slice(k.as_bytes());
                if *bound {
                    batch.put_cf(handle(db, cf::SESSION_KEYS), sk, []);
                } else {
                    batch.delete_cf(handle(db, cf::SESSION_KEYS), sk);
                }
            }
        }
        for (req, res) in &self.dedup {
            batch.put_cf(handle(db, cf::DEDUP), dedup_key(*req), bincode::serialize(res).map_err(sto_write)?);
            let mut age = be64(res.revision).to_vec();
            age.extend_from_slice(&dedup_key(*req));
            batch.put_cf(handle(db, cf::DEDUP_AGE), age, []);
        }
        for b in &self.events {
            for (seq, ev) in b.events.iter().enumerate() {
                let mut k = be64(b.revision).to_vec();
                k.extend_from_slice(&u32::try_from(seq).unwrap_or(u32::MAX).to_be_bytes());
                batch.put_cf(handle(db, cf::EVENTS), k, bincode::serialize(ev).map_err(sto_write)?);
            }
        }
        let meta = handle(db, cf::SM_META);
        if let Some(m) = &self.membership {
            batch.put_cf(meta, MEMBERSHIP, bincode::serialize(m).map_err(sto_write)?);
        }
        let prev_index = index_of(self.sm.revision());
        let applied_index = self.applied.map(|l| l.index).unwrap_or(prev_index);
        if self.applied.is_some() {
            batch.put_cf(meta, APPLIED, bincode::serialize(&self.applied).map_err(sto_write)?);
        }
        let mut floor = self.sm.event_floor();
        if applied_index / PRUNE_EVERY != prev_index / PRUNE_EVERY {
            let ret = self.sm.retention;
            let new_floor = revision_of(applied_index.saturating_sub(ret.event_revisions), 0);
            if new_floor > floor {
                batch.delete_range_cf(handle(db, cf::EVENTS), be64(0), be64(new_floor));
                batch.put_cf(meta, EVENT_FLOOR, be64(new_floor));
                floor = new_floor;
                // Raised before the delete lands, so a replay never reads a pruned range as
                // "no events".
                self.sm.raise_event_floor(floor);
            }
            self.prune_dedup(&mut batch, revision_of(applied_index.saturating_sub(DEDUP_WINDOW), 0))?;
        }
        db.write(batch).map_err(sto_write)?;
        self.sm.publish(last_revision_of(applied_index), floor, &self.sessions, self.events);
        Ok(())
    }

    fn prune_dedup(&self, batch: &mut WriteBatch, below: u64) -> Result<(), StorageError> {
        let db = self.db();
        let it = db.iterator_cf(handle(db, cf::DEDUP_AGE), rocksdb::IteratorMode::Start);
        for item in it {
            let (k, _) = item.map_err(sto_read)?;
            if read_be64(&k).unwrap_or(u64::MAX) >= below {
                break;
            }
            batch.delete_cf(handle(db, cf::DEDUP), &k[8..]);
            batch.delete_cf(handle(db, cf::DEDUP_AGE), &k);
        }
        Ok(())
    }
}

fn dedup_key((client, seq): RequestKey) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&client.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}
