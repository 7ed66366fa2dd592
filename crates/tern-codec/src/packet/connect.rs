//! CONNECT (3.1) and CONNACK (3.2).

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::packet::PacketType;
use crate::properties::{ConnAckProperties, ConnectProperties, Props, WillProperties};
use crate::reason::ReasonCode;
use crate::topic::TopicName;
use crate::types::{Protocol, QoS, Str};
use crate::wire::{Reader, binary_len, put_binary, put_str};

const USERNAME: u8 = 0x80;
const PASSWORD: u8 = 0x40;
const WILL_RETAIN: u8 = 0x20;
const WILL_QOS_SHIFT: u8 = 3;
const WILL: u8 = 0x04;
const CLEAN_START: u8 = 0x02;
const RESERVED: u8 = 0x01;

/// CONNECT: the first packet of a connection; it fixes the protocol version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// The version the client speaks; every later packet uses it.
    pub protocol: Protocol,
    /// Clean Start (5.0) / Clean Session (3.x).
    pub clean_start: bool,
    /// Keep alive in seconds; 0 turns it off.
    pub keep_alive: u16,
    /// Client identifier; may be empty.
    pub client_id: Str,
    /// The will message, if any.
    pub will: Option<LastWill>,
    /// User name.
    pub username: Option<Str>,
    /// Password (binary data).
    pub password: Option<Bytes>,
    /// CONNECT properties (5.0).
    pub properties: Props<ConnectProperties>,
}

/// The will message carried in CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWill {
    /// Topic the will is published to.
    pub topic: TopicName,
    /// Will payload.
    pub payload: Bytes,
    /// QoS of the will.
    pub qos: QoS,
    /// Whether the will is retained.
    pub retain: bool,
    /// Will properties (5.0).
    pub properties: Props<WillProperties>,
}

impl Connect {
    /// A CONNECT with the given version and client id and everything else at its default.
    pub fn new(protocol: Protocol, client_id: impl Into<Str>) -> Connect {
        Connect {
            protocol,
            clean_start: true,
            keep_alive: 60,
            client_id: client_id.into(),
            will: None,
            username: None,
            password: None,
            properties: Props::NONE,
        }
    }

    pub(crate) fn read(r: &mut Reader) -> Result<Connect, DecodeError> {
        let name = r.binary()?;
        let level = r.u8()?;
        let protocol = match (&name[..], level) {
            (b"MQTT", 4) => Protocol::V3_1_1,
            (b"MQTT", 5) => Protocol::V5,
            (b"MQIsdp", 3) => Protocol::V3_1,
            (b"MQTT" | b"MQIsdp", _) => return Err(DecodeError::UnsupportedProtocolLevel(level)),
            _ => return Err(DecodeError::InvalidProtocolName),
        };
        let flags = r.u8()?;
        if flags & RESERVED != 0 {
            return Err(DecodeError::ConnectReservedFlag);
        }
        let will_bits = (flags >> WILL_QOS_SHIFT) & 0b11;
        let has_will = flags & WILL != 0;
        if !has_will && (will_bits != 0 || flags & WILL_RETAIN != 0) {
            return Err(DecodeError::WillFlagsWithoutWill);
        }
        let will_qos = QoS::from_bits(will_bits).ok_or(DecodeError::InvalidWillQos)?;
        if flags & PASSWORD != 0 && flags & USERNAME == 0 && !protocol.is_v5() {
            return Err(DecodeError::PasswordWithoutUsername);
        }
        let keep_alive = r.u16()?;
        let properties = ConnectProperties::read(r, protocol)?;
        if properties.authentication_data.is_some() && properties.authentication_method.is_none() {
            return Err(DecodeError::AuthDataWithoutMethod);
        }
        let client_id = r.string()?;
        let will = if has_will {
            let properties = WillProperties::read(r, protocol)?;
            let len = r.u16()? as usize;
            let topic = TopicName::from_wire(r.take(len)?)?;
            if topic.is_empty() {
                return Err(DecodeError::EmptyTopic);
            }
            Some(LastWill {
                topic,
                payload: r.binary()?,
                qos: will_qos,
                retain: flags & WILL_RETAIN != 0,
                properties,
            })
        } else {
            None
        };
        let username = if flags & USERNAME != 0 {
            Some(r.string()?)
        } else {
            None
        };
        let password = if flags & PASSWORD != 0 {
            Some(r.binary()?)
        } else {
            None
        };
        Ok(Connect {
            protocol,
            clean_start: flags & CLEAN_START != 0,
            keep_alive,
            client_id,
            will,
            username,
            password,
            properties,
        })
    }

