//! Framed connections and the session handshake.
//!
//! [`FrameReader`] assembles frames from a byte stream, rejecting a frame whose declared size
//! passes the limit before reading (or allocating) it. [`FrameWriter`] encodes and writes.
//! [`accept`] runs the broker side of the handshake: the first frame must be CONNECT, and the
//! first reply is CONNECTED (or ERROR), with the protocol version the two sides share and the
//! largest message the broker accepts.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::codec::{self, CodecError, Frame};
use super::pb;
use pb::base_command::Type;

/// Highest protocol version this broker speaks.
pub const SERVER_PROTOCOL_VERSION: i32 = 20;

/// A connection-level failure; the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Socket error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A frame that does not decode.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The peer broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The peer closed the connection.
    #[error("connection closed by the peer")]
    Closed,
}

/// The most a read takes beyond the frame being read (many small frames still come in one
/// read).
const READ_AHEAD: usize = 16 << 10;

/// Reads frames.
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    max_frame: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Frames of at most `max_frame` bytes (`totalSize`).
    pub fn new(io: R, max_frame: usize) -> Self {
        FrameReader { io, buf: BytesMut::with_capacity(64 * 1024), max_frame }
    }

    /// The next frame; `Ok(None)` when the peer closed cleanly between frames.
    pub async fn next(&mut self) -> Result<Option<Frame>, ConnError> {
        loop {
            if let Some(n) = codec::frame_len(&self.buf, self.max_frame)? {
                // The frame's bytes move out of the buffer without a copy; a damaged payload
                // leaves the connection usable (the frame is already consumed).
                let frame = self.buf.split_to(n).freeze();
                return codec::decode_frame(frame).map(Some).map_err(ConnError::from);
            }
            // Room for the rest of the frame being read (its size is already checked against
            // the limit by `decode`), or for a header.
            let want = if self.buf.len() >= 4 {
                4 + u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize
            } else {
                4
            };
            let missing = want.saturating_sub(self.buf.len());
            // Frames handed out keep their part of the buffer, so growing it for a large frame
            // copies what was read of it so far into a new allocation. Reads therefore take
            // at most `READ_AHEAD` bytes past what is known to be needed: a large frame is
            // read up to its end and no further, and little of the next one is ever copied
            // (before, about half of each 128 KiB entry was).
            // Room for the whole rest and the read-ahead, so that no short read leaves the
            // buffer to grow (and copy) in the middle of a frame.
            self.buf.reserve(missing + READ_AHEAD);
            let limit = missing.max(READ_AHEAD) as u64;
            if (&mut self.io).take(limit).read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() { Ok(None) } else { Err(ConnError::Closed) };
            }
        }
    }
}

/// Entries of at least this many bytes are sent from their own buffers (one vectored write
/// carries them with the frames around them) instead of being copied into the write buffer.
const SEND_IN_PLACE: usize = 16 << 10;

/// Writes frames.
pub struct FrameWriter<W> {
    io: W,
    /// Frames queued, not yet in `parts`.
    buf: BytesMut,
    /// What goes out before `buf`: pieces of it split off, and entries sent in place.
    parts: std::collections::VecDeque<Bytes>,
    parts_len: usize,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Wraps a writer.
    pub fn new(io: W) -> Self {
        FrameWriter { io, buf: BytesMut::with_capacity(64 * 1024), parts: Default::default(), parts_len: 0 }
    }

    /// Queues a command without payload (call [`Self::flush`] to send).
    pub fn queue(&mut self, cmd: &pb::BaseCommand) {
        codec::encode_command(cmd, &mut self.buf);
    }

