//! The WebTransport transport's settings and configs (both engines), and its quinn engine
//! (`--wt-engine quinn`): HTTP/3 sessions at `/wt` on UDP, on quinn with a session layer of
//! our own (`transport::h3` holds its bytes). Commands and ordered messages travel on one
//! client-opened bidirectional control stream; state updates that fit travel as datagrams,
//! repaired by `core::repair` when lost. The handshake and the session run in the session's own
//! task (no channel or worker task per session); `connection::drive` runs the session.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use quinn::{ConnectionError, Incoming, RecvStream, SendStream, VarInt};
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, info, warn};

use super::h3::{self, ConnectStreamEvent, H3Error, H3ErrorCode, Parsed};
use super::wt::delivery::{FromClient, StateDelivery};
use crate::admission::{ConnectionPermit, IpPermit};
use crate::certs::{CertificateError, CertificateInfo, CertificateSource, Identity};
use crate::config::ServeConfig;
use crate::connection::{self, Close, DriverSettings, Ending, Inbound, Wire, WireError};
use crate::core::repair::RepairPolicy;
use crate::core::routing::StateDatagrams;
use crate::core::wire::{self, FrameDecoder, FrameError, MAX_CLIENT_MESSAGE};
use crate::core::{close_code, Outgoing, ServerControl};
use crate::gate::WakeGate;
use crate::metrics::Transport;
use crate::node::Node;
use crate::quic_lb::{QuicServerId, RoutableConnectionIds, ServerIdSource, SignedRandomIds};
use crate::shutdown::ShutdownListener;
use crate::udp::{self, UdpSettings};

/// Bytes read from a stream at a time, into a buffer on the stack (client commands are small).
const READ_CHUNK: usize = 1024;

/// The largest HTTP/3 frame the handshake reads (a CONNECT's headers, the client's SETTINGS).
const MAX_HANDSHAKE_FRAME: usize = 16 * 1024;

/// After a client answered the close capsule, how long it may take to close the connection
/// itself before the server does.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The path WebTransport sessions are accepted on.
pub const PATH: &str = "/wt";

/// WebTransport settings, built from the configuration.
#[derive(Debug, Clone)]
pub struct WebTransportSettings {
    /// The UDP socket: address and kernel buffers.
    pub udp: UdpSettings,
    pub cert: Option<(PathBuf, PathBuf)>,
    pub cert_check_interval: Duration,
    /// QUIC keep-alives: the server's PING this often keeps NAT bindings and the QUIC idle
    /// timer fresh (`--ping-interval`, at most a third of `--idle-timeout`: 20 s by default).
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
    /// The QUIC and HTTP/3 handshakes, the control stream and its first message, together.
    pub handshake_timeout: Duration,
    /// What the driver runs each session with (write timeout, the drain, silence, session limits).
    pub driver: Arc<DriverSettings>,
    pub repair: RepairPolicy,
    pub state_datagrams: StateDatagrams,
    /// Routable QUIC-LB connection IDs with this server ID; random ones without.
    pub quic_server_id: Option<QuicServerId>,
    /// Handshakes under way above which unvalidated addresses get a Retry (0: always).
    pub retry_threshold: usize,
    /// Endpoint loops of the proto engine (`--wt-loops`; the quinn engine runs one endpoint).
    pub loops: usize,
}

impl WebTransportSettings {
    pub fn from_config(config: &ServeConfig) -> Self {
        let wt = &config.webtransport;
        Self {
            udp: UdpSettings {
                bind: wt.addr,
                recv_buffer: wt.udp_recv_buffer,
                send_buffer: wt.udp_send_buffer,
            },
            cert: wt.cert.clone().zip(wt.key.clone()),
            cert_check_interval: wt.cert_check_interval,
            // Chromium gives up on a QUIC connection about a second before the idle timeout
            // it agreed to (seen: 2 s agreed, lost after 1 s): keep-alives well inside it.
            keep_alive: config.connection.ping_interval.min(config.connection.idle_timeout / 3),
            idle_timeout: config.connection.idle_timeout,
            handshake_timeout: config.http.upgrade_timeout,
            // The client's silence is timed as on WebSocket (4002): QUIC's own keep-alives
            // would hold a silent session forever.
            driver: Arc::new(DriverSettings::from_config(config)),
            repair: RepairPolicy::default(),
            state_datagrams: wt.wt_state_datagrams,
            // `ecs-task` is resolved by the caller (`resolve_server_id`) before binding.
            quic_server_id: match wt.quic_server_id {
                Some(ServerIdSource::Fixed(id)) => Some(id),
                _ => None,
            },
            retry_threshold: wt.quic_retry_threshold,
            loops: wt.wt_loops,
        }
    }
}

