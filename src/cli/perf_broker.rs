//! `magnetar perf produce` and `magnetar perf consume`: like pulsar-perf. Producers publish at
//! a rate (or as fast as the window allows), optionally batching; consumers measure
//! end-to-end latency from a timestamp the producer writes into each payload. Live progress
//! every second; latency percentiles from HDR histograms.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use magnetar_broker::client::{Client, Consumer};
use magnetar_broker::protocol::codec::split_batch;
use magnetar_broker::protocol::pb;
use tokio::sync::mpsc;

use super::perf::Stopped;

/// Producer settings.
#[derive(Args, Debug, Clone)]
pub struct ProducePerf {
    /// Broker address (host:port or pulsar://host:port).
    #[arg(long, default_value = "127.0.0.1:6650")]
    pub url: String,
    /// Topic.
    #[arg(long, default_value = "perf")]
    pub topic: String,
    /// Message size in bytes (at least 8: the payload carries its send time).
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Messages per second over all producers (0: as fast as the window allows).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Producers (each on its own connection).
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Messages per batch (1: batching off).
    #[arg(long, default_value_t = 1000)]
    pub batch_max_messages: usize,
    /// Bytes per batch.
    #[arg(long, default_value_t = 128 * 1024)]
    pub batch_max_bytes: usize,
    /// Longest a message waits for its batch to fill, µs.
    #[arg(long, default_value_t = 1000)]
    pub batch_delay_us: u64,
    /// Messages in flight per producer (1: one-at-a-time synchronous sends).
    #[arg(long, default_value_t = 10_000)]
    pub max_pending: usize,
    /// Seconds to measure, after the warm-up.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Seconds of sending before measuring starts; what is published and consumed in them is
    /// left out of the figures (send errors are not).
    #[arg(long = "warmup-time", default_value_t = 1)]
    pub warmup: u64,
    /// Consumers measuring end-to-end latency on the same topic (0: none).
    #[arg(long, default_value_t = 0)]
    pub consumers: usize,
    /// No live progress lines.
    #[arg(long)]
    pub quiet: bool,
}

/// Consumer settings.
#[derive(Args, Debug, Clone)]
pub struct ConsumePerf {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:6650")]
    pub url: String,
    /// Topic.
    #[arg(long, default_value = "perf")]
    pub topic: String,
    /// Subscription.
    #[arg(long, default_value = "perf-sub")]
    pub subscription: String,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
}

/// What a run measured.
pub struct Report {
    /// Messages acknowledged by the broker.
    pub published: u64,
    /// Payload bytes acknowledged.
    pub bytes: u64,
    /// Seconds.
    pub secs: f64,
    /// Publish latency (µs).
    pub publish: Histogram<u64>,
    /// End-to-end latency (µs), when consumers ran.
    pub e2e: Option<Histogram<u64>>,
    /// Messages consumed.
    pub consumed: u64,
    /// Send errors.
    pub errors: u64,
}

impl Report {
    /// Messages per second.
    pub fn rate(&self) -> f64 {
        self.published as f64 / self.secs
    }
    /// MB per second (10^6).
    pub fn mbps(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e6
    }
}

fn hist() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("static bounds are valid")
}

