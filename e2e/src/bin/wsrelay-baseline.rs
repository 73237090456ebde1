//! `wsrelay-baseline`: the bare broadcast server of `make bench`, this machine's practical
//! limit for WebSocket fan-out. No auth, no NATS, no protocol beyond one line: a client that
//! opens `/sub?c=<channel>` receives every frame published on that channel, a client that
//! opens `/pub` publishes by sending text frames `<channel> <payload>`. One tokio worker
//! (current-thread runtime); per connection a bounded queue drained by one writer task that
//! feeds every queued frame and flushes once; one encoded frame shared by every recipient.
//! A full queue drops the message for that connection (counted). Loopback only.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Result, bail};
use clap::Parser;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

#[derive(Debug, Parser)]
#[command(about = "Bare WebSocket broadcast server: the benchmark's baseline (loopback only)")]
struct Args {
    /// Listen address (loopback only).
    #[arg(long, default_value = "127.0.0.1:18090")]
    listen: SocketAddrV4,
    /// Frames queued per connection before messages are dropped for it.
    #[arg(long, default_value_t = 256)]
    queue: usize,
}

type Subscribers = HashMap<String, HashMap<u64, mpsc::Sender<Utf8Bytes>>>;

#[derive(Default)]
struct Hub {
    channels: Mutex<Subscribers>,
    next_id: AtomicU64,
    dropped: AtomicU64,
}

impl Hub {
    fn publish(&self, channel: &str, frame: Utf8Bytes) {
        let channels = match self.channels.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        if let Some(subs) = channels.get(channel) {
            for tx in subs.values() {
                if tx.try_send(frame.clone()).is_err() {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn set(&self, channel: &str, id: u64, tx: Option<mpsc::Sender<Utf8Bytes>>) {
        let mut channels = match self.channels.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        match tx {
            Some(tx) => {
                channels
                    .entry(channel.to_string())
                    .or_default()
                    .insert(id, tx);
            }
            None => {
                if let Some(subs) = channels.get_mut(channel) {
                    subs.remove(&id);
                    if subs.is_empty() {
                        channels.remove(channel);
                    }
                }
            }
        }
    }
}

// tungstenite's handshake callback returns its (large) error response by value.
#[allow(clippy::result_large_err)]
async fn serve(stream: TcpStream, hub: Arc<Hub>, queue: usize) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut target = String::new();
    let callback = |req: &Request, resp: Response| {
        target = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default();
        Ok(resp)
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let ws =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await?;
    let (mut sink, mut source) = ws.split();
    if target == "/pub" {
        while let Some(msg) = source.next().await {
            if let Message::Text(t) = msg?
                && let Some((channel, payload)) = t.split_once(' ')
            {
                hub.publish(channel, Utf8Bytes::from(payload.to_string()));
            }
        }
        return Ok(());
    }
    let Some(channel) = target.strip_prefix("/sub?c=").map(str::to_string) else {
        bail!("unknown path {target}");
    };
    let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Utf8Bytes>(queue.max(1));
    hub.set(&channel, id, Some(tx));
    let writer = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            sink.feed(Message::Text(first)).await?;
            while let Ok(more) = rx.try_recv() {
                sink.feed(Message::Text(more)).await?;
            }
            sink.flush().await?;
        }
        anyhow::Ok(())
    });
    // The reader only answers pings (tungstenite queues the pong) and notices the end.
    while let Some(msg) = source.next().await {
        if msg.is_err() {
            break;
        }
    }
    hub.set(&channel, id, None);
    writer.abort();
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !args.listen.ip().is_loopback() {
        bail!("{} is not a loopback address", args.listen.ip());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // The same listen backlog as the other servers (the kernel caps it at somaxconn).
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(args.listen.into())?;
        let listener = socket.listen(65_535)?;
        let hub = Arc::new(Hub::default());
        loop {
            let (stream, _) = listener.accept().await?;
            let hub = hub.clone();
            tokio::spawn(async move {
                let _ = serve(stream, hub, args.queue).await;
            });
        }
    })
}
