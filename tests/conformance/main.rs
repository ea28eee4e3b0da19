//! Client conformance with the official Pulsar Python client (`pulsar-client` from PyPI)
//! against `magnetar standalone`. The interpreter is `$MAGNETAR_PYTHON`, or the virtualenv
//! `.ci/run` creates at `~/.cache/magnetar-venv`. Built so far: producing, with batching off
//! and on; every acknowledged message is read back from the topic's ledger.

use std::process::{Child, Command};
use std::time::Duration;

use magnetar_bookie::client::{LedgerClient, LedgerOptions};
use magnetar_broker::protocol::codec::{decode_entry, split_batch};
use magnetar_metastore::client::MetaClient;
use magnetar_metastore::local_cluster::free_ports;

struct Standalone {
    child: Child,
    broker: String,
    web: String,
    metastore: String,
    metastore_http: String,
    bookie: String,
    bookie_http: String,
    _dir: tempfile::TempDir,
    settings: Vec<String>,
}

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn standalone() -> Standalone {
    start_in(tempfile::tempdir().expect("tempdir"), &[]).await
}

/// A standalone with broker settings (`key=value`).
async fn standalone_with(settings: &[&str]) -> Standalone {
    start_in(tempfile::tempdir().expect("tempdir"), settings).await
}

async fn start_in(dir: tempfile::TempDir, settings: &[&str]) -> Standalone {
    let p = free_ports(6).expect("ports");
    let addr = |i: usize| format!("127.0.0.1:{}", p[i]);
    let log = std::fs::File::options().create(true).append(true).open(dir.path().join("standalone.log")).expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_magnetar"))
        .arg("standalone")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args([
            "--metastore-listen",
            &addr(0),
            "--bookie-listen",
            &addr(1),
            "--bookie-http",
            &addr(2),
            "--broker-listen",
            &addr(3),
            "--web-listen",
            &addr(4),
            "--metastore-http",
            &addr(5),
        ])
        .args(settings.iter().flat_map(|s| ["--set", s]))
        .env(cluster::DISK_USAGE_ENV.0, cluster::DISK_USAGE_ENV.1)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start standalone");
    let s = Standalone {
        child,
        broker: addr(3),
        web: addr(4),
        metastore: addr(0),
        metastore_http: addr(5),
        bookie: addr(1),
        bookie_http: addr(2),
        _dir: dir,
        settings: settings.iter().map(|s| s.to_string()).collect(),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(&s.broker).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "standalone did not open the broker port");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s
}

impl Standalone {
    /// SIGTERM, wait for a clean exit, start again over the same data directory.
    async fn restart(self) -> Standalone {
        self.restart_with("-TERM").await
    }

    /// Stops with `signal` (`-TERM`: must exit cleanly; `-KILL`: a crash), then starts again
    /// over the same data directory.
    async fn restart_with(mut self, signal: &str) -> Standalone {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args([signal, &pid]).status().expect("kill").success());
        let status = self.child.wait().expect("wait");
        assert!(signal != "-TERM" || status.success(), "standalone exited with {status}");
        let dir = tempfile::tempdir().expect("placeholder");
        let data = std::mem::replace(&mut self._dir, dir);
        let settings = std::mem::take(&mut self.settings);
        drop(self);
        let settings: Vec<&str> = settings.iter().map(|s| s.as_str()).collect();
        start_in(data, &settings).await
    }
}

/// Every message id points at an entry of the topic's ledger holding that message.
async fn check_stored(metastore: &str, ids: &[(u64, u64, i64)]) {
    let meta = MetaClient::connect(&[metastore.to_owned()]).expect("meta");
    let ledgers = LedgerClient::new(meta, LedgerOptions::default());
    let ledger = ids[0].0;
    assert!(ids.iter().all(|(l, _, _)| *l == ledger), "one ledger per topic so far");
    let last = ids.iter().map(|(_, e, _)| *e).max().expect("ids") as i64;
    // Take the ledger over as a new writer would: this fences the broker's writer (the test
    // is done with the topic) and closes the ledger at an end that covers every acked entry.
    let md = ledgers.recover(ledger).await.expect("recover");
    assert!(md.last_entry >= last, "closed at {} below acknowledged entry {last}", md.last_entry);
    let entries = ledgers.open_reader(ledger).await.expect("reader").read(0, md.last_entry).await.expect("read");
    for (i, (_, entry, batch_index)) in ids.iter().enumerate() {
        let (md, payload) = decode_entry(&entries[*entry as usize]).expect("entry");
        let body = if *batch_index >= 0 {
            let items = split_batch(&payload, md.num_messages_in_batch.unwrap_or(1) as usize).expect("batch");
            items[*batch_index as usize].payload.clone()
        } else {
            payload
        };
        assert_eq!(&body[..], format!("msg-{i}").as_bytes(), "message {i} at {entry}/{batch_index}");
    }
}

