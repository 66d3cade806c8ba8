use bytes::Bytes;
use serde_json::json;

use crate::util::{request, TestServer, TOKEN};

#[tokio::test]
async fn publishing_without_or_with_a_wrong_token_is_401_and_publishes_nothing() {
    let server = TestServer::start(&[]);
    let mut client = server.connect().await;
    client.subscribe("game:9").await;
    for token in [None, Some("wrong-token"), Some("")] {
        for path in ["/v1/rooms/game:9/state", "/v1/rooms/game:9/events"] {
            let (status, body) = server.request("POST", path, token, "{}").await;
            assert_eq!(status, 401, "{path} {token:?}");
            assert_eq!(body["error"], "unauthorized");
        }
        let batch = json!({"messages": [{"room": "game:9", "type": "state", "data": 1}]}).to_string();
        assert_eq!(server.request("POST", "/v1/publish", token, batch).await.0, 401);
    }
    let (_, room) = server.get("/v1/rooms/game:9").await;
    assert_eq!(
        (room["version"].as_u64(), room["last_seq"].as_u64()),
        (Some(0), Some(0))
    );
    // The first frame the client sees is the one published with the right token.
    server.publish_state("game:9", "\"ok\"").await;
    assert_eq!(client.recv().await["data"], "ok");
}

#[tokio::test]
async fn publish_answers_versions_and_sequences() {
    let server = TestServer::start(&[]);
    assert_eq!(server.publish_state("game:1", "1").await["version"], 1);
    assert_eq!(server.publish_state("game:1", "2").await["version"], 2);
    let event = server.publish_event("game:1", r#"{"foul":"home"}"#).await;
    assert_eq!(
        (event["room"].as_str(), event["seq"].as_u64()),
        (Some("game:1"), Some(1))
    );
    assert!(event["ts"].as_u64().is_some());
    let (status, room) = server.get("/v1/rooms/game:1").await;
    assert_eq!(status, 200);
    assert_eq!(
        room["state"],
        json!({"version": 2, "ts": room["state"]["ts"], "data": 2})
    );
    assert_eq!(room["last_seq"], 1);
    assert_eq!(room["subscribers"], 0);
}

#[tokio::test]
async fn a_batch_publishes_to_many_rooms_in_one_call() {
    let server = TestServer::start(&[]);
    let mut league = server.connect().await;
    league.subscribe("league:12").await;
    let batch = json!({"messages": [
        {"room": "game:1234", "type": "state", "data": {"home": 10, "away": 8}},
        {"room": "league:12", "type": "state", "data": {"game:1234": [10, 8]}},
        {"room": "league:12", "type": "event", "data": {"kind": "score"}},
    ]});
    let (status, body) = server
        .request("POST", "/v1/publish", Some(TOKEN), batch.to_string())
        .await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), 3);
    assert_eq!(
        (results[0]["room"].as_str(), results[0]["version"].as_u64()),
        (Some("game:1234"), Some(1))
    );
    assert_eq!(
        (results[2]["type"].as_str(), results[2]["seq"].as_u64()),
        (Some("event"), Some(1))
    );
    assert_eq!(league.recv().await["type"], "state");
    assert_eq!(league.recv().await["type"], "event");
}

#[tokio::test]
async fn a_bad_batch_publishes_nothing() {
    let server = TestServer::start(&["--max-batch", "2"]);
    let cases = [
        (
            json!({"messages": [{"room": "ok", "type": "state", "data": 1}, {"room": "bad room", "type": "state", "data": 1}]}),
            "bad_room",
        ),
        (
            json!({"messages": [{"room": "ok", "type": "state", "data": 1}, {"room": "ok", "type": "shout", "data": 1}]}),
            "bad_batch",
        ),
        (json!({"messages": [{"room": "ok", "type": "state"}]}), "bad_batch"),
        (json!({"messages": []}), "bad_batch"),
        (
            json!({"messages": [{"room": "ok", "type": "state", "data": 1}, {"room": "ok", "type": "state", "data": 2}, {"room": "ok", "type": "state", "data": 3}]}),
            "bad_batch",
        ),
    ];
    for (batch, code) in cases {
        let (status, body) = server
            .request("POST", "/v1/publish", Some(TOKEN), batch.to_string())
            .await;
        assert_eq!((status, body["error"].as_str()), (400, Some(code)), "{batch}");
    }
    assert_eq!(server.get("/v1/rooms/ok").await.0, 404);
}

