//! The Raft transport's server side: decode, hand to openraft, encode the result (errors
//! included, so the sender sees the remote Raft error as such).

use magnetar_proto::metastore::raft_server::Raft as RaftRpc;
use magnetar_proto::metastore::RaftPayload;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use crate::types::Raft;

pub(crate) struct RaftApi {
    raft: Raft,
}

impl RaftApi {
    pub(crate) fn new(raft: Raft) -> Self {
        RaftApi { raft }
    }
}

// `tonic::Status` is what the handlers must return; boxing it here would only move the cost.
#[allow(clippy::result_large_err)]
fn decode<T: DeserializeOwned>(req: Request<RaftPayload>) -> Result<T, Status> {
    bincode::deserialize(&req.into_inner().data)
        .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))
}

#[allow(clippy::result_large_err)]
fn encode<T: Serialize>(v: &T) -> Result<Response<RaftPayload>, Status> {
    bincode::serialize(v)
        .map(|data| Response::new(RaftPayload { data }))
        .map_err(|e| Status::internal(format!("cannot encode raft reply: {e}")))
}

#[tonic::async_trait]
impl RaftRpc for RaftApi {
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let r = self.raft.append_entries(decode(req)?).await;
        encode(&r)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let r = self.raft.vote(decode(req)?).await;
        encode(&r)
    }

    async fn install_snapshot(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let r = self.raft.install_snapshot(decode(req)?).await;
        encode(&r)
    }
}
