//! Broker behaviour over real TCP that needs exact control of the client side: withheld
//! acknowledgements, silence, bad bytes. The client is a bare socket speaking through
//! tern-codec; the broker is the real server.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

use std::num::NonZeroU16;

use common::Raw;
use tern_codec::{
    Ack, Connect, LastWill, Packet, Protocol, Publish, QoS, QosPid, ReasonCode, TopicName,
};

fn persistent(v: Protocol, id: &str) -> Connect {
    let mut c = Connect::new(v, id);
    c.clean_start = false;
    if v.is_v5() {
        c.properties.session_expiry_interval = Some(300);
    }
    c
}

fn publish(port: u16, topic: &str, payload: &str, qos: QoS) {
    let (mut p, _) = Raw::connect(port, Connect::new(Protocol::V3_1_1, format!("pub-{topic}")));
    let id = NonZeroU16::new(1).unwrap();
    p.send(Packet::Publish(Publish::new(
        TopicName::new(topic).unwrap(),
        QosPid::new(qos, id),
        payload.to_string(),
    )));
    if qos != QoS::AtMostOnce {
        let ack = p.recv().unwrap();
        if qos == QoS::ExactlyOnce {
            assert!(matches!(ack, Packet::PubRec(_)));
            p.send(Packet::PubRel(Ack::new(id)));
            assert!(matches!(p.recv(), Some(Packet::PubComp(_))));
        }
    }
}

#[test]
fn an_unacknowledged_qos1_message_is_resent_with_dup_and_its_id_after_reconnect() {
    for v in [Protocol::V3_1_1, Protocol::V5] {
        let broker = common::Broker::start();
        let (mut sub, _) = Raw::connect(broker.port, persistent(v, "s"));
        sub.subscribe("t", QoS::AtLeastOnce);
        publish(broker.port, "t", "m", QoS::AtLeastOnce);
        let Some(Packet::Publish(first)) = sub.recv() else {
            panic!("no PUBLISH")
        };
        assert!(!first.dup);
        drop(sub); // no PUBACK
        let (mut sub, ack) = Raw::connect(broker.port, persistent(v, "s"));
        assert!(ack.session_present, "{v}");
        let Some(Packet::Publish(again)) = sub.recv() else {
            panic!("not resent")
        };
        assert!(again.dup, "{v}: DUP on the resend");
        assert_eq!(again.packet_id(), first.packet_id(), "{v}: same id");
        assert_eq!(&again.payload[..], b"m");
    }
}

#[test]
fn pubrel_is_resent_after_reconnect_when_pubcomp_was_lost() {
    let broker = common::Broker::start();
    let (mut sub, _) = Raw::connect(broker.port, persistent(Protocol::V5, "s2"));
    sub.subscribe("t", QoS::ExactlyOnce);
    publish(broker.port, "t", "once", QoS::ExactlyOnce);
    let Some(Packet::Publish(p)) = sub.recv() else {
        panic!("no PUBLISH")
    };
    let id = p.packet_id().unwrap();
    sub.send(Packet::PubRec(Ack::new(id)));
    assert_eq!(sub.recv(), Some(Packet::PubRel(Ack::new(id))));
    drop(sub); // PUBCOMP never sent
    let (mut sub, ack) = Raw::connect(broker.port, persistent(Protocol::V5, "s2"));
    assert!(ack.session_present);
    assert_eq!(
        sub.recv(),
        Some(Packet::PubRel(Ack::new(id))),
        "PUBREL again, not the PUBLISH"
    );
    sub.send(Packet::PubComp(Ack::new(id)));
}

#[test]
fn the_will_is_published_when_keepalive_expires() {
    let broker = common::Broker::start();
    let (mut watcher, _) = Raw::connect(broker.port, Connect::new(Protocol::V3_1_1, "watch"));
    watcher.subscribe("wills/#", QoS::AtMostOnce);
    let mut silent = Connect::new(Protocol::V3_1_1, "silent");
    silent.keep_alive = 1;
    silent.will = Some(LastWill {
        topic: TopicName::new("wills/silent").unwrap(),
        payload: "timed out".into(),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Default::default(),
    });
    let (_silent, _) = Raw::connect(broker.port, silent);
    // 1.5 x keep alive plus the broker's 0.5 s tick; the watcher waits up to 10 s.
    match watcher.recv() {
        Some(Packet::Publish(p)) => assert_eq!(p.topic.as_str(), "wills/silent"),
        other => panic!("want the will, got {other:?}"),
    }
}

