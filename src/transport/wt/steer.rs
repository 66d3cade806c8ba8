//! Which endpoint loop owns a datagram when several share the port (`--wt-loops`). The kernel
//! spreads clients over the loops' `SO_REUSEPORT` sockets by their address, so a client whose
//! address changes (a NAT rebinding, a migration) lands on any of them: its packets name their
//! loop in the connection ID (`quic_lb::loop_byte_at`), and the loop that got them hands them on.

use std::net::{IpAddr, SocketAddr};

use bytes::BytesMut;
use quinn_proto::{ConnectionId, ConnectionIdGenerator, EcnCodepoint};

use crate::quic_lb::{loop_byte_at, SignedRandomIds};

/// One received datagram (or GRO segment), as the endpoint takes it.
#[derive(Debug)]
pub struct Inbound {
    pub addr: SocketAddr,
    pub dst_ip: Option<IpAddr>,
    pub ecn: Option<EcnCodepoint>,
    pub data: BytesMut,
}

/// The versions whose long header this reads (quinn-proto's: QUIC v1 and drafts 29 to 34, which
/// share its packet types).
fn known_version(version: u32) -> bool {
    version == 1 || (0xff00_001d..=0xff00_0022).contains(&version)
}

/// The steering of one loop among `loops`.
#[derive(Debug, Clone)]
pub struct LoopSteering {
    this: usize,
    loops: usize,
    cid_len: usize,
    /// The connection ID's byte that names its loop.
    at: usize,
    /// The loops' shared ID signer, when IDs are signed: a forged ID is not handed on.
    signer: Option<SignedRandomIds>,
}

impl LoopSteering {
    /// Loop `this` of `loops`, whose connection IDs are `cid_len` bytes, signed by `signer` when
    /// it is given; `None` with one loop.
    pub fn new(this: usize, loops: usize, cid_len: usize, signer: Option<SignedRandomIds>) -> Option<Self> {
        let at = loop_byte_at(cid_len)?;
        (loops > 1 && this < loops).then_some(Self {
            this,
            loops,
            cid_len,
            at,
            signer,
        })
    }

    /// The loop that owns `datagram` when it is not this one. A short-header packet and a
    /// version 1 Handshake packet carry an ID this node issued: its loop byte says. An Initial
    /// or 0-RTT packet carries the ID the client chose, and starts (or continues) a handshake
    /// where it lands, as does anything unreadable: `None`, this loop handles them. A byte that
    /// names no loop, or a signed ID whose signature fails (forged), is also left here, where
    /// the endpoint drops it.
    pub fn elsewhere(&self, datagram: &[u8]) -> Option<usize> {
        let first = *datagram.first()?;
        let dcid = if first & 0x80 == 0 {
            datagram.get(1..1 + self.cid_len)?
        } else {
            let version = u32::from_be_bytes(datagram.get(1..5)?.try_into().ok()?);
            // Long-header type 2 in version 1: Handshake.
            if !known_version(version) || (first >> 4) & 0x03 != 2 {
                return None;
            }
            let len = usize::from(*datagram.get(5)?);
            if len != self.cid_len {
                return None;
            }
            datagram.get(6..6 + len)?
        };
        let owner = usize::from(dcid[self.at]);
        if owner >= self.loops || owner == self.this {
            return None;
        }
        if let Some(signer) = &self.signer {
            signer.validate(&ConnectionId::new(dcid)).ok()?;
        }
        Some(owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quic_lb::{ROUTABLE_CID_LEN, SIGNED_CID_LEN};

    /// A short-header packet to `cid`, with some payload.
    fn short(cid: &[u8]) -> Vec<u8> {
        let mut packet = vec![0x41];
        packet.extend_from_slice(cid);
        packet.extend_from_slice(&[0x99; 20]);
        packet
    }

    #[test]
    fn short_header_and_handshake_packets_go_to_the_loop_their_id_names() {
        let signer = SignedRandomIds::default();
        let steering = LoopSteering::new(0, 2, SIGNED_CID_LEN, Some(signer.clone())).expect("two loops");
        let theirs = signer.for_loop(1).generate_cid();
        assert_eq!(steering.elsewhere(&short(&theirs)), Some(1));
        let ours = signer.for_loop(0).generate_cid();
        assert_eq!(steering.elsewhere(&short(&ours)), None, "this loop's own");
        let nowhere = signer.for_loop(7).generate_cid();
        assert_eq!(
            steering.elsewhere(&short(&nowhere)),
            None,
            "no such loop: left to the endpoint"
        );
        let mut forged = theirs.to_vec();
        forged[3] ^= 0x55;
        assert_eq!(
            steering.elsewhere(&short(&forged)),
            None,
            "a forged ID is not handed on"
        );
        assert_eq!(
            steering.elsewhere(&short(&theirs)[..5]),
            None,
            "too short to hold an ID"
        );
        assert_eq!(steering.elsewhere(&[]), None);

        // Long header, version 1, type Handshake (0xe0), DCID length 8, naming loop 1.
        let mut handshake = vec![0xe0, 0, 0, 0, 1, 8];
        handshake.extend_from_slice(&theirs);
        handshake.extend_from_slice(&[0, 0x44, 0x00]);
        assert_eq!(steering.elsewhere(&handshake), Some(1));
        let mut draft_29 = handshake.clone();
        draft_29[1..5].copy_from_slice(&0xff00_001du32.to_be_bytes());
        assert_eq!(steering.elsewhere(&draft_29), Some(1), "draft 29 shares v1's types");
        let mut initial = handshake.clone();
        initial[0] = 0xc0;
        assert_eq!(steering.elsewhere(&initial), None, "an Initial starts where it lands");
        let mut zero_rtt = handshake.clone();
        zero_rtt[0] = 0xd0;
        assert_eq!(steering.elsewhere(&zero_rtt), None, "0-RTT: the client's ID");
        let mut other_version = handshake.clone();
        other_version[4] = 2;
        assert_eq!(steering.elsewhere(&other_version), None);
        let mut other_len = handshake;
        other_len[5] = 5;
        assert_eq!(steering.elsewhere(&other_len), None);

        // Routable QUIC-LB IDs (unsigned) name the loop in the nonce's first byte (byte 9 of 16).
        let routable = LoopSteering::new(1, 2, ROUTABLE_CID_LEN, None).expect("two loops");
        let cid = [0x0f, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7];
        assert_eq!(routable.elsewhere(&short(&cid)), Some(0));
    }

    #[test]
    fn one_loop_or_ids_without_a_loop_byte_need_no_steering() {
        assert!(LoopSteering::new(0, 1, SIGNED_CID_LEN, None).is_none());
        assert!(LoopSteering::new(0, 2, 4, None).is_none());
        assert!(LoopSteering::new(2, 2, SIGNED_CID_LEN, None).is_none());
    }
}
