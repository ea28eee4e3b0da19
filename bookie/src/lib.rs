//! Magnetar's bookie — the storage node that holds replicated ledger entries — and the ledger
//! client brokers use to write and read them.
//!
//! - [`journal`]: the write-ahead journal with group commit; nothing is acknowledged before it
//!   is on disk.
//! - [`storage`]: the entry store (RocksDB, WAL off) behind a conformance-tested trait.
//! - [`server`]: the running bookie: gRPC, HTTP, cookies, registration, checkpoints, GC.
//! - [`client`]: ledgers over bookies: create, append (ensemble changes), recover, read, close.
//!
//! The protocol follows `LEDGER_PROTOCOL.md`; `docs/bookie.md` describes operations.

pub mod checksum;
pub mod client;
pub mod config;
pub mod error;
pub mod journal;
pub mod ledgers;
pub mod server;
pub mod storage;
#[cfg(test)]
mod test_util;

/// The largest HTTP/2 frame each side of the bookie protocol accepts: an entry of up to this
/// size crosses in one frame instead of 16 KiB pieces (HTTP/2's default), each a separate
/// step for both sides' connection tasks.
pub(crate) const H2_MAX_FRAME: u32 = 1 << 20;

/// Starts a named background thread of the bookie.
pub(crate) fn spawn_thread(
    name: &str,
    f: impl FnOnce() + Send + 'static,
) -> error::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| BookieError::io(format!("starting thread {name}"), e))
}

pub use config::BookieConfig;
pub use error::BookieError;
pub use server::{run, Bookie, LocalBookie};
