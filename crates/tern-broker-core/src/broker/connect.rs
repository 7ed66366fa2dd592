//! The CONNECT handshake: client identifiers, redirection, keep alive, session
//! takeover and resume, the CONNACK and what it advertises.

use super::*;

impl Broker {
    /// The server's answer on a CONNECT it read (connection limits, the password file):
    /// granted, it goes on as [`Broker::handle_packet`] would take it; refused, the core
    /// answers. A CONNECT given straight to `handle_packet` counts as granted.
    pub fn handle_admission(&mut self, conn: ConnId, admission: Admission, now: Instant) {
        match admission {
            Admission::Granted(connect) if self.parks(&connect) => {
                self.park_connect(conn, connect);
                self.commit(now);
            }
            Admission::Granted(connect) => self.handle_packet(conn, Packet::Connect(connect), now),
            Admission::Refused(protocol, refusal) => {
                self.refuse_before_connect(conn, protocol, refusal);
                self.commit(now);
            }
        }
    }

    /// Refuses the CONNECT of `conn` (which the core has not taken), in `protocol`.
    pub(super) fn refuse_before_connect(
        &mut self,
        conn: ConnId,
        protocol: Protocol,
        refusal: Refusal,
    ) {
        let connect = Connect::new(protocol, "");
        self.refuse(conn, refusal, Some(&connect));
    }

    /// The one place a refusal CONNACK is built: its reason code (the codec writes the 3.x
    /// return code, or closes without one where 3.x has none), a 5.0 redirection's Server
    /// Reference, the log line; then the connection is closed. `connect`: what the client
    /// asked, when it was read.
    pub(super) fn refuse(&mut self, conn: ConnId, refusal: Refusal, connect: Option<&Connect>) {
        let v5 = connect.is_some_and(|c| c.protocol.is_v5());
        let mut ack = ConnAck::new(false, refusal.reason_code());
        match refusal {
            Refusal::Redirected { .. } if !v5 => ack.reason = ReasonCode::ServerUnavailable,
            Refusal::Redirected { .. } => {
                let reference = self.settings.server_reference.as_deref().unwrap_or("");
                ack.properties = ConnAckProperties {
                    server_reference: Some(Str::from(reference)),
                    ..Default::default()
                }
                .into();
            }
            _ => {}
        }
        let client_id = connect.map_or("", |c| &*c.client_id);
        tracing::info!(conn, peer = %self.peer(conn), client_id, %refusal, "refused at CONNECT");
        if refusal.answer(v5, false) != Answer::Silence {
            self.outputs
                .push_back(Output::Send(conn, Packet::ConnAck(ack)));
        }
        self.outputs.push_back(Output::Close(conn));
    }

    /// A client identifier for a client that sent none [MQTT-3.1.3-6]: unique
    /// [MQTT-3.2.2-16]. `tern-{start}-{n}`: the process's start (its wall-clock time in
    /// nanoseconds, passed in at `resume`) keeps identifiers of an earlier process, whose
    /// sessions may be stored, from coming back; a session of that name (a client may
    /// have chosen it for itself) is skipped.
    fn assign_client_id(&mut self) -> Str {
        loop {
            self.next_assigned += 1;
            let id = Str::from(format!(
                "tern-{:x}-{}",
                self.start_nanos, self.next_assigned
            ));
            if !self.sessions.contains_key(&id) {
                return id;
            }
        }
    }

