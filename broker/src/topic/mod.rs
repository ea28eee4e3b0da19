//! Topics. Every topic is loaded through [`Topics::get_or_load`], which first makes sure this
//! broker owns the topic's bundle ([`crate::ownership`]), and is then owned by one task
//! ([`actor`]) that holds its managed ledger, tail cache, producers and subscriptions.
//!
//! A topic's ledgers are listed at `/topics/<domain>/<tenant>/<namespace>/<topic>` and the list
//! changes only by compare-and-swap. Loading a topic first recovers every listed ledger that
//! was not closed — which fences any earlier writer, such as a broker that lost the topic but
//! is still running — and then appends a new ledger to the list and writes to it. So a
//! restarted broker never writes behind an older writer, and every acknowledged entry stays
//! in a closed ledger of the list. Cursors live at `<topic key>/cursors/<subscription>`;
//! partition counts at `/partitioned/<domain>/<tenant>/<namespace>/<topic>`.

mod actor;
pub mod cache;
pub mod cursor;
pub mod keys;
pub mod liveness;
pub mod orphans;
pub mod position;
pub mod quota;
pub mod schema;
pub mod stats;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use magnetar_bookie::client::{LedgerClient, LedgerConfig, LedgerError};
use magnetar_metastore::client::{ClientError, MetaClient, PutOptions, Txn};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Mutex, OnceCell};

use crate::ownership::{Owner, Ownership};
use crate::protocol::names::TopicName;
use crate::protocol::pb;
pub use actor::{
    applied_policy, dedup_key, producer_success, AppendError, Cmd, ConsumerSpec, CreateAt, EntryInfo, Out, OutTx,
    ProducerRequest, ProducerState, SeekTarget, SentBy, SubAnswer, SubError, SubOp,
};
pub use cache::CacheBudget;
pub use liveness::{Liveness, LIVENESS_TIMEOUT};
use position::{LedgerSpan, Pos};

/// The metastore key of a topic's managed-ledger metadata.
pub fn topic_key(name: &TopicName) -> String {
    format!("/topics/{}/{}/{}/{}", name.domain, name.tenant, name.namespace, name.local)
}

/// The metastore key of a topic's own policies (Pulsar's topic-level policies: `messageTTL`).
/// Kept apart from the topic's keys, so that policies can be set on a partitioned topic's name.
pub fn topic_policies_key(name: &TopicName) -> String {
    format!("/topic-policies/{}/{}/{}/{}", name.domain, name.tenant, name.namespace, name.local)
}

/// The metastore key of a subscription's cursor.
pub fn cursor_key(name: &TopicName, subscription: &str) -> String {
    format!("{}/cursors/{}", topic_key(name), encode_segment(subscription))
}

/// The metastore key of a partitioned topic's partition count.
pub fn partitioned_key(name: &TopicName) -> String {
    format!("/partitioned/{}/{}/{}/{}", name.domain, name.tenant, name.namespace, name.local)
}

/// Escapes `%` and `/` so any subscription name is one key segment.
pub fn encode_segment(s: &str) -> String {
    s.replace('%', "%25").replace('/', "%2F")
}

/// One ledger of a topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerInfo {
    /// Ledger id.
    pub ledger_id: u64,
    /// Last entry once known closed (-1: empty; absent while written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_entry: Option<i64>,
    /// Bytes written, once closed by its writer (absent for a ledger closed by recovery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// When the ledger was closed, ms since the Unix epoch (retention by time counts from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
}

/// How long consumed data is kept: Pulsar's retention policy. A ledger whose every entry is
/// acknowledged by every durable subscription (any ledger but the current one, when the topic
/// has none) is deleted once it is older than `time` *or* the consumed ledgers exceed `size`
/// without it; `None` is no limit. Both zero (the default) keep nothing past acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Age limit of a consumed ledger, from its close.
    pub time: Option<Duration>,
    /// Size limit of the topic's ledgers, bytes.
    pub size: Option<u64>,
}

impl Retention {
    /// Nothing kept past acknowledgement (Pulsar's default).
    pub const NOTHING: Retention = Retention { time: Some(Duration::ZERO), size: Some(0) };

