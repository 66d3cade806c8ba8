//! Every accepted event exactly once, for a client that follows docs/PROTOCOL.md ("Reconnecting"
//! and "Epochs"): three nodes on one Redis, through a Redis SIGKILL with an empty restart, a node
//! SIGKILL and a rolling restart.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Value};

use crate::util::{eventually, Client, RedisServer, Seen, TestServer, TOKEN};

fn node(redis: &RedisServer, id: &str) -> TestServer {
    crate::cluster::node_with(redis, id, &["--drain-timeout", "2s"])
}

/// A client written from docs/PROTOCOL.md alone: it numbers its subscribes, keeps the room's
/// epoch and last `seq`, follows notices, drops an event whose `id` it already holds, and after
/// its connection ends resubscribes through another node with `since` and the epoch.
struct ContractClient {
    room: String,
    ws: Client,
    epoch: String,
    seq: u64,
    version: u64,
    /// The state applied last (the newest, by the rules).
    state: Option<Value>,
    ids: HashSet<String>,
    /// The `n` of each event taken, in the order taken.
    taken: Vec<u64>,
    /// Events the server sent again (an id already held): what this issue removes.
    repeats: Vec<Value>,
    notices: Vec<Value>,
    next_request: u64,
}

impl ContractClient {
    async fn join(server: &TestServer, room: &str) -> Self {
        let mut client = Self {
            room: room.to_string(),
            ws: server.connect().await,
            epoch: String::new(),
            seq: 0,
            version: 0,
            state: None,
            ids: HashSet::new(),
            taken: Vec::new(),
            repeats: Vec::new(),
            notices: Vec::new(),
            next_request: 1,
        };
        client.subscribe(server, None).await;
        client
    }

    /// Subscribes (with `since` and the epoch when resuming) and handles the reply.
    async fn subscribe(&mut self, server: &TestServer, since: Option<u64>) {
        let request = self.next_request;
        self.next_request += 1;
        let mut command = json!({"type": "subscribe", "room": self.room, "id": request});
        if let Some(since) = since {
            command["since"] = json!(since);
            command["epoch"] = json!(self.epoch);
        }
        self.ws.send(command).await;
        loop {
            let frame = self.ws.recv().await;
            if frame["type"] == "subscribed" && frame["id"] == request {
                let epoch = frame["epoch"].as_str().expect("epoch").to_string();
                // Recovered: the events after `since` follow. Otherwise the live stream goes on
                // after the reply's `seq`. The state that follows applies unless it is the same
                // epoch's and not newer.
                match since {
                    Some(since) if frame["recovered"] == true => self.seq = since,
                    _ => self.seq = frame["seq"].as_u64().expect("seq"),
                }
                if epoch != self.epoch || frame["recovered"] != true {
                    self.version = 0;
                }
                self.epoch = epoch;
                if since.is_some() && frame["recovered"] == false {
                    self.refetch(server).await;
                }
                return;
            }
            self.take(server, frame).await;
        }
    }

    /// `recovered: false`: what the history still holds, by id, before the live stream.
    async fn refetch(&mut self, server: &TestServer) {
        let mut since = 0;
        loop {
            let (status, body) = server
                .get(&format!("/v1/rooms/{}/events?since={since}", self.room))
                .await;
            if status != 200 || body["epoch"] != self.epoch.as_str() {
                return;
            }
            for event in body["events"].as_array().cloned().unwrap_or_default() {
                if self.ids.insert(event["id"].as_str().expect("id").to_string()) {
                    self.taken.push(event["data"]["n"].as_u64().expect("n"));
                }
            }
            if body["more"] != true {
                return;
            }
            since = body["last_seq"].as_u64().expect("last_seq");
        }
    }

    async fn take(&mut self, server: &TestServer, frame: Value) {
        match frame["type"].as_str() {
            Some("subscribed") => {
                // An unrequested notice: a new epoch, the numbers to go on from.
                self.epoch = frame["epoch"].as_str().expect("epoch").to_string();
                self.seq = frame["seq"].as_u64().expect("seq");
                self.version = frame["version"].as_u64().expect("version");
                let recovered = frame["recovered"] != false;
                self.notices.push(frame);
                if !recovered {
                    self.refetch(server).await;
                }
            }
            Some("event") => {
                let seq = frame["seq"].as_u64().expect("seq");
                assert_eq!(seq, self.seq + 1, "a sequence skipped or repeated: {frame}");
                self.seq = seq;
                let id = frame["id"].as_str().expect("every event has an id").to_string();
                if self.ids.insert(id) {
                    self.taken.push(frame["data"]["n"].as_u64().expect("n"));
                } else {
                    self.repeats.push(frame);
                }
            }
            Some("state") => {
                let version = frame["version"].as_u64().expect("version");
                if version > self.version {
                    self.version = version;
                    self.state = Some(frame["data"].clone());
                }
            }
            Some("reconnect") => {}
            _ => panic!("unexpected {frame}"),
        }
    }

