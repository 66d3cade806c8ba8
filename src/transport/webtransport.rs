//! The WebTransport transport: HTTP/3 sessions at `/wt` on UDP. Commands and ordered messages
//! travel on one client-opened bidirectional control stream; state updates that fit travel as
//! datagrams, repaired by `core::repair` when lost. The session is run by `connection::drive`.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::time::{timeout, Instant};
use tracing::{debug, info, warn};
use wtransport::datagram::Datagram;
use wtransport::endpoint::endpoint_side::Server;
use wtransport::endpoint::IncomingSession;
use wtransport::error::{ConnectionError, StreamReadError};
use wtransport::{Connection, Endpoint, Identity, RecvStream, SendStream, ServerConfig, VarInt};

use crate::certs::{CertificateError, CertificateInfo, CertificateSource, Hangup};
use crate::config::ServeConfig;
use crate::connection::{self, Close, DriverSettings, Ending, Inbound, Wire, WireError};
use crate::core::repair::{DatagramRepair, RepairAction, RepairPolicy};
use crate::core::routing::{Route, StateDatagrams, StateRouting};
use crate::core::wire::{self, ClientMessage, FrameDecoder, FrameError, MAX_CLIENT_MESSAGE};
use crate::core::{close_code, ClientCommand, Kind, Outgoing, RoomName, ServerControl};
use crate::gate::WakeGate;
use crate::metrics::{Metrics, Transport};
use crate::node::Node;
use crate::session::SessionLimits;
use crate::shutdown::ShutdownListener;
use crate::udp::{self, UdpSettings};

/// Bytes read from the control stream at a time (a heap profile found 16 KiB here per session).
const CONTROL_READ_CHUNK: usize = 1024;

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
    /// What the driver runs each session with (write timeout, the drain, session limits).
    pub driver: Arc<DriverSettings>,
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
            driver: Arc::new(DriverSettings {
                write_timeout: config.websocket.write_timeout,
                drain_timeout: config.http.drain_timeout,
                // QUIC keeps the session alive and times it out (`transport_config`).
                keepalive: None,
                session: SessionLimits::from_config(config),
            }),
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
    /// Shared with every session's accept.
    settings: Arc<WebTransportSettings>,
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

/// Completes the QUIC and HTTP/3 handshakes, checks the request, and starts the session.
async fn accept_session(
    incoming: IncomingSession,
    node: Node,
    shutdown: ShutdownListener,
    settings: Arc<WebTransportSettings>,
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
    let subscriber = node.hub.new_subscriber(Transport::WebTransport);
    debug!(conn = subscriber.id(), remote = %connection.remote_address(), "webtransport session started");
    let wire = WebTransportWire::new(connection, send, recv, &node, &settings);
    connection::start(wire, subscriber, node, settings.driver.clone(), shutdown);
}

type Owned<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A read of the control stream, owning the stream and its buffer, so the read lives across
/// turns of the driver (behind a gate) and hands both back when it completes.
type ControlRead = Owned<(RecvStream, Vec<u8>, Result<Option<usize>, StreamReadError>)>;

fn read_control(mut recv: RecvStream, mut buf: Vec<u8>) -> ControlRead {
    Box::pin(async move {
        let read = recv.read(&mut buf).await;
        (recv, buf, read)
    })
}

/// A datagram receive, owning a handle of the connection and handing it back with the datagram
/// (no handle is cloned per ack).
type DatagramRead = Owned<(Connection, Result<Datagram, ConnectionError>)>;

fn receive_datagram(connection: Connection) -> DatagramRead {
    Box::pin(async move {
        let datagram = connection.receive_datagram().await;
        (connection, datagram)
    })
}

