//! The default entry store: payloads in entry logs, an index in RocksDB.
//!
//! Entries are appended, as records ([`record`]), to the current entry log, a file in
//! `logs/` that is written with direct I/O from aligned buffers by a writer thread. RocksDB
//! (its WAL off: the journal is the write-ahead log) holds three column families:
//! - `index`: key [`super::entry_key`] (ledger, entry big-endian) → [`record::Location`];
//! - `ledgers`: ledger id (u64 BE) → [`LedgerMeta::encode`];
//! - `logs`: log id (u64 BE) → the log's accounting ([`LogInfo`]): its end, whether it is
//!   sealed, and the bytes each ledger has in it.
//!
//! Space is reused, not freed. A log none of whose ledgers is left is renamed into a pool
//! (`*.free`) after the next flush, and the next log is that file, overwritten from its
//! start: overwriting blocks a file already owns needs no block allocation, and giving blocks
//! back to the file system (unlink, with online discard) stalled the journal's fdatasyncs on
//! the same disk for tens of milliseconds. A log whose live bytes fall below
//! `compaction_threshold` of its size is compacted: its live records are copied to the
//! current log, the index is pointed at the copies once they are durable, and the log goes to
//! the pool.
//!
//! Crash safety. A flush writes out every buffer, fdatasyncs the logs written since the last
//! flush, then records their accounting and flushes RocksDB. What a crash loses after that is
//! in the journal after the checkpoint and is written again by replay. Compaction points the
//! index at a copy only after the copy is durable, and a log is reused only after a flush that
//! made its ledgers' removal from the index durable. Logs not sealed at the last flush are
//! scanned when the store opens, and records the index points to are accounted to them.

mod record;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rocksdb::{ColumnFamilyDescriptor, FlushOptions, Options, WriteBatch, WriteOptions, DB};

use self::record::{AlignedBuf, Location, Scanner, HEADER};
use super::{entry_key, EntryWrite, LedgerMeta, LedgerStorage, StoredEntry};
use crate::config::StorageSettings;
use crate::error::{BookieError, Result};

const INDEX: &str = "index";
const LEDGERS: &str = "ledgers";
const LOGS: &str = "logs";
/// Bytes gathered before a buffer goes to the writer thread.
const CHUNK: usize = 2 << 20;
/// A full buffer the writer finds nothing queued behind goes out in writes of this size: a
/// journal fdatasync issued meanwhile then waits behind one piece in the disk's queue, not
/// behind a whole buffer (about 2 ms on a disk writing 1 GB/s), which at half load was most of
/// the journal's p99 sync time. Buffers that queue up (the disk is the limit) go in one large
/// write, and so does a partly filled buffer sent for a sync, which waits for all of it anyway
/// (in pieces, each write-once acknowledgement waited for one more disk round trip).
const LONE_PIECE: usize = 256 << 10;
const _: () = assert!(LONE_PIECE.is_multiple_of(record::ALIGN), "direct writes need aligned pieces");
/// Bytes one write of queued buffers covers at most.
const MAX_WRITE: usize = 16 << 20;
/// Buffers waiting for the writer, at most (appends wait beyond this).
const MAX_INFLIGHT: usize = 64 << 20;
/// The pool keeps as many files as logs were opened over this long.
const POOL_WINDOW: Duration = Duration::from_secs(120);
/// Pooled files deleted per flush at most.
const TRIM_PER_FLUSH: usize = 2;
/// Read descriptors kept open at most.
const MAX_READERS: usize = 512;

/// A log's accounting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct LogInfo {
    /// Bytes of records written.
    end: u64,
    /// No more records will be appended.
    sealed: bool,
    /// Record bytes per ledger (over-counts rewritten entries until the ledger goes).
    ledgers: HashMap<u64, u64>,
}

impl LogInfo {
    fn live(&self) -> u64 {
        self.ledgers.values().sum()
    }

    /// `[end u64 LE][sealed u8]` then `[ledger u64 LE][bytes u64 LE]` pairs.
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(9 + 16 * self.ledgers.len());
        v.extend_from_slice(&self.end.to_le_bytes());
        v.push(u8::from(self.sealed));
        for (l, b) in &self.ledgers {
            v.extend_from_slice(&l.to_le_bytes());
            v.extend_from_slice(&b.to_le_bytes());
        }
        v
    }

    fn decode(v: &[u8]) -> Option<LogInfo> {
        if v.len() < 9 || !(v.len() - 9).is_multiple_of(16) || v[8] > 1 {
            return None;
        }
        let u = |b: &[u8]| {
            let mut x = [0u8; 8];
            x.copy_from_slice(b);
            u64::from_le_bytes(x)
        };
        let ledgers = v[9..].chunks_exact(16).map(|c| (u(&c[..8]), u(&c[8..]))).collect();
        Some(LogInfo { end: u(&v[..8]), sealed: v[8] == 1, ledgers })
    }
}

/// The log being appended to.
struct Current {
    id: u64,
    file: Arc<File>,
    /// File offset of the buffer's first byte (aligned).
    base: u64,
    buf: AlignedBuf,
    /// The buffer holds bytes the writer has not been given.
    unsent: bool,
    /// ... among them payloads stored by reference, which go to the writer as soon as it is
    /// idle (see [`EntryLogStorage::write_ref`]).
    unsent_refs: bool,
}

impl Current {
    fn end(&self) -> u64 {
        self.base + self.buf.len() as u64
    }
}

/// A buffer handed to the writer thread, readable until written.
struct Inflight {
    seq: u64,
    log: u64,
    offset: u64,
    buf: Arc<AlignedBuf>,
}

struct Chunk {
    seq: u64,
    file: Arc<File>,
    offset: u64,
    buf: Arc<AlignedBuf>,
    /// Sent because it filled up, not for a sync or a seal that waits for it: alone, it may go
    /// out in pieces (see `LONE_PIECE`).
    filled: bool,
}

/// A reference sync for the sync thread, queued behind the buffers it covers.
struct RefSyncJob {
    turn: u64,
    files: Vec<(u64, Arc<File>)>,
    new_names: bool,
}

/// What the writer thread is given, in order.
enum ToWriter {
    Write(Chunk),
    /// Passed on to the sync thread once every buffer before it is written.
    Sync(RefSyncJob),
}

struct State {
    current: Option<Current>,
    logs: BTreeMap<u64, LogInfo>,
    /// Logs holding records of each ledger.
    ledger_logs: HashMap<u64, BTreeSet<u64>>,
    /// Logs whose accounting changed since the last flush.
    dirty: BTreeSet<u64>,
    /// Logs without live records, reusable after the next flush.
    released: Vec<u64>,
    /// Files ready for reuse, oldest first.
    pool: Vec<PathBuf>,
    /// Their size.
    pool_bytes: u64,
    /// When logs were opened, over the last [`POOL_WINDOW`].
    opened: VecDeque<Instant>,
    next_id: u64,
    /// When logs were sealed (for those sealed since the store opened, or open then).
    sealed_at: HashMap<u64, Instant>,
    /// Logs compaction gave up on.
    uncompactable: HashSet<u64>,
    /// A log file was created or renamed since the last flush.
    new_names: bool,
    /// The next log, ready to be written.
    next: Option<(u64, Arc<File>)>,
    /// Logs written since the last flush.
    unsynced: BTreeMap<u64, Arc<File>>,
    /// Logs written since the last reference sync began ([`LedgerStorage::sync_refs`]).
    ref_unsynced: BTreeMap<u64, Arc<File>>,
    /// A log file was created or renamed since the last reference sync began.
    ref_new_names: bool,
    /// Reference syncs begun and finished: they finish in the order they began, as a later
    /// one may rely on files an earlier one took.
    ref_syncs_begun: u64,
    ref_syncs_done: u64,
    inflight: VecDeque<Inflight>,
    inflight_bytes: usize,
    /// Records appended and not yet indexed, per log: those the journal's adds store wait for
    /// their group's sync (`write_ref`, `write_unindexed`), and any index write lands only
    /// after the state lock is released. Compaction,
    /// which keeps the records the index points at, leaves such a log alone until then.
    unindexed: HashMap<u64, usize>,
    next_seq: u64,
    done_seq: u64,
    /// The writer failed; nothing more is durable.
    failed: Option<String>,
    spare: Vec<AlignedBuf>,
    tx: Option<Sender<ToWriter>>,
}

impl State {
    /// One record of each of `logs` (repeated per record) is indexed, or will never be.
    fn indexed(&mut self, logs: &[u64]) {
        for log in logs {
            if let Some(n) = self.unindexed.get_mut(log) {
                *n -= 1;
                if *n == 0 {
                    self.unindexed.remove(log);
                }
            }
        }
    }
}

