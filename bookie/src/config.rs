//! Bookie configuration: TOML, `MAGNETAR_BOOKIE_*` environment, CLI flags (see
//! `docs/configuration.md`). Names follow BookKeeper's where users know them
//! (`journalDirectories`, `ledgerDirectories`, `journalMaxGroupWaitMSec` …) as env aliases.

use std::path::PathBuf;

use magnetar_common::config::{ConfigError, Validate};
use serde::{Deserialize, Serialize};

/// One bookie.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BookieConfig {
    /// Stable identity of this bookie in ledger metadata; defaults to the advertised address.
    pub bookie_id: String,
    /// gRPC listen address (port 0 picks a free one).
    pub listen_addr: String,
    /// Address ledger clients use; defaults to the bound address.
    pub advertise_addr: String,
    /// HTTP listen address for `/metrics` and probes (empty: off).
    pub http_addr: String,
    /// Journal directories; each runs its own journal (ledgers are spread by id).
    pub journal_dirs: Vec<PathBuf>,
    /// Ledger directory holding the RocksDB entry store (exactly one).
    pub ledger_dirs: Vec<PathBuf>,
    /// Metastore endpoints (host:port, comma separated in env/CLI).
    pub metastore: Vec<String>,
    /// Journal tuning.
    pub journal: JournalSettings,
    /// Entry storage tuning.
    pub storage: StorageSettings,
    /// Disk usage above which the bookie turns read-only (fraction 0..1).
    pub disk_usage_threshold: f64,
    /// Disk usage below which a read-only bookie becomes writable again.
    pub disk_usage_lwm_threshold: f64,
    /// How often disk usage is checked.
    pub disk_check_interval_ms: u64,
    /// Registration session TTL in the metastore.
    pub session_ttl_ms: u64,
    /// How often the garbage collector looks for deleted ledgers (0: never).
    pub gc_interval_ms: u64,
    /// Largest entry accepted.
    pub max_entry_bytes: usize,
}

impl Default for BookieConfig {
    fn default() -> Self {
        BookieConfig {
            bookie_id: String::new(),
            listen_addr: "127.0.0.1:3181".into(),
            advertise_addr: String::new(),
            http_addr: "127.0.0.1:8000".into(),
            journal_dirs: vec![PathBuf::from("./data/bookie/journal")],
            ledger_dirs: vec![PathBuf::from("./data/bookie/ledgers")],
            metastore: vec!["127.0.0.1:2379".into()],
            journal: JournalSettings::default(),
            storage: StorageSettings::default(),
            disk_usage_threshold: 0.95,
            disk_usage_lwm_threshold: 0.90,
            disk_check_interval_ms: 10_000,
            session_ttl_ms: 10_000,
            gc_interval_ms: 60_000,
            // Pulsar's largest message (5 MiB) plus room for its metadata.
            max_entry_bytes: (5 << 20) + (16 << 10),
        }
    }
}

/// Journal group commit and segment files.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JournalSettings {
    /// Longest an add waits for others to share its fdatasync (µs).
    pub max_group_wait_us: u64,
    /// A group is synced at once when it holds this many bytes.
    pub group_bytes: usize,
    /// Sync at once when no more adds are queued, instead of waiting out `max_group_wait_us`
    /// (BookKeeper's `journalFlushWhenQueueEmpty`). Lowest latency; batching still happens
    /// whenever adds arrive while a sync runs.
    pub flush_when_queue_empty: bool,
    /// After each write, ask the kernel to start writing the new journal pages out and to drop
    /// the pages of earlier, synced writes from the page cache (BookKeeper's
    /// `journalRemovePagesFromCache`). The journal is read only when the bookie restarts; pages
    /// already on their way to the disk leave less for the next fdatasync to do.
    pub remove_pages_from_cache: bool,
    /// Size of each preallocated journal segment file.
    pub segment_bytes: u64,
    /// Segment files kept preallocated ahead of need.
    pub preallocated_segments: usize,
    /// Turn fdatasync off (tests and benchmarks of the CPU path only: loses data on power loss).
    pub sync: bool,
    /// Payloads of at least this many bytes are written once, to the entry log, and the
    /// journal records where they are; smaller ones are written to both (0: every payload is
    /// written to both). Needs the `entry_logs` storage engine; with `rocksdb` every payload
    /// is written to both.
    pub write_once_bytes: usize,
}

impl Default for JournalSettings {
    fn default() -> Self {
        JournalSettings {
            max_group_wait_us: 1000,
            group_bytes: 512 << 10,
            flush_when_queue_empty: true,
            remove_pages_from_cache: true,
            segment_bytes: 64 << 20,
            preallocated_segments: 1,
            sync: true,
            write_once_bytes: 16 << 10,
        }
    }
}

