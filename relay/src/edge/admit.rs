//! Admission, once for every transport: whether a client may open a connection (a WebSocket
//! upgrade or an SSE session), checked cheapest first — draining, connections per client
//! address, the process's connection slots, the accept rate (storm control), the token
//! (Origin, signature, claims), connections per token subject — and the counters it holds
//! for the connection's life.
//! A refusal is a [`Refusal`]: one table from it to the HTTP status, the metric label, the
//! `Retry-After`, and the close code and text when it is answered after the upgrade.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http::{HeaderMap, StatusCode};

use crate::access::{Denied, Who};
use crate::auth::{AuthError, Identity, TokenVia};
use crate::limits::{AcceptBucket, ConnCounter, CountGuard, InFlight, client_ip, ip_key};
use crate::protocol::close;
use crate::session::auto::AutoSubscribe;
use crate::slots::{Slot, Slots};
use crate::state::Relay;

/// The counters admission draws on, shared by both transports.
#[derive(Debug)]
pub struct Admission {
    /// Open-connection slots (`limits.maxConnections`).
    pub slots: Arc<Slots>,
    /// Open connections per client address (`limits.maxConnectionsPerIp`).
    pub per_ip: Arc<ConnCounter<IpAddr>>,
    /// Open connections per token `sub` (`limits.maxConnectionsPerSubject`).
    pub per_subject: Arc<ConnCounter<String>>,
    /// HTTP handshakes in flight (`limits.maxHandshakesInFlight`).
    pub handshakes: InFlight,
    /// TCP connections in their handshake per client address
    /// (`limits.maxHandshakesInFlightPerIp`).
    pub handshakes_per_ip: Arc<ConnCounter<IpAddr>>,
    /// New connections per second (`limits.acceptRatePerSecond`, storm control).
    pub accept: Mutex<AcceptBucket>,
}

impl Admission {
    /// Counters for at most `max_connections` open connections.
    pub fn new(max_connections: usize) -> Self {
        Self {
            slots: Arc::new(Slots::new(max_connections)),
            per_ip: Arc::default(),
            per_subject: Arc::default(),
            handshakes: InFlight::default(),
            handshakes_per_ip: Arc::default(),
            accept: Mutex::default(),
        }
    }
}

/// Why a client may not open a connection.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Not a WebSocket upgrade request.
    #[error("not a WebSocket request")]
    NotWebsocket,
    /// The relay is draining.
    #[error("draining")]
    Draining,
    /// A rebalancing round sheds this relay's connections: new ones go to another relay.
    #[error("rebalancing")]
    Rebalancing,
    /// `limits.maxConnectionsPerIp` reached for the client's address.
    #[error("too many connections from {0}")]
    PerIp(IpAddr),
    /// `limits.maxConnections` reached.
    #[error("at capacity")]
    MaxConnections,
    /// `limits.acceptRatePerSecond`: no token left in the accept bucket (storm control).
    #[error("too many new connections per second")]
    AcceptRate,
    /// The token (or the Origin) is refused.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// `limits.maxConnectionsPerSubject` reached for the token's `sub`.
    #[error("too many connections for one token subject")]
    PerSubject,
    /// The token came in `Sec-WebSocket-Protocol` without our subprotocol offered.
    #[error("token in Sec-WebSocket-Protocol without the wsrelay subprotocol")]
    Subprotocol,
    /// The connect step's backend denied (`auth.connectRequest`).
    #[error("denied by the connect step's backend")]
    ConnectDenied,
    /// The connect step's backend did not decide (timeout, no responders, NATS down).
    #[error("the connect step's backend is unavailable")]
    ConnectUnavailable,
    /// The backend revoked the token (control service `revoke`, `invalidate`).
    #[error("the token was revoked")]
    Revoked,
    /// `limits.maxFleetConnectionsPerSubject` reached for the token's `sub`.
    #[error("too many connections for one token subject across the relays")]
    PerSubjectFleet,
    /// `?resume=` is not a connection id (docs/protocol.md section 1).
    #[error("resume is not a connection id")]
    BadResume,
    /// `?autoSubscribe=` is neither `true` nor `false` (docs/protocol.md section 9).
    #[error("autoSubscribe is neither true nor false")]
    BadAutoSubscribe,
    /// `Last-Event-ID` (or `?lastEventId=`) is not one the relay wrote (section 9).
    #[error("Last-Event-ID is not one the relay wrote: {0}")]
    BadLastEventId(#[from] super::sse::event_id::BadEventId),
}

