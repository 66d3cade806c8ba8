//! Courtside: a real-time edge server for youth-sports live scores.
//! See docs/ARCHITECTURE.md for how the modules fit together and how data flows.

pub mod config;
pub mod core;
pub mod demo;
pub mod gate;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod node;
pub mod registry;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod simulator;
pub mod transport;
