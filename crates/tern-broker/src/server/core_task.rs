//! The core task and how a round's outputs reach the connections (through the storage
//! writer when they wait for a commit).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tern_codec::Packet;
use tokio::sync::{mpsc, watch};

use super::{ToConn, ToCore, line, writer};
use crate::auth::Access;
use crate::core::{Broker, ConnMap, Output, Settings};
use crate::metrics::Metrics;

/// The core task: owns the [`Broker`], takes what connections and the storage writer
/// send, wakes for the core's deadlines and `$SYS`, and hands each round's outputs out
/// ([`dispatch`]). On shutdown every connection is told and the writer finishes.
pub(super) struct CoreTask {
    pub(super) broker: Broker,
    pub(super) from_conns: mpsc::UnboundedReceiver<ToCore>,
    pub(super) acl_changes: watch::Receiver<Arc<Access>>,
    pub(super) writer: Option<writer::Writer>,
    pub(super) core_metrics: Arc<Metrics>,
    pub(super) core_settings: Settings,
    pub(super) sys_interval: Option<Duration>,
    pub(super) backlog_limit: usize,
}

impl CoreTask {
    /// Runs until shutdown (or the store cannot be read back after a failure).
    pub(super) async fn run(self) {
        let CoreTask {
            mut broker,
            mut from_conns,
            mut acl_changes,
            mut writer,
            core_metrics,
            core_settings,
            sys_interval,
            backlog_limit,
        } = self;
        let mut writers: ConnMap<line::Sender<ToConn>> = ConnMap::default();
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
            }
            // What this round sends is timed from the earliest read it answers (lowered
            // below), or from now for what the core does on its own (timers, $SYS). Not
            // from before the wait above: that would count the idle time.
            let mut since = Instant::now();
            // Everything already waiting is handled before one batch goes to the writer.
            let mut next = first;
            let mut handled = 0;
            let mut closed = Vec::new();
            while let Some(msg) = next {
                let now = Instant::now();
                match msg {
                    ToCore::Accepted(conn, peer, tx) => {
                        writers.insert(conn, tx);
                        broker.handle_accepted(conn, &peer);
                    }
                    ToCore::Packet(conn, p, read_at) => {
                        since = since.min(read_at);
                        broker.handle_packet(conn, p, now);
                    }
                    ToCore::Packets(conn, packets, read_at) => {
                        since = since.min(read_at);
                        handled += packets.len().saturating_sub(1);
                        for p in packets {
                            broker.handle_packet(conn, p, now);
                        }
                    }
                    ToCore::Gauges(reply) => {
                        let _ = reply.send(broker.gauges(now, 10));
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
                        let _ = broker.take_ops();
                        while broker.poll_output().is_some() {}
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
                &mut writers,
                writer.as_ref(),
                since,
                backlog_limit,
                &core_metrics,
            );
            for conn in closed {
                writers.remove(&conn);
            }
        }
        broker.shutdown(Instant::now());
        dispatch(
            &mut broker,
            &mut writers,
            writer.as_ref(),
            Instant::now(),
            backlog_limit,
            &core_metrics,
        );
        if let Some(w) = writer.take() {
            let _ = tokio::task::spawn_blocking(move || w.finish()).await;
        }
    }
}

/// Sends each connection what the broker produced, grouped so a connection gets one
/// message (one write) per round. With a storage writer, the round's ops go to it and the
/// sends wait for their commit; they go straight out only when nothing is waiting for a
/// commit (so nothing overtakes what was produced before it).
///
/// A subscriber that does not read builds a backlog in its line. Once that backlog is over
/// `backlog_limit` bytes, its QoS 0 PUBLISH packets are dropped (at most once allows it)
/// and counted as `slow_consumer`. What reaches the line at QoS 1/2 is bounded by its
/// inflight window (the rest waits in its session queue, which is not capped while it is
/// online: see docs/conformance.md), acks by what it sends itself.
fn dispatch(
    broker: &mut Broker,
    writers: &mut ConnMap<line::Sender<ToConn>>,
    writer: Option<&writer::Writer>,
    since: Instant,
    backlog_limit: usize,
    metrics: &Metrics,
) {
    let mut batches: ConnMap<Vec<Packet>> = ConnMap::default();
    let mut closes = vec![];
    while let Some(out) = broker.poll_output() {
        match out {
            Output::Send(conn, p) => batches.entry(conn).or_default().push(p),
            Output::Close(conn) => closes.push(conn),
        }
    }
    let ops = broker.take_ops();
    let mut sends = Vec::with_capacity(batches.len() + closes.len());
    for (conn, mut packets) in batches {
        let Some(w) = writers.get(&conn) else {
            continue;
        };
        if w.backlog() > backlog_limit {
            let before = packets.len();
            packets.retain(
                |p| !matches!(p, Packet::Publish(p) if p.qos_pid == tern_codec::QosPid::AtMostOnce),
            );
            let dropped = (before - packets.len()) as u64;
            if dropped > 0 {
                metrics.drop_n(crate::metrics::DropReason::SlowConsumer, dropped);
                tracing::debug!(
                    conn,
                    dropped,
                    "subscriber not reading: QoS 0 dropped for it"
                );
            }
            if packets.is_empty() {
                continue;
            }
        }
        let weight = packets
            .iter()
            .map(|p| match p {
                Packet::Publish(p) => p.topic.as_str().len() + p.payload.len(),
                _ => 0,
            })
            .sum();
        sends.push((
            w.clone(),
            ToConn::Packets(Box::new((packets, since, weight))),
        ));
    }
    for conn in closes {
        if let Some(w) = writers.get(&conn) {
            sends.push((w.clone(), ToConn::Close));
        }
    }
    match writer {
        Some(w) if !ops.is_empty() || w.busy() => w.submit(ops, sends),
        // Memory only, or nothing to write and nothing ahead: straight out.
        _ => {
            for (tx, msg) in sends {
                let _ = tx.send(msg);
            }
        }
    }
}
