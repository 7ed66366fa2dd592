//! Replays the `broker_ops` fuzz corpus through the function the fuzz target calls, so the
//! target cannot rot and every run the fuzzer kept stays a regression test.

use std::path::PathBuf;

#[test]
fn broker_ops_corpus_keeps_the_store_in_step_and_every_guarantee() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/broker_ops");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).expect("corpus file");
        let steps = tern_broker_core::sim::steps_from_bytes(&data);
        if let Err(e) = tern_broker_core::sim::check_steps(&steps) {
            panic!("{}: {e}", path.display());
        }
        count += 1;
    }
    assert!(
        count >= 40,
        "only {count} corpus files; the seeds are missing"
    );
}
