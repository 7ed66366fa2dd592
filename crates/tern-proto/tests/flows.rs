//! QoS 1 and QoS 2 across every lost handshake step: for each of PUBLISH, PUBACK, PUBREC,
//! PUBREL and PUBCOMP, the connection is cut just before that packet would arrive (so it
//! and everything after it is lost), both sides reconnect resuming their sessions, and the
//! messages must arrive at least once (QoS 1) or exactly once (QoS 2), in order, in both
//! directions and in both 3.1.1 and 5.0.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

use std::cell::Cell;

use common::*;
use tern_codec::{PacketType, Protocol, QoS};

const MESSAGES: [&str; 3] = ["m0", "m1", "m2"];

/// Publishes three messages, cuts the connection before the `nth` (0-based) `lost` packet
/// arrives, resumes, drives to quiet.
fn lose(protocol: Protocol, from_client: bool, qos: QoS, lost: PacketType, nth: usize) -> Pair {
    let mut pair = Pair::new(protocol);
    for m in MESSAGES {
        pair.publish(from_client, msg(m, qos));
    }
    let forward = if from_client {
        Dir::ToServer
    } else {
        Dir::ToClient
    };
    let back = if from_client {
        Dir::ToClient
    } else {
        Dir::ToServer
    };
    let dir = match lost {
        PacketType::Publish | PacketType::PubRel => forward,
        _ => back,
    };
    let seen = Cell::new(0);
    let found = pair.run_until(dir, |p| {
        if p.packet_type() != lost {
            return false;
        }
        seen.set(seen.get() + 1);
        seen.get() > nth
    });
    assert!(found, "no {lost:?} #{nth} ever went {dir:?}");
    pair.cut();
    pair.reconnect(true);
    pair.drive();
    pair
}

fn receiver(pair: &Pair, from_client: bool) -> &Side {
    if from_client {
        &pair.server
    } else {
        &pair.client
    }
}

fn sender(pair: &Pair, from_client: bool) -> &Side {
    if from_client {
        &pair.client
    } else {
        &pair.server
    }
}

fn check_exactly_once(pair: &Pair, from_client: bool) {
    assert_eq!(receiver(pair, from_client).delivered_payloads(), MESSAGES);
    let acked: Vec<_> = sender(pair, from_client)
        .acknowledged
        .iter()
        .map(|(_, m, _)| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect();
    assert_eq!(acked, MESSAGES, "each flow completes once, in order");
    assert_quiet(pair);
}

fn check_at_least_once(pair: &Pair, from_client: bool) {
    let got = receiver(pair, from_client).delivered_payloads();
    let mut first_seen: Vec<String> = vec![];
    for p in &got {
        if !first_seen.contains(p) {
            first_seen.push(p.clone());
        }
    }
    assert_eq!(
        first_seen, MESSAGES,
        "every message arrives, first arrivals in order: {got:?}"
    );
    assert_eq!(sender(pair, from_client).acknowledged.len(), MESSAGES.len());
    assert_quiet(pair);
}

fn every_case(qos: QoS, steps: &[PacketType], check: fn(&Pair, bool)) {
    for protocol in [Protocol::V3_1_1, Protocol::V5] {
        for from_client in [true, false] {
            for &step in steps {
                for nth in 0..MESSAGES.len() {
                    let pair = lose(protocol, from_client, qos, step, nth);
                    check(&pair, from_client);
                }
            }
        }
    }
}

#[test]
fn qos1_is_delivered_at_least_once_in_order_when_publish_is_lost() {
    every_case(
        QoS::AtLeastOnce,
        &[PacketType::Publish],
        check_at_least_once,
    );
}

#[test]
fn qos1_is_delivered_at_least_once_in_order_when_puback_is_lost() {
    every_case(QoS::AtLeastOnce, &[PacketType::PubAck], check_at_least_once);
}

#[test]
fn qos2_is_delivered_exactly_once_in_order_when_publish_is_lost() {
    every_case(QoS::ExactlyOnce, &[PacketType::Publish], check_exactly_once);
}

#[test]
fn qos2_is_delivered_exactly_once_in_order_when_pubrec_is_lost() {
    every_case(QoS::ExactlyOnce, &[PacketType::PubRec], check_exactly_once);
}

#[test]
fn qos2_is_delivered_exactly_once_in_order_when_pubrel_is_lost() {
    every_case(QoS::ExactlyOnce, &[PacketType::PubRel], check_exactly_once);
}

#[test]
fn qos2_is_delivered_exactly_once_in_order_when_pubcomp_is_lost() {
    every_case(QoS::ExactlyOnce, &[PacketType::PubComp], check_exactly_once);
}

#[test]
fn resent_publish_carries_dup_and_its_original_packet_id() {
    let pair = lose(Protocol::V5, true, QoS::ExactlyOnce, PacketType::PubRec, 0);
    let publishes = pair.sent(Dir::ToServer, PacketType::Publish);
    let first: Vec<_> = publishes
        .iter()
        .filter_map(|p| match p {
            tern_codec::Packet::Publish(p) => Some((p.packet_id().unwrap(), p.dup)),
            _ => None,
        })
        .collect();
    // Three originals, then the unacknowledged ones again with DUP and the same ids.
    assert_eq!(&first[..3], &[(v(1), false), (v(2), false), (v(3), false)]);
    assert!(first[3..].iter().all(|(_, dup)| *dup), "{first:?}");
    let resent: Vec<_> = first[3..].iter().map(|(id, _)| *id).collect();
    assert_eq!(resent, [v(1), v(2), v(3)], "resent in the original order");
    assert!(pair.client.errors.is_empty());
}

#[test]
fn pubrel_is_resent_for_flows_whose_pubrec_arrived() {
    let pair = lose(
        Protocol::V3_1_1,
        true,
        QoS::ExactlyOnce,
        PacketType::PubComp,
        0,
    );
    let rels = pair.sent(Dir::ToServer, PacketType::PubRel);
    assert!(
        rels.len() > MESSAGES.len(),
        "PUBREL for the released flows went out again"
    );
    check_exactly_once(&pair, true);
}