    /// From Pulsar's `retentionTimeInMinutes` and `retentionSizeInMB` (-1: no limit).
    pub fn from_pulsar(minutes: i64, mb: i64) -> Self {
        Retention {
            time: u64::try_from(minutes).ok().map(|m| Duration::from_secs(m.saturating_mul(60))),
            size: u64::try_from(mb).ok().map(|m| m.saturating_mul(1 << 20)),
        }
    }

    /// A namespace's `retention_policies` as the admin API stores them, if set and valid.
    pub fn from_policy(policies: &serde_json::Value) -> Option<Self> {
        let r = policies.get("retention_policies")?;
        let minutes = r.get("retentionTimeInMinutes")?.as_i64()?;
        let mb = r.get("retentionSizeInMB")?.as_i64()?;
        Some(Retention::from_pulsar(minutes, mb))
    }
}

/// How many of the oldest `ledgers` can be deleted: never the last (current) one, only
/// closed ledgers whose every entry is at or before `slowest` (the slowest subscription's
/// mark-delete position; `None`: no subscription holds anything), oldest first and
/// stopping at the first that retention keeps. `current_bytes` is what the ledger being
/// written holds so far (it counts towards the size limit).
pub fn trimmable(
    ledgers: &[LedgerInfo],
    current_bytes: u64,
    slowest: Option<Pos>,
    retention: Retention,
    now_ms: u64,
) -> usize {
    let total: u64 = ledgers.iter().filter_map(|l| l.size).sum::<u64>() + current_bytes;
    let mut deleted = 0u64;
    let mut n = 0;
    for l in ledgers.iter().take(ledgers.len().saturating_sub(1)) {
        let Some(last) = l.last_entry else { break };
        if slowest.is_some_and(|s| s < Pos::new(l.ledger_id, last)) {
            break;
        }
        // Pulsar's rule: past the age limit, or what stays without it still reaches the size.
        let expired = retention.time.is_some_and(|t| match l.timestamp {
            Some(ts) => t.is_zero() || Duration::from_millis(now_ms.saturating_sub(ts)) > t,
            // Age unknown (the topic loads stamp one): only "keep nothing" lets it go by time.
            None => t.is_zero(),
        });
        let size = l.size.unwrap_or(0);
        let over_size = retention.size.is_some_and(|limit| total - deleted - size >= limit);
        if !(expired || over_size) {
            break;
        }
        deleted += size;
        n += 1;
    }
    n
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A topic's managed-ledger metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManagedLedgerInfo {
    /// Ledgers, oldest first.
    pub ledgers: Vec<LedgerInfo>,
    /// Terminated: no more messages are accepted, consumers hear REACHED_END_OF_TOPIC once
    /// they have everything.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminated: bool,
    /// Moves on each time a producer takes exclusive access (Pulsar's topic epoch): an
    /// exclusive producer that lost the topic and reconnects with an older one is fenced.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub topic_epoch: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A partitioned topic's metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionedMetadata {
    /// Number of partitions.
    pub partitions: u32,
}

/// Why a topic operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// A ledger operation failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// A metastore call failed.
    #[error("metastore: {0}")]
    Meta(#[from] ClientError),
    /// Someone else changed the topic's metadata meanwhile.
    #[error("topic {0} was changed concurrently")]
    Conflict(String),
    /// The stored metadata does not parse.
    #[error("topic {topic} metadata is unreadable: {reason}")]
    BadMetadata {
        /// Topic.
        topic: String,
        /// Why.
        reason: String,
    },
    /// The topic does not exist and auto-creation is off.
    #[error("topic {0} does not exist")]
    NotFound(String),
    /// The operation is refused in the topic's state.
    #[error("{0}")]
    Refused(String),
    /// The topic's task has stopped (failed or closed).
    #[error("topic {0} is not available")]
    Unavailable(String),
    /// Another broker serves the topic (or ownership could not be decided): look it up again.
    #[error("topic {topic} is not served by this broker: {why}")]
    NotOwned {
        /// Topic.
        topic: String,
        /// Who serves it, or why it is unknown.
        why: String,
    },
}

