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
    /// HTTP address: admin REST API, `/metrics`, `/status.html` ("" turns it off).
    pub web_listen_addr: String,
    /// The cluster this broker belongs to (`cluster` label of metrics, admin API).
    pub cluster_name: String,
    /// Address lookups send clients to; defaults to the bound address.
    pub advertise_addr: String,
    /// Metastore endpoints.
    pub metastore: Vec<String>,
    /// Stable broker id in `/brokers/` and in bundle ownership ("": the advertised address).
    /// A broker restarted under the same id takes its bundles back at once.
    pub broker_id: String,
    /// TTL of the broker's metastore session, ms: how long a broker that died keeps its
    /// bundles before another broker may take them.
    pub metadata_store_session_timeout_ms: u64,
    /// E of new ledgers.
    pub ensemble_size: usize,
    /// Qw of new ledgers.
    pub write_quorum: usize,
    /// Qa of new ledgers.
    pub ack_quorum: usize,
    /// Largest message accepted, advertised in CONNECTED.
    pub max_message_size: usize,
    /// Create topics on first use.
    pub allow_auto_topic_creation: bool,
    /// What auto-creation creates: `non-partitioned` or `partitioned`.
    pub allow_auto_topic_creation_type: String,
    /// Partitions of auto-created partitioned topics.
    pub default_num_partitions: u32,
    /// Roll a topic's ledger after this many entries.
    pub managed_ledger_max_entries_per_ledger: u64,
    /// Roll a topic's ledger after this many MiB.
    pub managed_ledger_max_size_per_ledger_mb: u64,
    /// Roll a topic's ledger (with entries) after this many minutes.
    pub managed_ledger_max_ledger_rollover_time_minutes: u64,
    /// The tail caches of all the broker's topics together, MiB: consumers that keep up read
    /// from them, not from the bookies (0: every read goes to the bookies).
    pub managed_ledger_cache_size_mb: u64,
    /// Cached entries older than this leave the tail cache, ms.
    pub managed_ledger_cache_eviction_time_threshold_millis: u64,
    /// How often changed cursors (acknowledgements) are stored, ms. A broker that dies
    /// redelivers at most what was acknowledged in this window.
    pub cursor_persist_interval_ms: u64,
    /// Entries per catch-up read from the bookies.
    pub dispatcher_max_read_batch_size: usize,
    /// Bytes per catch-up read from the bookies (fewer entries are read when the entries
    /// read so far were large), bytes.
    pub dispatcher_max_read_size_bytes: usize,
    /// Per-topic (and per-subscription) series in `/metrics`; off, series are per namespace
    /// (for clusters with very many topics).
    pub expose_topic_level_metrics_in_prometheus: bool,
    /// Retention of acknowledged messages (and of messages of topics without subscriptions)
    /// in namespaces without a retention policy: minutes after their ledger closed (-1: no
    /// limit). With both this and the size at 0, ledgers go as soon as they are consumed.
    pub default_retention_time_in_minutes: i64,
    /// The same by size: MiB of ledgers a topic keeps (-1: no limit).
    pub default_retention_size_in_mb: i64,
    /// How often topics look for consumed ledgers that retention no longer keeps, seconds
    /// (they also look at each ledger rollover and whenever acknowledgements free a ledger).
    pub retention_check_interval_in_seconds: u64,
    /// Message TTL of namespaces without a `messageTTL` policy, seconds (0: none): messages
    /// published longer ago are acknowledged on every subscription.
    pub ttl_duration_default_in_seconds: u64,
    /// How often topics expire messages past their namespace's TTL, minutes (fractions allowed).
    pub message_expiry_check_interval_in_minutes: f64,
    /// Deduplication of messages in namespaces without a `deduplicationEnabled` policy.
    pub broker_deduplication_enabled: bool,
    /// Entries stored between two snapshots of a topic's deduplication state (a topic loading
    /// replays at most about this many).
    pub broker_deduplication_entries_interval: u64,
    /// A producer name with no producer connected for this long is forgotten: its highest
    /// sequence id (deduplication, `last_sequence_id`) and its rates, minutes.
    pub broker_deduplication_producer_inactivity_timeout_minutes: f64,
    /// Backlog quota of namespaces without one, bytes a subscription may leave unacknowledged
    /// (-1: none).
    pub backlog_quota_default_limit_bytes: i64,
    /// What happens past that quota: producer_request_hold, producer_exception or
    /// consumer_backlog_eviction.
    pub backlog_quota_default_retention_policy: String,
    /// Whether topics enforce backlog quotas.
    pub backlog_quota_check_enabled: bool,
    /// How often topics check their backlog against the quota (and read their namespace's
    /// quota again), seconds.
    pub backlog_quota_check_interval_in_seconds: u64,
    /// How often the broker looks for ledgers no topic lists (left by a broker that died
    /// while deleting them) and deletes them, seconds (0: never).
    pub orphan_ledger_check_interval_in_seconds: u64,
    /// Ledgers younger than this are not deleted by that look, seconds.
    pub orphan_ledger_min_age_in_seconds: u64,
    /// Sends of one connection waiting for their appends at which the broker stops reading
    /// that connection, until half of them are answered.
    pub max_pending_publish_requests_per_connection: usize,
    /// MiB of sends waiting for their appends, over all connections, at which the broker stops
    /// reading every connection until half of that is answered (-1: no limit).
    pub max_message_publish_buffer_size_in_mb: i64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen_addr: "127.0.0.1:6650".into(),
            web_listen_addr: "127.0.0.1:8080".into(),
            cluster_name: "standalone".into(),
            advertise_addr: String::new(),
            metastore: vec!["127.0.0.1:2379".into()],
            broker_id: String::new(),
            metadata_store_session_timeout_ms: 30_000,
            ensemble_size: 1,
            write_quorum: 1,
            ack_quorum: 1,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            allow_auto_topic_creation: true,
            allow_auto_topic_creation_type: "non-partitioned".into(),
            default_num_partitions: 1,
            managed_ledger_max_entries_per_ledger: 50_000,
            managed_ledger_max_size_per_ledger_mb: 2048,
            managed_ledger_max_ledger_rollover_time_minutes: 240,
            managed_ledger_cache_size_mb: 512,
            managed_ledger_cache_eviction_time_threshold_millis: 1000,
            cursor_persist_interval_ms: 200,
            dispatcher_max_read_batch_size: 100,
            dispatcher_max_read_size_bytes: 5 << 20,
            expose_topic_level_metrics_in_prometheus: true,
            default_retention_time_in_minutes: 0,
            default_retention_size_in_mb: 0,
            retention_check_interval_in_seconds: 120,
            ttl_duration_default_in_seconds: 0,
            message_expiry_check_interval_in_minutes: 5.0,
            broker_deduplication_enabled: false,
            broker_deduplication_entries_interval: 1000,
            broker_deduplication_producer_inactivity_timeout_minutes: 360.0,
            backlog_quota_default_limit_bytes: -1,
            backlog_quota_default_retention_policy: "producer_request_hold".into(),
            backlog_quota_check_enabled: true,
            backlog_quota_check_interval_in_seconds: 60,
            orphan_ledger_check_interval_in_seconds: 600,
            orphan_ledger_min_age_in_seconds: 600,
            max_pending_publish_requests_per_connection: 1000,
            max_message_publish_buffer_size_in_mb: 512,
        }
    }
}

