//! The node's rooms and their fan-out: rooms in 64 shards, each room behind its own lock; each
//! connection a `Subscriber` (its queue and wake-up, `subscriber`). No global lock. (Sharing
//! rooms between nodes is the `registry`'s; the hub is the local half either way.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::core::{
    ConnectionQueue, EventId, EventIds, JsonData, Kind, Now, Publication, Pushed, QueueLimits, RetentionLimits, Room,
    RoomId, RoomName, ServerControl,
};
use crate::metrics::{Metrics, PerTransport, Transport};

const SHARDS: usize = 64;

pub mod subscriber;

pub use subscriber::{ConnId, Direct, DirectWrite, Subscriber};
use subscriber::{FanoutTally, Offered};

/// What the hub needs to know, built by the caller (the hub reads no environment).
#[derive(Debug, Clone, Copy)]
pub struct HubConfig {
    pub retention: RetentionLimits,
    pub queue: QueueLimits,
    /// Rooms this node holds at most; creating one more fails with `HubError::RoomLimit`.
    pub max_rooms: usize,
}

impl HubConfig {
    pub fn from_config(config: &crate::config::ServeConfig) -> Self {
        Self {
            retention: RetentionLimits {
                history_len: config.rooms.history_size,
                history_ttl: config.rooms.history_ttl,
                history_bytes: config.rooms.history_bytes,
                state_ttl: config.rooms.state_ttl,
            },
            queue: QueueLimits {
                max_messages: config.connection.queue_messages,
                max_bytes: config.connection.queue_bytes,
            },
            max_rooms: config.rooms.max_rooms,
        }
    }
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            retention: RetentionLimits::default(),
            queue: QueueLimits::default(),
            max_rooms: 100_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    #[error("the node holds its maximum of {0} rooms")]
    RoomLimit(usize),
}

/// What a publisher is told: the version or sequence assigned, and the ingest time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishReceipt {
    /// The state version or the event sequence number.
    pub number: u64,
    /// The event's identity (`None` for a state).
    pub id: Option<EventId>,
    pub ts_ms: u64,
    /// Local subscribers the publication was offered to.
    pub subscribers: usize,
}

/// A room's current figures, for `GET /v1/rooms/{room}`.
#[derive(Debug, Clone)]
pub struct RoomInfo {
    pub epoch: String,
    pub state: Option<Arc<Publication>>,
    pub version: u64,
    pub last_seq: u64,
    pub subscribers: usize,
}

/// A room's load, for the operations page (`Hub::busiest_rooms`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomLoad {
    pub room: RoomName,
    pub subscribers: usize,
    pub version: u64,
    pub seq: u64,
}

/// A publication that arrived through the shared registry, already numbered.
#[derive(Debug, Clone)]
pub struct RemotePublication<'a> {
    pub epoch: &'a str,
    pub kind: Kind,
    pub number: u64,
    /// The event's identity, as the accepting node assigned it (`None` for a state).
    pub id: Option<EventId>,
    pub ts_ms: u64,
    pub data: JsonData,
    /// False when this node's clients already received it (published during a Redis outage).
    pub deliver: bool,
}

/// A room's epoch, counters and state, as this node holds them.
#[derive(Debug, Clone)]
pub struct RoomNumbers {
    /// The shared registry's epoch for the room (not a local outage epoch).
    pub epoch: String,
    /// The last numbers the registry assigned.
    pub version: u64,
    pub seq: u64,
    pub state: Option<Arc<Publication>>,
}

/// The last `seq` of the run of events in `read` (in number order) that follows `from` without a
/// gap.
fn run_end(read: &[RemotePublication<'_>], from: u64) -> u64 {
    let mut end = from;
    for remote in read.iter().filter(|r| r.kind == Kind::Event) {
        if remote.number == end + 1 {
            end += 1;
        } else if remote.number > end {
            break;
        }
    }
    end
}

/// What a live message of the shared registry did (`Hub::apply_live`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Live {
    Applied,
    /// This node does not hold the room.
    NotHeld,
    /// An event numbered past `after + 1`: nothing applied; the room is to be re-read first.
    Gap {
        after: u64,
    },
}

/// A room's retained events after some sequence number.
#[derive(Debug, Clone)]
pub struct RoomHistory {
    pub epoch: String,
    /// The events, or `Err(last_seq)` when the history no longer reaches back that far.
    pub events: Result<Vec<Arc<Publication>>, u64>,
}

/// What one fan-out did, per transport.
#[derive(Debug, Default)]
struct FanoutOutcome {
    pushed: PerTransport<FanoutTally>,
    written: PerTransport<u64>,
}

impl FanoutOutcome {
    fn flush(&mut self, metrics: &Metrics, publication: &Publication) {
        for transport in Transport::ALL {
            self.pushed[transport].flush(metrics, transport);
            if self.written[transport] > 0 {
                metrics.record_direct_deliveries(transport, self.written[transport], publication);
            }
        }
    }
}

/// Which of the two room budgets (each `max_rooms`) a room counts against: the publisher's, for
/// rooms a publish created, or the subscribers', for rooms a subscribe named first. Subscribers
/// who invent room names fill their own budget only: they can never refuse the publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    Published = 0,
    Subscribed = 1,
}

#[derive(Debug)]
struct RoomEntry {
    room: Room,
    budget: Budget,
    subscribers: HashMap<ConnId, Arc<Subscriber>>,
    /// Set once the room left its shard; a caller holding a stale `Arc` looks it up again.
    removed: bool,
    /// Kept while the shared registry follows the room, even with nobody subscribed yet.
    pinned: bool,
    pace: FanoutPace,
}

/// When the fan-out may write into sockets itself. Writing a message per socket write is
/// cheapest while publishes are far apart; when they come faster than such a fan-out takes,
/// messages must wait in the queues, so each connection's task writes several in one write.
/// A direct fan-out is allowed when publishes are this many times further apart than it takes:
/// the sockets' readers, and everything else on the machine, need the rest of the time.
const DIRECT_HEADROOM: u32 = 3;

#[derive(Debug, Default)]
struct FanoutPace {
    last: Option<std::time::Instant>,
    /// What the last direct fan-out cost per subscriber, in nanoseconds.
    cost_per_subscriber_ns: u64,
}

impl FanoutPace {
    /// Whether this fan-out may write directly: the time since the last one covers what a
    /// direct fan-out to `subscribers` costs.
    fn allows_direct(&self, now: std::time::Instant, subscribers: usize) -> bool {
        match self.last {
            None => true,
            Some(last) => {
                let cost = Duration::from_nanos(self.cost_per_subscriber_ns.saturating_mul(subscribers as u64));
                now.saturating_duration_since(last) >= cost * DIRECT_HEADROOM
            }
        }
    }
}

impl RoomEntry {
    fn is_empty(&self) -> bool {
        self.subscribers.is_empty() && !self.room.retains_data() && !self.pinned
    }
}

#[derive(Debug)]
struct RoomSlot(Mutex<RoomEntry>);

