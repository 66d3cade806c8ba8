//! Every error the HTTP side answers, in one table: each code's status and name (docs/openapi.yaml),
//! as `core::protocol` holds the client protocol's codes. Bodies are `{"error": name, "message": text}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::admission::Refusal;
use crate::hub::HubError;
use crate::registry::RegistryError;

/// The error codes of the HTTP API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiErrorCode {
    /// No such endpoint.
    NotFound,
    /// The room name breaks the naming rules.
    BadRoom,
    /// The body is not one JSON value.
    BadJson,
    /// The batch is not `{"messages": [...]}` with 1 to `--max-batch` items.
    BadBatch,
    /// The body could not be read.
    BadBody,
    /// The body is larger than `--max-body`.
    BodyTooLarge,
    /// A query parameter is not what the endpoint takes.
    BadQuery,
    /// Publishing needs a valid bearer token.
    Unauthorized,
    /// The node holds no such room.
    RoomNotFound,
    /// The history no longer reaches back to `since`.
    HistoryGone,
    /// `since` is beyond the room's last sequence (from another epoch, or made up).
    SinceAhead,
    /// The node holds its maximum number of rooms.
    RoomLimit,
    /// Redis is unreachable (and, for publishes, the outbox is full).
    RegistryUnavailable,
    /// This node does not serve WebTransport.
    WebTransportDisabled,
    /// The node is shutting down.
    Draining,
    /// The browser origin may not open a connection here.
    OriginNotAllowed,
    /// The token does not allow this room (a private room's read, a publish outside its scope).
    Forbidden,
    /// The client address holds `--max-connections-per-ip` connections already.
    IpConnectionLimit,
    /// The client address made its `--connection-rate-per-ip` or `--publish-rate-per-ip`
    /// requests of the last minute.
    IpRateLimited,
    /// The node holds its maximum number of connections.
    ConnectionLimit,
    /// `/ws` needs a WebSocket upgrade.
    UpgradeRequired,
    /// `Sec-WebSocket-Version` is not 13.
    BadWebSocketVersion,
    /// `Sec-WebSocket-Key` is missing.
    BadWebSocketKey,
    /// `Idempotency-Key` (or a batch item's `idempotency_key`) is not 1 to 255 visible ASCII characters.
    BadIdempotencyKey,
    /// The key was used before with a different request.
    IdempotencyKeyReused,
    /// A request with this key is still being answered.
    IdempotencyInProgress,
    /// The node keeps as many keys as it may (embedded registry); retry once keys expire.
    IdempotencyStoreFull,
    /// A request the router could not take apart (a path that is not UTF-8, for example).
    BadRequest,
    /// The endpoint does not take this method (the `Allow` header lists those it takes).
    MethodNotAllowed,
    /// The URL is longer than the server reads.
    UriTooLong,
}

impl ApiErrorCode {
    /// The code's name in error bodies.
    pub fn name(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::BadRoom => "bad_room",
            Self::BadJson => "bad_json",
            Self::BadBatch => "bad_batch",
            Self::BadBody => "bad_body",
            Self::BodyTooLarge => "body_too_large",
            Self::BadQuery => "bad_query",
            Self::Unauthorized => "unauthorized",
            Self::RoomNotFound => "room_not_found",
            Self::HistoryGone => "history_gone",
            Self::SinceAhead => "since_ahead",
            Self::RoomLimit => "room_limit",
            Self::RegistryUnavailable => "registry_unavailable",
            Self::WebTransportDisabled => "webtransport_disabled",
            Self::Draining => "draining",
            Self::OriginNotAllowed => "origin_not_allowed",
            Self::Forbidden => "forbidden",
            Self::IpConnectionLimit => "ip_connection_limit",
            Self::IpRateLimited => "ip_rate_limited",
            Self::ConnectionLimit => "connection_limit",
            Self::UpgradeRequired => "upgrade_required",
            Self::BadWebSocketVersion => "bad_websocket_version",
            Self::BadWebSocketKey => "bad_websocket_key",
            Self::BadIdempotencyKey => "bad_idempotency_key",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::IdempotencyInProgress => "idempotency_in_progress",
            Self::IdempotencyStoreFull => "idempotency_store_full",
            Self::BadRequest => "bad_request",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::UriTooLong => "uri_too_long",
        }
    }

    /// The status it is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            Self::NotFound | Self::RoomNotFound | Self::WebTransportDisabled => StatusCode::NOT_FOUND,
            Self::BadRoom
            | Self::BadJson
            | Self::BadBatch
            | Self::BadBody
            | Self::BadQuery
            | Self::BadWebSocketKey
            | Self::BadIdempotencyKey
            | Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::UriTooLong => StatusCode::URI_TOO_LONG,
            Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::IdempotencyInProgress | Self::SinceAhead => StatusCode::CONFLICT,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::HistoryGone => StatusCode::GONE,
            Self::RoomLimit
            | Self::RegistryUnavailable
            | Self::Draining
            | Self::ConnectionLimit
            | Self::IdempotencyStoreFull => StatusCode::SERVICE_UNAVAILABLE,
            Self::OriginNotAllowed | Self::Forbidden => StatusCode::FORBIDDEN,
            Self::IpConnectionLimit | Self::IpRateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::UpgradeRequired | Self::BadWebSocketVersion => StatusCode::UPGRADE_REQUIRED,
        }
    }
}

