//! The metastore client library used by brokers, bookies and the CLI.
//!
//! It keeps one lazily connected gRPC channel per endpoint, sends writes and linearizable reads
//! to the leader (learning it from NotLeader hints), and retries with jittered exponential
//! backoff across leader changes until the request deadline. Every write carries a
//! `(client_id, seq)` request id that the same retry reuses, so the state machine applies it at
//! most once even when an answer was lost. [`Session`] keeps itself alive and reports loss;
//! [`Watcher`] resumes on another node from its last revision.

mod error;
mod session;
mod watch;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use magnetar_proto::metastore as pb;
use magnetar_proto::metastore::metastore_client::MetastoreClient;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

pub use error::ClientError;
use error::{classify, Disposition};
pub use session::Session;
pub use watch::{EventKind, WatchBatch, WatchEvent, Watcher};

/// How long one membership-change attempt may take (the server waits up to 120 s for a
/// learner to catch up).
const MEMBERSHIP_WAIT: Duration = Duration::from_secs(130);

/// Client tuning.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Total time one call may take, retries included.
    pub request_timeout: Duration,
    /// Time one attempt may take.
    pub attempt_timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            request_timeout: Duration::from_secs(15),
            attempt_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_millis(500),
        }
    }
}

/// A key with its value and versions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    /// Key.
    pub key: String,
    /// Value.
    pub value: Vec<u8>,
    /// Revision of the last change.
    pub version: u64,
    /// Revision that created the key.
    pub create_revision: u64,
    /// Session the key is bound to (0 = persistent).
    pub session: u64,
}

impl From<pb::KeyValue> for Kv {
    fn from(k: pb::KeyValue) -> Self {
        Kv { key: k.key, value: k.value, version: k.version, create_revision: k.create_revision, session: k.session_id }
    }
}

/// Preconditions and binding of a put.
#[derive(Clone, Copy, Debug, Default)]
pub struct PutOptions {
    /// `Some(0)`: must not exist; `Some(v)`: version must be `v`.
    pub expected_version: Option<u64>,
    /// Bind to this session (ephemeral key); 0 = persistent.
    pub session: u64,
}

/// One page of a range.
#[derive(Clone, Debug)]
pub struct RangePage {
    /// Keys in order.
    pub kvs: Vec<Kv>,
    /// More keys follow the last one.
    pub more: bool,
    /// Revision the page was read at.
    pub revision: u64,
}

/// A transaction: compares, then ops applied all or none.
#[derive(Clone, Debug, Default)]
pub struct Txn {
    compares: Vec<pb::Compare>,
    ops: Vec<pb::TxnOp>,
}

impl Txn {
    /// Requires `key` to be at `version` (0: absent).
    pub fn compare(mut self, key: impl Into<String>, version: u64) -> Self {
        self.compares.push(pb::Compare { key: key.into(), expected_version: version });
        self
    }

    /// Puts `key` (bound to `session` unless 0).
    pub fn put(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>, session: u64) -> Self {
        self.ops.push(pb::TxnOp {
            op: Some(pb::txn_op::Op::Put(pb::PutOp { key: key.into(), value: value.into(), session_id: session })),
        });
        self
    }

    /// Deletes `key` if present.
    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.ops.push(pb::TxnOp { op: Some(pb::txn_op::Op::Delete(pb::DeleteOp { key: key.into() })) });
        self
    }
}

/// The outcome of a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnResult {
    /// Every compare held and the ops were applied.
    pub succeeded: bool,
    /// Index of the first failed compare.
    pub failed_compare: u32,
    /// Version that compare found (0 = absent).
    pub actual_version: u64,
    /// Revision of the transaction.
    pub revision: u64,
}

/// Where an attempt goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// The leader (writes, linearizable reads, sessions).
    Leader,
    /// Any node (stale reads, watches).
    Any,
}

struct Inner {
    endpoints: Vec<String>,
    channels: Mutex<HashMap<String, Channel>>,
    leader: Mutex<Option<String>>,
    rotate: AtomicUsize,
    client_id: u64,
    seq: AtomicU64,
    /// Highest revision any answer has shown this client: "now" for a new watch, so a watch
    /// served by a lagging follower never replays what this client already saw happen.
    seen: AtomicU64,
    opts: ClientOptions,
}

/// A handle to a metastore cluster. Cheap to clone.
#[derive(Clone)]
pub struct MetaClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MetaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaClient").field("endpoints", &self.inner.endpoints).finish()
    }
}

