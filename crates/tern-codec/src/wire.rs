//! Wire primitives of section 1.5: integers, variable byte integers, strings, binary data.
//! Reading works on a [`Bytes`] body so strings and binary data come out as slices of the
//! read buffer; writing appends to a [`BytesMut`].

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::types::{PacketId, Str};

/// The largest value a variable byte integer can hold (four bytes).
pub(crate) const VARINT_MAX: u32 = 268_435_455;

/// A cursor over one packet body.
pub(crate) struct Reader {
    buf: Bytes,
}

impl Reader {
    #[inline]
    pub(crate) fn new(buf: Bytes) -> Reader {
        Reader { buf }
    }

    #[inline]
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Fails unless the body has been read to its end.
    #[inline]
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }

    #[inline]
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        if self.buf.is_empty() {
            return Err(DecodeError::Truncated);
        }
        Ok(self.buf.get_u8())
    }

    #[inline]
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        if self.buf.len() < 2 {
            return Err(DecodeError::Truncated);
        }
        Ok(self.buf.get_u16())
    }

    #[inline]
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        if self.buf.len() < 4 {
            return Err(DecodeError::Truncated);
        }
        Ok(self.buf.get_u32())
    }

    #[inline]
    pub(crate) fn packet_id(&mut self) -> Result<PacketId, DecodeError> {
        PacketId::new(self.u16()?).ok_or(DecodeError::ZeroPacketId)
    }

    #[inline]
    pub(crate) fn varint(&mut self) -> Result<u32, DecodeError> {
        match read_varint(&self.buf)? {
            Some((value, len)) => {
                self.buf.advance(len);
                Ok(value)
            }
            None => Err(DecodeError::Truncated),
        }
    }

    #[inline]
    pub(crate) fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        Ok(self.buf.split_to(n))
    }

    /// Everything left in the body (a PUBLISH payload).
    #[inline]
    pub(crate) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    /// Binary Data (1.5.6): two-byte length then bytes.
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u16()? as usize;
        self.take(len)
    }

    /// UTF-8 Encoded String (1.5.4), validated.
    pub(crate) fn string(&mut self) -> Result<Str, DecodeError> {
        let bytes = self.binary()?;
        utf8(bytes)
    }
}

/// Validates an MQTT UTF-8 string: well-formed, no surrogates, no U+0000.
pub(crate) fn utf8(bytes: Bytes) -> Result<Str, DecodeError> {
    forbidden_chars(&bytes, false)?;
    Str::try_from(bytes).map_err(|_| DecodeError::InvalidUtf8)
}

/// Checks a string's bytes for what the standard forbids beyond ill-formed UTF-8: U+0000,
/// encoded surrogates (ED A0..BF: Rust rejects them like any ill-formed sequence; this tells
/// them apart so the error names the rule), and, for topic names, the wildcards `+` and `#`.
/// 0xED is always a lead byte, so the test cannot misfire mid-character.
#[inline]
pub(crate) fn forbidden_chars(bytes: &[u8], wildcards: bool) -> Result<(), DecodeError> {
    // Every forbidden byte is 0x00, '#' (0x23), '+' (0x2B) or 0xED: letters, digits and '/'
    // pass this test alone. It folds without an early exit so that it vectorises.
    let suspects = bytes
        .iter()
        .fold(0u8, |acc, &b| acc | u8::from(b <= b'+' || b == 0xED));
    if suspects == 0 {
        return Ok(());
    }
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            0 => return Err(DecodeError::NullCharacter),
            b'+' | b'#' if wildcards => return Err(DecodeError::TopicNameWildcard),
            0xED if matches!(bytes.get(i + 1), Some(0xA0..=0xBF)) => {
                return Err(DecodeError::Surrogate);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Reads a variable byte integer from the start of `buf`: `Ok(None)` if more bytes are
/// needed, otherwise the value and the number of bytes it took. A fifth byte is an error
/// as soon as it is announced, however little has been buffered.
#[inline]
pub(crate) fn read_varint(buf: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for i in 0..4 {
        let Some(&byte) = buf.get(i) else {
            return Ok(None);
        };
        value |= u32::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Err(DecodeError::VarIntTooLong)
}

/// Bytes a variable byte integer takes.
#[inline]
pub(crate) fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

#[inline]
pub(crate) fn put_varint(out: &mut BytesMut, mut value: usize) {
    loop {
        let mut byte = (value & 0x7F) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            return;
        }
    }
}

/// Writes Binary Data (two-byte length prefix).
#[inline]
pub(crate) fn put_binary(out: &mut BytesMut, data: &[u8]) -> Result<(), EncodeError> {
    let len = u16::try_from(data.len()).map_err(|_| EncodeError::FieldTooLong(data.len()))?;
    out.put_u16(len);
    out.put_slice(data);
    Ok(())
}

/// Writes a UTF-8 Encoded String.
#[inline]
pub(crate) fn put_str(out: &mut BytesMut, s: &str) -> Result<(), EncodeError> {
    put_binary(out, s.as_bytes())
}

/// Encoded size of a string or binary field.
#[inline]
pub(crate) fn binary_len(data: &[u8]) -> usize {
    2 + data.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_spec_boundaries_round_trip() {
        // Table 1-1 of the 5.0 spec: the smallest and largest value of each length.
        for (value, bytes) in [
            (0usize, &[0x00][..]),
            (127, &[0x7F]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xFF, 0x7F]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xFF, 0xFF, 0x7F]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (268_435_455, &[0xFF, 0xFF, 0xFF, 0x7F]),
        ] {
            let mut out = BytesMut::new();
            put_varint(&mut out, value);
            assert_eq!(&out[..], bytes, "encoding {value}");
            assert_eq!(varint_len(value), bytes.len());
            assert_eq!(read_varint(bytes), Ok(Some((value as u32, bytes.len()))));
        }
    }

    #[test]
    fn varint_with_a_fifth_byte_is_rejected_before_it_arrives() {
        assert_eq!(
            read_varint(&[0xFF, 0xFF, 0xFF, 0xFF]),
            Err(DecodeError::VarIntTooLong)
        );
        assert_eq!(read_varint(&[0xFF, 0xFF, 0xFF]), Ok(None));
    }

    #[test]
    fn non_minimal_varint_is_accepted() {
        // 5.0 [MQTT-1.5.5-1] binds the sender; we accept a padded encoding as long as it
        // stays within four bytes.
        assert_eq!(read_varint(&[0x80, 0x00]), Ok(Some((0, 2))));
    }
}
