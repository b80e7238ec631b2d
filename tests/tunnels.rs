//! Byte tunnels through the proxy: WebSocket upgrades, `CONNECT` and opaque
//! TCP. They pass through unchanged and are never copied.

mod support;

use futures_util::{SinkExt, StreamExt};
use support::{raw, *};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tokio_tungstenite::tungstenite::Message;

/// Starts a WebSocket server that echoes every text and binary message.
async fn websocket_echo() -> (std::net::SocketAddr, TaskGuard) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    let data = message.is_text() || message.is_binary();
                    if data && socket.send(message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, TaskGuard(task))
}

/// Reads exactly `len` bytes, failing the test after the raw read limit.
async fn read_exact(stream: &mut tokio::net::TcpStream, len: usize) -> Vec<u8> {
    let mut buffer = vec![0u8; len];
    tokio::time::timeout(raw::READ_LIMIT, stream.read_exact(&mut buffer))
        .await
        .expect("expected the echo within the read limit")
        .expect("expected the tunnel to stay open");
    buffer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through() {
    bounded(async {
        let (server, _server_task) = websocket_echo().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(server)
            .route(route("r", &secondary.url()))
            .start()
            .await;

        let stream = raw::connect(proxy.addr()).await;
        let (mut socket, response) =
            tokio_tungstenite::client_async(format!("ws://{server}/chat"), stream)
                .await
                .expect("expected the WebSocket handshake through the proxy to succeed");
        assert_eq!(response.status(), 101, "expected 101 Switching Protocols");
        socket
            .send(Message::text("hello through tandem"))
            .await
            .unwrap();
        let echoed = socket
            .next()
            .await
            .expect("expected an echoed message")
            .expect("expected a valid frame");
        assert_eq!(
            echoed,
            Message::text("hello through tandem"),
            "expected the message echoed"
        );
        socket
            .send(Message::binary(vec![0u8, 1, 2, 255]))
            .await
            .unwrap();
        let echoed = socket.next().await.unwrap().unwrap();
        assert_eq!(
            echoed,
            Message::binary(vec![0u8, 1, 2, 255]),
            "expected binary data unchanged"
        );
        socket.close(None).await.unwrap();

        let metrics = proxy.metrics().await;
        assert_eq!(
            metrics.due("r"),
            0,
            "expected no copy of an upgrade request"
        );
        assert_eq!(secondary.count(), 0, "expected the secondary never called");
        assert_eq!(
            metrics.sum(
                "tandem_requests_total",
                &[("role", "primary"), ("status_class", "1xx")]
            ) as u64,
            1,
            "expected the upgrade counted as one 1xx primary response"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnel_reaches_tcp_echo() {
    bounded(async {
        let echo = EchoServer::start().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .route(route("r", &secondary.url()))
            .start()
            .await;

        let mut stream = raw::connect(proxy.addr()).await;
        let request = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", echo.addr());
        stream.write_all(request.as_bytes()).await.unwrap();
        let (head, rest) = raw::read_head(&mut stream).await;
        assert_eq!(
            raw::status_of(&head),
            200,
            "expected 200 to CONNECT: {head}"
        );
        assert!(
            rest.is_empty(),
            "expected no bytes after the CONNECT response head"
        );

        for message in [&b"ping over connect"[..], &[0u8, 159, 146, 150][..]] {
            stream.write_all(message).await.unwrap();
            let echoed = read_exact(&mut stream, message.len()).await;
            assert_eq!(
                echoed, message,
                "expected the tunnel to return the bytes unchanged"
            );
        }

        let metrics = proxy.metrics().await;
        assert_eq!(metrics.due("r"), 0, "expected no copy of a CONNECT tunnel");
        assert_eq!(secondary.count(), 0, "expected the secondary never called");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_reaches_default_target() {
    bounded(async {
        let echo = EchoServer::start().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(echo.addr())
            .route(route("r", &secondary.url()))
            .start()
            .await;

        let mut stream = raw::connect(proxy.addr()).await;
        let message = b"\x00\x01 not http at all\n";
        stream.write_all(message).await.unwrap();
        let echoed = read_exact(&mut stream, message.len()).await;
        assert_eq!(
            &echoed[..],
            &message[..],
            "expected the bytes echoed unchanged"
        );
        stream.write_all(b"second write").await.unwrap();
        let echoed = read_exact(&mut stream, 12).await;
        assert_eq!(
            &echoed[..],
            b"second write",
            "expected later bytes on the same tunnel"
        );

        let metrics = proxy.metrics().await;
        assert_eq!(
            metrics.sum("tandem_connections_total", &[("protocol", "opaque")]) as u64,
            1,
            "expected the connection detected as opaque"
        );
        assert_eq!(metrics.due("r"), 0, "expected no copy of opaque TCP");
        assert_eq!(secondary.count(), 0, "expected the secondary never called");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_first_protocol_passes_through() {
    bounded(async {
        // A server that speaks first, like SMTP or MySQL: it greets every
        // connection, then echoes.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        let _server_task = TaskGuard(tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if stream.write_all(b"220 ready\r\n").await.is_ok() {
                        let (mut read, mut write) = stream.split();
                        let _ = tokio::io::copy(&mut read, &mut write).await;
                    }
                });
            }
        }));
        let proxy = proxy_spec()
            .default_target(server)
            .outbound("detect_timeout", "200ms")
            .start()
            .await;

        // The client waits for the greeting, so the proxy reads no bytes and
        // must treat the connection as opaque after detect_timeout.
        let mut stream = raw::connect(proxy.addr()).await;
        let greeting = read_exact(&mut stream, 11).await;
        assert_eq!(
            &greeting[..],
            b"220 ready\r\n",
            "expected the server's greeting through the proxy"
        );
        stream.write_all(b"HELO tandem\r\n").await.unwrap();
        let echoed = read_exact(&mut stream, 13).await;
        assert_eq!(
            &echoed[..],
            b"HELO tandem\r\n",
            "expected the client's reply passed through"
        );
    })
    .await;
}
