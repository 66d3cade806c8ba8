//! Courtside: a real-time edge server for youth-sports live scores.
//! See docs/ARCHITECTURE.md for how the modules fit together and how data flows.

pub mod admission;
pub mod certs;
pub mod cidr;
pub mod clock;
pub mod config;
pub mod connection;
/// The sans-IO core, a package of its own (src/core/Cargo.toml).
pub use courtside_core as core;
pub mod demo;
pub mod ecs;
pub mod emf;
pub mod gate;
pub mod http;
pub mod hub;
pub mod idempotency;
pub mod listener;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod ops;
pub mod quic_lb;
pub mod random;
pub mod rates;
pub mod registry;
pub mod server;
pub mod session;
pub mod shutdown;
pub use courtside_codecs::tokens;
pub mod transport;
pub mod udp;
