use std::path::Path;

use bytes::Bytes;

use super::*;
use crate::checksum::entry_checksum;

fn settings(log_bytes: u64) -> StorageSettings {
    StorageSettings { entry_log_bytes: log_bytes, compaction_interval_ms: 0, ..Default::default() }
}

fn open(dir: &Path, log_bytes: u64) -> EntryLogStorage {
    EntryLogStorage::open(dir, &settings(log_bytes)).expect("open")
}

fn payload(l: u64, e: i64, size: usize) -> Bytes {
    Bytes::from((0..size).map(|i| (i as u64 ^ l ^ e as u64) as u8).collect::<Vec<u8>>())
}

fn entry(l: u64, e: i64, size: usize) -> EntryWrite {
    let p = payload(l, e, size);
    EntryWrite { ledger: l, entry: e, checksum: entry_checksum(l, e, &p), payload: p }
}

fn check(s: &EntryLogStorage, l: u64, entries: std::ops::Range<i64>, size: usize) {
    for e in entries {
        let got = s.get_entry(l, e).unwrap().unwrap_or_else(|| panic!("{l}/{e} missing"));
        assert_eq!(got.payload, payload(l, e, size), "{l}/{e}");
    }
}

fn log_files(dir: &Path) -> (usize, usize) {
    let names: Vec<String> = std::fs::read_dir(dir.join("logs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    (names.iter().filter(|n| n.ends_with(".log")).count(), names.iter().filter(|n| n.ends_with(".free")).count())
}

#[test]
fn conformance() {
    crate::storage::suite::run_all(|dir| open(dir, 4 << 20), true);
}

/// Entries are read back from the buffer being filled, from buffers waiting for the writer
/// and from the files, before and after a flush and a reopen, across several logs.
#[test]
fn entries_read_back_from_every_place_they_can_be() {
    let d = tempfile::tempdir().unwrap();
    {
        let s = open(d.path(), 4 << 20);
        for e in 0..3000 {
            s.write(&[entry(1, e, 3000 + (e as usize % 7))], &[]).unwrap();
            if e % 500 == 0 {
                // Just written: still in memory.
                let got = s.get_entry(1, e).unwrap().unwrap();
                assert_eq!(got.payload, payload(1, e, 3000 + (e as usize % 7)));
            }
        }
        for e in 0..3000 {
            let got = s.get_entry(1, e).unwrap().unwrap();
            assert_eq!(got.payload, payload(1, e, 3000 + (e as usize % 7)), "entry {e}");
        }
        s.flush().unwrap();
        let (logs, _, live) = s.stats();
        assert!(logs >= 2, "9 MB over 4 MiB logs makes several logs, got {logs}");
        assert!(live >= 3000 * 3000, "live bytes {live}");
        // A record larger than a write buffer.
        s.write(&[entry(2, 0, 3 << 20)], &[]).unwrap();
        check(&s, 2, 0..1, 3 << 20);
        s.flush().unwrap();
    }
    let s = open(d.path(), 4 << 20);
    for e in 0..3000 {
        let got = s.get_entry(1, e).unwrap().unwrap();
        assert_eq!(got.payload, payload(1, e, 3000 + (e as usize % 7)), "entry {e} after reopen");
    }
    check(&s, 2, 0..1, 3 << 20);
}

/// While the writer is held up, entries are read from the buffers waiting for it, the
/// partly written block carried into the next buffer included; then from the file.
#[test]
fn entries_waiting_for_the_writer_read_back() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), 64 << 20);
    // Sizes that do not divide the block size, so records straddle block and buffer ends.
    let size = |e: i64| 5000 + (e as usize * 37) % 3000;
    let held = s.inner.gate.lock().unwrap();
    for e in 0..1500 {
        let p = payload(1, e, size(e));
        s.write(&[EntryWrite { ledger: 1, entry: e, checksum: entry_checksum(1, e, &p), payload: p }], &[]).unwrap();
    }
    {
        let st = s.inner.lock();
        assert!(st.inflight.len() >= 3, "{} buffers wait for the writer", st.inflight.len());
        assert_eq!(st.done_seq, 0, "nothing was written yet");
    }
    for e in 0..1500 {
        let got = s.get_entry(1, e).unwrap().unwrap_or_else(|| panic!("entry {e} missing"));
        assert_eq!(got.payload, payload(1, e, size(e)), "entry {e} from memory");
    }
    drop(held);
    s.flush().unwrap();
    assert!(s.inner.lock().inflight.is_empty());
    for e in 0..1500 {
        assert_eq!(s.get_entry(1, e).unwrap().unwrap().payload, payload(1, e, size(e)), "entry {e} from the file");
    }
}

