//! What the node learns from ECS about itself: the task's ARN, from the task metadata endpoint
//! (v4) the ECS agent serves every container at `ECS_CONTAINER_METADATA_URI_V4`. Read once, at
//! startup, for `--quic-server-id ecs-task`.

use std::time::Duration;

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

/// Why the task ARN could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EcsError {
    #[error("ECS_CONTAINER_METADATA_URI_V4 is not set (not on ECS?); give --quic-server-id 0xHEX instead")]
    NotOnEcs,
    #[error("the task metadata endpoint {0} is not an http://host:port/path URL")]
    BadUri(String),
    #[error("the task metadata endpoint did not answer: {0}")]
    Unreachable(String),
    #[error("the task metadata has no TaskARN: {0}")]
    NoTaskArn(String),
}

const TIMEOUT: Duration = Duration::from_secs(5);

/// The task's ARN: `GET ${ECS_CONTAINER_METADATA_URI_V4}/task`, its `TaskARN`.
pub async fn task_arn() -> Result<String, EcsError> {
    let base = std::env::var("ECS_CONTAINER_METADATA_URI_V4").map_err(|_| EcsError::NotOnEcs)?;
    let url = format!("{}/task", base.trim_end_matches('/'));
    let body = tokio::time::timeout(TIMEOUT, get(&url))
        .await
        .map_err(|_| EcsError::Unreachable(format!("no answer within {TIMEOUT:?}")))??;
    let task: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| EcsError::NoTaskArn(format!("not JSON: {e}")))?;
    task.get("TaskARN")
        .and_then(serde_json::Value::as_str)
        .filter(|arn| arn.starts_with("arn:"))
        .map(str::to_string)
        .ok_or_else(|| EcsError::NoTaskArn("no TaskARN string".into()))
}

async fn get(url: &str) -> Result<bytes::Bytes, EcsError> {
    let uri: hyper::Uri = url.parse().map_err(|_| EcsError::BadUri(url.into()))?;
    let (Some("http"), Some(host)) = (uri.scheme_str(), uri.host()) else {
        return Err(EcsError::BadUri(url.into()));
    };
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| EcsError::Unreachable(e.to_string()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| EcsError::Unreachable(e.to_string()))?;
    tokio::spawn(connection);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| EcsError::BadUri(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| EcsError::Unreachable(e.to_string()))?;
    if !response.status().is_success() {
        return Err(EcsError::Unreachable(format!("HTTP {}", response.status())));
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| EcsError::Unreachable(e.to_string()))?;
    Ok(body.to_bytes())
}
