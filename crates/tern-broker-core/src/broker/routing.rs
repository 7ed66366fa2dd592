//! Messages in and out: the checks a client's message passes, routing through the trie
//! and shared groups, delivery to online sessions and offline queues (with their limits),
//! wills.

use super::settings::Limits;
use super::*;
use crate::Readiness;

impl Broker {
    /// Delivers a message to every matching subscriber at the effective QoS, and keeps it
    /// if retained (an empty retained payload clears the topic).
    pub(super) fn route(
        &mut self,
        message: Message,
        publisher: Option<&Str>,
        now: Instant,
    ) -> usize {
        // $SYS messages are the broker's own, made again after a restart: never stored.
        let durable = !is_sys(&message.topic);
        let mut message = message;
        if durable && !self.histories_empty() {
            self.keep_history(&mut message, now);
        }
        // In a cluster, a message that crosses nodes (its topic has a NATS subject) may
        // have subscribers on other nodes: never "no matching subscribers" here.
        let crosses = self.settings.cluster
            && durable
            && !self.from_remote
            && tern_codec::fits_nats_subject(message.topic.as_str());
        // Its copies for the sessions that moved here come back through the stream.
        let streamed = crosses && message.qos != QoS::AtMostOnce && self.fed_here;
        if self.settings.cluster && durable && !self.from_remote {
            let number = if message.qos == QoS::AtMostOnce {
                0
            } else {
                self.forwarded_durable = true;
                self.cluster_forwarded += 1;
                self.cluster_forwarded
            };
            self.forwards.push(Forward {
                message: message.clone(),
                origin: self.origin.as_ref().map(|(c, p)| (c.to_string(), *p)),
                number,
            });
        }
        // A cluster keeps retained messages in one place: a node keeps what the cluster's
        // retained stream says (`handle_retained`), not what arrives with a message.
        if message.retain && !self.from_remote {
            if message.payload.is_empty() {
                if self.retained.remove(&message.topic).is_some() && durable {
                    self.batch.push(Op::DeleteRetained {
                        topic: message.topic.clone(),
                    });
                }
            } else {
                self.retained.insert(message.topic.clone(), message.clone());
                if durable {
                    self.batch.push(Op::PutRetained {
                        message: message.clone(),
                    });
                }
            }
        }
        // A message from the cluster reaches this node's plain subscribers unless it is
        // this node's own, back for its shared groups.
        let deliveries = if self.from_remote && !self.remote_plain {
            HashMap::default()
        } else {
            self.trie.route(&message.topic, publisher)
        };
        let mut matched = deliveries.len();
        for (client_id, delivery) in deliveries {
            if (self.only.is_some() || self.source.is_some())
                && (self.only.as_ref().is_some_and(|only| *only != client_id)
                    || !self.admits(&client_id))
            {
                matched -= 1;
                continue;
            }
            if streamed
                && self
                    .sessions
                    .get(&client_id)
                    .is_some_and(|s| s.fed.is_some())
            {
                continue;
            }
            let mut copy = message.clone();
            copy.qos = effective_qos(message.qos, delivery.qos, QoS::ExactlyOnce);
            // Forwarded normally, the RETAIN flag is cleared unless asked to keep it.
            copy.retain = message.retain && delivery.retain_as_published;
            if !delivery.subscription_ids.is_empty() {
                copy.properties.subscription_identifiers = delivery.subscription_ids;
            }
            let copy = if !self.replaying.is_empty() && self.replaying.contains(&client_id) {
                match self.hold_for_replay(&client_id, copy, message.qos) {
                    Some(copy) => copy,
                    None => continue,
                }
            } else {
                copy
            };
            self.deliver(&client_id, copy, message.qos, None, now);
        }
        // In a cluster the link picks the node of each shared group that gets a message
        // (docs/cluster.md): a message that crosses nodes reaches this node's groups only
        // when it comes back from the cluster for them.
        let keys = if !self.settings.cluster {
            self.shared.matching(&message.topic)
        } else if self.from_remote {
            std::mem::take(&mut self.remote_shared)
                .into_iter()
                .map(Str::from)
                .collect()
        } else if !durable || !tern_codec::fits_nats_subject(message.topic.as_str()) {
            self.shared.matching(&message.topic)
        } else {
            Vec::new()
        };
        for key in keys {
            if self.deliver_shared(&key, message.clone(), publisher, None, now) {
                matched += 1;
            } else if self.from_remote
                && message.qos != QoS::AtMostOnce
                && self.source.as_ref().is_some_and(|s| !s.handed)
            {
                // Cluster: the cluster gave it to this node for a group with no member
                // here any more (its last one left, or moved, before the other nodes
                // saw): handed back for the group's members elsewhere, once.
                self.handed_back.push((message.clone(), key.to_string()));
            }
        }
        if crosses { matched.max(1) } else { matched }
    }

