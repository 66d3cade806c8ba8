//! Polls a connection loop's long-lived futures only after they woke. A `select!` in a loop
//! polls every branch on every turn, and several of those polls take locks (quinn's connection
//! state, the waiter lists of tokio's `Notify`, wtransport's datagram mutex) though nothing
//! happened there; behind a gate, a branch costs one atomic swap until its own waker fires.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// One branch's gate: the waker handed to what it polls sets a flag and wakes the task.
///
/// What is polled through a gate must keep its waker registered until it wakes it, as a
/// pinned future or a stream does (a future rebuilt on every turn may drop its registration).
#[derive(Debug)]
pub struct WakeGate {
    signal: Arc<Signal>,
    waker: Waker,
}

#[derive(Debug)]
struct Signal {
    /// Set by the branch's waker; starts set, so the first poll goes through.
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Default for WakeGate {
    fn default() -> Self {
        let signal = Arc::new(Signal {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(signal.clone());
        Self { signal, waker }
    }
}

impl WakeGate {
    /// Calls `poll` (with the gate's own waker) if the branch woke since it last returned
    /// `Pending`, or has never been polled, or last returned `Ready`; else returns `Pending`.
    pub fn poll<T>(&self, cx: &mut Context<'_>, poll: impl FnOnce(&mut Context<'_>) -> Poll<T>) -> Poll<T> {
        // Registered before the flag is read: a wake in between is seen now or wakes the task.
        self.signal.task.register(cx.waker());
        if !self.signal.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let result = poll(&mut Context::from_waker(&self.waker));
        if result.is_ready() {
            // Whatever is polled next through this gate is new and must be polled once.
            self.signal.woken.store(true, Ordering::Release);
        }
        result
    }

    /// A future that polls the pinned `future` through this gate.
    pub fn future<'a, F: Future>(&'a self, mut future: Pin<&'a mut F>) -> impl Future<Output = F::Output> + 'a {
        std::future::poll_fn(move |cx| self.poll(cx, |cx| future.as_mut().poll(cx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A waker that counts its wakes.
    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn polls_only_after_the_branch_woke() {
        let task = Arc::new(Count::default());
        let task_waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&task_waker);
        let gate = WakeGate::default();
        let calls = std::cell::Cell::new(0);
        let branch_waker = std::cell::RefCell::new(None::<Waker>);
        let poll = |cx: &mut Context<'_>| {
            calls.set(calls.get() + 1);
            *branch_waker.borrow_mut() = Some(cx.waker().clone());
            Poll::<()>::Pending
        };
        // The first poll goes through and hands over the gate's waker.
        assert!(gate.poll(&mut cx, poll).is_pending());
        // Nothing woke the branch: not polled again.
        assert!(gate.poll(&mut cx, poll).is_pending());
        assert!(gate.poll(&mut cx, poll).is_pending());
        assert_eq!(calls.get(), 1);
        // The branch wakes: the task is woken, and the next poll goes through.
        let woken = branch_waker.borrow_mut().take().expect("registered");
        woken.wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        assert!(gate.poll(&mut cx, poll).is_pending());
        assert_eq!(calls.get(), 2);
    }

    #[test]
    fn a_ready_branch_is_polled_again_next_time() {
        let task_waker = Waker::from(Arc::new(Count::default()));
        let mut cx = Context::from_waker(&task_waker);
        let gate = WakeGate::default();
        assert_eq!(gate.poll(&mut cx, |_| Poll::Ready(1)), Poll::Ready(1));
        // A new operation behind the same gate runs at once, without a wake.
        assert_eq!(gate.poll(&mut cx, |_| Poll::Ready(2)), Poll::Ready(2));
    }

    #[test]
    fn a_wake_during_the_poll_is_not_lost() {
        let task = Arc::new(Count::default());
        let task_waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&task_waker);
        let gate = WakeGate::default();
        // The branch wakes itself while being polled (as tokio's budget does when it yields).
        assert!(gate
            .poll(&mut cx, |cx| {
                cx.waker().wake_by_ref();
                Poll::<()>::Pending
            })
            .is_pending());
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        let mut polled = false;
        assert!(gate
            .poll(&mut cx, |_| {
                polled = true;
                Poll::<()>::Pending
            })
            .is_pending());
        assert!(polled);
    }

    #[tokio::test]
    async fn a_gated_future_completes_when_its_event_comes() {
        let notify = Arc::new(tokio::sync::Notify::new());
        let notified = notify.notified();
        tokio::pin!(notified);
        let gate = WakeGate::default();
        let waiter = {
            let notify = notify.clone();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                notify.notify_waiters();
            })
        };
        gate.future(notified.as_mut()).await;
        waiter.await.expect("notifier");
    }
}
