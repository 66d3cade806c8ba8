//! Transports adapt the sans-IO core to the wire: each implements `connection::Wire` (read the
//! client's messages, write batches, close) and the one driver, `connection::drive`, hands the
//! commands to the `Session` and drains the `Subscriber` queue into the wire.

pub use courtside_codecs::h3;
pub mod websocket;
pub mod webtransport;
pub mod wt;

/// An HTTP/3 error code as a QUIC application error code (for a connection or stream close).
pub fn quic_code(code: h3::H3ErrorCode) -> quinn_proto::VarInt {
    quinn_proto::VarInt::from_u64(code.to_code().into_inner()).unwrap_or(quinn_proto::VarInt::from_u32(0x101))
}
