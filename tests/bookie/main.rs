//! Bookie and ledger integration tests with real bookie processes.

mod cookies;
mod crash;
mod journal;
mod ledger;
mod ops;
mod support;
