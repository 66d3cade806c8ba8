//! courtside-bench: measures Courtside on this machine, with the original design (Socket.IO)
//! side by side in the same run, and writes the figures to bench/results/. See bench/README.md.

mod clients;
mod fanout;
mod floor;
mod procstat;
mod servers;
mod stats;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

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
    /// Where to write the JSON results (default: bench/results/SCENARIO-UNIXTIME.json).
    #[arg(long, global = true)]
    json: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// One room, N subscribers, paced events: delivery, latency, server CPU per delivery.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 200)]
        messages: u64,
        /// Publishes per second.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// Padding added to each message, in bytes.
        #[arg(long, default_value_t = 60)]
        payload: usize,
    },
    /// The cost of a loopback TCP write: one frame per write, and ten per write.
    Floor {
        #[arg(long, default_value_t = 1000)]
        sockets: usize,
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let command: Vec<String> = std::env::args().collect();
    let (name, results) = match &cli.scenario {
        Scenario::Floor { sockets, rounds } => {
            let (sockets, rounds) = (*sockets, *rounds);
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
            ("floor", serde_json::to_value(&floor)?)
        }
        Scenario::Fanout {
            clients,
            messages,
            rate,
            payload,
        } => {
            let params = fanout::FanoutParams {
                clients: *clients,
                messages: *messages,
                rate_per_second: *rate,
                payload_bytes: *payload,
            };
            let binary = servers::courtside_binary(cli.courtside_bin.as_deref())?;
            let mut runs = Vec::new();
            let courtside = servers::start_courtside(&binary, &[]).await?;
            eprintln!(
                "fanout: {} clients, {} messages at {}/s against courtside ...",
                params.clients, params.messages, params.rate_per_second
            );
            runs.push(fanout::run(&courtside, clients::Protocol::Courtside, &params).await?.0);
            drop(courtside);
            if !cli.no_peer {
                let peer = servers::start_socketio().await?;
                eprintln!("fanout: the same against socket.io ...");
                runs.push(fanout::run(&peer, clients::Protocol::SocketIo, &params).await?.0);
            }
            print_fanout(&runs);
            if let Some(r) = runs.iter().find(|r| !r.accounting.adds_up()) {
                anyhow::bail!(
                    "{}: the delivery accounting does not add up: {:?}",
                    r.server,
                    r.accounting
                );
            }
            ("fanout", serde_json::to_value(&runs)?)
        }
    };
    let record = serde_json::json!({
        "scenario": name,
        "machine": procstat::machine(),
        "command": command.join(" "),
        "git_commit": git_commit(),
        "courtside_version": env!("CARGO_PKG_VERSION"),
        "results": results,
    });
    let path = cli.json.unwrap_or_else(|| {
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
    Ok(())
}

fn print_fanout(runs: &[fanout::FanoutResult]) {
    println!(
        "{:<10} {:>7} {:>9} {:>9} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>11} {:>11} {:>9}",
        "server",
        "clients",
        "expected",
        "received",
        "lost",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "p99.9",
        "max ms",
        "cpu µs/dlv",
        "B/idle conn",
        "gen cpu s"
    );
    for r in runs {
        println!(
            "{:<10} {:>7} {:>9} {:>9} {:>6} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>11.2} {:>11.0} {:>9.2}",
            r.server,
            r.connected,
            r.accounting.expected,
            r.accounting.received,
            r.accounting.lost,
            r.latency.p50_ms,
            r.latency.p95_ms,
            r.latency.p99_ms,
            r.latency.p999_ms,
            r.latency.max_ms,
            r.server_cpu_us_per_delivery,
            r.server_bytes_per_idle_connection,
            r.generator_cpu_seconds
        );
    }
    for r in runs {
        let a = &r.accounting;
        let connect_ratio = r.connected as f64 / r.params.clients.max(1) as f64;
        let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
        println!(
            "{}: accounting {} (received {} + conflated {} + lost {} of {} expected)",
            r.server,
            if a.adds_up() { "adds up" } else { "DOES NOT ADD UP" },
            a.received,
            a.conflated,
            a.lost,
            a.expected
        );
        println!("  old design's KPIs: connection success {:.2}% > 99.5% {}; delivery {:.3}% > 99.9% {}; p50 < 100 ms {}; p95 < 500 ms {}; p99 < 1000 ms {}",
            connect_ratio * 100.0, verdict(connect_ratio > 0.995), a.delivery_ratio() * 100.0, verdict(a.delivery_ratio() > 0.999),
            verdict(r.latency.p50_ms < 100.0), verdict(r.latency.p95_ms < 500.0), verdict(r.latency.p99_ms < 1000.0));
        println!(
            "  ours: p99 < 25 ms {} (the target is stated for 10,000 subscribers; this run had {})",
            verdict(r.latency.p99_ms < 25.0),
            r.connected
        );
    }
    if let [a, b] = runs {
        println!(
            "ratio courtside/socket.io: cpu per delivery {:.2}, p99 {:.2}, memory per idle connection {:.2}",
            a.server_cpu_us_per_delivery / b.server_cpu_us_per_delivery.max(f64::MIN_POSITIVE),
            a.latency.p99_ms / b.latency.p99_ms.max(f64::MIN_POSITIVE),
            a.server_bytes_per_idle_connection / b.server_bytes_per_idle_connection.max(1.0)
        );
    }
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
