//! The broker's HTTP service over real HTTP against a standalone: status codes, JSON shapes and
//! effects of the admin API endpoints built so far, and `/metrics` parsed as Prometheus text.

use std::time::Duration;

use magnetar_broker::client::Client;
use magnetar_broker::protocol::pb::command_subscribe::SubType;
use magnetar_metastore::client::MetaClient;
use serde_json::Value;

use super::cluster::{scrape, RawConn};
use super::{produce, standalone, standalone_with};

/// One HTTP/1.1 request, following redirects to other brokers as pulsar-admin does; returns
/// (status, body).
async fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let r = magnetar_broker::http::request_following(&format!("http://{addr}"), method, path, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (r.status, r.body)
}

/// What the admin tests run against: a standalone, or a cluster of two brokers reached
/// through the second one (so calls about the first one's topics are redirected).
struct Target {
    web: String,
    broker: String,
    metastore: String,
    cluster: String,
    broker_urls: Vec<String>,
    bookies: Vec<String>,
    _keep: Box<dyn std::any::Any + Send>,
    /// The cluster's in-process metastore, closed by `stop`.
    cluster_nodes: Option<super::cluster::Cluster>,
}

impl Target {
    async fn standalone() -> Target {
        let s = standalone().await;
        Target {
            web: s.web.clone(),
            broker: s.broker.clone(),
            metastore: s.metastore.clone(),
            cluster: "standalone".into(),
            broker_urls: vec![s.url()],
            bookies: vec![s.bookie.clone()],
            _keep: Box::new(s),
            cluster_nodes: None,
        }
    }

    /// A metastore, two bookies (E=Qw=Qa=2) and two brokers of cluster `local`.
    async fn cluster() -> Target {
        let c = super::cluster::Cluster::new(2, &[], true).await;
        let sets = ["ensemble_size=2", "write_quorum=2", "ack_quorum=2"];
        let a = c.start_broker("broker-a", None, &sets).await;
        let b = c.start_broker("broker-b", None, &sets).await;
        Target {
            web: b.web.clone(),
            broker: b.addr.clone(),
            metastore: c.meta_addr.clone(),
            cluster: "local".into(),
            broker_urls: vec![a.url(), b.url()],
            bookies: c.bookies.iter().map(|b| b.addr.clone()).collect(),
            _keep: Box::new((a, b)),
            cluster_nodes: Some(c),
        }
    }

    /// Stops the brokers and bookies, then closes the in-process metastore: a RocksDB still
    /// open when the test process exits aborts it ("pthread lock: Invalid argument").
    async fn stop(self) {
        drop(self._keep);
        if let Some(c) = self.cluster_nodes {
            c.shutdown().await;
        }
    }

    fn url(&self) -> String {
        format!("pulsar://{}", self.broker)
    }

