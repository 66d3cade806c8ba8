//! A published state update or event, encoded once for the wire at publish time.
//! Every subscriber receives a clone of the same `Arc<Publication>`; nothing is re-encoded per delivery.

use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use serde_json::value::RawValue;

use super::kind::Kind;
use super::room_name::RoomName;
use super::time::Now;

/// Identifies one incarnation of a room on this node; cheaper to hash than its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(pub u64);

/// An event's identity, assigned once when a node accepts the publish and carried with it
/// everywhere (both transports, the history, Redis): it survives renumbering, so a client drops
/// what it already holds by `id` (docs/PROTOCOL.md, "Event identity"). Shown as 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(pub u64);

impl EventId {
    /// Parses the 16 lowercase hex digits `Display` writes.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != 16 || !text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return None;
        }
        u64::from_str_radix(text, 16).ok().map(Self)
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Hands out event ids: a random start per process, then one after another, so that ids from
/// different nodes and runs do not meet in practice and taking one costs an atomic add.
#[derive(Debug)]
pub struct EventIds(std::sync::atomic::AtomicU64);

impl EventIds {
    pub fn starting_at(seed: u64) -> Self {
        Self(std::sync::atomic::AtomicU64::new(seed))
    }

    pub fn next(&self) -> EventId {
        EventId(self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

/// A JSON value as the publisher sent it, checked for syntax and kept byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonData(Box<str>);

/// The published body is not one JSON value.
#[derive(Debug, thiserror::Error)]
#[error("body is not valid JSON: {0}")]
pub struct JsonDataError(#[from] serde_json::Error);

impl JsonData {
    pub fn parse(bytes: &[u8]) -> Result<Self, JsonDataError> {
        let raw: &RawValue = serde_json::from_slice(bytes)?;
        Ok(Self(raw.get().into()))
    }

    /// Wraps an already-validated raw value (from a larger parsed document).
    pub fn from_raw(raw: &RawValue) -> Self {
        Self(raw.get().into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One published message with its WebSocket JSON frame already built.
#[derive(Debug)]
pub struct Publication {
    pub room_id: RoomId,
    pub room: RoomName,
    pub kind: Kind,
    /// The state's version or the event's sequence number.
    pub number: u64,
    /// An event's identity (`None` for states, which are conflated, not identified).
    pub id: Option<EventId>,
    /// Ingest time sent to clients as `ts`.
    pub ts_ms: u64,
    /// Ingest instant, for the publish-to-send latency histogram.
    pub published_at: Instant,
    /// The complete `{"type":"state",...}` or `{"type":"event",...}` text frame.
    json: Box<str>,
    /// Where the published data sits inside `json`, so it is stored once.
    data: Range<usize>,
    /// The binary WebTransport message, built the first time a WebTransport subscriber needs it.
    wire: OnceLock<Bytes>,
    /// A state's whole QUIC datagram payload for a session on the client's first stream.
    datagram: OnceLock<Bytes>,
    /// `json` as a permessage-deflate payload (`None`: compressing did not make it smaller),
    /// built the first time a WebSocket subscriber that negotiated deflate needs it.
    deflated: OnceLock<Option<Box<[u8]>>>,
    /// What a state that may go as a delta needs (a state of at least
    /// `delta::MIN_STATE_BYTES` that followed another); boxed, so that events and small states
    /// pay one pointer for it.
    delta: Option<Box<DeltaSlot>>,
}

/// A state's delta against the room's previous state, made on first need.
#[derive(Debug)]
struct DeltaSlot {
    /// The previous state's version.
    base_version: u64,
    /// The previous state, kept only until the delta is made or the next state replaces this
    /// one: a room holds at most two states' data, never a chain.
    base: Mutex<Option<Arc<Publication>>>,
    /// The delta, made once by the first subscriber that needs it and shared by all (`None`:
    /// not smaller than the state, or the base was let go first).
    made: OnceLock<Option<StateDelta>>,
}

/// A state as the change from the room's previous state (docs/PROTOCOL.md, "Delta states"), in
/// the forms each transport sends, encoded once per publish.
#[derive(Debug)]
pub struct StateDelta {
    /// The version the delta applies to.
    pub base: u64,
    /// The WebSocket text frame `{"type":"delta",...}`.
    json: Box<str>,
    /// The WebTransport stream message (`0x23`).
    wire: Bytes,
    /// The WebTransport datagram message (`0x24`, the room by alias).
    aliased: Bytes,
    /// `aliased` as a whole datagram of a session on the client's first stream.
    session0: Bytes,
    /// The length of the whole state's JSON frame, which the compression threshold is taken
    /// against (a delta stands for that state).
    state_len: usize,
    /// `json` compressed for permessage-deflate, made once per publish and shared.
    deflated: OnceLock<Option<Box<[u8]>>>,
}

impl StateDelta {
    /// The WebSocket text frame, shared by every subscriber at the base version.
    pub fn json_frame(&self) -> &str {
        &self.json
    }

    /// The WebTransport stream message.
    pub fn wire_message(&self) -> &Bytes {
        &self.wire
    }

    /// `json_frame` compressed for permessage-deflate when the state it stands for holds at
    /// least `threshold` bytes (a small state, a game's score, gets no compression work; a delta
    /// of a large one, a bracket's, is compressed however short it is), once and shared, and
    /// only if compressing makes it smaller.
    pub fn deflated_frame(&self, threshold: usize) -> Option<&[u8]> {
        if self.state_len < threshold {
            return None;
        }
        deflated_once(&self.deflated, &self.json, 0)
    }

    /// The WebTransport datagram message (without the session prefix).
    pub fn aliased_message(&self) -> &Bytes {
        &self.aliased
    }

    /// The whole datagram for a session on the client's first stream (prefix `00`).
    pub fn session0_datagram(&self) -> &Bytes {
        &self.session0
    }
}

impl Publication {
    /// A state (`id: None`) or an event (`Some`) as published.
    pub fn new(
        room_id: RoomId,
        room: RoomName,
        kind: Kind,
        number: u64,
        id: Option<EventId>,
        data: &JsonData,
        now: Now,
    ) -> Self {
        let (json, data_range) = encode_json_frame(&room, kind, number, id, now.unix_ms, data);
        Self {
            room_id,
            room,
            kind,
            number,
            id,
            ts_ms: now.unix_ms,
            published_at: now.instant,
            json,
            data: data_range,
            wire: OnceLock::new(),
            datagram: OnceLock::new(),
            deflated: OnceLock::new(),
            delta: None,
        }
    }

    /// Lets this state go as a delta against `previous`, the room's state before it, when this
    /// one is `delta::MIN_STATE_BYTES` to `delta::MAX_STATE_BYTES` long (any other costs what it
    /// did before: nothing is kept and no delta is ever made).
    pub fn with_delta_base(mut self, previous: Option<&Arc<Publication>>) -> Self {
        let previous = previous.filter(|p| {
            self.kind == Kind::State
                && p.kind == Kind::State
                && p.number < self.number
                && (super::delta::MIN_STATE_BYTES..=super::delta::MAX_STATE_BYTES).contains(&self.data.len())
        });
        if let Some(previous) = previous {
            self.delta = Some(Box::new(DeltaSlot {
                base_version: previous.number,
                base: Mutex::new(Some(previous.clone())),
                made: OnceLock::new(),
            }));
        }
        self
    }

    /// The version this state's delta would apply to, if it may go as one.
    pub fn delta_base(&self) -> Option<u64> {
        self.delta.as_ref().map(|slot| slot.base_version)
    }

    /// Lets the previous state go (a newer state replaced this one): if this state's delta was
    /// not made by now, it will not be, and the state goes whole.
    pub fn release_delta_base(&self) {
        if let Some(slot) = &self.delta {
            slot.base.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
    }

    /// This state as a delta against `delta_base`, made on the first call and shared; `None`
    /// when there is no base (any more), the search ran out of its budget (`delta::budget`),
    /// the delta is not shorter than the data, or it is not UTF-8 (a copy boundary inside a
    /// multi-byte character: it must travel as text).
    pub fn delta(&self) -> Option<&StateDelta> {
        let slot = self.delta.as_ref()?;
        slot.made
            .get_or_init(|| {
                let base = slot.base.lock().unwrap_or_else(|p| p.into_inner()).take()?;
                let (from, to) = (base.data().as_bytes(), self.data().as_bytes());
                let bytes = super::delta::create_within(from, to, super::delta::budget(from, to))?;
                drop(base);
                let text = String::from_utf8(bytes).ok()?;
                if text.len() >= self.data.len() {
                    return None;
                }
                Some(self.encode_delta(slot.base_version, &text))
            })
            .as_ref()
    }

    fn encode_delta(&self, base: u64, delta: &str) -> StateDelta {
        let mut json = String::with_capacity(96 + self.room.as_str().len() + delta.len());
        json.push_str("{\"type\":\"delta\",\"room\":\"");
        json.push_str(self.room.as_str());
        json.push_str("\",\"version\":");
        push_u64(&mut json, self.number);
        json.push_str(",\"base\":");
        push_u64(&mut json, base);
        json.push_str(",\"ts\":");
        push_u64(&mut json, self.ts_ms);
        json.push_str(",\"delta\":");
        // Serialising a string cannot fail.
        json.push_str(&serde_json::to_string(delta).unwrap_or_default());
        json.push('}');
        let aliased = super::wire::encode_aliased_delta(self.room_id.0, self.number, base, self.ts_ms, delta);
        let mut session0 = Vec::with_capacity(1 + aliased.len());
        session0.push(0x00);
        session0.extend_from_slice(&aliased);
        StateDelta {
            base,
            json: json.into_boxed_str(),
            wire: super::wire::encode_delta(&self.room, self.number, base, self.ts_ms, delta),
            aliased,
            session0: Bytes::from(session0),
            state_len: self.json.len(),
            deflated: OnceLock::new(),
        }
    }

    /// The WebSocket text frame, shared by every subscriber.
    pub fn json_frame(&self) -> &str {
        &self.json
    }

    /// The WebSocket text frame to write: the delta's when `as_delta` and there is one (the
    /// queue said the connection holds its base), else the whole state's.
    pub fn json_frame_or_delta(&self, as_delta: bool) -> &str {
        match as_delta.then(|| self.delta()).flatten() {
            Some(delta) => delta.json_frame(),
            None => &self.json,
        }
    }

    /// The WebSocket text frame's payload compressed for permessage-deflate (RFC 7692, no
    /// context takeover), when the frame holds at least `threshold` bytes and compressing makes
    /// it smaller: compressed once, the first time a subscriber asks, and shared by every
    /// subscriber. A frame under `threshold` costs one comparison. (`threshold` is the node's one
    /// `--ws-compress-threshold`, the same on every call.)
    pub fn deflated_frame(&self, threshold: usize) -> Option<&[u8]> {
        deflated_once(&self.deflated, &self.json, threshold)
    }

    /// The binary WebTransport message (docs/PROTOCOL.md), encoded once and shared.
    pub fn wire_message(&self) -> &Bytes {
        self.wire.get_or_init(|| {
            super::wire::encode_publication(&self.room, self.kind, self.number, self.id, self.ts_ms, self.data())
        })
    }

    /// A state's aliased datagram message (`0x22`: the room by its alias, which is its `RoomId`).
    pub fn aliased_message(&self) -> Bytes {
        super::wire::encode_aliased_state(self.room_id.0, self.number, self.ts_ms, self.data())
    }

    /// A state's whole QUIC datagram payload for a WebTransport session opened on the client's
    /// first stream, as nearly all are: the quarter stream ID `00` (RFC 9297), then the aliased
    /// message. Encoded once and shared by every such session.
    pub fn session0_datagram(&self) -> &Bytes {
        self.datagram.get_or_init(|| {
            let message = self.aliased_message();
            let mut datagram = Vec::with_capacity(1 + message.len());
            datagram.push(0x00);
            datagram.extend_from_slice(&message);
            Bytes::from(datagram)
        })
    }

    /// The state version or the event sequence number.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// The published JSON value, unchanged.
    pub fn data(&self) -> &str {
        &self.json[self.data.clone()]
    }

    /// Bytes this publication holds, for queue and history bounds.
    pub fn size(&self) -> usize {
        self.json.len()
    }
}

/// `json` compressed for permessage-deflate, made once into `cell` and shared, when it holds at
/// least `threshold` bytes and compressing makes it smaller.
/// (A boxed slice, not `Bytes`: every publication carries the cell, most never fill it, and
/// the slice costs 16 bytes where `Bytes` costs 32.)
fn deflated_once<'a>(cell: &'a OnceLock<Option<Box<[u8]>>>, json: &str, threshold: usize) -> Option<&'a [u8]> {
    if json.len() < threshold {
        return None;
    }
    cell.get_or_init(|| {
        super::deflate::compress_message(json.as_bytes())
            .filter(|compressed| compressed.len() < json.len())
            .map(Vec::into_boxed_slice)
    })
    .as_deref()
}

/// Builds `{"type":"state","room":R,"version":V,"ts":T,"data":D}` (or the event form, with
/// `"id":I` after `seq`). Room names and ids need no JSON escaping.
fn encode_json_frame(
    room: &RoomName,
    kind: Kind,
    counter: u64,
    id: Option<EventId>,
    ts_ms: u64,
    data: &JsonData,
) -> (Box<str>, Range<usize>) {
    let data = data.as_str();
    let mut out = String::with_capacity(64 + room.as_str().len() + data.len());
    let (type_name, counter_name) = (kind.as_str(), kind.number_name());
    out.push_str("{\"type\":\"");
    out.push_str(type_name);
    out.push_str("\",\"room\":\"");
    out.push_str(room.as_str());
    out.push_str("\",\"");
    out.push_str(counter_name);
    out.push_str("\":");
    push_u64(&mut out, counter);
    if let Some(id) = id {
        use std::fmt::Write;
        let _ = write!(out, ",\"id\":\"{id}\"");
    }
    out.push_str(",\"ts\":");
    push_u64(&mut out, ts_ms);
    out.push_str(",\"data\":");
    let start = out.len();
    out.push_str(data);
    let end = out.len();
    out.push('}');
    (out.into_boxed_str(), start..end)
}

fn push_u64(out: &mut String, n: u64) {
    use std::fmt::Write;
    let _ = write!(out, "{n}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now(ms: u64) -> Now {
        Now {
            unix_ms: ms,
            instant: Instant::now(),
        }
    }

    #[test]
    fn state_frame_matches_protocol_vector() {
        let room = RoomName::parse("game:1234").expect("room");
        let data = JsonData::parse(br#"{"home":42,"away":40}"#).expect("json");
        let p = Publication::new(RoomId(1), room, Kind::State, 7, None, &data, now(1_700_000_000_000));
        assert_eq!(
            p.json_frame(),
            r#"{"type":"state","room":"game:1234","version":7,"ts":1700000000000,"data":{"home":42,"away":40}}"#
        );
        assert_eq!(p.data(), r#"{"home":42,"away":40}"#);
        let parsed: serde_json::Value = serde_json::from_str(p.json_frame()).expect("valid json");
        assert_eq!(parsed["data"]["home"], 42);
    }

    #[test]
    fn the_deflated_frame_matches_protocol_vector_and_is_made_once() {
        let room = RoomName::parse("game:1234").expect("room");
        let data = JsonData::parse(br#"{"home":42,"away":40}"#).expect("json");
        let p = Publication::new(RoomId(1), room, Kind::State, 7, None, &data, now(1_700_000_000_000));
        assert_eq!(
            p.deflated_frame(p.size() + 1),
            None,
            "under the threshold: not compressed"
        );
        let compressed = p.deflated_frame(0).expect("compressed");
        // The whole frame: FIN, RSV1 and text (0xc1), the length, the payload.
        let mut frame = vec![0xc1, compressed.len() as u8];
        frame.extend_from_slice(compressed);
        let hex: String = frame.iter().map(|b| format!("{b:02x}")).collect();
        let protocol = include_str!("../../docs/PROTOCOL.md");
        assert!(
            protocol.contains(&hex),
            "PROTOCOL.md's permessage-deflate vector: {hex}"
        );
        assert!(
            std::ptr::eq(compressed, p.deflated_frame(0).expect("again")),
            "compressed once"
        );
        let mut inflater = crate::deflate::MessageInflater::new(1000);
        inflater.push(compressed).expect("inflate");
        assert_eq!(inflater.finish().expect("finish"), p.json_frame().as_bytes());
    }

    #[test]
    fn a_state_datagram_is_quarter_stream_id_0_then_the_state_by_its_alias() {
        let room = RoomName::parse("game:1234").expect("room");
        let data = JsonData::parse(br#"{"home":42,"away":40}"#).expect("json");
        let p = Publication::new(RoomId(17), room, Kind::State, 7, None, &data, now(1_700_000_000_000));
        let hex: String = p.session0_datagram().iter().map(|b| format!("{b:02x}")).collect();
        // PROTOCOL.md's vector "state by alias (datagram)", after the prefix 00.
        assert_eq!(hex, "0022110780d095ffbc31157b22686f6d65223a34322c2261776179223a34307d");
        assert_eq!(&p.session0_datagram()[1..], &p.aliased_message()[..]);
    }

    #[test]
    fn event_frame_matches_protocol_vector() {
        let room = RoomName::parse("bracket:77").expect("room");
        let data = JsonData::parse(br#" "semifinal" "#).expect("json");
        let p = Publication::new(
            RoomId(2),
            room,
            Kind::Event,
            3,
            Some(EventId(0x3f9c0a51d2e4b771)),
            &data,
            now(5),
        );
        assert_eq!(
            p.json_frame(),
            r#"{"type":"event","room":"bracket:77","seq":3,"id":"3f9c0a51d2e4b771","ts":5,"data":"semifinal"}"#
        );
    }

    #[test]
    fn event_ids_are_16_hex_digits_both_ways_and_follow_one_another() {
        let ids = EventIds::starting_at(0xfff);
        let (a, b) = (ids.next(), ids.next());
        assert_eq!(
            (a.to_string().as_str(), b.to_string().as_str()),
            ("0000000000000fff", "0000000000001000")
        );
        assert_eq!(EventId::parse(&a.to_string()), Some(a));
        for bad in [
            "",
            "fff",
            "0000000000000FFF",
            "000000000000000g",
            "00000000000000000",
            "+000000000000fff",
        ] {
            assert_eq!(EventId::parse(bad), None, "{bad}");
        }
    }

    fn bracket_state(version: u64, score: u64, previous: Option<&Arc<Publication>>) -> Arc<Publication> {
        let matches: Vec<String> = (0..60)
            .map(|i| format!(r#"{{"id":{i},"score":{}}}"#, if i == 3 { score } else { i }))
            .collect();
        let data = JsonData::parse(format!("[{}]", matches.join(",")).as_bytes()).expect("json");
        let room = RoomName::parse("bracket:1").expect("room");
        Arc::new(Publication::new(RoomId(1), room, Kind::State, version, None, &data, now(1)).with_delta_base(previous))
    }

    #[test]
    fn a_large_state_has_one_delta_against_the_previous_state_until_it_lets_the_base_go() {
        let v1 = bracket_state(1, 0, None);
        let v2 = bracket_state(2, 78, Some(&v1));
        assert!(v1.data().len() >= crate::delta::MIN_STATE_BYTES);
        assert_eq!((v1.delta_base(), v2.delta_base()), (None, Some(1)));
        let delta = v2.delta().expect("a delta");
        assert!(std::ptr::eq(delta, v2.delta().expect("the same delta")), "made once");
        assert_eq!(delta.base, 1);
        let applied = crate::delta::apply(
            v1.data().as_bytes(),
            extract_delta(delta.json_frame()).as_bytes(),
            1 << 20,
        );
        assert_eq!(applied.as_deref(), Ok(v2.data().as_bytes()));
        assert_eq!(v2.json_frame_or_delta(true), delta.json_frame());
        assert_eq!(v2.json_frame_or_delta(false), v2.json_frame());
        // A newer state replaced v3 before anyone needed its delta: v3 goes whole.
        let v3 = bracket_state(3, 80, Some(&v2));
        v3.release_delta_base();
        assert!(v3.delta().is_none());
        assert_eq!(v3.json_frame_or_delta(true), v3.json_frame());
        // Small states keep no base at all.
        let data = JsonData::parse(br#"{"home":1}"#).expect("json");
        let small = Publication::new(
            RoomId(2),
            RoomName::parse("game:1").expect("room"),
            Kind::State,
            2,
            None,
            &data,
            now(1),
        )
        .with_delta_base(Some(&v1));
        assert_eq!(small.delta_base(), None);
    }

    #[test]
    fn a_delta_is_compressed_by_the_size_of_the_state_it_stands_for() {
        let v1 = bracket_state(1, 0, None);
        let v2 = bracket_state(2, 78, Some(&v1));
        let delta = v2.delta().expect("a delta");
        let state_len = v2.json_frame().len();
        assert!(delta.json_frame().len() < state_len);
        // A threshold between the delta's length and the state's: the delta goes compressed,
        // although it is shorter than the threshold.
        let threshold = state_len;
        assert!(delta.json_frame().len() < threshold);
        let compressed = delta.deflated_frame(threshold).expect("compressed");
        assert!(compressed.len() < delta.json_frame().len());
        assert!(
            std::ptr::eq(compressed, delta.deflated_frame(threshold).expect("again")),
            "compressed once"
        );
        let mut inflater = crate::deflate::MessageInflater::new(1 << 16);
        inflater.push(compressed).expect("inflate");
        assert_eq!(inflater.finish().expect("finish"), delta.json_frame().as_bytes());
        // A state under the threshold: its delta is not compressed either.
        assert_eq!(delta.deflated_frame(state_len + 1), None);
    }

    fn extract_delta(frame: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(frame).expect("json");
        assert_eq!(v["type"], "delta");
        v["delta"].as_str().expect("delta").to_string()
    }

    #[test]
    fn data_is_kept_byte_for_byte() {
        let data = JsonData::parse(br#"{"b": 1.50, "a":[ 1,2 ]}"#).expect("json");
        assert_eq!(data.as_str(), r#"{"b": 1.50, "a":[ 1,2 ]}"#);
    }

    #[test]
    fn rejects_invalid_json() {
        assert!(JsonData::parse(b"{").is_err());
        assert!(JsonData::parse(b"1 2").is_err());
        assert!(JsonData::parse(b"").is_err());
        assert!(JsonData::parse(b"\xff").is_err());
    }
}
