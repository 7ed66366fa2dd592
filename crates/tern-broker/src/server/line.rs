//! The core's line to one connection task: an unbounded queue with any number of senders
//! (the core, the storage writer holding sends until their commit, the connection itself
//! for a refusal) and one receiver, which takes everything queued at once.
//!
//! Every connection has one, so its size is paid per idle connection: tokio's unbounded
//! channel allocates about 800 bytes (cache-padded fields and a first block of 32 slots);
//! this one is a single allocation of under 100 bytes, and its queue holds memory only
//! while something is waiting in it. The lock is held only to push, or to take the queue.

use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};

struct Shared<T> {
    state: Mutex<State<T>>,
    senders: AtomicUsize,
    /// The weight of what is queued: written under the lock, read without it.
    weight: AtomicUsize,
    /// Messages for this line held by the storage writer until a commit (or behind one):
    /// while any are, nothing may be sent to the line directly, or it would overtake them.
    held: AtomicUsize,
}

/// What a queued message weighs, for [`Sender::backlog`].
pub(crate) trait Weigh {
    fn weight(&self) -> usize;
}

struct State<T> {
    queue: Vec<T>,
    waker: Option<Waker>,
    /// The receiver is gone: sends fail.
    closed: bool,
    /// Every sender is gone: once the queue is empty, nothing more will come.
    ended: bool,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Nothing here can panic while holding the lock; a poisoned state is still whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A new line: its sending and receiving ends.
pub(crate) fn line<T: Weigh>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: Vec::new(),
            waker: None,
            closed: false,
            ended: false,
        }),
        senders: AtomicUsize::new(1),
        held: AtomicUsize::new(0),
        weight: AtomicUsize::new(0),
    });
    (Sender(shared.clone()), Receiver(shared))
}

/// A sending end; clones share the line.
pub(crate) struct Sender<T>(Arc<Shared<T>>);

impl<T: Weigh> Sender<T> {
    /// Queues `msg`, or hands it back if the receiver is gone.
    pub(crate) fn send(&self, msg: T) -> Result<(), T> {
        let waker = {
            let mut state = self.0.lock();
            if state.closed {
                return Err(msg);
            }
            self.0.weight.fetch_add(msg.weight(), Ordering::Relaxed);
            state.queue.push(msg);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// The weight of what is queued and not yet taken by the receiver: for a connection,
    /// what waits behind the write in progress.
    pub(crate) fn backlog(&self) -> usize {
        self.0.weight.load(Ordering::Relaxed)
    }

    /// Whether messages for this line wait in the storage writer.
    pub(crate) fn held(&self) -> bool {
        self.0.held.load(Ordering::Acquire) > 0
    }

    /// One more message for this line waits in the storage writer.
    pub(crate) fn hold(&self) {
        self.0.held.fetch_add(1, Ordering::AcqRel);
    }

    /// The storage writer passed on (or dropped) one message it held for this line.
    pub(crate) fn unhold(&self) {
        self.0.held.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.senders.fetch_add(1, Ordering::Relaxed);
        Sender(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.0.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            let waker = {
                let mut state = self.0.lock();
                state.ended = true;
                state.waker.take()
            };
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

/// The receiving end.
pub(crate) struct Receiver<T>(Arc<Shared<T>>);

impl<T> Receiver<T> {
    /// The weight of what is queued, as [`Sender::backlog`].
    pub(crate) fn backlog(&self) -> usize {
        self.0.weight.load(Ordering::Relaxed)
    }

    /// Everything queued, in order, waiting until there is something; `None` once every
    /// sender is gone and nothing is left. Cancel-safe: nothing is taken unless returned.
    pub(crate) fn recv_all(&mut self) -> impl Future<Output = Option<Vec<T>>> + '_ {
        poll_fn(|cx| {
            let mut state = self.0.lock();
            if !state.queue.is_empty() {
                self.0.weight.store(0, Ordering::Relaxed);
                return Poll::Ready(Some(std::mem::take(&mut state.queue)));
            }
            if state.ended {
                return Poll::Ready(None);
            }
            match &mut state.waker {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                waker => *waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let left = {
            let mut state = self.0.lock();
            state.closed = true;
            state.waker = None;
            std::mem::take(&mut state.queue)
        };
        drop(left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Weigh for u8 {
        fn weight(&self) -> usize {
            usize::from(*self)
        }
    }

    impl Weigh for i32 {
        fn weight(&self) -> usize {
            0
        }
    }

    #[tokio::test]
    async fn the_backlog_is_the_weight_queued_and_not_yet_taken() {
        let (tx, mut rx) = line::<u8>();
        tx.send(3).unwrap();
        tx.send(4).unwrap();
        assert_eq!(tx.backlog(), 7);
        assert_eq!(rx.recv_all().await, Some(vec![3, 4]));
        assert_eq!(tx.backlog(), 0);
        tx.send(5).unwrap();
        assert_eq!(tx.backlog(), 5);
    }

    #[tokio::test]
    async fn messages_arrive_in_order_and_the_line_ends_when_every_sender_is_gone() {
        let (tx, mut rx) = line();
        let tx2 = tx.clone();
        tx.send(1).unwrap();
        tx2.send(2).unwrap();
        assert_eq!(rx.recv_all().await, Some(vec![1, 2]));
        let waiting = tokio::spawn(async move { rx.recv_all().await });
        tokio::task::yield_now().await;
        tx.send(3).unwrap();
        assert_eq!(waiting.await.unwrap(), Some(vec![3]));
        let (tx, mut rx) = line::<u8>();
        let tx2 = tx.clone();
        drop(tx);
        tx2.send(4).unwrap();
        drop(tx2);
        assert_eq!(rx.recv_all().await, Some(vec![4]));
        assert_eq!(rx.recv_all().await, None);
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_when_the_last_sender_goes() {
        let (tx, mut rx) = line::<u8>();
        let waiting = tokio::spawn(async move { rx.recv_all().await });
        tokio::task::yield_now().await;
        drop(tx);
        assert_eq!(waiting.await.unwrap(), None);
    }

    #[test]
    fn sending_fails_once_the_receiver_is_gone() {
        let (tx, rx) = line();
        drop(rx);
        assert_eq!(tx.send(7), Err(7));
    }
}
