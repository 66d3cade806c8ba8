//! One connection driver for every transport: it reads commands into the session, drains the
//! queue in batches, keeps the connection alive, drains on shutdown and closes with the right
//! code. A transport implements `Wire` with its wire alone (frames; a control stream and datagrams).

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{timeout, Instant};
use tracing::{debug, info};

use crate::core::{close_code, ClientCommand, CommandError, ErrorCode, Outgoing, QueueClosed};
use crate::gate::WakeGate;
use crate::hub::Subscriber;
use crate::metrics::Transport;
use crate::node::Node;
use crate::session::{Session, SessionLimits};
use crate::shutdown::ShutdownListener;

/// Messages taken from the queue per batch at most; the rest wait for the next round.
pub const MAX_BATCH: usize = 256;

/// How long a closing connection waits for the client, at most (except when draining).
pub const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What the driver needs to know of a connection, whatever its transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriverSettings {
    /// A write stuck this long drops the connection.
    pub write_timeout: Duration,
    /// Longest wait for a client to close while the node drains.
    pub drain_timeout: Duration,
    /// Pings (a wire whose transport keeps itself alive, as QUIC does, sends none: `Wire::ping`)
    /// and the idle timeout, the same for every wire.
    pub keepalive: Keepalive,
    pub session: SessionLimits,
}

impl DriverSettings {
    /// The same for every transport: a ping (or, over QUIC, nothing: QUIC's keep-alives run
    /// underneath) every `--ping-interval`, and 4002 after `--idle-timeout` of client silence.
    pub fn from_config(config: &crate::config::ServeConfig) -> Self {
        Self {
            write_timeout: config.connection.write_timeout,
            drain_timeout: config.http.drain_timeout,
            keepalive: Keepalive {
                interval: config.connection.ping_interval,
                idle_timeout: config.connection.idle_timeout,
            },
            session: SessionLimits::from_config(config),
        }
    }
}

/// Pings every `interval`; silence for `idle_timeout` closes the connection (4002).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub interval: Duration,
    pub idle_timeout: Duration,
}

/// What a wire hands the driver.
#[derive(Debug)]
pub enum Inbound {
    /// A client command, or why it could not be read as one (answered with an error).
    Command(Result<ClientCommand, CommandError>),
    /// A message the protocol does not take (answered with this error; the connection stays).
    Rejected(ErrorCode, &'static str),
    /// Heard from the client, with nothing for the session (a pong, say).
    Heard,
    /// A timer of the wire's own fired: the driver calls `Wire::on_timer`.
    Timer,
    /// The connection is over.
    End(Ending),
}

/// Why a connection ended; decides how it is closed.
#[derive(Debug)]
pub enum Ending {
    /// The client closed (a close frame).
    PeerClosed,
    /// The connection ended without a close from the client.
    PeerGone,
    Shutdown,
    Slow,
    Idle,
    /// The connection's token expired and no `auth` refreshed it.
    TokenExpired,
    /// The client sent a message larger than `limit` bytes.
    TooBig {
        limit: usize,
    },
    /// The client broke the wire's framing rules.
    Protocol(String),
    /// The client kept sending commands over its rate (`Session::flooding`).
    Flooding,
    WriteFailed,
}

/// A write could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("write timed out")]
    Timeout,
    #[error("write failed: {0}")]
    Failed(String),
}

/// How to close: the close code and reason, the longest wait for the client, and what to send first.
#[derive(Debug, Clone, Copy)]
pub struct Close<'a> {
    pub code: u16,
    pub reason: &'a str,
    pub limit: Duration,
    /// Send `{"type":"reconnect"}` before closing (the node is draining).
    pub reconnect: bool,
    /// The client's oversized message is still arriving: read and discard it, so the close
    /// reaches the client instead of being lost to a reset.
    pub discard_input: bool,
}

/// A transport's wire: the only part of a connection that differs between transports.
pub trait Wire: Send {
    /// Which transport this is, for metrics and logs.
    const TRANSPORT: Transport;

