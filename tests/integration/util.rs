//! The harness: starts the real `courtside` binary on 127.0.0.1 port 0, and real HTTP and
//! WebSocket clients. Timeouts here only stop a broken test from hanging; they assert nothing.
//! What the server counts or logs after an action is awaited (`await_metric`, `await_log`),
//! never read once: a client can see a frame before the server has counted it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub mod wt_codec;

pub const TOKEN: &str = "test-token";

/// Long enough that only a broken server reaches it.
pub const HANG: Duration = Duration::from_secs(30);

/// A running `courtside serve` process, killed when dropped.
pub struct TestServer {
    child: Child,
    pub http: SocketAddr,
    /// The WebTransport UDP address, unless started with `--no-wt`.
    pub wt: Option<SocketAddr>,
    logs: Arc<Mutex<Vec<Value>>>,
    stdout_lines: Arc<Mutex<Vec<String>>>,
    /// The threads reading standard output and error: finished once the process has exited and
    /// they read all it wrote (then `logs_with` and `stdout_lines` are complete).
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with_env(extra, &[])
    }

    /// `start`, with these environment variables set for the server alone.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut args = vec![
            "serve",
            "--http",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--log-level",
            "info,courtside=debug",
        ];
        if !extra.contains(&"--wt") && !extra.contains(&"--no-wt") {
            args.extend(["--wt", "127.0.0.1:0"]);
        }
        if !extra.contains(&"--publish-token") && !extra.contains(&"--no-token") {
            args.extend(["--publish-token", TOKEN]);
        }
        args.extend(extra.iter().filter(|a| **a != "--no-token"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_courtside"))
            .args(&args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start courtside");
        let stderr = child.stderr.take().expect("stderr");
        // Standard output carries the EMF documents (--emf-interval), nothing else.
        let stdout_lines = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            let sink = stdout_lines.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    sink.lock().expect("stdout").push(line);
                }
            }));
        }
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = mpsc::channel();
        let sink = logs.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let Ok(value) = serde_json::from_str::<Value>(&line) else {
                    eprintln!("server: {line}");
                    continue;
                };
                for key in ["http", "wt"] {
                    if let Some(addr) = value.get(key).and_then(Value::as_str) {
                        let _ = addr_tx.send((key, addr.to_string()));
                    }
                }
                sink.lock().expect("logs").push(value);
            }
        }));
        let wants_wt = !extra.contains(&"--no-wt");
        let (mut http, mut wt) = (None, None);
        while http.is_none() || (wants_wt && wt.is_none()) {
            let Ok((key, addr)) = addr_rx.recv_timeout(HANG) else {
                std::thread::sleep(Duration::from_millis(200));
                let logs = logs.lock().map(|l| l.clone()).unwrap_or_default();
                let status = child.try_wait();
                let _ = child.kill();
                let _ = child.wait();
                panic!("the server did not log its addresses; it exited with {status:?}; logs: {logs:?}");
            };
            let addr: SocketAddr = addr.parse().expect("address");
            match key {
                "http" => http = Some(addr),
                _ => wt = Some(addr),
            }
        }
        let http = http.expect("http address");
        Self {
            child,
            http,
            wt,
            logs,
            stdout_lines,
            readers,
        }
    }

    /// Every line the server wrote to standard output so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout_lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.http)
    }

    /// Log records whose message contains `text`, so far: complete only after `wait_exit`; while
    /// the server runs, await a record with `await_log`.
    pub fn logs_with(&self, text: &str) -> Vec<Value> {
        let logs = self.logs.lock().expect("logs");
        logs.iter()
            .filter(|l| l["message"].as_str().is_some_and(|m| m.contains(text)))
            .cloned()
            .collect()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// The first log record whose message contains `text`, awaited: the test fails if none
    /// comes within `HANG`.
    pub async fn await_log(&self, text: &str) -> Value {
        let what = format!("a log record containing {text:?}");
        eventually(&what, || async { self.logs_with(text).into_iter().next() }).await
    }

    /// Waits for the process to exit, then for the reader threads to take everything it wrote
    /// (polling; the harness only): afterwards `logs_with` and `stdout_lines` are complete.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + HANG;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            assert!(tokio::time::Instant::now() < deadline, "server did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        while !self.readers.iter().all(std::thread::JoinHandle::is_finished) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the server exited but its output was not read to the end"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        status
    }

    pub async fn request(&self, method: &str, path: &str, token: Option<&str>, body: impl Into<Bytes>) -> (u16, Value) {
        let (status, _, body) = request(self.http, method, path, token, &[], body.into()).await;
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.request("GET", path, None, Bytes::new()).await
    }

    pub async fn publish_state(&self, room: &str, data: &str) -> Value {
        let (status, body) = self
            .request(
                "POST",
                &format!("/v1/rooms/{room}/state"),
                Some(TOKEN),
                data.to_string(),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    pub async fn publish_event(&self, room: &str, data: &str) -> Value {
        let (status, body) = self
            .request(
                "POST",
                &format!("/v1/rooms/{room}/events"),
                Some(TOKEN),
                data.to_string(),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The `/metrics` exposition, one scrape.
    pub async fn scrape(&self) -> String {
        let (status, _, body) = request(self.http, "GET", "/metrics", None, &[], Bytes::new()).await;
        assert_eq!(status, 200);
        String::from_utf8(body.to_vec()).expect("utf8")
    }

    /// The value of `series` (as for `try_metric`) now, one scrape; the test fails when the series
    /// is absent (an absent series is not 0: a renamed metric must not pass for an unchanged one).
    /// Only for values that cannot change any more; await anything that follows an action with
    /// `await_metric`.
    pub async fn metric(&self, series: &str) -> f64 {
        let exposition = self.scrape().await;
        metric_value(&exposition, series).unwrap_or_else(|| panic!("no series {series} in /metrics:\n{exposition}"))
    }

    /// The value of `series` (a name with its labels exactly as the server writes them:
    /// `courtside_errors_total{code="100",name="bad_request"}`), one scrape; `None` when the series
    /// is absent (labelled series appear on their first increment) or the scrape itself is
    /// refused (a node at its connection limit resets it). For use inside `eventually`.
    pub async fn try_metric(&self, series: &str) -> Option<f64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = TcpStream::connect(self.http).await.ok()?;
        let request = format!(
            "GET /metrics HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
            self.http
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        tokio::time::timeout(HANG, stream.read_to_end(&mut response))
            .await
            .ok()?
            .ok()?;
        let text = String::from_utf8(response).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        if !head.starts_with("HTTP/1.1 200") {
            return None;
        }
        metric_value(body, series)
    }

    /// Awaits `series` being present with a value for which `check` holds, and returns it; the
    /// test fails, saying `what` was expected and what was seen last, if that does not happen
    /// within `HANG`. Tolerates refused scrapes (a node at its connection limit).
    pub async fn await_metric(&self, series: &str, what: &str, check: impl Fn(f64) -> bool) -> f64 {
        let deadline = tokio::time::Instant::now() + HANG;
        loop {
            let value = self.try_metric(series).await;
            if let Some(value) = value.filter(|v| check(*v)) {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} never became {what}; last seen {value:?} (None: absent, or the scrape refused)"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Awaits `series` reaching `count`, then asserts it did not pass it (for counters, and for
    /// gauges that only rise in the test).
    pub async fn await_count(&self, series: &str, count: f64) {
        let value = self.await_metric(series, &format!(">= {count}"), |v| v >= count).await;
        assert_eq!(value, count, "{series} went past {count}");
    }

    pub async fn connect(&self) -> Client {
        Client::connect(&self.ws_url()).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.logs.lock().map(|l| l.clone()).unwrap_or_default();
            eprintln!("--- last log lines of the server on {} ---", self.http);
            for line in logs.iter().rev().take(40).rev() {
                eprintln!("{line}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `series` (a name and its labels, as written) in an OpenMetrics exposition: the
/// line must be exactly the series, a space and a number (an optional timestamp or exemplar
/// after it); `None` when no line names the series. A line naming it with a value that is not a
/// number fails the test.
pub fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?.split(' ').next()?;
        Some(
            value
                .parse()
                .unwrap_or_else(|_| panic!("{series}: {value:?} is not a number in {line:?}")),
        )
    })
}

/// One HTTP/1.1 request on a fresh connection.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Bytes,
) -> (u16, hyper::HeaderMap, Bytes) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(Full::new(body)).expect("request");
    let response = tokio::time::timeout(HANG, sender.send_request(request))
        .await
        .expect("response in time")
        .expect("response");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.expect("body").to_bytes();
    (status, headers, body)
}

/// A tokio-tungstenite client speaking the JSON protocol.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What a client saw next: a JSON text frame or the close frame.
#[derive(Debug)]
pub enum Seen {
    Json(Value),
    Close(Option<CloseFrame>),
    /// The socket ended without a close frame.
    Ended,
}

impl Client {
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("websocket connect");
        Self { ws }
    }

    pub async fn send(&mut self, value: Value) {
        self.ws.send(Message::text(value.to_string())).await.expect("send");
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text.to_string())).await.expect("send");
    }

    /// The next JSON frame or the close, skipping pings and pongs.
    pub async fn next_seen(&mut self) -> Seen {
        let deadline = tokio::time::Instant::now() + HANG;
        loop {
            let message = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("a frame in time");
            match message {
                Some(Ok(Message::Text(text))) => {
                    return Seen::Json(serde_json::from_str(&text).expect("server sent JSON"))
                }
                Some(Ok(Message::Close(frame))) => return Seen::Close(frame),
                Some(Ok(Message::Binary(_))) => panic!("server sent a binary frame"),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Seen::Ended,
            }
        }
    }

    /// The next text frame, as sent.
    pub async fn recv_text(&mut self) -> String {
        let deadline = tokio::time::Instant::now() + HANG;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("a frame in time")
            {
                Some(Ok(Message::Text(text))) => return text.to_string(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    pub async fn recv(&mut self) -> Value {
        match self.next_seen().await {
            Seen::Json(value) => value,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// The close code the server sent, reading past any frames still queued before it.
    pub async fn close_code(&mut self) -> u16 {
        loop {
            match self.next_seen().await {
                Seen::Json(_) => continue,
                Seen::Close(Some(frame)) => return frame.code.into(),
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    pub async fn subscribe(&mut self, room: &str) -> Value {
        self.send(serde_json::json!({"type": "subscribe", "room": room})).await;
        let reply = self.recv().await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        reply
    }
}

/// A wtransport client endpoint that trusts the certificate of SHA-256 `hash_hex`.
pub fn wt_endpoint(hash_hex: &str) -> wtransport::Endpoint<wtransport::endpoint::endpoint_side::Client> {
    use wtransport::tls::Sha256Digest;
    let digest: Sha256Digest = hash_hex
        .as_bytes()
        .chunks(2)
        .map(|c| u8::from_str_radix(std::str::from_utf8(c).expect("hex"), 16).expect("hex"))
        .collect::<Vec<u8>>()
        .try_into()
        .map(Sha256Digest::new)
        .expect("32 bytes");
    let config = wtransport::ClientConfig::builder()
        .with_bind_default()
        .with_server_certificate_hashes([digest])
        .keep_alive_interval(Some(Duration::from_secs(2)))
        .build();
    wtransport::Endpoint::client(config).expect("client endpoint")
}

/// A WebTransport session opened at `addr` and its control stream, nothing read yet.
pub struct WtOpened {
    pub endpoint: wtransport::Endpoint<wtransport::endpoint::endpoint_side::Client>,
    pub connection: wtransport::Connection,
    pub send: wtransport::SendStream,
    pub recv: wtransport::RecvStream,
}

/// Opens a session at `addr` (trusting the certificate of SHA-256 `hash_hex`) and its control
/// stream, each within `HANG`.
pub async fn wt_open(addr: SocketAddr, hash_hex: &str) -> WtOpened {
    let endpoint = wt_endpoint(hash_hex);
    let connection = tokio::time::timeout(HANG, endpoint.connect(format!("https://{addr}/wt")))
        .await
        .expect("connect in time")
        .expect("webtransport connect");
    let (send, recv) = tokio::time::timeout(HANG, async {
        connection.open_bi().await.expect("open").await.expect("control stream")
    })
    .await
    .expect("a control stream in time");
    WtOpened {
        endpoint,
        connection,
        send,
        recv,
    }
}

/// What a WebTransport client saw next.
#[derive(Debug)]
pub enum WtSeen {
    Stream(Value),
    Datagram(Value),
    /// The session ended (with the QUIC close code when there was one).
    Closed(Option<u64>),
}

/// What the client's reader tasks hand to the test: what they saw, or why they stopped.
enum WtReport {
    Seen(WtSeen),
    /// A reader task panicked (bytes the test client's decoder refused, say): the test fails.
    Broken(String),
}

type WtReports = tokio::sync::mpsc::UnboundedSender<WtReport>;

/// A wtransport client speaking the binary protocol: a control stream and datagrams, encoded and
/// decoded by `wt_codec` (written from docs/PROTOCOL.md, not the server's codec). It acknowledges
/// state datagrams as a real client does, unless told not to. A panic in one of its reader tasks
/// fails the test at the next `next()`, or when the client is dropped.
pub struct WtClient {
    pub connection: wtransport::Connection,
    send: wtransport::SendStream,
    seen: tokio::sync::mpsc::UnboundedReceiver<WtReport>,
    readers: Vec<tokio::task::AbortHandle>,
    _endpoint: wtransport::Endpoint<wtransport::endpoint::endpoint_side::Client>,
}

/// Runs `task`, and reports its panic to the test as `WtReport::Broken`.
fn spawn_reader<F>(name: &'static str, tx: WtReports, task: F) -> tokio::task::AbortHandle
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let handle = tokio::spawn(task);
    let abort = handle.abort_handle();
    tokio::spawn(async move {
        if let Err(error) = handle.await {
            if error.is_panic() {
                let panic = error.into_panic();
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic without a message".to_string());
                let _ = tx.send(WtReport::Broken(format!("{name}: {message}")));
            }
        }
    });
    abort
}

impl WtClient {
    /// Connects to `server` with the certificate hash it publishes.
    pub async fn connect(server: &TestServer) -> Self {
        let hash = server.cert_hash().await;
        Self::connect_to(server.wt.expect("webtransport enabled"), &hash, true).await
    }

    pub async fn connect_to(addr: SocketAddr, hash_hex: &str, ack: bool) -> Self {
        let WtOpened {
            endpoint,
            connection,
            send,
            recv,
        } = wt_open(addr, hash_hex).await;
        let (tx, seen) = tokio::sync::mpsc::unbounded_channel();
        let aliases = Aliases::default();
        let readers = vec![
            spawn_reader(
                "the control stream reader",
                tx.clone(),
                read_stream(recv, tx.clone(), aliases.clone()),
            ),
            spawn_reader(
                "the datagram reader",
                tx.clone(),
                read_datagrams(connection.clone(), tx, ack, aliases),
            ),
        ];
        Self {
            connection,
            send,
            seen,
            readers,
            _endpoint: endpoint,
        }
    }

    /// Sends a command in its JSON form (as on WebSocket), in the binary encoding.
    pub async fn send(&mut self, command: Value) {
        self.send_raw(&wt_codec::encode_client(&command)).await;
    }

    /// Sends `message` as one frame on the control stream.
    pub async fn send_raw(&mut self, message: &[u8]) {
        self.send
            .write_all(&wt_codec::frame(message))
            .await
            .expect("write control stream");
    }

    /// Writes bytes as they are (for malformed framing).
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        let _ = self.send.write_all(bytes).await;
    }

    pub async fn next(&mut self) -> WtSeen {
        let report = tokio::time::timeout(HANG, self.seen.recv())
            .await
            .expect("something in time");
        match report {
            Some(WtReport::Seen(seen)) => seen,
            Some(WtReport::Broken(why)) => panic!("the WebTransport test client failed in {why}"),
            None => WtSeen::Closed(None),
        }
    }

    /// The next message on the control stream, skipping datagrams.
    pub async fn recv_stream(&mut self) -> Value {
        loop {
            match self.next().await {
                WtSeen::Stream(v) => return v,
                WtSeen::Datagram(_) => continue,
                WtSeen::Closed(code) => panic!("session closed ({code:?}) while waiting for a stream message"),
            }
        }
    }

    pub async fn subscribe(&mut self, room: &str) -> Value {
        self.send(serde_json::json!({"type": "subscribe", "room": room})).await;
        let reply = self.recv_stream().await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        reply
    }
}

impl Drop for WtClient {
    fn drop(&mut self) {
        for reader in &self.readers {
            reader.abort();
        }
        if std::thread::panicking() {
            return;
        }
        while let Ok(report) = self.seen.try_recv() {
            if let WtReport::Broken(why) = report {
                panic!("the WebTransport test client failed in {why}");
            }
        }
    }
}

/// The session's room aliases (PROTOCOL.md "Loss repair"), from the stream's `alias` notices.
type Aliases = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u64, String>>>;

async fn read_stream(mut recv: wtransport::RecvStream, tx: WtReports, aliases: Aliases) {
    let mut frames = wt_codec::Frames::default();
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(Some(n)) = recv.read(&mut buf).await {
        frames.extend(&buf[..n]);
        while let Some(frame) = frames.next().unwrap_or_else(|e| panic!("control stream framing: {e}")) {
            let message = wt_codec::decode_server(&frame)
                .unwrap_or_else(|e| panic!("a stream message that does not decode ({e}): {frame:02x?}"));
            if message["type"] == "alias" {
                let (room, alias) = (message["room"].as_str(), message["alias"].as_u64());
                let (Some(room), Some(alias)) = (room, alias) else {
                    panic!("an alias without a room or a number: {message}");
                };
                aliases.lock().expect("aliases").insert(alias, room.to_string());
                continue;
            }
            if message.get("alias").is_some() {
                panic!("a state by alias on the control stream: {message}");
            }
            if tx.send(WtReport::Seen(WtSeen::Stream(message))).is_err() {
                return;
            }
        }
    }
    let _ = tx.send(WtReport::Seen(WtSeen::Closed(None)));
}

async fn read_datagrams(connection: wtransport::Connection, tx: WtReports, ack: bool, aliases: Aliases) {
    let mut held: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    loop {
        let datagram = match connection.receive_datagram().await {
            Ok(datagram) => datagram,
            Err(error) => {
                let code = match error {
                    wtransport::error::ConnectionError::ApplicationClosed(close) => Some(close.code().into_inner()),
                    _ => None,
                };
                let _ = tx.send(WtReport::Seen(WtSeen::Closed(code)));
                return;
            }
        };
        let payload = datagram.payload();
        let mut message = wt_codec::decode_server(&payload)
            .unwrap_or_else(|e| panic!("a datagram that does not decode ({e}): {:02x?}", &payload[..]));
        let (Some(alias), Some(version)) = (message["alias"].as_u64(), message["version"].as_u64()) else {
            panic!("a datagram that is not a state by alias: {message}");
        };
        // A state whose alias is not known yet is dropped, as PROTOCOL.md tells clients to.
        let Some(room) = aliases.lock().expect("aliases").get(&alias).cloned() else {
            continue;
        };
        if ack {
            let newest = held.entry(alias).or_default();
            *newest = (*newest).max(version);
            let acks = json!({"type": "acks", "acks": [{"alias": alias, "version": *newest}]});
            let _ = connection.send_datagram(wt_codec::encode_client(&acks));
        }
        message["room"] = room.into();
        if let Some(object) = message.as_object_mut() {
            object.remove("alias");
        }
        if tx.send(WtReport::Seen(WtSeen::Datagram(message))).is_err() {
            return;
        }
    }
}

impl TestServer {
    /// The hex SHA-256 of the WebTransport certificate, from `GET /v1/cert-hash`.
    pub async fn cert_hash(&self) -> String {
        let (status, body) = self.get("/v1/cert-hash").await;
        assert_eq!(status, 200, "{body}");
        body["sha256"].as_str().expect("sha256").to_string()
    }
}

/// A UDP relay between one client and the server that drops a share of the packets in
/// both directions, chosen by a seeded generator.
pub struct LossyRelay {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    /// New sockets toward the server: the client's address as the server sees it changes, as
    /// behind a NAT that rebinds.
    rebinds: tokio::sync::mpsc::UnboundedSender<tokio::net::UdpSocket>,
    /// The head (64 bytes) of every packet forwarded, and whether it went to the server.
    seen: RecordedPackets,
}

/// Packet heads a relay forwarded: (to the server, the first bytes).
type RecordedPackets = std::sync::Arc<std::sync::Mutex<Vec<(bool, Vec<u8>)>>>;

impl LossyRelay {
    /// The heads of the packets forwarded so far: (to the server, first bytes).
    pub fn packets(&self) -> Vec<(bool, Vec<u8>)> {
        self.seen.lock().expect("packets").clone()
    }

    /// From now on the relay reaches the server from a new port (a NAT rebinding); returns it.
    pub async fn rebind(&self) -> SocketAddr {
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = back.local_addr().expect("addr");
        self.rebinds.send(back).expect("relay running");
        addr
    }

    pub async fn start(server: SocketAddr, loss: f64, seed: u64) -> Self {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let (rebinds, mut new_backs) = tokio::sync::mpsc::unbounded_channel();
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let mut back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = front.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let mut rng = seed | 1;
            let mut keep = move || {
                // xorshift64*
                rng ^= rng >> 12;
                rng ^= rng << 25;
                rng ^= rng >> 27;
                let r = rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
                ((r >> 11) as f64 / (1u64 << 53) as f64) >= loss
            };
            let mut client: Option<SocketAddr> = None;
            let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
            loop {
                tokio::select! {
                    Ok((n, from)) = front.recv_from(&mut a) => {
                        client = Some(from);
                        if keep() {
                            record.lock().expect("packets").push((true, a[..n.min(64)].to_vec()));
                            let _ = back.send_to(&a[..n], server).await;
                        }
                    }
                    Ok((n, _)) = back.recv_from(&mut b) => {
                        if let (Some(client), true) = (client, keep()) {
                            record.lock().expect("packets").push((false, b[..n.min(64)].to_vec()));
                            let _ = front.send_to(&b[..n], client).await;
                        }
                    }
                    Some(socket) = new_backs.recv() => back = socket,
                }
            }
        });
        Self {
            addr,
            task,
            rebinds,
            seen,
        }
    }
}

impl Drop for LossyRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A real `redis-server` on a free loopback port, without persistence, killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    /// TLS (rediss://) with this password, as ElastiCache's in-transit encryption with AUTH.
    tls: Option<(std::path::PathBuf, String)>,
    /// An append-only file in this directory, fsynced on every write: a SIGKILL loses nothing
    /// acknowledged (the fault campaign restarts Redis with its data).
    aof_dir: Option<std::path::PathBuf>,
}

impl RedisServer {
    pub fn start() -> Self {
        let port = free_port();
        let mut server = Self {
            child: None,
            port,
            tls: None,
            aof_dir: None,
        };
        server.spawn();
        server
    }

    /// A server with an append-only file in `dir`, fsynced on every write.
    pub fn start_persistent(dir: std::path::PathBuf) -> Self {
        std::fs::create_dir_all(&dir).expect("redis dir");
        let port = free_port();
        let mut server = Self {
            child: None,
            port,
            tls: None,
            aof_dir: Some(dir),
        };
        server.spawn();
        server
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts again on the same port: with the data of its append-only file, or empty.
    pub fn restart(&mut self, empty: bool) {
        self.kill();
        if let (true, Some(dir)) = (empty, &self.aof_dir) {
            let _ = std::fs::remove_dir_all(dir);
            std::fs::create_dir_all(dir).expect("redis dir");
        }
        self.spawn();
    }

    /// A TLS-only server with a password and a self-signed certificate.
    pub async fn start_tls(password: &str) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("courtside-redis-tls-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        write_self_signed(&dir.join("cert.pem"), &dir.join("key.pem"));
        let mut server = Self {
            child: None,
            port,
            tls: Some((dir, password.to_string())),
            aof_dir: None,
        };
        server.spawn();
        server
    }

    pub fn url(&self) -> String {
        match &self.tls {
            // `#insecure`: the test certificate is self-signed.
            Some((_, password)) => format!("rediss://:{password}@127.0.0.1:{}/#insecure", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    fn spawn(&mut self) {
        let mut command = Command::new("redis-server");
        command.args(["--bind", "127.0.0.1", "--save", ""]);
        match &self.aof_dir {
            Some(dir) => command
                .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
                .arg(dir),
            None => command.args(["--appendonly", "no"]),
        };
        match &self.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some((dir, password)) => command
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &self.port.to_string(),
                    "--tls-auth-clients",
                    "no",
                ])
                .args(["--requirepass", password])
                .arg("--tls-cert-file")
                .arg(dir.join("cert.pem"))
                .arg("--tls-key-file")
                .arg(dir.join("key.pem")),
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (install it: apt-get install redis-server)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + HANG;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL: no goodbye to the clients.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port, empty.
    pub fn restart_empty(&mut self) {
        self.kill();
        self.spawn();
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.url()).expect("client");
        client
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if let Some((dir, _)) = &self.tls {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl TestServer {
    /// SIGKILL the node.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it returns `Some`, for state that converges (presence, subscriptions).
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + HANG;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real Redis Cluster of three masters (no replicas), built with `redis-cli --cluster create`.
pub struct RedisCluster {
    children: Vec<Child>,
    pub ports: Vec<u16>,
    dir: std::path::PathBuf,
}

impl RedisCluster {
    pub async fn start() -> Self {
        Self::start_with_replicas(0).await
    }

    /// Three masters, each with `replicas` replicas (which take over when their master dies).
    pub async fn start_with_replicas(replicas: usize) -> Self {
        let dir = std::env::temp_dir().join(format!("courtside-cluster-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("dir");
        let ports: Vec<u16> = (0..3 * (1 + replicas)).map(|_| free_cluster_port()).collect();
        let mut children = Vec::new();
        for port in &ports {
            let child = Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &format!("nodes-{port}.conf"),
                ])
                .args(["--cluster-node-timeout", "2000", "--dir", dir.to_str().expect("dir")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server");
            children.push(child);
        }
        let cluster = Self { children, ports, dir };
        for port in &cluster.ports {
            let deadline = std::time::Instant::now() + HANG;
            while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
                assert!(std::time::Instant::now() < deadline, "redis-server did not start");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let addrs: Vec<String> = cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli --cluster create");
        assert!(status.success(), "cluster create failed");
        for port in cluster.ports.clone() {
            eventually("the cluster is ok", || async move {
                let mut conn = cluster_node_connection(port).await;
                let info: String = redis::cmd("CLUSTER").arg("INFO").query_async(&mut conn).await.ok()?;
                info.contains("cluster_state:ok").then_some(())
            })
            .await;
            // A replica takes over only once it has synced with its master.
            eventually("each replica is in sync with its master", || async move {
                let mut conn = cluster_node_connection(port).await;
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                (info.contains("role:master") || info.contains("master_link_status:up")).then_some(())
            })
            .await;
        }
        cluster
    }

    /// SIGKILLs the server on `port`.
    pub fn kill_port(&mut self, port: u16) {
        if let Some(i) = self.ports.iter().position(|p| *p == port) {
            let _ = self.children[i].kill();
            let _ = self.children[i].wait();
        }
    }

    /// The master port that holds `key`'s slot, asked of any live server but `dead` (`None`
    /// while no live master holds it, during a failover).
    pub async fn master_of(&self, key: &str, dead: Option<u16>) -> Option<u16> {
        let port = *self.ports.iter().find(|p| Some(**p) != dead).expect("a live server");
        let mut conn = cluster_node_connection(port).await;
        let slot: u64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("keyslot");
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut conn)
            .await
            .expect("nodes");
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let owns = fields[8..].iter().any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                matches!((lo.parse::<u64>(), hi.parse::<u64>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
            });
            if owns {
                return fields[1].split(['@', ':']).nth(1).and_then(|p| p.parse().ok());
            }
        }
        None
    }

    /// The seed list as README.md writes it: the first seed a URL, the others bare `host:port`.
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if i == 0 {
                    format!("redis://127.0.0.1:{p}")
                } else {
                    format!("127.0.0.1:{p}")
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A plain connection to one cluster node (for PUBSUB SHARDNUMSUB and CLUSTER INFO).
pub async fn cluster_node_connection(port: u16) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("client");
    client.get_multiplexed_async_connection().await.expect("connection")
}

/// A port for a cluster node, whose bus listens on the port + 10,000: both below the kernel's
/// ephemeral range (32768 and up), so that the bus port is not taken by some connection's local
/// port meanwhile, and both free now.
fn free_cluster_port() -> u16 {
    // Successive picks of this process never repeat (a cluster's nodes are all picked before any
    // of them binds); another process starts elsewhere in the range.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        (nanos ^ u64::from(std::process::id())) % 10_000
    });
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 12_000 + ((start + n * 7) % 10_000) as u16;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP forwarder on loopback to `target`, which the test can close (refusing new connections
/// and cutting the open ones) and open again: one node's path to Redis, cut alone.
pub struct TcpGate {
    pub port: u16,
    open: Arc<std::sync::atomic::AtomicBool>,
    links: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpGate {
    pub async fn start(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let links: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (gate_open, gate_links) = (open.clone(), links.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !gate_open.load(std::sync::atomic::Ordering::Acquire) {
                    continue;
                }
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                gate_links.lock().expect("links").push(link.abort_handle());
            }
        });
        Self {
            port,
            open,
            links,
            accept,
        }
    }

    pub fn close(&self) {
        self.open.store(false, std::sync::atomic::Ordering::Release);
        for link in self.links.lock().expect("links").drain(..) {
            link.abort();
        }
    }

    pub fn open(&self) {
        self.open.store(true, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for TcpGate {
    fn drop(&mut self) {
        self.accept.abort();
        self.close();
    }
}

/// A fresh self-signed certificate for localhost and 127.0.0.1, written as PEM to `cert` and
/// `key` whole before it returns (wtransport's `store_pemfile` leaves its last write to a tokio
/// task, so a reader right after could find the file empty); its SHA-256 hash, in hex.
pub fn write_self_signed(cert: &std::path::Path, key: &std::path::Path) -> String {
    let identity = wtransport::Identity::self_signed(["localhost", "127.0.0.1"]).expect("identity");
    let chain: String = identity
        .certificate_chain()
        .as_slice()
        .iter()
        .map(|c| c.to_pem())
        .collect();
    std::fs::write(cert, chain).expect("cert");
    std::fs::write(key, identity.private_key().to_secret_pem()).expect("key");
    identity.certificate_chain().as_slice()[0]
        .hash()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{metric_value, spawn_reader, WtReport, HANG};

    /// A reader task's panic (bytes the client's decoder refused, say) reaches the test.
    #[tokio::test]
    async fn a_panic_in_a_reader_task_reaches_the_test() {
        let (tx, mut reports) = tokio::sync::mpsc::unbounded_channel();
        spawn_reader("the reader", tx, async { panic!("bad bytes") });
        match tokio::time::timeout(HANG, reports.recv()).await {
            Ok(Some(WtReport::Broken(why))) => assert_eq!(why, "the reader: bad bytes"),
            Ok(Some(WtReport::Seen(seen))) => panic!("saw {seen:?}"),
            Ok(None) | Err(_) => panic!("the panic was not reported"),
        }
    }

    #[test]
    fn metric_lines_match_the_whole_series_and_a_number() {
        let exposition = "# TYPE courtside_rooms gauge\ncourtside_rooms 10\n\
            courtside_rooms_total 3\n\
            courtside_errors_total{code=\"100\",name=\"bad_request\"} 4 1700000000\n\
            courtside_connections{transport=\"websocket\"} 1\n# EOF\n";
        assert_eq!(metric_value(exposition, "courtside_rooms"), Some(10.0));
        assert_eq!(metric_value(exposition, "courtside_rooms_total"), Some(3.0));
        assert_eq!(
            metric_value(exposition, "courtside_errors_total{code=\"100\",name=\"bad_request\"}"),
            Some(4.0)
        );
        // A prefix of a series is not the series; an absent one is absent, not 0.
        assert_eq!(metric_value(exposition, "courtside_connections"), None);
        assert_eq!(metric_value(exposition, "courtside_room"), None);
        assert_eq!(metric_value(exposition, "courtside_errors_total"), None);
        assert_eq!(metric_value(exposition, "courtside_renamed_total"), None);
    }
}