    /// Gives a message to one member of the shared subscription `key`. Returns false if
    /// the group no longer exists.
    pub(super) fn deliver_shared(
        &mut self,
        key: &Str,
        mut message: Message,
        publisher: Option<&Str>,
        exclude: Option<&Str>,
        now: Instant,
    ) -> bool {
        let sessions = &self.sessions;
        let size = message.payload.len();
        let limits = self.settings.limits(&message.topic);
        let readiness = |c: &Str| readiness(sessions.get(c).map(|s| &**s), &limits, size);
        let Some((client, member)) =
            self.shared
                .choose(key, &message.topic.clone(), publisher, exclude, readiness)
        else {
            return false;
        };
        if self.sessions.get(&client).is_some_and(|s| s.given) {
            // Cluster: the only members here are sessions given to other nodes: their
            // copies here go once the client is there, and what the exported session did
            // not have would go with them. Held, and handed back to the cluster for the
            // group when the copy goes (or given to the session if it stays here).
            if message.qos != QoS::AtMostOnce {
                let held = self.held_for_given.entry(client).or_default();
                if held.len() < limits.max_messages {
                    held.push((key.clone(), message));
                } else {
                    // A copy given long ago and neither gone nor resumed (its new node
                    // died before claiming it): no more held in memory, handed back now.
                    self.handed_back.push((message, key.to_string()));
                }
            }
            return true;
        }
        let published = message.qos;
        message.qos = effective_qos(message.qos, member.options.qos, QoS::ExactlyOnce);
        message.retain = message.retain && member.options.retain_as_published;
        if !message.properties.subscription_identifiers.is_empty() {
            message.properties.subscription_identifiers = Vec::new();
        }
        if let Some(id) = member.id {
            message.properties.subscription_identifiers = vec![id];
        }
        self.deliver(&client, message, published, Some(key), now);
        true
    }

    /// Adds a subscription to the trie or, for `$share/...`, to its group.
    pub(super) fn add_subscription(
        &mut self,
        client_id: &Str,
        filter: &TopicFilter,
        options: SubscriptionOptions,
        id: Option<SubscriptionId>,
    ) -> bool {
        // A new member or subscriber may take what is held.
        self.shrank = true;
        let new = if filter.share_group().is_some() {
            self.shared
                .subscribe(filter, client_id.clone(), Member { options, id })
        } else {
            self.trie.subscribe(filter, client_id.clone(), options, id)
        };
        if new && self.settings.cluster {
            self.interest.push(Interest::of(filter, true));
        }
        new
    }

    pub(super) fn remove_subscription(&mut self, client_id: &Str, filter: &TopicFilter) -> bool {
        // A full subscriber gone from a topic may let what is held through.
        self.shrank = true;
        let existed = if filter.share_group().is_some() {
            self.shared.unsubscribe(filter, client_id)
        } else {
            self.trie.unsubscribe(filter, client_id)
        };
        if existed && self.settings.cluster {
            self.interest.push(Interest::of(filter, false));
        }
        existed
    }

    /// Checks a client's message against what the broker allows, routes it and releases
    /// its acknowledgement. Returns false if the connection was closed for it.
    pub(super) fn accept(
        &mut self,
        client_id: &Str,
        mut message: Message,
        ack: Option<tern_codec::PacketId>,
        now: Instant,
    ) -> bool {
        let Some(session) = self.sessions.get(client_id) else {
            return false;
        };
        let problem_info = session.problem_info;
        let v5 = session
            .conn
            .as_ref()
            .is_some_and(|(_, c)| c.config().protocol.is_v5());
        let policy = self.settings.policy_index(&message.topic);
        // The QoS the client published at, for the checks; the message travels at most at
        // its policy's maximum from here on (the client's acknowledgement is its own).
        let published = message.qos;
        if let Some(p) = policy {
            message.qos = message.qos.min(self.settings.topics[p].max_qos);
        }
        let key = self.idempotency_key(client_id, &message);
        // A repeat passes the checks of what it repeats (ACL, QoS) but not the queue
        // limits: the broker has it already, so nothing would be queued.
        let repeat = key
            .as_ref()
            .is_some_and(|(identity, key)| self.keys.seen(identity, key, now));
        let refusal = if published > self.settings.maximum_qos {
            // Above what CONNACK advertised: a protocol error.
            Some(Refusal::QosNotSupported)
        } else if message.retain && !self.settings.retain_available {
            Some(Refusal::RetainNotSupported)
        } else if !self.within_publish_rate(client_id, now) {
            tracing::warn!(client_id = %client_id, limit = ?self.settings.max_publish_rate, "publish rate exceeded: disconnected");
            Some(Refusal::RateTooHigh)
        } else if !self.topic_within_limits(message.topic.as_str()) {
            tracing::warn!(client_id = %client_id, length = message.topic.as_str().len(), "topic beyond the limits: publish refused");
            Some(Refusal::TopicBeyondLimits)
        } else if is_sys(&message.topic)
            || !self.permits(client_id, crate::acl::Permission::Write, &message.topic)
        {
            // `$SYS` topics are the broker's: no client may publish there.
            tracing::info!(client_id = %client_id, topic = %message.topic.as_str(), "publish not authorized: dropped");
            Some(Refusal::PublishNotAuthorized)
        } else if message.properties.payload_format_indicator
            == Some(tern_codec::PayloadFormat::Utf8)
            && std::str::from_utf8(&message.payload).is_err()
        {
            Some(Refusal::PayloadFormatInvalid)
        } else if let Some(p) = policy
            && published < self.settings.topics[p].min_qos
        {
            self.count_policy(p, |c| c.refused += 1);
            tracing::info!(client_id = %client_id, topic = %message.topic.as_str(), qos = published as u8, policy = %self.settings.topics[p].filter.as_str(), "publish below the topic policy's minimum QoS: refused");
            Some(Refusal::QosBelowMinimum)
        } else if repeat {
            None
        } else if message.qos != QoS::AtMostOnce
            && self.budget_spent(message.payload.len())
            && let Some(at) = self.queue_for(&message, client_id, now, false)
        {
            tracing::warn!(publisher = %client_id, queued_for = %at, topic = %message.topic.as_str(), budget = self.settings.max_queued_total, "the budget for queued messages is spent: publish refused (quota exceeded)");
            Some(Refusal::StorageFull)
        } else if self.settings.limits(&message.topic).policy == QueuePolicy::Reject
            && message.qos != QoS::AtMostOnce
            && let Some(full) = self.queue_for(&message, client_id, now, true)
        {
            tracing::warn!(publisher = %client_id, subscriber = %full, topic = %message.topic.as_str(), "a subscriber's queue is full: publish refused (quota exceeded)");
            Some(Refusal::QueueFull)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            return self.refuse_publish(client_id, ack, v5, problem_info, refusal, now);
        }
        if repeat {
            self.repeat(client_id, &message, ack, now);
            return true;
        }
        if let Some(p) = policy {
            self.apply_policy(p, &mut message, published, now);
        }
        if self.settings.limits(&message.topic).policy == QueuePolicy::Block
            && message.qos != QoS::AtMostOnce
        {
            // Behind its client's held publishes (order), or held itself if it does not fit.
            let behind = self
                .sessions
                .get(client_id)
                .is_some_and(|s| !s.parked.is_empty());
            if behind || self.queue_for(&message, client_id, now, true).is_some() {
                self.hold_publish(client_id, message, ack, now);
                return true;
            }
        }
        self.route_and_release(client_id, message, ack, v5, problem_info, now);
        true
    }

