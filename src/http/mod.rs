//! The HTTP side: health, metrics, the publish API for the platform's backend, room queries,
//! and the WebSocket upgrade route. Every error answers JSON `{"error": code, "message": text}`.

pub mod cors;
pub mod error;
pub mod ops;
pub mod upgrade;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRef, Path, Query, Request, State};
use axum::handler::Handler;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};

use crate::admission::{PublishScope, Refusal};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::{debug, warn};

use crate::config::ServeConfig;
use crate::core::{JsonData, Kind, RoomName};
use crate::idempotency::{self, Answer, IdempotencyKey, KeyRefusal, Verdict};
use crate::node::Node;
use crate::registry::{HistoryPage, Published, Registry, RoomEvents};
use crate::transport::websocket::WebSocketSettings;

pub use self::error::{ApiError, ApiErrorCode};
/// The batch check (fuzzed) lives with the other peer-input parsers, in courtside-codecs.
pub use courtside_codecs::publish::{check_batch, CheckedItem};

/// What the HTTP side needs beyond the node, built from the configuration.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Largest request body.
    pub max_body: usize,
    /// Items in one batch publish, at most.
    pub max_batch: usize,
    /// How long an `Idempotency-Key` is remembered.
    pub idempotency_window: Duration,
    /// What the WebSocket connections it upgrades are given.
    pub websocket: WebSocketSettings,
    /// Which origins may read the client module, the certificate hash and the room reads.
    pub cors: cors::CorsPolicy,
}

impl HttpSettings {
    pub fn from_config(config: &ServeConfig) -> Self {
        Self {
            max_body: config.http.max_body,
            max_batch: config.http.max_batch,
            idempotency_window: config.http.idempotency_window,
            websocket: WebSocketSettings::from_config(config),
            cors: cors::CorsPolicy::new(&config.http.allowed_origins),
        }
    }
}

/// The routes' state: the node and the HTTP side's own settings.
#[derive(Debug, Clone)]
pub struct HttpState {
    pub node: Node,
    pub settings: Arc<HttpSettings>,
    /// Turns for history reads (`HISTORY_READS_AT_ONCE`).
    pub history_reads: Arc<tokio::sync::Semaphore>,
}

impl FromRef<HttpState> for Node {
    fn from_ref(state: &HttpState) -> Node {
        state.node.clone()
    }
}

/// All routes of the node (docs/openapi.yaml).
pub fn router(node: Node, settings: HttpSettings) -> Router {
    let max_body = settings.max_body;
    let state = HttpState {
        node: node.clone(),
        settings: Arc::new(settings),
        history_reads: Arc::new(tokio::sync::Semaphore::new(HISTORY_READS_AT_ONCE)),
    };
    let gate = || middleware::from_fn_with_state(state.clone(), publish_gate);
    // What a page on another origin reads: the module, the certificate hash, the room reads.
    let policy = Arc::new(state.settings.cors.clone());
    let cors = || middleware::from_fn_with_state(policy.clone(), cors::cors);
    let operators = || middleware::from_fn_with_state(state.clone(), ops::gate);
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/ws", get(upgrade::websocket))
        .route("/v1/cert-hash", get(cert_hash).options(read_preflight).layer(cors()))
        .route("/v1/nodes", get(nodes))
        .route("/", get(demo_page))
        .route(
            "/courtside.js",
            get(client_module).options(read_preflight).layer(cors()),
        )
        .route("/ops", get(ops::page.layer(operators())))
        .route("/v1/ops", get(ops::figures.layer(operators())))
        .route("/v1/rooms/{room}", get(room_info).options(room_preflight).layer(cors()))
        .route("/v1/rooms/{room}/state", post(publish_state.layer(gate())))
        .route(
            "/v1/rooms/{room}/events",
            get(room_events)
                .options(events_preflight)
                .layer(cors())
                .post(publish_event.layer(gate())),
        )
        .route("/v1/publish", post(publish_batch.layer(gate())))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn(error::json_errors))
        .with_state(state)
}

