//! The broker's Pulsar protocol server: accepts connections on the broker service port, runs
//! the handshake and serves each connection in its own task ([`connection`]).

mod connection;
mod throttle;

use std::net::SocketAddr;
use std::sync::Arc;

use magnetar_bookie::client::{LedgerClient, LedgerOptions};
use magnetar_bookie::LocalBookie;
use magnetar_metastore::client::MetaClient;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::BrokerConfig;
use crate::ownership::{BrokerInfo, Ownership};
use crate::protocol::codec::FRAME_HEADROOM;
use crate::topic::Topics;

/// Client connections opened and closed (after the handshake), and the sends they have
/// waiting for their appends, for back-pressure and `/metrics`.
pub(crate) struct Connections {
    pub(crate) created: std::sync::atomic::AtomicU64,
    pub(crate) closed: std::sync::atomic::AtomicU64,
    /// The broker-wide budget of bytes in unanswered sends.
    pub(crate) publish: Arc<throttle::PublishBuffer>,
    /// Unanswered sends at which a connection stops reading.
    pub(crate) max_pending_per_connection: usize,
}

impl Connections {
    fn new(cfg: &BrokerConfig) -> Self {
        Connections {
            created: Default::default(),
            closed: Default::default(),
            publish: Arc::new(throttle::PublishBuffer::new(cfg.max_message_publish_buffer_size_in_mb)),
            max_pending_per_connection: cfg.max_pending_publish_requests_per_connection,
        }
    }
}

pub(crate) struct Shared {
    pub(crate) topics: Arc<Topics>,
    pub(crate) connections: Arc<Connections>,
    pub(crate) next_conn: std::sync::atomic::AtomicU64,
    pub(crate) service_url: String,
    pub(crate) max_message_size: usize,
}

/// A running broker.
pub struct Broker {
    addr: SocketAddr,
    web_addr: Option<SocketAddr>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    shared: Arc<Shared>,
    ownership: Arc<Ownership>,
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Binding or reading the address failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Invalid settings.
    #[error("invalid broker configuration: {0}")]
    Config(String),
    /// Registering with the metastore failed.
    #[error("registering with the metastore: {0}")]
    Metastore(String),
}

impl Broker {
    /// Binds, registers with the metastore and serves until `shutdown`.
    pub async fn start(cfg: BrokerConfig, meta: MetaClient, shutdown: CancellationToken) -> Result<Self, BrokerError> {
        Self::start_inner(cfg, meta, shutdown, None).await
    }

    /// Like [`Self::start`], with a bookie running in the same process (`magnetar standalone`):
    /// adds for it skip gRPC and go straight to its journal.
    pub async fn start_with_bookie(
        cfg: BrokerConfig,
        meta: MetaClient,
        shutdown: CancellationToken,
        bookie: LocalBookie,
    ) -> Result<Self, BrokerError> {
        Self::start_inner(cfg, meta, shutdown, Some(bookie)).await
    }