struct Inner {
    dir: PathBuf,
    db: DB,
    no_wal: WriteOptions,
    state: Mutex<State>,
    /// One compaction at a time.
    compacting: Mutex<()>,
    /// Bytes per second compaction reads and writes at most (0: no limit).
    compaction_rate: u64,
    /// The store is closing: compaction stops.
    stopping: std::sync::atomic::AtomicBool,
    /// The journals' replay is flushed ([`LedgerStorage::replay_done`]): periodic compaction
    /// waits for it. Run during the replay, it took logs whose records the index did not
    /// point at yet (their adds were indexed after the last flush) for dead, compacted them
    /// away and sent them to the pool, and the replay then found acknowledged entries' logs
    /// gone.
    replayed: std::sync::atomic::AtomicBool,
    /// Tests hold it to keep the writer from writing.
    #[cfg(test)]
    gate: Mutex<()>,
    /// Tests hold it to keep the logs' fdatasyncs from starting.
    #[cfg(test)]
    sync_gate: Mutex<()>,
    /// Tests hold it to keep reads of the files from starting.
    #[cfg(test)]
    read_gate: Mutex<()>,
    /// Tests set it to fail the next fdatasync of the logs (as a write-back error would).
    #[cfg(test)]
    fail_next_sync: AtomicBool,
    /// Tests hold it to keep a sync that failed from recording its failure.
    #[cfg(test)]
    failed_sync_gate: Mutex<()>,
    /// Held through every fdatasync of the logs and the recording of its failure. The kernel
    /// reports a write-back error of a file to one fdatasync of it only: a reference sync
    /// running beside a flush's sync of the same log could succeed without the lost pages,
    /// and acknowledge them, before the flush recorded its failure.
    syncing: Mutex<()>,
    /// Signalled when the writer finishes a buffer.
    written: Condvar,
    /// One flush at a time: a flush promises that everything written before it is durable.
    flushing: Mutex<()>,
    /// Held shared by the index writes of adds (the journal's writer and syncer, which must
    /// not wait for each other, nor for the state lock while RocksDB takes a write) and
    /// exclusively by what must not interleave with them: deleting a ledger (an add indexed
    /// after it would revive the ledger) and compaction repointing entries.
    index_gate: std::sync::RwLock<()>,
    /// Record bytes compaction has read.
    compaction_read: std::sync::atomic::AtomicU64,
    /// Reads from log files to serve entries (a run of adjacent records is one).
    file_reads: std::sync::atomic::AtomicU64,
    readers: Mutex<HashMap<u64, Arc<File>>>,
    /// The same logs opened for direct reads (records of at least [`DIRECT_READ_BYTES`]).
    direct_readers: Mutex<HashMap<u64, Arc<File>>>,
    /// Off once the file system refused a direct read.
    direct_reads: AtomicBool,
    log_bytes: u64,
    pool_min: usize,
}

