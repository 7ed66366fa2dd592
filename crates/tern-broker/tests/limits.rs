//! A client that exceeds each limit gets the reason code the protocol has for it (or its
//! connection closed where there is none), and only that client is affected.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

use std::num::NonZeroU16;

use common::{Broker, Raw, Spec};
use tern_broker::auth::Access;
use tern_broker::core::Settings;
use tern_broker::server::AccessControl;
use tern_codec::{
    Connect, Packet, Protocol, Publish, QoS, QosPid, ReasonCode, Subscribe, Subscription,
    SubscriptionOptions, TopicFilter, TopicName,
};

fn broker(settings: Settings, max_total: Option<usize>, specs: Vec<Spec>) -> Broker {
    Broker::run(
        settings,
        Box::new(tern_store::MemoryStore::new()),
        AccessControl::new(Access::open()),
        max_total,
        specs,
    )
}

fn publish(raw: &mut Raw, topic: &str, qos: QoS) -> Option<Packet> {
    raw.send(Packet::Publish(Publish::new(
        TopicName::new(topic).unwrap(),
        QosPid::new(qos, NonZeroU16::new(3).unwrap()),
        "x",
    )));
    if qos == QoS::AtMostOnce {
        None
    } else {
        raw.recv()
    }
}

fn subscribe(raw: &mut Raw, filter: &str) -> ReasonCode {
    raw.send(Packet::Subscribe(Subscribe {
        packet_id: NonZeroU16::new(1).unwrap(),
        subscriptions: vec![Subscription {
            filter: TopicFilter::new(filter).unwrap(),
            options: SubscriptionOptions::default(),
        }],
        properties: Default::default(),
    }));
    match raw.recv() {
        Some(Packet::SubAck(a)) => a.reasons[0],
        other => panic!("want SUBACK, got {other:?}"),
    }
}

fn ack_reason(p: Option<Packet>) -> ReasonCode {
    match p {
        Some(Packet::PubAck(a)) => a.reason,
        other => panic!("want PUBACK, got {other:?}"),
    }
}

#[test]
fn a_topic_beyond_the_length_or_level_limits_is_refused() {
    let settings = Settings {
        max_topic_length: 16,
        max_topic_levels: 3,
        ..Default::default()
    };
    let b = broker(settings, None, vec![Spec::tcp()]);
    let (mut c, _) = Raw::connect(b.port, Connect::new(Protocol::V5, "c"));
    let long = "a".repeat(17);
    assert_eq!(
        ack_reason(publish(&mut c, &long, QoS::AtLeastOnce)),
        ReasonCode::TopicNameInvalid
    );
    assert_eq!(
        ack_reason(publish(&mut c, "a/b/c/d", QoS::AtLeastOnce)),
        ReasonCode::TopicNameInvalid
    );
    assert_eq!(
        ack_reason(publish(&mut c, "a/b/c", QoS::AtLeastOnce)),
        ReasonCode::NoMatchingSubscribers
    );
    assert_eq!(subscribe(&mut c, &long), ReasonCode::TopicFilterInvalid);
    assert_eq!(subscribe(&mut c, "a/+/c/#"), ReasonCode::TopicFilterInvalid);
    assert_eq!(subscribe(&mut c, "a/+/c"), ReasonCode::Success);
    // QoS 0 has no acknowledgement to carry the refusal: DISCONNECT 0x90.
    publish(&mut c, &long, QoS::AtMostOnce);
    match c.recv() {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::TopicNameInvalid),
        other => panic!("want DISCONNECT, got {other:?}"),
    }
    assert_eq!(c.recv(), None);
    // 3.1.1: closed.
    let (mut old, _) = Raw::connect(b.port, Connect::new(Protocol::V3_1_1, "o"));
    assert_eq!(publish(&mut old, &long, QoS::AtLeastOnce), None);
}

#[test]
fn subscriptions_beyond_the_per_client_limit_get_0x97() {
    let settings = Settings {
        max_subscriptions: 2,
        ..Default::default()
    };
    let b = broker(settings, None, vec![Spec::tcp()]);
    let (mut c, _) = Raw::connect(b.port, Connect::new(Protocol::V5, "c"));
    assert_eq!(subscribe(&mut c, "a"), ReasonCode::Success);
    assert_eq!(subscribe(&mut c, "b"), ReasonCode::Success);
    assert_eq!(subscribe(&mut c, "c"), ReasonCode::QuotaExceeded);
    // Replacing one it has is not a new one.
    assert_eq!(subscribe(&mut c, "a"), ReasonCode::Success);
    let (mut old, _) = Raw::connect(b.port, Connect::new(Protocol::V3_1_1, "o"));
    subscribe(&mut old, "a");
    subscribe(&mut old, "b");
    assert_eq!(subscribe(&mut old, "c"), ReasonCode::UnspecifiedError);
}

