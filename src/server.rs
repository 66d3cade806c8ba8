//! Runs a node: binds nothing itself (the caller passes the listener), accepts TCP connections
//! under a connection limit, serves HTTP and upgrades, sweeps rooms, and drains on shutdown.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use crate::config::ServeConfig;
use crate::core::repair::RepairPolicy;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::node::{Node, NodeInner};
use crate::registry::{RedisSettings, Registry};
use crate::shutdown::Shutdown;
use crate::transport::websocket::WebSocketSettings;
use crate::transport::webtransport::WebTransportSettings;

/// How often rooms are swept for expired history and state.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Time allowed after the drain timeout for connections to finish closing.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// What a finished run reports.
#[derive(Debug, Clone, Copy)]
pub struct DrainReport {
    /// Whether every connection finished within the drain timeout.
    pub clean: bool,
    /// Connections that did not close within the drain timeout and were dropped.
    pub abandoned: usize,
}

/// The hub of a new node, with its metrics.
pub fn build_hub(config: &ServeConfig) -> Hub {
    Hub::new(config.hub(), Arc::new(Metrics::new()), crate::random::random_u64())
}

/// Builds the node from its configuration. `publish_token` is the resolved token.
pub fn build_node(config: &ServeConfig, publish_token: String, hub: Hub, registry: Registry) -> Node {
    let metrics = hub.metrics().clone();
    if matches!(registry, Registry::Embedded) {
        metrics.registry_up.set(1);
    }
    Node::new(NodeInner {
        hub,
        registry,
        metrics,
        publish_token,
        websocket: WebSocketSettings {
            max_message: config.websocket.ws_max_message,
            ping_interval: config.websocket.ping_interval,
            idle_timeout: config.websocket.idle_timeout,
            write_timeout: config.websocket.write_timeout,
            drain_timeout: config.http.drain_timeout,
            allowed_origins: config.http.allowed_origins.clone(),
            session: config.session(),
        },
        max_batch: config.http.max_batch,
        draining: Arc::new(AtomicBool::new(false)),
        shutdown: Shutdown::new(),
        certificate: Default::default(),
        udp_socket_inode: Default::default(),
    })
}

/// The WebTransport settings from the configuration.
pub fn webtransport_settings(config: &ServeConfig) -> WebTransportSettings {
    let wt = &config.webtransport;
    WebTransportSettings {
        bind: wt.addr,
        cert: wt.cert.clone().zip(wt.key.clone()),
        cert_check_interval: wt.cert_check_interval,
        udp_recv_buffer: wt.udp_recv_buffer,
        udp_send_buffer: wt.udp_send_buffer,
        keep_alive: config.websocket.ping_interval,
        idle_timeout: config.websocket.idle_timeout,
        handshake_timeout: config.http.upgrade_timeout,
        write_timeout: config.websocket.write_timeout,
        drain_timeout: config.http.drain_timeout,
        allowed_origins: config.http.allowed_origins.clone(),
        session: config.session(),
        repair: RepairPolicy::default(),
        state_datagrams: wt.wt_state_datagrams,
    }
}

/// The Redis registry's settings from the configuration.
pub fn redis_settings(config: &ServeConfig, url: &str, http: std::net::SocketAddr) -> RedisSettings {
    let node_id = config.cluster.node_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let host = if host.is_empty() { "node".to_string() } else { host };
        format!("{host}-{:06x}", crate::random::random_u64() & 0xff_ffff)
    });
    RedisSettings {
        url: url.to_string(),
        node_id,
        http: http.to_string(),
        heartbeat: config.cluster.node_heartbeat,
        outbox_messages: config.cluster.outbox_messages,
        outbox_bytes: config.cluster.outbox_bytes,
        history_len: config.rooms.history_size,
        history_ttl: config.rooms.history_ttl,
        state_ttl: config.rooms.state_ttl,
        cluster: config.cluster.redis_cluster,
    }
}

/// Serves until `signal` resolves, then drains: health turns 503, new WebSocket upgrades are
/// refused, clients are told to reconnect, and the drain waits at most the drain timeout.
pub async fn serve(
    config: &ServeConfig,
    node: Node,
    listener: TcpListener,
    signal: impl Future<Output = ()>,
) -> DrainReport {
    let router = crate::http::router(node.clone(), config.http.max_body);
    let limit = Arc::new(Semaphore::new(config.http.max_connections));
    let upgrade_timeout = config.http.upgrade_timeout;

    let sweeper = {
        let hub = node.hub.clone();
        let mut stop = node.shutdown_listener();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                tokio::select! {
                    _ = stop.recv() => break,
                    _ = tick.tick() => {
                        let removed = hub.sweep(crate::clock::unix_ms());
                        if removed > 0 {
                            debug!(removed, rooms = hub.room_count(), "swept idle rooms");
                        }
                    }
                }
            }
        })
    };

    let accept_loop = async {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, most likely: back off instead of spinning.
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                node.metrics.close_error(503, "connection_limit");
                debug!(%peer, "connection limit reached; closing new connection");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let io = TokioIo::new(LimitedStream {
                stream,
                _permit: permit,
            });
            let service = TowerToHyperService::new(router.clone());
            let mut stop = node.shutdown_listener();
            let draining = stop.is_shutdown();
            tokio::spawn(async move {
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(upgrade_timeout)
                    .keep_alive(!draining);
                let connection = builder.serve_connection(io, service).with_upgrades();
                tokio::pin!(connection);
                let result = tokio::select! {
                    result = connection.as_mut() => result,
                    _ = stop.recv(), if !draining => {
                        connection.as_mut().graceful_shutdown();
                        connection.as_mut().await
                    }
                };
                if let Err(error) = result {
                    debug!(%peer, %error, "http connection ended with an error");
                }
            });
        }
    };

    let drain_timeout = config.http.drain_timeout;
    let report = {
        let drain = async {
            signal.await;
            info!(drain_timeout = ?drain_timeout, "shutting down: health is 503, clients are told to reconnect");
            node.begin_drain();
            // Connections enforce the drain deadline themselves; the grace covers their last writes.
            let finished = node.shutdown.wait(drain_timeout + DRAIN_GRACE).await;
            let abandoned = node.shutdown.abandoned() + node.shutdown.running();
            DrainReport {
                clean: finished && abandoned == 0,
                abandoned,
            }
        };
        tokio::pin!(drain);
        tokio::select! {
            report = &mut drain => report,
            () = accept_loop => unreachable_accept(),
        }
    };
    sweeper.abort();
    report
}

/// The accept loop only ends by the drain finishing first.
fn unreachable_accept() -> DrainReport {
    DrainReport {
        clean: false,
        abandoned: 0,
    }
}

/// A TCP stream that holds a connection-limit permit until it closes, through any upgrade.
#[derive(Debug)]
pub(crate) struct LimitedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl LimitedStream {
    pub(crate) fn tcp(&self) -> &TcpStream {
        &self.stream
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Connections waiting to be accepted, at most (the kernel caps it at net.core.somaxconn). The
/// default of 1,024 overflowed when thousands of clients reconnected at once, and each dropped
/// SYN cost its client a one-second retransmit.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Binds the HTTP and WebSocket listener with `LISTEN_BACKLOG`.
pub fn bind_http(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(socket.into())
}