/// Entry-log-backed [`LedgerStorage`].
pub struct EntryLogStorage {
    inner: Arc<Inner>,
    /// Wakes the compactor when the store closes (`Inner::stopping` is the flag).
    stop: Arc<(Mutex<()>, Condvar)>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn log_name(id: u64) -> String {
    format!("{id:016x}.log")
}

/// Records at least this big are read with direct I/O (see [`Inner::read_at`]).
const DIRECT_READ_BYTES: usize = 64 << 10;

/// The most bytes of adjacent records read from a log at once (see
/// [`EntryLogStorage::get_entries`]).
const MAX_RUN_BYTES: u64 = 8 << 20;

fn pool_name(id: u64) -> String {
    format!("{id:016x}.free")
}

fn failed(e: &str) -> BookieError {
    BookieError::io("the entry store failed earlier", std::io::Error::other(e.to_owned()))
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> BookieError {
    move |e| BookieError::io(what, e)
}

impl EntryLogStorage {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, settings: &StorageSettings) -> Result<Self> {
        let logs_dir = dir.join("logs");
        std::fs::create_dir_all(&logs_dir).map_err(io_err(format!("creating {}", logs_dir.display())))?;
        let mut opts = super::rocks::base_options(settings)?;
        opts.create_missing_column_families(true);
        // Atomic flush switches every family's memtable together: the small ones get the
        // same headroom as the index.
        let mut small = Options::default();
        small.set_max_write_buffer_number(6);
        let cfs = vec![
            ColumnFamilyDescriptor::new(INDEX, super::rocks::keyed_family(settings)),
            ColumnFamilyDescriptor::new(LEDGERS, small.clone()),
            ColumnFamilyDescriptor::new(LOGS, small),
        ];
        let db = DB::open_cf_descriptors(&opts, dir.join("index.db"), cfs)?;
        let mut no_wal = WriteOptions::default();
        no_wal.disable_wal(true);
        let (tx, rx) = channel();
        let state = State {
            current: None,
            logs: BTreeMap::new(),
            ledger_logs: HashMap::new(),
            dirty: BTreeSet::new(),
            released: Vec::new(),
            pool: Vec::new(),
            pool_bytes: 0,
            opened: VecDeque::new(),
            next_id: 1,
            sealed_at: HashMap::new(),
            uncompactable: HashSet::new(),
            new_names: false,
            next: None,
            unsynced: BTreeMap::new(),
            ref_unsynced: BTreeMap::new(),
            ref_new_names: false,
            ref_syncs_begun: 0,
            ref_syncs_done: 0,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            unindexed: HashMap::new(),
            next_seq: 1,
            done_seq: 0,
            failed: None,
            spare: Vec::new(),
            tx: Some(tx),
        };
        let inner = Arc::new(Inner {
            dir: logs_dir,
            db,
            no_wal,
            state: Mutex::new(state),
            written: Condvar::new(),
            flushing: Mutex::new(()),
            index_gate: std::sync::RwLock::new(()),
            compaction_read: std::sync::atomic::AtomicU64::new(0),
            file_reads: std::sync::atomic::AtomicU64::new(0),
            compacting: Mutex::new(()),
            compaction_rate: settings.compaction_bytes_per_second,
            stopping: std::sync::atomic::AtomicBool::new(false),
            replayed: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            gate: Mutex::new(()),
            #[cfg(test)]
            sync_gate: Mutex::new(()),
            #[cfg(test)]
            read_gate: Mutex::new(()),
            #[cfg(test)]
            fail_next_sync: AtomicBool::new(false),
            #[cfg(test)]
            failed_sync_gate: Mutex::new(()),
            syncing: Mutex::new(()),
            readers: Mutex::new(HashMap::new()),
            direct_readers: Mutex::new(HashMap::new()),
            direct_reads: AtomicBool::new(true),
            log_bytes: settings.entry_log_bytes.max(CHUNK as u64),
            pool_min: settings.entry_log_pool,
        });
        inner.load()?;
        let (sync_tx, sync_rx) = channel();
        let (prep_tx, prep_rx) = channel();
        let (w, p, y) = (inner.clone(), inner.clone(), inner.clone());
        let mut threads = vec![
            crate::spawn_thread("entry-log-writer", move || w.write_chunks(rx, sync_tx, prep_tx))?,
            crate::spawn_thread("entry-log-prep", move || p.prepare_logs(prep_rx))?,
            crate::spawn_thread("entry-log-sync", move || y.sync_refs(sync_rx))?,
        ];
        let stop = Arc::new((Mutex::new(()), Condvar::new()));
        if settings.compaction_interval_ms > 0 {
            let (c, s) = (inner.clone(), stop.clone());
            let (every, threshold) =
                (Duration::from_millis(settings.compaction_interval_ms), settings.compaction_threshold);
            threads.push(crate::spawn_thread("entry-log-compactor", move || {
                c.compact_periodically(&s, every, threshold)
            })?);
        }
        Ok(EntryLogStorage { inner, stop, threads })
    }

    /// Compacts every sealed log whose live bytes are below `threshold` of its size now;
    /// returns how many were compacted.
    pub fn compact(&self, threshold: f64) -> Result<usize> {
        self.inner.compact(threshold, Duration::ZERO)
    }

    /// One entry whose record the index put at `at`. A record can move (compaction) and its
    /// old log be reused between the index lookup and the read: the read then finds another
    /// record, and the lookup is repeated.
    fn get_entry_at(&self, ledger: u64, entry: i64, mut at: Location) -> Result<Option<StoredEntry>> {
        let mut last = None;
        for attempt in 0..3 {
            if attempt > 0 {
                let Some(again) = self.inner.location(ledger, entry)? else { return Ok(None) };
                if last == Some(again) {
                    break;
                }
                at = again;
            }
            match self.inner.read_at(ledger, entry, at) {
                Err(BookieError::Corrupt { .. }) => {
                    self.inner.forget_reader(at.log);
                    last = Some(at);
                }
                Err(BookieError::Io { .. }) if !self.inner.path(at.log).exists() => last = Some(at),
                other => return other.map(Some),
            }
        }
        Err(BookieError::Corrupt { ledger, entry })
    }

    /// Logs holding records not yet indexed (compaction leaves them alone).
    #[cfg(test)]
    pub(crate) fn unindexed_logs(&self) -> usize {
        self.inner.lock().unindexed.len()
    }

    /// Log files in use, files in the pool, and live record bytes.
    pub fn stats(&self) -> (usize, usize, u64) {
        let st = self.inner.lock();
        (st.logs.len(), st.pool.len(), st.logs.values().map(LogInfo::live).sum())
    }
}

impl Drop for EntryLogStorage {
    fn drop(&mut self) {
        {
            let (lock, cv) = &*self.stop;
            let _g = lock.lock().unwrap_or_else(|e| e.into_inner());
            self.inner.stopping.store(true, Ordering::Relaxed);
            cv.notify_all();
        }
        // Closing the channel ends the writer once it has written what it was given.
        self.inner.lock().tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // A prepared log that was never written goes back to the pool.
        if let Some((id, _)) = self.inner.lock().next.take() {
            let _ = std::fs::rename(self.inner.path(id), self.inner.dir.join(pool_name(id)));
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily> {
        self.db.cf_handle(name).ok_or(BookieError::Invalid("entry store lacks a column family"))
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(log_name(id))
    }

    /// Reads the accounting, adopts what logs not sealed at the last flush hold, and fills
    /// the pool.
    fn load(&self) -> Result<()> {
        let mut logs = BTreeMap::new();
        let mut it = self.db.raw_iterator_cf(self.cf(LOGS)?);
        it.seek_to_first();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let id = <[u8; 8]>::try_from(k).map(u64::from_be_bytes).ok();
            match (id, LogInfo::decode(v)) {
                (Some(id), Some(info)) => {
                    logs.insert(id, info);
                }
                _ => return Err(BookieError::Invalid("unreadable entry log accounting")),
            }
            it.next();
        }
        it.status()?;
        let mut files = BTreeSet::new();
        let mut pool = Vec::new();
        let mut pool_bytes = 0;
        let mut max_id = 0;
        for e in std::fs::read_dir(&self.dir).map_err(io_err(format!("listing {}", self.dir.display())))? {
            let e = e.map_err(io_err(format!("listing {}", self.dir.display())))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((stem, ext)) = name.split_once('.') else { continue };
            let Ok(id) = u64::from_str_radix(stem, 16) else { continue };
            if !matches!(ext, "log" | "free") {
                continue;
            }
            max_id = max_id.max(id);
            match ext {
                "log" => {
                    files.insert(id);
                }
                "free" => {
                    pool_bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
                    pool.push(e.path());
                }
                _ => {}
            }
        }
        let mut dirty = BTreeSet::new();
        for id in logs.keys().copied().collect::<Vec<_>>() {
            if !files.contains(&id) {
                if logs.get(&id).is_some_and(|i| !i.ledgers.is_empty()) {
                    return Err(BookieError::io(
                        format!("entry log {} holds live entries but is missing", self.path(id).display()),
                        std::io::Error::from(std::io::ErrorKind::NotFound),
                    ));
                }
                logs.remove(&id);
                dirty.insert(id);
            }
        }
        for &id in &files {
            let info = logs.entry(id).or_default();
            if info.sealed {
                continue;
            }
            let from = info.end;
            let adopted = self.adopt(id, info)?;
            info.sealed = true;
            dirty.insert(id);
            if adopted > 0 {
                tracing::info!(log = id, from, records = adopted, "entry log tail adopted");
            }
        }
        let mut st = self.lock();
        st.next_id = max_id.max(logs.keys().next_back().copied().unwrap_or(0)) + 1;
        for (id, info) in &logs {
            for l in info.ledgers.keys() {
                st.ledger_logs.entry(*l).or_default().insert(*id);
            }
        }
        st.released = logs.iter().filter(|(_, i)| i.ledgers.is_empty()).map(|(id, _)| *id).collect();
        for id in st.released.clone() {
            logs.remove(&id);
            dirty.insert(id);
        }
        let now = Instant::now();
        st.sealed_at = logs.keys().map(|id| (*id, now)).collect();
        st.logs = logs;
        st.dirty = dirty;
        pool.sort();
        st.pool = pool;
        st.pool_bytes = pool_bytes;
        Ok(())
    }

    /// Accounts to `info` the records from its end on that the index points to (written
    /// after the last flush); returns how many.
    fn adopt(&self, id: u64, info: &mut LogInfo) -> Result<usize> {
        let path = self.path(id);
        let file = File::open(&path).map_err(io_err(format!("opening {}", path.display())))?;
        let len = file.metadata().map_err(io_err(format!("reading {}", path.display())))?.len();
        let mut scan = Scanner::new(file, info.end, len).map_err(io_err(format!("reading {}", path.display())))?;
        let index = self.cf(INDEX)?;
        let mut n = 0;
        while let Some((at, h)) = scan.next(None).map_err(io_err(format!("reading {}", path.display())))? {
            let here = Location { log: id, offset: at, len: h.record_len() as u32 };
            let pointed = self.db.get_pinned_cf(index, entry_key(h.ledger, h.entry))?;
            if pointed.as_deref().and_then(Location::decode) == Some(here) {
                *info.ledgers.entry(h.ledger).or_default() += h.record_len();
                info.end = info.end.max(at + h.record_len());
                n += 1;
            }
        }
        Ok(n)
    }

    /// The writer thread: writes buffers in order, then makes them unreadable from memory.
    fn write_chunks(&self, rx: Receiver<ToWriter>, syncs: Sender<RefSyncJob>, prepares: Sender<()>) {
        let mut held = None;
        loop {
            let first = match held.take().map_or_else(|| rx.recv().ok(), Some) {
                None => break,
                Some(ToWriter::Write(c)) => c,
                Some(ToWriter::Sync(job)) => {
                    if let Err(std::sync::mpsc::SendError(job)) = syncs.send(job) {
                        // The sync thread is gone (it ends only after this one, so it
                        // panicked): nothing can be made durable any more.
                        let mut st = self.lock();
                        st.failed.get_or_insert_with(|| "the entry log sync thread stopped".into());
                        st.ref_syncs_done = job.turn;
                        drop(st);
                        self.written.notify_all();
                    }
                    continue;
                }
            };
            // Buffers queued behind it that continue it in the same log go in the same write:
            // larger direct writes keep more of the disk busy. A buffer ends with the start of
            // the next one's first block (see `send`), which the next one holds complete.
            let mut run = vec![first];
            let mut bytes = run[0].buf.written_blocks().len();
            while bytes < MAX_WRITE {
                match rx.try_recv() {
                    Ok(ToWriter::Write(c)) => {
                        let last = &run[run.len() - 1];
                        if Arc::ptr_eq(&c.file, &last.file)
                            && c.offset == last.offset + record::round_down(last.buf.len() as u64)
                        {
                            bytes += c.buf.written_blocks().len();
                            run.push(c);
                        } else {
                            held = Some(ToWriter::Write(c));
                            break;
                        }
                    }
                    Ok(sync) => {
                        held = Some(sync);
                        break;
                    }
                    Err(_) => break,
                }
            }
            #[cfg(test)]
            drop(self.gate.lock());
            let res = if run.len() == 1 && run[0].filled {
                // Full, and nothing queued behind it: in pieces (see `LONE_PIECE`).
                let c = &run[0];
                c.buf
                    .written_blocks()
                    .chunks(LONE_PIECE)
                    .enumerate()
                    .try_for_each(|(i, piece)| c.file.write_all_at(piece, c.offset + (i * LONE_PIECE) as u64))
            } else {
                let n = run.len();
                let mut slices: Vec<std::io::IoSlice<'_>> = run
                    .iter()
                    .enumerate()
                    .map(|(i, c)| match i + 1 < n {
                        true => &c.buf.data()[..record::round_down(c.buf.len() as u64) as usize],
                        false => c.buf.written_blocks(),
                    })
                    .filter(|b| !b.is_empty())
                    .map(std::io::IoSlice::new)
                    .collect();
                crate::journal::segment::pwritev_all(&run[0].file, &mut slices, run[0].offset)
            };
            let last_seq = run[run.len() - 1].seq;
            let mut st = self.lock();
            if let Err(e) = res {
                tracing::error!(error = %e, "writing an entry log failed");
                st.failed.get_or_insert_with(|| e.to_string());
            }
            while st.inflight.front().is_some_and(|f| f.seq <= last_seq) {
                if let Some(f) = st.inflight.pop_front() {
                    st.inflight_bytes -= f.buf.capacity();
                    drop(f);
                }
            }
            st.done_seq = last_seq;
            if st.inflight.is_empty() && st.current.as_ref().is_some_and(|c| c.unsent_refs) {
                // References stored while this write ran go out now, not at their sync.
                if let Err(e) = self.send(&mut st, 0, false) {
                    st.failed.get_or_insert_with(|| e.to_string());
                }
            }
            for c in run {
                if let Ok(b) = Arc::try_unwrap(c.buf) {
                    if b.capacity() == CHUNK && st.spare.len() < 4 {
                        st.spare.push(b);
                    }
                }
            }
            let prepare = st.next.is_none();
            drop(st);
            self.written.notify_all();
            if prepare {
                // The prepare thread ends only after this one (it holds the receiver).
                let _ = prepares.send(());
            }
        }
    }

    /// The prepare thread: readies the next log whenever the writer asks.
    fn prepare_logs(&self, rx: Receiver<()>) {
        for () in rx {
            self.prepare_next();
        }
    }

    /// Makes the next log's file ready (a pooled one when there is one) and its name durable,
    /// so that starting a log costs the appending thread no file system call and no sync has
    /// to fsync the directory for it. Runs on the prepare thread, off the path of writes and
    /// of the syncs acknowledgements wait for.
    fn prepare_next(&self) {
        let (id, free) = {
            let mut st = self.lock();
            if st.next.is_some() || st.tx.is_none() || st.failed.is_some() {
                return;
            }
            let id = st.next_id;
            st.next_id += 1;
            (id, st.pool.pop())
        };
        match self.create_log(id, free.as_deref()) {
            Ok((file, reused)) => {
                let named = crate::journal::segment::sync_dir(&self.dir);
                if let Err(e) = &named {
                    tracing::warn!(error = %e, "syncing the entry log directory failed; the next sync retries");
                }
                let mut st = self.lock();
                st.pool_bytes = st.pool_bytes.saturating_sub(reused);
                if named.is_err() {
                    st.new_names = true;
                    st.ref_new_names = true;
                }
                st.next = Some((id, Arc::new(file)));
            }
            Err(e) => {
                tracing::warn!(error = %e, "preparing the next entry log failed");
                if let Some(f) = free.filter(|f| f.exists()) {
                    self.lock().pool.push(f);
                }
            }
        }
    }

    /// Opens log `id` for direct writes: the pooled file `free` renamed, or a new file.
    /// Returns the file and the size it brought from the pool.
    fn create_log(&self, id: u64, free: Option<&Path>) -> Result<(File, u64)> {
        let path = self.path(id);
        let mut reused = 0;
        if let Some(free) = free {
            std::fs::rename(free, &path).map_err(io_err(format!("reusing {}", free.display())))?;
            reused = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        }
        let opened = OpenOptions::new()
            .create(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(&path);
        match opened {
            Ok(file) => {
                if free.is_none() {
                    // A new file gets its blocks now, off the appending path, rather than one
                    // allocation per write (file systems without fallocate extend it as it
                    // is written).
                    if let Err(e) = rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, self.log_bytes)
                    {
                        tracing::debug!(error = %e, "preallocating an entry log");
                    }
                }
                Ok((file, reused))
            }
            Err(e) => {
                // Back to the pool under its old name, so the pool's count stays right.
                if let Some(free) = free {
                    let _ = std::fs::rename(&path, free);
                }
                Err(BookieError::io(format!("opening {}", path.display()), e))
            }
        }
    }

    /// Starts a new log: the prepared one, or (none ready) one made here.
    fn open_log(&self, st: &mut State) -> Result<()> {
        let (id, file) = match st.next.take() {
            Some(next) => next,
            None => {
                let id = st.next_id;
                st.next_id += 1;
                let free = st.pool.pop();
                match self.create_log(id, free.as_deref()) {
                    Ok((file, reused)) => {
                        st.pool_bytes = st.pool_bytes.saturating_sub(reused);
                        st.new_names = true;
                        st.ref_new_names = true;
                        (id, Arc::new(file))
                    }
                    Err(e) => {
                        if let Some(f) = free.filter(|f| f.exists()) {
                            st.pool.push(f);
                        }
                        return Err(e);
                    }
                }
            }
        };
        st.opened.push_back(Instant::now());
        let mut buf = st.spare.pop().unwrap_or_else(|| AlignedBuf::new(CHUNK));
        buf.clear();
        st.unsynced.insert(id, file.clone());
        st.ref_unsynced.insert(id, file.clone());
        st.logs.insert(id, LogInfo::default());
        st.dirty.insert(id);
        st.current = Some(Current { id, file, base: 0, buf, unsent: false, unsent_refs: false });
        Ok(())
    }

    /// Hands the current buffer to the writer and starts a new one holding the partly
    /// written last block (the next records continue it).
    fn send(&self, st: &mut State, need: usize, filled: bool) -> Result<()> {
        let Some(cur) = st.current.as_mut() else { return Ok(()) };
        if cur.buf.len() == 0 {
            // Nothing to write: only a larger buffer is needed.
            if cur.buf.room() < need {
                cur.buf = AlignedBuf::new(need + ALIGN_SLACK);
            }
            return Ok(());
        }
        let keep_from = record::round_down(cur.buf.len() as u64) as usize;
        let cap = if need + (cur.buf.len() - keep_from) > CHUNK { need + ALIGN_SLACK } else { CHUNK };
        let mut next = match st.spare.pop() {
            Some(b) if cap == CHUNK => b,
            _ => AlignedBuf::new(cap),
        };
        next.clear();
        let mut old = std::mem::replace(&mut cur.buf, next);
        old.zero_pad();
        cur.buf.extend(&old.data()[keep_from..]);
        let (seq, offset, file, log) = (st.next_seq, cur.base, cur.file.clone(), cur.id);
        cur.base += keep_from as u64;
        cur.unsent = false;
        cur.unsent_refs = false;
        st.next_seq += 1;
        st.inflight_bytes += old.capacity();
        let buf = Arc::new(old);
        st.inflight.push_back(Inflight { seq, log, offset, buf: buf.clone() });
        let chunk = ToWriter::Write(Chunk { seq, file, offset, buf, filled });
        if st.tx.as_ref().is_some_and(|tx| tx.send(chunk).is_ok()) {
            return Ok(());
        }
        // The buffer will never be written: a flush or sync waiting for it must not wait
        // forever, and nothing stored after it may be called durable.
        let why = "the entry log writer stopped";
        st.failed.get_or_insert_with(|| why.to_string());
        self.written.notify_all();
        Err(BookieError::Invalid(why))
    }

    /// Seals the current log.
    fn seal(&self, st: &mut State) -> Result<()> {
        if st.current.as_ref().is_some_and(|c| c.unsent) {
            self.send(st, 0, false)?;
        }
        if let Some(cur) = st.current.take() {
            st.sealed_at.insert(cur.id, Instant::now());
            let empty = match st.logs.get_mut(&cur.id) {
                Some(info) => {
                    info.sealed = true;
                    info.ledgers.is_empty()
                }
                None => false,
            };
            st.dirty.insert(cur.id);
            if empty {
                st.logs.remove(&cur.id);
                st.released.push(cur.id);
            }
            if cur.buf.capacity() == CHUNK {
                st.spare.push(cur.buf);
            }
        }
        Ok(())
    }

    /// Appends one record to the current log.
    fn append(&self, st: &mut State, ledger: u64, entry: i64, checksum: u32, payload: &[u8]) -> Result<Location> {
        let len = HEADER + payload.len();
        if st.current.as_ref().is_some_and(|c| c.end() > 0 && c.end() + len as u64 > self.log_bytes) {
            self.seal(st)?;
        }
        if st.current.is_none() {
            self.open_log(st)?;
        }
        if st.current.as_ref().is_some_and(|c| c.buf.room() < len) {
            self.send(st, len, true)?;
        }
        let Some(cur) = st.current.as_mut() else { return Err(BookieError::Invalid("no current entry log")) };
        let at = Location { log: cur.id, offset: cur.end(), len: len as u32 };
        record::encode(&mut cur.buf, ledger, entry, checksum, payload);
        cur.unsent = true;
        let full = cur.buf.len() >= CHUNK;
        let end = cur.end();
        if let Some(info) = st.logs.get_mut(&at.log) {
            info.end = end;
            *info.ledgers.entry(ledger).or_default() += len as u64;
        }
        st.ledger_logs.entry(ledger).or_default().insert(at.log);
        st.dirty.insert(at.log);
        if full {
            self.send(st, 0, true)?;
        }
        Ok(at)
    }

    /// Waits while too many buffers wait for the writer.
    fn throttle<'a>(&self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        while st.inflight_bytes > MAX_INFLIGHT && st.failed.is_none() && st.tx.is_some() {
            st = self.written.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st
    }

