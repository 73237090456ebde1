//! Access: whether a connection may use a channel, and may connect at all.
//!
//! A channel passes the bindings first (`crate::authz`: the matching binding, its subject
//! and the client's placeholder values), then the binding's `authorize` checks, cheapest
//! first: a subscription token ([`token`]), a CEL rule ([`rule`]), a question to the
//! application's backend over NATS ([`ask`]). All the checks a binding names must allow
//! (docs/protocol.md section 3). The connect step is [`ask`] alone, before the upgrade.

pub mod ask;
pub mod revoked;
pub mod rule;
pub mod token;

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::auth::{AuthError, Authenticator, KeyLoadError};
use crate::authz::{Authorizer, AuthzError, Operation, Resolved};
use crate::config::Config;
use crate::metrics::{Metrics, OpCheck};
use crate::protocol::ErrorCode;

/// Who asks: the connection's claims and its name in the `Wsrelay-Connection` header.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    /// The connection's claims; `None` when anonymous.
    pub claims: Option<&'a Map<String, Value>>,
    /// The relay's name, for `<relay>/<connection id>`.
    pub relay: &'a str,
    /// The connection's id; `None` before the upgrade (the connect step).
    pub conn: Option<u64>,
}

/// What the checks reach: the relay's NATS connection (and whether it is up) and metrics.
#[derive(Debug, Clone, Copy)]
pub struct Link<'a> {
    /// The NATS client backend requests go out on.
    pub nats: &'a async_nats::Client,
    /// Whether it is connected now: a request while it is not is a failure at once.
    pub connected: bool,
    /// The relay's metrics.
    pub metrics: &'a Metrics,
}

/// The subscription token a request comes with.
#[derive(Debug, Clone, Copy)]
pub enum Presented<'a> {
    /// None.
    None,
    /// This one, to verify.
    Token(&'a str),
    /// None, but the connection holds the channel with a live, verified one (a publish
    /// on a subscribed channel, or a re-check after a `refresh`).
    Held,
}

/// What a channel that passed every check gives.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The subject and history of the binding.
    pub resolved: Resolved,
    /// The backend's `data` (raw JSON), for the `ok`.
    pub data: Option<Arc<str>>,
    /// When the subscription token presented expires.
    pub token_expires_at: Option<u64>,
}

/// Why a channel, or a connection, was refused.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    /// The bindings refuse it.
    #[error(transparent)]
    Binding(#[from] AuthzError),
    /// The binding needs a subscription token and none came.
    #[error("channel needs a subscription token")]
    TokenMissing,
    /// The token does not verify.
    #[error("subscription token: {0}")]
    TokenInvalid(AuthError),
    /// The token verifies, but not for this connection and channel.
    #[error("subscription token {0}")]
    TokenMismatch(&'static str),
    /// The rule is not `true`.
    #[error("denied by rule")]
    Rule,
    /// The backend said no.
    #[error("{reason}")]
    Backend {
        /// Its reason, checked (printable, at most 256 bytes).
        reason: String,
        /// Its `code` (4000 to 4999), for the client's `appCode`.
        app_code: Option<u16>,
    },
    /// The backend did not decide: timeout, no responders, NATS down, a bad reply.
    #[error("authorization backend unavailable")]
    Unavailable,
}

impl Denied {
    /// The error code the client hears.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Binding(e) => e.code(),
            Self::TokenInvalid(AuthError::KeysUnavailable(_)) => ErrorCode::Unavailable,
            Self::TokenInvalid(_) => ErrorCode::Unauthorized,
            Self::TokenMissing | Self::TokenMismatch(_) | Self::Rule | Self::Backend { .. } => {
                ErrorCode::Forbidden
            }
            Self::Unavailable => ErrorCode::Unavailable,
        }
    }

    /// The backend's code for the client's `appCode`.
    pub fn app_code(&self) -> Option<u16> {
        match self {
            Self::Backend { app_code, .. } => *app_code,
            _ => None,
        }
    }

    /// The check that denied, for `wsrelay_authorize_denied_total`.
    fn check(&self) -> Option<&'static str> {
        match self {
            Self::Binding(_) => None,
            Self::TokenMissing | Self::TokenInvalid(_) | Self::TokenMismatch(_) => Some("token"),
            Self::Rule => Some("rule"),
            Self::Backend { .. } | Self::Unavailable => Some("request"),
        }
    }
}

/// Why access could not be set up from a config.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// A binding's own subscription-token keys could not be loaded.
    #[error("bindings[{binding}].authorize.token.jwt: {source}")]
    Keys {
        /// The binding's index.
        binding: usize,
        /// Why.
        source: KeyLoadError,
    },
}

/// One binding's checks.
#[derive(Debug, Default)]
struct Guard {
    token: Option<token::TokenCheck>,
    rule: Option<rule::Rule>,
    ask: Option<ask::Asker>,
}

/// The bindings and their checks, and the connect step, for one config.
#[derive(Debug)]
pub struct Access {
    authz: Arc<Authorizer>,
    authn: Arc<Authenticator>,
    /// Index-aligned with the config's bindings.
    guards: Vec<Guard>,
    connect: Option<ask::Asker>,
}

