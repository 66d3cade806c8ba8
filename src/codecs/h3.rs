//! The HTTP/3 that a WebTransport session needs, as pure functions over bytes: the server's
//! SETTINGS, the extended CONNECT and its answer, the WebTransport stream header, the datagram
//! prefix and the CLOSE_WEBTRANSPORT_SESSION capsule.
//! The framing and QPACK are `wtransport-proto`'s; nothing here touches a socket.

use std::borrow::Cow;

use wtransport_proto::bytes::{BufferReader, BytesReader, BytesWriter};
use wtransport_proto::frame::{Frame, FrameKind};
use wtransport_proto::headers::Headers;
use wtransport_proto::stream_header::StreamHeader;
use wtransport_proto::varint::VarInt;

pub use wtransport_proto::error::ErrorCode as H3ErrorCode;

/// HTTP/3 SETTINGS identifiers the server sends (RFC 9114, RFC 9220, RFC 9297 and
/// draft-ietf-webtrans-http3-02 as Chromium speaks it).
mod setting {
    pub const QPACK_MAX_TABLE_CAPACITY: u32 = 0x01;
    pub const QPACK_BLOCKED_STREAMS: u32 = 0x07;
    pub const ENABLE_CONNECT_PROTOCOL: u32 = 0x08;
    pub const H3_DATAGRAM: u32 = 0x33;
    pub const ENABLE_WEBTRANSPORT: u32 = 0x2b60_3742;
    pub const WEBTRANSPORT_MAX_SESSIONS: u32 = 0xc671_706a;
}

/// CLOSE_WEBTRANSPORT_SESSION (draft-ietf-webtrans-http3, section 5).
const CLOSE_WEBTRANSPORT_SESSION: u32 = 0x2843;

/// The longest close reason a capsule carries (the draft's limit).
const MAX_CLOSE_REASON: usize = 1024;

/// A client's HTTP/3 bytes broke the rules; closes the connection with `code`.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("http/3: {message}")]
pub struct H3Error {
    pub code: H3ErrorCode,
    pub message: &'static str,
}

impl H3Error {
    fn new(code: H3ErrorCode, message: &'static str) -> Self {
        Self { code, message }
    }
}

/// What parsing a growing buffer gave: a value and the bytes it took, or not yet enough bytes.
pub type Parsed<T> = Result<Option<(T, usize)>, H3Error>;

/// The server's control stream, all of it: the stream type, then one SETTINGS frame with
/// extended CONNECT, HTTP/3 datagrams and WebTransport on, one session per connection and no
/// dynamic QPACK table (the settings wtransport's server sends, in a fixed order).
pub fn server_control_stream() -> Vec<u8> {
    let mut payload = Vec::new();
    for (id, value) in [
        (setting::QPACK_MAX_TABLE_CAPACITY, 0),
        (setting::QPACK_BLOCKED_STREAMS, 0),
        (setting::ENABLE_CONNECT_PROTOCOL, 1),
        (setting::H3_DATAGRAM, 1),
        (setting::ENABLE_WEBTRANSPORT, 1),
        (setting::WEBTRANSPORT_MAX_SESSIONS, 1),
    ] {
        let _ = payload.put_varint(VarInt::from_u32(id));
        let _ = payload.put_varint(VarInt::from_u32(value));
    }
    let mut out = Vec::new();
    let _ = StreamHeader::new_control().write(&mut out);
    let _ = Frame::new_settings(Cow::Owned(payload)).write(&mut out);
    out
}

/// An extended CONNECT request for a WebTransport session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    pub authority: String,
    /// The path, without its query.
    pub path: String,
    pub origin: Option<String>,
}

