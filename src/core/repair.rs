//! Loss repair for state updates sent as datagrams: each session remembers the newest state per
//! room until the client acknowledges it, resends it as a datagram with growing gaps, and once
//! over the reliable stream, so a lost datagram delays the newest state but never loses it. Pure.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::publication::{Publication, RoomId};

/// When to resend an unacknowledged state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepairPolicy {
    /// The first resend waits `max(min_delay, 2 × RTT, ack timeout)`, where the ack timeout is
    /// `srtt + 4 × rttvar` of the acknowledgements seen so far (as TCP's RTO: a busy client acks
    /// later than the QUIC RTT says), doubled after each round of resends until an ack of a
    /// datagram sent once arrives again (Karn's backoff); each later resend waits twice as long.
    pub min_delay: Duration,
    /// Datagram resends before giving up on the datagram path.
    pub max_resends: u32,
    /// The resend (1-based) that also queues the state on the reliable stream.
    pub reliable_at: u32,
}

impl Default for RepairPolicy {
    fn default() -> Self {
        Self {
            min_delay: Duration::from_millis(20),
            max_resends: 5,
            reliable_at: 1,
        }
    }
}

/// What the session must do now.
#[derive(Debug, Clone)]
pub enum RepairAction {
    Datagram(Arc<Publication>),
    Stream(Arc<Publication>),
}

#[derive(Debug)]
struct Pending {
    publication: Arc<Publication>,
    version: u64,
    resends: u32,
    sent_at: Instant,
    due: Instant,
    gap: Duration,
}

/// The ack timer's backoff stops doubling here (16 times the estimate).
const MAX_BACKOFF_SHIFT: u32 = 4;

/// Smoothed time from a datagram's send to its acknowledgement (RFC 6298's estimator), with
/// Karn's backoff: acks of resent datagrams are ambiguous and give no sample, so when acks come
/// later than the timer says, every datagram would be resent and the estimate never corrected.
/// A timeout doubles the timer instead, and a clean sample resets it.
#[derive(Debug, Default, Clone, Copy)]
struct AckTimer {
    srtt: Option<Duration>,
    rttvar: Duration,
    backoff_shift: u32,
}

impl AckTimer {
    fn sample(&mut self, rtt: Duration) {
        self.backoff_shift = 0;
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let delta = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + delta) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
    }

    fn timeout(&self) -> Duration {
        self.srtt.map_or(Duration::ZERO, |srtt| srtt + self.rttvar * 4)
    }

    fn back_off(&mut self) {
        self.backoff_shift = (self.backoff_shift + 1).min(MAX_BACKOFF_SHIFT);
    }
}

/// The unacknowledged newest state of each room, for one session.
#[derive(Debug, Default)]
pub struct DatagramRepair {
    pending: HashMap<RoomId, Pending>,
    policy: RepairPolicy,
    acks: AckTimer,
}

impl DatagramRepair {
    pub fn new(policy: RepairPolicy) -> Self {
        Self {
            pending: HashMap::new(),
            policy,
            acks: AckTimer::default(),
        }
    }

    /// Records that `publication` (a state, version `version`) went out as a datagram.
    /// It replaces any older pending state of its room.
    pub fn sent(&mut self, publication: &Arc<Publication>, version: u64, now: Instant, rtt: Duration) {
        let gap = self.policy.min_delay.max(rtt * 2).max(self.acks.timeout()) * (1 << self.acks.backoff_shift);
        let pending = Pending {
            publication: publication.clone(),
            version,
            resends: 0,
            sent_at: now,
            due: now + gap,
            gap,
        };
        match self.pending.get_mut(&publication.room_id) {
            Some(existing) if existing.version >= version => {}
            Some(existing) => *existing = pending,
            None => {
                self.pending.insert(publication.room_id, pending);
            }
        }
    }

    /// The client holds `version` of `room`: stop repairing anything up to it. An ack of a
    /// datagram sent once (never resent: Karn's rule) times the round trip.
    pub fn acked(&mut self, room: RoomId, version: u64, now: Instant) {
        if let Some(p) = self.pending.get(&room).filter(|p| p.version <= version) {
            if p.version == version && p.resends == 0 {
                self.acks.sample(now.saturating_duration_since(p.sent_at));
            }
            self.pending.remove(&room);
        }
    }

    /// Whether a state of `room` went as a datagram that the client has not acknowledged yet.
    pub fn is_pending(&self, room: RoomId) -> bool {
        self.pending.contains_key(&room)
    }

    /// The client left the room, or got its state reliably: stop repairing it.
    pub fn forget(&mut self, room: RoomId) {
        self.pending.remove(&room);
    }

