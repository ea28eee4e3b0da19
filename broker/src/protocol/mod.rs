//! The Pulsar binary protocol: frame codec ([`codec`]) and topic names ([`names`]).

pub mod codec;
pub mod names;

pub use magnetar_proto::pulsar as pb;
