//! Graceful shutdown on SIGINT/SIGTERM.
//!
//! The first signal cancels a [`CancellationToken`] that servers watch to
//! stop accepting work and drain. A second signal means the operator has run
//! out of patience (Ctrl-C pressed twice), so the process exits immediately.

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Tracks spawned tasks so shutdown can wait for them to drain.
pub use tokio_util::task::TaskTracker;

/// Exit code for the forced exit on a second signal: 128 + SIGINT, what
/// shells report for a process killed by Ctrl-C.
pub const FORCED_EXIT_CODE: i32 = 130;

/// Returns a token that is cancelled on the first SIGINT or SIGTERM.
///
/// Must be called inside a tokio runtime. Handlers are registered before this
/// returns, so a signal arriving right afterwards is not lost. If
/// registration fails (no signal driver), the error is logged and the token
/// is simply never cancelled by signals; the process then keeps the default
/// signal behaviour, which still terminates it.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(sigint), Ok(sigterm)) => {
            tokio::spawn(watch_signals(sigint, sigterm, token.clone()));
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot install signal handlers; graceful shutdown disabled");
        }
    }
    token
}

async fn watch_signals(mut sigint: Signal, mut sigterm: Signal, token: CancellationToken) {
    let mut received = 0u32;
    loop {
        let name = tokio::select! {
            s = sigint.recv() => s.map(|()| "SIGINT"),
            s = sigterm.recv() => s.map(|()| "SIGTERM"),
        };
        // `None` means the signal driver is gone (runtime shutting down).
        let Some(name) = name else { return };
        received += 1;
        if received == 1 {
            tracing::info!(signal = name, "received signal, shutting down gracefully (repeat to force)");
            token.cancel();
        } else {
            tracing::warn!(signal = name, "received second signal, exiting immediately");
            std::process::exit(FORCED_EXIT_CODE);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is the failure report in tests
mod tests {
    use super::*;
    use std::time::Duration;

    // The only test that delivers a real signal: every live listener in this
    // process sees it, and a second one would exit the test binary, so no
    // other test may send signals or rely on a token staying uncancelled.
    #[tokio::test]
    async fn sigterm_cancels_token() {
        let token = shutdown_on_signals();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!token.is_cancelled());

        let status =
            std::process::Command::new("kill").args(["-TERM", &std::process::id().to_string()]).status().unwrap();
        assert!(status.success());
        tokio::time::timeout(Duration::from_secs(5), token.cancelled()).await.unwrap();
    }

    #[tokio::test]
    async fn task_tracker_waits_for_tasks() {
        let tracker = TaskTracker::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tracker.spawn(async move {
            let _ = rx.await;
        });
        tracker.close();
        assert!(tokio::time::timeout(Duration::from_millis(20), tracker.wait()).await.is_err());
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await.unwrap();
    }
}