impl RoomSlot {
    fn lock(&self) -> MutexGuard<'_, RoomEntry> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

type Shard = Mutex<HashMap<RoomName, Arc<RoomSlot>>>;

/// The local registry: a cloneable handle.
#[derive(Debug, Clone)]
pub struct Hub(Arc<HubInner>);

#[derive(Debug)]
struct HubInner {
    shards: Box<[Shard]>,
    config: HubConfig,
    metrics: Arc<Metrics>,
    room_count: AtomicUsize,
    /// Rooms per `Budget`.
    budget_rooms: [AtomicUsize; 2],
    next_room_id: AtomicU64,
    next_conn_id: AtomicU64,
    /// Random per process, so epochs differ across restarts.
    epoch_seed: u64,
    /// Identities for the events this node accepts.
    event_ids: EventIds,
    /// Told the name of a room whose last local subscriber left (the Redis registry unfollows it).
    emptied: Mutex<Option<tokio::sync::mpsc::UnboundedSender<RoomName>>>,
}

impl Hub {
    pub fn new(config: HubConfig, metrics: Arc<Metrics>, epoch_seed: u64) -> Self {
        let shards = (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect();
        Self(Arc::new(HubInner {
            shards,
            config,
            metrics,
            room_count: AtomicUsize::new(0),
            budget_rooms: [AtomicUsize::new(0), AtomicUsize::new(0)],
            next_room_id: AtomicU64::new(1),
            next_conn_id: AtomicU64::new(1),
            epoch_seed,
            event_ids: EventIds::starting_at(crate::random::random_u64()),
            emptied: Mutex::new(None),
        }))
    }

    /// Asks to be told when a room's last local subscriber leaves.
    pub fn notify_emptied_rooms(&self, sender: tokio::sync::mpsc::UnboundedSender<RoomName>) {
        *self.0.emptied.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender);
    }

    /// A new event's identity (docs/PROTOCOL.md, "Event identity").
    pub fn next_event_id(&self) -> EventId {
        self.0.event_ids.next()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.0.metrics
    }

    pub fn room_count(&self) -> usize {
        self.0.room_count.load(Ordering::Relaxed)
    }

    /// A new connection's handle, with an empty queue.
    pub fn new_subscriber(&self, transport: Transport) -> Arc<Subscriber> {
        let id = self.0.next_conn_id.fetch_add(1, Ordering::Relaxed);
        Arc::new(Subscriber::new(id, transport, self.0.config.queue))
    }

    /// Assigns the next version or sequence and offers the publication to every local subscriber.
    pub fn publish(&self, room: &RoomName, kind: Kind, data: &JsonData, now: Now) -> Result<PublishReceipt, HubError> {
        let id = (kind == Kind::Event).then(|| self.next_event_id());
        let receipt = self.with_room(room, Some(Budget::Published), now.unix_ms, |entry| {
            self.publish_in(entry, kind, id, data, now)
        })?;
        match kind {
            Kind::State => self.0.metrics.published_states.inc(),
            Kind::Event => self.0.metrics.published_events.inc(),
        };
        // `with_room` with `create` always yields a room.
        receipt.ok_or(HubError::RoomLimit(self.0.config.max_rooms))
    }

    /// Numbers a publish in the room (its lock held) and fans it out.
    fn publish_in(
        &self,
        entry: &mut RoomEntry,
        kind: Kind,
        id: Option<EventId>,
        data: &JsonData,
        now: Now,
    ) -> PublishReceipt {
        let publication = match (kind, id) {
            (Kind::Event, Some(id)) => entry.room.publish_event(id, data, now),
            (Kind::Event, None) => entry.room.publish_event(self.next_event_id(), data, now),
            (Kind::State, _) => entry.room.publish_state(data, now),
        };
        self.fan_out(entry, &publication);
        PublishReceipt {
            number: publication.number(),
            id: publication.id,
            ts_ms: publication.ts_ms,
            subscribers: entry.subscribers.len(),
        }
    }

    /// Offers a publication to every subscriber of the room (the caller holds the room lock, so
    /// every queue receives the room's publications in the same order).
    fn fan_out(&self, entry: &mut RoomEntry, publication: &Arc<Publication>) {
        let offer: fn(&mut ConnectionQueue, &Arc<Publication>) -> Pushed = match publication.kind {
            Kind::State => ConnectionQueue::push_state,
            Kind::Event => ConnectionQueue::push_event,
        };
        let started = std::time::Instant::now();
        let subscribers = entry.subscribers.len();
        let direct = entry.pace.allows_direct(started, subscribers);
        let mut outcome = FanoutOutcome::default();
        for subscriber in entry.subscribers.values() {
            let t = subscriber.transport();
            match subscriber.offer_publication(publication, offer, direct) {
                Offered::Written => outcome.written[t] += 1,
                Offered::Pushed(pushed) => outcome.pushed[t].add(pushed),
            }
        }
        entry.pace.last = Some(started);
        if direct && subscribers > 0 {
            entry.pace.cost_per_subscriber_ns = (started.elapsed().as_nanos() / subscribers as u128) as u64;
        }
        outcome.flush(&self.0.metrics, publication);
    }

    /// Applies a publication numbered by the shared registry to the local room and fans it out
    /// (unless `deliver` is false: the local clients already have it). A message from another
    /// epoch restarts the room first and tells its subscribers (`subscribed` with the new epoch
    /// and `recovered: false`). Returns whether this node holds the room.
    pub fn apply_remote(&self, room: &RoomName, remote: &RemotePublication<'_>, now: Now) -> bool {
        let held = self.with_room(room, None, now.unix_ms, |entry| {
            if entry.room.epoch() != remote.epoch && entry.room.resume(remote.epoch) {
                self.tell_subscribers(entry, room, Some(false));
            }
            self.apply_telling(entry, room, remote, now);
        });
        matches!(held, Ok(Some(())))
    }

    /// Applies a registry publication outside a resume. An event that moves the room's `seq` on
    /// without going out (the subscribers took it under a local epoch, or hold its id) gets them
    /// a `recovered: true` notice with that `seq` instead, so the next event is not a skip.
    fn apply_telling(&self, entry: &mut RoomEntry, room: &RoomName, remote: &RemotePublication<'_>, now: Now) {
        let before = entry.room.last_seq();
        let delivered = self.apply_in(entry, remote, remote.deliver, now);
        if !delivered && entry.room.last_seq() > before && !entry.room.in_outage() {
            self.tell_subscribers(entry, room, Some(true));
        }
    }

    /// Applies a live message of the registry's channel as `apply_remote` does, unless it is an
    /// event that skips numbers the room has not seen (pub/sub is at most once: a message lost
    /// around a reconnect): then nothing is applied and `Live::Gap` says the room must be re-read
    /// from the registry's history first, so that subscribers get the skipped events in order.
    pub fn apply_live(&self, room: &RoomName, remote: &RemotePublication<'_>, now: Now) -> Live {
        let applied = self.with_room(room, None, now.unix_ms, |entry| {
            let skips = remote.kind == Kind::Event
                && entry.room.epoch() == remote.epoch
                && !entry.room.in_outage()
                && remote.number > entry.room.last_seq() + 1;
            if skips {
                return Live::Gap {
                    after: entry.room.last_seq(),
                };
            }
            if entry.room.epoch() != remote.epoch && entry.room.resume(remote.epoch) {
                self.tell_subscribers(entry, room, Some(false));
            }
            // An event the subscribers took under a local epoch (this node's own, or one it gave
            // out while it resumed), applied after a hole filled, gets them a notice instead.
            self.apply_telling(entry, room, remote, now);
            Live::Applied
        });
        match applied {
            Ok(Some(live)) => live,
            _ => Live::NotHeld,
        }
    }

