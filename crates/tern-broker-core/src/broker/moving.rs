//! Cluster: a persistent session moving from one node to another when its client
//! reconnects elsewhere (docs/cluster.md, "How a session moves").
//!
//! The node the client reconnects to (B) parks the CONNECT and asks the driver to fetch
//! the session ([`Broker::take_fetches`]). The node that has it (A) closes its connection,
//! and once that is committed its store hands out the session as committed, with the
//! stream position A had applied (P) and the number of its own QoS 1/2 forwards (N)
//! of the same commit ([`Broker::handle_give`]). What the session holds is then exactly:
//! the stream's messages up to P from other nodes, and A's own messages numbered up to
//! N. B installs it ([`Broker::handle_moved`]) with the stream's messages after P that
//! B's reader has passed (read again for this one session), and from then on its reader
//! gives the session a stream message only if A did not: not at or below P, not one of
//! A's numbered up to N, and of B's own messages (which B's reader otherwise skips: B's
//! sessions had them when they were published) those B forwarded before the install.

use super::*;

/// Cluster: where a message of the cluster's stream comes from, for the sessions that
/// moved here ([`Remote::source`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Its stream sequence.
    pub seq: u64,
    /// The node that put it in the stream ("" for a message from outside Tern).
    pub node: std::sync::Arc<str>,
    /// Its number among that node's QoS 1/2 forwards.
    pub number: u64,
    /// This node's own message, read back from the stream for the sessions that moved
    /// here only (every other session had it when it was published).
    pub own: bool,
    /// For this node's own message, the client that published it (its own subscriptions
    /// with No Local do not get it).
    pub publisher: Option<String>,
    /// Handed back to the cluster by a node none of whose members could take it (its
    /// shared groups only; not handed back again).
    pub handed: bool,
}

/// Cluster: a session another node gave this one ([`Broker::handle_moved`]).
#[derive(Debug)]
pub struct MovedIn {
    /// The session as that node's store had it, with the positions of that commit.
    pub session: tern_store::Exported,
    /// That node.
    pub from: String,
    /// The stream's messages after `session.cluster_applied` up to where this node's
    /// reader stands, in stream order.
    pub catch_up: Vec<Remote>,
}

impl Broker {
    /// Cluster: whether a CONNECT is parked until its session is fetched from the node
    /// that has it (a client resuming a session, not cleaning it).
    pub(super) fn parks(&self, connect: &Connect) -> bool {
        self.settings.cluster
            && !connect.clean_start
            && !connect.client_id.is_empty()
            && !self.cut_off
    }

    /// Parks `connect` of `conn` until [`Broker::handle_moved`]; packets that follow it
    /// wait with it.
    pub(super) fn park_connect(&mut self, conn: ConnId, connect: Box<Connect>) {
        let client_id = Str::from(&*connect.client_id);
        self.parked_conns.insert(conn, Vec::new());
        match self.fetching.insert(client_id.clone(), (conn, connect)) {
            // A second connection while the first waits: the first goes, unanswered.
            Some((old, _)) => {
                self.parked_conns.remove(&old);
                self.outputs.push_back(Output::Close(old));
            }
            None => self.fetches.push(client_id),
        }
    }

    /// A packet of a connection whose CONNECT is parked waits with it; `Err` gives the
    /// packet back for a connection that is not parked.
    pub(super) fn park_packet(&mut self, conn: ConnId, packet: Packet) -> Result<(), Packet> {
        match self.parked_conns.get_mut(&conn) {
            Some(waiting) => {
                waiting.push(packet);
                Ok(())
            }
            None => Err(packet),
        }
    }

    /// A parked connection closed: it is forgotten (its session is installed all the
    /// same when it comes).
    pub(super) fn unpark(&mut self, conn: ConnId) -> bool {
        if self.parked_conns.remove(&conn).is_none() {
            return false;
        }
        self.fetching.retain(|_, (c, _)| *c != conn);
        true
    }

    /// Cluster: client ids whose session is to be fetched from the node that has it (the
    /// answer: [`Broker::handle_moved`]).
    pub fn take_fetches(&mut self) -> Vec<Str> {
        std::mem::take(&mut self.fetches)
    }