    /// Reads until every `n` in `wanted` was taken, resubscribing through `servers[next]` when the
    /// connection ends (a killed or draining node).
    async fn until(&mut self, wanted: &[u64], servers: &[&TestServer], mut next: usize) {
        let mut live = 0;
        while !wanted.iter().all(|n| self.taken.contains(n)) {
            let Ok(seen) = tokio::time::timeout(std::time::Duration::from_secs(20), self.ws.next_seen()).await else {
                let missing: Vec<&u64> = wanted.iter().filter(|n| !self.taken.contains(n)).collect();
                panic!(
                    "events never arrived: {missing:?}; taken {:?}; notices {:?}; at seq {} of {}",
                    self.taken, self.notices, self.seq, self.epoch
                );
            };
            match seen {
                Seen::Json(frame) => self.take(servers[live], frame).await,
                Seen::Close(_) | Seen::Ended => {
                    next %= servers.len();
                    live = next;
                    self.ws = servers[live].connect().await;
                    self.subscribe(servers[live], Some(self.seq)).await;
                    next += 1;
                }
            }
        }
    }

    /// Reads until the applied state is `wanted`.
    async fn until_state(&mut self, wanted: &Value, server: &TestServer) {
        while self.state.as_ref() != Some(wanted) {
            match self.ws.next_seen().await {
                Seen::Json(frame) => self.take(server, frame).await,
                other => panic!("the connection ended: {other:?}"),
            }
        }
    }

    /// Every accepted event once, none the server did not accept, none sent twice.
    fn assert_exactly_once(&self, accepted: &[u64], attempted: &[u64]) {
        assert!(self.repeats.is_empty(), "events sent twice: {:?}", self.repeats);
        let mut counts: HashMap<u64, usize> = HashMap::new();
        for n in &self.taken {
            *counts.entry(*n).or_default() += 1;
        }
        assert!(counts.values().all(|c| *c == 1), "taken twice: {:?}", self.taken);
        for n in accepted {
            assert!(
                counts.contains_key(n),
                "accepted event {n} never arrived: {:?}",
                self.taken
            );
        }
        for n in &self.taken {
            assert!(attempted.contains(n), "event {n} was never published");
        }
    }
}

/// Publishes event `{"n": n}`; returns whether it was accepted (200, or 202 while Redis is away).
async fn publish(server: &TestServer, room: &str, n: u64) -> bool {
    publish_status(server, room, n).await.is_some()
}

/// The status of an accepted publish (200 or 202), `None` for any other.
async fn publish_status(server: &TestServer, room: &str, n: u64) -> Option<u16> {
    let (status, body) = publish_answer(server, room, n).await;
    if status == 200 || status == 202 {
        assert!(body["id"].is_string(), "the answer names the event's id: {body}");
        return Some(status);
    }
    None
}

/// A publish during a fault: the status when accepted (200, or 202 while Redis is away), `None`
/// when refused as documented (503 `registry_unavailable`: the outbox is full); any other
/// answer (a 500, say) fails the test.
async fn publish_during_fault(server: &TestServer, room: &str, n: u64) -> Option<u16> {
    let (status, body) = publish_answer(server, room, n).await;
    match status {
        200 | 202 => {
            assert!(body["id"].is_string(), "the answer names the event's id: {body}");
            Some(status)
        }
        503 if body["error"] == "registry_unavailable" => None,
        _ => panic!("publish {n} during the fault was answered {status}: {body}"),
    }
}

async fn publish_answer(server: &TestServer, room: &str, n: u64) -> (u16, Value) {
    server
        .request(
            "POST",
            &format!("/v1/rooms/{room}/events"),
            Some(TOKEN),
            json!({"n": n}).to_string(),
        )
        .await
}

/// Waits until the node is on Redis again with an empty outbox (its /health says so).
pub(crate) async fn healthy(server: &TestServer) {
    eventually("the node is on redis with an empty outbox", || async {
        let (_, health) = server.get("/health").await;
        (health["registry"]["status"] == "ok" && health["registry"]["outbox"] == 0).then_some(())
    })
    .await;
}

