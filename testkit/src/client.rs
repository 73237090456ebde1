//! The client of the relay's protocol (docs/protocol.md) over a real WebSocket.
//!
//! Two faces of one implementation: functions over a [`Ws`] that read frames as JSON values
//! (what a test asserts field by field, exactly as sent), and [`Client`], which sends typed
//! [`Request`]s and reads typed [`Frame`]s. Every wait is bounded: 20 s for what is expected.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpStream as TokioTcp;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A client's WebSocket.
pub type Ws = WebSocketStream<MaybeTlsStream<TokioTcp>>;

/// How long a test waits for what it expects to come.
pub const EXPECT: Duration = Duration::from_secs(20);

/// Connects a client; `Err(status)` if refused before the upgrade.
pub async fn connect_with(
    addr: SocketAddr,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, u16> {
    let url = format!("ws://{addr}/ws{query}");
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().append(
            tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let config = tungstenite::protocol::WebSocketConfig::default();
    match tokio::time::timeout(
        EXPECT,
        tokio_tungstenite::connect_async_with_config(req, Some(config), true),
    )
    .await
    .expect("connect timed out")
    {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("unexpected connect error: {e}"),
    }
}

/// Connects and reads the welcome frame.
pub async fn connect(addr: SocketAddr, query: &str) -> Ws {
    let mut ws = connect_with(addr, query, &[]).await.expect("refused");
    let w = next_json(&mut ws).await.expect("welcome");
    assert_eq!(w["type"], "welcome", "{w}");
    ws
}

/// What a read gave.
#[derive(Debug, PartialEq)]
pub enum Got {
    Json(Value),
    Closed(Option<u16>),
    Timeout,
}

/// The next text frame or close, skipping pings; bounded by `within`.
pub async fn next_event(ws: &mut Ws, within: Duration) -> Got {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Got::Timeout,
            Ok(None) => return Got::Closed(None),
            Ok(Some(Err(_))) => return Got::Closed(None),
            Ok(Some(Ok(Message::Text(t)))) => {
                return Got::Json(serde_json::from_str(t.as_str()).expect("json frame"));
            }
            Ok(Some(Ok(Message::Close(f)))) => return Got::Closed(f.map(|f| u16::from(f.code))),
            Ok(Some(Ok(_))) => {}
        }
    }
}

pub async fn next_json(ws: &mut Ws) -> Option<Value> {
    match next_event(ws, EXPECT).await {
        Got::Json(v) => Some(v),
        _ => None,
    }
}

/// Waits for a close frame, skipping text; returns its code.
pub async fn close_code(ws: &mut Ws, within: Duration) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_event(ws, left).await {
            Got::Json(_) => {}
            Got::Closed(code) => return code,
            Got::Timeout => return None,
        }
    }
}

pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Sends a request and returns its reply (skipping message frames).
pub async fn request(ws: &mut Ws, v: Value) -> Value {
    let id = v["id"].clone();
    send(ws, v).await;
    for _ in 0..1000 {
        let r = next_json(ws).await.expect("reply");
        if (r["type"] == "ok" || r["type"] == "error" || r["type"] == "pong") && r["id"] == id {
            return r;
        }
    }
    panic!("no reply");
}

pub async fn subscribe(ws: &mut Ws, id: u64, channel: &str) -> Value {
    request(
        ws,
        json!({"type": "subscribe", "id": id, "channel": channel}),
    )
    .await
}

/// Collects message frames until `quiet` passes without one.
pub async fn drain_messages(ws: &mut Ws, quiet: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    while let Got::Json(v) = next_event(ws, quiet).await {
        if v["type"] == "message" {
            out.push(v);
        }
    }
    out
}

