//! Random operation sequences over the simulated link: publish at random QoS in both
//! directions, deliver some packets, duplicate the next one, cut the connection, reconnect
//! with or without the session, acknowledge later, advance time. Then reconnect resuming
//! the session and drive to quiet. Invariants:
//!
//! - QoS 0 at most once; QoS 2 at most once, always;
//! - QoS 1 at least once and QoS 2 exactly once for every message published since the last
//!   clean start (while the session persists);
//! - per-sender order of first deliveries equals publish order for QoS 1/2;
//! - after every step: inflight never above the peer's Receive Maximum, no new PUBLISH
//!   reuses a packet id whose flow is still open, no protocol error on either side.
//!
//! The gate runs `PROPTEST_CASES` (default 2,000) cases per property; the long run sets it
//! higher: `PROPTEST_CASES=200000 cargo test --release -p tern-proto --test properties`.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use tern_codec::{Packet, PacketId, Protocol, QoS};
use tern_proto::{AckMode, Config, Role};

#[derive(Debug, Clone)]
enum Op {
    Publish { from_client: bool, qos: QoS },
    Deliver { to_server: bool, n: u8 },
    Duplicate { to_server: bool },
    Cut,
    Reconnect { resume: bool },
    AckPending,
    Advance { secs: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<bool>(), 0u8..3).prop_map(|(from_client, q)| Op::Publish {
            from_client,
            qos: QoS::from_bits(q).unwrap()
        }),
        6 => (any::<bool>(), 1u8..6).prop_map(|(to_server, n)| Op::Deliver { to_server, n }),
        1 => any::<bool>().prop_map(|to_server| Op::Duplicate { to_server }),
        1 => Just(Op::Cut),
        1 => prop_oneof![4 => Just(true), 1 => Just(false)].prop_map(|resume| Op::Reconnect { resume }),
        2 => Just(Op::AckPending),
        1 => (0u8..40).prop_map(|secs| Op::Advance { secs }),
    ]
}

struct Published {
    payload: String,
    qos: QoS,
    from_client: bool,
    epoch: u32,
}

