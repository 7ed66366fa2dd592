#![no_main]
//! Random runs of clients against the broker core on its simulated host: the store must
//! follow the live state, QoS 2 must not be delivered twice, and everything acknowledged
//! must arrive (see `tern_broker_core::sim::check_steps`).
libfuzzer_sys::fuzz_target!(|data: &[u8]| tern_broker_core::sim::fuzz_ops(data));
