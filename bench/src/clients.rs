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
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::servers::TOKEN;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

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
    struct Data {
        i: u64,
        t: u64,
    }
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

/// Client settings: tungstenite's default 128 KiB read buffer is zeroed on every read, which
/// would make the generator, not the server, the limit.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096)
}

/// Connects and joins `room`; returns when the server confirmed the join.
pub async fn connect(protocol: Protocol, addr: SocketAddr, room: &str) -> anyhow::Result<Ws> {
    let url = match protocol {
        Protocol::Courtside => format!("ws://{addr}/ws"),
        Protocol::SocketIo => format!("ws://{addr}/socket.io/?EIO=4&transport=websocket"),
    };
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(websocket_config()), true)
        .await
        .context("websocket connect")?;
    match protocol {
        Protocol::Courtside => {
            ws.send(Message::text(
                serde_json::json!({"type": "subscribe", "room": room}).to_string(),
            ))
            .await?;
            expect(&mut ws, |t| t.starts_with(r#"{"type":"subscribed""#)).await?;
        }
        Protocol::SocketIo => {
            expect(&mut ws, |t| t.starts_with('0')).await?;
            ws.send(Message::text("40")).await?;
            expect(&mut ws, |t| t.starts_with("40")).await?;
            ws.send(Message::text(format!(r#"42["join","{room}"]"#))).await?;
            expect(&mut ws, |t| t.starts_with(r#"42["joined""#)).await?;
        }
    }
    Ok(ws)
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
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Self { sender, protocol, addr })
    }

    /// Publishes `{"i": index, "t": sent_us}` (plus `pad`) as an event to `room`, reconnecting
    /// once if the server closed the keep-alive connection.
    pub async fn publish(&mut self, room: &str, index: u64, sent_us: u64, pad: &str) -> anyhow::Result<()> {
        if self.sender.is_closed() || self.send(room, index, sent_us, pad).await.is_err() {
            *self = Self::connect(self.protocol, self.addr).await?;
            return self.send(room, index, sent_us, pad).await;
        }
        Ok(())
    }

    async fn send(&mut self, room: &str, index: u64, sent_us: u64, pad: &str) -> anyhow::Result<()> {
        self.sender.ready().await?;
        let data = serde_json::json!({"i": index, "t": sent_us, "pad": pad});
        let (path, body) = match self.protocol {
            Protocol::Courtside => (format!("/v1/rooms/{room}/events"), data.to_string()),
            Protocol::SocketIo => (
                "/publish".to_string(),
                serde_json::json!({"room": room, "event": "event", "data": data}).to_string(),
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

/// The bench's clock: microseconds since `origin`.
pub fn micros_since(origin: Instant) -> u64 {
    origin.elapsed().as_micros() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

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