/// Pulsar key names accepted as environment variables.
pub const ENV_ALIASES: &[(&str, &str)] = &[
    ("managedLedgerDefaultEnsembleSize", "ensemble_size"),
    ("managedLedgerDefaultWriteQuorum", "write_quorum"),
    ("managedLedgerDefaultAckQuorum", "ack_quorum"),
    ("maxMessageSize", "max_message_size"),
    ("clusterName", "cluster_name"),
    ("metadataStoreSessionTimeoutMillis", "metadata_store_session_timeout_ms"),
    ("allowAutoTopicCreation", "allow_auto_topic_creation"),
    ("allowAutoTopicCreationType", "allow_auto_topic_creation_type"),
    ("defaultNumPartitions", "default_num_partitions"),
    ("managedLedgerMaxEntriesPerLedger", "managed_ledger_max_entries_per_ledger"),
    ("managedLedgerMaxSizePerLedgerMbytes", "managed_ledger_max_size_per_ledger_mb"),
    ("managedLedgerMaxLedgerRolloverTimeMinutes", "managed_ledger_max_ledger_rollover_time_minutes"),
    ("managedLedgerCacheSizeMB", "managed_ledger_cache_size_mb"),
    ("managedLedgerCacheEvictionTimeThresholdMillis", "managed_ledger_cache_eviction_time_threshold_millis"),
    ("dispatcherMaxReadBatchSize", "dispatcher_max_read_batch_size"),
    ("dispatcherMaxReadSizeBytes", "dispatcher_max_read_size_bytes"),
    ("exposeTopicLevelMetricsInPrometheus", "expose_topic_level_metrics_in_prometheus"),
    ("defaultRetentionTimeInMinutes", "default_retention_time_in_minutes"),
    ("defaultRetentionSizeInMB", "default_retention_size_in_mb"),
    ("retentionCheckIntervalInSeconds", "retention_check_interval_in_seconds"),
    ("ttlDurationDefaultInSeconds", "ttl_duration_default_in_seconds"),
    ("messageExpiryCheckIntervalInMinutes", "message_expiry_check_interval_in_minutes"),
    ("brokerDeduplicationEnabled", "broker_deduplication_enabled"),
    ("brokerDeduplicationEntriesInterval", "broker_deduplication_entries_interval"),
    ("brokerDeduplicationProducerInactivityTimeoutMinutes", "broker_deduplication_producer_inactivity_timeout_minutes"),
    ("backlogQuotaDefaultLimitBytes", "backlog_quota_default_limit_bytes"),
    ("backlogQuotaDefaultRetentionPolicy", "backlog_quota_default_retention_policy"),
    ("backlogQuotaCheckEnabled", "backlog_quota_check_enabled"),
    ("backlogQuotaCheckIntervalInSeconds", "backlog_quota_check_interval_in_seconds"),
    ("maxPendingPublishRequestsPerConnection", "max_pending_publish_requests_per_connection"),
    ("maxMessagePublishBufferSizeInMB", "max_message_publish_buffer_size_in_mb"),
];

