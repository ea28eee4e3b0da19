//! Tail read cache: the most recently written entries, so readers that keep up with writers
//! (the common case for a broker's tail reads and for recovery) never touch RocksDB.
//! Bounded in bytes; the oldest insertions go first.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use super::StoredEntry;

struct Inner {
    map: HashMap<(u64, i64), StoredEntry>,
    order: VecDeque<(u64, i64)>,
    bytes: usize,
}

/// A FIFO cache of entries bounded by payload bytes.
pub struct TailCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

impl TailCache {
    /// A cache holding at most `capacity` payload bytes (0: off).
    pub fn new(capacity: usize) -> Self {
        TailCache { inner: Mutex::new(Inner { map: HashMap::new(), order: VecDeque::new(), bytes: 0 }), capacity }
    }

    /// Adds an entry, evicting the oldest ones over capacity.
    pub fn insert(&self, ledger: u64, entry: i64, e: StoredEntry) {
        if e.payload.len() > self.capacity {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.bytes += e.payload.len();
        if let Some(old) = g.map.insert((ledger, entry), e) {
            g.bytes -= old.payload.len();
        } else {
            g.order.push_back((ledger, entry));
        }
        while g.bytes > self.capacity {
            let Some(k) = g.order.pop_front() else { break };
            if let Some(old) = g.map.remove(&k) {
                g.bytes -= old.payload.len();
            }
        }
    }

    /// A cached entry.
    pub fn get(&self, ledger: u64, entry: i64) -> Option<StoredEntry> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).map.get(&(ledger, entry)).cloned()
    }

    /// Drops a ledger's entries.
    pub fn remove_ledger(&self, ledger: u64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let keys: Vec<(u64, i64)> = g.map.keys().filter(|(l, _)| *l == ledger).copied().collect();
        for k in keys {
            if let Some(old) = g.map.remove(&k) {
                g.bytes -= old.payload.len();
            }
        }
        g.order.retain(|(l, _)| *l != ledger);
    }

    /// Payload bytes held.
    pub fn bytes(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(n: usize) -> StoredEntry {
        StoredEntry { checksum: 0, payload: bytes::Bytes::from(vec![0u8; n]) }
    }

    #[test]
    fn evicts_oldest_over_capacity() {
        let c = TailCache::new(100);
        c.insert(1, 0, e(40));
        c.insert(1, 1, e(40));
        c.insert(1, 2, e(40));
        assert!(c.get(1, 0).is_none());
        assert!(c.get(1, 1).is_some() && c.get(1, 2).is_some());
        assert_eq!(c.bytes(), 80);
        c.remove_ledger(1);
        assert_eq!(c.bytes(), 0);
        c.insert(2, 0, e(101));
        assert!(c.get(2, 0).is_none());
    }
}
