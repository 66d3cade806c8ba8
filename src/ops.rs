//! The operations page's figures (`GET /v1/ops`, shown by `GET /ops`): the node's metrics sampled
//! once a second into rates and latency percentiles over that second, its busiest rooms, and each
//! node's latest summary through the registry. Building a summary is pure (tested here); `run`
//! only samples, keeps the newest summary for the HTTP side and hands it to the registry.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::hub::{Hub, RoomLoad};
use crate::metrics::{interval_histogram, quantile, Metrics, PerTransport, Sample};
use crate::registry::{Registry, RegistryStatus};
use crate::shutdown::ShutdownListener;

/// How often the node samples its metrics for the page.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Rooms listed as the busiest.
pub const BUSIEST: usize = 10;

/// Publish-to-socket latency over the interval's deliveries, in milliseconds (`None` without
/// deliveries in the interval).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

/// Error replies and closes of one protocol code.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorCount {
    pub code: u16,
    pub name: String,
    /// Since the node started (`courtside_errors_total`).
    pub total: u64,
    /// Per second over the interval.
    pub per_s: f64,
}

/// One of the busiest rooms.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BusyRoom {
    pub room: String,
    pub subscribers: usize,
    pub version: u64,
    pub seq: u64,
}

impl From<RoomLoad> for BusyRoom {
    fn from(load: RoomLoad) -> Self {
        Self {
            room: load.room.as_str().to_string(),
            subscribers: load.subscribers,
            version: load.version,
            seq: load.seq,
        }
    }
}

/// Counters since the node started, as `/metrics` has them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    pub publishes: u64,
    pub deliveries: PerTransport<u64>,
    pub slow_disconnects: PerTransport<u64>,
    pub errors: u64,
}

/// One node's figures over one interval: gauges as they are at its end, counters as rates over
/// it. The JSON of `GET /v1/ops` (docs/openapi.yaml, `OpsNode`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeSummary {
    pub node: String,
    /// End of the interval, ms since the Unix epoch.
    pub ts: u64,
    pub interval_ms: u64,
    pub draining: bool,
    pub connections: PerTransport<i64>,
    pub publishes_per_s: f64,
    pub deliveries_per_s: PerTransport<f64>,
    pub latency_ms: Latency,
    pub errors_per_s: f64,
    pub errors: Vec<ErrorCount>,
    pub slow_disconnects_per_s: PerTransport<f64>,
    pub rooms: i64,
    pub subscriptions: i64,
    pub registry: RegistryStatus,
    pub busiest_rooms: Vec<BusyRoom>,
    pub totals: Totals,
}

/// What one sampling reads: the metrics, the error counts by code, the registry and the rooms.
#[derive(Debug, Clone)]
pub struct Reading {
    pub sample: Sample,
    pub errors: Vec<(u16, String, u64)>,
    pub registry: RegistryStatus,
    pub busiest: Vec<RoomLoad>,
    pub unix_ms: u64,
}

impl Reading {
    pub fn take(metrics: &Metrics, hub: &Hub, registry: &dyn Registry) -> Self {
        Self {
            sample: Sample::of(metrics),
            errors: metrics.error_counts(),
            registry: registry.status(),
            busiest: hub.busiest_rooms(BUSIEST),
            unix_ms: crate::clock::unix_ms(),
        }
    }
}

