//! courtside-bench: measures Courtside on this machine, with the original design (Socket.IO)
//! side by side in the same run, and writes the figures to bench/results/. See bench/README.md.

mod bracket_load;
mod clients;
mod deflate;
mod floor;
mod load;
mod plot;
mod procstat;
mod report;
mod scenarios;
mod servers;
mod stats;
mod webtransport;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;

use crate::clients::{Kind, Protocol};
use crate::load::{RunResult, Workload};
use crate::scenarios::{Mix, SaturdayParams};
use crate::servers::{CourtsideOptions, ServerProcess};

#[derive(Debug, Parser)]
#[command(
    name = "courtside-bench",
    about = "Load and latency bench for Courtside, with Socket.IO side by side"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// The Courtside binary (default: target/release/courtside, else target/debug/courtside).
    #[arg(long, global = true)]
    courtside_bin: Option<PathBuf>,
    /// Do not run the Socket.IO peer.
    #[arg(long, global = true)]
    no_peer: bool,
    /// Share of Courtside's clients on WebTransport, 0 to 1 (the rest use WebSocket; Socket.IO's
    /// clients all use WebSocket).
    #[arg(long, global = true, default_value_t = 0.7)]
    wt_share: f64,
    /// Random loss, 0 to 1, on every WebTransport client's path in both directions: each client
    /// endpoint reaches the server through a relay of the bench's that drops this share of the
    /// packets (and counts what it forwards: `udp_relay` in the JSON). `--wt-loss 0` relays
    /// without loss: the same path's clean figures.
    #[arg(long, global = true)]
    wt_loss: Option<f64>,
    /// Courtside's WebSocket clients offer permessage-deflate, as browsers do (they cannot read
    /// compressed frames: for payloads under the server's --ws-compress-threshold only).
    #[arg(long, global = true)]
    ws_offer_deflate: bool,
    /// Where to write the JSON results (default: bench/results/SCENARIO-UNIXTIME.json); the CDF
    /// plot goes beside it with the extension .svg.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Draws the latency CDF plot (.svg beside it) of a results file again.
    Plot { results: PathBuf },
    /// The cost of a loopback TCP write: one frame per write, and ten per write.
    Floor {
        #[arg(long, default_value_t = 1000)]
        sockets: usize,
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
    /// Bytes on the wire per delivery with and without permessage-deflate: a 64-team bracket
    /// changing one match per publish, and a score, to one client of each kind.
    WsDeflate {
        /// Bracket changes (and as many score states) to publish, at most 63.
        #[arg(long, default_value_t = 63)]
        publishes: usize,
    },
    /// What a bracket update costs per delivery, on the wire and in server CPU: full states,
    /// deltas, permessage-deflate and both (WebSocket), full and deltas (WebTransport), beside
    /// Socket.IO plain and with perMessageDeflate at 1,024; N clients follow a 64-team bracket
    /// changing one match per publish, then a score. Each setup on a fresh server.
    Bracket {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// Bracket changes (and as many score states) to publish, at most 63.
        #[arg(long, default_value_t = 63)]
        publishes: usize,
        /// Publishes per second.
        #[arg(long, default_value_t = 5.0)]
        rate: f64,
        /// Only the setups whose label contains this text (for example "websocket, deltas").
        #[arg(long)]
        only: Option<String>,
    },
    /// One room to N subscribers, sweeping N and the publish rate: latency, delivery, CPU per
    /// delivery, and the highest rate that keeps p99 under 50 ms.
    Fanout {
        /// Subscriber counts to run, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1000, 5000, 10000])]
        clients: Vec<usize>,
        /// Publish rates (per second) to run at each count, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [5.0, 20.0, 50.0])]
        rates: Vec<f64>,
        /// Seconds of publishing per run.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Padding added to each message, in bytes.
        #[arg(long, default_value_t = 60)]
        payload: usize,
        /// What is published: events (ordered; the control stream over WebTransport) or states
        /// (the newest wins; datagrams over WebTransport).
        #[arg(long, value_enum, default_value = "event")]
        kind: FanoutKind,
    },
    /// A Saturday: fans follow a game, its league and its bracket (Zipf-skewed popularity);
    /// the simulator publishes scores, finals, bracket changes and notifications, with bursts.
    Saturday {
        #[arg(long, default_value_t = 5000)]
        fans: usize,
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
        /// Game time runs this many times faster than real time.
        #[arg(long, default_value_t = 10.0)]
        speed: f64,
        /// Seconds between bursts (a notification to every league room at once).
        #[arg(long, default_value_t = 5.0)]
        burst_every: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// N clients connecting within T seconds, then a few events to check they are all live.
    ConnectStorm {
        #[arg(long, default_value_t = 5000)]
        clients: usize,
        #[arg(long, default_value_t = 5.0)]
        within: f64,
        #[arg(long, default_value_t = 10)]
        messages: usize,
    },
    /// The Saturday load held for a long time, sampling the server's RSS every second.
    Soak {
        #[arg(long, default_value_t = 2000)]
        fans: usize,
        #[arg(long, default_value_t = 120.0)]
        seconds: f64,
        #[arg(long, default_value_t = 10.0)]
        speed: f64,
    },
    /// Three nodes sharing rooms through Redis: clients spread over the nodes, publishes through
    /// the first; the same load on one node, for the added latency.
    Cluster {
        #[arg(long, default_value_t = 3000)]
        clients: usize,
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
}

/// One run of a scenario against one server setup.
struct Run {
    label: String,
    protocol: Protocol,
    /// Fan-out rate, for the sweep.
    rate: Option<f64>,
    result: RunResult,
}

/// What a `fanout` publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FanoutKind {
    Event,
    State,
}

impl FanoutKind {
    fn kind(self) -> Kind {
        match self {
            Self::Event => Kind::Event,
            Self::State => Kind::State,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    raise_open_file_limit();
    let command: Vec<String> = std::env::args().collect();
    let wt_share = cli.wt_share.clamp(0.0, 1.0);
    webtransport::set_path_loss(cli.wt_loss.map(|l| l.clamp(0.0, 0.9)));
    clients::set_offer_deflate(cli.ws_offer_deflate);
    let (name, params, runs, extra) = match &cli.scenario {
        Scenario::Plot { results } => return replot(results),
        Scenario::Floor { sockets, rounds } => {
            let (sockets, rounds) = (*sockets, *rounds);
            let files = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(u64::MAX, |(soft, _)| soft);
            if (2 * sockets + 100) as u64 > files {
                anyhow::bail!(
                    "floor holds both ends of each socket: {sockets} sockets need {} open files, the limit is {files} (use --sockets {} or less)",
                    2 * sockets + 100,
                    files.saturating_sub(100) / 2
                );
            }
            let floor = tokio::task::spawn_blocking(move || floor::run(sockets, rounds)).await??;
            println!(
                "floor on {} loopback sockets, {}-byte frame",
                floor.sockets, floor.frame_bytes
            );
            println!(
                "  one frame per write : {:>7.2} µs CPU per write, {:>8.2} ms to write all",
                floor.one_per_write_cpu_us, floor.one_per_write_round_ms
            );
            println!(
                "  ten frames per write: {:>7.2} µs CPU per message, {:>8.2} ms to write all",
                floor.ten_per_write_cpu_us_per_message, floor.ten_per_write_round_ms
            );
            println!(
                "  one frame per write, readers waiting in epoll: {:>7.2} µs CPU per write, {:>8.2} ms to write all",
                floor.one_per_write_woken_cpu_us, floor.one_per_write_woken_round_ms
            );
            let udp = &floor.udp;
            println!(
                "UDP, {}-byte datagram: one per sendmsg  : {:>7.2} µs CPU per datagram, {:>8.2} ms to send all",
                udp.datagram_bytes, udp.one_per_send_cpu_us, udp.one_per_send_round_ms
            );
            match (udp.ten_per_send_cpu_us_per_datagram, udp.ten_per_send_round_ms) {
                (Some(cpu), Some(round)) => println!(
                    "UDP, ten per sendmsg (GSO)              : {cpu:>7.2} µs CPU per datagram, {round:>8.2} ms to send all"
                ),
                _ => println!("UDP, ten per sendmsg: this kernel has no UDP GSO"),
            }
            (
                "floor",
                json!({"sockets": sockets, "rounds": rounds}),
                Vec::new(),
                serde_json::to_value(&floor)?,
            )
        }
        Scenario::WsDeflate { publishes } => {
            let binary = servers::courtside_binary(cli.courtside_bin.as_deref())?;
            let figures = deflate::run(&binary, *publishes).await?;
            ("ws-deflate", json!({"publishes": publishes}), Vec::new(), figures)
        }
        Scenario::Bracket {
            clients,
            publishes,
            rate,
            only,
        } => {
            let binary = servers::courtside_binary(cli.courtside_bin.as_deref())?;
            let params = bracket_load::Params {
                clients: *clients,
                publishes: *publishes,
                rate: *rate,
                peer: !cli.no_peer,
                only: only.clone(),
            };
            let figures = bracket_load::run(&binary, params).await?;
            (
                "bracket",
                json!({"clients": clients, "publishes": publishes, "rate": rate, "only": only}),
                Vec::new(),
                figures,
            )
        }
        Scenario::Fanout {
            clients,
            rates,
            seconds,
            payload,
            kind,
        } => {
            let mut runs = Vec::new();
            for &n in clients {
                for &rate in rates {
                    let messages = ((rate * seconds).round() as usize).max(1);
                    let plan = |share: f64| {
                        scenarios::fanout(
                            n,
                            messages,
                            rate,
                            *payload,
                            kind.kind(),
                            Mix {
                                webtransport_share: share,
                                nodes: 1,
                            },
                        )
                    };
                    let tag = format!("fanout {n} @ {rate}/s");
                    runs.extend(
                        both(&cli, &tag, wt_share, 1, None, plan)
                            .await?
                            .into_iter()
                            .map(|mut r| {
                                r.rate = Some(rate);
                                r
                            }),
                    );
                }
            }
            let sweep = sweep_summary(clients, &runs);
            (
                "fanout",
                json!({"clients": clients, "rates": rates, "seconds": seconds, "payload": payload, "wt_share": wt_share}),
                runs,
                sweep,
            )
        }
        Scenario::Saturday {
            fans,
            seconds,
            speed,
            burst_every,
            seed,
        } => {
            let params = SaturdayParams {
                fans: *fans,
                seconds: *seconds,
                speed: *speed,
                burst_every_seconds: *burst_every,
                seed: *seed,
            };
            let plan = |share: f64| {
                scenarios::saturday(
                    &params,
                    Mix {
                        webtransport_share: share,
                        nodes: 1,
                    },
                )
            };
            let runs = both(&cli, &format!("saturday {fans} fans"), wt_share, 1, None, plan).await?;
            (
                "saturday",
                json!({"params": params, "wt_share": wt_share}),
                runs,
                json!(null),
            )
        }
        Scenario::ConnectStorm {
            clients,
            within,
            messages,
        } => {
            let within_d = Duration::from_secs_f64(*within);
            let plan = |share: f64| {
                scenarios::connect_storm(
                    *clients,
                    within_d,
                    *messages,
                    Mix {
                        webtransport_share: share,
                        nodes: 1,
                    },
                )
            };
            let runs = both(&cli, &format!("storm {clients} in {within}s"), wt_share, 1, None, plan).await?;
            (
                "connect-storm",
                json!({"clients": clients, "within_seconds": within, "messages": messages, "wt_share": wt_share}),
                runs,
                json!(null),
            )
        }
        Scenario::Soak { fans, seconds, speed } => {
            let params = SaturdayParams {
                fans: *fans,
                seconds: *seconds,
                speed: *speed,
                burst_every_seconds: 5.0,
                seed: 2,
            };
            let plan = |share: f64| {
                let mut w = scenarios::saturday(
                    &params,
                    Mix {
                        webtransport_share: share,
                        nodes: 1,
                    },
                );
                w.sample_rss_every = Some(Duration::from_secs(1));
                w
            };
            let runs = both(&cli, &format!("soak {fans} fans {seconds}s"), wt_share, 1, None, plan).await?;
            let growth: Vec<serde_json::Value> = runs.iter().map(|r| rss_growth(&r.label, &r.result)).collect();
            for r in &runs {
                if let Some(t) = report::rss_trend(&r.result.rss_samples) {
                    const MB: f64 = 1024.0 * 1024.0;
                    println!(
                        "{}: RSS {:.0} MB at the start, {:.0} MB at the end (peak {:.0} MB); {:+.1} MB a minute overall, {:+.1} MB a minute over the last third: {}",
                        r.label,
                        t.first_bytes as f64 / MB,
                        t.last_bytes as f64 / MB,
                        t.peak_bytes as f64 / MB,
                        t.bytes_per_minute / MB,
                        t.last_third_bytes_per_minute / MB,
                        if t.levelled_off { "levelled off" } else { "still growing" }
                    );
                }
            }
            (
                "soak",
                json!({"params": params, "wt_share": wt_share}),
                runs,
                json!({"rss_growth": growth}),
            )
        }
        Scenario::Cluster {
            clients,
            rate,
            seconds,
            nodes,
        } => {
            let redis = servers::start_redis().await?;
            let messages = ((rate * seconds).round() as usize).max(1);
            let mut runs = Vec::new();
            for n in [1, *nodes] {
                let plan = |share: f64| {
                    scenarios::fanout(
                        *clients,
                        messages,
                        *rate,
                        60,
                        Kind::Event,
                        Mix {
                            webtransport_share: share,
                            nodes: n,
                        },
                    )
                };
                let tag = format!("{clients} subscribers on {n} node{}", if n == 1 { "" } else { "s" });
                let redis_url = (n > 1).then_some(redis.url.as_str());
                runs.extend(both(&cli, &tag, wt_share, n, redis_url, plan).await?);
            }
            let added: Vec<serde_json::Value> = [Protocol::Courtside, Protocol::SocketIo]
                .iter()
                .filter_map(|p| {
                    let mine: Vec<&Run> = runs.iter().filter(|r| r.protocol == *p).collect();
                    let [single, many] = mine.as_slice() else { return None };
                    Some(json!({
                        "server": single.result.server,
                        "p99_one_node_ms": single.result.latency.p99_ms,
                        "p99_cluster_ms": many.result.latency.p99_ms,
                        "added_p99_ms": many.result.latency.p99_ms - single.result.latency.p99_ms,
                        "target_added_under_5_ms": many.result.latency.p99_ms - single.result.latency.p99_ms < 5.0,
                    }))
                })
                .collect();
            (
                "cluster",
                json!({"clients": clients, "rate": rate, "seconds": seconds, "nodes": nodes, "wt_share": wt_share}),
                runs,
                json!({"added_latency": added}),
            )
        }
    };

    let verdicts: Vec<serde_json::Value> = runs
        .iter()
        .map(|r| {
            json!({
                "run": r.label,
                "old_design": report::old_design_kpis(&r.result),
                "ours": report::our_kpi(name, &r.result),
            })
        })
        .collect();
    if !runs.is_empty() {
        print_report(name, &runs, &extra);
    }
    if cli.ws_offer_deflate {
        let declined = clients::DEFLATE_DECLINED.load(std::sync::atomic::Ordering::Relaxed);
        println!(
            "WebSocket clients offered permessage-deflate; Courtside {}",
            if declined {
                "declined it"
            } else {
                "negotiated it with every one"
            }
        );
    }
    let record = json!({
        "scenario": name,
        "machine": procstat::machine(),
        "versions": versions(),
        "command": command.join(" "),
        // Courtside's own settings reach the servers the bench starts through the environment.
        "courtside_environment": courtside_environment(),
        "git_commit": git_commit(),
        "params": params,
        "ws_offer_deflate": cli.ws_offer_deflate.then(|| json!({
            "declined_by_server": clients::DEFLATE_DECLINED.load(std::sync::atomic::Ordering::Relaxed),
        })),
        "runs": runs.iter().map(|r| json!({"label": r.label, "rate": r.rate, "result": r.result})).collect::<Vec<_>>(),
        "verdicts": verdicts,
        "summary": extra,
    });
    let path = cli.json.clone().unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("results")
            .join(format!("{name}-{secs}.json"))
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&record)?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("results: {}", path.display());
    if !runs.is_empty() {
        let series: Vec<plot::Series> = runs
            .iter()
            .filter(|r| !r.result.cdf_ms.is_empty())
            .map(|r| plot::Series {
                label: r.label.clone(),
                points: &r.result.cdf_ms,
            })
            .collect();
        let svg_path = path.with_extension("svg");
        std::fs::write(&svg_path, plot::cdf_svg(&format!("{name}: latency CDF"), &series))?;
        eprintln!("plot: {}", svg_path.display());
    }
    if let Some(r) = runs.iter().find(|r| !r.result.accounting.adds_up()) {
        anyhow::bail!(
            "{}: the delivery accounting does not add up: {:?}",
            r.label,
            r.result.accounting
        );
    }
    Ok(())
}

/// Writes the CDF plot of a results file (`runs[].label`, `runs[].result.cdf_ms`) beside it.
fn replot(results: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(results).with_context(|| format!("reading {}", results.display()))?;
    let record: serde_json::Value = serde_json::from_str(&text)?;
    let runs = record["runs"].as_array().cloned().unwrap_or_default();
    let points: Vec<(String, Vec<(f64, f64)>)> = runs
        .iter()
        .map(|r| {
            let label = r["label"].as_str().unwrap_or_default().to_string();
            let cdf = serde_json::from_value(r["result"]["cdf_ms"].clone()).unwrap_or_default();
            (label, cdf)
        })
        .filter(|(_, cdf): &(String, Vec<(f64, f64)>)| !cdf.is_empty())
        .collect();
    let series: Vec<plot::Series> = points
        .iter()
        .map(|(label, cdf)| plot::Series {
            label: label.clone(),
            points: cdf,
        })
        .collect();
    let name = record["scenario"].as_str().unwrap_or("results");
    let svg_path = results.with_extension("svg");
    std::fs::write(&svg_path, plot::cdf_svg(&format!("{name}: latency CDF"), &series))?;
    eprintln!("plot: {}", svg_path.display());
    Ok(())
}

/// Runs `plan` against Courtside (`nodes` nodes) and then, unless `--no-peer`, against the
/// Socket.IO peer (as many processes), each freshly started.
async fn both(
    cli: &Cli,
    tag: &str,
    wt_share: f64,
    nodes: usize,
    redis: Option<&str>,
    plan: impl Fn(f64) -> Workload,
) -> anyhow::Result<Vec<Run>> {
    let binary = servers::courtside_binary(cli.courtside_bin.as_deref())?;
    let mut runs = Vec::new();
    let workload = plan(wt_share);
    let mut courtside: Vec<ServerProcess> = Vec::new();
    for i in 0..nodes {
        let options = CourtsideOptions {
            webtransport: wt_share > 0.0,
            redis: redis.map(|url| (url.to_string(), format!("bench-{}-{i}", std::process::id()))),
        };
        courtside.push(servers::start_courtside(&binary, &options).await?);
    }
    let label = format!("courtside {tag}");
    let (result, _) = load::run(&label, &courtside, Protocol::Courtside, &workload).await?;
    drop(courtside);
    runs.push(Run {
        label,
        protocol: Protocol::Courtside,
        rate: None,
        result,
    });
    // One process cannot hold more sockets than its open-file limit: a Socket.IO run (all
    // WebSocket) that needs more is skipped, and said so, rather than reported as failures.
    let sockets_allowed = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| soft.saturating_sub(300) as usize)
        .unwrap_or(usize::MAX);
    let peer_fits = workload.clients.len() <= sockets_allowed;
    if !cli.no_peer && !peer_fits {
        eprintln!(
            "socket.io {tag}: skipped: {} WebSocket clients exceed this process's open-file limit ({} usable)",
            workload.clients.len(),
            sockets_allowed
        );
    }
    if !cli.no_peer && peer_fits {
        let workload = plan(0.0);
        let mut peers = Vec::new();
        for _ in 0..nodes {
            peers.push(servers::start_socketio(redis).await?);
        }
        let label = format!("socket.io {tag}");
        let (result, _) = load::run(&label, &peers, Protocol::SocketIo, &workload).await?;
        runs.push(Run {
            label,
            protocol: Protocol::SocketIo,
            rate: None,
            result,
        });
    }
    Ok(runs)
}

/// For each subscriber count: the highest rate at which each server kept p99 under 50 ms.
fn sweep_summary(clients: &[usize], runs: &[Run]) -> serde_json::Value {
    let mut out = Vec::new();
    for &n in clients {
        for protocol in [Protocol::Courtside, Protocol::SocketIo] {
            let points: Vec<(f64, f64)> = runs
                .iter()
                .filter(|r| r.protocol == protocol && r.result.clients == n)
                .filter_map(|r| r.rate.map(|rate| (rate, r.result.latency.p99_ms)))
                .collect();
            if points.is_empty() {
                continue;
            }
            out.push(json!({
                "clients": n,
                "server": if protocol == Protocol::Courtside { "courtside" } else { "socket.io" },
                "p99_by_rate": points,
                "highest_rate_p99_under_50ms": report::highest_rate_under(&points, 50.0),
            }));
        }
    }
    json!({"sweep": out})
}

/// The `COURTSIDE_*` variables set for this run (the servers inherit them), as `NAME=value`;
/// the values of secrets (tokens, keys, Redis URLs with their passwords) are left out.
fn courtside_environment() -> Vec<String> {
    const SECRET: [&str; 5] = ["TOKEN", "KEY", "SECRET", "PASSWORD", "REDIS"];
    let mut vars: Vec<String> = std::env::vars()
        .filter(|(name, _)| name.starts_with("COURTSIDE_"))
        .map(|(name, value)| match SECRET.iter().any(|s| name.contains(s)) {
            true => format!("{name}=(not recorded)"),
            false => format!("{name}={value}"),
        })
        .collect();
    vars.sort();
    vars
}

/// The run's RSS trend (first, last, peak, growth overall and over the last third).
fn rss_growth(label: &str, r: &RunResult) -> serde_json::Value {
    json!({"run": label, "trend": report::rss_trend(&r.rss_samples)})
}

fn print_report(name: &str, runs: &[Run], extra: &serde_json::Value) {
    let rows: Vec<(String, &RunResult)> = runs.iter().map(|r| (r.label.clone(), &r.result)).collect();
    println!("\n{}", report::table(&rows));
    for r in runs {
        let a = &r.result.accounting;
        println!(
            "{}: accounting {} (received {} + conflated {} + lost {} of {} expected; {} duplicates); connected {} of {} ({} WebSocket, {} WebTransport) in {:.1} s, connect p99 {:.1} ms, {:.0} µs server CPU per connect; {:.0} deliveries/s",
            r.label,
            if a.adds_up() { "adds up" } else { "DOES NOT ADD UP" },
            a.received,
            a.conflated,
            a.lost,
            a.expected,
            a.duplicates,
            r.result.connected,
            r.result.clients,
            r.result.connected_websocket,
            r.result.connected_webtransport,
            r.result.connect_seconds,
            r.result.connect_latency.p99_ms,
            r.result.server_cpu_us_per_connect,
            r.result.deliveries_per_second,
        );
        println!(
            "  published {} in {:.1} s ({} refused), answered p50 {:.1} ms / p99 {:.1} ms after they were due",
            r.result.publishes,
            r.result.publish_seconds,
            r.result.publishes_refused,
            r.result.publish_lag.p50_ms,
            r.result.publish_lag.p99_ms
        );
        for e in &r.result.connect_errors {
            println!("  connect error: {e}");
        }
        if !r.result.retried_errors.is_empty() {
            println!(
                "  {} WebTransport handshakes refused at first and connected on one retry after {} ms; first errors:",
                r.result.connect_retried,
                load::CONNECT_RETRY_PAUSE.as_millis()
            );
            for e in &r.result.retried_errors {
                println!("    {e}");
            }
        }
        let verdicts: Vec<String> = report::old_design_kpis(&r.result)
            .iter()
            .chain(report::our_kpi(name, &r.result).iter())
            .map(|v| format!("{} {} ({})", v.kpi, if v.met { "met" } else { "NOT met" }, v.value))
            .collect();
        println!("  KPIs: {}", verdicts.join("; "));
    }
    // Courtside against the Socket.IO run right after it (same load).
    for pair in runs.windows(2) {
        let [a, b] = pair else { continue };
        if a.protocol != Protocol::Courtside || b.protocol != Protocol::SocketIo {
            continue;
        }
        println!(
            "ratio courtside/socket.io, {}: cpu per delivery {:.2}, p99 {:.2}, memory per idle connection {:.2}",
            a.label.trim_start_matches("courtside "),
            report::ratio(a.result.server_cpu_us_per_delivery, b.result.server_cpu_us_per_delivery),
            report::ratio(a.result.latency.p99_ms, b.result.latency.p99_ms),
            report::ratio(
                a.result.server_bytes_per_idle_connection,
                b.result.server_bytes_per_idle_connection
            ),
        );
    }
    if !extra.is_null() {
        println!("summary: {extra}");
    }
}

/// Raises this process's open-file limit to its hard limit (20,000 here); the servers the bench
/// starts inherit it.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => eprintln!("open-file limit: {limit}"),
        Err(error) => eprintln!("open-file limit not raised: {error}"),
    }
}

fn versions() -> serde_json::Value {
    let peer = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/socketio/node_modules/socket.io/package.json");
    let socketio = std::fs::read_to_string(peer)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["version"].as_str().map(str::to_string));
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    json!({"courtside_bench": env!("CARGO_PKG_VERSION"), "socket.io": socketio, "node": node})
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
