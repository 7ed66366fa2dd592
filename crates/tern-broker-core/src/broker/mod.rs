//! The broker's state machine: connections in, packets and closes out. No sockets, no
//! clock: the server feeds it decoded packets, socket closes and the time, and writes what
//! [`Broker::poll_output`] returns.
//!
//! One [`tern_proto::Connection`] per connected session runs the QoS flows; the broker does
//! what is above them: the CONNECT handshake, sessions that outlive connections, routing
//! through the [`SubscriptionTrie`], retained messages and wills.
//!
//! Every change to durable state (sessions, subscriptions, offline queues, delivery state
//! at disconnect, delayed wills, retained messages) becomes a [`tern_store::Op`]; the
//! driver takes them with [`Broker::take_ops`] and commits them before it writes the
//! outputs produced with them. A new broker resumed from what the store holds
//! ([`Broker::resume`]) carries on from there.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::fmt::Display;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant, SystemTime};

use tern_codec::properties::ConnAckProperties;
use tern_codec::{
    ConnAck, Connect, DecodeError, LastWill, Packet, Protocol, QoS, ReasonCode, RetainHandling,
    Str, SubAck, Subscribe, SubscriptionId, SubscriptionOptions, TopicFilter, TopicName, UnsubAck,
    Unsubscribe,
};
use tern_proto::{
    AckMode, Changes, Config, Connection, Event, Message, Role, SessionState, effective_qos,
};
use tern_store::{Op, PendingWill, SessionRecord, Subscription};

use super::{Member, SharedStrategy, SharedSubscriptions, SubscriptionTrie};
use crate::counters::{Counters, DropReason};
use crate::refusal::{Admission, Refusal};

mod connect;
mod routing;
mod subscribe;
mod sys;

pub use sys::Traffic;

/// Identifies one network connection for the lifetime of the process.
pub type ConnId = u64;

/// A map keyed by [`ConnId`]. Connection ids are handed out by the server in sequence,
/// never chosen by a client, so they need no flood-resistant hash: a multiplication
/// spreads them (SipHash, the default, was a visible share of each message's routing).
/// Maps keyed by what clients send (client ids, topic levels) keep SipHash.
pub type ConnMap<V> = HashMap<ConnId, V, BuildHasherDefault<ConnIdHasher>>;

/// The hasher of [`ConnMap`]: Fibonacci hashing of the id.
#[derive(Default)]
pub struct ConnIdHasher(u64);

impl Hasher for ConnIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; this keeps any other use correct.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = (self.0 ^ id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// What the server must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Write this packet to the connection (in the connection's protocol version).
    Send(ConnId, Packet),
    /// Close the connection once what was sent before is written.
    Close(ConnId),
}

/// What to do when an offline session's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueuePolicy {
    /// Drop the oldest queued message to make room.
    DropOldest,
    /// Drop the message that does not fit.
    DropNewest,
    /// Refuse the publish: a QoS 1/2 message that would not fit in the queue of an
    /// offline session it matches is routed nowhere, and its publisher gets PUBACK/PUBREC
    /// 0x97 Quota exceeded (5.0) or has its connection closed (3.x, which has no reason
    /// codes), so it can try again later. QoS 0 that does not fit is dropped.
    Reject,
}

