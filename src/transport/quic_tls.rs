//! The server's TLS for QUIC (both WebTransport engines): rustls runs the handshake, and a
//! session lets go of rustls's connection once it is over, keeping only the secrets a key update
//! needs, from which the next keys are made when a key update first uses them.
//!
//! quinn-proto's own rustls session keeps rustls's whole connection for the connection's life
//! (its handshake state, record layer and buffers, none of which QUIC uses after the handshake),
//! and the next 1-RTT keys from the start: about 4.4 KB of every idle session's RSS.

use std::any::Any;
use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use quinn_proto::crypto::rustls::{HandshakeData, QuicServerConfig};
use quinn_proto::crypto::{self, CryptoError, ExportKeyingMaterialError, HeaderKey, KeyPair, Keys, UnsupportedVersion};
use quinn_proto::transport_parameters::TransportParameters;
use quinn_proto::{ConnectionId, Side, TransportError, TransportErrorCode};
use rustls::quic::{Connection, KeyChange, PacketKeySet, Secrets, ServerConnection, Suite, Version};

/// TLS alert `unexpected_message`: what a client's TLS message after the handshake gets (QUIC
/// has no post-handshake message a client may send: RFC 9001 §6 forbids KeyUpdate).
const UNEXPECTED_MESSAGE: u8 = 10;

/// A QUIC server's TLS configuration whose sessions let go of rustls after the handshake.
pub(crate) struct ServerTls {
    /// quinn-proto's configuration, for what it does without a session: Initial keys and
    /// Retry tags (and a session for a version rustls cannot name, which does not happen:
    /// quinn asks for Initial keys first and refuses such a version).
    quinn: Arc<QuicServerConfig>,
    tls: Arc<rustls::ServerConfig>,
    /// The Initial packets' suite (AES-128-GCM-SHA256, as RFC 9001 §5.2 fixes it).
    initial: Suite,
}

impl ServerTls {
    /// An error when `tls` cannot serve QUIC (no TLS 1.3, no AES-128-GCM-SHA256 for the
    /// Initial packets, or an early-data size QUIC does not allow): found at startup, not at
    /// each connection.
    pub(crate) fn new(tls: rustls::ServerConfig) -> Result<Self, String> {
        let tls = Arc::new(tls);
        let quinn = QuicServerConfig::try_from(tls.clone()).map_err(|e| e.to_string())?;
        ServerConnection::new(tls.clone(), Version::V1, Vec::new()).map_err(|e| e.to_string())?;
        let initial = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
            .tls13()
            .and_then(|suite| suite.quic_suite())
            .ok_or("no QUIC suite for AES-128-GCM-SHA256")?;
        Ok(Self {
            quinn: Arc::new(quinn),
            tls,
            initial,
        })
    }
}

impl crypto::ServerConfig for ServerTls {
    fn initial_keys(&self, version: u32, dst_cid: &ConnectionId) -> Result<Keys, UnsupportedVersion> {
        self.quinn.initial_keys(version, dst_cid)
    }

    fn retry_tag(&self, version: u32, orig_dst_cid: &ConnectionId, packet: &[u8]) -> [u8; 16] {
        self.quinn.retry_tag(version, orig_dst_cid, packet)
    }

    fn start_session(self: Arc<Self>, version: u32, params: &TransportParameters) -> Box<dyn crypto::Session> {
        match self.session(version, params) {
            Some(session) => Box::new(session),
            // quinn's own session (which would fail the same way).
            None => self.quinn.clone().start_session(version, params),
        }
    }
}

impl ServerTls {
    /// A session for a client's first flight, or `None` if rustls cannot start one.
    fn session(&self, version: u32, params: &TransportParameters) -> Option<ServerSession> {
        let version = tls_version(version)?;
        let mut encoded = Vec::new();
        params.write(&mut encoded);
        let connection = ServerConnection::new(self.tls.clone(), version, encoded).ok()?;
        Some(ServerSession {
            tls: Some(Box::new(Connection::Server(connection))),
            version,
            initial: self.initial,
            got_handshake_data: false,
            agreed: Agreed::default(),
            next: Next::None,
        })
    }
}

/// rustls's keys of one level as quinn-proto takes them (its traits are implemented for
/// rustls's boxed keys).
fn quinn_keys(keys: rustls::quic::Keys) -> Keys {
    Keys {
        header: KeyPair {
            local: Box::new(keys.local.header),
            remote: Box::new(keys.remote.header),
        },
        packet: KeyPair {
            local: Box::new(keys.local.packet),
            remote: Box::new(keys.remote.packet),
        },
    }
}

