//! Cluster mode: `magnetar broker` processes against the metastore and bookie processes.
//! One broker with ledgers at E=3, Qw=2, Qa=2, the official Python client producing, and a
//! bookie of the ensemble killed between two rounds of sends; two brokers sharing a
//! namespace's bundles, one of them killed.

use std::time::Duration;

use magnetar_broker::http::split_location;
use magnetar_broker::protocol::codec::decode_entry;

use crate::pulsar_python::{produce, scenario};
use crate::support::{wait_until, Cluster};

/// E=3, Qw=2, Qa=2; retention keeps the ledgers of topics without subscriptions, which the
/// tests read back after the broker moved on to new ledgers.
const QUORUMS: [&str; 5] = [
    "ensemble_size=3",
    "write_quorum=2",
    "ack_quorum=2",
    "default_retention_time_in_minutes=-1",
    "default_retention_size_in_mb=-1",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_writes_replicated_ledgers_through_a_bookie_failure() {
    let mut cluster = Cluster::new(4, &[], true).await;
    let mut broker = cluster.start_broker("broker", None, &QUORUMS).await;
    let (addr, web) = (broker.addr.clone(), broker.web.clone());
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
    broker = cluster.start_broker("broker", Some((&addr, &web)), &QUORUMS).await;
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

/// GET following redirects; returns the final status, body and the hosts visited.
/// The metastore's leader is SIGKILLed while a client sends through a broker whose topic rolls
/// its ledger every 10 entries (each roll one metastore transaction, and new ledgers need the
/// bookies' registrations): the other two nodes elect a leader, the broker and the bookies go
/// on through it, every send is acknowledged, and every acknowledged message is there after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_keeps_serving_through_a_metastore_leader_failure() {
    use magnetar_broker::protocol::names::TopicName;
    use magnetar_broker::topic::{topic_key, ManagedLedgerInfo};

    let mut cluster = Cluster::with_metastore_nodes(3, 3, &[]).await;
    let sets = [&QUORUMS[..], &["managed_ledger_max_entries_per_ledger=10"]].concat();
    let broker = cluster.start_broker("broker", None, &sets).await;
    let url = broker.url();
    let u = url.clone();
    let live = std::thread::spawn(move || scenario(&u, "produce_through_restart", "failover"));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let nodes = cluster.meta_nodes.as_mut().expect("metastore node processes");
    let leader = nodes.wait_for_leader(Duration::from_secs(10)).await.expect("a leader");
    nodes.kill(leader);
    live.join().expect("the producer went on through the leader's death");
    scenario(&url, "consume_through_restart", "failover");

    let nodes = cluster.meta_nodes.as_ref().expect("metastore node processes");
    let new_leader = nodes.wait_for_leader(Duration::from_secs(10)).await.expect("a new leader");
    assert_ne!(new_leader, leader);
    // 150 messages in ledgers of 10: the topic rolled over all along, through the election too.
    let kv = cluster.meta().get(&topic_key(&TopicName::parse("failover-live").expect("name"))).await;
    let info: ManagedLedgerInfo = serde_json::from_slice(&kv.expect("get").expect("ledger list").value).expect("json");
    assert!(info.ledgers.len() >= 15, "{:?}", info.ledgers);
    drop(broker);
    cluster.shutdown().await;
}

async fn get_following(web: &str, path: &str) -> (u16, String, Vec<String>) {
    let (mut host, mut path, mut visited) = (web.to_owned(), path.to_owned(), vec![web.to_owned()]);
    for _ in 0..4 {
        let r = magnetar_broker::http::request(&host, "GET", &path, "").await.expect("HTTP");
        match (r.status, r.location) {
            (307, Some(loc)) => {
                (host, path) = split_location(&loc).expect("http location");
                visited.push(host.clone());
            }
            (status, _) => return (status, r.body, visited),
        }
    }
    panic!("redirect loop for {path}: {visited:?}");
}

/// Two brokers share the topics of a namespace by bundle: lookups and admin calls on either
/// broker reach the owner (redirects), partitioned stats add up across brokers, and when a
/// broker is SIGKILLed the other takes its bundles once its session expires, with no
/// acknowledged message lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_share_bundles_and_take_over_a_dead_broker() {
    let cluster = Cluster::new(2, &[], true).await;
    let sets = ["ensemble_size=2", "write_quorum=2", "ack_quorum=2", "metadata_store_session_timeout_ms=3000"];
    let a = cluster.start_broker("broker-a", None, &[&sets[..], &["broker_id=broker-a"]].concat()).await;
    let b = cluster.start_broker("broker-b", None, &[&sets[..], &["broker_id=broker-b"]].concat()).await;
    let http = |web: &str, method: &'static str, path: &str, body: &'static str| {
        let (web, path) = (format!("http://{web}"), path.to_owned());
        async move { magnetar_broker::http::request(&web, method, &path, body).await.expect("HTTP") }
    };

    // Both brokers are registered and listed.
    let (st, body, _) = get_following(&a.web, "/admin/v2/brokers/local").await;
    let listed: Vec<String> = serde_json::from_str(&body).expect("json");
    assert_eq!((st, listed.len()), (200, 2), "{body}");
    assert!(listed.contains(&b.web) && listed.contains(&a.web), "{listed:?}");

    // A namespace with 16 bundles and a topic with 16 partitions, made through broker A.
    let ns = "/admin/v2/namespaces/public/spread";
    assert_eq!(http(&a.web, "PUT", ns, r#"{"bundles":{"numBundles":16}}"#).await.status, 204);
    let topic = "/admin/v2/persistent/public/spread/orders";
    assert_eq!(http(&a.web, "PUT", &format!("{topic}/partitions"), "16").await.status, 204);
    // Bundles are fixed once the namespace exists.
    assert_eq!(http(&a.web, "POST", &format!("{ns}/bundles"), r#"{"numBundles":2}"#).await.status, 412);

    // Lookups through either broker agree on each partition's owner, and both own some.
    let mut owners = Vec::new();
    for i in 0..16 {
        let path = format!("/lookup/v2/topic/persistent/public/spread/orders-partition-{i}");
        let (st, body, _) = get_following(&a.web, &path).await;
        assert_eq!(st, 200, "{body}");
        let via_a: serde_json::Value = serde_json::from_str(&body).expect("json");
        let (_, body, _) = get_following(&b.web, &path).await;
        let via_b: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(via_a["brokerUrl"], via_b["brokerUrl"], "partition {i}");
        owners.push(via_a["brokerUrl"].as_str().unwrap_or_default().to_owned());
    }
    let on_b: Vec<usize> = (0..16).filter(|i| owners[*i] == b.url()).collect();
    assert!(!on_b.is_empty() && on_b.len() < 16, "bundles spread over both brokers: {owners:?}");
    assert!(owners.iter().all(|o| *o == a.url() || *o == b.url()), "{owners:?}");

    // The official client, given broker A only, produces to every partition (the binary
    // lookup sends it to B for B's partitions).
    let prefix = "persistent://public/spread/orders";
    scenario(&a.url(), "spread_produce", prefix);

    // Topics in bundles nobody owns yet: the official client, given A, is redirected
    // (authoritatively) to B for the bundles assigned to B, and B takes them.
    assert_eq!(http(&a.web, "PUT", "/admin/v2/namespaces/public/fresh", "").await.status, 204);
    scenario(&a.url(), "fresh_produce", "persistent://public/fresh/t");
    let mut fresh_on_b = 0;
    for i in 0..8 {
        let path = format!("/lookup/v2/topic/persistent/public/fresh/t-{i}");
        let (_, body, _) = get_following(&a.web, &path).await;
        let owner: serde_json::Value = serde_json::from_str(&body).expect("json");
        fresh_on_b += usize::from(owner["brokerUrl"] == b.url());
        let stats = format!("/admin/v2/persistent/public/fresh/t-{i}/stats");
        let (_, body, _) = get_following(&a.web, &stats).await;
        assert_eq!(serde_json::from_str::<serde_json::Value>(&body).expect("json")["msgInCounter"], 3, "{body}");
    }
    assert!(fresh_on_b > 0 && fresh_on_b < 8, "{fresh_on_b} of 8 fresh topics on B");

    // Admin calls about B's partitions made at A are redirected to B (and served there).
    let p = format!("{topic}-partition-{}/stats", on_b[0]);
    let r = http(&a.web, "GET", &p, "").await;
    assert_eq!(r.status, 307, "{}", r.body);
    let loc = r.location.unwrap_or_default();
    assert_eq!(split_location(&loc).expect("http location"), (b.web.clone(), p.clone()));
    let (st, body, visited) = get_following(&a.web, &p).await;
    assert_eq!((st, visited.len()), (200, 2), "{body}");
    let stats: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(stats["msgInCounter"].as_u64().unwrap_or(0) > 0, "{stats}");
    // Partitioned stats at A add up the partitions on both brokers.
    let (st, body, visited) = get_following(&a.web, &format!("{topic}/partitioned-stats")).await;
    assert_eq!((st, visited.len()), (200, 1), "{body}");
    let stats: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(stats["msgInCounter"], 200, "{stats}");
    assert_eq!(stats["partitions"].as_object().map(|m| m.len()), Some(16));
    // Magnetar's own tools follow lookups too: a producer started at B for A's partition.
    let on_a = (0..16).find(|i| !on_b.contains(i)).expect("a partition on A");
    let c = magnetar_broker::client::Client::connect_for(&b.addr, &format!("{prefix}-partition-{on_a}"))
        .await
        .expect("connect through a lookup");
    let mut p = c.producer(&format!("{prefix}-partition-{on_a}")).await.expect("producer on the owner");
    p.send(b"via-b", 0).expect("send");
    assert!(matches!(p.receipt().await, Some((_, Ok(_)))), "the send is acknowledged");
    drop((p, c));
    // Each broker's metrics show only the partitions it serves.
    let (_, metrics) = crate::support::http_get(&b.web, "/metrics").await.expect("metrics");
    let served = |i: usize| metrics.contains(&format!("topic=\"{prefix}-partition-{i}\""));
    assert!((0..16).all(|i| served(i) == on_b.contains(&i)), "{on_b:?}\n{metrics}");

    // B dies. Once its session expires, A takes its bundles: lookups at A answer A, and the
    // client finds every message.
    drop(b);
    let (a_web, a_url, victim) = (a.web.clone(), a.url(), on_b[0]);
    let moved = wait_until(Duration::from_secs(30), || {
        let (web, url) = (a_web.clone(), a_url.clone());
        async move {
            let path = format!("/lookup/v2/topic/persistent/public/spread/orders-partition-{victim}");
            let r = magnetar_broker::http::request(&format!("http://{web}"), "GET", &path, "").await;
            r.is_ok_and(|r| r.body.contains(&url))
        }
    })
    .await;
    assert!(moved, "broker A never took over B's bundles");
    scenario(&a.url(), "spread_consume", prefix);
    let (_, body, _) = get_following(&a.web, "/admin/v2/brokers/local").await;
    assert_eq!(serde_json::from_str::<Vec<String>>(&body).expect("json"), vec![a.web.clone()]);

    // Deleting the partitioned topic at A removes every partition.
    let r = http(&a.web, "DELETE", &format!("{topic}/partitions?force=true"), "").await;
    assert_eq!(r.status, 204, "{}", r.body);
    let meta = cluster.meta();
    assert!(meta.list("/topics/persistent/public/spread/").await.expect("list").is_empty());
    drop(a);
    cluster.shutdown().await;
}

/// A broker whose metastore session ends (here: closed from outside, as when the leader
/// expires it) gives up every topic, registers again under a new session, and serves the
/// topics again on the next use, loading them afresh (a new ledger).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_unloads_its_topics_when_its_session_is_lost() {
    let cluster = Cluster::new(1, &[], true).await;
    // Retention keeps the ledger list the test counts (the topic has no subscription).
    let settings = [
        "broker_id=solo",
        "metadata_store_session_timeout_ms=3000",
        "default_retention_time_in_minutes=-1",
        "default_retention_size_in_mb=-1",
    ];
    let broker = cluster.start_broker("broker", None, &settings).await;
    let first = produce(&broker.url(), "persistent://public/default/lease", 5, false);
    let meta = cluster.meta();
    let registered = meta.get("/brokers/solo").await.expect("get").expect("registered");
    let topic_key = "/topics/persistent/public/default/lease";
    let ledgers = |kv: Option<magnetar_metastore::client::Kv>| {
        let info: magnetar_broker::topic::ManagedLedgerInfo =
            serde_json::from_slice(&kv.expect("topic").value).expect("json");
        info.ledgers.len()
    };
    assert_eq!(ledgers(meta.get(topic_key).await.expect("get")), 1);
    let owned: Vec<_> = meta.list("/ownership/public/default/").await.expect("list");
    assert_eq!(owned.len(), 1, "{owned:?}");
    assert_eq!(owned[0].session, registered.session);

    meta.close_session(registered.session).await.expect("close the broker's session");
    let m = meta.clone();
    let again = wait_until(Duration::from_secs(20), || {
        let m = m.clone();
        async move { m.get("/brokers/solo").await.ok().flatten().is_some_and(|kv| kv.session != registered.session) }
    })
    .await;
    assert!(again, "the broker registered again under a new session");
    // The topic was unloaded (its ledger closed); the next use loads it with a new ledger
    // under a new ownership.
    let more = produce(&broker.url(), "persistent://public/default/lease", 5, false);
    let info_kv = meta.get(topic_key).await.expect("get");
    assert_eq!(ledgers(info_kv), 2, "loaded again with a new ledger");
    let owned: Vec<_> = meta.list("/ownership/public/default/").await.expect("list");
    let now = meta.get("/brokers/solo").await.expect("get").expect("registered");
    assert!(owned.len() == 1 && owned[0].session == now.session, "{owned:?}");
    assert!(more.iter().all(|(l, _, _)| *l != first[0].0), "written to the new ledger");
    drop(broker);
    cluster.shutdown().await;
}

/// Two brokers given the same id: the second refuses to start once the first's registration
/// outlives twice the session timeout and 5 s, and the first keeps its registration. A broker
/// restarted under that id at another address after the first died starts once the dead
/// one's session expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_id_held_by_a_live_broker_is_refused() {
    let cluster = Cluster::new(1, &[], true).await;
    let settings = ["broker_id=same", "metadata_store_session_timeout_ms=2000"];
    let mut first = cluster.start_broker("first", None, &settings).await;
    let meta = cluster.meta();
    let registered = meta.get("/brokers/same").await.expect("get").expect("registered");

    let started = std::time::Instant::now();
    let mut second = cluster.spawn_broker("second", None, &settings);
    let status = second.exited_within(Duration::from_secs(20)).await;
    let log = second.log();
    assert!(status.is_some_and(|s| !s.success()), "the second broker exits with an error: {status:?}\n{log}");
    assert!(
        started.elapsed() >= Duration::from_millis(2500),
        "it waited out the first's session timeout: {:?}",
        started.elapsed()
    );
    assert!(
        log.contains("broker id `same` is registered by a live broker at") && log.contains(&first.url()),
        "the error names the id and the live broker: {log}"
    );
    let now = meta.get("/brokers/same").await.expect("get").expect("still registered");
    assert_eq!(
        (now.session, now.version),
        (registered.session, registered.version),
        "the first keeps its registration"
    );
    assert!(first.exited_within(Duration::ZERO).await.is_none(), "the first broker still runs");
    produce(&first.url(), "persistent://public/default/still-served", 2, false);

    // The first dies; a broker under the same id at another address waits for its session
    // to expire, then registers.
    drop(first);
    let third = cluster.start_broker("third", None, &settings).await;
    assert!(
        third.log().contains("waiting for its session to end"),
        "it waited for the first's session: {}",
        third.log()
    );
    let now = meta.get("/brokers/same").await.expect("get").expect("registered");
    assert_ne!(now.session, registered.session);
    assert!(String::from_utf8_lossy(&now.value).contains(&third.url()), "{:?}", String::from_utf8_lossy(&now.value));
    produce(&third.url(), "persistent://public/default/still-served", 2, false);
    drop(third);
    cluster.shutdown().await;
}

/// A topic whose load is slow (its last ledger is unclosed and its only bookie frozen, so
/// recovery waits out timeouts and retries) holds up nothing else on the client's connection:
/// a producer of another topic on it keeps getting receipts meanwhile. Once the bookie thaws,
/// the slow topic loads and takes messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_topic_load_holds_up_nothing_else_on_the_connection() {
    use magnetar_broker::client::Client;

    let cluster = Cluster::new(3, &[], true).await;
    let sets = ["ensemble_size=1", "write_quorum=1", "ack_quorum=1"];
    let broker = cluster.start_broker("broker", None, &sets).await;
    let (addr, web) = (broker.addr.clone(), broker.web.clone());
    let ids = produce(&broker.url(), "slow", 1, false);
    drop(broker);
    let (md, _) = cluster.ledger_client().metadata(ids[0].0).await.expect("metadata");
    let frozen = cluster.index_of(&md.fragments[0].bookies[0]);
    cluster.bookies[frozen].freeze(true);
    // New ledgers go elsewhere once its registration has lapsed.
    let key = magnetar_bookie::server::available_key(&cluster.bookies[frozen].id);
    let meta = cluster.meta();
    let lapsed = wait_until(Duration::from_secs(20), || async { matches!(meta.get(&key).await, Ok(None)) }).await;
    assert!(lapsed, "the frozen bookie's registration never lapsed");
    let broker = cluster.start_broker("broker", Some((&addr, &web)), &sets).await;

    let client = Client::connect(&broker.addr).await.expect("connect");
    let mut fast = client.producer("persistent://public/default/fast").await.expect("fast producer");
    let slow = tokio::spawn({
        let client = client.clone();
        async move { client.producer("persistent://public/default/slow").await.map(|_| ()) }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!slow.is_finished(), "the slow topic should still be loading");
    for i in 0..10u64 {
        fast.send(format!("f-{i}").as_bytes(), 0).expect("send");
        let r = tokio::time::timeout(Duration::from_secs(3), fast.receipt()).await;
        let (seq, result) = r.expect("a receipt while another topic loads").expect("connection open");
        assert_eq!(seq, i);
        result.expect("stored");
    }
    assert!(!slow.is_finished(), "the slow topic's load should not have finished with its bookie frozen");

    cluster.bookies[frozen].freeze(false);
    let first = tokio::time::timeout(Duration::from_secs(90), slow).await.expect("the slow load ends").expect("join");
    if first.is_err() {
        // Its recovery gave up while the bookie was frozen: the next use loads it.
        client.producer("persistent://public/default/slow").await.expect("slow producer");
    }
    drop(broker);
    cluster.shutdown().await;
}

/// Back-pressure: while a topic's bookie is frozen, a connection stops being read once
/// `max_pending_publish_requests_per_connection` of its sends wait, and every connection once
/// the sends waiting across the broker hold `max_message_publish_buffer_size_in_mb`; once the
/// bookie answers, reading resumes and every send is acknowledged, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_stops_reading_producers_that_outrun_its_bookies() {
    use magnetar_broker::client::Client;

    let cluster = Cluster::new(3, &[], true).await;
    let sets = [
        "ensemble_size=1",
        "write_quorum=1",
        "ack_quorum=1",
        "max_pending_publish_requests_per_connection=10",
        "max_message_publish_buffer_size_in_mb=1",
    ];
    let broker = cluster.start_broker("broker", None, &sets).await;
    let web = broker.web.clone();
    let gauges = || async {
        let (_, text) = crate::support::http_get(&web, "/metrics").await.expect("metrics");
        let m = crate::support::scrape(&text);
        let g = |name: &str| m.get(&format!("{name}{{cluster=\"local\"}}")).copied().unwrap_or(-1.0) as i64;
        (
            g("magnetar_broker_publish_pending"),
            g("magnetar_broker_publish_buffer_bytes"),
            g("pulsar_broker_throttled_connections"),
            g("pulsar_broker_throttled_connections_global_limit"),
        )
    };
    let topic = "persistent://public/default/pressure";
    let (a, b) =
        (Client::connect(&broker.addr).await.expect("connect"), Client::connect(&broker.addr).await.expect("connect"));
    let (mut pa, mut pb) = (a.producer(topic).await.expect("producer"), b.producer(topic).await.expect("producer"));
    pa.send(b"first", 0).expect("send");
    let (_, first) = pa.receipt().await.expect("receipt");
    let ledger = first.expect("stored").ledger_id;
    let (md, _) = cluster.ledger_client().metadata(ledger).await.expect("metadata");
    let frozen = cluster.index_of(&md.fragments[0].bookies[0]);

    // The per-connection limit: 100 small sends, of which the broker reads 10.
    cluster.bookies[frozen].freeze(true);
    for i in 0..100 {
        pa.send(format!("small-{i}").as_bytes(), 0).expect("send");
    }
    let held = wait_until(Duration::from_secs(3), || async {
        let (pending, _, throttled, global) = gauges().await;
        (pending, throttled, global) == (10, 1, 0)
    })
    .await;
    let (pending, bytes, throttled, global) = gauges().await;
    assert!(held, "pending {pending}, throttled {throttled}, global {global}");
    assert!(bytes > 0 && bytes < 10 * 200, "{bytes} bytes for 10 small sends");
    cluster.bookies[frozen].freeze(false);
    for i in 1..=100u64 {
        let r = tokio::time::timeout(Duration::from_secs(30), pa.receipt()).await;
        let (seq, result) = r.expect("a receipt").expect("connection open");
        assert_eq!(seq, i, "receipts in order");
        result.unwrap_or_else(|e| panic!("send {seq} failed: {e}"));
    }
    assert_eq!(gauges().await, (0, 0, 0, 0));

    // The broker-wide limit: 200 KiB sends from two connections stop both at about 1 MiB.
    cluster.bookies[frozen].freeze(true);
    let big = vec![7u8; 200 << 10];
    for _ in 0..8 {
        pa.send(&big, 0).expect("send");
        pb.send(&big, 0).expect("send");
    }
    let held = wait_until(Duration::from_secs(3), || async { gauges().await.3 == 2 }).await;
    let (pending, bytes, throttled, global) = gauges().await;
    assert!(held, "pending {pending}, {bytes} bytes, throttled {throttled}, global {global}");
    assert_eq!(throttled, 2);
    // Each connection may have read one more send while the other filled the budget.
    assert!((1 << 20..(1 << 20) + 2 * (210 << 10)).contains(&bytes), "{bytes} bytes held, {pending} sends");
    cluster.bookies[frozen].freeze(false);
    for (p, from) in [(&mut pa, 101u64), (&mut pb, 0)] {
        for i in 0..8 {
            let r = tokio::time::timeout(Duration::from_secs(30), p.receipt()).await;
            let (seq, result) = r.expect("a receipt").expect("connection open");
            assert_eq!(seq, from + i, "receipts in order");
            result.unwrap_or_else(|e| panic!("send {seq} failed: {e}"));
        }
    }
    assert_eq!(gauges().await, (0, 0, 0, 0));
    drop(broker);
    cluster.shutdown().await;
}

/// A producer and a consumer closed by their client while their topic still loads (a client
/// that timed out waiting, or closed at once) are not registered once it has loaded: the name
/// and the exclusive subscription are free for the next producer and consumer, even on the
/// same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_client_closes_while_its_topic_loads_is_not_registered() {
    use magnetar_broker::protocol::codec::base;
    use magnetar_broker::protocol::pb::{self, base_command::Type, command_subscribe::SubType};

    let cluster = Cluster::new(1, &[], true).await;
    let sets = ["ensemble_size=1", "write_quorum=1", "ack_quorum=1"];
    let broker = cluster.start_broker("broker", None, &sets).await;
    let (addr, web) = (broker.addr.clone(), broker.web.clone());
    produce(&broker.url(), "early", 1, false);
    drop(broker);
    // Loading the topic again recovers its ledger, which waits for the frozen bookie.
    cluster.bookies[0].freeze(true);
    let broker = cluster.start_broker("broker", Some((&addr, &web)), &sets).await;
    let topic = "persistent://public/default/early";
    let producer = |producer_id: u64, request_id: u64| pb::BaseCommand {
        producer: Some(Box::new(pb::CommandProducer {
            topic: topic.into(),
            producer_id,
            request_id,
            producer_name: Some("early".into()),
            ..Default::default()
        })),
        ..base(Type::Producer)
    };
    let subscribe = |consumer_id: u64, request_id: u64| pb::BaseCommand {
        subscribe: Some(Box::new(pb::CommandSubscribe {
            topic: topic.into(),
            subscription: "early-sub".into(),
            sub_type: SubType::Exclusive as i32,
            consumer_id,
            request_id,
            ..Default::default()
        })),
        ..base(Type::Subscribe)
    };
    let mut c = crate::support::RawConn::connect(&broker.addr).await;
    c.send(producer(1, 1)).await;
    c.send(subscribe(1, 2)).await;
    let close_producer = pb::CommandCloseProducer { producer_id: 1, request_id: 3, ..Default::default() };
    c.send(pb::BaseCommand { close_producer: Some(Box::new(close_producer)), ..base(Type::CloseProducer) }).await;
    let close_consumer = pb::CommandCloseConsumer { consumer_id: 1, request_id: 4, ..Default::default() };
    c.send(pb::BaseCommand { close_consumer: Some(Box::new(close_consumer)), ..base(Type::CloseConsumer) }).await;
    let mut answers = Vec::new();
    for _ in 0..2 {
        let a = tokio::time::timeout(Duration::from_secs(5), c.next()).await.expect("closes answered").expect("open");
        answers.push((a.r#type, a.success.map(|s| s.request_id)));
    }
    assert_eq!(answers, [(Type::Success as i32, Some(3)), (Type::Success as i32, Some(4))]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.bookies[0].freeze(false);
    // The topic loads; the closed producer and consumer are refused, not registered.
    for request_id in [1, 2] {
        let a = tokio::time::timeout(Duration::from_secs(60), c.next()).await.expect("an answer").expect("open");
        let e = a.error.clone().unwrap_or_else(|| panic!("request {request_id} served after its close: {a:?}"));
        assert_eq!((e.request_id, e.error), (request_id, pb::ServerError::ServiceNotReady as i32), "{e:?}");
    }
    let a = c.ask(producer(2, 5)).await;
    assert_eq!(a.r#type, Type::ProducerSuccess as i32, "the name is free: {a:?}");
    let a = c.ask(subscribe(2, 6)).await;
    assert_eq!(a.r#type, Type::Success as i32, "the subscription is free: {a:?}");
    drop(broker);
    cluster.shutdown().await;
}
