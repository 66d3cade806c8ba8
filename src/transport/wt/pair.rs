//! The virtual-time harness of the session's tests: a server (a quinn-proto endpoint hosting a
//! `WtSession`) and a client (a quinn-proto endpoint with a minimal WebTransport client written
//! from docs/PROTOCOL.md), joined by an in-memory link that delays, reorders and drops packets,
//! on a clock that jumps to the next deadline. No socket, no sleep, no wall clock.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto::{
    ClientConfig, Connection, ConnectionError, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig,
    ServerConfig, StreamEvent, StreamId, Transmit,
};
use wtransport_proto::headers::Headers;

use super::super::h3::{self, ConnectRequest, ConnectStreamEvent};
use super::super::webtransport::{self, WebTransportSettings};
use super::session::{SessionConfig, SessionEnd, SessionEvent, WtSession};
use crate::certs::Identity;
use crate::connection::{DriverSettings, Keepalive};
use crate::core::repair::RepairPolicy;
use crate::core::routing::StateDatagrams;
use crate::core::wire::{self, AliasAck, ClientMessage, FrameDecoder, ServerMessage};
use crate::core::ClientCommand;
use crate::metrics::Metrics;
use crate::quic_lb::SignedRandomIds;
use crate::session::SessionLimits;
use crate::udp::UdpSettings;

/// One direction of the link: packets in flight with their arrival times.
#[derive(Debug, Default)]
pub struct Link {
    in_flight: Vec<(Instant, u64, BytesMut)>,
    next_seq: u64,
    /// One-way delay of every packet.
    pub latency: Duration,
    /// Up to this much more, drawn per packet: packets overtake each other.
    pub jitter: Duration,
    /// The share of packets lost at random.
    pub loss: f64,
    /// Drops the next this many packets.
    pub drop_next: usize,
    /// Drops everything (a path gone silent).
    pub blackhole: bool,
    rng: u64,
    pub sent: u64,
    pub dropped: u64,
    /// The largest packet sent, in bytes.
    pub largest: usize,
}

impl Link {
    fn seeded(seed: u64) -> Self {
        Self {
            rng: seed | 1,
            ..Self::default()
        }
    }

