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
