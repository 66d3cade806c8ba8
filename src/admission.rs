//! Who may connect, listen and publish. Every transport and the publish API ask here before they
//! accept, so a new rule (subscriber tokens, per-IP limits) is written once, for all of them.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use crate::cidr::Cidr;
use crate::metrics::Metrics;
use crate::rates::AddressRates;
use crate::tokens::{Claims, RoomPattern, TokenError, TokenSettings, TokenVerifier};
/// What a publish request's credentials allow (a peer-input type: courtside-codecs).
pub use courtside_codecs::publish::PublishScope;

/// What admission enforces, built from the configuration.
#[derive(Debug, Clone)]
pub struct AdmissionSettings {
    /// Open TCP connections at once (HTTP and WebSocket); more are closed on accept.
    pub max_connections: usize,
    /// Browser origins allowed to open a WebSocket or WebTransport session; empty: any.
    pub allowed_origins: Vec<String>,
    /// The bearer token the publish API requires.
    pub publish_token: String,
    /// Commands per connection.
    pub commands: CommandRate,
    /// Recovered event bytes per connection per minute (`--recovery-bytes`).
    pub recovery_bytes: usize,
    /// Where JWTs are verified from.
    pub tokens: TokenSettings,
    /// Rooms that need a token allowing them.
    pub private_rooms: Vec<RoomPattern>,
    /// Every room needs a token.
    pub require_token: bool,
    /// WebSocket connections and WebTransport sessions from one client address at once.
    pub max_connections_per_ip: usize,
    /// New WebSocket connections and WebTransport sessions from one client address per minute.
    pub connection_rate_per_ip: u32,
    /// Publish API requests from one client address per minute.
    pub publish_rate_per_ip: u32,
    /// Peers whose `X-Forwarded-For` names the client (the load balancers).
    pub trusted_proxies: Vec<Cidr>,
}

/// The client's address: the TCP peer, or, when the peer is a trusted proxy, the last address
/// in `X-Forwarded-For` that is not a trusted proxy itself (proxies append what they saw).
pub fn client_ip(peer: std::net::IpAddr, forwarded_for: Option<&[u8]>, trusted: &[Cidr]) -> std::net::IpAddr {
    let is_trusted = |ip: std::net::IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let Some(header) = forwarded_for.and_then(|v| std::str::from_utf8(v).ok()) else {
        return peer;
    };
    let mut client = peer;
    for hop in header.rsplit(',') {
        match hop.trim().parse::<std::net::IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(ip) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

/// One connection from a client address, counted until dropped.
#[derive(Debug)]
pub struct IpPermit {
    ip: std::net::IpAddr,
    admission: Admission,
}

impl Drop for IpPermit {
    fn drop(&mut self) {
        let mut counts = self.admission.0.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

impl AdmissionSettings {
    /// `publish_token` is the resolved token (configured, or generated for this run).
    pub fn from_config(config: &crate::config::ServeConfig, publish_token: String) -> Self {
        Self {
            max_connections: config.http.max_connections,
            allowed_origins: config.http.allowed_origins.clone(),
            publish_token,
            commands: CommandRate {
                per_second: config.connection.command_rate,
                burst: config.connection.command_burst,
            },
            recovery_bytes: config.connection.recovery_bytes,
            tokens: TokenSettings {
                secret: config.tokens.jwt_secret.clone(),
                keys_file: config.tokens.jwt_keys.clone(),
                issuer: config.tokens.jwt_issuer.clone(),
                audience: config.tokens.jwt_audience.clone(),
            },
            private_rooms: RoomPattern::list(&config.tokens.private_rooms),
            require_token: config.tokens.require_token,
            max_connections_per_ip: config.http.max_connections_per_ip,
            connection_rate_per_ip: config.http.connection_rate_per_ip,
            publish_rate_per_ip: config.http.publish_rate_per_ip,
            // Checked when the configuration is read.
            trusted_proxies: Cidr::list(&config.http.trusted_proxies).unwrap_or_default(),
        }
    }
}

/// How many commands a client may send: on average and in one burst.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CommandRate {
    pub per_second: f64,
    pub burst: f64,
}

impl Default for CommandRate {
    fn default() -> Self {
        Self {
            per_second: 100.0,
            burst: 1000.0,
        }
    }
}

/// Why admission said no. Each refusal has its documented answer (HTTP status and code, or a
/// protocol error) and is counted in `courtside_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the node holds its maximum number of connections")]
    ConnectionLimit,
    #[error("the server is shutting down; connect to another node")]
    Draining,
    #[error("this origin may not connect here")]
    OriginNotAllowed,
    #[error("a valid publish token is required: Authorization: Bearer <token>")]
    Unauthorized,
    #[error("the token does not allow this room")]
    Forbidden,
    #[error("too many connections from this address")]
    IpConnectionLimit,
    #[error("too many requests from this address in the last minute")]
    IpRateLimited,
}

impl Refusal {
    /// The HTTP status that answers it.
    pub fn status(self) -> u16 {
        match self {
            Self::ConnectionLimit | Self::Draining => 503,
            Self::OriginNotAllowed | Self::Forbidden => 403,
            Self::IpConnectionLimit | Self::IpRateLimited => 429,
            Self::Unauthorized => 401,
        }
    }

    /// Its name in error bodies and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::ConnectionLimit => "connection_limit",
            Self::Draining => "draining",
            Self::OriginNotAllowed => "origin_not_allowed",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::IpConnectionLimit => "ip_connection_limit",
            Self::IpRateLimited => "ip_rate_limited",
        }
    }
}