/// Logs emptied by deleted ledgers go to the pool after a flush, and new logs reuse those
/// files: the number of files stays flat while ledgers come and go.
#[test]
fn deleted_ledgers_logs_are_reused() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), 4 << 20);
    let mut most = 0;
    for l in 1..=12u64 {
        let batch: Vec<EntryWrite> = (0..300).map(|e| entry(l, e, 16 << 10)).collect();
        s.write(&batch, &[(l, LedgerMeta::new(b"k"))]).unwrap();
        s.flush().unwrap();
        if l > 2 {
            s.delete_ledger(l - 2).unwrap();
            s.flush().unwrap();
        }
        let (logs, pooled) = log_files(d.path());
        most = most.max(logs + pooled);
        check(&s, l, 0..300, 16 << 10);
    }
    // 12 ledgers of ~4.9 MB in 4 MiB logs would be at least 15 files without reuse.
    assert!(most <= 10, "{most} files at most");
    for l in 1..=10 {
        assert!(s.get_entry(l, 0).unwrap().is_none(), "ledger {l} was deleted");
    }
    check(&s, 11, 0..300, 16 << 10);
    drop(s);
    let s = open(d.path(), 4 << 20);
    check(&s, 11, 0..300, 16 << 10);
    check(&s, 12, 0..300, 16 << 10);
    assert!(s.get_entry(10, 0).unwrap().is_none());
}

/// A log mostly emptied by deletions is compacted: its live entries move, it goes to the
/// pool, and every live entry still reads back (also after a reopen).
#[test]
fn compaction_moves_live_entries_and_frees_the_log() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), 4 << 20);
    // Ledgers 1 and 2 interleaved; ledger 1 keeps 1 entry in 10.
    for e in 0..400 {
        s.write(&[entry(1, e, 1000), entry(2, e, 20_000)], &[]).unwrap();
    }
    s.flush().unwrap();
    let (logs_before, _, _) = s.stats();
    assert!(logs_before >= 2, "{logs_before} logs");
    s.delete_ledger(2).unwrap();
    s.flush().unwrap();
    assert_eq!(s.compact(0.0).unwrap(), 0, "threshold 0 compacts nothing");
    let moved = s.compact(0.5).unwrap();
    assert!(moved >= 1, "a log with ~5% live bytes is compacted");
    // Found through the index, only the live records were read, not the logs' 4 MiB each.
    let read = s.inner.compaction_read.load(std::sync::atomic::Ordering::Relaxed);
    assert!(read > 0 && read <= 400 * (1000 + HEADER as u64), "compaction read {read} bytes");
    s.flush().unwrap();
    let (logs, pooled, live) = s.stats();
    assert!(pooled >= moved, "compacted logs are pooled ({pooled} < {moved})");
    assert!(logs < logs_before, "{logs} logs after compaction, {logs_before} before");
    assert!(live <= 2 * 400 * (1000 + HEADER as u64), "live bytes {live}");
    check(&s, 1, 0..400, 1000);
    drop(s);
    let s = open(d.path(), 4 << 20);
    check(&s, 1, 0..400, 1000);
    assert!(s.get_entry(2, 0).unwrap().is_none());
}