/// Fewest files the entry store may be limited to (RocksDB keeps about ten of them for itself).
pub const MIN_OPEN_FILES: u64 = 32;

/// RocksDB entry store and read cache.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// Where payloads live: `entry_logs` (entry log files and a RocksDB index; the default)
    /// or `rocksdb` (payloads in RocksDB, in blob files from `min_blob_bytes`). A ledger
    /// directory keeps the engine it was created with.
    pub engine: StorageEngine,
    /// Size at which an entry log is sealed and a new one started.
    pub entry_log_bytes: u64,
    /// Emptied entry logs kept for reuse (more are deleted).
    pub entry_log_pool: usize,
    /// An entry log whose live bytes fall below this fraction of its size is compacted.
    pub compaction_threshold: f64,
    /// How often entry logs are checked for compaction (0: never); a log is compacted only
    /// once it has been sealed this long.
    pub compaction_interval_ms: u64,
    /// Bytes per second compaction reads and writes at most (0: no limit).
    pub compaction_bytes_per_second: u64,
    /// How often journal positions are checkpointed (flushing RocksDB) so old segments go.
    pub checkpoint_interval_ms: u64,
    /// A journal that fills a segment asks for a checkpoint, which then starts at least this
    /// long after the previous one began, unless journals have filled
    /// [`SEGMENTS_PER_CHECKPOINT`](crate::server::SEGMENTS_PER_CHECKPOINT) segments since (0: at
    /// once). Each checkpoint flushes RocksDB and fsyncs files and directories. At 1 KiB
    /// entries a checkpoint for every 64 MiB segment came every half second, and a journal
    /// write issued while one ran took up to 95 ms now and then (measured; most likely waiting
    /// for the file system's commit of that metadata), stalling every add behind it.
    pub checkpoint_min_gap_ms: u64,
    /// Bytes of recently written entries kept in memory for tail reads (payloads plus 64 bytes
    /// of bookkeeping each).
    pub read_cache_bytes: usize,
    /// Entries of at least this size go to RocksDB blob files (0: off).
    pub min_blob_bytes: u64,
    /// RocksDB memtable size.
    pub write_buffer_bytes: usize,
    /// RocksDB flushes that may run at once (1-8).
    pub flush_threads: usize,
    /// Run RocksDB flushes at a lower CPU priority than the journal and request handlers.
    pub low_priority_flushes: bool,
    /// Files the entry store keeps open at most (0: a quarter of the process's open-file
    /// limit). Every checkpoint adds a table file and a blob file, so a bookie holding much
    /// data would otherwise keep thousands open; older ones are reopened when read.
    pub max_open_files: u64,
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            engine: StorageEngine::EntryLogs,
            entry_log_bytes: 256 << 20,
            entry_log_pool: 8,
            compaction_threshold: 0.5,
            compaction_interval_ms: 900_000,
            compaction_bytes_per_second: 32 << 20,
            checkpoint_interval_ms: 10_000,
            checkpoint_min_gap_ms: 2_000,
            read_cache_bytes: 64 << 20,
            min_blob_bytes: 4096,
            write_buffer_bytes: 64 << 20,
            flush_threads: 1,
            low_priority_flushes: true,
            max_open_files: 0,
        }
    }
}

/// Where a bookie keeps payloads.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StorageEngine {
    /// Entry log files, indexed in RocksDB; emptied files are reused.
    EntryLogs,
    /// RocksDB with blob files.
    Rocksdb,
}

