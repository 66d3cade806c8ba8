//! The test client's WebTransport encoding, written from docs/PROTOCOL.md ("Encoding", "Message
//! types") alone and checked against docs/test-vectors.json: a second implementation, so a bug
//! in the server's codec shows up as a disagreement instead of cancelling itself out.

use serde_json::{json, Value};

/// Why bytes from the server are not a message PROTOCOL.md describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn fail<T>(what: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(what.into()))
}

/// Unsigned LEB128: 7 bits a byte, least significant first, the high bit on all but the last.
pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_string(out: &mut Vec<u8>, text: &str) {
    put_varint(out, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}

/// The fields of one message, read in order.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, DecodeError> {
        let (&first, rest) = self.bytes.split_first().ok_or(DecodeError("cut short".into()))?;
        self.bytes = rest;
        Ok(first)
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value: u64 = 0;
        for i in 0..10 {
            let byte = self.byte()?;
            let bits = u64::from(byte & 0x7f);
            if i == 9 && bits > 1 {
                return fail("a varint above 64 bits");
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        fail("a varint longer than 10 bytes")
    }

    fn u16(&mut self) -> Result<u64, DecodeError> {
        let value = self.varint()?;
        if value > u64::from(u16::MAX) {
            return fail(format!("{value} is not a u16"));
        }
        Ok(value)
    }

    fn string(&mut self) -> Result<&'a str, DecodeError> {
        let len = usize::try_from(self.varint()?).map_err(|_| DecodeError("a huge string".into()))?;
        if self.bytes.len() < len {
            return fail("a string cut short");
        }
        let (text, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        std::str::from_utf8(text).map_err(|_| DecodeError("a string that is not UTF-8".into()))
    }

    fn present(&mut self) -> Result<bool, DecodeError> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            other => fail(format!("an option or bool byte {other:#04x}")),
        }
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn end(self) -> Result<(), DecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            fail(format!("{} bytes after the last field", self.bytes.len()))
        }
    }
}

/// A server message in the JSON form of the WebSocket protocol (PROTOCOL.md's field names, `data`
/// as the published JSON text). `alias` messages come out as `{"type":"alias","room","alias"}`
/// and states by alias (`0x22`) as `{"type":"state","alias",...}`.
pub fn decode_server(bytes: &[u8]) -> Result<Value, DecodeError> {
    let mut r = Reader { bytes };
    let kind = r.byte()?;
    let message = match kind {
        0x10 => {
            let (room, epoch, version, seq) = (r.string()?, r.string()?, r.varint()?, r.varint()?);
            let mut m = json!({"type": "subscribed", "room": room, "epoch": epoch, "version": version, "seq": seq});
            if r.present()? {
                m["recovered"] = r.present()?.into();
            }
            // The id is trailing: absent altogether unless the reply answers a subscribe with one.
            if !r.is_empty() && r.present()? {
                m["id"] = r.varint()?.into();
            }
            m
        }
        0x11 => json!({"type": "unsubscribed", "room": r.string()?}),
        0x12 => json!({"type": "pong"}),
        0x13 => {
            let (code, name, message) = (r.u16()?, r.string()?, r.string()?);
            let mut m = json!({"type": "error", "code": code, "name": name, "message": message});
            if r.present()? {
                m["room"] = r.string()?.into();
            }
            m
        }
        0x14 => json!({"type": "reconnect", "reason": r.string()?}),
        0x15 => json!({"type": "close", "code": r.u16()?, "reason": r.string()?}),
        0x16 => json!({"type": "alias", "room": r.string()?, "alias": r.varint()?}),
        0x17 => json!({"type": "authed", "sub": r.string()?, "exp": r.varint()?}),
        0x18 => {
            let (setting, datagrams, max) = (r.string()?, r.present()?, r.varint()?);
            json!({"type": "welcome", "state_datagrams": setting, "datagrams": datagrams, "max_datagram": max})
        }
        0x20 => {
            let (room, version, ts, data) = (r.string()?, r.varint()?, r.varint()?, r.string()?);
            json!({"type": "state", "room": room, "version": version, "ts": ts, "data": data})
        }
        0x21 => {
            let (room, seq, ts, data, id) = (r.string()?, r.varint()?, r.varint()?, r.string()?, r.string()?);
            json!({"type": "event", "room": room, "seq": seq, "id": id, "ts": ts, "data": data})
        }
        0x22 => {
            let (alias, version, ts, data) = (r.varint()?, r.varint()?, r.varint()?, r.string()?);
            json!({"type": "state", "alias": alias, "version": version, "ts": ts, "data": data})
        }
        0x23 => {
            let (room, version, base, ts, delta) = (r.string()?, r.varint()?, r.varint()?, r.varint()?, r.string()?);
            json!({"type": "delta", "room": room, "version": version, "base": base, "ts": ts, "delta": delta})
        }
        0x24 => {
            let (alias, version, base, ts, delta) = (r.varint()?, r.varint()?, r.varint()?, r.varint()?, r.string()?);
            json!({"type": "delta", "alias": alias, "version": version, "base": base, "ts": ts, "delta": delta})
        }
        other => return fail(format!("unknown server message type {other:#04x}")),
    };
    r.end()?;
    Ok(message)
}

