//! The operations page (`GET /ops`, fallback/ops.html) and its figures (`GET /v1/ops`): for the
//! publish token or a JWT with `"ops": true`, and answered 401 with a `Basic` challenge otherwise,
//! so that a browser asks for the token itself (ARCHITECTURE.md, "The operations page").

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::value::RawValue;

use super::error::{self, ApiError, ApiErrorCode};
use super::{authorization, client_ip, HttpState};
use crate::admission::Refusal;
use crate::node::Node;

/// The challenge of a 401: a browser shows its login prompt, and sends the token as the password.
const CHALLENGE: &str = "Basic realm=\"Courtside operations\", charset=\"UTF-8\"";

/// Both routes' gate (`Admission::admit_operator`): 401 with the challenge, 403, or 429.
pub async fn gate(State(state): State<HttpState>, request: Request, next: Next) -> Response {
    let node = &state.node;
    let ip = client_ip(node, &request);
    match node.admission.admit_operator(ip, authorization(request.headers())) {
        Ok(()) => next.run(request).await,
        Err(refused) if refused.refusal == Refusal::Unauthorized => {
            let mut response = ApiError::new(
                ApiErrorCode::from_refusal(Refusal::Unauthorized),
                "the operations page needs the publish token or a JWT with \"ops\": true \
                 (Authorization: Bearer <token>, or Basic with the token as the password)",
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(CHALLENGE));
            response
        }
        Err(refused) => error::ip_refusal(refused),
    }
}

/// The page, embedded in the binary.
pub async fn page() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        include_str!("../../fallback/ops.html"),
    )
        .into_response()
}

/// This node's newest summary (`null` in its first second) and every live node's, as their
/// heartbeats shared them (docs/openapi.yaml, `GET /v1/ops`).
pub async fn figures(State(node): State<Node>) -> Response {
    let summary = node.ops.latest();
    let (nodes, nodes_error) = match node.registry.nodes().await {
        Ok(records) => (records, None),
        Err(error) => (Vec::new(), Some(error.to_string())),
    };
    let nodes: Vec<serde_json::Value> = nodes
        .into_iter()
        .map(|record| {
            // A node's summary is its own JSON, passed through as it wrote it.
            let ops = record
                .ops
                .as_deref()
                .and_then(|json| serde_json::from_str::<&RawValue>(json).ok());
            serde_json::json!({
                "id": record.id,
                "http": record.http,
                "connections": record.connections,
                "subscriptions": record.subscriptions,
                "rooms": record.rooms,
                "ops": ops,
            })
        })
        .collect();
    let body = serde_json::json!({
        "node": summary.as_deref(),
        "nodes": nodes,
        "nodes_error": nodes_error,
        "kpi_ms": {"p50": 100, "p95": 500, "p99": 1000},
    });
    (
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(body),
    )
        .into_response()
}
