//! The broker's durable state behind one small trait.
//!
//! tern-store decides nothing about MQTT: the broker core decides what changed and writes
//! it here as a batch of [`Op`]s; a [`Store`] applies a batch atomically (all of it or none
//! of it) and hands the whole state back with [`Store::load`] when the broker starts.
//! [`MemoryStore`] keeps it in memory and is the reference model every other backend is
//! tested against; it performs no I/O and reads no clock.
//!
//! What is durable: each session ([`SessionRecord`]: expiry, subscriptions, a will
//! waiting out its delay) with its delivery state ([`SessionState`]: outbound inflight,
//! offline queue, inbound QoS 2 ids, next packet id), and the retained messages.
//! Deadlines are wall-clock ([`SystemTime`]) so they survive a restart; the core converts
//! from its monotonic `Instant`.

#![forbid(unsafe_code)]

mod encoding;
mod redb_store;
mod wal;

pub use redb_store::{DEFAULT_CACHE, RedbStore, Sync};

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use tern_codec::{LastWill, Str, SubscriptionId, SubscriptionOptions, TopicFilter, TopicName};
pub use tern_proto::{Change, Entry, Message, MessageId, SessionState};

/// Part of a queue read back from a store ([`Store::read_queue`]): messages in order, each
/// with the shared subscription it came through.
pub type QueuePart = Vec<(Entry, Option<Str>)>;

/// One subscription of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The filter as subscribed.
    pub filter: TopicFilter,
    /// Its options (granted QoS, No Local, Retain As Published, Retain Handling).
    pub options: SubscriptionOptions,
    /// The 5.0 Subscription Identifier it was made with.
    pub id: Option<SubscriptionId>,
}

/// A will whose Will Delay Interval is running after its connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingWill {
    /// When it is published unless the client reconnects first.
    pub at: SystemTime,
    /// The will itself.
    pub will: LastWill,
}

/// What a session is apart from its delivery state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionRecord {
    /// How long the session outlives its connection.
    pub expiry: Duration,
    /// When the session ends; `None` while a connection is up (it ends `expiry` after
    /// that connection closes).
    pub expires_at: Option<SystemTime>,
    /// Subscriptions in filter order.
    pub subscriptions: Vec<Subscription>,
    /// A delayed will, if one is waiting.
    pub pending_will: Option<PendingWill>,
    /// The username of the session's last connection (the ACL's `%u` while it is
    /// offline).
    pub username: Option<Str>,
    /// Cluster: the session moved to this node from another, and takes its QoS 1/2
    /// messages that cross nodes from the cluster's stream from then on.
    pub fed: Option<Fed>,
}

/// Cluster: a session that moved to this node from another ([`SessionRecord::fed`]): it
/// takes every QoS 1/2 message that crosses nodes from the cluster's stream, in the
/// stream's order (this node's own clients' messages too, which its other sessions get
/// when they are published), except what it held already when it moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fed {
    /// It held every message of the stream up to this sequence when it moved.
    pub after: u64,
    /// The node it moved from.
    pub from: Str,
    /// It held that node's own messages numbered up to this (0: none beyond `after`).
    pub through: u64,
}

/// One session as stored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredSession {
    /// Expiry, subscriptions, pending will.
    pub record: SessionRecord,
    /// Inflight, queue, inbound QoS 2 ids, next packet id.
    pub delivery: SessionState,
    /// The broker's side map for the messages in `delivery` that came through a shared
    /// subscription: message id -> `$share/{group}/{filter}` (so that, after a restart,
    /// they can still go to another member of the group). Entries leave with their
    /// message.
    pub shared: BTreeMap<MessageId, Str>,
}