/// The WebTransport wire of one session: its control stream (commands in; replies, events and
/// states that must arrive out), its datagrams (states out, acks in) and their loss repair.
struct WebTransportWire {
    connection: Connection,
    send: SendStream,
    metrics: Arc<Metrics>,
    repair: DatagramRepair,
    /// Which states go as datagrams and which on the stream (`core::routing`).
    routing: StateRouting,
    /// Grows to what this session has needed: idle fans never pay for a large buffer.
    out: BytesMut,
    decoder: FrameDecoder,
    // Long-lived reads, each polled through its gate: a turn of the driver polls only what
    // woke (each poll would take a lock of quinn's or wtransport's).
    peer_closed: Owned<()>,
    control_read: ControlRead,
    next_datagram: DatagramRead,
    gates: [WakeGate; 3],
    /// The repair timer, set to the earliest resend due: made when a resend is due, reset when
    /// that changes, dropped when nothing waits for an ack (so it never wakes the session for
    /// nothing; a session on the stream alone never has one).
    repair_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The deadline `repair_timer` is set to; `None` after it fired.
    repair_timer_at: Option<std::time::Instant>,
    repairs: Vec<RepairAction>,
}

impl WebTransportWire {
    fn new(
        connection: Connection,
        send: SendStream,
        recv: RecvStream,
        node: &Node,
        settings: &WebTransportSettings,
    ) -> Self {
        let closing = connection.clone();
        Self {
            peer_closed: Box::pin(async move {
                closing.closed().await;
            }),
            // Client commands are small; a session's buffer is memory held for as long as it lives.
            control_read: read_control(recv, vec![0u8; CONTROL_READ_CHUNK]),
            next_datagram: receive_datagram(connection.clone()),
            connection,
            send,
            metrics: node.metrics.clone(),
            repair: DatagramRepair::new(settings.repair),
            routing: StateRouting::new(settings.state_datagrams),
            out: BytesMut::new(),
            decoder: FrameDecoder::default(),
            gates: Default::default(),
            repair_timer: None,
            repair_timer_at: None,
            repairs: Vec::new(),
        }
    }

    /// The client holds `version` of `room` (an ack, as a datagram or on the control stream).
    fn acked(&mut self, room: &RoomName, version: u64) {
        self.metrics.repair_acks.inc();
        self.repair.acked(room, version, std::time::Instant::now());
    }

    /// The next message already read from the control stream, if any.
    fn next_decoded(&mut self) -> Option<Inbound> {
        loop {
            let frame = match self.decoder.next_frame(MAX_CLIENT_MESSAGE) {
                Ok(Some(frame)) => frame,
                Ok(None) => return None,
                Err(FrameError::TooLarge(..) | FrameError::BadLength) => {
                    return Some(Inbound::End(Ending::TooBig {
                        limit: MAX_CLIENT_MESSAGE,
                    }))
                }
            };
            match wire::decode_client(&frame) {
                Ok(ClientMessage::Ack { room, version }) => {
                    self.metrics.webtransport.client_messages.inc();
                    self.acked(&room, version);
                }
                Ok(ClientMessage::Command(command)) => {
                    if let ClientCommand::Unsubscribe { room } = &command {
                        self.repair.forget(room);
                    }
                    return Some(Inbound::Command(Ok(command)));
                }
                Err(error) => return Some(Inbound::Command(Err(error))),
            }
        }
    }

    async fn write_out(&mut self, write_timeout: Duration) -> Result<(), WireError> {
        if self.out.is_empty() {
            return Ok(());
        }
        match timeout(write_timeout, self.send.write_all(&self.out)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(WireError::Failed(error.to_string())),
            Err(_) => Err(WireError::Timeout),
        }
    }
}

impl Wire for WebTransportWire {
    const TRANSPORT: Transport = Transport::WebTransport;