fn strip_scheme(e: &str) -> &str {
    e.trim().trim_start_matches("http://")
}

impl MetaClient {
    /// A client for the cluster reachable at `endpoints` (`host:port`, any subset of nodes).
    /// Connections are made lazily.
    pub fn new(endpoints: &[String], opts: ClientOptions) -> Result<Self, ClientError> {
        let endpoints: Vec<String> = endpoints
            .iter()
            .flat_map(|e| e.split(','))
            .map(strip_scheme)
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect();
        if endpoints.is_empty() {
            return Err(ClientError::BadEndpoint { endpoint: String::new(), reason: "no endpoints given".into() });
        }
        let client = MetaClient {
            inner: Arc::new(Inner {
                endpoints,
                channels: Mutex::new(HashMap::new()),
                leader: Mutex::new(None),
                rotate: AtomicUsize::new(0),
                client_id: rand::random::<u64>() | 1,
                seq: AtomicU64::new(0),
                seen: AtomicU64::new(0),
                opts,
            }),
        };
        for e in client.inner.endpoints.clone() {
            client.channel(&e)?;
        }
        Ok(client)
    }

    /// A client with default options.
    pub fn connect(endpoints: &[String]) -> Result<Self, ClientError> {
        Self::new(endpoints, ClientOptions::default())
    }