/// The repro: clients on three nodes while publishes go round-robin; Redis is SIGKILLed
/// and restarted empty. Each client gets every accepted event once (the events each node accepted
/// alone reach the others' clients when Redis returns), and resubscribing through the next node
/// with the notice's `since` and epoch recovers nothing twice.
#[tokio::test]
async fn every_event_once_across_a_redis_kill_and_empty_restart() {
    const ROOM: &str = "bracket:3";
    let mut redis = RedisServer::start();
    let nodes = [node(&redis, "n1"), node(&redis, "n2"), node(&redis, "n3")];
    let mut clients = Vec::new();
    for n in &nodes {
        clients.push(ContractClient::join(n, ROOM).await);
    }
    let (mut accepted, mut attempted) = (Vec::new(), Vec::new());
    let mut n = 0;
    let mut round = |count: u64| {
        let range = n + 1..=n + count;
        n += count;
        range
    };
    // Redis is healthy: every publish is accepted.
    for i in round(30) {
        attempted.push(i);
        assert_eq!(
            publish_status(&nodes[i as usize % 3], ROOM, i).await,
            Some(200),
            "publish {i}"
        );
        accepted.push(i);
    }
    redis.kill();
    // The fault window, from the kill until every node is back on Redis: a publish is accepted
    // or refused as documented (503 `registry_unavailable`), never anything else.
    let mut queued = 0;
    for i in round(30) {
        attempted.push(i);
        if let Some(status) = publish_during_fault(&nodes[i as usize % 3], ROOM, i).await {
            queued += usize::from(status == 202);
            accepted.push(i);
        }
    }
    assert!(
        queued >= 20,
        "publishes during the outage wait in the outboxes: {queued} of 30"
    );
    redis.restart_empty();
    // Publishes go on while the nodes find Redis again and resync.
    for i in round(30) {
        attempted.push(i);
        if publish_during_fault(&nodes[i as usize % 3], ROOM, i).await.is_some() {
            accepted.push(i);
        }
    }
    for n in &nodes {
        healthy(n).await;
    }
    // Back on Redis: every publish is accepted again.
    for i in round(10) {
        attempted.push(i);
        assert_eq!(
            publish_status(&nodes[i as usize % 3], ROOM, i).await,
            Some(200),
            "publish {i}"
        );
        accepted.push(i);
    }
    let all: Vec<&TestServer> = nodes.iter().collect();
    for (i, client) in clients.iter_mut().enumerate() {
        client.until(&accepted, &all, i + 1).await;
        client.assert_exactly_once(&accepted, &attempted);
        assert!(
            client.notices.iter().any(|n| n["recovered"] == true),
            "client {i} was told of the local epoch and of the return: {:?}",
            client.notices
        );
        // What each node accepted reached its own clients in the order it accepted them.
        for node_index in 0..3u64 {
            let own: Vec<u64> = client.taken.iter().copied().filter(|n| n % 3 == node_index).collect();
            let mut sorted = own.clone();
            sorted.sort_unstable();
            assert_eq!(own, sorted, "client {i}: node {node_index}'s events out of order");
        }
    }
    let newest = json!({"standings": "final"});
    nodes[0].publish_state(ROOM, &newest.to_string()).await;
    for (i, client) in clients.iter_mut().enumerate() {
        client.until_state(&newest, &nodes[i]).await;
    }
    // The repro's step: resubscribe through the next node with the last seq and epoch.
    for (i, client) in clients.iter_mut().enumerate() {
        let next = &nodes[(i + 1) % 3];
        client.ws = next.connect().await;
        let since = client.seq;
        client.subscribe(next, Some(since)).await;
        // Nothing is pending on the new connection: a later publish is the next event it sees.
        assert!(publish(next, ROOM, 1000 + i as u64).await);
        client.until(&[1000 + i as u64], &all, i + 1).await;
        assert!(
            client.repeats.is_empty(),
            "client {i} got events again: {:?}",
            client.repeats
        );
        assert_eq!(client.taken.last(), Some(&(1000 + i as u64)));
    }
}

