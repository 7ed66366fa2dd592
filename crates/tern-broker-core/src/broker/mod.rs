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
    AckMode, Change, Changes, Config, Connection, Entry, Event, Message, MessageId, Role,
    SessionState, effective_qos,
};
use tern_store::{Op, PendingWill, SessionRecord, Subscription};

use super::{Member, SharedSubscriptions, SubscriptionTrie};
use crate::counters::{Counters, DropReason};
use crate::refusal::{Admission, Answer, Refusal};

mod admin;
mod beyond;
mod connect;
mod gauges;
mod history;
mod lifecycle;
mod moving;
mod persist;
mod round;
mod routing;
mod settings;
mod subscribe;
mod sys;
mod timers;

pub use admin::{
    AdminAction, InflightView, RetainedView, SessionSummary, SessionView, SessionsPage,
    SubscriptionView, WillView,
};
pub use gauges::{Gauges, SessionGauge};
pub use history::{POSITION, REPLAY_FROM, REPLAY_SINCE, parse_duration, since_time};
pub use moving::{MovedIn, Source};
pub use round::{Loads, Round, Sealed, Send};
pub use routing::{Forward, Interest, Remote, WillChange};

pub use settings::{
    DEFAULT_KEY_PROPERTY, Idempotency, QUEUED_MESSAGE_OVERHEAD, QueuePolicy, RECEIPT_PROPERTY,
    RECEIPT_ROUTED, RECEIPT_SETTLED, Settings, TopicPolicy,
};
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

struct Session {
    /// The durable round whose commit holds its creation (0: read from the store at
    /// start): until then, what the store has committed under its client id may be an
    /// earlier session's, numbered the same.
    born: u64,
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
    /// Who its client is to idempotency keys: `user:NAME`, or `client:ID` without a
    /// username (set at each connection).
    identity: Str,
    /// Start of the current one-second publish-rate window and PUBLISH packets in it.
    rate: (Instant, u32),
    /// When a full queue was last logged for this session (drops are counted always,
    /// logged at most every [`QUEUE_FULL_LOG_EVERY`]).
    queue_full_logged: Option<Instant>,
    /// The time of this session's live entry in [`Broker::timers`], if it has one.
    scheduled: Option<Instant>,
    /// Listed in `Broker::drain_due`: its engine has something to send.
    drain_due: bool,
    /// The broker's side map of the messages this session holds that came through a
    /// shared subscription: message id -> `$share/{group}/{filter}`, so that they can go to
    /// another member if this one leaves (§4.8.2). Empty (and unallocated) for most
    /// sessions; entries leave with their message.
    via_shared: HashMap<MessageId, Str>,
    /// Its queue's messages and payload bytes as counted in `Broker::queued`.
    accounted: (usize, usize),
    /// Its publishes held under `queue_policy = "block"`, in order (listed in
    /// `Broker::blocked` while there are any).
    parked: VecDeque<Parked>,
    /// The store holds this connection's will (`Op::PutWill`), to drop when it ends.
    will_stored: bool,
    /// A replay of topic history under way for one of its subscriptions.
    replay: Option<Box<history::Replay>>,
    /// Cluster: it moved here from another node and takes the QoS 1/2 messages that
    /// cross nodes from the cluster's stream ([`tern_store::Fed`]).
    fed: Option<Box<tern_store::Fed>>,
    /// Cluster: another node fetched it; it goes once the client is there.
    given: bool,
}

/// A publish held under [`QueuePolicy::Block`] until the queues it would overflow have
/// room.
struct Parked {
    message: Message,
    /// The packet id whose acknowledgement waits.
    ack: Option<tern_codec::PacketId>,
    /// When it is refused if it still does not fit.
    until: Instant,
}

/// How often a session's full queue is logged while it keeps dropping messages.
const QUEUE_FULL_LOG_EVERY: Duration = Duration::from_secs(10);