#[test]
fn a_second_connect_is_a_protocol_error() {
    let broker = common::Broker::start();
    let (mut c, _) = Raw::connect(broker.port, Connect::new(Protocol::V5, "twice"));
    c.send(Packet::Connect(Box::new(Connect::new(
        Protocol::V5,
        "twice",
    ))));
    match c.recv() {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::ProtocolError),
        other => panic!("want DISCONNECT 0x82, got {other:?}"),
    }
    assert_eq!(c.recv(), None);
}

#[test]
fn a_malformed_packet_closes_only_the_offending_connection() {
    let broker = common::Broker::start();
    let (mut good, _) = Raw::connect(broker.port, Connect::new(Protocol::V5, "good"));
    good.subscribe("t", QoS::AtMostOnce);
    let (mut bad, _) = Raw::connect(broker.port, Connect::new(Protocol::V5, "bad"));
    bad.send_bytes(&[0x30, 0x05, 0x00, 0x02, b'+', b'x', 0x00]); // wildcard in a topic name
    match bad.recv() {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::TopicNameInvalid),
        other => panic!("want DISCONNECT 0x90, got {other:?}"),
    }
    assert_eq!(bad.recv(), None);
    publish(broker.port, "t", "still here", QoS::AtMostOnce);
    let Some(Packet::Publish(p)) = good.recv() else {
        panic!("the other client lost its message")
    };
    assert_eq!(&p.payload[..], b"still here");
}

#[test]
fn the_will_is_published_when_the_client_breaks_the_protocol() {
    let broker = common::Broker::start();
    let (mut watcher, _) = Raw::connect(broker.port, Connect::new(Protocol::V3_1_1, "watch"));
    watcher.subscribe("wills/#", QoS::AtMostOnce);
    let mut rude = Connect::new(Protocol::V5, "rude");
    rude.will = Some(LastWill {
        topic: TopicName::new("wills/rude").unwrap(),
        payload: "broke the rules".into(),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Default::default(),
    });
    let (mut rude, _) = Raw::connect(broker.port, rude);
    rude.send(Packet::Connect(Box::new(Connect::new(
        Protocol::V5,
        "rude",
    ))));
    match rude.recv() {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::ProtocolError),
        other => panic!("want DISCONNECT 0x82, got {other:?}"),
    }
    match watcher.recv() {
        Some(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"broke the rules"),
        other => panic!("want the will, got {other:?}"),
    }
}

#[test]
fn outbound_topic_aliases_stay_within_the_clients_maximum_and_resolve_to_the_right_topics() {
    let broker = common::Broker::start();
    let mut connect = Connect::new(Protocol::V5, "aliased");
    connect.properties.topic_alias_maximum = Some(2);
    let (mut sub, _) = Raw::connect(broker.port, connect);
    sub.subscribe("al/#", QoS::AtMostOnce);
    let sent = ["al/a", "al/a", "al/b", "al/c", "al/a", "al/c"];
    for t in sent {
        // QoS 1 so each is routed before the next publisher connects (order across
        // connections is not promised); delivered at the subscription's QoS 0.
        publish(broker.port, t, t, QoS::AtLeastOnce);
    }
    let mut table = std::collections::HashMap::new();
    let mut empty_topics = 0;
    for want in sent {
        let Some(Packet::Publish(p)) = sub.recv() else {
            panic!("want PUBLISH")
        };
        let topic = match p.properties.topic_alias {
            Some(alias) => {
                assert!(alias.get() <= 2, "alias {alias} above the client's maximum");
                if p.topic.as_str().is_empty() {
                    empty_topics += 1;
                } else {
                    table.insert(alias, p.topic.as_str().to_string());
                }
                table[&alias].clone()
            }
            None => p.topic.as_str().to_string(),
        };
        assert_eq!(topic, want);
        assert_eq!(&p.payload[..], want.as_bytes(), "in order");
    }
    assert!(empty_topics >= 2, "aliases were used, not only bound");
}