/// Broker settings the core needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Most QoS 1/2 messages queued for one offline session.
    pub max_queued_messages: usize,
    /// Most payload bytes queued for one offline session.
    pub max_queued_bytes: usize,
    /// Which message goes when a queue is full.
    pub queue_policy: QueuePolicy,
    /// Longest a message waits in an offline queue; older ones are dropped (as expired)
    /// instead of delivered. Applied as a Message Expiry Interval when the message is
    /// queued, so a 5.0 subscriber sees the time it had left.
    pub max_queued_age: Option<Duration>,
    /// Whether QoS 0 messages are queued for offline sessions too (within the same
    /// limits). Off by default, like Mosquitto's `queue_qos0_messages`.
    pub queue_qos0: bool,
    /// QoS 1/2 messages a client may have unacknowledged towards us (5.0 Receive Maximum).
    pub receive_maximum: u16,
    /// Topic aliases a client may use towards us.
    pub topic_alias_maximum: u16,
    /// Outbound window for 3.x clients.
    pub window_3x: u16,
    /// Longest a 3.x persistent session (clean session 0) is kept after disconnect.
    pub max_session_expiry_3x: Duration,
    /// How long a new connection may take to send CONNECT before it is closed.
    pub connect_timeout: Duration,
    /// Highest QoS clients may publish at and be granted (5.0 Maximum QoS).
    pub maximum_qos: QoS,
    /// Whether retained messages are supported (5.0 Retain Available).
    pub retain_available: bool,
    /// Largest packet a client may send us (5.0 Maximum Packet Size); larger is 0x95.
    pub max_packet_size: u32,
    /// Longest keep alive a client may ask for: 5.0 clients asking more (or 0) are told
    /// this as Server Keep Alive; 3.x clients asking more are refused (return code 2),
    /// as Mosquitto does.
    pub max_keep_alive: u16,
    /// Response Information sent to 5.0 clients that request it.
    pub response_information: Option<String>,
    /// How a shared subscription group picks the member for a message.
    pub shared_strategy: SharedStrategy,
    /// Send every client elsewhere: 5.0 CONNACK 0x9C Use another server (0x9D Server
    /// moved if `server_moved`) with this Server Reference; 3.x gets return code 3.
    pub server_reference: Option<String>,
    /// Whether [`Settings::server_reference`] is permanent (0x9D) or not (0x9C).
    pub server_moved: bool,
    /// Longest topic name or filter, in bytes, a client may use (the share name excluded).
    pub max_topic_length: usize,
    /// Most levels (`/`-separated) in a topic name or filter a client may use.
    pub max_topic_levels: usize,
    /// Most subscriptions one session may hold; more are refused (0x97 Quota exceeded).
    pub max_subscriptions: usize,
    /// Most PUBLISH packets a client may send per second; above it 5.0 clients get 0x96
    /// Message rate too high (in the acknowledgement, or a DISCONNECT at QoS 0), 3.x
    /// clients are disconnected. `None`: no limit.
    pub max_publish_rate: Option<u32>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_queued_messages: 1000,
            max_queued_bytes: 16 << 20,
            queue_policy: QueuePolicy::DropOldest,
            max_queued_age: None,
            queue_qos0: false,
            receive_maximum: 100,
            topic_alias_maximum: 10,
            window_3x: 32,
            max_session_expiry_3x: Duration::from_secs(u64::from(u32::MAX)),
            connect_timeout: Duration::from_secs(10),
            maximum_qos: QoS::ExactlyOnce,
            retain_available: true,
            max_packet_size: tern_codec::MAX_PACKET_SIZE,
            max_keep_alive: u16::MAX,
            response_information: None,
            shared_strategy: SharedStrategy::RoundRobin,
            server_reference: None,
            server_moved: false,
            max_topic_length: 65_535,
            max_topic_levels: 128,
            max_subscriptions: 10_000,
            max_publish_rate: None,
        }
    }
}

struct Session {
    /// The live connection, or the durable state while no connection is up.
    conn: Link,
    subscriptions: BTreeMap<TopicFilter, (SubscriptionOptions, Option<SubscriptionId>)>,
    /// How long the session outlives its connection; zero ends it with the connection.
    expiry: Duration,
    /// When an offline session ends.
    expires_at: Option<Instant>,
    will: Option<Box<LastWill>>,
    /// A will waiting out its Will Delay Interval after the connection ended.
    pending_will: Option<Box<(Instant, LastWill)>>,
    /// Whether the store holds this session. Sessions that end with their connection
    /// (expiry zero) are never written.
    persisted: bool,
    /// 5.0 Request Problem Information: whether Reason Strings may go on acknowledgements.
    problem_info: bool,
    /// Listed in `Broker::touched`: its delivery state may have changed in this input.
    touched: bool,
    /// The username of its last connection, for the ACL.
    username: Option<Str>,
    /// Start of the current one-second publish-rate window and PUBLISH packets in it.
    rate: (Instant, u32),
    /// When a full queue was last logged for this session (drops are counted always,
    /// logged at most every [`QUEUE_FULL_LOG_EVERY`]).
    queue_full_logged: Option<Instant>,
    /// The time of this session's live entry in [`Broker::timers`], if it has one.
    scheduled: Option<Instant>,
}

