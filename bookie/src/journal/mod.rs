//! The journal: the bookie's write-ahead log, and the only thing between an add and its ack.
//!
//! Each journal directory runs two threads:
//! - the **writer** takes queued operations in order, checks them against the ledger's state
//!   (master key, fence), appends their records to the current segment (into the page cache;
//!   large payloads go from their request buffers to the file in one vectored write),
//!   stores them in the entry store unindexed ([`LedgerStorage::write_unindexed`]) and in the
//!   tail cache, and hands the batch to
//! - the **syncer**, which takes every batch handed over so far, `fdatasync`s the segment files
//!   they touched, indexes their entries ([`LedgerStorage::index_refs`]), and only then runs
//!   their callbacks (the acks), in order.
//!
//! An entry is indexed only once its journal record is durable: RocksDB writes its memtable
//! out whenever it fills, and an index entry must not reach the disk before the records that
//! vouch for it, or a power loss that took the journal record and the entry-log record of an
//! add (never acknowledged) could leave a pointer at garbage, which reads as corrupt rather
//! than absent; a recovery meeting it on every replica could never decide where the ledger
//! ends. Once the journal record is durable, replay writes the entry again if the entry-log
//! record was lost (the checkpoint passes a record only after the entry store's flush).
//!
//! After each write the writer also asks the kernel to start writing the new pages out and to
//! drop those of earlier, synced writes (`remove_pages_from_cache`): the journal is read only
//! on restart, and pages already on their way leave less for the next fdatasync.
//!
//! Payloads of at least `write_once_bytes` are written once: the writer stores them in the entry
//! store first ([`LedgerStorage::write_ref`]) and the journal records only where they went
//! (an `ENTRY_REF` record). A group holding such adds is acknowledged only after both the
//! journal's fdatasync and the entry store's ([`LedgerStorage::sync_refs`], begun before the
//! journal's and finished after it, so the two overlap), and such payloads are indexed only
//! after both, as the entry-log record is then the only copy. Replay indexes the payloads the
//! journal's records point at
//! ([`LedgerStorage::adopt_ref`]); one that is not there belonged to an add whose group never
//! finished syncing, which was never acknowledged. Every payload is thus
//! written to the disk once instead of twice, which is what bounds a bookie's bandwidth for
//! large entries.
//!
//! So the writer fills the next group while the syncer flushes the previous one, and every
//! fdatasync covers as many adds as arrived during the one before. When nothing else is
//! queued, the syncer is idle and the batch is small (light load, `flush_when_queue_empty`
//! on), the writer syncs its batch and acks it itself, sparing the hand-off to another
//! thread. With
//! `flush_when_queue_empty` off, the syncer also waits up to `max_group_wait_us` (or until
//! `group_bytes` are pending) to gather a bigger group.
//!
//! Invariant: a callback reporting success runs only after the record of its operation (and
//! of every operation queued before it) is on disk, and the entry is readable from the entry
//! store. Entries become readable from the tail cache as soon as the writer applied them,
//! before their ack: a recovery read may see an entry whose add is not yet acknowledged,
//! which the protocol allows (recovery then writes it back everywhere). A fence is answered
//! after its group's entries, and every earlier group's, are indexed, so the recovery reads
//! that follow it find every add the fence let through in the store too.

pub mod record;
pub mod replay;
pub mod segment;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use magnetar_common::metrics::{Counter, Gauge, Histogram, Registry, LATENCY_MS_BUCKETS};

use crate::config::JournalSettings;
use crate::error::{BookieError, Result};
use crate::ledgers::Ledgers;
use crate::storage::{EntryWrite, LedgerMeta, LedgerStorage, StoredEntry};
use segment::Allocator;

/// A position in a journal: everything before `offset` of segment `segment`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Position {
    /// Segment sequence number.
    pub segment: u64,
    /// Byte offset in it.
    pub offset: u64,
}

/// An operation the journal makes durable.
#[derive(Debug)]
pub enum Op {
    /// Add an entry.
    Add {
        /// Ledger id.
        ledger: u64,
        /// Entry id.
        entry: i64,
        /// LAC piggybacked by the writer.
        lac: i64,
        /// The writer's checksum (already verified by the caller).
        checksum: u32,
        /// Payload.
        payload: Bytes,
        /// Master key.
        master_key: Bytes,
        /// A recovery add (allowed on a fenced ledger).
        recovery: bool,
    },
    /// Fence a ledger; the callback gets its LAC.
    Fence {
        /// Ledger id.
        ledger: u64,
        /// Master key.
        master_key: Bytes,
    },
}

/// Called once with the outcome: for adds the entry id, for fences the ledger's LAC.
pub type Callback = Box<dyn FnOnce(Result<i64>) + Send>;

/// Called once with the outcomes of a batch of operations, in the batch's order.
pub type BatchCallback = Box<dyn FnOnce(Vec<Result<i64>>) + Send>;

/// Journal metrics, named as BookKeeper names them.
pub struct JournalMetrics {
    sync: Arc<Histogram>,
    ref_sync: Arc<Histogram>,
    add: Arc<Histogram>,
    queue_latency: Arc<Histogram>,
    flush: Arc<Histogram>,
    apply: Arc<Histogram>,
    sync_enqueue: Arc<Histogram>,
    sync_entries: Arc<Histogram>,
    queue: Arc<Gauge>,
    syncs: Arc<Counter>,
    bytes: Arc<Counter>,
    adds: Arc<Counter>,
    index: Arc<Histogram>,
}

impl JournalMetrics {
    /// Registers the metrics of journal `index`.
    pub fn register(reg: &Registry, index: usize) -> Self {
        let idx = index.to_string();
        let l: &[(&str, &str)] = &[("journalIndex", &idx)];
        JournalMetrics {
            sync: reg.histogram("bookie_journal_JOURNAL_SYNC", "Journal fdatasync latency (ms)", l, LATENCY_MS_BUCKETS),
            ref_sync: reg.histogram(
                "bookie_journal_JOURNAL_ENTRY_LOG_SYNC",
                "Time a group holding payloads written once waits for the entry store's sync after the journal's (ms)",
                l,
                LATENCY_MS_BUCKETS,
            ),
            add: reg.histogram(
                "bookie_journal_JOURNAL_ADD_ENTRY",
                "Time from queueing an add to its durable ack (ms)",
                l,
                LATENCY_MS_BUCKETS,
            ),
            // Stages of `JOURNAL_ADD_ENTRY`, in order: waiting for the writer, the writer's
            // segment write and entry-store write (per batch), waiting for the fdatasync (per
            // batch), the fdatasync itself (`JOURNAL_SYNC`), indexing the synced entries.
            queue_latency: reg.histogram(
                "bookie_journal_JOURNAL_QUEUE_LATENCY",
                "Time an operation waits before the journal writer takes it (ms)",
                l,
                LATENCY_MS_BUCKETS,
            ),
            flush: reg.histogram(
                "bookie_journal_JOURNAL_FLUSH_LATENCY",
                "Time of the journal writer's write of one batch into the segment (ms)",
                l,
                LATENCY_MS_BUCKETS,
            ),
            apply: reg.histogram(
                "bookie_journal_JOURNAL_APPLY_LATENCY",
                "Time of the journal writer's write of one batch into the entry store (ms)",
                l,
                LATENCY_MS_BUCKETS,
            ),
            sync_enqueue: reg.histogram(
                "bookie_journal_JOURNAL_FORCE_WRITE_ENQUEUE",
                "Time a written batch waits before the fdatasync that covers it starts (ms)",
                l,
                LATENCY_MS_BUCKETS,
            ),
            sync_entries: reg.histogram(
                "bookie_journal_JOURNAL_FORCE_WRITE_BATCH_ENTRIES",
                "Operations acknowledged by one fdatasync",
                l,
                BATCH_BUCKETS,
            ),
            queue: reg.gauge("bookie_journal_JOURNAL_QUEUE_SIZE", "Operations waiting for the journal writer", l),
            syncs: reg.counter("bookie_journal_JOURNAL_SYNC_count_total", "Journal fdatasync calls", l),
            bytes: reg.counter("bookie_journal_JOURNAL_WRITE_BYTES", "Bytes written to the journal", l),
            adds: reg.counter("bookie_journal_JOURNAL_ADD_ENTRY_count_total", "Entries journaled", l),
            index: reg.histogram(
                "bookie_journal_JOURNAL_INDEX_LATENCY",
                "Time of indexing the entries of the groups one fdatasync covered, before their acks (ms)",
                l,
                LATENCY_MS_BUCKETS,
            ),
        }
    }
}

/// Buckets of `JOURNAL_FORCE_WRITE_BATCH_ENTRIES`.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0];

/// What a submitter queued: one operation, or a batch of them (a client's `AddBatch`) that
/// takes one trip through the queue and is answered at once.
enum Work {
    One(Op, Callback),
    Many(Vec<Op>, BatchCallback),
}

impl Work {
    fn ops(&self) -> usize {
        match self {
            Work::One(..) => 1,
            Work::Many(ops, _) => ops.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Work::One(op, _) => op_bytes(op),
            Work::Many(ops, _) => ops.iter().map(op_bytes).sum(),
        }
    }
}

struct Queued {
    work: Work,
    at: Instant,
}

/// Outcomes waiting for their group's sync.
enum Ack {
    One(Callback, Result<i64>),
    /// A batch's outcomes, refusals among them.
    Many(BatchCallback, Vec<Result<i64>>),
}

impl Ack {
    fn ops(&self) -> usize {
        match self {
            Ack::One(..) => 1,
            Ack::Many(_, rs) => rs.len(),
        }
    }

    /// Turns every success into `err()` (the records did not become durable); refusals stay.
    fn fail(&mut self, err: impl Fn() -> BookieError) {
        match self {
            Ack::One(_, r) => *r = Err(err()),
            Ack::Many(_, rs) => rs.iter_mut().filter(|r| r.is_ok()).for_each(|r| *r = Err(err())),
        }
    }

    fn run(self) {
        match self {
            Ack::One(cb, r) => cb(r),
            Ack::Many(cb, rs) => cb(rs),
        }
    }
}

/// A batch written by the writer, waiting for its sync.
struct Group {
    files: Vec<Arc<File>>,
    /// Adds whose payloads are in the entry store only, indexed once they are durable.
    refs: Vec<(u64, i64, crate::storage::EntryRef)>,
    /// Adds whose payloads the journal holds, stored unindexed, indexed once the journal's
    /// records are durable.
    placed: Vec<(u64, i64, crate::storage::EntryRef)>,
    acks: Vec<(Ack, Instant)>,
    /// Operations in `acks`.
    ops: usize,
    born: Instant,
    /// The journal position after the group's records.
    end: Position,
}

#[derive(Default)]
struct SyncQueue {
    groups: Vec<Group>,
    bytes: usize,
    closed: bool,
    /// A sync (by the syncer or the writer) is running; its acks are not all sent yet.
    syncing: bool,
}

