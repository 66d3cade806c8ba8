use serde_json::json;

use crate::util::{Seen, TestServer};

/// SIGTERM: clients get a reconnect notice and close 1012, health turns 503 while the drain
/// waits for them, new WebSocket upgrades are refused, and the process exits 0.
#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let mut server = TestServer::start(&["--drain-timeout", "20s"]);
    let mut client = server.connect().await;
    client.subscribe("game:1").await;
    server.publish_state("game:1", "1").await;

    server.sigterm();
    // What was published before the signal is still delivered, then the notice.
    assert_eq!(client.recv().await["type"], "state");
    assert_eq!(client.recv().await, json!({"type": "reconnect", "reason": "shutdown"}));
    // The server now waits for this client's close reply: it is draining.
    let (status, health) = server.get("/health").await;
    assert_eq!((status, health["status"].as_str()), (503, Some("draining")));
    let refused = tokio_tungstenite::connect_async(server.ws_url())
        .await
        .expect_err("upgrade refused while draining");
    match refused {
        tokio_tungstenite::tungstenite::Error::Http(response) => assert_eq!(response.status(), 503),
        other => panic!("unexpected {other:?}"),
    }
    match client.next_seen().await {
        Seen::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1012),
        other => panic!("expected close 1012, got {other:?}"),
    }
    // Reading on answers the close (tungstenite does), which lets the drain finish.
    assert!(matches!(client.next_seen().await, Seen::Ended));
    let status = server.wait_exit().await;
    assert_eq!(status.code(), Some(0));
    assert_eq!(server.logs_with("drained; every connection closed").len(), 1);
}

/// A client that never answers is dropped at the drain timeout; the exit is still 0.
#[tokio::test]
async fn the_drain_is_bounded() {
    let mut server = TestServer::start(&["--drain-timeout", "300ms"]);
    let mut stuck = server.connect().await;
    stuck.subscribe("game:1").await;
    server.sigterm();
    let status = server.wait_exit().await;
    assert_eq!(status.code(), Some(0));
    let abandoned = server.logs_with("drain timeout reached");
    assert_eq!(abandoned.len(), 1);
    assert_eq!(abandoned[0]["abandoned"], 1);
    drop(stuck);
}

/// Publishes accepted while Redis was away (202 `queued`) are not dropped by a shutdown: the
/// drain waits for Redis to take them, and a publish queued on the stopping node is in Redis
/// when it has exited.
#[tokio::test]
async fn the_drain_waits_for_redis_to_take_the_queued_publishes() {
    let mut redis = crate::util::RedisServer::start();
    let mut node = crate::cluster::node_with(&redis, "a", &["--drain-timeout", "20s"]);
    node.publish_state("game:queued", r#"{"n":1}"#).await;
    redis.kill();
    let (status, body) = node
        .request(
            "POST",
            "/v1/rooms/game:queued/state",
            Some(crate::util::TOKEN),
            r#"{"n":2}"#,
        )
        .await;
    assert_eq!((status, body["queued"].as_bool()), (202, Some(true)), "{body}");
    node.sigterm();
    crate::util::eventually("the drain says it waits for redis", || async {
        (!node
            .logs_with("waiting for redis to take the queued publishes")
            .is_empty())
        .then_some(())
    })
    .await;
    redis.restart_empty();
    assert_eq!(node.wait_exit().await.code(), Some(0));
    assert_eq!(node.logs_with("drained; every connection closed").len(), 1);
    let other = crate::cluster::node_with(&redis, "b", &[]);
    let (status, room) = other.get("/v1/rooms/game:queued").await;
    assert_eq!((status, room["state"]["data"]["n"].as_u64()), (200, Some(2)), "{room}");
}

/// A drain that ends with publishes still queued (Redis never came back) says they are lost.
#[tokio::test]
async fn a_drain_that_cannot_flush_the_outbox_says_what_is_lost() {
    let mut redis = crate::util::RedisServer::start();
    let mut node = crate::cluster::node_with(&redis, "a", &["--drain-timeout", "1s"]);
    redis.kill();
    let (status, _) = node
        .request("POST", "/v1/rooms/game:lost/events", Some(crate::util::TOKEN), r#""e""#)
        .await;
    assert_eq!(status, 202);
    node.sigterm();
    let _ = node.wait_exit().await;
    let lost = node.logs_with("they are lost");
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0]["unflushed"], 1);
}
