//! `floor`: what one loopback TCP write, and one UDP datagram, cost on this machine. A minimal
//! writer sends one pre-encoded WebSocket frame to each of N sockets, one frame per write and then
//! ten per write; then one pre-encoded datagram to each of N UDP sockets, one per `sendmsg` and
//! then ten per `sendmsg` (GSO). Its thread's CPU per message is the floor under any fan-out.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::procstat;

#[derive(Debug, Clone, Serialize)]
pub struct FloorResult {
    pub sockets: usize,
    pub frame_bytes: usize,
    pub rounds: usize,
    /// CPU µs per write of one frame, and the wall time to write one frame to every socket.
    pub one_per_write_cpu_us: f64,
    pub one_per_write_round_ms: f64,
    /// CPU µs per message when ten frames go in one write.
    pub ten_per_write_cpu_us_per_message: f64,
    pub ten_per_write_round_ms: f64,
    /// One frame per write again, but to readers that wait in epoll (a task per socket, as any
    /// event-driven client): each write then also wakes its reader, on the writer's CPU.
    pub one_per_write_woken_cpu_us: f64,
    pub one_per_write_woken_round_ms: f64,
    /// The same over UDP, the floor under WebTransport: one datagram per `sendmsg` to each
    /// of the sockets, then ten per `sendmsg` (UDP GSO, ten segments to one socket).
    pub udp: UdpFloor,
}

#[derive(Debug, Clone, Serialize)]
pub struct UdpFloor {
    pub datagram_bytes: usize,
    pub one_per_send_cpu_us: f64,
    pub one_per_send_round_ms: f64,
    /// `None` where the kernel has no UDP GSO.
    pub ten_per_send_cpu_us_per_datagram: Option<f64>,
    pub ten_per_send_round_ms: Option<f64>,
}

/// A 100-byte datagram, about a QUIC packet carrying one score update.
const UDP_DATAGRAM: usize = 100;

/// One datagram per `sendmsg` to each of `sockets` loopback UDP sockets, then ten per `sendmsg`.
fn run_udp(sockets: usize, rounds: usize) -> anyhow::Result<UdpFloor> {
    use std::net::UdpSocket;
    let sender = UdpSocket::bind("127.0.0.1:0")?;
    let state = quinn_udp::UdpSocketState::new((&sender).into())?;
    let mut receivers = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
        let _ = socket.set_recv_buffer_size(1 << 20);
        socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
        socket.set_nonblocking(true)?;
        receivers.push(UdpSocket::from(socket));
    }
    let addrs: Vec<std::net::SocketAddr> = receivers.iter().map(|r| r.local_addr()).collect::<Result<_, _>>()?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drain = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut idle = true;
                for r in &receivers {
                    while r.recv(&mut buf).is_ok() {
                        idle = false;
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        })
    };
    let datagram = vec![0x40u8; UDP_DATAGRAM];
    let ten = vec![0x40u8; UDP_DATAGRAM * 10];
    let measure = |contents: &[u8], segment: Option<usize>| -> anyhow::Result<(f64, f64)> {
        let cpu_before = procstat::cpu_time("thread-self").unwrap_or_default();
        let started = Instant::now();
        for _ in 0..rounds {
            for &destination in &addrs {
                let transmit = quinn_udp::Transmit {
                    destination,
                    ecn: None,
                    contents,
                    segment_size: segment,
                    src_ip: None,
                };
                // The receivers drain continuously; a full buffer would only drop the datagram.
                let _ = state.send((&sender).into(), &transmit);
            }
        }
        let wall = started.elapsed();
        let cpu = procstat::cpu_time("thread-self")
            .unwrap_or_default()
            .saturating_sub(cpu_before);
        let sends = (rounds * addrs.len()) as f64;
        Ok((
            cpu.as_secs_f64() * 1e6 / sends,
            wall.as_secs_f64() * 1e3 / rounds as f64,
        ))
    };
    let (one_cpu, one_round) = measure(&datagram, None)?;
    let gso = if state.max_gso_segments() >= 10 {
        let (cpu, round) = measure(&ten, Some(UDP_DATAGRAM))?;
        Some((cpu / 10.0, round))
    } else {
        None
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drain
        .join()
        .map_err(|_| anyhow::anyhow!("the UDP floor's drain thread panicked"))?;
    Ok(UdpFloor {
        datagram_bytes: UDP_DATAGRAM,
        one_per_send_cpu_us: one_cpu,
        one_per_send_round_ms: one_round,
        ten_per_send_cpu_us_per_datagram: gso.map(|g| g.0),
        ten_per_send_round_ms: gso.map(|g| g.1),
    })
}