/// `OPTIONS` of a read-only CORS route.
async fn read_preflight() -> Response {
    cors::preflight("GET, HEAD, OPTIONS")
}

/// `OPTIONS /v1/rooms/{room}`: its room name is checked as `GET`'s is.
async fn room_preflight(Path(room): Path<String>) -> Result<Response, ApiError> {
    parse_room(&room)?;
    Ok(cors::preflight("GET, HEAD, OPTIONS"))
}

/// `OPTIONS /v1/rooms/{room}/events`: `Allow` names the publish too (CORS still allows reads only).
async fn events_preflight(Path(room): Path<String>) -> Result<Response, ApiError> {
    parse_room(&room)?;
    Ok(cors::preflight("GET, HEAD, POST, OPTIONS"))
}

async fn not_found() -> ApiError {
    ApiError::new(ApiErrorCode::NotFound, "no such endpoint")
}

async fn health(State(node): State<Node>) -> Response {
    let connections = node.metrics.connections();
    let body = serde_json::json!({
        "status": if node.is_draining() { "draining" } else { "ok" },
        "connections": connections,
        "rooms": node.hub.room_count(),
        "registry": node.registry.status(),
    });
    let status = if node.is_draining() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(node): State<Node>) -> Response {
    if let Some(drops) = node.udp_drops.get().and_then(|drops| drops.count()) {
        node.metrics.udp_receive_drops.set(drops as i64);
    }
    let content_type = HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8");
    ([(header::CONTENT_TYPE, content_type)], node.metrics.render()).into_response()
}

/// Live nodes of the cluster (this node alone with the embedded registry).
async fn nodes(State(node): State<Node>) -> Result<Response, ApiError> {
    let nodes = node.registry.nodes().await?;
    Ok(Json(serde_json::json!({ "nodes": nodes })).into_response())
}

/// The scoreboard demo page (fallback/index.html), embedded in the binary.
async fn demo_page() -> Response {
    let html = HeaderValue::from_static("text/html; charset=utf-8");
    (
        [(header::CONTENT_TYPE, html)],
        include_str!("../../fallback/index.html"),
    )
        .into_response()
}

/// The browser client (fallback/courtside.js), embedded in the binary.
async fn client_module() -> Response {
    let js = HeaderValue::from_static("text/javascript; charset=utf-8");
    let cache = HeaderValue::from_static("no-cache");
    (
        [(header::CONTENT_TYPE, js), (header::CACHE_CONTROL, cache)],
        include_str!("../../fallback/courtside.js"),
    )
        .into_response()
}

/// The WebTransport certificate's SHA-256, for `serverCertificateHashes` in development.
async fn cert_hash(State(node): State<Node>) -> Result<Response, ApiError> {
    let info = node.certificate.get().ok_or_else(|| {
        ApiError::new(
            ApiErrorCode::WebTransportDisabled,
            "this node does not serve WebTransport",
        )
    })?;
    let body = serde_json::json!({ "sha256": info.sha256, "self_signed": info.self_signed, "port": info.port });
    Ok((
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(body),
    )
        .into_response())
}

/// The client address of a request: its TCP peer, or behind a trusted proxy the address in
/// `X-Forwarded-For` (admission decides). `None` when the request did not come through the
/// server's listener (no `PeerAddr`).
fn client_ip(node: &Node, request: &Request) -> Option<std::net::IpAddr> {
    let peer = request.extensions().get::<crate::listener::PeerAddr>()?;
    let forwarded = request.headers().get("x-forwarded-for").map(HeaderValue::as_bytes);
    Some(node.admission.client_ip(peer.0.ip(), forwarded))
}

