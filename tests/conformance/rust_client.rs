//! Conformance with the Rust `pulsar` crate (protocol v12 and its own framing code): produce,
//! consume with an Exclusive and a Shared subscription, ack, and read back after a consumer
//! reconnect without redelivery of acknowledged messages.

use futures::TryStreamExt;
use pulsar::consumer::{ConsumerOptions, InitialPosition};
use pulsar::message::proto::command_subscribe::SubType;
use pulsar::{Consumer, Pulsar, TokioExecutor};

use super::standalone;

pub(super) async fn consumer(
    p: &Pulsar<TokioExecutor>,
    topic: &str,
    sub: &str,
    kind: SubType,
) -> Consumer<Vec<u8>, TokioExecutor> {
    p.consumer()
        .with_topic(topic)
        .with_subscription(sub)
        .with_subscription_type(kind)
        .with_options(ConsumerOptions::default().with_initial_position(InitialPosition::Earliest))
        .build()
        .await
        .expect("subscribe")
}

pub(super) async fn next_body(c: &mut Consumer<Vec<u8>, TokioExecutor>) -> String {
    let m = tokio::time::timeout(std::time::Duration::from_secs(15), c.try_next())
        .await
        .expect("a message within 15 s")
        .expect("receive")
        .expect("stream open");
    c.ack(&m).await.expect("ack");
    String::from_utf8(m.payload.data.clone()).expect("utf-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_produces_and_consumes() {
    let s = standalone().await;
    let p: Pulsar<TokioExecutor> =
        Pulsar::builder(format!("pulsar://{}", s.broker), TokioExecutor).build().await.expect("connect");
    let topic = "persistent://public/default/rust-client";
    let mut exclusive = consumer(&p, topic, "ex", SubType::Exclusive).await;
    let mut producer = p.producer().with_topic(topic).with_name("rust-producer").build().await.expect("producer");
    let mut ids = Vec::new();
    for i in 0..50 {
        let receipt =
            producer.send_non_blocking(format!("r-{i}").into_bytes()).await.expect("send").await.expect("receipt");
        let id = receipt.message_id.expect("message id");
        ids.push((id.ledger_id, id.entry_id));
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids grow: {ids:?}");
    for i in 0..50 {
        assert_eq!(next_body(&mut exclusive).await, format!("r-{i}"));
    }
    // Two Shared consumers split the next round; together they see everything once.
    let mut a = consumer(&p, topic, "sh", SubType::Shared).await;
    let mut b = consumer(&p, topic, "sh", SubType::Shared).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..50 {
        let m = tokio::select! {
            m = next_body(&mut a) => m,
            m = next_body(&mut b) => m,
        };
        assert!(seen.insert(m.clone()), "{m} delivered twice");
    }
    assert_eq!(seen.len(), 50);
    // A new consumer on the exclusive subscription gets only what comes next.
    drop(exclusive);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    producer.send_non_blocking(b"after".to_vec()).await.expect("send").await.expect("receipt");
    let mut again = consumer(&p, topic, "ex", SubType::Exclusive).await;
    assert_eq!(next_body(&mut again).await, "after");
}

/// A cumulative ack on a Shared subscription acknowledges nothing (Pulsar refuses it too; the
/// official clients do not send one, this crate does): it would acknowledge messages other
/// consumers hold, which would then never be delivered again if those consumers failed. The
/// consumer that connects after it gets every message again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cumulative_ack_on_a_shared_subscription_acknowledges_nothing() {
    let s = standalone().await;
    let p: Pulsar<TokioExecutor> =
        Pulsar::builder(format!("pulsar://{}", s.broker), TokioExecutor).build().await.expect("connect");
    let topic = "persistent://public/default/rust-shared-cumulative";
    let mut a = consumer(&p, topic, "sh", SubType::Shared).await;
    let mut producer = p.producer().with_topic(topic).build().await.expect("producer");
    for i in 0..5 {
        producer.send_non_blocking(format!("c-{i}").into_bytes()).await.expect("send").await.expect("receipt");
    }
    let mut last = None;
    for _ in 0..5 {
        let m = tokio::time::timeout(std::time::Duration::from_secs(15), a.try_next())
            .await
            .expect("a message within 15 s")
            .expect("receive")
            .expect("stream open");
        last = Some(m);
    }
    let _ = a.cumulative_ack(&last.expect("received")).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    drop(a);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mut b = consumer(&p, topic, "sh", SubType::Shared).await;
    let mut got = std::collections::BTreeSet::new();
    for _ in 0..5 {
        got.insert(next_body(&mut b).await);
    }
    assert_eq!(got, (0..5).map(|i| format!("c-{i}")).collect());
}