    /// Polls what the client sent, and the wire's own timers. Polled only after one of the
    /// wire's wakers fired (its futures sit behind `WakeGate`s), so a turn that woke for a
    /// delivery costs nothing here.
    fn poll_inbound(&mut self, cx: &mut Context<'_>) -> Poll<Inbound>;

    /// Writes a batch of queued messages, in order.
    fn write_batch(
        &mut self,
        batch: &[Outgoing],
        write_timeout: Duration,
    ) -> impl Future<Output = Result<(), WireError>> + Send;

    /// Writes what an earlier write left buffered (and the rest of a frame the fan-out wrote
    /// directly). Done at once when nothing is; by default nothing ever is.
    fn flush(&mut self, _write_timeout: Duration) -> impl Future<Output = Result<(), WireError>> + Send {
        std::future::ready(Ok(()))
    }

    /// Does what the wire's timer asked for (`Inbound::Timer`); by default a wire has no timer.
    fn on_timer(&mut self, _write_timeout: Duration) -> impl Future<Output = Result<(), WireError>> + Send {
        std::future::ready(Ok(()))
    }

    /// Sends a ping every `Keepalive::interval` (by default nothing: the transport keeps itself alive).
    fn ping(&mut self, _write_timeout: Duration) -> impl Future<Output = Result<(), WireError>> + Send {
        std::future::ready(Ok(()))
    }

    /// The client closed first: finish the close it started (by default there is nothing to finish).
    fn answer_close(&mut self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }

    /// Closes the connection; returns whether the client closed in time.
    fn close(&mut self, close: Close<'_>) -> impl Future<Output = bool> + Send;
}

/// Starts a connection's own task, running `drive` to the connection's end. The task's future
/// is the driver alone: awaited inside the task of an upgrade or a handshake, each enclosing
/// future kept room for the socket state moved through it (measured: 5.4 -> 10.7 KB per
/// WebSocket connection).
pub fn start<W: Wire + 'static>(
    wire: W,
    subscriber: Arc<Subscriber>,
    node: Node,
    settings: Arc<DriverSettings>,
    shutdown: ShutdownListener,
) {
    tokio::spawn(drive(wire, subscriber, node, settings, shutdown));
}

/// Runs one connection to its end: `subscriber` is its queue in the hub (set up by the
/// transport, which may have enabled direct writes into its socket).
pub async fn drive<W: Wire>(
    mut wire: W,
    subscriber: Arc<Subscriber>,
    node: Node,
    settings: Arc<DriverSettings>,
    mut shutdown: ShutdownListener,
) {
    let metrics = node.metrics.clone();
    let transport = metrics.transport(W::TRANSPORT);
    transport.connections.inc();
    let conn = subscriber.id();
    debug!(conn, transport = W::TRANSPORT.name(), "connected");
    let mut session = Session::new(
        node.hub.clone(),
        node.registry.clone(),
        subscriber.clone(),
        settings.session,
        node.admission.clone(),
        node.draining.clone(),
        crate::clock::unix_ms(),
    );
    // Grows to the largest batch this connection has needed: idle fans never pay for MAX_BATCH,
    // and a small one is given back once written (`release_small`).
    let mut batch = Vec::new();
    let Keepalive { interval, idle_timeout } = settings.keepalive;
    let mut keepalive = tokio::time::interval_at(Instant::now() + interval, interval);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    // While the connection holds a token: its expiry (boxed, for authenticated connections only).
    let mut token_expiry: Option<(u64, std::pin::Pin<Box<tokio::time::Sleep>>)> = None;
    // Made once, not on every turn of the loop, and polled through a gate: a turn polls only
    // the branches that woke (the shutdown notice's poll takes a lock).
    let shutdown_notice = shutdown.recv();
    tokio::pin!(shutdown_notice);
    let shutdown_gate = WakeGate::default();

    let ending = loop {
        tokio::select! {
            biased;
            _ = shutdown_gate.future(shutdown_notice.as_mut()) => break Ending::Shutdown,
            _ = subscriber.wait() => {
                match write_queue(&mut wire, &subscriber, &mut batch, &node, settings.write_timeout).await {
                    Ok(None) => release_small(&mut batch),
                    Ok(Some(QueueClosed::Slow)) => break Ending::Slow,
                    Ok(Some(QueueClosed::Gone)) => break Ending::Shutdown,
                    Err(_) => break Ending::WriteFailed,
                }
            }
            inbound = std::future::poll_fn(|cx| wire.poll_inbound(cx)) => {
                match inbound {
                    Inbound::Command(command) => {
                        last_heard = Instant::now();
                        transport.client_messages.inc();
                        let now_ms = crate::clock::unix_ms();
                        session.handle(command, now_ms);
                        if session.flooding() {
                            break Ending::Flooding;
                        }
                        let expires_ms = session.token_expires_ms();
                        if expires_ms != token_expiry.as_ref().map(|(ms, _)| *ms) {
                            token_expiry = expires_ms.map(|ms| {
                                let left = Duration::from_millis(ms.saturating_sub(now_ms));
                                (ms, Box::pin(tokio::time::sleep(left)))
                            });
                        }
                    }
                    Inbound::Rejected(code, message) => {
                        last_heard = Instant::now();
                        transport.client_messages.inc();
                        session.reject(code, message, crate::clock::unix_ms());
                        if session.flooding() {
                            break Ending::Flooding;
                        }
                    }
                    Inbound::Heard => last_heard = Instant::now(),
                    Inbound::Timer => {
                        if wire.on_timer(settings.write_timeout).await.is_err() {
                            break Ending::WriteFailed;
                        }
                    }
                    Inbound::End(ending) => break ending,
                }
            }
            _ = async { if let Some((_, sleep)) = token_expiry.as_mut() { sleep.as_mut().await } }, if token_expiry.is_some() => {
                break Ending::TokenExpired;
            }
            _ = keepalive.tick() => {
                if last_heard.elapsed() >= idle_timeout {
                    break Ending::Idle;
                }
                // Boxed: its timer lives on the heap once every ping interval, not in the task.
                if Box::pin(wire.ping(settings.write_timeout)).await.is_err() {
                    break Ending::WriteFailed;
                }
            }
        }
    };

    // From here on the task writes its own last frames (a close must be the last).
    subscriber.stop_direct();
    debug!(conn, ?ending, "closing");
    // Boxed: the closing futures (timers, close handshakes) live on the heap only while a
    // connection closes, instead of widening every connection's task for its whole life.
    Box::pin(finish(&mut wire, ending, &subscriber, &mut batch, &node, &settings)).await;
    drop(session);
    let dropped = subscriber.close(QueueClosed::Gone);
    if dropped > 0 {
        metrics.dropped.inc_by(dropped as u64);
    }
    transport.connections.dec();
    debug!(conn, dropped, "closed");
}

/// Closes the connection as its `ending` asks.
async fn finish<W: Wire>(
    wire: &mut W,
    ending: Ending,
    subscriber: &Subscriber,
    batch: &mut Vec<Outgoing>,
    node: &Node,
    settings: &DriverSettings,
) {
    let metrics = &node.metrics;
    let conn = subscriber.id();
    let close = |code, reason, limit| Close {
        code,
        reason,
        limit,
        reconnect: false,
        discard_input: false,
    };
    match ending {
        Ending::PeerClosed => wire.answer_close().await,
        Ending::PeerGone | Ending::WriteFailed => {}
        Ending::Shutdown => {
            // Deliver what was accepted, then tell the client to reconnect elsewhere.
            let _ = timeout(CLOSE_WAIT, write_queue(wire, subscriber, batch, node, CLOSE_WAIT)).await;
            let closed = wire
                .close(Close {
                    reconnect: true,
                    ..close(
                        close_code::SERVICE_RESTART,
                        "server shutting down; reconnect",
                        settings.drain_timeout,
                    )
                })
                .await;
            if !closed {
                node.shutdown.abandoned_one();
            }
        }
        Ending::Slow => {
            info!(conn, transport = W::TRANSPORT.name(), "closing slow client (4001)");
            let reason = "slow consumer; reconnect with since";
            wire.close(close(close_code::SLOW, reason, settings.write_timeout))
                .await;
        }
        Ending::Idle => {
            metrics.close_error(close_code::IDLE_TIMEOUT, "idle_timeout");
            wire.close(close(close_code::IDLE_TIMEOUT, "idle timeout", CLOSE_WAIT))
                .await;
        }
        Ending::TokenExpired => {
            metrics.close_error(close_code::TOKEN_EXPIRED, "token_expired");
            let reason = "token expired; reconnect with a fresh one";
            wire.close(close(close_code::TOKEN_EXPIRED, reason, CLOSE_WAIT)).await;
        }
        Ending::TooBig { limit } => {
            metrics.close_error(close_code::MESSAGE_TOO_BIG, "message_too_big");
            let reason = format!("message larger than {limit} bytes");
            wire.close(Close {
                discard_input: true,
                ..close(close_code::MESSAGE_TOO_BIG, &reason, CLOSE_WAIT)
            })
            .await;
        }
        Ending::Flooding => {
            info!(
                conn,
                transport = W::TRANSPORT.name(),
                "closing a client that floods commands over its rate (1008)"
            );
            metrics.close_error(close_code::POLICY_VIOLATION, "command_flood");
            wire.close(Close {
                discard_input: true,
                ..close(
                    close_code::POLICY_VIOLATION,
                    "too many commands over the rate",
                    CLOSE_WAIT,
                )
            })
            .await;
        }
        Ending::Protocol(error) => {
            debug!(conn, %error, "protocol error");
            metrics.close_error(close_code::PROTOCOL_ERROR, "protocol_error");
            wire.close(close(close_code::PROTOCOL_ERROR, "protocol error", CLOSE_WAIT))
                .await;
        }
    }
}

/// Batch storage of at most this many messages is given back once the batch is written: an
/// idle connection (most of them, most of the time) then holds none, and the allocation it
/// costs the next wake-up is small against the write.
const SMALL_BATCH: usize = 16;

/// Gives back `batch`'s storage when it is small (see `SMALL_BATCH`).
fn release_small(batch: &mut Vec<Outgoing>) {
    if batch.capacity() <= SMALL_BATCH {
        *batch = Vec::new();
    }
}

/// Writes everything queued, up to `MAX_BATCH` messages per batch. Reports a closed queue.
async fn write_queue<W: Wire>(
    wire: &mut W,
    subscriber: &Subscriber,
    batch: &mut Vec<Outgoing>,
    node: &Node,
    write_timeout: Duration,
) -> Result<Option<QueueClosed>, WireError> {
    loop {
        batch.clear();
        let closed = subscriber.drain_into(batch, MAX_BATCH);
        if !batch.is_empty() {
            wire.write_batch(batch, write_timeout).await?;
            node.metrics.record_deliveries(W::TRANSPORT, batch);
        }
        wire.flush(write_timeout).await?;
        if batch.is_empty() || closed.is_some() {
            return Ok(closed);
        }
    }
}

/// Runs `work` to its end within `limit`. A write into a socket with room completes on its
/// first poll; only a write that has to wait arms a timer (a timer per delivery cost measurable
/// CPU at 10,000 subscribers).
pub async fn with_deadline<T, E: std::fmt::Display>(
    limit: Duration,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, WireError> {
    let mut work = std::pin::pin!(work);
    let first = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await;
    let result = match first {
        Poll::Ready(result) => result,
        // Boxed: the timer is on the heap only while a write waits, not in every task.
        Poll::Pending => match Box::pin(timeout(limit, work)).await {
            Ok(result) => result,
            Err(_) => return Err(WireError::Timeout),
        },
    };
    result.map_err(|e| WireError::Failed(e.to_string()))
}
