//! The core task and how a round's outputs reach the connections (through the storage
//! writer when they wait for a commit).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tern_codec::Packet;
use tern_store::{Committed, Op, Snapshot, Store, StoreError};
use tokio::sync::{mpsc, watch};

use super::{ToConn, ToCore, line, writer};
use crate::auth::Access;
use crate::core::{Broker, ConnMap, Round, Send, Settings};
use crate::metrics::Metrics;

/// The core task: owns the [`Broker`], takes what connections and the storage writer
/// send, wakes for the core's deadlines and `$SYS`, and hands each round's outputs out
/// ([`dispatch`]). On shutdown every connection is told and the writer finishes.
pub(super) struct CoreTask {
    pub(super) broker: Broker,
    pub(super) inbox: Arc<super::Inbox>,
    pub(super) from_conns: mpsc::UnboundedReceiver<ToCore>,
    pub(super) acl_changes: watch::Receiver<Arc<Access>>,
    pub(super) topic_changes: watch::Receiver<Option<Arc<[crate::core::TopicPolicy]>>>,
    pub(super) writer: Option<writer::Writer>,
    pub(super) core_metrics: Arc<Metrics>,
    pub(super) core_settings: Settings,
    pub(super) sys_interval: Option<Duration>,
    /// The link to the other nodes, if this broker is a node of a cluster.
    pub(super) cluster: Option<mpsc::UnboundedSender<tern_cluster::Out>>,
    /// A cluster node: reads the sessions it gives to other nodes from its store.
    pub(super) exporter: Option<Exporter>,
}

pub(super) type Exporter = Arc<std::sync::Mutex<Box<dyn tern_store::QueueReader>>>;

