//! The operations page (`GET /ops`) and its figures (`GET /v1/ops`): credentials, this node's
//! figures as `/metrics` has them, and every node's through Redis.

use bytes::Bytes;
use serde_json::{json, Value};

use crate::tokens::token;
use crate::util::{eventually, request, RedisServer, TestServer, TOKEN};

/// `GET /v1/ops` with these headers: status, headers, JSON body.
async fn ops(server: &TestServer, path: &str, headers: &[(&str, &str)]) -> (u16, hyper::HeaderMap, Bytes) {
    request(server.http, "GET", path, None, headers, Bytes::new()).await
}

fn basic(password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("operator:{password}"))
    )
}

/// Without credentials, the page and its figures answer 401 with a `Basic` challenge (a browser
/// asks for the token) and nothing of the node; a subscriber's JWT gets 403; the publish token
/// (Bearer or as the Basic password) and a JWT with `"ops": true` get them.
#[tokio::test]
async fn the_operations_page_needs_the_publish_token_or_an_ops_token() {
    let server = TestServer::start(&["--no-wt", "--jwt-secret", "jwt-test-secret"]);
    for path in ["/ops", "/v1/ops"] {
        let (status, headers, body) = ops(&server, path, &[]).await;
        let body: Value = serde_json::from_slice(&body).expect("json error");
        assert_eq!((status, body["error"].as_str()), (401, Some("unauthorized")), "{path}");
        let challenge = headers.get("www-authenticate").and_then(|v| v.to_str().ok());
        assert!(
            challenge.is_some_and(|c| c.starts_with("Basic realm=")),
            "{path}: {challenge:?}"
        );
        let wrong = basic("not-the-token");
        assert_eq!(ops(&server, path, &[("authorization", &wrong)]).await.0, 401, "{path}");
    }
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 600;
    let fan = format!("Bearer {}", token(json!({"sub": "55", "exp": exp})));
    assert_eq!(ops(&server, "/v1/ops", &[("authorization", &fan)]).await.0, 403);
    let operator = format!("Bearer {}", token(json!({"sub": "ops-1", "exp": exp, "ops": true})));
    let bearer = format!("Bearer {TOKEN}");
    let basic_token = basic(TOKEN);
    for credentials in [&operator, &bearer, &basic_token] {
        let (status, _, _) = ops(&server, "/v1/ops", &[("authorization", credentials)]).await;
        assert_eq!(status, 200, "{credentials}");
    }
    let (status, headers, page) = ops(&server, "/ops", &[("authorization", &basic_token)]).await;
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("text/html; charset=utf-8")
    );
    assert!(String::from_utf8_lossy(&page).contains("Courtside operations"));
}

/// This node's figures, once its first interval is sampled: connections and subscriptions as the
/// node counts them, the publishes and deliveries it made, its busiest room, the registry.
#[tokio::test]
async fn the_figures_are_the_nodes_own() {
    let server = TestServer::start(&["--no-wt"]);
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut client = server.connect().await;
        client.subscribe("game:busy").await;
        clients.push(client);
    }
    let mut quiet = server.connect().await;
    quiet.subscribe("game:quiet").await;
    server.publish_state("game:busy", r#"{"home":1}"#).await;
    let bearer = format!("Bearer {TOKEN}");
    let figures = eventually("a summary after the publish was delivered", || async {
        let (status, _, body) = ops(&server, "/v1/ops", &[("authorization", &bearer)]).await;
        assert_eq!(status, 200);
        let body: Value = serde_json::from_slice(&body).ok()?;
        let delivered = body["node"]["totals"]["deliveries"]["websocket"].as_u64()?;
        (delivered >= 3).then_some(body)
    })
    .await;
    let node = &figures["node"];
    assert_eq!(node["node"], "local");
    assert_eq!(node["connections"], json!({"websocket": 4, "webtransport": 0}));
    assert_eq!(
        (node["rooms"].as_i64(), node["subscriptions"].as_i64()),
        (Some(2), Some(4))
    );
    assert_eq!(
        node["registry"],
        json!({"kind": "embedded", "status": "ok", "outbox": 0, "rooms_down": 0})
    );
    assert_eq!(node["busiest_rooms"][0]["room"], "game:busy");
    assert_eq!(node["busiest_rooms"][0]["subscribers"], 3);
    assert_eq!(node["busiest_rooms"][1]["room"], "game:quiet");
    assert!(node["totals"]["publishes"].as_u64() >= Some(1), "{node}");
    // The same figures as the exposition (nothing moves in this test any more).
    let metrics = server.scrape().await;
    let exposed = crate::util::metric_value(&metrics, r#"courtside_connections{transport="websocket"}"#);
    assert_eq!(exposed, Some(4.0));
    assert_eq!(
        figures["nodes"],
        json!([{
            "id": "local", "http": "", "connections": 4, "subscriptions": 4, "rooms": 2,
            "ops": figures["nodes"][0]["ops"].clone(),
        }])
    );
    assert_eq!(figures["nodes"][0]["ops"]["node"], "local", "{figures}");
    assert_eq!(figures["kpi_ms"], json!({"p50": 100, "p95": 500, "p99": 1000}));
}

/// With Redis, each node's page lists every node (three here) with the summary its heartbeat
/// shared.
#[tokio::test]
async fn every_node_of_the_cluster_is_on_the_page() {
    let redis = RedisServer::start();
    let start = |id: &str| {
        TestServer::start(&[
            "--no-wt",
            "--redis",
            &redis.url(),
            "--node-id",
            id,
            "--node-heartbeat",
            "200ms",
        ])
    };
    let (a, b, _c) = (start("ops-a"), start("ops-b"), start("ops-c"));
    let mut client = b.connect().await;
    client.subscribe("game:seen").await;
    let bearer = format!("Bearer {TOKEN}");
    let nodes = eventually("the three nodes with their summaries, b with its client", || async {
        let (_, _, body) = ops(&a, "/v1/ops", &[("authorization", &bearer)]).await;
        let body: Value = serde_json::from_slice(&body).ok()?;
        let nodes = body["nodes"].as_array()?.clone();
        let b_seen = nodes
            .iter()
            .any(|n| n["id"] == "ops-b" && n["ops"]["connections"]["websocket"] == 1);
        let all_seen = ["ops-a", "ops-b", "ops-c"]
            .iter()
            .all(|id| nodes.iter().any(|n| n["id"] == *id && n["ops"]["node"] == *id));
        (nodes.len() == 3 && all_seen && b_seen).then_some(nodes)
    })
    .await;
    let b_summary = &nodes.iter().find(|n| n["id"] == "ops-b").expect("b")["ops"];
    assert_eq!(b_summary["registry"]["kind"], "redis");
    assert_eq!(b_summary["subscriptions"], 1);
}
