//! WebTransport on Courtside's own endpoint loops (`--wt-engine proto`, the default): a thread
//! per loop (`--wt-loops`, one by default), with a runtime of its own, owns a UDP socket and its
//! sessions (`WtEndpoint` over `UdpIo`; several loops share the port, `steer`) and joins each
//! open session to the hub (its `Subscriber` queue, woken through a per-connection waker that
//! only marks the connection ready, and its command `Session`). Admission, the drain,
//! certificate reload and the metrics follow the quinn path (`transport::webtransport`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::task::AtomicWaker;
use futures_util::StreamExt;
use quinn_proto::ConnectionHandle;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::endpoint::WtEndpoint;
use super::session::{CloseRequest, SessionConfig, SessionEnd, SessionEvent};
use super::steer::{Inbound, LoopSteering};
use super::udp_loop::UdpIo;
use crate::admission::{ConnectionPermit, IpPermit};
use crate::certs::{CertificateInfo, CertificateSource};
use crate::connection::{CLOSE_WAIT, MAX_BATCH};
use crate::core::{close_code, Outgoing, QueueClosed};
use crate::hub::Subscriber;
use crate::metrics::{LoopLabel, Transport};
use crate::node::Node;
use crate::quic_lb::SignedRandomIds;
use crate::session::{Session, SessionLimits};
use crate::shutdown::ShutdownListener;
use crate::transport::webtransport::{self, WebTransportError, WebTransportSettings};
use crate::udp::{self, UdpDrops};

/// What woke an endpoint loop.
enum LoopWake {
    /// The node began to drain.
    Drain,
    Readable(std::io::Result<()>),
    /// Another loop handed on a datagram of this loop's sessions.
    Forwarded(Inbound),
    /// Some connection's queue has something to write.
    QueuesReady,
    /// A session's deadline passed.
    Timer,
    /// The quarter-second check of expired tokens.
    Tick,
    /// A reloaded certificate's configuration to apply (or the reloader is gone).
    Certificate {
        reloader_running: bool,
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

/// One endpoint loop's own parts: its socket and its sessions.
struct LoopParts {
    /// This loop's index (the metrics' `endpoint_loop` label).
    index: usize,
    io: UdpIo,
    endpoint: WtEndpoint,
    steering: Option<LoopSteering>,
}

/// What `run` hands a loop's thread when the node starts serving.
struct LoopStart {
    inbox: mpsc::Receiver<Inbound>,
    configs: watch::Receiver<Option<Arc<Reloaded>>>,
    shared: Arc<LoopShared>,
    /// Taken before the thread runs, so the drain counts the loop from the start.
    stop: ShutdownListener,
}

/// A loop's thread, started by `bind` (its runtime built and its socket registered there, so a
/// failure stops the node before it says it listens), waiting for its `LoopStart`.
struct LoopThread {
    start: oneshot::Sender<LoopStart>,
    /// How the thread ended: a panic's message, or `Ok` (a loop that was never started).
    ended: oneshot::Receiver<Result<(), String>>,
}

impl LoopThread {
    /// Starts loop `index`'s thread; returns once its runtime runs and its socket is registered.
    async fn spawn(
        index: usize,
        socket: std::net::UdpSocket,
        endpoint: WtEndpoint,
        steering: Option<LoopSteering>,
    ) -> std::io::Result<Self> {
        let (ready_tx, ready) = oneshot::channel::<std::io::Result<()>>();
        let (start, start_rx) = oneshot::channel::<LoopStart>();
        let (ended_tx, ended) = oneshot::channel();
        // A thread of its own with its own runtime: the socket's readiness wakes this thread
        // alone, and only when it waits, not the node's workers at every datagram.
        std::thread::Builder::new()
            .name(format!("wt-loop-{index}"))
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(runtime) => runtime,
                        Err(error) => {
                            let _ = ready_tx.send(Err(error));
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        let io = match UdpIo::new(socket, endpoint.max_udp_payload()) {
                            Ok(io) => io,
                            Err(error) => {
                                let _ = ready_tx.send(Err(error));
                                return;
                            }
                        };
                        let _ = ready_tx.send(Ok(()));
                        // The node did not start serving (its startup failed): nothing to run.
                        let Ok(start) = start_rx.await else { return };
                        let parts = LoopParts {
                            index,
                            io,
                            endpoint,
                            steering,
                        };
                        run_loop(parts, start).await;
                    });
                }));
                let _ = ended_tx.send(outcome.map_err(|panic| panic_message(panic.as_ref())));
            })?;
        match ready.await {
            Ok(Ok(())) => Ok(Self { start, ended }),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(std::io::Error::other(
                "the WebTransport endpoint loop's thread ended while starting",
            )),
        }
    }
}

