//! The client API against one node and against followers: values, preconditions, paging,
//! transactions, ids, limits and malformed input.

use magnetar_metastore::client::{ClientError, ClientOptions, MetaClient, PutOptions, Txn};

use crate::support::cluster;

#[tokio::test]
async fn single_node_api_round_trip() {
    let t = cluster(1, &["--set", "limits.max_value_bytes=1024", "--set", "limits.max_txn_ops=8"]).await;
    let c = t.c.client();

    assert_eq!(c.get("/k").await.expect("get"), None);
    let v1 = c.put("/k", "one", PutOptions { expected_version: Some(0), session: 0 }).await.expect("create");
    let err = c.put("/k", "dup", PutOptions { expected_version: Some(0), session: 0 }).await.expect_err("exists");
    assert!(matches!(err, ClientError::BadVersion { actual, .. } if actual == v1), "{err:?}");
    let v2 = c.put("/k", "two", PutOptions { expected_version: Some(v1), session: 0 }).await.expect("cas");
    assert!(v2 > v1);
    let kv = c.get("/k").await.expect("get").expect("present");
    assert_eq!((kv.value.as_slice(), kv.version, kv.create_revision), (&b"two"[..], v2, v1));
    let stale = c.get_with("/k", true).await.expect("stale get").expect("present");
    assert_eq!(stale.version, v2);
    assert!(matches!(c.delete("/k", Some(v1)).await, Err(ClientError::BadVersion { .. })));
    assert!(c.delete("/k", Some(v2)).await.expect("delete"));
    assert!(!c.delete("/k", None).await.expect("delete again"));

    for i in 0..25 {
        c.put(&format!("/list/{i:03}"), format!("v{i}"), PutOptions::default()).await.expect("put");
    }
    c.put("/listing-not-under-prefix", "x", PutOptions::default()).await.expect("put");
    let page = c.range("/list/", "", 10, false).await.expect("page");
    assert_eq!(page.kvs.len(), 10);
    assert!(page.more);
    let all = c.list("/list/").await.expect("list");
    assert_eq!(all.len(), 25);
    assert!(all.windows(2).all(|w| w[0].key < w[1].key));

    let ok = c
        .txn(
            Txn::default()
                .compare("/list/000", all[0].version)
                .compare("/new", 0)
                .put("/new", "n", 0)
                .delete("/list/001"),
        )
        .await
        .expect("txn");
    assert!(ok.succeeded);
    assert!(c.get("/list/001").await.expect("get").is_none());
    let failed = c.txn(Txn::default().compare("/new", 0).put("/never", "x", 0)).await.expect("txn");
    assert!(!failed.succeeded);
    assert_eq!(failed.failed_compare, 0);
    assert!(failed.actual_version > 0);
    assert!(c.get("/never").await.expect("get").is_none());

    let a = c.next_id("ledgers").await.expect("id");
    let b = c.next_id("ledgers").await.expect("id");
    assert_eq!(b, a + 1);

    // Limits and malformed input answer with clear errors and the node keeps serving.
    let big = c.put("/big", vec![0u8; 1025], PutOptions::default()).await.expect_err("too big");
    assert!(
        matches!(&big, ClientError::InvalidArgument { message } if message.contains("limits.max_value_bytes")),
        "{big}"
    );
    let empty = c.put("", "x", PutOptions::default()).await.expect_err("empty key");
    assert!(matches!(empty, ClientError::InvalidArgument { .. }), "{empty}");
    let long_key = "k".repeat(5000);
    assert!(matches!(c.get(&long_key).await, Err(ClientError::InvalidArgument { .. })));
    let mut many = Txn::default();
    for i in 0..9 {
        many = many.put(format!("/m/{i}"), "x", 0);
    }
    assert!(matches!(c.txn(many).await, Err(ClientError::InvalidArgument { .. })));
    // Far over the gRPC frame limit: rejected before the node buffers it.
    let huge = c.put("/huge", vec![0u8; 16 << 20], PutOptions::default()).await.expect_err("frame too large");
    assert!(matches!(huge, ClientError::InvalidArgument { .. } | ClientError::Server { .. }), "{huge:?}");
    assert!(matches!(
        c.put("/s", "x", PutOptions { expected_version: None, session: 12345 }).await,
        Err(ClientError::NoSuchSession(_))
    ));
    assert_eq!(c.get("/new").await.expect("still serving").map(|k| k.value), Some(b"n".to_vec()));
}

#[tokio::test]
async fn a_follower_points_to_the_leader_and_the_client_follows() {
    let t = cluster(3, &[]).await;
    let leader = t.leader().await;
    let follower = (leader + 1) % 3;
    let only_follower = MetaClient::new(&[t.c.nodes[follower].addr.clone()], ClientOptions::default()).expect("client");
    // The follower answers NotLeader with the leader's address, which the client follows.
    only_follower.put("/via-follower", "x", PutOptions::default()).await.expect("put through a follower endpoint");
    assert_eq!(only_follower.get("/via-follower").await.expect("get").map(|k| k.value), Some(b"x".to_vec()));
    let status = only_follower.cluster_status(Some(&t.c.nodes[follower].addr)).await.expect("status");
    assert_eq!(status.leader_addr, t.c.nodes[leader].addr);
    assert_eq!(status.members.len(), 3);
    assert!(status.members.iter().all(|m| m.voter));
}

#[tokio::test]
async fn garbage_on_the_raft_port_is_rejected_and_the_node_keeps_serving() {
    use magnetar_proto::metastore::raft_client::RaftClient;
    use magnetar_proto::metastore::RaftPayload;

    let t = cluster(1, &[]).await;
    let c = t.c.client();
    c.put("/before", "x", PutOptions::default()).await.expect("put");
    let mut raft = RaftClient::connect(format!("http://{}", t.c.nodes[0].addr)).await.expect("connect");
    for data in [vec![], vec![0xff; 3], (0..=255u8).cycle().take(10_000).collect::<Vec<u8>>()] {
        let err = raft.append_entries(RaftPayload { data: data.clone() }).await.expect_err("garbage must be rejected");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        let err = raft.vote(RaftPayload { data }).await.expect_err("garbage must be rejected");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    }
    assert!(c.get("/before").await.expect("still serving").is_some());
}
