//! Consumed ledgers are deleted (Pulsar's default retention: nothing past acknowledgement),
//! never one holding a message some subscription has not acknowledged, and a retention
//! policy keeps them.

use std::time::{Duration, Instant};

use magnetar_bookie::client::metadata::ledger_key;
use magnetar_broker::protocol::names::TopicName;
use magnetar_broker::topic::{topic_key, ManagedLedgerInfo};
use magnetar_metastore::client::MetaClient;
use pulsar::message::proto::command_subscribe::SubType;
use pulsar::{Pulsar, TokioExecutor};

use super::rust_client::{consumer, next_body};
use super::standalone_with;

async fn ledger_ids(meta: &MetaClient, topic: &str) -> Vec<u64> {
    let kv = meta.get(&topic_key(&TopicName::parse(topic).expect("name"))).await.expect("get").expect("topic");
    let info: ManagedLedgerInfo = serde_json::from_slice(&kv.value).expect("json");
    info.ledgers.iter().map(|l| l.ledger_id).collect()
}

/// Waits up to 20 s for the topic's ledger list to satisfy `done`; returns the last one read.
async fn wait_ledgers(meta: &MetaClient, topic: &str, done: impl Fn(&[u64]) -> bool) -> Vec<u64> {
    let start = Instant::now();
    loop {
        let ids = ledger_ids(meta, topic).await;
        if done(&ids) || start.elapsed() > Duration::from_secs(20) {
            return ids;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends 12 messages to `topic` (three ledgers of 5), lets rollovers and a few retention
/// checks (every second in these tests) pass, and checks that every ledger is still listed.
async fn send_and_check_kept(p: &Pulsar<TokioExecutor>, meta: &MetaClient, topic: &str) -> Vec<(u64, u64)> {
    let ids = send_all(p, topic, 0, 12).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let left = ledger_ids(meta, topic).await;
    assert_eq!(left[0], ids[0].0, "every ledger kept: {left:?}");
    assert!(left.len() >= 3, "{left:?}");
    ids
}

async fn send_all(p: &Pulsar<TokioExecutor>, topic: &str, from: usize, to: usize) -> Vec<(u64, u64)> {
    let mut producer = p.producer().with_topic(topic).build().await.expect("producer");
    let mut ids = Vec::new();
    for i in from..to {
        let r = producer.send_non_blocking(format!("m-{i}").into_bytes()).await.expect("send").await.expect("receipt");
        let id = r.message_id.expect("id");
        ids.push((id.ledger_id, id.entry_id));
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumed_ledgers_are_deleted_and_retention_keeps_them() {
    let s =
        standalone_with(&["managed_ledger_max_entries_per_ledger=5", "retention_check_interval_in_seconds=1"]).await;
    let meta = MetaClient::connect(std::slice::from_ref(&s.metastore)).expect("meta");
    let p: Pulsar<TokioExecutor> = Pulsar::builder(s.url(), TokioExecutor).build().await.expect("connect");

    // Two subscriptions; 30 messages, one entry each, in ledgers of 5.
    let topic = "persistent://public/default/trimmed";
    let mut fast = consumer(&p, topic, "fast", SubType::Exclusive).await;
    let mut slow = consumer(&p, topic, "slow", SubType::Exclusive).await;
    let ids = send_all(&p, topic, 0, 30).await;
    let ledgers: Vec<u64> = ids.iter().map(|i| i.0).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    assert_eq!(ledgers.len(), 6, "{ids:?}");
    for i in 0..30 {
        assert_eq!(next_body(&mut fast).await, format!("m-{i}"));
    }
    // The slow subscription acknowledges the first 12: two ledgers wholly, the third in part.
    for i in 0..12 {
        assert_eq!(next_body(&mut slow).await, format!("m-{i}"));
    }
    // Each retention check trims what the acknowledgements so far allow: the first ledger
    // can go one check before the second.
    let left = wait_ledgers(&meta, topic, |l| !l.contains(&ledgers[0]) && !l.contains(&ledgers[1])).await;
    assert_eq!(left[0], ledgers[2], "the ledger holding m-12 stays, the two before it go: {left:?}");
    for gone in &ledgers[..2] {
        let start = Instant::now();
        while meta.get(&ledger_key(*gone)).await.expect("get").is_some() && start.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(meta.get(&ledger_key(*gone)).await.expect("get").is_none(), "ledger {gone} deleted");
    }
    // Nothing unacknowledged was lost: the slow subscription reads on, here and after its
    // consumer reconnects.
    for i in 12..20 {
        assert_eq!(next_body(&mut slow).await, format!("m-{i}"));
    }
    drop(slow);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut slow = consumer(&p, topic, "slow", SubType::Exclusive).await;
    for i in 20..30 {
        assert_eq!(next_body(&mut slow).await, format!("m-{i}"));
    }
    // Everything acknowledged: only the ledger being written (the one opened after the 30th
    // entry filled the sixth) is left.
    let left = wait_ledgers(&meta, topic, |l| l.len() == 1).await;
    assert!(left.len() == 1 && left[0] > ledgers[5], "{left:?}");

    // Without subscriptions nothing is kept past a rollover...
    let bare = "persistent://public/default/no-subscriptions";
    let ids = send_all(&p, bare, 0, 12).await;
    let last = ids.last().expect("ids").0;
    let left = wait_ledgers(&meta, bare, |l| l[0] == last).await;
    assert_eq!(left[0], last, "{left:?}");

    // ...unless the namespace's retention policy keeps it.
    let policy = r#"{"retentionTimeInMinutes":-1,"retentionSizeInMB":-1}"#;
    let r = magnetar_broker::http::request_following(
        &format!("http://{}", s.web),
        "POST",
        "/admin/v2/namespaces/public/default/retention",
        policy,
    )
    .await
    .expect("set retention");
    assert_eq!(r.status, 204, "{}", r.body);
    let kept = "persistent://public/default/retained";
    send_and_check_kept(&p, &meta, kept).await;
    let mut reader = consumer(&p, kept, "late", SubType::Exclusive).await;
    for i in 0..12 {
        assert_eq!(next_body(&mut reader).await, format!("m-{i}"));
    }
}

/// A stored subscription the broker cannot load would not hold its backlog: no ledger of
/// the topic is deleted until every stored subscription is loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ledger_is_deleted_while_a_subscription_is_not_loaded() {
    use magnetar_broker::topic::cursor_key;
    use magnetar_metastore::client::PutOptions;

    let s =
        standalone_with(&["managed_ledger_max_entries_per_ledger=5", "retention_check_interval_in_seconds=1"]).await;
    let meta = MetaClient::connect(std::slice::from_ref(&s.metastore)).expect("meta");
    let topic = "persistent://public/default/unloadable";
    let bad = cursor_key(&TopicName::parse(topic).expect("name"), "broken");
    meta.put(&bad, b"not a cursor".to_vec(), PutOptions::default()).await.expect("put");
    let p: Pulsar<TokioExecutor> = Pulsar::builder(s.url(), TokioExecutor).build().await.expect("connect");
    let ids = send_and_check_kept(&p, &meta, topic).await;
    // Once the broken subscription is gone, the next check loads the (now complete) set and
    // deletes: the topic has no subscription left to hold anything.
    meta.delete(&bad, None).await.expect("delete");
    let last = ids.last().expect("ids").0;
    let left = wait_ledgers(&meta, topic, |l| l[0] == last).await;
    assert_eq!(left[0], last, "{left:?}");
}

/// An acknowledgement of a message not written yet is ignored: it must not make that
/// message count as acknowledged (and its ledger deletable) before anyone read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_beyond_the_last_message_are_ignored() {
    use magnetar_broker::client::Client;
    use magnetar_broker::protocol::pb;

    let s = standalone_with(&[]).await;
    let topic = "persistent://public/default/early-acks";
    let c = Client::connect_for(&s.broker, topic).await.expect("connect");
    let mut consumer = c.subscribe(topic, "early", pb::command_subscribe::SubType::Exclusive, true).await.expect("sub");
    consumer.flow(100).expect("flow");
    let mut producer = c.producer(topic).await.expect("producer");
    producer.send(b"first", 0).expect("send");
    producer.receipt().await.expect("receipt").1.expect("stored");
    let m = tokio::time::timeout(Duration::from_secs(15), consumer.next()).await.expect("in time").expect("open");
    let (ledger, entry) = (m.command.message_id.ledger_id, m.command.message_id.entry_id);
    // Acknowledge the entry after the next one, before either is written.
    let ahead = pb::MessageIdData { ledger_id: ledger, entry_id: entry + 2, ..Default::default() };
    consumer.ack(vec![ahead]).expect("ack");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for body in [&b"second"[..], b"third"] {
        producer.send(body, 0).expect("send");
        producer.receipt().await.expect("receipt").1.expect("stored");
    }
    for (i, body) in [&b"second"[..], b"third"].into_iter().enumerate() {
        let m = tokio::time::timeout(Duration::from_secs(15), consumer.next()).await.expect("in time").expect("open");
        assert_eq!(m.command.message_id.entry_id, entry + 1 + i as u64);
        assert_eq!(&m.payload.data[..], body, "message {i} after the early ack");
    }
}

/// A closed ledger with `n` entries, created for `topic` (its `topic` property) or for none,
/// as a broker would create it, but listed nowhere.
async fn unlisted_ledger(ledgers: &magnetar_bookie::client::LedgerClient, topic: Option<&str>, n: usize) -> u64 {
    let mut cfg = magnetar_bookie::client::LedgerConfig::new(1, 1, 1);
    if let Some(t) = topic {
        cfg.custom.insert(magnetar_broker::topic::TOPIC_PROPERTY.into(), t.into());
    }
    let w = ledgers.create(cfg).await.expect("create");
    for i in 0..n {
        w.append(format!("orphan-{i}").into_bytes()).await.expect("append");
    }
    let id = w.id();
    w.close().await.expect("close");
    id
}

/// What the bookie answers for entry 0 of `ledger`.
async fn bookie_read(ledgers: &magnetar_bookie::client::LedgerClient, bookie: &str, ledger: u64) -> i32 {
    let mut c = ledgers.bookies().client(bookie).await.expect("bookie client");
    let req = magnetar_proto::bookie::ReadRequest { ledger_id: ledger, entry_ids: vec![0], ..Default::default() };
    c.read(req).await.expect("read").into_inner().entries[0].code
}

/// Ledgers no topic lists — those a broker that died between removing consumed ledgers from
/// the list and deleting them leaves, and those of a topic deleted the same way — are deleted
/// (metadata and entries) once old enough; listed ledgers, ledgers of no topic, and young
/// ones stay. A ledger is also created and listed in one transaction, so a lost race creates
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledgers_no_topic_lists_are_deleted() {
    use magnetar_bookie::client::metadata::LEDGERS_PREFIX;
    use magnetar_bookie::client::{LedgerClient, LedgerConfig, LedgerOptions};
    use magnetar_metastore::client::Txn;
    use magnetar_proto::bookie::Code;

    let min_age = Duration::from_secs(4);
    let s = standalone_with(&["orphan_ledger_check_interval_in_seconds=1", "orphan_ledger_min_age_in_seconds=4"]).await;
    let meta = MetaClient::connect(std::slice::from_ref(&s.metastore)).expect("meta");
    let ledgers = LedgerClient::new(meta.clone(), LedgerOptions::default());
    let p: Pulsar<TokioExecutor> = Pulsar::builder(s.url(), TokioExecutor).build().await.expect("connect");
    let topic = "persistent://public/default/with-orphans";
    let mut reader = consumer(&p, topic, "sub", SubType::Exclusive).await;
    send_all(&p, topic, 0, 5).await;
    let listed = ledger_ids(&meta, topic).await;

    let created = std::time::Instant::now();
    let trimmed = unlisted_ledger(&ledgers, Some(topic), 3).await;
    let of_deleted_topic = unlisted_ledger(&ledgers, Some("persistent://public/default/deleted-before"), 2).await;
    let of_no_topic = unlisted_ledger(&ledgers, None, 1).await;
    let (md, version) = ledgers.metadata(trimmed).await.expect("metadata");
    let bookie = md.fragments[0].bookies[0].clone();
    assert_eq!(bookie_read(&ledgers, &bookie, trimmed).await, Code::Ok as i32);

    // A deletion that checks a stale version of the topic's list deletes nothing.
    let list_version =
        meta.get(&topic_key(&TopicName::parse(topic).expect("name"))).await.expect("get").expect("list").version;
    let stale = Txn::default().compare(topic_key(&TopicName::parse(topic).expect("name")), list_version - 1);
    assert!(!ledgers.delete_if(&md, version, stale).await.expect("delete_if"));
    // Young orphans stay (checked well inside the minimum age, with the collector running
    // every second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for id in [trimmed, of_deleted_topic] {
        let kept = meta.get(&ledger_key(id)).await.expect("get").is_some();
        // Only a read made before the minimum age passed says anything.
        assert!(kept || created.elapsed() >= min_age, "young ledger {id} deleted");
    }

    // Old enough, the unlisted ones go, metadata and entries.
    let start = std::time::Instant::now();
    while meta.get(&ledger_key(trimmed)).await.expect("get").is_some()
        || meta.get(&ledger_key(of_deleted_topic)).await.expect("get").is_some()
    {
        assert!(start.elapsed() < Duration::from_secs(30), "unlisted ledgers not deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The entries go right after the metadata (or through the bookie's garbage collector).
    while bookie_read(&ledgers, &bookie, trimmed).await != Code::NoEntry as i32 {
        assert!(start.elapsed() < Duration::from_secs(60), "the bookie kept the deleted ledger's entries");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(meta.get(&ledger_key(of_no_topic)).await.expect("get").is_some(), "a ledger of no topic stays");
    // Counted in the broker's metrics once the look that deleted them ends.
    let counted = "magnetar_orphan_ledgers_deleted_total{cluster=\"standalone\"} 2";
    loop {
        let (st, text) = super::cluster::http_get(&s.web, "/metrics").await.expect("metrics");
        if st == 200 && text.lines().any(|l| l == counted) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no `{counted}` in\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in &listed {
        assert!(meta.get(&ledger_key(*id)).await.expect("get").is_some(), "listed ledger {id} stays");
    }
    assert_eq!(ledger_ids(&meta, topic).await, listed);
    for i in 0..5 {
        assert_eq!(next_body(&mut reader).await, format!("m-{i}"), "the topic's messages stay");
    }

    // Creating a ledger whose listing loses its compare writes nothing.
    let before = meta.list(LEDGERS_PREFIX).await.expect("list").len();
    let lost = ledgers
        .create_with(LedgerConfig::new(1, 1, 1), |_| Ok(Txn::default().compare("/topics/none", 7)))
        .await
        .expect("create_with");
    assert!(lost.is_none());
    assert_eq!(meta.list(LEDGERS_PREFIX).await.expect("list").len(), before);
}

/// The backlog of subscription `sub` of `topic`, from the admin API's topic stats.
async fn backlog(web: &str, topic: &str, sub: &str) -> u64 {
    let path = format!("/admin/v2/{}/stats", topic.replace("://", "/"));
    let r = magnetar_broker::http::request_following(&format!("http://{web}"), "GET", &path, "").await.expect("stats");
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
    v["subscriptions"][sub]["msgBacklog"].as_u64().unwrap_or_else(|| panic!("no backlog for {sub}: {v}"))
}

/// Pulsar's message TTL: the periodic expiry check acknowledges, on every subscription, the
/// messages published longer ago than the namespace's `messageTTL`; newer ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_past_the_namespace_ttl_expire() {
    let s = standalone_with(&["message_expiry_check_interval_in_minutes=0.01"]).await;
    let r = magnetar_broker::http::request_following(
        &format!("http://{}", s.web),
        "POST",
        "/admin/v2/namespaces/public/default/messageTTL",
        "5",
    )
    .await
    .expect("set the TTL");
    assert_eq!(r.status, 204, "{}", r.body);
    let p: Pulsar<TokioExecutor> = Pulsar::builder(s.url(), TokioExecutor).build().await.expect("connect");
    let topic = "persistent://public/default/ttl";
    // Two subscriptions with no consumer connected hold what is sent: 5 messages, and 3 more
    // 4 s later.
    drop(consumer(&p, topic, "one", SubType::Exclusive).await);
    drop(consumer(&p, topic, "two", SubType::Shared).await);
    let sent = Instant::now();
    send_all(&p, topic, 0, 5).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(backlog(&s.web, topic, "one").await, 5, "nothing expires before its TTL");
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(sent.elapsed())).await;
    let sent_later = Instant::now();
    send_all(&p, topic, 5, 8).await;
    // Checked every 0.6 s here: the first 5 go from both once past the TTL, the 3 later ones
    // a little over 4 s after them.
    let wait_for = |sub: &'static str, left: u64| {
        let web = s.web.clone();
        async move {
            loop {
                let n = backlog(&web, topic, sub).await;
                if n <= left {
                    return n;
                }
                assert!(sent.elapsed() < Duration::from_secs(40), "{sub} still holds {n} messages past their TTL");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    for sub in ["one", "two"] {
        assert_eq!(wait_for(sub, 3).await, 3, "{sub}: only the messages past their TTL expire");
    }
    // Every message was published after `sent`.
    assert!(sent.elapsed() >= Duration::from_millis(4900), "expired {:?} after sending", sent.elapsed());
    assert!(sent_later.elapsed() < Duration::from_secs(4), "too slow to tell the later messages apart");
    for sub in ["one", "two"] {
        assert_eq!(wait_for(sub, 0).await, 0);
    }
    assert!(sent_later.elapsed() >= Duration::from_millis(4900), "expired {:?} after sending", sent_later.elapsed());
    // `remove-message-ttl` takes the policy away.
    let web = format!("http://{}", s.web);
    let path = "/admin/v2/namespaces/public/default/messageTTL";
    let r = magnetar_broker::http::request_following(&web, "DELETE", path, "").await.expect("remove");
    assert_eq!(r.status, 204, "{}", r.body);
    let r = magnetar_broker::http::request_following(&web, "GET", path, "").await.expect("get");
    assert_eq!((r.status, r.body.trim()), (200, "null"));
}

/// A topic's own message TTL (`topics set-message-ttl`) overrides its namespace's; set on a
/// partitioned topic it applies to every partition. Removing it, or deleting the topic, takes
/// it away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_ttl_overrides_the_namespace_ttl() {
    let s = standalone_with(&["message_expiry_check_interval_in_minutes=0.01"]).await;
    let admin = |method: &'static str, path: String, body: &'static str| admin_call(&s.web, method, path, body);
    let ttl_path = |topic: &str| format!("/admin/v2/persistent/public/default/{topic}/messageTTL");
    // The namespace keeps messages for an hour.
    assert_eq!(admin("POST", "/admin/v2/namespaces/public/default/messageTTL".into(), "3600").await.0, 204);
    let (topic, other) = ("persistent://public/default/ttl-own", "persistent://public/default/ttl-namespace");
    let parts =
        ["persistent://public/default/ttl-parts-partition-0", "persistent://public/default/ttl-parts-partition-1"];
    // A topic-level policy needs its topic.
    let set = |topic: &str, v: &str| admin("POST", format!("{}?messageTTL={v}", ttl_path(topic)), "");
    assert_eq!(set("ttl-own", "2").await.0, 404);
    assert_eq!(admin("PUT", "/admin/v2/persistent/public/default/ttl-parts/partitions".into(), "2").await.0, 204);
    let p: Pulsar<TokioExecutor> = Pulsar::builder(s.url(), TokioExecutor).build().await.expect("connect");
    for t in [topic, other, parts[0], parts[1]] {
        drop(consumer(&p, t, "sub", SubType::Exclusive).await);
    }
    assert_eq!(set("ttl-own", "2").await.0, 204);
    assert_eq!(set("ttl-parts", "2").await.0, 204);
    assert_eq!(set("ttl-own", "-1").await.0, 412, "a TTL is 0 or more seconds");
    assert_eq!(admin("GET", ttl_path("ttl-own"), "").await, (200, "2".into()));
    assert_eq!(admin("GET", ttl_path("ttl-namespace"), "").await, (200, "null".into()));
    // In effect (`--applied`): the topic's own, the partitioned topic's, else the namespace's.
    let applied = |topic: &str| admin("GET", format!("{}?applied=true", ttl_path(topic)), "");
    assert_eq!(applied("ttl-own").await, (200, "2".into()));
    assert_eq!(applied("ttl-parts-partition-1").await, (200, "2".into()));
    assert_eq!(applied("ttl-namespace").await, (200, "3600".into()));

    let sent = Instant::now();
    for t in [topic, other, parts[0], parts[1]] {
        send_all(&p, t, 0, 3).await;
    }
    for t in [topic, parts[0], parts[1]] {
        while backlog(&s.web, t, "sub").await > 0 {
            assert!(sent.elapsed() < Duration::from_secs(30), "{t} still holds messages past its topic TTL");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(sent.elapsed() >= Duration::from_millis(1900), "expired {:?} after sending", sent.elapsed());
    assert_eq!(backlog(&s.web, other, "sub").await, 3, "the namespace's hour holds the other topic's messages");

    // `remove-message-ttl`: the namespace's hour applies again.
    assert_eq!(admin("DELETE", ttl_path("ttl-own"), "").await.0, 204);
    assert_eq!(admin("GET", ttl_path("ttl-own"), "").await, (200, "null".into()));
    let resent = Instant::now();
    send_all(&p, topic, 3, 5).await;
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(resent.elapsed())).await;
    assert_eq!(backlog(&s.web, topic, "sub").await, 2, "without its own TTL the topic keeps its messages");
    // A deleted topic's policy goes with it: a topic made again under the name has none.
    let parts_path = "/admin/v2/persistent/public/default/ttl-parts/partitions";
    assert_eq!(admin("DELETE", format!("{parts_path}?force=true"), "").await.0, 204);
    assert_eq!(admin("GET", ttl_path("ttl-parts"), "").await.0, 404);
    assert_eq!(admin("DELETE", "/admin/v2/persistent/public/default/ttl-own?force=true".into(), "").await.0, 204);
    assert_eq!(admin("PUT", parts_path.into(), "2").await.0, 204);
    assert_eq!(admin("PUT", "/admin/v2/persistent/public/default/ttl-own".into(), "").await.0, 204);
    assert_eq!(admin("GET", ttl_path("ttl-parts"), "").await, (200, "null".into()));
    assert_eq!(admin("GET", ttl_path("ttl-own"), "").await, (200, "null".into()));
}

/// `method path` on the admin API at `web`: the status and the trimmed body.
async fn admin_call(web: &str, method: &str, path: String, body: &str) -> (u16, String) {
    let r =
        magnetar_broker::http::request_following(&format!("http://{web}"), method, &path, body).await.expect("admin");
    (r.status, r.body.trim().to_owned())
}

/// Backlog quotas as in Pulsar: past its namespace's `destination_storage` limit a topic
/// closes its producers and refuses new ones (`producer_exception`) until the backlog is
/// consumed; with `consumer_backlog_eviction` (here the broker's default, for a namespace
/// without a quota of its own) the oldest messages are acknowledged until it is within the
/// limit, and producers go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_quotas_hold_producers_off_or_evict() {
    use magnetar_broker::client::{Client, ClientError};
    use magnetar_broker::protocol::pb::ServerError;
    let s = standalone_with(&[
        "backlog_quota_check_interval_in_seconds=1",
        "backlog_quota_default_limit_bytes=10000",
        "backlog_quota_default_retention_policy=consumer_backlog_eviction",
    ])
    .await;
    let admin =
        |method: &'static str, path: &str, body: &'static str| admin_call(&s.web, method, path.to_owned(), body);
    let quota_path = "/admin/v2/namespaces/public/default/backlogQuota?backlogQuotaType=destination_storage";
    let bad = r#"{"limitSize": 10000, "policy": "drop_everything"}"#;
    assert_eq!(admin("POST", quota_path, bad).await.0, 412);
    // Until the namespace has a quota of its own, the broker's default (eviction) applies.
    let no_limit = r#"{"limitSize": -1, "policy": "producer_exception"}"#;
    assert_eq!(admin("POST", quota_path, no_limit).await.0, 204);
    assert_eq!(admin("PUT", "/admin/v2/namespaces/public/evict", "").await.0, 204);

    let p: Pulsar<TokioExecutor> = Pulsar::builder(s.url(), TokioExecutor).build().await.expect("connect");
    let (held, evicted) = ("persistent://public/default/quota-held", "persistent://public/evict/quota-evicted");
    for t in [held, evicted] {
        drop(consumer(&p, t, "slow", SubType::Exclusive).await);
    }
    let client = Client::connect(&s.broker).await.expect("connect");
    let publishers = |topic: &'static str| {
        let web = s.web.clone();
        async move {
            let path = format!("/admin/v2/{}/stats", topic.replace("://", "/"));
            let st: serde_json::Value = serde_json::from_str(&admin_call(&web, "GET", path, "").await.1).expect("json");
            st["publishers"].as_array().map_or(0, |a| a.len())
        }
    };
    // 30 entries of 1 KiB on each: three times the 10000-byte quota.
    let mut producers = Vec::new();
    for t in [held, evicted] {
        let mut producer = client.producer_named(t, Some("first")).await.expect("producer");
        for _ in 0..30 {
            producer.send(&[7u8; 1024], 0).expect("send");
        }
        for _ in 0..30 {
            producer.receipt().await.expect("receipt").1.expect("stored");
        }
        producers.push(producer);
    }

    // producer_exception, set once everything is stored (a producer closed during the sends
    // would leave them unanswered): within a check or two the producer is closed, and new
    // ones are refused while the backlog lasts.
    let quota = r#"{"limitSize": 10000, "limitTime": -1, "policy": "producer_exception"}"#;
    assert_eq!(admin("POST", quota_path, quota).await.0, 204);
    let (st, map) = admin("GET", "/admin/v2/namespaces/public/default/backlogQuotaMap", "").await;
    let map: serde_json::Value = serde_json::from_str(&map).expect("json");
    assert_eq!((st, &map["destination_storage"]["policy"]), (200, &serde_json::json!("producer_exception")), "{map}");
    assert_eq!(backlog(&s.web, held, "slow").await, 30, "no limit: nothing was evicted");
    let start = Instant::now();
    while publishers(held).await > 0 {
        assert!(start.elapsed() < Duration::from_secs(20), "the producer over the quota is still connected");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    match client.producer_named(held, Some("second")).await {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ServerError::ProducerBlockedQuotaExceededException),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a producer was served over the quota"),
    }
    assert_eq!(backlog(&s.web, held, "slow").await, 30, "nothing is evicted under producer_exception");
    let skip = "/admin/v2/persistent/public/default/quota-held/subscription/slow/skip_all";
    assert_eq!(admin("POST", skip, "").await.0, 204);
    client.producer_named(held, Some("second")).await.expect("served once the backlog is consumed");

    // consumer_backlog_eviction (the broker's default): the oldest entries go until the
    // backlog is within 90% of the limit (8 of these entries), and the producer stays.
    let start = Instant::now();
    let left = loop {
        let n = backlog(&s.web, evicted, "slow").await;
        if n <= 9 {
            break n;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{n} entries left over the quota");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(left >= 1, "the newest entries are kept");
    assert_eq!(publishers(evicted).await, 1, "eviction leaves the producer connected");
    client.producer_named(evicted, Some("second")).await.expect("served under eviction");

    // `remove-backlog-quota` takes the namespace's quota away.
    assert_eq!(admin("DELETE", quota_path, "").await.0, 204);
    let (_, map) = admin("GET", "/admin/v2/namespaces/public/default/backlogQuotaMap", "").await;
    assert!(!map.contains("destination_storage"), "{map}");
    drop(producers);
}
