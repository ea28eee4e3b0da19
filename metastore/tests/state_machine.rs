//! The state machine's semantics, driven through openraft's `RaftStateMachine` API directly:
//! versions and preconditions, transactions, sessions and ephemeral keys, id allocation,
//! request dedup, watch history, and snapshot build/install round trips.

use std::sync::Arc;

use magnetar_metastore::store::sm::{Notify, Retention, SmShared, StateMachine};
use magnetar_metastore::types::{
    last_revision_of, revision_of, Command, CommandResult, Entry, Op, Outcome, Proposal, TxnOp,
};

/// The revision of the (single) command in the entry at `index`.
fn r(index: u64) -> u64 {
    revision_of(index, 0)
}
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, EntryPayload, LogId};

struct Fixture {
    _dir: tempfile::TempDir,
    sm: StateMachine,
    shared: Arc<SmShared>,
    next_index: u64,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = magnetar_metastore::store::open_db(dir.path()).expect("open db");
    let sm =
        StateMachine::new(db, dir.path().join("snap"), Retention { event_revisions: 2048 }).expect("state machine");
    let shared = sm.shared();
    Fixture { _dir: dir, sm, shared, next_index: 1 }
}

impl Fixture {
    async fn apply_all(&mut self, cmds: Vec<Command>) -> Vec<CommandResult> {
        let entries: Vec<Entry> = cmds
            .into_iter()
            .map(|c| {
                let e = Entry {
                    log_id: LogId::new(CommittedLeaderId::new(1, 1), self.next_index),
                    payload: EntryPayload::Normal(Proposal { commands: vec![c] }),
                };
                self.next_index += 1;
                e
            })
            .collect();
        self.sm.apply(entries).await.expect("apply").into_iter().map(|mut v| v.remove(0)).collect()
    }

    async fn op(&mut self, op: Op) -> CommandResult {
        self.apply_all(vec![Command { request: None, op }]).await.remove(0)
    }
}

fn put(key: &str, value: &str, expected: Option<u64>, session: u64) -> Op {
    Op::Put { key: key.into(), value: value.as_bytes().to_vec(), expected, session }
}

#[tokio::test]
async fn versions_are_revisions_and_preconditions_hold() {
    let mut f = fixture();
    let res = f.op(put("/a", "1", Some(0), 0)).await;
    assert_eq!(res.outcome, Outcome::Put { version: r(1) });
    // Must-not-exist fails once it exists.
    let res = f.op(put("/a", "2", Some(0), 0)).await;
    assert_eq!(res.outcome, Outcome::BadVersion { key: "/a".into(), expected: 0, actual: r(1) });
    // CAS on the right version succeeds and bumps the version to the new revision.
    let res = f.op(put("/a", "3", Some(r(1)), 0)).await;
    assert_eq!(res.outcome, Outcome::Put { version: r(3) });
    let v = f.shared.get("/a").expect("get").expect("present");
    assert_eq!((v.value.as_slice(), v.version, v.create_revision), (&b"3"[..], r(3), r(1)));
    // Delete with a stale version fails; with the right one succeeds; then nothing to delete.
    let res = f.op(Op::Delete { key: "/a".into(), expected: Some(r(1)) }).await;
    assert!(matches!(res.outcome, Outcome::BadVersion { actual, .. } if actual == r(3)));
    assert_eq!(f.op(Op::Delete { key: "/a".into(), expected: Some(r(3)) }).await.outcome, Outcome::Deleted(true));
    assert_eq!(f.op(Op::Delete { key: "/a".into(), expected: None }).await.outcome, Outcome::Deleted(false));
    assert!(f.shared.get("/a").expect("get").is_none());
}

#[tokio::test]
async fn transactions_are_all_or_nothing_within_one_batch() {
    let mut f = fixture();
    f.op(put("/t/x", "x", None, 0)).await;
    let fail = f
        .op(Op::Txn {
            compares: vec![("/t/x".into(), r(1)), ("/t/y".into(), 5)],
            ops: vec![TxnOp::Put { key: "/t/z".into(), value: b"z".to_vec(), session: 0 }],
        })
        .await;
    assert_eq!(fail.outcome, Outcome::Txn { succeeded: false, failed_compare: 1, actual_version: 0 });
    assert!(f.shared.get("/t/z").expect("get").is_none());
    // Several commands in one apply batch see each other's effects.
    let results = f
        .apply_all(vec![
            Command {
                request: None,
                op: Op::Txn {
                    compares: vec![("/t/x".into(), r(1)), ("/t/y".into(), 0)],
                    ops: vec![
                        TxnOp::Put { key: "/t/y".into(), value: b"y".to_vec(), session: 0 },
                        TxnOp::Delete { key: "/t/x".into() },
                    ],
                },
            },
            Command { request: None, op: put("/t/y", "y2", Some(r(3)), 0) },
        ])
        .await;
    assert_eq!(results[0].outcome, Outcome::Txn { succeeded: true, failed_compare: 0, actual_version: 0 });
    assert_eq!(results[1].outcome, Outcome::Put { version: r(4) });
    assert!(f.shared.get("/t/x").expect("get").is_none());
    let (kvs, more) = f.shared.range("/t/", "", 10, false).expect("range");
    assert!(!more);
    assert_eq!(kvs.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(), vec!["/t/y"]);
}

