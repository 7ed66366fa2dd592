//! Fail-stop: a broker whose core task or storage writer has died must not stay up
//! answering nothing (no PUBACK, CONNACK or SUBACK would ever come, but PINGRESP might, so
//! clients would never reconnect). It goes not-ready and exits non-zero, for a supervisor
//! to restart it (packaging/systemd/tern.service). The deaths are injected with the
//! test-only fault hook (`TERN_FAULT_HOOK=1`, compiled into debug builds only).

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::process::Command;

use std::time::{Duration, Instant};
use tern_codec::Packet;

use support::{BrokerProcess, encoded, http_get};

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

/// A core that falls behind (slowed by the test-only fault hook: 2 ms over every read it
/// is handed) while a client floods it with QoS 0: the connections stop reading once
/// 32 MiB wait for the core (TCP holds the rest), so the broker's memory stays bounded.
/// Without that limit the same flood grows it by hundreds of MB (tried).
#[test]
fn a_core_that_falls_behind_stops_the_reading_and_memory_stays_bounded() {
    let (broker, dir) = broker_with_fault_hook("inbox", "durability = \"none\"");
    let addr = format!("127.0.0.1:{}", broker.port(0));
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    let connect = tern_codec::Connect::new(tern_codec::Protocol::V3_1_1, "flooder");
    s.write_all(&encoded(Packet::Connect(Box::new(connect))))
        .unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).unwrap();
    let publish = |topic: &str, payload: Vec<u8>| {
        encoded(Packet::Publish(tern_codec::Publish::new(
            tern_codec::TopicName::new(topic).unwrap(),
            tern_codec::QosPid::AtMostOnce,
            payload,
        )))
    };
    s.write_all(&publish("tern/fault/slow-core", b"on".to_vec()))
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let before = support::rss_kib(broker.pid());
    // The flood, from another thread: 1 KiB messages, 64 at a time, for 3 s.
    let chunk: Vec<u8> = (0..64)
        .flat_map(|_| publish("flood/t", vec![b'x'; 1024]))
        .collect();
    let mut w = s.try_clone().unwrap();
    let flooding = std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(3);
        let mut sent = 0usize;
        while Instant::now() < until {
            if w.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    let mut peak = before;
    while !flooding.is_finished() {
        peak = peak.max(support::rss_kib(broker.pid()));
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = flooding.join().unwrap();
    s.write_all(&publish("tern/fault/slow-core", b"off".to_vec()))
        .unwrap();
    let grown_mb = peak.saturating_sub(before) as f64 / 1024.0;
    eprintln!(
        "flooded {} MiB; broker RSS {before} KiB -> peak {peak} KiB (+{grown_mb:.1} MiB)",
        sent >> 20
    );
    assert!(sent > 48 << 20, "the flood was a flood: {sent} bytes");
    assert!(grown_mb < 96.0, "memory grew by {grown_mb:.1} MiB");
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A connection whose first packet is not a CONNECT is the core's to refuse; what it weighs
/// in the core's inbox is counted on the way in as on the way out, so afterwards everyone
/// is still read (a count that went below zero once stopped all reading).
#[test]
fn a_first_packet_that_is_not_connect_leaves_everyone_else_read() {
    let (broker, dir) = broker_with_fault_hook("first-packet", "durability = \"none\"");
    let addr = format!("127.0.0.1:{}", broker.port(0));
    let mut bad = std::net::TcpStream::connect(&addr).unwrap();
    bad.write_all(&encoded(Packet::PingReq)).unwrap();
    let mut rest = Vec::new();
    let _ = bad.read_to_end(&mut rest);
    let port = broker.port(0).to_string();
    let out = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            "1",
            "-t",
            "after/t",
            "-m",
            "x",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "a later client is served: {out:?}");
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The flood of the issue: a subscriber that never reads, a publisher that never reads its
/// PUBACKs, 1 KiB messages at QoS 0 and QoS 1 for 3 s. What waits for the subscriber is
/// bounded by `limits.max_write_backlog_bytes` (its QoS 0 copies are dropped past it), and
/// the publisher is not read from while its PUBACKs wait (TCP holds the rest), so the
/// broker's memory stays bounded and it goes on serving others. Measured: +57 MiB for a
/// 112 MiB flood; with the backlog limit raised to 4 GiB, +132 MiB for 121 MiB and the
/// bound fails (tried).
#[test]
fn a_flood_from_a_publisher_that_never_reads_to_a_subscriber_that_never_reads_stays_bounded() {
    let dir = std::env::temp_dir().join(format!("tern-flood-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let broker = BrokerProcess::in_dir_with(Command::new(env!("CARGO_BIN_EXE_tern")), &dir, "", "");
    let addr = format!("127.0.0.1:{}", broker.port(0));
    let connect = |id: &str| {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        let c = tern_codec::Connect::new(tern_codec::Protocol::V3_1_1, id);
        s.write_all(&encoded(Packet::Connect(Box::new(c)))).unwrap();
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack).unwrap();
        s
    };
    let mut sub = connect("never-reads-sub");
    let subscribe = tern_codec::Subscribe {
        packet_id: std::num::NonZeroU16::new(1).unwrap(),
        subscriptions: vec![tern_codec::Subscription {
            filter: tern_codec::TopicFilter::new("flood/#").unwrap(),
            options: Default::default(),
        }],
        properties: Default::default(),
    };
    sub.write_all(&encoded(Packet::Subscribe(subscribe)))
        .unwrap();
    let mut suback = [0u8; 5];
    sub.read_exact(&mut suback).unwrap();
    // From now on the subscriber reads nothing.
    let mut publisher = connect("never-reads-pub");
    std::thread::sleep(Duration::from_millis(200));
    let before = support::rss_kib(broker.pid());
    let flooding = std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(3);
        let (mut sent, mut id) = (0usize, 0u16);
        // A write may stop part way once the broker stops reading: the rest of the chunk
        // goes first next time, so the stream stays whole.
        publisher
            .set_write_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let (mut chunk, mut at) = (Vec::new(), 0);
        while Instant::now() < until {
            if at == chunk.len() {
                chunk.clear();
                at = 0;
                for i in 0..64 {
                    let qos = if i % 2 == 0 {
                        tern_codec::QosPid::AtMostOnce
                    } else {
                        id = id.checked_add(1).unwrap_or(1);
                        tern_codec::QosPid::AtLeastOnce(tern_codec::PacketId::new(id).unwrap())
                    };
                    chunk.extend(encoded(Packet::Publish(tern_codec::Publish::new(
                        tern_codec::TopicName::new("flood/t").unwrap(),
                        qos,
                        vec![b'x'; 1024],
                    ))));
                }
            }
            match publisher.write(&chunk[at..]) {
                Ok(n) => {
                    at += n;
                    sent += n;
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("the publisher's connection failed: {e}"),
            }
        }
        (sent, publisher)
    });
    let mut peak = before;
    while !flooding.is_finished() {
        peak = peak.max(support::rss_kib(broker.pid()));
        std::thread::sleep(Duration::from_millis(50));
    }
    let joined = flooding.join();
    if joined.is_err() {
        while let Some(l) = broker.wait_for("never-reads-pub", Duration::from_millis(500)) {
            eprintln!("LOG {l}");
        }
    }
    let (sent, _publisher) = joined.unwrap();
    let grown_mb = peak.saturating_sub(before) as f64 / 1024.0;
    eprintln!(
        "flooded {} MiB; broker RSS {before} KiB -> peak {peak} KiB (+{grown_mb:.1} MiB)",
        sent >> 20
    );
    // Others are still served while the two hold their connections open.
    let port = broker.port(0).to_string();
    let out = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            "1",
            "-t",
            "other/t",
            "-m",
            "x",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "another client is served: {out:?}");
    assert!(sent > 16 << 20, "the flood was a flood: {sent} bytes");
    assert!(grown_mb < 96.0, "memory grew by {grown_mb:.1} MiB");
    drop(sub);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