/// A connection counted against the limit until it is dropped (it travels with the socket
/// through any upgrade).
#[derive(Debug)]
pub struct ConnectionPermit {
    /// Returned to the limit when dropped.
    _permit: OwnedSemaphorePermit,
}

/// TCP connections a node at `--max-connections` still serves for plain HTTP, one request each:
/// the backend's publishes, the load balancer's health checks and the metrics scrape go on
/// while WebSocket connections fill the node (an upgrade on one of these is answered 503
/// `connection_limit`). Beyond them a new TCP connection is closed at once: the bound on the
/// process's open files.
pub const HTTP_RESERVE: usize = 256;

/// Where a new TCP connection was admitted.
#[derive(Debug)]
pub enum TcpPlace {
    /// Under `--max-connections`: any request, a WebSocket upgrade included.
    Connection(ConnectionPermit),
    /// In `HTTP_RESERVE`: one plain HTTP request.
    Reserve(ConnectionPermit),
}

/// The node's admission rules: a cloneable handle.
#[derive(Debug, Clone)]
pub struct Admission(Arc<AdmissionInner>);

#[derive(Debug)]
struct AdmissionInner {
    connections: Arc<Semaphore>,
    /// TCP connections above `connections` for plain HTTP (`HTTP_RESERVE`).
    reserve: Arc<Semaphore>,
    settings: AdmissionSettings,
    tokens: TokenVerifier,
    metrics: Arc<Metrics>,
    /// Open WebSocket connections and WebTransport sessions per client address.
    per_ip: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    /// New connections and sessions per client address in the last minute.
    connection_rates: std::sync::Mutex<AddressRates>,
    /// Publish requests per client address in the last minute.
    publish_rates: std::sync::Mutex<AddressRates>,
}

/// Why a client address (or a publish request) was turned away, and when it may try again
/// (`Retry-After`, for a rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRefusal {
    pub refusal: Refusal,
    pub retry_after_s: Option<u64>,
}

/// Valid credentials of an HTTP request.
enum Credentials {
    PublishToken,
    Jwt(Claims),
}

impl Admission {
    /// Fails when the JWT key file cannot be read.
    pub fn new(settings: AdmissionSettings, metrics: Arc<Metrics>) -> Result<Self, String> {
        let tokens = TokenVerifier::new(settings.tokens.clone())?;
        let settings_rate = (settings.connection_rate_per_ip, settings.publish_rate_per_ip);
        Ok(Self(Arc::new(AdmissionInner {
            connections: Arc::new(Semaphore::new(settings.max_connections)),
            reserve: Arc::new(Semaphore::new(HTTP_RESERVE)),
            settings,
            tokens,
            metrics,
            per_ip: std::sync::Mutex::new(std::collections::HashMap::new()),
            connection_rates: std::sync::Mutex::new(AddressRates::new(settings_rate.0)),
            publish_rates: std::sync::Mutex::new(AddressRates::new(settings_rate.1)),
        })))
    }

    /// The client address of a request from `peer` (see `client_ip`).
    pub fn client_ip(&self, peer: std::net::IpAddr, forwarded_for: Option<&[u8]>) -> std::net::IpAddr {
        client_ip(peer, forwarded_for, &self.0.settings.trusted_proxies)
    }

    /// One more WebSocket connection or WebTransport session from `ip`: within
    /// `--connection-rate-per-ip` new ones this minute (every attempt counts), then under
    /// `--max-connections-per-ip` at once.
    pub fn admit_ip(&self, ip: std::net::IpAddr) -> Result<IpPermit, IpRefusal> {
        self.within_rate(&self.0.connection_rates, ip)?;
        self.hold_ip(ip).map_err(|refusal| IpRefusal {
            refusal,
            retry_after_s: None,
        })
    }

    /// Counts a request from `ip` in `rates`; over the rate: `ip_rate_limited` and when to retry.
    fn within_rate(&self, rates: &std::sync::Mutex<AddressRates>, ip: std::net::IpAddr) -> Result<(), IpRefusal> {
        let rated = rates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(ip, crate::clock::unix_ms());
        rated.map_err(|limited| IpRefusal {
            refusal: self.refuse(Refusal::IpRateLimited),
            retry_after_s: Some(limited.retry_after_s),
        })
    }

    fn hold_ip(&self, ip: std::net::IpAddr) -> Result<IpPermit, Refusal> {
        let mut counts = self.0.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(ip).or_insert(0);
        if *count >= self.0.settings.max_connections_per_ip {
            if *count == 0 {
                counts.remove(&ip);
            }
            drop(counts);
            return Err(self.refuse(Refusal::IpConnectionLimit));
        }
        *count += 1;
        Ok(IpPermit {
            ip,
            admission: self.clone(),
        })
    }

