//! Framed connections and the session handshake.
//!
//! [`FrameReader`] assembles frames from a byte stream, rejecting a frame whose declared size
//! passes the limit before reading (or allocating) it. [`FrameWriter`] encodes and writes.
//! [`accept`] runs the broker side of the handshake: the first frame must be CONNECT, and the
//! first reply is CONNECTED (or ERROR), with the protocol version the two sides share and the
//! largest message the broker accepts.

use bytes::BytesMut;
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
            self.buf.reserve(want.saturating_sub(self.buf.len()).max(4096));
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() { Ok(None) } else { Err(ConnError::Closed) };
            }
        }
    }
}

/// Writes frames.
pub struct FrameWriter<W> {
    io: W,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Wraps a writer.
    pub fn new(io: W) -> Self {
        FrameWriter { io, buf: BytesMut::with_capacity(64 * 1024) }
    }

    /// Queues a command without payload (call [`Self::flush`] to send).
    pub fn queue(&mut self, cmd: &pb::BaseCommand) {
        codec::encode_command(cmd, &mut self.buf);
    }

    /// Queues a payload command carrying a stored entry.
    pub fn queue_with_entry(&mut self, cmd: &pb::BaseCommand, entry: &[u8], crc: Option<u32>) {
        codec::encode_with_entry(cmd, entry, crc, &mut self.buf);
    }

    /// Bytes queued and not yet written.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Writes what is queued.
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        if !self.buf.is_empty() {
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
