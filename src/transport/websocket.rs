//! The WebSocket wire: HTTP hands it the upgraded socket (`/ws`); it reads JSON text frames and
//! writes many frames per `writev` (the fan-out writes into idle sockets directly). The
//! connection itself is run by `connection::drive`. With permessage-deflate negotiated, it
//! writes a publication's one shared compressed payload (`Publication::deflated_frame`) and
//! reads the client's compressed messages through `inflate`.

use std::collections::VecDeque;
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

use crate::config::{ServeConfig, WsCompression};
use crate::connection::{self, with_deadline, Close, DriverSettings, Ending, Inbound, Wire, WireError, CLOSE_WAIT};
use crate::core::{parse_command, ErrorCode, Outgoing, Publication, ServerControl};
use crate::gate::WakeGate;
use crate::hub::{Direct, DirectWrite};
use crate::listener::LimitedStream;
use crate::metrics::Transport;
use crate::node::Node;
use crate::shutdown::ShutdownListener;

pub use courtside_codecs::websocket_inflate as inflate;

/// The most a client's compressed message may inflate to (and its compressed frames may hold):
/// 64 KiB, as a WebTransport control-stream message, or `--ws-max-message` when smaller.
/// Commands are small (a JWT is at most 8 KiB); with the full message limit, a kilobyte of
/// compressed bytes would cost the server a mebibyte of inflating and parsing.
pub const MAX_INFLATED_MESSAGE: usize = 64 << 10;

use inflate::{CompressedFrames, InflateRefusal};

/// Bytes read from a socket at a time (tungstenite's default is 128 KiB). tungstenite zeroes
/// this much on every read attempt, and a connection attempts a read on every wake-up; it is
/// allocated for the connection's whole life. Clients send commands of 30 to 100 bytes (a
/// token in `auth` takes a few reads; a frame larger than this grows the buffer as it arrives).
const READ_BUFFER: usize = 256;

/// tungstenite's own write buffer: it only writes control frames (pong, close) now, the
/// connection's messages go through `SharedSocket`.
const WRITE_BUFFER: usize = 64 * 1024;

/// WebSocket settings, built from the configuration.
#[derive(Debug, Clone)]
pub struct WebSocketSettings {
    /// Largest client frame or message; larger closes with 1009. With permessage-deflate, the
    /// limit of a compressed message's frames and of what they inflate to.
    pub max_message: usize,
    /// permessage-deflate is negotiated with clients that offer it, and messages of at least
    /// this many bytes go compressed to them (`None`: `--ws-compression off`).
    pub compress_threshold: Option<usize>,
    /// What the driver runs each connection with (ping, idle and write timeouts, the drain,
    /// session limits), shared by every connection rather than copied into each.
    pub driver: Arc<DriverSettings>,
}

impl WebSocketSettings {
    pub fn from_config(config: &ServeConfig) -> Self {
        Self {
            max_message: config.websocket.ws_max_message,
            compress_threshold: (config.websocket.ws_compression == WsCompression::On)
                .then_some(config.websocket.ws_compress_threshold),
            driver: Arc::new(DriverSettings::from_config(config)),
        }
    }
}

type Stream = WebSocketStream<ClientBytes>;

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
    /// This connection negotiated permessage-deflate: publications of at least this many bytes
    /// go as their shared compressed payload.
    deflate_from: Option<usize>,
}

/// One text frame to write: its payload, and whether that is compressed (RSV1).
#[derive(Debug, Clone, Copy)]
struct TextFrame<'a> {
    payload: &'a [u8],
    deflated: bool,
}

impl<'a> TextFrame<'a> {
    fn plain(payload: &'a [u8]) -> Self {
        Self {
            payload,
            deflated: false,
        }
    }
}

