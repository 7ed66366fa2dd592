//! What the core counts: drops by reason, deliveries and downgrades, suppressed QoS 2
//! duplicates, refused subscriptions, expired sessions. Plain numbers the core owns; the
//! server reads them with the gauges ([`crate::Broker::gauges`]) and exports them.

use tern_codec::QoS;

/// Why a message (or one subscriber's copy of it) was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// An offline session's queue was full (its queue policy dropped a message).
    QueueFull,
    /// Its Message Expiry Interval (or the broker's queue age limit) passed first.
    Expired,
    /// Larger than the subscriber's Maximum Packet Size.
    TooLarge,
    /// A published message that matched no subscription.
    NoSubscribers,
    /// The ACL refused the publish, the delivery or the will.
    NotAuthorized,
    /// Refused at publish because a subscriber's queue (offline, or online behind a full
    /// window) is full (`queue_policy = "reject"`: 0x97 Quota exceeded).
    Quota,
    /// Over the client's publish rate (the client is disconnected with 0x96).
    RateLimited,
    /// A topic beyond the length/depth limits, a payload that is not the UTF-8 it says,
    /// a QoS or retain flag the server does not offer.
    Invalid,
    /// A QoS 0 message for an offline session (queued only with `queue_qos0`).
    Offline,
    /// A QoS 0 copy for an online subscriber that is not reading: what already waits for
    /// its socket is over `max_queued_bytes`.
    SlowConsumer,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 10] = [
        DropReason::QueueFull,
        DropReason::Expired,
        DropReason::TooLarge,
        DropReason::NoSubscribers,
        DropReason::NotAuthorized,
        DropReason::Quota,
        DropReason::RateLimited,
        DropReason::Invalid,
        DropReason::Offline,
        DropReason::SlowConsumer,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::Expired => "expired",
            DropReason::TooLarge => "too_large",
            DropReason::NoSubscribers => "no_subscribers",
            DropReason::NotAuthorized => "not_authorized",
            DropReason::Quota => "quota",
            DropReason::RateLimited => "rate_limited",
            DropReason::Invalid => "invalid",
            DropReason::Offline => "offline_qos0",
            DropReason::SlowConsumer => "slow_consumer",
        }
    }
}

/// The core's counters. Monotonic for the life of the process (carried over when the
/// server rebuilds the core after a store failure: [`crate::Broker::set_counters`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Messages (or one subscriber's copies) not delivered, by [`DropReason`] (indexed
    /// by `reason as usize`).
    pub dropped: [u64; DropReason::ALL.len()],
    /// Copies handed to subscribers' sessions, by effective QoS.
    pub deliveries: [u64; 3],
    /// Copies delivered below the publisher's QoS: 1->0, 2->0, 2->1.
    pub downgrades: [u64; 3],
    /// Inbound QoS 2 resends answered without delivering again.
    pub qos2_duplicates: u64,
    /// Subscriptions refused by the ACL.
    pub subscriptions_denied: u64,
    /// Offline sessions that reached their expiry and were removed.
    pub sessions_expired: u64,
    /// The most sessions online at once.
    pub clients_maximum: u64,
    /// Publishes whose idempotency key the broker already had: acknowledged, not routed.
    pub idempotent_repeats: u64,
    /// Trims of topic histories (by age or size).
    pub history_trimmed: u64,
    /// Replays started.
    pub replays: u64,
    /// Messages read from histories and delivered by replays.
    pub replayed: u64,
    /// Receipts sent: routed, settled.
    pub receipts: [u64; 2],
    /// Per topic policy (by filter, in the order of the settings): publishes that followed
    /// it, refused below its minimum QoS, delivered below their QoS by its maximum.
    pub policies: Vec<(String, PolicyCounters)>,
}

/// What one topic policy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyCounters {
    /// Publishes that followed it.
    pub publishes: u64,
    /// Refused: below its minimum QoS.
    pub refused: u64,
    /// Taken down to its maximum QoS.
    pub downgraded: u64,
    /// Given its default Message Expiry Interval, or cut to its longest.
    pub expiry_set: u64,
}

impl Counters {
    /// Messages (or copies) dropped for `reason` so far.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize]
    }

    pub(crate) fn drop_n(&mut self, reason: DropReason, n: u64) {
        self.dropped[reason as usize] += n;
    }

    /// Counts a delivery of a `from` message at `to`.
    pub(crate) fn delivered(&mut self, from: QoS, to: QoS) {
        self.deliveries[to as usize] += 1;
        let downgrade = match (from, to) {
            (QoS::AtLeastOnce, QoS::AtMostOnce) => Some(0),
            (QoS::ExactlyOnce, QoS::AtMostOnce) => Some(1),
            (QoS::ExactlyOnce, QoS::AtLeastOnce) => Some(2),
            _ => None,
        };
        if let Some(i) = downgrade {
            self.downgrades[i] += 1;
        }
    }
}
