//! The Pulsar binary protocol: frame codec ([`codec`]), framed connections and the handshake
//! ([`connection`]), and topic names ([`names`]).

pub mod codec;
pub mod connection;
pub mod names;

pub use magnetar_proto::pulsar as pb;
