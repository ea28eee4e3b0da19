//! Session liveness, decided by the leader.
//!
//! Keep-alives are not replicated: the leader keeps a deadline per session in memory. When it
//! sees a deadline pass it proposes `CloseSession { expired: true }` through the log, so every
//! replica deletes the session's ephemeral keys at the same revision. A node that becomes
//! leader starts every session's deadline afresh (a full TTL of grace), because it cannot know
//! when the previous leader last heard from each client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::ServerState;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::store::sm::SmShared;
use crate::types::{Command, Op, Proposal, Raft};

/// The leader's view of session deadlines.
#[derive(Default)]
pub struct Leases {
    inner: Mutex<LeaseState>,
}

#[derive(Default)]
struct LeaseState {
    /// Term in which this node led and tracked deadlines; `None` when not leader.
    term: Option<u64>,
    deadlines: HashMap<u64, Instant>,
}

impl Leases {
    /// Records a keep-alive; returns the TTL, or `None` if the session does not exist.
    pub fn touch(&self, sm: &SmShared, id: u64) -> Option<u64> {
        let ttl = sm.session_ttl(id)?;
        if let Ok(mut s) = self.inner.lock() {
            s.deadlines.insert(id, Instant::now() + Duration::from_millis(ttl));
        }
        Some(ttl)
    }

    /// Forgets a session (closed by its owner).
    pub fn forget(&self, id: u64) {
        if let Ok(mut s) = self.inner.lock() {
            s.deadlines.remove(&id);
        }
    }

    /// One pass: returns the sessions whose deadline passed, if this node leads in `term`.
    fn sweep(&self, sm: &SmShared, leading_term: Option<u64>) -> Vec<u64> {
        let Ok(mut s) = self.inner.lock() else {
            return Vec::new();
        };
        if s.term != leading_term {
            // Leadership changed: fresh grace for everyone.
            s.term = leading_term;
            s.deadlines.clear();
        }
        if leading_term.is_none() {
            return Vec::new();
        }
        let now = Instant::now();
        let open = sm.sessions();
        s.deadlines.retain(|id, _| open.contains_key(id));
        for (id, ttl) in &open {
            s.deadlines.entry(*id).or_insert_with(|| now + Duration::from_millis(*ttl));
        }
        s.deadlines.iter().filter(|(_, d)| **d <= now).map(|(id, _)| *id).collect()
    }
}

/// Expires sessions while this node is the leader.
pub(crate) async fn expiry_loop(
    raft: Raft,
    sm: Arc<SmShared>,
    leases: Arc<Leases>,
    me: u64,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let leading_term = {
            let m = raft.metrics();
            let m = m.borrow();
            (m.state == ServerState::Leader && m.current_leader == Some(me)).then_some(m.current_term)
        };
        for id in leases.sweep(&sm, leading_term) {
            let cmd = Command { request: None, op: Op::CloseSession { id, expired: true } };
            let proposal = Proposal { commands: vec![cmd] };
            match tokio::time::timeout(Duration::from_secs(5), raft.client_write(proposal)).await {
                Ok(Ok(_)) => {
                    tracing::info!(session = id, "session expired; its ephemeral keys were deleted");
                    leases.forget(id);
                }
                Ok(Err(e)) => tracing::debug!(session = id, error = %e, "could not expire session"),
                Err(_) => tracing::debug!(session = id, "expiring session timed out"),
            }
        }
    }
}
