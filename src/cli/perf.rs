//! `magnetar perf …`: benchmarks that print their figures next to the machine's physical limits
//! measured in the same run, and record them in `docs/benchmarks.md`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use magnetar_metastore::client::{MetaClient, PutOptions};
use magnetar_metastore::local_cluster::LocalCluster;

#[derive(Args, Debug)]
pub struct PerfArgs {
    #[command(subcommand)]
    cmd: PerfCmd,
}

#[derive(Subcommand, Debug)]
enum PerfCmd {
    /// Metastore put/get throughput and latency on a local cluster of real processes.
    Meta(MetaPerf),
    /// Bookie add throughput and latency (fsync on), next to the disk's own limits.
    Bookie(super::perf_bookie::BookiePerf),
    /// Publish to a broker (like pulsar-perf produce): rate, size, producers, batching,
    /// optional consumers for end-to-end latency.
    Produce(super::perf_broker::ProducePerf),
    /// Consume from a broker and report rates and end-to-end latency.
    Consume(super::perf_broker::ConsumePerf),
    /// The standard broker benchmark on a standalone started for it.
    Broker(super::perf_broker::BrokerPerf),
}

#[derive(Args, Debug)]
struct MetaPerf {
    /// Cluster size (1 or 3+).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Seconds per phase.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Concurrent requests in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 128)]
    value_size: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// Write the results into this markdown file (the section between the
    /// `perf-meta-<nodes>x<concurrency>` markers).
    #[arg(long)]
    record: Option<PathBuf>,
    /// Measure an already running cluster (host:port,…) instead of starting one.
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
}

pub async fn run(a: PerfArgs) -> anyhow::Result<()> {
    match a.cmd {
        PerfCmd::Meta(m) => meta(m).await,
        PerfCmd::Bookie(b) => super::perf_bookie::run(b).await,
        PerfCmd::Produce(p) => super::perf_broker::run_produce(p).await,
        PerfCmd::Consume(c) => super::perf_broker::run_consume(c).await,
        PerfCmd::Broker(b) => super::perf_broker::run_suite(b).await,
    }
}

struct Phase {
    name: &'static str,
    ops: u64,
    errors: u64,
    secs: f64,
    hist: Histogram<u64>,
}

impl Phase {
    fn line(&self) -> String {
        let us = |q: f64| self.hist.value_at_quantile(q) as f64 / 1000.0;
        format!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {} |",
            self.name,
            self.ops as f64 / self.secs,
            us(0.5),
            us(0.99),
            us(0.999),
            self.errors
        )
    }
}

/// fdatasync'd 4 KiB appends per second on the disk holding `dir`: one client write per fsync
/// is the ceiling a system without batching could reach.
pub(super) fn fdatasync_rate(dir: &Path) -> anyhow::Result<f64> {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).context("creating the fsync probe")?;
    let buf = vec![0u8; 4096];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        f.write_all(&buf)?;
        f.sync_data()?;
        n += 1;
    }
    // The file stays until the run's directory is removed: see [`paced_fdatasync`] on discards.
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// A process under test, stopped (SIGTERM, then waited for) however the run ends.
pub(super) struct Stopped(pub std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let _ = self.0.wait();
    }
}

/// The share of the machine's CPU time the host took (steal) over a stretch of a benchmark: on
/// a shared virtual machine, a run during which the host takes a large share measures the host
/// more than the code, so each phase reports it.
pub(super) struct Steal(Option<(u64, u64)>);

impl Steal {
    /// Starts measuring.
    pub(super) fn start() -> Self {
        Steal(cpu_times())
    }

    /// Percent of CPU time stolen since [`Steal::start`]; `None` without `/proc/stat`.
    pub(super) fn percent(&self) -> Option<f64> {
        let ((t0, s0), (t1, s1)) = (self.0?, cpu_times()?);
        (t1 > t0).then(|| 100.0 * s1.saturating_sub(s0) as f64 / (t1 - t0) as f64)
    }

    /// [`Steal::percent`] for a table cell.
    pub(super) fn cell(&self) -> String {
        self.percent().map_or_else(|| "–".into(), |p| format!("{p:.0}"))
    }
}

