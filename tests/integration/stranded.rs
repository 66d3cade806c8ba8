//! Nothing accepted is stranded (issue 21): a publish answered 202 while a node resyncs with an
//! emptied Redis reaches Redis and every client; an event answered 200 but still in flight
//! through pub/sub when Redis dies empty reaches its holders; a node that holds a room answers
//! for it and comes back to `ok` without tripping on its pub/sub connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::util::{eventually, Client, RedisServer, TcpGate, TestServer, TOKEN};

fn node_on(url: &str, id: &str, extra: &[&str]) -> TestServer {
    let mut args = vec!["--no-wt", "--redis", url, "--node-id", id, "--node-heartbeat", "200ms"];
    args.extend_from_slice(extra);
    TestServer::start(&args)
}

/// Publishes an event; its status and the id the answer gives it (200 or 202 both carry one).
async fn publish_event(node: &TestServer, room: &str, n: u64) -> (u16, Option<String>) {
    let (status, body) = node
        .request(
            "POST",
            &format!("/v1/rooms/{room}/events"),
            Some(TOKEN),
            json!({"n": n}).to_string(),
        )
        .await;
    (status, body["id"].as_str().map(str::to_string))
}

/// The registry's part of `/health`: (status, outbox).
async fn registry_health(node: &TestServer) -> (String, u64) {
    let (_, body) = node.get("/health").await;
    (
        body["registry"]["status"].as_str().unwrap_or_default().to_string(),
        body["registry"]["outbox"].as_u64().unwrap_or(u64::MAX),
    )
}

async fn await_registry(node: &TestServer, status: &str) {
    eventually(&format!("registry {status}"), || async {
        (registry_health(node).await.0 == status).then_some(())
    })
    .await;
}

/// A client that follows docs/PROTOCOL.md for one room: it takes an event whose `seq` is above the
/// one it holds, follows notices, and counts how often each event id reached it.
struct Counting {
    ws: Client,
    seq: u64,
    ids: HashMap<String, usize>,
    /// Every event and notice taken, for the failure message.
    taken: Vec<String>,
    state: Option<Value>,
    version: u64,
}

impl Counting {
    async fn join(node: &TestServer, room: &str) -> Self {
        let mut ws = node.connect().await;
        let reply = ws.subscribe(room).await;
        Self {
            ws,
            seq: reply["seq"].as_u64().expect("seq"),
            ids: HashMap::new(),
            taken: Vec::new(),
            state: None,
            version: 0,
        }
    }

    fn take(&mut self, frame: Value) {
        match frame["type"].as_str() {
            Some("event") => {
                let seq = frame["seq"].as_u64().expect("seq");
                if seq > self.seq {
                    self.seq = seq;
                    *self
                        .ids
                        .entry(frame["id"].as_str().expect("id").to_string())
                        .or_default() += 1;
                    self.taken
                        .push(format!("{}@{seq}", frame["id"].as_str().unwrap_or_default()));
                }
            }
            Some("state") => {
                let version = frame["version"].as_u64().expect("version");
                if version > self.version {
                    self.version = version;
                    self.state = Some(frame["data"].clone());
                }
            }
            Some("subscribed") => {
                self.taken.push(frame.to_string());
                // A notice: the numbers the room goes on from (version 0 with recovered:false).
                self.seq = frame["seq"].as_u64().expect("seq");
                self.version = if frame["recovered"] == false {
                    0
                } else {
                    frame["version"].as_u64().expect("version")
                };
            }
            _ => {}
        }
    }

    /// Reads until every id of `expected` arrived (the test fails after the usual bound).
    async fn await_ids<'a>(&mut self, what: &str, expected: impl IntoIterator<Item = &'a String> + Clone) {
        let deadline = tokio::time::Instant::now() + crate::util::HANG;
        loop {
            let missing: Vec<&String> = expected
                .clone()
                .into_iter()
                .filter(|id| !self.ids.contains_key(*id))
                .collect();
            if missing.is_empty() {
                return;
            }
            match tokio::time::timeout_at(deadline, self.ws.recv()).await {
                Ok(frame) => self.take(frame),
                Err(_) => panic!(
                    "{what}: {} events never arrived (seq {}), first {:?}",
                    missing.len(),
                    self.seq,
                    &missing[..missing.len().min(5)]
                ),
            }
        }
    }

    /// Reads until the state is `want`.
    async fn await_state(&mut self, want: &Value) {
        while self.state.as_ref() != Some(want) {
            let frame = self.ws.recv().await;
            self.take(frame);
        }
    }
}