impl SharedSocket {
    /// The frame `publication` goes as on this connection: its delta's when `as_delta` and it
    /// has one (docs/PROTOCOL.md, "Delta states"); its compressed payload if deflate was
    /// negotiated and the frame (for a delta: the whole state's frame) is at least the threshold
    /// (compressed once per publication, or per delta, for every subscriber), else its JSON.
    fn frame_of<'a>(&self, publication: &'a Publication, as_delta: bool) -> TextFrame<'a> {
        if let Some(delta) = as_delta.then(|| publication.delta()).flatten() {
            return match self.deflate_from.and_then(|threshold| delta.deflated_frame(threshold)) {
                Some(payload) => TextFrame {
                    payload,
                    deflated: true,
                },
                None => TextFrame::plain(delta.json_frame().as_bytes()),
            };
        }
        match self
            .deflate_from
            .and_then(|threshold| publication.deflated_frame(threshold))
        {
            Some(payload) => TextFrame {
                payload,
                deflated: true,
            },
            None => TextFrame::plain(publication.json_frame().as_bytes()),
        }
    }

    fn tcp(&self) -> &tokio::net::TcpStream {
        self.conn.tcp()
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, BytesMut> {
        self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes text frames of `payloads`, in order, behind whatever is pending: the socket takes
    /// what it can of them in one `writev`, the rest waits in `pending`. Stops taking frames once
    /// `pending` holds `PENDING_LIMIT` bytes; returns how many frames it took.
    fn write_text_frames(&self, payloads: &[TextFrame<'_>]) -> io::Result<usize> {
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
            let len = text_frame_header(payload.payload.len(), payload.deflated, &mut header);
            pending.extend_from_slice(&header[..len]);
            pending.extend_from_slice(payload.payload);
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
    fn writev_frames<const N: usize>(&self, pending: &mut BytesMut, payloads: &[TextFrame<'_>]) -> io::Result<usize> {
        debug_assert!(pending.is_empty());
        let frames = payloads.len().min(N);
        let payloads = &payloads[..frames];
        let mut headers = [([0u8; 10], 0usize); N];
        for ((header, len), frame) in headers.iter_mut().zip(payloads) {
            *len = text_frame_header(frame.payload.len(), frame.deflated, header);
        }
        let mut iov = [[io::IoSlice::new(&[]); 2]; N];
        for (slots, ((header, len), frame)) in iov.iter_mut().zip(headers.iter().zip(payloads)) {
            *slots = [io::IoSlice::new(&header[..*len]), io::IoSlice::new(frame.payload)];
        }
        let mut written = match self.tcp().try_write_vectored(iov[..frames].as_flattened()) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        let mut taken = 0;
        for ((header, len), frame) in headers.iter().zip(payloads) {
            if written == 0 {
                break;
            }
            let (header, payload) = (&header[..*len], frame.payload);
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
        // A slow client's backlog written: its storage is not kept for the connection's life.
        super::release_large(pending);
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

/// What tungstenite reads from and writes to: the shared socket, read through the inflating
/// filter when the connection negotiated permessage-deflate.
#[derive(Debug)]
struct ClientBytes {
    socket: SocketHandle,
    /// Boxed: a connection without deflate holds a pointer's worth, not the filter.
    inflate: Option<Box<Inflating>>,
}

/// The read side of a connection that negotiated permessage-deflate.
#[derive(Debug)]
struct Inflating {
    frames: CompressedFrames,
    /// Bytes the filter produced that tungstenite has not read yet.
    ready: VecDeque<Bytes>,
    /// The filter refused the client's bytes: every read fails with this.
    refused: Option<InflateRefusal>,
}

/// Bytes read from the socket at a time through the filter.
const FILTER_READ: usize = 4096;

impl AsyncRead for ClientBytes {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(inflating) = this.inflate.as_mut() else {
            return Pin::new(&mut this.socket).poll_read(cx, buf);
        };
        loop {
            if let Some(refusal) = &inflating.refused {
                return Poll::Ready(Err(io::Error::other(refusal.clone())));
            }
            if let Some(front) = inflating.ready.front_mut() {
                if front.is_empty() {
                    inflating.ready.pop_front();
                    continue;
                }
                let n = front.len().min(buf.remaining());
                buf.put_slice(&front[..n]);
                front.advance(n);
                if front.is_empty() {
                    inflating.ready.pop_front();
                }
                return Poll::Ready(Ok(()));
            }
            let mut raw = [0u8; FILTER_READ];
            let mut raw_buf = ReadBuf::new(&mut raw);
            std::task::ready!(Pin::new(&mut this.socket).poll_read(cx, &mut raw_buf))?;
            if raw_buf.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            inflating.refused = inflating.frames.feed(raw_buf.filled(), &mut inflating.ready).err();
        }
    }
}

impl AsyncWrite for ClientBytes {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_shutdown(cx)
    }
}

/// The connection must end because of what `inflate` refused, if that is why a read failed.
fn inflate_refusal(error: &io::Error) -> Option<&InflateRefusal> {
    error.get_ref()?.downcast_ref::<InflateRefusal>()
}

impl DirectWrite for SocketHandle {
    fn write_now(&self, publication: &Publication, as_delta: bool) -> Direct {
        let shared = &self.0;
        let Ok(mut pending) = shared.pending.try_lock() else {
            return Direct::NotNow;
        };
        if !pending.is_empty() {
            return Direct::NotNow;
        }
        match shared.writev_frames::<1>(&mut pending, &[shared.frame_of(publication, as_delta)]) {
            Ok(1) if pending.is_empty() => Direct::Written,
            Ok(1) => Direct::Partly,
            Ok(_) | Err(_) => Direct::NotNow,
        }
    }
}

/// Writes the header of an unmasked, final text frame (RFC 6455 §5.2) of `len` payload bytes
/// into `out`, with RSV1 set if the payload is compressed (RFC 7692 §6); returns its length.
fn text_frame_header(len: usize, deflated: bool, out: &mut [u8; 10]) -> usize {
    out[0] = if deflated { 0xc1 } else { 0x81 };
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

/// Starts a WebSocket connection that HTTP upgraded (`early`: bytes read past the handshake;
/// `deflate`: the handshake agreed on permessage-deflate), counted by `shutdown` from the
/// upgrade on; its own task runs it to its end.
pub async fn serve(
    conn: LimitedStream,
    early: Vec<u8>,
    deflate: bool,
    node: Node,
    settings: &WebSocketSettings,
    shutdown: ShutdownListener,
) {
    // tungstenite zeroes a read chunk of `read_buffer_size` on every read: its 128 KiB
    // default cost more CPU than the socket write itself (the bench's profile) and
    // 128 KiB of memory per connection. Clients send small commands.
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(Some(settings.max_message))
        .max_frame_size(Some(settings.max_message));
    let deflate_from = settings.compress_threshold.filter(|_| deflate);
    let socket = SocketHandle(Arc::new(SharedSocket {
        conn,
        pending: std::sync::Mutex::new(BytesMut::new()),
        deflate_from,
    }));
    let mut io = ClientBytes {
        socket: socket.clone(),
        inflate: deflate_from.map(|_| {
            Box::new(Inflating {
                frames: CompressedFrames::new(settings.max_message.min(MAX_INFLATED_MESSAGE)),
                ready: VecDeque::new(),
                refused: None,
            })
        }),
    };
    // Bytes read past the handshake go through the filter too; a refusal among them is
    // reported by the first read.
    let mut early = early;
    if let Some(inflating) = io.inflate.as_mut() {
        let mut ready = VecDeque::new();
        inflating.refused = inflating.frames.feed(&early, &mut ready).err();
        early = ready.iter().flat_map(|b| b.iter().copied()).collect();
    }
    let ws = if early.is_empty() {
        WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await
    } else {
        WebSocketStream::from_partially_read(io, early, Role::Server, Some(config)).await
    };
    start(ws, socket, node, settings, shutdown);
}

/// The WebSocket wire of one connection: tungstenite reads (and writes its own control
/// frames), the shared socket takes the batches.
struct WebSocketWire {
    ws: Stream,
    socket: SocketHandle,
    /// Lets a turn of the driver poll the socket only after it woke.
    read_gate: WakeGate,
    max_message: usize,
}

impl Wire for WebSocketWire {
    const TRANSPORT: Transport = Transport::WebSocket;

    fn poll_inbound(&mut self, cx: &mut Context<'_>) -> Poll<Inbound> {
        let ws = &mut self.ws;
        let incoming = std::task::ready!(self.read_gate.poll(cx, |cx| ws.poll_next_unpin(cx)));
        Poll::Ready(match incoming {
            None => Inbound::End(Ending::PeerGone),
            Some(Ok(Message::Text(text))) => Inbound::Command(parse_command(&text)),
            Some(Ok(Message::Binary(_))) => Inbound::Rejected(
                ErrorCode::UnsupportedFrame,
                "binary frames are not part of this protocol; send JSON text frames",
            ),
            Some(Ok(Message::Close(_))) => Inbound::End(Ending::PeerClosed),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Inbound::Heard,
            Some(Err(WsError::Capacity(_))) => Inbound::End(Ending::TooBig {
                limit: self.max_message,
            }),
            Some(Err(WsError::Io(error))) if inflate_refusal(&error).is_some() => match inflate_refusal(&error) {
                Some(InflateRefusal::TooBig(limit)) => Inbound::End(Ending::TooBig { limit: *limit }),
                _ => Inbound::End(Ending::Protocol(error.to_string())),
            },
            Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_))) => {
                Inbound::End(Ending::PeerGone)
            }
            Some(Err(error)) => Inbound::End(Ending::Protocol(error.to_string())),
        })
    }

    /// Frames go straight into the shared socket (as the fan-out's direct writes do), not
    /// through tungstenite: no copy of the payload, one `writev` per batch.
    async fn write_batch(&mut self, batch: &[Outgoing], write_timeout: Duration) -> Result<(), WireError> {
        // Publications carry their encoded frame; replies are encoded here (rarely any).
        let controls: Vec<String> = batch
            .iter()
            .filter_map(|item| match item {
                Outgoing::Control(c) => Some(c.to_json()),
                Outgoing::Publication(_) | Outgoing::Delta(_) => None,
            })
            .collect();
        let mut control_texts = controls.iter();
        // Replies go plain: they are far below any useful threshold.
        let socket = &self.socket.0;
        let payloads: Vec<TextFrame<'_>> = batch
            .iter()
            .filter_map(|item| match item {
                Outgoing::Publication(p) => Some(socket.frame_of(p, false)),
                Outgoing::Delta(p) => Some(socket.frame_of(p, true)),
                Outgoing::Control(_) => control_texts.next().map(|t| TextFrame::plain(t.as_bytes())),
            })
            .collect();
        let mut done = 0;
        while done < payloads.len() {
            done += self
                .socket
                .0
                .write_text_frames(&payloads[done..])
                .map_err(|e| WireError::Failed(e.to_string()))?;
            if done < payloads.len() {
                // The connection's buffer is full: wait for the socket before taking more.
                with_deadline(write_timeout, self.ws.flush()).await?;
            }
        }
        Ok(())
    }

    async fn flush(&mut self, write_timeout: Duration) -> Result<(), WireError> {
        with_deadline(write_timeout, self.ws.flush()).await
    }

    async fn ping(&mut self, write_timeout: Duration) -> Result<(), WireError> {
        match timeout(write_timeout, self.ws.send(Message::Ping(Bytes::new()))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(WireError::Failed(error.to_string())),
            Err(_) => Err(WireError::Timeout),
        }
    }

    async fn answer_close(&mut self) {
        // tungstenite queued the close reply; write it out.
        let _ = timeout(CLOSE_WAIT, self.ws.flush()).await;
    }

    async fn close(&mut self, close: Close<'_>) -> bool {
        if close.reconnect {
            let notice = Message::Text(ServerControl::Reconnect { reason: "shutdown" }.to_json().into());
            if !matches!(timeout(CLOSE_WAIT, self.ws.send(notice)).await, Ok(Ok(()))) {
                return false;
            }
        }
        if close.discard_input {
            let frame = close_frame(close.code, close.reason);
            let sent = timeout(close.limit, self.ws.close(Some(frame))).await;
            if matches!(sent, Ok(Ok(()))) {
                discard_input(&mut self.ws.get_mut().socket, 2 * self.max_message + 4096, close.limit).await;
            }
            return false;
        }
        close_and_wait(&mut self.ws, close.code, close.reason, close.limit).await
    }
}

/// Starts the connection's task, which runs it to its end.
fn start(ws: Stream, socket: SocketHandle, node: Node, settings: &WebSocketSettings, shutdown: ShutdownListener) {
    let subscriber = node.hub.new_subscriber(Transport::WebSocket);
    subscriber.enable_direct(Box::new(socket.clone()));
    let wire = WebSocketWire {
        ws,
        socket,
        read_gate: WakeGate::default(),
        max_message: settings.max_message,
    };
    connection::start(wire, subscriber, node, settings.driver.clone(), shutdown);
}

fn close_frame(code: u16, reason: &str) -> CloseFrame {
    CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_string().into(),
    }
}

/// Sends a close frame and waits (at most `limit`) for the client's, then lets the socket go.
/// Returns whether the client closed in time.
async fn close_and_wait(ws: &mut Stream, code: u16, reason: &str, limit: Duration) -> bool {
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
            let n = text_frame_header(len, false, &mut h);
            h[..n].to_vec()
        };
        assert_eq!(header(5), [0x81, 0x05]);
        assert_eq!(header(125), [0x81, 125]);
        assert_eq!(header(126), [0x81, 126, 0x00, 126]);
        assert_eq!(header(256), [0x81, 126, 0x01, 0x00]);
        assert_eq!(header(65535), [0x81, 126, 0xff, 0xff]);
        assert_eq!(header(65536), [0x81, 127, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00]);
        let mut h = [0u8; 10];
        assert_eq!(text_frame_header(82, true, &mut h), 2);
        assert_eq!(
            h[..2],
            [0xc1, 82],
            "RSV1 for a compressed payload (PROTOCOL.md's vector)"
        );
    }
}