/// How late a thread that only sleeps wakes up, sampled beside a latency phase: the CPU's floor
/// under that phase's latency, as [`paced_fdatasync`] is the disk's. The thread sleeps
/// [`WakeProbe::NAP`] at a time and records how much longer each sleep took. On an idle machine
/// that is tens of microseconds. When the host leaves a virtual CPU unscheduled (steal), or
/// the machine's cores are all busy, it is milliseconds, and whatever ran or was woken on that
/// CPU meanwhile (a journal thread, a connection task, the load generator) waited as long.
pub(super) struct WakeProbe {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<WakeDelay>>,
}

impl WakeProbe {
    /// The probe's sleep.
    pub const NAP: Duration = Duration::from_micros(500);

    /// Starts the probe thread.
    pub(super) fn start() -> anyhow::Result<Self> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("perf-wake-probe".into()).spawn(move || {
            let start = Instant::now();
            let mut late = Vec::with_capacity(64 * 1024);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                std::thread::sleep(Self::NAP);
                late.push(t.elapsed().saturating_sub(Self::NAP));
            }
            WakeDelay::from_samples(&late, start.elapsed())
        })?;
        Ok(WakeProbe { stop, thread: Some(thread) })
    }

    /// Stops the probe and summarizes what it saw.
    pub(super) fn finish(mut self) -> WakeDelay {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default()
    }
}

impl Drop for WakeProbe {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a [`WakeProbe`] saw.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct WakeDelay {
    pub samples: usize,
    /// How late a wake-up was, in ms.
    pub p99: f64,
    pub max: f64,
    /// Wake-ups more than [`WakeDelay::STALL`] late.
    pub stalls: usize,
    /// The share of the stretch (percent) those stalls covered.
    pub stalled_pct: f64,
}

impl WakeDelay {
    /// A wake-up this late counts as a stall: as late as the 2 ms the latency targets allow.
    pub const STALL: Duration = Duration::from_millis(2);

    /// Summarizes how late each wake-up was over a stretch of `secs`.
    pub(super) fn from_samples(late: &[Duration], secs: Duration) -> Self {
        if late.is_empty() {
            return WakeDelay::default();
        }
        let mut sorted = late.to_vec();
        sorted.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let at = |q: f64| sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1];
        let stalled: Vec<Duration> = late.iter().copied().filter(|d| *d > Self::STALL).collect();
        let stalled_sum: Duration = stalled.iter().sum();
        WakeDelay {
            samples: late.len(),
            p99: ms(at(0.99)),
            max: ms(sorted[sorted.len() - 1]),
            stalls: stalled.len(),
            stalled_pct: if secs.is_zero() { 0.0 } else { 100.0 * stalled_sum.as_secs_f64() / secs.as_secs_f64() },
        }
    }

    /// One line for a benchmark table.
    pub fn describe(&self) -> String {
        format!(
            "a thread sleeping {} ms at a time woke late by p99 {:.2} ms, max {:.1} ms; {} wake-ups more than \
             {} ms late, covering {:.1}% of the phase",
            WakeProbe::NAP.as_secs_f64() * 1e3,
            self.p99,
            self.max,
            self.stalls,
            Self::STALL.as_millis(),
            self.stalled_pct
        )
    }
}