#[tokio::test]
async fn range_pages_in_key_order() {
    let mut f = fixture();
    let cmds = (0..25).map(|i| Command { request: None, op: put(&format!("/r/{i:02}"), "v", None, 0) }).collect();
    f.apply_all(cmds).await;
    f.op(put("/s/other", "v", None, 0)).await;
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let (page, more) = f.shared.range("/r/", &after, 10, true).expect("range");
        assert!(page.iter().all(|k| k.value.value.is_empty()), "keys_only must drop values");
        seen.extend(page.iter().map(|k| k.key.clone()));
        after = seen.last().cloned().unwrap_or_default();
        if !more {
            break;
        }
    }
    let expected: Vec<String> = (0..25).map(|i| format!("/r/{i:02}")).collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn session_close_deletes_only_its_ephemeral_keys_with_events() {
    let mut f = fixture();
    let created = f.op(Op::CreateSession { ttl_ms: 1000 }).await;
    let Outcome::SessionCreated { id, .. } = created.outcome else { panic!("{created:?}") };
    assert_eq!(f.shared.session_ttl(id), Some(1000));
    f.op(put("/e/mine", "1", None, id)).await;
    f.op(put("/e/rebound", "1", None, id)).await;
    f.op(put("/e/rebound", "2", None, 0)).await; // now persistent
    f.op(put("/e/persistent", "1", None, 0)).await;
    assert_eq!(f.op(put("/e/x", "1", None, 999)).await.outcome, Outcome::NoSuchSession(999));
    let mut rx = f.shared.subscribe();
    let closed = f.op(Op::CloseSession { id, expired: true }).await;
    assert_eq!(closed.outcome, Outcome::SessionClosed(true));
    assert!(f.shared.get("/e/mine").expect("get").is_none());
    assert!(f.shared.get("/e/rebound").expect("get").is_some());
    assert!(f.shared.get("/e/persistent").expect("get").is_some());
    assert_eq!(f.shared.session_ttl(id), None);
    match rx.try_recv() {
        Ok(Notify::Batch(b)) => {
            assert_eq!(b.revision, closed.revision);
            assert_eq!(b.events.len(), 1);
            assert_eq!(b.events[0].key, "/e/mine");
            assert!(b.events[0].value.is_none());
            assert_eq!(b.events[0].session, id);
        }
        other => panic!("expected the delete event, got {other:?}"),
    }
    // Closing again is a no-op, and putting on a closed session fails.
    assert_eq!(f.op(Op::CloseSession { id, expired: false }).await.outcome, Outcome::SessionClosed(false));
    assert_eq!(f.op(put("/e/late", "1", None, id)).await.outcome, Outcome::NoSuchSession(id));
}

#[tokio::test]
async fn ids_are_dense_per_name_and_requests_apply_once() {
    let mut f = fixture();
    for expect in 0..5 {
        assert_eq!(f.op(Op::NextId { name: "ledger".into() }).await.outcome, Outcome::Id(expect));
    }
    assert_eq!(f.op(Op::NextId { name: "other".into() }).await.outcome, Outcome::Id(0));
    // The same request id applied twice (a retry after a lost answer) yields the first answer.
    let cmd = Command { request: Some((7, 1)), op: Op::NextId { name: "ledger".into() } };
    let first = f.apply_all(vec![cmd.clone()]).await.remove(0);
    let again = f.apply_all(vec![cmd.clone(), cmd]).await;
    assert_eq!(first.outcome, Outcome::Id(5));
    assert_eq!(again[0], first);
    assert_eq!(again[1], first);
    assert_eq!(f.op(Op::NextId { name: "ledger".into() }).await.outcome, Outcome::Id(6));
}

#[tokio::test]
async fn watch_history_by_revision_and_prefix() {
    let mut f = fixture();
    f.op(put("/w/a", "1", None, 0)).await; // rev 1
    f.op(put("/x/b", "1", None, 0)).await; // rev 2
    f.op(Op::Txn {
        compares: vec![],
        ops: vec![
            TxnOp::Put { key: "/w/c".into(), value: b"c".to_vec(), session: 0 },
            TxnOp::Delete { key: "/w/a".into() },
        ],
    })
    .await; // rev 3
    let all = f.shared.events_between(r(1), last_revision_of(3), "/w/").expect("events");
    assert_eq!(all.iter().map(|b| b.revision).collect::<Vec<_>>(), vec![r(1), r(3)]);
    assert_eq!(all[1].events.len(), 2, "a transaction's events share one revision");
    assert_eq!(f.shared.events_between(r(2), last_revision_of(2), "/w/").expect("events"), vec![]);
    assert_eq!(f.shared.revision(), last_revision_of(3));
}

