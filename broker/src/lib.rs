//! Magnetar broker: the Pulsar binary protocol server, managed ledgers, topics and
//! subscriptions.
//!
//! Built so far: the protocol codec and handshake ([`protocol`]), and a server ([`server`])
//! that serves lookups and producers, storing every client batch as one entry of the topic's
//! replicated ledger ([`topic`]). Consumers, subscriptions, ledger rollover and topic
//! recovery across restarts are not built yet.

pub mod config;
pub mod protocol;
pub mod server;
pub mod topic;

pub use config::BrokerConfig;
pub use server::Broker;
