//! Watch streams: replay the stored history from the requested revision, then follow live
//! batches. A watcher that falls behind the broadcast buffer (or sees the state replaced by a
//! snapshot) re-reads the history from the next revision it owes, so it never misses or
//! repeats an event.

use std::sync::Arc;

use magnetar_proto::metastore as pb;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::error::MetaError;
use crate::store::sm::{Notify, SmShared};
use crate::types::EventBatch;

pub(crate) type WatchItem = Result<pb::WatchResponse, tonic::Status>;

/// Starts a watch task; the receiver ends when the client goes away or the node stops.
pub(crate) fn start(
    sm: Arc<SmShared>,
    prefix: String,
    start_revision: u64,
    cancel: CancellationToken,
) -> Result<mpsc::Receiver<WatchItem>, MetaError> {
    let mut rx = sm.subscribe();
    let current = sm.revision();
    let start = if start_revision == 0 { current + 1 } else { start_revision };
    check_floor(&sm, start)?;
    let (tx, out) = mpsc::channel::<WatchItem>(64);
    tokio::spawn(async move {
        // The header tells the client which revision the stream starts after.
        let header = pb::WatchResponse { revision: start - 1, events: vec![] };
        if tx.send(Ok(header)).await.is_err() {
            return;
        }
        let mut next = start;
        if let Err(e) = replay(&sm, &prefix, &mut next, current, &tx).await {
            let _ = tx.send(Err(e.into())).await;
            return;
        }
        loop {
            let notice = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tx.closed() => return,
                n = rx.recv() => n,
            };
            let res = match notice {
                Ok(Notify::Batch(b)) => {
                    if b.revision < next {
                        continue;
                    }
                    if b.revision > next {
                        // Revisions in between had nothing for anyone, or were lost to lag
                        // handling; the history says which.
                        replay(&sm, &prefix, &mut next, b.revision - 1, &tx).await
                    } else {
                        Ok(())
                    }
                    .map(|()| Some(b))
                }
                Err(broadcast::error::RecvError::Lagged(_)) | Ok(Notify::Reset) => {
                    let upto = sm.revision();
                    replay(&sm, &prefix, &mut next, upto, &tx).await.map(|()| None)
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            match res {
                Ok(Some(b)) => {
                    if b.revision >= next {
                        next = b.revision + 1;
                        if let Some(msg) = to_wire(&b, &prefix) {
                            if tx.send(Ok(msg)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            }
        }
    });
    Ok(out)
}

fn check_floor(sm: &SmShared, start: u64) -> Result<(), MetaError> {
    let floor = sm.event_floor();
    if start < floor {
        return Err(MetaError::Compacted { requested: start, oldest: floor });
    }
    Ok(())
}

async fn replay(
    sm: &Arc<SmShared>,
    prefix: &str,
    next: &mut u64,
    upto: u64,
    tx: &mpsc::Sender<WatchItem>,
) -> Result<(), MetaError> {
    if upto < *next {
        return Ok(());
    }
    check_floor(sm, *next)?;
    let (from, p, s) = (*next, prefix.to_owned(), sm.clone());
    let batches = tokio::task::spawn_blocking(move || s.events_between(from, upto, &p))
        .await
        .map_err(|_| MetaError::ShuttingDown)??;
    // Pruning may have landed while we read: then what we read may be short.
    check_floor(sm, from)?;
    for b in batches {
        if let Some(msg) = to_wire(&b, prefix) {
            if tx.send(Ok(msg)).await.is_err() {
                return Err(MetaError::ShuttingDown);
            }
        }
    }
    *next = upto + 1;
    Ok(())
}

fn to_wire(b: &EventBatch, prefix: &str) -> Option<pb::WatchResponse> {
    let events: Vec<pb::WatchEvent> = b
        .events
        .iter()
        .filter(|e| e.key.starts_with(prefix))
        .map(|e| match &e.value {
            Some(v) => pb::WatchEvent {
                kind: pb::watch_event::Kind::Put as i32,
                kv: Some(crate::server::service::kv_to_wire(&e.key, v)),
            },
            None => pb::WatchEvent {
                kind: pb::watch_event::Kind::Delete as i32,
                kv: Some(pb::KeyValue {
                    key: e.key.clone(),
                    value: Vec::new(),
                    version: b.revision,
                    create_revision: 0,
                    session_id: e.session,
                }),
            },
        })
        .collect();
    (!events.is_empty()).then_some(pb::WatchResponse { revision: b.revision, events })
}
