//! The task that owns one topic: its managed ledger (appends, rollover, tail cache, catch-up
//! reads), producers, subscriptions with their cursors and dispatchers.
//!
//! Everything about the topic happens in this task, in order; slow work (ledger reads, cursor
//! writes) runs in spawned tasks that report back with a command. Consumers get their replies
//! and messages through their connection's outgoing queue, so a SUBSCRIBE's SUCCESS always
//! precedes its first MESSAGE.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use magnetar_bookie::client::{LedgerClient, LedgerError, LedgerReader, LedgerWriter};
use magnetar_metastore::client::{ClientError, MetaClient, PutOptions, Txn};
use tokio::sync::{mpsc, oneshot};

use super::cache::TailCache;
use super::cursor::{Cursor, CursorInfo};
use super::keys::{self, KeySelector};
use super::position::{LedgerSpan, Pos};
use super::stats::{self, Rate, TopicStats};
use super::{create_listed, cursor_key, put_info, ManagedLedgerInfo, Retention, TopicSettings};
use crate::protocol::codec::{base, decode_entry, first_batch_item};
use crate::protocol::connection::error_command;
use crate::protocol::names::TopicName;
use crate::protocol::pb;
use pb::base_command::Type;
use pb::command_subscribe::SubType;

mod dedup;
mod ops;

pub use dedup::dedup_key;
pub use ops::{CreateAt, SubAnswer, SubError, SubOp};

/// What a connection writes: a command, or a MESSAGE with its stored entry.
#[derive(Debug)]
pub enum Out {
    /// A command without payload.
    Cmd(pb::BaseCommand),
    /// A command followed by a stored entry (`[metadataSize][MessageMetadata][payload]`) and
    /// its CRC32C when known.
    Msg(pb::BaseCommand, Bytes, Option<u32>),
}

/// A connection's outgoing queue.
pub type OutTx = mpsc::UnboundedSender<Out>;

/// What dispatch needs to know about an entry, taken from its metadata once.
#[derive(Clone, Copy, Debug)]
pub struct EntryInfo {
    /// Messages in the entry (a batch counts each).
    pub num_messages: u32,
    /// Publish time (ms since the epoch).
    pub publish_time: u64,
    /// Key_Shared slot of its sticky key.
    pub slot: u32,
    /// Whether the entry is a batch.
    pub batched: bool,
    /// Not to be delivered before this time (ms since the epoch; 0: at once): Pulsar's
    /// delayed delivery (`deliverAfter` / `deliverAt`), for Shared and Key_Shared
    /// subscriptions.
    pub deliver_at: u64,
    /// The entry's CRC32C, when its producer's frame carried it (entries read back from the
    /// bookies have it computed again as they are sent).
    pub crc: Option<u32>,
}

impl EntryInfo {
    /// From an entry's metadata and payload. A batch whose metadata has no key is keyed by
    /// its first message (key-based batching puts one key in each batch).
    pub fn from_entry(md: &pb::MessageMetadata, data: &Bytes) -> Self {
        let batched = md.num_messages_in_batch.is_some();
        let mut key = keys::sticky_key(md);
        if key == keys::NONE_KEY && batched && md.compression.unwrap_or(0) == 0 {
            if let Ok(first) = first_batch_item(data) {
                let m = &first.metadata;
                if let Some(k) = m.ordering_key.as_ref().filter(|k| !k.is_empty()) {
                    key = k.to_vec();
                } else if let Some(k) = m.partition_key.as_ref().filter(|k| !k.is_empty()) {
                    key = k.as_bytes().to_vec();
                }
            }
        }
        EntryInfo {
            num_messages: md.num_messages_in_batch.unwrap_or(1).max(1) as u32,
            publish_time: md.publish_time,
            slot: keys::slot(&key),
            batched,
            deliver_at: md.deliver_at_time.unwrap_or(0).max(0) as u64,
            crc: None,
        }
    }
}

/// Why an append failed, with the code the producer gets in SEND_ERROR.
#[derive(Debug, Clone)]
pub struct AppendError {
    /// The Pulsar error code.
    pub code: pb::ServerError,
    /// Why.
    pub message: String,
}

impl From<String> for AppendError {
    fn from(message: String) -> Self {
        AppendError { code: pb::ServerError::PersistenceError, message }
    }
}

impl AppendError {
    /// The topic stopped (unloaded, failed, deleted) before the entry was stored. Its
    /// producers are told with CLOSE_PRODUCER and resend what is pending once they reconnect,
    /// so no SEND_ERROR goes out (with one, Java and C++ clients drop the whole connection,
    /// every other producer and consumer on it included).
    pub fn closing(message: String) -> Self {
        AppendError { code: pb::ServerError::ServiceNotReady, message }
    }

    /// Whether it is [`AppendError::closing`].
    pub fn is_closing(&self) -> bool {
        self.code == pb::ServerError::ServiceNotReady
    }
}

impl std::fmt::Display for AppendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Where a seek goes.
#[derive(Clone, Debug)]
pub enum SeekTarget {
    /// To a message id (the entry holding it is delivered again).
    Id(pb::MessageIdData),
    /// To the first message published at or after this time (ms).
    PublishTime(u64),
}

/// A consumer joining a subscription.
pub struct ConsumerSpec {
    /// The connection's id.
    pub conn: u64,
    /// The client's consumer id.
    pub consumer_id: u64,
    /// The SUBSCRIBE request id.
    pub request_id: u64,
    /// Subscription name.
    pub subscription: String,
    /// Subscription type.
    pub sub_type: SubType,
    /// Consumer name.
    pub name: String,
    /// Priority level (lower is preferred by failover).
    pub priority: i32,
    /// Durable (a named subscription) or not (a reader).
    pub durable: bool,
    /// Where a new subscription starts: `true` = earliest.
    pub earliest: bool,
    /// A reader's start message id.
    pub start: Option<pb::MessageIdData>,
    /// A reader starts at the first message published this many seconds ago or later (0: off).
    pub rollback_secs: u64,
    /// Sticky hash ranges (Key_Shared sticky mode).
    pub ranges: Vec<(u32, u32)>,
    /// Subscription properties.
    pub properties: BTreeMap<String, String>,
    /// The negotiated protocol version.
    pub protocol_version: i32,
    /// The client's consumer epoch, echoed on every MESSAGE (see [`Cmd::Redeliver`]).
    pub epoch: Option<u64>,
    /// The connection's outgoing queue.
    pub out: OutTx,
    /// The connection's liveness, checked before an exclusive subscription is refused.
    pub live: super::Liveness,
    /// Served again after the holder of the exclusive subscription failed its check.
    pub checked: bool,
}

/// A PRODUCER, as its topic serves it. The topic answers it (PRODUCER_SUCCESS, or ERROR for
/// a `WaitForExclusive` producer refused later) through the connection's queue, so that the
/// answer and a CLOSE_PRODUCER for the same producer go out in the order they happened.
pub struct ProducerRequest {
    /// Connection id.
    pub conn: u64,
    /// Producer id.
    pub producer_id: u64,
    /// The PRODUCER's request id.
    pub request_id: u64,
    /// Requested name.
    pub name: Option<String>,
    /// Its connection's queue (to close it when the topic fails).
    pub out: OutTx,
    /// Its connection's liveness, checked before its name is refused as taken.
    pub live: super::Liveness,
    /// Served again after the holder of the name failed its check.
    pub checked: bool,
    /// The access it asks for.
    pub access: pb::ProducerAccessMode,
    /// The topic epoch it had (an exclusive producer reconnecting).
    pub topic_epoch: Option<u64>,
    /// What the topic tells the connection about it.
    pub state: Arc<ProducerState>,
    /// Registered (or queued for exclusive access, answered "not ready"), under this name; or
    /// why not (the connection answers that).
    pub done: oneshot::Sender<Result<String, (pb::ServerError, String)>>,
}

/// What a producer's topic tells its connection.
#[derive(Debug, Default)]
pub struct ProducerState {
    /// It may send (false while a `WaitForExclusive` producer waits).
    pub ready: std::sync::atomic::AtomicBool,
    /// The topic closed it (fenced, or the topic stops) or refused it: its connection takes no
    /// more sends for it, and serves its reconnect anew.
    pub closed: std::sync::atomic::AtomicBool,
    /// The topic epoch of an exclusive producer (0: none).
    pub topic_epoch: std::sync::atomic::AtomicU64,
    /// Its name, set before PRODUCER_SUCCESS is sent (unset while its PRODUCER is served).
    pub name: std::sync::OnceLock<String>,
    /// The version of the schema it registered (see [`super::schema`]), set before its
    /// PRODUCER reaches the topic; unset for producers without a schema.
    pub schema_version: std::sync::OnceLock<u64>,
}

/// PRODUCER_SUCCESS.
pub fn producer_success(
    request_id: u64,
    name: String,
    last: i64,
    epoch: Option<u64>,
    ready: bool,
    schema_version: Option<u64>,
) -> pb::BaseCommand {
    pb::BaseCommand {
        producer_success: Some(Box::new(pb::CommandProducerSuccess {
            request_id,
            producer_name: name,
            last_sequence_id: Some(last),
            topic_epoch: epoch,
            producer_ready: (!ready).then_some(false),
            schema_version: schema_version.map(super::schema::version_bytes),
        })),
        ..base(Type::ProducerSuccess)
    }
}

/// A producer of the topic.
struct Registered {
    name: String,
    request_id: u64,
    /// Its connection's queue.
    out: OutTx,
    live: super::Liveness,
    state: Arc<ProducerState>,
}

impl Registered {
    /// Closes the producer: its client reconnects it.
    fn close(self, producer_id: u64) {
        self.state.closed.store(true, std::sync::atomic::Ordering::Release);
        let _ = self.out.send(close_producer(producer_id));
    }

    /// Refuses a producer that was answered "not ready".
    fn refuse(self, code: pb::ServerError, why: String) {
        self.state.closed.store(true, std::sync::atomic::Ordering::Release);
        let _ = self.out.send(Out::Cmd(error_command(self.request_id, code, why)));
    }

    /// Answers its PRODUCER: it may send.
    fn grant(&self, last: i64, epoch: Option<u64>) {
        self.state.topic_epoch.store(epoch.unwrap_or(0), std::sync::atomic::Ordering::Release);
        self.answer(last, epoch, true);
    }

    /// PRODUCER_SUCCESS, `ready` or not; its connection knows the name before the client does.
    fn answer(&self, last: i64, epoch: Option<u64>, ready: bool) {
        self.state.ready.store(ready, std::sync::atomic::Ordering::Release);
        let _ = self.state.name.set(self.name.clone());
        let version = self.state.schema_version.get().copied();
        let _ =
            self.out.send(Out::Cmd(producer_success(self.request_id, self.name.clone(), last, epoch, ready, version)));
    }
}

/// A `WaitForExclusive` producer waiting for the topic.
struct Queued {
    key: (u64, u64),
    producer: Registered,
    topic_epoch: Option<u64>,
}

/// Commands to a topic's task.
pub enum Cmd {
    /// Append an entry.
    Append {
        /// `[metadataSize][MessageMetadata][payload]`.
        entry: Bytes,
        /// Its dispatch facts.
        info: EntryInfo,
        /// The producer's name and the entry's highest sequence id.
        /// Who sent it.
        producer: Option<SentBy>,
        /// The position once stored.
        done: oneshot::Sender<Result<Pos, AppendError>>,
    },
    /// Register a producer.
    AddProducer(Box<ProducerRequest>),
    /// Unregister a producer.
    RemoveProducer {
        /// Connection id.
        conn: u64,
        /// Producer id.
        producer_id: u64,
    },
    /// A consumer joins (answered through its queue).
    Subscribe(Box<ConsumerSpec>),
    /// Permits.
    Flow {
        /// (connection, consumer id).
        key: (u64, u64),
        /// More messages it may receive.
        permits: u32,
    },
    /// Acknowledgements.
    Ack {
        /// (connection, consumer id).
        key: (u64, u64),
        /// The ACK.
        ack: pb::CommandAck,
    },
    /// Redeliver some (or all, when empty) unacknowledged messages of a consumer.
    Redeliver {
        /// (connection, consumer id).
        key: (u64, u64),
        /// Which.
        ids: Vec<pb::MessageIdData>,
        /// The client's new consumer epoch: messages sent from now on carry it, and the
        /// client drops those still on their way from before (they come again).
        epoch: Option<u64>,
    },
    /// A consumer leaves; its unacknowledged messages go to others.
    CloseConsumer {
        /// (connection, consumer id).
        key: (u64, u64),
    },
    /// Delete the subscription (answered through the queue).
    Unsubscribe {
        /// (connection, consumer id).
        key: (u64, u64),
        /// Request id.
        request_id: u64,
        /// Where the answer goes if the consumer is gone.
        out: OutTx,
        /// Even with other consumers connected.
        force: bool,
    },
    /// Reset the subscription (answered through the queue; its consumers are then closed).
    Seek {
        /// (connection, consumer id).
        key: (u64, u64),
        /// Request id.
        request_id: u64,
        /// Where the answer goes if the consumer is gone.
        out: OutTx,
        /// Where.
        target: SeekTarget,
    },
    /// Last message id (answered through the queue).
    LastMessageId {
        /// (connection, consumer id).
        key: (u64, u64),
        /// Request id.
        request_id: u64,
        /// Where the answer goes if the consumer is gone.
        out: OutTx,
    },
    /// Consumer statistics (answered through the queue).
    ConsumerStats {
        /// (connection, consumer id).
        key: (u64, u64),
        /// Request id.
        request_id: u64,
        /// Where the answer goes if the consumer is gone.
        out: OutTx,
    },
    /// Delete the topic: cursors, ledger list and ledgers. Without `force`, refused while
    /// producers or consumers are connected.
    Delete {
        /// Even with clients connected (they are disconnected).
        force: bool,
        /// Done, or why not.
        done: oneshot::Sender<Result<(), String>>,
    },
    /// An admin operation on a subscription.
    SubAdmin {
        /// Subscription.
        sub: String,
        /// What to do.
        op: SubOp,
        /// The answer.
        done: oneshot::Sender<Result<SubAnswer, SubError>>,
    },
    /// Internal state: ledgers and cursors (JSON as Pulsar's `internalStats`).
    Internal {
        /// The answer.
        done: oneshot::Sender<serde_json::Value>,
    },
    /// The last message id.
    LastId {
        /// The answer.
        done: oneshot::Sender<pb::MessageIdData>,
    },
    /// Terminate the topic: appends in flight finish, the ledger is closed, nothing more is
    /// accepted. The answer is the last message id.
    Terminate {
        /// The answer.
        done: oneshot::Sender<Result<pb::MessageIdData, String>>,
    },
    /// Statistics.
    Stats {
        /// The answer.
        done: oneshot::Sender<TopicStats>,
    },
    /// Store cursors and close the ledger, then stop.
    Close {
        /// Done.
        done: oneshot::Sender<()>,
    },
    /// A catch-up read finished.
    ReadDone {
        /// Subscription.
        sub: String,
        /// The subscription's instance (a subscription removed and made again is another).
        instance: u64,
        /// The read generation it was started in.
        generation: u64,
        /// Entries read.
        result: Result<Vec<(Pos, Bytes)>, String>,
    },
    /// A cursor write finished.
    Persisted {
        /// Subscription.
        sub: String,
        /// Which subscription of that name wrote it ([`Sub::instance`]).
        instance: u64,
        /// The version of the topic's ledger list the write required.
        topic_version: u64,
        /// How it ended.
        result: CursorWrite,
    },
}

