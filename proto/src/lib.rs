//! Generated wire types. The `.proto` sources live in `proto/proto/`; `build.rs` compiles them
//! into `OUT_DIR`. Conversions to domain types live in the crates that own those types.

/// The metastore's client API and Raft transport.
pub mod metastore {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("magnetar.metastore.v1");
}

/// The bookie's storage API (adds, reads, fencing).
pub mod bookie {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("magnetar.bookie.v1");
}

/// The Pulsar binary protocol messages (Magnetar's own definition, same field numbers).
pub mod pulsar {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("pulsar.proto");
}