/// WebTransport could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebTransportError {
    #[error(transparent)]
    Certificate(#[from] CertificateError),
    #[error("{0}")]
    Socket(#[from] std::io::Error),
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// A bound WebTransport endpoint, ready to serve.
pub struct WebTransportServer {
    endpoint: quinn::Endpoint,
    source: CertificateSource,
    /// Shared with every session's accept.
    settings: Arc<WebTransportSettings>,
    local_addr: SocketAddr,
    /// SIGHUP, listened for from the bind on.
    hangup: crate::certs::Hangup,
}

impl std::fmt::Debug for WebTransportServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebTransportServer")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

/// quinn's transport settings for sessions that hold one control stream and receive small
/// datagrams (README.md, "WebTransport tuning", has each one's measured effect).
pub(crate) fn transport_config(settings: &WebTransportSettings) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    // The CONNECT stream and the control stream; the client's HTTP/3 control and two QPACK
    // streams. quinn keeps state for every stream a peer may open: more is memory per session.
    transport.max_concurrent_bidi_streams(VarInt::from_u32(2));
    transport.max_concurrent_uni_streams(VarInt::from_u32(3));
    // Client commands are small; a client cannot make the server buffer more than this.
    transport.stream_receive_window(VarInt::from_u32(64 * 1024));
    transport.receive_window(VarInt::from_u32(128 * 1024));
    // Acks are tiny; states are conflated before they reach quinn.
    transport.datagram_receive_buffer_size(Some(16 * 1024));
    transport.datagram_send_buffer_size(64 * 1024);
    // Browsers take datagrams of about 1,200 bytes whatever the path allows: probing for a
    // larger MTU would cost packets and a timer per session for nothing.
    transport.mtu_discovery_config(None);
    transport.keep_alive_interval(Some(settings.keep_alive));
    if let Ok(idle) = quinn::IdleTimeout::try_from(settings.idle_timeout) {
        transport.max_idle_timeout(Some(idle));
    }
    transport
}

/// The TLS 1.3 cipher suites a session may use, in the client's order of preference (the
/// server follows the client's order, so a phone without AES hardware that lists ChaCha20 first
/// gets it). AES-256-GCM-SHA384 is left out: clients built on rustls (and so quinn and
/// wtransport) list it first, and its key schedule runs SHA-384, which has no SHA extension on
/// x86 (ring's software SHA-512 was 5 % of a connect storm's CPU), and every packet pays 14 AES
/// rounds instead of 10. AES-128-GCM is the suite every TLS 1.3 client must implement (RFC 8446
/// §9.1), the one Chromium offers first, and the one QUIC's Initial packets use anyway.
const SESSION_CIPHER_SUITES: [rustls::SupportedCipherSuite; 2] = [
    rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
    rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
];

pub(crate) fn server_config(
    settings: &WebTransportSettings,
    identity: Identity,
) -> Result<quinn::ServerConfig, WebTransportError> {
    let crypto = super::quic_tls::ServerTls::new(tls_config(identity)?).map_err(WebTransportError::Tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(settings)));
    Ok(config)
}

/// The TLS side of a session: TLS 1.3 only, `SESSION_CIPHER_SUITES`, ALPN `h3`.
pub(crate) fn tls_config(identity: Identity) -> Result<rustls::ServerConfig, WebTransportError> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = SESSION_CIPHER_SUITES.to_vec();
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| WebTransportError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)
        .map_err(|e| WebTransportError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![b"h3".to_vec()];
    Ok(tls)
}

pub(crate) fn endpoint_config(settings: &WebTransportSettings) -> quinn::EndpointConfig {
    loop_endpoint_configs(settings, 1, &SignedRandomIds::default())
        .pop()
        .unwrap_or_default()
}

/// The length of the connection IDs the endpoint issues (`endpoint_config`'s generators).
pub(crate) fn cid_len(settings: &WebTransportSettings) -> usize {
    match settings.quic_server_id {
        Some(_) => crate::quic_lb::ROUTABLE_CID_LEN,
        None => crate::quic_lb::SIGNED_CID_LEN,
    }
}

/// The endpoint configurations of `loops` endpoint loops on one port (`--wt-loops`): one
/// stateless-reset key and one ID signing key (`signer`'s), and each loop's index in the IDs it
/// issues (the first nonce byte, `quic_lb::loop_byte_at`) so a packet that reaches the wrong loop
/// is handed to its own. One loop issues the same IDs as `endpoint_config`.
pub(crate) fn loop_endpoint_configs(
    settings: &WebTransportSettings,
    loops: usize,
    signer: &SignedRandomIds,
) -> Vec<quinn::EndpointConfig> {
    let shared = quinn::EndpointConfig::default();
    (0..loops.max(1))
        .map(|index| {
            // One loop's IDs name no loop: their whole nonce stays random.
            let loop_index = (loops > 1).then(|| u8::try_from(index).unwrap_or(u8::MAX));
            let mut config = shared.clone();
            match settings.quic_server_id {
                Some(server) => config.cid_generator(move || Box::new(RoutableConnectionIds { server, loop_index })),
                None => {
                    let signed = loop_index.map_or_else(|| signer.clone(), |index| signer.for_loop(index));
                    config.cid_generator(move || Box::new(signed.clone()))
                }
            };
            config
        })
        .collect()
}

