//! Ledger recovery under faults (LEDGER_PROTOCOL.md, "Recovery"): a recovery that cannot tell
//! whether an entry exists closes nothing, recoveries racing each other agree on the end, an
//! old writer's ensemble change that meets a recovery stops it, and a frozen bookie (alive,
//! connected, answering nothing) is timed out rather than waited for.

use std::time::Duration;

use magnetar_bookie::client::{LedgerClient, LedgerConfig, LedgerError, LedgerMetadata, LedgerOptions, LedgerState};
use magnetar_metastore::client::PutOptions;

use crate::ledger::{ledger_with, ledger_with_entry_10_on_two};
use crate::support::{check_payloads, payload, wait_until, Cluster};

/// E=Qw=3, Qa=2, entry 10 acknowledged on X and Y only. The first recovery gets no answer from
/// Y and a corrupt copy of entry 10 from X (one byte flipped on its way): that leaves one "no
/// such entry" (Z's) where two end the ledger, and no intact copy. It must give up undecided,
/// leave the ledger unclosed, and never take the corrupt bytes for the entry ("never treat
/// can't tell as not there", step 5). A second recovery that hears everyone closes it at 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_that_cannot_tell_closes_nothing() {
    let cluster = Cluster::new(3, &[], true).await;
    let old = cluster.ledger_client_with_add_timeout(Duration::from_secs(120));
    let (id, ens) = ledger_with_entry_10_on_two(&old).await;
    let (x, y) = (ens[0].clone(), ens[1].clone());

    let first = LedgerClient::new(cluster.meta(), LedgerOptions { recovery_attempts: 1, ..Default::default() });
    first.faults().corrupt_reads(&x);
    first.faults().drop_reads(&y);
    match first.recover(id).await {
        Err(LedgerError::RecoveryUndecided { reason, .. }) => {
            assert!(reason.contains("entry 10") && reason.contains("checksum"), "{reason}")
        }
        other => panic!("recovery without an answer for entry 10 must stay undecided: {other:?}"),
    }
    let (md, _) = cluster.ledger_client().metadata(id).await.expect("metadata");
    assert_eq!(md.state, LedgerState::InRecovery, "an undecided recovery closes nothing");

    let second = cluster.ledger_client();
    let md = second.recover(id).await.unwrap_or_else(|e| panic!("recover: {e}\n{}", cluster.logs()));
    assert_eq!(md.last_entry, 10, "entry 10 was acknowledged to the old writer");
    check_payloads(&second, id, 10, 100).await;
    cluster.shutdown().await;
}

/// Recoveries racing each other. First, deterministically: recovery A is writing entry 10 back
/// (its adds held) when recovery B takes the ledger over (B's step 1 ends A's attempt) and
/// closes it. A's own close then finds the metadata changed: it must not fail the caller, but
/// try again and return the ledger B closed. Then three recoveries of a second ledger start
/// at once. Every one returns the ledger closed at 10, the entry the old writers had
/// acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_recoveries_agree_on_the_end() {
    let cluster = Cluster::new(3, &[], true).await;
    let old = cluster.ledger_client_with_add_timeout(Duration::from_secs(120));
    let (id, ens) = ledger_with_entry_10_on_two(&old).await;

    let a = cluster.ledger_client_with_add_timeout(Duration::from_secs(120));
    for b in &ens {
        a.faults().hold_adds(b, 10);
    }
    let recovering = tokio::spawn({
        let a = a.clone();
        async move { a.recover(id).await }
    });
    let writing = wait_until(Duration::from_secs(20), || async { a.faults().held_adds() >= 2 }).await;
    assert!(writing && !recovering.is_finished(), "recovery A should be writing entry 10 back");

    let b = cluster.ledger_client();
    let by_b = b.recover(id).await.unwrap_or_else(|e| panic!("recovery B: {e}\n{}", cluster.logs()));
    assert_eq!(by_b.last_entry, 10);
    a.faults().release_adds();
    let by_a = tokio::time::timeout(Duration::from_secs(30), recovering)
        .await
        .expect("recovery A must finish")
        .expect("join")
        .unwrap_or_else(|e| panic!("recovery A, overtaken by B, must return the closed ledger: {e}"));
    assert_eq!((by_a.state, by_a.last_entry), (LedgerState::Closed, 10));
    assert_eq!(by_a.fragments, by_b.fragments);
    check_payloads(&b, id, 10, 100).await;

    old.faults().release_adds();
    let (id, _) = ledger_with_entry_10_on_two(&old).await;
    let clients: Vec<LedgerClient> = (0..3).map(|_| cluster.ledger_client()).collect();
    let results = futures::future::join_all(clients.iter().map(|c| c.recover(id))).await;
    for r in results {
        let md = r.unwrap_or_else(|e| panic!("a racing recovery failed: {e}\n{}", cluster.logs()));
        assert_eq!((md.state, md.last_entry), (LedgerState::Closed, 10));
    }
    let (stored, _) = clients[0].metadata(id).await.expect("metadata");
    assert_eq!((stored.state, stored.last_entry), (LedgerState::Closed, 10));
    check_payloads(&clients[0], id, 10, 100).await;
    cluster.shutdown().await;
}

