//! SIGKILL of the leader under a write load: a new leader within seconds, no acknowledged write
//! lost, and the killed node catches up after a restart.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use magnetar_metastore::client::PutOptions;

use crate::support::{cluster, wait_until};

#[tokio::test]
async fn leader_sigkill_loses_no_acknowledged_write() {
    let mut t = cluster(3, &[]).await;
    let client = t.c.client();
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (client, acked, stop) = (client.clone(), acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let (k, v) = (format!("/failover/{w}/{i:06}"), format!("value-{w}-{i}"));
                if client.put(&k, v.clone(), PutOptions::default()).await.is_ok() {
                    acked.lock().expect("lock").push((k, v));
                }
                i += 1;
            }
        }));
    }
    assert!(wait_until(Duration::from_secs(10), || async { acked.lock().expect("lock").len() >= 200 }).await);

    let old = t.leader().await;
    let old_id = t.c.nodes[old].id;
    let killed_at = Instant::now();
    t.c.kill(old);
    let new = t.leader().await;
    let elected_after = killed_at.elapsed();
    assert_ne!(t.c.nodes[new].id, old_id);
    assert!(elected_after < Duration::from_secs(5), "new leader took {elected_after:?}");
    let before = acked.lock().expect("lock").len();
    assert!(
        wait_until(Duration::from_secs(10), || async { acked.lock().expect("lock").len() >= before + 200 }).await,
        "writes did not resume on the new leader\n{}",
        t.logs()
    );
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }

    let acked = acked.lock().expect("lock").clone();
    for (k, v) in &acked {
        let got = client.get(k).await.expect("read back");
        assert_eq!(got.map(|kv| kv.value), Some(v.clone().into_bytes()), "acknowledged write {k} lost");
    }

    // The killed node restarts from its data dir and catches up.
    t.c.restart(old).expect("restart");
    let last = acked.last().expect("some writes").clone();
    let node = client.clone();
    let addr = t.c.nodes[old].addr.clone();
    let probe = magnetar_metastore::client::MetaClient::connect(&[addr]).expect("client");
    let caught_up = wait_until(Duration::from_secs(20), || {
        let (probe, k) = (probe.clone(), last.0.clone());
        async move { probe.get_with(&k, true).await.ok().flatten().is_some() }
    })
    .await;
    assert!(caught_up, "restarted node did not catch up\n{}", t.logs());
    let on_restarted = probe.range("/failover/", "", 0, true).await.expect("stale range");
    assert!(!on_restarted.kvs.is_empty());
    drop(node);
}