    /// Queues a payload command carrying a stored entry. A large entry is not copied: it is
    /// sent from its own buffer.
    pub fn queue_with_entry(&mut self, cmd: &pb::BaseCommand, entry: &Bytes, crc: Option<u32>) {
        if entry.len() < SEND_IN_PLACE {
            codec::encode_with_entry(cmd, entry, crc, &mut self.buf);
            return;
        }
        codec::encode_entry_header(cmd, entry, crc, &mut self.buf, 0);
        let head = self.buf.split().freeze();
        self.parts_len += head.len() + entry.len();
        self.parts.push_back(head);
        self.parts.push_back(entry.clone());
    }

    /// Bytes queued and not yet written.
    pub fn buffered(&self) -> usize {
        self.parts_len + self.buf.len()
    }

    /// Writes what is queued.
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        if !self.parts.is_empty() {
            if !self.buf.is_empty() {
                let rest = self.buf.split().freeze();
                self.parts_len += rest.len();
                self.parts.push_back(rest);
            }
            while !self.parts.is_empty() {
                let slices: Vec<std::io::IoSlice<'_>> =
                    self.parts.iter().take(64).map(|b| std::io::IoSlice::new(b)).collect();
                let mut n = self.io.write_vectored(&slices).await?;
                if n == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
                }
                self.parts_len -= n;
                while let Some(b) = self.parts.front_mut().filter(|_| n > 0) {
                    if b.len() <= n {
                        n -= b.len();
                        self.parts.pop_front();
                    } else {
                        bytes::Buf::advance(b, n);
                        n = 0;
                    }
                }
            }
        } else if !self.buf.is_empty() {
            self.io.write_all(&self.buf).await?;
            self.buf.clear();
        }
        self.io.flush().await?;
        Ok(())
    }

    /// Queues and writes one command.
    pub async fn send(&mut self, cmd: &pb::BaseCommand) -> Result<(), ConnError> {
        self.queue(cmd);
        self.flush().await
    }
}

/// What the client said in CONNECT, and what was agreed.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    /// The version both sides speak: min(client, [`SERVER_PROTOCOL_VERSION`]).
    pub protocol_version: i32,
    /// The client's self-description.
    pub client_version: String,
    /// Authentication method name, if any.
    pub auth_method_name: Option<String>,
    /// The client's feature flags.
    pub features: pb::FeatureFlags,
}

/// An ERROR frame.
pub fn error_command(request_id: u64, error: pb::ServerError, message: impl Into<String>) -> pb::BaseCommand {
    pb::BaseCommand {
        error: Some(Box::new(pb::CommandError { request_id, error: error as i32, message: message.into() })),
        ..codec::base(Type::Error)
    }
}

