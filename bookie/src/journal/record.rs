//! Journal record codec (pure: no I/O).
//!
//! ```text
//! [len u32 LE][crc u32 LE][type u8][ledger u64 LE][entry i64 LE][lac i64 LE][data: len - 25 bytes]
//! ```
//! `len` counts the bytes after the CRC; `crc` is CRC32C over those bytes, seeded with the
//! segment's sequence number, so records left over in a recycled segment file from an earlier
//! use never verify. Record types:
//! - `ENTRY`: `data` = `[entry checksum u32 LE][payload]`;
//! - `FENCE`: no data;
//! - `MASTER_KEY`: `data` = the ledger's master key (written before its first entry);
//! - `SEGMENT_END`: no data; the writer moved to the next segment (written when it fits);
//! - `ENTRY_REF`: `data` = `[entry checksum u32 LE][where the entry store put the payload, 20
//!   bytes]` (a large payload written once, to the entry store; see [`crate::journal`]);
//! - `SYNCED`: no data; `entry` = an offset of this segment before which every record was
//!   durable (synced, its adds acknowledged) when this one was written. Replay tells damage
//!   to a durable record from a torn unsynced tail by it (see [`crate::journal::replay`]).

/// Bytes before the record body.
pub const HEADER: usize = 8;
/// Fixed part of the body.
pub const BODY_FIXED: usize = 1 + 8 + 8 + 8;

/// Record type of an entry.
pub const ENTRY: u8 = 1;
/// Record type of a fence.
pub const FENCE: u8 = 2;
/// Record type of a master key.
pub const MASTER_KEY: u8 = 3;
/// Record type that ends a segment the writer rolled away from (what follows is unused).
pub const SEGMENT_END: u8 = 4;
/// Record type of an entry whose payload the entry store holds.
pub const ENTRY_REF: u8 = 5;
/// Record type saying how much of the segment was durable when it was written.
pub const SYNCED: u8 = 6;

/// A decoded record, borrowing its data from the segment.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Record<'a> {
    /// Record type.
    pub kind: u8,
    /// Ledger id.
    pub ledger: u64,
    /// Entry id (entries), else -1.
    pub entry: i64,
    /// LAC piggybacked on the add, else -1.
    pub lac: i64,
    /// Type-specific data.
    pub data: &'a [u8],
}

/// The CRC seed of a segment.
fn seed(segment: u64) -> u32 {
    crc32c::crc32c(&segment.to_le_bytes())
}

/// Appends one record to `out`.
pub fn encode(out: &mut Vec<u8>, segment: u64, kind: u8, ledger: u64, entry: i64, lac: i64, data: &[&[u8]]) {
    encode_head(out, segment, kind, ledger, entry, lac, data, &[]);
}

