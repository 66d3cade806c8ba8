//! `bracket`: what a bracket update costs, per delivery, on the wire and in server CPU: full
//! states, deltas, permessage-deflate and both on WebSocket, full and deltas on WebTransport,
//! beside Socket.IO with and without `perMessageDeflate` (threshold 1,024), in one run (issue 23).
//!
//! Each setup runs on a fresh server: N clients follow a 64-team bracket that finishes one match
//! per publish (brackets-model's shape, about 15 KB), then a game's score (about 60 bytes, under
//! every threshold). Each client applies what it gets (inflates, applies deltas) and must end
//! on the last state, byte for byte for Courtside; the run fails otherwise.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use courtside_core::wire::{self, AliasAck, ClientMessage, FrameDecoder, ServerMessage};
use flate2::{Decompress, FlushDecompress, Status};
use serde_json::{json, Value};

use crate::clients::{parse_data, Kind, Protocol, Publisher};
use crate::deflate::{score_state, Bracket, WireClient, WireFrame};
use crate::servers::{start_courtside, start_socketio_with, CourtsideOptions, ServerProcess};
use crate::webtransport::{WtEndpoints, RELAYED};

/// The rooms of the two phases: the bracket's, then the score's.
const ROOMS: [&str; 2] = ["bracket:bench", "game:bench"];

/// The phases, each with its room: a first state that every client takes whole (nobody holds a
/// base yet; not measured), then the changes, measured.
const PHASES: [(&str, usize); 4] = [
    ("bracket, first state", 0),
    ("bracket", 0),
    ("score, first state", 1),
    ("score", 1),
];

/// Socket.IO's `perMessageDeflate` threshold in the original design (ADR-022), and Courtside's
/// default `--ws-compress-threshold`.
const SOCKETIO_THRESHOLD: usize = 1024;

/// Largest state a client accepts after applying a delta.
const MAX_STATE: usize = 1 << 20;

/// What the scenario runs.
#[derive(Debug, Clone)]
pub struct Params {
    pub clients: usize,
    /// Bracket changes (and as many score states), at most 63.
    pub publishes: usize,
    /// Publishes per second in each phase.
    pub rate: f64,
    /// Run the Socket.IO setups too.
    pub peer: bool,
    /// Only the setups whose label contains this (`--only "deltas + deflate"`).
    pub only: Option<String>,
}

/// One server set-up and what its clients ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    WebSocket { delta: bool, deflate: bool },
    WebTransport { delta: bool },
    SocketIo { deflate: bool },
}

impl Setup {
    fn all(peer: bool) -> Vec<Self> {
        let mut all = vec![
            Self::WebSocket {
                delta: false,
                deflate: false,
            },
            Self::WebSocket {
                delta: true,
                deflate: false,
            },
            Self::WebSocket {
                delta: false,
                deflate: true,
            },
            Self::WebSocket {
                delta: true,
                deflate: true,
            },
            Self::WebTransport { delta: false },
            Self::WebTransport { delta: true },
        ];
        if peer {
            all.extend([Self::SocketIo { deflate: false }, Self::SocketIo { deflate: true }]);
        }
        all
    }

    fn label(self) -> &'static str {
        match self {
            Self::WebSocket {
                delta: false,
                deflate: false,
            } => "courtside websocket, full states",
            Self::WebSocket {
                delta: true,
                deflate: false,
            } => "courtside websocket, deltas",
            Self::WebSocket {
                delta: false,
                deflate: true,
            } => "courtside websocket, deflate",
            Self::WebSocket {
                delta: true,
                deflate: true,
            } => "courtside websocket, deltas + deflate",
            Self::WebTransport { delta: false } => "courtside webtransport, full states",
            Self::WebTransport { delta: true } => "courtside webtransport, deltas",
            Self::SocketIo { deflate: false } => "socket.io, plain",
            Self::SocketIo { deflate: true } => "socket.io, perMessageDeflate 1024",
        }
    }

    /// The setup whose bytes per delivery are "the full state's" for this one.
    fn full(self) -> Self {
        match self {
            Self::WebSocket { .. } => Self::WebSocket {
                delta: false,
                deflate: false,
            },
            Self::WebTransport { .. } => Self::WebTransport { delta: false },
            Self::SocketIo { .. } => Self::SocketIo { deflate: false },
        }
    }
}

