//! A small Pulsar-protocol client over one connection, for Magnetar's own tools
//! (`magnetar perf produce|consume`) and tests. It speaks the same frames as the official
//! clients: CONNECT, PRODUCER/SEND (single messages and batches), SUBSCRIBE/FLOW/ACK.
//! Applications should use an official Pulsar client.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::protocol::codec::{
    base, encode_batch_item, encode_entry, Payload, DEFAULT_MAX_MESSAGE_SIZE, FRAME_HEADROOM,
};
use crate::protocol::connection::{ConnError, FrameReader, FrameWriter};
use crate::protocol::pb;
use pb::base_command::Type;

/// A client failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection failed or closed.
    #[error("connection: {0}")]
    Conn(#[from] ConnError),
    /// The broker answered with an error.
    #[error("broker error {code:?}: {message}")]
    Server {
        /// Code.
        code: pb::ServerError,
        /// Message.
        message: String,
    },
    /// The connection closed before the answer.
    #[error("the connection closed")]
    Closed,
}

enum Frame {
    Cmd(pb::BaseCommand),
    Send(pb::BaseCommand, Bytes),
}

#[derive(Default)]
struct Routes {
    requests: HashMap<u64, oneshot::Sender<pb::BaseCommand>>,
    producers: HashMap<u64, mpsc::UnboundedSender<Receipt>>,
    consumers: HashMap<u64, mpsc::UnboundedSender<Message>>,
    ended: HashMap<u64, Arc<std::sync::atomic::AtomicBool>>,
}

/// The answer to one SEND: its sequence id and message id (or the error).
pub type Receipt = (u64, Result<pb::MessageIdData, ClientError>);

/// A received message (a whole entry: a batch arrives as one).
#[derive(Debug)]
pub struct Message {
    /// The MESSAGE command.
    pub command: pb::CommandMessage,
    /// Metadata and payload.
    pub payload: Payload,
}

/// One connection to a broker.
#[derive(Clone)]
pub struct Client {
    out: mpsc::UnboundedSender<Frame>,
    routes: Arc<Mutex<Routes>>,
    next: Arc<AtomicU64>,
}

fn lock(r: &Mutex<Routes>) -> std::sync::MutexGuard<'_, Routes> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

fn request_id(cmd: &pb::BaseCommand) -> Option<u64> {
    cmd.success
        .as_ref()
        .map(|c| c.request_id)
        .or(cmd.error.as_ref().map(|c| c.request_id))
        .or(cmd.producer_success.as_ref().map(|c| c.request_id))
        .or(cmd.lookup_topic_response.as_ref().map(|c| c.request_id))
        .or(cmd.partition_metadata_response.as_ref().map(|c| c.request_id))
        .or(cmd.get_last_message_id_response.as_ref().map(|c| c.request_id))
}

