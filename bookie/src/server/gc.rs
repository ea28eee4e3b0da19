//! Garbage collection of deleted ledgers: a ledger stored here whose metadata is gone from the
//! metastore was deleted, and its entries can go.
//!
//! Safe because ledger metadata is created before any entry is written: a ledger the bookie
//! holds always had metadata, so its absence means deletion. The local listing is taken before
//! the metastore's, so a ledger created between the two is never mistaken for a deleted one.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use magnetar_metastore::client::MetaClient;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Core;

pub use crate::client::metadata::LEDGERS_PREFIX;

pub(crate) fn start(
    tasks: &TaskTracker,
    cancel: CancellationToken,
    meta: MetaClient,
    core: Arc<Core>,
    every: Duration,
) {
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            match collect(&meta, &core).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "garbage-collected deleted ledgers"),
                Err(e) => tracing::warn!(error = %e, "ledger garbage collection failed"),
            }
        }
    });
}

async fn collect(meta: &MetaClient, core: &Arc<Core>) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
    let c = core.clone();
    let local = tokio::task::spawn_blocking(move || c.ledgers.ledgers()).await??;
    if local.is_empty() {
        return Ok(0);
    }
    let live: HashSet<u64> = meta
        .list(LEDGERS_PREFIX)
        .await?
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(LEDGERS_PREFIX)?.parse().ok())
        .collect();
    let dead: Vec<u64> = local.into_iter().filter(|l| !live.contains(l)).collect();
    let n = dead.len();
    let c = core.clone();
    tokio::task::spawn_blocking(move || -> crate::error::Result<()> {
        for l in dead {
            c.ledgers.delete(l)?;
        }
        Ok(())
    })
    .await??;
    Ok(n)
}
