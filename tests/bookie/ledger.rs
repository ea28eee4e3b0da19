//! Replicated ledgers on real bookie processes: ensemble change when a bookie dies, fencing of
//! an old writer by recovery, and the recovery case where an add reached fewer than Qa bookies.
//! Invariants checked: no acknowledged entry beyond a closed ledger's last entry; every
//! acknowledged entry readable with identical bytes; a fenced writer gets nothing more acked.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use magnetar_bookie::client::{LedgerClient, LedgerConfig, LedgerError, LedgerWriter};

use crate::support::{payload, Cluster};

async fn ensemble_change(qw: usize) {
    // Three bookies for the ensemble and one spare to replace the one that dies.
    let mut cluster = Cluster::new(4, &[], true).await;
    let client = cluster.ledger_client();
    let w = client.create(LedgerConfig::new(3, qw, 2)).await.expect("create");
    let id = w.id();
    let victim = w.metadata().fragments[0].bookies[1].clone();
    let mut acked: BTreeMap<i64, Vec<u8>> = BTreeMap::new();
    let mut inflight = FuturesUnordered::new();
    let mut next = 0i64;
    let mut killed = false;
    // The order the writer confirms entries in (its callbacks run in that order).
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    while acked.len() < 3000 {
        while inflight.len() < 50 {
            let p = payload(id, next, 4000);
            let (tx, rx) = tokio::sync::oneshot::channel();
            let confirmed = order.clone();
            w.append_with(p.clone(), move |r| {
                if let Ok(e) = &r {
                    confirmed.lock().unwrap_or_else(|e| e.into_inner()).push(*e);
                }
                let _ = tx.send(r);
            });
            inflight.push(async move { (rx.await.expect("the callback runs"), p) });
            next += 1;
        }
        let (r, p) = inflight.next().await.expect("in flight");
        let e = r.unwrap_or_else(|e| panic!("an add failed: {e}\n{}", cluster.logs()));
        acked.insert(e, p);
        if !killed && acked.len() == 1000 {
            let i = cluster.index_of(&victim);
            cluster.bookies[i].kill();
            killed = true;
        }
    }
    while let Some((r, p)) = inflight.next().await {
        acked.insert(r.expect("add"), p);
    }
    let md = w.metadata();
    assert!(md.fragments.len() >= 2, "expected an ensemble change, fragments: {:?}", md.fragments);
    assert!(
        !md.last_fragment().bookies.contains(&victim),
        "the dead bookie is still in the ensemble: {:?}",
        md.fragments
    );
    // Entries are dense and acknowledged in order.
    let dense: Vec<i64> = (0..acked.len() as i64).collect();
    assert_eq!(acked.keys().copied().collect::<Vec<_>>(), dense);
    assert!(*order.lock().unwrap_or_else(|e| e.into_inner()) == dense, "entries confirmed out of order");
    let closed = w.close().await.expect("close");
    assert_eq!(closed.last_entry, acked.len() as i64 - 1);
    // Everything reads back with the dead bookie still down.
    let reader = client.open_reader(id).await.expect("reader");
    let entries = reader.read(0, closed.last_entry).await.unwrap_or_else(|e| panic!("read: {e}\n{}", cluster.logs()));
    for (e, p) in &acked {
        assert_eq!(&entries[*e as usize][..], &p[..], "entry {e}");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookie_death_changes_the_ensemble_qw2() {
    ensemble_change(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookie_death_changes_the_ensemble_qw3() {
    ensemble_change(3).await;
}

/// Thousands of appends issued at once: the writer takes its queue in bounded turns and the
/// bookies answer in batches; every add is confirmed, in order, and reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_appends_is_all_confirmed_in_order() {
    let cluster = Cluster::new(3, &[], true).await;
    let client = cluster.ledger_client();
    let w = client.create(LedgerConfig::new(3, 2, 2)).await.expect("create");
    let id = w.id();
    let n = 5000i64;
    let payloads: Vec<Vec<u8>> = (0..n).map(|e| payload(id, e, 100)).collect();
    let futures: Vec<_> = payloads.iter().map(|p| w.append(p.clone())).collect();
    for (e, f) in futures.into_iter().enumerate() {
        let got = f.await.unwrap_or_else(|err| panic!("add {e} failed: {err}\n{}", cluster.logs()));
        assert_eq!(got, e as i64);
    }
    let closed = w.close().await.expect("close");
    assert_eq!(closed.last_entry, n - 1);
    let entries = client.open_reader(id).await.expect("reader").read(0, n - 1).await.expect("read");
    assert_eq!(entries.len(), n as usize);
    for (e, p) in payloads.iter().enumerate() {
        assert_eq!(&entries[e][..], &p[..], "entry {e}");
    }
    cluster.shutdown().await;
}

/// Adds given callbacks (`append_with`) are confirmed in order like futures, each callback
/// running once with its id; once the ledger is fenced by a recovery, a callback hears the
/// refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_callbacks_hear_every_outcome_in_order() {
    let cluster = Cluster::new(3, &[], true).await;
    let client = cluster.ledger_client();
    let w = client.create(LedgerConfig::new(3, 2, 2)).await.expect("create");
    let id = w.id();
    let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let n = 1000i64;
    for e in 0..n {
        let heard = heard.clone();
        w.append_with(payload(id, e, 100), move |r| heard.lock().expect("lock").push(r.map_err(|e| e.to_string())));
    }
    // Confirmed after every entry before it, so every callback has run by then.
    assert_eq!(w.append(payload(id, n, 100)).await.expect("last add"), n);
    let got = std::mem::take(&mut *heard.lock().expect("lock"));
    assert_eq!(got, (0..n).map(Ok).collect::<Vec<_>>());
    let other = cluster.ledger_client();
    assert_eq!(other.recover(id).await.expect("recover").last_entry, n);
    let (tx, rx) = tokio::sync::oneshot::channel();
    w.append_with(b"after the fence".to_vec(), move |r| {
        let _ = tx.send(r);
    });
    match rx.await.expect("the callback runs") {
        Err(LedgerError::Fenced(l)) => assert_eq!(l, id),
        other => panic!("the fenced writer's add must fail with Fenced, got {other:?}"),
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_fences_the_old_writer() {
    let cluster = Cluster::new(3, &[], true).await;
    let old = cluster.ledger_client();
    let w = old.create(LedgerConfig::new(3, 2, 2)).await.expect("create");
    let id = w.id();
    let mut acked = Vec::new();
    for e in 0..200 {
        acked.push(w.append(payload(id, e, 1000)).await.expect("add"));
    }
    // A reader of the open ledger sees at most the LAC the bookies know: entry 199 is
    // acknowledged, but only a later add would carry that to the bookies (each add carries the
    // LAC of its sending, 198 for entry 199).
    let reader = old.open_reader(id).await.expect("reader");
    let lac = reader.lac();
    assert!((197..=198).contains(&lac), "LAC {lac}");
    assert!(matches!(reader.read(0, 199).await, Err(LedgerError::BeyondLac { .. })));
    assert_eq!(reader.read(0, lac).await.expect("read up to the LAC").len() as i64, lac + 1);

    let new = cluster.ledger_client();
    let md = new.recover(id).await.expect("recover");
    assert_eq!(md.last_entry, 199, "every acknowledged entry is kept, nothing more");
    match w.append(b"after recovery".to_vec()).await {
        Err(LedgerError::Fenced(l)) => assert_eq!(l, id),
        other => panic!("the fenced writer's add must fail with Fenced, got {other:?}"),
    }
    assert!(matches!(w.close().await, Err(LedgerError::Fenced(_))));
    let entries = new.open_reader(id).await.expect("reader").read(0, 199).await.expect("read");
    for (e, got) in entries.iter().enumerate() {
        assert_eq!(&got[..], &payload(id, e as i64, 1000)[..]);
    }
    // Recovering again is a no-op on a closed ledger.
    assert_eq!(new.recover(id).await.expect("again").last_entry, 199);
    cluster.shutdown().await;
}

/// An add that reached only Qa - 1 bookies when recovery starts. E = Qw = 3, Qa = 2: entry 10
/// reaches bookie A only (its copies to B and C are held back). Recovery does not get an
/// answer to its fence from B, and its reads to A go unanswered, so B and C say "no such
/// entry" for 10 and the ledger closes at 9. Then B's held copy is released (C's stays held,
/// so no other bookie's answer can stop the old writer first): B must refuse it (the
/// recovery read fenced B), or entry 10 would be acknowledged to the old writer beyond the
/// closed end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_on_fewer_than_qa_bookies_is_never_acked_beyond_the_end() {
    let cluster = Cluster::new(3, &[], true).await;
    // No add timeout during the test: only the bookies' answers may end the old writer.
    let old = cluster.ledger_client_with_add_timeout(Duration::from_secs(120));
    let (w, id, ens) = ledger_with_ten_entries(&old).await;
    let (a, b, c) = (ens[0].clone(), ens[1].clone(), ens[2].clone());
    old.faults().hold_adds(&b, 10);
    old.faults().hold_adds(&c, 10);
    let pending = tokio::spawn(w.append(payload(id, 10, 100)));
    assert!(
        crate::support::wait_until(Duration::from_secs(5), || async { old.faults().held_adds() == 2 }).await,
        "entry 10 should be held for two bookies"
    );

    let new = cluster.ledger_client();
    new.faults().skip_fence(&b);
    new.faults().drop_reads(&a);
    let md = new.recover(id).await.expect("recover");
    assert_eq!(md.last_entry, 9, "entry 10 was on one bookie only and is not recoverable here");

    assert_eq!(old.faults().release_adds_to(&b), 1);
    let r = tokio::time::timeout(Duration::from_secs(10), pending).await.expect("the add must finish").expect("join");
    match r {
        Err(LedgerError::Fenced(_)) => {}
        other => panic!("entry 10 must not be acknowledged beyond the closed end (9): {other:?}"),
    }
    assert_eq!(old.faults().held_adds(), 1, "C's copy is still held");
    let _ = c;
    cluster.shutdown().await;
}

/// Recovery while a bookie of the last fragment is dead: the fence still reaches quorum
/// coverage without it, and writing the recovered tail back replaces it (an ensemble change
/// made by the recovering writer, saved with the close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_with_a_dead_bookie_replaces_it_while_writing_back() {
    let mut cluster = Cluster::new(4, &[], true).await;
    let old = cluster.ledger_client();
    let (w, id, ensemble) = ledger_with(&old, LedgerConfig::new(3, 2, 2), 100, 1000).await;
    // Entry 99's write set is the first two bookies of the ensemble; kill the first.
    assert_eq!(w.metadata().write_set(99), vec![ensemble[0].clone(), ensemble[1].clone()]);
    let victim = ensemble[0].clone();
    let i = cluster.index_of(&victim);
    cluster.bookies[i].kill();
    drop(w);

    let new = cluster.ledger_client();
    let md = new.recover(id).await.unwrap_or_else(|e| panic!("recover: {e}\n{}", cluster.logs()));
    assert_eq!(md.last_entry, 99);
    // The bookies knew LAC 98 (piggybacked on entry 99's add), so entry 99 was recovered and
    // written back, which needed a replacement for the dead bookie.
    assert!(md.fragments.len() >= 2, "expected an ensemble change during recovery: {:?}", md.fragments);
    assert!(!md.last_fragment().bookies.contains(&victim));
    let entries = new.open_reader(id).await.expect("reader").read(0, 99).await.expect("read");
    for (e, got) in entries.iter().enumerate() {
        assert_eq!(&got[..], &payload(id, e as i64, 1000)[..], "entry {e}");
    }
    cluster.shutdown().await;
}

/// A ledger with `cfg` and entries `0..n` (payloads of up to `max` bytes) acknowledged one at
/// a time: its writer, id and first ensemble.
pub(crate) async fn ledger_with(
    client: &LedgerClient,
    cfg: LedgerConfig,
    n: i64,
    max: usize,
) -> (LedgerWriter, u64, Vec<String>) {
    let w = client.create(cfg).await.expect("create");
    let id = w.id();
    for e in 0..n {
        w.append(payload(id, e, max)).await.expect("add");
    }
    let ens = w.metadata().fragments[0].bookies.clone();
    (w, id, ens)
}

/// A ledger with E=Qw=3, Qa=2 and entries 0-9 acknowledged: its writer, id and ensemble.
pub(crate) async fn ledger_with_ten_entries(client: &LedgerClient) -> (LedgerWriter, u64, Vec<String>) {
    ledger_with(client, LedgerConfig::new(3, 3, 2), 10, 100).await
}

/// [`ledger_with_ten_entries`], then entry 10 acknowledged on the ensemble's first two bookies
/// only (its copy to the third is held): the bookies' LAC stays 9. The writer is dropped.
pub(crate) async fn ledger_with_entry_10_on_two(client: &LedgerClient) -> (u64, Vec<String>) {
    let (w, id, ens) = ledger_with_ten_entries(client).await;
    client.faults().hold_adds(&ens[2], 10);
    w.append(payload(id, 10, 100)).await.expect("entry 10 acknowledged");
    (id, ens)
}

/// A recovery that changes the ensemble while writing the tail back, then dies before closing,
/// leaves the metadata as it found it (LEDGER_PROTOCOL.md, recovery step 7). Saved at once, its
/// new fragment would name the replacements, which hold none of the tail: the next recovery
/// would fence and read only them and could close the ledger before an entry the old writer
/// had acknowledged. E=Qw=3, Qa=2 on five bookies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_that_dies_after_an_ensemble_change_leaves_the_metadata_alone() {
    let cluster = Cluster::new(5, &[], true).await;
    let old = cluster.ledger_client_with_add_timeout(Duration::from_secs(120));
    let (id, ens) = ledger_with_entry_10_on_two(&old).await;
    let (x, y, z) = (ens[0].clone(), ens[1].clone(), ens[2].clone());

    // The first recovery finds entry 10 and cannot write it back to X and Y: it replaces them
    // with the two spares, whose copies are held too, and dies there.
    let first = cluster.ledger_client_with_add_timeout(Duration::from_millis(500));
    let spares: Vec<String> = cluster.bookies.iter().map(|b| b.id.clone()).filter(|b| !ens.contains(b)).collect();
    assert_eq!(spares.len(), 2);
    for b in [&x, &y].into_iter().chain(&spares) {
        first.faults().hold_adds(b, 10);
    }
    let recovering = tokio::spawn({
        let first = first.clone();
        async move { first.recover(id).await }
    });
    let replaced = crate::support::wait_until(Duration::from_secs(20), || async {
        first.faults().held_adds() >= 4 || recovering.is_finished()
    })
    .await;
    assert!(replaced && !recovering.is_finished(), "the first recovery should be writing entry 10 to the spares");
    recovering.abort();
    drop(first);
    let (md, _) = cluster.ledger_client().metadata(id).await.expect("metadata");
    assert_eq!(md.fragments.len(), 1, "a recovery that did not close saved an ensemble change: {:?}", md.fragments);
    assert_eq!(md.last_fragment().bookies, ens);

    // The second recovery gets no answer to its reads from Z (slow): entry 10 is decided by
    // X and Y, which hold it.
    let second = cluster.ledger_client();
    second.faults().drop_reads(&z);
    let md = second.recover(id).await.unwrap_or_else(|e| panic!("recover: {e}\n{}", cluster.logs()));
    assert_eq!(md.last_entry, 10, "entry 10 was acknowledged to the old writer");
    crate::support::check_payloads(&second, id, 10, 100).await;
    cluster.shutdown().await;
}

/// A bookie that stops answering without dropping its connection: its adds time out, it is
/// replaced by the spare, and the entries it held up are confirmed through the replacement,
/// in order. E = Qw = Qa = 3, so no entry can be confirmed without every position answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_bookie_is_replaced_after_the_add_timeout() {
    let cluster = Cluster::new(4, &[], true).await;
    let client = cluster.ledger_client_with_add_timeout(Duration::from_millis(500));
    let w = client.create(LedgerConfig::new(3, 3, 3)).await.expect("create");
    let id = w.id();
    let silent = w.metadata().fragments[0].bookies[2].clone();
    for e in 0..5 {
        assert_eq!(w.append(payload(id, e, 100)).await.expect("add"), e);
    }
    client.faults().hold_adds(&silent, 5);
    let adds: Vec<_> = (5..10).map(|e| w.append(payload(id, e, 100))).collect();
    for (e, f) in (5..10).zip(adds) {
        let got = tokio::time::timeout(Duration::from_secs(20), f)
            .await
            .unwrap_or_else(|_| panic!("entry {e} was not confirmed after the timeout\n{}", cluster.logs()))
            .expect("add");
        assert_eq!(got, e);
    }
    let md = w.metadata();
    assert_eq!(md.fragments.len(), 2, "one ensemble change: {:?}", md.fragments);
    assert_eq!(md.last_fragment().first_entry, 5);
    assert!(!md.last_fragment().bookies.contains(&silent), "{:?}", md.fragments);
    assert_eq!(md.last_fragment().bookies[..2], md.fragments[0].bookies[..2], "the others keep their positions");
    let closed = w.close().await.expect("close");
    assert_eq!(closed.last_entry, 9);
    let reader = cluster.ledger_client().open_reader(id).await.expect("reader");
    let entries = reader.read(0, 9).await.expect("read");
    for e in 0..10 {
        assert_eq!(&entries[e as usize][..], &payload(id, e, 100)[..], "entry {e}");
    }
    assert_eq!(client.faults().held_adds(), 5, "the silent bookie never got entries 5-9");
    cluster.shutdown().await;
}

