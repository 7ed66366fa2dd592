//! The hot path allocates nothing of its own: decoding a PUBLISH hands out `Bytes` slices of
//! the read buffer, and encoding into a buffer with room writes in place. Counted with an
//! instrumented global allocator over 1,000 messages. The counter is process-wide, and the
//! test harness's own threads may allocate a few times meanwhile, so each count allows a
//! small constant `NOISE`: an allocation per message would show up as 1,000 or more.

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
/// Allocations the test harness's other threads may make during a measured region.
const NOISE: usize = 8;

#[test]
fn publish_decode_and_encode_allocate_nothing_per_message_beyond_a_property_list() {
    // The counter itself works: one Vec is one allocation.
    let region = Region::new(GLOBAL);
    let probe: Vec<u8> = std::hint::black_box(Vec::with_capacity(8));
    let counted = region.change().allocations;
    assert!(
        (1..=1 + NOISE).contains(&counted),
        "probe counted {counted}"
    );
    drop(probe);

    // (version, with 5.0 properties, allocations per decoded message)
    for (v, with_properties, per_message) in [
        (Protocol::V3_1_1, false, 0),
        (Protocol::V5, false, 0),
        // The property list is the one allocation: it lives behind a pointer so packets
        // without properties stay small.
        (Protocol::V5, true, 1),
    ] {
        let mut p = Publish::new(
            TopicName::new("sensors/kitchen/temperature").unwrap(),
            QosPid::AtLeastOnce(NonZeroU16::new(7).unwrap()),
            vec![0xAB; 64],
        );
        if with_properties {
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
        assert!(
            encoding.allocations <= NOISE,
            "{v}: encoding {N} messages allocated {encoding:?}"
        );

        let region = Region::new(GLOBAL);
        let mut decoded = Vec::with_capacity(N);
        let setup = region.change().allocations;
        while let Some(p) = decode(&mut wire, v, MAX_PACKET_SIZE).unwrap() {
            decoded.push(p);
        }
        let decoding = region.change().allocations - setup;
        assert_eq!(decoded.len(), N);
        assert!(decoded.iter().all(|d| *d == packet));
        // Plus one for the whole read buffer (the first split makes it shared) and noise.
        let allowed = N * per_message + 1 + NOISE;
        assert!(
            decoding <= allowed && decoding >= N * per_message,
            "{v} (properties: {with_properties}): {N} messages made {decoding} allocations"
        );
    }
}
