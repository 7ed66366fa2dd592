//! DISCONNECT (3.14).

use bytes::{BufMut, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::packet::PacketType;
use crate::properties::{DisconnectProperties, Props};
use crate::reason::ReasonCode;
use crate::types::Protocol;
use crate::wire::Reader;

/// DISCONNECT: in 3.x an empty packet from the client; in 5.0 either side, with a reason.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disconnect {
    /// Why (5.0); Normal disconnection when read from 3.x.
    pub reason: ReasonCode,
    /// Properties (5.0).
    pub properties: Props<DisconnectProperties>,
}

impl Disconnect {
    /// A DISCONNECT with a reason and no properties.
    pub fn new(reason: ReasonCode) -> Disconnect {
        Disconnect {
            reason,
            properties: Props::NONE,
        }
    }

    pub(crate) fn read(r: &mut Reader, v: Protocol) -> Result<Disconnect, DecodeError> {
        let mut d = Disconnect::default();
        // 5.0 3.14.2.1: a remaining length of 0 means Normal disconnection, no properties.
        if v.is_v5() && !r.is_empty() {
            let code = r.u8()?;
            d.reason = ReasonCode::from_u8(code)
                .filter(|c| c.valid_for(PacketType::Disconnect))
                .ok_or(DecodeError::InvalidReasonCode {
                    packet: PacketType::Disconnect,
                    code,
                })?;
            if !r.is_empty() {
                d.properties = DisconnectProperties::read(r, v)?;
            }
        }
        Ok(d)
    }

    pub(crate) fn body_len(&self, v: Protocol) -> usize {
        match (v.is_v5(), self.reason, self.properties.is_empty()) {
            (false, _, _) | (true, ReasonCode::Success, true) => 0,
            (true, _, true) => 1,
            (true, _, false) => 1 + self.properties.wire_len(Protocol::V5),
        }
    }

    pub(crate) fn write(&self, v: Protocol, out: &mut BytesMut) -> Result<(), EncodeError> {
        let len = self.body_len(v);
        if len > 0 {
            out.put_u8(self.reason as u8);
        }
        if len > 1 {
            self.properties.write(Protocol::V5, out)?;
        }
        Ok(())
    }
}
