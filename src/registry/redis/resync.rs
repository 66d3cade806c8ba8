//! Coming back to Redis after an outage, the same way for the whole of Redis (it was lost) and
//! for one room (its cluster shard failed, or its publishes waited for its holders): hold live
//! messages, subscribe, reseed, send the outbox in order and mark the scope up once it is empty,
//! then re-read each room into the hub and apply what was held.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::follow::Follow;
use super::keys::channel;
use super::scripts::Numbered;
use super::{lock, run_per_room, RedisRegistry};
use crate::core::{Kind, RoomName};

/// What a resync brings back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Scope {
    /// Every room: Redis itself was lost (one Redis).
    All,
    /// One room in outage on its own.
    Room(RoomName),
}

impl Scope {
    pub(super) fn covers(&self, room: &RoomName) -> bool {
        match self {
            Self::All => true,
            Self::Room(own) => own == room,
        }
    }
}

/// How soon a whole-Redis resync that failed after Redis answered is tried again (a failure
/// before it answers waits for the next heartbeat).
const RETRY_AFTER: Duration = Duration::from_millis(250);

/// How a resync's catch-up ended.
enum CaughtUp {
    /// The outbox of the scope is sent and the scope is up.
    Done,
    /// A room's publishes still wait for its holders (`Scope::Room` only).
    WaitingForHolders,
}

impl RedisRegistry {
    /// Brings `scope` back to Redis; retried by the heartbeat (and soon after a failure once Redis
    /// answers) until it succeeds.
    pub(super) async fn resync(self: Arc<Self>, scope: Scope) {
        // One whole-Redis resync at a time; a probe that finds one running leaves it to finish.
        let _one = match scope {
            Scope::All => match self.resync.try_lock() {
                Ok(one) => Some(one),
                Err(_) => return,
            },
            Scope::Room(_) => None,
        };
        if scope == Scope::All {
            if self.is_up() {
                return;
            }
            // Both connections must answer: a pub/sub connection that still reports its last
            // failed reconnect would fail the subscribes below (`RedisConn::probe`).
            let probed = async {
                self.commands.clone().probe().await?;
                self.pubsub.clone().probe().await
            };
            if let Err(error) = probed.await {
                debug!(%error, "redis still down");
                return;
            }
        }
        // What Redis numbered for this node lately goes (again) to the outbox: harmless if
        // Redis kept it, and what a Redis that died empty lost (even during an earlier attempt)
        // comes back.
        self.restore_recent(&scope);
        let rooms: Vec<(RoomName, Arc<Follow>)> = self
            .followed()
            .into_iter()
            .filter(|(room, _)| scope.covers(room))
            .collect();
        for (_, follow) in &rooms {
            // Held from now on; what an earlier attempt held may come from a Redis that died
            // since (its numbers are not this one's): the re-read below, or its publisher's
            // restore, brings it back.
            follow.hold_afresh();
        }
        match self.catch_up(&scope, &rooms).await {
            Ok(CaughtUp::Done) => {}
            Ok(CaughtUp::WaitingForHolders) => {
                debug!(?scope, "the room's publishes still wait for its holders");
                return Arc::clone(&self).resync_later(&scope);
            }
            Err(error) => {
                // The rooms stay held: the next attempt re-reads them, and a live message applied
                // meanwhile could skip what this one could not read.
                warn!(%error, ?scope, "redis resync failed; retrying");
                return Arc::clone(&self).resync_later(&scope);
            }
        }
        if self.is_up() && lock(&self.down_rooms).is_empty() {
            self.metrics.registry_up.set(1);
        }
        if scope == Scope::All {
            // Presence and the node record come back now, not a heartbeat later.
            if let Err(error) = self.beat().await {
                debug!(%error, "heartbeat after the resync failed");
            }
            // Rooms first followed while this resync ran were not subscribed (Redis counted as
            // down): subscribe and read them now.
            let newcomers: Vec<_> = self
                .followed()
                .into_iter()
                .filter(|(room, _)| !rooms.iter().any(|(known, _)| known == room))
                .collect();
            for (room, follow) in newcomers {
                tokio::spawn(Arc::clone(&self).subscribe_again(room, follow));
            }
        }
        let now = crate::clock::now();
        let (mut reread, count) = (0, rooms.len());
        for (room, follow) in rooms {
            match self.read_room(&room).await {
                // Not `catch_up_seq`: holders that missed events other holders put the numbering
                // past must still take them when their publishers send them again.
                Ok(snapshot) if self.is_room_up(&room) => {
                    let taken = self
                        .hub
                        .resume_from(&room, &snapshot.epoch, &snapshot.publications(), now);
                    debug!(%room, taken, seq = snapshot.seq, "the room re-read");
                    // Past a gap: applied as the numbers before them arrive (`gaps`).
                    for envelope in snapshot.envelopes {
                        if envelope.kind == Kind::Event.to_byte() && envelope.number > taken {
                            self.apply_in_order(&room, &follow, envelope, now);
                        }
                    }
                    reread += 1;
                }
                // Lost again while it was read: the room stays held, and the resync that follows
                // the new outage re-reads it. (Applying what it held without the re-read would
                // skip whatever other nodes published while this node was away.)
                Ok(_) => {
                    debug!(%room, "redis was lost again while the room was re-read: it stays held");
                    continue;
                }
                Err(error) => {
                    warn!(error = ?error, %room, "cannot re-read the room: it stays held until redis is back");
                    let error = error.map_or_else(|| "re-read failed".to_string(), |e| e.to_string());
                    // One Redis: the whole of it is down, and its resync re-reads every room; a
                    // cluster: this room resyncs alone.
                    self.mark_room_down(&room, &error);
                    continue;
                }
            }
            follow.release_held(|envelope| self.apply_in_order(&room, &follow, envelope.clone(), now));
        }
        match &scope {
            Scope::All => {
                // Rooms Redis lost settle before their publishes go (see `reseed`), on their own.
                let settling = lock(&self.down_rooms).len();
                info!(
                    rooms = count,
                    reread, settling, "redis is back: outbox published, rooms re-read"
                )
            }
            Scope::Room(room) if reread == count => {
                info!(%room, "the room is back on redis: its outbox published, the room re-read")
            }
            Scope::Room(_) => {}
        }
    }

