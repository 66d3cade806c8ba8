//! The WebSocket handshake at `/ws` (RFC 6455 §4.2): HTTP owns it, admission is asked,
//! permessage-deflate is negotiated (RFC 7692, `core::deflate`), and the upgraded socket is
//! handed to the WebSocket transport, which owns it from then on.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tracing::{debug, warn};

use super::{ApiError, ApiErrorCode, HttpState};
use crate::core::deflate;
use crate::listener::LimitedStream;
use crate::transport::websocket;

/// `GET /ws`: checks the upgrade request, answers 101 and hands the socket to the transport.
pub async fn websocket(State(state): State<HttpState>, mut request: Request) -> Response {
    let node = state.node;
    let headers = request.headers();
    let origin = headers.get(header::ORIGIN).map(HeaderValue::as_bytes);
    // The same checks and answers as a WebTransport CONNECT (`Admission::check_session`).
    if let Err(refusal) = node.admission.check_session(origin, node.is_draining()) {
        return ApiError::new(ApiErrorCode::from_refusal(refusal), refusal.to_string()).into_response();
    }
    // A connection in the HTTP reserve, above --max-connections: plain requests only.
    if request.extensions().get::<crate::listener::OverLimit>().is_some() {
        let refusal = node.admission.refuse_upgrade_over_limit();
        return ApiError::new(ApiErrorCode::from_refusal(refusal), refusal.to_string()).into_response();
    }
    let key = match check_upgrade_headers(headers) {
        Ok(key) => key,
        Err(error) => {
            let mut response = error.into_response();
            response
                .headers_mut()
                .insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            return response;
        }
    };
    // One more connection from this client address (behind a trusted proxy, its
    // X-Forwarded-For), held by the socket from the upgrade on.
    let ip_permit = match super::client_ip(&node, &request) {
        Some(ip) => match node.admission.admit_ip(ip) {
            Ok(permit) => Some(permit),
            Err(refused) => return super::error::ip_refusal(refused).into_response(),
        },
        None => None,
    };
    let accept = derive_accept_key(key.as_bytes());
    // permessage-deflate when the client offers it (browsers do) and the node allows it.
    let deflate = state
        .settings
        .websocket
        .compress_threshold
        .and_then(|_| {
            deflate::negotiate(
                request
                    .headers()
                    .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
            )
        })
        .and_then(|answer| HeaderValue::from_str(&answer).ok());
    let deflated = deflate.is_some();
    let on_upgrade = hyper::upgrade::on(&mut request);
    // Counted by the drain from here on, so a shutdown waits for the upgrade in flight.
    let shutdown = node.shutdown_listener();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                // The stream hyper served: the transport writes into its socket directly.
                let parts = match upgraded.downcast::<TokioIo<LimitedStream>>() {
                    Ok(parts) => parts,
                    Err(_) => {
                        warn!("websocket upgrade on an unexpected stream type; closing");
                        return;
                    }
                };
                let early = parts.read_buf.to_vec();
                let mut stream = parts.io.into_inner();
                if let Some(permit) = ip_permit {
                    stream.hold(permit);
                }
                websocket::serve(stream, early, deflated, node, &state.settings.websocket, shutdown).await;
            }
            Err(error) => debug!(%error, "websocket upgrade failed"),
        }
    });
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept);
    if let Some(answer) = deflate {
        response = response.header(header::SEC_WEBSOCKET_EXTENSIONS, answer);
    }
    response
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The RFC 6455 handshake checks; returns the client's key.
fn check_upgrade_headers(headers: &HeaderMap) -> Result<HeaderValue, ApiError> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return Err(ApiError::new(
            ApiErrorCode::UpgradeRequired,
            "this endpoint speaks WebSocket only",
        ));
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return Err(ApiError::new(
            ApiErrorCode::BadWebSocketVersion,
            "Sec-WebSocket-Version must be 13",
        ));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| ApiError::new(ApiErrorCode::BadWebSocketKey, "Sec-WebSocket-Key is missing"))?;
    if !is_websocket_key(key.as_bytes()) {
        return Err(ApiError::new(
            ApiErrorCode::BadWebSocketKey,
            "Sec-WebSocket-Key must be 16 bytes in base64 (24 characters ending in ==)",
        ));
    }
    Ok(key.clone())
}

/// RFC 6455 §4.2.1: the key is a nonce of 16 bytes, base64-encoded: 22 characters of the
/// alphabet, then `==`.
fn is_websocket_key(key: &[u8]) -> bool {
    let base64 = |b: &u8| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/';
    key.len() == 24 && key[..22].iter().all(base64) && &key[22..] == b"=="
}

#[cfg(test)]
mod tests {
    use super::is_websocket_key;

    #[test]
    fn a_websocket_key_is_16_bytes_in_base64() {
        assert!(is_websocket_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "RFC 6455's example");
        for bad in [
            &b""[..],
            b"!!!!",
            b"dGhlIHNhbXBsZSBub25jZQ",
            b"dGhlIHNhbXBsZSBub25jZQ=!",
            b"dGhlIHNhbXBsZSBub25j!Q==",
            b"dGhlIHNhbXBsZSBub25jZQ===",
        ] {
            assert!(!is_websocket_key(bad), "{:?}", std::str::from_utf8(bad));
        }
    }
}
