//! The node's metrics as CloudWatch Embedded Metric Format documents on standard output, one JSON
//! object per line every `--emf-interval`: what the ECS log driver carries to CloudWatch, where the
//! dashboard, alarms and scaling of deploy/ read them. Building a document is pure (tested here);
//! `run` only samples the counters and writes.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::config::ServeConfig;
use crate::metrics::{interval_histogram, quantile, Metrics, Sample, Transport, TransportSample};
use crate::shutdown::ShutdownListener;

/// Where the documents go and what they are filed under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmfSettings {
    pub interval: Duration,
    pub namespace: String,
    pub service: String,
    pub environment: String,
}

impl EmfSettings {
    /// `None` when `--emf-interval` is unset.
    pub fn from_config(config: &ServeConfig) -> Option<Self> {
        let emf = &config.emf;
        Some(Self {
            interval: emf.emf_interval?,
            namespace: emf.emf_namespace.clone(),
            service: emf.emf_service.clone(),
            environment: emf.emf_environment.clone(),
        })
    }
}

/// The metrics of the main document, with their units: what deploy/ and README.md name.
pub const METRICS: &[(&str, &str)] = &[
    ("Connections", "Count"),
    ("MessagesIn", "Count"),
    ("MessagesOut", "Count"),
    ("Publishes", "Count"),
    ("Errors", "Count"),
    ("SlowDisconnects", "Count"),
    ("Rooms", "Count"),
    ("Subscriptions", "Count"),
    ("RegistryUp", "None"),
    ("Outbox", "Count"),
    ("Draining", "None"),
    ("DeliveryLatencyP50", "Milliseconds"),
    ("DeliveryLatencyP95", "Milliseconds"),
    ("DeliveryLatencyP99", "Milliseconds"),
];

/// The metrics of each per-transport document (dimension `Transport`).
pub const TRANSPORT_METRICS: &[(&str, &str)] = &[
    ("Connections", "Count"),
    ("MessagesIn", "Count"),
    ("MessagesOut", "Count"),
    ("SlowDisconnects", "Count"),
];

/// The documents for the interval from `before` to `now`: counters as what happened in the
/// interval, gauges as they are now, latency percentiles over the interval's deliveries (left
/// out of the document, directive included, when there were none). One main document
/// (dimensions Service, Environment) and one per transport (plus Transport).
pub fn documents(settings: &EmfSettings, before: &Sample, now: &Sample, timestamp_ms: u64) -> Vec<String> {
    let delta = |a: u64, b: u64| b.saturating_sub(a);
    // A counter's interval over every transport: each transport's own, summed.
    let interval = |counter: fn(&TransportSample) -> u64| {
        Transport::ALL
            .into_iter()
            .map(|t| delta(counter(&before.transports[t]), counter(&now.transports[t])))
            .sum::<u64>()
    };
    let mut values: Vec<(&str, Value)> = vec![
        ("Connections", json!(now.transports.sum_by(|t| t.connections))),
        ("MessagesIn", json!(interval(|t| t.messages_in))),
        ("MessagesOut", json!(interval(|t| t.messages_out))),
        (
            "Publishes",
            json!(
                delta(before.published_states, now.published_states)
                    + delta(before.published_events, now.published_events)
            ),
        ),
        ("Errors", json!(delta(before.errors, now.errors))),
        ("SlowDisconnects", json!(interval(|t| t.slow_disconnects))),
        ("Rooms", json!(now.rooms)),
        ("Subscriptions", json!(now.subscriptions)),
        ("RegistryUp", json!(now.registry_up)),
        ("Outbox", json!(now.outbox)),
        ("Draining", json!(now.draining)),
    ];
    let interval_buckets = interval_histogram(&before.latency, &now.latency);
    for (name, q) in [
        ("DeliveryLatencyP50", 0.50),
        ("DeliveryLatencyP95", 0.95),
        ("DeliveryLatencyP99", 0.99),
    ] {
        if let Some(seconds) = quantile(&interval_buckets, q) {
            values.push((name, json!((seconds * 1000.0 * 1000.0).round() / 1000.0)));
        }
    }
    let main = document(settings, None, METRICS, &values, timestamp_ms);
    let mut out = vec![main];
    for transport in Transport::ALL {
        let (b, n) = (&before.transports[transport], &now.transports[transport]);
        let values = [
            ("Connections", json!(n.connections)),
            ("MessagesIn", json!(delta(b.messages_in, n.messages_in))),
            ("MessagesOut", json!(delta(b.messages_out, n.messages_out))),
            ("SlowDisconnects", json!(delta(b.slow_disconnects, n.slow_disconnects))),
        ];
        out.push(document(
            settings,
            Some(transport.name()),
            TRANSPORT_METRICS,
            &values,
            timestamp_ms,
        ));
    }
    out
}

