//! Following a family of keys of the connection registry that the control service writes
//! (revocations, server-side subscriptions): each key's last value, then every change, until
//! the relay stops; the watch starts again after an error. `/ready` waits for the flag it sets
//! once the keys present at the start were read.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use crate::state::Relay;

/// Pause before the watch starts again after an error.
const RETRY: Duration = Duration::from_secs(2);

/// Applies every key under `filter` and every change of one (`None`: removed) with `apply`,
/// in order, until the relay stops; sets `read` once the keys present at the start were
/// applied. Nothing without `control` (the keys are written through it) or a registry.
pub async fn follow<F, Fut>(
    relay: &Arc<Relay>,
    filter: &str,
    read: &AtomicBool,
    what: &'static str,
    mut apply: F,
) where
    F: FnMut(String, Option<Bytes>) -> Fut,
    Fut: Future<Output = ()>,
{
    if relay.settings().config.control.is_none() {
        return;
    }
    let Some(registry) = relay.registry.clone() else {
        return;
    };
    loop {
        let watched = async {
            let (pending, mut changes) = registry.watch(filter).await?;
            let mut n = 0u64;
            if pending == 0 {
                read.store(true, Ordering::SeqCst);
            }
            while let Some(change) = changes.next().await {
                let (key, value) = change?;
                apply(key, value).await;
                n += 1;
                if n >= pending {
                    read.store(true, Ordering::SeqCst);
                }
            }
            Ok::<(), crate::registry::RegistryError>(())
        };
        tokio::select! {
            () = relay.shutdown.cancelled() => return,
            r = watched => if let Err(e) = r {
                tracing::debug!(error = %e, what, "registry watch ended; starting again");
            },
        }
        tokio::select! {
            () = relay.shutdown.cancelled() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}
