//! One client connection: handshake, then commands in order. Replies and messages go through
//! one outgoing queue drained by a writer task, so slow appends never block reading and a
//! reply is never overtaken by a later one. Producers append through their topic's task;
//! consumers are registered with it, and it sends their messages into this queue.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::{max_frame, Shared};
use crate::ownership::Owner;
use crate::protocol::codec::{base, CodecError, ENTRY_HEADROOM};
use crate::protocol::connection::{accept, error_command, ConnError, FrameReader, FrameWriter};
use crate::protocol::names::TopicName;
use crate::protocol::pb;
use crate::topic::schema;
use crate::topic::{
    producer_success, Cmd, ConsumerSpec, EntryInfo, Liveness, Out, OutTx, ProducerRequest, ProducerState, SeekTarget,
    SentBy, Topic,
};
use pb::base_command::Type;

/// How long a new connection may take to send CONNECT.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Quiet time after which the broker pings a client (Pulsar's keepAliveIntervalSeconds).
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a closing connection's writer may take to send what is queued.
const WRITER_GRACE: std::time::Duration = std::time::Duration::from_secs(10);
/// Flush the outgoing buffer once it holds this much.
const FLUSH_AT: usize = 256 * 1024;

type Appended = futures::future::BoxFuture<'static, Result<crate::topic::position::Pos, crate::topic::AppendError>>;

/// What a producer's answering task handles, in arrival order.
enum PendingSend {
    /// A send waiting for its append: sequence id, highest sequence id, the append, and its
    /// place in the connection's back-pressure count until answered.
    Send(u64, u64, Appended, super::throttle::InFlight),
    /// CLOSE_PRODUCER: answered once every send before it is, as Pulsar does (a client fails
    /// whatever is still pending when the close is answered).
    Close(u64),
}

struct Producer {
    topic: Topic,
    /// Sends, in arrival order, to the task that awaits their appends and answers.
    queue: mpsc::UnboundedSender<PendingSend>,
    /// What its topic tells about it: ready to send, closed, its topic epoch.
    state: Arc<ProducerState>,
}

/// Sends a request to a consumer's topic, answering it if the topic's task has stopped.
fn forward(t: &Topic, cmd: Cmd, request_id: u64, out: &OutTx) {
    if t.send(cmd).is_err() {
        reply(out, error_command(request_id, pb::ServerError::ServiceNotReady, "the topic is closing; reconnect"));
    }
}

fn reply(out: &OutTx, cmd: pb::BaseCommand) {
    let _ = out.send(Out::Cmd(cmd));
}

fn success(request_id: u64) -> pb::BaseCommand {
    pb::BaseCommand { success: Some(Box::new(pb::CommandSuccess { request_id, schema: None })), ..base(Type::Success) }
}

