//! Tail read cache: the most recently written entries, so readers that keep up with writers
//! (the common case for a broker's tail reads and for recovery) never touch RocksDB.
//!
//! Bounded in bytes, oldest out first, and never a long pause: the journal writer inserts
//! every entry it writes, so one slow insert holds up every add behind it. A single hash map
//! evicting one entry per insert could not promise that: at 100-byte entries a 64 MiB cache
//! holds about 400,000 of them, and the map rehashes them all whenever it grows or its
//! deleted slots run out (up to 100 ms per insert, measured under load). So entries go into
//! [`GENERATIONS`] maps filled one after another; when the newest is full, the oldest
//! (by then empty) becomes the newest, keeping its allocation, so after the first round no map
//! grows again.
//!
//! Emptying a generation at once was a pause too: dropping its 25,000 entries of 100 bytes took
//! 5–9 ms, six times a second at 150,000 adds/s, and every add queued meanwhile waited for it.
//! So the oldest generation is drained a little on every insert instead, by twice the insert's
//! bytes (at most [`MAX_DRAIN_STEPS`] entries), which empties it before the newest generation
//! fills unless entries far bigger than the drained ones fill it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

use super::StoredEntry;

/// How many maps the capacity is split over.
pub const GENERATIONS: usize = 16;

/// The size of the chunks small payloads are copied into (at most a generation's bytes).
pub const ARENA_BYTES: usize = 1 << 20;

/// The most entries one insert drains. A large entry arriving while the oldest generation
/// holds many small ones drains at most this many; the rotation empties what is left.
const MAX_DRAIN_STEPS: usize = 256;

/// Bytes charged per entry on top of its payload: the map slot, its place in the insertion
/// order, the payload's handle. Without it, a cache of tiny entries would hold several times
/// its capacity in memory.
pub const ENTRY_OVERHEAD: usize = 64;

type Key = (u64, i64);

#[derive(Default)]
struct Generation {
    /// Keyed by a fast hasher seeded per process: every add inserts here, on the journal
    /// writer's thread, and SipHash showed among its costliest steps.
    map: HashMap<Key, StoredEntry, foldhash::fast::RandomState>,
    /// Keys in the order they were first inserted into this generation, for draining.
    order: Vec<Key>,
    bytes: usize,
}

struct Inner {
    /// Newest at the back; the front one is being drained.
    gens: VecDeque<Generation>,
    bytes: usize,
    /// How much of the front generation's `order` is drained.
    drained: usize,
    /// Where copied payloads go (see [`TailCache::insert_copy`]).
    arena: BytesMut,
}

impl Inner {
    /// Removes the front generation's oldest entries, at least `budget` bytes' worth (each
    /// step counts at least [`ENTRY_OVERHEAD`], so the work is bounded), but never its last
    /// entry: `HashMap::clear` skips an empty map, which would keep the slots that removals
    /// marked deleted, and the map would rehash once they run out. With one entry left, the
    /// rotation's `clear` resets the whole table cheaply.
    fn drain(&mut self, mut budget: usize) {
        let Some(oldest) = self.gens.front_mut() else { return };
        let mut freed = 0;
        let end = oldest.order.len().min(self.drained + MAX_DRAIN_STEPS);
        while budget > 0 && oldest.map.len() > 1 && self.drained < end {
            let key = oldest.order[self.drained];
            self.drained += 1;
            let charged = oldest.map.remove(&key).map_or(0, |e| charge(&e));
            freed += charged;
            budget = budget.saturating_sub(charged.max(ENTRY_OVERHEAD));
        }
        oldest.bytes -= freed;
        self.bytes -= freed;
    }
}

/// A FIFO cache of entries bounded by bytes (payloads plus [`ENTRY_OVERHEAD`] each).
pub struct TailCache {
    inner: Mutex<Inner>,
    capacity: usize,
    /// Bytes one generation takes before the next one starts.
    per_gen: usize,
}

