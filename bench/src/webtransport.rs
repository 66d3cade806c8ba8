//! WebTransport clients for Courtside: a control stream for commands and replies, datagrams for
//! states (acknowledged, as PROTOCOL.md "Loss repair" asks), and the binary codec of the library.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use courtside_core::wire::{self, AliasAck, ClientMessage, FrameDecoder, ServerMessage};
use wtransport::endpoint::endpoint_side::Client;
use wtransport::tls::Sha256Digest;
use wtransport::{ClientConfig, Connection, Endpoint, RecvStream, SendStream};

use crate::clients::{parse_data, Received};

/// Connections that share one client endpoint (one UDP socket, one driver task).
const CONNECTIONS_PER_ENDPOINT: usize = 100;

/// Largest control-stream frame the bench accepts.
const MAX_FRAME: usize = 1 << 20;

/// The loss `--wt-loss` puts on every WebTransport client's path (parts per million);
/// `NO_RELAY` without the flag.
static PATH_LOSS_PPM: AtomicU64 = AtomicU64::new(NO_RELAY);

const NO_RELAY: u64 = u64::MAX;

/// Whether the relays drop packets now (only while a run publishes).
static LOSS_ACTIVE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns the relays' loss on (publishing) or off (connecting, joining, closing).
pub fn set_loss_active(on: bool) {
    LOSS_ACTIVE.store(on, Ordering::Relaxed);
}

/// What the bench's lossy relays forwarded and dropped, over the whole run of the bench.
pub static RELAYED: RelayCounters = RelayCounters::new();

/// Puts every WebTransport client behind a relay with this loss (`--wt-loss`; 0 relays without
/// loss, for the same path's clean figures).
pub fn set_path_loss(loss: Option<f64>) {
    PATH_LOSS_PPM.store(loss.map_or(NO_RELAY, |l| (l * 1e6) as u64), Ordering::Relaxed);
}

/// Packets and bytes a relay forwarded each way, and the packets it dropped.
#[derive(Debug, Default)]
pub struct RelayCounters {
    to_server_packets: AtomicU64,
    to_server_bytes: AtomicU64,
    to_client_packets: AtomicU64,
    to_client_bytes: AtomicU64,
    dropped: AtomicU64,
}

/// A snapshot of `RelayCounters`, for a run's results.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct RelayTotals {
    pub loss: f64,
    pub to_server_packets: u64,
    pub to_server_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
    pub dropped_packets: u64,
}