/// The `max_udp_payload_size` the proto engine sends (RFC 9000 §18.2: 1,200 is the least
/// allowed).
const CLIENT_MAX_UDP_PAYLOAD: u16 = 1200;

/// The proto engine's endpoint configurations: `loop_endpoint_configs`, telling clients the
/// server takes UDP payloads of `CLIENT_MAX_UDP_PAYLOAD`. Clients send small commands and acks;
/// one that may send more probes for a larger path MTU, and every probe is a packet of about
/// 1,450 bytes of PADDING that quinn-proto parses a byte at a time. The engine's receive buffers
/// keep room for larger datagrams (`udp_loop`: a client's first flight leaves before it reads
/// the parameter). quinn's engine keeps quinn's default: quinn sizes its receive buffers from it.
pub(crate) fn proto_endpoint_configs(
    settings: &WebTransportSettings,
    loops: usize,
    signer: &SignedRandomIds,
) -> Vec<quinn::EndpointConfig> {
    let mut configs = loop_endpoint_configs(settings, loops, signer);
    for config in &mut configs {
        let _ = config.max_udp_payload_size(CLIENT_MAX_UDP_PAYLOAD);
    }
    configs
}

/// The server ID `--quic-server-id` names: given, or derived from the ECS task's ARN.
pub async fn resolve_server_id(source: Option<ServerIdSource>) -> Result<Option<QuicServerId>, crate::ecs::EcsError> {
    match source {
        None => Ok(None),
        Some(ServerIdSource::Fixed(id)) => Ok(Some(id)),
        Some(ServerIdSource::EcsTask) => {
            let arn = crate::ecs::task_arn().await?;
            let id = QuicServerId::of_ecs_task(&arn);
            info!(task_arn = %arn, quic_server_id = %id, "QUIC server ID derived from the ECS task");
            Ok(Some(id))
        }
    }
}