impl CoreTask {
    /// Runs until shutdown (or the store cannot be read back after a failure).
    pub(super) async fn run(self) {
        let CoreTask {
            inbox,
            mut broker,
            mut from_conns,
            mut acl_changes,
            mut topic_changes,
            mut writer,
            core_metrics,
            core_settings,
            sys_interval,
            cluster,
            exporter,
        } = self;
        let mut writers: ConnMap<line::Sender<ToConn>> = ConnMap::default();
        // Counts the core's restarts after store failures: an admin action waiting for its
        // round's commit gives up when the count moves (the round numbers start again).
        let generation = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        // One timer, moved to whatever the core says is due next (keep alive, session
        // expiry, will delay): nothing wakes the core while nothing is due.
        let mut timer = std::pin::pin!(tokio::time::sleep(Duration::from_secs(3600)));
        let mut armed: Option<Instant> = None;
        let mut sys_tick = tokio::time::interval(sys_interval.unwrap_or(Duration::MAX / 4));
        'run: loop {
            let mut first = None;
            let due = broker.poll_timeout();
            if due != armed {
                if let Some(at) = due {
                    timer.as_mut().reset(tokio::time::Instant::from_std(at));
                }
                armed = due;
            }
            tokio::select! {
                msg = from_conns.recv() => match msg {
                    Some(msg) => first = Some(msg),
                    None => break 'run,
                },
                () = &mut timer, if armed.is_some() => {
                    armed = None;
                    broker.handle_timeout(Instant::now());
                }
                _ = sys_tick.tick(), if sys_interval.is_some() => broker.publish_sys(Instant::now(), &core_metrics.traffic()),
                Ok(()) = acl_changes.changed() => {
                    broker.set_acl(acl_changes.borrow_and_update().acl.clone());
                    tracing::info!("ACL reloaded");
                }
                Ok(()) = topic_changes.changed() => {
                    if let Some(topics) = topic_changes.borrow_and_update().clone() {
                        tracing::info!(policies = topics.len(), "topic policies reloaded");
                        broker.set_topic_policies(topics);
                    }
                }
            }
            // What this round sends is timed from the earliest read it answers (lowered
            // below), or from now for what the core does on its own (timers, $SYS). Not
            // from before the wait above: that would count the idle time.
            let mut since = Instant::now();
            // Everything already waiting is handled before one batch goes to the writer.
            let mut next = first;
            let mut handled = 0;
            let mut closed = Vec::new();
            let mut acted = Vec::new();
            let mut gives = Vec::new();
            while let Some(msg) = next {
                let now = Instant::now();
                match msg {
                    ToCore::Accepted(conn, peer, tx) => {
                        writers.insert(conn, tx);
                        broker.handle_accepted(conn, &peer);
                    }
                    ToCore::Packet(conn, p, read_at) => {
                        inbox.take(super::inbox_weight([&p]));
                        since = since.min(read_at);
                        #[cfg(debug_assertions)]
                        fault(&p);
                        broker.handle_packet(conn, p, now);
                    }
                    ToCore::Packets(conn, packets, read_at) => {
                        inbox.take(super::inbox_weight(&packets));
                        #[cfg(debug_assertions)]
                        slow_core().await;
                        since = since.min(read_at);
                        handled += packets.len().saturating_sub(1);
                        for p in packets {
                            #[cfg(debug_assertions)]
                            fault(&p);
                            broker.handle_packet(conn, p, now);
                        }
                    }
                    ToCore::Loaded(loaded) => {
                        let (load, messages) = *loaded;
                        broker.handle_loaded(&load, messages, now);
                    }
                    ToCore::Remote(messages) => {
                        broker.handle_remote(messages, now);
                    }
                    ToCore::RemoteDurable(last, messages) => {
                        broker.handle_remote_durable(last, messages, now);
                    }
                    ToCore::TakenOver(client_id) => {
                        broker.handle_taken_over(&client_id, now);
                    }
                    ToCore::Elsewhere(client_id) => {
                        broker.handle_elsewhere(&client_id, now);
                    }
                    ToCore::CutOff(cut) => {
                        broker.handle_cut_off(cut, now);
                    }
                    ToCore::Retained(messages) => {
                        broker.handle_retained(messages, now);
                    }
                    ToCore::Give(client_id, reply) => match &exporter {
                        Some(_) if broker.handle_give(&client_id, now) => {
                            gives.push((client_id, reply));
                        }
                        _ => {
                            let _ = reply.send(None);
                        }
                    },
                    ToCore::Moved(client_id, moved) => match moved {
                        Ok((m, revision)) => {
                            broker.handle_moved(&client_id, m.map(|m| *m), revision, now);
                        }
                        Err(()) => broker.handle_unavailable(&client_id, now),
                    },
                    ToCore::Claimed(client_id, claimed) => {
                        broker.handle_claimed(&client_id, claimed, now);
                    }
                    ToCore::ClusterWill(w) => {
                        let w = *w;
                        broker.handle_cluster_will(
                            &w.client_id,
                            w.username.as_deref(),
                            w.will,
                            now,
                        );
                    }
                    ToCore::Gauges(reply) => {
                        let _ = reply.send(broker.gauges(now, 10));
                    }
                    ToCore::Admin(query, reply) => {
                        let acting = matches!(query, super::admin::Query::Act(_));
                        let answer = super::admin::answer(&mut broker, query, now);
                        if acting {
                            // Answered once what it changed is committed (below).
                            acted.push((answer, reply));
                        } else {
                            let _ = reply.send(answer);
                        }
                    }
                    ToCore::DecodeError(conn, v, e) => {
                        broker.handle_decode_error(conn, v, &e, now);
                    }
                    ToCore::Admission(conn, admission, read_at) => {
                        since = since.min(read_at);
                        broker.handle_admission(conn, admission, now);
                    }
                    ToCore::Closed(conn) => {
                        broker.handle_closed(conn, now);
                        // Its writer goes after this round's outputs: a DISCONNECT for
                        // a bad packet comes in the same round as the close.
                        closed.push(conn);
                    }
                    ToCore::StoreFailed => {
                        // The store refused a commit: what the core holds is ahead of the
                        // disk. Every connection goes (nothing they were owed was sent),
                        // and the core starts again from the last commit.
                        let Some(w) = writer.as_mut() else {
                            unreachable!("only the storage writer reports store failures")
                        };
                        for (_, tx) in writers.drain() {
                            let _ = tx.send(ToConn::Close);
                        }
                        // The round in the making is dropped: sealed, it cannot be sent.
                        let _ = broker.poll_round(|_| 0);
                        // Admin actions not yet known to be committed get no answer (the
                        // endpoint says 503): the core starts again from the store, and its
                        // rounds count from the start again.
                        acted.clear();
                        generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                        match w.reset().await {
                            Some(snapshot) => {
                                let counters = broker.counters().clone();
                                broker = Broker::resume(
                                    core_settings.clone(),
                                    snapshot,
                                    Instant::now(),
                                    SystemTime::now(),
                                );
                                broker.set_acl(acl_changes.borrow().acl.clone());
                                if let Some(topics) = topic_changes.borrow().clone() {
                                    broker.set_topic_policies(topics);
                                }
                                broker.set_counters(counters);
                                tracing::warn!(
                                    "state reloaded from the last commit; accepting connections again"
                                );
                            }
                            None => {
                                tracing::error!("the store cannot be read back; stopping");
                                break 'run;
                            }
                        }
                    }
                    ToCore::Shutdown => break 'run,
                }
                handled += 1;
                next = if handled < 256 {
                    from_conns.try_recv().ok()
                } else {
                    None
                };
            }
            dispatch(
                &mut broker,
                &writers,
                writer.as_ref(),
                since,
                cluster.as_ref(),
            );
            if let (false, Some(exporter)) = (gives.is_empty(), &exporter) {
                // The sessions given are read from the store once the rounds that closed
                // their connections here are committed.
                let wait = committed_wait(&broker, writer.as_ref(), &generation);
                let exporter = exporter.clone();
                tokio::spawn(async move {
                    if !wait.await {
                        return;
                    }
                    let _ = tokio::task::spawn_blocking(move || export(&exporter, gives)).await;
                });
            }
            if !acted.is_empty() {
                // The admin actions of this batch are in the rounds handed out so far; a
                // store failure since gives no answer (their commit may never happen).
                let wait = committed_wait(&broker, writer.as_ref(), &generation);
                tokio::spawn(async move {
                    if !wait.await {
                        return;
                    }
                    for (answer, reply) in acted {
                        let _ = reply.send(answer);
                    }
                });
            }
            for conn in closed {
                writers.remove(&conn);
            }
            // A writer that falls behind holds the core back, and so (through the inbox)
            // the connections' reading: its queue stays bounded.
            if let Some(w) = writer.as_ref() {
                w.room().await;
            }
        }
        broker.shutdown(Instant::now());
        dispatch(
            &mut broker,
            &writers,
            writer.as_ref(),
            Instant::now(),
            cluster.as_ref(),
        );
        if let Some(w) = writer.take() {
            let _ = tokio::task::spawn_blocking(move || w.finish()).await;
        }
    }
}

