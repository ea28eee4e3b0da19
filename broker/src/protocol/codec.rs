//! Pulsar frame codec. Pure: encodes into a caller's `BytesMut`, decodes from `&[u8]`; no I/O.
//!
//! ```text
//! simple:  [totalSize u32 BE][commandSize u32 BE][BaseCommand]
//! payload: [totalSize][commandSize][BaseCommand]
//!          ([0x0e02 u16][size u32][BrokerEntryMetadata])?      MESSAGE only, opt-in clients
//!          [0x0e01 u16][crc32c u32][metadataSize u32][MessageMetadata][payload]
//! ```
//! `totalSize` counts everything after itself; the CRC32C covers from `metadataSize` to the end.
//! Every declared size is checked against the bytes present and against the frame limit before
//! anything is allocated; a frame larger than the limit is an error without reading it.
//!
//! A client batch (`num_messages_in_batch` > 1 or set) is the payload
//! `([size u32][SingleMessageMetadata][payload_size bytes])*`; the broker stores it as one entry.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

use super::pb;

/// Magic number before the checksum of a payload frame.
pub const MAGIC_CRC32C: u16 = 0x0e01;
/// Magic number before broker entry metadata.
pub const MAGIC_BROKER_ENTRY_METADATA: u16 = 0x0e02;
/// Pulsar's default largest message (5 MiB), advertised in CONNECTED.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 5 * 1024 * 1024;
/// Room for the command and headers on top of the largest message.
pub const FRAME_HEADROOM: usize = 64 * 1024;
/// Room for a stored entry's metadata on top of the largest message (clients bound only the
/// payload): a larger entry is refused with `NotAllowedError`. Consumers' frame decoders take
/// `max_message_size` + 10 KiB (Pulsar's frame padding), which must hold the entry and its
/// MESSAGE command. Bookies must take entries of `max_message_size` plus this (their default
/// `max_entry_bytes` is 5 MiB + 16 KiB).
pub const ENTRY_HEADROOM: usize = 8 * 1024;

/// A decoding failure. Each is answered by closing the connection, except
/// [`CodecError::ChecksumMismatch`] on SEND, which the broker answers with `ChecksumError`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    /// The frame declares more bytes than allowed.
    #[error("frame of {size} bytes exceeds the limit of {limit}")]
    FrameTooLarge {
        /// Declared size.
        size: usize,
        /// Limit.
        limit: usize,
    },
    /// Sizes inside the frame do not add up.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    /// The command does not decode.
    #[error("undecodable command: {0}")]
    BadCommand(String),
    /// The payload's checksum does not match. The frame itself is intact: `consumed` bytes
    /// are skipped and the command (a SEND) is answered with `ChecksumError`.
    #[error("payload checksum mismatch")]
    ChecksumMismatch {
        /// Length of the whole frame.
        consumed: usize,
        /// The frame's command (`None` when decoding a payload on its own).
        command: Option<Box<pb::BaseCommand>>,
    },
}

/// The payload part of a SEND or MESSAGE frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Payload {
    /// Broker entry metadata, when present.
    pub broker_entry_metadata: Option<pb::BrokerEntryMetadata>,
    /// Message metadata.
    pub metadata: pb::MessageMetadata,
    /// The payload after the metadata (a whole batch for batched messages).
    pub data: Bytes,
    /// `[metadataSize][MessageMetadata][payload]` exactly as received: what a ledger entry
    /// stores, so dispatch needs no re-encoding.
    pub entry: Bytes,
    /// The CRC32C of `entry` the frame carried, verified (all clients since protocol v6 send
    /// one): dispatch sends it on instead of computing it again.
    pub checksum: Option<u32>,
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// The command.
    pub command: pb::BaseCommand,
    /// The payload of SEND and MESSAGE.
    pub payload: Option<Payload>,
}

fn be_u32(b: &[u8]) -> usize {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
}

/// The length of the frame at the front of `buf` once all of it is there (`Ok(None)`: more
/// bytes are needed). Its declared size is checked against `max_frame` first.
pub fn frame_len(buf: &[u8], max_frame: usize) -> Result<Option<usize>, CodecError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let total = be_u32(buf);
    if total > max_frame {
        return Err(CodecError::FrameTooLarge { size: total, limit: max_frame });
    }
    if total < 4 {
        return Err(CodecError::Malformed("total size smaller than the command size field"));
    }
    Ok((buf.len() >= 4 + total).then_some(4 + total))
}

