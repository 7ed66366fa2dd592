//! The configuration each side derives from CONNECT and CONNACK.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

use std::num::{NonZeroU16, NonZeroU32};

use tern_codec::properties::{ConnAckProperties, ConnectProperties};
use tern_codec::{ConnAck, Connect, Protocol, ReasonCode};
use tern_proto::{AckMode, Config, Role};

fn handshake() -> (Connect, ConnAck) {
    let mut connect = Connect::new(Protocol::V5, "c");
    connect.keep_alive = 60;
    connect.properties = ConnectProperties {
        receive_maximum: NonZeroU16::new(10),
        maximum_packet_size: NonZeroU32::new(1024),
        topic_alias_maximum: Some(5),
        ..Default::default()
    }
    .into();
    let mut connack = ConnAck::new(false, ReasonCode::Success);
    connack.properties = ConnAckProperties {
        receive_maximum: NonZeroU16::new(20),
        maximum_packet_size: NonZeroU32::new(4096),
        topic_alias_maximum: Some(7),
        server_keep_alive: Some(15),
        ..Default::default()
    }
    .into();
    (connect, connack)
}

#[test]
fn server_keep_alive_replaces_the_client_keep_alive_on_both_sides() {
    let (connect, connack) = handshake();
    for role in [Role::Client, Role::Server] {
        let c = Config::negotiate(role, &connect, &connack, AckMode::Immediate, 32);
        assert_eq!(c.keep_alive, 15, "{role:?}");
    }
}

#[test]
fn each_side_is_bounded_by_the_limits_the_other_advertised() {
    let (connect, connack) = handshake();
    let client = Config::negotiate(Role::Client, &connect, &connack, AckMode::Immediate, 32);
    assert_eq!(
        (
            client.receive_maximum,
            client.peer_receive_maximum,
            client.peer_maximum_packet_size
        ),
        (10, 20, 4096)
    );
    assert_eq!(
        (client.topic_alias_maximum, client.peer_topic_alias_maximum),
        (5, 7)
    );
    let server = Config::negotiate(Role::Server, &connect, &connack, AckMode::Manual, 32);
    assert_eq!(
        (
            server.receive_maximum,
            server.peer_receive_maximum,
            server.peer_maximum_packet_size
        ),
        (20, 10, 1024)
    );
    assert_eq!(
        (server.topic_alias_maximum, server.peer_topic_alias_maximum),
        (7, 5)
    );
    assert_eq!(server.ack_mode, AckMode::Manual);
}

#[test]
fn absent_5_0_limits_mean_the_protocol_maximums() {
    let connect = Connect::new(Protocol::V5, "c");
    let connack = ConnAck::new(false, ReasonCode::Success);
    let c = Config::negotiate(Role::Server, &connect, &connack, AckMode::Immediate, 32);
    assert_eq!(
        (c.receive_maximum, c.peer_receive_maximum),
        (65_535, 65_535)
    );
    assert_eq!((c.topic_alias_maximum, c.peer_topic_alias_maximum), (0, 0));
    assert_eq!(c.peer_maximum_packet_size, tern_codec::MAX_PACKET_SIZE);
    assert_eq!(c.keep_alive, 60);
}

#[test]
fn mqtt_3_uses_the_configured_window_and_the_client_keep_alive() {
    let mut connect = Connect::new(Protocol::V3_1_1, "c");
    connect.keep_alive = 25;
    let connack = ConnAck::new(false, ReasonCode::Success);
    let c = Config::negotiate(Role::Server, &connect, &connack, AckMode::Immediate, 8);
    assert_eq!(
        (
            c.peer_receive_maximum,
            c.keep_alive,
            c.peer_topic_alias_maximum
        ),
        (8, 25, 0)
    );
}
