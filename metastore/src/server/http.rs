//! The metastore node's HTTP endpoint: `/metrics` with Raft state (term, log and apply
//! indexes, leadership, membership, replication lag seen by a leader) and process series.

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use magnetar_common::metrics::TEXT_CONTENT_TYPE;
use openraft::ServerState;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::types::Raft;

#[derive(Clone)]
struct Node {
    raft: Raft,
    id: u64,
}

async fn metrics(State(n): State<Node>) -> impl IntoResponse {
    let m = n.raft.metrics().borrow().clone();
    let mut out = String::new();
    let mut put = |name: &str, help: &str, labels: &str, v: f64| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{node=\"{}\"{labels}}} {v}\n", n.id));
    };
    let last_log = m.last_log_index.unwrap_or(0);
    let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
    put("metastore_raft_term", "Current Raft term", "", m.current_term as f64);
    put("metastore_raft_last_log_index", "Index of the last log entry", "", last_log as f64);
    put(
        "metastore_raft_last_applied_index",
        "Index of the last entry applied to the state machine",
        "",
        applied as f64,
    );
    put(
        "metastore_raft_apply_lag",
        "Log entries written and not yet applied",
        "",
        last_log.saturating_sub(applied) as f64,
    );
    put("metastore_raft_is_leader", "1 on the leader", "", (m.state == ServerState::Leader) as u8 as f64);
    put("metastore_raft_has_leader", "1 when this node knows a leader", "", m.current_leader.is_some() as u8 as f64);
    put(
        "metastore_raft_snapshot_index",
        "Index covered by the last snapshot",
        "",
        m.snapshot.map(|l| l.index).unwrap_or(0) as f64,
    );
    put(
        "metastore_raft_voters",
        "Voting members in the current membership",
        "",
        m.membership_config.membership().voter_ids().count() as f64,
    );
    if let Some(replication) = &m.replication {
        out.push_str("# HELP metastore_raft_follower_lag Entries a follower is behind the leader's log\n# TYPE metastore_raft_follower_lag gauge\n");
        for (peer, matched) in replication {
            let lag = last_log.saturating_sub(matched.map(|l| l.index).unwrap_or(0));
            out.push_str(&format!("metastore_raft_follower_lag{{node=\"{}\",peer=\"{peer}\"}} {lag}\n", n.id));
        }
    }
    out.push_str(&magnetar_common::metrics::process_text());
    ([(header::CONTENT_TYPE, TEXT_CONTENT_TYPE)], out)
}

/// Binds `addr` and serves until `cancel`.
pub(super) async fn serve(
    addr: &str,
    raft: Raft,
    id: u64,
    cancel: CancellationToken,
    tasks: &TaskTracker,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new().route("/metrics", get(metrics)).with_state(Node { raft, id });
    tasks.spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned()).await {
            tracing::error!(error = %e, "metastore HTTP server failed");
        }
    });
    Ok(bound)
}
