//! Registration in the metastore and disk monitoring.
//!
//! The bookie holds a session and an ephemeral key `/bookies/available/<id>` bound to it, whose
//! value says where to reach it and whether it is read-only. Ledger clients pick ensembles from
//! the writable ones. If the session is lost (a long pause, a partition), a new one is opened
//! and the key written again. Disk usage of every data directory is checked periodically: past
//! `disk_usage_threshold` the bookie refuses new adds (recovery adds still pass) and says so in
//! its registration; below `disk_usage_lwm_threshold` it becomes writable again.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use magnetar_metastore::client::{MetaClient, PutOptions, Session};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Core;
use crate::config::BookieConfig;
use crate::error::Result;

/// Prefix of the registrations.
pub const AVAILABLE_PREFIX: &str = "/bookies/available/";

/// Registration key of a bookie.
pub fn available_key(bookie_id: &str) -> String {
    format!("{AVAILABLE_PREFIX}{bookie_id}")
}

/// What a bookie registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BookieInfo {
    /// gRPC address.
    pub address: String,
    /// HTTP address (metrics, probes), empty when off.
    pub http_address: String,
    /// Refusing new adds.
    pub read_only: bool,
    /// The cookie's instance id.
    pub instance_id: String,
}

/// Fraction of the fullest directory's file system in use. `reusable` bytes that the entry
/// store keeps for reuse (on the ledger directory's file system, the last of `dirs`) count as
/// free.
fn disk_usage(dirs: &[PathBuf], reusable: u64) -> f64 {
    let stats: Vec<_> = dirs.iter().filter_map(|d| rustix::fs::statvfs(d).ok()).collect();
    let ledger_fs = dirs.last().and_then(|d| rustix::fs::statvfs(d).ok()).map(|s| s.f_fsid);
    stats
        .iter()
        .map(|s| {
            let extra = if Some(s.f_fsid) == ledger_fs && s.f_frsize > 0 { reusable / s.f_frsize } else { 0 };
            let free = s.f_bavail.saturating_add(extra).min(s.f_blocks);
            if s.f_blocks == 0 {
                0.0
            } else {
                1.0 - free as f64 / s.f_blocks as f64
            }
        })
        .fold(0.0, f64::max)
}

async fn register(meta: &MetaClient, session: &Session, key: &str, info: &BookieInfo) -> Result<()> {
    let body = serde_json::to_vec(info)
        .map_err(|e| crate::error::BookieError::io("encoding registration", std::io::Error::other(e)))?;
    meta.put(key, body, PutOptions { expected_version: None, session: session.id() }).await?;
    Ok(())
}

/// Registers (failing start-up if the metastore refuses) and keeps the registration current.
pub(crate) async fn start(
    tasks: &TaskTracker,
    cancel: CancellationToken,
    meta: MetaClient,
    core: Arc<Core>,
    mut info: BookieInfo,
    dirs: Vec<PathBuf>,
    cfg: &BookieConfig,
) -> Result<()> {
    let ttl = Duration::from_millis(cfg.session_ttl_ms);
    let (high, low) = (cfg.disk_usage_threshold, cfg.disk_usage_lwm_threshold);
    let check_every = Duration::from_millis(cfg.disk_check_interval_ms.max(100));
    let key = available_key(&core.bookie_id);
    let usage = disk_usage(&dirs, core.ledgers.storage.reusable_bytes());
    if usage >= high {
        tracing::warn!(usage, threshold = high, "disk usage over the threshold: starting read-only");
        core.read_only.store(true, Ordering::Relaxed);
        info.read_only = true;
    }
    let mut session = meta.session(ttl).await?;
    register(&meta, &session, &key, &info).await?;
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = session.lost() => {
                    tracing::warn!("metastore session lost; registering again");
                    loop {
                        match meta.session(ttl).await {
                            Ok(s) => {
                                session = s;
                                match register(&meta, &session, &key, &info).await {
                                    Ok(()) => break,
                                    Err(e) => tracing::warn!(error = %e, "registering failed"),
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "opening a metastore session failed"),
                        }
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                    }
                }
                _ = tokio::time::sleep(check_every) => {
                    let usage = disk_usage(&dirs, core.ledgers.storage.reusable_bytes());
                    let ro = core.is_read_only();
                    let now_ro = if ro { usage >= low } else { usage >= high };
                    if now_ro != ro {
                        core.read_only.store(now_ro, Ordering::Relaxed);
                        info.read_only = now_ro;
                        tracing::warn!(usage, read_only = now_ro, "disk usage crossed a threshold");
                        if let Err(e) = register(&meta, &session, &key, &info).await {
                            tracing::warn!(error = %e, "updating the registration failed");
                        }
                    }
                }
            }
        }
        // Leaving: drop the registration at once instead of waiting out the TTL.
        if let Err(e) = session.close().await {
            tracing::debug!(error = %e, "closing the metastore session");
        }
    });
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Bytes kept for reuse count as free on the ledger directory's file system only.
    #[test]
    fn reusable_bytes_count_as_free() {
        let d = tempfile::tempdir().unwrap();
        let dirs = vec![d.path().to_path_buf(), d.path().to_path_buf()];
        let used = disk_usage(&dirs, 0);
        assert!(used > 0.0 && used < 1.0, "{used}");
        let s = rustix::fs::statvfs(d.path()).unwrap();
        let used_bytes = (s.f_blocks - s.f_bavail) * s.f_frsize;
        assert_eq!(disk_usage(&dirs, used_bytes), 0.0, "everything used is reusable");
        assert_eq!(disk_usage(&dirs, u64::MAX), 0.0);
        let half = disk_usage(&dirs, used_bytes / 2);
        assert!(half < used && half > 0.0, "{half} against {used}");
    }
}