impl RelayCounters {
    const fn new() -> Self {
        Self {
            to_server_packets: AtomicU64::new(0),
            to_server_bytes: AtomicU64::new(0),
            to_client_packets: AtomicU64::new(0),
            to_client_bytes: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// The counts so far; `None` when no relay runs (no `--wt-loss`).
    pub fn totals(&self) -> Option<RelayTotals> {
        let loss = PATH_LOSS_PPM.load(Ordering::Relaxed);
        (loss != NO_RELAY).then(|| RelayTotals {
            loss: loss as f64 / 1e6,
            to_server_packets: self.to_server_packets.load(Ordering::Relaxed),
            to_server_bytes: self.to_server_bytes.load(Ordering::Relaxed),
            to_client_packets: self.to_client_packets.load(Ordering::Relaxed),
            to_client_bytes: self.to_client_bytes.load(Ordering::Relaxed),
            dropped_packets: self.dropped.load(Ordering::Relaxed),
        })
    }
}

impl RelayTotals {
    /// What was counted since `before`.
    pub fn since(self, before: Option<RelayTotals>) -> RelayTotals {
        let b = before.unwrap_or_default();
        RelayTotals {
            loss: self.loss,
            to_server_packets: self.to_server_packets - b.to_server_packets,
            to_server_bytes: self.to_server_bytes - b.to_server_bytes,
            to_client_packets: self.to_client_packets - b.to_client_packets,
            to_client_bytes: self.to_client_bytes - b.to_client_bytes,
            dropped_packets: self.dropped_packets - b.dropped_packets,
        }
    }
}

/// A relay between one client endpoint and the server that drops `loss_ppm` of the packets
/// each way (loopback only); returns the address the endpoint connects to instead.
async fn start_relay(
    server: SocketAddr,
    loss_ppm: u64,
    seed: u64,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let front = tokio::net::UdpSocket::from_std(client_socket()?)?;
    let back = tokio::net::UdpSocket::from_std(client_socket()?)?;
    let addr = front.local_addr()?;
    let task = tokio::spawn(async move {
        let mut rng = seed | 1;
        let mut keep = move || {
            // xorshift64*
            rng ^= rng >> 12;
            rng ^= rng << 25;
            rng ^= rng >> 27;
            !LOSS_ACTIVE.load(Ordering::Relaxed)
                || (rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) % 1_000_000 >= loss_ppm
        };
        let mut client: Option<SocketAddr> = None;
        let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
        loop {
            tokio::select! {
                Ok((n, from)) = front.recv_from(&mut up) => {
                    client = Some(from);
                    if keep() {
                        RELAYED.to_server_packets.fetch_add(1, Ordering::Relaxed);
                        RELAYED.to_server_bytes.fetch_add(n as u64, Ordering::Relaxed);
                        let _ = back.send_to(&up[..n], server).await;
                    } else {
                        RELAYED.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(n) = back.recv(&mut down) => {
                    if let (Some(client), true) = (client, keep()) {
                        RELAYED.to_client_packets.fetch_add(1, Ordering::Relaxed);
                        RELAYED.to_client_bytes.fetch_add(n as u64, Ordering::Relaxed);
                        let _ = front.send_to(&down[..n], client).await;
                    } else {
                        RELAYED.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    });
    Ok((addr, task))
}

/// A pool of client endpoints, so thousands of sessions need only a few dozen sockets.
#[derive(Default)]
pub struct WtEndpoints {
    pool: Mutex<Vec<PooledEndpoint>>,
}

/// One pooled client endpoint: the certificate hash it trusts, the endpoint, how many
/// connections it carries, and (under `--wt-loss`) its relay: the address it dials instead of
/// the server's, and the relay's task.
struct PooledEndpoint {
    hash: String,
    endpoint: Arc<Endpoint<Client>>,
    uses: usize,
    relay: Option<(SocketAddr, tokio::task::JoinHandle<()>)>,
}

impl Drop for PooledEndpoint {
    fn drop(&mut self) {
        if let Some((_, task)) = &self.relay {
            task.abort();
        }
    }
}

impl WtEndpoints {
    /// An endpoint with room for one more connection, trusting the certificate `hash_hex`, and
    /// the address it reaches `server` at (a lossy relay's under `--wt-loss`).
    pub async fn pick(
        &self,
        hash_hex: &str,
        server: SocketAddr,
    ) -> anyhow::Result<(Arc<Endpoint<Client>>, SocketAddr)> {
        {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            let free = pool
                .iter_mut()
                .find(|e| e.hash == hash_hex && e.uses < CONNECTIONS_PER_ENDPOINT);
            if let Some(entry) = free {
                entry.uses += 1;
                let target = entry.relay.as_ref().map_or(server, |(addr, _)| *addr);
                return Ok((entry.endpoint.clone(), target));
            }
        }
        let digest = Sha256Digest::new(decode_hex32(hash_hex)?);
        let mut tls = wtransport::tls::client::build_default_tls_config(
            Arc::new(wtransport::tls::rustls::RootCertStore::empty()),
            Some(Arc::new(wtransport::tls::client::ServerHashVerification::new([digest]))),
        );
        if !tls_resumption() {
            // Every fan is a browser of its own, with no ticket from this server: one full
            // handshake each (the endpoint's clients would otherwise resume each other's).
            tls.resumption = wtransport::tls::rustls::client::Resumption::disabled();
        }
        let config = ClientConfig::builder()
            .with_bind_socket(client_socket()?)
            .with_custom_tls(tls)
            .keep_alive_interval(Some(Duration::from_secs(5)))
            .max_idle_timeout(Some(Duration::from_secs(60)))
            .context("idle timeout")?
            .build();
        let endpoint = Arc::new(Endpoint::client(config).context("webtransport client endpoint")?);
        let loss = PATH_LOSS_PPM.load(Ordering::Relaxed);
        let relay = if loss != NO_RELAY {
            Some(start_relay(server, loss, 0x5eed ^ u64::from(endpoint.local_addr()?.port())).await?)
        } else {
            None
        };
        let target = relay.as_ref().map_or(server, |(addr, _)| *addr);
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(PooledEndpoint {
                hash: hash_hex.to_string(),
                endpoint: endpoint.clone(),
                uses: 1,
                relay,
            });
        Ok((endpoint, target))
    }
}

/// Whether a client may resume a TLS session another client of its endpoint received
/// (`BENCH_TLS_RESUMPTION=1`): off by default, as for fans who each connect from a browser of
/// their own; on, a storm measures mostly resumed handshakes (as the bench did before session 16).
fn tls_resumption() -> bool {
    std::env::var("BENCH_TLS_RESUMPTION").is_ok_and(|v| v == "1")
}

/// Socket buffers of a client endpoint: with the kernel's default (about 200 KiB) the bench's
/// own sockets dropped datagrams in bursts, and the server's repairs of them were measured.
const UDP_BUFFER: usize = 4 << 20;

/// A loopback UDP socket with `UDP_BUFFER` buffers (as far as net.core.rmem_max allows).
fn client_socket() -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

fn decode_hex32(hex: &str) -> anyhow::Result<[u8; 32]> {
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<_, _>>()
        .context("certificate hash is not hex")?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("certificate hash is not 32 bytes"))
}

/// Acknowledgements wait this long to go out together, as `fallback/courtside.js` does.
const ACK_DELAY: Duration = Duration::from_millis(5);

/// A ping this often keeps a session that only receives events from the idle timeout.
const PING_EVERY: Duration = Duration::from_secs(25);

/// One WebTransport session joined to its rooms.
pub struct WtConn {
    pub connection: Connection,
    send: SendStream,
    recv: RecvStream,
    decoder: FrameDecoder,
    buf: Vec<u8>,
    pending: VecDeque<Received>,
    /// Room aliases announced on the stream; datagrams name rooms by them.
    aliases: HashSet<u64>,
    /// Acknowledgements waiting for `ack_due` (alias, newest version held).
    acks: Vec<AliasAck>,
    ack_due: Option<tokio::time::Instant>,
    next_ping: tokio::time::Instant,
    _endpoint: Arc<Endpoint<Client>>,
}

impl WtConn {
    pub async fn connect(endpoint: Arc<Endpoint<Client>>, addr: SocketAddr, rooms: &[&str]) -> anyhow::Result<Self> {
        let connection = endpoint
            .connect(format!("https://{addr}/wt"))
            .await
            .context("webtransport connect")?;
        let (send, recv) = connection.open_bi().await?.await?;
        let mut conn = Self {
            connection,
            send,
            recv,
            decoder: FrameDecoder::default(),
            buf: vec![0; 16 * 1024],
            pending: VecDeque::new(),
            aliases: HashSet::new(),
            acks: Vec::new(),
            ack_due: None,
            next_ping: tokio::time::Instant::now() + PING_EVERY,
            _endpoint: endpoint,
        };
        let mut frames = bytes::BytesMut::new();
        for room in rooms {
            let command =
                courtside_core::parse_command(&serde_json::json!({"type": "subscribe", "room": room}).to_string())
                    .map_err(|e| anyhow::anyhow!("subscribe command: {e:?}"))?;
            wire::put_frame(&mut frames, &wire::encode_client(&ClientMessage::Command(command)));
        }
        conn.send.write_all(&frames).await?;
        let mut confirmed = 0;
        while confirmed < rooms.len() {
            let n = match tokio::time::timeout(Duration::from_secs(30), conn.recv.read(&mut conn.buf)).await {
                Ok(Ok(Some(n))) => n,
                Ok(_) => bail!("control stream ended while joining"),
                Err(_) => bail!("no reply while joining"),
            };
            conn.decoder.extend(&conn.buf[..n]);
            while let Ok(Some(frame)) = conn.decoder.next_frame(MAX_FRAME) {
                match wire::decode_server(&frame) {
                    Ok(ServerMessage::Subscribed(_)) => confirmed += 1,
                    Ok(ServerMessage::Alias(alias)) => {
                        conn.aliases.insert(alias.alias);
                    }
                    Ok(ServerMessage::Error(e)) => bail!("subscribe refused: {}", e.message),
                    Ok(message) => conn.pending.extend(received(&message)),
                    Err(_) => bail!("undecodable server message"),
                }
            }
        }
        Ok(conn)
    }

    /// The next bench message, from the control stream or a datagram; `None` when the session ended.
    pub async fn next(&mut self) -> Option<Received> {
        loop {
            if let Some(m) = self.pending.pop_front() {
                return Some(m);
            }
            let ack_due = self.ack_due;
            tokio::select! {
                read = self.recv.read(&mut self.buf) => {
                    let n = read.ok()??;
                    self.decoder.extend(&self.buf[..n]);
                    while let Ok(Some(frame)) = self.decoder.next_frame(MAX_FRAME) {
                        match wire::decode_server(&frame) {
                            Ok(ServerMessage::Alias(alias)) => {
                                self.aliases.insert(alias.alias);
                            }
                            Ok(message) => self.pending.extend(received(&message)),
                            Err(_) => {}
                        }
                    }
                }
                datagram = self.connection.receive_datagram() => {
                    let datagram = datagram.ok()?;
                    let payload = datagram.payload();
                    let Ok(ServerMessage::AliasedState(state)) = wire::decode_server(&payload) else { continue };
                    if !self.aliases.contains(&state.alias) {
                        continue;
                    }
                    match self.acks.iter_mut().find(|a| a.alias == state.alias) {
                        Some(ack) => ack.version = ack.version.max(state.version),
                        None => self.acks.push(AliasAck { alias: state.alias, version: state.version }),
                    }
                    self.ack_due.get_or_insert_with(|| tokio::time::Instant::now() + ACK_DELAY);
                    self.pending.extend(parse_data(state.data));
                }
                _ = sleep_until_some(ack_due) => {
                    self.ack_due = None;
                    let acks = std::mem::take(&mut self.acks);
                    let _ = self.connection.send_datagram(wire::encode_client(&ClientMessage::Acks(acks)));
                }
                _ = tokio::time::sleep_until(self.next_ping) => {
                    self.next_ping += PING_EVERY;
                    let mut frame = bytes::BytesMut::new();
                    wire::put_frame(&mut frame, &wire::encode_client(&ClientMessage::Command(courtside_core::ClientCommand::Ping)));
                    let _ = self.send.write_all(&frame).await;
                }
            }
        }
    }
}

/// Sleeps until `at`; never without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn received(message: &ServerMessage<'_>) -> Option<Received> {
    match message {
        ServerMessage::State(s) => parse_data(s.data),
        ServerMessage::Event(e) => parse_data(e.data),
        _ => None,
    }
}
