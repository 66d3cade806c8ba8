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
    let (body, _appended) =
        postcard::take_from_bytes(&rest[epoch_len..]).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
    Ok(Envelope { number, epoch, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> EnvelopeBody<'static> {
        EnvelopeBody {
            kind: crate::core::Kind::Event.to_byte(),
            ts: 1_700_000_000_000,
            data: r#"{"a":1}"#,
            origin: "n1",
            provisional: Some(12),
        }
    }

    #[test]
    fn round_trips_and_matches_the_documented_layout() {
        let bytes = encode(300, "ep", &body());
        assert_eq!(&bytes[..12], &[1, 0, 0, 0, 0, 0, 0, 1, 44, 2, b'e', b'p']);
        // The body: kind 01, ts varint, data, origin, provisional Some(12).
        assert_eq!(&bytes[12..14], &[0x01, 0x80]);
        assert!(bytes.ends_with(&[0x02, b'n', b'1', 0x01, 0x0c]));
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
    fn bad_envelopes_are_errors() {
        assert_eq!(decode(&[]), Err(EnvelopeError::Short));
        assert_eq!(decode(&[2, 0]), Err(EnvelopeError::Version(2)));
        assert_eq!(decode(&[1, 0, 0]), Err(EnvelopeError::Short));
        assert!(decode(&[1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0x09]).is_err());
    }
}