impl Validate for BookieConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: &str| Err(ConfigError::Invalid { key: key.into(), reason: reason.into() });
        if self.journal_dirs.is_empty() {
            return bad("journal_dirs", "at least one journal directory is needed");
        }
        if self.ledger_dirs.len() != 1 {
            return bad("ledger_dirs", "exactly one ledger directory is supported");
        }
        let mut all: Vec<&PathBuf> = self.journal_dirs.iter().chain(self.ledger_dirs.iter()).collect();
        all.sort();
        all.dedup();
        if all.len() != self.journal_dirs.len() + self.ledger_dirs.len() {
            return bad("journal_dirs", "journal and ledger directories must all be different");
        }
        if self.metastore.is_empty() {
            return bad("metastore", "at least one metastore endpoint is needed");
        }
        if !(0.0..=1.0).contains(&self.disk_usage_threshold)
            || self.disk_usage_lwm_threshold > self.disk_usage_threshold
        {
            return bad("disk_usage_threshold", "must be in 0..1 and at least disk_usage_lwm_threshold");
        }
        if self.max_entry_bytes == 0 || self.max_entry_bytes > 64 << 20 {
            return bad("max_entry_bytes", "must be between 1 and 64 MiB");
        }
        if self.journal.segment_bytes < 2 * (self.max_entry_bytes as u64 + 1024) {
            return bad("journal.segment_bytes", "must hold at least two of the largest entries");
        }
        if self.journal.group_bytes == 0 {
            return bad("journal.group_bytes", "must be > 0");
        }
        if self.session_ttl_ms < 500 {
            return bad("session_ttl_ms", "must be at least 500");
        }
        let max_flushes = crate::storage::rocks::MAX_FLUSH_THREADS;
        if self.storage.max_open_files != 0 && self.storage.max_open_files < MIN_OPEN_FILES {
            return bad("storage.max_open_files", &format!("must be 0 (automatic) or at least {MIN_OPEN_FILES}"));
        }
        if !(1..=max_flushes).contains(&self.storage.flush_threads) {
            return bad("storage.flush_threads", &format!("must be between 1 and {max_flushes}"));
        }
        if self.storage.entry_log_bytes < 4 << 20 || self.storage.entry_log_bytes < 2 * self.max_entry_bytes as u64 {
            return bad("storage.entry_log_bytes", "must be at least 4 MiB and hold two of the largest entries");
        }
        if !(0.0..=1.0).contains(&self.storage.compaction_threshold) {
            return bad("storage.compaction_threshold", "must be between 0 and 1");
        }
        if self.storage.checkpoint_interval_ms == 0 {
            return bad("storage.checkpoint_interval_ms", "must be > 0");
        }
        Ok(())
    }
}

/// BookKeeper key names accepted as environment variables.
pub const ENV_ALIASES: &[(&str, &str)] = &[
    ("journalFlushWhenQueueEmpty", "journal.flush_when_queue_empty"),
    ("journalRemovePagesFromCache", "journal.remove_pages_from_cache"),
    ("diskUsageThreshold", "disk_usage_threshold"),
    ("diskUsageLwmThreshold", "disk_usage_lwm_threshold"),
    ("gcWaitTime", "gc_interval_ms"),
    ("bookieId", "bookie_id"),
    ("logSizeLimit", "storage.entry_log_bytes"),
    ("compactionRateByBytes", "storage.compaction_bytes_per_second"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        assert!(BookieConfig::default().validate().is_ok());
    }

    #[test]
    fn a_shared_directory_is_rejected() {
        let c = BookieConfig { ledger_dirs: vec![PathBuf::from("./data/bookie/journal")], ..Default::default() };
        let e = c.validate().expect_err("must fail").to_string();
        assert!(e.contains("journal_dirs"), "{e}");
    }

    #[test]
    fn segments_must_hold_the_largest_entry() {
        let mut c = BookieConfig::default();
        c.journal.segment_bytes = 1 << 20;
        let e = c.validate().expect_err("must fail").to_string();
        assert!(e.contains("journal.segment_bytes"), "{e}");
    }

    #[test]
    fn open_file_budgets_below_the_minimum_are_rejected() {
        let mut c = BookieConfig::default();
        c.storage.max_open_files = MIN_OPEN_FILES - 1;
        let e = c.validate().expect_err("must fail").to_string();
        assert!(e.contains("storage.max_open_files"), "{e}");
        c.storage.max_open_files = MIN_OPEN_FILES;
        c.validate().expect("the minimum is allowed");
    }

    /// BookKeeper's names for the journal switches reach them, and their defaults are on.
    #[test]
    fn bookkeeper_journal_names_apply() {
        let load = |env: &[(&str, &str)]| -> BookieConfig {
            let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let mut loader = magnetar_common::config::ConfigLoader::new("MAGNETAR_BOOKIE_");
            for (alias, key) in ENV_ALIASES {
                loader = loader.env_alias(alias, key);
            }
            loader.load_with_env(&env).expect("the bookie config loads")
        };
        let c = load(&[]);
        assert!(c.journal.remove_pages_from_cache && c.journal.flush_when_queue_empty);
        let c = load(&[("journalRemovePagesFromCache", "false"), ("journalFlushWhenQueueEmpty", "false")]);
        assert!(!c.journal.remove_pages_from_cache && !c.journal.flush_when_queue_empty);
    }

    #[test]
    fn flush_threads_are_bounded() {
        for bad_value in [0, 9] {
            let mut c = BookieConfig::default();
            c.storage.flush_threads = bad_value;
            let e = c.validate().expect_err("must fail").to_string();
            assert!(e.contains("storage.flush_threads"), "{bad_value}: {e}");
        }
        let mut c = BookieConfig::default();
        c.storage.flush_threads = 8;
        assert!(c.validate().is_ok());
    }
}