impl WebTransportServer {
    /// Binds the UDP socket and loads (or generates) the certificate; publishes the
    /// certificate and the socket's drop counter on the node.
    pub async fn bind(settings: WebTransportSettings, node: &Node) -> Result<Self, WebTransportError> {
        let (identity, source) = CertificateSource::load(settings.cert.as_ref()).await?;
        let hangup = crate::certs::Hangup::listen();
        let bound = udp::bind(&settings.udp)?;
        let port = bound.socket.local_addr()?.port();
        let info = CertificateInfo::of(&identity, source.is_self_signed(), port);
        let endpoint = quinn::Endpoint::new(
            endpoint_config(&settings),
            Some(server_config(&settings, identity)?),
            bound.socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let local_addr = endpoint.local_addr()?;
        if info.self_signed {
            info!(
                sha256 = %info.sha256,
                "generated a self-signed development certificate (ECDSA P-256, valid 14 days); served at GET /v1/cert-hash"
            );
        } else {
            info!(sha256 = %info.sha256, "loaded the WebTransport certificate");
        }
        if let Some(id) = settings.quic_server_id {
            info!(quic_server_id = %id, "connection IDs carry this QUIC-LB server ID");
        }
        node.certificate.set(info);
        if let Some(drops) = bound.drops {
            let _ = node.udp_drops.set(drops);
        }
        Ok(Self {
            endpoint,
            source,
            settings: Arc::new(settings),
            local_addr,
            hangup,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Accepts sessions until the shutdown notice, reloading certificates on change or SIGHUP.
    pub async fn run(mut self, node: Node) -> ! {
        let mut stop = node.shutdown_listener();
        let mut check = tokio::time::interval(self.settings.cert_check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut hangup = std::mem::take(&mut self.hangup);
        loop {
            tokio::select! {
                _ = stop.recv() => break,
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    if node.is_draining() {
                        incoming.refuse();
                        continue;
                    }
                    let under_way = node.metrics.quic_handshakes.get();
                    if should_retry(
                        incoming.remote_address_validated(),
                        incoming.may_retry(),
                        usize::try_from(under_way).unwrap_or(0),
                        self.settings.retry_threshold,
                    ) {
                        // Stateless: the server keeps nothing until the client echoes the token.
                        if incoming.retry().is_ok() {
                            node.metrics.quic_retries.inc();
                        }
                        continue;
                    }
                    // Counted here, not in the task, so a burst of Initials sees itself.
                    let under_way = HandshakeUnderWay::new(&node);
                    let node = node.clone();
                    let listener = node.shutdown_listener();
                    let settings = self.settings.clone();
                    tokio::spawn(async move { accept_session(incoming, under_way, node, listener, settings).await });
                }
                _ = check.tick() => self.reload_if_changed(&node, false).await,
                _ = hangup.recv() => {
                    info!("SIGHUP received: reloading the WebTransport certificate");
                    self.reload_if_changed(&node, true).await;
                }
            }
        }
        // Refuse new sessions while the drain runs (until the process exits). This task no
        // longer counts as running, so the drain does not wait for it.
        drop(stop);
        loop {
            match self.endpoint.accept().await {
                Some(incoming) => incoming.refuse(),
                None => std::future::pending().await,
            }
        }
    }

    async fn reload_if_changed(&mut self, node: &Node, forced: bool) {
        let Some(identity) = self.source.reload_if_changed(forced).await else {
            return;
        };
        let info = CertificateInfo::of(&identity, self.source.is_self_signed(), self.local_addr.port());
        match server_config(&self.settings, identity) {
            Ok(config) => {
                self.endpoint.set_server_config(Some(config));
                info!(sha256 = %info.sha256, "WebTransport certificate reloaded; open sessions continue");
                node.certificate.set(info);
            }
            Err(error) => warn!(%error, "cannot apply the new certificate"),
        }
    }
}

/// The streams of an accepted session.
struct Handshaken {
    /// The CONNECT stream: the server's close capsule goes out on it; the client's comes in.
    connect_send: SendStream,
    connect_recv: RecvStream,
    /// The server's HTTP/3 control stream: closing it is an HTTP/3 connection error.
    h3_control: SendStream,
    /// The client's unidirectional streams (its HTTP/3 control and QPACK streams): held open
    /// and drained, never stopped (stopping a critical stream is an error too).
    h3_streams: Vec<RecvStream>,
    send: SendStream,
    recv: RecvStream,
    /// The control stream's bytes read so far (at least the first message).
    decoder: FrameDecoder,
    /// The datagram prefix of this session (its quarter stream ID).
    prefix: Bytes,
    /// The session's count against its client address.
    ip_permit: Option<IpPermit>,
    /// The session's place under `--max-connections` (shared with TCP connections).
    connection_permit: Option<ConnectionPermit>,
}

/// Why a handshake ended without a session.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error(transparent)]
    H3(#[from] H3Error),
    /// Answered with this HTTP status; the client closes. The server's HTTP/3 control stream
    /// and the client's streams, held open until then.
    #[error("refused with {0}")]
    Refused(u16, SendStream, Vec<RecvStream>),
    #[error("connection lost: {0}")]
    Lost(String),
}

impl From<ConnectionError> for HandshakeError {
    fn from(error: ConnectionError) -> Self {
        Self::Lost(error.to_string())
    }
}

/// Whether a new QUIC connection is answered with a Retry: its address is not validated yet (a
/// client echoing a Retry token is), a Retry is still possible, and the handshakes under way
/// have reached the threshold (0: always).
pub(crate) fn should_retry(validated: bool, may_retry: bool, under_way: usize, threshold: usize) -> bool {
    !validated && may_retry && under_way >= threshold
}

/// One QUIC handshake counted in `courtside_quic_handshakes` until dropped.
struct HandshakeUnderWay(Node);

impl HandshakeUnderWay {
    fn new(node: &Node) -> Self {
        node.metrics.quic_handshakes.inc();
        Self(node.clone())
    }
}

impl Drop for HandshakeUnderWay {
    fn drop(&mut self) {
        self.0.metrics.quic_handshakes.dec();
    }
}

/// Completes the QUIC and HTTP/3 handshakes, checks the request, waits for the control stream
/// and its first message, and starts the session; all within the handshake timeout.
async fn accept_session(
    incoming: Incoming,
    under_way: HandshakeUnderWay,
    node: Node,
    shutdown: ShutdownListener,
    settings: Arc<WebTransportSettings>,
) {
    let deadline = Instant::now() + settings.handshake_timeout;
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(error) => return debug!(%error, "webtransport handshake failed"),
    };
    let connected = timeout_at(deadline, connecting).await;
    drop(under_way);
    let connection = match connected {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => return debug!(%error, "webtransport handshake failed"),
        Err(_) => {
            node.metrics.wt_handshake_timeouts.inc();
            return debug!("webtransport handshake timed out");
        }
    };
    let streams = match timeout_at(deadline, handshake(&connection, &node)).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(HandshakeError::H3(error))) => {
            debug!(%error, "webtransport handshake refused");
            connection.close(crate::transport::quic_code(error.code), error.message.as_bytes());
            return;
        }
        Ok(Err(HandshakeError::Refused(status, control, streams))) => {
            debug!(status, "webtransport session refused");
            // The client closes on the refusal; one that does not is closed shortly after.
            let _ = timeout(Duration::from_secs(1), connection.closed()).await;
            // Closed first: dropping the streams of a live connection would stop and finish
            // them (STOP_SENDING, FIN), which could still go out before the close.
            connection.close(crate::transport::quic_code(H3ErrorCode::RequestRejected), b"refused");
            drop((control, streams));
            return;
        }
        Ok(Err(HandshakeError::Lost(error))) => return debug!(%error, "webtransport handshake failed"),
        Err(_) => {
            node.metrics.wt_handshake_timeouts.inc();
            debug!("webtransport session without a control stream or first message in time");
            connection.close(
                VarInt::from_u32(close_code::IDLE_TIMEOUT.into()),
                b"no first message on a control stream in time",
            );
            return;
        }
    };
    let subscriber = node.hub.new_subscriber(Transport::WebTransport);
    debug!(conn = subscriber.id(), remote = %connection.remote_address(), "webtransport session started");
    let wire = WebTransportWire::new(connection, streams, &node, &settings);
    connection::start(wire, subscriber, node, settings.driver.clone(), shutdown);
}

/// Reads `stream` into `buf` until `parse` finds a value; the bytes after it stay in `buf`.
async fn read_until<T>(
    stream: &mut RecvStream,
    buf: &mut Vec<u8>,
    parse: impl Fn(&[u8]) -> Parsed<T>,
) -> Result<T, HandshakeError> {
    loop {
        if let Some((value, used)) = parse(buf)? {
            buf.drain(..used);
            return Ok(value);
        }
        if buf.len() >= MAX_HANDSHAKE_FRAME {
            return Err(H3Error {
                code: H3ErrorCode::ExcessiveLoad,
                message: "handshake frame too large",
            }
            .into());
        }
        let mut chunk = [0u8; READ_CHUNK];
        match stream.read(&mut chunk).await {
            Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(None) => return Err(HandshakeError::Lost("stream finished during the handshake".into())),
            Err(error) => return Err(HandshakeError::Lost(error.to_string())),
        }
    }
}

/// The HTTP/3 part: the server's SETTINGS, the CONNECT (answered 200, or 403, 404 or 429),
/// then the client's control stream with its first message. Every step reads only the stream
/// it waits for: a client's stream that stays empty holds up nothing else.
async fn handshake(connection: &quinn::Connection, node: &Node) -> Result<Handshaken, HandshakeError> {
    let mut control = connection.open_uni().await?;
    control
        .write_all(&h3::server_control_stream())
        .await
        .map_err(|e| HandshakeError::Lost(e.to_string()))?;
    let mut held = Vec::new();
    let mut connect: Option<(SendStream, RecvStream, u64)> = None;
    let mut ip_permit = None;
    let mut connection_permit = None;
    loop {
        tokio::select! {
            // The client's HTTP/3 control and QPACK streams: held, and drained by the wire
            // (the server uses none of the client's settings; it sent its own).
            uni = connection.accept_uni() => held.push(uni?),
            bi = connection.accept_bi() => {
                let (mut send, mut recv) = bi?;
                let mut buf = Vec::new();
                match connect {
                    None => {
                        let request = read_until(&mut recv, &mut buf, h3::read_connect).await?;
                        let origin = request.origin.as_deref().map(str::as_bytes);
                        // A wrong path is 404 before admission counts or holds anything; then
                        // the table every transport shares. WebTransport sees the client's own
                        // address (the NLB keeps it).
                        let status = if request.path != PATH {
                            404
                        } else {
                            let admitted = node
                                .admission
                                .check_session(origin, node.is_draining())
                                .and_then(|()| node.admission.admit_session(connection.remote_address().ip()));
                            match admitted {
                                Err(refusal) => refusal.status(),
                                Ok((ip, place)) => {
                                    ip_permit = Some(ip);
                                    connection_permit = Some(place);
                                    200
                                }
                            }
                        };
                        send.write_all(&h3::response(status)).await.map_err(|e| HandshakeError::Lost(e.to_string()))?;
                        if status != 200 {
                            let _ = send.finish();
                            // The server's HTTP/3 control stream, the client's control and QPACK
                            // streams and the CONNECT's stay open until the connection closes:
                            // closing or stopping a critical stream is a connection error for the
                            // client (RFC 9114 §6.2.1), which would close before it read the status.
                            held.push(recv);
                            return Err(HandshakeError::Refused(status, control, held));
                        }
                        let session = VarInt::from(recv.id()).into_inner();
                        connect = Some((send, recv, session));
                    }
                    Some((connect_send, connect_recv, session)) => {
                        let stream_session = read_until(&mut recv, &mut buf, h3::read_stream_session).await?;
                        if stream_session != session {
                            return Err(H3Error { code: H3ErrorCode::Id, message: "a stream of another session" }.into());
                        }
                        // The first message: the session starts once it has fully arrived.
                        let mut decoder = FrameDecoder::default();
                        decoder.extend(&buf);
                        while !decoder.has_frame(MAX_CLIENT_MESSAGE) {
                            let mut chunk = [0u8; READ_CHUNK];
                            match recv.read(&mut chunk).await {
                                Ok(Some(n)) => decoder.extend(&chunk[..n]),
                                Ok(None) | Err(_) => return Err(HandshakeError::Lost("control stream ended before its first message".into())),
                            }
                        }
                        return Ok(Handshaken {
                            connect_send,
                            connect_recv,
                            h3_control: control,
                            h3_streams: held,
                            send,
                            recv,
                            decoder,
                            prefix: Bytes::from(h3::datagram_prefix(session)),
                            ip_permit: ip_permit.take(),
                            connection_permit: connection_permit.take(),
                        });
                    }
                }
            }
        }
    }
}

/// The session's incoming datagrams: one stream for the session's life (one allocation), not a
/// future per datagram.
type Datagrams = Pin<Box<dyn Stream<Item = Result<Bytes, ConnectionError>> + Send>>;

fn datagrams(connection: quinn::Connection) -> Datagrams {
    Box::pin(futures_util::stream::unfold(connection, |connection| async move {
        let datagram = connection.read_datagram().await;
        Some((datagram, connection))
    }))
}

/// The WebTransport wire of one session: its control stream (commands in; replies, events and
/// states that must arrive out), its datagrams (states out, acks in) and their loss repair.
struct WebTransportWire {
    connection: quinn::Connection,
    send: SendStream,
    recv: RecvStream,
    connect_send: SendStream,
    connect_recv: RecvStream,
    /// Held open for the session's life (see `Handshaken`).
    _h3_control: SendStream,
    h3_streams: Vec<RecvStream>,
    /// Held until the session ends: its count against the client address.
    _ip_permit: Option<IpPermit>,
    _connection_permit: Option<ConnectionPermit>,
    /// Aliases, the routing of states and their repair (shared with the sans-IO session).
    states: StateDelivery,
    /// Grows to what this session has needed: idle fans never pay for a large buffer.
    out: BytesMut,
    decoder: FrameDecoder,
    /// The CONNECT stream's bytes after the request (the client's close capsule).
    connect_buf: Vec<u8>,
    datagrams: Datagrams,
    // Each source is polled only after its waker fired: a turn of the driver polls only what
    // woke (each poll takes quinn's connection lock).
    gates: [WakeGate; 4],
    /// The repair timer, set to the earliest resend due: made when a resend is due, reset when
    /// that changes, dropped when nothing waits for an ack (so it never wakes the session for
    /// nothing; a session on the stream alone never has one).
    repair_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The deadline `repair_timer` is set to; `None` after it fired.
    repair_timer_at: Option<std::time::Instant>,
}

impl WebTransportWire {
    fn new(connection: quinn::Connection, streams: Handshaken, node: &Node, settings: &WebTransportSettings) -> Self {
        Self {
            datagrams: datagrams(connection.clone()),
            connection,
            send: streams.send,
            recv: streams.recv,
            connect_send: streams.connect_send,
            connect_recv: streams.connect_recv,
            _h3_control: streams.h3_control,
            h3_streams: streams.h3_streams,
            _ip_permit: streams.ip_permit,
            _connection_permit: streams.connection_permit,
            states: StateDelivery::new(
                streams.prefix,
                node.metrics.clone(),
                settings.repair,
                settings.state_datagrams,
            ),
            out: BytesMut::new(),
            decoder: streams.decoder,
            connect_buf: Vec::new(),
            gates: Default::default(),
            repair_timer: None,
            repair_timer_at: None,
        }
    }