impl TopicError {
    /// The Pulsar error code for this failure.
    pub fn server_error(&self) -> pb::ServerError {
        match self {
            TopicError::NotFound(_) => pb::ServerError::TopicNotFound,
            TopicError::Meta(_) | TopicError::BadMetadata { .. } | TopicError::Conflict(_) => {
                pb::ServerError::MetadataError
            }
            TopicError::Ledger(_) => pb::ServerError::PersistenceError,
            TopicError::Unavailable(_) | TopicError::NotOwned { .. } => pb::ServerError::ServiceNotReady,
            TopicError::Refused(_) => pb::ServerError::NotAllowedError,
        }
    }
}

/// Per-topic settings from the broker configuration.
#[derive(Clone, Debug)]
pub struct TopicSettings {
    /// (E, Qw, Qa) of new ledgers.
    pub ensemble: (usize, usize, usize),
    /// Create topics on first use.
    pub auto_create: bool,
    /// Partitions of auto-created topics (0: non-partitioned).
    pub auto_partitions: u32,
    /// Roll the ledger after this many entries.
    pub max_entries_per_ledger: u64,
    /// Roll the ledger after this many bytes.
    pub max_bytes_per_ledger: u64,
    /// Roll a ledger with entries after this long.
    pub max_ledger_age: Duration,
    /// The budget all topics' tail caches share.
    pub cache: Arc<CacheBudget>,
    /// Cached entries older than this leave the tail cache.
    pub cache_age: Duration,
    /// How often changed cursors are stored.
    pub cursor_persist_interval: Duration,
    /// Entries per catch-up read.
    pub read_batch: usize,
    /// Bytes per catch-up read (see [`crate::topic::actor`]'s `read_batch`).
    pub read_bytes: usize,
    /// Retention of namespaces without a retention policy.
    pub retention: Retention,
    /// How often a topic checks for consumed ledgers that retention no longer keeps (it also
    /// checks at each rollover and when a subscription's position moves).
    pub retention_check_interval: Duration,
    /// Message TTL of namespaces without a TTL policy, seconds (0: none).
    pub message_ttl: u64,
    /// How often a topic expires messages past their TTL.
    pub expiry_check_interval: Duration,
    /// Backlog quota of namespaces without one.
    pub backlog_quota: Option<quota::BacklogQuota>,
    /// How often a topic checks its backlog quota (`None`: quotas are not enforced).
    pub quota_check_interval: Option<Duration>,
    /// Deduplication in namespaces without a `deduplicationEnabled` policy.
    pub deduplication: bool,
    /// Entries between two deduplication snapshots.
    pub dedup_snapshot_entries: u64,
    /// A producer name with no producer connected for this long is forgotten.
    pub producer_inactivity: Duration,
}

impl Default for TopicSettings {
    fn default() -> Self {
        TopicSettings {
            ensemble: (1, 1, 1),
            auto_create: true,
            auto_partitions: 0,
            max_entries_per_ledger: 50_000,
            max_bytes_per_ledger: 2 << 30,
            max_ledger_age: Duration::from_secs(240 * 60),
            cache: CacheBudget::new(512 << 20),
            cache_age: Duration::from_secs(1),
            cursor_persist_interval: Duration::from_millis(200),
            read_batch: 100,
            read_bytes: 5 << 20,
            retention: Retention::NOTHING,
            retention_check_interval: Duration::from_secs(120),
            message_ttl: 0,
            expiry_check_interval: Duration::from_secs(300),
            backlog_quota: None,
            quota_check_interval: Some(Duration::from_secs(60)),
            deduplication: false,
            dedup_snapshot_entries: 1000,
            producer_inactivity: Duration::from_secs(360 * 60),
        }
    }
}

/// A loaded topic: its name and the channel to its task.
#[derive(Clone)]
pub struct Topic {
    /// Its name.
    pub name: TopicName,
    tx: mpsc::UnboundedSender<Cmd>,
    /// An unload asked its task to close: loads wait for it to finish.
    closing: Arc<std::sync::atomic::AtomicBool>,
}

