//! Magnetar broker: the Pulsar binary protocol server, managed ledgers, topics and
//! subscriptions. Built so far: the protocol codec ([`protocol`]).

pub mod protocol;