impl Client {
    /// Connects and completes the handshake.
    pub async fn connect(addr: &str) -> Result<Client, ClientError> {
        let stream = TcpStream::connect(addr).await.map_err(|e| ClientError::Conn(e.into()))?;
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        let mut reader = FrameReader::new(r, DEFAULT_MAX_MESSAGE_SIZE + FRAME_HEADROOM);
        let mut writer = FrameWriter::new(w);
        let connect = pb::BaseCommand {
            connect: Some(Box::new(pb::CommandConnect {
                client_version: concat!("magnetar-tools-", env!("CARGO_PKG_VERSION")).into(),
                protocol_version: Some(20),
                ..Default::default()
            })),
            ..base(Type::Connect)
        };
        writer.send(&connect).await?;
        match reader.next().await? {
            Some(f) if f.command.r#type == Type::Connected as i32 => {}
            Some(f) => {
                let e = f.command.error.unwrap_or_default();
                return Err(ClientError::Server {
                    code: pb::ServerError::try_from(e.error).unwrap_or(pb::ServerError::UnknownError),
                    message: e.message,
                });
            }
            None => return Err(ClientError::Closed),
        }
        let (out, mut out_rx) = mpsc::unbounded_channel::<Frame>();
        tokio::spawn(async move {
            while let Some(first) = out_rx.recv().await {
                let mut next = Some(first);
                while let Some(f) = next {
                    match &f {
                        Frame::Cmd(c) => writer.queue(c),
                        Frame::Send(c, entry) => writer.queue_with_entry(c, entry, None),
                    }
                    if writer.buffered() >= 256 * 1024 && writer.flush().await.is_err() {
                        return;
                    }
                    next = out_rx.try_recv().ok();
                }
                if writer.flush().await.is_err() {
                    return;
                }
            }
        });
        let routes = Arc::new(Mutex::new(Routes::default()));
        let (routes2, out2) = (routes.clone(), out.clone());
        tokio::spawn(async move {
            while let Ok(Some(f)) = reader.next().await {
                let cmd = f.command;
                match Type::try_from(cmd.r#type) {
                    Ok(Type::Ping) => {
                        let _ = out2.send(Frame::Cmd(base(Type::Pong)));
                    }
                    Ok(Type::SendReceipt) => {
                        let r = cmd.send_receipt.unwrap_or_default();
                        if let Some(tx) = lock(&routes2).producers.get(&r.producer_id) {
                            let _ = tx.send((r.sequence_id, Ok(r.message_id.unwrap_or_default())));
                        }
                    }
                    Ok(Type::SendError) => {
                        let r = cmd.send_error.unwrap_or_default();
                        let code = pb::ServerError::try_from(r.error).unwrap_or(pb::ServerError::UnknownError);
                        if let Some(tx) = lock(&routes2).producers.get(&r.producer_id) {
                            let _ = tx.send((r.sequence_id, Err(ClientError::Server { code, message: r.message })));
                        }
                    }
                    Ok(Type::ReachedEndOfTopic) => {
                        let id = cmd.reached_end_of_topic.map(|r| r.consumer_id).unwrap_or(u64::MAX);
                        if let Some(flag) = lock(&routes2).ended.get(&id) {
                            flag.store(true, Ordering::Release);
                        }
                    }
                    Ok(Type::Message) => {
                        let (Some(m), Some(payload)) = (cmd.message, f.payload) else { continue };
                        if let Some(tx) = lock(&routes2).consumers.get(&m.consumer_id) {
                            let _ = tx.send(Message { command: *m, payload });
                        }
                    }
                    _ => {
                        if let Some(id) = request_id(&cmd) {
                            if let Some(tx) = lock(&routes2).requests.remove(&id) {
                                let _ = tx.send(cmd);
                            }
                        }
                    }
                }
            }
            // Closed: wake everyone waiting.
            let mut r = lock(&routes2);
            r.requests.clear();
            r.producers.clear();
            r.consumers.clear();
        });
        Ok(Client { out, routes, next: Arc::new(AtomicU64::new(1)) })
    }

    /// Connects to the broker that serves `topic`, starting from `addr` and following
    /// lookups (to the owner, or to the broker assigned a free bundle) as Pulsar clients do.
    pub async fn connect_for(addr: &str, topic: &str) -> Result<Client, ClientError> {
        use pb::command_lookup_topic_response::LookupType;
        let (mut at, mut client, mut authoritative) = (addr.to_owned(), Client::connect(addr).await?, false);
        for _ in 0..5 {
            let id = client.id();
            let cmd = pb::BaseCommand {
                lookup_topic: Some(Box::new(pb::CommandLookupTopic {
                    topic: topic.into(),
                    request_id: id,
                    authoritative: Some(authoritative),
                    ..Default::default()
                })),
                ..base(Type::Lookup)
            };
            let r = client.request(id, cmd).await?.lookup_topic_response.unwrap_or_default();
            let url = r.broker_service_url.unwrap_or_default();
            let target = url.trim_start_matches("pulsar://").trim_end_matches('/').to_owned();
            match LookupType::try_from(r.response.unwrap_or_default()) {
                Ok(LookupType::Failed) | Err(_) => {
                    return Err(ClientError::Server {
                        code: pb::ServerError::try_from(r.error.unwrap_or_default())
                            .unwrap_or(pb::ServerError::UnknownError),
                        message: r.message.unwrap_or_default(),
                    });
                }
                Ok(LookupType::Connect) if target == at || target.is_empty() => return Ok(client),
                Ok(LookupType::Connect) => return Client::connect(&target).await,
                Ok(LookupType::Redirect) => {
                    client = Client::connect(&target).await?;
                    (at, authoritative) = (target, true);
                }
            }
        }
        Err(ClientError::Server {
            code: pb::ServerError::ServiceNotReady,
            message: format!("lookup of {topic} kept redirecting"),
        })
    }

