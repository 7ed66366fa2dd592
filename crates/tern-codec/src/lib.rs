//! MQTT 3.1, 3.1.1 and 5.0 packets: bytes in, [`Packet`] out, and back.
//!
//! `tern-codec` performs no I/O, keeps no connection state and reads no clock. It does not
//! know which side of the connection it is on: rules that depend on the role or on earlier
//! packets (a client must not send a Subscription Identifier in PUBLISH, a second CONNECT is
//! a protocol error, topic alias resolution, ...) belong to `tern-proto`.
//!
//! # Tour
//! - [`Packet`]: one enum for every protocol version. The version matters only inside
//!   [`encode`] and [`decode`]: 5.0-only fields are dropped when writing 3.x and default when
//!   reading it.
//! - [`decode`] takes whole packets off the front of a [`bytes::BytesMut`] read buffer,
//!   returning `Ok(None)` until one is complete; [`check`] tells whether one is complete.
//!   Topics, strings and payloads are [`bytes::Bytes`] slices of that buffer, never copies.
//! - [`DecodeError`]: one variant per rule of the standard, tagged with its normative
//!   statement id; [`DecodeError::reason_code`] picks the reason code a server sends.
//! - [`TopicName`], [`TopicFilter`]: validated newtypes; [`TopicFilter::matches`] is the
//!   reference matcher.
//! - [`QosPid`]: QoS and packet id together, so a QoS 0 message has no id and a QoS 1/2
//!   message always has one; [`PacketId`] is never zero.
//!
//! # Example
//! ```
//! use bytes::BytesMut;
//! use tern_codec::{MAX_PACKET_SIZE, Packet, Protocol, Publish, QosPid, TopicName, decode, encode};
//!
//! let id = tern_codec::PacketId::new(7).unwrap();
//! let publish = Publish::new(TopicName::new("a/b")?, QosPid::AtLeastOnce(id), "hi");
//! let mut wire = BytesMut::new();
//! encode(&Packet::Publish(publish.clone()), Protocol::V3_1_1, &mut wire)?;
//! assert_eq!(&wire[..], b"\x32\x09\x00\x03a/b\x00\x07hi");
//!
//! // Half a packet is not an error, just not a packet yet.
//! let mut read = wire.split_to(5);
//! assert_eq!(decode(&mut read, Protocol::V3_1_1, MAX_PACKET_SIZE)?, None);
//! read.unsplit(wire);
//! assert_eq!(decode(&mut read, Protocol::V3_1_1, MAX_PACKET_SIZE)?, Some(Packet::Publish(publish)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

mod error;
pub mod packet;
pub mod properties;
mod reason;
mod topic;
mod types;
mod wire;

/// Fuzz target bodies (feature `testing`; never in a default build).
#[cfg(feature = "testing")]
pub mod fuzzing;

pub use error::{DecodeError, EncodeError};
pub use packet::{
    Ack, Auth, ConnAck, Connect, Disconnect, LastWill, Packet, PacketType, Publish, RetainHandling,
    SubAck, Subscribe, Subscription, SubscriptionOptions, UnsubAck, Unsubscribe, check, decode,
    decode_body, encode, encoded_len,
};
pub use properties::{PayloadFormat, PropertyList, Props, SubscriptionId, UserProperty};
pub use reason::ReasonCode;
pub use topic::{TopicFilter, TopicName, fits_nats_subject, matches_with};
pub use types::{PacketId, Protocol, QoS, QosPid, Str};

/// The largest packet MQTT can express: a 5-byte fixed header and the maximum remaining
/// length. Use it as `max_packet_size` for "no limit of our own".
pub const MAX_PACKET_SIZE: u32 = 1 + 4 + wire::VARINT_MAX;
