//! The QUIC connection IDs the WebTransport endpoint issues: random by default, or routable
//! plaintext QUIC-LB IDs (draft-ietf-quic-load-balancers) carrying this node's server ID, so an
//! AWS Network Load Balancer's QUIC listener keeps every session on its target.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::str::FromStr;
use std::time::Duration;

use quinn::{ConnectionId, ConnectionIdGenerator};
use quinn_proto::InvalidCid;

/// Bytes of random nonce after the server ID (the draft asks for at least 4).
const NONCE_LEN: usize = 7;

/// Length of a routable connection ID: the first octet, the 8-byte server ID, the nonce.
pub const ROUTABLE_CID_LEN: usize = 1 + 8 + NONCE_LEN;

/// The 8-byte server ID an NLB target is registered with (`QuicServerId`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuicServerId(pub [u8; 8]);

/// `--quic-server-id` is not `0x` and 16 hex digits.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a QUIC server ID is 0x and 16 hex digits (8 bytes), for example 0x0123456789abcdef, or ecs-task")]
pub struct BadServerId;

impl FromStr for QuicServerId {
    type Err = BadServerId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s
            .strip_prefix("0x")
            .or_else(|| s.strip_prefix("0X"))
            .ok_or(BadServerId)?;
        if digits.len() != 16 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BadServerId);
        }
        let mut id = [0u8; 8];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).map_err(|_| BadServerId)?;
        }
        Ok(Self(id))
    }
}

impl QuicServerId {
    /// The ID of an ECS task: the first 8 bytes of SHA-256 over its ARN. deploy/'s registration
    /// function derives the same from the task state change event, so the NLB target and the
    /// connection IDs agree without either telling the other.
    pub fn of_ecs_task(task_arn: &str) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, task_arn.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest.as_ref()[..8]);
        Self(id)
    }
}

/// Where `--quic-server-id` comes from: given, or derived from the ECS task's ARN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerIdSource {
    Fixed(QuicServerId),
    /// `ecs-task`: read the task ARN from the ECS task metadata endpoint at startup.
    EcsTask,
}

impl FromStr for ServerIdSource {
    type Err = BadServerId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "ecs-task" {
            return Ok(Self::EcsTask);
        }
        s.parse().map(Self::Fixed)
    }
}

impl fmt::Display for QuicServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("0x")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for QuicServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A plaintext QUIC-LB connection ID: the first octet holds config rotation `0b000` in its top
/// three bits and the ID's length minus one in the other five; then the server ID; then `nonce`.
pub fn routable_cid(server: QuicServerId, nonce: [u8; NONCE_LEN]) -> [u8; ROUTABLE_CID_LEN] {
    let mut cid = [0u8; ROUTABLE_CID_LEN];
    cid[0] = (ROUTABLE_CID_LEN - 1) as u8 & 0x1f;
    cid[1..9].copy_from_slice(&server.0);
    cid[9..].copy_from_slice(&nonce);
    cid
}

/// The server ID a routable connection ID carries; `None` for any other connection ID
/// (another length, or a config rotation other than `0b000`).
pub fn server_id_of(cid: &[u8]) -> Option<QuicServerId> {
    if cid.len() != ROUTABLE_CID_LEN || cid[0] >> 5 != 0 {
        return None;
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&cid[1..9]);
    Some(QuicServerId(id))
}

/// Where a connection ID names the endpoint loop that owns it, when a node runs several
/// (`--wt-loops`): the first byte of its nonce. `None` for an ID of another length.
pub fn loop_byte_at(cid_len: usize) -> Option<usize> {
    match cid_len {
        SIGNED_CID_LEN => Some(0),
        ROUTABLE_CID_LEN => Some(1 + 8),
        _ => None,
    }
}

/// quinn's generator of routable connection IDs (fresh random nonces; for a connection's IDs
/// quinn draws again when one is already in use, for a Retry's it does not check). With
/// `loop_index`, the nonce's first byte is that loop's index (`loop_byte_at`).
#[derive(Debug, Clone, Copy)]
pub struct RoutableConnectionIds {
    pub server: QuicServerId,
    pub loop_index: Option<u8>,
}

