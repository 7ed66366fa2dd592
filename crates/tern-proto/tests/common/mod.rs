//! The simulated link lives in `tern_proto::sim`, shared with the fuzz target.
#![allow(unused_imports, unreachable_pub)]

pub use tern_proto::sim::*;