/// How often a session's full queue is logged while it keeps dropping messages.
const QUEUE_FULL_LOG_EVERY: Duration = Duration::from_secs(10);

impl Session {
    /// When something of this session is next due: its connection's keep alive while
    /// online; its expiry or its delayed will while offline.
    fn deadline(&self) -> Option<Instant> {
        match &self.conn {
            Link::Online((_, c)) => c.poll_timeout(),
            Link::Offline(_) => {
                let will = self.pending_will.as_deref().map(|(at, _)| *at);
                match (self.expires_at, will) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
        }
    }

    fn state_mut(&mut self) -> &mut SessionState {
        match &mut self.conn {
            Link::Online((_, c)) => c.session_mut(),
            Link::Offline(stored) => stored,
        }
    }
}

/// A session's live connection, whose engine holds the delivery state, or that state on
/// its own while the client is away. One or the other, never both: an online session
/// does not also carry an empty offline state (every idle connection would pay for it).
/// The size difference is the point: the session itself is boxed, and boxing the
/// connection too would cost every online session an allocation.
#[allow(clippy::large_enum_variant)]
enum Link {
    Offline(SessionState),
    Online((ConnId, Connection)),
}

impl Link {
    fn as_ref(&self) -> Option<&(ConnId, Connection)> {
        match self {
            Link::Online(c) => Some(c),
            Link::Offline(_) => None,
        }
    }

    fn as_mut(&mut self) -> Option<&mut (ConnId, Connection)> {
        match self {
            Link::Online(c) => Some(c),
            Link::Offline(_) => None,
        }
    }

    /// Takes the connection, if any, leaving an empty offline state for the caller to
    /// replace with the connection's.
    fn take(&mut self) -> Option<(ConnId, Connection)> {
        match std::mem::replace(self, Link::Offline(SessionState::new())) {
            Link::Online(c) => Some(c),
            offline => {
                *self = offline;
                None
            }
        }
    }

    /// The state kept while offline (empty while online).
    fn take_stored(&mut self) -> SessionState {
        match self {
            Link::Offline(stored) => std::mem::take(stored),
            Link::Online(_) => SessionState::new(),
        }
    }
}

/// A snapshot of the broker's state for metrics ([`Broker::gauges`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Sessions with a connection up.
    pub online: usize,
    /// Sessions kept while their client is away.
    pub offline: usize,
    /// Subscriptions over all sessions.
    pub subscriptions: usize,
    /// Retained messages (`$SYS` excluded).
    pub retained: usize,
    /// Messages waiting in session queues.
    pub queued: usize,
    /// Their payload bytes.
    pub queued_bytes: usize,
    /// Age of the oldest queued message.
    pub oldest: Duration,
    /// Outbound QoS 1/2 flows not yet complete.
    pub inflight_out: usize,
    /// Inbound QoS 2 flows waiting for PUBREL.
    pub inflight_in: usize,
    /// The sessions with the deepest queues, deepest first.
    pub largest: Vec<SessionGauge>,
    /// The core's counters at the same moment.
    pub counters: Counters,
}

/// One session's queue in [`Gauges`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionGauge {
    /// Its client.
    pub client_id: Str,
    /// Messages queued.
    pub queued: usize,
    /// Age of the oldest.
    pub oldest: Duration,
}