impl Session {
    /// When something of this session is next due: its connection's keep alive while
    /// online; its expiry or its delayed will while offline.
    fn deadline(&self) -> Option<Instant> {
        match &self.conn {
            Link::Online((_, c)) => {
                let parked = self.parked.front().map(|p| p.until);
                match (c.poll_timeout(), parked) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            Link::Offline(_) => {
                let will = self.pending_will.as_deref().map(|(at, _)| *at);
                match (self.expires_at, will) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
        }
    }

    /// The delivery changes since the last call, from the engine or the stored state.
    fn take_changes(&mut self) -> Option<Changes> {
        match &mut self.conn {
            Link::Online((_, c)) => c.take_changes(),
            Link::Offline(stored) => stored.take_changes(),
        }
    }

    /// The delivery state, from the engine or the stored state.
    fn state(&self) -> &SessionState {
        match &self.conn {
            Link::Online((_, c)) => c.session(),
            Link::Offline(stored) => stored,
        }
    }

    /// Forgets side-map entries whose message left the session other than through an
    /// event (expired in the queue, dropped by a queue limit). Walks the session, so only
    /// when something left and the map has entries.
    fn prune_via_shared(&mut self) {
        if !self.via_shared.is_empty() {
            let mut via = std::mem::take(&mut self.via_shared);
            let state = self.state();
            via.retain(|id, _| state.holds(*id));
            self.via_shared = via;
        }
    }

    /// Pairs messages taken for redelivery with the shared subscription each came
    /// through (their side-map entries go with them).
    fn with_shared_keys(&mut self, taken: Vec<Entry>) -> Vec<(Str, Message, MessageId)> {
        taken
            .into_iter()
            .filter_map(|e| Some((self.via_shared.remove(&e.id)?, e.message, e.id)))
            .collect()
    }

    /// Starts (`Some(known)`) or stops (`None`) the change journal of the session; a
    /// tracked session keeps `window` waiting messages in memory, the rest in the store.
    fn track(&mut self, known: Option<bool>, window: Option<usize>) {
        match (&mut self.conn, known) {
            (Link::Online((_, c)), Some(known)) => {
                c.track(known);
                c.set_window(window);
            }
            (Link::Online((_, c)), None) => c.untrack(),
            (Link::Offline(stored), Some(known)) => {
                stored.track(known);
                stored.set_window(window);
            }
            (Link::Offline(stored), None) => stored.untrack(),
        }
    }
}

/// A request to read a session's spilled messages back from the store (see
/// [`Settings::queue_window`]): up to `max` queued messages of `client_id` numbered above
/// `after`, in order, each with the shared subscription it came through, read once the
/// round it came with is committed and answered with [`Broker::handle_loaded`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    /// The session.
    pub client_id: Str,
    /// The broker's number for this load, given back with the answer.
    pub token: u64,
    /// Read messages numbered above this one.
    pub after: MessageId,
    /// At most this many.
    pub max: usize,
    /// Whether it may be read before its round's commit, from what is committed already
    /// ([`crate::Loads::early`]), once the round numbered `born` is committed (the
    /// session's creation; rounds are numbered from 1 in the order
    /// [`Broker::poll_round`] hands out durable ones): unless the session's queue may have
    /// lost spilled messages unread (drop-oldest), what is committed of it is then a
    /// prefix of what it waits for.
    pub early: bool,
    /// See `early`.
    pub born: u64,
    /// Not a queue but a part of the topic histories (a replay), read with
    /// `Store::read_history` and answered, as [`tern_store::QueuePart`] entries numbered by
    /// position ([`tern_store::history_entries`]), with [`Broker::handle_loaded`].
    pub history: Option<Box<tern_store::HistoryRead>>,
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

/// Who a client is to idempotency keys: its username, or its client id without one.
fn key_identity(client_id: &Str, username: Option<&Str>) -> Str {
    match username {
        Some(u) => Str::from(format!("user:{u}")),
        None => Str::from(format!("client:{client_id}")),
    }
}

/// The broker core.
pub struct Broker {
    settings: Settings,
    /// Durable changes of every input since the last [`Broker::take_ops`], in order.
    batch: Vec<Op>,
    /// Sessions whose delivery state may have changed in this input.
    touched: Vec<Str>,
    /// Loads asked for since the last round (handed out with it).
    loads: Vec<Load>,
    /// Connections whose CONNACK this round must wait for the commit although it resumes
    /// a session: their CONNECT carried a will, which is durable only once committed.
    connack_sealed: Vec<ConnId>,
    /// Durable rounds handed out so far.
    rounds: u64,
    /// The last load token handed out.
    last_load: u64,
    /// Sessions given messages in this input, drained when it ends.
    drain_due: Vec<Str>,
    /// The other half of `drain_due`'s double buffer (empty between inputs).
    drain_spare: Vec<Str>,
    /// One instant and the wall-clock time it corresponds to, both passed in: stored
    /// deadlines are wall-clock, the core's are monotonic.
    anchor: (Instant, SystemTime),
    /// Boxed: a `Session` is about 870 bytes, and the table's empty slots (up to half of
    /// them after it grows) would otherwise each hold one.
    sessions: HashMap<Str, Box<Session>>,
    /// Messages and payload bytes queued across all sessions (each session's share is its
    /// `accounted`, brought up to date when an input that touched it ends).
    queued: (usize, usize),
    /// Some session's queue got shorter, or subscriptions changed, in this input (held
    /// publishes may fit now).
    shrank: bool,
    /// Publishers with publishes held under `queue_policy = "block"`, oldest first.
    blocked: Vec<Str>,
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
    /// The wall-clock time of `resume`, in nanoseconds: part of assigned client ids.
    start_nanos: u128,
    /// What was delivered, dropped and why; the server reads them with the gauges.
    counters: Counters,
    sys: sys::Sys,
    acl: Option<std::sync::Arc<crate::acl::Acl>>,
    /// Idempotency keys remembered.
    keys: beyond::Keys,
    /// Settled receipts waiting for their copies.
    receipts: beyond::Receipts,
    /// The outcomes of the message being routed, while one that asked for a receipt is.
    tally: Option<beyond::Tally>,
    /// The settled receipt a copy handed to another shared-group member counts for.
    carry: Option<u64>,
    /// The topic histories' index.
    histories: history::Histories,
    /// Sessions with a replay under way (their live copies for the replayed filter wait).
    replaying: std::collections::HashSet<Str>,
    /// Cluster: messages for the other nodes, and interest changes, since the last take.
    forwards: Vec<Forward>,
    interest: Vec<Interest>,
    /// Cluster: QoS 1/2 messages of this node's clients forwarded, ever (committed with
    /// each round that forwards); and the client and packet id of the publish being routed.
    cluster_forwarded: u64,
    forwarded_at_start: u64,
    origin: Option<(Str, u16)>,
    /// Cluster: the message being routed came from another node (not forwarded again).
    from_remote: bool,
    /// Cluster: for the message from the cluster being routed, whether this node's
    /// (non-shared) subscribers get it, and the shared subscriptions the cluster gave it to
    /// this node for.
    remote_plain: bool,
    remote_shared: Vec<String>,
    /// Cluster: shared-group messages held for sessions given to other nodes (their only
    /// members here), by client id: handed back when the copy goes.
    held_for_given: HashMap<Str, Vec<(Str, Message)>>,
    /// Cluster: shared-group messages for the link to hand back to the cluster.
    handed_back: Vec<(Message, String)>,
    /// Cluster: wills of this node's connections, kept by the cluster while they last.
    will_changes: Vec<WillChange>,
    /// Cluster: the last sequence of the cluster's stream applied (committed), and one
    /// applied in this round, for the driver to acknowledge once committed.
    cluster_applied: u64,
    applied_now: Option<u64>,
    /// Cluster: a QoS 1/2 message was forwarded in this round (the round waits for it to
    /// be in the stream before its acknowledgements go out).
    forwarded_durable: bool,
    /// Cluster: client ids that connected here since the last take (the cluster learns
    /// that this node has them now).
    claims: Vec<Str>,
    /// Cluster: client ids to claim before their parked CONNECTs are answered, with the
    /// client table's revision their fetch read ([`Broker::take_claims_first`]).
    claims_first: Vec<(Str, u64)>,
    /// Cluster: the client whose parked CONNECT is being answered after its claim held
    /// (it needs no second claim).
    claimed: Option<Str>,
    /// Cluster: this node is cut off from NATS ([`Broker::handle_cut_off`]): it has closed
    /// its connections, leaving their wills to the cluster, and refuses new ones.
    cut_off: bool,
    /// Cluster: CONNECTs parked while their sessions are fetched from other nodes, by
    /// client id; the packets that followed each, by connection; ids to fetch since the
    /// last take.
    fetching: HashMap<Str, (ConnId, Box<Connect>)>,
    parked_conns: ConnMap<Vec<Packet>>,
    fetches: Vec<Str>,
    /// Cluster: while a moved session's missed messages are routed, the one session that
    /// gets them; and where the message being routed from the stream comes from.
    only: Option<Str>,
    source: Option<Source>,
    /// Cluster: a session fed from the stream ([`tern_store::Fed`]) has been here since
    /// the process started (this node reads its own messages back for such sessions).
    fed_here: bool,
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
            loads: Vec::new(),
            connack_sealed: Vec::new(),
            rounds: 0,
            // Tokens of one process never meet another's answers.
            last_load: wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            drain_due: Vec::new(),
            drain_spare: Vec::new(),
            anchor: (now, wall),
            sessions: HashMap::new(),
            queued: (0, 0),
            shrank: false,
            blocked: Vec::new(),
            conns: ConnMap::default(),
            peers: ConnMap::default(),
            trie: SubscriptionTrie::new(),
            shared: SharedSubscriptions::new(strategy),
            retained: snapshot.retained,
            outputs: VecDeque::new(),
            timers: BinaryHeap::new(),
            next_assigned: 0,
            start_nanos: wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
            counters: Counters::default(),
            sys: sys::Sys::default(),
            acl: None,
            keys: beyond::Keys::default(),
            receipts: beyond::Receipts::default(),
            tally: None,
            carry: None,
            histories: history::Histories::default(),
            replaying: std::collections::HashSet::new(),
            forwards: Vec::new(),
            interest: Vec::new(),
            from_remote: false,
            remote_plain: true,
            remote_shared: Vec::new(),
            held_for_given: HashMap::new(),
            handed_back: Vec::new(),
            will_changes: Vec::new(),
            cluster_applied: snapshot.cluster_applied,
            cluster_forwarded: snapshot.cluster_forwarded,
            forwarded_at_start: snapshot.cluster_forwarded,
            origin: None,
            applied_now: None,
            forwarded_durable: false,
            claims: Vec::new(),
            claims_first: Vec::new(),
            claimed: None,
            cut_off: false,
            fetching: HashMap::new(),
            parked_conns: ConnMap::default(),
            fetches: Vec::new(),
            only: None,
            source: None,
            fed_here: false,
        };
        broker.load_keys(snapshot.keys, now);
        broker.load_history(snapshot.history);
        // Shared-subscription messages of sessions whose connection was up when the process
        // died, to give to another member as a disconnect would have (§4.8.2).
        let mut redeliver: Vec<(Str, Str, Message)> = Vec::new();
        for (client_id, stored) in snapshot.sessions {
            broker.restore_session(client_id, stored, now, &mut redeliver);
        }
        if !redeliver.is_empty() {
            tracing::info!(
                messages = redeliver.len(),
                "shared-subscription messages of connections the crash ended go to other members"
            );
        }
        for (owner, key, m) in redeliver {
            broker.touch(&owner);
            broker.deliver_shared(&key, m, None, Some(&owner), now);
        }
        // The wills of the clients the crash disconnected: their connections ended without
        // DISCONNECT. Published now, or, with a Will Delay Interval, kept by their session
        // until it passes (unless the client is back first) [MQTT-3.1.3-9]; once: the
        // stored wills go in the first commit.
        let mut wills = Vec::new();
        for (owner, will) in snapshot.wills {
            broker.batch.push(Op::DeleteWill {
                client_id: owner.clone(),
            });
            // A cluster node's crash wills are the cluster's (it keeps them and publishes
            // them once, from whichever node claims them).
            if broker.settings.cluster {
                continue;
            }
            let delay = u64::from(will.properties.will_delay_interval.unwrap_or(0));
            match broker.sessions.get_mut(&owner) {
                Some(s) if delay > 0 => {
                    s.pending_will = Some(Box::new((now + Duration::from_secs(delay), will)));
                    broker.put_session(&owner);
                    broker.schedule(&owner);
                }
                s => wills.push((owner, s.and_then(|s| s.username.clone()), will)),
            }
        }
        if !wills.is_empty() {
            tracing::info!(
                wills = wills.len(),
                "wills of the connections the crash ended are published"
            );
        }
        for (owner, username, will) in wills {
            broker.publish_will(&owner, username.as_deref(), will, now);
        }
        // What that changed waits for the first round's commit.
        broker.commit(now);
        tracing::info!(
            sessions = broker.sessions.len(),
            retained = broker.retained.len(),
            "state loaded from the store"
        );
        broker
    }

