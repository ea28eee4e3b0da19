//! `magnetar meta …`: the metastore from the command line.

use anyhow::Context;
use clap::{Args, Subcommand};
use std::time::Duration;

use magnetar_metastore::client::{ClientOptions, EventKind, MetaClient, PutOptions};

#[derive(Args, Debug)]
pub struct MetaArgs {
    /// Metastore endpoints, host:port[,host:port…].
    #[arg(long, env = "MAGNETAR_METASTORE", default_value = "127.0.0.1:2379", value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Give up after this many seconds without an answer.
    #[arg(long, default_value_t = 15)]
    timeout: u64,
    #[command(subcommand)]
    cmd: MetaCmd,
}

#[derive(Subcommand, Debug)]
enum MetaCmd {
    /// Read a key.
    Get {
        key: String,
        /// Serve from any node without a leader round trip (may be behind).
        #[arg(long)]
        stale: bool,
    },
    /// Write a key.
    Put {
        key: String,
        value: String,
        /// Only if the key is at this version (0: only if absent).
        #[arg(long)]
        expect_version: Option<u64>,
    },
    /// Delete a key.
    Del {
        key: String,
        /// Only if the key is at this version.
        #[arg(long)]
        expect_version: Option<u64>,
    },
    /// List keys under a prefix.
    Ls {
        #[arg(default_value = "")]
        prefix: String,
    },
    /// Follow changes under a prefix.
    Watch {
        #[arg(default_value = "")]
        prefix: String,
        /// Start from this revision (default: now).
        #[arg(long, default_value_t = 0)]
        from_revision: u64,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Allocate the next id of a sequence.
    NextId { name: String },
    /// Cluster membership.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Leader, term, log positions and members.
    Status,
    /// Add a node as a learner; `--promote` makes it a voter once caught up.
    Add {
        id: u64,
        addr: String,
        #[arg(long)]
        promote: bool,
    },
    /// Promote a learner to voter.
    Promote { id: u64 },
    /// Remove a node.
    Remove { id: u64 },
}

fn show_value(v: &[u8]) -> String {
    String::from_utf8(v.to_vec()).unwrap_or_else(|_| format!("<{} bytes>", v.len()))
}

pub async fn run(a: MetaArgs) -> anyhow::Result<()> {
    let opts = ClientOptions { request_timeout: Duration::from_secs(a.timeout), ..Default::default() };
    let client = MetaClient::new(&a.endpoints, opts)?;
    match a.cmd {
        MetaCmd::Get { key, stale } => match client.get_with(&key, stale).await? {
            Some(kv) if a.json => println!(
                "{}",
                serde_json::json!({"key": kv.key, "value": show_value(&kv.value), "version": kv.version,
                    "create_revision": kv.create_revision, "session": kv.session})
            ),
            Some(kv) => println!("{}\t(version {})", show_value(&kv.value), kv.version),
            None => anyhow::bail!("key `{key}` not found"),
        },
        MetaCmd::Put { key, value, expect_version } => {
            let v = client.put(&key, value, PutOptions { expected_version: expect_version, session: 0 }).await?;
            println!("version {v}");
        }
        MetaCmd::Del { key, expect_version } => {
            if !client.delete(&key, expect_version).await? {
                anyhow::bail!("key `{key}` not found");
            }
            println!("deleted");
        }
        MetaCmd::Ls { prefix } => {
            for kv in client.list(&prefix).await? {
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({"key": kv.key, "value": show_value(&kv.value), "version": kv.version})
                    );
                } else {
                    println!("{}\t{}\t(version {})", kv.key, show_value(&kv.value), kv.version);
                }
            }
        }
        MetaCmd::Watch { prefix, from_revision, count } => {
            let mut w = client.watch(&prefix, from_revision);
            let mut seen = 0usize;
            loop {
                let batch = w.next().await?;
                for e in batch.events {
                    let kind = match e.kind {
                        EventKind::Put => "PUT",
                        EventKind::Delete => "DELETE",
                    };
                    println!("{}\t{kind}\t{}\t{}", batch.revision, e.key, show_value(&e.value));
                    seen += 1;
                }
                if count.is_some_and(|c| seen >= c) {
                    return Ok(());
                }
            }
        }
        MetaCmd::NextId { name } => println!("{}", client.next_id(&name).await?),
        MetaCmd::Cluster { cmd } => {
            let status = match cmd {
                ClusterCmd::Status => client.cluster_status(None).await?,
                ClusterCmd::Add { id, addr, promote } => client.cluster_add(id, &addr, promote).await?,
                ClusterCmd::Promote { id } => client.cluster_promote(id).await?,
                ClusterCmd::Remove { id } => client.cluster_remove(id).await?,
            };
            print_status(&status, a.json)?;
        }
    }
    Ok(())
}

fn print_status(s: &magnetar_proto::metastore::ClusterStatusResponse, json: bool) -> anyhow::Result<()> {
    if json {
        let members: Vec<_> =
            s.members.iter().map(|m| serde_json::json!({"id": m.id, "addr": m.addr, "voter": m.voter})).collect();
        let v = serde_json::json!({
            "node_id": s.node_id, "leader_id": s.leader_id, "leader_addr": s.leader_addr, "term": s.term,
            "state": s.state, "last_log_index": s.last_log_index, "last_applied": s.last_applied,
            "snapshot_index": s.snapshot_index, "purged_index": s.purged_index, "members": members,
        });
        println!("{}", serde_json::to_string_pretty(&v).context("encoding status")?);
        return Ok(());
    }
    println!("answered by node {} ({})", s.node_id, s.state);
    match s.leader_id {
        Some(l) => println!("leader: node {l} at {} (term {})", s.leader_addr, s.term),
        None => println!("leader: none (term {})", s.term),
    }
    println!(
        "log: last index {}, applied {}, snapshot {}, purged {}",
        s.last_log_index, s.last_applied, s.snapshot_index, s.purged_index
    );
    for m in &s.members {
        println!("  node {}\t{}\t{}", m.id, m.addr, if m.voter { "voter" } else { "learner" });
    }
    Ok(())
}