    /// A publish whose idempotency key the broker has: acknowledged as a success (its
    /// receipt, if asked, says `duplicate`), not routed again.
    fn repeat(
        &mut self,
        client_id: &Str,
        message: &Message,
        ack: Option<tern_codec::PacketId>,
        now: Instant,
    ) {
        self.counters.idempotent_repeats += 1;
        tracing::debug!(client_id = %client_id, topic = %message.topic.as_str(), "idempotency key seen before: acknowledged, not routed again");
        if let Some(asked) = self.begin_tally(message) {
            if let Some(t) = &mut self.tally {
                t.settle = None;
            }
            self.end_tally(client_id, message, (false, asked.1), true, now);
        }
        if let Some(id) = ack {
            self.release(client_id, id, ReasonCode::Success, "", false);
        }
    }

    /// Applies topic policy `p` to an accepted message (`published` at that QoS, already
    /// taken down to the policy's maximum): its expiry default and ceiling; counts.
    fn apply_policy(&mut self, p: usize, message: &mut Message, published: QoS, now: Instant) {
        let policy = &self.settings.topics[p];
        let downgraded = message.qos < published;
        let mut expiry = false;
        if message.expires_at.is_none()
            && let Some(d) = policy.expiry_default
        {
            message.expires_at = Some(now + d);
            expiry = true;
        }
        if let Some(max) = policy.expiry_max {
            let limit = now + max;
            if message.expires_at.is_none_or(|t| t > limit) {
                message.expires_at = Some(limit);
                expiry = true;
            }
        }
        self.count_policy(p, |c| {
            c.publishes += 1;
            c.downgraded += u64::from(downgraded);
            c.expiry_set += u64::from(expiry);
        });
    }

    /// Counts for topic policy `p`.
    fn count_policy(&mut self, p: usize, f: impl FnOnce(&mut crate::PolicyCounters)) {
        let filter = self.settings.topics[p].filter.as_str();
        let counters = &mut self.counters.policies;
        match counters.iter_mut().find(|(f, _)| f == filter) {
            Some((_, c)) => f(c),
            None => {
                let mut c = crate::PolicyCounters::default();
                f(&mut c);
                counters.push((filter.to_string(), c));
            }
        }
    }

    /// Holds a publish under `queue_policy = "block"`.
    fn hold_publish(
        &mut self,
        client_id: &Str,
        message: Message,
        ack: Option<tern_codec::PacketId>,
        now: Instant,
    ) {
        let until = now + self.settings.block_timeout;
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        if s.parked.is_empty() {
            self.blocked.push(client_id.clone());
            tracing::info!(publisher = %client_id, topic = %message.topic.as_str(), "a subscriber's queue is full: publishes held (queue_policy = block)");
        }
        s.parked.push_back(Parked {
            message,
            ack,
            until,
        });
        self.schedule(client_id);
    }

    /// Routes held publishes that fit now, in each publisher's order (all publishers, or
    /// only `only`); one held longer than `block_timeout` that still does not fit is
    /// refused as under `reject`.
    pub(super) fn unblock(&mut self, only: Option<&Str>, now: Instant) {
        let publishers: Vec<Str> = match only {
            Some(c) => vec![c.clone()],
            None => self.blocked.clone(),
        };
        for client_id in publishers {
            while let Some(s) = self.sessions.get_mut(&client_id) {
                let problem_info = s.problem_info;
                let v5 = s
                    .conn
                    .as_ref()
                    .is_some_and(|(_, c)| c.config().protocol.is_v5());
                let Some(head) = s.parked.pop_front() else {
                    break;
                };
                if self
                    .queue_for(&head.message, &client_id, now, true)
                    .is_none()
                {
                    self.route_and_release(
                        &client_id,
                        head.message,
                        head.ack,
                        v5,
                        problem_info,
                        now,
                    );
                } else if head.until <= now {
                    tracing::warn!(publisher = %client_id, topic = %head.message.topic.as_str(), "a held publish still does not fit after block_timeout: refused (quota exceeded)");
                    if !self.refuse_publish(
                        &client_id,
                        head.ack,
                        v5,
                        problem_info,
                        Refusal::QueueFull,
                        now,
                    ) {
                        break;
                    }
                } else if let Some(s) = self.sessions.get_mut(&client_id) {
                    s.parked.push_front(head);
                    break;
                }
            }
            self.list_for_drain(&client_id);
            if self
                .sessions
                .get(&client_id)
                .is_none_or(|s| s.parked.is_empty())
            {
                self.blocked.retain(|c| *c != client_id);
            }
            self.schedule(&client_id);
        }
    }

