//! Delta states (docs/PROTOCOL.md, "Delta states"): a 16-team bracket changed one match at a
//! time reaches delta subscribers over WebSocket and WebTransport (datagrams, with and without
//! loss) and across two nodes on Redis (an empty Redis restart, a node killed); each ends byte
//! for byte on `GET /v1/rooms/{room}`.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::cluster::node_with;
use crate::exactly_once::healthy;
use crate::util::{request, wt_codec, Client, LossyRelay, RedisServer, TestServer, WtClient, WtSeen};

#[path = "../../bench/src/bracket.rs"]
#[allow(dead_code)]
mod bracket;

use bracket::Bracket;

/// What a delta subscriber holds of one room, kept as a client of the protocol keeps it.
#[derive(Debug, Default)]
struct Held {
    version: u64,
    /// The state's JSON text, byte for byte: the next delta's base.
    text: Option<String>,
    wholes: u32,
    deltas: u32,
    /// Delta datagrams whose base was not held yet (a datagram overtook the stream): dropped.
    dropped: u32,
}

impl Held {
    /// Takes a state (`base` absent) or a delta; returns whether the client holds a new version.
    /// A delta on the stream that does not apply fails the test: the server only sends one
    /// against a version the client holds.
    fn take(&mut self, version: u64, base: Option<u64>, payload: &str, datagram: bool) -> bool {
        if version <= self.version && self.text.is_some() {
            return false;
        }
        let text = match base {
            None => payload.to_string(),
            Some(base) => {
                let applied = self.text.as_ref().filter(|_| self.version == base).map(|text| {
                    let bytes = courtside::core::delta::apply(text.as_bytes(), payload.as_bytes(), 1 << 24)
                        .unwrap_or_else(|e| panic!("a delta against the version held that fails: {e}"));
                    String::from_utf8(bytes).expect("a state is UTF-8")
                });
                match applied {
                    Some(text) => text,
                    None if datagram => {
                        self.dropped += 1;
                        return false;
                    }
                    None => panic!("a delta on the stream against {base} while holding {}", self.version),
                }
            }
        };
        match base {
            Some(_) => self.deltas += 1,
            None => self.wholes += 1,
        }
        self.version = version;
        self.text = Some(text);
        true
    }

    /// Takes one WebSocket text frame (a `subscribed` lets the base go, as the server does).
    fn take_ws(&mut self, frame: &str) {
        #[derive(Deserialize)]
        struct Frame<'a> {
            #[serde(rename = "type")]
            kind: String,
            version: Option<u64>,
            base: Option<u64>,
            #[serde(borrow)]
            data: Option<&'a RawValue>,
            delta: Option<String>,
        }
        let f: Frame<'_> = serde_json::from_str(frame).expect("a JSON frame");
        match (f.kind.as_str(), f.version) {
            ("subscribed", _) => self.text = None,
            ("state", Some(v)) => {
                self.take(v, None, f.data.expect("data").get(), false);
            }
            ("delta", Some(v)) => {
                self.take(v, f.base, &f.delta.expect("delta"), false);
            }
            _ => panic!("unexpected frame {frame}"),
        }
    }

    /// Takes one WebTransport message (JSON form of the test client's codec); returns the
    /// version to acknowledge when it was a datagram the client now holds.
    fn take_wt(&mut self, m: &Value, datagram: bool) -> Option<u64> {
        let version = m["version"].as_u64();
        match (m["type"].as_str(), version) {
            (Some("subscribed"), _) => {
                self.text = None;
                None
            }
            (Some("state"), Some(v)) => {
                self.take(v, None, m["data"].as_str().expect("data"), datagram);
                datagram.then_some(self.version)
            }
            (Some("delta"), Some(v)) => {
                let took = self.take(v, m["base"].as_u64(), m["delta"].as_str().expect("delta"), datagram);
                (datagram && (took || self.version >= v)).then_some(self.version)
            }
            _ => None,
        }
    }
}

/// The room's state data over HTTP, byte for byte as the server holds it.
async fn room_state_text(server: &TestServer, room: &str) -> (u64, String) {
    #[derive(Deserialize)]
    struct View<'a> {
        #[serde(borrow)]
        state: StateView<'a>,
    }
    #[derive(Deserialize)]
    struct StateView<'a> {
        version: u64,
        #[serde(borrow)]
        data: &'a RawValue,
    }
    let (status, _, body) = request(
        server.http,
        "GET",
        &format!("/v1/rooms/{room}"),
        None,
        &[],
        Default::default(),
    )
    .await;
    assert_eq!(status, 200);
    let view: View<'_> = serde_json::from_slice(&body).expect("room view");
    (view.state.version, view.state.data.get().to_string())
}

