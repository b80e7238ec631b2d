//! Protocol detection on a new client connection, from its first bytes.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface (RFC 9113 section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Maximum length of the method token before the first space.
/// `UPDATEREDIRECTREF` (WebDAV, 17 bytes) is the longest registered method.
const MAX_METHOD_LEN: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// Anything else, including a client that sent nothing in time.
    Opaque,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Opaque => "opaque",
        }
    }
}

/// Reads from `io` until the protocol is known or `timeout` passes, and
/// returns the bytes read so they can be replayed.
pub async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    timeout: Duration,
) -> io::Result<(Protocol, Bytes)> {
    let mut buffer = BytesMut::with_capacity(256);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(protocol) = classify(&buffer) {
            return Ok((protocol, buffer.freeze()));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buffer)).await {
            Ok(Ok(0)) | Err(_) => return Ok((Protocol::Opaque, buffer.freeze())),
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return Err(error),
        }
    }
}

/// Classifies a prefix; `None` while more bytes are needed.
fn classify(prefix: &[u8]) -> Option<Protocol> {
    if prefix.is_empty() {
        return None;
    }
    let compared = prefix.len().min(H2_PREFACE.len());
    if prefix[..compared] == H2_PREFACE[..compared] {
        return if compared == H2_PREFACE.len() {
            Some(Protocol::Http2)
        } else {
            None
        };
    }
    // An HTTP/1.x request line starts with a method token and a space.
    for (i, &byte) in prefix.iter().enumerate() {
        if byte == b' ' {
            return Some(if i > 0 {
                Protocol::Http1
            } else {
                Protocol::Opaque
            });
        }
        if !byte.is_ascii_uppercase() && byte != b'-' || i >= MAX_METHOD_LEN {
            return Some(Protocol::Opaque);
        }
    }
    None
}

/// An I/O stream that first replays bytes already read from it.
pub struct PrefixedIo<I> {
    prefix: Bytes,
    io: I,
}

impl<I> PrefixedIo<I> {
    pub fn new(prefix: Bytes, io: I) -> Self {
        Self { prefix, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for PrefixedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_prefixes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1"), Some(Protocol::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(
            classify(b"PRI * HTTP/2"),
            None,
            "partial preface needs more bytes"
        );
        assert_eq!(classify(b"PRI / HTTP/1.1"), Some(Protocol::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(
            classify(b"\x16\x03\x01"),
            Some(Protocol::Opaque),
            "TLS hello"
        );
        assert_eq!(classify(b"hello world"), Some(Protocol::Opaque));
        assert_eq!(classify(b" GET"), Some(Protocol::Opaque));
        assert_eq!(classify(&[b'A'; 40]), Some(Protocol::Opaque));
    }

    #[tokio::test]
    async fn silent_client_is_opaque_after_timeout() {
        let (mut client, _server) = tokio::io::duplex(64);
        let (protocol, prefix) = detect(&mut client, Duration::from_millis(20))
            .await
            .unwrap();
        assert_eq!(protocol, Protocol::Opaque);
        assert!(prefix.is_empty());
    }

    #[tokio::test]
    async fn prefixed_io_replays_then_reads() {
        let (client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut server, b" world")
            .await
            .unwrap();
        drop(server);
        let mut io = PrefixedIo::new(Bytes::from_static(b"hello"), client);
        let mut all = String::new();
        io.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }
}