/// A range read larger than what a bookie answers at once (32 MiB): the bookie marks the rest
/// not sent, and the reader asks the same bookie again for it instead of counting it as a
/// failed replica (with one replica, that failed the whole read, again on every retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_reads_larger_than_one_answer_come_back_whole() {
    let cluster = Cluster::new(1, &[], true).await;
    let client = cluster.ledger_client();
    let w = client.create(LedgerConfig::new(1, 1, 1)).await.expect("create");
    let id = w.id();
    let (n, size) = (100i64, 1_000_000);
    let total: usize = (0..n).map(|e| payload(id, e, size).len()).sum();
    assert!(total > 40 << 20, "{total} bytes: more than one answer holds");
    let adds: FuturesUnordered<_> = (0..n).map(|e| w.append(payload(id, e, size))).collect();
    let acked: Vec<_> = adds.collect().await;
    assert!(acked.iter().all(|r| r.is_ok()), "{acked:?}");
    w.close().await.expect("close");
    let entries = client.open_reader(id).await.expect("reader").read(0, n - 1).await.expect("one read");
    assert_eq!(entries.len(), n as usize);
    for (e, got) in entries.iter().enumerate() {
        assert!(got[..] == payload(id, e as i64, size)[..], "entry {e}");
    }
    cluster.shutdown().await;
}

/// An add the bookies refuse as such (larger than their `max_entry_bytes`) fails the writer at
/// once, with the bookie's reason, instead of replacing bookie after bookie that all refuse it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_the_bookies_refuse_fails_without_ensemble_changes() {
    let cluster = Cluster::new(3, &["max_entry_bytes=100000"], true).await;
    let client = cluster.ledger_client();
    let w = client.create(LedgerConfig::new(2, 2, 2)).await.expect("create");
    let id = w.id();
    for e in 0..5 {
        w.append(vec![e as u8; 1000]).await.expect("add");
    }
    match w.append(vec![7u8; 200_000]).await {
        Err(LedgerError::Invalid(reason)) => assert!(reason.contains("max_entry_bytes"), "{reason}"),
        other => panic!("an entry over the bookies' limit: {other:?}"),
    }
    let (md, _) = client.metadata(id).await.expect("metadata");
    assert_eq!(md.fragments.len(), 1, "no ensemble change: {:?}", md.fragments);
    cluster.shutdown().await;
}
