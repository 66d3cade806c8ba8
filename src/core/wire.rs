//! The binary WebTransport protocol: a type byte, then the message's fields in postcard's
//! format; on streams each message is preceded by its length as a LEB128 varint. Pure.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::kind::Kind;
use super::protocol::{ClientCommand, CommandError, ServerControl};
use super::publication::EventId;
use super::room_name::RoomName;

/// Type bytes, the first byte of every message (docs/PROTOCOL.md, "Message types").
pub mod message_type {
    pub const SUBSCRIBE: u8 = 0x01;
    pub const UNSUBSCRIBE: u8 = 0x02;
    pub const PING: u8 = 0x03;
    pub const ACK: u8 = 0x04;
    pub const ACKS: u8 = 0x05;
    pub const AUTH: u8 = 0x06;
    pub const HELLO: u8 = 0x07;
    pub const SUBSCRIBED: u8 = 0x10;
    pub const UNSUBSCRIBED: u8 = 0x11;
    pub const PONG: u8 = 0x12;
    pub const ERROR: u8 = 0x13;
    pub const RECONNECT: u8 = 0x14;
    pub const CLOSE: u8 = 0x15;
    pub const ALIAS: u8 = 0x16;
    pub const AUTHED: u8 = 0x17;
    pub const WELCOME: u8 = 0x18;
    pub const STATE: u8 = 0x20;
    pub const EVENT: u8 = 0x21;
    pub const ALIASED_STATE: u8 = 0x22;
    pub const DELTA: u8 = 0x23;
    pub const ALIASED_DELTA: u8 = 0x24;
}

/// Most acknowledgements one `acks` message may carry (a session holds at most 256 rooms).
pub const MAX_ACKS: usize = 256;

/// Largest message a client may send on its control stream.
pub const MAX_CLIENT_MESSAGE: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribeBody<'a> {
    pub room: &'a str,
    pub since: Option<u64>,
    pub epoch: Option<&'a str>,
    /// A trailing optional field (added later; a message may end before it): not serde's.
    #[serde(skip)]
    pub id: Option<u64>,
    /// A second trailing optional field, after `id`: the delta format the client takes
    /// (`"fossil"`). A message with it carries `id` too (`00` when absent).
    #[serde(skip)]
    pub delta: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomBody<'a> {
    pub room: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckBody<'a> {
    pub room: &'a str,
    pub version: u64,
}

/// One acknowledgement in an `acks` message: the client holds `version` of the room `alias`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasAck {
    pub alias: u64,
    pub version: u64,
}

/// A room's short name in this session's datagrams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasBody<'a> {
    pub room: &'a str,
    pub alias: u64,
}

/// A state datagram naming its room by alias.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasedStateBody<'a> {
    pub alias: u64,
    pub version: u64,
    pub ts: u64,
    pub data: &'a str,
}

/// A state as a fossil delta against the version `base` (`0x23`, on the stream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaBody<'a> {
    pub room: &'a str,
    pub version: u64,
    pub base: u64,
    pub ts: u64,
    /// The fossil delta, as text.
    pub delta: &'a str,
}

/// A delta datagram naming its room by alias (`0x24`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasedDeltaBody<'a> {
    pub alias: u64,
    pub version: u64,
    pub base: u64,
    pub ts: u64,
    pub delta: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscribedBody<'a> {
    pub room: &'a str,
    pub epoch: &'a str,
    pub version: u64,
    pub seq: u64,
    pub recovered: Option<bool>,
    /// The subscribe's `id`, echoed; a trailing optional field like `SubscribeBody::id`.
    #[serde(skip)]
    pub id: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody<'a> {
    pub code: u16,
    pub name: &'a str,
    pub message: &'a str,
    pub room: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonBody<'a> {
    pub reason: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseBody<'a> {
    pub code: u16,
    pub reason: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateBody<'a> {
    pub room: &'a str,
    pub version: u64,
    pub ts: u64,
    /// The published JSON value, as text.
    pub data: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBody<'a> {
    pub room: &'a str,
    pub seq: u64,
    pub ts: u64,
    pub data: &'a str,
    /// The event's identity: 16 hex digits, as on WebSocket.
    pub id: &'a str,
}

/// `0x18 welcome`: how this session's states travel, in answer to `hello` and again when the
/// route changes (docs/PROTOCOL.md, "Which data uses which path").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WelcomeBody<'a> {
    /// The server's `--wt-state-datagrams` setting: `always` or `after-loss`.
    pub state_datagrams: &'a str,
    /// States that fit go as datagrams from now on (else on the control stream).
    pub datagrams: bool,
    /// The largest datagram the server sends on this session now, its quarter stream ID
    /// included (0: the client takes none).
    pub max_datagram: u64,
}

/// A message from a WebTransport client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    Command(ClientCommand),
    /// "Tell me how states travel": answered as a `ping` is, with a `welcome` before the `pong`.
    Hello,
    /// "I hold `version` of this room's state" (datagram repair, PROTOCOL.md "Loss repair").
    Ack {
        room: RoomName,
        version: u64,
    },
    /// Acknowledgements of several rooms at once, by alias (PROTOCOL.md "Loss repair").
    Acks(Vec<AliasAck>),
}

