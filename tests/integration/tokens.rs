//! Subscriber tokens, private rooms and publish scopes, with real clients on both transports.

use serde_json::{json, Value};

use crate::util::{request, Client, Seen, TestServer, WtClient, TOKEN};

const SECRET: &str = "jwt-test-secret";

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An HS256 token signed with `SECRET`.
pub fn token(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("token")
}

fn server(extra: &[&str]) -> TestServer {
    let mut args = vec!["--jwt-secret", SECRET];
    args.extend_from_slice(extra);
    TestServer::start(&args)
}

/// `user:55` was readable by anyone: now a connection reads it only with a token for subject 55
/// (or one whose `rooms` claim allows it), and gets 109 `forbidden` and nothing of the room
/// otherwise; public rooms stay open.
#[tokio::test]
async fn a_users_room_is_read_only_with_that_users_token_over_websocket() {
    let server = server(&["--no-wt"]);
    server.publish_state("user:55", r#"{"unread":3}"#).await;
    let mut anonymous = server.connect().await;
    anonymous.send(json!({"type": "subscribe", "room": "user:55"})).await;
    let refused = anonymous.recv().await;
    assert_eq!(
        (refused["code"].as_u64(), refused["room"].as_str()),
        (Some(109), Some("user:55")),
        "{refused}"
    );
    assert_eq!(
        anonymous.subscribe("game:1").await["room"],
        "game:1",
        "public rooms stay open"
    );

    let mut fan = server.connect().await;
    let exp = now_s() + 600;
    fan.send(json!({"type": "auth", "token": token(json!({"sub": "55", "exp": exp}))}))
        .await;
    assert_eq!(fan.recv().await, json!({"type": "authed", "sub": "55", "exp": exp}));
    assert_eq!(fan.subscribe("user:55").await["version"], 1);
    assert_eq!(fan.recv().await["data"], json!({"unread": 3}));
    fan.send(json!({"type": "subscribe", "room": "user:56"})).await;
    assert_eq!(fan.recv().await["code"], 109);
    // A token whose rooms claim names another user's room (a parent's, say) may read it.
    let mut parent = server.connect().await;
    parent
        .send(json!({"type": "auth", "token": token(json!({"sub": "9", "exp": exp, "rooms": ["user:55"]}))}))
        .await;
    assert_eq!(parent.recv().await["type"], "authed");
    parent.subscribe("user:55").await;
    // Forged and expired tokens are refused with 108; the connection goes on.
    for bad in [
        "forged".to_string(),
        token(json!({"sub": "55", "exp": now_s() - 10})),
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &json!({"sub": "55", "exp": exp}),
            &jsonwebtoken::EncodingKey::from_secret(b"another secret"),
        )
        .expect("token"),
    ] {
        anonymous.send(json!({"type": "auth", "token": bad})).await;
        assert_eq!(anonymous.recv().await["code"], 108);
    }
    // Over HTTP too: the room's state is not for everyone.
    let (status, body) = server.get("/v1/rooms/user:55").await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    let fan_token = token(json!({"sub": "55", "exp": exp}));
    let (status, _) = server.request("GET", "/v1/rooms/user:55", Some(&fan_token), "").await;
    assert_eq!(status, 200);
    let (status, _) = server
        .request("GET", "/v1/rooms/user:55/events", Some(&fan_token), "")
        .await;
    assert_eq!(status, 200);
    let (status, _) = server.get("/v1/rooms/user:55/events").await;
    assert_eq!(status, 403);
}

/// Whether the server took an `auth`: `true` for `authed`; `false` when the token reached it
/// too late (refused as expired, or the connection's earlier token expired first: close 4003).
/// Anything else fails the test.
async fn took_auth(client: &mut Client) -> bool {
    match client.next_seen().await {
        Seen::Json(m) if m["type"] == "authed" => true,
        Seen::Json(m) if m["code"] == 108 && m["message"].as_str().is_some_and(|t| t.contains("expired")) => false,
        Seen::Close(Some(frame)) if u16::from(frame.code) == 4003 => false,
        other => panic!("unexpected answer to an auth: {other:?}"),
    }
}

