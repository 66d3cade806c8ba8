//! The command line: one config struct per component, flattened into `ServeConfig`.
//! Each option comes from a flag, a `COURTSIDE_*` variable, the `--config` TOML file, or its default, in that order.

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{ArgAction, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::core::routing::StateDatagrams;
use crate::quic_lb::ServerIdSource;

/// The configuration cannot be used; the message names the option or the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An option's value is out of range.
    #[error("{0}")]
    Invalid(String),
    /// The `--config` file is unreadable, not TOML, or names something it cannot set.
    #[error("config file {path}: {message}")]
    File { path: String, message: String },
    #[error(transparent)]
    Args(#[from] clap::Error),
}

/// Returns early with `ConfigError::Invalid`.
macro_rules! invalid {
    ($($arg:tt)*) => {
        return Err(ConfigError::Invalid(format!($($arg)*)))
    };
}

#[derive(Debug, Parser)]
#[command(
    name = "courtside",
    version,
    about = "Real-time edge server for youth-sports live scores"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve WebSocket clients and the HTTP API.
    Serve(Box<ServeConfig>),
}

/// Everything `courtside serve` takes.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// TOML file with any of the options below, keyed by their long names (`publish-token = "..."`).
    /// Flags and environment variables override it.
    #[arg(long, env = "COURTSIDE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub http: HttpConfig,
    #[command(flatten)]
    pub websocket: WebSocketConfig,
    #[command(flatten)]
    pub webtransport: WebTransportConfig,
    #[command(flatten)]
    pub connection: ConnectionConfig,
    #[command(flatten)]
    pub tokens: TokenConfig,
    #[command(flatten)]
    pub cluster: ClusterConfig,
    #[command(flatten)]
    pub rooms: RoomConfig,
    #[command(flatten)]
    pub log: LogConfig,
    #[command(flatten)]
    pub emf: EmfConfig,

    /// Run the built-in simulator of a Phoenix Saturday (80 leagues, 3,500 teams) and publish
    /// its games through this node; open the page at / to watch.
    #[arg(long, env = "COURTSIDE_DEMO", help_heading = "Demo")]
    pub demo: bool,
    /// Game-time speed of the demo (1: real time).
    #[arg(
        long,
        env = "COURTSIDE_DEMO_SPEED",
        value_name = "FACTOR",
        default_value_t = 1.0,
        help_heading = "Demo"
    )]
    pub demo_speed: f64,
    /// Seed of the demo's simulator.
    #[arg(
        long,
        env = "COURTSIDE_DEMO_SEED",
        value_name = "N",
        default_value_t = 1,
        help_heading = "Demo"
    )]
    pub demo_seed: u64,

    /// Where each option's value came from, so that an error names what the user wrote.
    #[arg(skip)]
    pub sources: Sources,
}

/// Where an option's value came from: what an error about it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The command line (`--max-body`).
    Flag,
    /// Its environment variable (`COURTSIDE_MAX_BODY`).
    Env(String),
    /// A key of the `--config` file, as the file spells it.
    File { path: String, key: String },
    /// Not given: the default.
    Default,
}

/// Each option's source by its long name, filled by `parse_args`; empty for a `ServeConfig`
/// built otherwise, whose errors then name the flags.
#[derive(Debug, Clone, Default)]
pub struct Sources(HashMap<String, Source>);

impl Sources {
    pub fn of(&self, long: &str) -> Source {
        self.0.get(long).cloned().unwrap_or(Source::Default)
    }

    /// How an error names the option `long`: `--max-body`, `COURTSIDE_MAX_BODY`, or
    /// `max_body in FILE`.
    pub fn name(&self, long: &str) -> String {
        name_of(&self.of(long), long)
    }

    /// The option and the value as the user wrote them: `--max-body "1MB"`,
    /// `COURTSIDE_MAX_BODY="1MB"`, or `max_body = "1MB" in FILE`.
    pub fn written(&self, long: &str, value: &str) -> String {
        written(&self.of(long), long, value)
    }
}

fn written(source: &Source, long: &str, value: &str) -> String {
    match source {
        Source::Env(var) => format!("{var}={value:?}"),
        Source::File { path, key } => format!("{key} = {value:?} in {path}"),
        Source::Flag | Source::Default => format!("--{long} {value:?}"),
    }
}

fn name_of(source: &Source, long: &str) -> String {
    match source {
        Source::Env(var) => var.clone(),
        Source::File { path, key } => format!("{key} in {path}"),
        Source::Flag | Source::Default => format!("--{long}"),
    }
}

/// Every duration option's parser: humantime's, with a hint in the units the docs use (`10s`, not `10sec`).
fn parse_duration(text: &str) -> Result<Duration, String> {
    const UNITS: &str = "write a number and its unit, such as 10s, 250ms, 10m or 24h";
    humantime::parse_duration(text).map_err(|error| match error {
        humantime::DurationError::UnknownUnit { unit, .. } if unit.is_empty() => {
            format!("a duration needs a unit: {UNITS}")
        }
        humantime::DurationError::UnknownUnit { unit, .. } => format!("unknown unit {unit:?}: {UNITS}"),
        _ => format!("not a duration: {UNITS}"),
    })
}