#[test]
fn a_client_over_the_publish_rate_is_disconnected_with_0x96_and_others_go_on() {
    let settings = Settings {
        max_publish_rate: Some(5),
        ..Default::default()
    };
    let b = broker(settings, None, vec![Spec::tcp()]);
    let (mut calm, _) = Raw::connect(b.port, Connect::new(Protocol::V5, "calm"));
    let (mut fast, _) = Raw::connect(b.port, Connect::new(Protocol::V5, "fast"));
    for _ in 0..20 {
        publish(&mut fast, "t", QoS::AtMostOnce);
    }
    match fast.recv() {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::MessageRateTooHigh),
        other => panic!("want DISCONNECT 0x96, got {other:?}"),
    }
    assert_eq!(fast.recv(), None);
    for _ in 0..3 {
        assert_eq!(
            ack_reason(publish(&mut calm, "t", QoS::AtLeastOnce)),
            ReasonCode::NoMatchingSubscribers
        );
    }
    let (mut old, _) = Raw::connect(b.port, Connect::new(Protocol::V3_1_1, "old"));
    for _ in 0..20 {
        publish(&mut old, "t", QoS::AtMostOnce);
    }
    assert_eq!(old.recv(), None, "3.1.1: closed");
}

/// Connects, and returns the CONNACK reason with the client (kept open while held).
fn try_connect(port: u16, v: Protocol, id: &str) -> (ReasonCode, Raw) {
    let (raw, ack) = Raw::connect(port, Connect::new(v, id));
    (ack.reason, raw)
}

