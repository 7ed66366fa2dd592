//! The ACL against the real server: one claim per rule kind (topic, pattern with `%c` and
//! `%u`, deny, anonymous, subscribe vs receive), denied publishes and subscriptions with
//! their reason codes in 5.0 and 3.1.1, wills, and a reload that keeps connections.
//!
//! "Not delivered" is shown with a marker: after the message that must not arrive, an
//! allowed one is published on the same path; the next message the subscriber sees must
//! be the marker.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

use std::num::NonZeroU16;
use std::sync::Arc;

use common::{Broker, Raw, Spec};
use tern_broker::acl::Acl;
use tern_broker::auth::Access;
use tern_broker::server::AccessControl;
use tern_codec::{
    Ack, Connect, LastWill, Packet, Protocol, Publish, QoS, QosPid, ReasonCode, Subscribe,
    Subscription, SubscriptionOptions, TopicFilter, TopicName,
};

const ACL: &str = "
# clients without a username
topic read public/#
topic write public/anon

pattern readwrite devices/%c/#
pattern write users/%u/outbox

user root
topic readwrite #

user alice
topic readwrite alice/#
topic deny alice/secret/#
topic subscribe feed/#
topic receive feed/news
topic write will/alice
";

fn access(acl: &str) -> Access {
    Access {
        passwords: None,
        allow_anonymous: true,
        acl: Some(Arc::new(Acl::parse(acl).unwrap())),
    }
}

fn broker() -> (Broker, AccessControl) {
    let control = AccessControl::new(access(ACL));
    let broker = Broker::run(
        Default::default(),
        Box::new(tern_store::MemoryStore::new()),
        control.clone(),
        None,
        vec![Spec::tcp()],
    );
    (broker, control)
}

fn client(port: u16, v: Protocol, id: &str, user: Option<&str>) -> Raw {
    let mut c = Connect::new(v, id);
    c.username = user.map(Into::into);
    let (raw, ack) = Raw::connect(port, c);
    assert_eq!(ack.reason, ReasonCode::Success, "{id} connects");
    raw
}

/// Publishes and returns the PUBACK/PUBREC reason (completing QoS 2); `None` at QoS 0.
fn publish(raw: &mut Raw, topic: &str, qos: QoS) -> Option<ReasonCode> {
    let id = NonZeroU16::new(7).unwrap();
    raw.send(Packet::Publish(Publish::new(
        TopicName::new(topic).unwrap(),
        QosPid::new(qos, id),
        topic.to_string(),
    )));
    match qos {
        QoS::AtMostOnce => None,
        QoS::AtLeastOnce => match raw.recv() {
            Some(Packet::PubAck(a)) => Some(a.reason),
            other => panic!("want PUBACK, got {other:?}"),
        },
        QoS::ExactlyOnce => match raw.recv() {
            Some(Packet::PubRec(a)) => {
                if !a.reason.is_error() {
                    raw.send(Packet::PubRel(Ack::new(id)));
                    assert!(matches!(raw.recv(), Some(Packet::PubComp(_))));
                }
                Some(a.reason)
            }
            other => panic!("want PUBREC, got {other:?}"),
        },
    }
}

fn subscribe(raw: &mut Raw, filter: &str) -> ReasonCode {
    raw.send(Packet::Subscribe(Subscribe {
        packet_id: NonZeroU16::new(1).unwrap(),
        subscriptions: vec![Subscription {
            filter: TopicFilter::new(filter).unwrap(),
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
        }],
        properties: Default::default(),
    }));
    match raw.recv() {
        Some(Packet::SubAck(a)) => a.reasons[0],
        other => panic!("want SUBACK, got {other:?}"),
    }
}

/// The topic of the next message `raw` receives (acknowledged).
fn next_topic(raw: &mut Raw) -> String {
    match raw.recv() {
        Some(Packet::Publish(p)) => {
            if let Some(id) = p.qos_pid.packet_id() {
                raw.send(Packet::PubAck(Ack::new(id)));
            }
            p.topic.as_str().to_string()
        }
        other => panic!("want PUBLISH, got {other:?}"),
    }
}

