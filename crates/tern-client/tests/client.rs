//! The client against Tern (in process) and Debian's Mosquitto (a child process): every
//! QoS on one connection in 3.1.1 and 5.0, retained messages with wildcards, and
//! reconnection with session resume through a proxy that keeps cutting the connection.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Broker, next_message};
use tern_client::{Backoff, Client, Event, Options, Protocol, QoS, ReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn every_qos_on_one_connection(broker: &Broker, v: Protocol) {
    let what = format!("{} {v}", broker.name());
    let id = |s: &str| format!("{s}-{}", broker.port());
    let (sub, mut events) =
        Client::connect(Options::new("127.0.0.1", broker.port(), id("sub")).protocol(v))
            .await
            .unwrap();
    assert_eq!(
        sub.subscribe("qos/#", QoS::ExactlyOnce).await.unwrap(),
        ReasonCode::GrantedQos2,
        "{what}"
    );
    let (publisher, _) =
        Client::connect(Options::new("127.0.0.1", broker.port(), id("pub")).protocol(v))
            .await
            .unwrap();
    for (topic, qos) in [
        ("qos/telemetry", QoS::AtMostOnce),
        ("qos/chat", QoS::AtLeastOnce),
        ("qos/payment", QoS::ExactlyOnce),
    ] {
        let reason = publisher
            .publish(topic, topic.as_bytes().to_vec())
            .qos(qos)
            .await;
        assert_eq!(reason.unwrap(), ReasonCode::Success, "{what}: {topic}");
        let m = next_message(&mut events).await;
        assert_eq!(
            (m.topic.as_str(), m.qos, &m.payload[..]),
            (topic, qos, topic.as_bytes()),
            "{what}"
        );
    }
    // Retained, read through a wildcard by a client that subscribes afterwards.
    publisher
        .publish("state/lamp", "on")
        .qos(QoS::AtLeastOnce)
        .retain(true)
        .await
        .unwrap();
    let (late, mut late_events) =
        Client::connect(Options::new("127.0.0.1", broker.port(), id("late")).protocol(v))
            .await
            .unwrap();
    late.subscribe("state/+", QoS::AtLeastOnce).await.unwrap();
    let m = next_message(&mut late_events).await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..], m.retain),
        ("state/lamp", &b"on"[..], true),
        "{what}"
    );
    assert_eq!(
        sub.unsubscribe("qos/#").await.unwrap(),
        ReasonCode::Success,
        "{what}"
    );
    publisher.disconnect().await;
    sub.disconnect().await;
    late.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_qos_and_retained_against_tern_in_3_1_1_and_5() {
    let broker = Broker::tern().await;
    every_qos_on_one_connection(&broker, Protocol::V5).await;
    every_qos_on_one_connection(&broker, Protocol::V3_1_1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_qos_and_retained_against_mosquitto_in_3_1_1_and_5() {
    let broker = Broker::mosquitto().await;
    every_qos_on_one_connection(&broker, Protocol::V5).await;
    every_qos_on_one_connection(&broker, Protocol::V3_1_1).await;
}

/// Forwards connections to `port`, cutting each one after a number of forwarded chunks
/// that cycles 1, 2, 3, ... `cycle` (so cuts land at every step of the handshakes).
/// Returns its port and how many cuts it made.
async fn cutting_proxy(port: u16, cycle: usize) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    let cuts = Arc::new(AtomicUsize::new(0));
    let counter = cuts.clone();
    tokio::spawn(async move {
        let mut n = 0usize;
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            n += 1;
            let budget = 1 + n % cycle;
            let cuts = counter.clone();
            tokio::spawn(async move {
                let Ok(mut server) = TcpStream::connect(("127.0.0.1", port)).await else {
                    return;
                };
                let (mut a, mut b) = ([0u8; 4096], [0u8; 4096]);
                // The CONNECT and CONNACK always pass: cuts fall after them.
                let mut forwarded = 0usize;
                loop {
                    tokio::select! {
                        r = client.read(&mut a) => match r {
                            Ok(k) if k > 0 => { if server.write_all(&a[..k]).await.is_err() { return; } }
                            _ => return,
                        },
                        r = server.read(&mut b) => match r {
                            Ok(k) if k > 0 => { if client.write_all(&b[..k]).await.is_err() { return; } }
                            _ => return,
                        },
                    }
                    forwarded += 1;
                    if forwarded >= budget + 2 {
                        cuts.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            });
        }
    });
    (proxy_port, cuts)
}

async fn survives_cuts(broker: &Broker) {
    let port = broker.port();
    let (sub, mut events) = Client::connect(
        Options::new("127.0.0.1", port, format!("cut-sub-{port}"))
            .persistent(Duration::from_secs(600)),
    )
    .await
    .unwrap();
    sub.subscribe("cut/#", QoS::ExactlyOnce).await.unwrap();
    let (proxy, cuts) = cutting_proxy(port, 5).await;
    let backoff = Backoff {
        initial: Duration::from_millis(5),
        max: Duration::from_millis(50),
    };
    let (publisher, _) = Client::connect(
        Options::new("127.0.0.1", proxy, format!("cut-pub-{port}"))
            .persistent(Duration::from_secs(600))
            .reconnect(Some(backoff)),
    )
    .await
    .unwrap();
    // Waves of 3 concurrent publishes (QoS 1 and 2 mixed), each awaited: many small
    // exchanges, so the cuts land at every step of both handshakes.
    let count = 60;
    for wave in (0..count).step_by(3) {
        let mut futures = Vec::new();
        for i in wave..wave + 3 {
            let qos = if i % 2 == 0 {
                QoS::AtLeastOnce
            } else {
                QoS::ExactlyOnce
            };
            let p = publisher.clone();
            futures.push(tokio::spawn(async move {
                p.publish(format!("cut/{i}"), i.to_string()).qos(qos).await
            }));
        }
        for f in futures {
            let outcome = tokio::time::timeout(Duration::from_secs(60), f)
                .await
                .expect("every publish resolves")
                .unwrap();
            assert_eq!(outcome.unwrap(), ReasonCode::Success, "{}", broker.name());
        }
    }
    // Every message arrives; QoS 2 exactly once, QoS 1 at least once.
    let mut seen: HashMap<String, usize> = HashMap::new();
    while seen.len() < count {
        let m = next_message(&mut events).await;
        *seen.entry(m.topic.as_str().to_string()).or_default() += 1;
    }
    // Late duplicates of QoS 1 may still come; give them a moment, then count.
    while let Ok(Some(Event::Message(m))) =
        tokio::time::timeout(Duration::from_millis(300), events.recv()).await
    {
        *seen.entry(m.topic.as_str().to_string()).or_default() += 1;
    }
    for i in (1..count).step_by(2) {
        assert_eq!(
            seen[&format!("cut/{i}")],
            1,
            "{}: QoS 2 cut/{i} exactly once",
            broker.name()
        );
    }
    assert!(
        cuts.load(Ordering::Relaxed) >= 5,
        "{}: the proxy cut only {} times",
        broker.name(),
        cuts.load(Ordering::Relaxed)
    );
    publisher.disconnect().await;
    sub.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_1_at_least_once_and_qos_2_exactly_once_through_a_cutting_proxy_with_tern() {
    survives_cuts(&Broker::tern().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_1_at_least_once_and_qos_2_exactly_once_through_a_cutting_proxy_with_mosquitto() {
    survives_cuts(&Broker::mosquitto().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stamped_messages_carry_distinct_keys_that_dedup_reads() {
    let broker = Broker::tern().await;
    let (sub, mut events) = Client::connect(Options::new("127.0.0.1", broker.port(), "st-sub"))
        .await
        .unwrap();
    sub.subscribe("st/#", QoS::AtLeastOnce).await.unwrap();
    let (publisher, _) =
        Client::connect(Options::new("127.0.0.1", broker.port(), "st-pub").stamp("msg-id"))
            .await
            .unwrap();
    let mut dedup = tern_client::Dedup::new(100);
    let mut keys = std::collections::HashSet::new();
    for i in 0..5 {
        publisher
            .publish("st/x", format!("{i}"))
            .qos(QoS::AtLeastOnce)
            .await
            .unwrap();
        let m = next_message(&mut events).await;
        let key = m
            .properties
            .user_properties
            .iter()
            .find(|(k, _)| k == "msg-id")
            .map(|(_, v)| v.to_string())
            .expect("a stamped key");
        assert!(key.starts_with("st-pub-"), "{key}");
        keys.insert(key);
        assert!(dedup.is_new(&m), "a new key");
        assert!(!dedup.is_new(&m), "the same message again is a repeat");
    }
    assert_eq!(keys.len(), 5, "every key distinct");
    publisher.disconnect().await;
    sub.disconnect().await;
}

/// An application that does not take its events: the client stops reading at
/// `max_unread` (and the broker holds the rest), then delivers everything, once and in
/// order, when the application catches up.
async fn holds_back_a_slow_application(broker: &Broker) {
    const SENT: usize = 3000;
    const LIMIT: usize = 50;
    let what = broker.name();
    let (sub, mut events) = Client::connect(
        Options::new("127.0.0.1", broker.port(), format!("slow-{what}")).max_unread(LIMIT),
    )
    .await
    .unwrap();
    sub.subscribe("flood/#", QoS::AtMostOnce).await.unwrap();
    let (publisher, _) = Client::connect(Options::new(
        "127.0.0.1",
        broker.port(),
        format!("flooder-{what}"),
    ))
    .await
    .unwrap();
    let payload = vec![b'x'; 512];
    for i in 0..SENT {
        let mut p = payload.clone();
        p[..8].copy_from_slice(&(i as u64).to_be_bytes());
        publisher.publish("flood/a", p).await.unwrap();
    }
    // The broker answers this after routing everything before it.
    publisher
        .publish("flood/a", "end")
        .qos(QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let unread = events.unread();
    assert!(
        unread < 1000,
        "{what}: {unread} of {SENT} messages read for an application that takes none (limit {LIMIT})"
    );
    for i in 0..SENT {
        let m = next_message(&mut events).await;
        assert_eq!(
            u64::from_be_bytes(m.payload[..8].try_into().unwrap()),
            i as u64,
            "{what}: every message, in order"
        );
    }
    assert_eq!(&next_message(&mut events).await.payload[..], b"end");
    assert_eq!(events.unread(), 0);
    publisher.disconnect().await;
    sub.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_application_holds_the_broker_back_instead_of_filling_memory_tern() {
    holds_back_a_slow_application(&Broker::tern().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_application_holds_the_broker_back_instead_of_filling_memory_mosquitto() {
    holds_back_a_slow_application(&Broker::mosquitto().await).await;
}

/// A request/response handler that publishes (and waits for the PUBACK) from its event
/// loop, with far more requests waiting than `max_unread`: reading goes on while it waits
/// for an answer, so it never deadlocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_that_publishes_from_its_event_loop_does_not_deadlock_at_max_unread() {
    const REQUESTS: usize = 300;
    let broker = Broker::tern().await;
    let (handler, mut events) =
        Client::connect(Options::new("127.0.0.1", broker.port(), "handler").max_unread(5))
            .await
            .unwrap();
    handler.subscribe("req/#", QoS::AtLeastOnce).await.unwrap();
    let (requester, mut replies) =
        Client::connect(Options::new("127.0.0.1", broker.port(), "requester"))
            .await
            .unwrap();
    requester
        .subscribe("resp/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    for i in 0..REQUESTS {
        requester
            .publish("req/x", format!("{i}"))
            .qos(QoS::AtLeastOnce)
            .await
            .unwrap();
    }
    let handled = tokio::time::timeout(Duration::from_secs(30), async {
        for _ in 0..REQUESTS {
            let m = next_message(&mut events).await;
            handler
                .publish("resp/x", m.payload)
                .qos(QoS::AtLeastOnce)
                .await
                .unwrap();
        }
    })
    .await;
    assert!(handled.is_ok(), "the handler deadlocked");
    for i in 0..REQUESTS {
        let m = next_message(&mut replies).await;
        assert_eq!(&m.payload[..], format!("{i}").as_bytes());
    }
    requester.disconnect().await;
    handler.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_to_an_invalid_topic_is_refused_naming_it_and_the_client_goes_on() {
    let broker = Broker::tern().await;
    let (client, mut events) =
        Client::connect(Options::new("127.0.0.1", broker.port(), "bad-topic"))
            .await
            .unwrap();
    for bad in ["a/+", "a/#", ""] {
        match client.publish(bad, "x").send() {
            Err(tern_client::Error::Topic(t)) => assert_eq!(t, bad),
            Err(e) => panic!("{bad:?}: {e}"),
            Ok(_) => panic!("{bad:?} accepted"),
        }
    }
    client.subscribe("ok/#", QoS::AtLeastOnce).await.unwrap();
    client
        .publish("ok/1", "fine")
        .qos(QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(&next_message(&mut events).await.payload[..], b"fine");
    client.disconnect().await;
}

/// An application that takes nothing for several keep-alive periods while messages keep
/// coming: the client stays connected (it still reads the PINGRESP), and everything arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_client_still_reads_its_ping_responses_and_stays_connected() {
    let broker = Broker::tern().await;
    let (sub, mut events) = Client::connect(
        Options::new("127.0.0.1", broker.port(), "paused")
            .keep_alive(1)
            .max_unread(5),
    )
    .await
    .unwrap();
    sub.subscribe("p/#", QoS::AtMostOnce).await.unwrap();
    let (publisher, _) = Client::connect(Options::new("127.0.0.1", broker.port(), "p-pub"))
        .await
        .unwrap();
    for i in 0..40u32 {
        publisher
            .publish("p/x", i.to_be_bytes().to_vec())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut got = 0u32;
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(500), events.recv()).await {
        match e {
            Event::Message(m) => {
                assert_eq!(&m.payload[..], got.to_be_bytes(), "in order, none lost");
                got += 1;
            }
            Event::Disconnected { reason } => panic!("disconnected while paused: {reason}"),
            Event::Connected { .. } => {}
        }
    }
    assert_eq!(got, 40);
    publisher.disconnect().await;
    sub.disconnect().await;
}

/// More publishes handed over at once than the client takes in one turn (1,024): every
/// one is sent and acknowledged, none dropped between turns (each used to lose the
/// 1,025th, its outcome `Closed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_larger_than_one_turn_of_commands_is_sent_whole() {
    let broker = Broker::tern().await;
    let (client, _events) = Client::connect(Options::new("127.0.0.1", broker.port(), "burst"))
        .await
        .unwrap();
    let outcomes: Vec<_> = (0..3000)
        .map(|i| {
            client
                .publish("burst/t", format!("{i}"))
                .qos(QoS::AtLeastOnce)
                .send()
                .unwrap()
        })
        .collect();
    for (i, o) in outcomes.into_iter().enumerate() {
        let r = o.await;
        assert!(
            matches!(r, Ok(ref c) if !c.is_error()),
            "publish {i}: {r:?}"
        );
    }
}

/// Failover between brokers of one cluster (`Options::failover`): a first connect whose
/// first address answers nobody goes on to the next, and a connection lost when its
/// broker dies is made again to the next address, where publishing goes on.
#[tokio::test]
async fn a_client_fails_over_to_the_next_address_when_its_broker_is_gone() {
    use common::free_port;
    let first = Broker::mosquitto().await;
    let second = Broker::tern().await;
    // Nobody at the first address: the first connect goes to the next one.
    let dead = free_port();
    let (c, mut events) = Client::connect(
        Options::new("127.0.0.1", dead, "fo-1")
            .failover("127.0.0.1", second.port())
            .reconnect(None),
    )
    .await
    .unwrap();
    c.subscribe("fo/#", QoS::AtLeastOnce).await.unwrap();
    c.publish("fo/a", "on the second")
        .qos(QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        &next_message(&mut events).await.payload[..],
        b"on the second"
    );
    c.disconnect().await;
    // Connected to the first; it dies: the client reconnects to the second.
    let quick = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(200),
    };
    let (c, mut events) = Client::connect(
        Options::new("127.0.0.1", first.port(), "fo-2")
            .failover("127.0.0.1", second.port())
            .reconnect(Some(quick)),
    )
    .await
    .unwrap();
    drop(first);
    let back = tokio::time::timeout(Duration::from_secs(10), async {
        let mut lost = false;
        loop {
            match events.recv().await {
                Some(Event::Disconnected { .. }) => lost = true,
                Some(Event::Connected { .. }) if lost => return true,
                Some(_) => {}
                None => return false,
            }
        }
    })
    .await;
    assert_eq!(back, Ok(true), "reconnected after its broker died");
    c.subscribe("fo/#", QoS::AtLeastOnce).await.unwrap();
    c.publish("fo/b", "after failover")
        .qos(QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        &next_message(&mut events).await.payload[..],
        b"after failover"
    );
    c.disconnect().await;
}
