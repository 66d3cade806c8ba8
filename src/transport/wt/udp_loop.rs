//! The I/O of a `WtEndpoint`: the UDP socket, received in batches (quinn-udp's `recvmmsg`, GRO)
//! into the endpoint with `now`, and what the sessions produced sent (`sendmmsg` across
//! connections, GSO within a connection's batch). `run` is the plain loop (a session application as a callback);
//! `wt::server` builds the server's loop on `UdpIo`.

use std::future::Future;
use std::io::{self, IoSliceMut};
use std::time::Instant;

use bytes::BytesMut;
use quinn_proto::ConnectionHandle;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState, BATCH_SIZE};
use tokio::io::Interest;

use super::endpoint::WtEndpoint;
use super::sendmmsg;
use super::session::SessionEvent;
use super::steer::Inbound;

/// quinn-udp's ECN codepoint as quinn-proto's (the same bits).
fn proto_ecn(ecn: quinn_udp::EcnCodepoint) -> Option<quinn_proto::EcnCodepoint> {
    quinn_proto::EcnCodepoint::from_bits(ecn as u8)
}

fn udp_ecn(ecn: quinn_proto::EcnCodepoint) -> Option<quinn_udp::EcnCodepoint> {
    quinn_udp::EcnCodepoint::from_bits(ecn as u8)
}

/// A UDP socket read and written in batches.
#[derive(Debug)]
pub struct UdpIo {
    socket: tokio::net::UdpSocket,
    state: UdpSocketState,
    /// `BATCH_SIZE` receive buffers of `chunk` bytes each.
    recv_buf: Vec<u8>,
    chunk: usize,
}

/// The least a receive buffer holds per GRO segment: a client's first datagrams leave before it
/// has read the `max_udp_payload_size` the server sends, and may be larger (Chromium's Initial
/// datagrams are 1,250 bytes). An Ethernet MTU's UDP payload.
const RECEIVE_SEGMENT: usize = 1472;

/// The bytes of one receive buffer: `gro_segments` segments (at least one) of `max_udp_payload`
/// bytes, at least `RECEIVE_SEGMENT`, so that a datagram the endpoint did not ask for is read
/// whole (a shortened one fails to decrypt).
fn receive_chunk(max_udp_payload: usize, gro_segments: usize) -> usize {
    max_udp_payload.max(RECEIVE_SEGMENT) * gro_segments.max(1)
}

