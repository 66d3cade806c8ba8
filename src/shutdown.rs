//! Graceful shutdown: one notice to every task, and a count of tasks still running, kept by
//! listeners each task drops when it ends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

/// Cloneable handle: starts the shutdown, hands out listeners, waits for them.
#[derive(Debug, Clone)]
pub struct Shutdown(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    notice: watch::Sender<bool>,
    /// Listeners alive: tasks that have not finished yet.
    running: AtomicUsize,
    /// Connections that ended the drain without completing their close handshake.
    abandoned: AtomicUsize,
    idle: Notify,
}

/// Held by each task: tells it to stop, and counts it as running until dropped.
#[derive(Debug)]
pub struct ShutdownListener {
    notice: watch::Receiver<bool>,
    shared: Arc<Inner>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        let (notice, _) = watch::channel(false);
        Self(Arc::new(Inner {
            notice,
            running: AtomicUsize::new(0),
            abandoned: AtomicUsize::new(0),
            idle: Notify::new(),
        }))
    }

    pub fn listener(&self) -> ShutdownListener {
        self.0.running.fetch_add(1, Ordering::AcqRel);
        ShutdownListener {
            notice: self.0.notice.subscribe(),
            shared: self.0.clone(),
        }
    }

    /// Tells every listener to stop.
    pub fn begin(&self) {
        self.0.notice.send_replace(true);
    }

    pub fn is_shutdown(&self) -> bool {
        *self.0.notice.borrow()
    }

    /// Counts a connection that was cut off at the drain deadline.
    pub fn abandoned_one(&self) {
        self.0.abandoned.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections cut off at the drain deadline so far.
    pub fn abandoned(&self) -> usize {
        self.0.abandoned.load(Ordering::Relaxed)
    }

    /// Tasks still holding a listener.
    pub fn running(&self) -> usize {
        self.0.running.load(Ordering::Acquire)
    }

    /// Waits until every listener is dropped, at most `limit`. Returns whether all finished.
    pub async fn wait(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let idle = self.0.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.running() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.running() == 0;
            }
        }
    }
}

impl ShutdownListener {
    pub fn is_shutdown(&self) -> bool {
        *self.notice.borrow()
    }

    /// Resolves once the shutdown has begun (at once if it already has).
    pub async fn recv(&mut self) {
        // The sender lives in `Inner`, which this listener keeps alive: no error is possible.
        let _ = self.notice.wait_for(|stop| *stop).await;
    }
}

impl Clone for ShutdownListener {
    fn clone(&self) -> Self {
        self.shared.running.fetch_add(1, Ordering::AcqRel);
        Self {
            notice: self.notice.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl Drop for ShutdownListener {
    fn drop(&mut self) {
        if self.shared.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_listeners_then_reports() {
        let shutdown = Shutdown::new();
        let mut listener = shutdown.listener();
        let task = tokio::spawn(async move {
            listener.recv().await;
            assert!(listener.is_shutdown());
        });
        shutdown.begin();
        assert!(shutdown.wait(Duration::from_secs(5)).await);
        task.await.expect("task");
        assert_eq!(shutdown.running(), 0);
    }

    #[tokio::test]
    async fn a_stuck_listener_ends_the_wait_at_the_limit() {
        let shutdown = Shutdown::new();
        let stuck = shutdown.listener();
        let _clone = stuck.clone();
        shutdown.begin();
        assert!(!shutdown.wait(Duration::from_millis(10)).await);
        assert_eq!(shutdown.running(), 2);
    }
}
