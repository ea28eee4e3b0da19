//! The broker's Pulsar protocol server: accepts connections on the broker service port, runs
//! the handshake and serves each connection in its own task ([`connection`]).

mod connection;

use std::net::SocketAddr;
use std::sync::Arc;

use magnetar_bookie::client::{LedgerClient, LedgerOptions};
use magnetar_metastore::client::MetaClient;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::BrokerConfig;
use crate::protocol::codec::FRAME_HEADROOM;
use crate::topic::Topics;

pub(crate) struct Shared {
    pub(crate) topics: Arc<Topics>,
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
}

impl Broker {
    /// Binds and serves until `shutdown`.
    pub async fn start(cfg: BrokerConfig, meta: MetaClient, shutdown: CancellationToken) -> Result<Self, BrokerError> {
        magnetar_common::config::Validate::validate(&cfg).map_err(|e| BrokerError::Config(e.to_string()))?;
        let listener = TcpListener::bind(&cfg.listen_addr)
            .await
            .map_err(|source| BrokerError::Io { context: format!("binding {}", cfg.listen_addr), source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| BrokerError::Io { context: "reading the bound address".into(), source })?;
        let advertise = if cfg.advertise_addr.is_empty() { addr.to_string() } else { cfg.advertise_addr.clone() };
        let ledgers = LedgerClient::new(
            meta.clone(),
            LedgerOptions { created_by: format!("broker {advertise}"), ..Default::default() },
        );
        let shared = Arc::new(Shared {
            topics: Arc::new(Topics::new(meta.clone(), ledgers, cfg.topic_settings())),
            next_conn: std::sync::atomic::AtomicU64::new(1),
            service_url: format!("pulsar://{advertise}"),
            max_message_size: cfg.max_message_size,
        });
        let cancel = shutdown.child_token();
        let tasks = TaskTracker::new();
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
        tracing::info!(%addr, "broker serving the Pulsar protocol");
        let web_addr = if cfg.web_listen_addr.is_empty() {
            None
        } else {
            let admin = crate::admin::Admin {
                meta,
                topics: kept.topics.clone(),
                cluster: cfg.cluster_name.clone(),
                web_addr: cfg.web_listen_addr.clone(),
                service_url: kept.service_url.clone(),
                topic_level_metrics: cfg.expose_topic_level_metrics_in_prometheus,
            };
            let bound =
                crate::admin::serve(&cfg.web_listen_addr, admin, cancel.clone(), &tasks).await.map_err(|source| {
                    BrokerError::Io { context: format!("binding HTTP {}", cfg.web_listen_addr), source }
                })?;
            tracing::info!(addr = %bound, "broker HTTP (admin API, metrics) serving");
            Some(bound)
        };
        Ok(Broker { addr, web_addr, cancel, tasks, shared: kept })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound HTTP address, when serving HTTP.
    pub fn web_addr(&self) -> Option<SocketAddr> {
        self.web_addr
    }

    /// Stops accepting, closes connections and waits for their tasks, then closes every
    /// topic (cursors stored, ledgers closed).
    pub async fn stop(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.shared.topics.close_all().await;
    }
}

pub(crate) fn max_frame(max_message_size: usize) -> usize {
    max_message_size + FRAME_HEADROOM
}