/// A panic's message, when it has one.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// A bound WebTransport endpoint on Courtside's own loops (`--wt-loops`, one by default).
pub struct ProtoServer {
    loops: Vec<LoopThread>,
    source: CertificateSource,
    settings: Arc<WebTransportSettings>,
    local_addr: SocketAddr,
    hangup: crate::certs::Hangup,
}

impl std::fmt::Debug for ProtoServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtoServer")
            .field("local_addr", &self.local_addr)
            .field("loops", &self.loops.len())
            .finish()
    }
}

/// Datagrams one loop's inbox holds for it from the others at most (a burst of a rebinding
/// NAT's clients); beyond, they are dropped and counted, and QUIC sends them again.
const INBOX: usize = 4096;

/// What every loop shares: the node, the settings, the other loops' inboxes, the certificate.
struct LoopShared {
    node: Node,
    settings: Arc<WebTransportSettings>,
    inboxes: Vec<mpsc::Sender<Inbound>>,
}

impl ProtoServer {
    /// Binds the UDP socket (one per loop, on one port) and loads (or generates) the
    /// certificate, as the quinn path does.
    pub async fn bind(settings: WebTransportSettings, node: &Node) -> Result<Self, WebTransportError> {
        let (identity, source) = CertificateSource::load(settings.cert.as_ref()).await?;
        let hangup = crate::certs::Hangup::listen();
        let count = settings.loops.max(1);
        let group = udp::bind_group(&settings.udp, count)?;
        let local_addr = match group.first() {
            Some(bound) => bound.socket.local_addr()?,
            None => return Err(std::io::Error::other("no UDP socket bound").into()),
        };
        let info = CertificateInfo::of(&identity, source.is_self_signed(), local_addr.port());
        let server_config = Arc::new(webtransport::server_config(&settings, identity)?);
        // The Retry threshold counts the node's handshakes; each loop sees about its share.
        let retry_threshold = settings.retry_threshold.div_ceil(count);
        // One signing key for every loop's IDs, which steering checks before handing a datagram on.
        let signer = SignedRandomIds::default();
        let configs = webtransport::proto_endpoint_configs(&settings, count, &signer);
        let signed = settings.quic_server_id.is_none().then_some(signer);
        if let Some(drops) = UdpDrops::combine(group.iter().map(|bound| bound.drops.clone())) {
            let _ = node.udp_drops.set(drops);
        }
        let mut loops = Vec::with_capacity(count);
        for (index, (bound, config)) in group.into_iter().zip(configs).enumerate() {
            let endpoint = WtEndpoint::new(
                Arc::new(config),
                server_config.clone(),
                SessionConfig::from_settings(&settings),
                retry_threshold,
                node.metrics.clone(),
            );
            let steering = LoopSteering::new(index, count, webtransport::cid_len(&settings), signed.clone());
            loops.push(LoopThread::spawn(index, bound.socket, endpoint, steering).await?);
        }
        info!(sha256 = %info.sha256, self_signed = info.self_signed, loops = count, "WebTransport certificate (proto engine)");
        node.certificate.set(info);
        Ok(Self {
            loops,
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
    /// (each open session is told to reconnect and closed with 1012), then refusals. Each loop
    /// runs on a thread of its own (a current-thread runtime); the certificate is reloaded in a
    /// task of the node's runtime and handed to them.
    pub async fn run(self, node: Node) {
        let Self {
            loops,
            source,
            settings,
            local_addr,
            hangup,
        } = self;
        let (configs_tx, configs) = watch::channel(None);
        let count = loops.len();
        let (inboxes, receivers): (Vec<_>, Vec<_>) = loops.iter().map(|_| mpsc::channel(INBOX)).unzip();
        let shared = Arc::new(LoopShared {
            node: node.clone(),
            settings: settings.clone(),
            inboxes,
        });
        tokio::spawn(reload_certificates(
            source, hangup, settings, local_addr, count, configs_tx,
        ));
        let mut ended = futures_util::stream::FuturesUnordered::new();
        for (index, (thread, inbox)) in loops.into_iter().zip(receivers).enumerate() {
            let start = LoopStart {
                inbox,
                configs: configs.clone(),
                shared: shared.clone(),
                stop: node.shutdown_listener(),
            };
            if thread.start.send(start).is_err() {
                tracing::error!(
                    endpoint_loop = index,
                    "a WebTransport endpoint loop ended before it started"
                );
            }
            ended.push(async move { (index, thread.ended.await) });
        }
        // A loop never returns; one that panicked leaves its clients to the other loops, which
        // do not hold their sessions: said loudly, as soon as it happens.
        while let Some((index, outcome)) = ended.next().await {
            match outcome {
                Ok(Err(panic)) => {
                    tracing::error!(endpoint_loop = index, %panic, "a WebTransport endpoint loop panicked")
                }
                _ => tracing::error!(endpoint_loop = index, "a WebTransport endpoint loop ended"),
            }
        }
    }
}

/// A reloaded certificate's configuration, handed to every loop; the last loop to take it
/// publishes its hash (`GET /v1/cert-hash`), so the hash served is always one the loops serve.
struct Reloaded {
    config: Arc<quinn_proto::ServerConfig>,
    info: CertificateInfo,
    /// Loops that have not taken it yet.
    pending: AtomicUsize,
}

impl Reloaded {
    /// Applies the configuration to `endpoint`; the last loop publishes the hash.
    fn apply(&self, endpoint: &mut WtEndpoint, node: &Node) {
        endpoint.set_server_config(self.config.clone());
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            info!(sha256 = %self.info.sha256, "WebTransport certificate reloaded; open sessions continue");
            node.certificate.set(self.info.clone());
        }
    }
}

/// Checks the certificate files (every `--cert-check-interval`, and on SIGHUP) and hands a
/// changed certificate's configuration to every loop: open sessions continue.
async fn reload_certificates(
    mut source: CertificateSource,
    mut hangup: crate::certs::Hangup,
    settings: Arc<WebTransportSettings>,
    local_addr: SocketAddr,
    loops: usize,
    configs: watch::Sender<Option<Arc<Reloaded>>>,
) {
    let mut cert_check = tokio::time::interval(settings.cert_check_interval);
    cert_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            _ = cert_check.tick() => false,
            _ = hangup.recv() => {
                info!("SIGHUP received: reloading the WebTransport certificate");
                true
            }
        };
        let Some(identity) = source.reload_if_changed(forced).await else {
            continue;
        };
        let info = CertificateInfo::of(&identity, source.is_self_signed(), local_addr.port());
        match webtransport::server_config(&settings, identity) {
            Ok(config) => {
                configs.send_replace(Some(Arc::new(Reloaded {
                    config: Arc::new(config),
                    info,
                    pending: AtomicUsize::new(loops),
                })));
            }
            Err(error) => warn!(%error, "cannot apply the new certificate"),
        }
    }
}