/// The HTTP listener: API, health, metrics and the WebSocket upgrade.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "HTTP")]
pub struct HttpConfig {
    /// Address for HTTP and WebSocket (the ALB target port).
    #[arg(
        long = "http",
        env = "COURTSIDE_HTTP",
        value_name = "ADDR",
        default_value = "0.0.0.0:3000"
    )]
    pub addr: SocketAddr,
    /// Bearer token for the publish API. When unset, a random one is generated and logged.
    #[arg(long, env = "COURTSIDE_PUBLISH_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub publish_token: Option<String>,
    /// WebSocket connections and WebTransport sessions from one client address at once (429
    /// `ip_connection_limit` beyond). Stadium and school Wi-Fi put many fans behind one address.
    #[arg(
        long,
        env = "COURTSIDE_MAX_CONNECTIONS_PER_IP",
        value_name = "N",
        default_value_t = 1000
    )]
    pub max_connections_per_ip: usize,
    /// New WebSocket connections and WebTransport sessions one client address may open per
    /// minute (429 `ip_rate_limited` beyond, with `Retry-After`); 0: no limit.
    #[arg(
        long,
        env = "COURTSIDE_CONNECTION_RATE_PER_IP",
        value_name = "N",
        default_value_t = 1000
    )]
    pub connection_rate_per_ip: u32,
    /// Publish API requests (single and batch) without publish credentials one client address
    /// may make per minute (429 `ip_rate_limited` beyond, with `Retry-After`): the original
    /// design's WAF rule for deployments without a WAF. The credentials are checked first: a
    /// request with the publish token or a publish JWT is never counted. 0: no limit.
    #[arg(
        long,
        env = "COURTSIDE_PUBLISH_RATE_PER_IP",
        value_name = "N",
        default_value_t = 1000
    )]
    pub publish_rate_per_ip: u32,
    /// Peers (comma-separated addresses or CIDR ranges, the load balancers) whose
    /// `X-Forwarded-For` names the client; anyone else's is ignored.
    /// The default, the private ranges, takes in the load balancers of a VPC (clients reach
    /// the ALB from public addresses); set it to "" when clients connect from private ones.
    #[arg(
        long,
        env = "COURTSIDE_TRUSTED_PROXIES",
        value_name = "CIDR,...",
        default_value = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7"
    )]
    pub trusted_proxies: String,
    /// Largest accepted HTTP request body, in bytes; a larger Content-Length is answered 413
    /// before the body is read.
    #[arg(long, env = "COURTSIDE_MAX_BODY", value_name = "BYTES", default_value_t = 1 << 20)]
    pub max_body: usize,
    /// Items accepted in one batch publish.
    #[arg(long, env = "COURTSIDE_MAX_BATCH", value_name = "N", default_value_t = 1000)]
    pub max_batch: usize,
    /// How long a publish's Idempotency-Key is remembered: a repeat within it returns the first
    /// answer and publishes nothing (across nodes through Redis).
    #[arg(long, env = "COURTSIDE_IDEMPOTENCY_WINDOW", value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub idempotency_window: Duration,
    /// Open TCP connections (HTTP and WebSocket together); more are closed at once.
    #[arg(long, env = "COURTSIDE_MAX_CONNECTIONS", value_name = "N", default_value_t = 25_000)]
    pub max_connections: usize,
    /// Time a new connection has to send its request headers, the WebSocket upgrade included.
    #[arg(long, env = "COURTSIDE_UPGRADE_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub upgrade_timeout: Duration,
    /// Browser origins allowed to open a WebSocket or WebTransport session, and to read the client
    /// module, the certificate hash and the room reads from another origin (CORS),
    /// comma-separated (e.g. https://scores.example.com). Empty: any origin. Requests without an
    /// Origin header (non-browser clients) are always allowed.
    #[arg(
        long,
        env = "COURTSIDE_ALLOWED_ORIGINS",
        value_name = "ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,
    /// Longest graceful shutdown: clients are told to reconnect, then remaining ones are dropped.
    #[arg(long, env = "COURTSIDE_DRAIN_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

/// WebSocket framing and liveness.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "WebSocket")]
pub struct WebSocketConfig {
    /// Largest frame or message a client may send, in bytes; larger ones close with 1009.
    #[arg(long, env = "COURTSIDE_WS_MAX_MESSAGE", value_name = "BYTES", default_value_t = 1 << 20)]
    pub ws_max_message: usize,
    /// permessage-deflate (RFC 7692) for clients that offer it, as browsers do: on (the
    /// default) or off (never negotiated; every frame goes uncompressed).
    #[arg(
        long,
        env = "COURTSIDE_WS_COMPRESSION",
        value_name = "on|off",
        value_enum,
        default_value_t = WsCompression::On
    )]
    pub ws_compression: WsCompression,
    /// Messages to a client that negotiated permessage-deflate go compressed from this many
    /// bytes on (their JSON frame); smaller ones go as they are, with no compression work.
    #[arg(
        long,
        env = "COURTSIDE_WS_COMPRESS_THRESHOLD",
        value_name = "BYTES",
        default_value_t = 1024
    )]
    pub ws_compress_threshold: usize,
}

/// Whether WebSocket connections may negotiate permessage-deflate (`--ws-compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WsCompression {
    /// Negotiated when the client offers it.
    On,
    /// Never negotiated.
    Off,
}

