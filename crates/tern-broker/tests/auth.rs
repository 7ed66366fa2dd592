//! Who may connect: passwords checked against a password file, anonymous clients let in
//! or not, the refusal as a CONNACK reason code (5.0) or return code (3.1.1).

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

use common::Raw;
use tern_broker::auth::{Access, PasswordFile};
use tern_codec::{Connect, Packet, Protocol, ReasonCode};

fn access(allow_anonymous: bool) -> Access {
    let mut file = PasswordFile::default();
    file.set("ann", b"s3cret").unwrap();
    Access {
        passwords: Some(file),
        allow_anonymous,
        acl: None,
    }
}

fn connect(v: Protocol, user: Option<&str>, password: Option<&str>) -> Connect {
    let mut c = Connect::new(v, "c");
    c.username = user.map(Into::into);
    c.password = password.map(|p| p.as_bytes().to_vec().into());
    c
}

/// The CONNACK reason for `connect`, and whether the connection closed after a refusal.
fn outcome(port: u16, c: Connect) -> ReasonCode {
    let (mut raw, ack) = Raw::connect(port, c);
    if ack.reason != ReasonCode::Success {
        assert_eq!(raw.recv(), None, "closed after the refusal");
    }
    ack.reason
}

#[test]
fn the_right_password_connects_and_a_wrong_or_unknown_one_gets_0x86_or_return_code_4() {
    let broker = common::Broker::with_access(access(false));
    for v in [Protocol::V3_1_1, Protocol::V5] {
        assert_eq!(
            outcome(broker.port, connect(v, Some("ann"), Some("s3cret"))),
            ReasonCode::Success
        );
        assert_eq!(
            outcome(broker.port, connect(v, Some("ann"), Some("wrong"))),
            ReasonCode::BadUserNameOrPassword,
            "{v}"
        );
        assert_eq!(
            outcome(broker.port, connect(v, Some("bob"), Some("s3cret"))),
            ReasonCode::BadUserNameOrPassword,
            "{v}: unknown user"
        );
        assert_eq!(
            outcome(broker.port, connect(v, Some("ann"), None)),
            ReasonCode::BadUserNameOrPassword,
            "{v}: no password"
        );
    }
}

#[test]
fn anonymous_clients_get_0x87_or_return_code_5_unless_allowed() {
    let closed = common::Broker::with_access(access(false));
    for v in [Protocol::V3_1_1, Protocol::V5] {
        assert_eq!(
            outcome(closed.port, connect(v, None, None)),
            ReasonCode::NotAuthorized,
            "{v}"
        );
    }
    let open = common::Broker::with_access(access(true));
    assert_eq!(
        outcome(open.port, connect(Protocol::V5, None, None)),
        ReasonCode::Success
    );
    assert_eq!(
        outcome(open.port, connect(Protocol::V5, Some("ann"), Some("wrong"))),
        ReasonCode::BadUserNameOrPassword,
        "a username still has to have its password"
    );
}

#[test]
fn a_refused_client_does_not_disturb_a_connected_one() {
    let broker = common::Broker::with_access(access(false));
    let (mut good, _) = Raw::connect(
        broker.port,
        connect(Protocol::V5, Some("ann"), Some("s3cret")),
    );
    good.subscribe("t", tern_codec::QoS::AtMostOnce);
    assert_eq!(
        outcome(
            broker.port,
            connect(Protocol::V5, Some("ann"), Some("nope"))
        ),
        ReasonCode::BadUserNameOrPassword
    );
    let mut other = connect(Protocol::V5, Some("ann"), Some("s3cret"));
    other.client_id = "publisher".into();
    let (mut p, _) = Raw::connect(broker.port, other);
    p.send(Packet::Publish(tern_codec::Publish::new(
        tern_codec::TopicName::new("t").unwrap(),
        tern_codec::QosPid::AtMostOnce,
        "still here",
    )));
    assert!(matches!(good.recv(), Some(Packet::Publish(_))));
}