pub(super) struct Init {
    pub name: TopicName,
    pub key: String,
    pub meta: MetaClient,
    pub ledgers: LedgerClient,
    pub settings: Arc<TopicSettings>,
    pub info: ManagedLedgerInfo,
    pub version: u64,
    pub span: LedgerSpan,
    pub writer: Option<LedgerWriter>,
}

/// Starts the task; returns its command channel.
pub(super) fn spawn(init: Init) -> mpsc::UnboundedSender<Cmd> {
    let (tx, rx) = mpsc::unbounded_channel();
    let next_expiry_check = Instant::now() + init.settings.expiry_check_interval;
    let cache = TailCache::new(init.settings.cache.clone());
    let actor = Actor {
        ml: Ml {
            name: init.name,
            key: init.key,
            meta: init.meta,
            ledgers: init.ledgers,
            settings: init.settings,
            info: init.info,
            version: init.version,
            span: init.span,
            writer: init.writer,
            ledger_entries: 0,
            ledger_bytes: 0,
            ledger_since: Instant::now(),
            cache,
            last_info: None,
            tx: tx.clone(),
            next_trim_check: None,
            next_delayed: u64::MAX,
            cursors_loaded: false,
        },
        inflight: FuturesOrdered::new(),
        inflight_meta: VecDeque::new(),
        inflight_started: VecDeque::new(),
        write_latency: stats::WriteLatency::default(),
        held: VecDeque::new(),
        rolling: false,
        producers: HashMap::new(),
        exclusive: None,
        waiting_exclusive: VecDeque::new(),
        last_sequence: HashMap::new(),
        subs: HashMap::new(),
        index: HashMap::new(),
        checking: HashMap::new(),
        checking_producers: HashMap::new(),
        next_expiry_check,
        // Read (with the namespace's) on the first tick: nothing is enforced on a guess.
        quota: None,
        next_quota_check: Instant::now(),
        dedup: None,
        dedup_unknown: false,
        dedup_read: false,
        next_dedup_check: Instant::now() + dedup::POLICY_CHECK,
        inactive: HashMap::new(),
        next_producer_purge: Instant::now(),
        next_cid: 1,
        msg_in: Rate::default(),
        bytes_in: Rate::default(),
        producer_rates: HashMap::new(),
    };
    tokio::spawn(actor.run(rx));
    tx
}

type Done = oneshot::Sender<Result<Pos, AppendError>>;
/// An append: the entry, its producer's name and sequence id, and who waits for it.
type Waiting = (Cached, Option<SentBy>, Done);

/// Who sent an entry.
#[derive(Clone, Debug)]
pub struct SentBy {
    /// Its producer's name.
    pub name: String,
    /// The sequence id of its first message.
    pub first: u64,
    /// The highest sequence id in it.
    pub highest: u64,
    /// Deduplication judges it: not the chunks of a chunked message before its last (they
    /// all carry the message's sequence id), as in Pulsar.
    pub dedup: bool,
}

/// An entry and its facts.
#[derive(Clone)]
struct Cached {
    entry: Bytes,
    info: EntryInfo,
}

/// The managed ledger.
struct Ml {
    name: TopicName,
    key: String,
    meta: MetaClient,
    ledgers: LedgerClient,
    settings: Arc<TopicSettings>,
    info: ManagedLedgerInfo,
    version: u64,
    span: LedgerSpan,
    writer: Option<LedgerWriter>,
    ledger_entries: u64,
    ledger_bytes: u64,
    ledger_since: Instant,
    cache: TailCache<Cached>,
    last_info: Option<(Pos, EntryInfo)>,
    tx: mpsc::UnboundedSender<Cmd>,
    /// Consumed ledgers are kept by retention: look again (and read the namespace's policy
    /// again) only after this.
    next_trim_check: Option<Instant>,
    /// The earliest delivery time of an entry a subscription holds back (ms; `u64::MAX`:
    /// none), for the topic's timer.
    next_delayed: u64,
    /// Every stored subscription is loaded (see `Actor::load_cursors`).
    cursors_loaded: bool,
}

struct Consumer {
    cid: u64,
    key: (u64, u64),
    name: String,
    priority: i32,
    permits: i64,
    protocol_version: i32,
    /// Echoed on every MESSAGE.
    epoch: Option<u64>,
    out: OutTx,
    /// Its connection's liveness.
    live: super::Liveness,
    /// REACHED_END_OF_TOPIC was sent.
    told_end: bool,
    msg_out: Rate,
    bytes_out: Rate,
}

struct Sub {
    name: String,
    /// Tells this subscription's cursor writes from those of an earlier one of the same name
    /// (unsubscribed, then subscribed again).
    instance: u64,
    durable: bool,
    sub_type: SubType,
    cursor: Cursor,
    /// The last position handed to the stream side of dispatch.
    read_pos: Pos,
    /// Positions to deliver (again) before new ones.
    replay: BTreeSet<Pos>,
    /// Entries held back until their delivery time: (time in ms, position). Not stored: the
    /// mark-delete position stays before them, so a reloaded topic reads and holds them again.
    delayed: BTreeSet<(u64, Pos)>,
    /// Delivered and unacknowledged: position → consumer.
    pending: HashMap<Pos, u64>,
    redeliveries: HashMap<Pos, u32>,
    consumers: Vec<Consumer>,
    rr: usize,
    active: Option<u64>,
    selector: KeySelector,
    fetched: HashMap<Pos, Cached>,
    reading: bool,
    /// Mean size of the entries of the last catch-up read (0 before one): sizes the next.
    read_entry_bytes: usize,
    generation: u64,
    dirty: bool,
    persisting: bool,
    version: u64,
    properties: BTreeMap<String, String>,
    msg_out: Rate,
    bytes_out: Rate,
}

impl Sub {
    /// The first position it may still take from the tail cache: the first stashed for
    /// delivery again, or the one after its read position.
    fn needs_from(&self) -> Pos {
        let next = Pos::new(self.read_pos.ledger_id, self.read_pos.entry_id.saturating_add(1));
        self.replay.first().map_or(next, |r| (*r).min(next))
    }

    /// Drops the entries read from the bookies that can no longer go out: acknowledged, in a
    /// deleted ledger, or behind the read position and not stashed for delivery again (acked
    /// while their read was in flight, passed by a TTL expiry or skip, or held for a later
    /// delivery time, when they are read again). Nothing else removes those, and `fetched`
    /// has no budget of its own.
    fn prune_fetched(&mut self, span: &LedgerSpan) {
        let (read_pos, replay, cursor) = (self.read_pos, &self.replay, &self.cursor);
        self.fetched.retain(|p, _| span.contains(*p) && !cursor.is_acked(*p) && (*p > read_pos || replay.contains(p)));
    }
}

/// Entries below this size are copied before they are cached (see [`unshared`]).
const UNSHARED_BELOW: usize = 16 << 10;

/// A small entry as its own allocation. Entries arrive as slices of their connection's read
/// buffer (which holds up to 16 KiB past each frame), and a cached slice keeps that whole
/// buffer alive: memory the cache's budget does not see, many times the entries' own size
/// when small entries of one connection go to topics with and without consumers.
fn unshared(entry: Bytes) -> Bytes {
    if entry.len() < UNSHARED_BELOW {
        Bytes::copy_from_slice(&entry)
    } else {
        entry
    }
}

/// Numbers [`Sub::instance`].
static SUB_INSTANCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// How a cursor write ended.
#[derive(Debug)]
pub enum CursorWrite {
    /// Stored; the cursor's new version.
    Stored(u64),
    /// The topic's ledger list is not at the version this task holds: `actual` is its
    /// version now. Unless this task moved it itself since, another broker owns the topic.
    TopicMoved { actual: u64 },
    /// The cursor is not at the version the write expected: an earlier write of this task
    /// landed although its answer was lost (or was still in flight). `actual` is its version.
    CursorMoved { actual: u64 },
    /// No answer: it may or may not have landed.
    Failed(String),
}

/// Writes a cursor if this task still owns the topic: one transaction that requires both the
/// topic's ledger list at the version this task holds (a broker that took the topic over
/// changed it when it loaded the topic) and the cursor at the version this task last wrote.
/// A former owner writes nothing: it would undo the new owner's acknowledgements or seeks,
/// or bring back a subscription the new owner deleted.
async fn write_cursor(
    meta: &MetaClient,
    topic_key: &str,
    topic_version: u64,
    key: &str,
    version: u64,
    body: Vec<u8>,
) -> CursorWrite {
    let txn = Txn::default().compare(topic_key, topic_version).compare(key, version).put(key, body, 0);
    match meta.txn(txn).await {
        Ok(r) if r.succeeded => CursorWrite::Stored(r.revision),
        Ok(r) if r.failed_compare == 0 => CursorWrite::TopicMoved { actual: r.actual_version },
        Ok(r) => CursorWrite::CursorMoved { actual: r.actual_version },
        Err(e) => CursorWrite::Failed(e.to_string()),
    }
}

/// Tries at deleting a consumed ledger (1, 2, 4, 8 s apart).
const DELETE_ATTEMPTS: u32 = 5;

/// At most this many stream entries wait in a Key_Shared replay set for busy consumers.
const MAX_STASHED: usize = 1000;

struct Actor {
    ml: Ml,
    inflight: FuturesOrdered<BoxFuture<'static, Result<i64, LedgerError>>>,
    inflight_meta: VecDeque<Waiting>,
    inflight_started: VecDeque<Instant>,
    write_latency: stats::WriteLatency,
    held: VecDeque<Waiting>,
    rolling: bool,
    producers: HashMap<(u64, u64), Registered>,
    /// The producer with exclusive access, if one has it.
    exclusive: Option<(u64, u64)>,
    /// `WaitForExclusive` producers, in arrival order.
    waiting_exclusive: VecDeque<Queued>,
    last_sequence: HashMap<String, i64>,
    subs: HashMap<String, Sub>,
    index: HashMap<(u64, u64), String>,
    /// Consumers whose SUBSCRIBE waits for a liveness check of the exclusive consumer before
    /// them: true once closed meanwhile (the SUBSCRIBE served again then registers nothing).
    checking: HashMap<(u64, u64), bool>,
    /// Producers whose PRODUCER waits for a liveness check of the holder of their name: true
    /// once closed meanwhile (the PRODUCER served again then registers nothing).
    checking_producers: HashMap<(u64, u64), bool>,
    /// When messages past the namespace's TTL are next expired.
    next_expiry_check: Instant,
    /// The backlog quota in force (the namespace's, else the broker's default), as last read
    /// (`None` until read, and while quotas are not enforced).
    quota: Option<super::quota::BacklogQuota>,
    /// When the backlog is next checked against it.
    next_quota_check: Instant,
    /// Deduplication state, while it is on and recovered.
    dedup: Option<dedup::Dedup>,
    /// Whether deduplication is on, or its state, is not known: sends are refused.
    dedup_unknown: bool,
    /// The deduplication policy was read (since the topic loaded).
    dedup_read: bool,
    /// When the namespace's deduplication policy is next read.
    next_dedup_check: Instant,
    /// Producer names with no producer connected, since when (see
    /// [`Actor::forget_inactive_producers`]).
    inactive: HashMap<String, Instant>,
    next_producer_purge: Instant,
    next_cid: u64,
    msg_in: Rate,
    bytes_in: Rate,
    /// Per producer name: messages and bytes.
    producer_rates: HashMap<String, (Rate, Rate)>,
}

fn id_data(p: Pos) -> pb::MessageIdData {
    pb::MessageIdData { ledger_id: p.ledger_id, entry_id: p.entry_id as u64, ..Default::default() }
}

/// A message id as MESSAGE carries it: with the partition index (-1: not a partition).
fn message_id(p: Pos, partition: i32) -> pb::MessageIdData {
    pb::MessageIdData { partition: Some(partition), ..id_data(p) }
}

fn success(request_id: u64) -> Out {
    Out::Cmd(pb::BaseCommand {
        success: Some(Box::new(pb::CommandSuccess { request_id, schema: None })),
        ..base(Type::Success)
    })
}

fn close_producer(producer_id: u64) -> Out {
    Out::Cmd(pb::BaseCommand {
        close_producer: Some(Box::new(pb::CommandCloseProducer {
            producer_id,
            request_id: u64::MAX,
            ..Default::default()
        })),
        ..base(Type::CloseProducer)
    })
}

fn close_consumer(consumer_id: u64) -> Out {
    Out::Cmd(pb::BaseCommand {
        close_consumer: Some(Box::new(pb::CommandCloseConsumer {
            consumer_id,
            request_id: u64::MAX,
            ..Default::default()
        })),
        ..base(Type::CloseConsumer)
    })
}

/// Stops the topic's queue and answers what is still in it: requests answered through a
/// connection get `ServiceNotReady` (their clients reconnect), appends fail as
/// [`AppendError::closing`]. Any other command's answer channel is dropped, which its sender
/// takes as "topic unavailable".
fn refuse_queued(rx: &mut mpsc::UnboundedReceiver<Cmd>, topic: &TopicName) {
    rx.close();
    while let Ok(cmd) = rx.try_recv() {
        let why = || format!("topic {topic} is closing; reconnect");
        let answer = |out: &OutTx, request_id: u64| {
            let _ = out.send(Out::Cmd(error_command(request_id, pb::ServerError::ServiceNotReady, why())));
        };
        match cmd {
            Cmd::Subscribe(spec) => answer(&spec.out, spec.request_id),
            Cmd::Unsubscribe { request_id, out, .. }
            | Cmd::Seek { request_id, out, .. }
            | Cmd::LastMessageId { request_id, out, .. }
            | Cmd::ConsumerStats { request_id, out, .. } => answer(&out, request_id),
            Cmd::AddProducer(r) => {
                let _ = r.done.send(Err((pb::ServerError::ServiceNotReady, why())));
            }
            Cmd::Append { done, .. } => {
                let _ = done.send(Err(AppendError::closing(why())));
            }
            _ => {}
        }
    }
}

