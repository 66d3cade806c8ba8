//! A publish request's parts a publisher controls: the `Idempotency-Key`, the scope its
//! credentials allow, and a `POST /v1/publish` batch checked item by item before any is published.

use courtside_core::{JsonData, Kind, RoomName};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::tokens::RoomPattern;

/// Longest idempotency key accepted (the draft leaves it to the server).
pub const MAX_KEY_LEN: usize = 255;

/// The header is not a usable key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters")]
pub struct BadKey;

/// A publisher's idempotency key (draft-ietf-httpapi-idempotency-key-header).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The header's value (HTTP trims the spaces around it): 1 to 255 visible ASCII characters;
    /// the draft's structured-field string form (`"..."`, three or more characters) is unquoted.
    pub fn parse(value: &[u8]) -> Result<Self, BadKey> {
        let text = std::str::from_utf8(value).map_err(|_| BadKey)?.trim();
        if text.is_empty() || text.len() > MAX_KEY_LEN || !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(BadKey);
        }
        let text = match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
            Some(quoted) if !quoted.is_empty() => quoted,
            _ => text,
        };
        Ok(Self(text.to_string()))
    }

    /// A batch item's key, scoped under the batch so it cannot collide with a request's key.
    pub fn for_item(item_key: &str) -> Result<Self, BadKey> {
        let key = Self::parse(item_key.as_bytes())?;
        Ok(Self(format!("item:{}", key.0)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a publish request's credentials allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishScope {
    /// The publish token: every room.
    Everything,
    /// A JWT's `publish` claim.
    Rooms(Vec<RoomPattern>),
}

/// A room outside the publish claim of the request's JWT (403 `forbidden`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the token's publish claim does not allow {0:?}")]
pub struct OutOfScope(pub String);

impl PublishScope {
    pub fn allows(&self, room: &str) -> bool {
        match self {
            Self::Everything => true,
            Self::Rooms(patterns) => patterns.iter().any(|p| p.matches(room)),
        }
    }

    /// `allows`, as a typed refusal naming the room.
    pub fn check(&self, room: &str) -> Result<(), OutOfScope> {
        if self.allows(room) {
            Ok(())
        } else {
            Err(OutOfScope(room.to_string()))
        }
    }
}

/// Which documented API error refuses a batch (docs/openapi.yaml's error codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchRefusal {
    /// `bad_batch`: not a batch, or too few or too many items.
    BadBatch,
    /// `bad_room`: an item's room name.
    BadRoom,
    /// `forbidden`: an item's room is outside the JWT's publish claim.
    Forbidden,
    /// `bad_idempotency_key`: an item's `idempotency_key`.
    BadIdempotencyKey,
}

/// A refused batch: nothing in it is published. `message` names the first failing item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BatchError {
    pub refusal: BatchRefusal,
    pub message: String,
}

impl BatchError {
    fn new(refusal: BatchRefusal, message: String) -> Self {
        Self { refusal, message }
    }
}

#[derive(Deserialize)]
struct BatchItem<'a> {
    room: String,
    #[serde(rename = "type")]
    kind: Kind,
    #[serde(borrow)]
    data: &'a RawValue,
    /// This item's own idempotency key: a repeat of the item (in any batch, within the window)
    /// gets its first result and publishes nothing.
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Deserialize)]
struct Batch<'a> {
    #[serde(borrow)]
    messages: Vec<BatchItem<'a>>,
}

/// A batch item that passed every check: publishable as it is.
#[derive(Debug)]
pub struct CheckedItem {
    pub room: RoomName,
    pub kind: Kind,
    pub data: JsonData,
    pub key: Option<IdempotencyKey>,
}