#[test]
fn a_denied_publish_gets_0x87_at_qos_1_and_2_is_dropped_at_qos_0_and_reaches_nobody() {
    let (broker, _) = broker();
    let mut root = client(broker.port, Protocol::V5, "root", Some("root"));
    assert_eq!(subscribe(&mut root, "#"), ReasonCode::GrantedQos1);
    let mut alice = client(broker.port, Protocol::V5, "alice", Some("alice"));
    assert_eq!(publish(&mut alice, "bob/x", QoS::AtMostOnce), None);
    assert_eq!(
        publish(&mut alice, "bob/x", QoS::AtLeastOnce),
        Some(ReasonCode::NotAuthorized)
    );
    assert_eq!(
        publish(&mut alice, "bob/x", QoS::ExactlyOnce),
        Some(ReasonCode::NotAuthorized)
    );
    assert_eq!(
        publish(&mut alice, "alice/ok", QoS::AtLeastOnce),
        Some(ReasonCode::Success)
    );
    assert_eq!(next_topic(&mut root), "alice/ok");
}

#[test]
fn a_denied_3_1_1_publish_is_acknowledged_and_dropped() {
    let (broker, _) = broker();
    let mut root = client(broker.port, Protocol::V3_1_1, "root", Some("root"));
    subscribe(&mut root, "#");
    let mut alice = client(broker.port, Protocol::V3_1_1, "alice", Some("alice"));
    for qos in [QoS::AtLeastOnce, QoS::ExactlyOnce] {
        assert_eq!(publish(&mut alice, "bob/x", qos), Some(ReasonCode::Success));
    }
    publish(&mut alice, "alice/ok", QoS::AtLeastOnce);
    assert_eq!(next_topic(&mut root), "alice/ok");
}

#[test]
fn a_denied_subscription_gets_0x87_in_5_0_and_0x80_in_3_1_1() {
    let (broker, _) = broker();
    let mut v5 = client(broker.port, Protocol::V5, "a5", Some("alice"));
    assert_eq!(subscribe(&mut v5, "bob/#"), ReasonCode::NotAuthorized);
    assert_eq!(subscribe(&mut v5, "#"), ReasonCode::NotAuthorized);
    assert_eq!(subscribe(&mut v5, "alice/+"), ReasonCode::GrantedQos1);
    let mut v3 = client(broker.port, Protocol::V3_1_1, "a3", Some("alice"));
    assert_eq!(subscribe(&mut v3, "bob/#"), ReasonCode::UnspecifiedError);
    assert_eq!(subscribe(&mut v3, "alice/#"), ReasonCode::GrantedQos1);
}

#[test]
fn subscribe_and_receive_are_separate_permissions() {
    let (broker, _) = broker();
    let mut alice = client(broker.port, Protocol::V5, "alice", Some("alice"));
    // `subscribe feed/#` allows the subscription; only `receive feed/news` delivers.
    assert_eq!(subscribe(&mut alice, "feed/#"), ReasonCode::GrantedQos1);
    let mut root = client(broker.port, Protocol::V5, "root", Some("root"));
    publish(&mut root, "feed/sports", QoS::AtLeastOnce);
    publish(&mut root, "feed/news", QoS::AtLeastOnce);
    assert_eq!(next_topic(&mut alice), "feed/news");
}

#[test]
fn deny_wins_over_a_grant_for_subscriptions_and_deliveries() {
    let (broker, _) = broker();
    let mut alice = client(broker.port, Protocol::V5, "alice", Some("alice"));
    assert_eq!(
        subscribe(&mut alice, "alice/secret/x"),
        ReasonCode::NotAuthorized
    );
    assert_eq!(subscribe(&mut alice, "alice/#"), ReasonCode::GrantedQos1);
    assert_eq!(
        publish(&mut alice, "alice/secret/x", QoS::AtLeastOnce),
        Some(ReasonCode::NotAuthorized)
    );
    let mut root = client(broker.port, Protocol::V5, "root", Some("root"));
    publish(&mut root, "alice/secret/k", QoS::AtLeastOnce);
    publish(&mut root, "alice/public", QoS::AtLeastOnce);
    assert_eq!(next_topic(&mut alice), "alice/public");
}

