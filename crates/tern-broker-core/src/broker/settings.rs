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
        }
    }
}
