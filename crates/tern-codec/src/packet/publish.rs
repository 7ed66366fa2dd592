//! PUBLISH (3.3).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::properties::{Props, PublishProperties};
use crate::topic::TopicName;
use crate::types::{PacketId, Protocol, QoS, QosPid};
use crate::wire::{Reader, binary_len, put_str};

const DUP: u8 = 0b1000;
const RETAIN: u8 = 0b0001;

/// PUBLISH: an application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Redelivery of an earlier attempt (QoS 1/2 only).
    pub dup: bool,
    /// QoS and, for QoS 1/2, the packet id.
    pub qos_pid: QosPid,
    /// Retain flag.
    pub retain: bool,
    /// Topic name; empty only in 5.0 with a topic alias.
    pub topic: TopicName,
    /// Application payload.
    pub payload: Bytes,
    /// PUBLISH properties (5.0).
    pub properties: Props<PublishProperties>,
}

impl Publish {
    /// A PUBLISH with no properties and the DUP and RETAIN flags clear.
    pub fn new(topic: TopicName, qos_pid: QosPid, payload: impl Into<Bytes>) -> Publish {
        Publish {
            dup: false,
            qos_pid,
            retain: false,
            topic,
            payload: payload.into(),
            properties: Props::NONE,
        }
    }

    #[inline]
    pub(crate) fn flags(&self) -> u8 {
        let mut flags = (self.qos_pid.qos() as u8) << 1;
        if self.dup {
            flags |= DUP;
        }
        if self.retain {
            flags |= RETAIN;
        }
        flags
    }

    #[inline]
    pub(crate) fn read(flags: u8, r: &mut Reader, v: Protocol) -> Result<Publish, DecodeError> {
        let qos = QoS::from_bits((flags >> 1) & 0b11).ok_or(DecodeError::InvalidQos)?;
        let dup = flags & DUP != 0;
        if dup && qos == QoS::AtMostOnce {
            return Err(DecodeError::DupOnQos0);
        }
        let len = r.u16()? as usize;
        let topic = TopicName::from_wire(r.take(len)?)?;
        let qos_pid = match qos {
            QoS::AtMostOnce => QosPid::AtMostOnce,
            QoS::AtLeastOnce => QosPid::AtLeastOnce(r.packet_id()?),
            QoS::ExactlyOnce => QosPid::ExactlyOnce(r.packet_id()?),
        };
        let properties = PublishProperties::read(r, v)?;
        if topic.is_empty() && properties.topic_alias.is_none() {
            return Err(DecodeError::EmptyTopic);
        }
        Ok(Publish {
            dup,
            qos_pid,
            retain: flags & RETAIN != 0,
            topic,
            payload: r.rest(),
            properties,
        })
    }

    /// The hot path: a whole PUBLISH without properties (every 3.x PUBLISH, and 5.0 ones
    /// with an empty property list) at the front of `buf`, `header` bytes of fixed header
    /// then `body` bytes. Topic and payload are split straight off the read buffer.
    /// Returns `Ok(None)` without consuming anything when the packet has properties, for
    /// the general path to handle. On error the buffer's contents are unspecified: the
    /// connection is closed anyway.
    #[inline]
    pub(crate) fn read_fast(
        buf: &mut BytesMut,
        flags: u8,
        header: usize,
        body: usize,
        v: Protocol,
    ) -> Result<Option<Publish>, DecodeError> {
        let qos = QoS::from_bits((flags >> 1) & 0b11).ok_or(DecodeError::InvalidQos)?;
        let dup = flags & DUP != 0;
        if dup && qos == QoS::AtMostOnce {
            return Err(DecodeError::DupOnQos0);
        }
        let frame = &buf[header..header + body];
        let [hi, lo, ..] = *frame else {
            return Err(DecodeError::Truncated);
        };
        let topic_len = usize::from(u16::from_be_bytes([hi, lo]));
        let mut at = 2 + topic_len;
        let qos_pid = if qos == QoS::AtMostOnce {
            QosPid::AtMostOnce
        } else {
            let [hi, lo] = *frame.get(at..at + 2).ok_or(DecodeError::Truncated)? else {
                unreachable!("a two-byte range");
            };
            at += 2;
            QosPid::new(
                qos,
                PacketId::new(u16::from_be_bytes([hi, lo])).ok_or(DecodeError::ZeroPacketId)?,
            )
        };
        if v.is_v5() {
            match frame.get(at) {
                Some(0) => at += 1,
                Some(_) => return Ok(None),
                None => return Err(DecodeError::Truncated),
            }
        }
        if at > body {
            return Err(DecodeError::Truncated);
        }
        if topic_len == 0 {
            // Without properties there is no topic alias to stand in for it.
            return Err(DecodeError::EmptyTopic);
        }
        // One split off the read buffer; topic and payload are then cut from the frozen
        // frame, which is cheaper than cutting each off the `BytesMut`.
        let mut frame = buf.split_to(header + body).freeze();
        frame.advance(header + 2);
        let topic = TopicName::from_wire(frame.split_to(topic_len))?;
        frame.advance(at - 2 - topic_len);
        let payload = frame;
        Ok(Some(Publish {
            dup,
            qos_pid,
            retain: flags & RETAIN != 0,
            topic,
            payload,
            properties: Props::NONE,
        }))
    }

    pub(crate) fn check_encodable(&self, v: Protocol) -> Result<(), EncodeError> {
        if self.topic.is_empty() && (!v.is_v5() || self.properties.topic_alias.is_none()) {
            return Err(EncodeError::EmptyTopic);
        }
        Ok(())
    }

    #[inline]
    pub(crate) fn body_len(&self, v: Protocol) -> usize {
        binary_len(self.topic.as_str().as_bytes())
            + if self.qos_pid.packet_id().is_some() {
                2
            } else {
                0
            }
            + self.properties.wire_len(v)
            + self.payload.len()
    }

    #[inline]
    pub(crate) fn write(&self, v: Protocol, out: &mut BytesMut) -> Result<(), EncodeError> {
        put_str(out, self.topic.as_str())?;
        if let Some(id) = self.qos_pid.packet_id() {
            out.put_u16(id.get());
        }
        self.properties.write(v, out)?;
        out.put_slice(&self.payload);
        Ok(())
    }

    /// The packet id, for QoS 1/2.
    pub fn packet_id(&self) -> Option<PacketId> {
        self.qos_pid.packet_id()
    }
}
