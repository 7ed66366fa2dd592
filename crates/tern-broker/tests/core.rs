//! The sans-IO broker core driven directly, with simulated time: offline-queue limits, the
//! 5.0 Will Delay Interval, and restarts on the same store.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

use std::num::NonZeroU16;
use std::time::{Duration, Instant, SystemTime};

use tern_broker::core::{Broker, ConnId, Output, QueuePolicy, Settings};
use tern_codec::properties::{ConnectProperties, WillProperties};
use tern_codec::{
    Connect, LastWill, Packet, Protocol, Publish, QoS, QosPid, Subscribe, Subscription,
    SubscriptionOptions, TopicFilter, TopicName,
};
use tern_store::MemoryStore;

struct Sim {
    broker: Broker,
    settings: Settings,
    now: Instant,
    /// The wall-clock time of `anchor.0`.
    anchor: (Instant, SystemTime),
    outputs: Vec<Output>,
    next: ConnId,
}

impl Sim {
    fn new(settings: Settings) -> Sim {
        let now = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        Sim {
            broker: Broker::new(settings.clone(), Box::new(MemoryStore::new()), now, wall).unwrap(),
            settings,
            now,
            anchor: (now, wall),
            outputs: vec![],
            next: 0,
        }
    }

    /// The broker process ends (every connection with it) and a new one starts on the
    /// same store `down_for` later. The new process's monotonic clock has nothing to do
    /// with the old one's, so only wall-clock deadlines can carry over.
    fn restart(&mut self, down_for: Duration) {
        let wall = self.anchor.1 + (self.now - self.anchor.0) + down_for;
        self.now += Duration::from_secs(100_000);
        let fresh = Broker::new(
            self.settings.clone(),
            Box::new(MemoryStore::new()),
            self.now,
            wall,
        )
        .unwrap();
        let store = std::mem::replace(&mut self.broker, fresh).into_store();
        self.broker = Broker::new(self.settings.clone(), store, self.now, wall).unwrap();
        self.anchor = (self.now, wall);
        self.outputs.clear();
    }

    fn stored(&self) -> tern_store::Snapshot {
        self.broker.store().load().unwrap()
    }

    fn pump(&mut self) {
        while let Some(o) = self.broker.poll_output() {
            self.outputs.push(o);
        }
    }

    fn connect(&mut self, connect: Connect) -> ConnId {
        self.next += 1;
        self.broker
            .handle_packet(self.next, Packet::Connect(Box::new(connect)), self.now);
        self.pump();
        self.next
    }

    fn send(&mut self, conn: ConnId, p: Packet) {
        self.broker.handle_packet(conn, p, self.now);
        self.pump();
    }

    fn close(&mut self, conn: ConnId) {
        self.broker.handle_closed(conn, self.now);
        self.pump();
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.broker.handle_timeout(self.now);
        self.pump();
    }

    fn subscribe(&mut self, conn: ConnId, filter: &str, qos: QoS) {
        let s = Subscribe {
            packet_id: NonZeroU16::new(1).unwrap(),
            subscriptions: vec![Subscription {
                filter: TopicFilter::new(filter).unwrap(),
                options: SubscriptionOptions {
                    qos,
                    ..Default::default()
                },
            }],
            properties: Default::default(),
        };
        self.send(conn, Packet::Subscribe(s));
    }

    fn publish(&mut self, conn: ConnId, topic: &str, payload: &str, id: u16) {
        let p = Publish::new(
            TopicName::new(topic).unwrap(),
            QosPid::AtLeastOnce(NonZeroU16::new(id).unwrap()),
            payload.to_string(),
        );
        self.send(conn, Packet::Publish(p));
    }

    /// The PUBLISH packets sent to `conn`, in order.
    fn publishes(&self, conn: ConnId) -> Vec<Publish> {
        self.outputs
            .iter()
            .filter_map(|o| match o {
                Output::Send(c, Packet::Publish(p)) if *c == conn => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    /// Payloads of the PUBLISH packets sent to `conn`, in order.
    fn received(&self, conn: ConnId) -> Vec<String> {
        self.publishes(conn)
            .iter()
            .map(|p| String::from_utf8(p.payload.to_vec()).unwrap())
            .collect()
    }

    /// Connects `connect`, subscribes it to `filter` and disconnects it: a persistent
    /// session waiting offline.
    fn offline_subscriber(&mut self, connect: Connect, filter: &str, qos: QoS) {
        let c = self.connect(connect);
        self.subscribe(c, filter, qos);
        self.close(c);
    }
}

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
    (sim.received(a2), sim.broker.dropped_count())
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
    assert_eq!(
        sim.broker.session_count(),
        1,
        "only the watcher's session is left"
    );
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
    assert_eq!(sim.broker.session_count(), 2);
    sim.advance(30 * S);
    assert_eq!(sim.broker.session_count(), 1, "the session expired");
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

#[test]
fn expired_messages_make_room_in_a_full_offline_queue_before_live_ones_are_dropped() {
    let mut sim = Sim::new(Settings {
        max_queued_messages: 2,
        ..Settings::default()
    });
    sim.offline_subscriber(v5_persistent("a", 3600), "t", QoS::AtLeastOnce);
    let b = sim.connect(Connect::new(Protocol::V5, "b"));
    sim.send(b, expiring("t", "short", 1, 1, false));
    sim.publish(b, "t", "live", 2);
    sim.advance(2 * S);
    sim.publish(b, "t", "new", 3);
    assert_eq!(sim.broker.dropped_count(), 0, "no live message dropped");
    assert_eq!(sim.broker.dropped_expired(), 1);
    assert_eq!(sim.stored().sessions["a"].delivery.queued_len(), 2);
    let a = sim.connect(v5_persistent("a", 3600));
    assert_eq!(sim.received(a), ["live", "new"]);
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
    assert_eq!(sim.broker.retained_count(), 1);
    assert_eq!(sim.stored().retained.len(), 1);
}