/// WebTransport (HTTP/3 over QUIC, UDP).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "WebTransport")]
pub struct WebTransportConfig {
    /// UDP address for WebTransport (sessions at path /wt).
    #[arg(
        id = "wt",
        long = "wt",
        env = "COURTSIDE_WT",
        value_name = "ADDR",
        default_value = "0.0.0.0:4433"
    )]
    pub addr: SocketAddr,
    /// Serve WebSocket only.
    #[arg(id = "no-wt", long = "no-wt", env = "COURTSIDE_NO_WT")]
    pub disabled: bool,
    /// Certificate chain (PEM) for WebTransport. Without --cert and --key, a self-signed
    /// development certificate is generated (see certs/README.md).
    #[arg(long, env = "COURTSIDE_CERT", value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, env = "COURTSIDE_KEY", value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// How often the certificate files are checked for changes (SIGHUP reloads at once).
    #[arg(long, env = "COURTSIDE_CERT_CHECK_INTERVAL", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub cert_check_interval: Duration,
    /// UDP receive buffer requested from the kernel, in bytes.
    #[arg(long, env = "COURTSIDE_UDP_RECV_BUFFER", value_name = "BYTES", default_value_t = 8 << 20)]
    pub udp_recv_buffer: usize,
    /// UDP send buffer requested from the kernel, in bytes.
    #[arg(long, env = "COURTSIDE_UDP_SEND_BUFFER", value_name = "BYTES", default_value_t = 8 << 20)]
    pub udp_send_buffer: usize,
    /// When state updates go to WebTransport clients as datagrams (docs/PROTOCOL.md, "Loss repair").
    /// after-loss (the default, chosen by bench figures): states go over the control stream
    /// until QUIC reports a lost packet on the session, then as datagrams, and on the stream
    /// again after 30 s without loss; always: every state that fits goes as a datagram.
    #[arg(
        long,
        env = "COURTSIDE_WT_STATE_DATAGRAMS",
        value_name = "always|after-loss",
        default_value = "after-loss",
        value_parser = clap::builder::PossibleValuesParser::new(["always", "after-loss"]).try_map(|s| s.parse::<StateDatagrams>())
    )]
    pub wt_state_datagrams: StateDatagrams,
    /// QUIC-LB server ID for an AWS NLB QUIC listener: 0x and 16 hex digits (8 bytes). Every
    /// connection ID the server issues then carries it (plaintext QUIC-LB, config rotation
    /// 0b000), so the load balancer keeps each session on this node across address changes.
    /// Without it, connection IDs are random. `ecs-task`: the first 8 bytes of SHA-256 over the
    /// task's ARN, read from the ECS task metadata endpoint at startup (what deploy/'s
    /// registration function derives for the NLB target).
    #[arg(long, env = "COURTSIDE_QUIC_SERVER_ID", value_name = "0xHEX|ecs-task")]
    pub quic_server_id: Option<ServerIdSource>,
    /// QUIC handshakes under way above which a new one from an address not yet validated is
    /// answered with a Retry (RFC 9000 §8.1.2): the client must echo a token, proving it gets
    /// packets at its source address, before the server spends a TLS handshake on it. 0: every
    /// new connection is retried (one round trip more for each).
    #[arg(
        long,
        env = "COURTSIDE_QUIC_RETRY_THRESHOLD",
        value_name = "N",
        default_value_t = 200
    )]
    pub quic_retry_threshold: usize,
    /// What runs WebTransport sessions. proto (the default, issue 22): Courtside's own endpoint
    /// loops on quinn-proto (`--wt-loops`), a loop's sessions on one thread of its own over a batched UDP
    /// socket. quinn: quinn's
    /// endpoint, a task per session (the engine before; kept as a fallback).
    #[arg(
        long,
        env = "COURTSIDE_WT_ENGINE",
        value_name = "proto|quinn",
        value_enum,
        default_value_t = WtEngine::Proto
    )]
    pub wt_engine: WtEngine,
    /// Endpoint loops of the proto engine, each on its own UDP socket on the one port
    /// (`SO_REUSEPORT`; Linux spreads clients over them by address) and its own share of the
    /// sessions: with more than one, WebTransport uses more than one core. Packets a client sends
    /// from a new address reach their session's loop through the loop that got them. 1 to 64.
    #[arg(long, env = "COURTSIDE_WT_LOOPS", value_name = "N", default_value_t = 1)]
    pub wt_loops: usize,
}

/// What runs WebTransport sessions (`--wt-engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WtEngine {
    /// quinn's endpoint and a task per session.
    Quinn,
    /// Courtside's own endpoint loop on quinn-proto (`transport::wt`).
    Proto,
}

/// Sharing rooms with other nodes through Redis.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Cluster (Redis)")]
pub struct ClusterConfig {
    /// Redis URL (redis:// or rediss:// for TLS, with user and password as ElastiCache's
    /// in-transit encryption requires: rediss://:TOKEN@host:6379). Without it, this node serves
    /// alone with its embedded registry.
    #[arg(long, env = "COURTSIDE_REDIS", value_name = "URL", hide_env_values = true)]
    pub redis: Option<String>,
    /// --redis names a Redis Cluster (seed nodes, comma-separated): rooms use sharded pub/sub
    /// (SSUBSCRIBE / SPUBLISH, Redis 7), so each room's traffic touches only its shard.
    #[arg(long, env = "COURTSIDE_REDIS_CLUSTER", requires = "redis")]
    pub redis_cluster: bool,
    /// This node's name in the cluster (presence, GET /v1/nodes). Default: hostname and a random suffix.
    #[arg(long, env = "COURTSIDE_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,
    /// Interval of this node's heartbeat in Redis; a node missing three is considered gone.
    #[arg(long, env = "COURTSIDE_NODE_HEARTBEAT", value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub node_heartbeat: Duration,
    /// Publishes kept while Redis is unreachable; more are refused with 503.
    #[arg(long, env = "COURTSIDE_OUTBOX_MESSAGES", value_name = "N", default_value_t = 10_000)]
    pub outbox_messages: usize,
    /// Bytes of publishes kept while Redis is unreachable; more are refused with 503.
    #[arg(long, env = "COURTSIDE_OUTBOX_BYTES", value_name = "BYTES", default_value_t = 64 << 20)]
    pub outbox_bytes: usize,
    /// How long a node keeps what Redis just numbered for it, to send it again (with its event id)
    /// if Redis is lost: an event in flight through pub/sub when Redis dies empty is not lost.
    #[arg(long, env = "COURTSIDE_RESEND_WINDOW", value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub resend_window: Duration,
}

