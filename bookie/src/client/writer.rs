//! The ledger writer: one task per open ledger that assigns entry ids, sends each entry to its
//! write set over per-bookie add streams, confirms entries in order once `Qa` bookies acked,
//! and replaces failed bookies (ensemble change).
//!
//! Rules kept (LEDGER_PROTOCOL.md, "Writing" and "Ensemble change"):
//! - entry `e` is confirmed when `Qa` bookies of its write set acked it and every lower entry
//!   is confirmed; confirmations are delivered in entry order;
//! - on a bookie failure the new fragment starts at LAC + 1, the failed bookie's acks stop
//!   counting, the metadata is CASed on the version this writer holds, and unconfirmed entries
//!   are resent to the replacement;
//! - a FENCED answer, or a CAS conflict after which the ledger is no longer in the state this
//!   writer expects, fails every outstanding add: another writer owns the ledger now.
//!
//! The same task, started in recovery mode, writes recovered entries back during recovery. Its
//! ensemble changes stay in memory until the CAS that closes the ledger, which is made on the
//! version recovery wrote when it began.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use magnetar_metastore::client::{ClientError, PutOptions};
use magnetar_proto::bookie::{AddBatch, AddRequest, AddResult, Code};
use rand::seq::SliceRandom;
use tokio::sync::{mpsc, oneshot};

use super::metadata::{ledger_key, write_set_positions, Fragment, LedgerMetadata, LedgerState};
use super::reader::LedgerReader;
use super::{Ctx, LedgerError};
use crate::checksum::entry_checksum;

/// Who hears of an entry's outcome: the future [`LedgerWriter::append`] returned, or the
/// callback given to [`LedgerWriter::append_with`].
enum AddDone {
    Future(oneshot::Sender<Result<i64, LedgerError>>),
    Callback(Box<dyn FnOnce(Result<i64, LedgerError>) + Send>),
}

impl AddDone {
    fn send(self, r: Result<i64, LedgerError>) {
        match self {
            AddDone::Future(tx) => {
                let _ = tx.send(r);
            }
            AddDone::Callback(f) => f(r),
        }
    }
}

enum Cmd {
    Append { payload: Bytes, done: AddDone },
    Close { done: oneshot::Sender<Result<LedgerMetadata, LedgerError>> },
}

/// What a bookie's add stream reports. `pos` is the bookie's position in the ensemble (a
/// replacement takes the failed bookie's position), `gen` the stream's generation: reports
/// from a stream that was replaced meanwhile are ignored. Results come as the bookie batched
/// them, in its order.
enum Event {
    Results { pos: usize, gen: u64, results: Vec<AddResult> },
    Broken { pos: usize, gen: u64, reason: String },
}

/// Most commands the writer takes from its queue in one turn before it looks at events again.
const CMD_BURST: usize = 256;

/// Ensemble positions as bits (E is at most [`super::metadata::MAX_ENSEMBLE`]).
type Positions = u64;

fn bit(pos: usize) -> Positions {
    1 << pos
}

/// The ensemble positions of `entry`'s write set.
fn write_set_bits(e: usize, qw: usize, entry: i64) -> Positions {
    write_set_positions(e, qw, entry).fold(0, |m, p| m | bit(p))
}

/// An entry sent and not yet confirmed. Positions refer to the last fragment's ensemble, which
/// every unconfirmed entry belongs to (a new fragment starts at LAC + 1).
struct Pending {
    entry: i64,
    payload: Bytes,
    checksum: u32,
    /// Positions whose bookie acked the entry.
    acked: Positions,
    /// Positions the entry was sent to.
    sent: Positions,
    /// When it was last sent anywhere (a resend after an ensemble change restarts the clock
    /// for the bookies still waited on, which only delays a timeout).
    sent_at: Instant,
    done: Option<AddDone>,
}

struct Stream {
    tx: mpsc::UnboundedSender<AddRequest>,
    gen: u64,
}

