//! A seeded fault campaign (issue 21): three nodes on a Redis (or a Redis Cluster), publishers
//! through every node, clients on every node following docs/PROTOCOL.md; at random moments a
//! nemesis kills or stops a node, kills Redis (restarting it empty or with its data), cuts or
//! stalls one node's path to Redis, or moves a room's slot. After healing, `checker` proves every
//! accepted publish reached every client once, in order, and every client holds the newest state.
//!
//! `COURTSIDE_CAMPAIGN_SEED` replays one schedule (each prints its seed), `COURTSIDE_CAMPAIGN_SCHEDULES`
//! sets how many run (default 2 on one Redis, 1 on the Cluster), `COURTSIDE_CAMPAIGN_FAULTS` lists
//! the faults drawn (names in `schedule::FaultKind::name`; every kind by default, or `all`),
//! `COURTSIDE_CAMPAIGN_KEEP_GOING=1` runs every schedule and lists the failing seeds at the end.

mod checker;
mod client;
mod http;
mod procs;
mod proxy;
mod publisher;
mod schedule;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use client::ContractClient;
use procs::NodeProc;
use proxy::{Path, RedisProxy};
use publisher::{Fate, Publish, Publisher, MARKER};
use schedule::{FaultKind, Plan, Rng, NODES};

struct Settings {
    seed: Option<u64>,
    schedules: usize,
    faults: Vec<String>,
    keep_going: bool,
}

fn settings(default_schedules: usize) -> Settings {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let seed = var("COURTSIDE_CAMPAIGN_SEED").map(|s| {
        let parsed = match s.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => s.parse(),
        };
        parsed.expect("COURTSIDE_CAMPAIGN_SEED is a number")
    });
    let schedules = var("COURTSIDE_CAMPAIGN_SCHEDULES")
        .map(|s| s.parse().expect("COURTSIDE_CAMPAIGN_SCHEDULES is a number"))
        .unwrap_or(default_schedules);
    let faults = match var("COURTSIDE_CAMPAIGN_FAULTS") {
        None => Vec::new(),
        Some(all) if all == "all" => Vec::new(),
        Some(list) => list.split(',').map(|f| f.trim().to_string()).collect(),
    };
    let keep_going = var("COURTSIDE_CAMPAIGN_KEEP_GOING").is_some_and(|v| v != "0");
    Settings {
        seed,
        schedules,
        faults,
        keep_going,
    }
}

/// Three nodes on one Redis, each through its own proxy: every fault but slot moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_one_redis() {
    campaign(false, "campaign_one_redis", 2).await;
}

/// Three nodes on a Redis Cluster of three masters: node kills and stops, slot moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_redis_cluster() {
    campaign(true, "campaign_redis_cluster", 1).await;
}

async fn campaign(cluster: bool, test: &str, default_schedules: usize) {
    let settings = settings(default_schedules);
    let mut seeds = Rng::new(settings.seed.unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        nanos ^ u64::from(std::process::id()).rotate_left(32)
    }));
    let began = Instant::now();
    let mut failed = Vec::new();
    let mut passed = 0;
    for i in 0..settings.schedules {
        let seed = match settings.seed {
            Some(seed) if i == 0 => seed,
            _ => seeds.next_u64(),
        };
        eprintln!("{test}: schedule {}/{} seed {seed}", i + 1, settings.schedules);
        let took = Instant::now();
        match run_schedule(seed, cluster, &settings.faults).await {
            Ok(summary) => {
                passed += 1;
                eprintln!(
                    "{test}: seed {seed} passed in {:.1} s: {summary}",
                    took.elapsed().as_secs_f64()
                );
            }
            Err((kinds, report)) => {
                eprintln!("{report}");
                eprintln!(
                    "replay: COURTSIDE_CAMPAIGN_SEED={seed} COURTSIDE_CAMPAIGN_SCHEDULES=1 cargo test --release --test integration {test}"
                );
                failed.push((seed, kinds));
                if !settings.keep_going {
                    break;
                }
            }
        }
    }
    eprintln!(
        "{test}: {passed} schedules passed, {} failed, in {:.0} s",
        failed.len(),
        began.elapsed().as_secs_f64()
    );
    for (seed, kinds) in &failed {
        eprintln!("{test}: failed seed {seed}: {kinds}");
    }
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
}