/// Per-connection liveness and limits, the same for every transport (`connection::drive` and
/// each transport's settings read them here).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Connections")]
pub struct ConnectionConfig {
    /// Interval between the server's pings: WebSocket ping frames; over WebTransport, QUIC
    /// keep-alives (at most a third of --idle-timeout).
    #[arg(long, env = "COURTSIDE_PING_INTERVAL", value_name = "DURATION", default_value = "25s", value_parser = parse_duration)]
    pub ping_interval: Duration,
    /// A client silent for this long (no frame, no pong; over WebTransport no message: QUIC
    /// keep-alives do not count) is closed with 4002.
    #[arg(long, env = "COURTSIDE_IDLE_TIMEOUT", value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// A write that cannot complete for this long (the client stopped reading) drops the connection.
    #[arg(long, env = "COURTSIDE_WRITE_TIMEOUT", value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    pub write_timeout: Duration,
    /// Rooms one connection may subscribe to.
    #[arg(long, env = "COURTSIDE_MAX_SUBSCRIPTIONS", value_name = "N", default_value_t = 256)]
    pub max_subscriptions: usize,
    /// Ordered messages (events, replies) queued for one connection before it is closed as slow (4001).
    #[arg(long, env = "COURTSIDE_QUEUE_MESSAGES", value_name = "N", default_value_t = 1024)]
    pub queue_messages: usize,
    /// Bytes of ordered messages queued for one connection before it is closed as slow (4001).
    #[arg(long, env = "COURTSIDE_QUEUE_BYTES", value_name = "BYTES", default_value_t = 8 << 20)]
    pub queue_bytes: usize,
    /// Commands per second a client may send on average (error 104 beyond).
    #[arg(
        long,
        env = "COURTSIDE_COMMAND_RATE",
        value_name = "PER_SECOND",
        default_value_t = 100.0
    )]
    pub command_rate: f64,
    /// Commands a client may send in one burst.
    #[arg(long, env = "COURTSIDE_COMMAND_BURST", value_name = "N", default_value_t = 1000.0)]
    pub command_burst: f64,
    /// Bytes of events one connection may recover with `since` per minute (a subscribe beyond is
    /// answered `recovered: false`): what a client that resubscribes in a loop can make the
    /// server send is bounded.
    #[arg(long, env = "COURTSIDE_RECOVERY_BYTES", value_name = "BYTES", default_value_t = 64 << 20)]
    pub recovery_bytes: usize,
}

/// Subscriber and publisher tokens (JWT), and the rooms that need one.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Tokens")]
pub struct TokenConfig {
    /// HS256 secret that signs the JWTs of subscribers (the `auth` command) and publishers.
    #[arg(long, env = "COURTSIDE_JWT_SECRET", value_name = "SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM file of public keys (RS256, ES256, EdDSA) that sign JWTs; re-read when it changes.
    #[arg(long, env = "COURTSIDE_JWT_KEYS", value_name = "FILE")]
    pub jwt_keys: Option<PathBuf>,
    /// The `iss` a JWT must carry.
    #[arg(long, env = "COURTSIDE_JWT_ISSUER", value_name = "ISSUER")]
    pub jwt_issuer: Option<String>,
    /// The `aud` a JWT must carry.
    #[arg(long, env = "COURTSIDE_JWT_AUDIENCE", value_name = "AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Rooms that need a token allowing them (names, or prefixes ending in `*`), comma-separated.
    #[arg(long, env = "COURTSIDE_PRIVATE_ROOMS", value_name = "LIST", default_value = "user:*")]
    pub private_rooms: String,
    /// Every room needs a token (public rooms: any valid one).
    #[arg(long, env = "COURTSIDE_REQUIRE_TOKEN")]
    pub require_token: bool,
}

/// What rooms retain, and how many there may be.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Rooms")]
pub struct RoomConfig {
    /// Events each room keeps for `since` recovery.
    #[arg(long, env = "COURTSIDE_HISTORY_SIZE", value_name = "N", default_value_t = 1000)]
    pub history_size: usize,
    /// Age after which events leave the history.
    #[arg(long, env = "COURTSIDE_HISTORY_TTL", value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub history_ttl: Duration,
    /// Bytes of history each room keeps at most.
    #[arg(long, env = "COURTSIDE_HISTORY_BYTES", value_name = "BYTES", default_value_t = 16 << 20)]
    pub history_bytes: usize,
    /// A room without subscribers drops its state this long after its last publish.
    #[arg(long, env = "COURTSIDE_STATE_TTL", value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub state_ttl: Duration,
    /// Rooms this node holds at most.
    #[arg(long, env = "COURTSIDE_MAX_ROOMS", value_name = "N", default_value_t = 100_000)]
    pub max_rooms: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (CloudWatch Logs).
    Json,
}

/// Logging.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Logging")]
pub struct LogConfig {
    #[arg(long, env = "COURTSIDE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Level filter: a level (info) or per-target directives (info,courtside=debug).
    #[arg(long, env = "COURTSIDE_LOG", value_name = "FILTER", default_value = "info")]
    pub log_level: String,
}