/// The summary of the interval from `before` to `now`, `elapsed` long.
pub fn summarize(node: &str, before: &Reading, now: Reading, elapsed: Duration) -> NodeSummary {
    let seconds = elapsed.as_secs_f64().max(1e-3);
    let rate = |a: u64, b: u64| round(b.saturating_sub(a) as f64 / seconds);
    let (b, n) = (&before.sample, &now.sample);
    let latency = interval_histogram(&b.latency, &n.latency);
    let ms = |q: f64| quantile(&latency, q).map(|s| round(s * 1000.0));
    let errors = now
        .errors
        .iter()
        .map(|(code, name, total)| {
            let earlier = before
                .errors
                .iter()
                .find(|(c, nm, _)| c == code && nm == name)
                .map_or(0, |(_, _, t)| *t);
            ErrorCount {
                code: *code,
                name: name.clone(),
                total: *total,
                per_s: rate(earlier, *total),
            }
        })
        .collect();
    NodeSummary {
        node: node.to_string(),
        ts: now.unix_ms,
        interval_ms: elapsed.as_millis() as u64,
        draining: n.draining != 0,
        connections: PerTransport::from_fn(|t| n.transports[t].connections),
        publishes_per_s: rate(
            b.published_states + b.published_events,
            n.published_states + n.published_events,
        ),
        deliveries_per_s: PerTransport::from_fn(|t| rate(b.transports[t].messages_out, n.transports[t].messages_out)),
        latency_ms: Latency {
            p50: ms(0.50),
            p95: ms(0.95),
            p99: ms(0.99),
        },
        errors_per_s: rate(b.errors, n.errors),
        errors,
        slow_disconnects_per_s: PerTransport::from_fn(|t| {
            rate(b.transports[t].slow_disconnects, n.transports[t].slow_disconnects)
        }),
        rooms: n.rooms,
        subscriptions: n.subscriptions,
        registry: now.registry,
        busiest_rooms: now.busiest.into_iter().map(BusyRoom::from).collect(),
        totals: Totals {
            publishes: n.published_states + n.published_events,
            deliveries: PerTransport::from_fn(|t| n.transports[t].messages_out),
            slow_disconnects: PerTransport::from_fn(|t| n.transports[t].slow_disconnects),
            errors: n.errors,
        },
    }
}

/// Three decimals: what the page shows, and stable JSON.
fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The newest summary, shared between the sampler and the HTTP side.
#[derive(Debug, Default)]
pub struct OpsBoard {
    latest: Mutex<Option<Arc<NodeSummary>>>,
}

impl OpsBoard {
    pub fn latest(&self) -> Option<Arc<NodeSummary>> {
        self.latest.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, summary: NodeSummary) {
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(summary));
    }
}

