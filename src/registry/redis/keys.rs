//! Where a room lives in Redis: its keys and its channel, all under the room's hash tag so that
//! a script and a sharded channel touch one slot (docs/ARCHITECTURE.md, "Keys, channels and bounds").

use crate::core::RoomName;

pub(super) fn meta_key(room: &RoomName) -> String {
    format!("cs:{{{room}}}:meta")
}

pub(super) fn history_key(room: &RoomName) -> String {
    format!("cs:{{{room}}}:hist")
}

/// The ids of the room's recent events with their sequence numbers (a sorted set), so that an
/// event sent again from an outbox is numbered once.
pub(super) fn ids_key(room: &RoomName) -> String {
    format!("cs:{{{room}}}:ids")
}

pub(super) fn presence_key(room: &RoomName) -> String {
    format!("cs:{{{room}}}:presence")
}

/// The pub/sub channel of a room.
pub fn channel(room: &RoomName) -> String {
    format!("cs:{{{room}}}:ch")
}

/// The room a channel belongs to.
pub(super) fn room_of_channel(channel: &[u8]) -> Option<RoomName> {
    let channel = std::str::from_utf8(channel).ok()?;
    RoomName::parse(channel.strip_prefix("cs:{")?.strip_suffix("}:ch")?).ok()
}

/// Node records share one hash slot with the set of nodes, so one pipeline updates both.
pub(super) fn node_key(id: &str) -> String {
    format!("cs:{{nodes}}:{id}")
}

pub(super) const NODES_KEY: &str = "cs:{nodes}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_name_their_room() {
        let room = RoomName::parse("game:1").expect("room");
        assert_eq!(channel(&room), "cs:{game:1}:ch");
        assert_eq!(room_of_channel(channel(&room).as_bytes()), Some(room));
        assert_eq!(room_of_channel(b"cs:{bad room}:ch"), None);
        assert_eq!(room_of_channel(b"other"), None);
    }
}
