//! The nodes of a schedule: `courtside` processes on fixed ports (restarted on the same ones,
//! logs to a file each incarnation), killed on drop. Redis is `util::RedisServer` with an
//! append-only file (`start_persistent`), SIGKILLed and restarted empty or with its data.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use crate::util::TOKEN;

/// A free loopback TCP port below the kernel's ephemeral range, so that no outgoing connection
/// (a client's, a proxy's) takes it while the node or Redis on it restarts.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let ephemeral_low: u64 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768);
    let (low, span) = (10_000, ephemeral_low.saturating_sub(10_000).max(1000));
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id());
    for _ in 0..1000 {
        let step = NEXT.fetch_add(7919, std::sync::atomic::Ordering::Relaxed);
        let port = (low + (start + step) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below {ephemeral_low}");
}

/// How an incarnation of a node ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    Killed,
    /// SIGTERM; `unflushed`: the publishes its last log line says were lost.
    Termed {
        unflushed: u64,
    },
    /// It exited while starting (Redis unreachable: it needs Redis to start).
    NoStart,
    /// It exited by itself while serving: a crash.
    Exited,
}

/// One life of a node process.
#[derive(Clone, Debug)]
pub struct Incarnation {
    pub started: Instant,
    pub ended: Option<(Instant, Ended)>,
    pub log: PathBuf,
}

/// A node: its fixed address, its Redis URL, and its incarnations.
pub struct NodeProc {
    pub index: usize,
    pub http: SocketAddr,
    redis_args: Vec<String>,
    dir: PathBuf,
    child: Option<Child>,
    /// SIGTERM was sent to the running incarnation: it is draining.
    draining: bool,
    pub lives: Vec<Incarnation>,
}

impl NodeProc {
    pub fn new(index: usize, redis_args: Vec<String>, dir: PathBuf) -> Self {
        Self {
            index,
            http: SocketAddr::from(([127, 0, 0, 1], free_port())),
            redis_args,
            dir,
            child: None,
            draining: false,
            lives: Vec::new(),
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts an incarnation and waits (bounded) until it answers `/health`; false when it
    /// exits first (Redis unreachable at start) or never answers.
    pub async fn start(&mut self) -> bool {
        assert!(self.child.is_none(), "node {} already running", self.index);
        let log = self.dir.join(format!("node{}-{}.log", self.index, self.lives.len()));
        let file = std::fs::File::create(&log).expect("log file");
        let http = self.http.to_string();
        let id = format!("n{}", self.index);
        let mut args: Vec<&str> = vec![
            "serve",
            "--http",
            &http,
            "--no-wt",
            "--publish-token",
            TOKEN,
            "--log-format",
            "json",
            "--log-level",
            "info,courtside=debug",
            "--node-id",
            &id,
            "--node-heartbeat",
            "200ms",
            "--drain-timeout",
            "2s",
            "--publish-rate-per-ip",
            "0",
            "--connection-rate-per-ip",
            "0",
        ];
        args.extend(self.redis_args.iter().map(String::as_str));
        let child = Command::new(env!("CARGO_BIN_EXE_courtside"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start courtside");
        self.lives.push(Incarnation {
            started: Instant::now(),
            ended: None,
            log,
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if child.try_wait().ok().flatten().is_some() {
                    self.child = None;
                    self.end(Ended::NoStart);
                    return false;
                }
            }
            if let Some((200, _)) = super::http::get(self.http, "/health").await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        self.kill();
        false
    }

    fn end(&mut self, how: Ended) {
        if let Some(life) = self.lives.last_mut() {
            if life.ended.is_none() {
                life.ended = Some((Instant::now(), how));
            }
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        self.draining = false;
        if let Some(mut child) = self.child.take() {
            self.end(Ended::Killed);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM; the node drains and exits (see `reap`).
    pub fn term(&mut self) {
        if let Some(child) = &self.child {
            self.draining = true;
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        }
    }

    /// Waits (bounded) for a SIGTERMed node to exit, and reads what its drain lost.
    pub async fn reap(&mut self) {
        if !std::mem::take(&mut self.draining) {
            return;
        }
        let Some(mut child) = self.child.take() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.end(Ended::Killed);
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let unflushed = self
            .lives
            .last()
            .map(|l| std::fs::read_to_string(&l.log).unwrap_or_default())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["unflushed"].as_u64())
            .sum();
        self.end(Ended::Termed { unflushed });
    }

    /// The last log line of an incarnation that did not start (why), else nothing.
    pub fn last_log_line(&self) -> String {
        if self.running() {
            return String::new();
        }
        let log = self
            .lives
            .last()
            .map(|l| std::fs::read_to_string(&l.log).unwrap_or_default());
        log.unwrap_or_default().lines().last().unwrap_or_default().to_string()
    }

    /// Whether the process exited by itself; records it.
    pub fn check_exited(&mut self) -> bool {
        let exited = self
            .child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_some());
        if exited {
            self.child = None;
            self.end(Ended::Exited);
        }
        exited
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