/// A connection whose token expires without a refresh is closed with 4003; one refreshed before
/// its first token expired goes on past that expiry. Expiry is in wall-clock seconds, so nothing
/// here assumes how fast the server answers: the tokens expire `lead` seconds ahead, and a round
/// in which a token reached the server only after its expiry (a loaded machine) is run again
/// with twice the lead. That the refreshed connection outlived its first token is shown by
/// ordering: it still answers after the other connection, whose token expired a second later,
/// was closed.
#[tokio::test]
async fn an_expired_token_closes_the_connection_with_4003_unless_refreshed() {
    let server = server(&["--no-wt"]);
    let mut lead = 2;
    let (mut expiring, mut refreshed) = loop {
        assert!(lead <= 64, "no token reached the server before its expiry");
        let first_exp = now_s() + lead;
        lead *= 2;
        let mut refreshed = server.connect().await;
        refreshed
            .send(json!({"type": "auth", "token": token(json!({"sub": "8", "exp": first_exp}))}))
            .await;
        refreshed
            .send(json!({"type": "auth", "token": token(json!({"sub": "8", "exp": now_s() + 600}))}))
            .await;
        if !took_auth(&mut refreshed).await || !took_auth(&mut refreshed).await {
            continue;
        }
        let mut expiring = server.connect().await;
        expiring
            .send(json!({"type": "auth", "token": token(json!({"sub": "7", "exp": first_exp + 1}))}))
            .await;
        if !took_auth(&mut expiring).await {
            continue;
        }
        break (expiring, refreshed);
    };
    assert_eq!(expiring.close_code().await, 4003);
    // Had the refresh been ignored, `refreshed` would have been closed a second before.
    refreshed.send(json!({"type": "ping"})).await;
    assert_eq!(refreshed.recv().await["type"], "pong");
}

/// The same over WebTransport: `auth` (0x06) on the control stream, `authed` (0x17).
#[tokio::test]
async fn a_users_room_is_read_only_with_that_users_token_over_webtransport() {
    let server = server(&[]);
    let mut client = WtClient::connect(&server).await;
    client.send(json!({"type": "subscribe", "room": "user:5"})).await;
    assert_eq!(client.recv_stream().await["code"], 109);
    let exp = now_s() + 600;
    client
        .send(json!({"type": "auth", "token": token(json!({"sub": "5", "exp": exp}))}))
        .await;
    assert_eq!(
        client.recv_stream().await,
        json!({"type": "authed", "sub": "5", "exp": exp})
    );
    assert_eq!(client.subscribe("user:5").await["type"], "subscribed");
    server.publish_event("user:5", r#"{"note":"practice moved"}"#).await;
    loop {
        let frame = client.recv_stream().await;
        if frame["type"] == "event" {
            assert_eq!(frame["room"], "user:5");
            break;
        }
    }
}

/// `--require-token`: every room needs a token (public ones: any valid token).
#[tokio::test]
async fn with_require_token_every_room_needs_one() {
    let server = server(&["--no-wt", "--require-token"]);
    let mut client = server.connect().await;
    client.send(json!({"type": "subscribe", "room": "game:1"})).await;
    assert_eq!(client.recv().await["code"], 109);
    client
        .send(json!({"type": "auth", "token": token(json!({"sub": "1", "exp": now_s() + 60}))}))
        .await;
    assert_eq!(client.recv().await["type"], "authed");
    client.subscribe("game:1").await;
    let (status, _) = server.get("/v1/rooms/game:1").await;
    assert_eq!(status, 403);
}

/// A publish JWT publishes only to the rooms its `publish` claim names: elsewhere 403 and
/// nothing published (a batch with one such item publishes none of it).
#[tokio::test]
async fn a_publish_jwt_publishes_only_within_its_scope() {
    let server = server(&["--no-wt"]);
    let scoped = token(json!({"sub": "league-12", "exp": now_s() + 60, "publish": ["league:12:*"]}));
    let (status, body) = server
        .request(
            "POST",
            "/v1/rooms/league:12:game:1/state",
            Some(&scoped),
            r#"{"home":1}"#,
        )
        .await;
    assert_eq!((status, body["version"].as_u64()), (200, Some(1)), "{body}");
    let (status, body) = server
        .request(
            "POST",
            "/v1/rooms/league:13:game:1/state",
            Some(&scoped),
            r#"{"home":1}"#,
        )
        .await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    let batch = json!({"messages": [
        {"room": "league:12:game:2", "type": "state", "data": {"home": 2}},
        {"room": "user:1", "type": "event", "data": {"n": 1}},
    ]});
    let (status, body) = server
        .request("POST", "/v1/publish", Some(&scoped), batch.to_string())
        .await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")), "{body}");
    let (status, _) = server
        .request("GET", "/v1/rooms/league:12:game:2", Some(TOKEN), "")
        .await;
    assert_eq!(status, 404, "nothing of the batch was published");
    // A token that does not verify is 401, as a wrong publish token is; `bearer` works too.
    let (status, _) = server
        .request("POST", "/v1/rooms/league:12:game:1/state", Some("forged"), "1")
        .await;
    assert_eq!(status, 401);
    let auth = format!("bearer {scoped}");
    let (status, _, _) = request(
        server.http,
        "POST",
        "/v1/rooms/league:12:game:1/state",
        None,
        &[("authorization", auth.as_str())],
        bytes::Bytes::from_static(b"2"),
    )
    .await;
    assert_eq!(status, 200);
}