fn charge(e: &StoredEntry) -> usize {
    e.payload.len() + ENTRY_OVERHEAD
}

impl TailCache {
    /// A cache holding at most `capacity` bytes (0: off).
    pub fn new(capacity: usize) -> Self {
        let gens = (0..GENERATIONS).map(|_| Generation::default()).collect();
        TailCache {
            inner: Mutex::new(Inner { gens, bytes: 0, drained: 0, arena: BytesMut::new() }),
            capacity,
            per_gen: capacity.div_ceil(GENERATIONS).max(1),
        }
    }

    /// Adds an entry (replacing an older copy's place in lookups), draining the oldest
    /// generation by twice its size and starting a new generation when the newest is full.
    pub fn insert(&self, ledger: u64, entry: i64, e: StoredEntry) {
        if charge(&e) > self.per_gen {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.insert_locked(&mut g, ledger, entry, e);
    }

    /// Adds a copy of a small payload, so that the cache does not keep alive the (much larger)
    /// request buffer it is a slice of. Copies go one after another into shared chunks of
    /// [`ARENA_BYTES`], not into an allocation each: the journal writer copies every small
    /// payload it writes, and at 100 B to 1 KiB entries a `malloc` per copy and a `free` per
    /// eviction were a sixth of its time. A chunk is freed once its last entry is evicted (and
    /// no reader holds one); entries leave in the order they came, a chunk's together.
    pub fn insert_copy(&self, ledger: u64, entry: i64, checksum: u32, payload: &[u8]) {
        if payload.len() + ENTRY_OVERHEAD > self.per_gen {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.arena.capacity() - g.arena.len() < payload.len() {
            // Small caches get small chunks: chunks held by cached entries count against
            // nothing.
            g.arena = BytesMut::with_capacity(ARENA_BYTES.min(self.per_gen).max(payload.len()));
        }
        g.arena.extend_from_slice(payload);
        let copy: Bytes = g.arena.split().freeze();
        self.insert_locked(&mut g, ledger, entry, StoredEntry { checksum, payload: copy });
    }

    fn insert_locked(&self, g: &mut Inner, ledger: u64, entry: i64, e: StoredEntry) {
        let size = charge(&e);
        g.drain(2 * size);
        let newest_full = g.gens.back().is_some_and(|n| n.bytes + size > self.per_gen);
        if newest_full {
            // Normally drained down to one entry by now; entries of very different sizes
            // can leave more, which go here.
            if let Some(mut oldest) = g.gens.pop_front() {
                g.bytes -= oldest.bytes;
                oldest.map.clear();
                oldest.order.clear();
                oldest.bytes = 0;
                g.gens.push_back(oldest);
                g.drained = 0;
            }
        }
        let Some(newest) = g.gens.back_mut() else { return };
        let replaced = match newest.map.insert((ledger, entry), e) {
            Some(old) => charge(&old),
            // A rewrite keeps its key's first place in the order: one place per entry.
            None => {
                newest.order.push((ledger, entry));
                0
            }
        };
        newest.bytes = newest.bytes + size - replaced;
        g.bytes = g.bytes + size - replaced;
    }

    /// A cached entry (the newest copy).
    pub fn get(&self, ledger: u64, entry: i64) -> Option<StoredEntry> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.gens.iter().rev().find_map(|gen| gen.map.get(&(ledger, entry))).cloned()
    }

    /// Whether an entry is cached.
    pub fn contains(&self, ledger: u64, entry: i64) -> bool {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.gens.iter().any(|gen| gen.map.contains_key(&(ledger, entry)))
    }

    /// Drops a ledger's entries.
    pub fn remove_ledger(&self, ledger: u64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut freed = 0;
        for gen in g.gens.iter_mut() {
            let before = gen.bytes;
            gen.map.retain(|(l, _), e| {
                if *l == ledger {
                    gen.bytes -= charge(e);
                }
                *l != ledger
            });
            freed += before - gen.bytes;
        }
        g.bytes -= freed;
    }

    /// Bytes held (payloads plus the per-entry overhead).
    pub fn bytes(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }

    /// The configured capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn e(n: usize, fill: u8) -> StoredEntry {
        StoredEntry { checksum: 0, payload: bytes::Bytes::from(vec![fill; n]) }
    }

