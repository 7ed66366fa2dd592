//! Byte-exact vectors for every packet type, in MQTT 3.1.1 and 5.0 (and CONNECT in 3.1):
//! each byte string decodes to the packet and the packet encodes to the byte string.
//! Lengths are worked out by hand in the comments; `hs("x")` is a string field (length
//! prefix and bytes).

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

use std::num::{NonZeroU16, NonZeroU32};

use bytes::Bytes;
use common::*;
use tern_codec::properties::{
    AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties, PublishProperties,
    SubscribeProperties, WillProperties,
};
use tern_codec::{
    Ack, Auth, ConnAck, Connect, Disconnect, EncodeError, LastWill, Packet, PayloadFormat,
    Protocol::{V3_1, V3_1_1, V5},
    Publish, QoS, QosPid, ReasonCode, RetainHandling, SubAck, Subscribe, Subscription,
    SubscriptionId, SubscriptionOptions, UnsubAck, Unsubscribe, encoded_len,
};

fn connect(v: tern_codec::Protocol, id: &str) -> Connect {
    Connect::new(v, id)
}

// ---- MQTT 3.1.1 -------------------------------------------------------------------------

#[test]
fn v311_connect_minimal() {
    // 2+4 name, 1 level, 1 flags, 2 keep alive, 2+3 client id = 15
    vector(
        V3_1_1,
        &format!("10 0F {} 04 02 003C {}", hs("MQTT"), hs("abc")),
        Packet::Connect(Box::new(connect(V3_1_1, "abc"))),
    );
}

#[test]
fn v311_connect_with_will_user_and_password() {
    // flags: user 80 | password 40 | will retain 20 | will QoS 1 08 | will 04 | clean 02 = EE
    // 10 header + five 3-byte strings = 25
    let mut c = connect(V3_1_1, "c");
    c.keep_alive = 10;
    c.will = Some(LastWill {
        topic: topic("w"),
        payload: Bytes::from_static(b"x"),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: Default::default(),
    });
    c.username = Some(s("u"));
    c.password = Some(Bytes::from_static(b"p"));
    vector(
        V3_1_1,
        &format!(
            "10 19 {} 04 EE 000A {} {} {} {} {}",
            hs("MQTT"),
            hs("c"),
            hs("w"),
            hs("x"),
            hs("u"),
            hs("p")
        ),
        Packet::Connect(Box::new(c)),
    );
}

#[test]
fn v31_connect_uses_mqisdp_level_3() {
    // 2+6 name, 1, 1, 2, 2+3 = 17
    vector(
        V3_1,
        &format!("10 11 {} 03 02 003C {}", hs("MQIsdp"), hs("abc")),
        Packet::Connect(Box::new(connect(V3_1, "abc"))),
    );
}

#[test]
fn v311_connack() {
    vector(
        V3_1_1,
        "20 02 01 00",
        Packet::ConnAck(ConnAck::new(true, ReasonCode::Success)),
    );
    vector(
        V3_1_1,
        "20 02 00 05",
        Packet::ConnAck(ConnAck::new(false, ReasonCode::NotAuthorized)),
    );
    vector(
        V3_1_1,
        "20 02 00 01",
        Packet::ConnAck(ConnAck::new(false, ReasonCode::UnsupportedProtocolVersion)),
    );
}

#[test]
fn v311_publish_at_each_qos() {
    // QoS 0: 2+3 topic + 2 payload = 7
    vector(
        V3_1_1,
        &format!("30 07 {} 6869", hs("a/b")),
        Packet::Publish(Publish::new(topic("a/b"), QosPid::AtMostOnce, "hi")),
    );
    // QoS 1, DUP and RETAIN: flags 1011 = 3B; 5 + 2 id + 2 = 9
    let mut p = Publish::new(topic("a/b"), QosPid::AtLeastOnce(pid(10)), "hi");
    p.dup = true;
    p.retain = true;
    vector(
        V3_1_1,
        &format!("3B 09 {} 000A 6869", hs("a/b")),
        Packet::Publish(p),
    );
    // QoS 2: flags 0100 = 34
    vector(
        V3_1_1,
        &format!("34 09 {} FFFF 6869", hs("a/b")),
        Packet::Publish(Publish::new(
            topic("a/b"),
            QosPid::ExactlyOnce(pid(65535)),
            "hi",
        )),
    );
}

#[test]
fn v311_qos_acknowledgements() {
    vector(V3_1_1, "40 02 000A", Packet::PubAck(Ack::new(pid(10))));
    vector(V3_1_1, "50 02 000A", Packet::PubRec(Ack::new(pid(10))));
    vector(V3_1_1, "62 02 000A", Packet::PubRel(Ack::new(pid(10))));
    vector(V3_1_1, "70 02 000A", Packet::PubComp(Ack::new(pid(10))));
}

