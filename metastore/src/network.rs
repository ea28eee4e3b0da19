//! Raft transport over gRPC: openraft messages are bincode-encoded into `RaftPayload` and sent
//! on the same port as the client API. A peer that cannot be reached is reported as
//! `Unreachable` so openraft backs off instead of spinning.

use std::time::Duration;

use magnetar_proto::metastore::raft_client::RaftClient;
use magnetar_proto::metastore::RaftPayload;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::types::{NodeId, TypeConfig};

/// Builds one client per peer.
#[derive(Clone, Default)]
pub struct Network {}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        let channel = Endpoint::from_shared(format!("http://{}", node.addr))
            .map(|e| e.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true).connect_lazy());
        PeerClient { target, addr: node.addr.clone(), channel: channel.ok() }
    }
}

/// The connection to one peer.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    channel: Option<Channel>,
}

/// Raised when a peer's address does not parse as a URI.
#[derive(Debug, thiserror::Error)]
#[error("peer {target} has an unusable address `{addr}`")]
struct BadAddress {
    target: NodeId,
    addr: String,
}

/// A transport-level failure talking to a peer.
#[derive(Debug, thiserror::Error)]
#[error("rpc to peer {target} failed: {status}")]
struct TransportError {
    target: NodeId,
    status: tonic::Status,
}

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        kind: Kind,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(channel) = self.channel.clone() else {
            return Err(RPCError::Unreachable(Unreachable::new(&BadAddress {
                target: self.target,
                addr: self.addr.clone(),
            })));
        };
        let data = bincode::serialize(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(RaftPayload { data });
        request.set_timeout(option.hard_ttl());
        let mut client = RaftClient::new(channel)
            .max_decoding_message_size(usize::MAX >> 1)
            .max_encoding_message_size(usize::MAX >> 1);
        let reply = match kind {
            Kind::Append => client.append_entries(request).await,
            Kind::Vote => client.vote(request).await,
            Kind::Snapshot => client.install_snapshot(request).await,
        };
        let payload = reply.map_err(|status| {
            let err = TransportError { target: self.target, status };
            match err.status.code() {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                    RPCError::Unreachable(Unreachable::new(&err))
                }
                _ => RPCError::Network(NetworkError::new(&err)),
            }
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            bincode::deserialize(&payload.into_inner().data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

enum Kind {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Kind::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        self.call(Kind::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Kind::Vote, &rpc, &option).await
    }
}
