//! The sans-IO broker core driven directly, with simulated time: offline-queue limits, the
//! 5.0 Will Delay Interval, and restarts on the same store. On the simulated host
//! (`tern_broker_core::sim`), whose store is written as the server writes it.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

use std::num::NonZeroU16;
use std::time::Duration;

use tern_broker_core::sim::Sim;
use tern_broker_core::{Admission, ConnId, DropReason, Output, QueuePolicy, Settings};

/// Messages dropped because a session queue was full (or refused for it).
fn dropped(sim: &Sim) -> u64 {
    let c = sim.broker.counters();
    c.dropped(DropReason::QueueFull) + c.dropped(DropReason::Quota)
}

/// A QoS 1 subscriber acknowledging everything it is sent, batch after batch (its window
/// lets the next out), until nothing more comes.
fn ack_all(sim: &mut Sim, conn: ConnId) {
    ack_all_watching(sim, conn, |_| {});
}

/// [`ack_all`], calling `watch` before each round of acknowledgements.
fn ack_all_watching(sim: &mut Sim, conn: ConnId, mut watch: impl FnMut(&Sim)) {
    let mut acked = 0;
    loop {
        watch(sim);
        let sent = sim.publishes(conn);
        if acked == sent.len() {
            return;
        }
        for p in &sent[acked..] {
            if let Some(id) = p.packet_id() {
                sim.send(conn, Packet::PubAck(tern_codec::Ack::new(id)));
            }
        }
        acked = sent.len();
    }
}

/// Sessions, online and offline.
fn sessions(sim: &Sim) -> usize {
    let g = sim.broker.gauges(sim.now, 0);
    g.online + g.offline
}
use tern_codec::properties::{ConnectProperties, WillProperties};
use tern_codec::{
    Connect, Disconnect, LastWill, Packet, Protocol, Publish, QoS, QosPid, ReasonCode, Str,
    TopicName,
};

fn persistent(id: &str) -> Connect {
    let mut c = Connect::new(Protocol::V3_1_1, id);
    c.clean_start = false;
    c
}

fn queue_case(policy: QueuePolicy, max_messages: usize, max_bytes: usize) -> (Vec<String>, u64) {
    let mut sim = Sim::new(Settings {
        max_queued_messages: max_messages,
        max_queued_bytes: max_bytes,
        queue_policy: policy,
        ..Settings::default()
    });
    sim.offline_subscriber(persistent("a"), "t", QoS::AtLeastOnce);
    let b = sim.connect(Connect::new(Protocol::V3_1_1, "b"));
    for i in 0..5 {
        sim.publish(b, "t", &format!("m{i}"), i + 1);
    }
    let a2 = sim.connect(persistent("a"));
    (sim.received(a2), dropped(&sim))
}

#[test]
fn a_full_offline_queue_drops_the_oldest_under_drop_oldest() {
    assert_eq!(
        queue_case(QueuePolicy::DropOldest, 3, 1 << 20),
        (vec!["m2".into(), "m3".into(), "m4".into()], 2)
    );
}

#[test]
fn a_full_offline_queue_drops_the_newest_under_drop_newest() {
    assert_eq!(
        queue_case(QueuePolicy::DropNewest, 3, 1 << 20),
        (vec!["m0".into(), "m1".into(), "m2".into()], 2)
    );
}

#[test]
fn the_byte_limit_bounds_an_offline_queue_too() {
    // Two-byte payloads, five bytes allowed: two fit.
    assert_eq!(
        queue_case(QueuePolicy::DropOldest, 100, 5),
        (vec!["m3".into(), "m4".into()], 3)
    );
}

/// An online 3.1.1 subscriber with a window of 2 that acknowledges nothing until seven
/// messages were published, then everything: what it received, and the count dropped.
/// Both limits apply online as offline: `max_messages`, and `max_bytes` of the 2-byte
/// payloads.
fn online_queue_case(
    policy: QueuePolicy,
    max_messages: usize,
    max_bytes: usize,
) -> (Vec<String>, u64) {
    let mut sim = Sim::new(Settings {
        max_queued_messages: max_messages,
        max_queued_bytes: max_bytes,
        window_3x: 2,
        queue_policy: policy,
        ..Settings::default()
    });
    let a = sim.connect(Connect::new(Protocol::V3_1_1, "slow"));
    sim.subscribe(a, "t", QoS::AtLeastOnce);
    let b = sim.connect(Connect::new(Protocol::V5, "b"));
    for i in 0..7 {
        sim.publish(b, "t", &format!("m{i}"), i + 1);
    }
    assert_eq!(
        sim.received(a),
        ["m0", "m1"],
        "two in flight, the rest wait"
    );
    ack_all(&mut sim, a);
    (sim.received(a), dropped(&sim))
}

#[test]
fn an_online_subscriber_behind_a_full_window_queues_at_most_the_limit_dropping_the_oldest() {
    // 6 bytes: three of the five waiting fit.
    let (received, dropped) = online_queue_case(QueuePolicy::DropOldest, 100, 6);
    assert_eq!(received, ["m0", "m1", "m4", "m5", "m6"]);
    assert_eq!(dropped, 2);
}

#[test]
fn an_online_subscriber_behind_a_full_window_queues_at_most_the_message_limit_too() {
    // Two messages, however small: an online subscriber that stops acknowledging cannot
    // grow the broker by empty payloads either.
    let (received, dropped) = online_queue_case(QueuePolicy::DropOldest, 2, usize::MAX);
    assert_eq!(received, ["m0", "m1", "m5", "m6"]);
    assert_eq!(dropped, 3);
}

#[test]
fn an_online_subscriber_behind_a_full_window_queues_at_most_the_limit_dropping_the_newest() {
    let (received, dropped) = online_queue_case(QueuePolicy::DropNewest, 100, 6);
    assert_eq!(received, ["m0", "m1", "m2", "m3", "m4"]);
    assert_eq!(dropped, 2);
}

#[test]
fn a_shared_group_passes_over_a_member_whose_window_is_full() {
    let mut sim = Sim::new(Settings {
        max_queued_bytes: 6,
        window_3x: 2,
        ..Settings::default()
    });
    let slow = sim.connect(Connect::new(Protocol::V3_1_1, "slow"));
    sim.subscribe(slow, "$share/g/t", QoS::AtLeastOnce);
    let fast = sim.connect(Connect::new(Protocol::V3_1_1, "fast"));
    sim.subscribe(fast, "$share/g/t", QoS::AtLeastOnce);
    let b = sim.connect(Connect::new(Protocol::V5, "b"));
    // "fast" acknowledges each message as it comes; "slow" never does.
    let mut acked = 0;
    for i in 0..12 {
        sim.publish(b, "t", &format!("m{i}"), i + 1);
        while let Some(id) = sim
            .publishes(fast)
            .get(acked)
            .map(|p| p.packet_id().unwrap())
        {
            sim.send(fast, Packet::PubAck(tern_codec::Ack::new(id)));
            acked += 1;
        }
    }
    let (to_slow, to_fast) = (sim.received(slow), sim.received(fast));
    assert_eq!(to_slow.len(), 2, "only what its window holds: {to_slow:?}");
    assert_eq!(
        to_slow.len() + to_fast.len(),
        12,
        "every message to one member"
    );
    assert_eq!(dropped(&sim), 0, "nothing dropped");
}

#[test]
fn a_full_online_queue_refuses_the_publish_with_0x97_under_reject() {
    let mut sim = Sim::new(Settings {
        max_queued_bytes: 2,
        window_3x: 1,
        queue_policy: QueuePolicy::Reject,
        ..Settings::default()
    });
    let a = sim.connect(Connect::new(Protocol::V3_1_1, "slow"));
    sim.subscribe(a, "t", QoS::AtLeastOnce);
    let b = sim.connect(Connect::new(Protocol::V5, "b"));
    for i in 0..3 {
        sim.publish(b, "t", &format!("m{i}"), i + 1);
    }
    use tern_codec::ReasonCode::{QuotaExceeded, Success};
    // m0 in flight, m1 waits, m2 would exceed the queue.
    assert_eq!(puback_reasons(&sim, b), [Success, Success, QuotaExceeded]);
    for _ in 0..2 {
        let last = sim.publishes(a).last().unwrap().packet_id().unwrap();
        sim.send(a, Packet::PubAck(tern_codec::Ack::new(last)));
    }
    assert_eq!(sim.received(a), ["m0", "m1"]);
    assert_eq!(dropped(&sim), 1);
}

fn will_client(delay: u32, session_expiry: u32) -> Connect {
    let mut c = Connect::new(Protocol::V5, "w");
    c.clean_start = false;
    c.properties = ConnectProperties {
        session_expiry_interval: Some(session_expiry),
        ..Default::default()
    }
    .into();
    c.will = Some(LastWill {
        topic: TopicName::new("wills/w").unwrap(),
        payload: "gone".into(),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: WillProperties {
            will_delay_interval: Some(delay),
            ..Default::default()
        }
        .into(),
    });
    c
}

fn watcher(sim: &mut Sim) -> ConnId {
    let w = sim.connect(Connect::new(Protocol::V3_1_1, "watcher"));
    sim.subscribe(w, "wills/#", QoS::AtMostOnce);
    w
}

const S: Duration = Duration::from_secs(1);

#[test]
fn a_delayed_will_is_published_when_the_delay_passes() {
    let mut sim = Sim::new(Settings::default());
    let watch = watcher(&mut sim);
    let c = sim.connect(will_client(5, 60));
    sim.close(c);
    sim.advance(4 * S);
    assert!(sim.received(watch).is_empty(), "not before the delay");
    sim.advance(2 * S);
    assert_eq!(sim.received(watch), ["gone"]);
}

#[test]
fn reconnecting_within_the_will_delay_cancels_the_will() {
    let mut sim = Sim::new(Settings::default());
    let watch = watcher(&mut sim);
    let c = sim.connect(will_client(5, 60));
    sim.close(c);
    sim.advance(3 * S);
    let mut back = will_client(5, 60);
    back.will = None;
    sim.connect(back);
    sim.advance(10 * S);
    assert!(sim.received(watch).is_empty());
}

#[test]
fn a_delayed_will_is_published_when_the_session_ends_first() {
    let mut sim = Sim::new(Settings::default());
    let watch = watcher(&mut sim);
    let c = sim.connect(will_client(30, 2));
    sim.close(c);
    sim.advance(S);
    assert!(sim.received(watch).is_empty());
    sim.advance(2 * S);
    assert_eq!(
        sim.received(watch),
        ["gone"],
        "at session end, before the 30 s delay"
    );
    assert_eq!(sessions(&sim), 1, "only the watcher's session is left");
}

