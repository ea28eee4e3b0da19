//! The production entry store: RocksDB with its WAL off (the journal is the write-ahead log).
//!
//! Column families:
//! - `entries`: key [`super::entry_key`] (ledger, entry big-endian) → `[checksum u32 LE][payload]`.
//!   Values of `min_blob_bytes` or more live in blob files, so compaction moves 16-byte keys and
//!   blob references rather than rewriting payloads.
//! - `ledgers`: ledger id (u64 BE) → [`LedgerMeta::encode`].
//!
//! Atomic flush is on: a flush persists both families up to the same point, which is what a
//! journal checkpoint relies on.

use std::path::Path;

use bytes::Bytes;
use rocksdb::{ColumnFamilyDescriptor, FlushOptions, Options, WriteBatch, WriteOptions, DB};

use super::{entry_key, parse_entry_key, EntryWrite, LedgerMeta, LedgerStorage, StoredEntry};
use crate::config::StorageSettings;
use crate::error::{BookieError, Result};

const ENTRIES: &str = "entries";
const LEDGERS: &str = "ledgers";
/// Memtables per column family: the active one plus room for those waiting to be flushed.
const WRITE_BUFFERS: i32 = 6;
/// Most flush threads a store uses.
pub const MAX_FLUSH_THREADS: usize = 8;

/// Files the entry store may keep open: `configured`, or (0) a quarter of the process's soft
/// limit on open files (`limit`; `None` is unlimited), which leaves the rest to journal
/// segments, sockets and, in a standalone, the broker and the metastore. RocksDB keeps table
/// and blob files beyond that in an LRU cache and reopens them when they are read.
pub fn open_files_budget(configured: u64, limit: Option<u64>) -> i32 {
    let files = match configured {
        0 => limit.map_or(MAX_AUTO_OPEN_FILES, |l| (l / 4).clamp(crate::config::MIN_OPEN_FILES, MAX_AUTO_OPEN_FILES)),
        n => n,
    };
    i32::try_from(files).unwrap_or(i32::MAX)
}

/// Most files the automatic budget allows (a process with no limit gets this many).
const MAX_AUTO_OPEN_FILES: u64 = 1 << 18;

/// Database options both entry stores use: atomic flush, flush and compaction threads and
/// their priorities, incremental syncs, the open-file budget and direct I/O for flushes.
pub(crate) fn base_options(settings: &StorageSettings) -> Result<Options> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.set_atomic_flush(true);
    opts.set_keep_log_file_num(4);
    // Flushes are the second copy of every entry and must keep pace with the journal.
    // `flush_threads` flushes may run side by side; compactions (small tables: payloads
    // live in blob files) need one thread.
    let flushes = settings.flush_threads.clamp(1, MAX_FLUSH_THREADS) as i32;
    opts.set_max_background_jobs(flushes + 1);
    // Deprecated in the bindings in favour of deriving both counts from the job count,
    // which would give compactions three times the flush threads; RocksDB honours it.
    #[allow(deprecated)]
    opts.set_max_background_flushes(flushes);
    #[allow(deprecated)]
    opts.set_max_background_compactions(1);
    // Write flushed files out incrementally instead of in one burst at their fsync, which
    // would delay the journal's fdatasyncs on the same disk.
    opts.set_bytes_per_sync(1 << 20);
    let open_files = open_files_budget(settings.max_open_files, magnetar_common::limits::open_file_limit());
    opts.set_max_open_files(open_files);
    // The open-file cache is split into shards of equal capacity, each holding at least
    // one file: RocksDB's default of 64 shards would let a small budget be exceeded.
    opts.set_table_cache_num_shard_bits(4);
    // Compactions run at a lower CPU priority than the journal and the request handlers,
    // so on small machines they do not add latency spikes to adds; flushes too, unless
    // `low_priority_flushes` is off (more throughput for large entries on a busy machine,
    // at the price of a longer latency tail: see docs/benchmarks.md).
    let mut env = rocksdb::Env::new()?;
    env.lower_thread_pool_cpu_priority();
    if settings.low_priority_flushes {
        env.lower_high_priority_thread_pool_cpu_priority();
    }
    env.set_high_priority_background_threads(flushes);
    env.set_background_threads(1);
    opts.set_env(&env);
    // Flushes and compactions write past the page cache: entries are written once (by
    // the journal) into the page cache already, and copying every flushed byte into it a
    // second time cost more CPU than anything else at high add rates.
    opts.set_use_direct_io_for_flush_and_compaction(true);
    Ok(opts)
}

/// Options of a family keyed by [`entry_key`]: XXH3 block checksums (RocksDB's CRC32C is a
/// software loop unless the whole build targets SSE4.2, and it cost about as much CPU as
/// writing the data), LZ4, and room to keep accepting writes while full memtables flush.
pub(crate) fn keyed_family(settings: &StorageSettings) -> Options {
    let mut o = Options::default();
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_checksum_type(rocksdb::ChecksumType::XXH3);
    o.set_block_based_table_factory(&table);
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    o.set_write_buffer_size(settings.write_buffer_bytes);
    o.set_max_write_buffer_number(WRITE_BUFFERS);
    o
}