/// The broker core.
pub struct Broker {
    settings: Settings,
    /// Durable changes of every input since the last [`Broker::take_ops`], in order.
    batch: Vec<Op>,
    /// Sessions whose delivery state may have changed in this input.
    touched: Vec<Str>,
    /// One instant and the wall-clock time it corresponds to, both passed in: stored
    /// deadlines are wall-clock, the core's are monotonic.
    anchor: (Instant, SystemTime),
    /// Boxed: a `Session` is about 870 bytes, and the table's empty slots (up to half of
    /// them after it grows) would otherwise each hold one.
    sessions: HashMap<Str, Box<Session>>,
    /// Connections that completed CONNECT, to their client id.
    conns: ConnMap<Str>,
    /// Peer address of each open connection, for the logs.
    peers: ConnMap<Box<str>>,
    trie: SubscriptionTrie<Str>,
    shared: SharedSubscriptions,
    retained: BTreeMap<TopicName, Message>,
    outputs: VecDeque<Output>,
    /// Sessions by when something of theirs is due, earliest first. Lazy: a deadline
    /// that moves later (a keep alive renewed by every packet) is not updated here; its
    /// entry fires, finds nothing due and is put back at the new time. An entry whose
    /// time is not its session's `scheduled` was replaced by an earlier one and is
    /// skipped. Only due sessions are touched, whatever the number of sessions.
    timers: BinaryHeap<Reverse<(Instant, Str)>>,
    next_assigned: u64,
    /// What was delivered, dropped and why; the server reads them with the gauges.
    counters: Counters,
    sys: sys::Sys,
    acl: Option<std::sync::Arc<crate::acl::Acl>>,
}

impl Broker {
    /// A broker resuming what a store held (`snapshot`): sessions (offline, their expiry
    /// and delayed wills counting from their stored deadlines; a session whose connection
    /// was up when the store was last written counts as disconnected `now`),
    /// subscriptions, queues and retained messages. `now` and `wall` are the same moment
    /// on the monotonic and the wall clock.
    ///
    /// The broker commits nothing itself: the ops of each input wait for
    /// [`Broker::take_ops`], and the driver must write them before it hands out the
    /// outputs produced with them (persist, then acknowledge).
    pub fn resume(
        settings: Settings,
        snapshot: tern_store::Snapshot,
        now: Instant,
        wall: SystemTime,
    ) -> Broker {
        let strategy = settings.shared_strategy;
        let mut broker = Broker {
            settings,
            batch: Vec::new(),
            touched: Vec::new(),
            anchor: (now, wall),
            sessions: HashMap::new(),
            conns: ConnMap::default(),
            peers: ConnMap::default(),
            trie: SubscriptionTrie::new(),
            shared: SharedSubscriptions::new(strategy),
            retained: snapshot.retained,
            outputs: VecDeque::new(),
            timers: BinaryHeap::new(),
            next_assigned: 0,
            counters: Counters::default(),
            sys: sys::Sys::default(),
            acl: None,
        };
        for (client_id, stored) in snapshot.sessions {
            let r = stored.record;
            let mut subscriptions = BTreeMap::new();
            for sub in r.subscriptions {
                broker.add_subscription(&client_id, &sub.filter, sub.options, sub.id);
                subscriptions.insert(sub.filter, (sub.options, sub.id));
            }
            let expires_at = match r.expires_at {
                Some(at) => broker.instant(at),
                None => now + r.expiry,
            };
            let pending_will = r
                .pending_will
                .map(|p| Box::new((broker.instant(p.at), p.will)));
            let mut delivery = stored.delivery;
            // Ids whose PUBREC was never released belong to messages not accepted.
            delivery.drop_unreleased_inbound();
            delivery.track(true);
            let session = Session {
                conn: Link::Offline(delivery),
                subscriptions,
                expiry: r.expiry,
                expires_at: Some(expires_at),
                will: None,
                pending_will,
                persisted: true,
                problem_info: true,
                touched: false,
                username: r.username,
                rate: (now, 0),
                queue_full_logged: None,
                scheduled: None,
            };
            broker.sessions.insert(client_id.clone(), Box::new(session));
            broker.schedule(&client_id);
        }
        tracing::info!(
            sessions = broker.sessions.len(),
            retained = broker.retained.len(),
            "state loaded from the store"
        );
        broker
    }

    /// Puts `acl` in force (`None`: everything allowed), from the next packet on; a
    /// reload (SIGHUP) replaces it without touching connections or subscriptions.
    pub fn set_acl(&mut self, acl: Option<std::sync::Arc<crate::acl::Acl>>) {
        self.acl = acl;
    }

    /// Publishes, subscriptions, deliveries and wills the ACL refused so far.
    pub fn denied(&self) -> u64 {
        self.counters.dropped(DropReason::NotAuthorized) + self.counters.subscriptions_denied
    }

