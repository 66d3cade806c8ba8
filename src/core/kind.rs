//! The one name for "state or event", used by the core, the HTTP API, the registry and the
//! codecs alike: states are latest values (versioned, conflated), events are ordered (sequenced).

use serde::{Deserialize, Serialize};

/// Which kind of message a publish carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The room's latest value; its number is a version.
    State,
    /// One message of the room's ordered history; its number is a sequence.
    Event,
}

impl Kind {
    /// `state` or `event`: the `type` of JSON frames and batch items.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::State => "state",
            Self::Event => "event",
        }
    }

    /// The name of the number in JSON frames: `version` or `seq`.
    pub fn number_name(self) -> &'static str {
        match self {
            Self::State => "version",
            Self::Event => "seq",
        }
    }

    /// The byte that stands for the kind in the registry's envelopes.
    pub fn to_byte(self) -> u8 {
        match self {
            Self::State => 0,
            Self::Event => 1,
        }
    }

    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Self::State),
            1 => Some(Self::Event),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_bytes_round_trip() {
        for kind in [Kind::State, Kind::Event] {
            assert_eq!(Kind::from_byte(kind.to_byte()), Some(kind));
            let json = serde_json::to_string(&kind).expect("serialises");
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
        }
        assert_eq!(Kind::from_byte(2), None);
        assert_eq!(Kind::State.number_name(), "version");
        assert_eq!(Kind::Event.number_name(), "seq");
    }
}
