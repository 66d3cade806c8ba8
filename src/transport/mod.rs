//! Transports adapt the sans-IO core to the wire: each implements `connection::Wire` (read the
//! client's messages, write batches, close) and the one driver, `connection::drive`, hands the
//! commands to the `Session` and drains the `Subscriber` queue into the wire.

pub mod h3;
pub mod websocket;
pub mod webtransport;
pub mod wt;