/// The server name the client sent (SNI).
fn server_name(tls: &Connection) -> Option<&str> {
    match tls {
        Connection::Server(server) => server.server_name(),
        Connection::Client(_) => None,
    }
}

/// rustls's name for a QUIC version quinn-proto accepts (quinn-proto's own mapping).
fn tls_version(version: u32) -> Option<Version> {
    match version {
        0xff00_001d..=0xff00_0020 => Some(Version::V1Draft),
        0x0000_0001 | 0xff00_0021..=0xff00_0022 => Some(Version::V1),
        _ => None,
    }
}

/// What the handshake agreed, kept after rustls is let go.
#[derive(Default, Clone)]
struct Agreed {
    protocol: Option<Vec<u8>>,
    server_name: Option<String>,
}

impl Agreed {
    /// What `tls` has agreed so far (ALPN and the client's SNI).
    fn of(tls: &Connection) -> Self {
        Self {
            protocol: tls.alpn_protocol().map(<[u8]>::to_vec),
            server_name: server_name(tls).map(str::to_owned),
        }
    }
}

/// The secrets of the next key phase.
enum Next {
    /// Before the 1-RTT keys.
    None,
    /// The 1-RTT keys are made; quinn-proto has not yet asked for the next ones.
    Secrets(Secrets, Limits),
    /// The last next keys handed to quinn-proto: the ones after them derive from their secrets.
    Handed(Arc<NextKeys>),
}

/// One server session: rustls's connection until the handshake is over, then only the secrets.
struct ServerSession {
    /// Boxed, so that letting go of it gives its memory back.
    tls: Option<Box<Connection>>,
    version: Version,
    initial: Suite,
    got_handshake_data: bool,
    agreed: Agreed,
    next: Next,
}

impl ServerSession {
    /// After the handshake and once rustls has written all it had to (its session tickets),
    /// nothing more comes from or goes to rustls: keep what the handshake agreed and let go.
    fn let_go_when_done(&mut self) {
        let Some(tls) = self.tls.as_ref() else {
            return;
        };
        if tls.is_handshaking() {
            return;
        }
        self.agreed = Agreed::of(tls);
        self.tls = None;
    }
}

impl crypto::Session for ServerSession {
    fn initial_keys(&self, dst_cid: &ConnectionId, side: Side) -> Keys {
        quinn_keys(self.initial.keys(dst_cid, side.into(), self.version))
    }

    fn handshake_data(&self) -> Option<Box<dyn Any>> {
        if !self.got_handshake_data {
            return None;
        }
        let Agreed { protocol, server_name } = match &self.tls {
            Some(tls) => Agreed::of(tls),
            None => self.agreed.clone(),
        };
        Some(Box::new(HandshakeData { protocol, server_name }))
    }

    /// Sessions do not ask for client certificates.
    fn peer_identity(&self) -> Option<Box<dyn Any>> {
        None
    }

    /// 0-RTT is off (the TLS configuration's `max_early_data_size` is 0).
    fn early_crypto(&self) -> Option<(Box<dyn HeaderKey>, Box<dyn crypto::PacketKey>)> {
        let keys = self.tls.as_ref()?.zero_rtt_keys()?;
        Some((Box::new(keys.header), Box::new(keys.packet)))
    }

    fn early_data_accepted(&self) -> Option<bool> {
        None
    }

