//! Arbitrary bytes as a packet stream in every version: no panic, `check` agrees with `decode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern_codec::fuzzing::decode_stream(data));