pub(crate) async fn serve(stream: TcpStream, shared: Arc<Shared>) -> Result<(), ConnError> {
    let (r, w) = stream.into_split();
    let mut reader = FrameReader::new(r, max_frame(shared.max_message_size));
    let mut writer = FrameWriter::new(w);
    // A peer that does not complete the handshake in time is dropped.
    let handshake =
        accept(&mut reader, &mut writer, concat!("magnetar-", env!("CARGO_PKG_VERSION")), shared.max_message_size);
    let session = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| ConnError::Protocol("no CONNECT within the handshake timeout".into()))??;
    tracing::debug!(client = %session.client_version, version = session.protocol_version, "client connected");
    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    shared.connections.created.fetch_add(1, Ordering::Relaxed);

    let (out, mut out_rx) = mpsc::unbounded_channel::<Out>();
    let write_task = tokio::spawn(async move {
        while let Some(first) = out_rx.recv().await {
            let mut next = Some(first);
            while let Some(o) = next {
                match &o {
                    Out::Cmd(c) => writer.queue(c),
                    Out::Msg(c, entry, crc) => writer.queue_with_entry(c, entry, *crc),
                }
                if writer.buffered() >= FLUSH_AT && writer.flush().await.is_err() {
                    return;
                }
                next = out_rx.try_recv().ok();
            }
            if writer.flush().await.is_err() {
                return;
            }
        }
    });

    let (loaded_tx, mut loaded_rx) = mpsc::unbounded_channel();
    let (refused_tx, mut refused_rx) = mpsc::unbounded_channel::<(u64, Arc<ProducerState>)>();
    let throttle = super::throttle::ConnThrottle::new(
        shared.connections.max_pending_per_connection,
        shared.connections.publish.clone(),
    );
    let live = Liveness::new(out.clone());
    let mut conn_state = Conn {
        throttle: throttle.clone(),
        live: live.clone(),
        shared: shared.clone(),
        conn,
        out: out.clone(),
        loaded: loaded_tx,
        refused: refused_tx,
        loading: HashMap::new(),
        session_version: session.protocol_version,
        producers: HashMap::new(),
        consumers: HashMap::new(),
    };
    let mut silent = 0u32;
    let result = loop {
        // Keep-alive: a PING after a quiet interval; a client silent for two is gone.
        let read = tokio::select! {
            biased;
            Some((cmd, schema_version)) = loaded_rx.recv() => {
                // A PRODUCER or SUBSCRIBE whose topic has loaded meanwhile.
                if let Some((waiter, request_id)) = Waiter::of(&cmd) {
                    if conn_state.loading.remove(&waiter) == Some(true) {
                        let why = "closed by the client before it was ready";
                        reply(&out, error_command(request_id, pb::ServerError::ServiceNotReady, why));
                        continue;
                    }
                }
                live.busy(true);
                let r = conn_state.after_load(cmd, schema_version).await;
                live.busy(false);
                if let Err(e) = r {
                    break Err(e);
                }
                continue;
            }
            Some((producer_id, state)) = refused_rx.recv() => {
                // A producer the topic refused is forgotten (unless its id was reused since).
                if conn_state.producers.get(&producer_id).is_some_and(|p| Arc::ptr_eq(&p.state, &state)) {
                    conn_state.producers.remove(&producer_id);
                }
                continue;
            }
            _ = live.killed() => break Err(ConnError::Protocol("the client did not answer a liveness check".into())),
            // Not read while too many sends wait for their appends; the keep-alive interval
            // counts from when reading resumes.
            r = async {
                if throttle.paused() {
                    live.busy(true);
                    throttle.readable().await;
                }
                live.busy(false);
                tokio::time::timeout(KEEPALIVE, reader.next()).await
            } => r,
        };
        let next = match read {
            Ok(r) => {
                silent = 0;
                r
            }
            Err(_) => {
                silent += 1;
                if silent >= 2 {
                    break Err(ConnError::Protocol("no traffic from the client for two keep-alive intervals".into()));
                }
                reply(&out, base(Type::Ping));
                continue;
            }
        };
        let frame = match next {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            Err(ConnError::Codec(CodecError::ChecksumMismatch { command, .. })) => {
                // The frame is intact but its payload is not: only that send fails.
                tracing::warn!("payload checksum mismatch");
                if let Some(s) = command.and_then(|c| c.send) {
                    reply(
                        &out,
                        pb::BaseCommand {
                            send_error: Some(Box::new(pb::CommandSendError {
                                producer_id: s.producer_id,
                                sequence_id: s.sequence_id,
                                error: pb::ServerError::ChecksumError as i32,
                                message: "payload checksum mismatch".into(),
                            })),
                            ..base(Type::SendError)
                        },
                    );
                }
                continue;
            }
            Err(e) => break Err(e),
        };
        live.heard();
        live.busy(true);
        let r = conn_state.command(frame).await;
        live.busy(false);
        if let Err(e) = r {
            break Err(e);
        }
    };
    live.closing();
    conn_state.close();
    live.closed();
    drop(conn_state);
    drop(out);
    // The writer ends once the topics have dropped this connection's queue; a peer that takes
    // nothing more (gone without closing) does not hold it longer than this.
    let mut write_task = write_task;
    if tokio::time::timeout(WRITER_GRACE, &mut write_task).await.is_err() {
        write_task.abort();
    }
    shared.connections.closed.fetch_add(1, Ordering::Relaxed);
    result
}

struct Conn {
    shared: Arc<Shared>,
    conn: u64,
    out: OutTx,
    /// This connection's unanswered sends, for back-pressure.
    throttle: Arc<super::throttle::ConnThrottle>,
    /// Whether the client is still there, for topics that ask.
    live: Liveness,
    /// PRODUCER and SUBSCRIBE commands handed back once their topic has loaded (and a
    /// producer's schema is registered: its version).
    loaded: mpsc::UnboundedSender<(pb::BaseCommand, Option<u64>)>,
    /// Producers the topic refused, to be forgotten.
    refused: mpsc::UnboundedSender<(u64, Arc<ProducerState>)>,
    /// Producers and consumers whose PRODUCER or SUBSCRIBE waits for its topic to load: true
    /// once the client closed them meanwhile (they are then not registered when it has).
    loading: HashMap<Waiter, bool>,
    session_version: i32,
    producers: HashMap<u64, Producer>,
    consumers: HashMap<u64, Topic>,
}

/// A producer or consumer id of this connection.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Waiter {
    Producer(u64),
    Consumer(u64),
}

impl Waiter {
    fn of(cmd: &pb::BaseCommand) -> Option<(Waiter, u64)> {
        match (&cmd.producer, &cmd.subscribe) {
            (Some(p), _) => Some((Waiter::Producer(p.producer_id), p.request_id)),
            (_, Some(s)) => Some((Waiter::Consumer(s.consumer_id), s.request_id)),
            _ => None,
        }
    }
}

fn missing(what: &str) -> ConnError {
    ConnError::Protocol(format!("{what} without its body"))
}

impl Conn {
    /// Leaves every topic this connection produced or consumed on.
    fn close(&mut self) {
        for (id, p) in self.producers.drain() {
            let _ = p.topic.send(Cmd::RemoveProducer { conn: self.conn, producer_id: id });
        }
        for (id, t) in self.consumers.drain() {
            let _ = t.send(Cmd::CloseConsumer { key: (self.conn, id) });
        }
    }