fn v5_persistent(id: &str, expiry: u32) -> Connect {
    let mut c = Connect::new(Protocol::V5, id);
    c.clean_start = false;
    c.properties = ConnectProperties {
        session_expiry_interval: Some(expiry),
        ..Default::default()
    }
    .into();
    c
}

fn connack_session_present(sim: &Sim, conn: ConnId) -> bool {
    sim.outputs
        .iter()
        .find_map(|o| match o {
            Output::Send(c, Packet::ConnAck(a)) if *c == conn => Some(a.session_present),
            _ => None,
        })
        .unwrap()
}

#[test]
fn a_broker_restarted_on_the_same_store_resumes_sessions_queues_and_retained_messages() {
    let mut sim = Sim::new(Settings::default());
    sim.offline_subscriber(v5_persistent("a", 3600), "t/#", QoS::AtLeastOnce);
    let b = sim.connect(Connect::new(Protocol::V3_1_1, "b"));
    sim.publish(b, "t/1", "queued", 1);
    let mut retained = Publish::new(
        TopicName::new("r").unwrap(),
        QosPid::AtLeastOnce(NonZeroU16::new(2).unwrap()),
        "kept",
    );
    retained.retain = true;
    sim.send(b, Packet::Publish(retained));

    sim.restart(Duration::from_secs(60));

    let a = sim.connect(v5_persistent("a", 3600));
    assert!(connack_session_present(&sim, a));
    assert_eq!(sim.received(a), ["queued"], "the offline queue survived");
    let b = sim.connect(Connect::new(Protocol::V3_1_1, "b"));
    sim.publish(b, "t/2", "after", 1);
    assert_eq!(
        sim.received(a),
        ["queued", "after"],
        "the subscription survived"
    );
    let c = sim.connect(Connect::new(Protocol::V3_1_1, "c"));
    sim.subscribe(c, "r", QoS::AtLeastOnce);
    assert_eq!(sim.received(c), ["kept"], "the retained message survived");
}

#[test]
fn an_unacknowledged_qos1_message_is_resent_with_dup_after_a_restart() {
    let mut sim = Sim::new(Settings::default());
    let a = sim.connect(v5_persistent("a", 3600));
    sim.subscribe(a, "t", QoS::AtLeastOnce);
    let b = sim.connect(Connect::new(Protocol::V3_1_1, "b"));
    sim.publish(b, "t", "m", 1);
    let first = sim.publishes(a)[0].clone();
    assert!(!first.dup);
    sim.close(a); // never acknowledged

    sim.restart(Duration::from_secs(1));

    let a = sim.connect(v5_persistent("a", 3600));
    let again = sim.publishes(a)[0].clone();
    assert!(again.dup);
    assert_eq!(again.qos_pid, first.qos_pid, "same packet id");
    assert_eq!(again.payload, first.payload);
}

#[test]
fn session_expiry_and_will_delay_count_in_wall_clock_time_across_a_restart() {
    let mut sim = Sim::new(Settings::default());
    let c = sim.connect(will_client(30, 60));
    sim.close(c);
    // Down for 20 s: 10 s of the will delay and 40 s of the session are left.
    sim.restart(Duration::from_secs(20));
    let watch = watcher(&mut sim);
    sim.advance(9 * S);
    assert!(sim.received(watch).is_empty(), "not before the delay");
    sim.advance(2 * S);
    assert_eq!(sim.received(watch), ["gone"]);
    assert_eq!(sessions(&sim), 2);
    sim.advance(30 * S);
    assert_eq!(sessions(&sim), 1, "the session expired");
    assert!(sim.stored().sessions.is_empty(), "and left the store");
}

#[test]
fn a_session_that_ends_with_its_connection_is_never_written_to_the_store() {
    let mut sim = Sim::new(Settings::default());
    let clean = sim.connect(Connect::new(Protocol::V3_1_1, "clean"));
    sim.subscribe(clean, "t", QoS::AtLeastOnce);
    sim.publish(clean, "t", "m", 1);
    assert!(sim.stored().sessions.is_empty());
    sim.close(clean);
    let kept = sim.connect(persistent("kept"));
    sim.subscribe(kept, "t", QoS::AtLeastOnce);
    assert_eq!(
        sim.stored().sessions.keys().collect::<Vec<_>>(),
        ["kept"],
        "a persistent session is written"
    );
    assert_eq!(sim.stored().sessions["kept"].record.subscriptions.len(), 1);
}

#[test]
fn a_restarted_broker_state_equals_the_state_it_stored() {
    // Whatever the broker holds offline, the store holds too: a restart followed by
    // another restart (with nothing in between) changes nothing stored.
    let mut sim = Sim::new(Settings {
        max_queued_messages: 3,
        queue_policy: QueuePolicy::DropOldest,
        ..Settings::default()
    });
    sim.offline_subscriber(v5_persistent("a", 3600), "t/+", QoS::ExactlyOnce);
    let b = sim.connect(Connect::new(Protocol::V3_1_1, "b"));
    for i in 0..5 {
        sim.publish(b, &format!("t/{i}"), &format!("m{i}"), i + 1);
    }
    let before = sim.stored();
    assert_eq!(before.sessions["a"].delivery.queued_len(), 3);
    sim.restart(Duration::ZERO);
    sim.restart(Duration::ZERO);
    assert_eq!(sim.stored(), before);
    let a = sim.connect(v5_persistent("a", 3600));
    assert_eq!(sim.received(a), ["m2", "m3", "m4"]);
}

fn qos0_case(queue_qos0: bool) -> Vec<String> {
    let mut sim = Sim::new(Settings {
        queue_qos0,
        ..Settings::default()
    });
    sim.offline_subscriber(persistent("a"), "t", QoS::ExactlyOnce);
    let b = sim.connect(Connect::new(Protocol::V3_1_1, "b"));
    sim.publish(b, "t", "one", 1);
    sim.send(
        b,
        Packet::Publish(Publish::new(
            TopicName::new("t").unwrap(),
            QosPid::AtMostOnce,
            "zero",
        )),
    );
    sim.publish(b, "t", "two", 2);
    let a = sim.connect(persistent("a"));
    sim.received(a)
}

#[test]
fn qos0_is_not_queued_for_an_offline_session_by_default() {
    assert_eq!(qos0_case(false), ["one", "two"]);
}

#[test]
fn qos0_is_queued_in_order_for_an_offline_session_when_configured() {
    assert_eq!(qos0_case(true), ["one", "zero", "two"]);
}

fn expiring(topic: &str, payload: &str, id: u16, expiry: u32, retain: bool) -> Packet {
    let mut p = Publish::new(
        TopicName::new(topic).unwrap(),
        QosPid::AtLeastOnce(NonZeroU16::new(id).unwrap()),
        payload.to_string(),
    );
    p.retain = retain;
    p.properties.message_expiry_interval = Some(expiry);
    Packet::Publish(p)
}

/// With the queue in memory (no memory window): expired messages make room first. (With a
/// window, an offline queue is in the store and its expired messages are found when it is
/// read back: next test.)
#[test]
fn expired_messages_make_room_in_a_full_offline_queue_before_live_ones_are_dropped() {
    let mut sim = Sim::new(Settings {
        max_queued_messages: 2,
        queue_window: None,
        ..Settings::default()
    });
    sim.offline_subscriber(v5_persistent("a", 3600), "t", QoS::AtLeastOnce);
    let b = sim.connect(Connect::new(Protocol::V5, "b"));
    sim.send(b, expiring("t", "short", 1, 1, false));
    sim.publish(b, "t", "live", 2);
    sim.advance(2 * S);
    sim.publish(b, "t", "new", 3);
    assert_eq!(dropped(&sim), 0, "no live message dropped");
    assert_eq!(sim.broker.counters().dropped(DropReason::Expired), 1);
    assert_eq!(sim.stored().sessions["a"].delivery.queued_len(), 2);
    let a = sim.connect(v5_persistent("a", 3600));
    assert_eq!(sim.received(a), ["live", "new"]);
}

/// A queue kept in the store: a message that expired there is dropped when it is read
/// back, never sent.
#[test]
fn a_message_that_expired_in_the_store_is_dropped_when_read_back() {
    let mut sim = Sim::new(Settings {
        queue_window: Some(2),
        ..Settings::default()
    });
    sim.offline_subscriber(v5_persistent("a", 3600), "t", QoS::AtLeastOnce);
    let b = sim.connect(Connect::new(Protocol::V5, "b"));
    sim.publish(b, "t", "first", 1);
    sim.send(b, expiring("t", "short", 2, 1, false));
    sim.publish(b, "t", "live", 3);
    assert_eq!(sim.broker.session_state("a").unwrap().spilled_len(), 3);
    sim.advance(2 * S);
    let a = sim.connect(v5_persistent("a", 3600));
    ack_all(&mut sim, a);
    assert_eq!(sim.received(a), ["first", "live"]);
    assert_eq!(sim.broker.counters().dropped(DropReason::Expired), 1);
    assert_eq!(sim.stored().sessions["a"].delivery.queued_len(), 0);
}

#[test]
fn an_expired_retained_message_is_deleted_not_sent() {
    let mut sim = Sim::new(Settings::default());
    let b = sim.connect(Connect::new(Protocol::V5, "b"));
    sim.send(b, expiring("r/short", "old", 1, 1, true));
    sim.send(b, expiring("r/long", "fresh", 2, 100, true));
    sim.advance(2 * S);
    let c = sim.connect(Connect::new(Protocol::V5, "c"));
    sim.subscribe(c, "r/#", QoS::AtLeastOnce);
    assert_eq!(sim.received(c), ["fresh"]);
    assert_eq!(sim.broker.gauges(sim.now, 0).retained, 1);
    assert_eq!(sim.stored().retained.len(), 1);
}

// ---- crashes: the broker process dies without closing anything ----------------------

fn publish_qos(sim: &mut Sim, conn: ConnId, topic: &str, payload: &str, qos: QosPid) {
    let p = Publish::new(TopicName::new(topic).unwrap(), qos, payload.to_string());
    sim.send(conn, Packet::Publish(p));
}

fn pid(n: u16) -> tern_codec::PacketId {
    NonZeroU16::new(n).unwrap()
}

