use serde_json::json;

use crate::util::{eventually, RedisServer, TestServer, WtClient, WtSeen};

fn node(redis: &RedisServer, id: &str) -> TestServer {
    node_with(redis, id, &[])
}

/// A node on `redis` (no WebTransport, a 200 ms heartbeat) with `extra` options.
pub fn node_with(redis: &RedisServer, id: &str, extra: &[&str]) -> TestServer {
    let url = redis.url();
    let mut args = vec!["--no-wt", "--redis", &url, "--node-id", id, "--node-heartbeat", "200ms"];
    args.extend_from_slice(extra);
    TestServer::start(&args)
}

async fn numsub(redis: &RedisServer, room: &str) -> i64 {
    let mut conn = redis.connection().await;
    let reply: Vec<(String, i64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(format!("cs:{{{room}}}:ch"))
        .query_async(&mut conn)
        .await
        .expect("numsub");
    reply.first().map_or(0, |r| r.1)
}

/// Three nodes, one Redis: what any node publishes reaches clients on every node; a client
/// joining on another node gets the current state at once; presence counts the whole cluster.
#[tokio::test]
async fn three_nodes_share_rooms() {
    let redis = RedisServer::start();
    let nodes = [node(&redis, "n1"), node(&redis, "n2"), node(&redis, "n3")];
    let mut on_one = nodes[0].connect().await;
    on_one.subscribe("game:1").await;
    eventually("node 1 subscribed to the room's channel", || async {
        (numsub(&redis, "game:1").await == 1).then_some(())
    })
    .await;

    let receipt = nodes[2].publish_state("game:1", r#"{"home":2,"away":0}"#).await;
    assert_eq!(receipt["version"], 1);
    let state = on_one.recv().await;
    assert_eq!(
        (state["type"].as_str(), state["version"].as_u64()),
        (Some("state"), Some(1))
    );
    assert_eq!(state["data"], json!({"home": 2, "away": 0}));
    assert_eq!(state["ts"], receipt["ts"]);
    nodes[2].publish_event("game:1", r#"{"foul":"home"}"#).await;
    assert_eq!(on_one.recv().await["seq"], 1);

    let mut on_two = nodes[1].connect().await;
    let subscribed = on_two.subscribe("game:1").await;
    assert_eq!(
        (subscribed["version"].as_u64(), subscribed["seq"].as_u64()),
        (Some(1), Some(1))
    );
    let state = on_two.recv().await;
    assert_eq!(
        (state["type"].as_str(), state["data"].clone()),
        (Some("state"), json!({"home": 2, "away": 0}))
    );

    // Versions are assigned once for the cluster, whichever node publishes.
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(
            node.publish_state("game:1", &i.to_string()).await["version"],
            2 + i as u64
        );
    }
    for client in [&mut on_one, &mut on_two] {
        let versions: Vec<u64> = [client.recv().await, client.recv().await, client.recv().await]
            .iter()
            .map(|s| s["version"].as_u64().expect("version"))
            .collect();
        assert_eq!(versions, vec![2, 3, 4]);
    }
    let subscribers = eventually("presence counts both nodes", || async {
        let (_, room) = nodes[2].get("/v1/rooms/game:1").await;
        (room["subscribers"] == 2).then_some(room)
    })
    .await;
    assert_eq!(subscribers["version"], 4);
    let (_, listed) = nodes[0].get("/v1/nodes").await;
    let mut ids: Vec<String> = listed["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["id"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["n1", "n2", "n3"]);
}

/// A client whose node died reconnects to another node and recovers every event it missed.
#[tokio::test]
async fn since_recovery_works_through_another_node_after_the_first_is_killed() {
    let redis = RedisServer::start();
    let mut nodes = [node(&redis, "n1"), node(&redis, "n2"), node(&redis, "n3")];
    let mut client = nodes[0].connect().await;
    let subscribed = client.subscribe("bracket:7").await;
    let epoch = subscribed["epoch"].as_str().expect("epoch").to_string();
    for i in 1..=3 {
        nodes[1].publish_event("bracket:7", &i.to_string()).await;
    }
    for seq in 1..=3 {
        assert_eq!(client.recv().await["seq"], seq);
    }
    nodes[0].kill();
    for i in 4..=6 {
        nodes[1].publish_event("bracket:7", &i.to_string()).await;
    }
    let mut again = nodes[2].connect().await;
    again
        .send(json!({"type": "subscribe", "room": "bracket:7", "since": 3, "epoch": epoch}))
        .await;
    let subscribed = again.recv().await;
    assert_eq!(
        (subscribed["recovered"].as_bool(), subscribed["seq"].as_u64()),
        (Some(true), Some(6))
    );
    for seq in 4..=6 {
        let event = again.recv().await;
        assert_eq!((event["seq"].as_u64(), event["data"].as_u64()), (Some(seq), Some(seq)));
    }
}

/// A node subscribes to a room's channel only while it has local subscribers.
#[tokio::test]
async fn a_node_stops_receiving_a_room_when_its_last_subscriber_leaves() {
    let redis = RedisServer::start();
    let nodes = [node(&redis, "n1"), node(&redis, "n2")];
    assert_eq!(numsub(&redis, "game:3").await, 0);
    let mut a = nodes[0].connect().await;
    let mut b = nodes[0].connect().await;
    a.subscribe("game:3").await;
    b.subscribe("game:3").await;
    eventually("one channel subscription for two local subscribers", || async {
        (numsub(&redis, "game:3").await == 1).then_some(())
    })
    .await;
    a.send(json!({"type": "unsubscribe", "room": "game:3"})).await;
    assert_eq!(a.recv().await["type"], "unsubscribed");
    nodes[1].publish_state("game:3", "1").await;
    assert_eq!(b.recv().await["version"], 1);
    assert_eq!(numsub(&redis, "game:3").await, 1);
    drop(b);
    eventually("node 1 left the channel", || async {
        (numsub(&redis, "game:3").await == 0).then_some(())
    })
    .await;
    // Publishing still works; no node receives the room's traffic.
    assert_eq!(nodes[1].publish_state("game:3", "2").await["version"], 2);
}

/// A node that dies stops counting in presence within three heartbeats.
#[tokio::test]
async fn a_killed_nodes_presence_disappears() {
    let redis = RedisServer::start();
    let mut nodes = [node(&redis, "n1"), node(&redis, "n2")];
    let mut client = nodes[0].connect().await;
    client.subscribe("team:301").await;
    eventually("presence shows the subscriber", || async {
        let (_, room) = nodes[1].get("/v1/rooms/team:301").await;
        (room["subscribers"] == 1).then_some(())
    })
    .await;
    nodes[0].kill();
    eventually("the dead node's count is gone", || async {
        let (_, room) = nodes[1].get("/v1/rooms/team:301").await;
        (room["subscribers"] == 0).then_some(())
    })
    .await;
    let (_, listed) = nodes[1].get("/v1/nodes").await;
    assert_eq!(listed["nodes"].as_array().map(Vec::len), Some(1));
    drop(client);
}

/// A client's view of one room: checks that numbers only grow within an epoch and that an epoch
/// change is announced by a `subscribed` notice, and keeps the events' data in order.
struct RoomView {
    epoch: String,
    last_seq: u64,
    last_version: u64,
    events: Vec<serde_json::Value>,
    notices: Vec<serde_json::Value>,
}

impl RoomView {
    fn new(subscribed: &serde_json::Value) -> Self {
        Self {
            epoch: subscribed["epoch"].as_str().expect("epoch").to_string(),
            last_seq: subscribed["seq"].as_u64().expect("seq"),
            last_version: subscribed["version"].as_u64().expect("version"),
            events: Vec::new(),
            notices: Vec::new(),
        }
    }

    /// Reads frames until the next event or state, applying notices on the way.
    async fn next(&mut self, client: &mut crate::util::Client) -> serde_json::Value {
        loop {
            let frame = client.recv().await;
            match frame["type"].as_str() {
                Some("subscribed") => {
                    assert_ne!(
                        frame["epoch"].as_str(),
                        Some(self.epoch.as_str()),
                        "a notice without a new epoch: {frame}"
                    );
                    self.epoch = frame["epoch"].as_str().expect("epoch").to_string();
                    self.last_seq = frame["seq"].as_u64().expect("seq");
                    self.last_version = frame["version"].as_u64().expect("version");
                    self.notices.push(frame);
                }
                Some("event") => {
                    let seq = frame["seq"].as_u64().expect("seq");
                    assert!(
                        seq > self.last_seq,
                        "event {seq} after {} in epoch {}: {frame}",
                        self.last_seq,
                        self.epoch
                    );
                    self.last_seq = seq;
                    self.events.push(frame["data"]["n"].clone());
                    return frame;
                }
                Some("state") => {
                    let version = frame["version"].as_u64().expect("version");
                    assert!(
                        version > self.last_version,
                        "state {version} after {}: {frame}",
                        self.last_version
                    );
                    self.last_version = version;
                    return frame;
                }
                _ => panic!("unexpected {frame}"),
            }
        }
    }
}

/// Redis SIGKILLed mid-stream and restarted empty: local delivery goes on (under a local epoch the
/// clients are told of), health stays 200 and says degraded, what was accepted meanwhile reaches
/// every node in order afterwards (before the notice of the return, which says nothing was
/// missed), delivery across nodes resumes without any client reconnecting, and within an epoch
/// numbers never go back.
#[tokio::test]
async fn surviving_a_redis_restart_without_data() {
    use crate::util::TOKEN;
    let mut redis = RedisServer::start();
    // A wide --resend-window: what Redis numbered before the kill is kept to be sent again
    // however long the test takes to get there.
    let keep = ["--resend-window", "10m"];
    let nodes = [node_with(&redis, "n1", &keep), node_with(&redis, "n2", &keep)];
    let mut a = nodes[0].connect().await;
    let mut b = nodes[1].connect().await;
    let mut view_a = RoomView::new(&a.subscribe("league:9").await);
    let mut view_b = RoomView::new(&b.subscribe("league:9").await);
    eventually("both nodes follow the room", || async {
        (numsub(&redis, "league:9").await == 2).then_some(())
    })
    .await;
    nodes[0].publish_state("league:9", r#"{"standings":[0]}"#).await;
    for i in 1..=3 {
        nodes[0].publish_event("league:9", &json!({"n": i}).to_string()).await;
    }
    for _ in 0..4 {
        view_a.next(&mut a).await;
        view_b.next(&mut b).await;
    }

    redis.kill();
    // During the outage each node serves its own clients.
    let (status, body) = nodes[0]
        .request("POST", "/v1/rooms/league:9/events", Some(TOKEN), r#"{"n":"a1"}"#)
        .await;
    assert_eq!((status, body["queued"].as_bool()), (202, Some(true)), "{body}");
    assert_eq!(view_a.next(&mut a).await["data"]["n"], "a1");
    let (status, _) = nodes[1]
        .request("POST", "/v1/rooms/league:9/events", Some(TOKEN), r#"{"n":"b1"}"#)
        .await;
    assert_eq!(status, 202);
    assert_eq!(view_b.next(&mut b).await["data"]["n"], "b1");
    let (status, _) = nodes[1]
        .request("POST", "/v1/rooms/league:9/state", Some(TOKEN), r#"{"standings":[1]}"#)
        .await;
    assert_eq!(status, 202);
    assert_eq!(view_b.next(&mut b).await["type"], "state");
    let (status, health) = nodes[0].get("/health").await;
    assert_eq!(status, 200);
    assert_eq!(health["registry"]["status"], "degraded");
    // The publish it queued, and the four Redis numbered for it before the kill (kept to be sent
    // again in case Redis lost them before every holder received them).
    assert_eq!(health["registry"]["outbox"], 5);

    redis.restart_empty();
    for n in &nodes {
        eventually("the node is back on redis with an empty outbox", || async {
            let (_, health) = n.get("/health").await;
            (health["registry"]["status"] == "ok" && health["registry"]["outbox"] == 0).then_some(())
        })
        .await;
    }
    // Each node's outage event reaches the other node's client; nobody reconnected. (States and
    // events are separate series: a state may come before or after the event.)
    for (view, client, expected) in [(&mut view_a, &mut a, "b1"), (&mut view_b, &mut b, "a1")] {
        let mut next = view.next(client).await;
        while next["type"] == "state" {
            next = view.next(client).await;
        }
        assert_eq!(next["data"]["n"], expected);
    }
    // Live delivery across nodes resumes on the same connections, states included.
    nodes[1].publish_event("league:9", r#"{"n":"after"}"#).await;
    nodes[0].publish_state("league:9", r#"{"standings":[2]}"#).await;
    for (view, client) in [(&mut view_a, &mut a), (&mut view_b, &mut b)] {
        loop {
            let frame = view.next(client).await;
            if frame["type"] == "state" && frame["data"] == json!({"standings": [2]}) {
                break;
            }
        }
        assert_eq!(view.events.last(), Some(&json!("after")));
        assert!(
            view.notices.iter().any(|n| n["recovered"] == true),
            "the return to Redis was announced, with nothing missed: {:?}",
            view.notices
        );
    }
    assert_eq!(
        view_a.events,
        vec![json!(1), json!(2), json!(3), json!("a1"), json!("b1"), json!("after")]
    );
    assert_eq!(
        view_b.events,
        vec![json!(1), json!(2), json!(3), json!("b1"), json!("a1"), json!("after")]
    );
}

/// Redis restarted empty: every room the node holds is reseeded (they are reseeded many at a
/// time), so each room's versions and sequences continue where they were.
#[tokio::test]
async fn every_room_is_reseeded_after_redis_returns_empty() {
    const ROOMS: usize = 60;
    let mut redis = RedisServer::start();
    let server = node(&redis, "n1");
    let mut client = server.connect().await;
    let rooms: Vec<String> = (0..ROOMS).map(|i| format!("game:reseed{i}")).collect();
    // The node holds (follows) a room while a client is subscribed to it.
    for room in &rooms {
        client.subscribe(room).await;
    }
    for room in &rooms {
        server.publish_state(room, r#"{"home":1}"#).await;
        server.publish_event(room, r#"{"foul":1}"#).await;
    }
    redis.kill();
    eventually("the node notices the outage", || async {
        let (_, health) = server.get("/health").await;
        (health["registry"]["status"] == "degraded").then_some(())
    })
    .await;
    redis.restart_empty();
    eventually("the node is back on redis", || async {
        let (_, health) = server.get("/health").await;
        (health["registry"]["status"] == "ok").then_some(())
    })
    .await;
    for room in &rooms {
        let state = server.publish_state(room, r#"{"home":2}"#).await;
        let event = server.publish_event(room, r#"{"foul":2}"#).await;
        assert_eq!(
            (state["version"].as_u64(), event["seq"].as_u64()),
            (Some(2), Some(2)),
            "{room} was not reseeded"
        );
    }
}

/// A Redis Cluster of three masters: rooms spread over the shards, delivery across nodes works,
/// and each room's channel lives on its own shard only (sharded pub/sub).
#[tokio::test]
async fn a_redis_cluster_shards_rooms() {
    use crate::util::{cluster_node_connection, RedisCluster};
    let cluster = RedisCluster::start().await;
    let url = cluster.url();
    let args = |id: &'static str| {
        [
            "--no-wt",
            "--redis",
            &url,
            "--redis-cluster",
            "--node-id",
            id,
            "--node-heartbeat",
            "200ms",
        ]
        .map(str::to_string)
    };
    let n1_args = args("n1");
    let n2_args = args("n2");
    let n1 = TestServer::start(&n1_args.iter().map(String::as_str).collect::<Vec<_>>());
    let n2 = TestServer::start(&n2_args.iter().map(String::as_str).collect::<Vec<_>>());
    let rooms: Vec<String> = (1..=12).map(|i| format!("game:{i}")).collect();
    let mut client = n1.connect().await;
    for room in &rooms {
        client.subscribe(room).await;
    }
    // Each room's sharded channel is subscribed on exactly one master, and the rooms spread.
    let mut shards_used = std::collections::HashSet::new();
    for room in &rooms {
        let channel = format!("cs:{{{room}}}:ch");
        let owners = eventually("the room's channel is subscribed on its shard", || {
            let channel = channel.clone();
            let ports = cluster.ports.clone();
            async move {
                let mut owners = Vec::new();
                for port in ports {
                    let mut conn = cluster_node_connection(port).await;
                    let reply: Vec<(String, i64)> = redis::cmd("PUBSUB")
                        .arg("SHARDNUMSUB")
                        .arg(&channel)
                        .query_async(&mut conn)
                        .await
                        .ok()?;
                    if reply.first().is_some_and(|r| r.1 > 0) {
                        owners.push(port);
                    }
                }
                (owners.len() == 1).then_some(owners)
            }
        })
        .await;
        shards_used.insert(owners[0]);
    }
    assert!(shards_used.len() >= 2, "12 rooms all on one shard: {shards_used:?}");
    // n1's heartbeat writes every room's presence into its own slot; n2 reads it back.
    for room in &rooms {
        eventually("n2 sees n1's subscriber through presence", || async {
            let (_, info) = n2.get(&format!("/v1/rooms/{room}")).await;
            (info["subscribers"] == 1).then_some(())
        })
        .await;
    }
    // Delivery across nodes, and versions assigned once.
    for room in &rooms {
        n2.publish_state(room, r#"{"home":1}"#).await;
    }
    let mut got: Vec<String> = Vec::new();
    for _ in &rooms {
        let state = client.recv().await;
        assert_eq!(
            (state["type"].as_str(), state["version"].as_u64()),
            (Some("state"), Some(1))
        );
        got.push(state["room"].as_str().expect("room").to_string());
    }
    got.sort();
    let mut expected = rooms.clone();
    expected.sort();
    assert_eq!(got, expected);
    n2.publish_event("game:5", r#"{"foul":"away"}"#).await;
    assert_eq!(client.recv().await["seq"], 1);
    let mut joining = n2.connect().await;
    joining.subscribe("game:5").await;
    assert_eq!(joining.recv().await["data"], json!({"home": 1}));
}

/// rediss:// with a password (ElastiCache in-transit encryption with an AUTH token).
#[tokio::test]
async fn nodes_share_rooms_over_tls_with_a_password() {
    let redis = RedisServer::start_tls("s3cret-token").await;
    let nodes = [node(&redis, "n1"), node(&redis, "n2")];
    let mut client = nodes[0].connect().await;
    client.subscribe("game:tls").await;
    eventually("node 1 follows the room", || async {
        let (_, health) = nodes[0].get("/health").await;
        (health["registry"]["status"] == "ok").then_some(())
    })
    .await;
    // Publishing through node 2 reaches node 1's client once node 1's channel is subscribed:
    // publish until a state arrives (the wait between publishes is a pace, not a bound), and
    // check that it is one node 2 published, with the version node 2 answered for it.
    let deadline = tokio::time::Instant::now() + crate::util::HANG;
    let mut published = std::collections::HashMap::new();
    let state = loop {
        let n = published.len() as u64 + 1;
        let version = nodes[1].publish_state("game:tls", &json!({"n": n}).to_string()).await["version"]
            .as_u64()
            .expect("version");
        published.insert(version, n);
        if let Ok(state) = tokio::time::timeout(std::time::Duration::from_millis(200), client.recv()).await {
            break state;
        }
        assert!(tokio::time::Instant::now() < deadline, "nothing crossed nodes over TLS");
    };
    assert_eq!(state["type"], "state", "{state}");
    let version = state["version"].as_u64().expect("version");
    assert_eq!(
        published.get(&version).map(|n| json!({"n": n})).as_ref(),
        Some(&state["data"]),
        "node 1's client got version {version} as node 2 published it: {state}; published {published:?}"
    );
}

/// While Redis is away, publishes wait in a bounded outbox; a full outbox answers 503 and the
/// publish is neither delivered nor queued.
#[tokio::test]
async fn a_full_outbox_refuses_publishes() {
    use crate::util::TOKEN;
    let mut redis = RedisServer::start();
    let n1 = TestServer::start(&[
        "--no-wt",
        "--redis",
        &redis.url(),
        "--node-heartbeat",
        "200ms",
        "--outbox-messages",
        "2",
    ]);
    let mut client = n1.connect().await;
    client.subscribe("game:full").await;
    redis.kill();
    for i in 1..=2 {
        let (status, body) = n1
            .request("POST", "/v1/rooms/game:full/events", Some(TOKEN), i.to_string())
            .await;
        assert_eq!(status, 202, "{body}");
    }
    let (status, body) = n1.request("POST", "/v1/rooms/game:full/events", Some(TOKEN), "3").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("registry_unavailable")),
        "{body}"
    );
    let (_, health) = n1.get("/health").await;
    assert_eq!(
        (
            health["registry"]["status"].as_str(),
            health["registry"]["outbox"].as_u64()
        ),
        (Some("degraded"), Some(2))
    );
    n1.await_metric("courtside_registry_up", "= 0", |v| v == 0.0).await;
    n1.await_metric("courtside_outbox", "= 2", |v| v == 2.0).await;
    // The client got the two accepted events (after the local-epoch notice), not the refused one.
    let mut data = Vec::new();
    while data.len() < 2 {
        let frame = client.recv().await;
        if frame["type"] == "event" {
            data.push(frame["data"].clone());
        }
    }
    assert_eq!(data, vec![json!(1), json!(2)]);
    client.send(json!({"type": "ping"})).await;
    assert_eq!(client.recv().await["type"], "pong");
}

/// A publisher that retries through another node with the same `Idempotency-Key` publishes
/// once: the key lives in Redis, shared by every node.
#[tokio::test]
async fn an_idempotency_key_holds_across_nodes() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis, "a"), node(&redis, "b"));
    let publish = |server: &TestServer| {
        let http = server.http;
        async move {
            crate::util::request(
                http,
                "POST",
                "/v1/rooms/game:idem-x/events",
                Some(crate::util::TOKEN),
                &[("idempotency-key", "final-whistle")],
                bytes::Bytes::from_static(br#"{"final":true}"#),
            )
            .await
        }
    };
    let (status, headers, first) = publish(&a).await;
    assert_eq!(status, 200);
    assert!(headers.get("idempotent-replayed").is_none());
    let (status, headers, again) = publish(&b).await;
    assert_eq!((status, &again), (200, &first));
    assert_eq!(
        headers.get("idempotent-replayed").map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    let (_, history) = b.get("/v1/rooms/game:idem-x/events?since=0").await;
    assert_eq!(history["events"].as_array().map(Vec::len), Some(1), "{history}");
    assert_eq!(history["last_seq"], json!(1));
}

/// Moves one slot from its master to another, keys included, as `redis-cli --cluster reshard`
/// does for each slot it moves.
pub async fn move_slot(cluster: &crate::util::RedisCluster, slot: u64) -> (u16, u16) {
    use crate::util::cluster_node_connection;
    let mut any = cluster_node_connection(cluster.ports[0]).await;
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut any)
        .await
        .expect("nodes");
    // Each line: id ip:port@cport flags master ping pong epoch link slot-ranges...
    let mut masters = Vec::new();
    let mut owner = None;
    for line in nodes.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if !fields[2].contains("master") {
            continue;
        }
        let port: u16 = fields[1]
            .split(['@', ':'])
            .nth(1)
            .and_then(|p| p.parse().ok())
            .expect("port");
        masters.push((fields[0].to_string(), port));
        for range in &fields[8..] {
            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
            if let (Ok(lo), Ok(hi)) = (lo.parse::<u64>(), hi.parse::<u64>()) {
                if (lo..=hi).contains(&slot) {
                    owner = Some((fields[0].to_string(), port));
                }
            }
        }
    }
    let (src_id, src_port) = owner.expect("the slot's owner");
    let (dst_id, dst_port) = masters
        .iter()
        .find(|(id, _)| *id != src_id)
        .cloned()
        .expect("another master");
    let mut src = cluster_node_connection(src_port).await;
    let mut dst = cluster_node_connection(dst_port).await;
    let setslot = |state: &str, id: &str| {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
        cmd
    };
    let _: () = setslot("IMPORTING", &src_id)
        .query_async(&mut dst)
        .await
        .expect("importing");
    let _: () = setslot("MIGRATING", &dst_id)
        .query_async(&mut src)
        .await
        .expect("migrating");
    let keys: Vec<String> = redis::cmd("CLUSTER")
        .arg("GETKEYSINSLOT")
        .arg(slot)
        .arg(1000)
        .query_async(&mut src)
        .await
        .expect("keys");
    for key in keys {
        let _: () = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(dst_port)
            .arg(&key)
            .arg(0)
            .arg(5000)
            .query_async(&mut src)
            .await
            .expect("migrate");
    }
    for (_, port) in &masters {
        let mut conn = cluster_node_connection(*port).await;
        let _: () = setslot("NODE", &dst_id).query_async(&mut conn).await.expect("node");
    }
    (src_port, dst_port)
}

/// A live room's slot moves to another master: Redis 7 unsubscribes the shard channel's
/// subscribers unasked, and the node subscribes again, so later publishes still reach its
/// clients (they reached none before, for good).
#[tokio::test]
async fn a_live_room_keeps_its_clients_when_its_slot_moves() {
    use crate::util::{cluster_node_connection, RedisCluster};
    let cluster = RedisCluster::start().await;
    let url = cluster.url();
    let args = |id: &'static str| ["--no-wt", "--redis", &url, "--redis-cluster", "--node-id", id].map(str::to_string);
    let (a_args, b_args) = (args("a"), args("b"));
    let a = TestServer::start(&a_args.iter().map(String::as_str).collect::<Vec<_>>());
    let b = TestServer::start(&b_args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut client = b.connect().await;
    client.subscribe("game:moving").await;
    a.publish_event("game:moving", "1").await;
    assert_eq!(client.recv().await["seq"], 1);
    let mut conn = cluster_node_connection(cluster.ports[0]).await;
    let slot: u64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg("cs:{game:moving}:ch")
        .query_async(&mut conn)
        .await
        .expect("keyslot");
    let (_, dst_port) = move_slot(&cluster, slot).await;
    // The channel is subscribed again, on the slot's new owner.
    eventually("the channel is subscribed on the new owner", || async {
        let mut conn = cluster_node_connection(dst_port).await;
        let reply: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("SHARDNUMSUB")
            .arg("cs:{game:moving}:ch")
            .query_async(&mut conn)
            .await
            .ok()?;
        reply.first().is_some_and(|r| r.1 > 0).then_some(())
    })
    .await;
    a.publish_event("game:moving", "2").await;
    let event = client.recv().await;
    assert_eq!(
        (event["type"].as_str(), event["seq"].as_u64()),
        (Some("event"), Some(2)),
        "{event}"
    );
}

/// The history API's pages, read from Redis (the newest entries after `since` only).
#[tokio::test]
async fn the_history_is_read_in_bounded_pages_from_redis() {
    let redis = RedisServer::start();
    let server = node(&redis, "n1");
    crate::http_api::check_history_paging(&server, "bracket:pages").await;
}

/// A hole in a room's history on Redis (an event lost with its node when Redis lost its data;
/// here deleted by hand) ends the page before it (`more`), and the next page answers 410: a
/// reader refetches the state instead of skipping the event without knowing it.
#[tokio::test]
async fn a_hole_in_the_history_ends_the_page_and_the_next_one_is_gone() {
    let redis = RedisServer::start();
    let server = node(&redis, "n1");
    for n in 1..=3 {
        server.publish_event("game:hole", &n.to_string()).await;
    }
    let mut conn = redis.connection().await;
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("cs:{game:hole}:hist")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("xrange");
    let second = entries
        .iter()
        .find(|(_, fields)| fields.iter().any(|(k, v)| k == "seq" && v == "2"))
        .map(|(id, _)| id.clone())
        .expect("seq 2 in the history");
    let _: u64 = redis::cmd("XDEL")
        .arg("cs:{game:hole}:hist")
        .arg(&second)
        .query_async(&mut conn)
        .await
        .expect("xdel");
    let (status, page) = server.get("/v1/rooms/game:hole/events?since=0").await;
    assert_eq!(status, 200, "{page}");
    let seqs: Vec<u64> = page["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .collect();
    assert_eq!((seqs, page["more"].as_bool()), (vec![1], Some(true)), "{page}");
    let (status, gone) = server.get("/v1/rooms/game:hole/events?since=1").await;
    assert_eq!((status, gone["error"].as_str()), (410, Some("history_gone")), "{gone}");
}

/// A WebTransport subscriber follows a room through Redis: its endpoint loop (a thread with a
/// runtime of its own) asks the registry to follow the room, the registry subscribes on the node's
/// runtime, and what another node publishes reaches the subscriber.
#[tokio::test]
async fn a_webtransport_subscriber_gets_what_another_node_publishes() {
    let redis = RedisServer::start();
    let url = redis.url();
    let with_wt = TestServer::start(&["--redis", &url, "--node-id", "wt1", "--node-heartbeat", "200ms"]);
    let publisher = node(&redis, "n2");
    let mut client = WtClient::connect(&with_wt).await;
    client.subscribe("game:wt").await;
    eventually("the WebTransport node subscribed to the room's channel", || async {
        (numsub(&redis, "game:wt").await == 1).then_some(())
    })
    .await;
    publisher.publish_state("game:wt", r#"{"home":3}"#).await;
    loop {
        match client.next().await {
            WtSeen::Stream(state) | WtSeen::Datagram(state) if state["type"] == "state" => {
                assert_eq!(state["data"].as_str(), Some(r#"{"home":3}"#));
                break;
            }
            WtSeen::Closed(code) => panic!("closed {code:?} before the state"),
            _ => {}
        }
    }
}

/// A WebTransport endpoint loop calls `Registry::follow` from its own thread, outside the node's
/// runtime: the Redis registry still follows the room on the node's runtime and runs `then`
/// (a `tokio::spawn` there would panic on a thread without a runtime).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_registry_follows_a_room_for_a_caller_outside_the_runtime() {
    use courtside::registry::{RedisRegistry, RedisSettings, Registry};
    use std::time::Duration;
    let redis = RedisServer::start();
    let metrics = std::sync::Arc::new(courtside::metrics::Metrics::new());
    let hub = courtside::hub::Hub::new(courtside::hub::HubConfig::default(), metrics.clone(), 1);
    let settings = RedisSettings {
        url: redis.url(),
        node_id: "outside".into(),
        http: "127.0.0.1:0".into(),
        heartbeat: Duration::from_millis(200),
        outbox_messages: 100,
        outbox_bytes: 1 << 20,
        resend_window: Duration::from_secs(10),
        history_len: 10,
        history_ttl: Duration::from_secs(60),
        state_ttl: Duration::from_secs(60),
        cluster: false,
    };
    let registry = RedisRegistry::connect(settings, hub, metrics).await.expect("connect");
    let room = courtside::core::RoomName::parse("game:outside").expect("room");
    let (followed, then_ran) = tokio::sync::oneshot::channel();
    let caller = std::thread::spawn(move || {
        registry.follow(
            room,
            Box::new(move |_| {
                let _ = followed.send(());
            }),
        )
    });
    caller.join().expect("follow returns on a thread without a runtime");
    tokio::time::timeout(crate::util::HANG, then_ran)
        .await
        .expect("then in time")
        .expect("then ran");
}