/// Waits for `n` message frames (skipping other frames), at most `within` in all; returns
/// those that came. Delivery is asynchronous (NATS, the hub, the client's outbox): a loaded
/// machine can take seconds, so expected messages are awaited, never assumed to come within
/// a short quiet period. Pair it with [`drain_messages`] to check that nothing more comes.
pub async fn expect_messages(ws: &mut Ws, n: usize, within: Duration) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_event(ws, left).await {
            Got::Json(v) if v["type"] == "message" => out.push(v),
            Got::Json(_) => {}
            Got::Closed(_) | Got::Timeout => break,
        }
    }
    out
}

/// The `n` message frames a client is waiting for (bounded: 20 s), then any that follow
/// within a short quiet period: for asserting that exactly these came.
pub async fn messages_then_quiet(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut got = expect_messages(ws, n, EXPECT).await;
    got.extend(drain_messages(ws, Duration::from_millis(300)).await);
    got
}

/// A position on a resumable channel (docs/protocol.md section 8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Since {
    pub epoch: String,
    pub seq: u64,
}

/// A request to the relay (docs/protocol.md section 2, "Client to relay").
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Request {
    Subscribe {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        channel: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        since: Option<Since>,
        /// A subscription token (docs/protocol.md section 3).
        #[serde(skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    Unsubscribe {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        channel: String,
    },
    /// Exactly one of `payload` and `text` is sent; the relay answers 400 otherwise.
    Publish {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        channel: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        payload: Option<Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        text: Option<String>,
        #[serde(rename = "msgId", skip_serializing_if = "Option::is_none")]
        msg_id: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    Subrefresh {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        channel: String,
        token: String,
    },
    Refresh {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        token: String,
    },
    Ping {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
}

impl Request {
    pub fn subscribe(id: u64, channel: &str) -> Self {
        Self::Subscribe {
            id: Some(id),
            channel: channel.into(),
            since: None,
            token: None,
        }
    }

    /// A subscribe with a subscription token.
    pub fn subscribe_with_token(id: u64, channel: &str, token: &str) -> Self {
        Self::Subscribe {
            id: Some(id),
            channel: channel.into(),
            since: None,
            token: Some(token.into()),
        }
    }

    /// A new subscription token for a live subscription.
    pub fn subrefresh(id: u64, channel: &str, token: &str) -> Self {
        Self::Subrefresh {
            id: Some(id),
            channel: channel.into(),
            token: token.into(),
        }
    }

    /// A resume from `since` (docs/protocol.md section 8).
    pub fn resume(id: u64, channel: &str, since: Since) -> Self {
        Self::Subscribe {
            id: Some(id),
            channel: channel.into(),
            since: Some(since),
            token: None,
        }
    }

    pub fn unsubscribe(id: u64, channel: &str) -> Self {
        Self::Unsubscribe {
            id: Some(id),
            channel: channel.into(),
        }
    }

    /// A publish of a JSON `payload`.
    pub fn publish(id: u64, channel: &str, payload: Value) -> Self {
        Self::Publish {
            id: Some(id),
            channel: channel.into(),
            payload: Some(payload),
            text: None,
            msg_id: None,
            token: None,
        }
    }

    /// A publish of a `text` payload.
    pub fn publish_text(id: u64, channel: &str, text: &str) -> Self {
        Self::Publish {
            id: Some(id),
            channel: channel.into(),
            payload: None,
            text: Some(text.into()),
            msg_id: None,
            token: None,
        }
    }

    pub fn refresh(id: u64, token: &str) -> Self {
        Self::Refresh {
            id: Some(id),
            token: token.into(),
        }
    }

    pub fn ping(id: u64) -> Self {
        Self::Ping { id: Some(id) }
    }

    /// Its `id`, if it has one.
    pub fn id(&self) -> Option<u64> {
        match self {
            Self::Subscribe { id, .. }
            | Self::Unsubscribe { id, .. }
            | Self::Publish { id, .. }
            | Self::Refresh { id, .. }
            | Self::Subrefresh { id, .. }
            | Self::Ping { id } => *id,
        }
    }

    /// The frame's JSON text, as sent.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("a request serializes")
    }
}

/// A frame the relay sends (docs/protocol.md section 2, "Relay to client"). Fields a frame
/// may lack are `Option`s; fields the relay adds later are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Frame {
    #[serde(rename_all = "camelCase")]
    Welcome {
        protocol: String,
        max_message_bytes: u64,
        anonymous: bool,
        /// What the connect step's backend replied.
        #[serde(default)]
        data: Option<Value>,
    },
    /// `epoch`/`seq`/`recovered` on a resumable channel's subscribe, `seq` on its publish.
    Ok {
        id: Option<Value>,
        epoch: Option<String>,
        seq: Option<u64>,
        recovered: Option<bool>,
        /// A subscribe's backend `data`.
        #[serde(default)]
        data: Option<Value>,
    },
    #[serde(rename_all = "camelCase")]
    Error {
        id: Option<Value>,
        code: u16,
        reason: String,
        #[serde(default)]
        app_code: Option<u16>,
    },
    Pong {
        id: Option<Value>,
    },
    /// One of `payload`, `text`, `base64`; `seq`/`prev` on a resumable channel.
    Message {
        channel: String,
        payload: Option<Value>,
        text: Option<String>,
        base64: Option<String>,
        seq: Option<u64>,
        prev: Option<u64>,
    },
    Dropped {
        channel: String,
        count: u64,
    },
    Unsubscribed {
        channel: String,
        reason: String,
    },
    #[serde(rename_all = "camelCase")]
    Drain {
        reconnect_after_ms: u64,
        /// `shutdown` or `rebalance`.
        #[serde(default)]
        reason: Option<String>,
    },
}

