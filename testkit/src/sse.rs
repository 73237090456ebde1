//! A raw HTTP client of the SSE fallback (docs/protocol.md section 9): the event stream's
//! chunked body decoded by hand, so every byte the relay writes is what is checked.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An open event stream.
#[derive(Debug)]
pub struct Stream {
    pub tcp: TcpStream,
    /// Raw bytes read, not yet decoded.
    pub raw: Vec<u8>,
    /// Decoded body bytes, not yet parsed into events.
    pub body: Vec<u8>,
    pub status: u16,
    pub headers: String,
}

/// One SSE event: its name (`None`: a `message`), its data; a comment is `(Some(":"), text)`.
pub type Event = (Option<String>, String);

impl Stream {
    pub async fn open(addr: SocketAddr, query: &str, extra: &str) -> Self {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(
            format!(
                "GET /ws/sse{query} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n{extra}\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut raw = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(i) = find(&raw, b"\r\n\r\n") {
                    return i;
                }
                let mut b = [0u8; 4096];
                let n = tcp.read(&mut b).await.unwrap();
                assert!(n > 0, "closed before the headers");
                raw.extend_from_slice(&b[..n]);
            }
        })
        .await
        .expect("headers in time");
        let headers = String::from_utf8_lossy(&raw[..end]).into_owned();
        let status = headers[9..12].parse().unwrap();
        raw.drain(..end + 4);
        Self {
            tcp,
            raw,
            body: Vec::new(),
            status,
            headers,
        }
    }

    /// Moves complete chunks from `raw` to `body`; false at the last chunk.
    pub fn dechunk(&mut self) -> bool {
        loop {
            let Some(eol) = find(&self.raw, b"\r\n") else {
                return true;
            };
            let size =
                usize::from_str_radix(std::str::from_utf8(&self.raw[..eol]).unwrap().trim(), 16)
                    .unwrap();
            if size == 0 {
                return false;
            }
            if self.raw.len() < eol + 2 + size + 2 {
                return true;
            }
            self.body
                .extend_from_slice(&self.raw[eol + 2..eol + 2 + size]);
            self.raw.drain(..eol + 2 + size + 2);
        }
    }

    /// The next event or comment; `None` when the stream ended or nothing came `within`.
    pub async fn next(&mut self, within: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let more = self.dechunk();
            if let Some(i) = find(&self.body, b"\n\n") {
                let block = String::from_utf8(self.body.drain(..i + 2).collect()).unwrap();
                let mut name = None;
                let mut data: Vec<&str> = Vec::new();
                for line in block.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        return Some((Some(":".into()), c.trim().to_owned()));
                    } else if let Some(n) = line.strip_prefix("event: ") {
                        name = Some(n.to_owned());
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data.push(d);
                    }
                }
                return Some((name, data.join("\n")));
            }
            if !more {
                return None;
            }
            let mut b = [0u8; 4096];
            let n = match tokio::time::timeout_at(deadline, self.tcp.read(&mut b)).await {
                Ok(Ok(n)) if n > 0 => n,
                _ => return None,
            };
            self.raw.extend_from_slice(&b[..n]);
        }
    }

    /// The next `data` frame (skipping comments), parsed.
    pub async fn frame(&mut self) -> Value {
        for _ in 0..100 {
            match self.next(Duration::from_secs(10)).await {
                Some((None, d)) => return serde_json::from_str(&d).unwrap(),
                Some((Some(n), _)) if n == ":" => {}
                other => panic!("expected a frame, got {other:?}"),
            }
        }
        panic!("no frame");
    }

    /// The reply to request `id` (skipping other frames).
    pub async fn reply(&mut self, id: u64) -> Value {
        for _ in 0..100 {
            let f = self.frame().await;
            if f["id"] == id {
                return f;
            }
        }
        panic!("no reply to {id}");
    }

    /// Reads up to the `close` event; returns its data.
    pub async fn close_event(&mut self) -> Value {
        for _ in 0..100 {
            match self.next(Duration::from_secs(10)).await {
                Some((Some(n), d)) if n == "close" => return serde_json::from_str(&d).unwrap(),
                Some(_) => {}
                None => panic!("the stream ended without a close event"),
            }
        }
        panic!("no close event");
    }

    /// Opens a session: the `session` event, then `welcome`. Returns the POST path.
    pub async fn session(&mut self) -> String {
        let (name, data) = self.next(Duration::from_secs(5)).await.expect("session");
        assert_eq!(name.as_deref(), Some("session"), "{data}");
        let s: Value = serde_json::from_str(&data).unwrap();
        let post = s["post"].as_str().unwrap().to_owned();
        assert_eq!(post, format!("/ws/sse/{}", s["session"].as_str().unwrap()));
        let w = self.frame().await;
        assert_eq!(w["type"], "welcome", "{w}");
        post
    }
}

pub fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// POSTs `body`; returns the status.
pub async fn post(addr: SocketAddr, path: &str, body: &str, extra: &str) -> u16 {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{extra}\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf))
        .await
        .expect("POST answered in time")
        .unwrap();
    String::from_utf8_lossy(&buf)[9..12].parse().unwrap()
}

/// Sends one raw HTTP request and reads the answer to its end (bounded); returns the head
/// (status line and headers) and the body bytes as text.
pub async fn exchange(addr: SocketAddr, request: &str) -> (String, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_owned(), body.to_owned())
}

/// Whether `tcp` is closed by the peer within `within` (a read gives 0 bytes or fails);
/// bytes that arrive meanwhile are read and discarded.
pub async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut b = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut b)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}
