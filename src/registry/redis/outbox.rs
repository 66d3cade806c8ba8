//! What waits for Redis: the outbox of publishes accepted while their room could not reach Redis
//! (202 `queued`), the publishes just numbered that an emptied Redis may have lost before any
//! holder received them, and the rooms in outage on their own. Every item leaves in the order it
//! was accepted (its serial), and only the resync (`resync`) empties the outbox.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tracing::{debug, info};

use super::resync::Scope;
use super::scripts::ToNumber;
use super::{lock, RedisRegistry};
use crate::core::{EventId, JsonData, Kind, Now, RoomName};
use crate::registry::{Published, RegistryError};

/// At most this many recent publishes are kept (the oldest go first) for `--resend-window` (5 s by
/// default: an event in flight through pub/sub when Redis dies reaches its holders in
/// milliseconds, so a few seconds cover it with room to spare)...
const RECENT_MAX: usize = 4096;
/// ...and at most this many bytes of their data.
const RECENT_BYTES: usize = 4 << 20;

/// A publish waiting for Redis.
#[derive(Debug, Clone)]
pub(super) struct OutboxItem {
    pub room: RoomName,
    pub kind: Kind,
    pub data: JsonData,
    pub ts_ms: u64,
    pub provisional: Option<u64>,
    pub id: Option<EventId>,
    /// The order the node accepted its publishes in: the outbox is kept sorted by it.
    pub serial: u64,
    /// The epoch and number Redis gave it, for a recent publish sent again after Redis was lost.
    pub numbered: Option<(String, u64)>,
}

impl OutboxItem {
    pub(super) fn to_number(&self) -> ToNumber<'_> {
        ToNumber {
            room: &self.room,
            kind: self.kind,
            id: self.id,
            data: &self.data,
            ts_ms: self.ts_ms,
            provisional: self.provisional,
            restore: self.numbered.as_ref().map(|(epoch, number)| (epoch.as_str(), *number)),
        }
    }
}

/// The outbox and the recent publishes, under one lock.
#[derive(Debug, Default)]
pub(super) struct Outbox {
    /// Waiting for Redis, sorted by serial.
    items: VecDeque<OutboxItem>,
    /// Bytes of data the items hold (`--outbox-bytes`); restored items are not counted against it.
    bytes: usize,
    /// Numbered by Redis within `--resend-window`, with when.
    recent: VecDeque<(Instant, OutboxItem)>,
    recent_bytes: usize,
}

impl Outbox {
    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    /// Inserts the item at its place in acceptance order.
    fn insert(&mut self, item: OutboxItem) {
        let at = self.items.partition_point(|queued| queued.serial < item.serial);
        if item.numbered.is_none() {
            self.bytes += item.data.as_str().len();
        }
        self.items.insert(at, item);
    }
}

/// A room in outage on its own (see `RedisRegistry::down_rooms`).
#[derive(Debug, Default)]
pub(super) struct RoomOutage {
    /// Its resync is running.
    pub resyncing: bool,
    /// Its outbox publishes wait for the room's holders until then (Redis came back empty).
    pub wait_for_holders_until: Option<Instant>,
}

impl RedisRegistry {
    /// Queues a publish of a room that cannot reach Redis now, delivering it to this node's
    /// subscribers under a local epoch. `None` when the room is back meanwhile: publish it.
    pub(super) fn queue(
        &self,
        room: &RoomName,
        kind: Kind,
        id: Option<EventId>,
        data: &JsonData,
        now: Now,
        serial: u64,
    ) -> Option<Result<Published, RegistryError>> {
        let mut outbox = lock(&self.outbox);
        // Checked under the outbox lock, which a resync holds when it finds the outbox empty and
        // marks Redis (or the room) up: nothing is queued behind a finished flush.
        if self.is_room_up(room) {
            return None;
        }
        if outbox.items.len() >= self.settings.outbox_messages
            || outbox.bytes + data.as_str().len() > self.settings.outbox_bytes
        {
            return Some(Err(RegistryError::OutboxFull(outbox.items.len())));
        }
        // This node's own events Redis numbered just before the outage whose message never came
        // back to it (lost with the connection) go to its clients first, in order: they were
        // accepted before this one. (Restores stand before queued items: older serials.)
        let unseen: Vec<&OutboxItem> = outbox
            .items
            .iter()
            .take_while(|item| item.numbered.is_some())
            .filter(|item| &item.room == room && item.kind == Kind::Event)
            .filter(|item| item.id.is_some_and(|id| !self.hub.holds_event(room, id)))
            .collect();
        for item in unseen {
            let _ = self
                .hub
                .publish_provisional(room, Kind::Event, &item.data, now, self.new_epoch(), item.id);
        }
        // Local clients get it now, numbered after what this node has seen, under a local epoch.
        let provisional = self
            .hub
            .publish_provisional(room, kind, data, now, self.new_epoch(), id)
            .map(|r| r.number);
        outbox.insert(OutboxItem {
            room: room.clone(),
            kind,
            data: data.clone(),
            ts_ms: now.unix_ms,
            provisional,
            id,
            serial,
            numbered: None,
        });
        self.metrics.outbox.set(outbox.items.len() as i64);
        Some(Ok(Published::Queued {
            provisional,
            id,
            ts_ms: now.unix_ms,
        }))
    }

