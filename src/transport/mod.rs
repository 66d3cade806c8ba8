//! Transports adapt the sans-IO core to the wire: each reads commands into a `Session` and
//! writes its `Subscriber` queue out. WebSocket here; WebTransport beside it.

pub mod h3;
pub mod websocket;
pub mod webtransport;