    /// Applies one registry publication to the room (its lock held), fanning it out if `deliver`.
    /// Returns whether it went out to the subscribers.
    fn apply_in(&self, entry: &mut RoomEntry, remote: &RemotePublication<'_>, deliver: bool, now: Now) -> bool {
        let applied = match remote.kind {
            Kind::State => entry.room.apply_state(remote.number, remote.ts_ms, &remote.data, now),
            Kind::Event => {
                let id = remote.id.unwrap_or_else(|| self.next_event_id());
                entry
                    .room
                    .apply_event(remote.number, id, remote.ts_ms, &remote.data, now)
            }
        };
        match (applied, deliver) {
            (Some(publication), true) => {
                self.fan_out(entry, &publication);
                true
            }
            _ => false,
        }
    }

    /// Brings the room back to the registry's numbering after an outage, from a fresh read of
    /// the registry (`read`: its state and retained events in order), so that no subscriber
    /// misses an event or gets one twice (docs/PROTOCOL.md, "Epochs"):
    /// - same registry epoch (the usual case, whether Redis kept its data or was reseeded): the
    ///   events after the last confirmed sequence that this node did not deliver itself (by id)
    ///   go out first, still under the local epoch; then the room takes the registry's numbers and
    ///   subscribers get a notice with `recovered: true` whose `seq` is the registry's last;
    /// - another registry epoch (the room was re-created there): the notice says
    ///   `recovered: false` with the new epoch's last `seq` (the client refetches; ids tell it what
    ///   it holds).
    ///
    /// Either way the newest state follows the notice, and live events continue at `seq + 1`.
    ///
    /// Under the same numbering only the events that follow on without a gap are taken (after an
    /// empty restart, publishers send what Redis lost again in no set order): returns the last
    /// `seq` taken, and the caller applies the read events past it in order as they fill in
    /// (`u64::MAX`: every event was taken).
    pub fn resume_from(&self, room: &RoomName, epoch: &str, read: &[RemotePublication<'_>], now: Now) -> u64 {
        let resumed = self.with_room(room, None, now.unix_ms, |entry| {
            if !entry.room.in_outage() && entry.room.epoch() == epoch {
                let end = run_end(read, entry.room.last_seq());
                for remote in read.iter().filter(|r| r.kind == Kind::State || r.number <= end) {
                    self.apply_telling(entry, room, remote, now);
                }
                return end;
            }
            let same_numbering = entry.room.registry_epoch() == epoch;
            let mut end = u64::MAX;
            if same_numbering {
                let (_, confirmed_seq) = entry.room.confirmed();
                end = run_end(read, confirmed_seq);
                for remote in read {
                    // Told apart by id: the room holds what it numbered itself during the outage
                    // and what it had before (sent again under a new number if Redis lost it).
                    let missed = remote.kind == Kind::Event
                        && remote.number > confirmed_seq
                        && remote.number <= end
                        && !remote.id.is_some_and(|id| entry.room.holds_event(id));
                    if missed {
                        self.publish_in(entry, Kind::Event, remote.id, &remote.data, now);
                    }
                }
            }
            entry.room.resume(epoch);
            for remote in read.iter().filter(|r| r.kind == Kind::Event && r.number <= end) {
                self.apply_in(entry, remote, false, now);
            }
            self.tell_subscribers(entry, room, Some(same_numbering));
            for remote in read.iter().filter(|r| r.kind == Kind::State) {
                self.apply_in(entry, remote, true, now);
            }
            end
        });
        match resumed {
            Ok(Some(end)) => end,
            _ => u64::MAX,
        }
    }

    /// After a read of the registry: the room's sequence goes up to the registry's last one (see
    /// `Room::catch_up_seq`) if the room is still on that epoch.
    pub fn catch_up_seq(&self, room: &RoomName, epoch: &str, seq: u64) {
        let _ = self.with_room(room, None, 0, |entry| {
            if entry.room.epoch() == epoch {
                entry.room.catch_up_seq(seq);
            }
        });
    }

    /// Creates the room (if needed) with the registry's epoch, so that what follows applies to it,
    /// and keeps it until `remove_if_unsubscribed`.
    pub fn ensure_room(&self, room: &RoomName, epoch: &str, now_ms: u64) -> Result<(), HubError> {
        self.with_room(room, Some(Budget::Subscribed), now_ms, |entry| {
            entry.pinned = true;
            if entry.room.version() == 0 && entry.room.last_seq() == 0 && entry.room.epoch() != epoch {
                entry.room.restart(epoch.to_string());
            }
        })?;
        Ok(())
    }

    /// Publishes while the shared registry is unreachable: numbered locally, under a local epoch
    /// that subscribers are told of (`subscribed`, `recovered: true`). `None` if the room is not held.
    pub fn publish_provisional(
        &self,
        room: &RoomName,
        kind: Kind,
        data: &JsonData,
        now: Now,
        local_epoch: String,
        id: Option<EventId>,
    ) -> Option<PublishReceipt> {
        let receipt = self.with_room(room, None, now.unix_ms, |entry| {
            // An event this room already holds (its live message was applied between the
            // caller's look and this lock: the registry's "unseen" restores) goes out once.
            if id.is_some_and(|id| entry.room.holds_event(id)) {
                return None;
            }
            if entry.room.enter_outage(local_epoch) {
                self.tell_subscribers(entry, room, Some(true));
            }
            Some(self.publish_in(entry, kind, id, data, now))
        });
        receipt.ok().flatten().flatten()
    }

    fn tell_subscribers(&self, entry: &RoomEntry, room: &RoomName, recovered: Option<bool>) {
        let notice = ServerControl::Subscribed {
            room: room.clone(),
            room_id: entry.room.id(),
            epoch: entry.room.epoch().to_string(),
            version: entry.room.version(),
            seq: entry.room.last_seq(),
            recovered,
            request: None,
        };
        for subscriber in entry.subscribers.values() {
            subscriber.push_control(&self.0.metrics, notice.clone());
        }
    }

    /// Local subscribers of the room.
    pub fn subscriber_count(&self, room: &RoomName) -> usize {
        self.with_room(room, None, 0, |entry| entry.subscribers.len())
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    /// Drops the room if it has no subscribers (the registry stopped following it).
    pub fn remove_if_unsubscribed(&self, room: &RoomName) -> bool {
        let shard = self.shard(room);
        let mut rooms = shard.lock().unwrap_or_else(|p| p.into_inner());
        let Some(slot) = rooms.get(room).cloned() else {
            return true;
        };
        let mut entry = slot.lock();
        if !entry.subscribers.is_empty() {
            return false;
        }
        entry.removed = true;
        rooms.remove(room);
        self.forget_rooms(entry.budget, 1);
        true
    }

    /// Counts `count` rooms of `budget` gone.
    fn forget_rooms(&self, budget: Budget, count: usize) {
        self.0.budget_rooms[budget as usize].fetch_sub(count, Ordering::Relaxed);
        let left = self.0.room_count.fetch_sub(count, Ordering::Relaxed) - count;
        self.0.metrics.rooms.set(left as i64);
    }

    /// Whether the room holds the event with this id in its history.
    pub fn holds_event(&self, room: &RoomName, id: EventId) -> bool {
        self.with_room(room, None, 0, |entry| entry.room.holds_event(id))
            .ok()
            .flatten()
            .unwrap_or(false)
    }

    /// What this node knows of a room, to restore it in a registry that lost it.
    pub fn room_numbers(&self, room: &RoomName) -> Option<RoomNumbers> {
        self.with_room(room, None, 0, |entry| {
            let (version, seq) = entry.room.confirmed();
            RoomNumbers {
                epoch: entry.room.registry_epoch().to_string(),
                version,
                seq,
                state: entry.room.state().filter(|s| s.number() <= version).cloned(),
            }
        })
        .ok()
        .flatten()
    }

    /// Rooms this node holds.
    pub fn room_names(&self) -> Vec<RoomName> {
        let mut names = Vec::new();
        for shard in self.0.shards.iter() {
            names.extend(shard.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned());
        }
        names
    }

    /// The `n` rooms with the most local subscribers, most first (ties: the most publishes, as
    /// version + seq, then by name), with their numbers: the operations page's busiest rooms.
    /// Locks each room briefly, one at a time.
    pub fn busiest_rooms(&self, n: usize) -> Vec<RoomLoad> {
        let mut top: Vec<RoomLoad> = Vec::with_capacity(n + 1);
        for shard in self.0.shards.iter() {
            let slots: Vec<(RoomName, Arc<RoomSlot>)> = shard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(name, slot)| (name.clone(), slot.clone()))
                .collect();
            for (room, slot) in slots {
                let (subscribers, (version, seq)) = {
                    let entry = slot.lock();
                    (entry.subscribers.len(), (entry.room.version(), entry.room.last_seq()))
                };
                let load = RoomLoad {
                    room,
                    subscribers,
                    version,
                    seq,
                };
                let rank = |l: &RoomLoad| (l.subscribers, l.version + l.seq);
                let at = top.partition_point(|held| {
                    (rank(held), std::cmp::Reverse(&held.room)) >= (rank(&load), std::cmp::Reverse(&load.room))
                });
                if at < n {
                    top.insert(at, load);
                    top.truncate(n);
                }
            }
        }
        top
    }

    /// Adds `subscriber` to the room and queues, in order: `subscribed` (with the request's
    /// `id`), the current state (whole: `delta` says whether the states after it may go as
    /// deltas), and
    /// the events recovered after `since` (one queue entry, handed out in pieces: however much
    /// history the room keeps, it is delivered), if they fit `max_recovery_bytes`. Subscribing
    /// again re-sends all of it. Returns the bytes of events recovered.
    #[allow(clippy::too_many_arguments)]
    pub fn subscribe(
        &self,
        room: &RoomName,
        subscriber: &Arc<Subscriber>,
        since: Option<u64>,
        epoch: Option<&str>,
        request: Option<u64>,
        delta: bool,
        max_recovery_bytes: usize,
        now_ms: u64,
    ) -> Result<usize, HubError> {
        let recovered = self.with_room(room, Some(Budget::Subscribed), now_ms, |entry| {
            let mut snapshot = entry.room.snapshot(since, epoch, max_recovery_bytes, now_ms);
            let recovered_bytes: usize = snapshot.events.iter().map(|p| p.size()).sum();
            if let ServerControl::Subscribed { request: echoed, .. } = &mut snapshot.subscribed {
                *echoed = request;
            }
            if entry.subscribers.insert(subscriber.id(), subscriber.clone()).is_none() {
                self.0.metrics.subscriptions.inc();
            }
            let mut tally = FanoutTally::default();
            let mut queue = subscriber.queue();
            let was_empty = queue.is_empty();
            queue.want_deltas(entry.room.id(), delta);
            tally.add(queue.push_control(snapshot.subscribed));
            if let Some(state) = &snapshot.state {
                tally.add(queue.push_state(state));
            }
            tally.add(queue.push_recovery(snapshot.events));
            drop(queue);
            if was_empty || tally.slow > 0 {
                subscriber.wake();
            }
            tally.flush(&self.0.metrics, subscriber.transport());
            recovered_bytes
        })?;
        Ok(recovered.unwrap_or(0))
    }

    /// Removes `subscriber` from the room and forgets its pending messages of that room.
    pub fn unsubscribe(&self, room: &RoomName, subscriber: &Subscriber) {
        let result = self.with_room(room, None, 0, |entry| {
            if entry.subscribers.remove(&subscriber.id()).is_some() {
                self.0.metrics.subscriptions.dec();
            }
            subscriber.queue().purge_room(entry.room.id());
            entry.subscribers.is_empty()
        });
        if let Ok(Some(true)) = result {
            if let Some(sender) = &*self.0.emptied.lock().unwrap_or_else(|p| p.into_inner()) {
                let _ = sender.send(room.clone());
            }
        }
    }

    /// The room's figures, or `None` when this node holds no such room.
    pub fn room_info(&self, room: &RoomName) -> Option<RoomInfo> {
        self.with_room(room, None, 0, |entry| RoomInfo {
            epoch: entry.room.epoch().to_string(),
            state: entry.room.state().cloned(),
            version: entry.room.version(),
            last_seq: entry.room.last_seq(),
            subscribers: entry.subscribers.len(),
        })
        .ok()
        .flatten()
    }

    /// Retained events after `since`, or `None` when this node holds no such room.
    pub fn room_events(&self, room: &RoomName, since: u64, now_ms: u64) -> Option<RoomHistory> {
        self.with_room(room, None, now_ms, |entry| {
            entry.room.trim(now_ms);
            let events = entry.room.events_since(since).ok_or(entry.room.last_seq());
            RoomHistory {
                epoch: entry.room.epoch().to_string(),
                events,
            }
        })
        .ok()
        .flatten()
    }

    /// Expires old history and state, and drops rooms with nothing left. Returns rooms dropped.
    pub fn sweep(&self, now_ms: u64) -> usize {
        let mut removed = [0; 2];
        for shard in self.0.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.retain(|_, slot| {
                let mut entry = slot.lock();
                entry.room.expire(now_ms);
                if entry.is_empty() {
                    entry.removed = true;
                    removed[entry.budget as usize] += 1;
                    false
                } else {
                    true
                }
            });
        }
        for (budget, count) in [(Budget::Published, removed[0]), (Budget::Subscribed, removed[1])] {
            if count > 0 {
                self.forget_rooms(budget, count);
            }
        }
        removed[0] + removed[1]
    }