    /// A record still in memory (current buffer or one waiting for the writer).
    fn buffered(st: &State, at: Location) -> Option<Vec<u8>> {
        Self::in_memory(st, at).map(<[u8]>::to_vec)
    }

    fn in_memory(st: &State, at: Location) -> Option<&[u8]> {
        let (off, len) = (at.offset, u64::from(at.len));
        if let Some(cur) = st.current.as_ref().filter(|c| c.id == at.log && off >= c.base) {
            let s = usize::try_from(off - cur.base).ok()?;
            return cur.buf.data().get(s..s + at.len as usize);
        }
        for f in st.inflight.iter().rev().filter(|f| f.log == at.log && f.offset <= off) {
            let b = &f.buf;
            if off + len <= f.offset + b.len() as u64 {
                let s = usize::try_from(off - f.offset).ok()?;
                return b.data().get(s..s + at.len as usize);
            }
        }
        None
    }

    fn reader(&self, log: u64) -> std::io::Result<Arc<File>> {
        self.open_cached(&self.readers, log, OpenOptions::new().read(true))
    }

    fn direct_reader(&self, log: u64) -> std::io::Result<Arc<File>> {
        let direct = rustix::fs::OFlags::DIRECT.bits() as i32;
        self.open_cached(&self.direct_readers, log, OpenOptions::new().read(true).custom_flags(direct))
    }

