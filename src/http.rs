//! The HTTP side: health, metrics, the publish API for the platform's backend, room queries,
//! and the WebSocket upgrade route. Every error answers JSON `{"error": code, "message": text}`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::handler::Handler;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::core::{JsonData, Kind, Publication, RoomName};
use crate::hub::{HubError, RoomHistory};
use crate::node::Node;
use crate::registry::{Published, RegistryError};
use crate::transport::{websocket, webtransport};

/// All routes of the node (docs/openapi.yaml).
pub fn router(node: Node, max_body: usize) -> Router {
    let auth = || middleware::from_fn_with_state(node.clone(), require_token);
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/ws", get(websocket::upgrade))
        .route("/v1/cert-hash", get(cert_hash))
        .route("/v1/nodes", get(nodes))
        .route("/", get(demo_page))
        .route("/courtside.js", get(client_module))
        .route("/v1/rooms/{room}", get(room_info))
        .route("/v1/rooms/{room}/state", post(publish_state.layer(auth())))
        .route(
            "/v1/rooms/{room}/events",
            post(publish_event.layer(auth())).get(room_events),
        )
        .route("/v1/publish", post(publish_batch.layer(auth())))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(node)
}

/// An HTTP error answer: a status and a JSON body `{"error": code, "message": text}`, where
/// `code` is one of the names listed in docs/openapi.yaml.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.code,
                message: &self.message,
            }),
        )
            .into_response()
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn health(State(node): State<Node>) -> Response {
    let connections = node.metrics.websocket.connections.get() + node.metrics.webtransport.connections.get();
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
    if let Some(drops) = node
        .udp_socket_inode
        .get()
        .and_then(|inode| webtransport::udp_drops(*inode))
    {
        node.metrics.udp_receive_drops.set(drops as i64);
    }
    let content_type = HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8");
    ([(header::CONTENT_TYPE, content_type)], node.metrics.render()).into_response()
}

/// Live nodes of the cluster (this node alone with the embedded registry).
async fn nodes(State(node): State<Node>) -> Result<Response, ApiError> {
    let Some(redis) = node.registry.redis() else {
        let connections = node.metrics.websocket.connections.get() + node.metrics.webtransport.connections.get();
        let me = serde_json::json!({
            "id": "local",
            "http": "",
            "connections": connections,
            "subscriptions": node.metrics.subscriptions.get(),
            "rooms": node.hub.room_count(),
        });
        return Ok(Json(serde_json::json!({ "nodes": [me] })).into_response());
    };
    let nodes = redis.live_nodes().await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "registry_unavailable",
            format!("redis: {e}"),
        )
    })?;
    Ok(Json(serde_json::json!({ "nodes": nodes })).into_response())
}

/// The scoreboard demo page (fallback/index.html), embedded in the binary.
async fn demo_page() -> Response {
    let html = HeaderValue::from_static("text/html; charset=utf-8");
    ([(header::CONTENT_TYPE, html)], include_str!("../fallback/index.html")).into_response()
}

/// The browser client (fallback/courtside.js), embedded in the binary.
async fn client_module() -> Response {
    let js = HeaderValue::from_static("text/javascript; charset=utf-8");
    let cache = HeaderValue::from_static("no-cache");
    (
        [(header::CONTENT_TYPE, js), (header::CACHE_CONTROL, cache)],
        include_str!("../fallback/courtside.js"),
    )
        .into_response()
}

/// The WebTransport certificate's SHA-256, for `serverCertificateHashes` in development.
async fn cert_hash(State(node): State<Node>) -> Result<Response, ApiError> {
    let info = node.certificate.get().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "webtransport_disabled",
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

/// Publishing needs `Authorization: Bearer <token>`; checked before the body is read.
async fn require_token(State(node): State<Node>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(token) if constant_time_eq(token.as_bytes(), node.publish_token.as_bytes()) => next.run(request).await,
        _ => {
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid publish token is required: Authorization: Bearer <token>",
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn parse_room(name: &str) -> Result<RoomName, ApiError> {
    RoomName::parse(name).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_room", e.to_string()))
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        let status = rejection.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "body_too_large"
        } else {
            "bad_body"
        };
        ApiError::new(status, code, rejection.body_text())
    })
}

