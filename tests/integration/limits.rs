use bytes::Bytes;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::util::{request, Client, Seen, TestServer, HANG, TOKEN};

/// Each bad frame gets an error with its documented code; the connection keeps working and
/// another client in the same room notices nothing.
#[tokio::test]
async fn bad_frames_get_error_codes_and_the_connection_keeps_working() {
    let server = TestServer::start(&[]);
    let mut bystander = server.connect().await;
    bystander.subscribe("game:1").await;
    let mut client = server.connect().await;
    client.subscribe("game:1").await;

    let cases: [(&str, u64); 8] = [
        ("{not json", 100),
        ("[1,2,3]", 100),
        (r#"{"type":"subscribe"}"#, 100),
        (r#"{"type":"subscribe","room":"game:1","since":-4}"#, 100),
        (r#"{"type":"publish","room":"game:1"}"#, 101),
        (r#"{"room":"game:1"}"#, 101),
        (r#"{"type":"subscribe","room":"no spaces allowed"}"#, 102),
        (&format!(r#"{{"type":"subscribe","room":"{}"}}"#, "x".repeat(129)), 102),
    ];
    for (text, code) in cases {
        client.send_text(text).await;
        let error = client.recv().await;
        assert_eq!(error["type"], "error", "{text}");
        assert_eq!(error["code"].as_u64(), Some(code), "{text}: {error}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    client.ws.send(Message::binary(vec![1u8, 2, 3])).await.expect("send");
    assert_eq!(client.recv().await["code"], 106);

    client.send(json!({"type": "ping"})).await;
    assert_eq!(client.recv().await["type"], "pong");
    server.publish_state("game:1", "1").await;
    assert_eq!(client.recv().await["version"], 1);
    assert_eq!(bystander.recv().await["version"], 1);
    server
        .await_count("courtside_errors_total{code=\"100\",name=\"bad_request\"}", 4.0)
        .await;
}

#[tokio::test]
async fn too_many_subscriptions_get_an_error() {
    let server = TestServer::start(&["--max-subscriptions", "2"]);
    let mut client = server.connect().await;
    client.subscribe("a").await;
    client.subscribe("b").await;
    client.subscribe("a").await; // resubscribing does not count twice
    client.send(json!({"type": "subscribe", "room": "c"})).await;
    let error = client.recv().await;
    assert_eq!(
        (error["type"].as_str(), error["code"].as_u64()),
        (Some("error"), Some(103))
    );
    assert_eq!(error["room"], "c");
    client.send(json!({"type": "unsubscribe", "room": "b"})).await;
    assert_eq!(client.recv().await["type"], "unsubscribed");
    client.subscribe("c").await;
}

/// A message over 1 MiB (the default limit) closes the connection with 1009; others go on.
#[tokio::test]
async fn a_frame_over_one_mebibyte_closes_with_1009() {
    let server = TestServer::start(&[]);
    let mut bystander = server.connect().await;
    bystander.subscribe("game:1").await;
    let mut client = server.connect().await;
    let big = format!(r#"{{"type":"ping","pad":"{}"}}"#, "z".repeat(1 << 20));
    // Sending may fail part-way once the server closes; the close code is what matters.
    let _ = client.ws.send(Message::text(big)).await;
    assert_eq!(client.close_code().await, 1009);

    // Exactly at the limit is accepted.
    let mut fits = server.connect().await;
    let pad = (1 << 20) - r#"{"type":"ping","pad":""}"#.len();
    fits.send_text(&format!(r#"{{"type":"ping","pad":"{}"}}"#, "z".repeat(pad)))
        .await;
    assert_eq!(fits.recv().await["type"], "pong");

    server.publish_state("game:1", "1").await;
    assert_eq!(bystander.recv().await["version"], 1);
}

/// A client that never answers pings is closed with 4002 after the idle timeout.
#[tokio::test]
async fn a_silent_peer_is_closed_after_the_idle_timeout() {
    let server = TestServer::start(&["--ping-interval", "100ms", "--idle-timeout", "300ms"]);
    let mut silent = server.connect().await;
    // Not reading means tungstenite never answers the pings: the server hears nothing. Read only
    // once the server counted the close.
    server
        .await_count("courtside_errors_total{code=\"4002\",name=\"idle_timeout\"}", 1.0)
        .await;
    assert_eq!(silent.close_code().await, 4002);
}

/// A client that keeps answering pings stays connected past the idle timeout. Shown by ordering,
/// not by the clock: a silent client that connected after it is closed by the timeout first,
/// and the answering one still answers after that.
#[tokio::test]
async fn a_peer_that_answers_pings_stays() {
    use futures_util::StreamExt;
    let server = TestServer::start(&["--ping-interval", "200ms", "--idle-timeout", "3s"]);
    let mut client = server.connect().await;
    // Reading answers pings (tungstenite queues the pong and flushes it with the next read).
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        let mut pings = 0;
        loop {
            tokio::select! {
                _ = &mut stopped => return (client, pings),
                frame = client.ws.next() => match frame {
                    Some(Ok(Message::Ping(_))) => pings += 1,
                    other => panic!("unexpected {other:?}"),
                },
            }
        }
    });
    let mut silent = server.connect().await;
    server
        .await_count("courtside_errors_total{code=\"4002\",name=\"idle_timeout\"}", 1.0)
        .await;
    assert_eq!(silent.close_code().await, 4002);
    let _ = stop.send(());
    let (mut client, pings) = reader.await.expect("the reader");
    assert!(pings >= 1, "the server pinged the answering client");
    client.send(json!({"type": "ping"})).await;
    assert_eq!(client.recv().await["type"], "pong");
    assert_eq!(
        server
            .metric("courtside_errors_total{code=\"4002\",name=\"idle_timeout\"}")
            .await,
        1.0,
        "only the silent client was closed for silence"
    );
}

/// A connection that does not complete its upgrade request in time is dropped.
#[tokio::test]
async fn an_unfinished_upgrade_is_dropped() {
    let server = TestServer::start(&["--upgrade-timeout", "300ms"]);
    let mut stream = TcpStream::connect(server.http).await.expect("connect");
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    // The server closes the connection: read reaches EOF (possibly after a 408 response).
    tokio::time::timeout(HANG, stream.read_to_end(&mut buf))
        .await
        .expect("server closed the connection")
        .ok();
    let text = String::from_utf8_lossy(&buf);
    assert!(!text.contains("101"), "{text}");
}

#[tokio::test]
async fn the_origin_allowlist_refuses_other_origins() {
    let server = TestServer::start(&["--allowed-origins", "https://scores.example,https://other.example"]);
    let mut request = server.ws_url().into_client_request().expect("request");
    request
        .headers_mut()
        .insert("origin", "https://evil.example".parse().expect("header"));
    let error = tokio_tungstenite::connect_async(request).await.expect_err("refused");
    match error {
        tokio_tungstenite::tungstenite::Error::Http(response) => assert_eq!(response.status(), 403),
        other => panic!("unexpected {other:?}"),
    }
    let mut request = server.ws_url().into_client_request().expect("request");
    request
        .headers_mut()
        .insert("origin", "https://other.example".parse().expect("header"));
    let (ws, _) = tokio_tungstenite::connect_async(request).await.expect("allowed origin");
    let mut client = Client { ws };
    client.subscribe("game:1").await;
    // Clients without an Origin header (not browsers) are allowed.
    server.connect().await.subscribe("game:1").await;
}

#[tokio::test]
async fn a_plain_get_on_the_websocket_path_is_refused() {
    let server = TestServer::start(&[]);
    let (status, _, body) = request(server.http, "GET", "/ws", None, &[], Bytes::new()).await;
    assert_eq!(status, 426);
    assert!(String::from_utf8_lossy(&body).contains("upgrade_required"));
}

/// RFC 6455 section 4.2.1: a key that is not 16 bytes in base64 gets 400 `bad_websocket_key`
/// (an empty key or `!!!!` got 101 before); a good one still upgrades.
#[tokio::test]
async fn a_websocket_key_that_is_not_16_bytes_in_base64_is_refused() {
    let server = TestServer::start(&["--no-wt"]);
    let upgrade = [
        ("upgrade", "websocket"),
        ("connection", "upgrade"),
        ("sec-websocket-version", "13"),
    ];
    for key in ["", "!!!!", "dGhlIHNhbXBsZSBub25jZQ", "dGhlIHNhbXBsZSBub25jZQ==="] {
        let mut headers = upgrade.to_vec();
        headers.push(("sec-websocket-key", key));
        let (status, _, body) = request(server.http, "GET", "/ws", None, &headers, Bytes::new()).await;
        let body: serde_json::Value = serde_json::from_slice(&body).expect("a JSON error");
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("bad_websocket_key")),
            "key {key:?}"
        );
    }
    server.connect().await.subscribe("game:1").await;
}

#[tokio::test]
async fn commands_beyond_the_rate_limit_get_104() {
    // A refill of one command per 1,000 s: however slowly the pings arrive, the fourth is over.
    let server = TestServer::start(&["--command-rate", "0.001", "--command-burst", "3"]);
    let mut client = server.connect().await;
    for _ in 0..4 {
        client.send(json!({"type": "ping"})).await;
    }
    for _ in 0..3 {
        assert_eq!(client.recv().await["type"], "pong");
    }
    assert_eq!(client.recv().await["code"], 104);
}

/// A client that keeps sending over its command rate gets one 104, then no answer for a burst's
/// worth of messages more, then close 1008: messages over the rate cost the server no answers.
#[tokio::test]
async fn a_command_flood_gets_one_104_then_silence_then_close_1008() {
    let server = TestServer::start(&["--command-rate", "0.001", "--command-burst", "3"]);
    let mut client = server.connect().await;
    // 3 taken, 1 refused (104), 3 ignored, and the eighth is one too many.
    for _ in 0..8 {
        client.send(json!({"type": "ping"})).await;
    }
    for _ in 0..3 {
        assert_eq!(client.recv().await["type"], "pong");
    }
    assert_eq!(client.recv().await["code"], 104);
    match client.next_seen().await {
        Seen::Close(Some(frame)) => {
            assert_eq!(u16::from(frame.code), 1008);
            assert_eq!(frame.reason.as_str(), "too many commands over the rate");
        }
        other => panic!("expected close 1008 right after the 104, got {other:?}"),
    }
    server
        .await_count("courtside_errors_total{code=\"1008\",name=\"command_flood\"}", 1.0)
        .await;
}

/// Recovery of more history than a connection's queue may hold (9 events of 1,000,000 bytes
/// against the 8 MiB bound) is delivered, in pieces, after `subscribed`: it used to close the
/// connection with 4001 before `subscribed`, every time, and the client's reconnect repeated it.
#[tokio::test]
async fn recovery_of_a_history_larger_than_the_queue_is_delivered() {
    let server = TestServer::start(&[]);
    let big = format!("\"{}\"", "x".repeat(1_000_000 - 2));
    for _ in 0..9 {
        server.publish_event("game:big", &big).await;
    }
    let mut client = server.connect().await;
    client
        .send(json!({"type": "subscribe", "room": "game:big", "since": 0}))
        .await;
    let subscribed = client.recv().await;
    assert_eq!(
        (subscribed["type"].as_str(), subscribed["recovered"].as_bool()),
        (Some("subscribed"), Some(true)),
        "{subscribed}"
    );
    for seq in 1..=9 {
        let event = client.recv().await;
        assert_eq!(
            (event["type"].as_str(), event["seq"].as_u64()),
            (Some("event"), Some(seq))
        );
        assert_eq!(event["data"].as_str().map(str::len), Some(1_000_000 - 2));
    }
    // Live events follow the recovered ones.
    server.publish_event("game:big", "10").await;
    assert_eq!(client.recv().await["seq"], 10);
}

/// Anonymous subscribers inventing room names fill a budget of their own (`--max-rooms` more
/// rooms): beyond it a subscribe to a new name gets error 105, and the publisher can still create
/// rooms (they made every publish to a new room fail with 503 before).
#[tokio::test]
async fn subscribers_inventing_rooms_never_refuse_the_publisher() {
    let server = TestServer::start(&["--no-wt", "--max-rooms", "300"]);
    let mut refused = 0;
    let mut clients = Vec::new();
    for client_index in 0..2 {
        let mut client = server.connect().await;
        for i in 0..178 {
            client
                .send(json!({"type": "subscribe", "room": format!("invented:{client_index}-{i}")}))
                .await;
            let reply = client.recv().await;
            match reply["type"].as_str() {
                Some("subscribed") => {}
                Some("error") => {
                    assert_eq!(reply["code"], 105, "{reply}");
                    refused += 1;
                }
                _ => panic!("unexpected {reply}"),
            }
        }
        // Held open until the publishes below.
        clients.push(client);
    }
    assert_eq!(refused, 356 - 300, "the subscribers' budget is --max-rooms rooms");
    for i in 0..10 {
        let answer = server.publish_state(&format!("game:new{i}"), r#"{"home":1}"#).await;
        assert_eq!(answer["version"], 1);
    }
}

/// Re-subscribing with `since: 0` in a loop made the server resend the whole history each time
/// (4.4 KB of commands brought back 425 MiB in 2 s): a connection recovers at most
/// `--recovery-bytes` of events per minute; beyond it a subscribe is answered `recovered: false`
/// with no events, and the connection goes on.
#[tokio::test]
async fn recovery_beyond_the_connections_allowance_is_answered_recovered_false() {
    let server = TestServer::start(&["--no-wt", "--recovery-bytes", "2500000"]);
    let big = format!("\"{}\"", "x".repeat(100_000));
    for _ in 0..10 {
        server.publish_event("bracket:loop", &big).await;
    }
    let mut client = server.connect().await;
    for _ in 0..3 {
        client
            .send(json!({"type": "subscribe", "room": "bracket:loop", "since": 0}))
            .await;
    }
    let (mut replies, mut events) = (Vec::new(), 0);
    while replies.len() < 3 {
        let frame = client.recv().await;
        match frame["type"].as_str() {
            Some("subscribed") => replies.push(frame["recovered"].as_bool()),
            Some("event") => events += 1,
            _ => panic!("unexpected {frame}"),
        }
    }
    client.send(json!({"type": "ping"})).await;
    assert_eq!(client.recv().await["type"], "pong");
    assert_eq!(replies, [Some(true), Some(true), Some(false)]);
    assert_eq!(events, 20, "two recoveries of ten events, none for the third");
}

async fn upgrade_status(server: &TestServer, forwarded_for: Option<&str>) -> (u16, Option<Client>) {
    let mut request = server.ws_url().into_client_request().expect("request");
    if let Some(xff) = forwarded_for {
        request
            .headers_mut()
            .insert("x-forwarded-for", xff.parse().expect("header"));
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => (101, Some(Client { ws })),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => (response.status().as_u16(), None),
        Err(other) => panic!("unexpected {other:?}"),
    }
}

/// `--max-connections-per-ip`: beyond it a WebSocket upgrade gets 429 `ip_connection_limit`; a
/// closed connection frees its place. Behind a trusted proxy the client address is the one in
/// `X-Forwarded-For`; from anyone else that header is ignored.
#[tokio::test]
async fn connections_per_client_address_are_limited() {
    let server = TestServer::start(&["--no-wt", "--max-connections-per-ip", "2"]);
    let (_, first) = upgrade_status(&server, None).await;
    let (status, _second) = upgrade_status(&server, None).await;
    assert_eq!(status, 101);
    assert_eq!(upgrade_status(&server, None).await.0, 429);
    // A spoofed header from an untrusted peer changes nothing.
    assert_eq!(upgrade_status(&server, Some("198.51.100.1")).await.0, 429);
    drop(first);
    crate::util::eventually("the closed connection frees its place", || async {
        let (status, client) = upgrade_status(&server, None).await;
        (status == 101).then_some(client)
    })
    .await;
    server
        .await_metric(
            "courtside_errors_total{code=\"429\",name=\"ip_connection_limit\"}",
            ">= 2",
            |v| v >= 2.0,
        )
        .await;

    let behind = TestServer::start(&[
        "--no-wt",
        "--max-connections-per-ip",
        "1",
        "--trusted-proxies",
        "127.0.0.0/8",
    ]);
    let (status, _a) = upgrade_status(&behind, Some("198.51.100.1")).await;
    assert_eq!(status, 101);
    let (status, _b) = upgrade_status(&behind, Some("198.51.100.2, 127.0.0.1")).await;
    assert_eq!(status, 101, "another client behind the same proxy");
    assert_eq!(upgrade_status(&behind, Some("198.51.100.1")).await.0, 429);
}

/// The same limit for WebTransport sessions, by the packets' source address.
#[tokio::test]
async fn webtransport_sessions_per_client_address_are_limited() {
    let server = TestServer::start(&["--max-connections-per-ip", "1"]);
    let _held = crate::util::WtClient::connect(&server).await;
    let endpoint = crate::util::wt_endpoint(&server.cert_hash().await);
    let refused = tokio::time::timeout(HANG, endpoint.connect(format!("https://{}/wt", server.wt.expect("wt"))))
        .await
        .expect("an answer in time");
    let Err(error) = refused else {
        panic!("the second session was accepted");
    };
    let error = error.to_string();
    assert!(error.contains("rejected"), "{error}");
    // Refused by the per-address limit (the CONNECT answered 429).
    server
        .await_count("courtside_errors_total{code=\"429\",name=\"ip_connection_limit\"}", 1.0)
        .await;
}

/// `--connection-rate-per-ip`: new WebSocket connections from one address in a minute, even
/// when earlier ones closed; beyond it 429 `ip_rate_limited` with `Retry-After`, and another
/// address (behind the trusted proxy) is not touched.
#[tokio::test]
async fn new_connections_per_client_address_per_minute_are_limited() {
    let server = TestServer::start(&[
        "--no-wt",
        "--connection-rate-per-ip",
        "2",
        "--trusted-proxies",
        "127.0.0.1/32",
    ]);
    for _ in 0..2 {
        let (status, client) = upgrade_status(&server, Some("198.51.100.7")).await;
        assert_eq!(status, 101);
        drop(client); // closed at once: the rate counts openings, not open connections
    }
    let mut request = server.ws_url().into_client_request().expect("request");
    request
        .headers_mut()
        .insert("x-forwarded-for", "198.51.100.7".parse().expect("header"));
    let Err(tokio_tungstenite::tungstenite::Error::Http(refused)) = tokio_tungstenite::connect_async(request).await
    else {
        panic!("the third connection of the minute was accepted");
    };
    assert_eq!(refused.status().as_u16(), 429);
    let retry_after: u64 = refused
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let body: Value = serde_json::from_slice(refused.body().as_deref().unwrap_or_default()).expect("JSON body");
    assert_eq!(body["error"], "ip_rate_limited");
    assert_eq!(upgrade_status(&server, Some("198.51.100.8")).await.0, 101);
    server
        .await_count("courtside_errors_total{code=\"429\",name=\"ip_rate_limited\"}", 1.0)
        .await;
}

/// `--publish-rate-per-ip`: publish requests without valid credentials per address per minute
/// (a flood of bad tokens counts, single and batch alike); beyond it 429 `ip_rate_limited` with
/// `Retry-After` and nothing published. Requests with the publish token are never limited.
#[tokio::test]
async fn publish_requests_per_client_address_per_minute_are_limited() {
    let server = TestServer::start(&["--publish-rate-per-ip", "3"]);
    let publish = |token: &'static str, path: &'static str, body: &'static str| {
        let addr = server.http;
        async move { crate::util::request(addr, "POST", path, Some(token), &[], Bytes::from(body)).await }
    };
    let batch = "{\"messages\":[{\"room\":\"game:1\",\"type\":\"state\",\"data\":{\"n\":3}}]}";
    assert_eq!(publish("wrong", "/v1/rooms/game:1/state", "{\"n\":1}").await.0, 401);
    assert_eq!(publish("wrong", "/v1/publish", batch).await.0, 401);
    assert_eq!(publish("wrong", "/v1/rooms/game:1/state", "{\"n\":2}").await.0, 401);
    let (status, headers, body) = publish("wrong", "/v1/rooms/game:1/state", "{\"n\":4}").await;
    assert_eq!(status, 429);
    assert!(headers.get("retry-after").is_some());
    let body: Value = serde_json::from_slice(&body).expect("JSON body");
    assert_eq!(body["error"], "ip_rate_limited");
    // The backend, from the same address, is not limited; the refused publishes published nothing.
    for _ in 0..5 {
        assert_eq!(publish(TOKEN, "/v1/publish", batch).await.0, 200);
    }
    let (status, room) = server.get("/v1/rooms/game:1").await;
    assert_eq!(
        (status, room["state"]["data"]["n"].as_u64(), room["version"].as_u64()),
        (200, Some(3), Some(5))
    );
}

/// `--max-connections` counts WebTransport sessions with the TCP connections: a session beyond
/// it is refused (CONNECT 503, `connection_limit`), and a closed one frees its place.
#[tokio::test]
async fn webtransport_sessions_count_against_the_connection_limit() {
    let server = TestServer::start(&["--max-connections", "2"]);
    let hash = server.cert_hash().await;
    let wt = server.wt.expect("wt");
    let first = crate::util::WtClient::connect_to(wt, &hash, true).await;
    let _second = crate::util::WtClient::connect_to(wt, &hash, true).await;
    let endpoint = crate::util::wt_endpoint(&hash);
    let url = format!("https://{wt}/wt");
    let refused = tokio::time::timeout(HANG, endpoint.connect(&url))
        .await
        .expect("an answer in time");
    assert!(
        refused.is_err(),
        "a third session was accepted under --max-connections 2"
    );
    drop(first);
    let _third = crate::util::eventually("a closed session frees its place", || {
        let (endpoint, url) = (&endpoint, &url);
        async move { endpoint.connect(url).await.ok() }
    })
    .await;
    drop(_second);
    crate::util::eventually("the refusal counted", || async {
        let refused = server
            .try_metric("courtside_errors_total{code=\"503\",name=\"connection_limit\"}")
            .await?;
        (refused >= 1.0).then_some(())
    })
    .await;
}

/// `--connection-rate-per-ip` counts WebTransport sessions too, by the packets' source: the
/// second session of the minute is refused (CONNECT 429) even after the first has closed.
#[tokio::test]
async fn new_webtransport_sessions_per_client_address_per_minute_are_limited() {
    let server = TestServer::start(&["--connection-rate-per-ip", "1"]);
    let hash = server.cert_hash().await;
    let wt = server.wt.expect("wt");
    drop(crate::util::WtClient::connect_to(wt, &hash, true).await);
    let endpoint = crate::util::wt_endpoint(&hash);
    let refused = tokio::time::timeout(HANG, endpoint.connect(format!("https://{wt}/wt")))
        .await
        .expect("an answer in time");
    let Err(error) = refused else {
        panic!("the second session of the minute was accepted");
    };
    assert!(error.to_string().contains("rejected"), "{error}");
    server
        .await_count("courtside_errors_total{code=\"429\",name=\"ip_rate_limited\"}", 1.0)
        .await;
}

/// A node at `--max-connections` still serves plain HTTP from its reserve (one request a
/// connection): the backend's publish, the health check and the metrics scrape go on while
/// WebSockets fill it, a WebSocket upgrade there is answered 503 `connection_limit`, and the
/// subscribers already connected get the publish.
#[tokio::test]
async fn a_full_node_still_takes_publishes_and_answers_its_health_check() {
    let server = TestServer::start(&["--no-wt", "--max-connections", "2"]);
    let (status, first) = upgrade_status(&server, None).await;
    assert_eq!(status, 101);
    let mut first = first.expect("client");
    first.subscribe("game:full").await;
    let (status, _second) = upgrade_status(&server, None).await;
    assert_eq!(status, 101);
    assert_eq!(
        upgrade_status(&server, None).await.0,
        503,
        "a third WebSocket under --max-connections 2"
    );
    assert_eq!(server.get("/health").await.0, 200, "the health check of a full node");
    let published = server.publish_event("game:full", "{\"n\":1}").await;
    let event = first.recv().await;
    assert_eq!(
        (event["type"].as_str(), event["seq"].as_u64()),
        (Some("event"), published["seq"].as_u64())
    );
    server
        .await_metric(
            "courtside_errors_total{code=\"503\",name=\"connection_limit\"}",
            ">= 1",
            |v| v >= 1.0,
        )
        .await;
}
