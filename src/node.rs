//! The node's shared handles, cloned into every HTTP handler and connection task: the hub, the
//! metrics, the publish token, the transport settings and the shutdown state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::shutdown::{Shutdown, ShutdownListener};
use crate::transport::websocket::WebSocketSettings;
use crate::transport::webtransport::CertificateSlot;

/// Cloneable handle to the node.
#[derive(Debug, Clone)]
pub struct Node(Arc<NodeInner>);

#[derive(Debug)]
pub struct NodeInner {
    pub hub: Hub,
    /// Embedded, or Redis when the node is one of several.
    pub registry: Registry,
    pub metrics: Arc<Metrics>,
    /// Bearer token the publish API requires.
    pub publish_token: String,
    pub websocket: WebSocketSettings,
    pub max_batch: usize,
    /// True from the shutdown signal on: health answers 503 and new subscriptions are refused.
    pub draining: Arc<AtomicBool>,
    pub shutdown: Shutdown,
    /// The WebTransport certificate in use, for `GET /v1/cert-hash`; empty without WebTransport.
    pub certificate: CertificateSlot,
    /// Inode of the WebTransport UDP socket, for its kernel drop count.
    pub udp_socket_inode: std::sync::OnceLock<u64>,
}

impl Node {
    pub fn new(inner: NodeInner) -> Self {
        Self(Arc::new(inner))
    }

    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::Relaxed)
    }

    /// Marks the node as draining and tells every connection task to finish.
    pub fn begin_drain(&self) {
        self.0.draining.store(true, Ordering::Relaxed);
        self.0.metrics.draining.set(1);
        self.0.shutdown.begin();
    }

    pub fn shutdown_listener(&self) -> ShutdownListener {
        self.0.shutdown.listener()
    }
}

impl std::ops::Deref for Node {
    type Target = NodeInner;

    fn deref(&self) -> &NodeInner {
        &self.0
    }
}