/// State visible to the writer's handle.
pub(crate) struct Shared {
    pub(crate) lac: AtomicI64,
    pub(crate) md: Mutex<LedgerMetadata>,
}

/// Handle to an open ledger's writer.
pub struct LedgerWriter {
    id: u64,
    tx: mpsc::UnboundedSender<Cmd>,
    shared: Arc<Shared>,
    ctx: Arc<Ctx>,
}

impl LedgerWriter {
    /// Starts the writer task.
    pub(crate) fn spawn(ctx: Arc<Ctx>, md: LedgerMetadata, version: u64, recovery: bool, first_entry: i64) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared { lac: AtomicI64::new(first_entry - 1), md: Mutex::new(md.clone()) });
        let id = md.id;
        let actor = Actor {
            ctx: ctx.clone(),
            key: Bytes::from(md.master_key()),
            expect: if recovery { LedgerState::InRecovery } else { LedgerState::Open },
            md,
            version,
            recovery,
            pending: VecDeque::new(),
            next_entry: first_entry,
            lac: first_entry - 1,
            shared: shared.clone(),
            streams: Vec::new(),
            next_gen: 0,
            ev_tx,
            failed: None,
        };
        tokio::spawn(actor.run(rx, ev_rx));
        LedgerWriter { id, tx, shared, ctx }
    }

    /// The ledger id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The last entry confirmed so far (-1: none).
    pub fn lac(&self) -> i64 {
        self.shared.lac.load(Ordering::Acquire)
    }

    /// The metadata as this writer last wrote it.
    pub fn metadata(&self) -> LedgerMetadata {
        self.shared.md.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Queues an entry. Entries get ids in call order; the future resolves with the id once
    /// the entry is confirmed (after every earlier one).
    pub fn append(
        &self,
        payload: impl Into<Bytes>,
    ) -> impl std::future::Future<Output = Result<i64, LedgerError>> + Send + 'static {
        let (done, rx) = oneshot::channel();
        let sent = self.tx.send(Cmd::Append { payload: payload.into(), done: AddDone::Future(done) }).is_ok();
        let id = self.id;
        async move {
            if !sent {
                return Err(LedgerError::WriterStopped(id));
            }
            rx.await.unwrap_or(Err(LedgerError::WriterStopped(id)))
        }
    }

    /// Queues an entry like [`append`](Self::append), and calls `done` with its outcome once
    /// it is known (in entry order for confirmations), on the writer's task: as BookKeeper's
    /// add callbacks, it runs the moment the entry is confirmed, with no task to wake. It must
    /// be quick and must not block, since every later confirmation waits for it. It runs
    /// exactly once, unless the runtime shuts down while the entry is pending.
    pub fn append_with(&self, payload: impl Into<Bytes>, done: impl FnOnce(Result<i64, LedgerError>) + Send + 'static) {
        let cmd = Cmd::Append { payload: payload.into(), done: AddDone::Callback(Box::new(done)) };
        if let Err(mpsc::error::SendError(Cmd::Append { done, .. })) = self.tx.send(cmd) {
            done.send(Err(LedgerError::WriterStopped(self.id)));
        }
    }

    /// A reader of the entries this writer has confirmed.
    pub fn reader(&self) -> LedgerReader {
        LedgerReader::new(self.ctx.clone(), self.metadata(), self.lac())
    }

    /// Waits for outstanding adds, then closes the ledger at its LAC.
    pub async fn close(self) -> Result<LedgerMetadata, LedgerError> {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Cmd::Close { done }).is_err() {
            return Err(LedgerError::WriterStopped(self.id));
        }
        rx.await.unwrap_or(Err(LedgerError::WriterStopped(self.id)))
    }
}

