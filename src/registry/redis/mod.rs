//! The Redis registry: versions and sequences assigned atomically by a script, state and history
//! kept in Redis, publishes carried between nodes by pub/sub on channels a node subscribes to only
//! while it has local subscribers, presence by heartbeats, and an outbox that keeps local delivery
//! going while Redis is away. Key layout and failure behaviour: docs/ARCHITECTURE.md, "Redis".
//!
//! One file per concept: `settings` and `conn` (connecting), `keys` and `scripts` (what lives in
//! Redis), `follow`, `pubsub` and `gaps` (rooms this node follows, live messages in number order), `outbox` and `resync`
//! (outages and the one way back), `presence` (the heartbeat), `reads` and `idempotency` (the
//! HTTP side's questions).

mod conn;
mod follow;
mod gaps;
mod idempotency;
mod keys;
mod outbox;
mod presence;
mod pubsub;
mod reads;
mod resync;
mod scripts;
mod settings;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tracing::{info, warn};

use self::conn::RedisConn;
use self::follow::Follow;
pub use self::follow::FollowGuard;
use self::outbox::{Outbox, OutboxItem, RoomOutage};
use self::resync::Scope;
use self::scripts::{Numbered, Scripts, ToNumber};
pub use self::settings::RedisSettings;
use super::{
    EmbeddedRegistry, HistoryPage, NodeRecord, Published, Registry, RegistryError, RegistryStatus, RoomEvents,
    RoomFigures, Then,
};
use crate::core::{JsonData, Kind, RoomName};
use crate::hub::Hub;
use crate::idempotency::{Answer, Claim, IdempotencyKey};
use crate::metrics::Metrics;

/// Per-room commands in flight at once when a node resubscribes and reseeds its rooms after an
/// outage, or refreshes their presence on a cluster (one after another, thousands of rooms would
/// cost seconds of round trips).
const ROOMS_IN_FLIGHT: usize = 64;

/// Runs `commands`, `ROOMS_IN_FLIGHT` at a time; the first error ends it.
async fn run_per_room<T>(
    commands: Vec<impl std::future::Future<Output = redis::RedisResult<T>>>,
) -> redis::RedisResult<()> {
    let mut running = futures_util::stream::iter(commands).buffer_unordered(ROOMS_IN_FLIGHT);
    while let Some(done) = running.next().await {
        done?;
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The Redis registry of one node.
pub struct RedisRegistry {
    /// The node's runtime: `follow` is also called from the WebTransport loops' threads, which
    /// run runtimes of their own, and its work belongs here, beside the connections it uses.
    runtime: tokio::runtime::Handle,
    hub: Hub,
    metrics: Arc<Metrics>,
    settings: RedisSettings,
    commands: RedisConn,
    pubsub: RedisConn,
    /// Redis answers (one Redis; a cluster keeps it true and puts failed rooms in `down_rooms`).
    up: AtomicBool,
    /// Rooms in outage on their own while the others go on: on a cluster, rooms whose shard
    /// failed a command; on either, rooms whose outbox publishes wait for the nodes that hold
    /// them (`RoomOutage::wait_for_holders_until`).
    down_rooms: Mutex<HashMap<RoomName, RoomOutage>>,
    follows: Mutex<HashMap<RoomName, Arc<Follow>>>,
    /// Publishes waiting for Redis, and the recent ones to send again if Redis lost them.
    outbox: Mutex<Outbox>,
    /// The order publishes were accepted in (`OutboxItem::serial`).
    serial: AtomicU64,
    scripts: Scripts,
    /// One whole-Redis resync at a time.
    resync: tokio::sync::Mutex<()>,
    /// A whole-Redis resync is due soon (`resync_later`).
    retry_soon: AtomicBool,
    /// This node's latest operations summary, written with each heartbeat (`share_summary`).
    summary: Mutex<Option<String>>,
}

impl std::fmt::Debug for RedisRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRegistry")
            .field("node", &self.settings.node_id)
            .finish()
    }
}

