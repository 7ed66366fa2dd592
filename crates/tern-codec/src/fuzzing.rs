//! Bodies of the cargo-fuzz targets, here so that the ordinary test suite replays the
//! fuzz corpus through exactly the code the fuzzer runs.

use bytes::BytesMut;

use crate::{DecodeError, MAX_PACKET_SIZE, Packet, Protocol, check, decode, decode_body, encode};

const VERSIONS: [Protocol; 3] = [Protocol::V3_1, Protocol::V3_1_1, Protocol::V5];

/// The general decoding path alone, bypassing `decode`'s PUBLISH fast path.
fn decode_general(frame: &[u8], v: Protocol) -> Result<Packet, DecodeError> {
    let header = 1 + frame[1..].iter().take_while(|b| *b & 0x80 != 0).count() + 1;
    decode_body(frame[0], bytes::Bytes::copy_from_slice(&frame[header..]), v)
}

/// Decodes arbitrary bytes as a stream of packets in every version: it must never panic,
/// `check` must agree with what `decode` consumes, and `decode` (with its PUBLISH fast
/// path) must agree with the general path on every whole packet.
pub fn decode_stream(data: &[u8]) {
    for v in VERSIONS {
        let mut buf = BytesMut::from(data);
        loop {
            let before = buf.len();
            let claimed = check(&buf, MAX_PACKET_SIZE);
            let general = match claimed {
                Ok(Some(len)) => Some(decode_general(&buf[..len], v)),
                _ => None,
            };
            let result = decode(&mut buf, v, MAX_PACKET_SIZE);
            match (&result, &general) {
                (Ok(Some(fast)), Some(Ok(slow))) => assert_eq!(fast, slow, "{v}"),
                (Err(_), Some(Err(_))) | (_, None) => {}
                (fast, slow) => panic!("{v}: decode gave {fast:?}, the general path {slow:?}"),
            }
            match result {
                Ok(Some(_)) => assert_eq!(claimed, Ok(Some(before - buf.len()))),
                Ok(None) => {
                    assert_eq!(claimed, Ok(None));
                    break;
                }
                Err(_) => break,
            }
        }
    }
}

/// Whatever decodes must encode to bytes that decode to the same packet, and re-encode to
/// the same bytes.
pub fn round_trip(data: &[u8]) {
    for v in VERSIONS {
        let mut buf = BytesMut::from(data);
        let Ok(Some(packet)) = decode(&mut buf, v, MAX_PACKET_SIZE) else {
            continue;
        };
        let mut out = BytesMut::new();
        encode(&packet, v, &mut out).expect("a decoded packet must encode");
        let bytes = out.clone();
        let again: Packet = decode(&mut out, v, MAX_PACKET_SIZE)
            .expect("re-encoded packet must decode")
            .expect("re-encoded packet must be whole");
        assert_eq!(packet, again, "{v}");
        assert!(out.is_empty());
        let mut second = BytesMut::new();
        encode(&again, v, &mut second).expect("encodes twice");
        assert_eq!(bytes, second, "{v}");
    }
}