    async fn topic(&self, request_id: u64, name: &str) -> Option<Topic> {
        self.topic_if(request_id, name, true).await
    }

    /// [`Conn::topic`]; with `create` false, a topic that does not exist yet is answered
    /// `TopicNotFound` instead of being created (SUBSCRIBE with `force_topic_creation=false`,
    /// as pattern consumers send, so a deleted topic is not brought back).
    async fn topic_if(&self, request_id: u64, name: &str, create: bool) -> Option<Topic> {
        let name = match TopicName::parse(name) {
            Ok(n) => n,
            Err(e) => {
                reply(&self.out, error_command(request_id, pb::ServerError::InvalidTopicName, e.to_string()));
                return None;
            }
        };
        if !create {
            match self.shared.topics.exists(&name).await {
                Ok(true) => {}
                Ok(false) => {
                    let why = format!("topic {name} does not exist");
                    reply(&self.out, error_command(request_id, pb::ServerError::TopicNotFound, why));
                    return None;
                }
                Err(e) => {
                    reply(&self.out, error_command(request_id, e.server_error(), e.to_string()));
                    return None;
                }
            }
        }
        match self.shared.topics.get_or_load(&name).await {
            Ok(t) => Some(t),
            Err(e) => {
                reply(&self.out, error_command(request_id, e.server_error(), e.to_string()));
                None
            }
        }
    }

    /// A PRODUCER or SUBSCRIBE (`cmd`) for `topic`: returned, to be served now, when the topic
    /// is loaded already (or its name is invalid, which serving it answers). Otherwise the
    /// topic loads in a task of its own, which hands `cmd` back through `loaded` (or answers
    /// the load's error): a load can take long (recovering a ledger whose bookies are down),
    /// and meanwhile the connection's other producers and consumers, and its keep-alive, go
    /// on. Clients wait for the answer before using the producer or consumer.
    ///
    /// A producer's schema is registered (a consumer's checked) in that task too, after the
    /// load, for the same reason: the metastore may be slow to answer.
    async fn load_first(
        &mut self,
        request_id: u64,
        topic: &str,
        create: bool,
        cmd: pb::BaseCommand,
    ) -> Option<(pb::BaseCommand, Option<u64>)> {
        let Ok(name) = TopicName::parse(topic) else { return Some((cmd, None)) };
        let topics = self.shared.topics.clone();
        let producer_schema = cmd.producer.as_ref().and_then(|p| p.schema.clone()).filter(schema::is_checked);
        let consumer_schema = cmd.subscribe.as_ref().and_then(|s| s.schema.clone()).filter(schema::is_concrete);
        let serving = topics.is_serving(&name).await;
        if serving && producer_schema.is_none() && consumer_schema.is_none() {
            return Some((cmd, None));
        }
        if let Some((waiter, _)) = Waiter::of(&cmd) {
            self.loading.insert(waiter, false);
        }
        let (out, loaded) = (self.out.clone(), self.loaded.clone());
        tokio::spawn(async move {
            let ready = async {
                if !serving {
                    if !create && !topics.exists(&name).await? {
                        return Err(crate::topic::TopicError::NotFound(name.to_string()));
                    }
                    topics.get_or_load(&name).await?;
                }
                Ok(())
            };
            if let Err(e) = ready.await {
                return reply(&out, error_command(request_id, e.server_error(), e.to_string()));
            }
            let version = match (&producer_schema, &consumer_schema) {
                (Some(s), _) => schema::get_or_create(topics.meta(), &name, s).await.map(Some),
                (_, Some(s)) => schema::check_consumer(topics.meta(), &name, s).await.map(|()| None),
                (None, None) => Ok(None),
            };
            match version {
                Ok(v) => {
                    let _ = loaded.send((cmd, v));
                }
                Err((code, why)) => reply(&out, error_command(request_id, code, why)),
            }
        });
        None
    }

    /// Serves a PRODUCER (with its schema's version, registered) or SUBSCRIBE.
    async fn after_load(&mut self, cmd: pb::BaseCommand, schema_version: Option<u64>) -> Result<(), ConnError> {
        match (cmd.producer, cmd.subscribe) {
            (Some(p), _) => self.add_producer(*p, schema_version).await,
            (_, Some(s)) => self.subscribe(*s).await,
            _ => return Err(ConnError::Protocol("neither PRODUCER nor SUBSCRIBE".into())),
        }
        Ok(())
    }

    /// The topic of a consumer, or an ERROR for the request.
    fn consumer(&self, consumer_id: u64, request_id: u64) -> Option<&Topic> {
        let t = self.consumers.get(&consumer_id);
        match t {
            None => reply(
                &self.out,
                error_command(request_id, pb::ServerError::ConsumerNotFound, format!("no consumer {consumer_id}")),
            ),
            // Its topic stopped (unloaded, or failed) and is telling the client to reconnect:
            // a request sent meanwhile would never be answered.
            Some(t) if t.is_closed() => {
                reply(
                    &self.out,
                    error_command(
                        request_id,
                        pb::ServerError::ServiceNotReady,
                        format!("the topic of consumer {consumer_id} is closing; reconnect"),
                    ),
                );
                return None;
            }
            Some(_) => {}
        }
        t
    }

