//! Every WebTransport session of one UDP socket, sans-IO: a `quinn_proto::Endpoint` routes
//! datagrams to the `WtSession`s it owns, one timer heap keyed by connection wakes them, and
//! their packets are collected for one batched send. No task, channel or waker per connection;
//! `udp_loop` moves the bytes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use quinn_proto::{ConnectionHandle, DatagramEvent, EcnCodepoint, Endpoint, EndpointConfig, ServerConfig};

use super::session::{SessionConfig, SessionEvent, WtSession};
use crate::metrics::Metrics;
use crate::transport::webtransport::should_retry;

/// Packets handed out per `poll_transmit` at most (one GSO batch).
const MAX_SEGMENTS: usize = 10;

/// One packet (or GSO batch of packets to one destination) to send: its bytes are
/// `range` of the endpoint's send buffer.
#[derive(Debug, Clone)]
pub struct OutPacket {
    pub destination: SocketAddr,
    pub ecn: Option<EcnCodepoint>,
    pub segment_size: Option<usize>,
    pub src_ip: Option<IpAddr>,
    range: Range<usize>,
}

/// A session and the deadline the timer heap holds for it.
#[derive(Debug)]
struct Entry {
    session: WtSession,
    /// The earliest deadline pushed for this session and not popped yet.
    armed: Option<Instant>,
    /// Counted in `handshaking` until its QUIC handshake completes.
    handshaking: bool,
}

/// The sessions of one socket and what they have to send.
#[derive(Debug)]
pub struct WtEndpoint {
    endpoint: Endpoint,
    /// Boxed: a session (quinn-proto's connection inline) is about 7 KB, and a map of inline
    /// entries keeps up to twice its sessions' worth of slots, spread so that nearly every page
    /// of it is resident (heaptrack: 23 KB of heap per session at 2,000, against 8 bytes a slot).
    sessions: HashMap<ConnectionHandle, Box<Entry>>,
    /// Deadlines, earliest first; an entry may be stale (its session re-armed or gone).
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    config: Arc<SessionConfig>,
    metrics: Arc<Metrics>,
    /// Sessions touched since the last `flush`: polled for events, packets and deadlines.
    touched: Vec<ConnectionHandle>,
    events: VecDeque<(ConnectionHandle, SessionEvent)>,
    out: Vec<OutPacket>,
    out_buf: Vec<u8>,
    /// QUIC handshakes under way, for the Retry threshold.
    handshaking: usize,
    retry_threshold: usize,
    /// New connections are refused (the node drains).
    refusing: bool,
}