    /// Lists a session for draining when the input ends.
    pub(super) fn list_for_drain(&mut self, client_id: &Str) {
        if let Some(s) = self.sessions.get_mut(client_id)
            && !s.drain_due
        {
            s.drain_due = true;
            self.drain_due.push(client_id.clone());
        }
    }

    /// Routes an accepted publish and releases its acknowledgement.
    fn route_and_release(
        &mut self,
        client_id: &Str,
        message: Message,
        ack: Option<tern_codec::PacketId>,
        v5: bool,
        problem_info: bool,
        now: Instant,
    ) {
        if let Some(key) = self.idempotency_key(client_id, &message)
            && !self.remember_key(key, now)
        {
            // A repeat held under `block` behind the message it repeats.
            self.repeat(client_id, &message, ack, now);
            return;
        }
        let receipt = self.begin_tally(&message);
        let kept = receipt.as_ref().map(|_| message.clone());
        self.origin = ack.map(|p| (client_id.clone(), p.get()));
        let matched = self.route(message, Some(client_id), now);
        self.origin = None;
        if matched == 0 {
            self.counters.drop_n(DropReason::NoSubscribers, 1);
        }
        if let (Some(asked), Some(message)) = (receipt, kept) {
            self.end_tally(client_id, &message, asked, false, now);
        }
        if let Some(id) = ack {
            let reason = if matched == 0 && v5 {
                ReasonCode::NoMatchingSubscribers
            } else {
                ReasonCode::Success
            };
            self.release(client_id, id, reason, "", problem_info);
        }
    }

    /// Answers a refused PUBLISH as [`Refusal::answer`] says (in its acknowledgement, not
    /// at all, or with a DISCONNECT), and counts the drop. False if the connection was
    /// closed for it.
    fn refuse_publish(
        &mut self,
        client_id: &Str,
        ack: Option<tern_codec::PacketId>,
        v5: bool,
        problem_info: bool,
        refusal: Refusal,
        now: Instant,
    ) -> bool {
        let dropped = match refusal {
            Refusal::RateTooHigh => DropReason::RateLimited,
            Refusal::PublishNotAuthorized => DropReason::NotAuthorized,
            Refusal::QueueFull | Refusal::StorageFull => DropReason::Quota,
            _ => DropReason::Invalid,
        };
        self.counters.drop_n(dropped, 1);
        match refusal.answer(v5, ack.is_some()) {
            Answer::Ack(code) => {
                if let Some(id) = ack {
                    self.release(client_id, id, code, refusal.description(), problem_info);
                }
                true
            }
            Answer::Silence => true,
            // (A PUBLISH refusal is never a CONNACK or SUBACK code; closing is the safe
            // reading of one.)
            Answer::Disconnect(code) | Answer::ConnAck(code) | Answer::SubAck(code) => {
                self.kick(client_id, code, now);
                false
            }
        }
    }

    /// Whether a topic name or filter is within the configured length and depth.
    pub(super) fn topic_within_limits(&self, topic: &str) -> bool {
        topic.len() <= self.settings.max_topic_length
            && topic.split('/').count() <= self.settings.max_topic_levels
    }

    /// Counts one PUBLISH against the client's rate; false if it is over.
    fn within_publish_rate(&mut self, client_id: &Str, now: Instant) -> bool {
        let Some(limit) = self.settings.max_publish_rate else {
            return true;
        };
        let Some(s) = self.sessions.get_mut(client_id) else {
            return true;
        };
        if now.duration_since(s.rate.0) >= Duration::from_secs(1) {
            s.rate = (now, 0);
        }
        s.rate.1 += 1;
        s.rate.1 <= limit
    }

    /// Where `message` would be queued (`full`: where it would overflow a queue), if
    /// anywhere: a subscriber whose session is offline, or online behind a full window; or a
    /// shared group none of whose members could take it now (`full`: all of whose members'
    /// queues are full; a full member is otherwise passed over). Returns the session or the
    /// group.
    pub(super) fn queue_for(
        &mut self,
        message: &Message,
        publisher: &Str,
        now: Instant,
        full: bool,
    ) -> Option<Str> {
        let size = message.payload.len();
        let limits = self.settings.limits(&message.topic);
        // No queue can be full while all of them together are within one queue's limits:
        // the common case costs no routing.
        if full && self.queued.0 < limits.max_messages && self.queued.1 + size <= limits.max_bytes {
            return None;
        }
        for (client_id, delivery) in self.trie.route(&message.topic, Some(publisher)) {
            let qos = effective_qos(message.qos, delivery.qos, QoS::ExactlyOnce);
            if qos == QoS::AtMostOnce && !limits.queue_qos0 {
                continue;
            }
            let Some(s) = self.sessions.get_mut(&client_id) else {
                continue;
            };
            let queue: &mut dyn Queue = match &mut s.conn {
                Link::Offline(_) if !limits.queue_offline => continue,
                Link::Offline(stored) => stored,
                // Online: only a message that would wait behind the window joins the queue.
                Link::Online((_, c)) if c.would_wait() => c,
                Link::Online(_) => continue,
            };
            if !full {
                return Some(client_id);
            }
            let full = |s: &dyn Queue| queue_full(s, size, &limits);
            if full(queue) {
                let expired = queue.remove_expired(now);
                let still_full = full(queue);
                if expired > 0 {
                    s.prune_via_shared();
                    self.counters.drop_n(DropReason::Expired, expired as u64);
                    self.touch(&client_id);
                }
                if still_full {
                    return Some(client_id);
                }
            }
        }
        for key in self.shared.matching(&message.topic) {
            let sessions = &self.sessions;
            let best = self.shared.best(&key, |c| {
                readiness(sessions.get(c).map(|s| &**s), &limits, size)
            });
            match best {
                Some(Readiness::Full) => return Some(key),
                Some(Readiness::Offline | Readiness::Busy) if !full => return Some(key),
                _ => {}
            }
        }
        None
    }

