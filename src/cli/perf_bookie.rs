//! `magnetar perf bookie`: add throughput and latency of a bookie with fsync on, through the
//! ledger client (E = Qw = Qa = 1), printed next to the raw fdatasync rate and the fdatasync'd
//! sequential write bandwidth of the same disk, measured in the same run.
//!
//! A single-node metastore runs in this process and a bookie (`magnetar bookie`) in a child
//! process, both over `--dir`, which should be on the disk to measure.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use futures::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use magnetar_bookie::client::{LedgerClient, LedgerConfig, LedgerOptions, LedgerWriter};
use magnetar_metastore::client::MetaClient;
use magnetar_metastore::server::MetastoreNode;
use magnetar_metastore::MetastoreConfig;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::perf::{
    disk_floor, fdatasync_rate, latency_histogram, record, written_file, DiskLatency, Steal, Stopped, WakeDelay,
    WakeProbe,
};

#[derive(Args, Debug)]
pub struct BookiePerf {
    /// Seconds per phase.
    #[arg(long, default_value_t = 8)]
    duration: u64,
    /// Entry sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "100,1024,65536")]
    sizes: Vec<usize>,
    /// Adds in flight for the throughput phases (large entries use fewer: see
    /// `--in-flight-mib`).
    #[arg(long, default_value_t = 2000)]
    in_flight: usize,
    /// Most payload bytes in flight for the throughput phases (MiB).
    #[arg(long = "in-flight-mib", default_value_t = 16)]
    in_flight_mib: usize,
    /// Seconds of full load before each entry size's phases, and of paced load before the
    /// paced phase, not measured. A young journal is still growing its pool of recycled
    /// segments, and after full load the entry store is still flushing (see
    /// `docs/benchmarks.md`).
    #[arg(long = "warmup-time", default_value_t = 3)]
    warmup: u64,
    /// The paced phase runs at this fraction of the measured maximum.
    #[arg(long, default_value_t = 0.5)]
    paced_fraction: f64,
    /// Directory on the disk to measure (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Bookie settings for the run, as dotted.key=value (repeatable), e.g. journal.sync=false.
    #[arg(long = "bookie-set", value_name = "KEY=VALUE")]
    bookie_set: Vec<String>,
    /// Write the results into this markdown file (section `perf-bookie`).
    #[arg(long)]
    record: Option<PathBuf>,
    /// After each paced phase, list its 50-ms windows (by when adds were issued) whose slowest
    /// add took over this many ms: where in the phase the tail sits.
    #[arg(long, value_name = "MS")]
    timeline: Option<f64>,
}

struct Result1 {
    size: usize,
    label: String,
    adds: u64,
    secs: f64,
    hist: Histogram<u64>,
    /// Host steal during the phase, as a table cell.
    steal: String,
}

impl Result1 {
    fn rate(&self) -> f64 {
        self.adds as f64 / self.secs
    }
    fn line(&self) -> String {
        let us = |q: f64| self.hist.value_at_quantile(q) as f64 / 1000.0;
        format!(
            "| {} B | {} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {} |",
            self.size,
            self.label,
            self.rate(),
            self.rate() * self.size as f64 / 1e6,
            us(0.5),
            us(0.99),
            us(0.999),
            self.steal
        )
    }
}

/// The paced phase's load as a share of `of`: "half of max" at the default fraction.
fn paced_label(fraction: f64, of: &str) -> String {
    if (fraction - 0.5).abs() < 1e-9 {
        format!("half of {of}")
    } else {
        format!("{:.0}% of {of}", fraction * 100.0)
    }
}

/// fdatasync'd sequential write bandwidth (MB/s): 1 MiB overwrites of an already written file,
/// each followed by fdatasync, the way the journal writes its preallocated segments.
fn sequential_bandwidth(dir: &Path) -> anyhow::Result<f64> {
    let size: u64 = 256 << 20;
    let chunk = vec![7u8; 1 << 20];
    // Kept for the second probe and removed with the run's directory: see
    // [`super::perf::paced_fdatasync`] on discards.
    let f = written_file(&dir.join("seq-probe"), size).context("preparing the bandwidth probe")?;
    let start = Instant::now();
    let mut written = 0u64;
    while start.elapsed() < Duration::from_secs(3) {
        f.write_all_at(&chunk, written % size)?;
        f.sync_data()?;
        written += chunk.len() as u64;
    }
    Ok(written as f64 / 1e6 / start.elapsed().as_secs_f64())
}

