//! Live events in number order. Pub/sub is at most once (a message is lost around a reconnect),
//! and after Redis lost its data publishers send their recent events again in no set order: an
//! event that skips numbers waits, at most `GAP_WAIT`, for the ones before it while the room's
//! history is re-read, so that a client never gets `seq` 12 before 11.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use super::follow::{Follow, OwnedEnvelope};
use super::{lock, RedisRegistry};
use crate::core::{Now, RoomName};
use crate::hub::Live;

/// The longest an event waits for the numbers before it. Long enough for every publisher's
/// resync after a Redis outage (Redis is probed every 0.5 s) to send its recent publishes again;
/// past it the event goes out with the gap, and the gap is logged.
pub(super) const GAP_WAIT: Duration = Duration::from_secs(3);

/// Events waiting for the numbers before them (`Follow::waiting`).
#[derive(Debug, Default)]
pub(super) struct Waiting {
    events: BTreeMap<u64, OwnedEnvelope>,
    /// Counts the waits, so that a wait's deadline does not end a later one.
    round: u64,
}

impl RedisRegistry {
    /// Applies a live message (or one held while the room re-read): an event that skips numbers
    /// waits for them; one that fills the gap lets those after it go.
    pub(super) fn apply_in_order(
        self: &Arc<Self>,
        room: &RoomName,
        follow: &Arc<Follow>,
        envelope: OwnedEnvelope,
        now: Now,
    ) {
        let mut waiting = lock(&follow.waiting);
        let live = match envelope.remote() {
            Some(remote) => self.hub.apply_live(room, &remote, now),
            None => return,
        };
        match live {
            Live::Gap { after } => {
                if waiting.events.is_empty() {
                    waiting.round += 1;
                    debug!(%room, after, number = envelope.number, "a live event skips numbers: it waits for them");
                    tokio::spawn(self.clone().fill_gap(room.clone(), follow.clone(), waiting.round));
                }
                waiting.events.insert(envelope.number, envelope);
            }
            Live::Applied => self.apply_waiting(room, &mut waiting, now),
            Live::NotHeld => waiting.events.clear(),
        }
    }

    /// Applies the waiting events that follow on now, in order.
    fn apply_waiting(&self, room: &RoomName, waiting: &mut Waiting, now: Now) {
        while let Some(next) = waiting.events.first_entry() {
            let Some(remote) = next.get().remote() else {
                next.remove();
                continue;
            };
            if let Live::Gap { .. } = self.hub.apply_live(room, &remote, now) {
                return;
            }
            next.remove();
        }
    }

    /// Re-reads the room's history (what Redis holds fills the gap), then, if events still wait
    /// at `GAP_WAIT`, lets them go with the gap.
    async fn fill_gap(self: Arc<Self>, room: RoomName, follow: Arc<Follow>, round: u64) {
        let deadline = tokio::time::Instant::now() + GAP_WAIT;
        match self.read_room(&room).await {
            Ok(snapshot) if self.is_room_up(&room) => {
                let now = crate::clock::now();
                for envelope in snapshot.envelopes {
                    self.apply_in_order(&room, &follow, envelope, now);
                }
            }
            Ok(_) => {}
            Err(error) => {
                let error = error.map_or_else(|| "re-read failed".to_string(), |e| e.to_string());
                self.mark_room_down(&room, &error);
            }
        }
        tokio::time::sleep_until(deadline).await;
        let mut waiting = lock(&follow.waiting);
        if waiting.round != round || waiting.events.is_empty() {
            return;
        }
        let events = std::mem::take(&mut waiting.events);
        if !self.is_room_up(&room) {
            // The room's resync re-reads it (and publishers send again what Redis lost).
            return;
        }
        let first = events.keys().next().copied().unwrap_or(0);
        warn!(%room, waited = events.len(), first, "live events waited for earlier numbers that never came: sent with the gap");
        self.metrics.registry_gaps.inc();
        let now = crate::clock::now();
        for envelope in events.values() {
            self.apply(&room, envelope, now);
        }
    }
}

impl Follow {
    /// Drops the events that wait for a gap: the room is about to be re-read from Redis.
    pub(super) fn forget_waiting(&self) {
        lock(&self.waiting).events.clear();
    }
}
