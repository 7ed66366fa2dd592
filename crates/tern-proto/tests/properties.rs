//! Random operation sequences over the simulated link: publish at random QoS in both
//! directions, deliver some packets, duplicate the next one, cut the connection, reconnect
//! with or without the session, acknowledge later, advance time. Then reconnect resuming
//! the session and drive to quiet. Invariants:
//!
//! - QoS 0 at most once; QoS 2 at most once, always;
//! - QoS 1 at least once and QoS 2 exactly once for every message published since the last
//!   clean start (while the session persists);
//! - per-sender order of first deliveries equals publish order for QoS 1/2;
//! - after every step: inflight never above the peer's Receive Maximum, no new PUBLISH
//!   reuses a packet id whose flow is still open, no protocol error on either side.
//!
//! The gate runs `PROPTEST_CASES` (default 2,000) cases per property; the long run sets it
//! higher: `PROPTEST_CASES=200000 cargo test --release -p tern-proto --test properties`.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use proptest::prelude::*;
use tern_codec::{Protocol, QoS};

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<bool>(), 0u8..3).prop_map(|(from_client, q)| Op::Publish {
            from_client,
            qos: QoS::from_bits(q).unwrap()
        }),
        6 => (any::<bool>(), 1u8..6).prop_map(|(to_server, n)| Op::Deliver { to_server, n }),
        1 => any::<bool>().prop_map(|to_server| Op::Duplicate { to_server }),
        1 => Just(Op::Cut),
        1 => prop_oneof![4 => Just(true), 1 => Just(false)].prop_map(|resume| Op::Reconnect { resume }),
        2 => Just(Op::AckPending),
        1 => (0u8..40).prop_map(|secs| Op::Advance { secs }),
    ]
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn qos_guarantees_hold_over_random_operations_v5(ops in proptest::collection::vec(op(), 1..60)) {
        check_ops(Protocol::V5, false, &ops).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn qos_guarantees_hold_over_random_operations_v311(ops in proptest::collection::vec(op(), 1..60)) {
        check_ops(Protocol::V3_1_1, false, &ops).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn qos_guarantees_hold_with_acknowledge_later(ops in proptest::collection::vec(op(), 1..60)) {
        check_ops(Protocol::V5, true, &ops).map_err(TestCaseError::fail)?;
    }
}