    /// Room for exactly `per_gen_entries` entries of `n` payload bytes per generation.
    fn cache(n: usize, per_gen_entries: usize) -> TailCache {
        TailCache::new(GENERATIONS * per_gen_entries * (n + ENTRY_OVERHEAD))
    }

    #[test]
    fn keeps_the_newest_and_evicts_the_oldest_generation_first() {
        let c = cache(36, 4);
        let total = (GENERATIONS * 4) as i64;
        for i in 0..total {
            c.insert(1, i, e(36, i as u8));
        }
        // Full: the oldest generation is being drained as the newest fills; everything newer
        // is there.
        assert!((4..total).all(|i| c.get(1, i).is_some()));
        assert!(c.get(1, 0).is_none());
        assert!(c.bytes() <= c.capacity());
        // One more starts a new generation: the oldest four go, nothing else.
        c.insert(1, total, e(36, 0));
        assert!((0..4).all(|i| c.get(1, i).is_none()));
        assert!((4..=total).all(|i| c.get(1, i).is_some()));
        assert_eq!(c.bytes(), (total as usize - 3) * 100);
        // A long run keeps the byte bound and the most recent entries.
        for i in total + 1..20 * total {
            c.insert(2, i, e(36, 1));
            assert!(c.bytes() <= c.capacity(), "over capacity after {i}");
        }
        assert!(c.get(2, 20 * total - 1).is_some());
        assert!(c.get(2, 20 * total - (GENERATIONS as i64 - 1) * 4).is_some());
        assert!(c.get(1, total).is_none());
    }

    /// Eviction empties a whole generation and reuses its map: after one round through all of
    /// them no map allocates again (growing a map is what rehashes everything in it). The map
    /// being drained is left out: slots its removals marked deleted count against its
    /// `capacity()` until the rotation's `clear`.
    #[test]
    fn after_the_first_round_no_map_grows() {
        let c = cache(100, 1000);
        let round = (GENERATIONS * 1000) as i64;
        let capacities = |c: &TailCache| -> Vec<usize> {
            let g = c.inner.lock().unwrap_or_else(|e| e.into_inner());
            let mut caps: Vec<usize> = g.gens.iter().skip(1).map(|gen| gen.map.capacity()).collect();
            caps.sort_unstable();
            caps
        };
        for i in 0..round + 1 {
            c.insert(1, i, e(100, 0));
        }
        let warm = capacities(&c);
        assert!(warm.iter().all(|&cap| cap >= 1000), "{warm:?}");
        for i in round + 1..4 * round {
            c.insert(1 + (i % 3) as u64, i, e(100, 0));
        }
        assert_eq!(capacities(&c), warm);
        // Right after a rotation, the newest map holds one entry in the room it had before.
        let mut i = 4 * round;
        while c.inner.lock().unwrap_or_else(|e| e.into_inner()).gens.back().map(|g| g.map.len()) != Some(1) {
            c.insert(9, i, e(100, 0));
            i += 1;
        }
        let g = c.inner.lock().unwrap_or_else(|e| e.into_inner());
        assert!(g.gens.back().is_some_and(|n| n.map.capacity() >= 1000), "the emptied map kept its allocation");
    }

    /// Entries held, over every generation.
    fn held_entries(c: &TailCache) -> usize {
        c.inner.lock().unwrap_or_else(|e| e.into_inner()).gens.iter().map(|gen| gen.map.len()).sum()
    }

    /// The charges of the entries held, summed from the maps themselves.
    fn held_bytes(c: &TailCache) -> usize {
        let g = c.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.gens.iter().flat_map(|gen| gen.map.values()).map(charge).sum()
    }

