//! Operations: HTTP probes and metrics, ledger deletion and garbage collection, read-only
//! bookies.

use std::time::Duration;

use magnetar_bookie::client::LedgerConfig;
use magnetar_proto::bookie::Code;

use crate::support::{http_get, payload, read_code, wait_until, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_metrics_delete_and_gc() {
    let cluster = Cluster::new(1, &["gc_interval_ms=300"], true).await;
    let b = &cluster.bookies[0];
    let (status, body) = http_get(&b.http, "/api/v1/bookie/state").await.expect("state");
    assert_eq!(status, 200);
    let state: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(state["readOnly"], false);
    assert_eq!(state["running"], true);

    let client = cluster.ledger_client();
    let w = client.create(LedgerConfig::new(1, 1, 1)).await.expect("create");
    let mut added = 0;
    for e in 0..50 {
        let p = payload(w.id(), e, 500);
        added += p.len();
        w.append(p).await.expect("add");
    }
    let (status, metrics) = http_get(&b.http, "/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    let count = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{metrics}"))
    };
    assert!(count("bookie_journal_JOURNAL_SYNC_count") >= 1.0);
    // The stages of an add: every add waited for the writer once, and every one was
    // acknowledged by some fdatasync.
    assert!(count("bookie_journal_JOURNAL_QUEUE_LATENCY_count") >= 50.0);
    assert!(count("bookie_journal_JOURNAL_FLUSH_LATENCY_count") >= 1.0);
    assert!(count("bookie_journal_JOURNAL_APPLY_LATENCY_count") >= 1.0);
    assert!(count("bookie_journal_JOURNAL_FORCE_WRITE_ENQUEUE_count") >= 1.0);
    assert!(count("bookie_journal_JOURNAL_FORCE_WRITE_BATCH_ENTRIES_sum") >= 50.0);
    assert!(count("bookie_ADD_ENTRY{success=\"true\"}") >= 50.0);
    assert!(count("bookie_WRITE_BYTES") > 0.0);
    assert!(metrics.contains("bookie_journal_JOURNAL_SYNC_bucket{journalIndex=\"0\",le=\"+Inf\"}"));

    // The entry logs account for what was added (applied just after the acknowledgements).
    let http = b.http.clone();
    let live_bytes = || {
        let http = http.clone();
        async move {
            let (_, m) = http_get(&http, "/metrics").await.expect("metrics");
            let value = |name: &str| {
                m.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            };
            (value("bookie_entry_log_live_bytes ").unwrap_or(-1.0), value("bookie_entry_log_files ").unwrap_or(-1.0))
        }
    };
    assert!(
        wait_until(Duration::from_secs(10), || async { live_bytes().await.0 >= added as f64 }).await,
        "entry log gauges: {:?}",
        live_bytes().await
    );
    assert!(live_bytes().await.1 >= 1.0);

    // Deleting through the client removes entries at once.
    let id = w.id();
    w.close().await.expect("close");
    assert_eq!(read_code(&b.addr, id, 0).await, Code::Ok as i32);
    client.delete(id).await.expect("delete");
    assert_eq!(read_code(&b.addr, id, 0).await, Code::NoEntry as i32);

    // A ledger whose metadata disappears without the bookie being told is collected.
    let w = client.create(LedgerConfig::new(1, 1, 1)).await.expect("create");
    let id2 = w.id();
    w.append(b"x".to_vec()).await.expect("add");
    w.close().await.expect("close");
    cluster.meta().delete(&format!("/ledgers/{id2}"), None).await.expect("delete metadata");
    let addr = b.addr.clone();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let addr = addr.clone();
            async move { read_code(&addr, id2, 0).await == Code::NoEntry as i32 }
        })
        .await,
        "GC did not remove the deleted ledger\n{}",
        b.log_tail()
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_makes_the_bookie_read_only() {
    // Any usage counts as "full" here.
    let cluster = Cluster::new(1, &["disk_usage_threshold=0.0", "disk_usage_lwm_threshold=0.0"], true).await;
    let b = &cluster.bookies[0];
    let (_, body) = http_get(&b.http, "/api/v1/bookie/state").await.expect("state");
    assert!(body.contains("\"readOnly\":true"), "{body}");
    let kv = cluster.meta().get(&format!("/bookies/available/{}", b.id)).await.expect("get").expect("registered");
    assert!(String::from_utf8_lossy(&kv.value).contains("\"readOnly\":true"));
    // Ledger clients do not pick it.
    let client = cluster.ledger_client();
    assert!(client.create(LedgerConfig::new(1, 1, 1)).await.is_err());
    cluster.shutdown().await;
}

