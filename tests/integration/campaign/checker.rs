//! The checker: after the faults heal and the system is quiet, every publish answered 200 or
//! 202 reached every client of its room exactly once, in the order its node took it from its
//! publisher, none twice, nothing unpublished; and every client holds the room's newest state.
//! It excuses only what the docs allow (see `excuse`), and counts what it excused.

use std::collections::HashMap;

use serde_json::Value;
use std::time::Duration;

use tokio::time::Instant;

use super::client::ClientView;
use super::procs::{Ended, Incarnation};
use super::publisher::{Fate, Publish, MARKER};

/// What the checker found: failures (each a kind and a text) and what it excused.
#[derive(Default, Debug)]
pub struct Verdict {
    pub failures: Vec<(String, String)>,
    pub excused: HashMap<String, usize>,
    pub accepted: usize,
    pub queued: usize,
    pub deliveries: usize,
}

impl Verdict {
    pub fn fail(&mut self, kind: &str, text: String) {
        self.failures.push((kind.to_string(), text));
    }
}

pub struct Inputs<'a> {
    pub publishes: &'a [Publish],
    /// Per client: its rooms and what it holds.
    pub clients: Vec<(usize, Vec<usize>, &'a ClientView)>,
    /// Per node: its lives.
    pub lives: Vec<Vec<Incarnation>>,
    /// Per room: the state every node answers for it (`GET /v1/rooms/{room}`'s `state.data`).
    pub room_state: Vec<Option<Value>>,
    pub start: Instant,
    /// (node, from, until) of every cut or stalled path to Redis.
    pub broken_paths: &'a [(usize, Instant, Option<Instant>)],
    /// When Redis restarted empty.
    pub empty_restarts: &'a [Instant],
    /// When Redis was killed, and when it came back.
    pub redis_outages: &'a [(Instant, Option<Instant>)],
}

/// When the nodes were surely back on a Redis that restarted empty at `restarted`: the settle
/// time after it, or, if Redis went away again before that, after it came back from that too.
fn settled_after(inputs: &Inputs, restarted: Instant) -> Instant {
    let mut back = restarted;
    while let Some((_, again)) = inputs
        .redis_outages
        .iter()
        .find(|(killed, _)| *killed >= back && *killed <= back + SETTLE_AND_PROBE)
    {
        match again {
            Some(again) if *again > back => back = *again,
            // Still away when the run ended, or already counted.
            Some(_) => break,
            None => return back + Duration::from_secs(3600),
        }
    }
    back + SETTLE_AND_PROBE
}

/// A room's settle time after an empty restart (`RedisSettings::settle`: two `--node-heartbeat`s
/// of 200 ms), and the 0.5 s a node may take to notice that Redis is back.
const SETTLE_AND_PROBE: std::time::Duration = std::time::Duration::from_millis(900);

/// `--resend-window`: how long a node keeps what Redis numbered, to send it again.
const RESEND_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

/// ARCHITECTURE.md "What an empty restart can still lose": Redis died empty and, around it, a
/// node died (its recent publishes with it) or its path was cut or stalled past the settle time.
/// Events Redis numbered can then be lost, and a client sees their `seq` skipped (PROTOCOL.md,
/// "Epochs": skipped, never repeated).
fn empty_restart_lost_events(inputs: &Inputs) -> bool {
    inputs.empty_restarts.iter().any(|&restarted| {
        let from = restarted
            .checked_sub(RESEND_WINDOW + Duration::from_secs(3))
            .unwrap_or(inputs.start);
        let settled = settled_after(inputs, restarted);
        let node_died = inputs.lives.iter().flatten().any(|life| {
            life.ended
                .as_ref()
                .is_some_and(|(at, how)| *at >= from && *at <= settled && !matches!(how, Ended::NoStart))
        });
        let path_broken = inputs
            .broken_paths
            .iter()
            .any(|&(_, broken, until)| broken <= settled && until.is_none_or(|until| until >= restarted));
        node_died || path_broken
    })
}