    /// xorshift64*: a fixed sequence per seed.
    fn random(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn send(&mut self, now: Instant, packet: BytesMut) {
        self.sent += 1;
        self.largest = self.largest.max(packet.len());
        if self.blackhole || self.drop_next > 0 {
            self.drop_next = self.drop_next.saturating_sub(1);
            self.dropped += 1;
            return;
        }
        if self.loss > 0.0 && self.random() < self.loss {
            self.dropped += 1;
            return;
        }
        let jitter = self.jitter.mul_f64(self.random());
        self.in_flight
            .push((now + self.latency + jitter, self.next_seq, packet));
        self.next_seq += 1;
    }

    fn next_arrival(&self) -> Option<Instant> {
        self.in_flight.iter().map(|(at, ..)| *at).min()
    }

    /// The packets arrived by `now`, in arrival order.
    fn arrived(&mut self, now: Instant) -> Vec<BytesMut> {
        let mut due: Vec<_> = Vec::new();
        let mut i = 0;
        while i < self.in_flight.len() {
            if self.in_flight[i].0 <= now {
                due.push(self.in_flight.swap_remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|(at, seq, _)| (*at, *seq));
        due.into_iter().map(|(.., packet)| packet).collect()
    }
}

/// Splits a transmit (maybe several GSO segments) into packets.
fn packets(transmit: &Transmit, buf: &[u8]) -> Vec<BytesMut> {
    let size = transmit.segment_size.unwrap_or(transmit.size);
    buf[..transmit.size].chunks(size).map(BytesMut::from).collect()
}

/// The server side: an endpoint that accepts one connection and runs a `WtSession` on it.
pub struct Server {
    pub endpoint: Endpoint,
    pub addr: SocketAddr,
    pub session: Option<(ConnectionHandle, WtSession)>,
    config: SessionConfig,
    pub metrics: Arc<Metrics>,
    /// The answer to a CONNECT for the WebTransport path: 200 or a refusal.
    pub admit: u16,
    /// Every event the session gave, in order.
    pub events: Vec<SessionEvent>,
    pub requests: Vec<ConnectRequest>,
    /// Answers a client whose address is not validated with a Retry (as the real endpoint does
    /// past `--quic-retry-threshold`).
    pub retry: bool,
    /// Retries sent and connections accepted.
    pub retries: u32,
    pub accepted: u32,
}

impl Server {
    fn handle(&mut self, now: Instant, from: SocketAddr, packet: BytesMut, out: &mut Vec<BytesMut>) {
        let mut buf = Vec::new();
        let bytes = packet.len();
        match self.endpoint.handle(now, from, None, None, packet, &mut buf) {
            Some(DatagramEvent::NewConnection(incoming)) => {
                let mut buf = Vec::new();
                if self.retry && !incoming.remote_address_validated() && incoming.may_retry() {
                    match self.endpoint.retry(incoming, &mut buf) {
                        Ok(transmit) => {
                            self.retries += 1;
                            out.extend(packets(&transmit, &buf));
                        }
                        Err(refused) => self.endpoint.ignore(refused.into_incoming()),
                    }
                    return;
                }
                match self.endpoint.accept(incoming, now, &mut buf, None) {
                    Ok((ch, conn)) => {
                        self.accepted += 1;
                        self.session = Some((
                            ch,
                            WtSession::new(conn, Arc::new(self.config), self.metrics.clone(), now),
                        ));
                    }
                    Err(error) => {
                        if let Some(transmit) = error.response {
                            out.extend(packets(&transmit, &buf));
                        }
                    }
                }
            }
            Some(DatagramEvent::ConnectionEvent(ch, event)) => {
                if let Some((own, session)) = self.session.as_mut() {
                    if *own == ch {
                        session.receive(now, bytes, event);
                    }
                }
            }
            Some(DatagramEvent::Response(transmit)) => out.extend(packets(&transmit, &buf)),
            None => {}
        }
    }

    fn drive(&mut self, now: Instant, out: &mut Vec<BytesMut>) {
        let Some((ch, session)) = self.session.as_mut() else {
            return;
        };
        if session.poll_timeout().is_some_and(|at| at <= now) {
            session.handle_timeout(now);
        }
        loop {
            let mut more = false;
            while let Some(event) = session.poll_event() {
                more = true;
                if let SessionEvent::Request(request) = &event {
                    self.requests.push(request.clone());
                    if self.admit == 200 {
                        session.accept(now);
                    } else {
                        session.refuse(now, self.admit);
                    }
                }
                self.events.push(event);
            }
            while let Some(event) = session.poll_endpoint_event() {
                if let Some(event) = self.endpoint.handle_event(*ch, event) {
                    more = true;
                    session.handle_event(now, event);
                }
            }
            if !more {
                break;
            }
        }
        let mut buf = Vec::new();
        while let Some(transmit) = session.poll_transmit(now, 10, &mut buf) {
            out.extend(packets(&transmit, &buf));
            buf.clear();
        }
        if session.is_drained() {
            self.session = None;
        }
    }

    fn next_wakeup(&mut self) -> Option<Instant> {
        self.session.as_mut().and_then(|(_, s)| s.poll_timeout())
    }

    /// The session (panics when the connection is gone).
    pub fn session(&mut self) -> &mut WtSession {
        &mut self.session.as_mut().expect("a session").1
    }

    /// How the session ended, if it did.
    pub fn ended(&self) -> Option<&SessionEnd> {
        self.events.iter().find_map(|e| match e {
            SessionEvent::Ended(end) => Some(end),
            _ => None,
        })
    }

    pub fn established(&self) -> bool {
        self.events.iter().any(|e| matches!(e, SessionEvent::Established))
    }

    /// The commands the session handed over, in order.
    pub fn commands(&self) -> Vec<ClientCommand> {
        self.events
            .iter()
            .filter_map(|e| match e {
                SessionEvent::Command(Ok(command)) => Some(command.clone()),
                _ => None,
            })
            .collect()
    }
}

/// What the simulated client sends on its HTTP/3 control stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientSettingsMode {
    /// SETTINGS with HTTP/3 datagrams and WebTransport on, as Chromium sends.
    WebTransport,
    /// SETTINGS without `SETTINGS_H3_DATAGRAM`.
    NoDatagrams,
    /// A GOAWAY frame first, then nothing (RFC 9114 §6.2.1's H3_MISSING_SETTINGS).
    GoawayFirst,
    /// No control stream at all.
    None,
}

/// A minimal WebTransport client, written from docs/PROTOCOL.md.
pub struct Client {
    pub endpoint: Endpoint,
    pub addr: SocketAddr,
    pub conn: Option<(ConnectionHandle, Connection)>,
    pub settings: ClientSettingsMode,
    pub path: &'static str,
    /// Acks each state datagram at once with an `acks` datagram.
    pub auto_ack: bool,
    /// Ends its side of the CONNECT stream when the server's close capsule arrives.
    pub answer_close: bool,
    /// The first message on the control stream (a `ping`, as the docs suggest).
    pub first_message: Option<Bytes>,
    /// Reads the control stream (a client that stops reading leaves the server's bytes waiting).
    pub reads_control: bool,
    connect: Option<StreamId>,
    connect_buf: Vec<u8>,
    /// The server's HTTP/3 control stream's bytes.
    pub server_uni: Vec<u8>,
    pub status: Option<u16>,
    /// The CONNECT stream's reset code, when the server reset it.
    pub connect_reset: Option<u64>,
    pub connect_finished: bool,
    control: Option<StreamId>,
    decoder: FrameDecoder,
    /// Messages from the control stream, whole.
    pub messages: Vec<Bytes>,
    /// Datagram payloads, whole (the session prefix included).
    pub datagrams: Vec<Bytes>,
    /// The server's CLOSE_WEBTRANSPORT_SESSION: code and reason.
    pub capsule: Option<(u32, String)>,
    /// Why the QUIC connection ended.
    pub lost: Option<ConnectionError>,
    /// The client's streams the server asked it to stop sending on, with the codes.
    pub stopped: Vec<(StreamId, u64)>,
    /// Per room, the state it holds (version and data), kept by applying states and deltas
    /// in the order they arrive, as a client of docs/PROTOCOL.md's "Delta states" does.
    pub held: std::collections::HashMap<String, (u64, String)>,
    /// Room names by alias, from `alias` messages.
    aliases: std::collections::HashMap<u64, String>,
    /// Deltas applied, from the stream and as datagrams.
    pub deltas_applied: u64,
    /// Delta datagrams dropped because the client did not hold their base (repaired later).
    pub delta_datagrams_dropped: u64,
    /// Deltas on the stream the client could not apply: never, by the protocol.
    pub stream_delta_failures: u64,
}

impl Client {
    fn handle(&mut self, now: Instant, from: SocketAddr, packet: BytesMut) {
        let mut buf = Vec::new();
        if let Some(DatagramEvent::ConnectionEvent(ch, event)) =
            self.endpoint.handle(now, from, None, None, packet, &mut buf)
        {
            if let Some((own, conn)) = self.conn.as_mut() {
                if *own == ch {
                    conn.handle_event(event);
                }
            }
        }
    }

    fn drive(&mut self, now: Instant, out: &mut Vec<BytesMut>) {
        let Some((_, conn)) = self.conn.as_mut() else { return };
        if conn.poll_timeout().is_some_and(|at| at <= now) {
            conn.handle_timeout(now);
        }
        loop {
            let mut more = false;
            while let Some(event) = self.conn().poll() {
                more = true;
                self.on_event(event);
            }
            let (ch, conn) = self.conn.as_mut().expect("a connection");
            while let Some(event) = conn.poll_endpoint_events() {
                if let Some(event) = self.endpoint.handle_event(*ch, event) {
                    more = true;
                    conn.handle_event(event);
                }
            }
            if !more {
                break;
            }
        }
        let conn = self.conn();
        let mut buf = Vec::new();
        while let Some(transmit) = conn.poll_transmit(now, 10, &mut buf) {
            out.extend(packets(&transmit, &buf));
            buf.clear();
        }
        if conn.is_drained() {
            self.conn = None;
        }
    }

    fn conn(&mut self) -> &mut Connection {
        &mut self.conn.as_mut().expect("a connection").1
    }

    fn write(&mut self, id: StreamId, bytes: &[u8]) {
        let written = self.conn().send_stream(id).write(bytes).expect("write");
        assert_eq!(written, bytes.len(), "the test's writes fit the stream's window");
    }

    fn on_event(&mut self, event: quinn_proto::Event) {
        match event {
            quinn_proto::Event::Connected => self.start(),
            quinn_proto::Event::ConnectionLost { reason } => self.lost = Some(reason),
            quinn_proto::Event::Stream(StreamEvent::Opened { dir: Dir::Uni }) => {
                while let Some(id) = self.conn().streams().accept(Dir::Uni) {
                    self.read_server_uni(id);
                }
            }
            quinn_proto::Event::Stream(StreamEvent::Readable { id }) => {
                if Some(id) == self.connect {
                    self.read_connect();
                } else if Some(id) == self.control {
                    if self.reads_control {
                        self.read_control();
                    }
                } else if id.dir() == Dir::Uni {
                    self.read_server_uni(id);
                }
            }
            quinn_proto::Event::Stream(StreamEvent::Stopped { id, error_code }) => {
                self.stopped.push((id, error_code.into_inner()));
            }
            quinn_proto::Event::DatagramReceived => {
                while let Some(datagram) = self.conn().datagrams().recv() {
                    self.on_datagram(datagram);
                }
            }
            _ => {}
        }
    }

    /// The HTTP/3 control stream with SETTINGS, the QPACK streams, and the CONNECT.
    fn start(&mut self) {
        let mut control = Vec::new();
        let _ = wtransport_proto::stream_header::StreamHeader::new_control().write(&mut control);
        match self.settings {
            ClientSettingsMode::WebTransport | ClientSettingsMode::NoDatagrams => {
                let mut builder = wtransport_proto::settings::Settings::builder()
                    .qpack_max_table_capacity(wtransport_proto::varint::VarInt::from_u32(0))
                    .qpack_blocked_streams(wtransport_proto::varint::VarInt::from_u32(0))
                    .enable_webtransport()
                    .webtransport_max_sessions(wtransport_proto::varint::VarInt::from_u32(1));
                if self.settings == ClientSettingsMode::WebTransport {
                    builder = builder.enable_h3_datagrams();
                }
                let _ = builder.build().generate_frame().write(&mut control);
            }
            // GOAWAY (07) with stream ID 0.
            ClientSettingsMode::GoawayFirst => control.extend_from_slice(&[0x07, 0x01, 0x00]),
            ClientSettingsMode::None => control.clear(),
        }
        if !control.is_empty() {
            let id = self.conn().streams().open(Dir::Uni).expect("uni stream");
            self.write(id, &control);
        }
        for qpack in [0x02u8, 0x03] {
            let id = self.conn().streams().open(Dir::Uni).expect("uni stream");
            self.write(id, &[qpack]);
        }
        let headers: Headers = [
            (":method", "CONNECT"),
            (":protocol", "webtransport"),
            (":scheme", "https"),
            (":authority", "localhost:4433"),
            (":path", self.path),
            ("origin", "https://scores.example"),
        ]
        .into_iter()
        .collect();
        let mut request = Vec::new();
        headers.generate_frame().write(&mut request).expect("headers");
        let id = self.conn().streams().open(Dir::Bi).expect("bidi stream");
        self.write(id, &request);
        self.connect = Some(id);
    }

    fn read_all(&mut self, id: StreamId) -> (Vec<u8>, Result<bool, u64>) {
        let mut data = Vec::new();
        let mut recv = self.conn().recv_stream(id);
        let Ok(mut chunks) = recv.read(true) else {
            return (data, Ok(true));
        };
        let end = loop {
            match chunks.next(usize::MAX) {
                Ok(Some(chunk)) => data.extend_from_slice(&chunk.bytes),
                Ok(None) => break Ok(true),
                Err(quinn_proto::ReadError::Blocked) => break Ok(false),
                Err(quinn_proto::ReadError::Reset(code)) => break Err(code.into_inner()),
            }
        };
        let _ = chunks.finalize();
        (data, end)
    }

    fn read_server_uni(&mut self, id: StreamId) {
        let (data, _) = self.read_all(id);
        self.server_uni.extend_from_slice(&data);
    }

    /// The CONNECT stream: the response, then capsules.
    fn read_connect(&mut self) {
        let Some(id) = self.connect else { return };
        let (data, end) = self.read_all(id);
        self.connect_buf.extend_from_slice(&data);
        if self.status.is_none() {
            let mut reader = wtransport_proto::bytes::BufferReader::new(&self.connect_buf);
            if let Ok(Some(frame)) = wtransport_proto::frame::Frame::read_from_buffer(&mut reader) {
                let used = reader.offset();
                let headers = Headers::with_frame(&frame).expect("response headers");
                let status = headers.get(":status").and_then(|s| s.parse().ok()).expect(":status");
                self.connect_buf.drain(..used);
                self.status = Some(status);
                if status == 200 {
                    self.open_control();
                }
            }
        }
        while let Ok(Some((event, used))) = h3::read_connect_stream(&self.connect_buf) {
            if let ConnectStreamEvent::Close { code, reason } = event {
                self.capsule = Some((code, reason));
                if self.answer_close {
                    let _ = self.conn().send_stream(id).finish();
                }
            }
            self.connect_buf.drain(..used);
        }
        match end {
            Ok(true) => self.connect_finished = true,
            Err(code) => self.connect_reset = Some(code),
            Ok(false) => {}
        }
    }

    /// The control stream: `40 41`, the session ID, then the first message.
    fn open_control(&mut self) {
        let id = self.conn().streams().open(Dir::Bi).expect("bidi stream");
        self.control = Some(id);
        let session = self.connect.map_or(0, |c| quinn_proto::VarInt::from(c).into_inner());
        // The signal 0x41 as a two-byte varint, then the session ID as a varint (the datagram
        // prefix is the varint of a quarter of its argument).
        let mut head = vec![0x40, 0x41];
        head.extend_from_slice(&h3::datagram_prefix(session * 4));
        self.write(id, &head);
        if let Some(first) = self.first_message.clone() {
            self.write(id, &first);
        }
    }

    /// Reads what waits on the control stream now (after `reads_control` was off).
    pub fn read_control_now(&mut self) {
        self.reads_control = true;
        self.read_control();
    }

    fn read_control(&mut self) {
        let Some(id) = self.control else { return };
        let (data, _) = self.read_all(id);
        self.decoder.extend(&data);
        while let Ok(Some(message)) = self.decoder.next_frame(1 << 20) {
            self.hold(&message, false);
            self.messages.push(message);
        }
    }

    /// Keeps the state a message brings (whole or as a delta); returns the room's version held
    /// after a datagram state or delta it took, to acknowledge.
    fn hold(&mut self, message: &[u8], datagram: bool) -> Option<u64> {
        let (room, version, base, ts_data) = match wire::decode_server(message).ok()? {
            ServerMessage::Subscribed(s) => {
                self.held.remove(s.room);
                return None;
            }
            ServerMessage::Alias(a) => {
                self.aliases.insert(a.alias, a.room.to_string());
                return None;
            }
            ServerMessage::State(s) => (s.room.to_string(), s.version, None, s.data.to_string()),
            ServerMessage::AliasedState(s) => {
                (self.aliases.get(&s.alias)?.clone(), s.version, None, s.data.to_string())
            }
            ServerMessage::Delta(d) => (d.room.to_string(), d.version, Some(d.base), d.delta.to_string()),
            ServerMessage::AliasedDelta(d) => (
                self.aliases.get(&d.alias)?.clone(),
                d.version,
                Some(d.base),
                d.delta.to_string(),
            ),
            _ => return None,
        };
        let held = self.held.get(&room);
        if held.is_some_and(|(v, _)| *v >= version) {
            return held.map(|(v, _)| *v);
        }
        let data = match base {
            None => ts_data,
            Some(base) => {
                let applied = held
                    .filter(|(v, _)| *v == base)
                    .and_then(|(_, data)| crate::core::delta::apply(data.as_bytes(), ts_data.as_bytes(), 1 << 20).ok())
                    .and_then(|bytes| String::from_utf8(bytes).ok());
                match applied {
                    Some(data) => {
                        self.deltas_applied += 1;
                        data
                    }
                    None if datagram => {
                        self.delta_datagrams_dropped += 1;
                        return None;
                    }
                    None => {
                        self.stream_delta_failures += 1;
                        return None;
                    }
                }
            }
        };
        self.held.insert(room, (version, data));
        Some(version)
    }

    fn on_datagram(&mut self, datagram: Bytes) {
        let held = self.hold(&datagram[1..], true);
        if self.auto_ack {
            let alias = match wire::decode_server(&datagram[1..]) {
                Ok(ServerMessage::AliasedState(state)) => Some((state.alias, state.version)),
                Ok(ServerMessage::AliasedDelta(delta)) => held.map(|v| (delta.alias, v)),
                _ => None,
            };
            if let Some((alias, version)) = alias {
                let ack = ClientMessage::Acks(vec![AliasAck { alias, version }]);
                self.send_datagram(&wire::encode_client(&ack));
            }
        }
        self.datagrams.push(datagram);
    }

    /// Sends a message on the control stream, framed.
    pub fn send(&mut self, message: &ClientMessage) {
        let mut framed = BytesMut::new();
        wire::put_frame(&mut framed, &wire::encode_client(message));
        let id = self.control.expect("a control stream");
        self.write(id, &framed);
    }

    /// Writes raw bytes on the control stream.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let id = self.control.expect("a control stream");
        self.write(id, bytes);
    }

    /// Sends `payload` as a datagram of session 0.
    pub fn send_datagram(&mut self, payload: &[u8]) {
        let mut datagram = vec![0x00];
        datagram.extend_from_slice(payload);
        self.conn()
            .datagrams()
            .send(Bytes::from(datagram), true)
            .expect("datagram");
    }

    /// Closes the session: a CLOSE_WEBTRANSPORT_SESSION capsule, then the end of the CONNECT stream.
    pub fn close_session(&mut self, code: u32, reason: &str) {
        let id = self.connect.expect("a CONNECT stream");
        self.write(id, &h3::close_capsule(code, reason));
        let _ = self.conn().send_stream(id).finish();
    }

    /// The control-stream messages decoded.
    pub fn decoded(&self) -> Vec<ServerMessage<'_>> {
        self.messages
            .iter()
            .map(|m| wire::decode_server(m).expect("a server message"))
            .collect()
    }

