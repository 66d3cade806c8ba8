//! Starting the servers under test on loopback: the Courtside binary, and the Socket.IO peer
//! (Node), each on port 0, with their addresses read from their output.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A server process, killed when dropped.
pub struct ServerProcess {
    pub name: &'static str,
    pub http: SocketAddr,
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

/// Starts `courtside serve` on 127.0.0.1 with WebSocket only, as the bench drives it.
pub async fn start_courtside(binary: &Path, extra: &[&str]) -> anyhow::Result<ServerProcess> {
    let mut child = Command::new(binary)
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--no-wt",
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
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let http = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Ok(record) = serde_json::from_str::<serde_json::Value>(&line) {
                if let Some(addr) = record["http"].as_str() {
                    return Ok::<_, anyhow::Error>(addr.parse::<SocketAddr>()?);
                }
            }
        }
        bail!("courtside exited before listening")
    })
    .await
    .context("courtside did not start in 30 s")??;
    // Keep draining its log so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(ServerProcess {
        name: "courtside",
        http,
        child,
    })
}

/// Starts the Socket.IO peer (bench/peers/socketio), installing its npm packages if needed.
pub async fn start_socketio() -> anyhow::Result<ServerProcess> {
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
    let mut child = Command::new("node")
        .arg(dir.join("server.js"))
        .arg("0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting node (the Socket.IO peer)")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("the Socket.IO peer did not start in 30 s")??
        .context("the Socket.IO peer exited")?;
    let port = serde_json::from_str::<serde_json::Value>(&line)?["port"]
        .as_u64()
        .context("port")?;
    Ok(ServerProcess {
        name: "socket.io",
        http: SocketAddr::from(([127, 0, 0, 1], port as u16)),
        child,
    })
}
