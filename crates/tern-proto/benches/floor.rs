//! The floor under `engine`'s QoS 1 round trip: only the data movement that handing
//! packets and events over as owned values requires, with none of the engine's logic (no
//! window, expiry, size, alias, journal or Receive Maximum checks). Run with
//! `cargo bench -p tern-proto --bench floor`.
//!
//! Each iteration does what one round trip must do at least: build the PUBLISH from the
//! stored message (two reference-count increments), keep the message in an id-keyed table,
//! queue the PUBLISH, take it out, build the delivered message and its event, queue a
//! PUBACK and the event, drop the delivered message (two decrements), take the PUBACK out,
//! remove the table entry and hand the message back in an `Acknowledged` event.
//!
//! - `floor/as_is`: a message laid out as `tern_proto::Message` (96 bytes: nothing of the
//!   caller's in it), the inflight record and the `Acknowledged` event carrying the
//!   session's message id;
//! - `floor/as_is_static_bytes`: the same with static topic and payload, whose clones and
//!   drops touch no reference count: the difference is the four atomic operations;
//! - `floor/before_side_maps`: the message as it was before the caller's bookkeeping moved
//!   to side maps (120 bytes: the shared group, the queue time and the client's tag in it);
//! - `floor/compact`: expiry, queue time and share key behind one pointer;
//! - `floor/compact_no_event_queue`: also handing events straight back to the caller
//!   instead of through a queue.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use tern_codec::properties::PublishProperties;
use tern_codec::{Ack, Packet, PacketId, Props, Publish, QoS, QosPid, ReasonCode, Str, TopicName};

/// The engine's id hasher: one multiply.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u16(&mut self, n: u16) {
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

fn topic_and_payload(shared: bool) -> (TopicName, Bytes) {
    if shared {
        let topic = TopicName::new("sensors/kitchen/temperature").expect("valid");
        (topic, Bytes::from(vec![0xA5; 64]))
    } else {
        let topic = Str::from_static("sensors/kitchen/temperature");
        (
            TopicName::new(topic).expect("valid"),
            Bytes::from_static(&[0xA5; 64]),
        )
    }
}

macro_rules! floor {
    ($c:expr, $name:expr, shared_bytes: $shared:expr, event_queue: $queue:expr,
     { $($field:ident : $ty:ty = $init:expr),* }) => {{
        #[allow(dead_code)]
        struct Message {
            topic: TopicName,
            payload: Bytes,
            qos: QoS,
            retain: bool,
            properties: Props<PublishProperties>,
            $($field: $ty),*
        }
        #[allow(dead_code)]
        enum Event {
            Message { message: Message, ack: Option<PacketId> },
            Acknowledged { id: PacketId, message_id: u64, message: Message, reason: ReasonCode },
            Control(Packet),
        }
        let (topic, payload) = topic_and_payload($shared);
        let mut message = Some(Message {
            topic,
            payload,
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Props::NONE,
            $($field: $init),*
        });
        let mut to_server: VecDeque<Packet> = VecDeque::new();
        let mut to_client: VecDeque<Packet> = VecDeque::new();
        let mut server_events: VecDeque<Event> = VecDeque::new();
        let mut client_events: VecDeque<Event> = VecDeque::new();
        // The inflight record: the message, its id in the session, when it entered, send order.
        let mut inflight: HashMap<PacketId, (Message, u64, Instant, u32), BuildHasherDefault<IdHasher>> =
            HashMap::default();
        let entered = Instant::now();
        let mut next_message: u64 = 0;
        let mut last_id: u16 = 0;
        let name = format!(
            "{} (message {} B, event {} B)",
            $name,
            std::mem::size_of::<Message>(),
            std::mem::size_of::<Event>()
        );
        $c.bench_function(&name, |b| {
            b.iter(|| {
                let m = message.take().expect("handed back");
                last_id = last_id.checked_add(1).unwrap_or(1);
                let id = PacketId::new(last_id).expect("non-zero");
                let publish = Publish {
                    dup: false,
                    qos_pid: QosPid::new(m.qos, id),
                    retain: m.retain,
                    topic: m.topic.clone(),
                    payload: m.payload.clone(),
                    properties: m.properties.clone(),
                };
                next_message += 1;
                inflight.insert(id, (m, next_message, entered, 0));
                to_server.push_back(Packet::Publish(publish));
                while let Some(packet) = to_server.pop_front() {
                    if let Packet::Publish(p) = black_box(packet) {
                        let id = p.qos_pid.packet_id().expect("QoS 1");
                        let delivered = Message {
                            topic: p.topic,
                            payload: p.payload,
                            qos: p.qos_pid.qos(),
                            retain: p.retain,
                            properties: p.properties,
                            $($field: $init),*
                        };
                        to_client.push_back(Packet::PubAck(Ack::new(id)));
                        let event = Event::Message { message: delivered, ack: None };
                        if $queue {
                            server_events.push_back(event);
                        } else {
                            black_box(event);
                        }
                    }
                }
                while let Some(event) = server_events.pop_front() {
                    black_box(event);
                }
                while let Some(packet) = to_client.pop_front() {
                    if let Packet::PubAck(a) = black_box(packet) {
                        if let Some((m, message_id, _, _)) = inflight.remove(&a.packet_id) {
                            let event = Event::Acknowledged {
                                id: a.packet_id,
                                message_id,
                                message: m,
                                reason: a.reason,
                            };
                            if $queue {
                                client_events.push_back(event);
                            } else if let Event::Acknowledged { message: m, .. } = black_box(event) {
                                message = Some(m);
                            }
                        }
                    }
                }
                while let Some(event) = client_events.pop_front() {
                    if let Event::Acknowledged { message: m, .. } = event {
                        message = Some(m);
                    }
                }
            })
        });
    }};
}

fn floors(c: &mut Criterion) {
    floor!(c, "floor/as_is", shared_bytes: true, event_queue: true, {
        expires_at: Option<Instant> = None
    });
    floor!(c, "floor/as_is_static_bytes", shared_bytes: false, event_queue: true, {
        expires_at: Option<Instant> = None
    });
    floor!(c, "floor/before_side_maps", shared_bytes: true, event_queue: true, {
        expires_at: Option<Instant> = None,
        shared: Option<Box<Str>> = None,
        queued_at: Option<Instant> = None,
        tag: u32 = 0
    });
    floor!(c, "floor/compact", shared_bytes: true, event_queue: true, {
        rare: Option<Box<(Option<Instant>, Option<Instant>, Option<Str>)>> = None
    });
    floor!(c, "floor/compact_no_event_queue", shared_bytes: true, event_queue: false, {
        rare: Option<Box<(Option<Instant>, Option<Instant>, Option<Str>)>> = None
    });
}

criterion_group!(floor_benches, floors);
criterion_main!(floor_benches);