/// Every publish route's gate, in order: the credentials, and for a request without publish
/// credentials its client address's `--publish-rate-per-ip` (`Admission::admit_publish`: 401,
/// 429; the backend's valid credentials are never counted); then the body, read whole up to
/// `--max-body` (413). A refusal here is answered before the body is read (`answer_unread`).
async fn publish_gate(State(state): State<HttpState>, mut request: Request, next: Next) -> Response {
    let node = &state.node;
    let ip = client_ip(node, &request);
    match node.admission.admit_publish(ip, authorization(request.headers())) {
        // The handler checks each room against the scope before it publishes anything.
        Ok(scope) => {
            request.extensions_mut().insert(scope);
        }
        Err(refused) => {
            let mut response = error::ip_refusal(refused);
            if refused.refusal == Refusal::Unauthorized {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            let (parts, body) = request.into_parts();
            return answer_unread(&parts.headers, body, response, false);
        }
    }
    read_whole_body(state.settings.max_body, request, next).await
}

/// Bytes of a refused request's body read and dropped after its answer, at most.
pub const LINGER_BYTES: usize = 16 << 20;
/// Time a refused request's body is read and dropped after its answer, at most.
pub const LINGER_TIME: Duration = Duration::from_secs(10);

/// Answers `response` at once to a request whose body is unread (or not read to its end), and
/// reads the rest of the body in the background, dropping it, until it ends or `LINGER_BYTES`
/// or `LINGER_TIME` run out: a lingering close, as nginx's. Closed with unread bytes, the
/// connection would be reset, and the client would see the reset instead of the answer. With
/// `close` (a 413) the answer says `Connection: close`; otherwise a body that ends in time
/// leaves the connection open for the next request. A client that sent `Expect: 100-continue`
/// and was not told to continue sends no body: nothing is read, and the connection closes.
fn answer_unread(headers: &HeaderMap, body: axum::body::Body, mut response: Response, close: bool) -> Response {
    use axum::body::HttpBody;
    if close {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let expects_continue = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !expects_continue && !body.is_end_stream() {
        tokio::spawn(linger(body.into_data_stream()));
    }
    response
}

/// Reads and drops what is left of a refused request's body (`answer_unread`); returning drops
/// the body, and hyper then closes the connection unless the body ended.
async fn linger(mut chunks: axum::body::BodyDataStream) {
    use futures_util::StreamExt;
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut discarded = 0usize;
    let ended = loop {
        match tokio::time::timeout_at(deadline, chunks.next()).await {
            Ok(Some(Ok(chunk))) => discarded = discarded.saturating_add(chunk.len()),
            Ok(None) => break true,
            Ok(Some(Err(_))) | Err(_) => break false,
        }
        if discarded > LINGER_BYTES {
            break false;
        }
    };
    if !ended {
        debug!(discarded, "closing a connection whose refused body did not end");
    }
}

fn too_large(max_body: usize) -> Response {
    ApiError::new(
        ApiErrorCode::BodyTooLarge,
        format!("the body is larger than {max_body} bytes (--max-body)"),
    )
    .into_response()
}

/// Reads a publish's whole body (at most `max_body`) before its handler. One that its
/// `Content-Length` shows too large is answered 413 before any of it is read; one without
/// (chunked) is answered 413 as soon as it passes `max_body`. Either way the rest is read and
/// dropped after the answer, within bounds (`answer_unread`), and the connection closes.
async fn read_whole_body(max_body: usize, request: Request, next: Next) -> Response {
    use futures_util::StreamExt;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let (parts, body) = request.into_parts();
    if declared.is_some_and(|n| n > max_body as u64) {
        return answer_unread(&parts.headers, body, too_large(max_body), true);
    }
    let mut chunks = body.into_data_stream();
    let mut kept = bytes::BytesMut::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(error) => return ApiError::new(ApiErrorCode::BadBody, error.to_string()).into_response(),
        };
        if kept.len().saturating_add(chunk.len()) > max_body {
            let mut response = too_large(max_body);
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            // Polled already: any `Expect: 100-continue` was answered, and the rest is coming.
            tokio::spawn(linger(chunks));
            return response;
        }
        kept.extend_from_slice(&chunk);
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(kept.freeze())))
        .await
}

/// The request's `Authorization` value, for admission.
fn authorization(headers: &HeaderMap) -> Option<&[u8]> {
    headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes)
}

fn parse_room(name: &str) -> Result<RoomName, ApiError> {
    RoomName::parse(name).map_err(|e| ApiError::new(ApiErrorCode::BadRoom, e.to_string()))
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        let code = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiErrorCode::BodyTooLarge
        } else {
            ApiErrorCode::BadBody
        };
        ApiError::new(code, rejection.body_text())
    })
}

