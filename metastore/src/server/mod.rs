//! A metastore node: RocksDB storage, the openraft instance, the gRPC server (client API and
//! Raft transport on one port) and the leader's session-expiry task.
//!
//! Lifecycle: [`MetastoreNode::start`] binds and serves; [`MetastoreNode::stop`] stops accepting,
//! shuts Raft down and waits for every task it started.

mod http;
mod proposer;
mod raft_service;
mod read_barrier;
mod service;
mod sessions;
mod watch;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use magnetar_proto::metastore::metastore_server::MetastoreServer;
use magnetar_proto::metastore::raft_server::RaftServer;
use openraft::BasicNode;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::MetastoreConfig;
use crate::error::MetaError;
use crate::network::Network;
use crate::store::log::LogStore;
use crate::store::sm::{Retention, SmShared, StateMachine};
use crate::types::Raft;

pub use sessions::Leases;

/// A running metastore node.
pub struct MetastoreNode {
    raft: Raft,
    sm: Arc<SmShared>,
    addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    /// Held so that `stop` closes the database itself (see there).
    db: Arc<rocksdb::DB>,
}

impl MetastoreNode {
    /// Opens the data directory, starts Raft and serves gRPC. Stops when `shutdown` is
    /// cancelled (call [`Self::stop`] to wait for that to finish).
    pub async fn start(cfg: MetastoreConfig, shutdown: CancellationToken) -> Result<Self, MetaError> {
        let listener = TcpListener::bind(&cfg.listen_addr)
            .await
            .map_err(|source| MetaError::Io { context: "binding the metastore listen address", source })?;
        let addr =
            listener.local_addr().map_err(|source| MetaError::Io { context: "reading the bound address", source })?;
        let advertise = if cfg.advertise_addr.is_empty() {
            if addr.ip().is_unspecified() {
                return Err(MetaError::InvalidArgument {
                    field: "advertise_addr",
                    reason: format!("listening on {addr}: set advertise_addr to an address peers can reach"),
                });
            }
            addr.to_string()
        } else {
            cfg.advertise_addr.clone()
        };

        let db = crate::store::open_db(&cfg.data_dir)?;
        let log_store = LogStore::guarded(db.clone());
        let retention = Retention { event_revisions: cfg.watch_history_revisions };
        let sm = StateMachine::new(db.clone(), cfg.data_dir.join("snapshots"), retention)
            .map_err(|e| MetaError::Unavailable { reason: format!("opening the state machine: {e}") })?;
        let shared = sm.shared();

        let raft_config = openraft::Config {
            cluster_name: "magnetar-metastore".into(),
            heartbeat_interval: cfg.raft.heartbeat_ms,
            election_timeout_min: cfg.raft.election_timeout_min_ms,
            election_timeout_max: cfg.raft.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(cfg.raft.snapshot_every_entries),
            max_in_snapshot_log_to_keep: cfg.raft.keep_entries_after_snapshot,
            install_snapshot_timeout: cfg.raft.rpc_timeout_ms.max(5_000),
            max_payload_entries: 1000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| MetaError::InvalidArgument { field: "raft", reason: e.to_string() })?;
        let raft = Raft::new(cfg.node_id, Arc::new(raft_config), Network::default(), log_store, sm)
            .await
            .map_err(MetaError::fatal)?;

        let members = cfg
            .members()
            .map_err(|e| MetaError::InvalidArgument { field: "initial_members", reason: e.to_string() })?;
        let initialized = raft.is_initialized().await.map_err(MetaError::fatal)?;
        if !members.is_empty() && !initialized {
            let nodes: BTreeMap<u64, BasicNode> = members
                .iter()
                .map(|m| {
                    let addr = if m.id == cfg.node_id { advertise.clone() } else { m.addr.clone() };
                    (m.id, BasicNode { addr })
                })
                .collect();
            // Every bootstrap member calls this with the same membership, which openraft allows.
            match raft.initialize(nodes).await {
                Ok(()) => tracing::info!(members = ?cfg.initial_members, "bootstrapped a new metastore cluster"),
                Err(e) => tracing::info!(error = %e, "bootstrap skipped"),
            }
        }

        let cancel = shutdown.child_token();
        let tasks = TaskTracker::new();
        let leases = Arc::new(Leases::default());
        let api = service::Api::new(raft.clone(), shared.clone(), leases.clone(), cfg.clone(), cancel.clone());
        let decode_limit = (cfg.limits.max_value_bytes * 4).max(4 << 20);
        let metastore = MetastoreServer::new(api)
            .max_decoding_message_size(decode_limit)
            .max_encoding_message_size(usize::MAX >> 1);
        let raft_svc = RaftServer::new(raft_service::RaftApi::new(raft.clone()))
            .max_decoding_message_size(usize::MAX >> 1)
            .max_encoding_message_size(usize::MAX >> 1);
        let serve_cancel = cancel.clone();
        // The builder's tcp_nodelay only covers listeners tonic binds itself; without it on
        // accepted sockets, Nagle holds small Raft and API replies for the peer's delayed ACK.
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tasks.spawn(async move {
            let res = tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .http2_keepalive_interval(Some(Duration::from_secs(10)))
                .add_service(metastore)
                .add_service(raft_svc)
                .serve_with_incoming_shutdown(incoming, serve_cancel.cancelled())
                .await;
            if let Err(e) = res {
                tracing::error!(error = %e, "metastore gRPC server failed");
            }
        });
        tasks.spawn(sessions::expiry_loop(raft.clone(), shared.clone(), leases, cfg.node_id, cancel.clone()));
        let http_addr = if cfg.http_addr.is_empty() {
            None
        } else {
            Some(
                http::serve(&cfg.http_addr, raft.clone(), cfg.node_id, cancel.clone(), &tasks)
                    .await
                    .map_err(|source| MetaError::Io { context: "binding the metastore HTTP address", source })?,
            )
        };
        tracing::info!(node_id = cfg.node_id, %addr, %advertise, data_dir = %cfg.data_dir.display(), "metastore node started");
        Ok(MetastoreNode { raft, sm: shared, addr, http_addr, cancel, tasks, db })
    }