impl BrokerConfig {
    /// The per-topic settings.
    pub fn topic_settings(&self) -> crate::topic::TopicSettings {
        crate::topic::TopicSettings {
            ensemble: (self.ensemble_size, self.write_quorum, self.ack_quorum),
            auto_create: self.allow_auto_topic_creation,
            auto_partitions: if self.allow_auto_topic_creation_type == "partitioned" {
                self.default_num_partitions
            } else {
                0
            },
            max_entries_per_ledger: self.managed_ledger_max_entries_per_ledger,
            max_bytes_per_ledger: self.managed_ledger_max_size_per_ledger_mb << 20,
            max_ledger_age: std::time::Duration::from_secs(self.managed_ledger_max_ledger_rollover_time_minutes * 60),
            cache: crate::topic::CacheBudget::new((self.managed_ledger_cache_size_mb << 20) as usize),
            cache_age: std::time::Duration::from_millis(self.managed_ledger_cache_eviction_time_threshold_millis),
            cursor_persist_interval: std::time::Duration::from_millis(self.cursor_persist_interval_ms),
            read_batch: self.dispatcher_max_read_batch_size,
            read_bytes: self.dispatcher_max_read_size_bytes,
            retention: crate::topic::Retention::from_pulsar(
                self.default_retention_time_in_minutes,
                self.default_retention_size_in_mb,
            ),
            retention_check_interval: std::time::Duration::from_secs(self.retention_check_interval_in_seconds.max(1)),
            message_ttl: self.ttl_duration_default_in_seconds,
            expiry_check_interval: std::time::Duration::from_secs_f64(
                self.message_expiry_check_interval_in_minutes * 60.0,
            ),
            backlog_quota: crate::topic::quota::QuotaPolicy::parse(&self.backlog_quota_default_retention_policy)
                .and_then(|p| crate::topic::quota::BacklogQuota::from_limit(self.backlog_quota_default_limit_bytes, p)),
            deduplication: self.broker_deduplication_enabled,
            dedup_snapshot_entries: self.broker_deduplication_entries_interval,
            producer_inactivity: std::time::Duration::try_from_secs_f64(
                self.broker_deduplication_producer_inactivity_timeout_minutes * 60.0,
            )
            .unwrap_or(std::time::Duration::MAX),
            quota_check_interval: self
                .backlog_quota_check_enabled
                .then(|| std::time::Duration::from_secs(self.backlog_quota_check_interval_in_seconds.max(1))),
        }
    }
}

