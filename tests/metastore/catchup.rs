//! A node that was down while the log was purged behind a snapshot catches up from the
//! snapshot, with the full state.

use std::time::Duration;

use magnetar_metastore::client::{MetaClient, PutOptions};

use crate::support::{cluster, wait_until};

#[tokio::test]
async fn restarted_node_catches_up_from_a_snapshot_after_log_purge() {
    let mut t =
        cluster(3, &["--set", "raft.snapshot_every_entries=100", "--set", "raft.keep_entries_after_snapshot=10"]).await;
    let leader = t.leader().await;
    let lagger = (leader + 1) % 3;
    t.c.kill(lagger);
    let client = t.c.client();
    for i in 0..600 {
        client.put(&format!("/snap/{i:04}"), format!("v{i}"), PutOptions::default()).await.expect("put");
    }
    let leader_addr = t.c.nodes[leader].addr.clone();
    let purged = wait_until(Duration::from_secs(10), || {
        let (c, a) = (client.clone(), leader_addr.clone());
        async move { c.cluster_status(Some(&a)).await.map(|s| s.purged_index > 300).unwrap_or(false) }
    })
    .await;
    assert!(purged, "the leader never purged its log\n{}", t.logs());

    t.c.restart(lagger).expect("restart");
    let probe = MetaClient::connect(&[t.c.nodes[lagger].addr.clone()]).expect("client");
    let caught_up = wait_until(Duration::from_secs(30), || {
        let p = probe.clone();
        async move { p.get_with("/snap/0599", true).await.ok().flatten().is_some() }
    })
    .await;
    assert!(caught_up, "lagging node did not catch up\n{}", t.logs());
    let status = probe.cluster_status(Some(&t.c.nodes[lagger].addr)).await.expect("status");
    assert!(status.snapshot_index > 0, "the node should hold a snapshot: {status:?}");
    let mut keys = Vec::new();
    let mut after = String::new();
    loop {
        let page = probe.range("/snap/", &after, 0, true).await.expect("stale range");
        keys.extend(page.kvs.iter().map(|k| (k.key.clone(), k.value.clone())));
        after = keys.last().map(|k| k.0.clone()).unwrap_or_default();
        if !page.more {
            break;
        }
    }
    assert_eq!(keys.len(), 600);
    assert!(keys
        .iter()
        .enumerate()
        .all(|(i, (k, v))| *k == format!("/snap/{i:04}") && *v == format!("v{i}").into_bytes()));
}
