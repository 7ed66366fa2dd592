//! PUBLISH (3.3).

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::properties::PublishProperties;
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
    pub properties: PublishProperties,
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
            properties: PublishProperties::default(),
        }
    }

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

    pub(crate) fn check_encodable(&self, v: Protocol) -> Result<(), EncodeError> {
        if self.topic.is_empty() && (!v.is_v5() || self.properties.topic_alias.is_none()) {
            return Err(EncodeError::EmptyTopic);
        }
        Ok(())
    }

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