    /// Cluster: the answer to a fetch of `client_id`'s session: the session another node
    /// gave (installed here, replacing whatever this node had of it), or `None` (this
    /// node has the latest, or nobody has one, or the node that had it is gone);
    /// `revision`: that of the client table's entry the fetch read, if any.
    ///
    /// Then the parked CONNECT goes on as a CONNECT does, except when the session moved
    /// here, or is one this node gave to another and now resumes: its client is then
    /// answered only once the cluster says the client is here, by a claim on that
    /// revision ([`Broker::take_claims_first`], [`Broker::handle_claimed`]), written after
    /// this round's commit. So the node that gave it still has it should this one fail
    /// first, and no two nodes ever serve one session (a second node's claim on the same
    /// revision fails, and its client is refused for now).
    pub fn handle_moved(
        &mut self,
        client_id: &str,
        moved: Option<MovedIn>,
        revision: Option<u64>,
        now: Instant,
    ) {
        let gave = self.sessions.get(client_id).is_some_and(|s| s.given);
        let claim = revision.filter(|_| moved.is_some() || gave);
        if let Some(m) = moved {
            self.install(m, now);
        }
        match claim {
            Some(revision) if self.fetching.contains_key(client_id) => {
                self.claims_first.push((Str::from(client_id), revision));
            }
            _ => self.answer_parked(client_id, now),
        }
        self.commit(now);
    }

    /// Cluster: client ids to claim, each on the revision given, once the round is
    /// committed ([`Broker::handle_moved`]); the answers: [`Broker::handle_claimed`].
    pub fn take_claims_first(&mut self) -> Vec<(Str, u64)> {
        std::mem::take(&mut self.claims_first)
    }

    /// Cluster: the cluster says `client_id` is here now (`claimed`), and its parked
    /// CONNECT is answered; or another node claimed it first (or NATS failed), and the
    /// client is refused for now (0x88) to try again.
    pub fn handle_claimed(&mut self, client_id: &str, claimed: bool, now: Instant) {
        if claimed {
            self.claimed = Some(Str::from(client_id));
            self.answer_parked(client_id, now);
            self.claimed = None;
            self.commit(now);
        } else {
            self.handle_unavailable(client_id, now);
        }
    }

    /// The parked CONNECT of `client_id` (if its connection is still there) goes on as a
    /// CONNECT does, with the packets that waited behind it.
    fn answer_parked(&mut self, client_id: &str, now: Instant) {
        if let Some((conn, connect)) = self.fetching.remove(client_id) {
            let packets = self.parked_conns.remove(&conn).unwrap_or_default();
            self.handle_packet(conn, Packet::Connect(connect), now);
            for p in packets {
                self.handle_packet(conn, p, now);
            }
        }
    }

    /// Cluster: the session of `client_id` could not be fetched (the node that has it did
    /// not answer in time): the parked CONNECT is refused (0x88 Server unavailable; 3.x:
    /// return code 3), and the client tries again.
    pub fn handle_unavailable(&mut self, client_id: &str, now: Instant) {
        if let Some((conn, connect)) = self.fetching.remove(client_id) {
            self.parked_conns.remove(&conn);
            self.refuse(conn, Refusal::SessionElsewhere, Some(&connect));
        }
        self.commit(now);
    }

    fn install(&mut self, m: MovedIn, now: Instant) {
        let tern_store::Exported {
            client_id,
            session,
            cluster_applied,
            cluster_forwarded,
        } = m.session;
        if self.sessions.contains_key(&client_id) {
            // An older copy (the client was here before): replaced.
            self.kick(&client_id, ReasonCode::SessionTakenOver, now);
            self.discard_session(&client_id);
        }
        tracing::info!(client_id = %client_id, from = %m.from, queued = session.delivery.queued_len(), inflight = session.delivery.inflight_len(), inbound_qos2 = session.delivery.inbound_qos2().count(), catch_up = m.catch_up.len(), "cluster: a session moved here from another node");
        let mut session = session;
        // What it holds of the stream: everything up to the giver's position, and, unless
        // it took the giver's own messages from the stream there too, the giver's own
        // messages up to the count of the same commit.
        let through = if session.record.fed.is_some() {
            0
        } else {
            cluster_forwarded
        };
        session.record.fed = Some(tern_store::Fed {
            after: cluster_applied,
            from: Str::from(m.from.as_str()),
            through,
        });
        self.batch.push(Op::PutSession {
            client_id: client_id.clone(),
            record: session.record.clone(),
        });
        self.batch.push(Op::PutDelivery {
            client_id: client_id.clone(),
            state: session.delivery.clone(),
            shared: session.shared.clone(),
        });
        let mut redeliver = Vec::new();
        self.restore_session(client_id.clone(), session, now, &mut redeliver);
        let born = self.rounds + 1;
        if let Some(s) = self.sessions.get_mut(&client_id) {
            s.born = born;
        }
        // What the stream had past the giver's position, up to this node's: for this
        // session only.
        self.only = Some(client_id.clone());
        self.from_remote = true;
        for r in m.catch_up {
            self.route_remote(r, now);
        }
        self.from_remote = false;
        self.only = None;
    }

