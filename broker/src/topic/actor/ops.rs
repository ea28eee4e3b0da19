//! Admin operations on a topic's subscriptions (create at a position, delete, skip, skip all,
//! expire, reset by time, peek) and its internal state, run inside the topic's task.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::json;

use super::{close_consumer, cursor_key, pb, read_positions, Actor, LedgerSpan, Pos, Sub, SubType, TopicName};
use crate::topic::quota::{BacklogQuota, QuotaPolicy};

/// Where a subscription created through the admin API starts.
#[derive(Clone, Copy, Debug)]
pub enum CreateAt {
    /// Before the first entry.
    Earliest,
    /// After the last entry.
    Latest,
    /// At this entry (it is delivered).
    Id(u64, i64),
}

/// An admin operation on a subscription.
#[derive(Clone, Copy, Debug)]
pub enum SubOp {
    /// Create a durable subscription.
    Create(CreateAt),
    /// Delete it (`force`: even with consumers connected, which are closed).
    Delete {
        /// Even with consumers.
        force: bool,
    },
    /// Acknowledge the next `n` unacknowledged entries.
    Skip(u64),
    /// Acknowledge everything.
    SkipAll,
    /// Acknowledge what was published more than this many seconds ago.
    Expire(u64),
    /// Move to the first entry published at or after this time (ms) and reconnect consumers.
    ResetToTime(u64),
    /// The `n`-th (1-based) unacknowledged entry.
    Peek(u64),
}

/// The answer to a [`SubOp`].
#[derive(Debug)]
pub enum SubAnswer {
    /// Done.
    Done,
    /// A peeked entry.
    Peeked {
        /// Its position.
        position: Pos,
        /// `[metadataSize][MessageMetadata][payload]`.
        entry: Bytes,
    },
}

/// Why a [`SubOp`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SubError {
    /// No such subscription (or message).
    #[error("{0}")]
    NotFound(String),
    /// It already exists.
    #[error("{0}")]
    Conflict(String),
    /// Refused in the current state.
    #[error("{0}")]
    Precondition(String),
    /// Storage failed.
    #[error("{0}")]
    Failed(String),
}

/// The `messageTTL` policy that applies, seconds (`None`: there is none): the topic's own,
/// else (for a partition) its partitioned topic's, else its namespace's.
async fn message_ttl(meta: &magnetar_metastore::client::MetaClient, topic: &TopicName) -> Result<Option<u64>, String> {
    super::applied_policy(meta, topic, "messageTTL", "message_ttl_in_seconds", serde_json::Value::as_u64).await
}

/// Eviction over a backlog quota goes down to this share of the limit.
const EVICT_TO: f64 = 0.9;

/// Forgets delivery state of entries the cursor now covers.
fn forget_acked(sub: &mut Sub, span: &LedgerSpan) {
    let cursor = &sub.cursor;
    sub.pending.retain(|p, _| !cursor.is_acked(*p));
    sub.redeliveries.retain(|p, _| !cursor.is_acked(*p));
    sub.replay.retain(|p| !cursor.is_acked(*p));
    sub.delayed.retain(|(_, p)| !cursor.is_acked(*p));
    if sub.read_pos < cursor.mark_delete() {
        sub.read_pos = cursor.mark_delete();
    }
    sub.prune_fetched(span);
    sub.dirty = true;
}

