//! The node's one reader of the clocks for what the core is told: I/O layers take the wall clock
//! and the instants they hand to the core (`core::Now`, repair and routing times) here; the core
//! never reads a clock itself. Timers the I/O layers await (deadlines, sleeps) read tokio's
//! clock (`tokio::time::Instant`), the one those timers run on.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::core::Now;

/// Reads both clocks: wall-clock milliseconds for clients, a monotonic instant for latency.
pub fn now() -> Now {
    Now {
        unix_ms: unix_ms(),
        instant: Instant::now(),
    }
}

/// The monotonic clock, for instants handed to the core's timers (repair, routing).
pub fn instant() -> Instant {
    Instant::now()
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