/// Everything a schedule runs, and the nemesis' hands on it.
struct System {
    nodes: Vec<NodeProc>,
    redis: Option<crate::util::RedisServer>,
    proxies: Vec<RedisProxy>,
    cluster: Option<crate::util::RedisCluster>,
    rooms: Vec<String>,
    start: Instant,
    timeline: Vec<(u128, String)>,
    /// When a node's path to Redis was cut or stalled: (node, from, until; `None` while it is).
    broken_paths: Vec<(usize, Instant, Option<Instant>)>,
    /// When Redis restarted empty.
    empty_restarts: Vec<Instant>,
    /// When Redis was killed, and when it came back (`None` while it is away).
    redis_outages: Vec<(Instant, Option<Instant>)>,
}

impl System {
    fn note(&mut self, text: String) {
        self.timeline.push((self.start.elapsed().as_millis(), text));
    }

    async fn apply(&mut self, kind: FaultKind) {
        self.note(format!("apply {kind:?}"));
        match kind {
            FaultKind::KillNode(i) => self.nodes[i].kill(),
            FaultKind::TermNode(i) => self.nodes[i].term(),
            FaultKind::KillRedis { .. } => {
                if let Some(redis) = self.redis.as_mut() {
                    if redis.running() {
                        self.redis_outages.push((Instant::now(), None));
                    }
                    redis.kill();
                }
            }
            FaultKind::CutNode(i) => {
                self.proxies[i].set(Path::Cut);
                self.broken_paths.push((i, Instant::now(), None));
            }
            FaultKind::StallNode(i) => {
                self.proxies[i].set(Path::Stalled);
                self.broken_paths.push((i, Instant::now(), None));
            }
            FaultKind::MoveSlot(r) => {
                let cluster = self.cluster.as_ref().expect("a cluster");
                let mut conn = crate::util::cluster_node_connection(cluster.ports[0]).await;
                let slot: u64 = redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(format!("cs:{{{}}}:ch", self.rooms[r]))
                    .query_async(&mut conn)
                    .await
                    .expect("keyslot");
                let (from, to) = crate::cluster::move_slot(cluster, slot).await;
                self.note(format!("slot {slot} moved from {from} to {to}"));
            }
        }
    }

    fn redis_back(&mut self) {
        let now = Instant::now();
        for (_, back) in self.redis_outages.iter_mut().filter(|(_, back)| back.is_none()) {
            *back = Some(now);
        }
    }

    fn path_healed(&mut self, node: usize) {
        let now = Instant::now();
        for (_, _, until) in self
            .broken_paths
            .iter_mut()
            .filter(|(n, _, until)| *n == node && until.is_none())
        {
            *until = Some(now);
        }
    }

    async fn heal(&mut self, kind: FaultKind) {
        match kind {
            FaultKind::KillNode(i) | FaultKind::TermNode(i) => {
                self.nodes[i].reap().await;
                self.nodes[i].check_exited();
                if !self.nodes[i].running() {
                    let started = self.nodes[i].start().await;
                    let why = self.nodes[i].last_log_line();
                    self.note(format!("heal {kind:?}: node {i} restarted: {started} {why}"));
                }
            }
            FaultKind::KillRedis { empty } => {
                if let Some(redis) = self.redis.as_mut().filter(|r| !r.running()) {
                    redis.restart(empty);
                    if empty {
                        self.empty_restarts.push(Instant::now());
                    }
                    self.redis_back();
                    self.note(format!("heal {kind:?}: redis restarted"));
                }
            }
            FaultKind::CutNode(i) | FaultKind::StallNode(i) => {
                self.proxies[i].set(Path::Open);
                self.path_healed(i);
                self.note(format!("heal {kind:?}"));
            }
            FaultKind::MoveSlot(_) => {}
        }
    }

    /// Whatever is still broken: Redis up, every path open, every node running.
    async fn heal_all(&mut self) {
        if let Some(redis) = self.redis.as_mut().filter(|r| !r.running()) {
            redis.restart(false);
            self.redis_back();
        }
        for proxy in &self.proxies {
            proxy.set(Path::Open);
        }
        for i in 0..self.nodes.len() {
            self.nodes[i].reap().await;
            self.nodes[i].check_exited();
            for _ in 0..3 {
                if self.nodes[i].running() {
                    break;
                }
                let started = self.nodes[i].start().await;
                let why = self.nodes[i].last_log_line();
                self.note(format!("heal all: node {i} restarted: {started} {why}"));
            }
        }
    }