/// One change to the durable state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Creates the session or replaces its record (its delivery state is kept; a new
    /// session starts with an empty one).
    PutSession {
        /// Client identifier.
        client_id: Str,
        /// The record.
        record: SessionRecord,
    },
    /// Removes the session with its delivery state. Removing a missing session is not an
    /// error (clean start deletes whatever there was).
    DeleteSession {
        /// Client identifier.
        client_id: Str,
    },
    /// Replaces the session's delivery state.
    PutDelivery {
        /// Client identifier.
        client_id: Str,
        /// The state.
        state: SessionState,
        /// The shared subscription each of its messages came through, if any
        /// ([`StoredSession::shared`]).
        shared: BTreeMap<MessageId, Str>,
    },
    /// One change to the session's delivery state (a message queued, sent, acknowledged;
    /// an inbound QoS 2 id held or released), applied as [`SessionState::apply`] does.
    Change {
        /// Client identifier.
        client_id: Str,
        /// The change.
        change: Change,
        /// For a change that puts a message in the session (queued, requeued, sent): the
        /// shared subscription it came through, if any.
        shared: Option<Str>,
    },
    /// Sets the retained message of `message.topic`.
    PutRetained {
        /// The message.
        message: Message,
    },
    /// Clears the retained message of a topic, if any.
    DeleteRetained {
        /// The topic.
        topic: TopicName,
    },
    /// Keeps the will of a connected client (any session expiry: a client whose session
    /// ends with its connection has a will too), until its connection ends.
    PutWill {
        /// Client identifier.
        client_id: Str,
        /// The will.
        will: LastWill,
    },
    /// The client's connection ended: its will was published, became a delayed will of
    /// its session, or was discarded.
    DeleteWill {
        /// Client identifier.
        client_id: Str,
    },
    /// Remembers a publisher's idempotency key until `expires`, in slot `slot` of that
    /// publisher's ring (written in the same batch as the message it came with). The slot
    /// held the key this one pushes out of the count window, if any: replaced, so no key
    /// needs deleting as new ones come.
    PutKey {
        /// Who published (`user:NAME`, or `client:ID` for an anonymous client).
        identity: Str,
        /// Its place in the identity's ring of keys.
        slot: u32,
        /// The key the publisher gave.
        key: Str,
        /// When the broker may forget it.
        expires: std::time::SystemTime,
    },
    /// Empties a slot of an identity's ring (its key's window ended). Emptying an empty
    /// slot is not an error.
    DeleteKey {
        /// Who published.
        identity: Str,
        /// The slot.
        slot: u32,
    },
    /// Keeps a message in the history of the topic policy `policy` (its filter), under
    /// the broker-wide position `seq`, published at `at`.
    PutHistory {
        /// The policy's filter.
        policy: Str,
        /// The message's position (grows with every message kept, over all policies).
        seq: u64,
        /// When it was published.
        at: std::time::SystemTime,
        /// The message.
        message: Message,
    },
    /// Forgets the messages of `policy`'s history at positions up to `through`.
    TrimHistory {
        /// The policy's filter.
        policy: Str,
        /// The last position forgotten.
        through: u64,
    },
    /// A cluster node has applied the cluster's message stream up to this sequence: its
    /// messages are in this node's sessions (written in the same batch as their copies).
    ClusterApplied(u64),
    /// A cluster node has put this many QoS 1/2 messages of its own clients into the
    /// cluster's stream (counted across restarts; each message says its number), the ones of
    /// this batch included: a message of its own with a higher number that it reads back
    /// after a crash is one whose batch was lost.
    ClusterForwarded(u64),
}

/// What a start needs to know of one kept message ([`Snapshot::history`]): not the
/// message, which stays in the store until a replay reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryMeta {
    /// When it was published.
    pub at: std::time::SystemTime,
    /// Its topic and payload bytes.
    pub bytes: u32,
}

/// A part of the history to read ([`Store::read_history`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRead {
    /// The policies (filters) whose histories to read.
    pub policies: Vec<Str>,
    /// Only messages whose topic this filter matches.
    pub filter: Str,
    /// From this position on.
    pub from: u64,
    /// Up to this one.
    pub through: u64,
    /// Only messages published at or after this time, if given.
    pub since: Option<std::time::SystemTime>,
    /// At most this many.
    pub max: usize,
}

/// A message read from the history: its position, when it was published, the message.
pub type HistoryMessage = (u64, std::time::SystemTime, Message);

/// Messages read from a history as a broker core takes loaded messages: entries numbered
/// by position, `now` as the time each joins a queue.
pub fn history_entries(read: Vec<HistoryMessage>, now: std::time::Instant) -> QueuePart {
    read.into_iter()
        .filter_map(|(seq, _, message)| {
            Some((
                Entry {
                    id: MessageId::new(seq)?,
                    since: now,
                    message,
                },
                None,
            ))
        })
        .collect()
}

/// The bytes a kept message counts for in its policy's size bound.
pub fn history_bytes(m: &Message) -> u32 {
    u32::try_from(m.topic.as_str().len() + m.payload.len()).unwrap_or(u32::MAX)
}

impl HistoryRead {
    /// Whether `m`, kept at `at` at position `seq`, is one to read.
    pub fn wants(&self, seq: u64, at: std::time::SystemTime, m: &Message) -> bool {
        seq >= self.from
            && seq <= self.through
            && self.since.is_none_or(|since| at >= since)
            && tern_codec::matches_with(&self.filter, m.topic.as_str(), |f, t| f == t)
    }
}

