//! WebTransport clients for Courtside: a control stream for commands and replies, datagrams for
//! states (acknowledged, as PROTOCOL.md "Loss repair" asks), and the binary codec of the library.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
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

/// A pool of client endpoints, so thousands of sessions need only a few dozen sockets.
#[derive(Default)]
pub struct WtEndpoints {
    pool: Mutex<Vec<PooledEndpoint>>,
}

/// The certificate hash an endpoint trusts, the endpoint, and how many connections it carries.
type PooledEndpoint = (String, Arc<Endpoint<Client>>, usize);

impl WtEndpoints {
    /// An endpoint with room for one more connection, trusting the certificate `hash_hex`.
    pub fn pick(&self, hash_hex: &str) -> anyhow::Result<Arc<Endpoint<Client>>> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let free = pool
            .iter_mut()
            .find(|(hash, _, uses)| hash == hash_hex && *uses < CONNECTIONS_PER_ENDPOINT);
        if let Some((_, endpoint, uses)) = free {
            *uses += 1;
            return Ok(endpoint.clone());
        }
        let digest = Sha256Digest::new(decode_hex32(hash_hex)?);
        let config = ClientConfig::builder()
            .with_bind_socket(client_socket()?)
            .with_server_certificate_hashes([digest])
            .keep_alive_interval(Some(Duration::from_secs(5)))
            .max_idle_timeout(Some(Duration::from_secs(60)))
            .context("idle timeout")?
            .build();
        let endpoint = Arc::new(Endpoint::client(config).context("webtransport client endpoint")?);
        pool.push((hash_hex.to_string(), endpoint.clone(), 1));
        Ok(endpoint)
    }
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