    pub(crate) fn check_encodable(&self) -> Result<(), EncodeError> {
        if self.password.is_some() && self.username.is_none() && !self.protocol.is_v5() {
            return Err(EncodeError::PasswordWithoutUsername);
        }
        if self.will.as_ref().is_some_and(|w| w.topic.is_empty()) {
            return Err(EncodeError::EmptyTopic);
        }
        Ok(())
    }

    pub(crate) fn body_len(&self) -> usize {
        let v = self.protocol;
        let mut len = binary_len(v.name().as_bytes()) + 1 + 1 + 2;
        len += self.properties.wire_len(v) + binary_len(self.client_id.as_bytes());
        if let Some(w) = &self.will {
            len += w.properties.wire_len(v)
                + binary_len(w.topic.as_str().as_bytes())
                + binary_len(&w.payload);
        }
        len += self
            .username
            .as_ref()
            .map_or(0, |u| binary_len(u.as_bytes()));
        len += self.password.as_ref().map_or(0, |p| binary_len(p));
        len
    }

    pub(crate) fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        let v = self.protocol;
        put_str(out, v.name())?;
        out.put_u8(self.protocol.level());
        let mut flags = 0;
        if self.clean_start {
            flags |= CLEAN_START;
        }
        if let Some(w) = &self.will {
            flags |= WILL | (w.qos as u8) << WILL_QOS_SHIFT;
            if w.retain {
                flags |= WILL_RETAIN;
            }
        }
        if self.username.is_some() {
            flags |= USERNAME;
        }
        if self.password.is_some() {
            flags |= PASSWORD;
        }
        out.put_u8(flags);
        out.put_u16(self.keep_alive);
        self.properties.write(v, out)?;
        put_str(out, &self.client_id)?;
        if let Some(w) = &self.will {
            w.properties.write(v, out)?;
            put_str(out, w.topic.as_str())?;
            put_binary(out, &w.payload)?;
        }
        if let Some(u) = &self.username {
            put_str(out, u)?;
        }
        if let Some(p) = &self.password {
            put_binary(out, p)?;
        }
        Ok(())
    }
}

/// CONNACK: the server's answer to CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    /// Whether the server resumed a stored session (always false in 3.1, which lacks it).
    pub session_present: bool,
    /// The outcome; in 3.x, one of the six return codes (see
    /// [`ReasonCode::to_v3_connack`]).
    pub reason: ReasonCode,
    /// CONNACK properties (5.0).
    pub properties: Props<ConnAckProperties>,
}

impl ConnAck {
    /// A CONNACK with the given outcome and no properties.
    pub fn new(session_present: bool, reason: ReasonCode) -> ConnAck {
        ConnAck {
            session_present,
            reason,
            properties: Props::NONE,
        }
    }

    pub(crate) fn read(r: &mut Reader, v: Protocol) -> Result<ConnAck, DecodeError> {
        let flags = r.u8()?;
        // MQTT 3.1 has no session present flag; its first byte is an unused reserved byte.
        if v != Protocol::V3_1 && flags & 0xFE != 0 {
            return Err(DecodeError::ConnAckReservedFlags);
        }
        let code = r.u8()?;
        let invalid = DecodeError::InvalidReasonCode {
            packet: PacketType::ConnAck,
            code,
        };
        let (reason, properties) = if v.is_v5() {
            let reason = ReasonCode::from_u8(code)
                .filter(|c| c.valid_for(PacketType::ConnAck))
                .ok_or(invalid)?;
            (reason, ConnAckProperties::read(r, v)?)
        } else {
            (
                ReasonCode::from_v3_connack(code).ok_or(invalid)?,
                Props::NONE,
            )
        };
        if properties.authentication_data.is_some() && properties.authentication_method.is_none() {
            return Err(DecodeError::AuthDataWithoutMethod);
        }
        Ok(ConnAck {
            session_present: v != Protocol::V3_1 && flags & 1 != 0,
            reason,
            properties,
        })
    }

    pub(crate) fn body_len(&self, v: Protocol) -> usize {
        2 + self.properties.wire_len(v)
    }

    pub(crate) fn write(&self, v: Protocol, out: &mut BytesMut) -> Result<(), EncodeError> {
        out.put_u8(u8::from(self.session_present && v != Protocol::V3_1));
        if v.is_v5() {
            out.put_u8(self.reason as u8);
            self.properties.write(Protocol::V5, out)
        } else {
            let code = self
                .reason
                .to_v3_connack()
                .ok_or(EncodeError::NoV3ReturnCode(self.reason))?;
            out.put_u8(code);
            Ok(())
        }
    }
}