#[test]
fn v311_subscribe_and_suback() {
    // 2 id + (2+3+1) + (2+1+1) = 12
    let sub = Subscribe {
        packet_id: pid(1),
        subscriptions: vec![
            Subscription {
                filter: filter("a/b"),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..Default::default()
                },
            },
            Subscription {
                filter: filter("#"),
                options: SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    ..Default::default()
                },
            },
        ],
        properties: Default::default(),
    };
    vector(
        V3_1_1,
        &format!("82 0C 0001 {} 01 {} 02", hs("a/b"), hs("#")),
        Packet::Subscribe(sub),
    );
    let ack = SubAck {
        packet_id: pid(1),
        reasons: vec![ReasonCode::GrantedQos1, ReasonCode::UnspecifiedError],
        properties: Default::default(),
    };
    vector(V3_1_1, "90 04 0001 01 80", Packet::SubAck(ack));
}

#[test]
fn v311_unsubscribe_and_unsuback() {
    let unsub = Unsubscribe {
        packet_id: pid(2),
        filters: vec![filter("a/b")],
        properties: Default::default(),
    };
    vector(
        V3_1_1,
        &format!("A2 07 0002 {}", hs("a/b")),
        Packet::Unsubscribe(unsub),
    );
    let ack = UnsubAck {
        packet_id: pid(2),
        reasons: vec![],
        properties: Default::default(),
    };
    vector(V3_1_1, "B0 02 0002", Packet::UnsubAck(ack));
}

#[test]
fn v311_ping_and_disconnect() {
    vector(V3_1_1, "C0 00", Packet::PingReq);
    vector(V3_1_1, "D0 00", Packet::PingResp);
    vector(V3_1_1, "E0 00", Packet::Disconnect(Disconnect::default()));
}

// ---- MQTT 5.0 ---------------------------------------------------------------------------

#[test]
fn v5_connect_minimal_has_empty_properties() {
    // 10 header + 1 property length + 5 = 16
    vector(
        V5,
        &format!("10 10 {} 05 02 003C 00 {}", hs("MQTT"), hs("abc")),
        Packet::Connect(Box::new(connect(V5, "abc"))),
    );
}

#[test]
fn v5_connect_with_properties_will_and_password_without_user_name() {
    // properties: 11 00000078 (5) + 21 0014 (3) + 26 k v (1+3+3 = 7) = 15
    // will properties: 18 00000005 (5) + 01 01 (2) = 7
    // flags: password 40 | will QoS 2 10 | will 04 = 54 (5.0 allows a password alone)
    // 10 + 1+15 + 3 (id "c") + 1+7 + 3 + 3 + 3 (password) = 46
    let mut c = connect(V5, "c");
    c.clean_start = false;
    c.properties = ConnectProperties {
        session_expiry_interval: Some(120),
        receive_maximum: NonZeroU16::new(20),
        user_properties: vec![(s("k"), s("v"))],
        ..Default::default()
    }
    .into();
    c.will = Some(LastWill {
        topic: topic("w"),
        payload: Bytes::from_static(b"x"),
        qos: QoS::ExactlyOnce,
        retain: false,
        properties: WillProperties {
            will_delay_interval: Some(5),
            payload_format_indicator: Some(PayloadFormat::Utf8),
            ..Default::default()
        }
        .into(),
    });
    c.password = Some(Bytes::from_static(b"p"));
    vector(
        V5,
        &format!(
            "10 2E {} 05 54 003C 0F 11 00000078 21 0014 26 {} {} {} 07 01 01 18 00000005 {} {} {}",
            hs("MQTT"),
            hs("k"),
            hs("v"),
            hs("c"),
            hs("w"),
            hs("x"),
            hs("p")
        ),
        Packet::Connect(Box::new(c)),
    );
}

#[test]
fn v5_connack_with_capabilities() {
    vector(
        V5,
        "20 03 00 00 00",
        Packet::ConnAck(ConnAck::new(false, ReasonCode::Success)),
    );
    // properties: 22 000A (3) + 24 01 (2) + 25 00 (2) + 27 00001000 (5) = 12
    let mut ack = ConnAck::new(true, ReasonCode::Success);
    ack.properties = ConnAckProperties {
        topic_alias_maximum: Some(10),
        maximum_qos: Some(QoS::AtLeastOnce),
        retain_available: Some(false),
        maximum_packet_size: NonZeroU32::new(4096),
        ..Default::default()
    }
    .into();
    vector(
        V5,
        "20 0F 01 00 0C 22 000A 24 01 25 00 27 00001000",
        Packet::ConnAck(ack),
    );
    vector(
        V5,
        "20 03 00 86 00",
        Packet::ConnAck(ConnAck::new(false, ReasonCode::BadUserNameOrPassword)),
    );
}

