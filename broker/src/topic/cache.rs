//! The topics' tail caches and the broker-wide budget they share.
//!
//! Each topic keeps the entries it appended last in memory, so that consumers that keep up
//! are served without reading from the bookies. As in Pulsar (`managedLedgerCacheSizeMB`,
//! `managedLedgerCacheEvictionTimeThresholdMillis`), the caches of all the broker's topics
//! share one budget of bytes, and an entry leaves a topic's cache when
//! - every subscription with a consumer has read past it ([`TailCache::evict_before`]),
//! - it is older than the age threshold ([`TailCache::evict_older_than`]), or
//! - the broker's caches together hold more than the budget: the topic that adds an entry
//!   then gives up its own oldest ones until they fit.
//!
//! A topic's cache is always a run of its newest entries: entries are added in order and leave
//! from the front. Catch-up reads rely on it (they stop where the cache begins).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::position::Pos;

/// The bytes all of a broker's tail caches may hold together.
#[derive(Debug)]
pub struct CacheBudget {
    limit: usize,
    used: AtomicUsize,
    evicted: AtomicU64,
}

impl CacheBudget {
    /// A budget of `limit` bytes (0: nothing is cached).
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(CacheBudget { limit, used: AtomicUsize::new(0), evicted: AtomicU64::new(0) })
    }

    /// Its size in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes the caches hold now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Entries that left a cache to keep the caches within the budget, since the start (not
    /// those that left because they were read or aged). A growing count under steady load
    /// says the budget is too small for the topics' rates.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    fn over(&self) -> bool {
        self.used() > self.limit
    }
}

/// One topic's cache: its newest entries by position, each with its size and when it came.
pub(crate) struct TailCache<V> {
    entries: BTreeMap<Pos, (V, usize, Instant)>,
    bytes: usize,
    budget: Arc<CacheBudget>,
}

impl<V> TailCache<V> {
    /// An empty cache drawing on `budget`.
    pub fn new(budget: Arc<CacheBudget>) -> Self {
        TailCache { entries: BTreeMap::new(), bytes: 0, budget }
    }

    /// The entry at `p`, if cached.
    pub fn get(&self, p: &Pos) -> Option<&V> {
        self.entries.get(p).map(|(v, _, _)| v)
    }

    /// Whether `p` is cached.
    pub fn contains_key(&self, p: &Pos) -> bool {
        self.entries.contains_key(p)
    }

    /// Adds the entry at `p` (after every cached one) of `bytes` bytes, then gives up this
    /// cache's oldest entries while the broker's caches hold more than the budget.
    pub fn insert(&mut self, p: Pos, v: V, bytes: usize, now: Instant) {
        if self.budget.limit == 0 {
            return;
        }
        debug_assert!(self.entries.last_key_value().is_none_or(|(q, _)| *q < p), "cache entries come in order");
        if let Some((_, old, _)) = self.entries.insert(p, (v, bytes, now)) {
            self.release(old);
        }
        self.bytes += bytes;
        self.budget.used.fetch_add(bytes, Ordering::Relaxed);
        let mut evicted = 0;
        while self.budget.over() && self.pop_first() {
            evicted += 1;
        }
        if evicted > 0 {
            self.budget.evicted.fetch_add(evicted, Ordering::Relaxed);
        }
    }

    /// Removes every entry before `p`.
    pub fn evict_before(&mut self, p: Pos) {
        while self.entries.first_key_value().is_some_and(|(q, _)| *q < p) {
            self.pop_first();
        }
    }

    /// Removes the entries that came before `cutoff`.
    pub fn evict_older_than(&mut self, cutoff: Instant) {
        while self.entries.first_key_value().is_some_and(|(_, (_, _, at))| *at < cutoff) {
            self.pop_first();
        }
    }

    /// Removes every entry.
    pub fn clear(&mut self) {
        while self.pop_first() {}
    }

    fn pop_first(&mut self) -> bool {
        match self.entries.pop_first() {
            Some((_, (_, bytes, _))) => {
                self.release(bytes);
                true
            }
            None => false,
        }
    }

    fn release(&mut self, bytes: usize) {
        self.bytes -= bytes;
        self.budget.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

impl<V> Drop for TailCache<V> {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn keys(c: &TailCache<u32>) -> Vec<i64> {
        c.entries.keys().map(|p| p.entry_id).collect()
    }

    fn fill(c: &mut TailCache<u32>, ids: std::ops::Range<i64>, bytes: usize, at: Instant) {
        for e in ids {
            c.insert(Pos::new(1, e), e as u32, bytes, at);
        }
    }

    #[test]
    fn topics_share_the_budget_and_the_one_adding_gives_up_its_oldest() {
        let budget = CacheBudget::new(1000);
        let now = Instant::now();
        let (mut a, mut b) = (TailCache::new(budget.clone()), TailCache::new(budget.clone()));
        fill(&mut a, 0..6, 100, now);
        fill(&mut b, 0..4, 100, now);
        assert_eq!((budget.used(), budget.evicted()), (1000, 0));
        // Over the budget: b gives up its own oldest entries, a keeps all of its.
        fill(&mut b, 4..6, 100, now);
        assert_eq!(keys(&a), (0..6).collect::<Vec<_>>());
        assert_eq!(keys(&b), vec![2, 3, 4, 5]);
        assert_eq!((budget.used(), budget.evicted()), (1000, 2));
        assert_eq!(b.get(&Pos::new(1, 5)), Some(&5));
        assert!(!b.contains_key(&Pos::new(1, 1)));
        // A cache that goes away gives its bytes back.
        drop(a);
        assert_eq!(budget.used(), 400);
        assert_eq!(b.bytes, 400);
    }

    #[test]
    fn an_entry_larger_than_the_budget_is_not_kept() {
        let budget = CacheBudget::new(1000);
        let mut c = TailCache::new(budget.clone());
        fill(&mut c, 0..2, 300, Instant::now());
        c.insert(Pos::new(1, 2), 2, 1500, Instant::now());
        assert!(keys(&c).is_empty());
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_zero_budget_caches_nothing() {
        let budget = CacheBudget::new(0);
        let mut c = TailCache::new(budget.clone());
        fill(&mut c, 0..3, 10, Instant::now());
        assert!(keys(&c).is_empty());
        assert_eq!((budget.used(), budget.evicted()), (0, 0));
    }

    #[test]
    fn entries_leave_once_read_or_aged() {
        let budget = CacheBudget::new(1 << 20);
        let t0 = Instant::now();
        let mut c = TailCache::new(budget.clone());
        fill(&mut c, 0..5, 10, t0);
        fill(&mut c, 5..10, 10, t0 + Duration::from_millis(500));
        c.insert(Pos::new(2, 0), 20, 10, t0 + Duration::from_millis(900));
        c.evict_before(Pos::new(1, 3));
        assert_eq!(keys(&c), vec![3, 4, 5, 6, 7, 8, 9, 0]);
        c.evict_older_than(t0 + Duration::from_millis(500));
        assert_eq!(keys(&c), vec![5, 6, 7, 8, 9, 0]);
        c.evict_before(Pos::new(1, 10));
        assert_eq!(keys(&c), vec![0]);
        assert_eq!(budget.used(), 10);
        c.clear();
        assert_eq!((budget.used(), c.bytes, budget.evicted()), (0, 0, 0));
    }
}