    fn id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    async fn request(&self, id: u64, cmd: pb::BaseCommand) -> Result<pb::BaseCommand, ClientError> {
        let (tx, rx) = oneshot::channel();
        lock(&self.routes).requests.insert(id, tx);
        self.out.send(Frame::Cmd(cmd)).map_err(|_| ClientError::Closed)?;
        let reply = rx.await.map_err(|_| ClientError::Closed)?;
        if let Some(e) = reply.error {
            return Err(ClientError::Server {
                code: pb::ServerError::try_from(e.error).unwrap_or(pb::ServerError::UnknownError),
                message: e.message,
            });
        }
        Ok(reply)
    }

    /// The partition count of a topic (0: not partitioned).
    pub async fn partitions(&self, topic: &str) -> Result<u32, ClientError> {
        let id = self.id();
        let cmd = pb::BaseCommand {
            partition_metadata: Some(Box::new(pb::CommandPartitionedTopicMetadata {
                topic: topic.into(),
                request_id: id,
                ..Default::default()
            })),
            ..base(Type::PartitionedMetadata)
        };
        let r = self.request(id, cmd).await?;
        Ok(r.partition_metadata_response.and_then(|p| p.partitions).unwrap_or(0))
    }

    /// Creates a producer on `topic`.
    pub async fn producer(&self, topic: &str) -> Result<Producer, ClientError> {
        self.producer_named(topic, None).await
    }

