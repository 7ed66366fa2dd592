//! One test per rule the decoder enforces on hostile input: each names the claim, feeds
//! bytes that break exactly that rule, and checks the distinct error and the reason code a
//! server would send for it.
//!
//! Longer than most files on purpose: it is the decoder's rule book, one short test per
//! rule in the order of the standard, and reads best whole.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::BytesMut;
use common::*;
use tern_codec::{
    DecodeError as E, MAX_PACKET_SIZE, Packet, PacketType,
    Protocol::{self, V3_1_1, V5},
    ReasonCode, check, decode,
};

fn rejects(v: Protocol, bytes: &[u8], want: E, reason: ReasonCode) {
    let got = dec(v, bytes);
    assert_eq!(got, Err(want.clone()), "bytes {bytes:02x?}");
    assert_eq!(want.reason_code(), reason, "{want}");
}

fn connect_v(level: u8, flags: u8, rest: &str) -> Vec<u8> {
    let name = if level == 3 { "MQIsdp" } else { "MQTT" };
    let props = if level == 5 { "00" } else { "" };
    frame(
        0x10,
        &hex(&format!(
            "{} {level:02x} {flags:02x} 003C {props} {rest}",
            hs(name)
        )),
    )
}

#[test]
fn packet_type_zero_is_malformed() {
    rejects(
        V5,
        &[0x00, 0x00],
        E::ReservedPacketType(0),
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn auth_does_not_exist_before_mqtt5() {
    rejects(
        V3_1_1,
        &[0xF0, 0x00],
        E::ReservedPacketType(15),
        ReasonCode::MalformedPacket,
    );
    assert!(dec(V5, &[0xF0, 0x00]).is_ok());
}

#[test]
fn reserved_fixed_header_flags_are_malformed_on_every_packet_type() {
    for (first, packet, flags) in [
        (0x11, PacketType::Connect, 1),
        (0x28, PacketType::ConnAck, 8),
        (0x42, PacketType::PubAck, 2),
        (0x51, PacketType::PubRec, 1),
        (0x60, PacketType::PubRel, 0),
        (0x74, PacketType::PubComp, 4),
        (0x80, PacketType::Subscribe, 0),
        (0x93, PacketType::SubAck, 3),
        (0xA3, PacketType::Unsubscribe, 3),
        (0xB8, PacketType::UnsubAck, 8),
        (0xC1, PacketType::PingReq, 1),
        (0xDF, PacketType::PingResp, 15),
        (0xE2, PacketType::Disconnect, 2),
        (0xF1, PacketType::Auth, 1),
    ] {
        rejects(
            V5,
            &[first, 0x00],
            E::ReservedFlags { packet, flags },
            ReasonCode::MalformedPacket,
        );
    }
}

/// MQTT 3.1 set DUP on a resent PUBREL, SUBSCRIBE or UNSUBSCRIBE, so a 3.1 client resuming
/// a QoS 2 flow sends `6A`; only level 3 accepts it, and only on those three packets.
#[test]
fn dup_on_pubrel_subscribe_and_unsubscribe_is_mqtt_3_1_only() {
    for (bytes, packet) in [
        (vec![0x6A, 0x02, 0x00, 0x01], PacketType::PubRel),
        (
            vec![0x8A, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x01],
            PacketType::Subscribe,
        ),
        (
            vec![0xAA, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'],
            PacketType::Unsubscribe,
        ),
    ] {
        let got = dec(Protocol::V3_1, &bytes).unwrap_or_else(|e| panic!("{packet:?}: {e}"));
        assert_eq!(got.packet_type(), packet);
        let flags = bytes[0] & 0x0F;
        for v in [V3_1_1, V5] {
            rejects(
                v,
                &bytes,
                E::ReservedFlags { packet, flags },
                ReasonCode::MalformedPacket,
            );
        }
    }
    // Anything else stays reserved in 3.1 too: DUP on PUBACK, or on a PUBREL without QoS 1.
    for (first, packet) in [(0x48, PacketType::PubAck), (0x68, PacketType::PubRel)] {
        rejects(
            Protocol::V3_1,
            &[first, 0x02, 0x00, 0x01],
            E::ReservedFlags {
                packet,
                flags: first & 0x0F,
            },
            ReasonCode::MalformedPacket,
        );
    }
}

#[test]
fn remaining_length_longer_than_four_bytes_is_malformed_before_the_body_arrives() {
    let bytes = [0x30, 0xFF, 0xFF, 0xFF, 0xFF];
    assert_eq!(check(&bytes, MAX_PACKET_SIZE), Err(E::VarIntTooLong));
    rejects(V5, &bytes, E::VarIntTooLong, ReasonCode::MalformedPacket);
}

#[test]
fn oversized_packet_is_rejected_from_the_fixed_header_alone() {
    // A header announcing 256 MB, against a 1 MB limit, with none of the body sent.
    let mut buf = BytesMut::with_capacity(16);
    buf.extend_from_slice(&[0x30, 0x80, 0x80, 0x80, 0x01]);
    let err = decode(&mut buf, V5, 1 << 20).unwrap_err();
    assert_eq!(
        err,
        E::PacketTooLarge {
            size: 5 + (1 << 21),
            max: 1 << 20
        }
    );
    assert_eq!(err.reason_code(), ReasonCode::PacketTooLarge);
    assert!(
        buf.capacity() < 1024,
        "no buffer was grown for the announced body"
    );
    // Exactly at the limit is fine: it only waits for more bytes.
    let mut at_limit = BytesMut::from(&[0x30, 0x7E][..]);
    assert_eq!(decode(&mut at_limit, V5, 128), Ok(None));
    assert_eq!(
        decode(&mut BytesMut::from(&[0x30, 0x7F][..]), V5, 128).unwrap_err(),
        E::PacketTooLarge {
            size: 129,
            max: 128
        }
    );
}

#[test]
fn incomplete_packets_need_more_bytes_and_consume_nothing() {
    let whole = frame(0x30, &hex(&format!("{} 6869", hs("a/b"))));
    for cut in 0..whole.len() {
        let mut buf = BytesMut::from(&whole[..cut]);
        assert_eq!(
            decode(&mut buf, V5, MAX_PACKET_SIZE),
            Ok(None),
            "cut at {cut}"
        );
        assert_eq!(buf.len(), cut);
        assert_eq!(check(&whole[..cut], MAX_PACKET_SIZE), Ok(None));
    }
}

#[test]
fn field_running_past_the_end_of_the_packet_is_malformed() {
    // Topic length 16 in a 4-byte body.
    rejects(
        V3_1_1,
        &frame(0x30, &hex("0010 6162")),
        E::Truncated,
        ReasonCode::MalformedPacket,
    );
    // PUBACK with a one-byte packet id.
    rejects(
        V3_1_1,
        &frame(0x40, &[0x01]),
        E::Truncated,
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn bytes_after_the_last_field_are_malformed() {
    rejects(
        V3_1_1,
        &[0xC0, 0x01, 0x00],
        E::TrailingBytes(1),
        ReasonCode::MalformedPacket,
    );
    rejects(
        V3_1_1,
        &frame(0x40, &hex("000A 00")),
        E::TrailingBytes(1),
        ReasonCode::MalformedPacket,
    );
    rejects(
        V3_1_1,
        &[0xE0, 0x01, 0x00],
        E::TrailingBytes(1),
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn ill_formed_utf8_is_malformed() {
    rejects(
        V5,
        &frame(0x30, &hex("0002 C328 00")),
        E::InvalidUtf8,
        ReasonCode::MalformedPacket,
    );
    // Overlong encoding of '/'.
    rejects(
        V5,
        &frame(0x30, &hex("0002 C0AF 00")),
        E::InvalidUtf8,
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn utf16_surrogates_are_malformed() {
    rejects(
        V5,
        &frame(0x30, &hex("0003 EDA080 00")),
        E::Surrogate,
        ReasonCode::MalformedPacket,
    );
    // In a client id too, not just topics.
    rejects(
        V3_1_1,
        &connect_v(4, 0x02, "0003 EDBFBF"),
        E::Surrogate,
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn null_character_is_malformed_in_every_string() {
    rejects(
        V5,
        &frame(0x30, &hex("0003 610062 00")),
        E::NullCharacter,
        ReasonCode::MalformedPacket,
    );
    rejects(
        V3_1_1,
        &connect_v(4, 0x02, "0002 6100"),
        E::NullCharacter,
        ReasonCode::MalformedPacket,
    );
    rejects(
        V3_1_1,
        &frame(0x82, &hex("0001 0002 2300 00")),
        E::NullCharacter,
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn byte_order_mark_is_kept() {
    // [MQTT-1.5.4-3]: EF BB BF is U+FEFF wherever it appears and is not stripped.
    let Ok(Packet::Publish(p)) = dec(V3_1_1, &frame(0x30, &hex("0004 EFBBBF61"))) else {
        panic!()
    };
    assert_eq!(p.topic.as_str(), "\u{FEFF}a");
}

#[test]
fn wildcards_in_a_topic_name_are_rejected_with_topic_name_invalid() {
    rejects(
        V5,
        &frame(0x30, &hex(&format!("{} 00", hs("a/+")))),
        E::TopicNameWildcard,
        ReasonCode::TopicNameInvalid,
    );
    rejects(
        V3_1_1,
        &frame(0x30, &hs_bytes("a/#")),
        E::TopicNameWildcard,
        ReasonCode::TopicNameInvalid,
    );
    // Will topics are topic names too.
    rejects(
        V3_1_1,
        &connect_v(4, 0x06, &format!("{} {} {}", hs("c"), hs("w/#"), hs("x"))),
        E::TopicNameWildcard,
        ReasonCode::TopicNameInvalid,
    );
}

fn hs_bytes(s: &str) -> Vec<u8> {
    hex(&hs(s))
}

#[test]
fn empty_topic_name_is_a_protocol_error_unless_a_topic_alias_carries_it() {
    rejects(
        V3_1_1,
        &frame(0x30, &hex("0000 6869")),
        E::EmptyTopic,
        ReasonCode::ProtocolError,
    );
    rejects(
        V5,
        &frame(0x30, &hex("0000 00 6869")),
        E::EmptyTopic,
        ReasonCode::ProtocolError,
    );
    assert!(dec(V5, &frame(0x30, &hex("0000 03 230001 6869"))).is_ok());
}

#[test]
fn multi_level_wildcard_must_be_last_and_alone_in_its_level() {
    for bad in ["a/#/b", "a#", "sport/tennis#"] {
        rejects(
            V3_1_1,
            &frame(0x82, &hex(&format!("0001 {} 00", hs(bad)))),
            E::MultiLevelWildcardPlacement,
            ReasonCode::TopicFilterInvalid,
        );
    }
}

#[test]
fn single_level_wildcard_must_occupy_a_whole_level() {
    for bad in ["a+", "sport+/x", "+a"] {
        rejects(
            V5,
            &frame(0x82, &hex(&format!("0001 00 {} 00", hs(bad)))),
            E::SingleLevelWildcardPlacement,
            ReasonCode::TopicFilterInvalid,
        );
    }
}

#[test]
fn empty_topic_filter_is_a_protocol_error() {
    rejects(
        V3_1_1,
        &frame(0x82, &hex("0001 0000 00")),
        E::EmptyTopic,
        ReasonCode::ProtocolError,
    );
}

#[test]
fn shared_subscription_needs_a_plain_share_name() {
    for bad in ["$share//a", "$share/g+/a", "$share/g#/a", "$share/"] {
        rejects(
            V5,
            &frame(0x82, &hex(&format!("0001 00 {} 00", hs(bad)))),
            E::InvalidShareName,
            ReasonCode::TopicFilterInvalid,
        );
    }
}

#[test]
fn shared_subscription_needs_a_filter_after_the_share_name() {
    for bad in ["$share/g", "$share/g/"] {
        rejects(
            V3_1_1,
            &frame(0xA2, &hex(&format!("0001 {}", hs(bad)))),
            E::MissingShareFilter,
            ReasonCode::TopicFilterInvalid,
        );
    }
    // And the filter after it follows the ordinary rules.
    rejects(
        V5,
        &frame(0x82, &hex(&format!("0001 00 {} 00", hs("$share/g/a#")))),
        E::MultiLevelWildcardPlacement,
        ReasonCode::TopicFilterInvalid,
    );
}

#[test]
fn packet_id_zero_is_a_protocol_error_wherever_an_id_is_required() {
    let zero = ReasonCode::ProtocolError;
    rejects(
        V5,
        &frame(0x32, &hex(&format!("{} 0000 00", hs("a")))),
        E::ZeroPacketId,
        zero,
    );
    rejects(
        V3_1_1,
        &frame(0x34, &hex(&format!("{} 0000", hs("a")))),
        E::ZeroPacketId,
        zero,
    );
    rejects(
        V3_1_1,
        &frame(0x82, &hex(&format!("0000 {} 00", hs("a")))),
        E::ZeroPacketId,
        zero,
    );
    rejects(
        V3_1_1,
        &frame(0xA2, &hex(&format!("0000 {}", hs("a")))),
        E::ZeroPacketId,
        zero,
    );
    for first in [0x40, 0x50, 0x62, 0x70, 0x90, 0xB0] {
        rejects(V3_1_1, &frame(first, &hex("0000")), E::ZeroPacketId, zero);
    }
}

#[test]
fn publish_with_qos_3_is_malformed() {
    rejects(
        V5,
        &frame(0x36, &hex(&format!("{} 0001 00", hs("a")))),
        E::InvalidQos,
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn dup_on_a_qos_0_publish_is_a_protocol_error() {
    rejects(
        V3_1_1,
        &frame(0x38, &hs_bytes("a")),
        E::DupOnQos0,
        ReasonCode::ProtocolError,
    );
}

#[test]
fn connect_reserved_flag_is_malformed() {
    rejects(
        V3_1_1,
        &connect_v(4, 0x03, &hs("c")),
        E::ConnectReservedFlag,
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn will_qos_or_retain_without_the_will_flag_is_malformed() {
    rejects(
        V3_1_1,
        &connect_v(4, 0x0A, &hs("c")),
        E::WillFlagsWithoutWill,
        ReasonCode::MalformedPacket,
    );
    rejects(
        V5,
        &connect_v(5, 0x22, &hs("c")),
        E::WillFlagsWithoutWill,
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn will_qos_3_is_malformed() {
    let rest = format!("{} {} {}", hs("c"), hs("w"), hs("x"));
    rejects(
        V3_1_1,
        &connect_v(4, 0x1E, &rest),
        E::InvalidWillQos,
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn password_without_user_name_is_malformed_in_3_1_1_but_allowed_in_5() {
    let rest = format!("{} {}", hs("c"), hs("p"));
    rejects(
        V3_1_1,
        &connect_v(4, 0x42, &rest),
        E::PasswordWithoutUsername,
        ReasonCode::MalformedPacket,
    );
    rejects(
        V3_1_1,
        &connect_v(3, 0x42, &rest),
        E::PasswordWithoutUsername,
        ReasonCode::MalformedPacket,
    );
    let Ok(Packet::Connect(c)) = dec(V5, &connect_v(5, 0x42, &rest)) else {
        panic!()
    };
    assert_eq!(c.password.as_deref(), Some(&b"p"[..]));
    assert_eq!(c.username, None);
}

#[test]
fn unknown_protocol_name_or_level_is_refused_as_unsupported_version() {
    let bad_name = frame(
        0x10,
        &hex(&format!("{} 04 02 003C {}", hs("MQTX"), hs("c"))),
    );
    rejects(
        V3_1_1,
        &bad_name,
        E::InvalidProtocolName,
        ReasonCode::UnsupportedProtocolVersion,
    );
    rejects(
        V3_1_1,
        &connect_v(6, 0x02, &hs("c")),
        E::UnsupportedProtocolLevel(6),
        ReasonCode::UnsupportedProtocolVersion,
    );
    let mqisdp_4 = frame(
        0x10,
        &hex(&format!("{} 04 02 003C {}", hs("MQIsdp"), hs("c"))),
    );
    rejects(
        V3_1_1,
        &mqisdp_4,
        E::UnsupportedProtocolLevel(4),
        ReasonCode::UnsupportedProtocolVersion,
    );
}

#[test]
fn connack_reserved_flags_are_malformed() {
    rejects(
        V3_1_1,
        &hex("20 02 02 00"),
        E::ConnAckReservedFlags,
        ReasonCode::MalformedPacket,
    );
    rejects(
        V5,
        &hex("20 03 80 00 00"),
        E::ConnAckReservedFlags,
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn unknown_property_identifier_is_malformed() {
    rejects(
        V5,
        &frame(0x30, &hex(&format!("{} 02 0500", hs("a")))),
        E::UnknownProperty(5),
        ReasonCode::MalformedPacket,
    );
    // An identifier needing two varint bytes is unknown too, not truncated to a byte.
    rejects(
        V5,
        &frame(0x30, &hex(&format!("{} 02 8101", hs("a")))),
        E::UnknownProperty(129),
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn property_not_allowed_on_the_packet_type_is_malformed() {
    // Session Expiry Interval on PUBLISH.
    rejects(
        V5,
        &frame(0x30, &hex(&format!("{} 05 11 0000000A", hs("a")))),
        E::PropertyNotAllowed {
            id: 0x11,
            packet: "PUBLISH",
        },
        ReasonCode::MalformedPacket,
    );
    // Topic Alias on CONNECT.
    rejects(
        V5,
        &frame(
            0x10,
            &hex(&format!("{} 05 02 003C 03 230001 {}", hs("MQTT"), hs("c"))),
        ),
        E::PropertyNotAllowed {
            id: 0x23,
            packet: "CONNECT",
        },
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn once_only_property_repeated_is_a_protocol_error_but_user_properties_repeat() {
    rejects(
        V5,
        &frame(
            0x30,
            &hex(&format!("{} 0A 02 0000000A 02 0000000B", hs("a"))),
        ),
        E::DuplicateProperty(0x02),
        ReasonCode::ProtocolError,
    );
    let two_users = frame(
        0x30,
        &hex(&format!(
            "{} 0E 26 {} {} 26 {} {}",
            hs("a"),
            hs("k"),
            hs("a"),
            hs("k"),
            hs("b")
        )),
    );
    let Ok(Packet::Publish(p)) = dec(V5, &two_users) else {
        panic!()
    };
    assert_eq!(
        p.properties.user_properties,
        vec![(s("k"), s("a")), (s("k"), s("b"))]
    );
}

#[test]
fn property_values_out_of_range_are_protocol_errors() {
    let publish = |props: &str| {
        frame(
            0x30,
            &hex(&format!("{} {:02x} {props}", hs("a"), hex(props).len())),
        )
    };
    rejects(
        V5,
        &publish("23 0000"),
        E::ZeroTopicAlias,
        ReasonCode::TopicAliasInvalid,
    );
    rejects(
        V5,
        &publish("01 02"),
        E::InvalidPropertyValue(0x01),
        ReasonCode::ProtocolError,
    );
    rejects(
        V5,
        &publish("0B 00"),
        E::ZeroSubscriptionId,
        ReasonCode::ProtocolError,
    );
    let connect = |props: &str| {
        frame(
            0x10,
            &hex(&format!(
                "{} 05 02 003C {:02x} {props} {}",
                hs("MQTT"),
                hex(props).len(),
                hs("c")
            )),
        )
    };
    rejects(
        V5,
        &connect("21 0000"),
        E::InvalidPropertyValue(0x21),
        ReasonCode::ProtocolError,
    );
    rejects(
        V5,
        &connect("27 00000000"),
        E::InvalidPropertyValue(0x27),
        ReasonCode::ProtocolError,
    );
    rejects(
        V5,
        &connect("17 02"),
        E::InvalidPropertyValue(0x17),
        ReasonCode::ProtocolError,
    );
    rejects(
        V5,
        &connect("16 0001 FF"),
        E::AuthDataWithoutMethod,
        ReasonCode::ProtocolError,
    );
    rejects(
        V5,
        &hex("20 05 00 00 02 24 02"),
        E::InvalidPropertyValue(0x24),
        ReasonCode::ProtocolError,
    );
}

#[test]
fn property_length_past_the_end_of_the_packet_is_malformed() {
    rejects(
        V5,
        &frame(0x30, &hex(&format!("{} 09 02 00", hs("a")))),
        E::Truncated,
        ReasonCode::MalformedPacket,
    );
}

#[test]
fn subscribe_without_filters_is_a_protocol_error() {
    rejects(
        V3_1_1,
        &frame(0x82, &hex("0001")),
        E::EmptySubscribe,
        ReasonCode::ProtocolError,
    );
    rejects(
        V5,
        &frame(0x82, &hex("0001 00")),
        E::EmptySubscribe,
        ReasonCode::ProtocolError,
    );
}

#[test]
fn unsubscribe_without_filters_is_a_protocol_error() {
    rejects(
        V3_1_1,
        &frame(0xA2, &hex("0001")),
        E::EmptyUnsubscribe,
        ReasonCode::ProtocolError,
    );
    rejects(
        V5,
        &frame(0xA2, &hex("0001 00")),
        E::EmptyUnsubscribe,
        ReasonCode::ProtocolError,
    );
}

#[test]
fn subscription_option_reserved_bits_are_malformed() {
    let sub = |v5: bool, opts: u8| {
        frame(
            0x82,
            &hex(&format!(
                "0001 {} {} {opts:02x}",
                if v5 { "00" } else { "" },
                hs("a")
            )),
        )
    };
    rejects(
        V5,
        &sub(true, 0x40),
        E::SubscriptionOptionsReserved,
        ReasonCode::MalformedPacket,
    );
    rejects(
        V5,
        &sub(true, 0x80),
        E::SubscriptionOptionsReserved,
        ReasonCode::MalformedPacket,
    );
    // In 3.1.1 everything above the QoS bits is reserved, No Local included.
    rejects(
        V3_1_1,
        &sub(false, 0x04),
        E::SubscriptionOptionsReserved,
        ReasonCode::MalformedPacket,
    );
    rejects(
        V5,
        &sub(true, 0x03),
        E::InvalidQos,
        ReasonCode::MalformedPacket,
    );
    rejects(
        V5,
        &sub(true, 0x30),
        E::InvalidRetainHandling,
        ReasonCode::ProtocolError,
    );
}

#[test]
fn reason_code_not_defined_for_the_packet_type_is_a_protocol_error() {
    for (bytes, packet, code) in [
        ("40 03 000A 92", PacketType::PubAck, 0x92),
        ("62 03 000A 10", PacketType::PubRel, 0x10),
        ("90 04 0001 00 03", PacketType::SubAck, 0x03),
        ("B0 04 0002 00 01", PacketType::UnsubAck, 0x01),
        ("E0 01 91", PacketType::Disconnect, 0x91),
        ("F0 01 04", PacketType::Auth, 0x04),
        ("20 03 00 10 00", PacketType::ConnAck, 0x10),
        ("40 03 000A 42", PacketType::PubAck, 0x42),
    ] {
        rejects(
            V5,
            &hex(bytes),
            E::InvalidReasonCode { packet, code },
            ReasonCode::ProtocolError,
        );
    }
    rejects(
        V3_1_1,
        &hex("20 02 00 06"),
        E::InvalidReasonCode {
            packet: PacketType::ConnAck,
            code: 6,
        },
        ReasonCode::ProtocolError,
    );
    rejects(
        V3_1_1,
        &hex("90 03 0001 03"),
        E::InvalidReasonCode {
            packet: PacketType::SubAck,
            code: 3,
        },
        ReasonCode::ProtocolError,
    );
}

#[test]
fn every_error_message_names_its_normative_statement() {
    let samples = [
        E::ReservedFlags {
            packet: PacketType::PubAck,
            flags: 1,
        },
        E::InvalidUtf8,
        E::NullCharacter,
        E::TopicNameWildcard,
        E::ZeroPacketId,
        E::EmptySubscribe,
        E::SubscriptionOptionsReserved,
        E::PasswordWithoutUsername,
    ];
    for e in samples {
        assert!(e.to_string().starts_with("[MQTT-"), "{e}");
    }
    // Rules the standard states without a statement number cite their section.
    for e in [
        E::VarIntTooLong,
        E::Truncated,
        E::DuplicateProperty(2),
        E::InvalidRetainHandling,
    ] {
        assert!(e.to_string().starts_with("[§"), "{e}");
    }
}
