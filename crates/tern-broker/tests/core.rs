//! The sans-IO broker core driven directly, with simulated time: offline-queue limits and
//! the 5.0 Will Delay Interval.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

use std::num::NonZeroU16;
use std::time::{Duration, Instant};

use tern_broker::core::{Broker, ConnId, Output, QueuePolicy, Settings};
use tern_codec::properties::{ConnectProperties, WillProperties};
use tern_codec::{
    Connect, LastWill, Packet, Protocol, Publish, QoS, QosPid, Subscribe, Subscription,
    SubscriptionOptions, TopicFilter, TopicName,
};

struct Sim {
    broker: Broker,
    now: Instant,
    outputs: Vec<Output>,
    next: ConnId,
}

impl Sim {
    fn new(settings: Settings) -> Sim {
        Sim {
            broker: Broker::new(settings),
            now: Instant::now(),
            outputs: vec![],
            next: 0,
        }
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

    /// Payloads of the PUBLISH packets sent to `conn`, in order.
    fn received(&self, conn: ConnId) -> Vec<String> {
        self.outputs
            .iter()
            .filter_map(|o| match o {
                Output::Send(c, Packet::Publish(p)) if *c == conn => {
                    Some(String::from_utf8(p.payload.to_vec()).unwrap())
                }
                _ => None,
            })
            .collect()
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
    let a = sim.connect(persistent("a"));
    sim.subscribe(a, "t", QoS::AtLeastOnce);
    sim.close(a);
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