impl UdpIo {
    /// Takes `socket` (bound); each receive buffer holds `max_udp_payload` bytes (at least
    /// `RECEIVE_SEGMENT`) per GRO segment.
    pub fn new(socket: std::net::UdpSocket, max_udp_payload: usize) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new((&socket).into())?;
        let socket = tokio::net::UdpSocket::from_std(socket)?;
        let chunk = receive_chunk(max_udp_payload, state.gro_segments());
        Ok(Self {
            socket,
            state,
            recv_buf: vec![0u8; chunk * BATCH_SIZE],
            chunk,
        })
    }

    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.socket.local_addr()
    }

    /// Waits until the socket has datagrams.
    pub async fn readable(&self) -> io::Result<()> {
        self.socket.readable().await
    }

    /// Hands every datagram waiting on the socket to `endpoint`, a batch per system call;
    /// `steer` first takes those another loop owns (it returns the others).
    pub fn receive(
        &mut self,
        endpoint: &mut WtEndpoint,
        now: Instant,
        mut steer: impl FnMut(Inbound) -> Option<Inbound>,
    ) -> io::Result<()> {
        let mut metas = [RecvMeta::default(); BATCH_SIZE];
        loop {
            let mut iovs: [IoSliceMut; BATCH_SIZE] = {
                let mut chunks = self.recv_buf.chunks_mut(self.chunk).map(IoSliceMut::new);
                std::array::from_fn(|_| chunks.next().unwrap_or_else(|| IoSliceMut::new(&mut [])))
            };
            let (socket, state) = (&self.socket, &self.state);
            match socket.try_io(Interest::READABLE, || state.recv(socket.into(), &mut iovs, &mut metas)) {
                Ok(count) => {
                    for (meta, iov) in metas.iter().zip(iovs.iter()).take(count) {
                        let mut data = BytesMut::from(&iov[..meta.len]);
                        while !data.is_empty() {
                            let segment = data.split_to(meta.stride.min(data.len()));
                            let inbound = Inbound {
                                addr: meta.addr,
                                dst_ip: meta.dst_ip,
                                ecn: meta.ecn.and_then(proto_ecn),
                                data: segment,
                            };
                            if let Some(ours) = steer(inbound) {
                                endpoint.handle_datagram(now, ours.addr, ours.dst_ip, ours.ecn, ours.data);
                            }
                        }
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                // Undefined in QUIC, and injectable by an attacker.
                Err(error) if error.kind() == io::ErrorKind::ConnectionReset => continue,
                Err(error) => return Err(error),
            }
        }
    }

    /// Sends every packet the endpoint collected, waiting for room when the socket is full,
    /// and forgets them: single packets in `sendmmsg` batches across connections, GSO batches
    /// (one connection's packets to one destination) through quinn-udp.
    pub async fn send(&self, endpoint: &mut WtEndpoint) -> io::Result<()> {
        let mut batch: Vec<sendmmsg::Datagram<'_>> = Vec::new();
        for (packet, contents) in endpoint.transmits() {
            if packet.segment_size.is_some_and(|size| size < contents.len()) {
                self.send_batch(&mut batch).await?;
                self.send_one(packet, contents).await?;
                continue;
            }
            batch.push(sendmmsg::Datagram {
                destination: packet.destination,
                ecn: packet.ecn.map_or(0, |ecn| ecn as u8),
                src_ip: packet.src_ip,
                contents,
            });
            if batch.len() == sendmmsg::BATCH {
                self.send_batch(&mut batch).await?;
            }
        }
        self.send_batch(&mut batch).await?;
        endpoint.clear_transmits();
        Ok(())
    }

    /// Sends `batch` (emptied), a `sendmmsg` call per `sendmmsg::BATCH` datagrams.
    async fn send_batch(&self, batch: &mut Vec<sendmmsg::Datagram<'_>>) -> io::Result<()> {
        let mut at = 0;
        while at < batch.len() {
            match self
                .socket
                .try_io(Interest::WRITABLE, || sendmmsg::send(&self.socket, &batch[at..]))
            {
                Ok(sent) => at += sent.max(1),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => self.socket.writable().await?,
                // A datagram the call refused: quinn-udp's own send (its fallbacks for old
                // kernels, its log), then the rest. One the kernel refuses for good (a closed
                // port, a route gone, an MTU probe too large) is a lost packet.
                Err(_) => {
                    let datagram = batch[at];
                    let transmit = Transmit {
                        destination: datagram.destination,
                        ecn: quinn_udp::EcnCodepoint::from_bits(datagram.ecn),
                        contents: datagram.contents,
                        segment_size: None,
                        src_ip: datagram.src_ip,
                    };
                    self.send_transmit(&transmit).await?;
                    at += 1;
                }
            }
        }
        batch.clear();
        Ok(())
    }

    /// Sends one packet or GSO batch through quinn-udp.
    async fn send_one(&self, packet: &super::endpoint::OutPacket, contents: &[u8]) -> io::Result<()> {
        let transmit = Transmit {
            destination: packet.destination,
            ecn: packet.ecn.and_then(udp_ecn),
            contents,
            segment_size: packet.segment_size,
            src_ip: packet.src_ip,
        };
        self.send_transmit(&transmit).await
    }

    async fn send_transmit(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        loop {
            match self
                .socket
                .try_io(Interest::WRITABLE, || self.state.send((&self.socket).into(), transmit))
            {
                Ok(()) => return Ok(()),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => self.socket.writable().await?,
                // A packet the kernel refuses (a closed port, a route gone) is a lost packet.
                Err(_) => return Ok(()),
            }
        }
    }
}

/// Serves `endpoint` on `socket` until `shutdown` completes; `on_event` answers the sessions'
/// events (a request with `accept` or `refuse`, commands with deliveries) through the endpoint.
pub async fn run(
    socket: std::net::UdpSocket,
    mut endpoint: WtEndpoint,
    mut on_event: impl FnMut(&mut WtEndpoint, Instant, ConnectionHandle, SessionEvent),
    shutdown: impl Future<Output = ()>,
) -> io::Result<WtEndpoint> {
    let mut io = UdpIo::new(socket, endpoint.max_udp_payload())?;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let deadline = endpoint.next_timeout();
        let timer = sleep_until(deadline);
        tokio::select! {
            _ = &mut shutdown => return Ok(endpoint),
            ready = io.readable() => {
                ready?;
                io.receive(&mut endpoint, crate::clock::instant(), Some)?;
            }
            _ = timer => endpoint.handle_timeouts(crate::clock::instant()),
        }
        let now = crate::clock::instant();
        endpoint.flush(now);
        while let Some((ch, event)) = endpoint.poll_event() {
            on_event(&mut endpoint, now, ch, event);
        }
        endpoint.flush(now);
        io.send(&mut endpoint).await?;
    }
}

