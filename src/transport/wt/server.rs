//! WebTransport on Courtside's own endpoint loop (`--wt-engine proto`, the default): one task
//! owns the UDP socket and every session (`WtEndpoint` over `UdpIo`) and joins each open
//! session to the hub (its `Subscriber` queue, woken through a per-connection waker that only
//! marks the connection ready, and its command `Session`). Admission, the drain, certificate
//! reload and the metrics follow the quinn path (`transport::webtransport`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use quinn_proto::ConnectionHandle;
use tracing::{debug, info, warn};

use super::endpoint::WtEndpoint;
use super::session::{CloseRequest, SessionConfig, SessionEnd, SessionEvent};
use super::udp_loop::UdpIo;
use crate::admission::{ConnectionPermit, IpPermit};
use crate::certs::{CertificateInfo, CertificateSource};
use crate::connection::{CLOSE_WAIT, MAX_BATCH};
use crate::core::{close_code, Outgoing, QueueClosed};
use crate::hub::Subscriber;
use crate::metrics::Transport;
use crate::node::Node;
use crate::session::{Session, SessionLimits};
use crate::transport::webtransport::{self, WebTransportError, WebTransportSettings};
use crate::udp;

/// What woke the endpoint loop.
enum LoopWake {
    /// The node began to drain.
    Drain,
    Readable(std::io::Result<()>),
    /// Some connection's queue has something to write.
    QueuesReady,
    /// A session's deadline passed.
    Timer,
    /// The quarter-second check of expired tokens.
    Tick,
    /// Time to check the certificate files (`forced`: SIGHUP, reload even if unchanged).
    Reload {
        forced: bool,
    },
}

/// Connections whose queue has something to write, and the loop's own waker.
#[derive(Debug, Default)]
struct ReadyList {
    ready: Mutex<Vec<ConnectionHandle>>,
    waker: AtomicWaker,
}

impl ReadyList {
    fn take(&self, into: &mut Vec<ConnectionHandle>) {
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        into.append(&mut ready);
    }

    /// Ready when some connection was marked.
    fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        if self.ready.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

/// The waker of one connection's queue: marks the connection ready and wakes the loop.
#[derive(Debug)]
struct ConnWaker {
    ch: ConnectionHandle,
    list: Arc<ReadyList>,
}

impl Wake for ConnWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.list.ready.lock().unwrap_or_else(|p| p.into_inner()).push(self.ch);
        self.list.waker.wake();
    }
}

/// What the node holds for one connection beside its `WtSession`.
enum Joined {
    /// Admitted (answered 200), the session not open yet: its permits.
    Admitted {
        ip_permit: Option<IpPermit>,
        connection_permit: Option<ConnectionPermit>,
    },
    /// Open: its queue in the hub and its command session.
    Open(Box<Fan>),
}

struct Fan {
    subscriber: Arc<Subscriber>,
    session: Session,
    waker: Waker,
    /// When the connection's token expires (ms since the Unix epoch).
    token_expires_ms: Option<u64>,
    _ip_permit: Option<IpPermit>,
    _connection_permit: Option<ConnectionPermit>,
}

/// A bound WebTransport endpoint on Courtside's own loop.
pub struct ProtoServer {
    io: UdpIo,
    endpoint: WtEndpoint,
    source: CertificateSource,
    settings: Arc<WebTransportSettings>,
    local_addr: SocketAddr,
    hangup: crate::certs::Hangup,
}

