//! Journal replay at start-up: re-applies every record after the last checkpoint to the entry
//! store, so a bookie killed at any moment comes back with every entry it acknowledged.
//!
//! Replay is idempotent (it rewrites entries and states to the same values). Where a
//! segment's records stop verifying (a bad record, or zeros where a record header should be):
//! - if a later `SYNCED` record of the segment, however far on, says that offset was durable,
//!   it is damage in the middle of the journal. Replay refuses to continue and the bookie does
//!   not start, naming the file and offset, because acknowledged entries may be there. The
//!   writer starts each batch with a `SYNCED` record when more of the segment became durable,
//!   so a record is proven durable by the batches written after its sync;
//! - otherwise nothing from there on was covered by a completed sync, so nothing there was
//!   acknowledged, and replay stops: the torn tail of the last write before a crash, or the
//!   unsynced tail of a power loss, whose pages the disk may have written in any order (a
//!   later one on disk, an earlier one not; valid records may follow the damage). Dropping a
//!   tail is logged and counted.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use bytes::Bytes;

use super::record::{self, Decoded};
use super::segment::list_segments;
use super::Position;
use crate::error::{BookieError, Result};
use crate::storage::{EntryWrite, LedgerMeta, LedgerStorage};

/// What a replay did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplayStats {
    /// Records applied.
    pub records: u64,
    /// Segments read.
    pub segments: u64,
    /// Torn tails dropped.
    pub torn_tails: u64,
    /// Highest segment sequence seen (0 if none).
    pub last_segment: u64,
    /// Highest segment sequence in which replay read a valid record (0 if none).
    pub last_used: u64,
    /// `ENTRY_REF` records whose payload the entry store does not hold: adds whose group was
    /// still syncing when the bookie stopped (never acknowledged), or of ledgers deleted since.
    pub missing_refs: u64,
}

impl ReplayStats {
    /// The segment the journal writes next after replaying from `from`: the one after the last
    /// segment holding records, or `from`'s own segment when nothing was written in it. Files
    /// prepared for later segments and never used are written over, so no unused segment ever
    /// precedes a used one, and replay can tell a segment whose first record was damaged from
    /// one that was never used.
    pub fn next_segment(&self, from: Position) -> u64 {
        (self.last_used + 1).max(from.segment + u64::from(from.offset > 0)).max(1)
    }
}