    /// No insert evicts more than a few entries: the oldest generation is drained as the
    /// newest fills, not emptied at once (which paused the journal writer for milliseconds).
    #[test]
    fn eviction_is_spread_over_inserts() {
        let c = cache(36, 1000);
        let round = (GENERATIONS * 1000) as i64;
        let mut before = 0;
        for i in 0..4 * round {
            c.insert(1, i, e(36, 0));
            let n = held_entries(&c);
            // One new entry, at most two drained and one left over at a rotation.
            assert!(n + 3 > before, "insert {i} evicted {} entries", before + 1 - n);
            assert!(c.bytes() <= c.capacity());
            if i % 1009 == 0 {
                assert_eq!(held_bytes(&c), c.bytes());
            }
            before = n;
        }
        // The newest fourteen generations' worth is always there.
        let last = 4 * round - 1;
        assert!((last - 14 * 1000..=last).all(|i| c.get(1, i).is_some()));
        assert!(c.get(1, last - round).is_none());
    }

    /// Big entries filling the newest generation faster than small ones drain from the oldest:
    /// the rest of the oldest goes when the newest is full, and the accounting stays exact.
    #[test]
    fn mixed_sizes_keep_the_byte_bound_and_the_accounting() {
        // 1000 small entries or two big ones per generation; a big insert drains at most
        // MAX_DRAIN_STEPS small ones, so rotations find hundreds left.
        let c = cache(36, 1000);
        let mut biggest_drop = 0;
        for i in 0..60_000i64 {
            let n = if (i / 20_000) % 2 == 0 { 36 } else { 40_000 };
            let before = held_entries(&c);
            c.insert(1 + (i % 5) as u64, i, e(n, 0));
            if i % 7 == 0 {
                // Rewrites land in the newest generation, sometimes twice in a row.
                c.insert(1 + (i % 5) as u64, i, e(n, 1));
            }
            biggest_drop = biggest_drop.max((before + 1).saturating_sub(held_entries(&c)));
            if n > 36 || i % 101 == 0 {
                assert_eq!(held_bytes(&c), c.bytes(), "after {i}");
            }
            assert!(c.bytes() <= c.capacity(), "over capacity after {i}");
        }
        assert!(biggest_drop > MAX_DRAIN_STEPS, "no rotation found leftovers ({biggest_drop})");
        assert_eq!(c.get(1 + (59_999 % 5) as u64, 59_999).map(|x| x.payload[0]), Some(0));
        c.remove_ledger(1);
        assert_eq!(held_bytes(&c), c.bytes());
    }

    /// Copies share chunks: they read back byte for byte, one after another, and a chunk is
    /// released by the cache once all of its entries are evicted.
    #[test]
    fn copies_share_chunks_and_free_them_when_evicted() {
        let c = cache(100, 8000);
        let request = Bytes::from(vec![7u8; 100 * 64]);
        for i in 0..64usize {
            c.insert_copy(1, i as i64, i as u32, &request[i * 100..(i + 1) * 100]);
        }
        let a = c.get(1, 0).unwrap();
        let b = c.get(1, 63).unwrap();
        assert_eq!((a.checksum, &a.payload[..]), (0, &[7u8; 100][..]));
        assert_eq!((b.checksum, &b.payload[..]), (63, &[7u8; 100][..]));
        // One chunk holds them all, back to back, and not in the request's buffer.
        assert_eq!(b.payload.as_ptr() as usize - a.payload.as_ptr() as usize, 63 * 100);
        let req = request.as_ptr() as usize..request.as_ptr() as usize + request.len();
        assert!(!req.contains(&(a.payload.as_ptr() as usize)));
        // A payload that does not fit the chunk's rest starts another.
        let n = ARENA_BYTES / 3000 + 10;
        for i in 0..n {
            c.insert_copy(2, i as i64, 0, &[i as u8; 3000]);
        }
        let got: Vec<StoredEntry> = (0..n).map(|i| c.get(2, i as i64).unwrap()).collect();
        assert!(got
            .iter()
            .enumerate()
            .all(|(i, x)| x.payload.len() == 3000 && x.payload.iter().all(|&v| v == i as u8)));
        let adjacent =
            |x: &StoredEntry, y: &StoredEntry| y.payload.as_ptr() as usize == x.payload.as_ptr() as usize + 3000;
        let breaks = got.windows(2).filter(|w| !adjacent(&w[0], &w[1])).count();
        assert_eq!(breaks, 1, "one new chunk");
        drop((b, got));
        // The first chunk is shared by the cache's entries until they are all evicted; then
        // only this reader's copy holds it, intact.
        assert!(!a.payload.is_unique());
        for i in 0..(GENERATIONS * 8000) as i64 {
            c.insert(3, i, e(100, 0));
        }
        assert!(c.get(1, 0).is_none() && c.get(2, 0).is_none());
        assert!(a.payload.is_unique());
        assert_eq!(&a.payload[..], &[7u8; 100][..]);
    }

