//! The load engine every scenario runs on: connect a planned set of clients (each joined to its
//! rooms, over WebSocket or WebTransport, on one of the nodes), publish a planned schedule through
//! the first node, then account for every delivery and time it. Scenarios only build the plan.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::watch;

use crate::clients::{self, Conn, Kind, Protocol, Publisher, Target, Transport};
use crate::procstat;
use crate::servers::ServerProcess;
use crate::stats::{self, Accounting, LatencySummary};
use crate::webtransport::WtEndpoints;

/// Clients connecting at once, at most, when connects are not paced (`BENCH_CONNECTS_IN_FLIGHT`
/// sets another number: the server's RSS after a burst depends on it).
const CONNECTS_IN_FLIGHT: usize = 256;

fn connects_in_flight() -> usize {
    let Ok(value) = std::env::var("BENCH_CONNECTS_IN_FLIGHT") else {
        return CONNECTS_IN_FLIGHT;
    };
    match value.parse::<usize>() {
        Ok(n) if n > 0 => n.min(tokio::sync::Semaphore::MAX_PERMITS),
        _ => {
            eprintln!("BENCH_CONNECTS_IN_FLIGHT must be a positive integer (digits only), not {value:?}");
            std::process::exit(2);
        }
    }
}

/// What one client does: which rooms it joins, how, and on which node.
#[derive(Debug, Clone)]
pub struct ClientPlan {
    pub rooms: Vec<u32>,
    pub transport: Transport,
    pub node: usize,
}

/// One publish of the schedule, `at` after publishing starts; `payload` is JSON text.
#[derive(Debug, Clone)]
pub struct Planned {
    pub at: Duration,
    pub room: u32,
    pub kind: Kind,
    pub payload: String,
}

/// A whole run: rooms, clients and what is published.
#[derive(Debug, Clone)]
pub struct Workload {
    pub rooms: Vec<String>,
    pub clients: Vec<ClientPlan>,
    pub publishes: Vec<Planned>,
    /// Spread the connects evenly over this long (connect-storm); `None`: as fast as they go.
    pub connect_over: Option<Duration>,
    /// Sample the servers' RSS this often while publishing (soak).
    pub sample_rss_every: Option<Duration>,
}

/// The figures of one run against one server (all its nodes).
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub server: &'static str,
    pub nodes: usize,
    pub clients: usize,
    pub connected: usize,
    pub connected_websocket: usize,
    pub connected_webtransport: usize,
    /// Why connects failed for good (after the one retry), most frequent first.
    pub connect_errors: Vec<String>,
    /// Clients whose first WebTransport handshake the server refused and who connected on their
    /// one retry, as a browser's reconnect would; their first errors are in `retried_errors`.
    pub connect_retried: usize,
    pub retried_errors: Vec<String>,
    pub connect_seconds: f64,
    pub connect_latency: LatencySummary,
    pub publishes: usize,
    pub publishes_refused: u64,
    /// From the first publish due to the last one answered.
    pub publish_seconds: f64,
    /// How late publishes were answered, after the time they were due.
    pub publish_lag: LatencySummary,
    pub accounting: Accounting,
    pub latency: LatencySummary,
    pub cdf_ms: Vec<(f64, f64)>,
    pub deliveries_per_second: f64,
    pub server_cpu_seconds: f64,
    pub server_cpu_us_per_delivery: f64,
    pub server_cpu_us_per_connect: f64,
    pub server_rss_bytes: u64,
    pub server_bytes_per_idle_connection: f64,
    pub generator_cpu_seconds: f64,
    pub wall_seconds: f64,
    /// (seconds since publishing started, summed RSS of the nodes in bytes).
    pub rss_samples: Vec<(f64, u64)>,
    /// What the lossy relays of `--wt-loss` forwarded and dropped during this run.
    pub udp_relay: Option<crate::webtransport::RelayTotals>,
}

/// What one client task brings back.
struct ClientRecord {
    connected: bool,
    transport: Transport,
    error: Option<String>,
    /// The first attempt's error, when a retry followed.
    first_error: Option<String>,
    connect_us: u64,
    /// Bit `i` set: publish `i` arrived (first copy).
    seen: Vec<u64>,
    duplicates: u64,
    stray: u64,
    disconnected: bool,
    latencies_us: Vec<u32>,
}