impl Refusal {
    /// The HTTP status answered.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotWebsocket
            | Self::Subprotocol
            | Self::BadResume
            | Self::BadAutoSubscribe
            | Self::BadLastEventId(_) => StatusCode::BAD_REQUEST,
            Self::Draining
            | Self::Rebalancing
            | Self::MaxConnections
            | Self::AcceptRate
            | Self::ConnectUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::ConnectDenied => StatusCode::FORBIDDEN,
            Self::Revoked => StatusCode::UNAUTHORIZED,
            Self::PerIp(_) | Self::PerSubject | Self::PerSubjectFleet => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::Auth(e) => e.status(),
        }
    }

    /// The `reason` label of `wsrelay_connections_refused_total` (also the HTTP body).
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotWebsocket => "not_websocket",
            Self::Draining => "draining",
            Self::Rebalancing => "rebalancing",
            Self::PerIp(_) => "per_ip",
            Self::MaxConnections => "max_connections",
            Self::AcceptRate => "accept_rate",
            Self::Auth(e) => e.reason(),
            Self::PerSubject => "per_subject",
            Self::PerSubjectFleet => "per_subject_fleet",
            Self::Subprotocol => "subprotocol",
            Self::ConnectDenied => "connect_denied",
            Self::ConnectUnavailable => "connect_unavailable",
            Self::Revoked => "revoked",
            Self::BadResume => "bad_resume",
            Self::BadAutoSubscribe => "bad_auto_subscribe",
            Self::BadLastEventId(_) => "bad_last_event_id",
        }
    }

    /// Seconds a client should wait before trying again, when retrying may help.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            // A token comes back within a second at any rate (the rate is at least 1/s); a
            // crowd that retries then is spread by the clients' jitter (docs/client.md).
            Self::Draining | Self::Rebalancing | Self::AcceptRate => Some(1),
            Self::PerIp(_)
            | Self::MaxConnections
            | Self::PerSubject
            | Self::PerSubjectFleet
            | Self::ConnectUnavailable => Some(5),
            Self::Auth(e) if e.status() == StatusCode::SERVICE_UNAVAILABLE => Some(5),
            _ => None,
        }
    }

    /// The close code that stands for this refusal after the upgrade
    /// (`auth.refuseAfterUpgrade`); `None` for a request that is refused before it in any case.
    pub fn close_code(&self) -> Option<u16> {
        match self.status() {
            StatusCode::UNAUTHORIZED => Some(close::REFUSED_UNAUTHORIZED),
            StatusCode::FORBIDDEN => Some(close::REFUSED_FORBIDDEN),
            StatusCode::TOO_MANY_REQUESTS => Some(close::REFUSED_TOO_MANY),
            StatusCode::SERVICE_UNAVAILABLE => Some(close::REFUSED_UNAVAILABLE),
            _ => None,
        }
    }

    /// The close reason after the upgrade. Fixed texts: a reason never carries anything from
    /// the request (the token least of all).
    pub fn text(&self) -> &'static str {
        match self.label() {
            "no_token" => "no token",
            "invalid_token" => "invalid token",
            "origin" => "origin not allowed",
            "keys_unavailable" => "signing keys unavailable, retry later",
            "draining" => "relay draining, retry later",
            "rebalancing" => "relay rebalancing, retry later",
            "max_connections" => "relay at capacity, retry later",
            "accept_rate" => "too many new connections, retry later",
            "per_ip" => "too many connections from this address",
            "per_subject" | "per_subject_fleet" => "too many connections for this token subject",
            "connect_denied" => "denied by backend",
            "connect_unavailable" => "authorization backend unavailable, retry later",
            "revoked" => "token revoked",
            _ => "refused",
        }
    }
}

/// What an admitted connection holds for its life: its slot and its counts per address and
/// subject (released when dropped), and who it is.
#[derive(Debug)]
pub struct Admitted {
    /// Released with the connection.
    pub held: Held,
    /// The token's identity (claims, expiry), or anonymous.
    pub identity: Identity,
    /// Where the token was read.
    pub via: Option<TokenVia>,
    /// What the connect step's backend replied, for the `welcome`.
    pub data: Option<Arc<str>>,
    /// The connection it asks to resume (`?resume=`), a connection id.
    pub resume: Option<String>,
    /// Its auto-subscriptions, when it asked for them (docs/protocol.md section 9).
    pub auto: Option<AutoSubscribe>,
}