/// CloudWatch Embedded Metric Format on standard output (docs in README.md, "Metrics").
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "CloudWatch metrics (EMF)")]
pub struct EmfConfig {
    /// Write the node's metrics as CloudWatch Embedded Metric Format documents to standard
    /// output, one JSON object per line, this often (60s for CloudWatch's standard resolution).
    /// Off when unset; logs stay on standard error either way.
    #[arg(long, env = "COURTSIDE_EMF_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    pub emf_interval: Option<std::time::Duration>,
    /// The CloudWatch namespace of the metrics.
    #[arg(
        long,
        env = "COURTSIDE_EMF_NAMESPACE",
        value_name = "NAME",
        default_value = "Courtside"
    )]
    pub emf_namespace: String,
    /// The `Service` dimension of every metric.
    #[arg(
        long,
        env = "COURTSIDE_EMF_SERVICE",
        value_name = "NAME",
        default_value = "courtside"
    )]
    pub emf_service: String,
    /// The `Environment` dimension of every metric.
    #[arg(
        long,
        env = "COURTSIDE_EMF_ENVIRONMENT",
        value_name = "NAME",
        default_value = "production"
    )]
    pub emf_environment: String,
}

impl ServeConfig {
    /// Rejects values that would make the server misbehave, before anything listens. Each
    /// error names the option as the user gave it (`Sources::name`) and what it takes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name = |long: &str| self.sources.name(long);
        let positive = [
            ("max-body", self.http.max_body),
            ("max-batch", self.http.max_batch),
            ("max-connections", self.http.max_connections),
            ("ws-max-message", self.websocket.ws_max_message),
            ("queue-messages", self.connection.queue_messages),
            ("queue-bytes", self.connection.queue_bytes),
            ("max-rooms", self.rooms.max_rooms),
            ("max-connections-per-ip", self.http.max_connections_per_ip),
        ];
        for (long, value) in positive {
            if value == 0 {
                invalid!("{} must be greater than 0", name(long));
            }
        }
        let durations = [
            ("node-heartbeat", self.cluster.node_heartbeat),
            ("cert-check-interval", self.webtransport.cert_check_interval),
            ("idempotency-window", self.http.idempotency_window),
            ("ping-interval", self.connection.ping_interval),
            ("idle-timeout", self.connection.idle_timeout),
            ("write-timeout", self.connection.write_timeout),
            ("upgrade-timeout", self.http.upgrade_timeout),
        ];
        for (long, value) in durations {
            if value.is_zero() {
                invalid!("{} must be greater than 0 (a duration such as 10s)", name(long));
            }
        }
        if !(1..=64).contains(&self.webtransport.wt_loops) {
            invalid!("{} must be 1 to 64", name("wt-loops"));
        }
        if !(self.demo_speed > 0.0 && self.demo_speed <= 1000.0) {
            invalid!("{} must be above 0 and at most 1000", name("demo-speed"));
        }
        if self
            .cluster
            .node_id
            .as_deref()
            .is_some_and(|id| id.is_empty() || id.len() > 64)
        {
            invalid!("{} must be 1 to 64 characters", name("node-id"));
        }
        if self.connection.command_rate.is_nan() || self.connection.command_rate <= 0.0 {
            invalid!("{} must be greater than 0", name("command-rate"));
        }
        if self.connection.command_burst.is_nan() || self.connection.command_burst < 1.0 {
            invalid!("{} must be at least 1", name("command-burst"));
        }
        if self.http.publish_token.as_deref().is_some_and(str::is_empty) {
            invalid!("{} must not be empty", name("publish-token"));
        }
        if let Err(error) = crate::cidr::Cidr::list(&self.http.trusted_proxies) {
            invalid!("{}: {error}", name("trusted-proxies"));
        }
        if self
            .emf
            .emf_interval
            .is_some_and(|i| i < std::time::Duration::from_millis(100))
        {
            invalid!("{} must be at least 100ms", name("emf-interval"));
        }
        let dimension_ok = |s: &str| !s.is_empty() && s.len() <= 1024 && s.chars().all(|c| !c.is_control());
        if self.emf.emf_namespace.is_empty()
            || self.emf.emf_namespace.len() > 255
            || !self
                .emf
                .emf_namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-_/#:".contains(c))
        {
            invalid!("{} must be 1 to 255 of A-Z a-z 0-9 . - _ / # :", name("emf-namespace"));
        }
        for (long, value) in [
            ("emf-service", &self.emf.emf_service),
            ("emf-environment", &self.emf.emf_environment),
        ] {
            if !dimension_ok(value) {
                invalid!("{} must be 1 to 1024 characters, no control characters", name(long));
            }
        }
        if self.webtransport.disabled {
            for (long, given) in [
                ("cert", self.webtransport.cert.is_some()),
                ("key", self.webtransport.key.is_some()),
            ] {
                if given {
                    invalid!(
                        "{} is given, but {} turns WebTransport off and the certificate would not be used: drop one of them",
                        name(long),
                        name("no-wt")
                    );
                }
            }
        }
        if let Some(url) = &self.cluster.redis {
            if let Err(error) = check_redis_url(url, self.cluster.redis_cluster) {
                invalid!("{} {error}", name("redis"));
            }
        }
        Ok(())
    }
}