#[test]
fn messages_in_flight_to_an_online_subscriber_are_resent_after_a_crash() {
    let mut sim = Sim::new(Settings::default());
    let a = sim.connect(v5_persistent("a", 3600));
    sim.subscribe(a, "t", QoS::ExactlyOnce);
    let b = sim.connect(Connect::new(Protocol::V3_1_1, "b"));
    publish_qos(&mut sim, b, "t", "one", QosPid::AtLeastOnce(pid(1)));
    publish_qos(&mut sim, b, "t", "two", QosPid::ExactlyOnce(pid(2)));
    let sent = sim.publishes(a);
    assert_eq!(sent.len(), 2);
    // The subscriber received the QoS 2 message: PUBREC, and the broker sends PUBREL.
    let two = sent[1].packet_id().unwrap();
    sim.send(a, Packet::PubRec(tern_codec::Ack::new(two)));

    sim.restart(Duration::from_secs(1)); // no close, no shutdown: kill -9

    let a = sim.connect(v5_persistent("a", 3600));
    assert!(connack_session_present(&sim, a));
    let again = sim.publishes(a);
    assert_eq!(
        again.len(),
        1,
        "only the unacknowledged QoS 1 PUBLISH is resent"
    );
    assert!(again[0].dup);
    assert_eq!(again[0].qos_pid, sent[0].qos_pid, "with its packet id");
    let pubrels: Vec<_> = sim
        .outputs
        .iter()
        .filter(
            |o| matches!(o, Output::Send(c, Packet::PubRel(r)) if *c == a && r.packet_id == two),
        )
        .collect();
    assert_eq!(pubrels.len(), 1, "the QoS 2 flow resumes at PUBREL");
}

#[test]
fn an_inbound_qos2_id_survives_a_crash_so_a_resent_publish_is_not_routed_twice() {
    let mut sim = Sim::new(Settings::default());
    let a = sim.connect(v5_persistent("a", 3600));
    sim.subscribe(a, "t", QoS::ExactlyOnce);
    let p = sim.connect(v5_persistent("p", 3600));
    publish_qos(&mut sim, p, "t", "pay", QosPid::ExactlyOnce(pid(9)));
    assert_eq!(sim.received(a), ["pay"]);

    sim.restart(Duration::from_secs(1));

    let a = sim.connect(v5_persistent("a", 3600));
    let p = sim.connect(v5_persistent("p", 3600));
    // The publisher never saw the PUBREC and resends.
    let mut resend = Publish::new(
        TopicName::new("t").unwrap(),
        QosPid::ExactlyOnce(pid(9)),
        "pay",
    );
    resend.dup = true;
    sim.send(p, Packet::Publish(resend));
    assert!(
        sim.outputs.iter().any(
            |o| matches!(o, Output::Send(c, Packet::PubRec(r)) if *c == p && r.packet_id == pid(9))
        ),
        "answered with PUBREC"
    );
    let payloads = sim.received(a);
    assert_eq!(
        payloads,
        ["pay"],
        "only the first delivery's resend reaches the subscriber"
    );
    assert!(
        sim.publishes(a)[0].dup,
        "and that one is the resend, DUP set"
    );
}

proptest::proptest! {
    // 96 cases in the gate; PROPTEST_CASES=100000 for a long run.
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(96)
    ))]
    /// Random runs of three persistent clients on the simulated host (connects, closes,
    /// publishes at every QoS, acknowledgements, silences past the keep alive, crashes,
    /// failed commits), the same runs the `broker_ops` fuzz target makes: after every
    /// step the store holds exactly the live delivery state of every session, no QoS 2
    /// message is delivered twice, and at the end every acknowledged QoS 1/2 message has
    /// reached every client subscribed when it was published.
    #[test]
    fn random_runs_keep_the_store_in_step_and_every_guarantee(
        bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 2..120)
    ) {
        let steps = tern_broker_core::sim::steps_from_bytes(&bytes);
        if let Err(e) = tern_broker_core::sim::check_steps(&steps) {
            proptest::prop_assert!(false, "{}\nsteps: {:?}", e, steps);
        }
    }
}

// ---- offline queue: reject policy and age limit -----------------------------------

fn puback_reasons(sim: &Sim, conn: ConnId) -> Vec<tern_codec::ReasonCode> {
    sim.outputs
        .iter()
        .filter_map(|o| match o {
            Output::Send(c, Packet::PubAck(a)) if *c == conn => Some(a.reason),
            _ => None,
        })
        .collect()
}

#[test]
fn a_full_offline_queue_refuses_the_publish_with_0x97_under_reject() {
    let mut sim = Sim::new(Settings {
        max_queued_messages: 2,
        queue_policy: QueuePolicy::Reject,
        ..Settings::default()
    });
    sim.offline_subscriber(persistent("a"), "t", QoS::AtLeastOnce);
    let other = sim.connect(Connect::new(Protocol::V3_1_1, "online"));
    sim.subscribe(other, "t", QoS::AtLeastOnce);
    let b = sim.connect(Connect::new(Protocol::V5, "b"));
    for i in 0..3 {
        sim.publish(b, "t", &format!("m{i}"), i + 1);
    }
    use tern_codec::ReasonCode::{QuotaExceeded, Success};
    assert_eq!(puback_reasons(&sim, b), [Success, Success, QuotaExceeded]);
    assert_eq!(
        sim.received(other),
        ["m0", "m1"],
        "a refused message goes to nobody, so a retry cannot duplicate it"
    );
    assert_eq!(dropped(&sim), 1);
    // A 3.x publisher has no reason code to read: its connection is closed instead.
    let old = sim.connect(Connect::new(Protocol::V3_1_1, "old"));
    sim.publish(old, "t", "m3", 1);
    assert!(puback_reasons(&sim, old).is_empty());
    assert!(sim.outputs.contains(&Output::Close(old)));
    let a = sim.connect(persistent("a"));
    assert_eq!(sim.received(a), ["m0", "m1"]);
}

#[test]
fn messages_older_than_the_queue_age_limit_are_not_delivered() {
    let mut sim = Sim::new(Settings {
        max_queued_age: Some(Duration::from_secs(10)),
        ..Settings::default()
    });
    sim.offline_subscriber(persistent("a"), "t", QoS::AtLeastOnce);
    let b = sim.connect(Connect::new(Protocol::V3_1_1, "b"));
    sim.publish(b, "t", "old", 1);
    sim.advance(6 * S);
    sim.publish(b, "t", "young", 2);
    sim.advance(5 * S);
    let a = sim.connect(persistent("a"));
    assert_eq!(sim.received(a), ["young"]);
    assert_eq!(sim.broker.counters().dropped(DropReason::Expired), 1);
}

// ---- silence and withheld acknowledgements, on the simulated clock -------------------

#[test]
fn a_silent_client_is_closed_at_one_and_a_half_keep_alives_and_its_will_published() {
    let mut sim = Sim::new(Settings::default());
    let watch = watcher(&mut sim);
    let mut c = will_client(0, 0);
    c.keep_alive = 10;
    let silent = sim.connect(c);
    // The watcher keeps talking; the other says nothing. [MQTT-3.1.2-22]
    for _ in 0..14 {
        sim.advance(S);
        sim.send(watch, Packet::PingReq);
    }
    sim.advance(Duration::from_millis(999));
    assert!(
        !sim.outputs.contains(&Output::Close(silent)),
        "still open 14.999 s after its last packet"
    );
    assert!(sim.received(watch).is_empty());
    sim.advance(Duration::from_millis(1));
    assert!(
        sim.outputs.contains(&Output::Close(silent)),
        "closed at 15 s, 1.5 x the keep alive"
    );
    assert_eq!(sim.received(watch), ["gone"], "and its will published");
}

#[test]
fn a_failed_commit_withholds_the_acknowledgement_and_loses_nothing_acknowledged() {
    let mut sim = Sim::new(Settings::default());
    sim.offline_subscriber(v5_persistent("sub", 3600), "t", QoS::AtLeastOnce);
    let p = sim.connect(Connect::new(Protocol::V3_1_1, "p"));
    sim.publish(p, "t", "before", 1);
    assert_eq!(
        puback_reasons(&sim, p).len(),
        1,
        "acknowledged once written"
    );

    sim.fail_next_commit();
    sim.publish(p, "t", "during", 2);
    assert!(
        sim.outputs.is_empty(),
        "nothing that waited on the failed commit goes out (no PUBACK), and the host \
         restarted from the last commit"
    );
    assert_eq!(sim.failed_commits, 1);

    let p = sim.connect(Connect::new(Protocol::V3_1_1, "p"));
    sim.publish(p, "t", "after", 3);
    assert_eq!(puback_reasons(&sim, p).len(), 1, "acknowledged again");

    let sub = sim.connect(v5_persistent("sub", 3600));
    assert!(connack_session_present(&sim, sub));
    assert_eq!(
        sim.received(sub),
        ["before", "after"],
        "the acknowledged messages, not the one never acknowledged"
    );
}

// ---- assigned client identifiers ------------------------------------------------------

fn anonymous_v5(expiry: u32) -> Connect {
    v5_persistent("", expiry)
}

fn assigned_id(sim: &Sim, conn: ConnId) -> String {
    sim.outputs
        .iter()
        .find_map(|o| match o {
            Output::Send(c, Packet::ConnAck(a)) if *c == conn => a
                .properties
                .assigned_client_identifier
                .as_ref()
                .map(|s| s.to_string()),
            _ => None,
        })
        .expect("an Assigned Client Identifier")
}

#[test]
fn an_assigned_client_identifier_never_names_a_stored_session_after_a_restart() {
    // [MQTT-3.2.2-16]: the assigned id must be unique; the server's connection ids and
    // counters start again with the process.
    let mut sim = Sim::new(Settings::default());
    let first = sim.connect(anonymous_v5(3600));
    let first_id = assigned_id(&sim, first);
    sim.subscribe(first, "t", QoS::AtLeastOnce);
    sim.close(first);
    sim.restart(Duration::from_secs(1));
    let second = sim.connect(anonymous_v5(3600));
    let second_id = assigned_id(&sim, second);
    assert_ne!(second_id, first_id, "a new client, a new identifier");
    assert!(
        !connack_session_present(&sim, second),
        "nobody else's session"
    );
    assert_eq!(
        sessions(&sim),
        2,
        "the stored session is still there, untouched"
    );
}

#[test]
fn an_assigned_client_identifier_skips_one_a_client_chose_for_itself() {
    let mut sim = Sim::new(Settings::default());
    let probe = sim.connect(anonymous_v5(0));
    let assigned = assigned_id(&sim, probe);
    sim.close(probe);
    // A client takes, as its own, the identifier the next anonymous client would get.
    let (prefix, n) = assigned.rsplit_once('-').unwrap();
    let next = format!("{prefix}-{}", n.parse::<u64>().unwrap() + 1);
    let squatter = sim.connect(v5_persistent(&next, 3600));
    sim.subscribe(squatter, "t", QoS::AtLeastOnce);
    sim.close(squatter);
    let anonymous = sim.connect(anonymous_v5(3600));
    assert_ne!(assigned_id(&sim, anonymous), next);
    assert!(!connack_session_present(&sim, anonymous));
}

