//! Sending: the window, the queue, packet ids, topic aliases, sizes, and ending the
//! connection on a protocol error.

use super::*;

impl Connection {
    // ---- internals -------------------------------------------------------------------

    pub(super) fn fail(&mut self, reason: ReasonCode) {
        if !self.open {
            return;
        }
        if self.config.protocol.is_v5() {
            self.transmit
                .push_back(Packet::Disconnect(Disconnect::new(reason)));
        }
        self.open = false;
        self.events.push_back(Event::Closed {
            reason,
            session_expiry: None,
        });
    }

    /// How many outbound QoS 1/2 flows may hold an id at once.
    pub(super) fn window(&self) -> usize {
        usize::from(self.config.peer_receive_maximum.max(1))
    }

    /// Moves queued messages into flight while the window has room (QoS 0 ones go out
    /// without taking a place in it).
    pub(super) fn pump(&mut self, now: Instant) {
        let window = self.window();
        while self.open && self.session.inflight_len() < window {
            let Some(entry) = self.session.pop_queue() else {
                break;
            };
            if let Err(entry) = self.launch(entry, true, now) {
                self.session.unpop_queue(entry);
                break;
            }
        }
    }

    /// Sends a message whose turn has come, with room in the window: dropped if expired
    /// or too large for the peer, QoS 0 out with no id, QoS 1/2 into flight with a fresh
    /// id. Gives the message back if no id is free.
    pub(super) fn launch(
        &mut self,
        entry: Entry,
        from_queue: bool,
        now: Instant,
    ) -> Result<(), Entry> {
        let message = &entry.message;
        if message.is_expired(now) {
            self.events.push_back(Event::Dropped {
                message_id: entry.id,
                message: entry.message,
                reason: DropReason::Expired,
            });
            return Ok(());
        }
        if message.qos == QoS::AtMostOnce {
            // Queued while the session was offline (a broker may keep QoS 0 then): sent
            // in its place in the order, with no packet id and nothing to wait for.
            let publish = message.to_publish(QosPid::AtMostOnce, false, now);
            if self.send_publish(publish).is_err() {
                self.events.push_back(Event::Dropped {
                    message_id: entry.id,
                    message: entry.message,
                    reason: DropReason::TooLarge,
                });
            }
            return Ok(());
        }
        let previous = self.session.last_id();
        let requests = &self.requests;
        let Ok(id) = self
            .session
            .allocate_id_skipping(|id| requests.contains_key(&id), requests.len())
        else {
            return Err(entry);
        };
        let publish = message.to_publish(QosPid::new(message.qos, id), false, now);
        if self.send_publish(publish).is_ok() {
            if from_queue {
                self.session.launch_front(id, entry);
            } else {
                self.session.insert_inflight(id, entry);
            }
        } else {
            // Too large for this peer: discard it and behave as if it was sent
            // [MQTT-3.1.2-25]; the id was never used.
            self.session.unallocate(previous);
            self.events.push_back(Event::Dropped {
                message_id: entry.id,
                message: entry.message,
                reason: DropReason::TooLarge,
            });
        }
        Ok(())
    }

    /// Resends an inflight PUBLISH (session resume). It fitted when it was first sent and
    /// the peer's limit is fixed for the connection, so the size check cannot fail here.
    pub(super) fn send_inflight_publish(&mut self, id: PacketId, dup: bool, now: Instant) {
        let Some(f) = self.session.inflight_ref(id) else {
            return;
        };
        let publish = f
            .message
            .to_publish(QosPid::new(f.message.qos, id), dup, now);
        let _ = self.send_publish(publish);
    }

    /// Applies a topic alias if the peer takes them (falling back to the plain topic if the
    /// alias would push the packet over the peer's limit), checks the size, queues it.
    pub(super) fn send_publish(&mut self, publish: Publish) -> Result<(), TooLarge> {
        let choice = self.outbound_aliases.choose(&publish.topic);
        let aliased = match choice {
            Choice::Plain => None,
            Choice::Use(alias) | Choice::Bind(alias) => {
                let mut p = publish.clone();
                p.properties.topic_alias = Some(alias);
                if matches!(choice, Choice::Use(_)) {
                    p.topic = TopicName::empty();
                }
                Some(Packet::Publish(p))
            }
        };
        if let Some(packet) = aliased
            && self.fits(&packet)
        {
            self.outbound_aliases.commit(&publish.topic, choice);
            self.transmit.push_back(packet);
            return Ok(());
        }
        let packet = Packet::Publish(publish);
        if !self.fits(&packet) {
            return Err(TooLarge);
        }
        self.transmit.push_back(packet);
        Ok(())
    }

    pub(super) fn fits(&self, packet: &Packet) -> bool {
        encoded_len(packet, self.config.protocol)
            .is_ok_and(|len| len <= self.config.peer_maximum_packet_size as usize)
    }
}