    fn is_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|tls| tls.is_handshaking())
    }

    fn read_handshake(&mut self, buf: &[u8]) -> Result<bool, TransportError> {
        let Some(tls) = self.tls.as_mut() else {
            return Err(TransportError {
                code: TransportErrorCode::crypto(UNEXPECTED_MESSAGE),
                frame: None,
                reason: "TLS message after the handshake".into(),
            });
        };
        if let Err(error) = tls.read_hs(buf) {
            return Err(match tls.alert() {
                Some(alert) => TransportError {
                    code: TransportErrorCode::crypto(alert.into()),
                    frame: None,
                    reason: error.to_string(),
                },
                None => TransportError {
                    code: TransportErrorCode::PROTOCOL_VIOLATION,
                    frame: None,
                    reason: format!("TLS error: {error}"),
                },
            });
        }
        // As quinn-proto's session: the ClientHello is read once its ALPN or SNI is known.
        if !self.got_handshake_data
            && (tls.alpn_protocol().is_some() || server_name(tls).is_some() || !tls.is_handshaking())
        {
            self.got_handshake_data = true;
            return Ok(true);
        }
        Ok(false)
    }

    /// quinn-proto reads the client's parameters once, from its first flight; after the
    /// handshake there are none to read.
    fn transport_parameters(&self) -> Result<Option<TransportParameters>, TransportError> {
        let Some(bytes) = self.tls.as_ref().and_then(|tls| tls.quic_transport_parameters()) else {
            return Ok(None);
        };
        TransportParameters::read(Side::Server, &mut std::io::Cursor::new(bytes))
            .map(Some)
            .map_err(Into::into)
    }

    fn write_handshake(&mut self, buf: &mut Vec<u8>) -> Option<Keys> {
        let change = self.tls.as_mut()?.write_hs(buf);
        let keys = match change {
            None => None,
            Some(KeyChange::Handshake { keys }) => Some(keys),
            Some(KeyChange::OneRtt { keys, next }) => {
                self.next = Next::Secrets(next, Limits::of(&*keys.local.packet));
                Some(keys)
            }
        };
        self.let_go_when_done();
        keys.map(quinn_keys)
    }

    fn next_1rtt_keys(&mut self) -> Option<KeyPair<Box<dyn crypto::PacketKey>>> {
        let (secrets, limits) = match std::mem::replace(&mut self.next, Next::None) {
            Next::None => return None,
            Next::Secrets(secrets, limits) => (secrets, limits),
            Next::Handed(last) => {
                // quinn-proto asks for the phase after the last keys handed as those become
                // current (`update_keys`): they are needed now, and rustls moves secrets on only
                // by making keys, so the keys made to move on are theirs.
                let mut secrets = last.secrets.clone();
                let _ = last.keys.set(secrets.next_packet_keys());
                (secrets, last.limits)
            }
        };
        let shared = Arc::new(NextKeys {
            secrets,
            keys: OnceLock::new(),
            limits,
        });
        self.next = Next::Handed(shared.clone());
        Some(KeyPair {
            local: Box::new(NextKey {
                keys: shared.clone(),
                local: true,
            }),
            remote: Box::new(NextKey {
                keys: shared,
                local: false,
            }),
        })
    }

    /// Only a client checks a Retry.
    fn is_valid_retry(&self, _: &ConnectionId, _: &[u8], _: &[u8]) -> bool {
        false
    }

    fn export_keying_material(
        &self,
        output: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), ExportKeyingMaterialError> {
        // Nothing in Courtside exports keying material; after the handshake it cannot.
        let tls = self.tls.as_ref().ok_or(ExportKeyingMaterialError)?;
        tls.export_keying_material(output, label, Some(context))
            .map(|_| ())
            .map_err(|_| ExportKeyingMaterialError)
    }
}

/// The keys of the next key phase, made from their secrets when a packet is first sealed or
/// opened with them. quinn-proto updates a session's keys after 10 to 999 packets and then at
/// AES-GCM's limit (2^23 packets); after each update the phase after is again only secrets.
/// Making keys while a packet is processed is what RFC 9001 §6.3 allows ("An endpoint MAY
/// generate new keys as part of packet processing"), with the timing signal it names: once per
/// key phase, it could show an on-path attacker when the phase changed.
struct NextKeys {
    secrets: Secrets,
    keys: OnceLock<PacketKeySet>,
    /// The suite's, answered without making the keys (quinn-proto reads the new keys' limit as
    /// it hands them out).
    limits: Limits,
}

/// What a packet key says of its suite.
#[derive(Debug, Clone, Copy)]
struct Limits {
    tag_len: usize,
    confidentiality: u64,
    integrity: u64,
}

impl Limits {
    fn of(key: &dyn rustls::quic::PacketKey) -> Self {
        Self {
            tag_len: key.tag_len(),
            confidentiality: key.confidentiality_limit(),
            integrity: key.integrity_limit(),
        }
    }
}

impl NextKeys {
    fn keys(&self) -> &PacketKeySet {
        self.keys.get_or_init(|| self.secrets.clone().next_packet_keys())
    }
}

/// One direction of `NextKeys`.
struct NextKey {
    keys: Arc<NextKeys>,
    local: bool,
}

