//! The durable part of a session: what must survive a reconnect (and, persisted by the
//! caller, a restart) for QoS 1 and 2 to keep their promises.

use std::collections::{BTreeMap, VecDeque};

use tern_codec::PacketId;

use crate::Message;

/// Where an outbound QoS 1/2 flow stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutboundState {
    /// PUBLISH sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// QoS 2: PUBREC received and PUBREL sent; waiting for PUBCOMP.
    Released,
}

/// One outbound QoS 1/2 message holding a packet id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inflight {
    /// The packet id, held until the flow ends.
    pub id: PacketId,
    /// The message.
    pub message: Message,
    /// Where the flow stands.
    pub state: OutboundState,
    /// Send order, for resending in the original order.
    pub(crate) seq: u64,
}

/// Where an inbound QoS 2 flow stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InboundState {
    /// Delivered to the application, which has not yet released the PUBREC (acknowledge-
    /// later mode: the broker is persisting it). A repeat is not delivered again.
    Delivered,
    /// PUBREC sent; waiting for PUBREL. A repeat is answered with PUBREC, not delivered.
    Received,
}

/// Packet ids are exhausted: 65,535 flows are in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("all 65,535 packet identifiers are in use")]
pub struct IdsExhausted;

/// The durable state of one session, for one direction of each flow:
///
/// - outbound QoS 1/2 messages holding a packet id ([`Inflight`]), in send order;
/// - outbound QoS 1/2 messages waiting for the peer's Receive Maximum window, in order;
/// - inbound QoS 2 packet ids not yet released by PUBREL;
/// - the last packet id allocated.
///
/// It is plain data: clone it, compare it, persist it, hand it to a new
/// [`crate::Connection`] to resume.
#[derive(Debug, Clone, Default)]
pub struct SessionState {
    last_id: u16,
    next_seq: u64,
    inflight: BTreeMap<PacketId, Inflight>,
    queue: VecDeque<Message>,
    /// Payload bytes in `queue`, kept so limits are cheap to check.
    queued_bytes: usize,
    inbound_qos2: BTreeMap<PacketId, InboundState>,
}

/// Two sessions are equal when they would behave the same: the same flows in the same send
/// order, the same waiting messages, inbound ids and last id. The internal send-order
/// counters are not compared (a session read back from a store renumbers them).
impl PartialEq for SessionState {
    fn eq(&self, other: &Self) -> bool {
        let flows = |s: &SessionState| -> Vec<(PacketId, Message, OutboundState)> {
            s.inflight()
                .map(|f| (f.id, f.message.clone(), f.state))
                .collect()
        };
        self.last_id == other.last_id
            && self.queue == other.queue
            && self.inbound_qos2 == other.inbound_qos2
            && flows(self) == flows(other)
    }
}

impl Eq for SessionState {}

impl SessionState {
    /// An empty session (clean start).
    pub fn new() -> SessionState {
        SessionState::default()
    }

    /// Outbound flows holding an id, in send order.
    pub fn inflight(&self) -> impl Iterator<Item = &Inflight> {
        let mut all: Vec<&Inflight> = self.inflight.values().collect();
        all.sort_by_key(|f| f.seq);
        all.into_iter()
    }

    /// How many outbound flows hold an id.
    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    /// Outbound messages waiting for the window, in order.
    pub fn queued(&self) -> impl Iterator<Item = &Message> {
        self.queue.iter()
    }

    /// The last packet id handed out (0 before the first).
    pub fn last_id(&self) -> u16 {
        self.last_id
    }

    /// Rebuilds a session from what its getters returned (a store reading it back):
    /// in-flight flows in send order, waiting messages in order, inbound QoS 2 ids.
    pub fn restore(
        last_id: u16,
        inflight: impl IntoIterator<Item = (PacketId, Message, OutboundState)>,
        queue: impl IntoIterator<Item = Message>,
        inbound_qos2: impl IntoIterator<Item = (PacketId, InboundState)>,
    ) -> SessionState {
        let mut s = SessionState {
            last_id,
            ..SessionState::default()
        };
        for (id, message, state) in inflight {
            s.insert_inflight(id, message);
            if let Some(f) = s.inflight.get_mut(&id) {
                f.state = state;
            }
        }
        for m in queue {
            s.enqueue(m);
        }
        s.inbound_qos2.extend(inbound_qos2);
        s
    }

