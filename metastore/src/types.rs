//! The replicated command set and the openraft type configuration.
//!
//! A [`Proposal`] (a batch of [`Command`]s that arrived together) is one Raft log entry;
//! applying it on every replica yields the same [`CommandResult`]s. Batching is what lets one
//! fdatasync and one replication round serve many concurrent writes.
//!
//! Revisions: command `i` of the entry at log index `n` has revision `n << 16 | i`. Every
//! mutation gives the keys it touches that revision as their version, so versions only grow
//! and never repeat, even between writes of one batch.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// openraft type configuration for the metastore.
    pub TypeConfig:
        D = Proposal,
        R = Vec<CommandResult>,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Node id inside the Raft group.
pub type NodeId = u64;
/// The handle to the local Raft node.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log id (term, leader, index).
pub type LogId = openraft::LogId<NodeId>;
/// A Raft log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// The storage error openraft expects.
pub type StorageError = openraft::StorageError<NodeId>;

/// Bits of a revision that number the commands inside one log entry.
pub const REVISION_SHIFT: u32 = 16;
/// Most commands in one proposal (must stay below `1 << REVISION_SHIFT`).
pub const MAX_BATCH: usize = 4096;

/// The revision of command `pos` of the entry at log index `index`.
pub fn revision_of(index: u64, pos: usize) -> u64 {
    (index << REVISION_SHIFT) | pos as u64
}

/// The highest revision the entry at `index` can hold (0 before any entry).
pub fn last_revision_of(index: u64) -> u64 {
    if index == 0 {
        0
    } else {
        (index << REVISION_SHIFT) | ((1 << REVISION_SHIFT) - 1)
    }
}

/// The log index a revision belongs to.
pub fn index_of(revision: u64) -> u64 {
    revision >> REVISION_SHIFT
}

/// A batch of commands replicated as one log entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// Applied in order; command `i` gets revision `index << 16 | i`.
    pub commands: Vec<Command>,
}

/// `(client_id, seq)`: names one logical write so that a retry is applied at most once.
pub type RequestKey = (u64, u64);

/// One write, as replicated through the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Present when the client wants exactly-once application across retries.
    pub request: Option<RequestKey>,
    /// What to do.
    pub op: Op,
}

/// The state machine operations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Put a key; `expected` `Some(0)` = must not exist, `Some(v)` = version must be `v`.
    Put {
        /// Key.
        key: String,
        /// Value bytes.
        value: Vec<u8>,
        /// Version precondition.
        expected: Option<u64>,
        /// Session the key is bound to (0 = persistent).
        session: u64,
    },
    /// Delete a key, optionally only at a given version.
    Delete {
        /// Key.
        key: String,
        /// Version precondition.
        expected: Option<u64>,
    },
    /// Compare versions, then apply every op or none.
    Txn {
        /// `(key, expected version)`; 0 = must not exist.
        compares: Vec<(String, u64)>,
        /// Ops applied when every compare holds.
        ops: Vec<TxnOp>,
    },
    /// Allocate the next id of a named sequence (starting at 0).
    NextId {
        /// Sequence name.
        name: String,
    },
    /// Open a session; its id is the revision of this command.
    CreateSession {
        /// Time to live without a keep-alive.
        ttl_ms: u64,
    },
    /// End a session and delete its ephemeral keys.
    CloseSession {
        /// Session id.
        id: u64,
        /// Why: closed by its owner or expired by the leader.
        expired: bool,
    },
}

/// One operation inside a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    /// Put a key (bound to `session` unless 0).
    Put {
        /// Key.
        key: String,
        /// Value bytes.
        value: Vec<u8>,
        /// Session id or 0.
        session: u64,
    },
    /// Delete a key if present.
    Delete {
        /// Key.
        key: String,
    },
}

/// What applying a command produced, at `revision`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    /// Revision of the command.
    pub revision: u64,
    /// The outcome.
    pub outcome: Outcome,
}

/// The outcome of one command.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Blank and membership entries.
    #[default]
    Nothing,
    /// Put applied; the key now has this version.
    Put {
        /// New version.
        version: u64,
    },
    /// Delete applied (`false`: there was nothing to delete).
    Deleted(bool),
    /// Transaction outcome.
    Txn {
        /// Every compare held and every op was applied.
        succeeded: bool,
        /// First failing compare.
        failed_compare: u32,
        /// Version found by that compare (0 = absent).
        actual_version: u64,
    },
    /// Allocated id.
    Id(u64),
    /// Session opened.
    SessionCreated {
        /// Session id.
        id: u64,
        /// Granted TTL.
        ttl_ms: u64,
    },
    /// Session closed (`false`: it did not exist).
    SessionClosed(bool),
    /// Version precondition failed.
    BadVersion {
        /// Key.
        key: String,
        /// Expected version.
        expected: u64,
        /// Actual version (0 = absent).
        actual: u64,
    },
    /// The session an ephemeral put named does not exist (expired or closed).
    NoSuchSession(u64),
}

/// A stored key's value and its bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredValue {
    /// Value bytes.
    pub value: Vec<u8>,
    /// Revision of the last change.
    pub version: u64,
    /// Revision that created the key.
    pub create_revision: u64,
    /// Session the key is bound to (0 = persistent).
    pub session: u64,
}

/// A key with its stored value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// Key.
    pub key: String,
    /// Stored value.
    pub value: StoredValue,
}

/// One change, as delivered to watchers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Key.
    pub key: String,
    /// `None` for a delete.
    pub value: Option<StoredValue>,
    /// Session the deleted key was bound to (deletes only).
    pub session: u64,
}

/// Every event of one revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventBatch {
    /// The revision.
    pub revision: u64,
    /// Events in application order.
    pub events: Vec<Event>,
}
