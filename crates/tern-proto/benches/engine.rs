//! Engine cost of one QoS 1 and one QoS 2 round trip between a client and a server engine,
//! packets handed over as values (no encoding): publish, deliver, acknowledge, complete.
//! Run with `cargo bench -p tern-proto --bench engine`.
//!
//! `qos1_round_trip` / `qos2_round_trip` publish the message the previous round trip's
//! `Acknowledged` event handed back, so the publisher's own copy of a message is not counted
//! as engine work; the `_cloned` variants clone a prepared message for every publish (two
//! reference-count increments, and two decrements when the event is dropped), as the bench
//! did before 2026-11-30.

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use tern_codec::{Ack, Packet, PacketId, Props, Protocol, Publish, QoS, QosPid, TopicName};
use tern_proto::{Config, Connection, Event, Message, Role, SessionState};

fn pair(now: Instant) -> (Connection, Connection) {
    let client = Connection::new(
        Config::new(Role::Client, Protocol::V5),
        SessionState::new(),
        false,
        now,
    );
    let server = Connection::new(
        Config::new(Role::Server, Protocol::V5),
        SessionState::new(),
        false,
        now,
    );
    (client, server)
}

/// Moves packets both ways until neither engine has anything to send; drains events.
/// Returns how many messages were delivered and the last acknowledged message.
fn exchange(
    client: &mut Connection,
    server: &mut Connection,
    now: Instant,
) -> (usize, Option<Message>) {
    let mut delivered = 0;
    let mut done = None;
    loop {
        let mut moved = false;
        while let Some(p) = client.poll_transmit(now) {
            server.handle_packet(p, now).expect("valid");
            moved = true;
        }
        while let Some(p) = server.poll_transmit(now) {
            client.handle_packet(p, now).expect("valid");
            moved = true;
        }
        while let Some(e) = server.poll_event() {
            delivered += usize::from(matches!(e, Event::Message { .. }));
            black_box(e);
        }
        while let Some(e) = client.poll_event() {
            if let Event::Acknowledged { message, .. } = e {
                done = Some(message);
            }
        }
        if !moved {
            return (delivered, done);
        }
    }
}

fn round_trips(c: &mut Criterion) {
    let now = Instant::now();
    let topic = TopicName::new("sensors/kitchen/temperature").expect("valid");
    for (name, qos) in [
        ("qos1_round_trip", QoS::AtLeastOnce),
        ("qos2_round_trip", QoS::ExactlyOnce),
    ] {
        let (mut client, mut server) = pair(now);
        let mut message = Some(Message::new(topic.clone(), vec![0xA5; 64], qos));
        c.bench_function(name, |b| {
            b.iter(|| {
                client.publish(message.take().expect("handed back"), now);
                let (delivered, done) = exchange(&mut client, &mut server, now);
                debug_assert_eq!(delivered, 1);
                message = done;
            })
        });
        let message = Message::new(topic.clone(), vec![0xA5; 64], qos);
        let (mut client, mut server) = pair(now);
        c.bench_function(&format!("{name}_cloned"), |b| {
            b.iter(|| {
                client.publish(message.clone(), now);
                let (delivered, done) = exchange(&mut client, &mut server, now);
                debug_assert_eq!(delivered, 1);
                black_box(done);
            })
        });
    }
}

/// Each side of a QoS 1 round trip alone: the publishing engine (publish, the PUBLISH
/// taken out and dropped, PUBACK handled, `Acknowledged` taken) and the receiving one
/// (PUBLISH handled, PUBACK taken out, the message taken and dropped).
fn sides(c: &mut Criterion) {
    let now = Instant::now();
    let topic = TopicName::new("sensors/kitchen/temperature").expect("valid");
    let (mut client, mut server) = pair(now);
    let mut message = Some(Message::new(
        topic.clone(),
        vec![0xA5; 64],
        QoS::AtLeastOnce,
    ));
    c.bench_function("qos1_publisher_side", |b| {
        b.iter(|| {
            client.publish(message.take().expect("handed back"), now);
            let Some(Packet::Publish(p)) = client.poll_transmit(now) else {
                unreachable!("a PUBLISH")
            };
            let id = p.packet_id().expect("QoS 1");
            black_box(p);
            client
                .handle_packet(Packet::PubAck(Ack::new(id)), now)
                .expect("valid");
            if let Some(Event::Acknowledged { message: m, .. }) = client.poll_event() {
                message = Some(m);
            }
        })
    });
    let publish = Packet::Publish(Publish {
        dup: false,
        qos_pid: QosPid::new(QoS::AtLeastOnce, PacketId::new(1).expect("non-zero")),
        retain: false,
        topic,
        payload: vec![0xA5; 64].into(),
        properties: Props::NONE,
    });
    c.bench_function("qos1_receiver_side", |b| {
        b.iter(|| {
            server.handle_packet(publish.clone(), now).expect("valid");
            black_box(server.poll_transmit(now));
            black_box(server.poll_event());
        })
    });
}

criterion_group!(engine, round_trips, sides);
criterion_main!(engine);