mod admin;
/// The bookie suite's cluster harness (metastore, bookie and broker processes).
#[path = "../bookie/support.rs"]
#[allow(dead_code)]
mod cluster;
mod retention;
mod rust_client;

#[path = "../support/pulsar_python.rs"]
mod pulsar_python;
use pulsar_python::{produce, scenario};

impl Standalone {
    fn url(&self) -> String {
        format!("pulsar://{}", self.broker)
    }
}

/// Runs `magnetar admin --url <web> <args>`: (success, stdout, stderr).
fn magnetar_admin(web: &str, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_magnetar"))
        .args(["admin", "--url", web])
        .args(args)
        .output()
        .expect("run magnetar admin");
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// Exclusive, Shared, Failover and Key_Shared subscriptions with batching off and on, and
/// every compression codec.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_consumes_with_every_subscription_type_and_codec() {
    let s = standalone().await;
    scenario(&s.url(), "sub_types", "types");
    scenario(&s.url(), "failover", "types");
    scenario(&s.url(), "key_shared_sticky", "types");
    scenario(&s.url(), "key_shared_sticky_alone", "types");
    scenario(&s.url(), "pattern", "types");
    scenario(&s.url(), "compression", "codec");
}

/// Delayed delivery with the Python client (see the `delayed_delivery` scenario). Cursors are
/// stored only every minute here: held entries must come out on their own timer, not on that
/// tick. A message still held when the broker restarts is held again until it is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_delayed_delivery() {
    let s = standalone_with(&["cursor_persist_interval_ms=60000"]).await;
    scenario(&s.url(), "delayed_delivery", "delay");
    scenario(&s.url(), "delayed_before_restart", "delay");
    let s = s.restart().await;
    scenario(&s.url(), "delayed_after_restart", "delay");
}

/// Producer access modes with the Python client: Exclusive, WaitForExclusive and
/// ExclusiveWithFencing (see the `access_modes` scenario). Each producer that took exclusive
/// access moved the topic epoch on, and the epoch is stored with the topic, so a fenced
/// producer stays fenced wherever the topic loads next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_producer_access_modes() {
    use magnetar_broker::protocol::names::TopicName;
    use magnetar_broker::topic::{topic_key, ManagedLedgerInfo};

    let s = standalone().await;
    scenario(&s.url(), "access_modes", "access");
    let meta = magnetar_metastore::client::MetaClient::connect(std::slice::from_ref(&s.metastore)).expect("meta");
    let key = topic_key(&TopicName::parse("access-access").expect("name"));
    let kv = meta.get(&key).await.expect("get").expect("the topic is stored");
    let info: ManagedLedgerInfo = serde_json::from_slice(&kv.value).expect("json");
    assert_eq!(info.topic_epoch, 4, "four producers took exclusive access");
}

/// Messages redelivered after a consumer closes come back in publish order for every type
/// that keeps order, when some are still in the tail cache (1 MB here, entries kept a minute)
/// and the older ones must be read from the bookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_gets_redeliveries_in_order() {
    let s = standalone_with(&[
        "managed_ledger_cache_size_mb=1",
        "managed_ledger_cache_eviction_time_threshold_millis=60000",
    ])
    .await;
    scenario(&s.url(), "redelivery_order", "order");
}

/// Redelivery when a consumer closes, nack with redelivery counts, REDELIVER of everything
/// unacknowledged, the dead-letter policy, cumulative acks across a reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_acks_redelivery_and_dead_letters() {
    let s = standalone().await;
    scenario(&s.url(), "redelivery", "acks");
    scenario(&s.url(), "dead_letter", "acks");
    scenario(&s.url(), "cumulative", "acks");
}