    /// Collects the resends due at `now` into `out`.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<RepairAction>) {
        let policy = self.policy;
        let mut timed_out = false;
        self.pending.retain(|_, p| {
            if p.due > now {
                return true;
            }
            timed_out |= p.resends == 0;
            p.resends += 1;
            out.push(RepairAction::Datagram(p.publication.clone()));
            if p.resends == policy.reliable_at {
                out.push(RepairAction::Stream(p.publication.clone()));
            }
            p.gap *= 2;
            p.due = now + p.gap;
            p.resends < policy.max_resends
        });
        // Once per round, however many rooms timed out together.
        if timed_out {
            self.acks.back_off();
        }
    }

    /// When `poll` next has something to do.
    pub fn next_due(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.due).min()
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind::Kind;
    use crate::publication::JsonData;
    use crate::time::Now;
    use crate::RoomName;

    /// The room of `state(..)`.
    const G: RoomId = RoomId(1);

    fn state(room: &str, version: u64) -> Arc<Publication> {
        let data = JsonData::parse(b"0").expect("json");
        let now = Now {
            unix_ms: 0,
            instant: Instant::now(),
        };
        let name = RoomName::parse(room).expect("room");
        Arc::new(Publication::new(
            RoomId(1),
            name,
            Kind::State,
            version,
            None,
            &data,
            now,
        ))
    }

    fn kinds(actions: &[RepairAction]) -> Vec<(&'static str, u64)> {
        actions
            .iter()
            .map(|a| match a {
                RepairAction::Datagram(p) => ("datagram", p.number()),
                RepairAction::Stream(p) => ("stream", p.number()),
            })
            .collect()
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn an_acknowledged_state_is_never_resent() {
        let t0 = Instant::now();
        let mut repair = DatagramRepair::new(RepairPolicy::default());
        repair.sent(&state("g", 3), 3, t0, MS);
        repair.acked(G, 3, t0);
        let mut out = Vec::new();
        repair.poll(t0 + Duration::from_secs(10), &mut out);
        assert!(out.is_empty());
        assert_eq!(repair.next_due(), None);
    }

    #[test]
    fn an_unacknowledged_state_is_resent_with_growing_gaps_and_once_reliably() {
        let t0 = Instant::now();
        let mut repair = DatagramRepair::new(RepairPolicy::default());
        repair.sent(&state("g", 3), 3, t0, MS);
        let mut out = Vec::new();
        repair.poll(t0 + 19 * MS, &mut out);
        assert!(out.is_empty());
        assert_eq!(repair.next_due(), Some(t0 + 20 * MS));

        let mut at = t0 + 20 * MS;
        let mut seen = Vec::new();
        while let Some(due) = repair.next_due() {
            assert!(due >= at);
            at = due;
            let mut out = Vec::new();
            repair.poll(at, &mut out);
            seen.push(((at - t0).as_millis(), kinds(&out)));
        }
        assert_eq!(
            seen,
            vec![
                (20, vec![("datagram", 3), ("stream", 3)]),
                (60, vec![("datagram", 3)]),
                (140, vec![("datagram", 3)]),
                (300, vec![("datagram", 3)]),
                (620, vec![("datagram", 3)]),
            ]
        );
    }

    #[test]
    fn only_the_newest_state_of_a_room_is_repaired_and_old_acks_do_not_clear_it() {
        let t0 = Instant::now();
        let mut repair = DatagramRepair::new(RepairPolicy::default());
        let room = G;
        repair.sent(&state("g", 3), 3, t0, MS);
        repair.sent(&state("g", 5), 5, t0, MS);
        repair.sent(&state("g", 4), 4, t0, MS);
        repair.acked(room, 4, t0);
        assert_eq!(repair.len(), 1);
        let mut out = Vec::new();
        repair.poll(t0 + Duration::from_secs(1), &mut out);
        assert_eq!(kinds(&out), vec![("datagram", 5), ("stream", 5)]);
        repair.acked(room, 6, t0);
        assert!(repair.is_empty());
    }

    #[test]
    fn the_first_gap_follows_the_round_trip_time() {
        let t0 = Instant::now();
        let mut repair = DatagramRepair::new(RepairPolicy::default());
        repair.sent(&state("g", 1), 1, t0, 50 * MS);
        assert_eq!(repair.next_due(), Some(t0 + 100 * MS));
        repair.forget(G);
        assert_eq!(repair.next_due(), None);
    }

    #[test]
    fn a_client_that_acks_late_is_not_resent_to_early() {
        let t0 = Instant::now();
        let mut repair = DatagramRepair::new(RepairPolicy::default());
        // Acks arrive 100 ms after each send, while QUIC measures a 1 ms RTT.
        for v in 1..=8 {
            let at = t0 + 100 * MS * v as u32;
            repair.sent(&state("g", v), v, at, MS);
            repair.acked(G, v, at + 100 * MS);
        }
        let at = t0 + 1000 * MS;
        repair.sent(&state("g", 9), 9, at, MS);
        let mut out = Vec::new();
        repair.poll(at + 99 * MS, &mut out);
        assert!(out.is_empty(), "resent before the usual ack time: {out:?}");
        repair.poll(at + 1000 * MS, &mut out);
        assert!(!out.is_empty(), "a lost datagram is still repaired");
    }

    #[test]
    fn acks_later_than_the_timer_back_it_off_until_a_clean_sample() {
        let t0 = Instant::now();
        let room = G;
        let mut repair = DatagramRepair::new(RepairPolicy::default());
        // The timer learns 10 ms acks: srtt 10 ms, rttvar 5 ms, timeout 30 ms.
        repair.sent(&state("g", 1), 1, t0, MS);
        repair.acked(room, 1, t0 + 10 * MS);
        // Then the client acks 70 ms after each send.
        let mut at = t0 + 100 * MS;
        let mut gaps = Vec::new();
        for v in 2..=5 {
            repair.sent(&state("g", v), v, at, MS);
            let due = repair.next_due().expect("pending");
            gaps.push((due - at).as_millis());
            if due <= at + 70 * MS {
                let mut out = Vec::new();
                repair.poll(due, &mut out);
                assert!(!out.is_empty());
            }
            repair.acked(room, v, at + 70 * MS);
            at += 100 * MS;
        }
        // Two timeouts double the timer (30, 60, 120 ms) until it waits past the late ack; that
        // ack is of a datagram sent once, a clean sample: the estimate learns 70 ms acks
        // (srtt 17.5 ms, rttvar 18.75 ms: 92.5 ms) and the backoff ends.
        assert_eq!(gaps, vec![30, 60, 120, 92]);
        assert_eq!(repair.acks.backoff_shift, 0);
    }
}
