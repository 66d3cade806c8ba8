//! Prometheus metrics: one registry, and handles resolved once so the hot path never looks up labels.
//! Served as OpenMetrics text at `GET /metrics` (names in README.md, "Metrics").

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::core::{ErrorCode, Outgoing, Publication};

/// A transport a client connects with: the one list of them. Its `name` labels the
/// per-transport metrics (`transport="..."`, EMF's `Transport`, the operations page's keys), and
/// every per-transport figure is a `PerTransport`, so a new transport is a new variant here and
/// its `Wire`, nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    WebSocket,
    WebTransport,
}

impl Transport {
    /// Every transport, in the order its figures are listed.
    pub const ALL: [Transport; 2] = [Self::WebSocket, Self::WebTransport];
    pub const COUNT: usize = Self::ALL.len();

    /// The label value of its metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::WebSocket => "websocket",
            Self::WebTransport => "webtransport",
        }
    }

    /// Its slot in a `PerTransport`.
    fn index(self) -> usize {
        self as usize
    }
}

/// One value per transport, indexed by `Transport`; serialised as an object keyed by the
/// transports' names (`{"websocket": .., "webtransport": ..}`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PerTransport<T>([T; Transport::COUNT]);

impl<T> PerTransport<T> {
    /// The value of each transport, made by `f`.
    pub fn from_fn(f: impl FnMut(Transport) -> T) -> Self {
        Self(Transport::ALL.map(f))
    }

    /// Each transport with its value.
    pub fn iter(&self) -> impl Iterator<Item = (Transport, &T)> {
        Transport::ALL.into_iter().zip(&self.0)
    }

    /// The sum over every transport of what `f` reads from each: the one place a total is made.
    pub fn sum_by<N: std::iter::Sum<N>>(&self, f: impl FnMut(&T) -> N) -> N {
        self.0.iter().map(f).sum()
    }
}

impl<T> std::ops::Index<Transport> for PerTransport<T> {
    type Output = T;

    fn index(&self, transport: Transport) -> &T {
        &self.0[transport.index()]
    }
}

impl<T> std::ops::IndexMut<Transport> for PerTransport<T> {
    fn index_mut(&mut self, transport: Transport) -> &mut T {
        &mut self.0[transport.index()]
    }
}

impl<T: serde::Serialize> serde::Serialize for PerTransport<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(Transport::COUNT))?;
        for (transport, value) in self.iter() {
            map.serialize_entry(transport.name(), value)?;
        }
        map.end()
    }
}

