//! Whatever decodes re-encodes to bytes that decode to the same packet.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern_codec::fuzzing::round_trip(data));
