//! Compiles the `.proto` files into `OUT_DIR` with a vendored `protoc`, so building Magnetar
//! needs no system protobuf compiler.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through this variable; a build script is single-threaded.
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto");
    let mut builder = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Entry payloads move between sockets, the journal and caches without copies.
        .bytes(".magnetar.bookie.v1");
    // BaseCommand has one optional field per command type. Held inline they made it about
    // 5 KB, copied whole on every move, channel send and default: a fifth of the broker's CPU
    // for small messages went to memcpy. Boxed, it is a few hundred bytes.
    for field in BASE_COMMAND_FIELDS {
        builder = builder.boxed(format!(".pulsar.proto.BaseCommand.{field}"));
    }
    builder.compile_protos(&["proto/metastore.proto", "proto/bookie.proto", "proto/pulsar_api.proto"], &["proto"])?;
    Ok(())
}

/// The command fields of `BaseCommand` (every field but `type`).
const BASE_COMMAND_FIELDS: &[&str] = &[
    "connect",
    "connected",
    "subscribe",
    "producer",
    "send",
    "send_receipt",
    "send_error",
    "message",
    "ack",
    "flow",
    "unsubscribe",
    "success",
    "error",
    "close_producer",
    "close_consumer",
    "producer_success",
    "ping",
    "pong",
    "redeliverUnacknowledgedMessages",
    "partitionMetadata",
    "partitionMetadataResponse",
    "lookupTopic",
    "lookupTopicResponse",
    "consumerStats",
    "consumerStatsResponse",
    "reachedEndOfTopic",
    "seek",
    "getLastMessageId",
    "getLastMessageIdResponse",
    "active_consumer_change",
    "getTopicsOfNamespace",
    "getTopicsOfNamespaceResponse",
    "getSchema",
    "getSchemaResponse",
    "authChallenge",
    "authResponse",
    "ackResponse",
    "getOrCreateSchema",
    "getOrCreateSchemaResponse",
    "newTxn",
    "newTxnResponse",
    "addPartitionToTxn",
    "addPartitionToTxnResponse",
    "addSubscriptionToTxn",
    "addSubscriptionToTxnResponse",
    "endTxn",
    "endTxnResponse",
    "endTxnOnPartition",
    "endTxnOnPartitionResponse",
    "endTxnOnSubscription",
    "endTxnOnSubscriptionResponse",
    "tcClientConnectRequest",
    "tcClientConnectResponse",
    "watchTopicList",
    "watchTopicListSuccess",
    "watchTopicUpdate",
    "watchTopicListClose",
    "topicMigrated",
];