async fn publish_state(
    State(state): State<HttpState>,
    Path(room): Path<String>,
    scope: Option<Extension<PublishScope>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(error) = within_scope(scope.as_deref(), &room) {
        return error.into_response();
    }
    publish_one(&state, &room, Kind::State, &headers, body).await
}

async fn publish_event(
    State(state): State<HttpState>,
    Path(room): Path<String>,
    scope: Option<Extension<PublishScope>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(error) = within_scope(scope.as_deref(), &room) {
        return error.into_response();
    }
    publish_one(&state, &room, Kind::Event, &headers, body).await
}

/// A publish JWT's `publish` claim must name the room (403 `forbidden`, nothing published).
fn within_scope(scope: Option<&PublishScope>, room: &str) -> Result<(), ApiError> {
    match scope {
        Some(scope) => scope
            .check(room)
            .map_err(|e| ApiError::new(ApiErrorCode::Forbidden, e.to_string())),
        None => Ok(()),
    }
}

/// The request's `Idempotency-Key`, if it has one.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    headers
        .get(IDEMPOTENCY_KEY)
        .map(|value| IdempotencyKey::parse(value.as_bytes()))
        .transpose()
        .map_err(|e| ApiError::new(ApiErrorCode::BadIdempotencyKey, e.to_string()))
}

