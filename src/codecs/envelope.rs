//! The message nodes exchange through Redis: a version byte, the number the publish script
//! assigned and the room's epoch (written by the script), then a postcard body (written by the
//! publishing node). Pure.

use serde::{Deserialize, Serialize};

/// Current envelope version. Newer versions may only append fields to the body, so that nodes
/// of two adjacent versions read each other's messages during a rolling deploy.
pub const VERSION: u8 = 1;

/// The part the publishing node encodes (postcard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeBody<'a> {
    /// `Kind::to_byte`: 0 state, 1 event.
    pub kind: u8,
    /// Ingest time, ms since the Unix epoch.
    pub ts: u64,
    /// The published JSON value, as text.
    pub data: &'a str,
    /// The node that accepted the publish.
    pub origin: &'a str,
    /// The number the origin already delivered to its own clients while Redis was down.
    pub provisional: Option<u64>,
    /// An event's identity (`EventId`), assigned by the origin; 0 for a state. Appended in
    /// 0.2: an envelope from an older node has none, and gets `legacy_event_id`.
    pub event_id: u64,
}

/// The body as nodes before event ids wrote it.
#[derive(Deserialize)]
struct LegacyBody<'a> {
    kind: u8,
    ts: u64,
    data: &'a str,
    origin: &'a str,
    provisional: Option<u64>,
}

/// An id for an event from a node that assigned none, the same on every node that reads it
/// (FNV-1a of the epoch and the sequence), so that they agree on it.
pub fn legacy_event_id(epoch: &str, seq: u64) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in epoch.bytes().chain(seq.to_be_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// A decoded envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub number: u64,
    pub epoch: &'a str,
    pub body: EnvelopeBody<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope too short")]
    Short,
    #[error("unsupported envelope version {0}")]
    Version(u8),
    #[error("malformed envelope: {0}")]
    Malformed(String),
}

/// Encodes the body the publish script prefixes with the header.
pub fn encode_body(body: &EnvelopeBody<'_>) -> Vec<u8> {
    // Serialising strings and integers into a Vec cannot fail.
    postcard::to_stdvec(body).unwrap_or_default()
}

/// Builds a whole envelope, as the publish script does (for tests and tools).
pub fn encode(number: u64, epoch: &str, body: &EnvelopeBody<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + epoch.len() + body.data.len());
    out.push(VERSION);
    out.extend_from_slice(&number.to_be_bytes());
    out.push(epoch.len().min(255) as u8);
    out.extend_from_slice(&epoch.as_bytes()[..epoch.len().min(255)]);
    out.extend_from_slice(&encode_body(body));
    out
}

/// Decodes an envelope. Fields appended by a newer version are ignored.
pub fn decode(bytes: &[u8]) -> Result<Envelope<'_>, EnvelopeError> {
    let (&version, rest) = bytes.split_first().ok_or(EnvelopeError::Short)?;
    if version != VERSION {
        return Err(EnvelopeError::Version(version));
    }
    if rest.len() < 9 {
        return Err(EnvelopeError::Short);
    }
    let number = u64::from_be_bytes(rest[..8].try_into().map_err(|_| EnvelopeError::Short)?);
    let epoch_len = rest[8] as usize;
    let rest = &rest[9..];
    if rest.len() < epoch_len {
        return Err(EnvelopeError::Short);
    }
    let epoch = std::str::from_utf8(&rest[..epoch_len]).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
    let body = match postcard::take_from_bytes::<EnvelopeBody<'_>>(&rest[epoch_len..]) {
        Ok((body, _appended)) => body,
        Err(_) => {
            let (old, _): (LegacyBody<'_>, _) =
                postcard::take_from_bytes(&rest[epoch_len..]).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
            EnvelopeBody {
                kind: old.kind,
                ts: old.ts,
                data: old.data,
                origin: old.origin,
                provisional: old.provisional,
                event_id: if old.kind == courtside_core::Kind::Event.to_byte() {
                    legacy_event_id(epoch, number)
                } else {
                    0
                },
            }
        }
    };
    Ok(Envelope { number, epoch, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> EnvelopeBody<'static> {
        EnvelopeBody {
            kind: courtside_core::Kind::Event.to_byte(),
            ts: 1_700_000_000_000,
            data: r#"{"a":1}"#,
            origin: "n1",
            provisional: Some(12),
            event_id: 0x0102,
        }
    }

    #[test]
    fn round_trips_and_matches_the_documented_layout() {
        let bytes = encode(300, "ep", &body());
        assert_eq!(&bytes[..12], &[1, 0, 0, 0, 0, 0, 0, 1, 44, 2, b'e', b'p']);
        // The body: kind 01, ts varint, data, origin, provisional Some(12), event id varint.
        assert_eq!(&bytes[12..14], &[0x01, 0x80]);
        assert!(bytes.ends_with(&[0x02, b'n', b'1', 0x01, 0x0c, 0x82, 0x02]));
        assert_eq!(
            decode(&bytes),
            Ok(Envelope {
                number: 300,
                epoch: "ep",
                body: body()
            })
        );
    }

    #[test]
    fn fields_appended_by_a_newer_node_are_ignored() {
        let mut bytes = encode(1, "e", &body());
        bytes.extend_from_slice(&[0x05, 0x06]);
        assert_eq!(decode(&bytes).map(|e| e.number), Ok(1));
    }

    #[test]
    fn an_envelope_from_a_node_without_event_ids_gets_the_same_id_on_every_node() {
        let mut bytes = encode(7, "ep", &body());
        bytes.truncate(bytes.len() - 2);
        let decoded = decode(&bytes).expect("legacy envelope");
        assert_eq!(decoded.body.event_id, legacy_event_id("ep", 7));
        assert_ne!(legacy_event_id("ep", 7), legacy_event_id("ep", 8));
        assert_ne!(legacy_event_id("ep", 7), legacy_event_id("eq", 7));
    }

    #[test]
    fn bad_envelopes_are_errors() {
        assert_eq!(decode(&[]), Err(EnvelopeError::Short));
        assert_eq!(decode(&[2, 0]), Err(EnvelopeError::Version(2)));
        assert_eq!(decode(&[1, 0, 0]), Err(EnvelopeError::Short));
        assert!(decode(&[1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0x09]).is_err());
    }
}