// ---- a copy that outgrows every packet ----------------------------------------------

#[test]
fn a_copy_grown_past_the_largest_packet_by_its_subscription_identifier_is_dropped_not_stored() {
    let mut sim = Sim::new(Settings::default());
    let sub = sim.connect(v5_persistent("s", 3600));
    let mut s = tern_codec::Subscribe {
        packet_id: pid(1),
        subscriptions: vec![tern_codec::Subscription {
            filter: tern_codec::TopicFilter::new("t").unwrap(),
            options: tern_codec::SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
        }],
        properties: Default::default(),
    };
    s.properties.subscription_identifier = tern_codec::SubscriptionId::new(1);
    sim.send(sub, Packet::Subscribe(s));
    sim.close(sub);
    let p = sim.connect(Connect::new(Protocol::V5, "p"));
    // The largest PUBLISH there is; the subscriber's copy adds a Subscription Identifier.
    let biggest = tern_codec::MAX_PACKET_SIZE as usize - 5 - 6;
    let publish = Publish::new(
        TopicName::new("t").unwrap(),
        QosPid::AtLeastOnce(pid(1)),
        vec![0u8; biggest],
    );
    sim.send(p, Packet::Publish(publish));
    assert_eq!(sim.broker.counters().dropped(DropReason::TooLarge), 1);
    let stored = sim.stored();
    assert_eq!(
        stored.sessions["s"].delivery.queued_len(),
        0,
        "nothing queued"
    );
    assert_eq!(
        puback_reasons(&sim, p).len(),
        1,
        "the publisher is answered"
    );
}

// ---- shared subscriptions across a crash ---------------------------------------------

/// §4.8.2: a member's unacknowledged shared-subscription messages go to another member
/// when its connection ends. A crash ends it too: after the restart they must not wait in
/// the dead member's session (a 3.x session lives ~136 years by default).
#[test]
fn a_crash_gives_a_members_unacknowledged_shared_messages_to_another_member() {
    let mut sim = Sim::new(Settings::default());
    let member = |id: &str| {
        let mut c = Connect::new(Protocol::V3_1_1, id);
        c.clean_start = false;
        c
    };
    let a = sim.connect(member("a"));
    sim.subscribe(a, "$share/g/t", QoS::AtLeastOnce);
    let b = sim.connect(member("b"));
    sim.subscribe(b, "$share/g/t", QoS::AtLeastOnce);
    sim.close(b);
    let p = sim.connect(Connect::new(Protocol::V3_1_1, "p"));
    sim.publish(p, "t", "job", 1);
    assert_eq!(
        sim.received(a),
        ["job"],
        "the online member has it, unacknowledged"
    );
    // The broker's side map says which group the copy came through, and the store keeps
    // it beside the session: that is how the restarted broker knows.
    let groups = |sim: &Sim, id: &str| -> Vec<String> {
        sim.stored().sessions[&tern_codec::Str::from(id)]
            .shared
            .values()
            .map(|k| k.to_string())
            .collect()
    };
    assert_eq!(groups(&sim, "a"), ["$share/g/t"]);
    assert_eq!(
        sim.broker.shared_copies("a").map(|m| m.len()),
        Some(1),
        "the live side map holds the same"
    );
    sim.restart(Duration::from_secs(1));
    let b = sim.connect(member("b"));
    assert_eq!(
        sim.received(b),
        ["job"],
        "the other member gets it after the crash"
    );
    assert!(
        groups(&sim, "a").is_empty(),
        "the entry left the dead member with its message"
    );
    assert_eq!(groups(&sim, "b"), ["$share/g/t"], "and went with it to b");
    let a = sim.connect(member("a"));
    assert!(sim.received(a).is_empty(), "and not the dead member again");
}

// ---- the session limit -----------------------------------------------------------------

fn connack_reason(sim: &Sim, conn: ConnId) -> Option<tern_codec::ReasonCode> {
    sim.outputs.iter().find_map(|o| match o {
        Output::Send(c, Packet::ConnAck(a)) if *c == conn => Some(a.reason),
        _ => None,
    })
}

#[test]
fn a_new_session_beyond_max_sessions_is_refused_with_0x97_and_existing_ones_resume() {
    let mut sim = Sim::new(Settings {
        max_sessions: Some(2),
        ..Settings::default()
    });
    let a = sim.connect(v5_persistent("a", 3600));
    sim.close(a);
    let b = sim.connect(v5_persistent("b", 3600));
    assert_eq!(
        connack_reason(&sim, b),
        Some(tern_codec::ReasonCode::Success)
    );
    let c = sim.connect(v5_persistent("c", 3600));
    assert_eq!(
        connack_reason(&sim, c),
        Some(tern_codec::ReasonCode::QuotaExceeded),
        "a third session"
    );
    assert!(sim.outputs.contains(&Output::Close(c)));
    let a = sim.connect(v5_persistent("a", 3600));
    assert_eq!(
        connack_reason(&sim, a),
        Some(tern_codec::ReasonCode::Success),
        "an offline session resumes"
    );
    assert!(connack_session_present(&sim, a));
    let b2 = sim.connect(v5_persistent("b", 3600));
    assert_eq!(
        connack_reason(&sim, b2),
        Some(tern_codec::ReasonCode::Success),
        "an online one is taken over"
    );
    assert_eq!(sessions(&sim), 2);
}

// ---- timers: what the core asks to be woken for -----------------------------------------

/// `poll_timeout` is the earliest thing due: a connection's keep alive (1.5 x, moved on
/// by each packet), then, once it is offline, the session's expiry; with nothing due, no
/// wake-up at all.
#[test]
fn the_core_asks_to_be_woken_only_for_what_is_due() {
    let mut sim = Sim::new(Settings::default());
    assert_eq!(sim.broker.poll_timeout(), None, "nothing to do");
    let mut c = v5_persistent("a", 60);
    c.keep_alive = 10;
    let a = sim.connect(c);
    let t0 = sim.now;
    assert_eq!(sim.broker.poll_timeout(), Some(t0 + 15 * S), "keep alive");
    sim.advance(5 * S);
    sim.send(a, Packet::PingReq);
    // The entry for t0 + 15 s fires, finds the keep alive moved on, and is put back.
    sim.advance(10 * S);
    assert!(
        !sim.outputs.contains(&Output::Close(a)),
        "heard from at 5 s"
    );
    assert_eq!(
        sim.broker.poll_timeout(),
        Some(t0 + 20 * S),
        "1.5 x after the PINGREQ"
    );
    sim.close(a);
    assert_eq!(
        sim.broker.poll_timeout(),
        Some(sim.now + 60 * S),
        "offline: the session's expiry"
    );
    sim.advance(61 * S);
    assert_eq!(sessions(&sim), 0, "expired");
    assert_eq!(sim.broker.poll_timeout(), None, "nothing left to wake for");
}

// ---- defaults and the broker-wide budget for queued messages ----------------------------

/// The scenario of the on-disk queues issue, on default settings: 20,000 QoS 1 messages
/// for an offline persistent subscriber, acknowledged, then a crash: every one is kept
/// (the default used to keep 1,000 and drop the rest for room).
#[test]
fn with_default_settings_an_offline_subscriber_keeps_every_acknowledged_message() {
    let mut sim = Sim::new(Settings::default());
    sim.offline_subscriber(persistent("a"), "t", QoS::AtLeastOnce);
    let b = sim.connect(Connect::new(Protocol::V5, "b"));
    for i in 0..20_000u32 {
        sim.publish(b, "t", &format!("m{i}"), (i % 60_000 + 1) as u16);
    }
    assert!(
        puback_reasons(&sim, b)
            .iter()
            .all(|r| *r == tern_codec::ReasonCode::Success),
        "every publish acknowledged"
    );
    assert_eq!(sim.stored().sessions["a"].delivery.queued_len(), 20_000);
    sim.restart(Duration::from_secs(1));
    let a = sim.connect(persistent("a"));
    // The window lets a batch out at a time; acknowledge each batch until all came.
    ack_all(&mut sim, a);
    let received = sim.received(a);
    assert_eq!(received.len(), 20_000);
    assert!(
        received
            .iter()
            .enumerate()
            .all(|(i, m)| *m == format!("m{i}"))
    );
    assert_eq!(dropped(&sim), 0);
}

/// With a memory window (the server's default with a store), an offline session keeps
/// none of its queue in memory and an online one at most the window: the rest waits in the
/// store and is read back in order as the window drains, across a crash too.
#[test]
fn with_a_memory_window_a_backlog_waits_in_the_store_and_is_read_back_in_order() {
    for crash in [false, true] {
        let mut sim = Sim::new(Settings {
            queue_window: Some(8),
            ..Settings::default()
        });
        sim.offline_subscriber(persistent("a"), "t", QoS::AtLeastOnce);
        let b = sim.connect(Connect::new(Protocol::V5, "b"));
        for i in 0..300u32 {
            sim.publish(b, "t", &format!("m{i}"), (i + 1) as u16);
        }
        let state = sim.broker.session_state("a").unwrap();
        assert_eq!(
            state.queued().count(),
            0,
            "offline: nothing queued in memory"
        );
        assert_eq!((state.queued_len(), state.spilled_len()), (300, 300));
        sim.advance(Duration::from_secs(5));
        let g = sim.broker.gauges(sim.now, 1);
        let bytes: usize = (0..300).map(|i| format!("m{i}").len()).sum();
        assert_eq!((g.queued, g.queued_bytes), (300, bytes));
        assert!(g.oldest >= Duration::from_secs(5), "oldest {:?}", g.oldest);
        if crash {
            sim.restart(Duration::from_secs(1));
        }
        let a = sim.connect(persistent("a"));
        // Acknowledge what comes, one round at a time, watching the memory the queue takes.
        let mut most_in_memory = 0;
        ack_all_watching(&mut sim, a, |sim| {
            let state = sim.broker.session_state("a").unwrap();
            most_in_memory = most_in_memory.max(state.queued().count());
        });
        let received = sim.received(a);
        let expected: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
        assert_eq!(
            received, expected,
            "every message once, in order (crash: {crash})"
        );
        assert!(
            most_in_memory <= 8,
            "{most_in_memory} queued in memory, window 8"
        );
        assert!(
            sim.loads_answered >= 300 / 8,
            "{} loads",
            sim.loads_answered
        );
        assert_eq!(sim.broker.session_state("a").unwrap().queued_len(), 0);
        assert_eq!(sim.stored().sessions["a"].delivery.queued_len(), 0);
    }
}

