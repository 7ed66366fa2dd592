//! Guarantees beyond MQTT's: idempotency keys (a repeat of a message the broker already
//! has is acknowledged and not routed again), delivery receipts (what became of a
//! message, and when every copy was settled), per-topic guarantee policies.

use super::settings::{RECEIPT_PROPERTY, RECEIPT_ROUTED, RECEIPT_SETTLED};
use super::*;

/// The idempotency keys the broker remembers: (identity, key) until a deadline, at most
/// `max_keys` per identity. Each identity's keys fill a ring of slots in the store: the
/// key a new one pushes out of the count window sat in the slot the new one takes.
#[derive(Debug, Default)]
pub(super) struct Keys {
    /// (identity, key) -> when it may be forgotten, and its insertion number.
    seen: HashMap<(Str, Str), (Instant, u64)>,
    /// Insertion order (the window is the same for all, so deadlines are in order too).
    order: VecDeque<(Instant, Str, Str, u64)>,
    /// Each identity's keys in insertion order, and the next slot of its ring.
    per: HashMap<Str, Ring>,
    next: u64,
}

#[derive(Debug, Default)]
struct Ring {
    keys: VecDeque<(Str, u64)>,
    next_slot: u64,
}

impl Keys {
    /// Whether `key` of `identity` is remembered at `now`.
    pub(super) fn seen(&self, identity: &Str, key: &Str, now: Instant) -> bool {
        // (A lookup by a borrowed pair would need a second map type; the clones are of
        // reference-counted strings.)
        self.seen
            .get(&(identity.clone(), key.clone()))
            .is_some_and(|(until, _)| *until > now)
    }

    /// Keys remembered.
    pub(super) fn len(&self) -> usize {
        self.seen.len()
    }

    /// Remembers `key` until `until` unless it is remembered already (`None`: a repeat);
    /// returns the ring slot it takes. Forgets what expired by `now` and what the count
    /// bound pushes out.
    pub(super) fn remember(
        &mut self,
        identity: &Str,
        key: &Str,
        until: Instant,
        max_keys: usize,
        now: Instant,
    ) -> Option<u32> {
        self.forget_expired(now);
        let n = self.next + 1;
        match self.seen.entry((identity.clone(), key.clone())) {
            std::collections::hash_map::Entry::Occupied(e) if e.get().0 > now => return None,
            std::collections::hash_map::Entry::Occupied(mut e) => {
                e.insert((until, n));
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert((until, n));
            }
        }
        self.next = n;
        self.order
            .push_back((until, identity.clone(), key.clone(), n));
        let max = max_keys.max(1);
        let ring = match self.per.get_mut(identity) {
            Some(r) => r,
            None => self.per.entry(identity.clone()).or_default(),
        };
        let slot = (ring.next_slot % max as u64) as u32;
        ring.next_slot += 1;
        ring.keys.push_back((key.clone(), n));
        while ring.keys.len() > max {
            let Some((old, m)) = ring.keys.pop_front() else {
                break;
            };
            if let std::collections::hash_map::Entry::Occupied(e) =
                self.seen.entry((identity.clone(), old))
                && e.get().1 == m
            {
                e.remove();
            }
        }
        Some(slot)
    }

    /// Takes a key read back from the store, in slot `slot` (keys come oldest first).
    fn restore(&mut self, identity: Str, slot: u32, key: Str, until: Instant) {
        self.next += 1;
        let n = self.next;
        self.seen
            .insert((identity.clone(), key.clone()), (until, n));
        self.order
            .push_back((until, identity.clone(), key.clone(), n));
        let ring = self.per.entry(identity).or_default();
        ring.keys.push_back((key, n));
        ring.next_slot = u64::from(slot) + 1;
    }