/// Waits until the rounds handed out so far are committed; false if a store failure came
/// between (their commit may never happen).
fn committed_wait(
    broker: &Broker,
    writer: Option<&writer::Writer>,
    generation: &Arc<std::sync::atomic::AtomicU64>,
) -> impl std::future::Future<Output = bool> + use<> {
    let round = broker.durable_rounds();
    let committed = writer.map(writer::Writer::committed);
    let (generation, born) = (
        generation.clone(),
        generation.load(std::sync::atomic::Ordering::Acquire),
    );
    async move {
        let Some((count, progress)) = committed else {
            return true;
        };
        loop {
            let notified = progress.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if generation.load(std::sync::atomic::Ordering::Acquire) != born {
                return false;
            }
            if count.load(std::sync::atomic::Ordering::Acquire) >= round {
                return true;
            }
            notified.await;
        }
    }
}

/// Reads each session given to another node from the store and answers with it.
fn export(
    exporter: &Exporter,
    gives: Vec<(
        String,
        tokio::sync::oneshot::Sender<Option<tern_cluster::moves::Given>>,
    )>,
) {
    let reader = exporter
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (client_id, reply) in gives {
        let given = match reader.export_session(&client_id) {
            Ok(Some(e)) => match e.encode(Instant::now(), SystemTime::now()) {
                Ok(bytes) => Some(tern_cluster::moves::Given {
                    session: bytes.into(),
                    applied: e.cluster_applied,
                    forwarded: e.cluster_forwarded,
                }),
                Err(err) => {
                    tracing::error!(error = %err, client_id = %client_id, "a session to give to another node could not be written out");
                    None
                }
            },
            Ok(None) => None,
            Err(err) => {
                tracing::error!(error = %err, client_id = %client_id, "a session to give to another node could not be read");
                None
            }
        };
        if given.is_some() {
            tracing::info!(client_id = %client_id, "cluster: a session given to another node");
        }
        let _ = reply.send(given);
    }
}