    /// The CONNACK accepting `connect`: what the server offers, in 5.0 properties.
    fn connack(&self, connect: &Connect, present: bool, assigned: Option<Str>) -> ConnAck {
        let mut ack = ConnAck::new(present, ReasonCode::Success);
        if connect.protocol.is_v5() {
            let st = &self.settings;
            let ka = connect.keep_alive;
            let server_keep_alive = (ka > st.max_keep_alive
                || (ka == 0 && st.max_keep_alive < u16::MAX))
                .then_some(st.max_keep_alive);
            let response_information = match connect.properties.request_response_information {
                Some(true) => st.response_information.as_deref().map(Str::from),
                _ => None,
            };
            ack.properties = ConnAckProperties {
                receive_maximum: std::num::NonZeroU16::new(st.receive_maximum),
                topic_alias_maximum: Some(st.topic_alias_maximum),
                assigned_client_identifier: assigned,
                server_keep_alive,
                response_information,
                maximum_qos: (st.maximum_qos < QoS::ExactlyOnce).then_some(st.maximum_qos),
                retain_available: (!st.retain_available).then_some(false),
                maximum_packet_size: (st.max_packet_size < tern_codec::MAX_PACKET_SIZE)
                    .then(|| std::num::NonZeroU32::new(st.max_packet_size))
                    .flatten(),
                wildcard_subscription_available: Some(true),
                subscription_identifiers_available: Some(true),
                shared_subscription_available: Some(true),
                ..Default::default()
            }
            .into();
        }
        ack
    }

