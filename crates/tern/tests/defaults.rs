//! What the defaults promise, tried as a new user would, with clients nobody here wrote
//! (Debian's `mosquitto_pub` and `mosquitto_sub`): a persistent subscriber goes offline,
//! 20,000 messages are published and acknowledged, the broker is killed with SIGKILL and
//! restarted, and the subscriber comes back to every one of them (the default used to keep
//! 1,000 and drop the rest for room). At QoS 2, exactly once.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use support::BrokerProcess;

const MESSAGES: usize = 20_000;

fn mosquitto(tool: &str, port: &str, args: &[&str]) -> Command {
    let mut c = Command::new(tool);
    c.args(["-h", "127.0.0.1", "-p", port]).args(args);
    c
}

fn keeps_every_acknowledged_message(qos: &str) {
    let dir = std::env::temp_dir().join(format!("tern-defaults-q{qos}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Nothing but a listener and the data directory: every other setting is the default.
    let broker = BrokerProcess::in_dir(&dir, "");
    let port = broker.port(0).to_string();
    let topic = format!("jobs/q{qos}");
    let keeper = format!("keeper-q{qos}");
    // The persistent session and its subscription, then away (-E: exit after SUBACK).
    let status = mosquitto(
        "mosquitto_sub",
        &port,
        &["-i", &keeper, "-c", "-q", qos, "-t", &topic, "-E"],
    )
    .status()
    .unwrap();
    assert!(status.success(), "mosquitto_sub subscribed: {status}");
    // One message per line; mosquitto_pub exits 0 once each is acknowledged.
    let mut publisher = mosquitto(
        "mosquitto_pub",
        &port,
        &["-i", &format!("pub-q{qos}"), "-q", qos, "-t", &topic, "-l"],
    )
    .stdin(Stdio::piped())
    .spawn()
    .unwrap();
    {
        let mut stdin = publisher.stdin.take().unwrap();
        let lines: String = (1..=MESSAGES).map(|i| format!("{i}\n")).collect();
        std::io::Write::write_all(&mut stdin, lines.as_bytes()).unwrap();
    }
    let status = publisher.wait().unwrap();
    assert!(status.success(), "mosquitto_pub: {status}");
    // kill -9, and a new process on the same data.
    drop(broker);
    let broker = BrokerProcess::in_dir(&dir, "");
    let port = broker.port(0).to_string();
    let out = mosquitto(
        "mosquitto_sub",
        &port,
        &[
            "-i",
            &keeper,
            "-c",
            "-q",
            qos,
            "-t",
            &topic,
            "-C",
            &MESSAGES.to_string(),
            "-W",
            "60",
        ],
    )
    .output()
    .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let got: Vec<usize> = text.lines().map(|l| l.parse().unwrap()).collect();
    let distinct: BTreeSet<usize> = got.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        MESSAGES,
        "every acknowledged message came back (got {} lines, {} distinct; mosquitto_sub: {})",
        got.len(),
        distinct.len(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(distinct, (1..=MESSAGES).collect(), "and only those");
    if qos == "2" {
        assert_eq!(got.len(), MESSAGES, "QoS 2: none twice");
    }
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "in the order they were published"
    );
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn with_defaults_20000_qos1_messages_for_an_offline_subscriber_survive_kill_9() {
    keeps_every_acknowledged_message("1");
}

#[test]
fn with_defaults_20000_qos2_messages_for_an_offline_subscriber_survive_kill_9_exactly_once() {
    keeps_every_acknowledged_message("2");
}

/// Queued messages live in the store, not in memory: 20 offline persistent sessions with
/// 10,000 queued messages each (200,000 copies, each of 64 bytes) grow the broker's
/// memory by less than 16 MB (measured: 5 MB; `sessions.memory_window = 0`, which keeps
/// queues in memory, grows it by 30 MB and fails this: tried). The
/// store's page cache is set small so the bound is about the queues; the figure for the
/// defaults is `scripts/bench-queue-memory`'s.
#[test]
fn queued_messages_wait_in_the_store_not_in_memory() {
    const SESSIONS: usize = 20;
    const PER: usize = 10_000;
    let dir = std::env::temp_dir().join(format!("tern-defaults-memory-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let window = std::env::var("TERN_TEST_MEMORY_WINDOW").unwrap_or_else(|_| "1000".into());
    let broker = BrokerProcess::in_dir_with(
        std::process::Command::new(env!("CARGO_BIN_EXE_tern")),
        &dir,
        &format!("[sessions]\nmemory_window = {window}"),
        "durability = \"batched\"\ncache_mb = 4",
    );
    let port = broker.port(0).to_string();
    for i in 0..SESSIONS {
        let status = mosquitto(
            "mosquitto_sub",
            &port,
            &[
                "-i",
                &format!("mem-{i}"),
                "-c",
                "-q",
                "1",
                "-t",
                "mem/t",
                "-E",
            ],
        )
        .status()
        .unwrap();
        assert!(status.success(), "mosquitto_sub subscribed: {status}");
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let empty = support::rss_kib(broker.pid());
    let mut publisher = mosquitto(
        "mosquitto_pub",
        &port,
        &["-i", "mem-pub", "-q", "1", "-t", "mem/t", "-l"],
    )
    .stdin(Stdio::piped())
    .spawn()
    .unwrap();
    {
        let mut stdin = publisher.stdin.take().unwrap();
        let line = format!("{}\n", "x".repeat(64));
        std::io::Write::write_all(&mut stdin, line.repeat(PER).as_bytes()).unwrap();
    }
    assert!(publisher.wait().unwrap().success());
    std::thread::sleep(std::time::Duration::from_millis(300));
    let full = support::rss_kib(broker.pid());
    let grown_mb = full.saturating_sub(empty) as f64 / 1024.0;
    eprintln!("{} queued: {empty} -> {full} KiB", SESSIONS * PER);
    assert!(
        grown_mb < 16.0,
        "{} queued messages grew the broker by {grown_mb:.1} MiB ({empty} -> {full} KiB)",
        SESSIONS * PER
    );
    // And they are all there: one session comes back for its queue.
    let out = mosquitto(
        "mosquitto_sub",
        &port,
        &[
            "-i",
            "mem-0",
            "-c",
            "-q",
            "1",
            "-t",
            "mem/t",
            "-C",
            &PER.to_string(),
            "-W",
            "60",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), PER);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
