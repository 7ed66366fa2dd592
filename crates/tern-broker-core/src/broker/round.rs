//! One round of the core's output ([`Broker::poll_round`]): what the inputs since the last
//! round changed durably, and what they produced for each connection. Persist, then
//! acknowledge, is a property of these types: a round that changed durable state hands
//! out its sends [`Sealed`], and a sealed value opens only with the store's
//! [`Committed`] receipt for its ops (or, when the commit failed, with the error, to close
//! the connections that waited on it).

use tern_codec::{Packet, QosPid};
use tern_store::{Committed, Op, StoreError};

use super::{Broker, ConnId, ConnMap, DropReason, Output};

/// What one connection is sent in a round, in order, and whether it is closed after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Send {
    /// The connection.
    pub conn: ConnId,
    /// Packets to write, in order (in the connection's protocol version).
    pub packets: Vec<Packet>,
    /// Close the connection once they are written.
    pub close: bool,
}

/// A value that waits for a commit.
#[must_use = "sealed sends are opened after their commit, or given up when it fails"]
#[derive(Debug)]
pub struct Sealed<T>(T);

impl<T> Sealed<T> {
    /// The value, now that its ops are committed.
    pub fn open(self, _receipt: &Committed) -> T {
        self.0
    }

    /// The value, after its commit failed: for closing what waited on it, never for
    /// sending it.
    pub fn failed(self, _error: &StoreError) -> T {
        self.0
    }

    /// Changes what is sealed (the server turns connection ids into its connections'
    /// queues), keeping the seal.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Sealed<U> {
        Sealed(f(self.0))
    }
}

/// One round of output.
#[derive(Debug)]
pub enum Round {
    /// Nothing durable changed: the sends may go out (each behind whatever already waits
    /// for a commit on its connection, so that nothing overtakes what was produced before
    /// it).
    Ready(Vec<Send>),
    /// These ops, one batch, must be committed before the `sealed` sends are opened. The
    /// `early` ones need no commit and may go out at once (on the same terms as `Ready`'s,
    /// and before the sealed sends of their connection): QoS 0 and QoS 1 PUBLISH packets,
    /// and a CONNACK resuming a session (unless its CONNECT carried a will, stored in this
    /// round), at the head of a connection's output. If the
    /// commit never happens, a QoS 1 message sent early is sent again after the restart
    /// (its `Sent` record was lost, so it is still queued): a duplicate, which at least
    /// once allows; and the resumed session is still there, as it was before the CONNECT
    /// (it was stored before). Acknowledgements, QoS 2 packets, SUBACK, a CONNACK without a
    /// session (clean start may have deleted one: that must be on disk before the client
    /// hears it), and everything after one of them on a connection are sealed.
    Durable {
        /// The batch to commit.
        ops: Vec<Op>,
        /// What may go before the commit.
        early: Vec<Send>,
        /// What waits for it.
        sealed: Sealed<Vec<Send>>,
        /// Queued messages to read back from the store, answered with
        /// [`Broker::handle_loaded`](crate::Broker::handle_loaded). Empty unless
        /// [`Settings::queue_window`](crate::Settings) is set.
        loads: Loads,
    },
}

/// The loads of a round: read from the store once the round's batch is committed (the
/// messages to read may be in it), or, for those [`Loads::early`] hands out, at once from
/// what is already committed.
#[derive(Debug)]
pub struct Loads {
    early: Vec<crate::Load>,
    sealed: Sealed<Vec<crate::Load>>,
}

impl Loads {
    /// Loads that may be read now, before the round's commit, from what the store has
    /// committed so far, given that the first `committed` durable rounds are committed:
    /// nothing their sessions have changed since behind their window takes messages away
    /// (ids grow in queue order, so what is committed of a queue is a prefix of it,
    /// perhaps empty), and the session's own creation is committed. Answer each, even
    /// with nothing found ([`crate::Broker::handle_loaded`] then asks again, to be read
    /// after a commit).
    pub fn early(&mut self, committed: u64) -> Vec<crate::Load> {
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.early)
            .into_iter()
            .partition(|l| l.born <= committed);
        self.sealed.0.extend(later);
        now
    }

    /// The rest (the early ones too, unless taken), now that the round's batch is
    /// committed.
    pub fn open(self, receipt: &Committed) -> Vec<crate::Load> {
        let mut all = self.sealed.open(receipt);
        all.extend(self.early);
        all
    }

    /// The commit failed: nothing is read (the core starts again from the store).
    pub fn failed(self, error: &StoreError) -> Vec<crate::Load> {
        let mut all = self.sealed.failed(error);
        all.extend(self.early);
        all
    }
}

