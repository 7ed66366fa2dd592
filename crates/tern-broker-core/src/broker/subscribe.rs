//! SUBSCRIBE and UNSUBSCRIBE: granted QoS, retained messages on subscribe, the acks.

use super::*;

impl Broker {
    pub(super) fn subscribe(&mut self, client_id: &Str, s: Subscribe, now: Instant) {
        if !self.sessions.contains_key(client_id) {
            return;
        }
        let mut reasons = Vec::with_capacity(s.subscriptions.len());
        let mut retained_for = vec![];
        if s.subscriptions
            .iter()
            .any(|sub| sub.filter.share_group().is_some() && sub.options.no_local)
        {
            if let Answer::Disconnect(code) = Refusal::NoLocalOnShared.answer(true, false) {
                self.kick(client_id, code, now);
            }
            return;
        }
        for sub in &s.subscriptions {
            if let Some(refused) = self.refuse_subscription(client_id, &sub.filter) {
                reasons.push(refused.reason_code());
                continue;
            }
            // Granted at most the server's Maximum QoS [MQTT-3.2.2-9].
            let mut options = sub.options;
            options.qos = options.qos.min(self.settings.maximum_qos);
            let new = self.add_subscription(
                client_id,
                &sub.filter,
                options,
                s.properties.subscription_identifier,
            );
            let Some(session) = self.sessions.get_mut(client_id) else {
                return;
            };
            session.subscriptions.insert(
                sub.filter.clone(),
                (options, s.properties.subscription_identifier),
            );
            reasons.push(ReasonCode::granted(options.qos));
            self.start_replay(
                client_id,
                &sub.filter,
                options,
                s.properties.subscription_identifier,
                &s.properties,
                now,
            );
            let send = match sub.options.retain_handling {
                // Retained messages are not sent for shared subscriptions (§4.8.2).
                _ if sub.filter.share_group().is_some() => false,
                RetainHandling::SendAtSubscribe => true,
                RetainHandling::SendIfNew => new,
                RetainHandling::DoNotSend => false,
            };
            if send {
                retained_for.push((sub.filter.clone(), options.qos));
            }
        }
        let ack = SubAck {
            packet_id: s.packet_id,
            reasons,
            properties: Default::default(),
        };
        self.put_session(client_id);
        self.send_control(client_id, Packet::SubAck(ack));
        // Retained messages for the new subscriptions, RETAIN set [MQTT-3.3.1-9].
        for (filter, granted) in retained_for {
            // Expired retained messages are deleted, not sent [MQTT-3.3.2-5].
            let expired: Vec<TopicName> = self
                .retained
                .values()
                .filter(|m| m.is_expired(now))
                .map(|m| m.topic.clone())
                .collect();
            for topic in expired {
                self.retained.remove(&topic);
                self.counters.drop_n(DropReason::Expired, 1);
                self.batch.push(Op::DeleteRetained { topic });
            }
            let matching: Vec<Message> = self
                .retained
                .values()
                .filter(|m| filter.matches(&m.topic))
                .cloned()
                .collect();
            for mut m in matching {
                let published = m.qos;
                m.qos = effective_qos(m.qos, granted, QoS::ExactlyOnce);
                m.retain = true;
                self.deliver(client_id, m, published, None, now);
            }
        }
        self.drain(client_id, now);
    }

    /// Why a subscription is refused, if it is: its filter beyond the topic limits (0x8F),
    /// the session at its subscription limit (0x97), or the ACL (0x87); it goes in the
    /// SUBACK ([`Refusal::answer`]), where 3.x clients see 0x80 for any of them.
    fn refuse_subscription(&mut self, client_id: &Str, filter: &TopicFilter) -> Option<Refusal> {
        let session = self.sessions.get(client_id)?;
        let refusal = if !self.topic_within_limits(filter.filter()) {
            Refusal::FilterBeyondLimits
        } else if !session.subscriptions.contains_key(filter)
            && session.subscriptions.len() >= self.settings.max_subscriptions
        {
            Refusal::SubscriptionLimit
        } else if self.acl.as_ref().is_some_and(|acl| {
            !acl.allows_subscribe(client_id, session.username.as_deref(), filter)
        }) {
            self.counters.subscriptions_denied += 1;
            Refusal::SubscribeNotAuthorized
        } else {
            return None;
        };
        tracing::info!(client_id = %client_id, filter = %filter.as_str(), %refusal, "subscription refused");
        Some(refusal)
    }

    pub(super) fn unsubscribe(&mut self, client_id: &Str, u: Unsubscribe) {
        let mut reasons = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            let existed = self.remove_subscription(client_id, f);
            if let Some(s) = self.sessions.get_mut(client_id) {
                s.subscriptions.remove(f);
            }
            reasons.push(if existed {
                ReasonCode::Success
            } else {
                ReasonCode::NoSubscriptionExisted
            });
        }
        self.put_session(client_id);
        let ack = UnsubAck {
            packet_id: u.packet_id,
            reasons,
            properties: Default::default(),
        };
        self.send_control(client_id, Packet::UnsubAck(ack));
    }

    pub(super) fn send_control(&mut self, client_id: &Str, packet: Packet) {
        if let Some(Session {
            conn: Link::Online((conn, _)),
            ..
        }) = self.sessions.get(client_id).map(|s| &**s)
        {
            self.outputs.push_back(Output::Send(*conn, packet));
        }
    }
}