    /// Cluster: another node fetches `client_id`'s session: its connection here ends (as
    /// a takeover ends it), a delayed will waiting here is dropped (the client is back),
    /// and the session stays here, still taking messages, until the cluster says the
    /// client is on the other node ([`Broker::handle_taken_over`]). Returns whether there
    /// is a session to give: the driver reads it from the store once this input's round is
    /// committed.
    pub fn handle_give(&mut self, client_id: &str, now: Instant) -> bool {
        let Some(key) = self
            .sessions
            .get_key_value(client_id)
            .map(|(k, _)| k.clone())
        else {
            return false;
        };
        self.kick(&key, ReasonCode::SessionTakenOver, now);
        let mut record_changed = false;
        let mut give = false;
        if let Some(s) = self.sessions.get_mut(&key) {
            if s.pending_will.take().is_some() {
                self.will_changes.push(WillChange::Delete(key.clone()));
                record_changed = true;
            }
            give = s.persisted;
            s.given = give;
        }
        if record_changed {
            self.put_session(&key);
        }
        self.commit(now);
        give
    }

    /// Whether the session `client_id` takes the message being routed from the cluster's
    /// stream (`self.source`): a session that moved here takes what it did not hold when
    /// it moved, this node's own messages included; every other session takes everything
    /// but this node's own messages (it had them when they were published).
    pub(super) fn admits(&self, client_id: &Str) -> bool {
        let Some(src) = &self.source else {
            return true;
        };
        if !self.fed_here {
            return !src.own;
        }
        match self.sessions.get(client_id).and_then(|s| s.fed.as_deref()) {
            None => !src.own,
            Some(f) => src.seq > f.after && !(*src.node == *f.from && src.number <= f.through),
        }
    }

    /// Whether a session that takes this node's own messages from the stream has been on
    /// this node since the process started.
    pub fn has_fed(&self) -> bool {
        self.fed_here
    }

    /// Cluster: another node says it has `client_id`, a client this run of the node never
    /// claimed (the cluster's client table, read at start and watched). A session of it
    /// here, offline and not being fetched, is a copy an earlier run left (it restarted
    /// before it saw the client move, or the client started afresh elsewhere while it was
    /// down): it goes, without a will or anything handed on, since the client's session
    /// lives on there. Otherwise it would take messages until it expired (for a 3.1.1
    /// client, never) and no one would read them.
    pub fn handle_elsewhere(&mut self, client_id: &str, now: Instant) {
        if self.fetching.contains_key(client_id) {
            return;
        }
        let Some((key, s)) = self.sessions.get_key_value(client_id) else {
            return;
        };
        if s.conn.as_ref().is_some() {
            return;
        }
        let key = key.clone();
        tracing::info!(client_id = %key, "cluster: the client is on another node: the copy of its session an earlier run left here goes");
        self.hand_back_held(&key);
        self.discard_session(&key);
        self.commit(now);
    }

    /// Cluster: the shared-group messages held for `client_id`'s given copy go back to the
    /// cluster for their groups ([`Broker::take_handed_back`]).
    pub(super) fn hand_back_held(&mut self, client_id: &Str) {
        if let Some(held) = self.held_for_given.remove(client_id) {
            tracing::info!(client_id = %client_id, messages = held.len(), "cluster: shared-group messages held for a session that moved go back to the cluster");
            self.handed_back
                .extend(held.into_iter().map(|(key, m)| (m, key.to_string())));
        }
    }

    /// Cluster: the shared-group messages held for `client_id` while it was given, for it
    /// now that it stays here (or for another member).
    pub(super) fn release_held(&mut self, client_id: &Str, now: Instant) {
        if let Some(held) = self.held_for_given.remove(client_id) {
            for (key, m) in held {
                if !self.deliver_shared(&key, m.clone(), None, None, now) {
                    self.handed_back.push((m, key.to_string()));
                }
            }
        }
    }

    /// Removes a session without the effects of its end (no will, nothing of it handed to
    /// other shared-group members): it lives on elsewhere.
    pub(super) fn discard_session(&mut self, client_id: &Str) {
        let Some(s) = self.sessions.remove(client_id) else {
            return;
        };
        self.queued.0 -= s.accounted.0;
        self.queued.1 -= s.accounted.1;
        self.shrank |= s.accounted.0 > 0;
        if !s.parked.is_empty() {
            self.blocked.retain(|c| c != client_id);
        }
        if s.persisted {
            self.batch.push(Op::DeleteSession {
                client_id: client_id.clone(),
            });
        }
        for filter in s.subscriptions.keys() {
            self.remove_subscription(client_id, filter);
        }
    }
}
