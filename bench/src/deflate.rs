//! `ws-deflate`: bytes on the wire per delivery with and without permessage-deflate, on one
//! Courtside node. Two raw WebSocket clients, one offering permessage-deflate as Chromium does
//! and one offering nothing, follow a 64-team bracket (brackets-model's shape) that changes one
//! match per publish, and a game's score; every frame each receives is counted with its header.
//! Also times compressing the bracket's frame in this process (the server does it once per
//! publish, whatever the number of subscribers).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::clients::{Kind, Protocol, Publisher};
use crate::servers::{start_courtside, CourtsideOptions};

const OFFER: &str = "permessage-deflate; client_max_window_bits";
const HANG: Duration = Duration::from_secs(30);

/// A WebSocket client on a bare socket that reads frames as they come, so that their size on
/// the wire is counted (also the `bracket` scenario's, for Courtside and Socket.IO).
pub struct WireClient {
    tcp: TcpStream,
    buf: Vec<u8>,
    /// permessage-deflate was negotiated.
    pub deflate: bool,
    /// The server keeps its compression context from message to message (it did not answer
    /// `server_no_context_takeover`), so an inflater must keep its window too.
    pub context_takeover: bool,
}

/// One frame as it came: its size on the wire, whether RSV1 was set, and its payload.
pub struct WireFrame {
    pub opcode: u8,
    pub compressed: bool,
    pub wire_bytes: usize,
    pub payload: Vec<u8>,
}

impl WireClient {
    /// Connects to Courtside's `/ws`, offering permessage-deflate as Chromium does if `offer`.
    async fn connect(addr: SocketAddr, offer: bool) -> anyhow::Result<Self> {
        Self::connect_to(addr, "/ws", offer).await
    }

    /// Connects to `path` (Courtside's `/ws`, or Socket.IO's `/socket.io/?EIO=4&transport=websocket`).
    pub async fn connect_to(addr: SocketAddr, path: &str, offer: bool) -> anyhow::Result<Self> {
        let mut tcp = crate::clients::connect_tcp(addr).await?;
        let extensions = if offer {
            format!("Sec-WebSocket-Extensions: {OFFER}\r\n")
        } else {
            String::new()
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extensions}\r\n"
        );
        tcp.write_all(request.as_bytes()).await?;
        let mut client = Self {
            tcp,
            buf: Vec::new(),
            deflate: false,
            context_takeover: false,
        };
        let end = loop {
            if let Some(end) = client.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            client.fill().await?;
        };
        let head = String::from_utf8_lossy(&client.buf[..end]).to_ascii_lowercase();
        client.buf.drain(..end);
        if !head.starts_with("http/1.1 101") {
            bail!("upgrade refused: {head}");
        }
        client.deflate = head.contains("sec-websocket-extensions: permessage-deflate");
        client.context_takeover = client.deflate && !head.contains("server_no_context_takeover");
        Ok(client)
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        let mut chunk = [0u8; 65536];
        let n = tokio::time::timeout(HANG, self.tcp.read(&mut chunk))
            .await
            .context("no bytes in 30 s")??;
        if n == 0 {
            bail!("the server closed the connection");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    pub async fn frame(&mut self) -> anyhow::Result<WireFrame> {
        while self.buf.len() < 2 {
            self.fill().await?;
        }
        let (len, at) = match self.buf[1] & 0x7f {
            126 => {
                while self.buf.len() < 4 {
                    self.fill().await?;
                }
                (usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])), 4)
            }
            127 => {
                while self.buf.len() < 10 {
                    self.fill().await?;
                }
                let mut n = [0u8; 8];
                n.copy_from_slice(&self.buf[2..10]);
                (usize::try_from(u64::from_be_bytes(n))?, 10)
            }
            n => (usize::from(n), 2),
        };
        while self.buf.len() < at + len {
            self.fill().await?;
        }
        let frame = WireFrame {
            opcode: self.buf[0] & 0x0f,
            compressed: self.buf[0] & 0x40 != 0,
            wire_bytes: at + len,
            payload: self.buf[at..at + len].to_vec(),
        };
        self.buf.drain(..at + len);
        Ok(frame)
    }

    /// The next text frame, skipping pings.
    pub async fn text_frame(&mut self) -> anyhow::Result<WireFrame> {
        loop {
            let frame = self.frame().await?;
            if frame.opcode == 1 {
                return Ok(frame);
            }
        }
    }

    async fn subscribe(&mut self, room: &str) -> anyhow::Result<()> {
        self.send_text(&json!({"type": "subscribe", "room": room}).to_string())
            .await?;
        self.text_frame().await?;
        Ok(())
    }

    /// Sends one masked text frame (under 126 bytes, as every command of the bench is).
    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        let mask = [1u8, 2, 3, 4];
        let len = u8::try_from(text.len())
            .ok()
            .filter(|n| *n < 126)
            .context("a command of 126 bytes or more")?;
        let mut out = vec![0x81, 0x80 | len];
        out.extend_from_slice(&mask);
        out.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.tcp.write_all(&out).await?;
        Ok(())
    }
}

