//! Dropping QoS 1 redeliveries on the receiving side, by an idempotency key the publisher
//! put in a user property.

use std::collections::{HashSet, VecDeque};

use tern_codec::Str;
use tern_proto::Message;

/// Remembers the idempotency keys of the last `window` messages and tells a new message
/// from a repeat. The key is the user property `msg-id` unless [`Dedup::key`] says
/// otherwise; publishers set it themselves or let [`crate::Options::stamp`] do it.
/// Messages without the key are always new (3.1.1 messages have no properties).
///
/// QoS 1 promises at least once: after a lost connection the same message can arrive
/// twice. With a `Dedup` in front, the application sees it once, as long as the repeat
/// comes within `window` messages.
///
/// ```
/// use tern_client::{Dedup, Message, QoS};
/// # use tern_client::TopicName;
/// let mut dedup = Dedup::new(10_000);
/// let mut m = Message::new(TopicName::new("chat/room-1").unwrap(), "hi", QoS::AtLeastOnce);
/// m.properties.user_properties.push(("msg-id".into(), "alice-1".into()));
/// assert!(dedup.is_new(&m));
/// assert!(!dedup.is_new(&m)); // the redelivery
/// ```
#[derive(Debug, Clone)]
pub struct Dedup {
    key: Str,
    window: usize,
    seen: HashSet<Str>,
    order: VecDeque<Str>,
}

impl Dedup {
    /// Remembers up to `window` keys (at least 1), the oldest forgotten first.
    ///
    /// ```
    /// let dedup = tern_client::Dedup::new(1024);
    /// ```
    pub fn new(window: usize) -> Dedup {
        let window = window.max(1);
        Dedup {
            key: Str::from_static("msg-id"),
            window,
            seen: HashSet::with_capacity(window.min(1 << 16)),
            order: VecDeque::with_capacity(window.min(1 << 16)),
        }
    }

    /// Reads the idempotency key from user property `name` instead of `msg-id`.
    ///
    /// ```
    /// let dedup = tern_client::Dedup::new(1024).key("idempotency-key");
    /// ```
    pub fn key(mut self, name: impl Into<Str>) -> Dedup {
        self.key = name.into();
        self
    }

    /// Whether `message` is new: `false` only if its key was seen within the window.
    /// A new key is remembered.
    ///
    /// ```
    /// # use tern_client::{Dedup, Message, QoS};
    /// # use tern_client::TopicName;
    /// let mut dedup = Dedup::new(1);
    /// let keyed = |k: &str| {
    ///     let mut m = Message::new(TopicName::new("t").unwrap(), "", QoS::AtLeastOnce);
    ///     m.properties.user_properties.push(("msg-id".into(), k.into()));
    ///     m
    /// };
    /// assert!(dedup.is_new(&keyed("a")));
    /// assert!(dedup.is_new(&keyed("b"))); // the window of 1 forgets "a"
    /// assert!(dedup.is_new(&keyed("a")));
    /// ```
    pub fn is_new(&mut self, message: &Message) -> bool {
        let Some((_, value)) = message
            .properties
            .user_properties
            .iter()
            .find(|(k, _)| *k == self.key)
        else {
            return true;
        };
        if self.seen.contains(value) {
            return false;
        }
        if self.order.len() == self.window
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
        self.seen.insert(value.clone());
        self.order.push_back(value.clone());
        true
    }

    /// How many keys are remembered.
    ///
    /// ```
    /// assert_eq!(tern_client::Dedup::new(8).len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no key is remembered.
    ///
    /// ```
    /// assert!(tern_client::Dedup::new(8).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}