/// Decodes one whole frame (as measured by [`frame_len`]). The payload is sliced out of
/// `frame`, not copied.
pub fn decode_frame(frame: Bytes) -> Result<Frame, CodecError> {
    let len = frame.len();
    let body = frame.slice(4..);
    let cmd_size = be_u32(&body);
    if cmd_size > body.len() - 4 {
        return Err(CodecError::Malformed("command size larger than the frame"));
    }
    let command = pb::BaseCommand::decode(&body[4..4 + cmd_size]).map_err(|e| CodecError::BadCommand(e.to_string()))?;
    let rest = body.slice(4 + cmd_size..);
    let payload = if rest.is_empty() {
        None
    } else {
        match decode_payload(rest) {
            Ok(p) => Some(p),
            Err(CodecError::ChecksumMismatch { .. }) => {
                return Err(CodecError::ChecksumMismatch { consumed: len, command: Some(Box::new(command)) })
            }
            Err(e) => return Err(e),
        }
    };
    Ok(Frame { command, payload })
}

/// Decodes one frame from the front of `buf`. `Ok(None)`: more bytes are needed; otherwise
/// the frame and the bytes it used. `max_frame` bounds `totalSize`.
pub fn decode(buf: &[u8], max_frame: usize) -> Result<Option<(Frame, usize)>, CodecError> {
    match frame_len(buf, max_frame)? {
        None => Ok(None),
        Some(n) => decode_frame(Bytes::copy_from_slice(&buf[..n])).map(|f| Some((f, n))),
    }
}

fn take<'a>(b: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
    if b.len() < n {
        return Err(CodecError::Malformed(what));
    }
    let (head, tail) = b.split_at(n);
    *b = tail;
    Ok(head)
}

fn peek_magic(b: &[u8]) -> Option<u16> {
    (b.len() >= 2).then(|| u16::from_be_bytes([b[0], b[1]]))
}

/// Decodes the part of a payload frame after the command.
pub fn decode_payload(rest: Bytes) -> Result<Payload, CodecError> {
    let mut r: &[u8] = &rest;
    let mut broker_entry_metadata = None;
    if peek_magic(r) == Some(MAGIC_BROKER_ENTRY_METADATA) {
        take(&mut r, 2, "truncated broker entry metadata magic")?;
        let size = be_u32(take(&mut r, 4, "truncated broker entry metadata size")?);
        let bytes = take(&mut r, size, "broker entry metadata larger than the frame")?;
        broker_entry_metadata = Some(
            pb::BrokerEntryMetadata::decode(bytes)
                .map_err(|e| CodecError::BadCommand(format!("broker entry metadata: {e}")))?,
        );
    }
    let mut checksum = None;
    if peek_magic(r) == Some(MAGIC_CRC32C) {
        take(&mut r, 2, "truncated checksum magic")?;
        let crc = be_u32(take(&mut r, 4, "truncated checksum")?) as u32;
        if crc32c::crc32c(r) != crc {
            return Err(CodecError::ChecksumMismatch { consumed: 0, command: None });
        }
        checksum = Some(crc);
    }
    let entry = rest.slice(rest.len() - r.len()..);
    let meta_size = be_u32(take(&mut r, 4, "truncated metadata size")?);
    let meta = take(&mut r, meta_size, "metadata larger than the frame")?;
    let metadata =
        pb::MessageMetadata::decode(meta).map_err(|e| CodecError::BadCommand(format!("message metadata: {e}")))?;
    let data = entry.slice(4 + meta_size..);
    Ok(Payload { broker_entry_metadata, metadata, data, entry, checksum })
}

/// Splits a stored entry (`[metadataSize][MessageMetadata][payload]`) into metadata and payload.
pub fn decode_entry(entry: &Bytes) -> Result<(pb::MessageMetadata, Bytes), CodecError> {
    let mut r: &[u8] = entry;
    let meta_size = be_u32(take(&mut r, 4, "truncated metadata size")?);
    let meta = take(&mut r, meta_size, "metadata larger than the entry")?;
    let metadata =
        pb::MessageMetadata::decode(meta).map_err(|e| CodecError::BadCommand(format!("message metadata: {e}")))?;
    Ok((metadata, entry.slice(4 + meta_size..)))
}

/// Appends a frame without payload.
pub fn encode_command(cmd: &pb::BaseCommand, out: &mut BytesMut) {
    let cmd_size = cmd.encoded_len();
    out.reserve(8 + cmd_size);
    out.put_u32((4 + cmd_size) as u32);
    out.put_u32(cmd_size as u32);
    // Encoding into a BytesMut with reserved room cannot fail.
    let _ = cmd.encode(out);
}

