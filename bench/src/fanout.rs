//! `fanout`: one room, N subscribers, a paced series of events published over HTTP; every
//! client's deliveries are accounted for and timed. Run against Courtside and the Socket.IO peer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::clients::{self, Frame, Protocol, Publisher};
use crate::procstat;
use crate::servers::ServerProcess;
use crate::stats::{self, Accounting, ClientTally, LatencySummary};

/// The knobs of one fan-out run.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutParams {
    pub clients: usize,
    pub messages: u64,
    pub rate_per_second: f64,
    pub payload_bytes: usize,
}

/// The figures of one fan-out run against one server.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutResult {
    pub server: &'static str,
    pub params: FanoutParams,
    pub connected: usize,
    pub connect_seconds: f64,
    pub accounting: Accounting,
    pub latency: LatencySummary,
    pub cdf_ms: Vec<(f64, f64)>,
    pub deliveries_per_second: f64,
    pub server_cpu_seconds: f64,
    pub server_cpu_us_per_delivery: f64,
    pub server_rss_bytes: u64,
    pub server_bytes_per_idle_connection: f64,
    pub generator_cpu_seconds: f64,
    pub wall_seconds: f64,
}

const ROOM: &str = "bench:fanout";

pub async fn run(
    server: &ServerProcess,
    protocol: Protocol,
    params: &FanoutParams,
) -> anyhow::Result<(FanoutResult, Histogram<u64>)> {
    let pid = server.pid();
    let rss_before = procstat::rss_bytes(&pid).unwrap_or(0);
    let origin = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let connect_started = Instant::now();
    let mut readers = Vec::with_capacity(params.clients);
    let limit = Arc::new(tokio::sync::Semaphore::new(256));
    let mut connecting = Vec::with_capacity(params.clients);
    for _ in 0..params.clients {
        let limit = limit.clone();
        let addr = server.http;
        connecting.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await;
            clients::connect(protocol, addr, ROOM).await
        }));
    }
    for task in connecting {
        if let Ok(Ok(ws)) = task.await {
            let expected = params.messages;
            let stop = stop_rx.clone();
            readers.push(tokio::spawn(read(ws, protocol, expected, origin, stop)));
        }
    }
    let connected = readers.len();
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    let rss_connected = procstat::rss_bytes(&pid).unwrap_or(0);

    let cpu_before = procstat::cpu_time(&pid).unwrap_or_default();
    let gen_before = procstat::cpu_time("self").unwrap_or_default();
    let started = Instant::now();
    let mut publisher = Publisher::connect(protocol, server.http).await?;
    let pad = "x".repeat(params.payload_bytes);
    let gap = Duration::from_secs_f64(1.0 / params.rate_per_second.max(0.001));
    let mut tick = tokio::time::interval(gap);
    for index in 1..=params.messages {
        tick.tick().await;
        publisher
            .publish(ROOM, index, clients::micros_since(origin), &pad)
            .await?;
    }
    // Give the last messages time to arrive, then stop whoever is still waiting.
    let grace = tokio::time::sleep(Duration::from_secs(5));
    tokio::pin!(grace);
    let mut all = futures_util::future::join_all(readers);
    let results = tokio::select! {
        results = &mut all => results,
        _ = &mut grace => {
            let _ = stop_tx.send(true);
            all.await
        }
    };
    let wall = started.elapsed();
    let server_cpu = procstat::cpu_time(&pid).unwrap_or_default().saturating_sub(cpu_before);
    let generator_cpu = procstat::cpu_time("self")
        .unwrap_or_default()
        .saturating_sub(gen_before);

    let mut histogram = stats::new_histogram();
    let mut accounting = Accounting::default();
    for (tally, h) in results.into_iter().flatten() {
        accounting.add(params.messages, &tally);
        histogram.add(&h).ok();
    }
    for _ in connected..params.clients {
        accounting.add(
            params.messages,
            &ClientTally {
                disconnected: true,
                ..ClientTally::default()
            },
        );
    }
    let delivered = accounting.received.max(1);
    let result = FanoutResult {
        server: server.name,
        params: params.clone(),
        connected,
        connect_seconds,
        latency: stats::summarize(&histogram),
        cdf_ms: stats::cdf(&histogram),
        deliveries_per_second: accounting.received as f64 / wall.as_secs_f64(),
        server_cpu_seconds: server_cpu.as_secs_f64(),
        server_cpu_us_per_delivery: server_cpu.as_secs_f64() * 1e6 / delivered as f64,
        server_rss_bytes: procstat::rss_bytes(&pid).unwrap_or(0),
        server_bytes_per_idle_connection: rss_connected.saturating_sub(rss_before) as f64 / connected.max(1) as f64,
        generator_cpu_seconds: generator_cpu.as_secs_f64(),
        wall_seconds: wall.as_secs_f64(),
        accounting,
    };
    Ok((result, histogram))
}

/// One client: reads until it holds every message, the connection ends, or the run stops.
async fn read(
    mut ws: clients::Ws,
    protocol: Protocol,
    expected: u64,
    origin: Instant,
    mut stop: watch::Receiver<bool>,
) -> (ClientTally, Histogram<u64>) {
    let mut tally = ClientTally::default();
    let mut histogram = stats::new_histogram();
    let mut seen = vec![false; expected as usize + 1];
    while tally.received < expected {
        let frame = tokio::select! {
            frame = ws.next() => frame,
            _ = stop.changed() => break,
        };
        let text = match frame {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(_)) => continue,
            _ => {
                tally.disconnected = true;
                break;
            }
        };
        match clients::parse(protocol, &text) {
            Frame::Message(m) => {
                let latency = clients::micros_since(origin).saturating_sub(m.sent_us).max(1);
                match seen.get_mut(m.index as usize) {
                    Some(seen) if !*seen => {
                        *seen = true;
                        tally.received += 1;
                        histogram.record(latency).ok();
                    }
                    Some(_) => tally.duplicates += 1,
                    None => {}
                }
            }
            Frame::Reply(reply) => {
                let _ = ws.send(Message::text(reply)).await;
            }
            Frame::Other => {}
        }
    }
    let _ = ws.close(None).await;
    (tally, histogram)
}