fn field<'a>(m: &'a Value, key: &str) -> &'a Value {
    m.get(key).unwrap_or_else(|| panic!("{key} missing from {m}"))
}

fn u64_field(m: &Value, key: &str) -> u64 {
    field(m, key)
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a u64 in {m}"))
}

fn str_field<'a>(m: &'a Value, key: &str) -> &'a str {
    field(m, key)
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string in {m}"))
}

/// A client message, given in its JSON form (as a WebSocket client sends it; `ack` and `acks` as
/// in docs/test-vectors.json), in the binary encoding. Panics on a message this client cannot
/// express: that is a mistake in the test, not in the server.
pub fn encode_client(m: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    match str_field(m, "type") {
        "subscribe" => {
            out.push(0x01);
            put_string(&mut out, str_field(m, "room"));
            match m.get("since") {
                Some(since) => {
                    out.push(1);
                    put_varint(&mut out, since.as_u64().expect("since: a u64"));
                }
                None => out.push(0),
            }
            match m.get("epoch") {
                Some(epoch) => {
                    out.push(1);
                    put_string(&mut out, epoch.as_str().expect("epoch: a string"));
                }
                None => out.push(0),
            }
            // Trailing: a subscribe without an id ends before it; with a delta format the id
            // is written (absent: 00), then the format.
            match (m.get("id"), m.get("delta")) {
                (Some(id), _) => {
                    out.push(1);
                    put_varint(&mut out, id.as_u64().expect("id: a u64"));
                }
                (None, Some(_)) => out.push(0),
                (None, None) => {}
            }
            if let Some(delta) = m.get("delta") {
                out.push(1);
                put_string(&mut out, delta.as_str().expect("delta: a string"));
            }
        }
        "unsubscribe" => {
            out.push(0x02);
            put_string(&mut out, str_field(m, "room"));
        }
        "ping" => out.push(0x03),
        "hello" => out.push(0x07),
        "ack" => {
            out.push(0x04);
            put_string(&mut out, str_field(m, "room"));
            put_varint(&mut out, u64_field(m, "version"));
        }
        "acks" => {
            out.push(0x05);
            let acks = field(m, "acks").as_array().expect("acks: a list");
            put_varint(&mut out, acks.len() as u64);
            for ack in acks {
                put_varint(&mut out, u64_field(ack, "alias"));
                put_varint(&mut out, u64_field(ack, "version"));
            }
        }
        "auth" => {
            out.push(0x06);
            put_string(&mut out, str_field(m, "token"));
        }
        other => panic!("the test client cannot encode a {other:?} message"),
    }
    out
}

/// One message as it goes on the control stream: its length as a varint, then the message.
pub fn frame(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 3);
    put_varint(&mut out, message.len() as u64);
    out.extend_from_slice(message);
    out
}

/// Splits the control stream's bytes into messages, however they were chunked.
#[derive(Default)]
pub struct Frames {
    buffer: Vec<u8>,
}