    /// Log `log` from `handles`, opened with `options` when it is not there (the map is
    /// emptied when it holds [`MAX_READERS`] files).
    fn open_cached(
        &self,
        handles: &Mutex<HashMap<u64, Arc<File>>>,
        log: u64,
        options: &OpenOptions,
    ) -> std::io::Result<Arc<File>> {
        let mut r = handles.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = r.get(&log) {
            return Ok(f.clone());
        }
        if r.len() >= MAX_READERS {
            r.clear();
        }
        let f = Arc::new(options.open(self.path(log))?);
        r.insert(log, f.clone());
        Ok(f)
    }

    fn forget_reader(&self, log: u64) {
        self.readers.lock().unwrap_or_else(|e| e.into_inner()).remove(&log);
        self.direct_readers.lock().unwrap_or_else(|e| e.into_inner()).remove(&log);
    }

    /// Reads a record from its log file. Records of at least [`DIRECT_READ_BYTES`] are read
    /// with direct I/O: from the disk straight into the buffer that is handed on, with no
    /// page-cache copy in between. Logs are written with direct I/O too, so a catch-up read
    /// finds nothing cached; through the page cache, copying freshly read pages out took
    /// about half of a standalone's CPU while a consumer caught up (see docs/benchmarks.md).
    fn read_file(&self, at: Location) -> std::io::Result<bytes::Bytes> {
        #[cfg(test)]
        drop(self.read_gate.lock());
        self.file_reads.fetch_add(1, Ordering::Relaxed);
        if at.len as usize >= DIRECT_READ_BYTES && self.direct_reads.load(Ordering::Relaxed) {
            match self.read_direct(at) {
                Ok(r) => return Ok(r),
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    tracing::warn!(error = %e, dir = %self.dir.display(), "no direct reads of entry logs here; reading through the page cache");
                    self.direct_reads.store(false, Ordering::Relaxed);
                }
                // A log that ends short of the aligned span around a record: read it as it is.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
                Err(e) => return Err(e),
            }
        }
        let mut r = vec![0u8; at.len as usize];
        self.reader(at.log)?.read_exact_at(&mut r, at.offset)?;
        Ok(r.into())
    }

    /// Reads the aligned span around a record with direct I/O; returns the record's bytes
    /// (a slice of the buffer read into).
    fn read_direct(&self, at: Location) -> std::io::Result<bytes::Bytes> {
        let start = record::round_down(at.offset);
        let skip = (at.offset - start) as usize;
        let len = record::round_up(skip + at.len as usize);
        let mut raw = vec![0u8; len + record::ALIGN];
        let base = raw.as_ptr().align_offset(record::ALIGN);
        let span = raw.get_mut(base..base + len).ok_or_else(|| std::io::Error::other("unaligned buffer"))?;
        self.direct_reader(at.log)?.read_exact_at(span, start)?;
        Ok(bytes::Bytes::from(raw).slice(base + skip..base + skip + at.len as usize))
    }

    fn location(&self, ledger: u64, entry: i64) -> Result<Option<Location>> {
        match self.db.get_pinned_cf(self.cf(INDEX)?, entry_key(ledger, entry))? {
            None => Ok(None),
            Some(v) => Location::decode(&v).map(Some).ok_or(BookieError::Corrupt { ledger, entry }),
        }
    }

    /// Adjacent records (`runs[i]` ends where `runs[i + 1]` begins, in one log) read from
    /// their file at once: those already written there (records are written in order, so
    /// once one is, every one before it is), when at least two are. An entry left `None` (not
    /// written yet, not read, or not decoding as the entry asked) is for the caller to read
    /// alone, with the retries and errors of a single read.
    fn read_run(&self, ledger: u64, entries: &[i64], runs: &[Location]) -> Vec<Option<StoredEntry>> {
        let mut out: Vec<Option<StoredEntry>> = runs.iter().map(|_| None).collect();
        if runs.len() < 2 {
            // Nothing to read at once: spare the state lock (runs of one are the rule where
            // ledgers' records interleave).
            return out;
        }
        let on_disk = {
            let st = self.lock();
            runs.partition_point(|at| Self::in_memory(&st, *at).is_none())
        };
        if on_disk < 2 {
            return out;
        }
        let (first, last) = (runs[0], runs[on_disk - 1]);
        let span = last.offset + u64::from(last.len) - first.offset;
        let Ok(len) = u32::try_from(span) else { return out };
        let Ok(bytes) = self.read_file(Location { log: first.log, offset: first.offset, len }) else { return out };
        for ((slot, &entry), at) in out.iter_mut().zip(entries).zip(&runs[..on_disk]) {
            let Ok(from) = usize::try_from(at.offset - first.offset) else { continue };
            *slot = record::decode(bytes.slice(from..from + at.len as usize), ledger, entry).ok();
        }
        out
    }

