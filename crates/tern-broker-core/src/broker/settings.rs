//! The settings the core needs (the server's configuration maps onto them).

use std::time::Duration;

use tern_codec::QoS;

use crate::SharedStrategy;

/// What to do when a session's queue is full (offline, or online behind a full window).
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
    /// Hold the publish: its acknowledgement waits, and so does every later QoS 1/2
    /// publish of the same client (in order), until the queues it would overflow have
    /// room, for at most [`Settings::block_timeout`]; then `Reject` applies. The client's
    /// Receive Maximum (5.0) or in-flight window (3.x) stops it after that many unacknowledged
    /// messages: one slow subscriber slows every publisher on its topics. QoS 0 is not held.
    Block,
}

/// What one queued message counts against [`Settings::max_queued_total`] besides its
/// payload: about what it takes in memory (measured: 200,000 queued 64-byte messages grew
/// the broker by 76 MB, about 380 bytes each) and a little more than its rows on disk.
pub const QUEUED_MESSAGE_OVERHEAD: usize = 384;

/// Broker settings the core needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Most messages queued for one session: offline, or online behind its full window.
    pub max_queued_messages: usize,
    /// Most payload bytes queued for one session, offline or online.
    pub max_queued_bytes: usize,
    /// Which message goes when a queue is full. The default refuses the publish: nothing
    /// acknowledged is dropped for room.
    pub queue_policy: QueuePolicy,
    /// Under [`QueuePolicy::Block`], how long a publish may be held before it is refused.
    pub block_timeout: Duration,
    /// The broker's budget for queued messages, across all sessions, in bytes: each
    /// queued message counts its payload and [`QUEUED_MESSAGE_OVERHEAD`]. A QoS 1/2 publish
    /// that would be queued while the budget is spent is refused (0x97 Quota exceeded in
    /// 5.0, the connection closed in 3.x), whatever the queue policy: refused, not accepted
    /// and dropped later.
    pub max_queued_total: usize,
    /// Bytes waiting to be written to one connection past which its QoS 0 PUBLISH packets
    /// are dropped (a slow consumer; at most once allows it).
    pub max_write_backlog: usize,
    /// Most waiting messages a persistent session keeps in memory while online (the front
    /// of its queue); the rest are in the store only and read back in batches as the
    /// window drains, and an offline session keeps none in memory. `None`: every queued
    /// message stays in memory too (no store to read back from). The driver must answer
    /// the round's loads ([`crate::Load`]) when this is set. Default 1,000: enough for a
    /// fast replay (the store is read 500-1,000 messages at a time), little enough that
    /// 10,000 sessions behind full windows stay within a few hundred MB.
    pub queue_window: Option<usize>,
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
    /// Most sessions the broker holds (online and offline); a CONNECT that would make a new
    /// one beyond it is refused (0x97 Quota exceeded, 3.x return code 3). Resuming or
    /// taking over a session needs no room. `None`: no limit.
    pub max_sessions: Option<usize>,
    /// Most PUBLISH packets a client may send per second; above it 5.0 clients get 0x96
    /// Message rate too high (in the acknowledgement, or a DISCONNECT at QoS 0), 3.x
    /// clients are disconnected. `None`: no limit.
    pub max_publish_rate: Option<u32>,
    /// Idempotency keys: which user property carries them and how long they are kept.
    pub idempotency: Idempotency,
    /// This broker is a node of a cluster (docs/cluster.md): the QoS 0 messages its clients
    /// publish are handed out for the other nodes ([`crate::Broker::take_forwards`]), and
    /// the filters its sessions hold are reported ([`crate::Broker::take_interest`]).
    pub cluster: bool,
    /// Guarantee policies by topic filter; a message follows the first whose filter
    /// matches its topic (in this order), or the global settings if none does.
    pub topics: std::sync::Arc<[TopicPolicy]>,
}

/// How the broker recognises a message it already has by the publisher's own key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    /// The user property whose value is the key; `None`: keys are not looked at.
    pub property: Option<tern_codec::Str>,
    /// How long a key is remembered after the message that brought it.
    pub window: Duration,
    /// Most keys remembered per publisher identity; the oldest is forgotten first.
    pub max_keys: usize,
}

impl Default for Idempotency {
    fn default() -> Self {
        Idempotency {
            property: Some(tern_codec::Str::from_static(DEFAULT_KEY_PROPERTY)),
            window: Duration::from_secs(600),
            max_keys: 10_000,
        }
    }
}

/// The user property that carries an idempotency key unless configured otherwise: the
/// name `tern-client`'s `stamp` and `Dedup` use by default.
pub const DEFAULT_KEY_PROPERTY: &str = "msg-id";