/// One EMF document: the `_aws` metadata naming the metrics present, the dimensions and the
/// values as members of the root.
fn document(
    settings: &EmfSettings,
    transport: Option<&str>,
    units: &[(&str, &str)],
    values: &[(&str, Value)],
    timestamp_ms: u64,
) -> String {
    let mut dimensions = vec!["Service", "Environment"];
    let mut root = Map::new();
    root.insert("Service".into(), json!(settings.service));
    root.insert("Environment".into(), json!(settings.environment));
    if let Some(transport) = transport {
        dimensions.push("Transport");
        root.insert("Transport".into(), json!(transport));
    }
    let metrics: Vec<Value> = units
        .iter()
        .filter(|(name, _)| values.iter().any(|(n, _)| n == name))
        .map(|(name, unit)| json!({"Name": name, "Unit": unit}))
        .collect();
    for (name, value) in values {
        root.insert((*name).into(), value.clone());
    }
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": settings.namespace,
                "Dimensions": [dimensions],
                "Metrics": metrics,
            }],
        }),
    );
    Value::Object(root).to_string()
}

/// Writes the documents every interval until the shutdown, and once more at its end.
pub async fn run(metrics: Arc<Metrics>, settings: EmfSettings, mut shutdown: ShutdownListener) {
    let mut before = Sample::of(&metrics);
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = shutdown.recv() => true,
        };
        let now = Sample::of(&metrics);
        let lines = documents(&settings, &before, &now, crate::clock::unix_ms());
        let mut out = std::io::stdout().lock();
        for line in lines {
            // Standard output gone (a closed pipe): nothing to report to.
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
        drop(out);
        before = now;
        if stopping {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> EmfSettings {
        EmfSettings {
            interval: Duration::from_secs(60),
            namespace: "Courtside".into(),
            service: "courtside".into(),
            environment: "test".into(),
        }
    }

    fn buckets(counts: &[u64]) -> Vec<(f64, u64)> {
        let mut bounds: Vec<f64> = (0..counts.len() - 1).map(|i| 0.001 * 2f64.powi(i as i32)).collect();
        bounds.push(f64::INFINITY);
        bounds.into_iter().zip(counts.iter().copied()).collect()
    }

    #[test]
    fn counters_report_the_interval_and_gauges_the_present() {
        let mut before = Sample {
            published_states: 7,
            latency: buckets(&[0, 0, 0]),
            ..Sample::default()
        };
        before.transports[Transport::WebSocket] = TransportSample {
            connections: 5,
            messages_in: 10,
            messages_out: 100,
            slow_disconnects: 1,
        };
        let mut now = Sample {
            published_states: 9,
            published_events: 1,
            errors: 4,
            registry_up: 1,
            latency: buckets(&[0, 0, 0]),
            ..Sample::default()
        };
        now.transports[Transport::WebSocket] = TransportSample {
            connections: 8,
            messages_in: 15,
            messages_out: 400,
            slow_disconnects: 1,
        };
        now.transports[Transport::WebTransport].connections = 2;
        let docs: Vec<Value> = documents(&settings(), &before, &now, 1_700_000_000_000)
            .iter()
            .map(|d| serde_json::from_str(d).expect("json"))
            .collect();
        assert_eq!(docs.len(), 3);
        let main = &docs[0];
        assert_eq!(
            (
                &main["Connections"],
                &main["MessagesIn"],
                &main["MessagesOut"],
                &main["Publishes"],
                &main["Errors"]
            ),
            (&json!(10), &json!(5), &json!(300), &json!(3), &json!(4))
        );
        assert!(main.get("DeliveryLatencyP99").is_none(), "no deliveries, no percentile");
        let named: Vec<&str> = main["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .expect("metrics")
            .iter()
            .map(|m| m["Name"].as_str().expect("name"))
            .collect();
        assert!(!named.contains(&"DeliveryLatencyP99") && named.contains(&"Connections"));
        assert_eq!(main["_aws"]["Timestamp"], 1_700_000_000_000u64);
        assert_eq!(
            (&docs[1]["Transport"], &docs[1]["Connections"]),
            (&json!("websocket"), &json!(8))
        );
        assert_eq!(
            docs[2]["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
            json!([["Service", "Environment", "Transport"]])
        );
    }

    #[test]
    fn percentiles_come_from_the_intervals_deliveries_alone() {
        // Before: 100 slow deliveries (in the 4-8 ms bucket); in the interval, 100 more of
        // which 90 are in the first bucket (under 1 ms) and 10 in the 1-2 ms one.
        let before = buckets(&[0, 0, 0, 100, 100]);
        let now = buckets(&[90, 100, 100, 200, 200]);
        let interval = interval_histogram(&before, &now);
        let p50 = quantile(&interval, 0.5).expect("p50");
        assert!((p50 - 0.5 * 0.001 / 0.9).abs() < 1e-9, "{p50}");
        let p99 = quantile(&interval, 0.99).expect("p99");
        assert!(p99 > 0.001 && p99 <= 0.002, "{p99}");
        assert_eq!(quantile(&buckets(&[0, 0]), 0.5), None);
        // Beyond the last finite bound: that bound.
        assert_eq!(quantile(&buckets(&[0, 0, 5]), 0.99), Some(0.002));
    }
}
