//! The client protocol's vocabulary: commands a client sends, control replies the server sends,
//! and the one table of error and close codes. Pure: text in, values out, text back.

use serde::{Deserialize, Serialize};

use super::publication::RoomId;
use super::room_name::{RoomName, RoomNameError};

/// A command from a client (docs/PROTOCOL.md, "Client to server").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCommand {
    Subscribe {
        room: RoomName,
        /// Recover every event after this sequence number.
        since: Option<u64>,
        /// The room epoch the client last saw; recovery fails when it differs.
        epoch: Option<String>,
        /// The client's number for this request, echoed in the `subscribed` reply, so that a
        /// reply is told apart from an unrequested notice.
        request: Option<u64>,
        /// The subscriber takes states as fossil deltas against the version it holds
        /// (`"delta":"fossil"`; docs/PROTOCOL.md, "Delta states").
        delta: bool,
    },
    Unsubscribe {
        room: RoomName,
    },
    Ping,
    /// Authenticates the connection with a JWT, or refreshes its token before it expires.
    Auth {
        token: String,
    },
}

/// Error codes carried by `{"type":"error"}` frames. The numbers are part of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Not JSON, not an object, or a field of the wrong type.
    BadRequest = 100,
    /// `type` is missing or not one the server knows.
    UnknownType = 101,
    /// The room name breaks the naming rules.
    BadRoom = 102,
    /// The connection already holds its maximum number of subscriptions.
    TooManySubscriptions = 103,
    /// The client sent commands faster than its allowed rate; the command was ignored.
    RateLimited = 104,
    /// The node holds its maximum number of rooms; the room could not be created.
    RoomLimit = 105,
    /// A binary frame arrived on the JSON WebSocket protocol.
    UnsupportedFrame = 106,
    /// The node is shutting down and takes no new subscriptions.
    Draining = 107,
    /// The token of an `auth` was refused (expired, forged, or this server takes none).
    BadToken = 108,
    /// The room is private and the connection's token does not allow it (or there is none).
    Forbidden = 109,
}

impl ErrorCode {
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::UnknownType => "unknown_type",
            Self::BadRoom => "bad_room",
            Self::TooManySubscriptions => "too_many_subscriptions",
            Self::RateLimited => "rate_limited",
            Self::RoomLimit => "room_limit",
            Self::UnsupportedFrame => "unsupported_frame",
            Self::Draining => "draining",
            Self::BadToken => "bad_token",
            Self::Forbidden => "forbidden",
        }
    }
}

/// WebSocket close codes the server sends (docs/PROTOCOL.md, "Close codes").
pub mod close_code {
    /// The client broke the WebSocket framing rules.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// The client kept sending commands over its rate after a 104 and a burst's worth more.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A frame or message was larger than the limit (1 MiB by default).
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The server is shutting down: reconnect (to another node) with `since`.
    pub const SERVICE_RESTART: u16 = 1012;
    /// The connection fell too far behind on ordered data: reconnect with `since`.
    pub const SLOW: u16 = 4001;
    /// Nothing was heard from the client within the idle timeout.
    pub const IDLE_TIMEOUT: u16 = 4002;
    /// The connection's token expired and no `auth` refreshed it.
    pub const TOKEN_EXPIRED: u16 = 4003;
}

/// A reply or notice from the server that is not a publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerControl {
    Subscribed {
        room: RoomName,
        /// This node's ID of the room, which WebTransport sessions use as the room's alias in
        /// datagrams (not sent over WebSocket).
        room_id: RoomId,
        epoch: String,
        /// Version of the room's current state (0: none yet).
        version: u64,
        /// Sequence number of the room's last event (0: none yet).
        seq: u64,
        /// Present when the client sent `since`: whether every missed event follows.
        recovered: Option<bool>,
        /// The `id` of the subscribe this answers; `None` on an unrequested notice.
        request: Option<u64>,
    },
    Unsubscribed {
        room: RoomName,
    },
    Pong,
    Error {
        code: ErrorCode,
        message: String,
        room: Option<RoomName>,
    },
    /// The node is going away; the client should reconnect (with `since`).
    Reconnect {
        reason: &'static str,
    },
    /// An `auth` was accepted: the token's subject and expiry (seconds since the Unix epoch).
    Authed {
        sub: String,
        exp: u64,
    },
}

impl ServerControl {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error {
            code,
            message: message.into(),
            room: None,
        }
    }

    /// Rough size for queue accounting.
    pub fn size_hint(&self) -> usize {
        match self {
            Self::Error { message, .. } => 64 + message.len(),
            _ => 96,
        }
    }

    /// The JSON text frame for WebSocket clients.
    pub fn to_json(&self) -> String {
        let wire = match self {
            Self::Subscribed {
                room,
                epoch,
                version,
                seq,
                recovered,
                request,
                ..
            } => WireControl::Subscribed {
                room: room.as_str(),
                epoch,
                version: *version,
                seq: *seq,
                recovered: *recovered,
                id: *request,
            },
            Self::Unsubscribed { room } => WireControl::Unsubscribed { room: room.as_str() },
            Self::Pong => return r#"{"type":"pong"}"#.to_string(),
            Self::Error { code, message, room } => WireControl::Error {
                code: code.as_u16(),
                name: code.name(),
                message,
                room: room.as_ref().map(RoomName::as_str),
            },
            Self::Reconnect { reason } => WireControl::Reconnect { reason },
            Self::Authed { sub, exp } => WireControl::Authed { sub, exp: *exp },
        };
        // Serialising plain strings and integers cannot fail.
        serde_json::to_string(&wire).unwrap_or_default()
    }
}

