//! One WebTransport session over one QUIC connection, as a sans-IO state machine: it owns the
//! `quinn_proto::Connection` and the HTTP/3 and WebTransport state, takes QUIC events, timeouts
//! and deliveries with `now`, and gives back packets to send, its next deadline and the events
//! the application needs. It never reads a clock or touches a socket.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use quinn_proto::{
    Connection, ConnectionError, ConnectionEvent, Dir, EndpointEvent, ReadError, StreamEvent, StreamId, Transmit,
    VarInt,
};

use super::super::h3::{self, ClientSettings, ConnectRequest, ConnectStreamEvent, H3Error, H3ErrorCode, UniStreamType};
use super::super::webtransport::{WebTransportSettings, PATH};
use super::delivery::{FromClient, StateDelivery};
use crate::connection::CLOSE_WAIT;
use crate::core::repair::RepairPolicy;
use crate::core::routing::StateDatagrams;
use crate::core::wire::{self, FrameDecoder, FrameError, MAX_CLIENT_MESSAGE};
use crate::core::{close_code, ClientCommand, CommandError, Outgoing, ServerControl};
use crate::metrics::Metrics;

/// The largest HTTP/3 frame the handshake reads (a CONNECT's headers, the client's SETTINGS).
const MAX_HANDSHAKE_FRAME: usize = 16 * 1024;

/// The session's timings and routing of states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// The QUIC and HTTP/3 handshakes, the control stream and its first message, together
    /// (from the connection's accept); QUIC close 4002 after it.
    pub handshake_timeout: Duration,
    /// A session from which no message (command, ping, ack) arrives this long is closed with
    /// 4002: QUIC's keep-alives run underneath and say nothing about the client.
    pub idle_timeout: Duration,
    /// A control stream that takes none of the bytes waiting for it this long drops the
    /// connection (the client stopped reading).
    pub write_timeout: Duration,
    /// How long a close waits for the client to end its side of the CONNECT stream.
    pub close_wait: Duration,
    /// After the client answered a close, how long it may take to close the connection itself.
    pub close_grace: Duration,
    /// After a refusal, how long the client may take to close the connection itself.
    pub refusal_wait: Duration,
    pub repair: RepairPolicy,
    pub state_datagrams: StateDatagrams,
    /// What a client may send in the datagrams after its first (`WtSession::receive`).
    pub inbound: InboundRate,
}

/// What a client may send, in bytes of UDP payload: on average (and half the bytes the server
/// sends it besides, since its acks grow with what it receives), and in one burst. What passes
/// it is dropped before QUIC decrypts or parses it (QUIC's loss recovery slows a client that
/// merely overshot), so no client can make the endpoint loop work for it without bound (a
/// packet of PADDING costs quinn-proto a turn of its frame loop per byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundRate {
    pub bytes_per_second: u32,
    pub burst_bytes: u32,
}

impl Default for InboundRate {
    /// 128 KiB a second, 512 KiB at once: above what a client sends that acks 64 rooms every
    /// 5 ms and sends a command every 10 ms (about 60 to 110 KB/s, with the aliases' size), and
    /// its largest message (64 KiB) with room.
    fn default() -> Self {
        Self {
            bytes_per_second: 131_072,
            burst_bytes: 524_288,
        }
    }
}

/// A connection's token bucket of received bytes, fed with the time by its caller.
#[derive(Debug)]
struct InboundBudget {
    tokens: f64,
    at: Instant,
}

impl InboundBudget {
    fn new(rate: InboundRate, now: Instant) -> Self {
        Self {
            tokens: f64::from(rate.burst_bytes),
            at: now,
        }
    }

    /// Credits half of what the server sent the client.
    fn credit(&mut self, rate: InboundRate, sent: usize) {
        self.tokens = (self.tokens + sent as f64 / 2.0).min(f64::from(rate.burst_bytes));
    }

    /// Takes `bytes`; false (and nothing taken) when the client is over its rate.
    fn take(&mut self, rate: InboundRate, now: Instant, bytes: usize) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.tokens = (self.tokens + elapsed * f64::from(rate.bytes_per_second)).min(f64::from(rate.burst_bytes));
        if self.tokens >= bytes as f64 {
            self.tokens -= bytes as f64;
            true
        } else {
            false
        }
    }
}

impl SessionConfig {
    pub fn from_settings(settings: &WebTransportSettings) -> Self {
        Self {
            handshake_timeout: settings.handshake_timeout,
            idle_timeout: settings.driver.keepalive.idle_timeout,
            write_timeout: settings.driver.write_timeout,
            close_wait: CLOSE_WAIT,
            close_grace: Duration::from_secs(1),
            refusal_wait: Duration::from_secs(1),
            repair: settings.repair,
            state_datagrams: settings.state_datagrams,
            inbound: InboundRate::default(),
        }
    }
}