/// Appends a payload frame whose entry part (`[metadataSize][MessageMetadata][payload]`) is
/// already encoded (as stored in a ledger), adding the checksum: `crc` when it is known (the
/// CRC32C of `entry`), else computed.
pub fn encode_with_entry(cmd: &pb::BaseCommand, entry: &[u8], crc: Option<u32>, out: &mut BytesMut) {
    encode_entry_header(cmd, entry, crc, out, entry.len());
    out.extend_from_slice(entry);
}

/// Appends what [`encode_with_entry`] writes before the entry itself (which the frame's
/// writer then sends from where it is), reserving `extra` more bytes.
pub fn encode_entry_header(cmd: &pb::BaseCommand, entry: &[u8], crc: Option<u32>, out: &mut BytesMut, extra: usize) {
    let cmd_size = cmd.encoded_len();
    let total = 4 + cmd_size + 2 + 4 + entry.len();
    out.reserve(4 + total - entry.len() + extra);
    out.put_u32(total as u32);
    out.put_u32(cmd_size as u32);
    let _ = cmd.encode(out);
    out.put_u16(MAGIC_CRC32C);
    out.put_u32(crc.unwrap_or_else(|| crc32c::crc32c(entry)));
}

/// Encodes `[metadataSize][MessageMetadata][payload]`.
pub fn encode_entry(metadata: &pb::MessageMetadata, payload: &[u8]) -> Bytes {
    let meta_size = metadata.encoded_len();
    let mut b = BytesMut::with_capacity(4 + meta_size + payload.len());
    b.put_u32(meta_size as u32);
    let _ = metadata.encode(&mut b);
    b.extend_from_slice(payload);
    b.freeze()
}

/// A command of the given type with nothing else set.
pub fn base(kind: pb::base_command::Type) -> pb::BaseCommand {
    pb::BaseCommand { r#type: kind as i32, ..Default::default() }
}

/// One message of a client batch.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchItem {
    /// Its metadata.
    pub metadata: pb::SingleMessageMetadata,
    /// Its payload.
    pub payload: Bytes,
}

/// Splits a batch payload into its `count` messages.
pub fn split_batch(data: &Bytes, count: usize) -> Result<Vec<BatchItem>, CodecError> {
    let mut out = Vec::with_capacity(count.min(data.len() / 4 + 1));
    let mut off = 0usize;
    for _ in 0..count {
        let (item, next) = batch_item_at(data, off)?;
        out.push(item);
        off = next;
    }
    if off != data.len() {
        return Err(CodecError::Malformed("bytes left after the last batch item"));
    }
    Ok(out)
}

/// The first message of a batch payload.
pub fn first_batch_item(data: &Bytes) -> Result<BatchItem, CodecError> {
    batch_item_at(data, 0).map(|(item, _)| item)
}

/// The batch item at `off` and the offset after it.
fn batch_item_at(data: &Bytes, off: usize) -> Result<(BatchItem, usize), CodecError> {
    let mut r = &data[off..];
    let size = be_u32(take(&mut r, 4, "truncated batch item size")?);
    let meta = take(&mut r, size, "batch item metadata larger than the batch")?;
    let metadata =
        pb::SingleMessageMetadata::decode(meta).map_err(|e| CodecError::BadCommand(format!("batch item: {e}")))?;
    let len = usize::try_from(metadata.payload_size).map_err(|_| CodecError::Malformed("negative batch item size"))?;
    take(&mut r, len, "batch item payload larger than the batch")?;
    let start = off + 4 + size;
    Ok((BatchItem { metadata, payload: data.slice(start..start + len) }, start + len))
}