/// As many adds as `window` allows in flight, for `dur`.
async fn saturate(w: &LedgerWriter, payload: Bytes, window: usize, dur: Duration) -> (u64, f64, Histogram<u64>) {
    let mut hist = latency_histogram();
    let mut inflight = FuturesUnordered::new();
    let start = Instant::now();
    let mut done = 0u64;
    loop {
        let running = start.elapsed() < dur;
        while running && inflight.len() < window {
            let t = Instant::now();
            let f = w.append(payload.clone());
            inflight.push(async move { (f.await, t.elapsed()) });
        }
        match inflight.next().await {
            Some((Ok(_), lat)) => {
                done += 1;
                let _ = hist.record(lat.as_nanos() as u64);
            }
            Some((Err(e), _)) => {
                eprintln!("add failed: {e}");
                break;
            }
            None => break,
        }
    }
    (done, start.elapsed().as_secs_f64(), hist)
}

/// Adds at a fixed rate, for `dur`. A thread of its own wakes the loop every
/// [`PACE_SLICE`] to issue the adds then due: tokio's timer ticks at 1 ms at the finest, and
/// a millisecond's adds issued at once are a burst that a client sending at a steady rate
/// (as `pulsar-perf`'s rate limiter does) never makes.
async fn paced(
    w: &LedgerWriter,
    payload: Bytes,
    rate: f64,
    dur: Duration,
    timeline: Option<f64>,
) -> anyhow::Result<(u64, f64, Histogram<u64>)> {
    // Latency is taken in the add's callback, when the ledger client confirms it (as
    // BookKeeper's own benchmark takes it), not when this task next gets to run.
    let outcomes = Arc::new(std::sync::Mutex::new(Outcomes {
        hist: latency_histogram(),
        done: 0,
        answered: 0,
        windows: Windows::default(),
    }));
    let answered = Arc::new(Notify::new());
    let pacer = Pacer::start(PACE_SLICE).context("starting the pacing thread")?;
    let start = Instant::now();
    let began = std::time::SystemTime::now();
    let mut issued = 0u64;
    while start.elapsed() < dur {
        pacer.tick.notified().await;
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        while issued < due {
            let t = Instant::now();
            let (outcomes, answered) = (outcomes.clone(), answered.clone());
            w.append_with(payload.clone(), move |r| {
                let lat = t.elapsed();
                let mut o = outcomes.lock().unwrap_or_else(|e| e.into_inner());
                if r.is_ok() {
                    o.done += 1;
                    let _ = o.hist.record(lat.as_nanos() as u64);
                    o.windows.add(t - start, lat);
                }
                o.answered += 1;
                answered.notify_one();
            });
            issued += 1;
        }
    }
    drop(pacer);
    loop {
        let notified = answered.notified();
        if outcomes.lock().unwrap_or_else(|e| e.into_inner()).answered >= issued {
            break;
        }
        notified.await;
    }
    let secs = start.elapsed().as_secs_f64();
    let o = outcomes.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(ms) = timeline {
        print!("  the phase began at {} UTC\n{}", clock(began), o.windows.describe(Duration::from_secs_f64(ms / 1e3)));
    }
    Ok((o.done, secs, o.hist.clone()))
}

/// `t` as the UTC time of day (`HH:MM:SS.mmm`), to match the timeline with the bookie's log.
fn clock(t: std::time::SystemTime) -> String {
    let ms = t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis()) % 86_400_000;
    format!("{:02}:{:02}:{:02}.{:03}", ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000)
}

/// What the paced phase's callbacks gathered.
struct Outcomes {
    hist: Histogram<u64>,
    /// Confirmed adds.
    done: u64,
    /// Adds answered either way.
    answered: u64,
    windows: Windows,
}

