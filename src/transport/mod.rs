//! Transports adapt the sans-IO core to the wire: each implements `connection::Wire` (read the
//! client's messages, write batches, close) and the one driver, `connection::drive`, hands the
//! commands to the `Session` and drains the `Subscriber` queue into the wire.

pub use courtside_codecs::h3;
pub(crate) mod quic_tls;
pub mod websocket;
pub mod webtransport;
pub mod wt;

/// An HTTP/3 error code as a QUIC application error code (for a connection or stream close).
pub fn quic_code(code: h3::H3ErrorCode) -> quinn_proto::VarInt {
    quinn_proto::VarInt::from_u64(code.to_code().into_inner()).unwrap_or(quinn_proto::VarInt::from_u32(0x101))
}

/// Storage a connection's outgoing buffer keeps between writes: a batch of scores fits; a
/// larger one's (a bracket is about 15 KB) is given back once written, so an idle connection
/// does not keep the largest message it ever sent.
pub const KEPT_WRITE_BUFFER: usize = 2048;

/// Gives back `buf`'s storage when it is empty and holds more than `KEPT_WRITE_BUFFER`. A buffer
/// advanced to its end still holds its whole allocation (its `capacity` no longer says so), so
/// it is reclaimed first; a small one keeps its storage for the next write.
pub fn release_large(buf: &mut bytes::BytesMut) {
    if buf.is_empty() && buf.try_reclaim(KEPT_WRITE_BUFFER + 1) {
        *buf = bytes::BytesMut::new();
    }
}

#[cfg(test)]
mod tests {
    use bytes::{Buf, BytesMut};

    use super::{release_large, KEPT_WRITE_BUFFER};

    #[test]
    fn a_written_buffer_gives_back_large_storage_and_keeps_small() {
        let mut large = BytesMut::new();
        large.extend_from_slice(&[b'a'; 20_000]);
        large.advance(20_000);
        assert!(
            large.try_reclaim(KEPT_WRITE_BUFFER + 1),
            "advanced to its end, it still holds 20 KB"
        );
        release_large(&mut large);
        assert!(!large.try_reclaim(1), "given back");

        let mut small = BytesMut::new();
        small.extend_from_slice(&[b'a'; 100]);
        small.advance(100);
        release_large(&mut small);
        assert!(small.try_reclaim(100), "kept for the next write");

        let mut unwritten = BytesMut::new();
        unwritten.extend_from_slice(&[b'a'; 20_000]);
        release_large(&mut unwritten);
        assert_eq!(unwritten.len(), 20_000, "bytes not written yet stay");
    }
}
