//! The WebSocket transport: HTTP hands it the upgraded socket (`/ws`), and one task per
//! connection reads JSON commands into its `Session` and writes its queue out, many frames per write.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info};

use crate::config::ServeConfig;
use crate::core::{close_code, parse_command, ErrorCode, Outgoing, Publication, QueueClosed, ServerControl};
use crate::gate::WakeGate;
use crate::hub::{Direct, DirectWrite};
use crate::listener::LimitedStream;
use crate::metrics::{Metrics, Transport};
use crate::node::Node;
use crate::session::{Session, SessionLimits};
use crate::shutdown::ShutdownListener;

/// Messages written per socket write at most; the rest wait for the next round.
const MAX_BATCH: usize = 256;

/// Bytes read from a socket at a time (tungstenite's default is 128 KiB). tungstenite zeroes
/// this much on every read attempt, and a connection attempts a read on every wake-up.
const READ_BUFFER: usize = 1024;

/// tungstenite's own write buffer: it only writes control frames (pong, close) now, the
/// connection's messages go through `SharedSocket`.
const WRITE_BUFFER: usize = 64 * 1024;

/// How long a closing connection waits for the client's close frame, at most.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// WebSocket settings, built from the configuration.
#[derive(Debug, Clone)]
pub struct WebSocketSettings {
    pub max_message: usize,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    pub drain_timeout: Duration,
    pub session: SessionLimits,
}

impl WebSocketSettings {
    pub fn from_config(config: &ServeConfig) -> Self {
        Self {
            max_message: config.websocket.ws_max_message,
            ping_interval: config.websocket.ping_interval,
            idle_timeout: config.websocket.idle_timeout,
            write_timeout: config.websocket.write_timeout,
            drain_timeout: config.http.drain_timeout,
            session: SessionLimits::from_config(config),
        }
    }
}

type Stream = WebSocketStream<SocketHandle>;

/// Bytes a connection may hold unwritten in its own buffer before writes wait for the socket.
const PENDING_LIMIT: usize = 64 * 1024;

/// Frames per `writev` at most (two slices each, built on the stack: no allocation per write).
const MAX_FRAMES_PER_WRITEV: usize = 64;

/// A WebSocket connection's socket, shared by its task (its batches, and through tungstenite its
/// reads and control frames) and the fan-out (direct writes of publications while the
/// connection's queue is idle). Every write goes through `pending` under one lock and whole
/// frames at a time, so the writers never interleave inside a frame; what the socket does not
/// take waits in `pending`.
#[derive(Debug)]
struct SharedSocket {
    conn: LimitedStream,
    pending: std::sync::Mutex<BytesMut>,
}

