//! The sans-IO broadcast core: room names, rooms with versions and history, publications encoded
//! once, per-connection queues with conflation, and the client protocol. No sockets, no clocks.

pub mod protocol;
pub mod publication;
pub mod queue;
pub mod repair;
pub mod room;
pub mod room_name;
pub mod wire;

pub use protocol::{close_code, parse_command, ClientCommand, CommandError, ErrorCode, ServerControl};
pub use publication::{JsonData, Now, Publication, PublicationKind, RoomId};
pub use queue::{ConnectionQueue, Outgoing, Pushed, QueueClosed, QueueLimits};
pub use room::{RetentionLimits, Room, Snapshot};
pub use room_name::{RoomName, RoomNameError};
