//! The life of a connection inside its session: the engine's events drained and acted
//! on, and how a connection ends (closed, kicked, parked, shut down) and a session with it.

use super::*;

impl Broker {
    /// The socket of `conn` closed (or is being closed). Publishes the will unless the
    /// client disconnected normally, and ends or parks the session.
    pub fn handle_closed(&mut self, conn: ConnId, now: Instant) {
        if !self.parked_conns.is_empty() {
            self.unpark(conn);
        }
        self.close(conn, now, &"connection closed by the peer or lost");
        self.peers.remove(&conn);
        self.commit(now);
    }

    /// Ends the connection's part in its session; `why` goes to the log.
    pub(super) fn close(&mut self, conn: ConnId, now: Instant, why: &dyn Display) {
        let Some(client_id) = self.conns.remove(&conn) else {
            return;
        };
        self.touch(&client_id);
        let Some(session) = self.sessions.get_mut(&client_id) else {
            return;
        };
        let Some((id, connection)) = session.conn.take() else {
            return;
        };
        debug_assert_eq!(id, conn);
        // Its will is published, delayed (in the session's record) or discarded now.
        // (A cluster keeps a delayed one until it is due: see below.)
        let mut forget_in_cluster = false;
        if std::mem::take(&mut session.will_stored) {
            self.batch.push(Op::DeleteWill {
                client_id: client_id.clone(),
            });
            forget_in_cluster = self.settings.cluster;
        }
        // Held publishes die with the connection, unacknowledged: the client sends them
        // again when it is back.
        if !session.parked.is_empty() {
            session.parked.clear();
            self.blocked.retain(|c| *c != client_id);
        }
        let protocol = connection.config().protocol;
        let mut stored = connection.into_session();
        // Messages refused without their PUBREC: a resend is a new message.
        stored.drop_unreleased_inbound();
        // What this member of shared subscriptions has not acknowledged goes to another
        // member now, rather than waiting for it to come back (§4.8.2).
        let via = &session.via_shared;
        let taken = stored.take_redeliverable(|id| via.contains_key(&id), false);
        let redeliver = session.with_shared_keys(taken);
        session.conn = Link::Offline(stored);
        tracing::info!(conn, peer = %self.peer(conn), client_id = %client_id, %protocol, reason = %why, "disconnected");
        for (key, m, id) in redeliver {
            self.carry_copy(&client_id, id);
            self.deliver_shared(&key, m, None, Some(&client_id), now);
            self.carry = None;
        }
        let Some(session) = self.sessions.get_mut(&client_id) else {
            return;
        };
        if let Some(will) = session.will.take() {
            let delay = u64::from(will.properties.will_delay_interval.unwrap_or(0));
            if delay == 0 || session.expiry.is_zero() {
                let username = session.username.clone();
                self.publish_will(&client_id, username.as_deref(), *will, now);
            } else {
                // Sent when the delay passes or the session ends, whichever comes first,
                // unless the client reconnects in time [MQTT-3.1.3-9]. A cluster keeps
                // it too, so that it is published should this node die meanwhile.
                session.pending_will = Some(Box::new((now + Duration::from_secs(delay), *will)));
                forget_in_cluster = false;
            }
        }
        if forget_in_cluster && !self.cut_off {
            self.will_changes
                .push(WillChange::Delete(client_id.clone()));
        }
        self.park(&client_id, now);
    }

    /// Cluster: this node is cut off from NATS (`true`: it could not say it lives for long
    /// enough that the other nodes will soon take it for gone) or back (`false`). Cut off,
    /// it closes every connection (5.0: DISCONNECT 0x9C Use another server) without
    /// publishing their wills, drops the delayed wills it waits on, and refuses new
    /// connections (0x88 Server unavailable): the cluster holds those wills and publishes
    /// each once, a surviving node if this one stays away, this one (its link reclaims
    /// them) if it comes back first. Its clients can go on at another node meanwhile,
    /// rather than stay with a node the cluster is about to declare dead.
    pub fn handle_cut_off(&mut self, cut_off: bool, now: Instant) {
        if cut_off == self.cut_off {
            return;
        }
        self.cut_off = cut_off;
        if !cut_off {
            tracing::info!("cluster: this node reaches NATS again: it takes connections");
            return;
        }
        let online: Vec<Str> = self.conns.values().cloned().collect();
        tracing::warn!(
            connections = online.len(),
            "cluster: this node is cut off from NATS: its connections are closed (their wills are the cluster's) and new ones refused until it is back"
        );
        for client_id in online {
            if let Some(s) = self.sessions.get_mut(&client_id) {
                s.will = None;
            }
            self.kick(&client_id, ReasonCode::UseAnotherServer, now);
        }
        for s in self.sessions.values_mut() {
            s.pending_will = None;
        }
        self.commit(now);
    }