    /// Answers a LOOKUP: connect here, connect to the owner, or go ask the assigned broker
    /// authoritatively.
    async fn lookup(&self, l: &pb::CommandLookupTopic) -> pb::CommandLookupTopicResponse {
        use pb::command_lookup_topic_response::LookupType;
        let failed = |code: pb::ServerError, message: String| pb::CommandLookupTopicResponse {
            response: Some(LookupType::Failed as i32),
            request_id: l.request_id,
            error: Some(code as i32),
            message: Some(message),
            ..Default::default()
        };
        let name = match TopicName::parse(&l.topic) {
            Ok(n) => n,
            Err(e) => return failed(pb::ServerError::InvalidTopicName, e.to_string()),
        };
        let (url, kind) = match self.shared.topics.ownership().resolve(&name, l.authoritative.unwrap_or(false)).await {
            Ok(Owner::Me) => (self.shared.service_url.clone(), LookupType::Connect),
            Ok(Owner::Other(b)) => (b.broker_url, LookupType::Connect),
            Ok(Owner::Candidate(b)) => (b.broker_url, LookupType::Redirect),
            Err(e) => return failed(pb::ServerError::ServiceNotReady, e.to_string()),
        };
        pb::CommandLookupTopicResponse {
            broker_service_url: Some(url),
            response: Some(kind as i32),
            request_id: l.request_id,
            authoritative: Some(true),
            ..Default::default()
        }
    }

