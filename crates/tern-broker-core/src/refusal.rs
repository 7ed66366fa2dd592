//! Every way the broker refuses a connection or a message, in one type: what goes on the
//! wire ([`Refusal::answer`]: a CONNACK, the PUBACK/PUBREC of the message, or a
//! DISCONNECT and close; the 5.0 reason code, which the codec maps to the 3.x return code,
//! or to a close where 3.x has none), the normative statement behind it, and the reason
//! string. The server's admission decisions (limits, passwords) come into the core as
//! [`Admission`]s, so every refusal CONNACK is built by the core, in one place
//! (`Broker::refuse`); every refused PUBLISH is answered in one place too
//! (`Broker::refuse_publish`).

use tern_codec::{Connect, Protocol, ReasonCode};

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// An empty client identifier where the version does not allow one: 3.1.1 without
    /// clean session, or 3.1 [MQTT-3.1.3-8].
    ClientIdNotValid,
    /// A 3.x keep alive above `max_keep_alive`: 3.x cannot be told to ping more often,
    /// so it is refused as Mosquitto does (return code 2). 5.0 gets Server Keep Alive.
    KeepAliveTooLong,
    /// A protocol name or level the server does not speak [MQTT-3.1.2-2]: the 3.x form
    /// (return code 1), which every version understands.
    UnsupportedProtocolVersion,
    /// A 5.0 CONNECT that does not decode: its reason code (0x81, 0x82, 0x95, ...)
    /// [MQTT-4.13.1-1].
    Malformed(ReasonCode),
    /// An Authentication Method: no enhanced authentication is offered (§4.12).
    BadAuthenticationMethod,
    /// `server_reference`: the client is sent elsewhere (5.0 0x9C, or 0x9D if moved for
    /// good; 3.x return code 3).
    Redirected {
        /// Permanently (0x9D Server moved) rather than for now (0x9C).
        moved: bool,
    },
    /// No username, and anonymous clients are not let in.
    NotAuthorized,
    /// A username the password file does not know, or the wrong password.
    BadUserNameOrPassword,
    /// The listener's or the server's connection limit is reached.
    ConnectionLimit,
    /// Admission could not be decided (the password check failed to run).
    ServerUnavailable,
    /// A cluster node cut off from NATS takes no connections until it is back (the
    /// cluster may hand its clients' wills and sessions to other nodes meanwhile).
    CutOff,
    /// A cluster node could not get the client's session from the node that has it
    /// (it did not answer in time): the client tries again.
    SessionElsewhere,
    /// A PUBLISH above the Maximum QoS the CONNACK advertised [MQTT-3.2.2-11].
    QosNotSupported,
    /// A retained PUBLISH where the CONNACK said Retain Available 0 [MQTT-3.2.2-14].
    RetainNotSupported,
    /// More PUBLISH packets per second than `max_publish_rate`.
    RateTooHigh,
    /// A topic longer or deeper than `max_topic_length` / `max_topic_levels`.
    TopicBeyondLimits,
    /// The ACL does not let the client publish there (or it is a `$SYS` topic).
    PublishNotAuthorized,
    /// A payload marked UTF-8 that is not [MQTT-3.3.2-4].
    PayloadFormatInvalid,
    /// A subscriber's queue is full under `queue_policy = "reject"`.
    QueueFull,
    /// The broker's budget for queued messages (`storage.max_queued_bytes`) is spent and
    /// the message would be queued: refused rather than accepted and later dropped.
    StorageFull,
    /// A topic filter longer or deeper than the limits.
    FilterBeyondLimits,
    /// The session holds `max_subscriptions` already.
    SubscriptionLimit,
    /// The ACL does not let the client subscribe with the filter.
    SubscribeNotAuthorized,
    /// No Local on a shared subscription, a protocol error [MQTT-3.8.3-4].
    NoLocalOnShared,
    /// Even the CONNACK would exceed the client's Maximum Packet Size: the connection is
    /// closed without one [MQTT-3.1.2-24].
    ConnAckTooLarge,
    /// The broker holds `max_sessions` sessions already and this CONNECT would make one
    /// more.
    SessionLimit,
    /// A PUBLISH below its topic policy's minimum QoS.
    QosBelowMinimum,
}

