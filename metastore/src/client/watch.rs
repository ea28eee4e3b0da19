//! A watch that survives node failures: it remembers the last revision it delivered and, when
//! its stream breaks, reopens it on another node from the next revision. Every event of a
//! revision arrives in one message, so nothing is missed or repeated.

use std::time::Duration;

use magnetar_proto::metastore as pb;
use tonic::Streaming;

use super::error::{classify, Disposition};
use super::{ClientError, MetaClient, Route};

/// Put or delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The key was created or changed.
    Put,
    /// The key was deleted.
    Delete,
}

/// One change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    /// Put or delete.
    pub kind: EventKind,
    /// Key.
    pub key: String,
    /// New value (empty for deletes).
    pub value: Vec<u8>,
    /// New version (for deletes: the deleting revision).
    pub version: u64,
    /// Session the key is (or was) bound to.
    pub session: u64,
}

/// Every matching change of one revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchBatch {
    /// Revision.
    pub revision: u64,
    /// Changes in order.
    pub events: Vec<WatchEvent>,
}

/// A resumable watch on a key prefix.
pub struct Watcher {
    client: MetaClient,
    prefix: String,
    /// Next revision owed; 0 until the first stream said where "now" is.
    next: u64,
    stream: Option<Streaming<pb::WatchResponse>>,
    endpoint: Option<String>,
}

impl Watcher {
    pub(crate) fn new(client: MetaClient, prefix: String, start_revision: u64) -> Self {
        Watcher { client, prefix, next: start_revision, stream: None, endpoint: None }
    }

    /// The node the watch is currently streaming from.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// The next revision this watcher will deliver.
    pub fn next_revision(&self) -> u64 {
        self.next
    }

    /// Opens the stream now (normally done by the first [`Self::next`]), so that a watch
    /// "from now" is anchored before the caller goes on.
    pub async fn start(&mut self) -> Result<(), ClientError> {
        let deadline = tokio::time::Instant::now() + self.client.options().request_timeout;
        let mut backoff = Duration::from_millis(20);
        while self.stream.is_none() {
            match self.open().await {
                Ok(()) => {}
                Err(e @ ClientError::Compacted { .. }) | Err(e @ ClientError::BadEndpoint { .. }) => return Err(e),
                Err(e) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
        Ok(())
    }

    async fn open(&mut self) -> Result<(), ClientError> {
        let target = self.client.pick(Route::Any);
        let mut rpc = self.client.rpc(&target)?;
        let start_revision = match self.next {
            // "From now": after everything this client has seen, even on a lagging node.
            0 => match self.client.seen_revision() {
                0 => 0,
                seen => seen + 1,
            },
            next => next,
        };
        let req = pb::WatchRequest { prefix: self.prefix.clone(), start_revision };
        let attempt = self.client.options().attempt_timeout;
        let unavailable = |last: String| ClientError::Unavailable { attempts: 1, last };
        let mut stream = match tokio::time::timeout(attempt, rpc.watch(req)).await {
            Err(_) => return Err(unavailable(format!("{target} did not answer"))),
            Ok(Err(status)) => {
                return Err(match classify(status, &self.prefix, 0) {
                    Disposition::Fail(e) => e,
                    _ => unavailable(format!("{target} cannot serve the watch")),
                })
            }
            Ok(Ok(s)) => s.into_inner(),
        };
        // The first message anchors the stream: it starts after `header.revision`.
        match tokio::time::timeout(attempt, stream.message()).await {
            Ok(Ok(Some(h))) if h.events.is_empty() => {
                self.next = h.revision + 1;
                self.stream = Some(stream);
                self.endpoint = Some(target);
                Ok(())
            }
            Ok(Err(status)) => Err(match classify(status, &self.prefix, 0) {
                Disposition::Fail(e) => e,
                _ => unavailable(format!("{target} broke the watch")),
            }),
            _ => Err(unavailable(format!("{target} sent no watch header"))),
        }
    }

    /// The next batch of changes. Reconnects (to any node) as needed; fails only when the
    /// history it needs was compacted or no node answered for the request timeout.
    pub async fn next(&mut self) -> Result<WatchBatch, ClientError> {
        let mut backoff = Duration::from_millis(20);
        loop {
            self.start().await?;
            let Some(stream) = self.stream.as_mut() else { continue };
            match stream.message().await {
                Ok(Some(msg)) => {
                    if msg.events.is_empty() || msg.revision < self.next {
                        continue;
                    }
                    self.next = msg.revision + 1;
                    return Ok(WatchBatch {
                        revision: msg.revision,
                        events: msg.events.into_iter().map(from_wire).collect(),
                    });
                }
                // The node went away: resume elsewhere.
                Ok(None) => {}
                Err(status) => {
                    if let Disposition::Fail(
                        e @ (ClientError::Compacted { .. } | ClientError::InvalidArgument { .. }),
                    ) = classify(status, &self.prefix, 0)
                    {
                        return Err(e);
                    }
                }
            }
            tracing::debug!(endpoint = ?self.endpoint, next = self.next, "watch stream broke; resuming elsewhere");
            self.stream = None;
            self.endpoint = None;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }
}

fn from_wire(e: pb::WatchEvent) -> WatchEvent {
    let kind = if e.kind == pb::watch_event::Kind::Delete as i32 { EventKind::Delete } else { EventKind::Put };
    let kv = e.kv.unwrap_or_default();
    WatchEvent { kind, key: kv.key, value: kv.value, version: kv.version, session: kv.session_id }
}