/// How long a client waits before its one retry of a refused WebTransport handshake.
pub const CONNECT_RETRY_PAUSE: Duration = Duration::from_millis(250);

/// Error counts as "N × error", most frequent first, at most five.
fn most_frequent(counts: std::collections::BTreeMap<String, usize>) -> Vec<String> {
    let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts.into_iter().take(5).map(|(e, n)| format!("{n} × {e}")).collect()
}

/// Live counters for the progress line.
#[derive(Default)]
struct Progress {
    connected: AtomicUsize,
    failed: AtomicUsize,
    published: AtomicUsize,
    received: AtomicU64,
}

pub async fn run(
    label: &str,
    nodes: &[ServerProcess],
    protocol: Protocol,
    workload: &Workload,
) -> anyhow::Result<(RunResult, Histogram<u64>)> {
    let pids: Vec<String> = nodes.iter().map(ServerProcess::pid).collect();
    let targets: Vec<Target> = nodes
        .iter()
        .map(|n| Target {
            protocol,
            http: n.http,
            wt: n.wt.clone(),
        })
        .collect();
    let server = nodes.first().map(|n| n.name).unwrap_or("none");
    let total = workload.publishes.len();
    let words = total.div_ceil(64);
    let progress = Arc::new(Progress::default());
    let endpoints = Arc::new(WtEndpoints::default());
    let origin = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (go_tx, go_rx) = watch::channel(false);

    let rss_before: u64 = pids.iter().filter_map(|p| procstat::rss_bytes(p)).sum();
    let cpu_before = cpu_of(&pids);
    let reporter = spawn_progress(label.to_string(), progress.clone(), workload.clients.len(), total);

    let connect_started = Instant::now();
    let limit = Arc::new(tokio::sync::Semaphore::new(connects_in_flight()));
    let rooms: Arc<Vec<String>> = Arc::new(workload.rooms.clone());
    let gap = workload
        .connect_over
        .map(|t| t.div_f64(workload.clients.len().max(1) as f64));
    let mut tasks = Vec::with_capacity(workload.clients.len());
    for (i, plan) in workload.clients.iter().enumerate() {
        if let Some(gap) = gap {
            tokio::time::sleep_until((connect_started + gap.mul_f64(i as f64)).into()).await;
        }
        let target = targets[plan.node % targets.len()].clone();
        let plan = plan.clone();
        let (rooms, endpoints, progress, limit) = (rooms.clone(), endpoints.clone(), progress.clone(), limit.clone());
        let (mut stop, mut go) = (stop_rx.clone(), go_rx.clone());
        tasks.push(tokio::spawn(async move {
            let mut record = ClientRecord {
                connected: false,
                transport: plan.transport,
                error: None,
                first_error: None,
                connect_us: 0,
                seen: vec![0; words],
                duplicates: 0,
                stray: 0,
                disconnected: false,
                latencies_us: Vec::new(),
            };
            let names: Vec<&str> = plan.rooms.iter().map(|r| rooms[*r as usize].as_str()).collect();
            let permit = match gap {
                Some(_) => None,
                None => limit.acquire_owned().await.ok(),
            };
            let started = Instant::now();
            let attempt = || {
                tokio::time::timeout(
                    Duration::from_secs(60),
                    Conn::connect(&target, plan.transport, &names, &endpoints),
                )
            };
            let mut connected = attempt().await;
            // A WebTransport handshake the server closed is retried once after a short pause, as
            // fallback/courtside.js reconnects; the retry is counted and reported, and its time
            // is part of this client's connect time.
            if let (Ok(Err(error)), Transport::WebTransport) = (&connected, plan.transport) {
                record.first_error = Some(format!("{error:#}"));
                tokio::time::sleep(CONNECT_RETRY_PAUSE).await;
                connected = attempt().await;
            }
            drop(permit);
            let mut conn = match connected {
                Ok(Ok(conn)) => conn,
                Ok(Err(error)) => {
                    progress.failed.fetch_add(1, Ordering::Relaxed);
                    record.error = Some(format!("{error:#}"));
                    return record;
                }
                Err(_) => {
                    progress.failed.fetch_add(1, Ordering::Relaxed);
                    record.error = Some("connect timed out after 60 s".into());
                    return record;
                }
            };
            record.connected = true;
            record.connect_us = started.elapsed().as_micros() as u64;
            progress.connected.fetch_add(1, Ordering::Relaxed);
            // Until the others have connected, the connection is driven too (a WebTransport
            // client pings, and a long connect phase must not idle it out); what arrives
            // meanwhile is counted once the run starts.
            let mut early = std::collections::VecDeque::new();
            {
                let go_now = go.wait_for(|go| *go);
                tokio::pin!(go_now);
                loop {
                    tokio::select! {
                        _ = &mut go_now => break,
                        received = conn.next() => match received {
                            Some(m) => early.push_back(m),
                            None => {
                                record.disconnected = true;
                                break;
                            }
                        },
                    }
                }
            }
            loop {
                let received = match early.pop_front() {
                    Some(m) => Some(m),
                    None if record.disconnected => break,
                    None => tokio::select! {
                        received = conn.next() => received,
                        _ = stop.wait_for(|stop| *stop) => break,
                    },
                };
                let Some(m) = received else {
                    record.disconnected = true;
                    break;
                };
                let index = m.index as usize;
                let Some(word) = record.seen.get_mut(index / 64) else {
                    record.stray += 1;
                    continue;
                };
                let bit = 1u64 << (index % 64);
                if *word & bit != 0 {
                    record.duplicates += 1;
                    continue;
                }
                *word |= bit;
                progress.received.fetch_add(1, Ordering::Relaxed);
                let latency = clients::micros_since(origin).saturating_sub(m.sent_us).max(1);
                record.latencies_us.push(latency.min(u32::MAX as u64) as u32);
            }
            conn.close().await;
            record
        }));
    }
    // Everyone connected or gave up: that is the idle-connection memory point.
    while progress.connected.load(Ordering::Relaxed) + progress.failed.load(Ordering::Relaxed) < workload.clients.len()
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    let connect_cpu = cpu_of(&pids).saturating_sub(cpu_before);
    let connected_now = progress.connected.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_connected: u64 = pids.iter().filter_map(|p| procstat::rss_bytes(p)).sum();
    let _ = go_tx.send(true);
    // Loss (`--wt-loss`) on the publishing phase only: the repair is what is measured, not
    // handshakes through a lossy path.
    crate::webtransport::set_loss_active(true);
    let relayed_before = crate::webtransport::RELAYED.totals();

    // Publish the schedule through the first node.
    let cpu_before = cpu_of(&pids);
    let gen_before = procstat::cpu_time("self").unwrap_or_default();
    let started = Instant::now();
    let lanes = PublishLanes::start(protocol, targets[0].http, PUBLISH_LANES, progress.clone(), origin).await?;
    let mut rss_samples = Vec::new();
    let mut next_sample = Duration::ZERO;
    for (index, p) in workload.publishes.iter().enumerate() {
        if let Some(every) = workload.sample_rss_every {
            while started.elapsed() >= next_sample {
                let rss: u64 = pids.iter().filter_map(|p| procstat::rss_bytes(p)).sum();
                rss_samples.push((started.elapsed().as_secs_f64(), rss));
                next_sample += every;
            }
        }
        let due = started + p.at;
        tokio::time::sleep_until(due.into()).await;
        lanes.send(ToPublish {
            index: index as u64,
            room: workload.rooms[p.room as usize].clone(),
            room_id: p.room,
            kind: p.kind,
            // The time it was due, not the time it went out: a server that is slow to take
            // publishes is charged for the wait (no coordinated omission).
            sent_us: due.saturating_duration_since(origin).as_micros() as u64,
            payload: p.payload.clone(),
        });
    }
    let (publish_lag, publishes_refused) = lanes.finish().await;
    if publishes_refused > 0 {
        eprintln!("\n{label}: {publishes_refused} publishes were refused; they count as lost");
    }
    let publish_seconds = started.elapsed().as_secs_f64();
    // Wait until deliveries stop arriving (1 s without progress), at most 60 s: an overloaded
    // generator may still be reading what the server sent long ago.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = progress.received.load(Ordering::Relaxed);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = progress.received.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let wall = started.elapsed();
    let server_cpu = cpu_of(&pids).saturating_sub(cpu_before);
    let generator_cpu = procstat::cpu_time("self")
        .unwrap_or_default()
        .saturating_sub(gen_before);
    let server_rss: u64 = pids.iter().filter_map(|p| procstat::rss_bytes(p)).sum();
    crate::webtransport::set_loss_active(false);
    let udp_relay = crate::webtransport::RELAYED.totals().map(|t| t.since(relayed_before));
    let _ = stop_tx.send(true);
    let records: Vec<ClientRecord> = futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    reporter.abort();
    eprintln!();

    // Account for every publish, per client.
    let schedule: Vec<(u32, Kind)> = workload.publishes.iter().map(|p| (p.room, p.kind)).collect();
    let by_room = stats::publishes_by_room(&schedule, workload.rooms.len());
    let mut accounting = Accounting::default();
    let mut histogram = stats::new_histogram();
    let mut connect_histogram = stats::new_histogram();
    let mut connect_errors = std::collections::BTreeMap::<String, usize>::new();
    let mut retried_errors = std::collections::BTreeMap::<String, usize>::new();
    let mut connect_retried = 0;
    let (mut ws, mut wt) = (0, 0);
    for (record, plan) in records.iter().zip(&workload.clients) {
        let (mut tally, published) = stats::account(&schedule, &by_room, &plan.rooms, &record.seen);
        tally.duplicates = record.duplicates;
        tally.disconnected = record.disconnected || !record.connected;
        accounting.add(published, &tally);
        accounting.stray += record.stray;
        for l in &record.latencies_us {
            histogram.record(u64::from(*l)).ok();
        }
        if record.connected {
            connect_histogram.record(record.connect_us.max(1)).ok();
            match record.transport {
                Transport::WebSocket => ws += 1,
                Transport::WebTransport => wt += 1,
            }
        }
        if let Some(error) = &record.error {
            *connect_errors.entry(error.clone()).or_default() += 1;
        }
        if let Some(error) = &record.first_error {
            *retried_errors.entry(error.clone()).or_default() += 1;
            connect_retried += usize::from(record.connected);
        }
    }
    let delivered = accounting.received.max(1);
    let result = RunResult {
        server,
        nodes: nodes.len(),
        clients: workload.clients.len(),
        connected: connected_now,
        connected_websocket: ws,
        connected_webtransport: wt,
        connect_errors: most_frequent(connect_errors),
        connect_retried,
        retried_errors: most_frequent(retried_errors),
        connect_seconds,
        connect_latency: stats::summarize(&connect_histogram),
        publishes: total,
        publishes_refused,
        publish_seconds,
        publish_lag,
        latency: stats::summarize(&histogram),
        cdf_ms: stats::cdf(&histogram),
        deliveries_per_second: accounting.received as f64 / wall.as_secs_f64(),
        server_cpu_seconds: server_cpu.as_secs_f64(),
        server_cpu_us_per_delivery: server_cpu.as_secs_f64() * 1e6 / delivered as f64,
        server_cpu_us_per_connect: connect_cpu.as_secs_f64() * 1e6 / connected_now.max(1) as f64,
        server_rss_bytes: server_rss,
        server_bytes_per_idle_connection: rss_connected.saturating_sub(rss_before) as f64 / connected_now.max(1) as f64,
        generator_cpu_seconds: generator_cpu.as_secs_f64(),
        udp_relay,
        wall_seconds: wall.as_secs_f64(),
        rss_samples,
        accounting,
    };
    Ok((result, histogram))
}

