use std::collections::HashSet;

use serde_json::Value;

use crate::util::TestServer;

/// The units CloudWatch takes (the EMF specification's `Unit` values).
const UNITS: &[&str] = &[
    "Seconds",
    "Microseconds",
    "Milliseconds",
    "Bytes",
    "Kilobytes",
    "Megabytes",
    "Gigabytes",
    "Terabytes",
    "Bits",
    "Kilobits",
    "Megabits",
    "Gigabits",
    "Terabits",
    "Percent",
    "Count",
    "Bytes/Second",
    "Kilobytes/Second",
    "Megabytes/Second",
    "Gigabytes/Second",
    "Terabytes/Second",
    "Bits/Second",
    "Kilobits/Second",
    "Megabits/Second",
    "Gigabits/Second",
    "Terabits/Second",
    "Count/Second",
    "None",
];

/// Checks one line against the Embedded Metric Format specification: a JSON object whose `_aws`
/// member has an integer `Timestamp` (ms) and `CloudWatchMetrics` directives, each with a
/// `Namespace` (1-255 characters), `Dimensions` (arrays of at most 30 names, each a string member
/// of the root) and `Metrics` (1-100, each with a `Name` that is a number member of the root, or
/// an array of at most 100 numbers, and a valid `Unit`). Returns the metric names.
fn check_emf(line: &str) -> Vec<String> {
    let doc: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    let root = doc.as_object().expect("a JSON object");
    let aws = root["_aws"].as_object().expect("_aws object");
    let ts = aws["Timestamp"].as_u64().expect("Timestamp: an integer");
    assert!(ts > 1_600_000_000_000, "Timestamp in milliseconds: {ts}");
    let directives = aws["CloudWatchMetrics"].as_array().expect("CloudWatchMetrics array");
    assert!(!directives.is_empty());
    let mut names = Vec::new();
    for directive in directives {
        let namespace = directive["Namespace"].as_str().expect("Namespace");
        assert!((1..=255).contains(&namespace.len()));
        for set in directive["Dimensions"].as_array().expect("Dimensions") {
            let set = set.as_array().expect("a dimension set");
            assert!(set.len() <= 30);
            for dimension in set {
                let dimension = dimension.as_str().expect("a dimension name");
                let value = root[dimension]
                    .as_str()
                    .unwrap_or_else(|| panic!("dimension {dimension} as a string member"));
                assert!(!value.is_empty() && value.len() <= 1024);
            }
        }
        let metrics = directive["Metrics"].as_array().expect("Metrics");
        assert!((1..=100).contains(&metrics.len()));
        for metric in metrics {
            let name = metric["Name"].as_str().expect("Name");
            assert!((1..=255).contains(&name.len()));
            let unit = metric["Unit"].as_str().expect("Unit");
            assert!(UNITS.contains(&unit), "unit {unit}");
            match &root[name] {
                Value::Number(_) => {}
                Value::Array(values) => assert!(values.len() <= 100 && values.iter().all(Value::is_number)),
                other => panic!("metric {name} is not a number member: {other}"),
            }
            names.push(name.to_string());
        }
    }
    names
}

/// `--emf-interval`: every line on standard output is an EMF document, the main one names every
/// documented metric (the latency percentiles once something was delivered), and the values
/// follow what happened: connections now, deliveries and publishes in the interval.
#[tokio::test]
async fn emf_documents_on_standard_output_follow_the_specification() {
    let server = TestServer::start(&[
        "--emf-interval",
        "200ms",
        "--emf-namespace",
        "CourtsideTest",
        "--emf-environment",
        "ci",
    ]);
    let mut fan = server.connect().await;
    fan.subscribe("game:emf").await;
    server.publish_event("game:emf", "1").await;
    assert_eq!(fan.recv().await["type"], "event");
    let main = crate::util::eventually("a main document with the delivery", || async {
        server.stdout_lines().into_iter().find_map(|line| {
            let doc: Value = serde_json::from_str(&line).ok()?;
            (doc.get("Transport").is_none() && doc["MessagesOut"].as_u64()? >= 1).then_some(doc)
        })
    })
    .await;
    assert_eq!(main["Connections"], 1);
    assert_eq!(main["Publishes"], 1);
    assert_eq!(
        (&main["Service"], &main["Environment"]),
        (&"courtside".into(), &"ci".into())
    );
    assert_eq!(main["_aws"]["CloudWatchMetrics"][0]["Namespace"], "CourtsideTest");
    assert!(main["DeliveryLatencyP99"].as_f64().expect("p99 after a delivery") >= 0.0);
    let names: HashSet<String> = check_emf(&main.to_string()).into_iter().collect();
    for name in [
        "Connections",
        "MessagesIn",
        "MessagesOut",
        "Publishes",
        "Errors",
        "SlowDisconnects",
        "RegistryUp",
        "Outbox",
        "DeliveryLatencyP50",
        "DeliveryLatencyP95",
        "DeliveryLatencyP99",
    ] {
        assert!(names.contains(name), "{name} missing from {names:?}");
    }
    let lines = server.stdout_lines();
    let mut transports = HashSet::new();
    for line in &lines {
        check_emf(line);
        let doc: Value = serde_json::from_str(line).expect("json");
        if let Some(t) = doc["Transport"].as_str() {
            transports.insert(t.to_string());
        }
    }
    assert_eq!(
        transports,
        HashSet::from(["websocket".to_string(), "webtransport".to_string()])
    );
}

/// Without `--emf-interval`, standard output stays empty (logs are on standard error).
#[tokio::test]
async fn without_emf_standard_output_is_empty() {
    let server = TestServer::start(&[]);
    server.publish_event("game:quiet", "1").await;
    let _ = server.get("/health").await;
    assert!(server.stdout_lines().is_empty(), "{:?}", server.stdout_lines());
}
