//! The client API (`magnetar.metastore.v1.Metastore`).
//!
//! Writes go through Raft on the leader; a follower answers NotLeader with the leader's
//! address. Reads are linearizable through openraft's read index unless the request asks for a
//! stale read, which any node serves from its applied state.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use magnetar_proto::metastore as pb;
use magnetar_proto::metastore::metastore_server::Metastore;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::proposer::Proposer;
use super::read_barrier::ReadBarrier;
use super::sessions::Leases;
use crate::config::MetastoreConfig;
use crate::error::MetaError;
use crate::store::sm::SmShared;
use crate::types::{Command, CommandResult, Op, Outcome, Raft, StoredValue, TxnOp};

/// How long a write or read barrier may wait for the cluster before answering Unavailable.
const CLUSTER_WAIT: Duration = Duration::from_secs(10);

pub(crate) struct Api {
    raft: Raft,
    proposer: Proposer,
    reads: ReadBarrier,
    sm: Arc<SmShared>,
    leases: Arc<Leases>,
    cfg: MetastoreConfig,
    cancel: CancellationToken,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

pub(crate) fn kv_to_wire(key: &str, v: &StoredValue) -> pb::KeyValue {
    pb::KeyValue {
        key: key.to_owned(),
        value: v.value.clone(),
        version: v.version,
        create_revision: v.create_revision,
        session_id: v.session,
    }
}

fn request_key(id: Option<pb::RequestId>) -> Option<(u64, u64)> {
    id.filter(|r| r.client_id != 0).map(|r| (r.client_id, r.seq))
}

impl Api {
    pub(crate) fn new(
        raft: Raft,
        sm: Arc<SmShared>,
        leases: Arc<Leases>,
        cfg: MetastoreConfig,
        cancel: CancellationToken,
    ) -> Self {
        let reads = ReadBarrier::start(raft.clone(), CLUSTER_WAIT, cancel.clone());
        let proposer = Proposer::start(raft.clone(), CLUSTER_WAIT, cancel.clone());
        Api { raft, proposer, reads, sm, leases, cfg, cancel }
    }

    fn header(&self, revision: u64) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader { revision, node_id: self.cfg.node_id })
    }

    fn leader_hint(&self) -> MetaError {
        let m = self.raft.metrics();
        let m = m.borrow();
        let leader_id = m.current_leader;
        let leader_addr = leader_id
            .and_then(|id| m.membership_config.nodes().find(|(nid, _)| **nid == id).map(|(_, n)| n.addr.clone()));
        MetaError::NotLeader { leader_id, leader_addr }
    }

    fn ensure_leader(&self) -> Result<(), MetaError> {
        let m = self.raft.metrics();
        let is_leader = {
            let m = m.borrow();
            m.state == ServerState::Leader && m.current_leader == Some(self.cfg.node_id)
        };
        if is_leader {
            Ok(())
        } else {
            Err(self.leader_hint())
        }
    }

    fn check_key(&self, key: &str) -> Result<(), MetaError> {
        if key.is_empty() {
            return Err(MetaError::InvalidArgument { field: "key", reason: "must not be empty".into() });
        }
        if key.len() > self.cfg.limits.max_key_bytes {
            return Err(MetaError::InvalidArgument {
                field: "key",
                reason: format!(
                    "{} bytes exceeds the limit of {} (limits.max_key_bytes)",
                    key.len(),
                    self.cfg.limits.max_key_bytes
                ),
            });
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<(), MetaError> {
        if value.len() > self.cfg.limits.max_value_bytes {
            return Err(MetaError::InvalidArgument {
                field: "value",
                reason: format!(
                    "{} bytes exceeds the limit of {} (limits.max_value_bytes)",
                    value.len(),
                    self.cfg.limits.max_value_bytes
                ),
            });
        }
        Ok(())
    }

    async fn write(&self, cmd: Command) -> Result<CommandResult, MetaError> {
        self.proposer.propose(cmd).await
    }

    async fn read_barrier(&self, stale: bool) -> Result<(), MetaError> {
        if stale {
            return Ok(());
        }
        self.reads.wait().await
    }

    async fn blocking_read<T, F>(&self, f: F) -> Result<T, MetaError>
    where
        F: FnOnce(&SmShared) -> Result<T, MetaError> + Send + 'static,
        T: Send + 'static,
    {
        let sm = self.sm.clone();
        tokio::task::spawn_blocking(move || f(&sm)).await.map_err(|_| MetaError::ShuttingDown)?
    }

    fn status(&self) -> pb::ClusterStatusResponse {
        let m = self.raft.metrics();
        let m = m.borrow();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, n)| pb::Member { id: *id, addr: n.addr.clone(), voter: voters.contains(id) })
            .collect();
        let leader_addr = m
            .current_leader
            .and_then(|id| membership.nodes().find(|(nid, _)| **nid == id).map(|(_, n)| n.addr.clone()))
            .unwrap_or_default();
        pb::ClusterStatusResponse {
            node_id: self.cfg.node_id,
            leader_id: m.current_leader,
            leader_addr,
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
            state: format!("{:?}", m.state),
            members,
        }
    }

    async fn change_membership(&self, change: ChangeMembers<u64, BasicNode>) -> Result<(), MetaError> {
        self.ensure_leader()?;
        match tokio::time::timeout(Duration::from_secs(60), self.raft.change_membership(change, false)).await {
            Err(_) => Err(MetaError::Unavailable { reason: "membership change timed out".into() }),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => Err(self.leader_hint()),
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => Err(membership_error(e)),
            Ok(Err(RaftError::Fatal(source))) => Err(MetaError::fatal(source)),
        }
    }
}