/// An admin unload: the topic's producer and consumer reconnect and go on. Then a cumulative
/// ack that names another topic's ledger (between two of this topic's, made by an unload)
/// acknowledges nothing. Then an unload in the middle of asynchronous sends loses none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_goes_on_after_an_unload() {
    let s = standalone().await;
    pulsar_python::scenario_with_web(&s.url(), &s.web, "unload", "unload");
    pulsar_python::scenario_with_web(&s.url(), &s.web, "foreign_ack", "unload");
    pulsar_python::scenario_with_web(&s.url(), &s.web, "unload_while_sending", "unload");
}

/// A SEEK is answered only once the reset subscription is stored: a broker killed right after
/// answering comes back at the position sought (cursor writes otherwise wait for their
/// interval, a minute here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seek_is_stored_before_it_is_answered() {
    let s = standalone_with(&["cursor_persist_interval_ms=60000"]).await;
    scenario(&s.url(), "seek_stored_before", "sk");
    let s = s.restart_with("-KILL").await;
    scenario(&s.url(), "seek_stored_after", "sk");
}

/// Seek by id and by time, readers from earliest/latest/an id, last message id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_seeks_and_reads() {
    let s = standalone().await;
    scenario(&s.url(), "seek", "pos");
    scenario(&s.url(), "readers", "pos");
    scenario(&s.url(), "last_message_id", "pos");
}

/// With no tail cache and ledgers of 7 entries, every read goes to the bookie and crosses
/// ledger boundaries: the same scenarios still hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_read_from_bookies_across_ledger_rollovers() {
    use magnetar_broker::protocol::names::TopicName;
    use magnetar_broker::topic::{topic_key, ManagedLedgerInfo};

    // Retention keeps the consumed ledgers, whose list is checked at the end.
    let s = standalone_with(&[
        "managed_ledger_cache_size_mb=0",
        "managed_ledger_max_entries_per_ledger=7",
        "default_retention_time_in_minutes=-1",
        "default_retention_size_in_mb=-1",
    ])
    .await;
    scenario(&s.url(), "cumulative", "cold");
    scenario(&s.url(), "seek", "cold");
    scenario(&s.url(), "readers", "cold");
    scenario(&s.url(), "redelivery", "cold");
    let meta = MetaClient::connect(std::slice::from_ref(&s.metastore)).expect("meta");
    let key = topic_key(&TopicName::parse("cold-seek").expect("name"));
    let kv = meta.get(&key).await.expect("get").expect("topic metadata");
    let info: ManagedLedgerInfo = serde_json::from_slice(&kv.value).expect("json");
    assert!(info.ledgers.len() >= 3, "20 entries in ledgers of 7: {:?}", info.ledgers);
    assert!(info.ledgers[..info.ledgers.len() - 1].iter().all(|l| l.last_entry == Some(6)), "{:?}", info.ledgers);
}

/// A partitioned topic (partition count stored as the admin API will store it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_uses_partitioned_topics() {
    use magnetar_broker::protocol::names::TopicName;
    use magnetar_broker::topic::partitioned_key;
    use magnetar_metastore::client::PutOptions;

    let s = standalone().await;
    let meta = MetaClient::connect(std::slice::from_ref(&s.metastore)).expect("meta");
    let key = partitioned_key(&TopicName::parse("parted").expect("name"));
    meta.put(&key, br#"{"partitions":3}"#.to_vec(), PutOptions::default()).await.expect("put");
    scenario(&s.url(), "partitioned", "parted");
    // Auto-created partitioned topics.
    let s2 = standalone_with(&["allow_auto_topic_creation_type=partitioned", "default_num_partitions=3"]).await;
    scenario(&s2.url(), "partitioned", "auto-parted");
}

/// A clean restart keeps the subscription position: exactly the unacknowledged messages come
/// back, none of the acknowledged ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_subscription_positions() {
    let s = standalone().await;
    scenario(&s.url(), "restart_before", "keep");
    let s = s.restart().await;
    scenario(&s.url(), "restart_after", "keep");
}