/// ARCHITECTURE.md "Safe retries for publishers": idempotency keys live in Redis, so one that
/// restarts empty forgets them; a keyed publish whose first attempt got no answer (its node
/// stopped or died mid-publish) and that was retried after can then be published twice.
fn key_lost_with_redis(inputs: &Inputs, publish: &Publish) -> bool {
    let unanswered = publish.attempts.iter().any(|(_, _, what)| what == "NoAnswer");
    let (Some(first), Some(last)) = (publish.attempts.first(), publish.attempts.last()) else {
        return false;
    };
    let (first, last) = (
        inputs.start + Duration::from_millis(first.1 as u64),
        inputs.start + Duration::from_millis(last.1 as u64),
    );
    publish.keyed
        && unanswered
        && inputs
            .empty_restarts
            .iter()
            .any(|&r| r >= first && r <= last + SETTLE_AND_PROBE)
}

/// Why an accepted event may be missing at a client, per the docs; `None`: it must be there.
fn excuse(inputs: &Inputs, publish: &Publish, view: &ClientView) -> Option<&'static str> {
    let (status, node, at) = publish.accepted_at()?;
    // README "Several nodes": a 202 waits in the node's outbox; a node that dies (SIGKILL, or a
    // drain that ends with `unflushed`) loses what it still holds.
    if status == 202 {
        let life = inputs.lives[node].iter().rev().find(|l| l.started <= at);
        let lost_with_node = life.is_some_and(|l| {
            matches!(
                l.ended,
                Some((_, Ended::Killed | Ended::Exited | Ended::NoStart)) | Some((_, Ended::Termed { unflushed: 1.. }))
            )
        });
        if lost_with_node {
            return Some("202, and its node died with its outbox");
        }
    }
    // ARCHITECTURE.md "Settling" and "What an empty restart can still lose": an event Redis
    // numbered in the resend window before it died empty can be lost when a node's path to Redis
    // is cut or stalled past the room's settle time after the restart (that node puts its numbers
    // back, or sends its recent publishes again, after new numbers were handed out).
    if status == 200 {
        let late_node = inputs.empty_restarts.iter().any(|&restarted| {
            let killed_after_publish =
                at <= restarted && restarted.duration_since(at) <= RESEND_WINDOW + Duration::from_secs(3);
            killed_after_publish
                && inputs.broken_paths.iter().any(|&(_, from, until)| {
                    from <= settled_after(inputs, restarted) && until.is_none_or(|until| until >= restarted)
                })
        });
        if late_node {
            return Some("200 before Redis died empty, and a node's path was cut or stalled past the settle time");
        }
    }
    // "An event whose accepting node dies too before it resyncs (its recent publishes die with
    // it)": a 200, or a 202 that its node flushed to a Redis that then died empty (its drain
    // flushed it in a moment Redis was back, so it reports nothing unflushed).
    if status == 200 || status == 202 {
        let life = inputs.lives[node].iter().rev().find(|l| l.started <= at);
        let publisher_died = inputs.empty_restarts.iter().any(|&restarted| {
            at <= restarted
                && restarted.duration_since(at) <= RESEND_WINDOW + Duration::from_secs(3)
                && life.is_some_and(|l| {
                    l.ended
                        .as_ref()
                        .is_some_and(|(ended, _)| *ended <= settled_after(inputs, restarted))
                })
        });
        if publisher_died {
            return Some("accepted before Redis died empty, and its node died before it could send it again");
        }
    }
    // PROTOCOL.md "After each `subscribed`": `recovered:false` whose refetch finds the history
    // gone (410, or emptied by an empty Redis restart): those events are gone for the client.
    let room = view.rooms.get(&publish.room)?;
    if room.gaps.iter().any(|(when, _)| *when >= at) {
        return Some("the client's recovery found the history gone (recovered:false, then 410 or a shorter history)");
    }
    None
}