/// What the application learns from a session, in order.
#[derive(Debug)]
pub enum SessionEvent {
    /// A CONNECT for the WebTransport path: answer it with `accept` or `refuse` (the
    /// admission's checks: origin, draining, per-address and node limits).
    Request(ConnectRequest),
    /// The control stream and its first message arrived: deliveries are taken from now on.
    Established,
    /// A client command, or why a message could not be read as one (answered with an error).
    Command(Result<ClientCommand, CommandError>),
    /// The control stream took every byte that waited for the client's window: deliver more
    /// (while `wants_more` is false the application leaves messages in its bounded queue).
    Writable,
    /// The session is over: nothing more is delivered or read. The connection may still have
    /// packets to send (a close handshake's last steps): drive it until `is_drained`.
    Ended(SessionEnd),
}

/// Why a session ended (or never opened).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The CONNECT was answered with this status (404 from the session; 403, 429, 503 from
    /// the application).
    Refused(u16),
    /// A CONNECT without HTTP/3 and QUIC datagrams on: malformed (the WebTransport draft),
    /// its stream reset with `H3_MESSAGE_ERROR`.
    Malformed,
    /// No control stream with a first message within the handshake timeout (QUIC close 4002).
    HandshakeTimeout,
    /// The client broke HTTP/3; the connection was closed with the error's code.
    H3(H3Error),
    /// The server closed the session with `code` (and its capsule); `answered`: the client
    /// ended its side in time (then the connection closes with `H3_NO_ERROR`, else with `code`).
    Closed { code: u16, answered: bool },
    /// The client closed the session: its capsule's code and reason (none when it only ended
    /// or reset the CONNECT stream, or stopped reading the control stream).
    PeerClosed { code: Option<u32>, reason: String },
    /// The connection ended without a close of the session.
    Lost(ConnectionError),
    /// The control stream took nothing for the write timeout: the connection was dropped.
    WriteStalled,
}

/// How to close a session the application ends (slow, shutdown, token expired).
#[derive(Debug, Clone, Copy)]
pub struct CloseRequest<'a> {
    pub code: u16,
    pub reason: &'a str,
    /// The longest wait for the client to end its side.
    pub limit: Duration,
    /// Send `reconnect` before the close (the node is draining).
    pub reconnect: bool,
}

/// Where the session is.
#[derive(Debug)]
enum Phase {
    /// The QUIC and HTTP/3 handshakes, the CONNECT and its answer, the control stream and its
    /// first message, all by `deadline`.
    Opening {
        deadline: Instant,
    },
    Open,
    /// The server sent its close: waits until `deadline` for the client to end its side.
    Closing {
        code: u16,
        reason: Bytes,
        deadline: Instant,
    },
    /// The outcome is known: the connection closes with `code` at `at` unless the client
    /// closes it first.
    Lingering {
        at: Instant,
        code: VarInt,
        reason: Bytes,
    },
    /// The connection is closed (by either side) or lost.
    Done,
}

/// Where the CONNECT request is.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// Not complete yet.
    Reading,
    /// Read, but the client's SETTINGS have not arrived: a draft WebTransport server must not
    /// process it before them. Boxed: the request is held only while the session opens.
    Held(Box<ConnectRequest>),
    /// Handed to the application (`SessionEvent::Request`).
    Asked,
    /// Answered 200.
    Accepted,
}

/// Bytes for one of the server's streams that quinn has not taken yet, and whether the stream
/// finishes after them.
#[derive(Debug)]
struct Outbox {
    id: StreamId,
    pending: BytesMut,
    fin: bool,
    finished: bool,
}

impl Outbox {
    fn new(id: StreamId) -> Self {
        Self {
            id,
            pending: BytesMut::new(),
            fin: false,
            finished: false,
        }
    }

    /// Hands quinn what it takes; returns whether any byte went. Once quinn holds everything,
    /// storage above `KEPT_WRITE_BUFFER` is given back.
    fn flush(&mut self, conn: &mut Connection) -> bool {
        let mut progressed = false;
        while !self.pending.is_empty() {
            match conn.send_stream(self.id).write(&self.pending) {
                Ok(n) if n > 0 => {
                    self.pending.advance(n);
                    progressed = true;
                }
                // Blocked (a `Writable` event follows) or stopped (its own event follows).
                _ => break,
            }
        }
        crate::transport::release_large(&mut self.pending);
        if self.pending.is_empty() && self.fin && !self.finished {
            self.finished = true;
            let _ = conn.send_stream(self.id).finish();
        }
        progressed
    }
}

/// The CONNECT stream: the request, then the client's capsules.
#[derive(Debug)]
struct ConnectStream {
    id: StreamId,
    buf: Vec<u8>,
    out: Outbox,
}

/// The client's control stream: the WebTransport stream header, then framed messages.
#[derive(Debug)]
struct ControlStream {
    id: StreamId,
    /// Bytes before the header was complete.
    head: Vec<u8>,
    header_read: bool,
    decoder: FrameDecoder,
    out: Outbox,
    /// Since when bytes wait for quinn without any being taken.
    stalled_since: Option<Instant>,
}

/// A client's unidirectional stream.
#[derive(Debug)]
struct ClientUni {
    id: StreamId,
    kind: Option<UniStreamType>,
    /// The type and SETTINGS, until read.
    buf: Vec<u8>,
}

