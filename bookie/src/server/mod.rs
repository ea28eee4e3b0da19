//! A running bookie: cookie check, journal replay, the journals, the gRPC service, the HTTP
//! endpoint, registration in the metastore, disk monitoring, checkpoints and garbage
//! collection.
//!
//! Start order: bind → cookies → open the entry store → replay every journal from the last
//! checkpoint and checkpoint the result → start the journals → serve gRPC → register. Stop
//! order: unregister and stop serving → let the journals finish what they accepted → final
//! checkpoint.

pub mod checkpoint;
pub mod cookie;
mod gc;
mod http;
mod registration;
mod service;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use magnetar_common::metrics::{Counter, Histogram, Registry, LATENCY_MS_BUCKETS};
use magnetar_metastore::client::MetaClient;
use magnetar_proto::bookie::bookie_server::BookieServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::BookieConfig;
use crate::error::{BookieError, Result};
use crate::journal::{replay, Journal, JournalMetrics, Position};
use crate::ledgers::Ledgers;
use crate::storage::LedgerStorage;

pub use registration::{available_key, BookieInfo, AVAILABLE_PREFIX};

/// Segments the journals may fill between two checkpoints before one runs without waiting out
/// `storage.checkpoint_min_gap_ms`: it bounds the journal space a fast writer holds.
pub const SEGMENTS_PER_CHECKPOINT: usize = 8;

/// Request metrics.
#[derive(Clone)]
pub(crate) struct ServerMetrics {
    add_ok: Arc<Counter>,
    add_failed: Arc<Counter>,
    add_latency: Arc<Histogram>,
    write_bytes: Arc<Counter>,
    read_entries: Arc<Counter>,
    read_bytes: Arc<Counter>,
    read_latency: Arc<Histogram>,
}

impl ServerMetrics {
    fn register(r: &Registry) -> Self {
        ServerMetrics {
            add_ok: r.counter("bookie_ADD_ENTRY", "Adds acknowledged", &[("success", "true")]),
            add_failed: r.counter("bookie_ADD_ENTRY", "Adds acknowledged", &[("success", "false")]),
            add_latency: r.histogram(
                "bookkeeper_server_ADD_ENTRY_REQUEST",
                "Add request latency, receipt to durable ack (ms)",
                &[],
                LATENCY_MS_BUCKETS,
            ),
            write_bytes: r.counter("bookie_WRITE_BYTES", "Entry bytes received for adds", &[]),
            read_entries: r.counter("bookie_READ_ENTRY", "Entries read", &[]),
            read_bytes: r.counter("bookie_READ_BYTES", "Entry bytes read", &[]),
            read_latency: r.histogram(
                "bookkeeper_server_READ_ENTRY_REQUEST",
                "Read request latency (ms)",
                &[],
                LATENCY_MS_BUCKETS,
            ),
        }
    }
}

/// State shared by the service, the HTTP endpoint and the background tasks.
pub(crate) struct Core {
    pub(crate) bookie_id: String,
    pub(crate) ledgers: Arc<Ledgers>,
    journals: Vec<Journal>,
    read_only: AtomicBool,
    shutting_down: AtomicBool,
    ready: AtomicBool,
    pub(crate) metrics: ServerMetrics,
    pub(crate) registry: Registry,
    max_entry: usize,
}

impl Core {
    fn journal_for(&self, ledger: u64) -> &Journal {
        &self.journals[self.journal_index(ledger)]
    }
    fn journal_index(&self, ledger: u64) -> usize {
        (ledger % self.journals.len() as u64) as usize
    }
    pub(crate) fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Relaxed)
    }
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.is_shutting_down()
    }

    /// Flushes the entry store and records the journal positions it covers.
    fn checkpoint(&self, ledger_dir: &std::path::Path) -> Result<()> {
        let positions: Vec<Position> = self.journals.iter().map(|j| j.applied()).collect();
        self.ledgers.storage.flush()?;
        checkpoint::store(ledger_dir, &checkpoint::Checkpoint { journals: positions.clone() })?;
        for (j, p) in self.journals.iter().zip(positions) {
            j.release_before(p)?;
        }
        Ok(())
    }
}