    /// Whether one more message of `size` payload bytes would go past the broker's budget
    /// for queued messages ([`Settings::max_queued_total`]).
    pub(super) fn budget_spent(&self, size: usize) -> bool {
        let (count, bytes) = self.queued;
        bytes
            .saturating_add(size)
            .saturating_add((count + 1).saturating_mul(QUEUED_MESSAGE_OVERHEAD))
            > self.settings.max_queued_total
    }

    /// Sends the PUBACK/PUBREC that waited on `id`, with a Reason String if the client
    /// wants them.
    pub(super) fn release(
        &mut self,
        client_id: &Str,
        id: tern_codec::PacketId,
        reason: ReasonCode,
        text: &str,
        problem_info: bool,
    ) {
        let Some(Session {
            conn: Link::Online((_, c)),
            ..
        }) = self.sessions.get_mut(client_id).map(|s| &mut **s)
        else {
            return;
        };
        let mut properties = tern_codec::properties::AckProperties::default();
        if problem_info && !text.is_empty() {
            properties.reason_string = Some(Str::from(text));
        }
        c.ack_with_properties(id, reason, properties.into());
        self.touch(client_id);
    }

    /// Hands a copy (at its effective QoS; the publisher sent it at `published`; through
    /// the shared subscription `via`, if so) to a session: sent if online, queued if
    /// offline and persistent.
    pub(super) fn deliver(
        &mut self,
        client_id: &Str,
        mut message: Message,
        published: QoS,
        via: Option<&Str>,
        now: Instant,
    ) {
        if !self.permits(client_id, crate::acl::Permission::Receive, &message.topic) {
            self.counters.drop_n(DropReason::NotAuthorized, 1);
            self.tally_drop(DropReason::NotAuthorized);
            tracing::debug!(client_id = %client_id, topic = %message.topic.as_str(), "not authorized to receive: not delivered");
            return;
        }
        // A copy no PUBLISH can carry (a message near the largest packet, grown by its
        // Subscription Identifiers) can be neither sent nor stored: dropped as too large.
        // Checked only for large payloads, so the common path pays nothing.
        if message.payload.len() > tern_codec::MAX_PACKET_SIZE as usize / 2
            && !message.fits_a_packet(now)
        {
            self.counters.drop_n(DropReason::TooLarge, 1);
            self.tally_drop(DropReason::TooLarge);
            tracing::warn!(client_id = %client_id, topic = %message.topic.as_str(), "message too large for any PUBLISH once its subscription identifiers are added: dropped for this subscriber");
            return;
        }
        self.touch(client_id);
        let limits = self.settings.limits(&message.topic);
        let Some(session) = self.sessions.get_mut(client_id) else {
            return;
        };
        let queues = limits.queue_offline && (message.qos != QoS::AtMostOnce || limits.queue_qos0);
        let queue = match &mut session.conn {
            // Online: a QoS 1/2 message that would wait behind the peer's window joins the
            // queue, bounded by `max_queued_bytes` only (a subscriber that is merely slower
            // than its publishers for a while loses nothing; one that stops acknowledging
            // cannot take all memory). QoS 0 goes out at once.
            Link::Online((_, c)) if message.qos != QoS::AtMostOnce && c.would_wait() => {
                Some(c as &mut dyn Queue)
            }
            Link::Online(_) => None,
            // Offline persistent session: QoS 1/2 (and QoS 0 if configured) wait in order,
            // within the limits; otherwise QoS 0 is dropped.
            Link::Offline(stored) if queues => {
                if let Some(age) = self.settings.max_queued_age {
                    let limit = now + age;
                    message.expires_at = Some(message.expires_at.map_or(limit, |t| t.min(limit)));
                }
                Some(stored as &mut dyn Queue)
            }
            Link::Offline(_) => {
                self.counters.drop_n(DropReason::Offline, 1);
                if let Some(t) = &mut self.tally {
                    t.dropped[DropReason::Offline as usize] += 1;
                }
                return;
            }
        };
        let queued = queue.is_some();
        if let Some(queue) = queue {
            let (room, expired, dropped) = make_room(queue, message.payload.len(), &limits, now);
            self.counters.drop_n(DropReason::Expired, expired);
            if expired + dropped > 0 {
                session.prune_via_shared();
            }
            if dropped > 0 {
                self.counters.drop_n(DropReason::QueueFull, dropped);
                let quiet = session
                    .queue_full_logged
                    .is_some_and(|at| now.saturating_duration_since(at) < QUEUE_FULL_LOG_EVERY);
                if !quiet {
                    session.queue_full_logged = Some(now);
                    let online = matches!(session.conn, Link::Online(_));
                    tracing::warn!(client_id = %client_id, dropped, online, policy = ?limits.policy, "queue full: messages dropped (counted in tern_dropped_total{{reason=\"queue_full\"}}; logged at most every 10 s per session)");
                }
            }
            if !room {
                if let Some(t) = &mut self.tally {
                    t.dropped[DropReason::QueueFull as usize] += 1;
                }
                return;
            }
        }
        if let Some(t) = &mut self.tally {
            if queued {
                t.queued += 1;
            } else {
                t.sent += 1;
            }
        }
        self.counters.delivered(published, message.qos);
        // A QoS 0 copy to an online session goes out now: nothing to redeliver.
        let held = message.qos != QoS::AtMostOnce;
        let (id, held) = match &mut session.conn {
            Link::Online((_, c)) => {
                let id = c.publish(message, now);
                // Drained once when the input ends: a fan-out does not drain each
                // subscriber inside the publisher's drain. (Listed here, where the
                // session is at hand: no second lookup per delivery.)
                if !session.drain_due {
                    session.drain_due = true;
                    self.drain_due.push(client_id.clone());
                }
                (id, held)
            }
            Link::Offline(stored) => (stored.enqueue(message, now), true),
        };
        if let Some(key) = via
            && held
        {
            session.via_shared.insert(id, key.clone());
        }
        if held && (self.tally.is_some() || self.carry.is_some()) {
            self.register_copy(client_id, id);
        }
    }