/// Past `max_queued_total`, a QoS 1/2 publish that would be queued is refused: 0x97 to a
/// 5.0 publisher, the connection closed for a 3.x one; what was acknowledged is all
/// delivered, and publishing works again once the subscriber has taken its messages.
#[test]
fn past_the_budget_for_queued_messages_publishes_are_refused_and_resume_when_drained() {
    use tern_codec::ReasonCode::{QuotaExceeded, Success};
    // Room for three queued 2-byte messages (each counts its payload and the overhead).
    let budget = 3 * (2 + tern_broker_core::QUEUED_MESSAGE_OVERHEAD);
    let mut sim = Sim::new(Settings {
        max_queued_total: budget,
        ..Settings::default()
    });
    sim.offline_subscriber(persistent("a"), "t", QoS::AtLeastOnce);
    let online = sim.connect(Connect::new(Protocol::V3_1_1, "online"));
    sim.subscribe(online, "live", QoS::AtLeastOnce);
    let b = sim.connect(Connect::new(Protocol::V5, "b"));
    for i in 0..5 {
        sim.publish(b, "t", &format!("m{i}"), i + 1);
    }
    assert_eq!(
        puback_reasons(&sim, b),
        [Success, Success, Success, QuotaExceeded, QuotaExceeded]
    );
    // A publish nobody would queue is not refused: the budget is for queued messages.
    sim.publish(b, "live", "now", 6);
    assert_eq!(puback_reasons(&sim, b)[5], Success);
    assert_eq!(sim.received(online), ["now"]);
    // 3.x: no reason code to give, so the connection is closed, unacknowledged.
    let old = sim.connect(Connect::new(Protocol::V3_1_1, "old"));
    sim.publish(old, "t", "m5", 1);
    assert!(puback_reasons(&sim, old).is_empty());
    assert!(sim.outputs.contains(&Output::Close(old)));
    // The subscriber takes what was acknowledged: all of it.
    let a = sim.connect(persistent("a"));
    ack_all(&mut sim, a);
    assert_eq!(sim.received(a), ["m0", "m1", "m2"]);
    sim.close(a);
    sim.publish(b, "t", "m6", 7);
    assert_eq!(
        puback_reasons(&sim, b)[6],
        Success,
        "room again once drained"
    );
}

/// Under `reject`, a shared group whose only member is offline with a full queue refuses
/// the publish (0x97); with a second member that has room, the full one is passed over.
#[test]
fn reject_covers_shared_groups_passing_over_a_full_member() {
    use tern_codec::ReasonCode::{QuotaExceeded, Success};
    let mut sim = Sim::new(Settings {
        max_queued_messages: 2,
        ..Settings::default()
    });
    sim.offline_subscriber(persistent("a"), "$share/g/t", QoS::AtLeastOnce);
    let b = sim.connect(Connect::new(Protocol::V5, "b"));
    for i in 0..3 {
        sim.publish(b, "t", &format!("m{i}"), i + 1);
    }
    assert_eq!(
        puback_reasons(&sim, b),
        [Success, Success, QuotaExceeded],
        "the only member is full"
    );
    // A second member, offline too, with room: the full one is passed over.
    sim.offline_subscriber(persistent("c"), "$share/g/t", QoS::AtLeastOnce);
    sim.publish(b, "t", "m3", 4);
    sim.publish(b, "t", "m4", 5);
    assert_eq!(puback_reasons(&sim, b)[3..], [Success, Success]);
    sim.publish(b, "t", "m5", 6);
    assert_eq!(puback_reasons(&sim, b)[5], QuotaExceeded, "both full now");
    let a = sim.connect(persistent("a"));
    let c = sim.connect(persistent("c"));
    assert_eq!(sim.received(a), ["m0", "m1"]);
    assert_eq!(sim.received(c), ["m3", "m4"]);
    assert_eq!(dropped(&sim), 2, "the two refusals");
}

// ---- queue_policy = "block" ---------------------------------------------------------------

fn block_settings() -> Settings {
    Settings {
        max_queued_messages: 2,
        queue_policy: QueuePolicy::Block,
        block_timeout: Duration::from_secs(10),
        ..Settings::default()
    }
}

/// A publish that would overflow a queue is held, its acknowledgement with it, and the
/// publisher's later QoS 1/2 publishes behind it (in order); when the subscriber takes its
/// messages, the held ones are routed and acknowledged.
#[test]
fn block_holds_the_acknowledgement_until_the_queue_has_room() {
    use tern_codec::ReasonCode::Success;
    let mut sim = Sim::new(block_settings());
    sim.offline_subscriber(persistent("a"), "t/+", QoS::AtLeastOnce);
    let b = sim.connect(Connect::new(Protocol::V5, "b"));
    for i in 0..2 {
        sim.publish(b, "t/x", &format!("m{i}"), i + 1);
    }
    assert_eq!(puback_reasons(&sim, b), [Success, Success]);
    sim.publish(b, "t/x", "m2", 3);
    // Another topic the full subscriber also has: held behind m2, for order.
    sim.publish(b, "t/y", "m3", 4);
    assert_eq!(
        puback_reasons(&sim, b).len(),
        2,
        "m2 and m3 held, unacknowledged"
    );
    let a = sim.connect(persistent("a"));
    ack_all(&mut sim, a);
    assert_eq!(sim.received(a), ["m0", "m1", "m2", "m3"], "all, in order");
    assert_eq!(puback_reasons(&sim, b), [Success; 4]);
    assert_eq!(dropped(&sim), 0);
}

/// Held longer than `block_timeout`, a publish that still does not fit is refused as under
/// `reject`: 0x97 to a 5.0 publisher (the next held one gets its own time), the
/// connection closed for a 3.x one.
#[test]
fn block_refuses_after_the_timeout() {
    use tern_codec::ReasonCode::{QuotaExceeded, Success};
    let mut sim = Sim::new(block_settings());
    sim.offline_subscriber(persistent("a"), "t", QoS::AtLeastOnce);
    let b = sim.connect(Connect::new(Protocol::V5, "b"));
    for i in 0..3 {
        sim.publish(b, "t", &format!("m{i}"), i + 1);
    }
    assert_eq!(puback_reasons(&sim, b), [Success, Success]);
    sim.advance(Duration::from_secs(5));
    assert_eq!(puback_reasons(&sim, b).len(), 2, "still held at 5 s");
    sim.advance(Duration::from_secs(6));
    assert_eq!(puback_reasons(&sim, b), [Success, Success, QuotaExceeded]);
    assert_eq!(dropped(&sim), 1);
    // 3.x: no reason code, so the connection is closed when the time is up.
    let old = sim.connect(Connect::new(Protocol::V3_1_1, "old"));
    sim.publish(old, "t", "m3", 1);
    assert!(
        !sim.outputs.contains(&Output::Close(old)),
        "held, not yet refused"
    );
    sim.advance(Duration::from_secs(11));
    assert!(puback_reasons(&sim, old).is_empty());
    assert!(sim.outputs.contains(&Output::Close(old)));
    let a = sim.connect(persistent("a"));
    assert_eq!(
        sim.received(a),
        ["m0", "m1"],
        "nothing refused was delivered"
    );
}

/// Under `block`, a shared group whose only member is offline and full holds the publish
/// too, and a member with room takes it at once.
#[test]
fn block_covers_shared_groups() {
    use tern_codec::ReasonCode::Success;
    let mut sim = Sim::new(block_settings());
    sim.offline_subscriber(persistent("a"), "$share/g/t", QoS::AtLeastOnce);
    let b = sim.connect(Connect::new(Protocol::V5, "b"));
    for i in 0..3 {
        sim.publish(b, "t", &format!("m{i}"), i + 1);
    }
    assert_eq!(puback_reasons(&sim, b), [Success, Success], "m2 held");
    // A member with room joins: the held publish fits now and goes to it.
    let c = sim.connect(persistent("c"));
    sim.subscribe(c, "$share/g/t", QoS::AtLeastOnce);
    sim.advance(Duration::from_secs(1));
    assert_eq!(puback_reasons(&sim, b), [Success; 3]);
    assert_eq!(sim.received(c), ["m2"]);
}

// ---- wills across a crash, and their properties ---------------------------------------------

/// A persistent subscriber that reconnects after restarts and collects every will.
fn will_keeper(sim: &mut Sim) {
    sim.offline_subscriber(persistent("keeper"), "wills/#", QoS::AtLeastOnce);
}

fn wills_kept(sim: &mut Sim) -> Vec<String> {
    let k = sim.connect(persistent("keeper"));
    ack_all(sim, k);
    let got = sim.received(k);
    sim.close(k);
    got
}

/// A crash ends every connection without DISCONNECT: the wills of the clients that were
/// connected are published after the restart, once, for a client whose session ends
/// with its connection as for a persistent one.
#[test]
fn the_wills_of_connected_clients_are_published_once_after_a_crash() {
    let mut sim = Sim::new(Settings::default());
    will_keeper(&mut sim);
    let mut clean = Connect::new(Protocol::V3_1_1, "clean");
    clean.will = Some(LastWill {
        topic: TopicName::new("wills/clean").unwrap(),
        payload: "clean gone".into(),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    });
    sim.connect(clean);
    let mut kept = will_client(0, 3600);
    if let Some(w) = kept.will.as_mut() {
        w.qos = QoS::AtLeastOnce;
    }
    sim.connect(kept);
    sim.restart(S);
    let mut got = wills_kept(&mut sim);
    got.sort();
    assert_eq!(got, ["clean gone", "gone"]);
    sim.restart(S);
    assert!(wills_kept(&mut sim).is_empty(), "once");
}