/// A node SIGKILLed while publishes flow: its clients resubscribe through another node with
/// `since` and get every accepted event once, in the order published.
#[tokio::test]
async fn every_event_once_and_in_order_across_a_node_kill() {
    const ROOM: &str = "game:kill";
    let redis = RedisServer::start();
    let mut nodes = [node(&redis, "n1"), node(&redis, "n2"), node(&redis, "n3")];
    let mut on_first = ContractClient::join(&nodes[0], ROOM).await;
    let mut on_third = ContractClient::join(&nodes[2], ROOM).await;
    let mut accepted = Vec::new();
    for i in 1..=40u64 {
        if i == 20 {
            nodes[0].kill();
        }
        let through = if i < 20 {
            &nodes[(i % 3) as usize]
        } else {
            &nodes[1 + (i % 2) as usize]
        };
        assert!(publish(through, ROOM, i).await);
        accepted.push(i);
    }
    let survivors: Vec<&TestServer> = nodes[1..].iter().collect();
    on_first.until(&accepted, &survivors, 0).await;
    on_third.until(&accepted, &survivors, 1).await;
    let newest = json!({"score": "final"});
    nodes[1].publish_state(ROOM, &newest.to_string()).await;
    for client in [&mut on_first, &mut on_third] {
        client.assert_exactly_once(&accepted, &accepted);
        assert_eq!(client.taken, accepted, "in the order published");
    }
    on_first.until_state(&newest, &nodes[1]).await;
    on_third.until_state(&newest, &nodes[2]).await;
}

/// A rolling restart: each node in turn gets SIGTERM (its clients are told to reconnect and
/// resubscribe elsewhere) and a replacement joins; publishes never stop. Every accepted event
/// reaches each client once, in the order published.
#[tokio::test]
async fn every_event_once_and_in_order_across_a_rolling_restart() {
    const ROOM: &str = "league:roll";
    let redis = RedisServer::start();
    let mut nodes = [node(&redis, "n1"), node(&redis, "n2"), node(&redis, "n3")];
    let mut clients = Vec::new();
    for n in &nodes {
        clients.push(ContractClient::join(n, ROOM).await);
    }
    let mut accepted = Vec::new();
    let mut n = 0u64;
    for turn in 0..3 {
        for _ in 0..10 {
            n += 1;
            assert!(publish(&nodes[(turn + 1) % 3], ROOM, n).await);
            accepted.push(n);
        }
        nodes[turn].sigterm();
        // Draining: a publish to the draining node is still accepted, the others carry on.
        for _ in 0..10 {
            n += 1;
            assert!(publish(&nodes[(turn + 1 + (n as usize % 2)) % 3], ROOM, n).await);
            accepted.push(n);
        }
        // The clients of the draining node move to another node while events flow.
        let others: Vec<&TestServer> = (1..3).map(|k| &nodes[(turn + k) % 3]).collect();
        for client in clients.iter_mut() {
            client.until(&accepted, &others, 0).await;
        }
        nodes[turn].wait_exit().await;
        nodes[turn] = node(&redis, &format!("n{}b", turn + 1));
    }
    let newest = json!({"league": "final"});
    nodes[0].publish_state(ROOM, &newest.to_string()).await;
    for client in clients.iter_mut() {
        client.assert_exactly_once(&accepted, &accepted);
        assert_eq!(client.taken, accepted, "in the order published");
        client.until_state(&newest, &nodes[0]).await;
    }
}

