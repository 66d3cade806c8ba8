use serde_json::{json, Value};

use crate::util::{Client, TestServer, TOKEN};

#[tokio::test]
async fn subscribe_then_publish_delivers_the_state() {
    let server = TestServer::start(&[]);
    let mut client = server.connect().await;
    let subscribed = client.subscribe("game:1234").await;
    assert_eq!(
        (subscribed["version"].as_u64(), subscribed["seq"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(subscribed["epoch"].as_str().is_some_and(|e| !e.is_empty()));

    let receipt = server
        .publish_state("game:1234", r#"{"home":42,"away":40,"clock":"Q4 1:02"}"#)
        .await;
    assert_eq!(receipt["version"], 1);
    let state = client.recv().await;
    assert_eq!(state["type"], "state");
    assert_eq!(state["room"], "game:1234");
    assert_eq!(state["version"], 1);
    assert_eq!(state["ts"], receipt["ts"]);
    assert_eq!(state["data"], json!({"home": 42, "away": 40, "clock": "Q4 1:02"}));
}

#[tokio::test]
async fn a_new_subscriber_gets_the_current_state_at_once() {
    let server = TestServer::start(&[]);
    server.publish_state("league:12", r#"{"standings":[1,2,3]}"#).await;
    server.publish_state("league:12", r#"{"standings":[3,2,1]}"#).await;
    let mut client = server.connect().await;
    let subscribed = client.subscribe("league:12").await;
    assert_eq!(subscribed["version"], 2);
    let state = client.recv().await;
    assert_eq!(
        (state["type"].as_str(), state["version"].as_u64()),
        (Some("state"), Some(2))
    );
    assert_eq!(state["data"], json!({"standings": [3, 2, 1]}));
}

#[tokio::test]
async fn the_published_data_arrives_byte_for_byte() {
    let server = TestServer::start(&[]);
    let mut client = server.connect().await;
    client.subscribe("game:1").await;
    let data = r#"{"b": 1.50, "a": [ 1, 2 ], "s": "é\u00e9"}"#;
    server.publish_state("game:1", data).await;
    let frame = client.recv_text().await;
    assert!(frame.ends_with(&format!(r#""data":{data}}}"#)), "{frame}");
}

/// A reader that stops reading while a room's state changes many times ends on the newest
/// version, with versions only ever increasing, and receives far fewer frames than published.
#[tokio::test]
async fn a_slow_reader_conflates_and_ends_on_the_newest_version() {
    let server = TestServer::start(&["--max-body", "33554432"]);
    let mut slow = server.connect().await;
    slow.subscribe("game:7").await;
    // 1,500 states of 32 KiB: 48 MiB, far more than the socket buffers hold, so the
    // server's writer blocks and the queue must conflate.
    let padding = "x".repeat(32 * 1024);
    const TOTAL: u64 = 1500;
    for chunk in 0..(TOTAL / 100) {
        let messages: Vec<Value> = (0..100)
            .map(|i| json!({"room": "game:7", "type": "state", "data": {"n": chunk * 100 + i + 1, "pad": padding}}))
            .collect();
        let (status, body) = server
            .request(
                "POST",
                "/v1/publish",
                Some(TOKEN),
                json!({ "messages": messages }).to_string(),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let mut versions = Vec::new();
    while versions.last() != Some(&TOTAL) {
        let state = slow.recv().await;
        let version = state["version"].as_u64().expect("version");
        assert_eq!(state["data"]["n"].as_u64(), Some(version));
        if let Some(last) = versions.last() {
            assert!(version > *last, "version went from {last} to {version}");
        }
        versions.push(version);
    }
    assert!(
        versions.len() < TOTAL as usize,
        "no conflation: {} frames",
        versions.len()
    );
    server
        .await_metric("courtside_conflated_total", "> 0", |v| v > 0.0)
        .await;
}

#[tokio::test]
async fn events_arrive_in_order_and_since_recovers_missed_ones() {
    let server = TestServer::start(&[]);
    for i in 1..=5 {
        assert_eq!(
            server.publish_event("bracket:77", &format!(r#"{{"round":{i}}}"#)).await["seq"],
            i
        );
    }
    let mut client = server.connect().await;
    client
        .send(json!({"type": "subscribe", "room": "bracket:77", "since": 2}))
        .await;
    let subscribed = client.recv().await;
    assert_eq!(subscribed["type"], "subscribed");
    assert_eq!(subscribed["recovered"], true);
    assert_eq!(subscribed["seq"], 5);
    for seq in 3..=5 {
        let event = client.recv().await;
        assert_eq!(
            (event["type"].as_str(), event["seq"].as_u64()),
            (Some("event"), Some(seq))
        );
        assert_eq!(event["data"]["round"], seq);
    }
    for i in 6..=20 {
        server.publish_event("bracket:77", &format!(r#"{{"round":{i}}}"#)).await;
    }
    for seq in 6..=20 {
        assert_eq!(client.recv().await["seq"], seq);
    }

    // The same recovery with the epoch the client saw.
    let epoch = subscribed["epoch"].as_str().expect("epoch");
    let mut again = server.connect().await;
    again
        .send(json!({"type": "subscribe", "room": "bracket:77", "since": 19, "epoch": epoch}))
        .await;
    assert_eq!(again.recv().await["recovered"], true);
    assert_eq!(again.recv().await["seq"], 20);
}

#[tokio::test]
async fn recovery_fails_beyond_the_history_or_for_another_epoch() {
    let server = TestServer::start(&["--history-size", "3"]);
    for i in 1..=10 {
        server.publish_event("bracket:55", &i.to_string()).await;
    }
    for (last_seq, subscribe) in [10, 11].into_iter().zip([
        json!({"type": "subscribe", "room": "bracket:55", "since": 2}),
        json!({"type": "subscribe", "room": "bracket:55", "since": 9, "epoch": "not-the-epoch"}),
    ]) {
        let mut client = server.connect().await;
        client.send(subscribe).await;
        let subscribed = client.recv().await;
        assert_eq!(subscribed["type"], "subscribed");
        assert_eq!(subscribed["recovered"], false, "{subscribed}");
        assert_eq!(subscribed["seq"], last_seq);
        // Nothing was replayed: the next frame is the next live event.
        server.publish_event("bracket:55", "0").await;
        let next = client.recv().await;
        assert_eq!(
            (next["type"].as_str(), next["seq"].as_u64()),
            (Some("event"), Some(last_seq + 1))
        );
    }
    // The refetch path: the history endpoint says the same.
    let (status, body) = server.get("/v1/rooms/bracket:55/events?since=2").await;
    assert_eq!(status, 410, "{body}");
    assert_eq!(body["error"], "history_gone");
    let (status, body) = server.get("/v1/rooms/bracket:55/events?since=9").await;
    assert_eq!(status, 200);
    let seqs: Vec<u64> = body["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .collect();
    assert_eq!(seqs, vec![10, 11, 12]);
}

/// A subscriber that stops reading while ordered events pile up is closed with 4001;
/// a fast subscriber in the same room receives every event, in order.
#[tokio::test]
async fn an_overflowing_event_subscriber_is_closed_as_slow_and_others_get_everything() {
    let server = TestServer::start(&["--queue-messages", "16", "--write-timeout", "120s"]);
    let mut slow = server.connect().await;
    slow.subscribe("bracket:1").await;
    let mut fast = server.connect().await;
    fast.subscribe("bracket:1").await;
    const TOTAL: u64 = 600;
    let fast_reader = tokio::spawn(async move {
        let mut seqs = Vec::new();
        while seqs.len() < TOTAL as usize {
            seqs.push(fast.recv().await["seq"].as_u64().expect("seq"));
        }
        seqs
    });
    // 600 events of 64 KiB (38 MiB): more than the slow client's socket buffers hold.
    let padding = "y".repeat(64 * 1024);
    for i in 1..=TOTAL {
        server
            .publish_event("bracket:1", &json!({"n": i, "pad": padding}).to_string())
            .await;
    }
    assert_eq!(fast_reader.await.expect("fast reader"), (1..=TOTAL).collect::<Vec<_>>());
    assert_eq!(slow.close_code().await, 4001);
    server
        .await_count("courtside_slow_disconnects_total{transport=\"websocket\"}", 1.0)
        .await;
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let server = TestServer::start(&[]);
    let mut client = server.connect().await;
    client.subscribe("game:1").await;
    client.subscribe("game:2").await;
    client.send(json!({"type": "unsubscribe", "room": "game:1"})).await;
    assert_eq!(client.recv().await, json!({"type": "unsubscribed", "room": "game:1"}));
    server.publish_state("game:1", "1").await;
    server.publish_state("game:2", "2").await;
    let next = client.recv().await;
    assert_eq!(next["room"], "game:2", "{next}");
}

#[tokio::test]
async fn ping_gets_pong() {
    let server = TestServer::start(&[]);
    let mut client = server.connect().await;
    client.send(json!({"type": "ping"})).await;
    assert_eq!(client.recv().await, json!({"type": "pong"}));
}

#[tokio::test]
async fn subscriber_counts_follow_connections() {
    let server = TestServer::start(&[]);
    let mut a = server.connect().await;
    let mut b = Client::connect(&server.ws_url()).await;
    a.subscribe("team:301").await;
    b.subscribe("team:301").await;
    server.publish_state("team:301", "{}").await;
    assert_eq!(server.get("/v1/rooms/team:301").await.1["subscribers"], 2);
    assert_eq!(b.recv().await["type"], "state");
    b.send(json!({"type": "unsubscribe", "room": "team:301"})).await;
    assert_eq!(b.recv().await["type"], "unsubscribed");
    assert_eq!(server.get("/v1/rooms/team:301").await.1["subscribers"], 1);
}

/// A subscribe with an `id` gets it back in `subscribed`, on both transports, so a client tells
/// its replies from unrequested notices (which never carry one); without an id there is none.
#[tokio::test]
async fn subscribed_echoes_the_request_id() {
    let server = crate::util::TestServer::start(&[]);
    let mut ws = server.connect().await;
    ws.send(serde_json::json!({"type": "subscribe", "room": "game:id", "id": 41}))
        .await;
    let reply = ws.recv().await;
    assert_eq!(
        (reply["type"].as_str(), reply["id"].as_u64()),
        (Some("subscribed"), Some(41)),
        "{reply}"
    );
    ws.send(serde_json::json!({"type": "subscribe", "room": "game:id2"}))
        .await;
    let reply = ws.recv().await;
    assert!(reply.get("id").is_none(), "{reply}");
    let mut wt = crate::util::WtClient::connect(&server).await;
    wt.send(serde_json::json!({"type": "subscribe", "room": "game:id", "id": 42}))
        .await;
    let reply = wt.recv_stream().await;
    assert_eq!(
        (reply["type"].as_str(), reply["id"].as_u64()),
        (Some("subscribed"), Some(42)),
        "{reply}"
    );
}
