//! The Redis registry: versions and sequences assigned atomically by a script, state and history
//! kept in Redis, publishes carried between nodes by pub/sub on channels a node subscribes to only
//! while it has local subscribers, presence by heartbeats, and an outbox that keeps local delivery
//! going while Redis is away. Key layout and failure behaviour: docs/ARCHITECTURE.md, "Redis".

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, PushInfo, PushKind, Script, Value};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::envelope::{self, EnvelopeBody};
use super::{
    EmbeddedRegistry, HistoryPage, NodeRecord, Published, Registry, RegistryError, RegistryStatus, RoomEvents,
    RoomFigures, StoredEvent, StoredState, Then,
};
use crate::core::{EventId, JsonData, Kind, Now, RoomName};
use crate::hub::{Hub, RemotePublication};
use crate::idempotency::{Answer, Claim, IdempotencyKey};
use crate::metrics::Metrics;

/// What the Redis registry needs, built from the configuration.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    pub node_id: String,
    /// The node's HTTP address, shown by `GET /v1/nodes`.
    pub http: String,
    pub heartbeat: Duration,
    pub outbox_messages: usize,
    pub outbox_bytes: usize,
    pub history_len: usize,
    pub history_ttl: Duration,
    pub state_ttl: Duration,
    /// Redis Cluster: `url` lists seed nodes (comma-separated); rooms use sharded pub/sub.
    pub cluster: bool,
}

impl RedisSettings {
    /// The settings of `--redis URL`; `http` is this node's bound HTTP address.
    pub fn from_config(config: &crate::config::ServeConfig, url: &str, http: std::net::SocketAddr) -> Self {
        let node_id = config.cluster.node_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default();
            let host = if host.is_empty() { "node".to_string() } else { host };
            format!("{host}-{:06x}", crate::random::random_u64() & 0xff_ffff)
        });
        Self {
            url: url.to_string(),
            node_id,
            http: http.to_string(),
            heartbeat: config.cluster.node_heartbeat,
            outbox_messages: config.cluster.outbox_messages,
            outbox_bytes: config.cluster.outbox_bytes,
            history_len: config.rooms.history_size,
            history_ttl: config.rooms.history_ttl,
            state_ttl: config.rooms.state_ttl,
            cluster: config.cluster.redis_cluster,
        }
    }
}

/// A command connection: one Redis, or a Redis Cluster (routed by key slot).
#[derive(Clone)]
enum RedisConn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisConn {
    /// Subscribes a room's channel: SUBSCRIBE, or SSUBSCRIBE (sharded) on a cluster.
    async fn subscribe(&mut self, channel: String) -> redis::RedisResult<()> {
        match self {
            Self::Single(c) => c.subscribe(channel).await,
            Self::Cluster(c) => c.ssubscribe(channel).await,
        }
    }

    async fn unsubscribe(&mut self, channel: String) -> redis::RedisResult<()> {
        match self {
            Self::Single(c) => c.unsubscribe(channel).await,
            Self::Cluster(c) => c.sunsubscribe(channel).await,
        }
    }
}

const PUBLISH_LUA: &str = r#"
-- KEYS: meta, history, event ids. ARGV: kind, data, ts, new epoch, floor, history length, history ttl ms,
-- key ttl s, envelope body, channel, origin node, provisional number ('' when none),
-- publish command (PUBLISH, or SPUBLISH on a cluster), event id (16 hex digits; '' for a state),
-- '1' to publish nothing (answer {'', 0}) when Redis holds no such room: an outbox publish of a
-- room this node does not hold waits for the nodes that hold it to put its numbers back.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch and ARGV[15] == '1' then return {'', 0} end
if not epoch then
  epoch = ARGV[4]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
-- An event id numbered before (an outbox retry whose first answer was lost): its number again,
-- nothing published twice.
if ARGV[14] ~= '' then
  local seen = redis.call('ZSCORE', KEYS[3], ARGV[14])
  if seen then return {epoch, tonumber(seen)} end
end
local field = 'seq'
if ARGV[1] == 'state' then field = 'version' end
local n = redis.call('HINCRBY', KEYS[1], field, 1)
local floor = tonumber(ARGV[5])
if n <= floor then
  n = floor + 1
  redis.call('HSET', KEYS[1], field, n)
end
if ARGV[1] == 'state' then
  redis.call('HSET', KEYS[1], 'state', ARGV[2], 'state_ts', ARGV[3])
else
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[6], '*', 'seq', n, 'ts', ARGV[3], 'data', ARGV[2],
    'origin', ARGV[11], 'prov', ARGV[12], 'id', ARGV[14])
  local now = redis.call('TIME')
  local oldest = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[7])
  if oldest > 0 then redis.call('XTRIM', KEYS[2], 'MINID', oldest) end
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
  if ARGV[14] ~= '' then
    redis.call('ZADD', KEYS[3], n, ARGV[14])
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', n - tonumber(ARGV[6]))
    redis.call('PEXPIRE', KEYS[3], ARGV[7])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[8])
local x = n
local number = ''
for i = 1, 8 do
  number = string.char(x % 256) .. number
  x = math.floor(x / 256)
end
redis.call(ARGV[13], ARGV[10], string.char(1) .. number .. string.char(#epoch) .. epoch .. ARGV[9])
return {epoch, n}
"#;

const RESEED_LUA: &str = r#"
-- KEYS: meta. ARGV: epoch, version, seq, state, state ts, key ttl s.
local current = redis.call('HGET', KEYS[1], 'epoch')
if not current then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'version', ARGV[2], 'seq', ARGV[3])
  if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'state', ARGV[4], 'state_ts', ARGV[5]) end
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  return ARGV[1]
end
if current == ARGV[1] then
  if tonumber(redis.call('HGET', KEYS[1], 'version') or '0') < tonumber(ARGV[2]) then
    redis.call('HSET', KEYS[1], 'version', ARGV[2])
  end
  if tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') < tonumber(ARGV[3]) then
    redis.call('HSET', KEYS[1], 'seq', ARGV[3])
  end
end
return current
"#;

/// A hash's fields, as Redis returns them.
type Fields = HashMap<String, String>;
/// Stream entries: id and fields.
type StreamEntries = Vec<(String, Fields)>;

/// An event of a room's history stream: (seq, id, ts, data), as the publish script wrote it.
/// An entry written by a node without event ids gets the id every node derives for it.
fn stream_event<'a>(epoch: &str, entry: &'a Fields) -> Option<(u64, EventId, u64, &'a String)> {
    let seq = entry.get("seq")?.parse().ok()?;
    let ts = entry.get("ts").and_then(|t| t.parse().ok()).unwrap_or(0);
    let id = entry
        .get("id")
        .and_then(|id| EventId::parse(id))
        .unwrap_or(EventId(envelope::legacy_event_id(epoch, seq)));
    Some((seq, id, ts, entry.get("data")?))
}

