//! Steady-state QoS 1 and QoS 2 flows allocate nothing: the engine's queues and id maps
//! keep their memory between messages, so a session that goes from nothing in flight to one
//! message and back, again and again (every round trip at low rates), costs no allocator
//! calls. Counted with an instrumented global allocator over 1,000 round trips, in both
//! acknowledgement modes (the broker acknowledges later, after persisting). The counter is
//! process-wide and the test harness's own threads may allocate meanwhile, so each count
//! allows a small constant `NOISE`: an allocation per round trip would show up as 1,000.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

use std::alloc::System;
use std::time::Instant;

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tern_codec::{Protocol, QoS, TopicName};
use tern_proto::{AckMode, Config, Connection, Event, Message, Role, SessionState};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const N: usize = 1000;
/// Allocations the test harness's other threads may make during a measured region.
const NOISE: usize = 8;

/// One publish, carried to completion; returns the messages delivered and flows completed.
fn round_trip(
    client: &mut Connection,
    server: &mut Connection,
    m: &Message,
    now: Instant,
) -> (usize, usize) {
    client.publish(m.clone(), now);
    let (mut delivered, mut completed) = (0, 0);
    loop {
        let mut moved = false;
        while let Some(p) = client.poll_transmit(now) {
            server.handle_packet(p, now).unwrap();
            moved = true;
        }
        while let Some(e) = server.poll_event() {
            if let Event::Message { ack, .. } = e {
                delivered += 1;
                if let Some(id) = ack {
                    assert!(server.ack(id));
                }
            }
        }
        while let Some(p) = server.poll_transmit(now) {
            client.handle_packet(p, now).unwrap();
            moved = true;
        }
        while let Some(e) = client.poll_event() {
            completed += usize::from(matches!(e, Event::Acknowledged { .. }));
        }
        if !moved {
            return (delivered, completed);
        }
    }
}

#[test]
fn steady_qos1_and_qos2_round_trips_allocate_nothing_in_either_ack_mode() {
    // The counter itself works: one Vec is one allocation.
    let region = Region::new(GLOBAL);
    let probe: Vec<u8> = std::hint::black_box(Vec::with_capacity(8));
    let counted = region.change().allocations;
    assert!(
        (1..=1 + NOISE).contains(&counted),
        "probe counted {counted}"
    );
    drop(probe);

    let now = Instant::now();
    let topic = TopicName::new("sensors/kitchen/temperature").unwrap();
    for qos in [QoS::AtLeastOnce, QoS::ExactlyOnce] {
        for mode in [AckMode::Immediate, AckMode::Manual] {
            let mut server_config = Config::new(Role::Server, Protocol::V5);
            server_config.ack_mode = mode;
            let mut client = Connection::new(
                Config::new(Role::Client, Protocol::V5),
                SessionState::new(),
                false,
                now,
            );
            let mut server = Connection::new(server_config, SessionState::new(), false, now);
            let message = Message::new(topic.clone(), vec![0xA5; 64], qos);
            // Warm up: queues and maps reach their working size.
            for _ in 0..8 {
                assert_eq!(round_trip(&mut client, &mut server, &message, now), (1, 1));
            }
            let region = Region::new(GLOBAL);
            for _ in 0..N {
                assert_eq!(round_trip(&mut client, &mut server, &message, now), (1, 1));
            }
            let allocations = region.change().allocations;
            assert!(
                allocations <= NOISE,
                "{qos:?} {mode:?}: {allocations} allocations over {N} round trips"
            );
        }
    }
}