/// Message deduplication through the Python client: on for `public/default` by the
/// namespace's policy, a resent sequence id is answered as sent and stored once, also after a
/// SIGKILL (the last snapshot, every 3 entries here and on close, and a replay of the entries
/// after it); off in another namespace, a resend is stored again; turned on for a topic with
/// messages, it starts from the topic's end; turned off, the snapshot goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_deduplication() {
    // Messages over 100 kB go in chunks.
    let s = standalone_with(&["broker_deduplication_entries_interval=3", "max_message_size=100000"]).await;
    let web = format!("http://{}", s.web);
    for (method, path, body) in [
        ("POST", "/admin/v2/namespaces/public/default/deduplication", "true"),
        // Consumed ledgers stay: deleting them stores a snapshot first, which would race with
        // the sends the test keeps out of any snapshot.
        (
            "POST",
            "/admin/v2/namespaces/public/default/retention",
            r#"{"retentionTimeInMinutes":-1,"retentionSizeInMB":-1}"#,
        ),
        ("PUT", "/admin/v2/namespaces/public/nodedup", ""),
    ] {
        let r = magnetar_broker::http::request_following(&web, method, path, body).await.expect("admin");
        assert_eq!(r.status, 204, "{path}: {}", r.body);
    }
    scenario(&s.url(), "dedup_chunked", "dedup");
    scenario(&s.url(), "dedup_before_restart", "dedup");
    // A snapshot is stored once 3 entries are past the last one (one of these 10 at least),
    // and one of all 10 when the topic closes (an unload). Two more entries stay out of any,
    // so the restarted topic must replay them.
    let meta = MetaClient::connect(std::slice::from_ref(&s.metastore)).expect("meta");
    let name =
        magnetar_broker::protocol::names::TopicName::parse("persistent://public/default/dedup-dedup").expect("name");
    let key = magnetar_broker::topic::dedup_key(&name);
    let snapshot_of = |meta: MetaClient, key: String| async move {
        let kv = meta.get(&key).await.expect("get")?;
        let snap: serde_json::Value = serde_json::from_slice(&kv.value).expect("json");
        snap["producers"]["dedup-p"].as_i64()
    };
    let start = std::time::Instant::now();
    while snapshot_of(meta.clone(), key.clone()).await.is_none_or(|seq| seq < 2) {
        assert!(start.elapsed() < Duration::from_secs(10), "no snapshot every 3 entries");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let path = "/admin/v2/persistent/public/default/dedup-dedup/unload";
    let r = magnetar_broker::http::request_following(&web, "PUT", path, "").await.expect("unload");
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(snapshot_of(meta.clone(), key.clone()).await, Some(9), "a snapshot of all 10 on close");
    scenario(&s.url(), "dedup_two_more", "dedup");
    assert_eq!(snapshot_of(meta.clone(), key.clone()).await, Some(9), "the last two are not in a snapshot");
    let s = s.restart_with("-KILL").await;
    let meta = MetaClient::connect(std::slice::from_ref(&s.metastore)).expect("meta");
    scenario(&s.url(), "dedup_after_restart", "dedup");
    scenario(&s.url(), "dedup_off", "dedup");
    // Turned on for that topic (its next load reads the policy), then off again: off, its
    // snapshot goes.
    let web = format!("http://{}", s.web);
    let other =
        magnetar_broker::protocol::names::TopicName::parse("persistent://public/nodedup/dedup-dup").expect("name");
    let policy_then_unload = |on: &'static str| {
        let web = web.clone();
        async move {
            let path = "/admin/v2/namespaces/public/nodedup/deduplication";
            let r = magnetar_broker::http::request_following(&web, "POST", path, on).await.expect("policy");
            assert_eq!(r.status, 204, "{}", r.body);
            let path = "/admin/v2/persistent/public/nodedup/dedup-dup/unload";
            let r = magnetar_broker::http::request_following(&web, "PUT", path, "").await.expect("unload");
            assert_eq!(r.status, 204, "{}", r.body);
        }
    };
    policy_then_unload("true").await;
    scenario(&s.url(), "dedup_turned_on", "dedup");
    assert!(meta.get(&magnetar_broker::topic::dedup_key(&other)).await.expect("get").is_some(), "a snapshot when on");
    policy_then_unload("false").await;
    // The topic loads (and reads the policy) on its next use.
    produce(&s.url(), "persistent://public/nodedup/dedup-dup", 1, false);
    assert!(meta.get(&magnetar_broker::topic::dedup_key(&other)).await.expect("get").is_none(), "no snapshot when off");
}

