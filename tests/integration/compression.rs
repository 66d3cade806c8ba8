//! permessage-deflate (RFC 7692) on WebSocket, read with a raw client of its own: the frames
//! are parsed here and inflated with flate2 directly, not with the server's code.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::{TestServer, HANG};

/// What the server answers to a browser's offer.
const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// Chromium's offer.
const BROWSER_OFFER: &str = "permessage-deflate; client_max_window_bits";

/// One frame from the server.
#[derive(Debug)]
struct Frame {
    rsv1: bool,
    opcode: u8,
    payload: Vec<u8>,
}

/// A WebSocket client on a bare TCP socket: the handshake by hand, frames parsed here.
struct RawClient {
    tcp: TcpStream,
    buf: Vec<u8>,
    /// The server's `Sec-WebSocket-Extensions`, if any.
    extensions: Option<String>,
}

impl RawClient {
    async fn connect(server: &TestServer, offer: Option<&str>) -> Self {
        Self::connect_sending(server, offer, &[]).await
    }

    /// `connect`, with `early` written in the same write as the handshake (bytes the server
    /// reads past it).
    async fn connect_sending(server: &TestServer, offer: Option<&str>, early: &[u8]) -> Self {
        let mut tcp = TcpStream::connect(server.http).await.expect("connect");
        let offer = offer
            .map(|o| format!("Sec-WebSocket-Extensions: {o}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n",
            server.http
        );
        let mut first = request.into_bytes();
        first.extend_from_slice(early);
        tcp.write_all(&first).await.expect("handshake");
        let mut client = Self {
            tcp,
            buf: Vec::new(),
            extensions: None,
        };
        let end = loop {
            if let Some(end) = client.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            client.fill().await;
        };
        let head = String::from_utf8(client.buf.drain(..end).collect()).expect("ascii head");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        client.extensions = head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-extensions")
                .then(|| value.trim().to_string())
        });
        client
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 16384];
        let n = tokio::time::timeout(HANG, self.tcp.read(&mut chunk))
            .await
            .expect("bytes in time")
            .expect("read");
        assert!(n > 0, "the server closed the socket");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    async fn need(&mut self, n: usize) {
        while self.buf.len() < n {
            self.fill().await;
        }
    }

    /// The next frame (server frames are unmasked and, from this server, never fragmented).
    async fn frame(&mut self) -> Frame {
        self.need(2).await;
        let (first, second) = (self.buf[0], self.buf[1]);
        assert_eq!(second & 0x80, 0, "server frames are unmasked");
        assert_ne!(first & 0x80, 0, "server frames are final");
        let (len, at) = match second & 0x7f {
            126 => {
                self.need(4).await;
                (usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])), 4)
            }
            127 => {
                self.need(10).await;
                let mut n = [0u8; 8];
                n.copy_from_slice(&self.buf[2..10]);
                (u64::from_be_bytes(n) as usize, 10)
            }
            n => (usize::from(n), 2),
        };
        self.need(at + len).await;
        let payload = self.buf[at..at + len].to_vec();
        self.buf.drain(..at + len);
        Frame {
            rsv1: first & 0x40 != 0,
            opcode: first & 0x0f,
            payload,
        }
    }

    /// The next text frame, skipping pings.
    async fn text_frame(&mut self) -> Frame {
        loop {
            let frame = self.frame().await;
            match frame.opcode {
                1 => return frame,
                9 | 10 => continue,
                other => panic!("expected a text frame, got opcode {other}: {frame:?}"),
            }
        }
    }

    /// The next message as JSON, whether it came compressed or not.
    async fn recv(&mut self) -> Value {
        let frame = self.text_frame().await;
        let text = if frame.rsv1 {
            inflate(&frame.payload)
        } else {
            frame.payload
        };
        serde_json::from_slice(&text).expect("JSON")
    }

    /// Sends one masked frame.
    async fn send_frame(&mut self, fin: bool, rsv1: bool, opcode: u8, payload: &[u8]) {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![(u8::from(fin) << 7) | (u8::from(rsv1) << 6) | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        // The server may close before taking all of it; what it answers is what counts.
        let _ = self.tcp.write_all(&out).await;
    }

    async fn subscribe(&mut self, room: &str) {
        let command = json!({"type": "subscribe", "room": room}).to_string();
        self.send_frame(true, false, 1, command.as_bytes()).await;
        let reply = self.recv().await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
    }

    /// The close code of the server's close frame, reading past anything before it.
    async fn close_code(&mut self) -> u16 {
        loop {
            let frame = self.frame().await;
            if frame.opcode == 8 {
                return u16::from_be_bytes([frame.payload[0], frame.payload[1]]);
            }
        }
    }
}