    /// The configured endpoints.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    pub(crate) fn options(&self) -> &ClientOptions {
        &self.inner.opts
    }

    pub(crate) fn channel(&self, endpoint: &str) -> Result<Channel, ClientError> {
        let mut map = self.inner.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(endpoint) {
            return Ok(c.clone());
        }
        let ch = Endpoint::from_shared(format!("http://{endpoint}"))
            .map_err(|e| ClientError::BadEndpoint { endpoint: endpoint.to_owned(), reason: e.to_string() })?
            .connect_timeout(self.inner.opts.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        map.insert(endpoint.to_owned(), ch.clone());
        Ok(ch)
    }

    pub(crate) fn rpc(&self, endpoint: &str) -> Result<MetastoreClient<Channel>, ClientError> {
        Ok(MetastoreClient::new(self.channel(endpoint)?).max_decoding_message_size(256 << 20))
    }

    /// The next endpoint to try for a route.
    pub(crate) fn pick(&self, route: Route) -> String {
        if route == Route::Leader {
            if let Some(l) = self.inner.leader.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                return l;
            }
        }
        let i = self.inner.rotate.fetch_add(1, Ordering::Relaxed);
        self.inner.endpoints[i % self.inner.endpoints.len()].clone()
    }

    pub(crate) fn set_leader(&self, leader: Option<String>) {
        *self.inner.leader.lock().unwrap_or_else(|p| p.into_inner()) = leader;
    }

    fn observe(&self, header: Option<&pb::ResponseHeader>) {
        if let Some(h) = header {
            self.inner.seen.fetch_max(h.revision, Ordering::Relaxed);
        }
    }

    /// The highest revision this client has seen in any answer (0: none yet).
    pub fn seen_revision(&self) -> u64 {
        self.inner.seen.load(Ordering::Relaxed)
    }

    fn request_id(&self) -> Option<pb::RequestId> {
        Some(pb::RequestId { client_id: self.inner.client_id, seq: self.inner.seq.fetch_add(1, Ordering::Relaxed) })
    }

    /// Runs `f` against the routed node until it answers, retrying across leader changes.
    /// `key`/`expected` only label a BadVersion error.
    pub(crate) async fn call<T, F, Fut>(&self, route: Route, key: &str, expected: u64, f: F) -> Result<T, ClientError>
    where
        F: Fn(MetastoreClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let o = &self.inner.opts;
        self.call_timed(route, key, expected, o.attempt_timeout, o.request_timeout, f).await
    }

    /// [`Self::call`] with explicit per-attempt and total timeouts (membership changes wait
    /// for a learner to catch up, far longer than an ordinary request).
    async fn call_timed<T, F, Fut>(
        &self,
        route: Route,
        key: &str,
        expected: u64,
        attempt_timeout: Duration,
        request_timeout: Duration,
        f: F,
    ) -> Result<T, ClientError>
    where
        F: Fn(MetastoreClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Instant::now() + request_timeout;
        let mut backoff = Duration::from_millis(20);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let target = self.pick(route);
            let last = match tokio::time::timeout(attempt_timeout, f(self.rpc(&target)?)).await {
                Ok(Ok(resp)) => {
                    if route == Route::Leader {
                        self.set_leader(Some(target));
                    }
                    return Ok(resp.into_inner());
                }
                Ok(Err(status)) => {
                    let msg = status.to_string();
                    match classify(status, key, expected) {
                        Disposition::Fail(e) => return Err(e),
                        Disposition::Redirect(Some(hint)) if hint != target && Instant::now() < deadline => {
                            // Straight to the named leader, without a pause.
                            self.set_leader(Some(hint));
                            continue;
                        }
                        Disposition::Redirect(_) | Disposition::Retry => {
                            self.set_leader(None);
                            msg
                        }
                    }
                }
                Err(_) => {
                    self.set_leader(None);
                    format!("attempt timed out after {attempt_timeout:?} at {target}")
                }
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Unavailable { attempts, last });
            }
            let jitter = Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1));
            tokio::time::sleep((backoff + jitter).min(deadline - now)).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Reads a key (linearizable).
    pub async fn get(&self, key: &str) -> Result<Option<Kv>, ClientError> {
        self.get_with(key, false).await
    }

    /// Reads a key; `stale` lets any node answer from its applied state.
    pub async fn get_with(&self, key: &str, stale: bool) -> Result<Option<Kv>, ClientError> {
        let route = if stale { Route::Any } else { Route::Leader };
        let r = self
            .call(route, key, 0, |mut c| {
                let req = pb::GetRequest { key: key.to_owned(), stale };
                async move { c.get(req).await }
            })
            .await?;
        self.observe(r.header.as_ref());
        Ok(r.kv.map(Kv::from))
    }

    /// Writes a key; returns its new version.
    pub async fn put(&self, key: &str, value: impl Into<Vec<u8>>, opts: PutOptions) -> Result<u64, ClientError> {
        let value = value.into();
        let request_id = self.request_id();
        let r = self
            .call(Route::Leader, key, opts.expected_version.unwrap_or(0), |mut c| {
                let req = pb::PutRequest {
                    key: key.to_owned(),
                    value: value.clone(),
                    expected_version: opts.expected_version,
                    session_id: opts.session,
                    request_id,
                };
                async move { c.put(req).await }
            })
            .await?;
        self.observe(r.header.as_ref());
        Ok(r.version)
    }

    /// Deletes a key (at `expected_version` if given); `false` if there was nothing to delete.
    pub async fn delete(&self, key: &str, expected_version: Option<u64>) -> Result<bool, ClientError> {
        let request_id = self.request_id();
        let r = self
            .call(Route::Leader, key, expected_version.unwrap_or(0), |mut c| {
                let req = pb::DeleteRequest { key: key.to_owned(), expected_version, request_id };
                async move { c.delete(req).await }
            })
            .await?;
        self.observe(r.header.as_ref());
        Ok(r.deleted)
    }

    /// One page of keys under `prefix` after `start_after`.
    pub async fn range(
        &self,
        prefix: &str,
        start_after: &str,
        limit: u32,
        stale: bool,
    ) -> Result<RangePage, ClientError> {
        let route = if stale { Route::Any } else { Route::Leader };
        let r = self
            .call(route, prefix, 0, |mut c| {
                let req = pb::RangeRequest {
                    prefix: prefix.to_owned(),
                    start_after: start_after.to_owned(),
                    limit,
                    stale,
                    keys_only: false,
                };
                async move { c.range(req).await }
            })
            .await?;
        self.observe(r.header.as_ref());
        Ok(RangePage {
            kvs: r.kvs.into_iter().map(Kv::from).collect(),
            more: r.more,
            revision: r.header.map(|h| h.revision).unwrap_or(0),
        })
    }

    /// Every key under `prefix`, following pages.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Kv>, ClientError> {
        self.list_with(prefix, false).await
    }

    /// Every key under `prefix`, following pages; `stale`: from any node, possibly behind the
    /// leader (and each page read at its own revision).
    pub async fn list_with(&self, prefix: &str, stale: bool) -> Result<Vec<Kv>, ClientError> {
        let mut out: Vec<Kv> = Vec::new();
        loop {
            let after = out.last().map(|k| k.key.clone()).unwrap_or_default();
            let page = self.range(prefix, &after, 0, stale).await?;
            out.extend(page.kvs);
            if !page.more {
                return Ok(out);
            }
        }
    }

    /// Runs a transaction.
    pub async fn txn(&self, txn: Txn) -> Result<TxnResult, ClientError> {
        let request_id = self.request_id();
        let r = self
            .call(Route::Leader, "", 0, |mut c| {
                let req = pb::TxnRequest { compares: txn.compares.clone(), ops: txn.ops.clone(), request_id };
                async move { c.txn(req).await }
            })
            .await?;
        self.observe(r.header.as_ref());
        Ok(TxnResult {
            succeeded: r.succeeded,
            failed_compare: r.failed_compare,
            actual_version: r.actual_version,
            revision: r.header.map(|h| h.revision).unwrap_or(0),
        })
    }

    /// Allocates the next id of sequence `name` (0, 1, 2, … cluster-wide).
    pub async fn next_id(&self, name: &str) -> Result<u64, ClientError> {
        let request_id = self.request_id();
        let r = self
            .call(Route::Leader, name, 0, |mut c| {
                let req = pb::NextIdRequest { name: name.to_owned(), request_id };
                async move { c.next_id(req).await }
            })
            .await?;
        self.observe(r.header.as_ref());
        Ok(r.id)
    }

    /// Watches keys under `prefix` from `start_revision` (0: from now, which is never earlier
    /// than anything this client has already seen).
    pub fn watch(&self, prefix: &str, start_revision: u64) -> Watcher {
        Watcher::new(self.clone(), prefix.to_owned(), start_revision)
    }

    /// Opens a session with `ttl` that keeps itself alive until closed or lost.
    pub async fn session(&self, ttl: Duration) -> Result<Session, ClientError> {
        let request_id = self.request_id();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let r = self
            .call(Route::Leader, "", 0, |mut c| {
                let req = pb::SessionCreateRequest { ttl_ms, request_id };
                async move { c.session_create(req).await }
            })
            .await?;
        Ok(Session::start(self.clone(), r.session_id, Duration::from_millis(r.ttl_ms)))
    }

    /// Closes a session by id (its owner is told it was lost).
    pub async fn close_session(&self, id: u64) -> Result<(), ClientError> {
        self.call(Route::Leader, "", 0, |mut c| async move {
            c.session_close(pb::SessionCloseRequest { session_id: id }).await
        })
        .await
        .map(|_| ())
    }

    /// Cluster status as seen by one node (`endpoint`), or by any node when `None`.
    pub async fn cluster_status(&self, endpoint: Option<&str>) -> Result<pb::ClusterStatusResponse, ClientError> {
        match endpoint {
            Some(e) => {
                let mut c = self.rpc(strip_scheme(e))?;
                tokio::time::timeout(self.inner.opts.attempt_timeout, c.cluster_status(pb::ClusterStatusRequest {}))
                    .await
                    .map_err(|_| ClientError::Unavailable { attempts: 1, last: format!("{e} did not answer") })?
                    .map(|r| r.into_inner())
                    .map_err(|status| ClientError::Server { code: error::code_of(&status), status: Box::new(status) })
            }
            None => {
                self.call(Route::Any, "", 0, |mut c| async move { c.cluster_status(pb::ClusterStatusRequest {}).await })
                    .await
            }
        }
    }

    /// Adds node `id` at `addr` as a learner (waiting until it caught up), and promotes it to
    /// voter if `promote`.
    pub async fn cluster_add(
        &self,
        id: u64,
        addr: &str,
        promote: bool,
    ) -> Result<pb::ClusterStatusResponse, ClientError> {
        let req = pb::ClusterAddRequest { id, addr: addr.to_owned(), promote };
        self.call_timed(Route::Leader, "", 0, MEMBERSHIP_WAIT, MEMBERSHIP_WAIT * 2, |mut c| {
            let req = req.clone();
            async move { c.cluster_add(req).await }
        })
        .await
    }

    /// Promotes learner `id` to voter.
    pub async fn cluster_promote(&self, id: u64) -> Result<pb::ClusterStatusResponse, ClientError> {
        self.call_timed(Route::Leader, "", 0, MEMBERSHIP_WAIT, MEMBERSHIP_WAIT * 2, |mut c| async move {
            c.cluster_promote(pb::ClusterPromoteRequest { id }).await
        })
        .await
    }

    /// Removes node `id` from the cluster.
    pub async fn cluster_remove(&self, id: u64) -> Result<pb::ClusterStatusResponse, ClientError> {
        self.call_timed(Route::Leader, "", 0, MEMBERSHIP_WAIT, MEMBERSHIP_WAIT * 2, |mut c| async move {
            c.cluster_remove(pb::ClusterRemoveRequest { id }).await
        })
        .await
    }
}