    /// Publishes `owner`'s will, if the ACL lets the owner publish to its topic now.
    pub(super) fn publish_will(
        &mut self,
        owner: &Str,
        username: Option<&str>,
        will: LastWill,
        now: Instant,
    ) {
        if is_sys(&will.topic)
            || self.acl.as_ref().is_some_and(|acl| {
                !acl.allows(owner, username, crate::acl::Permission::Write, &will.topic)
            })
        {
            self.counters.drop_n(DropReason::NotAuthorized, 1);
            tracing::info!(client_id = %owner, topic = %will.topic.as_str(), "will not authorized: not published");
            return;
        }
        self.route(will_message(will, now), None, now);
    }
}

/// The message a will becomes, with every will property a PUBLISH carries (payload
/// format, expiry counted from `now`, content type, response topic, correlation data,
/// user properties) [MQTT-3.1.3-9].
pub(super) fn will_message(will: LastWill, now: Instant) -> Message {
    let mut m = Message::new(will.topic, will.payload, will.qos);
    m.retain = will.retain;
    let w = &*will.properties;
    let p = tern_codec::properties::PublishProperties {
        payload_format_indicator: w.payload_format_indicator,
        message_expiry_interval: w.message_expiry_interval,
        content_type: w.content_type.clone(),
        response_topic: w.response_topic.clone(),
        correlation_data: w.correlation_data.clone(),
        user_properties: w.user_properties.clone(),
        ..Default::default()
    };
    if p != tern_codec::properties::PublishProperties::default() {
        m.properties = p.into();
    }
    if let Some(secs) = w.message_expiry_interval {
        m.expires_at = Some(now + Duration::from_secs(u64::from(secs)));
    }
    m
}

/// Whether `topic` is under `$SYS`, the broker's own topics.
pub(super) fn is_sys(topic: &TopicName) -> bool {
    let t = topic.as_str();
    t == "$SYS" || t.starts_with("$SYS/")
}

/// Whether a message of `size` payload bytes would take `queue` over `max_messages` or
/// `max_queued_bytes`.
/// A session queue the broker's limits apply to: the engine's while the client is online
/// (behind its full window), the stored state's while it is away.
trait Queue {
    fn queued_len(&self) -> usize;
    fn queued_bytes(&self) -> usize;
    fn remove_expired(&mut self, now: Instant) -> usize;
    fn drop_oldest(&mut self) -> bool;
}

impl Queue for SessionState {
    fn queued_len(&self) -> usize {
        SessionState::queued_len(self)
    }
    fn queued_bytes(&self) -> usize {
        SessionState::queued_bytes(self)
    }
    fn remove_expired(&mut self, now: Instant) -> usize {
        SessionState::remove_expired(self, now)
    }
    fn drop_oldest(&mut self) -> bool {
        SessionState::drop_oldest(self)
    }
}

impl Queue for Connection {
    fn queued_len(&self) -> usize {
        self.session().queued_len()
    }
    fn queued_bytes(&self) -> usize {
        self.session().queued_bytes()
    }
    fn remove_expired(&mut self, now: Instant) -> usize {
        self.remove_expired_queued(now)
    }
    fn drop_oldest(&mut self) -> bool {
        Connection::drop_oldest(self)
    }
}

/// How ready a shared subscription's member is to take a message of `size` payload bytes
/// now: online with room in its window, online behind a full window, offline, or (either of
/// those last two) with a full queue.
fn readiness(session: Option<&Session>, limits: &Limits, size: usize) -> Readiness {
    if session.is_some_and(|s| s.given) {
        return Readiness::Given;
    }
    match session.map(|s| &s.conn) {
        Some(Link::Online((_, c))) if c.would_wait() => {
            if queue_full(c, size, limits) {
                Readiness::Full
            } else {
                Readiness::Busy
            }
        }
        Some(Link::Online(_)) => Readiness::Ready,
        Some(Link::Offline(stored)) if queue_full(stored, size, limits) => Readiness::Full,
        _ => Readiness::Offline,
    }
}

fn queue_full(queue: &dyn Queue, size: usize, limits: &Limits) -> bool {
    queue.queued_len() + 1 > limits.max_messages || queue.queued_bytes() + size > limits.max_bytes
}

/// Makes room in a session's queue for a message of `size` payload bytes, under the queue
/// limits (`max_messages`, and `max_queued_bytes`) and policy: expired messages go first, then the oldest (drop-oldest), or the new
/// one is turned away (drop-newest, reject). Returns whether it may join, how many expired
/// messages were removed and how many live ones were dropped (the new one included).
fn make_room(
    queue: &mut dyn Queue,
    size: usize,
    limits: &Limits,
    now: Instant,
) -> (bool, u64, u64) {
    let full = |s: &dyn Queue| queue_full(s, size, limits);
    let mut expired = 0;
    if full(queue) {
        expired = queue.remove_expired(now) as u64;
    }
    let mut dropped = 0;
    let room = match limits.policy {
        QueuePolicy::DropNewest | QueuePolicy::Reject | QueuePolicy::Block => !full(queue),
        QueuePolicy::DropOldest => {
            while full(queue) && queue.drop_oldest() {
                dropped += 1;
            }
            // Still full: larger than the whole byte limit on its own.
            !full(queue)
        }
    };
    (room, expired, dropped + u64::from(!room))
}

