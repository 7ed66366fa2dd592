//! PUBACK (3.4), PUBREC (3.5), PUBREL (3.6) and PUBCOMP (3.7): one shape, four packet types.

use bytes::{BufMut, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::packet::PacketType;
use crate::properties::{AckProperties, Props};
use crate::reason::ReasonCode;
use crate::types::{PacketId, Protocol};
use crate::wire::Reader;

/// The body of PUBACK, PUBREC, PUBREL and PUBCOMP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The packet id of the flow.
    pub packet_id: PacketId,
    /// The outcome (5.0); always Success when read from 3.x.
    pub reason: ReasonCode,
    /// Properties (5.0).
    pub properties: Props<AckProperties>,
}

impl Ack {
    /// A successful acknowledgement with no properties.
    pub fn new(packet_id: PacketId) -> Ack {
        Ack {
            packet_id,
            reason: ReasonCode::Success,
            properties: Props::NONE,
        }
    }

    /// An acknowledgement with a reason code and no properties.
    pub fn with_reason(packet_id: PacketId, reason: ReasonCode) -> Ack {
        Ack {
            packet_id,
            reason,
            properties: Props::NONE,
        }
    }

    pub(crate) fn read(kind: PacketType, r: &mut Reader, v: Protocol) -> Result<Ack, DecodeError> {
        let packet_id = r.packet_id()?;
        let mut ack = Ack::new(packet_id);
        // 5.0 3.4.2.1: reason and property length may be omitted (remaining length 2), and
        // the property length alone may be omitted (remaining length 3).
        if v.is_v5() && !r.is_empty() {
            let code = r.u8()?;
            ack.reason = ReasonCode::from_u8(code)
                .filter(|c| c.valid_for(kind))
                .ok_or(DecodeError::InvalidReasonCode { packet: kind, code })?;
            if !r.is_empty() {
                ack.properties = AckProperties::read(r, v)?;
            }
        }
        Ok(ack)
    }

    pub(crate) fn body_len(&self, v: Protocol) -> usize {
        if !v.is_v5() {
            return 2;
        }
        match (self.reason, self.properties.is_empty()) {
            (ReasonCode::Success, true) => 2,
            (_, true) => 3,
            (_, false) => 3 + self.properties.wire_len(Protocol::V5),
        }
    }

    pub(crate) fn write(&self, v: Protocol, out: &mut BytesMut) -> Result<(), EncodeError> {
        out.put_u16(self.packet_id.get());
        let len = self.body_len(v);
        if len > 2 {
            out.put_u8(self.reason as u8);
        }
        if len > 3 {
            self.properties.write(Protocol::V5, out)?;
        }
        Ok(())
    }
}