/// The user property a publisher sets to ask for a delivery receipt ([`RECEIPT_ROUTED`]
/// or [`RECEIPT_SETTLED`]); the receipt goes to the message's Response Topic.
pub const RECEIPT_PROPERTY: &str = "tern-receipt";
/// One receipt, once the message is routed: how many copies were sent, queued, dropped,
/// denied.
pub const RECEIPT_ROUTED: &str = "routed";
/// The routed receipt, and a second one once every QoS 1/2 copy was acknowledged by its
/// subscriber (or expired, or dropped).
pub const RECEIPT_SETTLED: &str = "settled";

/// What a topic filter's messages are held to ([`Settings::topics`]). Every limit left
/// `None` is the global one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPolicy {
    /// The topics it covers.
    pub filter: tern_codec::TopicFilter,
    /// Lowest QoS a client may publish at: below it the publish is refused (5.0 QoS 1:
    /// PUBACK 0x83 with a Reason String; 5.0 QoS 0: DISCONNECT 0x9B; 3.x: the connection
    /// is closed).
    pub min_qos: QoS,
    /// Highest QoS the messages travel at: a publish above it is accepted as usual and
    /// delivered at this QoS (counted as downgraded).
    pub max_qos: QoS,
    /// What a full queue does to these messages.
    pub queue_policy: Option<QueuePolicy>,
    /// A message of these topics joins a queue only while it holds fewer messages.
    pub max_queued_messages: Option<usize>,
    /// ... and fewer payload bytes (the message's own included).
    pub max_queued_bytes: Option<usize>,
    /// Whether these messages are queued for offline sessions at all (false: dropped
    /// for an offline subscriber, counted as `offline`).
    pub queue_offline: bool,
    /// Whether QoS 0 messages of these topics are queued for offline sessions.
    pub queue_qos0: Option<bool>,
    /// Message Expiry Interval given to a message that has none.
    pub expiry_default: Option<Duration>,
    /// Longest Message Expiry Interval: longer ones (and none) are cut to it.
    pub expiry_max: Option<Duration>,
    /// Keep the messages of these topics for this long, for replay (docs/history.md).
    pub history: Option<Duration>,
    /// ... and at most this many topic and payload bytes of them (the oldest go first).
    pub history_max_bytes: Option<u64>,
}

impl TopicPolicy {
    /// A policy for `filter` that changes nothing until its fields are set.
    pub fn new(filter: tern_codec::TopicFilter) -> TopicPolicy {
        TopicPolicy {
            filter,
            min_qos: QoS::AtMostOnce,
            max_qos: QoS::ExactlyOnce,
            queue_policy: None,
            max_queued_messages: None,
            max_queued_bytes: None,
            queue_offline: true,
            queue_qos0: None,
            expiry_default: None,
            expiry_max: None,
            history: None,
            history_max_bytes: None,
        }
    }
}

/// The queue rules one message is held to: its topic's policy over the global settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) policy: QueuePolicy,
    pub(crate) max_messages: usize,
    pub(crate) max_bytes: usize,
    pub(crate) queue_qos0: bool,
    pub(crate) queue_offline: bool,
}

impl Settings {
    /// The index of the policy `topic` follows, if any.
    pub(crate) fn policy_index(&self, topic: &tern_codec::TopicName) -> Option<usize> {
        if self.topics.is_empty() {
            return None;
        }
        self.topics.iter().position(|p| p.filter.matches(topic))
    }

    /// The queue rules for a message on `topic`.
    pub(crate) fn limits(&self, topic: &tern_codec::TopicName) -> Limits {
        let global = Limits {
            policy: self.queue_policy,
            max_messages: self.max_queued_messages,
            max_bytes: self.max_queued_bytes,
            queue_qos0: self.queue_qos0,
            queue_offline: true,
        };
        match self.policy_index(topic).map(|i| &self.topics[i]) {
            None => global,
            Some(p) => Limits {
                policy: p.queue_policy.unwrap_or(global.policy),
                max_messages: p.max_queued_messages.unwrap_or(global.max_messages),
                max_bytes: p.max_queued_bytes.unwrap_or(global.max_bytes),
                queue_qos0: p.queue_qos0.unwrap_or(global.queue_qos0),
                queue_offline: p.queue_offline,
            },
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_queued_messages: 1_000_000,
            max_queued_bytes: 256 << 20,
            queue_policy: QueuePolicy::Reject,
            block_timeout: Duration::from_secs(10),
            max_queued_total: 1 << 30,
            max_write_backlog: 16 << 20,
            queue_window: Some(1000),
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
            max_sessions: None,
            max_publish_rate: None,
            idempotency: Idempotency::default(),
            cluster: false,
            topics: std::sync::Arc::from(Vec::new()),
        }
    }
}
