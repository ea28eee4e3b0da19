//! Magnetar broker: the Pulsar binary protocol server, managed ledgers, topics and
//! subscriptions.
//!
//! - [`protocol`]: the pure frame codec, the handshake and topic names.
//! - [`server`]: accepts connections and serves producers, consumers, lookups and the other
//!   commands clients use.
//! - [`topic`]: one task per topic owning its managed ledger (replicated ledgers listed in
//!   the metastore, rollover, tail cache, catch-up reads), producers, and subscriptions with
//!   cursors persisted in the metastore and Exclusive/Shared/Failover/Key_Shared dispatch.
//! - [`bootstrap`]: the metadata a standalone cluster starts with.

pub mod admin;
pub mod bootstrap;
pub mod client;
pub mod config;
pub mod protocol;
pub mod server;
pub mod topic;

pub use config::BrokerConfig;
pub use server::Broker;
