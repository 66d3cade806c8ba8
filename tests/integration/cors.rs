use bytes::Bytes;
use serde_json::Value;

use crate::util::{request, TestServer, TOKEN};

/// The CORS headers of an answer: `(Access-Control-Allow-Origin, Vary)`.
fn cors_headers(headers: &hyper::HeaderMap) -> (Option<String>, Option<String>) {
    let text = |name: &str| headers.get(name).map(|v| v.to_str().expect("ASCII header").to_string());
    (text("access-control-allow-origin"), text("vary"))
}

async fn get_from(server: &TestServer, path: &str, origin: Option<&str>) -> (u16, hyper::HeaderMap) {
    let headers: Vec<(&str, &str)> = origin.map(|o| ("origin", o)).into_iter().collect();
    let (status, headers, _) = request(server.http, "GET", path, None, &headers, Bytes::new()).await;
    (status, headers)
}

async fn preflight(server: &TestServer, path: &str, origin: &str) -> (u16, hyper::HeaderMap, Bytes) {
    let headers = [
        ("origin", origin),
        ("access-control-request-method", "GET"),
        ("access-control-request-headers", "authorization"),
    ];
    request(server.http, "OPTIONS", path, None, &headers, Bytes::new()).await
}

/// Every route a page on another origin reads (the room exists, so every read is a 200).
const READS: [&str; 4] = [
    "/courtside.js",
    "/v1/cert-hash",
    "/v1/rooms/game:1",
    "/v1/rooms/game:1/events?since=0",
];

#[tokio::test]
async fn without_allowed_origins_any_origin_may_read_the_module_the_hash_and_the_rooms() {
    let server = TestServer::start(&[]);
    server.publish_event("game:1", "1").await;
    for path in READS {
        let (status, headers) = get_from(&server, path, Some("https://scores.example.org")).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(cors_headers(&headers), (Some("*".into()), None), "{path}");
        // Without Origin the same answer, so that a shared cache that kept it serves it to a
        // page of another origin intact.
        let (_, headers) = get_from(&server, path, None).await;
        assert_eq!(cors_headers(&headers), (Some("*".into()), None), "{path}");
    }
    // An error is readable too: the client reads a 404 or a 410 as what it is.
    let (status, headers) = get_from(&server, "/v1/rooms/game:404", Some("https://a.example")).await;
    assert_eq!(status, 404);
    assert_eq!(cors_headers(&headers).0.as_deref(), Some("*"));

    let (status, headers, body) = preflight(&server, "/v1/rooms/game:1/events", "https://a.example").await;
    assert_eq!(status, 204, "{body:?}");
    assert_eq!(headers["access-control-allow-origin"], "*");
    assert_eq!(headers["access-control-allow-methods"], "GET, HEAD");
    assert_eq!(headers["access-control-allow-headers"], "authorization");
    assert_eq!(headers["access-control-max-age"], "600");
    // Allow lists the path's methods, the backend's publish included; CORS allows reads only.
    assert_eq!(headers["allow"], "GET, HEAD, POST, OPTIONS");
    let (status, headers, _) = preflight(&server, "/v1/rooms/game:1", "https://a.example").await;
    assert_eq!(status, 204);
    assert_eq!(headers["allow"], "GET, HEAD, OPTIONS");
    // A room name that breaks the rules is refused as GET refuses it.
    let (status, _, body) = preflight(&server, "/v1/rooms/bad%20room", "https://a.example").await;
    assert_eq!(status, 400);
    let body: Value = serde_json::from_slice(&body).expect("JSON error body");
    assert_eq!(body["error"], "bad_room");

    // The publish API is not opened to pages: its answers carry no CORS header.
    let (status, headers, _) = request(
        server.http,
        "POST",
        "/v1/rooms/game:1/events",
        Some(TOKEN),
        &[("origin", "https://a.example")],
        Bytes::from_static(b"2"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(cors_headers(&headers), (None, None));
}

#[tokio::test]
async fn with_allowed_origins_a_listed_origin_is_echoed_and_another_is_refused() {
    let listed = "http://localhost:8080";
    let server = TestServer::start(&["--allowed-origins", "https://scores.example.org,http://localhost:8080"]);
    server.publish_event("game:1", "1").await;
    for path in READS {
        let (status, headers) = get_from(&server, path, Some(listed)).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(
            cors_headers(&headers),
            (Some(listed.into()), Some("origin".into())),
            "{path}"
        );
        // Another origin's read is answered (it may be a non-browser client), but without
        // Access-Control-Allow-Origin, so a browser withholds it from the page.
        let (status, headers) = get_from(&server, path, Some("https://evil.example")).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(cors_headers(&headers), (None, Some("origin".into())), "{path}");
    }

    let (status, headers, _) = preflight(&server, "/courtside.js", listed).await;
    assert_eq!(status, 204);
    assert_eq!(headers["access-control-allow-origin"], listed);
    assert_eq!(headers["access-control-allow-methods"], "GET, HEAD");

    let (status, headers, body) = preflight(&server, "/v1/rooms/game:1", "https://evil.example").await;
    assert_eq!(status, 403);
    assert_eq!(cors_headers(&headers), (None, Some("origin".into())));
    let body: Value = serde_json::from_slice(&body).expect("JSON error body");
    assert_eq!(body["error"], "origin_not_allowed");
}