/// Field order on the wire: `type` first, then as documented.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum WireControl<'a> {
    Subscribed {
        room: &'a str,
        epoch: &'a str,
        version: u64,
        seq: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    Unsubscribed {
        room: &'a str,
    },
    Error {
        code: u16,
        name: &'a str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a str>,
    },
    Reconnect {
        reason: &'a str,
    },
    Authed {
        sub: &'a str,
        exp: u64,
    },
}

/// Why a client's text frame could not become a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("message has no \"type\"")]
    MissingType,
    #[error("missing field \"room\"")]
    MissingRoom,
    #[error("bad room name: {0}")]
    BadRoom(#[from] RoomNameError),
}

impl CommandError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Malformed(_) | Self::MissingRoom => ErrorCode::BadRequest,
            Self::UnknownType(_) | Self::MissingType => ErrorCode::UnknownType,
            Self::BadRoom(_) => ErrorCode::BadRoom,
        }
    }

    pub fn to_control(&self) -> ServerControl {
        ServerControl::error(self.code(), self.to_string())
    }
}

#[derive(Deserialize)]
struct RawCommand<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    room: Option<std::borrow::Cow<'a, str>>,
    since: Option<u64>,
    epoch: Option<String>,
    id: Option<u64>,
    token: Option<String>,
    #[serde(borrow)]
    delta: Option<std::borrow::Cow<'a, str>>,
}

/// Reads a subscribe's `delta` field: absent (whole states), or the one format there is.
pub fn delta_format(format: Option<&str>) -> Result<bool, CommandError> {
    match format {
        None => Ok(false),
        Some(super::delta::FORMAT) => Ok(true),
        Some(other) => Err(CommandError::Malformed(format!(
            "unknown delta format {:?} (\"{}\" is the one there is)",
            truncate(other, 32),
            super::delta::FORMAT
        ))),
    }
}

