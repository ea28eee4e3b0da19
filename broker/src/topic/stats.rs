//! Topic statistics with the JSON field names of Pulsar's admin API (`topics stats`), and the
//! rate windows behind them.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// A counter with the rate over its last completed window.
#[derive(Clone, Debug)]
pub struct Rate {
    /// Total since the topic was loaded.
    pub total: u64,
    window_start: Instant,
    at_start: u64,
    /// Per second over the last window.
    pub rate: f64,
}

impl Default for Rate {
    fn default() -> Self {
        Rate { total: 0, window_start: Instant::now(), at_start: 0, rate: 0.0 }
    }
}

impl Rate {
    /// Adds `n`.
    pub fn add(&mut self, n: u64) {
        self.total += n;
    }

    /// Closes the window once it is `min_secs` old.
    pub fn tick(&mut self, min_secs: f64) {
        let secs = self.window_start.elapsed().as_secs_f64();
        if secs >= min_secs {
            self.rate = (self.total - self.at_start) as f64 / secs;
            self.at_start = self.total;
            self.window_start = Instant::now();
        }
    }
}

/// One producer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublisherStats {
    /// Name.
    pub producer_name: String,
    /// Id on its connection.
    pub producer_id: u64,
    /// Messages per second.
    pub msg_rate_in: f64,
    /// Bytes per second.
    pub msg_throughput_in: f64,
}

/// One consumer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerStats {
    /// Name.
    pub consumer_name: String,
    /// Permits left.
    pub available_permits: i64,
    /// Delivered and not acknowledged (entries).
    pub unacked_messages: u64,
    /// Messages per second.
    pub msg_rate_out: f64,
    /// Bytes per second.
    pub msg_throughput_out: f64,
}

/// One subscription.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionStats {
    /// Messages per second delivered.
    pub msg_rate_out: f64,
    /// Bytes per second delivered.
    pub msg_throughput_out: f64,
    /// Messages delivered since loaded.
    pub msg_out_counter: u64,
    /// Entries not yet acknowledged.
    pub msg_backlog: u64,
    /// Bytes not yet acknowledged (estimated from the average entry size).
    pub backlog_size: u64,
    /// Delivered and not acknowledged.
    pub unacked_messages: u64,
    /// Entries held back until their delivery time (delayed delivery).
    pub msg_delayed: u64,
    /// Exclusive, Shared, Failover or Key_Shared.
    #[serde(rename = "type")]
    pub sub_type: String,
    /// Durable (named) or a reader's.
    pub is_durable: bool,
    /// Connected consumers.
    pub consumers: Vec<ConsumerStats>,
}

/// A topic.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopicStats {
    /// Messages per second published.
    pub msg_rate_in: f64,
    /// Bytes per second published.
    pub msg_throughput_in: f64,
    /// Messages per second delivered (all subscriptions).
    pub msg_rate_out: f64,
    /// Bytes per second delivered.
    pub msg_throughput_out: f64,
    /// Messages published since loaded.
    pub msg_in_counter: u64,
    /// Bytes published since loaded.
    pub bytes_in_counter: u64,
    /// Messages delivered since loaded.
    pub msg_out_counter: u64,
    /// Average message size.
    pub average_msg_size: f64,
    /// Bytes stored in the topic's ledgers.
    pub storage_size: u64,
    /// Entries stored.
    pub entries: u64,
    /// Bytes of the largest subscription backlog.
    pub backlog_size: u64,
    /// Connected producers.
    pub publishers: Vec<PublisherStats>,
    /// Subscriptions by name.
    pub subscriptions: BTreeMap<String, SubscriptionStats>,
    /// Publish (storage write) latency since the topic was loaded (metrics only).
    #[serde(skip)]
    pub write_latency: WriteLatency,
}

/// Upper bounds (ms) of Pulsar's `pulsar_storage_write_latency_le_*` buckets; the last
/// bucket (`le_overflow`) takes the rest.
pub const WRITE_LATENCY_BOUNDS_MS: [f64; 9] = [0.5, 1.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 1000.0];

/// Counts of writes per latency bucket.
#[derive(Clone, Debug, Default)]
pub struct WriteLatency {
    /// Per bucket (not cumulative), the overflow last.
    pub buckets: [u64; 10],
    /// Sum of latencies, ms.
    pub sum_ms: f64,
    /// Writes.
    pub count: u64,
}

impl WriteLatency {
    /// Records one write.
    pub fn record(&mut self, ms: f64) {
        let i = WRITE_LATENCY_BOUNDS_MS.iter().position(|b| ms <= *b).unwrap_or(9);
        self.buckets[i] += 1;
        self.sum_ms += ms;
        self.count += 1;
    }
}