/// Answers an ack that asked for an answer (`request_id`), with `error` if it was refused.
fn ack_response(sub: &Sub, key: (u64, u64), request_id: Option<u64>, error: Option<(pb::ServerError, &str)>) {
    let Some(request_id) = request_id else { return };
    if let Some(c) = sub.consumers.iter().find(|c| c.key == key) {
        let _ = c.out.send(Out::Cmd(pb::BaseCommand {
            ack_response: Some(Box::new(pb::CommandAckResponse {
                consumer_id: key.1,
                request_id: Some(request_id),
                error: error.map(|(e, _)| e as i32),
                message: error.map(|(_, m)| m.to_owned()),
                ..Default::default()
            })),
            ..base(Type::AckResponse)
        }));
    }
}

/// Subscriptions deleted in the same metastore transaction as a deleted topic's ledger list
/// (the metastore takes 256 compares and ops in one by default).
const MAX_DELETES_WITH_LIST: usize = 200;

/// Wire ids the clients use for "earliest" (-1:-1) and "latest" (i64::MAX:i64::MAX).
fn special(id: &pb::MessageIdData) -> Option<bool> {
    if id.ledger_id == u64::MAX || id.ledger_id as i64 == -1 {
        Some(true)
    } else if id.ledger_id == i64::MAX as u64 {
        Some(false)
    } else {
        None
    }
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        self.load_cursors().await;
        // Before any send is served: with deduplication on, its state is recovered first.
        self.check_dedup().await;
        let mut tick = tokio::time::interval(self.ml.settings.cursor_persist_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Wakes the topic when the earliest held delayed entry is due.
        let delay_timer = tokio::time::sleep(std::time::Duration::from_secs(3600));
        tokio::pin!(delay_timer);
        let mut armed = u64::MAX;
        loop {
            if self.ml.next_delayed < armed {
                armed = self.ml.next_delayed;
                let wait = std::time::Duration::from_millis(armed.saturating_sub(super::now_ms()));
                delay_timer.as_mut().reset(tokio::time::Instant::now() + wait);
            }
            tokio::select! {
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    if let Cmd::Close { done } = cmd {
                        self.close().await;
                        let _ = done.send(());
                        refuse_queued(&mut rx, &self.ml.name);
                        return;
                    }
                    if let Cmd::Delete { force, done } = cmd {
                        let busy = !self.producers.is_empty() || self.subs.values().any(|s| !s.consumers.is_empty());
                        if busy && !force {
                            let _ = done.send(Err("Topic has active producers/subscriptions".into()));
                            continue;
                        }
                        let r = self.delete().await;
                        let failed = r.is_err();
                        let _ = done.send(r);
                        if failed {
                            break;
                        }
                        refuse_queued(&mut rx, &self.ml.name);
                        return;
                    }
                    if !self.handle(cmd).await {
                        break;
                    }
                }
                Some(r) = self.inflight.next(), if !self.inflight.is_empty() => {
                    if !self.appended(r).await {
                        break;
                    }
                }
                _ = tick.tick() => {
                    if Instant::now() >= self.next_expiry_check {
                        self.next_expiry_check = Instant::now() + self.ml.settings.expiry_check_interval;
                        self.expire_by_ttl().await;
                    }
                    if Instant::now() >= self.next_dedup_check || self.dedup_unknown {
                        self.next_dedup_check = Instant::now() + dedup::POLICY_CHECK;
                        self.check_dedup().await;
                    }
                    if Instant::now() >= self.next_producer_purge {
                        let every = (self.ml.settings.producer_inactivity / 4).min(dedup::POLICY_CHECK);
                        self.next_producer_purge = Instant::now() + every;
                        self.forget_inactive_producers().await;
                    }
                    if self.dedup_snapshot_due() {
                        if let Err(e) = self.store_dedup_snapshot().await {
                            tracing::debug!(topic = %self.ml.name, error = %e, "storing the deduplication snapshot failed");
                        }
                    }
                    if let Some(every) = self.ml.settings.quota_check_interval.filter(|_| Instant::now() >= self.next_quota_check) {
                        self.next_quota_check = Instant::now() + every;
                        self.check_backlog_quota().await;
                    }
                    self.persist_cursors();
                    self.tick_rates();
                    self.evict_cache();
                    self.trim().await;
                    if self.ml.ledger_entries > 0
                        && !self.ml.info.terminated
                        && self.ml.ledger_since.elapsed() >= self.ml.settings.max_ledger_age
                    {
                        self.rolling = true;
                        if self.inflight.is_empty() && !self.roll().await {
                            break;
                        }
                    }
                    self.ml.next_delayed = release_all_delayed(&mut self.subs, super::now_ms());
                    self.dispatch_all();
                }
                _ = &mut delay_timer, if armed != u64::MAX => {
                    // Held entries that are due now go out.
                    armed = u64::MAX;
                    self.ml.next_delayed = release_all_delayed(&mut self.subs, super::now_ms());
                    self.dispatch_all();
                }
            }
        }
        // Failed: stop taking work; clients reconnect and load the topic afresh.
        self.fail("the topic stopped").await;
        refuse_queued(&mut rx, &self.ml.name);
    }

    /// Loads the topic's stored subscriptions (those not loaded yet), so their backlog counts
    /// (and stats show them) before any consumer connects. Until every one is loaded, no
    /// ledger is deleted: a subscription missing from memory would not hold its backlog.
    async fn load_cursors(&mut self) {
        let prefix = format!("{}/cursors/", self.ml.key);
        let stored = match self.ml.meta.list(&prefix).await {
            Ok(kvs) => kvs,
            Err(e) => {
                tracing::warn!(topic = %self.ml.name, error = %e, "listing the subscriptions failed; they load on use");
                // One stored since the last listing (by a task that no longer owns the topic)
                // may be missing: no ledger is deleted until a listing succeeds.
                self.ml.cursors_loaded = false;
                return;
            }
        };
        let first = self.ml.span.before_first();
        let mut complete = true;
        for kv in stored {
            let name = kv.key[prefix.len()..].replace("%2F", "/").replace("%25", "%");
            if self.subs.get(&name).is_some_and(|s| s.durable) {
                continue;
            }
            let sub_type = serde_json::from_slice::<CursorInfo>(&kv.value)
                .ok()
                .and_then(|i| match i.sub_type.as_str() {
                    "Shared" => Some(SubType::Shared),
                    "Failover" => Some(SubType::Failover),
                    "Key_Shared" => Some(SubType::KeyShared),
                    _ => None,
                })
                .unwrap_or(SubType::Exclusive);
            match self.open_sub_with(&name, true, sub_type, first, &BTreeMap::new(), false).await {
                Ok(Some(sub)) => {
                    self.subs.insert(name, sub);
                }
                Ok(None) => {}
                Err(e) => {
                    complete = false;
                    tracing::warn!(topic = %self.ml.name, sub = name, error = %e, "loading a subscription failed")
                }
            }
        }
        self.ml.cursors_loaded = complete;
    }

    /// Handles one command; `false` stops the topic.
    async fn handle(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Append { entry, info, producer, done } => {
                let c = Cached { entry, info };
                if let Some(e) = self.dedup_refusal() {
                    let _ = done.send(Err(e));
                    return true;
                }
                if let Some(SentBy { name, first, highest, dedup: true }) = &producer {
                    match self.dedup_verdict(name, *first, *highest) {
                        dedup::Verdict::New => {}
                        dedup::Verdict::Duplicate => {
                            let _ = done.send(Ok(dedup::DUPLICATE));
                            return true;
                        }
                        dedup::Verdict::Unknown => {
                            let _ = done.send(Err(AppendError {
                                code: pb::ServerError::PersistenceError,
                                message: format!(
                                    "cannot tell yet whether message {first} of producer {name} is a duplicate: it is being stored"
                                ),
                            }));
                            return true;
                        }
                    }
                }
                if self.ml.info.terminated {
                    let _ = done.send(Err(AppendError {
                        code: pb::ServerError::TopicTerminatedError,
                        message: format!("topic {} is terminated", self.ml.name),
                    }));
                } else if self.rolling {
                    self.held.push_back((c, producer, done));
                } else {
                    self.submit(c, producer, done);
                }
            }
            Cmd::AddProducer(r) => self.add_producer(*r).await,
            Cmd::RemoveProducer { conn, producer_id } => {
                let key = (conn, producer_id);
                if let Some(closed) = self.checking_producers.get_mut(&key) {
                    *closed = true;
                }
                if let Some(r) = self.producers.remove(&key) {
                    if !self.producers.values().any(|o| o.name == r.name) {
                        self.inactive.insert(r.name, Instant::now());
                    }
                }
                self.waiting_exclusive.retain(|q| q.key != key);
                if self.exclusive == Some(key) {
                    self.exclusive = None;
                }
                self.next_exclusive().await;
            }
            Cmd::Subscribe(spec) => self.subscribe(*spec).await,
            Cmd::Flow { key, permits } => {
                tracing::trace!(topic = %self.ml.name, ?key, permits, "flow");
                if let Some(sub) = sub_of(&self.index, &mut self.subs, key) {
                    if let Some(c) = sub.consumers.iter_mut().find(|c| c.key == key) {
                        c.permits += permits as i64;
                    }
                    dispatch(sub, &mut self.ml);
                }
            }
            Cmd::Ack { key, ack } => self.ack(key, ack),
            Cmd::Redeliver { key, ids, epoch } => {
                if let Some(sub) = sub_of(&self.index, &mut self.subs, key) {
                    let Some(c) = sub.consumers.iter_mut().find(|c| c.key == key) else { return true };
                    // Only a request for everything starts a new epoch (the clients send one
                    // then): a nack's epoch would make the client drop messages on their way
                    // that the nack does not bring back.
                    if ids.is_empty() && epoch > c.epoch {
                        c.epoch = epoch;
                    }
                    let cid = c.cid;
                    let positions: Vec<Pos> = if ids.is_empty() {
                        sub.pending.iter().filter(|(_, c)| **c == cid).map(|(p, _)| *p).collect()
                    } else {
                        ids.iter()
                            .map(|i| Pos::new(i.ledger_id, i.entry_id as i64))
                            .filter(|p| sub.pending.get(p) == Some(&cid))
                            .collect()
                    };
                    redeliver(sub, positions, true);
                    dispatch(sub, &mut self.ml);
                }
            }
            Cmd::CloseConsumer { key } => {
                if let Some(closed) = self.checking.get_mut(&key) {
                    *closed = true;
                }
                self.remove_consumer(key)
            }
            Cmd::Unsubscribe { key, request_id, force, out } => {
                if self.knows(key, request_id, &out) {
                    self.unsubscribe(key, request_id, force).await
                }
            }
            Cmd::Seek { key, request_id, target, out } => {
                if self.knows(key, request_id, &out) {
                    self.seek(key, request_id, target).await
                }
            }
            Cmd::LastMessageId { key, request_id, out } => {
                if self.knows(key, request_id, &out) {
                    self.last_message_id(key, request_id).await
                }
            }
            Cmd::ConsumerStats { key, request_id, out } => {
                if self.knows(key, request_id, &out) {
                    self.consumer_stats(key, request_id)
                }
            }
            Cmd::Stats { done } => {
                let _ = done.send(self.stats());
            }
            Cmd::Terminate { done } => {
                let r = self.terminate().await;
                let failed = r.is_err();
                let _ = done.send(r);
                if failed {
                    // Its writer may be closed or gone: the topic stops, and clients load it
                    // afresh.
                    return false;
                }
                self.dispatch_all();
            }
            Cmd::SubAdmin { sub, op, done } => {
                let r = self.sub_admin(sub, op).await;
                let _ = done.send(r);
            }
            Cmd::Internal { done } => {
                let _ = done.send(self.internal_stats());
            }
            Cmd::LastId { done } => {
                let id = self.last_id().await;
                let _ = done.send(id);
            }
            Cmd::ReadDone { sub, instance, generation, result } => {
                if let Some(s) = self.subs.get_mut(&sub) {
                    if s.instance == instance && s.generation == generation {
                        s.reading = false;
                        match result {
                            // Nobody to send them to: read again when a consumer comes.
                            Ok(_) if s.consumers.is_empty() => s.fetched.clear(),
                            Ok(entries) => {
                                let bytes: usize = entries.iter().map(|(_, e)| e.len()).sum();
                                s.read_entry_bytes = bytes / entries.len().max(1);
                                for (p, entry) in entries {
                                    match decode_entry(&entry) {
                                        Ok((md, data)) => {
                                            let info = EntryInfo::from_entry(&md, &data);
                                            s.fetched.insert(p, Cached { entry, info });
                                        }
                                        Err(e) => {
                                            // Nothing can deliver it: acknowledged for this
                                            // subscription (as clients discard a message that
                                            // fails validation), so dispatch goes past it
                                            // instead of reading it again forever.
                                            tracing::error!(topic = %self.ml.name, sub, position = %p, error = %e,
                                                "stored entry does not decode; acknowledging it for the subscription");
                                            s.cursor.ack(p, None, &self.ml.span);
                                            s.dirty = true;
                                        }
                                    }
                                }
                                // Some may have been acknowledged or passed while being read.
                                s.prune_fetched(&self.ml.span);
                                dispatch(s, &mut self.ml);
                            }
                            // Retried on the next tick.
                            Err(e) => tracing::warn!(topic = %self.ml.name, sub, error = %e, "catch-up read failed"),
                        }
                    }
                }
            }
            Cmd::Persisted { sub, instance, topic_version, result } => {
                let Some(s) = self.subs.get_mut(&sub).filter(|s| s.instance == instance) else { return true };
                s.persisting = false;
                match result {
                    CursorWrite::Stored(v) => s.version = v,
                    CursorWrite::CursorMoved { actual } => {
                        // This task still owns the topic, so the cursor moved by its own hand:
                        // written again on the next tick, on the version found.
                        s.version = actual;
                        s.dirty = true;
                    }
                    // This task changed the ledger list (perhaps more than once) while the write
                    // was on its way: the next write requires the version it holds now.
                    CursorWrite::TopicMoved { .. } if topic_version != self.ml.version => s.dirty = true,
                    CursorWrite::TopicMoved { actual } => {
                        tracing::warn!(topic = %self.ml.name, sub, held = self.ml.version, actual,
                            "the topic's ledger list changed under this broker: another one owns the topic now; stopping it here");
                        return false;
                    }
                    CursorWrite::Failed(e) => {
                        s.dirty = true;
                        tracing::warn!(topic = %self.ml.name, sub, error = %e, "storing the cursor failed");
                    }
                }
            }
            Cmd::Close { .. } | Cmd::Delete { .. } => unreachable!("handled in run"),
        }
        true
    }

    fn count_in(&mut self, c: &Cached, producer: Option<SentBy>) {
        let (n, b) = (c.info.num_messages as u64, c.entry.len() as u64);
        self.msg_in.add(n);
        self.bytes_in.add(b);
        if let Some(d) = self.dedup.as_mut() {
            d.since_snapshot += 1;
        }
        if let Some(SentBy { name, highest: seq, dedup: whole, .. }) = producer {
            let r = self.producer_rates.entry(name.clone()).or_default();
            r.0.add(n);
            r.1.add(b);
            // A chunk before a message's last does not make the message stored.
            if whole {
                if let Some(d) = self.dedup.as_mut() {
                    d.stored(&name, seq as i64);
                }
                let last = self.last_sequence.entry(name).or_insert(seq as i64);
                *last = (*last).max(seq as i64);
            }
        }
    }

    fn record_latency(&mut self) {
        if let Some(t) = self.inflight_started.pop_front() {
            self.write_latency.record(t.elapsed().as_secs_f64() * 1000.0);
        }
    }

    /// Cached entries leave once every subscription with a consumer has read past them (all
    /// of them when no subscription has one), and once older than `cache_age`.
    fn evict_cache(&mut self) {
        let needed = self.subs.values().filter(|s| !s.consumers.is_empty()).map(Sub::needs_from).min();
        match needed {
            Some(p) => self.ml.cache.evict_before(p),
            None => self.ml.cache.clear(),
        }
        if let Some(cutoff) = Instant::now().checked_sub(self.ml.settings.cache_age) {
            self.ml.cache.evict_older_than(cutoff);
        }
    }

    fn tick_rates(&mut self) {
        self.msg_in.tick(1.0);
        self.bytes_in.tick(1.0);
        for r in self.producer_rates.values_mut() {
            r.0.tick(1.0);
            r.1.tick(1.0);
        }
        for sub in self.subs.values_mut() {
            sub.msg_out.tick(1.0);
            sub.bytes_out.tick(1.0);
            for c in &mut sub.consumers {
                c.msg_out.tick(1.0);
                c.bytes_out.tick(1.0);
            }
        }
    }

    /// Bytes the topic stores.
    fn stored_bytes(&self) -> u64 {
        self.ml.info.ledgers.iter().filter_map(|l| l.size).sum::<u64>()
            + if self.ml.writer.is_some() { self.ml.ledger_bytes } else { 0 }
    }

    /// The mean size of its entries, bytes, over the ledgers whose size is known (a ledger
    /// closed by recovery, after a broker died, has none).
    fn avg_entry_bytes(&self) -> f64 {
        let (mut bytes, mut entries) = (0u64, 0u64);
        for l in &self.ml.info.ledgers {
            if let (Some(size), Some(last)) = (l.size, l.last_entry) {
                bytes += size;
                entries += (last + 1).max(0) as u64;
            }
        }
        if self.ml.writer.is_some() {
            bytes += self.ml.ledger_bytes;
            entries += self.ml.ledger_entries;
        }
        if entries > 0 {
            bytes as f64 / entries as f64
        } else {
            0.0
        }
    }

    /// Entries `sub` has not acknowledged.
    fn backlog_entries(&self, sub: &Sub) -> u64 {
        self.ml.span.entries_after(sub.cursor.mark_delete()).saturating_sub(sub.cursor.acked_count())
    }

    fn stats(&self) -> TopicStats {
        let stored = self.stored_bytes();
        let entries = self.ml.span.total_entries();
        let avg_entry = self.avg_entry_bytes();
        let mut st = TopicStats {
            msg_rate_in: self.msg_in.rate,
            msg_throughput_in: self.bytes_in.rate,
            msg_in_counter: self.msg_in.total,
            bytes_in_counter: self.bytes_in.total,
            average_msg_size: if self.msg_in.total > 0 {
                self.bytes_in.total as f64 / self.msg_in.total as f64
            } else {
                0.0
            },
            storage_size: stored,
            entries,
            write_latency: self.write_latency.clone(),
            ..Default::default()
        };
        for (&(_, producer_id), Registered { name, .. }) in &self.producers {
            let (m, b) = self.producer_rates.get(name).map(|(m, b)| (m.rate, b.rate)).unwrap_or_default();
            st.publishers.push(stats::PublisherStats {
                producer_name: name.clone(),
                producer_id,
                msg_rate_in: m,
                msg_throughput_in: b,
            });
        }
        for sub in self.subs.values() {
            let backlog = self.backlog_entries(sub);
            let consumers = sub
                .consumers
                .iter()
                .map(|c| stats::ConsumerStats {
                    consumer_name: c.name.clone(),
                    available_permits: c.permits,
                    unacked_messages: sub.pending.values().filter(|x| **x == c.cid).count() as u64,
                    msg_rate_out: c.msg_out.rate,
                    msg_throughput_out: c.bytes_out.rate,
                })
                .collect();
            let s = stats::SubscriptionStats {
                msg_rate_out: sub.msg_out.rate,
                msg_throughput_out: sub.bytes_out.rate,
                msg_out_counter: sub.msg_out.total,
                msg_backlog: backlog,
                backlog_size: (backlog as f64 * avg_entry) as u64,
                unacked_messages: sub.pending.len() as u64,
                msg_delayed: sub.delayed.len() as u64,
                sub_type: sub_type_name(sub.sub_type).into(),
                is_durable: sub.durable,
                consumers,
            };
            st.msg_rate_out += s.msg_rate_out;
            st.msg_throughput_out += s.msg_throughput_out;
            st.msg_out_counter += s.msg_out_counter;
            st.backlog_size = st.backlog_size.max(s.backlog_size);
            st.subscriptions.insert(sub.name.clone(), s);
        }
        st
    }

    fn submit(&mut self, c: Cached, producer: Option<SentBy>, done: Done) {
        let Some(w) = self.ml.writer.as_ref() else {
            let _ = done.send(Err(AppendError::from(format!("topic {} has no ledger", self.ml.name))));
            return;
        };
        self.inflight.push_back(Box::pin(w.append(c.entry.clone())));
        self.ml.ledger_entries += 1;
        self.ml.ledger_bytes += c.entry.len() as u64;
        let s = &self.ml.settings;
        if self.ml.ledger_entries >= s.max_entries_per_ledger || self.ml.ledger_bytes >= s.max_bytes_per_ledger {
            self.rolling = true;
        }
        self.inflight_meta.push_back((c, producer, done));
        self.inflight_started.push_back(Instant::now());
    }

    /// An append finished (in order); `false` stops the topic.
    async fn appended(&mut self, first: Result<i64, LedgerError>) -> bool {
        let ledger = self.ml.writer.as_ref().map(|w| w.id()).unwrap_or(0);
        // Entries are cached only while a subscription has a consumer to read them (as in
        // Pulsar); a consumer that comes later reads them from the bookies.
        let cache = self.subs.values().any(|s| !s.consumers.is_empty());
        if !cache {
            // What is cached stays a run of the newest entries (catch-up reads stop where it
            // begins): a consumer that comes later starts it afresh.
            self.ml.cache.clear();
        }
        let now = Instant::now();
        let mut next = Some(first);
        while let Some(r) = next {
            let Some((c, producer, done)) = self.inflight_meta.pop_front() else { break };
            self.record_latency();
            match r {
                Ok(e) => {
                    let p = Pos::new(ledger, e);
                    self.ml.span.set_last(ledger, e);
                    self.ml.last_info = Some((p, c.info));
                    self.count_in(&c, producer);
                    if cache {
                        let c = Cached { entry: unshared(c.entry), ..c };
                        let bytes = c.entry.len();
                        self.ml.cache.insert(p, c, bytes, now);
                    }
                    let _ = done.send(Ok(p));
                }
                Err(err) => {
                    // The topic stops with this failure and tells its producers.
                    let _ = done.send(Err(AppendError::closing(err.to_string())));
                    tracing::error!(topic = %self.ml.name, error = %err, "append failed; unloading the topic");
                    return false;
                }
            }
            // More confirmations ready now go out in the same dispatch round.
            next = futures::FutureExt::now_or_never(self.inflight.next()).flatten();
        }
        self.dispatch_all();
        if self.rolling && self.inflight.is_empty() {
            return self.roll().await;
        }
        true
    }

    /// Closes the current ledger and starts a new one (nothing in flight).
    async fn roll(&mut self) -> bool {
        match self.ml.roll().await {
            Ok(()) => {
                self.rolling = false;
                while let Some((c, producer, done)) = self.held.pop_front() {
                    self.submit(c, producer, done);
                    if self.rolling {
                        break;
                    }
                }
                // A ledger was just closed: it may be consumed already.
                self.ml.next_trim_check = None;
                self.trim().await;
                true
            }
            Err(e) => {
                tracing::error!(topic = %self.ml.name, error = %e, "ledger rollover failed; unloading the topic");
                false
            }
        }
    }

    /// The position every subscription has acknowledged up to: the slowest mark-delete
    /// position of the durable subscriptions and of the readers connected now (`None`: there
    /// are none, and nothing is kept for anyone).
    fn slowest_position(&self) -> Option<Pos> {
        self.subs.values().filter(|s| s.durable || !s.consumers.is_empty()).map(|s| s.cursor.mark_delete()).min()
    }

    /// Deletes the oldest ledgers that every subscription has consumed and retention no
    /// longer keeps ([`super::trimmable`]): first from the topic's ledger list (one CAS), then
    /// from the metastore and the bookies, in the background.
    async fn trim(&mut self) {
        let slowest = self.slowest_position();
        let now = super::now_ms();
        let current = self.ml.ledger_bytes;
        if super::trimmable(&self.ml.info.ledgers, current, slowest, Retention::NOTHING, now) == 0 {
            return;
        }
        if self.ml.next_trim_check.is_some_and(|t| Instant::now() < t) {
            return;
        }
        // Every stored subscription must hold its backlog, including one stored since the
        // topic loaded by a task that no longer owns it.
        self.load_cursors().await;
        if !self.ml.cursors_loaded {
            self.ml.defer_trim();
            return;
        }
        let retention = retention(&self.ml.meta, &self.ml.name, self.ml.settings.retention).await;
        // Subscriptions just loaded count too.
        let slowest = self.slowest_position();
        let n = super::trimmable(&self.ml.info.ledgers, current, slowest, retention, now);
        if n == 0 {
            self.ml.defer_trim();
            return;
        }
        // A replay could not read the deleted ledgers: the deduplication snapshot covers them
        // first (and none go while the state it would cover is not known).
        if self.dedup_unknown {
            self.ml.defer_trim();
            return;
        }
        if let Err(e) = self.store_dedup_snapshot().await {
            tracing::warn!(topic = %self.ml.name, error = %e, "storing the deduplication snapshot before deleting ledgers failed");
            self.ml.defer_trim();
            return;
        }
        let mut info = self.ml.info.clone();
        let ids: Vec<u64> = info.ledgers.drain(..n).map(|l| l.ledger_id).collect();
        match put_info(&self.ml.meta, &self.ml.key, &info, self.ml.version).await {
            Ok(v) => {
                self.ml.version = v;
                self.ml.info = info;
                self.ml.next_trim_check = None;
            }
            Err(e) => {
                tracing::warn!(topic = %self.ml.name, error = %e, "removing consumed ledgers from the topic failed");
                self.ml.defer_trim();
                return;
            }
        }
        let first = self.ml.info.ledgers.first().map_or(0, |l| l.ledger_id);
        self.ml.span.drop_before(first);
        self.ml.cache.evict_before(Pos::new(first, i64::MIN));
        for s in self.subs.values_mut() {
            s.prune_fetched(&self.ml.span);
        }
        tracing::info!(topic = %self.ml.name, ledgers = ?ids, slowest = ?slowest, "deleting consumed ledgers");
        let (ledgers, name) = (self.ml.ledgers.clone(), self.ml.name.clone());
        tokio::spawn(async move {
            for id in ids {
                // The topic no longer lists it: a failure is retried a few times (a metastore
                // leader change, say), then left (see docs/broker.md).
                let mut wait = std::time::Duration::from_secs(1);
                for attempt in 1..=DELETE_ATTEMPTS {
                    match ledgers.delete(id).await {
                        Ok(()) | Err(LedgerError::NoSuchLedger(_)) => break,
                        Err(e) if attempt == DELETE_ATTEMPTS => {
                            tracing::warn!(topic = %name, ledger = id, error = %e, "deleting a consumed ledger failed; giving up")
                        }
                        Err(e) => {
                            tracing::info!(topic = %name, ledger = id, error = %e, "deleting a consumed ledger failed; retrying");
                            tokio::time::sleep(wait).await;
                            wait *= 2;
                        }
                    }
                }
            }
        });
    }

    /// Tells every producer and consumer to reconnect (CLOSE_PRODUCER / CLOSE_CONSUMER) and
    /// forgets the producers.
    fn disconnect_clients(&mut self) {
        for q in self.waiting_exclusive.drain(..) {
            q.producer.close(q.key.1);
        }
        self.exclusive = None;
        for ((_, producer_id), p) in self.producers.drain() {
            p.close(producer_id);
        }
        for sub in self.subs.values() {
            for c in &sub.consumers {
                let _ = c.out.send(close_consumer(c.key.1));
            }
        }
    }

    /// Fails everything waiting and closes the topic's producers and consumers, so their
    /// clients reconnect and load the topic again.
    async fn fail(&mut self, why: &str) {
        self.inflight_started.clear();
        for (_, _, done) in self.inflight_meta.drain(..).chain(self.held.drain(..)) {
            let _ = done.send(Err(AppendError::closing(format!("topic {}: {why}", self.ml.name))));
        }
        self.store_cursors().await;
        // Last, as in a close: a client told earlier could come back while the cursors are
        // stored and find this task still loaded, and be bound to it as it stops.
        self.disconnect_clients();
    }

    /// Disconnects clients, then removes cursors, the ledger list and the ledgers.
    async fn delete(&mut self) -> Result<(), String> {
        while let Some(r) = self.inflight.next().await {
            if !self.appended(r).await {
                break;
            }
        }
        for (_, _, done) in self.held.drain(..) {
            let _ = done.send(Err(AppendError::closing(format!("topic {} was deleted", self.ml.name))));
        }
        self.disconnect_clients();
        self.subs.clear();
        self.index.clear();
        let meta = self.ml.meta.clone();
        let prefix = format!("{}/cursors/", self.ml.key);
        let cursors = meta.list(&prefix).await.map_err(|e| e.to_string())?;
        // The ledger list goes first, compared at this task's version: that is what decides
        // whether the topic is deleted. Subscriptions removed before it while it then failed
        // (another broker took the topic over, or the metastore did not answer) would leave
        // the topic's backlog held by nothing, and a former owner would delete the new
        // owner's subscriptions. Up to a transaction's size, the subscriptions go with it.
        let (with_list, rest) = cursors.split_at(cursors.len().min(MAX_DELETES_WITH_LIST));
        let txn =
            with_list.iter().fold(Txn::default().compare(&self.ml.key, self.ml.version), |t, kv| t.delete(&kv.key));
        // Its topic-level policies go with it: they would apply to a topic made later under
        // the same name.
        let txn = txn.delete(super::topic_policies_key(&self.ml.name)).delete(dedup_key(&self.ml.name));
        // So do its schemas, unless they are its partitioned topic's (deleted with it).
        let txn = match self.ml.name.partition() {
            None => txn.delete(super::schema::schema_key(&self.ml.name)),
            Some(_) => txn,
        };
        let done = meta.txn(txn.delete(&self.ml.key)).await.map_err(|e| e.to_string())?;
        if !done.succeeded {
            return Err(format!("topic {} changed meanwhile (another broker owns it now?)", self.ml.name));
        }
        // No cursor write lands after that (each compares the ledger list). Those listed
        // beyond the transaction's size, and any whose first write landed after the listing,
        // are removed now; keys newer than the deletion belong to a topic created since.
        let stale = meta.list(&prefix).await.map_err(|e| e.to_string())?;
        for kv in rest.iter().chain(&stale).filter(|kv| kv.version < done.revision) {
            meta.delete(&kv.key, Some(kv.version)).await.map_err(|e| e.to_string())?;
        }
        drop(self.ml.writer.take());
        for l in &self.ml.info.ledgers {
            if let Err(e) = self.ml.ledgers.delete(l.ledger_id).await {
                tracing::warn!(topic = %self.ml.name, ledger = l.ledger_id, error = %e, "deleting a ledger failed; the bookies' GC will");
            }
        }
        tracing::info!(topic = %self.ml.name, ledgers = self.ml.info.ledgers.len(), "topic deleted");
        Ok(())
    }

    /// Finishes appends in flight, closes the ledger and records the topic as terminated.
    async fn terminate(&mut self) -> Result<pb::MessageIdData, String> {
        if !self.ml.info.terminated {
            while let Some(r) = self.inflight.next().await {
                if !self.appended(r).await {
                    return Err(format!("topic {} failed while terminating", self.ml.name));
                }
            }
            if let Some(w) = self.ml.writer.take() {
                let id = w.id();
                let md = w.close().await.map_err(|e| e.to_string())?;
                self.ml.closed(id, md.last_entry);
            }
            self.ml.ledger_entries = 0;
            self.ml.ledger_bytes = 0;
            let mut info = self.ml.info.clone();
            info.terminated = true;
            self.ml.version =
                put_info(&self.ml.meta, &self.ml.key, &info, self.ml.version).await.map_err(|e| e.to_string())?;
            self.ml.info = info;
            for (_, _, done) in self.held.drain(..) {
                let _ = done.send(Err(AppendError {
                    code: pb::ServerError::TopicTerminatedError,
                    message: format!("topic {} is terminated", self.ml.name),
                }));
            }
            self.rolling = false;
            tracing::info!(topic = %self.ml.name, last = %self.ml.span.last(), "topic terminated");
        }
        Ok(self.last_id().await)
    }

    async fn close(&mut self) {
        while let Some(r) = self.inflight.next().await {
            if !self.appended(r).await {
                break;
            }
        }
        self.store_cursors().await;
        if let Err(e) = self.store_dedup_snapshot().await {
            tracing::warn!(topic = %self.ml.name, error = %e, "storing the deduplication snapshot failed; the next load replays more");
        }
        if let Some(w) = self.ml.writer.take() {
            let id = w.id();
            match w.close().await {
                Ok(md) => {
                    self.ml.closed(id, md.last_entry);
                    if let Err(e) = put_info(&self.ml.meta, &self.ml.key, &self.ml.info, self.ml.version).await {
                        tracing::warn!(topic = %self.ml.name, error = %e, "recording the closed ledger failed");
                    }
                }
                Err(e) => tracing::warn!(topic = %self.ml.name, error = %e, "closing the ledger failed"),
            }
        }
        for (_, _, done) in self.held.drain(..) {
            let _ = done.send(Err(AppendError::closing(format!("topic {} is closing", self.ml.name))));
        }
        // Producers and consumers are told, so their clients look the topic up again and
        // reconnect to wherever it loads next (consumers would otherwise wait on a connection
        // that no longer feeds them).
        self.disconnect_clients();
        tracing::info!(topic = %self.ml.name, "topic closed");
    }

    fn dispatch_all(&mut self) {
        for sub in self.subs.values_mut() {
            dispatch(sub, &mut self.ml);
        }
    }

    /// Starts writes of changed cursors (one at a time per subscription).
    fn persist_cursors(&mut self) {
        for sub in self.subs.values_mut().filter(|s| s.durable && s.dirty && !s.persisting) {
            sub.dirty = false;
            sub.persisting = true;
            let body = cursor_body(sub);
            let (meta, topic_key, topic_version, key, version, tx, name, instance) = (
                self.ml.meta.clone(),
                self.ml.key.clone(),
                self.ml.version,
                cursor_key(&self.ml.name, &sub.name),
                sub.version,
                self.ml.tx.clone(),
                sub.name.clone(),
                sub.instance,
            );
            tokio::spawn(async move {
                let result = write_cursor(&meta, &topic_key, topic_version, &key, version, body).await;
                let _ = tx.send(Cmd::Persisted { sub: name, instance, topic_version, result });
            });
        }
    }

    /// Writes every changed cursor now (closing), if this task still owns the topic.
    async fn store_cursors(&mut self) {
        let names: Vec<String> =
            self.subs.values().filter(|s| s.durable && (s.dirty || s.persisting)).map(|s| s.name.clone()).collect();
        for name in names {
            if let Err(CursorWrite::TopicMoved { .. }) = self.store_cursor(&name).await {
                return;
            }
        }
    }

    /// Writes one subscription's cursor now, if this task still owns the topic. A write still
    /// in flight, or one whose answer was lost, may have moved the cursor's version: then it
    /// is taken and the write made again.
    async fn store_cursor(&mut self, name: &str) -> Result<(), CursorWrite> {
        let (meta, topic_key, topic_version) = (self.ml.meta.clone(), self.ml.key.clone(), self.ml.version);
        let key = cursor_key(&self.ml.name, name);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Some(sub) = self.subs.get_mut(name) else { return Ok(()) };
            match write_cursor(&meta, &topic_key, topic_version, &key, sub.version, cursor_body(sub)).await {
                CursorWrite::Stored(v) => {
                    sub.version = v;
                    sub.dirty = false;
                    return Ok(());
                }
                CursorWrite::CursorMoved { actual } if attempt < 3 => sub.version = actual,
                CursorWrite::TopicMoved { actual } => {
                    tracing::warn!(topic = %self.ml.name, held = topic_version, actual,
                        "another broker owns the topic now: its cursors are left to it");
                    return Err(CursorWrite::TopicMoved { actual });
                }
                other => {
                    tracing::warn!(topic = %self.ml.name, sub = name, outcome = ?other, "storing the cursor failed");
                    return Err(other);
                }
            }
        }
    }

    /// Serves a PRODUCER: its name must be free, and its access mode (Pulsar's PIP-68) must
    /// allow it next to the producers there are.
    async fn add_producer(&mut self, r: ProducerRequest) {
        use pb::ProducerAccessMode as Mode;
        let name = r.name.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| {
            format!("magnetar-{}-{}-{}", self.ml.writer.as_ref().map(|w| w.id()).unwrap_or(0), r.conn, r.producer_id)
        });
        let key = (r.conn, r.producer_id);
        let closed_meanwhile = r.checked && self.checking_producers.remove(&key) == Some(true);
        let refuse = |done: oneshot::Sender<_>, code: pb::ServerError, why: String| {
            let _ = done.send(Err((code, why)));
        };
        if self.ml.info.terminated {
            return refuse(
                r.done,
                pb::ServerError::TopicTerminatedError,
                format!("topic {} is terminated", self.ml.name),
            );
        }
        if r.live.is_closing() {
            // Its connection left while the holder of the name was checked.
            return;
        }
        if let Some((code, why)) = self.quota_refusal() {
            return refuse(r.done, code, why);
        }
        if self.dedup_unknown {
            // Its last sequence id is not known yet: a producer told a wrong one would number
            // its messages from it.
            let why = format!("deduplication state of {} is not recovered yet", self.ml.name);
            return refuse(r.done, pb::ServerError::ServiceNotReady, why);
        }
        if closed_meanwhile {
            // Its client closed it while the holder of the name was checked.
            let why = "closed by the client before it was ready".into();
            return refuse(r.done, pb::ServerError::ServiceNotReady, why);
        }
        let topic_epoch = self.ml.info.topic_epoch;
        // An exclusive producer reconnecting after another took the topic in between.
        if r.topic_epoch.is_some_and(|e| e < topic_epoch) && r.access != Mode::Shared {
            let why =
                format!("topic epoch has moved on: the topic is at {topic_epoch}, the producer at {:?}", r.topic_epoch);
            return refuse(r.done, pb::ServerError::ProducerFenced, why);
        }
        if r.access == Mode::ExclusiveWithFencing {
            // Everyone else is out, the holder of this name included: producers are closed
            // (their reconnects are fenced by the new epoch), waiting ones refused.
            for q in self.waiting_exclusive.drain(..) {
                q.producer.refuse(pb::ServerError::ProducerFenced, "fenced by an ExclusiveWithFencing producer".into());
            }
            for ((_, producer_id), p) in self.producers.drain() {
                p.close(producer_id);
            }
            self.exclusive = None;
        }
        if let Some(((holder, _), Registered { live: holder_live, .. })) =
            self.producers.iter().find(|(_, p)| p.name == name)
        {
            let busy = format!("producer {name} is already connected to {}", self.ml.name);
            if *holder == r.conn || r.checked {
                return refuse(r.done, pb::ServerError::ProducerBusy, busy);
            }
            // The holder's client may be gone with its connection still open: ask it (a
            // silent one is closed and leaves), then serve this again, once.
            let (holder_live, tx) = (holder_live.clone(), self.ml.tx.clone());
            self.checking_producers.insert(key, false);
            tokio::spawn(async move {
                holder_live.check(super::LIVENESS_TIMEOUT).await;
                let again = Cmd::AddProducer(Box::new(ProducerRequest { checked: true, ..r }));
                if let Err(mpsc::error::SendError(Cmd::AddProducer(r))) = tx.send(again) {
                    let _ = r.done.send(Err((pb::ServerError::ServiceNotReady, "the topic is closing".into())));
                }
            });
            return;
        }
        let exclusive_holder = self.exclusive.and_then(|k| self.producers.get(&k)).map(|p| p.name.clone());
        let last = self.last_sequence.get(&name).copied().unwrap_or(-1);
        let producer =
            Registered { name: name.clone(), request_id: r.request_id, out: r.out, live: r.live, state: r.state };
        match r.access {
            Mode::Shared => {
                if exclusive_holder.is_some() || !self.waiting_exclusive.is_empty() {
                    let holder = exclusive_holder.unwrap_or_else(|| "(one waiting)".into());
                    let why = format!("topic {} has an exclusive producer: {holder}", self.ml.name);
                    return refuse(r.done, pb::ServerError::ProducerBusy, why);
                }
            }
            Mode::Exclusive => {
                if exclusive_holder.is_some() || !self.waiting_exclusive.is_empty() {
                    let holder = exclusive_holder.unwrap_or_else(|| "(one waiting)".into());
                    let why = format!("topic {} has an exclusive producer: {holder}", self.ml.name);
                    return refuse(r.done, pb::ServerError::ProducerFenced, why);
                }
                if !self.producers.is_empty() {
                    let why = format!("topic {} has shared producers", self.ml.name);
                    return refuse(r.done, pb::ServerError::ProducerFenced, why);
                }
            }
            Mode::WaitForExclusive => {
                if !self.producers.is_empty() || !self.waiting_exclusive.is_empty() {
                    producer.answer(last, None, false);
                    self.waiting_exclusive.push_back(Queued { key, producer, topic_epoch: r.topic_epoch });
                    let _ = r.done.send(Ok(name));
                    return;
                }
            }
            Mode::ExclusiveWithFencing => {}
        }
        let epoch = if r.access == Mode::Shared {
            None
        } else {
            match self.take_exclusive(r.topic_epoch).await {
                Ok(e) => Some(e),
                Err(why) => return refuse(r.done, pb::ServerError::MetadataError, why),
            }
        };
        producer.grant(last, epoch);
        self.producers.insert(key, producer);
        if epoch.is_some() {
            self.exclusive = Some(key);
        }
        let _ = r.done.send(Ok(name));
    }

    /// Sets the topic epoch for a producer taking exclusive access: the one it had
    /// (reconnecting), or the next. Stored before it is used, so no other broker hands out the
    /// same epoch again.
    async fn take_exclusive(&mut self, keep: Option<u64>) -> Result<u64, String> {
        let epoch = keep.unwrap_or(self.ml.info.topic_epoch + 1).max(self.ml.info.topic_epoch);
        if epoch != self.ml.info.topic_epoch {
            let mut info = self.ml.info.clone();
            info.topic_epoch = epoch;
            self.ml.version = put_info(&self.ml.meta, &self.ml.key, &info, self.ml.version)
                .await
                .map_err(|e| format!("storing the topic epoch: {e}"))?;
            self.ml.info = info;
        }
        Ok(epoch)
    }

    /// Once no producer is left, the first `WaitForExclusive` producer gets the topic.
    async fn next_exclusive(&mut self) {
        while self.producers.is_empty() {
            let Some(q) = self.waiting_exclusive.pop_front() else { return };
            if q.producer.live.is_closing() {
                continue;
            }
            if self.ml.info.terminated {
                q.producer
                    .refuse(pb::ServerError::TopicTerminatedError, format!("topic {} is terminated", self.ml.name));
                continue;
            }
            if q.topic_epoch.is_some_and(|e| e < self.ml.info.topic_epoch) {
                let why = format!("topic epoch has moved on: the topic is at {}", self.ml.info.topic_epoch);
                q.producer.refuse(pb::ServerError::ProducerFenced, why);
                continue;
            }
            match self.take_exclusive(q.topic_epoch).await {
                Ok(epoch) => {
                    let last = self.last_sequence.get(&q.producer.name).copied().unwrap_or(-1);
                    q.producer.grant(last, Some(epoch));
                    self.producers.insert(q.key, q.producer);
                    self.exclusive = Some(q.key);
                }
                Err(why) => q.producer.refuse(pb::ServerError::MetadataError, why),
            }
        }
    }

    async fn subscribe(&mut self, spec: ConsumerSpec) {
        let fail = |code: pb::ServerError, msg: String| {
            let _ = spec.out.send(Out::Cmd(error_command(spec.request_id, code, msg)));
        };
        let key = (spec.conn, spec.consumer_id);
        if spec.checked && (self.checking.remove(&key) == Some(true) || spec.live.is_closing()) {
            // It was closed, or its connection left, while the exclusive consumer before it
            // was checked.
            return fail(pb::ServerError::ServiceNotReady, "the consumer was closed before it was ready".into());
        }
        if let Some(existing) = self.index.get(&key) {
            if *existing == spec.subscription {
                // A retry of a SUBSCRIBE already served.
                let _ = spec.out.send(success(spec.request_id));
                return;
            }
            self.remove_consumer(key);
        }
        if !self.subs.contains_key(&spec.subscription) {
            match self.open_sub(&spec).await {
                Ok(sub) => {
                    self.subs.insert(spec.subscription.clone(), sub);
                }
                Err(e) => return fail(pb::ServerError::MetadataError, e),
            }
        }
        let cid = self.next_cid;
        let Some(sub) = self.subs.get_mut(&spec.subscription) else { return };
        if !sub.consumers.is_empty() {
            if sub.sub_type != spec.sub_type {
                return fail(
                    pb::ServerError::ConsumerBusy,
                    format!("subscription {} is of type {:?}, not {:?}", sub.name, sub.sub_type, spec.sub_type),
                );
            }
            if spec.sub_type == SubType::Exclusive {
                let why = format!("exclusive consumer is already connected to subscription {}", sub.name);
                let holder = &sub.consumers[0];
                if holder.key.0 == spec.conn || spec.checked {
                    return fail(pb::ServerError::ConsumerBusy, why);
                }
                // The holder's client may be gone with its connection still open: ask it (a
                // silent one is closed and leaves), then serve this again, once.
                let (holder_live, tx) = (holder.live.clone(), self.ml.tx.clone());
                self.checking.insert(key, false);
                tokio::spawn(async move {
                    holder_live.check(super::LIVENESS_TIMEOUT).await;
                    if let Err(mpsc::error::SendError(Cmd::Subscribe(spec))) =
                        tx.send(Cmd::Subscribe(Box::new(ConsumerSpec { checked: true, ..spec })))
                    {
                        let why = "the topic is closing; reconnect";
                        let _ = spec.out.send(Out::Cmd(error_command(
                            spec.request_id,
                            pb::ServerError::ServiceNotReady,
                            why,
                        )));
                    }
                });
                return;
            }
        }
        sub.sub_type = spec.sub_type;
        // Held delayed entries go first to a type that does not delay (before anything newer).
        release_delayed(sub, super::now_ms());
        if spec.sub_type == SubType::KeyShared {
            if let Err(e) = sub.selector.add(cid, &spec.name, &spec.ranges) {
                return fail(pb::ServerError::ConsumerAssignError, e.to_string());
            }
        }
        self.next_cid += 1;
        sub.consumers.push(Consumer {
            cid,
            key,
            name: spec.name.clone(),
            priority: spec.priority,
            permits: 0,
            protocol_version: spec.protocol_version,
            epoch: spec.epoch,
            out: spec.out.clone(),
            live: spec.live.clone(),
            told_end: false,
            msg_out: Rate::default(),
            bytes_out: Rate::default(),
        });
        self.index.insert(key, spec.subscription.clone());
        let _ = spec.out.send(success(spec.request_id));
        update_active(sub, self.ml.name.partition(), true);
        tracing::debug!(topic = %self.ml.name, sub = sub.name, consumer = spec.name, "consumer subscribed");
        dispatch(sub, &mut self.ml);
    }

    async fn open_sub(&mut self, spec: &ConsumerSpec) -> Result<Sub, String> {
        let initial = if spec.earliest { self.ml.span.before_first() } else { self.ml.span.last() };
        let start = match &spec.start {
            Some(id) if !spec.durable => match special(id) {
                Some(true) => self.ml.span.before_first(),
                Some(false) => self.ml.span.last(),
                // Deliver the entry holding the start id; the client skips what it must.
                None => Pos::new(id.ledger_id, id.entry_id as i64 - 1),
            },
            _ => initial,
        };
        // A reader started from a rollback duration (Java's `startMessageFromRollbackDuration`).
        let start = match spec.rollback_secs {
            d if d > 0 && !spec.durable => {
                self.find_by_time(super::now_ms().saturating_sub(d.saturating_mul(1000))).await?
            }
            _ => start,
        };
        self.open_sub_with(&spec.subscription, spec.durable, spec.sub_type, start, &spec.properties, true)
            .await?
            .ok_or_else(|| format!("subscription {} does not exist", spec.subscription))
    }

    /// A subscription's state: a durable one from its stored cursor (created at `initial`
    /// when missing and `create`), a reader's at `initial`.
    pub(super) async fn open_sub_with(
        &mut self,
        name: &str,
        durable: bool,
        sub_type: SubType,
        initial: Pos,
        properties: &BTreeMap<String, String>,
        create: bool,
    ) -> Result<Option<Sub>, String> {
        let (cursor, version, properties) = if durable {
            let key = cursor_key(&self.ml.name, name);
            match self.ml.meta.get(&key).await.map_err(|e| e.to_string())? {
                Some(kv) => {
                    let info: CursorInfo =
                        serde_json::from_slice(&kv.value).map_err(|e| format!("cursor {key} is unreadable: {e}"))?;
                    let mut c = Cursor::from_info(&info, initial);
                    // Positions in ledgers deleted since it was stored count as acknowledged.
                    c.skip_to(self.ml.span.before_first(), &self.ml.span);
                    (c, kv.version, info.properties)
                }
                None if !create => return Ok(None),
                None => {
                    let c = Cursor::new(initial);
                    let body = serde_json::to_vec(&c.to_info(sub_type_name(sub_type), properties))
                        .map_err(|e| e.to_string())?;
                    let v = self
                        .ml
                        .meta
                        .put(&key, body, PutOptions { expected_version: Some(0), session: 0 })
                        .await
                        .map_err(|e| match e {
                            ClientError::BadVersion { .. } => format!("subscription {name} was created concurrently"),
                            e => e.to_string(),
                        })?;
                    // A task that no longer owns the topic (unloaded, or its broker lost the
                    // bundle) must not leave a cursor the new owner never loaded: that owner
                    // would delete ledgers the subscription has not read. The new owner's
                    // load changed the ledger list before it listed the cursors, so this
                    // check and that listing cannot both miss the new cursor.
                    let current = self.ml.meta.get(&self.ml.key).await.map_err(|e| e.to_string())?;
                    if current.map(|kv| kv.version) != Some(self.ml.version) {
                        let _ = self.ml.meta.delete(&key, Some(v)).await;
                        return Err(format!("topic {} moved while subscription {name} was created", self.ml.name));
                    }
                    (c, v, properties.clone())
                }
            }
        } else {
            (Cursor::new(initial), 0, properties.clone())
        };
        let md = cursor.mark_delete();
        Ok(Some(Sub {
            name: name.to_owned(),
            instance: SUB_INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            durable,
            sub_type,
            cursor,
            read_pos: md,
            replay: BTreeSet::new(),
            delayed: BTreeSet::new(),
            pending: HashMap::new(),
            redeliveries: HashMap::new(),
            consumers: Vec::new(),
            rr: 0,
            active: None,
            selector: KeySelector::default(),
            fetched: HashMap::new(),
            read_entry_bytes: 0,
            reading: false,
            generation: 0,
            dirty: false,
            persisting: false,
            version,
            properties,
            msg_out: Rate::default(),
            bytes_out: Rate::default(),
        }))
    }

    /// Whether consumer `key` is here; if not (a seek or a stop closed it, and its client is
    /// reconnecting), answers its request so the client does not wait out its timeout.
    fn knows(&self, key: (u64, u64), request_id: u64, out: &OutTx) -> bool {
        let here = self
            .index
            .get(&key)
            .and_then(|n| self.subs.get(n))
            .is_some_and(|s| s.consumers.iter().any(|c| c.key == key));
        if !here {
            let why = format!("consumer {} of topic {} is closed; reconnect", key.1, self.ml.name);
            let _ = out.send(Out::Cmd(error_command(request_id, pb::ServerError::ServiceNotReady, why)));
        }
        here
    }

    fn ack(&mut self, key: (u64, u64), ack: pb::CommandAck) {
        tracing::trace!(topic = %self.ml.name, ?key, ?ack, "ack");
        let Some(name) = self.index.get(&key).cloned() else { return };
        let Some(sub) = self.subs.get_mut(&name) else { return };
        let cumulative = ack.ack_type == pb::command_ack::AckType::Cumulative as i32;
        if cumulative && matches!(sub.sub_type, SubType::Shared | SubType::KeyShared) {
            // It would acknowledge what other consumers hold unacknowledged (and never
            // redeliver it if they fail). Pulsar refuses it too; the official clients do not
            // send it.
            tracing::warn!(topic = %self.ml.name, sub = %name, "ignoring a cumulative ack on a shared subscription");
            let error = (
                pb::ServerError::NotAllowedError,
                "cumulative ack is not allowed on a Shared or Key_Shared subscription",
            );
            ack_response(sub, key, ack.request_id, Some(error));
            return;
        }
        for id in &ack.message_id {
            let p = Pos::new(id.ledger_id, id.entry_id as i64);
            if !self.ml.span.contains(p) {
                // Not an entry of this topic (never written yet, another topic's, or in a
                // ledger already deleted): taken, it would mark messages as acknowledged that
                // were never delivered, and let their ledger be deleted unread.
                tracing::debug!(topic = %self.ml.name, position = %p, "ignoring an ack of no entry of the topic");
                continue;
            }
            let set = (!id.ack_set.is_empty()).then_some(id.ack_set.as_slice());
            if cumulative {
                sub.cursor.ack_cumulative(p, set, &self.ml.span);
                let md = sub.cursor.mark_delete();
                sub.pending.retain(|q, _| *q > md);
                sub.redeliveries.retain(|q, _| *q > md);
                sub.replay = sub.replay.split_off(&Pos::new(md.ledger_id, md.entry_id + 1));
                sub.fetched.retain(|q, _| *q > md);
            } else if sub.cursor.ack(p, set, &self.ml.span) {
                sub.pending.remove(&p);
                sub.redeliveries.remove(&p);
                sub.replay.remove(&p);
                sub.fetched.remove(&p);
            }
        }
        sub.dirty = true;
        ack_response(sub, key, ack.request_id, None);
    }

    fn remove_consumer(&mut self, key: (u64, u64)) {
        let Some(name) = self.index.remove(&key) else { return };
        let Some(sub) = self.subs.get_mut(&name) else { return };
        let Some(i) = sub.consumers.iter().position(|c| c.key == key) else { return };
        let c = sub.consumers.remove(i);
        sub.selector.remove(c.cid);
        let theirs: Vec<Pos> = sub.pending.iter().filter(|(_, x)| **x == c.cid).map(|(p, _)| *p).collect();
        redeliver(sub, theirs, true);
        if sub.consumers.is_empty() && !sub.durable {
            self.subs.remove(&name);
            return;
        }
        if sub.consumers.is_empty() {
            // Read entries kept for nobody: a consumer that comes reads them again.
            sub.fetched.clear();
        }
        update_active(sub, self.ml.name.partition(), false);
        dispatch(sub, &mut self.ml);
    }

    async fn unsubscribe(&mut self, key: (u64, u64), request_id: u64, force: bool) {
        let Some(name) = self.index.get(&key).cloned() else { return };
        let Some(sub) = self.subs.get(&name) else { return };
        let Some(me) = sub.consumers.iter().find(|c| c.key == key).map(|c| c.out.clone()) else { return };
        if sub.consumers.len() > 1 && !force {
            let _ = me.send(Out::Cmd(error_command(
                request_id,
                pb::ServerError::MetadataError,
                format!("subscription {name} has other connected consumers"),
            )));
            return;
        }
        if sub.durable {
            if let Err(e) = self.delete_cursor(&name).await {
                let _ = me.send(Out::Cmd(error_command(request_id, pb::ServerError::MetadataError, e)));
                return;
            }
        }
        let Some(sub) = self.subs.remove(&name) else { return };
        for c in &sub.consumers {
            self.index.remove(&c.key);
            if c.key != key {
                let _ = c.out.send(close_consumer(c.key.1));
            }
        }
        let _ = me.send(success(request_id));
        tracing::info!(topic = %self.ml.name, sub = name, "subscription deleted");
    }

    /// Deletes subscription `name`'s stored cursor, only while the topic's ledger list is at
    /// the version this task holds: a broker that lost the topic must not delete the new
    /// owner's subscription (and its backlog with it).
    pub(super) fn delete_cursor(&self, name: &str) -> impl std::future::Future<Output = Result<(), String>> + Send {
        let txn = Txn::default().compare(&self.ml.key, self.ml.version).delete(cursor_key(&self.ml.name, name));
        let (meta, topic) = (self.ml.meta.clone(), self.ml.name.to_string());
        async move {
            match meta.txn(txn).await {
                Ok(r) if r.succeeded => Ok(()),
                Ok(_) => Err(format!("topic {topic} changed meanwhile (another broker owns it now?)")),
                Err(e) => Err(e.to_string()),
            }
        }
    }

    async fn seek(&mut self, key: (u64, u64), request_id: u64, target: SeekTarget) {
        let Some(name) = self.index.get(&key).cloned() else { return };
        let md = match target {
            SeekTarget::Id(id) => match special(&id) {
                Some(true) => self.ml.span.before_first(),
                Some(false) => self.ml.span.last(),
                None => Pos::new(id.ledger_id, id.entry_id as i64 - 1),
            },
            SeekTarget::PublishTime(t) => match self.find_by_time(t).await {
                Ok(p) => p,
                Err(e) => {
                    if let Some(c) = self.subs.get(&name).and_then(|s| s.consumers.iter().find(|c| c.key == key)) {
                        let _ = c.out.send(Out::Cmd(error_command(request_id, pb::ServerError::PersistenceError, e)));
                    }
                    return;
                }
            },
        };
        // A failure was answered to the client; the reset is stored again later.
        let _ = self.reset_sub(&name, md, Some((key, request_id))).await;
    }

    /// Resets a subscription to `md`, stores it, and closes its consumers so their clients
    /// reconnect from there; `answer` is the SEEK to answer first. An error says the reset was
    /// not stored: it holds in memory, and is stored again with the next writes.
    pub(super) async fn reset_sub(
        &mut self,
        name: &str,
        md: Pos,
        answer: Option<((u64, u64), u64)>,
    ) -> Result<(), CursorWrite> {
        // Not past the end of the log: that would acknowledge messages not written yet.
        let md = md.min(self.ml.span.last());
        let Some(sub) = self.subs.get_mut(name) else { return Ok(()) };
        sub.cursor.reset(md);
        sub.read_pos = md;
        sub.replay.clear();
        sub.delayed.clear();
        sub.pending.clear();
        sub.redeliveries.clear();
        sub.fetched.clear();
        sub.reading = false;
        sub.generation += 1;
        sub.dirty = true;
        let consumers = std::mem::take(&mut sub.consumers);
        sub.selector = KeySelector::default();
        sub.active = None;
        let durable = sub.durable;
        // Stored before anyone hears of it: a broker that died right after answering would
        // otherwise bring the subscription back to where it was, past what the client sought.
        let stored = match durable {
            true => self.store_cursor(name).await,
            false => Ok(()),
        };
        for c in &consumers {
            if let Some((_, request_id)) = answer.filter(|(k, _)| *k == c.key) {
                let reply = match &stored {
                    Ok(()) => success(request_id),
                    Err(e) => Out::Cmd(error_command(
                        request_id,
                        pb::ServerError::MetadataError,
                        format!("the reset subscription was not stored ({e:?}); it is stored again later"),
                    )),
                };
                let _ = c.out.send(reply);
            }
            let _ = c.out.send(close_consumer(c.key.1));
            self.index.remove(&c.key);
        }
        tracing::info!(topic = %self.ml.name, sub = name, position = %md, "subscription reset");
        if !durable {
            self.subs.remove(name);
        }
        stored
    }

    /// The position before the first entry published at or after `t` (binary search over
    /// publish times, which grow with the log).
    async fn find_by_time(&mut self, t: u64) -> Result<Pos, String> {
        let (mut lo, mut hi) = (0u64, self.ml.span.total_entries());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let Some(p) = self.ml.span.nth(mid) else { break };
            let info = self.ml.entry_info(p).await?;
            if info.publish_time >= t {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(match lo.checked_sub(1).and_then(|i| self.ml.span.nth(i)) {
            Some(p) => p,
            None => self.ml.span.before_first(),
        })
    }

    /// The last message id (with the batch index of a batched last entry).
    pub(super) async fn last_id(&mut self) -> pb::MessageIdData {
        let last = self.ml.span.last();
        let mut id = id_data(last);
        if last.entry_id >= 0 {
            match self.ml.entry_info(last).await {
                Ok(info) if info.batched => id.batch_index = Some(info.num_messages as i32 - 1),
                Ok(_) => {}
                Err(e) => tracing::warn!(topic = %self.ml.name, error = %e, "reading the last entry failed"),
            }
        }
        id
    }

    async fn last_message_id(&mut self, key: (u64, u64), request_id: u64) {
        // With the partition index, as the consumer's message ids carry it (clients compare
        // them when they ask whether a message is available).
        let partition = self.ml.name.partition().map_or(-1, |p| p as i32);
        let id = pb::MessageIdData { partition: Some(partition), ..self.last_id().await };
        let Some(sub) = sub_of(&self.index, &mut self.subs, key) else { return };
        let md = sub.cursor.mark_delete();
        let Some(c) = sub.consumers.iter().find(|c| c.key == key) else { return };
        let _ = c.out.send(Out::Cmd(pb::BaseCommand {
            get_last_message_id_response: Some(Box::new(pb::CommandGetLastMessageIdResponse {
                last_message_id: id,
                request_id,
                consumer_mark_delete_position: Some(id_data(md)),
            })),
            ..base(Type::GetLastMessageIdResponse)
        }));
    }

    fn consumer_stats(&mut self, key: (u64, u64), request_id: u64) {
        let span = self.ml.span.clone();
        let Some(sub) = sub_of(&self.index, &mut self.subs, key) else { return };
        let backlog = span.entries_after(sub.cursor.mark_delete()).saturating_sub(sub.cursor.acked_count());
        let Some(c) = sub.consumers.iter().find(|c| c.key == key) else { return };
        let unacked = sub.pending.values().filter(|x| **x == c.cid).count() as u64;
        let _ = c.out.send(Out::Cmd(pb::BaseCommand {
            consumer_stats_response: Some(Box::new(pb::CommandConsumerStatsResponse {
                request_id,
                consumer_name: Some(c.name.clone()),
                available_permits: Some(c.permits.max(0) as u64),
                unacked_messages: Some(unacked),
                r#type: Some(sub_type_name(sub.sub_type).into()),
                msg_backlog: Some(backlog),
                ..Default::default()
            })),
            ..base(Type::ConsumerStatsResponse)
        }));
    }
}

