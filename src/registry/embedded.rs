//! The embedded registry: this node alone. Publishes are numbered by the hub itself and every
//! read is answered from the hub, so nothing ever waits.

use futures_util::future::{self, BoxFuture, FutureExt};

use super::{
    HistoryPage, NodeRecord, Published, Registry, RegistryError, RegistryStatus, RoomEvents, RoomFigures, StoredEvent,
    StoredState, Then,
};
use crate::core::{JsonData, Kind, RoomName};
use crate::hub::{Hub, RoomHistory};
use crate::idempotency::{Answer, Claim, IdempotencyKey, LocalKeys};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// This node's rooms, shared with nobody.
#[derive(Debug, Clone)]
pub struct EmbeddedRegistry {
    hub: Hub,
    /// Publishers' idempotency keys, on this node alone.
    keys: Arc<LocalKeys>,
    /// The node's latest operations summary (`share_summary`).
    summary: Arc<std::sync::Mutex<Option<String>>>,
}

impl EmbeddedRegistry {
    pub fn new(hub: Hub) -> Self {
        hub.metrics().registry_up.set(1);
        Self {
            hub,
            keys: Arc::default(),
            summary: Arc::default(),
        }
    }

    /// The room as the hub holds it (also the Redis registry's view while Redis is away).
    pub fn local_room(hub: &Hub, room: &RoomName) -> Option<RoomFigures> {
        let info = hub.room_info(room)?;
        Some(RoomFigures {
            epoch: info.epoch,
            version: info.version,
            state: info.state.map(|p| StoredState {
                ts_ms: p.ts_ms,
                data: p.data().to_string(),
            }),
            last_seq: info.last_seq,
            subscribers: info.subscribers as u64,
        })
    }

    /// One page of the room's events after `since` as the hub holds them (also the Redis
    /// registry's answer for a room this node holds while Redis lacks it).
    pub fn local_events(hub: &Hub, room: &RoomName, since: u64, page: HistoryPage) -> Option<RoomEvents> {
        hub.room_events(room, since, crate::clock::unix_ms())
            .map(|RoomHistory { epoch, events }| {
                // The hub hands out shared publications: only the page's data is copied.
                let (events, more) = match events {
                    Ok(list) => {
                        let (count, more) = page.fit(list.iter().map(|p| p.data().len()));
                        let events = list[..count]
                            .iter()
                            .map(|p| StoredEvent {
                                seq: p.number(),
                                id: p.id.unwrap_or(crate::core::EventId(0)),
                                ts_ms: p.ts_ms,
                                data: p.data().to_string(),
                            })
                            .collect();
                        (Ok(events), more)
                    }
                    Err(last_seq) => (Err(last_seq), false),
                };
                RoomEvents { epoch, events, more }
            })
    }
}

impl Registry for EmbeddedRegistry {
    fn publish<'a>(
        &'a self,
        room: &'a RoomName,
        kind: Kind,
        data: &'a JsonData,
    ) -> BoxFuture<'a, Result<Published, RegistryError>> {
        let published = self
            .hub
            .publish(room, kind, data, crate::clock::now())
            .map(|receipt| Published::Numbered {
                number: receipt.number,
                id: receipt.id,
                ts_ms: receipt.ts_ms,
            })
            .map_err(RegistryError::from);
        future::ready(published).boxed()
    }

    fn follow(&self, _room: RoomName, then: Then) {
        then(crate::clock::unix_ms());
    }

    fn room<'a>(&'a self, room: &'a RoomName) -> BoxFuture<'a, Result<Option<RoomFigures>, RegistryError>> {
        future::ready(Ok(Self::local_room(&self.hub, room))).boxed()
    }

    fn events_since<'a>(
        &'a self,
        room: &'a RoomName,
        since: u64,
        page: HistoryPage,
    ) -> BoxFuture<'a, Result<Option<RoomEvents>, RegistryError>> {
        future::ready(Ok(Self::local_events(&self.hub, room, since, page))).boxed()
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeRecord>, RegistryError>> {
        let metrics = self.hub.metrics();
        let me = NodeRecord {
            id: "local".into(),
            http: String::new(),
            connections: metrics.connections(),
            subscriptions: metrics.subscriptions.get(),
            rooms: self.hub.room_count() as i64,
            ops: self.summary.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        };
        future::ready(Ok(vec![me])).boxed()
    }

    fn status(&self) -> RegistryStatus {
        RegistryStatus {
            kind: "embedded",
            status: "ok",
            outbox: 0,
            rooms_down: 0,
        }
    }

    fn share_summary(&self, summary: String) {
        *self.summary.lock().unwrap_or_else(|p| p.into_inner()) = Some(summary);
    }

    fn claim_key<'a>(
        &'a self,
        key: &'a IdempotencyKey,
        fingerprint: &'a str,
        window: Duration,
    ) -> BoxFuture<'a, Result<Claim, RegistryError>> {
        future::ready(Ok(self.keys.claim(key, fingerprint, window, Instant::now()))).boxed()
    }

    fn answer_key<'a>(
        &'a self,
        key: &'a IdempotencyKey,
        answer: &'a Answer,
        window: Duration,
    ) -> BoxFuture<'a, Result<(), RegistryError>> {
        self.keys.answer(key, answer.clone(), window, Instant::now());
        future::ready(Ok(())).boxed()
    }

    fn release_key<'a>(&'a self, key: &'a IdempotencyKey) -> BoxFuture<'a, ()> {
        self.keys.release(key);
        future::ready(()).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::HubConfig;
    use crate::metrics::Metrics;
    use std::sync::Arc;

    fn room(name: &str) -> RoomName {
        RoomName::parse(name).expect("room")
    }

    #[tokio::test]
    async fn publishes_are_numbered_and_read_back_from_the_hub() {
        let hub = Hub::new(HubConfig::default(), Arc::new(Metrics::new()), 1);
        let registry = EmbeddedRegistry::new(hub);
        let data = JsonData::parse(br#"{"home":2}"#).expect("json");
        let published = registry.publish(&room("game:1"), Kind::State, &data).await;
        assert!(matches!(published, Ok(Published::Numbered { number: 1, .. })));
        registry
            .publish(&room("game:1"), Kind::Event, &data)
            .await
            .expect("event");
        let figures = registry.room(&room("game:1")).await.expect("read").expect("room");
        assert_eq!((figures.version, figures.last_seq), (1, 1));
        assert_eq!(figures.state.map(|s| s.data), Some(r#"{"home":2}"#.to_string()));
        let events = registry
            .events_since(
                &room("game:1"),
                0,
                HistoryPage {
                    limit: 10,
                    max_bytes: 1 << 20,
                },
            )
            .await
            .expect("read")
            .expect("room");
        assert_eq!(events.events.map(|e| e.len()), Ok(1));
        assert_eq!(registry.room(&room("game:2")).await, Ok(None));
        let nodes = registry.nodes().await.expect("nodes");
        assert_eq!((nodes.len(), nodes[0].rooms), (1, 1));
    }

    #[test]
    fn follow_runs_at_once() {
        let hub = Hub::new(HubConfig::default(), Arc::new(Metrics::new()), 1);
        let registry = EmbeddedRegistry::new(hub);
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        registry.follow(
            room("game:1"),
            Box::new(move |_| flag.store(true, std::sync::atomic::Ordering::Relaxed)),
        );
        assert!(ran.load(std::sync::atomic::Ordering::Relaxed));
    }
}
