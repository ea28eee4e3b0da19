//! Broker configuration: TOML, `MAGNETAR_BROKER_*` environment (and the Pulsar names users
//! know: `managedLedgerDefaultEnsembleSize`, `managedLedgerDefaultWriteQuorum`,
//! `managedLedgerDefaultAckQuorum`, `maxMessageSize`), CLI flags.

use magnetar_common::config::{ConfigError, Validate};
use serde::{Deserialize, Serialize};

use crate::protocol::codec::DEFAULT_MAX_MESSAGE_SIZE;

/// Broker settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Pulsar protocol listen address.
    pub listen_addr: String,
    /// Address lookups send clients to; defaults to the bound address.
    pub advertise_addr: String,
    /// Metastore endpoints.
    pub metastore: Vec<String>,
    /// E of new ledgers.
    pub ensemble_size: usize,
    /// Qw of new ledgers.
    pub write_quorum: usize,
    /// Qa of new ledgers.
    pub ack_quorum: usize,
    /// Largest message accepted, advertised in CONNECTED.
    pub max_message_size: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen_addr: "127.0.0.1:6650".into(),
            advertise_addr: String::new(),
            metastore: vec!["127.0.0.1:2379".into()],
            ensemble_size: 1,
            write_quorum: 1,
            ack_quorum: 1,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }
}

/// Pulsar key names accepted as environment variables.
pub const ENV_ALIASES: &[(&str, &str)] = &[
    ("managedLedgerDefaultEnsembleSize", "ensemble_size"),
    ("managedLedgerDefaultWriteQuorum", "write_quorum"),
    ("managedLedgerDefaultAckQuorum", "ack_quorum"),
    ("maxMessageSize", "max_message_size"),
];

impl Validate for BrokerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: &str| Err(ConfigError::Invalid { key: key.into(), reason: reason.into() });
        if self.ack_quorum == 0 || self.write_quorum < self.ack_quorum || self.ensemble_size < self.write_quorum {
            return bad("ensemble_size", "need ensemble_size >= write_quorum >= ack_quorum >= 1");
        }
        if self.max_message_size < 1024 || self.max_message_size > 64 << 20 {
            return bad("max_message_size", "must be between 1 KiB and 64 MiB");
        }
        if self.metastore.is_empty() {
            return bad("metastore", "at least one metastore endpoint is needed");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use magnetar_common::config::ConfigLoader;

    #[test]
    fn pulsar_names_set_the_quorums_and_bad_ones_are_named() {
        let mut loader = ConfigLoader::new("MAGNETAR_BROKER_");
        for (env, key) in ENV_ALIASES {
            loader = loader.env_alias(env, key);
        }
        let env = [
            ("managedLedgerDefaultEnsembleSize", "3"),
            ("managedLedgerDefaultWriteQuorum", "2"),
            ("managedLedgerDefaultAckQuorum", "2"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let cfg: BrokerConfig = loader.load_with_env(&env).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((cfg.ensemble_size, cfg.write_quorum, cfg.ack_quorum), (3, 2, 2));
        let err = ConfigLoader::new("MAGNETAR_BROKER_").set("ack_quorum", "3").load_with_env::<BrokerConfig>(&[]);
        assert!(err.map_err(|e| e.to_string()).err().unwrap_or_default().contains("ensemble_size"));
    }
}