fn sub_of<'a>(
    index: &HashMap<(u64, u64), String>,
    subs: &'a mut HashMap<String, Sub>,
    key: (u64, u64),
) -> Option<&'a mut Sub> {
    subs.get_mut(index.get(&key)?)
}

fn sub_type_name(t: SubType) -> &'static str {
    match t {
        SubType::Exclusive => "Exclusive",
        SubType::Shared => "Shared",
        SubType::Failover => "Failover",
        SubType::KeyShared => "Key_Shared",
    }
}

fn cursor_body(sub: &Sub) -> Vec<u8> {
    serde_json::to_vec(&sub.cursor.to_info(sub_type_name(sub.sub_type), &sub.properties)).unwrap_or_default()
}

/// Puts `positions` back for delivery; `count` raises their redelivery counts.
fn redeliver(sub: &mut Sub, positions: Vec<Pos>, count: bool) {
    for p in positions {
        // Once only, however often a request names it (each would count a redelivery).
        if sub.pending.remove(&p).is_none() {
            continue;
        }
        if !sub.cursor.is_acked(p) {
            sub.replay.insert(p);
            if count {
                *sub.redeliveries.entry(p).or_default() += 1;
            }
        }
    }
}

/// Picks the active consumer of an Exclusive or Failover subscription (lowest priority level,
/// then name; a partition picks by its index) and tells consumers when it changes.
fn update_active(sub: &mut Sub, partition: Option<u32>, joined: bool) {
    if !matches!(sub.sub_type, SubType::Exclusive | SubType::Failover) || sub.consumers.is_empty() {
        sub.active = None;
        return;
    }
    let mut order: Vec<&Consumer> = sub.consumers.iter().collect();
    order.sort_by(|a, b| (a.priority, &a.name, a.cid).cmp(&(b.priority, &b.name, b.cid)));
    let top = order[0].priority;
    let candidates: Vec<&Consumer> = order.into_iter().filter(|c| c.priority == top).collect();
    let pick = candidates[partition.unwrap_or(0) as usize % candidates.len()].cid;
    let changed = sub.active != Some(pick);
    if changed {
        // Whatever the previous active consumer held goes to the new one.
        if let Some(old) = sub.active {
            let theirs: Vec<Pos> = sub.pending.iter().filter(|(_, c)| **c == old).map(|(p, _)| *p).collect();
            redeliver(sub, theirs, false);
        }
        sub.active = Some(pick);
    }
    if sub.sub_type == SubType::Failover && (changed || joined) {
        for c in &sub.consumers {
            if c.protocol_version >= 12 && (changed || joined && Some(c.cid) != sub.active || c.cid == pick) {
                let _ = c.out.send(Out::Cmd(pb::BaseCommand {
                    active_consumer_change: Some(Box::new(pb::CommandActiveConsumerChange {
                        consumer_id: c.key.1,
                        is_active: Some(c.cid == pick),
                    })),
                    ..base(Type::ActiveConsumerChange)
                }));
            }
        }
    }
}

