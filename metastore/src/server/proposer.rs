//! Write batching: concurrent writes become one Raft log entry.
//!
//! openraft 0.9 writes and fdatasyncs each leader entry before it takes the next, so one entry
//! per write caps a node at one write per fsync. The proposer instead queues writes and, while
//! earlier batches are in flight (up to `IN_FLIGHT`), gathers the next one: under load a
//! single entry, fsync and replication round carry hundreds of writes; an idle node still
//! sends each write at once.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::error::MetaError;
use crate::types::{Command, CommandResult, Proposal, Raft, MAX_BATCH};

/// Batches in flight at once: one being written on the leader while the next replicates.
const IN_FLIGHT: usize = 4;
/// Soft cap on the key and value bytes in one entry.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// Why a batch failed, shared by every write in it.
#[derive(Clone, Debug)]
enum Failure {
    NotLeader { leader_id: Option<u64>, leader_addr: Option<String> },
    Unavailable(String),
    Membership(String),
    Stopped,
    Internal(String),
}

impl From<Failure> for MetaError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::NotLeader { leader_id, leader_addr } => MetaError::NotLeader { leader_id, leader_addr },
            Failure::Unavailable(reason) => MetaError::Unavailable { reason },
            Failure::Membership(reason) => MetaError::InvalidArgument { field: "membership", reason },
            Failure::Stopped => MetaError::ShuttingDown,
            Failure::Internal(reason) => MetaError::Unavailable { reason },
        }
    }
}

type Reply = oneshot::Sender<Result<CommandResult, Failure>>;

/// The write queue in front of Raft.
#[derive(Clone)]
pub(crate) struct Proposer {
    tx: mpsc::Sender<(Command, Reply)>,
}

fn size_of(cmd: &Command) -> usize {
    use crate::types::{Op, TxnOp};
    match &cmd.op {
        Op::Put { key, value, .. } => key.len() + value.len(),
        Op::Txn { compares, ops } => {
            compares.iter().map(|(k, _)| k.len()).sum::<usize>()
                + ops
                    .iter()
                    .map(|o| match o {
                        TxnOp::Put { key, value, .. } => key.len() + value.len(),
                        TxnOp::Delete { key } => key.len(),
                    })
                    .sum::<usize>()
        }
        Op::Delete { key, .. } => key.len(),
        Op::NextId { name } => name.len(),
        Op::CreateSession { .. } | Op::CloseSession { .. } => 16,
    }
}

impl Proposer {
    /// Starts the batching task; it ends with `cancel`.
    pub(crate) fn start(raft: Raft, commit_wait: Duration, cancel: CancellationToken) -> Self {
        let (tx, mut rx) = mpsc::channel::<(Command, Reply)>(16 * MAX_BATCH);
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(IN_FLIGHT));
            let mut carry: Option<(Command, Reply)> = None;
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else { return };
                let first = match carry.take() {
                    Some(item) => item,
                    None => tokio::select! {
                        _ = cancel.cancelled() => return,
                        item = rx.recv() => match item { Some(item) => item, None => return },
                    },
                };
                let mut bytes = size_of(&first.0);
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    let Ok(item) = rx.try_recv() else { break };
                    let size = size_of(&item.0);
                    if bytes + size > MAX_BATCH_BYTES {
                        carry = Some(item);
                        break;
                    }
                    bytes += size;
                    batch.push(item);
                }
                let raft = raft.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let (commands, replies): (Vec<Command>, Vec<Reply>) = batch.into_iter().unzip();
                    let n = commands.len();
                    let outcome = match tokio::time::timeout(commit_wait, raft.client_write(Proposal { commands }))
                        .await
                    {
                        Err(_) => Err(Failure::Unavailable("timed out waiting for the write to commit".into())),
                        Ok(Ok(resp)) if resp.data.len() == n => Ok(resp.data),
                        Ok(Ok(resp)) => Err(Failure::Internal(format!("{n} writes answered with {}", resp.data.len()))),
                        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => Err(Failure::NotLeader {
                            leader_id: f.leader_id,
                            leader_addr: f.leader_node.map(|n| n.addr),
                        }),
                        Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                            Err(Failure::Membership(e.to_string()))
                        }
                        Ok(Err(RaftError::Fatal(_))) => Err(Failure::Stopped),
                    };
                    match outcome {
                        Ok(results) => {
                            for (reply, r) in replies.into_iter().zip(results) {
                                let _ = reply.send(Ok(r));
                            }
                        }
                        Err(f) => {
                            for reply in replies {
                                let _ = reply.send(Err(f.clone()));
                            }
                        }
                    }
                });
            }
        });
        Proposer { tx }
    }

    /// Replicates and applies one command; resolves with its result.
    pub(crate) async fn propose(&self, cmd: Command) -> Result<CommandResult, MetaError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((cmd, tx)).await.map_err(|_| MetaError::ShuttingDown)?;
        Ok(rx.await.map_err(|_| MetaError::ShuttingDown)??)
    }
}
