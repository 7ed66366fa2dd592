//! Replays the `session_ops` fuzz corpus through the function the fuzz target calls, so the
//! target cannot rot and every run the fuzzer kept stays a regression test.

use std::path::PathBuf;

#[test]
fn session_ops_corpus_keeps_every_qos_invariant() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/session_ops");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).expect("corpus file");
        let outcome = std::panic::catch_unwind(|| tern_proto::sim::fuzz_ops(&data));
        assert!(outcome.is_ok(), "invariant broken by {}", path.display());
        count += 1;
    }
    assert!(
        count >= 40,
        "only {count} corpus files; the seeds are missing"
    );
}