/// Sends what the subscription's consumers have permits for: first positions to deliver
/// again, then new entries. Entries not in the tail cache are read from the bookies.
fn dispatch(sub: &mut Sub, ml: &mut Ml) {
    // A terminated topic whose every entry this subscription has read: consumers hear it.
    if ml.info.terminated && sub.replay.is_empty() && sub.delayed.is_empty() && ml.span.next(sub.read_pos).is_none() {
        for c in sub.consumers.iter_mut().filter(|c| !c.told_end) {
            c.told_end = true;
            let _ = c.out.send(Out::Cmd(pb::BaseCommand {
                reached_end_of_topic: Some(Box::new(pb::CommandReachedEndOfTopic { consumer_id: c.key.1 })),
                ..base(Type::ReachedEndOfTopic)
            }));
        }
    }
    if sub.consumers.iter().all(|c| c.permits <= 0) {
        return;
    }
    let partition = ml.name.partition().map(|p| p as i32).unwrap_or(-1);
    let now = super::now_ms();
    let mut need: Vec<Pos> = Vec::new();
    let mut blocked: HashSet<u64> = HashSet::new();
    // Deliver again, in order. Where order counts (every type but Shared), nothing goes out
    // after an entry that must first be read from the bookies: later ones not in memory only
    // join the same read. A Key_Shared entry whose consumer cannot take it blocks that
    // consumer's later entries.
    let ordered = sub.sub_type != SubType::Shared;
    let mut waiting_read = false;
    // Entries examined and left in place. Past the window the rest of the set stays unknown,
    // and no new entry may overtake it; Key_Shared looks at all of it (which consumers it
    // blocks decides who may take new entries) unless a read holds everything back anyway.
    let batch = read_batch(sub, ml);
    let (mut left, window) = (0usize, 4 * ml.settings.read_batch);
    let mut cut = false;
    let mut after: Option<Pos> = None;
    'replay: loop {
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let chunk: Vec<Pos> = sub.replay.range((lower, Bound::Unbounded)).take(64).copied().collect();
        let Some(&last) = chunk.last() else { break };
        after = Some(last);
        for p in chunk {
            if sub.cursor.is_acked(p) || !ml.span.contains(p) {
                sub.replay.remove(&p);
                sub.fetched.remove(&p);
                continue;
            }
            let unknown = left >= window && (sub.sub_type != SubType::KeyShared || waiting_read);
            if unknown || sub.consumers.iter().all(|c| c.permits <= 0 || blocked.contains(&c.cid)) {
                cut = true;
                break 'replay;
            }
            let Some(c) = ml.cache.get(&p).or_else(|| sub.fetched.get(&p)).cloned() else {
                if need.len() < batch {
                    need.push(p);
                }
                waiting_read |= ordered;
                left += 1;
                continue;
            };
            if waiting_read {
                left += 1;
                continue;
            }
            if hold(sub, p, &c.info, now) {
                ml.next_delayed = ml.next_delayed.min(c.info.deliver_at);
                sub.replay.remove(&p);
                continue;
            }
            match pick(sub, &c.info, &blocked) {
                Some(i) => {
                    sub.replay.remove(&p);
                    send(sub, i, p, &c, partition);
                }
                None if sub.sub_type == SubType::KeyShared => {
                    if let Some(cid) = owner(sub, &c.info) {
                        blocked.insert(cid);
                    }
                    left += 1;
                }
                None => {
                    cut = true;
                    break 'replay;
                }
            }
        }
    }
    // New entries.
    while need.is_empty() && !cut && sub.replay.len() < MAX_STASHED {
        let Some(p) = ml.span.next(sub.read_pos) else { break };
        if sub.cursor.is_acked(p) {
            sub.read_pos = p;
            sub.fetched.remove(&p);
            continue;
        }
        if sub.consumers.iter().all(|c| c.permits <= 0) {
            break;
        }
        let Some(c) = ml.cache.get(&p).or_else(|| sub.fetched.get(&p)).cloned() else {
            need = read_run(p, &ml.span, batch, |q| ml.cache.contains_key(q), |q| sub.cursor.is_acked(*q));
            break;
        };
        if hold(sub, p, &c.info, now) {
            ml.next_delayed = ml.next_delayed.min(c.info.deliver_at);
            sub.read_pos = p;
            continue;
        }
        match pick(sub, &c.info, &blocked) {
            Some(i) => {
                sub.read_pos = p;
                send(sub, i, p, &c, partition);
            }
            None if sub.sub_type == SubType::KeyShared => {
                // Its consumer is busy, or no consumer owns its key now (sticky ranges with
                // one down): keep it for later, in order, and go on with others.
                sub.read_pos = p;
                sub.replay.insert(p);
                if let Some(cid) = owner(sub, &c.info) {
                    blocked.insert(cid);
                }
                if !c.entry.is_empty() && !ml.cache.contains_key(&p) {
                    sub.fetched.insert(p, c);
                }
            }
            None => break,
        }
    }
    if !need.is_empty() && !sub.reading {
        need.retain(|p| !sub.fetched.contains_key(p));
        if !need.is_empty() {
            ml.start_read(sub, need);
        }
    }
    prefetch(sub, ml);
}