impl Frame {
    /// Whether it answers the request with `id` (an `ok`, `error` or `pong`).
    pub fn answers(&self, want: u64) -> bool {
        match self {
            Self::Ok { id, .. } | Self::Error { id, .. } | Self::Pong { id } => {
                id.as_ref().and_then(Value::as_u64) == Some(want)
            }
            _ => false,
        }
    }
}

/// What a typed read gave.
#[derive(Debug, PartialEq)]
pub enum Event {
    Frame(Frame),
    /// The close frame's code, if there was one.
    Closed(Option<u16>),
    Timeout,
}

/// How to connect a [`Client`]: query string, headers, subprotocols.
#[derive(Debug, Clone)]
pub struct Connect {
    addr: SocketAddr,
    query: String,
    headers: Vec<(String, String)>,
}

impl Connect {
    /// The query string, with its `?` (e.g. `?token=...`).
    pub fn query(mut self, query: &str) -> Self {
        self.query = query.into();
        self
    }

    /// An extra request header (repeatable: values are appended).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Offers subprotocols, e.g. `["wsrelay.v1", "bearer.<token>"]`.
    pub fn subprotocols(self, protocols: &[&str]) -> Self {
        self.header("Sec-WebSocket-Protocol", &protocols.join(", "))
    }

    /// Opens the connection; `Err(status)` if refused before the upgrade. Reads nothing.
    pub async fn open(self) -> Result<Client, u16> {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        connect_with(self.addr, &self.query, &headers)
            .await
            .map(Client::from)
    }

    /// Opens the connection and reads the welcome frame (panics without one).
    pub async fn welcomed(self) -> (Client, Frame) {
        let mut c = self.open().await.expect("refused");
        let w = c.frame().await.expect("welcome");
        assert!(matches!(w, Frame::Welcome { .. }), "{w:?}");
        (c, w)
    }
}

/// A typed client of the protocol. It derefs to its [`Ws`], so the JSON-level functions of
/// this module, and raw sends, work on it too.
#[derive(Debug)]
pub struct Client {
    ws: Ws,
    next_id: u64,
}

impl From<Ws> for Client {
    fn from(ws: Ws) -> Self {
        Self { ws, next_id: 1 }
    }
}

impl std::ops::Deref for Client {
    type Target = Ws;
    fn deref(&self) -> &Ws {
        &self.ws
    }
}

impl std::ops::DerefMut for Client {
    fn deref_mut(&mut self) -> &mut Ws {
        &mut self.ws
    }
}

