//! `magnetar produce` and `magnetar consume`: quick manual use, like pulsar-client's.

use std::time::Duration;

use bytes::Bytes;
use clap::{Args, ValueEnum};
use magnetar_broker::client::Client;
use magnetar_broker::protocol::codec::split_batch;
use magnetar_broker::protocol::pb::command_subscribe::SubType;

fn addr(url: &str) -> String {
    url.trim_start_matches("pulsar://").trim_end_matches('/').to_owned()
}

#[derive(Args, Debug)]
pub struct ProduceArgs {
    /// Topic.
    topic: String,
    /// A message (repeatable).
    #[arg(long = "messages", short = 'm', required = true)]
    messages: Vec<String>,
    /// Send the messages this many times.
    #[arg(long = "num-produce", short = 'n', default_value_t = 1)]
    num: u64,
    /// Broker service URL.
    #[arg(long, default_value = "pulsar://127.0.0.1:6650", env = "MAGNETAR_SERVICE_URL")]
    url: String,
}

pub async fn produce(a: ProduceArgs) -> anyhow::Result<()> {
    let c = Client::connect_for(&addr(&a.url), &a.topic).await?;
    let mut p = c.producer(&a.topic).await?;
    let now = || {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    };
    let mut sent = 0u64;
    for _ in 0..a.num {
        for m in &a.messages {
            p.send(m.as_bytes(), now())?;
            sent += 1;
        }
    }
    for _ in 0..sent {
        match p.receipt().await {
            Some((_, Ok(id))) => println!("{}:{}", id.ledger_id, id.entry_id),
            Some((seq, Err(e))) => anyhow::bail!("message {seq} was not stored: {e}"),
            None => anyhow::bail!("the connection closed before every message was acknowledged"),
        }
    }
    eprintln!("{sent} message(s) produced to {}", a.topic);
    Ok(())
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Kind {
    Exclusive,
    Shared,
    Failover,
    KeyShared,
}

#[derive(Args, Debug)]
pub struct ConsumeArgs {
    /// Topic.
    topic: String,
    /// Subscription.
    #[arg(long = "subscription-name", short = 's')]
    subscription: String,
    /// Messages to receive (0: until stopped).
    #[arg(long = "num-messages", short = 'n', default_value_t = 1)]
    num: u64,
    /// Subscription type.
    #[arg(long = "subscription-type", short = 't', value_enum, default_value = "exclusive")]
    kind: Kind,
    /// Start a new subscription at the earliest message (default: latest).
    #[arg(long)]
    earliest: bool,
    /// Give up after this many seconds without a message (0: wait forever).
    #[arg(long, default_value_t = 0)]
    timeout: u64,
    /// Broker service URL.
    #[arg(long, default_value = "pulsar://127.0.0.1:6650", env = "MAGNETAR_SERVICE_URL")]
    url: String,
}

pub async fn consume(a: ConsumeArgs) -> anyhow::Result<()> {
    let c = Client::connect_for(&addr(&a.url), &a.topic).await?;
    let kind = match a.kind {
        Kind::Exclusive => SubType::Exclusive,
        Kind::Shared => SubType::Shared,
        Kind::Failover => SubType::Failover,
        Kind::KeyShared => SubType::KeyShared,
    };
    let mut consumer = c.subscribe(&a.topic, &a.subscription, kind, a.earliest).await?;
    consumer.flow(1000)?;
    let (mut got, mut since_flow) = (0u64, 0u32);
    while a.num == 0 || got < a.num {
        let next = consumer.next();
        let m = if a.timeout > 0 {
            match tokio::time::timeout(Duration::from_secs(a.timeout), next).await {
                Ok(m) => m,
                Err(_) => anyhow::bail!("no message within {} s ({got} received)", a.timeout),
            }
        } else {
            next.await
        };
        let Some(m) = m else { anyhow::bail!("the connection closed") };
        let md = &m.payload.metadata;
        let bodies: Vec<Bytes> = match md.num_messages_in_batch {
            Some(n) if md.compression.unwrap_or(0) == 0 => {
                split_batch(&m.payload.data, n.max(0) as usize)?.into_iter().map(|i| i.payload).collect()
            }
            Some(_) => anyhow::bail!("compressed batches are not decoded by this tool"),
            None => vec![m.payload.data.clone()],
        };
        for b in bodies {
            println!("{}", String::from_utf8_lossy(&b));
            got += 1;
        }
        since_flow += 1;
        consumer.ack(vec![m.command.message_id])?;
        if since_flow >= 500 {
            consumer.flow(since_flow)?;
            since_flow = 0;
        }
    }
    // Give the acknowledgements a moment to leave before the connection closes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    eprintln!("{got} message(s) consumed from {}", a.topic);
    Ok(())
}