#[test]
fn v5_publish_with_properties_and_with_topic_alias_only() {
    // 5 topic + 2 id + 1 + (01 01, 23 0005 = 5) + 2 payload = 15
    let mut p = Publish::new(topic("a/b"), QosPid::AtLeastOnce(pid(10)), "hi");
    p.properties = PublishProperties {
        payload_format_indicator: Some(PayloadFormat::Utf8),
        topic_alias: NonZeroU16::new(5),
        ..Default::default()
    }
    .into();
    vector(
        V5,
        &format!("32 0F {} 000A 05 01 01 23 0005 6869", hs("a/b")),
        Packet::Publish(p),
    );
    // Empty topic name, carried by alias 5: 2 + 1 + 3 + 2 = 8
    let mut p = Publish::new(tern_codec::TopicName::empty(), QosPid::AtMostOnce, "hi");
    p.properties.topic_alias = NonZeroU16::new(5);
    vector(V5, "30 08 0000 03 23 0005 6869", Packet::Publish(p));
    // Two subscription identifiers and repeated user property keys, kept in order:
    // 0B 01 (2) + 0B 8001 (3) + 26 k 1 (7) + 26 k 2 (7) = 19; 5 + 1 + 19 + 0 payload = 25
    let mut p = Publish::new(topic("a/b"), QosPid::AtMostOnce, Bytes::new());
    p.properties.subscription_identifiers = vec![
        SubscriptionId::new(1).unwrap(),
        SubscriptionId::new(128).unwrap(),
    ];
    p.properties.user_properties = vec![(s("k"), s("1")), (s("k"), s("2"))];
    vector(
        V5,
        &format!(
            "30 19 {} 13 0B 01 0B 8001 26 {} {} 26 {} {}",
            hs("a/b"),
            hs("k"),
            hs("1"),
            hs("k"),
            hs("2")
        ),
        Packet::Publish(p),
    );
}

#[test]
fn v5_acknowledgements_omit_reason_and_properties_when_they_can() {
    vector(V5, "40 02 000A", Packet::PubAck(Ack::new(pid(10))));
    vector(
        V5,
        "40 03 000A 10",
        Packet::PubAck(Ack::with_reason(pid(10), ReasonCode::NoMatchingSubscribers)),
    );
    let mut ack = Ack::with_reason(pid(10), ReasonCode::NotAuthorized);
    ack.properties.reason_string = Some(s("x"));
    vector(
        V5,
        &format!("40 08 000A 87 04 1F {}", hs("x")),
        Packet::PubAck(ack),
    );
    vector(
        V5,
        "50 03 000A 97",
        Packet::PubRec(Ack::with_reason(pid(10), ReasonCode::QuotaExceeded)),
    );
    vector(
        V5,
        "62 03 000A 92",
        Packet::PubRel(Ack::with_reason(
            pid(10),
            ReasonCode::PacketIdentifierNotFound,
        )),
    );
    vector(V5, "70 02 000A", Packet::PubComp(Ack::new(pid(10))));
}

#[test]
fn v5_ack_with_explicit_success_and_no_property_length_decodes() {
    // Remaining length 3 and 4 forms of a success (5.0 3.4.2.1) are valid input.
    assert_eq!(
        dec(V5, &hex("40 03 000A 00")),
        Ok(Packet::PubAck(Ack::new(pid(10))))
    );
    assert_eq!(
        dec(V5, &hex("40 04 000A 00 00")),
        Ok(Packet::PubAck(Ack::new(pid(10))))
    );
}

#[test]
fn v5_subscribe_with_options_and_identifier() {
    // options: QoS 1 | No Local 04 | Retain As Published 08 | Retain Handling 2 << 4 = 2D
    // 2 id + 1 + 2 (0B 05) + 5 + 1 = 11
    let sub = Subscribe {
        packet_id: pid(1),
        subscriptions: vec![Subscription {
            filter: filter("a/b"),
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: RetainHandling::DoNotSend,
            },
        }],
        properties: SubscribeProperties {
            subscription_identifier: SubscriptionId::new(5),
            ..Default::default()
        }
        .into(),
    };
    vector(
        V5,
        &format!("82 0B 0001 02 0B 05 {} 2D", hs("a/b")),
        Packet::Subscribe(sub),
    );
}

#[test]
fn v5_suback_unsubscribe_unsuback() {
    let ack = SubAck {
        packet_id: pid(1),
        reasons: vec![ReasonCode::GrantedQos1, ReasonCode::TopicFilterInvalid],
        properties: Default::default(),
    };
    vector(V5, "90 05 0001 00 01 8F", Packet::SubAck(ack));
    let unsub = Unsubscribe {
        packet_id: pid(2),
        filters: vec![filter("$share/g/a/b")],
        properties: Default::default(),
    };
    // 2 + 1 + 2+12 = 17
    vector(
        V5,
        &format!("A2 11 0002 00 {}", hs("$share/g/a/b")),
        Packet::Unsubscribe(unsub),
    );
    let ack = UnsubAck {
        packet_id: pid(2),
        reasons: vec![ReasonCode::Success, ReasonCode::NoSubscriptionExisted],
        properties: Default::default(),
    };
    vector(V5, "B0 05 0002 00 00 11", Packet::UnsubAck(ack));
}