const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// A publish's `Idempotency-Key` (checked first) and body.
fn keyed_body(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(Option<IdempotencyKey>, Bytes), ApiError> {
    Ok((idempotency_key(headers)?, body_bytes(body)?))
}

/// A JSON answer kept as its status and body text, so that it can be replayed for a key.
fn json_answer<T: Serialize>(status: StatusCode, body: &T) -> (StatusCode, String) {
    (status, serde_json::to_string(body).unwrap_or_default())
}

fn error_answer(error: ApiError) -> (StatusCode, String) {
    (error.code.status(), error.body())
}

/// The error of a keyed request refused; `what` names the key (`Idempotency-Key`, or a batch
/// item's `idempotency_key`).
fn key_refusal(refusal: KeyRefusal, what: &str) -> ApiError {
    match refusal {
        KeyRefusal::InProgress => ApiError::new(
            ApiErrorCode::IdempotencyInProgress,
            format!("a request with this {what} is still being answered; retry"),
        ),
        KeyRefusal::Reused => ApiError::new(
            ApiErrorCode::IdempotencyKeyReused,
            format!("this {what} was used with a different request"),
        ),
        KeyRefusal::StoreFull => ApiError::new(
            ApiErrorCode::IdempotencyStoreFull,
            "this node keeps as many idempotency keys as it may; retry later",
        ),
    }
}

/// After a keyed publish: records its answer for the window, or, when it failed (`None`),
/// releases the key so that a retry may publish.
async fn settle_key(registry: &Arc<dyn Registry>, key: &IdempotencyKey, answer: Option<&Answer>, window: Duration) {
    match answer {
        Some(answer) => {
            if let Err(error) = registry.answer_key(key, answer, window).await {
                warn!(%error, "cannot record the answer to an idempotency key; a retry may publish again");
            }
        }
        None => registry.release_key(key).await,
    }
}

fn into_response((status, body): (StatusCode, String), replayed: bool) -> Response {
    let mut response = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// Runs `publish` once per idempotency key within the window: a repeat of the same request
/// gets the first answer (with `Idempotent-Replayed: true`) and publishes nothing; the key with
/// another request is 422, while the first is still being answered 409. A publish that fails
/// releases the key, so a retry may publish.
async fn once_per_key<F>(state: &HttpState, key: Option<IdempotencyKey>, fingerprint: String, publish: F) -> Response
where
    F: std::future::Future<Output = (StatusCode, String)> + Send + 'static,
{
    let Some(key) = key else {
        return into_response(publish.await, false);
    };
    let (registry, window) = (&state.node.registry, state.settings.idempotency_window);
    let claim = match registry.claim_key(&key, &fingerprint, window).await {
        Ok(claim) => claim,
        Err(error) => return ApiError::from(error).into_response(),
    };
    match claim.verdict(&fingerprint) {
        Verdict::Refuse(refusal) => key_refusal(refusal, "Idempotency-Key").into_response(),
        Verdict::Replay(answer) => {
            let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
            into_response((status, answer.body), true)
        }
        Verdict::Publish => {
            // In a task of its own: a publisher whose connection is cut mid-request must not
            // leave the key claimed with nothing published or recorded.
            let registry = registry.clone();
            let finished = tokio::spawn(async move {
                let (status, body) = publish.await;
                let answer = Answer {
                    fingerprint,
                    status: status.as_u16(),
                    body,
                };
                let ok = status.is_success();
                settle_key(&registry, &key, ok.then_some(&answer), window).await;
                (status, answer.body)
            });
            match finished.await {
                Ok(answer) => into_response(answer, false),
                Err(_) => {
                    ApiError::new(ApiErrorCode::RegistryUnavailable, "the publish did not finish").into_response()
                }
            }
        }
    }
}

async fn publish_one(
    state: &HttpState,
    room: &str,
    kind: Kind,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (key, body) = match keyed_body(headers, body) {
        Ok(request) => request,
        Err(error) => return error.into_response(),
    };
    let fingerprint = idempotency::fingerprint(&[kind.as_str().as_bytes(), room.as_bytes(), &body]);
    let (node, room) = (state.node.clone(), room.to_string());
    once_per_key(state, key, fingerprint, async move {
        publish_parsed(&node, &room, kind, &body)
            .await
            .unwrap_or_else(error_answer)
    })
    .await
}

async fn publish_parsed(node: &Node, room: &str, kind: Kind, body: &[u8]) -> Result<(StatusCode, String), ApiError> {
    let room = parse_room(room)?;
    let data = JsonData::parse(body).map_err(|e| ApiError::new(ApiErrorCode::BadJson, e.to_string()))?;
    let published = node.registry.publish(&room, kind, &data).await?;
    let view = PublishView::new(&room, kind, published);
    let status = if view.queued == Some(true) {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok(json_answer(status, &view))
}

/// The answer to a publish: the number assigned, or (Redis away) that it was queued.
#[derive(Serialize)]
struct PublishView {
    room: String,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    /// An event's identity (docs/PROTOCOL.md, "Event identity"), also while queued.
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    ts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    queued: Option<bool>,
}

impl PublishView {
    fn new(room: &RoomName, kind: Kind, published: Published) -> Self {
        let (number, id, ts, queued) = match published {
            Published::Numbered { number, id, ts_ms } => (Some(number), id, ts_ms, None),
            Published::Queued { provisional, id, ts_ms } => (provisional, id, ts_ms, Some(true)),
        };
        let (version, seq) = match kind {
            Kind::State => (number, None),
            Kind::Event => (None, number),
        };
        Self {
            room: room.to_string(),
            kind: None,
            version,
            seq,
            id: id.map(|id| id.to_string()),
            ts,
            queued,
        }
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum BatchResult {
    Published(PublishView),
    /// An item whose idempotency key was answered before: that first result, as it was.
    Replayed(Box<RawValue>),
    Failed {
        room: String,
        #[serde(rename = "type")]
        kind: &'static str,
        error: &'static str,
        message: String,
    },
}

/// `POST /v1/publish`: every item is checked before any is published, then all are published
/// in order with one ingest time. An `Idempotency-Key` covers the whole batch; an item's
/// `idempotency_key` covers that item.
async fn publish_batch(
    State(state): State<HttpState>,
    scope: Option<Extension<PublishScope>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (key, body) = match keyed_body(&headers, body) {
        Ok(request) => request,
        Err(error) => return error.into_response(),
    };
    let fingerprint = idempotency::fingerprint(&[b"batch", &body]);
    let owned = state.clone();
    let scope = scope.map(|Extension(scope)| scope);
    once_per_key(&state, key, fingerprint, async move {
        publish_batch_parsed(&owned, scope.as_ref(), &body)
            .await
            .unwrap_or_else(error_answer)
    })
    .await
}

async fn publish_batch_parsed(
    state: &HttpState,
    scope: Option<&PublishScope>,
    body: &[u8],
) -> Result<(StatusCode, String), ApiError> {
    let node = &state.node;
    let checked = check_batch(body, state.settings.max_batch, scope)?;
    let window = state.settings.idempotency_window;
    let mut results = Vec::with_capacity(checked.len());
    for CheckedItem { room, kind, data, key } in checked {
        let failed = |code: ApiErrorCode, message: String| BatchResult::Failed {
            room: room.to_string(),
            kind: kind.as_str(),
            error: code.name(),
            message,
        };
        let Some(key) = key else {
            results.push(publish_item(node, &room, kind, &data).await);
            continue;
        };
        let fingerprint = idempotency::fingerprint(&[
            kind.as_str().as_bytes(),
            room.as_str().as_bytes(),
            data.as_str().as_bytes(),
        ]);
        let verdict = node
            .registry
            .claim_key(&key, &fingerprint, window)
            .await
            .map(|claim| claim.verdict(&fingerprint));
        let result = match verdict {
            Err(error) => {
                let error = ApiError::from(error);
                failed(error.code, error.message)
            }
            Ok(Verdict::Refuse(refusal)) => {
                let error = key_refusal(refusal, "idempotency_key");
                failed(error.code, error.message)
            }
            Ok(Verdict::Replay(answer)) => match RawValue::from_string(answer.body) {
                Ok(first) => BatchResult::Replayed(first),
                Err(_) => failed(
                    ApiErrorCode::IdempotencyInProgress,
                    "the first result is unreadable".into(),
                ),
            },
            Ok(Verdict::Publish) => {
                let result = publish_item(node, &room, kind, &data).await;
                let answer = Answer {
                    fingerprint,
                    status: 200,
                    body: serde_json::to_string(&result).unwrap_or_default(),
                };
                let ok = matches!(result, BatchResult::Published(_));
                settle_key(&node.registry, &key, ok.then_some(&answer), window).await;
                result
            }
        };
        results.push(result);
    }
    Ok(json_answer(StatusCode::OK, &BatchResponse { results }))
}

/// Publishes one batch item.
async fn publish_item(node: &Node, room: &RoomName, kind: Kind, data: &JsonData) -> BatchResult {
    match node.registry.publish(room, kind, data).await {
        Ok(published) => BatchResult::Published(PublishView {
            kind: Some(kind.as_str()),
            ..PublishView::new(room, kind, published)
        }),
        Err(error) => {
            let error = ApiError::from(error);
            BatchResult::Failed {
                room: room.to_string(),
                kind: kind.as_str(),
                error: error.code.name(),
                message: error.message,
            }
        }
    }
}

#[derive(Serialize)]
struct BatchResponse {
    results: Vec<BatchResult>,
}

#[derive(Serialize)]
struct StateView<'a> {
    version: u64,
    ts: u64,
    data: &'a RawValue,
}

#[derive(Serialize)]
struct RoomView<'a> {
    room: &'a str,
    epoch: &'a str,
    version: u64,
    state: Option<StateView<'a>>,
    last_seq: u64,
    subscribers: u64,
}

fn room_not_found() -> ApiError {
    ApiError::new(ApiErrorCode::RoomNotFound, "this node holds no such room")
}

async fn room_info(
    State(node): State<Node>,
    Path(room): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let room = parse_room(&room)?;
    node.admission.may_read(room.as_str(), authorization(&headers))?;
    let figures = node.registry.room(&room).await?.ok_or_else(room_not_found)?;
    let state = figures.state.map(|s| (s.ts_ms, raw_json(s.data)));
    let state = state.as_ref().map(|(ts, data)| StateView {
        version: figures.version,
        ts: *ts,
        data,
    });
    let view = RoomView {
        room: room.as_str(),
        epoch: &figures.epoch,
        version: figures.version,
        state,
        last_seq: figures.last_seq,
        subscribers: figures.subscribers,
    };
    Ok(Json(view).into_response())
}

/// Stored JSON text as a raw value, taking the text over (it was validated when published).
fn raw_json(text: String) -> Box<RawValue> {
    RawValue::from_string(text).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

#[derive(Deserialize)]
struct SinceQuery {
    #[serde(default)]
    since: u64,
    limit: Option<usize>,
}

/// Events per page of `GET /v1/rooms/{room}/events` at most (and the default).
const HISTORY_PAGE_LIMIT: usize = 1000;
/// Data bytes per page past its first event.
const HISTORY_PAGE_BYTES: usize = 1 << 20;
/// History reads served at once; more wait their turn, so that concurrent readers of a large
/// history cost a bounded amount of memory.
pub const HISTORY_READS_AT_ONCE: usize = 8;

#[derive(Serialize)]
struct EventView<'a> {
    seq: u64,
    id: String,
    ts: u64,
    data: &'a RawValue,
}

/// `GET /v1/rooms/{room}/events`: each event's data goes out as the text that was published.
#[derive(Serialize)]
struct EventsView<'a> {
    room: &'a str,
    epoch: &'a str,
    last_seq: u64,
    events: Vec<EventView<'a>>,
    more: bool,
}

async fn room_events(
    State(state): State<HttpState>,
    Path(room): Path<String>,
    headers: HeaderMap,
    query: Result<Query<SinceQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let node = state.node;
    let room = parse_room(&room)?;
    node.admission.may_read(room.as_str(), authorization(&headers))?;
    let bad_query = || {
        ApiError::new(
            ApiErrorCode::BadQuery,
            format!("since must be an integer from 0 to 2^63-1, limit one from 1 to {HISTORY_PAGE_LIMIT}"),
        )
    };
    let Ok(Query(SinceQuery { since, limit })) = query else {
        return Err(bad_query());
    };
    let limit = limit.unwrap_or(HISTORY_PAGE_LIMIT);
    if since > i64::MAX as u64 || !(1..=HISTORY_PAGE_LIMIT).contains(&limit) {
        return Err(bad_query());
    }
    let page = HistoryPage {
        limit,
        max_bytes: HISTORY_PAGE_BYTES,
    };
    let _turn = state.history_reads.acquire().await;
    let RoomEvents { epoch, events, more } = node
        .registry
        .events_since(&room, since, page)
        .await?
        .ok_or_else(room_not_found)?;
    let events = events.map(|list| {
        list.into_iter()
            .map(|e| (e.seq, e.id, e.ts_ms, raw_json(e.data)))
            .collect::<Vec<_>>()
    });
    Ok(match events {
        Ok(events) => {
            let last_seq = events.last().map_or(since, |e| e.0);
            let views: Vec<EventView<'_>> = events
                .iter()
                .map(|(seq, id, ts, data)| EventView {
                    seq: *seq,
                    id: id.to_string(),
                    ts: *ts,
                    data,
                })
                .collect();
            // A typed body, not `json!`: that would re-parse each event's stored text into a
            // `Value`, which panics on what the publish API accepts (nesting of 128 levels,
            // 1e400, a lone surrogate) and alters the rest (big integers, key order).
            Json(EventsView {
                room: room.as_str(),
                epoch: &epoch,
                last_seq,
                events: views,
                more,
            })
            .into_response()
        }
        Err(last_seq) if since > last_seq => {
            let body = serde_json::json!({
                "error": ApiErrorCode::SinceAhead.name(),
                "message": "since is beyond the room's last seq (another epoch's?); read the state and start from last_seq",
                "epoch": epoch,
                "last_seq": last_seq,
            });
            (ApiErrorCode::SinceAhead.status(), Json(body)).into_response()
        }
        Err(last_seq) => {
            let body = serde_json::json!({
                "error": ApiErrorCode::HistoryGone.name(),
                "message": "the history no longer reaches back to since; read the state and start from last_seq",
                "epoch": epoch,
                "last_seq": last_seq,
            });
            (ApiErrorCode::HistoryGone.status(), Json(body)).into_response()
        }
    })
}
