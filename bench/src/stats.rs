//! Delivery accounting and latency summaries: pure, merged across client tasks.

use hdrhistogram::Histogram;
use serde::Serialize;

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

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
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

/// Points of the latency CDF (ms, fraction), for plots.
pub fn cdf(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0]
        .iter()
        .map(|q| (h.value_at_quantile(*q) as f64 / 1000.0, *q))
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
                disconnected_clients: 1
            }
        );
        assert!(a.adds_up());
        assert!((a.delivery_ratio() - 23.0 / 30.0).abs() < 1e-9);
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