    /// Creates a producer on `topic` under the name `name` (None: the broker picks one).
    pub async fn producer_named(&self, topic: &str, name: Option<&str>) -> Result<Producer, ClientError> {
        let (producer_id, request_id) = (self.id(), self.id());
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.routes).producers.insert(producer_id, tx);
        let cmd = pb::BaseCommand {
            producer: Some(Box::new(pb::CommandProducer {
                topic: topic.into(),
                producer_id,
                request_id,
                producer_name: name.map(str::to_owned),
                ..Default::default()
            })),
            ..base(Type::Producer)
        };
        let r = self.request(request_id, cmd).await?;
        let name = r.producer_success.map(|p| p.producer_name).unwrap_or_default();
        Ok(Producer { out: self.out.clone(), producer_id, name, next_seq: 0, receipts: rx })
    }

    /// Subscribes to `topic`.
    pub async fn subscribe(
        &self,
        topic: &str,
        subscription: &str,
        sub_type: pb::command_subscribe::SubType,
        earliest: bool,
    ) -> Result<Consumer, ClientError> {
        self.subscribe_with(topic, subscription, sub_type, earliest, true).await
    }

    /// [`Client::subscribe`]; with `create` false, a topic that does not exist is not created
    /// (the broker answers `TopicNotFound`), as pattern consumers ask.
    pub async fn subscribe_with(
        &self,
        topic: &str,
        subscription: &str,
        sub_type: pb::command_subscribe::SubType,
        earliest: bool,
        create: bool,
    ) -> Result<Consumer, ClientError> {
        let cmd = pb::CommandSubscribe { force_topic_creation: Some(create), ..Default::default() };
        self.subscribe_cmd(topic, subscription, sub_type, earliest, cmd).await
    }

    /// A reader (a non-durable subscription) starting at the first message published
    /// `rollback_secs` seconds ago or later.
    pub async fn reader_from_rollback(&self, topic: &str, rollback_secs: u64) -> Result<Consumer, ClientError> {
        let cmd = pb::CommandSubscribe {
            durable: Some(false),
            start_message_rollback_duration_sec: Some(rollback_secs),
            ..Default::default()
        };
        let sub = format!("reader-{}", self.id());
        self.subscribe_cmd(topic, &sub, pb::command_subscribe::SubType::Exclusive, false, cmd).await
    }

    async fn subscribe_cmd(
        &self,
        topic: &str,
        subscription: &str,
        sub_type: pb::command_subscribe::SubType,
        earliest: bool,
        fields: pb::CommandSubscribe,
    ) -> Result<Consumer, ClientError> {
        let (consumer_id, request_id) = (self.id(), self.id());
        let (tx, rx) = mpsc::unbounded_channel();
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let mut r = lock(&self.routes);
            r.consumers.insert(consumer_id, tx);
            r.ended.insert(consumer_id, ended.clone());
        }
        let initial = if earliest {
            pb::command_subscribe::InitialPosition::Earliest
        } else {
            pb::command_subscribe::InitialPosition::Latest
        };
        let cmd = pb::BaseCommand {
            subscribe: Some(Box::new(pb::CommandSubscribe {
                topic: topic.into(),
                subscription: subscription.into(),
                sub_type: sub_type as i32,
                consumer_id,
                request_id,
                initial_position: Some(initial as i32),
                ..fields
            })),
            ..base(Type::Subscribe)
        };
        self.request(request_id, cmd).await?;
        Ok(Consumer { out: self.out.clone(), consumer_id, messages: rx, ended })
    }

    /// Removes `consumer`'s subscription (and its backlog) from the topic.
    pub async fn unsubscribe(&self, consumer: &Consumer) -> Result<(), ClientError> {
        let request_id = self.id();
        let cmd = pb::BaseCommand {
            unsubscribe: Some(Box::new(pb::CommandUnsubscribe {
                consumer_id: consumer.consumer_id,
                request_id,
                ..Default::default()
            })),
            ..base(Type::Unsubscribe)
        };
        self.request(request_id, cmd).await.map(|_| ())
    }

    /// Moves `consumer`'s subscription to the message `id` (the broker then closes the
    /// consumer, as clients resubscribe from the new position).
    pub async fn seek(&self, consumer: &Consumer, id: pb::MessageIdData) -> Result<(), ClientError> {
        let request_id = self.id();
        let cmd = pb::BaseCommand {
            seek: Some(Box::new(pb::CommandSeek {
                consumer_id: consumer.consumer_id,
                request_id,
                message_id: Some(id),
                ..Default::default()
            })),
            ..base(Type::Seek)
        };
        self.request(request_id, cmd).await.map(|_| ())
    }

    /// The topic's last message id, as seen by `consumer`.
    pub async fn last_message_id(&self, consumer: &Consumer) -> Result<pb::MessageIdData, ClientError> {
        let request_id = self.id();
        let cmd = pb::BaseCommand {
            get_last_message_id: Some(Box::new(pb::CommandGetLastMessageId {
                consumer_id: consumer.consumer_id,
                request_id,
            })),
            ..base(Type::GetLastMessageId)
        };
        let r = self.request(request_id, cmd).await?;
        Ok(r.get_last_message_id_response.map(|r| r.last_message_id).unwrap_or_default())
    }

    /// Closes `producer`; the broker answers once every send before the close is answered, so
    /// its receipts are all in [`Producer::receipt`]'s queue when this returns.
    pub async fn close_producer(&self, producer: &Producer) -> Result<(), ClientError> {
        let request_id = self.id();
        let cmd = pb::BaseCommand {
            close_producer: Some(Box::new(pb::CommandCloseProducer {
                producer_id: producer.producer_id,
                request_id,
                ..Default::default()
            })),
            ..base(Type::CloseProducer)
        };
        self.request(request_id, cmd).await.map(|_| ())
    }
}

/// A producer.
pub struct Producer {
    out: mpsc::UnboundedSender<Frame>,
    producer_id: u64,
    name: String,
    next_seq: u64,
    receipts: mpsc::UnboundedReceiver<Receipt>,
}

impl Producer {
    /// Sends one message; returns its sequence id (the receipt comes through
    /// [`Producer::receipt`]).
    pub fn send(&mut self, payload: &[u8], publish_time: u64) -> Result<u64, ClientError> {
        let md = pb::MessageMetadata {
            producer_name: self.name.clone(),
            sequence_id: self.next_seq,
            publish_time,
            ..Default::default()
        };
        self.send_entry(encode_entry(&md, payload), 1)
    }

