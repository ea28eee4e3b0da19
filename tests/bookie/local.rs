//! A ledger client given an in-process bookie (as `magnetar standalone` runs it): adds for that
//! bookie go straight to its journal instead of over gRPC. The ledger protocol still holds:
//! acknowledged entries are on disk and read back after a restart, and recovery by another
//! client fences the in-process writer.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use magnetar_bookie::client::{LedgerClient, LedgerConfig, LedgerError, LedgerOptions};
use magnetar_bookie::{Bookie, BookieConfig};
use magnetar_metastore::local_cluster::free_ports;
use tokio_util::sync::CancellationToken;

use crate::support::{payload, Cluster};

fn config(cluster: &Cluster, root: &Path, listen: &str, advertise: &str) -> BookieConfig {
    BookieConfig {
        bookie_id: "in-process".into(),
        listen_addr: listen.to_owned(),
        advertise_addr: advertise.to_owned(),
        http_addr: String::new(),
        journal_dirs: vec![root.join("journal")],
        ledger_dirs: vec![root.join("ledgers")],
        metastore: vec![cluster.meta_addr.clone()],
        disk_usage_threshold: crate::support::DISK_USAGE_ENV.1.parse().expect("threshold"),
        ..Default::default()
    }
}

fn free_addr() -> String {
    format!("127.0.0.1:{}", free_ports(1).expect("port")[0])
}

fn options() -> LedgerOptions {
    LedgerOptions {
        add_timeout: Duration::from_secs(3),
        ensemble_change_timeout: Duration::from_secs(1),
        ..Default::default()
    }
}

/// The bookie advertises an address nobody listens on, so every add that reached it came
/// through the in-process path; after a restart on its real address, another client reads
/// every acknowledged entry back over gRPC with the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_adds_skip_grpc_and_survive_a_restart() {
    let cluster = Cluster::new(0, &[], true).await;
    let root = cluster.dir.path().join("in-process");
    let listen = free_addr();
    let unreachable = free_addr();
    let stop = CancellationToken::new();
    let bookie = Bookie::start(config(&cluster, &root, &listen, &unreachable), stop.clone()).await.expect("bookie");

    let client = LedgerClient::with_local_bookie(cluster.meta(), options(), bookie.local());
    let w = client.create(LedgerConfig::new(1, 1, 1)).await.expect("create");
    let id = w.id();
    assert_eq!(w.metadata().fragments[0].bookies, vec!["in-process".to_owned()]);
    let mut acked: BTreeMap<i64, Vec<u8>> = BTreeMap::new();
    let mut inflight = FuturesUnordered::new();
    for e in 0..600i64 {
        let p = payload(id, e, 3000);
        let f = w.append(p.clone());
        inflight.push(async move { (f.await, p) });
        if inflight.len() >= 64 {
            let (r, p) = inflight.next().await.expect("in flight");
            let e = r.expect("an in-process add failed");
            acked.insert(e, p);
        }
    }
    while let Some((r, p)) = inflight.next().await {
        let e = r.expect("an in-process add failed");
        acked.insert(e, p);
    }
    assert_eq!(acked.keys().copied().collect::<Vec<_>>(), (0..600).collect::<Vec<_>>());
    assert_eq!(w.metadata().fragments.len(), 1, "no ensemble change: the bookie never failed an add");
    let md = w.close().await.expect("close");
    assert_eq!(md.last_entry, 599);

    stop.cancel();
    bookie.stop().await;
    // The entry store closes once the last handle is gone; the writer's in-process stream
    // ends (and drops its handle) just after its close.
    drop(client);
    let stop = CancellationToken::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let bookie = loop {
        match Bookie::start(config(&cluster, &root, &listen, &listen), stop.clone()).await {
            Ok(b) => break b,
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "the previous bookie is not released yet");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("restart: {e}"),
        }
    };
    let remote = LedgerClient::new(cluster.meta(), options());
    let entries = remote.open_reader(id).await.expect("reader").read(0, 599).await.expect("read over gRPC");
    assert_eq!(entries.len(), 600);
    for (e, p) in &acked {
        assert_eq!(&entries[*e as usize][..], &p[..], "entry {e}");
    }
    stop.cancel();
    bookie.stop().await;
    cluster.shutdown().await;
}

/// Recovery by another client fences the ledger on the bookie (over gRPC); the in-process
/// writer's next add is refused, and nothing it wrote before is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_fences_an_in_process_writer() {
    let cluster = Cluster::new(0, &[], true).await;
    let root = cluster.dir.path().join("in-process");
    let listen = free_addr();
    let stop = CancellationToken::new();
    let bookie = Bookie::start(config(&cluster, &root, &listen, &listen), stop.clone()).await.expect("bookie");

    let local = LedgerClient::with_local_bookie(cluster.meta(), options(), bookie.local());
    let w = local.create(LedgerConfig::new(1, 1, 1)).await.expect("create");
    let id = w.id();
    for e in 0..50 {
        assert_eq!(w.append(payload(id, e, 500)).await.expect("add"), e);
    }
    let remote = LedgerClient::new(cluster.meta(), options());
    let md = remote.recover(id).await.expect("recover");
    assert_eq!(md.last_entry, 49);
    match w.append(payload(id, 50, 500)).await {
        Err(LedgerError::Fenced(l)) => assert_eq!(l, id),
        other => panic!("a fenced ledger must refuse the in-process writer's add: {other:?}"),
    }
    let entries = remote.open_reader(id).await.expect("reader").read(0, 49).await.expect("read");
    for (e, got) in entries.iter().enumerate() {
        assert_eq!(&got[..], &payload(id, e as i64, 500)[..], "entry {e}");
    }
    stop.cancel();
    bookie.stop().await;
    cluster.shutdown().await;
}