/// A 64-team single-elimination bracket in brackets-model's shape: participants, one stage, six
/// rounds, 63 matches with `opponent1`/`opponent2` `{id, position, score, result}` and a status.
pub struct Bracket {
    matches: Vec<Value>,
    participants: Vec<Value>,
}

impl Bracket {
    pub fn new() -> Self {
        let participants = (0..64)
            .map(|i| json!({"id": i, "tournament_id": 7, "name": format!("Phoenix Team {} U12", 1000 + i * 37)}))
            .collect();
        let mut matches = Vec::new();
        let mut id = 0;
        for round in 0..6u32 {
            for number in 0..(32 >> round) {
                let (one, two) = if round == 0 {
                    (
                        json!({"id": 2 * number, "position": 2 * number + 1}),
                        json!({"id": 2 * number + 1, "position": 2 * number + 2}),
                    )
                } else {
                    (json!({"id": null}), json!({"id": null}))
                };
                matches.push(
                    json!({"id": id, "stage_id": 0, "group_id": 0, "round_id": round, "number": number + 1,
                                    "child_count": 0, "status": if round == 0 { 2 } else { 0 },
                                    "opponent1": one, "opponent2": two}),
                );
                id += 1;
            }
        }
        Self { matches, participants }
    }

    /// Finishes match `m` (its two opponents known): scores, results, and the winner moved on.
    pub fn finish(&mut self, m: usize, seed: u64) {
        let home = 40 + seed % 30;
        let away = 35 + (seed * 7) % 30;
        let (winner, loser) = if home > away {
            ("opponent1", "opponent2")
        } else {
            ("opponent2", "opponent1")
        };
        let game = &mut self.matches[m];
        game["status"] = json!(4);
        game["opponent1"]["score"] = json!(home);
        game["opponent2"]["score"] = json!(away);
        game[winner]["result"] = json!("win");
        game[loser]["result"] = json!("loss");
        let winner_id = game[winner]["id"].clone();
        // The next round's match and slot.
        let (round, number) = (
            game["round_id"].as_u64().unwrap_or(0),
            game["number"].as_u64().unwrap_or(1) - 1,
        );
        if round < 5 {
            let first_of_next: u64 = (0..=round).map(|r| 32 >> r).sum();
            let next = usize::try_from(first_of_next + number / 2).unwrap_or(0);
            let slot = if number % 2 == 0 { "opponent1" } else { "opponent2" };
            self.matches[next][slot] = json!({"id": winner_id, "position": number % 2 + 1});
            if !self.matches[next]["opponent1"]["id"].is_null() && !self.matches[next]["opponent2"]["id"].is_null() {
                self.matches[next]["status"] = json!(2);
            }
        }
    }

    pub fn to_json(&self) -> String {
        json!({
            "stage": {"id": 0, "tournament_id": 7, "name": "Phoenix Saturday U12 Gold", "type": "single_elimination", "number": 1,
                      "settings": {"size": 64, "seedOrdering": ["natural"], "grandFinal": "none"}},
            "participant": self.participants,
            "match": self.matches,
        })
        .to_string()
    }
}

/// A game's score state (about 60 bytes of JSON), the `i`-th of a quarter's last minutes.
pub fn score_state(i: usize) -> String {
    json!({"home": 40 + i, "away": 38 + i / 2, "clock": format!("Q4 {}:{:02}", 7 - i / 10, 59 - i % 60), "period": 4})
        .to_string()
}

/// Sums of what one client received of one kind of message.
#[derive(Default)]
struct Tally {
    deliveries: usize,
    wire_bytes: usize,
    compressed: usize,
}

