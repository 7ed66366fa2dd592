//! Tern nodes on one NATS cluster (docs/cluster.md). This first step carries QoS 0
//! messages between nodes over core NATS subjects (no stream captures them), routed by
//! interest: each node subscribes to the subjects of the filters its sessions hold, and
//! publishes each QoS 0 message its clients publish on the topic's subject. The mapping of
//! topics to subjects is nats-server's MQTT gateway's ([`subject`]), so NATS applications
//! read and write the same messages.

mod hex;
mod kv;
pub mod link;
pub mod moves;
pub mod shares;
pub mod subject;
pub mod wills;

pub use link::{Config, Error, Fed, Forward, Inbound, Interest, Out, Remote, connect, run};
