//! Cluster mode: `magnetar broker` against the metastore and four bookie processes, ledgers
//! with E=3, Qw=2, Qa=2 (set with the Pulsar names), the official Python client producing,
//! and a bookie of the ensemble killed between two rounds of sends.

use std::process::Command;
use std::time::Duration;

use magnetar_broker::protocol::codec::decode_entry;
use magnetar_metastore::local_cluster::free_ports;

use crate::pulsar_python::{produce, scenario};
use crate::support::{wait_until, Cluster};

struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_writes_replicated_ledgers_through_a_bookie_failure() {
    let mut cluster = Cluster::new(4, &[], true).await;
    let ports = free_ports(2).expect("ports");
    let (addr, web) = (format!("127.0.0.1:{}", ports[0]), format!("127.0.0.1:{}", ports[1]));
    let start_broker = |cluster: &Cluster| {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(cluster.dir.path().join("broker.log"))
            .expect("log");
        Proc(
            Command::new(crate::support::bin())
                .args(["broker", "--listen", &addr, "--metastore", &cluster.meta_addr, "--web-listen", &web])
                .env("clusterName", "local")
                .env("managedLedgerDefaultEnsembleSize", "3")
                .env("managedLedgerDefaultWriteQuorum", "2")
                .env("managedLedgerDefaultAckQuorum", "2")
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("start broker"),
        )
    };
    let mut broker = start_broker(&cluster);
    let a = addr.clone();
    assert!(
        wait_until(Duration::from_secs(30), || {
            let a = a.clone();
            async move { tokio::net::TcpStream::connect(&a).await.is_ok() }
        })
        .await,
        "broker port never opened"
    );
    let url = format!("pulsar://{addr}");
    let first = produce(&url, "replicated", 30, false);
    let ledger = first[0].0;
    let client = cluster.ledger_client();
    let (md, _) = client.metadata(ledger).await.expect("metadata");
    assert_eq!((md.ensemble_size, md.write_quorum, md.ack_quorum), (3, 2, 2));
    let victim = md.fragments[0].bookies[0].clone();
    let i = cluster.index_of(&victim);
    cluster.bookies[i].kill();

    let second = produce(&url, "replicated", 30, false);
    assert!(second.iter().all(|(l, _, _)| *l == ledger), "same ledger, new ensemble");
    assert_eq!(second.last().map(|x| x.1), Some(59));
    let (md, _) = client.metadata(ledger).await.expect("metadata");
    assert!(md.fragments.len() >= 2 && !md.last_fragment().bookies.contains(&victim), "{:?}", md.fragments);

    // Consumers of every type and redelivery on the replicated ledgers.
    scenario(&url, "sub_types", "cluster");
    scenario(&url, "redelivery", "cluster");

    // A client keeps sending while the broker is SIGKILLed and restarted on the same port:
    // it reconnects, every send is acknowledged, and every acknowledged message is there.
    let u = url.clone();
    let live = std::thread::spawn(move || scenario(&u, "produce_through_restart", "cluster"));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    drop(broker);
    broker = start_broker(&cluster);
    live.join().expect("the producer went on through the restart");
    scenario(&url, "consume_through_restart", "cluster");

    // The admin API and metrics of a broker in cluster mode (it created cluster `local`,
    // tenant `public` and namespace `public/default` on first start).
    let (st, body) = crate::support::http_get(&web, "/admin/v2/namespaces/public").await.expect("admin answers");
    assert_eq!((st, body.as_str()), (200, r#"["public/default"]"#));
    let (st, body) =
        crate::support::http_get(&web, "/admin/v2/persistent/public/default/cluster-live/stats").await.expect("stats");
    assert_eq!(st, 200, "{body}");
    let stats: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(stats["subscriptions"]["check"]["msgBacklog"], 0, "{stats}");
    let (_, metrics) = crate::support::http_get(&web, "/metrics").await.expect("metrics");
    assert!(
        metrics.lines().any(|l| l.starts_with("pulsar_storage_size{cluster=\"local\"") && l.contains("cluster-live")),
        "{metrics}"
    );
    drop(broker);

    let closed = client.recover(ledger).await.expect("recover");
    assert!(closed.last_entry >= 59);
    let entries = client.open_reader(ledger).await.expect("reader").read(0, 59).await.expect("read");
    for (i, e) in entries.iter().enumerate() {
        let (_, payload) = decode_entry(e).expect("entry");
        assert_eq!(&payload[..], format!("msg-{}", i % 30).as_bytes(), "entry {i}");
    }
    cluster.shutdown().await;
}
