//! The WebTransport transport: HTTP/3 sessions at `/wt` on UDP. Commands and ordered messages
//! travel on one client-opened bidirectional control stream; state updates that fit travel as
//! datagrams, repaired by `core::repair` when lost. Certificates are reloaded without dropping sessions.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::BytesMut;
use tokio::time::{timeout, Instant};
use tracing::{debug, info, warn};
use wtransport::endpoint::endpoint_side::Server;
use wtransport::endpoint::IncomingSession;
use wtransport::{Connection, Endpoint, Identity, RecvStream, SendStream, ServerConfig, VarInt};

use crate::certs::{CertificateError, CertificateInfo, CertificateSource, Hangup};
use crate::config::ServeConfig;
use crate::core::repair::{DatagramRepair, RepairAction, RepairPolicy};
use crate::core::routing::{Route, StateDatagrams, StateRouting};
use crate::core::wire::{self, ClientMessage, FrameDecoder, FrameError, MAX_CLIENT_MESSAGE};
use crate::core::{close_code, ClientCommand, CommandError, Kind, Outgoing, QueueClosed, RoomName, ServerControl};
use crate::gate::WakeGate;
use crate::metrics::Transport;
use crate::node::Node;
use crate::session::{Session, SessionLimits};
use crate::shutdown::ShutdownListener;
use crate::udp::{self, UdpSettings};

/// Messages written per stream write at most.
const MAX_BATCH: usize = 256;

/// Bytes read from the control stream at a time (a heap profile found 16 KiB here per session).
const CONTROL_READ_CHUNK: usize = 1024;

/// How long a closing session waits for the client to close first.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The path WebTransport sessions are accepted on.
pub const PATH: &str = "/wt";

/// WebTransport settings, built from the configuration.
#[derive(Debug, Clone)]
pub struct WebTransportSettings {
    /// The UDP socket: address and kernel buffers.
    pub udp: UdpSettings,
    pub cert: Option<(PathBuf, PathBuf)>,
    pub cert_check_interval: Duration,
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
    pub write_timeout: Duration,
    pub drain_timeout: Duration,
    pub session: SessionLimits,
    pub repair: RepairPolicy,
    pub state_datagrams: StateDatagrams,
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
            keep_alive: config.websocket.ping_interval,
            idle_timeout: config.websocket.idle_timeout,
            handshake_timeout: config.http.upgrade_timeout,
            write_timeout: config.websocket.write_timeout,
            drain_timeout: config.http.drain_timeout,
            session: SessionLimits::from_config(config),
            repair: RepairPolicy::default(),
            state_datagrams: wt.wt_state_datagrams,
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
}

/// A bound WebTransport endpoint, ready to serve.
pub struct WebTransportServer {
    endpoint: Endpoint<Server>,
    source: CertificateSource,
    settings: WebTransportSettings,
    local_addr: SocketAddr,
    /// SIGHUP, listened for from the bind on.
    hangup: Hangup,
}

impl std::fmt::Debug for WebTransportServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebTransportServer")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

fn transport_config(settings: &WebTransportSettings) -> wtransport::quinn::TransportConfig {
    use wtransport::quinn::VarInt as QVarInt;
    let mut transport = wtransport::quinn::TransportConfig::default();
    // A client needs its HTTP/3 CONNECT stream and one control stream, and three HTTP/3
    // unidirectional streams; more are refused by flow control, so a client cannot pile up
    // unread streams.
    transport.max_concurrent_bidi_streams(QVarInt::from_u32(4));
    transport.max_concurrent_uni_streams(QVarInt::from_u32(8));
    transport.stream_receive_window(QVarInt::from_u32(256 * 1024));
    transport.receive_window(QVarInt::from_u32(1024 * 1024));
    transport.datagram_receive_buffer_size(Some(256 * 1024));
    transport.keep_alive_interval(Some(settings.keep_alive));
    if let Ok(idle) = wtransport::quinn::IdleTimeout::try_from(settings.idle_timeout) {
        transport.max_idle_timeout(Some(idle));
    }
    transport
}