    /// Inbound QoS 2 ids not yet released by PUBREL.
    pub fn inbound_qos2(&self) -> impl Iterator<Item = (PacketId, InboundState)> + '_ {
        self.inbound_qos2.iter().map(|(id, s)| (*id, *s))
    }

    /// The next free packet id after the last one handed out, wrapping from 65,535 to 1 and
    /// skipping ids still in flight.
    pub fn allocate_id(&mut self) -> Result<PacketId, IdsExhausted> {
        if self.inflight.len() >= usize::from(u16::MAX) {
            return Err(IdsExhausted);
        }
        let mut candidate = self.last_id;
        loop {
            candidate = candidate.checked_add(1).unwrap_or(1);
            let id = PacketId::new(candidate).ok_or(IdsExhausted)?;
            if !self.inflight.contains_key(&id) {
                self.last_id = candidate;
                return Ok(id);
            }
        }
    }

    pub(crate) fn insert_inflight(&mut self, id: PacketId, message: Message) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.inflight.insert(
            id,
            Inflight {
                id,
                message,
                state: OutboundState::Published,
                seq,
            },
        );
    }

    pub(crate) fn inflight_mut(&mut self, id: PacketId) -> Option<&mut Inflight> {
        self.inflight.get_mut(&id)
    }

    pub(crate) fn remove_inflight(&mut self, id: PacketId) -> Option<Inflight> {
        self.inflight.remove(&id)
    }

    /// Queues an outbound QoS 1/2 message while no connection is up (an offline
    /// persistent session); it is sent, in order, when a connection resumes the session.
    pub fn enqueue(&mut self, message: Message) {
        self.queued_bytes += message.payload.len();
        self.queue.push_back(message);
    }

    /// How many messages wait for the window.
    pub fn queued_len(&self) -> usize {
        self.queue.len()
    }

    /// Payload bytes of the messages waiting for the window.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Takes out the messages for which `pred` holds that can still go to someone else:
    /// waiting ones, and QoS 1 ones in flight (their ids are freed; a late PUBACK for one
    /// is an ack for an unknown id). QoS 2 messages whose PUBREC has not arrived are taken
    /// only when `session_ends`: while the session lives, the peer may hold one and will
    /// complete it on its return (§4.8.2); once the session is gone that can no longer
    /// happen, and another receiver should have it. QoS 2 messages the peer acknowledged
    /// with PUBREC are never taken. Returned in send order, in-flight first.
    pub fn take_redeliverable(
        &mut self,
        pred: impl Fn(&Message) -> bool,
        session_ends: bool,
    ) -> Vec<Message> {
        let mut flights: Vec<&Inflight> = self
            .inflight
            .values()
            .filter(|f| {
                f.state == OutboundState::Published
                    && (f.message.qos == tern_codec::QoS::AtLeastOnce || session_ends)
                    && pred(&f.message)
            })
            .collect();
        flights.sort_by_key(|f| f.seq);
        let ids: Vec<PacketId> = flights.iter().map(|f| f.id).collect();
        let mut out: Vec<Message> = ids
            .iter()
            .filter_map(|id| self.inflight.remove(id))
            .map(|f| f.message)
            .collect();
        let (taken, kept): (VecDeque<Message>, VecDeque<Message>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|m| pred(m));
        self.queue = kept;
        self.queued_bytes = self.queue.iter().map(|m| m.payload.len()).sum();
        out.extend(taken);
        out
    }

    /// Drops waiting messages whose Message Expiry Interval has passed; returns how many.
    pub fn remove_expired(&mut self, now: std::time::Instant) -> usize {
        let before = self.queue.len();
        self.queue.retain(|m| !m.is_expired(now));
        self.queued_bytes = self.queue.iter().map(|m| m.payload.len()).sum();
        before - self.queue.len()
    }

    /// Removes the oldest waiting message (for a drop-oldest queue limit).
    pub fn dequeue_oldest(&mut self) -> Option<Message> {
        self.pop_queue()
    }

    pub(crate) fn pop_queue(&mut self) -> Option<Message> {
        let m = self.queue.pop_front()?;
        self.queued_bytes -= m.payload.len();
        Some(m)
    }

    pub(crate) fn unpop_queue(&mut self, message: Message) {
        self.queued_bytes += message.payload.len();
        self.queue.push_front(message);
    }

    pub(crate) fn inbound(&self, id: PacketId) -> Option<InboundState> {
        self.inbound_qos2.get(&id).copied()
    }

    pub(crate) fn set_inbound(&mut self, id: PacketId, state: InboundState) {
        self.inbound_qos2.insert(id, state);
    }

    pub(crate) fn remove_inbound(&mut self, id: PacketId) -> Option<InboundState> {
        self.inbound_qos2.remove(&id)
    }

    pub(crate) fn inbound_len(&self) -> usize {
        self.inbound_qos2.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_codec::{QoS, TopicName};

    fn msg() -> Message {
        Message::new(TopicName::new("t").unwrap(), "x", QoS::AtLeastOnce)
    }

    #[test]
    fn ids_wrap_from_65535_to_1_skipping_ids_in_flight() {
        let mut s = SessionState::new();
        s.last_id = 65_533;
        let a = s.allocate_id().unwrap();
        s.insert_inflight(a, msg());
        assert_eq!(a.get(), 65_534);
        assert_eq!(s.allocate_id().unwrap().get(), 65_535);
        // 1 is in flight, so the wrap lands on 2.
        s.insert_inflight(PacketId::new(1).unwrap(), msg());
        assert_eq!(s.allocate_id().unwrap().get(), 2);
    }

    #[test]
    fn ids_in_flight_are_never_handed_out_again() {
        let mut s = SessionState::new();
        let mut held = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            let id = s.allocate_id().unwrap();
            assert!(held.insert(id), "{id} handed out twice while in flight");
            s.insert_inflight(id, msg());
        }
    }

    #[test]
    fn exhaustion_is_an_error_not_a_panic() {
        let mut s = SessionState::new();
        for _ in 0..u16::MAX {
            let id = s.allocate_id().unwrap();
            s.insert_inflight(id, msg());
        }
        assert_eq!(s.allocate_id(), Err(IdsExhausted));
        s.remove_inflight(PacketId::new(777).unwrap());
        assert_eq!(s.allocate_id().unwrap().get(), 777);
    }

    #[test]
    fn redeliverable_messages_are_qos1_in_flight_waiting_ones_and_unreceived_qos2_only_when_the_session_ends()
     {
        let tagged = |payload: &'static str, qos: QoS| {
            let mut m = Message::new(TopicName::new("t").unwrap(), payload, qos);
            m.shared = Some("$share/g/t".into());
            m
        };
        let build = || {
            let mut s = SessionState::new();
            for (p, q) in [
                ("q1", QoS::AtLeastOnce),
                ("q2-sent", QoS::ExactlyOnce),
                ("q2-rec", QoS::ExactlyOnce),
            ] {
                let id = s.allocate_id().unwrap();
                s.insert_inflight(id, tagged(p, q));
            }
            let rec = s
                .inflight
                .values()
                .find(|f| f.message.payload == "q2-rec")
                .unwrap()
                .id;
            s.inflight_mut(rec).unwrap().state = OutboundState::Released;
            s.insert_inflight(s.clone().allocate_id().unwrap(), msg()); // not shared
            s.enqueue(tagged("waiting", QoS::ExactlyOnce));
            s.enqueue(msg());
            s
        };
        let names = |v: Vec<Message>| -> Vec<String> {
            v.iter()
                .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
                .collect()
        };
        let mut live = build();
        assert_eq!(
            names(live.take_redeliverable(|m| m.shared.is_some(), false)),
            ["q1", "waiting"]
        );
        assert_eq!(
            live.inflight_len(),
            3,
            "the QoS 2 flows and the unshared one stay"
        );
        assert_eq!(live.queued_len(), 1);
        let mut ending = build();
        assert_eq!(
            names(ending.take_redeliverable(|m| m.shared.is_some(), true)),
            ["q1", "q2-sent", "waiting"],
            "PUBREC received: never given to anyone else"
        );
    }
}
