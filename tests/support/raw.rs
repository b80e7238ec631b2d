//! Raw TCP exchanges, for requests that an HTTP client library would not
//! send as written (aborted bodies, oversized heads, `Expect`, `CONNECT`).

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Bound on each raw read, so a proxy that never responds fails the test.
pub const READ_LIMIT: Duration = Duration::from_secs(10);

pub async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr)
        .await
        .unwrap_or_else(|error| panic!("expected to connect to {addr}: {error}"))
}

/// Reads until the end of a response head (`\r\n\r\n`) and returns the head
/// and any bytes read past it.
pub async fn read_head(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end + 4]).into_owned();
            return (head, buffer[end + 4..].to_vec());
        }
        let n = tokio::time::timeout(READ_LIMIT, stream.read(&mut chunk))
            .await
            .expect("expected a response head within the read limit")
            .expect("expected the connection to stay readable");
        assert!(
            n > 0,
            "expected a response head, the connection closed after {:?}",
            String::from_utf8_lossy(&buffer)
        );
        buffer.extend_from_slice(&chunk[..n]);
    }
}

/// Reads until the peer closes the connection (or resets it) and returns
/// everything read.
pub async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(READ_LIMIT, stream.read(&mut chunk))
            .await
            .expect("expected the connection to close within the read limit")
        {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&buffer).into_owned(),
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Writes `request` on a new connection and returns everything the proxy
/// sends until it closes the connection.
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = connect(addr).await;
    stream
        .write_all(request)
        .await
        .expect("expected to write the request");
    read_to_close(&mut stream).await
}

/// Returns the status code of a response head such as `HTTP/1.1 413 ...`.
pub fn status_of(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("expected a status line, got {head:?}"))
}

/// Returns the value of header `name` in a response head, ignoring case.
pub fn header_of<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}