/// Runs the broker side of the handshake.
pub async fn accept<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    server_version: &str,
    max_message_size: usize,
) -> Result<Session, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let frame = reader.next().await?.ok_or(ConnError::Closed)?;
    let connect = match (Type::try_from(frame.command.r#type), frame.command.connect) {
        (Ok(Type::Connect), Some(c)) => c,
        (kind, _) => {
            let what = format!("expected CONNECT first, got {kind:?}");
            writer.send(&error_command(0, pb::ServerError::NotAllowedError, what.clone())).await?;
            return Err(ConnError::Protocol(what));
        }
    };
    let client = connect.protocol_version.unwrap_or(0);
    let version = client.clamp(0, SERVER_PROTOCOL_VERSION);
    let connected = pb::BaseCommand {
        connected: Some(Box::new(pb::CommandConnected {
            server_version: server_version.to_owned(),
            protocol_version: Some(version),
            max_message_size: Some(max_message_size as i32),
            feature_flags: Some(pb::FeatureFlags { supports_auth_refresh: Some(true), ..Default::default() }),
        })),
        ..codec::base(Type::Connected)
    };
    writer.send(&connected).await?;
    Ok(Session {
        protocol_version: version,
        client_version: connect.client_version,
        auth_method_name: connect.auth_method_name,
        features: connect.feature_flags.unwrap_or_default(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::protocol::codec::{DEFAULT_MAX_MESSAGE_SIZE, FRAME_HEADROOM};
    use bytes::BufMut;

    const MAX: usize = DEFAULT_MAX_MESSAGE_SIZE + FRAME_HEADROOM;

    fn connect(version: i32) -> pb::BaseCommand {
        pb::BaseCommand {
            connect: Some(Box::new(pb::CommandConnect {
                client_version: "test-client".into(),
                protocol_version: Some(version),
                ..Default::default()
            })),
            ..codec::base(Type::Connect)
        }
    }

    async fn handshake(first: pb::BaseCommand) -> (Result<Session, ConnError>, Option<Frame>) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (sr, sw) = tokio::io::split(server);
        let (cr, cw) = tokio::io::split(client);
        let mut cw = FrameWriter::new(cw);
        cw.send(&first).await.unwrap();
        let session = accept(&mut FrameReader::new(sr, MAX), &mut FrameWriter::new(sw), "magnetar-test", 5 << 20).await;
        let reply = FrameReader::new(cr, MAX).next().await.unwrap();
        (session, reply)
    }

    #[tokio::test]
    async fn versions_are_negotiated_down_to_what_both_speak() {
        for (client, agreed) in [(12, 12), (20, 20), (25, 20), (0, 0)] {
            let (s, reply) = handshake(connect(client)).await;
            assert_eq!(s.unwrap().protocol_version, agreed);
            let c = reply.unwrap().command.connected.unwrap();
            assert_eq!((c.protocol_version, c.max_message_size), (Some(agreed), Some(5 << 20)));
        }
    }

    #[tokio::test]
    async fn anything_but_connect_first_gets_an_error() {
        let (s, reply) = handshake(codec::base(Type::Ping)).await;
        assert!(matches!(s, Err(ConnError::Protocol(_))));
        let cmd = reply.unwrap().command;
        assert_eq!(cmd.r#type, Type::Error as i32);
        assert_eq!(cmd.error.unwrap().error, pb::ServerError::NotAllowedError as i32);
    }

    #[tokio::test]
    async fn frames_split_across_reads_and_oversized_frames() {
        let (client, server) = tokio::io::duplex(16);
        let mut reader = FrameReader::new(server, 1024);
        let mut w = FrameWriter::new(client);
        w.queue(&codec::base(Type::Ping));
        w.queue(&codec::base(Type::Pong));
        let writer = tokio::spawn(async move {
            w.flush().await.unwrap();
            // A frame claiming 1 MiB: refused from its header alone.
            let mut b = BytesMut::new();
            b.put_u32(1 << 20);
            w.io.write_all(&b).await.unwrap();
            w.io.flush().await.unwrap();
            w
        });
        assert_eq!(reader.next().await.unwrap().unwrap().command.r#type, Type::Ping as i32);
        assert_eq!(reader.next().await.unwrap().unwrap().command.r#type, Type::Pong as i32);
        assert!(matches!(reader.next().await, Err(ConnError::Codec(CodecError::FrameTooLarge { .. }))));
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn a_frame_with_a_bad_checksum_is_skipped() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut reader = FrameReader::new(server, MAX);
        let mut w = FrameWriter::new(client);
        let entry = codec::encode_entry(&pb::MessageMetadata::default(), b"x");
        let mut bad = BytesMut::new();
        codec::encode_with_entry(&codec::base(Type::Send), &entry, None, &mut bad);
        let n = bad.len();
        bad[n - 1] ^= 1;
        w.io.write_all(&bad).await.unwrap();
        w.send(&codec::base(Type::Ping)).await.unwrap();
        assert!(matches!(reader.next().await, Err(ConnError::Codec(CodecError::ChecksumMismatch { .. }))));
        assert_eq!(reader.next().await.unwrap().unwrap().command.r#type, Type::Ping as i32);
    }

    /// Large frames come whole and in order among small ones, and reading them takes at most
    /// `READ_AHEAD` bytes of the next frame: more would be copied when the buffer grows for
    /// that frame (the frame handed out keeps the old allocation).
    #[tokio::test]
    async fn large_frames_are_read_without_reading_far_ahead() {
        let (client, server) = tokio::io::duplex(4 << 20);
        let mut reader = FrameReader::new(server, MAX);
        let mut w = FrameWriter::new(client);
        let sizes = [200_000usize, 10, 300_000, 70_000, 5, 5, 150_000];
        for (i, &n) in sizes.iter().enumerate() {
            let entry = codec::encode_entry(&pb::MessageMetadata::default(), &vec![i as u8; n]);
            w.queue_with_entry(&codec::base(Type::Send), &entry, None);
            w.queue(&codec::base(Type::Ping));
        }
        // All of it is there to be read before the first frame is.
        w.flush().await.unwrap();
        for (i, &n) in sizes.iter().enumerate() {
            let f = reader.next().await.unwrap().unwrap();
            let data = f.payload.expect("a payload").data;
            assert_eq!((data.len(), data.first().copied()), (n, Some(i as u8)), "frame {i}");
            assert!(reader.buf.len() <= READ_AHEAD, "{} bytes read ahead after frame {i}", reader.buf.len());
            assert_eq!(reader.next().await.unwrap().unwrap().command.r#type, Type::Ping as i32);
        }
    }

    /// Large entries go out from their own buffers, among frames copied into the write
    /// buffer, in order and whole, however little each write takes; `buffered` counts them.
    #[tokio::test]
    async fn large_entries_are_sent_in_place_in_order() {
        let (client, server) = tokio::io::duplex(1000);
        let mut reader = FrameReader::new(server, MAX);
        let mut w = FrameWriter::new(client);
        let sizes = [100usize, 20_000, 3, 70_000, 16 << 10, (16 << 10) - 1, 200_000, 130_000];
        let entries: Vec<Bytes> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| codec::encode_entry(&pb::MessageMetadata::default(), &vec![i as u8 + 1; n]))
            .collect();
        let mut queued = 0;
        for e in &entries {
            w.queue(&codec::base(Type::Ping));
            w.queue_with_entry(&codec::base(Type::Send), e, None);
            let in_place = w.parts.back().is_some_and(|b| b.as_ptr() == e.as_ptr());
            assert_eq!(in_place, e.len() >= SEND_IN_PLACE, "entry of {} bytes", e.len());
            queued += 8 + prost::Message::encoded_len(&codec::base(Type::Ping)) + 14;
            queued += prost::Message::encoded_len(&codec::base(Type::Send)) + e.len();
        }
        assert_eq!(w.buffered(), queued);
        let writer = tokio::spawn(async move {
            w.flush().await.unwrap();
            assert_eq!(w.buffered(), 0);
        });
        // Kept, as a broker keeps the entries it caches: their allocations stay shared.
        let mut kept = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            assert_eq!(reader.next().await.unwrap().unwrap().command.r#type, Type::Ping as i32);
            let data = reader.next().await.unwrap().unwrap().payload.expect("a payload").data;
            assert_eq!(data.len(), n, "frame {i}");
            assert!(data.iter().all(|&b| b == i as u8 + 1), "frame {i}");
            kept.push(data);
            // Read in short pieces here: the buffer never grew (doubling, and copying the
            // frame) in the middle of a large one.
            if n > 64 << 10 {
                let left = reader.buf.capacity();
                assert!(left <= 3 * READ_AHEAD, "{left} bytes of room left after frame {i}");
            }
        }
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn clean_and_unclean_eof() {
        let (client, server) = tokio::io::duplex(64);
        drop(client);
        assert!(FrameReader::new(server, MAX).next().await.unwrap().is_none());
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(&[0, 0, 0, 10, 0]).await.unwrap();
        drop(client);
        assert!(matches!(FrameReader::new(server, MAX).next().await, Err(ConnError::Closed)));
    }
}