/// A bookie stops promptly and cleanly while a writer keeps an add stream open on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stops_cleanly_with_an_idle_writer_connected() {
    let mut cluster = Cluster::new(1, &[], true).await;
    let client = cluster.ledger_client();
    let w = client.create(LedgerConfig::new(1, 1, 1)).await.expect("create");
    w.append(b"keeps the stream open".to_vec()).await.expect("add");
    let started = std::time::Instant::now();
    cluster.bookies[0].terminate();
    assert!(started.elapsed() < Duration::from_secs(5), "stopping took {:?}", started.elapsed());
    assert!(cluster.bookies[0].log_tail().contains("bookie stopped"), "{}", cluster.bookies[0].log_tail());
    drop(w);
    cluster.shutdown().await;
}

/// One `AddBatch` whose adds belong to ledgers of two journals, with a corrupt add among them:
/// every add is answered once, by its ledger and entry, and the good ones read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_add_batch_over_two_journals_is_answered_add_by_add() {
    use futures::StreamExt;
    use magnetar_bookie::checksum::entry_checksum;
    use magnetar_proto::bookie::{bookie_client::BookieClient, AddBatch, AddRequest};

    let mut cluster = Cluster::new(1, &[], false).await;
    cluster.bookies[0].use_two_journals();
    cluster.bookies[0].start().await;
    let addr = cluster.bookies[0].addr.clone();
    let add = |ledger: u64, entry: i64, corrupt: bool| {
        let payload = bytes::Bytes::from(payload(ledger, entry, 200));
        let checksum = entry_checksum(ledger, entry, &payload) ^ u32::from(corrupt);
        AddRequest {
            ledger_id: ledger,
            entry_id: entry,
            lac: entry - 1,
            payload,
            checksum,
            master_key: "k".into(),
            recovery: false,
        }
    };
    // Ledgers 10 and 11 go to different journals (ledger id modulo the journal count).
    let mut adds = Vec::new();
    for e in 0..3 {
        adds.push(add(10, e, false));
        adds.push(add(11, e, false));
    }
    adds.push(add(11, 3, true));
    let mut c = BookieClient::connect(format!("http://{addr}")).await.expect("connect");
    let mut answers = c.add(futures::stream::iter([AddBatch { adds }])).await.expect("add stream").into_inner();
    let mut got = Vec::new();
    while got.len() < 7 {
        let batch = tokio::time::timeout(Duration::from_secs(10), answers.next())
            .await
            .expect("answers in time")
            .expect("stream open")
            .expect("answers");
        got.extend(batch.results.into_iter().map(|r| (r.ledger_id, r.entry_id, r.code)));
    }
    got.sort();
    let ok = Code::Ok as i32;
    let want = vec![
        (10, 0, ok),
        (10, 1, ok),
        (10, 2, ok),
        (11, 0, ok),
        (11, 1, ok),
        (11, 2, ok),
        (11, 3, Code::Corrupt as i32),
    ];
    assert_eq!(got, want);
    for (ledger, entry, code) in want {
        let read = read_code(&addr, ledger, entry).await;
        assert_eq!(read == ok, code == ok, "ledger {ledger} entry {entry}: read code {read}");
    }
    cluster.shutdown().await;
}