impl ConnectionIdGenerator for RoutableConnectionIds {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&crate::random::random_u64().to_le_bytes()[..NONCE_LEN]);
        if let Some(index) = self.loop_index {
            nonce[0] = index;
        }
        ConnectionId::new(&routable_cid(self.server, nonce))
    }

    fn cid_len(&self) -> usize {
        ROUTABLE_CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Bytes of random nonce in a default connection ID.
const SIGNED_NONCE_LEN: usize = 6;

/// Length of a default connection ID: the nonce, then two bytes of keyed signature.
pub const SIGNED_CID_LEN: usize = SIGNED_NONCE_LEN + 2;

/// The default connection IDs: a 48-bit random nonce and a 16-bit signature keyed per node
/// (quinn asks the factory once per endpoint; several loops share one key), so the endpoint drops a
/// short-header packet with a forged ID instead of answering it with a stateless reset (all but
/// one in 65,536; quinn's default signs with 40 bits). Not quinn's default
/// (`HashedConnectionIdGenerator`), whose nonce is 24 bits: quinn-proto draws a Retry packet's
/// connection ID without checking it against the IDs in use,
/// and among the ~60,000 IDs of 10,000 sessions a 24-bit draw hits one about once in 280; the
/// client's next Initial is then routed to that other connection and dropped, so the client never
/// connects (seen in connect storms of 10,000, bench/README.md). At 48 bits that is once in 4.7
/// billion Retries. With `loop_index` (several endpoint loops: `--wt-loops`) the nonce's first
/// byte is the loop's index, 40 random bits left (once in 18 million Retries); the loops' generators
/// are clones of one, so they share the key.
#[derive(Debug, Clone, Default)]
pub struct SignedRandomIds {
    key: RandomState,
    loop_index: Option<u8>,
}

impl SignedRandomIds {
    /// This generator's key, for the loop `index`.
    pub fn for_loop(&self, index: u8) -> Self {
        Self {
            key: self.key.clone(),
            loop_index: Some(index),
        }
    }

    fn signature(&self, nonce: &[u8]) -> [u8; 2] {
        let hash = self.key.hash_one(nonce).to_le_bytes();
        [hash[0], hash[1]]
    }
}

impl ConnectionIdGenerator for SignedRandomIds {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut cid = [0u8; SIGNED_CID_LEN];
        let nonce = crate::random::random_u64().to_le_bytes();
        cid[..SIGNED_NONCE_LEN].copy_from_slice(&nonce[..SIGNED_NONCE_LEN]);
        if let Some(index) = self.loop_index {
            cid[0] = index;
        }
        let signature = self.signature(&cid[..SIGNED_NONCE_LEN]);
        cid[SIGNED_NONCE_LEN..].copy_from_slice(&signature);
        ConnectionId::new(&cid)
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        if cid.len() != SIGNED_CID_LEN {
            return Err(InvalidCid);
        }
        let (nonce, signature) = cid.split_at(SIGNED_NONCE_LEN);
        if self.signature(nonce)[..] == *signature {
            Ok(())
        } else {
            Err(InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        SIGNED_CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ecs_task_id_is_the_first_8_bytes_of_sha256_over_its_arn() {
        // The vector deploy/README.md gives and deploy/quic-register's tests check.
        let arn = "arn:aws:ecs:us-west-2:111122223333:task/courtside/0123456789abcdef0123456789abcdef";
        assert_eq!(QuicServerId::of_ecs_task(arn).to_string(), "0x05cd5e4324e6ab56");
        assert_eq!("ecs-task".parse(), Ok(ServerIdSource::EcsTask));
        assert_eq!(
            "0x05cd5e4324e6ab56".parse(),
            Ok(ServerIdSource::Fixed(QuicServerId::of_ecs_task(arn)))
        );
    }

    #[test]
    fn server_ids_are_0x_and_16_hex_digits() {
        let id: QuicServerId = "0x0123456789abcdef".parse().expect("valid");
        assert_eq!(id.0, [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
        assert_eq!(id.to_string(), "0x0123456789abcdef");
        assert_eq!("0X0123456789ABCDEF".parse::<QuicServerId>(), Ok(id));
        for bad in [
            "0123456789abcdef",
            "0x0123",
            "0x0123456789abcdef00",
            "0x0123456789abcdeg",
            "",
        ] {
            assert_eq!(bad.parse::<QuicServerId>(), Err(BadServerId), "{bad}");
        }
    }

    #[test]
    fn a_routable_id_is_rotation_000_then_the_server_id_then_the_nonce() {
        let id: QuicServerId = "0x0102030405060708".parse().expect("valid");
        let cid = routable_cid(id, [0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7]);
        assert_eq!(
            cid,
            [0x0f, 1, 2, 3, 4, 5, 6, 7, 8, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7]
        );
        assert_eq!(cid[0] >> 5, 0, "config rotation 0b000");
        assert_eq!(server_id_of(&cid), Some(id));
        assert_eq!(server_id_of(&cid[..8]), None, "another length");
        let mut unroutable = cid;
        unroutable[0] |= 0xe0;
        assert_eq!(server_id_of(&unroutable), None, "config rotation 0b111");
    }

    #[test]
    fn generated_ids_carry_the_server_id_and_differ() {
        let server: QuicServerId = "0xfeedfacecafebeef".parse().expect("valid");
        let mut generator = RoutableConnectionIds {
            server,
            loop_index: None,
        };
        let a = generator.generate_cid();
        let b = generator.generate_cid();
        assert_eq!(a.len(), generator.cid_len());
        assert_eq!(server_id_of(&a), Some(server));
        assert_eq!(server_id_of(&b), Some(server));
        assert_ne!(&a[..], &b[..], "random nonces");
    }

    #[test]
    fn default_ids_do_not_repeat_among_100_000_and_carry_their_signature() {
        // A Retry's ID is drawn without a check against the IDs in use: 100,000 draws must not
        // repeat (quinn's 24-bit nonce repeats about 300 times here, 48 bits once in 56,000 runs).
        let mut generator = SignedRandomIds::default();
        let ids: std::collections::HashSet<ConnectionId> = (0..100_000).map(|_| generator.generate_cid()).collect();
        assert_eq!(ids.len(), 100_000, "no repeated connection ID");
        assert!(ids
            .iter()
            .all(|id| id.len() == generator.cid_len() && generator.validate(id).is_ok()));

        // Random bytes (a forged ID) pass once in 65,536: of 1,000, almost none.
        let forged = (0..1_000)
            .filter(|_| {
                let bytes: [u8; SIGNED_CID_LEN] = crate::random::random_u64().to_le_bytes();
                generator.validate(&ConnectionId::new(&bytes)).is_ok()
            })
            .count();
        assert!(forged < 10, "{forged} of 1,000 forged IDs passed");
        let ours = generator.generate_cid();
        assert!(
            generator.validate(&ConnectionId::new(&ours[..4])).is_err(),
            "another length"
        );
    }

    #[test]
    fn a_loops_ids_carry_its_index_in_the_nonces_first_byte() {
        let shared = SignedRandomIds::default();
        let (mut first, mut second) = (shared.for_loop(0), shared.for_loop(3));
        let at = loop_byte_at(SIGNED_CID_LEN).expect("default IDs name their loop");
        for _ in 0..100 {
            let (a, b) = (first.generate_cid(), second.generate_cid());
            assert_eq!((a[at], b[at]), (0, 3));
            // One key: each loop's IDs pass the other's check.
            assert!(first.validate(&b).is_ok() && second.validate(&a).is_ok());
        }
        let server: QuicServerId = "0xfeedfacecafebeef".parse().expect("valid");
        let mut routable = RoutableConnectionIds {
            server,
            loop_index: Some(1),
        };
        let cid = routable.generate_cid();
        assert_eq!(loop_byte_at(cid.len()).map(|at| cid[at]), Some(1));
        assert_eq!(server_id_of(&cid), Some(server), "the server ID is untouched");
        assert_eq!(loop_byte_at(4), None);
    }
}
