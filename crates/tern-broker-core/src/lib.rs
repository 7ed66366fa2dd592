//! The Tern broker's sans-IO core.
//!
//! This crate performs no I/O, reads no clock and spawns nothing: it depends on no async
//! runtime, no sockets and no TLS, and the gate checks that it stays so
//! (`cargo tree -p tern-broker-core -e normal` lists no tokio). The server
//! (`tern-broker`) feeds it connections, decoded packets, closes and the time, and writes
//! what it says.
//!
//! - [`Broker`]: sessions that outlive connections, the CONNECT handshake, routing,
//!   retained messages, wills, `$SYS`; every durable change as a store op
//!   ([`Broker::take_ops`]) that must be committed before the outputs produced with it
//!   are written (persist, then acknowledge).
//! - [`SubscriptionTrie`] and [`SharedSubscriptions`]: who gets a message.
//! - [`acl`]: the ACL format and its checks.
//! - [`Counters`]: what the core counts, for the server to export.
//!
//! With the `testing` feature (tests and fuzzing only), `sim` is a simulated host: N
//! clients, one simulated clock, and a store written the way the server writes it.

#![forbid(unsafe_code)]

pub mod acl;
mod broker;
mod counters;
mod refusal;
mod shared;
#[cfg(feature = "testing")]
pub mod sim;
mod trie;

pub use broker::{
    AdminAction, Broker, ConnId, ConnIdHasher, ConnMap, DEFAULT_KEY_PROPERTY, Forward, Gauges,
    Idempotency, InflightView, Interest, Load, Loads, MovedIn, Output, POSITION,
    QUEUED_MESSAGE_OVERHEAD, QueuePolicy, RECEIPT_PROPERTY, RECEIPT_ROUTED, RECEIPT_SETTLED,
    REPLAY_FROM, REPLAY_SINCE, Remote, RetainedView, Round, Sealed, Send, SessionGauge,
    SessionSummary, SessionView, SessionsPage, Settings, Source, SubscriptionView, TopicPolicy,
    Traffic, WillChange, WillView, parse_duration, since_time,
};
pub use counters::{Counters, DropReason, PolicyCounters};
pub use refusal::{Admission, Answer, Refusal};

pub use shared::{Member, Readiness, SharedStrategy, SharedSubscriptions};
pub use trie::{Delivery, SubscriptionTrie};