impl From<HubError> for ApiError {
    fn from(error: HubError) -> Self {
        match error {
            HubError::RoomLimit(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "room_limit", error.to_string()),
        }
    }
}

async fn publish_state(
    State(node): State<Node>,
    Path(room): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    publish_one(&node, &room, Kind::State, body).await
}

async fn publish_event(
    State(node): State<Node>,
    Path(room): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    publish_one(&node, &room, Kind::Event, body).await
}

async fn publish_one(
    node: &Node,
    room: &str,
    kind: Kind,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let room = parse_room(room)?;
    let body = body_bytes(body)?;
    let data = JsonData::parse(&body).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_json", e.to_string()))?;
    let published = node.registry.publish(&node.hub, &room, kind, &data).await?;
    let view = PublishView::new(&room, kind, published);
    let status = if view.queued == Some(true) {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)).into_response())
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
    ts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    queued: Option<bool>,
}

impl PublishView {
    fn new(room: &RoomName, kind: Kind, published: Published) -> Self {
        let (number, ts, queued) = match published {
            Published::Numbered { number, ts_ms } => (Some(number), ts_ms, None),
            Published::Queued { provisional, ts_ms } => (provisional, ts_ms, Some(true)),
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
            ts,
            queued,
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(error: RegistryError) -> Self {
        match error {
            RegistryError::Hub(error) => error.into(),
            RegistryError::OutboxFull(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "registry_unavailable",
                error.to_string(),
            ),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum BatchKind {
    State,
    Event,
}

#[derive(Deserialize)]
struct BatchItem<'a> {
    room: String,
    #[serde(rename = "type")]
    kind: BatchKind,
    #[serde(borrow)]
    data: &'a RawValue,
}

#[derive(Deserialize)]
struct Batch<'a> {
    #[serde(borrow)]
    messages: Vec<BatchItem<'a>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum BatchResult {
    Published(PublishView),
    Failed {
        room: String,
        #[serde(rename = "type")]
        kind: &'static str,
        error: &'static str,
        message: String,
    },
}

/// `POST /v1/publish`: every item is checked before any is published, then all are published
/// in order with one ingest time.
async fn publish_batch(
    State(node): State<Node>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<BatchResponse>, ApiError> {
    let body = body_bytes(body)?;
    let batch: Batch<'_> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_batch", e.to_string()))?;
    if batch.messages.is_empty() || batch.messages.len() > node.max_batch {
        let message = format!("a batch holds 1 to {} messages", node.max_batch);
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_batch", message));
    }
    let mut checked = Vec::with_capacity(batch.messages.len());
    for (i, item) in batch.messages.iter().enumerate() {
        let room = RoomName::parse(&item.room)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_room", format!("messages[{i}]: {e}")))?;
        checked.push((room, &item.kind, JsonData::from_raw(item.data)));
    }
    let mut results = Vec::with_capacity(checked.len());
    for (room, kind, data) in checked {
        let (kind, name) = match kind {
            BatchKind::State => (Kind::State, "state"),
            BatchKind::Event => (Kind::Event, "event"),
        };
        let result = match node.registry.publish(&node.hub, &room, kind, &data).await {
            Ok(published) => BatchResult::Published(PublishView {
                kind: Some(name),
                ..PublishView::new(&room, kind, published)
            }),
            Err(error) => {
                let error = ApiError::from(error);
                BatchResult::Failed {
                    room: room.to_string(),
                    kind: name,
                    error: error.code,
                    message: error.message,
                }
            }
        };
        results.push(result);
    }
    Ok(Json(BatchResponse { results }))
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

fn data_of(p: &Publication) -> &RawValue {
    // The data was validated as JSON when it was published.
    serde_json::from_str(p.data()).unwrap_or(RawValue::NULL)
}

#[derive(Serialize)]
struct RoomView<'a> {
    room: &'a str,
    epoch: &'a str,
    version: u64,
    state: Option<StateView<'a>>,
    last_seq: u64,
    subscribers: usize,
}

fn room_not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "room_not_found", "this node holds no such room")
}

async fn room_info(State(node): State<Node>, Path(room): Path<String>) -> Result<Response, ApiError> {
    let room = parse_room(&room)?;
    if let Some(redis) = node.registry.redis() {
        // The cluster's view; while Redis is away, this node's own view below.
        if let Ok(shared) = redis.room(&room).await {
            let shared = shared.ok_or_else(room_not_found)?;
            let data = shared.state.as_deref().map(raw_json);
            let state = data.as_ref().map(|d| StateView {
                version: shared.version,
                ts: shared.state_ts,
                data: d,
            });
            let view = RoomView {
                room: room.as_str(),
                epoch: &shared.epoch,
                version: shared.version,
                state,
                last_seq: shared.last_seq,
                subscribers: shared.subscribers as usize,
            };
            return Ok(Json(view).into_response());
        }
    }
    let info = node.hub.room_info(&room).ok_or_else(room_not_found)?;
    let state = info.state.as_deref().map(|p| StateView {
        version: info.version,
        ts: p.ts_ms,
        data: data_of(p),
    });
    let view = RoomView {
        room: room.as_str(),
        epoch: &info.epoch,
        version: info.version,
        state,
        last_seq: info.last_seq,
        subscribers: info.subscribers,
    };
    Ok(Json(view).into_response())
}

/// Events (seq, ts, data) after `since`, or the last sequence when the history does not reach back.
type EventList = Result<Vec<(u64, u64, Box<RawValue>)>, u64>;

/// Stored JSON text as a raw value (it was validated when published).
fn raw_json(text: &str) -> Box<RawValue> {
    RawValue::from_string(text.to_string()).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

#[derive(Deserialize)]
struct SinceQuery {
    #[serde(default)]
    since: u64,
}

#[derive(Serialize)]
struct EventView<'a> {
    seq: u64,
    ts: u64,
    data: &'a RawValue,
}

async fn room_events(
    State(node): State<Node>,
    Path(room): Path<String>,
    query: Result<Query<SinceQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let room = parse_room(&room)?;
    let Ok(Query(SinceQuery { since })) = query else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "since must be a non-negative integer",
        ));
    };
    let now_ms = crate::clock::unix_ms();
    let (epoch, events): (String, EventList) = match node.registry.redis() {
        Some(redis) => {
            let (epoch, events) = redis
                .events(&room, since)
                .await
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "registry_unavailable",
                        format!("redis: {e}"),
                    )
                })?
                .ok_or_else(room_not_found)?;
            (
                epoch,
                events.map(|list| {
                    list.into_iter()
                        .map(|(seq, ts, data)| (seq, ts, raw_json(&data)))
                        .collect()
                }),
            )
        }
        None => {
            let RoomHistory { epoch, events } =
                node.hub.room_events(&room, since, now_ms).ok_or_else(room_not_found)?;
            let events = events.map(|list| list.iter().map(|p| (p.number(), p.ts_ms, raw_json(p.data()))).collect());
            (epoch, events)
        }
    };
    Ok(match events {
        Ok(events) => {
            let last_seq = events.last().map_or(since, |e| e.0);
            let views: Vec<EventView<'_>> = events
                .iter()
                .map(|(seq, ts, data)| EventView {
                    seq: *seq,
                    ts: *ts,
                    data,
                })
                .collect();
            Json(serde_json::json!({ "room": room.as_str(), "epoch": epoch, "last_seq": last_seq, "events": views }))
                .into_response()
        }
        Err(last_seq) => {
            let body = serde_json::json!({
                "error": "history_gone",
                "message": "the history no longer reaches back to since; read the state and start from last_seq",
                "epoch": epoch,
                "last_seq": last_seq,
            });
            (StatusCode::GONE, Json(body)).into_response()
        }
    })
}