    /// The bound gRPC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound HTTP (`/metrics`) address, when serving HTTP.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The Raft handle (metrics, membership).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The state machine's read side.
    pub fn state(&self) -> &Arc<SmShared> {
        &self.sm
    }

    /// Waits for the shutdown token, then stops.
    pub async fn run_until_stopped(self) {
        self.cancel.cancelled().await;
        self.stop().await;
    }

    /// Stops serving, shuts Raft down and waits for every task.
    pub async fn stop(self) {
        let MetastoreNode { raft, sm, cancel, tasks, db, .. } = self;
        cancel.cancel();
        tasks.close();
        tasks.wait().await;
        if let Err(e) = raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        drop((raft, sm));
        close_db(db).await;
        tracing::info!("metastore node stopped");
    }
}

/// Closes the database once Raft's tasks and the WAL syncer thread have let go of it, and
/// waits for the close. Left to whichever thread dropped it last, the close could still be
/// running when the process exits, and RocksDB aborts a process that exits under its
/// background work ("pthread lock: Invalid argument").
async fn close_db(db: Arc<rocksdb::DB>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while Arc::strong_count(&db) > 1 {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(holders = Arc::strong_count(&db) - 1, "metastore database still in use at shutdown");
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if tokio::task::spawn_blocking(move || drop(db)).await.is_err() {
        tracing::warn!("closing the metastore database panicked");
    }
}

/// Runs a node until `shutdown` is cancelled.
pub async fn run(cfg: MetastoreConfig, shutdown: CancellationToken) -> Result<(), MetaError> {
    let node = MetastoreNode::start(cfg, shutdown).await?;
    node.run_until_stopped().await;
    Ok(())
}