    /// Re-reads the JWT key file if it changed (the server calls this every few seconds).
    pub fn reload_token_keys(&self) -> Result<bool, String> {
        self.0.tokens.reload_if_changed()
    }

    /// Verifies a subscriber's token (the `auth` command).
    pub fn authenticate(&self, token: &str) -> Result<Claims, TokenError> {
        self.0.tokens.verify(token)
    }

    /// Whether a connection holding `claims` (or none) may subscribe to `room`: a private room
    /// (or, with `--require-token`, any) needs a token, and a private one a token allowing it.
    pub fn may_listen(&self, room: &str, claims: Option<&Claims>) -> Result<(), Refusal> {
        let private = self.0.settings.private_rooms.iter().any(|p| p.matches(room));
        let allowed = match claims {
            Some(claims) => !private || claims.may_listen(room),
            None => !private && !self.0.settings.require_token,
        };
        if allowed {
            Ok(())
        } else {
            // Counted by the session's error reply (109), not here.
            Err(Refusal::Forbidden)
        }
    }

    /// Whether `room` needs a token to be read (over HTTP too).
    pub fn is_private(&self, room: &str) -> bool {
        self.0.settings.require_token || self.0.settings.private_rooms.iter().any(|p| p.matches(room))
    }

    fn refuse(&self, refusal: Refusal) -> Refusal {
        self.0.metrics.close_error(refusal.status(), refusal.name());
        refusal
    }

    /// A new TCP connection: a place under the connection limit, else one in the HTTP reserve
    /// (`None`: neither; the connection is closed, and counted as refused).
    pub fn admit_tcp(&self) -> Option<TcpPlace> {
        if let Ok(permit) = self.0.connections.clone().try_acquire_owned() {
            return Some(TcpPlace::Connection(ConnectionPermit { _permit: permit }));
        }
        match self.0.reserve.clone().try_acquire_owned() {
            Ok(permit) => Some(TcpPlace::Reserve(ConnectionPermit { _permit: permit })),
            Err(_) => {
                self.refuse(Refusal::ConnectionLimit);
                None
            }
        }
    }

    /// A WebSocket upgrade on a connection in the HTTP reserve: refused, and counted.
    pub fn refuse_upgrade_over_limit(&self) -> Refusal {
        self.refuse(Refusal::ConnectionLimit)
    }

    /// A new WebTransport session's place: a permit while the node is under its connection limit.
    pub fn admit_connection(&self) -> Result<ConnectionPermit, Refusal> {
        match self.0.connections.clone().try_acquire_owned() {
            Ok(permit) => Ok(ConnectionPermit { _permit: permit }),
            Err(_) => Err(self.refuse(Refusal::ConnectionLimit)),
        }
    }

    /// The first checks of a new session, the same on every transport (WebSocket's upgrade,
    /// WebTransport's CONNECT on either engine), each with its one answer: an `Origin` outside
    /// `--allowed-origins` (403 `origin_not_allowed`), then a draining node (503 `draining`).
    /// WebTransport then takes its address's and the node's places (`admit_session`); a
    /// WebSocket takes its node place on accept and its address's in the upgrade.
    /// A refusal while draining is not counted in `courtside_errors_total`: every deploy drains,
    /// and the error alarms must not fire on it (`courtside_draining` says it).
    pub fn check_session(&self, origin: Option<&[u8]>, draining: bool) -> Result<(), Refusal> {
        self.check_origin(origin)?;
        if draining {
            return Err(Refusal::Draining);
        }
        Ok(())
    }

    /// A WebTransport session's places: under its address's limits (429) and the node's
    /// `--max-connections` (503), as a TCP connection takes them on accept.
    pub fn admit_session(&self, ip: std::net::IpAddr) -> Result<(IpPermit, ConnectionPermit), Refusal> {
        let ip_permit = self.admit_ip(ip).map_err(|refused| refused.refusal)?;
        Ok((ip_permit, self.admit_connection()?))
    }

    /// A browser's `Origin` (absent for non-browser clients, which are allowed).
    pub fn check_origin(&self, origin: Option<&[u8]>) -> Result<(), Refusal> {
        let allowed = &self.0.settings.allowed_origins;
        match origin {
            Some(origin) if !allowed.is_empty() && !allowed.iter().any(|a| a.as_bytes() == origin) => {
                Err(self.refuse(Refusal::OriginNotAllowed))
            }
            _ => Ok(()),
        }
    }