/// How a refusal reaches the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// In the CONNACK, then the connection is closed.
    ConnAck(ReasonCode),
    /// In the message's PUBACK/PUBREC (the message is dropped; the connection stays).
    Ack(ReasonCode),
    /// Nothing: the message is dropped without a word (QoS 0 has no acknowledgement).
    Silence,
    /// In the SUBACK, for that filter (3.x: 0x80, Failure); the rest of the SUBSCRIBE goes on.
    SubAck(ReasonCode),
    /// DISCONNECT with the code (5.0), then close (3.x: just close).
    Disconnect(ReasonCode),
}

impl Refusal {
    /// The reason code of the CONNACK (5.0 numbering; the codec writes the 3.x return
    /// code, or nothing where 3.x has none).
    pub fn reason_code(self) -> ReasonCode {
        match self {
            Refusal::ClientIdNotValid | Refusal::KeepAliveTooLong => {
                ReasonCode::ClientIdentifierNotValid
            }
            Refusal::UnsupportedProtocolVersion => ReasonCode::UnsupportedProtocolVersion,
            Refusal::Malformed(code) => code,
            Refusal::BadAuthenticationMethod => ReasonCode::BadAuthenticationMethod,
            Refusal::Redirected { moved: false } => ReasonCode::UseAnotherServer,
            Refusal::Redirected { moved: true } => ReasonCode::ServerMoved,
            Refusal::NotAuthorized => ReasonCode::NotAuthorized,
            Refusal::BadUserNameOrPassword => ReasonCode::BadUserNameOrPassword,
            Refusal::ConnectionLimit => ReasonCode::QuotaExceeded,
            Refusal::ServerUnavailable | Refusal::CutOff | Refusal::SessionElsewhere => {
                ReasonCode::ServerUnavailable
            }
            Refusal::QosNotSupported => ReasonCode::QosNotSupported,
            Refusal::RetainNotSupported => ReasonCode::RetainNotSupported,
            Refusal::RateTooHigh => ReasonCode::MessageRateTooHigh,
            Refusal::TopicBeyondLimits => ReasonCode::TopicNameInvalid,
            Refusal::PublishNotAuthorized => ReasonCode::NotAuthorized,
            Refusal::PayloadFormatInvalid => ReasonCode::PayloadFormatInvalid,
            Refusal::QueueFull | Refusal::StorageFull => ReasonCode::QuotaExceeded,
            Refusal::FilterBeyondLimits => ReasonCode::TopicFilterInvalid,
            Refusal::SubscriptionLimit => ReasonCode::QuotaExceeded,
            Refusal::SubscribeNotAuthorized => ReasonCode::NotAuthorized,
            Refusal::NoLocalOnShared => ReasonCode::ProtocolError,
            Refusal::ConnAckTooLarge => ReasonCode::PacketTooLarge,
            Refusal::SessionLimit => ReasonCode::QuotaExceeded,
            Refusal::QosBelowMinimum => ReasonCode::QosNotSupported,
        }
    }

