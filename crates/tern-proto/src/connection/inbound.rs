//! What comes in: packets from the peer and the passing of time.

use super::*;

impl Connection {
    // ---- inputs ----------------------------------------------------------------------

    /// Processes one packet from the peer. On a protocol error the connection is closed
    /// (a DISCONNECT with the reason is queued in 5.0) and the error returned.
    pub fn handle_packet(&mut self, packet: Packet, now: Instant) -> Result<(), ProtocolError> {
        if !self.open {
            return Ok(());
        }
        self.last_received = now;
        self.ping_sent_at = None;
        let result = self.dispatch(packet, now);
        if let Err(e) = &result {
            self.fail(e.reason_code());
        }
        result
    }

    pub(super) fn dispatch(&mut self, packet: Packet, now: Instant) -> Result<(), ProtocolError> {
        match packet {
            Packet::Publish(p) => self.handle_publish(p, now)?,
            Packet::PubAck(a) => self.handle_puback(a, now),
            Packet::PubRec(a) => self.handle_pubrec(a, now),
            Packet::PubRel(a) => self.handle_pubrel(a),
            Packet::PubComp(a) => self.handle_pubcomp(a, now),
            Packet::PingReq if self.config.role == Role::Server => {
                self.transmit.push_back(Packet::PingResp);
            }
            Packet::PingResp if self.config.role == Role::Client => {}
            Packet::PingReq | Packet::PingResp => {
                return Err(ProtocolError::WrongSide(packet.packet_type()));
            }
            Packet::Disconnect(d) => {
                self.open = false;
                self.events.push_back(Event::Closed {
                    reason: d.reason,
                    session_expiry: d.properties.session_expiry_interval,
                });
            }
            Packet::Connect(_) | Packet::ConnAck(_) => {
                return Err(ProtocolError::UnexpectedPacket(packet.packet_type()));
            }
            Packet::SubAck(a) => {
                self.requests.remove(&a.packet_id);
                self.events.push_back(Event::Control(Packet::SubAck(a)));
            }
            Packet::UnsubAck(a) => {
                self.requests.remove(&a.packet_id);
                self.events.push_back(Event::Control(Packet::UnsubAck(a)));
            }
            other @ (Packet::Subscribe(_) | Packet::Unsubscribe(_) | Packet::Auth(_)) => {
                self.events.push_back(Event::Control(other));
            }
        }
        Ok(())
    }

    pub(super) fn handle_publish(
        &mut self,
        mut p: Publish,
        now: Instant,
    ) -> Result<(), ProtocolError> {
        if self.config.role == Role::Server && !p.properties.subscription_identifiers.is_empty() {
            return Err(ProtocolError::SubscriptionIdFromClient);
        }
        if let Some(alias) = p.properties.topic_alias {
            p.topic = self
                .inbound_aliases
                .resolve(alias, p.topic)
                .map_err(|e| match e {
                    AliasError::OutOfRange => ProtocolError::TopicAliasOutOfRange(alias.get()),
                    AliasError::Unknown => ProtocolError::UnknownTopicAlias(alias.get()),
                })?;
        }
        let qos_pid = p.qos_pid;
        let manual = self.config.ack_mode == AckMode::Manual;
        match qos_pid {
            QosPid::AtMostOnce => {
                let message = Message::from_publish(p, now);
                self.events.push_back(Event::Message { message, ack: None });
            }
            QosPid::AtLeastOnce(id) => {
                if !self.pending_puback.contains_key(&id) {
                    self.check_receive_maximum()?;
                }
                let message = Message::from_publish(p, now);
                if manual {
                    self.pending_puback.insert(id, ());
                    self.events.push_back(Event::Message {
                        message,
                        ack: Some(id),
                    });
                } else {
                    self.transmit.push_back(Packet::PubAck(Ack::new(id)));
                    self.events.push_back(Event::Message { message, ack: None });
                }
            }
            QosPid::ExactlyOnce(id) => match self.session.inbound(id) {
                // Delivered already; the application has yet to release the PUBREC.
                Some(InboundState::Delivered) => self.duplicates += 1,
                // Delivered and PUBREC sent: answer again, deliver nothing [MQTT-4.3.3-9].
                Some(InboundState::Received) => {
                    self.duplicates += 1;
                    self.transmit.push_back(Packet::PubRec(Ack::new(id)));
                }
                None => {
                    self.check_receive_maximum()?;
                    let message = Message::from_publish(p, now);
                    if manual {
                        self.session.set_inbound(id, InboundState::Delivered);
                        self.events.push_back(Event::Message {
                            message,
                            ack: Some(id),
                        });
                    } else {
                        self.session.set_inbound(id, InboundState::Received);
                        self.transmit.push_back(Packet::PubRec(Ack::new(id)));
                        self.events.push_back(Event::Message { message, ack: None });
                    }
                }
            },
        }
        Ok(())
    }