/// The CONNECT that opens a session: a HEADERS frame on the client's bidirectional stream
/// (reserved "grease" frames before it are skipped). Anything but an extended CONNECT with
/// `:protocol webtransport` over https is a message error.
pub fn read_connect(buf: &[u8]) -> Parsed<ConnectRequest> {
    let mut reader = BufferReader::new(buf);
    loop {
        let frame = match Frame::read_from_buffer(&mut reader) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(None),
            Err(_) => return Err(H3Error::new(H3ErrorCode::Frame, "bad frame on the request stream")),
        };
        match frame.kind() {
            FrameKind::Exercise(_) => continue,
            FrameKind::Headers => {}
            _ => {
                return Err(H3Error::new(
                    H3ErrorCode::FrameUnexpected,
                    "request stream without HEADERS first",
                ))
            }
        }
        if !qpack_integers_fit(frame.payload()) {
            return Err(H3Error::new(H3ErrorCode::Message, "bad QPACK headers"));
        }
        let headers = Headers::with_frame(&frame).map_err(|code| H3Error::new(code, "bad QPACK headers"))?;
        let field = |name| headers.get(name);
        let is_connect = field(":method") == Some("CONNECT")
            && field(":protocol") == Some("webtransport")
            && field(":scheme") == Some("https");
        let (Some(authority), Some(path)) = (field(":authority"), field(":path")) else {
            return Err(H3Error::new(
                H3ErrorCode::Message,
                "CONNECT without :authority or :path",
            ));
        };
        if !is_connect {
            return Err(H3Error::new(H3ErrorCode::Message, "not a WebTransport CONNECT"));
        }
        let request = ConnectRequest {
            authority: authority.to_string(),
            path: path.split('?').next().unwrap_or_default().to_string(),
            origin: field("origin").map(str::to_string),
        };
        return Ok(Some((request, reader.offset())));
    }
}

/// Whether every QPACK integer of a field section (RFC 9204 §4.1.1, §4.5) is at most 8 bytes
/// past its prefix. wtransport-proto's decoder shifts by 7 per continuation byte and overflows
/// the shift (a panic where overflow checks are on) after 9; found by the `h3_connect` fuzzer.
/// Walks the representations the decoder reads (static references and literals) and stops at
/// one it refuses anyway (dynamic table).
fn qpack_integers_fit(block: &[u8]) -> bool {
    const MAX_CONTINUATION: usize = 8;
    /// Reads an integer of an `n`-bit prefix at `at`: `Ok(None)` when the block ends first (the
    /// decoder refuses that itself), `Err(())` when it runs past `MAX_CONTINUATION` bytes.
    fn integer(block: &[u8], at: usize, n: u32) -> Result<Option<(usize, usize)>, ()> {
        let mask = (1usize << n) - 1;
        let Some(&first) = block.get(at) else {
            return Ok(None);
        };
        if usize::from(first) & mask != mask {
            return Ok(Some((usize::from(first) & mask, at + 1)));
        }
        let (mut value, mut at) = (mask, at + 1);
        for i in 0..=MAX_CONTINUATION {
            let Some(&byte) = block.get(at) else {
                return Ok(None);
            };
            value = value.saturating_add(usize::from(byte & 0x7f) << (7 * i));
            at += 1;
            if byte & 0x80 == 0 {
                return Ok(Some((value, at)));
            }
        }
        Err(())
    }
    let walk = || -> Result<Option<()>, ()> {
        let string = |at: usize, n: u32| -> Result<Option<usize>, ()> {
            Ok(integer(block, at, n)?.map(|(len, at)| at.saturating_add(len)))
        };
        let Some((_, at)) = integer(block, 0, 8)? else {
            return Ok(None);
        };
        let Some((_, mut at)) = integer(block, at, 7)? else {
            return Ok(None);
        };
        while let Some(&byte) = block.get(at) {
            let next = if byte & 0x80 != 0 {
                integer(block, at, 6)?.map(|(_, at)| at)
            } else if byte & 0x40 != 0 {
                if byte & 0x10 == 0 {
                    return Ok(None); // a dynamic reference: the decoder refuses it
                }
                match integer(block, at, 4)? {
                    Some((_, at)) => string(at, 7)?,
                    None => None,
                }
            } else if byte & 0x20 != 0 {
                match string(at, 3)? {
                    Some(at) => string(at, 7)?,
                    None => None,
                }
            } else {
                return Ok(None); // post-base forms: the decoder refuses them
            };
            let Some(next) = next else { return Ok(None) };
            at = next;
        }
        Ok(Some(()))
    };
    walk().is_ok()
}

