//! Following a room: its channel subscribed and its state and history read into the hub while
//! this node has local subscribers, live messages held while the room (re)loads, and the room
//! dropped when its last local subscriber leaves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use redis::AsyncCommands;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::gaps::Waiting;
use super::keys::{channel, history_key, meta_key, presence_key};
use super::{lock, run_per_room, RedisRegistry};
use crate::core::{EventId, JsonData, Kind, Now, RoomName};
use crate::hub::RemotePublication;
use crate::registry::envelope;

/// Stream entries: id and fields.
type StreamEntries = Vec<(String, HashMap<String, String>)>;

/// A room this node follows (its channel is subscribed, its state loaded).
#[derive(Debug, Default)]
pub(super) struct Follow {
    ready: tokio::sync::OnceCell<()>,
    /// Subscribes in progress: the room is not unfollowed while one is.
    users: AtomicUsize,
    /// Envelopes that arrived while the room was loading or resyncing; `None` while they apply.
    buffer: Mutex<Option<Vec<OwnedEnvelope>>>,
    /// Live events that skip numbers, waiting for the ones before them (`gaps`).
    pub(super) waiting: Mutex<Waiting>,
}

impl Follow {
    /// Holds live messages from now on, until `release_held`.
    pub(super) fn hold(&self) {
        lock(&self.buffer).get_or_insert_with(Vec::new);
    }

    /// Holds live messages from now on, dropping any held before (and any waiting for a gap):
    /// the room is about to be re-read.
    pub(super) fn hold_afresh(&self) {
        *lock(&self.buffer) = Some(Vec::new());
        self.forget_waiting();
    }

    /// Ends the hold, giving `apply` what was held in order. What arrives while those apply is
    /// held behind them and given next, so that a live message never overtakes a held one.
    pub(super) fn release_held(&self, mut apply: impl FnMut(&OwnedEnvelope)) {
        loop {
            let batch = {
                let mut buffer = lock(&self.buffer);
                match buffer.as_mut() {
                    Some(held) if !held.is_empty() => std::mem::take(held),
                    _ => {
                        *buffer = None;
                        return;
                    }
                }
            };
            batch.iter().for_each(&mut apply);
        }
    }

    /// Holds `envelope` if messages are held (or `hold_now`), keeping at most `max` of them;
    /// gives it back when it should be applied now.
    pub(super) fn hold_or_pass(&self, envelope: OwnedEnvelope, hold_now: bool, max: usize) -> Option<OwnedEnvelope> {
        let mut buffer = lock(&self.buffer);
        if hold_now && buffer.is_none() {
            *buffer = Some(Vec::new());
        }
        let Some(buffer) = buffer.as_mut() else {
            return Some(envelope);
        };
        // While Redis is down, what is held is also in Redis (or, if Redis died empty, sent again
        // by its publisher) and the resync's re-read comes after it: past the history's length
        // the oldest can go.
        if hold_now && buffer.len() >= max {
            buffer.remove(0);
        }
        buffer.push(envelope);
        None
    }
}

/// Keeps a followed room from being unfollowed until the subscribe completes.
#[derive(Debug)]
pub struct FollowGuard(Arc<Follow>);

impl Drop for FollowGuard {
    fn drop(&mut self) {
        self.0.users.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A message of a room's channel (or a re-read entry), owned, for the hub.
#[derive(Debug, Clone)]
pub(super) struct OwnedEnvelope {
    pub number: u64,
    pub epoch: String,
    pub kind: u8,
    pub ts: u64,
    pub data: String,
    pub id: Option<EventId>,
    /// False for this node's own outbox publishes: its clients had them under the local epoch.
    pub deliver: bool,
}

impl OwnedEnvelope {
    /// The publication it carries, for the hub; `None` if its data is not JSON.
    pub(super) fn remote(&self) -> Option<RemotePublication<'_>> {
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

/// A room as read from Redis: its epoch, state and retained events, as envelopes in order, and
/// its last sequence (beyond the retained events when its history expired).
pub(super) struct RoomSnapshot {
    pub epoch: String,
    pub envelopes: Vec<OwnedEnvelope>,
    pub seq: u64,
}

impl RoomSnapshot {
    pub(super) fn publications(&self) -> Vec<RemotePublication<'_>> {
        self.envelopes.iter().filter_map(OwnedEnvelope::remote).collect()
    }
}

/// An event of a room's history stream: (seq, id, ts, data), as the publish script wrote it.
/// An entry written by a node without event ids gets the id every node derives for it.
pub(super) fn stream_event<'a>(
    epoch: &str,
    entry: &'a HashMap<String, String>,
) -> Option<(u64, EventId, u64, &'a String)> {
    let seq = entry.get("seq")?.parse().ok()?;
    let ts = entry.get("ts").and_then(|t| t.parse().ok()).unwrap_or(0);
    let id = entry
        .get("id")
        .and_then(|id| EventId::parse(id))
        .unwrap_or(EventId(envelope::legacy_event_id(epoch, seq)));
    Some((seq, id, ts, entry.get("data")?))
}

impl RedisRegistry {
    /// The rooms this node follows.
    pub(super) fn followed(&self) -> Vec<(RoomName, Arc<Follow>)> {
        lock(&self.follows)
            .iter()
            .map(|(room, follow)| (room.clone(), follow.clone()))
            .collect()
    }