    fn read_at(&self, ledger: u64, entry: i64, at: Location) -> Result<StoredEntry> {
        // Its own statement: the state lock is not held while the file is read.
        let buffered = Self::buffered(&self.lock(), at);
        let rec: bytes::Bytes = match buffered {
            Some(r) => r.into(),
            None => match self.read_file(at) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(BookieError::Corrupt { ledger, entry })
                }
                Err(e) => return Err(BookieError::io(format!("reading entry log {}", log_name(at.log)), e)),
            },
        };
        record::decode(rec, ledger, entry)
    }

    /// What a sync covers, decided under the lock: hands the partly filled buffer to the
    /// writer and takes the logs written since the last sync of this kind (`written` picks
    /// the flushes' or the reference syncs' set); the current log stays in the set, as later
    /// appends go on into it.
    fn cut(
        &self,
        st: &mut State,
        written: impl Fn(&mut State) -> &mut BTreeMap<u64, Arc<File>>,
    ) -> Result<Vec<(u64, Arc<File>)>> {
        if let Some(e) = &st.failed {
            return Err(failed(e));
        }
        if st.current.as_ref().is_some_and(|c| c.unsent) {
            self.send(st, 0, false)?;
        }
        let files = std::mem::take(written(st)).into_iter().collect();
        if let Some((id, f)) = st.current.as_ref().map(|c| (c.id, c.file.clone())) {
            written(st).insert(id, f);
        }
        Ok(files)
    }

    /// Starts a reference sync: hands the current buffer to the writer and takes the logs
    /// written since the last one began.
    fn begin_ref_sync(self: &Arc<Self>) -> Result<super::RefSync> {
        let mut st = self.lock();
        let files = self.cut(&mut st, |st| &mut st.ref_unsynced)?;
        let new_names = std::mem::take(&mut st.ref_new_names);
        st.ref_syncs_begun += 1;
        let turn = st.ref_syncs_begun;
        let tx = st.tx.as_ref().ok_or(BookieError::Invalid("the entry store is closed"))?;
        tx.send(ToWriter::Sync(RefSyncJob { turn, files, new_names }))
            .map_err(|_| BookieError::Invalid("the entry log writer stopped"))?;
        drop(st);
        let inner = self.clone();
        Ok(Box::new(move || inner.finish_ref_sync(turn)))
    }

    /// Waits for reference sync `turn` (and so every earlier one) to be done.
    fn finish_ref_sync(&self, turn: u64) -> Result<()> {
        let mut st = self.lock();
        while st.ref_syncs_done < turn && st.failed.is_none() {
            st = self.written.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        match &st.failed {
            Some(e) => Err(failed(e)),
            None => Ok(()),
        }
    }

    /// The sync thread: fdatasyncs the logs of each reference sync once the writer has written
    /// every buffer before it (and the directory, when a log was created or renamed). It runs
    /// beside the writer, which goes on writing, and the journal's fdatasync.
    fn sync_refs(&self, rx: Receiver<RefSyncJob>) {
        for job in rx {
            // The state lock is not held through the fdatasync (it would hold up every add
            // storing a payload, and the writer, for as long). A failure (this sync's or an
            // earlier one's) is recorded in the state by `sync_logs`.
            let _ = self.sync_logs(&job.files, job.new_names);
            let mut st = self.lock();
            st.ref_syncs_done = job.turn;
            drop(st);
            self.written.notify_all();
        }
    }

    /// Appends `entries` to the current log and writes `states`, in one RocksDB write that
    /// also indexes the entries when `index` is set; returns where the entries went. Unindexed,
    /// their logs stay uncompactable until [`LedgerStorage::index_refs`] or
    /// [`LedgerStorage::forget_refs`] passes them (or this fails).
    fn store(&self, entries: &[EntryWrite], states: &[(u64, LedgerMeta)], index: bool) -> Result<Vec<Location>> {
        let (icf, lcf) = (self.cf(INDEX)?, self.cf(LEDGERS)?);
        let keys = if index { entries.len() } else { 0 };
        let mut batch = WriteBatch::with_capacity_bytes(keys * 48 + states.len() * 64 + 64);
        // Under the gate, so a ledger deleted meanwhile is not revived.
        let gate = self.index_gate.read().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock();
        if let Some(e) = &st.failed {
            return Err(failed(e));
        }
        let mut placed = Vec::with_capacity(entries.len());
        let appended = entries.iter().try_for_each(|e| {
            let at = self.append(&mut st, e.ledger, e.entry, e.checksum, &e.payload)?;
            if index {
                batch.put_cf(icf, entry_key(e.ledger, e.entry), at.encode());
            }
            *st.unindexed.entry(at.log).or_default() += 1;
            placed.push(at);
            Ok::<(), BookieError>(())
        });
        for (l, m) in states {
            batch.put_cf(lcf, l.to_be_bytes(), m.encode());
        }
        drop(st);
        let written = appended.and_then(|()| match batch.is_empty() {
            true => Ok(()),
            false => Ok(self.db.write_opt(batch, &self.no_wal)?),
        });
        drop(gate);
        let mut st = self.lock();
        if index || written.is_err() {
            // Indexed now, or never will be.
            let logs: Vec<u64> = placed.iter().map(|at| at.log).collect();
            st.indexed(&logs);
        }
        drop(self.throttle(st));
        written.map(|()| placed)
    }

    /// See [`LedgerStorage::adopt_ref`].
    fn adopt_ref(&self, ledger: u64, entry: i64, checksum: u32, at: Location) -> Result<bool> {
        // RocksDB may have written the index out before a crash that lost the record it points
        // at (an add never acknowledged): such a pointer goes, so that the entry reads as
        // absent rather than corrupt.
        let dangling = match self.location(ledger, entry)? {
            None => false,
            Some(existing) => match self.read_present(ledger, entry, existing)? {
                Some(_) => return Ok(true),
                None => true,
            },
        };
        if !self.ref_holds(ledger, entry, checksum, at)? {
            if dangling {
                self.db.delete_cf_opt(self.cf(INDEX)?, entry_key(ledger, entry), &self.no_wal)?;
            }
            return Ok(false);
        }
        let mut st = self.lock();
        if let Some(i) = st.released.iter().position(|id| *id == at.log) {
            st.released.remove(i);
            st.logs.insert(at.log, LogInfo { sealed: true, ..Default::default() });
            st.sealed_at.insert(at.log, Instant::now());
        }
        let Some(info) = st.logs.get_mut(&at.log) else { return Ok(false) };
        info.end = info.end.max(at.offset + u64::from(at.len));
        *info.ledgers.entry(ledger).or_default() += u64::from(at.len);
        st.ledger_logs.entry(ledger).or_default().insert(at.log);
        st.dirty.insert(at.log);
        self.db.put_cf_opt(self.cf(INDEX)?, entry_key(ledger, entry), at.encode(), &self.no_wal)?;
        Ok(true)
    }

    /// Whether the log a journal reference names is one this store holds and the record at
    /// the reference is the entry's, with the checksum the journal recorded.
    fn ref_holds(&self, ledger: u64, entry: i64, checksum: u32, at: Location) -> Result<bool> {
        {
            // A log without live records at start-up is released, but stays in place until the
            // flush that ends the replay.
            let st = self.lock();
            if !st.logs.contains_key(&at.log) && !st.released.contains(&at.log) {
                return Ok(false);
            }
        }
        Ok(self.read_present(ledger, entry, at)?.is_some_and(|e| e.checksum == checksum))
    }

    /// [`Self::read_at`], with a record that is not the entry's or a log file that is gone
    /// read as absent.
    fn read_present(&self, ledger: u64, entry: i64, at: Location) -> Result<Option<StoredEntry>> {
        match self.read_at(ledger, entry, at) {
            Ok(e) => Ok(Some(e)),
            Err(BookieError::Corrupt { .. }) => Ok(None),
            Err(BookieError::Io { .. }) if !self.path(at.log).exists() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// fdatasyncs `files`, then the directory when a log was created or renamed since the last
    /// sync of this kind: a reused file's new name must be durable before anything depends on
    /// it, and the fdatasync of an overwrite does not commit a rename.
    fn sync_logs(&self, files: &[(u64, Arc<File>)], new_names: bool) -> Result<()> {
        #[cfg(test)]
        drop(self.sync_gate.lock());
        let _one = self.syncing.lock().unwrap_or_else(|e| e.into_inner());
        // A failure recorded before this sync (by another one, which may have taken the
        // file's error) stands whatever this one says.
        if let Some(e) = &self.lock().failed {
            return Err(failed(e));
        }
        let synced = (|| -> Result<()> {
            #[cfg(test)]
            if self.fail_next_sync.swap(false, Ordering::SeqCst) {
                drop(self.failed_sync_gate.lock());
                return Err(BookieError::io("syncing entry logs", std::io::Error::other("injected fdatasync failure")));
            }
            for (id, f) in files {
                rustix::fs::fdatasync(&**f)
                    .map_err(|e| BookieError::io(format!("syncing entry log {}", log_name(*id)), e.into()))?;
            }
            if new_names {
                crate::journal::segment::sync_dir(&self.dir)?;
            }
            Ok(())
        })();
        if let Err(e) = &synced {
            // Before the next sync may start: nothing written before may be called durable.
            let mut st = self.lock();
            if st.failed.is_none() {
                tracing::error!(error = %e, "syncing entry logs failed; the entry store accepts no more writes");
                st.failed = Some(e.to_string());
            }
        }
        synced
    }

    /// Writes out every buffer, fdatasyncs the logs written, then records the accounting and
    /// flushes RocksDB; logs released before it go to the pool.
    fn flush(&self) -> Result<()> {
        let _one = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        // Everything this flush covers is decided in one critical section: appends go on while
        // it waits, and a log they fill and seal meanwhile belongs to the next flush.
        let (target, files, released, batch, new_names) = {
            let mut st = self.lock();
            let files = self.cut(&mut st, |st| &mut st.unsynced)?;
            let target = st.next_seq - 1;
            let released = std::mem::take(&mut st.released);
            let lcf = self.cf(LOGS)?;
            let mut batch = WriteBatch::default();
            for id in std::mem::take(&mut st.dirty) {
                match st.logs.get(&id) {
                    Some(info) => batch.put_cf(lcf, id.to_be_bytes(), info.encode()),
                    None => batch.delete_cf(lcf, id.to_be_bytes()),
                }
            }
            (target, files, released, batch, std::mem::take(&mut st.new_names))
        };
        let done = (|| -> Result<()> {
            let mut st = self.lock();
            while st.done_seq < target && st.failed.is_none() {
                st = self.written.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if let Some(e) = &st.failed {
                return Err(failed(e));
            }
            drop(st);
            // Records its failure itself, before a reference sync can follow it.
            self.sync_logs(&files, new_names)?;
            // A reference sync of the same logs may have failed just before.
            if let Some(e) = &self.lock().failed {
                return Err(failed(e));
            }
            self.db.write_opt(batch, &self.no_wal)?;
            let mut fo = FlushOptions::default();
            fo.set_wait(true);
            self.db.flush_cfs_opt(&[self.cf(INDEX)?, self.cf(LEDGERS)?, self.cf(LOGS)?], &fo)?;
            Ok(())
        })();
        if let Err(e) = &done {
            // What this flush took (logs to sync, accounting, released logs) is gone, and after a
            // failed fdatasync a retry would not say whether the data reached the disk: no later
            // flush may claim durability. Restarting replays the journal from the last
            // checkpoint.
            tracing::error!(error = %e, "flushing the entry store failed; it accepts no more writes");
            self.lock().failed.get_or_insert_with(|| e.to_string());
            return done;
        }
        self.recycle(released);
        Ok(())
    }

    /// Moves released logs into the pool, then trims the pool to what the last
    /// [`POOL_WINDOW`] needed (at least `entry_log_pool` files), a few files per call: giving
    /// space back to the file system costs the journal latency, so a bookie deleting about as
    /// much as it writes reuses files instead.
    fn recycle(&self, released: Vec<u64>) {
        for id in released {
            self.forget_reader(id);
            let (path, to) = (self.path(id), self.dir.join(pool_name(id)));
            if let Err(e) = std::fs::rename(&path, &to) {
                tracing::warn!(error = %e, file = %path.display(), "pooling an entry log failed; retrying later");
                self.lock().released.push(id);
                continue;
            }
            // A read may have opened it again meanwhile.
            self.forget_reader(id);
            let size = std::fs::metadata(&to).map(|m| m.len()).unwrap_or(0);
            let mut st = self.lock();
            st.pool.push(to);
            st.pool_bytes += size;
        }
        let excess: Vec<PathBuf> = {
            let mut st = self.lock();
            let now = Instant::now();
            while st.opened.front().is_some_and(|t| now.duration_since(*t) > POOL_WINDOW) {
                st.opened.pop_front();
            }
            let keep = self.pool_min.max(st.opened.len());
            let n = st.pool.len().saturating_sub(keep).min(TRIM_PER_FLUSH);
            // The oldest pooled files go first.
            st.pool.drain(..n).collect()
        };
        for path in excess {
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    let mut st = self.lock();
                    st.pool_bytes = st.pool_bytes.saturating_sub(size);
                    tracing::debug!(file = %path.display(), "entry log pool trimmed");
                }
                Err(e) => {
                    tracing::warn!(error = %e, file = %path.display(), "trimming the entry log pool failed");
                    self.lock().pool.push(path);
                }
            }
        }
    }

    fn compact_periodically(&self, stop: &(Mutex<()>, Condvar), every: Duration, threshold: f64) {
        let (lock, cv) = stop;
        let stopping = || self.stopping.load(Ordering::Relaxed);
        loop {
            {
                let g = lock.lock().unwrap_or_else(|e| e.into_inner());
                drop(cv.wait_timeout_while(g, every, |_| !stopping()).unwrap_or_else(|e| e.into_inner()));
                if stopping() {
                    return;
                }
            }
            if !self.replayed.load(std::sync::atomic::Ordering::Acquire) {
                continue;
            }
            // A log sealed less than an interval ago may soon be empty anyway (the ledgers of a
            // topic whose consumers keep up are deleted a few seconds after they close).
            match self.compact(threshold, every) {
                Ok(0) => {}
                Ok(n) => tracing::info!(logs = n, "compacted entry logs"),
                Err(e) => tracing::warn!(error = %e, "entry log compaction failed"),
            }
        }
    }

    fn compact(&self, threshold: f64, min_age: Duration) -> Result<usize> {
        let _one = self.compacting.lock().unwrap_or_else(|e| e.into_inner());
        let candidates: Vec<u64> = {
            let st = self.lock();
            st.logs
                .iter()
                .filter(|(id, i)| {
                    i.sealed
                        && i.end > 0
                        && (i.live() as f64) < threshold * i.end as f64
                        && !st.uncompactable.contains(id)
                        && st.sealed_at.get(id).is_none_or(|t| t.elapsed() >= min_age)
                        && !st.inflight.iter().any(|f| f.log == **id)
                        && !st.unindexed.contains_key(id)
                })
                .map(|(id, _)| *id)
                .collect()
        };
        let mut n = 0;
        for id in candidates {
            if self.compact_log(id)? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Copies a log's live records to the current log, points the index at the copies once
    /// they are durable, and releases the log. A log whose records cannot all be read is left
    /// alone (and not tried again until the bookie restarts).
    fn compact_log(&self, id: u64) -> Result<bool> {
        let (live, end): (HashSet<u64>, u64) = match self.lock().logs.get(&id) {
            Some(i) if i.sealed => (i.ledgers.keys().copied().collect(), i.end),
            _ => return Ok(false),
        };
        let path = self.path(id);
        let ctx = || format!("compacting {}", path.display());
        let give_up = |why: &str| {
            tracing::warn!(log = id, why, "entry log not compacted");
            self.lock().uncompactable.insert(id);
            Ok(false)
        };
        // First the records the index points at, found through the index of each ledger the
        // log holds records of, before anything is copied: only live records are read, not
        // the whole log (compaction takes logs that are mostly dead).
        let index = self.cf(INDEX)?;
        let mut records: Vec<(u64, i64, Location)> = Vec::new();
        let mut seen = 0u64;
        for &ledger in &live {
            let mut it = self.db.raw_iterator_cf(index);
            it.seek(entry_key(ledger, 0));
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                if seen.is_multiple_of(65_536) && self.stopping.load(Ordering::Relaxed) {
                    return Ok(false);
                }
                seen += 1;
                match super::parse_entry_key(k) {
                    Some((l, e)) if l == ledger => {
                        if let Some(at) = Location::decode(v).filter(|at| at.log == id) {
                            if at.offset + u64::from(at.len) > end {
                                return give_up("the index points past its recorded end");
                            }
                            records.push((l, e, at));
                        }
                    }
                    _ => break,
                }
                it.next();
            }
            it.status()?;
        }
        records.sort_unstable_by_key(|(_, _, at)| at.offset);
        let mut pace = Pacer::new(self.compaction_rate);
        let file = File::open(&path).map_err(io_err(ctx()))?;
        let mut moved: Vec<(u64, i64, Location, Location)> = Vec::new();
        for group in records.chunks(256) {
            let mut copies = Vec::with_capacity(group.len());
            for &(ledger, entry, at) in group {
                // Read once here and written once by the writer.
                if !pace.account(2 * u64::from(at.len), &self.stopping) {
                    return Ok(false);
                }
                let mut rec = vec![0u8; at.len as usize];
                file.read_exact_at(&mut rec, at.offset).map_err(io_err(ctx()))?;
                self.compaction_read.fetch_add(u64::from(at.len), Ordering::Relaxed);
                match record::decode(rec, ledger, entry) {
                    Ok(e) => copies.push((ledger, entry, at, e)),
                    Err(_) => return give_up("a record does not match its checksum"),
                }
            }
            let st = self.lock();
            let mut st = self.throttle(st);
            for (ledger, entry, old, e) in copies {
                if st.logs.get(&id).is_some_and(|i| i.ledgers.contains_key(&ledger)) {
                    let new = self.append(&mut st, ledger, entry, e.checksum, &e.payload)?;
                    moved.push((ledger, entry, old, new));
                }
            }
        }
        // The copies are durable before anything points at them.
        self.flush()?;
        for part in moved.chunks(1024) {
            // Exclusive: an add's index write landing between the check and the batch below
            // would be overwritten with the older copy.
            let _gate = self.index_gate.write().unwrap_or_else(|e| e.into_inner());
            let st = self.lock();
            let mut batch = WriteBatch::default();
            for (l, e, old, new) in part {
                if !st.logs.get(&id).is_some_and(|i| i.ledgers.contains_key(l)) {
                    continue;
                }
                let key = entry_key(*l, *e);
                if self.db.get_pinned_cf(index, key)?.as_deref().and_then(Location::decode) == Some(*old) {
                    batch.put_cf(index, key, new.encode());
                }
            }
            self.db.write_opt(batch, &self.no_wal)?;
        }
        let mut st = self.lock();
        if let Some(info) = st.logs.remove(&id) {
            for l in info.ledgers.keys() {
                if let Some(s) = st.ledger_logs.get_mut(l) {
                    s.remove(&id);
                }
            }
            st.dirty.insert(id);
            st.released.push(id);
        }
        Ok(true)
    }
}

/// Keeps compaction's I/O under a rate, so it does not take the disk from the journal.
struct Pacer {
    rate: u64,
    start: Instant,
    bytes: u64,
}

impl Pacer {
    fn new(rate: u64) -> Self {
        Pacer { rate, start: Instant::now(), bytes: 0 }
    }

    /// Counts `n` bytes and waits until they are within the rate; false when `stop` is set.
    fn account(&mut self, n: u64, stop: &std::sync::atomic::AtomicBool) -> bool {
        self.bytes += n;
        if self.rate > 0 {
            let due = Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
            while self.start.elapsed() + Duration::from_millis(5) < due {
                if stop.load(Ordering::Relaxed) {
                    return false;
                }
                std::thread::sleep(due.saturating_sub(self.start.elapsed()).min(Duration::from_millis(50)));
            }
        }
        !stop.load(Ordering::Relaxed)
    }
}

/// Slack for a buffer sized to one large record.
const ALIGN_SLACK: usize = 2 * record::ALIGN;

impl LedgerStorage for EntryLogStorage {
    fn write(&self, entries: &[EntryWrite], states: &[(u64, LedgerMeta)]) -> Result<()> {
        self.inner.store(entries, states, true).map(|_| ())
    }

    fn write_unindexed(
        &self,
        entries: &[EntryWrite],
        states: &[(u64, LedgerMeta)],
    ) -> Result<Option<Vec<super::EntryRef>>> {
        let placed = self.inner.store(entries, states, false)?;
        Ok(Some(placed.iter().map(Location::encode).collect()))
    }

    fn get_entry(&self, ledger: u64, entry: i64) -> Result<Option<StoredEntry>> {
        let Some(at) = self.inner.location(ledger, entry)? else { return Ok(None) };
        self.get_entry_at(ledger, entry, at)
    }

    /// Runs of entries whose records lie next to each other in one log (as a ledger's entries
    /// written together do) are read with one read of up to [`MAX_RUN_BYTES`], not one read
    /// per record: a catch-up read of a batch of 128 KiB entries took one direct read, and one
    /// wait for the disk, per entry.
    fn get_entries(&self, ledger: u64, entries: &[i64], budget: usize) -> Vec<Result<Option<StoredEntry>>> {
        let mut out = Vec::with_capacity(entries.len());
        let mut left = budget.max(1);
        let mut next = 0;
        // The lookup of `entries[next]`, when the last run ended at it.
        let mut looked_up = None;
        while next < entries.len() && left > 0 {
            let first = match looked_up.take().unwrap_or_else(|| self.inner.location(ledger, entries[next])) {
                Ok(Some(at)) => at,
                other => {
                    out.push(other.map(|_| None));
                    next += 1;
                    continue;
                }
            };
            let mut runs = vec![first];
            let mut bytes = u64::from(first.len);
            while bytes < left as u64 && next + runs.len() < entries.len() {
                let found = self.inner.location(ledger, entries[next + runs.len()]);
                match (&found, runs.last()) {
                    (Ok(Some(at)), Some(p))
                        if p.log == at.log
                            && p.offset + u64::from(p.len) == at.offset
                            && bytes + u64::from(at.len) <= MAX_RUN_BYTES =>
                    {
                        bytes += u64::from(at.len);
                        runs.push(*at);
                    }
                    _ => {
                        looked_up = Some(found);
                        break;
                    }
                }
            }
            let ids = &entries[next..next + runs.len()];
            let read = self.inner.read_run(ledger, ids, &runs);
            for ((&entry, &at), got) in ids.iter().zip(&runs).zip(read) {
                let r = match got {
                    Some(e) => Ok(Some(e)),
                    None => self.get_entry_at(ledger, entry, at),
                };
                if let Ok(Some(e)) = &r {
                    left = left.saturating_sub(e.payload.len());
                }
                out.push(r);
            }
            next += runs.len();
        }
        out
    }

    fn ledger_meta(&self, ledger: u64) -> Result<Option<LedgerMeta>> {
        match self.inner.db.get_pinned_cf(self.inner.cf(LEDGERS)?, ledger.to_be_bytes())? {
            None => Ok(None),
            Some(v) => LedgerMeta::decode(&v).map(Some).ok_or(BookieError::Corrupt { ledger, entry: -1 }),
        }
    }

    fn last_entry(&self, ledger: u64) -> Result<Option<i64>> {
        super::rocks::last_key(&self.inner.db, self.inner.cf(INDEX)?, ledger)
    }

    fn delete_ledger(&self, ledger: u64) -> Result<()> {
        let inner = &self.inner;
        let (icf, lcf) = (inner.cf(INDEX)?, inner.cf(LEDGERS)?);
        let _gate = inner.index_gate.write().unwrap_or_else(|e| e.into_inner());
        let mut st = inner.lock();
        super::rocks::delete_ledger_keys(&inner.db, &inner.no_wal, icf, lcf, ledger)?;
        let current = st.current.as_ref().map(|c| c.id);
        for id in st.ledger_logs.remove(&ledger).unwrap_or_default() {
            let Some(info) = st.logs.get_mut(&id) else { continue };
            info.ledgers.remove(&ledger);
            let empty = info.ledgers.is_empty() && Some(id) != current;
            st.dirty.insert(id);
            if empty {
                st.logs.remove(&id);
                st.released.push(id);
            }
        }
        Ok(())
    }

    fn ledgers(&self) -> Result<Vec<u64>> {
        super::rocks::list_ledgers(&self.inner.db, self.inner.cf(LEDGERS)?, self.inner.cf(INDEX)?)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn write_ref(&self, e: &EntryWrite) -> Result<Option<super::EntryRef>> {
        let inner = &self.inner;
        let mut st = inner.lock();
        if let Some(err) = &st.failed {
            return Err(failed(err));
        }
        let at = inner.append(&mut st, e.ledger, e.entry, e.checksum, &e.payload)?;
        *st.unindexed.entry(at.log).or_default() += 1;
        // With the writer idle, the payload goes to it now rather than when the sync that
        // covers it cuts the buffer: the sync, on the add's path to its ack, then finds it
        // written or being written. Payloads stored while the writer is busy gather in the
        // buffer, and it takes them together once its write is done (`write_chunks`).
        // (A record that filled the buffer went with it already.)
        let unsent = match st.current.as_mut() {
            Some(cur) if cur.unsent => {
                cur.unsent_refs = true;
                true
            }
            _ => false,
        };
        if unsent && st.inflight.is_empty() {
            inner.send(&mut st, 0, false)?;
        }
        drop(inner.throttle(st));
        Ok(Some(at.encode()))
    }

    fn index_refs(&self, refs: &[(u64, i64, super::EntryRef)]) -> Result<()> {
        if refs.is_empty() {
            return Ok(());
        }
        let inner = &self.inner;
        let icf = inner.cf(INDEX)?;
        let mut batch = WriteBatch::with_capacity_bytes(refs.len() * 48);
        // Under the gate, as in `write`: a ledger deleted since its payloads were stored (its
        // bytes gone from the logs' accounting) is not revived.
        let gate = inner.index_gate.read().unwrap_or_else(|e| e.into_inner());
        let st = inner.lock();
        let mut logs = Vec::with_capacity(refs.len());
        for (ledger, entry, at) in refs {
            let Some(loc) = Location::decode(at) else { continue };
            logs.push(loc.log);
            if st.logs.get(&loc.log).is_some_and(|i| i.ledgers.contains_key(ledger)) {
                batch.put_cf(icf, entry_key(*ledger, *entry), at);
            }
        }
        drop(st);
        let written = inner.db.write_opt(batch, &inner.no_wal);
        drop(gate);
        // Only now that the index write has landed may compaction look at these logs.
        inner.lock().indexed(&logs);
        Ok(written?)
    }

    fn forget_refs(&self, refs: &[(u64, i64, super::EntryRef)]) {
        let logs: Vec<u64> = refs.iter().filter_map(|(_, _, at)| Location::decode(at)).map(|l| l.log).collect();
        self.inner.lock().indexed(&logs);
    }

    fn sync_refs(&self) -> Result<super::RefSync> {
        self.inner.begin_ref_sync()
    }

    fn adopt_ref(&self, ledger: u64, entry: i64, checksum: u32, at: &super::EntryRef) -> Result<bool> {
        let Some(at) = Location::decode(at) else { return Ok(false) };
        self.inner.adopt_ref(ledger, entry, checksum, at)
    }

    fn replay_done(&self) {
        self.inner.replayed.store(true, std::sync::atomic::Ordering::Release);
    }

    fn reusable_bytes(&self) -> u64 {
        self.inner.lock().pool_bytes
    }

    fn gauges(&self) -> Vec<(&'static str, &'static str, f64)> {
        let st = self.inner.lock();
        let (live, size): (u64, u64) = st.logs.values().fold((0, 0), |(l, s), i| (l + i.live(), s + i.end));
        vec![
            ("bookie_entry_log_files", "Entry logs holding entries", st.logs.len() as f64),
            ("bookie_entry_log_bytes", "Bytes written to the entry logs holding entries", size as f64),
            ("bookie_entry_log_live_bytes", "Bytes of live records in the entry logs", live as f64),
            ("bookie_entry_log_pool_files", "Emptied entry log files kept for reuse", st.pool.len() as f64),
            ("bookie_entry_log_pool_bytes", "Bytes of emptied entry log files kept for reuse", st.pool_bytes as f64),
            (
                "bookie_entry_log_file_reads",
                "Reads of records from entry-log files since the bookie started (adjacent records read at once count once)",
                self.inner.file_reads.load(Ordering::Relaxed) as f64,
            ),
            (
                "bookie_entry_log_compaction_read_bytes",
                "Bytes of live records compaction has read since the bookie started",
                self.inner.compaction_read.load(Ordering::Relaxed) as f64,
            ),
        ]
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
