//! WebSocket clients for each server under test: Courtside's JSON protocol, and Socket.IO's
//! (Engine.IO 4 packets over WebSocket), joined to one room and reading numbered messages.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use serde::Serialize;

use crate::servers::TOKEN;
use crate::webtransport::{WtConn, WtEndpoints};

pub type Ws = WebSocketStream<TcpStream>;

/// The protocol of the server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Courtside,
    SocketIo,
}

/// A numbered bench message as a client received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub index: u64,
    /// Microseconds since the bench's clock origin, when it was published.
    pub sent_us: u64,
}

/// What a client did with one frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Message(Received),
    /// A frame the client answers (Socket.IO's ping "2" → "3").
    Reply(&'static str),
    Other,
}

/// Parses one text frame of `protocol` (pure).
pub fn parse(protocol: Protocol, text: &str) -> Frame {
    // Typed, borrowing parses: the generator shares the cores with the server, so its receive
    // path must cost little (a `serde_json::Value` per frame cost more than the server's write).
    #[derive(serde::Deserialize)]
    struct CourtsideFrame<'a> {
        #[serde(rename = "type", borrow)]
        kind: &'a str,
        data: Option<Data>,
    }
    let data = match protocol {
        Protocol::Courtside => match serde_json::from_str::<CourtsideFrame>(text) {
            Ok(CourtsideFrame {
                kind: "event" | "state",
                data: Some(data),
            }) => data,
            _ => return Frame::Other,
        },
        Protocol::SocketIo => {
            if text == "2" {
                return Frame::Reply("3");
            }
            let Some(payload) = text.strip_prefix("42") else {
                return Frame::Other;
            };
            match serde_json::from_str::<(&str, Data)>(payload) {
                Ok(("event" | "state", data)) => data,
                _ => return Frame::Other,
            }
        }
    };
    Frame::Message(Received {
        index: data.i,
        sent_us: data.t,
    })
}

/// The bench fields of a published value: its number and its send time.
#[derive(serde::Deserialize)]
struct Data {
    i: u64,
    t: u64,
}

/// Reads a bench message from the JSON text of a published value (WebTransport carries it as
/// text inside the binary message).
pub fn parse_data(text: &str) -> Option<Received> {
    let data: Data = serde_json::from_str(text).ok()?;
    Some(Received {
        index: data.i,
        sent_us: data.t,
    })
}

/// Client settings: tungstenite's default 128 KiB read buffer is zeroed on every read, which
/// would make the generator, not the server, the limit.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096)
}

/// How a client reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    WebSocket,
    WebTransport,
}

/// Where a client connects: a server's WebSocket endpoint and, for Courtside, its WebTransport
/// endpoint with the certificate hash.
#[derive(Debug, Clone)]
pub struct Target {
    pub protocol: Protocol,
    pub http: SocketAddr,
    pub wt: Option<(SocketAddr, String)>,
}

/// One connected client, joined to its rooms.
pub enum Conn {
    Ws(Box<Ws>, Protocol),
    Wt(Box<WtConn>),
}

impl Conn {
    /// Connects over `transport` and joins `rooms`; returns when the server confirmed every join.
    pub async fn connect(
        target: &Target,
        transport: Transport,
        rooms: &[&str],
        endpoints: &WtEndpoints,
    ) -> anyhow::Result<Self> {
        match (transport, &target.wt) {
            (Transport::WebTransport, Some((addr, hash))) => {
                let (endpoint, target) = endpoints.pick(hash, *addr).await?;
                Ok(Self::Wt(Box::new(WtConn::connect(endpoint, target, rooms).await?)))
            }
            (Transport::WebTransport, None) => bail!("this server has no WebTransport endpoint"),
            (Transport::WebSocket, _) => Ok(Self::Ws(
                Box::new(connect_websocket(target.protocol, target.http, rooms).await?),
                target.protocol,
            )),
        }
    }