    /// A publish request from client address `ip` (`None`: not through the listener) holding
    /// `authorization`. Its credentials are checked first: publish credentials (the publish
    /// token, every room; or a JWT whose `publish` claim names at least one room, those rooms)
    /// are never limited by the address, so the platform's backend cannot be throttled by its
    /// own server. Anything else counts against the address's `--publish-rate-per-ip`
    /// (`ip_rate_limited` beyond) and is then refused: `unauthorized` without valid
    /// credentials, or, for a JWT without a `publish` claim (a subscriber's token), an empty
    /// scope that the handler answers `forbidden`. Checking a bad token costs a constant-time
    /// comparison and at most one JWT verification (`credentials`).
    pub fn admit_publish(
        &self,
        ip: Option<std::net::IpAddr>,
        authorization: Option<&[u8]>,
    ) -> Result<PublishScope, IpRefusal> {
        let outcome = match self.credentials(authorization) {
            Some(Credentials::PublishToken) => return Ok(PublishScope::Everything),
            Some(Credentials::Jwt(claims)) if !claims.publish.is_empty() => {
                return Ok(PublishScope::Rooms(claims.publish))
            }
            Some(Credentials::Jwt(_)) => Ok(PublishScope::Rooms(Vec::new())),
            None => Err(Refusal::Unauthorized),
        };
        self.counted_without_credentials(ip, outcome)
    }

    /// Whether a request may read the operations page (`GET /ops`, `GET /v1/ops`): with the
    /// publish token, or a JWT whose `ops` claim is true, sent as `Authorization: Bearer` or as
    /// the password of `Authorization: Basic` (what a browser sends after its login prompt; the
    /// user name is ignored). 403 `forbidden` for another valid JWT; anything else counts against
    /// the address's `--publish-rate-per-ip`, as a publish without credentials does (401, 429).
    pub fn admit_operator(&self, ip: Option<std::net::IpAddr>, authorization: Option<&[u8]>) -> Result<(), IpRefusal> {
        let token = authorization
            .and_then(|value| std::str::from_utf8(value).ok())
            .and_then(operator_token);
        let outcome = match token.as_deref().and_then(|token| self.token_credentials(token)) {
            Some(Credentials::PublishToken) => return Ok(()),
            Some(Credentials::Jwt(claims)) if claims.ops => return Ok(()),
            Some(Credentials::Jwt(_)) => Err(Refusal::Forbidden),
            None => Err(Refusal::Unauthorized),
        };
        self.counted_without_credentials(ip, outcome)
    }

    /// A request without valid credentials for what it asks (a publish, the operations page):
    /// it counts against its address's `--publish-rate-per-ip` (429 beyond), then `outcome`'s
    /// refusal, if any, is counted and answered.
    fn counted_without_credentials<T>(
        &self,
        ip: Option<std::net::IpAddr>,
        outcome: Result<T, Refusal>,
    ) -> Result<T, IpRefusal> {
        if let Some(ip) = ip {
            self.within_rate(&self.0.publish_rates, ip)?;
        }
        outcome.map_err(|refusal| IpRefusal {
            refusal: self.refuse(refusal),
            retry_after_s: None,
        })
    }

    /// Whether a request holding `authorization` may read private `room` over HTTP: the publish
    /// token, or a JWT that may listen to it.
    pub fn may_read(&self, room: &str, authorization: Option<&[u8]>) -> Result<(), Refusal> {
        if !self.is_private(room) {
            return Ok(());
        }
        let allowed = match self.credentials(authorization) {
            Some(Credentials::PublishToken) => true,
            Some(Credentials::Jwt(claims)) => self.may_listen(room, Some(&claims)).is_ok(),
            None => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(self.refuse(Refusal::Forbidden))
        }
    }

    /// What an `Authorization` header holds: the publish token (compared in constant time), a
    /// JWT that verifies, or nothing valid (`None`). Cheap for bad tokens: no JWT is tried
    /// without `--jwt-secret` or `--jwt-keys`, one longer than `MAX_TOKEN_BYTES` or not of three
    /// dot-separated parts is refused unread, and one whose header names no configured key is
    /// refused before any signature check; what remains costs one signature check (an HMAC with
    /// the secret, one public-key verification with a key of the token's `alg` and `kid`).
    fn credentials(&self, authorization: Option<&[u8]>) -> Option<Credentials> {
        self.token_credentials(bearer_token(std::str::from_utf8(authorization?).ok()?)?)
    }

    /// What a token is: the publish token, a JWT that verifies, or nothing valid.
    fn token_credentials(&self, token: &str) -> Option<Credentials> {
        if constant_time_eq(token.as_bytes(), self.0.settings.publish_token.as_bytes()) {
            return Some(Credentials::PublishToken);
        }
        if token.len() > MAX_TOKEN_BYTES || token.bytes().filter(|b| *b == b'.').count() != 2 {
            return None;
        }
        self.0.tokens.verify(token).ok().map(Credentials::Jwt)
    }

    /// The command budget of a connection opened at `now_ms`.
    pub fn command_budget(&self, now_ms: u64) -> CommandBudget {
        CommandBudget::new(self.0.settings.commands, now_ms)
    }

    /// The recovery allowance of a connection opened at `now_ms`.
    pub fn recovery_budget(&self, now_ms: u64) -> RecoveryBudget {
        RecoveryBudget::new(self.0.settings.recovery_bytes, now_ms)
    }
}

/// Bytes of a bearer token at most: a longer one is not verified (no JWT the platform issues
/// comes near it, and a bad one costs no more than this to refuse).
pub const MAX_TOKEN_BYTES: usize = 8192;