/// Cluster: a message of this node's clients for the other nodes.
#[derive(Debug, Clone)]
pub struct Forward {
    /// The message.
    pub message: Message,
    /// The client that published it and the packet id it came with (QoS 1/2).
    pub origin: Option<(String, u16)>,
    /// For a QoS 1/2 message, its number among this node's forwards (counted across
    /// restarts, committed with the round); 0 for QoS 0.
    pub number: u64,
}

/// Cluster: a message from the cluster and who on this node gets it.
#[derive(Debug, Clone)]
pub struct Remote {
    /// The message.
    pub message: Message,
    /// Whether this node's subscribers (not shared ones) get it: false for this node's
    /// own message, back from the cluster for its shared groups only.
    pub plain: bool,
    /// The shared subscriptions (`$share/GROUP/FILTER`) the cluster gave it to this node
    /// for: one member of each gets it.
    pub shared: Vec<String>,
    /// This node's own QoS 1/2 message, put in the stream by an earlier run of the node:
    /// its number among the node's forwards ([`Forward::number`]), and the client and
    /// packet id it was published with. One numbered past what the node's store says it
    /// forwarded was in the stream when the node crashed before committing its round: its
    /// effects on this node (copies for its sessions, the inbound QoS 2 id) are redone.
    pub earlier: Option<(u64, Option<(String, u16)>)>,
    /// A message of the cluster's stream: where it comes from (the sessions that moved
    /// here take only what their last node did not give them; [`Source::own`]: for them
    /// only).
    pub source: Option<Source>,
}

impl Remote {
    /// Another node's message for this node's plain subscribers only.
    pub fn plain(message: Message) -> Remote {
        Remote {
            message,
            plain: true,
            shared: Vec::new(),
            earlier: None,
            source: None,
        }
    }
}

/// Cluster: a filter a session of this node started (`add`) or stopped holding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interest {
    /// The filter (of a shared subscription: its filter without `$share/GROUP/`).
    pub filter: String,
    /// For a shared subscription, the whole `$share/GROUP/FILTER`.
    pub share: Option<String>,
    /// Started (true) or stopped holding.
    pub add: bool,
}

impl Interest {
    fn of(filter: &tern_codec::TopicFilter, add: bool) -> Interest {
        Interest {
            filter: filter.filter().to_string(),
            share: filter.share_group().map(|_| filter.as_str().to_string()),
            add,
        }
    }
}

/// Cluster: a change to the wills of this node's connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WillChange {
    /// A client connected with a will.
    Put {
        /// The client.
        client_id: Str,
        /// Its user name.
        username: Option<Str>,
        /// The will.
        will: tern_codec::LastWill,
        /// Its session's expiry interval, in seconds (the will waits for its delay or the
        /// session's end, whichever comes first).
        session_expiry: u32,
    },
    /// The client's connection ended (its will, if due, is published by this node).
    Delete(Str),
}

impl Broker {
    /// Cluster: changes to the wills of this node's connections since the last call.
    pub fn take_will_changes(&mut self) -> Vec<WillChange> {
        std::mem::take(&mut self.will_changes)
    }

    /// Cluster: the will of `client_id`, a client of a node that is gone, which this node
    /// claimed: published as that client's (its ACL checked), like a local publish.
    pub fn handle_cluster_will(
        &mut self,
        client_id: &str,
        username: Option<&str>,
        will: tern_codec::LastWill,
        now: Instant,
    ) {
        self.publish_will(&Str::from(client_id), username, will, now);
        self.commit(now);
    }

    /// Cluster: messages from the cluster, routed to this node's sessions only (never
    /// forwarded again).
    pub fn handle_remote(&mut self, messages: Vec<Remote>, now: Instant) {
        self.from_remote = true;
        for m in messages {
            self.route_remote(m, now);
        }
        self.from_remote = false;
        self.commit(now);
    }

    pub(super) fn route_remote(&mut self, m: Remote, now: Instant) {
        let mut publisher = None;
        let mut plain = m.plain;
        let mut source = m.source;
        if let Some((number, _)) = &m.earlier {
            if *number <= self.forwarded_at_start {
                // Its round was committed here before the crash: its copies for this
                // node's subscribers were made then, but for the sessions that moved
                // here, which take this node's messages from the stream (they get it now,
                // by their rule: its source says it is this node's own, which no other
                // session takes); its shared groups get it now.
                if m.shared.is_empty() && !self.fed_here {
                    return;
                }
                plain = self.fed_here && source.is_some();
            } else {
                // Its round was lost: every session here gets it.
                plain = true;
                source = None;
            }
        }
        if let Some((number, origin)) = m.earlier.filter(|(n, _)| *n > self.forwarded_at_start) {
            publisher = origin.as_ref().map(|(c, _)| Str::from(c.as_str()));
            if let Some((client, pid)) = &origin {
                self.redo_inbound(client, *pid, m.message.qos);
            }
            tracing::info!(topic = %m.message.topic.as_str(), number, "cluster: a message this node put in the stream before a crash lost its round here: its copies on this node are made now");
        }
        if let Some(p) = source.as_ref().and_then(|s| s.publisher.as_deref()) {
            publisher = Some(Str::from(p));
        }
        self.remote_plain = plain;
        self.remote_shared = m.shared;
        self.source = source;
        self.route(m.message, publisher.as_ref(), now);
        self.source = None;
        self.remote_plain = true;
        self.remote_shared.clear();
    }