/// The answer to a CONNECT: a HEADERS frame with `:status` alone.
pub fn response(status: u16) -> Vec<u8> {
    let headers: Headers = [(":status", status.to_string())].into_iter().collect();
    let mut out = Vec::new();
    let _ = headers.generate_frame().write(&mut out);
    out
}

/// The head of a client's WebTransport bidirectional stream: the WEBTRANSPORT_STREAM signal
/// (`0x41`) and the session ID (the CONNECT stream's ID).
pub fn read_stream_session(buf: &[u8]) -> Parsed<u64> {
    let mut reader = BufferReader::new(buf);
    match Frame::read_from_buffer(&mut reader) {
        Ok(Some(frame)) => match frame.session_id() {
            Some(session) if matches!(frame.kind(), FrameKind::WebTransport) => {
                Ok(Some((session.into_u64(), reader.offset())))
            }
            _ => Err(H3Error::new(
                H3ErrorCode::FrameUnexpected,
                "a second request on the connection",
            )),
        },
        Ok(None) => Ok(None),
        Err(_) => Err(H3Error::new(H3ErrorCode::Frame, "bad stream header")),
    }
}

/// The prefix of every datagram of the session opened on stream `session`: its quarter stream
/// ID as a QUIC varint (RFC 9297). Session 0 (the client's first stream) gives `00`.
pub fn datagram_prefix(session: u64) -> Vec<u8> {
    let mut out = Vec::new();
    if let Ok(id) = VarInt::try_from_u64(session / 4) {
        let _ = out.put_varint(id);
    }
    out
}

/// The payload of a datagram with `prefix`, or `None` for a datagram of another session.
pub fn datagram_payload<'a>(datagram: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    datagram.strip_prefix(prefix)
}

/// A CLOSE_WEBTRANSPORT_SESSION capsule in a DATA frame, as written on the CONNECT stream: the
/// code as 32 bits big-endian, then the reason (cut at a character boundary to 1,024 bytes).
pub fn close_capsule(code: u32, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
    let mut capsule = Vec::new();
    let _ = capsule.put_varint(VarInt::from_u32(CLOSE_WEBTRANSPORT_SESSION));
    let _ = capsule.put_varint(VarInt::from_u32(4 + reason.len() as u32));
    capsule.extend_from_slice(&code.to_be_bytes());
    capsule.extend_from_slice(reason);
    let mut out = Vec::new();
    let _ = Frame::new_data(Cow::Owned(capsule)).write(&mut out);
    out
}

/// A client's unidirectional stream, by its type (RFC 9114 §6.2, RFC 9204 §4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UniStreamType {
    /// Its HTTP/3 control stream: SETTINGS first.
    Control,
    /// A QPACK encoder or decoder stream: critical, but unused without a dynamic table.
    Qpack,
    /// Anything else (a push, a WebTransport or a reserved stream): read and discarded.
    Other,
}

/// The type that opens a client's unidirectional stream.
pub fn read_uni_stream_type(buf: &[u8]) -> Parsed<UniStreamType> {
    let mut reader = BufferReader::new(buf);
    let Some(kind) = reader.get_varint() else {
        return Ok(None);
    };
    let kind = match kind.into_inner() {
        0x00 => UniStreamType::Control,
        0x02 | 0x03 => UniStreamType::Qpack,
        _ => UniStreamType::Other,
    };
    Ok(Some((kind, reader.offset())))
}

/// What the server needs of the client's SETTINGS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientSettings {
    /// `SETTINGS_H3_DATAGRAM` = 1: the client takes HTTP/3 datagrams (RFC 9297), which
    /// WebTransport needs.
    pub h3_datagram: bool,
}