impl Topic {
    /// Sends a command to the topic's task.
    pub fn send(&self, cmd: Cmd) -> Result<(), TopicError> {
        self.tx.send(cmd).map_err(|_| TopicError::Unavailable(self.name.to_string()))
    }

    /// Whether the topic's task has stopped.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Whether an unload asked its task to close (it may still be closing).
    fn is_closing(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Appends an entry; resolves with its position once stored.
    pub fn append(
        &self,
        entry: Bytes,
        info: EntryInfo,
        producer: Option<SentBy>,
    ) -> impl std::future::Future<Output = Result<Pos, AppendError>> + Send + 'static {
        let (done, rx) = oneshot::channel();
        let sent = self.tx.send(Cmd::Append { entry, info, producer, done }).is_ok();
        let name = self.name.to_string();
        async move {
            // The topic's task stopped and told its producers to reconnect.
            let gone = || AppendError::closing(format!("topic {name} is not available"));
            if !sent {
                return Err(gone());
            }
            rx.await.unwrap_or_else(|_| Err(gone()))
        }
    }

    /// Asks for an answer through `make`.
    pub async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, TopicError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await.map_err(|_| TopicError::Unavailable(self.name.to_string()))
    }
}

/// The topics this broker has loaded.
pub struct Topics {
    meta: MetaClient,
    ledgers: LedgerClient,
    ownership: Arc<Ownership>,
    settings: Arc<TopicSettings>,
    loaded: Mutex<HashMap<TopicName, Arc<OnceCell<Topic>>>>,
    /// Ledgers no topic listed, deleted by [`orphans::run`].
    orphans_deleted: std::sync::atomic::AtomicU64,
}