/// A handle to a bookie running in this process. A ledger client given it
/// ([`crate::client::LedgerClient::with_local_bookie`]) hands adds for this bookie straight
/// to its journal instead of over gRPC and loopback TCP; the checks and the durability rule
/// are the same (an add is acknowledged only after its journal fdatasync).
#[derive(Clone)]
pub struct LocalBookie {
    pub(crate) core: Arc<Core>,
}

impl LocalBookie {
    /// The bookie's id.
    pub fn id(&self) -> &str {
        &self.core.bookie_id
    }
}

impl std::fmt::Debug for LocalBookie {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBookie").field("id", &self.core.bookie_id).finish()
    }
}

/// A running bookie.
pub struct Bookie {
    core: Arc<Core>,
    addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    ledger_dir: PathBuf,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

fn canonical(dirs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    dirs.iter()
        .map(|d| {
            std::fs::create_dir_all(d).map_err(|e| BookieError::io(format!("creating {}", d.display()), e))?;
            d.canonicalize().map_err(|e| BookieError::io(format!("resolving {}", d.display()), e))
        })
        .collect()
}

impl Bookie {
    /// Starts a bookie; it stops when `shutdown` is cancelled (then call [`Self::stop`]).
    pub async fn start(cfg: BookieConfig, shutdown: CancellationToken) -> Result<Self> {
        magnetar_common::config::Validate::validate(&cfg)?;
        let listener = TcpListener::bind(&cfg.listen_addr)
            .await
            .map_err(|e| BookieError::io(format!("binding {}", cfg.listen_addr), e))?;
        let addr = listener.local_addr().map_err(|e| BookieError::io("reading the bound address", e))?;
        let advertise = if cfg.advertise_addr.is_empty() {
            if addr.ip().is_unspecified() {
                return Err(BookieError::Invalid("listening on all interfaces: set advertise_addr"));
            }
            addr.to_string()
        } else {
            cfg.advertise_addr.clone()
        };
        let bookie_id = if cfg.bookie_id.is_empty() { advertise.clone() } else { cfg.bookie_id.clone() };
        let journal_dirs = canonical(&cfg.journal_dirs)?;
        let ledger_dirs = canonical(&cfg.ledger_dirs)?;
        let ledger_dir = ledger_dirs[0].clone();

        let meta = MetaClient::connect(&cfg.metastore)?;
        let cookie = cookie::verify_or_format(&meta, &bookie_id, &journal_dirs, &ledger_dirs, &advertise).await?;

        // Entry store and replay.
        let settings = cfg.storage.clone();
        let ldir = ledger_dir.join("store");
        let storage: Arc<dyn LedgerStorage> =
            tokio::task::spawn_blocking(move || crate::storage::open(&ldir, &settings)).await.map_err(join_err)??;
        let cp = checkpoint::load(&ledger_dir, journal_dirs.len())?;
        let max_record = cfg.max_entry_bytes + service::MAX_MASTER_KEY + 4096;
        let mut next_segments = Vec::new();
        for (i, dir) in journal_dirs.iter().enumerate() {
            let (dir2, from, st) = (dir.clone(), cp.journals[i], storage.clone());
            let started = std::time::Instant::now();
            let stats = tokio::task::spawn_blocking(move || replay::replay(&dir2, from, st.as_ref(), max_record))
                .await
                .map_err(join_err)??;
            tracing::info!(journal = %dir.display(), records = stats.records, segments = stats.segments,
                torn_tails = stats.torn_tails, missing_refs = stats.missing_refs,
                elapsed_ms = started.elapsed().as_millis() as u64, "journal replayed");
            next_segments.push(stats.next_segment(from));
        }

        let registry = Registry::new();
        let ledgers = Arc::new(Ledgers::new(storage, cfg.storage.read_cache_bytes));
        // A checkpoint is due every `checkpoint_interval_ms`, and soon after a journal fills a
        // segment (see `checkpoint_min_gap_ms`): then its finished segments are recycled and a
        // heavy write load does not wait for fresh segments to be zero-filled.
        let checkpoint_due = Arc::new(tokio::sync::Notify::new());
        let filled = Arc::new(AtomicUsize::new(0));
        let mut journals = Vec::new();
        for (i, dir) in journal_dirs.iter().enumerate() {
            let m = JournalMetrics::register(&registry, i);
            let (due, filled) = (checkpoint_due.clone(), filled.clone());
            journals.push(Journal::start(
                dir,
                next_segments[i],
                &cfg.journal,
                cfg.max_entry_bytes,
                ledgers.clone(),
                m,
                Box::new(move || {
                    filled.fetch_add(1, Ordering::Relaxed);
                    due.notify_one();
                }),
            )?);
        }
        let core = Arc::new(Core {
            bookie_id: bookie_id.clone(),
            ledgers,
            journals,
            read_only: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            metrics: ServerMetrics::register(&registry),
            registry: registry.clone(),
            max_entry: cfg.max_entry_bytes,
        });
        // Replayed data is flushed: checkpoint at the new segments so old ones can go.
        {
            let (c, d) = (core.clone(), ledger_dir.clone());
            tokio::task::spawn_blocking(move || c.checkpoint(&d)).await.map_err(join_err)??;
        }
        core.ledgers.storage.replay_done();
        {
            // Weak: the registry lives in the core, and a strong handle here would keep the
            // core (and the entry store's lock) alive after the bookie stops.
            let c = Arc::downgrade(&core);
            registry.gauge_fn("bookie_read_cache_size", "Bytes in the tail read cache", &[], move || {
                c.upgrade().map_or(0.0, |c| c.ledgers.cache.bytes() as f64)
            });
            for (name, help, _) in core.ledgers.storage.gauges() {
                let c = Arc::downgrade(&core);
                registry.gauge_fn(name, help, &[], move || {
                    let gauges = c.upgrade().map(|c| c.ledgers.storage.gauges()).unwrap_or_default();
                    gauges.into_iter().find(|g| g.0 == name).map_or(0.0, |g| g.2)
                });
            }
            let c = Arc::downgrade(&core);
            registry.gauge_fn("bookie_SERVER_STATUS", "1 writable, 0 read-only", &[], move || match c.upgrade() {
                Some(c) if !c.is_read_only() => 1.0,
                _ => 0.0,
            });
        }

        let cancel = shutdown.child_token();
        let tasks = TaskTracker::new();
        let svc = BookieServer::new(service::Service { core: core.clone(), cancel: cancel.clone() })
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let serve_cancel = cancel.clone();
        tasks.spawn(async move {
            let res = tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .http2_keepalive_interval(Some(Duration::from_secs(10)))
                .initial_stream_window_size(Some(8 << 20))
                .initial_connection_window_size(Some(16 << 20))
                .max_frame_size(Some(crate::H2_MAX_FRAME))
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, serve_cancel.cancelled())
                .await;
            if let Err(e) = res {
                tracing::error!(error = %e, "bookie gRPC server failed");
            }
        });

