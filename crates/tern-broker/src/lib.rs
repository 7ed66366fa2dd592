//! The Tern broker.
//!
//! So far only the sans-IO core's subscription trie exists ([`core::SubscriptionTrie`]);
//! sessions, retained messages, wills, the tokio server and `tern broker` are being built
//! under the broker issue. The core performs no I/O and reads no clock.

#![forbid(unsafe_code)]

pub mod core;
