//! CORS for what a page on another origin reads from the edge: the client module, the
//! certificate hash and the public room reads. The same `--allowed-origins` as WebSocket and
//! WebTransport decide; when it is unset, any origin may read (`*`), as any may connect.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, ApiErrorCode};

/// How long a browser may keep a preflight's answer, in seconds.
pub const PREFLIGHT_MAX_AGE_S: u32 = 600;

/// Which browser origins may read the CORS routes (`--allowed-origins`).
#[derive(Debug, Clone, Default)]
pub struct CorsPolicy {
    /// Empty: any origin.
    allowed: Vec<String>,
}

/// What the policy says about one request's `Origin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsDecision {
    /// No `Origin` with a list of origins (not a cross-origin browser request): no CORS headers.
    NoOrigin,
    /// Allowed: `Access-Control-Allow-Origin` carries this value (`*` or the origin itself).
    Allow(HeaderValue),
    /// An origin outside the list: no CORS headers, so the browser withholds the answer.
    Refuse,
}

impl CorsPolicy {
    pub fn new(allowed_origins: &[String]) -> Self {
        Self {
            allowed: allowed_origins.to_vec(),
        }
    }

    /// The decision for a request carrying `origin`.
    pub fn decide(&self, origin: Option<&HeaderValue>) -> CorsDecision {
        // Any origin: `*` on every answer, with an `Origin` or without, so that a cache that
        // kept an answer to a request without one serves it to a page of another origin intact.
        if self.allowed.is_empty() {
            return CorsDecision::Allow(HeaderValue::from_static("*"));
        }
        let Some(origin) = origin else {
            return CorsDecision::NoOrigin;
        };
        if self.allowed.iter().any(|a| a.as_bytes() == origin.as_bytes()) {
            CorsDecision::Allow(origin.clone())
        } else {
            CorsDecision::Refuse
        }
    }

    /// Whether the answer depends on `Origin` (then caches must keep one per origin).
    fn varies(&self) -> bool {
        !self.allowed.is_empty()
    }
}

/// What a CORS route's `OPTIONS` answers once the middleware let it through (the middleware
/// then adds the CORS headers): 204 with the path's methods in `Allow`.
pub fn preflight(allow: &'static str) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

/// Middleware of the CORS routes. `OPTIONS` is the preflight: 204 with the methods (`GET`,
/// `HEAD`) and the request header (`Authorization`, for private rooms) a page may use, or 403
/// `origin_not_allowed` for an origin outside the list. A `GET` or `HEAD` is answered as usual,
/// with `Access-Control-Allow-Origin` when its origin is allowed, errors included (a page reads
/// a 410 as a 410); from an origin outside the list it is answered without, so the browser
/// withholds it from the page. Any other method (a publish) passes untouched.
pub async fn cors(State(policy): State<Arc<CorsPolicy>>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let preflight = method == Method::OPTIONS;
    if !(preflight || method == Method::GET || method == Method::HEAD) {
        return next.run(request).await;
    }
    let decision = policy.decide(request.headers().get(header::ORIGIN));
    let mut response = if preflight && decision == CorsDecision::Refuse {
        ApiError::new(
            ApiErrorCode::OriginNotAllowed,
            "this origin is not in --allowed-origins",
        )
        .into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    if let CorsDecision::Allow(value) = decision {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        if preflight {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, HEAD"),
            );
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("authorization"),
            );
            headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from(PREFLIGHT_MAX_AGE_S));
        }
    }
    if policy.varies() {
        headers.append(header::VARY, HeaderValue::from_static("origin"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(s: &'static str) -> HeaderValue {
        HeaderValue::from_static(s)
    }

    #[test]
    fn an_unset_list_allows_any_origin_with_a_star() {
        let policy = CorsPolicy::new(&[]);
        assert_eq!(
            policy.decide(Some(&origin("https://scores.example.org"))),
            CorsDecision::Allow(origin("*"))
        );
        assert_eq!(
            policy.decide(None),
            CorsDecision::Allow(origin("*")),
            "without an Origin too: the answer never varies"
        );
        assert!(!policy.varies());
    }

    #[test]
    fn a_list_echoes_its_origins_and_refuses_others() {
        let policy = CorsPolicy::new(&["https://scores.example.org".to_string()]);
        assert_eq!(
            policy.decide(Some(&origin("https://scores.example.org"))),
            CorsDecision::Allow(origin("https://scores.example.org"))
        );
        assert_eq!(
            policy.decide(Some(&origin("https://scores.example.org.evil.test"))),
            CorsDecision::Refuse
        );
        assert_eq!(policy.decide(Some(&origin("null"))), CorsDecision::Refuse);
        assert!(policy.varies());
    }
}