/// Whether a packet may reach its connection before the commit of its round: a QoS 0 or
/// QoS 1 PUBLISH (a lost record of it only means a resend), or a CONNACK with Session
/// Present (the session it resumes was stored before this round) unless its CONNECT
/// carried a will (`will_waits`: the will is stored in this round, and a client told it is
/// connected must find its will published if a crash ends the connection).
fn needs_no_commit(p: &Packet, will_waits: bool) -> bool {
    match p {
        Packet::Publish(p) => !matches!(p.qos_pid, QosPid::ExactlyOnce(_)),
        Packet::ConnAck(a) => a.session_present && !will_waits,
        _ => false,
    }
}

impl Broker {
    /// Everything produced since the last round, grouped per connection (one write
    /// each), with the durable changes it waits for.
    ///
    /// `backlog` tells, per connection, how many bytes already wait to be written to it:
    /// past [`Settings::max_write_backlog`](crate::Settings) its QoS 0 PUBLISH packets are
    /// dropped (at most once allows it) and counted as [`DropReason::SlowConsumer`]. What
    /// reaches a connection at QoS 1/2 is bounded by its inflight window (the rest waits in
    /// its session queue), acknowledgements by what the client sends itself.
    pub fn poll_round(&mut self, backlog: impl Fn(ConnId) -> usize) -> Round {
        let mut order: Vec<ConnId> = Vec::new();
        let mut by_conn: ConnMap<Send> = ConnMap::default();
        while let Some(out) = self.poll_output() {
            let conn = match &out {
                Output::Send(c, _) | Output::Close(c) => *c,
            };
            let send = by_conn.entry(conn).or_insert_with(|| {
                order.push(conn);
                Send {
                    conn,
                    packets: Vec::new(),
                    close: false,
                }
            });
            match out {
                Output::Send(_, p) => send.packets.push(p),
                Output::Close(_) => send.close = true,
            }
        }
        let limit = self.settings.max_write_backlog;
        let mut sends = Vec::with_capacity(order.len());
        for conn in order {
            let Some(mut send) = by_conn.remove(&conn) else {
                continue;
            };
            if !send.packets.is_empty() && backlog(conn) > limit {
                let before = send.packets.len();
                send.packets.retain(
                    |p| !matches!(p, Packet::Publish(p) if p.qos_pid == QosPid::AtMostOnce),
                );
                let dropped = (before - send.packets.len()) as u64;
                if dropped > 0 {
                    self.counters.drop_n(DropReason::SlowConsumer, dropped);
                    tracing::debug!(
                        conn,
                        dropped,
                        "subscriber not reading: QoS 0 dropped for it"
                    );
                }
                if send.packets.is_empty() && !send.close {
                    continue;
                }
            }
            sends.push(send);
        }
        if self.forwarded_durable {
            // The count of this node's QoS 1/2 forwards goes in the commit that holds
            // their effects here (docs/cluster.md, "After a crash").
            self.batch
                .push(tern_store::Op::ClusterForwarded(self.cluster_forwarded));
        }
        let ops = self.take_ops();
        let loads = std::mem::take(&mut self.loads);
        let connack_sealed = std::mem::take(&mut self.connack_sealed);
        // A QoS 1/2 message for the other nodes: its acknowledgement waits for the stream.
        let forwarded = std::mem::take(&mut self.forwarded_durable);
        if ops.is_empty() && loads.is_empty() && !forwarded {
            return Round::Ready(sends);
        }
        self.rounds += 1;
        // Each connection's output splits where the first packet that needs the commit
        // is: what comes before it goes early, it and the rest wait.
        let mut early = Vec::new();
        let mut sealed = Vec::with_capacity(sends.len());
        for mut send in sends {
            let will_waits = connack_sealed.contains(&send.conn);
            let head = send
                .packets
                .iter()
                .take_while(|p| needs_no_commit(p, will_waits))
                .count();
            if head == send.packets.len() && !send.close {
                early.push(send);
                continue;
            }
            if head > 0 {
                let rest = send.packets.split_off(head);
                early.push(Send {
                    conn: send.conn,
                    packets: std::mem::replace(&mut send.packets, rest),
                    close: false,
                });
            }
            sealed.push(send);
        }
        Round::Durable {
            ops,
            early,
            sealed: Sealed(sealed),
            loads: {
                let (early, sealed) = loads.into_iter().partition(|l: &crate::Load| l.early);
                Loads {
                    early,
                    sealed: Sealed(sealed),
                }
            },
        }
    }
}