/// What reading a stream found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamEnd {
    Open,
    Finished,
    Reset(VarInt),
}

/// Reads what `id` holds into `sink`.
fn read_stream(conn: &mut Connection, id: StreamId, mut sink: impl FnMut(&[u8])) -> StreamEnd {
    let mut recv = conn.recv_stream(id);
    let Ok(mut chunks) = recv.read(true) else {
        return StreamEnd::Finished;
    };
    let end = loop {
        match chunks.next(usize::MAX) {
            Ok(Some(chunk)) => sink(&chunk.bytes),
            Ok(None) => break StreamEnd::Finished,
            Err(ReadError::Blocked) => break StreamEnd::Open,
            Err(ReadError::Reset(code)) => break StreamEnd::Reset(code),
        }
    };
    // Flow-control credit is queued for the next `poll_transmit`, which the driver calls after
    // every input.
    let _ = chunks.finalize();
    end
}

/// One WebTransport session on one QUIC connection.
#[derive(Debug)]
pub struct WtSession {
    conn: Connection,
    /// Shared by the endpoint's sessions (128 bytes each when copied into every one).
    config: std::sync::Arc<SessionConfig>,
    metrics: std::sync::Arc<Metrics>,
    phase: Phase,
    /// The server's HTTP/3 control stream (its SETTINGS): held open for the connection's life.
    h3_control: Option<Outbox>,
    /// The client's HTTP/3 control, QPACK and other unidirectional streams: read and
    /// discarded, never stopped (stopping a critical stream is a connection error).
    client_uni: Vec<ClientUni>,
    client_settings: Option<ClientSettings>,
    request: Request,
    connect: Option<ConnectStream>,
    control: Option<ControlStream>,
    /// Aliases, routing and repair of states, from the session's opening.
    states: Option<StateDelivery>,
    /// When the client was last heard (a message on the control stream, a datagram).
    last_heard: Instant,
    events: VecDeque<SessionEvent>,
    /// What the client may still send (`SessionConfig::inbound`).
    inbound: InboundBudget,
    /// `SessionEvent::Ended` was given (it is given once).
    ended: bool,
    /// The client went over its inbound rate (logged once).
    over_inbound: bool,
}

impl WtSession {
    /// A session on a connection the endpoint accepted at `now`.
    pub fn new(
        conn: Connection,
        config: std::sync::Arc<SessionConfig>,
        metrics: std::sync::Arc<Metrics>,
        now: Instant,
    ) -> Self {
        Self {
            inbound: InboundBudget::new(config.inbound, now),
            conn,
            metrics,
            phase: Phase::Opening {
                deadline: now + config.handshake_timeout,
            },
            config,
            h3_control: None,
            client_uni: Vec::new(),
            client_settings: None,
            request: Request::Reading,
            connect: None,
            control: None,
            states: None,
            last_heard: now,
            events: VecDeque::new(),
            ended: false,
            over_inbound: false,
        }
    }

    /// The QUIC connection, for what the session does not wrap (stats, addresses).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// A received datagram of `bytes` for this connection, routed by the endpoint: handed to
    /// QUIC while the client is within its inbound rate (`SessionConfig::inbound`), else dropped
    /// unread and counted. False when dropped.
    pub fn receive(&mut self, now: Instant, bytes: usize, event: ConnectionEvent) -> bool {
        if !self.inbound.take(self.config.inbound, now, bytes) {
            self.metrics.wt_inbound_dropped.inc();
            if !self.over_inbound {
                self.over_inbound = true;
                tracing::info!(
                    remote = %self.conn.remote_address(),
                    "a WebTransport client sends more than its inbound rate; its excess datagrams are dropped"
                );
            }
            return false;
        }
        self.handle_event(now, event);
        true
    }

    /// An event for this connection from the endpoint (a datagram goes through `receive`).
    pub fn handle_event(&mut self, now: Instant, event: ConnectionEvent) {
        self.conn.handle_event(event);
        self.process(now);
    }