/// Producer names with no producer connected for
/// `broker_deduplication_producer_inactivity_timeout_minutes` (3 s here) are forgotten, as
/// Pulsar forgets them, also across a SIGKILL; a name whose producer stays connected is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deduplication_forgets_inactive_producer_names() {
    let s = standalone_with(&[
        "broker_deduplication_enabled=true",
        "broker_deduplication_producer_inactivity_timeout_minutes=0.05",
    ])
    .await;
    scenario(&s.url(), "dedup_forgets_inactive_producers", "forget");
    // A snapshot without the forgotten name was stored before it was forgotten (the
    // default interval, 1000 entries, stores none otherwise): after a SIGKILL the name is
    // not brought back with its old sequence ids.
    let s = s.restart_with("-KILL").await;
    scenario(&s.url(), "dedup_forgotten_after_restart", "forget");
}

/// A topic's own deduplication policy (and a partitioned topic's, for its partitions)
/// overrides its namespace's; removed, the namespace's applies again. Through the admin API
/// and `magnetar admin`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_deduplication_policy_overrides_the_namespace() {
    let s = standalone().await;
    let web = format!("http://{}", s.web);
    let http = |method: &'static str, path: &str, body: &str| {
        let (web, path, body) = (web.clone(), path.to_owned(), body.to_owned());
        async move { magnetar_broker::http::request_following(&web, method, &path, &body).await.expect("admin") }
    };
    let base = "/admin/v2/persistent/public/tdedup";
    assert_eq!(http("PUT", "/admin/v2/namespaces/public/tdedup", "").await.status, 204);
    // The namespace has it on; `tdedup-off` turns it off for itself.
    let r = http("POST", "/admin/v2/namespaces/public/tdedup/deduplication", "true").await;
    assert_eq!(r.status, 204, "{}", r.body);
    // A topic that does not exist has no policy to set.
    assert_eq!(http("POST", &format!("{base}/tdedup-on/deduplicationEnabled"), "true").await.status, 404);
    for (path, body) in [("tdedup-on", ""), ("tdedup-off", ""), ("tdedup-parts/partitions", "2")] {
        let r = http("PUT", &format!("{base}/{path}"), body).await;
        assert_eq!(r.status, 204, "{path}: {}", r.body);
    }
    assert_eq!(http("POST", &format!("{base}/tdedup-on/deduplicationEnabled"), "yes").await.status, 412);
    let admin = |args: &[&str]| {
        let (ok, out, err) = magnetar_admin(&web, args);
        assert!(ok, "{args:?}: {err}");
        out.trim().to_owned()
    };
    admin(&["topics", "set-deduplication", "public/tdedup/tdedup-on", "--enable"]);
    admin(&["topics", "set-deduplication", "public/tdedup/tdedup-parts", "--enable"]);
    assert_eq!(admin(&["--json", "topics", "get-deduplication", "public/tdedup/tdedup-off"]), "null");
    admin(&["topics", "set-deduplication", "public/tdedup/tdedup-off", "--disable"]);
    assert_eq!(admin(&["--json", "topics", "get-deduplication", "public/tdedup/tdedup-on"]), "true");
    assert_eq!(admin(&["--json", "topics", "get-deduplication", "public/tdedup/tdedup-off"]), "false");
    // Created topics are loaded, and read their policies when they load (and every minute).
    for topic in ["tdedup-on", "tdedup-off"] {
        assert_eq!(http("PUT", &format!("{base}/{topic}/unload"), "").await.status, 204);
    }
    scenario(&s.url(), "dedup_topic_level", "tdedup");
    // Removed, the namespace's policy applies once the topic reads its policies again (on
    // its next load): off for `tdedup-on` once the namespace's is off, on for `tdedup-off`.
    let r = http("POST", "/admin/v2/namespaces/public/tdedup/deduplication", "false").await;
    assert_eq!(r.status, 204, "{}", r.body);
    let meta = MetaClient::connect(std::slice::from_ref(&s.metastore)).expect("meta");
    use magnetar_broker::protocol::names::TopicName;
    let snapshot = |topic: &str| {
        let (meta, key) = (meta.clone(), magnetar_broker::topic::dedup_key(&TopicName::parse(topic).expect("name")));
        async move { meta.get(&key).await.expect("get").is_some() }
    };
    for topic in ["tdedup-on", "tdedup-off"] {
        admin(&["topics", "remove-deduplication", &format!("public/tdedup/{topic}")]);
        assert_eq!(admin(&["--json", "topics", "get-deduplication", &format!("public/tdedup/{topic}")]), "null");
        assert_eq!(http("PUT", &format!("{base}/{topic}/unload"), "").await.status, 204);
    }
    let r = http("POST", "/admin/v2/namespaces/public/tdedup/deduplication", "true").await;
    assert_eq!(r.status, 204, "{}", r.body);
    // In effect (`--applied`): the namespace's now, the partitioned topic's for a partition.
    let applied = |topic: &str| admin(&["--json", "topics", "get-deduplication", topic, "--applied"]);
    assert_eq!(applied("public/tdedup/tdedup-off"), "true");
    assert_eq!(applied("public/tdedup/tdedup-parts-partition-0"), "true");
    admin(&["topics", "set-deduplication", "public/tdedup/tdedup-parts", "--disable"]);
    assert_eq!(applied("public/tdedup/tdedup-parts-partition-0"), "false");
    produce(&s.url(), "persistent://public/tdedup/tdedup-off", 1, false);
    // With deduplication on, closing the topic stores a snapshot.
    assert_eq!(http("PUT", &format!("{base}/tdedup-off/unload"), "").await.status, 204);
    assert!(snapshot("persistent://public/tdedup/tdedup-off").await, "the namespace's policy (on) does not apply");
    let r = http("POST", "/admin/v2/namespaces/public/tdedup/deduplication", "false").await;
    assert_eq!(r.status, 204, "{}", r.body);
    produce(&s.url(), "persistent://public/tdedup/tdedup-on", 1, false);
    assert!(!snapshot("persistent://public/tdedup/tdedup-on").await, "the namespace's policy (off) does not apply");
    // Neither sets it in namespace `public/default`: the broker's default (off).
    let r = http("PUT", "/admin/v2/persistent/public/default/plain", "").await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(applied("public/default/plain"), "false");
    let r = http("GET", "/admin/v2/persistent/public/default/plain/messageTTL?applied=true", "").await;
    assert_eq!((r.status, r.body.trim()), (200, "0"), "no TTL anywhere: the broker's default (none)");
}