/// The header EventSource sends back the last event id in when it reconnects.
const LAST_EVENT_ID: &str = "last-event-id";

/// Whether a connection asks for its auto-subscriptions (`?autoSubscribe=true|false`, else
/// `by_default`), and where to resume them: `Last-Event-ID`, else `?lastEventId=` (the
/// header first: EventSource's own reconnect sends the newest id there, while the URL keeps
/// the one it was opened with). Pure.
pub fn auto_param(
    headers: &HeaderMap,
    query: Option<&str>,
    by_default: bool,
) -> Result<Option<AutoSubscribe>, Refusal> {
    let param = |name: &str| {
        query.and_then(|q| {
            form_urlencoded::parse(q.as_bytes()).find_map(|(k, v)| (k == name).then_some(v))
        })
    };
    let on = match param("autoSubscribe").as_deref() {
        None => by_default,
        Some("true" | "1") => true,
        Some("false" | "0") => false,
        Some(_) => return Err(Refusal::BadAutoSubscribe),
    };
    if !on {
        return Ok(None);
    }
    let id = match headers.get(LAST_EVENT_ID) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| super::sse::event_id::BadEventId::Entry)?
                .to_owned(),
        ),
        None => param("lastEventId").map(|v| v.into_owned()),
    };
    let since = match id {
        Some(id) => super::sse::event_id::decode(id.trim())?,
        None => Default::default(),
    };
    Ok(Some(AutoSubscribe { since }))
}

/// The `resume` query parameter: `Ok(None)` when absent, an error when it is not a
/// connection id (`<relay>/<digits>`). Pure.
pub fn resume_param(query: Option<&str>) -> Result<Option<String>, Refusal> {
    let Some(v) = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes()).find_map(|(k, v)| (k == "resume").then_some(v))
    }) else {
        return Ok(None);
    };
    match crate::events::parse_connection_id(&v) {
        Some(_) => Ok(Some(v.into_owned())),
        None => Err(Refusal::BadResume),
    }
}

/// The counts an open connection holds.
#[derive(Debug)]
pub struct Held {
    _slot: Slot,
    _per_ip: Option<CountGuard<IpAddr>>,
    _per_subject: Option<CountGuard<String>>,
}

/// The request as admission reads it.
#[derive(Debug, Clone, Copy)]
pub struct Asking<'a> {
    /// Its headers.
    pub headers: &'a HeaderMap,
    /// Its query string.
    pub query: Option<&'a str>,
    /// The TCP peer it came from.
    pub peer: Option<SocketAddr>,
    /// Whether it gets its auto-subscriptions unless it says `?autoSubscribe=false` (an SSE
    /// session; a WebSocket must ask).
    pub auto_by_default: bool,
}

