//! Ledgers no topic lists. A topic removes consumed ledgers from its list first and deletes
//! them afterwards, and deleting a topic removes its list before its ledgers: a broker that
//! dies in between, or a deletion that keeps failing, leaves ledgers that nothing reads and
//! nothing would ever delete, holding their space on the bookies.
//!
//! Every broker looks for them every `orphan_ledger_check_interval_in_seconds`: a ledger whose
//! `topic` property names a topic that does not list it is deleted, its metadata in one
//! metastore transaction that also checks the topic's list is still the one read (so a list
//! that changed meanwhile keeps the ledger until the next look), then its entries on its
//! bookies. This is safe because a topic lists a ledger in the same transaction that creates
//! it ([`super::create_listed`]), and never lists one again once it was removed. Ledgers
//! younger than `orphan_ledger_min_age_in_seconds` are left alone all the same, as a margin
//! for brokers of an earlier release, which listed a ledger after creating it (while any
//! broker of such a release runs, the look should be off: an interval of 0).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use magnetar_bookie::client::LedgerClient;
use magnetar_metastore::client::{MetaClient, Txn};

use super::{now_ms, topic_key, ManagedLedgerInfo, TopicError, TOPIC_PROPERTY};
use crate::protocol::names::TopicName;

/// What one look found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrphanStats {
    /// Ledgers with a `topic` property.
    pub topic_ledgers: usize,
    /// Ledgers no topic lists, deleted.
    pub deleted: usize,
    /// Ledgers no topic lists, kept because they are younger than the minimum age.
    pub young: usize,
    /// Ledgers kept because their topic's list changed while looking, or could not be read.
    pub skipped: usize,
}

/// Deletes the ledgers no topic lists that are at least `min_age` old (see the module docs).
///
/// The listing and the topics' lists are read from any metastore node, possibly behind the
/// leader: a ledger missing from a stale listing waits for the next look, and a stale list
/// fails the deletion's compare.
pub async fn collect(ledgers: &LedgerClient, meta: &MetaClient, min_age: Duration) -> Result<OrphanStats, TopicError> {
    let now = now_ms();
    let min_age_ms = u64::try_from(min_age.as_millis()).unwrap_or(u64::MAX);
    let mut stats = OrphanStats::default();
    // Each topic's listed ledgers and the version of its list (0: no list), read once a look.
    let mut lists: HashMap<String, Option<(HashSet<u64>, u64)>> = HashMap::new();
    for (md, version) in ledgers.list(true).await? {
        let Some(topic) = md.custom.get(TOPIC_PROPERTY) else { continue };
        stats.topic_ledgers += 1;
        let name = match TopicName::parse(topic) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(ledger = md.id, topic = %topic, error = %e, "ledger names an invalid topic; kept");
                stats.skipped += 1;
                continue;
            }
        };
        let key = topic_key(&name);
        if !lists.contains_key(&key) {
            let list = read_list(meta, &key).await;
            lists.insert(key.clone(), list);
        }
        let Some(Some((listed, list_version))) = lists.get(&key) else {
            stats.skipped += 1;
            continue;
        };
        if listed.contains(&md.id) {
            continue;
        }
        if now.saturating_sub(md.ctime_ms) < min_age_ms {
            stats.young += 1;
            continue;
        }
        let unchanged = Txn::default().compare(key.clone(), *list_version);
        match ledgers.delete_if(&md, version, unchanged).await {
            Ok(true) => {
                tracing::info!(ledger = md.id, topic = %topic, "deleted a ledger its topic no longer lists");
                stats.deleted += 1;
            }
            Ok(false) => {
                // The list (or the ledger) changed since it was read: look again next time.
                lists.remove(&key);
                stats.skipped += 1;
            }
            Err(e) => {
                tracing::debug!(ledger = md.id, error = %e, "deleting an unlisted ledger failed; next look");
                stats.skipped += 1;
            }
        }
    }
    Ok(stats)
}

/// A topic's listed ledgers and its list's version; no list at all is an empty one at version
/// 0 (the topic was deleted). `None`: the list could not be read, so nothing of it goes.
async fn read_list(meta: &MetaClient, key: &str) -> Option<(HashSet<u64>, u64)> {
    match meta.get_with(key, true).await {
        Ok(None) => Some((HashSet::new(), 0)),
        Ok(Some(kv)) => match serde_json::from_slice::<ManagedLedgerInfo>(&kv.value) {
            Ok(info) => Some((info.ledgers.iter().map(|l| l.ledger_id).collect(), kv.version)),
            Err(e) => {
                tracing::warn!(key, error = %e, "unreadable ledger list; its topic's ledgers are kept");
                None
            }
        },
        Err(e) => {
            tracing::debug!(key, error = %e, "reading a ledger list failed");
            None
        }
    }
}

/// Looks for orphaned ledgers every `every` until `cancel`, counting deletions in `topics`.
pub(crate) async fn run(
    topics: std::sync::Arc<super::Topics>,
    every: Duration,
    min_age: Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let looked = tokio::select! {
            _ = cancel.cancelled() => return,
            r = collect(topics.ledgers(), topics.meta(), min_age) => r,
        };
        match looked {
            Ok(s) => {
                topics.orphans_deleted.fetch_add(s.deleted as u64, std::sync::atomic::Ordering::Relaxed);
                match s.deleted {
                    0 => tracing::debug!(?s, "looked for ledgers no topic lists"),
                    n => tracing::info!(deleted = n, "deleted ledgers no topic lists"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "looking for ledgers no topic lists failed"),
        }
    }
}