    async fn command(&mut self, frame: crate::protocol::codec::Frame) -> Result<(), ConnError> {
        let cmd = frame.command;
        let out = self.out.clone();
        match Type::try_from(cmd.r#type) {
            Ok(Type::Ping) => reply(&out, base(Type::Pong)),
            Ok(Type::Pong) => self.live.pong(),
            Ok(Type::Lookup) => {
                let l = cmd.lookup_topic.ok_or_else(|| missing("LOOKUP"))?;
                let r = self.lookup(&l).await;
                reply(&out, pb::BaseCommand { lookup_topic_response: Some(Box::new(r)), ..base(Type::LookupResponse) });
            }
            Ok(Type::PartitionedMetadata) => {
                let p = cmd.partition_metadata.ok_or_else(|| missing("PARTITIONED_METADATA"))?;
                use pb::command_partitioned_topic_metadata_response::LookupType;
                let r = match TopicName::parse(&p.topic) {
                    Err(e) => Err((pb::ServerError::InvalidTopicName, e.to_string())),
                    Ok(name) => {
                        self.shared.topics.partitions(&name).await.map_err(|e| (e.server_error(), e.to_string()))
                    }
                };
                let r = match r {
                    Ok(n) => pb::CommandPartitionedTopicMetadataResponse {
                        partitions: Some(n),
                        request_id: p.request_id,
                        response: Some(LookupType::Success as i32),
                        ..Default::default()
                    },
                    Err((code, message)) => pb::CommandPartitionedTopicMetadataResponse {
                        request_id: p.request_id,
                        response: Some(LookupType::Failed as i32),
                        error: Some(code as i32),
                        message: Some(message),
                        ..Default::default()
                    },
                };
                reply(
                    &out,
                    pb::BaseCommand {
                        partition_metadata_response: Some(Box::new(r)),
                        ..base(Type::PartitionedMetadataResponse)
                    },
                );
            }
            Ok(Type::Producer) => {
                let p = cmd.producer.ok_or_else(|| missing("PRODUCER"))?;
                let (request_id, topic) = (p.request_id, p.topic.clone());
                let again = pb::BaseCommand { producer: Some(p), ..base(Type::Producer) };
                if let Some((again, version)) = self.load_first(request_id, &topic, true, again).await {
                    self.after_load(again, version).await?;
                }
            }
            Ok(Type::Send) => {
                let s = cmd.send.ok_or_else(|| missing("SEND"))?;
                let Some(producer) = self.producers.get(&s.producer_id) else {
                    // As Pulsar does: a client that sends for a producer it does not have open
                    // is out of step with the broker, and reconnects.
                    return Err(ConnError::Protocol(format!("SEND for producer {}, not open here", s.producer_id)));
                };
                if producer.state.closed.load(Ordering::Acquire) {
                    // Sent before the client saw the topic's CLOSE_PRODUCER (a fenced producer):
                    // not stored; the client resends what it still wants once it reconnects.
                    return Ok(());
                }
                let (Some(name), true) = (producer.state.name.get(), producer.state.ready.load(Ordering::Acquire))
                else {
                    // As Pulsar does: the client was not told (yet) that the producer may send.
                    return Err(ConnError::Protocol(format!("SEND for producer {}, not ready yet", s.producer_id)));
                };
                let payload = frame.payload.ok_or_else(|| ConnError::Protocol("SEND without a payload".into()))?;
                let highest = s.highest_sequence_id.unwrap_or(0).max(s.sequence_id);
                let in_flight = self.throttle.start(payload.entry.len());
                let fut: Appended = if payload.entry.len() > self.shared.max_message_size + ENTRY_HEADROOM {
                    // Refused here, for this message only: the bookies would refuse the entry
                    // and fail the topic's ledger with it.
                    let e = crate::topic::AppendError {
                        code: pb::ServerError::NotAllowedError,
                        message: format!(
                            "Exceed maximum message size: {} bytes stored, the limit is {} (max_message_size) + {ENTRY_HEADROOM}",
                            payload.entry.len(),
                            self.shared.max_message_size
                        ),
                    };
                    Box::pin(std::future::ready(Err(e)))
                } else {
                    let info =
                        EntryInfo { crc: payload.checksum, ..EntryInfo::from_entry(&payload.metadata, &payload.data) };
                    // Every chunk of a chunked message carries its sequence id: only the last
                    // one is judged by deduplication.
                    let md = &payload.metadata;
                    let dedup = md.num_chunks_from_msg.is_none_or(|n| md.chunk_id.unwrap_or(0) + 1 >= n);
                    let sent = SentBy { name: name.clone(), first: s.sequence_id, highest, dedup };
                    Box::pin(producer.topic.append(payload.entry, info, Some(sent)))
                };
                let _ = producer.queue.send(PendingSend::Send(s.sequence_id, highest, fut, in_flight));
            }
            Ok(Type::CloseProducer) => {
                let c = cmd.close_producer.ok_or_else(|| missing("CLOSE_PRODUCER"))?;
                match self.producers.remove(&c.producer_id) {
                    Some(p) => {
                        // Unregistered, or not registered if its PRODUCER is still served.
                        let _ = p.topic.send(Cmd::RemoveProducer { conn: self.conn, producer_id: c.producer_id });
                        if let Err(e) = p.queue.send(PendingSend::Close(c.request_id)) {
                            let PendingSend::Close(request_id) = e.0 else { unreachable!("a close was sent") };
                            reply(&out, success(request_id));
                        }
                    }
                    None => {
                        // Closed while its topic loads: it will not be registered.
                        if let Some(closed) = self.loading.get_mut(&Waiter::Producer(c.producer_id)) {
                            *closed = true;
                        }
                        reply(&out, success(c.request_id))
                    }
                }
            }
            Ok(Type::Subscribe) => {
                let s = cmd.subscribe.ok_or_else(|| missing("SUBSCRIBE"))?;
                let (request_id, topic, create) =
                    (s.request_id, s.topic.clone(), s.force_topic_creation.unwrap_or(true));
                let again = pb::BaseCommand { subscribe: Some(s), ..base(Type::Subscribe) };
                if let Some((again, version)) = self.load_first(request_id, &topic, create, again).await {
                    self.after_load(again, version).await?;
                }
            }
            Ok(Type::Flow) => {
                let f = cmd.flow.ok_or_else(|| missing("FLOW"))?;
                if let Some(t) = self.consumers.get(&f.consumer_id) {
                    let _ = t.send(Cmd::Flow { key: (self.conn, f.consumer_id), permits: f.message_permits });
                }
            }
            Ok(Type::Ack) => {
                let a = cmd.ack.ok_or_else(|| missing("ACK"))?;
                if let Some(t) = self.consumers.get(&a.consumer_id) {
                    let _ = t.send(Cmd::Ack { key: (self.conn, a.consumer_id), ack: *a });
                }
            }
            Ok(Type::RedeliverUnacknowledgedMessages) => {
                let r = cmd
                    .redeliver_unacknowledged_messages
                    .ok_or_else(|| missing("REDELIVER_UNACKNOWLEDGED_MESSAGES"))?;
                if let Some(t) = self.consumers.get(&r.consumer_id) {
                    let _ = t.send(Cmd::Redeliver {
                        key: (self.conn, r.consumer_id),
                        ids: r.message_ids,
                        epoch: r.consumer_epoch,
                    });
                }
            }
            Ok(Type::CloseConsumer) => {
                let c = cmd.close_consumer.ok_or_else(|| missing("CLOSE_CONSUMER"))?;
                if let Some(t) = self.consumers.remove(&c.consumer_id) {
                    let _ = t.send(Cmd::CloseConsumer { key: (self.conn, c.consumer_id) });
                }
                if let Some(closed) = self.loading.get_mut(&Waiter::Consumer(c.consumer_id)) {
                    // Closed while its topic loads: it will not be registered.
                    *closed = true;
                }
                reply(&out, success(c.request_id));
            }
            Ok(Type::Unsubscribe) => {
                let u = cmd.unsubscribe.ok_or_else(|| missing("UNSUBSCRIBE"))?;
                if let Some(t) = self.consumer(u.consumer_id, u.request_id) {
                    let key = (self.conn, u.consumer_id);
                    let cmd = Cmd::Unsubscribe {
                        key,
                        request_id: u.request_id,
                        out: out.clone(),
                        force: u.force.unwrap_or(false),
                    };
                    forward(t, cmd, u.request_id, &out);
                }
            }
            Ok(Type::Seek) => {
                let s = cmd.seek.ok_or_else(|| missing("SEEK"))?;
                let target = match (s.message_id, s.message_publish_time) {
                    (Some(id), _) => SeekTarget::Id(id),
                    (None, Some(t)) => SeekTarget::PublishTime(t),
                    (None, None) => {
                        reply(
                            &out,
                            error_command(
                                s.request_id,
                                pb::ServerError::MetadataError,
                                "SEEK needs a message id or a publish time",
                            ),
                        );
                        return Ok(());
                    }
                };
                if let Some(t) = self.consumer(s.consumer_id, s.request_id) {
                    let cmd = Cmd::Seek {
                        key: (self.conn, s.consumer_id),
                        request_id: s.request_id,
                        out: out.clone(),
                        target,
                    };
                    forward(t, cmd, s.request_id, &out);
                }
            }
            Ok(Type::GetLastMessageId) => {
                let g = cmd.get_last_message_id.ok_or_else(|| missing("GET_LAST_MESSAGE_ID"))?;
                if let Some(t) = self.consumer(g.consumer_id, g.request_id) {
                    let cmd = Cmd::LastMessageId {
                        key: (self.conn, g.consumer_id),
                        request_id: g.request_id,
                        out: out.clone(),
                    };
                    forward(t, cmd, g.request_id, &out);
                }
            }
            Ok(Type::ConsumerStats) => {
                let c = cmd.consumer_stats.ok_or_else(|| missing("CONSUMER_STATS"))?;
                if let Some(t) = self.consumer(c.consumer_id, c.request_id) {
                    let cmd = Cmd::ConsumerStats {
                        key: (self.conn, c.consumer_id),
                        request_id: c.request_id,
                        out: out.clone(),
                    };
                    forward(t, cmd, c.request_id, &out);
                }
            }
            Ok(Type::GetTopicsOfNamespace) => {
                let g = cmd.get_topics_of_namespace.ok_or_else(|| missing("GET_TOPICS_OF_NAMESPACE"))?;
                // Every topic is persistent: a client asking for non-persistent ones gets none
                // (not persistent ones it would then subscribe to as such).
                use pb::command_get_topics_of_namespace::Mode;
                let non_persistent = g.mode == Some(Mode::NonPersistent as i32);
                let listed = match non_persistent {
                    true => Ok(Vec::new()),
                    false => self.shared.topics.list_namespace(&g.namespace).await,
                };
                let r = match listed {
                    Ok(topics) => pb::BaseCommand {
                        get_topics_of_namespace_response: Some(Box::new(pb::CommandGetTopicsOfNamespaceResponse {
                            request_id: g.request_id,
                            topics,
                            filtered: Some(false),
                            ..Default::default()
                        })),
                        ..base(Type::GetTopicsOfNamespaceResponse)
                    },
                    Err(e) => error_command(g.request_id, e.server_error(), e.to_string()),
                };
                reply(&out, r);
            }
            Ok(Type::GetSchema) => {
                let g = cmd.get_schema.ok_or_else(|| missing("GET_SCHEMA"))?;
                // Answered from a task: the metastore may be slow, and the connection goes on.
                let topics = self.shared.topics.clone();
                tokio::spawn(async move {
                    let found = match (TopicName::parse(&g.topic), g.schema_version.as_deref()) {
                        (Err(e), _) => Err((pb::ServerError::InvalidTopicName, e.to_string())),
                        (Ok(n), None) => schema::get(topics.meta(), &n, None).await,
                        (Ok(n), Some(v)) => match schema::version_number(v) {
                            Some(v) => schema::get(topics.meta(), &n, Some(v)).await,
                            None => Err((pb::ServerError::InvalidTopicName, "a schema version is 8 bytes".into())),
                        },
                    };
                    let mut answer = pb::CommandGetSchemaResponse { request_id: g.request_id, ..Default::default() };
                    match found {
                        Ok(Some((v, s))) => {
                            answer.schema = Some(s.to_wire(&g.topic));
                            answer.schema_version = Some(schema::version_bytes(v));
                        }
                        // Pulsar's answer for a topic without (that version of) a schema.
                        Ok(None) => {
                            answer.error_code = Some(pb::ServerError::TopicNotFound as i32);
                            answer.error_message = Some(format!("no schema for {}", g.topic));
                        }
                        Err((code, why)) => {
                            answer.error_code = Some(code as i32);
                            answer.error_message = Some(why);
                        }
                    }
                    let cmd = pb::BaseCommand {
                        get_schema_response: Some(Box::new(answer)),
                        ..base(Type::GetSchemaResponse)
                    };
                    reply(&out, cmd);
                });
            }
            Ok(Type::GetOrCreateSchema) => {
                let g = cmd.get_or_create_schema.ok_or_else(|| missing("GET_OR_CREATE_SCHEMA"))?;
                let topics = self.shared.topics.clone();
                tokio::spawn(async move {
                    let registered = async {
                        let n = TopicName::parse(&g.topic)
                            .map_err(|e| (pb::ServerError::InvalidTopicName, e.to_string()))?;
                        // Only for a topic that exists: `get_or_create` stores a new version
                        // only while the topic's record does (`TopicNotFound` otherwise). Raw
                        // bytes have no version and are not registered.
                        match schema::is_checked(&g.schema) {
                            true => schema::get_or_create(topics.meta(), &n, &g.schema).await.map(Some),
                            false => Ok(None),
                        }
                    };
                    let mut answer =
                        pb::CommandGetOrCreateSchemaResponse { request_id: g.request_id, ..Default::default() };
                    match registered.await {
                        Ok(v) => answer.schema_version = v.map(schema::version_bytes),
                        Err((code, why)) => {
                            answer.error_code = Some(code as i32);
                            answer.error_message = Some(why);
                        }
                    }
                    let cmd = pb::BaseCommand {
                        get_or_create_schema_response: Some(Box::new(answer)),
                        ..base(Type::GetOrCreateSchemaResponse)
                    };
                    reply(&out, cmd);
                });
            }
            other => {
                tracing::debug!(command = ?other, "command not supported");
                reply(
                    &out,
                    error_command(
                        request_id_of(&cmd),
                        pb::ServerError::NotAllowedError,
                        format!("{other:?} is not supported"),
                    ),
                );
            }
        }
        Ok(())
    }