    /// Keeps a publish Redis just numbered, to send it again if Redis turns out to have lost it
    /// (`restore_recent`). If its room went down meanwhile, it goes to the outbox at once.
    pub(super) fn remember(&self, item: OutboxItem) {
        let mut outbox = lock(&self.outbox);
        if !self.is_room_up(&item.room) {
            outbox.insert(item);
            self.metrics.outbox.set(outbox.items.len() as i64);
            return;
        }
        self.keep_recent(&mut outbox, item);
    }

    /// An outbox item a resync just had numbered: kept as recent like a fresh publish, so that a
    /// Redis that dies empty again soon after does not lose it (the next resync restores it).
    pub(super) fn remember_flushed(&self, item: &OutboxItem, epoch: String, number: u64) {
        let item = OutboxItem {
            numbered: Some((epoch, number)),
            provisional: None,
            ..item.clone()
        };
        self.keep_recent(&mut lock(&self.outbox), item);
    }

    /// Adds to the recent publishes, dropping those past the window and the bounds.
    fn keep_recent(&self, outbox: &mut Outbox, item: OutboxItem) {
        let now = Instant::now();
        outbox.recent_bytes += item.data.as_str().len();
        outbox.recent.push_back((now, item));
        while let Some((at, oldest)) = outbox.recent.front() {
            let over = outbox.recent.len() > RECENT_MAX
                || outbox.recent_bytes > RECENT_BYTES
                || now.duration_since(*at) > self.settings.resend_window;
            if !over {
                break;
            }
            outbox.recent_bytes -= oldest.data.as_str().len();
            outbox.recent.pop_front();
        }
    }

    /// Redis (or a room's shard) was lost: the publishes it numbered within `--resend-window` go to
    /// the outbox to be sent again, in order, by the resync. Redis answers an event id it still
    /// holds with its number and publishes nothing, and a state only goes over an older one, so
    /// nothing reaches a client twice; a holder that already has an event skips it by its id.
    pub(super) fn restore_recent(&self, scope: &Scope) {
        let since = Instant::now().checked_sub(self.settings.resend_window);
        let mut outbox = lock(&self.outbox);
        let recent = std::mem::take(&mut outbox.recent);
        let mut restored = 0;
        for (at, item) in recent {
            if !scope.covers(&item.room) {
                outbox.recent.push_back((at, item));
                continue;
            }
            outbox.recent_bytes -= item.data.as_str().len();
            if since.is_none_or(|since| at >= since) {
                restored += 1;
                outbox.insert(item);
            }
        }
        self.metrics.outbox.set(outbox.items.len() as i64);
        if restored > 0 {
            info!(
                restored,
                "publishes redis numbered in the last seconds wait to be sent again, in case redis lost them"
            );
        }
    }

    /// The next item the resync of `scope` must send, in order; when none is left, marks the
    /// scope up under the outbox lock (`queue` checks under it), so that no publish accepted
    /// meanwhile is left behind. A whole-Redis resync skips rooms in outage on their own.
    pub(super) fn next_to_flush(&self, scope: &Scope) -> Option<OutboxItem> {
        let outbox = lock(&self.outbox);
        let next = match scope {
            Scope::All => {
                let down = lock(&self.down_rooms);
                outbox.items.iter().find(|item| !down.contains_key(&item.room)).cloned()
            }
            Scope::Room(room) => outbox.items.iter().find(|item| &item.room == room).cloned(),
        };
        if next.is_none() {
            match scope {
                Scope::All => self.up.store(true, Ordering::Release),
                Scope::Room(room) => {
                    lock(&self.down_rooms).remove(room);
                }
            }
        }
        next
    }

    /// Drops a published item from the outbox.
    pub(super) fn remove_from_outbox(&self, item: &OutboxItem) {
        let mut outbox = lock(&self.outbox);
        if let Some(at) = outbox.items.iter().position(|queued| queued.serial == item.serial) {
            if let Some(removed) = outbox.items.remove(at) {
                if removed.numbered.is_none() {
                    outbox.bytes -= removed.data.as_str().len();
                }
            }
        }
        self.metrics.outbox.set(outbox.items.len() as i64);
    }

    /// A publish found that Redis lost the room (it came back empty): the nodes that hold it have
    /// not put its epoch and numbers back yet (this node does not hold it; else this publish would
    /// start the room over under a new epoch, and their clients would have to refetch), or they
    /// are still settling it (a new number could repeat one a holder gave an event Redis lost).
    /// The room's publishes wait, in order, in the outbox: for a room this node does not hold, two
    /// heartbeats at most, then they go anyway; the room resyncs on its own.
    pub(super) fn wait_for_holders(&self, room: &RoomName) {
        let mut down = lock(&self.down_rooms);
        let outage = down.entry(room.clone()).or_default();
        if outage.wait_for_holders_until.is_none() {
            outage.wait_for_holders_until = Some(Instant::now() + self.settings.settle());
            debug!(%room, "redis lost the room: its publishes wait for the nodes that hold it to put its numbers back");
        }
    }

    /// Whether the room, which this node holds, still settles after Redis lost it (`reseed`).
    pub(super) fn settling(&self, room: &RoomName) -> bool {
        self.hub.room_numbers(room).is_some()
            && lock(&self.down_rooms)
                .get(room)
                .and_then(|o| o.wait_for_holders_until)
                .is_some_and(|until| Instant::now() < until)
    }

    /// Whether a publish of the room from the outbox should still wait for its holders.
    pub(super) fn waits_for_holders(&self, room: &RoomName) -> bool {
        let holds = self.hub.room_numbers(room).is_some();
        !holds
            && lock(&self.down_rooms)
                .get(room)
                .and_then(|o| o.wait_for_holders_until)
                .is_none_or(|until| Instant::now() < until)
    }
}
