//! Limits that are bookkeeping rather than I/O: the per-connection request rate limit
//! (`governor`), and counters of open connections per key (client address, token subject)
//! and of handshakes in flight.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// What the rate limiter says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the rate.
    Allowed,
    /// Above the rate: refuse it (429).
    Limited,
    /// Above the rate for the `2 × burst`-th time in a row: close the connection (4029).
    Flood,
}

/// One connection's rate limit over the requests that cost NATS work (subscribe,
/// unsubscribe, publish): a GCRA limiter (`governor`), `rate` per second with bursts of
/// `burst`, and the count of refusals in a row that makes a flood.
pub struct RequestLimiter<C: Clock = DefaultClock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
    flood_after: u32,
    refused_in_a_row: u32,
}

impl<C: Clock> std::fmt::Debug for RequestLimiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestLimiter")
            .field("flood_after", &self.flood_after)
            .field("refused_in_a_row", &self.refused_in_a_row)
            .finish_non_exhaustive()
    }
}

impl RequestLimiter {
    /// A limiter with a full burst.
    pub fn new(rate_per_second: u32, burst: u32) -> Self {
        Self::with_clock(rate_per_second, burst, DefaultClock::default())
    }
}

impl<C: Clock> RequestLimiter<C> {
    /// The same with a given clock (tests).
    pub fn with_clock(rate_per_second: u32, burst: u32, clock: C) -> Self {
        let rate = NonZeroU32::new(rate_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: RateLimiter::direct_with_clock(
                Quota::per_second(rate).allow_burst(burst),
                clock,
            ),
            flood_after: burst.get().saturating_mul(2),
            refused_in_a_row: 0,
        }
    }

    /// Takes one request's cell.
    pub fn check(&mut self) -> Verdict {
        if self.limiter.check().is_ok() {
            self.refused_in_a_row = 0;
            return Verdict::Allowed;
        }
        self.refused_in_a_row += 1;
        if self.refused_in_a_row >= self.flood_after {
            Verdict::Flood
        } else {
            Verdict::Limited
        }
    }
}

/// Open connections per key (client address, token subject). Keys at zero are removed, so
/// the map holds only keys with open connections.
#[derive(Debug)]
pub struct ConnCounter<K: Eq + Hash> {
    counts: Mutex<HashMap<K, u32>>,
}

impl<K: Eq + Hash> Default for ConnCounter<K> {
    fn default() -> Self {
        Self {
            counts: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone> ConnCounter<K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, u32>> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one more connection for `key` unless it has `max` already (`max` 0: no limit,
    /// but counted all the same so that a limit set by a reload sees the open ones).
    pub fn try_acquire(self: &Arc<Self>, key: K, max: u32) -> Option<CountGuard<K>> {
        let mut g = self.lock();
        let n = g.entry(key.clone()).or_insert(0);
        if max != 0 && *n >= max {
            return None;
        }
        *n += 1;
        drop(g);
        Some(CountGuard {
            counter: self.clone(),
            key: Some(key),
        })
    }

    /// Open connections counted for `key`.
    pub fn count(&self, key: &K) -> u32 {
        self.lock().get(key).copied().unwrap_or(0)
    }

    /// Keys with open connections.
    pub fn keys(&self) -> usize {
        self.lock().len()
    }

    fn release(&self, key: &K) {
        let mut g = self.lock();
        if let Some(n) = g.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                g.remove(key);
            }
        }
    }
}

/// One counted connection; uncounted on drop.
#[derive(Debug)]
pub struct CountGuard<K: Eq + Hash + Clone> {
    counter: Arc<ConnCounter<K>>,
    key: Option<K>,
}

impl<K: Eq + Hash + Clone> Drop for CountGuard<K> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.counter.release(&k);
        }
    }
}

/// Storm control's token bucket over new connections (`limits.acceptRatePerSecond`,
/// `limits.acceptBurst`). Pure: the caller passes the time, and the rate and burst in force
/// (a config reload changes them without losing the tokens held). It starts full.
#[derive(Debug, Default)]
pub struct AcceptBucket {
    /// Tokens held, at most the burst, and when they were counted; `None` before the first take.
    state: Option<(f64, Instant)>,
}