    async fn add_producer(&mut self, p: pb::CommandProducer, schema_version: Option<u64>) {
        let out = self.out.clone();
        if self
            .producers
            .get(&p.producer_id)
            .is_some_and(|x| x.topic.is_closed() || x.state.closed.load(Ordering::Acquire))
        {
            // Its topic stopped and told the client to reconnect the producer.
            self.producers.remove(&p.producer_id);
        }
        if let Some(x) = self.producers.get(&p.producer_id) {
            // A retry of a PRODUCER this connection served, or is serving.
            let answer = match x.state.name.get() {
                Some(name) => {
                    let epoch = Some(x.state.topic_epoch.load(Ordering::Acquire)).filter(|e| *e > 0);
                    let ready = x.state.ready.load(Ordering::Acquire);
                    let version = x.state.schema_version.get().copied();
                    producer_success(p.request_id, name.clone(), -1, epoch, ready, version)
                }
                None => error_command(
                    p.request_id,
                    pb::ServerError::ServiceNotReady,
                    format!("producer {} is already being created on this connection", p.producer_id),
                ),
            };
            return reply(&out, answer);
        }
        let Some(topic) = self.topic(p.request_id, &p.topic).await else { return };
        let state = Arc::new(ProducerState::default());
        if let Some(v) = schema_version {
            let _ = state.schema_version.set(v);
        }
        let access = pb::ProducerAccessMode::try_from(p.producer_access_mode.unwrap_or(0))
            .unwrap_or(pb::ProducerAccessMode::Shared);
        let (done, answer) = oneshot::channel();
        let request = ProducerRequest {
            conn: self.conn,
            producer_id: p.producer_id,
            request_id: p.request_id,
            name: p.producer_name.clone(),
            out: out.clone(),
            live: self.live.clone(),
            checked: false,
            access,
            topic_epoch: p.topic_epoch,
            state: state.clone(),
            done,
        };
        if let Err(e) = topic.send(Cmd::AddProducer(Box::new(request))) {
            return reply(&out, error_command(p.request_id, e.server_error(), e.to_string()));
        }
        // The topic answers PRODUCER_SUCCESS itself, in order with anything else it tells about
        // this producer, and sets its name first: the client sends nothing for it before that
        // answer. Meanwhile (the holder of its name may be checked for seconds) this connection
        // serves its other producers and consumers; a refusal is answered here.
        let (refused, request_id, producer_id) = (state.clone(), p.request_id, p.producer_id);
        let (out2, forget) = (out.clone(), self.refused.clone());
        tokio::spawn(async move {
            let (code, message) = match answer.await {
                Ok(Ok(_)) => return,
                Ok(Err(e)) => e,
                Err(_) => (pb::ServerError::ServiceNotReady, "the topic is not available".to_owned()),
            };
            refused.closed.store(true, Ordering::Release);
            reply(&out2, error_command(request_id, code, message));
            let _ = forget.send((producer_id, refused));
        });
        let (queue, mut rx) = mpsc::unbounded_channel::<PendingSend>();
        let (out2, producer_id) = (out.clone(), p.producer_id);
        tokio::spawn(async move {
            while let Some(pending) = rx.recv().await {
                let (sequence_id, highest, fut, _in_flight) = match pending {
                    PendingSend::Send(sequence_id, highest, fut, in_flight) => (sequence_id, highest, fut, in_flight),
                    PendingSend::Close(request_id) => {
                        let _ = out2.send(Out::Cmd(success(request_id)));
                        return;
                    }
                };
                let r = match fut.await {
                    // The producer is told to reconnect, and resends.
                    Err(e) if e.is_closing() => continue,
                    Ok(pos) => pb::BaseCommand {
                        send_receipt: Some(Box::new(pb::CommandSendReceipt {
                            producer_id,
                            sequence_id,
                            message_id: Some(pb::MessageIdData {
                                ledger_id: pos.ledger_id,
                                entry_id: pos.entry_id as u64,
                                ..Default::default()
                            }),
                            highest_sequence_id: Some(highest),
                        })),
                        ..base(Type::SendReceipt)
                    },
                    Err(e) => pb::BaseCommand {
                        send_error: Some(Box::new(pb::CommandSendError {
                            producer_id,
                            sequence_id,
                            error: e.code as i32,
                            message: e.message,
                        })),
                        ..base(Type::SendError)
                    },
                };
                if out2.send(Out::Cmd(r)).is_err() {
                    return;
                }
            }
        });
        self.producers.insert(p.producer_id, Producer { topic, queue, state });
    }