/// Confirmed adds per [`WINDOW`] of the phase, by when they were issued: (adds, adds over
/// [`SLOW`], the slowest).
#[derive(Default)]
struct Windows(Vec<(u64, u64, Duration)>);

/// The span of a [`Windows`] entry.
const WINDOW: Duration = Duration::from_millis(50);
/// What [`Windows`] counts as slow: the bookie's latency target.
const SLOW: Duration = Duration::from_millis(2);

impl Windows {
    fn add(&mut self, issued: Duration, lat: Duration) {
        let i = (issued.as_micros() / WINDOW.as_micros()) as usize;
        if self.0.len() <= i {
            self.0.resize(i + 1, (0, 0, Duration::ZERO));
        }
        let w = &mut self.0[i];
        w.0 += 1;
        w.1 += u64::from(lat > SLOW);
        w.2 = w.2.max(lat);
    }

    /// The share of adds over [`SLOW`] and the windows whose slowest add took over `over`.
    fn describe(&self, over: Duration) -> String {
        let adds: u64 = self.0.iter().map(|w| w.0).sum();
        let slow: u64 = self.0.iter().map(|w| w.1).sum();
        let worst: Vec<_> = self.0.iter().enumerate().filter(|(_, w)| w.2 > over).collect();
        let mut out = format!(
            "  timeline: {slow} of {adds} adds over {} ms ({:.1}%); {} of {} windows of {} ms had an add over {} ms\n",
            SLOW.as_millis(),
            100.0 * slow as f64 / adds.max(1) as f64,
            worst.len(),
            self.0.len(),
            WINDOW.as_millis(),
            over.as_secs_f64() * 1e3,
        );
        for (i, w) in worst {
            let from = i as u128 * WINDOW.as_millis();
            out.push_str(&format!(
                "    {from:>6} ms: {} adds, {} over {} ms, slowest {:.1} ms\n",
                w.0,
                w.1,
                SLOW.as_millis(),
                w.2.as_secs_f64() * 1e3
            ));
        }
        out
    }
}

/// How often the paced load issues the adds due.
const PACE_SLICE: Duration = Duration::from_micros(100);