/// A client resuming its session with a will is told it is connected only once the will
/// is committed: a CONNACK resuming a session may otherwise go before its round's commit,
/// and a crash in between would lose the will of a client that saw itself connected.
#[test]
fn a_connack_resuming_a_session_with_a_will_waits_for_the_will_to_be_stored() {
    let mut sim = Sim::new(Settings::default());
    will_keeper(&mut sim);
    let mut first = will_client_q1(0, 3600);
    first.will = None;
    let c = sim.connect(first);
    sim.send(c, Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
    // The store refuses the round that would store the will.
    sim.fail_next_commit();
    sim.connect(will_client_q1(0, 3600));
    // The first connection's CONNACK had no session to resume; this one would.
    let told = sim
        .died_with
        .iter()
        .any(|o| matches!(o, Output::Send(_, Packet::ConnAck(a)) if a.session_present));
    assert!(
        !told,
        "the client was told it is connected although its will was never stored"
    );
    assert_eq!(sim.restarts, 1);
    assert!(wills_kept(&mut sim).is_empty());
    // The commit that goes through: CONNACK (session present), and the will is kept.
    let c = sim.connect(will_client_q1(0, 3600));
    assert!(sim.outputs.iter().any(
        |o| matches!(o, Output::Send(to, Packet::ConnAck(a)) if *to == c && a.session_present)
    ));
    sim.restart(S);
    assert_eq!(wills_kept(&mut sim), ["gone"]);
}

/// `will_client` with a QoS 1 will (kept for an offline subscriber).
fn will_client_q1(delay: u32, session_expiry: u32) -> Connect {
    let mut c = will_client(delay, session_expiry);
    if let Some(w) = c.will.as_mut() {
        w.qos = QoS::AtLeastOnce;
    }
    c
}

/// With a Will Delay Interval the will waits after the restart as after a disconnect: a
/// client back in time cancels it; otherwise it goes when the delay passes.
#[test]
fn a_delayed_will_survives_a_crash_and_a_client_back_in_time_cancels_it() {
    let mut sim = Sim::new(Settings::default());
    will_keeper(&mut sim);
    sim.connect(will_client_q1(30, 3600));
    sim.restart(S);
    sim.advance(10 * S);
    let mut back = will_client_q1(30, 3600);
    back.will = None;
    let c = sim.connect(back);
    sim.advance(60 * S);
    assert!(wills_kept(&mut sim).is_empty(), "back within the delay");
    sim.close(c);
    // Away again, now without a will: nothing. A new connection with a will, a crash,
    // and no return: the will goes when the delay has passed.
    let mut sim = Sim::new(Settings::default());
    will_keeper(&mut sim);
    sim.connect(will_client_q1(30, 3600));
    sim.restart(S);
    sim.advance(20 * S);
    assert!(wills_kept(&mut sim).is_empty(), "not before the delay");
    sim.advance(15 * S);
    assert_eq!(wills_kept(&mut sim), ["gone"]);
}

/// A 5.0 will's properties go with it when it is published [MQTT-3.1.3-9]: payload format,
/// content type, response topic, correlation data, user properties, and its expiry.
#[test]
fn a_will_is_published_with_its_properties() {
    let mut sim = Sim::new(Settings::default());
    let watch = sim.connect(Connect::new(Protocol::V5, "watch"));
    sim.subscribe(watch, "wills/#", QoS::AtLeastOnce);
    let mut c = Connect::new(Protocol::V5, "w");
    c.will = Some(LastWill {
        topic: TopicName::new("wills/w").unwrap(),
        payload: "gone".into(),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: WillProperties {
            payload_format_indicator: Some(tern_codec::PayloadFormat::Utf8),
            message_expiry_interval: Some(120),
            content_type: Some("text/plain".into()),
            response_topic: Some(TopicName::new("replies/w").unwrap()),
            correlation_data: Some(bytes::Bytes::from_static(b"42")),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        }
        .into(),
    });
    let w = sim.connect(c);
    sim.close(w);
    let p = sim.publishes(watch).pop().expect("the will");
    let props = &*p.properties;
    assert_eq!(
        props.payload_format_indicator,
        Some(tern_codec::PayloadFormat::Utf8)
    );
    assert_eq!(props.message_expiry_interval, Some(120));
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        props.response_topic.as_ref().map(|t| t.as_str()),
        Some("replies/w")
    );
    assert_eq!(props.correlation_data.as_deref(), Some(&b"42"[..]));
    assert_eq!(props.user_properties, [("k".into(), "v".into())]);
}

/// A QoS 1 PUBLISH carrying the idempotency key `key` (user property `msg-id`).
fn keyed(topic: &str, payload: &str, key: &str, id: u16) -> Packet {
    let mut p = Publish::new(
        TopicName::new(topic).unwrap(),
        QosPid::AtLeastOnce(NonZeroU16::new(id).unwrap()),
        payload.to_string(),
    );
    p.properties
        .user_properties
        .push(("msg-id".into(), key.into()));
    Packet::Publish(p)
}

/// An idempotency key is committed with its message: a repeat from a new clean session,
/// before or after a restart, is acknowledged (0x00) and not routed; after the window, or
/// once `max_keys` newer keys of the same identity came, the key is new again. Another
/// identity's key of the same value is its own.
#[test]
fn an_idempotency_key_outlives_a_restart_but_not_its_window_or_its_count() {
    let mut sim = Sim::new(Settings {
        idempotency: tern_broker_core::Idempotency {
            window: Duration::from_secs(60),
            max_keys: 3,
            ..Default::default()
        },
        ..Settings::default()
    });
    sim.offline_subscriber(persistent("a"), "t", QoS::AtLeastOnce);
    let b = sim.connect(Connect::new(Protocol::V5, "b"));
    sim.send(b, keyed("t", "one", "k1", 1));
    sim.send(b, keyed("t", "again", "k1", 2));
    assert_eq!(
        puback_reasons(&sim, b),
        [ReasonCode::Success, ReasonCode::Success],
        "the repeat is acknowledged as a success"
    );
    assert!(
        sim.stored()
            .keys
            .iter()
            .any(|((identity, _), (key, _))| identity == "client:b" && key == "k1"),
        "committed with the message"
    );
    sim.restart(Duration::from_secs(1));
    let b = sim.connect(Connect::new(Protocol::V5, "b"));
    sim.send(b, keyed("t", "after-restart", "k1", 1));
    let c = sim.connect(Connect::new(Protocol::V5, "c"));
    sim.send(c, keyed("t", "other-identity", "k1", 1));
    // Three newer keys push k1 out of b's count.
    for (i, k) in ["k2", "k3", "k4"].iter().enumerate() {
        sim.send(b, keyed("t", k, k, 2 + i as u16));
    }
    sim.send(b, keyed("t", "after-count", "k1", 5));
    // k4 is still remembered (k3, k4, k1 are the last three); past the window it is not.
    sim.send(b, keyed("t", "k4-again", "k4", 6));
    sim.advance(Duration::from_secs(61));
    sim.send(b, keyed("t", "k4-after-window", "k4", 7));
    let a = sim.connect(persistent("a"));
    ack_all(&mut sim, a);
    assert_eq!(
        sim.received(a),
        [
            "one",
            "other-identity",
            "k2",
            "k3",
            "k4",
            "after-count",
            "k4-after-window"
        ]
    );
    assert_eq!(sim.broker.counters().idempotent_repeats, 3);
}

/// A cluster node applies a batch of the cluster's stream once: its progress is committed
/// with the copies, so the same batch again (read again after a restart) is skipped, and
/// reported as applied so the reader goes on.
#[test]
fn a_cluster_stream_batch_is_applied_once_across_a_restart() {
    let mut sim = Sim::new(Settings {
        cluster: true,
        ..Settings::default()
    });
    sim.offline_subscriber(persistent("a"), "pay/#", QoS::ExactlyOnce);
    let batch = |payloads: &[&str]| -> Vec<tern_broker_core::Remote> {
        payloads
            .iter()
            .map(|p| {
                tern_broker_core::Remote::plain(tern_proto::Message::new(
                    TopicName::new("pay/x").unwrap(),
                    p.to_string(),
                    QoS::ExactlyOnce,
                ))
            })
            .collect()
    };
    let now = sim.now;
    sim.broker
        .handle_remote_durable(7, batch(&["one", "two"]), now);
    assert_eq!(sim.broker.take_applied(), Some(7));
    sim.pump();
    assert_eq!(sim.stored().cluster_applied, 7, "committed with the copies");
    sim.restart(Duration::from_secs(1));
    let now = sim.now;
    sim.broker
        .handle_remote_durable(7, batch(&["one", "two"]), now);
    assert_eq!(
        sim.broker.take_applied(),
        Some(7),
        "reported again, not applied again"
    );
    sim.broker.handle_remote_durable(9, batch(&["three"]), now);
    sim.pump();
    // Nothing of the remote messages goes to other nodes again.
    assert!(sim.broker.take_forwards().is_empty());
    let a = sim.connect(persistent("a"));
    ack_all(&mut sim, a);
    assert_eq!(sim.received(a), ["one", "two", "three"]);
}

/// The topics the store keeps a retained message for.
fn retained_topics(sim: &Sim) -> Vec<String> {
    sim.stored()
        .retained
        .keys()
        .map(|t| t.to_string())
        .collect()
}

/// A cluster node keeps the retained messages the cluster's retained stream gives it (an
/// empty one clears, one already expired clears), committed to its store and delivered to
/// nobody; a retained message arriving with a message from another node is delivered but
/// not kept (the retained stream says what is retained, in one order for every node).
#[test]
fn a_cluster_node_keeps_what_the_retained_stream_says_not_what_messages_carry() {
    let mut sim = Sim::new(Settings {
        cluster: true,
        ..Settings::default()
    });
    let s = sim.connect(Connect::new(Protocol::V3_1_1, "watcher"));
    sim.subscribe(s, "state/#", QoS::AtMostOnce);
    let retained = |topic: &str, payload: &str| {
        let mut m = tern_proto::Message::new(
            TopicName::new(topic).unwrap(),
            payload.to_string(),
            QoS::AtLeastOnce,
        );
        m.retain = true;
        m
    };
    let now = sim.now;
    let expired = retained("state/old", "stale").with_expiry(Duration::from_secs(1), now);
    sim.broker.handle_retained(
        vec![
            retained("state/a", "1"),
            retained("state/b", "2"),
            retained("state/b", ""),
            expired.clone(),
        ],
        now,
    );
    sim.pump();
    assert!(sim.received(s).is_empty(), "kept, not delivered");
    let kept = retained_topics(&sim);
    assert_eq!(kept, ["state/a", "state/old"]);
    sim.broker.handle_remote(
        vec![tern_broker_core::Remote::plain(retained(
            "state/c", "from-b",
        ))],
        now,
    );
    sim.pump();
    assert_eq!(sim.received(s), ["from-b"], "delivered");
    let kept = retained_topics(&sim);
    assert_eq!(kept, ["state/a", "state/old"], "not kept from a message");
    // Expired by the time the stream's copy is read: clears the topic.
    sim.broker
        .handle_retained(vec![expired], now + Duration::from_secs(2));
    sim.broker
        .handle_retained(vec![retained("state/a", "")], now);
    sim.pump();
    assert!(sim.stored().retained.is_empty());
    let late = sim.connect(Connect::new(Protocol::V3_1_1, "late"));
    sim.subscribe(late, "state/#", QoS::AtMostOnce);
    assert!(sim.received(late).is_empty());
}

