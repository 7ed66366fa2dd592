//! Fail-stop: a broker whose core task or storage writer has died must not stay up
//! answering nothing (no PUBACK, CONNACK or SUBACK would ever come, but PINGRESP might, so
//! clients would never reconnect). It goes not-ready and exits non-zero, for a supervisor
//! to restart it (packaging/systemd/tern.service). The deaths are injected with the
//! test-only fault hook (`TERN_FAULT_HOOK=1`, compiled into debug builds only).

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{BrokerProcess, http_get};

fn broker_with_fault_hook(name: &str, storage: &str) -> (BrokerProcess, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("tern-failstop-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut command = Command::new(env!("CARGO_BIN_EXE_tern"));
    command.env("TERN_FAULT_HOOK", "1");
    (BrokerProcess::in_dir_with(command, &dir, "", storage), dir)
}

fn exits_non_zero_and_not_ready_when(part: &str, retain: bool, storage: &str) {
    let (mut broker, dir) = broker_with_fault_hook(part, storage);
    let metrics = broker.metrics.clone().unwrap();
    // Ready once it has loaded its store and bound its listeners (just after it says it
    // listens).
    let ready = (0..500).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        http_get(&metrics, "/readyz").0 == 200
    });
    assert!(ready, "ready before");
    let port = broker.port(0).to_string();
    let topic = format!("tern/fault/{part}");
    let mut args = vec![
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-t",
        &topic,
        "-m",
        "x",
        "-q",
        "1",
    ];
    if retain {
        args.push("-r");
    }
    // Its answer never comes: it is killed with the broker, or times out.
    let mut publisher = Command::new("mosquitto_pub").args(&args).spawn().unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = broker.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the broker is still running after its {part} died"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!("{part}: exited {status} after {:?}", started.elapsed());
    assert!(!status.success(), "exit status {status}");
    assert_eq!(status.code(), Some(1));
    assert!(
        broker
            .wait_for("not ready", Duration::from_secs(5))
            .is_some(),
        "it said it went not-ready before exiting"
    );
    let _ = publisher.kill();
    let _ = publisher.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_broker_exits_non_zero_when_its_core_task_dies() {
    exits_non_zero_and_not_ready_when("core", false, "");
}

#[test]
fn the_broker_exits_non_zero_when_its_storage_writer_dies() {
    exits_non_zero_and_not_ready_when("writer", true, "");
}

/// With `durability = "batched"`, a flush that fails means what was acknowledged since the
/// last one may not be on disk: the broker stops rather than acknowledge more (the restart
/// replays its log).
#[test]
fn the_broker_exits_non_zero_when_a_batched_flush_fails() {
    exits_non_zero_and_not_ready_when("flush", true, "durability = \"batched\"\n");
}