/// Total and stolen CPU time (clock ticks) of the machine, from `/proc/stat`.
fn cpu_times() -> Option<(u64, u64)> {
    parse_cpu_times(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// The first line of `/proc/stat`: `cpu user nice system idle iowait irq softirq steal guest
/// guest_nice`; guest time is already counted in user time.
fn parse_cpu_times(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    Some((v.iter().sum(), *v.get(7)?))
}

/// A latency histogram in nanoseconds, 1 ns to 60 s, 3 significant digits.
pub(super) fn latency_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("static bounds are valid")
}

/// How the disk alone answers a paced write load: see [`paced_fdatasync`].
#[derive(Clone, Copy, Debug)]
pub(super) struct DiskLatency {
    /// Bytes per write.
    pub write_bytes: usize,
    /// Writes per second achieved.
    pub rate: f64,
    /// Latency of one write plus its fdatasync, in ms.
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl DiskLatency {
    /// One line for a benchmark table.
    pub fn describe(&self) -> String {
        format!(
            "{} KiB write + fdatasync at {:.0}/s ({:.0} MB/s): p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
            self.write_bytes / 1024,
            self.rate,
            self.rate * self.write_bytes as f64 / 1e6,
            self.p50,
            self.p99,
            self.max
        )
    }
}

/// The floor under a durable write's latency on the disk holding `dir` at `bytes_per_sec`:
/// one write plus fdatasync per millisecond (the journal's default group wait) carrying that
/// millisecond's bytes (rounded up to 4 KiB), for `dur`, into an already written file (as the
/// journal reuses its preallocated segments). An add that waits for an fdatasync cannot beat
/// this at the same byte rate, and a tail here (other tenants of a shared disk) shows up in
/// every durable latency measured around it.
///
/// The probe file stays in `dir` and is reused by the next call; the benchmark removes it
/// with its directory at the end. Removing it here would free its blocks just before the
/// measured phase, and on a file system mounted with online discard the disk then spends
/// tens of milliseconds discarding them while that phase runs.
pub(super) fn paced_fdatasync(dir: &Path, bytes_per_sec: f64, dur: Duration) -> anyhow::Result<DiskLatency> {
    anyhow::ensure!(bytes_per_sec >= 1.0, "the disk probe needs a byte rate, got {bytes_per_sec}");
    use std::os::unix::fs::FileExt;
    let write_bytes = ((bytes_per_sec / 1000.0 / 4096.0).ceil() as usize).max(1) * 4096;
    let writes_in_file = ((64u64 << 20) / write_bytes as u64).max(1);
    let chunk: Vec<u8> = (0..write_bytes).map(|i| (i * 131 + 7) as u8).collect();
    let f = written_file(&dir.join("latency-probe"), writes_in_file * write_bytes as u64)
        .context("preparing the disk latency probe")?;
    let per_sec = (bytes_per_sec / write_bytes as f64).min(1000.0);
    let mut hist = latency_histogram();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        let due = start + Duration::from_secs_f64(n as f64 / per_sec);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let t = Instant::now();
        f.write_all_at(&chunk, (n % writes_in_file) * write_bytes as u64)?;
        f.sync_data()?;
        let _ = hist.record(t.elapsed().as_nanos().max(1) as u64);
        n += 1;
    }
    let ms = |v: u64| v as f64 / 1e6;
    Ok(DiskLatency {
        write_bytes,
        rate: n as f64 / start.elapsed().as_secs_f64(),
        p50: ms(hist.value_at_quantile(0.5)),
        p99: ms(hist.value_at_quantile(0.99)),
        max: ms(hist.max()),
    })
}

/// Opens `path` with at least `size` bytes written and durable: written in full (with
/// fdatasync) the first time, reused as it is afterwards. Overwriting written blocks is what
/// the disk probes measure, as the journal overwrites its recycled segments.
pub(super) fn written_file(path: &Path, size: u64) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(path)?;
    let have = f.metadata()?.len();
    if have < size {
        let chunk = vec![0x5au8; 1 << 20];
        let mut off = have;
        while off < size {
            let n = (size - off).min(chunk.len() as u64) as usize;
            f.write_all_at(&chunk[..n], off)?;
            off += n as u64;
        }
        f.sync_all()?;
    }
    Ok(f)
}

/// [`paced_fdatasync`] for 3 s, off the async runtime: the floor measured right before a
/// benchmark's paced case.
pub(super) async fn disk_floor(dir: &Path, bytes_per_sec: f64) -> anyhow::Result<DiskLatency> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || paced_fdatasync(&dir, bytes_per_sec, Duration::from_secs(3))).await?
}

async fn run_phase<F, Fut>(name: &'static str, concurrency: usize, duration: Duration, op: F) -> anyhow::Result<Phase>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = latency_histogram();
            let (mut ops, mut errors) = (0u64, 0u64);
            let mut i = w as u64;
            while start.elapsed() < duration {
                let t = Instant::now();
                if op(i).await {
                    ops += 1;
                    let _ = hist.record(t.elapsed().as_nanos() as u64);
                } else {
                    errors += 1;
                }
                i += concurrency as u64;
            }
            (hist, ops, errors)
        }));
    }
    let mut total = latency_histogram();
    let (mut ops, mut errors) = (0, 0);
    for t in tasks {
        let (h, o, e) = t.await?;
        total.add(h)?;
        ops += o;
        errors += e;
    }
    Ok(Phase { name, ops, errors, secs: start.elapsed().as_secs_f64(), hist: total })
}

