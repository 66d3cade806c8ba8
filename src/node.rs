//! The node's shared handles, cloned into every HTTP handler and connection task: the hub, the
//! registry, admission, the metrics and the shutdown state. It holds no transport types.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crate::admission::Admission;
use crate::certs::CertificateSlot;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::ops::OpsBoard;
use crate::registry::Registry;
use crate::shutdown::{Shutdown, ShutdownListener};
use crate::udp::UdpDrops;

/// Cloneable handle to the node.
#[derive(Debug, Clone)]
pub struct Node(Arc<NodeInner>);

#[derive(Debug)]
pub struct NodeInner {
    /// This node's rooms and their local subscribers.
    pub hub: Hub,
    /// Where rooms are shared (embedded, or Redis when the node is one of several); callers
    /// never ask which.
    pub registry: Arc<dyn Registry>,
    /// Who may connect, listen and publish.
    pub admission: Admission,
    pub metrics: Arc<Metrics>,
    /// True from the shutdown signal on: health answers 503 and new subscriptions are refused.
    pub draining: Arc<AtomicBool>,
    pub shutdown: Shutdown,
    /// The WebTransport certificate in use, for `GET /v1/cert-hash`; empty without WebTransport.
    pub certificate: CertificateSlot,
    /// The WebTransport UDP sockets' kernel drop count, once they are bound.
    pub udp_drops: OnceLock<UdpDrops>,
    /// The newest figures of the operations page (`ops::run` keeps it current).
    pub ops: Arc<OpsBoard>,
}

impl Node {
    pub fn new(hub: Hub, registry: Arc<dyn Registry>, admission: Admission) -> Self {
        let metrics = hub.metrics().clone();
        Self(Arc::new(NodeInner {
            hub,
            registry,
            admission,
            metrics,
            draining: Arc::new(AtomicBool::new(false)),
            shutdown: Shutdown::new(),
            certificate: CertificateSlot::default(),
            udp_drops: OnceLock::new(),
            ops: Arc::default(),
        }))
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