    /// The newest version of the state of `alias` or `room`, from either path.
    pub fn newest_state(&self, room: &str, alias: u64) -> Option<u64> {
        let on_stream = self.decoded().into_iter().filter_map(|m| match m {
            ServerMessage::State(s) if s.room == room => Some(s.version),
            _ => None,
        });
        let as_datagrams = self
            .datagrams
            .iter()
            .filter_map(|d| match wire::decode_server(&d[1..]) {
                Ok(ServerMessage::AliasedState(s)) if s.alias == alias => Some(s.version),
                _ => None,
            });
        on_stream.chain(as_datagrams).max()
    }

    /// The QUIC application close the connection ended with: code and reason.
    pub fn closed_with(&self) -> Option<(u64, Vec<u8>)> {
        match &self.lost {
            Some(ConnectionError::ApplicationClosed(close)) => {
                Some((close.error_code.into_inner(), close.reason.to_vec()))
            }
            _ => None,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.conn.as_ref().is_none_or(|(_, c)| c.is_closed())
    }
}

/// What a test sets up.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    pub session: SessionConfig,
    /// QUIC keep-alives of the server (None: none).
    pub keep_alive: Option<Duration>,
    /// The QUIC idle timeout the server offers.
    pub quic_idle: Duration,
    /// The QUIC idle timeout the client offers.
    pub client_quic_idle: Duration,
    /// What the client lets the server send on a stream before reading it.
    pub client_stream_window: u32,
    pub settings: ClientSettingsMode,
    pub path: &'static str,
    pub admit: u16,
    pub seed: u64,
    /// The server answers every Initial from an address it has not validated with a Retry.
    pub retry: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            session: SessionConfig {
                handshake_timeout: Duration::from_secs(10),
                idle_timeout: Duration::from_secs(60),
                write_timeout: Duration::from_secs(15),
                close_wait: Duration::from_secs(2),
                close_grace: Duration::from_secs(1),
                refusal_wait: Duration::from_secs(1),
                repair: RepairPolicy::default(),
                state_datagrams: StateDatagrams::Always,
                inbound: Default::default(),
            },
            keep_alive: Some(Duration::from_secs(20)),
            quic_idle: Duration::from_secs(60),
            client_quic_idle: Duration::from_secs(60),
            client_stream_window: 1 << 20,
            settings: ClientSettingsMode::WebTransport,
            path: webtransport::PATH,
            admit: 200,
            seed: 7,
            retry: false,
        }
    }
}

