//! The engine's rules one claim at a time: flow control both ways, acknowledgement reasons,
//! unknown packet ids, keepalive, topic aliases, message expiry, the peer's packet size
//! limit, acknowledge-later mode.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

use std::num::NonZeroU16;

use common::*;
use tern_codec::{Ack, Packet, PacketType, Protocol, Publish, QoS, QosPid, ReasonCode};
use tern_proto::{AckMode, Config, Connection, DropReason, Event, Role, SessionState};

fn config(role: Role, protocol: Protocol) -> Config {
    Config::new(role, protocol)
}

#[test]
fn inflight_never_exceeds_the_peer_receive_maximum_and_waiting_messages_keep_order() {
    let mut client = config(Role::Client, Protocol::V5);
    client.peer_receive_maximum = 2;
    let mut pair = Pair::with(client, config(Role::Server, Protocol::V5));
    for i in 0..6 {
        pair.publish(true, msg(&format!("m{i}"), QoS::ExactlyOnce));
        assert!(pair.client.session().inflight_len() <= 2);
    }
    assert_eq!(
        pair.sent(Dir::ToServer, PacketType::Publish).len(),
        2,
        "two in flight, four wait"
    );
    assert_eq!(pair.client.session().queued().count(), 4);
    pair.drive();
    assert_eq!(
        pair.server.delivered_payloads(),
        ["m0", "m1", "m2", "m3", "m4", "m5"]
    );
    assert_quiet(&pair);
}

#[test]
fn v311_uses_the_configured_default_window() {
    let mut pair = Pair::new(Protocol::V3_1_1);
    for i in 0..40 {
        pair.publish(true, msg(&format!("m{i}"), QoS::AtLeastOnce));
    }
    assert_eq!(pair.client.session().inflight_len(), 32);
    pair.drive();
    assert_eq!(pair.server.delivered.len(), 40);
}

#[test]
fn puback_with_an_error_reason_ends_the_flow() {
    let mut server = config(Role::Server, Protocol::V5);
    server.ack_mode = AckMode::Manual;
    let mut pair = Pair::with(config(Role::Client, Protocol::V5), server);
    pair.publish(true, msg("m", QoS::AtLeastOnce));
    pair.drive();
    let (id, _) = pair.server.to_ack.pop().unwrap();
    pair.server.conn().ack_with(id, ReasonCode::QuotaExceeded);
    pair.drive();
    assert_eq!(pair.client.acknowledged[0].2, ReasonCode::QuotaExceeded);
    assert_quiet(&pair);
}

#[test]
fn pubrec_with_an_error_reason_ends_the_flow_without_pubrel() {
    let mut server = config(Role::Server, Protocol::V5);
    server.ack_mode = AckMode::Manual;
    let mut pair = Pair::with(config(Role::Client, Protocol::V5), server);
    pair.publish(true, msg("m", QoS::ExactlyOnce));
    pair.drive();
    let (id, _) = pair.server.to_ack.pop().unwrap();
    assert!(pair.server.conn().ack_with(id, ReasonCode::NotAuthorized));
    pair.drive();
    assert_eq!(pair.client.acknowledged[0].2, ReasonCode::NotAuthorized);
    assert!(pair.sent(Dir::ToServer, PacketType::PubRel).is_empty());
    assert_quiet(&pair);
}

#[test]
fn pubrel_for_an_unknown_id_is_answered_with_pubcomp_0x92() {
    let now = std::time::Instant::now();
    let mut server = Connection::new(
        config(Role::Server, Protocol::V5),
        SessionState::new(),
        false,
        now,
    );
    server
        .handle_packet(Packet::PubRel(Ack::new(v(9))), now)
        .unwrap();
    assert_eq!(
        server.poll_transmit(now),
        Some(Packet::PubComp(Ack::with_reason(
            v(9),
            ReasonCode::PacketIdentifierNotFound
        )))
    );
    // In 3.1.1 there are no reason codes: a plain PUBCOMP.
    let mut server = Connection::new(
        config(Role::Server, Protocol::V3_1_1),
        SessionState::new(),
        false,
        now,
    );
    server
        .handle_packet(Packet::PubRel(Ack::new(v(9))), now)
        .unwrap();
    assert_eq!(
        server.poll_transmit(now),
        Some(Packet::PubComp(Ack::new(v(9))))
    );
}

