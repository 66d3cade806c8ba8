//! Gives freed heap back to the OS after bursts of connects or disconnects: glibc keeps the
//! buffers of a burst's handshakes resident as holes between long-lived allocations, and RSS is
//! what the task is billed and killed on. `TrimPolicy` decides when (pure); `run` samples the
//! connection gauges and calls `malloc_trim(0)` off the runtime's workers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::debug;

use crate::metrics::Metrics;
use crate::shutdown::ShutdownListener;

/// How often the connection gauges are sampled: short enough that a trim follows a burst
/// within about half a second (two ticks), and a tick reads only two atomics.
pub const TICK: Duration = Duration::from_millis(250);

/// Connections opened or closed since the last trim before another is worth it. Measured
/// (bench/README.md, "After a burst: the heap given back"): 1,000 connects 1,000 at a time leave
/// about 4 MB to give back, in 3–5 ms; 5,000 at once about 20 MB, in 20–76 ms.
pub const TRIM_AFTER: u64 = 1_000;

/// Connections opened or closed per second below which a burst counts as over. A steadier
/// stream than this is trimmed every `TRIM_AFTER` connections, so at most once per
/// `TRIM_AFTER / CALM_PER_SECOND` seconds.
pub const CALM_PER_SECOND: u64 = 400;

/// When to trim: fed the connections open at each tick with the time, it counts connections
/// opened or closed since the last trim and says to trim once enough have and the last tick
/// was calm. Opens and closes within one tick that cancel out are not seen.
#[derive(Debug, Clone)]
pub struct TrimPolicy {
    trim_after: u64,
    calm_per_second: u64,
    /// Connections open at the previous observation.
    open: u64,
    /// When the previous observation was made.
    at: Instant,
    /// Connections opened or closed since the last trim (the sum of each tick's change).
    churn: u64,
}

impl TrimPolicy {
    pub fn new(trim_after: u64, calm_per_second: u64, open: u64, now: Instant) -> Self {
        Self {
            trim_after,
            calm_per_second,
            open,
            at: now,
            churn: 0,
        }
    }

    /// The policy of the server: `TRIM_AFTER` and `CALM_PER_SECOND`.
    pub fn standard(open: u64, now: Instant) -> Self {
        Self::new(TRIM_AFTER, CALM_PER_SECOND, open, now)
    }

    /// Records the connections open at `now`. When the heap should be trimmed now, returns the
    /// connections opened or closed since the last trim (and starts counting again).
    pub fn observe(&mut self, open: u64, now: Instant) -> Option<u64> {
        let change = open.abs_diff(self.open);
        let elapsed = now.saturating_duration_since(self.at);
        self.open = open;
        self.at = now;
        self.churn = self.churn.saturating_add(change);
        // No change, or change / elapsed < calm_per_second (without dividing by a zero interval).
        let calm =
            change == 0 || u128::from(change) * 1_000_000 < u128::from(self.calm_per_second) * elapsed.as_micros();
        if self.churn >= self.trim_after && calm {
            return Some(std::mem::take(&mut self.churn));
        }
        None
    }

    /// Connections opened or closed since the last trim.
    pub fn churn(&self) -> u64 {
        self.churn
    }
}