    async fn subscribe(&mut self, s: pb::CommandSubscribe) {
        use pb::command_subscribe::{InitialPosition, SubType};
        let out = self.out.clone();
        let create = s.force_topic_creation.unwrap_or(true);
        let Some(topic) = self.topic_if(s.request_id, &s.topic, create).await else { return };
        if let Some(old) = self.consumers.get(&s.consumer_id).filter(|old| old.name != topic.name) {
            // The id is reused for another topic: leave the old one.
            let _ = old.send(Cmd::CloseConsumer { key: (self.conn, s.consumer_id) });
        }
        let sub_type = SubType::try_from(s.sub_type).unwrap_or(SubType::Exclusive);
        let ranges = s
            .key_shared_meta
            .as_ref()
            .filter(|m| m.key_shared_mode == pb::KeySharedMode::Sticky as i32)
            .map(|m| m.hash_ranges.iter().map(|r| (r.start.max(0) as u32, r.end.max(0) as u32)).collect())
            .unwrap_or_default();
        let properties: BTreeMap<String, String> =
            s.subscription_properties.iter().map(|kv| (kv.key.clone(), kv.value.clone())).collect();
        let spec = ConsumerSpec {
            conn: self.conn,
            consumer_id: s.consumer_id,
            request_id: s.request_id,
            subscription: s.subscription.clone(),
            sub_type,
            name: s
                .consumer_name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| format!("consumer-{}-{}", self.conn, s.consumer_id)),
            priority: s.priority_level.unwrap_or(0),
            durable: s.durable.unwrap_or(true),
            earliest: s.initial_position == Some(InitialPosition::Earliest as i32),
            start: s.start_message_id,
            rollback_secs: s.start_message_rollback_duration_sec.unwrap_or(0),
            ranges,
            properties,
            protocol_version: self.session_version,
            epoch: s.consumer_epoch,
            out: out.clone(),
            live: self.live.clone(),
            checked: false,
        };
        if topic.send(Cmd::Subscribe(Box::new(spec))).is_err() {
            reply(&out, error_command(s.request_id, pb::ServerError::ServiceNotReady, "topic is not available"));
            return;
        }
        self.consumers.insert(s.consumer_id, topic);
    }
}

