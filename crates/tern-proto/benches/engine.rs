//! Engine cost of one QoS 1 and one QoS 2 round trip between a client and a server engine,
//! packets handed over as values (no encoding): publish, deliver, acknowledge, complete.
//! Run with `cargo bench -p tern-proto --bench engine`.

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use tern_codec::{Protocol, QoS, TopicName};
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
fn exchange(client: &mut Connection, server: &mut Connection, now: Instant) -> usize {
    let mut events = 0;
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
            events += usize::from(matches!(e, Event::Message { .. }));
            black_box(e);
        }
        while let Some(e) = client.poll_event() {
            events += usize::from(matches!(e, Event::Acknowledged { .. }));
            black_box(e);
        }
        if !moved {
            return events;
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
        let message = Message::new(topic.clone(), vec![0xA5; 64], qos);
        let (mut client, mut server) = pair(now);
        c.bench_function(name, |b| {
            b.iter(|| {
                client.publish(message.clone(), now);
                let events = exchange(&mut client, &mut server, now);
                debug_assert_eq!(events, 2);
            })
        });
    }
}

criterion_group!(engine, round_trips);
criterion_main!(engine);