    /// Subscribes the scope's rooms, reseeds them from what this node holds, then sends the
    /// scope's outbox in order; the last step marks the scope up (`next_to_flush`).
    async fn catch_up(&self, scope: &Scope, rooms: &[(RoomName, Arc<Follow>)]) -> redis::RedisResult<CaughtUp> {
        // Subscribe first, and wait for Redis to confirm: what other nodes publish from here on
        // arrives live (held), and the re-read covers what they published before. A resync that
        // starts from the heartbeat, before the pub/sub connection resubscribed by itself, would
        // otherwise lose a message published in between.
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
        // Every room this node holds gets its epoch, counters and state back if Redis lost them.
        run_per_room(
            rooms
                .iter()
                .filter_map(|(room, _)| Some((room, self.hub.room_numbers(room)?)))
                .map(|(room, numbers)| self.reseed(room, numbers))
                .collect(),
        )
        .await?;
        if let Scope::Room(room) = scope {
            if rooms.is_empty() {
                // Not followed (a room whose publishes waited for its holders): reseed if held.
                if let Some(numbers) = self.hub.room_numbers(room) {
                    self.reseed(room, numbers).await?;
                }
            }
        }
        if let Scope::Room(room) = scope {
            if self.settling(room) {
                return Ok(CaughtUp::WaitingForHolders);
            }
        }
        while let Some(item) = self.next_to_flush(scope) {
            let wait = self.waits_for_holders(&item.room);
            match self.run_publish_script(item.to_number(), 0, wait).await? {
                // Redis lost the room: its holders have not put it back yet, or are still
                // settling it. The room's items stay; the room resyncs on its own later.
                Numbered::NoSuchRoom | Numbered::Settling => match scope {
                    Scope::All => self.wait_for_holders(&item.room),
                    Scope::Room(_) => return Ok(CaughtUp::WaitingForHolders),
                },
                Numbered::Number(epoch, number) => {
                    self.remove_from_outbox(&item);
                    self.remember_flushed(&item, epoch, number);
                }
                Numbered::Superseded => self.remove_from_outbox(&item),
            }
        }
        Ok(CaughtUp::Done)
    }

    /// After a failed attempt: a room is retried by the next heartbeat; the whole of Redis soon,
    /// once (the heartbeat goes on probing too).
    fn resync_later(self: Arc<Self>, scope: &Scope) {
        match scope {
            Scope::Room(room) => {
                if let Some(outage) = lock(&self.down_rooms).get_mut(room) {
                    outage.resyncing = false;
                }
            }
            Scope::All => {
                if !self.retry_soon.swap(true, Ordering::AcqRel) {
                    tokio::spawn(async move {
                        tokio::time::sleep(RETRY_AFTER).await;
                        self.retry_soon.store(false, Ordering::Release);
                        self.resync(Scope::All).await;
                    });
                }
            }
        }
    }
}