/// What the clients of one setup count, per phase.
#[derive(Default)]
struct Tallies {
    phase: AtomicUsize,
    joined: AtomicUsize,
    failed: AtomicUsize,
    /// WebTransport handshakes that failed once and were tried again.
    retried: AtomicUsize,
    /// State and delta messages received.
    deliveries: [AtomicUsize; 4],
    /// Their bytes: the whole WebSocket frame, or the WebTransport message.
    bytes: [AtomicUsize; 4],
    compressed: [AtomicUsize; 4],
    deltas: [AtomicUsize; 4],
    /// Clients holding the phase's last state (byte for byte, on Courtside).
    at_last: [AtomicUsize; 4],
    /// Clients whose last state differs from what was published.
    wrong: [AtomicUsize; 4],
    /// The last state published in each phase (its data as Courtside keeps it), and its index.
    last: [OnceLock<(u64, String)>; 4],
}

impl Tallies {
    fn count(&self, bytes: usize, compressed: bool, delta: bool) {
        let phase = self.phase.load(Relaxed);
        self.deliveries[phase].fetch_add(1, Relaxed);
        self.bytes[phase].fetch_add(bytes, Relaxed);
        self.compressed[phase].fetch_add(usize::from(compressed), Relaxed);
        self.deltas[phase].fetch_add(usize::from(delta), Relaxed);
    }

    /// A client's state changed to `text` (the published data): is it the phase's last?
    fn check(&self, held: &mut [bool; 4], text: &str, exact: bool) {
        let phase = self.phase.load(Relaxed);
        let (Some((index, last)), Some(data)) = (self.last[phase].get(), parse_data(text)) else {
            return;
        };
        if data.index != *index || held[phase] {
            return;
        }
        held[phase] = true;
        if !exact || text == last {
            self.at_last[phase].fetch_add(1, Relaxed);
        } else {
            self.wrong[phase].fetch_add(1, Relaxed);
        }
    }
}

/// Inflates permessage-deflate messages, keeping the window between messages when the server
/// keeps its own (Socket.IO's `ws`), or starting afresh each time (Courtside).
struct Inflater {
    inflate: Decompress,
    context_takeover: bool,
}

impl Inflater {
    fn new(context_takeover: bool) -> Self {
        Self {
            inflate: Decompress::new(false),
            context_takeover,
        }
    }

    fn inflate(&mut self, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
        if !self.context_takeover {
            self.inflate.reset(false);
        }
        let mut input = Vec::with_capacity(payload.len() + 4);
        input.extend_from_slice(payload);
        input.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut out = Vec::with_capacity(payload.len() * 10 + 256);
        let mut at = 0;
        loop {
            let (in_before, out_before) = (self.inflate.total_in(), out.len());
            let status = self
                .inflate
                .decompress_vec(&input[at..], &mut out, FlushDecompress::Sync)
                .context("a compressed message that does not inflate")?;
            at += usize::try_from(self.inflate.total_in() - in_before)?;
            let full = out.len() == out.capacity();
            if status == Status::StreamEnd || (at == input.len() && !full) {
                return Ok(out);
            }
            if full {
                out.reserve(out.capacity());
            } else if out.len() == out_before && self.inflate.total_in() == in_before {
                bail!("inflating made no progress");
            }
        }
    }
}

/// The states a Courtside client holds, by room: version and data text (deltas apply to it).
#[derive(Default)]
struct Held {
    states: [Option<(u64, String)>; 2],
    at_last: [bool; 4],
}

impl Held {
    fn room(room: &str) -> anyhow::Result<usize> {
        ROOMS
            .iter()
            .position(|r| *r == room)
            .with_context(|| format!("a message for another room: {room}"))
    }

