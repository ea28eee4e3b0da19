//! The bytes of entry logs: records, index values, aligned write buffers and a sequential
//! record scanner.

use std::fs::File;
use std::io::{BufReader, Read, Seek};

use bytes::Bytes;

use crate::error::{BookieError, Result};
use crate::storage::StoredEntry;

/// `MGEL`: marks the start of a record.
pub const MAGIC: u32 = 0x4c45_474d;
/// Record header: magic, payload length, ledger, entry, checksum.
pub const HEADER: usize = 4 + 4 + 8 + 8 + 4;
/// Alignment of direct writes (offset, length and memory).
pub const ALIGN: usize = 4096;

/// Appends one record to `out`.
pub fn encode(out: &mut AlignedBuf, ledger: u64, entry: i64, checksum: u32, payload: &[u8]) {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[8..16].copy_from_slice(&ledger.to_le_bytes());
    h[16..24].copy_from_slice(&entry.to_le_bytes());
    h[24..28].copy_from_slice(&checksum.to_le_bytes());
    out.extend(&h);
    out.extend(payload);
}

/// A parsed record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub len: u32,
    pub ledger: u64,
    pub entry: i64,
    pub checksum: u32,
}

impl Header {
    /// `None` unless `b` starts with the magic.
    pub fn parse(b: &[u8]) -> Option<Header> {
        let b: &[u8; HEADER] = b.get(..HEADER)?.try_into().ok()?;
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        if u32_at(0) != MAGIC {
            return None;
        }
        Some(Header { len: u32_at(4), ledger: u64_at(8), entry: u64_at(16) as i64, checksum: u32_at(24) })
    }

    /// Record size on disk.
    pub fn record_len(&self) -> u64 {
        HEADER as u64 + u64::from(self.len)
    }
}

/// Checks that `rec` is the whole record of `(ledger, entry)` and its payload matches its
/// checksum; the payload is returned without a copy.
pub fn decode(rec: impl Into<Bytes>, ledger: u64, entry: i64) -> Result<StoredEntry> {
    let rec: Bytes = rec.into();
    let corrupt = BookieError::Corrupt { ledger, entry };
    let Some(h) = Header::parse(&rec) else { return Err(corrupt) };
    if h.ledger != ledger || h.entry != entry || h.record_len() != rec.len() as u64 {
        return Err(corrupt);
    }
    StoredEntry::verified(ledger, entry, h.checksum, rec.slice(HEADER..))
}

/// Where a record lives: log id, offset, record length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub log: u64,
    pub offset: u64,
    pub len: u32,
}

impl Location {
    /// Index value: `[log u64 LE][offset u64 LE][len u32 LE]`.
    pub fn encode(&self) -> [u8; 20] {
        let mut v = [0u8; 20];
        v[..8].copy_from_slice(&self.log.to_le_bytes());
        v[8..16].copy_from_slice(&self.offset.to_le_bytes());
        v[16..].copy_from_slice(&self.len.to_le_bytes());
        v
    }

    /// Parses [`Location::encode`]'s output.
    pub fn decode(v: &[u8]) -> Option<Location> {
        let v: &[u8; 20] = v.try_into().ok()?;
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        a.copy_from_slice(&v[..8]);
        b.copy_from_slice(&v[8..16]);
        Some(Location {
            log: u64::from_le_bytes(a),
            offset: u64::from_le_bytes(b),
            len: u32::from_le_bytes([v[16], v[17], v[18], v[19]]),
        })
    }
}

/// A byte buffer whose start is [`ALIGN`]-aligned in memory, for direct writes.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
    cap: usize,
}

