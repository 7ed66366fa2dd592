//! A real disk that stops taking writes: the store file may not grow past the broker's
//! file size limit (RLIMIT_FSIZE, set on the running broker with `prlimit`; a size-limited
//! tmpfs needs a mount this machine's tests cannot count on). Publishes then get no
//! acknowledgement (their connections close, so the clients resend later), `/readyz` and
//! `tern_store_failing` say so, and once the limit is lifted the broker takes writes again
//! without a restart (redb refuses every write after an I/O error until the database is
//! opened again, which the store does). With `durability = "batched"` the disk fills while
//! what was acknowledged waits for a flush (the flush interval is a minute): it is in the
//! store's log, and opening the database again applies the log before the next commit, so
//! that too recovers without a restart. Nothing acknowledged is lost: checked after
//! kill -9 and a restart.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::time::Duration;

use support::{BrokerProcess, http_get};

fn prlimit(pid: u32, soft: &str) {
    let status = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--fsize={soft}:unlimited"),
        ])
        .status()
        .unwrap();
    assert!(status.success(), "prlimit: {status}");
}

/// Publishes message `n` (about 64 KiB, numbered at its start) at QoS 1 with MQTT 5; true
/// if it was acknowledged.
fn publish(port: &str, payload_file: &std::path::Path, n: usize) -> bool {
    let mut body = format!("{n:06}:").into_bytes();
    body.resize(64 << 10, b'x');
    std::fs::write(payload_file, &body).unwrap();
    Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            "disk/t",
        ])
        .args(["-i", "disk-pub", "-f", payload_file.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// The persistent subscriber comes back: every message in `acked` is there.
fn check_kept(port: &str, acked: &[usize]) {
    let out = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-i",
            "disk-keeper",
            "-c",
            "-q",
            "1",
        ])
        .args(["-t", "disk/t", "-C", &acked.len().to_string(), "-W", "30"])
        .output()
        .unwrap();
    let got: Vec<usize> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l[..6].parse().unwrap())
        .collect();
    for m in acked {
        assert!(
            got.contains(m),
            "acknowledged message {m} kept (got {got:?})"
        );
    }
}

fn metric(metrics: &str, name: &str) -> String {
    let (_, body) = http_get(metrics, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or("missing")
        .to_string()
}

fn refuses_then_recovers_without_a_restart_and_loses_nothing(durability: &str) {
    let dir = std::env::temp_dir().join(format!(
        "tern-disk-full-{durability}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    // Batched: nothing is flushed during the test, so everything acknowledged before the
    // disk fills is only in the log and in commits redb made without fsync.
    let storage = format!("durability = \"{durability}\"\nflush_interval_ms = 60000");
    let start =
        || BrokerProcess::in_dir_with(Command::new(env!("CARGO_BIN_EXE_tern")), &dir, "", &storage);
    let broker = start();
    let metrics = broker.metrics.clone().unwrap();
    let port = broker.port(0).to_string();
    let status = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-i",
            "disk-keeper",
            "-c",
            "-q",
            "1",
        ])
        .args(["-t", "disk/t", "-E"])
        .status()
        .unwrap();
    assert!(status.success());
    let payload = dir.join("payload");
    // The store file may not grow any more.
    let store = dir.join("data").join("tern.redb");
    let len = std::fs::metadata(&store).unwrap().len();
    prlimit(broker.pid(), &len.to_string());
    let mut acked = Vec::new();
    let mut n = 0;
    let refused = loop {
        n += 1;
        assert!(
            n < 400,
            "the store kept taking writes past its file size limit"
        );
        if publish(&port, &payload, n) {
            acked.push(n);
        } else {
            break n;
        }
    };
    eprintln!(
        "store {len} bytes: {} acknowledged, message {refused} refused",
        acked.len()
    );
    let failing = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        http_get(&metrics, "/readyz").0 == 503
    });
    assert!(failing, "/readyz says not ready while the store fails");
    assert_eq!(metric(&metrics, "tern_store_failing"), "1");
    assert!(
        !publish(&port, &payload, refused),
        "still refused while the disk is full"
    );
    // Space returns: the next publishes are taken, without a restart.
    prlimit(broker.pid(), "unlimited");
    let recovered = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        publish(&port, &payload, refused)
    });
    assert!(
        recovered,
        "publishes acknowledged again once the file may grow"
    );
    acked.push(refused);
    for m in refused + 1..refused + 5 {
        assert!(publish(&port, &payload, m), "message {m} after recovery");
        acked.push(m);
    }
    assert_eq!(http_get(&metrics, "/readyz").0, 200, "ready again");
    assert_eq!(metric(&metrics, "tern_store_failing"), "0");
    // kill -9, restart: every acknowledged message is there.
    drop(broker);
    restart_and_check(start, &dir, &acked);
}

/// A new broker on the same data: every message in `acked` is there.
fn restart_and_check(start: impl Fn() -> BrokerProcess, dir: &std::path::Path, acked: &[usize]) {
    let broker = start();
    let port = broker.port(0).to_string();
    check_kept(&port, acked);
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn with_sync_a_store_file_that_cannot_grow_refuses_then_recovers_without_a_restart() {
    refuses_then_recovers_without_a_restart_and_loses_nothing("sync");
}

#[test]
fn with_batched_a_store_file_that_cannot_grow_refuses_then_recovers_without_a_restart() {
    refuses_then_recovers_without_a_restart_and_loses_nothing("batched");
}