    /// Every node on Redis with an empty outbox; the health of those that are not, on timeout.
    async fn quiesce(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mut unquiet = Vec::new();
            for node in &self.nodes {
                let health = http::get(node.http, "/health").await;
                let quiet = health
                    .as_ref()
                    .is_some_and(|(s, h)| *s == 200 && h["registry"]["status"] == "ok" && h["registry"]["outbox"] == 0);
                if !quiet {
                    unquiet.push(format!("node {}: {health:?}", node.index));
                }
            }
            if unquiet.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(unquiet.join("; "));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Waits (bounded) until `done` holds, woken by every client's progress.
async fn until_clients(bump: &mut watch::Receiver<u64>, limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        bump.borrow_and_update();
        if done() {
            return true;
        }
        if tokio::time::timeout_at(deadline, bump.changed()).await.is_err() {
            return done();
        }
    }
}

/// Runs one schedule; `Err((kinds, report))` when the checker finds anything.
async fn run_schedule(seed: u64, cluster: bool, faults: &[String]) -> Result<String, (String, String)> {
    let plan = Plan::draw(seed, cluster, faults);
    let dir = std::env::temp_dir().join(format!("courtside-campaign-{}-{seed}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("campaign dir");
    let (redis, proxies, cluster_redis, redis_args) = if cluster {
        let c = crate::util::RedisCluster::start().await;
        let args = vec!["--redis".to_string(), c.url(), "--redis-cluster".to_string()];
        (None, Vec::new(), Some(c), args)
    } else {
        let redis = crate::util::RedisServer::start_persistent(dir.join("redis"));
        let mut proxies = Vec::new();
        for _ in 0..NODES {
            proxies.push(RedisProxy::start(redis.port).await);
        }
        (Some(redis), proxies, None, Vec::new())
    };
    let mut nodes = Vec::new();
    for i in 0..NODES {
        let args = match proxies.get(i) {
            Some(proxy) => vec!["--redis".into(), format!("redis://127.0.0.1:{}", proxy.port)],
            None => redis_args.clone(),
        };
        let mut node = NodeProc::new(i, args, dir.clone());
        assert!(node.start().await, "node {i} starts (log in {})", dir.display());
        nodes.push(node);
    }
    let mut system = System {
        nodes,
        redis,
        proxies,
        cluster: cluster_redis,
        rooms: plan.rooms.clone(),
        start: Instant::now(),
        timeline: Vec::new(),
        broken_paths: Vec::new(),
        empty_restarts: Vec::new(),
        redis_outages: Vec::new(),
    };
    let addrs: Vec<_> = system.nodes.iter().map(|n| n.http).collect();
    let (bump_tx, mut bump) = watch::channel(0u64);
    let mut rng = Rng::new(seed ^ 0x5eed);
    let clients: Vec<ContractClient> = plan
        .clients
        .iter()
        .enumerate()
        .map(|(i, (first, rooms))| {
            let rooms = rooms.iter().map(|r| (*r, plan.rooms[*r].clone())).collect();
            ContractClient::start(
                i,
                rooms,
                addrs.clone(),
                *first,
                rng.next_u64(),
                bump_tx.clone(),
                system.start,
            )
        })
        .collect();
    let settled = until_clients(&mut bump, Duration::from_secs(20), || {
        clients.iter().all(|c| c.settled())
    })
    .await;
    assert!(settled, "the clients subscribed before the faults");

    // Traffic and the nemesis.
    let start = Instant::now();
    system.note(format!(
        "set up in {} ms",
        start.duration_since(system.start).as_millis()
    ));
    system.start = start;
    let until = start + plan.traffic;
    let publishers: Vec<_> = (0..NODES)
        .map(|i| {
            let publisher = Publisher {
                index: i,
                rooms: plan.rooms.clone(),
                nodes: addrs.clone(),
                seed: rng.next_u64(),
                start,
            };
            tokio::spawn(publisher.run(until))
        })
        .collect();
    let mut actions: Vec<(Duration, bool, FaultKind)> = Vec::new();
    for fault in &plan.faults {
        actions.push((fault.at, true, fault.kind));
        actions.push((fault.at + fault.lasts, false, fault.kind));
    }
    actions.sort_by_key(|a| a.0);
    for (at, apply, kind) in actions {
        tokio::time::sleep_until(start + at).await;
        if apply {
            system.apply(kind).await;
        } else {
            system.heal(kind).await;
        }
    }
    let mut publishes: Vec<Publish> = Vec::new();
    for publisher in publishers {
        publishes.extend(publisher.await.expect("publisher"));
    }
    system.heal_all().await;
    system.note("healed; waiting for quiet".into());

    let mut verdict_pre = Vec::new();
    if let Err(unquiet) = system.quiesce().await {
        verdict_pre.push(("not quiet".to_string(), format!("15 s after healing: {unquiet}")));
    }
    system.note("quiet".into());
    let settled = until_clients(&mut bump, Duration::from_secs(30), || {
        clients.iter().all(|c| c.settled())
    })
    .await;
    system.note("clients settled".into());
    if !settled {
        verdict_pre.push((
            "clients".into(),
            "some client is not subscribed 30 s after healing".into(),
        ));
    }
    // A marker event per room, through a healthy node: once each client took it, everything
    // numbered before it reached the client too (one channel, one order).
    for (r, room) in plan.rooms.iter().enumerate() {
        let n = MARKER + r as u64;
        let mut answered = None;
        for attempt in 0..20 {
            let node = (r + attempt) % NODES;
            let key = format!("campaign-marker-{seed}-{r}");
            let auth = format!("Bearer {}", crate::util::TOKEN);
            let outcome = http::request(
                addrs[node],
                "POST",
                &format!("/v1/rooms/{room}/events"),
                &[("authorization", auth.as_str()), ("idempotency-key", key.as_str())],
                json!({ "n": n }).to_string().into(),
            )
            .await;
            if let http::Outcome::Answer(200, body) = outcome {
                answered = Some(body);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if answered.is_none() {
            verdict_pre.push((
                "marker".into(),
                format!("room {r}: the marker event was not answered 200"),
            ));
        }
    }
    system.note("markers published".into());
    let delivered = until_clients(&mut bump, Duration::from_secs(15), || {
        clients.iter().all(|c| {
            let view = c.view.lock().expect("view");
            c.rooms.iter().all(|r| {
                view.rooms
                    .get(r)
                    .is_some_and(|v| v.taken.iter().any(|t| t.n == MARKER + *r as u64))
            })
        })
    })
    .await;
    if !delivered {
        verdict_pre.push((
            "marker".into(),
            "a marker event did not reach every client within 15 s".into(),
        ));
    }
    system.note("markers delivered".into());
    // The newest state of each room, as every node answers it.
    let mut room_state = Vec::new();
    for (r, room) in plan.rooms.iter().enumerate() {
        let mut answers = Vec::new();
        for node in &system.nodes {
            let answer = http::get(node.http, &format!("/v1/rooms/{room}")).await;
            answers.push(answer.map(|(s, b)| (s, b["state"]["data"].clone(), b["epoch"].clone())));
        }
        let first = answers[0].clone();
        if answers.iter().any(|a| a != &first) {
            verdict_pre.push(("nodes disagree".into(), format!("room {r}: {answers:?}")));
        }
        room_state.push(first.and_then(|(_, data, _)| (!data.is_null()).then_some(data)));
    }

    for client in &clients {
        client.stop();
    }
    let views: Vec<_> = clients.iter().map(|c| c.view.lock().expect("view")).collect();
    let inputs = checker::Inputs {
        publishes: &publishes,
        clients: clients
            .iter()
            .zip(&views)
            .map(|(c, v)| (c.index, c.rooms.clone(), &**v))
            .collect(),
        lives: system.nodes.iter().map(|n| n.lives.clone()).collect(),
        room_state,
        start,
        broken_paths: &system.broken_paths,
        empty_restarts: &system.empty_restarts,
        redis_outages: &system.redis_outages,
    };
    let mut verdict = checker::check(&inputs);
    verdict.failures.splice(0..0, verdict_pre);
    let summary = format!(
        "{} publishes, {} accepted ({} queued 202), {} deliveries; faults {:?}; excused {:?}",
        publishes.len(),
        verdict.accepted,
        verdict.queued,
        verdict.deliveries,
        plan.faults.iter().map(|f| f.kind).collect::<Vec<_>>(),
        verdict.excused
    );
    if std::env::var_os("COURTSIDE_CAMPAIGN_VERBOSE").is_some() {
        for (at, what) in &system.timeline {
            eprintln!("  {at:>6} {what}");
        }
    }
    if verdict.failures.is_empty() {
        drop(views);
        drop(clients);
        drop(system);
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(summary);
    }
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for (kind, _) in &verdict.failures {
        *kinds.entry(kind.as_str()).or_default() += 1;
    }
    let mut report = String::new();
    let _ = writeln!(report, "=== campaign seed {} FAILED: {kinds:?}", plan.seed);
    let _ = writeln!(report, "summary: {summary}");
    let _ = writeln!(report, "rooms: {:?}", plan.rooms);
    let _ = writeln!(report, "clients (first node, rooms): {:?}", plan.clients);
    let _ = writeln!(report, "traffic {:?}; faults:", plan.traffic);
    for fault in &plan.faults {
        let _ = writeln!(report, "  {:?} at {:?} for {:?}", fault.kind, fault.at, fault.lasts);
    }
    let _ = writeln!(report, "timeline (ms since the traffic started):");
    for (at, what) in &system.timeline {
        let _ = writeln!(report, "  {at:>6} {what}");
    }
    let _ = writeln!(report, "failures (at most 6 of each kind):");
    let mut shown: BTreeMap<&str, usize> = BTreeMap::new();
    for (kind, text) in &verdict.failures {
        let count = shown.entry(kind.as_str()).or_default();
        *count += 1;
        if *count <= 6 {
            let _ = writeln!(report, "  [{kind}] {text}");
        }
    }
    let _ = writeln!(report, "accepted events no client took:");
    for p in publishes.iter().filter(|p| p.event && p.accepted_at().is_some()) {
        let taken = views
            .iter()
            .any(|v| v.rooms.get(&p.room).is_some_and(|r| r.taken.iter().any(|t| t.n == p.n)));
        if !taken {
            let _ = writeln!(report, "  n={} room {} {:?}", p.n, p.room, p.attempts);
        }
    }
    let _ = writeln!(report, "accepted 202 publishes:");
    for p in publishes
        .iter()
        .filter(|p| matches!(p.accepted_at(), Some((202, _, _))))
        .take(30)
    {
        if let Fate::Accepted { node, body, .. } = &p.fate {
            let _ = writeln!(
                report,
                "  n={} room {} node {node} {body} attempts {:?}",
                p.n, p.room, p.attempts
            );
        }
    }
    for (client, view) in clients.iter().zip(&views) {
        let _ = writeln!(report, "client {} journal:", client.index);
        for line in view.journal.iter().rev().take(25).rev() {
            let _ = writeln!(report, "  {line}");
        }
    }
    for node in &system.nodes {
        for (life, incarnation) in node.lives.iter().enumerate() {
            let log = std::fs::read_to_string(&incarnation.log).unwrap_or_default();
            let notable: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("\"WARN\"") || l.contains("\"ERROR\"") || !l.starts_with('{'))
                .collect();
            let _ = writeln!(
                report,
                "node {} life {life} ({:?}; {}): {} warnings and errors, the last:",
                node.index,
                incarnation.ended.map(|(_, how)| how),
                incarnation.log.display(),
                notable.len()
            );
            for line in notable.iter().rev().take(12).rev() {
                let _ = writeln!(report, "  {}", truncate(line, 400));
            }
        }
    }
    let _ = writeln!(report, "logs kept in {}", dir.display());
    let kinds = kinds
        .iter()
        .map(|(k, n)| format!("{k} x{n}"))
        .collect::<Vec<_>>()
        .join(", ");
    Err((kinds, report))
}

fn truncate(line: &str, max: usize) -> &str {
    match line.char_indices().nth(max) {
        Some((i, _)) => &line[..i],
        None => line,
    }
}
