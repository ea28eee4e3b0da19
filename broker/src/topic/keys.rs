//! Key_Shared routing: the sticky key of an entry, its hash (Murmur3 32-bit, seed 0, masked
//! to 31 bits, modulo 65536 — the slots Pulsar users give in sticky hash ranges), and the
//! selector that maps a slot to a consumer: explicit ranges (sticky mode) or a consistent-hash
//! ring that splits the slots among consumers automatically (auto-split mode).

use std::collections::BTreeMap;

use crate::protocol::pb;

/// Number of hash slots.
pub const HASH_RANGE: u32 = 65536;
/// The key of messages that carry none.
pub const NONE_KEY: &[u8] = b"NONE_KEY";
/// Points per consumer on the consistent-hash ring.
const RING_POINTS: u32 = 100;

/// Murmur3 x86 32-bit.
pub fn murmur3_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mut h = seed;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = chunks.remainder();
    let mut k = 0u32;
    for (i, b) in tail.iter().enumerate() {
        k |= (*b as u32) << (8 * i);
    }
    if !tail.is_empty() {
        h ^= k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    }
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The slot of a key.
pub fn slot(key: &[u8]) -> u32 {
    (murmur3_32(key, 0) & 0x7fff_ffff) % HASH_RANGE
}

/// The sticky key of an entry: its ordering key, else its partition key, else [`NONE_KEY`].
pub fn sticky_key(md: &pb::MessageMetadata) -> Vec<u8> {
    if let Some(k) = md.ordering_key.as_ref().filter(|k| !k.is_empty()) {
        return k.to_vec();
    }
    if let Some(k) = md.partition_key.as_ref().filter(|k| !k.is_empty()) {
        return k.as_bytes().to_vec();
    }
    NONE_KEY.to_vec()
}

/// Maps slots to consumers (by an opaque id).
#[derive(Debug, Default)]
pub struct KeySelector {
    /// Auto-split ring: point → consumer.
    ring: BTreeMap<u32, u64>,
    /// Sticky ranges: (start, end inclusive) → consumer.
    ranges: Vec<(u32, u32, u64)>,
}

/// Why a consumer cannot join.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// A sticky range is outside 0..65536 or reversed.
    #[error("hash range {0}..={1} is not within 0..{HASH_RANGE}")]
    BadRange(u32, u32),
    /// A sticky range overlaps another consumer's.
    #[error("hash range {0}..={1} overlaps another consumer's")]
    Overlap(u32, u32),
}

impl KeySelector {
    /// Adds a consumer: with `ranges` (sticky) it owns them; otherwise it takes points on the
    /// ring derived from its name and id.
    pub fn add(&mut self, id: u64, name: &str, ranges: &[(u32, u32)]) -> Result<(), SelectorError> {
        if !ranges.is_empty() {
            for &(a, b) in ranges {
                if a > b || b >= HASH_RANGE {
                    return Err(SelectorError::BadRange(a, b));
                }
                if self.ranges.iter().any(|&(x, y, _)| a <= y && x <= b) {
                    return Err(SelectorError::Overlap(a, b));
                }
            }
            self.ranges.extend(ranges.iter().map(|&(a, b)| (a, b, id)));
            return Ok(());
        }
        for i in 0..RING_POINTS {
            let mut point = slot(format!("{name}{id}{i}").as_bytes());
            // Keep points unique so no consumer silently loses one.
            while self.ring.contains_key(&point) {
                point = (point + 1) % HASH_RANGE;
            }
            self.ring.insert(point, id);
        }
        Ok(())
    }

    /// Removes a consumer.
    pub fn remove(&mut self, id: u64) {
        self.ring.retain(|_, c| *c != id);
        self.ranges.retain(|r| r.2 != id);
    }

    /// The consumer for `slot`, if any owns it.
    pub fn select(&self, slot: u32) -> Option<u64> {
        if let Some(r) = self.ranges.iter().find(|r| r.0 <= slot && slot <= r.1) {
            return Some(r.2);
        }
        self.ring.range(slot..).next().or_else(|| self.ring.iter().next()).map(|(_, c)| *c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur3_matches_reference_values() {
        assert_eq!(murmur3_32(b"", 0), 0);
        assert_eq!(murmur3_32(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_32(b"test", 0), 0xba6b_d213);
        assert_eq!(murmur3_32(b"Hello, world!", 0), 0xc036_3e43);
        assert_eq!(murmur3_32(b"The quick brown fox jumps over the lazy dog", 0), 0x2e4f_f723);
    }

    #[test]
    fn auto_split_spreads_keys_and_keeps_them_sticky() {
        let mut s = KeySelector::default();
        for id in 0..3 {
            s.add(id, "c", &[]).unwrap_or_else(|e| panic!("{e}"));
        }
        let mut counts = [0u32; 3];
        let mut first = Vec::new();
        for k in 0..3000 {
            let c = s.select(slot(format!("key-{k}").as_bytes())).unwrap_or(99);
            counts[c as usize] += 1;
            first.push(c);
        }
        assert!(counts.iter().all(|n| *n > 300), "{counts:?}");
        s.remove(1);
        for (k, was) in first.iter().enumerate() {
            let now = s.select(slot(format!("key-{k}").as_bytes())).unwrap_or(99);
            if *was != 1 {
                assert_eq!(now, *was, "keys of remaining consumers stay put");
            } else {
                assert_ne!(now, 1);
            }
        }
    }

    #[test]
    fn sticky_ranges_are_checked() {
        let mut s = KeySelector::default();
        assert!(s.add(1, "a", &[(0, 32767)]).is_ok());
        assert_eq!(s.add(2, "b", &[(32000, 65535)]), Err(SelectorError::Overlap(32000, 65535)));
        assert_eq!(s.add(2, "b", &[(40000, 70000)]), Err(SelectorError::BadRange(40000, 70000)));
        assert!(s.add(2, "b", &[(32768, 65535)]).is_ok());
        assert_eq!(s.select(10), Some(1));
        assert_eq!(s.select(40000), Some(2));
    }
}