/// Entries per catch-up read: `dispatcher_max_read_batch_size`, fewer when the entries of
/// the last read were so large that as many would pass `dispatcher_max_read_size_bytes`.
fn read_batch(sub: &Sub, ml: &Ml) -> usize {
    batch_size(ml.settings.read_batch, ml.settings.read_bytes, sub.read_entry_bytes)
}

/// At most `entries`, and no more than fit in `bytes` at `entry_bytes` each; at least one,
/// and only one while no entry size is known (0), as Pulsar does: the entries could be large.
fn batch_size(entries: usize, bytes: usize, entry_bytes: usize) -> usize {
    match entry_bytes {
        0 => 1,
        n => entries.min(bytes / n).max(1),
    }
}

/// A catching-up subscription reads its next entries from the bookies while it still sends
/// the ones it has (see [`prefetch_positions`]). Without it, reading and sending took turns,
/// and a consumer that had fallen behind caught up more slowly than a producer at half the
/// broker's peak rate published.
fn prefetch(sub: &mut Sub, ml: &mut Ml) {
    if sub.reading || !sub.replay.is_empty() || sub.consumers.is_empty() {
        return;
    }
    let batch = read_batch(sub, ml);
    let need = prefetch_positions(
        sub.fetched.keys().copied(),
        sub.read_pos,
        &ml.span,
        batch,
        |p| ml.cache.contains_key(p),
        |p| sub.cursor.is_acked(*p),
    );
    if !need.is_empty() {
        ml.start_read(sub, need);
    }
}

