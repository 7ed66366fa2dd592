//! Property tests: for arbitrary packets in every version, `decode(encode(p))` gives back `p`
//! (for 3.x, after dropping what 3.x cannot carry), `check` claims exactly the bytes `decode`
//! consumes, and a stream of packets fed a byte at a time decodes to the same packets.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

use std::num::{NonZeroU16, NonZeroU32};

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::option::of;
use proptest::prelude::*;
use tern_codec::properties::{
    AckProperties, AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties,
    PublishProperties, SubscribeProperties, UnsubscribeProperties, WillProperties,
};
use tern_codec::{
    Ack, Auth, ConnAck, Connect, Disconnect, LastWill, MAX_PACKET_SIZE, Packet, PacketId,
    PacketType, PayloadFormat, Protocol, Publish, QoS, QosPid, ReasonCode, RetainHandling, Str,
    SubAck, Subscribe, Subscription, SubscriptionId, SubscriptionOptions, TopicFilter, TopicName,
    UnsubAck, Unsubscribe, check, decode, encode,
};

fn string() -> impl Strategy<Value = Str> {
    "\\PC{0,6}".prop_map(Str::from)
}

fn bytes() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..12).prop_map(Bytes::from)
}

fn topic_name() -> impl Strategy<Value = TopicName> {
    "[a-z0-9/$é ]{1,12}".prop_map(|s| TopicName::new(s).unwrap())
}

fn topic_filter() -> impl Strategy<Value = TopicFilter> {
    let level = prop_oneof![Just("+".to_string()), "[a-z$]{0,3}"];
    (of("[a-z]{1,3}"), vec(level, 1..4), any::<bool>()).prop_filter_map(
        "valid filter",
        |(share, levels, hash)| {
            let mut f = levels.join("/");
            if hash {
                f.push_str("/#");
            }
            if let Some(g) = share {
                f = format!("$share/{g}/{f}");
            }
            TopicFilter::new(f).ok()
        },
    )
}

fn pid() -> impl Strategy<Value = PacketId> {
    (1..=u16::MAX).prop_map(|n| PacketId::new(n).unwrap())
}

fn qos() -> impl Strategy<Value = QoS> {
    (0u8..3).prop_map(|b| QoS::from_bits(b).unwrap())
}

fn user_props() -> impl Strategy<Value = Vec<(Str, Str)>> {
    vec((string(), string()), 0..3)
}

fn nz16() -> impl Strategy<Value = NonZeroU16> {
    (1..=u16::MAX).prop_map(|n| NonZeroU16::new(n).unwrap())
}

fn nz32() -> impl Strategy<Value = NonZeroU32> {
    (1..=u32::MAX).prop_map(|n| NonZeroU32::new(n).unwrap())
}

fn sub_id() -> impl Strategy<Value = SubscriptionId> {
    (1u32..=268_435_455).prop_map(|n| SubscriptionId::new(n).unwrap())
}

fn payload_format() -> impl Strategy<Value = PayloadFormat> {
    prop_oneof![Just(PayloadFormat::Unspecified), Just(PayloadFormat::Utf8)]
}

fn reason_for(packet: PacketType) -> impl Strategy<Value = ReasonCode> {
    let codes: Vec<ReasonCode> = ReasonCode::ALL
        .iter()
        .copied()
        .filter(|c| c.valid_for(packet))
        .collect();
    proptest::sample::select(codes)
}

/// Authentication Data is only legal after an Authentication Method.
fn auth_pair() -> impl Strategy<Value = (Option<Str>, Option<Bytes>)> {
    (of(string()), of(bytes())).prop_map(|(m, d)| match (m, d) {
        (None, Some(d)) => (Some(Str::from("m")), Some(d)),
        other => other,
    })
}

fn connect_props() -> impl Strategy<Value = ConnectProperties> {
    (
        of(any::<u32>()),
        of(nz16()),
        of(nz32()),
        of(any::<u16>()),
        of(any::<bool>()),
        of(any::<bool>()),
        user_props(),
        auth_pair(),
    )
        .prop_map(
            |(se, rm, mps, tam, rri, rpi, up, (am, ad))| ConnectProperties {
                session_expiry_interval: se,
                receive_maximum: rm,
                maximum_packet_size: mps,
                topic_alias_maximum: tam,
                request_response_information: rri,
                request_problem_information: rpi,
                user_properties: up,
                authentication_method: am,
                authentication_data: ad,
            },
        )
}

