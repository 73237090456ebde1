//! `make demo`'s client: signs a JWT, connects to a gateway through its Service, subscribes
//! to a channel, publishes a few messages on the NATS subject behind it, and prints each
//! message as it arrives over the WebSocket, with its publish-to-receive time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[derive(Debug, Parser)]
#[command(about = "Watch live NATS messages arrive through a wsrelay gateway")]
struct Args {
    /// The gateway's WebSocket URL, e.g. ws://10.96.12.34:80/ws
    #[arg(long)]
    url: String,
    /// The HS256 key the gateway verifies tokens with.
    #[arg(long)]
    hmac_key: String,
    /// `iss` of the token (when the gateway checks it).
    #[arg(long)]
    issuer: Option<String>,
    /// `aud` of the token (when the gateway checks it).
    #[arg(long)]
    audience: Option<String>,
    /// `sub` of the token: whose notifications to watch.
    #[arg(long, default_value = "alice")]
    user: String,
    /// `Origin` header to send (when the gateway has an allowlist).
    #[arg(long)]
    origin: Option<String>,
    /// The channel to subscribe to.
    #[arg(long, default_value = "notifications")]
    channel: String,
    /// NATS server to publish on.
    #[arg(long, default_value = "nats://127.0.0.1:14222")]
    nats: String,
    /// The NATS subject behind the channel for this user.
    #[arg(long)]
    subject: String,
    /// How many messages to publish, one every 500 ms.
    #[arg(long, default_value_t = 5)]
    count: u64,
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 600;
    let mut claims = json!({ "sub": args.user, "exp": exp });
    if let Some(iss) = &args.issuer {
        claims["iss"] = json!(iss);
    }
    if let Some(aud) = &args.audience {
        claims["aud"] = json!(aud);
    }
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(args.hmac_key.as_bytes()),
    )?;
    let mut request = args.url.as_str().into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    if let Some(origin) = &args.origin {
        request.headers_mut().insert("origin", origin.parse()?);
    }
    let (mut ws, response) = tokio_tungstenite::connect_async(request)
        .await
        .with_context(|| format!("connecting to {}", args.url))?;
    println!("connected to {} (HTTP {})", args.url, response.status());
    let subscribe = json!({ "type": "subscribe", "id": 1, "channel": args.channel });
    ws.send(Message::text(subscribe.to_string())).await?;
    println!("> {subscribe}");

    let nats = async_nats::connect(&args.nats)
        .await
        .with_context(|| format!("connecting to NATS at {}", args.nats))?;
    let mut publishing = None;
    let mut received = 0;
    let deadline = tokio::time::sleep(Duration::from_secs(30));
    tokio::pin!(deadline);
    while received < args.count {
        let frame = tokio::select! {
            _ = &mut deadline => bail!("only {received} of {} messages arrived within 30 s", args.count),
            frame = ws.next() => frame,
        };
        let text = match frame {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("the relay closed the connection"),
        };
        let v: Value = serde_json::from_str(&text)?;
        println!("< {text}");
        match v["type"].as_str() {
            Some("ok") if publishing.is_none() => {
                let (nats, subject, count) = (nats.clone(), args.subject.clone(), args.count);
                println!("publishing {count} messages on NATS subject {subject}");
                publishing = Some(tokio::spawn(async move {
                    for n in 1..=count {
                        let body = json!({ "n": n, "sentAtMs": now_ms() as u64 }).to_string();
                        nats.publish(subject.clone(), body.into()).await?;
                        nats.flush().await?;
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    anyhow::Ok(())
                }));
            }
            Some("message") => {
                received += 1;
                if let Some(sent) = v["payload"]["sentAtMs"].as_u64() {
                    let took = now_ms().saturating_sub(u128::from(sent));
                    println!("  message {received}: NATS -> relay pod -> this client in {took} ms");
                }
            }
            Some("error") => bail!("the relay refused: {text}"),
            _ => {}
        }
    }
    if let Some(p) = publishing {
        p.await??;
    }
    ws.close(None).await.ok();
    println!("received all {} messages", args.count);
    Ok(())
}
