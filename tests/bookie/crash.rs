//! Crash durability. Contract: every add a bookie acknowledged survives a SIGKILL of that
//! bookie at any moment, and is read back after restart with the same bytes. Checked with a
//! single-bookie ledger (E = Qw = Qa = 1) so the killed bookie holds the only copy; the
//! journal segments are small and checkpoints frequent so kills land during segment rolls,
//! recycling and checkpoints too.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use magnetar_bookie::client::LedgerConfig;

use crate::support::{payload, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_writes_loses_no_acknowledged_entry() {
    let mut cluster =
        Cluster::new(1, &["storage.checkpoint_interval_ms=300", "journal.segment_bytes=2621440"], true).await;
    let client = cluster.ledger_client();
    for round in 0..3u64 {
        let w = client.create(LedgerConfig::new(1, 1, 1)).await.expect("create");
        let id = w.id();
        let acked: Arc<Mutex<BTreeMap<i64, Vec<u8>>>> = Arc::default();
        let mut inflight = FuturesUnordered::new();
        let mut next = 0i64;
        let kill_after = Duration::from_millis(700 + 400 * round);
        let started = std::time::Instant::now();
        let mut killed = false;
        loop {
            while !killed && inflight.len() < 64 {
                let p = payload(id, next, 30_000);
                let f = w.append(p.clone());
                inflight.push(async move { (f.await, p) });
                next += 1;
            }
            if !killed && started.elapsed() > kill_after {
                cluster.bookies[0].kill();
                killed = true;
            }
            match inflight.next().await {
                Some((Ok(e), p)) => {
                    acked.lock().expect("lock").insert(e, p);
                }
                Some((Err(_), _)) => {}
                None => break,
            }
        }
        let acked = std::mem::take(&mut *acked.lock().expect("lock"));
        assert!(acked.len() > 20, "round {round}: only {} adds acknowledged before the kill", acked.len());
        drop(w);
        cluster.bookies[0].start().await;
        let md = client.recover(id).await.unwrap_or_else(|e| panic!("recover: {e}\n{}", cluster.logs()));
        let max_acked = *acked.keys().last().expect("some acked");
        assert!(md.last_entry >= max_acked, "closed at {} but entry {max_acked} was acknowledged", md.last_entry);
        let reader = client.open_reader(id).await.expect("reader");
        let entries = reader.read(0, md.last_entry).await.unwrap_or_else(|e| panic!("read: {e}\n{}", cluster.logs()));
        for (e, p) in &acked {
            assert_eq!(&entries[*e as usize][..], &p[..], "round {round}: entry {e} differs after the crash");
        }
        // Entries between acknowledged ones that recovery kept are intact too (the writer's
        // payload is deterministic).
        for (i, got) in entries.iter().enumerate() {
            assert_eq!(&got[..], &payload(id, i as i64, 30_000)[..], "round {round}: recovered entry {i} is wrong");
        }
    }
    cluster.shutdown().await;
}

/// Two journal directories: ledgers are spread over both journals, each replayed from its own
/// checkpoint position after a SIGKILL. Half the entries are large enough to be written once
/// (to the entry log, the journals recording where), so both journals sync the shared entry
/// store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_journals_both_replay_after_sigkill() {
    let mut cluster = Cluster::new(1, &["storage.checkpoint_interval_ms=3600000"], false).await;
    let (j1, j2) = cluster.bookies[0].use_two_journals();
    cluster.bookies[0].start().await;
    let client = cluster.ledger_client();
    let mut writers = Vec::new();
    for _ in 0..4 {
        writers.push(client.create(LedgerConfig::new(1, 1, 1)).await.expect("create"));
    }
    let ids: Vec<u64> = writers.iter().map(|w| w.id()).collect();
    assert!(ids.iter().any(|i| i % 2 == 0) && ids.iter().any(|i| i % 2 == 1), "ledgers on both journals: {ids:?}");
    let mut adds = FuturesUnordered::new();
    for w in &writers {
        for e in 0..100 {
            adds.push(w.append(payload(w.id(), e, two_journals_size(e))));
        }
    }
    while let Some(r) = adds.next().await {
        r.expect("add");
    }
    cluster.bookies[0].kill();
    drop(writers);
    for j in [&j1, &j2] {
        let segs = magnetar_bookie::journal::segment::list_segments(j).expect("list");
        assert!(!segs.is_empty(), "{} has no segments", j.display());
    }
    cluster.bookies[0].start().await;
    for id in ids {
        let md = client.recover(id).await.expect("recover");
        assert_eq!(md.last_entry, 99, "ledger {id}");
        let entries = client.open_reader(id).await.expect("reader").read(0, 99).await.expect("read");
        for (e, got) in entries.iter().enumerate() {
            assert_eq!(&got[..], &payload(id, e as i64, two_journals_size(e as i64))[..], "ledger {id} entry {e}");
        }
    }
    cluster.shutdown().await;
}