struct Shared {
    storage: Arc<dyn LedgerStorage>,
    sync_q: Mutex<SyncQueue>,
    sync_cv: Condvar,
    queued: AtomicI64,
    applied: Mutex<Position>,
    /// The position before which every record is durable (never advanced with syncing off):
    /// the writer records it in the segment (`SYNCED`) for replay.
    synced: Mutex<Position>,
    metrics: JournalMetrics,
    /// Once an fdatasync fails, the page cache may have dropped the failed pages and a later
    /// fdatasync could "succeed" without them: nothing is acknowledged after that.
    failure: Mutex<Option<String>>,
    /// Tests: runs once, on the syncing thread, just before the next journal fdatasync.
    #[cfg(test)]
    before_sync: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Tests: the writer's next segment write fails.
    #[cfg(test)]
    fail_next_write: std::sync::atomic::AtomicBool,
    /// Tests: the writer's next roll finds no next segment.
    #[cfg(test)]
    fail_next_take: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Records a failure that makes every later acknowledgement fail (see `failure`).
    fn fail(&self, e: String) {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
    }

    /// Syncs the groups' files and runs their callbacks in order. Callers hold the `syncing`
    /// claim, so groups are acked in the order the writer produced them.
    fn sync_and_ack(&self, groups: Vec<Group>, sync: bool) {
        let started = Instant::now();
        let m = &self.metrics;
        let mut ops = 0;
        for g in &groups {
            m.sync_enqueue.observe_duration_ms(started.saturating_duration_since(g.born));
            ops += g.ops;
        }
        m.sync_entries.observe(ops as f64);
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let fail = |failure: &mut Option<String>, e: String| {
            *failure = Some(e);
            *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = failure.clone();
        };
        // The entry store's sync starts first (its buffer goes to its writer thread) and is
        // waited for after the journal's fdatasync.
        let mut refs = None;
        if sync && failure.is_none() && groups.iter().any(|g| !g.refs.is_empty()) {
            match self.storage.sync_refs() {
                Ok(f) => refs = Some(f),
                Err(e) => fail(&mut failure, e.to_string()),
            }
        }
        #[cfg(test)]
        if let Some(hook) = self.before_sync.lock().unwrap_or_else(|e| e.into_inner()).take() {
            hook();
        }
        let mut synced: Vec<*const File> = Vec::new();
        for g in &groups {
            for f in &g.files {
                let p = Arc::as_ptr(f);
                if synced.contains(&p) {
                    continue;
                }
                synced.push(p);
                if sync && failure.is_none() {
                    if let Err(e) = f.sync_data() {
                        fail(&mut failure, e.to_string());
                    }
                }
            }
        }
        m.sync.observe_duration_ms(started.elapsed());
        m.syncs.inc();
        if let Some(finish) = refs {
            let waiting = Instant::now();
            // Always finished, even after a journal failure: later syncs wait their turn.
            if let Err(e) = finish() {
                if failure.is_none() {
                    fail(&mut failure, e.to_string());
                }
            }
            m.ref_sync.observe_duration_ms(waiting.elapsed());
        }
        if let Some(err) = &failure {
            // A failed fdatasync leaves the page cache in an unknown state; nothing in these
            // groups may be acknowledged.
            tracing::error!(error = %err, "journal fdatasync failed");
        }
        // Entries are indexed only now that their records are durable: in the journal, and
        // in the entry log for payloads stored by reference. RocksDB may write its memtable
        // out at any moment, and an index entry it kept through a power loss that took the
        // record would make the entry read as corrupt (a recovery could then never decide
        // whether it exists) instead of absent. (A payload the journal holds may still be lost
        // from the entry log; replay writes it again, as the checkpoint has not passed it.)
        let mut unindexed = None;
        let refs: Vec<_> = groups.iter().flat_map(|g| g.placed.iter().chain(&g.refs).copied()).collect();
        if failure.is_some() {
            self.storage.forget_refs(&refs);
        } else if !refs.is_empty() {
            let indexing = Instant::now();
            if let Err(e) = self.storage.index_refs(&refs) {
                // Entries the store may not be able to serve: nothing is acknowledged from
                // now on, and the checkpoint stays before them, so a restart replays them.
                tracing::error!(error = %e, "indexing entries failed; the journal acknowledges nothing more");
                let e = format!("indexing entries: {e}");
                self.fail(e.clone());
                unindexed = Some(e);
            }
            m.index.observe_duration_ms(indexing.elapsed());
        }
        let end = groups.last().map(|g| g.end);
        if let (Some(end), None, true) = (end, &failure, sync) {
            let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
            *synced = (*synced).max(end);
        }
        // The checkpoint's position: everything before it is in the entry store (advanced
        // before the acks, so an acknowledged add is always behind it).
        if let (Some(end), None, None) = (end, &failure, &unindexed) {
            let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
            *applied = (*applied).max(end);
        }
        for g in groups {
            for (mut ack, at) in g.acks {
                m.add.observe_duration_ms_many(at.elapsed(), ack.ops() as u64);
                if let Some(err) = &failure {
                    ack.fail(|| BookieError::io("journal fdatasync", std::io::Error::other(err.clone())));
                } else if let Some(err) = &unindexed {
                    ack.fail(|| BookieError::io("indexing entries", std::io::Error::other(err.clone())));
                }
                ack.run();
            }
        }
    }
}

/// One journal directory's writer and syncer.
pub struct Journal {
    dir: PathBuf,
    tx: Mutex<Option<mpsc::Sender<Queued>>>,
    shared: Arc<Shared>,
    alloc: Arc<Allocator>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Journal {
    /// Starts a journal in `dir` writing from segment `first_segment` (after replay).
    /// `on_roll` runs on the writer thread each time it starts a new segment (the bookie
    /// checkpoints then, so finished segments are recycled instead of piling up).
    pub fn start(
        dir: &Path,
        first_segment: u64,
        settings: &JournalSettings,
        max_entry: usize,
        ledgers: Arc<Ledgers>,
        metrics: JournalMetrics,
        on_roll: Box<dyn Fn() + Send>,
    ) -> Result<Self> {
        let (alloc, prealloc) = Allocator::start(dir, settings.segment_bytes, settings.preallocated_segments)?;
        let shared = Arc::new(Shared {
            storage: ledgers.storage.clone(),
            sync_q: Mutex::new(SyncQueue::default()),
            sync_cv: Condvar::new(),
            queued: AtomicI64::new(0),
            applied: Mutex::new(Position { segment: first_segment, offset: 0 }),
            synced: Mutex::new(Position { segment: first_segment, offset: 0 }),
            metrics,
            failure: Mutex::new(None),
            #[cfg(test)]
            before_sync: Mutex::new(None),
            #[cfg(test)]
            fail_next_write: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            fail_next_take: std::sync::atomic::AtomicBool::new(false),
        });
        let file = alloc.take(first_segment)?;
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            rx,
            shared: shared.clone(),
            alloc: alloc.clone(),
            ledgers,
            seg: Segment::new(first_segment, Arc::new(file)),
            size: settings.segment_bytes,
            max_batch_bytes: settings.group_bytes.max(max_entry + 1024),
            buf: Vec::with_capacity(settings.group_bytes + max_entry),
            pieces: Vec::new(),
            piece_bytes: 0,
            inline_sync: settings.flush_when_queue_empty,
            write_once_bytes: if settings.write_once_bytes == 0 { usize::MAX } else { settings.write_once_bytes },
            sync: settings.sync,
            drop_pages: settings.remove_pages_from_cache,
            on_roll,
            marked: 0,
            marking: None,
        };
        let syncer = Syncer { shared: shared.clone(), settings: settings.clone() };
        let threads = vec![
            prealloc,
            crate::spawn_thread("journal-writer", move || writer.run())?,
            crate::spawn_thread("journal-sync", move || syncer.run())?,
        ];
        Ok(Journal { dir: dir.to_owned(), tx: Mutex::new(Some(tx)), shared, alloc, threads: Mutex::new(threads) })
    }

    /// Queues an operation; `cb` runs once it is durable (or refused).
    pub fn submit(&self, op: Op, cb: Callback) {
        self.queue(Work::One(op, cb));
    }

    /// Queues a batch of operations, written in order into one group; `cb` runs once with
    /// every outcome, in the batch's order, once they are all durable. An operation refused
    /// (fenced ledger, wrong key) is answered with the rest.
    pub fn submit_batch(&self, ops: Vec<Op>, cb: BatchCallback) {
        if ops.is_empty() {
            return cb(Vec::new());
        }
        self.queue(Work::Many(ops, cb));
    }

    fn queue(&self, work: Work) {
        let refuse = |work: Work| match work {
            Work::One(_, cb) => cb(Err(BookieError::ShuttingDown)),
            Work::Many(ops, cb) => cb(ops.iter().map(|_| Err(BookieError::ShuttingDown)).collect()),
        };
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(tx) = tx else {
            return refuse(work);
        };
        let n = work.ops() as i64;
        self.shared.queued.fetch_add(n, Ordering::Relaxed);
        if let Err(mpsc::SendError(q)) = tx.send(Queued { work, at: Instant::now() }) {
            self.shared.queued.fetch_sub(n, Ordering::Relaxed);
            refuse(q.work);
        }
    }

