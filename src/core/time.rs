//! Time as an input: the core never reads a clock; the node's I/O layers read it once per
//! event and pass it in, so the core's tests choose their own time.

use std::time::Instant;

/// The instant a publish entered the node: wall-clock milliseconds for clients (`ts`),
/// a monotonic instant for the publish-to-send latency metric. Passed in, never read here.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub unix_ms: u64,
    pub instant: Instant,
}
