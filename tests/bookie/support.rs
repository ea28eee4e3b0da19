//! Harness for bookie and ledger tests: an in-process single-node metastore (or one of node
//! processes, which can be killed), bookies as real `magnetar bookie` processes on free ports
//! (so they can be SIGKILLed), and helpers.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use magnetar_bookie::client::{LedgerClient, LedgerOptions};
use magnetar_metastore::client::MetaClient;
use magnetar_metastore::local_cluster::{free_ports, LocalCluster};
use magnetar_metastore::server::MetastoreNode;
use magnetar_metastore::MetastoreConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_magnetar"))
}

#[path = "../support/wait.rs"]
mod wait;
pub use wait::wait_until;

/// A Pulsar protocol connection driven frame by frame (for clients that misbehave: go
/// silent, close what is not ready yet).
pub struct RawConn {
    reader: magnetar_broker::protocol::connection::FrameReader<tokio::net::tcp::OwnedReadHalf>,
    writer: magnetar_broker::protocol::connection::FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
}

impl RawConn {
    /// Connects and completes the handshake.
    pub async fn connect(broker: &str) -> RawConn {
        use magnetar_broker::protocol::codec::base;
        use magnetar_broker::protocol::connection::{FrameReader, FrameWriter};
        use magnetar_broker::protocol::pb::{self, base_command::Type};

        let stream = tokio::net::TcpStream::connect(broker).await.expect("connect");
        let (r, w) = stream.into_split();
        let mut c = RawConn { reader: FrameReader::new(r, 6 << 20), writer: FrameWriter::new(w) };
        let connect =
            pb::CommandConnect { client_version: "raw".into(), protocol_version: Some(20), ..Default::default() };
        c.send(pb::BaseCommand { connect: Some(Box::new(connect)), ..base(Type::Connect) }).await;
        let answer = c.next().await.expect("CONNECTED");
        assert_eq!(answer.r#type, Type::Connected as i32, "{answer:?}");
        c
    }

    /// Sends one command.
    pub async fn send(&mut self, cmd: magnetar_broker::protocol::pb::BaseCommand) {
        self.writer.send(&cmd).await.expect("send");
    }

    /// The next command other than PING; None once the broker closed the connection.
    pub async fn next(&mut self) -> Option<magnetar_broker::protocol::pb::BaseCommand> {
        use magnetar_broker::protocol::pb::base_command::Type;
        loop {
            match self.reader.next().await {
                Ok(Some(f)) if f.command.r#type == Type::Ping as i32 => continue,
                Ok(Some(f)) => return Some(f.command),
                _ => return None,
            }
        }
    }

    /// Sends `cmd` and returns the next command.
    pub async fn ask(
        &mut self,
        cmd: magnetar_broker::protocol::pb::BaseCommand,
    ) -> magnetar_broker::protocol::pb::BaseCommand {
        self.send(cmd).await;
        self.next().await.expect("an answer")
    }
}

/// Prometheus text → (series with labels) → value.
pub fn scrape(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line}"));
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line}"));
        out.insert(series.to_owned(), v);
    }
    out
}

/// A GET over HTTP/1.1; returns (status, body).
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await.ok()?.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

/// The result code of reading one entry straight from the bookie at `addr`.
pub async fn read_code(addr: &str, ledger: u64, entry: i64) -> i32 {
    let mut c =
        magnetar_proto::bookie::bookie_client::BookieClient::connect(format!("http://{addr}")).await.expect("connect");
    let req = magnetar_proto::bookie::ReadRequest {
        ledger_id: ledger,
        entry_ids: vec![entry],
        fence: false,
        master_key: Default::default(),
    };
    c.read(req).await.expect("read").into_inner().entries[0].code
}

/// One bookie process.
pub struct BookieProc {
    pub id: String,
    pub addr: String,
    pub http: String,
    pub journal: PathBuf,
    pub ledgers: PathBuf,
    pub log: PathBuf,
    pub extra: Vec<String>,
    /// Extra environment of the process.
    pub env: Vec<(String, String)>,
    meta: String,
    child: Option<Child>,
}

/// The bookies of the tests go read-only only on a disk that is all but full: at the default
/// threshold (95% used) a test failed on a shared machine whose disk had 15 GB left, for want
/// of writable bookies. Tests of the threshold set their own with `--set`, which wins.
pub const DISK_USAGE_ENV: (&str, &str) = ("MAGNETAR_BOOKIE_DISK_USAGE_THRESHOLD", "0.999");

impl BookieProc {
    /// Gives the bookie two journal directories (`journal-a`, `journal-b` beside its usual
    /// one) from its next start; returns them.
    pub fn use_two_journals(&mut self) -> (PathBuf, PathBuf) {
        let root = self.journal.parent().expect("bookie root").to_path_buf();
        let (j1, j2) = (root.join("journal-a"), root.join("journal-b"));
        self.extra.extend([
            "--set".to_string(),
            format!("journal_dirs=[{:?},{:?}]", j1.display().to_string(), j2.display().to_string()),
        ]);
        (j1, j2)
    }