/// The request id of a command that expects an answer (0 when it carries none).
fn request_id_of(cmd: &pb::BaseCommand) -> u64 {
    // Clients match the ERROR to their pending request by this id; with 0 they would wait out
    // their operation timeout instead of failing at once.
    let ids = [
        cmd.get_or_create_schema.as_ref().map(|c| c.request_id),
        cmd.new_txn.as_ref().map(|c| c.request_id),
        cmd.add_partition_to_txn.as_ref().map(|c| c.request_id),
        cmd.add_subscription_to_txn.as_ref().map(|c| c.request_id),
        cmd.end_txn.as_ref().map(|c| c.request_id),
        cmd.end_txn_on_partition.as_ref().map(|c| c.request_id),
        cmd.end_txn_on_subscription.as_ref().map(|c| c.request_id),
        cmd.tc_client_connect_request.as_ref().map(|c| c.request_id),
        cmd.watch_topic_list.as_ref().map(|c| c.request_id),
        cmd.watch_topic_list_close.as_ref().map(|c| c.request_id),
    ];
    ids.into_iter().flatten().next().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_requests_are_refused_with_their_own_request_id() {
        let tc = pb::BaseCommand {
            tc_client_connect_request: Some(Box::new(pb::CommandTcClientConnectRequest { request_id: 42, tc_id: 0 })),
            ..base(Type::TcClientConnectRequest)
        };
        assert_eq!(request_id_of(&tc), 42);
        let close = pb::BaseCommand {
            watch_topic_list_close: Some(Box::new(pb::CommandWatchTopicListClose { request_id: 7, watcher_id: 1 })),
            ..base(Type::WatchTopicListClose)
        };
        assert_eq!(request_id_of(&close), 7);
        assert_eq!(request_id_of(&base(Type::Ping)), 0);
    }
}
