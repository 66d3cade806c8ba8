//! The heartbeat: this node's record and its rooms' subscriber counts in Redis (presence), the
//! probe that starts a resync while Redis is down, and the live nodes as `GET /v1/nodes` lists them.

use std::collections::HashMap;
use std::sync::Arc;

use redis::AsyncCommands;
use tracing::warn;

use super::keys::{node_key, presence_key, NODES_KEY};
use super::resync::Scope;
use super::{lock, run_per_room, RedisRegistry};
use crate::core::RoomName;
use crate::registry::NodeRecord;

/// How often Redis is probed while it is away.
const DOWN_PROBE: std::time::Duration = std::time::Duration::from_millis(500);

impl RedisRegistry {
    /// Every heartbeat: refresh this node's record and its rooms' presence counts; while down,
    /// probe Redis and resync when it answers; resync each room in outage on its own.
    pub(super) async fn heartbeat(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut beat_failing = false;
        loop {
            if !self.is_up() {
                // While Redis is away it is probed more often than the heartbeat, so that the node
                // is back (and its recent publishes sent again) soon after Redis answers.
                tokio::spawn(self.clone().resync(Scope::All));
                tokio::time::sleep(self.settings.heartbeat.min(DOWN_PROBE)).await;
                continue;
            }
            tick.tick().await;
            if !self.is_up() {
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
                tokio::spawn(self.clone().resync(Scope::Room(room)));
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

    /// Writes this node's record and the presence of every room it follows.
    pub(super) async fn beat(&self) -> redis::RedisResult<()> {
        let ttl_ms = (self.settings.heartbeat * 3).as_millis() as u64;
        let now_ms = crate::clock::unix_ms();
        let id = &self.settings.node_id;
        let connections = self.metrics.connections();
        let mut fields = vec![
            ("connections", connections.to_string()),
            ("subscriptions", self.metrics.subscriptions.get().to_string()),
            ("rooms", self.hub.room_count().to_string()),
            ("http", self.settings.http.clone()),
        ];
        if let Some(summary) = lock(&self.summary).clone() {
            fields.push(("ops", summary));
        }
        let mut pipe = redis::pipe();
        pipe.hset_multiple(node_key(id), &fields)
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
    pub(super) async fn live_nodes(&self) -> redis::RedisResult<Vec<NodeRecord>> {
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
                ops: fields.get("ops").cloned(),
                id,
            });
        }
        Ok(nodes)
    }
}
