//! Magnetar broker: Pulsar protocol server, managed ledgers, subscriptions (not built yet; see the broker issue).
