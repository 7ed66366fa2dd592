//! The storage writer: one thread owns the store. It takes every batch waiting for it,
//! commits them as ONE transaction (one fsync), and only then hands the connections what
//! was waiting on that commit: acknowledgements, deliveries with packet ids, SUBACKs
//! (group commit: the cost of a sync is shared by everything that arrived meanwhile).
//!
//! When a commit fails (disk full, I/O error) nothing that waited on it is sent: those
//! connections are closed, later batches are dropped the same way, and the core is told
//! ([`ToCore::StoreFailed`]); it closes every connection and starts again from the last
//! commit ([`Writer::reset`]), so memory never runs ahead of the disk.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Instant;

use tern_store::{Op, Snapshot, StoreError};
use tokio::sync::{mpsc, oneshot};

use super::{Persistence, ToConn, ToCore};
use crate::core::{Load, Loads, Sealed};
use crate::metrics::Metrics;

/// Sends of one round: each to its connection, in order.
pub(crate) type Sends = Vec<(super::line::Sender<ToConn>, ToConn)>;

enum Job {
    /// A round's ops, and its sends sealed until they are committed.
    Commit {
        ops: Vec<Op>,
        sends: Sealed<Sends>,
        loads: Loads,
        hooks: Hooks,
    },
    /// A round that changed nothing durable, queued behind the commits ahead of it.
    Behind(Sends),
    Reset(oneshot::Sender<Option<Snapshot>>),
}

/// A job's sends as they wait in a group.
enum Waiting {
    Sealed(Sealed<Sends>, Loads, Hooks),
    Behind(Sends),
}

/// What a cluster node adds to a round: its commit waits for `gate` (the round's QoS 1/2
/// messages are in the cluster's stream), and `after` runs once the round is committed
/// and sent (the stream messages it applied are acknowledged).
#[derive(Default)]
pub(crate) struct Hooks {
    pub(crate) gate: Option<oneshot::Receiver<()>>,
    pub(crate) after: Option<Box<dyn FnOnce() + Send>>,
}

/// Most batches folded into one commit; bounds the latency of the first one.
const MAX_GROUP: usize = 1024;

pub(crate) struct Writer {
    tx: Sender<Job>,
    /// Batches submitted and not yet committed and sent.
    pending: Arc<AtomicUsize>,
    /// The core's durable rounds committed since it (re)started.
    committed: Arc<AtomicU64>,
    /// The queue reader beside the writer, if the store has one.
    reader: Option<Sender<Load>>,
    /// Told whenever the writer has finished rounds.
    progress: Arc<tokio::sync::Notify>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// `lazy`: the core keeps queues in the store (`Settings::queue_window`): a reset reads
    /// the state back with them left there.
    pub(crate) fn spawn(
        p: Persistence,
        lazy: bool,
        to_core: mpsc::UnboundedSender<ToCore>,
        metrics: Arc<Metrics>,
        fatal: mpsc::UnboundedSender<String>,
    ) -> Writer {
        let (tx, rx) = std::sync::mpsc::channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let count = pending.clone();
        let committed = Arc::new(AtomicU64::new(0));
        let done = committed.clone();
        let progress = Arc::new(tokio::sync::Notify::new());
        let progressed = progress.clone();
        // Loads that may be read from what is committed go to a reader beside the
        // writer, so a window refills without waiting for the commit in progress.
        let reader = match (lazy, p.store.reader()) {
            (true, Some(r)) => Some(spawn_reader(
                r,
                to_core.clone(),
                metrics.clone(),
                fatal.clone(),
            )),
            _ => None,
        };
        let thread = std::thread::Builder::new()
            .name("tern-store".into())
            .spawn(move || {
                let guard = PanicGuard(fatal);
                run(
                    p,
                    lazy,
                    &done,
                    &progressed,
                    &rx,
                    &count,
                    &to_core,
                    &metrics,
                    &guard.0,
                );
            })
            .expect("the storage writer thread starts");
        Writer {
            tx,
            pending,
            committed,
            reader,
            progress,
            thread: Some(thread),
        }
    }

    /// The count of the core's durable rounds committed (since it last started again) and
    /// the notice of the writer's progress, to wait for a round's commit.
    pub(crate) fn committed(&self) -> (Arc<AtomicU64>, Arc<tokio::sync::Notify>) {
        (self.committed.clone(), self.progress.clone())
    }