#[test]
fn acks_for_unknown_ids_are_ignored_or_released() {
    let now = std::time::Instant::now();
    let mut c = Connection::new(
        config(Role::Client, Protocol::V5),
        SessionState::new(),
        false,
        now,
    );
    c.handle_packet(Packet::PubAck(Ack::new(v(4))), now)
        .unwrap();
    c.handle_packet(Packet::PubComp(Ack::new(v(4))), now)
        .unwrap();
    assert_eq!(
        c.poll_transmit(now),
        None,
        "PUBACK and PUBCOMP for unknown ids: nothing to do"
    );
    assert_eq!(c.poll_event(), None);
    c.handle_packet(Packet::PubRec(Ack::new(v(4))), now)
        .unwrap();
    assert_eq!(
        c.poll_transmit(now),
        Some(Packet::PubRel(Ack::with_reason(
            v(4),
            ReasonCode::PacketIdentifierNotFound
        )))
    );
}

#[test]
fn exceeding_our_receive_maximum_is_a_disconnect_0x93() {
    let mut server = config(Role::Server, Protocol::V5);
    server.receive_maximum = 2;
    server.ack_mode = AckMode::Manual;
    // A client that ignores the server's Receive Maximum.
    let mut pair = Pair::with(config(Role::Client, Protocol::V5), server);
    for i in 0..3 {
        pair.publish(true, msg(&format!("m{i}"), QoS::AtLeastOnce));
    }
    pair.drive();
    assert_eq!(pair.server.delivered.len(), 2);
    assert_eq!(pair.server.closed, [ReasonCode::ReceiveMaximumExceeded]);
    let disconnects = pair.sent(Dir::ToClient, PacketType::Disconnect);
    assert_eq!(
        disconnects,
        [&Packet::Disconnect(tern_codec::Disconnect::new(
            ReasonCode::ReceiveMaximumExceeded
        ))]
    );
}

#[test]
fn a_repeated_qos2_publish_within_the_window_does_not_count_twice() {
    let mut server = config(Role::Server, Protocol::V5);
    server.receive_maximum = 1;
    let mut pair = Pair::with(config(Role::Client, Protocol::V5), server);
    pair.publish(true, msg("m", QoS::ExactlyOnce));
    pair.duplicate_next(Dir::ToServer);
    pair.drive();
    assert_eq!(pair.server.delivered_payloads(), ["m"]);
    assert_quiet(&pair);
}

#[test]
fn client_sends_pingreq_after_keep_alive_of_silence() {
    let mut client = config(Role::Client, Protocol::V3_1_1);
    client.keep_alive = 10;
    let mut pair = Pair::with(client, config(Role::Server, Protocol::V3_1_1));
    assert_eq!(
        pair.client.conn().poll_timeout(),
        Some(pair.now + 10 * SECOND)
    );
    pair.advance(9 * SECOND);
    assert!(pair.sent(Dir::ToServer, PacketType::PingReq).is_empty());
    pair.advance(SECOND);
    assert_eq!(pair.sent(Dir::ToServer, PacketType::PingReq).len(), 1);
    pair.drive();
    assert_eq!(pair.sent(Dir::ToClient, PacketType::PingResp).len(), 1);
    // The answer resets the clock: no second ping until another keep alive passes.
    pair.advance(9 * SECOND);
    assert_eq!(pair.sent(Dir::ToServer, PacketType::PingReq).len(), 1);
    assert!(pair.client.closed.is_empty());
}

#[test]
fn client_gives_up_when_pingresp_never_comes() {
    let mut client = config(Role::Client, Protocol::V5);
    client.keep_alive = 10;
    let mut pair = Pair::with(client, config(Role::Server, Protocol::V5));
    pair.advance(10 * SECOND);
    assert_eq!(pair.sent(Dir::ToServer, PacketType::PingReq).len(), 1);
    // The PINGREQ is never delivered, so no PINGRESP comes back.
    pair.advance(9 * SECOND);
    assert!(pair.client.closed.is_empty());
    pair.advance(SECOND);
    assert_eq!(pair.client.closed, [ReasonCode::KeepAliveTimeout]);
}

#[test]
fn server_closes_a_silent_client_after_one_and_a_half_keep_alive_with_0x8d() {
    let mut server = config(Role::Server, Protocol::V5);
    server.keep_alive = 10;
    let mut pair = Pair::with(config(Role::Client, Protocol::V5), server);
    pair.advance(14 * SECOND);
    assert!(pair.server.closed.is_empty());
    pair.advance(SECOND);
    assert_eq!(pair.server.closed, [ReasonCode::KeepAliveTimeout]);
    assert_eq!(
        pair.sent(Dir::ToClient, PacketType::Disconnect),
        [&Packet::Disconnect(tern_codec::Disconnect::new(
            ReasonCode::KeepAliveTimeout
        ))]
    );
}