/// Replays `dir` from `from` into `storage`. The caller flushes the store once every journal is
/// replayed, not before: a flush lets the store reuse logs that held nothing indexed when it
/// opened, and another journal's references may point into them.
pub fn replay(dir: &Path, from: Position, storage: &dyn LedgerStorage, max_record: usize) -> Result<ReplayStats> {
    let mut stats = ReplayStats::default();
    let mut metas: HashMap<u64, LedgerMeta> = HashMap::new();
    let mut entries: Vec<EntryWrite> = Vec::new();
    let mut pending_bytes = 0usize;
    // A torn tail is legitimate only in the last segment that holds records: the journal syncs
    // a segment before writing to the next one.
    let mut torn: Option<(String, u64, &'static str)> = None;
    // A segment replayed from its start that holds no record: only the last one may be so
    // (see `ReplayStats::next_segment`); before a segment with records, its first record was
    // damaged, and everything in it may have been acknowledged.
    let mut unused: Option<String> = None;
    for (seq, path) in list_segments(dir)? {
        stats.last_segment = stats.last_segment.max(seq);
        if seq < from.segment {
            continue;
        }
        stats.segments += 1;
        let from_start = seq != from.segment || from.offset == 0;
        let file = File::open(&path).map_err(|e| BookieError::io(format!("opening {}", path.display()), e))?;
        let len = file.metadata().map_err(|e| BookieError::io(format!("reading {}", path.display()), e))?.len();
        if len == 0 {
            if from_start {
                unused = Some(path.display().to_string());
            }
            continue;
        }
        let map = map_file(&file).map_err(|e| BookieError::io(format!("mapping {}", path.display()), e))?;
        let mut off = if seq == from.segment { from.offset as usize } else { 0 };
        let mut records_here = 0u64;
        let corrupt = |offset: usize, reason: String| BookieError::CorruptJournal {
            file: path.display().to_string(),
            offset: offset as u64,
            reason,
        };
        while off < map.len() {
            match record::decode(&map[off..], seq, max_record) {
                Decoded::Record(r, _) if r.kind == record::SEGMENT_END => break,
                Decoded::Record(r, n) if r.kind == record::SYNCED => {
                    later_records(&mut torn, &mut unused)?;
                    records_here += 1;
                    off += n;
                }
                Decoded::Record(r, n) => {
                    later_records(&mut torn, &mut unused)?;
                    if !apply(&r, storage, &mut metas, &mut entries)? {
                        stats.missing_refs += 1;
                    }
                    pending_bytes += n;
                    stats.records += 1;
                    records_here += 1;
                    off += n;
                    if pending_bytes > 64 << 20 {
                        storage.write(&entries, &[])?;
                        entries.clear();
                        pending_bytes = 0;
                    }
                }
                Decoded::End => {
                    if proven_durable(&map, off, seq, max_record) {
                        return Err(corrupt(
                            off,
                            "zeroed record header where a later record shows it was durable".into(),
                        ));
                    }
                    if valid_record_within(&map, off + 1, seq, max_record) {
                        let reason = "zeroed record header followed by records written before it was durable";
                        tracing::warn!(file = %path.display(), offset = off, reason, "dropping the unsynced tail of a journal segment");
                        stats.torn_tails += 1;
                        torn = Some((path.display().to_string(), off as u64, reason));
                    }
                    break;
                }
                // Too little room left for any record: the writer rolled without a marker.
                Decoded::Bad { .. } if map.len() - off < record::encoded_len(0) => break,
                Decoded::Bad { reason, next } => {
                    if proven_durable(&map, off, seq, max_record) {
                        return Err(corrupt(off, format!("{reason}, where a later record shows it was durable")));
                    }
                    let followed = next
                        .map(|n| off + n)
                        .filter(|n| *n < map.len())
                        .is_some_and(|n| matches!(record::decode(&map[n..], seq, max_record), Decoded::Record(..)));
                    let followed = followed || valid_record_within(&map, off + 1, seq, max_record);
                    if !followed && (off == 0 || records_here == 0 && seq != from.segment) {
                        // Nothing of this segment's own: a recycled file prepared for the
                        // next roll (old records do not verify under the new number), or a
                        // first write torn by a crash. Neither was acknowledged.
                        tracing::debug!(file = %path.display(), "journal segment holds no records");
                    } else {
                        tracing::warn!(file = %path.display(), offset = off, reason, "dropping the torn tail of a journal segment");
                        stats.torn_tails += 1;
                        torn = Some((path.display().to_string(), off as u64, reason));
                    }
                    break;
                }
            }
        }
        if records_here > 0 {
            stats.last_used = seq;
        } else if from_start {
            unused = Some(path.display().to_string());
        }
    }
    if stats.missing_refs > 0 {
        tracing::info!(
            records = stats.missing_refs,
            "journal records point at payloads the entry store does not hold (adds never acknowledged, or ledgers deleted)"
        );
    }
    let states: Vec<(u64, LedgerMeta)> = metas.into_iter().collect();
    storage.write(&entries, &states)?;
    Ok(stats)
}

/// A record was read after a torn tail or a segment without records: either was damage.
fn later_records(torn: &mut Option<(String, u64, &'static str)>, unused: &mut Option<String>) -> Result<()> {
    if let Some((file, offset, reason)) = torn.take() {
        return Err(BookieError::CorruptJournal {
            file,
            offset,
            reason: format!("{reason}, and a later segment holds records"),
        });
    }
    if let Some(file) = unused.take() {
        return Err(BookieError::CorruptJournal {
            file,
            offset: 0,
            reason: "no record verifies at the start of the segment, and a later segment holds records".into(),
        });
    }
    Ok(())
}

/// Applies one record; false for an `ENTRY_REF` whose payload is not there.
fn apply(
    r: &record::Record<'_>,
    storage: &dyn LedgerStorage,
    metas: &mut HashMap<u64, LedgerMeta>,
    entries: &mut Vec<EntryWrite>,
) -> Result<bool> {
    let meta = match metas.entry(r.ledger) {
        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => {
            v.insert(storage.ledger_meta(r.ledger)?.unwrap_or_else(|| LedgerMeta::new(&[])))
        }
    };
    match r.kind {
        record::ENTRY => {
            if r.data.len() < 4 {
                return Err(BookieError::Invalid("journal entry record without a checksum"));
            }
            let checksum = u32::from_le_bytes([r.data[0], r.data[1], r.data[2], r.data[3]]);
            meta.lac = meta.lac.max(r.lac);
            entries.push(EntryWrite {
                ledger: r.ledger,
                entry: r.entry,
                checksum,
                payload: Bytes::copy_from_slice(&r.data[4..]),
            });
        }
        record::ENTRY_REF => {
            let Some((sum, at)) = r.data.split_first_chunk::<4>() else {
                return Err(BookieError::Invalid("journal entry reference without a checksum"));
            };
            let Ok(at) = <&crate::storage::EntryRef>::try_from(at) else {
                return Err(BookieError::Invalid("journal entry reference of the wrong size"));
            };
            meta.lac = meta.lac.max(r.lac);
            return storage.adopt_ref(r.ledger, r.entry, u32::from_le_bytes(*sum), at);
        }
        record::FENCE => meta.fenced = true,
        record::MASTER_KEY => {
            if meta.master_key.is_empty() {
                meta.master_key = r.data.to_vec();
            }
        }
        _ => return Err(BookieError::Invalid("unknown journal record type")),
    }
    Ok(true)
}

/// How far past a damaged record replay looks for records that still verify.
const SCAN_WINDOW: usize = 1 << 20;

/// Whether a record of segment `seq` verifies anywhere in `map[from..from + SCAN_WINDOW]`:
/// damage that hides the next record's position (a bad length, a zeroed header, two damaged
/// records in a row) is still told apart from the end of the journal.
fn valid_record_within(map: &[u8], from: usize, seq: u64, max_record: usize) -> bool {
    let end = map.len().min(from.saturating_add(SCAN_WINDOW));
    (from..end).any(|pos| {
        let b = &map[pos..];
        if b.len() < record::HEADER + record::BODY_FIXED {
            return false;
        }
        let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        // Cheap plausibility first; the CRC only for headers that could be records.
        len >= record::BODY_FIXED
            && len <= max_record
            && record::HEADER + len <= b.len()
            && matches!(record::decode(b, seq, max_record), Decoded::Record(..))
    })
}

/// Whether a `SYNCED` record of segment `seq` past offset `at` of `map` says that `at` was
/// durable when it was written: the whole rest of the segment is searched, as a batch (and so
/// the next `SYNCED` record) can start anywhere after it.
fn proven_durable(map: &[u8], at: usize, seq: u64, max_record: usize) -> bool {
    let len = record::encoded_len(0);
    let Some(rest) = map.get(at + 1..) else { return false };
    // A `SYNCED` record has no data: its length field is the fixed body's. Searched for as
    // bytes (the rest of a segment, zeros or an earlier use's bytes, is mostly not that).
    let length_field = (record::BODY_FIXED as u32).to_le_bytes();
    memchr::memmem::find_iter(rest, &length_field).any(|pos| {
        rest.get(pos..pos + len).is_some_and(|b| {
            matches!(record::decode(b, seq, max_record),
                Decoded::Record(r, _) if r.kind == record::SYNCED && r.entry > at as i64)
        })
    })
}

/// Maps a segment for reading.
#[allow(unsafe_code)]
fn map_file(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: segments are written only by this bookie's journal, which is not running during
    // replay, and nothing truncates them while mapped; the map is dropped before the journal
    // starts.
    unsafe { memmap2::Mmap::map(file) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::checksum::entry_checksum;
    use crate::journal::segment::segment_path;
    use crate::storage::mem::MemStorage;

    /// Writes a segment of `records` as the journal would with each one synced before the
    /// next was written (a `SYNCED` record before each but the first); returns their offsets.
    fn write_segment(dir: &Path, seq: u64, records: &[(i64, &[u8])], pad: usize) -> Vec<usize> {
        let mut buf = Vec::new();
        let mut offsets = Vec::new();
        record::encode(&mut buf, seq, record::MASTER_KEY, 1, -1, -1, &[b"key"]);
        for (i, (e, p)) in records.iter().enumerate() {
            if i > 0 {
                let synced = buf.len() as i64;
                record::encode(&mut buf, seq, record::SYNCED, 0, synced, -1, &[]);
            }
            offsets.push(buf.len());
            record::encode(&mut buf, seq, record::ENTRY, 1, *e, *e - 1, &[&entry_checksum(1, *e, p).to_le_bytes(), p]);
        }
        buf.extend(std::iter::repeat_n(0u8, pad));
        std::fs::write(segment_path(dir, seq), &buf).unwrap();
        offsets
    }

    #[test]
    fn replays_entries_and_state() {
        let dir = tempfile::tempdir().unwrap();
        write_segment(dir.path(), 1, &[(0, b"a"), (1, b"b")], 100);
        let s = MemStorage::new();
        let stats = replay(dir.path(), Position { segment: 1, offset: 0 }, &s, 1 << 20).unwrap();
        assert_eq!(stats.records, 3);
        assert_eq!(&s.get_entry(1, 1).unwrap().unwrap().payload[..], b"b");
        let m = s.ledger_meta(1).unwrap().unwrap();
        assert_eq!((m.lac, &m.master_key[..]), (0, &b"key"[..]));
    }

    #[test]
    fn a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        write_segment(dir.path(), 1, &[(0, b"a"), (1, &[5u8; 300])], 0);
        let path = segment_path(dir.path(), 1);
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 10).unwrap();
        let s = MemStorage::new();
        let stats = replay(dir.path(), Position::default(), &s, 1 << 20).unwrap();
        assert_eq!((stats.records, stats.torn_tails), (2, 1));
        assert!(s.get_entry(1, 0).unwrap().is_some());
        assert!(s.get_entry(1, 1).unwrap().is_none());
    }

    #[test]
    fn a_corrupt_middle_record_stops_replay() {
        let dir = tempfile::tempdir().unwrap();
        let offs = write_segment(dir.path(), 1, &[(0, b"aaaa"), (1, b"bbbb"), (2, b"cccc")], 0);
        let path = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[offs[1] + 30] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let s = MemStorage::new();
        match replay(dir.path(), Position::default(), &s, 1 << 20) {
            Err(BookieError::CorruptJournal { offset, .. }) => assert_eq!(offset, offs[1] as u64),
            other => panic!("expected CorruptJournal, got {other:?}"),
        }
    }

    #[test]
    fn a_damaged_length_or_zeroed_header_in_the_middle_stops_replay() {
        for damage in [0usize, 1] {
            let dir = tempfile::tempdir().unwrap();
            let offs = write_segment(dir.path(), 1, &[(0, b"aaaa"), (1, b"bbbb"), (2, b"cccc")], 64);
            let path = segment_path(dir.path(), 1);
            let mut bytes = std::fs::read(&path).unwrap();
            match damage {
                // A length field claiming far more than the segment holds.
                0 => bytes[offs[1]..offs[1] + 4].copy_from_slice(&u32::MAX.to_le_bytes()),
                // A whole header zeroed.
                _ => bytes[offs[1]..offs[1] + 8].fill(0),
            }
            std::fs::write(&path, &bytes).unwrap();
            let s = MemStorage::new();
            assert!(
                matches!(replay(dir.path(), Position::default(), &s, 1 << 20), Err(BookieError::CorruptJournal { .. })),
                "damage {damage} must be reported"
            );
        }
    }

    /// A segment of a master key and `n` entries of 5000 bytes, with a `SYNCED` record before
    /// entry `synced_before` saying everything before it was durable; the entries' offsets.
    fn entries_synced_before(seq: u64, n: i64, synced_before: i64) -> (Vec<u8>, Vec<usize>) {
        let mut buf = Vec::new();
        record::encode(&mut buf, seq, record::MASTER_KEY, 1, -1, -1, &[b"key"]);
        let mut offs = Vec::new();
        for e in 0..n {
            if e == synced_before {
                let synced = buf.len() as i64;
                record::encode(&mut buf, seq, record::SYNCED, 0, synced, -1, &[]);
            }
            offs.push(buf.len());
            let p = vec![e as u8; 5000];
            record::encode(&mut buf, seq, record::ENTRY, 1, e, e - 1, &[&entry_checksum(1, e, &p).to_le_bytes(), &p]);
        }
        (buf, offs)
    }

    /// After a power loss the pages of the last, unsynced writes may have reached the disk in
    /// any order: a damaged record followed by valid ones that no `SYNCED` record proves
    /// durable is dropped with them (none was acknowledged), whatever the damage.
    #[test]
    fn an_unsynced_tail_written_out_of_order_is_dropped() {
        for damage in [0usize, 1, 2] {
            let dir = tempfile::tempdir().unwrap();
            let seq = 1;
            // Entry 0 synced; entries 1 to 3 written after, never synced.
            let (mut buf, offs) = entries_synced_before(seq, 4, 1);
            buf.extend(std::iter::repeat_n(0u8, 4096));
            match damage {
                // A page of entry 1 that never reached the disk, zeros there.
                0 => buf[offs[1] + 100..offs[1] + 4196].fill(0),
                // Its header zeroed.
                1 => buf[offs[1]..offs[1] + 8].fill(0),
                // A page holding an older use's bytes.
                _ => buf[offs[1]..offs[1] + 4096].fill(0x5a),
            }
            std::fs::write(segment_path(dir.path(), seq), &buf).unwrap();
            let s = MemStorage::new();
            let stats =
                replay(dir.path(), Position::default(), &s, 1 << 20).unwrap_or_else(|e| panic!("damage {damage}: {e}"));
            assert_eq!((stats.records, stats.torn_tails), (2, 1), "damage {damage}");
            assert!(s.get_entry(1, 0).unwrap().is_some());
            for e in 1..4 {
                assert!(s.get_entry(1, e).unwrap().is_none(), "damage {damage}: entry {e} replayed");
            }
            // The same damage where a later batch says entry 1 was durable is corruption.
            let synced = (offs[2]) as i64;
            let mut proven = buf[..offs[3]].to_vec();
            record::encode(&mut proven, seq, record::SYNCED, 0, synced, -1, &[]);
            proven.extend_from_slice(&buf[offs[3]..]);
            std::fs::write(segment_path(dir.path(), seq), &proven).unwrap();
            match replay(dir.path(), Position::default(), &MemStorage::new(), 1 << 20) {
                Err(BookieError::CorruptJournal { offset, .. }) => {
                    assert_eq!(offset, offs[1] as u64, "damage {damage}")
                }
                other => panic!("damage {damage}: expected CorruptJournal, got {other:?}"),
            }
        }
    }

    /// A deterministic pseudo-random sequence (SplitMix64).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A power loss leaves the writes issued after the last completed sync in any state, page
    /// by page: written, never written (zeros) or holding an earlier use's bytes. Whatever it
    /// leaves, replay starts, returns every entry synced before it byte for byte and, of the
    /// rest, only exact entries; damage to a synced record that a later batch's `SYNCED` record
    /// proves durable is reported instead.
    #[test]
    fn a_power_loss_leaves_a_replayable_journal() {
        let mut rng = Rng(11);
        let payload =
            |e: i64| -> Vec<u8> { (0..(e as usize * 1777) % 9000 + 1).map(|i| (i as i64 ^ e) as u8).collect() };
        for case in 0..150 {
            let seq = 1;
            let mut buf = Vec::new();
            record::encode(&mut buf, seq, record::MASTER_KEY, 1, -1, -1, &[b"key"]);
            let batches = 3 + rng.below(10) as usize;
            // Syncs completed through this batch; the ones after it were written, not synced.
            let last_synced = rng.below(batches as u64) as usize;
            let (mut e, mut durable_end, mut marked) = (0i64, 0usize, 0usize);
            let (mut synced_entries, mut entry_offs) = (0i64, Vec::new());
            let mut prev_end = buf.len();
            for b in 0..batches {
                // The writer marks what its completed syncs covered: through the batch before,
                // as long as syncs kept completing.
                let synced_at_write = if b <= last_synced + 1 { prev_end } else { durable_end };
                if b > 0 && synced_at_write > marked {
                    record::encode(&mut buf, seq, record::SYNCED, 0, synced_at_write as i64, -1, &[]);
                    marked = synced_at_write;
                }
                for _ in 0..1 + rng.below(5) {
                    entry_offs.push(buf.len());
                    let p = payload(e);
                    record::encode(
                        &mut buf,
                        seq,
                        record::ENTRY,
                        1,
                        e,
                        e - 1,
                        &[&entry_checksum(1, e, &p).to_le_bytes(), &p],
                    );
                    e += 1;
                }
                prev_end = buf.len();
                if b == last_synced {
                    durable_end = buf.len();
                    synced_entries = e;
                }
            }
            buf.extend(std::iter::repeat_n(0u8, 8192));
            let intact = buf.clone();
            // The loss: each page from the durable end on kept, never written, or stale.
            let mut page = durable_end;
            while page < buf.len() {
                let end = (page / 4096 + 1) * 4096;
                let end = end.min(buf.len());
                match rng.below(3) {
                    0 => buf[page..end].fill(0),
                    1 => buf[page..end].iter_mut().for_each(|b| *b = rng.next() as u8),
                    _ => {}
                }
                page = end;
            }
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(segment_path(dir.path(), seq), &buf).unwrap();
            let s = MemStorage::new();
            let stats = replay(dir.path(), Position::default(), &s, 1 << 20)
                .unwrap_or_else(|err| panic!("case {case}: a power loss must not stop start-up: {err}"));
            for x in 0..e {
                match s.get_entry(1, x).unwrap() {
                    Some(got) => assert_eq!(got.payload, payload(x), "case {case}: entry {x}"),
                    None => assert!(x >= synced_entries, "case {case}: synced entry {x} lost ({stats:?})"),
                }
            }
            // Damage to a synced record that a later `SYNCED` record covers is an error.
            let covered: Vec<usize> =
                entry_offs.iter().copied().take(synced_entries as usize).filter(|o| *o < marked).collect();
            if let Some(&victim) = covered.get(rng.below(covered.len().max(1) as u64) as usize) {
                let mut bad = intact.clone();
                bad[victim + 30] ^= 0x20;
                std::fs::write(segment_path(dir.path(), seq), &bad).unwrap();
                assert!(
                    matches!(
                        replay(dir.path(), Position::default(), &MemStorage::new(), 1 << 20),
                        Err(BookieError::CorruptJournal { .. })
                    ),
                    "case {case}: damage at {victim} before a SYNCED record for {marked} not reported"
                );
            }
        }
    }

    /// Durable records zeroed over more than replay's look-ahead (so no valid record follows
    /// the damage within it) are still reported: a `SYNCED` record further on says they were
    /// durable.
    #[test]
    fn a_long_damaged_stretch_before_a_synced_record_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let seq = 1;
        let (mut buf, offs) = entries_synced_before(seq, 301, 300);
        // Entries 1 to 299 zeroed; the `SYNCED` record before entry 300 stays.
        let marker = offs[300] - record::encoded_len(0);
        assert!(marker - offs[1] > SCAN_WINDOW);
        buf[offs[1]..marker].fill(0);
        std::fs::write(segment_path(dir.path(), seq), &buf).unwrap();
        match replay(dir.path(), Position::default(), &MemStorage::new(), 1 << 20) {
            Err(BookieError::CorruptJournal { offset, .. }) => assert_eq!(offset, offs[1] as u64),
            other => panic!("expected CorruptJournal, got {other:?}"),
        }
    }

    #[test]
    fn a_torn_tail_before_a_segment_with_records_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        write_segment(dir.path(), 1, &[(0, b"a"), (1, &[5u8; 300])], 0);
        write_segment(dir.path(), 2, &[(2, b"c")], 0);
        let path = segment_path(dir.path(), 1);
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 10).unwrap();
        let s = MemStorage::new();
        assert!(matches!(
            replay(dir.path(), Position::default(), &s, 1 << 20),
            Err(BookieError::CorruptJournal { .. })
        ));
    }

    #[test]
    fn a_segment_end_marker_hides_the_unused_rest() {
        let dir = tempfile::tempdir().unwrap();
        write_segment(dir.path(), 1, &[(0, b"a")], 0);
        let path = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        record::encode(&mut bytes, 1, record::SEGMENT_END, 0, -1, -1, &[]);
        bytes.extend_from_slice(&[0xab; 200]);
        std::fs::write(&path, &bytes).unwrap();
        write_segment(dir.path(), 2, &[(1, b"b")], 0);
        let s = MemStorage::new();
        let stats = replay(dir.path(), Position::default(), &s, 1 << 20).unwrap();
        // Master key + entry in each segment; the marker is not a record to apply.
        assert_eq!((stats.records, stats.torn_tails), (4, 0));
        assert!(s.get_entry(1, 1).unwrap().is_some());
    }

    #[test]
    fn a_prepared_segment_with_old_records_is_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        write_segment(dir.path(), 1, &[(0, b"a")], 0);
        // Segment 2 is a recycled file still holding records written as segment 1.
        let stale = std::fs::read(segment_path(dir.path(), 1)).unwrap();
        std::fs::write(segment_path(dir.path(), 2), &stale).unwrap();
        let s = MemStorage::new();
        let stats = replay(dir.path(), Position::default(), &s, 1 << 20).unwrap();
        assert_eq!((stats.records, stats.torn_tails, stats.last_segment), (2, 0, 2));
    }

    #[test]
    fn replay_starts_at_the_checkpoint_and_skips_older_segments() {
        let dir = tempfile::tempdir().unwrap();
        write_segment(dir.path(), 1, &[(0, b"old")], 0);
        let offs = write_segment(dir.path(), 2, &[(1, b"x"), (2, b"y")], 0);
        let s = MemStorage::new();
        let stats = replay(dir.path(), Position { segment: 2, offset: offs[1] as u64 }, &s, 1 << 20).unwrap();
        assert_eq!(stats.records, 1);
        assert_eq!(stats.last_segment, 2);
        assert!(s.get_entry(1, 0).unwrap().is_none());
        assert!(s.get_entry(1, 1).unwrap().is_none());
        assert!(s.get_entry(1, 2).unwrap().is_some());
    }

    /// A segment whose start does not verify, with nothing after it to show it was used, is
    /// an unused (prepared) segment only when it is the last one: a restarted journal writes
    /// over such a file rather than past it. Before a segment holding records it is damage,
    /// and the whole segment (its records may all have been acknowledged) is not skipped.
    #[test]
    fn a_segment_without_records_before_one_with_records_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        write_segment(dir.path(), 1, &[(0, b"a")], 0);
        // Segment 2: one large entry whose header was zeroed; nothing verifies for 2 MiB.
        let big = vec![7u8; 2 << 20];
        let mut buf = Vec::new();
        record::encode(&mut buf, 2, record::ENTRY, 1, 1, 0, &[&entry_checksum(1, 1, &big).to_le_bytes(), &big]);
        buf[..8].fill(0);
        std::fs::write(segment_path(dir.path(), 2), &buf).unwrap();
        let s = MemStorage::new();
        // As the last segment, it reads as unused, and the journal goes on in it.
        let stats = replay(dir.path(), Position::default(), &s, 4 << 20).unwrap();
        assert_eq!((stats.last_used, stats.last_segment), (1, 2));
        assert_eq!(stats.next_segment(Position::default()), 2);
        // Followed by a segment with records, it is damage.
        write_segment(dir.path(), 3, &[(2, b"c")], 0);
        match replay(dir.path(), Position::default(), &MemStorage::new(), 4 << 20) {
            Err(BookieError::CorruptJournal { file, offset: 0, .. }) => {
                assert_eq!(file, segment_path(dir.path(), 2).display().to_string())
            }
            other => panic!("expected CorruptJournal in segment 2, got {other:?}"),
        }
    }

    /// Where the journal goes on after a replay: after the last segment with records, in the
    /// checkpoint's segment when nothing was written there, never back into a segment the
    /// checkpoint is partway through.
    #[test]
    fn the_next_segment_follows_the_last_one_used() {
        let stats = |last_used| ReplayStats { last_used, last_segment: 9, ..Default::default() };
        assert_eq!(stats(4).next_segment(Position { segment: 2, offset: 100 }), 5);
        assert_eq!(stats(0).next_segment(Position { segment: 3, offset: 0 }), 3);
        assert_eq!(stats(0).next_segment(Position { segment: 3, offset: 100 }), 4);
        assert_eq!(stats(0).next_segment(Position::default()), 1);
    }
}
