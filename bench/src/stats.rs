//! Delivery accounting and latency summaries: pure, merged across client tasks.

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::clients::Kind;

/// What one client saw of a run that published `published` numbered messages.
#[derive(Debug, Clone, Default)]
pub struct ClientTally {
    /// Messages received (first copy of each number).
    pub received: u64,
    /// Numbers received more than once.
    pub duplicates: u64,
    /// Numbers skipped because a newer state arrived first (conflation, states only).
    pub conflated: u64,
    /// The client was disconnected before the end.
    pub disconnected: bool,
}

/// Delivery accounting over all clients: every published message counts, per client, as
/// received, conflated or lost.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Accounting {
    pub expected: u64,
    pub received: u64,
    pub conflated: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub disconnected_clients: u64,
    /// Messages that belonged to no planned publish (a bug if ever non-zero).
    pub stray: u64,
}

impl Accounting {
    pub fn add(&mut self, published: u64, client: &ClientTally) {
        self.expected += published;
        self.received += client.received.min(published);
        self.conflated += client.conflated;
        self.lost += published.saturating_sub(client.received + client.conflated);
        self.duplicates += client.duplicates;
        self.disconnected_clients += u64::from(client.disconnected);
    }

    /// Received or legitimately conflated, over expected.
    pub fn delivery_ratio(&self) -> f64 {
        if self.expected == 0 {
            return 1.0;
        }
        (self.received + self.conflated) as f64 / self.expected as f64
    }

    /// True when every expected message is accounted for exactly once.
    pub fn adds_up(&self) -> bool {
        self.received + self.conflated + self.lost == self.expected
    }
}

/// For each room, the indices of the schedule's publishes to it, ascending.
pub fn publishes_by_room(schedule: &[(u32, Kind)], rooms: usize) -> Vec<Vec<u32>> {
    let mut by_room = vec![Vec::new(); rooms];
    for (index, (room, _)) in schedule.iter().enumerate() {
        if let Some(list) = by_room.get_mut(*room as usize) {
            list.push(index as u32);
        }
    }
    by_room
}

/// One client's share of the schedule: what it should have had (every publish to its rooms) and
/// what became of it. A missed state counts as conflated when the client received a later state
/// of the same room (it holds a newer version, as promised); anything else missed is lost.
/// Returns the tally (without duplicates or disconnects) and how many publishes it expected.
pub fn account(schedule: &[(u32, Kind)], by_room: &[Vec<u32>], rooms: &[u32], seen: &[u64]) -> (ClientTally, u64) {
    let got = |i: u32| seen.get(i as usize / 64).is_some_and(|w| w & (1 << (i % 64)) != 0);
    let mut tally = ClientTally::default();
    let mut expected = 0;
    for room in rooms {
        let Some(list) = by_room.get(*room as usize) else {
            continue;
        };
        expected += list.len() as u64;
        let mut later_state = false;
        for &i in list.iter().rev() {
            let is_state = schedule[i as usize].1 == Kind::State;
            if got(i) {
                tally.received += 1;
                later_state |= is_state;
            } else if is_state && later_state {
                tally.conflated += 1;
            }
        }
    }
    (tally, expected)
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// A histogram of latencies in microseconds, 1 µs to 60 s, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

pub fn summarize(h: &Histogram<u64>) -> LatencySummary {
    let ms = |us: u64| us as f64 / 1000.0;
    LatencySummary {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.50)),
        p95_ms: ms(h.value_at_quantile(0.95)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

/// Points of the latency CDF (ms, fraction), for plots: every 2 % up to 90 %, then finer
/// toward the tail.
pub fn cdf(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let body = (0..=45).map(|i| f64::from(i) * 0.02);
    let tail = [0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 0.999, 0.9999, 1.0];
    body.chain(tail)
        .map(|q| (h.value_at_quantile(q) as f64 / 1000.0, q))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounting_adds_up_with_loss_conflation_and_disconnects() {
        let mut a = Accounting::default();
        a.add(
            10,
            &ClientTally {
                received: 10,
                ..ClientTally::default()
            },
        );
        a.add(
            10,
            &ClientTally {
                received: 6,
                conflated: 3,
                ..ClientTally::default()
            },
        );
        a.add(
            10,
            &ClientTally {
                received: 4,
                disconnected: true,
                ..ClientTally::default()
            },
        );
        assert_eq!(
            a,
            Accounting {
                expected: 30,
                received: 20,
                conflated: 3,
                lost: 7,
                duplicates: 0,
                disconnected_clients: 1,
                stray: 0
            }
        );
        assert!(a.adds_up());
        assert!((a.delivery_ratio() - 23.0 / 30.0).abs() < 1e-9);
    }

    #[test]
    fn missed_states_are_conflated_only_when_a_later_state_arrived() {
        // Room 0: state, state, event, state. Room 1: event, state. Room 2: not followed.
        let schedule = [
            (0, Kind::State),
            (0, Kind::State),
            (1, Kind::Event),
            (0, Kind::Event),
            (0, Kind::State),
            (1, Kind::State),
            (2, Kind::Event),
        ];
        let by_room = publishes_by_room(&schedule, 3);
        assert_eq!(by_room, vec![vec![0, 1, 3, 4], vec![2, 5], vec![6]]);
        // Received: 1 (a state after 0), 4 (the last state of room 0), 2 (event of room 1).
        // Missed: 0 (conflated by 1), 3 (an event: lost), 5 (the last state of room 1: lost).
        let seen = [(1 << 1) | (1 << 4) | (1 << 2)];
        let (tally, expected) = account(&schedule, &by_room, &[0, 1], &seen);
        assert_eq!(expected, 6);
        assert_eq!((tally.received, tally.conflated), (3, 1));
        let mut a = Accounting::default();
        a.add(expected, &tally);
        assert_eq!(a.lost, 2);
        assert!(a.adds_up());
    }

    #[test]
    fn histograms_merge_and_summarize() {
        let mut a = new_histogram();
        let mut b = new_histogram();
        for us in 1..=900 {
            a.record(us).ok();
        }
        for _ in 0..100 {
            b.record(50_000).ok();
        }
        a.add(&b).ok();
        let s = summarize(&a);
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 0.5).abs() < 0.01, "{s:?}");
        assert!((s.p99_ms - 50.0).abs() < 0.1, "{s:?}");
        assert_eq!(cdf(&a).last().map(|p| p.1), Some(1.0));
    }
}