pub fn check(inputs: &Inputs) -> Verdict {
    let mut verdict = Verdict::default();
    let by_n: HashMap<u64, &Publish> = inputs.publishes.iter().map(|p| (p.n, p)).collect();
    let events: Vec<&Publish> = inputs.publishes.iter().filter(|p| p.event).collect();
    verdict.accepted = inputs.publishes.iter().filter(|p| p.accepted_at().is_some()).count();
    verdict.queued = inputs
        .publishes
        .iter()
        .filter(|p| matches!(p.accepted_at(), Some((202, _, _))))
        .count();
    for (node, lives) in inputs.lives.iter().enumerate() {
        for (life, incarnation) in lives.iter().enumerate() {
            if let Some((at, Ended::Exited)) = incarnation.ended {
                verdict.fail(
                    "node exited",
                    format!(
                        "node {node} life {life} exited by itself at {} ms ({})",
                        at.saturating_duration_since(inputs.start).as_millis(),
                        incarnation.log.display()
                    ),
                );
            }
        }
    }
    for (client, rooms, view) in &inputs.clients {
        for room in rooms {
            let Some(held) = view.rooms.get(room) else {
                verdict.fail("never subscribed", format!("client {client} room {room}"));
                continue;
            };
            verdict.deliveries += held.taken.len();
            for anomaly in &held.anomalies {
                if anomaly.starts_with("seq skipped") && empty_restart_lost_events(inputs) {
                    *verdict
                        .excused
                        .entry("a seq skipped after Redis died empty while a node died or was cut off".to_string())
                        .or_default() += 1;
                    continue;
                }
                verdict.fail("protocol", format!("client {client} room {room}: {anomaly}"));
            }
            // Exactly once, and nothing that was not published to this room.
            let mut positions: HashMap<u64, Vec<usize>> = HashMap::new();
            for (i, taken) in held.taken.iter().enumerate() {
                positions.entry(taken.n).or_default().push(i);
                if taken.n >= MARKER {
                    continue;
                }
                match by_n.get(&taken.n) {
                    Some(p) if p.room == *room && p.event => {
                        if let Fate::Refused(why) = &p.fate {
                            verdict.fail(
                                "published though refused",
                                format!("client {client} room {room}: n={} ({why}): {:?}", taken.n, p.attempts),
                            );
                        }
                    }
                    _ => verdict.fail("never published", format!("client {client} room {room}: {:?}", taken)),
                }
            }
            for (n, at) in &positions {
                if at.len() > 1 && by_n.get(n).is_some_and(|p| key_lost_with_redis(inputs, p)) {
                    *verdict
                        .excused
                        .entry("a keyed publish retried after Redis died empty with its key".to_string())
                        .or_default() += 1;
                    continue;
                }
                if at.len() > 1 {
                    let copies: Vec<String> = at
                        .iter()
                        .map(|i| {
                            let t = &held.taken[*i];
                            format!("id {} seq {} epoch {} refetched {}", t.id, t.seq, t.epoch, t.refetched)
                        })
                        .collect();
                    let attempts = by_n.get(n).map(|p| format!("{:?}", p.attempts)).unwrap_or_default();
                    verdict.fail(
                        "twice",
                        format!(
                            "client {client} room {room}: n={n} taken {} times: {copies:?}; attempts {attempts}",
                            at.len()
                        ),
                    );
                }
            }
            // Every accepted event, unless the docs excuse it.
            for publish in events.iter().filter(|p| p.room == *room) {
                let Some((status, node, at)) = publish.accepted_at() else {
                    continue;
                };
                if positions.contains_key(&publish.n) {
                    continue;
                }
                if let Some(why) = excuse(inputs, publish, view) {
                    *verdict.excused.entry(why.to_string()).or_default() += 1;
                    continue;
                }
                let id = match &publish.fate {
                    Fate::Accepted { body, .. } => body["id"].as_str().unwrap_or_default().to_string(),
                    _ => String::new(),
                };
                verdict.fail(
                    "missing",
                    format!(
                        "client {client} room {room}: n={} (keyed {}) id {id} answered {status} by node {node} at {} ms never arrived; attempts {:?}",
                        publish.n,
                        publish.keyed,
                        at.duration_since(inputs.start).as_millis(),
                        publish.attempts
                    ),
                );
            }
            // In the order each node took them from each publisher (one request at a time). A
            // publish retried through another node may have been taken by the first: left out.
            let mut groups: HashMap<(usize, usize), Vec<u64>> = HashMap::new();
            for publish in events.iter().filter(|p| p.room == *room && p.attempts.len() == 1) {
                if let Some((_, node, _)) = publish.accepted_at() {
                    groups.entry((publish.publisher, node)).or_default().push(publish.n);
                }
            }
            let answered = |n: u64| {
                by_n.get(&n)
                    .and_then(|p| p.accepted_at())
                    .map(|(status, _, at)| {
                        format!(
                            "answered {status} at {} ms",
                            at.duration_since(inputs.start).as_millis()
                        )
                    })
                    .unwrap_or_default()
            };
            for ((publisher, node), ns) in groups {
                let order: Vec<(usize, u64)> = ns
                    .iter()
                    .filter_map(|n| positions.get(n).map(|at| (at[0], *n)))
                    .collect();
                // PROTOCOL.md, `recovered:false`: the refetched events are taken after what the
                // client already holds, so a refetch may put an earlier event after a later one.
                let reordered = order.windows(2).find(|w| w[0].0 > w[1].0);
                if reordered.is_some_and(|w| held.taken[w[0].0].refetched) {
                    *verdict
                        .excused
                        .entry("out of order through a refetch after recovered:false".to_string())
                        .or_default() += 1;
                    continue;
                }
                if let Some(pair) = reordered {
                    verdict.fail(
                        "order",
                        format!(
                            "client {client} room {room}: publisher {publisher} through node {node}: n={} ({}) was published first but taken {}th, after n={} ({}, taken {}th)",
                            pair[0].1, answered(pair[0].1), pair[0].0, pair[1].1, answered(pair[1].1), pair[1].0
                        ),
                    );
                }
            }
            // The newest state.
            let newest = &inputs.room_state[*room];
            if newest.is_some() && held.state != *newest {
                verdict.fail(
                    "stale state",
                    format!(
                        "client {client} room {room}: holds {:?} (version {} of epoch {}), the room's state is {newest:?}",
                        held.state, held.version, held.epoch
                    ),
                );
            }
        }
    }
    verdict
}