/// Appends one batch item (`[size][SingleMessageMetadata][payload]`).
pub fn encode_batch_item(metadata: &pb::SingleMessageMetadata, payload: &[u8], out: &mut BytesMut) {
    out.put_u32(metadata.encoded_len() as u32);
    let _ = metadata.encode(out);
    out.extend_from_slice(payload);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use pb::base_command::Type;
    use rand::{Rng, SeedableRng};

    const MAX: usize = DEFAULT_MAX_MESSAGE_SIZE + FRAME_HEADROOM;

    fn send_cmd() -> pb::BaseCommand {
        pb::BaseCommand {
            send: Some(Box::new(pb::CommandSend {
                producer_id: 1,
                sequence_id: 7,
                num_messages: Some(1),
                ..Default::default()
            })),
            ..base(Type::Send)
        }
    }

    fn metadata() -> pb::MessageMetadata {
        pb::MessageMetadata { producer_name: "p".into(), sequence_id: 7, publish_time: 1, ..Default::default() }
    }

    #[test]
    fn simple_frame_round_trip() {
        let ping = base(Type::Ping);
        let mut b = BytesMut::new();
        encode_command(&ping, &mut b);
        assert_eq!(b.len(), 8 + ping.encoded_len());
        let (f, n) = decode(&b, MAX).unwrap().unwrap();
        assert_eq!((f.command.r#type, f.payload, n), (Type::Ping as i32, None, b.len()));
        for cut in 0..b.len() {
            assert_eq!(decode(&b[..cut], MAX).unwrap(), None, "a prefix of {cut} bytes needs more");
        }
    }

    #[test]
    fn payload_frame_round_trip_and_checksum() {
        let entry = encode_entry(&metadata(), b"hello");
        let mut b = BytesMut::new();
        encode_with_entry(&send_cmd(), &entry, None, &mut b);
        let (f, n) = decode(&b, MAX).unwrap().unwrap();
        assert_eq!(n, b.len());
        let p = f.payload.unwrap();
        let crc = crc32c::crc32c(&entry);
        assert_eq!((&p.data[..], p.metadata.sequence_id, p.checksum), (&b"hello"[..], 7, Some(crc)));
        assert_eq!(p.entry, entry);
        // The checksum a frame carried, sent on, makes the same frame.
        let mut again = BytesMut::new();
        encode_with_entry(&send_cmd(), &p.entry, p.checksum, &mut again);
        assert_eq!(again, b);
        let mut bad = b.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        match decode(&bad, MAX) {
            Err(CodecError::ChecksumMismatch { consumed, command }) => {
                assert_eq!(consumed, bad.len());
                assert_eq!(command.and_then(|c| c.send).map(|s| s.sequence_id), Some(7));
            }
            other => panic!("expected a checksum mismatch, got {other:?}"),
        }
    }

    #[test]
    fn oversized_and_inconsistent_sizes_are_rejected_before_allocation() {
        let mut b = BytesMut::new();
        b.put_u32(u32::MAX);
        assert!(matches!(decode(&b, MAX), Err(CodecError::FrameTooLarge { .. })));
        let mut b = BytesMut::new();
        b.put_u32(8);
        b.put_u32(100);
        b.put_u32(0);
        assert!(matches!(decode(&b, MAX), Err(CodecError::Malformed(_))));
        let mut b = BytesMut::new();
        b.put_u32(2);
        b.put_u16(0);
        assert!(matches!(decode(&b, MAX), Err(CodecError::Malformed(_))));
    }

    #[test]
    fn batches_split_and_reject_lies() {
        let mut batch = BytesMut::new();
        for i in 0..3 {
            let m = pb::SingleMessageMetadata { payload_size: 3, sequence_id: Some(i), ..Default::default() };
            encode_batch_item(&m, format!("m{i}x").as_bytes(), &mut batch);
        }
        let batch = batch.freeze();
        let items = split_batch(&batch, 3).unwrap();
        assert_eq!(items.iter().map(|i| &i.payload[..]).collect::<Vec<_>>(), vec![&b"m0x"[..], b"m1x", b"m2x"]);
        assert!(split_batch(&batch, 4).is_err(), "more items than present");
        assert!(split_batch(&batch, 2).is_err(), "bytes left over");
        let mut lie = BytesMut::new();
        let m = pb::SingleMessageMetadata { payload_size: 1000, ..Default::default() };
        encode_batch_item(&m, b"short", &mut lie);
        assert!(split_batch(&lie.freeze(), 1).is_err());
    }

    #[test]
    fn random_and_mutated_frames_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let entry = encode_entry(&metadata(), &[5u8; 300]);
        let mut good = BytesMut::new();
        encode_with_entry(&send_cmd(), &entry, None, &mut good);
        for _ in 0..20_000 {
            let mut b = good.to_vec();
            for _ in 0..rng.random_range(1..6) {
                let i = rng.random_range(0..b.len());
                b[i] = rng.random();
            }
            b.truncate(rng.random_range(0..=b.len()));
            let _ = decode(&b, MAX);
            let junk: Vec<u8> = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
            let _ = decode(&junk, MAX);
        }
    }
}