    /// The inbound QoS 2 id of a message whose round a crash lost after the stream had it:
    /// held again in its (offline) session, so the client's resend is answered with PUBREC
    /// and not stored a second time.
    fn redo_inbound(&mut self, client: &str, pid: u16, qos: QoS) {
        if qos != QoS::ExactlyOnce {
            return;
        }
        let (Some(id), Some(key)) = (
            tern_codec::PacketId::new(pid),
            self.sessions.get_key_value(client).map(|(k, _)| k.clone()),
        ) else {
            return;
        };
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        match &mut session.conn {
            Link::Offline(state) => {
                if state.inbound_qos2().all(|(held, _)| held != id) {
                    state.apply(&tern_proto::Change::Inbound(
                        id,
                        tern_proto::InboundState::Received,
                    ));
                    self.touch(&key);
                }
            }
            Link::Online(_) => {
                tracing::warn!(client_id = %client, "cluster: a QoS 2 message lost its round in a crash, and its client is back already: a resend of it may be stored twice");
            }
        }
    }

    /// Cluster: the cluster's retained messages, in its order (an empty payload clears the
    /// topic), kept as this node's retained messages and delivered to nobody.
    pub fn handle_retained(&mut self, messages: Vec<Message>, now: Instant) {
        for message in messages {
            if message.payload.is_empty() || message.is_expired(now) {
                if self.retained.remove(&message.topic).is_some() {
                    self.batch.push(Op::DeleteRetained {
                        topic: message.topic.clone(),
                    });
                }
            } else {
                self.retained.insert(message.topic.clone(), message.clone());
                self.batch.push(Op::PutRetained { message });
            }
        }
        self.commit(now);
    }

    /// Cluster: QoS 1/2 messages for shared groups that no member on this node can take
    /// (the group is gone here, or its only members are sessions given to other nodes),
    /// since the last call: for the link to put in the stream again for the group's
    /// members on other nodes.
    pub fn take_handed_back(&mut self) -> Vec<(Message, String)> {
        std::mem::take(&mut self.handed_back)
    }

    /// Cluster: the messages this node's clients published since the last call, for the
    /// other nodes (QoS 0 over core NATS, QoS 1/2 into the cluster's stream, before the
    /// acknowledgements of the round they came in go out).
    pub fn take_forwards(&mut self) -> Vec<Forward> {
        std::mem::take(&mut self.forwards)
    }

    /// Cluster: QoS 1/2 messages of the cluster's stream, from `first` to `last` (stream
    /// sequences), for this node's sessions: routed as from a publisher elsewhere, once
    /// (sequences this node has applied already are skipped), and the progress stored in
    /// the same commit as their copies ([`Broker::take_applied`]).
    pub fn handle_remote_durable(&mut self, last: u64, messages: Vec<Remote>, now: Instant) {
        if last <= self.cluster_applied {
            // Applied before (read again after a restart): reported, so the reader goes on.
            self.applied_now = Some(last);
            return;
        }
        self.from_remote = true;
        let applied = self.cluster_applied;
        for m in messages {
            // A message applied before (the reader read part of the stream again) is
            // not routed twice.
            if m.source.as_ref().is_some_and(|s| s.seq <= applied) {
                continue;
            }
            self.route_remote(m, now);
        }
        self.from_remote = false;
        self.cluster_applied = last;
        self.applied_now = Some(last);
        self.batch.push(Op::ClusterApplied(last));
        self.commit(now);
    }

    /// Cluster: the stream sequence applied in the round just handed out, for the reader
    /// of the stream to go on once that round is committed.
    pub fn take_applied(&mut self) -> Option<u64> {
        self.applied_now.take()
    }

    /// Cluster: client ids that connected to this node since the last call.
    pub fn take_claims(&mut self) -> Vec<Str> {
        std::mem::take(&mut self.claims)
    }

    /// Cluster: the client `client_id` connected to another node after its connection
    /// here: the connection here is closed as a takeover would close it (5.0: DISCONNECT
    /// 0x8E Session taken over), and the session here goes: given to that node, it lives
    /// on there; not given, the client started afresh there (a clean start, or its
    /// session could not be had), which ends this one as a clean start would.
    pub fn handle_taken_over(&mut self, client_id: &str, now: Instant) {
        let Some(key) = self
            .sessions
            .get_key_value(client_id)
            .map(|(k, _)| k.clone())
        else {
            return;
        };
        if self
            .sessions
            .get(&key)
            .is_some_and(|s| s.conn.as_ref().is_some())
        {
            tracing::info!(client_id = %key, "the client connected to another node: this connection is closed (session taken over)");
            self.kick(&key, ReasonCode::SessionTakenOver, now);
            self.commit(now);
        }
        match self.sessions.get(&key) {
            Some(s) if s.conn.as_ref().is_some() => {}
            Some(s) if s.given => {
                tracing::info!(client_id = %key, "cluster: the session moved to another node; its copy here goes");
                self.hand_back_held(&key);
                self.discard_session(&key);
                self.commit(now);
            }
            Some(_) => {
                tracing::info!(client_id = %key, "cluster: the client started afresh on another node; its session here ends");
                self.end_session(&key, now);
                self.commit(now);
            }
            None => {}
        }
    }

    /// Cluster: the last stream sequence this node applied (0: none).
    pub fn cluster_applied(&self) -> u64 {
        self.cluster_applied
    }

    /// Cluster: filters this node's sessions started (`true`) or stopped (`false`) holding
    /// since the last call, one entry per session and filter, in order (shared
    /// subscriptions by their filter).
    pub fn take_interest(&mut self) -> Vec<Interest> {
        std::mem::take(&mut self.interest)
    }
}