    /// Follows the room (subscribes its channel and loads its state and history) before a local
    /// client subscribes. Waits while another subscribe loads the same room.
    pub(super) async fn follow_room(self: &Arc<Self>, room: &RoomName) -> FollowGuard {
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
                let subscribed = self.is_room_up(room);
                if subscribed {
                    let mut pubsub = self.pubsub.clone();
                    if let Err(error) = pubsub.subscribe(channel(room)).await {
                        self.mark_room_down(room, &error);
                    }
                }
                self.load(room, &follow).await;
                if !subscribed && self.is_room_up(room) {
                    // Redis came back while this room loaded, after the resync took its list of
                    // rooms: subscribe and read it now.
                    self.clone().subscribe_again(room.clone(), follow.clone()).await;
                }
            })
            .await;
        FollowGuard(follow)
    }

    /// Subscribes a followed room's channel again after Redis dropped it (a slot migration),
    /// holding live messages until the room is re-read, as on the first follow.
    pub(super) async fn refollow(self: Arc<Self>, room: RoomName, follow: Arc<Follow>) {
        info!(%room, "redis dropped the room's shard channel (slot moved?): subscribing again");
        self.subscribe_again(room, follow).await;
    }

    /// Redis Cluster: the pub/sub connection to some shard was lost. Every followed room
    /// subscribes again and re-reads; a room whose shard does not answer goes into outage alone.
    pub(super) async fn recheck_rooms(self: Arc<Self>) {
        warn!("a redis cluster pub/sub connection was lost: every room subscribes again");
        let checks: Vec<_> = self
            .followed()
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
    pub(super) async fn subscribe_again(self: Arc<Self>, room: RoomName, follow: Arc<Follow>) {
        follow.hold();
        let mut pubsub = self.pubsub.clone();
        if let Err(error) = pubsub.subscribe(channel(&room)).await {
            warn!(%error, %room, "cannot subscribe the room's channel again");
            self.mark_room_down(&room, &error);
        }
        self.load(&room, &follow).await;
    }

    /// Reads the room from Redis into the hub, then applies what arrived meanwhile.
    async fn load(self: &Arc<Self>, room: &RoomName, follow: &Arc<Follow>) {
        let now = crate::clock::now();
        let loaded = if self.is_room_up(room) {
            self.read_room(room).await
        } else {
            Err(None)
        };
        match loaded {
            Ok(snapshot) => {
                let _ = self.hub.ensure_room(room, &snapshot.epoch, now.unix_ms);
                for envelope in &snapshot.envelopes {
                    self.apply(room, envelope, now);
                }
                self.hub.catch_up_seq(room, &snapshot.epoch, snapshot.seq);
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
        follow.release_held(|envelope| self.apply_in_order(room, follow, envelope.clone(), now));
    }

    /// The room's epoch, state and retained events, as envelopes in order.
    pub(super) async fn read_room(&self, room: &RoomName) -> Result<RoomSnapshot, Option<redis::RedisError>> {
        let mut conn = self.commands.clone();
        let meta = meta_key(room);
        let (_, _, fields, entries): (i64, i64, HashMap<String, String>, StreamEntries) = redis::pipe()
            .hset_nx(&meta, "epoch", self.new_epoch())
            .expire(&meta, self.settings.state_ttl_s() as i64)
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
        // In sequence order: an event put back after Redis lost it stands after newer entries.
        // (The state, first, keeps its place: the sort is stable and only among events.)
        let events_from = envelopes
            .iter()
            .position(|e| e.kind == Kind::Event.to_byte())
            .unwrap_or(envelopes.len());
        envelopes[events_from..].sort_by_key(|e| e.number);
        let seq = fields.get("seq").and_then(|s| s.parse().ok()).unwrap_or(0);
        Ok(RoomSnapshot { epoch, envelopes, seq })
    }

    pub(super) fn apply(&self, room: &RoomName, envelope: &OwnedEnvelope, now: Now) {
        if let Some(remote) = envelope.remote() {
            self.hub.apply_remote(room, &remote, now);
        }
    }

    /// Stops following rooms whose last local subscriber left.
    pub(super) async fn unfollow_emptied(self: Arc<Self>, mut emptied: mpsc::UnboundedReceiver<RoomName>) {
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
}