impl NextKey {
    // The box itself: quinn-proto implements its `PacketKey` for rustls's boxed key.
    #[allow(clippy::borrowed_box)]
    fn key(&self) -> &Box<dyn rustls::quic::PacketKey> {
        let keys = self.keys.keys();
        if self.local {
            &keys.local
        } else {
            &keys.remote
        }
    }
}

impl crypto::PacketKey for NextKey {
    fn encrypt(&self, packet: u64, buf: &mut [u8], header_len: usize) {
        crypto::PacketKey::encrypt(self.key(), packet, buf, header_len)
    }

    fn decrypt(&self, packet: u64, header: &[u8], payload: &mut BytesMut) -> Result<(), CryptoError> {
        crypto::PacketKey::decrypt(self.key(), packet, header, payload)
    }

    fn tag_len(&self) -> usize {
        self.keys.limits.tag_len
    }

    fn confidentiality_limit(&self) -> u64 {
        self.keys.limits.confidentiality
    }

    fn integrity_limit(&self) -> u64 {
        self.keys.limits.integrity
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use quinn_proto::crypto::rustls::HandshakeData;
    use quinn_proto::crypto::Session;
    use quinn_proto::transport_parameters::TransportParameters;
    use quinn_proto::{Side, TransportErrorCode};
    use rustls::quic::{ClientConnection, KeyChange, Secrets, Version};

    use super::{ServerSession, ServerTls};
    use crate::certs::Identity;
    use crate::transport::webtransport::tls_config;

    /// The parameters as a peer without any sends them (every one at its default).
    fn parameters() -> TransportParameters {
        TransportParameters::read(Side::Server, &mut std::io::Cursor::new(&[][..])).expect("parameters")
    }

    fn client(identity: &Identity) -> ClientConnection {
        client_of(&client_config(identity))
    }

    fn client_config(identity: &Identity) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(identity.chain[0].clone()).expect("root");
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h3".to_vec()];
        Arc::new(tls)
    }

    /// A client of `config` (whose session store keeps the tickets it receives).
    fn client_of(config: &Arc<rustls::ClientConfig>) -> ClientConnection {
        let mut encoded = Vec::new();
        parameters().write(&mut encoded);
        ClientConnection::new(
            config.clone(),
            Version::V1,
            "localhost".try_into().expect("name"),
            encoded,
        )
        .expect("client")
    }

    /// Runs a whole handshake between a rustls client and a session, in memory (the bytes of
    /// each flight in order, as the QUIC packets of their levels would carry them), and gives
    /// back the client's next-phase secrets.
    fn handshake(client: &mut ClientConnection, session: &mut ServerSession) -> Secrets {
        let mut client_next = None;
        for _ in 0..8 {
            let mut moved = false;
            // Each call's bytes belong to one level (a key change ends it): read them as one.
            loop {
                let mut flight = Vec::new();
                let change = client.write_hs(&mut flight);
                if !flight.is_empty() {
                    session.read_handshake(&flight).expect("server reads");
                    moved = true;
                }
                match change {
                    Some(KeyChange::OneRtt { next, .. }) => client_next = Some(next),
                    Some(KeyChange::Handshake { .. }) => {}
                    None if flight.is_empty() => break,
                    None => {}
                }
            }
            loop {
                let mut flight = Vec::new();
                let change = session.write_handshake(&mut flight);
                if !flight.is_empty() {
                    client.read_hs(&flight).expect("client reads");
                    moved = true;
                }
                if change.is_none() && flight.is_empty() {
                    break;
                }
            }
            if !moved {
                break;
            }
        }
        client_next.expect("the client reached 1-RTT")
    }

    fn session(identity: Identity) -> ServerSession {
        let tls = Arc::new(ServerTls::new(tls_config(identity).expect("tls")).expect("quic tls"));
        tls.session(1, &parameters()).expect("a session for QUIC v1")
    }

    #[test]
    fn after_the_handshake_the_session_keeps_only_what_it_agreed() {
        let identity = Identity::self_signed(&["localhost"]).expect("certificate");
        let mut client = client(&identity);
        let mut session = session(identity);
        assert!(session.tls.is_some());
        handshake(&mut client, &mut session);
        assert!(!client.is_handshaking());
        assert!(!session.is_handshaking());
        assert!(
            session.tls.is_none(),
            "rustls's connection let go once the tickets were written"
        );
        let agreed = session
            .handshake_data()
            .expect("handshake data")
            .downcast::<HandshakeData>()
            .expect("quinn's type");
        assert_eq!(agreed.protocol.as_deref(), Some(&b"h3"[..]));
        assert_eq!(agreed.server_name.as_deref(), Some("localhost"));
        // A TLS message after the handshake (a KeyUpdate, which QUIC forbids): unexpected_message.
        let refused = session
            .read_handshake(&[24, 0, 0, 1, 0])
            .expect_err("nothing comes after the handshake");
        assert_eq!(refused.code, TransportErrorCode::crypto(10));
    }