    /// Forgets every key whose window ended by `now` (in memory: its slot in the store is
    /// taken by a later key, or emptied at the next start).
    pub(super) fn forget_expired(&mut self, now: Instant) {
        while let Some((until, ..)) = self.order.front()
            && *until <= now
        {
            let Some((_, identity, key, n)) = self.order.pop_front() else {
                break;
            };
            if let Some(ring) = self.per.get_mut(&identity) {
                if ring.keys.front().is_some_and(|(_, m)| *m == n) {
                    ring.keys.pop_front();
                }
                if ring.keys.is_empty() {
                    // Its slots start again from 0: the store's rows are overwritten in
                    // order or emptied at the next start.
                    self.per.remove(&identity);
                }
            }
            if let std::collections::hash_map::Entry::Occupied(e) = self.seen.entry((identity, key))
                && e.get().1 == n
            {
                e.remove();
            }
        }
    }
}

/// What became of one message's copies, counted while it is routed.
#[derive(Debug, Default, Clone)]
pub(super) struct Tally {
    /// Sent to online subscribers at once.
    pub(super) sent: u32,
    /// Queued: for an offline session, or behind an online one's full window.
    pub(super) queued: u32,
    /// Not delivered, by reason.
    pub(super) dropped: [u32; DropReason::ALL.len()],
    /// The receipt that waits for the QoS 1/2 copies, if one was asked for.
    pub(super) settle: Option<u64>,
}

/// A settled receipt waiting for the copies of its message.
#[derive(Debug)]
struct Waiting {
    publisher: Str,
    to: TopicName,
    correlation: Option<bytes::Bytes>,
    topic: TopicName,
    copies: u32,
    outstanding: u32,
}

/// The receipts that wait for copies to be acknowledged.
#[derive(Debug, Default)]
pub(super) struct Receipts {
    /// Copies not yet settled, by the subscriber session holding them: message id in
    /// that session, and the receipt.
    copies: HashMap<Str, Vec<(MessageId, u64)>>,
    waiting: HashMap<u64, Waiting>,
    next: u64,
}

impl Receipts {
    /// Settled receipts still waiting for copies.
    pub(super) fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Whether any copy is awaited.
    pub(super) fn has_copies(&self) -> bool {
        !self.copies.is_empty()
    }

    /// Whether a copy in `client_id`'s session is awaited.
    pub(super) fn awaits(&self, client_id: &Str) -> bool {
        self.copies.contains_key(client_id)
    }
}

/// The receipt kind a message asks for, if it asks and has a Response Topic.
fn receipt_asked(message: &Message) -> Option<(bool, TopicName)> {
    let p = &*message.properties;
    let to = p.response_topic.clone()?;
    let (_, v) = p
        .user_properties
        .iter()
        .find(|(k, _)| &**k == RECEIPT_PROPERTY)?;
    match &**v {
        RECEIPT_ROUTED => Some((false, to)),
        RECEIPT_SETTLED => Some((true, to)),
        _ => None,
    }
}

impl Broker {
    /// The idempotency key a client's message carries, with the identity it is
    /// remembered under (`user:NAME`, or `client:ID` for an anonymous client).
    pub(super) fn idempotency_key(&self, client_id: &Str, message: &Message) -> Option<(Str, Str)> {
        let name = self.settings.idempotency.property.as_ref()?;
        if message.properties.user_properties.is_empty() {
            return None;
        }
        let (_, key) = message
            .properties
            .user_properties
            .iter()
            .find(|(k, _)| k == name)?;
        let identity = self.sessions.get(client_id)?.identity.clone();
        Some((identity, key.clone()))
    }

    /// Remembers a key (in memory, and in this input's ops: committed with the message),
    /// unless it is remembered already: false for a repeat.
    pub(super) fn remember_key(&mut self, (identity, key): (Str, Str), now: Instant) -> bool {
        let until = now + self.settings.idempotency.window;
        let max = self.settings.idempotency.max_keys;
        let Some(slot) = self.keys.remember(&identity, &key, until, max, now) else {
            return false;
        };
        let expires = self.wall(until);
        self.batch.push(Op::PutKey {
            identity,
            slot,
            key,
            expires,
        });
        true
    }