async fn meta(a: MetaPerf) -> anyhow::Result<()> {
    let bin = std::env::current_exe().context("locating the magnetar binary")?;
    let dir = std::env::temp_dir().join(format!("magnetar-perf-meta-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = meta_in(&a, &bin, &dir).await;
    std::fs::remove_dir_all(&dir).ok();
    result
}

async fn meta_in(a: &MetaPerf, bin: &Path, dir: &Path) -> anyhow::Result<()> {
    println!("measuring the disk's fdatasync rate …");
    let fsync_rate = fdatasync_rate(dir)?;
    println!("raw fdatasync rate (4 KiB appends): {fsync_rate:.0}/s");
    let cluster = if a.endpoints.is_empty() {
        println!("starting a {}-node metastore cluster …", a.nodes);
        let cluster = LocalCluster::start(bin, dir, a.nodes, &[])?;
        cluster.wait_for_leader(Duration::from_secs(20)).await.context("no leader elected within 20 s")?;
        Some(cluster)
    } else {
        None
    };
    let client = match &cluster {
        Some(c) => c.client(),
        None => MetaClient::connect(&a.endpoints)?,
    };
    let value = vec![b'x'; a.value_size];
    let keys = a.keys as u64;
    let duration = Duration::from_secs(a.duration);

    println!("preloading {} keys …", a.keys);
    let c = client.clone();
    let v = value.clone();
    let _ = run_phase("preload", a.concurrency, Duration::from_secs(2), move |i| put(c.clone(), i % keys, v.clone()))
        .await?;

    let mut phases = Vec::new();
    for (name, kind) in [("put", 0), ("get (linearizable)", 1), ("get (stale)", 2)] {
        println!("{name}: {} s with {} in flight …", a.duration, a.concurrency);
        let c = client.clone();
        let v = value.clone();
        let p = run_phase(name, a.concurrency, duration, move |i| {
            let (c, v) = (c.clone(), v.clone());
            async move {
                match kind {
                    0 => put(c, i % keys, v).await,
                    1 => c.get(&key(i % keys)).await.is_ok(),
                    _ => c.get_with(&key(i % keys), true).await.is_ok(),
                }
            }
        })
        .await?;
        println!("  {:.0} ops/s", p.ops as f64 / p.secs);
        phases.push(p);
    }
    drop(cluster);

    let mut table = String::new();
    let nodes = if a.endpoints.is_empty() { a.nodes } else { a.endpoints.len() };
    table.push_str(&format!(
        "{}-node cluster of real processes on one machine, {} B values, {} keys, {} requests in flight, {} s per phase.\n\
         Raw fdatasync rate of the same disk, measured in the same run: **{fsync_rate:.0}/s** (4 KiB appends).\n\n",
        nodes, a.value_size, a.keys, a.concurrency, a.duration
    ));
    table.push_str("| operation | ops/s | p50 µs | p99 µs | p99.9 µs | errors |\n|---|---|---|---|---|---|\n");
    for p in &phases {
        table.push_str(&p.line());
        table.push('\n');
    }
    if let Some(put) = phases.first().filter(|_| a.concurrency > 1) {
        table.push_str(&format!(
            "\nDurable puts per second over the raw fdatasync rate: **{:.1}x** (writes batched into \
             Raft entries, WAL syncs group-committed).\n",
            put.ops as f64 / put.secs / fsync_rate
        ));
    }
    println!("\n{table}");
    if let Some(path) = &a.record {
        record(path, &format!("perf-meta-{nodes}x{}", a.concurrency), &table)?;
        println!("recorded in {}", path.display());
    }
    Ok(())
}

fn key(i: u64) -> String {
    format!("/perf/key-{i:08}")
}

async fn put(c: MetaClient, i: u64, v: Vec<u8>) -> bool {
    c.put(&key(i), v, PutOptions::default()).await.is_ok()
}

/// Replaces the section between `<!-- NAME:start -->` and `<!-- NAME:end -->` in a markdown file
/// (appending it if absent).
pub(super) fn record(path: &Path, name: &str, body: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let (start, end) = (format!("<!-- {name}:start -->"), format!("<!-- {name}:end -->"));
    let section = format!("{start}\n{body}{end}");
    let new = match (text.find(&start), text.find(&end)) {
        (Some(s), Some(e)) if e > s => format!("{}{}{}", &text[..s], section, &text[e + end.len()..]),
        _ => format!("{text}\n{section}\n"),
    };
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Steal is read from the machine-wide `cpu` line, as a share of all its CPU time.
    #[test]
    fn steal_is_read_from_proc_stat() {
        let stat = "cpu  100 5 50 800 10 2 3 30 0 0\ncpu0 50 2 25 400 5 1 1 15 0 0\nintr 1\n";
        assert_eq!(parse_cpu_times(stat), Some((1000, 30)));
        assert_eq!(parse_cpu_times("cpu  1 2 3\n"), None);
        assert_eq!(parse_cpu_times("intr 1\n"), None);
        let s = Steal::start();
        std::thread::sleep(Duration::from_millis(50));
        if let Some(p) = s.percent() {
            assert!((0.0..=100.0).contains(&p), "{p}");
        }
    }

    /// The summary's percentile, maximum and stalls come from the samples; a stall is a
    /// wake-up more than 2 ms late, and its share is of the whole stretch.
    #[test]
    fn wake_delays_are_summarized_with_their_stalls() {
        let us = Duration::from_micros;
        // 985 wake-ups 50 µs late, 13 at 1.5 ms, two stalls of 3 and 17 ms, over 1 s.
        let mut late = vec![us(50); 985];
        late.extend([us(1500); 13]);
        late.extend([us(3000), us(17_000)]);
        let d = WakeDelay::from_samples(&late, Duration::from_secs(1));
        assert_eq!(d.samples, 1000);
        assert!((d.p99 - 1.5).abs() < 1e-9, "{d:?}");
        assert!((d.max - 17.0).abs() < 1e-9, "{d:?}");
        assert_eq!(d.stalls, 2);
        assert!((d.stalled_pct - 2.0).abs() < 1e-9, "{d:?}");
        let line = d.describe();
        assert!(line.contains("p99 1.50 ms") && line.contains("max 17.0 ms") && line.contains("2 wake-ups"), "{line}");
        // A wake-up exactly 2 ms late is not a stall; nothing sampled is all zeros.
        assert_eq!(WakeDelay::from_samples(&[Duration::from_millis(2)], Duration::from_secs(1)).stalls, 0);
        assert_eq!(WakeDelay::from_samples(&[], Duration::from_secs(1)), WakeDelay::default());
        // The probe itself samples about one wake-up per nap and stops when asked.
        let p = WakeProbe::start().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let d = p.finish();
        assert!(d.samples >= 10 && d.samples <= 200, "{d:?}");
        assert!(d.p99 <= d.max, "{d:?}");
    }

    /// The probe writes one millisecond's bytes per fdatasync, keeps to the pace asked for,
    /// reports ordered percentiles and keeps its probe file for the next call.
    #[test]
    fn paced_fdatasync_keeps_its_pace_and_reuses_its_probe() {
        let dir = tempfile::tempdir().unwrap();
        // 200 KB/s: 4 KiB writes (200 B per ms rounds up), 48.8 per second.
        let d = paced_fdatasync(dir.path(), 200_000.0, Duration::from_millis(600)).unwrap();
        assert_eq!(d.write_bytes, 4096);
        // Never faster than the pace; as fast when the disk keeps up (a busy disk, as under
        // the rest of the test suite, can take hundreds of milliseconds per fdatasync).
        assert!(d.rate < 60.0, "{d:?}");
        if d.max < 10.0 {
            assert!(d.rate > 20.0, "{d:?}");
        }
        assert!(d.p50 > 0.0 && d.p50 <= d.p99 && d.p99 <= d.max, "{d:?}");
        // The probe file stays for the next probe (removing it mid-run would have the disk
        // discard its blocks during the measured phase), written in full.
        let probe = dir.path().join("latency-probe");
        let len = std::fs::metadata(&probe).unwrap().len();
        assert_eq!(len, (64u64 << 20) / 4096 * 4096);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // 50 MB/s: the bytes of one millisecond per write.
        let d = paced_fdatasync(dir.path(), 50e6, Duration::from_millis(200)).unwrap();
        assert_eq!(d.write_bytes, 53_248);
        assert!(d.describe().starts_with("52 KiB write + fdatasync at "), "{}", d.describe());
        // Reused, not created again.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(std::fs::metadata(&probe).unwrap().len() >= len);
        assert!(paced_fdatasync(dir.path(), 0.0, Duration::from_millis(10)).is_err());
    }
}