/// Records written after the last flush are found again when the store opens (here the index
/// reached the disk, as RocksDB may write it out on its own), in the log that was current at
/// the flush and in one opened after it, of which no accounting was recorded; their logs are
/// not reused while they hold live records.
#[test]
fn records_after_the_last_flush_are_adopted_on_open() {
    let d = tempfile::tempdir().unwrap();
    {
        let s = open(d.path(), 4 << 20);
        s.write(&(0..50).map(|e| entry(1, e, 10_000)).collect::<Vec<_>>(), &[]).unwrap();
        s.flush().unwrap();
        // 5 MB more: the first log fills and a second one starts.
        for e in 50..550 {
            s.write(&[entry(1, e, 10_000)], &[]).unwrap();
        }
        let inner = &s.inner;
        {
            let mut st = inner.lock();
            assert!(st.logs.len() >= 2, "a second log started");
            inner.send(&mut st, 0, false).unwrap();
            let target = st.next_seq - 1;
            while st.done_seq < target {
                st = inner.written.wait(st).unwrap();
            }
        }
        let mut fo = FlushOptions::default();
        fo.set_wait(true);
        inner.db.flush_cfs_opt(&[inner.cf(INDEX).unwrap()], &fo).unwrap();
        // Dropping stops the threads without a flush of the store (RocksDB writes its
        // memtables out on close, as it may at any time).
        drop(s);
    }
    let s = open(d.path(), 4 << 20);
    let (logs, _, live) = s.stats();
    assert_eq!(logs, 2);
    assert_eq!(live, 550 * (10_000 + HEADER as u64), "the tails' records are accounted");
    check(&s, 1, 0..550, 10_000);
    s.flush().unwrap();
    assert_eq!(s.stats().0, 2, "no log with live records was released");
    check(&s, 1, 0..550, 10_000);
}

#[test]
fn the_pool_shrinks_to_its_minimum_when_unused() {
    let d = tempfile::tempdir().unwrap();
    let settings = StorageSettings { entry_log_pool: 1, ..settings(4 << 20) };
    let s = EntryLogStorage::open(d.path(), &settings).unwrap();
    for l in 1..=4u64 {
        s.write(&(0..300).map(|e| entry(l, e, 16 << 10)).collect::<Vec<_>>(), &[(l, LedgerMeta::new(b"k"))]).unwrap();
    }
    s.flush().unwrap();
    for l in 1..=4u64 {
        s.delete_ledger(l).unwrap();
    }
    s.flush().unwrap();
    let (_, pooled, live) = s.stats();
    assert_eq!(live, 0);
    assert!(pooled >= 4, "{pooled} pooled");
    assert_eq!(s.reusable_bytes(), pooled_bytes(d.path()));
    assert_eq!(log_files(d.path()).1, pooled);
    // Logs were opened just now: the pool is what that needed, and stays.
    s.flush().unwrap();
    assert_eq!(s.stats().1, pooled);
    s.inner.lock().opened.clear();
    s.flush().unwrap();
    assert_eq!(s.stats().1, pooled - TRIM_PER_FLUSH, "a few files per flush");
    for _ in 0..pooled {
        s.flush().unwrap();
    }
    assert_eq!(s.stats().1, 1);
    assert_eq!(log_files(d.path()).1, 1);
    assert_eq!(s.reusable_bytes(), pooled_bytes(d.path()));
}