/// What to read ahead: once fewer than a read batch of `fetched` entries lie past
/// `read_pos`, a [`read_run`] from the entry after the last of them. Nothing when no fetched
/// entry lies ahead: dispatch then reads what it needs itself.
fn prefetch_positions(
    fetched: impl Iterator<Item = Pos>,
    read_pos: Pos,
    span: &LedgerSpan,
    batch: usize,
    cached: impl Fn(&Pos) -> bool,
    acked: impl Fn(&Pos) -> bool,
) -> Vec<Pos> {
    let ahead = fetched.filter(|p| *p > read_pos);
    let (count, last) = ahead.fold((0usize, None::<Pos>), |(n, m), p| (n + 1, m.max(Some(p))));
    match last.filter(|_| count < batch).and_then(|l| span.next(l)) {
        Some(first) => read_run(first, span, batch, cached, acked),
        None => Vec::new(),
    }
}

/// The positions one catch-up read takes from `first` on: entries of `first`'s ledger in
/// order, up to `batch` of them, leaving out acknowledged ones, and stopping where the tail
/// cache begins (`cached`) or after looking at four batches' worth.
fn read_run(
    first: Pos,
    span: &LedgerSpan,
    batch: usize,
    cached: impl Fn(&Pos) -> bool,
    acked: impl Fn(&Pos) -> bool,
) -> Vec<Pos> {
    let mut need = Vec::new();
    let (mut next, mut looked) = (Some(first), 0);
    while let Some(p) = next.filter(|p| p.ledger_id == first.ledger_id && !cached(p)) {
        if need.len() >= batch || looked >= 4 * batch {
            break;
        }
        looked += 1;
        if !acked(&p) {
            need.push(p);
        }
        next = span.next(p);
    }
    need
}