    /// 5.0 only: the peer knows our Receive Maximum; 3.x peers were never told one.
    pub(super) fn check_receive_maximum(&self) -> Result<(), ProtocolError> {
        let unacknowledged = self.session.inbound_len() + self.pending_puback.len();
        if self.config.protocol.is_v5()
            && unacknowledged >= usize::from(self.config.receive_maximum)
        {
            return Err(ProtocolError::ReceiveMaximumExceeded(
                self.config.receive_maximum,
            ));
        }
        Ok(())
    }

    pub(super) fn handle_puback(&mut self, a: Ack, now: Instant) {
        let matches = self.session.inflight_ref(a.packet_id).is_some_and(|f| {
            f.message.qos == QoS::AtLeastOnce && f.state == OutboundState::Published
        });
        // A PUBACK for an id not in a QoS 1 flow is ignored.
        if matches {
            self.complete(a.packet_id, a.reason, now);
        }
    }

    pub(super) fn handle_pubrec(&mut self, a: Ack, now: Instant) {
        let id = a.packet_id;
        match self.session.inflight_ref(id) {
            Some(f) if f.message.qos == QoS::ExactlyOnce => {
                if a.reason.is_error() {
                    // The flow ends here: no PUBREL [MQTT-4.3.3-4].
                    self.complete(id, a.reason, now);
                    return;
                }
                self.session.set_released(id);
                self.transmit.push_back(Packet::PubRel(Ack::new(id)));
            }
            Some(_) => {}
            // Not ours (any more): release it so the peer can finish [MQTT-4.3.3].
            None => self.transmit.push_back(Packet::PubRel(self.not_found(id))),
        }
    }

    pub(super) fn handle_pubrel(&mut self, a: Ack) {
        let id = a.packet_id;
        let reply = match self.session.remove_inbound(id) {
            Some(_) => Ack::new(id),
            None => self.not_found(id),
        };
        self.transmit.push_back(Packet::PubComp(reply));
    }

    pub(super) fn handle_pubcomp(&mut self, a: Ack, now: Instant) {
        let released = self
            .session
            .inflight_ref(a.packet_id)
            .is_some_and(|f| f.state == OutboundState::Released);
        if released {
            self.complete(a.packet_id, a.reason, now);
        }
    }

    /// An acknowledgement for an id we hold no state for: 0x92 in 5.0.
    pub(super) fn not_found(&self, id: PacketId) -> Ack {
        if self.config.protocol.is_v5() {
            Ack::with_reason(id, ReasonCode::PacketIdentifierNotFound)
        } else {
            Ack::new(id)
        }
    }

    pub(super) fn complete(&mut self, id: PacketId, reason: ReasonCode, now: Instant) {
        if let Some(f) = self.session.remove_inflight(id) {
            self.events.push_back(Event::Acknowledged {
                id,
                message_id: f.message_id,
                message: f.message,
                reason,
            });
        }
        self.pump(now);
    }

    /// Advances timers: the client sends PINGREQ after `keep_alive` of silence and gives up
    /// if nothing comes back within another `keep_alive`; the server closes a client it has
    /// not heard from in 1.5 x `keep_alive` [MQTT-3.1.2-20] [MQTT-3.1.2-22].
    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.open || self.config.keep_alive == 0 {
            return;
        }
        let k = Duration::from_secs(u64::from(self.config.keep_alive));
        match self.config.role {
            Role::Server => {
                if now >= self.last_received + k + k / 2 {
                    self.fail(ReasonCode::KeepAliveTimeout);
                }
            }
            Role::Client => match self.ping_sent_at {
                Some(sent) if now >= sent + k => self.fail(ReasonCode::KeepAliveTimeout),
                Some(_) => {}
                None if now >= self.last_sent + k => {
                    self.transmit.push_back(Packet::PingReq);
                    self.ping_sent_at = Some(now);
                }
                None => {}
            },
        }
    }
}
