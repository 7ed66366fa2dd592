//! The packet model: one [`Packet`] enum for every protocol version, and the framing of
//! section 2.1 (fixed header, remaining length).

mod ack;
mod auth;
mod connect;
mod disconnect;
mod publish;
mod subscribe;
mod unsubscribe;

pub use ack::Ack;
pub use auth::Auth;
pub use connect::{ConnAck, Connect, LastWill};
pub use disconnect::Disconnect;
pub use publish::Publish;
pub use subscribe::{RetainHandling, SubAck, Subscribe, Subscription, SubscriptionOptions};
pub use unsubscribe::{UnsubAck, Unsubscribe};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::types::Protocol;
use crate::wire::{Reader, VARINT_MAX, put_varint, read_varint, varint_len};

/// The control packet types of section 2.1.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[allow(missing_docs)] // The names are the spec's.
pub enum PacketType {
    Connect = 1,
    ConnAck = 2,
    Publish = 3,
    PubAck = 4,
    PubRec = 5,
    PubRel = 6,
    PubComp = 7,
    Subscribe = 8,
    SubAck = 9,
    Unsubscribe = 10,
    UnsubAck = 11,
    PingReq = 12,
    PingResp = 13,
    Disconnect = 14,
    Auth = 15,
}

impl PacketType {
    fn from_bits(bits: u8) -> Option<PacketType> {
        use PacketType as T;
        Some(match bits {
            1 => T::Connect,
            2 => T::ConnAck,
            3 => T::Publish,
            4 => T::PubAck,
            5 => T::PubRec,
            6 => T::PubRel,
            7 => T::PubComp,
            8 => T::Subscribe,
            9 => T::SubAck,
            10 => T::Unsubscribe,
            11 => T::UnsubAck,
            12 => T::PingReq,
            13 => T::PingResp,
            14 => T::Disconnect,
            15 => T::Auth,
            _ => return None,
        })
    }

    /// The fixed-header flags every packet but PUBLISH must carry [MQTT-2.1.3-1].
    fn fixed_flags(self) -> u8 {
        match self {
            PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe => 0b0010,
            _ => 0,
        }
    }
}

/// An MQTT control packet, the same for 3.1, 3.1.1 and 5.0. Fields that only 5.0 carries
/// (properties, most reason codes) are dropped when writing 3.x and take their defaults
/// when reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)] // Each variant is its packet type.
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(Ack),
    PubRec(Ack),
    PubRel(Ack),
    PubComp(Ack),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