    /// The deadline `poll_timeout` gave has passed (or any time: nothing happens early).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.conn.poll_timeout().is_some_and(|at| at <= now) {
            self.conn.handle_timeout(now);
        }
        self.process(now);
        match self.phase {
            Phase::Opening { deadline } if deadline <= now => {
                self.close_connection(
                    now,
                    VarInt::from_u32(close_code::IDLE_TIMEOUT.into()),
                    Bytes::from_static(b"no first message on a control stream in time"),
                );
                self.metrics.wt_handshake_timeouts.inc();
                self.end(SessionEnd::HandshakeTimeout);
            }
            Phase::Open => {
                if self
                    .control
                    .as_ref()
                    .and_then(|c| c.stalled_since)
                    .is_some_and(|at| at + self.config.write_timeout <= now)
                {
                    // Dropped without a close message, as a WebSocket whose socket takes nothing
                    // (and as quinn closes a connection its driver dropped: code 0).
                    self.close_connection(now, VarInt::from_u32(0), Bytes::new());
                    self.end(SessionEnd::WriteStalled);
                    return;
                }
                if self.last_heard + self.config.idle_timeout <= now {
                    self.metrics.close_error(close_code::IDLE_TIMEOUT, "idle_timeout");
                    self.close(
                        now,
                        CloseRequest {
                            code: close_code::IDLE_TIMEOUT,
                            reason: "idle timeout",
                            limit: self.config.close_wait,
                            reconnect: false,
                        },
                    );
                    return;
                }
                if self
                    .states
                    .as_ref()
                    .and_then(StateDelivery::next_due)
                    .is_some_and(|due| due <= now)
                {
                    if let (Some(states), Some(control)) = (self.states.as_mut(), self.control.as_mut()) {
                        states.repair_due(now, &mut control.out.pending, &mut self.conn);
                    }
                    self.flush_control(now);
                }
            }
            Phase::Closing {
                code,
                ref reason,
                deadline,
            } if deadline <= now => {
                let reason = reason.clone();
                self.close_connection(now, VarInt::from_u32(code.into()), reason);
                self.end(SessionEnd::Closed { code, answered: false });
            }
            Phase::Lingering { at, code, ref reason } if at <= now => {
                let reason = reason.clone();
                self.close_connection(now, code, reason);
            }
            _ => {}
        }
    }

    /// The next time `handle_timeout` has something to do.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let own = match self.phase {
            Phase::Opening { deadline } => Some(deadline),
            Phase::Open => {
                let idle = self.last_heard + self.config.idle_timeout;
                let repair = self.states.as_ref().and_then(StateDelivery::next_due);
                let stall = self
                    .control
                    .as_ref()
                    .and_then(|c| c.stalled_since)
                    .map(|at| at + self.config.write_timeout);
                [Some(idle), repair, stall].into_iter().flatten().min()
            }
            Phase::Closing { deadline, .. } => Some(deadline),
            Phase::Lingering { at, .. } => Some(at),
            Phase::Done => None,
        };
        [own, self.conn.poll_timeout()].into_iter().flatten().min()
    }

    /// The next packets to send (at most `max_datagrams` in one GSO batch), written into `buf`.
    pub fn poll_transmit(&mut self, now: Instant, max_datagrams: usize, buf: &mut Vec<u8>) -> Option<Transmit> {
        let transmit = self.conn.poll_transmit(now, max_datagrams, buf)?;
        self.inbound.credit(self.config.inbound, transmit.size);
        Some(transmit)
    }

    /// What the endpoint must learn from the connection (retired IDs, the drain).
    pub fn poll_endpoint_event(&mut self) -> Option<EndpointEvent> {
        self.conn.poll_endpoint_events()
    }

    /// The next event for the application. An emptied queue gives its storage back (four
    /// events' worth, 320 bytes, that an idle session would otherwise keep): a session's events
    /// come a few at a time (its opening, a client's command).
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        let event = self.events.pop_front();
        if self.events.is_empty() && self.events.capacity() > 0 {
            self.events = VecDeque::new();
        }
        event
    }

    /// The connection is gone for good: the endpoint forgets it.
    pub fn is_drained(&self) -> bool {
        self.conn.is_drained()
    }

    /// The connection is closed (by either side) or lost: only its draining is left.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// The session takes deliveries.
    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open)
    }

    /// The control stream has no bytes waiting for quinn: the application may deliver more
    /// (a bounded queue in front of the session holds the rest, conflating states).
    pub fn wants_more(&self) -> bool {
        self.is_open() && self.control.as_ref().is_some_and(|c| c.out.pending.is_empty())
    }

    /// States sent as datagrams and not acknowledged yet.
    pub fn unacknowledged_states(&self) -> usize {
        self.states.as_ref().map_or(0, StateDelivery::unacknowledged)
    }

    /// Answers the CONNECT (after `SessionEvent::Request`) with 200.
    pub fn accept(&mut self, now: Instant) {
        if self.request != Request::Asked {
            return;
        }
        self.request = Request::Accepted;
        if let Some(connect) = self.connect.as_mut() {
            connect.out.pending.extend_from_slice(&h3::response(200));
            connect.out.flush(&mut self.conn);
        }
        self.process(now);
    }

    /// Answers the CONNECT (after `SessionEvent::Request`) with `status` (403, 429, 503): the
    /// client closes the connection, or the session does after `refusal_wait`.
    pub fn refuse(&mut self, now: Instant, status: u16) {
        if self.request != Request::Asked {
            return;
        }
        self.answer_refusal(now, status);
    }

    /// Whether the control stream's outbox holds storage for `bytes` or more (what it holds,
    /// written or not).
    #[cfg(test)]
    pub(crate) fn control_storage_at_least(&mut self, bytes: usize) -> bool {
        self.control.as_mut().is_some_and(|control| {
            let pending = &mut control.out.pending;
            pending.capacity() >= bytes || (pending.is_empty() && pending.try_reclaim(bytes))
        })
    }

    /// Writes a batch of queued messages: states as datagrams where the routing says so, the
    /// rest on the control stream, in order. Nothing is written unless the session is open.
    pub fn deliver(&mut self, now: Instant, batch: &[Outgoing]) -> bool {
        if !self.is_open() {
            return false;
        }
        let (Some(states), Some(control)) = (self.states.as_mut(), self.control.as_mut()) else {
            return false;
        };
        states.write_batch(batch, &mut control.out.pending, &mut self.conn, now);
        self.flush_control(now);
        true
    }

    /// Closes the session: a `close` message (after `reconnect`, if asked) on the control
    /// stream, the CLOSE_WEBTRANSPORT_SESSION capsule on the CONNECT stream and its end; then
    /// waits (at most `limit`) for the client to end its side. Before the session opened, the
    /// connection is closed with the code at once.
    pub fn close(&mut self, now: Instant, close: CloseRequest<'_>) {
        match self.phase {
            Phase::Open => {}
            Phase::Opening { .. } => {
                self.close_connection(
                    now,
                    VarInt::from_u32(close.code.into()),
                    Bytes::copy_from_slice(close.reason.as_bytes()),
                );
                self.end(SessionEnd::Closed {
                    code: close.code,
                    answered: false,
                });
                return;
            }
            _ => return,
        }
        if let Some(control) = self.control.as_mut() {
            if close.reconnect {
                let reconnect = ServerControl::Reconnect { reason: "shutdown" };
                wire::put_frame(&mut control.out.pending, &wire::encode_control(&reconnect));
            }
            wire::put_frame(&mut control.out.pending, &wire::encode_close(close.code, close.reason));
            control.out.flush(&mut self.conn);
        }
        if let Some(connect) = self.connect.as_mut() {
            connect
                .out
                .pending
                .extend_from_slice(&h3::close_capsule(close.code.into(), close.reason));
            connect.out.fin = true;
            connect.out.flush(&mut self.conn);
        }
        self.phase = Phase::Closing {
            code: close.code,
            reason: Bytes::copy_from_slice(close.reason.as_bytes()),
            deadline: now + close.limit,
        };
    }

    // ---- inputs ----

    /// Runs what quinn reports, then whatever the session can move on with.
    fn process(&mut self, now: Instant) {
        while let Some(event) = self.conn.poll() {
            match event {
                quinn_proto::Event::Connected => self.open_h3_control(),
                quinn_proto::Event::ConnectionLost { reason } => self.lost(reason),
                quinn_proto::Event::Stream(StreamEvent::Opened { dir }) => {
                    while let Some(id) = self.conn.streams().accept(dir) {
                        self.opened(now, id);
                        if matches!(self.phase, Phase::Done) {
                            return;
                        }
                    }
                }
                quinn_proto::Event::Stream(StreamEvent::Readable { id }) => self.readable(now, id),
                quinn_proto::Event::Stream(StreamEvent::Writable { id }) => self.writable(now, id),
                quinn_proto::Event::Stream(StreamEvent::Stopped { id, .. }) => self.stopped(now, id),
                quinn_proto::Event::DatagramReceived => self.datagrams(now),
                quinn_proto::Event::HandshakeDataReady
                | quinn_proto::Event::DatagramsUnblocked
                | quinn_proto::Event::Stream(StreamEvent::Finished { .. } | StreamEvent::Available { .. }) => {}
            }
            if matches!(self.phase, Phase::Done) {
                // Drain quinn's remaining events: nothing more is read.
                while self.conn.poll().is_some() {}
                return;
            }
        }
        self.move_on(now);
    }

    /// Opens the server's HTTP/3 control stream with its SETTINGS.
    fn open_h3_control(&mut self) {
        if self.h3_control.is_some() {
            return;
        }
        if let Some(id) = self.conn.streams().open(Dir::Uni) {
            let mut out = Outbox::new(id);
            out.pending.extend_from_slice(&h3::server_control_stream());
            out.flush(&mut self.conn);
            self.h3_control = Some(out);
        }
    }

    /// A stream the client opened.
    fn opened(&mut self, now: Instant, id: StreamId) {
        match id.dir() {
            Dir::Uni => self.client_uni.push(ClientUni {
                id,
                kind: None,
                buf: Vec::new(),
            }),
            Dir::Bi if self.connect.is_none() => {
                self.connect = Some(ConnectStream {
                    id,
                    buf: Vec::new(),
                    out: Outbox::new(id),
                })
            }
            Dir::Bi if self.control.is_none() => {
                self.control = Some(ControlStream {
                    id,
                    head: Vec::new(),
                    header_read: false,
                    decoder: FrameDecoder::default(),
                    out: Outbox::new(id),
                    stalled_since: None,
                })
            }
            Dir::Bi => {
                // A stream the session does not use: refused, the session goes on.
                let code = crate::transport::quic_code(H3ErrorCode::RequestRejected);
                let _ = self.conn.recv_stream(id).stop(code);
                let _ = self.conn.send_stream(id).reset(code);
                return;
            }
        }
        self.readable(now, id);
    }

    fn readable(&mut self, now: Instant, id: StreamId) {
        if let Some(at) = self.client_uni.iter().position(|s| s.id == id) {
            return self.read_client_uni(now, at);
        }
        if self.connect.as_ref().is_some_and(|c| c.id == id) {
            return self.read_connect(now);
        }
        if self.control.as_ref().is_some_and(|c| c.id == id) {
            self.read_control(now);
        }
    }

    /// The client's HTTP/3 control stream (its SETTINGS first), QPACK streams and others.
    fn read_client_uni(&mut self, now: Instant, at: usize) {
        let stream = &mut self.client_uni[at];
        let keep =
            stream.kind.is_none() || (stream.kind == Some(UniStreamType::Control) && self.client_settings.is_none());
        let buf = &mut stream.buf;
        let end = read_stream(&mut self.conn, stream.id, |bytes| {
            if keep {
                buf.extend_from_slice(bytes);
            }
        });
        if stream.kind.is_none() {
            match h3::read_uni_stream_type(&stream.buf) {
                Ok(Some((kind, used))) => {
                    stream.kind = Some(kind);
                    stream.buf.drain(..used);
                    if kind == UniStreamType::Control
                        && self
                            .client_uni
                            .iter()
                            .filter(|s| s.kind == Some(UniStreamType::Control))
                            .count()
                            > 1
                    {
                        return self.fail(
                            now,
                            H3Error {
                                code: H3ErrorCode::StreamCreation,
                                message: "a second control stream",
                            },
                        );
                    }
                }
                Ok(None) => {}
                Err(error) => return self.fail(now, error),
            }
        }
        let stream = &mut self.client_uni[at];
        if stream.kind == Some(UniStreamType::Control) {
            if self.client_settings.is_none() {
                match h3::read_client_settings(&stream.buf) {
                    Ok(Some((settings, _))) => {
                        self.client_settings = Some(settings);
                        stream.buf = Vec::new();
                    }
                    Ok(None) if stream.buf.len() > MAX_HANDSHAKE_FRAME => {
                        return self.fail(
                            now,
                            H3Error {
                                code: H3ErrorCode::ExcessiveLoad,
                                message: "handshake frame too large",
                            },
                        )
                    }
                    Ok(None) => {}
                    Err(error) => return self.fail(now, error),
                }
            }
            if end != StreamEnd::Open {
                // RFC 9114 §6.2.1: the control stream is never closed.
                return self.fail(
                    now,
                    H3Error {
                        code: H3ErrorCode::ClosedCriticalStream,
                        message: "the client closed its control stream",
                    },
                );
            }
        } else if stream.kind.is_some() {
            stream.buf = Vec::new();
        }
        if end != StreamEnd::Open {
            self.client_uni.remove(at);
        }
    }

    /// The CONNECT stream: the request while opening, the client's capsules after.
    fn read_connect(&mut self, now: Instant) {
        let Some(connect) = self.connect.as_mut() else { return };
        let buf = &mut connect.buf;
        let end = read_stream(&mut self.conn, connect.id, |bytes| buf.extend_from_slice(bytes));
        if self.request == Request::Reading {
            match h3::read_connect(&connect.buf) {
                Ok(Some((request, used))) => {
                    connect.buf.drain(..used);
                    if connect.buf.is_empty() {
                        // The request's bytes are not kept for the session's life (what follows
                        // on this stream, a capsule or two, is rare).
                        connect.buf = Vec::new();
                    }
                    self.request = Request::Held(Box::new(request));
                }
                Ok(None) if connect.buf.len() > MAX_HANDSHAKE_FRAME => {
                    return self.fail(
                        now,
                        H3Error {
                            code: H3ErrorCode::ExcessiveLoad,
                            message: "handshake frame too large",
                        },
                    )
                }
                Ok(None) => {}
                Err(error) => return self.fail(now, error),
            }
        }
        if matches!(self.phase, Phase::Open | Phase::Closing { .. }) {
            if let Some(ending) = self.capsules() {
                return self.peer_closed(now, ending);
            }
        }
        if end != StreamEnd::Open {
            // The CONNECT stream ended or was reset: the session is over (the draft).
            match self.phase {
                Phase::Opening { .. } => self.fail(
                    now,
                    H3Error {
                        code: H3ErrorCode::RequestRejected,
                        message: "the CONNECT stream ended",
                    },
                ),
                _ => self.peer_closed(now, (None, String::new())),
            }
        }
    }

    /// The client's capsules on the CONNECT stream: its close, or nothing (others are dropped).
    fn capsules(&mut self) -> Option<(Option<u32>, String)> {
        let connect = self.connect.as_mut()?;
        loop {
            match h3::read_connect_stream(&connect.buf) {
                Ok(Some((ConnectStreamEvent::Close { code, reason }, _))) => return Some((Some(code), reason)),
                Ok(Some((ConnectStreamEvent::Other, used))) => {
                    connect.buf.drain(..used);
                }
                Ok(None) if connect.buf.len() > MAX_HANDSHAKE_FRAME => {
                    return Some((None, "CONNECT stream frame too large".into()))
                }
                Ok(None) => return None,
                Err(error) => return Some((None, error.to_string())),
            }
        }
    }

    /// The control stream: its header, then messages.
    fn read_control(&mut self, now: Instant) {
        let Some(control) = self.control.as_mut() else { return };
        let (head, decoder, header_read) = (&mut control.head, &mut control.decoder, control.header_read);
        let end = read_stream(&mut self.conn, control.id, |bytes| {
            if header_read {
                decoder.extend(bytes);
            } else {
                head.extend_from_slice(bytes);
            }
        });
        if !control.header_read {
            match h3::read_stream_session(&control.head) {
                Ok(Some((session, used))) => {
                    let connect = self.connect.as_ref().map(|c| VarInt::from(c.id).into_inner());
                    if Some(session) != connect {
                        return self.fail(
                            now,
                            H3Error {
                                code: H3ErrorCode::Id,
                                message: "a stream of another session",
                            },
                        );
                    }
                    control.header_read = true;
                    control.decoder.extend(&control.head[used..]);
                    control.head = Vec::new();
                }
                Ok(None) if control.head.len() > MAX_HANDSHAKE_FRAME => {
                    return self.fail(
                        now,
                        H3Error {
                            code: H3ErrorCode::ExcessiveLoad,
                            message: "handshake frame too large",
                        },
                    )
                }
                Ok(None) => {}
                Err(error) => return self.fail(now, error),
            }
        }
        if end != StreamEnd::Open {
            match self.phase {
                Phase::Opening { .. } => self.fail(
                    now,
                    H3Error {
                        code: H3ErrorCode::RequestRejected,
                        message: "control stream ended before its first message",
                    },
                ),
                Phase::Open => {
                    // What was read first is still handed over; then the session ends.
                    self.decode_commands(now);
                    if self.is_open() {
                        self.peer_closed(now, (None, "control stream ended".into()));
                    }
                }
                _ => {}
            }
        }
    }

    fn writable(&mut self, now: Instant, id: StreamId) {
        if self.control.as_ref().is_some_and(|c| c.id == id) {
            let blocked = !self.wants_more();
            self.flush_control(now);
            if blocked && self.wants_more() {
                self.events.push_back(SessionEvent::Writable);
            }
            return;
        }
        for out in [self.h3_control.as_mut(), self.connect.as_mut().map(|c| &mut c.out)]
            .into_iter()
            .flatten()
        {
            if out.id == id {
                out.flush(&mut self.conn);
            }
        }
    }

    /// The client stopped reading one of the server's streams.
    fn stopped(&mut self, now: Instant, id: StreamId) {
        let ours =
            self.control.as_ref().is_some_and(|c| c.id == id) || self.connect.as_ref().is_some_and(|c| c.id == id);
        if !ours {
            return;
        }
        match self.phase {
            Phase::Open => self.peer_closed(now, (None, "stream stopped".into())),
            Phase::Closing { code, .. } => self.answered(now, code),
            _ => {}
        }
    }

    /// Datagrams from the client: acks, once the session is open; anything else is dropped.
    fn datagrams(&mut self, now: Instant) {
        while let Some(datagram) = self.conn.datagrams().recv() {
            if let (Phase::Open, Some(states)) = (&self.phase, self.states.as_mut()) {
                if states.on_datagram(&datagram, now) {
                    self.last_heard = now;
                }
            }
        }
    }

    fn lost(&mut self, reason: ConnectionError) {
        let end = match std::mem::replace(&mut self.phase, Phase::Done) {
            // The client closed the connection in answer to the close: a clean close.
            Phase::Closing { code, .. } => Some(SessionEnd::Closed { code, answered: true }),
            Phase::Lingering { .. } | Phase::Done => None,
            Phase::Opening { .. } | Phase::Open => Some(SessionEnd::Lost(reason)),
        };
        if let Some(end) = end {
            self.end(end);
        }
    }

    // ---- moving on ----

    /// Whatever the inputs so far allow: the CONNECT handed to the application, the session
    /// opened, commands decoded.
    fn move_on(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Opening { .. }) {
            if self.is_open() {
                self.decode_commands(now);
            }
            return;
        }
        if let (Request::Held(_), Some(settings)) = (&self.request, self.client_settings) {
            let Request::Held(request) = std::mem::replace(&mut self.request, Request::Asked) else {
                return;
            };
            if !settings.h3_datagram || self.conn.datagrams().max_size().is_none() {
                return self.malformed(now);
            }
            if request.path != PATH {
                return self.answer_refusal(now, 404);
            }
            self.events.push_back(SessionEvent::Request(*request));
        }
        let first_message = self
            .control
            .as_ref()
            .is_some_and(|c| c.decoder.has_frame(MAX_CLIENT_MESSAGE));
        if self.request == Request::Accepted && first_message {
            let session = self.connect.as_ref().map_or(0, |c| VarInt::from(c.id).into_inner());
            self.states = Some(StateDelivery::new(
                Bytes::from(h3::datagram_prefix(session)),
                self.metrics.clone(),
                self.config.repair,
                self.config.state_datagrams,
            ));
            self.phase = Phase::Open;
            self.last_heard = now;
            self.events.push_back(SessionEvent::Established);
            self.decode_commands(now);
        }
    }

    /// The messages read from the control stream, as events (acks are taken here).
    fn decode_commands(&mut self, now: Instant) {
        let (Some(control), Some(states)) = (self.control.as_mut(), self.states.as_mut()) else {
            return;
        };
        loop {
            let frame = match control.decoder.next_frame(MAX_CLIENT_MESSAGE) {
                Ok(Some(frame)) => frame,
                Ok(None) => return,
                Err(FrameError::TooLarge(..) | FrameError::BadLength) => {
                    self.metrics.close_error(close_code::MESSAGE_TOO_BIG, "message_too_big");
                    let reason = format!("message larger than {MAX_CLIENT_MESSAGE} bytes");
                    let limit = self.config.close_wait;
                    return self.close(
                        now,
                        CloseRequest {
                            code: close_code::MESSAGE_TOO_BIG,
                            reason: &reason,
                            limit,
                            reconnect: false,
                        },
                    );
                }
            };
            self.last_heard = now;
            if let FromClient::Command(command) = states.on_frame(&frame, now) {
                self.events.push_back(SessionEvent::Command(command));
            }
        }
    }

    fn flush_control(&mut self, now: Instant) {
        let Some(control) = self.control.as_mut() else { return };
        let progressed = control.out.flush(&mut self.conn);
        control.stalled_since = match (control.out.pending.is_empty(), progressed, control.stalled_since) {
            (true, _, _) => None,
            (false, true, _) | (false, false, None) => Some(now),
            (false, false, since) => since,
        };
    }

    // ---- endings ----

    /// Tells the application how the session ended, once.
    fn end(&mut self, end: SessionEnd) {
        if !std::mem::replace(&mut self.ended, true) {
            self.events.push_back(SessionEvent::Ended(end));
        }
    }

    /// Answers the CONNECT with `status` and ends its stream; the connection lingers for the
    /// client to close it.
    fn answer_refusal(&mut self, now: Instant, status: u16) {
        if let Some(connect) = self.connect.as_mut() {
            connect.out.pending.extend_from_slice(&h3::response(status));
            connect.out.fin = true;
            connect.out.flush(&mut self.conn);
        }
        self.phase = Phase::Lingering {
            at: now + self.config.refusal_wait,
            code: crate::transport::quic_code(H3ErrorCode::RequestRejected),
            reason: Bytes::from_static(b"refused"),
        };
        self.end(SessionEnd::Refused(status));
    }

    /// A WebTransport CONNECT without datagrams: a malformed request, a stream error.
    fn malformed(&mut self, now: Instant) {
        if let Some(connect) = self.connect.as_ref() {
            let code = crate::transport::quic_code(H3ErrorCode::Message);
            let _ = self.conn.recv_stream(connect.id).stop(code);
            let _ = self.conn.send_stream(connect.id).reset(code);
        }
        self.phase = Phase::Lingering {
            at: now + self.config.refusal_wait,
            code: crate::transport::quic_code(H3ErrorCode::NoError),
            reason: Bytes::new(),
        };
        self.end(SessionEnd::Malformed);
    }

    /// The client broke HTTP/3: the connection closes with the error's code.
    fn fail(&mut self, now: Instant, error: H3Error) {
        if matches!(self.phase, Phase::Done) {
            return;
        }
        self.close_connection(
            now,
            crate::transport::quic_code(error.code),
            Bytes::from_static(error.message.as_bytes()),
        );
        self.end(SessionEnd::H3(error));
    }

    /// The client closed the session (or, while closing, answered the server's close).
    fn peer_closed(&mut self, now: Instant, (code, reason): (Option<u32>, String)) {
        match self.phase {
            Phase::Open => {
                if let Some(connect) = self.connect.as_mut() {
                    connect.out.fin = true;
                    connect.out.flush(&mut self.conn);
                }
                self.close_connection(now, crate::transport::quic_code(H3ErrorCode::NoError), Bytes::new());
                self.end(SessionEnd::PeerClosed { code, reason });
            }
            Phase::Closing { code, .. } => self.answered(now, code),
            _ => {}
        }
    }

    /// The client ended its side after the server's close: the connection closes with
    /// `H3_NO_ERROR` once the client had time to close it itself (Chromium reports a session
    /// whose connection closes at once as lost, not closed with the code).
    fn answered(&mut self, now: Instant, code: u16) {
        let Phase::Closing { deadline, .. } = self.phase else {
            return;
        };
        self.phase = Phase::Lingering {
            at: deadline.min(now + self.config.close_grace),
            code: crate::transport::quic_code(H3ErrorCode::NoError),
            reason: Bytes::new(),
        };
        self.end(SessionEnd::Closed { code, answered: true });
    }

    fn close_connection(&mut self, now: Instant, code: VarInt, reason: Bytes) {
        if !matches!(self.phase, Phase::Done) {
            self.conn.close(now, code, reason);
            self.phase = Phase::Done;
        }
    }
}