impl Client {
    /// `Client::connect(addr).query("?token=..").welcomed().await`.
    pub fn connect(addr: SocketAddr) -> Connect {
        Connect {
            addr,
            query: String::new(),
            headers: Vec::new(),
        }
    }

    pub fn into_inner(self) -> Ws {
        self.ws
    }

    /// A request id not used yet on this client (counting up from 1).
    pub fn id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub async fn send(&mut self, r: &Request) {
        self.ws
            .send(Message::text(r.to_text()))
            .await
            .expect("send");
    }

    /// The next frame or close within `within` (skipping pings).
    pub async fn next(&mut self, within: Duration) -> Event {
        match next_event(&mut self.ws, within).await {
            Got::Json(v) => Event::Frame(
                serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}")),
            ),
            Got::Closed(code) => Event::Closed(code),
            Got::Timeout => Event::Timeout,
        }
    }

    /// The next frame, waited for (20 s); `None` on a close or timeout.
    pub async fn frame(&mut self) -> Option<Frame> {
        match self.next(EXPECT).await {
            Event::Frame(f) => Some(f),
            _ => None,
        }
    }

    /// Sends `r` and returns its answer (skipping other frames). `r` needs an id.
    pub async fn request(&mut self, r: &Request) -> Frame {
        let id = r.id().expect("a request with an id");
        self.send(r).await;
        for _ in 0..1000 {
            let f = self.frame().await.expect("reply");
            if f.answers(id) {
                return f;
            }
        }
        panic!("no reply to {id}");
    }

    pub async fn subscribe(&mut self, channel: &str) -> Frame {
        let id = self.id();
        self.request(&Request::subscribe(id, channel)).await
    }

    pub async fn resume(&mut self, channel: &str, since: Since) -> Frame {
        let id = self.id();
        self.request(&Request::resume(id, channel, since)).await
    }

    /// A subscribe with a subscription token (docs/protocol.md section 3).
    pub async fn subscribe_with_token(&mut self, channel: &str, token: &str) -> Frame {
        let id = self.id();
        self.request(&Request::subscribe_with_token(id, channel, token))
            .await
    }

    /// A new subscription token for a live subscription.
    pub async fn subrefresh(&mut self, channel: &str, token: &str) -> Frame {
        let id = self.id();
        self.request(&Request::subrefresh(id, channel, token)).await
    }

    pub async fn unsubscribe(&mut self, channel: &str) -> Frame {
        let id = self.id();
        self.request(&Request::unsubscribe(id, channel)).await
    }

    pub async fn publish(&mut self, channel: &str, payload: Value) -> Frame {
        let id = self.id();
        self.request(&Request::publish(id, channel, payload)).await
    }

    pub async fn refresh(&mut self, token: &str) -> Frame {
        let id = self.id();
        self.request(&Request::refresh(id, token)).await
    }

    pub async fn ping(&mut self) -> Frame {
        let id = self.id();
        self.request(&Request::ping(id)).await
    }

    /// Waits for `n` message frames (skipping others), at most `within` in all.
    pub async fn messages(&mut self, n: usize, within: Duration) -> Vec<Frame> {
        let deadline = tokio::time::Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Event::Frame(f @ Frame::Message { .. }) => out.push(f),
                Event::Frame(_) => {}
                Event::Closed(_) | Event::Timeout => break,
            }
        }
        out
    }

    /// The close code within `within` (skipping frames); `None` without a code or in time.
    pub async fn close_code(&mut self, within: Duration) -> Option<u16> {
        close_code(&mut self.ws, within).await
    }
}