/// An HTTP error answer: a code of the table and a message for people.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ApiErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ApiErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
}

impl ApiError {
    /// The JSON body every error answer has: `{"error": name, "message": text}`.
    pub fn body(&self) -> String {
        let body = ErrorBody {
            error: self.code.name(),
            message: &self.message,
        };
        serde_json::to_string(&body).unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.code.status(),
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            self.body(),
        )
            .into_response()
    }
}

impl From<HubError> for ApiError {
    fn from(error: HubError) -> Self {
        match error {
            HubError::RoomLimit(_) => ApiError::new(ApiErrorCode::RoomLimit, error.to_string()),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(error: RegistryError) -> Self {
        match error {
            RegistryError::Hub(error) => error.into(),
            RegistryError::OutboxFull(_) | RegistryError::Unavailable(_) => {
                ApiError::new(ApiErrorCode::RegistryUnavailable, error.to_string())
            }
        }
    }
}

/// URLs longer than this are answered 414 `uri_too_long` (hyper answers beyond 64 KiB itself).
pub const MAX_URI_BYTES: usize = 8192;

/// Middleware: what the router answers by itself (a path that is not UTF-8, a method an
/// endpoint does not take) gets the documented JSON error body too, headers such as `Allow`
/// kept; and a URL beyond `MAX_URI_BYTES` is refused before routing.
pub async fn json_errors(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let uri = request.uri();
    let uri_len = uri.path().len() + uri.query().map_or(0, |q| q.len() + 1);
    if uri_len > MAX_URI_BYTES {
        return ApiError::new(
            ApiErrorCode::UriTooLong,
            format!("the URL is {uri_len} bytes; at most {MAX_URI_BYTES} are read"),
        )
        .into_response();
    }
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let code = match status {
        StatusCode::BAD_REQUEST => ApiErrorCode::BadRequest,
        StatusCode::NOT_FOUND => ApiErrorCode::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ApiErrorCode::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => ApiErrorCode::BodyTooLarge,
        StatusCode::URI_TOO_LONG => ApiErrorCode::UriTooLong,
        _ => return response,
    };
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let message = match code {
        ApiErrorCode::MethodNotAllowed => "this endpoint does not take this method (see Allow)".to_string(),
        _ if text.is_empty() => status.canonical_reason().unwrap_or("error").to_string(),
        _ => String::from_utf8_lossy(&text).into_owned(),
    };
    let error = ApiError::new(code, message);
    parts.headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(error.body()))
}

impl ApiErrorCode {
    /// The code that answers an admission refusal.
    pub fn from_refusal(refusal: Refusal) -> Self {
        match refusal {
            Refusal::ConnectionLimit => Self::ConnectionLimit,
            Refusal::Draining => Self::Draining,
            Refusal::OriginNotAllowed => Self::OriginNotAllowed,
            Refusal::Unauthorized => Self::Unauthorized,
            Refusal::Forbidden => Self::Forbidden,
            Refusal::IpConnectionLimit => Self::IpConnectionLimit,
            Refusal::IpRateLimited => Self::IpRateLimited,
        }
    }
}

/// The answer to a refused client address: 429 with the documented code, and `Retry-After`
/// when the address is over a per-minute rate.
pub fn ip_refusal(refused: crate::admission::IpRefusal) -> Response {
    let message = match refused.refusal {
        Refusal::IpRateLimited => {
            "too many requests from this address in the last minute (--connection-rate-per-ip, --publish-rate-per-ip)"
        }
        Refusal::IpConnectionLimit => "too many connections from this address (--max-connections-per-ip)",
        other => return ApiError::from(other).into_response(),
    };
    let mut response = ApiError::new(ApiErrorCode::from_refusal(refused.refusal), message).into_response();
    if let Some(seconds) = refused.retry_after_s {
        response
            .headers_mut()
            .insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(seconds));
    }
    response
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        ApiError::new(ApiErrorCode::from_refusal(refusal), refusal.to_string())
    }
}

impl From<courtside_codecs::publish::BatchError> for ApiError {
    fn from(error: courtside_codecs::publish::BatchError) -> Self {
        use courtside_codecs::publish::BatchRefusal;
        let code = match error.refusal {
            BatchRefusal::BadBatch => ApiErrorCode::BadBatch,
            BatchRefusal::BadRoom => ApiErrorCode::BadRoom,
            BatchRefusal::Forbidden => ApiErrorCode::Forbidden,
            BatchRefusal::BadIdempotencyKey => ApiErrorCode::BadIdempotencyKey,
        };
        ApiError::new(code, error.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_refusals_keep_their_status_and_name() {
        for refusal in [
            Refusal::ConnectionLimit,
            Refusal::OriginNotAllowed,
            Refusal::Unauthorized,
            Refusal::Forbidden,
            Refusal::IpConnectionLimit,
            Refusal::IpRateLimited,
        ] {
            let error = ApiError::from(refusal);
            assert_eq!(error.code.status().as_u16(), refusal.status());
            assert_eq!(error.code.name(), refusal.name());
        }
    }
}
