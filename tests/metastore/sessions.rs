//! Sessions: kept alive they live on, through a leader change too; abandoned they expire and
//! their ephemeral keys are deleted through the log, with watch events; closed by anyone they
//! are reported lost to their owner.

use std::time::Duration;

use magnetar_metastore::client::{EventKind, PutOptions};

use crate::support::{cluster, wait_until};

#[tokio::test]
async fn expiry_deletes_ephemeral_keys_and_emits_watch_events() {
    let t = cluster(3, &[]).await;
    let c = t.c.client();
    let session = c.session(Duration::from_millis(1500)).await.expect("session");
    let id = session.id();
    c.put("/brokers/b1", "alive", PutOptions { expected_version: None, session: id }).await.expect("ephemeral put");
    c.put("/brokers/persistent", "stays", PutOptions::default()).await.expect("put");
    let mut watcher = c.watch("/brokers/", 0);
    watcher.start().await.expect("watch");

    // Kept alive for three TTLs: still there.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert!(!session.is_lost());
    let kv = c.get("/brokers/b1").await.expect("get").expect("ephemeral key alive while kept alive");
    assert_eq!(kv.session, id);

    // Abandoned: expires, the key goes, and watchers hear of it.
    drop(session);
    let event = tokio::time::timeout(Duration::from_secs(10), watcher.next())
        .await
        .expect("expiry event in time")
        .expect("watch");
    assert_eq!(event.events.len(), 1, "{event:?}");
    let e = &event.events[0];
    assert_eq!((e.kind, e.key.as_str(), e.session), (EventKind::Delete, "/brokers/b1", id));
    assert!(c.get("/brokers/b1").await.expect("get").is_none());
    assert!(c.get("/brokers/persistent").await.expect("get").is_some());
    let err = c.put("/brokers/b2", "late", PutOptions { expected_version: None, session: id }).await;
    assert!(err.is_err(), "an expired session cannot own keys");
}

#[tokio::test]
async fn a_session_survives_a_leader_change_and_reports_loss_when_closed() {
    let mut t = cluster(3, &[]).await;
    let c = t.c.client();
    // A TTL comfortably above the failover time (election timeout up to 1 s plus reconnects).
    let session = c.session(Duration::from_millis(4000)).await.expect("session");
    c.put("/owner", "me", PutOptions { expected_version: None, session: session.id() }).await.expect("put");
    let leader = t.leader().await;
    t.c.kill(leader);
    t.leader().await;
    // More than a TTL after the failover the new leader has not expired the session.
    tokio::time::sleep(Duration::from_millis(5000)).await;
    assert!(!session.is_lost(), "session lost across a leader change\n{}", t.logs());
    assert!(c.get("/owner").await.expect("get").is_some(), "ephemeral key lost across a leader change");

    // Another client closes it: the owner is told, and the key is gone.
    let other = t.c.client();
    other.close_session(session.id()).await.expect("close");
    assert!(tokio::time::timeout(Duration::from_secs(10), session.lost()).await.is_ok(), "owner not told of loss");
    assert!(wait_until(Duration::from_secs(5), || async { c.get("/owner").await.ok().flatten().is_none() }).await);
}

/// A leader cut off from the other nodes stays leader (in openraft) until it hears a higher
/// term. Here both followers are frozen (SIGSTOP), so the client still reaches the leader, but
/// the leader has no quorum: it must not keep extending the session, which a new leader
/// elected on the other side would expire (deleting its ephemeral keys while their owner
/// believes it still holds them). The client must report the session lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_without_a_quorum_extends_no_session() {
    let t = cluster(3, &[]).await;
    let c = t.c.client();
    let session = c.session(Duration::from_millis(2000)).await.expect("session");
    let leader = t.leader().await;
    let followers: Vec<u32> = (0..3).filter(|i| *i != leader).filter_map(|i| t.c.pid(i)).collect();
    assert_eq!(followers.len(), 2);
    let signal = |sig: &str| {
        for pid in &followers {
            let ok = std::process::Command::new("kill").arg(sig).arg(pid.to_string()).status();
            assert!(ok.is_ok_and(|s| s.success()), "kill {sig} {pid}");
        }
    };
    signal("-STOP");
    let lost = tokio::time::timeout(Duration::from_secs(15), session.lost()).await;
    signal("-CONT");
    assert!(lost.is_ok(), "a leader without a quorum kept the session alive\n{}", t.logs());
}