#[tokio::test]
async fn bad_publishes_get_clear_errors() {
    let server = TestServer::start(&["--max-body", "1024"]);
    let cases = [
        ("/v1/rooms/game:1/state", "{not json".to_string(), 400, "bad_json"),
        ("/v1/rooms/game:1/state", "".to_string(), 400, "bad_json"),
        ("/v1/rooms/bad%20room/state", "1".to_string(), 400, "bad_room"),
        (
            "/v1/rooms/game:1/events",
            format!("\"{}\"", "x".repeat(2000)),
            413,
            "body_too_large",
        ),
    ];
    for (path, body, status, code) in cases {
        let (got, answer) = server.request("POST", path, Some(TOKEN), body).await;
        assert_eq!((got, answer["error"].as_str()), (status, Some(code)), "{path}");
    }
    assert_eq!(server.get("/v1/rooms/game:1").await.0, 404);
    assert_eq!(server.get("/v1/nope").await.0, 404);
}

#[tokio::test]
async fn health_and_metrics_answer() {
    let server = TestServer::start(&[]);
    let (status, health) = server.get("/health").await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");
    let mut client = server.connect().await;
    client.subscribe("game:1").await;
    server.publish_state("game:1", "1").await;
    assert_eq!(client.recv().await["type"], "state");
    let (status, headers, _) = request(server.http, "GET", "/metrics", None, &[], Bytes::new()).await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .is_ok_and(|c| c.starts_with("application/openmetrics-text")));
    // The server counts a delivery after writing it: the client may hold the frame first.
    for (series, value) in [
        ("courtside_connections{transport=\"websocket\"}", 1.0),
        ("courtside_subscriptions", 1.0),
        ("courtside_rooms", 1.0),
        ("courtside_messages_in_total{transport=\"websocket\"}", 1.0),
        ("courtside_published_total{kind=\"state\"}", 1.0),
        ("courtside_messages_out_total{transport=\"websocket\"}", 2.0),
        ("courtside_delivery_latency_seconds_count", 1.0),
        ("courtside_conflated_total", 0.0),
        ("courtside_dropped_total", 0.0),
        ("courtside_slow_disconnects_total{transport=\"websocket\"}", 0.0),
    ] {
        server.await_count(series, value).await;
    }
}

#[tokio::test]
async fn a_generated_token_is_logged_and_works() {
    let server = TestServer::start(&["--no-token"]);
    let logged = server.await_log("generated").await;
    let token = logged["publish_token"].as_str().expect("token logged").to_string();
    assert_eq!(token.len(), 32);
    let (status, _) = server
        .request("POST", "/v1/rooms/game:1/state", Some(&token), "1")
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        server
            .request("POST", "/v1/rooms/game:1/state", Some(TOKEN), "1")
            .await
            .0,
        401
    );
}

