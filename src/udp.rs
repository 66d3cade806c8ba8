//! The WebTransport UDP sockets (one per endpoint loop, on one port): bound with buffers sized for
//! fan-out bursts, and the kernel's count of datagrams it dropped on them (`courtside_udp_receive_drops`).

use std::io;
use std::net::{SocketAddr, UdpSocket};

use tracing::{info, warn};

/// What the UDP socket asks of the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpSettings {
    pub bind: SocketAddr,
    pub recv_buffer: usize,
    pub send_buffer: usize,
}

/// Reads the kernel's drop count of the WebTransport sockets (one per endpoint loop).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpDrops {
    /// Inodes of the sockets, their keys in /proc/net/udp.
    inodes: Vec<u64>,
}

impl UdpDrops {
    /// Datagrams the kernel dropped on the sockets, summed (the `drops` column of /proc/net/udp
    /// and udp6), or `None` where the OS does not report it.
    pub fn count(&self) -> Option<u64> {
        let mut found = 0;
        let mut total = 0u64;
        for table in ["/proc/net/udp", "/proc/net/udp6"] {
            let Ok(text) = std::fs::read_to_string(table) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let inode = fields.get(9).and_then(|f| f.parse::<u64>().ok());
                if fields.len() >= 13 && inode.is_some_and(|inode| self.inodes.contains(&inode)) {
                    found += 1;
                    total += fields[12].parse::<u64>().unwrap_or(0);
                }
            }
        }
        (found > 0).then_some(total)
    }

    /// The drops of every socket in `parts`; `None` when one of them cannot be read.
    pub fn combine(parts: impl IntoIterator<Item = Option<UdpDrops>>) -> Option<UdpDrops> {
        let mut inodes = Vec::new();
        for part in parts {
            inodes.extend(part?.inodes);
        }
        Some(UdpDrops { inodes })
    }
}

/// A bound UDP socket, the buffers the kernel granted it and the reader of its drop count.
#[derive(Debug)]
pub struct BoundUdp {
    pub socket: UdpSocket,
    /// `None` where the OS does not report drops.
    pub drops: Option<UdpDrops>,
    /// Bytes each buffer can hold, as granted (at most what was asked).
    pub recv_buffer: usize,
    pub send_buffer: usize,
}

/// Binds the UDP socket with socket buffers sized for bursts (README.md, "UDP buffers"); logs
/// what the kernel granted when it is less than asked.
pub fn bind(settings: &UdpSettings) -> io::Result<BoundUdp> {
    bind_one(settings, settings.bind, false)
}

/// `count` sockets on one port with `SO_REUSEPORT`, one per endpoint loop (`--wt-loops`): Linux
/// hands each datagram to one of them by a hash of its source and destination, so a client's
/// packets reach the same socket while its address stays. The first binds `settings.bind` (port 0:
/// a free one), the others its port. One socket is bound as `bind` binds it, without the option.
pub fn bind_group(settings: &UdpSettings, count: usize) -> io::Result<Vec<BoundUdp>> {
    if count <= 1 {
        return Ok(vec![bind(settings)?]);
    }
    let first = bind_one(settings, settings.bind, true)?;
    let addr = first.socket.local_addr()?;
    let mut group = vec![first];
    for _ in 1..count {
        group.push(bind_one(settings, addr, true)?);
    }
    Ok(group)
}

fn bind_one(settings: &UdpSettings, addr: SocketAddr, reuse_port: bool) -> io::Result<BoundUdp> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Linux alone spreads a group's unicast datagrams over its sockets.
    #[cfg(target_os = "linux")]
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    #[cfg(not(target_os = "linux"))]
    if reuse_port {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "several WebTransport loops (--wt-loops) need Linux's SO_REUSEPORT",
        ));
    }
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    if let Err(error) = socket.set_recv_buffer_size(settings.recv_buffer) {
        warn!(%error, "cannot set the UDP receive buffer size");
    }
    if let Err(error) = socket.set_send_buffer_size(settings.send_buffer) {
        warn!(%error, "cannot set the UDP send buffer size");
    }
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("binding WebTransport UDP socket on {addr}: {e}")))?;
    let granted_recv = usable_buffer(socket.recv_buffer_size().unwrap_or(0));
    let granted_send = usable_buffer(socket.send_buffer_size().unwrap_or(0));
    if granted_recv < settings.recv_buffer || granted_send < settings.send_buffer {
        info!(
            requested_recv = settings.recv_buffer,
            granted_recv,
            requested_send = settings.send_buffer,
            granted_send,
            "UDP socket buffers are capped by the kernel (raise net.core.rmem_max and wmem_max)"
        );
    }
    let drops = socket_inode(&socket).map(|inode| UdpDrops { inodes: vec![inode] });
    Ok(BoundUdp {
        socket: socket.into(),
        drops,
        recv_buffer: granted_recv,
        send_buffer: granted_send,
    })
}

/// The buffer a socket can fill, from what the kernel reports: Linux reports twice the size it
/// granted (the other half is its bookkeeping), so an 8 MiB request capped by a 4 MiB
/// `net.core.rmem_max` reads back as 8 MiB.
fn usable_buffer(reported: usize) -> usize {
    if cfg!(target_os = "linux") {
        reported / 2
    } else {
        reported
    }
}

#[cfg(unix)]
fn socket_inode(socket: &socket2::Socket) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", socket.as_raw_fd())).ok()?;
    let link = link.to_str()?;
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

#[cfg(not(unix))]
fn socket_inode(_: &socket2::Socket) -> Option<u64> {
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_bound_socket_reports_its_drop_count() {
        let settings = UdpSettings {
            bind: "127.0.0.1:0".parse().expect("addr"),
            recv_buffer: 1 << 16,
            send_buffer: 1 << 16,
        };
        let bound = bind(&settings).expect("bind");
        assert_eq!(bound.drops.and_then(|d| d.count()), Some(0));
    }

    #[test]
    fn a_buffer_capped_by_the_kernel_reads_back_as_what_it_can_hold() {
        let max = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .expect("rmem_max");
        let settings = UdpSettings {
            bind: "127.0.0.1:0".parse().expect("addr"),
            recv_buffer: max * 2,
            send_buffer: 1 << 16,
        };
        let bound = bind(&settings).expect("bind");
        // Linux reports twice what it granted: read naively, a request of twice rmem_max
        // would look granted in full and go unlogged.
        assert_eq!(bound.recv_buffer, max);
        assert!(bound.recv_buffer < settings.recv_buffer);
    }
}
