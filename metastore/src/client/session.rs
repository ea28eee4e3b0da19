//! A self-renewing session handle.
//!
//! A background task streams keep-alives to the leader every third of the TTL, following
//! leader changes. The session is reported lost when the leader says it no longer exists, or
//! when no keep-alive has been acknowledged for a whole TTL (the leader may have expired it, so
//! the owner must stop relying on its ephemeral keys).

use std::time::Duration;

use futures::StreamExt;
use magnetar_proto::metastore as pb;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::error::{classify, Disposition};
use super::{ClientError, MetaClient, Route};

/// An open session. Dropping it stops the keep-alives (the leader then expires it after its
/// TTL); [`Session::close`] ends it at once.
pub struct Session {
    id: u64,
    ttl: Duration,
    client: MetaClient,
    lost: watch::Receiver<bool>,
    cancel: CancellationToken,
}

impl Session {
    pub(crate) fn start(client: MetaClient, id: u64, ttl: Duration) -> Self {
        let (lost_tx, lost) = watch::channel(false);
        let cancel = CancellationToken::new();
        tokio::spawn(keep_alive(client.clone(), id, ttl, lost_tx, cancel.clone()));
        Session { id, ttl, client, lost, cancel }
    }

    /// The session id (bind ephemeral keys to it).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The TTL the leader granted.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Whether the session is known to be lost.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Resolves when the session is lost.
    pub async fn lost(&self) {
        let mut rx = self.lost.clone();
        // An error means the keep-alive task ended, which it only does once lost or closed.
        let _ = rx.wait_for(|l| *l).await;
    }

    /// Closes the session; its ephemeral keys are deleted.
    pub async fn close(self) -> Result<(), ClientError> {
        self.cancel.cancel();
        self.client.close_session(self.id).await
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn keep_alive(client: MetaClient, id: u64, ttl: Duration, lost: watch::Sender<bool>, cancel: CancellationToken) {
    let interval = (ttl / 3).max(Duration::from_millis(50));
    let mut last_ack = Instant::now();
    let mut backoff = Duration::from_millis(20);
    loop {
        if cancel.is_cancelled() {
            return;
        }
        if last_ack.elapsed() >= ttl {
            tracing::warn!(session = id, "no keep-alive acknowledged for a whole TTL; session lost");
            let _ = lost.send(true);
            return;
        }
        let target = client.pick(Route::Leader);
        let acked_before = last_ack;
        match stream_once(&client, &target, id, (interval, ttl), &mut last_ack, &cancel).await {
            StreamEnd::Cancelled => return,
            StreamEnd::Gone => {
                tracing::warn!(session = id, "the leader no longer knows this session; session lost");
                let _ = lost.send(true);
                return;
            }
            // Told where the leader is: go there at once.
            StreamEnd::Redirected => {}
            StreamEnd::Broken => {
                if last_ack != acked_before {
                    backoff = Duration::from_millis(20);
                }
                // Short pauses: a failover must be found well within the TTL.
                let left = ttl.saturating_sub(last_ack.elapsed());
                tokio::time::sleep(backoff.min(left)).await;
                backoff = (backoff * 2).min(Duration::from_millis(200));
            }
        }
    }
}

enum StreamEnd {
    Cancelled,
    Gone,
    Redirected,
    Broken,
}

/// One keep-alive stream to `target`, until it breaks. No wait in it outlasts the lease
/// (`last_ack` + `ttl`): once that has run out the caller reports the session lost, even if an
/// answer to an older keep-alive arrives later.
async fn stream_once(
    client: &MetaClient,
    target: &str,
    id: u64,
    (interval, ttl): (Duration, Duration),
    last_ack: &mut Instant,
    cancel: &CancellationToken,
) -> StreamEnd {
    let Ok(mut rpc) = client.rpc(target) else {
        return StreamEnd::Broken;
    };
    let (tx, rx) = mpsc::channel::<pb::KeepAliveRequest>(4);
    // The leader's deadline starts when it handles a keep-alive, after we sent it: counting
    // from the send keeps our view of the lease no longer than the leader's.
    let mut sent_at = Instant::now();
    if tx.send(pb::KeepAliveRequest { session_id: id }).await.is_err() {
        return StreamEnd::Broken;
    }
    let left = |last_ack: &Instant| ttl.saturating_sub(last_ack.elapsed());
    let opened = tokio::time::timeout(
        client.options().attempt_timeout.min(left(last_ack)),
        rpc.session_keep_alive(ReceiverStream::new(rx)),
    )
    .await;
    let mut inbound = match opened {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(status)) => return on_status(client, status, target),
        Err(_) => {
            client.set_leader(None);
            return StreamEnd::Broken;
        }
    };
    loop {
        let reply = tokio::select! {
            _ = cancel.cancelled() => return StreamEnd::Cancelled,
            r = tokio::time::timeout(interval.min(left(last_ack)), inbound.next()) => r,
        };
        match reply {
            // The lease ran out before this answer came (a stalled process, a slow network):
            // lost, whatever the leader says now.
            Ok(Some(Ok(_))) if left(last_ack).is_zero() => return StreamEnd::Broken,
            Ok(Some(Ok(_))) => {
                *last_ack = sent_at;
                client.set_leader(Some(target.to_owned()));
            }
            Ok(Some(Err(status))) => return on_status(client, status, target),
            Ok(None) | Err(_) => {
                client.set_leader(None);
                return StreamEnd::Broken;
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return StreamEnd::Cancelled,
            _ = tokio::time::sleep(interval) => {}
        }
        sent_at = Instant::now();
        if tx.send(pb::KeepAliveRequest { session_id: id }).await.is_err() {
            return StreamEnd::Broken;
        }
    }
}

fn on_status(client: &MetaClient, status: tonic::Status, target: &str) -> StreamEnd {
    match classify(status, "", 0) {
        Disposition::Fail(ClientError::NoSuchSession(_)) => StreamEnd::Gone,
        Disposition::Redirect(Some(hint)) if hint != target => {
            client.set_leader(Some(hint));
            StreamEnd::Redirected
        }
        _ => {
            client.set_leader(None);
            StreamEnd::Broken
        }
    }
}