/// A message from the server, decoded (for clients and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage<'a> {
    Subscribed(SubscribedBody<'a>),
    Unsubscribed(RoomBody<'a>),
    Pong,
    Error(ErrorBody<'a>),
    Reconnect(ReasonBody<'a>),
    Close(CloseBody<'a>),
    State(StateBody<'a>),
    Event(EventBody<'a>),
    Alias(AliasBody<'a>),
    AliasedState(AliasedStateBody<'a>),
    Authed(AuthedBody<'a>),
    Delta(DeltaBody<'a>),
    AliasedDelta(AliasedDeltaBody<'a>),
    Welcome(WelcomeBody<'a>),
}

/// `0x06 auth`: the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthBody<'a> {
    pub token: &'a str,
}

/// `0x17 authed`: the token's subject and expiry (seconds since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthedBody<'a> {
    pub sub: &'a str,
    pub exp: u64,
}

impl ServerMessage<'_> {
    /// The message in the JSON form of the WebSocket protocol (with `data` as text), for
    /// clients, tests and the bench.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Self::Subscribed(b) => {
                let mut v =
                    json!({"type": "subscribed", "room": b.room, "epoch": b.epoch, "version": b.version, "seq": b.seq});
                if let Some(r) = b.recovered {
                    v["recovered"] = r.into();
                }
                if let Some(id) = b.id {
                    v["id"] = id.into();
                }
                v
            }
            Self::Unsubscribed(b) => json!({"type": "unsubscribed", "room": b.room}),
            Self::Pong => json!({"type": "pong"}),
            Self::Error(b) => {
                let mut v = json!({"type": "error", "code": b.code, "name": b.name, "message": b.message});
                if let Some(room) = b.room {
                    v["room"] = room.into();
                }
                v
            }
            Self::Reconnect(b) => json!({"type": "reconnect", "reason": b.reason}),
            Self::Authed(b) => json!({"type": "authed", "sub": b.sub, "exp": b.exp}),
            Self::Close(b) => json!({"type": "close", "code": b.code, "reason": b.reason}),
            Self::State(b) => {
                json!({"type": "state", "room": b.room, "version": b.version, "ts": b.ts, "data": b.data})
            }
            Self::Event(b) => {
                json!({"type": "event", "room": b.room, "seq": b.seq, "id": b.id, "ts": b.ts, "data": b.data})
            }
            Self::Alias(b) => json!({"type": "alias", "room": b.room, "alias": b.alias}),
            Self::AliasedState(b) => {
                json!({"type": "state", "alias": b.alias, "version": b.version, "ts": b.ts, "data": b.data})
            }
            Self::Delta(b) => {
                json!({"type": "delta", "room": b.room, "version": b.version, "base": b.base, "ts": b.ts, "delta": b.delta})
            }
            Self::AliasedDelta(b) => {
                json!({"type": "delta", "alias": b.alias, "version": b.version, "base": b.base, "ts": b.ts, "delta": b.delta})
            }
            Self::Welcome(b) => {
                json!({"type": "welcome", "state_datagrams": b.state_datagrams, "datagrams": b.datagrams, "max_datagram": b.max_datagram})
            }
        }
    }
}

fn encode<T: Serialize>(kind: u8, body: &T) -> Bytes {
    let mut out = Vec::with_capacity(64);
    out.push(kind);
    // Serialising strings and integers into a Vec cannot fail.
    postcard::to_io(body, &mut out).ok();
    Bytes::from(out)
}

/// Encodes `body`, then `id` as a trailing optional `u64` when there is one: a field added after
/// the message's first form, so a message without it is byte for byte the first form.
fn encode_with_id<T: Serialize>(kind: u8, body: &T, id: Option<u64>) -> Bytes {
    let mut out = encode(kind, body).to_vec();
    if id.is_some() {
        postcard::to_io(&id, &mut out).ok();
    }
    Bytes::from(out)
}

/// Decodes `T`, then the trailing optional `id` if the message goes on (see `encode_with_id`).
fn decode_with_id<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<(T, Option<u64>), CommandError> {
    let (value, rest) = postcard::take_from_bytes(body).map_err(|e| CommandError::Malformed(e.to_string()))?;
    if rest.is_empty() {
        return Ok((value, None));
    }
    Ok((value, decode(rest)?))
}

fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, CommandError> {
    let (value, rest) = postcard::take_from_bytes(body).map_err(|e| CommandError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CommandError::Malformed("trailing bytes after the message".into()));
    }
    Ok(value)
}

/// Encodes a publication: `0x20` state or `0x21` event (`number` is its version or sequence).
pub fn encode_publication(room: &RoomName, kind: Kind, number: u64, id: Option<EventId>, ts: u64, data: &str) -> Bytes {
    let room = room.as_str();
    match kind {
        Kind::State => encode(
            message_type::STATE,
            &StateBody {
                room,
                version: number,
                ts,
                data,
            },
        ),
        Kind::Event => encode(
            message_type::EVENT,
            &EventBody {
                room,
                seq: number,
                ts,
                data,
                id: &id.map(|id| id.to_string()).unwrap_or_default(),
            },
        ),
    }
}

/// Encodes a state as a datagram names it: `0x22`, the room's alias, version, ts and data.
pub fn encode_aliased_state(alias: u64, version: u64, ts: u64, data: &str) -> Bytes {
    encode(
        message_type::ALIASED_STATE,
        &AliasedStateBody {
            alias,
            version,
            ts,
            data,
        },
    )
}

/// Encodes a state as a delta against version `base` (`0x23`, for the control stream).
pub fn encode_delta(room: &RoomName, version: u64, base: u64, ts: u64, delta: &str) -> Bytes {
    encode(
        message_type::DELTA,
        &DeltaBody {
            room: room.as_str(),
            version,
            base,
            ts,
            delta,
        },
    )
}

/// Encodes a delta as a datagram names it (`0x24`): the room's alias, version, base, ts, delta.
pub fn encode_aliased_delta(alias: u64, version: u64, base: u64, ts: u64, delta: &str) -> Bytes {
    encode(
        message_type::ALIASED_DELTA,
        &AliasedDeltaBody {
            alias,
            version,
            base,
            ts,
            delta,
        },
    )
}

/// Encodes the `alias` notice: from now on, `alias` in this session's datagrams means `room`.
pub fn encode_alias(room: &RoomName, alias: u64) -> Bytes {
    encode(
        message_type::ALIAS,
        &AliasBody {
            room: room.as_str(),
            alias,
        },
    )
}

/// Encodes a control reply.
pub fn encode_control(control: &ServerControl) -> Bytes {
    match control {
        ServerControl::Subscribed {
            room,
            epoch,
            version,
            seq,
            recovered,
            request,
            ..
        } => encode_with_id(
            message_type::SUBSCRIBED,
            &SubscribedBody {
                room: room.as_str(),
                epoch,
                version: *version,
                seq: *seq,
                recovered: *recovered,
                id: None,
            },
            *request,
        ),
        ServerControl::Unsubscribed { room } => encode(message_type::UNSUBSCRIBED, &RoomBody { room: room.as_str() }),
        ServerControl::Pong => Bytes::from_static(&[message_type::PONG]),
        ServerControl::Error { code, message, room } => encode(
            message_type::ERROR,
            &ErrorBody {
                code: code.as_u16(),
                name: code.name(),
                message,
                room: room.as_ref().map(RoomName::as_str),
            },
        ),
        ServerControl::Reconnect { reason } => encode(message_type::RECONNECT, &ReasonBody { reason }),
        ServerControl::Authed { sub, exp } => encode(message_type::AUTHED, &AuthedBody { sub, exp: *exp }),
    }
}

/// Encodes `welcome`: the server's `--wt-state-datagrams` setting, whether states that fit go
/// as datagrams now, and the largest datagram the session sends now.
pub fn encode_welcome(state_datagrams: &str, datagrams: bool, max_datagram: u64) -> Bytes {
    encode(
        message_type::WELCOME,
        &WelcomeBody {
            state_datagrams,
            datagrams,
            max_datagram,
        },
    )
}

/// Encodes the notice sent on the control stream before the server closes a session.
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    encode(message_type::CLOSE, &CloseBody { code, reason })
}

/// Decodes one client message (a stream frame's payload, or a datagram).
pub fn decode_client(bytes: &[u8]) -> Result<ClientMessage, CommandError> {
    let Some((&kind, body)) = bytes.split_first() else {
        return Err(CommandError::MissingType);
    };
    match kind {
        message_type::SUBSCRIBE => {
            let (b, rest): (SubscribeBody<'_>, _) =
                postcard::take_from_bytes(body).map_err(|e| CommandError::Malformed(e.to_string()))?;
            let (request, delta) = match rest {
                [] => (None, None),
                _ => {
                    let (request, rest): (Option<u64>, _) =
                        postcard::take_from_bytes(rest).map_err(|e| CommandError::Malformed(e.to_string()))?;
                    match rest {
                        [] => (request, None),
                        _ => (request, decode::<Option<&str>>(rest)?),
                    }
                }
            };
            Ok(ClientMessage::Command(ClientCommand::Subscribe {
                room: RoomName::parse(b.room)?,
                since: b.since,
                epoch: b.epoch.map(str::to_string),
                request,
                delta: super::protocol::delta_format(delta)?,
            }))
        }
        message_type::UNSUBSCRIBE => {
            let b: RoomBody<'_> = decode(body)?;
            Ok(ClientMessage::Command(ClientCommand::Unsubscribe {
                room: RoomName::parse(b.room)?,
            }))
        }
        message_type::PING => {
            decode::<()>(body)?;
            Ok(ClientMessage::Command(ClientCommand::Ping))
        }
        message_type::HELLO => {
            decode::<()>(body)?;
            Ok(ClientMessage::Hello)
        }
        message_type::AUTH => {
            let b: AuthBody<'_> = decode(body)?;
            Ok(ClientMessage::Command(ClientCommand::Auth {
                token: b.token.to_string(),
            }))
        }
        message_type::ACK => {
            let b: AckBody<'_> = decode(body)?;
            Ok(ClientMessage::Ack {
                room: RoomName::parse(b.room)?,
                version: b.version,
            })
        }
        message_type::ACKS => {
            let acks: Vec<AliasAck> = decode(body)?;
            if acks.is_empty() || acks.len() > MAX_ACKS {
                return Err(CommandError::Malformed(format!(
                    "an acks message holds 1 to {MAX_ACKS} acks"
                )));
            }
            Ok(ClientMessage::Acks(acks))
        }
        other => Err(CommandError::UnknownType(format!("0x{other:02x}"))),
    }
}

/// Encodes a client message (for clients and tests).
pub fn encode_client(message: &ClientMessage) -> Bytes {
    match message {
        ClientMessage::Command(ClientCommand::Subscribe {
            room,
            since,
            epoch,
            request,
            delta,
        }) => {
            let body = SubscribeBody {
                room: room.as_str(),
                since: *since,
                epoch: epoch.as_deref(),
                id: None,
                delta: None,
            };
            if !*delta {
                return encode_with_id(message_type::SUBSCRIBE, &body, *request);
            }
            let mut out = encode(message_type::SUBSCRIBE, &body).to_vec();
            postcard::to_io(request, &mut out).ok();
            postcard::to_io(&Some(super::delta::FORMAT), &mut out).ok();
            Bytes::from(out)
        }
        ClientMessage::Command(ClientCommand::Unsubscribe { room }) => {
            encode(message_type::UNSUBSCRIBE, &RoomBody { room: room.as_str() })
        }
        ClientMessage::Command(ClientCommand::Ping) => Bytes::from_static(&[message_type::PING]),
        ClientMessage::Command(ClientCommand::Auth { token }) => encode(message_type::AUTH, &AuthBody { token }),
        ClientMessage::Ack { room, version } => encode(
            message_type::ACK,
            &AckBody {
                room: room.as_str(),
                version: *version,
            },
        ),
        ClientMessage::Acks(acks) => encode(message_type::ACKS, acks),
        ClientMessage::Hello => Bytes::from_static(&[message_type::HELLO]),
    }
}

/// Decodes one server message (for clients and tests).
pub fn decode_server(bytes: &[u8]) -> Result<ServerMessage<'_>, CommandError> {
    let Some((&kind, body)) = bytes.split_first() else {
        return Err(CommandError::MissingType);
    };
    Ok(match kind {
        message_type::SUBSCRIBED => {
            let (mut b, id): (SubscribedBody<'_>, _) = decode_with_id(body)?;
            b.id = id;
            ServerMessage::Subscribed(b)
        }
        message_type::UNSUBSCRIBED => ServerMessage::Unsubscribed(decode(body)?),
        message_type::PONG => {
            decode::<()>(body)?;
            ServerMessage::Pong
        }
        message_type::ERROR => ServerMessage::Error(decode(body)?),
        message_type::RECONNECT => ServerMessage::Reconnect(decode(body)?),
        message_type::CLOSE => ServerMessage::Close(decode(body)?),
        message_type::STATE => ServerMessage::State(decode(body)?),
        message_type::EVENT => ServerMessage::Event(decode(body)?),
        message_type::ALIAS => ServerMessage::Alias(decode(body)?),
        message_type::ALIASED_STATE => ServerMessage::AliasedState(decode(body)?),
        message_type::AUTHED => ServerMessage::Authed(decode(body)?),
        message_type::DELTA => ServerMessage::Delta(decode(body)?),
        message_type::ALIASED_DELTA => ServerMessage::AliasedDelta(decode(body)?),
        message_type::WELCOME => ServerMessage::Welcome(decode(body)?),
        other => return Err(CommandError::UnknownType(format!("0x{other:02x}"))),
    })
}

/// Appends `message` to `out` as one stream frame: LEB128 length, then the message.
pub fn put_frame(out: &mut BytesMut, message: &[u8]) {
    let mut len = message.len() as u64;
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.put_u8(byte);
            break;
        }
        out.put_u8(byte | 0x80);
    }
    out.put_slice(message);
}

/// Why a stream could not be split into frames.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message of {0} bytes is larger than the limit of {1}")]
    TooLarge(u64, usize),
    #[error("malformed length prefix")]
    BadLength,
}

/// Splits a byte stream into frames; feed it bytes, take frames out.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Whether `next_frame(max)` has something to say: a complete frame, or a length it refuses.
    pub fn has_frame(&self, max: usize) -> bool {
        let mut len: u64 = 0;
        for (i, &byte) in self.buf.iter().enumerate() {
            if i == 9 {
                return true;
            }
            len |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return len > max as u64 || self.buf.len() as u64 >= (i as u64 + 1).saturating_add(len);
            }
        }
        false
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self, max: usize) -> Result<Option<Bytes>, FrameError> {
        let mut len: u64 = 0;
        let mut header = 0;
        loop {
            let Some(&byte) = self.buf.get(header) else {
                return Ok(None);
            };
            if header == 9 {
                return Err(FrameError::BadLength);
            }
            len |= u64::from(byte & 0x7f) << (7 * header);
            header += 1;
            if byte & 0x80 == 0 {
                break;
            }
        }
        if len > max as u64 {
            return Err(FrameError::TooLarge(len, max));
        }
        let total = header + len as usize;
        if self.buf.len() < total {
            return Ok(None);
        }
        let mut frame = self.buf.split_to(total);
        Ok(Some(frame.split_off(header).freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publication::{JsonData, Publication, RoomId};
    use crate::time::Now;
    use crate::ErrorCode;
    use serde_json::Value;
    use std::sync::Arc;
    use std::time::Instant;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn room(name: &str) -> RoomName {
        RoomName::parse(name).expect("room")
    }

    fn s<'a>(v: &'a Value, key: &str) -> &'a str {
        v[key].as_str().unwrap_or_else(|| panic!("{key} in {v}"))
    }

    fn u(v: &Value, key: &str) -> u64 {
        v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
    }

    /// Builds the Rust value a vector describes and encodes it.
    fn encode_vector(m: &Value) -> Bytes {
        let opt_u = |key: &str| m[key].as_u64();
        let opt_s = |key: &str| m[key].as_str();
        match s(m, "type") {
            "subscribe" => encode_client(&ClientMessage::Command(ClientCommand::Subscribe {
                room: room(s(m, "room")),
                since: opt_u("since"),
                epoch: opt_s("epoch").map(str::to_string),
                request: opt_u("id"),
                delta: opt_s("delta") == Some("fossil"),
            })),
            "unsubscribe" => encode_client(&ClientMessage::Command(ClientCommand::Unsubscribe {
                room: room(s(m, "room")),
            })),
            "ping" => encode_client(&ClientMessage::Command(ClientCommand::Ping)),
            "hello" => encode_client(&ClientMessage::Hello),
            "welcome" => encode_welcome(
                s(m, "state_datagrams"),
                m["datagrams"].as_bool().expect("datagrams"),
                u(m, "max_datagram"),
            ),
            "auth" => encode_client(&ClientMessage::Command(ClientCommand::Auth {
                token: s(m, "token").to_string(),
            })),
            "authed" => encode_control(&ServerControl::Authed {
                sub: s(m, "sub").to_string(),
                exp: u(m, "exp"),
            }),
            "ack" => encode_client(&ClientMessage::Ack {
                room: room(s(m, "room")),
                version: u(m, "version"),
            }),
            "acks" => encode_client(&ClientMessage::Acks(
                m["acks"]
                    .as_array()
                    .expect("acks")
                    .iter()
                    .map(|a| AliasAck {
                        alias: u(a, "alias"),
                        version: u(a, "version"),
                    })
                    .collect(),
            )),
            "subscribed" => encode_control(&ServerControl::Subscribed {
                room: room(s(m, "room")),
                room_id: RoomId(1),
                epoch: s(m, "epoch").into(),
                version: u(m, "version"),
                seq: u(m, "seq"),
                recovered: m["recovered"].as_bool(),
                request: m["id"].as_u64(),
            }),
            "unsubscribed" => encode_control(&ServerControl::Unsubscribed {
                room: room(s(m, "room")),
            }),
            "pong" => encode_control(&ServerControl::Pong),
            "error" => {
                let code = match u(m, "code") {
                    102 => ErrorCode::BadRoom,
                    103 => ErrorCode::TooManySubscriptions,
                    other => panic!("add error code {other} to the vector test"),
                };
                assert_eq!(s(m, "name"), code.name());
                encode_control(&ServerControl::Error {
                    code,
                    message: s(m, "message").into(),
                    room: opt_s("room").map(room),
                })
            }
            "reconnect" => {
                assert_eq!(s(m, "reason"), "shutdown");
                encode_control(&ServerControl::Reconnect { reason: "shutdown" })
            }
            "close" => encode_close(u(m, "code") as u16, s(m, "reason")),
            "alias" => encode_alias(&room(s(m, "room")), u(m, "alias")),
            "delta" => {
                let (base, target) = fossil_pair_of(s(m, "delta"));
                let (base, target) = delta_pair(&base, &target, u(m, "base"), u(m, "version"), u(m, "ts"));
                let delta = target.delta().expect("the vector's state goes as a delta");
                assert_eq!(delta.base, base.number());
                assert_eq!(
                    delta.wire_message(),
                    &encode_delta(&target.room, target.number(), delta.base, target.ts_ms, s(m, "delta"))
                );
                match m.get("alias") {
                    Some(alias) => {
                        assert_eq!(alias.as_u64(), Some(target.room_id.0));
                        assert_eq!(delta.session0_datagram()[1..], delta.aliased_message()[..]);
                        delta.aliased_message().clone()
                    }
                    None => delta.wire_message().clone(),
                }
            }
            "state" if m.get("alias").is_some() => {
                encode_aliased_state(u(m, "alias"), u(m, "version"), u(m, "ts"), s(m, "data"))
            }
            kind @ ("state" | "event") => {
                let data = JsonData::parse(s(m, "data").as_bytes()).expect("data is JSON text");
                let (publication_kind, number) = if kind == "state" {
                    (Kind::State, u(m, "version"))
                } else {
                    (Kind::Event, u(m, "seq"))
                };
                let now = Now {
                    unix_ms: u(m, "ts"),
                    instant: Instant::now(),
                };
                let id = m
                    .get("id")
                    .and_then(Value::as_str)
                    .map(|id| EventId::parse(id).expect("id"));
                Publication::new(RoomId(1), room(s(m, "room")), publication_kind, number, id, &data, now)
                    .wire_message()
                    .clone()
            }
            other => panic!("unknown vector type {other}"),
        }
    }

    /// Decodes bytes back into the vector's JSON form.
    fn decode_vector(bytes: &[u8], from_client: bool) -> Value {
        use serde_json::json;
        if from_client {
            return match decode_client(bytes).expect("decode") {
                ClientMessage::Command(ClientCommand::Subscribe {
                    room,
                    since,
                    epoch,
                    request,
                    delta,
                }) => {
                    let mut v = json!({"type": "subscribe", "room": room.as_str()});
                    if delta {
                        v["delta"] = "fossil".into();
                    }
                    if let Some(since) = since {
                        v["since"] = since.into();
                    }
                    if let Some(epoch) = epoch {
                        v["epoch"] = epoch.into();
                    }
                    if let Some(id) = request {
                        v["id"] = id.into();
                    }
                    v
                }
                ClientMessage::Command(ClientCommand::Unsubscribe { room }) => {
                    json!({"type": "unsubscribe", "room": room.as_str()})
                }
                ClientMessage::Command(ClientCommand::Ping) => json!({"type": "ping"}),
                ClientMessage::Hello => json!({"type": "hello"}),
                ClientMessage::Command(ClientCommand::Auth { token }) => json!({"type": "auth", "token": token}),
                ClientMessage::Ack { room, version } => {
                    json!({"type": "ack", "room": room.as_str(), "version": version})
                }
                ClientMessage::Acks(acks) => {
                    let acks: Vec<Value> = acks
                        .iter()
                        .map(|a| json!({"alias": a.alias, "version": a.version}))
                        .collect();
                    json!({"type": "acks", "acks": acks})
                }
            };
        }
        decode_server(bytes).expect("decode").to_json()
    }

    fn vectors() -> Value {
        serde_json::from_str(include_str!("../../docs/test-vectors.json")).expect("test vectors are JSON")
    }

    #[test]
    fn messages_match_the_shared_test_vectors() {
        let vectors = vectors();
        let list = vectors["webtransport"]["messages"].as_array().expect("messages");
        assert!(list.len() >= 12);
        for vector in list {
            let message = &vector["message"];
            let from_client = s(vector, "from") == "client";
            let expected = s(vector, "hex");
            assert_eq!(hex(&encode_vector(message)), expected, "encoding {}", s(vector, "name"));
            assert_eq!(
                &decode_vector(&unhex(expected), from_client),
                message,
                "decoding {}",
                s(vector, "name")
            );
        }
    }

    /// `accepted`: bytes a decoder takes that the encoder does not make (an optional trailing
    /// field written out as absent, `00`): they decode to the vector's message.
    #[test]
    fn explicitly_absent_trailing_fields_decode_as_left_out() {
        let vectors = vectors();
        let list = vectors["webtransport"]["accepted"].as_array().expect("accepted");
        assert!(list.len() >= 2);
        for vector in list {
            let from_client = s(vector, "from") == "client";
            assert_eq!(
                &decode_vector(&unhex(s(vector, "hex")), from_client),
                &vector["message"],
                "decoding {}",
                s(vector, "name")
            );
        }
    }

    #[test]
    fn stream_framing_matches_the_shared_test_vectors() {
        let vectors = vectors();
        for vector in vectors["webtransport"]["framing"].as_array().expect("framing") {
            let messages: Vec<Vec<u8>> = vector["messages_hex"]
                .as_array()
                .expect("list")
                .iter()
                .map(|m| unhex(m.as_str().expect("hex")))
                .collect();
            let mut stream = BytesMut::new();
            for m in &messages {
                put_frame(&mut stream, m);
            }
            assert_eq!(hex(&stream), s(vector, "stream_hex"), "{}", s(vector, "name"));
            // Fed one byte at a time, the decoder gives the same messages back.
            let mut decoder = FrameDecoder::default();
            let mut decoded = Vec::new();
            for byte in stream.iter() {
                decoder.extend(&[*byte]);
                while let Some(frame) = decoder.next_frame(1 << 20).expect("frame") {
                    decoded.push(frame.to_vec());
                }
            }
            assert_eq!(decoded, messages);
        }
    }

    /// The base and target texts of the vector in `fossil` named `name`.
    fn fossil_pair(name: &str) -> (String, String) {
        fossil_where("name", name)
    }

    /// The base and target texts of the vector in `fossil` whose delta is `delta`.
    fn fossil_pair_of(delta: &str) -> (String, String) {
        fossil_where("delta", delta)
    }

    fn fossil_where(key: &str, value: &str) -> (String, String) {
        let vectors = vectors();
        let v = vectors["fossil"]
            .as_array()
            .expect("fossil vectors")
            .iter()
            .find(|v| v[key] == value)
            .unwrap_or_else(|| panic!("no fossil vector with {key} {value}"));
        (s(v, "base").to_string(), s(v, "target").to_string())
    }

    /// Two consecutive states of the room `bracket:77` (alias 17), the second with the first as
    /// its delta base, as a room makes them.
    fn delta_pair(
        base: &str,
        target: &str,
        base_version: u64,
        version: u64,
        ts: u64,
    ) -> (Arc<Publication>, Publication) {
        let now = |ms| Now {
            unix_ms: ms,
            instant: Instant::now(),
        };
        let data = |text: &str| JsonData::parse(text.as_bytes()).expect("json");
        let name = room("bracket:77");
        let first = Arc::new(Publication::new(
            RoomId(17),
            name.clone(),
            Kind::State,
            base_version,
            None,
            &data(base),
            now(ts),
        ));
        let second = Publication::new(RoomId(17), name, Kind::State, version, None, &data(target), now(ts))
            .with_delta_base(Some(&first));
        (first, second)
    }

    #[test]
    fn fossil_deltas_match_the_shared_test_vectors() {
        let vectors = vectors();
        for v in vectors["fossil"].as_array().expect("fossil vectors") {
            let (base, target, delta) = (s(v, "base"), s(v, "target"), s(v, "delta"));
            assert_eq!(
                String::from_utf8(crate::delta::create(base.as_bytes(), target.as_bytes())).expect("utf-8"),
                delta,
                "{}",
                s(v, "name")
            );
            let applied = crate::delta::apply(base.as_bytes(), delta.as_bytes(), 1 << 20).expect("applies");
            assert_eq!(applied, target.as_bytes(), "{}", s(v, "name"));
        }
        for v in vectors["fossil_bad"].as_array().expect("bad fossil vectors") {
            let applied = crate::delta::apply(s(v, "base").as_bytes(), s(v, "delta").as_bytes(), 1 << 20);
            assert_eq!(
                applied.map_err(|e| e.to_string()),
                Err(s(v, "error").to_string()),
                "{}",
                s(v, "name")
            );
        }
    }

    /// Builds the server's WebSocket frame for a vector's fields (the parsed `text`).
    fn websocket_frame(text: &str, parsed: &Value) -> String {
        let opt_room = |key: &str| parsed[key].as_str().map(room);
        match s(parsed, "type") {
            "delta" => {
                let vector = vectors()["websocket"]
                    .as_array()
                    .expect("websocket vectors")
                    .iter()
                    .find(|v| v["text"] == text)
                    .cloned()
                    .expect("the vector");
                let (base, target) = fossil_pair(s(&vector, "fossil"));
                let (_, target) = delta_pair(&base, &target, u(parsed, "base"), u(parsed, "version"), u(parsed, "ts"));
                target.delta().expect("a delta").json_frame().to_string()
            }
            kind @ ("state" | "event") => {
                let (kind, number) = if kind == "state" {
                    (Kind::State, u(parsed, "version"))
                } else {
                    (Kind::Event, u(parsed, "seq"))
                };
                // `data` as the publisher sent it, byte for byte.
                #[derive(serde::Deserialize)]
                struct Raw<'a> {
                    #[serde(borrow)]
                    data: &'a serde_json::value::RawValue,
                }
                let raw: Raw<'_> = serde_json::from_str(text).expect("json");
                let data = JsonData::from_raw(raw.data);
                let now = Now {
                    unix_ms: u(parsed, "ts"),
                    instant: Instant::now(),
                };
                let id = parsed
                    .get("id")
                    .and_then(Value::as_str)
                    .map(|id| EventId::parse(id).expect("id"));
                let p = Publication::new(RoomId(1), room(s(parsed, "room")), kind, number, id, &data, now);
                p.json_frame().to_string()
            }
            "subscribed" => ServerControl::Subscribed {
                room: room(s(parsed, "room")),
                room_id: RoomId(1),
                epoch: s(parsed, "epoch").into(),
                version: u(parsed, "version"),
                seq: u(parsed, "seq"),
                recovered: parsed["recovered"].as_bool(),
                request: parsed["id"].as_u64(),
            }
            .to_json(),
            "unsubscribed" => ServerControl::Unsubscribed {
                room: room(s(parsed, "room")),
            }
            .to_json(),
            "pong" => ServerControl::Pong.to_json(),
            "error" => {
                let code = [
                    ErrorCode::BadRequest,
                    ErrorCode::UnknownType,
                    ErrorCode::BadRoom,
                    ErrorCode::TooManySubscriptions,
                    ErrorCode::RateLimited,
                    ErrorCode::RoomLimit,
                    ErrorCode::UnsupportedFrame,
                    ErrorCode::Draining,
                    ErrorCode::BadToken,
                    ErrorCode::Forbidden,
                ]
                .into_iter()
                .find(|c| u64::from(c.as_u16()) == u(parsed, "code"))
                .unwrap_or_else(|| panic!("no error code {}", parsed["code"]));
                ServerControl::Error {
                    code,
                    message: s(parsed, "message").into(),
                    room: opt_room("room"),
                }
                .to_json()
            }
            "reconnect" => {
                // The one reason the server gives (a `&'static str` in `ServerControl`).
                assert_eq!(s(parsed, "reason"), "shutdown");
                ServerControl::Reconnect { reason: "shutdown" }.to_json()
            }
            "authed" => ServerControl::Authed {
                sub: s(parsed, "sub").into(),
                exp: u(parsed, "exp"),
            }
            .to_json(),
            other => panic!("add the WebSocket vector type {other} to this test"),
        }
    }

    /// Every WebSocket vector, byte for byte: the frame the server builds from the vector's
    /// fields is the vector's text (field order and escaping included; a field the server left
    /// out or added would change the bytes). The client's side, reading the same texts, is
    /// checked by fallback/test/codec.test.mjs.
    #[test]
    fn websocket_frames_match_the_shared_test_vectors() {
        let vectors = vectors();
        let list = vectors["websocket"].as_array().expect("websocket");
        let mut types = Vec::new();
        for vector in list {
            let (name, text) = (s(vector, "name"), s(vector, "text"));
            let parsed: Value = serde_json::from_str(text).expect("json");
            assert_eq!(websocket_frame(text, &parsed), text, "encoding {name}");
            types.push(s(&parsed, "type").to_string());
        }
        for kind in ["state", "event", "subscribed", "error", "reconnect", "authed"] {
            assert!(types.iter().any(|t| t == kind), "no WebSocket vector of type {kind}");
        }
    }

    #[test]
    fn bad_client_messages_are_errors_not_panics() {
        assert_eq!(decode_client(&[]).map_err(|e| e.code()), Err(ErrorCode::UnknownType));
        assert_eq!(
            decode_client(&[0x7f]).map_err(|e| e.code()),
            Err(ErrorCode::UnknownType)
        );
        assert_eq!(
            decode_client(&[message_type::SUBSCRIBE]).map_err(|e| e.code()),
            Err(ErrorCode::BadRequest)
        );
        assert_eq!(
            decode_client(&[message_type::SUBSCRIBE, 0x05, b'a']).map_err(|e| e.code()),
            Err(ErrorCode::BadRequest)
        );
        assert_eq!(
            decode_client(&[message_type::PING, 0x00]).map_err(|e| e.code()),
            Err(ErrorCode::BadRequest)
        );
        let bad_room = encode(
            message_type::SUBSCRIBE,
            &SubscribeBody {
                room: "a b",
                since: None,
                epoch: None,
                id: None,
                delta: None,
            },
        );
        // A subscribe whose trailing id is cut short, or whose delta format (after the id) is
        // cut short, unknown or followed by more bytes, is malformed.
        let cut = [message_type::SUBSCRIBE, 0x01, b'a', 0x00, 0x00, 0x01];
        assert_eq!(decode_client(&cut).map_err(|e| e.code()), Err(ErrorCode::BadRequest));
        let no_delta = [message_type::SUBSCRIBE, 0x01, b'a', 0x00, 0x00, 0x01, 0x07, 0x00];
        assert!(matches!(
            decode_client(&no_delta),
            Ok(ClientMessage::Command(ClientCommand::Subscribe {
                delta: false,
                request: Some(7),
                ..
            }))
        ));
        let cut_delta = [message_type::SUBSCRIBE, 0x01, b'a', 0x00, 0x00, 0x00, 0x01, 0x06, b'f'];
        assert_eq!(
            decode_client(&cut_delta).map_err(|e| e.code()),
            Err(ErrorCode::BadRequest)
        );
        let other_format = [
            message_type::SUBSCRIBE,
            0x01,
            b'a',
            0x00,
            0x00,
            0x00,
            0x01,
            0x03,
            b'z',
            b'i',
            b'p',
        ];
        assert_eq!(
            decode_client(&other_format).map_err(|e| e.code()),
            Err(ErrorCode::BadRequest)
        );
        let trailing = [message_type::SUBSCRIBE, 0x01, b'a', 0x00, 0x00, 0x01, 0x07, 0x00, 0x00];
        assert_eq!(
            decode_client(&trailing).map_err(|e| e.code()),
            Err(ErrorCode::BadRequest)
        );
        assert_eq!(decode_client(&bad_room).map_err(|e| e.code()), Err(ErrorCode::BadRoom));
        let bad_utf8 = [message_type::UNSUBSCRIBE, 0x01, 0xff];
        assert_eq!(
            decode_client(&bad_utf8).map_err(|e| e.code()),
            Err(ErrorCode::BadRequest)
        );
    }

    #[test]
    fn oversized_and_malformed_lengths_are_refused() {
        let mut decoder = FrameDecoder::default();
        let mut stream = BytesMut::new();
        put_frame(&mut stream, &vec![0u8; 300]);
        decoder.extend(&stream[..2]);
        assert_eq!(decoder.next_frame(100), Err(FrameError::TooLarge(300, 100)));
        let mut decoder = FrameDecoder::default();
        decoder.extend(&[0xff; 12]);
        assert_eq!(decoder.next_frame(100), Err(FrameError::BadLength));
    }

    #[test]
    fn has_frame_says_whether_next_frame_would_answer() {
        let mut decoder = FrameDecoder::default();
        assert!(!decoder.has_frame(100));
        decoder.extend(&[0x02, 0x12]);
        assert!(!decoder.has_frame(100), "one byte of two");
        decoder.extend(&[0x12]);
        assert!(decoder.has_frame(100));
        let mut big = FrameDecoder::default();
        big.extend(&[0x80, 0x80, 0x40]);
        assert!(big.has_frame(65_536), "a refused length answers at once");
        assert!(!big.has_frame(usize::MAX));
        let mut bad = FrameDecoder::default();
        bad.extend(&[0xff; 12]);
        assert!(bad.has_frame(100));
    }
}