/// A cluster node cannot see the other nodes' subscribers: a 5.0 publisher is told
/// Success, not 0x10 No matching subscribers, for a topic that crosses nodes even when no
/// session of this node subscribes; a topic with no NATS subject (it stays on the node)
/// still gets 0x10. A single node still says 0x10.
#[test]
fn a_cluster_node_never_says_no_matching_subscribers_for_a_topic_that_crosses_nodes() {
    for cluster in [true, false] {
        let mut sim = Sim::new(Settings {
            cluster,
            ..Settings::default()
        });
        let p = sim.connect(Connect::new(Protocol::V5, "p"));
        sim.publish(p, "no/sub", "nobody here", 1);
        sim.publish(p, "no sub", "stays here", 2);
        let acks: Vec<ReasonCode> = sim
            .outputs
            .iter()
            .filter_map(|o| match o {
                Output::Send(c, Packet::PubAck(a)) if *c == p => Some(a.reason),
                _ => None,
            })
            .collect();
        let crossing = if cluster {
            ReasonCode::Success
        } else {
            ReasonCode::NoMatchingSubscribers
        };
        assert_eq!(
            acks,
            [crossing, ReasonCode::NoMatchingSubscribers],
            "cluster: {cluster}"
        );
    }
}

/// A cluster node cut off from NATS closes its connections (5.0: DISCONNECT 0x9C Use
/// another server) without publishing their wills or letting the cluster forget them
/// (the cluster publishes them once), drops the delayed will it was waiting on, refuses
/// new connections with 0x88 Server unavailable, and takes them again once back.
#[test]
fn a_cluster_node_cut_off_closes_its_connections_and_leaves_their_wills_to_the_cluster() {
    let mut sim = Sim::new(Settings {
        cluster: true,
        ..Settings::default()
    });
    let w = watcher(&mut sim);
    // A will waiting for its delay, and a connected client with a will.
    let waiting = sim.connect(will_client(30, 3600));
    sim.close(waiting);
    let mut c = will_client(0, 3600);
    c.client_id = "now".into();
    let now_conn = sim.connect(c);
    let _ = sim.broker.take_will_changes();
    let now = sim.now;
    sim.broker.handle_cut_off(true, now);
    sim.pump();
    let disconnect = sim.outputs.iter().find_map(|o| match o {
        Output::Send(c, Packet::Disconnect(d)) if *c == now_conn => Some(d.reason),
        _ => None,
    });
    assert_eq!(disconnect, Some(ReasonCode::UseAnotherServer));
    assert!(sim.outputs.contains(&Output::Close(now_conn)));
    assert!(sim.outputs.contains(&Output::Close(w)), "every connection");
    assert!(
        sim.broker.take_will_changes().is_empty(),
        "the cluster keeps the wills"
    );
    sim.advance(Duration::from_secs(40));
    assert!(
        sim.broker.take_forwards().is_empty(),
        "no will published here"
    );
    let refused = sim.connect(Connect::new(Protocol::V5, "late"));
    let ack = sim.outputs.iter().rev().find_map(|o| match o {
        Output::Send(c, Packet::ConnAck(a)) if *c == refused => Some(a.reason),
        _ => None,
    });
    assert_eq!(ack, Some(ReasonCode::ServerUnavailable));
    let now = sim.now;
    sim.broker.handle_cut_off(false, now);
    let back = sim.connect(Connect::new(Protocol::V5, "back"));
    let ack = sim.outputs.iter().rev().find_map(|o| match o {
        Output::Send(c, Packet::ConnAck(a)) if *c == back => Some(a.reason),
        _ => None,
    });
    assert_eq!(ack, Some(ReasonCode::Success));
}

/// A stream message of the cluster from `node` (its number `number` there), at `seq`.
fn streamed(
    seq: u64,
    node: &str,
    number: u64,
    own: bool,
    payload: &str,
) -> tern_broker_core::Remote {
    tern_broker_core::Remote {
        message: tern_proto::Message::new(
            TopicName::new("t/x").unwrap(),
            payload.to_string(),
            QoS::AtLeastOnce,
        ),
        plain: true,
        shared: Vec::new(),
        earlier: None,
        source: Some(tern_broker_core::Source {
            seq,
            node: node.into(),
            number,
            own,
            publisher: None,
            handed: false,
        }),
    }
}

/// [`streamed`] for the shared subscription `$share/g/t/#` on this node only (another
/// node's publish named this node for the group), handed back once already or not.
fn for_group(seq: u64, payload: &str, handed: bool) -> tern_broker_core::Remote {
    let mut r = streamed(seq, "b", seq, false, payload);
    r.plain = false;
    r.shared = vec!["$share/g/t/#".to_string()];
    if let Some(s) = r.source.as_mut() {
        s.handed = handed;
    }
    r
}

fn handed(a: &mut Sim) -> Vec<(String, String)> {
    a.broker
        .take_handed_back()
        .into_iter()
        .map(|(m, share)| (String::from_utf8_lossy(&m.payload).to_string(), share))
        .collect()
}

/// Cluster: a shared-group message that only a session given to another node could take
/// here is not put in the given copy (the session as exported has gone to the other
/// node, and the copy goes once the client is there): it is held, and handed back to the
/// cluster for the group when the copy goes. A message the cluster gave this node for a
/// group with no member here any more is handed back at once, but only once (not one
/// that was handed back already). A given session that is resumed here instead gets what
/// was held for it.
#[test]
fn shared_group_messages_for_a_given_session_go_back_to_the_cluster() {
    let mut a = Sim::new(Settings {
        cluster: true,
        ..Settings::default()
    });
    let share = "$share/g/t/#".to_string();
    let xa = a.connect(mover());
    a.subscribe(xa, &share, QoS::ExactlyOnce);
    let now = a.now;
    assert!(a.broker.handle_give("x", now));
    a.pump();
    a.broker
        .handle_remote_durable(2, vec![for_group(2, "one", false)], now);
    a.pump();
    assert!(
        handed(&mut a).is_empty(),
        "held while the session may stay here"
    );
    a.broker.handle_taken_over("x", now);
    a.pump();
    assert_eq!(handed(&mut a), [("one".to_string(), share.clone())]);
    // The group has no member here now.
    a.broker
        .handle_remote_durable(3, vec![for_group(3, "two", false)], now);
    a.pump();
    assert_eq!(handed(&mut a), [("two".to_string(), share.clone())]);
    a.broker
        .handle_remote_durable(4, vec![for_group(4, "three", true)], now);
    a.pump();
    assert!(handed(&mut a).is_empty(), "handed back once only");

    // Given, then resumed here (its claim holds): it gets what was held.
    let xb = a.connect(mover());
    a.subscribe(xb, &share, QoS::ExactlyOnce);
    let now = a.now;
    assert!(a.broker.handle_give("x", now));
    a.pump();
    a.broker
        .handle_remote_durable(5, vec![for_group(5, "four", false)], now);
    a.pump();
    let x2: ConnId = 70;
    a.broker
        .handle_admission(x2, Admission::Granted(Box::new(mover())), now);
    a.pump();
    assert_eq!(a.broker.take_fetches(), [Str::from("x")]);
    a.broker.handle_moved("x", None, Some(9), now);
    a.pump();
    assert_eq!(a.broker.take_claims_first(), [(Str::from("x"), 9)]);
    a.broker.handle_claimed("x", true, now);
    a.pump();
    assert!(handed(&mut a).is_empty());
    assert_eq!(a.received(x2), ["four"]);

    // A given copy holds no more than its queue limit: the rest is handed back at once;
    // one that ends (expires) hands back what it held.
    let mut c = Sim::new(Settings {
        cluster: true,
        max_queued_messages: 2,
        ..Settings::default()
    });
    let xc = c.connect(mover());
    c.subscribe(xc, &share, QoS::ExactlyOnce);
    let now = c.now;
    assert!(c.broker.handle_give("x", now));
    c.pump();
    let batch = (2..5)
        .map(|i| for_group(i, &format!("m{i}"), false))
        .collect();
    c.broker.handle_remote_durable(4, batch, now);
    c.pump();
    assert_eq!(handed(&mut c), [("m4".to_string(), share.clone())]);
    c.advance(Duration::from_secs(3601));
    assert_eq!(
        handed(&mut c),
        [("m2".to_string(), share.clone()), ("m3".to_string(), share)]
    );
}

fn mover() -> Connect {
    let mut c = Connect::new(Protocol::V5, "x");
    c.clean_start = false;
    c.properties = ConnectProperties {
        session_expiry_interval: Some(3600),
        ..Default::default()
    }
    .into();
    c
}

