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

#[cfg(test)]
mod tests {
    /// Every command moves through channels and async tasks inside a `BaseCommand`; with its
    /// 58 command fields held inline it was about 5 KB, copied whole on every move.
    #[test]
    fn base_command_stays_small() {
        let size = std::mem::size_of::<super::pulsar::BaseCommand>();
        assert!(size <= 1024, "BaseCommand is {size} bytes: are its command fields still boxed (build.rs)?");
        let cmd = super::pulsar::BaseCommand {
            send: Some(Box::new(super::pulsar::CommandSend { producer_id: 1, sequence_id: 2, ..Default::default() })),
            ..Default::default()
        };
        let bytes = prost::Message::encode_to_vec(&cmd);
        let back: super::pulsar::BaseCommand = prost::Message::decode(&bytes[..]).unwrap_or_default();
        assert_eq!(back.send.map(|s| (s.producer_id, s.sequence_id)), Some((1, 2)));
    }
}
