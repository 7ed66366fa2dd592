//! Write coalescing (`Listener::write_coalesce`): a write due soon after a small write
//! waits for the window to pass and goes out with what else is due; a write due after a
//! quiet spell goes out at once; without the option nothing is held back. Timing claims
//! here are lower bounds where the broker must wait (a timer never fires early, however
//! loaded the machine) and generous upper bounds where it must not.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

use std::num::NonZeroU16;
use std::time::{Duration, Instant};

use common::{Broker, Raw, Spec};
use tern_broker::auth::Access;
use tern_broker::core::Settings;
use tern_broker::server::AccessControl;
use tern_codec::{Connect, Packet, Protocol, Publish, QoS, QosPid, TopicName};

const WINDOW: Duration = Duration::from_millis(500);

fn broker(coalesce: Option<Duration>) -> Broker {
    let mut spec = Spec::tcp();
    spec.write_coalesce = coalesce;
    Broker::run(
        Settings::default(),
        Box::new(tern_store::MemoryStore::new()),
        AccessControl::new(Access::open()),
        None,
        vec![spec],
    )
}

fn publish(raw: &mut Raw, n: u8) {
    raw.send(Packet::Publish(Publish::new(
        TopicName::new("c/x").unwrap(),
        QosPid::new(QoS::AtMostOnce, NonZeroU16::new(1).unwrap()),
        vec![n],
    )));
}

fn payload(p: Option<Packet>) -> u8 {
    match p {
        Some(Packet::Publish(p)) => p.payload[0],
        other => panic!("want PUBLISH, got {other:?}"),
    }
}

/// Subscriber and publisher, both 5.0, the subscription in place and its SUBACK (itself a
/// write) a window in the past.
fn clients(b: &Broker) -> (Raw, Raw) {
    let (mut sub, _) = Raw::connect(b.port, Connect::new(Protocol::V5, "sub"));
    sub.subscribe("c/#", QoS::AtMostOnce);
    let (publisher, _) = Raw::connect(b.port, Connect::new(Protocol::V5, "pub"));
    std::thread::sleep(WINDOW + WINDOW / 2);
    (sub, publisher)
}

/// Publishes 1, then (once 1 arrived) 2 to 5 ten milliseconds apart; returns how long after
/// publishing 1 the subscriber had 1, and had 2.
fn burst(sub: &mut Raw, publisher: &mut Raw) -> (Duration, Duration) {
    let start = Instant::now();
    publish(publisher, 1);
    assert_eq!(payload(sub.recv()), 1);
    let first = start.elapsed();
    for n in 2..=5 {
        publish(publisher, n);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(payload(sub.recv()), 2);
    let second = start.elapsed();
    for n in 3..=5 {
        assert_eq!(payload(sub.recv()), n, "in order, none lost");
    }
    (first, second)
}

#[test]
fn with_coalescing_messages_right_after_a_write_wait_for_the_window_and_a_lone_one_does_not() {
    let b = broker(Some(WINDOW));
    let (mut sub, mut publisher) = clients(&b);
    let (first, second) = burst(&mut sub, &mut publisher);
    // The first write after a quiet spell goes at once.
    assert!(first < WINDOW * 2 / 3, "message 1 took {first:?}");
    // Its followers waited for the window after it (which began after `start`).
    assert!(
        second >= WINDOW,
        "message 2 came after {second:?}, inside the window"
    );

    // Quiet for longer than the window: the next message is not held.
    std::thread::sleep(WINDOW + WINDOW / 2);
    let start = Instant::now();
    publish(&mut publisher, 6);
    assert_eq!(payload(sub.recv()), 6);
    let lone = start.elapsed();
    assert!(lone < WINDOW * 2 / 3, "a lone message took {lone:?}");
}

#[test]
fn without_coalescing_nothing_is_held_back() {
    let b = broker(None);
    let (mut sub, mut publisher) = clients(&b);
    let (first, second) = burst(&mut sub, &mut publisher);
    assert!(first < WINDOW * 2 / 3, "message 1 took {first:?}");
    // Published ten milliseconds after message 1 arrived.
    assert!(second < WINDOW * 2 / 3, "message 2 took {second:?}");
}