/// A thread that notifies `tick` about every slice (a sleep's overshoot added) until dropped.
struct Pacer {
    tick: Arc<Notify>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pacer {
    fn start(slice: Duration) -> std::io::Result<Pacer> {
        let tick = Arc::new(Notify::new());
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (tick.clone(), stop.clone());
        let thread = std::thread::Builder::new().name("perf-pacer".into()).spawn(move || {
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(slice);
                t.notify_one();
            }
        })?;
        Ok(Pacer { tick, stop, thread: Some(thread) })
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub async fn run(a: BookiePerf) -> anyhow::Result<()> {
    let base = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("magnetar-perf-bookie-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let r = run_in(&a, &dir).await;
    std::fs::remove_dir_all(&dir).ok();
    r
}

async fn run_in(a: &BookiePerf, dir: &Path) -> anyhow::Result<()> {
    println!("measuring the disk: raw fdatasync rate and fdatasync'd sequential bandwidth …");
    let fsync_rate = fdatasync_rate(dir)?;
    let seq_mbs = sequential_bandwidth(dir)?;
    println!("raw fdatasync rate (4 KiB appends): {fsync_rate:.0}/s; sequential write with fdatasync per MiB: {seq_mbs:.0} MB/s");

    let shutdown = CancellationToken::new();
    let meta_port = magnetar_metastore::local_cluster::free_ports(1)?[0];
    let meta_addr = format!("127.0.0.1:{meta_port}");
    let mcfg = MetastoreConfig {
        node_id: 1,
        listen_addr: meta_addr.clone(),
        data_dir: dir.join("metastore"),
        initial_members: vec![format!("1={meta_addr}")],
        ..Default::default()
    };
    let node = MetastoreNode::start(mcfg, shutdown.clone()).await?;
    // The bookie runs as its own process, as in a deployment.
    let ports = magnetar_metastore::local_cluster::free_ports(2)?;
    let (bport, http) = (ports[0], format!("127.0.0.1:{}", ports[1]));
    let log = std::fs::File::create(dir.join("bookie.log"))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("bookie")
        .args(["--bookie-id", "perf-bookie", "--listen", &format!("127.0.0.1:{bport}"), "--http", &http])
        .arg("--journal-dirs")
        .arg(dir.join("journal"))
        .arg("--ledger-dir")
        .arg(dir.join("ledgers"))
        .args(["--metastore", &meta_addr])
        .stdout(log.try_clone()?)
        .stderr(log);
    for kv in &a.bookie_set {
        cmd.args(["--set", kv]);
    }
    let mut child = Stopped(cmd.spawn().context("starting the bookie process")?);
    let probe = MetaClient::connect(std::slice::from_ref(&meta_addr))?;
    let ready = Instant::now();
    while probe.get("/bookies/available/perf-bookie").await?.is_none() {
        if let Some(status) = child.0.try_wait()? {
            anyhow::bail!("the bookie exited with {status}; see {}", dir.join("bookie.log").display());
        }
        if ready.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("the bookie did not register within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let meta = MetaClient::connect(&[meta_addr])?;
    let client = LedgerClient::new(meta, LedgerOptions::default());
    let dur = Duration::from_secs(a.duration);

    let mut results = Vec::new();
    let mut server_p99: Vec<(usize, f64)> = Vec::new();
    let mut disks: Vec<(usize, DiskLatency)> = Vec::new();
    let mut wakes: Vec<(usize, WakeDelay)> = Vec::new();
    // Probed just before the 64 KiB phases.
    let mut seq_near: Option<f64> = None;
    let phases = async {
        for &size in &a.sizes {
            // Incompressible bytes: compressible ones would flatter the entry store's LZ4.
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ size as u64;
            let payload = Bytes::from(
                (0..size)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect::<Vec<u8>>(),
            );
            let window = a.in_flight.min(((a.in_flight_mib << 20) / size.max(1)).max(16));
            // The disk's speed drifts over minutes on shared machines: 64 KiB entries are compared
            // with the better of the run's first probe and one taken just before their phases.
            if size == 65536 {
                let mbs = sequential_bandwidth(dir)?;
                println!("{size} B: sequential write with fdatasync per MiB just before: {mbs:.0} MB/s");
                seq_near = Some(mbs);
            }
            let w = client.create(LedgerConfig::new(1, 1, 1)).await?;
            // Warm up (segment preallocation, connections).
            let _ = saturate(&w, payload.clone(), window, Duration::from_secs(a.warmup)).await;
            println!("{size} B: {window} adds in flight for {} s …", a.duration);
            let steal = Steal::start();
            let (adds, secs, hist) = saturate(&w, payload.clone(), window, dur).await;
            let max = Result1 { size, label: "max".into(), adds, secs, hist, steal: steal.cell() };
            println!("  {}", max.line());
            let half = max.rate() * a.paced_fraction;
            // The disk alone at the same byte rate, just before the paced load: the floor under
            // the paced phase.
            let disk = disk_floor(dir, half * size as f64).await?;
            println!("{size} B: the disk alone at the same byte rate: {}", disk.describe());
            disks.push((size, disk));
            // The paced phase measures a bookie settled at that load: after full load, the entry
            // store is still flushing a backlog for a second or two (and slows writes meanwhile),
            // and load resuming after the disk probe's seconds of idleness backs adds up for a few
            // hundred milliseconds (see `docs/benchmarks.md`). The warm-up at the paced rate comes
            // last, right before the measured phase.
            paced(&w, payload.clone(), half, Duration::from_secs(a.warmup), None).await?;
            println!("{size} B: paced at {half:.0}/s …");
            let before = server_latency_buckets(&http).await;
            let steal = Steal::start();
            let probe = WakeProbe::start()?;
            let (adds, secs, hist) = paced(&w, payload.clone(), half, dur, a.timeline).await?;
            let wake = probe.finish();
            println!("  the CPU meanwhile: {}", wake.describe());
            wakes.push((size, wake));
            if let (Some(b), Some(a2)) = (before, server_latency_buckets(&http).await) {
                if let Some(ms) = bucket_quantile(&b, &a2, 0.99) {
                    println!("  bookie-side p99 (receipt to durable ack): <= {ms} ms");
                    server_p99.push((size, ms));
                }
            }
            let paced =
                Result1 { size, label: paced_label(a.paced_fraction, "max"), adds, secs, hist, steal: steal.cell() };
            println!("  {}", paced.line());
            println!("{size} B: one add at a time …");
            let steal = Steal::start();
            let (adds, secs, hist) = saturate(&w, payload, 1, Duration::from_secs(a.duration.min(3))).await;
            let one = Result1 { size, label: "1 in flight".into(), adds, secs, hist, steal: steal.cell() };
            println!("  {}", one.line());
            w.close().await?;
            results.push(max);
            results.push(paced);
            results.push(one);
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = phases {
        if bookie_read_only(&http).await {
            return Err(e.context(
                "the bookie went read-only: its disk passed `disk_usage_threshold` (95% used by default), and \
                 the run keeps every ledger it writes (tens of GB at full speed); free some space, or raise \
                 the threshold for the run with --bookie-set disk_usage_threshold=0.99",
            ));
        }
        return Err(e);
    }
    drop(child);
    shutdown.cancel();
    node.stop().await;

    let mut table = format!(
        "One bookie process (journal and entry store on the same disk, fdatasync on), ledger E=Qw=Qa=1 \
         through the ledger client from another process on the same machine; {} s per phase.\n\
         Disk limits measured in the same run: raw fdatasync rate **{fsync_rate:.0}/s** (4 KiB appends), \
         fdatasync'd sequential write bandwidth **{seq_mbs:.0} MB/s** (1 MiB writes).\n\n\
         | entry | load | adds/s | MB/s | p50 µs | p99 µs | p99.9 µs | host steal % |\n|---|---|---|---|---|---|---|---|\n",
        a.duration
    );
    for r in &results {
        table.push_str(&r.line());
        table.push('\n');
    }
    let find = |size: usize| results.iter().find(|r| r.size == size && r.label == "max");
    table.push('\n');
    if let Some(r) = find(1024) {
        table.push_str(&format!(
            "- 1 KiB adds at full load: **{:.1}x** the raw one-fsync-per-write rate (target: 15x).\n",
            r.rate() / fsync_rate
        ));
    }
    if let Some(r) = find(65536) {
        let near = seq_near.unwrap_or(0.0);
        let best = seq_mbs.max(near);
        table.push_str(&format!(
            "- 64 KiB adds at full load: **{:.0}%** of the fdatasync'd sequential bandwidth (target: 50%), \
             against the better of the run's first probe and one just before the 64 KiB phases \
             ({near:.0} MB/s): {best:.0} MB/s.\n",
            100.0 * r.rate() * 65536.0 / 1e6 / best
        ));
    }
    let (paced_load, paced_row) = (paced_label(a.paced_fraction, "full load"), paced_label(a.paced_fraction, "max"));
    for r in results.iter().filter(|r| r.label == paced_row) {
        table.push_str(&format!(
            "- {} B at {paced_load}: p99 add latency {:.2} ms (target at half of full load: under 2 ms).\n",
            r.size,
            r.hist.value_at_quantile(0.99) as f64 / 1e6
        ));
    }
    for (size, d) in &disks {
        table.push_str(&format!(
            "- {size} B at {paced_load}, the disk alone at the same byte rate (measured just before the paced warm-up): {}.\n",
            d.describe()
        ));
    }
    for (size, w) in &wakes {
        table.push_str(&format!(
            "- {size} B at {paced_load}, the CPU during that phase (an idle thread's wake-ups, see \
             `docs/benchmarks.md`): {}.\n",
            w.describe()
        ));
    }
    for (size, ms) in &server_p99 {
        table.push_str(&format!(
            "- {size} B at {paced_load}, bookie side only (`bookkeeper_server_ADD_ENTRY_REQUEST`, receipt to \
             durable ack): p99 within the {ms} ms bucket.\n"
        ));
    }
    println!("\n{table}");
    if let Some(path) = &a.record {
        record(path, "perf-bookie", &table)?;
        println!("recorded in {}", path.display());
    }
    Ok(())
}

/// The bookie's add-latency histogram buckets (`le` in ms → cumulative count) from `/metrics`.
/// Whether the bookie at `http` says it is read-only (`/api/v1/bookie/state`).
async fn bookie_read_only(http: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(http).await else { return false };
    let get = format!("GET /api/v1/bookie/state HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n");
    let mut body = String::new();
    if s.write_all(get.as_bytes()).await.is_err() || s.read_to_string(&mut body).await.is_err() {
        return false;
    }
    body.split_once("\r\n\r\n")
        .and_then(|(_, json)| serde_json::from_str::<serde_json::Value>(json).ok())
        .is_some_and(|v| v["readOnly"] == true)
}

async fn server_latency_buckets(http: &str) -> Option<Vec<(f64, f64)>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(http).await.ok()?;
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    let prefix = "bookkeeper_server_ADD_ENTRY_REQUEST_bucket{le=\"";
    let buckets = body
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|l| {
            let (le, rest) = l.split_once("\"} ")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, rest.trim().parse().ok()?))
        })
        .collect::<Vec<(f64, f64)>>();
    (!buckets.is_empty()).then_some(buckets)
}

/// Upper bound of the bucket holding quantile `q` of the observations between two scrapes.
fn bucket_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let deltas: Vec<(f64, f64)> = after.iter().zip(before).map(|((le, a), (_, b))| (*le, a - b)).collect();
    let total = deltas.last()?.1;
    if total <= 0.0 {
        return None;
    }
    deltas.iter().find(|(_, c)| *c >= q * total).map(|(le, _)| *le)
}

#[cfg(test)]
mod tests {
    use super::{bookie_read_only, clock, paced_label, Windows};
    use std::time::Duration;

    /// Serves one HTTP request with `body` as JSON; the address.
    async fn one_answer(body: &'static str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req).await;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(answer.as_bytes()).await;
        });
        addr
    }

