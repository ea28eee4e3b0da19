//! Magnetar's metadata store: a Raft-replicated (openraft), RocksDB-backed, versioned key-value
//! service with watches, sessions with ephemeral keys and id allocation, plus the client library
//! brokers and bookies use ([`client`]).
//!
//! See `docs/metastore.md` for the data model, the durability rules and the API.

pub mod client;
pub mod config;
pub mod error;
pub mod local_cluster;
pub mod network;
pub mod server;
pub mod store;
pub mod types;

pub use config::MetastoreConfig;
pub use error::{ErrorCode, MetaError};
pub use server::{run, MetastoreNode};