struct Actor {
    ctx: Arc<Ctx>,
    md: LedgerMetadata,
    version: u64,
    key: Bytes,
    expect: LedgerState,
    recovery: bool,
    pending: VecDeque<Pending>,
    next_entry: i64,
    lac: i64,
    shared: Arc<Shared>,
    /// The add stream to each ensemble position's bookie, opened on first use.
    streams: Vec<Option<Stream>>,
    next_gen: u64,
    ev_tx: mpsc::UnboundedSender<Event>,
    failed: Option<LedgerError>,
}

impl Actor {
    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>, mut events: mpsc::UnboundedReceiver<Event>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closing: Option<oneshot::Sender<Result<LedgerMetadata, LedgerError>>> = None;
        loop {
            if closing.is_some() && (self.pending.is_empty() || self.failed.is_some()) {
                let r = self.close().await;
                if let Some(done) = closing.take() {
                    let _ = done.send(r);
                }
                return;
            }
            tokio::select! {
                cmd = cmds.recv(), if closing.is_none() => {
                    // Every handle is gone: nothing can be confirmed to anyone any more.
                    let Some(mut cmd) = cmd else {
                        // Callbacks still hear of their entries.
                        if !self.pending.is_empty() {
                            self.fail(LedgerError::WriterStopped(self.md.id));
                        }
                        return;
                    };
                    // What else is queued goes out in the same turn, so the add streams get
                    // it together.
                    let mut taken = 1;
                    loop {
                        match cmd {
                            Cmd::Append { payload, done } => self.append(payload, done),
                            Cmd::Close { done } => {
                                closing = Some(done);
                                break;
                            }
                        }
                        if taken == CMD_BURST {
                            break;
                        }
                        match cmds.try_recv() {
                            Ok(c) => cmd = c,
                            Err(_) => break,
                        }
                        taken += 1;
                    }
                }
                Some(ev) = events.recv() => self.on_event(ev).await,
                _ = tick.tick() => self.check_timeouts().await,
            }
        }
    }

    fn append(&mut self, payload: Bytes, done: AddDone) {
        if let Some(e) = &self.failed {
            done.send(Err(e.clone()));
            return;
        }
        let entry = self.next_entry;
        self.next_entry += 1;
        let checksum = entry_checksum(self.md.id, entry, &payload);
        let mut p = Pending { entry, payload, checksum, acked: 0, sent: 0, sent_at: Instant::now(), done: Some(done) };
        for pos in write_set_positions(self.md.ensemble_size, self.md.write_quorum, entry) {
            self.send(&mut p, pos);
        }
        self.pending.push_back(p);
    }

    /// The bookie at ensemble position `pos`.
    fn bookie(&self, pos: usize) -> &str {
        &self.md.last_fragment().bookies[pos]
    }

    fn send(&mut self, p: &mut Pending, pos: usize) {
        if self.streams.len() < self.md.ensemble_size {
            self.streams.resize_with(self.md.ensemble_size, || None);
        }
        if self.streams[pos].is_none() {
            self.streams[pos] = Some(self.open_stream(pos));
        }
        let Some(stream) = &self.streams[pos] else { return };
        let req = AddRequest {
            ledger_id: self.md.id,
            entry_id: p.entry,
            lac: self.lac,
            payload: p.payload.clone(),
            checksum: p.checksum,
            master_key: self.key.clone(),
            recovery: self.recovery,
        };
        self.ctx.faults.send_add(self.bookie(pos), req, &stream.tx);
        p.sent |= bit(pos);
        p.sent_at = Instant::now();
    }

    fn open_stream(&mut self, pos: usize) -> Stream {
        let (tx, rx) = mpsc::unbounded_channel::<AddRequest>();
        self.next_gen += 1;
        let gen = self.next_gen;
        let (ctx, ev_tx, id) = (self.ctx.clone(), self.ev_tx.clone(), self.bookie(pos).to_owned());
        if let Some(local) = self.ctx.bookies.local(&id).cloned() {
            // The bookie runs in this process: its journal answers into this writer's events, a
            // batch of adds at a time, as over gRPC.
            tokio::spawn(async move {
                let mut rx = rx;
                while let Some(first) = rx.recv().await {
                    let ev_tx = ev_tx.clone();
                    local.core.submit_adds(take_batch(first, &mut rx), move |results| {
                        let _ = ev_tx.send(Event::Results { pos, gen, results });
                    });
                }
            });
            return Stream { tx, gen };
        }
        tokio::spawn(async move {
            let broken = |reason: String| {
                let _ = ev_tx.send(Event::Broken { pos, gen, reason });
            };
            let mut client = match ctx.bookies.client(&id).await {
                Ok(c) => c,
                Err(e) => return broken(e.to_string()),
            };
            let outbound = futures::stream::unfold(rx, |mut rx| async move {
                let first = rx.recv().await?;
                Some((AddBatch { adds: take_batch(first, &mut rx) }, rx))
            });
            let mut inbound = match client.add(outbound).await {
                Ok(r) => r.into_inner(),
                Err(s) => return broken(s.to_string()),
            };
            loop {
                match inbound.message().await {
                    Ok(Some(batch)) => {
                        if ev_tx.send(Event::Results { pos, gen, results: batch.results }).is_err() {
                            return;
                        }
                    }
                    Ok(None) => return broken("add stream closed by the bookie".into()),
                    Err(s) => return broken(s.to_string()),
                }
            }
        });
        Stream { tx, gen }
    }

    fn current_gen(&self, pos: usize) -> Option<u64> {
        self.streams.get(pos).and_then(|s| s.as_ref()).map(|s| s.gen)
    }

    async fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Results { pos, gen, results } => self.on_results(pos, gen, results).await,
            Event::Broken { pos, gen, reason } => {
                if self.current_gen(pos) != Some(gen) {
                    return;
                }
                self.streams[pos] = None;
                let needed = self.pending.iter().any(|p| (p.sent & !p.acked) & bit(pos) != 0);
                if needed && self.failed.is_none() {
                    let bookie = self.bookie(pos).to_owned();
                    tracing::warn!(ledger = self.md.id, %bookie, %reason, "add stream to a bookie broke");
                    self.replace(vec![bookie]).await;
                }
            }
        }
    }

    /// A bookie's answers, in its order.
    async fn on_results(&mut self, pos: usize, gen: u64, results: Vec<AddResult>) {
        for r in results {
            // A failure earlier in the batch may have failed the writer or replaced
            // this bookie: the rest of its answers no longer count.
            if self.current_gen(pos) != Some(gen) || self.failed.is_some() {
                return;
            }
            if r.code == Code::Ok as i32 {
                self.acked(pos, r.entry_id);
                continue;
            }
            // Entries acked so far are confirmed before the failure is handled, so an
            // ensemble change starts after them.
            self.advance();
            match Code::try_from(r.code) {
                Ok(Code::Fenced) => self.fail(LedgerError::Fenced(self.md.id)),
                Ok(Code::Unauthorized) => {
                    self.fail(LedgerError::Bookie { bookie: self.bookie(pos).to_owned(), reason: r.message })
                }
                // The add itself is refused (an entry larger than the bookies take): another
                // bookie would refuse it too, and entries after it can never be confirmed.
                Ok(Code::Invalid) => {
                    let bookie = self.bookie(pos).to_owned();
                    self.fail(LedgerError::Invalid(format!("{bookie} refused entry {}: {}", r.entry_id, r.message)))
                }
                _ => {
                    let bookie = self.bookie(pos).to_owned();
                    let (entry, code, message) = (r.entry_id, r.code, r.message);
                    tracing::warn!(ledger = self.md.id, %bookie, entry, code, %message, "add failed on a bookie");
                    self.replace(vec![bookie]).await;
                }
            }
        }
        self.advance();
    }

    /// Records that the bookie at `pos` acked `entry` (confirmation is left to [`Self::advance`]).
    fn acked(&mut self, pos: usize, entry: i64) {
        let Some(front) = self.pending.front().map(|p| p.entry) else { return };
        let Ok(idx) = usize::try_from(entry - front) else { return };
        let ws = write_set_bits(self.md.ensemble_size, self.md.write_quorum, entry);
        if let Some(p) = self.pending.get_mut(idx) {
            p.acked |= ws & bit(pos);
        }
    }

    fn advance(&mut self) {
        while self.pending.front().is_some_and(|p| p.acked.count_ones() as usize >= self.md.ack_quorum) {
            let Some(mut p) = self.pending.pop_front() else { break };
            self.lac = p.entry;
            self.shared.lac.store(p.entry, Ordering::Release);
            if let Some(done) = p.done.take() {
                done.send(Ok(p.entry));
            }
        }
    }

    async fn check_timeouts(&mut self) {
        if self.failed.is_some() {
            return;
        }
        let timeout = self.ctx.opts.add_timeout;
        let slow_bits = self
            .pending
            .iter()
            .filter(|p| p.sent_at.elapsed() > timeout)
            .fold(0, |m: Positions, p| m | (p.sent & !p.acked));
        let slow: Vec<String> = (0..self.md.ensemble_size)
            .filter(|&pos| slow_bits & bit(pos) != 0)
            .map(|pos| self.bookie(pos).to_owned())
            .collect();
        if !slow.is_empty() {
            tracing::warn!(ledger = self.md.id, bookies = ?slow, "adds timed out");
            self.replace(slow).await;
        }
    }

    fn fail(&mut self, e: LedgerError) {
        if self.failed.is_none() {
            tracing::warn!(ledger = self.md.id, error = %e, "ledger writer failed");
        }
        for mut p in self.pending.drain(..) {
            if let Some(done) = p.done.take() {
                done.send(Err(e.clone()));
            }
        }
        self.streams.clear();
        self.failed = Some(e);
    }

    /// Ensemble change: replaces `failed` bookies, CASes the metadata, resends.
    async fn replace(&mut self, failed: Vec<String>) {
        let ensemble = self.md.last_fragment().bookies.clone();
        let failed: Vec<String> = failed.into_iter().filter(|b| ensemble.contains(b)).collect();
        if failed.is_empty() || self.failed.is_some() {
            return;
        }
        let deadline = Instant::now() + self.ctx.opts.ensemble_change_timeout;
        let new_md = loop {
            let writable = match self.ctx.bookies.writable().await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "listing bookies for an ensemble change failed");
                    Vec::new()
                }
            };
            let mut candidates: Vec<String> =
                writable.into_iter().filter(|b| !ensemble.contains(b) && !failed.contains(b)).collect();
            if candidates.len() >= failed.len() {
                candidates.shuffle(&mut rand::rng());
                let mut new_ens = ensemble.clone();
                for (slot, b) in new_ens.iter_mut().filter(|b| failed.contains(b)).zip(candidates) {
                    *slot = b;
                }
                let mut md = self.md.clone();
                let first = self.lac + 1;
                match md.fragments.last_mut() {
                    Some(last) if last.first_entry == first => last.bookies = new_ens,
                    _ => md.fragments.push(Fragment { first_entry: first, bookies: new_ens }),
                }
                // A recovering writer keeps its ensemble changes in memory: they go into the
                // CAS that closes the ledger (LEDGER_PROTOCOL.md, recovery step 7). Its new
                // fragment starts at entries not yet confirmed, which the old writer may have
                // had acknowledged and the replacements do not hold: saved now, it would
                // outlive a recovery that dies before closing, and the next recovery would
                // fence and read only the replacements and could close the ledger before
                // such an entry.
                let saved = if self.recovery { Ok(()) } else { self.cas(&md).await };
                match saved {
                    Ok(()) => break md,
                    Err(e) => return self.fail(e),
                }
            }
            if Instant::now() >= deadline {
                let e = LedgerError::NotEnoughBookies {
                    needed: self.md.ensemble_size,
                    available: ensemble.len() - failed.len() + candidates.len(),
                };
                return self.fail(e);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        tracing::info!(ledger = self.md.id, from = ?failed, ensemble = ?new_md.last_fragment().bookies,
            first_entry = new_md.last_fragment().first_entry, "ensemble changed");
        // The replacements took the failed bookies' positions: what those positions acked or
        // were sent no longer counts.
        let mut replaced: Positions = 0;
        for (pos, b) in ensemble.iter().enumerate() {
            if failed.contains(b) {
                replaced |= bit(pos);
                if let Some(s) = self.streams.get_mut(pos) {
                    *s = None;
                }
                self.ctx.bookies.forget(b);
            }
        }
        self.md = new_md;
        *self.shared.md.lock().unwrap_or_else(|e| e.into_inner()) = self.md.clone();
        let mut pending = std::mem::take(&mut self.pending);
        for p in pending.iter_mut() {
            p.acked &= !replaced;
            p.sent &= !replaced;
            for pos in write_set_positions(self.md.ensemble_size, self.md.write_quorum, p.entry) {
                if (p.acked | p.sent) & bit(pos) == 0 {
                    self.send(p, pos);
                }
            }
        }
        self.pending = pending;
        self.advance();
    }

    /// CAS on the held version; a conflict re-reads to decide whether someone took over.
    async fn cas(&mut self, md: &LedgerMetadata) -> Result<(), LedgerError> {
        let key = ledger_key(md.id);
        let body = serde_json::to_vec(md).map_err(|e| LedgerError::Invalid(e.to_string()))?;
        match self.ctx.meta.put(&key, body, PutOptions { expected_version: Some(self.version), session: 0 }).await {
            Ok(v) => {
                self.version = v;
                Ok(())
            }
            Err(ClientError::BadVersion { .. }) => {
                let now = self.ctx.meta.get(&key).await?;
                let state =
                    now.and_then(|kv| serde_json::from_slice::<LedgerMetadata>(&kv.value).ok()).map(|m| m.state);
                match state {
                    Some(s) if s == self.expect => Err(LedgerError::MetadataConflict {
                        ledger: md.id,
                        reason: "the metadata changed although the ledger is still in the state this writer expects"
                            .into(),
                    }),
                    Some(_) => Err(LedgerError::Fenced(md.id)),
                    None => Err(LedgerError::NoSuchLedger(md.id)),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn close(&mut self) -> Result<LedgerMetadata, LedgerError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.streams.clear();
        let mut md = self.md.clone();
        md.state = LedgerState::Closed;
        md.last_entry = self.lac;
        self.cas(&md).await?;
        self.md = md.clone();
        *self.shared.md.lock().unwrap_or_else(|e| e.into_inner()) = md.clone();
        tracing::debug!(ledger = md.id, last_entry = md.last_entry, "ledger closed");
        Ok(md)
    }
}

/// `first` and whatever else is queued behind it, up to 1024 adds or 4 MiB of payload: what
/// one `AddBatch` carries.
fn take_batch(first: AddRequest, rx: &mut mpsc::UnboundedReceiver<AddRequest>) -> Vec<AddRequest> {
    let mut bytes = first.payload.len();
    let mut adds = vec![first];
    while adds.len() < 1024 && bytes < (4 << 20) {
        match rx.try_recv() {
            Ok(a) => {
                bytes += a.payload.len();
                adds.push(a);
            }
            Err(_) => break,
        }
    }
    adds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_set_bits_match_the_positions() {
        // E=3, Qw=2: entry 0 on positions 0 and 1, entry 2 wraps to 2 and 0.
        assert_eq!(write_set_bits(3, 2, 0), 0b011);
        assert_eq!(write_set_bits(3, 2, 1), 0b110);
        assert_eq!(write_set_bits(3, 2, 2), 0b101);
        assert_eq!(write_set_bits(64, 2, 63), bit(63) | bit(0));
        assert_eq!(write_set_bits(1, 1, 7), 0b1);
    }
}
