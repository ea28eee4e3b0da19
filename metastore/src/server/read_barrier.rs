//! Batched read barriers: concurrent linearizable reads share one read-index round.
//!
//! A read may be served once the leader has confirmed its leadership with a quorum and applied
//! up to the commit index, both *after* the read arrived. Reads that queue while a round runs
//! wait for the next round, which starts after all of them arrived, so sharing it is safe. One
//! heartbeat round then serves any number of reads instead of one each.

use std::time::Duration;

use openraft::error::{CheckIsLeaderError, RaftError};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::MetaError;
use crate::types::Raft;

/// The outcome of one round, shared by every read in it.
#[derive(Clone, Debug)]
enum Round {
    Ok,
    NotLeader { leader_id: Option<u64>, leader_addr: Option<String> },
    Unavailable(String),
    Stopped,
}

impl Round {
    fn into_result(self) -> Result<(), MetaError> {
        match self {
            Round::Ok => Ok(()),
            Round::NotLeader { leader_id, leader_addr } => Err(MetaError::NotLeader { leader_id, leader_addr }),
            Round::Unavailable(reason) => Err(MetaError::Unavailable { reason }),
            Round::Stopped => Err(MetaError::ShuttingDown),
        }
    }
}

type Waiter = oneshot::Sender<Round>;

/// Hands out read barriers, one read-index round per batch of waiting reads.
#[derive(Clone)]
pub(crate) struct ReadBarrier {
    tx: mpsc::UnboundedSender<Waiter>,
}

impl ReadBarrier {
    /// Starts the batching task; it ends with `cancel`.
    pub(crate) fn start(raft: Raft, timeout: Duration, cancel: CancellationToken) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Waiter>();
        tokio::spawn(async move {
            loop {
                let first = tokio::select! {
                    _ = cancel.cancelled() => return,
                    w = rx.recv() => match w { Some(w) => w, None => return },
                };
                let mut batch = vec![first];
                while let Ok(w) = rx.try_recv() {
                    batch.push(w);
                }
                let round = match tokio::time::timeout(timeout, raft.ensure_linearizable()).await {
                    Err(_) => Round::Unavailable("timed out confirming leadership for a read".into()),
                    Ok(Ok(_)) => Round::Ok,
                    Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                        Round::NotLeader { leader_id: f.leader_id, leader_addr: f.leader_node.map(|n| n.addr) }
                    }
                    Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)))) => {
                        Round::Unavailable(e.to_string())
                    }
                    Ok(Err(RaftError::Fatal(_))) => Round::Stopped,
                };
                for w in batch {
                    // A reader that gave up is fine.
                    let _ = w.send(round.clone());
                }
            }
        });
        ReadBarrier { tx }
    }

    /// Resolves once a read that arrived now may be served from the local state machine.
    pub(crate) async fn wait(&self) -> Result<(), MetaError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(tx).map_err(|_| MetaError::ShuttingDown)?;
        rx.await.map_err(|_| MetaError::ShuttingDown)?.into_result()
    }
}