    /// A run that fails is explained when the bookie says it went read-only (its state
    /// endpoint), and only then.
    #[tokio::test]
    async fn a_read_only_bookie_is_recognised() {
        assert!(bookie_read_only(&one_answer(r#"{"running":true,"readOnly":true}"#).await).await);
        assert!(!bookie_read_only(&one_answer(r#"{"running":true,"readOnly":false}"#).await).await);
        assert!(!bookie_read_only(&one_answer("not json").await).await);
    }

    /// Adds land in the window they were issued in; only windows with an add over the bound
    /// are listed, and the share of slow adds counts every window.
    #[test]
    fn the_timeline_lists_the_windows_holding_slow_adds() {
        let mut w = Windows::default();
        let ms = Duration::from_millis;
        w.add(ms(10), ms(1));
        w.add(ms(20), ms(1));
        w.add(ms(120), ms(30));
        w.add(ms(130), ms(3));
        let text = w.describe(ms(10));
        assert!(
            text.contains("2 of 4 adds over 2 ms (50.0%); 1 of 3 windows of 50 ms had an add over 10 ms"),
            "{text}"
        );
        assert!(text.contains("100 ms: 2 adds, 2 over 2 ms, slowest 30.0 ms"), "{text}");
        assert!(!text.contains("    0 ms:"), "{text}");
    }

    /// The phase's start is printed as the UTC time of day the bookie's log uses.
    #[test]
    fn the_phase_start_reads_as_a_utc_time_of_day() {
        let t = std::time::UNIX_EPOCH + Duration::from_millis(3 * 86_400_000 + 3_723_004);
        assert_eq!(clock(t), "01:02:03.004");
    }

    /// The paced phase is named after the fraction it ran at, so a run at a quarter of the
    /// maximum is not reported as one at half.
    #[test]
    fn the_paced_phase_is_named_after_its_fraction() {
        assert_eq!(paced_label(0.5, "max"), "half of max");
        assert_eq!(paced_label(0.25, "max"), "25% of max");
        assert_eq!(paced_label(0.1, "full load"), "10% of full load");
    }
}