    /// The HTTP address of the broker serving `topic` (`tenant/ns/name`).
    async fn owner_web(&self, topic: &str) -> String {
        let (st, body) = http(&self.web, "GET", &format!("/lookup/v2/topic/persistent/{topic}"), "").await;
        assert_eq!(st, 200, "{body}");
        let url = parse(&body)["httpUrl"].as_str().unwrap_or_default().to_owned();
        url.trim_start_matches("http://").to_owned()
    }
}

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_and_metrics() {
    let s = Target::standalone().await;
    api_and_metrics(&s).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_and_metrics_on_a_two_broker_cluster() {
    let s = Target::cluster().await;
    api_and_metrics(&s).await;
    s.stop().await;
}

async fn api_and_metrics(s: &Target) {
    let w = s.web.as_str();
    let me = s.cluster.as_str();
    assert_eq!(http(w, "GET", "/status.html", "").await, (200, "OK".into()));
    assert_eq!(http(w, "GET", "/admin/v2/brokers/health", "").await, (200, "ok".into()));
    let (st, b) = http(w, "GET", "/admin/v2/clusters", "").await;
    assert_eq!((st, parse(&b)), (200, serde_json::json!([me])));
    assert_eq!(http(w, "GET", &format!("/admin/v2/clusters/{me}"), "").await.0, 200);
    let (st, b) = http(w, "GET", "/admin/v2/clusters/nowhere", "").await;
    assert_eq!(st, 404);
    assert!(parse(&b)["reason"].as_str().is_some_and(|r| r.contains("nowhere")), "{b}");
    assert_eq!(
        parse(&http(w, "GET", &format!("/admin/v2/brokers/{me}"), "").await.1).as_array().map(|a| a.len()),
        Some(s.broker_urls.len())
    );

    assert_eq!(http(w, "PUT", "/admin/v2/clusters/east", r#"{"serviceUrl":"http://east:8080"}"#).await.0, 204);
    assert_eq!(http(w, "PUT", "/admin/v2/clusters/east", "{}").await.0, 409);
    assert_eq!(http(w, "POST", "/admin/v2/clusters/east", r#"{"serviceUrl":"http://east:9090"}"#).await.0, 204);
    assert_eq!(parse(&http(w, "GET", "/admin/v2/clusters/east", "").await.1)["serviceUrl"], "http://east:9090");
    assert_eq!(http(w, "DELETE", &format!("/admin/v2/clusters/{me}"), "").await.0, 412);
    assert_eq!(http(w, "DELETE", "/admin/v2/clusters/east", "").await.0, 204);
    assert_eq!(http(w, "DELETE", "/admin/v2/clusters/east", "").await.0, 404);

    // Tenants.
    assert!(parse(&http(w, "GET", "/admin/v2/tenants", "").await.1)
        .as_array()
        .is_some_and(|a| a.contains(&"public".into())));
    let acme = format!(r#"{{"adminRoles":["ops"],"allowedClusters":["{me}"]}}"#);
    assert_eq!(http(w, "PUT", "/admin/v2/tenants/acme", &acme).await.0, 204);
    assert_eq!(http(w, "PUT", "/admin/v2/tenants/acme", &acme).await.0, 409);
    let (st, b) = http(w, "PUT", "/admin/v2/tenants/other", r#"{"allowedClusters":["mars"]}"#).await;
    assert!(st == 412 && b.contains("mars"), "{st} {b}");
    assert_eq!(parse(&http(w, "GET", "/admin/v2/tenants/acme", "").await.1)["adminRoles"], serde_json::json!(["ops"]));
    assert_eq!(http(w, "POST", "/admin/v2/tenants/acme", r#"{"adminRoles":["ops","dev"]}"#).await.0, 204);
    assert_eq!(
        parse(&http(w, "GET", "/admin/v2/tenants/acme", "").await.1)["adminRoles"],
        serde_json::json!(["ops", "dev"])
    );
    assert_eq!(http(w, "GET", "/admin/v2/tenants/nobody", "").await.0, 404);
    assert_eq!(http(w, "PUT", "/admin/v2/tenants/bad", "[1]").await.0, 400);

    // Namespaces.
    assert_eq!(http(w, "PUT", "/admin/v2/namespaces/acme/orders", "").await.0, 204);
    assert_eq!(http(w, "PUT", "/admin/v2/namespaces/acme/orders", "").await.0, 409);
    assert_eq!(http(w, "PUT", "/admin/v2/namespaces/nobody/x", "").await.0, 404);
    assert_eq!(parse(&http(w, "GET", "/admin/v2/namespaces/acme", "").await.1), serde_json::json!(["acme/orders"]));
    assert_eq!(parse(&http(w, "GET", "/admin/v2/namespaces/acme/orders", "").await.1)["bundles"]["numBundles"], 4);
    assert_eq!(http(w, "DELETE", "/admin/v2/tenants/acme", "").await.0, 409, "a tenant with namespaces stays");
    // Policies are stored and read back.
    let ns = "/admin/v2/namespaces/acme/orders";
    let retention = r#"{"retentionTimeInMinutes":60,"retentionSizeInMB":100}"#;
    assert_eq!(http(w, "POST", &format!("{ns}/retention"), retention).await.0, 204);
    assert_eq!(parse(&http(w, "GET", &format!("{ns}/retention"), "").await.1)["retentionTimeInMinutes"], 60);
    let bad = r#"{"retentionTimeInMinutes":"an hour","retentionSizeInMB":100}"#;
    assert_eq!(http(w, "POST", &format!("{ns}/retention"), bad).await.0, 412, "retention needs whole numbers");
    assert_eq!(
        http(w, "POST", &format!("{ns}/retention"), r#"{"retentionTimeInMinutes":-2,"retentionSizeInMB":0}"#).await.0,
        412
    );
    let half_off = r#"{"retentionTimeInMinutes":60,"retentionSizeInMB":0}"#;
    assert_eq!(http(w, "POST", &format!("{ns}/retention"), half_off).await.0, 400, "one limit of 0 voids the other");
    assert_eq!(http(w, "POST", &format!("{ns}/messageTTL"), "3600").await.0, 204);
    assert_eq!(parse(&http(w, "GET", &format!("{ns}/messageTTL"), "").await.1), 3600);
    assert_eq!(http(w, "POST", &format!("{ns}/messageTTL"), "\"soon\"").await.0, 412);
    assert_eq!(http(w, "POST", &format!("{ns}/deduplication"), "true").await.0, 204);
    assert_eq!(parse(&http(w, "GET", &format!("{ns}/deduplication"), "").await.1), true);
    let quota = r#"{"destination_storage":{"limitSize":1073741824,"policy":"producer_request_hold"}}"#;
    assert_eq!(http(w, "POST", &format!("{ns}/backlogQuota"), quota).await.0, 204);
    assert_eq!(parse(&http(w, "GET", &format!("{ns}/bundles"), "").await.1)["numBundles"], 4);
    assert_eq!(http(w, "POST", &format!("{ns}/permissions/app"), r#"["produce","consume"]"#).await.0, 204);
    assert_eq!(
        parse(&http(w, "GET", &format!("{ns}/permissions"), "").await.1)["app"],
        serde_json::json!(["produce", "consume"])
    );
    assert_eq!(http(w, "POST", "/admin/v2/namespaces/acme/none/messageTTL", "5").await.0, 404);
    let policies = parse(&http(w, "GET", ns, "").await.1);
    assert_eq!(policies["message_ttl_in_seconds"], 3600, "{policies}");

    // Topics.
    let base = "/admin/v2/persistent/acme/orders";
    assert_eq!(http(w, "PUT", &format!("{base}/t1/partitions"), "3").await.0, 204);
    assert_eq!(http(w, "PUT", &format!("{base}/t1/partitions"), "3").await.0, 409);
    assert_eq!(http(w, "PUT", &format!("{base}/t2/partitions"), "zero").await.0, 412);
    assert_eq!(parse(&http(w, "GET", &format!("{base}/t1/partitions"), "").await.1)["partitions"], 3);
    assert_eq!(http(w, "POST", &format!("{base}/t1/partitions"), "2").await.0, 409, "partitions only grow");
    assert_eq!(http(w, "POST", &format!("{base}/t1/partitions"), "4").await.0, 204);
    assert_eq!(
        parse(&http(w, "GET", &format!("{base}/partitioned"), "").await.1),
        serde_json::json!(["persistent://acme/orders/t1"])
    );
    assert_eq!(http(w, "PUT", &format!("{base}/plain"), "").await.0, 204);
    assert_eq!(http(w, "PUT", &format!("{base}/plain"), "").await.0, 409);
    assert_eq!(http(w, "PUT", "/admin/v2/persistent/acme/nope/x", "").await.0, 404);
    let list = parse(&http(w, "GET", base, "").await.1);
    for t in ["plain", "t1-partition-0", "t1-partition-3"] {
        assert!(
            list.as_array().is_some_and(|a| a.contains(&format!("persistent://acme/orders/{t}").into())),
            "{t} in {list}"
        );
    }
    assert_eq!(http(w, "GET", &format!("{base}/missing/stats"), "").await.0, 404);

    // Stats move with traffic: a durable subscription, 20 messages, then consumed.
    let topic = "persistent://acme/orders/plain";
    let client = Client::connect_for(&s.broker, topic).await.expect("connect");
    let mut consumer = client.subscribe(topic, "s", SubType::Exclusive, true).await.expect("subscribe");
    produce(&s.url(), topic, 20, false);
    let stats = parse(&http(w, "GET", &format!("{base}/plain/stats"), "").await.1);
    assert_eq!(stats["msgInCounter"], 20, "{stats}");
    assert!(stats["storageSize"].as_u64().is_some_and(|x| x > 0), "{stats}");
    assert_eq!(stats["subscriptions"]["s"]["msgBacklog"], 20, "{stats}");
    assert_eq!(stats["subscriptions"]["s"]["type"], "Exclusive");
    assert_eq!(stats["subscriptions"]["s"]["consumers"].as_array().map(|a| a.len()), Some(1));
    consumer.flow(100).expect("flow");
    let mut ids = Vec::new();
    for _ in 0..20 {
        let m = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.expect("message").expect("open");
        ids.push(m.command.message_id);
    }
    consumer.ack(ids).expect("ack");
    let mut backlog = Value::Null;
    for _ in 0..50 {
        let stats = parse(&http(w, "GET", &format!("{base}/plain/stats"), "").await.1);
        backlog = stats["subscriptions"]["s"]["msgBacklog"].clone();
        if backlog == 0 {
            assert_eq!(stats["subscriptions"]["s"]["msgOutCounter"], 20, "{stats}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(backlog, 0, "the backlog drops after consuming");

    // Metrics (of the broker serving the topic), parsed as Prometheus text.
    let (st, text) = http(&s.owner_web("acme/orders/plain").await, "GET", "/metrics", "").await;
    assert_eq!(st, 200);
    let m = scrape(&text);
    let labels = format!(r#"cluster="{me}",namespace="acme/orders",topic="persistent://acme/orders/plain""#);
    assert_eq!(m.get(&format!("pulsar_in_messages_total{{{labels}}}")), Some(&20.0), "{text}");
    assert!(m.get(&format!("pulsar_storage_size{{{labels}}}")).is_some_and(|v| *v > 0.0), "{text}");
    assert_eq!(m.get(&format!("pulsar_msg_backlog{{{labels}}}")), Some(&0.0));
    assert_eq!(m.get(&format!("pulsar_subscription_back_log{{{labels},subscription=\"s\"}}")), Some(&0.0));
    assert_eq!(m.get(&format!("pulsar_consumers_count{{{labels}}}")), Some(&1.0));
    assert_eq!(m.get(&format!("pulsar_storage_write_latency_count{{{labels}}}")), Some(&20.0), "{text}");
    let buckets: f64 = ["0_5", "1", "5", "10", "20", "50", "100", "200", "1000", "overflow"]
        .iter()
        .map(|b| m.get(&format!("pulsar_storage_write_latency_le_{b}{{{labels}}}")).copied().unwrap_or(-1.0))
        .sum();
    assert_eq!(buckets, 20.0, "every write in one latency bucket");
    assert!(m.get("process_resident_memory_bytes").is_some_and(|v| *v > 0.0), "{text}");
    assert!(m.contains_key("process_cpu_seconds_total"));
    for metric in ["pulsar_rate_in", "pulsar_throughput_in", "pulsar_rate_out", "pulsar_producers_count"] {
        assert!(m.contains_key(&format!("{metric}{{{labels}}}")), "{metric} missing:\n{text}");
    }
    // Delete: refused while a consumer is connected, then forced; the ledgers are gone.
    let meta = magnetar_metastore::client::MetaClient::connect(std::slice::from_ref(&s.metastore)).expect("meta");
    let key =
        magnetar_broker::topic::topic_key(&magnetar_broker::protocol::names::TopicName::parse(topic).expect("name"));
    let info: magnetar_broker::topic::ManagedLedgerInfo =
        serde_json::from_slice(&meta.get(&key).await.expect("get").expect("topic").value).expect("json");
    let stored = |code: i32| code == magnetar_proto::bookie::Code::Ok as i32;
    let first = info.ledgers[0].ledger_id;
    let mut on = Vec::new();
    for b in &s.bookies {
        on.push(stored(super::cluster::read_code(b, first, 0).await));
    }
    assert!(on.iter().any(|x| *x), "entry 0 of ledger {first} is on a bookie before the delete");
    assert_eq!(http(w, "DELETE", &format!("{base}/plain"), "").await.0, 412);
    assert_eq!(http(w, "DELETE", &format!("{base}/plain?force=true"), "").await.0, 204);
    for b in &s.bookies {
        assert!(!stored(super::cluster::read_code(b, first, 0).await), "ledger {first} remains on bookie {b}");
    }
    assert!(meta.get(&key).await.expect("get").is_none());
    assert!(meta.list(&format!("{key}/cursors/")).await.expect("list").is_empty());
    for l in &info.ledgers {
        assert!(
            meta.get(&format!("/ledgers/{}", l.ledger_id)).await.expect("get").is_none(),
            "ledger {} remains",
            l.ledger_id
        );
    }
    assert_eq!(http(w, "GET", &format!("{base}/plain/stats"), "").await.0, 404);
    assert_eq!(http(w, "DELETE", &format!("{base}/plain"), "").await.0, 404);
    drop(client);

    // Partitioned stats add up the partitions.
    let ps = parse(&http(w, "GET", &format!("{base}/t1/partitioned-stats"), "").await.1);
    assert_eq!(ps["metadata"]["partitions"], 4, "{ps}");
    assert_eq!(http(w, "DELETE", "/admin/v2/namespaces/acme/orders", "").await.0, 409, "a namespace with topics stays");
    assert_eq!(http(w, "PUT", "/admin/v2/namespaces/acme/empty", "").await.0, 204);
    assert_eq!(http(w, "DELETE", "/admin/v2/namespaces/acme/empty", "").await.0, 204);
    assert_eq!(http(w, "DELETE", "/admin/v2/namespaces/acme/empty", "").await.0, 404);
}

/// `magnetar admin`: tenant → namespace → partitioned topic → stats → delete, human and JSON
/// output, and the API's reason on failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_cli_round_trip() {
    let s = Target::standalone().await;
    cli_round_trip(&s).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_cli_round_trip_on_a_two_broker_cluster() {
    let s = Target::cluster().await;
    cli_round_trip(&s).await;
    s.stop().await;
}

async fn cli_round_trip(s: &Target) {
    let url = format!("http://{}", s.web);
    let admin = |args: &[&str]| super::magnetar_admin(&url, args);
    let ok = |r: (bool, String, String)| {
        assert!(r.0, "failed: {}", r.2);
        r.1
    };
    ok(admin(&["tenants", "create", "shop", "--admin-roles", "ops", "--allowed-clusters", &s.cluster]));
    assert!(ok(admin(&["tenants", "list"])).lines().any(|l| l == "shop"));
    let (fine, _, err) = admin(&["tenants", "create", "shop"]);
    assert!(!fine && err.contains("409") && err.contains("already exists"), "{err}");
    ok(admin(&["namespaces", "create", "shop/orders"]));
    assert_eq!(ok(admin(&["namespaces", "list", "shop"])).trim(), "shop/orders");
    ok(admin(&["topics", "create-partitioned-topic", "persistent://shop/orders/o", "-p", "2"]));
    let meta = ok(admin(&["--json", "topics", "get-partitioned-topic-metadata", "shop/orders/o"]));
    assert_eq!(parse(&meta)["partitions"], 2);
    produce(&s.url(), "persistent://shop/orders/o", 10, false);
    let stats = parse(&ok(admin(&["--json", "topics", "partitioned-stats", "shop/orders/o"])));
    assert_eq!(stats["msgInCounter"], 10, "{stats}");
    let listed = ok(admin(&["topics", "list", "shop/orders"]));
    assert!(listed.contains("persistent://shop/orders/o-partition-1"), "{listed}");
    let (fine, _, err) = admin(&["namespaces", "delete", "shop/orders"]);
    assert!(!fine && err.contains("409"), "a namespace with topics stays: {err}");
    // Subscriptions and policies through the CLI.
    ok(admin(&["topics", "create", "shop/orders/flat"]));
    produce(&s.url(), "persistent://shop/orders/flat", 6, false);
    ok(admin(&["topics", "create-subscription", "shop/orders/flat", "-s", "audit", "-m", "earliest"]));
    assert_eq!(ok(admin(&["topics", "subscriptions", "shop/orders/flat"])).trim(), "audit");
    ok(admin(&["topics", "skip", "shop/orders/flat", "-s", "audit", "-n", "2"]));
    assert_eq!(
        ok(admin(&["topics", "peek-messages", "shop/orders/flat", "-s", "audit", "-n", "2"]))
            .lines()
            .collect::<Vec<_>>(),
        ["msg-2", "msg-3"]
    );
    ok(admin(&["topics", "skip-all", "shop/orders/flat", "-s", "audit"]));
    let flat = parse(&ok(admin(&["--json", "topics", "stats", "shop/orders/flat"])));
    assert_eq!(flat["subscriptions"]["audit"]["msgBacklog"], 0, "{flat}");
    ok(admin(&["topics", "unsubscribe", "shop/orders/flat", "-s", "audit"]));
    ok(admin(&["namespaces", "set-message-ttl", "shop/orders", "--ttl", "120"]));
    assert_eq!(ok(admin(&["namespaces", "get-message-ttl", "shop/orders"])).trim(), "120");
    ok(admin(&[
        "namespaces",
        "set-backlog-quota",
        "shop/orders",
        "--limit",
        "1048576",
        "--policy",
        "producer_exception",
    ]));
    let quotas = parse(&ok(admin(&["--json", "namespaces", "get-backlog-quotas", "shop/orders"])));
    assert_eq!(quotas["destination_storage"]["limitSize"], 1048576, "{quotas}");
    assert_eq!(quotas["destination_storage"]["policy"], "producer_exception", "{quotas}");
    ok(admin(&["namespaces", "set-backlog-quota", "shop/orders", "--limit", "-1"]));
    let quotas = parse(&ok(admin(&["--json", "namespaces", "get-backlog-quotas", "shop/orders"])));
    assert_eq!(quotas["destination_storage"]["limitSize"], -1, "{quotas}");
    ok(admin(&["namespaces", "remove-backlog-quota", "shop/orders"]));
    let quotas = parse(&ok(admin(&["--json", "namespaces", "get-backlog-quotas", "shop/orders"])));
    assert!(quotas.get("destination_storage").is_none(), "{quotas}");
    ok(admin(&["topics", "set-message-ttl", "shop/orders/flat", "--ttl", "30"]));
    assert_eq!(ok(admin(&["topics", "get-message-ttl", "shop/orders/flat"])).trim(), "30");
    ok(admin(&["topics", "remove-message-ttl", "shop/orders/flat"]));
    assert_eq!(ok(admin(&["topics", "get-message-ttl", "shop/orders/flat"])).trim(), "null");
    ok(admin(&["topics", "set-message-ttl", "shop/orders/o", "--ttl", "45"]));
    ok(admin(&["namespaces", "grant-permission", "shop/orders", "--role", "app", "--actions", "produce,consume"]));
    assert!(ok(admin(&["namespaces", "permissions", "shop/orders"])).contains("\"app\""));
    ok(admin(&["topics", "terminate", "shop/orders/flat"]));
    ok(admin(&["topics", "delete", "shop/orders/flat"]));
    ok(admin(&["topics", "delete-partitioned-topic", "shop/orders/o"]));
    ok(admin(&["topics", "create-partitioned-topic", "persistent://shop/orders/o", "-p", "2"]));
    assert_eq!(ok(admin(&["topics", "get-message-ttl", "shop/orders/o"])).trim(), "null", "deleted with its topic");
    ok(admin(&["topics", "delete-partitioned-topic", "shop/orders/o"]));
    assert_eq!(ok(admin(&["topics", "list", "shop/orders"])).trim(), "");
    ok(admin(&["namespaces", "delete", "shop/orders"]));
    ok(admin(&["tenants", "delete", "shop"]));
    assert!(!ok(admin(&["tenants", "list"])).lines().any(|l| l == "shop"));
    assert_eq!(ok(admin(&["brokers", "healthcheck"])).trim(), "ok");
}

/// Subscription operations, internal stats, last message id, unload and lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_subscription_operations() {
    let s = Target::standalone().await;
    subscription_operations(&s).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_subscription_operations_on_a_two_broker_cluster() {
    let s = Target::cluster().await;
    subscription_operations(&s).await;
    s.stop().await;
}

async fn subscription_operations(s: &Target) {
    let w = s.web.as_str();
    let base = "/admin/v2/persistent/public/default/subs";
    let backlog = |sub: &'static str| async move {
        let st = parse(&http(w, "GET", &format!("{base}/stats"), "").await.1);
        st["subscriptions"][sub]["msgBacklog"].as_u64().unwrap_or_else(|| panic!("no {sub} in {st}"))
    };
    assert_eq!(http(w, "GET", &format!("{base}/subscriptions"), "").await.0, 404, "no topic yet");
    assert_eq!(http(w, "PUT", base, "").await.0, 204);
    produce(&s.url(), "subs", 30, false);
    assert_eq!(http(w, "PUT", &format!("{base}/subscription/s1"), r#"{"ledgerId":-1,"entryId":-1}"#).await.0, 204);
    assert_eq!(http(w, "PUT", &format!("{base}/subscription/s1"), "").await.0, 409);
    assert_eq!(http(w, "PUT", &format!("{base}/subscription/s2"), "").await.0, 204);
    assert_eq!(parse(&http(w, "GET", &format!("{base}/subscriptions"), "").await.1), serde_json::json!(["s1", "s2"]));
    assert_eq!(backlog("s1").await, 30);
    assert_eq!(backlog("s2").await, 0, "created at the latest position");

    assert_eq!(http(w, "POST", &format!("{base}/subscription/s1/skip/5"), "").await.0, 204);
    assert_eq!(backlog("s1").await, 25);
    let (st, body) = http(w, "GET", &format!("{base}/subscription/s1/position/1"), "").await;
    assert_eq!((st, body.as_str()), (200, "msg-5"), "peek shows the first unacknowledged message");
    assert_eq!(http(w, "GET", &format!("{base}/subscription/s1/position/26"), "").await.0, 404);
    assert_eq!(http(w, "POST", &format!("{base}/subscription/s1/skip_all"), "").await.0, 204);
    assert_eq!(backlog("s1").await, 0, "skip_all empties the backlog");
    assert_eq!(http(w, "POST", &format!("{base}/subscription/s1/resetcursor/0"), "").await.0, 204);
    assert_eq!(backlog("s1").await, 30, "reset to before the first message");
    let future =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() + 60_000;
    assert_eq!(http(w, "POST", &format!("{base}/subscription/s1/resetcursor/{future}"), "").await.0, 204);
    assert_eq!(backlog("s1").await, 0, "reset past the last message");
    assert_eq!(http(w, "POST", &format!("{base}/subscription/s1/resetcursor/0"), "").await.0, 204);
    assert_eq!(http(w, "POST", &format!("{base}/subscription/s1/expireMessages/3600"), "").await.0, 204);
    assert_eq!(backlog("s1").await, 30, "nothing is an hour old");
    assert_eq!(http(w, "POST", &format!("{base}/subscription/s1/expireMessages/0"), "").await.0, 204);
    assert_eq!(backlog("s1").await, 0, "everything is older than now");
    assert_eq!(http(w, "POST", &format!("{base}/subscription/nope/skip_all"), "").await.0, 404);

    let internal = parse(&http(w, "GET", &format!("{base}/internalStats"), "").await.1);
    assert_eq!(internal["numberOfEntries"], 30, "{internal}");
    assert!(internal["ledgers"].as_array().is_some_and(|l| !l.is_empty()), "{internal}");
    assert!(internal["cursors"]["s1"]["markDeletePosition"].as_str().is_some_and(|p| p.ends_with(":29")), "{internal}");
    let last = parse(&http(w, "GET", &format!("{base}/lastMessageId"), "").await.1);
    assert_eq!((last["entryId"].clone(), last["batchIndex"].clone()), (29.into(), (-1).into()), "{last}");

    assert_eq!(http(w, "DELETE", &format!("{base}/subscription/s2"), "").await.0, 204);
    assert_eq!(http(w, "DELETE", &format!("{base}/subscription/s2"), "").await.0, 404);
    assert_eq!(parse(&http(w, "GET", &format!("{base}/subscriptions"), "").await.1), serde_json::json!(["s1"]));

    // Unload: the topic is closed and loaded again on next use; the cursor is kept.
    let last_ledger = |internal: &Value| internal["ledgers"].as_array().and_then(|l| l.last().cloned());
    let before = last_ledger(&internal);
    assert_eq!(http(w, "PUT", &format!("{base}/unload"), "").await.0, 204);
    assert_eq!(backlog("s1").await, 0);
    let internal = parse(&http(w, "GET", &format!("{base}/internalStats"), "").await.1);
    let after = last_ledger(&internal);
    assert!(after.is_some() && after != before, "a new ledger after unloading: {internal}");

    let lookup = parse(&http(w, "GET", "/lookup/v2/topic/persistent/public/default/subs", "").await.1);
    assert!(s.broker_urls.iter().any(|u| lookup["brokerUrl"] == *u), "{lookup}");
    assert_eq!(
        s.owner_web("public/default/subs").await,
        lookup["httpUrl"].as_str().unwrap_or("").replace("http://", "")
    );
}

/// `magnetar produce` and `magnetar consume`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_and_consume_clis() {
    let s = standalone().await;
    let url = s.url();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_magnetar"))
            .args(args)
            .args(["--url", &url])
            .output()
            .expect("run");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let ids = run(&["produce", "cli-topic", "-m", "hello", "-m", "world", "-n", "2"]);
    assert_eq!(ids.lines().count(), 4, "{ids}");
    let got = run(&["consume", "cli-topic", "-s", "cli", "-n", "4", "--earliest", "--timeout", "10"]);
    assert_eq!(got.lines().collect::<Vec<_>>(), ["hello", "world", "hello", "world"]);
    // Batched messages from the official client are split into their messages.
    produce(&url, "cli-topic", 5, true);
    let got = run(&["consume", "cli-topic", "-s", "cli", "-n", "5", "--timeout", "10"]);
    assert_eq!(got.lines().collect::<Vec<_>>(), (0..5).map(|i| format!("msg-{i}")).collect::<Vec<_>>());
}

/// `magnetar perf produce` with a consumer: it reports what it published and consumed after
/// its warm-up only, at the rate asked for, with no errors and an end-to-end latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn perf_produce_measures_after_its_warm_up() {
    let s = standalone().await;
    let args = ["perf", "produce", "--topic", "perf-cli", "--rate", "1000", "--duration", "2", "--warmup-time", "2"];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_magnetar"))
        .args(args)
        .args(["--consumers", "1", "--quiet", "--url", &s.url()])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let summary = text.lines().find(|l| l.starts_with("published ")).unwrap_or_else(|| panic!("{text}"));
    let after = |word: &str| -> f64 {
        let rest = summary.rsplit(word).next().filter(|r| r.len() < summary.len());
        let rest = rest.unwrap_or_else(|| panic!("no {word:?} in {summary}"));
        rest.trim_start()
            .split([' ', ';', ','])
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{summary}"))
    };
    // 1000 msg/s for the 2 measured seconds; the 2 warm-up seconds would double it.
    let published = after("published");
    assert!((1000.0..3000.0).contains(&published), "{summary}");
    assert_eq!(after("errors"), 0.0, "{summary}");
    assert!(after("consumed") >= published * 0.95, "{summary}");
    // The last p99 of the line is the end-to-end one.
    assert!(summary.contains("end-to-end") && after("p99") > 0.0, "{summary}");
    // The measuring subscription went with the run (it would hold every later message).
    let (st, subs) = http(&s.web, "GET", "/admin/v2/persistent/public/default/perf-cli/subscriptions", "").await;
    assert_eq!((st, parse(&subs)), (200, serde_json::json!([])), "{subs}");
}

/// With topic-level series off, `/metrics` has one series per namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_level_metrics() {
    let s = standalone_with(&["expose_topic_level_metrics_in_prometheus=false"]).await;
    produce(&s.url(), "m-one", 3, false);
    produce(&s.url(), "m-two", 4, false);
    let (st, text) = http(&s.web, "GET", "/metrics", "").await;
    assert_eq!(st, 200);
    let m = scrape(&text);
    let ns = r#"cluster="standalone",namespace="public/default""#;
    assert_eq!(m.get(&format!("pulsar_in_messages_total{{{ns}}}")), Some(&7.0), "{text}");
    assert!(!text.contains("topic=\""), "no topic labels:\n{text}");
    // The standalone's metastore and bookie serve their own metrics too.
    let (st, text) = http(&s.metastore_http, "GET", "/metrics", "").await;
    let m = scrape(&text);
    assert!(st == 200 && m.iter().any(|(k, v)| k.starts_with("metastore_raft_is_leader") && *v == 1.0), "{text}");
    let (st, text) = http(&s.bookie_http, "GET", "/metrics", "").await;
    let m = scrape(&text);
    assert!(
        st == 200 && m.iter().any(|(k, v)| k.starts_with("bookkeeper_server_ADD_ENTRY_REQUEST_count") && *v >= 7.0),
        "{text}"
    );
}

/// Terminate: the last id comes back, producers are refused (`TopicTerminated` in the
/// official client), consumers get everything and then REACHED_END_OF_TOPIC; it survives a
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_topic() {
    let s = standalone().await;
    let w = s.web.clone();
    let topic = "persistent://public/default/ending";
    let ids = produce(&s.url(), topic, 5, false);
    let (st, body) = http(&w, "POST", "/admin/v2/persistent/public/default/ending/terminate", "").await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        (parse(&body)["ledgerId"].clone(), parse(&body)["entryId"].clone()),
        (ids[4].0.into(), (ids[4].1 as i64).into())
    );
    super::pulsar_python::scenario(&s.url(), "terminated", "ending");
    let client = Client::connect(&s.broker).await.expect("connect");
    let mut c = client.subscribe(topic, "t", SubType::Exclusive, true).await.expect("subscribe");
    c.flow(10).expect("flow");
    for _ in 0..5 {
        tokio::time::timeout(Duration::from_secs(10), c.next()).await.expect("message").expect("open");
    }
    for _ in 0..100 {
        if c.reached_end_of_topic() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(c.reached_end_of_topic(), "REACHED_END_OF_TOPIC after the last message");
    drop(client);
    let s = s.restart().await;
    super::pulsar_python::scenario(&s.url(), "terminated", "ending");
}

/// An entry over the advertised message size plus room for metadata (a client that does not
/// check the size itself) is refused with `NotAllowedError`, that message only: the producer's
/// next send is stored. Passed on, the bookies would refuse it and fail the topic's ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_size_limit_fails_alone() {
    use magnetar_broker::client::ClientError;
    use magnetar_broker::protocol::pb::ServerError;

    let s = standalone().await;
    let client = Client::connect(&s.broker).await.expect("connect");
    let mut p = client.producer("persistent://public/default/too-big").await.expect("producer");
    p.send(b"before", 0).expect("send");
    p.send(&vec![7u8; (5 << 20) + (20 << 10)], 0).expect("send");
    p.send(b"after", 0).expect("send");
    async fn receipt(p: &mut magnetar_broker::client::Producer) -> Option<magnetar_broker::client::Receipt> {
        tokio::time::timeout(Duration::from_secs(20), p.receipt()).await.expect("receipt")
    }
    assert!(matches!(receipt(&mut p).await, Some((0, Ok(_)))));
    match receipt(&mut p).await {
        Some((1, Err(ClientError::Server { code: ServerError::NotAllowedError, message }))) => {
            assert!(message.contains("maximum message size"), "{message}")
        }
        other => panic!("the oversized message: {other:?}"),
    }
    assert!(matches!(receipt(&mut p).await, Some((2, Ok(_)))), "the topic goes on after the refusal");
}

/// A producer closed right after its sends, without waiting for them: the broker answers the
/// close only after every earlier send's receipt, as Pulsar does (a Java producer fails
/// whatever is still pending once its close is answered, so stored messages would be
/// reported failed, and resent as duplicates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_close_is_answered_after_its_receipts() {
    let s = standalone().await;
    let client = Client::connect(&s.broker).await.expect("connect");
    let mut p = client.producer("persistent://public/default/close-early").await.expect("producer");
    let n = 300;
    for i in 0..n {
        p.send(format!("e-{i}").as_bytes(), 0).expect("send");
    }
    tokio::time::timeout(Duration::from_secs(20), client.close_producer(&p)).await.expect("answer").expect("close");
    let mut receipts = Vec::new();
    while let Some((seq, r)) = p.try_receipt() {
        assert!(r.is_ok(), "send {seq}: {r:?}");
        receipts.push(seq);
    }
    assert_eq!(receipts, (0..n).collect::<Vec<u64>>(), "every receipt before the close's answer");
}

/// A request for a consumer that a SEEK has just closed (its client has not resubscribed yet:
/// a Java reader asks `hasMessageAvailable()` right after `seek()`) is answered at once with
/// `ServiceNotReady`, which clients retry, rather than never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_a_consumer_closed_by_a_seek_are_answered() {
    use magnetar_broker::client::ClientError;
    use magnetar_broker::protocol::pb::ServerError;

    let s = standalone().await;
    let topic = "persistent://public/default/seek-then-ask";
    let ids = produce(&s.url(), topic, 3, false);
    let client = Client::connect(&s.broker).await.expect("connect");
    let c = client.subscribe(topic, "s", SubType::Exclusive, true).await.expect("subscribe");
    let last = client.last_message_id(&c).await.expect("last message id");
    assert_eq!((last.ledger_id, last.entry_id), (ids[2].0, ids[2].1));
    let first =
        magnetar_broker::protocol::pb::MessageIdData { ledger_id: ids[0].0, entry_id: ids[0].1, ..Default::default() };
    client.seek(&c, first).await.expect("seek");
    let asked = tokio::time::timeout(Duration::from_secs(5), client.last_message_id(&c)).await;
    match asked.expect("an answer within 5 s") {
        Err(ClientError::Server { code: ServerError::ServiceNotReady, .. }) => {}
        other => panic!("a request for the closed consumer: {other:?}"),
    }
}

/// A SUBSCRIBE with `force_topic_creation=false` (what pattern consumers send) does not create
/// a topic that does not exist: it is answered `TopicNotFound`, so a topic deleted through the
/// admin API is not brought back by a pattern consumer. Once the topic exists, it subscribes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_that_must_not_create_finds_no_topic() {
    use magnetar_broker::client::ClientError;
    use magnetar_broker::protocol::pb::ServerError;

    let s = standalone().await;
    let topic = "persistent://public/default/not-yet";
    let client = Client::connect(&s.broker).await.expect("connect");
    match client.subscribe_with(topic, "s", SubType::Shared, true, false).await {
        Err(ClientError::Server { code: ServerError::TopicNotFound, .. }) => {}
        Err(e) => panic!("a subscribe to a missing topic without creation: {e:?}"),
        Ok(_) => panic!("a subscribe to a missing topic without creation succeeded"),
    }
    let (code, body) = http(&s.web, "GET", "/admin/v2/persistent/public/default/not-yet/stats", "").await;
    assert_eq!(code, 404, "the topic was created: {body}");
    produce(&s.url(), topic, 1, false);
    let mut c = client.subscribe_with(topic, "s", SubType::Shared, true, false).await.expect("subscribe");
    c.flow(10).expect("flow");
    next_message(&mut c).await;
}

/// A reader started from a rollback duration (Java's `startMessageFromRollbackDuration`) gets
/// the messages published within that duration, neither older ones nor only new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_from_a_rollback_duration_starts_that_far_back() {
    let s = standalone().await;
    let topic = "persistent://public/default/rollback";
    let client = Client::connect(&s.broker).await.expect("connect");
    let mut p = client.producer(topic).await.expect("producer");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
    for i in 0..3 {
        p.send(format!("old-{i}").as_bytes(), now - 60_000).expect("send");
    }
    for i in 0..2 {
        p.send(format!("new-{i}").as_bytes(), now).expect("send");
    }
    let mut ids = Vec::new();
    for _ in 0..5 {
        let (_, r) = tokio::time::timeout(Duration::from_secs(10), p.receipt()).await.expect("receipt").expect("open");
        let id = r.expect("stored");
        ids.push((id.ledger_id, id.entry_id));
    }
    let mut reader = client.reader_from_rollback(topic, 30).await.expect("reader");
    reader.flow(10).expect("flow");
    for want in &ids[3..] {
        let m = next_message(&mut reader).await;
        assert_eq!((m.message_id.ledger_id, m.message_id.entry_id), *want);
    }
    assert!(tokio::time::timeout(Duration::from_millis(500), reader.next()).await.is_err(), "more than the last 30 s");
}

/// The next MESSAGE command to `c`, within 10 s.
async fn next_message(c: &mut magnetar_broker::client::Consumer) -> magnetar_broker::protocol::pb::CommandMessage {
    tokio::time::timeout(Duration::from_secs(10), c.next()).await.expect("message").expect("open").command
}

/// A REDELIVER that names a message twice (the official clients name each once; others need
/// not) delivers it again once, with its redelivery count up by one: counted twice, it would
/// reach a dead-letter policy's limit early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_request_counts_each_message_once() {
    let s = standalone().await;
    let topic = "persistent://public/default/nack-twice";
    let ids = produce(&s.url(), topic, 2, false);
    let client = Client::connect(&s.broker).await.expect("connect");
    let mut c = client.subscribe(topic, "s", SubType::Shared, true).await.expect("subscribe");
    c.flow(100).expect("flow");
    for _ in 0..2 {
        next_message(&mut c).await;
    }
    let first =
        magnetar_broker::protocol::pb::MessageIdData { ledger_id: ids[0].0, entry_id: ids[0].1, ..Default::default() };
    c.redeliver(vec![first.clone(), first], Some(7)).expect("redeliver");
    let again = next_message(&mut c).await;
    assert_eq!((again.message_id.ledger_id, again.message_id.entry_id), (ids[0].0, ids[0].1));
    assert_eq!(again.redelivery_count, Some(1));
    assert_eq!(again.consumer_epoch, None, "a nack starts no epoch");
    let more = tokio::time::timeout(Duration::from_millis(500), c.next()).await;
    assert!(more.is_err(), "delivered again twice");
}

/// A consumer's epoch (Exclusive here): the client sends a new one with a request to deliver
/// everything unacknowledged again, and drops messages that carry an older one (sent before the
/// broker took the request, and coming again anyway). Every message sent after the request
/// must carry the new epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_carry_the_consumer_epoch_of_the_last_redelivery() {
    let s = standalone().await;
    let topic = "persistent://public/default/epochs";
    produce(&s.url(), topic, 3, false);
    let client = Client::connect(&s.broker).await.expect("connect");
    let mut c = client.subscribe(topic, "s", SubType::Exclusive, true).await.expect("subscribe");
    c.flow(100).expect("flow");
    for _ in 0..3 {
        assert_eq!(next_message(&mut c).await.consumer_epoch, None);
    }
    c.redeliver(Vec::new(), Some(1)).expect("redeliver");
    for e in 0..3 {
        let m = next_message(&mut c).await;
        assert_eq!((m.message_id.entry_id, m.consumer_epoch), (e, Some(1)));
    }
}

/// Topic `local` of `public/default` with 5 messages and a stored subscription `s`, then taken
/// over by "another broker": its ledger list rewritten at a new version, as loading it
/// elsewhere does, while this broker still has it loaded. The metastore client, the ledger
/// list's key, the subscription's key and the topic's admin path.
async fn taken_over(s: &super::Standalone, local: &str) -> (MetaClient, String, String, String) {
    use magnetar_broker::protocol::names::TopicName;
    use magnetar_broker::topic::{cursor_key, topic_key};
    use magnetar_metastore::client::PutOptions;

    produce(&s.url(), local, 5, false);
    let base = format!("/admin/v2/persistent/public/default/{local}");
    assert_eq!(http(&s.web, "PUT", &format!("{base}/subscription/s"), "").await.0, 204);
    let meta = MetaClient::connect(std::slice::from_ref(&s.metastore)).expect("meta");
    let name = TopicName::parse(local).expect("name");
    let (tkey, ckey) = (topic_key(&name), cursor_key(&name, "s"));
    assert!(meta.get(&ckey).await.expect("get").is_some(), "the subscription is stored");
    let kv = meta.get(&tkey).await.expect("get").expect("topic");
    meta.put(&tkey, kv.value, PutOptions { expected_version: Some(kv.version), session: 0 }).await.expect("take over");
    (meta, tkey, ckey, base)
}

/// A broker that lost a topic to another one writes none of its cursors any more: here the
/// "other broker" changes the topic's ledger list (as loading the topic does) and deletes a
/// subscription. The first broker's next cursor write (the subscription moved by an admin
/// skip) and its unload (which stores cursors) must not bring the subscription back, or it
/// would hold the backlog for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_former_owner_writes_no_cursor() {
    let s = standalone().await;
    let w = &s.web;
    let (meta, _, ckey, base) = taken_over(&s, "taken").await;
    // The other broker deletes the subscription.
    assert!(meta.delete(&ckey, None).await.expect("delete"));

    // The first broker moves the cursor, then unloads the topic.
    assert_eq!(http(w, "POST", &format!("{base}/subscription/s/skip_all"), "").await.0, 204);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(http(w, "PUT", &format!("{base}/unload"), "").await.0, 204);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(meta.get(&ckey).await.expect("get").is_none(), "a former owner wrote the deleted subscription back");
}

/// A topic delete that fails removes nothing: here another broker has taken the topic over
/// (changed its ledger list) when this one deletes it. The delete must fail, and the
/// subscription stay, or the topic's backlog would be held by nothing and deleted on its next
/// load (and a former owner would delete the new owner's subscriptions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_topic_delete_keeps_the_subscriptions() {
    let s = standalone().await;
    let w = &s.web;
    let (meta, tkey, ckey, base) = taken_over(&s, "delete-taken").await;
    let (code, body) = http(w, "DELETE", &format!("{base}?force=true"), "").await;
    assert_ne!(code, 204, "a delete by a former owner succeeded: {body}");
    assert!(meta.get(&ckey).await.expect("get").is_some(), "a failed delete removed the subscription");
    assert!(meta.get(&tkey).await.expect("get").is_some(), "a failed delete removed the ledger list");
}

/// A broker that lost a topic deletes no subscription of it: here the "other broker" changed
/// the topic's ledger list before the first one is asked to delete a subscription (admin API;
/// UNSUBSCRIBE takes the same path). The delete fails, and the new owner's subscription stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_former_owner_deletes_no_subscription() {
    let s = standalone().await;
    let w = &s.web;
    let (meta, _, ckey, base) = taken_over(&s, "taken-unsub").await;
    let (code, body) = http(w, "DELETE", &format!("{base}/subscription/s"), "").await;
    assert_ne!(code, 204, "a former owner deleted a subscription: {body}");
    assert!(meta.get(&ckey).await.expect("get").is_some(), "the new owner's subscription is gone");
}

/// A subscription created through the admin API at an id past the last entry starts at the
/// last entry: messages published later, up to that id, must not count as acknowledged (nor
/// let their ledger be deleted unread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_created_past_the_end_starts_at_the_last_entry() {
    let s = standalone().await;
    let w = &s.web;
    let base = "/admin/v2/persistent/public/default/past-end";
    produce(&s.url(), "past-end", 5, false);
    let last = parse(&http(w, "GET", &format!("{base}/lastMessageId"), "").await.1);
    let at = format!(r#"{{"ledgerId":{},"entryId":1000}}"#, last["ledgerId"]);
    assert_eq!(http(w, "PUT", &format!("{base}/subscription/s"), &at).await.0, 204);
    produce(&s.url(), "past-end", 3, false);
    let st = parse(&http(w, "GET", &format!("{base}/stats"), "").await.1);
    assert_eq!(st["subscriptions"]["s"]["msgBacklog"], 3, "{st}");
}

/// A cursor write whose answer was lost (here: the cursor's version moved as if it had landed)
/// does not stop the topic's cursor writes for good: the owner takes the version it finds and
/// writes again, so the stored position keeps up with the acknowledgements (a restart would
/// otherwise redeliver everything acknowledged since).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_writes_go_on_after_a_lost_answer() {
    use magnetar_broker::protocol::names::TopicName;
    use magnetar_broker::topic::cursor::CursorInfo;
    use magnetar_broker::topic::cursor_key;
    use magnetar_metastore::client::{MetaClient, PutOptions};
    use pulsar::{Pulsar, TokioExecutor};

    let s = standalone().await;
    let topic = "persistent://public/default/lost-answer";
    let p: Pulsar<TokioExecutor> =
        Pulsar::builder(format!("pulsar://{}", s.broker), TokioExecutor).build().await.expect("connect");
    let exclusive = pulsar::message::proto::command_subscribe::SubType::Exclusive;
    let mut consumer = super::rust_client::consumer(&p, topic, "s", exclusive).await;
    let meta = MetaClient::connect(std::slice::from_ref(&s.metastore)).expect("meta");
    let key = cursor_key(&TopicName::parse(topic).expect("name"), "s");
    let kv = meta.get(&key).await.expect("get").expect("cursor");
    meta.put(&key, kv.value, PutOptions { expected_version: Some(kv.version), session: 0 }).await.expect("bump");

    let mut producer = p.producer().with_topic(topic).build().await.expect("producer");
    let mut last = None;
    for i in 0..5 {
        let receipt =
            producer.send_non_blocking(format!("m-{i}").into_bytes()).await.expect("send").await.expect("receipt");
        last = receipt.message_id.map(|id| (id.ledger_id, id.entry_id as i64));
    }
    for i in 0..5 {
        assert_eq!(super::rust_client::next_body(&mut consumer).await, format!("m-{i}"));
    }
    let stored = || async {
        let kv = meta.get(&key).await.expect("get").expect("cursor");
        serde_json::from_slice::<CursorInfo>(&kv.value)
            .expect("cursor json")
            .mark_delete
            .map(|p| (p.ledger_id, p.entry_id))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while stored().await != last {
        assert!(
            std::time::Instant::now() < deadline,
            "acknowledgements never stored: {:?}, last {last:?}",
            stored().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An unload with requests for the topic arriving while it closes: they wait for the close to
/// finish and then load the topic afresh. A second task loading the topic during the close
/// would fence the ledger the first one is closing and leave its cursors unwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_during_an_unload_wait_for_it() {
    let s = standalone().await;
    let w = s.web.clone();
    produce(&s.url(), "racing", 5, false);
    let base = "/admin/v2/persistent/public/default/racing";
    assert_eq!(http(&w, "PUT", &format!("{base}/subscription/s"), "").await.0, 204);
    for round in 0..5 {
        let unload = {
            let w = w.clone();
            tokio::spawn(async move { http(&w, "PUT", &format!("{base}/unload"), "").await.0 })
        };
        let mut stats = Vec::new();
        for _ in 0..20 {
            let w = w.clone();
            stats.push(tokio::spawn(async move { http(&w, "GET", &format!("{base}/internalStats"), "").await.0 }));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(unload.await.expect("join"), 204, "round {round}");
        for st in stats {
            assert_eq!(st.await.expect("join"), 200, "round {round}");
        }
    }
    let log = std::fs::read_to_string(s._dir.path().join("standalone.log")).expect("log");
    for bad in ["closing the ledger failed", "recording the closed ledger failed", "another broker owns the topic"] {
        assert!(
            !log.contains(bad),
            "`{bad}` in the log:\n{}",
            log.lines().filter(|l| l.contains("racing")).collect::<Vec<_>>().join("\n")
        );
    }
}

/// A client that registers `cmd` (PRODUCER or SUBSCRIBE) on a connection of its own, then
/// goes silent, as if its machine died: the connection stays open and nothing is read from it.
/// Returns the connection, to hold on to.
async fn silent_client(broker: &str, cmd: magnetar_broker::protocol::pb::BaseCommand) -> RawConn {
    use magnetar_broker::protocol::pb::base_command::Type;

    let mut c = RawConn::connect(broker).await;
    let want = if cmd.producer.is_some() { Type::ProducerSuccess } else { Type::Success };
    let got = c.ask(cmd).await;
    assert_eq!(got.r#type, want as i32, "{got:?}");
    c
}

/// A client whose machine died leaves its connection open until the keep-alive gives up. The
/// same application started again must not get `ProducerBusy` for its producer's name, or
/// `ConsumerBusy` for its exclusive subscription, all that time: the broker PINGs the old
/// connection, closes it when no PONG comes within 5 s, and serves the new one. A holder that
/// answers keeps both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_gives_up_its_producer_name_and_exclusive_subscription() {
    use magnetar_broker::client::ClientError;
    use magnetar_broker::protocol::codec::base;
    use magnetar_broker::protocol::pb::{self, base_command::Type, ServerError};

    let s = standalone().await;
    let topic = "persistent://public/default/silent";
    // Silent clients: two with the producers named "fixed" and "fixed-too", one with the
    // exclusive consumer of "excl".
    // PRODUCER with request id 1.
    let producer = |producer_id: u64, name: &str| {
        let p = pb::CommandProducer {
            topic: topic.into(),
            producer_id,
            request_id: 1,
            producer_name: Some(name.into()),
            ..Default::default()
        };
        pb::BaseCommand { producer: Some(Box::new(p)), ..base(Type::Producer) }
    };
    let mut gone_producer = silent_client(&s.broker, producer(1, "fixed")).await;
    let mut gone_too = silent_client(&s.broker, producer(1, "fixed-too")).await;
    // SUBSCRIBE to the exclusive subscription "excl", with request id 1.
    let subscribe = |consumer_id: u64| {
        let c = pb::CommandSubscribe {
            topic: topic.into(),
            subscription: "excl".into(),
            sub_type: SubType::Exclusive as i32,
            consumer_id,
            request_id: 1,
            ..Default::default()
        };
        pb::BaseCommand { subscribe: Some(Box::new(c)), ..base(Type::Subscribe) }
    };
    let mut gone_consumer = silent_client(&s.broker, subscribe(1)).await;

    // A client that answers keeps its name and its subscription.
    let first = Client::connect(&s.broker).await.expect("connect");
    let _kept = first.producer_named(topic, Some("kept")).await.expect("producer kept");
    let _excl = first.subscribe(topic, "kept-excl", SubType::Exclusive, true).await.expect("consumer");
    let second = Client::connect(&s.broker).await.expect("connect");
    let busy = |r: Result<_, ClientError>| match r {
        Err(ClientError::Server { code, .. }) => code,
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("served while the holder answers"),
    };
    assert_eq!(busy(second.producer_named(topic, Some("kept")).await.map(|_| ())), ServerError::ProducerBusy);
    let r = second.subscribe(topic, "kept-excl", SubType::Exclusive, true).await;
    assert_eq!(busy(r.map(|_| ())), ServerError::ConsumerBusy);

    // The silent clients' name and subscription go to the new one once they failed the check.
    // Meanwhile the new producer's connection serves the client's other producers.
    let elsewhere = "persistent://public/default/silent-other";
    let mut other = second.producer_named(elsewhere, Some("other")).await.expect("producer other");
    let started = std::time::Instant::now();
    let named = async {
        let r = tokio::time::timeout(Duration::from_secs(20), second.producer_named(topic, Some("fixed"))).await;
        (r, started.elapsed())
    };
    let meanwhile = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        other.send(b"meanwhile", 0).expect("send");
        other.receipt().await.expect("receipt").1.expect("stored");
        started.elapsed()
    };
    let ((r, named_after), receipt_after) = tokio::join!(named, meanwhile);
    let mut p = r.expect("an answer").expect("the name of a silent client is free again");
    assert!(named_after >= Duration::from_secs(4), "served after the check, {named_after:?}");
    assert!(receipt_after < named_after, "a send waited for the check: {receipt_after:?} vs {named_after:?}");
    // A producer closed by its client while the silent holder of its name is checked takes
    // nothing, and its connection answers the close at once.
    let mut closing = RawConn::connect(&s.broker).await;
    closing.send(producer(7, "fixed-too")).await;
    let close = pb::CommandCloseProducer { producer_id: 7, request_id: 2, ..Default::default() };
    let started = std::time::Instant::now();
    let a = closing.ask(pb::BaseCommand { close_producer: Some(Box::new(close)), ..base(Type::CloseProducer) }).await;
    assert_eq!(a.success.map(|x| x.request_id), Some(2), "the close is answered first");
    let a = tokio::time::timeout(Duration::from_secs(20), closing.next()).await.expect("an answer").expect("open");
    let e = a.error.clone().unwrap_or_else(|| panic!("a producer closed during the check was registered: {a:?}"));
    assert_eq!((e.request_id, e.error), (1, ServerError::ServiceNotReady as i32), "{e:?}");
    assert!(started.elapsed() >= Duration::from_secs(3), "answered after the check, {:?}", started.elapsed());
    let r = tokio::time::timeout(Duration::from_secs(20), second.producer_named(topic, Some("fixed-too"))).await;
    r.expect("an answer").expect("the name is free: its silent holder is gone and the closed producer took nothing");
    // A consumer closed by its client while the silent holder is checked takes nothing.
    let mut closing = RawConn::connect(&s.broker).await;
    closing.send(subscribe(7)).await;
    let close = pb::CommandCloseConsumer { consumer_id: 7, request_id: 2, ..Default::default() };
    let a = closing.ask(pb::BaseCommand { close_consumer: Some(Box::new(close)), ..base(Type::CloseConsumer) }).await;
    assert_eq!(a.success.map(|x| x.request_id), Some(2), "the close is answered at once");
    let started = std::time::Instant::now();
    let a = tokio::time::timeout(Duration::from_secs(20), closing.next()).await.expect("an answer").expect("open");
    let e = a.error.clone().unwrap_or_else(|| panic!("a consumer closed during the check was registered: {a:?}"));
    assert_eq!((e.request_id, e.error), (1, ServerError::ServiceNotReady as i32), "{e:?}");
    assert!(started.elapsed() >= Duration::from_secs(3), "answered after the check, {:?}", started.elapsed());
    // The silent client has gone with that check: the subscription is free.
    let r = tokio::time::timeout(Duration::from_secs(20), second.subscribe(topic, "excl", SubType::Exclusive, true));
    let mut c = r.await.expect("an answer").expect("the exclusive subscription of a silent client is free again");
    p.send(b"after", 0).expect("send");
    p.receipt().await.expect("receipt").1.expect("stored");
    c.flow(10).expect("flow");
    let m = tokio::time::timeout(Duration::from_secs(10), c.next()).await.expect("a message").expect("open");
    assert_eq!(&m.payload.data[..], b"after");
    // The broker closed both silent connections: what is left to read ends.
    for conn in [&mut gone_producer, &mut gone_too, &mut gone_consumer] {
        let ended = tokio::time::timeout(Duration::from_secs(5), async { while conn.next().await.is_some() {} });
        ended.await.expect("the silent connection was closed");
    }
    drop(s);
}

/// `pulsar_ml_cache_used_size` of a broker's `/metrics`.
async fn cache_used(web: &str) -> (f64, f64) {
    let (st, text) = http(web, "GET", "/metrics", "").await;
    assert_eq!(st, 200);
    let m = scrape(&text);
    let get = |k: &str| *m.get(&format!("{k}{{cluster=\"standalone\"}}")).unwrap_or_else(|| panic!("{k}:\n{text}"));
    (get("pulsar_ml_cache_used_size"), get("magnetar_ml_cache_evicted_total"))
}

/// Waits (up to `within`) for the tail caches to hold `bytes`; fails with what they held.
async fn cache_drops_to(web: &str, bytes: f64, within: Duration, why: &str) {
    let started = std::time::Instant::now();
    loop {
        let (used, _) = cache_used(web).await;
        if used == bytes {
            return;
        }
        assert!(started.elapsed() < within, "{why}: the tail caches still hold {used} bytes after {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `n` messages of `size` bytes (the first byte numbering them) and waits for each
/// receipt.
async fn send_numbered(p: &mut magnetar_broker::client::Producer, from: u8, n: u8, size: usize) {
    for i in from..from + n {
        let mut body = vec![i; size];
        body[size - 1] = 0xEE;
        p.send(&body, 0).expect("send");
    }
    for _ in 0..n {
        p.receipt().await.expect("receipt").1.expect("stored");
    }
}

/// Takes `n` messages and checks they are those numbered `from`.., in order and whole.
async fn receive_numbered(c: &mut magnetar_broker::client::Consumer, from: u8, n: u8, size: usize) {
    c.flow(u32::from(n)).expect("flow");
    for i in from..from + n {
        let m = tokio::time::timeout(Duration::from_secs(15), c.next()).await.expect("a message").expect("open");
        let body = &m.payload.data;
        assert_eq!((body.len(), body[0], body[size - 1]), (size, i, 0xEE), "message {i}");
        c.ack(vec![m.command.message_id.clone()]).expect("ack");
    }
}

/// The topics' tail caches share the broker's budget (`managed_ledger_cache_size_mb`): entries
/// are cached only while a subscription has a consumer, leave once every such consumer has
/// read them, leave when older than the age threshold, and a topic going over the budget gives
/// up its own oldest entries. Consumers get every message whole either way (from the bookie
/// when it is no longer cached).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tail_caches_keep_what_consumers_still_need_within_the_budget() {
    // An age threshold of a minute: here entries leave because they were read, or because of
    // the budget (1 MiB).
    let s = standalone_with(&[
        "managed_ledger_cache_size_mb=1",
        "managed_ledger_cache_eviction_time_threshold_millis=60000",
    ])
    .await;
    let client = Client::connect(&s.broker).await.expect("connect");
    let topic = "persistent://public/default/cached";
    let mut p = client.producer(topic).await.expect("producer");
    // No subscription has a consumer: nothing is cached.
    send_numbered(&mut p, 0, 10, 1000).await;
    assert_eq!(cache_used(&s.web).await, (0.0, 0.0), "cached with no consumer");
    // A consumer that has not asked for messages yet: what comes now is cached.
    let mut c = client.subscribe(topic, "s", SubType::Exclusive, true).await.expect("subscribe");
    send_numbered(&mut p, 10, 10, 1000).await;
    let (used, evicted) = cache_used(&s.web).await;
    assert!((10_000.0..20_000.0).contains(&used), "ten entries of 1000 bytes cached: {used}");
    assert_eq!(evicted, 0.0);
    // Read (the first ten from the bookie), the entries leave at the topic's next tick.
    receive_numbered(&mut c, 0, 20, 1000).await;
    cache_drops_to(&s.web, 0.0, Duration::from_secs(10), "every consumer read them").await;

    // 30 entries of 100 KB against a budget of 1 MiB: the topic keeps its newest ten or so.
    let big = 100_000;
    send_numbered(&mut p, 20, 30, big).await;
    let (used, evicted) = cache_used(&s.web).await;
    assert!((9.0 * big as f64..=f64::from(1 << 20)).contains(&used), "within the budget and full: {used}");
    assert!(evicted >= 19.0, "the oldest left for the budget: {evicted}");
    receive_numbered(&mut c, 20, 30, big).await;
    cache_drops_to(&s.web, 0.0, Duration::from_secs(10), "every consumer read them").await;
    // No consumer: nothing more is cached.
    client.unsubscribe(&c).await.expect("unsubscribe");
    send_numbered(&mut p, 50, 5, 1000).await;
    assert_eq!(cache_used(&s.web).await.0, 0.0, "cached with no consumer left");
    drop((p, client, s));

    // Entries a consumer has not read leave after the age threshold (300 ms here), and are
    // then read from the bookie.
    let s = standalone_with(&["managed_ledger_cache_eviction_time_threshold_millis=300"]).await;
    let client = Client::connect(&s.broker).await.expect("connect");
    let mut p = client.producer(topic).await.expect("producer");
    let mut c = client.subscribe(topic, "s", SubType::Exclusive, true).await.expect("subscribe");
    send_numbered(&mut p, 0, 20, 1000).await;
    cache_drops_to(&s.web, 0.0, Duration::from_secs(10), "older than the threshold").await;
    receive_numbered(&mut c, 0, 20, 1000).await;
}

/// `fetchedEntries` of subscription `s` in a topic's `internalStats`, and whether a read from
/// the bookies is in flight for it.
async fn fetched_entries(web: &str, topic: &str) -> (u64, bool) {
    let (st, body) = http(web, "GET", &format!("/admin/v2/persistent/public/default/{topic}/internalStats"), "").await;
    assert_eq!(st, 200, "{body}");
    let cursor = &parse(&body)["cursors"]["s"];
    let n = cursor["fetchedEntries"].as_u64().unwrap_or_else(|| panic!("no fetchedEntries: {body}"));
    (n, cursor["subscriptionHavePendingRead"].as_bool().unwrap_or(false))
}

/// Entries a catching-up subscription read from the bookies are held only while they can still
/// go out: a skip past them (as an admin's skip, a TTL expiry or a backlog-quota eviction
/// does) lets them go, and so does a read that lands behind it. Before, they stayed for as
/// long as the consumer stayed connected, outside the cache budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_read_ahead_are_let_go_once_the_subscription_skips_past_them() {
    let s = standalone_with(&[]).await;
    let client = Client::connect(&s.broker).await.expect("connect");
    let name = "read-ahead";
    let topic = format!("persistent://public/default/{name}");
    let mut p = client.producer(&topic).await.expect("producer");
    // No consumer yet: nothing is cached, so the subscription reads from the bookie.
    send_numbered(&mut p, 0, 200, 1000).await;
    let sub = format!("/admin/v2/persistent/public/default/{name}/subscription/s");
    assert_eq!(http(&s.web, "PUT", &sub, r#"{"ledgerId":-1,"entryId":-1}"#).await.0, 204);
    let mut c = client.subscribe(&topic, "s", SubType::Exclusive, true).await.expect("subscribe");
    receive_numbered(&mut c, 0, 5, 1000).await;
    // The consumer asked for no more: the subscription has read ahead and holds what it read.
    let started = std::time::Instant::now();
    loop {
        let (held, reading) = fetched_entries(&s.web, name).await;
        if held > 0 && !reading {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "nothing read ahead: {held} held, reading {reading}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(http(&s.web, "POST", &format!("{sub}/skip_all"), "").await.0, 204);
    let started = std::time::Instant::now();
    loop {
        let (held, _) = fetched_entries(&s.web, name).await;
        if held == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{held} entries still held after skipping past them");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Delivery goes on from after the skip.
    send_numbered(&mut p, 200, 5, 1000).await;
    receive_numbered(&mut c, 200, 5, 1000).await;
}