fn pooled_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("logs"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".free"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// Compaction's pacing holds its bytes to the rate, and gives up when the store closes.
#[test]
fn compaction_is_paced_and_stops_with_the_store() {
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut p = Pacer::new(10 << 20);
    let started = Instant::now();
    assert!(p.account(1 << 20, &stop));
    assert!(p.account(1 << 20, &stop));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(190), "2 MiB at 10 MiB/s took {took:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(!p.account(1 << 20, &stop));
    let mut unpaced = Pacer::new(0);
    assert!(unpaced.account(u64::MAX / 2, &std::sync::atomic::AtomicBool::new(false)));
}

/// Once the store has failed (a write or a flush went wrong), every later write and flush
/// fails too: none may claim durability the failed one could not give.
#[test]
fn a_failed_store_refuses_writes_and_flushes() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), 4 << 20);
    s.write(&[entry(1, 0, 100)], &[]).unwrap();
    s.flush().unwrap();
    s.inner.lock().failed = Some("injected".into());
    assert!(s.write(&[entry(1, 1, 100)], &[]).is_err());
    assert!(s.flush().is_err());
    assert!(s.flush().is_err(), "a second flush does not succeed either");
    // What was durable before still reads.
    check(&s, 1, 0..1, 100);
}

fn at0_log(at: &crate::storage::EntryRef) -> u64 {
    Location::decode(at).unwrap().log
}

/// Copies the log files of `from` into a new store directory: what a crash leaves on the disk
/// of a store that was never flushed (no index, no accounting), as the files are written with
/// direct I/O.
fn copy_logs(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("logs")).unwrap();
    for e in std::fs::read_dir(from.join("logs")).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().ends_with(".log") {
            std::fs::copy(e.path(), to.join("logs").join(e.file_name())).unwrap();
        }
    }
}

/// Payloads stored for journal references are on the disk once a reference sync begun after
/// them has finished, with nothing flushed, the last ones still in the buffer being filled
/// when the sync began: from a copy of the log files then, `adopt_ref` indexes every one of
/// them again, across logs, and the logs (which held nothing indexed when the copy opened)
/// are kept rather than pooled. References that do not match are refused.
#[test]
fn referenced_payloads_are_durable_after_their_sync_and_adopted_after_a_crash() {
    let d = tempfile::tempdir().unwrap();
    let copy = tempfile::tempdir().unwrap();
    let n = 300;
    let mut refs = Vec::new();
    {
        let s = open(d.path(), 4 << 20);
        for e in 0..n {
            let w = entry(1, e, 20_000);
            let at = s.write_ref(&w).unwrap().expect("entry logs keep references");
            assert_eq!(s.get_entry(1, e).unwrap(), None, "not indexed before the journal record is written");
            s.index_refs(&[(1, e, at)]).unwrap();
            assert_eq!(s.get_entry(1, e).unwrap().unwrap().payload, w.payload, "readable once indexed");
            refs.push((e, w.checksum, at));
            if e % 50 == 49 {
                s.sync_refs().unwrap()().unwrap();
            }
        }
        // A ledger deleted between storing a payload and indexing it stays deleted.
        let w = entry(3, 0, 20_000);
        let at = s.write_ref(&w).unwrap().unwrap();
        s.delete_ledger(3).unwrap();
        s.index_refs(&[(3, 0, at)]).unwrap();
        assert_eq!(s.get_entry(3, 0).unwrap(), None);
        let finish = s.sync_refs().unwrap();
        finish().unwrap();
        assert!(s.inner.lock().current.as_ref().is_some_and(|c| c.buf.len() > 0), "a partly filled buffer was synced");
        copy_logs(d.path(), copy.path());
    }
    {
        let c = open(copy.path(), 4 << 20);
        assert_eq!(c.get_entry(1, 0).unwrap(), None, "nothing indexed before adoption");
        for (e, checksum, at) in &refs {
            assert!(c.adopt_ref(1, *e, *checksum, at).unwrap(), "entry {e} adopted");
        }
        check(&c, 1, 0..n, 20_000);
        assert!(c.adopt_ref(1, 0, refs[0].1, &refs[0].2).unwrap(), "an entry stored already counts as there");
        let (_, sum0, at0) = refs[0];
        assert!(!c.adopt_ref(2, 0, sum0, &at0).unwrap(), "another ledger's record is not adopted");
        assert!(!c.adopt_ref(1, n, sum0 ^ 1, &refs[1].2).unwrap(), "a record of another entry is not adopted");
        let gone = Location { log: 999, offset: 0, len: 20_028 }.encode();
        assert!(!c.adopt_ref(1, n, sum0, &gone).unwrap(), "a missing log is not adopted from");
        // An index entry RocksDB wrote out before a crash that lost its record (an add never
        // acknowledged) is dropped when its reference does not hold either: the entry reads
        // as absent, not as corrupt.
        let lost = Location { log: at0_log(&at0), offset: 64 << 20, len: 20_028 };
        c.inner.db.put_cf(c.inner.cf(INDEX).unwrap(), entry_key(1, n), lost.encode()).unwrap();
        assert!(matches!(c.get_entry(1, n), Err(BookieError::Corrupt { .. })));
        assert!(!c.adopt_ref(1, n, sum0, &lost.encode()).unwrap());
        assert_eq!(c.get_entry(1, n).unwrap(), None, "the dangling index entry is gone");
        c.flush().unwrap();
        // (The copy also holds the log prepared to come next, which is empty and pooled.)
        let (logs, _, live) = c.stats();
        assert_eq!(logs, 2, "the adopted logs are kept");
        assert_eq!(live, n as u64 * (20_000 + HEADER as u64));
    }
    let c = open(copy.path(), 4 << 20);
    check(&c, 1, 0..n, 20_000);
}

