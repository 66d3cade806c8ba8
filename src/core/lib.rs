//! The sans-IO broadcast core: room names, rooms with versions and history, publications encoded
//! once, per-connection queues with conflation, the client protocol and its codecs (permessage-deflate
//! included), loss repair.
//! A package of its own so the compiler keeps it pure: no runtime, no sockets, no clock.

pub mod deflate;
pub mod delta;
pub mod kind;
pub mod protocol;
pub mod publication;
pub mod queue;
pub mod repair;
pub mod room;
pub mod room_name;
pub mod routing;
pub mod time;
pub mod wire;

pub use kind::Kind;
pub use protocol::{close_code, parse_command, ClientCommand, CommandError, ErrorCode, ServerControl};
pub use publication::{EventId, EventIds, JsonData, JsonDataError, Publication, RoomId};
pub use queue::{ConnectionQueue, Outgoing, Pushed, QueueClosed, QueueLimits};
pub use room::{RetentionLimits, Room, Snapshot};
pub use room_name::{RoomName, RoomNameError};
pub use time::Now;