/// Schemas with the official Python client (see the `schemas` scenario), then through the
/// admin API: the latest version and an older one by number, and none once the topic (or the
/// partitioned topic, whose partitions share its schemas) is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_schemas() {
    let s = standalone().await;
    let web = format!("http://{}", s.web);
    let http = |method: &'static str, path: String| {
        let web = web.clone();
        async move { magnetar_broker::http::request_following(&web, method, &path, "").await.expect("admin") }
    };
    let parts = "/admin/v2/persistent/public/default/schema-json-parts";
    let r = magnetar_broker::http::request_following(&web, "PUT", &format!("{parts}/partitions"), "2").await;
    assert_eq!(r.expect("partitions").status, 204);
    scenario(&s.url(), "schemas", "schema");
    let schema = "/admin/v2/schemas/public/default";
    let r = http("GET", format!("{schema}/schema-json/schema")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let latest: serde_json::Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!((latest["version"].as_u64(), latest["type"].as_str()), (Some(1), Some("JSON")), "{latest}");
    assert!(latest["data"].as_str().is_some_and(|d| d.contains("email")), "{latest}");
    // An older version by number, through `magnetar admin` as users ask for it.
    let (ok, out, err) = magnetar_admin(&web, &["--json", "schemas", "get", "schema-json", "--version", "0"]);
    assert!(ok, "{err}");
    let first: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(first["version"].as_u64(), Some(0), "{first}");
    assert!(first["data"].as_str().is_some_and(|d| d.contains("age") && !d.contains("email")), "{first}");
    assert_eq!(http("GET", format!("{schema}/schema-json/schema/2")).await.status, 404);
    // The partitioned topic's versions: 0 through the topic, 1 through one partition.
    let r = http("GET", format!("{schema}/schema-json-parts/schema")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let parts_latest: serde_json::Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(parts_latest["version"].as_u64(), Some(1), "{parts_latest}");
    // Deleted through the admin API, the versions go but their count stays.
    let r = http("DELETE", format!("{schema}/schema-json/schema")).await;
    assert_eq!((r.status, r.body.contains(r#""version":1"#)), (200, true), "{}", r.body);
    assert_eq!(http("GET", format!("{schema}/schema-json/schema")).await.status, 404);
    assert_eq!(http("GET", format!("{schema}/schema-json/schema/0")).await.status, 404);
    scenario(&s.url(), "schemas_after_delete", "schema");
    let r = http("GET", format!("{schema}/schema-json/schema")).await;
    let after: serde_json::Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(after["version"].as_u64(), Some(2), "{after}");
    // Deleting the topics deletes their schemas: a topic made later under the name starts
    // without one.
    let r = http("DELETE", "/admin/v2/persistent/public/default/schema-json?force=true".into()).await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(http("GET", format!("{schema}/schema-json/schema")).await.status, 404);
    let r = http("DELETE", format!("{parts}/partitions?force=true")).await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(http("GET", format!("{schema}/schema-json-parts/schema")).await.status, 404);
    // A schema is stored only while its topic exists (the put compares the topic's record):
    // registering for a deleted topic is refused and leaves nothing behind.
    let meta = MetaClient::connect(std::slice::from_ref(&s.metastore)).expect("meta");
    let gone = magnetar_broker::protocol::names::TopicName::parse("schema-json").expect("name");
    let json = magnetar_broker::protocol::pb::Schema {
        name: "schema-json".into(),
        schema_data: br#"{"type":"record","name":"X","fields":[]}"#.to_vec(),
        r#type: magnetar_broker::protocol::pb::schema::Type::Json as i32,
        properties: vec![],
    };
    let r = magnetar_broker::topic::schema::get_or_create(&meta, &gone, &json).await;
    assert_eq!(r.map_err(|(code, _)| code), Err(magnetar_broker::protocol::pb::ServerError::TopicNotFound));
    assert!(meta.get(&magnetar_broker::topic::schema::schema_key(&gone)).await.expect("get").is_none());
}

/// A SIGKILLed standalone: journal replay, ledger recovery and the stored cursor bring back
/// every unacknowledged message (acknowledgements of the last moments may be redelivered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_standalone_loses_no_unacknowledged_message() {
    let s = standalone().await;
    scenario(&s.url(), "restart_before", "crash");
    let s = s.restart_with("-KILL").await;
    scenario(&s.url(), "restart_after_kill", "crash");
    // The restarted broker (same id, new ports) took its bundle back from its previous run at
    // once, without waiting for the old session's 30 s to expire.
    let meta = MetaClient::connect(std::slice::from_ref(&s.metastore)).expect("meta");
    let me = meta.get("/brokers/standalone").await.expect("get").expect("registered");
    let owned = meta.list("/ownership/public/default/").await.expect("list");
    assert!(!owned.is_empty() && owned.iter().all(|kv| kv.session == me.session), "{owned:?}");
    assert!(owned.iter().all(|kv| String::from_utf8_lossy(&kv.value).contains(&s.broker)), "{owned:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_produces_with_and_without_batching() {
    let s = standalone().await;
    let url = format!("pulsar://{}", s.broker);
    let ids = produce(&url, "conformance-plain", 50, false);
    for (i, (_, entry, batch)) in ids.iter().enumerate() {
        assert_eq!((*entry, *batch), (i as u64, -1), "unbatched sends are one entry each, in order");
    }
    check_stored(&s.metastore, &ids).await;
    let ids = produce(&url, "persistent://public/default/conformance-batched", 500, true);
    assert!(ids.iter().any(|(_, _, b)| *b > 0), "batching should put several messages in one entry");
    assert!(ids.windows(2).all(|w| (w[0].1, w[0].2) < (w[1].1, w[1].2)), "ids increase in send order");
    check_stored(&s.metastore, &ids).await;
    scenario(&url, "largest_message", "produce");
}

/// Garbage on the broker port: random bytes, truncated frames, oversized lengths, wrong
/// checksums. Each bad connection gets an error or is closed; the broker keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_their_connection() {
    use bytes::{BufMut, BytesMut};
    use magnetar_broker::protocol::codec::{self, base};
    use magnetar_broker::protocol::pb;
    use rand::{Rng, SeedableRng};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let s = standalone().await;
    let connect = pb::BaseCommand {
        connect: Some(Box::new(pb::CommandConnect {
            client_version: "raw".into(),
            protocol_version: Some(20),
            ..Default::default()
        })),
        ..base(pb::base_command::Type::Connect)
    };
    let mut hello = BytesMut::new();
    codec::encode_command(&connect, &mut hello);

    // A well-formed handshake, then whatever `tail` holds; returns what the broker answered
    // before closing (or going quiet).
    async fn exchange(addr: &str, first: &[u8]) -> Vec<u8> {
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = c.write_all(first).await;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_millis(300), c.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return got,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            }
        }
    }

    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut cases: Vec<Vec<u8>> = Vec::new();
    // Oversized declared length, before and after a handshake.
    cases.push(u32::MAX.to_be_bytes().to_vec());
    let mut v = hello.to_vec();
    v.extend_from_slice(&(64u32 << 20).to_be_bytes());
    cases.push(v);
    // A SEND whose payload checksum is wrong, after a handshake.
    let mut v = hello.to_vec();
    let entry =
        codec::encode_entry(&pb::MessageMetadata { producer_name: "x".into(), ..Default::default() }, b"payload");
    let mut send = BytesMut::new();
    let cmd = pb::BaseCommand {
        send: Some(Box::new(pb::CommandSend { producer_id: 1, sequence_id: 0, ..Default::default() })),
        ..base(pb::base_command::Type::Send)
    };
    codec::encode_with_entry(&cmd, &entry, None, &mut send);
    let n = send.len();
    send[n - 1] ^= 0xff;
    v.extend_from_slice(&send);
    cases.push(v);
    // Command size larger than the frame; truncated frames; random bytes.
    let mut v = BytesMut::new();
    v.put_u32(8);
    v.put_u32(1000);
    v.put_u32(0);
    cases.push(v.to_vec());
    cases.push(hello[..hello.len() / 2].to_vec());
    for _ in 0..30 {
        let len = rng.random_range(1..200);
        cases.push((0..len).map(|_| rng.random()).collect());
        let mut m = hello.to_vec();
        let i = rng.random_range(0..m.len());
        m[i] = rng.random();
        cases.push(m);
    }
    for case in &cases {
        let _ = exchange(&s.broker, case).await;
    }
    // Still serving: a clean handshake gets CONNECTED, and the real client produces.
    let reply = exchange(&s.broker, &hello).await;
    let log = std::fs::read_to_string(s._dir.path().join("standalone.log")).unwrap_or_default();
    let (frame, _) = codec::decode(&reply, 1 << 20)
        .expect("decodes")
        .unwrap_or_else(|| panic!("no CONNECTED ({} bytes)\n{log}", reply.len()));
    assert_eq!(frame.command.r#type, pb::base_command::Type::Connected as i32);
    let ids = produce(&format!("pulsar://{}", s.broker), "after-garbage", 5, false);
    assert_eq!(ids.len(), 5);
}

/// A restarted standalone keeps every acknowledged message: loading the topic again recovers
/// (fences and closes) the ledger the previous run was writing, lists it, and writes a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_acknowledged_messages_in_the_topic_ledgers() {
    use magnetar_broker::protocol::names::TopicName;
    use magnetar_broker::topic::{topic_key, ManagedLedgerInfo};

    // The topic has no subscription: retention keeps its ledgers for the checks below.
    let s = standalone_with(&["default_retention_time_in_minutes=-1", "default_retention_size_in_mb=-1"]).await;
    let first = produce(&format!("pulsar://{}", s.broker), "restart-me", 20, false);
    let s = s.restart().await;
    let second = produce(&format!("pulsar://{}", s.broker), "restart-me", 10, false);
    assert_ne!(first[0].0, second[0].0, "a new ledger after the restart");

    let meta = MetaClient::connect(std::slice::from_ref(&s.metastore)).expect("meta");
    let key = topic_key(&TopicName::parse("restart-me").expect("name"));
    let kv = meta.get(&key).await.expect("get").expect("topic metadata");
    let info: ManagedLedgerInfo = serde_json::from_slice(&kv.value).expect("json");
    let ids: Vec<u64> = info.ledgers.iter().map(|l| l.ledger_id).collect();
    assert_eq!(ids, vec![first[0].0, second[0].0]);
    assert_eq!(info.ledgers[0].last_entry, Some(19), "the first ledger closed after every acked entry");

    let ledgers = LedgerClient::new(meta, LedgerOptions::default());
    let entries = ledgers.open_reader(first[0].0).await.expect("reader").read(0, 19).await.expect("read");
    for (i, e) in entries.iter().enumerate() {
        let (_, payload) = decode_entry(e).expect("entry");
        assert_eq!(&payload[..], format!("msg-{i}").as_bytes());
    }
}
