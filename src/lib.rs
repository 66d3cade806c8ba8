//! Courtside: a real-time edge server for youth-sports live scores.
//! See docs/ARCHITECTURE.md for how the modules fit together.

pub mod core;
pub mod hub;
pub mod metrics;
