//! Message deduplication, as Pulsar's brokers do it: with it on (the namespace's
//! `deduplicationEnabled`, else `broker_deduplication_enabled`), a message whose sequence id
//! is not above the highest one its producer name has had accepted is not stored again. One
//! already stored is answered with the message id -1:-1 (the clients count it as sent); one
//! still on its way to the bookies cannot be told apart yet and is refused, so that the
//! client reconnects and sends it again.
//!
//! The highest stored sequence id per producer name survives the topic moving or the broker
//! dying: a snapshot of them, with the position it covers, is stored in the metastore every
//! `broker_deduplication_entries_interval` entries, on a clean close and before consumed
//! ledgers are deleted; loading replays the entries after it.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{decode_entry, pb, read_positions, Actor, AppendError, Pos, TopicName};

/// How often a loaded topic reads its namespace's `deduplicationEnabled` again.
pub(super) const POLICY_CHECK: std::time::Duration = std::time::Duration::from_secs(60);

/// The message id a duplicate is answered with (-1:-1).
pub(super) const DUPLICATE: Pos = Pos { ledger_id: u64::MAX, entry_id: -1 };

/// Entries read at once while replaying.
const REPLAY_BATCH: usize = 100;

/// The metastore key of a topic's deduplication snapshot.
pub fn dedup_key(name: &TopicName) -> String {
    format!("{}/dedup", super::super::topic_key(name))
}

/// The highest sequence id per producer name of the entries up to a position.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Snapshot {
    ledger_id: u64,
    entry_id: i64,
    producers: HashMap<String, i64>,
}

/// A topic's deduplication state; the highest *stored* sequence ids are the topic's
/// `last_sequence`.
pub(super) struct Dedup {
    /// The highest sequence id per producer name accepted for storing (stored, or on its way).
    pushed: HashMap<String, i64>,
    /// Entries stored since the last snapshot.
    since_snapshot: u64,
}

/// What deduplication makes of a send.
pub(super) enum Verdict {
    /// Not seen: store it.
    New,
    /// Stored before: answer it as sent.
    Duplicate,
    /// On its way to the bookies: refuse it for now.
    Unknown,
}

impl Actor {
    /// Reads whether deduplication is on for the topic; turned on, its state is recovered
    /// (sends wait meanwhile, in this task's queue); turned off, it is dropped.
    pub(super) async fn check_dedup(&mut self) {
        let on = match super::namespace_policies(&self.ml.meta, &self.ml.name).await {
            Ok(p) => p.get("deduplicationEnabled").and_then(|v| v.as_bool()).unwrap_or(self.ml.settings.deduplication),
            Err(e) => {
                // As it was; a topic that has not read it yet refuses sends until it has.
                tracing::debug!(topic = %self.ml.name, error = %e, "reading the namespace's deduplication policy failed");
                return;
            }
        };
        match (on, self.dedup.is_some()) {
            (true, false) => match self.recover_dedup().await {
                Ok(d) => {
                    self.dedup = Some(d);
                    self.dedup_unknown = false;
                }
                Err(e) => {
                    tracing::warn!(topic = %self.ml.name, error = %e, "recovering the deduplication state failed; sends are refused until it is recovered");
                    self.dedup_unknown = true;
                }
            },
            (false, _) => {
                self.dedup = None;
                self.dedup_unknown = false;
            }
            (true, true) => {}
        }
    }