/// The bracket after `step` changes: a match goes live with a score, then finishes.
fn change(b: &mut Bracket, step: u32) {
    if step % 2 == 0 {
        b.score_next(40 + step, 38);
    } else {
        b.advance(step % 3 == 0);
    }
}

async fn subscribe_with_deltas(client: &mut Client, room: &str) {
    client
        .send(json!({"type": "subscribe", "room": room, "id": 1, "delta": "fossil"}))
        .await;
}

/// Reads frames until `held` holds `version`.
async fn ws_until(client: &mut Client, held: &mut Held, version: u64) {
    while held.version < version {
        held.take_ws(&client.recv_text().await);
    }
}

#[tokio::test]
async fn a_websocket_delta_subscriber_ends_byte_for_byte_on_the_room_state_and_a_late_joiner_starts_whole() {
    let server = TestServer::start(&[]);
    let room = "bracket:ws";
    let mut b = Bracket::new(16);
    server.publish_state(room, &b.to_json()).await;
    let mut fan = server.connect().await;
    subscribe_with_deltas(&mut fan, room).await;
    let mut held = Held::default();
    ws_until(&mut fan, &mut held, 1).await;
    assert_eq!((held.wholes, held.deltas), (1, 0), "the join state is whole");
    // An old client that asks for nothing gets whole states, as before.
    let mut old = server.connect().await;
    old.subscribe(room).await;
    let (mut late, mut late_held) = (None, Held::default());
    for step in 0..30 {
        change(&mut b, step);
        let receipt = server.publish_state(room, &b.to_json()).await;
        let version = receipt["version"].as_u64().expect("version");
        ws_until(&mut fan, &mut held, version).await;
        let frame = old.recv_text().await;
        assert!(frame.starts_with(r#"{"type":"state""#), "{frame}");
        if step == 10 {
            let mut client = server.connect().await;
            subscribe_with_deltas(&mut client, room).await;
            ws_until(&mut client, &mut late_held, version).await;
            assert_eq!(
                (late_held.wholes, late_held.deltas),
                (1, 0),
                "a late joiner starts whole"
            );
            late = Some(client);
        } else if let Some(client) = late.as_mut() {
            ws_until(client, &mut late_held, version).await;
        }
    }
    assert_eq!((held.wholes, held.deltas), (1, 30), "every change a delta");
    let (version, text) = room_state_text(&server, room).await;
    assert_eq!((held.version, held.text.as_deref()), (version, Some(text.as_str())));
    assert_eq!(
        (late_held.version, late_held.text.as_deref()),
        (version, Some(text.as_str()))
    );
    assert!(late_held.deltas > 0);
}

/// Runs a WebTransport delta subscriber (acknowledging what it holds, by room name) through
/// `changes` bracket changes, each awaited, and returns what it holds. With `await_acks`, each
/// publish waits until the server has counted the acks sent (no loss: none is lost).
async fn wt_series(server: &TestServer, client: &mut WtClient, room: &str, changes: u32, await_acks: bool) -> Held {
    let mut b = Bracket::new(16);
    server.publish_state(room, &b.to_json()).await;
    client
        .send(json!({"type": "subscribe", "room": room, "id": 1, "delta": "fossil"}))
        .await;
    let mut held = Held::default();
    let (mut version, mut acks) = (1, 0.0);
    for step in 0..=changes {
        if await_acks && acks > 0.0 {
            server.await_count("courtside_repair_acks_total", acks).await;
        }
        if step > 0 {
            change(&mut b, step);
            version = server.publish_state(room, &b.to_json()).await["version"]
                .as_u64()
                .expect("version");
        }
        while held.version < version {
            let (message, datagram) = match client.next().await {
                WtSeen::Stream(m) => (m, false),
                WtSeen::Datagram(m) => (m, true),
                WtSeen::Closed(code) => panic!("session closed ({code:?})"),
            };
            if let Some(v) = held.take_wt(&message, datagram) {
                let ack = json!({"type": "ack", "room": room, "version": v});
                let _ = client.connection.send_datagram(wt_codec::encode_client(&ack));
                acks += 1.0;
            }
        }
    }
    held
}

#[tokio::test]
async fn a_webtransport_delta_subscriber_takes_deltas_as_datagrams_and_ends_on_the_room_state() {
    let server = TestServer::start(&["--wt-state-datagrams", "always"]);
    let hash = server.cert_hash().await;
    let mut client = WtClient::connect_to(server.wt.expect("wt"), &hash, false).await;
    let held = wt_series(&server, &mut client, "bracket:wt", 30, true).await;
    eprintln!("without loss: {} whole, {} deltas", held.wholes, held.deltas);
    // The join state on the stream, then every change as a delta datagram against the version
    // acknowledged just before.
    assert_eq!((held.wholes, held.deltas, held.dropped), (1, 30, 0), "{held:?}");
    let (version, text) = room_state_text(&server, "bracket:wt").await;
    assert_eq!((held.version, held.text.as_deref()), (version, Some(text.as_str())));
}

#[tokio::test]
async fn the_quinn_webtransport_engine_sends_the_same_deltas() {
    let server = TestServer::start(&["--wt-state-datagrams", "always", "--wt-engine", "quinn"]);
    let hash = server.cert_hash().await;
    let mut client = WtClient::connect_to(server.wt.expect("wt"), &hash, false).await;
    let held = wt_series(&server, &mut client, "bracket:quinn", 10, true).await;
    assert_eq!((held.wholes, held.deltas, held.dropped), (1, 10, 0), "{held:?}");
    let (version, text) = room_state_text(&server, "bracket:quinn").await;
    assert_eq!((held.version, held.text.as_deref()), (version, Some(text.as_str())));
}

#[tokio::test]
async fn under_loss_a_webtransport_delta_subscriber_never_breaks_its_chain() {
    let server = TestServer::start(&["--wt-state-datagrams", "always"]);
    let hash = server.cert_hash().await;
    let relay = LossyRelay::start(server.wt.expect("wt"), 0.3, 0xde17a).await;
    let mut client = WtClient::connect_to(relay.addr, &hash, false).await;
    let held = wt_series(&server, &mut client, "bracket:lossy", 40, false).await;
    eprintln!(
        "under 30 % loss: {} whole, {} deltas, {} delta datagrams dropped before their base",
        held.wholes, held.deltas, held.dropped
    );
    // Held::take fails the test on a stream delta it cannot apply; datagram deltas whose base
    // had not arrived yet were dropped and repaired.
    assert!(held.deltas > 0, "{held:?}");
    let (version, text) = room_state_text(&server, "bracket:lossy").await;
    assert_eq!((held.version, held.text.as_deref()), (version, Some(text.as_str())));
}

#[tokio::test]
async fn across_two_nodes_on_redis_every_delta_subscriber_gets_the_same_bytes() {
    let redis = RedisServer::start();
    let n1 = node_with(&redis, "d1", &[]);
    let n2 = node_with(&redis, "d2", &[]);
    let room = "bracket:nodes";
    let mut b = Bracket::new(16);
    n1.publish_state(room, &b.to_json()).await;
    let (mut on1, mut on2) = (n1.connect().await, n2.connect().await);
    let (mut held1, mut held2) = (Held::default(), Held::default());
    subscribe_with_deltas(&mut on1, room).await;
    subscribe_with_deltas(&mut on2, room).await;
    ws_until(&mut on1, &mut held1, 1).await;
    ws_until(&mut on2, &mut held2, 1).await;
    for step in 0..20 {
        change(&mut b, step);
        let publisher = if step % 2 == 0 { &n1 } else { &n2 };
        let version = publisher.publish_state(room, &b.to_json()).await["version"]
            .as_u64()
            .expect("version");
        let (frame1, frame2) = (on1.recv_text().await, on2.recv_text().await);
        // One publish, one version: the same delta bytes on both nodes (each made it from the
        // state it holds, which is the same).
        assert_eq!(frame1, frame2, "version {version}");
        held1.take_ws(&frame1);
        held2.take_ws(&frame2);
        ws_until(&mut on1, &mut held1, version).await;
        ws_until(&mut on2, &mut held2, version).await;
    }
    assert_eq!((held1.deltas, held2.deltas), (20, 20));
    for node in [&n1, &n2] {
        let (version, text) = room_state_text(node, room).await;
        assert_eq!((held1.version, held1.text.as_deref()), (version, Some(text.as_str())));
        assert_eq!((held2.version, held2.text.as_deref()), (version, Some(text.as_str())));
    }
}

/// A state publish while Redis may be away: accepted (200, or 202 queued) or refused as
/// documented (503 `registry_unavailable`); anything else fails the test.
async fn publish_state_during_fault(server: &TestServer, room: &str, data: &str) {
    let (status, body) = server
        .request(
            "POST",
            &format!("/v1/rooms/{room}/state"),
            Some(crate::util::TOKEN),
            data.to_string(),
        )
        .await;
    let refused = status == 503 && body["error"] == "registry_unavailable";
    assert!(status == 200 || status == 202 || refused, "{status}: {body}");
}

/// Redis is killed and restarted empty while both nodes keep publishing: the notices start each
/// delta subscriber's room afresh (no delta is ever sent against a base it was not given since),
/// and each ends byte for byte on its node's state.
#[tokio::test]
async fn across_an_empty_redis_restart_delta_subscribers_end_on_the_room_state() {
    let mut redis = RedisServer::start();
    let nodes = [
        node_with(&redis, "r1", &["--drain-timeout", "2s"]),
        node_with(&redis, "r2", &["--drain-timeout", "2s"]),
    ];
    let room = "bracket:restart";
    let mut b = Bracket::new(16);
    nodes[0].publish_state(room, &b.to_json()).await;
    let mut fans = Vec::new();
    for node in &nodes {
        let mut fan = node.connect().await;
        subscribe_with_deltas(&mut fan, room).await;
        let mut held = Held::default();
        ws_until(&mut fan, &mut held, 1).await;
        fans.push((fan, held));
    }
    let mut step = 0;
    for _ in 0..8 {
        change(&mut b, step);
        nodes[step as usize % 2].publish_state(room, &b.to_json()).await;
        step += 1;
    }
    redis.kill();
    for _ in 0..8 {
        change(&mut b, step);
        publish_state_during_fault(&nodes[step as usize % 2], room, &b.to_json()).await;
        step += 1;
    }
    redis.restart_empty();
    for node in &nodes {
        healthy(node).await;
    }
    for _ in 0..8 {
        change(&mut b, step);
        nodes[step as usize % 2].publish_state(room, &b.to_json()).await;
        step += 1;
    }
    let last = b.to_json();
    for (node, (fan, held)) in nodes.iter().zip(fans.iter_mut()) {
        let (version, text) = room_state_text(node, room).await;
        assert_eq!(text, last, "the node holds the last state published");
        while held.text.as_deref() != Some(text.as_str()) || held.version != version {
            held.take_ws(&fan.recv_text().await);
        }
        assert!(held.deltas > 0, "{held:?}");
    }
}

/// A delta subscriber whose node is SIGKILLed subscribes again through another node: its
/// first state there is whole, the changes after it deltas, and it ends on the room's state.
#[tokio::test]
async fn after_its_node_is_killed_a_delta_subscriber_starts_whole_on_another_node() {
    let redis = RedisServer::start();
    let doomed = node_with(&redis, "k1", &[]);
    let survivor = node_with(&redis, "k2", &[]);
    let room = "bracket:kill";
    let mut b = Bracket::new(16);
    survivor.publish_state(room, &b.to_json()).await;
    let mut fan = doomed.connect().await;
    subscribe_with_deltas(&mut fan, room).await;
    let mut held = Held::default();
    ws_until(&mut fan, &mut held, 1).await;
    let mut step = 0;
    let mut publish = |b: &mut Bracket| {
        change(b, step);
        step += 1;
        b.to_json()
    };
    for _ in 0..5 {
        let data = publish(&mut b);
        let version = survivor.publish_state(room, &data).await["version"]
            .as_u64()
            .expect("version");
        ws_until(&mut fan, &mut held, version).await;
    }
    assert_eq!((held.wholes, held.deltas), (1, 5));
    drop(doomed);
    while let crate::util::Seen::Json(_) = fan.next_seen().await {}
    for _ in 0..5 {
        let data = publish(&mut b);
        survivor.publish_state(room, &data).await;
    }
    let mut fan = survivor.connect().await;
    subscribe_with_deltas(&mut fan, room).await;
    let (version, _) = room_state_text(&survivor, room).await;
    ws_until(&mut fan, &mut held, version).await;
    assert_eq!((held.wholes, held.deltas), (2, 5), "the state on the new node is whole");
    for _ in 0..5 {
        let data = publish(&mut b);
        let version = survivor.publish_state(room, &data).await["version"]
            .as_u64()
            .expect("version");
        ws_until(&mut fan, &mut held, version).await;
    }
    assert_eq!((held.wholes, held.deltas), (2, 10));
    let (version, text) = room_state_text(&survivor, room).await;
    assert_eq!((held.version, held.text.as_deref()), (version, Some(text.as_str())));
}
