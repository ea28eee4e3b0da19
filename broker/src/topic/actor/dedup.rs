//! Message deduplication, as Pulsar's brokers do it: with it on (the namespace's
//! `deduplicationEnabled`, else `broker_deduplication_enabled`; a topic's own
//! `deduplicationEnabled`, or its partitioned topic's, over both), a message whose sequence id
//! is not above the highest one its producer name has had accepted is not stored again. One
//! already stored is answered with the message id -1:-1 (the clients count it as sent); one
//! still on its way to the bookies cannot be told apart yet and is refused, so that the
//! client reconnects and sends it again.
//!
//! The highest stored sequence id per producer name survives the topic moving or the broker
//! dying: a snapshot of them, with the position it covers, is stored in the metastore every
//! `broker_deduplication_entries_interval` entries, on a clean close and before consumed
//! ledgers are deleted; loading replays the entries after it. Turned on for a topic without
//! a snapshot, deduplication starts from the topic's end (what was stored before, with it
//! off, does not count: its producers were told to number from their last id in this
//! topic's life, or from 0); turned off, the snapshot is deleted.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use magnetar_metastore::client::Txn;

use super::{decode_entry, pb, read_positions, Actor, AppendError, Pos, TopicName};

/// How often a loaded topic reads its own and its namespace's `deduplicationEnabled` again.
pub(super) const POLICY_CHECK: std::time::Duration = std::time::Duration::from_secs(60);

/// The message id a duplicate is answered with (-1:-1).
pub(super) const DUPLICATE: Pos = Pos { ledger_id: u64::MAX, entry_id: -1 };

/// Entries read at once while replaying.
const REPLAY_BATCH: usize = 100;

/// Producer names a snapshot keeps at most (Pulsar's `brokerDeduplicationMaxNumberOfProducers`):
/// far below what the metastore takes in one value.
const MAX_PRODUCERS: usize = 10_000;

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
    pub(super) since_snapshot: u64,
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

impl Dedup {
    /// Forgets a producer name.
    pub(super) fn forget(&mut self, name: &str) {
        self.pushed.remove(name);
    }

    /// A message of `name` up to `seq` was stored.
    pub(super) fn stored(&mut self, name: &str, seq: i64) {
        match self.pushed.get_mut(name) {
            Some(p) => *p = (*p).max(seq),
            None => {
                self.pushed.insert(name.to_owned(), seq);
            }
        }
    }
}

