//! Errors the client library reports to its callers.

use crate::error::{ErrorCode, ACTUAL_VERSION_HEADER, CODE_HEADER, LEADER_HEADER};

/// A failed metastore call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A version precondition failed.
    #[error("version mismatch on `{key}`: expected {expected}, found {actual}")]
    BadVersion {
        /// Key.
        key: String,
        /// Expected version (0 = must not exist).
        expected: u64,
        /// Actual version (0 = absent).
        actual: u64,
    },
    /// The session is gone (expired or closed).
    #[error("session {0} does not exist (expired or closed)")]
    NoSuchSession(u64),
    /// The server rejected the request as malformed or over a limit.
    #[error("invalid request: {message}")]
    InvalidArgument {
        /// The server's explanation.
        message: String,
    },
    /// The watch history the caller asked for was pruned.
    #[error("watch history compacted: {message}")]
    Compacted {
        /// The server's explanation.
        message: String,
    },
    /// No node could serve the request before the deadline.
    #[error("metastore unavailable after {attempts} attempts (last error: {last})")]
    Unavailable {
        /// Attempts made.
        attempts: u32,
        /// The last failure seen.
        last: String,
    },
    /// The server failed in a way retrying will not fix.
    #[error("metastore error ({code:?}): {status}")]
    Server {
        /// Decoded error code, if any.
        code: Option<ErrorCode>,
        /// The status (boxed: `tonic::Status` is large).
        #[source]
        status: Box<tonic::Status>,
    },
    /// An endpoint is not a usable address.
    #[error("bad endpoint `{endpoint}`: {reason}")]
    BadEndpoint {
        /// The endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
}

/// What the retry loop should do with a failed attempt.
pub(crate) enum Disposition {
    /// Go to this leader next.
    Redirect(Option<String>),
    /// Try another node after a pause.
    Retry,
    /// Give the caller this error.
    Fail(ClientError),
}

pub(crate) fn code_of(status: &tonic::Status) -> Option<ErrorCode> {
    status
        .metadata()
        .get(CODE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u32>().ok())
        .and_then(ErrorCode::from_u32)
}

pub(crate) fn classify(status: tonic::Status, key: &str, expected: u64) -> Disposition {
    match code_of(&status) {
        Some(ErrorCode::NotLeader) => {
            let hint = status.metadata().get(LEADER_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
            Disposition::Redirect(hint)
        }
        Some(ErrorCode::Unavailable) | Some(ErrorCode::ShuttingDown) => Disposition::Retry,
        Some(ErrorCode::BadVersion) => {
            let actual = status
                .metadata()
                .get(ACTUAL_VERSION_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            Disposition::Fail(ClientError::BadVersion { key: key.to_owned(), expected, actual })
        }
        Some(ErrorCode::NoSuchSession) => {
            let id = status.message().split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            Disposition::Fail(ClientError::NoSuchSession(id))
        }
        Some(ErrorCode::InvalidArgument) => {
            Disposition::Fail(ClientError::InvalidArgument { message: status.message().to_owned() })
        }
        Some(ErrorCode::Compacted) => {
            Disposition::Fail(ClientError::Compacted { message: status.message().to_owned() })
        }
        Some(code) => Disposition::Fail(ClientError::Server { code: Some(code), status: Box::new(status) }),
        // No Magnetar code: a transport failure (connection refused, reset, deadline).
        None => match status.code() {
            tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::Aborted => Disposition::Retry,
            tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted | tonic::Code::OutOfRange => {
                Disposition::Fail(ClientError::InvalidArgument { message: status.message().to_owned() })
            }
            _ => Disposition::Fail(ClientError::Server { code: None, status: Box::new(status) }),
        },
    }
}