/// Why [`read_value`] or [`read_frame`] got no frame.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("closed by the relay: {0:?}")]
    Closed(Option<tungstenite::protocol::CloseFrame>),
    #[error("connection ended")]
    Ended,
    #[error(transparent)]
    WebSocket(#[from] tungstenite::Error),
    #[error("not a frame of the protocol: {0}")]
    Json(#[from] serde_json::Error),
}

/// The next text frame as JSON, unbounded in time (the caller bounds it); skips pings.
pub async fn read_value(ws: &mut Ws) -> Result<Value, ReadError> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(t.as_str())?),
            Some(Ok(Message::Close(c))) => return Err(ReadError::Closed(c)),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => return Err(ReadError::Ended),
        }
    }
}

/// The next text frame, typed; like [`read_value`].
pub async fn read_frame(ws: &mut Ws) -> Result<Frame, ReadError> {
    Ok(serde_json::from_value(read_value(ws).await?)?)
}

/// A frame's `type` and `id`, the rest skipped unparsed: a message's payload builds no value
/// tree (for a client that reads many frames while it waits for one reply).
#[derive(Debug, Deserialize)]
pub struct Head<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: &'a str,
    pub id: Option<u64>,
}

impl Head<'_> {
    /// Whether the frame at `text` answers request `id`: `Some(true)` for `ok`/`pong`,
    /// `Some(false)` for `error`, `None` for any other frame (or another id).
    pub fn reply_to(text: &[u8], id: u64) -> Option<bool> {
        let h: Head<'_> = serde_json::from_slice(text).ok()?;
        if h.id != Some(id) {
            return None;
        }
        match h.kind {
            "ok" | "pong" => Some(true),
            "error" => Some(false),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_encode_as_documented() {
        assert_eq!(
            Request::subscribe(1, "news").to_text(),
            r#"{"type":"subscribe","id":1,"channel":"news"}"#
        );
        let since = Since {
            epoch: "e".into(),
            seq: 7,
        };
        assert_eq!(
            Request::resume(2, "o.1", since).to_text(),
            r#"{"type":"subscribe","id":2,"channel":"o.1","since":{"epoch":"e","seq":7}}"#
        );
        assert_eq!(
            Request::publish_text(3, "c", "hi").to_text(),
            r#"{"type":"publish","id":3,"channel":"c","text":"hi"}"#
        );
        assert_eq!(Request::ping(4).to_text(), r#"{"type":"ping","id":4}"#);
    }

    #[test]
    fn frames_decode_as_documented() {
        let f: Frame = serde_json::from_str(
            r#"{"type":"welcome","protocol":"wsrelay.v1","maxMessageBytes":65536,"anonymous":false}"#,
        )
        .unwrap();
        assert_eq!(
            f,
            Frame::Welcome {
                protocol: "wsrelay.v1".into(),
                max_message_bytes: 65536,
                anonymous: false,
                data: None,
            }
        );
        let f: Frame = serde_json::from_str(
            r#"{"type":"message","channel":"o.1","seq":3,"prev":1,"payload":{"n":1}}"#,
        )
        .unwrap();
        assert!(matches!(
            f,
            Frame::Message {
                seq: Some(3),
                prev: Some(1),
                ..
            }
        ));
        let f: Frame = serde_json::from_str(
            r#"{"type":"drain","reconnectAfterMs":3712,"reason":"rebalance"}"#,
        )
        .unwrap();
        assert_eq!(
            f,
            Frame::Drain {
                reconnect_after_ms: 3712,
                reason: Some("rebalance".into())
            }
        );
        let f: Frame =
            serde_json::from_str(r#"{"type":"error","id":null,"code":400,"reason":"x"}"#).unwrap();
        assert!(!f.answers(1));
    }

    #[test]
    fn heads_find_replies_without_reading_payloads() {
        assert_eq!(Head::reply_to(br#"{"type":"ok","id":1}"#, 1), Some(true));
        assert_eq!(
            Head::reply_to(br#"{"type":"error","id":2,"code":403,"reason":"x"}"#, 2),
            Some(false)
        );
        assert_eq!(Head::reply_to(br#"{"type":"ok","id":1}"#, 2), None);
        assert_eq!(
            Head::reply_to(br#"{"type":"message","channel":"c","payload":{"t":1}}"#, 1),
            None
        );
    }
}