fn membership_error(e: ChangeMembershipError<u64>) -> MetaError {
    MetaError::InvalidArgument { field: "membership", reason: e.to_string() }
}

fn bad_version(key: String, expected: u64, actual: u64) -> Status {
    MetaError::BadVersion { key, expected, actual }.into()
}

#[tonic::async_trait]
impl Metastore for Api {
    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let req = req.into_inner();
        self.check_key(&req.key)?;
        self.read_barrier(req.stale).await?;
        let key = req.key;
        let (rev, v) = self
            .blocking_read(move |sm| {
                let rev = sm.revision();
                Ok((rev, sm.get(&key)?.map(|v| kv_to_wire(&key, &v))))
            })
            .await?;
        Ok(Response::new(pb::GetResponse { header: self.header(rev), kv: v }))
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let req = req.into_inner();
        self.check_key(&req.key)?;
        self.check_value(&req.value)?;
        let cmd = Command {
            request: request_key(req.request_id),
            op: Op::Put { key: req.key, value: req.value, expected: req.expected_version, session: req.session_id },
        };
        let res = self.write(cmd).await?;
        match res.outcome {
            Outcome::Put { version } => {
                Ok(Response::new(pb::PutResponse { header: self.header(res.revision), version }))
            }
            Outcome::BadVersion { key, expected, actual } => Err(bad_version(key, expected, actual)),
            Outcome::NoSuchSession(id) => Err(MetaError::NoSuchSession(id).into()),
            other => Err(Status::internal(format!("unexpected put outcome {other:?}"))),
        }
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        let req = req.into_inner();
        self.check_key(&req.key)?;
        let cmd = Command {
            request: request_key(req.request_id),
            op: Op::Delete { key: req.key, expected: req.expected_version },
        };
        let res = self.write(cmd).await?;
        match res.outcome {
            Outcome::Deleted(deleted) => {
                Ok(Response::new(pb::DeleteResponse { header: self.header(res.revision), deleted }))
            }
            Outcome::BadVersion { key, expected, actual } => Err(bad_version(key, expected, actual)),
            other => Err(Status::internal(format!("unexpected delete outcome {other:?}"))),
        }
    }

    async fn range(&self, req: Request<pb::RangeRequest>) -> Result<Response<pb::RangeResponse>, Status> {
        let req = req.into_inner();
        if req.prefix.len() > self.cfg.limits.max_key_bytes {
            return Err(MetaError::InvalidArgument {
                field: "prefix",
                reason: "longer than limits.max_key_bytes".into(),
            }
            .into());
        }
        let limit = match req.limit as usize {
            0 => self.cfg.limits.default_page,
            n => n.min(self.cfg.limits.max_page),
        };
        self.read_barrier(req.stale).await?;
        let (rev, (kvs, more)) = self
            .blocking_read(move |sm| {
                let rev = sm.revision();
                Ok((rev, sm.range(&req.prefix, &req.start_after, limit, req.keys_only)?))
            })
            .await?;
        let kvs = kvs.iter().map(|kv| kv_to_wire(&kv.key, &kv.value)).collect();
        Ok(Response::new(pb::RangeResponse { header: self.header(rev), kvs, more }))
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let req = req.into_inner();
        if req.compares.len() + req.ops.len() > self.cfg.limits.max_txn_ops {
            return Err(MetaError::InvalidArgument {
                field: "ops",
                reason: format!("more than {} compares and ops (limits.max_txn_ops)", self.cfg.limits.max_txn_ops),
            }
            .into());
        }
        let mut compares = Vec::with_capacity(req.compares.len());
        for c in req.compares {
            self.check_key(&c.key)?;
            compares.push((c.key, c.expected_version));
        }
        let mut ops = Vec::with_capacity(req.ops.len());
        let mut total = 0usize;
        for op in req.ops {
            match op.op {
                Some(pb::txn_op::Op::Put(p)) => {
                    self.check_key(&p.key)?;
                    self.check_value(&p.value)?;
                    total += p.value.len();
                    ops.push(TxnOp::Put { key: p.key, value: p.value, session: p.session_id });
                }
                Some(pb::txn_op::Op::Delete(d)) => {
                    self.check_key(&d.key)?;
                    ops.push(TxnOp::Delete { key: d.key });
                }
                None => {
                    return Err(MetaError::InvalidArgument {
                        field: "ops",
                        reason: "an op names neither put nor delete".into(),
                    }
                    .into())
                }
            }
        }
        if total > self.cfg.limits.max_value_bytes * 2 {
            return Err(MetaError::InvalidArgument {
                field: "ops",
                reason: format!("{total} value bytes in one transaction exceeds twice limits.max_value_bytes"),
            }
            .into());
        }
        let res = self.write(Command { request: request_key(req.request_id), op: Op::Txn { compares, ops } }).await?;
        match res.outcome {
            Outcome::Txn { succeeded, failed_compare, actual_version } => Ok(Response::new(pb::TxnResponse {
                header: self.header(res.revision),
                succeeded,
                failed_compare,
                actual_version,
            })),
            Outcome::NoSuchSession(id) => Err(MetaError::NoSuchSession(id).into()),
            other => Err(Status::internal(format!("unexpected txn outcome {other:?}"))),
        }
    }

    type WatchStream = BoxStream<pb::WatchResponse>;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let req = req.into_inner();
        let rx = super::watch::start(self.sm.clone(), req.prefix, req.start_revision, self.cancel.clone())?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn next_id(&self, req: Request<pb::NextIdRequest>) -> Result<Response<pb::NextIdResponse>, Status> {
        let req = req.into_inner();
        self.check_key(&req.name)?;
        let res =
            self.write(Command { request: request_key(req.request_id), op: Op::NextId { name: req.name } }).await?;
        match res.outcome {
            Outcome::Id(id) => Ok(Response::new(pb::NextIdResponse { header: self.header(res.revision), id })),
            other => Err(Status::internal(format!("unexpected next_id outcome {other:?}"))),
        }
    }

    async fn session_create(
        &self,
        req: Request<pb::SessionCreateRequest>,
    ) -> Result<Response<pb::SessionCreateResponse>, Status> {
        let req = req.into_inner();
        let s = &self.cfg.sessions;
        let ttl_ms = req.ttl_ms.clamp(s.min_ttl_ms, s.max_ttl_ms);
        let res =
            self.write(Command { request: request_key(req.request_id), op: Op::CreateSession { ttl_ms } }).await?;
        match res.outcome {
            Outcome::SessionCreated { id, ttl_ms } => {
                self.leases.touch(&self.sm, id);
                Ok(Response::new(pb::SessionCreateResponse {
                    header: self.header(res.revision),
                    session_id: id,
                    ttl_ms,
                }))
            }
            other => Err(Status::internal(format!("unexpected session outcome {other:?}"))),
        }
    }

    type SessionKeepAliveStream = BoxStream<pb::KeepAliveResponse>;

    async fn session_keep_alive(
        &self,
        req: Request<Streaming<pb::KeepAliveRequest>>,
    ) -> Result<Response<Self::SessionKeepAliveStream>, Status> {
        self.ensure_leader()?;
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let (raft, sm, leases, me, cancel, reads) = (
            self.raft.clone(),
            self.sm.clone(),
            self.leases.clone(),
            self.cfg.node_id,
            self.cancel.clone(),
            self.reads.clone(),
        );
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = cancel.cancelled() => return,
                    m = inbound.next() => m,
                };
                let Some(Ok(msg)) = msg else { return };
                let leading = {
                    let m = raft.metrics();
                    let m = m.borrow();
                    m.state == ServerState::Leader && m.current_leader == Some(me)
                };
                let reply = if !leading {
                    Err(Status::from(MetaError::NotLeader { leader_id: None, leader_addr: None }))
                } else {
                    // Leadership is confirmed with a quorum (a read-index round begun after the
                    // keep-alive arrived) before the lease is extended: a leader cut off from
                    // the others stays leader until it hears a higher term, and acknowledging
                    // there would keep a session alive that the new leader expires (its
                    // ephemeral keys deleted, its owner still believing it holds them). The
                    // round also catches up to the commit point, so a new leader knows a
                    // session created just before it took over.
                    if reads.wait().await.is_err() {
                        let e = MetaError::Unavailable { reason: "cannot confirm leadership".into() };
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                    match leases.touch(&sm, msg.session_id) {
                        Some(ttl_ms) => Ok(pb::KeepAliveResponse { session_id: msg.session_id, ttl_ms }),
                        None => Err(MetaError::NoSuchSession(msg.session_id).into()),
                    }
                };
                let stop = reply.is_err();
                if tx.send(reply).await.is_err() || stop {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn session_close(
        &self,
        req: Request<pb::SessionCloseRequest>,
    ) -> Result<Response<pb::SessionCloseResponse>, Status> {
        let id = req.into_inner().session_id;
        let res = self.write(Command { request: None, op: Op::CloseSession { id, expired: false } }).await?;
        self.leases.forget(id);
        match res.outcome {
            Outcome::SessionClosed(_) => {
                Ok(Response::new(pb::SessionCloseResponse { header: self.header(res.revision) }))
            }
            other => Err(Status::internal(format!("unexpected close outcome {other:?}"))),
        }
    }

    async fn cluster_status(
        &self,
        _req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        Ok(Response::new(self.status()))
    }

    async fn cluster_add(
        &self,
        req: Request<pb::ClusterAddRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let req = req.into_inner();
        if req.id == 0 || !req.addr.contains(':') {
            return Err(
                MetaError::InvalidArgument { field: "id/addr", reason: "need an id > 0 and host:port".into() }.into()
            );
        }
        self.ensure_leader()?;
        let node = BasicNode { addr: req.addr };
        // Blocks until the learner has caught up with the log (or a snapshot).
        match tokio::time::timeout(Duration::from_secs(120), self.raft.add_learner(req.id, node, true)).await {
            Err(_) => {
                return Err(MetaError::Unavailable { reason: "the learner did not catch up in time".into() }.into())
            }
            Ok(Ok(_)) => {}
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                return Err(self.leader_hint().into())
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                return Err(membership_error(e).into())
            }
            Ok(Err(RaftError::Fatal(source))) => return Err(MetaError::fatal(source).into()),
        }
        if req.promote {
            self.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([req.id]))).await?;
        }
        Ok(Response::new(self.status()))
    }

    async fn cluster_promote(
        &self,
        req: Request<pb::ClusterPromoteRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let id = req.into_inner().id;
        self.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id]))).await?;
        Ok(Response::new(self.status()))
    }

    async fn cluster_remove(
        &self,
        req: Request<pb::ClusterRemoveRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let id = req.into_inner().id;
        let (is_voter, known) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let mem = m.membership_config.membership();
            let voters: BTreeSet<u64> = mem.voter_ids().collect();
            let nodes: BTreeMap<u64, BasicNode> = mem.nodes().map(|(i, n)| (*i, n.clone())).collect();
            (voters.contains(&id), nodes.contains_key(&id))
        };
        if !known {
            return Err(MetaError::InvalidArgument { field: "id", reason: format!("node {id} is not a member") }.into());
        }
        let change = if is_voter {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.change_membership(change).await?;
        Ok(Response::new(self.status()))
    }
}