#[test]
fn any_packet_from_the_client_resets_the_server_keepalive() {
    let mut server = config(Role::Server, Protocol::V3_1_1);
    server.keep_alive = 10;
    let mut pair = Pair::with(config(Role::Client, Protocol::V3_1_1), server);
    for _ in 0..5 {
        pair.advance(14 * SECOND);
        pair.publish(true, msg("keep me", QoS::AtMostOnce));
        pair.drive();
    }
    assert!(pair.server.closed.is_empty());
}

#[test]
fn outbound_topic_aliases_are_assigned_then_used_and_resolved_by_the_peer() {
    let mut server = config(Role::Server, Protocol::V5);
    server.peer_topic_alias_maximum = 4;
    let mut client = config(Role::Client, Protocol::V5);
    client.topic_alias_maximum = 4;
    let mut pair = Pair::with(client, server);
    for _ in 0..3 {
        pair.publish(false, msg("same topic", QoS::AtLeastOnce));
    }
    pair.drive();
    let sent: Vec<(String, Option<u16>)> = pair
        .sent(Dir::ToClient, PacketType::Publish)
        .iter()
        .map(|p| match p {
            Packet::Publish(p) => (
                p.topic.to_string(),
                p.properties.topic_alias.map(NonZeroU16::get),
            ),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(
        sent,
        [
            ("t/x".into(), Some(1)),
            (String::new(), Some(1)),
            (String::new(), Some(1))
        ]
    );
    assert!(
        pair.client
            .delivered
            .iter()
            .all(|m| m.topic.as_str() == "t/x")
    );
    assert!(
        pair.client
            .delivered
            .iter()
            .all(|m| m.properties.topic_alias.is_none())
    );
    assert_quiet(&pair);
}

#[test]
fn inbound_topic_alias_above_our_maximum_is_a_disconnect_0x94() {
    let now = std::time::Instant::now();
    let mut cfg = config(Role::Server, Protocol::V5);
    cfg.topic_alias_maximum = 2;
    let mut server = Connection::new(cfg, SessionState::new(), false, now);
    let mut p = Publish::new(topic("a"), QosPid::AtMostOnce, "x");
    p.properties.topic_alias = NonZeroU16::new(3);
    let err = server.handle_packet(Packet::Publish(p), now).unwrap_err();
    assert_eq!(err.reason_code(), ReasonCode::TopicAliasInvalid);
    assert!(!server.is_open());
    assert_eq!(
        server.poll_transmit(now),
        Some(Packet::Disconnect(tern_codec::Disconnect::new(
            ReasonCode::TopicAliasInvalid
        )))
    );
}

#[test]
fn an_unbound_inbound_topic_alias_is_a_protocol_error() {
    let now = std::time::Instant::now();
    let mut cfg = config(Role::Server, Protocol::V5);
    cfg.topic_alias_maximum = 2;
    let mut server = Connection::new(cfg, SessionState::new(), false, now);
    let mut p = Publish::new(tern_codec::TopicName::empty(), QosPid::AtMostOnce, "x");
    p.properties.topic_alias = NonZeroU16::new(1);
    let err = server.handle_packet(Packet::Publish(p), now).unwrap_err();
    assert_eq!(err.reason_code(), ReasonCode::ProtocolError);
}

#[test]
fn expired_messages_are_never_sent() {
    let mut client = config(Role::Client, Protocol::V5);
    client.peer_receive_maximum = 1;
    let mut pair = Pair::with(client, config(Role::Server, Protocol::V5));
    let now = pair.now;
    pair.publish(true, msg("first", QoS::AtLeastOnce));
    pair.publish(
        true,
        msg("short-lived", QoS::AtLeastOnce).with_expiry(5 * SECOND, now),
    );
    pair.advance(6 * SECOND);
    pair.drive();
    assert_eq!(pair.server.delivered_payloads(), ["first"]);
    assert_eq!(pair.client.dropped.len(), 1);
    assert_eq!(pair.client.dropped[0].1, DropReason::Expired);
    // QoS 0 too.
    let now = pair.now;
    pair.publish(
        true,
        msg("q0", QoS::AtMostOnce).with_expiry(SECOND, now - 2 * SECOND),
    );
    assert_eq!(pair.client.dropped.len(), 2);
}

#[test]
fn the_remaining_expiry_interval_is_written_on_send() {
    let mut client = config(Role::Client, Protocol::V5);
    client.peer_receive_maximum = 1;
    let mut pair = Pair::with(client, config(Role::Server, Protocol::V5));
    let now = pair.now;
    pair.publish(true, msg("first", QoS::AtLeastOnce));
    pair.publish(
        true,
        msg("waits", QoS::AtLeastOnce).with_expiry(100 * SECOND, now),
    );
    pair.advance(30 * SECOND);
    pair.drive();
    let intervals: Vec<_> = pair
        .sent(Dir::ToServer, PacketType::Publish)
        .iter()
        .map(|p| match p {
            Packet::Publish(p) => p.properties.message_expiry_interval,
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(intervals, [None, Some(70)]);
}

#[test]
fn a_message_larger_than_the_peer_maximum_packet_size_is_dropped_and_reported() {
    let mut server = config(Role::Server, Protocol::V5);
    server.peer_maximum_packet_size = 64;
    let mut pair = Pair::with(config(Role::Client, Protocol::V5), server);
    pair.publish(false, msg(&"x".repeat(100), QoS::AtLeastOnce));
    pair.publish(false, msg("small", QoS::AtLeastOnce));
    pair.publish(false, msg(&"y".repeat(100), QoS::AtMostOnce));
    pair.drive();
    assert_eq!(pair.client.delivered_payloads(), ["small"]);
    let reasons: Vec<_> = pair.server.dropped.iter().map(|(_, r)| *r).collect();
    assert_eq!(reasons, [DropReason::TooLarge, DropReason::TooLarge]);
    assert!(
        pair.wire
            .iter()
            .all(|(_, p)| { tern_codec::encoded_len(p, Protocol::V5).unwrap() <= 64 })
    );
    assert_quiet(&pair);
}

#[test]
fn a_topic_alias_is_not_used_when_it_would_break_the_size_limit() {
    // The limit is exactly the plain packet's size; binding an alias would add three bytes.
    let plain = Publish::new(topic("t/x"), QosPid::AtLeastOnce(v(1)), "0123456789");
    let limit = tern_codec::encoded_len(&Packet::Publish(plain), Protocol::V5).unwrap();
    let mut server = config(Role::Server, Protocol::V5);
    server.peer_topic_alias_maximum = 5;
    server.peer_maximum_packet_size = limit as u32;
    let mut client = config(Role::Client, Protocol::V5);
    client.topic_alias_maximum = 5;
    let mut pair = Pair::with(client, server);
    pair.publish(false, msg("0123456789", QoS::AtLeastOnce));
    pair.drive();
    assert_eq!(pair.client.delivered_payloads(), ["0123456789"]);
    let Packet::Publish(sent) = pair.sent(Dir::ToClient, PacketType::Publish)[0] else {
        unreachable!()
    };
    assert_eq!(sent.properties.topic_alias, None);
    assert_quiet(&pair);
}

#[test]
fn manual_mode_withholds_pubrec_until_released_and_never_delivers_twice() {
    let mut server = config(Role::Server, Protocol::V5);
    server.ack_mode = AckMode::Manual;
    let mut pair = Pair::with(config(Role::Client, Protocol::V5), server);
    pair.publish(true, msg("m", QoS::ExactlyOnce));
    pair.drive();
    assert!(
        pair.sent(Dir::ToClient, PacketType::PubRec).is_empty(),
        "no PUBREC before release"
    );
    // The client resends (after a reconnect) before the server persisted it.
    pair.cut();
    pair.reconnect(true);
    pair.drive();
    assert_eq!(
        pair.server.delivered_payloads(),
        ["m"],
        "not delivered again"
    );
    assert!(pair.server.conn().ack(v(1)));
    pair.drive();
    assert_eq!(pair.client.acknowledged.len(), 1);
    assert_quiet(&pair);
}

#[test]
fn session_state_restored_in_a_new_engine_resumes_the_flows() {
    // What a broker restart does: persist the session value, build a new engine from it.
    let mut pair = Pair::new(Protocol::V5);
    pair.publish(true, msg("m", QoS::ExactlyOnce));
    assert!(pair.run_until(Dir::ToServer, is(PacketType::PubRel)));
    pair.cut();
    // The old engine is gone; only the persisted value (a clone) survives.
    let persisted = pair.server.stored.clone();
    pair.server.stored = persisted;
    pair.reconnect(true);
    pair.drive();
    assert_eq!(pair.server.delivered_payloads(), ["m"]);
    assert_quiet(&pair);
}

#[test]
fn pingreq_to_a_client_is_a_protocol_error() {
    let now = std::time::Instant::now();
    let mut c = Connection::new(
        config(Role::Client, Protocol::V5),
        SessionState::new(),
        false,
        now,
    );
    assert!(c.handle_packet(Packet::PingReq, now).is_err());
}

#[test]
fn a_second_connect_is_a_protocol_error() {
    let now = std::time::Instant::now();
    let mut s = Connection::new(
        config(Role::Server, Protocol::V5),
        SessionState::new(),
        false,
        now,
    );
    let connect = tern_codec::Connect::new(Protocol::V5, "again");
    let err = s
        .handle_packet(Packet::Connect(Box::new(connect)), now)
        .unwrap_err();
    assert_eq!(err.reason_code(), ReasonCode::ProtocolError);
    assert!(matches!(
        s.poll_event(),
        Some(Event::Closed {
            reason: ReasonCode::ProtocolError,
            ..
        })
    ));
}

#[test]
fn a_client_must_not_send_subscription_identifiers() {
    let now = std::time::Instant::now();
    let mut s = Connection::new(
        config(Role::Server, Protocol::V5),
        SessionState::new(),
        false,
        now,
    );
    let mut p = Publish::new(topic("a"), QosPid::AtMostOnce, "x");
    p.properties.subscription_identifiers = vec![tern_codec::SubscriptionId::new(1).unwrap()];
    assert!(s.handle_packet(Packet::Publish(p), now).is_err());
}

#[test]
fn a_qos0_message_queued_while_offline_is_sent_in_order_without_a_packet_id() {
    let mut pair = Pair::new(Protocol::V5);
    pair.cut();
    // A broker that queues QoS 0 for offline sessions puts it in the stored session.
    pair.server
        .stored
        .enqueue(msg("first", QoS::AtLeastOnce), pair.now);
    pair.server
        .stored
        .enqueue(msg("zero", QoS::AtMostOnce), pair.now);
    pair.server
        .stored
        .enqueue(msg("last", QoS::ExactlyOnce), pair.now);
    pair.reconnect(true);
    pair.drive();
    assert_eq!(pair.client.delivered_payloads(), ["first", "zero", "last"]);
    let zero = pair
        .sent(Dir::ToClient, PacketType::Publish)
        .into_iter()
        .find_map(|p| match p {
            Packet::Publish(p) if p.payload == "zero" => Some(p.qos_pid),
            _ => None,
        })
        .unwrap();
    assert_eq!(zero, QosPid::AtMostOnce);
    assert_eq!(
        pair.server.session().inflight_len(),
        0,
        "nothing waits on it"
    );
    assert_quiet(&pair);
}

#[test]
fn a_publish_never_takes_the_packet_id_of_a_subscribe_awaiting_its_suback() {
    let now = std::time::Instant::now();
    let mut client = Connection::new(
        Config::new(Role::Client, Protocol::V5),
        SessionState::new(),
        false,
        now,
    );
    let filter = tern_codec::TopicFilter::new("t/#").unwrap();
    let sub = client
        .subscribe(vec![tern_codec::Subscription {
            filter,
            options: Default::default(),
        }])
        .unwrap();
    assert!(matches!(client.poll_transmit(now), Some(Packet::Subscribe(s)) if s.packet_id == sub));
    // Every id goes round once while the SUBACK is outstanding [MQTT-2.2.1-3].
    for n in 0..70_000u32 {
        let topic = tern_codec::TopicName::new("t/x").unwrap();
        client.publish(tern_proto::Message::new(topic, "m", QoS::AtLeastOnce), now);
        let Some(Packet::Publish(p)) = client.poll_transmit(now) else {
            panic!("publish {n} not sent");
        };
        let id = p.packet_id().unwrap();
        assert_ne!(id, sub, "publish {n} reused the SUBSCRIBE's id");
        client
            .handle_packet(Packet::PubAck(tern_codec::Ack::new(id)), now)
            .unwrap();
    }
    let suback = tern_codec::SubAck {
        packet_id: sub,
        reasons: vec![ReasonCode::Success],
        properties: Default::default(),
    };
    client.handle_packet(Packet::SubAck(suback), now).unwrap();
    assert_eq!(client.requests_pending(), 0, "the id is free again");
}
