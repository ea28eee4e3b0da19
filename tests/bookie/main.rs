//! Bookie and ledger integration tests with real bookie processes.

mod broker;
mod cookies;
mod crash;
mod journal;
mod ledger;
mod local;
mod ops;
#[path = "../support/pulsar_python.rs"]
mod pulsar_python;
mod recovery;
mod support;
mod sync_errors;