/// An old writer whose ensemble change meets a recovery's step 1 (state IN_RECOVERY, version
/// bumped; here written straight to the metastore, so no bookie is fenced yet) must stop:
/// its CAS fails, it re-reads, finds the ledger no longer OPEN and fails the add with Fenced,
/// and the metadata keeps the recovery's state and fragments (ensemble change, step 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ensemble_change_that_meets_a_recovery_stops_the_writer() {
    let cluster = Cluster::new(4, &[], true).await;
    let old = cluster.ledger_client_with_add_timeout(Duration::from_millis(500));
    let (w, id, _) = ledger_with(&old, LedgerConfig::new(3, 2, 2), 10, 100).await;
    let meta = cluster.meta();
    let key = magnetar_bookie::client::metadata::ledger_key(id);
    let kv = meta.get(&key).await.expect("get").expect("ledger metadata");
    let mut md: LedgerMetadata = serde_json::from_slice(&kv.value).expect("json");
    md.state = LedgerState::InRecovery;
    let body = serde_json::to_vec(&md).expect("json");
    meta.put(&key, body, PutOptions { expected_version: Some(kv.version), session: 0 }).await.expect("step 1");

    // Entry 10's write set is positions 1 and 2; position 1 never answers, so the add times
    // out and the writer tries to replace that bookie with the spare.
    let ens = md.fragments[0].bookies.clone();
    assert_eq!(md.write_set(10), vec![ens[1].clone(), ens[2].clone()]);
    old.faults().hold_adds(&ens[1], 10);
    match w.append(payload(id, 10, 100)).await {
        Err(LedgerError::Fenced(l)) => assert_eq!(l, id),
        other => panic!("an ensemble change during recovery must fail the add with Fenced: {other:?}"),
    }
    assert!(matches!(w.append(payload(id, 11, 100)).await, Err(LedgerError::Fenced(_))));
    let (now, _) = old.metadata(id).await.expect("metadata");
    assert_eq!(now.state, LedgerState::InRecovery);
    assert_eq!(now.fragments, md.fragments, "the old writer saved no ensemble change");

    // Entry 10 reached one bookie: recovery may keep it or not, but keeps 0-9.
    let new = cluster.ledger_client();
    let md = new.recover(id).await.unwrap_or_else(|e| panic!("recover: {e}\n{}", cluster.logs()));
    assert!(md.last_entry >= 9, "acknowledged entries lost: closed at {}", md.last_entry);
    check_payloads(&new, id, md.last_entry, 100).await;
    cluster.shutdown().await;
}

/// A bookie that is frozen (SIGSTOP: its connections stay open, nothing is answered) when
/// recovery starts. E=3, Qw=2, Qa=2: the fence and the reads are decided by the others
/// without waiting on it, and writing the last entry back, whose write set includes it, times
/// out and replaces it with the spare (saved with the close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_times_out_a_frozen_bookie_and_replaces_it() {
    let cluster = Cluster::new(4, &[], true).await;
    let old = cluster.ledger_client();
    let (w, id, ensemble) = ledger_with(&old, LedgerConfig::new(3, 2, 2), 100, 1000).await;
    assert_eq!(w.metadata().write_set(99), vec![ensemble[0].clone(), ensemble[1].clone()]);
    drop(w);
    let frozen = cluster.index_of(&ensemble[0]);
    cluster.bookies[frozen].freeze(true);

    let new = cluster.ledger_client();
    let recovered = tokio::time::timeout(Duration::from_secs(60), new.recover(id)).await;
    cluster.bookies[frozen].freeze(false);
    let md = recovered
        .expect("recovery must not wait on a frozen bookie")
        .unwrap_or_else(|e| panic!("recover: {e}\n{}", cluster.logs()));
    assert_eq!(md.last_entry, 99);
    assert!(md.fragments.len() >= 2, "expected an ensemble change while writing back: {:?}", md.fragments);
    assert!(!md.last_fragment().bookies.contains(&ensemble[0]));
    check_payloads(&new, id, 99, 1000).await;
    cluster.shutdown().await;
}
