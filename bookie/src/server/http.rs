//! The bookie's HTTP endpoint: `/metrics` (Prometheus text), `/api/v1/bookie/state` and
//! `/api/v1/bookie/is_ready` (probes), named as BookKeeper's so existing probes and dashboards
//! work.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use magnetar_common::metrics::TEXT_CONTENT_TYPE;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Core;
use crate::error::{BookieError, Result};

async fn metrics(State(core): State<Arc<Core>>) -> impl IntoResponse {
    let mut text = core.registry.render();
    text.push_str(&magnetar_common::metrics::process_text());
    ([(header::CONTENT_TYPE, TEXT_CONTENT_TYPE)], text)
}

async fn state(State(core): State<Arc<Core>>) -> impl IntoResponse {
    let body = serde_json::json!({
        "running": !core.is_shutting_down(),
        "readOnly": core.is_read_only(),
        "shuttingDown": core.is_shutting_down(),
        "availableForHighPriorityWrites": !core.is_shutting_down(),
    });
    ([(header::CONTENT_TYPE, "application/json")], body.to_string())
}

async fn is_ready(State(core): State<Arc<Core>>) -> impl IntoResponse {
    if core.is_ready() {
        (StatusCode::OK, "OK")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "Bookie is not ready")
    }
}

/// Binds `addr` and serves until `cancel`.
pub(crate) async fn serve(
    addr: &str,
    core: Arc<Core>,
    cancel: CancellationToken,
    tasks: &TaskTracker,
) -> Result<SocketAddr> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|e| BookieError::io(format!("binding HTTP {addr}"), e))?;
    let bound = listener.local_addr().map_err(|e| BookieError::io("reading the HTTP address", e))?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/v1/bookie/state", get(state))
        .route("/api/v1/bookie/is_ready", get(is_ready))
        .with_state(core);
    tasks.spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned()).await {
            tracing::error!(error = %e, "bookie HTTP server failed");
        }
    });
    Ok(bound)
}