impl Packet {
    /// Drops the Reason String and User Properties, which a sender must leave out rather
    /// than send a packet larger than the receiver's Maximum Packet Size [MQTT-3.1.2-24]
    /// [MQTT-3.4.2-2] [MQTT-3.4.2-3] (and the same rule for every acknowledgement,
    /// DISCONNECT and AUTH). PUBLISH and CONNECT carry none of them. Returns whether
    /// anything was dropped.
    pub fn drop_optional_properties(&mut self) -> bool {
        // Every list involved has `reason_string` and `user_properties`; an empty list
        // stays unallocated.
        macro_rules! strip {
            ($props:expr) => {{
                if $props.is_empty() {
                    false
                } else {
                    let p = &mut *$props;
                    let had = p.reason_string.is_some() || !p.user_properties.is_empty();
                    p.reason_string = None;
                    p.user_properties.clear();
                    had
                }
            }};
        }
        match self {
            Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
                strip!(a.properties)
            }
            Packet::SubAck(a) => strip!(a.properties),
            Packet::UnsubAck(a) => strip!(a.properties),
            Packet::Disconnect(d) => strip!(d.properties),
            Packet::ConnAck(c) => strip!(c.properties),
            Packet::Auth(a) => strip!(a.properties),
            _ => false,
        }
    }

    /// The packet's type.
    pub fn packet_type(&self) -> PacketType {
        use PacketType as T;
        match self {
            Packet::Connect(_) => T::Connect,
            Packet::ConnAck(_) => T::ConnAck,
            Packet::Publish(_) => T::Publish,
            Packet::PubAck(_) => T::PubAck,
            Packet::PubRec(_) => T::PubRec,
            Packet::PubRel(_) => T::PubRel,
            Packet::PubComp(_) => T::PubComp,
            Packet::Subscribe(_) => T::Subscribe,
            Packet::SubAck(_) => T::SubAck,
            Packet::Unsubscribe(_) => T::Unsubscribe,
            Packet::UnsubAck(_) => T::UnsubAck,
            Packet::PingReq => T::PingReq,
            Packet::PingResp => T::PingResp,
            Packet::Disconnect(_) => T::Disconnect,
            Packet::Auth(_) => T::Auth,
        }
    }

    /// The low four bits of the first byte.
    fn flags(&self) -> u8 {
        match self {
            Packet::Publish(p) => p.flags(),
            other => other.packet_type().fixed_flags(),
        }
    }

    fn body_len(&self, v: Protocol) -> usize {
        match self {
            Packet::Connect(p) => p.body_len(),
            Packet::ConnAck(p) => p.body_len(v),
            Packet::Publish(p) => p.body_len(v),
            Packet::PubAck(p) | Packet::PubRec(p) | Packet::PubRel(p) | Packet::PubComp(p) => {
                p.body_len(v)
            }
            Packet::Subscribe(p) => p.body_len(v),
            Packet::SubAck(p) => p.body_len(v),
            Packet::Unsubscribe(p) => p.body_len(v),
            Packet::UnsubAck(p) => p.body_len(v),
            Packet::PingReq | Packet::PingResp => 0,
            Packet::Disconnect(p) => p.body_len(v),
            Packet::Auth(p) => p.body_len(),
        }
    }

    fn write_body(&self, v: Protocol, out: &mut BytesMut) -> Result<(), EncodeError> {
        match self {
            Packet::Connect(p) => p.write(out),
            Packet::ConnAck(p) => p.write(v, out),
            Packet::Publish(p) => p.write(v, out),
            Packet::PubAck(p) | Packet::PubRec(p) | Packet::PubRel(p) | Packet::PubComp(p) => {
                p.write(v, out)
            }
            Packet::Subscribe(p) => p.write(v, out),
            Packet::SubAck(p) => p.write(v, out),
            Packet::Unsubscribe(p) => p.write(v, out),
            Packet::UnsubAck(p) => p.write(v, out),
            Packet::PingReq | Packet::PingResp => Ok(()),
            Packet::Disconnect(p) => p.write(v, out),
            Packet::Auth(p) => p.write(out),
        }
    }

    /// Checks what the body-length computation cannot: things 3.x cannot carry at all.
    fn check_encodable(&self, v: Protocol) -> Result<(), EncodeError> {
        match self {
            Packet::Auth(_) if !v.is_v5() => Err(EncodeError::NotInProtocol {
                packet: PacketType::Auth,
                protocol: v,
            }),
            Packet::Connect(c) => c.check_encodable(),
            Packet::ConnAck(c) if !v.is_v5() => c
                .reason
                .to_v3_connack()
                .map(|_| ())
                .ok_or(EncodeError::NoV3ReturnCode(c.reason)),
            Packet::Publish(p) => p.check_encodable(v),
            Packet::Subscribe(s) if s.subscriptions.is_empty() => Err(EncodeError::NoTopicFilters),
            Packet::Unsubscribe(u) if u.filters.is_empty() => Err(EncodeError::NoTopicFilters),
            _ => Ok(()),
        }
    }
}

/// The version a packet is written or read in: CONNECT carries its own.
fn version_of(packet: &Packet, connection: Protocol) -> Protocol {
    match packet {
        Packet::Connect(c) => c.protocol,
        _ => connection,
    }
}

/// Parses the fixed header at the start of `buf`: `Ok(None)` if it is not all buffered yet,
/// else the first byte, the header length and the remaining length. The announced total
/// is checked against `max_packet_size` here, before any of the body is needed.
#[inline]
fn fixed_header(
    buf: &[u8],
    max_packet_size: u32,
) -> Result<Option<(u8, usize, usize)>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let Some((remaining, len)) = read_varint(&buf[1..])? else {
        return Ok(None);
    };
    let header_len = 1 + len;
    let size = header_len + remaining as usize;
    if size > max_packet_size as usize {
        return Err(DecodeError::PacketTooLarge {
            size,
            max: max_packet_size,
        });
    }
    Ok(Some((first, header_len, remaining as usize)))
}

/// The size of the packet at the start of `buf` if all of it is buffered; `Ok(None)` if more
/// bytes are needed. Errors are those of the fixed header ([`DecodeError::VarIntTooLong`],
/// [`DecodeError::PacketTooLarge`]); a `Some(n)` means [`decode`] consumes exactly `n`.
pub fn check(buf: &[u8], max_packet_size: u32) -> Result<Option<usize>, DecodeError> {
    Ok(fixed_header(buf, max_packet_size)?
        .map(|(_, header, body)| header + body)
        .filter(|&total| buf.len() >= total))
}