    fn poll_inbound(&mut self, cx: &mut Context<'_>) -> Poll<Inbound> {
        const CLOSED: usize = 0;
        const CONTROL: usize = 1;
        const DATAGRAM: usize = 2;
        loop {
            if let Some(inbound) = self.next_decoded() {
                return Poll::Ready(inbound);
            }
            if self.gates[CLOSED]
                .poll(cx, |cx| self.peer_closed.as_mut().poll(cx))
                .is_ready()
            {
                return Poll::Ready(Inbound::End(Ending::PeerGone));
            }
            match self.repair.next_due() {
                None => {
                    // Nothing waits for an ack: a timer left armed would wake the session for
                    // nothing (measured: +12 % server CPU per delivery, WebTransport-only Saturday).
                    self.repair_timer = None;
                    self.repair_timer_at = None;
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
                        return Poll::Ready(Inbound::Timer);
                    }
                }
            }
            let control = self.gates[CONTROL].poll(cx, |cx| self.control_read.as_mut().poll(cx));
            if let Poll::Ready((recv, buf, read)) = control {
                match read {
                    Ok(Some(n)) => {
                        self.decoder.extend(&buf[..n]);
                        self.control_read = read_control(recv, buf);
                        continue;
                    }
                    Ok(None) | Err(_) => return Poll::Ready(Inbound::End(Ending::PeerGone)),
                }
            }
            let datagram = self.gates[DATAGRAM].poll(cx, |cx| self.next_datagram.as_mut().poll(cx));
            if let Poll::Ready((connection, datagram)) = datagram {
                match datagram {
                    // Datagrams carry acknowledgements for the repair; anything else is ignored.
                    Ok(datagram) => {
                        self.next_datagram = receive_datagram(connection);
                        if let Ok(ClientMessage::Ack { room, version }) = wire::decode_client(&datagram.payload()) {
                            self.acked(&room, version);
                        }
                        continue;
                    }
                    Err(_) => return Poll::Ready(Inbound::End(Ending::PeerGone)),
                }
            }
            return Poll::Pending;
        }
    }

    /// States as datagrams where `core::routing` says so and they fit, the rest on the stream.
    async fn write_batch(&mut self, batch: &[Outgoing], write_timeout: Duration) -> Result<(), WireError> {
        self.out.clear();
        if !self.routing.datagrams_on()
            && self.connection.quic_connection().stats().path.lost_packets > 0
            && self.routing.loss_seen()
        {
            debug!("packet loss on this session: states go as datagrams from now on");
        }
        let max_datagram = self
            .connection
            .max_datagram_size()
            .filter(|_| self.routing.datagrams_on());
        let rtt = self.connection.rtt();
        let now = Instant::now().into_std();
        for item in batch {
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
                    let fits = max_datagram.is_some_and(|max| message.len() <= max);
                    if self.routing.route(&p.room, fits) == Route::Datagram
                        && self.connection.send_datagram(message).is_ok()
                    {
                        self.repair.sent(p, p.number, now, rtt);
                    } else {
                        self.repair.forget(&p.room);
                        wire::put_frame(&mut self.out, message);
                    }
                }
            }
        }
        self.write_out(write_timeout).await
    }

    async fn on_timer(&mut self, write_timeout: Duration) -> Result<(), WireError> {
        let mut repairs = std::mem::take(&mut self.repairs);
        self.repair.poll(Instant::now().into_std(), &mut repairs);
        self.out.clear();
        for action in repairs.drain(..) {
            match action {
                RepairAction::Datagram(p) => {
                    self.metrics.repair_datagrams.inc();
                    let _ = self.connection.send_datagram(p.wire_message());
                }
                RepairAction::Stream(p) => {
                    self.metrics.repair_stream.inc();
                    wire::put_frame(&mut self.out, p.wire_message());
                }
            }
        }
        self.repairs = repairs;
        self.write_out(write_timeout).await
    }

    /// Writes a close notice (after `reconnect`, when asked), waits (at most `limit`) for the
    /// client to close the session, and closes it with the code.
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
        if matches!(
            tokio::time::timeout_at(deadline, self.send.write_all(&self.out)).await,
            Ok(Ok(()))
        ) {
            closed = tokio::time::timeout_at(deadline, self.connection.closed())
                .await
                .is_ok();
        }
        self.connection
            .close(VarInt::from_u32(close.code.into()), close.reason.as_bytes());
        closed
    }
}