    /// The next message already read from the control stream, if any.
    fn next_decoded(&mut self) -> Option<Inbound> {
        let frame = match self.decoder.next_frame(MAX_CLIENT_MESSAGE) {
            Ok(Some(frame)) => frame,
            Ok(None) => return None,
            Err(FrameError::TooLarge(..) | FrameError::BadLength) => {
                return Some(Inbound::End(Ending::TooBig {
                    limit: MAX_CLIENT_MESSAGE,
                }))
            }
        };
        Some(match self.states.on_frame(&frame, crate::clock::instant()) {
            FromClient::Command(command) => Inbound::Command(command),
            FromClient::Heard => Inbound::Heard,
        })
    }

    /// A datagram from the client: acknowledgements for the repair; anything else is ignored.
    fn on_datagram(&mut self, datagram: &[u8]) {
        self.states.on_datagram(datagram, crate::clock::instant());
    }

    /// What the client sent on the CONNECT stream: its close ends the session; other frames
    /// (another capsule, a reserved frame) are dropped; a partial frame waits, up to a bound.
    fn on_connect_stream(&mut self) -> Option<Ending> {
        loop {
            match h3::read_connect_stream(&self.connect_buf) {
                Ok(Some((ConnectStreamEvent::Close { code, reason }, _))) => {
                    debug!(code, %reason, "the client closed the session");
                    return Some(Ending::PeerClosed);
                }
                Ok(Some((ConnectStreamEvent::Other, used))) => {
                    self.connect_buf.drain(..used);
                }
                Ok(None) if self.connect_buf.len() > MAX_HANDSHAKE_FRAME => {
                    return Some(Ending::Protocol("CONNECT stream frame too large".into()));
                }
                Ok(None) => return None,
                Err(error) => return Some(Ending::Protocol(error.to_string())),
            }
        }
    }