impl Actor {
    /// Pulsar's message TTL: on every subscription, acknowledges the messages published
    /// longer ago than the topic's or its namespace's `messageTTL` (or the broker's default
    /// TTL).
    pub(super) async fn expire_by_ttl(&mut self) {
        let last = self.ml.span.last();
        if self.ml.cursors_loaded && self.subs.values().all(|s| s.cursor.mark_delete() >= last) {
            // No backlog anywhere.
            return;
        }
        let ttl = match message_ttl(&self.ml.meta, &self.ml.name).await {
            Ok(ttl) => ttl.unwrap_or(self.ml.settings.message_ttl),
            Err(e) => {
                // Never expire on a guess: the policies may set a longer TTL, or none.
                tracing::debug!(topic = %self.ml.name, error = %e, "reading the message TTL policies failed");
                return;
            }
        };
        if ttl == 0 {
            return;
        }
        if !self.ml.cursors_loaded {
            // Stored subscriptions not in use expire too.
            self.load_cursors().await;
        }
        let Some(oldest) = self.subs.values().map(|s| s.cursor.mark_delete()).min().filter(|m| *m < last) else {
            return;
        };
        let cutoff_ms = super::super::now_ms().saturating_sub(ttl.saturating_mul(1000));
        let cutoff = if self.ml.last_info.is_some_and(|(p, i)| p == last && i.publish_time < cutoff_ms) {
            // Everything is past its TTL: no entry needs reading.
            last
        } else {
            // Nothing is while the oldest entry a subscription holds is not (one read).
            let Some(first) = self.ml.span.next(oldest) else { return };
            let found = match self.ml.entry_info(first).await {
                Ok(info) if info.publish_time >= cutoff_ms => return,
                Ok(_) => self.find_by_time(cutoff_ms).await,
                Err(e) => Err(e),
            };
            match found {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(topic = %self.ml.name, error = %e, "finding the messages past their TTL failed");
                    return;
                }
            }
        };
        let span = self.ml.span.clone();
        for (name, sub) in &mut self.subs {
            if cutoff > sub.cursor.mark_delete() {
                sub.cursor.ack_cumulative(cutoff, None, &span);
                forget_acked(sub, &span);
                tracing::debug!(topic = %self.ml.name, sub = %name, up_to = %cutoff, ttl, "expired messages past their TTL");
            }
        }
    }

    /// The backlog bytes of the subscriptions over `limit`: (name, estimated bytes, entries).
    /// Non-durable ones (readers) hold nothing and do not count, as in Pulsar.
    fn over_quota(&self, limit: u64) -> Vec<(String, u64, u64)> {
        let avg = self.avg_entry_bytes();
        self.subs
            .iter()
            .filter(|(_, sub)| sub.durable)
            .map(|(name, sub)| {
                let entries = self.backlog_entries(sub);
                (name.clone(), (entries as f64 * avg) as u64, entries)
            })
            .filter(|(_, bytes, _)| *bytes > limit)
            .collect()
    }

    /// Why a new producer is refused: its topic's backlog is over a quota that holds
    /// producers off.
    pub(super) fn quota_refusal(&self) -> Option<(pb::ServerError, String)> {
        let q = self.quota.filter(|q| q.policy.blocks_producers())?;
        if self.over_quota(q.limit_bytes).is_empty() {
            return None;
        }
        let code = match q.policy {
            QuotaPolicy::ProducerException => pb::ServerError::ProducerBlockedQuotaExceededException,
            _ => pb::ServerError::ProducerBlockedQuotaExceededError,
        };
        let why = format!("Cannot create producer on topic with backlog quota exceeded ({} bytes)", q.limit_bytes);
        Some((code, why))
    }

    /// Pulsar's backlog quota check: reads the namespace's quota again, then, past it,
    /// closes the producers (whose reconnects are refused while it lasts) or evicts the
    /// oldest messages of the subscriptions over it.
    pub(super) async fn check_backlog_quota(&mut self) {
        let last = self.ml.span.last();
        if self.ml.cursors_loaded && self.subs.values().all(|s| s.cursor.mark_delete() >= last) {
            // No backlog anywhere: nothing to read or do.
            return;
        }
        match super::namespace_policies(&self.ml.meta, &self.ml.name).await {
            Ok(policies) => {
                self.quota = match BacklogQuota::from_policies(&policies) {
                    Ok(Some(q)) => q,
                    Ok(None) => self.ml.settings.backlog_quota,
                    Err(e) => {
                        tracing::warn!(topic = %self.ml.name, error = %e, "the namespace's backlog quota does not parse; the broker's default applies");
                        self.ml.settings.backlog_quota
                    }
                }
            }
            // Never acted on a guess: the last quota read stays (none before the first read).
            Err(e) => {
                tracing::debug!(topic = %self.ml.name, error = %e, "reading the namespace's backlog quota failed")
            }
        }
        let Some(q) = self.quota else { return };
        if !self.ml.cursors_loaded {
            // Stored subscriptions not in use hold a backlog too.
            self.load_cursors().await;
        }
        let over = self.over_quota(q.limit_bytes);
        if over.is_empty() {
            return;
        }
        if let Some((code, why)) = self.quota_refusal() {
            if !self.producers.is_empty() {
                tracing::warn!(topic = %self.ml.name, limit = q.limit_bytes, subscriptions = ?over,
                    "backlog quota exceeded: closing the producers");
            }
            for ((_, producer_id), p) in self.producers.drain() {
                p.close(producer_id);
            }
            for w in self.waiting_exclusive.drain(..) {
                w.producer.refuse(code, why.clone());
            }
            self.exclusive = None;
            return;
        }
        // Eviction, as in Pulsar down to 90% of the limit (so that it does not come back for
        // a sliver at every check): everything but the newest entries that fit is
        // acknowledged, at the topic's mean entry size.
        let avg = self.avg_entry_bytes().max(1.0);
        let keep = (q.limit_bytes as f64 * EVICT_TO / avg) as u64;
        let span = self.ml.span.clone();
        let Some(cut) = span.total_entries().checked_sub(keep + 1).and_then(|i| span.nth(i)) else { return };
        for (name, bytes, _) in over {
            let Some(sub) = self.subs.get_mut(&name).filter(|s| cut > s.cursor.mark_delete()) else { continue };
            sub.cursor.ack_cumulative(cut, None, &span);
            forget_acked(sub, &span);
            tracing::info!(topic = %self.ml.name, sub = %name, backlog_bytes = bytes, limit = q.limit_bytes, up_to = %cut,
                "backlog quota exceeded: evicted the oldest entries");
        }
    }

    pub(super) async fn sub_admin(&mut self, name: String, op: SubOp) -> Result<SubAnswer, SubError> {
        let none = BTreeMap::new();
        if let SubOp::Create(at) = op {
            let exists = self.subs.contains_key(&name)
                || self
                    .ml
                    .meta
                    .get(&cursor_key(&self.ml.name, &name))
                    .await
                    .map_err(|e| SubError::Failed(e.to_string()))?
                    .is_some();
            if exists {
                return Err(SubError::Conflict(format!("Subscription {name} already exists")));
            }
            let initial = match at {
                CreateAt::Earliest => self.ml.span.before_first(),
                CreateAt::Latest => self.ml.span.last(),
                // Never past the last entry: messages written later up to that id would count
                // as acknowledged, and their ledgers could be deleted unread.
                CreateAt::Id(l, e) => Pos::new(l, e - 1).min(self.ml.span.last()),
            };
            let sub = self
                .open_sub_with(&name, true, SubType::Exclusive, initial, &none, true)
                .await
                .map_err(SubError::Failed)?
                .ok_or_else(|| SubError::Failed("the subscription was not created".into()))?;
            self.subs.insert(name, sub);
            return Ok(SubAnswer::Done);
        }
        if !self.subs.contains_key(&name) {
            let first = self.ml.span.before_first();
            match self.open_sub_with(&name, true, SubType::Exclusive, first, &none, false).await {
                Ok(Some(sub)) => {
                    self.subs.insert(name.clone(), sub);
                }
                Ok(None) => return Err(SubError::NotFound(format!("Subscription {name} not found"))),
                Err(e) => return Err(SubError::Failed(e)),
            }
        }
        // Positions that need reading go first (reads borrow the whole task).
        let cutoff = match op {
            SubOp::Expire(secs) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                Some(self.find_by_time(now.saturating_sub(secs * 1000)).await.map_err(SubError::Failed)?)
            }
            SubOp::ResetToTime(t) => Some(self.find_by_time(t).await.map_err(SubError::Failed)?),
            _ => None,
        };
        let span = self.ml.span.clone();
        let Some(sub) = self.subs.get_mut(&name) else {
            return Err(SubError::NotFound(format!("Subscription {name} not found")));
        };
        match op {
            SubOp::Create(_) => unreachable!("handled above"),
            SubOp::Delete { force } => {
                if !sub.consumers.is_empty() && !force {
                    return Err(SubError::Precondition(format!("Subscription {name} has active connected consumers")));
                }
                if sub.durable {
                    self.delete_cursor(&name).await.map_err(SubError::Failed)?;
                }
                if let Some(sub) = self.subs.remove(&name) {
                    for c in &sub.consumers {
                        let _ = c.out.send(close_consumer(c.key.1));
                        self.index.remove(&c.key);
                    }
                }
                tracing::info!(topic = %self.ml.name, sub = name, "subscription deleted");
            }
            SubOp::Skip(n) => {
                let (mut p, mut k) = (sub.cursor.mark_delete(), 0);
                while k < n {
                    let Some(q) = span.next(p) else { break };
                    p = q;
                    if !sub.cursor.is_acked(q) {
                        sub.cursor.ack(q, None, &span);
                        k += 1;
                    }
                }
                forget_acked(sub, &span);
            }
            SubOp::SkipAll => {
                sub.cursor.ack_cumulative(span.last(), None, &span);
                forget_acked(sub, &span);
            }
            SubOp::Expire(_) => {
                if let Some(p) = cutoff.filter(|p| *p > sub.cursor.mark_delete()) {
                    sub.cursor.ack_cumulative(p, None, &span);
                    forget_acked(sub, &span);
                }
            }
            SubOp::ResetToTime(_) => {
                if let Some(p) = cutoff {
                    self.reset_sub(&name, p, None)
                        .await
                        .map_err(|e| SubError::Failed(format!("the reset subscription was not stored: {e:?}")))?;
                }
            }
            SubOp::Peek(n) => {
                let (mut p, mut k) = (sub.cursor.mark_delete(), 0);
                let target = loop {
                    let Some(q) = span.next(p) else {
                        return Err(SubError::NotFound(format!("no message at position {n} of {name}")));
                    };
                    p = q;
                    if !sub.cursor.is_acked(q) {
                        k += 1;
                        if k >= n.max(1) {
                            break q;
                        }
                    }
                };
                let entry = match self.ml.cache.get(&target) {
                    Some(c) => c.entry.clone(),
                    None => {
                        let current = self.ml.writer.as_ref().map(|w| (w.id(), w.reader()));
                        let mut got = read_positions(self.ml.ledgers.clone(), current, vec![target])
                            .await
                            .map_err(SubError::Failed)?;
                        got.pop().map(|(_, e)| e).ok_or_else(|| SubError::Failed(format!("entry {target} not read")))?
                    }
                };
                return Ok(SubAnswer::Peeked { position: target, entry });
            }
        }
        Ok(SubAnswer::Done)
    }

    /// Ledgers and cursors, with the field names of Pulsar's `internalStats`.
    pub(super) fn internal_stats(&self) -> serde_json::Value {
        let current = self.ml.writer.as_ref().map(|w| w.id());
        let ledgers: Vec<_> = self
            .ml
            .info
            .ledgers
            .iter()
            .map(|l| {
                let entries = self.ml.span.ledgers().iter().find(|x| x.0 == l.ledger_id).map(|x| x.1 + 1).unwrap_or(0);
                json!({
                    "ledgerId": l.ledger_id,
                    "entries": entries.max(0),
                    "size": if Some(l.ledger_id) == current { self.ml.ledger_bytes } else { l.size.unwrap_or(0) },
                    "offloaded": false,
                })
            })
            .collect();
        let cursors: serde_json::Map<String, serde_json::Value> = self
            .subs
            .values()
            .map(|s| {
                let md = s.cursor.mark_delete();
                let read =
                    self.ml.span.next(s.read_pos).unwrap_or(Pos::new(s.read_pos.ledger_id, s.read_pos.entry_id + 1));
                (
                    s.name.clone(),
                    json!({
                        "markDeletePosition": md.to_string(),
                        "readPosition": read.to_string(),
                        "individuallyAckedEntries": s.cursor.acked_count(),
                        "messagesConsumedCounter": s.msg_out.total,
                        "cursorLedger": -1,
                        "state": if s.consumers.is_empty() { "NoLedger" } else { "Open" },
                        "active": !s.consumers.is_empty(),
                        "durable": s.durable,
                        "subscriptionHavePendingRead": s.reading,
                        // Magnetar's: entries read from the bookies and held for delivery.
                        "fetchedEntries": s.fetched.len(),
                        "fetchedSize": s.fetched.values().map(|c| c.entry.len()).sum::<usize>(),
                    }),
                )
            })
            .collect();
        let last = self.ml.span.last();
        json!({
            "entriesAddedCounter": self.msg_in.total,
            "numberOfEntries": self.ml.span.total_entries(),
            "totalSize": self.ml.info.ledgers.iter().filter_map(|l| l.size).sum::<u64>() + self.ml.ledger_bytes,
            "currentLedgerEntries": self.ml.ledger_entries,
            "currentLedgerSize": self.ml.ledger_bytes,
            "lastConfirmedEntry": last.to_string(),
            "state": if current.is_some() { "LedgerOpened" } else { "Closed" },
            "ledgers": ledgers,
            "cursors": cursors,
        })
    }
}