/// RocksDB-backed [`LedgerStorage`].
pub struct RocksStorage {
    db: DB,
    no_wal: WriteOptions,
}

impl RocksStorage {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path, settings: &StorageSettings) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| BookieError::io(format!("creating {}", dir.display()), e))?;
        let mut opts = base_options(settings)?;
        opts.create_missing_column_families(true);
        let mut entries = keyed_family(settings);
        if settings.min_blob_bytes > 0 {
            entries.set_enable_blob_files(true);
            entries.set_min_blob_size(settings.min_blob_bytes);
            entries.set_enable_blob_gc(true);
        }
        // Atomic flush switches both families' memtables together, so every flush leaves an
        // immutable (and tiny) ledger-state memtable too. With RocksDB's default of two such
        // buffers, checkpoints in quick succession stopped all writes until a flush of the
        // entries finished (100-300 ms under load): the state family gets the same headroom.
        let mut states = Options::default();
        states.set_max_write_buffer_number(WRITE_BUFFERS);
        let cfs = vec![ColumnFamilyDescriptor::new(ENTRIES, entries), ColumnFamilyDescriptor::new(LEDGERS, states)];
        let db = DB::open_cf_descriptors(&opts, dir.join("entries.db"), cfs)?;
        let mut no_wal = WriteOptions::default();
        no_wal.disable_wal(true);
        Ok(RocksStorage { db, no_wal })
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily> {
        self.db.cf_handle(name).ok_or(BookieError::Invalid("entry store lacks a column family"))
    }
}

impl LedgerStorage for RocksStorage {
    fn write(&self, entries: &[EntryWrite], states: &[(u64, LedgerMeta)]) -> Result<()> {
        let (ecf, lcf) = (self.cf(ENTRIES)?, self.cf(LEDGERS)?);
        // Sized up front: growing the batch copies everything already in it.
        let bytes: usize = entries.iter().map(|e| e.payload.len() + 32).sum::<usize>() + states.len() * 64;
        let mut batch = WriteBatch::with_capacity_bytes(bytes + 64);
        let mut value = Vec::new();
        for e in entries {
            value.clear();
            value.extend_from_slice(&e.checksum.to_le_bytes());
            value.extend_from_slice(&e.payload);
            batch.put_cf(ecf, entry_key(e.ledger, e.entry), &value);
        }
        for (l, m) in states {
            batch.put_cf(lcf, l.to_be_bytes(), m.encode());
        }
        self.db.write_opt(batch, &self.no_wal)?;
        Ok(())
    }

    fn get_entry(&self, ledger: u64, entry: i64) -> Result<Option<StoredEntry>> {
        let Some(v) = self.db.get_pinned_cf(self.cf(ENTRIES)?, entry_key(ledger, entry))? else {
            return Ok(None);
        };
        if v.len() < 4 {
            return Err(BookieError::Corrupt { ledger, entry });
        }
        let checksum = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
        StoredEntry::verified(ledger, entry, checksum, Bytes::copy_from_slice(&v[4..])).map(Some)
    }

    fn ledger_meta(&self, ledger: u64) -> Result<Option<LedgerMeta>> {
        match self.db.get_pinned_cf(self.cf(LEDGERS)?, ledger.to_be_bytes())? {
            None => Ok(None),
            Some(v) => LedgerMeta::decode(&v).map(Some).ok_or(BookieError::Corrupt { ledger, entry: -1 }),
        }
    }

    fn last_entry(&self, ledger: u64) -> Result<Option<i64>> {
        last_key(&self.db, self.cf(ENTRIES)?, ledger)
    }

    fn delete_ledger(&self, ledger: u64) -> Result<()> {
        delete_ledger_keys(&self.db, &self.no_wal, self.cf(ENTRIES)?, self.cf(LEDGERS)?, ledger)
    }

    fn ledgers(&self) -> Result<Vec<u64>> {
        list_ledgers(&self.db, self.cf(LEDGERS)?, self.cf(ENTRIES)?)
    }

    fn flush(&self) -> Result<()> {
        let mut fo = FlushOptions::default();
        fo.set_wait(true);
        self.db.flush_cfs_opt(&[self.cf(ENTRIES)?, self.cf(LEDGERS)?], &fo)?;
        Ok(())
    }
}

/// Highest entry id of `ledger` in a family keyed by [`entry_key`].
pub(crate) fn last_key(db: &DB, cf: &rocksdb::ColumnFamily, ledger: u64) -> Result<Option<i64>> {
    let mut it = db.raw_iterator_cf(cf);
    it.seek_for_prev(entry_key(ledger, i64::MAX));
    if !it.valid() {
        it.status()?;
        return Ok(None);
    }
    Ok(it.key().and_then(parse_entry_key).filter(|(l, _)| *l == ledger).map(|(_, e)| e))
}

