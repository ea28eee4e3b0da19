//! Magnetar broker: the Pulsar binary protocol server, managed ledgers, topics and
//! subscriptions.
//!
//! - [`protocol`]: the pure frame codec, the handshake and topic names.
//! - [`server`]: accepts connections and serves producers, consumers, lookups and the other
//!   commands clients use.
//! - [`topic`]: one task per topic owning its managed ledger (replicated ledgers listed in
//!   the metastore, rollover, tail cache, catch-up reads), producers, and subscriptions with
//!   cursors persisted in the metastore and Exclusive/Shared/Failover/Key_Shared dispatch.
//! - [`ownership`]: which broker serves which namespace bundle (ephemeral leases in the
//!   metastore), lookups and redirects.
//! - [`admin`]: the HTTP admin API, `/metrics`; [`http`]: the small client brokers and tools
//!   use to call it.
//! - [`bootstrap`]: the metadata a standalone cluster starts with.

pub mod admin;
pub mod bootstrap;
pub mod client;
pub mod config;
pub mod http;
pub mod ownership;
pub mod protocol;
pub mod server;
pub mod topic;

pub use config::BrokerConfig;
pub use server::Broker;