    fn shard(&self, room: &RoomName) -> &Shard {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let hash = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(room.as_str());
        &self.0.shards[(hash as usize) % SHARDS]
    }

    /// Runs `f` on the room under its own lock, creating the room (counted against `create`'s
    /// budget) if asked. Afterwards drops the room when it has neither subscribers nor retained
    /// data. `Ok(None)`: no room, none created.
    fn with_room<R>(
        &self,
        name: &RoomName,
        create: Option<Budget>,
        now_ms: u64,
        f: impl FnOnce(&mut RoomEntry) -> R,
    ) -> Result<Option<R>, HubError> {
        let shard = self.shard(name);
        loop {
            let slot = {
                let mut rooms = shard.lock().unwrap_or_else(|p| p.into_inner());
                match rooms.get(name) {
                    Some(slot) => slot.clone(),
                    None => {
                        let Some(budget) = create else { return Ok(None) };
                        let slot = self.create_room(name, now_ms, budget)?;
                        rooms.insert(name.clone(), slot.clone());
                        slot
                    }
                }
            };
            let mut entry = slot.lock();
            if entry.removed {
                continue;
            }
            let result = f(&mut entry);
            let empty = entry.is_empty();
            drop(entry);
            if empty {
                self.remove_if_empty(shard, name, &slot);
            }
            return Ok(Some(result));
        }
    }

