//! The per-connection outbound queue and its slow-consumer policy: states conflate to the newest
//! version per room, ordered messages are bounded and overflow closes the connection as "slow".
//! Recovered history is one entry handed out in pieces, so any history the room keeps fits.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::kind::Kind;
use super::protocol::ServerControl;
use super::publication::{Publication, RoomId};

/// Bounds on one connection's ordered backlog (events and control replies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    pub max_messages: usize,
    pub max_bytes: usize,
}

impl Default for QueueLimits {
    fn default() -> Self {
        Self {
            max_messages: 1024,
            max_bytes: 8 << 20,
        }
    }
}

/// One item for a transport to write.
#[derive(Debug, Clone)]
pub enum Outgoing {
    Publication(Arc<Publication>),
    /// A state for a subscriber that asked for deltas and was last given the state's
    /// `delta_base()` version: the transport writes `Publication::delta()`, or the whole state
    /// when there is none (docs/PROTOCOL.md, "Delta states").
    Delta(Arc<Publication>),
    Control(ServerControl),
}

/// Why a queue stopped taking messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueClosed {
    /// The ordered backlog overflowed (close code 4001).
    Slow,
    /// The connection is ending for another reason.
    Gone,
}

/// The result of offering a message to a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued; `wake` is true when the queue was empty, so the writer must be woken.
    Queued { wake: bool },
    /// A pending state of the same room was replaced by this newer one.
    Conflated,
    /// Older than a state already pending; not queued.
    Stale,
    /// The backlog overflowed: the queue is now closed as slow and its backlog dropped.
    /// The writer must be woken to close the connection. `dropped` messages were discarded.
    Overflowed { dropped: usize },
    /// The queue was already closed; the message was discarded.
    Closed,
}

#[derive(Debug)]
enum Entry {
    /// The newest pending state of a room lives in `ConnectionQueue::states`.
    State(RoomId),
    Event(Arc<Publication>),
    Control(ServerControl),
    /// A room's recovered events (`since`), handed out in order as the writer drains: the
    /// publications the room's history already holds, shared, never copied, and counted as
    /// one message, so a history larger than the bounds is delivered in pieces instead of
    /// closing the connection as slow before `subscribed` (which the client's reconnect would
    /// repeat forever).
    Recovery(VecDeque<Arc<Publication>>),
}

/// Entry storage an emptied queue gives back rather than keeps: what a few replies or
/// messages at a time need, which is all an idle connection ever used.
const IDLE_ENTRIES_KEPT: usize = 16;

/// A connection's pending output, in the order it must be written.
#[derive(Debug)]
pub struct ConnectionQueue {
    entries: VecDeque<Entry>,
    /// Latest pending state per room; at most one `Entry::State` per key.
    states: HashMap<RoomId, Arc<Publication>>,
    ordered_messages: usize,
    ordered_bytes: usize,
    limits: QueueLimits,
    closed: Option<QueueClosed>,
    /// The writer took messages out that it may not have written yet.
    in_flight: bool,
    /// The rooms whose subscription asked for deltas, each with the state version this
    /// connection was last handed (`None`: none since its last `subscribed`, which resets the
    /// client's base too). Only a state whose delta base is that version goes as a delta.
    deltas: HashMap<RoomId, Option<u64>>,
}

impl ConnectionQueue {
    pub fn new(limits: QueueLimits) -> Self {
        Self {
            entries: VecDeque::new(),
            states: HashMap::new(),
            ordered_messages: 0,
            ordered_bytes: 0,
            limits,
            closed: None,
            in_flight: false,
            deltas: HashMap::new(),
        }
    }

    /// Whether the room's states may go to this connection as deltas (set on each subscribe).
    pub fn want_deltas(&mut self, room: RoomId, on: bool) {
        if !on {
            self.deltas.remove(&room);
        } else {
            self.deltas.entry(room).or_insert(None);
        }
    }

    /// Whether `state`, written now, goes as a delta: the subscription asked for deltas and the
    /// last state this connection was handed of the room is the delta's base.
    pub fn sends_as_delta(&self, state: &Publication) -> bool {
        !self.deltas.is_empty()
            && state.delta_base().is_some()
            && self.deltas.get(&state.room_id) == Some(&state.delta_base())
    }