    /// What this broker has counted.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Counts on from `counters` (those of the broker this one replaces, so that the
    /// exported counters never go back).
    pub fn set_counters(&mut self, counters: Counters) {
        self.counters = counters;
    }

    /// Whether the session's client may do `permission` on `topic` (no ACL: yes).
    fn permits(
        &self,
        client_id: &Str,
        permission: crate::acl::Permission,
        topic: &TopicName,
    ) -> bool {
        let Some(acl) = &self.acl else { return true };
        let username = self
            .sessions
            .get(client_id)
            .and_then(|s| s.username.as_deref());
        acl.allows(client_id, username, permission, topic)
    }

    /// The durable changes made since the last call, in order, as one batch. Outputs
    /// polled since then must not be written before these ops are committed.
    pub fn take_ops(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.batch)
    }

    fn wall(&self, t: Instant) -> SystemTime {
        match t.checked_duration_since(self.anchor.0) {
            Some(d) => self.anchor.1 + d,
            None => self.anchor.1 - self.anchor.0.duration_since(t),
        }
    }

    fn instant(&self, t: SystemTime) -> Instant {
        match t.duration_since(self.anchor.1) {
            Ok(d) => self.anchor.0 + d,
            // In the past: due now (an Instant cannot go before the process started).
            Err(_) => self.anchor.0,
        }
    }

    /// Notes that the session's delivery state may change in this input.
    fn touch(&mut self, client_id: &Str) {
        if let Some(s) = self.sessions.get_mut(client_id)
            && !s.touched
        {
            s.touched = true;
            self.touched.push(client_id.clone());
        }
    }

    /// Collects the recorded delivery changes of the sessions this input touched.
    fn collect_changes(&mut self) {
        for client_id in std::mem::take(&mut self.touched) {
            let Some(s) = self.sessions.get_mut(&client_id) else {
                continue;
            };
            s.touched = false;
            match s.state_mut().take_changes() {
                None => {}
                Some(Changes::Some(changes)) => {
                    self.batch
                        .extend(changes.into_iter().map(|change| Op::Change {
                            client_id: client_id.clone(),
                            change,
                        }));
                }
                Some(Changes::All(state)) => self.batch.push(Op::PutDelivery {
                    client_id: client_id.clone(),
                    state,
                }),
            }
        }
    }

    /// Ends an input: the delivery changes it made join its ops.
    fn commit(&mut self) {
        self.collect_changes();
    }

    /// Writes the session's record (expiry, subscriptions, delayed will).
    fn put_session(&mut self, client_id: &Str) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        if s.expiry.is_zero() {
            if s.persisted {
                s.persisted = false;
                s.state_mut().untrack();
                self.batch.push(Op::DeleteSession {
                    client_id: client_id.clone(),
                });
            }
            return;
        }
        if !s.persisted {
            // From now on the store follows its delivery state, starting with all of it.
            s.persisted = true;
            s.state_mut().track(false);
            self.touch(client_id);
        }
        let s = &self.sessions[client_id];
        let record = SessionRecord {
            expiry: s.expiry,
            expires_at: s.expires_at.map(|t| self.wall(t)),
            subscriptions: s
                .subscriptions
                .iter()
                .map(|(filter, (options, id))| Subscription {
                    filter: filter.clone(),
                    options: *options,
                    id: *id,
                })
                .collect(),
            pending_will: s.pending_will.as_deref().map(|(at, will)| PendingWill {
                at: self.wall(*at),
                will: will.clone(),
            }),
            username: s.username.clone(),
        };
        self.batch.push(Op::PutSession {
            client_id: client_id.clone(),
            record,
        });
    }

    /// The next thing the server must do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The live delivery state of a session (in flight, queued, inbound QoS 2 ids).
    pub fn session_state(&self, client_id: &str) -> Option<&SessionState> {
        let s = self.sessions.get(client_id)?;
        Some(match &s.conn {
            Link::Online((_, c)) => c.session(),
            Link::Offline(stored) => stored,
        })
    }

    /// How many sessions exist (online and offline).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Messages dropped because an offline queue was full (or refused for it).
    pub fn dropped_count(&self) -> u64 {
        self.counters.dropped(DropReason::QueueFull) + self.counters.dropped(DropReason::Quota)
    }

    /// Messages dropped because their Message Expiry Interval passed before delivery.
    pub fn dropped_expired(&self) -> u64 {
        self.counters.dropped(DropReason::Expired)
    }

    /// Messages not sent to a client because they exceed its Maximum Packet Size.
    pub fn dropped_too_large(&self) -> u64 {
        self.counters.dropped(DropReason::TooLarge)
    }

    /// Sessions, subscriptions, queues and flows as they are at `now`, with the `top`
    /// sessions whose queues are deepest.
    pub fn gauges(&self, now: Instant, top: usize) -> Gauges {
        let mut g = Gauges::default();
        let mut largest: Vec<SessionGauge> = Vec::new();
        for (client_id, s) in &self.sessions {
            let state = match &s.conn {
                Link::Online((_, c)) => {
                    g.online += 1;
                    c.session()
                }
                Link::Offline(stored) => {
                    g.offline += 1;
                    stored
                }
            };
            g.subscriptions += s.subscriptions.len();
            g.inflight_out += state.inflight_len();
            g.inflight_in += state.inbound_len();
            let queued = state.queued_len();
            if queued == 0 {
                continue;
            }
            g.queued += queued;
            g.queued_bytes += state.queued_bytes();
            // The queue is in arrival order; messages loaded from the store count from
            // the broker's start.
            let oldest = state
                .queued()
                .next()
                .map(|m| now.saturating_duration_since(m.queued_at.unwrap_or(self.anchor.0)))
                .unwrap_or_default();
            g.oldest = g.oldest.max(oldest);
            largest.push(SessionGauge {
                client_id: client_id.clone(),
                queued,
                oldest,
            });
        }
        largest.sort_by(|a, b| b.queued.cmp(&a.queued).then(a.client_id.cmp(&b.client_id)));
        largest.truncate(top);
        g.largest = largest;
        g.counters = self.counters.clone();
        // The broker's own $SYS messages are not counted.
        g.retained = self.retained.keys().filter(|t| !routing::is_sys(t)).count();
        g
    }

    /// Retained messages held.
    pub fn retained_count(&self) -> usize {
        self.retained.len()
    }

    /// A new connection from `peer` (its address, for the logs; optional).
    pub fn handle_accepted(&mut self, conn: ConnId, peer: &dyn Display) {
        self.peers.insert(conn, peer.to_string().into_boxed_str());
    }

    fn peer(&self, conn: ConnId) -> &str {
        self.peers.get(&conn).map_or("-", |p| p)
    }

    /// A packet decoded from `conn`.
    pub fn handle_packet(&mut self, conn: ConnId, packet: Packet, now: Instant) {
        let Some(client_id) = self.conns.get(&conn).cloned() else {
            match packet {
                Packet::Connect(c) => {
                    self.handle_connect(conn, *c, now);
                    let online = self.conns.len() as u64;
                    self.counters.clients_maximum = self.counters.clients_maximum.max(online);
                }
                // [MQTT-3.1.0-1]: the first packet must be CONNECT.
                _ => self.outputs.push_back(Output::Close(conn)),
            }
            self.commit();
            return;
        };
        let Some(session) = self.sessions.get_mut(&client_id) else {
            return;
        };
        let Some((_, connection)) = session.conn.as_mut() else {
            return;
        };
        // Protocol errors close the connection; the engine queued the DISCONNECT already.
        let duplicates = connection.duplicates_suppressed();
        let _ = connection.handle_packet(packet, now);
        let suppressed = connection.duplicates_suppressed() - duplicates;
        if suppressed > 0 {
            self.counters.qos2_duplicates += suppressed;
        }
        self.touch(&client_id);
        self.drain(&client_id, now);
        self.commit();
    }

    /// Bytes from `conn` that do not decode. Before CONNECT the version is unknown, so a
    /// 5.0-style CONNACK goes out only for errors in a 5.0 CONNECT the server could tell.
    pub fn handle_decode_error(
        &mut self,
        conn: ConnId,
        protocol: Option<Protocol>,
        error: &DecodeError,
        now: Instant,
    ) {
        let reason = error.reason_code();
        match self.conns.get(&conn).cloned() {
            Some(client_id) => {
                if let Some(Session {
                    conn: Link::Online((_, c)),
                    ..
                }) = self.sessions.get_mut(&client_id).map(|s| &mut **s)
                {
                    c.disconnect(reason);
                }
                self.drain(&client_id, now);
                self.close(conn, now, &format_args!("malformed packet: {error}"));
            }
            None => {
                tracing::info!(conn, peer = %self.peer(conn), %error, "refused before CONNECT");
                match (protocol, error) {
                    (
                        _,
                        DecodeError::UnsupportedProtocolLevel(_) | DecodeError::InvalidProtocolName,
                    ) => {
                        // 3.1.1 return code 1 reads as 0x84 in 5.0; send the 3.x form, which
                        // every version understands [MQTT-3.1.2-2].
                        let refusal = Refusal::UnsupportedProtocolVersion;
                        self.refuse_before_connect(conn, Protocol::V3_1_1, refusal);
                    }
                    (Some(Protocol::V5), _) => {
                        self.refuse_before_connect(conn, Protocol::V5, Refusal::Malformed(reason));
                    }
                    _ => self.outputs.push_back(Output::Close(conn)),
                }
            }
        }
        self.commit();
    }

    /// The socket of `conn` closed (or is being closed). Publishes the will unless the
    /// client disconnected normally, and ends or parks the session.
    pub fn handle_closed(&mut self, conn: ConnId, now: Instant) {
        self.close(conn, now, &"connection closed by the peer or lost");
        self.peers.remove(&conn);
        self.commit();
    }

    /// Ends the connection's part in its session; `why` goes to the log.
    fn close(&mut self, conn: ConnId, now: Instant, why: &dyn Display) {
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
        let protocol = connection.config().protocol;
        let mut stored = connection.into_session();
        // Messages refused without their PUBREC: a resend is a new message.
        stored.drop_unreleased_inbound();
        // What this member of shared subscriptions has not acknowledged goes to another
        // member now, rather than waiting for it to come back (§4.8.2).
        let redeliver = stored.take_redeliverable(|m| m.shared.is_some(), false);
        session.conn = Link::Offline(stored);
        tracing::info!(conn, peer = %self.peer(conn), client_id = %client_id, %protocol, reason = %why, "disconnected");
        for m in redeliver {
            let key = m.shared.clone().expect("taken for having one");
            self.deliver_shared(&key, m, None, Some(&client_id), now);
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
                // unless the client reconnects in time [MQTT-3.1.3-9].
                session.pending_will = Some(Box::new((now + Duration::from_secs(delay), *will)));
            }
        }
        self.park(&client_id, now);
    }

    /// A session whose connection just ended: it ends too (expiry zero), or waits offline
    /// with its deadline and delivery state written to the store.
    fn park(&mut self, client_id: &Str, now: Instant) {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return;
        };
        if session.expiry.is_zero() {
            self.end_session(client_id, now);
        } else {
            session.expires_at = Some(now + session.expiry);
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
            self.touch(&client_id);
            self.park(&client_id, now);
        }
        self.commit();
    }

    /// When [`Broker::handle_timeout`] must next be called, if ever: the earliest keep
    /// alive, session expiry or will delay of any session.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        // Entries replaced by earlier ones would only wake the driver for nothing.
        while let Some(Reverse((at, client_id))) = self.timers.peek() {
            match self.sessions.get(client_id) {
                Some(s) if s.scheduled == Some(*at) => return Some(*at),
                _ => {
                    self.timers.pop();
                }
            }
        }
        None
    }

    /// Timers: whatever is due at `now` (keep alive of connections, expiry of offline
    /// sessions, delayed wills); sessions with nothing due are not looked at.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((at, _))) = self.timers.peek()
            && *at <= now
        {
            let Some(Reverse((at, client_id))) = self.timers.pop() else {
                break;
            };
            match self.sessions.get_mut(&client_id) {
                Some(s) if s.scheduled == Some(at) => s.scheduled = None,
                _ => continue,
            }
            self.session_timeout(&client_id, now);
            self.schedule(&client_id);
        }
        self.commit();
    }

    /// Puts the session in [`Broker::timers`] if what it has due is earlier than its
    /// entry there (or it has none).
    fn schedule(&mut self, client_id: &Str) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        let Some(due) = s.deadline() else { return };
        if s.scheduled.is_some_and(|at| at <= due) {
            return;
        }
        s.scheduled = Some(due);
        self.timers.push(Reverse((due, client_id.clone())));
    }

    /// One session's timers at `now`.
    fn session_timeout(&mut self, client_id: &Str, now: Instant) {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return;
        };
        if let Some((_, c)) = session.conn.as_mut() {
            c.handle_timeout(now);
            self.drain(client_id, now);
        } else if session.expires_at.is_some_and(|at| now >= at) {
            self.counters.sessions_expired += 1;
            self.end_session(client_id, now);
        } else if session
            .pending_will
            .as_deref()
            .is_some_and(|(at, _)| now >= *at)
        {
            let Some((_, will)) = session.pending_will.take().map(|p| *p) else {
                return;
            };
            let username = session.username.clone();
            self.put_session(client_id);
            self.publish_will(client_id, username.as_deref(), will, now);
        }
    }

    /// Moves what the session's engine produced into outputs and acts on its events.
    fn drain(&mut self, client_id: &Str, now: Instant) {
        loop {
            let Some(session) = self.sessions.get_mut(client_id) else {
                return;
            };
            let Some((conn, c)) = session.conn.as_mut() else {
                return;
            };
            let conn = *conn;
            while let Some(p) = c.poll_transmit(now) {
                self.outputs.push_back(Output::Send(conn, p));
            }
            let Some(event) = c.poll_event() else { return };
            match event {
                Event::Message { message, ack } => {
                    if !self.accept(client_id, message, ack, now) {
                        return;
                    }
                }
                Event::Control(Packet::Subscribe(s)) => self.subscribe(client_id, s, now),
                Event::Control(Packet::Unsubscribe(u)) => self.unsubscribe(client_id, u),
                Event::Dropped { reason, message } => match reason {
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
    fn kick(&mut self, client_id: &Str, reason: ReasonCode, now: Instant) {
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

    fn end_session(&mut self, client_id: &Str, now: Instant) {
        if let Some(mut s) = self.sessions.remove(client_id) {
            // Shared-subscription messages the session still held go to another member
            // (§4.8.2): with the session gone, nobody else can complete them.
            let redeliver = s
                .conn
                .take_stored()
                .take_redeliverable(|m| m.shared.is_some(), true);
            if s.persisted {
                self.batch.push(Op::DeleteSession {
                    client_id: client_id.clone(),
                });
            }
            for filter in s.subscriptions.keys() {
                self.remove_subscription(client_id, filter);
            }
            for m in redeliver {
                let key = m.shared.clone().expect("taken for having one");
                self.deliver_shared(&key, m, None, None, now);
            }
            if let Some((_, will)) = s.pending_will.map(|p| *p) {
                self.publish_will(client_id, s.username.as_deref(), will, now);
            }
        }
    }
}

#[cfg(test)]
mod conn_map_tests {
    use std::hash::BuildHasher;

    use super::*;

    #[test]
    fn sequential_connection_ids_hash_apart_in_both_the_bucket_and_the_tag_bits() {
        let build = BuildHasherDefault::<ConnIdHasher>::default();
        let hashes: Vec<u64> = (0..10_000u64).map(|id| build.hash_one(id)).collect();
        let distinct: std::collections::HashSet<u64> = hashes.iter().copied().collect();
        assert_eq!(distinct.len(), hashes.len(), "no two ids share a hash");
        // hashbrown takes buckets from the low bits and its 7-bit tags from the top ones.
        let buckets: std::collections::HashSet<u64> = hashes.iter().map(|h| h & 1023).collect();
        let tags: std::collections::HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        assert!(buckets.len() > 900, "low bits spread: {}", buckets.len());
        assert_eq!(tags.len(), 128, "every tag value is used");
    }
}