/// Two members of one shared subscription; `stuck` never acknowledges and then leaves.
/// Returns what `stuck` held, what `good` got, and (persistent `stuck` only) what `stuck`
/// was sent again, with DUP, when it came back.
fn shared_member_leaves_holding(
    qos: QoS,
    stuck_keeps_session: bool,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let broker = common::Broker::start();
    let stuck_connect = if stuck_keeps_session {
        persistent(Protocol::V5, "stuck")
    } else {
        Connect::new(Protocol::V5, "stuck")
    };
    let (mut stuck, _) = Raw::connect(broker.port, stuck_connect);
    stuck.subscribe("$share/g/sq/#", qos);
    let (mut good, _) = Raw::connect(broker.port, Connect::new(Protocol::V5, "good"));
    good.subscribe("$share/g/sq/#", qos);
    for i in 0..4 {
        publish(broker.port, "sq/x", &i.to_string(), qos);
    }
    // `good` acknowledges everything (PUBACK, PUBREC then PUBCOMP) and reports payloads.
    let payloads = |raw: &mut Raw, n: usize| -> Vec<String> {
        let mut out = vec![];
        while out.len() < n {
            match raw.recv() {
                Some(Packet::Publish(p)) => {
                    match p.qos_pid {
                        QosPid::AtMostOnce => {}
                        QosPid::AtLeastOnce(id) => raw.send(Packet::PubAck(Ack::new(id))),
                        QosPid::ExactlyOnce(id) => raw.send(Packet::PubRec(Ack::new(id))),
                    }
                    out.push(String::from_utf8(p.payload.to_vec()).unwrap());
                }
                Some(Packet::PubRel(r)) => raw.send(Packet::PubComp(Ack::new(r.packet_id))),
                other => panic!("want PUBLISH, got {other:?}"),
            }
        }
        out
    };
    // Round robin: two each. The stuck member reads its two and answers nothing.
    let mut held = vec![];
    for _ in 0..2 {
        let Some(Packet::Publish(p)) = stuck.recv() else {
            panic!("want PUBLISH")
        };
        held.push(String::from_utf8(p.payload.to_vec()).unwrap());
    }
    let mut got = payloads(&mut good, 2);
    drop(stuck); // socket closed without DISCONNECT
    let mut again = vec![];
    if !stuck_keeps_session || qos == QoS::AtLeastOnce {
        got.extend(payloads(&mut good, 2));
    } else {
        let (mut back, ack) = Raw::connect(broker.port, persistent(Protocol::V5, "stuck"));
        assert!(ack.session_present);
        for _ in 0..2 {
            let Some(Packet::Publish(p)) = back.recv() else {
                panic!("want the held PUBLISH again")
            };
            assert!(p.dup);
            again.push(String::from_utf8(p.payload.to_vec()).unwrap());
        }
    }
    got.sort();
    (held, got, again)
}

#[test]
fn a_shared_member_whose_session_ends_with_qos2_unacknowledged_has_them_given_to_another() {
    let (held, got, _) = shared_member_leaves_holding(QoS::ExactlyOnce, false);
    assert_eq!(held.len(), 2);
    assert_eq!(
        got,
        ["0", "1", "2", "3"],
        "the other member got all four once"
    );
}

#[test]
fn a_persistent_shared_member_keeps_its_qos2_in_flight_for_its_return() {
    // The member may already hold them; exactly once forbids giving them to another while
    // its session can still complete them (§4.8.2).
    let (held, got, again) = shared_member_leaves_holding(QoS::ExactlyOnce, true);
    assert_eq!(held.len(), 2);
    assert_eq!(
        got.len(),
        2,
        "the other member got only its own two: {got:?}"
    );
    assert_eq!(
        again, held,
        "the member gets its own two again when it returns"
    );
}

#[test]
fn an_authentication_method_is_refused_with_0x8c() {
    let broker = common::Broker::start();
    let mut connect = Connect::new(Protocol::V5, "auth");
    connect.properties.authentication_method = Some("SCRAM-SHA-1".into());
    let mut raw_bytes = bytes::BytesMut::new();
    tern_codec::encode(
        &Packet::Connect(Box::new(connect)),
        Protocol::V5,
        &mut raw_bytes,
    )
    .unwrap();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", broker.port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    std::io::Write::write_all(&mut s, &raw_bytes).unwrap();
    let mut buf = bytes::BytesMut::new();
    let mut chunk = [0u8; 64];
    let ack = loop {
        if let Some(p) =
            tern_codec::decode(&mut buf, Protocol::V5, tern_codec::MAX_PACKET_SIZE).unwrap()
        {
            break p;
        }
        let n = std::io::Read::read(&mut s, &mut chunk).unwrap();
        assert!(n > 0, "closed without CONNACK");
        buf.extend_from_slice(&chunk[..n]);
    };
    match ack {
        Packet::ConnAck(a) => assert_eq!(a.reason, ReasonCode::BadAuthenticationMethod),
        other => panic!("want CONNACK 0x8C, got {other:?}"),
    }
}