    /// Small caches get chunks no bigger than a generation.
    #[test]
    fn chunks_are_at_most_a_generation() {
        let c = cache(100, 4);
        for i in 0..3 {
            c.insert_copy(1, i, 0, &[1u8; 100]);
        }
        let g = c.inner.lock().unwrap_or_else(|e| e.into_inner());
        assert!(g.arena.capacity() + 300 <= c.per_gen, "{} left in a chunk", g.arena.capacity());
    }

    /// Rewrites of an entry keep one place in the order, so draining stays spread over inserts.
    #[test]
    fn rewrites_keep_one_place_in_the_order() {
        let c = cache(36, 1000);
        for round in 0..20u8 {
            for i in 0..100 {
                c.insert(1, i, e(36, round));
            }
        }
        let g = c.inner.lock().unwrap_or_else(|e| e.into_inner());
        let newest = g.gens.back().unwrap();
        assert_eq!((newest.map.len(), newest.order.len()), (100, 100));
        drop(g);
        assert_eq!(c.get(1, 99).map(|x| x.payload[0]), Some(19));
    }

    #[test]
    fn a_rewritten_entry_reads_back_its_newest_copy() {
        let c = cache(36, 4);
        c.insert(7, 0, e(36, 1));
        for i in 1..10 {
            c.insert(7, i, e(36, 2));
        }
        c.insert(7, 0, e(36, 3));
        assert_eq!(c.get(7, 0).map(|s| s.payload[0]), Some(3));
        // Rewriting within the newest generation replaces it in place.
        let before = c.bytes();
        c.insert(7, 0, e(36, 4));
        assert_eq!((c.get(7, 0).map(|s| s.payload[0]), c.bytes()), (Some(4), before));
    }

    #[test]
    fn removing_a_ledger_frees_its_bytes_everywhere() {
        let c = cache(36, 4);
        for i in 0..40 {
            c.insert(i % 2, i as i64, e(36, 0));
        }
        c.remove_ledger(0);
        assert_eq!(c.bytes(), 20 * 100);
        assert!((0..40).filter(|i| i % 2 == 0).all(|i| c.get(0, i).is_none()));
        assert!((0..40).filter(|i| i % 2 == 1).all(|i| c.get(1, i).is_some()));
        c.remove_ledger(1);
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn entries_larger_than_a_generation_and_a_zero_capacity_are_not_cached() {
        let c = cache(36, 4);
        c.insert(1, 0, e(4 * 100, 0));
        assert!(c.get(1, 0).is_none());
        assert_eq!(c.bytes(), 0);
        let off = TailCache::new(0);
        off.insert(1, 0, e(1, 0));
        assert!(off.get(1, 0).is_none());
        assert_eq!(off.bytes(), 0);
    }
}
