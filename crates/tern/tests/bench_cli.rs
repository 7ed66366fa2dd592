//! `tern bench` against the real `tern broker`, with small counts: every scenario runs,
//! prints its JSON line, and counts what arrived; a run that loses messages says so and
//! exits 1.

#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;

use support::BrokerProcess;

/// Runs `tern bench ARGS -p PORT`: the exit code and the JSON line's fields.
fn bench(port: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("bench")
        .args(args)
        .args(["-p", port])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let json = out
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("a JSON line in: {out}"))
        .to_string();
    (
        o.status.code(),
        json,
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn field(json: &str, name: &str) -> f64 {
    let key = format!("\"{name}\":");
    let at = json
        .find(&key)
        .unwrap_or_else(|| panic!("{name} in {json}"))
        + key.len();
    json[at..]
        .split([',', '}'])
        .next()
        .unwrap()
        .trim_matches('"')
        .parse()
        .unwrap()
}

#[test]
fn every_scenario_runs_and_counts_each_message_once() {
    let dir = std::env::temp_dir().join(format!("tern-bench-cli-{}", std::process::id()));
    let b = BrokerProcess::in_dir(&dir, "");
    let port = b.port(0).to_string();
    for args in [
        &["fanin", "-q", "1", "--count", "500", "--publishers", "2"][..],
        &["fanout", "-q", "2", "--count", "200", "--subscribers", "3"],
        &["pairs", "--count", "1000", "--pairs", "2", "-V", "311"],
        &[
            "latency",
            "-q",
            "2",
            "--rate",
            "200",
            "--duration",
            "1",
            "--warmup",
            "0",
        ],
        &["backlog", "-q", "2", "--count", "300"],
    ] {
        let (code, json, err) = bench(&port, args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert!(field(&json, "expected") > 0.0, "{json}");
        assert_eq!(
            field(&json, "delivered"),
            field(&json, "expected"),
            "{json}"
        );
        assert_eq!(field(&json, "duplicates"), 0.0, "{json}");
        assert_eq!(field(&json, "reordered"), 0.0, "{json}");
        assert!(field(&json, "msgs_per_sec") > 0.0, "{json}");
    }
    let (_, json, _) = bench(
        &port,
        &[
            "latency",
            "--rate",
            "100",
            "--duration",
            "1",
            "--warmup",
            "0",
        ],
    );
    assert!(
        field(&json, "p50_us") > 0.0 && field(&json, "p999_us") >= field(&json, "p50_us"),
        "{json}"
    );
    let pid = b.pid().to_string();
    let (code, json, err) = bench(&port, &["idle", "--connections", "50", "--pid", &pid]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(field(&json, "connections"), 50.0, "{json}");
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_run_that_loses_messages_reports_them_and_exits_1() {
    // An offline queue of 100, drop-oldest: a backlog of 300 loses 200.
    let dir = std::env::temp_dir().join(format!("tern-bench-loss-{}", std::process::id()));
    let b = BrokerProcess::in_dir(&dir, "[sessions]\nmax_queued_messages = 100\n");
    let (code, json, err) = bench(b.port(0), &["backlog", "-q", "1", "--count", "300"]);
    assert_eq!(code, Some(1), "{json}");
    // Usually 200; fewer when the first messages reach the session before its DISCONNECT
    // is handled (in flight then, not queued: 100 seen once in a loaded run).
    let lost = field(&json, "lost");
    assert!((100.0..=200.0).contains(&lost), "{json}");
    assert_eq!(lost + field(&json, "delivered"), 300.0, "{json}");
    assert!(err.contains(&format!("{lost} lost")), "{err}");
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}
