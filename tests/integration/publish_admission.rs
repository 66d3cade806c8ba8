//! The publish API's gate, against the real binary: valid publish credentials are never limited
//! by their address while bad or absent ones are, and a refused body is answered before it is read
//! and then discarded within bounds (a lingering close), so the client reads the answer.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::{TestServer, HANG, TOKEN};

const SECRET: &str = "publish-admission-secret";

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An HS256 JWT signed with `SECRET`.
fn jwt(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("token")
}

/// A publisher on one kept-alive connection, as a backend's HTTP client pool holds them.
struct Publisher {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
}

impl Publisher {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        Self { sender, addr }
    }

    /// One POST; its status, `Retry-After` and error name.
    async fn post(&mut self, path: &str, token: &str, body: String) -> (u16, Option<String>, Option<String>) {
        tokio::time::timeout(HANG, self.sender.ready())
            .await
            .expect("connection ready in time")
            .expect("the connection stays open");
        let request = hyper::Request::post(path)
            .header("host", self.addr.to_string())
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        let response = tokio::time::timeout(HANG, self.sender.send_request(request))
            .await
            .expect("an answer in time")
            .expect("an answer");
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = response.into_body().collect().await.expect("body").to_bytes();
        let error = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|b| b["error"].as_str().map(str::to_string));
        (status, retry_after, error)
    }
}

/// `publishers` concurrent connections, each making `each` publishes (states and events in turn)
/// with `token`; every status, counted.
async fn publish_from_one_address(
    addr: SocketAddr,
    publishers: usize,
    each: usize,
    token: &str,
    room: &str,
) -> std::collections::BTreeMap<u16, usize> {
    let tasks: Vec<_> = (0..publishers)
        .map(|p| {
            let (token, room) = (token.to_string(), room.to_string());
            tokio::spawn(async move {
                let mut publisher = Publisher::connect(addr).await;
                let mut statuses = Vec::with_capacity(each);
                for i in 0..each {
                    let kind = if i % 2 == 0 { "state" } else { "events" };
                    let path = format!("/v1/rooms/{room}:{p}/{kind}");
                    statuses.push(publisher.post(&path, &token, format!("{{\"i\":{i}}}")).await.0);
                }
                statuses
            })
        })
        .collect();
    let mut counts = std::collections::BTreeMap::new();
    for task in tasks {
        for status in task.await.expect("publisher") {
            *counts.entry(status).or_insert(0) += 1;
        }
    }
    counts
}

