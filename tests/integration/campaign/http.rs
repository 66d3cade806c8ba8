//! HTTP for the campaign: one request per connection, telling "never sent" (the connection was
//! refused) from "sent, no answer" (the node died or timed out), which a publisher must not
//! confuse: only the first is safe to send again without an `Idempotency-Key`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

/// What became of a request.
#[derive(Debug)]
pub enum Outcome {
    /// The connection was refused or did not open: the request never left.
    NotSent,
    /// Sent, and no answer (reset, closed, or timed out): it may have been acted on.
    NoAnswer,
    Answer(u16, Value),
}

pub async fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: Bytes) -> Outcome {
    let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await else {
        return Outcome::NotSent;
    };
    let Ok((mut sender, connection)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await else {
        return Outcome::NotSent;
    };
    tokio::spawn(connection);
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(Full::new(body)).expect("request");
    let answer = async {
        let response = sender.send_request(request).await.ok()?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    };
    match tokio::time::timeout(Duration::from_secs(6), answer).await {
        Ok(Some((status, body))) => Outcome::Answer(status, body),
        _ => Outcome::NoAnswer,
    }
}

/// A GET's status and JSON body, `None` without an answer.
pub async fn get(addr: SocketAddr, path: &str) -> Option<(u16, Value)> {
    match request(addr, "GET", path, &[], Bytes::new()).await {
        Outcome::Answer(status, body) => Some((status, body)),
        _ => None,
    }
}
