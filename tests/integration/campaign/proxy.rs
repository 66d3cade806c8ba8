//! A TCP proxy between one node and Redis, on a fixed loopback port, that the nemesis can cut
//! (open connections reset, new ones refused) or stall (connections held open, nothing
//! forwarded) for a while, and heal.

use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Open,
    /// Connections reset, new ones closed at once.
    Cut,
    /// Connections held open, nothing forwarded either way.
    Stalled,
}

/// One node's path to Redis. Dropping it stops the proxy and closes every connection.
pub struct RedisProxy {
    pub port: u16,
    path: watch::Sender<Path>,
    accept: tokio::task::JoinHandle<()>,
    /// Every link's task, aborted on drop.
    links: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl RedisProxy {
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (path, watch_path) = watch::channel(Path::Open);
        let links: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let task_links = links.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let link = tokio::spawn(link(inbound, target, watch_path.clone()));
                let mut links = task_links.lock().expect("links");
                links.retain(|l| !l.is_finished());
                links.push(link.abort_handle());
            }
        });
        Self {
            port,
            path,
            accept,
            links,
        }
    }

    pub fn set(&self, path: Path) {
        self.path.send_replace(path);
    }
}

/// Forwards one connection while the path is open; closes it on a cut; holds it silent while
/// stalled, and closes it when the stall heals (as a real partition's timeout would).
async fn link(mut inbound: TcpStream, target: u16, mut path: watch::Receiver<Path>) {
    let now = *path.borrow_and_update();
    match now {
        Path::Cut => return,
        Path::Stalled => {
            let _ = path.wait_for(|p| *p != Path::Stalled).await;
            return;
        }
        Path::Open => {}
    }
    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
        return;
    };
    let stalled = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => false,
        changed = path.wait_for(|p| *p != Path::Open) => changed.map(|p| *p == Path::Stalled).unwrap_or(false),
    };
    if stalled {
        let _ = path.wait_for(|p| *p != Path::Stalled).await;
    }
    // A cut resets rather than closing politely.
    let _ = inbound.set_zero_linger();
}

impl Drop for RedisProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for link in self.links.lock().expect("links").drain(..) {
            link.abort();
        }
    }
}