#[test]
fn connections_beyond_a_listeners_limit_get_0x97_and_a_freed_slot_is_reused() {
    let mut limited = Spec::tcp();
    limited.max_connections = Some(2);
    let b = broker(Settings::default(), None, vec![limited, Spec::tcp()]);
    let (r1, c1) = try_connect(b.ports[0], Protocol::V5, "1");
    let (r2, _c2) = try_connect(b.ports[0], Protocol::V5, "2");
    assert_eq!((r1, r2), (ReasonCode::Success, ReasonCode::Success));
    let (r3, mut c3) = try_connect(b.ports[0], Protocol::V5, "3");
    assert_eq!(r3, ReasonCode::QuotaExceeded);
    assert_eq!(c3.recv(), None, "closed after the refusal");
    let (r, _) = try_connect(b.ports[0], Protocol::V3_1_1, "4");
    assert_eq!(r, ReasonCode::ServerUnavailable, "3.1.1 return code 3");
    // The other listener has no limit of its own.
    let (r, _other) = try_connect(b.ports[1], Protocol::V5, "5");
    assert_eq!(r, ReasonCode::Success);
    // A refused connection holds its slot until its task ends: after the refusal it reads
    // (and drops) what the client still sends until the client closes, or for at most a
    // second (so the reason code is not lost to a reset). Close it, and free one more.
    drop(c3);
    drop(c1);
    let mut reason = ReasonCode::QuotaExceeded;
    for _ in 0..250 {
        reason = try_connect(b.ports[0], Protocol::V5, "6").0;
        if reason == ReasonCode::Success {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(reason, ReasonCode::Success, "the freed slot is given again");
}

#[test]
fn the_total_connection_limit_spans_listeners() {
    let b = broker(Settings::default(), Some(2), vec![Spec::tcp(), Spec::tcp()]);
    let (r1, _c1) = try_connect(b.ports[0], Protocol::V5, "1");
    let (r2, _c2) = try_connect(b.ports[1], Protocol::V5, "2");
    let (r3, _c3) = try_connect(b.ports[1], Protocol::V5, "3");
    assert_eq!(
        (r1, r2, r3),
        (
            ReasonCode::Success,
            ReasonCode::Success,
            ReasonCode::QuotaExceeded
        )
    );
}

#[test]
fn anonymous_access_is_per_listener() {
    let mut closed = Spec::tcp();
    closed.allow_anonymous = Some(false);
    let b = broker(Settings::default(), None, vec![closed, Spec::tcp()]);
    let (r, _) = try_connect(b.ports[0], Protocol::V5, "a");
    assert_eq!(r, ReasonCode::NotAuthorized);
    let (r, _) = try_connect(b.ports[1], Protocol::V5, "b");
    assert_eq!(r, ReasonCode::Success);
}

#[test]
fn a_subscriber_that_stops_reading_loses_only_its_own_qos0_copies() {
    let settings = Settings {
        max_queued_bytes: 2 << 20,
        ..Default::default()
    };
    let b = broker(settings, None, vec![Spec::tcp()]);
    let (mut stuck, _) = Raw::connect(b.port, Connect::new(Protocol::V5, "stuck"));
    stuck.subscribe("flood/#", QoS::AtMostOnce);
    let (mut reader, _) = Raw::connect(b.port, Connect::new(Protocol::V5, "reader"));
    reader.subscribe("flood/#", QoS::AtMostOnce);
    let (mut publisher, _) = Raw::connect(b.port, Connect::new(Protocol::V5, "pub"));
    // The reader reports its count after every chunk; the publisher waits for it, so the
    // reader is never far behind while "stuck" reads nothing at all.
    const CHUNK: usize = 1024;
    const CHUNKS: usize = 48; // 48 MiB of 1 KiB messages: far beyond the socket buffers
    let (progress, counts) = std::sync::mpsc::channel();
    let reading = std::thread::spawn(move || {
        let mut got = 0;
        while got < CHUNK * CHUNKS {
            match reader.recv() {
                Some(Packet::Publish(_)) => got += 1,
                Some(_) => {}
                None => break,
            }
            if got % CHUNK == 0 {
                let _ = progress.send(got);
            }
        }
        got
    });
    let payload = bytes::Bytes::from(vec![b'x'; 1024]);
    for chunk in 1..=CHUNKS {
        for _ in 0..CHUNK {
            publisher.send(Packet::Publish(Publish::new(
                TopicName::new("flood/a").unwrap(),
                QosPid::AtMostOnce,
                payload.clone(),
            )));
        }
        while counts
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the reading subscriber keeps up")
            < chunk * CHUNK
        {}
    }
    assert_eq!(
        reading.join().unwrap(),
        CHUNK * CHUNKS,
        "the reader got every message"
    );
    let (status, text) = common::get(b.monitor_port, "/metrics");
    assert_eq!(status, 200);
    let dropped =
        tern_broker::metrics::Metrics::find(&text, "tern_dropped_total{reason=\"slow_consumer\"}")
            .expect("the slow-consumer drops are exported") as u64;
    // Kernel buffers and the 2 MiB backlog hold some of the 48 MiB; the rest is dropped.
    assert!(
        dropped > (CHUNK * CHUNKS / 2) as u64,
        "most copies for the stuck subscriber were dropped: {dropped}"
    );
    // The publisher was never held up or disconnected.
    publisher.send(Packet::PingReq);
    assert!(matches!(publisher.recv(), Some(Packet::PingResp)));
    drop(stuck);
}

#[test]
fn a_client_that_stops_sending_and_never_reads_is_let_go_after_the_connect_timeout() {
    let settings = Settings {
        connect_timeout: std::time::Duration::from_secs(1),
        ..Default::default()
    };
    let b = broker(settings, None, vec![Spec::tcp()]);
    // Connections the listener holds: a client whose reading side has ended counts under
    // protocol "none" until its connection is let go.
    let open = |b: &Broker| {
        let (_, m) = common::get(b.monitor_port, "/metrics");
        ["none", "5.0"]
            .iter()
            .map(|p| {
                let series = format!(
                    "tern_connections{{listener=\"tcp 127.0.0.1:{}\",protocol=\"{p}\"}}",
                    b.port
                );
                tern_broker::metrics::Metrics::find(&m, &series).unwrap_or(0.0)
            })
            .sum::<f64>()
    };
    let (stuck, _) = Raw::connect(b.port, Connect::new(Protocol::V5, "stuck"));
    let mut stuck = stuck;
    stuck.subscribe("flood/#", QoS::AtMostOnce);
    let (mut publisher, _) = Raw::connect(b.port, Connect::new(Protocol::V5, "pub"));
    // 24 MiB for a subscriber that reads none of it: more than the socket buffers and the
    // backlog hold, so the broker is left with a write it cannot finish.
    let payload = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
    for _ in 0..384 {
        publisher.send(Packet::Publish(Publish::new(
            TopicName::new("flood/a").unwrap(),
            QosPid::AtMostOnce,
            payload.clone(),
        )));
    }
    publisher.send(Packet::PingReq);
    assert!(matches!(publisher.recv(), Some(Packet::PingResp)));
    assert_eq!(open(&b), 2.0, "both clients connected");
    // It stops sending, keeps its read side open and reads nothing.
    stuck.shutdown_write();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while open(&b) > 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the half-closed client still holds its connection after 10 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The publisher is unaffected.
    publisher.send(Packet::PingReq);
    assert!(matches!(publisher.recv(), Some(Packet::PingResp)));
    drop(stuck);
}

/// The paho MQTT 5 flow-control case: a client sends more QoS 2 messages than the
/// broker's Receive Maximum without reading. The broker answers DISCONNECT 0x93 and
/// closes; what the client sent meanwhile is read and discarded (for a bounded time) so
/// the close is a FIN, not a reset that would destroy the DISCONNECT before the client
/// reads it.
#[test]
fn a_client_over_the_receive_maximum_reads_its_disconnect_0x93_not_a_reset() {
    let settings = Settings {
        receive_maximum: 2,
        ..Settings::default()
    };
    let b = common::Broker::with(settings);
    for attempt in 0..5 {
        let (mut c, _) = Raw::connect(b.port, Connect::new(Protocol::V5, "flood"));
        let mut burst = bytes::BytesMut::new();
        for n in 1..=2_000u16 {
            let p = Publish::new(
                TopicName::new("t").unwrap(),
                QosPid::ExactlyOnce(std::num::NonZeroU16::new(n).unwrap()),
                vec![b'x'; 64],
            );
            tern_codec::encode(&Packet::Publish(p), Protocol::V5, &mut burst).unwrap();
        }
        // A client that writes everything before it reads (as paho does): megabytes, while
        // the broker has already decided to close. Its writes must not fail (a reset would
        // fail them, and the client would report a broken pipe, never the reason code).
        let mut w = c.writer();
        for round in 0..400 {
            use std::io::Write;
            if let Err(e) = w.write_all(&burst) {
                panic!(
                    "attempt {attempt}: write {round} failed: {e} (the broker reset the connection)"
                );
            }
        }
        let mut got = None;
        while let Some(p) = c.recv() {
            if let Packet::Disconnect(d) = p {
                got = Some(d.reason);
                break;
            }
        }
        assert_eq!(
            got,
            Some(ReasonCode::ReceiveMaximumExceeded),
            "attempt {attempt}: the DISCONNECT was read"
        );
    }
}

/// A client that does not read what it is sent is not read from either once more than
/// `max_write_backlog` waits for it: what it sends stays in TCP until it has taken its
/// backlog. (So a client that never reads cannot make the broker pile up answers to it.)
#[test]
fn a_client_that_does_not_read_is_not_read_from_until_it_takes_its_backlog() {
    let b = broker(
        Settings {
            max_write_backlog: 64 << 10,
            ..Settings::default()
        },
        None,
        vec![Spec::tcp()],
    );
    let (mut deaf, _) = Raw::connect(b.port, Connect::new(Protocol::V3_1_1, "deaf"));
    deaf.subscribe("flood", QoS::AtMostOnce);
    let (mut watcher, _) = Raw::connect(b.port, Connect::new(Protocol::V3_1_1, "watcher"));
    watcher.subscribe("probe", QoS::AtMostOnce);
    let (mut publisher, _) = Raw::connect(b.port, Connect::new(Protocol::V3_1_1, "flooder"));
    // More than the kernel's buffers hold (a socket that is never read keeps its receive
    // window small; the broker's send buffer grows to a few MiB): the rest waits in the
    // broker, past the backlog limit.
    let big = vec![b'x'; 256 << 10];
    for _ in 0..48 {
        publisher.send(Packet::Publish(Publish::new(
            TopicName::new("flood").unwrap(),
            QosPid::AtMostOnce,
            big.clone(),
        )));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    // The deaf client speaks: not read while its backlog waits.
    deaf.send(Packet::Publish(Publish::new(
        TopicName::new("probe").unwrap(),
        QosPid::AtMostOnce,
        "hello",
    )));
    assert!(
        !watcher.gets_within(std::time::Duration::from_secs(1)),
        "the broker read from a client with {} bytes waiting for it",
        64 << 10
    );
    // It takes what waits for it: then it is read again.
    let taken = deaf.drain(std::time::Duration::from_millis(500));
    assert!(taken > 4 << 20, "{taken} bytes taken");
    assert!(
        watcher.gets_within(std::time::Duration::from_secs(5)),
        "read again once its backlog was written"
    );
}
