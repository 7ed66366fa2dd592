//! UNSUBSCRIBE (3.10) and UNSUBACK (3.11).

use bytes::{BufMut, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::packet::PacketType;
use crate::properties::{AckProperties, Props, UnsubscribeProperties};
use crate::reason::ReasonCode;
use crate::topic::TopicFilter;
use crate::types::{PacketId, Protocol};
use crate::wire::{Reader, binary_len, put_str};

/// UNSUBSCRIBE: one or more topic filters to remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet id, echoed by UNSUBACK.
    pub packet_id: PacketId,
    /// At least one filter.
    pub filters: Vec<TopicFilter>,
    /// UNSUBSCRIBE properties (5.0).
    pub properties: Props<UnsubscribeProperties>,
}

impl Unsubscribe {
    pub(crate) fn read(r: &mut Reader, v: Protocol) -> Result<Unsubscribe, DecodeError> {
        let packet_id = r.packet_id()?;
        let properties = UnsubscribeProperties::read(r, v)?;
        let mut filters = Vec::new();
        while !r.is_empty() {
            filters.push(TopicFilter::new(r.string()?)?);
        }
        if filters.is_empty() {
            return Err(DecodeError::EmptyUnsubscribe);
        }
        Ok(Unsubscribe {
            packet_id,
            filters,
            properties,
        })
    }

    pub(crate) fn body_len(&self, v: Protocol) -> usize {
        2 + self.properties.wire_len(v)
            + self
                .filters
                .iter()
                .map(|f| binary_len(f.as_str().as_bytes()))
                .sum::<usize>()
    }

    pub(crate) fn write(&self, v: Protocol, out: &mut BytesMut) -> Result<(), EncodeError> {
        out.put_u16(self.packet_id.get());
        self.properties.write(v, out)?;
        for f in &self.filters {
            put_str(out, f.as_str())?;
        }
        Ok(())
    }
}

/// UNSUBACK: in 5.0 one reason code per filter; in 3.x only the packet id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    /// Packet id of the UNSUBSCRIBE.
    pub packet_id: PacketId,
    /// One reason per filter (5.0); empty when read from 3.x.
    pub reasons: Vec<ReasonCode>,
    /// Properties (5.0).
    pub properties: Props<AckProperties>,
}

impl UnsubAck {
    pub(crate) fn read(r: &mut Reader, v: Protocol) -> Result<UnsubAck, DecodeError> {
        let packet_id = r.packet_id()?;
        let mut ack = UnsubAck {
            packet_id,
            reasons: Vec::new(),
            properties: Props::NONE,
        };
        if v.is_v5() {
            ack.properties = AckProperties::read(r, v)?;
            ack.reasons.reserve(r.remaining());
            while !r.is_empty() {
                let code = r.u8()?;
                ack.reasons.push(
                    ReasonCode::from_u8(code)
                        .filter(|c| c.valid_for(PacketType::UnsubAck))
                        .ok_or(DecodeError::InvalidReasonCode {
                            packet: PacketType::UnsubAck,
                            code,
                        })?,
                );
            }
        }
        Ok(ack)
    }

    pub(crate) fn body_len(&self, v: Protocol) -> usize {
        2 + if v.is_v5() {
            self.properties.wire_len(Protocol::V5) + self.reasons.len()
        } else {
            0
        }
    }

    pub(crate) fn write(&self, v: Protocol, out: &mut BytesMut) -> Result<(), EncodeError> {
        out.put_u16(self.packet_id.get());
        if v.is_v5() {
            self.properties.write(Protocol::V5, out)?;
            self.reasons.iter().for_each(|r| out.put_u8(*r as u8));
        }
        Ok(())
    }
}