    /// Takes the keys a store held, emptying the slots of those whose window ended.
    pub(super) fn load_keys(
        &mut self,
        keys: BTreeMap<(Str, u32), (Str, SystemTime)>,
        now: Instant,
    ) {
        let mut by_time: Vec<(Instant, Str, u32, Str)> = keys
            .into_iter()
            .map(|((identity, slot), (key, at))| (self.instant(at), identity, slot, key))
            .collect();
        by_time.sort();
        for (until, identity, slot, key) in by_time {
            if until <= now {
                self.batch.push(Op::DeleteKey { identity, slot });
            } else {
                self.keys.restore(identity, slot, key, until);
            }
        }
    }

    /// Starts counting a client's message for a receipt, if it asks for one.
    pub(super) fn begin_tally(&mut self, message: &Message) -> Option<(bool, TopicName)> {
        let asked = receipt_asked(message)?;
        let mut tally = Tally::default();
        if asked.0 {
            self.receipts.next += 1;
            tally.settle = Some(self.receipts.next);
        }
        self.tally = Some(tally);
        Some(asked)
    }

    /// Notes a copy's outcome in the tally of the message being routed, if any.
    pub(super) fn tally_drop(&mut self, reason: DropReason) {
        if let Some(t) = &mut self.tally {
            t.dropped[reason as usize] += 1;
        }
    }

    /// Sends the routed receipt for `message` (and registers or sends the settled one).
    pub(super) fn end_tally(
        &mut self,
        publisher: &Str,
        message: &Message,
        (settle, to): (bool, TopicName),
        duplicate: bool,
        now: Instant,
    ) {
        let Some(tally) = self.tally.take() else {
            return;
        };
        let mut dropped = String::new();
        let mut total_dropped = 0;
        for reason in DropReason::ALL {
            let n = tally.dropped[reason as usize];
            if n > 0 {
                if !dropped.is_empty() {
                    dropped.push(',');
                }
                dropped.push_str(&format!("\"{}\":{n}", reason.label()));
                total_dropped += n;
            }
        }
        let denied = tally.dropped[DropReason::NotAuthorized as usize];
        let matched = tally.sent + tally.queued + total_dropped;
        let payload = format!(
            "{{\"receipt\":\"routed\",\"topic\":{},\"duplicate\":{duplicate},\"matched\":{matched},\"sent\":{},\"queued\":{},\"denied\":{denied},\"dropped\":{{{dropped}}}}}",
            json_string(message.topic.as_str()),
            tally.sent,
            tally.queued,
        );
        let correlation = message.properties.correlation_data.clone();
        self.send_receipt(
            publisher,
            &to,
            correlation.clone(),
            RECEIPT_ROUTED,
            payload,
            now,
        );
        if !settle {
            return;
        }
        let id = tally.settle.unwrap_or_default();
        let outstanding = self.receipts.waiting.get(&id).map_or(0, |w| w.outstanding);
        if outstanding == 0 {
            self.receipts.waiting.remove(&id);
            let payload = settled_payload(&message.topic, 0);
            self.send_receipt(publisher, &to, correlation, RECEIPT_SETTLED, payload, now);
        } else if let Some(w) = self.receipts.waiting.get_mut(&id) {
            w.publisher = publisher.clone();
            w.to = to;
            w.correlation = correlation;
            w.topic = message.topic.clone();
        }
    }

    /// Registers a held copy (QoS 1/2) for the settled receipt of the message being
    /// routed, or of the one it was carried over from.
    pub(super) fn register_copy(&mut self, client_id: &Str, id: MessageId) {
        let receipt = match (&self.tally, self.carry) {
            (
                Some(Tally {
                    settle: Some(r), ..
                }),
                _,
            ) => *r,
            (_, Some(r)) => r,
            _ => return,
        };
        let w = self
            .receipts
            .waiting
            .entry(receipt)
            .or_insert_with(|| Waiting {
                publisher: Str::new(),
                to: TopicName::empty(),
                correlation: None,
                topic: TopicName::empty(),
                copies: 0,
                outstanding: 0,
            });
        w.copies += 1;
        w.outstanding += 1;
        self.receipts
            .copies
            .entry(client_id.clone())
            .or_default()
            .push((id, receipt));
    }