/// Fault 1: a publish that reaches a node while it resyncs with a Redis that came back empty is
/// answered 202 and must reach Redis, in order, and every client; `/health` never says `ok`
/// while the outbox holds anything. The node first queues many publishes, so that its flush
/// takes a while, and publishes keep arriving during it.
#[tokio::test]
async fn publishes_accepted_during_a_resync_reach_redis_and_every_client() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    // Redis keeps every event of the test in the room's history, for the check at the end.
    let keep = ["--history-size", "5000"];
    let publisher = node_on(&url, "p", &keep);
    let holder = node_on(&url, "h", &keep);
    let idle = node_on(&url, "i", &keep);
    let room = "bracket:3";
    let mut on_publisher = Counting::join(&publisher, room).await;
    let mut on_holder = Counting::join(&holder, room).await;
    let (status, first) = publish_event(&publisher, room, 0).await;
    assert_eq!(status, 200);
    let mut accepted: Vec<String> = first.into_iter().collect();

    redis.kill();
    await_registry(&publisher, "degraded").await;
    await_registry(&idle, "degraded").await;
    for n in 1..=1500 {
        let (status, id) = publish_event(&publisher, room, n).await;
        assert_eq!(status, 202, "queued while Redis is away");
        accepted.push(id.expect("a queued event has its id"));
    }
    redis.restart_empty();

    // Publishes go on through the resync until the node says ok; each health sample is checked.
    let mut n = 1500;
    loop {
        n += 1;
        let (status, id) = publish_event(&publisher, room, n).await;
        assert!(status == 200 || status == 202, "publish {n} answered {status}");
        accepted.push(id.expect("id"));
        let (health, outbox) = registry_health(&publisher).await;
        assert!(
            health != "ok" || outbox == 0,
            "/health says ok with {outbox} publishes in the outbox"
        );
        if health == "ok" {
            break;
        }
        assert!(n < 200_000, "the node never came back to ok");
    }
    for n in n + 1..=n + 5 {
        let (status, id) = publish_event(&publisher, room, n).await;
        assert_eq!(status, 200, "after the resync, publishes are numbered by Redis");
        accepted.push(id.expect("id"));
    }
    eventually("the outbox empties", || async {
        (registry_health(&publisher).await == ("ok".to_string(), 0)).then_some(())
    })
    .await;

    // Every accepted event reached both clients, each once, and Redis numbered every one.
    on_holder.await_ids("the holder's client", &accepted).await;
    on_publisher.await_ids("the publisher's client", &accepted).await;
    for (name, client) in [("holder", &on_holder), ("publisher", &on_publisher)] {
        let twice: Vec<_> = client.ids.iter().filter(|(_, count)| **count > 1).collect();
        if let Some((id, _)) = twice.first() {
            let around: Vec<_> = client
                .taken
                .iter()
                .filter(|t| t.starts_with(id.as_str()) || t.starts_with('{'))
                .collect();
            panic!("events delivered twice to the {name}'s client: {twice:?}; that id and the notices: {around:?}");
        }
    }
    // Redis holds every event accepted after it died (the one before it was lost with its data
    // and put back by the holders' numbers): read from the node without subscribers.
    let mut in_redis = std::collections::HashSet::new();
    let mut since = 1;
    loop {
        let (status, page) = idle.get(&format!("/v1/rooms/{room}/events?since={since}")).await;
        assert_eq!(status, 200, "{page}");
        for event in page["events"].as_array().expect("events") {
            in_redis.insert(event["id"].as_str().expect("id").to_string());
        }
        if page["more"] != true {
            break;
        }
        since = page["last_seq"].as_u64().expect("last_seq");
    }
    let missing: Vec<_> = accepted[1..].iter().filter(|id| !in_redis.contains(*id)).collect();
    assert!(missing.is_empty(), "accepted but never numbered by Redis: {missing:?}");

    // A node that followed no room during the outage subscribes and publishes as usual: its
    // pub/sub connection does not trip on the error of its last failed reconnect.
    await_registry(&idle, "ok").await;
    let mut fresh = idle.connect().await;
    fresh.subscribe("game:fresh").await;
    let (status, _) = publish_event(&idle, "game:fresh", 1).await;
    assert_eq!(status, 200, "published through Redis, not queued");
    assert_eq!(registry_health(&idle).await, ("ok".to_string(), 0));
}