/// Whether a subscription of this type holds delayed entries back (Pulsar delays them for
/// Shared and Key_Shared only; the others get them at once).
fn delays(t: SubType) -> bool {
    matches!(t, SubType::Shared | SubType::KeyShared)
}

/// Holds back an entry that is not due yet; true if it did.
fn hold(sub: &mut Sub, p: Pos, info: &EntryInfo, now: u64) -> bool {
    if info.deliver_at <= now || !delays(sub.sub_type) {
        return false;
    }
    sub.delayed.insert((info.deliver_at, p));
    sub.fetched.remove(&p);
    true
}

/// Releases what is due in every subscription; returns the next delivery time still held.
fn release_all_delayed(subs: &mut HashMap<String, Sub>, now: u64) -> u64 {
    let mut next = u64::MAX;
    for sub in subs.values_mut() {
        release_delayed(sub, now);
        if let Some(&(at, _)) = sub.delayed.first() {
            next = next.min(at);
        }
    }
    next
}

/// Moves the delayed entries that are due (all of them, if the subscription's type no longer
/// delays) to the positions to deliver.
fn release_delayed(sub: &mut Sub, now: u64) {
    let all = !delays(sub.sub_type);
    while let Some(&(at, p)) = sub.delayed.first() {
        if at > now && !all {
            break;
        }
        sub.delayed.pop_first();
        sub.replay.insert(p);
    }
}

/// The consumer a Key_Shared entry belongs to.
fn owner(sub: &Sub, info: &EntryInfo) -> Option<u64> {
    (sub.sub_type == SubType::KeyShared).then(|| sub.selector.select(info.slot)).flatten()
}

/// Index of the consumer to get an entry, if one can take it now.
fn pick(sub: &mut Sub, info: &EntryInfo, blocked: &HashSet<u64>) -> Option<usize> {
    match sub.sub_type {
        SubType::Exclusive | SubType::Failover => {
            let active = sub.active?;
            sub.consumers.iter().position(|c| c.cid == active && c.permits > 0)
        }
        SubType::Shared => {
            let n = sub.consumers.len();
            for k in 0..n {
                let i = (sub.rr + k) % n;
                if sub.consumers[i].permits > 0 {
                    sub.rr = (i + 1) % n;
                    return Some(i);
                }
            }
            None
        }
        SubType::KeyShared => {
            let cid = sub.selector.select(info.slot)?;
            if blocked.contains(&cid) {
                return None;
            }
            sub.consumers.iter().position(|c| c.cid == cid && c.permits > 0)
        }
    }
}

fn send(sub: &mut Sub, i: usize, p: Pos, c: &Cached, partition: i32) {
    let redelivery_count = sub.redeliveries.get(&p).copied().unwrap_or(0);
    let ack_set = sub.cursor.partial(p).map(|s| s.to_vec()).unwrap_or_default();
    let consumer = &mut sub.consumers[i];
    tracing::trace!(sub = sub.name, consumer = consumer.name, position = %p, redelivery_count, "dispatch");
    consumer.permits -= c.info.num_messages as i64;
    consumer.msg_out.add(c.info.num_messages as u64);
    consumer.bytes_out.add(c.entry.len() as u64);
    sub.msg_out.add(c.info.num_messages as u64);
    sub.bytes_out.add(c.entry.len() as u64);
    sub.fetched.remove(&p);
    sub.pending.insert(p, consumer.cid);
    let cmd = pb::BaseCommand {
        message: Some(Box::new(pb::CommandMessage {
            consumer_id: consumer.key.1,
            message_id: message_id(p, partition),
            redelivery_count: (redelivery_count > 0).then_some(redelivery_count),
            ack_set,
            consumer_epoch: consumer.epoch,
        })),
        ..base(Type::Message)
    };
    let _ = consumer.out.send(Out::Msg(cmd, c.entry.clone(), c.info.crc));
}

impl Ml {
    /// The facts of one entry (from the cache or the bookies).
    async fn entry_info(&mut self, p: Pos) -> Result<EntryInfo, String> {
        if let Some(c) = self.cache.get(&p) {
            return Ok(c.info);
        }
        if let Some((q, info)) = self.last_info {
            if q == p {
                return Ok(info);
            }
        }
        let current = self.current_reader(p.ledger_id);
        let entries = read_positions(self.ledgers.clone(), current, vec![p]).await?;
        let (_, entry) = entries.into_iter().next().ok_or_else(|| format!("entry {p} not found"))?;
        let (md, data) = decode_entry(&entry).map_err(|e| e.to_string())?;
        Ok(EntryInfo::from_entry(&md, &data))
    }

    fn current_reader(&self, ledger: u64) -> Option<(u64, LedgerReader)> {
        self.writer.as_ref().filter(|w| w.id() == ledger).map(|w| (w.id(), w.reader()))
    }

    fn start_read(&mut self, sub: &mut Sub, positions: Vec<Pos>) {
        sub.reading = true;
        let (instance, generation, name) = (sub.instance, sub.generation, sub.name.clone());
        let (tx, ledgers) = (self.tx.clone(), self.ledgers.clone());
        let current = self.writer.as_ref().map(|w| (w.id(), w.reader()));
        tokio::spawn(async move {
            let result = read_positions(ledgers, current, positions).await;
            let _ = tx.send(Cmd::ReadDone { sub: name, instance, generation, result });
        });
    }

    /// Looks for deletable ledgers again only after `retention_check_interval`.
    fn defer_trim(&mut self) {
        self.next_trim_check = Some(Instant::now() + self.settings.retention_check_interval);
    }

    /// Records that this topic's ledger `id` was closed with `last_entry` (in memory; the
    /// caller stores the list).
    fn closed(&mut self, id: u64, last_entry: i64) {
        self.span.set_last(id, last_entry);
        if let Some(l) = self.info.ledgers.iter_mut().find(|l| l.ledger_id == id) {
            l.last_entry = Some(last_entry);
            l.size = Some(self.ledger_bytes);
            l.timestamp = Some(super::now_ms());
        }
    }

    /// Closes the current ledger, creates the next and records both in one CAS (the one that
    /// creates the new ledger).
    async fn roll(&mut self) -> Result<(), super::TopicError> {
        let started = Instant::now();
        if let Some(w) = self.writer.take() {
            let id = w.id();
            let md = w.close().await?;
            self.closed(id, md.last_entry);
        }
        let (writer, info, version) =
            create_listed(&self.ledgers, &self.settings, &self.name, &self.key, &self.info, self.version).await?;
        self.version = version;
        self.info = info;
        self.span.push(writer.id(), -1);
        tracing::info!(
            topic = %self.name,
            ledger = writer.id(),
            entries = self.ledger_entries,
            took_ms = started.elapsed().as_millis() as u64,
            "rolled over to a new ledger"
        );
        self.writer = Some(writer);
        self.ledger_entries = 0;
        self.ledger_bytes = 0;
        self.ledger_since = Instant::now();
        Ok(())
    }
}

/// Topic-level policy `key` of `topic`, as `read` takes it: its own, else (for a partition)
/// its partitioned topic's; `None` when neither sets it (the namespace's or the broker's
/// applies). A value `read` does not take (of another type) counts as unset.
async fn topic_policy<T>(
    meta: &MetaClient,
    topic: &TopicName,
    key: &str,
    read: impl Fn(&serde_json::Value) -> Option<T>,
) -> Result<Option<T>, String> {
    let mut names = vec![topic.clone()];
    if topic.partition().is_some() {
        names.push(topic.partitioned_parent());
    }
    for n in &names {
        let kv = meta.get(&super::topic_policies_key(n)).await.map_err(|e| e.to_string())?;
        let policies: serde_json::Value = kv.and_then(|kv| serde_json::from_slice(&kv.value).ok()).unwrap_or_default();
        if let Some(v) = policies.get(key).and_then(&read) {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// The policy in effect for `topic` (`pulsar-admin topics get-… --applied`), as `read` takes
/// it: its own `key`, its partitioned topic's, else its namespace's `namespace_key`; `None`
/// when none sets it (the broker's default applies).
pub async fn applied_policy<T>(
    meta: &MetaClient,
    topic: &TopicName,
    key: &str,
    namespace_key: &str,
    read: impl Fn(&serde_json::Value) -> Option<T>,
) -> Result<Option<T>, String> {
    if let Some(v) = topic_policy(meta, topic, key, &read).await? {
        return Ok(Some(v));
    }
    Ok(namespace_policies(meta, topic).await?.get(namespace_key).and_then(&read))
}

/// The policies stored with `topic`'s namespace (`Null` when it has none).
async fn namespace_policies(meta: &MetaClient, topic: &TopicName) -> Result<serde_json::Value, String> {
    let key = format!("/namespaces/{}/{}", topic.tenant, topic.namespace);
    let kv = meta.get(&key).await.map_err(|e| e.to_string())?;
    Ok(kv.and_then(|kv| serde_json::from_slice(&kv.value).ok()).unwrap_or(serde_json::Value::Null))
}

/// The retention of `topic`'s namespace: its policy, else `default`. When the policy cannot
/// be read, everything is kept for now.
async fn retention(meta: &MetaClient, topic: &TopicName, default: Retention) -> Retention {
    match namespace_policies(meta, topic).await {
        Ok(policies) => Retention::from_policy(&policies).unwrap_or(default),
        Err(e) => {
            tracing::debug!(topic = %topic, error = %e, "reading the namespace's retention failed");
            Retention { time: None, size: None }
        }
    }
}

/// Reads positions (grouped into runs per ledger); the ledger being written is read through
/// its writer's reader.
async fn read_positions(
    ledgers: LedgerClient,
    current: Option<(u64, LedgerReader)>,
    positions: Vec<Pos>,
) -> Result<Vec<(Pos, Bytes)>, String> {
    let mut out = Vec::with_capacity(positions.len());
    let mut i = 0;
    while i < positions.len() {
        let first = positions[i];
        let mut j = i + 1;
        while j < positions.len()
            && positions[j].ledger_id == first.ledger_id
            && positions[j].entry_id == positions[j - 1].entry_id + 1
        {
            j += 1;
        }
        let last = positions[j - 1];
        let entries = match &current {
            Some((id, r)) if *id == first.ledger_id => r.read(first.entry_id, last.entry_id).await,
            _ => match ledgers.open_reader(first.ledger_id).await {
                Ok(r) => r.read(first.entry_id, last.entry_id).await,
                Err(e) => Err(e),
            },
        }
        .map_err(|e| e.to_string())?;
        for (k, entry) in entries.into_iter().enumerate() {
            out.push((Pos::new(first.ledger_id, first.entry_id + k as i64), entry));
        }
        i = j;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{batch_size, prefetch_positions, read_run, unshared, LedgerSpan, Pos, UNSHARED_BELOW};

    /// Small entries are cached as copies, so that they do not keep their connection's read
    /// buffer alive; large ones, most of their buffer anyway, as they are.
    #[test]
    fn small_entries_are_cached_in_their_own_allocation() {
        let buffer = bytes::Bytes::from(vec![7u8; 4 * UNSHARED_BELOW]);
        let small = buffer.slice(100..200);
        let kept = unshared(small.clone());
        assert_eq!(kept, small);
        assert_ne!(kept.as_ptr(), small.as_ptr(), "a small entry still points into its buffer");
        let large = buffer.slice(0..UNSHARED_BELOW);
        assert_eq!(unshared(large.clone()).as_ptr(), large.as_ptr(), "a large entry was copied");
    }

    fn range(ledger: u64, entries: std::ops::Range<i64>) -> Vec<Pos> {
        entries.map(|e| Pos::new(ledger, e)).collect()
    }

    /// A catching-up subscription reads ahead once less than a batch of fetched entries lies
    /// ahead: the entries after the last fetched one, a batch at most, within one ledger, short
    /// of the tail cache, and without acknowledged ones.
    #[test]
    fn catch_up_reads_ahead_before_the_fetched_entries_run_out() {
        let span = LedgerSpan::new(vec![(1, 999), (2, 99)]);
        let none = |_: &Pos| false;
        let ahead = |fetched: &[Pos], read_pos: i64, cached: &dyn Fn(&Pos) -> bool, acked: &dyn Fn(&Pos) -> bool| {
            prefetch_positions(fetched.iter().copied(), Pos::new(1, read_pos), &span, 100, cached, acked)
        };
        // 120 fetched entries ahead of the read position (30..=149): no read yet.
        let fetched = range(1, 0..150);
        assert!(ahead(&fetched, 29, &none, &none).is_empty());
        // 80 ahead (70..=149): the next batch, 150..=249.
        assert_eq!(ahead(&fetched, 69, &none, &none), range(1, 150..250));
        // Nothing ahead: dispatch reads what it needs itself.
        assert!(ahead(&fetched, 149, &none, &none).is_empty());
        // The read stops at the ledger's end...
        let fetched = range(1, 950..970);
        assert_eq!(ahead(&fetched, 955, &none, &none), range(1, 970..1000));
        // ...and where the tail cache starts...
        let cached = |p: &Pos| p.ledger_id == 1 && p.entry_id >= 980;
        assert_eq!(ahead(&fetched, 955, &cached, &none), range(1, 970..980));
        // ...and leaves acknowledged entries out.
        let acked = |p: &Pos| p.entry_id % 2 == 0;
        let odd: Vec<Pos> = range(1, 970..980).into_iter().filter(|p| p.entry_id % 2 == 1).collect();
        assert_eq!(ahead(&fetched, 955, &cached, &acked), odd);
        // After a ledger's last entry: the next ledger's first ones.
        let fetched = range(1, 990..1000);
        assert_eq!(ahead(&fetched, 995, &none, &none), range(2, 0..100));
    }

    /// A read run looks at four batches at most when nearly everything is acknowledged.
    #[test]
    fn a_read_run_over_acknowledged_entries_is_bounded() {
        let span = LedgerSpan::new(vec![(1, 9999)]);
        let acked = |p: &Pos| p.entry_id % 1000 != 999;
        assert!(read_run(Pos::new(1, 0), &span, 100, |_| false, acked).is_empty());
        assert_eq!(read_run(Pos::new(1, 900), &span, 100, |_| false, acked), vec![Pos::new(1, 999)]);
    }

    /// A catch-up read holds `dispatcherMaxReadBatchSize` entries, fewer when entries as large
    /// as the last read's would pass `dispatcherMaxReadSizeBytes`, and at least one.
    #[test]
    fn catch_up_reads_are_bounded_in_bytes() {
        assert_eq!(batch_size(100, 5 << 20, 0), 1, "before any read");
        assert_eq!(batch_size(100, 5 << 20, 1024), 100);
        assert_eq!(batch_size(100, 5 << 20, 128 << 10), 40);
        assert_eq!(batch_size(100, 5 << 20, 5 << 20), 1);
        assert_eq!(batch_size(100, 5 << 20, 64 << 20), 1, "an entry larger than the bound");
    }
}
