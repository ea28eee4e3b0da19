//! RocksDB-backed storage for the metastore: the Raft log and vote ([`log::LogStore`]) and the
//! replicated state machine ([`sm::StateMachine`]) share one RocksDB instance, each in its own
//! column families, so a single WAL orders every write.
//!
//! Durability: log appends are written without sync and then group-committed by a syncer
//! thread (`flush_wal(true)`) before openraft is told they are on disk; votes are written with
//! `sync = true` before they are answered. State machine writes are not synced on their own:
//! everything they contain is in the (synced) log, and before any log prefix is purged the WAL is
//! synced so the applied state that covers it is durable.

// openraft's storage traits return its `StorageError` (224 bytes); the helpers that feed them
// return the same type rather than convert back and forth.
#![allow(clippy::result_large_err)]

pub mod apply;
pub mod log;
pub mod sm;
pub mod snapshot;

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options, DB};

use crate::error::MetaError;
use crate::types::StorageError;

/// Column families.
pub(crate) mod cf {
    /// Raft log: index (u64 BE) → bincode entry.
    pub const LOG: &str = "log";
    /// Raft metadata: vote, purged log id, committed log id.
    pub const RAFT: &str = "raft";
    /// Keys: key bytes → bincode `StoredValue`.
    pub const KV: &str = "kv";
    /// Watch history: revision (u64 BE) ++ seq (u32 BE) → bincode `Event`.
    pub const EVENTS: &str = "events";
    /// Sessions: id (u64 BE) → ttl ms (u64 BE).
    pub const SESSIONS: &str = "sessions";
    /// Ephemeral key index: session id (u64 BE) ++ key → empty.
    pub const SESSION_KEYS: &str = "session_keys";
    /// Id sequences: name → next id (u64 BE).
    pub const COUNTERS: &str = "counters";
    /// Request dedup: client (u64 BE) ++ seq (u64 BE) → bincode `CommandResult`.
    pub const DEDUP: &str = "dedup";
    /// Dedup expiry index: revision (u64 BE) ++ client ++ seq → empty.
    pub const DEDUP_AGE: &str = "dedup_age";
    /// State machine metadata: applied log id, membership, event floor.
    pub const SM_META: &str = "sm_meta";

    /// Every column family of the state machine (what a snapshot holds).
    pub const STATE_MACHINE: [&str; 8] = [KV, EVENTS, SESSIONS, SESSION_KEYS, COUNTERS, DEDUP, DEDUP_AGE, SM_META];
}

/// Opens (or creates) the metastore's RocksDB under `dir`.
pub fn open_db(dir: &Path) -> Result<Arc<DB>, MetaError> {
    std::fs::create_dir_all(dir).map_err(|source| MetaError::Io { context: "creating the data directory", source })?;
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    opts.set_keep_log_file_num(4);
    // WAL records stay in memory until `flush_wal` (the log syncer) or a `sync` write: appends
    // cost no syscall on Raft's path, and one write + fdatasync covers a whole group of them.
    opts.set_manual_wal_flush(true);
    let mut names = vec![cf::LOG, cf::RAFT];
    names.extend(cf::STATE_MACHINE);
    let cfs = names.into_iter().map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
    let db = DB::open_cf_descriptors(&opts, dir.join("db"), cfs)
        .map_err(|source| MetaError::Storage { context: "opening RocksDB", source })?;
    Ok(Arc::new(db))
}

pub(crate) fn handle<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    // Every family is created by `open_db`; a missing one means the directory is not ours.
    match db.cf_handle(name) {
        Some(h) => h,
        None => panic!("column family {name} missing although open_db creates it"),
    }
}

pub(crate) fn be64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

pub(crate) fn read_be64(b: &[u8]) -> Option<u64> {
    b.get(..8)?.try_into().ok().map(u64::from_be_bytes)
}

pub(crate) fn sto_read(e: impl std::error::Error + Send + Sync + 'static) -> StorageError {
    StorageError::from_io_error(openraft::ErrorSubject::Store, openraft::ErrorVerb::Read, std::io::Error::other(e))
}

pub(crate) fn sto_write(e: impl std::error::Error + Send + Sync + 'static) -> StorageError {
    StorageError::from_io_error(openraft::ErrorSubject::Store, openraft::ErrorVerb::Write, std::io::Error::other(e))
}

/// Runs blocking storage work off the async executor.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, StorageError>
where
    F: FnOnce() -> Result<T, StorageError> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(join) => Err(sto_write(join)),
    }
}