    /// The position up to which every record is applied to the entry store: its entries are
    /// indexed, which happens after their group's sync.
    pub fn applied(&self) -> Position {
        *self.shared.applied.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Recycles segments wholly before `pos` (a checkpoint covers them).
    pub fn release_before(&self, pos: Position) -> Result<usize> {
        let mut n = 0;
        for (seq, path) in segment::list_segments(&self.dir)? {
            if seq < pos.segment {
                self.alloc.recycle(&path);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Operations queued and not yet taken by the writer.
    pub fn queue_len(&self) -> i64 {
        self.shared.queued.load(Ordering::Relaxed)
    }

    /// Stops accepting operations, lets queued ones finish, and joins the threads.
    pub fn stop(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let threads: Vec<_> = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        // The writer exits when the channel drains and closes the sync queue; the syncer exits
        // when that queue is empty; the allocator on request.
        let mut it = threads.into_iter();
        let prealloc = it.next();
        for t in it {
            let _ = t.join();
        }
        self.alloc.stop();
        if let Some(t) = prealloc {
            let _ = t.join();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Segment {
    seq: u64,
    file: Arc<File>,
    offset: u64,
    /// Page-aligned starts of the last two writes: where the next page-cache advice begins.
    advised: [u64; 2],
    /// Written up to its end (marker): nothing more may go into it, even when the roll to the
    /// next segment failed, as replay stops at the marker.
    ended: bool,
}

impl Segment {
    fn new(seq: u64, file: Arc<File>) -> Self {
        Segment { seq, file, offset: 0, advised: [0; 2], ended: false }
    }

    /// After a write of `[from, to)`: starts writeback of the new pages and drops the clean
    /// pages of the writes before it (those of the write before last are normally synced by
    /// now; pages still dirty or being written are left alone by the kernel).
    fn advise_written(&mut self, from: u64, to: u64) {
        let start = self.advised[0];
        if let Some(len) = std::num::NonZeroU64::new(to.saturating_sub(start)) {
            self.advise(start, Some(len));
        }
        self.advised = [self.advised[1], from & !(PAGE_BYTES - 1)];
    }

    /// Once the whole segment is synced: drops every page of it still cached.
    fn advise_synced(&self) {
        self.advise(0, None);
    }

    /// Only advice: the fdatasync before every ack is what makes records durable, so a
    /// failure here changes nothing but the page cache.
    fn advise(&self, start: u64, len: Option<std::num::NonZeroU64>) {
        if let Err(e) = rustix::fs::fadvise(&*self.file, start, len, rustix::fs::Advice::DontNeed) {
            tracing::debug!(error = %e, segment = self.seq, "journal page-cache advice failed");
        }
    }
}

/// Page size assumed when aligning page-cache advice (the kernel rounds inward anyway).
const PAGE_BYTES: u64 = 4096;

/// A payload written in place after `buf[..buf_end]` (see [`Writer::flush_buf`]).
struct Piece {
    buf_end: usize,
    data: Bytes,
}

/// Payloads at least this big are written from their request buffers (a vectored write)
/// rather than copied into the journal's buffer first.
const IN_PLACE_BYTES: usize = 4096;

/// The writer syncs a batch itself only if it holds at most this many operations. A bigger
/// batch means adds are arriving faster than one at a time, and more arrive during the sync:
/// if the writer synced, they would wait for it in the queue and only then be written and
/// applied, adding that work to their latency; the syncer lets the writer do it meanwhile.
const INLINE_SYNC_MAX_OPS: usize = 8;

struct Writer {
    rx: mpsc::Receiver<Queued>,
    shared: Arc<Shared>,
    alloc: Arc<Allocator>,
    ledgers: Arc<Ledgers>,
    seg: Segment,
    size: u64,
    max_batch_bytes: usize,
    /// Records not yet written: headers and small data here, large payloads in `pieces`.
    buf: Vec<u8>,
    /// Large payloads to write between stretches of `buf`, borrowed from their requests.
    pieces: Vec<Piece>,
    /// Bytes in `pieces`.
    piece_bytes: usize,
    /// Sync inline when idle (see the module docs).
    inline_sync: bool,
    /// Payloads at least this big go to the entry store only (see the module docs).
    write_once_bytes: usize,
    sync: bool,
    /// `remove_pages_from_cache` (see [`Segment::advise_written`]).
    drop_pages: bool,
    on_roll: Box<dyn Fn() + Send>,
    /// The offset the current segment's last written `SYNCED` record gave.
    marked: u64,
    /// The offset a `SYNCED` record still in `buf` gives: it counts once its write succeeds
    /// (after a failed write the next batch writes the mark again, where the failed one was).
    marking: Option<u64>,
}

/// What one writer batch produced.
#[derive(Default)]
struct Batch {
    entries: Vec<EntryWrite>,
    states: HashMap<u64, LedgerMeta, foldhash::fast::RandomState>,
    acks: Vec<(Ack, Instant)>,
    /// Operations in `acks`.
    ops: usize,
    files: Vec<Arc<File>>,
    bytes: usize,
    /// Adds whose payloads went to the entry store only, to index once their records are
    /// written: (ledger, entry, where).
    refs: Vec<(u64, i64, crate::storage::EntryRef)>,
    /// Adds whose payloads the journal holds, in the entry store unindexed: (ledger, entry,
    /// where).
    placed: Vec<(u64, i64, crate::storage::EntryRef)>,
    /// A segment write or roll failed partway through the batch: records of its earlier
    /// operations may be lost, so none of it may be acknowledged.
    broken: Option<BookieError>,
}

impl Writer {
    fn run(mut self) {
        while let Ok(first) = self.rx.recv() {
            let mut bytes = first.work.bytes();
            let mut ops = first.work.ops();
            let mut items = vec![first];
            while bytes < self.max_batch_bytes && ops < 8192 {
                match self.rx.try_recv() {
                    Ok(q) => {
                        bytes += q.work.bytes();
                        ops += q.work.ops();
                        items.push(q);
                    }
                    Err(_) => break,
                }
            }
            self.shared.queued.fetch_sub(ops as i64, Ordering::Relaxed);
            let m = &self.shared.metrics;
            m.queue.set(self.shared.queued.load(Ordering::Relaxed));
            let taken = Instant::now();
            for q in &items {
                m.queue_latency.observe_duration_ms_many(taken.saturating_duration_since(q.at), q.work.ops() as u64);
            }
            let batch = self.process(items);
            self.hand_off(batch);
        }
        let mut q = self.shared.sync_q.lock().unwrap_or_else(|e| e.into_inner());
        q.closed = true;
        self.shared.sync_cv.notify_all();
    }

    fn process(&mut self, items: Vec<Queued>) -> Batch {
        let mut b = Batch { files: vec![self.seg.file.clone()], ..Default::default() };
        self.mark_synced();
        for Queued { work, at } in items {
            match work {
                Work::One(op, cb) => match self.apply_op(op, &mut b) {
                    Ok(v) => {
                        b.acks.push((Ack::One(cb, Ok(v)), at));
                        b.ops += 1;
                    }
                    // Refusals (fenced, wrong key) need no disk: answer at once.
                    Err(e) => cb(Err(e)),
                },
                Work::Many(ops, cb) => {
                    let results: Vec<Result<i64>> = ops.into_iter().map(|op| self.apply_op(op, &mut b)).collect();
                    b.ops += results.len();
                    b.acks.push((Ack::Many(cb, results), at));
                }
            }
        }
        let writing = Instant::now();
        let written = match b.broken.take() {
            Some(e) => Err(e),
            None => self.flush_buf(&mut b),
        };
        if let Err(e) = written {
            tracing::error!(error = %e, "journal write failed");
            self.ledgers.storage.forget_refs(&b.refs);
            fail_all(&mut b, &e);
            return b;
        }
        let applying = Instant::now();
        self.shared.metrics.flush.observe_duration_ms(applying - writing);
        let states: Vec<(u64, LedgerMeta)> = b.states.drain().collect();
        // Entries are indexed after their group's sync (`sync_and_ack`).
        match self.ledgers.storage.write_unindexed(&b.entries, &states) {
            Ok(None) => {}
            Ok(Some(placed)) => {
                b.placed = b.entries.iter().zip(placed).map(|(e, at)| (e.ledger, e.entry, at)).collect()
            }
            Err(e) => {
                tracing::error!(error = %e, "entry store write failed");
                self.ledgers.storage.forget_refs(&b.refs);
                fail_all(&mut b, &e);
                return b;
            }
        }
        self.ledgers.publish(&states);
        self.shared.metrics.apply.observe_duration_ms(applying.elapsed());
        self.shared.metrics.adds.add((b.entries.len() + b.refs.len()) as u64);
        b.entries.clear();
        b
    }

    /// Starts the batch with a `SYNCED` record when more of the segment became durable since
    /// the last one (and it fits without a roll).
    fn mark_synced(&mut self) {
        let synced = *self.shared.synced.lock().unwrap_or_else(|e| e.into_inner());
        let len = record::encoded_len(0) as u64;
        if synced.segment != self.seg.seq
            || synced.offset <= self.marking.unwrap_or(self.marked)
            || self.seg.offset + (self.pending() as u64) + len > self.size
        {
            return;
        }
        record::encode(&mut self.buf, self.seg.seq, record::SYNCED, 0, synced.offset as i64, -1, &[]);
        self.marking = Some(synced.offset);
    }

    fn state(&self, b: &mut Batch, ledger: u64) -> Result<Option<LedgerMeta>> {
        if let Some(m) = b.states.get(&ledger) {
            return Ok(Some(m.clone()));
        }
        self.ledgers.meta(ledger)
    }

    fn apply_op(&mut self, op: Op, b: &mut Batch) -> Result<i64> {
        if let Some(e) = &b.broken {
            return Err(BookieError::io("journal", std::io::Error::other(e.to_string())));
        }
        match op {
            Op::Add { ledger, entry, lac, checksum, payload, master_key, recovery } => {
                // The batch's copy of the ledger's state is updated in place (no clone of it
                // and its master key for every add); it enters the batch with the first add of
                // the ledger that succeeds.
                let loaded = match b.states.contains_key(&ledger) {
                    true => None,
                    false => Some(self.ledgers.meta(ledger)?.unwrap_or_else(|| LedgerMeta::new(&[]))),
                };
                let Some(meta) = loaded.as_ref().or_else(|| b.states.get(&ledger)) else {
                    return Err(BookieError::Invalid("ledger state missing from the batch"));
                };
                if !meta.master_key.is_empty() && meta.master_key != master_key[..] {
                    return Err(BookieError::Unauthorized(ledger));
                }
                if meta.fenced && !recovery {
                    return Err(BookieError::Fenced(ledger));
                }
                let first_key = meta.master_key.is_empty();
                let write = EntryWrite { ledger, entry, checksum, payload };
                let stored = match write.payload.len() >= self.write_once_bytes {
                    true => self.ledgers.storage.write_ref(&write)?,
                    false => None,
                };
                let mut records = || -> Result<()> {
                    if first_key {
                        self.append(b, record::MASTER_KEY, ledger, -1, -1, &[&master_key], None)?;
                    }
                    match &stored {
                        Some(at) => {
                            self.append(b, record::ENTRY_REF, ledger, entry, lac, &[&checksum.to_le_bytes(), at], None)
                        }
                        None => self.append_entry(b, ledger, entry, lac, checksum, &write.payload),
                    }
                };
                if let Err(e) = records() {
                    if let Some(at) = stored {
                        self.ledgers.storage.forget_refs(&[(ledger, entry, at)]);
                    }
                    return Err(e);
                }
                if let Some(at) = stored {
                    b.refs.push((ledger, entry, at));
                }
                if let Some(m) = loaded {
                    b.states.insert(ledger, m);
                }
                if let Some(meta) = b.states.get_mut(&ledger) {
                    if first_key {
                        meta.master_key = master_key.to_vec();
                    }
                    meta.lac = meta.lac.max(lac);
                }
                // A small payload may be a slice of a much larger request buffer, which the
                // cache must not keep alive: it gets a copy. A large one is most of whatever
                // buffer holds it and is shared.
                let payload = &write.payload;
                if payload.len() >= IN_PLACE_BYTES {
                    self.ledgers.cache.insert(ledger, entry, StoredEntry { checksum, payload: payload.clone() });
                } else {
                    self.ledgers.cache.insert_copy(ledger, entry, checksum, payload);
                }
                if stored.is_none() {
                    b.entries.push(write);
                }
                Ok(entry)
            }
            Op::Fence { ledger, master_key } => {
                let mut meta = match self.state(b, ledger)? {
                    Some(m) if m.master_key.is_empty() || master_key.is_empty() || m.master_key == master_key[..] => m,
                    Some(_) => return Err(BookieError::Unauthorized(ledger)),
                    None => LedgerMeta::new(&master_key),
                };
                if !meta.fenced {
                    if !master_key.is_empty() && meta.master_key.is_empty() {
                        meta.master_key = master_key.to_vec();
                    }
                    if !meta.master_key.is_empty() {
                        self.append(b, record::MASTER_KEY, ledger, -1, -1, &[&meta.master_key.clone()], None)?;
                    }
                    self.append(b, record::FENCE, ledger, -1, -1, &[], None)?;
                    meta.fenced = true;
                    b.states.insert(ledger, meta.clone());
                }
                // Already fenced: the answer still waits for this group's sync, which also
                // covers the record that fenced it.
                Ok(meta.lac)
            }
        }
    }

    fn append_entry(
        &mut self,
        b: &mut Batch,
        ledger: u64,
        entry: i64,
        lac: i64,
        checksum: u32,
        payload: &Bytes,
    ) -> Result<()> {
        let sum = checksum.to_le_bytes();
        if payload.len() >= IN_PLACE_BYTES {
            self.append(b, record::ENTRY, ledger, entry, lac, &[&sum], Some(payload))
        } else {
            self.append(b, record::ENTRY, ledger, entry, lac, &[&sum, payload], None)
        }
    }

    /// Queues a record with data `head` (copied) then `tail` (written in place).
    #[allow(clippy::too_many_arguments)]
    fn append(
        &mut self,
        b: &mut Batch,
        kind: u8,
        ledger: u64,
        entry: i64,
        lac: i64,
        head: &[&[u8]],
        tail: Option<&Bytes>,
    ) -> Result<()> {
        let tail_len = tail.map_or(0, |t| t.len());
        let len = record::encoded_len(head.iter().map(|d| d.len()).sum::<usize>() + tail_len) as u64;
        if self.seg.ended || self.seg.offset + self.pending() as u64 + len > self.size {
            // Mark the end, so replay can tell the unused rest of the segment from damage.
            if !self.seg.ended && self.seg.offset + (self.pending() + record::encoded_len(0)) as u64 <= self.size {
                record::encode(&mut self.buf, self.seg.seq, record::SEGMENT_END, 0, -1, -1, &[]);
            }
            // The batch's earlier records went with that write: none of it may be acknowledged.
            // Once it is written the segment is ended: if the roll fails (no next segment), the
            // next record tries again rather than going after the marker, where replay would
            // never see it.
            let rolled = self.flush_buf(b).and_then(|()| {
                self.seg.ended = true;
                self.roll(b)
            });
            if let Err(e) = rolled {
                b.broken = Some(BookieError::io("journal", std::io::Error::other(e.to_string())));
                return Err(e);
            }
        }
        record::encode_head(&mut self.buf, self.seg.seq, kind, ledger, entry, lac, head, tail.map_or(&[], |t| &t[..]));
        if let Some(t) = tail {
            self.piece_bytes += tail_len;
            self.pieces.push(Piece { buf_end: self.buf.len(), data: t.clone() });
        }
        Ok(())
    }

    fn flush_buf(&mut self, b: &mut Batch) -> Result<()> {
        let n = self.pending();
        if n == 0 {
            return Ok(());
        }
        // Zeros up to the end of the last page, which the next write overwrites: a write that
        // covers a page only in part makes the kernel read that page from the disk first (the
        // file's blocks are written, by the zero-fill or an earlier use), which stalled the
        // writer on a disk read in nearly every write. The page stays cached for the next
        // write, and replay reads zeros after the last record as the end of the journal.
        let end = self.seg.offset + n as u64;
        let pad = (end.next_multiple_of(PAGE_BYTES).min(self.size) - end) as usize;
        self.buf.resize(self.buf.len() + pad, 0);
        let written = self.write_pending();
        self.buf.clear();
        self.pieces.clear();
        self.piece_bytes = 0;
        let mark = self.marking.take();
        // On failure these records' adds fail; they must not reappear with a later batch.
        written.map_err(|e| BookieError::io(format!("writing journal segment {}", self.seg.seq), e))?;
        if let Some(m) = mark {
            self.marked = m;
        }
        let from = self.seg.offset;
        self.seg.offset += n as u64;
        if self.drop_pages {
            self.seg.advise_written(from, self.seg.offset);
        }
        b.bytes += n;
        self.shared.metrics.bytes.add(n as u64);
        Ok(())
    }

    /// Bytes queued for the segment: `buf` and the pieces.
    fn pending(&self) -> usize {
        self.buf.len() + self.piece_bytes
    }

    /// Writes `buf` with the pieces spliced in at their places, at the segment's offset.
    fn write_pending(&self) -> std::io::Result<()> {
        #[cfg(test)]
        if self.shared.fail_next_write.swap(false, Ordering::SeqCst) {
            return Err(std::io::Error::other("injected segment write failure"));
        }
        if self.pieces.is_empty() {
            return self.seg.file.write_all_at(&self.buf, self.seg.offset);
        }
        let mut slices = Vec::with_capacity(2 * self.pieces.len() + 1);
        let mut from = 0;
        for p in &self.pieces {
            if p.buf_end > from {
                slices.push(std::io::IoSlice::new(&self.buf[from..p.buf_end]));
            }
            slices.push(std::io::IoSlice::new(&p.data));
            from = p.buf_end;
        }
        if from < self.buf.len() {
            slices.push(std::io::IoSlice::new(&self.buf[from..]));
        }
        segment::pwritev_all(&self.seg.file, &mut slices, self.seg.offset)
    }

    fn roll(&mut self, b: &mut Batch) -> Result<()> {
        // The old segment is durable before anything lands in the new one, so after a crash
        // only the last segment holding records can end in a torn write (replay relies on it).
        // Under the syncing claim: the kernel reports a write-back error to one fdatasync of
        // the file only, so a sync of the same segment by the syncer must not run meanwhile
        // and succeed without the lost pages before this one's failure is recorded.
        let synced = {
            let mut q = self.shared.sync_q.lock().unwrap_or_else(|e| e.into_inner());
            while q.syncing {
                q = self.shared.sync_cv.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            q.syncing = true;
            drop(q);
            let r = self.seg.file.sync_data();
            if let Err(e) = &r {
                self.shared.fail(format!("syncing journal segment {}: {e}", self.seg.seq));
            }
            self.shared.sync_q.lock().unwrap_or_else(|e| e.into_inner()).syncing = false;
            self.shared.sync_cv.notify_all();
            r
        };
        if let Err(e) = synced {
            // As for the syncer's fdatasyncs: a later one could succeed without the lost pages.
            let e = BookieError::io(format!("syncing journal segment {}", self.seg.seq), e);
            tracing::error!(error = %e, "journal fdatasync failed; the journal acknowledges nothing more");
            return Err(e);
        }
        if self.drop_pages {
            self.seg.advise_synced();
        }
        let seq = self.seg.seq + 1;
        #[cfg(test)]
        if self.shared.fail_next_take.swap(false, Ordering::SeqCst) {
            return Err(BookieError::Invalid("injected segment allocation failure"));
        }
        let file = Arc::new(self.alloc.take(seq)?);
        self.seg = Segment::new(seq, file.clone());
        self.marked = 0;
        b.files.push(file);
        (self.on_roll)();
        Ok(())
    }

    fn hand_off(&self, b: Batch) {
        if b.acks.is_empty() {
            return;
        }
        let end = Position { segment: self.seg.seq, offset: self.seg.offset };
        let group = Group {
            files: b.files,
            refs: b.refs,
            placed: b.placed,
            acks: b.acks,
            ops: b.ops,
            born: Instant::now(),
            end,
        };
        let mut q = self.shared.sync_q.lock().unwrap_or_else(|e| e.into_inner());
        let idle = q.groups.is_empty() && !q.syncing && self.shared.queued.load(Ordering::Relaxed) == 0;
        if self.inline_sync && idle && group.ops <= INLINE_SYNC_MAX_OPS {
            // Nothing to batch with and nobody syncing: sync here. Adds arriving meanwhile
            // wait in the queue, as they would behind the syncer's fdatasync.
            q.syncing = true;
            drop(q);
            self.shared.sync_and_ack(vec![group], self.sync);
            let mut q = self.shared.sync_q.lock().unwrap_or_else(|e| e.into_inner());
            q.syncing = false;
            return;
        }
        q.bytes += b.bytes;
        q.groups.push(group);
        self.shared.sync_cv.notify_all();
    }
}

fn fail_all(b: &mut Batch, e: &BookieError) {
    for (ack, _) in b.acks.iter_mut() {
        ack.fail(|| BookieError::io("journal", std::io::Error::other(e.to_string())));
    }
    b.entries.clear();
    b.states.clear();
    b.refs.clear();
    b.placed.clear();
}

fn op_bytes(op: &Op) -> usize {
    match op {
        Op::Add { payload, master_key, .. } => record::encoded_len(payload.len() + 4) + master_key.len(),
        Op::Fence { .. } => record::encoded_len(0),
    }
}

struct Syncer {
    shared: Arc<Shared>,
    settings: JournalSettings,
}

impl Syncer {
    fn run(self) {
        let max_wait = Duration::from_micros(self.settings.max_group_wait_us);
        loop {
            let groups = {
                let mut q = self.shared.sync_q.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    // Also while the writer holds the syncing claim (its roll's fdatasync).
                    if q.groups.is_empty() || q.syncing {
                        if q.closed && q.groups.is_empty() {
                            return;
                        }
                        q = self.shared.sync_cv.wait(q).unwrap_or_else(|e| e.into_inner());
                        continue;
                    }
                    let age = q.groups[0].born.elapsed();
                    let writer_busy = self.shared.queued.load(Ordering::Relaxed) > 0;
                    let full = q.bytes >= self.settings.group_bytes;
                    let idle_ok = self.settings.flush_when_queue_empty && !writer_busy;
                    if full || idle_ok || age >= max_wait || q.closed {
                        break;
                    }
                    let (g, _) = self.shared.sync_cv.wait_timeout(q, max_wait - age).unwrap_or_else(|e| e.into_inner());
                    q = g;
                }
                q.bytes = 0;
                q.syncing = true;
                std::mem::take(&mut q.groups)
            };
            self.shared.sync_and_ack(groups, self.settings.sync);
            self.shared.sync_q.lock().unwrap_or_else(|e| e.into_inner()).syncing = false;
            // A roll may be waiting for the claim.
            self.shared.sync_cv.notify_all();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::checksum::entry_checksum;
    use crate::storage::mem::MemStorage;
    use crate::storage::LedgerStorage;
    use crate::test_util::resident_bytes;
    use std::collections::HashSet;

    /// An add of `payload` with its checksum.
    fn add_op(ledger: u64, entry: i64, lac: i64, payload: Bytes, key: &'static [u8], recovery: bool) -> Op {
        let checksum = entry_checksum(ledger, entry, &payload);
        Op::Add { ledger, entry, lac, checksum, payload, master_key: Bytes::from_static(key), recovery }
    }

    /// Submits `op` and waits for its outcome.
    fn outcome(journal: &Journal, op: Op) -> std::result::Result<i64, String> {
        let (tx, rx) = mpsc::channel();
        journal.submit(op, Box::new(move |r| tx.send(r.map_err(|e| e.to_string())).unwrap()));
        rx.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    /// Submits `op` and waits for its (successful) ack.
    fn submit_and_wait(journal: &Journal, op: Op) {
        outcome(journal, op).unwrap();
    }

    /// Replays `dir` from its first segment and checks that entries `0..n` of `ledger` come
    /// back as `payload` made them, with no torn tail.
    fn assert_replays(dir: &Path, ledger: u64, n: i64, payload: impl Fn(i64) -> Bytes) -> MemStorage {
        let replayed = MemStorage::new();
        let stats = replay::replay(dir, Position { segment: 1, offset: 0 }, &replayed, 1 << 20).unwrap();
        assert_eq!(stats.torn_tails, 0);
        for e in 0..n {
            let got = replayed.get_entry(ledger, e).unwrap().unwrap_or_else(|| panic!("entry {e} missing"));
            assert_eq!(got.payload, payload(e), "entry {e}");
        }
        replayed
    }

    /// Entries small (copied into the journal's buffer) and large (written in place) mixed in
    /// one batch and across segment rolls come back from replay byte for byte.
    #[test]
    fn mixed_sizes_replay_byte_for_byte_across_rolls() {
        let dir = tempfile::tempdir().unwrap();
        let journal = start_small_segments(dir.path());
        let payload = |e: i64| -> Bytes {
            let len = [10, 5000, 100, 40_000, IN_PLACE_BYTES, IN_PLACE_BYTES - 1, 70][e as usize % 7];
            (0..len).map(|i| (i as i64 * 31 + e) as u8).collect::<Vec<u8>>().into()
        };
        let (tx, rx) = mpsc::channel();
        let n = 120i64;
        for e in 0..n {
            let op = add_op(9, e, e - 1, payload(e), b"k", false);
            let tx = tx.clone();
            journal.submit(op, Box::new(move |r| tx.send(r.map_err(|e| e.to_string())).unwrap()));
        }
        for _ in 0..n {
            rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        }
        journal.stop();
        let segments = segment::list_segments(dir.path()).unwrap();
        assert!(segments.len() >= 4, "only {} segments: no rolls exercised", segments.len());
        let replayed = assert_replays(dir.path(), 9, n, payload);
        assert_eq!(replayed.ledger_meta(9).unwrap().unwrap().lac, n - 2);
    }

    /// A segment write that fails partway through a batch (the one before a roll) fails the
    /// whole batch: the records of the batch's earlier adds went with that write, so none of
    /// them may be acknowledged. Every add acknowledged is in the journal.
    #[test]
    fn a_failed_write_before_a_roll_fails_the_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let journal = start_small_segments(dir.path());
        let payload = |e: i64| Bytes::from(vec![e as u8; 10_000]);
        // 400 KB in one batch: the segment fills partway through, and the write before the
        // roll fails.
        journal.shared.fail_next_write.store(true, Ordering::SeqCst);
        let ops: Vec<Op> = (0..40).map(|e| add_op(4, e, e - 1, payload(e), b"k", false)).collect();
        let (tx, rx) = mpsc::channel();
        journal.submit_batch(
            ops,
            Box::new(move |r| tx.send(r.into_iter().map(|r| r.is_ok()).collect::<Vec<_>>()).unwrap()),
        );
        let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        // The journal goes on: a later batch is written and acknowledged.
        let ops: Vec<Op> = (40..50).map(|e| add_op(4, e, e - 1, payload(e), b"k", false)).collect();
        let (tx, rx) = mpsc::channel();
        journal.submit_batch(ops, Box::new(move |r| tx.send(r.iter().all(|r| r.is_ok())).unwrap()));
        assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), "the next batch was acknowledged");
        journal.stop();
        let replayed = MemStorage::new();
        replay::replay(dir.path(), Position { segment: 1, offset: 0 }, &replayed, 64 << 10).unwrap();
        let acked: Vec<i64> = (0..40).filter(|e| first[*e as usize]).collect();
        for e in acked.iter().copied().chain(40..50) {
            let got = replayed.get_entry(4, e).unwrap().map(|s| s.payload);
            assert!(got == Some(payload(e)), "entry {e} acknowledged but not in the journal");
        }
        assert_eq!(acked, Vec::<i64>::new(), "adds acknowledged from a batch whose write failed");
    }

    /// A roll that finds no next segment fails its batch, and nothing goes into the ended
    /// segment after its end marker (replay stops there): the next record rolls again, and
    /// every add acknowledged after the failure is in the journal.
    #[test]
    fn a_failed_roll_writes_nothing_after_the_segments_end() {
        let dir = tempfile::tempdir().unwrap();
        let journal = start_small_segments(dir.path());
        let payload = |e: i64| Bytes::from(vec![e as u8; if e < 40 { 10_000 } else { 10 }]);
        journal.shared.fail_next_take.store(true, Ordering::SeqCst);
        let ops: Vec<Op> = (0..40).map(|e| add_op(4, e, e - 1, payload(e), b"k", false)).collect();
        let (tx, rx) = mpsc::channel();
        journal.submit_batch(
            ops,
            Box::new(move |r| tx.send(r.into_iter().map(|r| r.is_ok()).collect::<Vec<_>>()).unwrap()),
        );
        let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(first.iter().any(|ok| !ok), "the roll did not fail");
        // Small records, which would fit in what is left of the ended segment.
        let ops: Vec<Op> = (40..50).map(|e| add_op(4, e, e - 1, payload(e), b"k", false)).collect();
        let (tx, rx) = mpsc::channel();
        journal.submit_batch(ops, Box::new(move |r| tx.send(r.iter().all(|r| r.is_ok())).unwrap()));
        assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), "the next batch was acknowledged");
        journal.stop();
        let replayed = MemStorage::new();
        replay::replay(dir.path(), Position { segment: 1, offset: 0 }, &replayed, 64 << 10).unwrap();
        for e in (0..40).filter(|e| first[*e as usize]).chain(40..50) {
            let got = replayed.get_entry(4, e).unwrap().map(|s| s.payload);
            assert!(got == Some(payload(e)), "entry {e} acknowledged but not in the journal");
        }
    }

    /// A journal of 256 KiB segments over an in-memory store (entries up to 64 KiB).
    fn start_small_segments(dir: &Path) -> Journal {
        let settings = JournalSettings { segment_bytes: 256 << 10, ..Default::default() };
        let ledgers = Arc::new(Ledgers::new(Arc::new(MemStorage::new()), 1 << 20));
        let metrics = JournalMetrics::register(&Registry::new(), 0);
        Journal::start(dir, 1, &settings, 64 << 10, ledgers, metrics, Box::new(|| {})).unwrap()
    }

    /// Entry-log store settings for the write-once tests: small logs, no compaction.
    fn small_logs() -> crate::config::StorageSettings {
        crate::config::StorageSettings { entry_log_bytes: 4 << 20, compaction_interval_ms: 0, ..Default::default() }
    }

    /// A journal in `dir` over `ledgers`, with 1 MiB segments.
    fn start_journal(dir: &Path, ledgers: &Arc<Ledgers>) -> Journal {
        let settings = JournalSettings { segment_bytes: 1 << 20, ..Default::default() };
        let metrics = JournalMetrics::register(&Registry::new(), 0);
        Journal::start(dir, 1, &settings, 1 << 20, ledgers.clone(), metrics, Box::new(|| {})).unwrap()
    }

    /// Submits adds `0..n` of `ledger` all at once and waits for every ack.
    fn add_all(journal: &Journal, ledger: u64, n: i64, payload: impl Fn(i64) -> Bytes) {
        let (tx, rx) = mpsc::channel();
        for e in 0..n {
            let tx = tx.clone();
            journal.submit(
                add_op(ledger, e, e - 1, payload(e), b"k", false),
                Box::new(move |r| tx.send(r.map_err(|e| e.to_string())).unwrap()),
            );
        }
        for _ in 0..n {
            rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        }
    }

    /// Copies the journal segments of `jdir` and the entry log files of the store in `sdir`:
    /// what a crash leaves of them (the store was never flushed; its logs are written with
    /// direct I/O).
    fn copy_crash_state(jdir: &Path, jcopy: &Path, sdir: &Path, scopy: &Path) {
        for (_, path) in segment::list_segments(jdir).unwrap() {
            std::fs::copy(&path, jcopy.join(path.file_name().unwrap())).unwrap();
        }
        std::fs::create_dir_all(scopy.join("logs")).unwrap();
        for e in std::fs::read_dir(sdir.join("logs")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), scopy.join("logs").join(e.file_name())).unwrap();
        }
    }

    /// Payloads from `write_once_bytes` on are written once, to the entry logs, and the journal
    /// only records where: its bytes stay far below theirs. The entry store is never flushed;
    /// copies of the journal segments and the log files taken once every add is acknowledged
    /// (what a crash leaves) replay into a store with nothing else, every entry byte for byte.
    #[test]
    fn large_payloads_are_written_once_and_replay_after_a_crash() {
        use crate::storage::entrylog::EntryLogStorage;
        let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
        let (jdir, sdir, jcopy, scopy) = (dirs[0].path(), dirs[1].path(), dirs[2].path(), dirs[3].path());
        let storage = Arc::new(EntryLogStorage::open(sdir, &small_logs()).unwrap());
        let ledgers = Arc::new(Ledgers::new(storage.clone(), 1 << 20));
        let journal = start_journal(jdir, &ledgers);
        let once = JournalSettings::default().write_once_bytes;
        let size = |e: i64| [100, 40_000, once, once - 1, 3000, 70_000][e as usize % 6];
        let payload = |e: i64| -> Bytes { (0..size(e)).map(|i| (i as i64 * 7 + e) as u8).collect::<Vec<u8>>().into() };
        let n = 240i64;
        add_all(&journal, 6, n, payload);
        let large: usize = (0..n).map(size).filter(|s| *s >= once).sum();
        let small: usize = (0..n).map(size).filter(|s| *s < once).sum();
        let journaled = journal.shared.metrics.bytes.get() as usize;
        assert!(journaled < small + large / 20, "journal wrote {journaled} bytes for {small} small and {large} large");
        copy_crash_state(jdir, jcopy, sdir, scopy);
        journal.stop();
        let replayed = EntryLogStorage::open(scopy, &small_logs()).unwrap();
        let stats = replay::replay(jcopy, Position { segment: 1, offset: 0 }, &replayed, 1 << 20).unwrap();
        assert_eq!((stats.torn_tails, stats.missing_refs), (0, 0));
        for e in 0..n {
            let got = replayed.get_entry(6, e).unwrap().unwrap_or_else(|| panic!("entry {e} missing"));
            assert_eq!(got.payload, payload(e), "entry {e}");
        }
        assert_eq!(replayed.ledger_meta(6).unwrap().unwrap().lac, n - 2);
    }

    /// An entry-log store whose reference syncs fail once `fail` is set, and whose index
    /// writes fail once `fail_index` is.
    struct FailingRefSync {
        inner: Arc<crate::storage::entrylog::EntryLogStorage>,
        fail: Arc<std::sync::atomic::AtomicBool>,
        fail_index: std::sync::atomic::AtomicBool,
    }

    impl LedgerStorage for FailingRefSync {
        fn write(&self, entries: &[EntryWrite], states: &[(u64, LedgerMeta)]) -> Result<()> {
            self.inner.write(entries, states)
        }
        fn get_entry(&self, ledger: u64, entry: i64) -> Result<Option<StoredEntry>> {
            self.inner.get_entry(ledger, entry)
        }
        fn ledger_meta(&self, ledger: u64) -> Result<Option<LedgerMeta>> {
            self.inner.ledger_meta(ledger)
        }
        fn last_entry(&self, ledger: u64) -> Result<Option<i64>> {
            self.inner.last_entry(ledger)
        }
        fn delete_ledger(&self, ledger: u64) -> Result<()> {
            self.inner.delete_ledger(ledger)
        }
        fn ledgers(&self) -> Result<Vec<u64>> {
            self.inner.ledgers()
        }
        fn flush(&self) -> Result<()> {
            self.inner.flush()
        }
        fn write_unindexed(
            &self,
            entries: &[EntryWrite],
            states: &[(u64, LedgerMeta)],
        ) -> Result<Option<Vec<crate::storage::EntryRef>>> {
            self.inner.write_unindexed(entries, states)
        }
        fn write_ref(&self, entry: &EntryWrite) -> Result<Option<crate::storage::EntryRef>> {
            self.inner.write_ref(entry)
        }
        fn index_refs(&self, refs: &[(u64, i64, crate::storage::EntryRef)]) -> Result<()> {
            if self.fail_index.load(Ordering::SeqCst) {
                self.inner.forget_refs(refs);
                return Err(BookieError::io("index write", std::io::Error::other("injected")));
            }
            self.inner.index_refs(refs)
        }
        fn forget_refs(&self, refs: &[(u64, i64, crate::storage::EntryRef)]) {
            self.inner.forget_refs(refs)
        }
        fn sync_refs(&self) -> Result<crate::storage::RefSync> {
            let finish = self.inner.sync_refs()?;
            let fail = self.fail.clone();
            Ok(Box::new(move || {
                finish()?;
                match fail.load(Ordering::SeqCst) {
                    true => Err(BookieError::io("entry log fdatasync", std::io::Error::from_raw_os_error(5))),
                    false => Ok(()),
                }
            }))
        }
    }

    /// Submits one add and returns its outcome.
    fn add_one(journal: &Journal, ledger: u64, entry: i64, payload: Bytes) -> std::result::Result<i64, String> {
        outcome(journal, add_op(ledger, entry, entry - 1, payload, b"k", false))
    }

    /// When the entry log's sync fails, the group waiting for it is not acknowledged, and
    /// neither is anything after it, even adds that need only the journal: after a failed
    /// fdatasync the page cache may have dropped the failed pages, and a later sync could
    /// report success without them.
    #[test]
    fn a_failed_entry_log_sync_acknowledges_nothing_from_then_on() {
        let (jdir, sdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let inner = Arc::new(crate::storage::entrylog::EntryLogStorage::open(sdir.path(), &small_logs()).unwrap());
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let storage = Arc::new(FailingRefSync { inner, fail: fail.clone(), fail_index: Default::default() });
        let ledgers = Arc::new(Ledgers::new(storage.clone(), 1 << 20));
        let journal = start_journal(jdir.path(), &ledgers);
        let large = |e: i64| Bytes::from(vec![e as u8; 20_000]);
        let small = |e: i64| Bytes::from(vec![e as u8; 100]);
        assert_eq!(add_one(&journal, 3, 0, large(0)), Ok(0));
        assert_eq!(add_one(&journal, 3, 1, small(1)), Ok(1));
        fail.store(true, Ordering::SeqCst);
        let err = add_one(&journal, 3, 2, large(2)).unwrap_err();
        assert!(err.contains("entry log fdatasync"), "{err}");
        // The store would sync again, and this add needs no entry-log sync at all.
        fail.store(false, Ordering::SeqCst);
        assert!(add_one(&journal, 3, 3, small(3)).is_err(), "acknowledged after a failed sync");
        assert!(add_one(&journal, 3, 4, large(4)).is_err(), "acknowledged after a failed sync");
        journal.stop();
        // The payloads of the failed adds will never be indexed: their logs stay compactable.
        assert_eq!(storage.inner.unindexed_logs(), 0);
    }

    /// A failed index write fails its adds and every later one, and the checkpoint position
    /// stays before them: the store may not serve those entries, and only a replay after a
    /// restart (which starts at the checkpoint) writes them again.
    #[test]
    fn a_failed_index_write_acknowledges_nothing_from_then_on() {
        let (jdir, sdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let inner = Arc::new(crate::storage::entrylog::EntryLogStorage::open(sdir.path(), &small_logs()).unwrap());
        let storage = Arc::new(FailingRefSync { inner, fail: Default::default(), fail_index: Default::default() });
        let ledgers = Arc::new(Ledgers::new(storage.clone(), 1 << 20));
        let journal = start_journal(jdir.path(), &ledgers);
        let small = |e: i64| Bytes::from(vec![e as u8; 100]);
        assert_eq!(add_one(&journal, 3, 0, small(0)), Ok(0));
        let checkpoint = journal.applied();
        storage.fail_index.store(true, Ordering::SeqCst);
        let err = add_one(&journal, 3, 1, small(1)).unwrap_err();
        assert!(err.contains("indexing entries"), "{err}");
        storage.fail_index.store(false, Ordering::SeqCst);
        assert!(add_one(&journal, 3, 2, small(2)).is_err(), "acknowledged after a failed index write");
        assert_eq!(journal.applied(), checkpoint, "the checkpoint passed entries never indexed");
        journal.stop();
        assert_eq!(storage.inner.unindexed_logs(), 0);
    }

    /// Each batch after a sync starts with a `SYNCED` record giving how much of the segment was
    /// durable, so replay can tell damage to an acknowledged record (an error) from the torn,
    /// unsynced tail of a power loss (dropped).
    #[test]
    fn batches_record_how_much_of_the_segment_was_durable() {
        let dir = tempfile::tempdir().unwrap();
        let ledgers = Arc::new(Ledgers::new(Arc::new(MemStorage::new()), 1 << 20));
        let journal = start_journal(dir.path(), &ledgers);
        let n = 20i64;
        for e in 0..n {
            submit_and_wait(&journal, add_op(4, e, e - 1, Bytes::from(vec![e as u8; 300]), b"k", false));
        }
        journal.stop();
        let (path, bytes, marks, entries) = first_segment_records(dir.path());
        assert_eq!(entries.len(), n as usize);
        // One add at a time, each acknowledged before the next: every later add's batch says
        // the one before was durable.
        assert_eq!(marks.len(), n as usize - 1, "{marks:?}");
        for (i, (at, synced)) in marks.iter().enumerate() {
            assert!(*synced > entries[i] && synced <= at, "mark {i} at {at} says {synced}");
        }
        // So damage to an acknowledged record is reported, not dropped as a torn tail.
        let mut damaged = bytes.clone();
        damaged[entries[1] + 40] ^= 1;
        std::fs::write(&path, &damaged).unwrap();
        let replayed = MemStorage::new();
        match replay::replay(dir.path(), Position { segment: 1, offset: 0 }, &replayed, 1 << 20) {
            Err(BookieError::CorruptJournal { offset, .. }) => assert_eq!(offset, entries[1] as u64),
            other => panic!("expected CorruptJournal, got {other:?}"),
        }
    }

    /// The first segment of `dir`: its path and bytes, its `SYNCED` records (offset, offset
    /// they say was durable) and the offsets of its entry records.
    #[allow(clippy::type_complexity)]
    fn first_segment_records(dir: &Path) -> (PathBuf, Vec<u8>, Vec<(usize, usize)>, Vec<usize>) {
        let (seq, path) = segment::list_segments(dir).unwrap().remove(0);
        let bytes = std::fs::read(&path).unwrap();
        let (mut off, mut marks, mut entries) = (0usize, Vec::new(), Vec::new());
        while let record::Decoded::Record(r, len) = record::decode(&bytes[off..], seq, 1 << 20) {
            match r.kind {
                record::SYNCED => marks.push((off, r.entry as usize)),
                record::ENTRY => entries.push(off),
                _ => {}
            }
            off += len;
        }
        (path, bytes, marks, entries)
    }

    /// A batch whose write failed took its `SYNCED` record with it: the next batch, written
    /// where the failed one was, says again how much of the segment was durable, so damage to
    /// the acknowledged records before it is still told from a torn tail. (Before, the mark
    /// counted as written and no later batch repeated it.)
    #[test]
    fn a_failed_write_does_not_lose_the_durability_mark() {
        let dir = tempfile::tempdir().unwrap();
        let ledgers = Arc::new(Ledgers::new(Arc::new(MemStorage::new()), 1 << 20));
        let journal = start_journal(dir.path(), &ledgers);
        let payload = |e: i64| Bytes::from(vec![e as u8; 300]);
        submit_and_wait(&journal, add_op(4, 0, -1, payload(0), b"k", false));
        journal.shared.fail_next_write.store(true, Ordering::SeqCst);
        assert!(outcome(&journal, add_op(4, 1, 0, payload(1), b"k", false)).is_err(), "the failed write's add");
        submit_and_wait(&journal, add_op(4, 1, 0, payload(1), b"k", false));
        journal.stop();
        let (_, _, marks, entries) = first_segment_records(dir.path());
        assert_eq!(entries.len(), 2, "entries 0 and 1, once each");
        assert!(
            marks.iter().any(|(at, synced)| *synced > entries[0] && *at < entries[1]),
            "no record before entry 1 says entry 0 was durable: {marks:?} {entries:?}"
        );
    }

    /// With syncing off nothing is durable, and no `SYNCED` record claims otherwise.
    #[test]
    fn without_syncs_no_record_claims_durability() {
        let dir = tempfile::tempdir().unwrap();
        let ledgers = Arc::new(Ledgers::new(Arc::new(MemStorage::new()), 1 << 20));
        let settings = JournalSettings { segment_bytes: 1 << 20, sync: false, ..Default::default() };
        let metrics = JournalMetrics::register(&Registry::new(), 0);
        let journal = Journal::start(dir.path(), 1, &settings, 1 << 20, ledgers, metrics, Box::new(|| {})).unwrap();
        for e in 0..10 {
            submit_and_wait(&journal, add_op(4, e, e - 1, Bytes::from(vec![1u8; 100]), b"k", false));
        }
        journal.stop();
        let (seq, path) = segment::list_segments(dir.path()).unwrap().remove(0);
        let bytes = std::fs::read(&path).unwrap();
        let (mut off, mut kinds) = (0usize, Vec::new());
        while let record::Decoded::Record(r, len) = record::decode(&bytes[off..], seq, 1 << 20) {
            kinds.push(r.kind);
            off += len;
        }
        assert_eq!(kinds.iter().filter(|k| **k == record::ENTRY).count(), 10);
        assert!(!kinds.contains(&record::SYNCED), "{kinds:?}");
    }

    /// An entry-log store that notes which payloads stored by reference were indexed before a
    /// sync covering them had finished.
    #[derive(Default)]
    struct SyncOrder {
        inner: Option<Arc<crate::storage::entrylog::EntryLogStorage>>,
        /// Stored, no sync begun since.
        stored: Mutex<Vec<(u64, i64)>>,
        durable: Arc<Mutex<HashSet<(u64, i64)>>>,
        early: Mutex<Vec<(u64, i64)>>,
        /// Stored through `write_unindexed`.
        unindexed: Mutex<Vec<(u64, i64)>>,
    }

    impl SyncOrder {
        fn store(&self) -> &crate::storage::entrylog::EntryLogStorage {
            self.inner.as_deref().unwrap()
        }
    }

    impl LedgerStorage for SyncOrder {
        fn write(&self, entries: &[EntryWrite], states: &[(u64, LedgerMeta)]) -> Result<()> {
            self.store().write(entries, states)
        }
        fn get_entry(&self, ledger: u64, entry: i64) -> Result<Option<StoredEntry>> {
            self.store().get_entry(ledger, entry)
        }
        fn ledger_meta(&self, ledger: u64) -> Result<Option<LedgerMeta>> {
            self.store().ledger_meta(ledger)
        }
        fn last_entry(&self, ledger: u64) -> Result<Option<i64>> {
            self.store().last_entry(ledger)
        }
        fn delete_ledger(&self, ledger: u64) -> Result<()> {
            self.store().delete_ledger(ledger)
        }
        fn ledgers(&self) -> Result<Vec<u64>> {
            self.store().ledgers()
        }
        fn flush(&self) -> Result<()> {
            self.store().flush()
        }
        fn write_unindexed(
            &self,
            entries: &[EntryWrite],
            states: &[(u64, LedgerMeta)],
        ) -> Result<Option<Vec<crate::storage::EntryRef>>> {
            self.unindexed.lock().unwrap().extend(entries.iter().map(|e| (e.ledger, e.entry)));
            self.store().write_unindexed(entries, states)
        }
        fn write_ref(&self, entry: &EntryWrite) -> Result<Option<crate::storage::EntryRef>> {
            let at = self.store().write_ref(entry)?;
            self.stored.lock().unwrap().push((entry.ledger, entry.entry));
            Ok(at)
        }
        fn index_refs(&self, refs: &[(u64, i64, crate::storage::EntryRef)]) -> Result<()> {
            let durable = self.durable.lock().unwrap();
            let unindexed = self.unindexed.lock().unwrap();
            // Payloads the journal holds need no reference sync.
            let early =
                refs.iter().map(|(l, e, _)| (*l, *e)).filter(|k| !durable.contains(k) && !unindexed.contains(k));
            self.early.lock().unwrap().extend(early);
            self.store().index_refs(refs)
        }
        fn sync_refs(&self) -> Result<crate::storage::RefSync> {
            // Taken before the store's sync begins: each of these is covered by it.
            let covered = std::mem::take(&mut *self.stored.lock().unwrap());
            let finish = self.store().sync_refs()?;
            let durable = self.durable.clone();
            Ok(Box::new(move || {
                finish()?;
                durable.lock().unwrap().extend(covered);
                Ok(())
            }))
        }
    }

    /// A payload stored by reference is indexed only once it and its journal record are
    /// durable, and before its add is acknowledged. RocksDB writes its memtable out whenever
    /// it fills: an index entry indexed earlier could outlive a power loss that took the
    /// record, and the entry would then read as corrupt instead of absent.
    #[test]
    fn references_are_indexed_after_their_sync_and_before_the_ack() {
        let (jdir, sdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let inner = Arc::new(crate::storage::entrylog::EntryLogStorage::open(sdir.path(), &small_logs()).unwrap());
        let storage = Arc::new(SyncOrder { inner: Some(inner.clone()), ..Default::default() });
        let ledgers = Arc::new(Ledgers::new(storage.clone(), 1 << 20));
        let journal = start_journal(jdir.path(), &ledgers);
        // Large payloads (stored by reference) and, every third, small ones (in the journal).
        let payload = |e: i64| Bytes::from(vec![e as u8; if e % 3 == 0 { 1000 } else { 20_000 + e as usize }]);
        let (tx, rx) = mpsc::channel();
        let n = 300i64;
        for e in 0..n {
            let (tx, inner) = (tx.clone(), inner.clone());
            journal.submit(
                add_op(7, e, e - 1, payload(e), b"k", false),
                Box::new(move |r| {
                    // Read from the store itself, not the tail cache, as the ack goes out.
                    let stored = inner.get_entry(7, e).map_err(|e| e.to_string());
                    tx.send((e, r.map_err(|e| e.to_string()), stored.map(|s| s.map(|s| s.payload)))).unwrap()
                }),
            );
        }
        for _ in 0..n {
            let (e, acked, stored) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!(acked, Ok(e));
            assert_eq!(stored, Ok(Some(payload(e))), "entry {e} not readable from the store at its ack");
        }
        journal.stop();
        assert_eq!(storage.durable.lock().unwrap().len(), 200, "every large payload went through a sync");
        assert_eq!(storage.unindexed.lock().unwrap().len(), 100, "every small one was stored unindexed");
        assert_eq!(*storage.early.lock().unwrap(), vec![], "indexed before its sync finished");
    }

    /// An entry whose payload the journal holds is indexed only once its journal record is
    /// durable: with the syncer held just before its fdatasync, the store does not have the
    /// group's entries yet (the tail cache serves them meanwhile). An index entry written
    /// earlier could reach the disk on its own and, after a power loss that took the journal
    /// record (the add never acknowledged), point at a lost entry-log record: the entry would
    /// read as corrupt, not absent.
    #[test]
    fn journaled_entries_are_indexed_only_once_their_records_are_durable() {
        let (jdir, sdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = Arc::new(crate::storage::entrylog::EntryLogStorage::open(sdir.path(), &small_logs()).unwrap());
        let ledgers = Arc::new(Ledgers::new(store.clone(), 1 << 20));
        let journal = start_journal(jdir.path(), &ledgers);
        let ((entered_tx, entered), (go, go_rx)) = (mpsc::channel(), mpsc::channel::<()>());
        *journal.shared.before_sync.lock().unwrap() = Some(Box::new(move || {
            entered_tx.send(()).unwrap();
            // Released by the test, or by its end if it fails first.
            let _ = go_rx.recv();
        }));
        // One group of small adds: more than the writer syncs itself, so the syncer takes it.
        let n = 3 * INLINE_SYNC_MAX_OPS as i64;
        let payload = |e: i64| Bytes::from(vec![e as u8 ^ 0x3c; 500 + e as usize]);
        let ops: Vec<Op> = (0..n).map(|e| add_op(9, e, e - 1, payload(e), b"k", false)).collect();
        let (tx, rx) = mpsc::channel();
        journal.submit_batch(
            ops,
            Box::new(move |r| {
                tx.send(r.into_iter().map(|r| r.map_err(|e| e.to_string())).collect::<Vec<_>>()).unwrap()
            }),
        );
        entered.recv_timeout(Duration::from_secs(10)).unwrap();
        // Observed while held, asserted after the release (a failed assertion must not leave
        // the syncer waiting while the journal's drop joins it).
        let held: Vec<_> = (0..n)
            .map(|e| {
                let stored = store.get_entry(9, e).map(|s| s.is_some()).map_err(|e| e.to_string());
                let cached = ledgers.read_entry(9, e).ok().flatten().map(|s| s.payload);
                (e, stored, cached)
            })
            .collect();
        drop(go);
        let acked = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        for (e, stored, cached) in held {
            assert_eq!(stored, Ok(false), "entry {e} indexed before its journal record was durable");
            assert_eq!(cached, Some(payload(e)), "entry {e} from the tail cache meanwhile");
        }
        assert_eq!(acked, (0..n).map(Ok).collect::<Vec<_>>());
        for e in 0..n {
            assert_eq!(store.get_entry(9, e).unwrap().map(|s| s.payload), Some(payload(e)), "entry {e} after the ack");
        }
        journal.stop();
        assert_eq!(store.unindexed_logs(), 0, "every stored record was indexed");
    }

    /// Two journals over one store: the second one's large payloads fill the first logs, then
    /// the first journal's small adds follow. After a crash nothing in those logs is indexed,
    /// so the store holds them only for the references; the first journal's replay must not
    /// let them go before the second one's replay has taken them back (the bookie flushes
    /// once, after every journal's replay), and after that flush and a reopen they stay.
    #[test]
    fn references_survive_another_journals_replay() {
        use crate::storage::entrylog::EntryLogStorage;
        let dirs: Vec<_> = (0..6).map(|_| tempfile::tempdir().unwrap()).collect();
        let p = |i: usize| dirs[i].path();
        let storage = Arc::new(EntryLogStorage::open(p(0), &small_logs()).unwrap());
        let ledgers = Arc::new(Ledgers::new(storage.clone(), 1 << 20));
        let (first, second) = (start_journal(p(1), &ledgers), start_journal(p(2), &ledgers));
        let large = |e: i64| Bytes::from(vec![e as u8; 20_000]);
        let small = |e: i64| Bytes::from(vec![e as u8 ^ 0x5a; 1000]);
        add_all(&second, 2, 400, large);
        add_all(&first, 1, 100, small);
        copy_crash_state(p(1), p(3), p(0), p(5));
        copy_crash_state(p(2), p(4), p(0), p(5));
        first.stop();
        second.stop();
        {
            let replayed = EntryLogStorage::open(p(5), &small_logs()).unwrap();
            for j in [p(3), p(4)] {
                let stats = replay::replay(j, Position { segment: 1, offset: 0 }, &replayed, 1 << 20).unwrap();
                assert_eq!(stats.missing_refs, 0, "{}", j.display());
            }
            replayed.flush().unwrap();
        }
        let reopened = EntryLogStorage::open(p(5), &small_logs()).unwrap();
        for e in 0..400 {
            let got = reopened.get_entry(2, e).unwrap().unwrap_or_else(|| panic!("large entry {e} missing"));
            assert_eq!(got.payload, large(e), "large entry {e}");
        }
        for e in 0..100 {
            assert_eq!(reopened.get_entry(1, e).unwrap().unwrap().payload, small(e), "small entry {e}");
        }
    }

    /// Bytes of `path` resident in the page cache, as util-linux's `fincore` reports them.
    /// (The temp dir must be on a disk-backed file system: tmpfs pages cannot be dropped.)
    /// Writes `n` adds of `size` bytes one after another (each synced and acked before the
    /// next); returns the path of the first segment.
    fn write_one_at_a_time(dir: &Path, settings: &JournalSettings, n: i64, size: usize) -> PathBuf {
        let ledgers = Arc::new(Ledgers::new(Arc::new(MemStorage::new()), 1 << 20));
        let metrics = JournalMetrics::register(&Registry::new(), 0);
        let journal = Journal::start(dir, 1, settings, size, ledgers, metrics, Box::new(|| {})).unwrap();
        let payload = Bytes::from(vec![7u8; size]);
        for e in 0..n {
            submit_and_wait(&journal, add_op(3, e, e - 1, payload.clone(), b"k", false));
        }
        journal.stop();
        segment::segment_path(dir, 1)
    }

    /// With `remove_pages_from_cache` the journal's synced pages leave the page cache as it
    /// goes (all but the last couple of writes); without it all of them stay. Either way every
    /// record replays.
    #[test]
    fn synced_journal_pages_leave_the_page_cache() {
        let (n, size) = (128i64, 32 << 10);
        let written = n as u64 * size as u64;
        for drop_pages in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let settings =
                JournalSettings { segment_bytes: 16 << 20, remove_pages_from_cache: drop_pages, ..Default::default() };
            let seg = write_one_at_a_time(dir.path(), &settings, n, size);
            let resident = resident_bytes(&seg);
            if drop_pages {
                assert!(resident < written / 8, "{resident} of {written} bytes written still cached");
            } else {
                assert!(resident >= written, "only {resident} of {written} bytes written cached");
            }
            let replayed = MemStorage::new();
            replay::replay(dir.path(), Position { segment: 1, offset: 0 }, &replayed, 1 << 20).unwrap();
            assert_eq!(replayed.ledger_meta(3).unwrap().unwrap().lac, n - 2, "drop_pages {drop_pages}");
            for e in [0, n / 2, n - 1] {
                let got = replayed.get_entry(3, e).unwrap().unwrap_or_else(|| panic!("entry {e} missing"));
                assert_eq!(got.payload.len(), size);
            }
        }
    }

    /// A segment the writer has finished and synced leaves the page cache whole.
    #[test]
    fn finished_segments_leave_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let settings = JournalSettings { segment_bytes: 1 << 20, ..Default::default() };
        write_one_at_a_time(dir.path(), &settings, 320, 16 << 10);
        let segments = segment::list_segments(dir.path()).unwrap();
        assert!(segments.len() >= 5, "only {} segments: too few rolls exercised", segments.len());
        // The last two may be the one being written and the next, named in advance.
        for (seq, path) in &segments[..segments.len() - 2] {
            assert_eq!(resident_bytes(path), 0, "segment {seq} still cached");
        }
    }

    /// Bytes the kernel fetched from storage for this process's journal writer threads.
    fn writers_read_bytes() -> u64 {
        let mut total = 0;
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim() != "journal-writer" {
                continue;
            }
            let io = std::fs::read_to_string(task.path().join("io")).unwrap_or_default();
            let line = io.lines().find_map(|l| l.strip_prefix("read_bytes:"));
            total += line.map_or(0, |v| v.trim().parse::<u64>().unwrap());
        }
        total
    }

    /// Writes that end inside a page do not make the kernel read that page from the disk
    /// first: the writer fills the page up with zeros (which the next write overwrites). The
    /// segment here is a recycled one, its blocks written and none of them cached, as a
    /// zero-filled or reused segment is under load; every add ends mid-page.
    #[test]
    fn writes_ending_mid_page_read_nothing_from_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4u64 << 20;
        let free = dir.path().join(format!("prealloc-0.{}", segment::FREE_EXT));
        {
            let f = std::fs::File::create(&free).unwrap();
            f.write_all_at(&vec![0xab; size as usize], 0).unwrap();
            f.sync_all().unwrap();
            rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        }
        assert_eq!(resident_bytes(&free), 0, "the recycled segment is still cached");
        let settings = JournalSettings { segment_bytes: size, ..Default::default() };
        let ledgers = Arc::new(Ledgers::new(Arc::new(MemStorage::new()), 1 << 20));
        let metrics = JournalMetrics::register(&Registry::new(), 0);
        let journal = Journal::start(dir.path(), 1, &settings, 1000, ledgers, metrics, Box::new(|| {})).unwrap();
        let n = 200i64;
        let payload = |e: i64| Bytes::from(vec![e as u8; 1000]);
        for e in 0..n {
            submit_and_wait(&journal, add_op(5, e, e - 1, payload(e), b"k", false));
        }
        let read = writers_read_bytes();
        journal.stop();
        assert!(read < 64 << 10, "the journal writer read {read} bytes from the disk for {n} adds");
        assert_replays(dir.path(), 5, n, payload);
    }

    /// The per-ledger rules, within one batch and across batches: the first add sets the master
    /// key, an add with another key is refused (and changes nothing), a fence refuses normal
    /// adds and lets recovery adds in, and the LAC only grows.
    #[test]
    fn master_key_fence_and_lac_rules() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(MemStorage::new());
        let journal = start_journal(dir.path(), &Arc::new(Ledgers::new(storage.clone(), 1 << 20)));
        let (tx, rx) = mpsc::channel();
        let add = |entry: i64, lac: i64, key: &'static [u8], recovery: bool| {
            let op = add_op(4, entry, lac, Bytes::from(vec![entry as u8; 10]), key, recovery);
            let tx = tx.clone();
            journal.submit(op, Box::new(move |r| tx.send((entry, r.map_err(|e| e.to_string()))).unwrap()));
        };
        // Queued together, so most land in one writer batch.
        add(0, -1, b"key", false);
        add(1, 0, b"other", false);
        add(2, 1, b"key", false);
        add(3, 0, b"key", false);
        let mut got: Vec<_> = (0..4).map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap()).collect();
        got.sort_by_key(|(e, _)| *e);
        assert_eq!(got[0].1, Ok(0));
        assert!(got[1].1.as_ref().is_err_and(|e| e.contains("wrong master key")), "{:?}", got[1]);
        assert_eq!(got[2].1, Ok(2));
        assert_eq!(got[3].1, Ok(3));
        let fence = |key: &'static [u8]| {
            let tx = tx.clone();
            journal.submit(
                Op::Fence { ledger: 4, master_key: Bytes::from_static(key) },
                Box::new(move |r| tx.send((-1, r.map_err(|e| e.to_string()))).unwrap()),
            );
            rx.recv_timeout(Duration::from_secs(10)).unwrap().1
        };
        assert_eq!(fence(b"key"), Ok(1), "the fence answers the highest LAC seen");
        add(4, 3, b"key", false);
        let (_, r) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(r.as_ref().is_err_and(|e| e.contains("fenced")), "{r:?}");
        add(4, 3, b"key", true);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap().1, Ok(4));
        journal.stop();
        let meta = storage.ledger_meta(4).unwrap().unwrap();
        assert_eq!((meta.fenced, meta.lac, &meta.master_key[..]), (true, 3, &b"key"[..]));
        assert!(storage.get_entry(4, 1).unwrap().is_none(), "the refused add left nothing");
    }

    /// A batch goes through as one: one answer with every outcome in the batch's order,
    /// refusals among them and changing nothing, after the batch is durable; a batch after a
    /// fence is refused whole except its recovery adds; a stopped journal refuses a batch whole.
    #[test]
    fn a_batch_is_answered_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(MemStorage::new());
        let journal = start_journal(dir.path(), &Arc::new(Ledgers::new(storage.clone(), 1 << 20)));
        let (tx, rx) = mpsc::channel();
        let batch = |adds: &[(i64, &'static [u8], bool)]| {
            let ops = adds.iter().map(|(e, key, rec)| add_op(5, *e, e - 1, Bytes::from(vec![*e as u8; 20]), key, *rec));
            let tx = tx.clone();
            journal.submit_batch(
                ops.collect(),
                Box::new(move |rs| tx.send(rs.into_iter().map(|r| r.map_err(|e| e.to_string())).collect()).unwrap()),
            );
            let got: Vec<std::result::Result<i64, String>> = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert!(rx.try_recv().is_err(), "one answer per batch");
            got
        };
        let got = batch(&[(0, b"key", false), (1, b"key", false), (2, b"bad", false), (3, b"key", false)]);
        assert_eq!(got[..2], [Ok(0), Ok(1)]);
        assert!(got[2].as_ref().is_err_and(|e| e.contains("wrong master key")), "{got:?}");
        assert_eq!(got[3], Ok(3));
        assert_eq!(journal.shared.metrics.add.count(), 4, "every add of the batch is timed");
        let (ftx, frx) = mpsc::channel();
        journal.submit(
            Op::Fence { ledger: 5, master_key: Bytes::from_static(b"key") },
            Box::new(move |r| ftx.send(r.is_ok()).unwrap()),
        );
        assert!(frx.recv_timeout(Duration::from_secs(10)).unwrap());
        let got = batch(&[(4, b"key", false), (5, b"key", true), (6, b"key", false)]);
        assert!(got[0].as_ref().is_err_and(|e| e.contains("fenced")), "{got:?}");
        assert_eq!(got[1], Ok(5));
        assert!(got[2].as_ref().is_err_and(|e| e.contains("fenced")), "{got:?}");
        journal.stop();
        let got = batch(&[(7, b"key", false), (8, b"key", false)]);
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|r| r.as_ref().is_err_and(|e| e.contains("shutting down"))), "{got:?}");
        for (e, kept) in [(0, true), (1, true), (2, false), (3, true), (4, false), (5, true), (6, false)] {
            assert_eq!(storage.get_entry(5, e).unwrap().is_some(), kept, "entry {e}");
        }
    }
}
