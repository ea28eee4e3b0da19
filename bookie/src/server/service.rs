//! The bookie's gRPC service: pipelined adds over a bidirectional stream, reads (plain and
//! fencing recovery reads), LAC, fence and delete. Blocking storage work runs on the blocking
//! pool; adds go through the journal, whose callbacks answer on the stream.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use magnetar_proto::bookie as pb;
use magnetar_proto::bookie::bookie_server::Bookie as BookieRpc;
use pb::Code;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status, Streaming};

use super::Core;
use crate::checksum::entry_checksum;
use crate::error::BookieError;
use crate::journal::Op;

/// Longest master key accepted (ledger clients use 16 bytes).
pub const MAX_MASTER_KEY: usize = 1024;

/// The gRPC handler.
pub struct Service {
    pub(crate) core: Arc<Core>,
    /// Ends open add streams when the bookie stops.
    pub(crate) cancel: tokio_util::sync::CancellationToken,
}

type AddStream = Pin<Box<dyn Stream<Item = Result<pb::AddResults, Status>> + Send>>;

fn add_result(ledger: u64, entry: i64, r: Result<i64, BookieError>) -> pb::AddResult {
    match r {
        Ok(_) => pb::AddResult { ledger_id: ledger, entry_id: entry, code: Code::Ok as i32, message: String::new() },
        Err(e) => pb::AddResult { ledger_id: ledger, entry_id: entry, code: e.code() as i32, message: e.to_string() },
    }
}

/// A batch's adds for one journal: their ids, to name them in the answers, and the operations.
type JournalBatch = (Vec<(u64, i64)>, Vec<Op>);

impl Core {
    /// Checks a batch of adds and queues it on the journals (one queue operation per journal
    /// it touches); `reply` gets the outcomes, once for the adds refused at once and once per
    /// journal when its adds are durable.
    pub(crate) fn submit_adds<R>(self: &Arc<Self>, adds: Vec<pb::AddRequest>, reply: R)
    where
        R: FnOnce(Vec<pb::AddResult>) + Clone + Send + 'static,
    {
        let journals = self.journals.len();
        let mut queued: Vec<JournalBatch> = (0..journals).map(|_| Default::default()).collect();
        let mut refused = Vec::new();
        for add in adds {
            let (ledger, entry) = (add.ledger_id, add.entry_id);
            if let Err(e) = self.check_add(&add) {
                refused.push(add_result(ledger, entry, Err(e)));
                continue;
            }
            self.metrics.write_bytes.add(add.payload.len() as u64);
            let (ids, ops) = &mut queued[self.journal_index(ledger)];
            ids.push((ledger, entry));
            ops.push(Op::Add {
                ledger,
                entry,
                lac: add.lac,
                checksum: add.checksum,
                payload: add.payload,
                master_key: add.master_key,
                recovery: add.recovery,
            });
        }
        if !refused.is_empty() {
            reply.clone()(refused);
        }
        let started = Instant::now();
        for (journal, (ids, ops)) in queued.into_iter().enumerate() {
            if ops.is_empty() {
                continue;
            }
            let metrics = self.metrics.clone();
            let reply = reply.clone();
            self.journals[journal].submit_batch(
                ops,
                Box::new(move |results| {
                    let n = results.len() as u64;
                    let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
                    metrics.add_ok.add(ok);
                    metrics.add_failed.add(n - ok);
                    metrics.add_latency.observe_duration_ms_many(started.elapsed(), n);
                    reply(ids.into_iter().zip(results).map(|((l, e), r)| add_result(l, e, r)).collect());
                }),
            );
        }
    }

    fn check_add(&self, add: &pb::AddRequest) -> Result<(), BookieError> {
        let (ledger, entry) = (add.ledger_id, add.entry_id);
        if self.is_shutting_down() {
            return Err(BookieError::ShuttingDown);
        }
        if entry < 0 {
            return Err(BookieError::Invalid("entry ids start at 0"));
        }
        if add.payload.len() > self.max_entry {
            return Err(BookieError::Invalid("entry larger than max_entry_bytes"));
        }
        if add.master_key.is_empty() || add.master_key.len() > MAX_MASTER_KEY {
            return Err(BookieError::Invalid("an add needs the ledger's master key (at most 1 KiB)"));
        }
        if entry_checksum(ledger, entry, &add.payload) != add.checksum {
            return Err(BookieError::Corrupt { ledger, entry });
        }
        if self.is_read_only() && !add.recovery {
            return Err(BookieError::ReadOnly);
        }
        Ok(())
    }

    /// Fences a ledger durably; returns its LAC.
    pub(crate) async fn fence(self: &Arc<Self>, ledger: u64, master_key: bytes::Bytes) -> Result<i64, BookieError> {
        if self.is_shutting_down() {
            return Err(BookieError::ShuttingDown);
        }
        if master_key.len() > MAX_MASTER_KEY {
            return Err(BookieError::Invalid("master key longer than 1 KiB"));
        }
        let (tx, rx) = oneshot::channel();
        self.journal_for(ledger).submit(
            Op::Fence { ledger, master_key },
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.await.map_err(|_| BookieError::ShuttingDown)?
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(format!("storage task failed: {e}")))
}

#[tonic::async_trait]
impl BookieRpc for Service {
    type AddStream = AddStream;