fn cpu_of(pids: &[String]) -> Duration {
    pids.iter().filter_map(|p| procstat::cpu_time(p)).sum()
}

/// Publishing connections run at once: publishes go out on schedule even when the server is
/// slow to answer them (open loop), while each room's states stay in order on one lane.
const PUBLISH_LANES: usize = 16;

/// One publish handed to a lane.
struct ToPublish {
    index: u64,
    room: String,
    room_id: u32,
    kind: Kind,
    sent_us: u64,
    payload: String,
}

/// `PUBLISH_LANES` keep-alive HTTP connections, each publishing its queue in order. A room's
/// states always take the same lane (the accounting relies on a room's states arriving in
/// schedule order); events spread over all lanes.
struct PublishLanes {
    senders: Vec<tokio::sync::mpsc::UnboundedSender<ToPublish>>,
    tasks: Vec<tokio::task::JoinHandle<(Histogram<u64>, u64)>>,
    next: std::cell::Cell<usize>,
}

impl PublishLanes {
    async fn start(
        protocol: Protocol,
        addr: std::net::SocketAddr,
        lanes: usize,
        progress: Arc<Progress>,
        origin: Instant,
    ) -> anyhow::Result<Self> {
        let mut senders = Vec::with_capacity(lanes);
        let mut tasks = Vec::with_capacity(lanes);
        for _ in 0..lanes {
            let mut publisher = Publisher::connect(protocol, addr).await?;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ToPublish>();
            let progress = progress.clone();
            senders.push(tx);
            tasks.push(tokio::spawn(async move {
                let mut lag = stats::new_histogram();
                let mut refused = 0;
                while let Some(p) = rx.recv().await {
                    if publisher
                        .publish(&p.room, p.kind, p.index, p.sent_us, &p.payload)
                        .await
                        .is_err()
                    {
                        refused += 1;
                    }
                    lag.record(clients::micros_since(origin).saturating_sub(p.sent_us).max(1))
                        .ok();
                    progress.published.fetch_add(1, Ordering::Relaxed);
                }
                (lag, refused)
            }));
        }
        Ok(Self {
            senders,
            tasks,
            next: std::cell::Cell::new(0),
        })
    }

