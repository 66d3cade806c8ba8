//! Which endpoint loop owns a datagram when several share the port (`--wt-loops`). The kernel
//! spreads clients over the loops' `SO_REUSEPORT` sockets by their address, so a client whose
//! address changes (a NAT rebinding, a migration) lands on any of them: its packets name their
//! loop in the connection ID (`quic_lb::loop_byte_at`), and the loop that got them hands them on.

use std::net::{IpAddr, SocketAddr};

use bytes::BytesMut;
use quinn_proto::EcnCodepoint;

use crate::quic_lb::loop_byte_at;

/// One received datagram (or GRO segment), as the endpoint takes it.
#[derive(Debug)]
pub struct Inbound {
    pub addr: SocketAddr,
    pub dst_ip: Option<IpAddr>,
    pub ecn: Option<EcnCodepoint>,
    pub data: BytesMut,
}

/// QUIC version 1 (RFC 9000), the one version the long-header rule below reads.
const QUIC_V1: u32 = 1;

/// The steering of one loop among `loops`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopSteering {
    this: usize,
    loops: usize,
    cid_len: usize,
    /// The connection ID's byte that names its loop.
    at: usize,
}

impl LoopSteering {
    /// Loop `this` of `loops`, whose connection IDs are `cid_len` bytes; `None` with one loop.
    pub fn new(this: usize, loops: usize, cid_len: usize) -> Option<Self> {
        let at = loop_byte_at(cid_len)?;
        (loops > 1 && this < loops).then_some(Self {
            this,
            loops,
            cid_len,
            at,
        })
    }

    /// The loop that owns `datagram` when it is not this one. A short-header packet and a
    /// version 1 Handshake packet carry an ID this node issued: its loop byte says. An Initial
    /// or 0-RTT packet carries the ID the client chose, and starts (or continues) a handshake
    /// where it lands, as does anything unreadable: `None`, this loop handles them. A byte that
    /// names no loop (a forged ID) is also left here, where the endpoint drops it.
    pub fn elsewhere(&self, datagram: &[u8]) -> Option<usize> {
        let first = *datagram.first()?;
        let dcid = if first & 0x80 == 0 {
            datagram.get(1..1 + self.cid_len)?
        } else {
            let version = u32::from_be_bytes(datagram.get(1..5)?.try_into().ok()?);
            // Long-header type 2 in version 1: Handshake.
            if version != QUIC_V1 || (first >> 4) & 0x03 != 2 {
                return None;
            }
            let len = usize::from(*datagram.get(5)?);
            if len != self.cid_len {
                return None;
            }
            datagram.get(6..6 + len)?
        };
        let owner = usize::from(dcid[self.at]);
        (owner < self.loops && owner != self.this).then_some(owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quic_lb::{ROUTABLE_CID_LEN, SIGNED_CID_LEN};

    #[test]
    fn short_header_and_handshake_packets_go_to_the_loop_their_id_names() {
        let steering = LoopSteering::new(0, 2, SIGNED_CID_LEN).expect("two loops");
        // Short header: 0x40 | bits, then the 8-byte ID, whose first byte names loop 1.
        let short = [0x41, 1, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x12, 0x34, 0x99, 0x98];
        assert_eq!(steering.elsewhere(&short), Some(1));
        let mut ours = short;
        ours[1] = 0;
        assert_eq!(steering.elsewhere(&ours), None, "this loop's own");
        ours[1] = 7;
        assert_eq!(steering.elsewhere(&ours), None, "no such loop: left to the endpoint");
        assert_eq!(steering.elsewhere(&short[..5]), None, "too short to hold an ID");
        assert_eq!(steering.elsewhere(&[]), None);

        // Long header, version 1, type Handshake (0xe0), DCID length 8, naming loop 1.
        let handshake = [0xe0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0];
        assert_eq!(steering.elsewhere(&handshake), Some(1));
        let mut initial = handshake;
        initial[0] = 0xc0;
        assert_eq!(steering.elsewhere(&initial), None, "an Initial starts where it lands");
        let mut zero_rtt = handshake;
        zero_rtt[0] = 0xd0;
        assert_eq!(steering.elsewhere(&zero_rtt), None, "0-RTT: the client's ID");
        let mut other_version = handshake;
        other_version[4] = 2;
        assert_eq!(steering.elsewhere(&other_version), None);
        let mut other_len = handshake;
        other_len[5] = 5;
        assert_eq!(steering.elsewhere(&other_len), None);

        // Routable QUIC-LB IDs name the loop in the nonce's first byte (byte 9 of 16).
        let routable = LoopSteering::new(1, 2, ROUTABLE_CID_LEN).expect("two loops");
        let mut packet = vec![0x40];
        packet.extend_from_slice(&[0x0f, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7]);
        packet.extend_from_slice(&[0u8; 20]);
        assert_eq!(routable.elsewhere(&packet), Some(0));
    }

    #[test]
    fn one_loop_or_ids_without_a_loop_byte_need_no_steering() {
        assert_eq!(LoopSteering::new(0, 1, SIGNED_CID_LEN), None);
        assert_eq!(LoopSteering::new(0, 2, 4), None);
        assert_eq!(LoopSteering::new(2, 2, SIGNED_CID_LEN), None);
    }
}