impl Actor {
    /// Reads whether deduplication is on for the topic; turned on, its state is recovered
    /// (sends wait meanwhile, in this task's queue); turned off, it is dropped with its
    /// snapshot. Until the first read succeeds, sends are refused.
    pub(super) async fn check_dedup(&mut self) {
        let key = "deduplicationEnabled";
        let policy = super::applied_policy(&self.ml.meta, &self.ml.name, key, key, serde_json::Value::as_bool);
        let on = match policy.await {
            Ok(on) => on.unwrap_or(self.ml.settings.deduplication),
            Err(e) => {
                if !self.dedup_read {
                    self.dedup_unknown = true;
                }
                tracing::debug!(topic = %self.ml.name, error = %e, "reading the deduplication policies failed");
                return;
            }
        };
        let first = !std::mem::replace(&mut self.dedup_read, true);
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
            (false, had) if had || first => {
                // A snapshot left from when it was on would count, were it turned on again,
                // the sequence ids stored meanwhile without it.
                match self.forget_dedup_snapshot(had).await {
                    Ok(()) => {
                        self.dedup = None;
                        self.dedup_unknown = false;
                        // As a reload would: turned on again, it starts from the end with
                        // none of the ids stored before.
                        if had {
                            self.last_sequence.clear();
                        }
                    }
                    Err(e) => {
                        tracing::warn!(topic = %self.ml.name, error = %e, "deleting the deduplication snapshot failed; sends are refused until it is deleted");
                        self.dedup_read = false;
                        self.dedup_unknown = true;
                    }
                }
            }
            (false, _) => self.dedup_unknown = false,
            (true, true) => self.dedup_unknown = false,
        }
    }

    /// Deletes the snapshot (looked for first unless `known`: a topic loading with
    /// deduplication off reads rather than writes).
    async fn forget_dedup_snapshot(&mut self, known: bool) -> Result<(), String> {
        let key = dedup_key(&self.ml.name);
        if !known && self.ml.meta.get(&key).await.map_err(|e| e.to_string())?.is_none() {
            return Ok(());
        }
        // Only while this task owns the topic: a former owner must not delete the new one's.
        let txn = Txn::default().compare(&self.ml.key, self.ml.version).delete(key);
        match self.ml.meta.txn(txn).await {
            Ok(r) if r.succeeded => Ok(()),
            Ok(_) => Err(format!("the ledger list of {} changed under this broker", self.ml.name)),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The state from the last snapshot and the entries stored after it; without a snapshot,
    /// from the topic's end (and a snapshot of it stored).
    async fn recover_dedup(&mut self) -> Result<Dedup, String> {
        let kv = self.ml.meta.get(&dedup_key(&self.ml.name)).await.map_err(|e| e.to_string())?;
        let Some(kv) = kv else {
            self.write_dedup_snapshot().await?;
            tracing::info!(topic = %self.ml.name, "deduplication on, from the topic's end");
            return Ok(Dedup { pushed: self.last_sequence.clone(), since_snapshot: 0 });
        };
        let snap: Snapshot = match serde_json::from_slice(&kv.value) {
            Ok(s) => s,
            Err(e) => {
                // Refusing every send until someone repairs it would stop the topic: it starts
                // from the end instead (resends of older messages may then be stored again).
                tracing::error!(topic = %self.ml.name, error = %e, "the deduplication snapshot does not parse; deduplication starts from the topic's end");
                self.write_dedup_snapshot().await?;
                return Ok(Dedup { pushed: self.last_sequence.clone(), since_snapshot: 0 });
            }
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
            for (p, entry) in read_positions(self.ml.ledgers.clone(), current, positions).await? {
                let md = match decode_entry(&entry) {
                    Ok((md, _)) => md,
                    Err(e) => {
                        // Nothing delivers it either (see `ReadDone`): it counts for nothing.
                        tracing::warn!(topic = %self.ml.name, position = %p, error = %e, "stored entry does not decode; deduplication skips it");
                        continue;
                    }
                };
                if md.num_chunks_from_msg.is_some_and(|n| md.chunk_id.unwrap_or(0) + 1 < n) {
                    // A chunk before its message's last: the message was not stored by it.
                    continue;
                }
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

    /// Whether a snapshot is due (every so many entries; stored on the next tick, one at a
    /// time, in order).
    pub(super) fn dedup_snapshot_due(&self) -> bool {
        self.dedup.as_ref().is_some_and(|d| d.since_snapshot >= self.ml.settings.dedup_snapshot_entries)
    }

    /// Stores a snapshot of everything stored so far and waits for it: when due, before a
    /// clean close, and before consumed ledgers (which a replay could no longer read) are
    /// deleted.
    pub(super) async fn store_dedup_snapshot(&mut self) -> Result<(), String> {
        if self.dedup.is_none() {
            return Ok(());
        }
        self.write_dedup_snapshot().await?;
        if let Some(d) = self.dedup.as_mut() {
            d.since_snapshot = 0;
        }
        Ok(())
    }

    /// Forgets the producer names that have had no producer connected for
    /// `producer_inactivity` (Pulsar's `brokerDeduplicationProducerInactivityTimeoutMinutes`):
    /// their highest sequence ids (so a producer of that name starts afresh, and a resend of
    /// its old messages is stored again) and their rates. Without it, a topic kept a name for
    /// good, and every client run with a generated producer name added one. A name is counted
    /// inactive from when its last producer went or, for names a snapshot or replay brought
    /// back, from the first look after the topic loaded. Looked at every quarter of the
    /// timeout, at most a minute apart.
    ///
    /// With deduplication on, names are forgotten only once a snapshot without them is
    /// stored: the last one would otherwise bring them back if the broker died, and a
    /// producer of that name, told to start from -1 meanwhile, would then have its next
    /// messages taken for duplicates of the old ones and dropped.
    pub(super) async fn forget_inactive_producers(&mut self) {
        let now = std::time::Instant::now();
        let connected: std::collections::HashSet<&str> = self
            .producers
            .values()
            .chain(self.waiting_exclusive.iter().map(|q| &q.producer))
            .map(|r| r.name.as_str())
            .collect();
        self.producer_rates.retain(|name, _| connected.contains(name.as_str()));
        self.inactive.retain(|name, _| !connected.contains(name.as_str()));
        for name in self.last_sequence.keys().filter(|n| !connected.contains(n.as_str())) {
            self.inactive.entry(name.clone()).or_insert(now);
        }
        let timeout = self.ml.settings.producer_inactivity;
        let gone: Vec<String> = self
            .inactive
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= timeout)
            .map(|(n, _)| n.clone())
            .collect();
        if gone.is_empty() {
            return;
        }
        let kept: Vec<(String, i64)> = gone.iter().filter_map(|n| self.last_sequence.remove_entry(n)).collect();
        if self.dedup.is_some() {
            if let Err(e) = self.store_dedup_snapshot().await {
                // Kept until a snapshot without them is stored (tried again at the next look).
                self.last_sequence.extend(kept);
                tracing::debug!(topic = %self.ml.name, error = %e, "storing the deduplication snapshot failed; producer names not forgotten yet");
                return;
            }
        }
        for name in &gone {
            self.inactive.remove(name);
            if let Some(d) = self.dedup.as_mut() {
                d.forget(name);
            }
        }
        tracing::info!(topic = %self.ml.name, producers = gone.len(), "forgot producer names inactive for {timeout:?}");
    }

    /// Writes the snapshot if this task still owns the topic (its ledger list is at the
    /// version this task holds), so a former owner never overwrites the new owner's.
    async fn write_dedup_snapshot(&mut self) -> Result<(), String> {
        let last = self.ml.span.last();
        let mut producers = self.last_sequence.clone();
        if producers.len() > MAX_PRODUCERS {
            tracing::warn!(topic = %self.ml.name, producers = producers.len(), kept = MAX_PRODUCERS,
                "more producer names than a deduplication snapshot keeps; the rest are not deduplicated after a reload");
            producers = producers.into_iter().take(MAX_PRODUCERS).collect();
        }
        let snap = Snapshot { ledger_id: last.ledger_id, entry_id: last.entry_id, producers };
        let body = serde_json::to_vec(&snap).map_err(|e| e.to_string())?;
        let txn = Txn::default().compare(&self.ml.key, self.ml.version).put(dedup_key(&self.ml.name), body, 0);
        match self.ml.meta.txn(txn).await {
            Ok(r) if r.succeeded => Ok(()),
            Ok(_) => Err(format!("the ledger list of {} changed under this broker", self.ml.name)),
            Err(e) => Err(e.to_string()),
        }
    }
}
