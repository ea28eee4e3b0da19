//! Metastore node configuration (`[metastore]`-style TOML, `MAGNETAR_*` env, CLI flags).

use std::path::PathBuf;

use magnetar_common::config::{ConfigError, Validate};
use serde::{Deserialize, Serialize};

/// One metastore node.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetastoreConfig {
    /// This node's Raft id (unique in the cluster, > 0).
    pub node_id: u64,
    /// gRPC listen address (clients and Raft traffic).
    pub listen_addr: String,
    /// Address other nodes and clients use to reach this one; defaults to the bound address.
    pub advertise_addr: String,
    /// Where the Raft log, state machine and snapshots live.
    pub data_dir: PathBuf,
    /// Bootstrap membership, `id=host:port` each; 1 or 3+ voters. Empty: join an existing
    /// cluster (added with `magnetar meta cluster add`).
    pub initial_members: Vec<String>,
    /// Raft timing and log compaction.
    pub raft: RaftSettings,
    /// Request limits.
    pub limits: Limits,
    /// Session TTL bounds.
    pub sessions: SessionSettings,
    /// Revisions of watch history kept for watchers that resume.
    pub watch_history_revisions: u64,
    /// HTTP address for `/metrics` (Raft and process series); "" turns it off.
    pub http_addr: String,
}

impl Default for MetastoreConfig {
    fn default() -> Self {
        MetastoreConfig {
            node_id: 1,
            listen_addr: "127.0.0.1:2379".into(),
            advertise_addr: String::new(),
            data_dir: PathBuf::from("./data/metastore"),
            initial_members: Vec::new(),
            raft: RaftSettings::default(),
            limits: Limits::default(),
            sessions: SessionSettings::default(),
            watch_history_revisions: 100_000,
            http_addr: String::new(),
        }
    }
}

/// Raft timing and compaction.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RaftSettings {
    /// Leader heartbeat interval.
    pub heartbeat_ms: u64,
    /// Lower bound of the randomized election timeout.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomized election timeout.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_every_entries: u64,
    /// Entries kept in the log behind the last snapshot (lets slow followers catch up from the
    /// log instead of a snapshot).
    pub keep_entries_after_snapshot: u64,
    /// Timeout of one Raft RPC to a peer.
    pub rpc_timeout_ms: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            heartbeat_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            snapshot_every_entries: 20_000,
            keep_entries_after_snapshot: 5_000,
            rpc_timeout_ms: 2_000,
        }
    }
}

/// Request limits.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest key in bytes.
    pub max_key_bytes: usize,
    /// Largest value in bytes.
    pub max_value_bytes: usize,
    /// Most compares plus ops in one transaction.
    pub max_txn_ops: usize,
    /// Range page size when the request names none.
    pub default_page: usize,
    /// Largest range page.
    pub max_page: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_key_bytes: 4096, max_value_bytes: 1 << 20, max_txn_ops: 256, default_page: 1000, max_page: 10_000 }
    }
}

/// Session TTL bounds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SessionSettings {
    /// Shortest TTL granted.
    pub min_ttl_ms: u64,
    /// Longest TTL granted.
    pub max_ttl_ms: u64,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings { min_ttl_ms: 500, max_ttl_ms: 600_000 }
    }
}

/// A parsed `id=host:port` member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Node id.
    pub id: u64,
    /// Address.
    pub addr: String,
}

impl MetastoreConfig {
    /// The bootstrap members, parsed.
    pub fn members(&self) -> Result<Vec<Member>, ConfigError> {
        self.initial_members.iter().map(|m| parse_member(m)).collect()
    }
}

fn parse_member(s: &str) -> Result<Member, ConfigError> {
    let invalid =
        |reason: &str| ConfigError::Invalid { key: "initial_members".into(), reason: format!("`{s}`: {reason}") };
    let (id, addr) = s.split_once('=').ok_or_else(|| invalid("expected id=host:port"))?;
    let id: u64 = id.trim().parse().map_err(|_| invalid("the id is not a number"))?;
    let addr = addr.trim();
    if id == 0 {
        return Err(invalid("ids start at 1"));
    }
    if !addr.contains(':') {
        return Err(invalid("the address needs a port"));
    }
    Ok(Member { id, addr: addr.to_owned() })
}

impl Validate for MetastoreConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: &str| Err(ConfigError::Invalid { key: key.into(), reason: reason.into() });
        if self.node_id == 0 {
            return bad("node_id", "must be > 0");
        }
        let members = self.members()?;
        if members.len() == 2 {
            return bad("initial_members", "bootstrap 1 node or 3 or more: 2 voters cannot survive either failing");
        }
        if !members.is_empty() && !members.iter().any(|m| m.id == self.node_id) {
            return bad("initial_members", "must include this node's node_id");
        }
        let mut ids: Vec<u64> = members.iter().map(|m| m.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != members.len() {
            return bad("initial_members", "node ids must be unique");
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0 {
            return bad("raft.heartbeat_ms", "must be > 0");
        }
        if r.election_timeout_min_ms <= r.heartbeat_ms {
            return bad("raft.election_timeout_min_ms", "must be larger than raft.heartbeat_ms");
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return bad("raft.election_timeout_max_ms", "must be larger than raft.election_timeout_min_ms");
        }
        if r.snapshot_every_entries == 0 {
            return bad("raft.snapshot_every_entries", "must be > 0");
        }
        if self.limits.max_value_bytes == 0 || self.limits.max_value_bytes > 64 << 20 {
            return bad("limits.max_value_bytes", "must be between 1 and 64 MiB");
        }
        if self.limits.max_key_bytes == 0 || self.limits.max_key_bytes > 64 << 10 {
            return bad("limits.max_key_bytes", "must be between 1 and 64 KiB");
        }
        if self.limits.default_page == 0 || self.limits.default_page > self.limits.max_page {
            return bad("limits.default_page", "must be between 1 and limits.max_page");
        }
        if self.sessions.min_ttl_ms == 0 || self.sessions.min_ttl_ms > self.sessions.max_ttl_ms {
            return bad("sessions.min_ttl_ms", "must be between 1 and sessions.max_ttl_ms");
        }
        if self.watch_history_revisions < 1024 {
            return bad("watch_history_revisions", "must be at least 1024");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        assert!(MetastoreConfig::default().validate().is_ok());
    }

    #[test]
    fn two_member_bootstrap_is_rejected_naming_the_key() {
        let c = MetastoreConfig {
            initial_members: vec!["1=127.0.0.1:1".into(), "2=127.0.0.1:2".into()],
            ..Default::default()
        };
        let e = c.validate().expect_err("two voters must be rejected").to_string();
        assert!(e.contains("initial_members"), "{e}");
    }

    #[test]
    fn member_parsing() {
        assert_eq!(parse_member("3=h:1").ok(), Some(Member { id: 3, addr: "h:1".into() }));
        assert!(parse_member("x=h:1").is_err());
        assert!(parse_member("0=h:1").is_err());
        assert!(parse_member("1=h").is_err());
    }

    #[test]
    fn election_timeout_must_exceed_heartbeat() {
        let mut c = MetastoreConfig::default();
        c.raft.election_timeout_min_ms = c.raft.heartbeat_ms;
        let e = c.validate().expect_err("must fail").to_string();
        assert!(e.contains("raft.election_timeout_min_ms"), "{e}");
    }
}