/// Sends each connection what the broker produced in this round, one message (one write)
/// per connection. A round that changed durable state goes to the storage writer, its
/// sends sealed until the commit's receipt opens them; a round that did not goes straight
/// out unless something is still waiting for a commit (then it queues behind, so nothing
/// overtakes what was produced before it). Without a store the ops are committed to
/// nothing ([`Memory`]). The core decides the slow-consumer drops, from each line's
/// backlog.
fn dispatch(
    broker: &mut Broker,
    writers: &ConnMap<line::Sender<ToConn>>,
    writer: Option<&writer::Writer>,
    since: Instant,
    cluster: Option<&mpsc::UnboundedSender<tern_cluster::Out>>,
) {
    let round = broker.poll_round(|conn| writers.get(&conn).map_or(0, line::Sender::backlog));
    // A cluster node: the round's messages for the other nodes go to the link; its QoS
    // 1/2 ones gate the round's sends, and what it applied of the stream is acknowledged
    // once it is committed.
    let mut hooks = writer::Hooks::default();
    if let Some(link) = cluster {
        let forwards: Vec<tern_cluster::Forward> = broker
            .take_forwards()
            .into_iter()
            .map(|f| tern_cluster::Forward {
                message: f.message,
                origin: f.origin,
                number: f.number,
            })
            .collect();
        let interest: Vec<tern_cluster::Interest> = broker
            .take_interest()
            .into_iter()
            .map(|i| tern_cluster::Interest {
                filter: i.filter,
                share: i.share,
                add: i.add,
            })
            .collect();
        let stored = if forwards
            .iter()
            .any(|f| f.message.qos != tern_codec::QoS::AtMostOnce)
        {
            let (tx, rx) = tokio::sync::oneshot::channel();
            hooks.gate = Some(rx);
            Some(tx)
        } else {
            None
        };
        let claims: Vec<String> = broker
            .take_claims()
            .into_iter()
            .map(|c| c.to_string())
            .collect();
        let first_claims: Vec<(String, u64)> = broker
            .take_claims_first()
            .into_iter()
            .map(|(c, r)| (c.to_string(), r))
            .collect();
        let wills: Vec<tern_cluster::wills::Change> = broker
            .take_will_changes()
            .into_iter()
            .map(|c| match c {
                crate::core::WillChange::Put {
                    client_id,
                    username,
                    will,
                    session_expiry,
                } => tern_cluster::wills::Change::Put(tern_cluster::wills::Will {
                    client_id: client_id.to_string(),
                    username: username.map(|u| u.to_string()),
                    will,
                    session_expiry,
                }),
                crate::core::WillChange::Delete(client_id) => {
                    tern_cluster::wills::Change::Delete(client_id.to_string())
                }
            })
            .collect();
        let fetches: Vec<String> = broker
            .take_fetches()
            .into_iter()
            .map(|c| c.to_string())
            .collect();
        let handed_back = broker.take_handed_back();
        if !forwards.is_empty()
            || !interest.is_empty()
            || !wills.is_empty()
            || !fetches.is_empty()
            || !handed_back.is_empty()
        {
            let _ = link.send(tern_cluster::Out {
                forwards,
                interest,
                stored,
                wills,
                fetches,
                handed_back,
                ..Default::default()
            });
        }
        // Claims of client ids go out once the round is committed: the node that had the
        // client lets go of a session it gave only then.
        let applied = broker.take_applied();
        if applied.is_some() || !claims.is_empty() || !first_claims.is_empty() {
            let link = link.clone();
            hooks.after = Some(Box::new(move || {
                let _ = link.send(tern_cluster::Out {
                    applied,
                    claims,
                    first_claims,
                    ..Default::default()
                });
            }));
        }
    }
    let to_lines = |sends: Vec<Send>| -> writer::Sends {
        let mut out = Vec::with_capacity(sends.len());
        for send in sends {
            let Some(w) = writers.get(&send.conn) else {
                continue;
            };
            if !send.packets.is_empty() {
                // Topic and payload bytes, and what each packet takes in memory besides:
                // acknowledgements weigh too (a client that never reads must not pile
                // them up without bound).
                let weight = send
                    .packets
                    .iter()
                    .map(|p| {
                        PACKET_WEIGHT
                            + match p {
                                Packet::Publish(p) => p.topic.as_str().len() + p.payload.len(),
                                _ => 0,
                            }
                    })
                    .sum();
                out.push((
                    w.clone(),
                    ToConn::Packets(Box::new((send.packets, since, weight))),
                ));
            }
            if send.close {
                out.push((w.clone(), ToConn::Close));
            }
        }
        out
    };
    // What may go now goes now, unless its connection has something waiting in the
    // storage writer: then it queues behind that, so nothing overtakes on a connection.
    let waits = |send: &Send| writers.get(&send.conn).is_some_and(line::Sender::held);
    match (round, writer) {
        (
            Round::Durable {
                ops,
                early,
                sealed,
                loads,
            },
            Some(w),
        ) => {
            let (behind, now): (Vec<Send>, Vec<Send>) = early.into_iter().partition(waits);
            writer::send_all(to_lines(now));
            // The early sends that must wait go ahead of the sealed ones (each
            // connection's output in order).
            w.submit(
                ops,
                sealed.map(|sealed| to_lines(behind.into_iter().chain(sealed).collect())),
                loads,
                hooks,
            );
        }
        (Round::Ready(sends), Some(w)) if w.busy() => {
            if let Some(after) = hooks.after.take() {
                // Nothing of this round to commit: what it acknowledges was committed.
                after();
            }
            let (behind, now): (Vec<Send>, Vec<Send>) = sends.into_iter().partition(waits);
            writer::send_all(to_lines(now));
            if !behind.is_empty() {
                w.behind(to_lines(behind));
            }
        }
        (Round::Ready(sends), _) => {
            if let Some(after) = hooks.after.take() {
                after();
            }
            writer::send_all(to_lines(sends));
        }
        (
            Round::Durable {
                ops,
                early,
                sealed,
                loads: _,
            },
            None,
        ) => {
            // No store, no window (`serve` turns it off): there are never loads.
            writer::send_all(to_lines(early));
            match Memory.commit(&ops) {
                Ok(receipt) => writer::send_all(to_lines(sealed.open(&receipt))),
                Err(e) => writer::close_all(to_lines(sealed.failed(&e))),
            }
        }
    }
}