/// The backend (the publish token, and a publish JWT) publishes 5,000 and 1,200 requests from one
/// address within a minute, 70 connections at once, under the default `--publish-rate-per-ip`
/// of 1,000: not one 429. Requests without publish credentials from that same address (a wrong
/// token, a forged JWT, a subscriber's JWT) are counted and limited, and while they are refused
/// the backend's next publishes still pass; a publish JWT outside its scope is 403, not limited.
#[tokio::test]
async fn valid_publish_credentials_are_never_limited_by_their_address_and_bad_ones_are() {
    let server = TestServer::start(&["--no-wt", "--jwt-secret", SECRET]);
    let publisher_jwt = jwt(json!({"sub": "backend", "exp": now_s() + 600, "publish": ["game:*"]}));
    let subscriber_jwt = jwt(json!({"sub": "fan", "exp": now_s() + 600}));
    let forged_jwt = format!("{publisher_jwt}x");

    let (with_token, with_jwt) = tokio::join!(
        publish_from_one_address(server.http, 50, 100, TOKEN, "game:token"),
        publish_from_one_address(server.http, 20, 60, &publisher_jwt, "game:jwt"),
    );
    assert_eq!(with_token.into_iter().collect::<Vec<_>>(), vec![(200, 5_000)]);
    assert_eq!(with_jwt.into_iter().collect::<Vec<_>>(), vec![(200, 1_200)]);

    // A flood of bad tokens from the same address: counted (none of the 6,200 above was), and
    // refused beyond the rate.
    let started = std::time::Instant::now();
    let flood = publish_from_one_address(server.http, 10, 150, "wrong", "game:flood").await;
    let elapsed_s = started.elapsed().as_secs_f64();
    let unauthorized = flood.get(&401).copied().unwrap_or(0);
    let limited = flood.get(&429).copied().unwrap_or(0);
    assert_eq!(unauthorized + limited, 1_500, "only 401 and 429: {flood:?}");
    assert!(limited > 0, "the flood was never limited: {flood:?}");
    // A sliding minute lets at most 1,000 in, plus what the last minute's share gives back
    // while the flood lasts.
    assert!(
        unauthorized as f64 <= 1_000.0 * (1.0 + elapsed_s / 60.0) + 1.0,
        "{unauthorized} answered 401 in {elapsed_s} s"
    );

    let mut backend = Publisher::connect(server.http).await;
    let mut other = Publisher::connect(server.http).await;
    for token in ["wrong", forged_jwt.as_str(), subscriber_jwt.as_str()] {
        let (status, retry_after, error) = other.post("/v1/rooms/game:1/state", token, "{}".into()).await;
        assert_eq!((status, error.as_deref()), (429, Some("ip_rate_limited")), "{token}");
        let retry_after: u64 = retry_after.and_then(|s| s.parse().ok()).expect("Retry-After");
        assert!((1..=60).contains(&retry_after));
    }
    // The backend, on the same address at the same moment, is not touched by the flood.
    assert_eq!(
        backend
            .post("/v1/rooms/game:1/state", TOKEN, "{\"n\":1}".into())
            .await
            .0,
        200
    );
    assert_eq!(
        backend
            .post("/v1/rooms/game:2/events", &publisher_jwt, "{\"n\":2}".into())
            .await
            .0,
        200
    );
    let (status, _, error) = backend
        .post("/v1/rooms/league:7/state", &publisher_jwt, "{}".into())
        .await;
    assert_eq!(
        (status, error.as_deref()),
        (403, Some("forbidden")),
        "outside the JWT's scope"
    );
    assert_eq!(server.get("/v1/rooms/league:7").await.0, 404, "nothing published");

    let scrape = server.scrape().await;
    let metric = |line: &str| -> f64 {
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(
        metric(r#"courtside_errors_total{code="401",name="unauthorized"}"#),
        unauthorized as f64
    );
    assert_eq!(
        metric(r#"courtside_errors_total{code="429",name="ip_rate_limited"}"#),
        (limited + 3) as f64
    );
}

/// A raw HTTP/1.1 answer: the status, the header block (lowercased) and the body.
struct RawAnswer {
    status: u16,
    head: String,
    body: String,
}

/// Reads one answer from `stream` (its body by `Content-Length`), without waiting for the
/// connection to close; bytes of a following answer stay in `buffer`.
async fn read_answer(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> RawAnswer {
    let read = async {
        let head_end = loop {
            if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.expect("the answer, not a reset");
            assert!(n > 0, "closed before an answer: {:?}", String::from_utf8_lossy(buffer));
            buffer.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("content-length");
        while buffer.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.expect("the whole answer, not a reset");
            assert!(n > 0, "closed in the middle of the answer");
            buffer.extend_from_slice(&chunk[..n]);
        }
        let body = String::from_utf8_lossy(&buffer[head_end..head_end + length]).into_owned();
        buffer.drain(..head_end + length);
        RawAnswer { status, head, body }
    };
    tokio::time::timeout(HANG, read).await.expect("an answer in time")
}

fn publish_head(token: &str, length: usize, extra: &str) -> String {
    format!(
        "POST /v1/rooms/game:big/events HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n{extra}\r\n"
    )
}

/// The most one Linux socket buffer may grow to, from `/proc` (`tcp_rmem` or `tcp_wmem`).
fn socket_buffer_max(name: &str) -> usize {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
        .ok()
        .and_then(|text| text.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(8 << 20)
}

const DECLARED: usize = 100 << 20;

/// 100 MiB declared, a few KB sent: the 413 comes back (before the body), says `Connection:
/// close`, and is read whole. Then the server reads and drops at most `LINGER_BYTES` more and
/// closes: a client that keeps writing finds the connection closed well before the 100 MiB
/// (what it could write is that plus the two sockets' buffers), and not before the server has
/// read what it lingers for.
#[tokio::test]
async fn an_oversized_body_is_answered_413_before_it_is_read_then_discarded_within_bounds() {
    let server = TestServer::start(&["--no-wt"]);
    let mut stream = TcpStream::connect(server.http).await.expect("connect");
    stream
        .write_all(publish_head(TOKEN, DECLARED, "").as_bytes())
        .await
        .expect("head");
    let chunk = vec![b'1'; 64 << 10];
    stream.write_all(&chunk[..4096]).await.expect("a few KB");
    let mut buffer = Vec::new();
    let answer = read_answer(&mut stream, &mut buffer).await;
    assert_eq!(answer.status, 413, "{}", answer.head);
    assert!(answer.head.contains("connection: close"), "{}", answer.head);
    let body: Value = serde_json::from_str(&answer.body).expect("JSON body");
    assert_eq!(body["error"], "body_too_large");

    let mut written = 4096usize;
    let closed = loop {
        match tokio::time::timeout(HANG, stream.write_all(&chunk)).await {
            Ok(Ok(())) => written += chunk.len(),
            Ok(Err(error)) => break error,
            Err(_) => panic!("the server stopped reading but kept the connection open"),
        }
        assert!(written < DECLARED, "the server read the whole 100 MiB");
    };
    let linger = courtside::http::LINGER_BYTES;
    let bound = linger + socket_buffer_max("tcp_rmem") + socket_buffer_max("tcp_wmem") + (1 << 20);
    assert!(
        written <= bound,
        "{written} bytes written before the close ({closed}); at most {bound} expected"
    );
    // The server kept reading after its answer (it closes once it has dropped more than
    // `LINGER_BYTES`, or after `LINGER_TIME`, which a loopback client writing without pause
    // does not reach): the answer did not wait for the body, and was not followed by a reset.
    assert!(written > linger, "closed after {written} bytes ({closed})");
}

/// A client that writes part of an oversized body before it reads (as most HTTP clients do)
/// reads the whole 413, not a reset; when it then stops sending, the server closes the
/// connection after `LINGER_TIME` (an end of stream, not a reset: nothing was left unread).
#[tokio::test]
async fn a_client_that_writes_before_it_reads_gets_the_whole_413_and_then_a_close() {
    let server = TestServer::start(&["--no-wt"]);
    let mut stream = TcpStream::connect(server.http).await.expect("connect");
    stream
        .write_all(publish_head(TOKEN, DECLARED, "").as_bytes())
        .await
        .expect("head");
    let part = vec![b'1'; 3 << 20];
    tokio::time::timeout(HANG, stream.write_all(&part))
        .await
        .expect("the server reads what comes after its answer")
        .expect("written");
    let mut buffer = Vec::new();
    let answer = read_answer(&mut stream, &mut buffer).await;
    assert_eq!(answer.status, 413, "{}", answer.head);
    assert!(answer.body.contains("body_too_large"), "{}", answer.body);
    await_clean_close(&mut stream, &buffer).await;
}

/// `Expect: 100-continue` with an oversized `Content-Length`: the 413 comes instead of a
/// `100 Continue` (the client sends no body), and the connection closes.
#[tokio::test]
async fn an_oversized_body_that_waits_for_100_continue_gets_the_413_instead() {
    let server = TestServer::start(&["--no-wt"]);
    let mut stream = TcpStream::connect(server.http).await.expect("connect");
    stream
        .write_all(publish_head(TOKEN, DECLARED, "expect: 100-continue\r\n").as_bytes())
        .await
        .expect("head");
    let mut buffer = Vec::new();
    let answer = read_answer(&mut stream, &mut buffer).await;
    assert_eq!(answer.status, 413, "no 100 Continue first: {}", answer.head);
    await_clean_close(&mut stream, &buffer).await;
}

/// A chunked body (no `Content-Length`) keeps the limit: under `--max-body` it is published, past
/// it the answer is 413 with `Connection: close`, read whole.
#[tokio::test]
async fn a_chunked_body_is_limited_as_it_arrives() {
    let server = TestServer::start(&["--no-wt", "--max-body", "1024"]);
    let head = format!(
        "POST /v1/rooms/game:chunked/state HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    let mut stream = TcpStream::connect(server.http).await.expect("connect");
    let small = format!("{head}4\r\n{{\"n\"\r\n3\r\n:1}}\r\n0\r\n\r\n");
    stream.write_all(small.as_bytes()).await.expect("small");
    let mut buffer = Vec::new();
    let answer = read_answer(&mut stream, &mut buffer).await;
    assert_eq!(answer.status, 200, "{}", answer.body);

    let piece = format!("3e8\r\n{}\r\n", "1".repeat(1000));
    stream.write_all(head.as_bytes()).await.expect("head");
    for _ in 0..3 {
        stream.write_all(piece.as_bytes()).await.expect("a chunk");
    }
    let answer = read_answer(&mut stream, &mut buffer).await;
    assert_eq!(answer.status, 413, "{}", answer.head);
    assert!(answer.head.contains("connection: close"), "{}", answer.head);
    assert!(answer.body.contains("body_too_large"), "{}", answer.body);
    assert_eq!(server.get("/v1/rooms/game:chunked").await.1["state"]["data"]["n"], 1);
}

/// A publish refused for its credentials is answered before its body is read, and the body is
/// read and dropped after the answer: a client that writes a 4 MiB body before it reads gets
/// the whole 401, and the connection, its body read to the end, serves the next request.
#[tokio::test]
async fn a_refusal_before_the_body_lets_the_client_read_it_and_keeps_the_connection() {
    let server = TestServer::start(&["--no-wt", "--max-body", "8388608"]);
    let mut stream = TcpStream::connect(server.http).await.expect("connect");
    let body = format!("\"{}\"", "1".repeat((4 << 20) - 2));
    stream
        .write_all(publish_head("wrong", body.len(), "").as_bytes())
        .await
        .expect("head");
    tokio::time::timeout(HANG, stream.write_all(body.as_bytes()))
        .await
        .expect("the server reads the body after its answer")
        .expect("written");
    let mut buffer = Vec::new();
    let answer = read_answer(&mut stream, &mut buffer).await;
    assert_eq!(answer.status, 401, "{}", answer.head);
    assert!(answer.head.contains("www-authenticate: bearer"), "{}", answer.head);

    let next = format!("{}{{\"n\":1}}", publish_head(TOKEN, 7, ""));
    stream.write_all(next.as_bytes()).await.expect("next request");
    let answer = read_answer(&mut stream, &mut buffer).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
}

/// The server closes the connection after its answer (`buffer`: what was read past it): an end of
/// stream, not a reset, with nothing after the answer.
async fn await_clean_close(stream: &mut TcpStream, buffer: &[u8]) {
    let mut rest = Vec::new();
    tokio::time::timeout(HANG, stream.read_to_end(&mut rest))
        .await
        .expect("closed within LINGER_TIME")
        .expect("an end of stream, not a reset");
    assert!(rest.is_empty() && buffer.is_empty(), "nothing after the answer");
}
