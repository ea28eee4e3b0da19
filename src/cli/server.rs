//! `magnetar metastore` and `magnetar standalone`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use magnetar_bookie::BookieConfig;
use magnetar_common::config::ConfigLoader;
use magnetar_metastore::MetastoreConfig;
use tokio_util::sync::CancellationToken;

#[derive(Args, Debug)]
pub struct MetastoreArgs {
    /// TOML config file.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// This node's id.
    #[arg(long)]
    node_id: Option<u64>,
    /// Listen address (host:port; port 0 picks a free one).
    #[arg(long)]
    listen: Option<String>,
    /// Address peers and clients use to reach this node.
    #[arg(long)]
    advertise: Option<String>,
    /// HTTP address for /metrics ("" or absent: off).
    #[arg(long)]
    http: Option<String>,
    /// Data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Bootstrap members, `id=host:port,…` (1 or 3+). Omit to join later as a learner.
    #[arg(long, value_delimiter = ',')]
    initial_members: Vec<String>,
    /// Any other setting, as dotted.key=value (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

fn load_metastore_config(a: &MetastoreArgs) -> anyhow::Result<MetastoreConfig> {
    let flags = vec![
        ("node_id", a.node_id.map(|v| v.to_string())),
        ("listen_addr", a.listen.clone()),
        ("advertise_addr", a.advertise.clone()),
        ("http_addr", a.http.clone()),
        ("data_dir", a.data_dir.as_ref().map(|v| v.display().to_string())),
        ("initial_members", (!a.initial_members.is_empty()).then(|| toml_list(&a.initial_members))),
    ];
    let loader = layered("MAGNETAR_METASTORE_", a.config.as_deref(), &[], flags, &a.set)?;
    Ok(loader.load::<MetastoreConfig>()?)
}

pub async fn metastore(a: MetastoreArgs) -> anyhow::Result<()> {
    let cfg = load_metastore_config(&a)?;
    let shutdown = magnetar_common::shutdown::shutdown_on_signals();
    magnetar_metastore::run(cfg, shutdown).await?;
    Ok(())
}

#[derive(Args, Debug)]
pub struct BookieArgs {
    /// TOML config file.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Bookie id (default: the advertised address).
    #[arg(long)]
    bookie_id: Option<String>,
    /// gRPC listen address (host:port; port 0 picks a free one).
    #[arg(long)]
    listen: Option<String>,
    /// Address ledger clients use to reach this bookie.
    #[arg(long)]
    advertise: Option<String>,
    /// HTTP address for /metrics and probes ("" turns it off).
    #[arg(long)]
    http: Option<String>,
    /// Journal directories (comma separated).
    #[arg(long, value_delimiter = ',')]
    journal_dirs: Vec<PathBuf>,
    /// Ledger directory.
    #[arg(long)]
    ledger_dir: Option<PathBuf>,
    /// Metastore endpoints, host:port,…
    #[arg(long, value_delimiter = ',', env = "MAGNETAR_METASTORE")]
    metastore: Vec<String>,
    /// Any other setting, as dotted.key=value (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

fn toml_list<T: std::fmt::Display>(items: &[T]) -> String {
    let list: Vec<String> = items.iter().map(|m| format!("{:?}", m.to_string())).collect();
    format!("[{}]", list.join(","))
}

fn load_bookie_config(a: &BookieArgs) -> anyhow::Result<BookieConfig> {
    let dirs: Vec<String> = a.journal_dirs.iter().map(|d| d.display().to_string()).collect();
    let flags = vec![
        ("bookie_id", a.bookie_id.clone()),
        ("listen_addr", a.listen.clone()),
        ("advertise_addr", a.advertise.clone()),
        ("http_addr", a.http.clone()),
        ("journal_dirs", (!dirs.is_empty()).then(|| toml_list(&dirs))),
        ("ledger_dirs", a.ledger_dir.as_ref().map(|v| toml_list(&[v.display().to_string()]))),
        ("metastore", (!a.metastore.is_empty()).then(|| toml_list(&a.metastore))),
    ];
    let loader = layered("MAGNETAR_BOOKIE_", a.config.as_deref(), magnetar_bookie::config::ENV_ALIASES, flags, &a.set)?;
    Ok(loader.load::<BookieConfig>()?)
}

/// The layers every server command shares: file, prefixed environment, the Pulsar/BookKeeper
/// names as aliases, flags that were given, then `--set` pairs.
fn layered<'a>(
    prefix: &'a str,
    file: Option<&'a std::path::Path>,
    aliases: &'a [(&'a str, &'a str)],
    flags: Vec<(&str, Option<String>)>,
    sets: &[String],
) -> anyhow::Result<ConfigLoader<'a>> {
    let mut loader = ConfigLoader::new(prefix).file(file);
    for (env, key) in aliases {
        loader = loader.env_alias(env, key);
    }
    for (key, value) in flags {
        if let Some(v) = value {
            loader = loader.set(key, &v);
        }
    }
    for kv in sets {
        let (k, v) = kv.split_once('=').with_context(|| format!("--set {kv}: expected KEY=VALUE"))?;
        loader = loader.set(k, v);
    }
    Ok(loader)
}

