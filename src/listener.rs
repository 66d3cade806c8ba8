//! The TCP listener for HTTP and WebSocket: binding with a deep backlog, and the stream type that
//! carries a connection-limit permit from accept through any upgrade until the socket closes.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::admission::{ConnectionPermit, IpPermit};

/// Connections waiting to be accepted, at most (the kernel caps it at net.core.somaxconn). The
/// default of 1,024 overflowed when thousands of clients reconnected at once, and each dropped
/// SYN cost its client a one-second retransmit.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Binds the HTTP and WebSocket listener with `LISTEN_BACKLOG`.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

/// The TCP peer of a request (a load balancer, or the client itself).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// In a request's extensions when its connection holds a place in the HTTP reserve
/// (`admission::HTTP_RESERVE`): no upgrade.
#[derive(Debug, Clone, Copy)]
pub struct OverLimit;

/// A TCP stream that holds a connection-limit permit until it closes, through any upgrade.
#[derive(Debug)]
pub struct LimitedStream {
    stream: TcpStream,
    _permit: ConnectionPermit,
    /// A WebSocket's count against its client address, from the upgrade on.
    ip_permit: Option<IpPermit>,
}

impl LimitedStream {
    pub fn new(stream: TcpStream, permit: ConnectionPermit) -> Self {
        Self {
            stream,
            _permit: permit,
            ip_permit: None,
        }
    }

    /// Holds `permit` until the stream closes.
    pub fn hold(&mut self, permit: IpPermit) {
        self.ip_permit = Some(permit);
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.stream
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