/// The client's SETTINGS, the first frame of its control stream after the stream type (RFC
/// 9114 §6.2.1: any other frame first is `H3_MISSING_SETTINGS`; §7.2.4: a setting twice, or one
/// of HTTP/2's, is `H3_SETTINGS_ERROR`). Settings the server does not know are ignored.
pub fn read_client_settings(buf: &[u8]) -> Parsed<ClientSettings> {
    const SETTINGS: u64 = 0x04;
    let mut reader = BufferReader::new(buf);
    let (Some(kind), Some(len)) = (reader.get_varint(), reader.get_varint()) else {
        return Ok(None);
    };
    if kind.into_inner() != SETTINGS {
        return Err(H3Error::new(
            H3ErrorCode::MissingSettings,
            "the control stream does not start with SETTINGS",
        ));
    }
    let Ok(len) = usize::try_from(len.into_inner()) else {
        return Err(H3Error::new(H3ErrorCode::ExcessiveLoad, "SETTINGS too large"));
    };
    let Some(payload) = reader.get_bytes(len) else {
        return Ok(None);
    };
    let mut settings = ClientSettings::default();
    let mut seen = Vec::new();
    let mut fields = BufferReader::new(payload);
    while fields.capacity() > 0 {
        let (Some(id), Some(value)) = (fields.get_varint(), fields.get_varint()) else {
            return Err(H3Error::new(H3ErrorCode::Frame, "a SETTINGS frame cut short"));
        };
        let (id, value) = (id.into_inner(), value.into_inner());
        if matches!(id, 0x02..=0x05) || seen.contains(&id) {
            return Err(H3Error::new(
                H3ErrorCode::Settings,
                "a setting repeated, or one of HTTP/2's",
            ));
        }
        seen.push(id);
        if id == u64::from(setting::H3_DATAGRAM) {
            settings.h3_datagram = value == 1;
        }
    }
    Ok(Some((settings, reader.offset())))
}

/// What the client sent on the CONNECT stream after the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectStreamEvent {
    /// It closed the session with a code and reason.
    Close { code: u32, reason: String },
    /// Something else (another capsule, a grease frame): ignored.
    Other,
}