fn addr(url: &str) -> String {
    url.trim_start_matches("pulsar://").trim_end_matches('/').to_owned()
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn pct(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

enum Event {
    Published { n: u64, bytes: u64, lat: Vec<u64> },
    Error,
    Consumed { lat: Vec<u64> },
}

/// Runs producers (and consumers), printing progress; returns the totals.
pub async fn produce(a: &ProducePerf) -> anyhow::Result<Report> {
    anyhow::ensure!(a.size >= 8, "--size must be at least 8 bytes");
    anyhow::ensure!(a.producers >= 1 && a.max_pending >= 1 && a.batch_max_messages >= 1, "counts must be at least 1");
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let measure_from = Instant::now() + Duration::from_secs(a.warmup);
    let stop = measure_from + Duration::from_secs(a.duration);
    let mut consumer_tasks = Vec::new();
    for i in 0..a.consumers {
        let c = Client::connect_for(&addr(&a.url), &a.topic).await?;
        let sub = format!("perf-e2e-{}-{i}", std::process::id());
        let consumer = c.subscribe(&a.topic, &sub, pb::command_subscribe::SubType::Exclusive, false).await?;
        let tx = tx.clone();
        consumer_tasks.push(tokio::spawn(async move {
            let consumer = consume_loop(consumer, tx, stop + Duration::from_secs(2)).await?;
            // The measuring subscription goes with the run: left behind, it would hold every
            // later message of the topic as its backlog.
            if let Err(e) = c.unsubscribe(&consumer).await {
                eprintln!("removing subscription {sub} failed: {e}");
            }
            anyhow::Ok(())
        }));
    }
    let mut producer_tasks = Vec::new();
    for _ in 0..a.producers {
        let c = Client::connect_for(&addr(&a.url), &a.topic).await?;
        let p = c.producer(&a.topic).await?;
        let (a, tx) = (a.clone(), tx.clone());
        producer_tasks.push(tokio::spawn(async move {
            let r = produce_loop(p, &a, tx, stop).await;
            drop(c);
            r
        }));
    }
    drop(tx);
    let start = Instant::now();
    let (mut publish, mut e2e) = (hist(), hist());
    let (mut published, mut bytes, mut consumed, mut errors) = (0u64, 0u64, 0u64, 0u64);
    let mut window = (hist(), 0u64, 0u64, Instant::now());
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let warmup = tokio::time::sleep_until(measure_from.into());
    tokio::pin!(warmup);
    let mut warm = a.warmup == 0;
    loop {
        tokio::select! {
            _ = &mut warmup, if !warm => {
                // The warm-up is over: measure from here.
                warm = true;
                (publish, e2e) = (hist(), hist());
                (published, bytes, consumed) = (0, 0, 0);
                if !a.quiet {
                    println!("  warm-up over: measuring for {} s", a.duration);
                }
            }
            ev = rx.recv() => match ev {
                Some(Event::Published { n, bytes: b, lat }) => {
                    published += n;
                    bytes += b;
                    window.1 += n;
                    window.2 += b;
                    for l in lat {
                        let _ = publish.record(l.max(1));
                        let _ = window.0.record(l.max(1));
                    }
                }
                Some(Event::Consumed { lat }) => {
                    consumed += lat.len() as u64;
                    for l in lat {
                        let _ = e2e.record(l.max(1));
                    }
                }
                Some(Event::Error) => errors += 1,
                None => break,
            },
            _ = ticker.tick() => {
                if !a.quiet {
                    let secs = window.3.elapsed().as_secs_f64();
                    println!(
                        "  {:>5.1}s  {:>10.0} msg/s  {:>8.1} MB/s  publish p50 {:.2} ms  p99 {:.2} ms  consumed {}",
                        start.elapsed().as_secs_f64(), window.1 as f64 / secs, window.2 as f64 / secs / 1e6,
                        pct(&window.0, 0.5), pct(&window.0, 0.99), consumed
                    );
                }
                window = (hist(), 0, 0, Instant::now());
            }
        }
    }
    let secs = measure_from.elapsed().as_secs_f64().min(a.duration as f64).max(0.001);
    for t in producer_tasks {
        t.await??;
    }
    for t in consumer_tasks {
        // Each ends by itself: it stopped receiving (which ended the loop above) and now
        // removes its subscription.
        match tokio::time::timeout(Duration::from_secs(10), t).await {
            Ok(r) => r??,
            Err(_) => eprintln!("a consumer did not finish removing its subscription within 10 s"),
        }
    }
    Ok(Report { published, bytes, secs, publish, e2e: (a.consumers > 0).then_some(e2e), consumed, errors })
}

async fn produce_loop(
    mut p: magnetar_broker::client::Producer,
    a: &ProducePerf,
    tx: mpsc::UnboundedSender<Event>,
    stop: Instant,
) -> anyhow::Result<()> {
    let per_producer_rate = a.rate / a.producers as f64;
    let batching = a.batch_max_messages > 1;
    let start = Instant::now();
    let mut sent_msgs = 0u64;
    let mut inflight: std::collections::VecDeque<(Vec<Instant>, u64)> = std::collections::VecDeque::new();
    let mut pending_msgs = 0usize;
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batch_times: Vec<Instant> = Vec::new();
    let mut batch_bytes = 0usize;
    let filler = vec![0xa5u8; a.size];
    loop {
        let now = Instant::now();
        let done = now >= stop;
        // Flush a batch that is full, old enough, or the last one.
        let flush = !batch.is_empty()
            && (batch.len() >= a.batch_max_messages
                || batch_bytes >= a.batch_max_bytes
                || done
                || batch_times
                    .first()
                    .is_some_and(|t| now.duration_since(*t) >= Duration::from_micros(a.batch_delay_us)));
        if flush && pending_msgs < a.max_pending {
            let ts = now_us() / 1000;
            if batching {
                p.send_batch(&batch, ts)?;
            } else {
                p.send(&batch[0], ts)?;
            }
            pending_msgs += batch.len();
            inflight.push_back((std::mem::take(&mut batch_times), batch_bytes as u64));
            batch.clear();
            batch_bytes = 0;
            continue;
        }
        if done && batch.is_empty() && inflight.is_empty() {
            return Ok(());
        }
        // Next message due?
        let due = if done {
            None
        } else if per_producer_rate > 0.0 {
            Some(start + Duration::from_secs_f64(sent_msgs as f64 / per_producer_rate))
        } else {
            Some(now)
        };
        let room = pending_msgs + batch.len() < a.max_pending && batch.len() < a.batch_max_messages;
        if due.is_some_and(|d| d <= now) && room {
            let mut m = filler.clone();
            m[..8].copy_from_slice(&now_us().to_le_bytes());
            batch_bytes += m.len();
            batch.push(Bytes::from(m));
            batch_times.push(Instant::now());
            sent_msgs += 1;
            continue;
        }
        // Wait for a receipt, the next due message, or the batch delay.
        let mut wake = stop;
        if let Some(d) = due.filter(|_| room) {
            wake = wake.min(d);
        }
        if let Some(t) = batch_times.first() {
            wake = wake.min(*t + Duration::from_micros(a.batch_delay_us));
        }
        if inflight.is_empty() && wake <= Instant::now() {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            r = p.receipt(), if !inflight.is_empty() => {
                let Some((_, r)) = r else { anyhow::bail!("the producer's connection closed") };
                let Some((times, b)) = inflight.pop_front() else { continue };
                pending_msgs -= times.len();
                if r.is_err() {
                    let _ = tx.send(Event::Error);
                    continue;
                }
                let at = Instant::now();
                let lat = times.iter().map(|t| at.duration_since(*t).as_micros() as u64).collect::<Vec<_>>();
                let _ = tx.send(Event::Published { n: times.len() as u64, bytes: b, lat });
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

/// Receives until `stop` (or the connection closes); returns the consumer.
async fn consume_loop(mut c: Consumer, tx: mpsc::UnboundedSender<Event>, stop: Instant) -> anyhow::Result<Consumer> {
    const PERMITS: u32 = 5000;
    c.flow(PERMITS)?;
    let mut since_flow = 0u32;
    let mut acks = Vec::new();
    loop {
        let m = tokio::select! {
            m = c.next() => m,
            _ = tokio::time::sleep_until(stop.into()) => return Ok(c),
        };
        let Some(m) = m else { return Ok(c) };
        let now = now_us();
        let md = &m.payload.metadata;
        let mut lat = Vec::new();
        let n = md.num_messages_in_batch.unwrap_or(1).max(1) as usize;
        if md.num_messages_in_batch.is_some() {
            for item in split_batch(&m.payload.data, n).unwrap_or_default() {
                if item.payload.len() >= 8 {
                    let sent = u64::from_le_bytes(item.payload[..8].try_into().unwrap_or([0; 8]));
                    lat.push(now.saturating_sub(sent));
                }
            }
        } else if m.payload.data.len() >= 8 {
            let sent = u64::from_le_bytes(m.payload.data[..8].try_into().unwrap_or([0; 8]));
            lat.push(now.saturating_sub(sent));
        }
        since_flow += n as u32;
        acks.push(m.command.message_id);
        if acks.len() >= 100 {
            c.ack(std::mem::take(&mut acks))?;
        }
        if since_flow >= PERMITS / 2 {
            c.flow(since_flow)?;
            since_flow = 0;
        }
        let _ = tx.send(Event::Consumed { lat });
    }
}

/// `magnetar perf produce`.
pub async fn run_produce(a: ProducePerf) -> anyhow::Result<()> {
    println!(
        "producing to {} for {} s after a {} s warm-up: {} B messages, {} producer(s), rate {}, batch {} msgs / {} B / {} µs, window {}",
        a.topic,
        a.duration,
        a.warmup,
        a.size,
        a.producers,
        if a.rate > 0.0 { format!("{} msg/s", a.rate) } else { "max".into() },
        a.batch_max_messages,
        a.batch_max_bytes,
        a.batch_delay_us,
        a.max_pending
    );
    let r = produce(&a).await?;
    println!("{}", summary(&r));
    Ok(())
}

/// One line with a report's figures.
pub fn summary(r: &Report) -> String {
    let mut s = format!(
        "published {} msgs in {:.1} s: {:.0} msg/s, {:.1} MB/s; publish latency p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms; errors {}",
        r.published,
        r.secs,
        r.rate(),
        r.mbps(),
        pct(&r.publish, 0.5),
        pct(&r.publish, 0.99),
        pct(&r.publish, 0.999),
        r.errors
    );
    if let Some(e) = &r.e2e {
        s.push_str(&format!(
            "; consumed {}; end-to-end p50 {:.3} ms, p99 {:.3} ms",
            r.consumed,
            pct(e, 0.5),
            pct(e, 0.99)
        ));
    }
    s
}

/// `magnetar perf consume`: consumes from a subscription and prints rates and end-to-end
/// latency of messages that carry a send time (as `perf produce` writes them).
pub async fn run_consume(a: ConsumePerf) -> anyhow::Result<()> {
    let c = Client::connect_for(&addr(&a.url), &a.topic).await?;
    let consumer = c.subscribe(&a.topic, &a.subscription, pb::command_subscribe::SubType::Shared, false).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = Instant::now() + Duration::from_secs(a.duration);
    let task = tokio::spawn(consume_loop(consumer, tx, stop));
    let (mut total, mut h, mut window, mut last) = (0u64, hist(), 0u64, Instant::now());
    while let Some(ev) = rx.recv().await {
        if let Event::Consumed { lat } = ev {
            total += lat.len() as u64;
            window += lat.len() as u64;
            for l in lat {
                let _ = h.record(l.max(1));
            }
        }
        if last.elapsed() >= Duration::from_secs(1) {
            println!(
                "  {:>10.0} msg/s  end-to-end p50 {:.2} ms  p99 {:.2} ms",
                window as f64 / last.elapsed().as_secs_f64(),
                pct(&h, 0.5),
                pct(&h, 0.99)
            );
            (window, last) = (0, Instant::now());
        }
    }
    task.await??;
    println!("consumed {total} msgs; end-to-end p50 {:.3} ms, p99 {:.3} ms", pct(&h, 0.5), pct(&h, 0.99));
    Ok(())
}

/// The standard broker benchmark.
#[derive(Args, Debug)]
pub struct BrokerPerf {
    /// Seconds measured per case.
    #[arg(long, default_value_t = 8)]
    pub duration: u64,
    /// Seconds of sending before each case is measured (left out of its figures).
    #[arg(long = "warmup-time", default_value_t = 2)]
    pub warmup: u64,
    /// Directory for the data (a temporary directory under it is used and removed).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    /// Write the results into this markdown file (section `perf-broker`, or
    /// `perf-broker-cluster` with `--cluster`).
    #[arg(long)]
    pub record: Option<std::path::PathBuf>,
    /// Instead of a standalone: a 3-node metastore, 3 bookies and a broker, each its own
    /// process, ledgers with E=3, Qw=2, Qa=2.
    #[arg(long)]
    pub cluster: bool,
}

/// Loopback TCP bandwidth (MB/s): one connection, 64 KiB writes, for a second.
async fn loopback_bandwidth() -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let reader = tokio::spawn(async move {
        let (mut s, _) = l.accept().await?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0u64;
        loop {
            let k = s.read(&mut buf).await?;
            if k == 0 {
                return Ok::<u64, std::io::Error>(n);
            }
            n += k as u64;
        }
    });
    let mut c = tokio::net::TcpStream::connect(addr).await?;
    let chunk = vec![0x5au8; 64 * 1024];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        c.write_all(&chunk).await?;
    }
    drop(c);
    let n = reader.await??;
    Ok(n as f64 / start.elapsed().as_secs_f64() / 1e6)
}

/// The processes under test, stopped with SIGTERM (then waited for) in reverse start order.
struct Procs {
    children: Vec<Stopped>,
    broker: String,
    _metastore: Option<magnetar_metastore::local_cluster::LocalCluster>,
}

impl Drop for Procs {
    fn drop(&mut self) {
        while self.children.pop().is_some() {}
    }
}

fn spawn(dir: &std::path::Path, log: &str, args: &[String], env: &[(&str, &str)]) -> anyhow::Result<Stopped> {
    let log = std::fs::File::create(dir.join(log))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(args).stdout(log.try_clone()?).stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(Stopped(cmd.spawn()?))
}

async fn wait_port(addr: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(60), "{addr} did not open within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn start_standalone(dir: &std::path::Path) -> anyhow::Result<Procs> {
    let p = magnetar_metastore::local_cluster::free_ports(5)?;
    let addr = |i: usize| format!("127.0.0.1:{}", p[i]);
    let args: Vec<String> = vec![
        "standalone".into(),
        "--data-dir".into(),
        dir.join("data").display().to_string(),
        "--metastore-listen".into(),
        addr(0),
        "--bookie-listen".into(),
        addr(1),
        "--bookie-http".into(),
        addr(2),
        "--broker-listen".into(),
        addr(3),
        "--web-listen".into(),
        addr(4),
    ];
    let s = Procs { children: vec![spawn(dir, "standalone.log", &args, &[])?], broker: addr(3), _metastore: None };
    wait_port(&s.broker).await?;
    Ok(s)
}

/// A 3-node metastore, 3 bookies and a broker writing E=3, Qw=2, Qa=2.
async fn start_cluster(dir: &std::path::Path) -> anyhow::Result<Procs> {
    std::fs::create_dir_all(dir.join("meta"))?;
    let meta =
        magnetar_metastore::local_cluster::LocalCluster::start(&std::env::current_exe()?, &dir.join("meta"), 3, &[])?;
    meta.wait_for_leader(Duration::from_secs(30))
        .await
        .ok_or_else(|| anyhow::anyhow!("no metastore leader within 30 s"))?;
    let endpoints = meta.endpoints().join(",");
    let mut procs = Procs { children: Vec::new(), broker: String::new(), _metastore: None };
    let ports = magnetar_metastore::local_cluster::free_ports(7)?;
    for i in 0..3 {
        let d = dir.join(format!("bookie-{i}"));
        let args: Vec<String> = vec![
            "bookie".into(),
            "--bookie-id".into(),
            format!("bookie-{i}"),
            "--listen".into(),
            format!("127.0.0.1:{}", ports[2 * i]),
            "--http".into(),
            format!("127.0.0.1:{}", ports[2 * i + 1]),
            "--journal-dirs".into(),
            d.join("journal").display().to_string(),
            "--ledger-dir".into(),
            d.join("ledgers").display().to_string(),
            "--metastore".into(),
            endpoints.clone(),
        ];
        procs.children.push(spawn(dir, &format!("bookie-{i}.log"), &args, &[])?);
    }
    let probe = meta.client();
    let start = Instant::now();
    while probe.list("/bookies/available/").await.map(|v| v.len()).unwrap_or(0) < 3 {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(60), "the bookies did not register within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    procs.broker = format!("127.0.0.1:{}", ports[6]);
    let args: Vec<String> = vec![
        "broker".into(),
        "--listen".into(),
        procs.broker.clone(),
        "--metastore".into(),
        endpoints,
        "--web-listen".into(),
        "127.0.0.1:0".into(),
    ];
    let env = [
        ("managedLedgerDefaultEnsembleSize", "3"),
        ("managedLedgerDefaultWriteQuorum", "2"),
        ("managedLedgerDefaultAckQuorum", "2"),
    ];
    procs.children.push(spawn(dir, "broker.log", &args, &env)?);
    procs._metastore = Some(meta);
    wait_port(&procs.broker).await?;
    Ok(procs)
}

/// `magnetar perf broker`: a standalone (fsync on) as its own process, then publish cases at
/// 100 B and 1 KiB (unbatched, batched, one at a time) and end-to-end latency at half the
/// batched peak, next to the disk's fdatasync rate and loopback bandwidth of this machine.
pub async fn run_suite(a: BrokerPerf) -> anyhow::Result<()> {
    let base = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("magnetar-perf-broker-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let r = suite_in(&a, &dir).await;
    std::fs::remove_dir_all(&dir).ok();
    r
}

async fn suite_in(a: &BrokerPerf, dir: &std::path::Path) -> anyhow::Result<()> {
    let fsync = super::perf::fdatasync_rate(dir)?;
    let loopback = loopback_bandwidth().await?;
    println!("raw fdatasync rate: {fsync:.0}/s; loopback TCP: {loopback:.0} MB/s");
    let s = if a.cluster { start_cluster(dir).await? } else { start_standalone(dir).await? };
    let base = ProducePerf {
        url: s.broker.clone(),
        topic: String::new(),
        size: 1024,
        rate: 0.0,
        producers: 1,
        batch_max_messages: 1,
        batch_max_bytes: 128 * 1024,
        batch_delay_us: 1000,
        max_pending: 1000,
        duration: a.duration,
        warmup: a.warmup,
        consumers: 0,
        quiet: true,
    };
    let cases: Vec<(&str, ProducePerf)> = vec![
        ("100 B, unbatched, 1000 in flight", ProducePerf { size: 100, ..base.clone() }),
        ("1 KiB, unbatched, 1000 in flight", base.clone()),
        ("100 B, batched", ProducePerf { size: 100, batch_max_messages: 1000, max_pending: 20_000, ..base.clone() }),
        ("1 KiB, batched", ProducePerf { batch_max_messages: 1000, max_pending: 20_000, ..base.clone() }),
        ("1 KiB, one at a time", ProducePerf { max_pending: 1, ..base.clone() }),
    ];
    let mut rows = Vec::new();
    let mut batched_peak = 0.0;
    for (i, (name, mut p)) in cases.into_iter().enumerate() {
        p.topic = format!("perf-{i}");
        println!("{name} …");
        let steal = super::perf::Steal::start();
        let r = produce(&p).await?;
        println!("  {}", summary(&r));
        if name == "1 KiB, batched" {
            batched_peak = r.rate();
        }
        rows.push(row(name, &r, &steal));
    }
    // End-to-end at half the batched peak, with a consumer that keeps up.
    let p = ProducePerf {
        topic: "perf-e2e".into(),
        rate: (batched_peak / 2.0).max(1000.0),
        batch_max_messages: 1000,
        max_pending: 20_000,
        consumers: 1,
        ..base.clone()
    };
    // The disk alone at the same byte rate, just before: the floor under this case's latency.
    let disk = super::perf::disk_floor(dir, p.rate * p.size as f64).await?;
    println!("the disk alone at that byte rate: {}", disk.describe());
    println!("1 KiB, batched, at half the peak ({:.0} msg/s) with a consumer …", p.rate);
    let steal = super::perf::Steal::start();
    let probe = super::perf::WakeProbe::start()?;
    let r = produce(&p).await;
    let wake = probe.finish();
    let r = r?;
    println!("  {}", summary(&r));
    println!("  the CPU meanwhile: {}", wake.describe());
    rows.push(row("1 KiB, batched, half the peak rate + consumer", &r, &steal));
    let shortfall = rate_shortfall(p.rate, r.rate());
    if let Some(note) = &shortfall {
        println!("  {note}");
    }
    let catch_up = catch_up(&s.broker, &ProducePerf { topic: "perf-catch-up".into(), consumers: 0, ..p.clone() })
        .await
        .unwrap_or_else(|e| format!("The catch-up case failed: {e:#}."));
    println!("  {catch_up}");
    drop(s);
    let setup = if a.cluster {
        "Local cluster: 3 metastore nodes, 3 bookies and a broker, each its own process, ledgers \
         with E=3, Qw=2, Qa=2, all on one disk and the same 2 cores as the clients (fsync on)"
    } else {
        "Standalone (metastore, bookie and broker in one process, fsync on), clients in another \
         process on the same 2 cores"
    };
    let table = format!(
        "{setup}. Each case runs {} s after a {} s warm-up. Raw fdatasync rate {fsync:.0}/s; loopback TCP {loopback:.0} MB/s.\n\n\
         | case | msg/s | MB/s | publish p50 ms | publish p99 ms | end-to-end p50 ms | end-to-end p99 ms | host steal % |\n\
         |---|---|---|---|---|---|---|---|\n{}\n\n\
         The disk alone at the half-peak byte rate, measured just before that case: {}.\n\n\
         The CPU during that case (an idle thread's wake-ups, see `docs/benchmarks.md`): {}.\n\n{catch_up}\n{}",
        a.duration,
        a.warmup,
        rows.join("\n"),
        disk.describe(),
        wake.describe(),
        shortfall.map(|n| format!("\n{n}\n")).unwrap_or_default()
    );
    println!("{table}");
    if let Some(path) = &a.record {
        super::perf::record(path, if a.cluster { "perf-broker-cluster" } else { "perf-broker" }, &table)?;
        println!("recorded in {}", path.display());
    }
    Ok(())
}

/// A backlog published as `p` says (with a subscription whose consumer takes nothing yet),
/// then read back from the start for half the publishing time: how fast a consumer that fell
/// behind catches up, its entries long gone from the tail cache.
async fn catch_up(broker: &str, p: &ProducePerf) -> anyhow::Result<String> {
    println!("1 KiB, batched, a backlog published at {:.0} msg/s, then read back …", p.rate);
    let c = Client::connect_for(&addr(broker), &p.topic).await?;
    let consumer = c.subscribe(&p.topic, "perf-catch-up", pb::command_subscribe::SubType::Exclusive, false).await?;
    let backlog = produce(p).await?;
    let window = Duration::from_secs((p.duration / 2).max(1));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let start = Instant::now();
    let reader = tokio::spawn(consume_loop(consumer, tx, start + window));
    let mut read = 0u64;
    while let Some(ev) = rx.recv().await {
        if let Event::Consumed { lat } = ev {
            read += lat.len() as u64;
        }
    }
    // The backlog (the warm-up's messages too) outlasts the window at the rates measured so
    // far; one read to its end early would make the rate read low.
    let secs = start.elapsed().as_secs_f64().min(window.as_secs_f64());
    let consumer = reader.await??;
    if let Err(e) = c.unsubscribe(&consumer).await {
        eprintln!("removing subscription perf-catch-up failed: {e}");
    }
    Ok(format!(
        "A consumer catching up on a backlog (published at {:.0} msg/s; {} messages in the measured {} s) read {:.0} msg/s ({:.1} MB/s) over its first {:.0} s, from the bookies.",
        backlog.rate(),
        backlog.published,
        p.duration,
        read as f64 / secs,
        read as f64 * p.size as f64 / secs / 1e6,
        secs
    ))
}

/// A note when a paced case published well under the rate it was given (the load generator
/// fell behind on the shared cores, or sends failed): its latencies are those of a lighter load.
fn rate_shortfall(asked: f64, reached: f64) -> Option<String> {
    (reached < asked * 0.95).then(|| {
        format!(
            "The half-peak case was asked for {asked:.0} msg/s and published {reached:.0} msg/s \
             ({:.0}%), so its latencies are those of a lighter load than half the peak.",
            100.0 * reached / asked
        )
    })
}

fn row(name: &str, r: &Report, steal: &super::perf::Steal) -> String {
    let (e50, e99) = match &r.e2e {
        Some(h) => (format!("{:.2}", pct(h, 0.5)), format!("{:.2}", pct(h, 0.99))),
        None => ("–".into(), "–".into()),
    };
    format!(
        "| {name} | {:.0} | {:.1} | {:.2} | {:.2} | {e50} | {e99} | {} |",
        r.rate(),
        r.mbps(),
        pct(&r.publish, 0.5),
        pct(&r.publish, 0.99),
        steal.cell()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paced_case_that_fell_behind_says_so() {
        assert_eq!(rate_shortfall(200_000.0, 199_000.0), None);
        assert_eq!(rate_shortfall(200_000.0, 190_001.0), None);
        let note = rate_shortfall(229_196.0, 138_333.0).unwrap_or_default();
        assert!(note.contains("229196 msg/s") && note.contains("138333 msg/s") && note.contains("(60%)"), "{note}");
    }
}