    /// The next bench message; `None` when the connection ended.
    pub async fn next(&mut self) -> Option<Received> {
        match self {
            Self::Ws(ws, protocol) => loop {
                match ws.next().await? {
                    Ok(Message::Text(text)) => match parse(*protocol, &text) {
                        Frame::Message(m) => return Some(m),
                        Frame::Reply(reply) => {
                            let _ = ws.send(Message::text(reply)).await;
                        }
                        Frame::Other => {}
                    },
                    Ok(Message::Close(_)) | Err(_) => return None,
                    Ok(_) => {}
                }
            },
            Self::Wt(wt) => wt.next().await,
        }
    }

    pub async fn close(self) {
        match self {
            Self::Ws(mut ws, _) => {
                let _ = Ws::close(&mut ws, None).await;
            }
            Self::Wt(wt) => wt.connection.close(0u32.into(), b"bench done"),
        }
    }
}

/// Courtside's WebSocket clients offer permessage-deflate as browsers do (`--ws-offer-deflate`).
static OFFER_DEFLATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A server did not answer the offer (a build without permessage-deflate, or
/// `--ws-compression off`): reported with the run.
pub static DEFLATE_DECLINED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes every Courtside WebSocket client offer permessage-deflate. tungstenite cannot read a
/// compressed frame (its error ends the client, and the run's accounting fails), so this is for
/// messages under the server's `--ws-compress-threshold`: the path a negotiated connection
/// takes for small messages.
pub fn set_offer_deflate(offer: bool) {
    OFFER_DEFLATE.store(offer, std::sync::atomic::Ordering::Relaxed);
}

/// Connects a WebSocket and joins `rooms`; returns when the server confirmed every join.
pub async fn connect_websocket(protocol: Protocol, addr: SocketAddr, rooms: &[&str]) -> anyhow::Result<Ws> {
    let url = match protocol {
        Protocol::Courtside => format!("ws://{addr}/ws"),
        Protocol::SocketIo => format!("ws://{addr}/socket.io/?EIO=4&transport=websocket"),
    };
    let stream = connect_tcp(addr).await?;
    let mut request = url.into_client_request()?;
    if protocol == Protocol::Courtside && OFFER_DEFLATE.load(std::sync::atomic::Ordering::Relaxed) {
        request.headers_mut().insert(
            "sec-websocket-extensions",
            "permessage-deflate; client_max_window_bits".parse()?,
        );
    }
    let (mut ws, response) = tokio_tungstenite::client_async_with_config(request, stream, Some(websocket_config()))
        .await
        .context("websocket handshake")?;
    if OFFER_DEFLATE.load(std::sync::atomic::Ordering::Relaxed)
        && protocol == Protocol::Courtside
        && !response.headers().contains_key("sec-websocket-extensions")
    {
        DEFLATE_DECLINED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    match protocol {
        Protocol::Courtside => {
            for room in rooms {
                ws.send(Message::text(
                    serde_json::json!({"type": "subscribe", "room": room}).to_string(),
                ))
                .await?;
            }
            for _ in rooms {
                expect(&mut ws, |t| t.starts_with(r#"{"type":"subscribed""#)).await?;
            }
        }
        Protocol::SocketIo => {
            expect(&mut ws, |t| t.starts_with('0')).await?;
            ws.send(Message::text("40")).await?;
            expect(&mut ws, |t| t.starts_with("40")).await?;
            for room in rooms {
                ws.send(Message::text(format!(r#"42["join","{room}"]"#))).await?;
            }
            for _ in rooms {
                expect(&mut ws, |t| t.starts_with(r#"42["joined""#)).await?;
            }
        }
    }
    Ok(ws)
}

/// Connections per source address: below the ~28,000 ephemeral ports Linux has for each
/// (source, destination) pair.
const CONNECTIONS_PER_SOURCE: usize = 20_000;

static TCP_CONNECTIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A loopback TCP connection from 127.0.0.1, then 127.0.0.2 and on once a source address has
/// carried `CONNECTIONS_PER_SOURCE` connections, so a run never runs out of ephemeral ports.
pub async fn connect_tcp(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    if !addr.ip().is_loopback() {
        bail!("the bench only connects to loopback addresses, not {addr}");
    }
    let n = TCP_CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let source = std::net::Ipv4Addr::new(127, 0, 0, 1 + (n / CONNECTIONS_PER_SOURCE % 250) as u8);
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let stream = socket.connect(addr).await.context("tcp connect")?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn expect(ws: &mut Ws, check: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) if check(&text) => return Ok(()),
            Ok(Some(Ok(_))) => continue,
            Ok(other) => bail!("connection ended while joining: {other:?}"),
            Err(_) => bail!("no reply while joining"),
        }
    }
}

/// A keep-alive HTTP/1.1 connection to publish through.
pub struct Publisher {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    protocol: Protocol,
    addr: SocketAddr,
}

impl Publisher {
    pub async fn connect(protocol: Protocol, addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = connect_tcp(addr).await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Self { sender, protocol, addr })
    }

    /// Publishes `{"i": index, "t": sent_us, "d": payload}` (`payload` is JSON text) as a
    /// state or an event of `room`, reconnecting once if the server closed the connection.
    pub async fn publish(
        &mut self,
        room: &str,
        kind: Kind,
        index: u64,
        sent_us: u64,
        payload: &str,
    ) -> anyhow::Result<()> {
        let data = format!(r#"{{"i":{index},"t":{sent_us},"d":{payload}}}"#);
        if self.sender.is_closed() || self.send(room, kind, &data).await.is_err() {
            *self = Self::connect(self.protocol, self.addr).await?;
            return self.send(room, kind, &data).await;
        }
        Ok(())
    }

    async fn send(&mut self, room: &str, kind: Kind, data: &str) -> anyhow::Result<()> {
        self.sender.ready().await?;
        let (path, body) = match (self.protocol, kind) {
            (Protocol::Courtside, Kind::State) => (format!("/v1/rooms/{room}/state"), data.to_string()),
            (Protocol::Courtside, Kind::Event) => (format!("/v1/rooms/{room}/events"), data.to_string()),
            (Protocol::SocketIo, _) => (
                "/publish".to_string(),
                format!(r#"{{"room":"{room}","event":"{}","data":{data}}}"#, kind.as_str()),
            ),
        };
        let request = hyper::Request::post(path)
            .header("host", self.addr.to_string())
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let _ = response.into_body().collect().await;
        if !status.is_success() {
            bail!("publish answered {status}");
        }
        Ok(())
    }
}

/// What a publish is: the core's one name for state or event.
pub use courtside_core::Kind;

/// The bench's clock: microseconds since `origin`.
pub fn micros_since(origin: Instant) -> u64 {
    origin.elapsed().as_micros() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn clients_refuse_addresses_outside_loopback() {
        let error = connect_tcp(SocketAddr::from(([192, 0, 2, 1], 80)))
            .await
            .expect_err("not loopback");
        assert!(error.to_string().contains("only connects to loopback"), "{error}");
    }

    #[test]
    fn parses_both_protocols() {
        let m = Frame::Message(Received { index: 3, sent_us: 99 });
        assert_eq!(
            parse(
                Protocol::Courtside,
                r#"{"type":"event","room":"r","seq":3,"ts":1,"data":{"i":3,"t":99}}"#
            ),
            m
        );
        assert_eq!(parse(Protocol::Courtside, r#"{"type":"pong"}"#), Frame::Other);
        assert_eq!(parse(Protocol::SocketIo, r#"42["event",{"i":3,"t":99,"pad":""}]"#), m);
        assert_eq!(parse(Protocol::SocketIo, "2"), Frame::Reply("3"));
        assert_eq!(parse(Protocol::SocketIo, r#"42["joined","r"]"#), Frame::Other);
        assert_eq!(parse(Protocol::SocketIo, "garbage"), Frame::Other);
    }
}