/// A WebTransport endpoint loop (`--wt-loops`), by index from 0, as the logs' `endpoint_loop`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LoopLabel {
    pub endpoint_loop: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TransportLabel {
    transport: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CodeLabel {
    code: u16,
    name: &'static str,
}

/// Counters and gauges of one transport.
#[derive(Debug, Clone, Default)]
pub struct TransportMetrics {
    pub connections: Gauge,
    pub client_messages: Counter,
    pub deliveries: Counter,
    pub slow_disconnects: Counter,
}

/// Every metric the node exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Each transport's counters and gauges, labelled with its name.
    pub transports: PerTransport<TransportMetrics>,
    pub subscriptions: Gauge,
    pub rooms: Gauge,
    pub published_states: Counter,
    pub published_events: Counter,
    /// State updates replaced in a queue by a newer version before they were written.
    pub conflated: Counter,
    /// Messages discarded because their connection was closing (slow or gone).
    pub dropped: Counter,
    errors: Family<CodeLabel, Counter>,
    /// Every error of `errors`, whatever its code (for EMF; not exported on its own).
    pub errors_sum: Counter,
    /// Seconds from a publish entering the node to its frame being written to a socket.
    pub delivery_latency: Histogram,
    pub draining: Gauge,
    /// State datagrams resent because the client had not acknowledged them.
    pub repair_datagrams: Counter,
    /// States sent again over the reliable stream because their datagram was not acknowledged.
    pub repair_stream: Counter,
    /// Acknowledgements of state datagrams received from WebTransport clients.
    pub repair_acks: Counter,
    /// 1 while the registry (Redis) is reachable.
    pub registry_up: Gauge,
    /// Publishes waiting for Redis.
    pub outbox: Gauge,
    /// Live events sent with a gap in their numbering: the events before them never arrived
    /// within the wait (`registry::redis::gaps`).
    pub registry_gaps: Counter,
    /// Datagrams the kernel dropped on the WebTransport UDP sockets (read at scrape time, summed).
    pub udp_receive_drops: Gauge,
    /// QUIC handshakes answered with a Retry (address validation under a handshake flood).
    pub quic_retries: Counter,
    /// WebTransport sessions closed because the QUIC handshake, the CONNECT and the first
    /// control message did not all complete within `--upgrade-timeout`.
    pub wt_handshake_timeouts: Counter,
    /// Datagrams of WebTransport connections (after the client's first) dropped before QUIC
    /// read them: their client sent more bytes than its inbound rate allows (PROTOCOL.md,
    /// "Limits").
    pub wt_inbound_dropped: Counter,
    /// Client messages over the command rate ignored without an answer (error 104 answers the
    /// others and counts in `errors`).
    pub commands_ignored: Counter,
    /// QUIC handshakes under way (Initial received, handshake not yet complete).
    pub quic_handshakes: Gauge,
    /// Seconds (wall clock) each of the proto engine's endpoint loops spent working, not waiting:
    /// a rate near 1 means that loop has no idle time left (its work fills its core, or the
    /// machine keeps it from one).
    pub wt_loop_busy_seconds: Family<LoopLabel, Counter<f64, AtomicU64>>,
    /// Datagrams handed to the loop their connection ID names (`--wt-loops`), by that loop.
    pub wt_datagrams_forwarded: Family<LoopLabel, Counter>,
    /// Datagrams for a loop dropped because its inbox was full, by that loop.
    pub wt_forward_drops: Family<LoopLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("courtside");
        let connections = Family::<TransportLabel, Gauge>::default();
        let client_messages = Family::<TransportLabel, Counter>::default();
        let deliveries = Family::<TransportLabel, Counter>::default();
        let slow = Family::<TransportLabel, Counter>::default();
        let published = Family::<KindLabel, Counter>::default();
        let transports = PerTransport::from_fn(|t| TransportMetrics {
            connections: connections.get_or_create_owned(&TransportLabel { transport: t.name() }),
            client_messages: client_messages.get_or_create_owned(&TransportLabel { transport: t.name() }),
            deliveries: deliveries.get_or_create_owned(&TransportLabel { transport: t.name() }),
            slow_disconnects: slow.get_or_create_owned(&TransportLabel { transport: t.name() }),
        });
        let metrics = Self {
            transports,
            subscriptions: Gauge::default(),
            rooms: Gauge::default(),
            published_states: published.get_or_create_owned(&KindLabel { kind: "state" }),
            published_events: published.get_or_create_owned(&KindLabel { kind: "event" }),
            conflated: Counter::default(),
            dropped: Counter::default(),
            errors: Family::default(),
            errors_sum: Counter::default(),
            delivery_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            draining: Gauge::default(),
            udp_receive_drops: Gauge::default(),
            quic_retries: Counter::default(),
            wt_handshake_timeouts: Counter::default(),
            wt_inbound_dropped: Counter::default(),
            commands_ignored: Counter::default(),
            quic_handshakes: Gauge::default(),
            wt_loop_busy_seconds: Family::default(),
            wt_datagrams_forwarded: Family::default(),
            wt_forward_drops: Family::default(),
            repair_datagrams: Counter::default(),
            registry_up: Gauge::default(),
            outbox: Gauge::default(),
            registry_gaps: Counter::default(),
            repair_stream: Counter::default(),
            repair_acks: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("connections", "Open client connections", connections);
        registry.register(
            "subscriptions",
            "Room subscriptions held by local connections",
            metrics.subscriptions.clone(),
        );
        registry.register("rooms", "Rooms held by this node", metrics.rooms.clone());
        registry.register("messages_in", "Messages received from clients", client_messages);
        registry.register("published", "Messages published into rooms", published);
        registry.register("messages_out", "Messages written to clients", deliveries);
        registry.register(
            "conflated",
            "State updates replaced by a newer version before being written",
            metrics.conflated.clone(),
        );
        registry.register(
            "dropped",
            "Messages discarded because their connection was closing",
            metrics.dropped.clone(),
        );
        registry.register(
            "slow_disconnects",
            "Connections closed because their ordered queue overflowed",
            slow,
        );
        registry.register(
            "errors",
            "Error replies and error closes sent to clients, by code",
            metrics.errors.clone(),
        );
        registry.register(
            "delivery_latency_seconds",
            "Time from a publish entering the node to its frame being written to the socket",
            metrics.delivery_latency.clone(),
        );
        registry.register(
            "draining",
            "1 while the node is shutting down",
            metrics.draining.clone(),
        );
        registry.register(
            "registry_up",
            "1 while the registry (Redis) is reachable",
            metrics.registry_up.clone(),
        );
        registry.register(
            "outbox",
            "Publishes waiting for Redis to return",
            metrics.outbox.clone(),
        );
        registry.register(
            "registry_gaps",
            "Live events sent with a gap in their numbering after the events before them never arrived",
            metrics.registry_gaps.clone(),
        );
        registry.register(
            "repair_datagrams",
            "State datagrams resent because the client had not acknowledged them",
            metrics.repair_datagrams.clone(),
        );
        registry.register(
            "repair_stream",
            "States resent over the reliable stream because their datagram was not acknowledged",
            metrics.repair_stream.clone(),
        );
        registry.register(
            "repair_acks",
            "Acknowledgements of state datagrams received from WebTransport clients",
            metrics.repair_acks.clone(),
        );
        registry.register(
            "udp_receive_drops",
            "Datagrams the kernel dropped on the WebTransport UDP sockets, summed over --wt-loops (receive buffer full)",
            metrics.udp_receive_drops.clone(),
        );
        registry.register(
            "quic_retries",
            "QUIC handshakes answered with a Retry to validate the client address (--quic-retry-threshold)",
            metrics.quic_retries.clone(),
        );
        registry.register(
            "webtransport_handshake_timeouts",
            "WebTransport sessions closed because the handshake, CONNECT and first control message took longer than --upgrade-timeout",
            metrics.wt_handshake_timeouts.clone(),
        );
        registry.register(
            "webtransport_inbound_dropped",
            "Datagrams of WebTransport connections dropped unread: their client sent more than its inbound rate",
            metrics.wt_inbound_dropped.clone(),
        );
        registry.register(
            "commands_ignored",
            "Client messages over the command rate ignored without an answer",
            metrics.commands_ignored.clone(),
        );
        registry.register(
            "quic_handshakes",
            "QUIC handshakes under way",
            metrics.quic_handshakes.clone(),
        );
        registry.register(
            "webtransport_loop_busy_seconds",
            "Seconds (wall clock) each WebTransport endpoint loop (--wt-engine proto, --wt-loops) spent working rather than waiting; a rate near 1 means that loop has no idle time left",
            metrics.wt_loop_busy_seconds.clone(),
        );
        registry.register(
            "webtransport_datagrams_forwarded",
            "Datagrams an endpoint loop received for a session of another loop (the client's address changed) and handed to it, by the loop they were handed to (--wt-loops above 1)",
            metrics.wt_datagrams_forwarded.clone(),
        );
        registry.register(
            "webtransport_forward_drops",
            "Datagrams for another endpoint loop dropped because its inbox (4,096 datagrams) was full, by that loop; QUIC sends them again",
            metrics.wt_forward_drops.clone(),
        );
        Self { registry, ..metrics }
    }

    pub fn transport(&self, transport: Transport) -> &TransportMetrics {
        &self.transports[transport]
    }

    /// Open connections of every transport together.
    pub fn connections(&self) -> i64 {
        self.transports.sum_by(|t| t.connections.get())
    }

    /// Counts a batch written to one connection, and each publication's publish-to-send latency
    /// (one clock read per batch).
    pub fn record_deliveries(&self, transport: Transport, batch: &[Outgoing]) {
        self.transport(transport).deliveries.inc_by(batch.len() as u64);
        let now = std::time::Instant::now();
        for item in batch {
            if let Outgoing::Publication(p) | Outgoing::Delta(p) = item {
                self.delivery_latency
                    .observe(now.saturating_duration_since(p.published_at).as_secs_f64());
            }
        }
    }

    /// Records `count` deliveries of one publication written by the fan-out itself.
    pub fn record_direct_deliveries(&self, transport: Transport, count: u64, publication: &Publication) {
        self.transport(transport).deliveries.inc_by(count);
        let latency = publication.published_at.elapsed().as_secs_f64();
        for _ in 0..count {
            self.delivery_latency.observe(latency);
        }
    }

    /// Counts an error reply or error close by its protocol code.
    pub fn error(&self, code: ErrorCode) {
        self.errors_sum.inc();
        self.errors
            .get_or_create(&CodeLabel {
                code: code.as_u16(),
                name: code.name(),
            })
            .inc();
    }

    /// Counts a close code that signals a failure (1002, 1009, 4001, 4002...).
    pub fn close_error(&self, code: u16, name: &'static str) {
        self.errors_sum.inc();
        self.errors.get_or_create(&CodeLabel { code, name }).inc();
    }

    /// The delivery latency histogram's cumulative buckets: (upper bound in seconds, count),
    /// `+Inf` last. Read through the exposition, the histogram's only public view.
    pub fn latency_buckets(&self) -> Vec<(f64, u64)> {
        let mut registry = Registry::default();
        registry.register("latency", "", self.delivery_latency.clone());
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text.lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("latency_bucket{le=\"")?;
                let (bound, count) = rest.split_once("\"} ")?;
                let bound = if bound == "+Inf" {
                    f64::INFINITY
                } else {
                    bound.parse().ok()?
                };
                Some((bound, count.trim().parse().ok()?))
            })
            .collect()
    }

    /// Error replies and closes so far, by code: (code, name, count), lowest code first. Read
    /// through the exposition, as `latency_buckets` is (a family lists no members otherwise).
    pub fn error_counts(&self) -> Vec<(u16, String, u64)> {
        let mut registry = Registry::default();
        registry.register("errors", "", self.errors.clone());
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        let mut counts: Vec<(u16, String, u64)> = text
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("errors_total{code=\"")?;
                let (code, rest) = rest.split_once("\",name=\"")?;
                let (name, count) = rest.split_once("\"} ")?;
                Some((code.parse().ok()?, name.to_string(), count.trim().parse().ok()?))
            })
            .collect();
        counts.sort();
        counts
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One transport's counters at an instant.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TransportSample {
    pub connections: i64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub slow_disconnects: u64,
}