        let http_addr = if cfg.http_addr.is_empty() {
            None
        } else {
            Some(http::serve(&cfg.http_addr, core.clone(), cancel.clone(), &tasks).await?)
        };

        let info = BookieInfo {
            address: advertise.clone(),
            http_address: http_addr.map(|a| a.to_string()).unwrap_or_default(),
            read_only: false,
            instance_id: cookie.instance_id.clone(),
        };
        let dirs: Vec<PathBuf> = journal_dirs.iter().chain(ledger_dirs.iter()).cloned().collect();
        registration::start(&tasks, cancel.clone(), meta.clone(), core.clone(), info, dirs, &cfg).await?;

        // Checkpoints.
        {
            let (c, d, cancel) = (core.clone(), ledger_dir.clone(), cancel.clone());
            let every = Duration::from_millis(cfg.storage.checkpoint_interval_ms);
            let gap = Duration::from_millis(cfg.storage.checkpoint_min_gap_ms);
            tasks.spawn(async move {
                let mut last = Instant::now();
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(every) => {}
                        _ = checkpoint_due.notified() => {
                            // A filled segment: wait out the gap, unless segments pile up.
                            while last.elapsed() < gap && filled.load(Ordering::Relaxed) < SEGMENTS_PER_CHECKPOINT {
                                tokio::select! {
                                    _ = cancel.cancelled() => return,
                                    _ = tokio::time::sleep(gap.saturating_sub(last.elapsed())) => {}
                                    _ = checkpoint_due.notified() => {}
                                }
                            }
                        }
                    }
                    last = Instant::now();
                    filled.store(0, Ordering::Relaxed);
                    let (c, d) = (c.clone(), d.clone());
                    match tokio::task::spawn_blocking(move || c.checkpoint(&d)).await {
                        Ok(Ok(())) => tracing::debug!(took_ms = last.elapsed().as_millis() as u64, "checkpoint done"),
                        Ok(Err(e)) => tracing::error!(error = %e, "checkpoint failed"),
                        Err(e) => tracing::error!(error = %e, "checkpoint task failed"),
                    }
                }
            });
        }
        if cfg.gc_interval_ms > 0 {
            gc::start(&tasks, cancel.clone(), meta, core.clone(), Duration::from_millis(cfg.gc_interval_ms));
        }
        core.ready.store(true, Ordering::Relaxed);
        tracing::info!(%bookie_id, %addr, http = ?http_addr, "bookie started");
        Ok(Bookie { core, addr, http_addr, ledger_dir, cancel, tasks })
    }

    /// The bound gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound HTTP address, if HTTP is on.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// This bookie's id.
    pub fn bookie_id(&self) -> &str {
        &self.core.bookie_id
    }

    /// A handle for ledger clients in this process.
    pub fn local(&self) -> LocalBookie {
        LocalBookie { core: self.core.clone() }
    }

    /// The metrics registry.
    pub fn registry(&self) -> &Registry {
        &self.core.registry
    }

    /// Stops serving, lets accepted adds finish, checkpoints, and waits for every task.
    pub async fn stop(self) {
        self.core.shutting_down.store(true, Ordering::Relaxed);
        self.cancel.cancel();
        self.tasks.close();
        // Add streams end on cancel; a peer that keeps a connection open must not keep the
        // bookie from reaching its final checkpoint.
        if tokio::time::timeout(Duration::from_secs(10), self.tasks.wait()).await.is_err() {
            tracing::warn!("some connections did not close within 10 s; stopping anyway");
        }
        let core = self.core.clone();
        let dir = self.ledger_dir.clone();
        let r = tokio::task::spawn_blocking(move || {
            for j in &core.journals {
                j.stop();
            }
            core.checkpoint(&dir)
        })
        .await;
        match r {
            Ok(Ok(())) => tracing::info!("bookie stopped"),
            Ok(Err(e)) => tracing::error!(error = %e, "final checkpoint failed (the journal will be replayed)"),
            Err(e) => tracing::error!(error = %e, "stopping the journals failed"),
        }
    }
}

fn join_err(e: tokio::task::JoinError) -> BookieError {
    BookieError::io("a blocking task", std::io::Error::other(e))
}

/// Runs a bookie until `shutdown` is cancelled.
pub async fn run(cfg: BookieConfig, shutdown: CancellationToken) -> Result<()> {
    let bookie = Bookie::start(cfg, shutdown.clone()).await?;
    shutdown.cancelled().await;
    bookie.stop().await;
    Ok(())
}