/// The message a change puts in the session, if it puts one.
pub(crate) fn change_entry(change: &Change) -> Option<MessageId> {
    match change {
        Change::Queued(e) | Change::Requeued(e) | Change::Sent(_, e) => Some(e.id),
        _ => None,
    }
}

impl StoredSession {
    /// Drops side-map entries whose message left the session.
    fn forget_departed(&mut self) {
        if !self.shared.is_empty() {
            let delivery = &self.delivery;
            self.shared.retain(|id, _| delivery.holds(*id));
        }
    }
}

impl Op {
    /// The session this op needs to exist, if any.
    fn needs_session(&self) -> Option<&Str> {
        match self {
            Op::PutDelivery { client_id, .. } | Op::Change { client_id, .. } => Some(client_id),
            _ => None,
        }
    }
}

/// Everything a store holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// Sessions by client identifier.
    pub sessions: BTreeMap<Str, StoredSession>,
    /// Retained messages by topic.
    pub retained: BTreeMap<TopicName, Message>,
    /// The wills of connected clients, by client identifier: what a restart publishes
    /// for the clients whose connections the crash ended ([`Op::PutWill`]).
    pub wills: BTreeMap<Str, LastWill>,
    /// Idempotency keys remembered, by (identity, slot): the key, and when it may be
    /// forgotten.
    pub keys: BTreeMap<(Str, u32), (Str, std::time::SystemTime)>,
    /// The messages kept in topic histories, by (policy filter, position): when each was
    /// published and its size, not the message itself.
    pub history: BTreeMap<(Str, u64), HistoryMeta>,
    /// A cluster node: how far it has applied the cluster's message stream (0: not yet).
    pub cluster_applied: u64,
    /// A cluster node: how many QoS 1/2 messages of its own it has forwarded
    /// ([`Op::ClusterForwarded`]).
    pub cluster_forwarded: u64,
}

/// Why a store refused or failed a batch. A failed batch changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// An op names a session that neither exists nor is created earlier in the batch: a
    /// bug in the caller, refused so it shows in tests.
    #[error("op {index} of the batch names session {client_id:?}, which does not exist")]
    NoSuchSession {
        /// Position of the op in the batch.
        index: usize,
        /// The client identifier it named.
        client_id: String,
    },
    /// The backend could not read or write its storage.
    #[error("storage failed: {0}")]
    Backend(String),
    /// A message or will in the batch cannot be written in the store's format (no PUBLISH
    /// could carry it); the batch changed nothing.
    #[error("cannot be stored: {0}")]
    Unencodable(String),
}

/// What [`Store::commit`] returns once a batch is durable: the receipt that lets the
/// broker core's sealed outputs out (`tern_broker_core::Sealed::open`), so that nothing is
/// sent before the commit it depends on by construction rather than by care.
#[derive(Debug)]
pub struct Committed(());

impl Committed {
    /// For [`Store`] implementations only: the batch just given to `commit` is durable
    /// (as durable as the backend promises).
    pub fn receipt() -> Committed {
        Committed(())
    }
}

/// Durable broker state: batches in, the whole state out at startup.
pub trait Store: Send {
    /// Applies every op of `batch` in order, atomically: when this returns `Ok`, all of
    /// it is durable (as durable as the backend promises) and the [`Committed`] receipt
    /// says so; when it returns `Err`, none of it was applied.
    fn commit(&mut self, batch: &[Op]) -> Result<Committed, StoreError>;

    /// The whole state, as of the last successful commit.
    fn load(&self) -> Result<Snapshot, StoreError>;

    /// The state as a broker keeping its queues in the store wants it at startup: every
    /// session's waiting messages left in the store, counted ([`SessionState::spilled_len`])
    /// but not read, to be read with [`Store::read_queue`] as they are needed; the shared
    /// side maps only for what is in memory (in flight). Everything else as
    /// [`Store::load`]. The default reads everything and lets go of the queues; a store
    /// that can count without reading does better.
    fn load_spilled(&self) -> Result<Snapshot, StoreError> {
        let mut snapshot = self.load()?;
        for session in snapshot.sessions.values_mut() {
            let d = &mut session.delivery;
            d.set_window(Some(1));
            d.spill_all();
            d.set_window(None);
            session.forget_departed();
        }
        Ok(snapshot)
    }