fn meta_key(room: &RoomName) -> String {
    format!("cs:{{{room}}}:meta")
}

fn history_key(room: &RoomName) -> String {
    format!("cs:{{{room}}}:hist")
}

/// The ids of the room's recent events with their sequence numbers (a sorted set), so that an
/// event sent again from an outbox is numbered once.
fn ids_key(room: &RoomName) -> String {
    format!("cs:{{{room}}}:ids")
}

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

fn presence_key(room: &RoomName) -> String {
    format!("cs:{{{room}}}:presence")
}

/// The pub/sub channel of a room.
pub fn channel(room: &RoomName) -> String {
    format!("cs:{{{room}}}:ch")
}

/// Node records share one hash slot with the set of nodes, so one pipeline updates both.
fn node_key(id: &str) -> String {
    format!("cs:{{nodes}}:{id}")
}

const NODES_KEY: &str = "cs:{nodes}";

fn room_of_channel(channel: &[u8]) -> Option<RoomName> {
    let channel = std::str::from_utf8(channel).ok()?;
    RoomName::parse(channel.strip_prefix("cs:{")?.strip_suffix("}:ch")?).ok()
}

/// A publish waiting for Redis.
#[derive(Debug, Clone)]
struct OutboxItem {
    room: RoomName,
    kind: Kind,
    data: JsonData,
    ts_ms: u64,
    provisional: Option<u64>,
    id: Option<EventId>,
    /// Tells outbox items apart (a room's are flushed alone on a cluster).
    serial: u64,
}

/// An envelope held while its room is (re)loading.
#[derive(Debug, Clone)]
struct OwnedEnvelope {
    number: u64,
    epoch: String,
    kind: u8,
    ts: u64,
    data: String,
    id: Option<EventId>,
    deliver: bool,
}

/// A room in outage on its own (see `RedisRegistry::down_rooms`).
#[derive(Debug, Default)]
struct RoomOutage {
    /// Its resync is running.
    resyncing: bool,
    /// Its outbox publishes wait for the room's holders until then (Redis came back empty).
    wait_for_holders_until: Option<std::time::Instant>,
}

/// A publish for the script to number: a fresh one, or one from the outbox.
#[derive(Debug, Clone, Copy)]
struct ToNumber<'a> {
    room: &'a RoomName,
    kind: Kind,
    id: Option<EventId>,
    data: &'a JsonData,
    ts_ms: u64,
    /// The number it was delivered under locally during an outage.
    provisional: Option<u64>,
}

impl OutboxItem {
    fn to_number(&self) -> ToNumber<'_> {
        ToNumber {
            room: &self.room,
            kind: self.kind,
            id: self.id,
            data: &self.data,
            ts_ms: self.ts_ms,
            provisional: self.provisional,
        }
    }
}

impl OwnedEnvelope {
    /// The publication it carries, for the hub; `None` if its data is not JSON.
    fn remote(&self) -> Option<RemotePublication<'_>> {
        let data = JsonData::parse(self.data.as_bytes()).ok()?;
        // A byte no version writes is read as an event, as it always was.
        let kind = Kind::from_byte(self.kind).unwrap_or(Kind::Event);
        Some(RemotePublication {
            epoch: &self.epoch,
            kind,
            number: self.number,
            id: self.id,
            ts_ms: self.ts,
            data,
            deliver: self.deliver,
        })
    }
}

/// A room this node follows (its channel is subscribed, its state loaded).
#[derive(Debug, Default)]
struct Follow {
    ready: tokio::sync::OnceCell<()>,
    /// Subscribes in progress: the room is not unfollowed while one is.
    users: AtomicUsize,
    /// Envelopes that arrived while the room was loading; `None` once loaded.
    buffer: Mutex<Option<Vec<OwnedEnvelope>>>,
}

/// Keeps a followed room from being unfollowed until the subscribe completes.
#[derive(Debug)]
pub struct FollowGuard(Arc<Follow>);