/// A session moving between cluster nodes (docs/cluster.md, "How a session moves"). On
/// node a, the session `x` (QoS 2 on `t/#`) is given away: its connection closes with
/// 0x8E, and it goes once the cluster says the client is elsewhere. On node b, x's
/// CONNECT waits while its session is fetched; the session arrives as a's store had it
/// (stream position 100, a's own messages through number 7) with what the stream had past
/// 100; x gets, then and later, only what it did not hold: nothing at or below 100, none
/// of a's messages numbered up to 7, b's own messages (which b's other sessions got when
/// they were published) from the stream only; and after b restarts, still so.
#[test]
fn a_session_moved_from_another_node_takes_from_the_stream_only_what_it_did_not_hold() {
    let cluster = Settings {
        cluster: true,
        ..Settings::default()
    };
    // Node a: x subscribed, online; a message of a's publisher waits in it.
    let mut a = Sim::new(cluster.clone());
    let xa = a.connect(mover());
    a.subscribe(xa, "t/#", QoS::ExactlyOnce);
    let now = a.now;
    assert!(a.broker.handle_give("x", now), "a session to give");
    a.pump();
    let kicked = a.outputs.iter().find_map(|o| match o {
        Output::Send(c, Packet::Disconnect(d)) if *c == xa => Some(d.reason),
        _ => None,
    });
    assert_eq!(kicked, Some(ReasonCode::SessionTakenOver));
    let p = a.connect(Connect::new(Protocol::V5, "pub-a"));
    a.publish(p, "t/x", "held on a", 1);
    let given = a.stored().sessions[&Str::from("x")].clone();
    assert_eq!(given.delivery.queued_len(), 1, "what a held for x");
    a.broker.handle_taken_over("x", now);
    a.pump();
    assert!(
        !a.stored().sessions.contains_key(&Str::from("x")),
        "gone from a once the client is elsewhere"
    );

    // Node b: y, a plain local subscriber, and x coming back.
    let mut b = Sim::new(cluster);
    let y = b.connect(Connect::new(Protocol::V5, "y"));
    b.subscribe(y, "t/#", QoS::ExactlyOnce);
    let xb: ConnId = 50;
    let now = b.now;
    b.broker
        .handle_admission(xb, Admission::Granted(Box::new(mover())), now);
    b.pump();
    assert_eq!(b.broker.take_fetches(), [Str::from("x")]);
    assert!(
        !b.outputs
            .iter()
            .any(|o| matches!(o, Output::Send(c, _) if *c == xb)),
        "no CONNACK while the session is fetched"
    );
    let moved = tern_broker_core::MovedIn {
        session: tern_store::Exported {
            client_id: "x".into(),
            session: given,
            cluster_applied: 100,
            cluster_forwarded: 7,
        },
        from: "a".into(),
        catch_up: vec![
            streamed(99, "c", 40, false, "c at 99"),
            streamed(101, "a", 7, false, "a's 7"),
            streamed(102, "a", 8, false, "a's 8"),
            streamed(103, "c", 41, false, "c at 103"),
            streamed(104, "b", 3, true, "b's 3"),
        ],
    };
    b.broker.handle_moved("x", Some(moved), Some(9), now);
    b.pump();
    // Installed, but x is answered only once the cluster says it is here.
    assert!(
        !b.outputs
            .iter()
            .any(|o| matches!(o, Output::Send(c, _) if *c == xb)),
        "no CONNACK before the claim"
    );
    assert_eq!(b.broker.take_claims_first(), [(Str::from("x"), 9)]);
    b.broker.handle_claimed("x", true, now);
    b.pump();
    let present = b.outputs.iter().find_map(|o| match o {
        Output::Send(c, Packet::ConnAck(a)) if *c == xb => Some(a.session_present),
        _ => None,
    });
    assert_eq!(present, Some(true), "CONNACK: session present");
    assert_eq!(
        b.received(xb),
        ["held on a", "a's 8", "c at 103", "b's 3"],
        "what x held, then what it missed, in the stream's order"
    );
    assert!(b.received(y).is_empty(), "the catch-up is x's alone");
    let fed = b.stored().sessions[&Str::from("x")].record.fed.clone();
    assert_eq!(
        fed,
        Some(tern_store::Fed {
            after: 100,
            from: "a".into(),
            through: 7,
        })
    );
    // A local publish on b: y at once; x from the stream, in its order.
    let pb = b.connect(Connect::new(Protocol::V5, "pub-b"));
    b.publish(pb, "t/x", "b's 4", 1);
    assert_eq!(b.received(y), ["b's 4"]);
    assert_eq!(b.received(xb).len(), 4, "x does not take it locally");
    let now = b.now;
    b.broker.handle_remote_durable(
        110,
        vec![
            streamed(105, "a", 6, false, "a's 6 late"),
            streamed(106, "b", 4, true, "b's 4"),
            streamed(107, "c", 42, false, "c at 107"),
        ],
        now,
    );
    b.pump();
    assert_eq!(
        &b.received(xb)[4..],
        ["b's 4", "c at 107"],
        "a's message it held is not taken again; b's own from the stream"
    );
    assert_eq!(
        b.received(y),
        ["b's 4", "a's 6 late", "c at 107"],
        "y: everything once, b's own when published"
    );
    // b's publisher publishes once more; b dies after that round's commit, before its
    // reader reads the message back: x, which takes b's messages from the stream only,
    // gets it from the restarted b's reader (an earlier run's message, its round
    // committed), and y, who had it at once, does not get it again.
    b.publish(pb, "t/x", "b's 6", 2);
    assert!(b.received(y).ends_with(&["b's 6".to_string()]));
    let n6 = b
        .broker
        .take_forwards()
        .iter()
        .rfind(|f| &f.message.payload[..] == b"b's 6")
        .map(|f| f.number)
        .unwrap();
    // After a restart of b, x still takes b's own messages from the stream, and only x.
    b.restart(Duration::from_secs(1));
    let y2 = b.connect({
        let mut c = Connect::new(Protocol::V5, "y");
        c.clean_start = false;
        c
    });
    b.subscribe(y2, "t/#", QoS::ExactlyOnce);
    let x2 = b.connect(mover());
    let now = b.now;
    b.broker
        .handle_remote_durable(120, vec![streamed(111, "b", 5, true, "b's 5")], now);
    b.pump();
    assert!(b.received(x2).ends_with(&["b's 5".to_string()]));
    assert!(!b.received(y2).contains(&"b's 5".to_string()));
    let mut earlier = streamed(121, "b", n6, true, "b's 6");
    earlier.plain = false;
    earlier.earlier = Some((n6, Some(("pub-b".into(), 2))));
    b.broker.handle_remote_durable(121, vec![earlier], now);
    b.pump();
    assert_eq!(
        b.received(x2).iter().filter(|m| *m == "b's 6").count(),
        1,
        "x gets b's message of the run before"
    );
    assert!(!b.received(y2).contains(&"b's 6".to_string()));
}

/// A node that cannot get a session from the node that has it refuses the CONNECT with
/// 0x88 Server unavailable (the client tries again), rather than start it afresh.
#[test]
fn a_session_that_cannot_be_fetched_refuses_its_client_for_now() {
    let mut b = Sim::new(Settings {
        cluster: true,
        ..Settings::default()
    });
    let now = b.now;
    b.broker
        .handle_admission(7, Admission::Granted(Box::new(mover())), now);
    b.pump();
    assert_eq!(b.broker.take_fetches().len(), 1);
    b.broker.handle_unavailable("x", now);
    b.pump();
    let ack = b.outputs.iter().find_map(|o| match o {
        Output::Send(7, Packet::ConnAck(a)) => Some(a.reason),
        _ => None,
    });
    assert_eq!(ack, Some(ReasonCode::ServerUnavailable));
    assert!(b.outputs.contains(&Output::Close(7)));
}

/// No two nodes serve one session: a node answers a client whose session it holds only
/// after it claimed the client in the cluster (on the client table's revision its fetch
/// read), when that session moved here or is one this node gave away and resumes. On
/// node a, x's session is given (to a node that may have installed it, or died first);
/// x comes back to a: no CONNACK until the claim; a failed claim (another node claimed x
/// on that revision first) refuses x with 0x88 and keeps the session; a claim that holds
/// resumes it, session present, with what it held.
#[test]
fn a_given_session_is_resumed_only_once_the_cluster_says_its_client_is_here() {
    let mut a = Sim::new(Settings {
        cluster: true,
        ..Settings::default()
    });
    let xa = a.connect(mover());
    a.subscribe(xa, "t/#", QoS::ExactlyOnce);
    let now = a.now;
    assert!(a.broker.handle_give("x", now));
    a.pump();
    let p = a.connect(Connect::new(Protocol::V5, "pub-a"));
    a.publish(p, "t/x", "held on a", 1);
    let answered = |a: &Sim, conn: ConnId| {
        a.outputs.iter().find_map(|o| match o {
            Output::Send(c, Packet::ConnAck(ack)) if *c == conn => {
                Some((ack.reason, ack.session_present))
            }
            _ => None,
        })
    };
    // x back on a; the table still says a (revision 5): the claim first.
    let x2: ConnId = 60;
    a.broker
        .handle_admission(x2, Admission::Granted(Box::new(mover())), now);
    a.pump();
    assert_eq!(a.broker.take_fetches(), [Str::from("x")]);
    a.broker.handle_moved("x", None, Some(5), now);
    a.pump();
    assert_eq!(answered(&a, x2), None, "no CONNACK before the claim");
    assert_eq!(a.broker.take_claims_first(), [(Str::from("x"), 5)]);
    // Another node claimed x on revision 5 first: refused for now, the session kept.
    a.broker.handle_claimed("x", false, now);
    a.pump();
    assert_eq!(
        answered(&a, x2),
        Some((ReasonCode::ServerUnavailable, false))
    );
    assert!(a.outputs.contains(&Output::Close(x2)));
    assert!(a.stored().sessions.contains_key(&Str::from("x")));
    // Again, and this time the claim holds.
    let x3: ConnId = 61;
    a.broker
        .handle_admission(x3, Admission::Granted(Box::new(mover())), now);
    a.pump();
    assert_eq!(a.broker.take_fetches(), [Str::from("x")]);
    a.broker.handle_moved("x", None, Some(5), now);
    a.pump();
    assert_eq!(a.broker.take_claims_first(), [(Str::from("x"), 5)]);
    assert_eq!(answered(&a, x3), None);
    let _ = a.broker.take_claims();
    a.broker.handle_claimed("x", true, now);
    a.pump();
    assert_eq!(answered(&a, x3), Some((ReasonCode::Success, true)));
    assert!(a.broker.take_claims().is_empty(), "claimed once, not again");
    assert_eq!(a.received(x3), ["held on a"]);
    // Resumed, it is no longer a given copy: a plain reconnection needs no claim.
    a.broker.handle_closed(x3, now);
    a.pump();
    let x4: ConnId = 62;
    a.broker
        .handle_admission(x4, Admission::Granted(Box::new(mover())), now);
    a.pump();
    assert_eq!(a.broker.take_fetches(), [Str::from("x")]);
    a.broker.handle_moved("x", None, Some(6), now);
    a.pump();
    assert!(a.broker.take_claims_first().is_empty());
    assert_eq!(answered(&a, x4), Some((ReasonCode::Success, true)));
    assert_eq!(a.broker.take_claims(), [Str::from("x")], "a plain claim");
}

/// A node applies each message of the cluster's stream once: a batch from its reader that
/// holds messages it applied before (its reader read part of the stream again: async-nats
/// remakes an ordered consumer that resets before its first message from the stream's
/// start) routes only those past the sequence it applied, whatever the batch's last one.
#[test]
fn a_stream_message_applied_before_is_not_routed_again() {
    let mut b = Sim::new(Settings {
        cluster: true,
        ..Settings::default()
    });
    let x = b.connect(mover());
    b.subscribe(x, "t/#", QoS::AtLeastOnce);
    let now = b.now;
    b.broker.handle_remote_durable(
        11,
        vec![
            streamed(10, "a", 1, false, "first"),
            streamed(11, "a", 2, false, "second"),
        ],
        now,
    );
    b.pump();
    assert_eq!(b.received(x), ["first", "second"]);
    // Read again from the start, with one new message at the end.
    b.broker.handle_remote_durable(
        12,
        vec![
            streamed(10, "a", 1, false, "first"),
            streamed(11, "a", 2, false, "second"),
            streamed(12, "a", 3, false, "third"),
        ],
        now,
    );
    b.pump();
    assert_eq!(b.received(x), ["first", "second", "third"]);
    assert_eq!(b.broker.cluster_applied(), 12);
}
