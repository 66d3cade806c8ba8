//! One room's retained data: the latest state with its version, and the bounded event history
//! with its sequence numbers. Pure: every call takes the time as an input.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use super::kind::Kind;
use super::protocol::ServerControl;
use super::publication::{EventId, JsonData, Publication, RoomId};
use super::room_name::RoomName;
use super::time::Now;

/// Bounds on what a room retains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionLimits {
    /// Events kept for `since` recovery.
    pub history_len: usize,
    /// Events older than this are dropped from the history.
    pub history_ttl: Duration,
    /// Encoded bytes of history kept per room; the oldest events go first.
    pub history_bytes: usize,
    /// A room with no subscribers drops its state this long after its last publish.
    pub state_ttl: Duration,
}

impl Default for RetentionLimits {
    fn default() -> Self {
        Self {
            history_len: 1000,
            history_ttl: Duration::from_secs(600),
            history_bytes: 16 << 20,
            state_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// What a subscriber gets when it joins: the reply, the current state, and recovered events.
#[derive(Debug)]
pub struct Snapshot {
    pub subscribed: ServerControl,
    pub state: Option<Arc<Publication>>,
    pub events: Vec<Arc<Publication>>,
}

/// A room's versions, sequences and retained data.
#[derive(Debug)]
pub struct Room {
    id: RoomId,
    name: RoomName,
    /// Changes whenever the room is created anew, so that clients know versions and
    /// sequences restarted (docs/PROTOCOL.md, "Epochs").
    epoch: String,
    version: u64,
    state: Option<Arc<Publication>>,
    last_seq: u64,
    history: VecDeque<Arc<Publication>>,
    history_bytes: usize,
    last_publish_ms: u64,
    /// The last numbers the shared registry assigned, as opposed to numbers this node gave out
    /// alone during an outage.
    confirmed_version: u64,
    confirmed_seq: u64,
    /// While the room runs on a local epoch during a registry outage: the registry's epoch.
    outage_of: Option<String>,
    /// The ids of the events given out under local epochs, which `resume` took out of the
    /// history: the registry may bring them back later (past a hole in its history, or sent
    /// again by their publisher), and subscribers that had them must not get them twice. Oldest
    /// first, at most the history's length.
    resumed_ids: Vec<EventId>,
    limits: RetentionLimits,
}

impl Room {
    pub fn new(id: RoomId, name: RoomName, epoch: String, limits: RetentionLimits, now_ms: u64) -> Self {
        Self {
            id,
            name,
            epoch,
            version: 0,
            state: None,
            last_seq: 0,
            history: VecDeque::new(),
            history_bytes: 0,
            last_publish_ms: now_ms,
            confirmed_version: 0,
            confirmed_seq: 0,
            outage_of: None,
            resumed_ids: Vec::new(),
            limits,
        }
    }

    pub fn id(&self) -> RoomId {
        self.id
    }

    pub fn name(&self) -> &RoomName {
        &self.name
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn state(&self) -> Option<&Arc<Publication>> {
        self.state.as_ref()
    }

    /// Replaces the state and assigns the next version.
    pub fn publish_state(&mut self, data: &JsonData, now: Now) -> Arc<Publication> {
        self.version += 1;
        self.keep_state(self.version, data, now, now)
    }

    /// Appends an event (identified by `id`, assigned when the publish was accepted) with the
    /// next sequence number, trimming the history to its bounds.
    pub fn publish_event(&mut self, id: EventId, data: &JsonData, now: Now) -> Arc<Publication> {
        self.last_seq += 1;
        self.keep_event(self.last_seq, id, data, now, now)
    }

    /// Applies a state whose version was assigned elsewhere (the Redis registry). Returns the
    /// publication to fan out, or `None` when the room already has that version or a newer one.
    pub fn apply_state(&mut self, version: u64, ts_ms: u64, data: &JsonData, now: Now) -> Option<Arc<Publication>> {
        if version <= self.version {
            return None;
        }
        self.version = version;
        self.confirmed_version = version;
        Some(self.keep_state(
            version,
            data,
            Now {
                unix_ms: ts_ms,
                instant: now.instant,
            },
            now,
        ))
    }

    /// Applies an event whose sequence was assigned elsewhere. Sequences may skip numbers (after a
    /// Redis outage, for example) but never go back: an old or repeated one returns `None`. An
    /// event whose id the history holds already (sent again under a new number after Redis lost
    /// it) moves the numbering on but returns `None`: no subscriber gets it twice; so does one the
    /// room gave out under its last local epoch, which it keeps in the history under this number.
    pub fn apply_event(
        &mut self,
        seq: u64,
        id: EventId,
        ts_ms: u64,
        data: &JsonData,
        now: Now,
    ) -> Option<Arc<Publication>> {
        if seq <= self.last_seq {
            return None;
        }
        self.last_seq = seq;
        self.confirmed_seq = seq;
        if self.history.iter().rev().any(|p| p.id == Some(id)) {
            return None;
        }
        let ingest = Now {
            unix_ms: ts_ms,
            instant: now.instant,
        };
        if let Some(at) = self.resumed_ids.iter().position(|held| *held == id) {
            // Given out under the local epoch before the room resumed: kept under the registry's
            // number for recovery, not given out again.
            self.resumed_ids.remove(at);
            self.keep_event(seq, id, data, ingest, now);
            return None;
        }
        Some(self.keep_event(seq, id, data, ingest, now))
    }

    /// Raises the sequence to the registry's last one when the registry no longer holds the events
    /// up to it (its history expired or was trimmed), so that a room read then still knows how
    /// far the numbering went: a later reseed puts that back, not 0, and `since` is judged
    /// against it. Nothing is delivered; a room on a local epoch is left alone.
    pub fn catch_up_seq(&mut self, seq: u64) {
        if self.outage_of.is_none() && seq > self.last_seq {
            self.last_seq = seq;
            self.confirmed_seq = seq;
        }
    }

    /// Whether the history holds the event with this id.
    pub fn holds_event(&self, id: EventId) -> bool {
        self.history.iter().rev().any(|p| p.id == Some(id)) || self.resumed_ids.contains(&id)
    }

    /// Builds the state publication (ingested at `ingest`) and keeps it as the room's state.
    /// The state it replaces becomes its delta base (when it is large enough to have one), and
    /// lets its own base go: the room holds at most two states.
    fn keep_state(&mut self, version: u64, data: &JsonData, ingest: Now, now: Now) -> Arc<Publication> {
        let previous = self.state.take();
        if let Some(previous) = &previous {
            previous.release_delta_base();
        }
        let publication = Arc::new(
            Publication::new(self.id, self.name.clone(), Kind::State, version, None, data, ingest)
                .with_delta_base(previous.as_ref()),
        );
        self.state = Some(publication.clone());
        self.last_publish_ms = now.unix_ms;
        publication
    }

    /// Builds the event publication (ingested at `ingest`) and appends it to the history.
    fn keep_event(&mut self, seq: u64, id: EventId, data: &JsonData, ingest: Now, now: Now) -> Arc<Publication> {
        let publication = Arc::new(Publication::new(
            self.id,
            self.name.clone(),
            Kind::Event,
            seq,
            Some(id),
            data,
            ingest,
        ));
        self.history_bytes += publication.size();
        self.history.push_back(publication.clone());
        self.last_publish_ms = now.unix_ms;
        self.trim(now.unix_ms);
        publication
    }

    /// Starts the room over under another epoch (the shared registry lost and recreated it):
    /// counters and retained data are cleared, to be filled by what follows.
    pub fn restart(&mut self, epoch: String) {
        self.epoch = epoch;
        self.confirmed_version = 0;
        self.confirmed_seq = 0;
        self.outage_of = None;
        self.version = 0;
        self.state = None;
        self.last_seq = 0;
        self.history.clear();
        self.history_bytes = 0;
    }

    /// Switches to a local epoch for numbers given out while the registry is unreachable, so that
    /// clients can tell them from the registry's. Returns false when already switched.
    pub fn enter_outage(&mut self, local_epoch: String) -> bool {
        if self.outage_of.is_some() {
            return false;
        }
        self.outage_of = Some(std::mem::replace(&mut self.epoch, local_epoch));
        true
    }

    /// Whether the room runs on a local epoch (the registry is unreachable, or was until now).
    pub fn in_outage(&self) -> bool {
        self.outage_of.is_some()
    }

    /// The registry's epoch: the room's own, or the one it had before an outage.
    pub fn registry_epoch(&self) -> &str {
        self.outage_of.as_deref().unwrap_or(&self.epoch)
    }

    /// The last numbers the registry assigned: (version, seq).
    pub fn confirmed(&self) -> (u64, u64) {
        (self.confirmed_version, self.confirmed_seq)
    }

    /// Returns to the registry's numbering after an outage (or follows it to a new epoch): the
    /// counters go back to the last confirmed numbers (to 0 under a new epoch) and events given
    /// out locally leave the history. Returns whether anything changed, so that subscribers are told.
    pub fn resume(&mut self, epoch: &str) -> bool {
        if self.outage_of.is_none() && self.epoch == epoch {
            return false;
        }
        let same_registry_epoch = self.registry_epoch() == epoch;
        self.outage_of = None;
        self.epoch = epoch.to_string();
        if !same_registry_epoch {
            self.confirmed_version = 0;
            self.confirmed_seq = 0;
        }
        self.version = self.confirmed_version;
        self.last_seq = self.confirmed_seq;
        let keep = self.confirmed_seq;
        // Ids of earlier outages stay: the registry may not have brought them back yet when the
        // room lost it again (a stall, then a cut), and their subscribers hold them all the same.
        let mut given_out = Vec::new();
        while self.history.back().is_some_and(|p| p.number() > keep) {
            if let Some(p) = self.history.pop_back() {
                self.history_bytes -= p.size();
                given_out.extend(p.id);
            }
        }
        given_out.reverse();
        self.resumed_ids.extend(given_out);
        let over = self.resumed_ids.len().saturating_sub(self.limits.history_len);
        self.resumed_ids.drain(..over);
        true
    }

    /// Drops history beyond the count, byte and age bounds.
    pub fn trim(&mut self, now_ms: u64) {
        let oldest_kept_ms = now_ms.saturating_sub(self.limits.history_ttl.as_millis() as u64);
        while let Some(front) = self.history.front() {
            let over = self.history.len() > self.limits.history_len
                || self.history_bytes > self.limits.history_bytes
                || front.ts_ms < oldest_kept_ms;
            if !over {
                break;
            }
            self.history_bytes -= front.size();
            self.history.pop_front();
        }
    }

    /// Trims by age and drops a stale state; returns whether anything is still retained.
    pub fn expire(&mut self, now_ms: u64) -> bool {
        self.trim(now_ms);
        let state_deadline = self
            .last_publish_ms
            .saturating_add(self.limits.state_ttl.as_millis() as u64);
        if now_ms >= state_deadline {
            self.state = None;
        }
        self.retains_data()
    }

    pub fn retains_data(&self) -> bool {
        self.state.is_some() || !self.history.is_empty()
    }

    /// The events after `since`, if the history still holds all of them.
    pub fn events_since(&self, since: u64) -> Option<Vec<Arc<Publication>>> {
        if since > self.last_seq {
            return None;
        }
        let first_kept = self.history.front().map_or(self.last_seq + 1, |p| seq_of(p));
        if since + 1 < first_kept {
            return None;
        }
        Some(self.history.iter().filter(|p| seq_of(p) > since).cloned().collect())
    }

    /// Everything a new subscriber must receive, in order. With `since`, recovery succeeds
    /// only when the epoch matches (if given), the history reaches back far enough, and the
    /// events to recover hold at most `max_recovery_bytes` (the connection's allowance).
    pub fn snapshot(
        &mut self,
        since: Option<u64>,
        epoch: Option<&str>,
        max_recovery_bytes: usize,
        now_ms: u64,
    ) -> Snapshot {
        self.trim(now_ms);
        let (recovered, events) = match since {
            None => (None, Vec::new()),
            Some(_) if epoch.is_some_and(|e| e != self.epoch) => (Some(false), Vec::new()),
            Some(since) => match self.events_since(since) {
                Some(events) if events.iter().map(|p| p.size()).sum::<usize>() <= max_recovery_bytes => {
                    (Some(true), events)
                }
                _ => (Some(false), Vec::new()),
            },
        };
        Snapshot {
            subscribed: ServerControl::Subscribed {
                room: self.name.clone(),
                room_id: self.id,
                epoch: self.epoch.clone(),
                version: self.version,
                seq: self.last_seq,
                recovered,
                request: None,
            },
            state: self.state.clone(),
            events,
        }
    }
}

fn seq_of(p: &Publication) -> u64 {
    p.number()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn at(ms: u64) -> Now {
        Now {
            unix_ms: ms,
            instant: Instant::now(),
        }
    }

    fn room(limits: RetentionLimits) -> Room {
        Room::new(
            RoomId(1),
            RoomName::parse("game:1").expect("room"),
            "ep".into(),
            limits,
            0,
        )
    }

    fn data(n: u64) -> JsonData {
        JsonData::parse(n.to_string().as_bytes()).expect("json")
    }

    fn seqs(events: &[Arc<Publication>]) -> Vec<u64> {
        events.iter().map(|p| seq_of(p)).collect()
    }

    #[test]
    fn versions_and_sequences_count_from_one_independently() {
        let mut r = room(RetentionLimits::default());
        let kind_and_number = |p: Arc<Publication>| (p.kind, p.number);
        assert_eq!(kind_and_number(r.publish_state(&data(1), at(1))), (Kind::State, 1));
        assert_eq!(kind_and_number(r.publish_state(&data(2), at(2))), (Kind::State, 2));
        assert_eq!(
            kind_and_number(r.publish_event(EventId(3), &data(3), at(3))),
            (Kind::Event, 1)
        );
        assert_eq!(r.state().map(|s| s.data().to_string()), Some("2".into()));
        assert_eq!((r.version(), r.last_seq()), (2, 1));
    }

    #[test]
    fn snapshot_without_since_carries_current_state_only() {
        let mut r = room(RetentionLimits::default());
        r.publish_state(&data(9), at(1));
        r.publish_event(EventId(1), &data(1), at(1));
        let snap = r.snapshot(None, None, usize::MAX, 2);
        assert!(matches!(
            snap.subscribed,
            ServerControl::Subscribed {
                version: 1,
                seq: 1,
                recovered: None,
                ..
            }
        ));
        assert_eq!(snap.state.map(|s| s.data().to_string()), Some("9".into()));
        assert!(snap.events.is_empty());
    }

    #[test]
    fn since_recovers_missed_events_in_order() {
        let mut r = room(RetentionLimits::default());
        for i in 1..=5 {
            r.publish_event(EventId(i), &data(i), at(i));
        }
        let snap = r.snapshot(Some(2), None, usize::MAX, 10);
        assert!(matches!(
            snap.subscribed,
            ServerControl::Subscribed {
                recovered: Some(true),
                request: None,
                seq: 5,
                ..
            }
        ));
        assert_eq!(seqs(&snap.events), vec![3, 4, 5]);
        assert_eq!(
            seqs(&r.snapshot(Some(0), None, usize::MAX, 10).events),
            vec![1, 2, 3, 4, 5]
        );
        let caught_up = r.snapshot(Some(5), Some("ep"), usize::MAX, 10);
        assert!(matches!(
            caught_up.subscribed,
            ServerControl::Subscribed {
                recovered: Some(true),
                ..
            }
        ));
        assert!(caught_up.events.is_empty());
    }

    #[test]
    fn recovery_fails_beyond_history_on_epoch_change_or_from_the_future() {
        let limits = RetentionLimits {
            history_len: 3,
            ..RetentionLimits::default()
        };
        let mut r = room(limits);
        for i in 1..=10 {
            r.publish_event(EventId(i), &data(i), at(i));
        }
        assert_eq!(seqs(&r.snapshot(Some(7), None, usize::MAX, 10).events), vec![8, 9, 10]);
        let failed = |s: Snapshot| {
            matches!(
                s.subscribed,
                ServerControl::Subscribed {
                    recovered: Some(false),
                    ..
                }
            ) && s.events.is_empty()
        };
        assert!(failed(r.snapshot(Some(6), None, usize::MAX, 10)));
        assert!(failed(r.snapshot(Some(0), None, usize::MAX, 10)));
        assert!(failed(r.snapshot(Some(8), Some("other-epoch"), usize::MAX, 10)));
        assert!(failed(r.snapshot(Some(11), None, usize::MAX, 10)));
    }

    #[test]
    fn recovery_beyond_the_connections_allowance_fails_cleanly() {
        let mut r = room(RetentionLimits::default());
        for i in 1..=4 {
            r.publish_event(EventId(i), &data(i), at(i));
        }
        let all: usize = r.events_since(0).expect("history").iter().map(|p| p.size()).sum();
        assert_eq!(seqs(&r.snapshot(Some(0), None, all, 5).events), vec![1, 2, 3, 4]);
        let over = r.snapshot(Some(0), None, all - 1, 5);
        assert!(matches!(
            over.subscribed,
            ServerControl::Subscribed {
                recovered: Some(false),
                ..
            }
        ));
        assert!(over.events.is_empty());
    }

    #[test]
    fn history_is_bounded_by_age_and_bytes() {
        let limits = RetentionLimits {
            history_ttl: Duration::from_millis(100),
            ..RetentionLimits::default()
        };
        let mut r = room(limits);
        r.publish_event(EventId(1), &data(1), at(0));
        r.publish_event(EventId(2), &data(2), at(50));
        r.publish_event(EventId(3), &data(3), at(120));
        assert_eq!(seqs(&r.snapshot(Some(1), None, usize::MAX, 120).events), vec![2, 3]);
        assert!(matches!(
            r.snapshot(Some(0), None, usize::MAX, 120).subscribed,
            ServerControl::Subscribed {
                recovered: Some(false),
                ..
            }
        ));

        let one = Publication::new(
            RoomId(1),
            RoomName::parse("game:1").expect("room"),
            Kind::Event,
            1,
            Some(EventId(1)),
            &data(1),
            at(0),
        )
        .size();
        let mut r = room(RetentionLimits {
            history_bytes: one * 2,
            ..RetentionLimits::default()
        });
        for i in 1..=5 {
            r.publish_event(EventId(i), &data(i), at(i));
        }
        assert_eq!(seqs(&r.snapshot(Some(3), None, usize::MAX, 5).events), vec![4, 5]);
    }

    #[test]
    fn applied_numbers_never_go_back_but_may_skip() {
        let mut r = room(RetentionLimits::default());
        assert!(r.apply_state(5, 10, &data(5), at(10)).is_some());
        assert!(r.apply_state(5, 11, &data(6), at(11)).is_none());
        assert!(r.apply_state(4, 11, &data(4), at(11)).is_none());
        assert_eq!(r.state().map(|s| (s.number(), s.ts_ms)), Some((5, 10)));
        assert!(r.apply_event(3, EventId(103), 1, &data(3), at(12)).is_some());
        assert!(r.apply_event(9, EventId(109), 1, &data(9), at(12)).is_some());
        assert!(r.apply_event(9, EventId(109), 1, &data(9), at(12)).is_none());
        assert_eq!(seqs(&r.snapshot(Some(3), None, usize::MAX, 12).events), vec![9]);
        r.restart("new".into());
        assert_eq!(
            (r.epoch(), r.version(), r.last_seq(), r.retains_data()),
            ("new", 0, 0, false)
        );
        assert!(r.apply_event(1, EventId(101), 1, &data(1), at(13)).is_some());
    }

    #[test]
    fn an_event_held_already_moves_the_numbering_on_without_being_delivered_again() {
        let mut r = room(RetentionLimits::default());
        assert!(r.apply_event(4, EventId(104), 1, &data(4), at(1)).is_some());
        // Redis lost it and its publisher sent it again: numbered 5 this time.
        assert!(r.apply_event(5, EventId(104), 1, &data(4), at(2)).is_none());
        assert_eq!((r.last_seq(), r.confirmed()), (5, (0, 5)));
        assert!(r.apply_event(6, EventId(106), 1, &data(6), at(3)).is_some());
        assert_eq!(seqs(&r.snapshot(Some(3), None, usize::MAX, 3).events), vec![4, 6]);
    }

    #[test]
    fn a_room_catches_up_with_a_sequence_whose_events_it_never_read() {
        let mut r = room(RetentionLimits::default());
        r.catch_up_seq(3);
        assert_eq!((r.last_seq(), r.confirmed()), (3, (0, 3)));
        assert_eq!(
            seqs(&r.snapshot(Some(3), None, usize::MAX, 1).events),
            Vec::<u64>::new()
        );
        r.catch_up_seq(2);
        assert_eq!(r.last_seq(), 3, "never back");
        assert!(r.apply_event(4, EventId(104), 1, &data(4), at(2)).is_some());
        assert!(r.enter_outage("local".into()));
        r.catch_up_seq(9);
        assert_eq!(r.last_seq(), 4, "a room on a local epoch is left alone");
    }

    #[test]
    fn an_outage_runs_on_a_local_epoch_and_resumes_from_confirmed_numbers() {
        let mut r = room(RetentionLimits::default());
        r.apply_event(1, EventId(101), 1, &data(1), at(1));
        r.apply_state(1, 1, &data(1), at(1));
        assert!(r.enter_outage("local".into()));
        assert!(!r.enter_outage("again".into()));
        assert_eq!(r.publish_event(EventId(2), &data(2), at(2)).number(), 2);
        assert_eq!((r.epoch(), r.registry_epoch(), r.confirmed()), ("local", "ep", (1, 1)));
        assert!(r.resume("ep"));
        assert_eq!((r.epoch(), r.version(), r.last_seq()), ("ep", 1, 1));
        assert_eq!(seqs(&r.snapshot(Some(0), None, usize::MAX, 3).events), vec![1]);
        assert!(
            r.apply_event(2, EventId(102), 3, &data(20), at(3)).is_some(),
            "the registry's event 2 is not taken for the local one"
        );
        assert!(!r.resume("ep"));
        assert!(r.resume("other"));
        assert_eq!((r.version(), r.last_seq()), (0, 0));
    }

    #[test]
    fn an_event_given_out_before_two_outages_is_not_given_out_again() {
        let mut r = room(RetentionLimits::default());
        r.apply_event(1, EventId(101), 1, &data(1), at(1));
        assert!(r.enter_outage("local-1".into()));
        r.publish_event(EventId(2), &data(2), at(2));
        assert!(r.resume("ep"));
        // The registry has not brought event 2 back yet when the room loses it again.
        assert!(r.enter_outage("local-2".into()));
        r.publish_event(EventId(3), &data(3), at(3));
        assert!(r.resume("ep"));
        assert!(r.holds_event(EventId(2)) && r.holds_event(EventId(3)));
        assert!(
            r.apply_event(2, EventId(2), 2, &data(2), at(4)).is_none(),
            "given out under the first local epoch"
        );
        assert!(r.apply_event(3, EventId(3), 3, &data(3), at(4)).is_none());
        assert!(r.apply_event(4, EventId(4), 4, &data(4), at(4)).is_some());
    }

    #[test]
    fn the_ids_given_out_in_outages_are_bounded_by_the_history_length() {
        let limits = RetentionLimits {
            history_len: 3,
            ..RetentionLimits::default()
        };
        let mut r = room(limits);
        for n in 0..10 {
            assert!(r.enter_outage(format!("local-{n}")));
            r.publish_event(EventId(100 + n), &data(n), at(n));
            assert!(r.resume("ep"));
        }
        assert!(!r.holds_event(EventId(100)), "the oldest went");
        assert!(r.holds_event(EventId(109)) && r.holds_event(EventId(107)));
    }

    #[test]
    fn expire_drops_old_history_then_state() {
        let limits = RetentionLimits {
            history_ttl: Duration::from_millis(10),
            state_ttl: Duration::from_millis(100),
            ..RetentionLimits::default()
        };
        let mut r = room(limits);
        r.publish_state(&data(1), at(0));
        r.publish_event(EventId(1), &data(1), at(0));
        assert!(r.expire(50));
        assert!(r.state().is_some());
        assert!(!r.expire(100));
        assert!(r.state().is_none());
    }
}