/// One endpoint loop: its socket, its sessions and their timers, until the process exits.
async fn run_loop(parts: LoopParts, start: LoopStart) {
    let LoopParts {
        index,
        mut io,
        mut endpoint,
        steering,
    } = parts;
    let LoopStart {
        mut inbox,
        mut configs,
        shared,
        stop,
    } = start;
    let LoopShared {
        node,
        settings,
        inboxes,
    } = &*shared;
    let label = |index: usize| LoopLabel {
        endpoint_loop: u32::try_from(index).unwrap_or(u32::MAX),
    };
    // Every loop's series from the start (a dashboard sees 0, not nothing).
    let busy_seconds = node.metrics.wt_loop_busy_seconds.get_or_create_owned(&label(index));
    let forwarded: Vec<_> = (0..inboxes.len())
        .map(|owner| node.metrics.wt_datagrams_forwarded.get_or_create_owned(&label(owner)))
        .collect();
    let forward_drops: Vec<_> = (0..inboxes.len())
        .map(|owner| node.metrics.wt_forward_drops.get_or_create_owned(&label(owner)))
        .collect();
    let mut stop = Some(stop);
    let mut drain_deadline: Option<Instant> = None;
    let list = Arc::new(ReadyList::default());
    let mut joined: HashMap<ConnectionHandle, Joined> = HashMap::new();
    let mut ready = Vec::new();
    let mut batch = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut configs_open = true;
    // This loop's handshakes, as last added to the node's gauge.
    let mut handshakes_counted = 0i64;
    // Datagrams another loop's session owns go to its inbox.
    let steer = |inbound: Inbound| match steering.as_ref().and_then(|s| s.elsewhere(&inbound.data)) {
        None => Some(inbound),
        Some(owner) => {
            // A copy: the segment shares its whole receive buffer (up to 64 KB with GRO).
            let inbound = Inbound {
                data: BytesMut::from(&inbound.data[..]),
                ..inbound
            };
            let counter = match inboxes.get(owner).map(|inbox| inbox.try_send(inbound)) {
                Some(Ok(())) => forwarded.get(owner),
                _ => forward_drops.get(owner),
            };
            if let Some(counter) = counter {
                counter.inc();
            }
            None
        }
    };
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
        // but for the await below (a full socket buffer).
        let wake = tokio::select! {
            _ = notice => LoopWake::Drain,
            received = io.readable() => LoopWake::Readable(received),
            Some(forwarded) = inbox.recv() => LoopWake::Forwarded(forwarded),
            _ = std::future::poll_fn(|cx| list.poll(cx)) => LoopWake::QueuesReady,
            _ = timer => LoopWake::Timer,
            _ = tick.tick() => LoopWake::Tick,
            changed = configs.changed(), if configs_open => LoopWake::Certificate { reloader_running: changed.is_ok() },
        };
        let mut working = Instant::now();
        let mut busy = Duration::ZERO;
        match wake {
            LoopWake::Drain => {
                let now = crate::clock::instant();
                drain_deadline = Some(now + settings.driver.drain_timeout);
                endpoint.set_refusing(true);
                for ch in endpoint.handles() {
                    let Some(session) = endpoint.session(ch) else { continue };
                    if let Some(Joined::Open(fan)) = joined.get(&ch) {
                        deliver(session, fan, &mut batch, node, now);
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
                if let Err(error) = received.and_then(|()| io.receive(&mut endpoint, crate::clock::instant(), steer)) {
                    warn!(%error, "webtransport socket");
                }
            }
            LoopWake::Forwarded(first) => {
                // The first and those queued behind it, at most an inbox's worth per wake.
                let now = crate::clock::instant();
                let queued = std::iter::from_fn(|| inbox.try_recv().ok()).take(INBOX - 1);
                for datagram in std::iter::once(first).chain(queued) {
                    endpoint.handle_datagram(now, datagram.addr, datagram.dst_ip, datagram.ecn, datagram.data);
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
            LoopWake::Certificate { reloader_running } => {
                configs_open = reloader_running;
                let reloaded = configs.borrow_and_update().clone();
                if let Some(reloaded) = reloaded {
                    reloaded.apply(&mut endpoint, node);
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
                let close = match deliver(session, fan, &mut batch, node, now) {
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
                    node,
                    drain_deadline.is_some(),
                    limits,
                    now,
                    ch,
                    event,
                );
            }
            endpoint.flush(now);
        }
        let handshakes = endpoint.handshaking() as i64;
        node.metrics.quic_handshakes.inc_by(handshakes - handshakes_counted);
        handshakes_counted = handshakes;
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
        busy_seconds.inc_by(busy.as_secs_f64());
        // The runtime turns its socket readiness and timers only when this task yields: queues
        // that keep waking would otherwise keep the loop from its acks and loss timers.
        tokio::task::yield_now().await;
    }
}

/// How much of a queue `move_queued` moves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Window {
    /// Only while the control stream takes bytes now.
    Respected,
    /// All of it (a session about to close: the queue is bounded).
    Ignored,
}

/// Moves messages of `fan`'s queue into its session, as `window` says; returns how the queue
/// closed, if it did.
fn move_queued(
    session: &mut super::WtSession,
    fan: &Fan,
    batch: &mut Vec<Outgoing>,
    node: &Node,
    now: Instant,
    window: Window,
) -> Option<QueueClosed> {
    while window == Window::Ignored || session.wants_more() {
        batch.clear();
        let closed = fan.subscriber.drain_into(batch, MAX_BATCH);
        if !batch.is_empty() {
            session.deliver(now, batch);
            node.metrics.record_deliveries(Transport::WebTransport, batch);
        }
        if closed.is_some() || batch.is_empty() {
            return closed;
        }
    }
    None
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
    // The wake-up that brought the loop here is spent before the drain: what is pushed after
    // this point wakes it again, what is drained now does not.
    fan.subscriber.take_wake();
    if let Some(closed) = move_queued(session, fan, batch, node, now, Window::Respected) {
        return Some(closed);
    }
    if !session.is_open() {
        return None;
    }
    // A session that takes nothing now (its client reads slowly) drained nothing: a queue that
    // closed meanwhile (it overflowed) is answered now, not once the client reads again.
    if !session.wants_more() {
        if let Some(closed) = fan.subscriber.closed() {
            return Some(closed);
        }
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

/// Closes the session of a client that floods commands (1008), after the replies already queued
/// (the 104 among them), whatever the control stream's window: the session is closing, and the
/// queue is bounded.
fn close_flood(session: &mut super::WtSession, fan: &Fan, node: &Node, now: Instant) {
    info!(
        conn = fan.subscriber.id(),
        transport = "webtransport",
        "closing a client that floods commands over its rate (1008)"
    );
    node.metrics.close_error(close_code::POLICY_VIOLATION, "command_flood");
    let _ = move_queued(session, fan, &mut Vec::new(), node, now, Window::Ignored);
    session.close(
        now,
        CloseRequest {
            code: close_code::POLICY_VIOLATION,
            reason: "too many commands over the rate",
            limit: CLOSE_WAIT,
            reconnect: false,
        },
    );
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
            // A flood's session is closing: what else came in the same datagrams is not handled.
            if fan.session.flooding() {
                return;
            }
            let now_ms = crate::clock::unix_ms();
            fan.session.handle(command, now_ms);
            fan.token_expires_ms = fan.session.token_expires_ms();
            if fan.session.flooding() {
                if let Some(session) = endpoint.session(ch).filter(|s| s.is_open()) {
                    close_flood(session, fan, node, now);
                }
            }
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