impl std::fmt::Debug for ProtoServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtoServer")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl ProtoServer {
    /// Binds the UDP socket and loads (or generates) the certificate, as the quinn path does.
    pub async fn bind(settings: WebTransportSettings, node: &Node) -> Result<Self, WebTransportError> {
        let (identity, source) = CertificateSource::load(settings.cert.as_ref()).await?;
        let hangup = crate::certs::Hangup::listen();
        let bound = udp::bind(&settings.udp)?;
        let local_addr = bound.socket.local_addr()?;
        let info = CertificateInfo::of(&identity, source.is_self_signed(), local_addr.port());
        let server_config = webtransport::server_config(&settings, identity)?;
        let endpoint = WtEndpoint::new(
            Arc::new(webtransport::endpoint_config(&settings)),
            Arc::new(server_config),
            SessionConfig::from_settings(&settings),
            settings.retry_threshold,
            node.metrics.clone(),
        );
        let io = UdpIo::new(bound.socket, endpoint.max_udp_payload())?;
        info!(sha256 = %info.sha256, self_signed = info.self_signed, "WebTransport certificate (proto engine)");
        node.certificate.set(info);
        if let Some(drops) = bound.drops {
            let _ = node.udp_drops.set(drops);
        }
        Ok(Self {
            io,
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

    /// Serves until the process exits: sessions until the shutdown notice, then the drain
    /// (each open session is told to reconnect and closed with 1012), then refusals.
    pub async fn run(self, node: Node) {
        let Self {
            mut io,
            mut endpoint,
            mut source,
            settings,
            local_addr,
            mut hangup,
        } = self;
        let mut stop = Some(node.shutdown_listener());
        let mut drain_deadline: Option<Instant> = None;
        let list = Arc::new(ReadyList::default());
        let mut joined: HashMap<ConnectionHandle, Joined> = HashMap::new();
        let mut ready = Vec::new();
        let mut batch = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cert_check = tokio::time::interval(settings.cert_check_interval);
        cert_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = endpoint.next_timeout();
            let timer = super::udp_loop::sleep_until(deadline);
            let notice = async {
                match stop.as_mut() {
                    Some(stop) if drain_deadline.is_none() => stop.recv().await,
                    _ => std::future::pending().await,
                }
            };
            // What woke the loop; from then to the loop's end it works (the busy-time metric),
            // but for the awaits below (a certificate file read, a full socket buffer).
            let wake = tokio::select! {
                _ = notice => LoopWake::Drain,
                received = io.readable() => LoopWake::Readable(received),
                _ = std::future::poll_fn(|cx| list.poll(cx)) => LoopWake::QueuesReady,
                _ = timer => LoopWake::Timer,
                _ = tick.tick() => LoopWake::Tick,
                _ = cert_check.tick() => LoopWake::Reload { forced: false },
                _ = hangup.recv() => {
                    info!("SIGHUP received: reloading the WebTransport certificate");
                    LoopWake::Reload { forced: true }
                }
            };
            let mut working = Instant::now();
            let mut busy = Duration::ZERO;
            let mut reload = None;
            match wake {
                LoopWake::Drain => {
                    let now = crate::clock::instant();
                    drain_deadline = Some(now + settings.driver.drain_timeout);
                    endpoint.set_refusing(true);
                    for ch in endpoint.handles() {
                        let Some(session) = endpoint.session(ch) else { continue };
                        if let Some(Joined::Open(fan)) = joined.get(&ch) {
                            deliver(session, fan, &mut batch, &node, now);
                        }
                        session.close(
                            now,
                            CloseRequest {
                                code: close_code::SERVICE_RESTART,
                                reason: "server shutting down; reconnect",
                                limit: settings.driver.drain_timeout,
                                reconnect: true,
                            },
                        );
                    }
                }
                LoopWake::Readable(received) => {
                    if let Err(error) = received.and_then(|()| io.receive(&mut endpoint, crate::clock::instant())) {
                        warn!(%error, "webtransport socket");
                    }
                }
                LoopWake::QueuesReady => {}
                LoopWake::Timer => endpoint.handle_timeouts(crate::clock::instant()),
                LoopWake::Tick => {
                    // Tokens that expired close their connection with 4003.
                    let now_ms = crate::clock::unix_ms();
                    let now = crate::clock::instant();
                    for (ch, entry) in &joined {
                        let Joined::Open(fan) = entry else { continue };
                        if fan.token_expires_ms.is_some_and(|at| at <= now_ms) {
                            if let Some(session) = endpoint.session(*ch) {
                                if session.is_open() {
                                    node.metrics.close_error(close_code::TOKEN_EXPIRED, "token_expired");
                                    session.close(
                                        now,
                                        CloseRequest {
                                            code: close_code::TOKEN_EXPIRED,
                                            reason: "token expired; reconnect with a fresh one",
                                            limit: CLOSE_WAIT,
                                            reconnect: false,
                                        },
                                    );
                                }
                            }
                        }
                    }
                }
                LoopWake::Reload { forced } => reload = Some(forced),
            }
            if let Some(forced) = reload {
                busy += working.elapsed();
                let identity = source.reload_if_changed(forced).await;
                working = Instant::now();
                if let Some(identity) = identity {
                    let info = CertificateInfo::of(&identity, source.is_self_signed(), local_addr.port());
                    match webtransport::server_config(&settings, identity) {
                        Ok(config) => {
                            endpoint.set_server_config(Arc::new(config));
                            info!(sha256 = %info.sha256, "WebTransport certificate reloaded; open sessions continue");
                            node.certificate.set(info);
                        }
                        Err(error) => warn!(%error, "cannot apply the new certificate"),
                    }
                }
            }
            let now = crate::clock::instant();
            for _ in 0..2 {
                // Queues that woke: their messages into the sessions.
                list.take(&mut ready);
                ready.sort_unstable_by_key(|ch| ch.0);
                ready.dedup();
                for ch in ready.drain(..) {
                    let (Some(Joined::Open(fan)), Some(session)) = (joined.get(&ch), endpoint.session(ch)) else {
                        continue;
                    };
                    let close = match deliver(session, fan, &mut batch, &node, now) {
                        None => continue,
                        Some(QueueClosed::Slow) => {
                            info!(
                                conn = fan.subscriber.id(),
                                transport = "webtransport",
                                "closing slow client (4001)"
                            );
                            CloseRequest {
                                code: close_code::SLOW,
                                reason: "slow consumer; reconnect with since",
                                limit: settings.driver.write_timeout,
                                reconnect: false,
                            }
                        }
                        Some(QueueClosed::Gone) => CloseRequest {
                            code: close_code::SERVICE_RESTART,
                            reason: "server shutting down; reconnect",
                            limit: settings.driver.drain_timeout,
                            reconnect: true,
                        },
                    };
                    session.close(now, close);
                }
                endpoint.flush(now);
                while let Some((ch, event)) = endpoint.poll_event() {
                    let limits = settings.driver.session;
                    on_event(
                        &mut endpoint,
                        &mut joined,
                        &list,
                        &node,
                        drain_deadline.is_some(),
                        limits,
                        now,
                        ch,
                        event,
                    );
                }
                endpoint.flush(now);
            }
            node.metrics.quic_handshakes.set(endpoint.handshaking() as i64);
            busy += working.elapsed();
            let sent = io.send(&mut endpoint).await;
            working = Instant::now();
            if let Err(error) = sent {
                warn!(%error, "webtransport socket");
            }
            // The drain is over once every session closed (or its time is up): the loop no
            // longer counts as running, and goes on refusing until the process exits.
            if let Some(deadline) = drain_deadline {
                // Every session closed its connection (a close answered lingers a second for
                // the client to close it first), or the drain's time is up.
                if stop.is_some() && ((joined.is_empty() && endpoint.all_closed()) || now >= deadline) {
                    stop = None;
                }
            }
            busy += working.elapsed();
            node.metrics.wt_loop_busy_seconds.inc_by(busy.as_secs_f64());
        }
    }
}

/// Moves what `fan`'s queue holds into its session, up to what the control stream takes now;
/// re-arms the queue's waker. Returns how the queue closed, if it did.
fn deliver(
    session: &mut super::WtSession,
    fan: &Fan,
    batch: &mut Vec<Outgoing>,
    node: &Node,
    now: Instant,
) -> Option<QueueClosed> {
    // Only while the control stream takes bytes: a client that reads slowly leaves its messages
    // in its bounded queue (conflated, or closed as slow), not in the session's buffer. The
    // session says `Writable` when it takes more.
    while session.wants_more() {
        batch.clear();
        let closed = fan.subscriber.drain_into(batch, MAX_BATCH);
        if !batch.is_empty() {
            session.deliver(now, batch);
            node.metrics.record_deliveries(Transport::WebTransport, batch);
        }
        if closed.is_some() {
            return closed;
        }
        if batch.is_empty() {
            break;
        }
    }
    if !session.is_open() {
        return None;
    }
    // Registers the connection's waker; something queued meanwhile marks it ready at once.
    if fan
        .subscriber
        .poll_wait(&mut Context::from_waker(&fan.waker))
        .is_ready()
    {
        fan.waker.wake_by_ref();
    }
    None
}

/// Answers one session event: admission for a request, the hub for an open session and its
/// commands, the permits and the queue released at its end.
#[allow(clippy::too_many_arguments)]
fn on_event(
    endpoint: &mut WtEndpoint,
    joined: &mut HashMap<ConnectionHandle, Joined>,
    list: &Arc<ReadyList>,
    node: &Node,
    draining: bool,
    limits: SessionLimits,
    now: Instant,
    ch: ConnectionHandle,
    event: SessionEvent,
) {
    let transport = node.metrics.transport(Transport::WebTransport);
    match event {
        SessionEvent::Request(request) => {
            let Some(session) = endpoint.session(ch) else { return };
            // WebTransport sees the client's own address (the NLB keeps it).
            let remote = session.connection().remote_address().ip();
            // The same checks and answers as every transport's (`Admission::check_session`).
            let origin = request.origin.as_deref().map(str::as_bytes);
            let admitted = node
                .admission
                .check_session(origin, draining || node.is_draining())
                .and_then(|()| node.admission.admit_session(remote));
            let status = match admitted {
                Ok((ip_permit, connection_permit)) => {
                    joined.insert(
                        ch,
                        Joined::Admitted {
                            ip_permit: Some(ip_permit),
                            connection_permit: Some(connection_permit),
                        },
                    );
                    200
                }
                Err(refusal) => refusal.status(),
            };
            if status == 200 {
                session.accept(now);
            } else {
                debug!(status, "webtransport session refused");
                session.refuse(now, status);
            }
        }
        SessionEvent::Established => {
            let (ip_permit, connection_permit) = match joined.remove(&ch) {
                Some(Joined::Admitted {
                    ip_permit,
                    connection_permit,
                }) => (ip_permit, connection_permit),
                _ => (None, None),
            };
            let subscriber = node.hub.new_subscriber(Transport::WebTransport);
            let session = Session::new(
                node.hub.clone(),
                node.registry.clone(),
                subscriber.clone(),
                limits,
                node.admission.clone(),
                node.draining.clone(),
                crate::clock::unix_ms(),
            );
            transport.connections.inc();
            debug!(conn = subscriber.id(), "webtransport session started (proto engine)");
            let waker = Waker::from(Arc::new(ConnWaker { ch, list: list.clone() }));
            // The first poll registers the waker.
            if subscriber.poll_wait(&mut Context::from_waker(&waker)).is_ready() {
                waker.wake_by_ref();
            }
            joined.insert(
                ch,
                Joined::Open(Box::new(Fan {
                    subscriber,
                    session,
                    waker,
                    token_expires_ms: None,
                    _ip_permit: ip_permit,
                    _connection_permit: connection_permit,
                })),
            );
        }
        SessionEvent::Writable => list.ready.lock().unwrap_or_else(|p| p.into_inner()).push(ch),
        SessionEvent::Command(command) => {
            let Some(Joined::Open(fan)) = joined.get_mut(&ch) else {
                return;
            };
            transport.client_messages.inc();
            let now_ms = crate::clock::unix_ms();
            fan.session.handle(command, now_ms);
            fan.token_expires_ms = fan.session.token_expires_ms();
        }
        SessionEvent::Ended(end) => {
            debug!(?end, "webtransport session ended (proto engine)");
            if draining && matches!(end, SessionEnd::Closed { answered: false, .. }) {
                node.shutdown.abandoned_one();
            }
            if let Some(Joined::Open(fan)) = joined.remove(&ch) {
                fan.subscriber.stop_direct();
                let Fan {
                    subscriber, session, ..
                } = *fan;
                drop(session);
                let dropped = subscriber.close(QueueClosed::Gone);
                if dropped > 0 {
                    node.metrics.dropped.inc_by(dropped as u64);
                }
                transport.connections.dec();
            }
        }
    }
}
