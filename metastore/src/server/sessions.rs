//! Session liveness, decided by the leader.
//!
//! Keep-alives are not replicated: the leader keeps a deadline per session in memory. When it
//! sees a deadline pass it proposes `CloseSession { expired: true }` through the log, so every
//! replica deletes the session's ephemeral keys at the same revision. A node that becomes
//! leader starts every session's deadline afresh (a full TTL of grace), because it cannot know
//! when the previous leader last heard from each client.

use std::collections::{HashMap, HashSet};
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
    /// Sessions whose deadline passed, their close proposed or about to be: no keep-alive
    /// revives them (their owner would count on a lease whose keys are being deleted).
    expiring: HashSet<u64>,
}

impl Leases {
    /// Records a keep-alive; returns the TTL, or `None` if the session does not exist.
    pub fn touch(&self, sm: &SmShared, id: u64) -> Option<u64> {
        let ttl = sm.session_ttl(id)?;
        let mut s = self.inner.lock().ok()?;
        if s.expiring.contains(&id) {
            return None;
        }
        s.deadlines.insert(id, Instant::now() + Duration::from_millis(ttl));
        Some(ttl)
    }

    /// Forgets a session (closed by its owner).
    pub fn forget(&self, id: u64) {
        if let Ok(mut s) = self.inner.lock() {
            s.deadlines.remove(&id);
            s.expiring.remove(&id);
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
            s.expiring.clear();
        }
        if leading_term.is_none() {
            return Vec::new();
        }
        let now = Instant::now();
        let open = sm.sessions();
        s.deadlines.retain(|id, _| open.contains_key(id));
        s.expiring.retain(|id| open.contains_key(id));
        for (id, ttl) in &open {
            s.deadlines.entry(*id).or_insert_with(|| now + Duration::from_millis(*ttl));
        }
        let expired: Vec<u64> = s.deadlines.iter().filter(|(_, d)| **d <= now).map(|(id, _)| *id).collect();
        s.expiring.extend(expired.iter().copied());
        expired
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sm::{Retention, StateMachine};

    /// Once the leader has found a session's deadline passed (its close is being proposed), a
    /// keep-alive arriving before the close commits must not be acknowledged: its owner would
    /// count on a lease whose keys are being deleted. A new term gives every session fresh grace.
    #[tokio::test]
    async fn a_session_being_expired_takes_no_keep_alive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = crate::store::open_db(&dir.path().join("db")).expect("db");
        let sm = StateMachine::new(db, dir.path().join("snapshots"), Retention { event_revisions: 100 }).expect("sm");
        let sm = sm.shared();
        sm.open_session_for_test(7, 50);
        let leases = Leases::default();
        assert!(leases.sweep(&sm, Some(1)).is_empty());
        assert_eq!(leases.touch(&sm, 7), Some(50), "a live session is extended");
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(leases.sweep(&sm, Some(1)), vec![7]);
        assert_eq!(leases.touch(&sm, 7), None, "a keep-alive revived a session being expired");
        assert_eq!(leases.sweep(&sm, Some(1)), vec![7], "still expired, the close is proposed again");
        assert!(leases.sweep(&sm, Some(2)).is_empty());
        assert_eq!(leases.touch(&sm, 7), Some(50), "a new leader gives fresh grace");
    }
}