    /// A whole state (PROTOCOL.md's client rules): an older one than held is dropped (a late
    /// datagram), the same version replaces the text (the state after a `subscribed`).
    fn set(&mut self, tallies: &Tallies, room: usize, version: u64, text: String) {
        if self.states[room].as_ref().is_some_and(|(held, _)| *held > version) {
            return;
        }
        tallies.check(&mut self.at_last, &text, true);
        self.states[room] = Some((version, text));
    }

    /// A delta (PROTOCOL.md, "Delta states", rules 3–5): not newer than held, dropped; against
    /// another base, dropped if it came as a datagram (the repair brings it again), a failure of
    /// the server's if on the stream (the rules say it never happens).
    fn apply(
        &mut self,
        tallies: &Tallies,
        room: usize,
        version: u64,
        base: u64,
        delta: &str,
        datagram: bool,
    ) -> anyhow::Result<()> {
        let Some((held, text)) = &self.states[room] else {
            if datagram {
                return Ok(());
            }
            bail!("a delta for a room without a state")
        };
        if version <= *held || (datagram && *held != base) {
            return Ok(());
        }
        if *held != base {
            bail!("a delta against version {base} while holding {held}");
        }
        let next = courtside_core::delta::apply(text.as_bytes(), delta.as_bytes(), MAX_STATE)
            .map_err(|e| anyhow::anyhow!("a delta that does not apply: {e:?}"))?;
        self.set(tallies, room, version, String::from_utf8(next)?);
        Ok(())
    }
}

/// A Courtside WebSocket message as the client reads it.
#[derive(serde::Deserialize)]
struct WsMessage<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(borrow)]
    room: Option<std::borrow::Cow<'a, str>>,
    version: Option<u64>,
    base: Option<u64>,
    #[serde(borrow)]
    delta: Option<std::borrow::Cow<'a, str>>,
}

/// The next text message (inflated if it came compressed) and its frame, skipping pings.
async fn next_text(ws: &mut WireClient, inflater: &mut Inflater) -> anyhow::Result<(WireFrame, Vec<u8>)> {
    let mut frame = ws.text_frame().await?;
    let payload = match frame.compressed {
        true => inflater.inflate(&frame.payload)?,
        false => std::mem::take(&mut frame.payload),
    };
    Ok((frame, payload))
}