#[test]
fn v5_ping_disconnect_auth() {
    vector(V5, "C0 00", Packet::PingReq);
    vector(V5, "D0 00", Packet::PingResp);
    vector(V5, "E0 00", Packet::Disconnect(Disconnect::default()));
    vector(
        V5,
        "E0 01 04",
        Packet::Disconnect(Disconnect::new(ReasonCode::DisconnectWithWill)),
    );
    let d = Disconnect {
        reason: ReasonCode::ServerShuttingDown,
        properties: DisconnectProperties {
            reason_string: Some(s("x")),
            ..Default::default()
        }
        .into(),
    };
    vector(
        V5,
        &format!("E0 06 8B 04 1F {}", hs("x")),
        Packet::Disconnect(d),
    );
    vector(V5, "F0 00", Packet::Auth(Auth::default()));
    // properties: 15 "SCR" (6) + 16 0102 (5) = 11; 1 + 1 + 11 = 13
    let auth = Auth {
        reason: ReasonCode::ContinueAuthentication,
        properties: AuthProperties {
            authentication_method: Some(s("SCR")),
            authentication_data: Some(Bytes::from_static(&[1, 2])),
            ..Default::default()
        }
        .into(),
    };
    vector(
        V5,
        &format!("F0 0D 18 0B 15 {} 16 0002 0102", hs("SCR")),
        Packet::Auth(auth),
    );
}

// ---- one model, two versions ------------------------------------------------------------

#[test]
fn v5_publish_written_for_v311_drops_properties() {
    let mut p = Publish::new(topic("a/b"), QosPid::AtLeastOnce(pid(10)), "hi");
    p.properties.message_expiry_interval = Some(60);
    p.properties.user_properties = vec![(s("k"), s("v"))];
    assert_eq!(
        enc(V3_1_1, &Packet::Publish(p)),
        hex(&format!("32 09 {} 000A 6869", hs("a/b")))
    );
}

#[test]
fn v5_reason_codes_map_down_to_v311_return_codes() {
    let suback = SubAck {
        packet_id: pid(1),
        reasons: vec![
            ReasonCode::GrantedQos2,
            ReasonCode::NotAuthorized,
            ReasonCode::QuotaExceeded,
        ],
        properties: Default::default(),
    };
    assert_eq!(
        enc(V3_1_1, &Packet::SubAck(suback)),
        hex("90 05 0001 02 80 80")
    );
    for (reason, code) in [
        (ReasonCode::BadUserNameOrPassword, 4),
        (ReasonCode::Banned, 5),
        (ReasonCode::ServerBusy, 3),
        (ReasonCode::ClientIdentifierNotValid, 2),
    ] {
        let bytes = enc(V3_1_1, &Packet::ConnAck(ConnAck::new(false, reason)));
        assert_eq!(bytes, vec![0x20, 2, 0, code], "{reason:?}");
    }
    let ack = Packet::PubAck(Ack::with_reason(pid(3), ReasonCode::QuotaExceeded));
    assert_eq!(enc(V3_1_1, &ack), hex("40 02 0003"));
}

#[test]
fn connack_without_a_v311_return_code_is_an_encode_error_not_garbage() {
    let ack = Packet::ConnAck(ConnAck::new(false, ReasonCode::MalformedPacket));
    let mut out = bytes::BytesMut::from(&b"kept"[..]);
    assert_eq!(
        tern_codec::encode(&ack, V3_1_1, &mut out),
        Err(EncodeError::NoV3ReturnCode(ReasonCode::MalformedPacket))
    );
    assert_eq!(&out[..], b"kept", "nothing is appended on error");
    assert!(matches!(
        encoded_len(&Packet::Auth(Auth::default()), V3_1_1),
        Err(EncodeError::NotInProtocol { .. })
    ));
}

#[test]
fn checked_in_third_party_captures_reencode_byte_exact() {
    // The live paho test (paho_capture.rs) refreshes these; this replays them without Python.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut seen = 0;
    for (dir, v) in [
        ("paho-v3.1", V3_1),
        ("paho-v3.1.1", V3_1_1),
        ("paho-v5", V5),
    ] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let packet = dec(v, &bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(enc(v, &packet), bytes, "{}", path.display());
            seen += 1;
        }
    }
    assert_eq!(seen, 36);
}