/// Appends a record whose data is `head` followed by `tail`, without copying `tail`: the caller
/// writes `tail`'s bytes to the segment right after what this appended (a vectored write), so
/// large payloads go from the request buffer to the file in one copy.
#[allow(clippy::too_many_arguments)]
pub fn encode_head(
    out: &mut Vec<u8>,
    segment: u64,
    kind: u8,
    ledger: u64,
    entry: i64,
    lac: i64,
    head: &[&[u8]],
    tail: &[u8],
) {
    let data_len: usize = head.iter().map(|d| d.len()).sum::<usize>() + tail.len();
    let len = (BODY_FIXED + data_len) as u32;
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.push(kind);
    out.extend_from_slice(&ledger.to_le_bytes());
    out.extend_from_slice(&entry.to_le_bytes());
    out.extend_from_slice(&lac.to_le_bytes());
    for d in head {
        out.extend_from_slice(d);
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c_append(seed(segment), &out[start + HEADER..]), tail);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Encoded size of a record with `data_len` bytes of data.
pub fn encoded_len(data_len: usize) -> usize {
    HEADER + BODY_FIXED + data_len
}

/// What sits at one offset of a segment.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A valid record and its encoded length.
    Record(Record<'a>, usize),
    /// Zeros or too few bytes for a header: nothing was written here.
    End,
    /// A header whose record does not verify (short, bad length or bad CRC). `next` is where
    /// the following record would start if the length field can be believed.
    Bad {
        /// Why.
        reason: &'static str,
        /// Offset (relative to this one) of the following record, if the length is plausible.
        next: Option<usize>,
    },
}

/// Decodes the record at the start of `buf`. `max_len` bounds a believable body length.
pub fn decode(buf: &[u8], segment: u64, max_len: usize) -> Decoded<'_> {
    if buf.len() < HEADER {
        return Decoded::End;
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if len == 0 && crc == 0 {
        return Decoded::End;
    }
    if len < BODY_FIXED || len > max_len {
        return Decoded::Bad { reason: "implausible record length", next: None };
    }
    let next = HEADER + len;
    if buf.len() < next {
        return Decoded::Bad { reason: "record runs past the end of the segment", next: None };
    }
    let body = &buf[HEADER..next];
    if crc32c::crc32c_append(seed(segment), body) != crc {
        return Decoded::Bad { reason: "checksum mismatch", next: Some(next) };
    }
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&body[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let rec = Record {
        kind: body[0],
        ledger: u64_at(1),
        entry: u64_at(9) as i64,
        lac: u64_at(17) as i64,
        data: &body[BODY_FIXED..],
    };
    Decoded::Record(rec, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(segment: u64, entry: i64, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode(&mut v, segment, ENTRY, 7, entry, entry - 1, &[&1234u32.to_le_bytes(), payload]);
        v
    }

    #[test]
    fn round_trip() {
        let v = rec(3, 5, b"hello");
        assert_eq!(v.len(), encoded_len(9));
        match decode(&v, 3, 1 << 20) {
            Decoded::Record(r, n) => {
                assert_eq!(n, v.len());
                assert_eq!((r.kind, r.ledger, r.entry, r.lac), (ENTRY, 7, 5, 4));
                assert_eq!(&r.data[4..], b"hello");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_head_and_its_tail_decode_as_one_record() {
        let payload = [5u8; 3000];
        let mut v = Vec::new();
        encode_head(&mut v, 9, ENTRY, 7, 2, 1, &[&1234u32.to_le_bytes()], &payload);
        assert_eq!(v.len(), encoded_len(4));
        v.extend_from_slice(&payload);
        assert_eq!(v, rec(9, 2, &payload));
        match decode(&v, 9, 1 << 20) {
            Decoded::Record(r, n) => {
                assert_eq!(n, v.len());
                assert_eq!(&r.data[4..], &payload[..]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_record_from_another_segment_does_not_verify() {
        let v = rec(3, 5, b"hello");
        assert!(matches!(decode(&v, 4, 1 << 20), Decoded::Bad { reason: "checksum mismatch", .. }));
    }

    #[test]
    fn zeros_and_short_buffers_are_the_end() {
        assert_eq!(decode(&[0u8; 64], 1, 1 << 20), Decoded::End);
        assert_eq!(decode(&[1, 2, 3], 1, 1 << 20), Decoded::End);
    }

    #[test]
    fn truncation_and_bit_flips_are_bad() {
        let v = rec(1, 0, &[9u8; 100]);
        assert!(matches!(decode(&v[..v.len() - 1], 1, 1 << 20), Decoded::Bad { next: None, .. }));
        for bit in [8 * 8, 8 * 30, 8 * (v.len() - 1)] {
            let mut w = v.clone();
            w[bit / 8] ^= 1;
            assert!(matches!(decode(&w, 1, 1 << 20), Decoded::Bad { next: Some(_), .. }), "bit {bit}");
        }
        let mut w = v.clone();
        w[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&w, 1, 1 << 20), Decoded::Bad { next: None, .. }));
    }
}