pub fn run(sockets: usize, rounds: usize) -> anyhow::Result<FloorResult> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut writers = Vec::with_capacity(sockets);
    let mut readers = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        let client = TcpStream::connect(addr)?;
        let (server, _) = listener.accept()?;
        server.set_nodelay(true)?;
        writers.push(server);
        readers.push(client);
    }
    // A reader thread drains every socket so writes never block.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drain = {
        let stop = stop.clone();
        for r in &readers {
            r.set_nonblocking(true)?;
        }
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut idle = true;
                for r in readers.iter_mut() {
                    while let Ok(n) = r.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        idle = false;
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            readers
        })
    };
    // A 60-byte score update, framed as a server-to-client WebSocket text frame.
    let payload = br#"{"type":"state","room":"game:1234","version":7,"data":42}"#;
    let mut frame = vec![0x81, payload.len() as u8];
    frame.extend_from_slice(payload);
    let ten: Vec<u8> = frame.iter().copied().cycle().take(frame.len() * 10).collect();

    let mut measure = |bytes: &[u8]| -> anyhow::Result<(f64, f64)> {
        let cpu_before = procstat::cpu_time("thread-self").unwrap_or_default();
        let started = Instant::now();
        for _ in 0..rounds {
            for w in writers.iter_mut() {
                w.write_all(bytes)?;
            }
        }
        let wall = started.elapsed();
        let cpu = procstat::cpu_time("thread-self")
            .unwrap_or_default()
            .saturating_sub(cpu_before);
        let writes = (rounds * writers.len()) as f64;
        Ok((
            cpu.as_secs_f64() * 1e6 / writes,
            wall.as_secs_f64() * 1e3 / rounds as f64,
        ))
    };
    let (one_cpu, one_round) = measure(&frame)?;
    let (ten_cpu, ten_round) = measure(&ten)?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let readers = drain
        .join()
        .map_err(|_| anyhow::anyhow!("the floor's drain thread panicked"))?;
    // The same readers, now each a task waiting in epoll on its own thread's runtime.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let woken_readers = std::thread::spawn(move || -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
        runtime.block_on(async move {
            for r in readers {
                let r = tokio::net::TcpStream::from_std(r)?;
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    while r.readable().await.is_ok() {
                        match r.try_read(&mut buf) {
                            Ok(0) => break,
                            Ok(_) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => break,
                        }
                    }
                });
            }
            let _ = ready_tx.send(());
            let _ = stop_rx.await;
            anyhow::Ok(())
        })
    });
    ready_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the floor's epoll readers did not start"))?;
    let (woken_cpu, woken_round) = measure(&frame)?;
    let _ = stop_tx.send(());
    woken_readers
        .join()
        .map_err(|_| anyhow::anyhow!("the floor's epoll reader thread panicked"))??;
    let udp = run_udp(sockets, rounds)?;
    Ok(FloorResult {
        sockets,
        frame_bytes: frame.len(),
        rounds,
        one_per_write_cpu_us: one_cpu,
        one_per_write_round_ms: one_round,
        ten_per_write_cpu_us_per_message: ten_cpu / 10.0,
        ten_per_write_round_ms: ten_round,
        one_per_write_woken_cpu_us: woken_cpu,
        one_per_write_woken_round_ms: woken_round,
        udp,
    })
}