impl Topics {
    /// Topics with `settings`, served while `ownership` holds their bundles.
    pub fn new(meta: MetaClient, ledgers: LedgerClient, settings: TopicSettings, ownership: Arc<Ownership>) -> Self {
        Topics {
            meta,
            ledgers,
            ownership,
            settings: Arc::new(settings),
            loaded: Mutex::new(HashMap::new()),
            orphans_deleted: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// This broker's bundle ownership.
    pub fn ownership(&self) -> &Arc<Ownership> {
        &self.ownership
    }

    /// The settings topics run with (the broker's policy defaults among them).
    pub fn settings(&self) -> &TopicSettings {
        &self.settings
    }

    /// The metastore client.
    pub fn meta(&self) -> &MetaClient {
        &self.meta
    }

    /// The ledger client topics write through.
    pub fn ledgers(&self) -> &LedgerClient {
        &self.ledgers
    }

    /// Ledgers no topic listed that this broker deleted since it started.
    pub fn orphans_deleted(&self) -> u64 {
        self.orphans_deleted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The loaded topic, loading it if needed. Concurrent callers share one load; a topic
    /// whose task stopped is loaded again.
    pub async fn get_or_load(&self, name: &TopicName) -> Result<Topic, TopicError> {
        for _ in 0..3 {
            let cell = {
                let mut loaded = self.loaded.lock().await;
                let cell = loaded.entry(name.clone()).or_default().clone();
                if cell.get().is_some_and(|t| t.is_closed()) {
                    let fresh = Arc::new(OnceCell::new());
                    loaded.insert(name.clone(), fresh.clone());
                    fresh
                } else {
                    cell
                }
            };
            let r = cell.get_or_try_init(|| self.load(name)).await;
            match r {
                // Being unloaded: a second task loading the topic now would fence the ledger the
                // first one is closing and find its cursors not yet stored.
                Ok(t) if t.is_closing() => {
                    t.tx.closed().await;
                    continue;
                }
                Ok(t) if !t.is_closed() => return Ok(t.clone()),
                Ok(_) => continue,
                Err(e) => {
                    let mut loaded = self.loaded.lock().await;
                    if loaded.get(name).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                        loaded.remove(name);
                    }
                    return Err(e);
                }
            }
        }
        Err(TopicError::Unavailable(name.to_string()))
    }

    /// Whether `name` is loaded and serving (not closing): [`Topics::get_or_load`] then answers
    /// at once.
    pub async fn is_serving(&self, name: &TopicName) -> bool {
        let loaded = self.loaded.lock().await;
        loaded.get(name).and_then(|c| c.get()).is_some_and(|t| !t.is_closed() && !t.is_closing())
    }

    /// Whether topic `name` exists: it has a ledger list, or it is a partition of a
    /// partitioned topic (a partition's list is made on its first use).
    pub async fn exists(&self, name: &TopicName) -> Result<bool, TopicError> {
        if self.meta.get(&topic_key(name)).await?.is_some() {
            return Ok(true);
        }
        let Some(i) = name.partition() else { return Ok(false) };
        let Some(kv) = self.meta.get(&partitioned_key(&name.partitioned_parent())).await? else { return Ok(false) };
        let md: PartitionedMetadata = serde_json::from_slice(&kv.value)
            .map_err(|e| TopicError::BadMetadata { topic: name.to_string(), reason: e.to_string() })?;
        Ok(i < md.partitions)
    }

    /// The partition count of `name` (0: not partitioned). With auto-creation of partitioned
    /// topics on, a topic that does not exist yet is created partitioned.
    pub async fn partitions(&self, name: &TopicName) -> Result<u32, TopicError> {
        if name.partition().is_some() {
            return Ok(0);
        }
        let key = partitioned_key(name);
        if let Some(kv) = self.meta.get(&key).await? {
            let md: PartitionedMetadata = serde_json::from_slice(&kv.value)
                .map_err(|e| TopicError::BadMetadata { topic: name.to_string(), reason: e.to_string() })?;
            return Ok(md.partitions);
        }
        if !self.settings.auto_create || self.settings.auto_partitions == 0 {
            return Ok(0);
        }
        // Only a topic that does not exist non-partitioned becomes partitioned.
        if self.meta.get(&topic_key(name)).await?.is_some() {
            return Ok(0);
        }
        let md = PartitionedMetadata { partitions: self.settings.auto_partitions };
        let body = serde_json::to_vec(&md).unwrap_or_default();
        match self.meta.put(&key, body, PutOptions { expected_version: Some(0), session: 0 }).await {
            Ok(_) | Err(ClientError::BadVersion { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        Box::pin(self.partitions(name)).await
    }

    /// Deletes a topic (see [`Cmd::Delete`]).
    pub async fn delete(&self, name: &TopicName, force: bool) -> Result<(), TopicError> {
        if self.meta.get(&topic_key(name)).await?.is_none() {
            return Err(TopicError::NotFound(name.to_string()));
        }
        let topic = self.get_or_load(name).await?;
        topic.ask(|done| Cmd::Delete { force, done }).await?.map_err(TopicError::Refused)?;
        let mut loaded = self.loaded.lock().await;
        if loaded.get(name).and_then(|c| c.get()).is_some_and(|t| t.is_closed()) {
            loaded.remove(name);
        }
        Ok(())
    }

    /// Closes a loaded topic (cursors stored, ledger closed); the next use loads it again, once
    /// the close has finished.
    pub async fn unload(&self, name: &TopicName) -> bool {
        let Some(cell) = self.loaded.lock().await.get(name).cloned() else { return false };
        // Not loaded yet (a load is on its way): nothing to close.
        let Some(t) = cell.get().cloned() else { return false };
        t.closing.store(true, std::sync::atomic::Ordering::Release);
        let closed = t.ask(|done| Cmd::Close { done }).await.is_ok();
        // The task returns right after answering.
        t.tx.closed().await;
        let mut loaded = self.loaded.lock().await;
        if loaded.get(name).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            loaded.remove(name);
        }
        closed
    }

    /// The topics loaded now.
    pub async fn loaded(&self) -> Vec<Topic> {
        let loaded = self.loaded.lock().await;
        loaded.values().filter_map(|c| c.get().cloned()).filter(|t| !t.is_closed()).collect()
    }

    /// Closes every loaded topic: stores cursors and closes ledgers.
    pub async fn close_all(&self) {
        let topics: Vec<(TopicName, Arc<OnceCell<Topic>>, Topic)> = {
            let loaded = self.loaded.lock().await;
            loaded.iter().filter_map(|(n, c)| c.get().map(|t| (n.clone(), c.clone(), t.clone()))).collect()
        };
        // As in an unload: requests meanwhile wait for the close instead of loading a second
        // task, which would fence the ledger being closed and refuse its cursor writes.
        for (_, _, t) in &topics {
            t.closing.store(true, std::sync::atomic::Ordering::Release);
        }
        let closes = topics.iter().map(|(_, _, t)| async move {
            let _ = t.ask(|done| Cmd::Close { done }).await;
            t.tx.closed().await;
        });
        futures::future::join_all(closes).await;
        let mut loaded = self.loaded.lock().await;
        for (name, cell, _) in topics {
            if loaded.get(&name).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                loaded.remove(&name);
            }
        }
    }

    async fn load(&self, name: &TopicName) -> Result<Topic, TopicError> {
        let not_owned = |why: String| TopicError::NotOwned { topic: name.to_string(), why };
        let epoch = self.ownership.epoch();
        match self.ownership.resolve(name, true).await {
            Ok(Owner::Me) => {}
            Ok(Owner::Other(b) | Owner::Candidate(b)) => return Err(not_owned(format!("served by {}", b.broker_url))),
            Err(e) => return Err(not_owned(e.to_string())),
        }
        let key = topic_key(name);
        let (mut info, version) = match self.meta.get(&key).await? {
            Some(kv) => {
                let info: ManagedLedgerInfo = serde_json::from_slice(&kv.value)
                    .map_err(|e| TopicError::BadMetadata { topic: name.to_string(), reason: e.to_string() })?;
                (info, kv.version)
            }
            None if self.settings.auto_create || name.partition().is_some() => (ManagedLedgerInfo::default(), 0),
            None => return Err(TopicError::NotFound(name.to_string())),
        };
        // Ledgers closed before close times were recorded: their age counts from now.
        for l in info.ledgers.iter_mut().filter(|l| l.last_entry.is_some() && l.timestamp.is_none()) {
            l.timestamp = Some(now_ms());
        }
        // Fence and close whatever a previous owner was writing. Not once this broker's session
        // is lost: the topic may have a new owner whose ledger this would fence.
        let lost = || not_owned("the broker's metastore session was lost while loading".into());
        for l in info.ledgers.iter_mut().filter(|l| l.last_entry.is_none()) {
            if self.ownership.epoch() != epoch {
                return Err(lost());
            }
            let md = self.ledgers.recover(l.ledger_id).await?;
            l.last_entry = Some(md.last_entry);
            l.timestamp = Some(now_ms());
            tracing::info!(topic = %name, ledger = md.id, last_entry = md.last_entry, "recovered a ledger");
        }
        // A terminated topic gets no new ledger.
        let conflict = |e| match e {
            TopicError::Meta(ClientError::BadVersion { .. }) => TopicError::Conflict(name.to_string()),
            e => e,
        };
        if self.ownership.epoch() != epoch {
            return Err(lost());
        }
        let (writer, info, version) = if info.terminated {
            let version = put_info(&self.meta, &key, &info, version).await.map_err(conflict)?;
            (None, info, version)
        } else {
            let (w, info, version) = create_listed(&self.ledgers, &self.settings, name, &key, &info, version).await?;
            (Some(w), info, version)
        };
        let span =
            LedgerSpan::new(info.ledgers.iter().map(|l| (l.ledger_id, l.last_entry.unwrap_or(-1))).collect::<Vec<_>>());
        tracing::info!(topic = %name, ledger = ?writer.as_ref().map(|w| w.id()), ledgers = info.ledgers.len(), "topic loaded");
        let tx = actor::spawn(actor::Init {
            name: name.clone(),
            key,
            meta: self.meta.clone(),
            ledgers: self.ledgers.clone(),
            settings: self.settings.clone(),
            info,
            version,
            span,
            writer,
        });
        let topic = Topic { name: name.clone(), tx, closing: Arc::default() };
        if self.ownership.epoch() != epoch {
            // The session was lost while loading, after every loaded topic was unloaded:
            // this one must not stay either.
            let _ = topic.ask(|done| Cmd::Close { done }).await;
            return Err(lost());
        }
        Ok(topic)
    }
}

/// Creates the topic's next ledger and lists it: `info` with the new ledger appended is stored
/// at `key`, by compare-and-swap on `version`, in the same metastore transaction that creates
/// the ledger. So no crash leaves a ledger the topic does not list (and never deletes), and a
/// lost race creates nothing. Returns the writer, the stored list and its version.
async fn create_listed(
    ledgers: &LedgerClient,
    settings: &TopicSettings,
    name: &TopicName,
    key: &str,
    info: &ManagedLedgerInfo,
    version: u64,
) -> Result<(magnetar_bookie::client::LedgerWriter, ManagedLedgerInfo, u64), TopicError> {
    let (e, qw, qa) = settings.ensemble;
    let mut cfg = LedgerConfig::new(e, qw, qa);
    cfg.custom.insert(TOPIC_PROPERTY.into(), name.to_string());
    let mut listed = info.clone();
    let created = ledgers
        .create_with(cfg, |id| {
            listed.ledgers.push(LedgerInfo { ledger_id: id, last_entry: None, size: None, timestamp: None });
            let body = serde_json::to_vec(&listed).map_err(|e| LedgerError::Invalid(e.to_string()))?;
            Ok(Txn::default().compare(key, version).put(key, body, 0))
        })
        .await?;
    match created {
        Some((writer, revision)) => Ok((writer, listed, revision)),
        None => Err(TopicError::Conflict(name.to_string())),
    }
}

/// The ledger property naming the topic a broker created a ledger for.
pub const TOPIC_PROPERTY: &str = "topic";

async fn put_info(meta: &MetaClient, key: &str, info: &ManagedLedgerInfo, version: u64) -> Result<u64, TopicError> {
    let body =
        serde_json::to_vec(info).map_err(|e| TopicError::BadMetadata { topic: key.into(), reason: e.to_string() })?;
    Ok(meta.put(key, body, PutOptions { expected_version: Some(version), session: 0 }).await?)
}

impl Topics {
    /// The persistent topics of `namespace` (`tenant/namespace`), partitions included and
    /// partitioned topics listed by their partitions, as clients expect.
    pub async fn list_namespace(&self, namespace: &str) -> Result<Vec<String>, TopicError> {
        let Some((tenant, ns)) = namespace.split_once('/') else {
            return Err(TopicError::BadMetadata {
                topic: namespace.into(),
                reason: "expected tenant/namespace".into(),
            });
        };
        let mut out = std::collections::BTreeSet::new();
        let prefix = format!("/topics/persistent/{tenant}/{ns}/");
        for kv in self.meta.list(&prefix).await? {
            let local = &kv.key[prefix.len()..];
            if !local.contains('/') {
                out.insert(format!("persistent://{tenant}/{ns}/{local}"));
            }
        }
        let prefix = format!("/partitioned/persistent/{tenant}/{ns}/");
        for kv in self.meta.list(&prefix).await? {
            let local = &kv.key[prefix.len()..];
            if let Ok(md) = serde_json::from_slice::<PartitionedMetadata>(&kv.value) {
                for i in 0..md.partitions {
                    out.insert(format!(
                        "persistent://{tenant}/{ns}/{local}{}{i}",
                        crate::protocol::names::PARTITION_SUFFIX
                    ));
                }
            }
        }
        Ok(out.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Closed ledgers 1..=3 of 10 entries and 1 MiB each, closed at 1000, 2000 and 3000 ms, then
    /// the current ledger 4.
    fn ledgers() -> Vec<LedgerInfo> {
        let closed = |id: u64| LedgerInfo {
            ledger_id: id,
            last_entry: Some(9),
            size: Some(1 << 20),
            timestamp: Some(id * 1000),
        };
        vec![
            closed(1),
            closed(2),
            closed(3),
            LedgerInfo { ledger_id: 4, last_entry: None, size: None, timestamp: None },
        ]
    }

    const NOTHING: Retention = Retention::NOTHING;
    const FOREVER: Retention = Retention { time: None, size: None };

    #[test]
    fn only_ledgers_every_subscription_consumed_go() {
        let l = ledgers();
        assert_eq!(trimmable(&l, 0, Some(Pos::new(1, -1)), NOTHING, 5000), 0);
        assert_eq!(trimmable(&l, 0, Some(Pos::new(1, 8)), NOTHING, 5000), 0, "one entry of ledger 1 is unacknowledged");
        assert_eq!(trimmable(&l, 0, Some(Pos::new(1, 9)), NOTHING, 5000), 1);
        assert_eq!(trimmable(&l, 0, Some(Pos::new(3, 0)), NOTHING, 5000), 2);
        assert_eq!(trimmable(&l, 0, Some(Pos::new(4, 5)), NOTHING, 5000), 3, "the current ledger always stays");
        assert_eq!(trimmable(&l, 0, None, NOTHING, 5000), 3, "no subscription holds anything");
        assert_eq!(trimmable(&l[..1], 0, None, NOTHING, 5000), 0, "a lone ledger is the current one");
        // A ledger still being written (no last entry) stops the scan.
        let mut open = l.clone();
        open[1].last_entry = None;
        assert_eq!(trimmable(&open, 0, None, NOTHING, 5000), 1);
    }

    #[test]
    fn retention_keeps_consumed_ledgers_by_age_or_size() {
        let l = ledgers();
        assert_eq!(trimmable(&l, 0, None, FOREVER, 5000), 0);
        // Older than 2.5 s at 5 s: ledgers closed at 1 s and 2 s.
        let by_time = Retention { time: Some(Duration::from_millis(2500)), size: None };
        assert_eq!(trimmable(&l, 0, None, by_time, 5000), 2);
        assert_eq!(trimmable(&l, 0, None, by_time, 3000), 0);
        // 3 MiB in closed ledgers: a ledger goes while what stays without it reaches the limit.
        let by_size = |mb: i64| Retention::from_pulsar(-1, mb);
        assert_eq!(trimmable(&l, 0, None, by_size(1), 0), 2);
        assert_eq!(trimmable(&l, 0, None, by_size(2), 0), 1, "without ledger 2, 1 MiB would stay");
        assert_eq!(trimmable(&l, 0, None, by_size(3), 0), 0);
        // The ledger being written counts too.
        assert_eq!(trimmable(&l, 1 << 20, None, by_size(2), 0), 2);
        // Either limit passed is enough (Pulsar's rule).
        let both = Retention { time: Some(Duration::from_millis(1500)), size: Some(4 << 20) };
        assert_eq!(trimmable(&l, 0, None, both, 3000), 1);
        // Subscriptions still come first.
        assert_eq!(trimmable(&l, 0, Some(Pos::new(2, 3)), by_time, 5000), 1);
        // A ledger closed by a recovery has no known age: only "keep nothing" lets it go by time.
        let mut recovered = l.clone();
        recovered[0].timestamp = None;
        assert_eq!(trimmable(&recovered, 0, None, by_time, 5000), 0);
        assert_eq!(trimmable(&recovered, 0, None, NOTHING, 5000), 3);
    }

    #[test]
    fn retention_policies_read_as_pulsar_writes_them() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"retention_policies":{"retentionTimeInMinutes":60,"retentionSizeInMB":-1},"bundles":{}}"#,
        )
        .unwrap_or_default();
        assert_eq!(Retention::from_policy(&v), Some(Retention { time: Some(Duration::from_secs(3600)), size: None }));
        assert_eq!(Retention::from_policy(&serde_json::json!({"bundles": {}})), None);
        assert_eq!(Retention::from_pulsar(0, 0), NOTHING);
        assert_eq!(Retention::from_pulsar(-1, -1), FOREVER);
        assert_eq!(Retention::from_pulsar(1, 10).size, Some(10 << 20));
    }
}