/// A Redis Cluster of three masters with a replica each. Node n1's client follows a room on
/// master Z and a room on a healthy master; n2 publishes to the first, n3 to the second (n3
/// never needs Z). Z is SIGKILLed and its replica takes over: n1's client gets every accepted
/// event of both rooms once, the healthy room's included while n1 could not reach Z, and only
/// the dead shard's room goes into outage.
#[tokio::test]
async fn every_event_once_across_a_cluster_master_kill() {
    use crate::util::RedisCluster;
    let mut cluster = RedisCluster::start_with_replicas(1).await;
    let url = cluster.url();
    let start = |id: &str| {
        TestServer::start(&[
            "--no-wt",
            "--redis",
            &url,
            "--redis-cluster",
            "--node-id",
            id,
            "--node-heartbeat",
            "200ms",
        ])
    };
    let master = |key: String| {
        let cluster = &cluster;
        async move { cluster.master_of(&key, None).await.expect("a master") }
    };
    // The node records' slot stays up; the doomed room's master is another one.
    let nodes_master = master("cs:{nodes}:n1".into()).await;
    let mut doomed_room = None;
    for i in 0..64 {
        let room = format!("bracket:z{i}");
        if master(format!("cs:{{{room}}}:meta")).await != nodes_master {
            doomed_room = Some(room);
            break;
        }
    }
    let doomed_room = doomed_room.expect("a room off the node records' master");
    let doomed = master(format!("cs:{{{doomed_room}}}:meta")).await;
    let mut healthy_room = None;
    for i in 0..64 {
        let room = format!("game:h{i}");
        if master(format!("cs:{{{room}}}:meta")).await != doomed {
            healthy_room = Some(room);
            break;
        }
    }
    let healthy_room = healthy_room.expect("a room on another master");
    let (n1, n2, n3) = (start("n1"), start("n2"), start("n3"));
    let mut on_z = ContractClient::join(&n1, &doomed_room).await;
    let mut on_h = ContractClient::join(&n1, &healthy_room).await;
    let (mut accepted_z, mut accepted_h, mut attempted) = (Vec::new(), Vec::new(), Vec::new());
    // (to the dead shard's room, status) of every accepted publish.
    let mut statuses = Vec::new();
    let mut n = 0u64;
    let mut publish_round = async |count: u64, must: bool| {
        for _ in 0..count {
            n += 1;
            attempted.push(n);
            let (server, room, accepted) = if n % 2 == 0 {
                (&n2, &doomed_room, &mut accepted_z)
            } else {
                (&n3, &healthy_room, &mut accepted_h)
            };
            let status = publish_status(server, room, n).await;
            assert!(status.is_some() || !must, "publish {n} refused");
            if let Some(status) = status {
                accepted.push(n);
                statuses.push((n % 2 == 0, status));
            }
        }
    };
    publish_round(20, true).await;
    cluster.kill_port(doomed);
    // Publishes flow at about 40 a second through the failover (cluster-node-timeout is 2 s
    // here), until a replica holds the dead master's slots and every node is back on Redis.
    let mut rounds = 0;
    loop {
        publish_round(2, false).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        rounds += 1;
        assert!(rounds < 1200, "the failover did not finish within a minute");
        if rounds % 4 != 0 {
            continue;
        }
        let promoted = cluster
            .master_of(&format!("cs:{{{doomed_room}}}:meta"), Some(doomed))
            .await;
        if promoted.is_none_or(|m| m == doomed) {
            continue;
        }
        let mut all_ok = true;
        for server in [&n1, &n2, &n3] {
            let (_, health) = server.get("/health").await;
            all_ok &= health["registry"]["status"] == "ok" && health["registry"]["outbox"] == 0;
        }
        if all_ok {
            break;
        }
    }
    publish_round(20, true).await;
    for (room, server) in [(&doomed_room, &n2), (&healthy_room, &n3)] {
        server.publish_state(room, &json!({"final": room}).to_string()).await;
    }
    let servers = [&n1];
    on_z.until(&accepted_z, &servers, 0).await;
    on_z.until_state(&json!({"final": doomed_room}), &n1).await;
    on_h.until_state(&json!({"final": healthy_room}), &n1).await;
    on_h.until(&accepted_h, &servers, 0).await;
    on_z.assert_exactly_once(&accepted_z, &attempted);
    on_h.assert_exactly_once(&accepted_h, &attempted);
    // A room's fate follows its own shard: the healthy room's publishes were numbered by Redis
    // throughout and its client never saw an outage; the dead shard's room waited in an outbox.
    assert!(
        statuses
            .iter()
            .filter(|(doomed, _)| !doomed)
            .all(|(_, status)| *status == 200),
        "the healthy shard's room was answered 202: {statuses:?}"
    );
    assert!(
        on_h.notices.is_empty(),
        "the healthy room changed epoch: {:?}",
        on_h.notices
    );
    assert!(
        statuses.iter().any(|(doomed, status)| *doomed && *status == 202),
        "the dead shard's room was queued meanwhile"
    );
}