/// A payload stored by reference is indexed only after its sync, by the journal: until then
/// compaction leaves its log alone even when nothing indexed is left in it, so the index never
/// comes to point at a log that compaction emptied and released.
#[test]
fn compaction_waits_for_references_to_be_indexed() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), 4 << 20);
    let w = entry(5, 0, 20_000);
    let at = s.write_ref(&w).unwrap().unwrap();
    let log = at0_log(&at);
    for e in 0..300 {
        s.write(&[entry(2, e, 20_000)], &[]).unwrap();
    }
    s.sync_refs().unwrap()().unwrap();
    s.delete_ledger(2).unwrap();
    s.flush().unwrap();
    assert!(s.inner.lock().logs.get(&log).is_some_and(|i| i.sealed), "the reference's log is sealed");
    s.compact(0.5).unwrap();
    assert!(s.inner.lock().logs.contains_key(&log), "a log holding an unindexed reference was compacted");
    s.index_refs(&[(5, 0, at)]).unwrap();
    assert!(s.compact(0.5).unwrap() >= 1, "once indexed, the nearly empty log is compacted");
    assert!(!s.inner.lock().logs.contains_key(&log));
    s.flush().unwrap();
    check(&s, 5, 0..1, 20_000);
    drop(s);
    check(&open(d.path(), 4 << 20), 5, 0..1, 20_000);
}

/// The log files' bytes in the page cache.
fn logs_resident(dir: &Path) -> u64 {
    let logs = std::fs::read_dir(dir.join("logs")).unwrap().map(|e| e.unwrap().path());
    logs.filter(|p| p.extension().is_some_and(|x| x == "log")).map(|p| crate::test_util::resident_bytes(&p)).sum()
}

/// Drops the log files' pages from the page cache.
fn evict_logs(dir: &Path) {
    for e in std::fs::read_dir(dir.join("logs")).unwrap() {
        let f = std::fs::File::open(e.unwrap().path()).unwrap();
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    }
}

