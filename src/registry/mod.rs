//! Where rooms are shared: a trait with the whole surface (publish, follow, a room's figures,
//! events since a sequence, nodes, health), implemented by the embedded registry (this node
//! alone, the default) and by Redis (several nodes). Nothing outside this module asks which runs;
//! the hub stays the local fan-out either way.

pub mod embedded;
pub use courtside_codecs::envelope;
pub mod redis;

use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::core::{EventId, JsonData, Kind, RoomName};
use crate::hub::HubError;
use crate::idempotency::{Answer, Claim, IdempotencyKey};

pub use self::embedded::EmbeddedRegistry;
pub use self::redis::{RedisRegistry, RedisSettings};

/// The outcome of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Numbered: the version or sequence, the event's id, and the ingest time.
    Numbered {
        number: u64,
        id: Option<EventId>,
        ts_ms: u64,
    },
    /// Redis is unreachable: queued in the outbox, to be numbered when it returns. Local
    /// subscribers already received it with `provisional` as its number, when the node holds the room.
    Queued {
        provisional: Option<u64>,
        id: Option<EventId>,
        ts_ms: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error("redis is unreachable and the outbox is full ({0} messages waiting); retry later")]
    OutboxFull(usize),
    /// A read the registry cannot answer now (Redis is unreachable).
    #[error("redis: {0}")]
    Unavailable(String),
}

/// Health of the registry, for `/health` and the metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RegistryStatus {
    /// `embedded` or `redis`.
    pub kind: &'static str,
    /// `ok`, or `degraded` while Redis is unreachable.
    pub status: &'static str,
    /// Publishes waiting for Redis.
    pub outbox: usize,
    /// Rooms in outage on their own while the rest go on: on a Redis Cluster, rooms whose shard
    /// failed; on either, rooms settling after Redis came back empty (0 when embedded).
    pub rooms_down: usize,
}

/// A room's current figures, across every node the registry knows of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomFigures {
    pub epoch: String,
    /// Version of the current state (0: none yet).
    pub version: u64,
    pub state: Option<StoredState>,
    /// Sequence of the last event (0: none yet).
    pub last_seq: u64,
    /// Subscribers of the room on every live node (its presence).
    pub subscribers: u64,
}

/// A room's state as stored: its ingest time and the published JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredState {
    pub ts_ms: u64,
    pub data: String,
}

/// One retained event: its sequence, identity, ingest time and published JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub seq: u64,
    pub id: EventId,
    pub ts_ms: u64,
    pub data: String,
}

/// A room's retained events after some sequence: one page of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomEvents {
    pub epoch: String,
    /// The events, or `Err(last_seq)` when the history no longer reaches back that far (or
    /// `since` is beyond the last sequence).
    pub events: Result<Vec<StoredEvent>, u64>,
    /// More events follow the page: ask again from its last `seq`.
    pub more: bool,
}

/// How much of the history one read returns: at most `limit` events and, past the first,
/// `max_bytes` of their data, so that a read costs a bounded amount whatever the history holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryPage {
    pub limit: usize,
    pub max_bytes: usize,
}

impl HistoryPage {
    /// How many of `sizes` (the data sizes of the events in order) fit the page, and whether
    /// some are left over.
    pub fn fit(&self, sizes: impl IntoIterator<Item = usize>) -> (usize, bool) {
        let (mut count, mut bytes) = (0, 0);
        for size in sizes {
            if count == self.limit || (count > 0 && bytes + size > self.max_bytes) {
                return (count, true);
            }
            count += 1;
            bytes += size;
        }
        (count, false)
    }
}

/// A node as `GET /v1/nodes` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeRecord {
    pub id: String,
    pub http: String,
    pub connections: i64,
    pub subscriptions: i64,
    pub rooms: i64,
    /// The node's latest operations summary (JSON, `ops::NodeSummary`), as its heartbeat shared
    /// it; not part of `GET /v1/nodes`, which needs no credentials.
    #[serde(skip)]
    pub ops: Option<String>,
}

/// Runs once the room's messages reach this node's hub, with the time then (unix ms).
pub type Then = Box<dyn FnOnce(u64) + Send>;

/// The registry in use, behind `Arc<dyn Registry>` in the node.
pub trait Registry: Send + Sync + std::fmt::Debug {
    /// Numbers a publish and delivers it to every subscriber, local and remote.
    fn publish<'a>(
        &'a self,
        room: &'a RoomName,
        kind: Kind,
        data: &'a JsonData,
    ) -> BoxFuture<'a, Result<Published, RegistryError>>;

    /// Makes sure the room's messages reach this node's hub (with Redis: its channel subscribed,
    /// its state and history loaded), then runs `then`: at once when there is nothing to load.
    /// A room is unfollowed when its last local subscriber leaves (the hub tells the registry).
    /// Called from any thread (a WebTransport endpoint loop runs a runtime of its own): what it
    /// starts runs on the node's runtime.
    fn follow(&self, room: RoomName, then: Then);

    /// The room's figures, or `None` when no node holds such a room.
    fn room<'a>(&'a self, room: &'a RoomName) -> BoxFuture<'a, Result<Option<RoomFigures>, RegistryError>>;

    /// One page of the retained events after `since`, or `None` when no node holds such a room.
    fn events_since<'a>(
        &'a self,
        room: &'a RoomName,
        since: u64,
        page: HistoryPage,
    ) -> BoxFuture<'a, Result<Option<RoomEvents>, RegistryError>>;

    /// The live nodes (this one alone with the embedded registry).
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeRecord>, RegistryError>>;

    /// Claims a publisher's idempotency key for `window`, or says what it holds: on this node
    /// alone with the embedded registry, across every node with Redis.
    fn claim_key<'a>(
        &'a self,
        key: &'a IdempotencyKey,
        fingerprint: &'a str,
        window: Duration,
    ) -> BoxFuture<'a, Result<Claim, RegistryError>>;

    /// Records the first answer to a claimed key, kept for `window`.
    fn answer_key<'a>(
        &'a self,
        key: &'a IdempotencyKey,
        answer: &'a Answer,
        window: Duration,
    ) -> BoxFuture<'a, Result<(), RegistryError>>;

    /// Forgets a claimed key whose publish failed, so that a retry may publish.
    fn release_key<'a>(&'a self, key: &'a IdempotencyKey) -> BoxFuture<'a, ()>;

    /// Hands the registry this node's latest operations summary (JSON) to share with the other
    /// nodes (the Redis registry writes it with its heartbeat). The embedded registry keeps it
    /// for `nodes`.
    fn share_summary(&self, summary: String);

    fn status(&self) -> RegistryStatus;
}

#[cfg(test)]
mod tests {
    use super::HistoryPage;

    #[test]
    fn a_page_holds_up_to_its_limit_and_its_bytes_but_always_one_event() {
        let page = HistoryPage {
            limit: 3,
            max_bytes: 10,
        };
        assert_eq!(page.fit([1, 1]), (2, false));
        assert_eq!(page.fit([1, 1, 1, 1]), (3, true));
        assert_eq!(page.fit([6, 4, 1]), (2, true));
        assert_eq!(
            page.fit([50, 1]),
            (1, true),
            "one event larger than the page still goes"
        );
        assert_eq!(page.fit([]), (0, false));
    }
}