/// A resharded slot of a live room: three nodes on a Redis Cluster of three masters with a
/// replica each, a client on each, publishes through all three at about 20 a second while the
/// room's slot moves to another master. Every client gets every event once, in the order
/// published, and ends on the newest state.
#[tokio::test]
async fn every_event_once_and_in_order_across_a_resharded_slot() {
    use crate::util::RedisCluster;
    const ROOM: &str = "bracket:moving";
    let cluster = RedisCluster::start_with_replicas(1).await;
    let url = cluster.url();
    let start = |id: &str| TestServer::start(&["--no-wt", "--redis", &url, "--redis-cluster", "--node-id", id]);
    let nodes = [start("n1"), start("n2"), start("n3")];
    let mut clients = Vec::new();
    for n in &nodes {
        clients.push(ContractClient::join(n, ROOM).await);
    }
    let addrs: Vec<std::net::SocketAddr> = nodes.iter().map(|n| n.http).collect();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let publisher = tokio::spawn(async move {
        let mut accepted = Vec::new();
        for n in 1..=2000u64 {
            let body = json!({"n": n}).to_string();
            let path = format!("/v1/rooms/{ROOM}/events");
            let (status, _, _) =
                crate::util::request(addrs[n as usize % 3], "POST", &path, Some(TOKEN), &[], body.into()).await;
            assert_eq!(status, 200, "publish {n}");
            accepted.push(n);
            if n >= 20 && stop_rx.try_recv().is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        accepted
    });
    let slot: u64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(format!("cs:{{{ROOM}}}:ch"))
        .query_async(&mut crate::util::cluster_node_connection(cluster.ports[0]).await)
        .await
        .expect("keyslot");
    let (from, to) = crate::cluster::move_slot(&cluster, slot).await;
    assert_ne!(from, to);
    // Publishing goes on a while on the new owner, then stops.
    eventually("the room's channel is subscribed on the slot's new owner", || async {
        let mut conn = crate::util::cluster_node_connection(to).await;
        let reply: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("SHARDNUMSUB")
            .arg(format!("cs:{{{ROOM}}}:ch"))
            .query_async(&mut conn)
            .await
            .ok()?;
        reply.first().is_some_and(|r| r.1 == 3).then_some(())
    })
    .await;
    let _ = stop_tx.send(());
    let accepted = publisher.await.expect("publisher");
    let last_state = json!({"final": accepted.len()});
    nodes[1].publish_state(ROOM, &last_state.to_string()).await;
    let all: Vec<&TestServer> = nodes.iter().collect();
    for (i, client) in clients.iter_mut().enumerate() {
        client.until(&accepted, &all, i + 1).await;
        client.until_state(&last_state, &nodes[i]).await;
        client.assert_exactly_once(&accepted, &accepted);
        assert_eq!(client.taken, accepted, "client {i}: in the order published");
    }
}

/// Redis restarted empty while a node that does not hold a room (no subscriber of it there) has
/// publishes of it in its outbox, and the node that holds the room reaches Redis again only after
/// that one did: the publishes wait for the holder to put the room's epoch and numbers back, so its
/// client sees no new epoch (nothing to refetch) and every event once. (Before, the first flush
/// started the room over under a new epoch.)
// Multi-threaded: the gate forwards while the test thread waits for a server to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_of_a_room_a_node_does_not_hold_wait_for_its_holder_after_an_empty_restart() {
    use crate::util::TcpGate;
    const ROOM: &str = "bracket:held";
    let mut redis = RedisServer::start();
    let gate = TcpGate::start(redis.port).await;
    let start = |url: String, id: &str| {
        TestServer::start(&[
            "--no-wt",
            "--redis",
            &url,
            "--node-id",
            id,
            "--node-heartbeat",
            "1500ms",
        ])
    };
    let holder = start(format!("redis://127.0.0.1:{}", gate.port), "holder");
    let other = start(redis.url(), "other");
    let mut client = ContractClient::join(&holder, ROOM).await;
    let mut accepted = Vec::new();
    for n in 1..=10 {
        assert!(publish(&other, ROOM, n).await);
        accepted.push(n);
    }
    // Delivered before the cut: the gate drops what it holds in flight when it closes.
    client.until(&accepted, &[&holder], 0).await;
    gate.close();
    redis.kill();
    for n in 11..=20 {
        assert!(publish(&other, ROOM, n).await);
        accepted.push(n);
    }
    for n in 21..=25 {
        assert!(publish(&holder, ROOM, n).await);
        accepted.push(n);
    }
    redis.restart_empty();
    // The other node is back on Redis (its heartbeat wrote its record) before the holder is.
    eventually("the other node is back on redis", || async {
        let mut conn = redis.connection().await;
        let back: bool = redis::cmd("EXISTS")
            .arg("cs:{nodes}:other")
            .query_async(&mut conn)
            .await
            .ok()?;
        back.then_some(())
    })
    .await;
    gate.open();
    healthy(&holder).await;
    healthy(&other).await;
    for n in 26..=30 {
        assert!(publish(&other, ROOM, n).await);
        accepted.push(n);
    }
    client.until(&accepted, &[&holder], 0).await;
    client.assert_exactly_once(&accepted, &accepted);
    assert!(
        client.notices.iter().all(|n| n["recovered"] == true),
        "the room kept its numbering: {:?}",
        client.notices
    );
}