/// Large records are read from the disk with direct I/O, byte for byte, wherever they start
/// (here between small records, so at offsets off the 4 KiB grid), without passing through
/// the page cache; small ones go through it as before.
#[test]
fn large_records_are_read_directly_from_the_disk() {
    let d = tempfile::tempdir().unwrap();
    let size = |e: i64| if e % 2 == 0 { 1000 + e as usize * 13 } else { DIRECT_READ_BYTES + e as usize * 1237 };
    let n = 60i64;
    {
        let s = open(d.path(), 16 << 20);
        for e in 0..n {
            s.write(&[entry(6, e, size(e))], &[]).unwrap();
        }
        s.flush().unwrap();
    }
    let s = open(d.path(), 16 << 20);
    evict_logs(d.path());
    assert_eq!(logs_resident(d.path()), 0, "the logs are still cached");
    let large: u64 = (0..n).filter(|e| e % 2 == 1).map(|e| size(e) as u64).sum();
    let mut off_grid = 0;
    for e in (1..n).step_by(2) {
        let at = s.inner.location(6, e).unwrap().unwrap();
        off_grid += usize::from(!at.offset.is_multiple_of(record::ALIGN as u64));
        check(&s, 6, e..e + 1, size(e));
    }
    assert!(off_grid >= 25, "only {off_grid} large records start off the 4 KiB grid");
    let cached = logs_resident(d.path());
    assert!(cached < large / 16, "{cached} bytes cached after reading {large} bytes of large records");
    for e in (0..n).step_by(2) {
        check(&s, 6, e..e + 1, size(e));
    }
}

/// A large record damaged on the disk reads as corrupt, not as other bytes.
#[test]
fn a_damaged_large_record_reads_as_corrupt() {
    let d = tempfile::tempdir().unwrap();
    let big = DIRECT_READ_BYTES + 5000;
    let at = {
        let s = open(d.path(), 16 << 20);
        s.write(&[entry(7, 0, 3000), entry(7, 1, big), entry(7, 2, 3000)], &[]).unwrap();
        s.flush().unwrap();
        s.inner.location(7, 1).unwrap().unwrap()
    };
    let f =
        std::fs::OpenOptions::new().read(true).write(true).open(d.path().join("logs").join(log_name(at.log))).unwrap();
    let mut b = [0u8; 1];
    let off = at.offset + at.len as u64 - 100;
    f.read_exact_at(&mut b, off).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], off).unwrap();
    f.sync_all().unwrap();
    let s = open(d.path(), 16 << 20);
    assert!(
        matches!(s.get_entry(7, 1), Err(BookieError::Corrupt { ledger: 7, entry: 1 })),
        "{:?}",
        s.get_entry(7, 1).map(|e| e.map(|e| e.payload.len()))
    );
    check(&s, 7, 0..1, 3000);
    check(&s, 7, 2..3, 3000);
}

/// Flips one byte near the end of the record of `ledger`/`entry` on the disk.
fn damage(dir: &Path, at: Location) {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(dir.join("logs").join(log_name(at.log))).unwrap();
    let mut b = [0u8; 1];
    let off = at.offset + at.len as u64 - 100;
    f.read_exact_at(&mut b, off).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], off).unwrap();
    f.sync_all().unwrap();
}

