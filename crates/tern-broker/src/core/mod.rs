//! The broker's sans-IO core.

mod broker;
mod trie;

pub use broker::{Broker, ConnId, Output, QueuePolicy, Settings};

pub use trie::{Delivery, SubscriptionTrie};
