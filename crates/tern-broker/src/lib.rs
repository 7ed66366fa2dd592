//! The Tern broker.
//!
//! [`core`] is the sans-IO broker: it performs no I/O and reads no clock. [`server`] is the
//! thin tokio layer that accepts connections, decodes, feeds the core and writes what it
//! says. Configuration files, a durable store, TLS and WebSocket come with later issues.

#![forbid(unsafe_code)]

pub mod core;
pub mod server;