/// Samples every `INTERVAL` until the shutdown: each summary goes to the board (this node's
/// page) and to the registry (the other nodes' pages, with the heartbeat).
pub async fn run(
    node_id: String,
    metrics: Arc<Metrics>,
    hub: Hub,
    registry: Arc<dyn Registry>,
    board: Arc<OpsBoard>,
    mut shutdown: ShutdownListener,
) {
    let mut before = Reading::take(&metrics, &hub, registry.as_ref());
    let mut at = Instant::now();
    let mut ticks = tokio::time::interval(INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.recv() => return,
        }
        let now = Reading::take(&metrics, &hub, registry.as_ref());
        let elapsed = at.elapsed();
        at = Instant::now();
        let summary = summarize(&node_id, &before, now.clone(), elapsed);
        if let Ok(json) = serde_json::to_string(&summary) {
            registry.share_summary(json);
        }
        board.set(summary);
        before = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::RoomName;
    use crate::metrics::{Transport, TransportSample};

    /// A sample of the two transports' figures (the rest default).
    fn per_transport(websocket: TransportSample, webtransport: TransportSample) -> PerTransport<TransportSample> {
        let mut samples = PerTransport::default();
        samples[Transport::WebSocket] = websocket;
        samples[Transport::WebTransport] = webtransport;
        samples
    }

    fn reading(sample: Sample, errors: Vec<(u16, String, u64)>) -> Reading {
        Reading {
            sample,
            errors,
            registry: RegistryStatus {
                kind: "embedded",
                status: "ok",
                outbox: 0,
                rooms_down: 0,
            },
            busiest: vec![RoomLoad {
                room: RoomName::parse("game:1").expect("room"),
                subscribers: 3,
                version: 7,
                seq: 2,
            }],
            unix_ms: 1_000,
        }
    }

    fn buckets(counts: &[u64]) -> Vec<(f64, u64)> {
        let mut bounds: Vec<f64> = (0..counts.len() - 1).map(|i| 0.001 * (1 << i) as f64).collect();
        bounds.push(f64::INFINITY);
        bounds.into_iter().zip(counts.iter().copied()).collect()
    }

    /// Counters become rates over the interval, gauges are as they are at its end, percentiles
    /// come from the interval's deliveries alone, and an error code new in the interval counts
    /// from zero.
    #[test]
    fn a_summary_reports_the_interval() {
        let before = reading(
            Sample {
                transports: per_transport(
                    TransportSample {
                        connections: 10,
                        messages_out: 100,
                        ..TransportSample::default()
                    },
                    TransportSample::default(),
                ),
                published_events: 5,
                errors: 1,
                latency: buckets(&[1000, 1000, 1000]),
                ..Sample::default()
            },
            vec![(1009, "message_too_big".into(), 1)],
        );
        let now = reading(
            Sample {
                transports: per_transport(
                    TransportSample {
                        connections: 12,
                        messages_out: 300,
                        slow_disconnects: 2,
                        ..TransportSample::default()
                    },
                    TransportSample {
                        connections: 4,
                        messages_out: 50,
                        ..TransportSample::default()
                    },
                ),
                published_events: 7,
                published_states: 2,
                errors: 4,
                rooms: 3,
                subscriptions: 9,
                // The interval's 200 deliveries all fell in the second bucket (1-2 ms).
                latency: buckets(&[1000, 1200, 1200]),
                ..Sample::default()
            },
            vec![(1009, "message_too_big".into(), 2), (4001, "slow_consumer".into(), 2)],
        );
        let summary = summarize("n0", &before, now, Duration::from_secs(2));
        // The JSON of `GET /v1/ops` (docs/openapi.yaml): an object keyed by transport names.
        let json = serde_json::to_value(&summary).expect("json");
        assert_eq!(
            json["connections"],
            serde_json::json!({"websocket": 12, "webtransport": 4})
        );
        assert_eq!(summary.publishes_per_s, 2.0);
        assert_eq!(
            json["deliveries_per_s"],
            serde_json::json!({"websocket": 100.0, "webtransport": 25.0})
        );
        assert_eq!(summary.slow_disconnects_per_s[Transport::WebSocket], 1.0);
        assert_eq!(summary.errors_per_s, 1.5);
        assert_eq!(
            summary
                .errors
                .iter()
                .map(|e| (e.code, e.total, e.per_s))
                .collect::<Vec<_>>(),
            [(1009, 2, 0.5), (4001, 2, 1.0)]
        );
        let p50 = summary.latency_ms.p50.expect("p50");
        let p99 = summary.latency_ms.p99.expect("p99");
        assert!((1.0..=2.0).contains(&p50) && (1.0..=2.0).contains(&p99), "{p50} {p99}");
        assert_eq!((summary.rooms, summary.subscriptions), (3, 9));
        assert_eq!(summary.totals.publishes, 9);
        assert_eq!(summary.totals.deliveries[Transport::WebSocket], 300);
        assert_eq!(summary.busiest_rooms[0].room, "game:1");
        assert_eq!(summary.interval_ms, 2000);
    }

    /// No delivery in the interval: no percentile, rather than the node's lifetime's.
    #[test]
    fn an_interval_without_deliveries_has_no_percentiles() {
        let sample = Sample {
            latency: buckets(&[5, 5, 5]),
            ..Sample::default()
        };
        let summary = summarize(
            "n0",
            &reading(sample.clone(), vec![]),
            reading(sample, vec![]),
            INTERVAL,
        );
        assert_eq!(summary.latency_ms, Latency::default());
        let json = serde_json::to_value(&summary).expect("json");
        assert!(json["latency_ms"]["p99"].is_null());
    }
}