impl Access {
    /// Builds the checks of `config` (loads the bindings' own token keys).
    pub fn new(
        config: &Config,
        authz: Arc<Authorizer>,
        authn: Arc<Authenticator>,
    ) -> Result<Self, AccessError> {
        let guards = config
            .bindings
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let Some(a) = &b.authorize else {
                    return Ok(Guard::default());
                };
                Ok(Guard {
                    token: a
                        .token
                        .as_ref()
                        .map(token::TokenCheck::new)
                        .transpose()
                        .map_err(|source| AccessError::Keys { binding: i, source })?,
                    rule: a.rule.as_deref().map(rule::Rule::new),
                    ask: a.request.as_ref().map(ask::Asker::new),
                })
            })
            .collect::<Result<_, AccessError>>()?;
        Ok(Self {
            authz,
            authn,
            guards,
            connect: config.auth.connect_request.as_ref().map(ask::Asker::new),
        })
    }

    /// Decides whether `who` may `op` on `channel`: the bindings, then the binding's
    /// checks, cheapest first.
    pub async fn check(
        &self,
        channel: &str,
        op: Operation,
        who: Who<'_>,
        token: Presented<'_>,
        link: Link<'_>,
    ) -> Result<Grant, Denied> {
        let resolved = self.authz.resolve_binding(channel, op, who.claims)?;
        let mut grant = Grant {
            resolved,
            data: None,
            token_expires_at: None,
        };
        let Some(guard) = self.guards.get(grant.resolved.binding) else {
            return Ok(grant);
        };
        let outcome = self
            .guarded(guard, &mut grant, channel, op, who, token, link)
            .await;
        if let Err(denied) = &outcome
            && let Some(check) = denied.check()
        {
            link.metrics
                .authorize_denied
                .get_or_create(&OpCheck {
                    op: op_label(op),
                    check,
                })
                .inc();
        }
        outcome.map(|()| grant)
    }

    #[allow(clippy::too_many_arguments)]
    async fn guarded(
        &self,
        guard: &Guard,
        grant: &mut Grant,
        channel: &str,
        op: Operation,
        who: Who<'_>,
        token: Presented<'_>,
        link: Link<'_>,
    ) -> Result<(), Denied> {
        if let Some(check) = &guard.token {
            grant.token_expires_at = match token {
                Presented::Token(t) => Some(check.verify(&self.authn, t, channel, who).await?),
                Presented::Held => None,
                Presented::None => return Err(Denied::TokenMissing),
            };
        }
        if guard.rule.is_none() && guard.ask.is_none() {
            return Ok(());
        }
        let vars = self.authz.vars(grant.resolved.binding, channel);
        if let Some(rule) = &guard.rule {
            rule.allows(who.claims, &vars, channel, op_label(op), link.metrics)?;
        }
        if let Some(ask) = &guard.ask {
            grant.data = ask
                .decide(op_label(op), Some(channel), &vars, who, link)
                .await?;
        }
        Ok(())
    }

    /// The connect step: `Ok` with the backend's `data` when allowed (or when no connect
    /// request is configured).
    pub async fn connect(&self, who: Who<'_>, link: Link<'_>) -> Result<Option<Arc<str>>, Denied> {
        let Some(ask) = &self.connect else {
            return Ok(None);
        };
        let outcome = ask.decide("connect", None, &[], who, link).await;
        if outcome.is_err() {
            link.metrics
                .authorize_denied
                .get_or_create(&OpCheck {
                    op: "connect",
                    check: "request",
                })
                .inc();
        }
        outcome
    }
}

/// The header naming the client's token subject, on its publishes and on authorization
/// requests.
pub const SENDER_SUB_HEADER: &str = "Wsrelay-Sub";
/// The header naming the connection (`<relay name>/<connection id>`).
pub const SENDER_CONNECTION_HEADER: &str = "Wsrelay-Connection";

impl Who<'_> {
    /// `<relay name>/<connection id>`; `<relay name>/-` before the upgrade.
    pub fn connection(&self) -> String {
        match self.conn {
            Some(id) => format!("{}/{id}", self.relay),
            None => format!("{}/-", self.relay),
        }
    }

    /// The headers that tell a backend who this is: the token's `sub` (absent for anonymous
    /// clients) and the connection. Set by the relay; a client cannot set NATS headers, so
    /// it cannot forge them.
    pub fn headers(&self) -> async_nats::HeaderMap {
        let mut h = async_nats::HeaderMap::new();
        if let Some(sub) = self.claims.and_then(crate::auth::subject) {
            h.insert(SENDER_SUB_HEADER, sub);
        }
        h.insert(SENDER_CONNECTION_HEADER, self.connection().as_str());
        h
    }
}

/// The `op` of requests, labels and rules.
pub fn op_label(op: Operation) -> &'static str {
    match op {
        Operation::Subscribe => "subscribe",
        Operation::Publish => "publish",
    }
}