/// One frame from the CONNECT stream after the request.
pub fn read_connect_stream(buf: &[u8]) -> Parsed<ConnectStreamEvent> {
    let mut reader = BufferReader::new(buf);
    let frame = match Frame::read_from_buffer(&mut reader) {
        Ok(Some(frame)) => frame,
        Ok(None) => return Ok(None),
        Err(_) => return Err(H3Error::new(H3ErrorCode::Frame, "bad frame on the CONNECT stream")),
    };
    let mut event = ConnectStreamEvent::Other;
    if matches!(frame.kind(), FrameKind::Data) {
        let mut payload = frame.payload();
        let kind = payload.get_varint().map(VarInt::into_inner);
        let body = payload
            .get_varint()
            .and_then(|len| payload.get_bytes(len.into_inner() as usize));
        if let (Some(kind), Some(body)) = (kind, body) {
            if kind == u64::from(CLOSE_WEBTRANSPORT_SESSION) && body.len() >= 4 {
                let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                let reason = String::from_utf8_lossy(&body[4..]).into_owned();
                event = ConnectStreamEvent::Close { code, reason };
            }
        }
    }
    Ok(Some((event, reader.offset())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn the_server_control_stream_is_the_documented_bytes() {
        // Stream type 00, SETTINGS (04) of 0x16 bytes: 01=0, 07=0, 08=1, 33=1,
        // 2b603742=1, c671706a=1 (four- and eight-byte varints for the last two).
        assert_eq!(
            hex(&server_control_stream()),
            "0004160100070008013301ab60374201c0000000c671706a01"
        );
    }

    fn connect_frame(fields: &[(&str, &str)]) -> Vec<u8> {
        let headers: Headers = fields.iter().copied().collect();
        let mut out = Vec::new();
        headers.generate_frame().write(&mut out).expect("write");
        out
    }

    #[test]
    fn a_webtransport_connect_is_read_with_its_path_and_origin() {
        let frame = connect_frame(&[
            (":method", "CONNECT"),
            (":protocol", "webtransport"),
            (":scheme", "https"),
            (":authority", "127.0.0.1:4433"),
            (":path", "/wt?x=1"),
            ("origin", "https://scores.example"),
        ]);
        let (request, used) = read_connect(&frame).expect("connect").expect("complete");
        assert_eq!(used, frame.len());
        assert_eq!(request.path, "/wt");
        assert_eq!(request.authority, "127.0.0.1:4433");
        assert_eq!(request.origin.as_deref(), Some("https://scores.example"));
        assert_eq!(read_connect(&frame[..frame.len() - 1]), Ok(None));
    }

    #[test]
    fn a_plain_request_or_a_connect_without_webtransport_is_a_message_error() {
        for fields in [
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "a"),
                (":path", "/wt"),
            ],
            vec![
                (":method", "CONNECT"),
                (":protocol", "websocket"),
                (":scheme", "https"),
                (":authority", "a"),
                (":path", "/wt"),
            ],
            vec![
                (":method", "CONNECT"),
                (":protocol", "webtransport"),
                (":scheme", "https"),
            ],
        ] {
            let error = read_connect(&connect_frame(&fields)).expect_err("refused");
            assert_eq!(error.code, H3ErrorCode::Message, "{fields:?}");
        }
    }

    #[test]
    fn a_qpack_integer_too_long_for_the_decoder_is_a_message_error_not_a_panic() {
        // Found by the h3_connect fuzzer (tests/fuzz): a HEADERS frame whose first QPACK integer
        // runs on for ten continuation bytes made wtransport-proto's decoder overflow a shift.
        let crash = unhex("010cfff2fef2f2f2fffffffff1000000ffff01c4c4000104fefe043b544c3bff2e23");
        let error = read_connect(&crash).expect_err("refused");
        assert_eq!(error.code, H3ErrorCode::Message);
        // Eight continuation bytes still fit, and a well-formed CONNECT passes the check.
        assert!(qpack_integers_fit(&[
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x00
        ]));
        assert!(!qpack_integers_fit(&[
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
        ]));
        let fields = [
            (":method", "CONNECT"),
            (":protocol", "webtransport"),
            (":scheme", "https"),
            (":authority", "a"),
            (":path", "/wt"),
        ];
        assert!(read_connect(&connect_frame(&fields)).expect("read").is_some());
    }

    #[test]
    fn the_response_is_a_headers_frame_with_the_status() {
        let bytes = response(200);
        let mut reader = BufferReader::new(&bytes);
        let frame = Frame::read_from_buffer(&mut reader).expect("frame").expect("complete");
        assert!(matches!(frame.kind(), FrameKind::Headers));
        let headers = Headers::with_frame(&frame).expect("qpack");
        assert_eq!(headers.get(":status"), Some("200"));
        // HEADERS (01) of 7 bytes: QPACK prefix 00 00 (no dynamic table), then a literal with
        // the static table's `:status` name (5f 09: index 24) and the Huffman-coded "200".
        assert_eq!(hex(&bytes), "010700005f09821001");
    }

    #[test]
    fn a_webtransport_stream_names_its_session() {
        assert_eq!(read_stream_session(&unhex("404100")), Ok(Some((0, 3))));
        assert_eq!(read_stream_session(&unhex("404104")), Ok(Some((4, 3))));
        assert_eq!(read_stream_session(&unhex("40")), Ok(None));
        assert!(read_stream_session(&connect_frame(&[(":method", "GET")])).is_err());
    }

    #[test]
    fn datagrams_carry_the_quarter_stream_id() {
        assert_eq!(datagram_prefix(0), vec![0x00]);
        assert_eq!(datagram_prefix(4), vec![0x01]);
        assert_eq!(datagram_prefix(4 * 64), vec![0x40, 0x40]);
        assert_eq!(datagram_payload(&[0x00, 0x04, 0x09], &[0x00]), Some(&[0x04, 0x09][..]));
        assert_eq!(datagram_payload(&[0x01, 0x04], &[0x00]), None);
    }

    #[test]
    fn other_frames_on_the_connect_stream_are_taken_whole_and_ignored() {
        // A DATA frame (00) of 3 bytes holding a capsule of type 0xff (the two-byte varint
        // 40 ff) and length 0: not a close, taken whole.
        let other = unhex("000340ff00");
        assert_eq!(
            read_connect_stream(&other),
            Ok(Some((ConnectStreamEvent::Other, other.len())))
        );
        assert_eq!(read_connect_stream(&other[..3]), Ok(None), "a partial frame waits");
    }

    #[test]
    fn the_client_settings_come_first_on_its_control_stream() {
        // SETTINGS (04) of 4 bytes: H3_DATAGRAM (33) = 1, and an unknown setting 0x21 = 0.
        assert_eq!(
            read_client_settings(&unhex("0404330121000102")),
            Ok(Some((ClientSettings { h3_datagram: true }, 6)))
        );
        assert_eq!(
            read_client_settings(&unhex("040433")),
            Ok(None),
            "a partial frame waits"
        );
        // As the server's own: H3_DATAGRAM 1, ENABLE_WEBTRANSPORT and WEBTRANSPORT_MAX_SESSIONS
        // (four- and eight-byte varints).
        assert_eq!(
            read_client_settings(&unhex("04103301ab60374201c0000000c671706a01")),
            Ok(Some((ClientSettings { h3_datagram: true }, 18)))
        );
        assert_eq!(
            read_client_settings(&unhex("0400")),
            Ok(Some((ClientSettings { h3_datagram: false }, 2)))
        );
        // A GOAWAY (07) first is H3_MISSING_SETTINGS; a setting twice is H3_SETTINGS_ERROR.
        let missing = read_client_settings(&unhex("070100")).expect_err("refused");
        assert_eq!(missing.code, H3ErrorCode::MissingSettings);
        let twice = read_client_settings(&unhex("040433013300")).expect_err("refused");
        assert_eq!(twice.code, H3ErrorCode::Settings);
        assert_eq!(
            read_uni_stream_type(&unhex("00")),
            Ok(Some((UniStreamType::Control, 1)))
        );
        assert_eq!(read_uni_stream_type(&unhex("03")), Ok(Some((UniStreamType::Qpack, 1))));
        assert_eq!(
            read_uni_stream_type(&unhex("4054")),
            Ok(Some((UniStreamType::Other, 2)))
        );
        assert_eq!(read_uni_stream_type(&[]), Ok(None));
    }

    #[test]
    fn a_close_capsule_round_trips_and_reads_as_wtransport_reads_it() {
        let bytes = close_capsule(4001, "slow");
        assert_eq!(hex(&bytes), "000b68430800000fa1736c6f77");
        assert_eq!(
            read_connect_stream(&bytes),
            Ok(Some((
                ConnectStreamEvent::Close {
                    code: 4001,
                    reason: "slow".into()
                },
                bytes.len()
            )))
        );
        let mut reader = BufferReader::new(&bytes);
        let frame = Frame::read_from_buffer(&mut reader).expect("frame").expect("complete");
        let capsule = wtransport_proto::capsule::Capsule::with_frame(&frame).expect("capsule");
        let close =
            wtransport_proto::capsule::capsules::CloseWebTransportSession::with_capsule(&capsule).expect("close");
        assert_eq!(close.error_code().into_inner(), 4001);
        assert_eq!(close.reason(), "slow");
        let long = "é".repeat(600);
        let cut = close_capsule(1, &long);
        assert!(cut.len() < 1024 + 16, "the reason is cut to 1,024 bytes");
    }
}