fn server_config(
    settings: &WebTransportSettings,
    identity: Identity,
    socket: Option<std::net::UdpSocket>,
) -> ServerConfig {
    let builder = ServerConfig::builder();
    let builder = match socket {
        Some(socket) => builder.with_bind_socket(socket),
        // Reloads keep the bound socket; the address here is ignored.
        None => builder.with_bind_default(0),
    };
    builder
        .with_custom_transport(identity, transport_config(settings))
        .build()
}

impl WebTransportServer {
    /// Binds the UDP socket and loads (or generates) the certificate; publishes the
    /// certificate and the socket's drop counter on the node.
    pub async fn bind(settings: WebTransportSettings, node: &Node) -> Result<Self, WebTransportError> {
        let (identity, source) = CertificateSource::load(settings.cert.as_ref()).await?;
        let hangup = Hangup::listen();
        let (socket, drops) = udp::bind(&settings.udp)?;
        let port = socket.local_addr()?.port();
        let info = CertificateInfo::of(&identity, source.is_self_signed(), port);
        let endpoint = Endpoint::server(server_config(&settings, identity, Some(socket)))?;
        let local_addr = endpoint.local_addr()?;
        if info.self_signed {
            info!(
                sha256 = %info.sha256,
                "generated a self-signed development certificate (ECDSA P-256, valid 14 days); served at GET /v1/cert-hash"
            );
        } else {
            info!(sha256 = %info.sha256, "loaded the WebTransport certificate");
        }
        node.certificate.set(info);
        if let Some(drops) = drops {
            let _ = node.udp_drops.set(drops);
        }
        Ok(Self {
            endpoint,
            source,
            settings,
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
                    if node.is_draining() {
                        incoming.refuse();
                        continue;
                    }
                    let node = node.clone();
                    let listener = node.shutdown_listener();
                    let settings = self.settings.clone();
                    tokio::spawn(async move { accept_session(incoming, node, listener, settings).await });
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
            self.endpoint.accept().await.refuse();
        }
    }

    async fn reload_if_changed(&mut self, node: &Node, forced: bool) {
        let Some(identity) = self.source.reload_if_changed(forced).await else {
            return;
        };
        let info = CertificateInfo::of(&identity, self.source.is_self_signed(), self.local_addr.port());
        match self
            .endpoint
            .reload_config(server_config(&self.settings, identity, None), false)
        {
            Ok(()) => {
                info!(sha256 = %info.sha256, "WebTransport certificate reloaded; open sessions continue");
                node.certificate.set(info);
            }
            Err(error) => warn!(%error, "cannot apply the new certificate"),
        }
    }
}

/// Completes the QUIC and HTTP/3 handshakes, checks the request, and runs the session.
async fn accept_session(
    incoming: IncomingSession,
    node: Node,
    shutdown: ShutdownListener,
    settings: WebTransportSettings,
) {
    let request = match timeout(settings.handshake_timeout, incoming).await {
        Ok(Ok(request)) => request,
        Ok(Err(error)) => return debug!(%error, "webtransport handshake failed"),
        Err(_) => return debug!("webtransport handshake timed out"),
    };
    let path = request.path().split('?').next().unwrap_or_default();
    if path != PATH {
        return request.not_found().await;
    }
    if node
        .admission
        .check_origin(request.origin().map(str::as_bytes))
        .is_err()
    {
        return request.forbidden().await;
    }
    if node.is_draining() {
        return request.too_many_requests().await;
    }
    let connection = match timeout(settings.handshake_timeout, request.accept()).await {
        Ok(Ok(connection)) => connection,
        _ => return debug!("webtransport session accept failed"),
    };
    // The client opens the control stream first thing.
    let (send, recv) = match timeout(settings.handshake_timeout, connection.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        _ => {
            connection.close(
                VarInt::from_u32(close_code::PROTOCOL_ERROR.into()),
                b"no control stream",
            );
            return;
        }
    };
    node.metrics.webtransport.connections.inc();
    WtSession::new(connection, send, node.clone(), settings)
        .run(recv, shutdown)
        .await;
    node.metrics.webtransport.connections.dec();
}

#[derive(Debug)]
enum Ending {
    PeerGone,
    Shutdown,
    Slow,
    TooBig,
    WriteFailed,
}

/// One WebTransport session: its control stream, datagrams, queue and repair state.
struct WtSession {
    connection: Connection,
    send: SendStream,
    node: Node,
    settings: WebTransportSettings,
    session: Session,
    repair: DatagramRepair,
    /// Which states go as datagrams and which on the stream (`core::routing`).
    routing: StateRouting,
    batch: Vec<Outgoing>,
    out: BytesMut,
}

impl WtSession {
    fn new(connection: Connection, send: SendStream, node: Node, settings: WebTransportSettings) -> Self {
        let subscriber = node.hub.new_subscriber(Transport::WebTransport);
        let session = Session::new(
            node.hub.clone(),
            node.registry.clone(),
            subscriber,
            settings.session,
            node.admission.command_budget(crate::clock::unix_ms()),
            node.draining.clone(),
        );
        let repair = DatagramRepair::new(settings.repair);
        let routing = StateRouting::new(settings.state_datagrams);
        Self {
            connection,
            send,
            node,
            settings,
            session,
            repair,
            routing,
            // Both grow to what this session has needed: idle fans never pay for MAX_BATCH.
            batch: Vec::new(),
            out: BytesMut::new(),
        }
    }