/// The token of `Bearer <token>`; the scheme is case-insensitive (RFC 9110 §11.1), and one or
/// more spaces may follow it.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    let token = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The token of an operator's `Authorization`: `Bearer TOKEN`, or `Basic` with the token as the
/// password (`base64(user:TOKEN)`, any user name).
fn operator_token(value: &str) -> Option<String> {
    if let Some(token) = bearer_token(value) {
        return Some(token.to_string());
    }
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") || rest.trim().len() > MAX_TOKEN_BYTES * 2 {
        return None;
    }
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
    let (_, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    (!password.is_empty()).then(|| password.to_string())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A connection's allowance of recovered event bytes (`--recovery-bytes` per minute, as a
/// token bucket of that size), fed with the time by its caller.
#[derive(Debug)]
pub struct RecoveryBudget {
    per_minute: usize,
    bytes: f64,
    last_ms: u64,
}

impl RecoveryBudget {
    pub fn new(per_minute: usize, now_ms: u64) -> Self {
        Self {
            per_minute,
            bytes: per_minute as f64,
            last_ms: now_ms,
        }
    }

    /// The bytes a recovery may take now.
    pub fn available(&mut self, now_ms: u64) -> usize {
        let elapsed_min = now_ms.saturating_sub(self.last_ms) as f64 / 60_000.0;
        self.last_ms = now_ms.max(self.last_ms);
        self.bytes = (self.bytes + elapsed_min * self.per_minute as f64).min(self.per_minute as f64);
        self.bytes as usize
    }

    /// Takes what a recovery sent.
    pub fn spend(&mut self, bytes: usize) {
        self.bytes = (self.bytes - bytes as f64).max(0.0);
    }
}

/// A connection's token bucket of commands, fed with the time by its caller.
#[derive(Debug)]
pub struct CommandBudget {
    rate: CommandRate,
    tokens: f64,
    last_ms: u64,
    /// Messages over the rate not yet made up for: each adds 1, and the count falls by the
    /// rate each second (so a client held at the rate by a flood never gets back to 0).
    over: f64,
}

/// What the budget says of one client message (docs/PROTOCOL.md, error 104 and close 1008).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// Under the rate: handle it.
    Yes,
    /// Over the rate, with every earlier message over it made up for: answered 104 (so at
    /// most `per_second` answers a second).
    Refused,
    /// Over the rate while earlier ones are not made up for: ignored without an answer (an
    /// answer to each would cost the server more than the message cost the client).
    Ignored,
    /// More than a burst's worth over the rate and not made up for (a client sending over
    /// twice its rate gets here): the client floods; the connection is closed (1008).
    Flooding,
}

impl CommandBudget {
    pub fn new(rate: CommandRate, now_ms: u64) -> Self {
        Self {
            rate,
            tokens: rate.burst,
            last_ms: now_ms,
            over: 0.0,
        }
    }

