//! Watches: history replay from a revision, and a watcher whose node is killed resumes on
//! another node without missing or repeating an event.

use std::time::Duration;

use magnetar_metastore::client::{EventKind, PutOptions};

use crate::support::cluster;

#[tokio::test]
async fn watch_replays_history_from_a_revision() {
    let t = cluster(1, &[]).await;
    let c = t.c.client();
    let first = c.put("/h/a", "1", PutOptions::default()).await.expect("put");
    c.put("/other", "x", PutOptions::default()).await.expect("put");
    c.put("/h/b", "2", PutOptions::default()).await.expect("put");
    c.delete("/h/a", None).await.expect("delete");
    let mut w = c.watch("/h/", first);
    let mut got = Vec::new();
    while got.len() < 3 {
        let b = tokio::time::timeout(Duration::from_secs(5), w.next()).await.expect("in time").expect("watch");
        got.extend(b.events.into_iter().map(|e| (e.kind, e.key)));
    }
    assert_eq!(
        got,
        vec![
            (EventKind::Put, "/h/a".to_string()),
            (EventKind::Put, "/h/b".to_string()),
            (EventKind::Delete, "/h/a".to_string())
        ]
    );
}

#[tokio::test]
async fn a_watcher_moved_to_another_node_misses_nothing() {
    let mut t = cluster(3, &[]).await;
    let c = t.c.client();
    let mut w = c.watch("/moved/", 0);
    w.start().await.expect("watch");
    let watched = w.endpoint().expect("connected").to_string();
    let writer = {
        let c = c.clone();
        tokio::spawn(async move {
            for i in 0..300 {
                c.put(&format!("/moved/{i:04}"), i.to_string(), PutOptions::default()).await.expect("put");
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    let mut seen: Vec<(u64, String)> = Vec::new();
    let mut killed = false;
    while seen.len() < 300 {
        let b = tokio::time::timeout(Duration::from_secs(20), w.next()).await.expect("event in time").expect("watch");
        for e in b.events {
            assert_eq!(e.kind, EventKind::Put);
            seen.push((b.revision, e.key));
        }
        if !killed && seen.len() >= 100 {
            let i = t.c.nodes.iter().position(|n| n.addr == watched).expect("known node");
            t.c.kill(i);
            killed = true;
        }
    }
    writer.await.expect("writer");
    assert!(killed);
    assert_ne!(w.endpoint(), Some(watched.as_str()), "the watch should have moved");
    let keys: Vec<String> = seen.iter().map(|(_, k)| k.clone()).collect();
    let expected: Vec<String> = (0..300).map(|i| format!("/moved/{i:04}")).collect();
    assert_eq!(keys, expected, "events missed, repeated or reordered");
    assert!(seen.windows(2).all(|p| p[0].0 < p[1].0), "revisions must increase");
}

#[tokio::test]
async fn a_watch_from_pruned_history_fails_with_compacted() {
    let t = cluster(1, &["--set", "watch_history_revisions=1024"]).await;
    let c = t.c.client();
    // One at a time, so each write is its own log entry (concurrent ones would be batched).
    for i in 0..2200 {
        c.put(&format!("/c/{i}"), "x", PutOptions::default()).await.expect("put");
    }
    let mut w = c.watch("/c/", 1);
    let err =
        tokio::time::timeout(Duration::from_secs(10), w.next()).await.expect("answer in time").expect_err("compacted");
    assert!(matches!(err, magnetar_metastore::client::ClientError::Compacted { .. }), "{err}");
}