fn run(protocol: Protocol, manual: bool, ops: Vec<Op>) -> Result<(), TestCaseError> {
    const WINDOW: u16 = 3;
    let mut client = Config::new(Role::Client, protocol);
    let mut server = Config::new(Role::Server, protocol);
    for c in [&mut client, &mut server] {
        c.peer_receive_maximum = WINDOW;
        c.receive_maximum = WINDOW;
        c.keep_alive = 30;
    }
    if manual {
        server.ack_mode = AckMode::Manual;
        client.ack_mode = AckMode::Manual;
    }
    let mut pair = Pair::with(client, server);
    let mut published: Vec<Published> = vec![];
    let mut epoch = 0;
    let mut open_ids: HashSet<(bool, PacketId)> = HashSet::new();
    let (mut wire_seen, mut acks_seen) = (0, [0usize; 2]);

    let mut step = |pair: &mut Pair, open_ids: &mut HashSet<(bool, PacketId)>| {
        // Flows that ended free their ids.
        for (i, from_client) in [(0, true), (1, false)] {
            let side = if from_client {
                &pair.client
            } else {
                &pair.server
            };
            for (id, _, _) in &side.acknowledged[acks_seen[i]..] {
                open_ids.remove(&(from_client, *id));
            }
            acks_seen[i] = side.acknowledged.len();
        }
        for (dir, packet) in &pair.wire[wire_seen..] {
            if let Packet::Publish(p) = packet
                && let Some(id) = p.packet_id()
                && !p.dup
            {
                let key = (*dir == Dir::ToServer, id);
                prop_assert!(
                    open_ids.insert(key),
                    "id {id} reused while its flow is open"
                );
            }
        }
        wire_seen = pair.wire.len();
        for side in [&pair.client, &pair.server] {
            prop_assert!(side.session().inflight_len() <= usize::from(WINDOW));
            prop_assert!(side.errors.is_empty(), "protocol error: {:?}", side.errors);
        }
        Ok(())
    };

    for op in ops {
        match op {
            Op::Publish { from_client, qos } => {
                let payload = format!("{}{}", if from_client { 'c' } else { 's' }, published.len());
                pair.publish(from_client, msg(&payload, qos));
                published.push(Published {
                    payload,
                    qos,
                    from_client,
                    epoch,
                });
            }
            Op::Deliver { to_server, n } => {
                let dir = if to_server {
                    Dir::ToServer
                } else {
                    Dir::ToClient
                };
                for _ in 0..n {
                    pair.deliver(dir);
                }
            }
            Op::Duplicate { to_server } => {
                pair.duplicate_next(if to_server {
                    Dir::ToServer
                } else {
                    Dir::ToClient
                });
            }
            Op::Cut => {
                pair.cut();
                pair.reconnect(true);
            }
            Op::Reconnect { resume } => {
                pair.cut();
                pair.reconnect(resume);
                if !resume {
                    epoch += 1;
                    open_ids.clear();
                }
            }
            Op::AckPending => {
                for side in [&mut pair.client, &mut pair.server] {
                    for (id, _) in std::mem::take(&mut side.to_ack) {
                        if let Some(c) = side.conn.as_mut() {
                            c.ack(id);
                        }
                    }
                }
                pair.flush();
            }
            Op::Advance { secs } => pair.advance(Duration::from_secs(u64::from(secs))),
        }
        step(&mut pair, &mut open_ids)?;
    }

    // Finish: resume the session, keep acknowledging, drive to quiet.
    pair.cut();
    pair.reconnect(true);
    for _ in 0..10 {
        pair.drive();
        let mut acked = false;
        for side in [&mut pair.client, &mut pair.server] {
            for (id, _) in std::mem::take(&mut side.to_ack) {
                acked |= side.conn.as_mut().unwrap().ack(id);
            }
        }
        pair.flush();
        if !acked {
            break;
        }
    }
    pair.drive();
    step(&mut pair, &mut open_ids)?;

    let mut count: HashMap<&str, usize> = HashMap::new();
    let mut first_order: [Vec<&str>; 2] = [vec![], vec![]];
    for (to_client, side) in [(false, &pair.server), (true, &pair.client)] {
        for m in &side.delivered {
            let p = std::str::from_utf8(&m.payload).unwrap();
            let n = count
                .entry(
                    published
                        .iter()
                        .find(|x| x.payload == p)
                        .unwrap()
                        .payload
                        .as_str(),
                )
                .or_default();
            *n += 1;
            if *n == 1 {
                first_order[usize::from(to_client)].push(
                    published
                        .iter()
                        .find(|x| x.payload == p)
                        .unwrap()
                        .payload
                        .as_str(),
                );
            }
        }
    }
    for m in &published {
        let n = count.get(m.payload.as_str()).copied().unwrap_or(0);
        let guaranteed = m.epoch == epoch;
        match m.qos {
            QoS::AtMostOnce => prop_assert!(n <= 1, "QoS 0 {} delivered {n} times", m.payload),
            QoS::AtLeastOnce => {
                prop_assert!(!guaranteed || n >= 1, "QoS 1 {} lost", m.payload);
            }
            QoS::ExactlyOnce => {
                prop_assert!(n <= 1, "QoS 2 {} delivered {n} times", m.payload);
                prop_assert!(!guaranteed || n == 1, "QoS 2 {} lost", m.payload);
            }
        }
    }
    for (i, from_client) in [(0, true), (1, false)] {
        let expected: Vec<&str> = published
            .iter()
            .filter(|m| {
                m.from_client == from_client && m.epoch == epoch && m.qos != QoS::AtMostOnce
            })
            .map(|m| m.payload.as_str())
            .collect();
        let got: Vec<&str> = first_order[i]
            .iter()
            .copied()
            .filter(|p| expected.contains(p))
            .collect();
        prop_assert_eq!(
            got,
            expected,
            "order from {}",
            if from_client { "client" } else { "server" }
        );
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn qos_guarantees_hold_over_random_operations_v5(ops in proptest::collection::vec(op(), 1..60)) {
        run(Protocol::V5, false, ops)?;
    }

    #[test]
    fn qos_guarantees_hold_over_random_operations_v311(ops in proptest::collection::vec(op(), 1..60)) {
        run(Protocol::V3_1_1, false, ops)?;
    }

    #[test]
    fn qos_guarantees_hold_with_acknowledge_later(ops in proptest::collection::vec(op(), 1..60)) {
        run(Protocol::V5, true, ops)?;
    }
}