/// Removes a ledger's keys from an entry-keyed family and its state from a ledger family.
pub(crate) fn delete_ledger_keys(
    db: &DB,
    wo: &WriteOptions,
    entries: &rocksdb::ColumnFamily,
    states: &rocksdb::ColumnFamily,
    ledger: u64,
) -> Result<()> {
    let mut batch = WriteBatch::default();
    let end = match ledger.checked_add(1) {
        Some(n) => entry_key(n, 0).to_vec(),
        None => vec![0xff; 17],
    };
    batch.delete_range_cf(entries, entry_key(ledger, 0).to_vec(), end);
    batch.delete_cf(states, ledger.to_be_bytes());
    db.write_opt(batch, wo)?;
    Ok(())
}

/// Every ledger with a state or an entry key, ascending.
pub(crate) fn list_ledgers(
    db: &DB,
    states: &rocksdb::ColumnFamily,
    entries: &rocksdb::ColumnFamily,
) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    let mut it = db.raw_iterator_cf(states);
    it.seek_to_first();
    while let Some(k) = it.key() {
        if let Ok(b) = <[u8; 8]>::try_from(k) {
            out.push(u64::from_be_bytes(b));
        }
        it.next();
    }
    it.status()?;
    // Entries whose ledger state is missing (should not happen, but the GC must see them).
    let mut it = db.raw_iterator_cf(entries);
    it.seek_to_first();
    while let Some((l, _)) = it.key().and_then(parse_entry_key) {
        out.push(l);
        match l.checked_add(1) {
            Some(n) => it.seek(entry_key(n, 0)),
            None => break,
        }
    }
    it.status()?;
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance() {
        let settings = StorageSettings { min_blob_bytes: 64, ..Default::default() };
        super::super::suite::run_all(|dir| RocksStorage::open(dir, &settings).expect("open"), true);
    }

    /// Open descriptors of this process on table and blob files under `dir`.
    fn open_tables_under(dir: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .expect("list /proc/self/fd")
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter(|target| target.starts_with(dir))
            .filter(|target| target.extension().is_some_and(|x| x == "sst" || x == "blob"))
            .count()
    }

    /// Every flush leaves a table file and a blob file behind; with `max_open_files` the store
    /// keeps no more of them open than that, and still reads every entry back (reopening
    /// files that were closed).
    #[test]
    fn open_files_stay_within_the_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = dir.path().canonicalize().expect("canonical");
        let settings = StorageSettings { max_open_files: 32, ..Default::default() };
        let store = RocksStorage::open(&dir, &settings).expect("open");
        let (flushes, per_flush) = (60i64, 4i64);
        let payload = |e: i64| Bytes::from(vec![e as u8; 8192]);
        let sum = |e: i64| crate::checksum::entry_checksum(7, e, &payload(e));
        for f in 0..flushes {
            let entries: Vec<EntryWrite> = (f * per_flush..(f + 1) * per_flush)
                .map(|e| EntryWrite { ledger: 7, entry: e, checksum: sum(e), payload: payload(e) })
                .collect();
            store.write(&entries, &[]).expect("write");
            store.flush().expect("flush");
        }
        for e in 0..flushes * per_flush {
            let got = store.get_entry(7, e).expect("read").unwrap_or_else(|| panic!("entry {e} missing"));
            assert_eq!((got.checksum, got.payload), (sum(e), payload(e)), "entry {e}");
        }
        let files = std::fs::read_dir(dir.join("entries.db")).expect("list").count();
        assert!(files > 2 * flushes as usize, "only {files} files: too few flushes exercised");
        let open = open_tables_under(&dir);
        assert!(open <= 32, "{open} table and blob files open with a budget of 32");
    }

    #[test]
    fn the_automatic_budget_is_a_share_of_the_limit() {
        assert_eq!(open_files_budget(0, Some(1024)), 256);
        assert_eq!(open_files_budget(0, Some(40)), crate::config::MIN_OPEN_FILES as i32);
        assert_eq!(open_files_budget(0, None), MAX_AUTO_OPEN_FILES as i32);
        assert_eq!(open_files_budget(0, Some(u64::MAX)), MAX_AUTO_OPEN_FILES as i32);
        assert_eq!(open_files_budget(500, Some(1024)), 500);
    }

    /// The flush and compaction thread counts reach RocksDB (its options file records what
    /// the store runs with).
    #[test]
    fn flush_threads_reach_rocksdb() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = StorageSettings { flush_threads: 3, ..Default::default() };
        let store = RocksStorage::open(dir.path(), &settings).expect("open");
        drop(store);
        let db = dir.path().join("entries.db");
        let options = std::fs::read_dir(&db)
            .expect("list")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("OPTIONS-"))
            .map(|e| std::fs::read_to_string(e.path()).expect("read"))
            .last()
            .expect("an options file");
        let lines: Vec<&str> = options.lines().map(str::trim).collect();
        for want in ["max_background_flushes=3", "max_background_compactions=1", "max_background_jobs=4"] {
            assert!(lines.contains(&want), "{want} missing from the options file");
        }
    }
}