#[tokio::test]
async fn old_history_is_pruned_and_the_floor_reported() {
    let mut f = fixture();
    let cmds: Vec<Command> =
        (0..5000).map(|i| Command { request: None, op: put(&format!("/p/{}", i % 10), "v", None, 0) }).collect();
    for chunk in cmds.chunks(500) {
        f.apply_all(chunk.to_vec()).await;
    }
    let floor = f.shared.event_floor();
    let floor_index = magnetar_metastore::types::index_of(floor);
    assert!(floor_index > 0 && floor_index <= 5000 - 2048, "floor {floor_index}");
    assert!(f.shared.events_between(1, floor - 1, "").expect("events").is_empty());
    assert!(!f.shared.events_between(floor, last_revision_of(5000), "").expect("events").is_empty());
}

#[tokio::test]
async fn snapshot_round_trip_restores_everything() {
    let mut f = fixture();
    let Outcome::SessionCreated { id, .. } = f.op(Op::CreateSession { ttl_ms: 5000 }).await.outcome else {
        panic!("session")
    };
    f.op(put("/s/eph", "e", None, id)).await;
    f.op(put("/s/p", "p", None, 0)).await;
    f.op(Op::NextId { name: "n".into() }).await;
    let mut builder = f.sm.get_snapshot_builder().await;
    let snap = builder.build_snapshot().await.expect("build");
    assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(4));

    let mut g = fixture();
    g.op(put("/junk", "j", None, 0)).await;
    g.sm.install_snapshot(&snap.meta, snap.snapshot).await.expect("install");
    assert!(g.shared.get("/junk").expect("get").is_none(), "install replaces the old state");
    assert_eq!(g.shared.get("/s/p").expect("get").map(|v| v.value), Some(b"p".to_vec()));
    assert_eq!(g.shared.session_ttl(id), Some(5000));
    assert_eq!(g.shared.revision(), last_revision_of(4));
    let (applied, _) = g.sm.applied_state().await.expect("applied");
    assert_eq!(applied.map(|l| l.index), Some(4));
    // The session index came along: closing the session deletes its key on the new node.
    g.next_index = 5;
    g.op(Op::CloseSession { id, expired: true }).await;
    assert!(g.shared.get("/s/eph").expect("get").is_none());
    assert_eq!(g.op(Op::NextId { name: "n".into() }).await.outcome, Outcome::Id(1));
    let current = g.sm.get_current_snapshot().await.expect("current").expect("saved");
    assert_eq!(current.meta.last_log_id.map(|l| l.index), Some(4));
}

#[tokio::test]
async fn commands_batched_in_one_entry_get_distinct_versions_in_order() {
    let mut f = fixture();
    let entry = Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
        payload: EntryPayload::Normal(Proposal {
            commands: vec![
                Command { request: None, op: put("/b", "1", Some(0), 0) },
                Command { request: None, op: put("/b", "2", None, 0) },
                // Sees the second put's version, not the entry's first.
                Command { request: None, op: put("/b", "3", Some(revision_of(1, 1)), 0) },
                Command { request: None, op: put("/b", "x", Some(revision_of(1, 0)), 0) },
            ],
        }),
    };
    let results = f.sm.apply(vec![entry]).await.expect("apply").remove(0);
    let outcomes: Vec<Outcome> = results.into_iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        vec![
            Outcome::Put { version: revision_of(1, 0) },
            Outcome::Put { version: revision_of(1, 1) },
            Outcome::Put { version: revision_of(1, 2) },
            Outcome::BadVersion { key: "/b".into(), expected: revision_of(1, 0), actual: revision_of(1, 2) },
        ]
    );
    let v = f.shared.get("/b").expect("get").expect("present");
    assert_eq!((v.value.as_slice(), v.version, v.create_revision), (&b"3"[..], revision_of(1, 2), revision_of(1, 0)));
    assert_eq!(f.shared.revision(), last_revision_of(1));
    let events = f.shared.events_between(revision_of(1, 0), last_revision_of(1), "/b").expect("events");
    assert_eq!(
        events.iter().map(|b| b.revision).collect::<Vec<_>>(),
        (0..3).map(|i| revision_of(1, i)).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn start_up_finishes_an_install_whose_snapshot_was_saved_but_not_applied() {
    let mut f = fixture();
    f.op(put("/k", "v", None, 0)).await;
    f.op(Op::NextId { name: "n".into() }).await;
    let mut builder = f.sm.get_snapshot_builder().await;
    builder.build_snapshot().await.expect("build");

    // A node that crashed after saving the received snapshot file, before installing it.
    let dir = tempfile::tempdir().expect("tempdir");
    let snap_dir = dir.path().join("snap");
    std::fs::create_dir_all(&snap_dir).expect("mkdir");
    std::fs::copy(f._dir.path().join("snap/current.snap"), snap_dir.join("current.snap")).expect("copy snapshot");
    let db = magnetar_metastore::store::open_db(dir.path()).expect("open db");
    let sm = StateMachine::new(db, snap_dir, Retention { event_revisions: 2048 }).expect("start");
    let shared = sm.shared();
    assert_eq!(shared.revision(), last_revision_of(2));
    assert_eq!(shared.get("/k").expect("get").map(|v| v.value), Some(b"v".to_vec()));
}