/// Admits a connection, or says why not.
pub async fn admit(
    relay: &Relay,
    admission: &Admission,
    req: Asking<'_>,
) -> Result<Admitted, Refusal> {
    if relay.is_draining() {
        return Err(Refusal::Draining);
    }
    if relay.is_shedding() {
        return Err(Refusal::Rebalancing);
    }
    let resume = resume_param(req.query)?;
    let auto = auto_param(req.headers, req.query, req.auto_by_default)?;
    let settings = relay.settings();
    // Per client address first: the cheapest refusal, before any token is verified.
    let per_ip = match req.peer {
        Some(peer) => {
            let listen = &settings.config.listen;
            let values = req
                .headers
                .get_all(listen.client_ip_header.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok());
            let ip = client_ip(peer.ip(), &listen.trusted_proxies, values);
            let max = settings.config.limits.max_connections_per_ip;
            match admission.per_ip.try_acquire(ip_key(ip), max) {
                Some(g) => Some(g),
                None => {
                    tracing::debug!(%ip, "too many connections from one address");
                    return Err(Refusal::PerIp(ip));
                }
            }
        }
        None => None,
    };
    let Some(slot) = admission.slots.try_acquire() else {
        return Err(Refusal::MaxConnections);
    };
    // Storm control, before the first step that costs CPU (the token's verification) and
    // after the counters that refuse at no cost, so that a client they refuse does not spend
    // a token another client needed. A token spent by a handshake refused later is not given
    // back: the work it stood for was done.
    let (rate, burst) = (
        settings.config.limits.accept_rate_per_second,
        settings.config.limits.accept_burst(),
    );
    if rate > 0 {
        let mut bucket = admission.accept.lock().unwrap_or_else(|p| p.into_inner());
        if !bucket.take(Instant::now(), rate, burst) {
            tracing::debug!(rate, burst, "too many new connections per second");
            return Err(Refusal::AcceptRate);
        }
    }
    let (identity, via) = settings
        .authn
        .authenticate(req.headers, req.query)
        .await
        .inspect_err(|e| tracing::debug!(error = %e, "refused before the connection opened"))?;
    if identity
        .claims
        .as_ref()
        .is_some_and(|c| relay.revoked.covers(c, crate::clock::now_secs()))
    {
        return Err(Refusal::Revoked);
    }
    let per_subject = match identity.claims.as_ref().and_then(crate::auth::subject) {
        Some(sub) => {
            let max = settings.config.limits.max_connections_per_subject;
            match admission.per_subject.try_acquire(sub.to_owned(), max) {
                Some(g) => Some(g),
                None => {
                    tracing::debug!(sub, "too many connections for one token subject");
                    return Err(Refusal::PerSubject);
                }
            }
        }
        None => None,
    };
    if let (Some(sub), Some(registry)) = (
        identity.claims.as_ref().and_then(crate::auth::subject),
        relay.registry.as_ref(),
    ) {
        let max = settings.config.limits.max_fleet_connections_per_subject;
        if max > 0 {
            match registry.fleet_connections(sub).await {
                Ok(n) if n >= max => {
                    tracing::debug!(
                        sub,
                        n,
                        "too many connections for one token subject in the fleet"
                    );
                    return Err(Refusal::PerSubjectFleet);
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "fleet connections of a subject not counted"),
            }
        }
    }
    // Last: the only step that costs the application's backend a request.
    let who = Who {
        claims: identity.claims.as_ref(),
        relay: &relay.name,
        conn: None,
    };
    let data = settings
        .access
        .connect(who, relay.link())
        .await
        .map_err(|denied| match denied {
            Denied::Backend { .. } => Refusal::ConnectDenied,
            _ => Refusal::ConnectUnavailable,
        })?;
    Ok(Admitted {
        held: Held {
            _slot: slot,
            _per_ip: per_ip,
            _per_subject: per_subject,
        },
        identity,
        via,
        data,
        resume,
        auto,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_subscriptions_are_asked_for_by_the_transport_or_the_query_and_resumed_by_the_id() {
        let none = HeaderMap::new();
        assert_eq!(auto_param(&none, None, false).unwrap(), None);
        assert_eq!(
            auto_param(&none, None, true).unwrap(),
            Some(AutoSubscribe::default())
        );
        assert_eq!(
            auto_param(&none, Some("autoSubscribe=false"), true).unwrap(),
            None
        );
        assert!(
            auto_param(&none, Some("autoSubscribe=true"), false)
                .unwrap()
                .is_some()
        );
        let e = auto_param(&none, Some("autoSubscribe=yes"), true).unwrap_err();
        assert_eq!(
            (e.status(), e.label()),
            (StatusCode::BAD_REQUEST, "bad_auto_subscribe")
        );

        let q = Some("lastEventId=n%3Ae%3A3");
        let from_query = auto_param(&none, q, true).unwrap().unwrap();
        assert_eq!(from_query.since["n"].seq, 3);
        let mut h = HeaderMap::new();
        h.insert("Last-Event-ID", "n:e:7".parse().unwrap());
        assert_eq!(
            auto_param(&h, q, true).unwrap().unwrap().since["n"].seq,
            7,
            "the header first"
        );
        h.insert("Last-Event-ID", "n:e".parse().unwrap());
        let e = auto_param(&h, None, true).unwrap_err();
        assert_eq!(
            (e.status(), e.label()),
            (StatusCode::BAD_REQUEST, "bad_last_event_id")
        );
        // Not read when the connection has no auto-subscriptions.
        assert_eq!(auto_param(&h, None, false).unwrap(), None);
    }

    #[test]
    fn resume_is_a_connection_id_or_a_400() {
        assert_eq!(resume_param(None).unwrap(), None);
        assert_eq!(resume_param(Some("token=x")).unwrap(), None);
        assert_eq!(
            resume_param(Some("token=x&resume=relay-0%2F17")).unwrap(),
            Some("relay-0/17".into())
        );
        assert_eq!(
            resume_param(Some("resume=relay-0/17")).unwrap(),
            Some("relay-0/17".into())
        );
        for bad in ["resume=", "resume=relay-0", "resume=a%0Ab/1", "resume=r/1x"] {
            let e = resume_param(Some(bad)).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(e.label(), "bad_resume");
        }
    }
}