pub async fn bookie(a: BookieArgs) -> anyhow::Result<()> {
    let cfg = load_bookie_config(&a)?;
    let shutdown = magnetar_common::shutdown::shutdown_on_signals();
    magnetar_bookie::run(cfg, shutdown).await?;
    Ok(())
}

#[derive(Args, Debug)]
pub struct BrokerArgs {
    /// TOML config file.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Pulsar protocol listen address.
    #[arg(long)]
    listen: Option<String>,
    /// Address lookups send clients to.
    #[arg(long)]
    advertise: Option<String>,
    /// HTTP address (admin API, metrics; "" turns it off).
    #[arg(long)]
    web_listen: Option<String>,
    /// Metastore endpoints, host:port,…
    #[arg(long, value_delimiter = ',', env = "MAGNETAR_METASTORE")]
    metastore: Vec<String>,
    /// Any other setting, as key=value (repeatable), e.g. ensemble_size=3.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

/// A broker against a metastore and bookies (cluster mode).
pub async fn broker(a: BrokerArgs) -> anyhow::Result<()> {
    let flags = vec![
        ("listen_addr", a.listen.clone()),
        ("advertise_addr", a.advertise.clone()),
        ("web_listen_addr", a.web_listen.clone()),
        ("metastore", (!a.metastore.is_empty()).then(|| toml_list(&a.metastore))),
    ];
    let loader = layered("MAGNETAR_BROKER_", a.config.as_deref(), magnetar_broker::config::ENV_ALIASES, flags, &a.set)?;
    let cfg: magnetar_broker::BrokerConfig = loader.load()?;
    let shutdown = magnetar_common::shutdown::shutdown_on_signals();
    let meta = magnetar_metastore::client::MetaClient::connect(&cfg.metastore)?;
    let url =
        format!("pulsar://{}", if cfg.advertise_addr.is_empty() { &cfg.listen_addr } else { &cfg.advertise_addr });
    magnetar_broker::bootstrap::initial_metadata(&meta, &cfg.cluster_name, &url).await?;
    let broker = magnetar_broker::Broker::start(cfg, meta, shutdown.clone()).await?;
    shutdown.cancelled().await;
    broker.stop().await;
    Ok(())
}

#[derive(Args, Debug)]
pub struct StandaloneArgs {
    /// Data directory for every component.
    #[arg(long, default_value = "./data")]
    data_dir: PathBuf,
    /// Metastore gRPC address.
    #[arg(long, default_value = "127.0.0.1:2379")]
    metastore_listen: String,
    /// Metastore HTTP address (Raft metrics, probes; "" turns it off).
    #[arg(long, default_value = "127.0.0.1:8001")]
    metastore_http: String,
    /// Bookie gRPC address.
    #[arg(long, default_value = "127.0.0.1:3181")]
    bookie_listen: String,
    /// Bookie HTTP address (metrics, probes; "" turns it off).
    #[arg(long, default_value = "127.0.0.1:8000")]
    bookie_http: String,
    /// Pulsar protocol address (brokerServicePort).
    #[arg(long, default_value = "127.0.0.1:6650")]
    broker_listen: String,
    /// Broker HTTP address: admin API, /metrics, /status.html (webServicePort; "" turns it off).
    #[arg(long, default_value = "127.0.0.1:8080")]
    web_listen: String,
    /// A broker setting, as key=value (repeatable), e.g. managed_ledger_max_entries_per_ledger=1000.
    /// `MAGNETAR_BROKER_*` and the Pulsar names (`managedLedgerMaxEntriesPerLedger`, …) apply too.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// A setting of the embedded bookie, as key=value (repeatable), e.g.
    /// storage.engine=rocksdb. `MAGNETAR_BOOKIE_*` and the BookKeeper names apply too
    #[arg(long = "bookie-set", value_name = "KEY=VALUE")]
    bookie_set: Vec<String>,
}

/// A single-node metastore, one bookie and a broker in one process over one data directory.
/// Stops in order on SIGINT/SIGTERM: broker, bookie, metastore.
pub async fn standalone(a: StandaloneArgs) -> anyhow::Result<()> {
    let cfg = MetastoreConfig {
        node_id: 1,
        listen_addr: a.metastore_listen.clone(),
        data_dir: a.data_dir.join("metastore"),
        initial_members: vec![format!("1={}", a.metastore_listen)],
        http_addr: a.metastore_http.clone(),
        ..Default::default()
    };
    magnetar_common::config::Validate::validate(&cfg)?;
    let shutdown = magnetar_common::shutdown::shutdown_on_signals();
    tracing::info!(data_dir = %a.data_dir.display(), "starting standalone");
    // The metastore outlives the others: the bookie unregisters through it while stopping.
    let meta_node = magnetar_metastore::server::MetastoreNode::start(cfg, CancellationToken::new()).await?;
    let endpoints = vec![a.metastore_listen.clone()];
    let bookie_dir = |d: &str| toml_list(&[a.data_dir.join("bookie").join(d).display().to_string()]);
    let bookie_flags = vec![
        ("bookie_id", Some("standalone-bookie".to_owned())),
        ("listen_addr", Some(a.bookie_listen.clone())),
        ("http_addr", Some(a.bookie_http.clone())),
        ("journal_dirs", Some(bookie_dir("journal"))),
        ("ledger_dirs", Some(bookie_dir("ledgers"))),
        ("metastore", Some(toml_list(&endpoints))),
    ];
    let bookie_cfg: BookieConfig =
        match layered("MAGNETAR_BOOKIE_", None, magnetar_bookie::config::ENV_ALIASES, bookie_flags, &a.bookie_set)
            .and_then(|l| Ok(l.load()?))
        {
            Ok(c) => c,
            Err(e) => {
                meta_node.stop().await;
                return Err(e);
            }
        };
    let bookie = match magnetar_bookie::Bookie::start(bookie_cfg, shutdown.clone()).await {
        Ok(b) => b,
        Err(e) => {
            meta_node.stop().await;
            return Err(e.into());
        }
    };
    let meta = magnetar_metastore::client::MetaClient::connect(&endpoints)?;
    let flags = vec![
        ("listen_addr", Some(a.broker_listen.clone())),
        ("web_listen_addr", Some(a.web_listen.clone())),
        ("metastore", Some(toml_list(&endpoints))),
        // One broker per data directory: a restart (on any port) takes its bundles back.
        ("broker_id", Some("standalone".to_owned())),
    ];
    let broker_cfg: anyhow::Result<magnetar_broker::BrokerConfig> =
        layered("MAGNETAR_BROKER_", None, magnetar_broker::config::ENV_ALIASES, flags, &a.set)
            .and_then(|l| Ok(l.load()?));
    let started = match broker_cfg {
        Ok(cfg) => {
            match magnetar_broker::bootstrap::initial_metadata(
                &meta,
                &cfg.cluster_name,
                &format!("pulsar://{}", a.broker_listen),
            )
            .await
            {
                Ok(()) => magnetar_broker::Broker::start_with_bookie(cfg, meta, shutdown.clone(), bookie.local())
                    .await
                    .map_err(anyhow::Error::from),
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e),
    };
    let broker = match started {
        Ok(b) => b,
        Err(e) => {
            bookie.stop().await;
            meta_node.stop().await;
            return Err(e);
        }
    };
    tracing::info!(broker = %broker.addr(), bookie = %bookie.addr(), metastore = %a.metastore_listen, "standalone ready");
    shutdown.cancelled().await;
    broker.stop().await;
    bookie.stop().await;
    meta_node.stop().await;
    Ok(())
}