/// One WebSocket client of Courtside or Socket.IO, until the connection ends.
/// (`connecting` is the client's place among those connecting at once, given up once joined.)
async fn websocket_client(
    addr: SocketAddr,
    setup: Setup,
    tallies: Arc<Tallies>,
    connecting: Option<tokio::sync::OwnedSemaphorePermit>,
) -> anyhow::Result<()> {
    let (protocol, delta, offer) = match setup {
        Setup::WebSocket { delta, deflate } => (Protocol::Courtside, delta, deflate),
        Setup::SocketIo { deflate } => (Protocol::SocketIo, false, deflate),
        Setup::WebTransport { .. } => bail!("not a WebSocket setup"),
    };
    let path = match protocol {
        Protocol::Courtside => "/ws",
        Protocol::SocketIo => "/socket.io/?EIO=4&transport=websocket",
    };
    let mut ws = WireClient::connect_to(addr, path, offer).await?;
    if offer != ws.deflate {
        bail!("permessage-deflate offered: {offer}, negotiated: {}", ws.deflate);
    }
    let mut inflater = Inflater::new(ws.context_takeover);
    match protocol {
        Protocol::Courtside => {
            for room in ROOMS {
                let mut command = json!({"type": "subscribe", "room": room});
                if delta {
                    command["delta"] = json!("fossil");
                }
                ws.send_text(&command.to_string()).await?;
            }
            for _ in ROOMS {
                let (_, reply) = next_text(&mut ws, &mut inflater).await?;
                if !reply.starts_with(br#"{"type":"subscribed""#) {
                    bail!("subscribe refused: {}", String::from_utf8_lossy(&reply));
                }
            }
        }
        Protocol::SocketIo => {
            // Every message goes through the inflater, even these: with context takeover, a
            // later message refers back to the bytes of earlier ones.
            next_text(&mut ws, &mut inflater).await?; // Engine.IO's open packet
            ws.send_text("40").await?;
            next_text(&mut ws, &mut inflater).await?;
            for room in ROOMS {
                ws.send_text(&format!(r#"42["join","{room}"]"#)).await?;
            }
            for _ in ROOMS {
                next_text(&mut ws, &mut inflater).await?;
            }
        }
    }
    tallies.joined.fetch_add(1, Relaxed);
    drop(connecting);
    let mut held = Held::default();
    loop {
        let (frame, payload) = next_text(&mut ws, &mut inflater).await?;
        let text = std::str::from_utf8(&payload)?;
        match protocol {
            Protocol::Courtside => {
                let message: WsMessage = serde_json::from_str(text)?;
                match message.kind {
                    "state" => {
                        let room = Held::room(message.room.as_deref().unwrap_or(""))?;
                        let at = text.find(r#","data":"#).context("a state without data")?;
                        let data = text.get(at + 8..text.len() - 1).context("a state's data")?;
                        tallies.count(frame.wire_bytes, frame.compressed, false);
                        held.set(&tallies, room, message.version.unwrap_or(0), data.to_string());
                    }
                    "delta" => {
                        let room = Held::room(message.room.as_deref().unwrap_or(""))?;
                        tallies.count(frame.wire_bytes, frame.compressed, true);
                        held.apply(
                            &tallies,
                            room,
                            message.version.unwrap_or(0),
                            message.base.unwrap_or(0),
                            message.delta.as_deref().unwrap_or(""),
                            false,
                        )?;
                    }
                    _ => {}
                }
            }
            Protocol::SocketIo => {
                if text == "2" {
                    ws.send_text("3").await?;
                } else if let Some(data) = text.strip_prefix(r#"42["state","#).and_then(|t| t.strip_suffix(']')) {
                    tallies.count(frame.wire_bytes, frame.compressed, false);
                    // Socket.IO sends the value again as JSON.stringify makes it, not as published.
                    tallies.check(&mut held.at_last, data, false);
                }
            }
        }
    }
}

/// One WebTransport client of Courtside (states and deltas on the stream or as datagrams;
/// datagrams acknowledged at once), until the session ends.
async fn webtransport_client(
    endpoints: Arc<WtEndpoints>,
    server: (SocketAddr, String),
    delta: bool,
    tallies: Arc<Tallies>,
    mut connecting: Option<tokio::sync::OwnedSemaphorePermit>,
) -> anyhow::Result<()> {
    let (endpoint, target) = endpoints.pick(&server.1, server.0).await?;
    let url = format!("https://{target}/wt");
    // A handshake that fails is tried once more, as courtside.js reconnects (and the other
    // scenarios do: `load::CONNECT_RETRY_PAUSE`).
    let connection = match endpoint.connect(&url).await {
        Ok(connection) => connection,
        Err(error) => {
            eprintln!("bracket: a WebTransport handshake failed ({error}); trying again");
            tallies.retried.fetch_add(1, Relaxed);
            tokio::time::sleep(crate::load::CONNECT_RETRY_PAUSE).await;
            endpoint
                .connect(&url)
                .await
                .context("webtransport connect, second try")?
        }
    };
    let (mut send, mut recv) = connection.open_bi().await?.await?;
    let mut frames = bytes::BytesMut::new();
    for room in ROOMS {
        let mut command = json!({"type": "subscribe", "room": room});
        if delta {
            command["delta"] = json!("fossil");
        }
        let command = courtside_core::parse_command(&command.to_string())
            .map_err(|e| anyhow::anyhow!("subscribe command: {e:?}"))?;
        wire::put_frame(&mut frames, &wire::encode_client(&ClientMessage::Command(command)));
    }
    send.write_all(&frames).await?;
    let mut decoder = FrameDecoder::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut aliases: HashMap<u64, usize> = HashMap::new();
    let mut held = Held::default();
    let mut subscribed = 0;
    loop {
        tokio::select! {
            read = recv.read(&mut buf) => {
                let n = read?.context("the control stream ended")?;
                decoder.extend(&buf[..n]);
                while let Some(frame) = decoder.next_frame(1 << 20).map_err(|e| anyhow::anyhow!("{e:?}"))? {
                    let message = wire::decode_server(&frame).map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    match message {
                        ServerMessage::Subscribed(_) => {
                            subscribed += 1;
                            if subscribed == ROOMS.len() {
                                tallies.joined.fetch_add(1, Relaxed);
                                connecting.take();
                            }
                        }
                        ServerMessage::Alias(a) => {
                            aliases.insert(a.alias, Held::room(a.room)?);
                        }
                        ServerMessage::State(s) => {
                            tallies.count(frame.len(), false, false);
                            held.set(&tallies, Held::room(s.room)?, s.version, s.data.to_string());
                        }
                        ServerMessage::Delta(d) => {
                            tallies.count(frame.len(), false, true);
                            held.apply(&tallies, Held::room(d.room)?, d.version, d.base, d.delta, false)?;
                        }
                        ServerMessage::Error(e) => bail!("refused: {}", e.message),
                        _ => {}
                    }
                }
            }
            datagram = connection.receive_datagram() => {
                let datagram = datagram?;
                let payload = datagram.payload();
                let (alias, version) = match wire::decode_server(&payload) {
                    Ok(ServerMessage::AliasedState(s)) => {
                        let Some(&room) = aliases.get(&s.alias) else { continue };
                        tallies.count(payload.len(), false, false);
                        held.set(&tallies, room, s.version, s.data.to_string());
                        (s.alias, s.version)
                    }
                    Ok(ServerMessage::AliasedDelta(d)) => {
                        let Some(&room) = aliases.get(&d.alias) else { continue };
                        tallies.count(payload.len(), false, true);
                        held.apply(&tallies, room, d.version, d.base, d.delta, true)?;
                        (d.alias, d.version)
                    }
                    _ => continue,
                };
                let ack = ClientMessage::Acks(vec![AliasAck { alias, version }]);
                let _ = connection.send_datagram(wire::encode_client(&ack));
            }
        }
    }
}

/// Waits until `done` holds or `within` passes; says whether it held.
async fn wait_for(within: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// One setup on a fresh server: connect, then each phase's publishes, with its figures.
async fn run_setup(binary: &Path, setup: Setup, params: &Params) -> anyhow::Result<Value> {
    let server: ServerProcess = match setup {
        Setup::SocketIo { deflate } => start_socketio_with(None, deflate.then_some(SOCKETIO_THRESHOLD)).await?,
        Setup::WebTransport { .. } => {
            start_courtside(
                binary,
                &CourtsideOptions {
                    webtransport: true,
                    ..CourtsideOptions::default()
                },
            )
            .await?
        }
        Setup::WebSocket { .. } => start_courtside(binary, &CourtsideOptions::default()).await?,
    };
    let protocol = match setup {
        Setup::SocketIo { .. } => Protocol::SocketIo,
        _ => Protocol::Courtside,
    };
    let tallies = Arc::new(Tallies::default());
    let endpoints = Arc::new(WtEndpoints::default());
    let connecting = Arc::new(tokio::sync::Semaphore::new(256));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..params.clients {
        let (tallies, endpoints, connecting) = (tallies.clone(), endpoints.clone(), connecting.clone());
        let (http, wt) = (server.http, server.wt.clone());
        clients.spawn(async move {
            let permit = connecting.acquire_owned().await.ok();
            let ended = match (setup, wt) {
                (Setup::WebTransport { delta }, Some(wt)) => {
                    webtransport_client(endpoints, wt, delta, tallies.clone(), permit).await
                }
                (Setup::WebTransport { .. }, None) => Err(anyhow::anyhow!("no WebTransport endpoint")),
                _ => websocket_client(http, setup, tallies.clone(), permit).await,
            };
            // A client that ends while the run goes on fails it (the run aborts them at its end).
            if let Err(error) = ended {
                if tallies.phase.load(Relaxed) < PHASES.len() {
                    tallies.failed.fetch_add(1, Relaxed);
                    eprintln!("bracket: {}: a client failed: {error:#}", setup.label());
                }
            }
        });
    }
    let all_joined = wait_for(Duration::from_secs(120), || {
        tallies.joined.load(Relaxed) + tallies.failed.load(Relaxed) >= params.clients
    })
    .await;
    if !all_joined || tallies.failed.load(Relaxed) > 0 {
        bail!(
            "{}: {} of {} clients joined, {} failed",
            setup.label(),
            tallies.joined.load(Relaxed),
            params.clients,
            tallies.failed.load(Relaxed)
        );
    }
    let pid = server.pid();
    let mut publisher = Publisher::connect(protocol, server.http).await?;
    let mut bracket = Bracket::new();
    let origin = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / params.rate.max(0.1));
    let mut phases = Vec::new();
    for (phase, (name, room)) in PHASES.iter().enumerate() {
        tallies.phase.store(phase, Relaxed);
        let cpu_before = crate::procstat::cpu_time(&pid).unwrap_or_default();
        let relayed_before = RELAYED.totals();
        let started = Instant::now();
        let mut state_bytes = 0;
        // Index 0 is the first state; 1 to `publishes` are the changes (one match, one score).
        let indices = match phase % 2 {
            0 => 0..=0,
            _ => 1..=params.publishes,
        };
        let count = indices.clone().count();
        for (n, i) in indices.enumerate() {
            tokio::time::sleep_until((started + interval * n as u32).into()).await;
            let payload = match (*room, i) {
                (0, 0) => bracket.to_json(),
                (0, _) => {
                    bracket.finish(i - 1, i as u64);
                    bracket.to_json()
                }
                _ => score_state(i),
            };
            state_bytes += payload.len();
            let sent_us = crate::clients::micros_since(origin);
            if n + 1 == count {
                let data = format!(r#"{{"i":{i},"t":{sent_us},"d":{payload}}}"#);
                let _ = tallies.last[phase].set((i as u64, data));
            }
            publisher
                .publish(ROOMS[*room], Kind::State, i as u64, sent_us, &payload)
                .await?;
        }
        let settled = wait_for(Duration::from_secs(60), || {
            tallies.at_last[phase].load(Relaxed) + tallies.wrong[phase].load(Relaxed) + tallies.failed.load(Relaxed)
                >= params.clients
        })
        .await;
        let cpu = crate::procstat::cpu_time(&pid).unwrap_or_default() - cpu_before;
        let relayed = RELAYED.totals().map(|t| t.since(relayed_before));
        let deliveries = tallies.deliveries[phase].load(Relaxed);
        let bytes = tallies.bytes[phase].load(Relaxed);
        let per = |n: f64| n / deliveries.max(1) as f64;
        let wire_bytes = match setup {
            Setup::WebTransport { .. } => relayed.map_or(0, |r| r.to_client_bytes),
            _ => bytes as u64,
        };
        let figures = json!({
            "phase": name,
            "publishes": count,
            "state_bytes_mean": state_bytes as f64 / count as f64,
            "deliveries": deliveries,
            "wire_bytes_per_delivery": per(wire_bytes as f64),
            "message_bytes_per_delivery": per(bytes as f64),
            "udp_packets_to_clients": relayed.map(|r| r.to_client_packets),
            "compressed": tallies.compressed[phase].load(Relaxed),
            "deltas": tallies.deltas[phase].load(Relaxed),
            "server_cpu_us_per_delivery": per(cpu.as_secs_f64() * 1e6),
            "seconds": started.elapsed().as_secs_f64(),
            "clients_at_last_state": tallies.at_last[phase].load(Relaxed),
            "clients_with_another_state": tallies.wrong[phase].load(Relaxed),
        });
        if !settled || tallies.wrong[phase].load(Relaxed) > 0 || tallies.failed.load(Relaxed) > 0 {
            bail!(
                "{}, {} phase: {} of {} clients hold the last state ({} another, {} failed): {figures}",
                setup.label(),
                name,
                tallies.at_last[phase].load(Relaxed),
                params.clients,
                tallies.wrong[phase].load(Relaxed),
                tallies.failed.load(Relaxed)
            );
        }
        phases.push(figures);
    }
    tallies.phase.store(PHASES.len(), Relaxed);
    clients.abort_all();
    drop(server);
    Ok(
        json!({"setup": setup.label(), "clients": params.clients, "connects_retried": tallies.retried.load(Relaxed), "phases": phases}),
    )
}

/// Runs every setup in turn and prints the table; returns the figures for the JSON.
pub async fn run(binary: &Path, params: Params) -> anyhow::Result<Value> {
    let params = Params {
        publishes: params.publishes.clamp(2, 63),
        ..params
    };
    // Every WebTransport client goes through a relay without loss, which counts the bytes.
    crate::webtransport::set_path_loss(Some(0.0));
    let mut results: Vec<(Setup, Value)> = Vec::new();
    let chosen = |s: &Setup| {
        params
            .only
            .as_ref()
            .is_none_or(|only| s.label().contains(only.as_str()))
    };
    for setup in Setup::all(params.peer).into_iter().filter(chosen) {
        eprintln!("bracket: {} ({} clients)", setup.label(), params.clients);
        let figures = run_setup(binary, setup, &params).await?;
        results.push((setup, figures));
    }
    let figure = |v: &Value, phase: usize, key: &str| v["phases"][phase][key].as_f64().unwrap_or(0.0);
    println!(
        "\nbracket: {} clients; a first bracket, then {} changes of one match each; a first score, then {} score changes; {} publishes/s; each setup on a fresh server; figures over the changes",
        params.clients, params.publishes, params.publishes, params.rate
    );
    println!("| setup | bracket: bytes on the wire per delivery | of the full state | server CPU per delivery | score: bytes per delivery | server CPU per delivery |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (setup, v) in &results {
        let full = results
            .iter()
            .find(|(s, _)| *s == setup.full())
            .map_or(0.0, |(_, f)| figure(f, 1, "wire_bytes_per_delivery"));
        println!(
            "| {} | {:.0} | {:.1} % | {:.1} µs | {:.0} | {:.1} µs |",
            setup.label(),
            figure(v, 1, "wire_bytes_per_delivery"),
            100.0 * figure(v, 1, "wire_bytes_per_delivery") / full.max(1.0),
            figure(v, 1, "server_cpu_us_per_delivery"),
            figure(v, 3, "wire_bytes_per_delivery"),
            figure(v, 3, "server_cpu_us_per_delivery"),
        );
    }
    println!("WebSocket bytes are whole frames (header included); WebTransport's are the UDP payloads the relay carried to the clients (QUIC headers, ACKs and all), over the messages delivered.");
    Ok(json!({
        "clients": params.clients,
        "publishes": params.publishes,
        "rate": params.rate,
        "runs": results.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflates_both_kinds_of_server() {
        let message = br#"{"type":"state","room":"bracket:bench","version":1,"ts":5,"data":{"i":0,"t":0,"d":"aaaaaaaaaaaaaaaaaaaa"}}"#;
        let compressed = courtside_core::deflate::compress_message(message).expect("compresses");
        let mut fresh = Inflater::new(false);
        assert_eq!(fresh.inflate(&compressed).expect("inflates"), message);
        assert_eq!(fresh.inflate(&compressed).expect("inflates again"), message);
        // A server that keeps its context: two messages from one compressor, sync-flushed.
        let mut deflate = flate2::Compress::new(flate2::Compression::default(), false);
        let mut stream = Vec::new();
        for _ in 0..2 {
            let mut out = Vec::with_capacity(1024);
            deflate
                .compress_vec(message, &mut out, flate2::FlushCompress::Sync)
                .expect("compresses");
            assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
            out.truncate(out.len() - 4);
            stream.push(out);
        }
        assert!(stream[1].len() < stream[0].len(), "the second refers to the first");
        let mut kept = Inflater::new(true);
        for part in &stream {
            assert_eq!(kept.inflate(part).expect("inflates"), message);
        }
    }
}