impl AcceptBucket {
    /// Takes one token at `now`; false when none is left. A rate of 0 is no limit (always
    /// true, nothing counted). A burst of 0 counts as 1.
    pub fn take(&mut self, now: Instant, rate_per_second: u32, burst: u32) -> bool {
        if rate_per_second == 0 {
            self.state = None;
            return true;
        }
        let burst = f64::from(burst.max(1));
        let tokens = match self.state {
            None => burst,
            Some((held, at)) => {
                // `now` before `at` (two callers racing for the lock) adds nothing.
                let elapsed = now.saturating_duration_since(at).as_secs_f64();
                (held + elapsed * f64::from(rate_per_second)).min(burst)
            }
        };
        let (left, taken) = if tokens >= 1.0 {
            (tokens - 1.0, true)
        } else {
            (tokens, false)
        };
        // Keep the later instant so that a late `now` never gives the same time twice.
        let at = match self.state {
            Some((_, at)) if at > now => at,
            _ => now,
        };
        self.state = Some((left, at));
        taken
    }
}

/// Handshakes in flight (TCP accept to upgrade response).
#[derive(Debug, Default)]
pub struct InFlight {
    n: Arc<AtomicUsize>,
}

impl InFlight {
    /// Counts one more unless `max` are in flight.
    pub fn try_enter(&self, max: usize) -> Option<InFlightGuard> {
        let mut cur = self.n.load(Ordering::Relaxed);
        loop {
            if cur >= max {
                return None;
            }
            match self
                .n
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Some(InFlightGuard { n: self.n.clone() });
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Handshakes in flight now.
    pub fn get(&self) -> usize {
        self.n.load(Ordering::Relaxed)
    }
}

/// One handshake in flight; ends on drop.
#[derive(Debug)]
pub struct InFlightGuard {
    n: Arc<AtomicUsize>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.n.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The key a client address is counted under: the IPv4 address, or the /64 of an IPv6
/// address (one subscriber line usually gets a whole /64). IPv4-mapped IPv6 addresses
/// count as IPv4.
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
    }
}

/// Whether `ip` is one of the trusted proxies (`listen.trustedProxies`). Pure.
pub fn is_trusted_proxy(ip: IpAddr, trusted: &[ipnet::IpNet]) -> bool {
    let ip = ip.to_canonical();
    trusted.iter().any(|n| n.contains(&ip))
}

/// The client's address: `peer`, unless `peer` is a trusted proxy and `header` (the values
/// of the configured client-IP header, in order) names one. The list is read from the right
/// (the closest proxy appends last), skipping trusted proxies; the first other address is
/// the client. When every listed address is trusted, the leftmost is. A malformed entry
/// stops the walk: the last trusted hop before it is used, never something a client wrote
/// further left. Pure.
pub fn client_ip<'a>(
    peer: IpAddr,
    trusted: &[ipnet::IpNet],
    header: impl IntoIterator<Item = &'a str>,
) -> IpAddr {
    let is_trusted = |ip: &IpAddr| is_trusted_proxy(*ip, trusted);
    if trusted.is_empty() || !is_trusted(&peer) {
        return peer;
    }
    let entries: Vec<&str> = header
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for e in entries.iter().rev() {
        let Some(ip) = parse_forwarded_ip(e) else {
            break;
        };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    client
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`, `[2001:db8::1]:443`.
fn parse_forwarded_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|r| r.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::time::Duration;

    #[test]
    fn the_accept_bucket_admits_its_burst_then_the_rate() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut b = AcceptBucket::default();
        // Full at first: the burst at once, then nothing.
        let taken = (0..10).filter(|_| b.take(at(0), 2, 5)).count();
        assert_eq!(taken, 5);
        // 2 per second: one token after 500 ms, not before.
        assert!(!b.take(at(499), 2, 5));
        assert!(b.take(at(500), 2, 5));
        assert!(!b.take(at(500), 2, 5));
        // Refilled to the burst and no further, however long it waited.
        let taken = (0..10).filter(|_| b.take(at(60_000), 2, 5)).count();
        assert_eq!(taken, 5);
        // A time before the last one adds nothing (and takes nothing back).
        assert!(!b.take(at(59_000), 2, 5));
        assert!(b.take(at(60_500), 2, 5));
        // A reload that lowers the burst caps the tokens held.
        let taken = (0..10).filter(|_| b.take(at(120_000), 2, 2)).count();
        assert_eq!(taken, 2);
        // Rate 0: off, every take passes; turned on again it starts full.
        assert!((0..1000).all(|_| b.take(at(120_000), 0, 0)));
        let taken = (0..10).filter(|_| b.take(at(120_000), 1, 3)).count();
        assert_eq!(taken, 3);
    }

    #[test]
    fn limiter_allows_burst_then_rate_then_floods() {
        let clock = FakeRelativeClock::default();
        let mut l = RequestLimiter::with_clock(10, 5, clock.clone());
        let allowed = (0..5).filter(|_| l.check() == Verdict::Allowed).count();
        assert_eq!(allowed, 5);
        assert_eq!(l.check(), Verdict::Limited);
        // 100 ms later: one more.
        clock.advance(Duration::from_millis(100));
        assert_eq!(l.check(), Verdict::Allowed);
        // 2 × burst refusals in a row make a flood.
        let verdicts: Vec<Verdict> = (0..10).map(|_| l.check()).collect();
        assert_eq!(verdicts[..9], [Verdict::Limited; 9]);
        assert_eq!(verdicts[9], Verdict::Flood);
        // A long idle refills to the burst, not beyond.
        clock.advance(Duration::from_secs(60));
        assert_eq!((0..10).filter(|_| l.check() == Verdict::Allowed).count(), 5);
    }

    #[test]
    fn counter_limits_and_forgets() {
        let c: Arc<ConnCounter<&str>> = Arc::default();
        let a1 = c.try_acquire("a", 2).unwrap();
        let a2 = c.try_acquire("a", 2).unwrap();
        assert!(c.try_acquire("a", 2).is_none());
        assert!(c.try_acquire("b", 2).is_some());
        drop(a1);
        let a3 = c.try_acquire("a", 2).unwrap();
        drop((a2, a3));
        assert_eq!(c.count(&"a"), 0);
        assert_eq!(c.keys(), 0);
        let unlimited: Vec<_> = (0..5).map(|_| c.try_acquire("u", 0).unwrap()).collect();
        assert_eq!(c.count(&"u"), 5);
        drop(unlimited);
    }

    #[test]
    fn in_flight_is_bounded() {
        let f = InFlight::default();
        let g: Vec<_> = (0..3).filter_map(|_| f.try_enter(3)).collect();
        assert_eq!(g.len(), 3);
        assert!(f.try_enter(3).is_none());
        drop(g);
        assert_eq!(f.get(), 0);
    }

    #[test]
    fn client_ip_trusts_only_configured_proxies() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let peer = ip("10.1.2.3");
        // Untrusted peer: the header is ignored.
        assert_eq!(
            client_ip(ip("198.51.100.7"), &trusted, ["203.0.113.1"]),
            ip("198.51.100.7")
        );
        // Trusted peer: rightmost untrusted entry; a client-written left part is ignored.
        assert_eq!(
            client_ip(peer, &trusted, ["1.1.1.1, 203.0.113.1, 10.9.9.9"]),
            ip("203.0.113.1")
        );
        assert_eq!(
            client_ip(peer, &trusted, ["1.1.1.1", "203.0.113.1:4711"]),
            ip("203.0.113.1")
        );
        assert_eq!(
            client_ip(peer, &trusted, ["[2001:db8::1]:443"]),
            ip("2001:db8::1")
        );
        // No header, or garbage: the last trusted hop.
        assert_eq!(client_ip(peer, &trusted, []), peer);
        assert_eq!(client_ip(peer, &trusted, ["nonsense"]), peer);
        assert_eq!(
            client_ip(peer, &trusted, ["203.0.113.9, junk, 10.0.0.2"]),
            ip("10.0.0.2")
        );
        // Nothing trusted: the peer.
        assert_eq!(client_ip(peer, &[], ["203.0.113.1"]), peer);
    }

    #[test]
    fn ipv6_counts_per_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(ip_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(ip_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(ip_key(ip("192.0.2.1")), ip("192.0.2.1"));
    }
}