/// Sleeps until the endpoint's next timer (`WtEndpoint::next_timeout`), or for ever without one.
pub(super) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::certs::Identity;
    use crate::core::{ClientCommand, Outgoing, ServerControl};
    use crate::metrics::Metrics;
    use crate::transport::wt::pair::{self, Setup};

    const HANG: Duration = Duration::from_secs(10);

    #[test]
    fn a_receive_buffer_holds_a_first_flight_larger_than_the_payload_the_server_asks_for() {
        // The proto engine asks for 1,200 bytes; Chromium's first datagrams are 1,250.
        assert_eq!(receive_chunk(1200, 1), 1472);
        assert_eq!(receive_chunk(1200, 0), 1472);
        assert_eq!(receive_chunk(1200, 64), 64 * 1472);
        assert_eq!(receive_chunk(9000, 1), 9000);
    }

    #[tokio::test]
    async fn a_webtransport_client_gets_its_session_and_replies_over_a_real_udp_socket() {
        let setup = Setup::default();
        let identity = Identity::self_signed(&["localhost"]).expect("certificate");
        let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, identity.chain[0].as_ref())
            .as_ref()
            .try_into()
            .expect("32 bytes");
        let server_config = pair::server_config(&setup, identity);
        let endpoint = WtEndpoint::new(
            Arc::new(quinn_proto::EndpointConfig::default()),
            Arc::new(server_config),
            setup.session,
            200,
            Arc::new(Metrics::new()),
        );
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = socket.local_addr().expect("address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(run(
            socket,
            endpoint,
            move |endpoint, now, ch, event| {
                let Some(session) = endpoint.session(ch) else { return };
                match &event {
                    SessionEvent::Request(_) => session.accept(now),
                    SessionEvent::Command(Ok(ClientCommand::Ping)) => {
                        session.deliver(now, &[Outgoing::Control(ServerControl::Pong)]);
                    }
                    _ => {}
                }
                log.lock().expect("log").push(format!("{event:?}"));
            },
            async move {
                let _ = stopped.await;
            },
        ));

        let config = wtransport::ClientConfig::builder()
            .with_bind_default()
            .with_server_certificate_hashes([wtransport::tls::Sha256Digest::new(digest)])
            .build();
        let client = wtransport::Endpoint::client(config).expect("client endpoint");
        let connection = tokio::time::timeout(HANG, client.connect(format!("https://{addr}/wt")))
            .await
            .expect("connect in time")
            .expect("a session");
        let (mut send, mut recv) = tokio::time::timeout(HANG, async {
            connection.open_bi().await.expect("open").await.expect("control stream")
        })
        .await
        .expect("a control stream in time");
        // Two pings (framed: length 1, type 0x03), two pongs (0x12) back, in order.
        for _ in 0..2 {
            send.write_all(&[0x01, 0x03]).await.expect("ping");
            let mut pong = [0u8; 2];
            tokio::time::timeout(HANG, recv.read_exact(&mut pong))
                .await
                .expect("a pong in time")
                .expect("read");
            assert_eq!(pong, [0x01, 0x12]);
        }
        connection.close(wtransport::VarInt::from_u32(0), b"done");
        let ended = tokio::time::timeout(HANG, async {
            while !seen.lock().expect("log").iter().any(|e| e.starts_with("Ended")) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(ended.is_ok(), "{:?}", seen.lock().expect("log"));
        let _ = stop.send(());
        let endpoint = server.await.expect("the loop").expect("no I/O error");
        let seen = seen.lock().expect("log").clone();
        assert!(seen[0].starts_with("Request"), "{seen:?}");
        assert_eq!(seen[1], "Established");
        assert_eq!(seen.iter().filter(|e| e.contains("Ping")).count(), 2, "{seen:?}");
        assert!(seen.last().is_some_and(|e| e.starts_with("Ended(Lost")), "{seen:?}");
        drop(endpoint);
    }
}