    /// Notes that `state` was handed to the connection (by the drain, or a direct write).
    pub fn handed(&mut self, state: &Publication) {
        // A connection without delta subscriptions (most) pays one length check per state.
        if self.deltas.is_empty() || state.kind != Kind::State {
            return;
        }
        if let Some(held) = self.deltas.get_mut(&state.room_id) {
            *held = Some(state.number);
        }
    }

    /// Nothing queued, nothing taken out and unwritten, not closed: a new message may go to the
    /// socket at once without overtaking anything.
    pub fn is_idle(&self) -> bool {
        self.entries.is_empty() && !self.in_flight && self.closed.is_none()
    }

    pub fn closed(&self) -> Option<QueueClosed> {
        self.closed
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Offers a state update: it replaces an older pending state of the same room.
    pub fn push_state(&mut self, publication: &Arc<Publication>) -> Pushed {
        if self.closed.is_some() {
            return Pushed::Closed;
        }
        if publication.kind != Kind::State {
            return self.push_ordered(Entry::Event(publication.clone()), publication.size());
        }
        let version = publication.number;
        if let Some(pending) = self.states.get_mut(&publication.room_id) {
            return match pending.kind {
                Kind::State if pending.number >= version => Pushed::Stale,
                _ => {
                    *pending = publication.clone();
                    Pushed::Conflated
                }
            };
        }
        let wake = self.entries.is_empty();
        self.states.insert(publication.room_id, publication.clone());
        self.entries.push_back(Entry::State(publication.room_id));
        Pushed::Queued { wake }
    }

    /// Offers an event: ordered, never conflated, bounded.
    pub fn push_event(&mut self, publication: &Arc<Publication>) -> Pushed {
        if self.closed.is_some() {
            return Pushed::Closed;
        }
        self.push_ordered(Entry::Event(publication.clone()), publication.size())
    }

    /// Queues a room's recovered events, after what is queued and before anything pushed later.
    pub fn push_recovery(&mut self, events: Vec<Arc<Publication>>) -> Pushed {
        if self.closed.is_some() {
            return Pushed::Closed;
        }
        if events.is_empty() {
            return Pushed::Queued { wake: false };
        }
        self.push_ordered(Entry::Recovery(events.into()), 0)
    }

    /// Offers a control reply; it counts against the same bound as events.
    pub fn push_control(&mut self, control: ServerControl) -> Pushed {
        if self.closed.is_some() {
            return Pushed::Closed;
        }
        let size = control.size_hint();
        self.push_ordered(Entry::Control(control), size)
    }

    fn push_ordered(&mut self, entry: Entry, size: usize) -> Pushed {
        if self.ordered_messages + 1 > self.limits.max_messages || self.ordered_bytes + size > self.limits.max_bytes {
            let dropped = self.entries.len() + 1;
            self.close(QueueClosed::Slow);
            return Pushed::Overflowed { dropped };
        }
        let wake = self.entries.is_empty();
        self.ordered_messages += 1;
        self.ordered_bytes += size;
        self.entries.push_back(entry);
        Pushed::Queued { wake }
    }

    /// Stops taking messages and drops the backlog; returns how many messages were dropped.
    pub fn close(&mut self, reason: QueueClosed) -> usize {
        if self.closed.is_none() {
            self.closed = Some(reason);
        }
        let dropped = self.entries.len();
        self.entries.clear();
        self.states.clear();
        self.deltas.clear();
        self.ordered_messages = 0;
        self.ordered_bytes = 0;
        dropped
    }

    /// Forgets pending messages of a room the client unsubscribed from.
    pub fn purge_room(&mut self, room: RoomId) {
        self.states.remove(&room);
        self.deltas.remove(&room);
        let (mut messages, mut bytes) = (0, 0);
        self.entries.retain(|entry| match entry {
            Entry::State(id) => *id != room,
            Entry::Event(p) if p.room_id == room => {
                messages += 1;
                bytes += p.size();
                false
            }
            Entry::Recovery(events) if events.front().is_some_and(|p| p.room_id == room) => {
                messages += 1;
                false
            }
            _ => true,
        });
        self.ordered_messages -= messages;
        self.ordered_bytes -= bytes;
    }

    /// Moves up to `max` messages into `out`, oldest first. Until a drain finds the queue empty,
    /// the writer counts as busy (`is_idle` is false): what it took may not be written yet.
    pub fn drain_into(&mut self, out: &mut Vec<Outgoing>, max: usize) {
        let before = out.len();
        self.drain_some(out, max);
        self.in_flight = out.len() > before;
        // An idle connection keeps no entry storage (a few hundred bytes per connection, from
        // its `subscribed` reply on); a busy one keeps what it grew to.
        if self.entries.is_empty() && self.entries.capacity() <= IDLE_ENTRIES_KEPT {
            self.entries = VecDeque::new();
        }
    }

    fn drain_some(&mut self, out: &mut Vec<Outgoing>, max: usize) {
        while out.len() < max {
            let Some(entry) = self.entries.pop_front() else { break };
            match entry {
                Entry::State(room) => {
                    if let Some(p) = self.states.remove(&room) {
                        let delta = self.sends_as_delta(&p);
                        self.handed(&p);
                        out.push(if delta {
                            Outgoing::Delta(p)
                        } else {
                            Outgoing::Publication(p)
                        });
                    }
                }
                Entry::Event(p) => {
                    self.ordered_messages -= 1;
                    self.ordered_bytes -= p.size();
                    out.push(Outgoing::Publication(p));
                }
                Entry::Control(c) => {
                    self.ordered_messages -= 1;
                    self.ordered_bytes -= c.size_hint();
                    if let (false, ServerControl::Subscribed { room_id, .. }) = (self.deltas.is_empty(), &c) {
                        // The client starts the room afresh: the next state goes whole.
                        if let Some(held) = self.deltas.get_mut(room_id) {
                            *held = None;
                        }
                    }
                    out.push(Outgoing::Control(c));
                }
                Entry::Recovery(mut events) => {
                    while out.len() < max {
                        let Some(p) = events.pop_front() else { break };
                        out.push(Outgoing::Publication(p));
                    }
                    if events.is_empty() {
                        self.ordered_messages -= 1;
                    } else {
                        // The batch is full: the rest goes first in the next one.
                        self.entries.push_front(Entry::Recovery(events));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publication::JsonData;
    use crate::room_name::RoomName;
    use crate::time::Now;
    use std::time::Instant;

    fn publication(room: u64, kind: Kind, number: u64) -> Arc<Publication> {
        let data = JsonData::parse(b"0").expect("json");
        let name = RoomName::parse(&format!("r{room}")).expect("room");
        Arc::new(Publication::new(
            RoomId(room),
            name,
            kind,
            number,
            (kind == Kind::Event).then_some(crate::publication::EventId(number)),
            &data,
            Now {
                unix_ms: 0,
                instant: Instant::now(),
            },
        ))
    }

    fn state(room: u64, version: u64) -> Arc<Publication> {
        publication(room, Kind::State, version)
    }

    fn event(room: u64, seq: u64) -> Arc<Publication> {
        publication(room, Kind::Event, seq)
    }

    #[test]
    fn recovery_larger_than_the_bounds_is_handed_out_in_pieces_in_order() {
        let limits = QueueLimits {
            max_messages: 4,
            max_bytes: 200,
        };
        let mut q = ConnectionQueue::new(limits);
        // Nine events: more messages and bytes than the bounds allow as single entries.
        let history: Vec<_> = (1..=9).map(|seq| event(1, seq)).collect();
        assert!(history.iter().map(|p| p.size()).sum::<usize>() > limits.max_bytes);
        assert!(matches!(q.push_recovery(history), Pushed::Queued { wake: true }));
        // A live event of the room after the recovery, and another room's state.
        assert!(matches!(q.push_event(&event(1, 10)), Pushed::Queued { .. }));
        assert!(matches!(q.push_state(&state(2, 1)), Pushed::Queued { .. }));
        let mut out = Vec::new();
        let mut seen = Vec::new();
        while !q.is_empty() {
            out.clear();
            q.drain_into(&mut out, 4);
            seen.extend(out.iter().map(|o| match o {
                Outgoing::Publication(p) | Outgoing::Delta(p) => (p.room_id.0, p.number),
                Outgoing::Control(_) => (0, 0),
            }));
        }
        let expected: Vec<(u64, u64)> = (1..=10).map(|seq| (1, seq)).chain([(2, 1)]).collect();
        assert_eq!(seen, expected);
        assert_eq!((q.ordered_messages, q.ordered_bytes), (0, 0));
        assert_eq!(q.closed(), None);
    }

    #[test]
    fn purging_a_room_drops_its_pending_recovery() {
        let mut q = ConnectionQueue::new(QueueLimits::default());
        q.push_recovery((1..=5).map(|seq| event(1, seq)).collect());
        q.push_recovery((1..=2).map(|seq| event(2, seq)).collect());
        q.purge_room(RoomId(1));
        assert_eq!(drain(&mut q), vec![(2, Kind::Event, 1), (2, Kind::Event, 2)]);
        assert_eq!(q.ordered_messages, 0);
    }

    fn drain(q: &mut ConnectionQueue) -> Vec<(u64, Kind, u64)> {
        let mut out = Vec::new();
        q.drain_into(&mut out, usize::MAX);
        out.into_iter()
            .filter_map(|o| match o {
                Outgoing::Publication(p) | Outgoing::Delta(p) => Some((p.room_id.0, p.kind, p.number)),
                Outgoing::Control(_) => None,
            })
            .collect()
    }

    /// Two consecutive states big enough for deltas, the second based on the first.
    fn big_states(room: u64, from: u64, to: u64) -> Vec<Arc<Publication>> {
        let mut out: Vec<Arc<Publication>> = Vec::new();
        for v in from..=to {
            let data = JsonData::parse(format!("[{}]", vec![v.to_string(); 600].join(",")).as_bytes()).expect("json");
            let name = RoomName::parse(&format!("r{room}")).expect("room");
            let now = Now {
                unix_ms: 0,
                instant: Instant::now(),
            };
            let p = Publication::new(RoomId(room), name, Kind::State, v, None, &data, now).with_delta_base(out.last());
            out.push(Arc::new(p));
        }
        out
    }

    fn kinds(q: &mut ConnectionQueue) -> Vec<(&'static str, u64)> {
        let mut out = Vec::new();
        q.drain_into(&mut out, usize::MAX);
        out.into_iter()
            .map(|o| match o {
                Outgoing::Publication(p) => ("whole", p.number),
                Outgoing::Delta(p) => ("delta", p.number),
                Outgoing::Control(_) => ("control", 0),
            })
            .collect()
    }

    #[test]
    fn states_go_as_deltas_only_against_the_version_last_handed_since_subscribed() {
        let states = big_states(1, 1, 5);
        let subscribed = || ServerControl::Subscribed {
            room: RoomName::parse("r1").expect("room"),
            room_id: RoomId(1),
            epoch: "e".into(),
            version: 0,
            seq: 0,
            recovered: None,
            request: None,
        };
        let mut q = ConnectionQueue::new(QueueLimits::default());
        q.want_deltas(RoomId(1), true);
        q.push_control(subscribed());
        q.push_state(&states[0]);
        assert_eq!(kinds(&mut q), [("control", 0), ("whole", 1)]);
        q.push_state(&states[1]);
        assert_eq!(kinds(&mut q), [("delta", 2)]);
        // Conflated: 3 replaced by 4, whose base (3) the connection never had.
        q.push_state(&states[2]);
        q.push_state(&states[3]);
        assert_eq!(kinds(&mut q), [("whole", 4)]);
        // A `subscribed` (a notice, or a resubscribe) resets the base on both sides.
        q.push_control(subscribed());
        q.push_state(&states[4]);
        assert_eq!(kinds(&mut q), [("control", 0), ("whole", 5)]);
        // Without deltas, or after the room was left, states go whole.
        let mut plain = ConnectionQueue::new(QueueLimits::default());
        plain.push_state(&states[0]);
        plain.push_state(&states[1]);
        plain.drain_into(&mut Vec::new(), 1);
        plain.push_state(&states[2]);
        assert!(kinds(&mut plain).iter().all(|(k, _)| *k != "delta"));
        q.purge_room(RoomId(1));
        assert!(!q.sends_as_delta(&states[4]));
    }

    #[test]
    fn a_slow_reader_ends_on_the_newest_state() {
        let mut q = ConnectionQueue::new(QueueLimits::default());
        assert_eq!(q.push_state(&state(1, 1)), Pushed::Queued { wake: true });
        for v in 2..=100 {
            assert_eq!(q.push_state(&state(1, v)), Pushed::Conflated);
        }
        assert_eq!(q.push_state(&state(1, 50)), Pushed::Stale);
        assert_eq!(q.push_state(&state(2, 1)), Pushed::Queued { wake: false });
        assert_eq!(drain(&mut q), vec![(1, Kind::State, 100), (2, Kind::State, 1)]);
        assert!(q.is_empty());
        assert_eq!(q.push_state(&state(1, 101)), Pushed::Queued { wake: true });
    }

    #[test]
    fn events_keep_order_among_states() {
        let mut q = ConnectionQueue::new(QueueLimits::default());
        q.push_state(&state(1, 1));
        q.push_event(&event(1, 1));
        q.push_state(&state(1, 2));
        q.push_event(&event(1, 2));
        assert_eq!(
            drain(&mut q),
            vec![(1, Kind::State, 2), (1, Kind::Event, 1), (1, Kind::Event, 2)]
        );
    }

    #[test]
    fn overflowing_events_close_the_queue_as_slow() {
        let mut q = ConnectionQueue::new(QueueLimits {
            max_messages: 3,
            max_bytes: usize::MAX,
        });
        for seq in 1..=3 {
            assert!(matches!(q.push_event(&event(1, seq)), Pushed::Queued { .. }));
        }
        assert_eq!(q.push_event(&event(1, 4)), Pushed::Overflowed { dropped: 4 });
        assert_eq!(q.closed(), Some(QueueClosed::Slow));
        assert!(q.is_empty());
        assert_eq!(q.push_event(&event(1, 5)), Pushed::Closed);
        assert_eq!(q.push_state(&state(1, 5)), Pushed::Closed);
    }

    #[test]
    fn states_never_count_against_the_ordered_bound() {
        let mut q = ConnectionQueue::new(QueueLimits {
            max_messages: 1,
            max_bytes: usize::MAX,
        });
        for room in 0..100 {
            assert!(matches!(q.push_state(&state(room, 1)), Pushed::Queued { .. }));
        }
        assert!(matches!(q.push_control(ServerControl::Pong), Pushed::Queued { .. }));
        assert!(matches!(q.push_control(ServerControl::Pong), Pushed::Overflowed { .. }));
    }

    #[test]
    fn draining_frees_room_in_the_bound() {
        let mut q = ConnectionQueue::new(QueueLimits {
            max_messages: 2,
            max_bytes: usize::MAX,
        });
        for seq in 1..=100 {
            assert!(matches!(q.push_event(&event(1, seq)), Pushed::Queued { .. }));
            drain(&mut q);
        }
        let size = event(1, 1).size();
        let mut q = ConnectionQueue::new(QueueLimits {
            max_messages: 100,
            max_bytes: size * 2,
        });
        q.push_event(&event(1, 1));
        q.push_event(&event(1, 2));
        assert!(matches!(q.push_event(&event(1, 3)), Pushed::Overflowed { .. }));
    }

    #[test]
    fn purge_forgets_one_room_only() {
        let mut q = ConnectionQueue::new(QueueLimits {
            max_messages: 3,
            max_bytes: usize::MAX,
        });
        q.push_state(&state(1, 1));
        q.push_event(&event(1, 1));
        q.push_event(&event(2, 1));
        q.push_event(&event(1, 2));
        q.purge_room(RoomId(1));
        q.push_event(&event(2, 2));
        q.push_event(&event(2, 3));
        assert_eq!(
            drain(&mut q),
            vec![(2, Kind::Event, 1), (2, Kind::Event, 2), (2, Kind::Event, 3)]
        );
    }

    #[test]
    fn drain_respects_its_batch_limit() {
        let mut q = ConnectionQueue::new(QueueLimits::default());
        for seq in 1..=10 {
            q.push_event(&event(1, seq));
        }
        let mut out = Vec::new();
        q.drain_into(&mut out, 4);
        assert_eq!(out.len(), 4);
        assert_eq!(q.len(), 6);
    }

    #[test]
    fn the_queue_is_idle_only_when_the_writer_has_written_everything() {
        let mut q = ConnectionQueue::new(QueueLimits::default());
        assert!(q.is_idle());
        q.push_control(ServerControl::Pong);
        assert!(!q.is_idle(), "a message is queued");
        let mut out = Vec::new();
        q.drain_into(&mut out, 10);
        assert_eq!(out.len(), 1);
        assert!(!q.is_idle(), "the writer holds a message it has not written yet");
        out.clear();
        q.drain_into(&mut out, 10);
        assert!(out.is_empty());
        assert!(q.is_idle(), "an empty drain means everything taken was written");
        q.close(QueueClosed::Gone);
        assert!(!q.is_idle(), "a closed queue takes nothing");
    }
}