/// The server's QUIC configuration, as the real server builds it (`webtransport::server_config`).
pub fn server_config(setup: &Setup, identity: Identity) -> ServerConfig {
    let settings = settings(setup);
    let mut config = webtransport::server_config(&settings, identity).expect("server config");
    let mut transport = webtransport::transport_config(&settings);
    transport.keep_alive_interval(setup.keep_alive);
    config.transport_config(Arc::new(transport));
    config
}

/// The server's WebTransport settings for `setup`.
fn settings(setup: &Setup) -> WebTransportSettings {
    WebTransportSettings {
        udp: UdpSettings {
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            recv_buffer: 0,
            send_buffer: 0,
        },
        cert: None,
        cert_check_interval: Duration::from_secs(60),
        keep_alive: setup.keep_alive.unwrap_or(Duration::ZERO),
        idle_timeout: setup.quic_idle,
        handshake_timeout: setup.session.handshake_timeout,
        driver: Arc::new(DriverSettings {
            write_timeout: setup.session.write_timeout,
            drain_timeout: Duration::from_secs(10),
            keepalive: Keepalive {
                interval: Duration::from_secs(25),
                idle_timeout: setup.session.idle_timeout,
            },
            session: SessionLimits::default(),
        }),
        repair: setup.session.repair,
        state_datagrams: setup.session.state_datagrams,
        quic_server_id: None,
        retry_threshold: 200,
        loops: 1,
    }
}