/// Inflates a permessage-deflate payload (RFC 7692 §7.2.2) with flate2 directly.
fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0x00, 0x00, 0xff, 0xff]);
    let mut inflate = Decompress::new(false);
    let mut out = Vec::with_capacity(input.len() * 20 + 1024);
    loop {
        let consumed = inflate.total_in() as usize;
        inflate
            .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
            .expect("inflates");
        if inflate.total_in() as usize == input.len() && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.capacity());
    }
}

/// Compresses a message as a client would (RFC 7692 §7.2.1), with flate2 directly.
fn deflate(message: &[u8]) -> Vec<u8> {
    let mut compress = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(message.len() + 64);
    loop {
        let consumed = compress.total_in() as usize;
        compress
            .compress_vec(&message[consumed..], &mut out, FlushCompress::Sync)
            .expect("deflates");
        if compress.total_in() as usize == message.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity());
    }
    assert!(out.ends_with(&[0x00, 0x00, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// A bracket-like state of several kilobytes.
fn bracket(round: u32) -> String {
    let matches: Vec<Value> = (0..64)
        .map(|m| {
            json!({"id": m, "round": 1 + m / 32, "status": if m < round { 4 } else { 2 },
                   "opponent1": {"id": m * 2, "score": m % 7, "result": "win"},
                   "opponent2": {"id": m * 2 + 1, "score": m % 5, "result": "loss"}})
        })
        .collect();
    json!({"stage": "Phoenix U12 Gold", "matches": matches}).to_string()
}

/// The frame the server sends for a state, up to its `ts`-dependent part: checks that `text` is
/// exactly the state frame of `data` (the published bytes, unchanged).
fn assert_state_frame(text: &[u8], room: &str, version: u64, data: &str) {
    let text = std::str::from_utf8(text).expect("UTF-8");
    let head = format!(r#"{{"type":"state","room":"{room}","version":{version},"ts":"#);
    assert!(text.starts_with(&head), "{text:.200}");
    assert!(text.ends_with(&format!(r#","data":{data}}}"#)), "{text:.200}");
}

/// A browser's offer is answered with no context takeover both ways; a multi-kilobyte state
/// arrives as one RSV1 frame that inflates to exactly the published frame (the same compressed
/// bytes for every deflate subscriber), a small one as it is, and a client that offered nothing
/// gets the same states plain.
#[tokio::test]
async fn large_states_go_compressed_to_clients_that_offer_deflate() {
    let server = TestServer::start(&[]);
    let mut a = RawClient::connect(&server, Some(BROWSER_OFFER)).await;
    let mut b = RawClient::connect(&server, Some("permessage-deflate")).await;
    let mut plain = RawClient::connect(&server, None).await;
    assert_eq!(a.extensions.as_deref(), Some(ANSWER));
    assert_eq!(b.extensions.as_deref(), Some(ANSWER));
    assert_eq!(plain.extensions, None);
    for client in [&mut a, &mut b, &mut plain] {
        client.subscribe("bracket:1").await;
    }

    let big = bracket(3);
    assert!(big.len() > 4096, "{}", big.len());
    server.publish_state("bracket:1", &big).await;
    let (fa, fb, fp) = (a.text_frame().await, b.text_frame().await, plain.text_frame().await);
    assert!(fa.rsv1 && fb.rsv1 && !fp.rsv1);
    assert_eq!(fa.payload, fb.payload, "one compressed payload for every subscriber");
    assert!(
        fa.payload.len() * 4 < fp.payload.len(),
        "{} against {}",
        fa.payload.len(),
        fp.payload.len()
    );
    assert_eq!(inflate(&fa.payload), fp.payload, "inflates to exactly the plain frame");
    assert_state_frame(&fp.payload, "bracket:1", 1, &big);

    let small = r#"{"home":42,"away":40,"clock":"Q4 1:02"}"#;
    server.publish_state("bracket:1", small).await;
    for client in [&mut a, &mut b, &mut plain] {
        let frame = client.text_frame().await;
        assert!(!frame.rsv1, "below the threshold: as it is");
        assert_state_frame(&frame.payload, "bracket:1", 2, small);
    }

    // Events one after another, so some wait in the queue rather than going straight to the
    // socket: every one arrives whole, the large ones compressed.
    for i in 0..20u32 {
        let data = if i % 2 == 0 {
            bracket(i)
        } else {
            format!("{{\"n\":{i}}}")
        };
        let (status, body) = server
            .request("POST", "/v1/rooms/bracket:1/events", Some(crate::util::TOKEN), data)
            .await;
        assert_eq!(status, 200, "{body}");
    }
    for i in 0..20u32 {
        let expected = if i % 2 == 0 {
            bracket(i)
        } else {
            format!("{{\"n\":{i}}}")
        };
        let (fa, fp) = (a.text_frame().await, plain.text_frame().await);
        assert_eq!(fa.rsv1, i % 2 == 0, "event {i}");
        let text = if fa.rsv1 {
            inflate(&fa.payload)
        } else {
            fa.payload.clone()
        };
        assert_eq!(text, fp.payload, "event {i}");
        let event: Value = serde_json::from_slice(&text).expect("JSON");
        assert_eq!(event["seq"], i + 1);
        assert!(std::str::from_utf8(&text)
            .expect("UTF-8")
            .ends_with(&format!(r#","data":{expected}}}"#)));
        assert_eq!(b.recv().await["seq"], i + 1);
    }
}

/// `--ws-compress-threshold` sets the size from which messages go compressed.
#[tokio::test]
async fn the_threshold_is_the_configured_one() {
    let server = TestServer::start(&["--ws-compress-threshold", "100"]);
    let mut client = RawClient::connect(&server, Some(BROWSER_OFFER)).await;
    client.subscribe("game:1").await;
    let long = format!(r#"{{"home":1,"away":2,"clock":"{}"}}"#, "Q".repeat(60));
    server.publish_state("game:1", &long).await;
    let frame = client.text_frame().await;
    assert!(frame.rsv1, "a {}-byte frame at threshold 100", 70 + long.len());
    assert_state_frame(&inflate(&frame.payload), "game:1", 1, &long);
    server.publish_state("game:1", "1").await;
    assert!(!client.text_frame().await.rsv1);
}

/// `--ws-compression off`: an offer is not answered, large states go plain, and a compressed
/// frame is a protocol error (1002) as for any client that did not negotiate it.
#[tokio::test]
async fn compression_off_never_negotiates() {
    let server = TestServer::start(&["--ws-compression", "off"]);
    let mut client = RawClient::connect(&server, Some(BROWSER_OFFER)).await;
    assert_eq!(client.extensions, None);
    client.subscribe("bracket:1").await;
    let big = bracket(1);
    server.publish_state("bracket:1", &big).await;
    let frame = client.text_frame().await;
    assert!(!frame.rsv1);
    assert_state_frame(&frame.payload, "bracket:1", 1, &big);

    let compressed = deflate(br#"{"type":"ping"}"#);
    client.send_frame(true, true, 1, &compressed).await;
    assert_eq!(client.close_code().await, 1002);
}

/// Compressed client frames are accepted: a subscribe in one frame, a ping in two (a control
/// frame between them), and plain frames beside them.
#[tokio::test]
async fn compressed_client_messages_are_accepted() {
    let server = TestServer::start(&[]);
    let mut client = RawClient::connect(&server, Some(BROWSER_OFFER)).await;
    assert_eq!(client.extensions.as_deref(), Some(ANSWER));
    let subscribe = deflate(
        json!({"type": "subscribe", "room": "game:7", "id": 3})
            .to_string()
            .as_bytes(),
    );
    client.send_frame(true, true, 1, &subscribe).await;
    let reply = client.recv().await;
    assert_eq!(
        (reply["type"].as_str(), reply["id"].as_u64()),
        (Some("subscribed"), Some(3)),
        "{reply}"
    );

    let ping = deflate(br#"{"type":"ping","pad":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#);
    let (first, rest) = ping.split_at(ping.len() / 2);
    client.send_frame(false, true, 1, first).await;
    client.send_frame(true, false, 9, b"hi").await;
    client.send_frame(true, false, 0, rest).await;
    let pong = loop {
        let frame = client.frame().await;
        if frame.opcode == 10 {
            assert_eq!(frame.payload, b"hi", "the ping between the fragments is answered");
            continue;
        }
        assert_eq!(frame.opcode, 1);
        break serde_json::from_slice::<Value>(&frame.payload).expect("JSON");
    };
    assert_eq!(pong["type"], "pong");

    client.send_frame(true, false, 1, br#"{"type":"ping"}"#).await;
    assert_eq!(client.recv().await["type"], "pong");
    server.publish_state("game:7", "7").await;
    assert_eq!(client.recv().await["version"], 1);

    // A compressed command in the handshake's own packet (read past the handshake) too.
    let mut early = vec![0xc1, 0x80 | subscribe.len() as u8, 0, 0, 0, 0];
    early.extend_from_slice(&subscribe);
    let mut eager = RawClient::connect_sending(&server, Some(BROWSER_OFFER), &early).await;
    assert_eq!(eager.extensions.as_deref(), Some(ANSWER));
    assert_eq!(eager.recv().await["id"], 3);
}

/// A small compressed frame that inflates past the message limit (a decompression bomb) closes
/// that connection with 1009; the others, compressed or not, carry on.
#[tokio::test]
async fn a_decompression_bomb_closes_with_1009() {
    let server = TestServer::start(&["--ws-max-message", "65536"]);
    let mut deflating = RawClient::connect(&server, Some(BROWSER_OFFER)).await;
    let mut plain = RawClient::connect(&server, None).await;
    deflating.subscribe("bracket:1").await;
    plain.subscribe("bracket:1").await;

    let mut bomber = RawClient::connect(&server, Some(BROWSER_OFFER)).await;
    let bomb = deflate(format!(r#"{{"type":"ping","pad":"{}"}}"#, " ".repeat(16 << 20)).as_bytes());
    assert!(bomb.len() < 65536 / 2, "a small frame: {} bytes", bomb.len());
    bomber.send_frame(true, true, 1, &bomb).await;
    assert_eq!(bomber.close_code().await, 1009);
    server
        .await_count("courtside_errors_total{code=\"1009\",name=\"message_too_big\"}", 1.0)
        .await;

    // Exactly at the limit, inflated, is accepted.
    let mut fits = RawClient::connect(&server, Some(BROWSER_OFFER)).await;
    let pad = 65536 - r#"{"type":"ping","pad":""}"#.len();
    let at_limit = deflate(format!(r#"{{"type":"ping","pad":"{}"}}"#, "z".repeat(pad)).as_bytes());
    fits.send_frame(true, true, 1, &at_limit).await;
    assert_eq!(fits.recv().await["type"], "pong");

    let big = bracket(9);
    server.publish_state("bracket:1", &big).await;
    assert_eq!(deflating.recv().await["version"], 1);
    assert_eq!(plain.recv().await["version"], 1);
}

/// With the default message limit (1 MiB), a compressed message may inflate to 64 KiB at most
/// (`MAX_INFLATED_MESSAGE`): one that inflates past it closes with 1009, while the same bytes
/// sent uncompressed are a message like any other.
#[tokio::test]
async fn a_compressed_message_inflates_to_64_kib_at_most() {
    let server = TestServer::start(&[]);
    let pad = 65536 + 1 - r#"{"type":"ping","pad":""}"#.len();
    let text = format!(r#"{{"type":"ping","pad":"{}"}}"#, "z".repeat(pad));
    let mut plain = RawClient::connect(&server, Some(BROWSER_OFFER)).await;
    plain.send_frame(true, false, 1, text.as_bytes()).await;
    assert_eq!(plain.recv().await["type"], "pong", "uncompressed: within 1 MiB");
    let mut compressed = RawClient::connect(&server, Some(BROWSER_OFFER)).await;
    compressed.send_frame(true, true, 1, &deflate(text.as_bytes())).await;
    assert_eq!(compressed.close_code().await, 1009);
}

/// Delta states on compressing connections (docs/PROTOCOL.md, "Delta states"): a bracket's delta, far shorter than the threshold, goes compressed too (once,
/// the same bytes for every deflate subscriber) because the state it stands for reaches the
/// threshold, and plain when the state does not.
#[tokio::test]
async fn a_delta_is_compressed_when_its_state_reaches_the_threshold() {
    let state_frame_len = |round: u32| 64 + "bracket:9".len() + bracket(round).len();
    assert!(
        state_frame_len(4) > 1024,
        "the bracket's state is over the default threshold"
    );
    for (threshold, compressed) in [("1024", true), ("1000000", false)] {
        let server = TestServer::start(&["--ws-compress-threshold", threshold]);
        let mut a = RawClient::connect(&server, Some(BROWSER_OFFER)).await;
        let mut b = RawClient::connect(&server, Some(BROWSER_OFFER)).await;
        let mut plain = RawClient::connect(&server, None).await;
        server.publish_state("bracket:9", &bracket(3)).await;
        for client in [&mut a, &mut b, &mut plain] {
            let command = json!({"type": "subscribe", "room": "bracket:9", "delta": "fossil"}).to_string();
            client.send_frame(true, false, 1, command.as_bytes()).await;
            assert_eq!(client.recv().await["type"], "subscribed");
            assert_eq!(client.recv().await["type"], "state", "the join state is whole");
        }
        server.publish_state("bracket:9", &bracket(4)).await;
        let (fa, fb, fp) = (a.text_frame().await, b.text_frame().await, plain.text_frame().await);
        assert!(!fp.rsv1);
        let delta: Value = serde_json::from_slice(&fp.payload).expect("JSON");
        assert_eq!(
            (delta["type"].as_str(), delta["base"].as_u64()),
            (Some("delta"), Some(1))
        );
        assert!(
            fp.payload.len() < 1024,
            "the delta frame is under the default threshold"
        );
        assert_eq!((fa.rsv1, fb.rsv1), (compressed, compressed), "threshold {threshold}");
        assert_eq!(fa.payload, fb.payload, "one payload for every deflate subscriber");
        if compressed {
            assert!(fa.payload.len() < fp.payload.len(), "compressed only when smaller");
        }
        let text = if compressed { inflate(&fa.payload) } else { fa.payload };
        assert_eq!(text, fp.payload, "the same delta frame");
    }
}
