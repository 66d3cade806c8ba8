//! The node's one reader of the clocks: I/O layers take the time here and pass it into the core
//! (`core::Now`), which never reads a clock itself.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::core::Now;

/// Reads both clocks: wall-clock milliseconds for clients, a monotonic instant for latency.
pub fn now() -> Now {
    Now {
        unix_ms: unix_ms(),
        instant: Instant::now(),
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