fn two_journals_size(entry: i64) -> usize {
    if entry % 2 == 0 {
        3000
    } else {
        20_000
    }
}

/// Entry logs reused and compacted, then a SIGKILL in the middle of writes: a long-lived
/// ledger shares small entry logs with short ledgers that are written and deleted one after
/// another, so the logs they leave are reused and the long-lived ledger's entries are moved
/// by compaction again and again. Every entry of the long-lived ledger acknowledged before
/// the kill is read back after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_entry_logs_are_reused_and_compacted_loses_nothing() {
    let mut cluster = Cluster::new(
        1,
        &[
            "storage.checkpoint_interval_ms=300",
            "journal.segment_bytes=2621440",
            "storage.entry_log_bytes=4194304",
            "storage.compaction_interval_ms=100",
            "storage.compaction_threshold=0.9",
            "storage.compaction_bytes_per_second=0",
            "storage.entry_log_pool=1",
        ],
        true,
    )
    .await;
    let client = cluster.ledger_client();
    let keeper = client.create(LedgerConfig::new(1, 1, 1)).await.expect("create");
    let kid = keeper.id();
    let size = 20_000;
    let mut acked: BTreeMap<i64, Vec<u8>> = BTreeMap::new();
    let mut next = 0i64;
    // Short ledgers of ~1 MB, each deleted as soon as it is written, with keeper entries in
    // between, through 4 MiB logs: until logs have been reused (more log ids than files) and
    // compaction has moved keeper entries, and at least 20 rounds.
    let logs_dir = cluster.bookies[0].ledgers.join("store").join("logs");
    let reused = || {
        let names: Vec<String> = std::fs::read_dir(&logs_dir)
            .expect("logs dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        let highest = names.iter().filter_map(|n| u64::from_str_radix(n.split('.').next()?, 16).ok()).max();
        highest.is_some_and(|h| h > names.len() as u64 + 2)
    };
    let compacted =
        || std::fs::read_to_string(&cluster.bookies[0].log).unwrap_or_default().contains("compacted entry logs");
    let churn_started = std::time::Instant::now();
    let mut rounds = 0;
    while rounds < 20 || !(reused() && compacted()) {
        assert!(
            churn_started.elapsed() < Duration::from_secs(60),
            "after {rounds} rounds: reused {}, compacted {}\n{}",
            reused(),
            compacted(),
            cluster.bookies[0].log_tail()
        );
        rounds += 1;
        let w = client.create(LedgerConfig::new(1, 1, 1)).await.expect("create");
        let mut adds = FuturesUnordered::new();
        for e in 0..50 {
            adds.push(w.append(payload(w.id(), e, 40_000)));
        }
        while let Some(r) = adds.next().await {
            r.expect("add");
        }
        for _ in 0..3 {
            let p = payload(kid, next, size);
            let e = keeper.append(p.clone()).await.expect("keeper add");
            acked.insert(e, p);
            next += 1;
        }
        let id = w.id();
        w.close().await.expect("close");
        client.delete(id).await.expect("delete");
    }

    // Now a kill in the middle of keeper adds and short-ledger churn.
    let mut inflight = FuturesUnordered::new();
    let churn = client.create(LedgerConfig::new(1, 1, 1)).await.expect("create");
    let started = std::time::Instant::now();
    let mut killed = false;
    let mut churn_next = 0i64;
    loop {
        while !killed && inflight.len() < 32 {
            let p = payload(kid, next, size);
            let f = keeper.append(p.clone());
            inflight.push(Box::pin(async move { (f.await, Some(p)) })
                as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>);
            next += 1;
            let f = churn.append(payload(churn.id(), churn_next, 40_000));
            inflight.push(Box::pin(async move { (f.await, None) }));
            churn_next += 1;
        }
        if !killed && started.elapsed() > Duration::from_millis(800) {
            cluster.bookies[0].kill();
            killed = true;
        }
        match inflight.next().await {
            Some((Ok(e), Some(p))) => {
                acked.insert(e, p);
            }
            Some(_) => {}
            None => break,
        }
    }
    drop((keeper, churn));
    cluster.bookies[0].start().await;
    let md = client.recover(kid).await.unwrap_or_else(|e| panic!("recover: {e}\n{}", cluster.logs()));
    let max_acked = *acked.keys().last().expect("some acked");
    assert!(md.last_entry >= max_acked, "closed at {} but entry {max_acked} was acknowledged", md.last_entry);
    let entries = client
        .open_reader(kid)
        .await
        .expect("reader")
        .read(0, md.last_entry)
        .await
        .unwrap_or_else(|e| panic!("read: {e}\n{}", cluster.logs()));
    for (e, p) in &acked {
        assert_eq!(&entries[*e as usize][..], &p[..], "keeper entry {e} differs after the crash");
    }
    for (i, got) in entries.iter().enumerate() {
        assert_eq!(&got[..], &payload(kid, i as i64, size)[..], "recovered keeper entry {i} is wrong");
    }
    cluster.shutdown().await;
}
