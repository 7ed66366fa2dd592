//! SUBSCRIBE (3.8) and SUBACK (3.9).

use bytes::{BufMut, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::packet::PacketType;
use crate::properties::{AckProperties, Props, SubscribeProperties};
use crate::reason::ReasonCode;
use crate::topic::TopicFilter;
use crate::types::{PacketId, Protocol, QoS};
use crate::wire::{Reader, binary_len, put_str};

/// When retained messages are sent for a new subscription (5.0 3.8.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RetainHandling {
    /// 0: send retained messages at the time of the subscribe.
    #[default]
    SendAtSubscribe,
    /// 1: send them only if the subscription did not exist.
    SendIfNew,
    /// 2: do not send them.
    DoNotSend,
}

/// The subscription options byte. In 3.x only `qos` is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SubscriptionOptions {
    /// Maximum QoS the client wants for this subscription.
    pub qos: QoS,
    /// Do not deliver the client's own publications (5.0).
    pub no_local: bool,
    /// Keep the RETAIN flag as published when forwarding (5.0).
    pub retain_as_published: bool,
    /// Retain handling (5.0).
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    fn read(byte: u8, v: Protocol) -> Result<SubscriptionOptions, DecodeError> {
        let reserved = if v.is_v5() { 0b1100_0000 } else { 0b1111_1100 };
        if byte & reserved != 0 {
            return Err(DecodeError::SubscriptionOptionsReserved);
        }
        Ok(SubscriptionOptions {
            qos: QoS::from_bits(byte & 0b11).ok_or(DecodeError::InvalidQos)?,
            no_local: byte & 0b0100 != 0,
            retain_as_published: byte & 0b1000 != 0,
            retain_handling: match (byte >> 4) & 0b11 {
                0 => RetainHandling::SendAtSubscribe,
                1 => RetainHandling::SendIfNew,
                2 => RetainHandling::DoNotSend,
                _ => return Err(DecodeError::InvalidRetainHandling),
            },
        })
    }

    fn to_byte(self, v: Protocol) -> u8 {
        let qos = self.qos as u8;
        if !v.is_v5() {
            return qos;
        }
        let rh = match self.retain_handling {
            RetainHandling::SendAtSubscribe => 0,
            RetainHandling::SendIfNew => 1,
            RetainHandling::DoNotSend => 2,
        };
        qos | u8::from(self.no_local) << 2 | u8::from(self.retain_as_published) << 3 | rh << 4
    }
}

/// One topic filter of a SUBSCRIBE with its options.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subscription {
    /// The filter, possibly a shared subscription.
    pub filter: TopicFilter,
    /// Its options.
    pub options: SubscriptionOptions,
}

/// SUBSCRIBE: one or more subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet id, echoed by SUBACK.
    pub packet_id: PacketId,
    /// At least one subscription.
    pub subscriptions: Vec<Subscription>,
    /// SUBSCRIBE properties (5.0).
    pub properties: Props<SubscribeProperties>,
}

impl Subscribe {
    pub(crate) fn read(r: &mut Reader, v: Protocol) -> Result<Subscribe, DecodeError> {
        let packet_id = r.packet_id()?;
        let properties = SubscribeProperties::read(r, v)?;
        let mut subscriptions = Vec::new();
        while !r.is_empty() {
            let filter = TopicFilter::new(r.string()?)?;
            let options = SubscriptionOptions::read(r.u8()?, v)?;
            subscriptions.push(Subscription { filter, options });
        }
        if subscriptions.is_empty() {
            return Err(DecodeError::EmptySubscribe);
        }
        Ok(Subscribe {
            packet_id,
            subscriptions,
            properties,
        })
    }

    pub(crate) fn body_len(&self, v: Protocol) -> usize {
        2 + self.properties.wire_len(v)
            + self
                .subscriptions
                .iter()
                .map(|s| binary_len(s.filter.as_str().as_bytes()) + 1)
                .sum::<usize>()
    }

    pub(crate) fn write(&self, v: Protocol, out: &mut BytesMut) -> Result<(), EncodeError> {
        out.put_u16(self.packet_id.get());
        self.properties.write(v, out)?;
        for s in &self.subscriptions {
            put_str(out, s.filter.as_str())?;
            out.put_u8(s.options.to_byte(v));
        }
        Ok(())
    }
}

/// SUBACK: one reason code per subscription, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    /// Packet id of the SUBSCRIBE.
    pub packet_id: PacketId,
    /// Granted QoS or failure per subscription; 3.x carries only the granted QoS or 0x80.
    pub reasons: Vec<ReasonCode>,
    /// Properties (5.0).
    pub properties: Props<AckProperties>,
}

impl SubAck {
    pub(crate) fn read(r: &mut Reader, v: Protocol) -> Result<SubAck, DecodeError> {
        let packet_id = r.packet_id()?;
        let properties = AckProperties::read(r, v)?;
        let mut reasons = Vec::with_capacity(r.remaining());
        while !r.is_empty() {
            let code = r.u8()?;
            let reason = if v.is_v5() {
                ReasonCode::from_u8(code).filter(|c| c.valid_for(PacketType::SubAck))
            } else {
                ReasonCode::from_v3_suback(code)
            };
            reasons.push(reason.ok_or(DecodeError::InvalidReasonCode {
                packet: PacketType::SubAck,
                code,
            })?);
        }
        Ok(SubAck {
            packet_id,
            reasons,
            properties,
        })
    }

    pub(crate) fn body_len(&self, v: Protocol) -> usize {
        2 + self.properties.wire_len(v) + self.reasons.len()
    }

    pub(crate) fn write(&self, v: Protocol, out: &mut BytesMut) -> Result<(), EncodeError> {
        out.put_u16(self.packet_id.get());
        if v.is_v5() {
            self.properties.write(Protocol::V5, out)?;
            self.reasons.iter().for_each(|r| out.put_u8(*r as u8));
        } else {
            self.reasons
                .iter()
                .for_each(|r| out.put_u8(r.to_v3_suback()));
        }
        Ok(())
    }
}