fn will_props() -> impl Strategy<Value = WillProperties> {
    (
        of(any::<u32>()),
        of(payload_format()),
        of(any::<u32>()),
        of(string()),
        of(topic_name()),
        of(bytes()),
        user_props(),
    )
        .prop_map(|(wd, pf, me, ct, rt, cd, up)| WillProperties {
            will_delay_interval: wd,
            payload_format_indicator: pf,
            message_expiry_interval: me,
            content_type: ct,
            response_topic: rt,
            correlation_data: cd,
            user_properties: up,
        })
}

fn connack_props() -> impl Strategy<Value = ConnAckProperties> {
    (
        (
            of(any::<u32>()),
            of(nz16()),
            of(prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce)]),
        ),
        (
            of(any::<bool>()),
            of(nz32()),
            of(string()),
            of(any::<u16>()),
        ),
        (
            of(string()),
            user_props(),
            of(any::<bool>()),
            of(any::<bool>()),
            of(any::<bool>()),
        ),
        (of(any::<u16>()), of(string()), of(string()), auth_pair()),
    )
        .prop_map(
            |(
                (se, rm, mq),
                (ra, mps, aci, tam),
                (rs, up, wsa, sia, ssa),
                (ska, ri, sr, (am, ad)),
            )| {
                ConnAckProperties {
                    session_expiry_interval: se,
                    receive_maximum: rm,
                    maximum_qos: mq,
                    retain_available: ra,
                    maximum_packet_size: mps,
                    assigned_client_identifier: aci,
                    topic_alias_maximum: tam,
                    reason_string: rs,
                    user_properties: up,
                    wildcard_subscription_available: wsa,
                    subscription_identifiers_available: sia,
                    shared_subscription_available: ssa,
                    server_keep_alive: ska,
                    response_information: ri,
                    server_reference: sr,
                    authentication_method: am,
                    authentication_data: ad,
                }
            },
        )
}

fn publish_props() -> impl Strategy<Value = PublishProperties> {
    (
        of(payload_format()),
        of(any::<u32>()),
        of(nz16()),
        of(topic_name()),
        of(bytes()),
        user_props(),
        vec(sub_id(), 0..3),
        of(string()),
    )
        .prop_map(|(pf, me, ta, rt, cd, up, si, ct)| PublishProperties {
            payload_format_indicator: pf,
            message_expiry_interval: me,
            topic_alias: ta,
            response_topic: rt,
            correlation_data: cd,
            user_properties: up,
            subscription_identifiers: si,
            content_type: ct,
        })
}

fn ack_props() -> impl Strategy<Value = AckProperties> {
    (of(string()), user_props()).prop_map(|(rs, up)| AckProperties {
        reason_string: rs,
        user_properties: up,
    })
}

fn options() -> impl Strategy<Value = SubscriptionOptions> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![
            Just(RetainHandling::SendAtSubscribe),
            Just(RetainHandling::SendIfNew),
            Just(RetainHandling::DoNotSend)
        ],
    )
        .prop_map(|(qos, nl, rap, rh)| SubscriptionOptions {
            qos,
            no_local: nl,
            retain_as_published: rap,
            retain_handling: rh,
        })
}

fn connect(v: Protocol) -> impl Strategy<Value = Packet> {
    let will = (topic_name(), bytes(), qos(), any::<bool>(), will_props()).prop_map(
        |(topic, payload, qos, retain, properties)| LastWill {
            topic,
            payload,
            qos,
            retain,
            properties: properties.into(),
        },
    );
    (
        any::<bool>(),
        any::<u16>(),
        string(),
        of(will),
        of(string()),
        of(bytes()),
        connect_props(),
    )
        .prop_map(
            move |(clean_start, keep_alive, client_id, will, username, password, properties)| {
                Packet::Connect(Box::new(Connect {
                    protocol: v,
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    // 3.x cannot carry a password without a user name.
                    username: if password.is_some() && !v.is_v5() {
                        username.or_else(|| Some(Str::from("u")))
                    } else {
                        username
                    },
                    password,
                    properties: properties.into(),
                }))
            },
        )
}