    /// Sends messages as one batch (one entry); returns the batch's sequence id.
    pub fn send_batch(&mut self, payloads: &[Bytes], publish_time: u64) -> Result<u64, ClientError> {
        let mut data = BytesMut::new();
        for p in payloads {
            let single = pb::SingleMessageMetadata { payload_size: p.len() as i32, ..Default::default() };
            encode_batch_item(&single, p, &mut data);
        }
        let md = pb::MessageMetadata {
            producer_name: self.name.clone(),
            sequence_id: self.next_seq,
            publish_time,
            num_messages_in_batch: Some(payloads.len() as i32),
            ..Default::default()
        };
        self.send_entry(encode_entry(&md, &data), payloads.len() as u64)
    }

    fn send_entry(&mut self, entry: Bytes, n: u64) -> Result<u64, ClientError> {
        let seq = self.next_seq;
        self.next_seq += n;
        let cmd = pb::BaseCommand {
            send: Some(Box::new(pb::CommandSend {
                producer_id: self.producer_id,
                sequence_id: seq,
                num_messages: Some(n as i32),
                highest_sequence_id: Some(seq + n - 1),
                ..Default::default()
            })),
            ..base(Type::Send)
        };
        self.out.send(Frame::Send(cmd, entry)).map_err(|_| ClientError::Closed)?;
        Ok(seq)
    }

    /// The next receipt, in send order; `None` once the connection closed.
    pub async fn receipt(&mut self) -> Option<Receipt> {
        self.receipts.recv().await
    }

    /// A receipt already received, if any.
    pub fn try_receipt(&mut self) -> Option<Receipt> {
        self.receipts.try_recv().ok()
    }
}

/// A consumer.
pub struct Consumer {
    out: mpsc::UnboundedSender<Frame>,
    consumer_id: u64,
    messages: mpsc::UnboundedReceiver<Message>,
    ended: Arc<std::sync::atomic::AtomicBool>,
}

impl Consumer {
    /// Grants `n` more messages.
    pub fn flow(&self, n: u32) -> Result<(), ClientError> {
        let cmd = pb::BaseCommand {
            flow: Some(Box::new(pb::CommandFlow { consumer_id: self.consumer_id, message_permits: n })),
            ..base(Type::Flow)
        };
        self.out.send(Frame::Cmd(cmd)).map_err(|_| ClientError::Closed)
    }

    /// Whether the broker said the (terminated) topic has nothing more for this consumer.
    pub fn reached_end_of_topic(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// The next message; `None` once the connection closed.
    pub async fn next(&mut self) -> Option<Message> {
        self.messages.recv().await
    }

    /// Acknowledges entries individually.
    pub fn ack(&self, ids: Vec<pb::MessageIdData>) -> Result<(), ClientError> {
        let cmd = pb::BaseCommand {
            ack: Some(Box::new(pb::CommandAck {
                consumer_id: self.consumer_id,
                ack_type: pb::command_ack::AckType::Individual as i32,
                message_id: ids,
                ..Default::default()
            })),
            ..base(Type::Ack)
        };
        self.out.send(Frame::Cmd(cmd)).map_err(|_| ClientError::Closed)
    }

    /// Asks for these messages (a nack), or with none every unacknowledged one, to be
    /// delivered again; `epoch` is the consumer's new epoch, which messages sent from then on
    /// carry.
    pub fn redeliver(&self, ids: Vec<pb::MessageIdData>, epoch: Option<u64>) -> Result<(), ClientError> {
        let cmd = pb::BaseCommand {
            redeliver_unacknowledged_messages: Some(Box::new(pb::CommandRedeliverUnacknowledgedMessages {
                consumer_id: self.consumer_id,
                message_ids: ids,
                consumer_epoch: epoch,
            })),
            ..base(Type::RedeliverUnacknowledgedMessages)
        };
        self.out.send(Frame::Cmd(cmd)).map_err(|_| ClientError::Closed)
    }
}