    /// Polls the repair timer, made, reset or dropped to match what the repair waits for.
    fn poll_repair_timer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.states.next_due() {
            None => {
                // Nothing waits for an ack: a timer left armed would wake the session for
                // nothing (measured: +12 % server CPU per delivery, WebTransport-only Saturday).
                self.repair_timer = None;
                self.repair_timer_at = None;
                Poll::Pending
            }
            Some(due) => {
                let deadline = Instant::from_std(due);
                let timer = match &mut self.repair_timer {
                    Some(timer) if self.repair_timer_at == Some(due) => timer,
                    Some(timer) => {
                        timer.as_mut().reset(deadline);
                        timer
                    }
                    None => self.repair_timer.insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                self.repair_timer_at = Some(due);
                if timer.as_mut().poll(cx).is_ready() {
                    self.repair_timer_at = None;
                    return Poll::Ready(());
                }
                Poll::Pending
            }
        }
    }

    async fn write_out(&mut self, write_timeout: Duration) -> Result<(), WireError> {
        if self.out.is_empty() {
            return Ok(());
        }
        connection::with_deadline(write_timeout, self.send.write_all(&self.out)).await
    }

    /// Waits (until `deadline`) for the client to close: the QUIC connection closes, or the
    /// CONNECT stream ends (a close capsule and FIN, or a reset).
    async fn closed_by(&mut self, deadline: Instant) -> bool {
        let connection = self.connection.clone();
        let connect_recv = &mut self.connect_recv;
        let connect_ended = async move {
            let mut chunk = [0u8; 256];
            while let Ok(Some(_)) = connect_recv.read(&mut chunk).await {}
        };
        tokio::select! {
            _ = connection.closed() => true,
            _ = connect_ended => true,
            _ = tokio::time::sleep_until(deadline) => false,
        }
    }
}

/// Reads and discards what is waiting on `streams` (the client's HTTP/3 control and QPACK
/// streams; a finished one is let go). Ready when something was read, so the caller polls again.
fn drain_streams(streams: &mut Vec<RecvStream>, cx: &mut Context<'_>) -> Poll<()> {
    let mut progressed = false;
    let mut chunk = [0u8; 256];
    streams.retain_mut(|stream| loop {
        match stream.poll_read(cx, &mut chunk) {
            Poll::Ready(Ok(n)) if n > 0 => progressed = true,
            Poll::Ready(_) => {
                progressed = true;
                return false;
            }
            Poll::Pending => return true,
        }
    });
    if progressed {
        Poll::Ready(())
    } else {
        Poll::Pending
    }
}

impl Wire for WebTransportWire {
    const TRANSPORT: Transport = Transport::WebTransport;