impl SharedSocket {
    fn tcp(&self) -> &tokio::net::TcpStream {
        self.conn.tcp()
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, BytesMut> {
        self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes text frames of `payloads`, in order, behind whatever is pending: the socket takes
    /// what it can of them in one `writev`, the rest waits in `pending`. Stops taking frames once
    /// `pending` holds `PENDING_LIMIT` bytes; returns how many frames it took.
    fn write_text_frames(&self, payloads: &[&[u8]]) -> io::Result<usize> {
        let mut pending = self.lock_pending();
        let mut taken = 0;
        while pending.is_empty() && taken < payloads.len() {
            match self.writev_frames::<MAX_FRAMES_PER_WRITEV>(&mut pending, &payloads[taken..])? {
                0 => break,
                n => taken += n,
            }
        }
        for payload in &payloads[taken..] {
            if pending.len() >= PENDING_LIMIT {
                break;
            }
            let mut header = [0u8; 10];
            let len = text_frame_header(payload.len(), &mut header);
            pending.extend_from_slice(&header[..len]);
            pending.extend_from_slice(payload);
            taken += 1;
        }
        Ok(taken)
    }

    /// Writes text frames of up to `N` of `payloads` into the socket in one `writev` (each header
    /// beside its shared payload, nothing copied), with `pending` empty. A frame the socket took
    /// only part of is finished from `pending` (whole frames only, so no other write lands inside
    /// one). Returns how many frames it took, that one included; frames it did not touch are left.
    /// `N` sizes the arrays on the stack: 1 for the fan-out's single frame, which then sets up
    /// no more than it writes.
    fn writev_frames<const N: usize>(&self, pending: &mut BytesMut, payloads: &[&[u8]]) -> io::Result<usize> {
        debug_assert!(pending.is_empty());
        let frames = payloads.len().min(N);
        let payloads = &payloads[..frames];
        let mut headers = [([0u8; 10], 0usize); N];
        for ((header, len), payload) in headers.iter_mut().zip(payloads) {
            *len = text_frame_header(payload.len(), header);
        }
        let mut iov = [[io::IoSlice::new(&[]); 2]; N];
        for (slots, ((header, len), payload)) in iov.iter_mut().zip(headers.iter().zip(payloads)) {
            *slots = [io::IoSlice::new(&header[..*len]), io::IoSlice::new(payload)];
        }
        let mut written = match self.tcp().try_write_vectored(iov[..frames].as_flattened()) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        let mut taken = 0;
        for ((header, len), payload) in headers.iter().zip(payloads) {
            if written == 0 {
                break;
            }
            let header = &header[..*len];
            taken += 1;
            if written >= header.len() + payload.len() {
                written -= header.len() + payload.len();
                continue;
            }
            if written < header.len() {
                pending.extend_from_slice(&header[written..]);
                pending.extend_from_slice(payload);
            } else {
                pending.extend_from_slice(&payload[written - header.len()..]);
            }
            break;
        }
        Ok(taken)
    }

    /// Writes what is pending; ready when nothing is left (or the socket failed).
    fn poll_drain(&self, pending: &mut BytesMut, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !pending.is_empty() {
            std::task::ready!(self.tcp().poll_write_ready(cx))?;
            match self.tcp().try_write(pending) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => pending.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The handle tungstenite reads and writes through, and the fan-out's direct writer.
#[derive(Debug, Clone)]
struct SocketHandle(Arc<SharedSocket>);

impl AsyncRead for SocketHandle {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let tcp = self.0.tcp();
        loop {
            std::task::ready!(tcp.poll_read_ready(cx))?;
            match tcp.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SocketHandle {
    /// Takes all of `buf` (into `pending` what the socket does not take now), unless `pending`
    /// is already full: then it waits for the socket.
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let shared = &self.0;
        let mut pending = shared.lock_pending();
        if !pending.is_empty() {
            if let Poll::Ready(Err(e)) = shared.poll_drain(&mut pending, cx) {
                return Poll::Ready(Err(e));
            }
            if pending.len() >= PENDING_LIMIT {
                return Poll::Pending;
            }
        }
        if pending.is_empty() {
            match shared.tcp().try_write(buf) {
                Ok(n) => pending.extend_from_slice(&buf[n..]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => pending.extend_from_slice(buf),
                Err(e) => return Poll::Ready(Err(e)),
            }
        } else {
            pending.extend_from_slice(buf);
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shared = &self.0;
        let mut pending = shared.lock_pending();
        shared.poll_drain(&mut pending, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.as_mut().poll_flush(cx))?;
        Poll::Ready(socket2::SockRef::from(self.0.tcp()).shutdown(std::net::Shutdown::Write))
    }
}

impl DirectWrite for SocketHandle {
    fn write_now(&self, publication: &Publication) -> Direct {
        let shared = &self.0;
        let Ok(mut pending) = shared.pending.try_lock() else {
            return Direct::NotNow;
        };
        if !pending.is_empty() {
            return Direct::NotNow;
        }
        match shared.writev_frames::<1>(&mut pending, &[publication.json_frame().as_bytes()]) {
            Ok(1) if pending.is_empty() => Direct::Written,
            Ok(1) => Direct::Partly,
            Ok(_) | Err(_) => Direct::NotNow,
        }
    }
}

/// Writes the header of an unmasked, final text frame (RFC 6455 §5.2) of `len` payload bytes
/// into `out`; returns its length.
fn text_frame_header(len: usize, out: &mut [u8; 10]) -> usize {
    out[0] = 0x81;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= usize::from(u16::MAX) {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// Runs a WebSocket connection that HTTP upgraded (`early`: bytes read past the handshake).
pub async fn serve(conn: LimitedStream, early: Vec<u8>, node: Node, settings: &WebSocketSettings) {
    // tungstenite zeroes a read chunk of `read_buffer_size` on every read: its 128 KiB
    // default cost more CPU than the socket write itself (the bench's profile) and
    // 128 KiB of memory per connection. Clients send small commands.
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(Some(settings.max_message))
        .max_frame_size(Some(settings.max_message));
    let socket = SocketHandle(Arc::new(SharedSocket {
        conn,
        pending: std::sync::Mutex::new(BytesMut::new()),
    }));
    let ws = if early.is_empty() {
        WebSocketStream::from_raw_socket(socket.clone(), Role::Server, Some(config)).await
    } else {
        WebSocketStream::from_partially_read(socket.clone(), early, Role::Server, Some(config)).await
    };
    let listener = node.shutdown_listener();
    run(ws, socket, node, settings, listener).await;
}

/// Why a connection's loop ended; decides how it is closed.
#[derive(Debug)]
enum Ending {
    /// The client sent a close frame.
    PeerClosed,
    /// The socket ended without a close frame.
    PeerGone,
    Shutdown,
    Slow,
    Idle,
    TooBig,
    Protocol(WsError),
    WriteFailed,
}

/// Runs one WebSocket connection to its end.
async fn run(
    mut ws: Stream,
    socket: SocketHandle,
    node: Node,
    settings: &WebSocketSettings,
    mut shutdown: ShutdownListener,
) {
    let metrics = node.metrics.clone();
    metrics.websocket.connections.inc();
    let subscriber = node.hub.new_subscriber(Transport::WebSocket);
    let writer = socket.clone();
    subscriber.enable_direct(Box::new(socket));
    let conn = subscriber.id();
    debug!(conn, "websocket connected");
    let mut session = Session::new(
        node.hub.clone(),
        node.registry.clone(),
        subscriber.clone(),
        settings.session,
        node.admission.command_budget(crate::clock::unix_ms()),
        node.draining.clone(),
    );
    // Grows to the largest batch this connection has needed: idle fans never pay for MAX_BATCH.
    let mut batch = Vec::new();
    let mut ping = tokio::time::interval_at(Instant::now() + settings.ping_interval, settings.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    // Made once, not on every turn of the loop, and polled through gates: a turn polls only
    // the branches that woke (the shutdown notice's poll takes a lock, the socket's a few more).
    let shutdown_notice = shutdown.recv();
    tokio::pin!(shutdown_notice);
    let [shutdown_gate, read_gate] = <[WakeGate; 2]>::default();

    let ending = loop {
        tokio::select! {
            biased;
            _ = shutdown_gate.future(shutdown_notice.as_mut()) => break Ending::Shutdown,
            _ = subscriber.wait() => {
                match write_queue(&mut ws, &writer, &session, &mut batch, &metrics, settings.write_timeout).await {
                    Ok(None) => {}
                    Ok(Some(QueueClosed::Slow)) => break Ending::Slow,
                    Ok(Some(QueueClosed::Gone)) => break Ending::Shutdown,
                    Err(()) => break Ending::WriteFailed,
                }
            }
            incoming = std::future::poll_fn(|cx| read_gate.poll(cx, |cx| ws.poll_next_unpin(cx))) => {
                let message = match incoming {
                    None => break Ending::PeerGone,
                    Some(Ok(message)) => message,
                    Some(Err(WsError::Capacity(_))) => break Ending::TooBig,
                    Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_))) => break Ending::PeerGone,
                    Some(Err(error)) => break Ending::Protocol(error),
                };
                last_heard = Instant::now();
                match message {
                    Message::Text(text) => {
                        metrics.websocket.client_messages.inc();
                        session.handle(parse_command(&text), crate::clock::unix_ms());
                    }
                    Message::Binary(_) => {
                        metrics.websocket.client_messages.inc();
                        session.reject(ErrorCode::UnsupportedFrame, "binary frames are not part of this protocol; send JSON text frames");
                    }
                    Message::Close(_) => break Ending::PeerClosed,
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() >= settings.idle_timeout {
                    break Ending::Idle;
                }
                if !matches!(timeout(settings.write_timeout, ws.send(Message::Ping(Bytes::new()))).await, Ok(Ok(()))) {
                    break Ending::WriteFailed;
                }
            }
        }
    };

    // From here on the task writes its own last frames (a close frame must be the last).
    subscriber.stop_direct();
    debug!(conn, ?ending, "websocket closing");
    match ending {
        Ending::PeerClosed => {
            // tungstenite queued the close reply; write it out.
            let _ = timeout(CLOSE_WAIT, ws.flush()).await;
        }
        Ending::PeerGone | Ending::WriteFailed => {}
        Ending::Shutdown => {
            // Deliver what was accepted, then tell the client to reconnect elsewhere.
            let _ = write_queue(&mut ws, &writer, &session, &mut batch, &metrics, CLOSE_WAIT).await;
            let notice = Message::Text(ServerControl::Reconnect { reason: "shutdown" }.to_json().into());
            let replied = matches!(timeout(CLOSE_WAIT, ws.send(notice)).await, Ok(Ok(())))
                && close(
                    &mut ws,
                    close_code::SERVICE_RESTART,
                    "server shutting down; reconnect",
                    settings.drain_timeout,
                )
                .await;
            if !replied {
                node.shutdown.abandoned_one();
            }
        }
        Ending::Slow => {
            info!(conn, "closing slow websocket client (4001)");
            close(
                &mut ws,
                close_code::SLOW,
                "slow consumer; reconnect with since",
                settings.write_timeout,
            )
            .await;
        }
        Ending::Idle => {
            metrics.close_error(close_code::IDLE_TIMEOUT, "idle_timeout");
            close(&mut ws, close_code::IDLE_TIMEOUT, "idle timeout", CLOSE_WAIT).await;
        }
        Ending::TooBig => {
            metrics.close_error(close_code::MESSAGE_TOO_BIG, "message_too_big");
            let reason = format!("message larger than {} bytes", settings.max_message);
            let sent = timeout(
                CLOSE_WAIT,
                ws.close(Some(close_frame(close_code::MESSAGE_TOO_BIG, &reason))),
            )
            .await;
            if matches!(sent, Ok(Ok(()))) {
                // The rest of the oversized frame is still arriving: read and discard it, so the
                // close frame reaches the client instead of being lost to a TCP reset.
                discard_input(ws.get_mut(), 2 * settings.max_message + 4096, CLOSE_WAIT).await;
            }
        }
        Ending::Protocol(error) => {
            debug!(conn, %error, "websocket protocol error");
            metrics.close_error(close_code::PROTOCOL_ERROR, "protocol_error");
            close(&mut ws, close_code::PROTOCOL_ERROR, "protocol error", CLOSE_WAIT).await;
        }
    }
    drop(session);
    let dropped = subscriber.close(QueueClosed::Gone);
    if dropped > 0 {
        metrics.dropped.inc_by(dropped as u64);
    }
    metrics.websocket.connections.dec();
    debug!(conn, dropped, "websocket closed");
}

/// Writes everything queued, up to `MAX_BATCH` messages per socket write. Reports a closed
/// queue. Frames go straight into the shared socket (as the fan-out's direct writes do), not
/// through tungstenite: no copy of the payload, one `writev` per batch. tungstenite still owns
/// the reading side and writes its own control frames (pong, close) through the same socket.
async fn write_queue(
    ws: &mut Stream,
    writer: &SocketHandle,
    session: &Session,
    batch: &mut Vec<Outgoing>,
    metrics: &Metrics,
    write_timeout: Duration,
) -> Result<Option<QueueClosed>, ()> {
    let subscriber = session.subscriber();
    loop {
        batch.clear();
        let closed = subscriber.drain_into(batch, MAX_BATCH);
        if !batch.is_empty() {
            // Publications carry their encoded frame; replies are encoded here (rarely any).
            let controls: Vec<String> = batch
                .iter()
                .filter_map(|item| match item {
                    Outgoing::Control(c) => Some(c.to_json()),
                    Outgoing::Publication(_) => None,
                })
                .collect();
            let mut control_texts = controls.iter();
            let payloads: Vec<&[u8]> = batch
                .iter()
                .filter_map(|item| match item {
                    Outgoing::Publication(p) => Some(p.json_frame().as_bytes()),
                    Outgoing::Control(_) => control_texts.next().map(|t| t.as_bytes()),
                })
                .collect();
            let mut done = 0;
            while done < payloads.len() {
                done += writer.0.write_text_frames(&payloads[done..]).map_err(|_| ())?;
                if done < payloads.len() {
                    // The connection's buffer is full: wait for the socket before taking more.
                    with_deadline(write_timeout, ws.flush()).await?;
                }
            }
            metrics.record_deliveries(Transport::WebSocket, batch);
        }
        // What the socket did not take yet (or the rest of a frame the fan-out wrote directly)
        // waits in the connection's buffer: write it out. Done at once when it is empty.
        with_deadline(write_timeout, ws.flush()).await?;
        if batch.is_empty() || closed.is_some() {
            return Ok(closed);
        }
    }
}

/// Runs `work` to its end within `limit`. A write into a socket with room completes on its
/// first poll; only a write that has to wait arms a timer (a timer per delivery cost measurable
/// CPU at 10,000 subscribers).
async fn with_deadline<T, E>(limit: Duration, work: impl std::future::Future<Output = Result<T, E>>) -> Result<T, ()> {
    let mut work = std::pin::pin!(work);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(work.as_mut().poll(cx))).await;
    match first {
        std::task::Poll::Ready(result) => result.map_err(|_| ()),
        std::task::Poll::Pending => match timeout(limit, work).await {
            Ok(result) => result.map_err(|_| ()),
            Err(_) => Err(()),
        },
    }
}

fn close_frame(code: u16, reason: &str) -> CloseFrame {
    CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_string().into(),
    }
}

/// Sends a close frame and waits (at most `limit`) for the client's, then lets the socket go.
/// Returns whether the client closed in time.
async fn close(ws: &mut Stream, code: u16, reason: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let sent = tokio::time::timeout_at(deadline, ws.close(Some(close_frame(code, reason)))).await;
    if !matches!(sent, Ok(Ok(()))) {
        return false;
    }
    let replied = tokio::time::timeout_at(deadline, async {
        loop {
            match ws.next().await {
                Some(Ok(message)) if !message.is_close() => continue,
                _ => return,
            }
        }
    })
    .await;
    replied.is_ok()
}

async fn discard_input(io: &mut SocketHandle, max_bytes: usize, limit: Duration) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = max_bytes;
    let _ = timeout(limit, async {
        while left > 0 {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_frame_headers_follow_rfc_6455() {
        let header = |len: usize| {
            let mut h = [0u8; 10];
            let n = text_frame_header(len, &mut h);
            h[..n].to_vec()
        };
        assert_eq!(header(5), [0x81, 0x05]);
        assert_eq!(header(125), [0x81, 125]);
        assert_eq!(header(126), [0x81, 126, 0x00, 126]);
        assert_eq!(header(256), [0x81, 126, 0x01, 0x00]);
        assert_eq!(header(65535), [0x81, 126, 0xff, 0xff]);
        assert_eq!(header(65536), [0x81, 127, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00]);
    }
}