    /// How the refusal reaches a client of `v5` (or 3.x) for a message that has an
    /// acknowledgement (`acked`: QoS 1/2) or not. A CONNECT refusal is a CONNACK.
    ///
    /// 5.0 puts a message's refusal in its PUBACK/PUBREC where the code is one those may
    /// carry; rule breaches the client was told about in the CONNACK (QoS, retain) and
    /// the rate limit (0x96 is a DISCONNECT code) end the connection. 3.x acknowledgements
    /// carry no reason, so a refusal that must be heard closes the connection; an ACL
    /// refusal is acknowledged as usual and the message dropped, as Mosquitto does.
    pub fn answer(self, v5: bool, acked: bool) -> Answer {
        let code = self.reason_code();
        match self {
            Refusal::QosNotSupported
            | Refusal::RetainNotSupported
            | Refusal::RateTooHigh
            | Refusal::NoLocalOnShared => Answer::Disconnect(code),
            Refusal::FilterBeyondLimits
            | Refusal::SubscriptionLimit
            | Refusal::SubscribeNotAuthorized => Answer::SubAck(code),
            Refusal::ConnAckTooLarge => Answer::Silence,
            Refusal::PublishNotAuthorized => match (acked, v5) {
                (false, _) => Answer::Silence,
                (true, true) => Answer::Ack(code),
                (true, false) => Answer::Ack(ReasonCode::Success),
            },
            // 0x9B is no PUBACK code: a QoS 1 publish hears 0x83 with a Reason String,
            // a QoS 0 one (no acknowledgement) the DISCONNECT 0x9B.
            Refusal::QosBelowMinimum => match (acked, v5) {
                (true, true) => Answer::Ack(ReasonCode::ImplementationSpecificError),
                _ => Answer::Disconnect(code),
            },
            Refusal::TopicBeyondLimits
            | Refusal::PayloadFormatInvalid
            | Refusal::QueueFull
            | Refusal::StorageFull => {
                if acked && v5 {
                    Answer::Ack(code)
                } else {
                    Answer::Disconnect(code)
                }
            }
            _ => Answer::ConnAck(code),
        }
    }

    /// The normative statement (or section) of the standard behind the refusal; `None`
    /// for the server's own policies.
    pub fn normative(self) -> Option<&'static str> {
        match self {
            Refusal::ClientIdNotValid => Some("MQTT-3.1.3-8"),
            Refusal::UnsupportedProtocolVersion => Some("MQTT-3.1.2-2"),
            Refusal::Malformed(_) => Some("MQTT-4.13.1-1"),
            Refusal::BadAuthenticationMethod => Some("§4.12"),
            Refusal::Redirected { .. } => Some("§4.11"),
            Refusal::QosNotSupported => Some("MQTT-3.2.2-11"),
            Refusal::RetainNotSupported => Some("MQTT-3.2.2-14"),
            Refusal::PayloadFormatInvalid => Some("MQTT-3.3.2-4"),
            Refusal::NoLocalOnShared => Some("MQTT-3.8.3-4"),
            Refusal::ConnAckTooLarge => Some("MQTT-3.1.2-24"),
            Refusal::KeepAliveTooLong
            | Refusal::NotAuthorized
            | Refusal::BadUserNameOrPassword
            | Refusal::ConnectionLimit
            | Refusal::ServerUnavailable
            | Refusal::CutOff
            | Refusal::SessionElsewhere
            | Refusal::RateTooHigh
            | Refusal::TopicBeyondLimits
            | Refusal::PublishNotAuthorized
            | Refusal::QueueFull
            | Refusal::StorageFull
            | Refusal::FilterBeyondLimits
            | Refusal::SubscriptionLimit
            | Refusal::SubscribeNotAuthorized
            | Refusal::SessionLimit
            | Refusal::QosBelowMinimum => None,
        }
    }

    /// What the log says.
    pub fn description(self) -> &'static str {
        match self {
            Refusal::ClientIdNotValid => "empty client identifier not allowed in this version",
            Refusal::KeepAliveTooLong => "keep alive above the server's maximum (3.x)",
            Refusal::UnsupportedProtocolVersion => "unsupported protocol name or level",
            Refusal::Malformed(_) => "malformed CONNECT",
            Refusal::BadAuthenticationMethod => "enhanced authentication is not offered",
            Refusal::Redirected { .. } => "redirected by server_reference",
            Refusal::NotAuthorized => "anonymous clients are not allowed",
            Refusal::BadUserNameOrPassword => "bad user name or password",
            Refusal::ConnectionLimit => "connection limit reached",
            Refusal::ServerUnavailable => "admission could not be decided",
            Refusal::CutOff => "this cluster node is cut off from NATS",
            Refusal::SessionElsewhere => {
                "the cluster node that has this client's session did not give it in time"
            }
            Refusal::QosNotSupported => "above the Maximum QoS the server offers",
            Refusal::RetainNotSupported => "retained messages are not available",
            Refusal::RateTooHigh => "over the publish rate the server allows",
            Refusal::TopicBeyondLimits => "the topic is longer or deeper than the server allows",
            Refusal::PublishNotAuthorized => "not authorized to publish to this topic",
            Refusal::PayloadFormatInvalid => {
                "the Payload Format Indicator says UTF-8 but the payload is not"
            }
            Refusal::QueueFull => "a subscriber's queue is full",
            Refusal::StorageFull => "the broker's storage for queued messages is full",
            Refusal::FilterBeyondLimits => "the filter is longer or deeper than the server allows",
            Refusal::SubscriptionLimit => "the session holds as many subscriptions as allowed",
            Refusal::SubscribeNotAuthorized => "not authorized to subscribe with this filter",
            Refusal::NoLocalOnShared => "No Local on a shared subscription",
            Refusal::ConnAckTooLarge => "no CONNACK fits the client's Maximum Packet Size",
            Refusal::SessionLimit => "the broker holds as many sessions as allowed",
            Refusal::QosBelowMinimum => "below the minimum QoS of this topic's policy",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let code = self.reason_code();
        write!(f, "{} ({code:?} 0x{:02X}", self.description(), code as u8)?;
        match self.normative() {
            Some(n) => write!(f, ", {n})"),
            None => write!(f, ")"),
        }
    }
}

