//! Stopping the server tells 5.0 clients why: DISCONNECT 0x8B Server shutting down.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::BytesMut;
use tern_codec::{Connect, MAX_PACKET_SIZE, Packet, Protocol, ReasonCode, decode, encode};

#[test]
fn a_v5_client_gets_disconnect_0x8b_when_the_broker_stops() {
    let broker = common::Broker::start();
    let mut sock = TcpStream::connect(("127.0.0.1", broker.port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut out = BytesMut::new();
    encode(
        &Packet::Connect(Box::new(Connect::new(Protocol::V5, "stopper"))),
        Protocol::V5,
        &mut out,
    )
    .unwrap();
    sock.write_all(&out).unwrap();

    let mut buf = BytesMut::new();
    let mut read = |buf: &mut BytesMut| {
        loop {
            if let Some(p) = decode(buf, Protocol::V5, MAX_PACKET_SIZE).unwrap() {
                return Some(p);
            }
            let mut chunk = [0u8; 256];
            let n = sock.read(&mut chunk).unwrap();
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    assert!(matches!(read(&mut buf), Some(Packet::ConnAck(a)) if a.reason == ReasonCode::Success));
    drop(broker);
    match read(&mut buf) {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::ServerShuttingDown),
        other => panic!("want DISCONNECT 0x8B, got {other:?}"),
    }
    assert!(read(&mut buf).is_none(), "then the connection closes");
}

#[test]
fn a_connection_that_never_sends_connect_is_closed_after_the_connect_timeout() {
    let broker = common::Broker::with(tern_broker::core::Settings {
        connect_timeout: Duration::from_millis(300),
        ..Default::default()
    });
    let mut sock = TcpStream::connect(("127.0.0.1", broker.port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = std::time::Instant::now();
    let mut byte = [0u8; 1];
    assert_eq!(sock.read(&mut byte).unwrap(), 0, "closed without a word");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "not before the timeout"
    );
}

#[test]
fn a_connect_trickled_in_a_byte_at_a_time_is_still_bound_by_the_connect_timeout() {
    let broker = common::Broker::with(tern_broker::core::Settings {
        connect_timeout: Duration::from_millis(400),
        ..Default::default()
    });
    let mut sock = TcpStream::connect(("127.0.0.1", broker.port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut trickle = sock.try_clone().unwrap();
    // A CONNECT announcing 100 bytes, sent a byte every 50 ms: every read brings something,
    // none completes the packet, and the whole would take 5 s.
    let writer = std::thread::spawn(move || {
        for b in [0x10u8, 100].into_iter().chain(std::iter::repeat_n(0, 100)) {
            if trickle.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let started = std::time::Instant::now();
    let mut byte = [0u8; 1];
    let closed = matches!(sock.read(&mut byte), Ok(0) | Err(_));
    let waited = started.elapsed();
    assert!(closed, "the connection is closed");
    assert!(
        waited < Duration::from_secs(3),
        "closed at the timeout, not when the trickle ends: {waited:?}"
    );
    writer.join().unwrap();
}

#[test]
fn a_first_packet_other_than_connect_closes_the_connection() {
    let broker = common::Broker::start();
    let mut sock = TcpStream::connect(("127.0.0.1", broker.port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.write_all(&[0xC0, 0x00]).unwrap(); // PINGREQ
    let mut byte = [0u8; 1];
    assert_eq!(sock.read(&mut byte).unwrap(), 0);
}