/// Fault 2: an event (and a state) answered 200 by a node that does not hold the room, which its
/// holder never received (its path to Redis was cut), survives Redis dying and restarting empty:
/// the publishing node sends it again with its id and the holder's client gets it once. The
/// holder answers for its room throughout (never 404).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_in_flight_when_redis_dies_empty_reaches_its_holders() {
    let mut redis = RedisServer::start();
    let gate = TcpGate::start(redis.port).await;
    let holder = node_on(&format!("redis://127.0.0.1:{}", gate.port), "h", &[]);
    // A wide window, so that the test never depends on how fast the kill follows the publish.
    let publisher = node_on(&redis.url(), "p", &["--resend-window", "10m"]);
    let room = "game:flight";
    let mut fan = Counting::join(&holder, room).await;
    let (status, e1) = publish_event(&publisher, room, 1).await;
    assert_eq!(status, 200);
    let e1 = e1.expect("id");
    fan.await_ids("the fan", [&e1]).await;

    gate.close();
    await_registry(&holder, "degraded").await;
    let (status, e2) = publish_event(&publisher, room, 2).await;
    assert_eq!(status, 200, "numbered by Redis; the holder has not received it");
    let e2 = e2.expect("id");
    let state = json!({"home": 7, "away": 3});
    publisher.publish_state(room, &state.to_string()).await;

    // The holder's room must be answered for, whatever Redis holds, from now on.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (sampling, http) = (sampling.clone(), holder.http);
        tokio::spawn(async move {
            let mut answers = Vec::new();
            while sampling.load(Ordering::Acquire) {
                let (status, _, _) =
                    crate::util::request(http, "GET", "/v1/rooms/game:flight", None, &[], Default::default()).await;
                answers.push(status);
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            answers
        })
    };

    redis.restart_empty();
    gate.open();
    fan.await_ids("the fan", [&e1, &e2]).await;
    fan.await_state(&state).await;
    let (status, e3) = publish_event(&publisher, room, 3).await;
    assert_eq!(status, 200);
    let e3 = e3.expect("id");
    fan.await_ids("the fan", [&e1, &e2, &e3]).await;
    assert!(
        fan.ids.values().all(|count| *count == 1),
        "an event reached the fan twice: {:?}",
        fan.ids
    );
    sampling.store(false, Ordering::Release);
    let answers = sampler.await.expect("sampler");
    assert!(
        !answers.is_empty() && answers.iter().all(|s| *s == 200),
        "GET of a held room answered {answers:?}"
    );
    eventually("both nodes ok with empty outboxes", || async {
        let both = (registry_health(&holder).await, registry_health(&publisher).await);
        (both == (("ok".into(), 0), ("ok".into(), 0))).then_some(())
    })
    .await;
}