/// Entries whose records lie next to each other are read with one read per run of up to
/// `MAX_RUN_BYTES` (direct for large runs, also of small records), byte for byte. A damaged
/// record in a run reads as corrupt and its neighbours still read; entries still in memory
/// read too.
#[test]
fn adjacent_records_are_read_at_once() {
    let d = tempfile::tempdir().unwrap();
    let size = |e: i64| if e % 4 == 0 { 400_000 + e as usize } else { 2000 + e as usize * 7 };
    let n = 100i64;
    let total: u64 = (0..n).map(|e| size(e) as u64).sum();
    assert!(total > MAX_RUN_BYTES && total < 3 * MAX_RUN_BYTES, "{total}");
    let damaged = {
        let s = open(d.path(), 64 << 20);
        for e in 0..n {
            s.write(&[entry(9, e, size(e))], &[]).unwrap();
        }
        s.flush().unwrap();
        s.inner.location(9, 41).unwrap().unwrap()
    };
    let ids: Vec<i64> = (0..n).collect();
    let reads = |s: &EntryLogStorage| s.inner.file_reads.load(Ordering::Relaxed);
    let same = |s: &EntryLogStorage, got: Vec<Result<Option<StoredEntry>>>, bad: Option<i64>| {
        assert_eq!(got.len(), ids.len());
        for (e, r) in ids.iter().zip(got) {
            match r {
                Err(BookieError::Corrupt { ledger: 9, entry }) if Some(entry) == bad => {}
                Ok(Some(x)) => assert_eq!(x.payload, payload(9, *e, size(*e)), "entry {e}"),
                other => panic!("entry {e}: {:?}", other.map(|x| x.map(|x| x.payload.len()))),
            }
        }
        let _ = s;
    };
    let s = open(d.path(), 64 << 20);
    evict_logs(d.path());
    let before = reads(&s);
    same(&s, s.get_entries(9, &ids, usize::MAX), None);
    let runs = reads(&s) - before;
    assert!(runs <= 3, "{n} adjacent entries ({total} bytes) took {runs} reads");
    assert!(logs_resident(d.path()) < total / 16, "read through the page cache");
    drop(s);

    damage(d.path(), damaged);
    let s = open(d.path(), 64 << 20);
    let before = reads(&s);
    same(&s, s.get_entries(9, &ids, usize::MAX), Some(41));
    // The runs once, then the damaged record alone (three tries: it may have moved).
    let taken = reads(&s) - before;
    assert!(taken <= runs + 3, "a damaged record made the reads {taken}, against {runs} without it");
    drop(s);

    // Entries written without a flush: the run's part already in the file is read at once,
    // the rest from memory.
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), 64 << 20);
    for e in 0..n {
        s.write(&[entry(9, e, size(e))], &[]).unwrap();
    }
    same(&s, s.get_entries(9, &ids, usize::MAX), None);
}

/// A payload stored by reference goes to the file as soon as the writer is idle, before any
/// sync asks for it (the sync on the add's path then has less to wait for), and a second one
/// stored while the first is being written follows without a sync too.
#[test]
fn references_are_written_without_waiting_for_a_sync() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), 16 << 20);
    // The writer held at its first write, so the second reference comes while it is busy.
    let held = s.inner.gate.lock().unwrap();
    let refs: Vec<Location> = (0..2)
        .map(|e| {
            let at = s.write_ref(&entry(4, e, 100_000)).unwrap().unwrap();
            Location::decode(&at).unwrap()
        })
        .collect();
    drop(held);
    let started = std::time::Instant::now();
    while refs.iter().any(|at| Inner::in_memory(&s.inner.lock(), *at).is_some()) {
        assert!(started.elapsed() < Duration::from_secs(10), "still only in memory, waiting for a sync");
        std::thread::sleep(Duration::from_millis(5));
    }
    s.sync_refs().unwrap()().unwrap();
    s.index_refs(&[(4, 0, refs[0].encode()), (4, 1, refs[1].encode())]).unwrap();
    check(&s, 4, 0..2, 100_000);
}

/// Runs `f` on a thread of its own; whether it finished within `within`.
fn finishes_within<T: Send + 'static>(within: Duration, f: impl FnOnce() -> T + Send + 'static) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = f();
        let _ = tx.send(());
        r
    });
    rx.recv_timeout(within).is_ok()
}

/// Neither a reference sync's fdatasync nor a read from a file holds the store's state lock:
/// payloads go on being stored while either waits for the disk (before, every add storing a
/// payload, and the writer, waited out each sync and each read of a record from a file).
#[test]
fn payloads_are_stored_while_a_sync_or_a_read_waits_for_the_disk() {
    let d = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(open(d.path(), 16 << 20));
    let at = Location::decode(&s.write_ref(&entry(4, 0, 100_000)).unwrap().unwrap()).unwrap();
    let store = |s: &std::sync::Arc<EntryLogStorage>, e: i64| {
        let s = s.clone();
        move || s.write_ref(&entry(4, e, 100_000)).unwrap().unwrap()
    };
    // The sync thread held at its fdatasync.
    let held = s.inner.sync_gate.lock().unwrap();
    let finish = s.sync_refs().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(finishes_within(Duration::from_secs(5), store(&s, 1)), "storing waited for the sync");
    drop(held);
    finish().unwrap();
    s.index_refs(&[(4, 0, at.encode())]).unwrap();

    // A read held before it reads the file.
    let held = s.inner.read_gate.lock().unwrap();
    let reader = s.clone();
    let read = std::thread::spawn(move || reader.get_entry(4, 0).unwrap().unwrap());
    std::thread::sleep(Duration::from_millis(200));
    assert!(finishes_within(Duration::from_secs(5), store(&s, 2)), "storing waited for the read");
    drop(held);
    assert_eq!(read.join().unwrap().payload, payload(4, 0, 100_000));
}

