//! The Tern broker.
//!
//! [`core`] is the sans-IO broker: it performs no I/O and reads no clock. [`server`] is the
//! thin tokio layer that accepts connections, decodes, feeds the core and writes what it
//! says, through a storage writer that commits before anything waiting on it is sent.
//! [`auth`] decides who may connect. TLS and WebSocket come with a later issue.

#![forbid(unsafe_code)]

pub mod acl;
pub mod auth;
pub mod core;
pub mod metrics;
pub mod server;
