//! Concurrent compare-and-set increments, through a leader kill: the counter ends at exactly
//! the number of increments clients saw succeed (retries after lost answers apply once).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use magnetar_metastore::client::{ClientError, PutOptions};

use crate::support::{cluster, wait_until};

#[tokio::test]
async fn concurrent_cas_increments_count_exactly() {
    let mut t = cluster(3, &[]).await;
    let setup = t.c.client();
    setup.put("/counter", "0", PutOptions { expected_version: Some(0), session: 0 }).await.expect("init");
    let successes = Arc::new(AtomicU64::new(0));
    let attempts = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..6 {
        // Separate clients: separate connections and request-id spaces.
        let client = t.c.client();
        let (successes, attempts) = (successes.clone(), attempts.clone());
        workers.push(tokio::spawn(async move {
            for _ in 0..40 {
                let kv = client.get("/counter").await.expect("read").expect("counter exists");
                let n: u64 = String::from_utf8_lossy(&kv.value).parse().expect("number");
                attempts.fetch_add(1, Ordering::Relaxed);
                let res = client
                    .put("/counter", (n + 1).to_string(), PutOptions { expected_version: Some(kv.version), session: 0 })
                    .await;
                match res {
                    Ok(_) => {
                        successes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(ClientError::BadVersion { .. }) => {}
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
        }));
    }
    assert!(wait_until(Duration::from_secs(20), || async { attempts.load(Ordering::Relaxed) >= 60 }).await);
    let leader = t.leader().await;
    t.c.kill(leader);
    for w in workers {
        w.await.expect("worker");
    }
    let kv = setup.get("/counter").await.expect("read").expect("exists");
    let value: u64 = String::from_utf8_lossy(&kv.value).parse().expect("number");
    let ok = successes.load(Ordering::Relaxed);
    assert!(ok > 0);
    assert_eq!(value, ok, "counter {value} != acknowledged increments {ok}");
}