/// Samples the connection gauges every `TICK` and trims after a burst, until the shutdown.
pub async fn run(metrics: Arc<Metrics>, mut stop: ShutdownListener) {
    let open_now = || {
        let open = metrics.connections();
        u64::try_from(open).unwrap_or(0)
    };
    let mut policy = TrimPolicy::standard(open_now(), crate::clock::instant());
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.recv() => break,
            _ = tick.tick() => {
                let open = open_now();
                let Some(churn) = policy.observe(open, crate::clock::instant()) else {
                    continue;
                };
                let trim = tokio::task::spawn_blocking(move || {
                    let log = tracing::enabled!(tracing::Level::DEBUG);
                    let before = if log { resident_bytes() } else { None };
                    let started = Instant::now();
                    let released = release_free_memory();
                    let took = started.elapsed();
                    let after = if log { resident_bytes() } else { None };
                    (released, took, before, after)
                });
                tokio::select! {
                    _ = stop.recv() => break,
                    result = trim => {
                        if let Ok((released, took, before, after)) = result {
                            debug!(
                                released, ?took, rss_before = before, rss_after = after, open, churn,
                                "gave freed heap back to the OS after a burst of connections"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Gives free pages of every malloc arena back to the OS (`malloc_trim(0)`: since glibc 2.8 it
/// releases whole free pages inside each arena, not only its top). True if any was released.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_free_memory() -> bool {
    // SAFETY: malloc_trim takes no pointer and only walks and madvises glibc's own free lists
    // under each arena's lock; it is safe to call from any thread at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// No glibc malloc: nothing to trim.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() -> bool {
    false
}

/// This process's resident set in bytes (`VmRSS` of /proc/self/status), where there is one.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|line| line.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Observes `opens` one tick apart; what each tick answered.
    fn ticks(policy: &mut TrimPolicy, start: Instant, opens: &[u64]) -> Vec<Option<u64>> {
        opens
            .iter()
            .enumerate()
            .map(|(i, &open)| policy.observe(open, start + TICK * (i as u32 + 1)))
            .collect()
    }

    #[test]
    fn trims_once_when_a_burst_of_connects_calms() {
        let start = Instant::now();
        let mut policy = TrimPolicy::new(1_000, 400, 0, start);
        // 5,000 connect over three ticks, then nothing changes.
        let trims = ticks(&mut policy, start, &[1_500, 4_000, 5_000, 5_000, 5_000, 5_000]);
        assert_eq!(trims, [None, None, None, Some(5_000), None, None]);
        assert_eq!(policy.churn(), 0);
    }

    #[test]
    fn a_burst_of_disconnects_counts_too() {
        let start = Instant::now();
        let mut policy = TrimPolicy::new(1_000, 400, 5_000, start);
        let trims = ticks(&mut policy, start, &[5_000, 3_000, 2_990]);
        assert_eq!(trims, [None, None, Some(2_010)]);
    }

    #[test]
    fn fewer_than_the_threshold_never_trims() {
        let start = Instant::now();
        let mut policy = TrimPolicy::new(1_000, 400, 0, start);
        let trims = ticks(&mut policy, start, &[999, 999, 999, 999]);
        assert_eq!(trims, [None; 4]);
        assert_eq!(policy.churn(), 999);
    }

    #[test]
    fn churn_adds_up_over_small_changes() {
        let start = Instant::now();
        let mut policy = TrimPolicy::new(1_000, 400, 0, start);
        // 90 a tick (360 a second, calm): up 450, down 450, up 100 makes 1,000.
        let opens = [90, 180, 270, 360, 450, 360, 270, 180, 90, 0, 90, 100];
        let trims = ticks(&mut policy, start, &opens);
        assert_eq!(trims.iter().flatten().count(), 1);
        assert_eq!(trims[11], Some(1_000));
    }

    #[test]
    fn calm_is_a_rate_so_a_late_tick_is_not_a_burst() {
        let start = Instant::now();
        let mut policy = TrimPolicy::new(1_000, 400, 0, start);
        assert_eq!(policy.observe(2_000, start + TICK), None);
        // 300 more, but over two seconds: 150 a second.
        assert_eq!(policy.observe(2_300, start + TICK + 2_000 * MS), Some(2_300));
        // The same 300 within one tick is 1,200 a second: not calm.
        let mut policy = TrimPolicy::new(1_000, 400, 0, start);
        assert_eq!(policy.observe(2_000, start + TICK), None);
        assert_eq!(policy.observe(2_300, start + TICK * 2), None);
    }

    #[test]
    fn no_time_elapsed_is_calm_only_if_nothing_changed() {
        let start = Instant::now();
        let mut policy = TrimPolicy::new(10, 400, 0, start);
        assert_eq!(policy.observe(20, start), None);
        assert_eq!(policy.observe(20, start), Some(20));
    }

    #[test]
    fn release_and_resident_bytes_do_not_fail() {
        let _ = release_free_memory();
        #[cfg(target_os = "linux")]
        assert!(resident_bytes().is_some_and(|bytes| bytes > 0));
    }
}