    async fn start_inner(
        cfg: BrokerConfig,
        meta: MetaClient,
        shutdown: CancellationToken,
        bookie: Option<LocalBookie>,
    ) -> Result<Self, BrokerError> {
        magnetar_common::config::Validate::validate(&cfg).map_err(|e| BrokerError::Config(e.to_string()))?;
        let io = |context: String| move |source| BrokerError::Io { context, source };
        let listener = TcpListener::bind(&cfg.listen_addr).await.map_err(io(format!("binding {}", cfg.listen_addr)))?;
        let addr = listener.local_addr().map_err(io("reading the bound address".into()))?;
        let advertise = if cfg.advertise_addr.is_empty() { addr.to_string() } else { cfg.advertise_addr.clone() };
        let web = if cfg.web_listen_addr.is_empty() {
            None
        } else {
            let l = TcpListener::bind(&cfg.web_listen_addr)
                .await
                .map_err(io(format!("binding HTTP {}", cfg.web_listen_addr)))?;
            let bound = l.local_addr().map_err(io("reading the bound HTTP address".into()))?;
            Some((l, bound))
        };
        let me = BrokerInfo {
            broker_id: if cfg.broker_id.is_empty() { advertise.clone() } else { cfg.broker_id.clone() },
            broker_url: format!("pulsar://{advertise}"),
            http_url: web
                .as_ref()
                .map(|(_, b)| format!("http://{}", advertised_web(&advertise, *b)))
                .unwrap_or_default(),
        };
        let cancel = shutdown.child_token();
        let ttl = std::time::Duration::from_millis(cfg.metadata_store_session_timeout_ms);
        // A standalone (its bookie in this process) is the only broker of its metastore: a
        // record under its id is an earlier run's, taken over at once whatever its address.
        let sole = bookie.is_some();
        let ownership = Ownership::start(meta.clone(), me, ttl, sole, cancel.child_token())
            .await
            .map_err(|e| BrokerError::Metastore(e.to_string()))?;
        let opts = LedgerOptions { created_by: format!("broker {advertise}"), ..Default::default() };
        let ledgers = match bookie {
            Some(b) => LedgerClient::with_local_bookie(meta.clone(), opts, b),
            None => LedgerClient::new(meta.clone(), opts),
        };
        let shared = Arc::new(Shared {
            topics: Arc::new(Topics::new(meta.clone(), ledgers, cfg.topic_settings(), ownership.clone())),
            connections: Arc::new(Connections::new(&cfg)),
            next_conn: std::sync::atomic::AtomicU64::new(1),
            service_url: format!("pulsar://{advertise}"),
            max_message_size: cfg.max_message_size,
        });
        let tasks = TaskTracker::new();
        // A lost session means the bundles may have new owners: unload everything, so
        // clients reconnect and look their topics up again.
        let (mut losses, topics, lost_cancel) = (ownership.losses(), shared.topics.clone(), cancel.clone());
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = lost_cancel.cancelled() => return,
                    r = losses.changed() => if r.is_err() { return },
                }
                tracing::warn!("unloading every topic after the metastore session was lost");
                topics.close_all().await;
            }
        });
        if cfg.orphan_ledger_check_interval_in_seconds > 0 {
            let secs = std::time::Duration::from_secs;
            tasks.spawn(crate::topic::orphans::run(
                shared.topics.clone(),
                secs(cfg.orphan_ledger_check_interval_in_seconds),
                secs(cfg.orphan_ledger_min_age_in_seconds),
                cancel.clone(),
            ));
        }
        let (accept_cancel, accept_tasks, kept) = (cancel.clone(), tasks.clone(), shared.clone());
        tasks.spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    _ = accept_cancel.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            continue;
                        }
                    },
                };
                let _ = stream.set_nodelay(true);
                let (shared, cancel) = (shared.clone(), accept_cancel.clone());
                accept_tasks.spawn(async move {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        r = connection::serve(stream, shared) => {
                            if let Err(e) = r {
                                tracing::debug!(%peer, error = %e, "connection closed");
                            }
                        }
                    }
                });
            }
        });
        tracing::info!(%addr, broker = %ownership.me().broker_id, "broker serving the Pulsar protocol");
        let web_addr = match web {
            None => None,
            Some((listener, bound)) => {
                let admin = crate::admin::Admin {
                    meta,
                    topics: kept.topics.clone(),
                    connections: kept.connections.clone(),
                    ownership: ownership.clone(),
                    cluster: cfg.cluster_name.clone(),
                    topic_level_metrics: cfg.expose_topic_level_metrics_in_prometheus,
                };
                crate::admin::serve(listener, admin, cancel.clone(), &tasks);
                tracing::info!(addr = %bound, "broker HTTP (admin API, metrics) serving");
                Some(bound)
            }
        };
        Ok(Broker { addr, web_addr, cancel, tasks, shared: kept, ownership })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound HTTP address, when serving HTTP.
    pub fn web_addr(&self) -> Option<SocketAddr> {
        self.web_addr
    }

    /// Stops accepting, closes connections and waits for their tasks, closes every topic
    /// (cursors stored, ledgers closed), then gives up its bundles.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.shared.topics.close_all().await;
        self.ownership.release().await;
    }
}

/// The HTTP address to advertise: the bound one, with the advertised host when bound to all
/// interfaces.
fn advertised_web(advertise: &str, bound: SocketAddr) -> String {
    if bound.ip().is_unspecified() {
        let host = advertise.rsplit_once(':').map(|(h, _)| h).unwrap_or(advertise);
        format!("{host}:{}", bound.port())
    } else {
        bound.to_string()
    }
}

pub(crate) fn max_frame(max_message_size: usize) -> usize {
    max_message_size + FRAME_HEADROOM
}
