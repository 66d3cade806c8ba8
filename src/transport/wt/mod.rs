//! WebTransport as sans-IO state machines over quinn-proto: a session takes QUIC events, bytes
//! and `now`, and returns what to send and what the application must know. No socket, task or
//! clock: the endpoint loop that drives it is a thin adapter, and its tests run in virtual time.

pub mod delivery;
pub mod endpoint;
pub mod sendmmsg;
pub mod server;
pub mod session;
pub mod steer;
pub mod udp_loop;

pub use session::{CloseRequest, SessionConfig, SessionEnd, SessionEvent, WtSession};

#[cfg(test)]
mod pair;
#[cfg(test)]
mod tests;
