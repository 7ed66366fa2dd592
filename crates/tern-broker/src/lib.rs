//! The Tern broker's server.
//!
//! [`core`] is the sans-IO broker, its own crate (`tern-broker-core`, re-exported here):
//! it performs no I/O and reads no clock. [`server`] is the thin tokio layer that accepts
//! connections, decodes, feeds the core and writes what it says, through a storage writer
//! that commits before anything waiting on it is sent. [`auth`] decides who may connect;
//! [`acl`] reads the ACL file the core checks against; [`metrics`] exports what the server
//! and the core count.

#![forbid(unsafe_code)]

pub use tern_broker_core as core;

pub mod acl;
pub mod auth;
pub mod metrics;
pub mod server;