    async fn run(mut self, recv: RecvStream, mut shutdown: ShutdownListener) {
        let conn = self.session.subscriber().id();
        debug!(conn, remote = %self.connection.remote_address(), "webtransport session started");
        // The control stream and the datagrams are read in this loop, not by tasks of their own:
        // an ack then costs one task wake-up instead of three, and a session two tasks less.
        // Both reads are long-lived futures, made again only when one completes.
        let mut decoder = FrameDecoder::default();
        let subscriber = self.session.subscriber().clone();
        let mut repairs = Vec::new();
        // Made once, not on every turn of the loop, and polled through gates: a turn polls only
        // the branches that woke (a poll of each would take a lock of quinn's or tokio's).
        let shutdown_notice = shutdown.recv();
        tokio::pin!(shutdown_notice);
        let connection = self.connection.clone();
        let peer_closed = connection.closed();
        tokio::pin!(peer_closed);
        // Client commands are small; a session's buffer is memory held for as long as it lives.
        let control_read = read_control(recv, vec![0u8; CONTROL_READ_CHUNK]);
        tokio::pin!(control_read);
        let next_datagram = connection.receive_datagram();
        tokio::pin!(next_datagram);
        let [shutdown_gate, closed_gate, control_gate, datagram_gate] = <[WakeGate; 4]>::default();

        let ending = 'session: loop {
            let repair_due = self.repair.next_due();
            tokio::select! {
                biased;
                _ = shutdown_gate.future(shutdown_notice.as_mut()) => break Ending::Shutdown,
                _ = closed_gate.future(peer_closed.as_mut()) => break Ending::PeerGone,
                _ = subscriber.wait() => match self.write_queue().await {
                    Ok(None) => {}
                    Ok(Some(QueueClosed::Slow)) => break Ending::Slow,
                    Ok(Some(QueueClosed::Gone)) => break Ending::Shutdown,
                    Err(()) => break Ending::WriteFailed,
                },
                _ = sleep_until_opt(repair_due), if repair_due.is_some() => {
                    self.repair.poll(Instant::now().into_std(), &mut repairs);
                    if self.send_repairs(&mut repairs).await.is_err() {
                        break Ending::WriteFailed;
                    }
                }
                (recv, control_buf, read) = control_gate.future(control_read.as_mut()) => {
                    let n = match read {
                        Ok(Some(n)) => n,
                        Ok(None) | Err(_) => break Ending::PeerGone,
                    };
                    decoder.extend(&control_buf[..n]);
                    control_read.set(read_control(recv, control_buf));
                    loop {
                        match decoder.next_frame(MAX_CLIENT_MESSAGE) {
                            Ok(Some(frame)) => self.handle(wire::decode_client(&frame)),
                            Ok(None) => break,
                            Err(FrameError::TooLarge(..) | FrameError::BadLength) => break 'session Ending::TooBig,
                        }
                    }
                },
                datagram = datagram_gate.future(next_datagram.as_mut()) => match datagram {
                    // Datagrams carry acknowledgements for the repair; anything else is ignored.
                    Ok(datagram) => {
                        next_datagram.set(connection.receive_datagram());
                        if let Ok(ClientMessage::Ack { room, version }) = wire::decode_client(&datagram.payload()) {
                            self.acked(&room, version);
                        }
                    }
                    Err(_) => break Ending::PeerGone,
                },
            }
        };
        debug!(conn, ?ending, "webtransport session closing");
        let metrics = self.node.metrics.clone();
        match ending {
            Ending::PeerGone | Ending::WriteFailed => {}
            Ending::Shutdown => {
                let _ = timeout(CLOSE_WAIT, self.write_queue()).await;
                self.out.clear();
                wire::put_frame(
                    &mut self.out,
                    &wire::encode_control(&ServerControl::Reconnect { reason: "shutdown" }),
                );
                let drain = self.settings.drain_timeout;
                if !self
                    .close(close_code::SERVICE_RESTART, "server shutting down; reconnect", drain)
                    .await
                {
                    self.node.shutdown.abandoned_one();
                }
            }
            Ending::Slow => {
                info!(conn, "closing slow webtransport client (4001)");
                self.out.clear();
                self.close(
                    close_code::SLOW,
                    "slow consumer; reconnect with since",
                    self.settings.write_timeout,
                )
                .await;
            }
            Ending::TooBig => {
                metrics.close_error(close_code::MESSAGE_TOO_BIG, "message_too_big");
                self.out.clear();
                let reason = format!("message larger than {MAX_CLIENT_MESSAGE} bytes");
                self.close(close_code::MESSAGE_TOO_BIG, &reason, CLOSE_WAIT).await;
            }
        }
        let subscriber = self.session.subscriber().clone();
        drop(self.session);
        let dropped = subscriber.close(QueueClosed::Gone);
        if dropped > 0 {
            metrics.dropped.inc_by(dropped as u64);
        }
        debug!(conn, dropped, "webtransport session closed");
    }