impl WtEndpoint {
    pub fn new(
        endpoint_config: Arc<EndpointConfig>,
        server_config: Arc<ServerConfig>,
        config: SessionConfig,
        retry_threshold: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            endpoint: Endpoint::new(endpoint_config, Some(server_config), false, None),
            sessions: HashMap::new(),
            timers: BinaryHeap::new(),
            config: Arc::new(config),
            metrics,
            touched: Vec::new(),
            events: VecDeque::new(),
            out: Vec::new(),
            out_buf: Vec::new(),
            handshaking: 0,
            retry_threshold,
            refusing: false,
        }
    }

    /// The largest UDP payload a received packet may have.
    pub fn max_udp_payload(&self) -> usize {
        self.endpoint.config().get_max_udp_payload_size() as usize
    }

    /// Refuses new connections from now on (the node drains); open sessions go on.
    pub fn set_refusing(&mut self, refusing: bool) {
        self.refusing = refusing;
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Every session's connection is closed (by either side) or gone.
    pub fn all_closed(&self) -> bool {
        self.sessions.values().all(|entry| entry.session.is_closed())
    }

    /// QUIC handshakes under way.
    pub fn handshaking(&self) -> usize {
        self.handshaking
    }

    /// The handles of every session.
    pub fn handles(&self) -> Vec<ConnectionHandle> {
        self.sessions.keys().copied().collect()
    }

    /// Replaces the server configuration (a reloaded certificate) for new connections.
    pub fn set_server_config(&mut self, config: Arc<ServerConfig>) {
        self.endpoint.set_server_config(Some(config));
    }

    /// A session, for the application's answers (accept, refuse, deliver, close). Marks it
    /// touched: the next `flush` collects what the call made it send.
    pub fn session(&mut self, ch: ConnectionHandle) -> Option<&mut WtSession> {
        let entry = self.sessions.get_mut(&ch)?;
        self.touched.push(ch);
        Some(&mut entry.session)
    }

    /// One received UDP datagram (one GRO segment).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        local_ip: Option<IpAddr>,
        ecn: Option<EcnCodepoint>,
        data: BytesMut,
    ) {
        let mut response = Vec::new();
        let bytes = data.len();
        match self.endpoint.handle(now, remote, local_ip, ecn, data, &mut response) {
            Some(DatagramEvent::NewConnection(incoming)) => {
                if self.refusing {
                    let transmit = self.endpoint.refuse(incoming, &mut response);
                    self.push_out(&transmit, &response);
                } else if should_retry(
                    incoming.remote_address_validated(),
                    incoming.may_retry(),
                    self.handshaking,
                    self.retry_threshold,
                ) {
                    // `should_retry` checked `may_retry`; were a Retry refused anyway, the
                    // Incoming is given back to the endpoint (a dropped one would hold its slot).
                    match self.endpoint.retry(incoming, &mut response) {
                        Ok(transmit) => {
                            self.metrics.quic_retries.inc();
                            self.push_out(&transmit, &response);
                        }
                        Err(refused) => self.endpoint.ignore(refused.into_incoming()),
                    }
                } else {
                    match self.endpoint.accept(incoming, now, &mut response, None) {
                        Ok((ch, conn)) => {
                            let session = WtSession::new(conn, self.config.clone(), self.metrics.clone(), now);
                            self.handshaking += 1;
                            self.sessions.insert(
                                ch,
                                Box::new(Entry {
                                    session,
                                    armed: None,
                                    handshaking: true,
                                }),
                            );
                            self.touched.push(ch);
                        }
                        Err(error) => {
                            if let Some(transmit) = error.response {
                                self.push_out(&transmit, &response);
                            }
                        }
                    }
                }
            }
            Some(DatagramEvent::ConnectionEvent(ch, event)) => {
                if let Some(entry) = self.sessions.get_mut(&ch) {
                    if entry.session.receive(now, bytes, event) {
                        self.touched.push(ch);
                    }
                }
            }
            Some(DatagramEvent::Response(transmit)) => self.push_out(&transmit, &response),
            None => {}
        }
    }

    /// The earliest deadline of any session.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Runs the sessions whose deadlines passed.
    pub fn handle_timeouts(&mut self, now: Instant) {
        while let Some(Reverse((at, id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let ch = ConnectionHandle(id);
            if let Some(entry) = self.sessions.get_mut(&ch) {
                if entry.armed == Some(at) {
                    entry.armed = None;
                }
                // A deadline that moved later since it was armed (most often the loss timer of a
                // delivery its ack has since cleared): armed again, and the session left alone.
                if let Some(next) = entry.session.poll_timeout().filter(|next| *next > now) {
                    if entry.armed.is_none_or(|armed| next < armed) {
                        entry.armed = Some(next);
                        self.timers.push(Reverse((next, id)));
                    }
                    continue;
                }
                entry.session.handle_timeout(now);
                self.touched.push(ch);
            }
        }
    }

    /// The next event of any session for the application.
    pub fn poll_event(&mut self) -> Option<(ConnectionHandle, SessionEvent)> {
        self.events.pop_front()
    }

    /// Collects what the touched sessions have: events, endpoint events, packets, deadlines;
    /// forgets the drained ones. Call after a round of inputs and answers, before sending.
    pub fn flush(&mut self, now: Instant) {
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable_by_key(|ch| ch.0);
        touched.dedup();
        let mut buf = Vec::new();
        for ch in touched.drain(..) {
            let Some(entry) = self.sessions.get_mut(&ch) else {
                continue;
            };
            loop {
                let mut more = false;
                while let Some(event) = entry.session.poll_endpoint_event() {
                    if let Some(event) = self.endpoint.handle_event(ch, event) {
                        more = true;
                        entry.session.handle_event(now, event);
                    }
                }
                while let Some(event) = entry.session.poll_event() {
                    self.events.push_back((ch, event));
                }
                if !more {
                    break;
                }
            }
            while let Some(transmit) = entry.session.poll_transmit(now, MAX_SEGMENTS, &mut buf) {
                let start = self.out_buf.len();
                self.out_buf.extend_from_slice(&buf[..transmit.size]);
                self.out.push(OutPacket {
                    destination: transmit.destination,
                    ecn: transmit.ecn,
                    segment_size: transmit.segment_size,
                    src_ip: transmit.src_ip,
                    range: start..self.out_buf.len(),
                });
                buf.clear();
            }
            if entry.handshaking && !entry.session.connection().is_handshaking() {
                entry.handshaking = false;
                self.handshaking -= 1;
            }
            if entry.session.is_drained() {
                if entry.handshaking {
                    self.handshaking -= 1;
                }
                self.sessions.remove(&ch);
                continue;
            }
            if let Some(at) = entry.session.poll_timeout() {
                if entry.armed.is_none_or(|armed| at < armed) {
                    entry.armed = Some(at);
                    self.timers.push(Reverse((at, ch.0)));
                }
            }
        }
        self.touched = touched;
    }

    /// The packets collected so far, with their bytes.
    pub fn transmits(&self) -> impl Iterator<Item = (&OutPacket, &[u8])> {
        self.out.iter().map(|p| (p, &self.out_buf[p.range.clone()]))
    }

    /// Forgets the packets collected (after they were sent).
    pub fn clear_transmits(&mut self) {
        self.out.clear();
        self.out_buf.clear();
    }

    fn push_out(&mut self, transmit: &quinn_proto::Transmit, bytes: &[u8]) {
        let start = self.out_buf.len();
        self.out_buf.extend_from_slice(&bytes[..transmit.size]);
        self.out.push(OutPacket {
            destination: transmit.destination,
            ecn: transmit.ecn,
            segment_size: transmit.segment_size,
            src_ip: transmit.src_ip,
            range: start..self.out_buf.len(),
        });
    }
}