    async fn add(&self, req: Request<Streaming<pb::AddBatch>>) -> Result<Response<AddStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::unbounded_channel::<Vec<pb::AddResult>>();
        let core = self.core.clone();
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = cancel.cancelled() => break,
                    m = inbound.message() => m,
                };
                match next {
                    Ok(Some(batch)) => {
                        let tx = tx.clone();
                        core.submit_adds(batch.adds, move |r| {
                            let _ = tx.send(r);
                        });
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "add stream ended");
                        break;
                    }
                }
            }
        });
        let out = futures::stream::unfold(rx, |mut rx| async move {
            let mut results = rx.recv().await?;
            while results.len() < 4096 {
                match rx.try_recv() {
                    Ok(r) => results.extend(r),
                    Err(_) => break,
                }
            }
            Some((Ok(pb::AddResults { results }), rx))
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn read(&self, req: Request<pb::ReadRequest>) -> Result<Response<pb::ReadResponse>, Status> {
        let req = req.into_inner();
        let core = self.core.clone();
        let started = Instant::now();
        if req.entry_ids.len() > 10_000 {
            return Err(Status::invalid_argument("at most 10000 entries per read"));
        }
        let ledger = req.ledger_id;
        if req.fence {
            // A recovery read fences first, durably: after this answer the old writer can get
            // no further add acknowledged by this bookie.
            if let Err(e) = core.fence(ledger, req.master_key.clone()).await {
                let entries = req
                    .entry_ids
                    .iter()
                    .map(|id| pb::EntryResult {
                        entry_id: *id,
                        code: e.code() as i32,
                        message: e.to_string(),
                        ..Default::default()
                    })
                    .collect();
                return Ok(Response::new(pb::ReadResponse { entries, lac: -1 }));
            }
        }
        let core2 = core.clone();
        let ids = req.entry_ids;
        let (entries, lac) = blocking(move || {
            // Entries past 32 MiB would make the answer too large: the client asks again.
            let read = core2.ledgers.read_entries(ledger, &ids, 32 << 20);
            let mut out = Vec::with_capacity(ids.len());
            for (i, &id) in ids.iter().enumerate() {
                let r = match read.get(i) {
                    None => pb::EntryResult {
                        entry_id: id,
                        code: Code::NotSent as i32,
                        message: "response size limit".into(),
                        ..Default::default()
                    },
                    Some(Ok(Some(e))) => pb::EntryResult {
                        entry_id: id,
                        code: Code::Ok as i32,
                        payload: e.payload.clone(),
                        checksum: e.checksum,
                        message: String::new(),
                    },
                    Some(Ok(None)) => {
                        pb::EntryResult { entry_id: id, code: Code::NoEntry as i32, ..Default::default() }
                    }
                    Some(Err(e)) => {
                        tracing::error!(ledger, entry = id, error = %e, "reading an entry failed");
                        pb::EntryResult {
                            entry_id: id,
                            code: e.code() as i32,
                            message: e.to_string(),
                            ..Default::default()
                        }
                    }
                };
                out.push(r);
            }
            (out, core2.ledgers.lac(ledger).unwrap_or(-1))
        })
        .await?;
        let bytes: usize = entries.iter().map(|e| e.payload.len()).sum();
        core.metrics.read_bytes.add(bytes as u64);
        core.metrics.read_entries.add(entries.len() as u64);
        core.metrics.read_latency.observe_duration_ms(started.elapsed());
        Ok(Response::new(pb::ReadResponse { entries, lac }))
    }

    async fn read_lac(&self, req: Request<pb::ReadLacRequest>) -> Result<Response<pb::ReadLacResponse>, Status> {
        let ledger = req.into_inner().ledger_id;
        let core = self.core.clone();
        let r = blocking(move || core.ledgers.lac(ledger)).await?;
        Ok(Response::new(match r {
            Ok(lac) => pb::ReadLacResponse { code: Code::Ok as i32, lac, message: String::new() },
            Err(e) => pb::ReadLacResponse { code: e.code() as i32, lac: -1, message: e.to_string() },
        }))
    }

    async fn fence(&self, req: Request<pb::FenceRequest>) -> Result<Response<pb::ReadLacResponse>, Status> {
        let req = req.into_inner();
        Ok(Response::new(match self.core.fence(req.ledger_id, req.master_key).await {
            Ok(lac) => pb::ReadLacResponse { code: Code::Ok as i32, lac, message: String::new() },
            Err(e) => pb::ReadLacResponse { code: e.code() as i32, lac: -1, message: e.to_string() },
        }))
    }

    async fn delete_ledger(
        &self,
        req: Request<pb::DeleteLedgerRequest>,
    ) -> Result<Response<pb::DeleteLedgerResponse>, Status> {
        let ledger = req.into_inner().ledger_id;
        let core = self.core.clone();
        let r = blocking(move || core.ledgers.delete(ledger)).await?;
        Ok(Response::new(match r {
            Ok(()) => pb::DeleteLedgerResponse { code: Code::Ok as i32, message: String::new() },
            Err(e) => pb::DeleteLedgerResponse { code: e.code() as i32, message: e.to_string() },
        }))
    }
}
