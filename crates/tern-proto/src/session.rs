//! The durable part of a session: what must survive a reconnect (and, persisted by the
//! caller, a restart) for QoS 1 and 2 to keep their promises.

use std::collections::VecDeque;
use std::time::Instant;

use tern_codec::PacketId;

use crate::Message;
use crate::idmap::IdMap;

/// Where an outbound QoS 1/2 flow stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutboundState {
    /// PUBLISH sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// QoS 2: PUBREC received and PUBREL sent; waiting for PUBCOMP.
    Released,
}

/// The session's number for one outbound message: given when the message enters the
/// session ([`crate::Connection::publish`], [`SessionState::enqueue`]), kept while it waits
/// and while it is in flight (a store keeps it with the message), and handed back with the
/// [`crate::Event::Acknowledged`] or [`crate::Event::Dropped`] that ends it. Callers key
/// their own bookkeeping by it, in their own maps, so the engine's [`Message`] carries
/// nothing but the message. Never sent; unique within the session; never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(u64);

impl MessageId {
    /// The id numbered `n`; `None` for 0.
    pub fn new(n: u64) -> Option<MessageId> {
        (n != 0).then_some(MessageId(n))
    }

    /// Its number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// One outbound message of a session that holds no packet id: waiting for the window, or
/// on its way into flight ([`Change::Sent`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The session's number for it.
    pub id: MessageId,
    /// When it entered the session (the age of waiting messages counts from here).
    pub since: Instant,
    /// The message.
    pub message: Message,
}

/// One outbound QoS 1/2 message holding a packet id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inflight {
    /// The packet id, held until the flow ends.
    pub id: PacketId,
    /// The session's number for the message.
    pub message_id: MessageId,
    /// When the message entered the session.
    pub since: Instant,
    /// The message.
    pub message: Message,
    /// Where the flow stands.
    pub state: OutboundState,
    /// Send order, for resending in the original order.
    pub(crate) seq: u32,
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

/// One change to a [`SessionState`], recorded while the state is tracked
/// ([`SessionState::track`]). A store keeps its copy of a session equal to the live one by
/// applying the changes in order ([`SessionState::apply`]), instead of rewriting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A message joined the end of the waiting queue.
    Queued(Entry),
    /// The oldest waiting message left the queue (sent, expired or dropped).
    Unqueued,
    /// A message went back to the front of the waiting queue.
    Requeued(Entry),
    /// A message took packet id `id`, now the last id handed out, and is in flight.
    Sent(PacketId, Entry),
    /// The oldest waiting message took packet id `id`, now the last id handed out, and is
    /// in flight: `Unqueued` then `Sent` of the same message, said in one change so that
    /// a store moves its row instead of writing the message again.
    Launched(PacketId),
    /// PUBREC arrived for the outbound flow `id`: it waits for PUBCOMP now.
    Released(PacketId),
    /// The outbound flow `id` ended.
    Completed(PacketId),
    /// The inbound QoS 2 id is held, in this state, until PUBREL.
    Inbound(PacketId, InboundState),
    /// The inbound QoS 2 id is free again.
    InboundDone(PacketId),
    /// The waiting message numbered `id` left the queue from wherever it stood in it
    /// (expired, or taken for another receiver).
    Removed(MessageId),
}

/// What changed in a tracked session since the last [`SessionState::take_changes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// These changes, in order (empty: nothing changed).
    Some(Vec<Change>),
    /// Too much to say one by one (tracking just began, or messages were taken out of the
    /// middle of the queue): the store should replace its copy with this state.
    All(SessionState),
}

#[derive(Debug, Clone, Default)]
enum Journal {
    #[default]
    Off,
    Changes(Vec<Change>),
    Rewrite,
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
    /// The last [`MessageId`] handed out.
    last_message: u64,
    next_seq: u32,
    inflight: IdMap<Inflight>,
    queue: VecDeque<Entry>,
    /// Payload bytes in `queue`, kept so limits are cheap to check.
    queued_bytes: usize,
    inbound_qos2: IdMap<InboundState>,
    journal: Journal,
    /// The part of the queue behind the in-memory window, kept only by the owner's store.
    spill: Spill,
}

