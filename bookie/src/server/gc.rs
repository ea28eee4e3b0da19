//! Garbage collection of deleted ledgers: a ledger stored here whose metadata is gone from the
//! metastore was deleted, and its entries can go.
//!
//! Safe because ledger metadata is created before any entry is written: a ledger the bookie
//! holds always had metadata, so its absence means deletion. The local listing is taken before
//! the metastore's, so a ledger created between the two is never mistaken for a deleted one,
//! and every ledger found missing is read again by its own key before it is deleted.

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
    // Each one is looked up again on its own before it goes: a listing that missed a key
    // (a paging bug, a lagging read) must not delete a live ledger's only copy here.
    let mut dead = Vec::new();
    for l in local.into_iter().filter(|l| !live.contains(l)) {
        if meta.get(&crate::client::metadata::ledger_key(l)).await?.is_some() {
            tracing::warn!(ledger = l, "the metastore's listing missed a ledger that exists; kept");
            continue;
        }
        dead.push(l);
    }
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
