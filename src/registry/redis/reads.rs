//! What the HTTP side reads from Redis: a room's figures across every node, and a page of its
//! retained events.

use std::collections::HashMap;

use redis::AsyncCommands;

use super::follow::stream_event;
use super::keys::{history_key, meta_key, node_key, presence_key};
use super::RedisRegistry;
use crate::core::RoomName;
use crate::registry::{HistoryPage, RoomEvents, RoomFigures, StoredEvent, StoredState};

/// Stream entries: id and fields.
type StreamEntries = Vec<(String, HashMap<String, String>)>;

/// Entries read beyond one per sequence, for events put back out of order (see `scripts`).
const PUT_BACK_SLACK: u64 = 64;

impl RedisRegistry {
    /// The room as Redis holds it, with the cluster-wide subscriber count.
    pub(super) async fn shared_room(&self, room: &RoomName) -> redis::RedisResult<Option<RoomFigures>> {
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
    /// newest entries: one per sequence after `since`, and `PUT_BACK_SLACK` more for events put
    /// back after Redis lost them (they stand after newer entries), ordered by sequence.
    pub(super) async fn shared_events(
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
        let newest = (last_seq - since + PUT_BACK_SLACK).min(self.settings.history_len.max(1) as u64);
        let mut entries: StreamEntries = redis::cmd("XREVRANGE")
            .arg(history_key(room))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(newest)
            .query_async(&mut conn)
            .await?;
        entries.reverse();
        let mut events: Vec<StoredEvent> = entries
            .iter()
            .filter_map(|(_, e)| {
                stream_event(&epoch, e).map(|(seq, id, ts_ms, data)| StoredEvent {
                    seq,
                    id,
                    ts_ms,
                    data: data.clone(),
                })
            })
            .filter(|e| e.seq > since)
            .collect();
        events.sort_by_key(|e| e.seq);
        let first = events.first().map_or(last_seq + 1, |e| e.seq);
        if since + 1 < first {
            return Ok(Some(RoomEvents {
                epoch,
                events: Err(last_seq),
                more: false,
            }));
        }
        // The page ends at a hole in the numbers: an event whose accepting node died with it
        // before Redis had it, or a range trimmed behind a restored entry (restores are added
        // after newer entries, and trimming takes the oldest added). The next page, from the last
        // seq here, then answers 410 like a history that starts too late: the reader refetches
        // the state instead of skipping events without knowing it.
        events.dedup_by_key(|e| e.seq);
        let contiguous = events
            .iter()
            .zip(since + 1..)
            .take_while(|(e, expected)| e.seq == *expected)
            .count();
        let hole = contiguous < events.len();
        events.truncate(contiguous);
        let (count, more) = page.fit(events.iter().map(|e| e.data.len()));
        events.truncate(count);
        Ok(Some(RoomEvents {
            epoch,
            events: Ok(events),
            more: more || hole,
        }))
    }
}