    pub(super) fn handle_connect(&mut self, conn: ConnId, connect: Connect, now: Instant) {
        let v = connect.protocol;
        // Copied, not sliced: a slice would keep the whole read buffer the CONNECT came
        // in (512 bytes or more) alive for as long as the session.
        let mut client_id = Str::from(&*connect.client_id);
        let mut assigned = None;
        if client_id.is_empty() {
            // 3.1.1: only with clean session [MQTT-3.1.3-7]; 5.0: assign one [MQTT-3.1.3-6];
            // 3.1 requires 1 to 23 characters.
            if v == Protocol::V5 || (v == Protocol::V3_1_1 && connect.clean_start) {
                client_id = self.assign_client_id();
                assigned = Some(client_id.clone());
            } else {
                return self.refuse(conn, Refusal::ClientIdNotValid, Some(&connect));
            }
        }
        if self.cut_off {
            return self.refuse(conn, Refusal::CutOff, Some(&connect));
        }
        if self.settings.server_reference.is_some() {
            let moved = self.settings.server_moved;
            return self.refuse(conn, Refusal::Redirected { moved }, Some(&connect));
        }
        // No enhanced authentication methods are offered (§4.12): refuse rather than
        // leave the client waiting for an AUTH exchange.
        if v.is_v5() && connect.properties.authentication_method.is_some() {
            return self.refuse(conn, Refusal::BadAuthenticationMethod, Some(&connect));
        }
        // 3.x has no way to tell a client to ping more often: refuse, as Mosquitto does.
        if !v.is_v5() && connect.keep_alive > self.settings.max_keep_alive {
            return self.refuse(conn, Refusal::KeepAliveTooLong, Some(&connect));
        }
        // Nothing may exceed the client's Maximum Packet Size [MQTT-3.1.2-24]: a CONNACK
        // that does not fit even without its optional properties is not sent at all.
        if let Some(limit) = connect.properties.maximum_packet_size {
            let mut ack = Packet::ConnAck(self.connack(&connect, false, assigned.clone()));
            ack.drop_optional_properties();
            if tern_codec::encoded_len(&ack, v).is_ok_and(|len| len > limit.get() as usize) {
                return self.refuse(conn, Refusal::ConnAckTooLarge, Some(&connect));
            }
        }
        // A new session needs room under max_sessions (resuming or taking over one does
        // not; clean start on an existing one ends it first, so it needs none either).
        if let Some(max) = self.settings.max_sessions
            && !self.sessions.contains_key(&client_id)
            && self.sessions.len() >= max
        {
            tracing::warn!(max, "session limit reached");
            return self.refuse(conn, Refusal::SessionLimit, Some(&connect));
        }
        let expiry = if v.is_v5() {
            Duration::from_secs(u64::from(
                connect.properties.session_expiry_interval.unwrap_or(0),
            ))
        } else if connect.clean_start {
            Duration::ZERO
        } else {
            self.settings.max_session_expiry_3x
        };

        // Session takeover [MQTT-3.1.4-3]: the older connection goes, with 0x8E in 5.0.
        if let Some(old) = self.sessions.get_mut(&client_id)
            && let Some((old_conn, c)) = old.conn.as_mut()
        {
            let old_conn = *old_conn;
            c.disconnect(ReasonCode::SessionTakenOver);
            self.drain(&client_id, now);
            self.outputs.push_back(Output::Close(old_conn));
            self.close(old_conn, now, &"session taken over by a new connection");
        }
        if connect.clean_start {
            self.end_session(&client_id, now);
        }
        let present = self.sessions.contains_key(&client_id);

        let ack = self.connack(&connect, present, assigned);
        let (queued, inflight) = self.sessions.get(&client_id).map_or((0, 0), |s| {
            let st = s.state();
            (st.queued_len(), st.inflight_len())
        });
        tracing::info!(conn, peer = %self.peer(conn), client_id = %client_id, protocol = %v, session_present = present, queued, inflight, "connected");
        if self.settings.cluster && self.claimed.as_ref() != Some(&client_id) {
            self.claims.push(client_id.clone());
        }
        let config = Config::negotiate(
            Role::Server,
            &connect,
            &ack,
            // Acknowledged by the broker once the message is checked and routed.
            AckMode::Manual,
            self.settings.window_3x,
        );
        let born = self.rounds + 1;
        let session = self.sessions.entry(client_id.clone()).or_insert_with(|| {
            Box::new(Session {
                born,
                conn: Link::Offline(SessionState::new()),
                subscriptions: BTreeMap::new(),
                expiry,
                expires_at: None,
                will: None,
                pending_will: None,
                persisted: false,
                problem_info: true,
                touched: false,
                username: None,
                rate: (now, 0),
                queue_full_logged: None,
                scheduled: None,
                drain_due: false,
                via_shared: HashMap::new(),
                accounted: (0, 0),
                parked: VecDeque::new(),
                will_stored: false,
                replay: None,
                identity: Str::new(),
                fed: None,
                given: false,
            })
        });
        session.given = false;
        session.expiry = expiry;
        session.username = connect.username.as_deref().map(Str::from);
        session.identity = key_identity(&client_id, session.username.as_ref());
        session.expires_at = None;
        // The will is kept in the store while the connection lasts, so that a crash, which
        // ends the connection too, does not lose it.
        if let Some(will) = &connect.will {
            self.batch.push(Op::PutWill {
                client_id: client_id.clone(),
                will: will.clone(),
            });
            if self.settings.cluster {
                self.will_changes.push(WillChange::Put {
                    client_id: client_id.clone(),
                    username: connect.username.clone(),
                    will: will.clone(),
                    session_expiry: u32::try_from(expiry.as_secs()).unwrap_or(u32::MAX),
                });
            }
            session.will_stored = true;
            // The client may take its CONNACK as "my will is kept": it waits for the
            // commit even when it resumes a session.
            self.connack_sealed.push(conn);
        }
        // Back in time: a delayed will from the last connection is not sent (in a cluster
        // its entry goes, unless this connection's will has just replaced it).
        if session.pending_will.take().is_some() && self.settings.cluster && connect.will.is_none()
        {
            self.will_changes
                .push(WillChange::Delete(client_id.clone()));
        }
        session.will = connect.will.map(Box::new);
        session.problem_info = connect
            .properties
            .request_problem_information
            .unwrap_or(true);
        let stored = session.conn.take_stored();
        session.conn = Link::Online((conn, Connection::new(config, stored, present, now)));
        self.touch(&client_id);
        self.put_session(&client_id);
        self.conns.insert(conn, client_id.clone());
        self.outputs
            .push_back(Output::Send(conn, Packet::ConnAck(ack)));
        // A session this node gave and resumes: the group messages held meanwhile.
        self.release_held(&client_id, now);
        self.drain(&client_id, now);
        self.schedule(&client_id);
    }
}