fn packet(v: Protocol) -> BoxedStrategy<Packet> {
    let connack_reason = if v.is_v5() {
        reason_for(PacketType::ConnAck).boxed()
    } else {
        // Only the reasons that have a 3.x return code can be written in 3.x.
        proptest::sample::select(
            ReasonCode::ALL
                .iter()
                .copied()
                .filter(|r| r.to_v3_connack().is_some())
                .collect::<Vec<_>>(),
        )
        .boxed()
    };
    let qos_pid = (qos(), pid()).prop_map(|(q, id)| QosPid::new(q, id));
    let publish = (
        any::<bool>(),
        qos_pid,
        any::<bool>(),
        topic_name(),
        any::<bool>(),
        bytes(),
        publish_props(),
    )
        .prop_map(
            move |(dup, qos_pid, retain, topic, alias_only, payload, mut properties)| {
                // 5.0 may send an empty topic name when a topic alias stands for it.
                let topic = if v.is_v5() && alias_only {
                    properties.topic_alias.get_or_insert(NonZeroU16::MIN);
                    TopicName::empty()
                } else {
                    topic
                };
                Packet::Publish(Publish {
                    dup: dup && qos_pid != QosPid::AtMostOnce,
                    qos_pid,
                    retain,
                    topic,
                    payload,
                    properties: properties.into(),
                })
            },
        );
    let ack = |kind: PacketType| {
        (pid(), reason_for(kind), ack_props()).prop_map(|(packet_id, reason, properties)| Ack {
            packet_id,
            reason,
            properties: properties.into(),
        })
    };
    let subscribe = (
        pid(),
        vec(
            (topic_filter(), options())
                .prop_map(|(filter, options)| Subscription { filter, options }),
            1..4,
        ),
        of(sub_id()),
        user_props(),
    )
        .prop_map(|(packet_id, subscriptions, id, up)| {
            Packet::Subscribe(Subscribe {
                packet_id,
                subscriptions,
                properties: SubscribeProperties {
                    subscription_identifier: id,
                    user_properties: up,
                }
                .into(),
            })
        });
    let suback = (
        pid(),
        vec(reason_for(PacketType::SubAck), 0..4),
        ack_props(),
    )
        .prop_map(|(packet_id, reasons, properties)| {
            Packet::SubAck(SubAck {
                packet_id,
                reasons,
                properties: properties.into(),
            })
        });
    let unsubscribe =
        (pid(), vec(topic_filter(), 1..4), user_props()).prop_map(|(packet_id, filters, up)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                properties: UnsubscribeProperties {
                    user_properties: up,
                }
                .into(),
            })
        });
    let unsuback = (
        pid(),
        vec(reason_for(PacketType::UnsubAck), 0..4),
        ack_props(),
    )
        .prop_map(|(packet_id, reasons, properties)| {
            Packet::UnsubAck(UnsubAck {
                packet_id,
                reasons,
                properties: properties.into(),
            })
        });
    let disconnect = (
        reason_for(PacketType::Disconnect),
        of(any::<u32>()),
        of(string()),
        user_props(),
        of(string()),
    )
        .prop_map(|(reason, se, rs, up, sr)| {
            Packet::Disconnect(Disconnect {
                reason,
                properties: DisconnectProperties {
                    session_expiry_interval: se,
                    reason_string: rs,
                    user_properties: up,
                    server_reference: sr,
                }
                .into(),
            })
        });
    let auth = (
        reason_for(PacketType::Auth),
        auth_pair(),
        of(string()),
        user_props(),
    )
        .prop_map(|(reason, (am, ad), rs, up)| {
            Packet::Auth(Auth {
                reason,
                properties: AuthProperties {
                    authentication_method: am,
                    authentication_data: ad,
                    reason_string: rs,
                    user_properties: up,
                }
                .into(),
            })
        });
    let connack =
        (any::<bool>(), connack_reason, connack_props()).prop_map(|(sp, reason, props)| {
            Packet::ConnAck(ConnAck {
                session_present: sp,
                reason,
                properties: props.into(),
            })
        });
    let common = prop_oneof![
        connect(v),
        connack,
        publish,
        ack(PacketType::PubAck).prop_map(Packet::PubAck),
        ack(PacketType::PubRec).prop_map(Packet::PubRec),
        ack(PacketType::PubRel).prop_map(Packet::PubRel),
        ack(PacketType::PubComp).prop_map(Packet::PubComp),
        subscribe,
        suback,
        unsubscribe,
        unsuback,
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        disconnect,
    ];
    if v.is_v5() {
        prop_oneof![13 => common, 1 => auth].boxed()
    } else {
        common.boxed()
    }
}