/// A buffer the writer can no longer be given fails the store: a flush then reports it rather
/// than waiting forever for a write that will never come.
#[test]
fn a_buffer_the_writer_never_gets_fails_the_store() {
    let d = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(open(d.path(), 16 << 20));
    s.write(&[entry(1, 0, 1000)], &[]).unwrap();
    // As if the writer had died.
    s.inner.lock().tx = None;
    assert!(s.write_ref(&entry(1, 1, 100_000)).is_err());
    let flushed = s.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(flushed.flush().is_err()));
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true), "the flush hung or succeeded");
}

/// A payload stored by reference that fills the buffer goes with it; the writer does not send
/// the block carried over from it a second time when its write ends.
#[test]
fn a_reference_that_filled_the_buffer_is_not_sent_again() {
    let d = tempfile::tempdir().unwrap();
    let s = open(d.path(), 16 << 20);
    let held = s.inner.gate.lock().unwrap();
    let at = Location::decode(&s.write_ref(&entry(4, 0, CHUNK + 100)).unwrap().unwrap()).unwrap();
    let sent = s.inner.lock().next_seq;
    drop(held);
    let started = std::time::Instant::now();
    while !s.inner.lock().inflight.is_empty() {
        assert!(started.elapsed() < Duration::from_secs(10), "not written");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(s.inner.lock().next_seq, sent, "a buffer was sent again");
    s.sync_refs().unwrap()().unwrap();
    s.index_refs(&[(4, 0, at.encode())]).unwrap();
    check(&s, 4, 0..1, CHUNK + 100);
}

/// A reference sync that runs while a flush's fdatasync of the same logs fails acknowledges
/// nothing, though its own fdatasync succeeds: the kernel reports a write-back error to one
/// fdatasync of a file only, so the other one cannot tell the pages were lost. (Before, the
/// two ran side by side and the reference sync could finish before the flush recorded its
/// failure.)
#[test]
fn a_reference_sync_beside_a_failed_flush_acknowledges_nothing() {
    let d = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(open(d.path(), 16 << 20));
    s.write_ref(&entry(4, 0, 100_000)).unwrap().unwrap();
    // The flush's fdatasync fails and stops before its failure is recorded.
    let held = s.inner.failed_sync_gate.lock().unwrap();
    s.inner.fail_next_sync.store(true, Ordering::SeqCst);
    let flusher = s.clone();
    let flush = std::thread::spawn(move || flusher.flush());
    let started = std::time::Instant::now();
    while s.inner.fail_next_sync.load(Ordering::SeqCst) {
        assert!(started.elapsed() < Duration::from_secs(10), "the flush never synced");
        std::thread::sleep(Duration::from_millis(5));
    }
    s.write_ref(&entry(4, 1, 100_000)).unwrap().unwrap();
    let finish = s.sync_refs().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(finish().is_ok()));
    let early = rx.recv_timeout(Duration::from_millis(500));
    assert_ne!(early, Ok(true), "the reference sync acknowledged its payload beside a failed sync");
    drop(held);
    assert!(flush.join().unwrap().is_err());
    let outcome = match early {
        Ok(ok) => ok,
        Err(_) => rx.recv_timeout(Duration::from_secs(10)).expect("the reference sync hung"),
    };
    assert!(!outcome, "the reference sync succeeded after the flush's sync failed");
}