fn client_config(setup: &Setup, identity: &Identity) -> ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(identity.chain[0].clone()).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn_proto::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    let mut config = ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn_proto::TransportConfig::default();
    transport.max_idle_timeout(Some(setup.client_quic_idle.try_into().expect("idle")));
    transport.stream_receive_window(setup.client_stream_window.into());
    config.transport_config(Arc::new(transport));
    config
}

/// A client and a server joined by two links, on a virtual clock.
pub struct Pair {
    pub now: Instant,
    pub server: Server,
    pub client: Client,
    pub to_server: Link,
    pub to_client: Link,
}

impl Pair {
    /// Starts the client's connection (nothing moves until the clock runs).
    pub fn new(setup: Setup) -> Self {
        let identity = Identity::self_signed(&["localhost"]).expect("certificate");
        let server_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 4433));
        let client_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 50_000));
        let mut endpoint_config = EndpointConfig::default();
        endpoint_config.rng_seed(Some([setup.seed as u8; 32]));
        let endpoint_config = Arc::new(endpoint_config);
        // The server's own endpoint settings (its connection IDs, the UDP payload it takes).
        let mut server_endpoint_config =
            webtransport::proto_endpoint_configs(&settings(&setup), 1, &SignedRandomIds::default())
                .pop()
                .expect("one loop's configuration");
        server_endpoint_config.rng_seed(Some([setup.seed as u8; 32]));
        let now = Instant::now();
        let client_config = client_config(&setup, &identity);
        let server = Server {
            endpoint: Endpoint::new(
                Arc::new(server_endpoint_config),
                Some(Arc::new(server_config(&setup, identity))),
                false,
                None,
            ),
            addr: server_addr,
            session: None,
            config: setup.session,
            metrics: Arc::new(Metrics::new()),
            admit: setup.admit,
            events: Vec::new(),
            requests: Vec::new(),
            retry: setup.retry,
            retries: 0,
            accepted: 0,
        };
        // Path MTU discovery allowed, as quinn allows it on a socket that does not fragment.
        let mut endpoint = Endpoint::new(endpoint_config, None, true, None);
        let (ch, conn) = endpoint
            .connect(now, client_config, server_addr, "localhost")
            .expect("connect");
        let client = Client {
            endpoint,
            addr: client_addr,
            conn: Some((ch, conn)),
            settings: setup.settings,
            path: setup.path,
            auto_ack: true,
            answer_close: true,
            first_message: Some(framed(&ClientMessage::Command(ClientCommand::Ping))),
            reads_control: true,
            connect: None,
            connect_buf: Vec::new(),
            server_uni: Vec::new(),
            status: None,
            connect_reset: None,
            connect_finished: false,
            control: None,
            decoder: FrameDecoder::default(),
            messages: Vec::new(),
            datagrams: Vec::new(),
            held: Default::default(),
            aliases: Default::default(),
            deltas_applied: 0,
            delta_datagrams_dropped: 0,
            stream_delta_failures: 0,
            capsule: None,
            lost: None,
            stopped: Vec::new(),
        };
        Self {
            now,
            server,
            client,
            to_server: Link::seeded(setup.seed),
            to_client: Link::seeded(setup.seed.wrapping_mul(31).wrapping_add(17)),
        }
    }

    /// Moves every packet due by `now` and drives both sides until nothing moves.
    pub fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut to_client = Vec::new();
            for packet in self.to_server.arrived(self.now) {
                self.server.handle(self.now, self.client.addr, packet, &mut to_client);
            }
            self.server.drive(self.now, &mut to_client);
            let mut to_server = Vec::new();
            for packet in self.to_client.arrived(self.now) {
                self.client.handle(self.now, self.server.addr, packet);
            }
            self.client.drive(self.now, &mut to_server);
            let moved = !to_client.is_empty() || !to_server.is_empty();
            for packet in to_client {
                self.to_client.send(self.now, packet);
            }
            for packet in to_server {
                self.to_server.send(self.now, packet);
            }
            let due = [self.to_server.next_arrival(), self.to_client.next_arrival()]
                .into_iter()
                .flatten()
                .any(|at| at <= self.now);
            if !moved && !due {
                return;
            }
        }
        panic!("the pair never settled");
    }

    fn next_wakeup(&mut self) -> Option<Instant> {
        let client = self.client.conn.as_mut().and_then(|(_, c)| c.poll_timeout());
        [
            self.server.next_wakeup(),
            client,
            self.to_server.next_arrival(),
            self.to_client.next_arrival(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs the clock to `until`, jumping from one deadline or arrival to the next.
    pub fn run_until(&mut self, until: Instant) {
        let mut spins = Spins::default();
        loop {
            self.settle();
            match self.next_wakeup() {
                Some(at) if at <= until => self.now = spins.advance(self.now, at),
                _ => {
                    self.now = until;
                    self.settle();
                    return;
                }
            }
        }
    }

    pub fn run_for(&mut self, duration: Duration) {
        self.run_until(self.now + duration);
    }

    /// Runs until `done` holds (checked after each step), at most `limit`; returns whether it held.
    pub fn run_until_true(&mut self, limit: Duration, done: impl Fn(&Pair) -> bool) -> bool {
        let until = self.now + limit;
        let mut spins = Spins::default();
        loop {
            self.settle();
            if done(self) {
                return true;
            }
            match self.next_wakeup() {
                Some(at) if at <= until => self.now = spins.advance(self.now, at),
                _ => {
                    self.now = until;
                    self.settle();
                    return done(self);
                }
            }
        }
    }

    /// Runs until the session is established (panics otherwise, within the handshake time).
    pub fn establish(&mut self) {
        let open = self.run_until_true(Duration::from_secs(5), |p| p.server.established());
        assert!(open, "no session: {:?}", self.server.events);
    }
}

/// Counts wake-ups that do not move the clock: a side that keeps asking to be woken at a time
/// already handled would spin the loop forever (a busy loop in a real endpoint too).
#[derive(Debug, Default)]
struct Spins(u32);

impl Spins {
    fn advance(&mut self, now: Instant, at: Instant) -> Instant {
        if at <= now {
            self.0 += 1;
            assert!(self.0 < 10_000, "a deadline at or before now is never consumed");
        } else {
            self.0 = 0;
        }
        now.max(at)
    }
}

/// A message framed for the control stream.
pub fn framed(message: &ClientMessage) -> Bytes {
    let mut out = BytesMut::new();
    wire::put_frame(&mut out, &wire::encode_client(message));
    out.freeze()
}