    /// Whether batches are waiting for a commit (anything sent now must queue behind).
    pub(crate) fn busy(&self) -> bool {
        self.pending.load(Ordering::Acquire) > 0
    }

    /// Waits while more than [`MAX_PENDING`] rounds wait for the writer.
    pub(crate) async fn room(&self) {
        loop {
            let notified = self.progress.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.pending.load(Ordering::Acquire) <= MAX_PENDING {
                return;
            }
            notified.await;
        }
    }

    /// Commits `ops`, then opens and sends `sends`, then reads the `loads` and hands them
    /// to the core. The connections count the sends as held
    /// ([`super::line::Sender::held`]) until then.
    pub(crate) fn submit(
        &self,
        ops: Vec<Op>,
        sends: Sealed<Sends>,
        mut loads: Loads,
        hooks: Hooks,
    ) {
        let sends = sends.map(|s| {
            hold_all(&s);
            s
        });
        if let Some(reader) = &self.reader {
            for load in loads.early(self.committed.load(Ordering::Acquire)) {
                let _ = reader.send(load);
            }
        }
        self.queue(Job::Commit {
            ops,
            sends,
            loads,
            hooks,
        });
    }

    /// Sends `sends` once everything submitted before them is.
    pub(crate) fn behind(&self, sends: Sends) {
        hold_all(&sends);
        self.queue(Job::Behind(sends));
    }

    fn queue(&self, job: Job) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        if self.tx.send(job).is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// After a failed commit: drops what is queued, then reads back the last committed
    /// state (`None` if even that fails).
    pub(crate) async fn reset(&mut self) -> Option<Snapshot> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Job::Reset(tx)).ok()?;
        rx.await.ok().flatten()
    }

    /// Commits what is queued, flushes, and stops the thread.
    pub(crate) fn finish(mut self) {
        let (tx, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reports the writer thread's death by panic (nothing it holds would ever be sent).
struct PanicGuard(mpsc::UnboundedSender<String>);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self
                .0
                .send("the storage writer thread died (panic)".to_string());
        }
    }
}

/// Rounds waiting for the writer past which the core waits for it ([`Writer::room`]).
const MAX_PENDING: usize = 64;

/// Test-only fault injection (debug builds only, and only with `TERN_FAULT_HOOK=1` in the
/// environment): a retained message on `tern/fault/writer` makes the writer panic, a
/// PUBLISH on `tern/fault/core` the core task, so the fail-stop tests can kill each.
#[cfg(debug_assertions)]
pub(crate) fn fault_hook(topic: &str, part: &str) {
    if fault_hook_on(topic, part) {
        panic!("fault injected into the {part} (TERN_FAULT_HOOK)");
    }
}

/// Whether the fault hook is on and `topic` names `part`.
#[cfg(debug_assertions)]
pub(crate) fn fault_hook_on(topic: &str, part: &str) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("TERN_FAULT_HOOK").is_ok_and(|v| v == "1"));
    on && topic.strip_prefix("tern/fault/") == Some(part)
}

/// Hands each connection its part.
pub(crate) fn send_all(sends: Sends) {
    for (tx, msg) in sends {
        let _ = tx.send(msg);
    }
}

/// Nothing that waited on a failed commit may be sent: its connections are closed.
pub(crate) fn close_all(sends: Sends) {
    for (tx, _) in sends {
        let _ = tx.send(ToConn::Close);
    }
}

fn hold_all(sends: &Sends) {
    for (tx, _) in sends {
        tx.hold();
    }
}

/// Passes on what the writer held (`close`: closes its connections instead), each
/// message counted off its line once it is queued there, so that a direct send after it
/// cannot overtake it.
fn release_all(sends: Sends, close: bool) {
    for (tx, msg) in sends {
        let _ = tx.send(if close { ToConn::Close } else { msg });
        tx.unhold();
    }
}

