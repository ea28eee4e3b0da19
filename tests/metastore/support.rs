//! Shared harness: start clusters, wait on conditions with deadlines.

use std::path::PathBuf;
use std::time::Duration;

use magnetar_metastore::local_cluster::LocalCluster;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_magnetar"))
}

pub struct TestCluster {
    pub c: LocalCluster,
    // Dropped after the cluster (field order), so processes stop before files go.
    pub _dir: tempfile::TempDir,
}

impl TestCluster {
    pub fn logs(&self) -> String {
        (0..self.c.nodes.len()).map(|i| format!("--- node {} ---\n{}\n", i + 1, self.c.log_tail(i, 40))).collect()
    }

    pub async fn leader(&self) -> usize {
        match self.c.wait_for_leader(Duration::from_secs(15)).await {
            Some(i) => i,
            None => panic!("no leader within 15 s\n{}", self.logs()),
        }
    }
}

/// Starts `n` nodes with extra `--set`-style args and waits for a leader.
pub async fn cluster(n: usize, extra: &[&str]) -> TestCluster {
    let dir = tempfile::tempdir().expect("tempdir");
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let c = LocalCluster::start(&bin(), dir.path(), n, &extra).expect("spawn nodes");
    let t = TestCluster { c, _dir: dir };
    t.leader().await;
    t
}

#[path = "../support/wait.rs"]
mod wait;
pub use wait::wait_until;

/// Kills the process when dropped, so a failing test leaves nothing running.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