    /// The state from the last snapshot and the entries stored after it.
    async fn recover_dedup(&mut self) -> Result<Dedup, String> {
        let kv = self.ml.meta.get(&dedup_key(&self.ml.name)).await.map_err(|e| e.to_string())?;
        let snap: Snapshot = match kv {
            Some(kv) => serde_json::from_slice(&kv.value).map_err(|e| format!("the deduplication snapshot: {e}"))?,
            None => Snapshot { ledger_id: 0, entry_id: -1, ..Default::default() },
        };
        let mut highest = snap.producers;
        let mut at = Pos::new(snap.ledger_id, snap.entry_id);
        let mut replayed = 0u64;
        loop {
            // The next run of entries in one ledger.
            let mut positions = Vec::with_capacity(REPLAY_BATCH);
            let mut p = at;
            while positions.len() < REPLAY_BATCH {
                match self.ml.span.next(p) {
                    Some(q) if positions.first().is_none_or(|f: &Pos| f.ledger_id == q.ledger_id) => {
                        positions.push(q);
                        p = q;
                    }
                    _ => break,
                }
            }
            let Some(&last) = positions.last() else { break };
            let current = self.ml.current_reader(last.ledger_id);
            for (_, entry) in read_positions(self.ml.ledgers.clone(), current, positions).await? {
                let (md, _) = decode_entry(&entry).map_err(|e| e.to_string())?;
                let seq = md.sequence_id.max(md.highest_sequence_id.unwrap_or(0)) as i64;
                let h = highest.entry(md.producer_name).or_insert(seq);
                *h = (*h).max(seq);
                replayed += 1;
            }
            at = last;
        }
        tracing::info!(topic = %self.ml.name, producers = highest.len(), replayed, "deduplication state recovered");
        for (name, seq) in &highest {
            let s = self.last_sequence.entry(name.clone()).or_insert(*seq);
            *s = (*s).max(*seq);
        }
        Ok(Dedup { pushed: self.last_sequence.clone(), since_snapshot: replayed })
    }

    /// What deduplication makes of a send of `first..=highest` by `name` (`New` with it off).
    pub(super) fn dedup_verdict(&mut self, name: &str, first: u64, highest: u64) -> Verdict {
        let Some(d) = self.dedup.as_mut() else { return Verdict::New };
        let pushed = d.pushed.get(name).copied().unwrap_or(-1);
        if (first as i64) > pushed {
            d.pushed.insert(name.to_owned(), highest as i64);
            return Verdict::New;
        }
        if (first as i64) <= self.last_sequence.get(name).copied().unwrap_or(-1) {
            Verdict::Duplicate
        } else {
            Verdict::Unknown
        }
    }

    /// Why sends are refused while deduplication is on but its state unknown.
    pub(super) fn dedup_refusal(&self) -> Option<AppendError> {
        self.dedup_unknown.then(|| AppendError {
            code: pb::ServerError::ServiceNotReady,
            message: format!("deduplication state of {} is not recovered yet", self.ml.name),
        })
    }

    /// After an entry was stored: a snapshot every so many entries.
    pub(super) fn dedup_stored(&mut self) {
        let every = self.ml.settings.dedup_snapshot_entries;
        let Some(d) = self.dedup.as_mut() else { return };
        d.since_snapshot += 1;
        if d.since_snapshot >= every {
            d.since_snapshot = 0;
            let (meta, key, value) = (self.ml.meta.clone(), dedup_key(&self.ml.name), self.dedup_snapshot());
            let name = self.ml.name.clone();
            // Snapshots landing out of order are harmless: an older one only replays more.
            tokio::spawn(async move {
                let put = magnetar_metastore::client::PutOptions { expected_version: None, session: 0 };
                if let Err(e) = meta.put(&key, value, put).await {
                    tracing::debug!(topic = %name, error = %e, "storing the deduplication snapshot failed");
                }
            });
        }
    }

    /// Stores a snapshot of everything stored so far and waits for it: before a clean close,
    /// and before consumed ledgers (which a replay could no longer read) are deleted.
    pub(super) async fn store_dedup_snapshot(&mut self) -> Result<(), String> {
        if self.dedup.is_none() {
            return Ok(());
        }
        let put = magnetar_metastore::client::PutOptions { expected_version: None, session: 0 };
        self.ml.meta.put(&dedup_key(&self.ml.name), self.dedup_snapshot(), put).await.map_err(|e| e.to_string())?;
        if let Some(d) = self.dedup.as_mut() {
            d.since_snapshot = 0;
        }
        Ok(())
    }

    fn dedup_snapshot(&self) -> Vec<u8> {
        let last = self.ml.span.last();
        let snap =
            Snapshot { ledger_id: last.ledger_id, entry_id: last.entry_id, producers: self.last_sequence.clone() };
        serde_json::to_vec(&snap).unwrap_or_default()
    }
}