    fn send(&self, p: ToPublish) {
        let lane = match p.kind {
            Kind::State => p.room_id as usize % self.senders.len(),
            Kind::Event => {
                let lane = self.next.get();
                self.next.set((lane + 1) % self.senders.len());
                lane
            }
        };
        let _ = self.senders[lane].send(p);
    }

    /// Waits for every lane to finish; returns the publish lag and how many were refused.
    async fn finish(self) -> (LatencySummary, u64) {
        drop(self.senders);
        let mut lag = stats::new_histogram();
        let mut refused = 0;
        for task in self.tasks {
            if let Ok((h, r)) = task.await {
                lag.add(&h).ok();
                refused += r;
            }
        }
        (stats::summarize(&lag), refused)
    }
}

/// A progress line on stderr: redrawn in place on a terminal, one line every 5 s otherwise.
fn spawn_progress(
    label: String,
    progress: Arc<Progress>,
    clients: usize,
    publishes: usize,
) -> tokio::task::JoinHandle<()> {
    let terminal = std::io::stderr().is_terminal();
    let started = Instant::now();
    tokio::spawn(async move {
        let every = if terminal {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(5)
        };
        loop {
            tokio::time::sleep(every).await;
            let (c, f) = (
                progress.connected.load(Ordering::Relaxed),
                progress.failed.load(Ordering::Relaxed),
            );
            let p = progress.published.load(Ordering::Relaxed);
            let bar = bar(p, publishes.max(1), 24);
            let line = format!(
                "{label} [{bar}] {:>5.1}s connected {c}/{clients} (failed {f}) published {p}/{publishes} received {}",
                started.elapsed().as_secs_f64(),
                progress.received.load(Ordering::Relaxed)
            );
            if terminal {
                eprint!("\r{line}\x1b[K");
            } else {
                eprintln!("{line}");
            }
        }
    })
}

/// `done` of `total` as a bar of `width` characters.
fn bar(done: usize, total: usize, width: usize) -> String {
    let filled = (done.min(total) * width) / total.max(1);
    format!("{}{}", "#".repeat(filled), "-".repeat(width - filled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_bar_fills_with_the_share_done() {
        assert_eq!(bar(0, 10, 4), "----");
        assert_eq!(bar(5, 10, 4), "##--");
        assert_eq!(bar(10, 10, 4), "####");
        assert_eq!(bar(20, 10, 4), "####");
    }
}