    pub fn spawn(&mut self) {
        let log = File::options().create(true).append(true).open(&self.log).expect("log file");
        let mut cmd = Command::new(bin());
        cmd.arg("bookie")
            .args(["--bookie-id", &self.id, "--listen", &self.addr, "--http", &self.http])
            .arg("--journal-dirs")
            .arg(&self.journal)
            .arg("--ledger-dir")
            .arg(&self.ledgers)
            .args(["--metastore", &self.meta])
            .args([
                "--set",
                "session_ttl_ms=2000",
                "--set",
                "journal.segment_bytes=8388608",
                "--set",
                "max_entry_bytes=1048576",
            ])
            .args(["--set", "storage.write_buffer_bytes=4194304", "--set", "storage.read_cache_bytes=1048576"])
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .env(DISK_USAGE_ENV.0, DISK_USAGE_ENV.1)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.child = Some(cmd.spawn().expect("spawn bookie"));
    }

    /// Starts and waits until it reports ready.
    pub async fn start(&mut self) {
        self.spawn();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut ok = false;
        while std::time::Instant::now() < deadline {
            if matches!(http_get(&self.http, "/api/v1/bookie/is_ready").await, Some((200, _))) {
                ok = true;
                break;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("bookie {} exited with {status} while starting\n{}", self.id, self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(ok, "bookie {} did not become ready\n{}", self.id, self.log_tail());
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes (`true`: SIGSTOP) or thaws (SIGCONT) the process: a frozen bookie keeps its
    /// connections open and answers nothing.
    pub fn freeze(&self, frozen: bool) {
        if let Some(c) = &self.child {
            let sig = if frozen { "-STOP" } else { "-CONT" };
            let ok = Command::new("kill").arg(sig).arg(c.id().to_string()).status().is_ok_and(|s| s.success());
            assert!(ok, "kill {sig} bookie {}", self.id);
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let status = c.wait().expect("wait");
            assert!(status.success(), "bookie {} exited with {status}\n{}", self.id, self.log_tail());
        }
    }

    /// Waits for the process to exit on its own (a refused start); returns whether it failed.
    pub fn wait_exit_failure(&mut self, timeout: Duration) -> bool {
        let Some(mut c) = self.child.take() else { return false };
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return !status.success();
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for BookieProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A metastore and some bookies.
pub struct Cluster {
    /// Metastore endpoints, comma-separated.
    pub meta_addr: String,
    pub bookies: Vec<BookieProc>,
    node: Option<MetastoreNode>,
    /// A metastore of node processes instead of the in-process node.
    pub meta_nodes: Option<LocalCluster>,
    cancel: CancellationToken,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// A metastore and `n` bookies (not started when `start` is false).
    pub async fn new(n: usize, extra: &[&str], start: bool) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_ports(1).expect("port")[0];
        let meta_addr = format!("127.0.0.1:{port}");
        let cancel = CancellationToken::new();
        let cfg = MetastoreConfig {
            node_id: 1,
            listen_addr: meta_addr.clone(),
            data_dir: dir.path().join("metastore"),
            initial_members: vec![format!("1={meta_addr}")],
            ..Default::default()
        };
        let node = MetastoreNode::start(cfg, cancel.clone()).await.expect("metastore");
        let c = Cluster { meta_addr, bookies: Vec::new(), node: Some(node), meta_nodes: None, cancel, dir };
        c.with_bookies(n, extra, start).await
    }

    /// A metastore of `nodes` node processes (so one can be killed) and `n` started bookies.
    pub async fn with_metastore_nodes(nodes: usize, n: usize, extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let meta_dir = dir.path().join("metastore");
        std::fs::create_dir_all(&meta_dir).expect("metastore dir");
        let meta = LocalCluster::start(&bin(), &meta_dir, nodes, &[]).expect("metastore nodes");
        assert!(meta.wait_for_leader(Duration::from_secs(30)).await.is_some(), "the metastore elected no leader");
        let c = Cluster {
            meta_addr: meta.endpoints().join(","),
            bookies: Vec::new(),
            node: None,
            meta_nodes: Some(meta),
            cancel: CancellationToken::new(),
            dir,
        };
        c.with_bookies(n, extra, true).await
    }

    async fn with_bookies(mut self, n: usize, extra: &[&str], start: bool) -> Cluster {
        for _ in 0..n {
            self.add_bookie(extra);
        }
        if start {
            for b in &mut self.bookies {
                b.start().await;
            }
        }
        self
    }

    pub fn add_bookie(&mut self, extra: &[&str]) -> usize {
        let i = self.bookies.len();
        let ports = free_ports(2).expect("ports");
        let root = self.dir.path().join(format!("bookie-{i}"));
        std::fs::create_dir_all(&root).expect("dir");
        self.bookies.push(BookieProc {
            id: format!("bookie-{i}"),
            addr: format!("127.0.0.1:{}", ports[0]),
            http: format!("127.0.0.1:{}", ports[1]),
            journal: root.join("journal"),
            ledgers: root.join("ledgers"),
            log: root.join("bookie.log"),
            extra: extra.iter().flat_map(|e| ["--set".to_string(), e.to_string()]).collect(),
            env: Vec::new(),
            meta: self.meta_addr.clone(),
            child: None,
        });
        i
    }

    pub fn meta(&self) -> MetaClient {
        let endpoints: Vec<String> = self.meta_addr.split(',').map(str::to_owned).collect();
        MetaClient::connect(&endpoints).expect("meta client")
    }

    /// A ledger client whose adds time out after `add_timeout` (other options default).
    pub fn ledger_client_with_add_timeout(&self, add_timeout: Duration) -> LedgerClient {
        LedgerClient::new(self.meta(), LedgerOptions { add_timeout, ..Default::default() })
    }

    pub fn ledger_client(&self) -> LedgerClient {
        let opts = LedgerOptions {
            add_timeout: Duration::from_secs(3),
            ensemble_change_timeout: Duration::from_secs(1),
            ..Default::default()
        };
        LedgerClient::new(self.meta(), opts)
    }

    pub fn index_of(&self, id: &str) -> usize {
        self.bookies.iter().position(|b| b.id == id).expect("known bookie")
    }

    pub fn logs(&self) -> String {
        self.bookies.iter().map(|b| format!("--- {} ---\n{}\n", b.id, b.log_tail())).collect()
    }

    pub async fn shutdown(mut self) {
        for b in &mut self.bookies {
            b.kill();
        }
        self.cancel.cancel();
        if let Some(n) = self.node.take() {
            n.stop().await;
        }
    }
}

/// Reads entries `0..=last` of ledger `id` and checks each against [`payload`] with `max`.
pub async fn check_payloads(client: &LedgerClient, id: u64, last: i64, max: usize) {
    let entries = client.open_reader(id).await.expect("reader").read(0, last).await.expect("read");
    assert_eq!(entries.len() as i64, last + 1);
    for (e, got) in entries.iter().enumerate() {
        assert!(got[..] == payload(id, e as i64, max)[..], "entry {e} of ledger {id} differs");
    }
}

/// A `magnetar broker` process of the test cluster; killed (SIGKILL) when dropped.
pub struct BrokerProc {
    child: std::process::Child,
    pub addr: String,
    pub web: String,
    log: std::path::PathBuf,
}

impl Cluster {
    /// Starts a broker (cluster `local`) on `addr`/`web` (fresh ports when `None`) with extra
    /// `--set`s and waits for its port.
    pub async fn start_broker(&self, name: &str, ports: Option<(&str, &str)>, sets: &[&str]) -> BrokerProc {
        let broker = self.spawn_broker(name, ports, sets);
        // The ports are bound before the broker registers with the metastore; its HTTP
        // server starts answering only once it has registered and serves the protocol.
        let w = broker.web.clone();
        assert!(
            wait_until(Duration::from_secs(30), || {
                let w = w.clone();
                async move { matches!(http_get(&w, "/admin/v2/brokers/health").await, Some((200, _))) }
            })
            .await,
            "broker {name} never became ready"
        );
        broker
    }

    /// Starts a broker process without waiting for it; it logs to `<name>.log` in the
    /// cluster's directory.
    pub fn spawn_broker(&self, name: &str, ports: Option<(&str, &str)>, sets: &[&str]) -> BrokerProc {
        let cluster = self;
        let (addr, web) = match ports {
            Some((a, w)) => (a.to_owned(), w.to_owned()),
            None => {
                let p = free_ports(2).expect("ports");
                (format!("127.0.0.1:{}", p[0]), format!("127.0.0.1:{}", p[1]))
            }
        };
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(cluster.dir.path().join(format!("{name}.log")))
            .expect("log");
        let mut cmd = Command::new(bin());
        cmd.args(["broker", "--listen", &addr, "--metastore", &cluster.meta_addr, "--web-listen", &web]);
        for s in sets {
            cmd.args(["--set", s]);
        }
        let child = cmd
            .env("clusterName", "local")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start broker");
        BrokerProc { child, addr, web, log: cluster.dir.path().join(format!("{name}.log")) }
    }
}

impl BrokerProc {
    pub fn url(&self) -> String {
        format!("pulsar://{}", self.addr)
    }

    /// Its exit status once it exits within `timeout`.
    pub async fn exited_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let until = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if std::time::Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for BrokerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic payload of an entry: size and bytes depend on (ledger, entry).
pub fn payload(ledger: u64, entry: i64, max: usize) -> Vec<u8> {
    let seed = ledger.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (entry as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let len = 1 + (seed % max as u64) as usize;
    (0..len).map(|i| (seed >> (i % 56)) as u8 ^ i as u8).collect()
}