    /// A session as a store held it, offline (its expiry and delayed will counting from
    /// their stored deadlines; one whose connection was up when the store was written
    /// counts as disconnected `now`), with its subscriptions in the trie; shared messages
    /// of such a connection go to `redeliver`, for another member.
    fn restore_session(
        &mut self,
        client_id: Str,
        stored: tern_store::StoredSession,
        now: Instant,
        redeliver: &mut Vec<(Str, Str, Message)>,
    ) {
        let r = stored.record;
        // No stored deadline: the session's connection was up at the crash.
        let was_online = r.expires_at.is_none();
        let mut subscriptions = BTreeMap::new();
        for sub in r.subscriptions {
            self.add_subscription(&client_id, &sub.filter, sub.options, sub.id);
            subscriptions.insert(sub.filter, (sub.options, sub.id));
        }
        let expires_at = match r.expires_at {
            Some(at) => self.instant(at),
            None => now + r.expiry,
        };
        // A cluster node's delayed wills are the cluster's after a crash (it keeps them
        // until they are due and publishes them once).
        let pending_will = r
            .pending_will
            .filter(|_| !self.settings.cluster)
            .map(|p| Box::new((self.instant(p.at), p.will)));
        let mut delivery = stored.delivery;
        // Ids whose PUBREC was never released belong to messages not accepted.
        delivery.drop_unreleased_inbound();
        delivery.track(true);
        // Offline: nothing queued in memory (a store that loads lazily kept it there).
        delivery.set_window(self.settings.queue_window);
        delivery.spill_all();
        let mut via_shared: HashMap<MessageId, Str> = stored.shared.into_iter().collect();
        if !via_shared.is_empty() {
            via_shared.retain(|id, _| delivery.holds(*id));
        }
        if was_online && !via_shared.is_empty() {
            let taken = delivery.take_redeliverable(|id| via_shared.contains_key(&id), false);
            for e in taken {
                if let Some(key) = via_shared.remove(&e.id) {
                    redeliver.push((client_id.clone(), key, e.message));
                }
            }
        }
        let accounted = (delivery.queued_len(), delivery.queued_bytes());
        let session = Session {
            born: 0,
            conn: Link::Offline(delivery),
            subscriptions,
            expiry: r.expiry,
            expires_at: Some(expires_at),
            will: None,
            pending_will,
            persisted: true,
            problem_info: true,
            touched: false,
            identity: key_identity(&client_id, r.username.as_ref()),
            username: r.username,
            rate: (now, 0),
            queue_full_logged: None,
            scheduled: None,
            drain_due: false,
            accounted,
            via_shared,
            parked: VecDeque::new(),
            will_stored: false,
            replay: None,
            fed: r.fed.map(Box::new),
            given: false,
        };
        self.fed_here |= session.fed.is_some();
        self.queued.0 += session.accounted.0;
        self.queued.1 += session.accounted.1;
        self.sessions.insert(client_id.clone(), Box::new(session));
        self.schedule(&client_id);
    }

    /// Puts `acl` in force (`None`: everything allowed), from the next packet on; a
    /// reload (SIGHUP) replaces it without touching connections or subscriptions.
    pub fn set_acl(&mut self, acl: Option<std::sync::Arc<crate::acl::Acl>>) {
        self.acl = acl;
    }

    /// Puts topic policies in force (a reload): messages accepted from now on follow
    /// them; what is queued already stays.
    pub fn set_topic_policies(&mut self, topics: std::sync::Arc<[TopicPolicy]>) {
        self.settings.topics = topics;
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

    /// The next thing the server must do; the driver takes them a round at a time
    /// ([`Broker::poll_round`]).
    pub(crate) fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
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
        // Behind a CONNECT parked while its session is fetched from another node.
        let packet = if self.parked_conns.is_empty() {
            packet
        } else {
            match self.park_packet(conn, packet) {
                Ok(()) => return,
                Err(p) => p,
            }
        };
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
            self.commit(now);
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
        self.commit(now);
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
        self.commit(now);
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
