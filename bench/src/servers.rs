//! Starting the servers under test on loopback: the Courtside binary, and the Socket.IO peer
//! (Node), each on port 0, with their addresses read from their output.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

/// A server process, killed when dropped.
pub struct ServerProcess {
    pub name: &'static str,
    pub http: SocketAddr,
    /// Courtside's WebTransport endpoint and its certificate's SHA-256 (hex), when enabled.
    pub wt: Option<(SocketAddr, String)>,
    child: Child,
}

impl ServerProcess {
    pub fn pid(&self) -> String {
        self.child.id().map(|p| p.to_string()).unwrap_or_default()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The Courtside binary: `--courtside-bin`, or target/release (then debug) beside the workspace.
pub fn courtside_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for profile in ["release", "debug"] {
        let path = root.join("target").join(profile).join("courtside");
        if path.exists() {
            return Ok(path);
        }
    }
    bail!("no courtside binary: run `cargo build --release` first, or pass --courtside-bin")
}

pub const TOKEN: &str = "bench-token";

/// How to start one Courtside node.
#[derive(Debug, Clone, Default)]
pub struct CourtsideOptions {
    /// Serve WebTransport too (on a UDP port of its own).
    pub webtransport: bool,
    /// `--redis URL` and `--node-id`, for the cluster scenario.
    pub redis: Option<(String, String)>,
}

/// Starts `courtside serve` on 127.0.0.1, as the bench drives it.
pub async fn start_courtside(binary: &Path, options: &CourtsideOptions) -> anyhow::Result<ServerProcess> {
    let mut extra: Vec<String> = Vec::new();
    if options.webtransport {
        extra.extend(["--wt".into(), "127.0.0.1:0".into()]);
    } else {
        extra.push("--no-wt".into());
    }
    if let Some((url, node_id)) = &options.redis {
        extra.extend(["--redis".into(), url.clone(), "--node-id".into(), node_id.clone()]);
    }
    let mut child = Command::new(binary)
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--publish-token",
            TOKEN,
            "--log-format",
            "json",
        ])
        .args([
            "--log-level",
            "warn,courtside=info",
            "--max-connections",
            "60000",
            "--command-burst",
            "100000",
            // Every bench client comes from 127.0.0.1: the per-address limit would refuse
            // all but the first thousand.
            "--max-connections-per-ip",
            "1000000",
            // Likewise the per-address rates: a connect storm opens thousands a minute, and the
            // publisher is one address.
            "--connection-rate-per-ip",
            "0",
            "--publish-rate-per-ip",
            "0",
        ])
        .args(&extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stderr = child.stderr.take().context("stderr")?;
    let http = first_line_where(stderr, "courtside", |line| {
        let record = serde_json::from_str::<serde_json::Value>(line).ok()?;
        record["http"].as_str()?.parse::<SocketAddr>().ok()
    })
    .await?;
    let wt = if options.webtransport {
        let info = http_get_json(http, "/v1/cert-hash").await?;
        let hash = info["sha256"].as_str().context("sha256")?.to_string();
        let port = info["port"].as_u64().context("port")? as u16;
        Some((SocketAddr::from(([127, 0, 0, 1], port)), hash))
    } else {
        None
    };
    Ok(ServerProcess {
        name: "courtside",
        http,
        wt,
        child,
    })
}

/// `GET path` on a loopback server, as JSON.
pub async fn http_get_json(addr: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::new())?;
    let response = sender.send_request(request).await?;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}

/// A `redis-server` on a free loopback port, without persistence, killed when dropped.
pub struct RedisProcess {
    pub url: String,
    _child: Child,
}

pub async fn start_redis() -> anyhow::Result<RedisProcess> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting redis-server (install it: apt-get install redis-server)")?;
    let stdout = child.stdout.take().context("stdout")?;
    first_line_where(stdout, "redis-server", |line| {
        line.contains("Ready to accept connections").then_some(())
    })
    .await?;
    Ok(RedisProcess {
        url: format!("redis://127.0.0.1:{port}"),
        _child: child,
    })
}

/// Starts the Socket.IO peer (bench/peers/socketio), installing its npm packages if needed;
/// with `redis`, rooms are shared through the Redis adapter.
pub async fn start_socketio(redis: Option<&str>) -> anyhow::Result<ServerProcess> {
    start_socketio_with(redis, None).await
}

/// Starts the Socket.IO peer, with permessage-deflate for messages of at least
/// `deflate_threshold` bytes when given (the original design's `perMessageDeflate`, 1,024).
pub async fn start_socketio_with(
    redis: Option<&str>,
    deflate_threshold: Option<usize>,
) -> anyhow::Result<ServerProcess> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers").join("socketio");
    if !dir.join("node_modules").join("socket.io").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .await
            .context("npm ci for the Socket.IO peer")?;
        if !status.success() {
            bail!("npm ci failed in {}", dir.display());
        }
    }
    let mut command = Command::new("node");
    if let Some(url) = redis {
        command.env("REDIS_URL", url);
    }
    if let Some(threshold) = deflate_threshold {
        command.env("PER_MESSAGE_DEFLATE_THRESHOLD", threshold.to_string());
    }
    let mut child = command
        .arg(dir.join("server.js"))
        .arg("0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting node (the Socket.IO peer)")?;
    let stdout = child.stdout.take().context("stdout")?;
    let port = first_line_where(stdout, "the Socket.IO peer", |line| {
        serde_json::from_str::<serde_json::Value>(line).ok()?["port"].as_u64()
    })
    .await?;
    Ok(ServerProcess {
        name: "socket.io",
        http: SocketAddr::from(([127, 0, 0, 1], port as u16)),
        wt: None,
        child,
    })
}

/// Reads a child's output until `found` recognises a line (at most 30 s), then keeps draining
/// it in the background, so the child never blocks on a full pipe.
async fn first_line_where<T>(
    output: impl AsyncRead + Unpin + Send + 'static,
    what: &str,
    mut found: impl FnMut(&str) -> Option<T>,
) -> anyhow::Result<T> {
    let mut lines = BufReader::new(output).lines();
    let value = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(value) = found(&line) {
                return Ok(value);
            }
        }
        bail!("{what} exited before it was ready")
    })
    .await
    .with_context(|| format!("{what} was not ready in 30 s"))??;
    tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            if std::env::var_os("BENCH_SERVER_LOG").is_some() {
                eprintln!("server: {l}");
            }
        }
    });
    Ok(value)
}
