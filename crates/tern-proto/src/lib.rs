//! The sans-IO MQTT session engine shared by the Tern broker and client.
//!
//! `tern-proto` performs no I/O and reads no clock: packets come in through
//! [`Connection::handle_packet`], time through the `now` arguments, and what to send, what
//! to tell the application and when to wake up come out of [`Connection::poll_transmit`],
//! [`Connection::poll_event`] and [`Connection::poll_timeout`]. It does not do the
//! CONNECT/CONNACK handshake, authentication, routing or storage: the broker and client
//! negotiate a [`Config`], start a [`Connection`], and persist [`SessionState`] if they
//! want sessions to outlive the process.
//!
//! # Tour
//! - [`Connection`]: one connection's QoS 0/1/2 flows in both directions, keepalive, topic
//!   aliases, Receive Maximum both ways, Maximum Packet Size, message expiry.
//! - [`SessionState`]: the durable part (outbound inflight and queue, inbound QoS 2 ids,
//!   packet id allocation), plain data to persist and resume.
//! - [`Message`]: an application message as queued and delivered.
//! - [`effective_qos`]: the QoS a message is delivered at.
//!
//! # Example
//! A client publishes at QoS 1 to a server; the driver moves packets between them.
//! ```
//! use std::time::Instant;
//! use tern_codec::{Protocol, QoS, TopicName};
//! use tern_proto::{Config, Connection, Event, Message, Role, SessionState};
//!
//! let now = Instant::now();
//! let cfg = |role| Config::new(role, Protocol::V5);
//! let mut client = Connection::new(cfg(Role::Client), SessionState::new(), false, now);
//! let mut server = Connection::new(cfg(Role::Server), SessionState::new(), false, now);
//!
//! client.publish(Message::new(TopicName::new("a/b")?, "hi", QoS::AtLeastOnce), now);
//! let publish = client.poll_transmit(now).expect("PUBLISH");
//! server.handle_packet(publish, now)?;
//! assert!(matches!(server.poll_event(), Some(Event::Message { .. })));
//! let puback = server.poll_transmit(now).expect("PUBACK");
//! client.handle_packet(puback, now)?;
//! assert!(matches!(client.poll_event(), Some(Event::Acknowledged { .. })));
//! assert_eq!(client.session().inflight_len(), 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

mod alias;
mod connection;
mod idmap;
mod message;
mod session;

/// The simulated link and clock for two engines (feature `testing`; never in a default
/// build): the tests, the property test and the fuzz target share it.
#[cfg(feature = "testing")]
pub mod sim;

pub use connection::{AckMode, Config, Connection, DropReason, Event, ProtocolError, Role};
pub use message::Message;
pub use session::{
    Change, Changes, Entry, IdsExhausted, InboundState, Inflight, MessageId, OutboundState,
    SessionState,
};

use tern_codec::QoS;

/// The QoS a message is delivered at: the lowest of the publisher's QoS, the QoS granted to
/// the subscription, and the server's Maximum QoS [MQTT-3.8.4-8].
pub fn effective_qos(message: QoS, granted: QoS, server_maximum: QoS) -> QoS {
    message.min(granted).min(server_maximum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_qos_is_the_minimum_of_all_nine_combinations() {
        let all = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];
        for m in all {
            for g in all {
                assert_eq!(effective_qos(m, g, QoS::ExactlyOnce), m.min(g));
                assert_eq!(effective_qos(m, g, QoS::AtMostOnce), QoS::AtMostOnce);
            }
        }
        assert_eq!(
            effective_qos(QoS::ExactlyOnce, QoS::ExactlyOnce, QoS::AtLeastOnce),
            QoS::AtLeastOnce
        );
    }
}
