//! Helpers shared by the codec's integration tests.
#![allow(dead_code, unreachable_pub)]

use bytes::BytesMut;
use tern_codec::{
    DecodeError, MAX_PACKET_SIZE, Packet, PacketId, Protocol, Str, TopicFilter, TopicName, decode,
    encode,
};

/// Bytes from a hex string with optional spaces; `'c'` style ASCII is not supported, so
/// vectors spell every byte.
pub fn hex(s: &str) -> Vec<u8> {
    let digits: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    assert!(digits.len().is_multiple_of(2), "odd hex: {s}");
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
        .collect()
}

/// A frame with a correct one-byte remaining length around `body`.
pub fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128);
    let mut v = vec![first, body.len() as u8];
    v.extend_from_slice(body);
    v
}

/// Decodes exactly one whole packet from `bytes`.
pub fn dec(v: Protocol, bytes: &[u8]) -> Result<Packet, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let packet = decode(&mut buf, v, MAX_PACKET_SIZE)?.expect("whole packet");
    assert!(buf.is_empty(), "decode left {} bytes", buf.len());
    Ok(packet)
}

pub fn enc(v: Protocol, packet: &Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(packet, v, &mut out).unwrap();
    out.to_vec()
}

/// `bytes` decode to `packet` and `packet` encodes to `bytes`.
pub fn vector(v: Protocol, bytes: &str, packet: Packet) {
    let bytes = hex(bytes);
    assert_eq!(
        dec(v, &bytes).as_ref(),
        Ok(&packet),
        "decoding {bytes:02x?}"
    );
    assert_eq!(enc(v, &packet), bytes, "encoding {packet:?}");
    assert_eq!(tern_codec::encoded_len(&packet, v), Ok(bytes.len()));
}

pub fn pid(n: u16) -> PacketId {
    PacketId::new(n).unwrap()
}

pub fn topic(s: &str) -> TopicName {
    TopicName::new(s).unwrap()
}

pub fn filter(s: &str) -> TopicFilter {
    TopicFilter::new(s).unwrap()
}

pub fn s(v: &str) -> Str {
    Str::from(v)
}

/// A string field: two-byte length then the bytes, as hex.
pub fn hs(v: &str) -> String {
    let mut out = format!("{:04x}", v.len());
    for b in v.bytes() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}
