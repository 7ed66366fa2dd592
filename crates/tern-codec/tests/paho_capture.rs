//! Bytes from a client nobody here wrote: paho-mqtt (PyPI) runs one scripted session against
//! a listener this test opens, with tern-codec decoding every packet paho sends and writing
//! every answer. Each packet must re-encode to exactly the bytes paho sent, and must equal
//! the capture checked in under `testdata/paho-*/` (refresh with `TERN_BLESS=1`).
//! paho in turn parses our CONNACK, SUBACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP,
//! UNSUBACK and PINGRESP, and its script fails if any of them is wrong.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tern_codec::{
    Ack, ConnAck, MAX_PACKET_SIZE, Packet, PacketId, Protocol, Publish, QosPid, ReasonCode, SubAck,
    TopicName, UnsubAck, check, decode, encode,
};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn testdata(level: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(format!("paho-{level}"))
}

fn pid(n: u16) -> PacketId {
    PacketId::new(n).unwrap()
}

fn accept(listener: &TcpListener, child: &mut Child) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match listener.accept() {
            Ok((sock, _)) => {
                sock.set_nonblocking(false).unwrap();
                return sock;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("paho script exited before connecting ({status}); is paho-mqtt installed?");
        }
        assert!(Instant::now() < deadline, "paho never connected");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs the session; returns each packet paho sent, by name, as raw bytes.
fn capture(level: &str) -> BTreeMap<String, Vec<u8>> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut child = Command::new("python3")
        .arg(repo_root().join("tests/interop/paho_session.py"))
        .arg(port.to_string())
        .arg(level)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 must be installed (scripts/test installs paho-mqtt)");
    let mut sock = accept(&listener, &mut child);
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();

    let mut version = Protocol::V3_1_1;
    let mut buf = BytesMut::with_capacity(4096);
    let mut captures = BTreeMap::new();
    let mut done = false;
    while !done {
        let mut chunk = [0u8; 4096];
        let n = sock.read(&mut chunk).expect("paho went quiet");
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut replies = BytesMut::new();
        while let Some(len) = check(&buf, MAX_PACKET_SIZE).unwrap() {
            let raw = buf[..len].to_vec();
            let packet = decode(&mut buf, version, MAX_PACKET_SIZE).unwrap().unwrap();
            if let Packet::Connect(c) = &packet {
                version = c.protocol;
            }
            let mut again = BytesMut::new();
            encode(&packet, version, &mut again).unwrap();
            assert_eq!(&again[..], &raw[..], "re-encoding {packet:?}");
            let reply = |p: Packet, out: &mut BytesMut| encode(&p, version, out).unwrap();
            let name = match &packet {
                Packet::Connect(_) => {
                    reply(
                        Packet::ConnAck(ConnAck::new(false, ReasonCode::Success)),
                        &mut replies,
                    );
                    "connect".to_string()
                }
                Packet::Subscribe(s) => {
                    let reasons = s
                        .subscriptions
                        .iter()
                        .map(|s| ReasonCode::granted(s.options.qos))
                        .collect();
                    let ack = SubAck {
                        packet_id: s.packet_id,
                        reasons,
                        properties: Default::default(),
                    };
                    reply(Packet::SubAck(ack), &mut replies);
                    for (topic, qos_pid, payload) in [
                        ("tern/a/s1", QosPid::AtLeastOnce(pid(1)), "from server q1"),
                        ("tern/b/s2", QosPid::ExactlyOnce(pid(2)), "from server q2"),
                    ] {
                        let p = Publish::new(TopicName::new(topic).unwrap(), qos_pid, payload);
                        reply(Packet::Publish(p), &mut replies);
                    }
                    "subscribe".to_string()
                }
                Packet::Publish(p) => {
                    match p.qos_pid {
                        QosPid::AtMostOnce => {}
                        QosPid::AtLeastOnce(id) => {
                            reply(Packet::PubAck(Ack::new(id)), &mut replies)
                        }
                        QosPid::ExactlyOnce(id) => {
                            reply(Packet::PubRec(Ack::new(id)), &mut replies)
                        }
                    }
                    format!("publish-qos{}", p.qos_pid.qos() as u8)
                }
                Packet::PubAck(_) => "puback".to_string(),
                Packet::PubRec(a) => {
                    reply(Packet::PubRel(Ack::new(a.packet_id)), &mut replies);
                    "pubrec".to_string()
                }
                Packet::PubRel(a) => {
                    reply(Packet::PubComp(Ack::new(a.packet_id)), &mut replies);
                    "pubrel".to_string()
                }
                Packet::PubComp(_) => "pubcomp".to_string(),
                Packet::Unsubscribe(u) => {
                    let ack = UnsubAck {
                        packet_id: u.packet_id,
                        reasons: vec![ReasonCode::Success; u.filters.len()],
                        properties: Default::default(),
                    };
                    reply(Packet::UnsubAck(ack), &mut replies);
                    "unsubscribe".to_string()
                }
                Packet::PingReq => {
                    reply(Packet::PingResp, &mut replies);
                    "pingreq".to_string()
                }
                Packet::Disconnect(_) => {
                    done = true;
                    "disconnect".to_string()
                }
                other => panic!("paho sent an unexpected {other:?}"),
            };
            assert!(
                captures.insert(name.clone(), raw).is_none(),
                "two {name} packets"
            );
        }
        sock.write_all(&replies).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "paho script failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    captures
}

const EXPECTED: [&str; 12] = [
    "connect",
    "disconnect",
    "pingreq",
    "puback",
    "pubcomp",
    "publish-qos0",
    "publish-qos1",
    "publish-qos2",
    "pubrec",
    "pubrel",
    "subscribe",
    "unsubscribe",
];

fn compare_with_checked_in(level: &str, dir: &str) {
    let captures = capture(level);
    assert_eq!(
        captures.keys().map(String::as_str).collect::<Vec<_>>(),
        EXPECTED
    );
    let dir = testdata(dir);
    let bless = std::env::var_os("TERN_BLESS").is_some();
    if bless {
        std::fs::create_dir_all(&dir).unwrap();
    }
    for (name, raw) in &captures {
        let path = dir.join(format!("{name}.bin"));
        if bless {
            std::fs::write(&path, raw).unwrap();
        }
        let stored = std::fs::read(&path).unwrap_or_else(|e| {
            panic!("{}: {e} (run with TERN_BLESS=1 to capture)", path.display())
        });
        assert_eq!(
            raw,
            &stored,
            "{name}: paho's bytes differ from {}",
            path.display()
        );
    }
}

#[test]
fn paho_v3_1_1_session_reencodes_byte_exact_and_matches_checked_in_capture() {
    compare_with_checked_in("4", "v3.1.1");
}

#[test]
fn paho_v5_session_reencodes_byte_exact_and_matches_checked_in_capture() {
    compare_with_checked_in("5", "v5");
}

#[test]
fn paho_v3_1_session_reencodes_byte_exact_and_matches_checked_in_capture() {
    compare_with_checked_in("3", "v3.1");
}
