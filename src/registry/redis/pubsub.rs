//! The pub/sub reader: every push of the pub/sub connection (a room's message, a subscribe
//! confirmation, a lost connection, a shard channel Redis dropped) and what it sets going.

use std::sync::Arc;

use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;
use tracing::warn;

use super::follow::OwnedEnvelope;
use super::keys::room_of_channel;
use super::resync::Scope;
use super::{lock, RedisRegistry};
use crate::core::{EventId, Kind, RoomName};
use crate::registry::envelope;

impl RedisRegistry {
    /// Reads pub/sub pushes: messages are applied (or held while their room loads); a
    /// disconnection marks Redis down; the resubscription after a reconnect starts a resync.
    pub(super) async fn read_pushes(self: Arc<Self>, mut pushes: mpsc::UnboundedReceiver<PushInfo>) {
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
                    tokio::spawn(self.clone().resync(Scope::All));
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

    /// Applies a live message, or holds it while its room loads or while the room cannot reach
    /// Redis: until the resync re-reads the room, a message applied now would move the room's
    /// confirmed sequence past what it has not read yet.
    fn receive(self: &Arc<Self>, room: &RoomName, envelope: OwnedEnvelope) {
        let follow = lock(&self.follows).get(room).cloned();
        let max_held = self.settings.history_len.max(1);
        let Some(follow) = follow else {
            self.apply(room, &envelope, crate::clock::now());
            return;
        };
        let Some(envelope) = follow.hold_or_pass(envelope, !self.is_room_up(room), max_held) else {
            return;
        };
        self.apply_in_order(room, &follow, envelope, crate::clock::now());
    }
}