/// Every counter and gauge the EMF documents and the operations page report, at an instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub transports: PerTransport<TransportSample>,
    pub published_states: u64,
    pub published_events: u64,
    pub errors: u64,
    pub rooms: i64,
    pub subscriptions: i64,
    pub registry_up: i64,
    pub outbox: i64,
    pub draining: i64,
    /// The delivery latency histogram, cumulative: (upper bound in seconds, count).
    pub latency: Vec<(f64, u64)>,
}

impl Sample {
    pub fn of(metrics: &Metrics) -> Self {
        Self {
            transports: PerTransport::from_fn(|t| {
                let m = metrics.transport(t);
                TransportSample {
                    connections: m.connections.get(),
                    messages_in: m.client_messages.get(),
                    messages_out: m.deliveries.get(),
                    slow_disconnects: m.slow_disconnects.get(),
                }
            }),
            published_states: metrics.published_states.get(),
            published_events: metrics.published_events.get(),
            errors: metrics.errors_sum.get(),
            rooms: metrics.rooms.get(),
            subscriptions: metrics.subscriptions.get(),
            registry_up: metrics.registry_up.get(),
            outbox: metrics.outbox.get(),
            draining: metrics.draining.get(),
            latency: metrics.latency_buckets(),
        }
    }
}

