//! Guarantees beyond MQTT's: idempotency keys (a repeat of a message the broker already
//! has is acknowledged and not routed again), delivery receipts (what became of a
//! message, and when every copy was settled), per-topic guarantee policies.

use super::settings::{RECEIPT_PROPERTY, RECEIPT_ROUTED, RECEIPT_SETTLED};
use super::*;

/// The idempotency keys the broker remembers: (identity, key) until a deadline, at most
/// `max_keys` per identity.
#[derive(Debug, Default)]
pub(super) struct Keys {
    /// (identity, key) -> when it may be forgotten, and its insertion number.
    seen: HashMap<(Str, Str), (Instant, u64)>,
    /// Insertion order (the window is the same for all, so deadlines are in order too).
    order: VecDeque<(Instant, Str, Str, u64)>,
    /// Each identity's keys in insertion order, for the count bound.
    per: HashMap<Str, VecDeque<(Str, u64)>>,
    next: u64,
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

    /// Remembers `key` until `until`; forgets what expired by `now` and what the count
    /// bound pushes out, writing each forgotten key's deletion to `ops` (by `wall`).
    pub(super) fn remember(
        &mut self,
        identity: Str,
        key: Str,
        until: Instant,
        max_keys: usize,
        now: Instant,
        ops: &mut Vec<Op>,
    ) {
        self.forget_expired(now, ops);
        self.next += 1;
        let n = self.next;
        self.seen
            .insert((identity.clone(), key.clone()), (until, n));
        self.order
            .push_back((until, identity.clone(), key.clone(), n));
        let mine = self.per.entry(identity.clone()).or_default();
        mine.push_back((key, n));
        while mine.len() > max_keys.max(1) {
            let Some((old, m)) = mine.pop_front() else {
                break;
            };
            let pair = (identity.clone(), old);
            if self.seen.get(&pair).is_some_and(|(_, at)| *at == m) {
                self.seen.remove(&pair);
                ops.push(Op::DeleteKey {
                    identity: pair.0,
                    key: pair.1,
                });
            }
        }
    }

    /// Forgets every key whose window ended by `now`.
    pub(super) fn forget_expired(&mut self, now: Instant, ops: &mut Vec<Op>) {
        while let Some((until, ..)) = self.order.front()
            && *until <= now
        {
            let Some((_, identity, key, n)) = self.order.pop_front() else {
                break;
            };
            if let Some(mine) = self.per.get_mut(&identity) {
                if mine.front().is_some_and(|(_, m)| *m == n) {
                    mine.pop_front();
                }
                if mine.is_empty() {
                    self.per.remove(&identity);
                }
            }
            let pair = (identity, key);
            if self.seen.get(&pair).is_some_and(|(_, m)| *m == n) {
                self.seen.remove(&pair);
                ops.push(Op::DeleteKey {
                    identity: pair.0,
                    key: pair.1,
                });
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
    /// remembered under (the username, or the client id of an anonymous client).
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
        let identity = self
            .sessions
            .get(client_id)
            .and_then(|s| s.username.as_ref())
            .map_or_else(|| client_id.clone(), |u| Str::from(format!("user:{u}")));
        let identity = if identity == *client_id {
            Str::from(format!("client:{client_id}"))
        } else {
            identity
        };
        Some((identity, key.clone()))
    }

    /// Remembers a key (in memory, and in this input's ops: committed with the message).
    pub(super) fn remember_key(&mut self, (identity, key): (Str, Str), now: Instant) {
        let until = now + self.settings.idempotency.window;
        let expires = self.wall(until);
        self.batch.push(Op::PutKey {
            identity: identity.clone(),
            key: key.clone(),
            expires,
        });
        let max = self.settings.idempotency.max_keys;
        self.keys
            .remember(identity, key, until, max, now, &mut self.batch);
    }

    /// Takes the keys a store held, forgetting (and deleting) those whose window ended.
    pub(super) fn load_keys(&mut self, keys: BTreeMap<(Str, Str), SystemTime>, now: Instant) {
        let mut by_time: Vec<(Instant, Str, Str)> = keys
            .into_iter()
            .map(|((identity, key), at)| (self.instant(at), identity, key))
            .collect();
        by_time.sort();
        let max = self.settings.idempotency.max_keys;
        for (until, identity, key) in by_time {
            if until <= now {
                self.batch.push(Op::DeleteKey { identity, key });
            } else {
                self.keys
                    .remember(identity, key, until, max, now, &mut self.batch);
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