/// Parses one client text frame. Unknown fields are ignored, so clients may add their own.
pub fn parse_command(text: &str) -> Result<ClientCommand, CommandError> {
    let raw: RawCommand<'_> = serde_json::from_str(text).map_err(|e| CommandError::Malformed(e.to_string()))?;
    let kind = raw.kind.ok_or(CommandError::MissingType)?;
    let room = || -> Result<RoomName, CommandError> {
        let name = raw.room.as_deref().ok_or(CommandError::MissingRoom)?;
        Ok(RoomName::parse(name)?)
    };
    match &*kind {
        "subscribe" => Ok(ClientCommand::Subscribe {
            room: room()?,
            since: raw.since,
            epoch: raw.epoch.clone(),
            request: raw.id,
            delta: delta_format(raw.delta.as_deref())?,
        }),
        "unsubscribe" => Ok(ClientCommand::Unsubscribe { room: room()? }),
        "ping" => Ok(ClientCommand::Ping),
        "auth" => match raw.token {
            Some(token) => Ok(ClientCommand::Auth { token }),
            None => Err(CommandError::Malformed("auth needs a \"token\" string".into())),
        },
        other => Err(CommandError::UnknownType(truncate(other, 64))),
    }
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> RoomName {
        RoomName::parse(name).expect("room")
    }

    #[test]
    fn a_subscribe_asks_for_fossil_deltas_or_none() {
        let delta = |text: &str| match parse_command(text) {
            Ok(ClientCommand::Subscribe { delta, .. }) => Ok(delta),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.code()),
        };
        assert_eq!(delta(r#"{"type":"subscribe","room":"b:1"}"#), Ok(false));
        assert_eq!(delta(r#"{"type":"subscribe","room":"b:1","delta":"fossil"}"#), Ok(true));
        assert_eq!(
            delta(r#"{"type":"subscribe","room":"b:1","delta":"json-patch"}"#),
            Err(ErrorCode::BadRequest)
        );
        assert_eq!(
            delta(r#"{"type":"subscribe","room":"b:1","delta":true}"#),
            Err(ErrorCode::BadRequest)
        );
    }

    #[test]
    fn parses_the_fixed_vocabulary() {
        assert_eq!(
            parse_command(r#"{"type":"subscribe","room":"game:1"}"#),
            Ok(ClientCommand::Subscribe {
                room: room("game:1"),
                since: None,
                epoch: None,
                request: None,
                delta: false,
            })
        );
        assert_eq!(
            parse_command(r#"{"type":"subscribe","room":"game:1","since":41,"epoch":"ab"}"#),
            Ok(ClientCommand::Subscribe {
                room: room("game:1"),
                since: Some(41),
                epoch: Some("ab".into()),
                request: None,
                delta: false,
            })
        );
        assert_eq!(
            parse_command(r#"{"type":"unsubscribe","room":"game:1"}"#),
            Ok(ClientCommand::Unsubscribe { room: room("game:1") })
        );
        assert_eq!(parse_command(r#"{"type":"ping"}"#), Ok(ClientCommand::Ping));
        assert_eq!(
            parse_command(r#"{"type":"ping","id":7,"extra":{"x":1}}"#),
            Ok(ClientCommand::Ping)
        );
    }

    #[test]
    fn room_names_with_escapes_are_decoded_before_validation() {
        assert_eq!(
            parse_command(r#"{"type":"unsubscribe","room":"game\u003a1"}"#),
            Ok(ClientCommand::Unsubscribe { room: room("game:1") })
        );
    }

    #[test]
    fn bad_input_maps_to_documented_codes() {
        let code = |t: &str| parse_command(t).map_err(|e| e.code());
        assert_eq!(code("not json"), Err(ErrorCode::BadRequest));
        assert_eq!(code("[1,2]"), Err(ErrorCode::BadRequest));
        assert_eq!(
            code(r#"{"type":"subscribe","room":"g","since":-1}"#),
            Err(ErrorCode::BadRequest)
        );
        assert_eq!(
            code(r#"{"type":"subscribe","room":"g","since":"5"}"#),
            Err(ErrorCode::BadRequest)
        );
        assert_eq!(code(r#"{"type":"subscribe"}"#), Err(ErrorCode::BadRequest));
        assert_eq!(code(r#"{"type":7}"#), Err(ErrorCode::BadRequest));
        assert_eq!(code(r#"{"type":"publish","room":"g"}"#), Err(ErrorCode::UnknownType));
        assert_eq!(code(r#"{"room":"g"}"#), Err(ErrorCode::UnknownType));
        // docs/PROTOCOL.md, "Error codes": `auth` is a type; a `type` that is not a string and
        // an `auth` without its token are bad requests.
        assert_eq!(code(r#"{"type":"auth"}"#), Err(ErrorCode::BadRequest));
        assert_eq!(code(r#"{"type":7}"#), Err(ErrorCode::BadRequest));
        assert_eq!(code(r#"{"type":"hello"}"#), Err(ErrorCode::UnknownType));
        assert_eq!(
            code(r#"{"type":"subscribe","room":"bad room"}"#),
            Err(ErrorCode::BadRoom)
        );
        assert_eq!(code(r#"{"type":"subscribe","room":""}"#), Err(ErrorCode::BadRoom));
    }

    #[test]
    fn control_frames_match_protocol_vectors() {
        let subscribed = ServerControl::Subscribed {
            room: room("game:1"),
            room_id: RoomId(1),
            epoch: "00000000000000ff".into(),
            version: 3,
            seq: 9,
            recovered: Some(true),
            request: None,
        };
        assert_eq!(
            subscribed.to_json().as_str(),
            r#"{"type":"subscribed","room":"game:1","epoch":"00000000000000ff","version":3,"seq":9,"recovered":true}"#
        );
        let plain = ServerControl::Subscribed {
            room: room("game:1"),
            room_id: RoomId(1),
            epoch: "e".into(),
            version: 0,
            seq: 0,
            recovered: None,
            request: None,
        };
        assert_eq!(
            plain.to_json().as_str(),
            r#"{"type":"subscribed","room":"game:1","epoch":"e","version":0,"seq":0}"#
        );
        let answering = ServerControl::Subscribed {
            room: room("game:1"),
            room_id: RoomId(1),
            epoch: "e".into(),
            version: 0,
            seq: 0,
            recovered: None,
            request: Some(7),
        };
        assert_eq!(
            answering.to_json().as_str(),
            r#"{"type":"subscribed","room":"game:1","epoch":"e","version":0,"seq":0,"id":7}"#
        );
        assert_eq!(
            parse_command(r#"{"type":"subscribe","room":"game:1","id":7}"#),
            Ok(ClientCommand::Subscribe {
                room: room("game:1"),
                since: None,
                epoch: None,
                request: Some(7),
                delta: false,
            })
        );
        assert_eq!(
            parse_command(r#"{"type":"subscribe","room":"game:1","id":-1}"#).map_err(|e| e.code()),
            Err(ErrorCode::BadRequest)
        );
        assert_eq!(ServerControl::Pong.to_json().as_str(), r#"{"type":"pong"}"#);
        assert_eq!(
            ServerControl::Unsubscribed { room: room("team:3") }.to_json().as_str(),
            r#"{"type":"unsubscribed","room":"team:3"}"#
        );
        assert_eq!(
            ServerControl::error(ErrorCode::BadRoom, "bad \"x\"").to_json().as_str(),
            r#"{"type":"error","code":102,"name":"bad_room","message":"bad \"x\""}"#
        );
        assert_eq!(
            ServerControl::Reconnect { reason: "shutdown" }.to_json().as_str(),
            r#"{"type":"reconnect","reason":"shutdown"}"#
        );
    }
}