    /// Up to `max` waiting messages of session `client_id` numbered above `after`, in
    /// queue order, each with the shared subscription it came through: the next part of a
    /// queue kept in the store. Nothing for a session the store does not hold.
    fn read_queue(
        &self,
        client_id: &str,
        after: MessageId,
        max: usize,
    ) -> Result<Vec<(Entry, Option<Str>)>, StoreError>;

    /// Up to `read.max` messages of the histories `read` names, in position order.
    fn read_history(&self, read: &HistoryRead) -> Result<Vec<HistoryMessage>, StoreError>;

    /// A reader of queues that works beside the store's writer (another thread reading
    /// what is committed while commits go on), if the backend has one.
    fn reader(&self) -> Option<Box<dyn QueueReader>> {
        None
    }

    /// Makes every commit so far durable, for a backend that acknowledges commits before
    /// they reach the disk. Nothing to do for one that syncs each commit.
    fn flush(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// One session as a store holds it, taken out to move to another cluster node
/// ([`QueueReader::export_session`]), with the cluster positions committed with it.
#[derive(Debug, Clone)]
pub struct Exported {
    /// Its client identifier.
    pub client_id: Str,
    /// The session, its whole queue read.
    pub session: StoredSession,
    /// [`Snapshot::cluster_applied`] as of the same commit.
    pub cluster_applied: u64,
    /// [`Snapshot::cluster_forwarded`] as of the same commit.
    pub cluster_forwarded: u64,
}

impl Exported {
    /// The session as bytes for another process (the write-ahead log's encoding of the
    /// ops that make it; times as wall-clock, read back against the reader's clocks):
    /// `now` and `wall` are the same moment.
    pub fn encode(&self, now: std::time::Instant, wall: SystemTime) -> Result<Vec<u8>, StoreError> {
        let ops = [
            Op::PutSession {
                client_id: self.client_id.clone(),
                record: self.session.record.clone(),
            },
            Op::PutDelivery {
                client_id: self.client_id.clone(),
                state: self.session.delivery.clone(),
                shared: self.session.shared.clone(),
            },
        ];
        encoding::batch(&ops, encoding::Anchor { instant: now, wall })
    }

    /// A session [`Exported::encode`] wrote (the cluster positions are not in the bytes:
    /// 0 here, for the caller to fill in).
    pub fn decode(
        buf: &[u8],
        now: std::time::Instant,
        wall: SystemTime,
    ) -> Result<Exported, StoreError> {
        let ops = encoding::read_batch(buf, encoding::Anchor { instant: now, wall })?;
        let bad = || StoreError::Backend("a session from another node is unreadable".into());
        let mut ops = ops.into_iter();
        let (
            Some(Op::PutSession { client_id, record }),
            Some(Op::PutDelivery { state, shared, .. }),
            None,
        ) = (ops.next(), ops.next(), ops.next())
        else {
            return Err(bad());
        };
        Ok(Exported {
            client_id,
            session: StoredSession {
                record,
                delivery: state,
                shared,
            },
            cluster_applied: 0,
            cluster_forwarded: 0,
        })
    }
}

/// Reads queues from what a store has committed, beside its writer ([`Store::reader`]).
pub trait QueueReader: Send {
    /// The session `client_id` as of the last commit, its whole queue read, with the
    /// cluster positions of that commit; `None` if the store has no such session.
    fn export_session(&self, client_id: &str) -> Result<Option<Exported>, StoreError>;

    /// As [`Store::read_history`], from the last commit.
    fn read_history(&self, read: &HistoryRead) -> Result<Vec<HistoryMessage>, StoreError>;

    /// As [`Store::read_queue`], from the last commit.
    fn read_queue(
        &self,
        client_id: &str,
        after: MessageId,
        max: usize,
    ) -> Result<QueuePart, StoreError>;
}

/// The reference store: everything in memory, nothing survives the process.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    state: Snapshot,
    /// The kept messages themselves (the snapshot has only what a start needs of them).
    history: BTreeMap<(Str, u64), (std::time::SystemTime, Message)>,
    commits: u64,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Batches committed so far.
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// The state, without copying it.
    pub fn state(&self) -> &Snapshot {
        &self.state
    }

    /// Refuses a batch that would touch a missing session, before anything is applied.
    fn validate(&self, batch: &[Op]) -> Result<(), StoreError> {
        let mut created = BTreeSet::new();
        let mut deleted = BTreeSet::new();
        for (index, op) in batch.iter().enumerate() {
            match op {
                Op::PutSession { client_id, .. } => {
                    deleted.remove(client_id);
                    created.insert(client_id);
                }
                Op::DeleteSession { client_id } => {
                    created.remove(client_id);
                    deleted.insert(client_id);
                }
                _ => {}
            }
            if let Some(client_id) = op.needs_session() {
                let exists = created.contains(client_id)
                    || (!deleted.contains(client_id)
                        && self.state.sessions.contains_key(client_id));
                if !exists {
                    return Err(StoreError::NoSuchSession {
                        index,
                        client_id: client_id.to_string(),
                    });
                }
            }
        }
        Ok(())
    }
}

impl Store for MemoryStore {
    fn commit(&mut self, batch: &[Op]) -> Result<Committed, StoreError> {
        self.validate(batch)?;
        let s = &mut self.state;
        for op in batch {
            match op {
                Op::PutSession { client_id, record } => {
                    s.sessions.entry(client_id.clone()).or_default().record = record.clone();
                }
                Op::DeleteSession { client_id } => {
                    s.sessions.remove(client_id);
                }
                Op::PutDelivery {
                    client_id,
                    state,
                    shared,
                } => {
                    let session = s.sessions.get_mut(client_id).expect("validated");
                    session.delivery = state.clone();
                    session.shared = shared.clone();
                    session.forget_departed();
                }
                Op::Change {
                    client_id,
                    change,
                    shared,
                } => {
                    let session = s.sessions.get_mut(client_id).expect("validated");
                    session.delivery.apply(change);
                    if let (Some(group), Some(id)) = (shared, change_entry(change)) {
                        session.shared.insert(id, group.clone());
                    }
                    session.forget_departed();
                }
                Op::PutRetained { message } => {
                    s.retained.insert(message.topic.clone(), message.clone());
                }
                Op::PutWill { client_id, will } => {
                    s.wills.insert(client_id.clone(), will.clone());
                }
                Op::DeleteWill { client_id } => {
                    s.wills.remove(client_id);
                }
                Op::DeleteRetained { topic } => {
                    s.retained.remove(topic);
                }
                Op::PutKey {
                    identity,
                    slot,
                    key,
                    expires,
                } => {
                    s.keys
                        .insert((identity.clone(), *slot), (key.clone(), *expires));
                }
                Op::DeleteKey { identity, slot } => {
                    s.keys.remove(&(identity.clone(), *slot));
                }
                Op::PutHistory {
                    policy,
                    seq,
                    at,
                    message,
                } => {
                    let meta = HistoryMeta {
                        at: *at,
                        bytes: history_bytes(message),
                    };
                    s.history.insert((policy.clone(), *seq), meta);
                    self.history
                        .insert((policy.clone(), *seq), (*at, message.clone()));
                }
                Op::ClusterApplied(seq) => s.cluster_applied = *seq,
                Op::ClusterForwarded(n) => s.cluster_forwarded = *n,
                Op::TrimHistory { policy, through } => {
                    let keep = s
                        .history
                        .split_off(&(policy.clone(), through.saturating_add(1)));
                    s.history.retain(|(p, _), _| p != policy);
                    s.history.extend(keep);
                    let keep = self
                        .history
                        .split_off(&(policy.clone(), through.saturating_add(1)));
                    self.history.retain(|(p, _), _| p != policy);
                    self.history.extend(keep);
                }
            }
        }
        self.commits += 1;
        Ok(Committed::receipt())
    }

    fn load(&self) -> Result<Snapshot, StoreError> {
        Ok(self.state.clone())
    }

    fn read_queue(
        &self,
        client_id: &str,
        after: MessageId,
        max: usize,
    ) -> Result<Vec<(Entry, Option<Str>)>, StoreError> {
        let Some(session) = self.state.sessions.get(client_id) else {
            return Ok(Vec::new());
        };
        Ok(session
            .delivery
            .queued()
            .filter(|e| e.id > after)
            .take(max)
            .map(|e| (e.clone(), session.shared.get(&e.id).cloned()))
            .collect())
    }

    fn read_history(&self, read: &HistoryRead) -> Result<Vec<HistoryMessage>, StoreError> {
        let mut out: Vec<HistoryMessage> = self
            .history
            .iter()
            .filter(|((p, seq), (at, m))| read.policies.contains(p) && read.wants(*seq, *at, m))
            .map(|((_, seq), (at, m))| (*seq, *at, m.clone()))
            .collect();
        out.sort_by_key(|(seq, _, _)| *seq);
        out.truncate(read.max);
        Ok(out)
    }
}