impl Frames {
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next whole message, `None` until one has arrived.
    pub fn next(&mut self) -> Result<Option<Vec<u8>>, DecodeError> {
        let mut r = Reader { bytes: &self.buffer };
        let len = match r.varint() {
            Ok(len) => len,
            // A length cut short: wait for more (an over-long one is an error already).
            Err(_) if self.buffer.len() < 10 && self.buffer.iter().all(|b| b & 0x80 != 0) => return Ok(None),
            Err(error) => return Err(error),
        };
        let header = self.buffer.len() - r.bytes.len();
        let len = usize::try_from(len).map_err(|_| DecodeError("a huge frame".into()))?;
        if len > 16 << 20 {
            return fail(format!("a frame of {len} bytes"));
        }
        if r.bytes.len() < len {
            return Ok(None);
        }
        let message = self.buffer[header..header + len].to_vec();
        self.buffer.drain(..header + len);
        Ok(Some(message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn vectors() -> Value {
        serde_json::from_str(include_str!("../../../docs/test-vectors.json")).expect("test vectors are JSON")
    }

    /// Every WebTransport vector: client messages encode to their bytes, server messages decode
    /// to their fields, byte for byte and field for field.
    #[test]
    fn the_test_clients_codec_agrees_with_every_vector() {
        let vectors = vectors();
        let messages = vectors["webtransport"]["messages"].as_array().expect("messages");
        let (mut client, mut server) = (0, 0);
        for vector in messages {
            let (name, hex) = (
                vector["name"].as_str().expect("name"),
                vector["hex"].as_str().expect("hex"),
            );
            let message = &vector["message"];
            match vector["from"].as_str() {
                Some("client") => {
                    client += 1;
                    assert_eq!(encode_client(message), unhex(hex), "encoding {name}");
                }
                Some("server") => {
                    server += 1;
                    assert_eq!(decode_server(&unhex(hex)).as_ref(), Ok(message), "decoding {name}");
                }
                other => panic!("{name}: from {other:?}"),
            }
        }
        assert!(
            client >= 9 && server >= 15,
            "{client} client and {server} server vectors"
        );
    }

    /// `accepted`: an optional trailing field written out as absent decodes as left off.
    #[test]
    fn the_test_clients_codec_takes_explicitly_absent_trailing_fields() {
        let vectors = vectors();
        for vector in vectors["webtransport"]["accepted"].as_array().expect("accepted") {
            if vector["from"] == "server" {
                let hex = vector["hex"].as_str().expect("hex");
                assert_eq!(
                    decode_server(&unhex(hex)).as_ref(),
                    Ok(&vector["message"]),
                    "{}",
                    vector["name"]
                );
            }
        }
    }

    #[test]
    fn the_test_clients_framing_agrees_with_the_vectors_in_any_chunks() {
        let vectors = vectors();
        for vector in vectors["webtransport"]["framing"].as_array().expect("framing") {
            let messages: Vec<Vec<u8>> = vector["messages_hex"]
                .as_array()
                .expect("messages_hex")
                .iter()
                .map(|m| unhex(m.as_str().expect("hex")))
                .collect();
            let stream: Vec<u8> = messages.iter().flat_map(|m| frame(m)).collect();
            assert_eq!(stream, unhex(vector["stream_hex"].as_str().expect("stream_hex")));
            for chunk in [1, 2, 3, stream.len()] {
                let (mut frames, mut out) = (Frames::default(), Vec::new());
                for piece in stream.chunks(chunk) {
                    frames.extend(piece);
                    while let Some(message) = frames.next().expect("a frame") {
                        out.push(message);
                    }
                }
                assert_eq!(out, messages, "chunks of {chunk}");
            }
        }
    }

    #[test]
    fn malformed_server_messages_are_errors() {
        for bad in [
            "",
            "7f",
            "20",
            "1200",
            "1101ff",
            "110161ff",
            "15a1",
            "15ffff0700",
            "100161016500000002",
        ] {
            assert!(decode_server(&unhex(bad)).is_err(), "{bad} decoded");
        }
        let mut frames = Frames::default();
        frames.extend(&[0xff; 11]);
        assert!(frames.next().is_err());
    }
}