impl AlignedBuf {
    /// A zeroed buffer holding up to `cap` bytes (rounded up to the alignment).
    pub fn new(cap: usize) -> Self {
        let cap = round_up(cap.max(ALIGN));
        let raw = vec![0u8; cap + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN).min(ALIGN);
        AlignedBuf { raw, start, len: 0, cap }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn room(&self) -> usize {
        self.cap - self.len
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends `b`; the caller checked [`Self::room`].
    pub fn extend(&mut self, b: &[u8]) {
        let at = self.start + self.len;
        self.raw[at..at + b.len()].copy_from_slice(b);
        self.len += b.len();
    }

    /// The bytes written.
    pub fn data(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    /// Zeroes the rest of the last aligned block.
    pub fn zero_pad(&mut self) {
        let end = self.start + round_up(self.len);
        self.raw[self.start + self.len..end].fill(0);
    }

    /// The aligned blocks written so far (padded by [`Self::zero_pad`]).
    pub fn written_blocks(&self) -> &[u8] {
        &self.raw[self.start..self.start + round_up(self.len)]
    }
}

/// `n` rounded up to the alignment.
pub fn round_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// `n` rounded down to the alignment.
pub fn round_down(n: u64) -> u64 {
    n / ALIGN as u64 * ALIGN as u64
}

/// Reads records one after another from an offset until the bytes stop looking like one
/// (no magic, or a length past `limit`) or `limit` is reached.
pub struct Scanner {
    r: BufReader<File>,
    pos: u64,
    limit: u64,
}

/// Largest payload a record can hold (the largest entry a bookie can be configured to take).
pub const MAX_PAYLOAD: u32 = 64 << 20;

impl Scanner {
    /// Starts at `from`, reads no further than `limit`.
    pub fn new(file: File, from: u64, limit: u64) -> std::io::Result<Scanner> {
        let mut r = BufReader::with_capacity(4 << 20, file);
        r.seek(std::io::SeekFrom::Start(from))?;
        Ok(Scanner { r, pos: from, limit })
    }

    /// The offset after the last record returned.
    #[cfg(test)]
    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// The next record's offset and header; its payload is read into `payload` when given,
    /// skipped otherwise. `None` at the end.
    pub fn next(&mut self, payload: Option<&mut Vec<u8>>) -> std::io::Result<Option<(u64, Header)>> {
        if self.pos + HEADER as u64 > self.limit {
            return Ok(None);
        }
        let mut h = [0u8; HEADER];
        match self.r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let Some(header) = Header::parse(&h) else { return Ok(None) };
        if header.len > MAX_PAYLOAD || self.pos + header.record_len() > self.limit {
            return Ok(None);
        }
        match payload {
            Some(p) => {
                p.resize(header.len as usize, 0);
                match self.r.read_exact(p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                    Err(e) => return Err(e),
                }
            }
            None => self.r.seek_relative(i64::from(header.len))?,
        }
        let at = self.pos;
        self.pos += header.record_len();
        Ok(Some((at, header)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn records_and_locations_round_trip() {
        let mut b = AlignedBuf::new(10);
        assert_eq!(b.capacity(), ALIGN);
        assert_eq!(b.data().as_ptr() as usize % ALIGN, 0);
        let sum = crate::checksum::entry_checksum(3, 4, b"hello");
        encode(&mut b, 3, 4, sum, b"hello");
        let got = decode(b.data().to_vec(), 3, 4).unwrap();
        assert_eq!((got.checksum, &got.payload[..]), (sum, &b"hello"[..]));
        assert!(matches!(decode(b.data().to_vec(), 3, 5), Err(BookieError::Corrupt { .. })));
        assert!(matches!(decode(b.data()[..HEADER + 2].to_vec(), 3, 4), Err(BookieError::Corrupt { .. })));
        let mut flipped = b.data().to_vec();
        flipped[HEADER] ^= 1;
        assert!(matches!(decode(flipped, 3, 4), Err(BookieError::Corrupt { .. })));
        b.zero_pad();
        assert_eq!(b.written_blocks().len(), ALIGN);
        let l = Location { log: 7, offset: 1 << 40, len: 99 };
        assert_eq!(Location::decode(&l.encode()), Some(l));
        assert_eq!(Location::decode(&[0u8; 19]), None);
    }

    #[test]
    fn the_scanner_stops_where_records_stop() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        let mut b = AlignedBuf::new(1 << 16);
        encode(&mut b, 1, 0, 0, b"abc");
        encode(&mut b, 1, 1, 0, &[9u8; 1000]);
        let end = b.len() as u64;
        b.zero_pad();
        std::fs::write(&p, b.written_blocks()).unwrap();
        let mut s = Scanner::new(File::open(&p).unwrap(), 0, u64::MAX).unwrap();
        let mut payload = Vec::new();
        let (at, h) = s.next(Some(&mut payload)).unwrap().unwrap();
        assert_eq!((at, h.entry, &payload[..]), (0, 0, &b"abc"[..]));
        let (at, h) = s.next(None).unwrap().unwrap();
        assert_eq!((at, h.entry, h.len), (HEADER as u64 + 3, 1, 1000));
        assert!(s.next(None).unwrap().is_none(), "zero padding is not a record");
        assert_eq!(s.pos(), end);
        let mut s = Scanner::new(File::open(&p).unwrap(), 0, HEADER as u64 + 3).unwrap();
        assert!(s.next(None).unwrap().is_some());
        assert!(s.next(None).unwrap().is_none(), "the limit ends the scan");
    }
}
