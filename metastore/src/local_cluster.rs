//! A metastore cluster of real `magnetar metastore` processes on this machine, for integration
//! tests and `magnetar perf meta`. Ports are chosen free on 127.0.0.1; every node logs to
//! `<dir>/node-<id>.log`; dropping the cluster SIGKILLs what is still running.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::client::{ClientOptions, MetaClient};

/// One node process.
pub struct LocalNode {
    /// Raft id.
    pub id: u64,
    /// gRPC address.
    pub addr: String,
    /// Data directory.
    pub data_dir: PathBuf,
    child: Option<Child>,
}

impl LocalNode {
    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

/// A set of node processes.
pub struct LocalCluster {
    bin: PathBuf,
    dir: PathBuf,
    members: Vec<String>,
    extra_args: Vec<String>,
    /// The nodes, in id order (id = index + 1).
    pub nodes: Vec<LocalNode>,
}

/// Picks `n` distinct ports that are free on 127.0.0.1 now, for servers started next.
///
/// They come from just below the kernel's ephemeral range, so the local end of an outgoing
/// connection cannot take one before its server binds it, and no port is handed out twice by
/// one process. (Ports from `bind(0)` are ephemeral ones: a client socket opened in between
/// could take them.)
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse::<u32>().ok()))
        .unwrap_or(32768);
    let hi = ephemeral_low.clamp(2048, 65535);
    let lo = hi.saturating_sub(12_000).max(1024);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let mut x =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
            ^ (u64::from(std::process::id()) << 32)
            | 1;
    let mut out = Vec::with_capacity(n);
    for _ in 0..100_000 {
        if out.len() == n {
            return Ok(out);
        }
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let Ok(p) = u16::try_from(u64::from(lo) + x % u64::from(hi - lo)) else { continue };
        if given.contains(&p) || out.contains(&p) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            given.push(p);
            out.push(p);
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, format!("no {n} free ports in {lo}..{hi}")))
}

impl LocalCluster {
    /// Starts `n` bootstrap nodes (1 or 3+) of `bin` under `dir`, each with `extra_args`.
    pub fn start(bin: &Path, dir: &Path, n: usize, extra_args: &[String]) -> std::io::Result<Self> {
        let ports = free_ports(n)?;
        let members: Vec<String> = ports.iter().enumerate().map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1)).collect();
        let mut cluster = LocalCluster {
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            members,
            extra_args: extra_args.to_vec(),
            nodes: Vec::new(),
        };
        for (i, p) in ports.iter().enumerate() {
            let id = i as u64 + 1;
            cluster.nodes.push(LocalNode {
                id,
                addr: format!("127.0.0.1:{p}"),
                data_dir: dir.join(format!("node-{id}")),
                child: None,
            });
            cluster.spawn(i, true)?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize, bootstrap: bool) -> std::io::Result<()> {
        let node = &self.nodes[i];
        let log = File::options().create(true).append(true).open(self.dir.join(format!("node-{}.log", node.id)))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("metastore")
            .arg("--node-id")
            .arg(node.id.to_string())
            .arg("--listen")
            .arg(&node.addr)
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(&self.extra_args)
            .env("RUST_LOG", std::env::var("MAGNETAR_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if bootstrap {
            cmd.arg("--initial-members").arg(self.members.join(","));
        }
        let child = cmd.spawn()?;
        self.nodes[i].child = Some(child);
        Ok(())
    }

    /// Adds a node process that is not a member yet (to be added with `cluster add`).
    pub fn spawn_joiner(&mut self) -> std::io::Result<usize> {
        let port = free_ports(1)?[0];
        let id = self.nodes.len() as u64 + 1;
        self.nodes.push(LocalNode {
            id,
            addr: format!("127.0.0.1:{port}"),
            data_dir: self.dir.join(format!("node-{id}")),
            child: None,
        });
        let i = self.nodes.len() - 1;
        self.spawn(i, false)?;
        Ok(i)
    }

    /// Every node's address.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    /// A client for all nodes.
    pub fn client(&self) -> MetaClient {
        match MetaClient::new(&self.endpoints(), ClientOptions::default()) {
            Ok(c) => c,
            Err(e) => panic!("local endpoints are valid addresses: {e}"),
        }
    }

    /// The process id of node `i` (index), while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(|c| c.id())
    }

    /// SIGKILLs node `i` (index) and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM to node `i` and waits for it to exit (up to `timeout`, then SIGKILL).
    pub fn terminate(&mut self, i: usize, timeout: Duration) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let start = std::time::Instant::now();
            while start.elapsed() < timeout {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts node `i` from its data directory.
    pub fn restart(&mut self, i: usize) -> std::io::Result<()> {
        self.kill(i);
        let bootstrap = i < self.members.len();
        self.spawn(i, bootstrap)
    }

    /// Waits until a node reports a leader that the running nodes agree on; returns its index.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<usize> {
        let client = self.client();
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            let mut leaders = Vec::new();
            for n in self.nodes.iter().filter(|n| n.is_running()) {
                if let Ok(s) = client.cluster_status(Some(&n.addr)).await {
                    leaders.push(s.leader_id);
                }
            }
            if let Some(Some(l)) = leaders.first().copied() {
                let running = self.nodes.iter().filter(|n| n.is_running()).count();
                let agree = leaders.iter().filter(|x| **x == Some(l)).count();
                let leader_running = self.nodes.iter().any(|n| n.id == l && n.is_running());
                if agree * 2 > running && leader_running {
                    return self.nodes.iter().position(|n| n.id == l);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// The log of node `i`, for failure messages.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("node-{}.log", self.nodes[i].id))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
