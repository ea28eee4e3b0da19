//! Metastore integration suite: real `magnetar metastore` processes on free ports, each test in
//! its own temp dir, killed with SIGKILL where a test says so.
//!
//! Durability contract checked here: a write the client saw acknowledged survives the SIGKILL of
//! any single node of a 3-node cluster (the leader included) and is readable afterwards with the
//! same bytes; a killed node restarted from its data dir catches up (from the log or a snapshot).

mod api;
mod cas;
mod catchup;
mod cli;
mod failover;
mod history;
#[path = "../support/linearizability.rs"]
mod linearizability;
mod membership;
mod sessions;
mod support;
mod watch;
