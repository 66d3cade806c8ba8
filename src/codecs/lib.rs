//! What peers send, parsed and checked without a runtime: the pieces that need a protocol crate
//! the core must not hold. Its own crate so the sanitized fuzz build does not build the server.

pub mod envelope;
pub mod h3;
pub mod publish;
pub mod tokens;
pub mod websocket_inflate;