/// Decodes one packet from the front of `buf`, removing its bytes.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole packet (nothing is consumed).
/// `version` is the connection's protocol version, fixed by its CONNECT; a CONNECT packet
/// itself is read in whatever version it announces. A packet whose fixed header announces
/// more than `max_packet_size` bytes in total fails at once, before its body is buffered.
/// Topics, strings and payloads of the result are slices of `buf`'s memory, not copies.
pub fn decode(
    buf: &mut BytesMut,
    version: Protocol,
    max_packet_size: u32,
) -> Result<Option<Packet>, DecodeError> {
    let Some((first, header, body)) = fixed_header(buf, max_packet_size)? else {
        return Ok(None);
    };
    if buf.len() < header + body {
        return Ok(None);
    }
    if first >> 4 == PacketType::Publish as u8
        && let Some(p) = Publish::read_fast(buf, first & 0x0F, header, body, version)?
    {
        return Ok(Some(Packet::Publish(p)));
    }
    let mut frame = buf.split_to(header + body).freeze();
    frame.advance(header);
    decode_body(first, frame, version).map(Some)
}

/// Decodes a packet from its first byte and its body (everything after the remaining
/// length).
#[inline]
pub fn decode_body(first: u8, body: Bytes, version: Protocol) -> Result<Packet, DecodeError> {
    let bits = first >> 4;
    let flags = first & 0x0F;
    let packet_type = match PacketType::from_bits(bits) {
        Some(PacketType::Auth) if !version.is_v5() => None,
        other => other,
    }
    .ok_or(DecodeError::ReservedPacketType(bits))?;
    // MQTT 3.1 (level 3) set DUP on a resent PUBREL, SUBSCRIBE or UNSUBSCRIBE (3.1
    // §2.1, "DUP flag"); 3.1.1 and 5.0 reserve the bit [MQTT-2.1.3-1].
    let dup_31 = version == Protocol::V3_1 && flags == packet_type.fixed_flags() | 0b1000;
    if packet_type != PacketType::Publish
        && flags != packet_type.fixed_flags()
        && !(dup_31 && packet_type.fixed_flags() != 0)
    {
        return Err(DecodeError::ReservedFlags {
            packet: packet_type,
            flags,
        });
    }
    let mut r = Reader::new(body);
    let v = version;
    let packet = match packet_type {
        PacketType::Connect => Packet::Connect(Box::new(Connect::read(&mut r)?)),
        PacketType::ConnAck => Packet::ConnAck(ConnAck::read(&mut r, v)?),
        PacketType::Publish => Packet::Publish(Publish::read(flags, &mut r, v)?),
        PacketType::PubAck => Packet::PubAck(Ack::read(PacketType::PubAck, &mut r, v)?),
        PacketType::PubRec => Packet::PubRec(Ack::read(PacketType::PubRec, &mut r, v)?),
        PacketType::PubRel => Packet::PubRel(Ack::read(PacketType::PubRel, &mut r, v)?),
        PacketType::PubComp => Packet::PubComp(Ack::read(PacketType::PubComp, &mut r, v)?),
        PacketType::Subscribe => Packet::Subscribe(Subscribe::read(&mut r, v)?),
        PacketType::SubAck => Packet::SubAck(SubAck::read(&mut r, v)?),
        PacketType::Unsubscribe => Packet::Unsubscribe(Unsubscribe::read(&mut r, v)?),
        PacketType::UnsubAck => Packet::UnsubAck(UnsubAck::read(&mut r, v)?),
        PacketType::PingReq => Packet::PingReq,
        PacketType::PingResp => Packet::PingResp,
        PacketType::Disconnect => Packet::Disconnect(Disconnect::read(&mut r, v)?),
        PacketType::Auth => Packet::Auth(Auth::read(&mut r)?),
    };
    r.finish()?;
    Ok(packet)
}

/// The number of bytes [`encode`] writes for `packet` in `version`.
pub fn encoded_len(packet: &Packet, version: Protocol) -> Result<usize, EncodeError> {
    let v = version_of(packet, version);
    packet.check_encodable(v)?;
    let body = packet.body_len(v);
    if body > VARINT_MAX as usize {
        return Err(EncodeError::PacketTooLarge(body));
    }
    Ok(1 + varint_len(body) + body)
}

/// Appends `packet`, written for a connection speaking `version`, to `out`. A CONNECT is
/// written in the version it names. What the version cannot carry is dropped (properties,
/// reason codes beyond 3.x return codes); what it cannot express at all is an error, and
/// then nothing is appended.
pub fn encode(packet: &Packet, version: Protocol, out: &mut BytesMut) -> Result<(), EncodeError> {
    let v = version_of(packet, version);
    packet.check_encodable(v)?;
    let body = packet.body_len(v);
    if body > VARINT_MAX as usize {
        return Err(EncodeError::PacketTooLarge(body));
    }
    let start = out.len();
    out.reserve(1 + varint_len(body) + body);
    out.put_u8((packet.packet_type() as u8) << 4 | packet.flags());
    put_varint(out, body);
    if let Err(e) = packet.write_body(v, out) {
        out.truncate(start);
        return Err(e);
    }
    debug_assert_eq!(out.len() - start, 1 + varint_len(body) + body, "{packet:?}");
    Ok(())
}
