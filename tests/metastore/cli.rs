//! `magnetar meta …` against a running cluster, as a user types it.

use std::process::Command;

use crate::support::{bin, cluster, ChildGuard};

fn meta(endpoints: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin())
        .arg("meta")
        .arg("--endpoints")
        .arg(endpoints)
        .args(args)
        .output()
        .expect("run magnetar meta");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn meta_cli_round_trip() {
    let t = cluster(3, &[]).await;
    let eps = t.c.endpoints().join(",");
    let (ok, out, err) = meta(&eps, &["put", "/cli/a", "hello"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("version "), "{out}");
    let version: u64 = out.trim().trim_start_matches("version ").parse().expect("version");
    let (ok, out, _) = meta(&eps, &["get", "/cli/a"]);
    assert!(ok);
    assert!(out.starts_with("hello"), "{out}");
    let (ok, _, err) = meta(&eps, &["put", "/cli/a", "x", "--expect-version", "1"]);
    assert!(!ok && err.contains("version mismatch"), "{err}");
    let (ok, _, _) = meta(&eps, &["put", "/cli/a", "world", "--expect-version", &version.to_string()]);
    assert!(ok);
    meta(&eps, &["put", "/cli/b", "2"]);
    let (ok, out, _) = meta(&eps, &["--json", "ls", "/cli/"]);
    assert!(ok);
    let rows: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["value"], "world");
    let (ok, out, _) = meta(&eps, &["watch", "/cli/", "--from-revision", "1", "--count", "3"]);
    assert!(ok);
    assert_eq!(out.lines().count(), 3, "{out}");
    let (ok, _, _) = meta(&eps, &["del", "/cli/b"]);
    assert!(ok);
    let (ok, _, err) = meta(&eps, &["get", "/cli/b"]);
    assert!(!ok && err.contains("not found"), "{err}");
    let (ok, out, _) = meta(&eps, &["--json", "cluster", "status"]);
    assert!(ok);
    let status: serde_json::Value = serde_json::from_str(&out).expect("status json");
    assert_eq!(status["members"].as_array().map(|m| m.len()), Some(3));
    assert!(status["leader_id"].is_u64());
    let (ok, _, err) = meta("127.0.0.1:1", &["--timeout", "2", "get", "/x"]);
    assert!(!ok && err.contains("unavailable"), "{err}");
}

#[tokio::test]
async fn standalone_serves_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = magnetar_metastore::local_cluster::free_ports(1).expect("port")[0];
    let addr = format!("127.0.0.1:{port}");
    let mut child = standalone(dir.path(), &addr);
    let client = magnetar_metastore::client::MetaClient::connect(std::slice::from_ref(&addr)).expect("client");
    client.put("/standalone", "up", Default::default()).await.expect("put against standalone");
    let pid = child.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.0.try_wait().expect("wait") {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "standalone did not stop on SIGTERM");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(status.success(), "clean shutdown exits 0, got {status}");
    // Restarting over the same data keeps what was written.
    let _restarted = standalone(dir.path(), &addr);
    let got = client.get("/standalone").await.expect("get after restart");
    assert_eq!(got.map(|k| k.value), Some(b"up".to_vec()));
}

fn standalone(data: &std::path::Path, addr: &str) -> ChildGuard {
    let ports = magnetar_metastore::local_cluster::free_ports(4).expect("ports");
    let child = Command::new(bin())
        .arg("standalone")
        .arg("--data-dir")
        .arg(data)
        .arg("--metastore-listen")
        .arg(addr)
        .args(["--bookie-listen", &format!("127.0.0.1:{}", ports[0])])
        .args(["--bookie-http", &format!("127.0.0.1:{}", ports[1])])
        .args(["--broker-listen", &format!("127.0.0.1:{}", ports[2])])
        .args(["--web-listen", "127.0.0.1:0"])
        // Every port its own: the defaults would collide with any standalone on the machine.
        .args(["--metastore-http", &format!("127.0.0.1:{}", ports[3])])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start standalone");
    ChildGuard(child)
}

/// A single-node metastore in this process over `data_dir` (HTTP on `http_addr`, none when
/// empty); returns it and its gRPC address.
async fn start_node(
    data_dir: &std::path::Path,
    http_addr: &str,
) -> Result<(magnetar_metastore::server::MetastoreNode, String), magnetar_metastore::error::MetaError> {
    let port = magnetar_metastore::local_cluster::free_ports(1).expect("port")[0];
    let addr = format!("127.0.0.1:{port}");
    let cfg = magnetar_metastore::config::MetastoreConfig {
        listen_addr: addr.clone(),
        data_dir: data_dir.to_owned(),
        initial_members: vec![format!("1={addr}")],
        http_addr: http_addr.into(),
        ..Default::default()
    };
    let node =
        magnetar_metastore::server::MetastoreNode::start(cfg, tokio_util::sync::CancellationToken::new()).await?;
    Ok((node, addr))
}

/// A node with `http_addr` serves Raft and process series at `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metastore_serves_raft_metrics() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, addr) = start_node(&dir.path().join("m"), "127.0.0.1:0").await.expect("start");
    let client = magnetar_metastore::client::MetaClient::connect(std::slice::from_ref(&addr)).expect("client");
    client.put("/m", b"x".to_vec(), Default::default()).await.expect("put");
    let http = node.http_addr().expect("http address").to_string();
    let mut s = tokio::net::TcpStream::connect(&http).await.expect("connect");
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.expect("read");
    let value = |name: &str| {
        buf.lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{buf}"))
    };
    assert_eq!(value("metastore_raft_is_leader"), 1.0);
    assert!(value("metastore_raft_term") >= 1.0);
    assert!(value("metastore_raft_last_applied_index") >= 1.0);
    assert_eq!(value("metastore_raft_voters"), 1.0);
    assert!(buf.contains("process_resident_memory_bytes "), "{buf}");
    node.stop().await;
}

/// `stop` returns only after the node's database is closed: the same directory opens again the
/// moment it returns, in the same process (RocksDB refuses a database this process still holds
/// open), and the next node reads what the previous one wrote. A process that exited while the
/// close ran on another thread would abort inside RocksDB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_closes_the_database_before_returning() {
    let dir = tempfile::tempdir().expect("tempdir");
    for round in 0..3u32 {
        let (node, addr) =
            start_node(&dir.path().join("m"), "").await.unwrap_or_else(|e| panic!("start in round {round}: {e}"));
        let client = magnetar_metastore::client::MetaClient::connect(std::slice::from_ref(&addr)).expect("client");
        let before = client.get("/round").await.expect("get").map(|kv| kv.value);
        let expected = (round > 0).then(|| (round - 1).to_string().into_bytes());
        assert_eq!(before, expected, "round {round} reads what the previous node wrote");
        client.put("/round", round.to_string(), Default::default()).await.expect("put");
        drop(client);
        node.stop().await;
        let reopened = magnetar_metastore::store::open_db(&dir.path().join("m"));
        assert!(reopened.is_ok(), "round {round}: the database is still open after stop: {:?}", reopened.err());
    }
}