/// The checker is not vacuous: a history with an event missing, one taken twice and two out of
/// order fails with each kind, and the same history complete and in order passes.
#[test]
fn the_checker_finds_a_missing_a_repeated_and_a_reordered_event() {
    use super::client::{RoomView, Taken};
    let start = Instant::now();
    let publish = |n: u64| Publish {
        publisher: 0,
        n,
        room: 0,
        event: true,
        keyed: false,
        attempts: vec![(0, 0, String::new())],
        fate: Fate::Accepted {
            status: 200,
            node: 0,
            at: start,
            body: serde_json::json!({ "id": format!("{n:016x}") }),
        },
    };
    let publishes: Vec<Publish> = (1..=4).map(publish).collect();
    let view = |ns: &[u64]| {
        let mut room = RoomView::default();
        for (i, n) in ns.iter().enumerate() {
            room.taken.push(Taken {
                n: *n,
                id: format!("{i:016x}"),
                seq: i as u64 + 1,
                epoch: "e".into(),
                refetched: false,
            });
        }
        let mut view = ClientView::default();
        view.rooms.insert(0, room);
        view
    };
    let verdict_of = |view: &ClientView| {
        let inputs = Inputs {
            publishes: &publishes,
            clients: vec![(0, vec![0], view)],
            lives: vec![Vec::new()],
            room_state: vec![None],
            start,
            broken_paths: &[],
            empty_restarts: &[],
            redis_outages: &[],
        };
        let mut kinds: Vec<String> = check(&inputs).failures.into_iter().map(|(k, _)| k).collect();
        kinds.sort();
        kinds
    };
    assert_eq!(verdict_of(&view(&[1, 2, 3, 4])), Vec::<String>::new());
    assert_eq!(verdict_of(&view(&[1, 3, 2, 4, 4])), vec!["order", "twice"]);
    assert_eq!(verdict_of(&view(&[1, 2, 4])), vec!["missing"]);
}
