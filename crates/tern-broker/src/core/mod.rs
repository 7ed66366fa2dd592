//! The broker's sans-IO core.

mod broker;
mod shared;
mod trie;

pub use broker::{
    Broker, ConnId, ConnIdHasher, ConnMap, Gauges, Output, QueuePolicy, SessionGauge, Settings,
};

pub use shared::{Member, Readiness, SharedStrategy, SharedSubscriptions};
pub use trie::{Delivery, SubscriptionTrie};
