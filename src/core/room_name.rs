//! Validated room names: the one place that decides what a room may be called.
//! Names travel unescaped in JSON frames, Redis keys and URLs, so the character set is narrow.

use std::fmt;
use std::sync::Arc;

/// Longest room name accepted, in bytes.
pub const MAX_ROOM_NAME_LEN: usize = 128;

/// A room name that passed [`RoomName::parse`]: 1 to 128 bytes of `A-Z a-z 0-9 : _ - .`
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

/// Why a string is not a room name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomNameError {
    #[error("room name is empty")]
    Empty,
    #[error("room name is longer than {MAX_ROOM_NAME_LEN} bytes")]
    TooLong,
    #[error("room name has a character outside A-Z a-z 0-9 : _ - .")]
    BadCharacter,
}

impl RoomName {
    /// Checks `name` against the documented rules (docs/PROTOCOL.md, "Rooms").
    pub fn parse(name: &str) -> Result<Self, RoomNameError> {
        if name.is_empty() {
            return Err(RoomNameError::Empty);
        }
        if name.len() > MAX_ROOM_NAME_LEN {
            return Err(RoomNameError::TooLong);
        }
        if !name.bytes().all(is_room_byte) {
            return Err(RoomNameError::BadCharacter);
        }
        Ok(Self(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_room_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-' | b'.')
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoomName({:?})", &*self.0)
    }
}

impl std::borrow::Borrow<str> for RoomName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_examples() {
        for name in [
            "game:1234",
            "league:12",
            "bracket:77",
            "team:301",
            "user:55",
            "a",
            "A-b_c.d:9",
        ] {
            assert_eq!(RoomName::parse(name).map(|r| r.to_string()), Ok(name.to_string()));
        }
        assert!(RoomName::parse(&"x".repeat(MAX_ROOM_NAME_LEN)).is_ok());
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(RoomName::parse(""), Err(RoomNameError::Empty));
        assert_eq!(
            RoomName::parse(&"x".repeat(MAX_ROOM_NAME_LEN + 1)),
            Err(RoomNameError::TooLong)
        );
        for name in ["game 1", "game/1", "é", "a\"b", "a\\b", "room*", "a\nb"] {
            assert_eq!(RoomName::parse(name), Err(RoomNameError::BadCharacter), "{name:?}");
        }
    }
}