/// `--redis`: one URL, or with `--redis-cluster` comma-separated seeds (a seed without a scheme
/// takes the first URL's). Checks what the `redis` crate would refuse when connecting, without
/// connecting, and says what is accepted. Credentials are never echoed.
fn check_redis_url(url: &str, cluster: bool) -> Result<(), String> {
    const ACCEPTED: &str = "redis://[:PASSWORD@]HOST[:PORT] or rediss://[:PASSWORD@]HOST[:PORT] (TLS; #insecure skips the certificate check)";
    let seeds: Vec<&str> = if cluster {
        url.split(',').map(str::trim).filter(|s| !s.is_empty()).collect()
    } else {
        vec![url.trim()]
    };
    if seeds.is_empty() || seeds.iter().all(|s| s.is_empty()) {
        return Err(format!("is empty: give {ACCEPTED}"));
    }
    for seed in seeds {
        let full = match seed.split_once("://") {
            Some((scheme, _)) if scheme == "redis" || scheme == "rediss" => seed.to_string(),
            Some((scheme, _)) => {
                return Err(format!(
                    "has the scheme {scheme}://, which is not Redis's: give {ACCEPTED}"
                ))
            }
            None if cluster => format!("redis://{seed}"),
            None => return Err(format!("has no scheme: give {ACCEPTED}")),
        };
        if redis::IntoConnectionInfo::into_connection_info(full.as_str()).is_err() {
            return Err(format!("does not parse as a Redis URL: give {ACCEPTED}"));
        }
    }
    Ok(())
}

/// Parses the command line, then fills options that were left at their defaults from the
/// `--config` TOML file. Precedence: flag, environment variable, file, default. A value that
/// does not parse is reported with its source (the flag, the variable, or the file's key) and
/// what the option takes; each option's source is kept in `ServeConfig::sources`.
pub fn parse_args(args: Vec<OsString>) -> Result<Cli, ConfigError> {
    let command = Cli::command();
    let matches = command
        .clone()
        .try_get_matches_from(&args)
        .map_err(|e| named_error(e, &args, None))?;
    let Some(path) = matches
        .subcommand_matches("serve")
        .and_then(|m| m.get_one::<PathBuf>("config").cloned())
    else {
        return finish(&command, &matches, &args, None);
    };
    let path_text = path.display().to_string();
    let file_error = |message: String| ConfigError::File {
        path: path_text.clone(),
        message,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| file_error(format!("cannot read it: {e}")))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| file_error(format!("not valid TOML: {e}")))?;

    let Some(("serve", serve_matches)) = matches.subcommand() else {
        return finish(&command, &matches, &args, None);
    };
    let Some(serve_command) = command.find_subcommand("serve") else {
        return finish(&command, &matches, &args, None);
    };
    let mut injected: Vec<OsString> = Vec::new();
    // Long name -> the key as the file spells it, for the options the file set.
    let mut file_keys: HashMap<String, String> = HashMap::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let Some(arg) = serve_command
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()))
        else {
            return Err(file_error(format!("unknown option {key:?}")));
        };
        if long == "config" {
            return Err(file_error("\"config\" cannot be set from a config file".into()));
        }
        let id = arg.get_id().as_str();
        if matches!(
            serve_matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let flag = format!("--{long}");
        match (arg.get_action(), value) {
            (ArgAction::SetTrue, toml::Value::Boolean(true)) => injected.push(flag.into()),
            (ArgAction::SetTrue, toml::Value::Boolean(false)) => {}
            (ArgAction::SetTrue, _) => return Err(file_error(format!("{key} must be true or false"))),
            (_, toml::Value::String(s)) => injected.push(format!("{flag}={s}").into()),
            (_, toml::Value::Integer(n)) => injected.push(format!("{flag}={n}").into()),
            (_, toml::Value::Float(x)) => injected.push(format!("{flag}={x}").into()),
            (_, toml::Value::Array(items)) => {
                let mut parts = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        toml::Value::String(s) => parts.push(s.clone()),
                        toml::Value::Integer(n) => parts.push(n.to_string()),
                        other => return Err(file_error(format!("{key} holds a {}", other.type_str()))),
                    }
                }
                injected.push(format!("{flag}={}", parts.join(",")).into());
            }
            (_, other) => return Err(file_error(format!("{key} cannot be a {}", other.type_str()))),
        }
        file_keys.insert(long, key.clone());
    }
    let Some(serve_at) = args.iter().position(|a| a == "serve") else {
        return finish(&command, &matches, &args, None);
    };
    let mut merged = args[..=serve_at].to_vec();
    merged.extend(injected);
    merged.extend_from_slice(&args[serve_at + 1..]);
    let file = (path_text.as_str(), &file_keys);
    let matches = command
        .clone()
        .try_get_matches_from(&merged)
        .map_err(|e| named_error(e, &args, Some(file)))?;
    finish(&command, &matches, &args, Some(file))
}

/// The options the `--config` file set: its path, and long name -> the key as it spells it.
type FileKeys<'a> = (&'a str, &'a HashMap<String, String>);

/// Builds the `Cli` from `matches` and records where each `serve` option came from.
fn finish(
    command: &clap::Command,
    matches: &clap::ArgMatches,
    args: &[OsString],
    file: Option<FileKeys<'_>>,
) -> Result<Cli, ConfigError> {
    let mut cli = Cli::from_arg_matches(matches).map_err(|e| named_error(e, args, file))?;
    let Command::Serve(serve) = &mut cli.command;
    if let (Some(serve_command), Some(serve_matches)) =
        (command.find_subcommand("serve"), matches.subcommand_matches("serve"))
    {
        let mut sources = HashMap::new();
        for arg in serve_command.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let source = match serve_matches.value_source(arg.get_id().as_str()) {
                Some(ValueSource::EnvVariable) => Source::Env(
                    arg.get_env()
                        .map(|v| v.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                ),
                Some(ValueSource::CommandLine) => source_on_command_line(long, args, file),
                _ => Source::Default,
            };
            sources.insert(long.to_string(), source);
        }
        serve.sources = Sources(sources);
    }
    Ok(cli)
}