/// Per-bucket counts of the deliveries between two cumulative histograms (same bounds).
pub fn interval_histogram(before: &[(f64, u64)], now: &[(f64, u64)]) -> Vec<(f64, u64)> {
    now.iter()
        .enumerate()
        .map(|(i, &(bound, count))| {
            let earlier = before.get(i).map_or(0, |&(_, c)| c);
            (bound, count.saturating_sub(earlier))
        })
        .collect()
}

/// The `q` quantile of a cumulative histogram, interpolated linearly inside its bucket (the
/// bucket above the last finite bound reports that bound); `None` without observations.
pub fn quantile(cumulative: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = cumulative.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut lower_bound, mut lower_count) = (0.0, 0u64);
    for &(bound, count) in cumulative {
        if count as f64 >= rank {
            if bound.is_infinite() {
                return Some(lower_bound);
            }
            let inside = (count - lower_count) as f64;
            let fraction = if inside > 0.0 {
                (rank - lower_count as f64) / inside
            } else {
                1.0
            };
            return Some(lower_bound + (bound - lower_bound) * fraction.clamp(0.0, 1.0));
        }
        (lower_bound, lower_count) = (bound, count);
    }
    Some(lower_bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exposition's per-transport series keep their names and labels (dashboards read
    /// them): one series per transport, labelled with its name.
    #[test]
    fn per_transport_series_are_labelled_with_each_transports_name() {
        let metrics = Metrics::new();
        metrics.transport(Transport::WebSocket).connections.inc();
        metrics.transport(Transport::WebTransport).connections.set(2);
        metrics.transport(Transport::WebTransport).deliveries.inc_by(5);
        let text = metrics.render();
        for line in [
            "courtside_connections{transport=\"websocket\"} 1",
            "courtside_connections{transport=\"webtransport\"} 2",
            "courtside_messages_out_total{transport=\"webtransport\"} 5",
            "courtside_messages_in_total{transport=\"websocket\"} 0",
            "courtside_slow_disconnects_total{transport=\"webtransport\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert_eq!(metrics.connections(), 3, "the sum of every transport");
        assert_eq!(Sample::of(&metrics).transports.sum_by(|t| t.messages_out), 5);
    }

    #[test]
    fn a_per_transport_value_serialises_as_an_object_keyed_by_names() {
        let mut counts = PerTransport::<u64>::default();
        counts[Transport::WebTransport] = 7;
        assert_eq!(
            serde_json::to_string(&counts).expect("json"),
            r#"{"websocket":0,"webtransport":7}"#
        );
        let names: Vec<&str> = counts.iter().map(|(t, _)| t.name()).collect();
        assert_eq!(names, ["websocket", "webtransport"]);
    }
}