impl Validate for BrokerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: &str| Err(ConfigError::Invalid { key: key.into(), reason: reason.into() });
        if self.ack_quorum == 0 || self.write_quorum < self.ack_quorum || self.ensemble_size < self.write_quorum {
            return bad("ensemble_size", "need ensemble_size >= write_quorum >= ack_quorum >= 1");
        }
        if self.default_retention_time_in_minutes < -1 {
            return bad("default_retention_time_in_minutes", "must be -1 (no limit) or at least 0");
        }
        if self.default_retention_size_in_mb < -1 {
            return bad("default_retention_size_in_mb", "must be -1 (no limit) or at least 0");
        }
        let expiry = self.message_expiry_check_interval_in_minutes;
        if !(expiry.is_finite() && (0.001..=10_000.0).contains(&expiry)) {
            return bad("message_expiry_check_interval_in_minutes", "must be between 0.001 and 10000");
        }
        if self.ensemble_size > magnetar_bookie::client::metadata::MAX_ENSEMBLE {
            return bad("ensemble_size", "must be at most 64");
        }
        if self.max_message_size < 1024 || self.max_message_size > 64 << 20 {
            return bad("max_message_size", "must be between 1 KiB and 64 MiB");
        }
        if !["non-partitioned", "partitioned"].contains(&self.allow_auto_topic_creation_type.as_str()) {
            return bad("allow_auto_topic_creation_type", "must be non-partitioned or partitioned");
        }
        if self.default_num_partitions == 0 {
            return bad("default_num_partitions", "must be at least 1");
        }
        if self.managed_ledger_max_entries_per_ledger == 0 || self.managed_ledger_max_size_per_ledger_mb == 0 {
            return bad("managed_ledger_max_entries_per_ledger", "ledger rollover limits must be at least 1");
        }
        for (key, v) in [
            ("cursor_persist_interval_ms", self.cursor_persist_interval_ms as usize),
            (
                "managed_ledger_cache_eviction_time_threshold_millis",
                self.managed_ledger_cache_eviction_time_threshold_millis as usize,
            ),
            ("dispatcher_max_read_batch_size", self.dispatcher_max_read_batch_size),
            ("dispatcher_max_read_size_bytes", self.dispatcher_max_read_size_bytes),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if crate::topic::quota::QuotaPolicy::parse(&self.backlog_quota_default_retention_policy).is_none() {
            return bad(
                "backlog_quota_default_retention_policy",
                "must be producer_request_hold, producer_exception or consumer_backlog_eviction",
            );
        }
        if self.broker_deduplication_entries_interval == 0 {
            return bad("broker_deduplication_entries_interval", "must be at least 1");
        }
        let inactivity = self.broker_deduplication_producer_inactivity_timeout_minutes;
        if !(inactivity.is_finite() && inactivity * 60.0 >= 1.0) {
            return bad("broker_deduplication_producer_inactivity_timeout_minutes", "must be at least 1 s (1/60)");
        }
        if self.backlog_quota_check_interval_in_seconds == 0 {
            return bad("backlog_quota_check_interval_in_seconds", "must be at least 1");
        }
        if self.metadata_store_session_timeout_ms < 1000 {
            return bad("metadata_store_session_timeout_ms", "must be at least 1000");
        }
        if self.max_pending_publish_requests_per_connection == 0 {
            return bad("max_pending_publish_requests_per_connection", "must be at least 1");
        }
        if self.max_message_publish_buffer_size_in_mb == 0 || self.max_message_publish_buffer_size_in_mb < -1 {
            return bad("max_message_publish_buffer_size_in_mb", "must be -1 (no limit) or at least 1");
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

    #[test]
    fn cache_and_producer_expiry_settings_reach_the_topics() {
        let env = [
            ("managedLedgerCacheSizeMB", "64"),
            ("managedLedgerCacheEvictionTimeThresholdMillis", "250"),
            ("brokerDeduplicationProducerInactivityTimeoutMinutes", "0.5"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let mut loader = ConfigLoader::new("MAGNETAR_BROKER_");
        for (env, key) in ENV_ALIASES {
            loader = loader.env_alias(env, key);
        }
        let cfg: BrokerConfig = loader.load_with_env(&env).unwrap_or_else(|e| panic!("{e}"));
        let t = cfg.topic_settings();
        assert_eq!(t.cache.limit(), 64 << 20);
        assert_eq!(t.cache_age, std::time::Duration::from_millis(250));
        assert_eq!(t.producer_inactivity, std::time::Duration::from_secs(30));
        for (key, bad) in [
            ("managed_ledger_cache_eviction_time_threshold_millis", "0"),
            ("broker_deduplication_producer_inactivity_timeout_minutes", "0.001"),
            ("broker_deduplication_producer_inactivity_timeout_minutes", "inf"),
        ] {
            let err = ConfigLoader::new("MAGNETAR_BROKER_").set(key, bad).load_with_env::<BrokerConfig>(&[]);
            let err = err.map(|_| ()).map_err(|e| e.to_string()).expect_err(bad);
            assert!(err.contains(key), "{key}={bad}: {err}");
        }
    }
}