/// The history gives each event's data back exactly as it was published: it used to re-parse
/// the stored text, which panicked on JSON the publish API accepts (nesting of 128 levels or
/// more, a lone surrogate escape, 1e400) and altered other JSON (big integers, key order).
#[tokio::test]
async fn the_history_returns_published_json_byte_for_byte() {
    let server = TestServer::start(&[]);
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let payloads = [
        deep.as_str(),
        r#""\ud800""#,
        "1e400",
        "-12345678901234567890",
        r#"{"b":1,"a":2}"#,
        r#"{"x": 1.50 , "y":[ ]}"#,
    ];
    for payload in payloads {
        server.publish_event("game:raw", payload).await;
    }
    let (status, _, body) = request(
        server.http,
        "GET",
        "/v1/rooms/game:raw/events?since=0",
        None,
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(status, 200);
    let text = std::str::from_utf8(&body).expect("utf-8");
    for (i, payload) in payloads.iter().enumerate() {
        let expected = format!(r#"{{"seq":{},"id":""#, i + 1);
        let at = text
            .find(&expected)
            .unwrap_or_else(|| panic!("event {} missing in {text}", i + 1));
        let data_at = at + text[at..].find(r#""data":"#).expect("data") + 7;
        assert!(
            text[data_at..].starts_with(&format!("{payload}}}")),
            "event {} not verbatim: {}",
            i + 1,
            &text[data_at..data_at.saturating_add(80).min(text.len())]
        );
    }
    // And the server is still there for everyone else.
    assert_eq!(server.get("/health").await.0, 200);
}

async fn publish_with_key(
    server: &TestServer,
    path: &str,
    key: &str,
    body: &str,
) -> (u16, hyper::HeaderMap, serde_json::Value) {
    let (status, headers, body) = request(
        server.http,
        "POST",
        path,
        Some(TOKEN),
        &[("idempotency-key", key)],
        Bytes::from(body.to_string()),
    )
    .await;
    (
        status,
        headers,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// A retry with the same `Idempotency-Key` gets the first answer and publishes nothing: the
/// subscriber sees the event once, the history holds it once.
#[tokio::test]
async fn a_retry_with_the_same_idempotency_key_publishes_once() {
    let server = TestServer::start(&[]);
    let mut client = server.connect().await;
    client.subscribe("game:idem").await;
    let path = "/v1/rooms/game:idem/events";
    let (status, headers, first) = publish_with_key(&server, path, "goal-17", r#"{"goal":"home"}"#).await;
    assert_eq!((status, first["seq"].as_u64()), (200, Some(1)), "{first}");
    assert!(headers.get("idempotent-replayed").is_none());
    let (status, headers, again) = publish_with_key(&server, path, "goal-17", r#"{"goal":"home"}"#).await;
    assert_eq!((status, &again), (200, &first));
    assert_eq!(
        headers.get("idempotent-replayed").map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    // A different key publishes; the subscriber's next event after seq 1 is seq 2.
    server.publish_event("game:idem", r#"{"goal":"away"}"#).await;
    assert_eq!(client.recv().await["seq"], 1);
    assert_eq!(client.recv().await["seq"], 2);
    let (_, history) = server.get("/v1/rooms/game:idem/events?since=0").await;
    assert_eq!(history["events"].as_array().map(Vec::len), Some(2), "{history}");
}

/// The same key with a different body is 422 and publishes nothing; a malformed key is 400.
#[tokio::test]
async fn an_idempotency_key_reused_with_another_body_is_refused() {
    let server = TestServer::start(&[]);
    let path = "/v1/rooms/game:idem2/events";
    assert_eq!(publish_with_key(&server, path, "k1", "1").await.0, 200);
    let (status, _, body) = publish_with_key(&server, path, "k1", "2").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (422, Some("idempotency_key_reused")),
        "{body}"
    );
    let (status, _, body) = publish_with_key(&server, "/v1/rooms/game:idem2/state", "k1", "1").await;
    assert_eq!(status, 422, "the key covers the request, path included: {body}");
    let (status, _, body) = publish_with_key(&server, path, &"k".repeat(256), "1").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("bad_idempotency_key")),
        "{body}"
    );
    let (_, history) = server.get("/v1/rooms/game:idem2/events?since=0").await;
    assert_eq!(history["events"].as_array().map(Vec::len), Some(1));
}

/// A failed publish does not use the key up: the fixed retry publishes.
#[tokio::test]
async fn a_failed_publish_releases_its_idempotency_key() {
    let server = TestServer::start(&[]);
    let path = "/v1/rooms/game:idem3/events";
    let (status, _, body) = publish_with_key(&server, path, "k", "{").await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_json")));
    assert_eq!(publish_with_key(&server, path, "k", "{}").await.0, 200);
}

/// Batch items with their own `idempotency_key`: a repeated item gets its first result and is
/// not published again; a new item in the same batch is.
#[tokio::test]
async fn batch_items_with_an_idempotency_key_are_published_once() {
    let server = TestServer::start(&[]);
    let batch = |items: &str| format!(r#"{{"messages":[{items}]}}"#);
    let a = r#"{"room":"game:b1","type":"event","data":1,"idempotency_key":"a"}"#;
    let b = r#"{"room":"game:b1","type":"event","data":2,"idempotency_key":"b"}"#;
    let (status, first) = server.request("POST", "/v1/publish", Some(TOKEN), batch(a)).await;
    assert_eq!(status, 200, "{first}");
    let (status, second) = server
        .request("POST", "/v1/publish", Some(TOKEN), batch(&format!("{a},{b}")))
        .await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["results"][0], first["results"][0], "the first result, replayed");
    assert_eq!(second["results"][1]["seq"], 2);
    let (_, history) = server.get("/v1/rooms/game:b1/events?since=0").await;
    assert_eq!(history["events"].as_array().map(Vec::len), Some(2), "{history}");
}

/// The publisher's connection is cut after the request went out, before the answer: the retry
/// with the same key (repeated while the first is still answered: 409) publishes nothing more.
#[tokio::test]
async fn a_retry_after_a_cut_connection_publishes_once() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start(&[]);
    let body = r#"{"final":true}"#;
    let raw = format!(
        "POST /v1/rooms/game:cut/events HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\nidempotency-key: cut-1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(server.http).await.expect("connect");
    stream.write_all(raw.as_bytes()).await.expect("write");
    drop(stream);
    let answer = crate::util::eventually("the retry is answered", || async {
        let (status, _, answer) = publish_with_key(&server, "/v1/rooms/game:cut/events", "cut-1", body).await;
        (status != 409).then_some((status, answer))
    })
    .await;
    assert_eq!(answer.0, 200, "{}", answer.1);
    let (_, history) = server.get("/v1/rooms/game:cut/events?since=0").await;
    assert_eq!(history["events"].as_array().map(Vec::len), Some(1), "{history}");
}

/// What the router answers by itself has the documented JSON body too: a path that is not
/// UTF-8 (was text/plain), a method an endpoint does not take (was an empty 405), a URL longer
/// than 8 KiB (was an empty 414).
#[tokio::test]
async fn router_errors_have_the_documented_json_body() {
    let server = TestServer::start(&["--no-wt"]);
    let long = format!("/v1/rooms/{}", "a".repeat(9000));
    for (method, path, status, code) in [
        ("GET", "/v1/rooms/%ff%fe", 400, "bad_request"),
        ("DELETE", "/v1/rooms/game:1", 405, "method_not_allowed"),
        ("PUT", "/health", 405, "method_not_allowed"),
        ("GET", long.as_str(), 414, "uri_too_long"),
    ] {
        let (got, headers, body) = request(server.http, method, path, None, &[], Bytes::new()).await;
        let body: serde_json::Value =
            serde_json::from_slice(&body).unwrap_or_else(|_| panic!("{method} {path}: not JSON"));
        assert_eq!(
            (got, body["error"].as_str()),
            (status, Some(code)),
            "{method} {}",
            &path[..path.len().min(40)]
        );
        assert!(body["message"].is_string());
        assert_eq!(
            headers.get("content-type").map(|v| v.as_bytes()),
            Some(&b"application/json"[..])
        );
        if status == 405 {
            assert!(headers.contains_key("allow"), "the Allow header is kept");
        }
    }
}

/// Pages through the history: `limit` events per page at most (and 1 MiB of data past the
/// first), `more` while some are left; a `since` beyond the last sequence is 409 `since_ahead`
/// (it was 410, which the spec keeps for a history that no longer reaches back); a `since`
/// above 2^63-1 or a `limit` outside 1 to 1000 is 400.
pub async fn check_history_paging(server: &TestServer, room: &str) {
    for n in 1..=25 {
        server.publish_event(room, &format!("{{\"n\":{n}}}")).await;
    }
    let mut since = 0;
    let mut pages = Vec::new();
    loop {
        let (status, page) = server
            .get(&format!("/v1/rooms/{room}/events?since={since}&limit=10"))
            .await;
        assert_eq!(status, 200, "{page}");
        let ns: Vec<u64> = page["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| e["data"]["n"].as_u64().expect("n"))
            .collect();
        since = page["last_seq"].as_u64().expect("last_seq");
        pages.push(ns);
        if page["more"] == false {
            break;
        }
    }
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 5]);
    assert_eq!(pages.concat(), (1..=25).collect::<Vec<u64>>());
    let (status, body) = server.get(&format!("/v1/rooms/{room}/events?since=26")).await;
    assert_eq!(
        (status, body["error"].as_str(), body["last_seq"].as_u64()),
        (409, Some("since_ahead"), Some(25))
    );
    for query in ["since=9223372036854775808", "limit=0", "limit=1001", "since=-1"] {
        let (status, body) = server.get(&format!("/v1/rooms/{room}/events?{query}")).await;
        assert_eq!((status, body["error"].as_str()), (400, Some("bad_query")), "{query}");
    }
    // Past its first event, a page holds at most 1 MiB of data.
    let big = format!("\"{}\"", "x".repeat(600_000));
    let first_big = server.publish_event(room, &big).await["seq"].as_u64().expect("seq");
    server.publish_event(room, &big).await;
    let (_, page) = server
        .get(&format!("/v1/rooms/{room}/events?since={}", first_big - 1))
        .await;
    assert_eq!(
        (page["events"].as_array().map(Vec::len), page["more"].as_bool()),
        (Some(1), Some(true))
    );
}

#[tokio::test]
async fn the_history_is_read_in_bounded_pages() {
    let server = TestServer::start(&["--no-wt"]);
    check_history_paging(&server, "bracket:pages").await;
}

/// A body over `--max-body` is read to its end before the 413 goes out (with `Connection:
/// close`), so the client reads the answer: closed with the body unread, the connection was
/// reset and Node's fetch saw EPIPE in about half the tries with 2 to 8 MiB bodies.
#[tokio::test]
async fn an_oversized_body_gets_its_413_not_a_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start(&["--no-wt"]);
    for mib in [2usize, 4, 8, 2, 4, 8] {
        let mut stream = tokio::net::TcpStream::connect(server.http).await.expect("connect");
        let body = vec![b'1'; mib << 20];
        let head = format!(
            "POST /v1/rooms/game:big/events HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            crate::util::TOKEN,
            body.len()
        );
        stream.write_all(head.as_bytes()).await.expect("head");
        stream.write_all(&body).await.expect("the server reads the whole body");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.expect("the answer, not a reset");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{mib} MiB: {answer}");
        assert!(
            answer.contains("body_too_large") && answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
}