/// An option clap read from the command line: the user's flag, or one the file put there.
fn source_on_command_line(long: &str, args: &[OsString], file: Option<FileKeys<'_>>) -> Source {
    if flag_given(long, args) {
        return Source::Flag;
    }
    match file.and_then(|(path, keys)| Some((path, keys.get(long)?))) {
        Some((path, key)) => Source::File {
            path: path.to_string(),
            key: key.clone(),
        },
        None => Source::Flag,
    }
}

/// Whether the user's own arguments hold `--long` (as `--long VALUE` or `--long=VALUE`).
fn flag_given(long: &str, args: &[OsString]) -> bool {
    args.iter().any(|a| {
        a.to_str().is_some_and(|a| {
            a.strip_prefix("--")
                .and_then(|rest| rest.strip_prefix(long))
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('='))
        })
    })
}

/// What an option of this value name takes, for an error about a value that did not parse
/// (durations and enums say it themselves).
fn accepted(value_name: &str) -> Option<&'static str> {
    Some(match value_name {
        "BYTES" => "a whole number of bytes, such as 1048576",
        "N" => "a whole number",
        "FACTOR" | "PER_SECOND" => "a number",
        "ADDR" => "an IP address and port, such as 0.0.0.0:3000 or [::]:4433",
        _ => return None,
    })
}

