//! The application message as the engine queues, sends and delivers it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_codec::properties::PublishProperties;
use tern_codec::{Props, Publish, QoS, QosPid, TopicName};

/// An application message: what a PUBLISH carries, minus what belongs to one transmission
/// (packet id, DUP, topic alias), and nothing else. What a caller tracks per message (a
/// client: whose publish it is; the broker: the shared subscription a copy came through)
/// lives in the caller's own maps, keyed by the [`crate::MessageId`] the session gives the
/// message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name (never empty: aliases are resolved before a message reaches the
    /// application and applied only when a PUBLISH is written).
    pub topic: TopicName,
    /// Payload.
    pub payload: Bytes,
    /// QoS it travels at on this connection.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
    /// PUBLISH properties other than Topic Alias. The Message Expiry Interval written on
    /// each send is recomputed from [`Message::expires_at`].
    pub properties: Props<PublishProperties>,
    /// When the message expires, if it has a Message Expiry Interval.
    pub expires_at: Option<Instant>,
}

impl Message {
    /// A message with no properties and no expiry.
    pub fn new(topic: TopicName, payload: impl Into<Bytes>, qos: QoS) -> Message {
        Message {
            topic,
            payload: payload.into(),
            qos,
            retain: false,
            properties: Props::NONE,
            expires_at: None,
        }
    }

    /// Sets the Message Expiry Interval, counted from `now`.
    pub fn with_expiry(mut self, interval: Duration, now: Instant) -> Message {
        self.properties.message_expiry_interval = Some(interval.as_secs() as u32);
        self.expires_at = Some(now + interval);
        self
    }

    /// Whether the message has expired at `now`.
    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }

    /// The message carried by a received PUBLISH (topic already resolved), its expiry
    /// counted from `now`.
    pub fn from_publish(mut p: Publish, now: Instant) -> Message {
        if p.properties.topic_alias.is_some() {
            p.properties.topic_alias = None;
        }
        let expires_at = p
            .properties
            .message_expiry_interval
            .map(|secs| now + Duration::from_secs(u64::from(secs)));
        Message {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos_pid.qos(),
            retain: p.retain,
            properties: p.properties,
            expires_at,
        }
    }

    /// A PUBLISH for this message, the expiry interval set to what remains at `now`
    /// (rounded up, so a message still in flight never goes out as already expired).
    /// Whether any PUBLISH could carry this message: within MQTT's largest packet, with its
    /// properties as they are now (a copy can outgrow the PUBLISH it came in, by the
    /// Subscription Identifiers of the subscriptions it matched).
    pub fn fits_a_packet(&self, now: Instant) -> bool {
        let id = tern_codec::PacketId::MIN;
        let publish = self.to_publish(QosPid::new(self.qos, id), false, now);
        tern_codec::encoded_len(
            &tern_codec::Packet::Publish(publish),
            tern_codec::Protocol::V5,
        )
        .is_ok()
    }

    pub(crate) fn to_publish(&self, qos_pid: QosPid, dup: bool, now: Instant) -> Publish {
        let mut properties = self.properties.clone();
        if let Some(at) = self.expires_at {
            let left = at.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            properties.message_expiry_interval = Some(secs.clamp(1, u64::from(u32::MAX)) as u32);
        }
        Publish {
            dup,
            qos_pid,
            retain: self.retain,
            topic: self.topic.clone(),
            payload: self.payload.clone(),
            properties,
        }
    }
}
