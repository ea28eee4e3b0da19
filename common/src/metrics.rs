//! A small Prometheus registry: counters, gauges and histograms with fixed label sets, rendered
//! in the text exposition format (version 0.0.4).
//!
//! Metrics are registered once at start-up and updated lock-free (atomics); rendering walks
//! the registry under a mutex. Names follow what Pulsar and BookKeeper users already query,
//! e.g. `bookie_journal_JOURNAL_SYNC` — the registry does not rename them.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Latency buckets in milliseconds, from 50 µs to 10 s.
pub const LATENCY_MS_BUCKETS: &[f64] =
    &[0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 10000.0];

/// A monotonically increasing count.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Default, Debug)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// Adds `d` (may be negative).
    pub fn add(&self, d: i64) {
        self.0.fetch_add(d, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A histogram with fixed upper bounds (`le`); the `+Inf` bucket is implicit.
#[derive(Debug)]
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<AtomicU64>,
    /// Sum in millionths of the observed unit, so it can be an atomic integer.
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// A histogram with these upper bounds (ascending).
    pub fn new(bounds: &[f64]) -> Self {
        Histogram {
            bounds: bounds.to_vec(),
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, v: f64) {
        self.observe_many(v, 1);
    }

    /// Records a duration in milliseconds.
    pub fn observe_duration_ms(&self, d: std::time::Duration) {
        self.observe(d.as_secs_f64() * 1000.0);
    }

    /// Records `n` observations of the same value (a batch whose members all took as long).
    pub fn observe_many(&self, v: f64, n: u64) {
        if n == 0 {
            return;
        }
        let i = self.bounds.iter().position(|b| v <= *b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(n, Ordering::Relaxed);
        self.sum_micros.fetch_add((v.max(0.0) * 1e6) as u64 * n, Ordering::Relaxed);
        self.count.fetch_add(n, Ordering::Relaxed);
    }

    /// Records `n` observations of a duration in milliseconds.
    pub fn observe_duration_ms_many(&self, d: std::time::Duration, n: u64) {
        self.observe_many(d.as_secs_f64() * 1000.0, n);
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

enum Metric {
    Counter(Arc<Counter>),
    Gauge(Arc<Gauge>),
    Histogram(Arc<Histogram>),
    /// A value computed when scraped.
    GaugeFn(Box<dyn Fn() -> f64 + Send + Sync>),
}

struct Series {
    labels: Vec<(String, String)>,
    metric: Metric,
}

struct Family {
    name: String,
    help: String,
    kind: &'static str,
    series: Vec<Series>,
}

/// The set of metrics one server exposes.
#[derive(Default, Clone)]
pub struct Registry {
    families: Arc<Mutex<Vec<Family>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&self, name: &str, help: &str, kind: &'static str, labels: &[(&str, &str)], metric: Metric) {
        let mut fams = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let series = Series { labels, metric };
        match fams.iter_mut().find(|f| f.name == name) {
            Some(f) => f.series.push(series),
            None => fams.push(Family { name: name.into(), help: help.into(), kind, series: vec![series] }),
        }
    }

    /// Registers a counter.
    pub fn counter(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Arc<Counter> {
        let c = Arc::new(Counter::default());
        self.add(name, help, "counter", labels, Metric::Counter(c.clone()));
        c
    }

    /// Registers a gauge.
    pub fn gauge(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Arc<Gauge> {
        let g = Arc::new(Gauge::default());
        self.add(name, help, "gauge", labels, Metric::Gauge(g.clone()));
        g
    }

    /// Registers a gauge whose value `f` computes at scrape time.
    pub fn gauge_fn(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        f: impl Fn() -> f64 + Send + Sync + 'static,
    ) {
        self.add(name, help, "gauge", labels, Metric::GaugeFn(Box::new(f)));
    }

    /// Registers a histogram with the given bucket bounds.
    pub fn histogram(&self, name: &str, help: &str, labels: &[(&str, &str)], bounds: &[f64]) -> Arc<Histogram> {
        let h = Arc::new(Histogram::new(bounds));
        self.add(name, help, "histogram", labels, Metric::Histogram(h.clone()));
        h
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let fams = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::with_capacity(4096);
        for f in fams.iter() {
            let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(&f.help));
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
            for s in &f.series {
                match &s.metric {
                    Metric::Counter(c) => line(&mut out, &f.name, &s.labels, None, c.get() as f64),
                    Metric::Gauge(g) => line(&mut out, &f.name, &s.labels, None, g.get() as f64),
                    Metric::GaugeFn(func) => line(&mut out, &f.name, &s.labels, None, func()),
                    Metric::Histogram(h) => {
                        let bucket = format!("{}_bucket", f.name);
                        let mut cumulative = 0u64;
                        for (i, b) in h.bounds.iter().enumerate() {
                            cumulative += h.counts[i].load(Ordering::Relaxed);
                            line(&mut out, &bucket, &s.labels, Some(&fmt_f64(*b)), cumulative as f64);
                        }
                        cumulative += h.counts[h.bounds.len()].load(Ordering::Relaxed);
                        line(&mut out, &bucket, &s.labels, Some("+Inf"), cumulative as f64);
                        let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
                        line(&mut out, &format!("{}_sum", f.name), &s.labels, None, sum);
                        line(&mut out, &format!("{}_count", f.name), &s.labels, None, cumulative as f64);
                    }
                }
            }
        }
        out
    }
}

fn line(out: &mut String, name: &str, labels: &[(String, String)], le: Option<&str>, v: f64) {
    out.push_str(name);
    if !labels.is_empty() || le.is_some() {
        out.push('{');
        let mut first = true;
        for (k, val) in labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).chain(le.map(|l| ("le", l))) {
            if !first {
                out.push(',');
            }
            first = false;
            let _ = write!(out, "{k}=\"{}\"", escape_label(val));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {}", fmt_f64(v));
}

fn fmt_f64(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// The Content-Type of the text format.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_cumulative_histograms() {
        let r = Registry::new();
        let c = r.counter("bookie_ADD_ENTRY_count", "adds", &[("bookie", "b\"1")]);
        c.add(3);
        let g = r.gauge("bookie_journal_JOURNAL_QUEUE_SIZE", "queue", &[]);
        g.set(-2);
        let h = r.histogram("bookie_journal_JOURNAL_SYNC", "sync ms", &[], &[1.0, 10.0]);
        h.observe(0.5);
        h.observe(5.0);
        h.observe(50.0);
        h.observe_many(20.0, 2);
        h.observe_many(0.1, 0);
        r.gauge_fn("x_ratio", "computed", &[], || 0.25);
        let text = r.render();
        assert!(text.contains("# TYPE bookie_ADD_ENTRY_count counter\nbookie_ADD_ENTRY_count{bookie=\"b\\\"1\"} 3\n"));
        assert!(text.contains("bookie_journal_JOURNAL_QUEUE_SIZE -2\n"));
        assert!(text.contains("bookie_journal_JOURNAL_SYNC_bucket{le=\"1\"} 1\n"));
        assert!(text.contains("bookie_journal_JOURNAL_SYNC_bucket{le=\"10\"} 2\n"));
        assert!(text.contains("bookie_journal_JOURNAL_SYNC_bucket{le=\"+Inf\"} 5\n"));
        assert!(text.contains("bookie_journal_JOURNAL_SYNC_count 5\n"));
        assert!(text.contains("bookie_journal_JOURNAL_SYNC_sum 95.5\n"));
        assert!(text.contains("x_ratio 0.25\n"));
    }

    #[test]
    fn series_of_one_family_share_one_header() {
        let r = Registry::new();
        r.counter("m", "h", &[("a", "1")]).inc();
        r.counter("m", "h", &[("a", "2")]).add(2);
        let text = r.render();
        assert_eq!(text.matches("# TYPE m counter").count(), 1);
        assert!(text.contains("m{a=\"1\"} 1\nm{a=\"2\"} 2\n"));
    }
}

/// Standard `process_*` series (Prometheus' process collector names) for this process, read
/// from `/proc` (Linux; elsewhere nothing). CPU times are in USER_HZ, which Linux fixes at 100
/// for user space.
pub fn process_text() -> String {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return String::new() };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some((_, rest)) = stat.rsplit_once(')') else { return String::new() };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // `rest` starts at field 3 (state): field n is f[n - 3].
    let cpu = (num(14 - 3) + num(15 - 3)) / 100.0;
    let threads = num(20 - 3);
    let start_ticks = num(22 - 3);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|x| x.parse::<f64>().ok())
            .unwrap_or(0.0)
            * 1024.0
    };
    let boot = std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("btime"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|x| x.parse::<f64>().ok())
        .unwrap_or(0.0);
    let fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0);
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, v: f64| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
    };
    put("process_cpu_seconds_total", "counter", "User and system CPU time spent, seconds", cpu);
    put("process_resident_memory_bytes", "gauge", "Resident memory size, bytes", kb("VmRSS:"));
    put("process_virtual_memory_bytes", "gauge", "Virtual memory size, bytes", kb("VmSize:"));
    put("process_open_fds", "gauge", "Open file descriptors", fds as f64);
    put("process_threads", "gauge", "Threads", threads);
    put("process_start_time_seconds", "gauge", "Start time since the epoch, seconds", boot + start_ticks / 100.0);
    out
}

#[cfg(test)]
mod process_tests {
    #[test]
    fn process_series_are_there_and_plausible() {
        let text = super::process_text();
        if !std::path::Path::new("/proc/self/stat").exists() {
            return;
        }
        let value = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
        };
        assert!(value("process_resident_memory_bytes") > 1e5);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_threads") >= 1.0);
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let start = value("process_start_time_seconds");
        assert!(start > now - 3600.0 && start <= now + 5.0, "start {start}, now {now}");
    }
}