    /// Before a copy leaves `client_id` for another member of a shared group: the
    /// settled receipt it counts for follows it (`Broker::carry`).
    pub(super) fn carry_copy(&mut self, client_id: &Str, id: MessageId) {
        self.carry = None;
        if let Some(list) = self.receipts.copies.get_mut(client_id)
            && let Some(i) = list.iter().position(|(m, _)| *m == id)
        {
            let (_, r) = list.swap_remove(i);
            if list.is_empty() {
                self.receipts.copies.remove(client_id);
            }
            if let Some(w) = self.receipts.waiting.get_mut(&r) {
                w.outstanding -= 1;
                w.copies -= 1;
            }
            self.carry = Some(r);
        }
    }

    /// Settles the copies `client_id` no longer holds (acknowledged, expired, dropped, or
    /// its session ended), sending the receipts whose last copy that was.
    pub(super) fn settle_copies(&mut self, client_id: &Str, now: Instant) {
        let Some(mut list) = self.receipts.copies.remove(client_id) else {
            return;
        };
        let mut settled = Vec::new();
        match self.sessions.get(client_id) {
            Some(s) => {
                let state = s.state();
                let held: std::collections::HashSet<MessageId> = state.held_ids().collect();
                list.retain(|(id, r)| {
                    let keep = held.contains(id) || state.may_hold_spilled(*id);
                    if !keep {
                        settled.push(*r);
                    }
                    keep
                });
            }
            None => settled.extend(list.drain(..).map(|(_, r)| r)),
        }
        if !list.is_empty() {
            self.receipts.copies.insert(client_id.clone(), list);
        }
        for r in settled {
            self.copy_settled(r, now);
        }
    }

    fn copy_settled(&mut self, receipt: u64, now: Instant) {
        let Some(w) = self.receipts.waiting.get_mut(&receipt) else {
            return;
        };
        w.outstanding = w.outstanding.saturating_sub(1);
        // Not yet routed to the end (the receipt's publisher is set by `end_tally`).
        if w.outstanding > 0 || w.publisher.is_empty() {
            return;
        }
        let Some(w) = self.receipts.waiting.remove(&receipt) else {
            return;
        };
        let payload = settled_payload(&w.topic, w.copies);
        self.send_receipt(
            &w.publisher,
            &w.to,
            w.correlation,
            RECEIPT_SETTLED,
            payload,
            now,
        );
    }

    /// Gives a receipt to the publisher's own session, at QoS 1 (queued if it is offline).
    fn send_receipt(
        &mut self,
        publisher: &Str,
        to: &TopicName,
        correlation: Option<bytes::Bytes>,
        kind: &'static str,
        payload: String,
        now: Instant,
    ) {
        let mut m = Message::new(to.clone(), payload, QoS::AtLeastOnce);
        m.properties = tern_codec::properties::PublishProperties {
            payload_format_indicator: Some(tern_codec::PayloadFormat::Utf8),
            content_type: Some(Str::from_static("application/json")),
            correlation_data: correlation,
            user_properties: vec![(Str::from_static(RECEIPT_PROPERTY), Str::from_static(kind))],
            ..Default::default()
        }
        .into();
        let (tally, carry) = (self.tally.take(), self.carry.take());
        self.counters.receipts[usize::from(kind == RECEIPT_SETTLED)] += 1;
        self.deliver(publisher, m, QoS::AtLeastOnce, None, now);
        (self.tally, self.carry) = (tally, carry);
    }
}

fn settled_payload(topic: &TopicName, copies: u32) -> String {
    format!(
        "{{\"receipt\":\"settled\",\"topic\":{},\"copies\":{copies}}}",
        json_string(topic.as_str())
    )
}

/// `s` as a JSON string literal.
pub(super) fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
