//! AUTH (3.15), MQTT 5.0 only.

use bytes::{BufMut, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::packet::PacketType;
use crate::properties::{AuthProperties, Props};
use crate::reason::ReasonCode;
use crate::types::Protocol;
use crate::wire::Reader;

/// AUTH: a step of extended authentication.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Auth {
    /// Success, Continue authentication or Re-authenticate.
    pub reason: ReasonCode,
    /// Properties.
    pub properties: Props<AuthProperties>,
}

impl Auth {
    pub(crate) fn read(r: &mut Reader) -> Result<Auth, DecodeError> {
        let mut auth = Auth::default();
        // 3.15.2.1: remaining length 0 means Success with no properties.
        if !r.is_empty() {
            let code = r.u8()?;
            auth.reason = ReasonCode::from_u8(code)
                .filter(|c| c.valid_for(PacketType::Auth))
                .ok_or(DecodeError::InvalidReasonCode {
                    packet: PacketType::Auth,
                    code,
                })?;
            if !r.is_empty() {
                auth.properties = AuthProperties::read(r, Protocol::V5)?;
            }
        }
        let p = &auth.properties;
        if p.authentication_data.is_some() && p.authentication_method.is_none() {
            return Err(DecodeError::AuthDataWithoutMethod);
        }
        Ok(auth)
    }

    pub(crate) fn body_len(&self) -> usize {
        match (self.reason, self.properties.is_empty()) {
            (ReasonCode::Success, true) => 0,
            (_, true) => 1,
            (_, false) => 1 + self.properties.wire_len(Protocol::V5),
        }
    }

    pub(crate) fn write(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        let len = self.body_len();
        if len > 0 {
            out.put_u8(self.reason as u8);
        }
        if len > 1 {
            self.properties.write(Protocol::V5, out)?;
        }
        Ok(())
    }
}