impl RedisRegistry {
    /// Connects to Redis and starts the background tasks (pub/sub reader, heartbeat, unfollow).
    pub async fn connect(settings: RedisSettings, hub: Hub, metrics: Arc<Metrics>) -> redis::RedisResult<Arc<Self>> {
        let (push_tx, push_rx) = mpsc::unbounded_channel();
        let (commands, pubsub) = conn::connect(&settings.url, settings.cluster, push_tx).await?;
        let registry = Arc::new(Self {
            runtime: tokio::runtime::Handle::current(),
            hub: hub.clone(),
            metrics,
            settings,
            commands,
            pubsub,
            up: AtomicBool::new(true),
            down_rooms: Mutex::new(HashMap::new()),
            follows: Mutex::new(HashMap::new()),
            outbox: Mutex::new(Outbox::default()),
            serial: AtomicU64::new(0),
            scripts: Scripts::default(),
            resync: tokio::sync::Mutex::new(()),
            retry_soon: AtomicBool::new(false),
            summary: Mutex::new(None),
        });
        registry.metrics.registry_up.set(1);
        let (emptied_tx, emptied_rx) = mpsc::unbounded_channel();
        hub.notify_emptied_rooms(emptied_tx);
        tokio::spawn(registry.clone().read_pushes(push_rx));
        tokio::spawn(registry.clone().unfollow_emptied(emptied_rx));
        tokio::spawn(registry.clone().heartbeat());
        info!(node = %registry.settings.node_id, "joined the cluster through redis");
        Ok(registry)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Whether the room's publishes go to Redis now: Redis is up and, on a cluster, the room's
    /// shard is not in outage.
    fn is_room_up(&self, room: &RoomName) -> bool {
        self.is_up() && !lock(&self.down_rooms).contains_key(room)
    }

    /// `ok` only when Redis is up, no room is in outage and nothing waits in the outbox.
    pub fn status(&self) -> RegistryStatus {
        let outbox = lock(&self.outbox).len();
        let rooms_down = lock(&self.down_rooms).len();
        let healthy = self.is_up() && rooms_down == 0 && outbox == 0;
        RegistryStatus {
            kind: "redis",
            status: if healthy { "ok" } else { "degraded" },
            outbox,
            rooms_down,
        }
    }

    fn mark_down(&self, error: &dyn std::fmt::Display) {
        if self.up.swap(false, Ordering::AcqRel) {
            warn!(%error, "redis is down: serving local clients only; publishes wait in the outbox");
            self.metrics.registry_up.set(0);
            self.restore_recent(&Scope::All);
        }
    }

    /// A command for `room` failed. One Redis: Redis is down. A cluster: that room's shard is
    /// (the heartbeat resyncs it alone), and rooms on other shards go on.
    fn mark_room_down(&self, room: &RoomName, error: &dyn std::fmt::Display) {
        if !self.settings.cluster {
            return self.mark_down(error);
        }
        let newly = {
            let mut down = lock(&self.down_rooms);
            let newly = !down.contains_key(room);
            if newly {
                down.insert(room.clone(), RoomOutage::default());
            }
            newly
        };
        if newly {
            warn!(%error, %room, "the room's redis shard failed: serving its local clients only; its publishes wait in the outbox");
            self.metrics.registry_up.set(0);
            self.restore_recent(&Scope::Room(room.clone()));
        }
    }

    fn new_epoch(&self) -> String {
        format!("{:016x}", crate::random::random_u64())
    }

    /// Numbers the publish in Redis (one round trip); the node's own clients receive it through
    /// the channel like everyone else's. While Redis is down it is delivered locally with a
    /// provisional number and queued.
    async fn publish_numbered(&self, room: &RoomName, kind: Kind, data: &JsonData) -> Result<Published, RegistryError> {
        let now = crate::clock::now();
        let id = (kind == Kind::Event).then(|| self.hub.next_event_id());
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        loop {
            if !self.is_room_up(room) {
                match self.queue(room, kind, id, data, now, serial) {
                    Some(queued) => return queued,
                    // The room's shard came back meanwhile, its outbox flushed: publish.
                    None => continue,
                }
            }
            let floor = self.hub.room_numbers(room).map_or(0, |n| match kind {
                Kind::State => n.version,
                Kind::Event => n.seq,
            });
            let publish = ToNumber {
                room,
                kind,
                id,
                data,
                ts_ms: now.unix_ms,
                provisional: None,
                restore: None,
            };
            match self.run_publish_script(publish, floor, false).await {
                Ok(Numbered::Number(epoch, number)) => {
                    // Kept a few seconds, in case Redis dies before any holder received it.
                    self.remember(OutboxItem {
                        room: room.clone(),
                        kind,
                        data: data.clone(),
                        ts_ms: now.unix_ms,
                        provisional: None,
                        id,
                        serial,
                        numbered: Some((epoch, number)),
                    });
                    return Ok(Published::Numbered {
                        number,
                        id,
                        ts_ms: now.unix_ms,
                    });
                }
                // Redis lost the room and its holders are putting their numbers back: queued,
                // and sent by the room's own resync once it settled.
                Ok(Numbered::Settling) => self.wait_for_holders(room),
                // Neither happens without `wait_for_holders` or a restore.
                Ok(Numbered::NoSuchRoom | Numbered::Superseded) => {
                    return Err(RegistryError::Unavailable("redis published nothing".into()))
                }
                Err(error) => self.mark_room_down(room, &error),
            }
        }
    }
}

/// The registry's surface (see `Registry`), on the shared handle: following a room spawns the
/// load, which needs the handle.
impl Registry for Arc<RedisRegistry> {
    fn publish<'a>(
        &'a self,
        room: &'a RoomName,
        kind: Kind,
        data: &'a JsonData,
    ) -> BoxFuture<'a, Result<Published, RegistryError>> {
        self.publish_numbered(room, kind, data).boxed()
    }

    fn follow(&self, room: RoomName, then: Then) {
        let redis = self.clone();
        self.runtime.spawn(async move {
            // Held until `then` has joined the room to the hub, so it is not unfollowed first.
            let _following = redis.follow_room(&room).await;
            then(crate::clock::unix_ms());
        });
    }

    fn room<'a>(&'a self, room: &'a RoomName) -> BoxFuture<'a, Result<Option<RoomFigures>, RegistryError>> {
        async move {
            // The cluster's view; while the room cannot reach Redis, or Redis lost it and its
            // holders have not put it back yet, this node's own (a node with subscribers of a
            // room never answers that it does not exist).
            if self.is_room_up(room) {
                if let Ok(Some(figures)) = self.shared_room(room).await {
                    return Ok(Some(figures));
                }
            }
            Ok(EmbeddedRegistry::local_room(&self.hub, room))
        }
        .boxed()
    }

    fn events_since<'a>(
        &'a self,
        room: &'a RoomName,
        since: u64,
        page: HistoryPage,
    ) -> BoxFuture<'a, Result<Option<RoomEvents>, RegistryError>> {
        async move {
            if !self.is_room_up(room) && self.hub.room_numbers(room).is_some() {
                return Ok(EmbeddedRegistry::local_events(&self.hub, room, since, page));
            }
            match self.shared_events(room, since, page).await {
                Ok(None) => Ok(EmbeddedRegistry::local_events(&self.hub, room, since, page)),
                Ok(events) => Ok(events),
                Err(error) => match EmbeddedRegistry::local_events(&self.hub, room, since, page) {
                    Some(events) => Ok(Some(events)),
                    None => Err(RegistryError::Unavailable(error.to_string())),
                },
            }
        }
        .boxed()
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeRecord>, RegistryError>> {
        async move {
            self.live_nodes()
                .await
                .map_err(|e| RegistryError::Unavailable(e.to_string()))
        }
        .boxed()
    }

    fn status(&self) -> RegistryStatus {
        RedisRegistry::status(self)
    }

    fn share_summary(&self, summary: String) {
        *lock(&self.summary) = Some(summary);
    }

    fn claim_key<'a>(
        &'a self,
        key: &'a IdempotencyKey,
        fingerprint: &'a str,
        window: Duration,
    ) -> BoxFuture<'a, Result<Claim, RegistryError>> {
        async move {
            self.claim_key_shared(key, fingerprint, window)
                .await
                .map_err(|e| RegistryError::Unavailable(e.to_string()))
        }
        .boxed()
    }

    fn answer_key<'a>(
        &'a self,
        key: &'a IdempotencyKey,
        answer: &'a Answer,
        window: Duration,
    ) -> BoxFuture<'a, Result<(), RegistryError>> {
        async move {
            self.answer_key_shared(key, answer, window)
                .await
                .map_err(|e| RegistryError::Unavailable(e.to_string()))
        }
        .boxed()
    }

    fn release_key<'a>(&'a self, key: &'a IdempotencyKey) -> BoxFuture<'a, ()> {
        self.release_key_shared(key).boxed()
    }
}
