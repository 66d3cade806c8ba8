//! Runs a node: binds nothing itself (the caller passes the listener), accepts TCP connections
//! that admission lets in, serves HTTP and upgrades, sweeps rooms, trims the heap after bursts
//! (`memory`), and drains on shutdown.

use std::future::Future;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::admission::TcpPlace;
use crate::config::ServeConfig;
use crate::http::HttpSettings;
use crate::listener::{LimitedStream, OverLimit, PeerAddr};
use crate::node::Node;

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
    /// Publishes still waiting for Redis (answered 202 `queued`) when the drain ended: lost.
    pub unflushed: usize,
}

/// Serves until `signal` resolves, then drains: health turns 503, new WebSocket upgrades are
/// refused, clients are told to reconnect, and the drain waits at most the drain timeout.
pub async fn serve(
    config: &ServeConfig,
    node: Node,
    listener: TcpListener,
    signal: impl Future<Output = ()>,
) -> DrainReport {
    let router = crate::http::router(node.clone(), HttpSettings::from_config(config));
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
    // Gives the heap a burst of connects or disconnects freed back to the OS.
    let trimmer = tokio::spawn(crate::memory::run(node.metrics.clone(), node.shutdown_listener()));

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
            let (permit, over_limit) = match node.admission.admit_tcp() {
                Some(TcpPlace::Connection(permit)) => (permit, false),
                Some(TcpPlace::Reserve(permit)) => (permit, true),
                None => {
                    debug!(%peer, "connection limit and HTTP reserve full; closing new connection");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let io = TokioIo::new(LimitedStream::new(stream, permit));
            // The TCP peer travels with each request, for admission (the client address).
            let service = TowerToHyperService::new(WithPeer {
                router: router.clone(),
                peer,
                over_limit,
            });
            let mut stop = node.shutdown_listener();
            let draining = stop.is_shutdown();
            tokio::spawn(async move {
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(upgrade_timeout)
                    // A reserve place serves one request, so that it is soon free again.
                    .keep_alive(!draining && !over_limit);
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
            let deadline = tokio::time::Instant::now() + drain_timeout + DRAIN_GRACE;
            // Connections enforce the drain deadline themselves; the grace covers their last writes.
            let finished = node.shutdown.wait(drain_timeout + DRAIN_GRACE).await;
            let abandoned = node.shutdown.abandoned() + node.shutdown.running();
            let unflushed = wait_for_outbox(&node, deadline).await;
            DrainReport {
                clean: finished && abandoned == 0 && unflushed == 0,
                abandoned,
                unflushed,
            }
        };
        tokio::pin!(drain);
        tokio::select! {
            report = &mut drain => report,
            () = accept_loop => unreachable_accept(),
        }
    };
    sweeper.abort();
    trimmer.abort();
    report
}

/// The accept loop only ends by the drain finishing first.
fn unreachable_accept() -> DrainReport {
    DrainReport {
        clean: false,
        abandoned: 0,
        unflushed: 0,
    }
}

/// Publishes accepted while Redis was away (202 `queued`) live in this node's outbox: the drain
/// gives Redis until `deadline` to take them, checking every 100 ms (the outbox has no
/// notification of its own), and returns how many are left.
async fn wait_for_outbox(node: &Node, deadline: tokio::time::Instant) -> usize {
    let waiting = node.registry.status().outbox;
    if waiting > 0 {
        info!(
            outbox = waiting,
            "draining: waiting for redis to take the queued publishes"
        );
    }
    loop {
        let waiting = node.registry.status().outbox;
        if waiting == 0 || tokio::time::Instant::now() >= deadline {
            return waiting;
        }
        tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + Duration::from_millis(100))).await;
    }
}

/// The router, with each request's `PeerAddr` put in its extensions.
#[derive(Clone)]
struct WithPeer {
    router: axum::Router,
    peer: std::net::SocketAddr,
    /// The connection holds a place in the HTTP reserve: its requests carry `OverLimit`.
    over_limit: bool,
}

impl<B> tower_service::Service<axum::http::Request<B>> for WithPeer
where
    axum::Router: tower_service::Service<axum::http::Request<B>>,
{
    type Response = <axum::Router as tower_service::Service<axum::http::Request<B>>>::Response;
    type Error = <axum::Router as tower_service::Service<axum::http::Request<B>>>::Error;
    type Future = <axum::Router as tower_service::Service<axum::http::Request<B>>>::Future;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        tower_service::Service::<axum::http::Request<B>>::poll_ready(&mut self.router, cx)
    }

    fn call(&mut self, mut request: axum::http::Request<B>) -> Self::Future {
        request.extensions_mut().insert(PeerAddr(self.peer));
        if self.over_limit {
            request.extensions_mut().insert(OverLimit);
        }
        self.router.call(request)
    }
}
