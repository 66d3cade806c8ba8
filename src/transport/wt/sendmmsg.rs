//! Many UDP datagrams, to any destinations, in one `sendmmsg` system call: quinn-udp sends one
//! `sendmsg` per transmit (its GSO batches only one destination's packets), and a publish to N
//! sessions is N packets to N destinations. The only unsafe code of the WebTransport engine:
//! the call and the control messages (ECN, source address) that quinn-udp would have set.
#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

/// Datagrams per system call at most.
pub const BATCH: usize = 32;

/// Room for the control messages of one datagram: the ECN codepoint (an `int`) and the
/// source address (`in6_pktinfo`, the larger of the two families'), each with its header.
const CONTROL: usize = 96;

/// One datagram to send.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    pub destination: SocketAddr,
    /// The ECN codepoint's bits (0 for none).
    pub ecn: u8,
    pub src_ip: Option<IpAddr>,
    pub contents: &'a [u8],
}

#[repr(C, align(8))]
struct Control([u8; CONTROL]);

/// Sends the first `min(datagrams.len(), BATCH)` datagrams in one `sendmmsg`; returns how many
/// the kernel took (at least one), or the error of the first (`WouldBlock` when the socket is
/// full; any other error belongs to `datagrams[0]` alone, and the caller moves past it).
pub fn send(socket: &impl AsRawFd, datagrams: &[Datagram<'_>]) -> io::Result<usize> {
    let count = datagrams.len().min(BATCH);
    if count == 0 {
        return Ok(0);
    }
    // SAFETY: these are plain C structs for which all-zero bytes are a valid value (null
    // pointers, zero lengths).
    let mut names: [libc::sockaddr_storage; BATCH] = unsafe { mem::zeroed() };
    let mut iovs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
    let mut controls: [Control; BATCH] = std::array::from_fn(|_| Control([0; CONTROL]));
    for (i, datagram) in datagrams.iter().take(count).enumerate() {
        let name_len = write_name(datagram.destination, &mut names[i]);
        iovs[i].iov_base = datagram.contents.as_ptr() as *mut libc::c_void;
        iovs[i].iov_len = datagram.contents.len();
        let hdr = &mut hdrs[i].msg_hdr;
        hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
        hdr.msg_namelen = name_len;
        hdr.msg_iov = &mut iovs[i];
        hdr.msg_iovlen = 1;
        hdr.msg_control = controls[i].0.as_mut_ptr().cast();
        hdr.msg_controllen = CONTROL as _;
        // SAFETY: `hdr` points at `controls[i]`, CONTROL bytes aligned for `cmsghdr`, which
        // holds both messages (asserted in the tests); `hdr` is not used by anything else meanwhile.
        unsafe { write_control(hdr, datagram) };
    }
    loop {
        // SAFETY: `hdrs[..count]` are valid `msghdr`s whose pointers (names, iovecs, control
        // buffers, and the datagrams' contents borrowed for this call) outlive the call; the
        // kernel only reads them, and writes each `msg_len`.
        let sent = unsafe { libc::sendmmsg(socket.as_raw_fd(), hdrs.as_mut_ptr(), count as libc::c_uint, 0) };
        if sent >= 0 {
            return Ok(sent as usize);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Writes `addr` into `storage` as the C socket address of its family; returns its length.
fn write_name(addr: SocketAddr, storage: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(addr) => {
            // SAFETY: all-zero bytes are a valid `sockaddr_in`.
            let mut sin: libc::sockaddr_in = unsafe { mem::zeroed() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = addr.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(addr.ip().octets()),
            };
            // SAFETY: `sockaddr_storage` is larger than `sockaddr_in` and aligned for it.
            unsafe { std::ptr::write((storage as *mut libc::sockaddr_storage).cast(), sin) };
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(addr) => {
            // SAFETY: all-zero bytes are a valid `sockaddr_in6`.
            let mut sin6: libc::sockaddr_in6 = unsafe { mem::zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = addr.port().to_be();
            sin6.sin6_flowinfo = addr.flowinfo();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: addr.ip().octets(),
            };
            sin6.sin6_scope_id = addr.scope_id();
            // SAFETY: `sockaddr_storage` is larger than `sockaddr_in6` and aligned for it.
            unsafe { std::ptr::write((storage as *mut libc::sockaddr_storage).cast(), sin6) };
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Writes the datagram's control messages as quinn-udp does: its ECN codepoint (`IP_TOS` for
/// an IPv4 or IPv4-mapped destination, else `IPV6_TCLASS`), and its source address when known
/// (`IP_PKTINFO`, `IPV6_PKTINFO`); sets `msg_controllen` to what they take.
///
/// # Safety
/// `hdr.msg_control` points at `hdr.msg_controllen` writable bytes aligned for `cmsghdr`, with
/// room for both messages.
unsafe fn write_control(hdr: &mut libc::msghdr, datagram: &Datagram<'_>) {
    let ipv4 = match datagram.destination.ip() {
        IpAddr::V4(_) => true,
        IpAddr::V6(ip) => ip.to_ipv4_mapped().is_some(),
    };
    let mut used = 0usize;
    let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
    let ecn = libc::c_int::from(datagram.ecn);
    if ipv4 {
        used += push(&mut cmsg, hdr, libc::IPPROTO_IP, libc::IP_TOS, ecn);
    } else {
        used += push(&mut cmsg, hdr, libc::IPPROTO_IPV6, libc::IPV6_TCLASS, ecn);
    }
    match datagram.src_ip {
        Some(IpAddr::V4(ip)) => {
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from_ne_bytes(ip.octets()),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            used += push(&mut cmsg, hdr, libc::IPPROTO_IP, libc::IP_PKTINFO, info);
        }
        Some(IpAddr::V6(ip)) => {
            let info = libc::in6_pktinfo {
                ipi6_ifindex: 0,
                ipi6_addr: libc::in6_addr { s6_addr: ip.octets() },
            };
            used += push(&mut cmsg, hdr, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, info);
        }
        None => {}
    }
    hdr.msg_controllen = used as _;
}

/// Writes one control message at `*cmsg` and moves `*cmsg` to the next; returns its space.
///
/// # Safety
/// `*cmsg` is null or a header within `hdr`'s control buffer with room for `value`.
unsafe fn push<T: Copy>(
    cmsg: &mut *mut libc::cmsghdr,
    hdr: &libc::msghdr,
    level: libc::c_int,
    kind: libc::c_int,
    value: T,
) -> usize {
    let space = libc::CMSG_SPACE(mem::size_of::<T>() as libc::c_uint) as usize;
    // A null header means no room left: `CONTROL` is sized for the two messages written, so
    // this does not happen; the message is then left out rather than written out of bounds.
    let Some(header) = cmsg.as_mut() else { return 0 };
    header.cmsg_level = level;
    header.cmsg_type = kind;
    header.cmsg_len = libc::CMSG_LEN(mem::size_of::<T>() as libc::c_uint) as _;
    std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<T>(), value);
    *cmsg = libc::CMSG_NXTHDR(hdr, header);
    space
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_buffer_holds_both_messages() {
        // SAFETY: CMSG_SPACE is a size computation.
        let needed = unsafe {
            libc::CMSG_SPACE(mem::size_of::<libc::c_int>() as libc::c_uint)
                + libc::CMSG_SPACE(mem::size_of::<libc::in6_pktinfo>() as libc::c_uint)
        } as usize;
        assert!(needed <= CONTROL, "{needed}");
        assert!(mem::align_of::<Control>() >= mem::align_of::<libc::cmsghdr>());
    }

    #[test]
    fn one_call_sends_to_several_destinations_with_their_own_contents() {
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let receivers: Vec<_> = (0..3)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let payloads: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 10 + usize::from(i)]).collect();
        let datagrams: Vec<Datagram<'_>> = receivers
            .iter()
            .zip(&payloads)
            .map(|(receiver, payload)| Datagram {
                destination: receiver.local_addr().expect("address"),
                ecn: 0b10,
                src_ip: Some("127.0.0.1".parse().expect("ip")),
                contents: payload,
            })
            .collect();
        assert_eq!(send(&sender, &datagrams).expect("sendmmsg"), 3);
        for (receiver, payload) in receivers.iter().zip(&payloads) {
            receiver
                .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .expect("timeout");
            let mut buf = [0u8; 64];
            let (len, from) = receiver.recv_from(&mut buf).expect("a datagram");
            assert_eq!(&buf[..len], &payload[..]);
            assert_eq!(from, sender.local_addr().expect("address"));
        }
    }
}