impl Drop for FollowGuard {
    fn drop(&mut self) {
        self.0.users.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The Redis registry of one node.
pub struct RedisRegistry {
    hub: Hub,
    metrics: Arc<Metrics>,
    settings: RedisSettings,
    commands: RedisConn,
    pubsub: RedisConn,
    up: AtomicBool,
    /// Rooms in outage on their own while the others go on: on a cluster, rooms whose shard
    /// failed a command (`up` stays true on a cluster); on either, rooms whose outbox publishes
    /// wait for the nodes that hold them (`RoomOutage::wait_for_holders_until`).
    down_rooms: Mutex<HashMap<RoomName, RoomOutage>>,
    follows: Mutex<HashMap<RoomName, Arc<Follow>>>,
    outbox: Mutex<VecDeque<OutboxItem>>,
    outbox_bytes: AtomicUsize,
    outbox_serial: AtomicU64,
    publish_script: Script,
    reseed_script: Script,
    /// One resync at a time.
    resync: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for RedisRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRegistry")
            .field("node", &self.settings.node_id)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The Redis Cluster seed list of `--redis`: comma-separated URLs, where a seed written as bare
/// `host:port` takes the scheme and credentials of the first full URL (`redis://` without one),
/// so `rediss://:TOKEN@h1:6379,h2:6379` and `127.0.0.1:7000,127.0.0.1:7001` both work.
fn cluster_seeds(list: &str) -> Vec<String> {
    let seeds: Vec<&str> = list.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let prefix = seeds
        .iter()
        .find_map(|seed| {
            let (scheme, rest) = seed.split_once("://")?;
            let userinfo = rest
                .split_once('@')
                .map_or(String::new(), |(user, _)| format!("{user}@"));
            Some(format!("{scheme}://{userinfo}"))
        })
        .unwrap_or_else(|| "redis://".to_string());
    seeds
        .iter()
        .map(|seed| {
            if seed.contains("://") {
                seed.to_string()
            } else {
                format!("{prefix}{seed}")
            }
        })
        .collect()
}

/// The URL with `protocol=resp3` (needed for pushes) added to its query, before any fragment.
fn with_resp3(url: &str) -> String {
    let (base, fragment) = match url.split_once('#') {
        Some((base, fragment)) => (base, format!("#{fragment}")),
        None => (url, String::new()),
    };
    if base.contains("protocol=") {
        url.to_string()
    } else if base.contains('?') {
        format!("{base}&protocol=resp3{fragment}")
    } else {
        format!("{base}?protocol=resp3{fragment}")
    }
}

impl RedisRegistry {
    /// Connects to Redis and starts the background tasks (pub/sub reader, heartbeat, unfollow).
    pub async fn connect(settings: RedisSettings, hub: Hub, metrics: Arc<Metrics>) -> redis::RedisResult<Arc<Self>> {
        let (push_tx, push_rx) = mpsc::unbounded_channel();
        let (commands, pubsub) = if settings.cluster {
            let seeds: Vec<String> = cluster_seeds(&settings.url).iter().map(|u| with_resp3(u)).collect();
            let builder = || {
                redis::cluster::ClusterClientBuilder::new(seeds.clone())
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .connection_timeout(Duration::from_secs(2))
                    .response_timeout(Duration::from_secs(2))
            };
            let commands = builder().build()?.get_async_connection().await?;
            let pubsub = builder().push_sender(push_tx).build()?.get_async_connection().await?;
            (RedisConn::Cluster(commands), RedisConn::Cluster(pubsub))
        } else {
            let client = redis::Client::open(with_resp3(&settings.url))?;
            let timeouts = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(Duration::from_secs(2)))
                .set_max_delay(Duration::from_secs(2))
                .set_number_of_retries(2);
            let commands = client.get_connection_manager_with_config(timeouts.clone()).await?;
            let pubsub = client
                .get_connection_manager_with_config(timeouts.set_push_sender(push_tx).set_automatic_resubscription())
                .await?;
            (RedisConn::Single(commands), RedisConn::Single(pubsub))
        };
        let registry = Arc::new(Self {
            hub: hub.clone(),
            metrics,
            settings,
            commands,
            pubsub,
            up: AtomicBool::new(true),
            down_rooms: Mutex::new(HashMap::new()),
            follows: Mutex::new(HashMap::new()),
            outbox: Mutex::new(VecDeque::new()),
            outbox_bytes: AtomicUsize::new(0),
            outbox_serial: AtomicU64::new(0),
            publish_script: Script::new(PUBLISH_LUA),
            reseed_script: Script::new(RESEED_LUA),
            resync: tokio::sync::Mutex::new(()),
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

    pub fn node_id(&self) -> &str {
        &self.settings.node_id
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Whether the room's publishes go to Redis now: Redis is up and, on a cluster, the room's
    /// shard is not in outage.
    fn is_room_up(&self, room: &RoomName) -> bool {
        self.is_up() && !lock(&self.down_rooms).contains_key(room)
    }

    pub fn status(&self) -> RegistryStatus {
        let healthy = self.is_up() && lock(&self.down_rooms).is_empty();
        RegistryStatus {
            kind: "redis",
            status: if healthy { "ok" } else { "degraded" },
            outbox: lock(&self.outbox).len(),
        }
    }

    fn mark_down(&self, error: &dyn std::fmt::Display) {
        if self.up.swap(false, Ordering::AcqRel) {
            warn!(%error, "redis is down: serving local clients only; publishes wait in the outbox");
            self.metrics.registry_up.set(0);
        }
    }

    /// A command for `room` failed. One Redis: Redis is down. A cluster: that room's shard is
    /// (the heartbeat resyncs it alone), and rooms on other shards go on.
    fn mark_room_down(&self, room: &RoomName, error: &dyn std::fmt::Display) {
        if !self.settings.cluster {
            return self.mark_down(error);
        }
        let mut down = lock(&self.down_rooms);
        if !down.contains_key(room) {
            down.insert(room.clone(), RoomOutage::default());
            warn!(%error, %room, "the room's redis shard failed: serving its local clients only; its publishes wait in the outbox");
            self.metrics.registry_up.set(0);
        }
    }

    /// An outbox publish found Redis without the room (it came back empty) and this node does not
    /// hold it: its publishes wait, in order, for two heartbeats, so that the nodes that hold the
    /// room put its epoch and numbers back first (else this publish would start the room over
    /// under a new epoch, and their clients would have to refetch). Then they go anyway.
    fn wait_for_holders(&self, room: &RoomName) {
        let mut down = lock(&self.down_rooms);
        let outage = down.entry(room.clone()).or_default();
        if outage.wait_for_holders_until.is_none() {
            let until = std::time::Instant::now() + self.settings.heartbeat * 2;
            outage.wait_for_holders_until = Some(until);
            info!(%room, "redis lost a room this node does not hold: its queued publishes wait for the nodes that hold it");
        }
    }

    /// Drops a published item from the outbox.
    fn remove_from_outbox(&self, item: &OutboxItem) {
        let mut outbox = lock(&self.outbox);
        let before = outbox.len();
        outbox.retain(|queued| queued.serial != item.serial);
        if outbox.len() < before {
            self.outbox_bytes.fetch_sub(item.data.as_str().len(), Ordering::Relaxed);
        }
        self.metrics.outbox.set(outbox.len() as i64);
    }

    /// Whether a publish of the room from the outbox should still wait for its holders.
    fn waits_for_holders(&self, room: &RoomName) -> bool {
        let holds = self.hub.room_numbers(room).is_some();
        !holds
            && lock(&self.down_rooms)
                .get(room)
                .and_then(|o| o.wait_for_holders_until)
                .is_none_or(|until| std::time::Instant::now() < until)
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
        loop {
            if !self.is_room_up(room) {
                match self.queue(room, kind, id, data, now) {
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
            };
            match self.run_publish(publish, floor).await {
                Ok(number) => {
                    return Ok(Published::Numbered {
                        number,
                        id,
                        ts_ms: now.unix_ms,
                    })
                }
                Err(error) => self.mark_room_down(room, &error),
            }
        }
    }

    fn queue(
        &self,
        room: &RoomName,
        kind: Kind,
        id: Option<EventId>,
        data: &JsonData,
        now: Now,
    ) -> Option<Result<Published, RegistryError>> {
        let mut outbox = lock(&self.outbox);
        // Checked under the outbox lock, which a room's resync holds when it finds the room's
        // last item gone and marks the room up: nothing is queued behind a finished flush.
        if self.is_room_up(room) {
            return None;
        }
        let bytes = self.outbox_bytes.load(Ordering::Relaxed);
        if outbox.len() >= self.settings.outbox_messages || bytes + data.as_str().len() > self.settings.outbox_bytes {
            return Some(Err(RegistryError::OutboxFull(outbox.len())));
        }
        // Local clients get it now, numbered after what this node has seen, under a local epoch.
        let provisional = self
            .hub
            .publish_provisional(room, kind, data, now, self.new_epoch(), id)
            .map(|r| r.number);
        outbox.push_back(OutboxItem {
            room: room.clone(),
            kind,
            data: data.clone(),
            ts_ms: now.unix_ms,
            provisional,
            id,
            serial: self.outbox_serial.fetch_add(1, Ordering::Relaxed),
        });
        self.outbox_bytes.fetch_add(data.as_str().len(), Ordering::Relaxed);
        self.metrics.outbox.set(outbox.len() as i64);
        Some(Ok(Published::Queued {
            provisional,
            id,
            ts_ms: now.unix_ms,
        }))
    }

    /// Runs the publish script: numbers the publish (above `floor`), stores and sends it.
    async fn run_publish(&self, publish: ToNumber<'_>, floor: u64) -> redis::RedisResult<u64> {
        Ok(self.run_publish_unless_new(publish, floor, false).await?.unwrap_or(0))
    }

    /// `run_publish`, but with `wait_for_holders` publishes nothing (`None`) if Redis holds no
    /// such room.
    async fn run_publish_unless_new(
        &self,
        publish: ToNumber<'_>,
        floor: u64,
        wait_for_holders: bool,
    ) -> redis::RedisResult<Option<u64>> {
        let ToNumber {
            room,
            kind,
            id,
            data,
            ts_ms,
            provisional,
        } = publish;
        let body = envelope::encode_body(&EnvelopeBody {
            kind: kind.to_byte(),
            ts: ts_ms,
            data: data.as_str(),
            origin: &self.settings.node_id,
            provisional,
            event_id: id.map_or(0, |id| id.0),
        });
        let mut conn = self.commands.clone();
        let (_epoch, number): (String, u64) = self
            .publish_script
            .key(meta_key(room))
            .key(history_key(room))
            .key(ids_key(room))
            .arg(if kind == Kind::State { "state" } else { "event" })
            .arg(data.as_str())
            .arg(ts_ms)
            .arg(self.new_epoch())
            .arg(floor)
            .arg(self.settings.history_len)
            .arg(self.settings.history_ttl.as_millis() as u64)
            .arg(self.settings.state_ttl.as_secs().max(1))
            .arg(body)
            .arg(channel(room))
            .arg(&self.settings.node_id)
            .arg(provisional.map(|p| p.to_string()).unwrap_or_default())
            .arg(if self.settings.cluster { "SPUBLISH" } else { "PUBLISH" })
            .arg(id.map(|id| id.to_string()).unwrap_or_default())
            .arg(if wait_for_holders { "1" } else { "" })
            .invoke_async(&mut conn)
            .await?;
        Ok((number > 0).then_some(number))
    }

    /// Follows the room (subscribes its channel and loads its state and history) before a local
    /// client subscribes. Waits while another subscribe loads the same room.
    async fn follow_room(self: &Arc<Self>, room: &RoomName) -> FollowGuard {
        let follow = {
            let mut follows = lock(&self.follows);
            let follow = follows
                .entry(room.clone())
                .or_insert_with(|| {
                    Arc::new(Follow {
                        buffer: Mutex::new(Some(Vec::new())),
                        ..Follow::default()
                    })
                })
                .clone();
            follow.users.fetch_add(1, Ordering::AcqRel);
            follow
        };
        follow
            .ready
            .get_or_init(|| async {
                if self.is_room_up(room) {
                    let mut pubsub = self.pubsub.clone();
                    if let Err(error) = pubsub.subscribe(channel(room)).await {
                        self.mark_room_down(room, &error);
                    }
                }
                self.load(room, &follow).await;
            })
            .await;
        FollowGuard(follow)
    }

    /// Subscribes a followed room's channel again after Redis dropped it (a slot migration),
    /// holding live messages until the room is re-read, as on the first follow.
    async fn refollow(self: Arc<Self>, room: RoomName, follow: Arc<Follow>) {
        info!(%room, "redis dropped the room's shard channel (slot moved?): subscribing again");
        self.subscribe_again(room, follow).await;
    }

    /// Redis Cluster: the pub/sub connection to some shard was lost. Every followed room
    /// subscribes again and re-reads; a room whose shard does not answer goes into outage alone.
    async fn recheck_rooms(self: Arc<Self>) {
        warn!("a redis cluster pub/sub connection was lost: every room subscribes again");
        let rooms: Vec<(RoomName, Arc<Follow>)> = lock(&self.follows)
            .iter()
            .map(|(room, follow)| (room.clone(), follow.clone()))
            .collect();
        let checks: Vec<_> = rooms
            .into_iter()
            .map(|(room, follow)| {
                let registry = self.clone();
                async move {
                    registry.subscribe_again(room, follow).await;
                    Ok::<_, redis::RedisError>(())
                }
            })
            .collect();
        let _ = run_per_room(checks).await;
    }

    /// Subscribes the room's channel again, holding live messages until it is re-read.
    async fn subscribe_again(&self, room: RoomName, follow: Arc<Follow>) {
        {
            let mut buffer = lock(&follow.buffer);
            if buffer.is_none() {
                *buffer = Some(Vec::new());
            }
        }
        let mut pubsub = self.pubsub.clone();
        if let Err(error) = pubsub.subscribe(channel(&room)).await {
            warn!(%error, %room, "cannot subscribe the room's channel again");
            self.mark_room_down(&room, &error);
        }
        self.load(&room, &follow).await;
    }

    /// Reads the room from Redis into the hub, then applies what arrived meanwhile.
    async fn load(&self, room: &RoomName, follow: &Follow) {
        let now = crate::clock::now();
        let loaded = if self.is_room_up(room) {
            self.read_room(room).await
        } else {
            Err(None)
        };
        match loaded {
            Ok(snapshot) => {
                let _ = self.hub.ensure_room(room, &snapshot.epoch, now.unix_ms);
                for envelope in snapshot.envelopes {
                    self.apply(room, &envelope, now);
                }
            }
            Err(error) => {
                if let Some(error) = error {
                    self.mark_room_down(room, &error);
                }
                // Serve local clients; the resync loads the room (and applies what is held
                // meanwhile) when Redis returns.
                let _ = self.hub.ensure_room(room, &self.new_epoch(), now.unix_ms);
                return;
            }
        }
        let buffered = lock(&follow.buffer).take().unwrap_or_default();
        for envelope in buffered {
            self.apply(room, &envelope, now);
        }
    }

    /// The room's epoch, state and retained events, as envelopes in order.
    async fn read_room(&self, room: &RoomName) -> Result<RoomSnapshot, Option<redis::RedisError>> {
        let mut conn = self.commands.clone();
        let meta = meta_key(room);
        let (_, _, fields, entries): (i64, i64, HashMap<String, String>, StreamEntries) = redis::pipe()
            .hset_nx(&meta, "epoch", self.new_epoch())
            .expire(&meta, self.settings.state_ttl.as_secs().max(1) as i64)
            .hgetall(&meta)
            .xrange_all(history_key(room))
            .query_async(&mut conn)
            .await
            .map_err(Some)?;
        let epoch = fields.get("epoch").cloned().unwrap_or_default();
        let mut envelopes = Vec::with_capacity(entries.len() + 1);
        if let (Some(data), Some(version)) = (fields.get("state"), fields.get("version").and_then(|v| v.parse().ok())) {
            let ts = fields.get("state_ts").and_then(|t| t.parse().ok()).unwrap_or(0);
            envelopes.push(OwnedEnvelope {
                number: version,
                epoch: epoch.clone(),
                kind: Kind::State.to_byte(),
                ts,
                data: data.clone(),
                id: None,
                deliver: true,
            });
        }
        for (_, entry) in entries {
            let Some((seq, id, ts, data)) = stream_event(&epoch, &entry) else {
                continue;
            };
            // This node's own outbox events: its clients got them during the outage.
            let own =
                entry.get("origin") == Some(&self.settings.node_id) && entry.get("prov").is_some_and(|p| !p.is_empty());
            envelopes.push(OwnedEnvelope {
                number: seq,
                epoch: epoch.clone(),
                kind: Kind::Event.to_byte(),
                ts,
                data: data.clone(),
                id: Some(id),
                deliver: !own,
            });
        }
        Ok(RoomSnapshot { epoch, envelopes })
    }

    fn apply(&self, room: &RoomName, envelope: &OwnedEnvelope, now: Now) {
        if let Some(remote) = envelope.remote() {
            self.hub.apply_remote(room, &remote, now);
        }
    }

    /// Reads pub/sub pushes: messages are applied (or buffered while their room loads); a
    /// disconnection marks Redis down; the resubscription after a reconnect starts a resync.
    async fn read_pushes(self: Arc<Self>, mut pushes: mpsc::UnboundedReceiver<PushInfo>) {
        while let Some(push) = pushes.recv().await {
            match push.kind {
                PushKind::Message | PushKind::SMessage => {
                    let [Value::BulkString(channel), Value::BulkString(payload)] = &push.data[..] else {
                        continue;
                    };
                    let Some(room) = room_of_channel(channel) else { continue };
                    match envelope::decode(payload) {
                        Ok(e) => {
                            let own = e.body.origin == self.settings.node_id && e.body.provisional.is_some();
                            let owned = OwnedEnvelope {
                                number: e.number,
                                epoch: e.epoch.to_string(),
                                kind: e.body.kind,
                                ts: e.body.ts,
                                data: e.body.data.to_string(),
                                id: (e.body.kind == Kind::Event.to_byte()).then_some(EventId(e.body.event_id)),
                                deliver: !own,
                            };
                            self.receive(&room, owned);
                        }
                        Err(error) => warn!(%error, %room, "undecodable message from redis"),
                    }
                }
                // On a cluster, the connection to one shard: each followed room checks its own.
                PushKind::Disconnection if self.settings.cluster => {
                    tokio::spawn(self.clone().recheck_rooms());
                }
                PushKind::Disconnection => self.mark_down(&"pub/sub connection lost"),
                PushKind::Subscribe | PushKind::SSubscribe if !self.is_up() => {
                    tokio::spawn(self.clone().resync());
                }
                // Redis 7 unsubscribes a shard channel, unasked, when its slot moves to another
                // master: a room still followed subscribes again (the cluster client routes to
                // the slot's new owner) and re-reads what it may have missed meanwhile. (The
                // node's own unsubscribes come after it stopped following the room.)
                PushKind::SUnsubscribe => {
                    let room = match push.data.first() {
                        Some(Value::BulkString(channel)) => room_of_channel(channel),
                        _ => None,
                    };
                    let follow = room.as_ref().and_then(|room| lock(&self.follows).get(room).cloned());
                    if let (Some(room), Some(follow)) = (room, follow) {
                        tokio::spawn(self.clone().refollow(room, follow));
                    }
                }
                _ => {}
            }
        }
    }

    /// Applies a live message, or holds it while its room loads or while Redis counts as down:
    /// until the resync re-reads the room, a message applied now would move the room's
    /// confirmed sequence past what it has not read yet.
    fn receive(&self, room: &RoomName, envelope: OwnedEnvelope) {
        let follow = lock(&self.follows).get(room).cloned();
        if let Some(follow) = follow {
            let mut buffer = lock(&follow.buffer);
            let held = !self.is_room_up(room);
            if held && buffer.is_none() {
                *buffer = Some(Vec::new());
            }
            if let Some(buffer) = buffer.as_mut() {
                // While Redis is down, what is held is also in Redis and the resync's re-read
                // comes after it: past the history's length the oldest can go.
                if held && buffer.len() >= self.settings.history_len.max(1) {
                    buffer.remove(0);
                }
                buffer.push(envelope);
                return;
            }
        }
        self.apply(room, &envelope, crate::clock::now());
    }

    /// After Redis returns: restore counters (and state) Redis may have lost, publish the outbox
    /// in order, and re-read every followed room, holding live messages until each is re-read.
    async fn resync(self: Arc<Self>) {
        let _one = self.resync.lock().await;
        if self.is_up() {
            return;
        }
        let mut conn = self.commands.clone();
        if let Err(error) = redis::cmd("PING").query_async::<String>(&mut conn).await {
            debug!(%error, "redis still down");
            return;
        }
        let rooms: Vec<(RoomName, Arc<Follow>)> = lock(&self.follows)
            .iter()
            .map(|(room, follow)| (room.clone(), follow.clone()))
            .collect();
        for (_, follow) in &rooms {
            lock(&follow.buffer).get_or_insert_with(Vec::new);
        }
        let result = async {
            // This resync may have started from the heartbeat, before the pub/sub connection
            // subscribed again: subscribe every followed room's channel now (Redis confirms each),
            // so what other nodes publish from here on arrives live, and the re-read below covers
            // what they published before. Otherwise a message published in between is lost.
            run_per_room(
                rooms
                    .iter()
                    .map(|(room, _)| {
                        let (channel, mut pubsub) = (channel(room), self.pubsub.clone());
                        async move { pubsub.subscribe(channel).await }
                    })
                    .collect(),
            )
            .await?;
            // Rooms are reseeded independently; the outbox then flushes in order.
            let (script, ttl_s) = (&self.reseed_script, self.settings.state_ttl.as_secs().max(1));
            run_per_room(
                rooms
                    .iter()
                    .filter_map(|(room, _)| {
                        let numbers = self.hub.room_numbers(room)?;
                        let (data, ts) = numbers
                            .state
                            .as_ref()
                            .map_or((String::new(), 0), |s| (s.data().to_string(), s.ts_ms));
                        let (key, mut conn) = (meta_key(room), conn.clone());
                        Some(async move {
                            script
                                .key(key)
                                .arg(numbers.epoch)
                                .arg(numbers.version)
                                .arg(numbers.seq)
                                .arg(data)
                                .arg(ts)
                                .arg(ttl_s)
                                .invoke_async::<String>(&mut conn)
                                .await
                        })
                    })
                    .collect(),
            )
            .await?;
            // In order; a room whose publishes must wait for its holders keeps them all, and
            // resyncs on its own afterwards (`resync_room`).
            let items: Vec<OutboxItem> = lock(&self.outbox).iter().cloned().collect();
            for item in items {
                if lock(&self.down_rooms).contains_key(&item.room) {
                    continue;
                }
                let wait = self.waits_for_holders(&item.room);
                if self.run_publish_unless_new(item.to_number(), 0, wait).await?.is_none() {
                    self.wait_for_holders(&item.room);
                    continue;
                }
                self.remove_from_outbox(&item);
            }
            Ok::<_, redis::RedisError>(())
        }
        .await;
        if let Err(error) = result {
            // The rooms stay held (their buffers kept): the next resync re-reads them, and a
            // live message applied meanwhile could skip what this one could not read.
            warn!(%error, "redis resync failed; retrying");
            return;
        }
        self.up.store(true, Ordering::Release);
        self.metrics.registry_up.set(1);
        info!(rooms = rooms.len(), "redis is back: outbox published, rooms re-read");
        let now = crate::clock::now();
        for (room, follow) in rooms {
            match self.read_room(&room).await {
                Ok(snapshot) => {
                    let read: Vec<RemotePublication<'_>> =
                        snapshot.envelopes.iter().filter_map(OwnedEnvelope::remote).collect();
                    self.hub.resume_from(&room, &snapshot.epoch, &read, now);
                }
                Err(error) => warn!(error = ?error, %room, "cannot re-read room after reconnect"),
            }
            let buffered = lock(&follow.buffer).take().unwrap_or_default();
            for envelope in buffered {
                self.apply(&room, &envelope, now);
            }
        }
    }

    /// Stops following rooms whose last local subscriber left.
    async fn unfollow_emptied(self: Arc<Self>, mut emptied: mpsc::UnboundedReceiver<RoomName>) {
        while let Some(room) = emptied.recv().await {
            let unfollowed = {
                let mut follows = lock(&self.follows);
                match follows.get(&room) {
                    Some(f) if f.users.load(Ordering::Acquire) == 0 && self.hub.subscriber_count(&room) == 0 => {
                        follows.remove(&room);
                        self.hub.remove_if_unsubscribed(&room);
                        true
                    }
                    _ => false,
                }
            };
            if unfollowed {
                let mut pubsub = self.pubsub.clone();
                if let Err(error) = pubsub.unsubscribe(channel(&room)).await {
                    debug!(%error, %room, "unsubscribe failed");
                }
                let mut conn = self.commands.clone();
                let _: redis::RedisResult<()> = conn.hdel(presence_key(&room), &self.settings.node_id).await;
            }
        }
    }

    /// Every heartbeat: refresh this node's record and its rooms' presence counts; while down,
    /// probe Redis and resync when it answers.
    async fn heartbeat(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut beat_failing = false;
        loop {
            tick.tick().await;
            if !self.is_up() {
                tokio::spawn(self.clone().resync());
                continue;
            }
            // Each room in outage on its own is resynced on its own, one attempt at a time.
            let due: Vec<RoomName> = lock(&self.down_rooms)
                .iter_mut()
                .filter(|(_, outage)| !outage.resyncing)
                .map(|(room, outage)| {
                    outage.resyncing = true;
                    room.clone()
                })
                .collect();
            for room in due {
                tokio::spawn(self.clone().resync_room(room));
            }
            match self.beat().await {
                // On a cluster the node records live on one shard: presence suffers, rooms do not.
                Err(error) if self.settings.cluster => {
                    if !beat_failing {
                        warn!(%error, "cannot refresh this node's record and presence in redis");
                    }
                    beat_failing = true;
                }
                Err(error) => self.mark_down(&error),
                Ok(()) => beat_failing = false,
            }
        }
    }

    /// Brings one room in outage on its own back (on a cluster its shard answers again, or a
    /// replica took over; or its holders had their time to put it back): subscribes its channel,
    /// reseeds it, publishes its outbox items in order, then re-reads it into the hub as the
    /// whole-Redis resync does (`Hub::resume_from`).
    async fn resync_room(self: Arc<Self>, room: RoomName) {
        let follow = lock(&self.follows).get(&room).cloned();
        if let Some(follow) = &follow {
            lock(&follow.buffer).get_or_insert_with(Vec::new);
        }
        let flushed = async {
            if follow.is_some() {
                self.pubsub.clone().subscribe(channel(&room)).await?;
            }
            if let Some(numbers) = self.hub.room_numbers(&room) {
                let (data, ts) = numbers
                    .state
                    .as_ref()
                    .map_or((String::new(), 0), |s| (s.data().to_string(), s.ts_ms));
                self.reseed_script
                    .key(meta_key(&room))
                    .arg(numbers.epoch)
                    .arg(numbers.version)
                    .arg(numbers.seq)
                    .arg(data)
                    .arg(ts)
                    .arg(self.settings.state_ttl.as_secs().max(1))
                    .invoke_async::<String>(&mut self.commands.clone())
                    .await?;
            }
            loop {
                let next = {
                    let outbox = lock(&self.outbox);
                    let next = outbox.iter().find(|item| item.room == room).cloned();
                    if next.is_none() {
                        // Under the outbox lock: a publish from now on goes to Redis.
                        lock(&self.down_rooms).remove(&room);
                    }
                    next
                };
                let Some(item) = next else { break };
                let wait = self.waits_for_holders(&room);
                if self.run_publish_unless_new(item.to_number(), 0, wait).await?.is_none() {
                    return Ok(false);
                }
                self.remove_from_outbox(&item);
            }
            Ok::<_, redis::RedisError>(true)
        }
        .await;
        let retry_later = |what: &dyn std::fmt::Display| {
            debug!(%room, "{what}");
            if let Some(outage) = lock(&self.down_rooms).get_mut(&room) {
                outage.resyncing = false;
            }
        };
        match flushed {
            Ok(true) => {}
            Ok(false) => return retry_later(&"the room's publishes still wait for its holders"),
            Err(error) => return retry_later(&format_args!("the room's redis shard is still down: {error}")),
        }
        if lock(&self.down_rooms).is_empty() && self.is_up() {
            self.metrics.registry_up.set(1);
        }
        info!(%room, "the room is back on redis: its outbox published, the room re-read");
        let Some(follow) = follow else { return };
        let now = crate::clock::now();
        match self.read_room(&room).await {
            Ok(snapshot) => {
                let read: Vec<RemotePublication<'_>> =
                    snapshot.envelopes.iter().filter_map(OwnedEnvelope::remote).collect();
                self.hub.resume_from(&room, &snapshot.epoch, &read, now);
            }
            Err(error) => {
                // Held messages stay held until the next attempt re-reads the room.
                warn!(error = ?error, %room, "cannot re-read the room after its shard returned");
                self.mark_room_down(&room, &"re-read failed");
                return;
            }
        }
        let buffered = lock(&follow.buffer).take().unwrap_or_default();
        for envelope in buffered {
            self.apply(&room, &envelope, now);
        }
    }

    async fn beat(&self) -> redis::RedisResult<()> {
        let ttl_ms = (self.settings.heartbeat * 3).as_millis() as u64;
        let now_ms = crate::clock::unix_ms();
        let id = &self.settings.node_id;
        let connections = self.metrics.websocket.connections.get() + self.metrics.webtransport.connections.get();
        let mut pipe = redis::pipe();
        pipe.hset_multiple(
            node_key(id),
            &[
                ("connections", connections.to_string()),
                ("subscriptions", self.metrics.subscriptions.get().to_string()),
                ("rooms", self.hub.room_count().to_string()),
                ("http", self.settings.http.clone()),
            ],
        )
        .ignore()
        .pexpire(node_key(id), ttl_ms as i64)
        .ignore()
        .zadd(NODES_KEY, id, now_ms + ttl_ms)
        .ignore()
        .zrembyscore(NODES_KEY, 0, now_ms)
        .ignore();
        let mut conn = self.commands.clone();
        pipe.query_async::<()>(&mut conn).await?;
        let rooms: Vec<RoomName> = lock(&self.follows).keys().cloned().collect();
        let presence_of = |room: &RoomName, pipe: &mut redis::Pipeline| {
            pipe.hset(presence_key(room), id, self.hub.subscriber_count(room))
                .ignore()
                .pexpire(presence_key(room), ttl_ms as i64)
                .ignore();
        };
        if !self.settings.cluster {
            let mut presence = redis::pipe();
            rooms.iter().for_each(|room| presence_of(room, &mut presence));
            if !presence.is_empty() {
                presence.query_async::<()>(&mut conn).await?;
            }
            return Ok(());
        }
        // A cluster refuses pipelines across hash slots: one pipeline per room, each in its slot,
        // many at a time (one after another, a node with thousands of rooms would spend seconds
        // of round trips per heartbeat, and its presence could expire meanwhile).
        run_per_room(
            rooms
                .iter()
                .map(|room| {
                    let (mut presence, mut conn) = (redis::pipe(), conn.clone());
                    presence_of(room, &mut presence);
                    async move { presence.query_async::<()>(&mut conn).await }
                })
                .collect(),
        )
        .await
    }

    /// Nodes alive now (their record has not expired).
    async fn live_nodes(&self) -> redis::RedisResult<Vec<NodeRecord>> {
        let mut conn = self.commands.clone();
        let now_ms = crate::clock::unix_ms();
        let ids: Vec<String> = conn.zrangebyscore(NODES_KEY, now_ms, "+inf").await?;
        let mut nodes = Vec::with_capacity(ids.len());
        for id in ids {
            let fields: HashMap<String, String> = conn.hgetall(node_key(&id)).await?;
            if fields.is_empty() {
                continue;
            }
            let number = |k: &str| fields.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
            nodes.push(NodeRecord {
                connections: number("connections"),
                subscriptions: number("subscriptions"),
                rooms: number("rooms"),
                http: fields.get("http").cloned().unwrap_or_default(),
                id,
            });
        }
        Ok(nodes)
    }

    /// The room as Redis holds it, with the cluster-wide subscriber count.
    async fn shared_room(&self, room: &RoomName) -> redis::RedisResult<Option<RoomFigures>> {
        let mut conn = self.commands.clone();
        let (fields, presence): (HashMap<String, String>, HashMap<String, u64>) = redis::pipe()
            .hgetall(meta_key(room))
            .hgetall(presence_key(room))
            .query_async(&mut conn)
            .await?;
        let Some(epoch) = fields.get("epoch").cloned() else {
            return Ok(None);
        };
        let mut subscribers = 0;
        for (node, count) in presence {
            let alive: bool = conn.exists(node_key(&node)).await?;
            if alive {
                subscribers += count;
            } else {
                let _: () = conn.hdel(presence_key(room), &node).await?;
            }
        }
        let number = |k: &str| fields.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok(Some(RoomFigures {
            epoch,
            version: number("version"),
            last_seq: number("seq"),
            state: fields.get("state").map(|data| StoredState {
                ts_ms: number("state_ts"),
                data: data.clone(),
            }),
            subscribers,
        }))
    }

    /// One page of the retained events after `since` from the Redis stream: `Err(last_seq)` when
    /// it no longer reaches back that far, `None` when Redis holds no such room. Reads only the
    /// entries after `since` (sequences only grow, one per entry: the newest `last_seq - since`).
    async fn shared_events(
        &self,
        room: &RoomName,
        since: u64,
        page: HistoryPage,
    ) -> redis::RedisResult<Option<RoomEvents>> {
        let mut conn = self.commands.clone();
        let fields: HashMap<String, String> = conn.hgetall(meta_key(room)).await?;
        let Some(epoch) = fields.get("epoch").cloned() else {
            return Ok(None);
        };
        let last_seq: u64 = fields.get("seq").and_then(|v| v.parse().ok()).unwrap_or(0);
        if since >= last_seq {
            let events = if since == last_seq {
                Ok(Vec::new())
            } else {
                Err(last_seq)
            };
            return Ok(Some(RoomEvents {
                epoch,
                events,
                more: false,
            }));
        }
        let newest = (last_seq - since).min(self.settings.history_len.max(1) as u64);
        let mut entries: StreamEntries = redis::cmd("XREVRANGE")
            .arg(history_key(room))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(newest)
            .query_async(&mut conn)
            .await?;
        entries.reverse();
        let events: Vec<StoredEvent> = entries
            .iter()
            .filter_map(|(_, e)| {
                stream_event(&epoch, e).map(|(seq, id, ts_ms, data)| StoredEvent {
                    seq,
                    id,
                    ts_ms,
                    data: data.clone(),
                })
            })
            .collect();
        let mut events: Vec<StoredEvent> = events.into_iter().filter(|e| e.seq > since).collect();
        let first = events.first().map_or(last_seq + 1, |e| e.seq);
        if since + 1 < first {
            return Ok(Some(RoomEvents {
                epoch,
                events: Err(last_seq),
                more: false,
            }));
        }
        let (count, more) = page.fit(events.iter().map(|e| e.data.len()));
        events.truncate(count);
        Ok(Some(RoomEvents {
            epoch,
            events: Ok(events),
            more,
        }))
    }
}

struct RoomSnapshot {
    epoch: String,
    envelopes: Vec<OwnedEnvelope>,
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
        tokio::spawn(async move {
            // Held until `then` has joined the room to the hub, so it is not unfollowed first.
            let _following = redis.follow_room(&room).await;
            then(crate::clock::unix_ms());
        });
    }

    fn room<'a>(&'a self, room: &'a RoomName) -> BoxFuture<'a, Result<Option<RoomFigures>, RegistryError>> {
        async move {
            // The cluster's view; while Redis is away, this node's own.
            match self.shared_room(room).await {
                Ok(figures) => Ok(figures),
                Err(_) => Ok(EmbeddedRegistry::local_room(&self.hub, room)),
            }
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
            self.shared_events(room, since, page)
                .await
                .map_err(|e| RegistryError::Unavailable(e.to_string()))
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
            let mut conn = self.commands.clone();
            let record = format!("{KEY_ANSWERED}{}", answer.encode());
            let _: () = redis::cmd("SET")
                .arg(idempotency_key(key))
                .arg(record)
                .arg("PX")
                .arg(window.as_millis() as u64)
                .query_async(&mut conn)
                .await
                .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
            Ok(())
        }
        .boxed()
    }

    fn release_key<'a>(&'a self, key: &'a IdempotencyKey) -> BoxFuture<'a, ()> {
        async move {
            let mut conn = self.commands.clone();
            let _: Result<(), _> = conn.del(idempotency_key(key)).await;
        }
        .boxed()
    }
}

/// A publisher's idempotency key in Redis (one key each, any slot).
fn idempotency_key(key: &IdempotencyKey) -> String {
    format!("cs:idem:{}", key.as_str())
}

/// How a key's record starts: claimed by a publish under way, or answered (then the answer).
const KEY_PENDING: &str = "pending\n";
const KEY_ANSWERED: &str = "answered\n";

impl RedisRegistry {
    /// `SET NX` claims the key across every node; a key already there is read back.
    async fn claim_key_shared(
        &self,
        key: &IdempotencyKey,
        fingerprint: &str,
        window: Duration,
    ) -> redis::RedisResult<Claim> {
        let mut conn = self.commands.clone();
        let name = idempotency_key(key);
        let set: Option<String> = redis::cmd("SET")
            .arg(&name)
            .arg(format!("{KEY_PENDING}{fingerprint}"))
            .arg("NX")
            .arg("PX")
            .arg(window.min(crate::idempotency::PENDING_TTL).as_millis() as u64)
            .query_async(&mut conn)
            .await?;
        if set.is_some() {
            return Ok(Claim::Claimed);
        }
        let record: Option<String> = conn.get(&name).await?;
        Ok(match record {
            // Expired between the two commands: claim it again.
            None => return Box::pin(self.claim_key_shared(key, fingerprint, window)).await,
            Some(record) => match record.strip_prefix(KEY_ANSWERED).and_then(Answer::decode) {
                Some(answer) => Claim::Answered(answer),
                None => Claim::InProgress {
                    fingerprint: record.strip_prefix(KEY_PENDING).unwrap_or_default().to_string(),
                },
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The publish script against a real redis-server (tests/run.sh installs it): an event id
    /// sent again gets its first number back, and nothing is stored or published twice.
    #[tokio::test]
    async fn the_publish_script_numbers_an_event_id_once() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let mut server = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("client");
        let mut conn = loop {
            match client.get_multiplexed_async_connection().await {
                Ok(conn) => break conn,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let room = RoomName::parse("game:once").expect("room");
        let script = Script::new(PUBLISH_LUA);
        let mut publish = async |id: &str| -> u64 {
            let (_epoch, n): (String, u64) = script
                .key(meta_key(&room))
                .key(history_key(&room))
                .key(ids_key(&room))
                .arg("event")
                .arg("1")
                .arg(1)
                .arg("ep")
                .arg(0)
                .arg(1000)
                .arg(600_000)
                .arg(60)
                .arg(Vec::<u8>::new())
                .arg(channel(&room))
                .arg("n1")
                .arg("")
                .arg("PUBLISH")
                .arg(id)
                .invoke_async(&mut conn)
                .await
                .expect("script");
            n
        };
        let first = publish("00000000000000a1").await;
        let again = publish("00000000000000a1").await;
        let other = publish("00000000000000b2").await;
        let stored: u64 = redis::cmd("XLEN")
            .arg(history_key(&room))
            .query_async(&mut conn)
            .await
            .expect("xlen");
        let _ = server.kill();
        let _ = server.wait();
        assert_eq!((first, again, other, stored), (1, 1, 2, 2));
    }

    #[test]
    fn cluster_seeds_may_be_bare_host_ports_after_the_first_url() {
        assert_eq!(
            cluster_seeds("127.0.0.1:7000, 127.0.0.1:7001"),
            ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]
        );
        assert_eq!(
            cluster_seeds("rediss://:t@h1:6379,h2:6379,redis://h3:6379"),
            ["rediss://:t@h1:6379", "rediss://:t@h2:6379", "redis://h3:6379"]
        );
        assert_eq!(cluster_seeds("redis://h1:1,"), ["redis://h1:1"]);
    }

    #[test]
    fn resp3_is_asked_for_in_the_query_before_any_fragment() {
        assert_eq!(with_resp3("redis://h:6379"), "redis://h:6379?protocol=resp3");
        assert_eq!(
            with_resp3("redis://h:6379/0?x=1"),
            "redis://h:6379/0?x=1&protocol=resp3"
        );
        assert_eq!(
            with_resp3("rediss://:t@h:6379/#insecure"),
            "rediss://:t@h:6379/?protocol=resp3#insecure"
        );
        assert_eq!(with_resp3("redis://h?protocol=resp3"), "redis://h?protocol=resp3");
    }

    #[test]
    fn channels_name_their_room() {
        let room = RoomName::parse("game:1").expect("room");
        assert_eq!(channel(&room), "cs:{game:1}:ch");
        assert_eq!(room_of_channel(channel(&room).as_bytes()), Some(room));
        assert_eq!(room_of_channel(b"cs:{bad room}:ch"), None);
        assert_eq!(room_of_channel(b"other"), None);
    }
}
