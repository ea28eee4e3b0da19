//! One client connection: handshake, then commands in order. Replies go through a writer task
//! so that slow appends never block reading. Implemented: PING/PONG, LOOKUP,
//! PARTITIONED_METADATA, PRODUCER, SEND (one client batch = one ledger entry, receipts in
//! order per producer), CLOSE_PRODUCER. Other commands are answered with an ERROR naming them.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::{max_frame, Shared};
use crate::protocol::codec::{base, CodecError};
use crate::protocol::connection::{accept, error_command, ConnError, FrameReader, FrameWriter};
use crate::protocol::names::TopicName;
use crate::protocol::pb;
use crate::topic::Topic;
use pb::base_command::Type;

/// How long a new connection may take to send CONNECT.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A send waiting for its append: sequence id, highest sequence id, the append.
type PendingSend = (u64, u64, futures::future::BoxFuture<'static, Result<i64, String>>);

struct Producer {
    topic: Arc<Topic>,
    /// Sends, in arrival order, to the task that awaits their appends and answers.
    queue: mpsc::UnboundedSender<PendingSend>,
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

    let (out, mut out_rx) = mpsc::unbounded_channel::<pb::BaseCommand>();
    let write_task = tokio::spawn(async move {
        while let Some(cmd) = out_rx.recv().await {
            writer.queue(&cmd);
            while let Ok(more) = out_rx.try_recv() {
                writer.queue(&more);
            }
            if writer.flush().await.is_err() {
                return;
            }
        }
    });

    let mut producers: HashMap<u64, Producer> = HashMap::new();
    let result = loop {
        let frame = match reader.next().await {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            Err(ConnError::Codec(CodecError::ChecksumMismatch { command, .. })) => {
                // The frame is intact but its payload is not: only that send fails.
                tracing::warn!("payload checksum mismatch");
                if let Some(s) = command.and_then(|c| c.send) {
                    let _ = out.send(pb::BaseCommand {
                        send_error: Some(pb::CommandSendError {
                            producer_id: s.producer_id,
                            sequence_id: s.sequence_id,
                            error: pb::ServerError::ChecksumError as i32,
                            message: "payload checksum mismatch".into(),
                        }),
                        ..base(Type::SendError)
                    });
                }
                continue;
            }
            Err(e) => break Err(e),
        };
        let cmd = frame.command;
        let kind = Type::try_from(cmd.r#type);
        match kind {
            Ok(Type::Ping) => {
                let _ = out.send(base(Type::Pong));
            }
            Ok(Type::Pong) => {}
            Ok(Type::Lookup) => {
                let Some(l) = cmd.lookup_topic else {
                    break Err(ConnError::Protocol("LOOKUP without its body".into()));
                };
                let reply = match TopicName::parse(&l.topic) {
                    Ok(_) => pb::CommandLookupTopicResponse {
                        broker_service_url: Some(shared.service_url.clone()),
                        response: Some(pb::command_lookup_topic_response::LookupType::Connect as i32),
                        request_id: l.request_id,
                        authoritative: Some(true),
                        ..Default::default()
                    },
                    Err(e) => pb::CommandLookupTopicResponse {
                        response: Some(pb::command_lookup_topic_response::LookupType::Failed as i32),
                        request_id: l.request_id,
                        error: Some(pb::ServerError::InvalidTopicName as i32),
                        message: Some(e.to_string()),
                        ..Default::default()
                    },
                };
                let _ = out.send(pb::BaseCommand { lookup_topic_response: Some(reply), ..base(Type::LookupResponse) });
            }
            Ok(Type::PartitionedMetadata) => {
                let Some(p) = cmd.partition_metadata else {
                    break Err(ConnError::Protocol("PARTITIONED_METADATA without its body".into()));
                };
                let reply = pb::CommandPartitionedTopicMetadataResponse {
                    partitions: Some(0),
                    request_id: p.request_id,
                    response: Some(pb::command_partitioned_topic_metadata_response::LookupType::Success as i32),
                    ..Default::default()
                };
                let _ = out.send(pb::BaseCommand {
                    partition_metadata_response: Some(reply),
                    ..base(Type::PartitionedMetadataResponse)
                });
            }
            Ok(Type::Producer) => {
                let Some(p) = cmd.producer else { break Err(ConnError::Protocol("PRODUCER without its body".into())) };
                let name = match TopicName::parse(&p.topic) {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = out.send(error_command(p.request_id, pb::ServerError::InvalidTopicName, e.to_string()));
                        continue;
                    }
                };
                let topic = match shared.topics.get_or_load(&name).await {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = out.send(error_command(p.request_id, pb::ServerError::PersistenceError, e.to_string()));
                        continue;
                    }
                };
                let producer_name = p
                    .producer_name
                    .clone()
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| format!("magnetar-{}-{}", topic.writer.id(), p.producer_id));
                let (queue, mut rx) =
                    mpsc::unbounded_channel::<(u64, u64, futures::future::BoxFuture<'static, Result<i64, String>>)>();
                let (out2, producer_id, ledger) = (out.clone(), p.producer_id, topic.writer.id());
                tokio::spawn(async move {
                    while let Some((sequence_id, highest, fut)) = rx.recv().await {
                        let reply = match fut.await {
                            Ok(entry) => pb::BaseCommand {
                                send_receipt: Some(pb::CommandSendReceipt {
                                    producer_id,
                                    sequence_id,
                                    message_id: Some(pb::MessageIdData {
                                        ledger_id: ledger,
                                        entry_id: entry as u64,
                                        ..Default::default()
                                    }),
                                    highest_sequence_id: Some(highest),
                                }),
                                ..base(Type::SendReceipt)
                            },
                            Err(message) => pb::BaseCommand {
                                send_error: Some(pb::CommandSendError {
                                    producer_id,
                                    sequence_id,
                                    error: pb::ServerError::PersistenceError as i32,
                                    message,
                                }),
                                ..base(Type::SendError)
                            },
                        };
                        if out2.send(reply).is_err() {
                            return;
                        }
                    }
                });
                producers.insert(p.producer_id, Producer { topic, queue });
                let reply = pb::CommandProducerSuccess {
                    request_id: p.request_id,
                    producer_name,
                    last_sequence_id: Some(-1),
                    ..Default::default()
                };
                let _ = out.send(pb::BaseCommand { producer_success: Some(reply), ..base(Type::ProducerSuccess) });
            }
            Ok(Type::Send) => {
                let Some(s) = cmd.send else { break Err(ConnError::Protocol("SEND without its body".into())) };
                let Some(producer) = producers.get(&s.producer_id) else {
                    tracing::debug!(producer = s.producer_id, "SEND for an unknown producer");
                    continue;
                };
                let Some(payload) = frame.payload else {
                    break Err(ConnError::Protocol("SEND without a payload".into()));
                };
                let fut = producer.topic.writer.append(payload.entry);
                let fut: futures::future::BoxFuture<'static, Result<i64, String>> =
                    Box::pin(async move { fut.await.map_err(|e| e.to_string()) });
                let highest = s.highest_sequence_id.unwrap_or(s.sequence_id);
                let _ = producer.queue.send((s.sequence_id, highest, fut));
            }
            Ok(Type::CloseProducer) => {
                let Some(c) = cmd.close_producer else {
                    break Err(ConnError::Protocol("CLOSE_PRODUCER without its body".into()));
                };
                producers.remove(&c.producer_id);
                let _ = out.send(pb::BaseCommand {
                    success: Some(pb::CommandSuccess { request_id: c.request_id, schema: None }),
                    ..base(Type::Success)
                });
            }
            other => {
                tracing::debug!(command = ?other, "command not supported yet");
                let request_id = request_id_of(&cmd);
                let _ = out.send(error_command(
                    request_id,
                    pb::ServerError::NotAllowedError,
                    format!("{other:?} is not supported yet"),
                ));
            }
        }
    };
    drop(producers);
    drop(out);
    let _ = write_task.await;
    result
}

/// The request id of a command that expects an answer (0 when it carries none).
fn request_id_of(cmd: &pb::BaseCommand) -> u64 {
    cmd.subscribe
        .as_ref()
        .map(|c| c.request_id)
        .or(cmd.unsubscribe.as_ref().map(|c| c.request_id))
        .or(cmd.close_consumer.as_ref().map(|c| c.request_id))
        .or(cmd.seek.as_ref().map(|c| c.request_id))
        .or(cmd.get_last_message_id.as_ref().map(|c| c.request_id))
        .or(cmd.consumer_stats.as_ref().map(|c| c.request_id))
        .or(cmd.get_topics_of_namespace.as_ref().map(|c| c.request_id))
        .or(cmd.get_schema.as_ref().map(|c| c.request_id))
        .or(cmd.get_or_create_schema.as_ref().map(|c| c.request_id))
        .unwrap_or(0)
}