    /// The session tickets rustls writes at the end of the handshake reach the client before
    /// the session lets go of rustls: a second connection resumes.
    #[test]
    fn a_client_resumes_with_a_ticket_written_before_the_session_let_go() {
        let identity = Identity::self_signed(&["localhost"]).expect("certificate");
        let config = client_config(&identity);
        let tls = Arc::new(ServerTls::new(tls_config(identity).expect("tls")).expect("quic tls"));
        let mut first = client_of(&config);
        let mut session = tls.session(1, &parameters()).expect("session");
        handshake(&mut first, &mut session);
        assert!(session.tls.is_none());
        assert_eq!(first.handshake_kind(), Some(rustls::HandshakeKind::Full));
        let mut second = client_of(&config);
        let mut session = tls.session(1, &parameters()).expect("session");
        handshake(&mut second, &mut session);
        assert_eq!(second.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
    }

    /// Handing out the next keys makes none: not at the handshake, and not when quinn-proto
    /// reads their limit as a key update hands out the phase after (it does so after 10 to 999
    /// packets); the keys made to reach that phase are kept for the phase that just began.
    #[test]
    fn the_next_keys_stay_unmade_through_a_key_update() {
        use super::Next;
        let identity = Identity::self_signed(&["localhost"]).expect("certificate");
        let mut client = client(&identity);
        let mut session = session(identity);
        handshake(&mut client, &mut session);
        let unmade = |session: &ServerSession| matches!(&session.next, Next::Handed(n) if n.keys.get().is_none());
        let first = session.next_1rtt_keys().expect("next keys");
        assert!(unmade(&session), "the handshake made no next keys");
        assert_eq!(first.local.tag_len(), 16);
        assert_eq!(
            first.local.confidentiality_limit(),
            1 << 23,
            "AES-128-GCM's, without making the keys"
        );
        assert!(unmade(&session));
        let Next::Handed(first_shared) = &session.next else {
            panic!("handed")
        };
        let first_shared = first_shared.clone();
        // A key update: quinn-proto asks for the phase after and reads its limit.
        let second = session.next_1rtt_keys().expect("the phase after");
        assert!(second.local.confidentiality_limit() > 0);
        assert!(unmade(&session), "the phase after is only secrets");
        assert!(
            first_shared.keys.get().is_some(),
            "the phase that began has its keys, made once"
        );
    }

    /// The next keys, made only when first used, and the ones after them, are the ones the
    /// client derives for the same key phases.
    #[test]
    fn the_next_keys_made_when_first_used_match_the_clients() {
        let identity = Identity::self_signed(&["localhost"]).expect("certificate");
        let mut client = client(&identity);
        let mut session = session(identity);
        let mut client_next = handshake(&mut client, &mut session);
        for phase in 1..=3u64 {
            let client_keys = client_next.next_packet_keys();
            let server_keys = session.next_1rtt_keys().expect("next keys");
            let header = [0x40 | phase as u8, 1, 2, 3];
            let payload = b"a score";
            let mut packet = [&header[..], payload, &[0; 16]].concat();
            // Client to server.
            let tag = client_keys
                .local
                .encrypt_in_place(phase, &header, &mut packet[4..4 + payload.len()])
                .expect("seal");
            packet[4 + payload.len()..].copy_from_slice(tag.as_ref());
            let mut sealed = bytes::BytesMut::from(&packet[4..]);
            server_keys
                .remote
                .decrypt(phase, &header, &mut sealed)
                .unwrap_or_else(|_| panic!("phase {phase}: the server opens the client's packet"));
            assert_eq!(&sealed[..], payload);
            // Server to client.
            let mut out = [&header[..], payload, &[0; 16]].concat();
            server_keys.local.encrypt(phase, &mut out, header.len());
            let opened = client_keys
                .remote
                .decrypt_in_place(phase, &header, &mut out[4..])
                .expect("the client opens the server's packet");
            assert_eq!(opened, payload);
            assert_eq!(server_keys.local.tag_len(), 16);
        }
    }
}