/// Fault 7's numbering that went back: a node that follows a room after its history expired in
/// Redis still knows the room's last `seq`, so an empty restart that it reseeds alone goes on
/// from there under the same epoch, not from 0 (a client holding seq 3 would drop 1, 2 and 3).
#[tokio::test]
async fn a_room_read_after_its_history_expired_keeps_its_numbering_across_an_empty_restart() {
    let mut redis = RedisServer::start();
    let node = node_on(&redis.url(), "n", &["--history-ttl", "1s"]);
    let room = "game:expired";
    for n in 1..=3 {
        assert_eq!(publish_event(&node, room, n).await.0, 200);
    }
    let conn = redis.connection().await;
    eventually("the room's history expired in Redis", || {
        let mut conn = conn.clone();
        async move {
            let exists: bool = redis::cmd("EXISTS")
                .arg(format!("cs:{{{room}}}:hist"))
                .query_async(&mut conn)
                .await
                .ok()?;
            (!exists).then_some(())
        }
    })
    .await;
    let mut fan = node.connect().await;
    let reply = fan.subscribe(room).await;
    assert_eq!(
        reply["seq"], 3,
        "the subscribe reply says how far the numbering went: {reply}"
    );
    let epoch = reply["epoch"].clone();

    redis.restart_empty();
    await_registry(&node, "ok").await;
    // `ok` once the room Redis lost has settled (docs/ARCHITECTURE.md, "Settling").
    assert_eq!(publish_event(&node, room, 4).await.0, 200);
    loop {
        let frame = fan.recv().await;
        if frame["type"] == "event" {
            assert_eq!(frame["seq"], 4, "{frame}");
            break;
        }
        if frame["type"] == "subscribed" {
            // A queued publish goes out under a local epoch first: nothing was missed.
            assert_eq!(frame["recovered"], true, "{frame}");
        }
    }
    eventually("the room is back on its epoch in Redis", || async {
        let (_, info) = node.get(&format!("/v1/rooms/{room}")).await;
        (info["epoch"] == epoch && info["last_seq"] == 4).then_some(())
    })
    .await;
}

/// Pub/sub is at most once: an event Redis numbered whose message never reached a holder (lost
/// around a reconnect) must not be skipped when the next one arrives. Redis here numbers seq 2
/// without publishing it, then publishes seq 3: the holder's client gets 2, from the history,
/// before 3.
#[tokio::test]
async fn a_live_event_past_a_lost_message_waits_for_it() {
    use courtside::registry::envelope::{self, EnvelopeBody};
    use redis::AsyncCommands;

    let redis = RedisServer::start();
    let node = node_on(&redis.url(), "h", &[]);
    let room = "game:gap";
    let mut client = Counting::join(&node, room).await;
    let (status, first) = publish_event(&node, room, 1).await;
    assert_eq!(status, 200);
    let first = first.expect("id");
    client.await_ids("the first event", [&first]).await;

    let mut conn = redis.connection().await;
    let (meta, hist, channel) = (
        format!("cs:{{{room}}}:meta"),
        format!("cs:{{{room}}}:hist"),
        format!("cs:{{{room}}}:ch"),
    );
    let epoch: String = conn.hget(&meta, "epoch").await.expect("epoch");
    let ts = 1_800_000_000_000u64;
    let (lost_id, live_id) = (0x1111_2222_3333_4444u64, 0x5555_6666_7777_8888u64);
    // Numbered and kept as the publish script does, but its message lost.
    for (seq, id, data) in [(2u64, lost_id, r#"{"n":2}"#), (3, live_id, r#"{"n":3}"#)] {
        let _: u64 = conn.hincr(&meta, "seq", 1).await.expect("seq");
        let _: String = redis::cmd("XADD")
            .arg(&hist)
            .arg("*")
            .arg(&[
                ("seq", seq.to_string()),
                ("ts", ts.to_string()),
                ("data", data.to_string()),
            ])
            .arg(&[
                ("origin", "elsewhere".to_string()),
                ("prov", String::new()),
                ("id", format!("{id:016x}")),
            ])
            .query_async(&mut conn)
            .await
            .expect("xadd");
        if seq == 3 {
            let body = EnvelopeBody {
                kind: 1,
                ts,
                data,
                origin: "elsewhere",
                provisional: None,
                event_id: id,
            };
            let _: u64 = conn
                .publish(&channel, envelope::encode(seq, &epoch, &body))
                .await
                .expect("publish");
        }
    }
    let (lost, live) = (format!("{lost_id:016x}"), format!("{live_id:016x}"));
    client
        .await_ids("the lost event and the live one", [&lost, &live])
        .await;
    let order: Vec<&String> = client.taken.iter().filter(|t| !t.starts_with('{')).collect();
    assert_eq!(
        order,
        [&format!("{first}@1"), &format!("{lost}@2"), &format!("{live}@3")],
        "in order, none skipped"
    );
}