/// What one packet waiting for a connection weighs besides its topic and payload: about
/// its size in memory.
const PACKET_WEIGHT: usize = 64;

/// The store of a server without persistence: a commit keeps nothing, and succeeds.
struct Memory;

impl Store for Memory {
    fn commit(&mut self, _: &[Op]) -> Result<Committed, StoreError> {
        Ok(Committed::receipt())
    }

    fn load(&self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot::default())
    }

    fn read_queue(
        &self,
        _: &str,
        _: tern_store::MessageId,
        _: usize,
    ) -> Result<Vec<(tern_store::Entry, Option<tern_codec::Str>)>, StoreError> {
        Ok(Vec::new())
    }
    fn read_history(
        &self,
        _: &tern_store::HistoryRead,
    ) -> Result<Vec<tern_store::HistoryMessage>, StoreError> {
        Ok(Vec::new())
    }
}

/// The core's side of the test-only fault hook ([`writer::fault_hook`]).
#[cfg(debug_assertions)]
fn fault(p: &Packet) {
    if let Packet::Publish(p) = p {
        writer::fault_hook(p.topic.as_str(), "core");
        if writer::fault_hook_on(p.topic.as_str(), "slow-core") {
            SLOW_CORE.store(
                p.payload.as_ref() == b"on",
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }
}

/// Test-only (the fault hook): a PUBLISH of `on` to `tern/fault/slow-core` makes the core
/// take 2 ms over each read it is handed, `off` ends it: a core that falls behind.
#[cfg(debug_assertions)]
static SLOW_CORE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[cfg(debug_assertions)]
async fn slow_core() {
    if SLOW_CORE.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
