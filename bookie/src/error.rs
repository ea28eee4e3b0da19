//! Bookie errors, and the one conversion point to the wire's result codes.

use magnetar_proto::bookie::Code;

/// A failed bookie operation.
#[derive(Debug, thiserror::Error)]
pub enum BookieError {
    /// The bookie has no such entry.
    #[error("ledger {ledger} has no entry {entry} on this bookie")]
    NoEntry {
        /// Ledger id.
        ledger: u64,
        /// Entry id.
        entry: i64,
    },
    /// The ledger is fenced; normal adds are refused.
    #[error("ledger {0} is fenced")]
    Fenced(u64),
    /// The master key does not match.
    #[error("wrong master key for ledger {0}")]
    Unauthorized(u64),
    /// Stored or received bytes failed their checksum.
    #[error("checksum mismatch for ledger {ledger} entry {entry}")]
    Corrupt {
        /// Ledger id.
        ledger: u64,
        /// Entry id.
        entry: i64,
    },
    /// The bookie is read-only.
    #[error("bookie is read-only")]
    ReadOnly,
    /// A malformed request.
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    /// The bookie is stopping.
    #[error("bookie is shutting down")]
    ShuttingDown,
    /// A file-system error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A RocksDB error.
    #[error("entry store: {0}")]
    Store(#[from] rocksdb::Error),
    /// The journal on disk is damaged in a way replay cannot pass over.
    #[error("journal {file} is corrupt at offset {offset}: {reason}")]
    CorruptJournal {
        /// Segment file.
        file: String,
        /// Byte offset of the bad record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// This bookie's directories do not match its identity.
    #[error("cookie mismatch: {0}")]
    Cookie(String),
    /// A metastore call failed.
    #[error("metastore: {0}")]
    Meta(#[from] magnetar_metastore::client::ClientError),
    /// A configuration problem.
    #[error(transparent)]
    Config(#[from] magnetar_common::config::ConfigError),
}

impl BookieError {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        BookieError::Io { context: context.into(), source }
    }

    /// The wire result code for this error.
    pub fn code(&self) -> Code {
        match self {
            BookieError::NoEntry { .. } => Code::NoEntry,
            BookieError::Fenced(_) => Code::Fenced,
            BookieError::Unauthorized(_) => Code::Unauthorized,
            BookieError::Corrupt { .. } | BookieError::CorruptJournal { .. } => Code::Corrupt,
            BookieError::ReadOnly => Code::ReadOnly,
            BookieError::Invalid(_) => Code::Invalid,
            BookieError::ShuttingDown => Code::ShuttingDown,
            BookieError::Io { .. }
            | BookieError::Store(_)
            | BookieError::Cookie(_)
            | BookieError::Meta(_)
            | BookieError::Config(_) => Code::IoError,
        }
    }
}

/// Result alias.
pub type Result<T, E = BookieError> = std::result::Result<T, E>;