/// The queue reader's thread: answers loads from what is committed, as they come.
fn spawn_reader(
    reader: Box<dyn tern_store::QueueReader>,
    to_core: mpsc::UnboundedSender<ToCore>,
    metrics: Arc<Metrics>,
    fatal: mpsc::UnboundedSender<String>,
) -> Sender<Load> {
    let (tx, rx) = std::sync::mpsc::channel::<Load>();
    let spawned = std::thread::Builder::new()
        .name("tern-queue-reader".into())
        .spawn(move || {
            let guard = PanicGuard(fatal);
            while let Ok(load) = rx.recv() {
                let read = match &load.history {
                    Some(h) => reader
                        .read_history(h)
                        .map(|m| tern_store::history_entries(m, std::time::Instant::now())),
                    None => reader.read_queue(&load.client_id, load.after, load.max),
                };
                match read {
                    Ok(messages) => answer(&to_core, &metrics, load, messages),
                    Err(error) => {
                        tracing::error!(%error, client_id = %load.client_id, "reading a queue back from the store failed: stopping");
                        let _ = guard.0.send(format!("reading a queue from the store failed: {error}"));
                        break;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "the queue reader thread did not start; queues are read by the writer");
    }
    tx
}

fn answer(
    to_core: &mpsc::UnboundedSender<ToCore>,
    metrics: &Metrics,
    load: Load,
    messages: tern_store::QueuePart,
) {
    metrics.store_loads.fetch_add(1, Ordering::Relaxed);
    let _ = to_core.send(ToCore::Loaded(Box::new((load, messages))));
}

#[allow(clippy::too_many_arguments)]
fn run(
    mut p: Persistence,
    lazy: bool,
    committed: &AtomicU64,
    progress: &tokio::sync::Notify,
    rx: &Receiver<Job>,
    pending: &AtomicUsize,
    to_core: &mpsc::UnboundedSender<ToCore>,
    metrics: &Metrics,
    fatal: &mpsc::UnboundedSender<String>,
) {
    // Set by a failed commit until the core has reset: later rounds are not sent either.
    let mut failed: Option<StoreError> = None;
    let mut unflushed_since: Option<Instant> = None;
    // The last flush failed (and the store is marked failing until one succeeds).
    let mut flush_failed = false;
    let (mut commits, mut ops_written) = (0u64, 0u64);
    let mut group: Vec<(Vec<Op>, Waiting)> = Vec::new();
    // The core's durable rounds in this group: each `Job::Commit` is one.
    let mut in_group: u64 = 0;
    loop {
        let first = match (p.flush_every, unflushed_since) {
            (Some(every), Some(since)) => {
                match rx.recv_timeout((since + every).saturating_duration_since(Instant::now())) {
                    Ok(job) => Some(job),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            _ => match rx.recv() {
                Ok(job) => Some(job),
                Err(_) => break,
            },
        };
        if let (Some(every), Some(since)) = (p.flush_every, unflushed_since)
            && since.elapsed() >= every
        {
            match p.store.flush() {
                Ok(()) => {
                    unflushed_since = None;
                    if std::mem::take(&mut flush_failed) {
                        tracing::warn!("the store flushes again");
                        metrics.store_failing.store(false, Ordering::Release);
                    }
                }
                Err(error) => {
                    // What was acknowledged since the last flush is in the log (in the
                    // operating system's hands, as after any batched commit), so nothing
                    // is lost yet. The store refuses every commit until the disk takes
                    // writes again (redb latches the error); then it opens the database
                    // again and applies the log, durably, before taking the next commit.
                    // Tried again after another interval.
                    if !flush_failed {
                        metrics.store_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(%error, "store flush failed: refusing commits until the disk takes writes again (the log keeps what was acknowledged)");
                    }
                    flush_failed = true;
                    metrics.store_failing.store(true, Ordering::Release);
                    unflushed_since = Some(Instant::now());
                }
            }
        }
        let mut next = first;
        let mut reset = None;
        while let Some(job) = next {
            match job {
                Job::Commit {
                    ops,
                    sends,
                    loads,
                    hooks,
                } => {
                    #[cfg(debug_assertions)]
                    for op in &ops {
                        if let Op::PutRetained { message } = op {
                            fault_hook(message.topic.as_str(), "writer");
                        }
                    }
                    in_group += 1;
                    group.push((ops, Waiting::Sealed(sends, loads, hooks)));
                }
                Job::Behind(sends) => group.push((Vec::new(), Waiting::Behind(sends))),
                Job::Reset(reply) => {
                    reset = Some(reply);
                    break;
                }
            }
            next = if group.len() < MAX_GROUP {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if !group.is_empty() {
            let n = group.len();
            let mut ops = Vec::new();
            let mut waiting = Vec::with_capacity(n);
            for (o, mut w) in group.drain(..) {
                // A cluster node's QoS 1/2 messages are in the cluster's stream before
                // this node commits what they did here (a crash in between: nothing
                // committed, the publisher sends again; the link retries until the
                // stream has them).
                if let Waiting::Sealed(_, _, hooks) = &mut w
                    && let Some(gate) = hooks.gate.take()
                {
                    let _ = gate.blocking_recv();
                }
                ops.extend(o);
                waiting.push(w);
            }
            let result = match &failed {
                Some(error) => Err(error.clone()),
                None => {
                    let started = Instant::now();
                    // An empty batch (only rounds behind) is committed too: cheap, and
                    // its receipt is what opens anything sealed.
                    let result = if ops.is_empty() {
                        Ok(tern_store::Committed::receipt())
                    } else {
                        p.store.commit(&ops)
                    };
                    if !ops.is_empty() {
                        metrics.commit_latency.observe(started.elapsed());
                    }
                    result
                }
            };
            match result {
                Ok(receipt) => {
                    if !ops.is_empty() {
                        if metrics.store_failing.swap(false, Ordering::AcqRel) {
                            tracing::warn!("the store takes commits again");
                        }
                        commits += 1;
                        ops_written += ops.len() as u64;
                        metrics.store_commits.fetch_add(1, Ordering::Relaxed);
                        metrics.store_batches.fetch_add(n as u64, Ordering::Relaxed);
                        metrics
                            .store_ops
                            .fetch_add(ops.len() as u64, Ordering::Relaxed);
                        if p.flush_every.is_some() && unflushed_since.is_none() {
                            unflushed_since = Some(Instant::now());
                        }
                    }
                    committed.fetch_add(std::mem::take(&mut in_group), Ordering::Release);
                    let mut loads = Vec::new();
                    for w in waiting {
                        let (sends, after) = match w {
                            Waiting::Sealed(s, l, hooks) => {
                                loads.extend(l.open(&receipt));
                                (s.open(&receipt), hooks.after)
                            }
                            Waiting::Behind(s) => (s, None),
                        };
                        release_all(sends, false);
                        if let Some(after) = after {
                            after();
                        }
                    }
                    // Read once the batch that may hold them is committed.
                    for load in loads {
                        let read = match &load.history {
                            Some(h) => p
                                .store
                                .read_history(h)
                                .map(|m| tern_store::history_entries(m, std::time::Instant::now())),
                            None => p.store.read_queue(&load.client_id, load.after, load.max),
                        };
                        match read {
                            Ok(messages) => answer(to_core, metrics, load, messages),
                            Err(error) => {
                                // Queued messages that cannot be read back would never be
                                // delivered: fail-stop, as for a failed flush.
                                tracing::error!(%error, client_id = %load.client_id, "reading a queue back from the store failed: stopping");
                                let _ = fatal.send(format!(
                                    "reading a queue from the store failed: {error}"
                                ));
                            }
                        }
                    }
                }
                Err(error) => {
                    in_group = 0;
                    if failed.is_none() {
                        metrics.store_failures.fetch_add(1, Ordering::Relaxed);
                        metrics.store_failing.store(true, Ordering::Release);
                        tracing::error!(%error, ops = ops.len(), "store commit failed: closing the connections that waited on it and reloading the last committed state");
                        // The core hears of it before any client sees its connection
                        // close, so a client that reconnects at once meets the reloaded
                        // core.
                        let _ = to_core.send(ToCore::StoreFailed);
                    }
                    for w in waiting {
                        let sends = match w {
                            Waiting::Sealed(s, l, _hooks) => {
                                let _unread = l.failed(&error);
                                s.failed(&error)
                            }
                            Waiting::Behind(s) => s,
                        };
                        release_all(sends, true);
                    }
                    failed = Some(error);
                }
            }
            pending.fetch_sub(n, Ordering::AcqRel);
            progress.notify_waiters();
        }
        if let Some(reply) = reset {
            failed = None;
            // The core starts again: its rounds count from 1.
            committed.store(0, Ordering::Release);
            in_group = 0;
            let read = if lazy {
                p.store.load_spilled()
            } else {
                p.store.load()
            };
            let snapshot = match read {
                Ok(s) => Some(s),
                Err(error) => {
                    tracing::error!(%error, "the store cannot be read back");
                    None
                }
            };
            let _ = reply.send(snapshot);
        }
    }
    if unflushed_since.is_some()
        && let Err(error) = p.store.flush()
    {
        tracing::error!(%error, "store flush failed");
    }
    let per_commit = if commits == 0 {
        0.0
    } else {
        ops_written as f64 / commits as f64
    };
    tracing::info!(
        commits,
        ops = ops_written,
        ops_per_commit = format!("{per_commit:.1}"),
        "storage writer stopped"
    );
}