/// Reads a `POST /v1/publish` body and checks every item (room name, scope, idempotency key)
/// before any is published: the first failing item refuses the whole batch. Pure (fuzzed).
pub fn check_batch(
    body: &[u8],
    max_batch: usize,
    scope: Option<&PublishScope>,
) -> Result<Vec<CheckedItem>, BatchError> {
    let batch: Batch<'_> =
        serde_json::from_slice(body).map_err(|e| BatchError::new(BatchRefusal::BadBatch, e.to_string()))?;
    if batch.messages.is_empty() || batch.messages.len() > max_batch {
        let message = format!("a batch holds 1 to {max_batch} messages");
        return Err(BatchError::new(BatchRefusal::BadBatch, message));
    }
    let mut checked = Vec::with_capacity(batch.messages.len());
    for (i, item) in batch.messages.iter().enumerate() {
        let room = RoomName::parse(&item.room)
            .map_err(|e| BatchError::new(BatchRefusal::BadRoom, format!("messages[{i}]: {e}")))?;
        if let Some(scope) = scope {
            scope
                .check(room.as_str())
                .map_err(|e| BatchError::new(BatchRefusal::Forbidden, format!("messages[{i}]: {e}")))?;
        }
        let key = item
            .idempotency_key
            .as_deref()
            .map(IdempotencyKey::for_item)
            .transpose()
            .map_err(|e| BatchError::new(BatchRefusal::BadIdempotencyKey, format!("messages[{i}]: {e}")))?;
        checked.push(CheckedItem {
            room,
            kind: item.kind,
            data: JsonData::from_raw(item.data),
            key,
        });
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_visible_ascii_and_may_be_quoted() {
        assert_eq!(
            IdempotencyKey::parse(b"8e03978e-40d5").map(|k| k.0),
            Ok("8e03978e-40d5".into())
        );
        assert_eq!(IdempotencyKey::parse(br#""abc""#).map(|k| k.0), Ok("abc".into()));
        // Exactly what the schema's pattern says: `""` is a key of two quotes, a space is refused.
        assert_eq!(IdempotencyKey::parse(br#""""#).map(|k| k.0), Ok(r#""""#.into()));
        for bad in [&b""[..], b"a b", b"a\x01b", &[b'a'; 256][..], b"\xff"] {
            assert_eq!(IdempotencyKey::parse(bad), Err(BadKey), "{bad:?}");
        }
        assert_eq!(IdempotencyKey::for_item("x").map(|k| k.0), Ok("item:x".into()));
    }

    #[test]
    fn a_batch_is_refused_at_its_first_failing_item_with_the_documented_error() {
        let refusal = |body: &str, scope: Option<&PublishScope>| {
            check_batch(body.as_bytes(), 2, scope)
                .map(|items| items.len())
                .map_err(|e| (e.refusal, e.message))
        };
        let one = r#"{"messages":[{"room":"game:1","type":"event","data":{"s":1},"idempotency_key":"k"}]}"#;
        assert_eq!(refusal(one, None), Ok(1));
        assert_eq!(refusal("[]", None).map_err(|e| e.0), Err(BatchRefusal::BadBatch));
        assert_eq!(
            refusal(r#"{"messages":[]}"#, None).map_err(|e| e.0),
            Err(BatchRefusal::BadBatch)
        );
        let bad_room =
            r#"{"messages":[{"room":"game:1","type":"event","data":1},{"room":"","type":"event","data":1}]}"#;
        assert!(matches!(refusal(bad_room, None), Err((BatchRefusal::BadRoom, m)) if m.starts_with("messages[1]")));
        let scope = PublishScope::Rooms(vec![RoomPattern::new("league:*")]);
        assert!(matches!(refusal(one, Some(&scope)), Err((BatchRefusal::Forbidden, m)) if m.contains("game:1")));
        let bad_key = r#"{"messages":[{"room":"game:1","type":"event","data":1,"idempotency_key":"a b"}]}"#;
        assert_eq!(
            refusal(bad_key, None).map_err(|e| e.0),
            Err(BatchRefusal::BadIdempotencyKey)
        );
    }
}