    /// A session whose connection just ended: it ends too (expiry zero), or waits offline
    /// with its deadline and delivery state written to the store.
    pub(super) fn park(&mut self, client_id: &Str, now: Instant) {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return;
        };
        if session.expiry.is_zero() {
            self.end_session(client_id, now);
        } else {
            session.expires_at = Some(now + session.expiry);
            // The connection's keep-alive entry is void now: forget it, so the timers do
            // not wake for it (poll_timeout discards it as stale).
            session.scheduled = None;
            self.put_session(client_id);
            self.schedule(client_id);
        }
    }

    /// Server shutdown: every connection is told (5.0: DISCONNECT 0x8B) and closed. Their
    /// sessions are parked in the store as if disconnected now, without publishing wills
    /// (the sessions live on; a restart resumes them).
    pub fn shutdown(&mut self, now: Instant) {
        let online: Vec<(ConnId, Str)> = self.conns.drain().collect();
        for (conn, client_id) in online {
            let Some(session) = self.sessions.get_mut(&client_id) else {
                continue;
            };
            let Some((_, mut c)) = session.conn.take() else {
                continue;
            };
            c.disconnect(ReasonCode::ServerShuttingDown);
            while let Some(p) = c.poll_transmit(now) {
                self.outputs.push_back(Output::Send(conn, p));
            }
            self.outputs.push_back(Output::Close(conn));
            let mut stored = c.into_session();
            stored.drop_unreleased_inbound();
            session.conn = Link::Offline(stored);
            session.will = None;
            if std::mem::take(&mut session.will_stored) {
                self.batch.push(Op::DeleteWill {
                    client_id: client_id.clone(),
                });
                if self.settings.cluster {
                    self.will_changes
                        .push(WillChange::Delete(client_id.clone()));
                }
            }
            self.touch(&client_id);
            self.park(&client_id, now);
        }
        self.commit(now);
    }

    /// Moves what the session's engine produced into outputs and acts on its events.
    pub(super) fn drain(&mut self, client_id: &Str, now: Instant) {
        loop {
            let Some(session) = self.sessions.get_mut(client_id) else {
                return;
            };
            // Drained now: a later delivery in this input lists it again.
            session.drain_due = false;
            let Some((conn, c)) = session.conn.as_mut() else {
                return;
            };
            let conn = *conn;
            while let Some(p) = c.poll_transmit(now) {
                self.outputs.push_back(Output::Send(conn, p));
            }
            let Some(event) = c.poll_event() else { return };
            if let Event::Acknowledged { message_id, .. } | Event::Dropped { message_id, .. } =
                &event
                && !session.via_shared.is_empty()
            {
                session.via_shared.remove(message_id);
            }
            match event {
                Event::Message { message, ack } => {
                    if !self.accept(client_id, message, ack, now) {
                        return;
                    }
                }
                Event::Control(Packet::Subscribe(s)) => self.subscribe(client_id, s, now),
                Event::Control(Packet::Unsubscribe(u)) => self.unsubscribe(client_id, u),
                Event::Dropped {
                    reason, message, ..
                } => match reason {
                    tern_proto::DropReason::Expired => {
                        self.counters.drop_n(DropReason::Expired, 1);
                        tracing::info!(client_id = %client_id, topic = %message.topic.as_str(), "message expired before delivery: dropped");
                    }
                    tern_proto::DropReason::TooLarge => {
                        self.counters.drop_n(DropReason::TooLarge, 1);
                        tracing::debug!(client_id = %client_id, topic = %message.topic.as_str(), "message larger than the client's Maximum Packet Size: dropped for it");
                    }
                    tern_proto::DropReason::NotConnected => {}
                },
                Event::Control(_) | Event::Acknowledged { .. } => {}
                Event::Closed {
                    reason,
                    session_expiry,
                } => {
                    if let Some(secs) = session_expiry
                        && let Some(s) = self.sessions.get_mut(client_id)
                    {
                        if s.expiry.is_zero() && secs > 0 {
                            // [MQTT-3.14.2-2]: 0 at CONNECT cannot become non-zero. A
                            // protocol error, so the will is published.
                            self.outputs.push_back(Output::Send(
                                conn,
                                Packet::Disconnect(tern_codec::Disconnect::new(
                                    ReasonCode::ProtocolError,
                                )),
                            ));
                            self.outputs.push_back(Output::Close(conn));
                            self.close(
                                conn,
                                now,
                                &"DISCONNECT set a Session Expiry Interval after CONNECT said 0 (0x82)",
                            );
                            return;
                        }
                        s.expiry = Duration::from_secs(u64::from(secs));
                    }
                    // A normal DISCONNECT discards the will, except 0x04 [MQTT-3.14.4-3].
                    if let Some(s) = self.sessions.get_mut(client_id)
                        && reason == ReasonCode::Success
                    {
                        s.will = None;
                    }
                    if let Some(s) = self.sessions.get_mut(client_id)
                        && let Some((_, c)) = s.conn.as_mut()
                    {
                        while let Some(p) = c.poll_transmit(now) {
                            self.outputs.push_back(Output::Send(conn, p));
                        }
                    }
                    self.outputs.push_back(Output::Close(conn));
                    let why = match reason {
                        ReasonCode::Success => "DISCONNECT from the client".to_string(),
                        ReasonCode::DisconnectWithWill => {
                            "DISCONNECT from the client, with will (0x04)".to_string()
                        }
                        r => format!("{r:?} (0x{:02X})", r as u8),
                    };
                    self.close(conn, now, &why);
                    return;
                }
            }
        }
    }

    /// Ends the client's connection for breaking a rule: DISCONNECT with `reason` (5.0),
    /// then close; the will is published (not a normal disconnect).
    pub(super) fn kick(&mut self, client_id: &Str, reason: ReasonCode, now: Instant) {
        let Some(Session {
            conn: Link::Online((conn, c)),
            ..
        }) = self.sessions.get_mut(client_id).map(|s| &mut **s)
        else {
            return;
        };
        let conn = *conn;
        c.disconnect(reason);
        while let Some(p) = c.poll_transmit(now) {
            self.outputs.push_back(Output::Send(conn, p));
        }
        self.outputs.push_back(Output::Close(conn));
        let why = format!("{reason:?} (0x{:02X})", reason as u8);
        self.close(conn, now, &why);
    }

    pub(super) fn end_session(&mut self, client_id: &Str, now: Instant) {
        // Cluster: group messages held for it as a given copy go to the group elsewhere.
        self.hand_back_held(client_id);
        if let Some(mut s) = self.sessions.remove(client_id) {
            self.queued.0 -= s.accounted.0;
            self.queued.1 -= s.accounted.1;
            self.shrank |= s.accounted.0 > 0;
            if !s.parked.is_empty() {
                self.blocked.retain(|c| c != client_id);
            }
            // Shared-subscription messages the session still held go to another member
            // (§4.8.2): with the session gone, nobody else can complete them.
            let via = &s.via_shared;
            let taken = s
                .conn
                .take_stored()
                .take_redeliverable(|id| via.contains_key(&id), true);
            let redeliver = s.with_shared_keys(taken);
            if s.persisted {
                self.batch.push(Op::DeleteSession {
                    client_id: client_id.clone(),
                });
            }
            for filter in s.subscriptions.keys() {
                self.remove_subscription(client_id, filter);
            }
            for (key, m, id) in redeliver {
                self.carry_copy(client_id, id);
                self.deliver_shared(&key, m, None, None, now);
                self.carry = None;
            }
            // What it held and nobody took over is settled for its receipts.
            self.settle_copies(client_id, now);
            if let Some((_, will)) = s.pending_will.map(|p| *p) {
                self.publish_will(client_id, s.username.as_deref(), will, now);
                if self.settings.cluster {
                    self.will_changes
                        .push(WillChange::Delete(client_id.clone()));
                }
            }
        }
    }
}