/// The server's answer on a CONNECT it read: let through (possibly with the username
/// its client certificate gives), or refused before the core saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The CONNECT goes on to the core's handshake.
    Granted(Box<Connect>),
    /// Refused; `Protocol` is the version the CONNECT asked for.
    Refused(Protocol, Refusal),
}

#[cfg(test)]
mod tests {
    use tern_codec::PacketType;

    use super::*;

    const ALL: [Refusal; 27] = [
        Refusal::ClientIdNotValid,
        Refusal::KeepAliveTooLong,
        Refusal::UnsupportedProtocolVersion,
        Refusal::Malformed(ReasonCode::MalformedPacket),
        Refusal::BadAuthenticationMethod,
        Refusal::Redirected { moved: false },
        Refusal::Redirected { moved: true },
        Refusal::NotAuthorized,
        Refusal::BadUserNameOrPassword,
        Refusal::ConnectionLimit,
        Refusal::ServerUnavailable,
        Refusal::CutOff,
        Refusal::SessionElsewhere,
        Refusal::QosNotSupported,
        Refusal::RetainNotSupported,
        Refusal::RateTooHigh,
        Refusal::TopicBeyondLimits,
        Refusal::PublishNotAuthorized,
        Refusal::PayloadFormatInvalid,
        Refusal::QueueFull,
        Refusal::StorageFull,
        Refusal::FilterBeyondLimits,
        Refusal::SubscriptionLimit,
        Refusal::SubscribeNotAuthorized,
        Refusal::NoLocalOnShared,
        Refusal::ConnAckTooLarge,
        Refusal::SessionLimit,
    ];

    /// Checked against the standard's table of which packet may carry which reason code
    /// (`ReasonCode::valid_for`), in every version and with or without an
    /// acknowledgement: a refusal never puts a code where the packet may not carry it.
    #[test]
    fn every_refusal_goes_out_in_a_packet_that_may_carry_its_code() {
        for refusal in ALL {
            for (v5, acked) in [(true, true), (true, false), (false, true), (false, false)] {
                let (code, packet) = match refusal.answer(v5, acked) {
                    Answer::ConnAck(c) => (c, PacketType::ConnAck),
                    Answer::Ack(c) => (c, PacketType::PubAck),
                    Answer::SubAck(c) => (c, PacketType::SubAck),
                    Answer::Disconnect(c) => (c, PacketType::Disconnect),
                    Answer::Silence => {
                        assert!(
                            !acked || refusal == Refusal::ConnAckTooLarge,
                            "{refusal:?}: a message with an ack is answered"
                        );
                        continue;
                    }
                };
                assert!(
                    code.valid_for(packet),
                    "{refusal:?} (v5 {v5}, acked {acked}): {code:?} in {packet:?}"
                );
                if packet == PacketType::PubAck {
                    assert!(
                        code.valid_for(PacketType::PubRec),
                        "{refusal:?}: PUBREC too"
                    );
                }
            }
        }
    }
}