    fn handle(&mut self, message: Result<ClientMessage, CommandError>) {
        self.node.metrics.webtransport.client_messages.inc();
        let now_ms = crate::clock::unix_ms();
        match message {
            Ok(ClientMessage::Ack { room, version }) => self.acked(&room, version),
            Ok(ClientMessage::Command(command)) => {
                if let ClientCommand::Unsubscribe { room } = &command {
                    self.repair.forget(room);
                }
                self.session.handle(Ok(command), now_ms);
            }
            Err(error) => self.session.handle(Err(error), now_ms),
        }
    }

    /// The client holds `version` of `room` (an ack, as a datagram or on the control stream).
    fn acked(&mut self, room: &RoomName, version: u64) {
        self.node.metrics.repair_acks.inc();
        self.repair.acked(room, version, std::time::Instant::now());
    }

    /// Writes everything queued: states as datagrams where they fit, the rest on the stream.
    async fn write_queue(&mut self) -> Result<Option<QueueClosed>, ()> {
        let subscriber = self.session.subscriber().clone();
        loop {
            self.batch.clear();
            let closed = subscriber.drain_into(&mut self.batch, MAX_BATCH);
            if self.batch.is_empty() {
                return Ok(closed);
            }
            self.out.clear();
            if !self.routing.datagrams_on()
                && self.connection.quic_connection().stats().path.lost_packets > 0
                && self.routing.loss_seen()
            {
                debug!(
                    conn = subscriber.id(),
                    "packet loss on this session: states go as datagrams from now on"
                );
            }
            let max_datagram = self
                .connection
                .max_datagram_size()
                .filter(|_| self.routing.datagrams_on());
            let rtt = self.connection.rtt();
            let now = Instant::now().into_std();
            let mut batch = std::mem::take(&mut self.batch);
            for item in &batch {
                match item {
                    Outgoing::Control(control) => {
                        self.routing.control(control);
                        if let ServerControl::Unsubscribed { room } = control {
                            self.repair.forget(room);
                        }
                        wire::put_frame(&mut self.out, &wire::encode_control(control));
                    }
                    Outgoing::Publication(p) => {
                        let message = p.wire_message();
                        if p.kind != Kind::State {
                            wire::put_frame(&mut self.out, message);
                            continue;
                        }
                        let version = p.number;
                        let fits = max_datagram.is_some_and(|max| message.len() <= max);
                        if self.routing.route(&p.room, fits) == Route::Datagram
                            && self.connection.send_datagram(message).is_ok()
                        {
                            self.repair.sent(p, version, now, rtt);
                        } else {
                            self.repair.forget(&p.room);
                            wire::put_frame(&mut self.out, message);
                        }
                    }
                }
            }
            if !self.out.is_empty() {
                match timeout(self.settings.write_timeout, self.send.write_all(&self.out)).await {
                    Ok(Ok(())) => {}
                    _ => return Err(()),
                }
            }
            self.node.metrics.record_deliveries(Transport::WebTransport, &batch);
            batch.clear();
            self.batch = batch;
            if closed.is_some() {
                return Ok(closed);
            }
        }
    }

