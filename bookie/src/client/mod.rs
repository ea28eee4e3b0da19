//! The ledger client.