/// What a 3.x peer receives of a packet: no properties, reasons mapped to return codes.
fn as_v3(packet: Packet, v: Protocol) -> Packet {
    match packet {
        Packet::Connect(mut c) => {
            c.properties = Default::default();
            if let Some(w) = &mut c.will {
                w.properties = Default::default();
            }
            Packet::Connect(c)
        }
        Packet::ConnAck(a) => Packet::ConnAck(ConnAck {
            session_present: a.session_present && v != Protocol::V3_1,
            reason: ReasonCode::from_v3_connack(a.reason.to_v3_connack().unwrap()).unwrap(),
            properties: Default::default(),
        }),
        Packet::Publish(mut p) => {
            p.properties = Default::default();
            Packet::Publish(p)
        }
        Packet::PubAck(a) => Packet::PubAck(Ack::new(a.packet_id)),
        Packet::PubRec(a) => Packet::PubRec(Ack::new(a.packet_id)),
        Packet::PubRel(a) => Packet::PubRel(Ack::new(a.packet_id)),
        Packet::PubComp(a) => Packet::PubComp(Ack::new(a.packet_id)),
        Packet::Subscribe(mut s) => {
            s.properties = Default::default();
            for sub in &mut s.subscriptions {
                sub.options = SubscriptionOptions {
                    qos: sub.options.qos,
                    ..Default::default()
                };
            }
            Packet::Subscribe(s)
        }
        Packet::SubAck(a) => Packet::SubAck(SubAck {
            packet_id: a.packet_id,
            reasons: a
                .reasons
                .iter()
                .map(|r| ReasonCode::from_v3_suback(r.to_v3_suback()).unwrap())
                .collect(),
            properties: Default::default(),
        }),
        Packet::Unsubscribe(mut u) => {
            u.properties = Default::default();
            Packet::Unsubscribe(u)
        }
        Packet::UnsubAck(a) => Packet::UnsubAck(UnsubAck {
            packet_id: a.packet_id,
            reasons: vec![],
            properties: Default::default(),
        }),
        Packet::Disconnect(_) => Packet::Disconnect(Disconnect::default()),
        other => other,
    }
}

fn round_trip(p: &Packet, v: Protocol) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::new();
    encode(p, v, &mut buf).map_err(|e| TestCaseError::fail(format!("encode: {e}")))?;
    let len = buf.len();
    prop_assert_eq!(tern_codec::encoded_len(p, v), Ok(len));
    prop_assert_eq!(check(&buf, MAX_PACKET_SIZE), Ok(Some(len)));
    prop_assert_eq!(check(&buf[..len - 1], MAX_PACKET_SIZE), Ok(None));
    let back = decode(&mut buf, v, MAX_PACKET_SIZE);
    prop_assert!(buf.is_empty(), "decode left {} of {} bytes", buf.len(), len);
    let expected = if v.is_v5() {
        p.clone()
    } else {
        as_v3(p.clone(), v)
    };
    prop_assert_eq!(back, Ok(Some(expected)));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn v5_packets_round_trip(p in packet(Protocol::V5)) {
        round_trip(&p, Protocol::V5)?;
    }

    #[test]
    fn v311_packets_round_trip_after_dropping_what_311_cannot_carry(p in packet(Protocol::V3_1_1)) {
        round_trip(&p, Protocol::V3_1_1)?;
    }

    #[test]
    fn v31_packets_round_trip_after_dropping_what_31_cannot_carry(p in packet(Protocol::V3_1)) {
        round_trip(&p, Protocol::V3_1)?;
    }

    #[test]
    fn v5_packets_written_for_v311_arrive_as_their_v311_form(p in packet(Protocol::V5)) {
        // One model across versions: a 5.0 packet sent to a 3.1.1 peer loses only what 3.1.1
        // cannot carry (CONNECT keeps its own version, AUTH and reasons without a 3.1.1
        // return code cannot be sent at all).
        let p = match p {
            Packet::Connect(_) | Packet::Auth(_) => return Ok(()),
            Packet::ConnAck(a) if a.reason.to_v3_connack().is_none() => return Ok(()),
            Packet::Publish(p) if p.topic.is_empty() => {
                let mut out = BytesMut::new();
                let e = encode(&Packet::Publish(p), Protocol::V3_1_1, &mut out);
                prop_assert_eq!(e, Err(tern_codec::EncodeError::EmptyTopic));
                return Ok(());
            }
            p => p,
        };
        round_trip(&p, Protocol::V3_1_1)?;
    }

    #[test]
    fn a_stream_fed_one_byte_at_a_time_decodes_to_the_same_packets(
        packets in vec(packet(Protocol::V5), 1..6)
    ) {
        let mut wire = BytesMut::new();
        for p in &packets {
            encode(p, Protocol::V5, &mut wire).unwrap();
        }
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for byte in wire.iter() {
            buf.extend_from_slice(&[*byte]);
            while let Some(p) = decode(&mut buf, Protocol::V5, MAX_PACKET_SIZE).unwrap() {
                out.push(p);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(out, packets);
    }

    #[test]
    fn check_never_claims_more_than_decode_consumes(data in vec(any::<u8>(), 0..64)) {
        tern_codec::fuzzing::decode_stream(&data);
        tern_codec::fuzzing::round_trip(&data);
    }
}
