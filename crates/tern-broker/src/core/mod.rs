//! The broker's sans-IO core.

mod trie;

pub use trie::{Delivery, SubscriptionTrie};
