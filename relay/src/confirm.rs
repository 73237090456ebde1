//! Confirmation that the NATS server has processed everything the relay's connection sent
//! before (a SUB above all): the relay publishes a fresh random token to a subject of its own
//! and waits for it to come back on its own subscription. The server handles one connection's
//! commands in order, so the echo comes after the SUB took effect.
//!
//! Nothing another NATS client does can answer or delay it: a request that waits for "no
//! responders" (what the relay did before) is swallowed by any silent subscriber on `>`; an
//! echo is delivered to us whoever else listens, and a token is guessed by no one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use tokio::sync::{OnceCell, oneshot};

/// The first token of the confirmation subject; under the prefix the relay reserves.
const CONFIRM_TOKEN: &str = "confirm";

/// Why a round trip could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfirmError {
    /// The subscription to the confirmation subject could not be made.
    #[error("cannot subscribe to the confirmation subject")]
    Subscribe,
    /// The token could not be published (the NATS client is gone).
    #[error("cannot publish the confirmation")]
    Publish,
    /// The subscription ended before the token came back.
    #[error("the confirmation subscription ended")]
    Ended,
}

type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>;

fn lock(w: &Waiting) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<()>>> {
    w.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One relay's confirmation subject and the round trips waiting on it.
#[derive(Debug)]
pub struct Confirmer {
    client: async_nats::Client,
    subject: String,
    waiting: Waiting,
    /// The subscription, made on the first round trip (async-nats renews it after a
    /// reconnect).
    started: OnceCell<()>,
}

/// Forgets a round trip's token when it ends, answered or not (a timeout drops the future).
struct Pending<'a> {
    waiting: &'a Waiting,
    token: u64,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        lock(self.waiting).remove(&self.token);
    }
}

impl Confirmer {
    /// A confirmer over `client`, on `<prefix>.confirm.<random>`.
    pub fn new(client: async_nats::Client, prefix: &str) -> Self {
        let subject = format!("{prefix}.{CONFIRM_TOKEN}.{:032x}", rand::random::<u128>());
        Self {
            client,
            subject,
            waiting: Arc::default(),
            started: OnceCell::new(),
        }
    }

    /// The subject this relay confirms on.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Returns once the server has processed every command this connection sent before the
    /// call. Unbounded: the caller bounds it.
    pub async fn round_trip(&self) -> Result<(), ConfirmError> {
        self.started
            .get_or_try_init(|| async {
                let mut sub = self
                    .client
                    .subscribe(self.subject.clone())
                    .await
                    .map_err(|_| ConfirmError::Subscribe)?;
                let waiting = self.waiting.clone();
                tokio::spawn(async move {
                    while let Some(m) = sub.next().await {
                        let token = std::str::from_utf8(&m.payload)
                            .ok()
                            .and_then(|t| t.parse::<u64>().ok());
                        if let Some(tx) = token.and_then(|t| lock(&waiting).remove(&t)) {
                            let _ = tx.send(());
                        }
                    }
                    // The client is gone: wake every waiter with the error.
                    lock(&waiting).clear();
                });
                Ok::<(), ConfirmError>(())
            })
            .await?;
        let token = rand::random::<u64>();
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(token, tx);
        let _pending = Pending {
            waiting: &self.waiting,
            token,
        };
        self.client
            .publish(self.subject.clone(), token.to_string().into())
            .await
            .map_err(|_| ConfirmError::Publish)?;
        rx.await.map_err(|_| ConfirmError::Ended)
    }
}
