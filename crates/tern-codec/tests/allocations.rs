//! The hot path allocates nothing of its own: decoding a PUBLISH hands out `Bytes` slices of
//! the read buffer, and encoding into a buffer with room writes in place. Counted with an
//! instrumented global allocator; this file holds a single test so no other test's
//! allocations are counted (nextest also runs each test in its own process).

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

use std::alloc::System;
use std::num::NonZeroU16;

use bytes::BytesMut;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tern_codec::{MAX_PACKET_SIZE, Packet, Protocol, Publish, QosPid, TopicName, decode, encode};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const N: usize = 1000;

#[test]
fn publish_decode_and_encode_allocate_nothing_per_message() {
    // The counter itself works: one Vec is one allocation.
    let region = Region::new(GLOBAL);
    let probe: Vec<u8> = std::hint::black_box(Vec::with_capacity(8));
    assert_eq!(region.change().allocations, 1);
    drop(probe);

    for v in [Protocol::V3_1_1, Protocol::V5] {
        let mut p = Publish::new(
            TopicName::new("sensors/kitchen/temperature").unwrap(),
            QosPid::AtLeastOnce(NonZeroU16::new(7).unwrap()),
            vec![0xAB; 64],
        );
        if v.is_v5() {
            p.properties.message_expiry_interval = Some(60);
            p.properties.content_type = Some("application/cbor".into());
        }
        let packet = Packet::Publish(p);
        let mut wire = BytesMut::with_capacity(N * 128);

        let region = Region::new(GLOBAL);
        for _ in 0..N {
            encode(&packet, v, &mut wire).unwrap();
        }
        let encoding = region.change();
        assert_eq!(
            encoding.allocations, 0,
            "{v}: encode allocated {encoding:?}"
        );

        let region = Region::new(GLOBAL);
        let mut decoded = 0;
        while let Some(p) = decode(&mut wire, v, MAX_PACKET_SIZE).unwrap() {
            assert!(matches!(p, Packet::Publish(_)));
            decoded += 1;
        }
        let decoding = region.change();
        assert_eq!(decoded, N);
        // The first split turns the read buffer into a shared one: one allocation for the
        // whole buffer, none per message.
        assert!(
            decoding.allocations <= 1,
            "{v}: decoding {N} messages allocated {decoding:?}"
        );
    }
}