impl Tally {
    fn add(&mut self, frame: &WireFrame) {
        self.deliveries += 1;
        self.wire_bytes += frame.wire_bytes;
        self.compressed += usize::from(frame.compressed);
    }

    fn per_delivery(&self) -> f64 {
        self.wire_bytes as f64 / self.deliveries.max(1) as f64
    }
}

pub async fn run(binary: &Path, publishes: usize) -> anyhow::Result<Value> {
    let server = start_courtside(binary, &CourtsideOptions::default()).await?;
    let mut deflating = WireClient::connect(server.http, true).await?;
    let mut plain = WireClient::connect(server.http, false).await?;
    if !deflating.deflate || plain.deflate {
        bail!("the server did not negotiate permessage-deflate with the client that offered it alone");
    }
    for client in [&mut deflating, &mut plain] {
        client.subscribe("bracket:bench").await?;
        client.subscribe("game:bench").await?;
    }
    let mut publisher = Publisher::connect(Protocol::Courtside, server.http).await?;
    let mut bracket = Bracket::new();
    let mut state_bytes = Vec::new();
    let (mut bracket_deflate, mut bracket_plain, mut score_deflate, mut score_plain) =
        (Tally::default(), Tally::default(), Tally::default(), Tally::default());
    for i in 0..publishes.min(63) {
        bracket.finish(i, i as u64);
        let data = bracket.to_json();
        state_bytes.push(data.len());
        publisher
            .publish("bracket:bench", Kind::State, i as u64, 0, &data)
            .await?;
        bracket_deflate.add(&deflating.text_frame().await?);
        bracket_plain.add(&plain.text_frame().await?);
        let score = score_state(i);
        publisher
            .publish("game:bench", Kind::State, i as u64, 0, &score)
            .await?;
        score_deflate.add(&deflating.text_frame().await?);
        score_plain.add(&plain.text_frame().await?);
    }

    // The server's once-per-publish cost, in this process: compressing the last bracket frame.
    let frame = format!(
        r#"{{"type":"state","room":"bracket:bench","version":63,"ts":1700000000000,"data":{{"i":0,"t":0,"d":{}}}}}"#,
        bracket.to_json()
    );
    let rounds = 200;
    let started = Instant::now();
    let mut compressed_len = 0;
    for _ in 0..rounds {
        compressed_len = courtside_core::deflate::compress_message(frame.as_bytes()).map_or(0, |c| c.len());
    }
    let compress_us = started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);

    let mean_state = state_bytes.iter().sum::<usize>() as f64 / state_bytes.len().max(1) as f64;
    println!(
        "ws-deflate: {} bracket states (mean {:.0} bytes of JSON) and as many score states, one node",
        state_bytes.len(),
        mean_state
    );
    println!("| message | client | bytes on the wire per delivery | sent compressed |");
    println!("|---|---|---:|---:|");
    for (what, tally_d, tally_p) in [
        ("64-team bracket state", &bracket_deflate, &bracket_plain),
        ("score state", &score_deflate, &score_plain),
    ] {
        println!(
            "| {what} | plain | {:.0} | {} of {} |",
            tally_p.per_delivery(),
            tally_p.compressed,
            tally_p.deliveries
        );
        println!(
            "| {what} | permessage-deflate | {:.0} ({:.1} % of plain) | {} of {} |",
            tally_d.per_delivery(),
            100.0 * tally_d.per_delivery() / tally_p.per_delivery().max(1.0),
            tally_d.compressed,
            tally_d.deliveries
        );
    }
    println!(
        "compressing one {}-byte bracket frame (once per publish): {:.0} µs, {} bytes",
        frame.len(),
        compress_us,
        compressed_len
    );
    let tally = |t: &Tally| json!({"deliveries": t.deliveries, "wire_bytes": t.wire_bytes, "per_delivery": t.per_delivery(), "compressed": t.compressed});
    Ok(json!({
        "bracket_state_bytes_mean": mean_state,
        "bracket": {"plain": tally(&bracket_plain), "deflate": tally(&bracket_deflate)},
        "score": {"plain": tally(&score_plain), "deflate": tally(&score_deflate)},
        "compress_frame_bytes": frame.len(),
        "compress_us": compress_us,
        "compressed_bytes": compressed_len,
    }))
}