    async fn send_repairs(&mut self, repairs: &mut Vec<RepairAction>) -> Result<(), ()> {
        self.out.clear();
        let metrics = &self.node.metrics;
        for action in repairs.drain(..) {
            match action {
                RepairAction::Datagram(p) => {
                    metrics.repair_datagrams.inc();
                    let _ = self.connection.send_datagram(p.wire_message());
                }
                RepairAction::Stream(p) => {
                    metrics.repair_stream.inc();
                    wire::put_frame(&mut self.out, p.wire_message());
                }
            }
        }
        if self.out.is_empty() {
            return Ok(());
        }
        match timeout(self.settings.write_timeout, self.send.write_all(&self.out)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }

    /// Writes what is in `out`, then a close notice, waits (at most `limit`) for the client to
    /// close the session, and closes it with `code`. Returns whether the client closed in time.
    async fn close(&mut self, code: u16, reason: &str, limit: Duration) -> bool {
        wire::put_frame(&mut self.out, &wire::encode_close(code, reason));
        let deadline = Instant::now() + limit;
        let mut closed = false;
        if matches!(
            tokio::time::timeout_at(deadline, self.send.write_all(&self.out)).await,
            Ok(Ok(()))
        ) {
            closed = tokio::time::timeout_at(deadline, self.connection.closed())
                .await
                .is_ok();
        }
        self.connection.close(VarInt::from_u32(code.into()), reason.as_bytes());
        closed
    }
}

/// Reads the control stream once, owning the stream and buffer, so the read can live across
/// turns of the session loop (and behind a gate) and hand both back when it completes.
async fn read_control(
    mut recv: RecvStream,
    mut buf: Vec<u8>,
) -> (
    RecvStream,
    Vec<u8>,
    Result<Option<usize>, wtransport::error::StreamReadError>,
) {
    let read = recv.read(&mut buf).await;
    (recv, buf, read)
}

async fn sleep_until_opt(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(Instant::from_std(deadline)).await,
        None => std::future::pending().await,
    }
}