    /// Takes one message's token, or says what to do with a message over the rate.
    pub fn take(&mut self, now_ms: u64) -> Admitted {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.last_ms = now_ms;
        self.tokens = (self.tokens + elapsed * self.rate.per_second).min(self.rate.burst);
        self.over = (self.over - elapsed * self.rate.per_second).max(0.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Admitted::Yes;
        }
        let made_up = self.over < 1.0;
        // Bounded: past the flood's threshold the connection closes.
        self.over = (self.over + 1.0).min(self.rate.burst + 2.0);
        if made_up {
            Admitted::Refused
        } else if self.over <= self.rate.burst + 1.0 {
            Admitted::Ignored
        } else {
            Admitted::Flooding
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max_connections: usize, origins: &[&str]) -> Admission {
        admission_with(max_connections, origins, Arc::new(Metrics::new()))
    }

    fn admission_with(max_connections: usize, origins: &[&str], metrics: Arc<Metrics>) -> Admission {
        admission_rated(max_connections, origins, metrics, 0)
    }

    fn admission_rated(
        max_connections: usize,
        origins: &[&str],
        metrics: Arc<Metrics>,
        publish_rate: u32,
    ) -> Admission {
        Admission::new(
            AdmissionSettings {
                max_connections,
                allowed_origins: origins.iter().map(|o| o.to_string()).collect(),
                publish_token: "secret".into(),
                commands: CommandRate::default(),
                recovery_bytes: 64 << 20,
                tokens: TokenSettings {
                    secret: Some("jwt-secret".into()),
                    ..TokenSettings::default()
                },
                private_rooms: RoomPattern::list("user:*"),
                require_token: false,
                max_connections_per_ip: 2,
                connection_rate_per_ip: 0,
                publish_rate_per_ip: publish_rate,
                trusted_proxies: Cidr::list("10.0.0.0/8").expect("cidr"),
            },
            metrics,
        )
        .expect("admission")
    }

    #[test]
    fn a_new_session_gets_one_answer_from_one_table_whatever_its_transport() {
        let metrics = Arc::new(Metrics::new());
        let a = admission_with(1, &["https://scores.example"], metrics.clone());
        let ours = Some(&b"https://scores.example"[..]);
        assert_eq!(a.check_session(ours, false), Ok(()));
        assert_eq!(
            a.check_session(Some(b"https://evil.example"), false),
            Err(Refusal::OriginNotAllowed)
        );
        assert_eq!(
            a.check_session(Some(b"https://evil.example"), true),
            Err(Refusal::OriginNotAllowed)
        );
        assert_eq!(a.check_session(ours, true), Err(Refusal::Draining));
        let statuses: Vec<u16> = [
            Refusal::OriginNotAllowed,
            Refusal::Draining,
            Refusal::IpConnectionLimit,
            Refusal::ConnectionLimit,
        ]
        .map(Refusal::status)
        .to_vec();
        assert_eq!(statuses, [403, 503, 429, 503]);
        let ip = std::net::IpAddr::from([192, 0, 2, 7]);
        let (_ip_permit, _place) = a.admit_session(ip).expect("the first session");
        assert_eq!(a.admit_session(ip).err(), Some(Refusal::ConnectionLimit));
        let text = metrics.render();
        assert!(!text.contains(r#"name="draining""#), "a drain is no error: {text}");
        assert!(
            text.contains(r#"courtside_errors_total{code="403",name="origin_not_allowed"} 2"#),
            "{text}"
        );
    }

    #[test]
    fn connections_beyond_the_limit_are_refused_until_one_closes() {
        let a = admission(1, &[]);
        let first = a.admit_connection().expect("first");
        assert_eq!(a.admit_connection().err(), Some(Refusal::ConnectionLimit));
        drop(first);
        assert!(a.admit_connection().is_ok());
    }

    /// Above the limit a TCP connection takes a place in the HTTP reserve; beyond the reserve
    /// it is refused (and counted); a WebTransport session never takes a reserve place.
    #[test]
    fn tcp_connections_above_the_limit_take_the_http_reserve_then_are_refused() {
        let metrics = Arc::new(Metrics::new());
        let a = admission_with(1, &[], metrics.clone());
        let under = a.admit_tcp();
        assert!(matches!(under, Some(TcpPlace::Connection(_))));
        let reserve: Vec<_> = (0..HTTP_RESERVE).map(|_| a.admit_tcp()).collect();
        assert!(reserve.iter().all(|p| matches!(p, Some(TcpPlace::Reserve(_)))));
        assert_eq!(
            a.admit_connection().err(),
            Some(Refusal::ConnectionLimit),
            "no reserve for a session"
        );
        assert!(a.admit_tcp().is_none(), "the reserve is full");
        assert!(metrics
            .render()
            .contains(r#"courtside_errors_total{code="503",name="connection_limit"} 2"#));
        drop(reserve);
        assert!(
            matches!(a.admit_tcp(), Some(TcpPlace::Reserve(_))),
            "a reserve place is free again"
        );
    }

    #[test]
    fn refusals_are_counted_by_code_and_name() {
        let metrics = Arc::new(Metrics::new());
        let a = admission_with(0, &["https://scores.example.com"], metrics.clone());
        assert!(a.admit_connection().is_err());
        assert!(a.check_origin(Some(b"https://evil.example")).is_err());
        let text = metrics.render();
        for line in [
            r#"courtside_errors_total{code="503",name="connection_limit"} 1"#,
            r#"courtside_errors_total{code="403",name="origin_not_allowed"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing in {text}");
        }
    }

    #[test]
    fn origins_outside_the_list_are_refused_and_clients_without_one_pass() {
        let a = admission(1, &["https://scores.example.com"]);
        assert!(a.check_origin(Some(b"https://scores.example.com")).is_ok());
        assert_eq!(
            a.check_origin(Some(b"https://evil.example")),
            Err(Refusal::OriginNotAllowed)
        );
        assert!(a.check_origin(None).is_ok());
        assert!(admission(1, &[]).check_origin(Some(b"https://any.example")).is_ok());
    }

    #[test]
    fn publishing_needs_the_bearer_token() {
        let a = admission(1, &[]);
        let publish = |value: Option<&[u8]>| a.admit_publish(None, value).map_err(|r| r.refusal);
        assert_eq!(publish(Some(b"Bearer secret")), Ok(PublishScope::Everything));
        assert_eq!(publish(Some(b"Bearer wrong")), Err(Refusal::Unauthorized));
        assert_eq!(publish(Some(b"secret")), Err(Refusal::Unauthorized));
        assert_eq!(publish(None), Err(Refusal::Unauthorized));
        // The scheme is case-insensitive (RFC 9110 section 11.1).
        for value in [&b"bearer secret"[..], b"BEARER secret", b"BeArEr  secret"] {
            assert!(publish(Some(value)).is_ok(), "{:?}", std::str::from_utf8(value));
        }
        for value in [&b"Basic secret"[..], b"Bearer", b"Bearer ", b"Bearersecret"] {
            assert_eq!(publish(Some(value)), Err(Refusal::Unauthorized));
        }
    }

    fn jwt(claims: serde_json::Value) -> String {
        let key = jsonwebtoken::EncodingKey::from_secret(b"jwt-secret");
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("jwt")
    }

    /// `--publish-rate-per-ip` counts only requests without publish credentials: the publish
    /// token and a publish JWT pass however many come from the address, even while the address
    /// is refused for everything else.
    #[test]
    fn only_requests_without_publish_credentials_count_against_the_address() {
        let metrics = Arc::new(Metrics::new());
        let a = admission_rated(1, &[], metrics.clone(), 3);
        let ip = Some("203.0.113.9".parse::<std::net::IpAddr>().expect("ip"));
        let exp = crate::clock::unix_ms() / 1000 + 600;
        let publisher = format!(
            "Bearer {}",
            jwt(serde_json::json!({"sub": "b", "exp": exp, "publish": ["game:*"]}))
        );
        let subscriber = format!("Bearer {}", jwt(serde_json::json!({"sub": "fan", "exp": exp})));
        let forged = format!("Bearer {}x", &publisher["Bearer ".len()..]);
        for _ in 0..50 {
            assert_eq!(
                a.admit_publish(ip, Some(b"Bearer secret")),
                Ok(PublishScope::Everything)
            );
            let scope = a.admit_publish(ip, Some(publisher.as_bytes())).expect("publish JWT");
            assert!(scope.allows("game:1") && !scope.allows("user:1"));
        }
        let refusal = |value: &str| a.admit_publish(ip, Some(value.as_bytes())).err().map(|r| r.refusal);
        // Three without publish credentials: a wrong token, a forged JWT, a subscriber's JWT
        // (valid, but it may publish nowhere: the handler answers 403).
        assert_eq!(refusal("Bearer wrong"), Some(Refusal::Unauthorized));
        assert_eq!(refusal(&forged), Some(Refusal::Unauthorized));
        assert_eq!(
            a.admit_publish(ip, Some(subscriber.as_bytes())),
            Ok(PublishScope::Rooms(Vec::new()))
        );
        // The fourth is over the rate, whatever it holds short of publish credentials.
        for value in ["Bearer wrong", forged.as_str(), subscriber.as_str()] {
            let refused = a.admit_publish(ip, Some(value.as_bytes())).expect_err("over the rate");
            assert_eq!(refused.refusal, Refusal::IpRateLimited);
            assert!(refused.retry_after_s.is_some_and(|s| (1..=60).contains(&s)));
        }
        assert_eq!(
            a.admit_publish(None, None).err().map(|r| r.refusal),
            Some(Refusal::Unauthorized),
            "no address, no rate"
        );
        // The backend on the same address is not touched by the flood.
        assert_eq!(
            a.admit_publish(ip, Some(b"Bearer secret")),
            Ok(PublishScope::Everything)
        );
        assert!(a.admit_publish(ip, Some(publisher.as_bytes())).is_ok());
        let text = metrics.render();
        for line in [
            r#"courtside_errors_total{code="401",name="unauthorized"} 3"#,
            r#"courtside_errors_total{code="429",name="ip_rate_limited"} 3"#,
        ] {
            assert!(text.contains(line), "{line} missing in {text}");
        }
    }

    #[test]
    fn tokens_that_cannot_be_a_jwt_are_refused_unverified() {
        let a = admission(1, &[]);
        let exp = crate::clock::unix_ms() / 1000 + 600;
        let mut claims = serde_json::json!({"sub": "b", "exp": exp, "publish": ["game:*"]});
        assert!(a
            .credentials(Some(format!("Bearer {}", jwt(claims.clone())).as_bytes()))
            .is_some());
        claims["pad"] = serde_json::Value::String("x".repeat(MAX_TOKEN_BYTES));
        let long = format!("Bearer {}", jwt(claims));
        assert!(
            a.credentials(Some(long.as_bytes())).is_none(),
            "longer than MAX_TOKEN_BYTES"
        );
        assert!(a.credentials(Some(b"Bearer a.b")).is_none());
        assert!(a.credentials(Some(b"Bearer a.b.c.d")).is_none());
    }

    #[test]
    fn connections_per_address_are_limited_and_returned_when_dropped() {
        let a = admission(10, &[]);
        let ip: std::net::IpAddr = "203.0.113.5".parse().expect("ip");
        let (first, second) = (a.admit_ip(ip).expect("one"), a.admit_ip(ip).expect("two"));
        assert_eq!(
            a.admit_ip(ip).err().map(|r| r.refusal),
            Some(Refusal::IpConnectionLimit)
        );
        assert!(
            a.admit_ip("203.0.113.6".parse().expect("ip")).is_ok(),
            "another address"
        );
        drop(first);
        let third = a.admit_ip(ip).expect("returned");
        drop((second, third));
        assert!(a.0.per_ip.lock().expect("lock").get(&ip).is_none(), "forgotten at zero");
    }

    #[test]
    fn the_client_address_comes_from_x_forwarded_for_only_behind_a_trusted_proxy() {
        let trusted = Cidr::list("10.0.0.0/8, fd00::/8").expect("cidrs");
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
        let xff = Some(&b"198.51.100.7, 10.1.2.3"[..]);
        assert_eq!(client_ip(ip("10.0.0.9"), xff, &trusted), ip("198.51.100.7"));
        assert_eq!(
            client_ip(ip("203.0.113.1"), xff, &trusted),
            ip("203.0.113.1"),
            "an untrusted peer's header is ignored"
        );
        assert_eq!(client_ip(ip("10.0.0.9"), None, &trusted), ip("10.0.0.9"));
        assert_eq!(client_ip(ip("10.0.0.9"), Some(b"garbage"), &trusted), ip("10.0.0.9"));
        // A client cannot smuggle an address in front: the last untrusted hop counts.
        assert_eq!(
            client_ip(ip("10.0.0.9"), Some(b"1.2.3.4, 198.51.100.7"), &trusted),
            ip("198.51.100.7")
        );
        assert!(Cidr::parse("::ffff:10.0.0.0/104").is_ok());
        assert!(Cidr::parse("10.0.0.0/33").is_err() && Cidr::parse("nope").is_err());
        assert!(Cidr::parse("fd00::/8").expect("cidr").contains(ip("fd12::1")));
        assert!(Cidr::parse("10.0.0.0/8").expect("cidr").contains(ip("::ffff:10.2.3.4")));
        assert!(Cidr::parse("0.0.0.0/0").expect("cidr").contains(ip("8.8.8.8")));
    }

    #[test]
    fn recovery_takes_from_a_bucket_that_refills_over_a_minute() {
        let mut budget = RecoveryBudget::new(600, 0);
        assert_eq!(budget.available(0), 600);
        budget.spend(500);
        assert_eq!(budget.available(0), 100);
        budget.spend(500);
        assert_eq!(budget.available(0), 0);
        assert_eq!(budget.available(30_000), 300, "half a minute refills half");
        assert_eq!(budget.available(600_000), 600, "never above one minute's worth");
    }

    #[test]
    fn commands_beyond_the_budget_are_refused_until_it_refills() {
        let mut budget = CommandBudget::new(
            CommandRate {
                per_second: 10.0,
                burst: 2.0,
            },
            0,
        );
        assert_eq!((budget.take(0), budget.take(0)), (Admitted::Yes, Admitted::Yes));
        assert_eq!(budget.take(0), Admitted::Refused);
        assert_eq!(budget.take(100), Admitted::Yes, "100 ms at 10/s refill one");
    }

    #[test]
    fn over_the_rate_one_refusal_then_a_burst_ignored_then_the_flood_is_named() {
        let mut budget = CommandBudget::new(
            CommandRate {
                per_second: 10.0,
                burst: 3.0,
            },
            0,
        );
        let seen: Vec<Admitted> = (0..9).map(|_| budget.take(0)).collect();
        use Admitted::*;
        assert_eq!(
            seen,
            [Yes, Yes, Yes, Refused, Ignored, Ignored, Ignored, Flooding, Flooding]
        );
        // Back under the rate, the count starts again: the next message over it is answered.
        let mut budget = CommandBudget::new(
            CommandRate {
                per_second: 10.0,
                burst: 1.0,
            },
            0,
        );
        assert_eq!(
            [budget.take(0), budget.take(0), budget.take(0)],
            [Yes, Refused, Ignored]
        );
        // 100 ms refill one token and make up for one message over: the other still counts.
        assert_eq!([budget.take(100), budget.take(100)], [Yes, Ignored]);
        assert_eq!(budget.take(100), Flooding);
        // Quiet for long enough, the client is answered again.
        assert_eq!([budget.take(1_000), budget.take(1_000)], [Yes, Refused]);
    }

    /// A flood that the refill keeps feeding one token at a time is still named: at 50
    /// messages a millisecond against 100 a second, within 60 ms; and one 104 in all.
    #[test]
    fn a_flood_held_at_the_rate_by_its_refill_is_named_and_answered_once() {
        let mut budget = CommandBudget::new(
            CommandRate {
                per_second: 100.0,
                burst: 1000.0,
            },
            0,
        );
        let mut refused = 0;
        let mut named_at = None;
        'flood: for ms in 0..1_000 {
            for _ in 0..50 {
                match budget.take(ms) {
                    Admitted::Refused => refused += 1,
                    Admitted::Flooding => {
                        named_at = Some(ms);
                        break 'flood;
                    }
                    Admitted::Yes | Admitted::Ignored => {}
                }
            }
        }
        assert_eq!(refused, 1);
        assert!(named_at.is_some_and(|ms| ms <= 60), "{named_at:?}");
    }

    /// A client a little over its rate (150 a second against 100) is never closed, and gets at
    /// most one 104 for each message over it.
    #[test]
    fn a_client_a_little_over_its_rate_is_refused_but_never_named_a_flood() {
        let mut budget = CommandBudget::new(
            CommandRate {
                per_second: 100.0,
                burst: 10.0,
            },
            0,
        );
        let seen: Vec<Admitted> = (0..150 * 60).map(|i| budget.take(i * 1000 / 150)).collect();
        assert!(!seen.contains(&Admitted::Flooding));
        let refused = seen.iter().filter(|a| **a == Admitted::Refused).count();
        assert!(refused > 0 && refused <= 50 * 60, "{refused}");
    }
}