#[test]
fn a_client_exceeding_the_advertised_receive_maximum_gets_disconnect_0x93() {
    let broker = common::Broker::with(tern_broker::core::Settings {
        receive_maximum: 3,
        ..Default::default()
    });
    let (mut c, ack) = Raw::connect(broker.port, Connect::new(Protocol::V5, "greedy"));
    assert_eq!(ack.properties.receive_maximum.map(|n| n.get()), Some(3));
    // QoS 2 flows count until PUBCOMP; withholding PUBREL keeps all of them open.
    for i in 1..=4u16 {
        c.send(Packet::Publish(Publish::new(
            TopicName::new("rm").unwrap(),
            QosPid::ExactlyOnce(NonZeroU16::new(i).unwrap()),
            "x",
        )));
    }
    for _ in 0..3 {
        assert!(matches!(c.recv(), Some(Packet::PubRec(_))));
    }
    match c.recv() {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason, ReasonCode::ReceiveMaximumExceeded),
        other => panic!("want DISCONNECT 0x93, got {other:?}"),
    }
}

#[test]
fn an_mqtt_3_1_client_resumes_a_qos2_flow_with_a_dup_pubrel() {
    let broker = common::Broker::start();
    let (mut c, _) = Raw::connect(broker.port, persistent(Protocol::V3_1, "old-client"));
    let id = NonZeroU16::new(7).unwrap();
    c.send(Packet::Publish(Publish::new(
        TopicName::new("t").unwrap(),
        QosPid::ExactlyOnce(id),
        "once",
    )));
    assert!(matches!(c.recv(), Some(Packet::PubRec(a)) if a.packet_id == id));
    drop(c); // cut before PUBREL
    // (3.1's CONNACK has no session-present flag; the session is resumed all the same.)
    let (mut c, _) = Raw::connect(broker.port, persistent(Protocol::V3_1, "old-client"));
    // PUBREL as MQTT 3.1 resends it: DUP set (0x6A), which 3.1.1 and 5.0 reserve.
    c.send_bytes(&[0x6A, 0x02, 0x00, 0x07]);
    assert!(
        matches!(c.recv(), Some(Packet::PubComp(a)) if a.packet_id == id),
        "completed, the connection kept"
    );
}

/// Writes `connect` on a new socket and returns the socket.
fn raw_connect(port: u16, connect: Connect) -> std::net::TcpStream {
    use std::io::Write;
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut out = bytes::BytesMut::new();
    tern_codec::encode(&Packet::Connect(Box::new(connect)), Protocol::V5, &mut out).unwrap();
    sock.write_all(&out).unwrap();
    sock
}

fn with_maximum_packet_size(id: &str, max: u32) -> Connect {
    let mut c = Connect::new(Protocol::V5, id);
    c.properties.maximum_packet_size = std::num::NonZeroU32::new(max);
    c
}

#[test]
fn a_client_whose_maximum_packet_size_fits_no_connack_is_closed_without_one() {
    use std::io::Read;
    let broker = common::Broker::start();
    let mut sock = raw_connect(broker.port, with_maximum_packet_size("tiny", 2));
    let mut buf = [0u8; 64];
    assert_eq!(
        sock.read(&mut buf).unwrap(),
        0,
        "closed, nothing sent [MQTT-3.1.2-24]"
    );
}

#[test]
fn an_acknowledgement_drops_its_reason_string_rather_than_exceed_the_maximum_packet_size() {
    use std::io::{Read, Write};
    let broker = common::Broker::start();
    let mut sock = raw_connect(broker.port, with_maximum_packet_size("small", 20));
    let mut connack = [0u8; 2];
    sock.read_exact(&mut connack).unwrap();
    assert_eq!(connack[0], 0x20);
    let mut rest = vec![0u8; usize::from(connack[1])];
    sock.read_exact(&mut rest).unwrap();
    assert!(
        2 + rest.len() <= 20,
        "the CONNACK fits: {} bytes",
        2 + rest.len()
    );
    // QoS 1 to $SYS: refused with 0x87, whose Reason String would make the PUBACK 48 bytes.
    let mut out = bytes::BytesMut::new();
    let publish = Publish::new(
        TopicName::new("$SYS/x").unwrap(),
        QosPid::AtLeastOnce(NonZeroU16::new(1).unwrap()),
        "x",
    );
    tern_codec::encode(&Packet::Publish(publish), Protocol::V5, &mut out).unwrap();
    sock.write_all(&out).unwrap();
    let mut puback = [0u8; 5];
    sock.read_exact(&mut puback).unwrap();
    assert_eq!(puback, [0x40, 0x03, 0x00, 0x01, 0x87], "[MQTT-3.4.2-2]");
}
