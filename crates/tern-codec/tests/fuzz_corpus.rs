//! Replays the cargo-fuzz corpora (`fuzz/corpus/<target>/`) through the same functions the
//! fuzz targets call, so the targets cannot rot and every input the fuzzer found
//! interesting stays a regression test on stable Rust.

use std::path::PathBuf;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).expect("corpus file");
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{} panicked on {}", target, path.display());
        count += 1;
    }
    assert!(
        count >= 40,
        "{target}: only {count} corpus files; the seeds are missing"
    );
}

#[test]
fn decode_corpus_replays_without_panics_or_check_disagreements() {
    replay("decode", tern_codec::fuzzing::decode_stream);
}

#[test]
fn round_trip_corpus_replays_with_identical_reencodings() {
    replay("round_trip", tern_codec::fuzzing::round_trip);
}
