//! One connection as the hub sees it: its bounded queue, the lock-free wake-up of its writer,
//! and the direct write that lets the fan-out put a frame into an idle socket itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use futures_util::task::AtomicWaker;

use crate::core::{ConnectionQueue, Outgoing, Publication, Pushed, QueueClosed, QueueLimits, ServerControl};
use crate::metrics::{Metrics, Transport};

/// Identifies a connection on this node.
pub type ConnId = u64;

/// A one-waiter wake-up with a stored permit: a flag and an `AtomicWaker`, no lock. One per
/// connection, set by the fan-out for every connection whose queue was empty (cheaper than
/// `tokio::sync::Notify`, whose waiter list takes a lock on every wait and wake).
#[derive(Debug, Default)]
struct Wake {
    pending: AtomicBool,
    waker: AtomicWaker,
}

impl Wake {
    fn wake(&self) {
        self.pending.store(true, Ordering::Release);
        self.waker.wake();
    }

    async fn wait(&self) {
        std::future::poll_fn(|cx| self.poll_wait(cx)).await;
    }

    /// Spends a stored permit, if any: the writer is about to drain the queue anyway.
    fn take(&self) -> bool {
        self.pending.swap(false, Ordering::Acquire)
    }

    fn poll_wait(&self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if self.pending.swap(false, Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.pending.swap(false, Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// A way to put a publication into a connection's socket from the fan-out itself, without
/// waking the connection's task (set by the WebSocket transport). Only tried when the queue
/// is idle, so it never overtakes a queued message.
pub trait DirectWrite: Send + Sync + std::fmt::Debug {
    /// Writes `publication` now if the socket takes it without waiting: as its delta
    /// (`Publication::delta`, or whole when it has none) when `as_delta`.
    fn write_now(&self, publication: &Publication, as_delta: bool) -> Direct;
}

/// What a direct write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direct {
    /// The socket took the whole message.
    Written,
    /// The socket took part; the rest waits in the connection's own buffer, and its writer
    /// must be woken to finish it.
    Partly,
    /// Nothing written (the socket is full or busy): queue it instead.
    NotNow,
}

/// A connection as the hub sees it: a bounded queue and a wake-up for its writer.
#[derive(Debug)]
pub struct Subscriber {
    id: ConnId,
    transport: Transport,
    queue: Mutex<ConnectionQueue>,
    /// Woken when the queue goes from empty to non-empty, or closes.
    wake: Wake,
    direct: std::sync::OnceLock<Box<dyn DirectWrite>>,
    /// Direct writes are allowed (cleared, under the queue lock, before the connection closes).
    direct_on: AtomicBool,
}

impl Subscriber {
    pub(super) fn new(id: ConnId, transport: Transport, limits: QueueLimits) -> Self {
        Self {
            id,
            transport,
            queue: Mutex::new(ConnectionQueue::new(limits)),
            wake: Wake::default(),
            direct: std::sync::OnceLock::new(),
            direct_on: AtomicBool::new(false),
        }
    }

    /// Wakes the connection's writer.
    pub(super) fn wake(&self) {
        self.wake.wake();
    }

    pub fn id(&self) -> ConnId {
        self.id
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }

    pub(super) fn queue(&self) -> MutexGuard<'_, ConnectionQueue> {
        // A panic while holding the lock leaves a queue that is still consistent enough to drain.
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until there is something to write (or the queue closed).
    pub async fn wait(&self) {
        self.wake.wait().await;
    }

    /// `wait` as a poll, for a loop that serves many connections with one waker each: `Ready`
    /// when something is to be written, else `cx`'s waker is woken when it is.
    pub fn poll_wait(&self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        self.wake.poll_wait(cx)
    }

    /// For a loop that was woken for this connection and drains its queue now: spends the
    /// wake-up, so that `poll_wait` after the drain is `Ready` only for a message pushed since
    /// (without it, every delivery would wake the loop a second time for an empty queue).
    /// True if a wake-up was pending.
    pub fn take_wake(&self) -> bool {
        self.wake.take()
    }

    /// How the queue closed, if it did.
    pub fn closed(&self) -> Option<QueueClosed> {
        self.queue().closed()
    }

    /// Moves up to `max` pending messages into `out`; reports whether the queue has closed.
    pub fn drain_into(&self, out: &mut Vec<Outgoing>, max: usize) -> Option<QueueClosed> {
        let mut queue = self.queue();
        queue.drain_into(out, max);
        queue.closed()
    }

    /// Queues a reply to this connection, counting an overflow as a slow disconnect.
    pub fn push_control(&self, metrics: &Metrics, control: ServerControl) {
        let pushed = self.offer(|q| q.push_control(control));
        FanoutTally::default().count(pushed).flush(metrics, self.transport);
    }

    /// Stops the queue for good; returns how many pending messages were dropped.
    pub fn close(&self, reason: QueueClosed) -> usize {
        let dropped = self.queue().close(reason);
        self.wake.wake();
        dropped
    }

    /// Lets the fan-out write into this connection's socket directly while its queue is idle.
    pub fn enable_direct(&self, writer: Box<dyn DirectWrite>) {
        if self.direct.set(writer).is_ok() {
            self.direct_on.store(true, Ordering::Release);
        }
    }

    /// No more direct writes: when this returns, none is running or will start (the writer is
    /// about to write its own last frames, such as a close).
    pub fn stop_direct(&self) {
        let _queue = self.queue();
        self.direct_on.store(false, Ordering::Release);
    }

    /// Offers a publication: straight to the socket when nothing is pending for this connection
    /// and the socket takes it, else into the queue.
    pub(super) fn offer_publication(
        &self,
        publication: &Arc<Publication>,
        push: fn(&mut ConnectionQueue, &Arc<Publication>) -> Pushed,
        allow_direct: bool,
    ) -> Offered {
        let mut queue = self.queue();
        let direct = self
            .direct
            .get()
            .filter(|_| allow_direct && self.direct_on.load(Ordering::Acquire));
        if let Some(direct) = direct {
            if queue.is_idle() {
                let as_delta = queue.sends_as_delta(publication);
                let written = direct.write_now(publication, as_delta);
                if written != Direct::NotNow {
                    queue.handed(publication);
                }
                match written {
                    Direct::Written => return Offered::Written,
                    Direct::Partly => {
                        drop(queue);
                        self.wake.wake();
                        return Offered::Written;
                    }
                    Direct::NotNow => {}
                }
            }
        }
        let pushed = push(&mut queue, publication);
        drop(queue);
        Offered::Pushed(self.wake_if_needed(pushed))
    }

    fn offer(&self, push: impl FnOnce(&mut ConnectionQueue) -> Pushed) -> Pushed {
        let pushed = push(&mut self.queue());
        self.wake_if_needed(pushed)
    }

    /// Wakes the writer when a push made its queue non-empty or closed it as slow.
    fn wake_if_needed(&self, pushed: Pushed) -> Pushed {
        if matches!(pushed, Pushed::Queued { wake: true } | Pushed::Overflowed { .. }) {
            self.wake.wake();
        }
        pushed
    }
}

/// What became of a publication offered to one subscriber.
pub(super) enum Offered {
    /// Written into the socket by the fan-out.
    Written,
    Pushed(Pushed),
}

/// Push outcomes summed over one fan-out, added to the metrics once.
#[derive(Debug, Default)]
pub(super) struct FanoutTally {
    conflated: u64,
    dropped: u64,
    pub(super) slow: u64,
}

impl FanoutTally {
    pub(super) fn count(mut self, pushed: Pushed) -> Self {
        self.add(pushed);
        self
    }

    pub(super) fn add(&mut self, pushed: Pushed) {
        match pushed {
            Pushed::Queued { .. } | Pushed::Stale => {}
            Pushed::Conflated => self.conflated += 1,
            Pushed::Overflowed { dropped } => {
                self.dropped += dropped as u64;
                self.slow += 1;
            }
            Pushed::Closed => self.dropped += 1,
        }
    }

    pub(super) fn flush(&self, metrics: &Metrics, transport: Transport) {
        if self.conflated > 0 {
            metrics.conflated.inc_by(self.conflated);
        }
        if self.dropped > 0 {
            metrics.dropped.inc_by(self.dropped);
        }
        if self.slow > 0 {
            metrics.transport(transport).slow_disconnects.inc_by(self.slow);
        }
    }
}
