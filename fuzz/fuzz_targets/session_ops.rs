//! Random operation sequences over two session engines on a simulated link: the QoS
//! invariants must hold for every byte string (see `tern_proto::sim::check_ops`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern_proto::sim::fuzz_ops(data));
