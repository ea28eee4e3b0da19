//! Ledger client errors.

/// A failed ledger operation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    /// The ledger was fenced by a recovering writer: this writer must stop.
    #[error("ledger {0} was fenced by another writer")]
    Fenced(u64),
    /// The ledger is closed.
    #[error("ledger {0} is closed")]
    Closed(u64),
    /// No such ledger.
    #[error("ledger {0} does not exist")]
    NoSuchLedger(u64),
    /// Too few writable bookies for the ensemble.
    #[error("not enough writable bookies: need {needed}, have {available}")]
    NotEnoughBookies {
        /// Needed.
        needed: usize,
        /// Available.
        available: usize,
    },
    /// Recovery could not decide where the ledger ends (not enough bookies answered); retry.
    #[error("recovery of ledger {ledger} is undecided: {reason}")]
    RecoveryUndecided {
        /// Ledger id.
        ledger: u64,
        /// Why.
        reason: String,
    },
    /// An entry could not be read from any replica.
    #[error("entry {entry} of ledger {ledger} is unreadable: {reason}")]
    Unreadable {
        /// Ledger id.
        ledger: u64,
        /// Entry id.
        entry: i64,
        /// The replicas' answers.
        reason: String,
    },
    /// A read past what is known to be confirmed.
    #[error("entry {entry} is beyond the last confirmed entry {lac} of ledger {ledger}")]
    BeyondLac {
        /// Ledger id.
        ledger: u64,
        /// Entry asked for.
        entry: i64,
        /// LAC.
        lac: i64,
    },
    /// The ledger metadata changed under this writer in a way it cannot follow.
    #[error("ledger {ledger} metadata changed concurrently: {reason}")]
    MetadataConflict {
        /// Ledger id.
        ledger: u64,
        /// What changed.
        reason: String,
    },
    /// Invalid arguments.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A metastore failure.
    #[error("metastore: {0}")]
    Meta(String),
    /// A bookie failure that could not be worked around.
    #[error("bookie {bookie}: {reason}")]
    Bookie {
        /// Bookie id.
        bookie: String,
        /// What happened.
        reason: String,
    },
    /// The writer stopped (closed or failed earlier).
    #[error("ledger writer for {0} has stopped")]
    WriterStopped(u64),
}

impl From<magnetar_metastore::client::ClientError> for LedgerError {
    fn from(e: magnetar_metastore::client::ClientError) -> Self {
        LedgerError::Meta(e.to_string())
    }
}