    fn create_room(&self, name: &RoomName, now_ms: u64, budget: Budget) -> Result<Arc<RoomSlot>, HubError> {
        let max = self.0.config.max_rooms;
        let in_budget = &self.0.budget_rooms[budget as usize];
        if in_budget.fetch_add(1, Ordering::Relaxed) >= max {
            in_budget.fetch_sub(1, Ordering::Relaxed);
            return Err(HubError::RoomLimit(max));
        }
        let count = self.0.room_count.fetch_add(1, Ordering::Relaxed);
        self.0.metrics.rooms.set(count as i64 + 1);
        let id = self.0.next_room_id.fetch_add(1, Ordering::Relaxed);
        let epoch = format!(
            "{:016x}",
            self.0.epoch_seed.wrapping_add(id.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        );
        let room = Room::new(RoomId(id), name.clone(), epoch, self.0.config.retention, now_ms);
        Ok(Arc::new(RoomSlot(Mutex::new(RoomEntry {
            room,
            budget,
            subscribers: HashMap::new(),
            removed: false,
            pinned: false,
            pace: FanoutPace::default(),
        }))))
    }

    fn remove_if_empty(&self, shard: &Shard, name: &RoomName, slot: &Arc<RoomSlot>) {
        let mut rooms = shard.lock().unwrap_or_else(|p| p.into_inner());
        let mut entry = slot.lock();
        if entry.removed || !entry.is_empty() {
            return;
        }
        if rooms.get(name).is_some_and(|current| Arc::ptr_eq(current, slot)) {
            rooms.remove(name);
            entry.removed = true;
            self.forget_rooms(entry.budget, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{Outgoing, QueueClosed};
    use std::time::Instant;

    fn hub(config: HubConfig) -> Hub {
        Hub::new(config, Arc::new(Metrics::new()), 7)
    }

    fn room(name: &str) -> RoomName {
        RoomName::parse(name).expect("room")
    }

    fn now() -> Now {
        Now {
            unix_ms: 1_000,
            instant: Instant::now(),
        }
    }

    fn data(s: &str) -> JsonData {
        JsonData::parse(s.as_bytes()).expect("json")
    }

    fn drain(s: &Subscriber) -> Vec<String> {
        let mut out = Vec::new();
        s.drain_into(&mut out, usize::MAX);
        out.into_iter()
            .map(|o| match o {
                Outgoing::Publication(p) => p.json_frame().to_string(),
                Outgoing::Delta(p) => p.json_frame_or_delta(true).to_string(),
                Outgoing::Control(c) => c.to_json().to_string(),
            })
            .collect()
    }

    /// The busiest rooms: by subscribers, then by publishes (version + seq), then by name; at
    /// most `n`.
    #[test]
    fn the_busiest_rooms_come_first() {
        let hub = hub(HubConfig::default());
        let subscribers: Vec<_> = (0..5).map(|_| hub.new_subscriber(Transport::WebSocket)).collect();
        let join = |name: &str, who: &[usize]| {
            for &i in who {
                hub.subscribe(&room(name), &subscribers[i], None, None, None, false, usize::MAX, 0)
                    .expect("subscribe");
            }
        };
        join("game:two", &[0, 1]);
        join("game:three", &[2, 3, 4]);
        join("game:one-quiet", &[0]);
        join("game:one-busy", &[1]);
        hub.publish(&room("game:one-busy"), Kind::Event, &data("1"), now())
            .expect("publish");
        hub.publish(&room("game:one-busy"), Kind::State, &data("{}"), now())
            .expect("publish");
        let top: Vec<(String, usize, u64, u64)> = hub
            .busiest_rooms(3)
            .into_iter()
            .map(|l| (l.room.as_str().to_string(), l.subscribers, l.version, l.seq))
            .collect();
        assert_eq!(
            top,
            [
                ("game:three".to_string(), 3, 0, 0),
                ("game:two".to_string(), 2, 0, 0),
                ("game:one-busy".to_string(), 1, 1, 1),
            ]
        );
        assert_eq!(hub.busiest_rooms(0), []);
    }

    /// Counts its wake-ups.
    struct CountingWaker(AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }

        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A loop that serves many queues spends a queue's wake-up before it drains it: the drain
    /// leaves no second wake-up for an empty queue behind, and the next publish wakes it again.
    /// (The WebTransport loop's `deliver` relies on it; without `take_wake` there it only does
    /// more work, which bench/README's uprobe counts show, so no test of the loop fails.)
    #[test]
    fn a_wake_up_spent_before_the_drain_leaves_none_behind() {
        use std::task::{Context, Waker};
        let hub = hub(HubConfig::default());
        let s = hub.new_subscriber(Transport::WebTransport);
        hub.subscribe(&room("game:one"), &s, None, None, None, false, usize::MAX, 0)
            .expect("subscribe");
        let counter = Arc::new(CountingWaker(Default::default()));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        s.take_wake();
        drain(&s);
        assert!(s.poll_wait(&mut cx).is_pending());
        for round in 1..=2 {
            hub.publish(&room("game:one"), Kind::Event, &data(&round.to_string()), now())
                .expect("publish");
            assert_eq!(counter.0.load(Ordering::SeqCst), round, "the publish woke the loop");
            assert!(s.take_wake(), "the wake-up was pending");
            assert_eq!(drain(&s).len(), 1);
            assert!(s.poll_wait(&mut cx).is_pending(), "no wake-up left for a drained queue");
            assert_eq!(counter.0.load(Ordering::SeqCst), round);
        }
        // Without spending it first, the drained queue's wake-up is still there.
        hub.publish(&room("game:one"), Kind::Event, &data("3"), now())
            .expect("publish");
        assert_eq!(drain(&s).len(), 1);
        assert!(s.poll_wait(&mut cx).is_ready());
    }

    #[test]
    fn a_big_room_keeps_every_queue_in_order() {
        let hub = hub(HubConfig::default());
        let subscribers: Vec<_> = (0..2055).map(|_| hub.new_subscriber(Transport::WebSocket)).collect();
        for s in &subscribers {
            hub.subscribe(&room("game:big"), s, None, None, None, false, usize::MAX, 0)
                .expect("subscribe");
            drain(s);
        }
        for i in 1..=5 {
            hub.publish(&room("game:big"), Kind::Event, &data(&i.to_string()), now())
                .expect("publish");
        }
        for s in &subscribers {
            let seqs: Vec<u64> = drain(s)
                .iter()
                .map(|frame| {
                    let v: serde_json::Value = serde_json::from_str(frame).expect("json");
                    v["seq"].as_u64().expect("seq")
                })
                .collect();
            assert_eq!(seqs, [1, 2, 3, 4, 5]);
        }
    }

    #[test]
    fn publish_reaches_every_subscriber_with_one_shared_frame() {
        let hub = hub(HubConfig::default());
        let (a, b) = (
            hub.new_subscriber(Transport::WebSocket),
            hub.new_subscriber(Transport::WebTransport),
        );
        hub.subscribe(&room("game:1"), &a, None, None, None, false, usize::MAX, 0)
            .expect("subscribe");
        hub.subscribe(&room("game:1"), &b, None, None, None, false, usize::MAX, 0)
            .expect("subscribe");
        drain(&a);
        drain(&b);
        let receipt = hub
            .publish(&room("game:1"), Kind::State, &data("{\"h\":1}"), now())
            .expect("publish");
        assert_eq!((receipt.number, receipt.subscribers), (1, 2));
        let (mut out_a, mut out_b) = (Vec::new(), Vec::new());
        a.drain_into(&mut out_a, 10);
        b.drain_into(&mut out_b, 10);
        match (&out_a[..], &out_b[..]) {
            ([Outgoing::Publication(pa)], [Outgoing::Publication(pb)]) => assert!(Arc::ptr_eq(pa, pb)),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// A bracket-sized JSON state whose one match's score is `score`.
    fn bracket(score: u32) -> String {
        let matches: Vec<String> = (0..40)
            .map(|i| {
                let s = if i == 7 { score } else { i };
                format!(
                    r#"{{"id":{i},"opponent1":{{"id":{i},"score":{s}}},"opponent2":{{"id":{},"score":0}},"status":2}}"#,
                    i + 40
                )
            })
            .collect();
        format!(r#"{{"match":[{}]}}"#, matches.join(","))
    }

    /// Every delta subscriber at the previous version gets the same delta, made once for the
    /// publish; a subscriber that asked for none, one that joined just now, and one whose queue
    /// conflated two versions get the whole state; a state below the threshold never has one.
    #[test]
    fn a_delta_is_made_once_per_publish_and_goes_only_to_subscribers_at_its_base() {
        let hub = hub(HubConfig::default());
        let r = room("bracket:1");
        hub.publish(&r, Kind::State, &data(&bracket(1)), now())
            .expect("publish");
        let delta_subscribers: Vec<_> = (0..3).map(|_| hub.new_subscriber(Transport::WebSocket)).collect();
        let plain = hub.new_subscriber(Transport::WebSocket);
        for s in &delta_subscribers {
            hub.subscribe(&r, s, None, None, None, true, usize::MAX, 0)
                .expect("subscribe");
        }
        hub.subscribe(&r, &plain, None, None, None, false, usize::MAX, 0)
            .expect("subscribe");
        for s in delta_subscribers.iter().chain([&plain]) {
            let frames = drain(s);
            assert!(frames[1].starts_with(r#"{"type":"state""#), "the join state is whole");
        }
        hub.publish(&r, Kind::State, &data(&bracket(2)), now())
            .expect("publish");
        let mut deltas = Vec::new();
        for s in &delta_subscribers {
            let mut out = Vec::new();
            s.drain_into(&mut out, 10);
            match &out[..] {
                [Outgoing::Delta(p)] => deltas.push(p.clone()),
                other => panic!("expected a delta, got {other:?}"),
            }
        }
        let made = deltas[0].delta().expect("smaller than the state") as *const _;
        for p in &deltas {
            assert!(Arc::ptr_eq(p, &deltas[0]), "one publication");
            assert_eq!(p.delta().expect("delta") as *const _, made, "one delta, made once");
        }
        let frame = deltas[0].json_frame_or_delta(true);
        assert!(
            frame.starts_with(r#"{"type":"delta","room":"bracket:1","version":2,"base":1,"#),
            "{frame}"
        );
        assert!(frame.len() < bracket(2).len() / 4);
        assert!(drain(&plain)[0].starts_with(r#"{"type":"state""#));
        // A late joiner gets the whole state, then deltas.
        let late = hub.new_subscriber(Transport::WebSocket);
        hub.subscribe(&r, &late, None, None, None, true, usize::MAX, 0)
            .expect("subscribe");
        assert!(drain(&late)[1].starts_with(r#"{"type":"state","room":"bracket:1","version":2"#));
        // A slow reader whose queue conflated 3 into 4 holds 2: it gets 4 whole.
        let slow = &delta_subscribers[0];
        hub.publish(&r, Kind::State, &data(&bracket(3)), now())
            .expect("publish");
        drain(&delta_subscribers[1]);
        hub.publish(&r, Kind::State, &data(&bracket(4)), now())
            .expect("publish");
        let frames = drain(slow);
        assert_eq!(frames.len(), 1);
        assert!(frames[0].starts_with(r#"{"type":"state","room":"bracket:1","version":4"#));
        assert!(
            drain(&delta_subscribers[1])[0].starts_with(r#"{"type":"delta","room":"bracket:1","version":4,"base":3,"#)
        );
        assert!(drain(&late)[0].starts_with(r#"{"type":"state","room":"bracket:1","version":4"#));
        // A notice (`subscribed`) starts the room afresh: the next state is whole.
        hub.subscribe(&r, slow, None, None, None, true, usize::MAX, 0)
            .expect("subscribe");
        drain(slow);
        hub.publish(&r, Kind::State, &data(&bracket(5)), now())
            .expect("publish");
        assert!(drain(slow)[0].starts_with(r#"{"type":"delta","room":"bracket:1","version":5,"base":4,"#));
        // Small states: no base kept, no delta.
        let small = room("game:1");
        hub.publish(&small, Kind::State, &data(r#"{"home":1}"#), now())
            .expect("publish");
        hub.subscribe(&small, slow, None, None, None, true, usize::MAX, 0)
            .expect("subscribe");
        drain(slow);
        hub.publish(&small, Kind::State, &data(r#"{"home":2}"#), now())
            .expect("publish");
        let mut out = Vec::new();
        slow.drain_into(&mut out, 10);
        match &out[..] {
            [Outgoing::Publication(p)] => assert_eq!(p.delta_base(), None),
            other => panic!("expected a whole state, got {other:?}"),
        }
    }

    /// After an empty restart the history can have holes that publishers fill later: the resume
    /// takes the events up to the first hole and says where it stopped.
    #[test]
    fn a_resume_stops_at_a_hole_in_the_history() {
        let hub = hub(HubConfig::default());
        let r = room("bracket:4");
        hub.ensure_room(&r, "E", 0).expect("room");
        let s = hub.new_subscriber(Transport::WebSocket);
        hub.subscribe(&r, &s, None, None, Some(1), false, usize::MAX, 0)
            .expect("subscribe");
        hub.apply_remote(&r, &remote("E", Kind::Event, 1, 11, "1"), now());
        hub.publish_provisional(&r, Kind::Event, &data("\"a\""), now(), "L".into(), Some(EventId(21)));
        drain(&s);
        let read = [
            remote("E", Kind::Event, 2, 31, "\"b\""),
            remote("E", Kind::Event, 4, 41, "\"d\""),
            remote("E", Kind::Event, 5, 21, "\"a\""),
        ];
        assert_eq!(hub.resume_from(&r, "E", &read, now()), 2, "seq 3 is not there yet");
        assert_eq!(summary(&drain(&s)), ["event \"b\" 3", "subscribed \"E\" 2 true"]);
        assert_eq!(
            hub.apply_live(&r, &remote("E", Kind::Event, 4, 41, "\"d\""), now()),
            Live::Gap { after: 2 }
        );
        assert_eq!(
            hub.apply_live(&r, &remote("E", Kind::Event, 3, 33, "\"c\""), now()),
            Live::Applied
        );
        assert_eq!(
            hub.apply_live(&r, &remote("E", Kind::Event, 4, 41, "\"d\""), now()),
            Live::Applied
        );
        let own = RemotePublication {
            deliver: false,
            ..remote("E", Kind::Event, 5, 21, "\"a\"")
        };
        assert_eq!(hub.apply_live(&r, &own, now()), Live::Applied);
        assert_eq!(
            summary(&drain(&s)),
            ["event \"c\" 3", "event \"d\" 4", "subscribed \"E\" 5 true"],
            "in order; this node's own event, which its subscriber had, not again: a notice says \
             where the numbering goes on"
        );
        // The same when it comes back as any other event (its publisher sent it again after Redis
        // lost it): the subscriber had it under the local epoch, before the resume.
        let again = remote("E", Kind::Event, 6, 21, "\"a\"");
        assert_eq!(hub.apply_live(&r, &again, now()), Live::Applied);
        assert_eq!(summary(&drain(&s)), ["subscribed \"E\" 6 true"], "never twice");
    }

    /// An event the subscribers already took (this node's own, delivered under a local epoch)
    /// moves their `seq` on with a notice, on every path that applies one outside a resume.
    #[test]
    fn an_event_applied_without_going_out_moves_the_seq_on_with_a_notice() {
        let (hub, r, s) = subscribed_room("game:own");
        hub.apply_remote(&r, &remote("E", Kind::Event, 1, 11, "1"), now());
        let own = RemotePublication {
            deliver: false,
            ..remote("E", Kind::Event, 2, 22, "2")
        };
        hub.apply_remote(&r, &own, now());
        hub.apply_remote(&r, &remote("E", Kind::Event, 3, 33, "3"), now());
        assert_eq!(
            summary(&drain(&s)),
            ["event 1 1", "subscribed \"E\" 2 true", "event 3 3"],
            "no skip from 1 to 3"
        );
    }

    #[test]
    fn a_live_event_that_skips_numbers_is_not_applied() {
        let (hub, r, s) = subscribed_room("game:gap");
        assert_eq!(
            hub.apply_live(&r, &remote("E", Kind::Event, 1, 11, "1"), now()),
            Live::Applied
        );
        assert_eq!(
            hub.apply_live(&r, &remote("E", Kind::Event, 3, 33, "3"), now()),
            Live::Gap { after: 1 },
            "seq 2 is missing"
        );
        assert_eq!(
            hub.apply_live(&r, &remote("E", Kind::State, 7, 0, "\"s\""), now()),
            Live::Applied,
            "states are latest-value: never held for a gap"
        );
        assert_eq!(
            hub.apply_live(&r, &remote("E", Kind::Event, 2, 22, "2"), now()),
            Live::Applied
        );
        assert_eq!(
            hub.apply_live(&r, &remote("E", Kind::Event, 3, 33, "3"), now()),
            Live::Applied
        );
        assert_eq!(
            hub.apply_live(&r, &remote("F", Kind::Event, 9, 99, "9"), now()),
            Live::Applied,
            "another epoch restarts the room's numbering: no gap to wait for"
        );
        assert_eq!(
            hub.apply_live(&room("game:other"), &remote("E", Kind::Event, 5, 5, "5"), now()),
            Live::NotHeld
        );
        assert_eq!(
            summary(&drain(&s)),
            [
                "event 1 1",
                "Some(\"state\") \"s\"",
                "event 2 2",
                "event 3 3",
                "subscribed \"F\" 0 false",
                "event 9 9"
            ]
        );
    }

    /// A provisional publish of an event the room already holds (applied live meanwhile) goes
    /// out once: checked under the room's lock, not by the caller's look before it.
    #[test]
    fn a_provisional_publish_of_an_event_the_room_holds_goes_out_once() {
        let (hub, r, s) = subscribed_room("game:once");
        hub.apply_remote(&r, &remote("E", Kind::Event, 1, 11, "1"), now());
        let again = hub.publish_provisional(&r, Kind::Event, &data("1"), now(), "L".into(), Some(EventId(11)));
        assert!(again.is_none());
        let fresh = hub.publish_provisional(&r, Kind::Event, &data("2"), now(), "L".into(), Some(EventId(12)));
        assert!(fresh.is_some());
        assert_eq!(
            summary(&drain(&s)),
            ["event 1 1", "subscribed \"L\" 1 true", "event 2 2"],
            "event 11 once, then the local epoch's first"
        );
    }

    /// A hub with room `name` under epoch `E` and one WebSocket subscriber whose queue is empty.
    fn subscribed_room(name: &str) -> (Hub, RoomName, Arc<Subscriber>) {
        let hub = hub(HubConfig::default());
        let r = room(name);
        let s = hub.new_subscriber(Transport::WebSocket);
        hub.ensure_room(&r, "E", 0).expect("room");
        hub.subscribe(&r, &s, None, None, None, false, usize::MAX, 0)
            .expect("subscribe");
        drain(&s);
        (hub, r, s)
    }

    fn remote<'a>(epoch: &'a str, kind: Kind, number: u64, id: u64, text: &str) -> RemotePublication<'a> {
        RemotePublication {
            epoch,
            kind,
            number,
            id: (kind == Kind::Event).then_some(EventId(id)),
            ts_ms: 1,
            data: data(text),
            deliver: true,
        }
    }

    /// Frames as (type, epoch or data, seq) for short assertions.
    fn summary(frames: &[String]) -> Vec<String> {
        frames
            .iter()
            .map(|f| {
                let v: serde_json::Value = serde_json::from_str(f).expect("json");
                match v["type"].as_str() {
                    Some("subscribed") => format!("subscribed {} {} {}", v["epoch"], v["seq"], v["recovered"]),
                    Some("event") => format!("event {} {}", v["data"], v["seq"]),
                    other => format!("{other:?} {}", v["data"]),
                }
            })
            .collect()
    }

    #[test]
    fn after_an_outage_each_event_reaches_a_subscriber_once_and_numbering_continues() {
        let hub = hub(HubConfig::default());
        let r = room("bracket:3");
        hub.ensure_room(&r, "E", 0).expect("room");
        let s = hub.new_subscriber(Transport::WebSocket);
        hub.subscribe(&r, &s, None, None, Some(1), false, usize::MAX, 0)
            .expect("subscribe");
        hub.apply_remote(&r, &remote("E", Kind::Event, 1, 11, "1"), now());
        drain(&s);
        // Redis is down: this node's own publish goes out under a local epoch.
        let local = hub
            .publish_provisional(&r, Kind::Event, &data("\"a1\""), now(), "L".into(), Some(EventId(21)))
            .expect("held");
        assert_eq!(local.number, 2);
        assert_eq!(summary(&drain(&s)), ["subscribed \"L\" 1 true", "event \"a1\" 2"]);
        // Redis is back (reseeded): its history holds another node's b1 and c1 around a1.
        let read = [
            remote("E", Kind::State, 1, 0, "\"s\""),
            remote("E", Kind::Event, 2, 31, "\"b1\""),
            remote("E", Kind::Event, 3, 21, "\"a1\""),
            remote("E", Kind::Event, 4, 41, "\"c1\""),
        ];
        hub.resume_from(&r, "E", &read, now());
        assert_eq!(
            summary(&drain(&s)),
            [
                "event \"b1\" 3",
                "event \"c1\" 4",
                "subscribed \"E\" 4 true",
                "Some(\"state\") \"s\""
            ],
            "what the subscriber missed, still under the local epoch; then the registry's numbers"
        );
        hub.apply_remote(&r, &remote("E", Kind::Event, 5, 51, "\"d\""), now());
        assert_eq!(summary(&drain(&s)), ["event \"d\" 5"]);
        let late = hub.new_subscriber(Transport::WebSocket);
        hub.subscribe(&r, &late, Some(1), Some("E"), None, false, usize::MAX, 0)
            .expect("subscribe");
        let recovered = summary(&drain(&late));
        assert_eq!(
            recovered[2..],
            ["event \"b1\" 2", "event \"a1\" 3", "event \"c1\" 4", "event \"d\" 5"]
        );

        // The room re-created in the registry (another epoch): nothing replayed, the notice says
        // where the live stream goes on.
        hub.publish_provisional(&r, Kind::Event, &data("\"x\""), now(), "L2".into(), Some(EventId(61)));
        drain(&s);
        hub.resume_from(&r, "F", &[remote("F", Kind::Event, 9, 71, "\"y\"")], now());
        assert_eq!(summary(&drain(&s)), ["subscribed \"F\" 9 false"]);
    }

    #[test]
    fn a_joining_subscriber_gets_subscribed_then_state_then_recovered_events() {
        let hub = hub(HubConfig::default());
        let r = room("game:1");
        hub.publish(&r, Kind::State, &data("5"), now()).expect("publish");
        hub.publish(&r, Kind::Event, &data("\"a\""), now()).expect("publish");
        hub.publish(&r, Kind::Event, &data("\"b\""), now()).expect("publish");
        let s = hub.new_subscriber(Transport::WebSocket);
        hub.subscribe(&r, &s, Some(1), None, None, false, usize::MAX, 1_000)
            .expect("subscribe");
        let frames = drain(&s);
        assert_eq!(frames.len(), 3);
        assert!(
            frames[0].starts_with(r#"{"type":"subscribed","room":"game:1","#)
                && frames[0].contains(r#""version":1,"seq":2,"recovered":true"#)
        );
        assert!(frames[1].contains(r#""type":"state""#) && frames[1].ends_with(r#""data":5}"#));
        assert!(frames[2].contains(r#""seq":2"#) && frames[2].ends_with(r#""data":"b"}"#));
    }

    #[test]
    fn rooms_live_while_they_have_subscribers_or_data() {
        let hub = hub(HubConfig::default());
        let s = hub.new_subscriber(Transport::WebSocket);
        hub.subscribe(&room("a"), &s, None, None, None, false, usize::MAX, 0)
            .expect("subscribe");
        assert_eq!(hub.room_count(), 1);
        hub.unsubscribe(&room("a"), &s);
        assert_eq!(hub.room_count(), 0);
        assert!(hub.room_info(&room("a")).is_none());

        hub.publish(&room("b"), Kind::State, &data("1"), now())
            .expect("publish");
        assert_eq!(hub.room_info(&room("b")).map(|i| i.version), Some(1));
        assert_eq!(hub.sweep(now().unix_ms), 0);
        let day = 24 * 3600 * 1000;
        assert_eq!(hub.sweep(now().unix_ms + day), 1);
        assert_eq!(hub.room_count(), 0);
    }

    #[test]
    fn a_recreated_room_has_a_new_epoch() {
        let hub = hub(HubConfig::default());
        let s = hub.new_subscriber(Transport::WebSocket);
        hub.subscribe(&room("a"), &s, None, None, None, false, usize::MAX, 0)
            .expect("subscribe");
        let first = hub.room_info(&room("a")).map(|i| i.epoch);
        hub.unsubscribe(&room("a"), &s);
        hub.subscribe(&room("a"), &s, None, None, None, false, usize::MAX, 0)
            .expect("subscribe");
        let second = hub.room_info(&room("a")).map(|i| i.epoch);
        assert!(first.is_some() && second.is_some() && first != second);
    }

    #[test]
    fn room_limit_refuses_new_rooms_only_and_subscribers_never_refuse_the_publisher() {
        let hub = hub(HubConfig {
            max_rooms: 1,
            ..HubConfig::default()
        });
        hub.publish(&room("a"), Kind::State, &data("1"), now())
            .expect("publish");
        assert_eq!(
            hub.publish(&room("b"), Kind::State, &data("1"), now()),
            Err(HubError::RoomLimit(1))
        );
        assert!(hub.publish(&room("a"), Kind::State, &data("2"), now()).is_ok());
        // Subscribers fill their own budget: a new invented name is refused to them.
        let s = hub.new_subscriber(Transport::WebSocket);
        hub.subscribe(&room("x"), &s, None, None, None, false, usize::MAX, 0)
            .expect("subscribe");
        assert_eq!(
            hub.subscribe(&room("y"), &s, None, None, None, false, usize::MAX, 0),
            Err(HubError::RoomLimit(1))
        );
    }

    #[test]
    fn rooms_subscribers_named_do_not_count_against_the_publishers_budget() {
        let other = hub(HubConfig {
            max_rooms: 1,
            ..HubConfig::default()
        });
        let s = other.new_subscriber(Transport::WebSocket);
        other
            .subscribe(&room("invented"), &s, None, None, None, false, usize::MAX, 0)
            .expect("subscribe");
        assert!(other.publish(&room("b"), Kind::State, &data("1"), now()).is_ok());
        assert!(other.publish(&room("invented"), Kind::Event, &data("1"), now()).is_ok());
        assert_eq!(other.room_count(), 2);
        // A room keeps its budget while it retains data, subscribers or not.
        other.unsubscribe(&room("invented"), &s);
        assert_eq!(
            other.subscribe(&room("z"), &s, None, None, None, false, usize::MAX, 0),
            Err(HubError::RoomLimit(1))
        );
    }

    #[test]
    fn an_overflowing_subscriber_is_closed_while_others_receive_everything() {
        let config = HubConfig {
            queue: QueueLimits {
                max_messages: 4,
                max_bytes: usize::MAX,
            },
            ..HubConfig::default()
        };
        let hub = hub(config);
        let r = room("bracket:1");
        let (slow, fast) = (
            hub.new_subscriber(Transport::WebSocket),
            hub.new_subscriber(Transport::WebSocket),
        );
        hub.subscribe(&r, &slow, None, None, None, false, usize::MAX, 0)
            .expect("subscribe");
        hub.subscribe(&r, &fast, None, None, None, false, usize::MAX, 0)
            .expect("subscribe");
        drain(&slow);
        drain(&fast);
        let mut fast_seqs = Vec::new();
        for i in 0..10 {
            hub.publish(&r, Kind::Event, &data(&i.to_string()), now())
                .expect("publish");
            let mut out = Vec::new();
            fast.drain_into(&mut out, usize::MAX);
            fast_seqs.extend(out.into_iter().filter_map(|o| match o {
                Outgoing::Publication(p) => (p.kind == Kind::Event).then_some(p.number),
                _ => None,
            }));
        }
        assert_eq!(fast_seqs, (1..=10).collect::<Vec<_>>());
        assert_eq!(slow.drain_into(&mut Vec::new(), 100), Some(QueueClosed::Slow));
        assert_eq!(hub.metrics().transport(Transport::WebSocket).slow_disconnects.get(), 1);
    }

    #[test]
    fn the_fanout_writes_directly_only_while_publishes_are_further_apart_than_it_takes() {
        let t0 = std::time::Instant::now();
        let mut pace = FanoutPace::default();
        assert!(pace.allows_direct(t0, 10_000), "nothing measured yet");
        pace.last = Some(t0);
        pace.cost_per_subscriber_ns = 8_000; // 8 µs: 80 ms for 10,000 subscribers
        assert!(!pace.allows_direct(t0 + Duration::from_millis(200), 10_000));
        assert!(pace.allows_direct(t0 + Duration::from_millis(240), 10_000));
        assert!(pace.allows_direct(t0 + Duration::from_millis(120), 5_000));
    }
}