/// A clap error about a value, rewritten to name where the value came from (the flag, the
/// variable, or the file's key) and what the option takes; clap's other errors (help,
/// version, an unknown flag) are kept as they are. Help and version exit here.
fn named_error(error: clap::Error, args: &[OsString], file: Option<FileKeys<'_>>) -> ConfigError {
    if !error.use_stderr() {
        error.exit();
    }
    if !matches!(error.kind(), ErrorKind::InvalidValue | ErrorKind::ValueValidation) {
        return ConfigError::Args(error);
    }
    let Some(ContextValue::String(arg)) = error.get(ContextKind::InvalidArg) else {
        return ConfigError::Args(error);
    };
    let long = arg
        .trim_start_matches('-')
        .split([' ', '='])
        .next()
        .unwrap_or_default()
        .to_string();
    let value = match error.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(value)) => value.clone(),
        _ => String::new(),
    };
    let command = Cli::command();
    let spec = command
        .find_subcommand("serve")
        .and_then(|serve| serve.get_arguments().find(|a| a.get_long() == Some(long.as_str())));
    let env = spec.and_then(|a| a.get_env()).map(|v| v.to_string_lossy().into_owned());
    // Not the user's flag nor the file's key: clap read it from the variable.
    let source = match (source_on_command_line(&long, args, file), env) {
        (Source::Flag, Some(var)) if !flag_given(&long, args) && std::env::var_os(&var).is_some() => Source::Env(var),
        (source, _) => source,
    };
    let what = written(&source, &long, &value);
    let cause = std::error::Error::source(&error).map(|e| e.to_string());
    let message = match error.kind() {
        ErrorKind::InvalidValue => {
            let valid = match error.get(ContextKind::ValidValue) {
                Some(ContextValue::Strings(values)) => values.join(", "),
                _ => String::new(),
            };
            format!("{what}: takes one of {valid}")
        }
        _ => {
            let value_name = spec
                .and_then(|a| a.get_value_names())
                .and_then(|names| names.first())
                .map(|n| n.to_string())
                .unwrap_or_default();
            match (accepted(&value_name), cause) {
                (Some(accepted), Some(cause)) => format!("{what}: takes {accepted} ({cause})"),
                (Some(accepted), None) => format!("{what}: takes {accepted}"),
                (None, Some(cause)) => format!("{what}: {cause}"),
                (None, None) => return ConfigError::Args(error),
            }
        }
    };
    ConfigError::Invalid(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> ServeConfig {
        let args = std::iter::once("courtside")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        let Command::Serve(config) = parse_args(args).expect("parse").command;
        *config
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = serve(&["serve"]);
        assert_eq!(c.http.addr.to_string(), "0.0.0.0:3000");
        assert_eq!(c.http.max_body, 1 << 20);
        assert_eq!(c.connection.ping_interval, Duration::from_secs(25));
        assert_eq!(c.connection.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.http.upgrade_timeout, Duration::from_secs(10));
        assert_eq!(c.http.drain_timeout, Duration::from_secs(10));
        assert_eq!(c.connection.max_subscriptions, 256);
        assert_eq!(c.rooms.history_size, 1000);
        assert_eq!(c.rooms.history_ttl, Duration::from_secs(600));
        assert_eq!(c.websocket.ws_compression, WsCompression::On);
        assert_eq!(c.websocket.ws_compress_threshold, 1024);
        assert!(c.http.publish_token.is_none());
        c.validate().expect("defaults are valid");
    }

    #[test]
    fn the_config_file_fills_what_flags_leave_unset() {
        let file = config_file("fills", "http = \"127.0.0.1:4000\"\nping_interval = \"5s\"\nhistory-size = 10\nallowed-origins = [\"https://a\", \"https://b\"]\nws-compression = \"off\"\nws_compress_threshold = 256\n");
        let c = serve(&[
            "serve",
            "--config",
            file.to_str().expect("path"),
            "--history-size",
            "20",
        ]);
        assert_eq!(c.http.addr.to_string(), "127.0.0.1:4000");
        assert_eq!(c.connection.ping_interval, Duration::from_secs(5));
        assert_eq!(c.rooms.history_size, 20, "the flag wins over the file");
        assert_eq!(c.websocket.ws_compression, WsCompression::Off);
        assert_eq!(c.websocket.ws_compress_threshold, 256);
        assert_eq!(
            c.http.allowed_origins,
            vec!["https://a".to_string(), "https://b".to_string()]
        );

        std::fs::write(&*file, "no-such-option = 1\n").expect("write");
        let args = ["courtside", "serve", "--config", file.to_str().expect("path")]
            .map(OsString::from)
            .to_vec();
        let error = parse_args(args).expect_err("unknown key");
        assert!(error.to_string().contains("unknown option"), "{error}");
    }

    #[test]
    fn validation_rejects_zero_limits() {
        let mut c = serve(&["serve"]);
        c.connection.queue_messages = 0;
        assert!(c.validate().is_err());
    }

    /// The message of the error `args` lead to, in parsing or in validation.
    fn error_of(args: &[&str]) -> String {
        let args = std::iter::once("courtside")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        match parse_args(args) {
            Err(error) => error.to_string(),
            Ok(cli) => {
                let Command::Serve(config) = cli.command;
                config.validate().expect_err("invalid").to_string()
            }
        }
    }

    /// A TOML file in a directory of its own, for one test; the directory goes with it.
    fn config_file(test: &str, text: &str) -> ConfigFile {
        let dir = std::env::temp_dir().join(format!("courtside-config-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("courtside.toml");
        std::fs::write(&file, text).expect("write");
        ConfigFile { dir, file }
    }

    struct ConfigFile {
        dir: PathBuf,
        file: PathBuf,
    }

    impl std::ops::Deref for ConfigFile {
        type Target = std::path::Path;

        fn deref(&self) -> &std::path::Path {
            &self.file
        }
    }

    impl Drop for ConfigFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn each_option_records_where_it_came_from() {
        let file = config_file("sources", "history_size = 5\nidle-timeout = \"30s\"\n");
        let path = file.to_str().expect("path");
        let c = serve(&["serve", "--config", path, "--idle-timeout=20s", "--max-body", "10"]);
        assert_eq!(c.sources.of("max-body"), Source::Flag);
        assert_eq!(
            c.sources.of("idle-timeout"),
            Source::Flag,
            "the flag wins over the file"
        );
        assert_eq!(
            c.sources.of("history-size"),
            Source::File {
                path: path.to_string(),
                key: "history_size".to_string()
            }
        );
        assert_eq!(c.sources.name("history-size"), format!("history_size in {path}"));
        assert_eq!(c.sources.of("max-batch"), Source::Default);
        assert_eq!(c.sources.name("max-batch"), "--max-batch");
    }

    #[test]
    fn a_bad_value_in_the_file_is_named_by_its_key_and_says_what_it_takes() {
        let file = config_file("idle", "idle_timeout = \"10\"\n");
        let path = file.to_str().expect("path");
        let error = error_of(&["serve", "--config", path]);
        assert_eq!(
            error,
            format!("idle_timeout = \"10\" in {path}: a duration needs a unit: write a number and its unit, such as 10s, 250ms, 10m or 24h")
        );
        let file = config_file("zero", "max_body = 0\n");
        let path = file.to_str().expect("path");
        assert_eq!(
            error_of(&["serve", "--config", path]),
            format!("max_body in {path} must be greater than 0")
        );
    }

    #[test]
    fn the_duration_hint_writes_the_units_the_docs_use() {
        let error = error_of(&["serve", "--idle-timeout", "10"]);
        assert!(
            error.starts_with("--idle-timeout \"10\": a duration needs a unit"),
            "{error}"
        );
        assert!(error.contains("10s") && !error.contains("10sec"), "{error}");
        let error = error_of(&["serve", "--drain-timeout=5sex"]);
        assert!(error.contains("unknown unit \"sex\""), "{error}");
    }

    #[test]
    fn a_zero_idle_timeout_is_refused() {
        assert_eq!(
            error_of(&["serve", "--idle-timeout", "0s"]),
            "--idle-timeout must be greater than 0 (a duration such as 10s)"
        );
    }

    #[test]
    fn a_certificate_with_no_wt_is_refused() {
        let error = error_of(&["serve", "--no-wt", "--cert", "missing.pem", "--key", "missing.key"]);
        assert_eq!(
            error,
            "--cert is given, but --no-wt turns WebTransport off and the certificate would not be used: drop one of them"
        );
    }

    #[test]
    fn a_redis_url_of_another_scheme_lists_the_accepted_ones() {
        let error = error_of(&["serve", "--redis", "http://localhost:6379"]);
        assert!(error.starts_with("--redis has the scheme http://"), "{error}");
        assert!(error.contains("redis://") && error.contains("rediss://"), "{error}");
        let error = error_of(&["serve", "--redis", "localhost:6379"]);
        assert!(error.starts_with("--redis has no scheme"), "{error}");
        let error = error_of(&["serve", "--redis-cluster", "--redis", "redis://h1:7000,unix://h2"]);
        assert!(error.starts_with("--redis has the scheme unix://"), "{error}");
        // What the docs show passes: TLS with a token, bare cluster seeds.
        for args in [
            &[
                "serve",
                "--redis",
                "rediss://:token@master.example.cache.amazonaws.com:6379",
            ][..],
            &["serve", "--redis", "rediss://:t@h:6379/#insecure"][..],
            &["serve", "--redis-cluster", "--redis", "127.0.0.1:7000,127.0.0.1:7001"][..],
        ] {
            serve(args).validate().expect("accepted");
        }
    }

    #[test]
    fn a_bad_flag_value_names_the_flag_and_what_it_takes() {
        assert_eq!(
            error_of(&["serve", "--max-body", "1MB"]),
            "--max-body \"1MB\": takes a whole number of bytes, such as 1048576 (invalid digit found in string)"
        );
        assert_eq!(
            error_of(&["serve", "--wt-engine", "h3"]),
            "--wt-engine \"h3\": takes one of quinn, proto"
        );
    }
}
