//! Whether a client connection is still there. A client whose machine died or whose network
//! was cut leaves its connection open on the broker until the keep-alive gives up (60 s), and
//! its producers and exclusive consumers with it: the same application restarted elsewhere
//! would get `ProducerBusy` or `ConsumerBusy` all that time. So, as Pulsar does, before
//! answering either the broker PINGs the holder's connection; one that sends no PONG within
//! [`LIVENESS_TIMEOUT`] is closed, its producers and consumers leave their topics, and the new
//! one takes their place.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{Out, OutTx};

use crate::protocol::codec::base;
use crate::protocol::pb::base_command::Type;

/// How long a connection has to answer a liveness check (Pulsar's
/// `connectionLivenessCheckTimeoutMillis`).
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection's liveness: held by the connection and by the topics its producers and
/// consumers are on.
#[derive(Clone)]
pub struct Liveness(Arc<Inner>);

struct Inner {
    /// Weak: the connection's writer ends when the connection drops its senders, whoever
    /// still holds its liveness.
    out: tokio::sync::mpsc::WeakUnboundedSender<Out>,
    /// Checks waiting for the next PONG.
    waiting: Mutex<Vec<oneshot::Sender<()>>>,
    /// Cancelled by a failed check: the connection closes.
    kill: CancellationToken,
    /// Set when the connection starts leaving its topics.
    closing: AtomicBool,
    /// Cancelled once it has left them.
    gone: CancellationToken,
    /// Frames read, and times the connection stopped reading (to serve a command, or held
    /// back by back-pressure): a check that sees this move heard from the client, or could
    /// not have seen its PONG.
    heard: AtomicU64,
    /// The connection is not reading now: its PONG could not be seen; it is busy, not gone.
    busy: AtomicBool,
}

impl Liveness {
    /// The liveness of a connection whose outgoing queue is `out`.
    pub(crate) fn new(out: OutTx) -> Self {
        Liveness(Arc::new(Inner {
            out: out.downgrade(),
            waiting: Mutex::new(Vec::new()),
            kill: CancellationToken::new(),
            closing: AtomicBool::new(false),
            gone: CancellationToken::new(),
            heard: AtomicU64::new(0),
            busy: AtomicBool::new(false),
        }))
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Vec<oneshot::Sender<()>>> {
        self.0.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connection read a PONG.
    pub(crate) fn pong(&self) {
        for tx in self.waiting().drain(..) {
            let _ = tx.send(());
        }
    }

    /// The connection read a frame.
    pub(crate) fn heard(&self) {
        self.0.heard.fetch_add(1, Ordering::AcqRel);
    }

    /// The connection stops reading (`true`: it serves a command, or back-pressure holds it
    /// back) or reads again.
    pub(crate) fn busy(&self, busy: bool) {
        if busy {
            self.0.heard.fetch_add(1, Ordering::AcqRel);
        }
        self.0.busy.store(busy, Ordering::Release);
    }

    /// Resolves when a check found the client gone: the connection must close.
    pub(crate) fn killed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.0.kill.cancelled()
    }

    /// The connection starts leaving its topics.
    pub(crate) fn closing(&self) {
        self.0.closing.store(true, Ordering::Release);
    }

    /// The connection has told its topics it left (after [`Liveness::closing`]).
    pub(crate) fn closed(&self) {
        self.0.closing.store(true, Ordering::Release);
        self.waiting().clear();
        self.0.gone.cancel();
    }

    /// Whether the connection is leaving (or has left) its topics: a request it made must not
    /// register anything any more.
    pub fn is_closing(&self) -> bool {
        self.0.closing.load(Ordering::Acquire)
    }

    /// PINGs the client and waits up to `timeout` for its PONG. True if it answered, or the
    /// connection read anything else meanwhile, or stopped reading meanwhile (serving a
    /// command, or held back by back-pressure: its PONG could not be seen). If not, the
    /// connection is closed, and this returns false once it has left its topics.
    pub async fn check(&self, timeout: Duration) -> bool {
        if self.is_closing() {
            let _ = tokio::time::timeout(timeout, self.0.gone.cancelled()).await;
            return false;
        }
        let (tx, rx) = oneshot::channel();
        self.waiting().push(tx);
        let before = self.0.heard.load(Ordering::Acquire);
        let sent = self.0.out.upgrade().is_some_and(|out| out.send(Out::Cmd(base(Type::Ping))).is_ok());
        let answered = sent && matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())));
        // A waiter left by a check that timed out goes.
        self.waiting().retain(|tx| !tx.is_closed());
        let busy = self.0.heard.load(Ordering::Acquire) != before || self.0.busy.load(Ordering::Acquire);
        if answered || (sent && !self.is_closing() && busy) {
            return true;
        }
        if !self.is_closing() {
            tracing::info!("a client did not answer a liveness check within {timeout:?}; closing its connection");
        }
        self.0.kill.cancel();
        let _ = tokio::time::timeout(timeout, self.0.gone.cancelled()).await;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    #[tokio::test]
    async fn a_connection_that_answers_stays_and_one_that_does_not_is_closed() {
        // The connection holds its queue's sender; the liveness only a weak one.
        let (out, mut rx) = mpsc::unbounded_channel();
        let live = Liveness::new(out.clone());
        // The connection: answers the first PING, then goes quiet.
        let conn = live.clone();
        let peer = tokio::spawn(async move {
            let mut pings = 0;
            loop {
                tokio::select! {
                    Some(Out::Cmd(c)) = rx.recv() => {
                        assert_eq!(c.r#type, Type::Ping as i32);
                        pings += 1;
                        if pings == 1 {
                            conn.pong();
                        }
                    }
                    _ = conn.killed() => {
                        conn.closing();
                        conn.closed();
                        return pings;
                    }
                }
            }
        });
        assert!(live.check(Duration::from_millis(500)).await, "answered");
        assert!(!live.is_closing());
        assert!(!live.check(Duration::from_millis(200)).await, "no answer: gone");
        assert!(live.is_closing());
        assert_eq!(peer.await.expect("join"), 2);
        assert!(!live.check(Duration::from_millis(200)).await, "still gone");
        drop(out);
    }

    #[tokio::test]
    async fn a_connection_that_is_not_reading_or_reads_other_frames_counts_as_there() {
        let (out, _rx) = mpsc::unbounded_channel();
        let live = Liveness::new(out.clone());
        // Held back by back-pressure, or serving a command, the whole time.
        live.busy(true);
        assert!(live.check(Duration::from_millis(100)).await);
        live.busy(false);
        // Other frames read meanwhile.
        let reading = live.clone();
        let other = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            reading.heard();
        });
        assert!(live.check(Duration::from_millis(100)).await);
        other.await.expect("join");
        assert!(!live.is_closing());
        assert!(live.waiting().is_empty(), "no waiter left behind");
        drop(out);
    }
}
