//! Metastore errors and their one conversion to the wire.
//!
//! Every error that crosses gRPC carries a stable numeric [`ErrorCode`] in the
//! `x-magnetar-code` metadata entry; a NotLeader error also carries the leader's id and address
//! (`x-magnetar-leader-id`, `x-magnetar-leader`) so clients can go straight there.

use tonic::metadata::MetadataValue;

/// Metadata key holding the [`ErrorCode`].
pub const CODE_HEADER: &str = "x-magnetar-code";
/// Metadata key holding the leader's address on NotLeader.
pub const LEADER_HEADER: &str = "x-magnetar-leader";
/// Metadata key holding the leader's node id on NotLeader.
pub const LEADER_ID_HEADER: &str = "x-magnetar-leader-id";
/// Metadata key holding the actual version on BadVersion.
pub const ACTUAL_VERSION_HEADER: &str = "x-magnetar-actual-version";

/// Stable wire error codes. Never renumber.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// This node is not the leader (leader hint attached when known).
    NotLeader = 1,
    /// A version precondition failed.
    BadVersion = 2,
    /// The session does not exist (expired or closed).
    NoSuchSession = 3,
    /// The request is malformed or over a limit.
    InvalidArgument = 4,
    /// A watch asked for history that was already pruned.
    Compacted = 5,
    /// No leader is known, or the cluster cannot reach a quorum.
    Unavailable = 6,
    /// The local storage failed.
    Storage = 7,
    /// An internal invariant failed.
    Internal = 8,
    /// The node is shutting down.
    ShuttingDown = 9,
}

impl ErrorCode {
    /// Decodes a wire code.
    pub fn from_u32(v: u32) -> Option<Self> {
        use ErrorCode::*;
        Some(match v {
            1 => NotLeader,
            2 => BadVersion,
            3 => NoSuchSession,
            4 => InvalidArgument,
            5 => Compacted,
            6 => Unavailable,
            7 => Storage,
            8 => Internal,
            9 => ShuttingDown,
            _ => return None,
        })
    }
}

/// Errors raised inside a metastore node.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// This node cannot serve the request; the leader may be elsewhere.
    #[error("not the leader (leader: {})", leader_addr.as_deref().unwrap_or("unknown"))]
    NotLeader {
        /// Leader node id, when known.
        leader_id: Option<u64>,
        /// Leader address, when known.
        leader_addr: Option<String>,
    },
    /// Version precondition failed.
    #[error("version mismatch on `{key}`: expected {expected}, found {actual}")]
    BadVersion {
        /// Key.
        key: String,
        /// Expected version (0 = must not exist).
        expected: u64,
        /// Actual version (0 = absent).
        actual: u64,
    },
    /// Unknown session.
    #[error("session {0} does not exist (expired or closed)")]
    NoSuchSession(u64),
    /// Malformed request or a limit exceeded.
    #[error("invalid `{field}`: {reason}")]
    InvalidArgument {
        /// The offending field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// Watch history pruned.
    #[error("revision {requested} was compacted; the oldest kept revision is {oldest}")]
    Compacted {
        /// Requested start revision.
        requested: u64,
        /// Oldest revision still kept.
        oldest: u64,
    },
    /// Raft could not serve the request (no quorum, timeout).
    #[error("cluster unavailable: {reason}")]
    Unavailable {
        /// What failed.
        reason: String,
    },
    /// RocksDB failed.
    #[error("storage error while {context}")]
    Storage {
        /// What was being done.
        context: &'static str,
        /// The RocksDB error.
        #[source]
        source: rocksdb::Error,
    },
    /// File I/O failed.
    #[error("I/O error while {context}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A stored or received record did not decode.
    #[error("cannot decode while {context}")]
    Codec {
        /// What was being done.
        context: &'static str,
        /// The error.
        #[source]
        source: bincode::Error,
    },
    /// Raft reported a fatal error (storage failure or shutdown).
    #[error("raft stopped: {source}")]
    Fatal {
        /// The openraft error (boxed: it is large and rare).
        #[source]
        source: Box<openraft::error::Fatal<u64>>,
    },
    /// The node is stopping.
    #[error("the node is shutting down")]
    ShuttingDown,
}

impl MetaError {
    pub(crate) fn storage(context: &'static str) -> impl FnOnce(rocksdb::Error) -> MetaError {
        move |source| MetaError::Storage { context, source }
    }

    pub(crate) fn fatal(source: openraft::error::Fatal<u64>) -> MetaError {
        MetaError::Fatal { source: Box::new(source) }
    }

    pub(crate) fn codec(context: &'static str) -> impl FnOnce(bincode::Error) -> MetaError {
        move |source| MetaError::Codec { context, source }
    }

    /// The wire code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            MetaError::NotLeader { .. } => ErrorCode::NotLeader,
            MetaError::BadVersion { .. } => ErrorCode::BadVersion,
            MetaError::NoSuchSession(_) => ErrorCode::NoSuchSession,
            MetaError::InvalidArgument { .. } => ErrorCode::InvalidArgument,
            MetaError::Compacted { .. } => ErrorCode::Compacted,
            MetaError::Unavailable { .. } => ErrorCode::Unavailable,
            MetaError::Storage { .. } | MetaError::Io { .. } => ErrorCode::Storage,
            MetaError::Fatal { source } if matches!(**source, openraft::error::Fatal::Stopped) => {
                ErrorCode::ShuttingDown
            }
            MetaError::ShuttingDown => ErrorCode::ShuttingDown,
            MetaError::Codec { .. } | MetaError::Fatal { .. } => ErrorCode::Internal,
        }
    }
}

impl From<MetaError> for tonic::Status {
    fn from(e: MetaError) -> Self {
        use tonic::Code;
        let code = match e.code() {
            ErrorCode::NotLeader | ErrorCode::Unavailable | ErrorCode::ShuttingDown => Code::Unavailable,
            ErrorCode::BadVersion => Code::FailedPrecondition,
            ErrorCode::NoSuchSession => Code::NotFound,
            ErrorCode::InvalidArgument => Code::InvalidArgument,
            ErrorCode::Compacted => Code::OutOfRange,
            ErrorCode::Storage | ErrorCode::Internal => Code::Internal,
        };
        let mut status = tonic::Status::new(code, e.to_string());
        let md = status.metadata_mut();
        md.insert(CODE_HEADER, MetadataValue::from(e.code() as u32));
        match &e {
            MetaError::NotLeader { leader_id, leader_addr } => {
                if let Some(id) = leader_id {
                    md.insert(LEADER_ID_HEADER, MetadataValue::from(*id));
                }
                if let Some(v) = leader_addr.as_deref().and_then(|a| a.parse().ok()) {
                    md.insert(LEADER_HEADER, v);
                }
            }
            MetaError::BadVersion { actual, .. } => {
                md.insert(ACTUAL_VERSION_HEADER, MetadataValue::from(*actual));
            }
            _ => {}
        }
        status
    }
}