/// The waiting messages past the in-memory window: they are in the owner's store only,
/// counted here, and read back in order ([`SessionState::wants_load`],
/// [`SessionState::loaded`]) as the window drains. The window is always the front of the
/// queue, so every spilled message is behind every one in memory, and (message ids
/// growing in queue order) numbered above `after`.
#[derive(Debug, Clone, Default)]
struct Spill {
    /// Most waiting messages kept in memory; 0: no window (everything in memory).
    cap: usize,
    /// Spilled messages and their payload bytes.
    len: usize,
    bytes: usize,
    /// Every spilled message's id is above this one.
    after: u64,
    /// The load asked for and not yet answered (its token).
    loading: Option<u64>,
    /// When the oldest spilled message entered the session, if known (after part of the
    /// spilled messages is read back, the time of the first one spilled: an upper bound
    /// on the age).
    since: Option<Instant>,
}

/// Two sessions are equal when they would behave the same: the same flows in the same send
/// order, the same waiting messages, inbound ids and last id. The internal counters (send
/// order, the last message id handed out) are not compared (a session read back from a
/// store renumbers its send order and counts message ids on from the highest it holds).
impl PartialEq for SessionState {
    fn eq(&self, other: &Self) -> bool {
        type Flow = (PacketId, MessageId, Instant, Message, OutboundState);
        let flows = |s: &SessionState| -> Vec<Flow> {
            s.inflight()
                .map(|f| (f.id, f.message_id, f.since, f.message.clone(), f.state))
                .collect()
        };
        self.last_id == other.last_id
            && self.queue == other.queue
            && (self.spill.len, self.spill.bytes) == (other.spill.len, other.spill.bytes)
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

    /// Starts recording changes for a store (see [`Change`]). If it was not on, the next
    /// [`SessionState::take_changes`] returns the whole state; if `known` is set the store
    /// already holds this state and only later changes are recorded.
    pub fn track(&mut self, known: bool) {
        if matches!(self.journal, Journal::Off) {
            self.journal = if known {
                Journal::Changes(Vec::new())
            } else {
                Journal::Rewrite
            };
        }
    }

    /// Stops recording changes (the session is no longer stored).
    pub fn untrack(&mut self) {
        self.journal = Journal::Off;
    }

    /// Whether changes are being recorded.
    pub fn is_tracked(&self) -> bool {
        !matches!(self.journal, Journal::Off)
    }

    /// The changes recorded since the last call; `None` if the session is not tracked.
    pub fn take_changes(&mut self) -> Option<Changes> {
        match &mut self.journal {
            Journal::Off => None,
            Journal::Changes(v) => Some(Changes::Some(std::mem::take(v))),
            Journal::Rewrite => {
                self.journal = Journal::Changes(Vec::new());
                let mut all = self.clone();
                all.journal = Journal::Off;
                // The copy is the store's: it holds every message in memory. (Nothing is
                // spilled while the journal says rewrite: spilling needs the changes.)
                all.spill = Spill::default();
                Some(Changes::All(all))
            }
        }
    }

    fn record(&mut self, change: Change) {
        if let Journal::Changes(v) = &mut self.journal {
            v.push(change);
        }
    }

    /// Applies one recorded change (a store keeping its copy of the session).
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::Queued(e) => {
                self.saw(e.id);
                self.push_entry(e.clone());
            }
            Change::Unqueued => {
                self.pop_queue();
            }
            Change::Requeued(e) => {
                self.saw(e.id);
                self.unpop_queue(e.clone());
            }
            Change::Sent(id, e) => {
                self.saw(e.id);
                self.last_id = id.get();
                self.insert_inflight(*id, e.clone());
            }
            Change::Launched(id) => {
                if let Some(e) = self.pop_queue() {
                    self.last_id = id.get();
                    self.insert_inflight(*id, e);
                }
            }
            Change::Released(id) => {
                if let Some(f) = self.inflight.get_mut(id) {
                    f.state = OutboundState::Released;
                }
            }
            Change::Completed(id) => {
                self.remove_inflight(*id);
            }
            Change::Inbound(id, state) => self.set_inbound(*id, *state),
            Change::InboundDone(id) => {
                self.remove_inbound(*id);
            }
            Change::Removed(id) => {
                if let Some(k) = self.queue.iter().position(|e| e.id == *id)
                    && let Some(e) = self.queue.remove(k)
                {
                    self.queued_bytes -= e.message.payload.len();
                }
            }
        }
    }

    /// Forgets inbound QoS 2 ids whose PUBREC was never released (the application
    /// refused or never acknowledged the message): a resend is then a new message.
    pub fn drop_unreleased_inbound(&mut self) {
        let unreleased: Vec<PacketId> = self
            .inbound_qos2
            .iter()
            .filter(|(_, s)| **s == InboundState::Delivered)
            .map(|(id, _)| *id)
            .collect();
        for id in unreleased {
            self.remove_inbound(id);
        }
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

    /// Outbound messages waiting for the window that are in memory, in order (the front
    /// of the queue; [`SessionState::spilled_len`] more wait in the owner's store).
    pub fn queued(&self) -> impl Iterator<Item = &Entry> {
        self.queue.iter()
    }

    /// The numbers of the messages in the session's memory (waiting in the window or in
    /// flight; a spilled one is not).
    pub fn held_ids(&self) -> impl Iterator<Item = MessageId> + '_ {
        self.queue
            .iter()
            .map(|e| e.id)
            .chain(self.inflight.values().map(|f| f.message_id))
    }

    /// Whether message `id` may be among the waiting messages kept in the store only
    /// (past the in-memory window): some are, and its number is in their range.
    pub fn may_hold_spilled(&self, id: MessageId) -> bool {
        self.spill.len > 0 && id.0 > self.spill.after
    }

    /// Whether the message numbered `id` is still in the session's memory (waiting in the
    /// window or in flight; a spilled one is not). Walks the session: for callers pruning
    /// their side maps, not for every message.
    pub fn holds(&self, id: MessageId) -> bool {
        self.queue.iter().any(|e| e.id == id) || self.inflight.values().any(|f| f.message_id == id)
    }

    /// Gives the next message id.
    pub(crate) fn next_message_id(&mut self) -> MessageId {
        self.last_message += 1;
        MessageId(self.last_message)
    }

    /// A message entering the session at `now`, numbered.
    pub(crate) fn entry(&mut self, message: Message, now: Instant) -> Entry {
        Entry {
            id: self.next_message_id(),
            since: now,
            message,
        }
    }

    /// Keeps later ids above one the session was given (a store applying changes, a
    /// session read back).
    fn saw(&mut self, id: MessageId) {
        self.last_message = self.last_message.max(id.0);
    }

    /// The last packet id handed out (0 before the first).
    pub fn last_id(&self) -> u16 {
        self.last_id
    }

    /// Rebuilds a session from what its getters returned (a store reading it back):
    /// in-flight flows in send order, waiting messages in order, inbound QoS 2 ids. Message
    /// ids go on from the highest one given.
    pub fn restore(
        last_id: u16,
        inflight: impl IntoIterator<Item = (PacketId, Entry, OutboundState)>,
        queue: impl IntoIterator<Item = Entry>,
        inbound_qos2: impl IntoIterator<Item = (PacketId, InboundState)>,
    ) -> SessionState {
        let mut s = SessionState {
            last_id,
            ..SessionState::default()
        };
        for (id, entry, state) in inflight {
            s.saw(entry.id);
            s.insert_inflight(id, entry);
            if let Some(f) = s.inflight.get_mut(&id) {
                f.state = state;
            }
        }
        for e in queue {
            s.saw(e.id);
            s.push_entry(e);
        }
        s.inbound_qos2.extend(inbound_qos2);
        s
    }

    /// Inbound QoS 2 ids not yet released by PUBREL, in id order.
    pub fn inbound_qos2(&self) -> impl Iterator<Item = (PacketId, InboundState)> + '_ {
        let mut ids: Vec<(PacketId, InboundState)> =
            self.inbound_qos2.iter().map(|(id, s)| (*id, *s)).collect();
        ids.sort_unstable_by_key(|(id, _)| *id);
        ids.into_iter()
    }

    /// The next free packet id after the last one handed out, wrapping from 65,535 to 1 and
    /// skipping ids still in flight.
    pub fn allocate_id(&mut self) -> Result<PacketId, IdsExhausted> {
        self.allocate_id_skipping(|_| false, 0)
    }

    /// As [`SessionState::allocate_id`], also skipping the `busy` ids of `others` requests
    /// outside the session (SUBSCRIBE and UNSUBSCRIBE waiting for their answer)
    /// [MQTT-2.2.1-3].
    pub(crate) fn allocate_id_skipping(
        &mut self,
        busy: impl Fn(PacketId) -> bool,
        others: usize,
    ) -> Result<PacketId, IdsExhausted> {
        if self.inflight.len() + others >= usize::from(u16::MAX) {
            return Err(IdsExhausted);
        }
        let mut candidate = self.last_id;
        loop {
            candidate = candidate.checked_add(1).unwrap_or(1);
            let id = PacketId::new(candidate).ok_or(IdsExhausted)?;
            if !self.inflight.contains_key(&id) && !busy(id) {
                self.last_id = candidate;
                return Ok(id);
            }
        }
    }

    /// Puts in flight under `id` the entry [`SessionState::pop_queue`] just took from the
    /// front of the queue: recorded as one [`Change::Launched`] where the journal said
    /// `Unqueued` for it.
    pub(crate) fn launch_front(&mut self, id: PacketId, entry: Entry) {
        if let Journal::Changes(v) = &mut self.journal
            && matches!(v.last(), Some(Change::Unqueued))
        {
            v.pop();
            v.push(Change::Launched(id));
            let journal = std::mem::take(&mut self.journal);
            self.insert_inflight(id, entry);
            self.journal = journal;
            return;
        }
        self.insert_inflight(id, entry);
    }

    pub(crate) fn insert_inflight(&mut self, id: PacketId, entry: Entry) {
        if matches!(self.journal, Journal::Changes(_)) {
            self.record(Change::Sent(id, entry.clone()));
        }
        if self.next_seq == u32::MAX {
            self.renumber();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.inflight.insert(
            id,
            Inflight {
                id,
                message_id: entry.id,
                since: entry.since,
                message: entry.message,
                state: OutboundState::Published,
                seq,
            },
        );
    }

    /// Numbers the flows in flight 0, 1, ... in send order, once the 32-bit send order
    /// runs out (every 4 billion sends): kept to 32 bits, an `Inflight` stays small
    /// enough to be moved without a `memcpy` call.
    fn renumber(&mut self) {
        let mut order: Vec<(u32, PacketId)> =
            self.inflight.values().map(|f| (f.seq, f.id)).collect();
        order.sort_unstable();
        for (seq, (_, id)) in (0..).zip(order) {
            if let Some(f) = self.inflight.get_mut(&id) {
                f.seq = seq;
            }
        }
        self.next_seq = self.inflight.len() as u32;
    }

    pub(crate) fn inflight_ref(&self, id: PacketId) -> Option<&Inflight> {
        self.inflight.get(&id)
    }

    pub(crate) fn set_released(&mut self, id: PacketId) {
        if let Some(f) = self.inflight.get_mut(&id) {
            f.state = OutboundState::Released;
            self.record(Change::Released(id));
        }
    }

    /// Takes back an id allocated for a message that was then not sent.
    pub(crate) fn unallocate(&mut self, previous: u16) {
        self.last_id = previous;
    }

    pub(crate) fn remove_inflight(&mut self, id: PacketId) -> Option<Inflight> {
        let f = self.inflight.remove(&id)?;
        self.record(Change::Completed(id));
        Some(f)
    }

    /// Queues an outbound QoS 1/2 message while no connection is up (an offline
    /// persistent session); it is sent, in order, when a connection resumes the session.
    /// Returns the session's number for it.
    pub fn enqueue(&mut self, message: Message, now: Instant) -> MessageId {
        let entry = self.entry(message, now);
        let id = entry.id;
        self.push_entry(entry);
        id
    }

    pub(crate) fn push_entry(&mut self, entry: Entry) {
        if matches!(self.journal, Journal::Changes(_)) {
            self.record(Change::Queued(entry.clone()));
        }
        let spill = &mut self.spill;
        if spill.cap > 0
            && matches!(self.journal, Journal::Changes(_))
            && (spill.len > 0 || self.queue.len() >= spill.cap)
        {
            // Past the window: the store has it (the change above), memory only counts it.
            if spill.len == 0 {
                spill.after = self.queue.back().map_or(entry.id.0 - 1, |e| e.id.0);
                spill.since = Some(entry.since);
            }
            spill.len += 1;
            spill.bytes += entry.message.payload.len();
            return;
        }
        self.queued_bytes += entry.message.payload.len();
        self.queue.push_back(entry);
    }

    /// How many messages wait for the window (in memory and spilled).
    pub fn queued_len(&self) -> usize {
        self.queue.len() + self.spill.len
    }

    /// Payload bytes of the messages waiting for the window (in memory and spilled).
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes + self.spill.bytes
    }

    /// When the oldest waiting message entered the session (in memory, else spilled, if
    /// known).
    pub fn oldest_since(&self) -> Option<Instant> {
        self.queue.front().map(|e| e.since).or(self.spill.since)
    }

    /// How many waiting messages are in the owner's store only, behind the window.
    pub fn spilled_len(&self) -> usize {
        self.spill.len
    }

    /// Keeps at most `cap` waiting messages in memory (`None`: all of them, the default),
    /// the rest in the owner's store only: for a session whose every change reaches a
    /// store (it is tracked) that answers [`SessionState::wants_load`]. Turning the window
    /// off while messages are spilled is the owner's bug: they stay counted, unreachable.
    pub fn set_window(&mut self, cap: Option<usize>) {
        self.spill.cap = cap.map_or(0, |c| c.max(1));
    }

    /// Moves every waiting message out of memory (the owner's store holds them all): a
    /// session going offline keeps nothing queued in memory. A load not yet answered is
    /// forgotten (its answer would not fit the new front).
    pub fn spill_all(&mut self) {
        if self.spill.cap == 0 || matches!(self.journal, Journal::Rewrite) {
            return;
        }
        self.spill.loading = None;
        let Some(front) = self.queue.front() else {
            return;
        };
        self.spill.after = front.id.0 - 1;
        self.spill.since = Some(front.since);
        self.spill.len += self.queue.len();
        self.spill.bytes += self.queued_bytes;
        self.queue.clear();
        self.queue.shrink_to(0);
        self.queued_bytes = 0;
    }

    /// Sets the spilled part of a session read back from a store that kept its queue
    /// there ([`SessionState::restore`] with no waiting messages): `len` messages of
    /// `bytes` payload bytes, the last numbered `last` (later messages are numbered
    /// above it).
    /// `oldest` is when the first of them entered the session, if known.
    pub fn restore_spilled(
        &mut self,
        len: usize,
        bytes: usize,
        last: Option<MessageId>,
        oldest: Option<Instant>,
    ) {
        if let Some(last) = last {
            self.saw(last);
        }
        self.spill.since = oldest.filter(|_| len > 0);
        self.spill.len = len;
        self.spill.bytes = bytes;
        self.spill.after = 0;
    }

    /// Whether the window has drained far enough (half) that the next spilled messages
    /// should be read back: `(after, max)`, read up to `max` messages numbered above
    /// `after`, in order, from the store, once it has committed every change recorded so
    /// far, and give them to [`SessionState::loaded`]. `None` while a load is out or
    /// nothing is spilled.
    pub fn wants_load(&self) -> Option<(MessageId, usize)> {
        let s = &self.spill;
        (s.len > 0 && s.loading.is_none() && self.queue.len() <= s.cap / 2)
            .then(|| (MessageId(s.after), (s.cap - self.queue.len()).min(s.len)))
    }

    /// Notes that the load [`SessionState::wants_load`] asked for is out, under `token`
    /// (the owner's number for it).
    pub fn begin_load(&mut self, token: u64) {
        self.spill.loading = Some(token);
    }

    /// Whether `full`, a copy of this session holding every waiting message in memory (a
    /// store's), is this session: the same flows, inbound ids and last id, this session's
    /// window the front of its queue, and the rest as many messages and payload bytes as
    /// this session has spilled.
    pub fn matches_full(&self, full: &SessionState) -> bool {
        let mut f = full.clone();
        let keep = self.queue.len().min(f.queue.len());
        let rest: Vec<Entry> = f.queue.drain(keep..).collect();
        f.queued_bytes = f.queue.iter().map(|e| e.message.payload.len()).sum();
        f.spill.len = rest.len();
        f.spill.bytes = rest.iter().map(|e| e.message.payload.len()).sum();
        f == *self
    }

    /// The token of the load that is out, if one is.
    pub fn loading(&self) -> Option<u64> {
        self.spill.loading
    }

    /// The answer to load `token`: messages read back from the store, in order. Those
    /// that are still spilled join the back of the window (the store has them already:
    /// nothing is recorded); an answer to a load that is no longer out is ignored. Returns
    /// the ids taken.
    pub fn loaded(&mut self, token: u64, entries: Vec<Entry>) -> Vec<MessageId> {
        if self.spill.loading != Some(token) {
            return Vec::new();
        }
        self.spill.loading = None;
        let mut taken = Vec::with_capacity(entries.len());
        for e in entries {
            if self.spill.len == 0 {
                break;
            }
            if e.id.0 <= self.spill.after {
                continue;
            }
            let size = e.message.payload.len();
            self.spill.len -= 1;
            self.spill.bytes = self.spill.bytes.saturating_sub(size);
            self.spill.after = e.id.0;
            self.queued_bytes += size;
            taken.push(e.id);
            self.queue.push_back(e);
        }
        if self.spill.len == 0 {
            self.spill.bytes = 0;
            self.spill.since = None;
        } else if taken.is_empty() {
            // The store holds none of what is counted: it was lost under us. Counting on
            // would wait for it forever.
            self.spill.len = 0;
            self.spill.bytes = 0;
        }
        taken
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
        pred: impl Fn(MessageId) -> bool,
        session_ends: bool,
    ) -> Vec<Entry> {
        let mut flights: Vec<&Inflight> = self
            .inflight
            .values()
            .filter(|f| {
                f.state == OutboundState::Published
                    && (f.message.qos == tern_codec::QoS::AtLeastOnce || session_ends)
                    && pred(f.message_id)
            })
            .collect();
        flights.sort_by_key(|f| f.seq);
        let ids: Vec<PacketId> = flights.iter().map(|f| f.id).collect();
        let mut out: Vec<Entry> = ids
            .iter()
            .filter_map(|id| self.remove_inflight(*id))
            .map(|f| Entry {
                id: f.message_id,
                since: f.since,
                message: f.message,
            })
            .collect();
        if self.queue.iter().any(|e| pred(e.id)) {
            let (taken, kept): (VecDeque<Entry>, VecDeque<Entry>) = std::mem::take(&mut self.queue)
                .into_iter()
                .partition(|e| pred(e.id));
            self.queue = kept;
            self.queued_bytes = self.queue.iter().map(|e| e.message.payload.len()).sum();
            for e in &taken {
                self.record(Change::Removed(e.id));
            }
            out.extend(taken);
        }
        out
    }

    /// Drops waiting messages whose Message Expiry Interval has passed; returns how many.
    /// Only the waiting messages in memory are looked at; spilled ones are when they are
    /// read back (and none is ever sent expired).
    pub fn remove_expired(&mut self, now: std::time::Instant) -> usize {
        if !self.queue.iter().any(|e| e.message.is_expired(now)) {
            return 0;
        }
        let before = self.queue.len();
        let mut gone = Vec::new();
        self.queue.retain(|e| {
            let expired = e.message.is_expired(now);
            if expired {
                gone.push(e.id);
            }
            !expired
        });
        self.queued_bytes = self.queue.iter().map(|e| e.message.payload.len()).sum();
        for id in gone {
            self.record(Change::Removed(id));
        }
        before - self.queue.len()
    }

    /// Drops the oldest waiting message, in memory or (the window empty) spilled; false
    /// if nothing waits. A spilled one is dropped unread (`Unqueued`: the store takes its
    /// front row), its payload bytes estimated as the spilled messages' average until the
    /// spilled part is read back or empties (then the count is exact again).
    pub fn drop_oldest(&mut self) -> bool {
        if self.pop_queue().is_some() {
            return true;
        }
        let s = &mut self.spill;
        if s.len == 0 || !matches!(self.journal, Journal::Changes(_)) {
            return false;
        }
        let average = s.bytes / s.len;
        s.len -= 1;
        s.bytes = if s.len == 0 { 0 } else { s.bytes - average };
        if s.len == 0 {
            s.since = None;
        }
        self.record(Change::Unqueued);
        true
    }

    pub(crate) fn pop_queue(&mut self) -> Option<Entry> {
        let m = self.queue.pop_front()?;
        self.queued_bytes -= m.message.payload.len();
        if let Journal::Changes(v) = &mut self.journal {
            // Queued and sent on at once: the store need not see it queued. (Not when
            // messages are spilled: the last one queued is one of those.)
            if self.queue.is_empty()
                && self.spill.len == 0
                && matches!(v.last(), Some(Change::Queued(_)))
            {
                v.pop();
            } else {
                v.push(Change::Unqueued);
            }
        }
        Some(m)
    }

    pub(crate) fn unpop_queue(&mut self, entry: Entry) {
        if matches!(self.journal, Journal::Changes(_)) {
            self.record(Change::Requeued(entry.clone()));
        }
        self.queued_bytes += entry.message.payload.len();
        self.queue.push_front(entry);
    }

    pub(crate) fn inbound(&self, id: PacketId) -> Option<InboundState> {
        self.inbound_qos2.get(&id).copied()
    }

    pub(crate) fn set_inbound(&mut self, id: PacketId, state: InboundState) {
        self.inbound_qos2.insert(id, state);
        self.record(Change::Inbound(id, state));
    }

    pub(crate) fn remove_inbound(&mut self, id: PacketId) -> Option<InboundState> {
        let state = self.inbound_qos2.remove(&id)?;
        self.record(Change::InboundDone(id));
        Some(state)
    }

    /// How many inbound QoS 2 ids wait for PUBREL.
    pub fn inbound_len(&self) -> usize {
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

    /// Puts `m` in flight under `id`, numbered as the engine numbers it.
    fn fly(s: &mut SessionState, id: PacketId, m: Message) -> MessageId {
        let e = s.entry(m, Instant::now());
        let n = e.id;
        s.insert_inflight(id, e);
        n
    }

    #[test]
    fn ids_wrap_from_65535_to_1_skipping_ids_in_flight() {
        let mut s = SessionState::new();
        s.last_id = 65_533;
        let a = s.allocate_id().unwrap();
        fly(&mut s, a, msg());
        assert_eq!(a.get(), 65_534);
        assert_eq!(s.allocate_id().unwrap().get(), 65_535);
        // 1 is in flight, so the wrap lands on 2.
        fly(&mut s, PacketId::new(1).unwrap(), msg());
        assert_eq!(s.allocate_id().unwrap().get(), 2);
    }

    #[test]
    fn send_order_survives_the_32_bit_send_counter_running_out() {
        let mut s = SessionState::new();
        s.next_seq = u32::MAX - 3;
        let named = |t: &str| Message::new(TopicName::new(t).unwrap(), "x", QoS::AtLeastOnce);
        // Ids deliberately out of send order, so the map's own order cannot pass for it.
        for (id, topic) in [(9, "a"), (3, "b"), (7, "c"), (1, "d"), (5, "e"), (2, "f")] {
            fly(&mut s, PacketId::new(id).unwrap(), named(topic));
        }
        s.remove_inflight(PacketId::new(7).unwrap());
        fly(&mut s, PacketId::new(4).unwrap(), named("g"));
        let order: Vec<String> = s.inflight().map(|f| f.message.topic.to_string()).collect();
        assert_eq!(order, ["a", "b", "d", "e", "f", "g"]);
        assert!(s.next_seq < 10, "renumbered from 0: {}", s.next_seq);
    }

    #[test]
    fn ids_in_flight_are_never_handed_out_again() {
        let mut s = SessionState::new();
        let mut held = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            let id = s.allocate_id().unwrap();
            assert!(held.insert(id), "{id} handed out twice while in flight");
            fly(&mut s, id, msg());
        }
    }

    #[test]
    fn exhaustion_is_an_error_not_a_panic() {
        let mut s = SessionState::new();
        for _ in 0..u16::MAX {
            let id = s.allocate_id().unwrap();
            fly(&mut s, id, msg());
        }
        assert_eq!(s.allocate_id(), Err(IdsExhausted));
        s.remove_inflight(PacketId::new(777).unwrap());
        assert_eq!(s.allocate_id().unwrap().get(), 777);
    }

    #[test]
    fn redeliverable_messages_are_qos1_in_flight_waiting_ones_and_unreceived_qos2_only_when_the_session_ends()
     {
        let named = |payload: &'static str, qos: QoS| {
            Message::new(TopicName::new("t").unwrap(), payload, qos)
        };
        // The caller's side map: which messages came through a shared subscription.
        let build = || {
            let mut shared = std::collections::HashSet::new();
            let mut s = SessionState::new();
            for (p, q) in [
                ("q1", QoS::AtLeastOnce),
                ("q2-sent", QoS::ExactlyOnce),
                ("q2-rec", QoS::ExactlyOnce),
            ] {
                let id = s.allocate_id().unwrap();
                shared.insert(fly(&mut s, id, named(p, q)));
            }
            let rec = s
                .inflight
                .values()
                .find(|f| f.message.payload == "q2-rec")
                .unwrap()
                .id;
            s.set_released(rec);
            let id = s.clone().allocate_id().unwrap();
            fly(&mut s, id, msg()); // not shared
            shared.insert(s.enqueue(named("waiting", QoS::ExactlyOnce), Instant::now()));
            s.enqueue(msg(), Instant::now());
            (s, shared)
        };
        let names = |v: Vec<Entry>| -> Vec<String> {
            v.iter()
                .map(|e| String::from_utf8(e.message.payload.to_vec()).unwrap())
                .collect()
        };
        let (mut live, shared) = build();
        assert_eq!(
            names(live.take_redeliverable(|id| shared.contains(&id), false)),
            ["q1", "waiting"]
        );
        assert_eq!(
            live.inflight_len(),
            3,
            "the QoS 2 flows and the unshared one stay"
        );
        assert_eq!(live.queued_len(), 1);
        let (mut ending, shared) = build();
        assert_eq!(
            names(ending.take_redeliverable(|id| shared.contains(&id), true)),
            ["q1", "q2-sent", "waiting"],
            "PUBREC received: never given to anyone else"
        );
    }
}