#[test]
fn a_client_id_pattern_gives_each_device_its_own_subtree() {
    let (broker, _) = broker();
    let mut dev = client(broker.port, Protocol::V5, "dev1", None);
    assert_eq!(
        publish(&mut dev, "devices/dev1/temp", QoS::AtLeastOnce),
        Some(ReasonCode::NoMatchingSubscribers)
    );
    assert_eq!(
        publish(&mut dev, "devices/dev2/temp", QoS::AtLeastOnce),
        Some(ReasonCode::NotAuthorized)
    );
    assert_eq!(
        subscribe(&mut dev, "devices/dev1/#"),
        ReasonCode::GrantedQos1
    );
    assert_eq!(
        subscribe(&mut dev, "devices/+/temp"),
        ReasonCode::NotAuthorized
    );
    // A client id that would widen the pattern does not get it.
    let mut sly = client(broker.port, Protocol::V5, "+", None);
    assert_eq!(
        publish(&mut sly, "devices/x/temp", QoS::AtLeastOnce),
        Some(ReasonCode::NotAuthorized)
    );
}

#[test]
fn a_username_pattern_applies_to_that_user_and_not_to_anonymous_clients() {
    let (broker, _) = broker();
    let mut alice = client(broker.port, Protocol::V5, "a", Some("alice"));
    assert_eq!(
        publish(&mut alice, "users/alice/outbox", QoS::AtLeastOnce),
        Some(ReasonCode::NoMatchingSubscribers)
    );
    assert_eq!(
        publish(&mut alice, "users/bob/outbox", QoS::AtLeastOnce),
        Some(ReasonCode::NotAuthorized)
    );
    let mut anon = client(broker.port, Protocol::V5, "n", None);
    assert_eq!(
        publish(&mut anon, "users/alice/outbox", QoS::AtLeastOnce),
        Some(ReasonCode::NotAuthorized)
    );
}

#[test]
fn topic_lines_before_any_user_are_for_anonymous_clients_only() {
    let (broker, _) = broker();
    let mut anon = client(broker.port, Protocol::V5, "n", None);
    assert_eq!(subscribe(&mut anon, "public/#"), ReasonCode::GrantedQos1);
    let mut writer = client(broker.port, Protocol::V5, "w", None);
    assert_eq!(
        publish(&mut writer, "public/anon", QoS::AtLeastOnce),
        Some(ReasonCode::Success)
    );
    assert_eq!(next_topic(&mut anon), "public/anon");
    assert_eq!(
        publish(&mut writer, "public/other", QoS::AtLeastOnce),
        Some(ReasonCode::NotAuthorized)
    );
    // alice has her own rules; the anonymous ones are not hers.
    let mut alice = client(broker.port, Protocol::V5, "a", Some("alice"));
    assert_eq!(subscribe(&mut alice, "public/#"), ReasonCode::NotAuthorized);
}

#[test]
fn a_will_is_published_only_where_its_owner_may_write() {
    let (broker, _) = broker();
    let mut root = client(broker.port, Protocol::V5, "root", Some("root"));
    subscribe(&mut root, "#");
    for (id, topic) in [("w1", "bob/will"), ("w2", "will/alice")] {
        let mut c = Connect::new(Protocol::V5, id);
        c.username = Some("alice".into());
        c.will = Some(LastWill {
            topic: TopicName::new(topic).unwrap(),
            payload: "gone".into(),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
        });
        let (raw, _) = Raw::connect(broker.port, c);
        drop(raw); // no DISCONNECT: the will goes out
    }
    assert_eq!(next_topic(&mut root), "will/alice");
    // And nothing else came before the marker.
    let mut other = client(broker.port, Protocol::V5, "root2", Some("root"));
    publish(&mut other, "marker", QoS::AtLeastOnce);
    assert_eq!(next_topic(&mut root), "marker");
}

#[test]
fn a_reloaded_acl_applies_to_connected_clients_without_disconnecting_them() {
    let (broker, control) = broker();
    let mut alice = client(broker.port, Protocol::V5, "alice", Some("alice"));
    assert_eq!(
        publish(&mut alice, "bob/x", QoS::AtLeastOnce),
        Some(ReasonCode::NotAuthorized)
    );
    control.replace(access("user alice\ntopic write bob/#\n"));
    // The core picks the new rules up between packets; give it a moment.
    let mut reason = None;
    for _ in 0..50 {
        reason = publish(&mut alice, "bob/x", QoS::AtLeastOnce);
        if reason != Some(ReasonCode::NotAuthorized) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(reason, Some(ReasonCode::NoMatchingSubscribers));
    assert_eq!(
        publish(&mut alice, "alice/x", QoS::AtLeastOnce),
        Some(ReasonCode::NotAuthorized),
        "the old rules are gone"
    );
}
