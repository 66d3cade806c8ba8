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

/// The documents on `server`'s standard output so far, parsed: the main ones (no `Transport`
/// dimension) and the per-transport ones.
fn documents(server: &TestServer) -> (Vec<Value>, Vec<Value>) {
    server
        .stdout_lines()
        .iter()
        .map(|line| serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .partition(|doc| doc.get("Transport").is_none())
}

/// The sum of a counter over documents (each counts what happened in its interval).
fn sum(documents: &[Value], name: &str) -> u64 {
    documents.iter().map(|d| d[name].as_u64().unwrap_or(0)).sum()
}

/// `--emf-interval`: every line on standard output is an EMF document, the main one names every
/// documented metric (the latency percentiles once something was delivered), and the values
/// follow what happened: connections now, deliveries and publishes in the interval.
#[tokio::test]
async fn emf_documents_on_standard_output_follow_the_specification() {
    let mut server = TestServer::start(&[
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
    // The subscribe, the publish and the two messages out (the reply, the event) may fall in
    // different intervals, and the server counts a delivery after writing it: await the sums
    // over the documents, and the document of the interval that saw the delivery.
    let (mains, delivered) = crate::util::eventually(
        "main documents with the subscribe, the publish and the delivery",
        || async {
            let (mains, _) = documents(&server);
            let delivered = mains.iter().find(|d| d.get("DeliveryLatencyP99").is_some())?.clone();
            (sum(&mains, "MessagesIn") >= 1 && sum(&mains, "Publishes") >= 1 && sum(&mains, "MessagesOut") >= 2)
                .then_some((mains, delivered))
        },
    )
    .await;
    assert_eq!(
        (
            sum(&mains, "MessagesIn"),
            sum(&mains, "Publishes"),
            sum(&mains, "MessagesOut")
        ),
        (1, 1, 2)
    );
    assert_eq!(delivered["Connections"], 1, "{delivered}");
    assert_eq!(
        (&delivered["Service"], &delivered["Environment"]),
        (&"courtside".into(), &"ci".into())
    );
    assert_eq!(delivered["_aws"]["CloudWatchMetrics"][0]["Namespace"], "CourtsideTest");
    assert!(delivered["DeliveryLatencyP99"].as_f64().expect("p99 after a delivery") >= 0.0);
    let names: HashSet<String> = check_emf(&delivered.to_string()).into_iter().collect();
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
    // Each tick writes the main document, then one per transport.
    let websocket_out = |per_transport: &[Value]| {
        let websocket: Vec<Value> = per_transport
            .iter()
            .filter(|d| d["Transport"] == "websocket")
            .cloned()
            .collect();
        sum(&websocket, "MessagesOut")
    };
    crate::util::eventually(
        "a document for each transport, the websocket ones with the delivery",
        || async {
            let (_, per_transport) = documents(&server);
            let transports: HashSet<&str> = per_transport.iter().filter_map(|d| d["Transport"].as_str()).collect();
            (transports == HashSet::from(["websocket", "webtransport"]) && websocket_out(&per_transport) >= 2)
                .then_some(())
        },
    )
    .await;
    // Every line the process wrote, read to the end after it exited, is a document, and nothing
    // was counted twice. (The fan leaves first, so the shutdown has no one to notify.)
    fan.ws.close(None).await.expect("close");
    server
        .await_metric("courtside_connections{transport=\"websocket\"}", "= 0", |v| v == 0.0)
        .await;
    server.sigterm();
    assert_eq!(server.wait_exit().await.code(), Some(0));
    for line in server.stdout_lines() {
        check_emf(&line);
    }
    let (mains, per_transport) = documents(&server);
    assert_eq!(
        (
            sum(&mains, "MessagesIn"),
            sum(&mains, "Publishes"),
            sum(&mains, "MessagesOut"),
            websocket_out(&per_transport)
        ),
        (1, 1, 2, 2)
    );
}

/// Without `--emf-interval`, standard output stays empty (logs are on standard error): read to
/// the end once the process has exited.
#[tokio::test]
async fn without_emf_standard_output_is_empty() {
    let mut server = TestServer::start(&[]);
    server.publish_event("game:quiet", "1").await;
    let _ = server.get("/health").await;
    server.sigterm();
    assert_eq!(server.wait_exit().await.code(), Some(0));
    assert!(server.stdout_lines().is_empty(), "{:?}", server.stdout_lines());
}