    fn poll_inbound(&mut self, cx: &mut Context<'_>) -> Poll<Inbound> {
        const CONTROL: usize = 0;
        const DATAGRAM: usize = 1;
        const CONNECT: usize = 2;
        const H3_STREAMS: usize = 3;
        let mut heard = false;
        loop {
            if let Some(inbound) = self.next_decoded() {
                return Poll::Ready(inbound);
            }
            if self.poll_repair_timer(cx).is_ready() {
                return Poll::Ready(Inbound::Timer);
            }
            let mut chunk = [0u8; READ_CHUNK];
            let recv = &mut self.recv;
            match self.gates[CONTROL].poll(cx, |cx| recv.poll_read(cx, &mut chunk)) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    self.decoder.extend(&chunk[..n]);
                    continue;
                }
                Poll::Ready(_) => return Poll::Ready(Inbound::End(Ending::PeerGone)),
                Poll::Pending => {}
            }
            let datagrams = &mut self.datagrams;
            match self.gates[DATAGRAM].poll(cx, |cx| datagrams.as_mut().poll_next(cx)) {
                Poll::Ready(Some(Ok(datagram))) => {
                    heard = true;
                    self.on_datagram(&datagram);
                    continue;
                }
                Poll::Ready(_) => return Poll::Ready(Inbound::End(Ending::PeerGone)),
                Poll::Pending => {}
            }
            let connect_recv = &mut self.connect_recv;
            match self.gates[CONNECT].poll(cx, |cx| connect_recv.poll_read(cx, &mut chunk)) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    self.connect_buf.extend_from_slice(&chunk[..n]);
                    if let Some(ending) = self.on_connect_stream() {
                        return Poll::Ready(Inbound::End(ending));
                    }
                    continue;
                }
                // The CONNECT stream finished or was reset: the session is over (the draft).
                Poll::Ready(_) => return Poll::Ready(Inbound::End(Ending::PeerClosed)),
                Poll::Pending => {}
            }
            let h3_streams = &mut self.h3_streams;
            if self.gates[H3_STREAMS]
                .poll(cx, |cx| drain_streams(h3_streams, cx))
                .is_ready()
            {
                continue;
            }
            return if heard {
                Poll::Ready(Inbound::Heard)
            } else {
                Poll::Pending
            };
        }
    }

    /// States as datagrams where `core::routing` says so and they fit, the rest on the stream.
    async fn write_batch(&mut self, batch: &[Outgoing], write_timeout: Duration) -> Result<(), WireError> {
        self.out.clear();
        let now = crate::clock::instant();
        self.states.write_batch(batch, &mut self.out, &mut self.connection, now);
        self.write_out(write_timeout).await
    }

    async fn on_timer(&mut self, write_timeout: Duration) -> Result<(), WireError> {
        self.out.clear();
        let now = crate::clock::instant();
        self.states.repair_due(now, &mut self.out, &mut self.connection);
        self.write_out(write_timeout).await
    }

    /// The client closed the session: close the QUIC connection (nothing more to say).
    async fn answer_close(&mut self) {
        let _ = self.connect_send.finish();
        self.connection
            .close(crate::transport::quic_code(H3ErrorCode::NoError), b"");
    }

    /// Writes a close notice (after `reconnect`, when asked) on the control stream and a
    /// CLOSE_WEBTRANSPORT_SESSION capsule with the code on the CONNECT stream, waits (at most
    /// `limit`) for the client to close, and closes the QUIC connection with the code.
    async fn close(&mut self, close: Close<'_>) -> bool {
        self.out.clear();
        if close.reconnect {
            wire::put_frame(
                &mut self.out,
                &wire::encode_control(&ServerControl::Reconnect { reason: "shutdown" }),
            );
        }
        wire::put_frame(&mut self.out, &wire::encode_close(close.code, close.reason));
        let deadline = Instant::now() + close.limit;
        let mut closed = false;
        let written = matches!(timeout_at(deadline, self.send.write_all(&self.out)).await, Ok(Ok(())));
        let capsule = h3::close_capsule(close.code.into(), close.reason);
        if written
            && matches!(
                timeout_at(deadline, self.connect_send.write_all(&capsule)).await,
                Ok(Ok(()))
            )
        {
            let _ = self.connect_send.finish();
            closed = self.closed_by(deadline).await;
        }
        if closed {
            // The client took the capsule and ended its side: the session closed cleanly. The
            // connection closes with HTTP/3's no-error, after the client had time to close it
            // itself: Chromium reports a session whose connection closes at once as lost, not
            // as closed with the code (seen with a close 1 ms after its FIN; 500 ms was enough).
            let grace = deadline.min(Instant::now() + CLOSE_GRACE);
            let _ = timeout_at(grace, self.connection.closed()).await;
            self.connection
                .close(crate::transport::quic_code(H3ErrorCode::NoError), b"");
        } else {
            self.connection
                .close(VarInt::from_u32(close.code.into()), close.reason.as_bytes());
        }
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::should_retry;
    use std::sync::Arc;

    /// Runs a TLS 1.3 handshake in memory between `tls_config` and a client offering `offered`
    /// in that order, and returns the suite the server chose (None: the handshake failed).
    fn negotiated(offered: &[rustls::SupportedCipherSuite]) -> Option<rustls::CipherSuite> {
        let identity = crate::certs::Identity::self_signed(&["localhost"]).expect("certificate");
        let root = identity.chain[0].clone();
        let server_config = super::tls_config(identity).expect("server tls");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root).expect("root");
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = offered.to_vec();
        let mut client_config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        client_config.alpn_protocols = vec![b"h3".to_vec()];
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut client = rustls::ClientConnection::new(Arc::new(client_config), name).expect("client");
        let mut server = rustls::ServerConnection::new(Arc::new(server_config)).expect("server");
        for _ in 0..10 {
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).expect("client writes");
            }
            if !wire.is_empty() {
                server.read_tls(&mut &wire[..]).expect("server reads");
                if server.process_new_packets().is_err() {
                    return None;
                }
            }
            let mut wire = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut wire).expect("server writes");
            }
            if !wire.is_empty() {
                client.read_tls(&mut &wire[..]).expect("client reads");
                if client.process_new_packets().is_err() {
                    return None;
                }
            }
            if !client.is_handshaking() && !server.is_handshaking() {
                return server.negotiated_cipher_suite().map(|suite| suite.suite());
            }
        }
        None
    }

    #[test]
    fn a_session_takes_aes_128_gcm_from_a_client_that_lists_aes_256_first() {
        use rustls::crypto::ring::cipher_suite as offered;
        // rustls's (so quinn's and wtransport's) own order.
        let suite = negotiated(&[
            offered::TLS13_AES_256_GCM_SHA384,
            offered::TLS13_AES_128_GCM_SHA256,
            offered::TLS13_CHACHA20_POLY1305_SHA256,
        ]);
        assert_eq!(suite, Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
    }

    #[test]
    fn a_session_follows_a_client_that_lists_chacha20_first() {
        use rustls::crypto::ring::cipher_suite as offered;
        let suite = negotiated(&[
            offered::TLS13_CHACHA20_POLY1305_SHA256,
            offered::TLS13_AES_128_GCM_SHA256,
        ]);
        assert_eq!(suite, Some(rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256));
    }

    #[test]
    fn a_client_that_offers_only_aes_256_gcm_is_refused_in_the_handshake() {
        use rustls::crypto::ring::cipher_suite as offered;
        assert_eq!(negotiated(&[offered::TLS13_AES_256_GCM_SHA384]), None);
    }

    #[test]
    fn a_retry_is_asked_of_unvalidated_addresses_once_handshakes_reach_the_threshold() {
        assert!(!should_retry(false, true, 199, 200), "below the threshold");
        assert!(should_retry(false, true, 200, 200));
        assert!(!should_retry(true, true, 500, 200), "it echoed a Retry token already");
        assert!(!should_retry(false, false, 500, 200), "no second Retry");
        assert!(should_retry(false, true, 0, 0), "0: always");
    }
}
