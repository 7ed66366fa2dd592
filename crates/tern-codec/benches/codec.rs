//! Codec benchmarks: PUBLISH decode and encode (64 B and 4 KiB payloads, QoS 0 and 1,
//! MQTT 3.1.1 and 5.0 with a few properties) and CONNECT. Run with
//! `cargo bench -p tern-codec --bench codec`; per-packet times are the reported time for
//! encode, and time / 1000 (or 1 / throughput) for decode, which decodes 1000 packets from
//! one read buffer the way a connection does.

use std::hint::black_box;
use std::num::NonZeroU16;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tern_codec::{
    Connect, LastWill, MAX_PACKET_SIZE, Packet, Protocol, Publish, QoS, QosPid, TopicName, decode,
    encode,
};

const BATCH: usize = 1000;

fn publish(v: Protocol, qos: QoS, payload: usize) -> Packet {
    let id = NonZeroU16::new(42).expect("non-zero");
    let mut p = Publish::new(
        TopicName::new("sensors/kitchen/temperature").expect("valid topic"),
        QosPid::new(qos, id),
        Bytes::from(vec![0xA5; payload]),
    );
    if v.is_v5() {
        p.properties.message_expiry_interval = Some(3600);
        p.properties.content_type = Some("application/json".into());
        p.properties.payload_format_indicator = Some(tern_codec::PayloadFormat::Utf8);
    }
    Packet::Publish(p)
}

fn connect() -> Packet {
    let mut c = Connect::new(Protocol::V5, "device-0042");
    c.username = Some("device".into());
    c.password = Some(Bytes::from_static(b"secret"));
    c.properties.session_expiry_interval = Some(3600);
    c.will = Some(LastWill {
        topic: TopicName::new("devices/0042/status").expect("valid topic"),
        payload: Bytes::from_static(b"offline"),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: Default::default(),
    });
    Packet::Connect(Box::new(c))
}

fn wire(packet: &Packet, v: Protocol, n: usize) -> BytesMut {
    let mut buf = BytesMut::new();
    for _ in 0..n {
        encode(packet, v, &mut buf).expect("encodes");
    }
    buf
}

fn bench_case(c: &mut Criterion, name: &str, packet: &Packet, v: Protocol) {
    let mut group = c.benchmark_group(name);
    let one = wire(packet, v, 1);
    let mut out = BytesMut::with_capacity(one.len());
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            encode(black_box(packet), v, &mut out).expect("encodes");
            black_box(&out);
        })
    });
    let batch = wire(packet, v, BATCH);
    group.throughput(Throughput::Elements(BATCH as u64));
    // The decoded packets are returned, so criterion drops them after the timed section:
    // this times decoding, not the consumer's eventual release of the buffers.
    group.bench_function("decode_x1000", |b| {
        b.iter_batched(
            || (batch.clone(), Vec::with_capacity(BATCH)),
            |(mut buf, mut out)| {
                while let Some(p) = decode(&mut buf, v, MAX_PACKET_SIZE).expect("decodes") {
                    out.push(p);
                }
                out
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// The floor under any zero-copy decode: split one packet off the read buffer, freeze it,
/// slice a topic and a payload out of it. No parsing or validation.
fn bytes_floor(c: &mut Criterion) {
    let packet = publish(Protocol::V3_1_1, QoS::AtLeastOnce, 64);
    let batch = wire(&packet, Protocol::V3_1_1, BATCH);
    let len = batch.len() / BATCH;
    let mut group = c.benchmark_group("bytes_floor_64B");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("split_freeze_slice_x1000", |b| {
        b.iter_batched(
            || (batch.clone(), Vec::with_capacity(BATCH)),
            |(mut buf, mut out)| {
                while buf.len() >= len {
                    let mut frame = buf.split_to(len).freeze();
                    let topic = frame.split_to(29);
                    out.push((topic, frame));
                }
                out
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    bytes_floor(c);
    for (v, tag) in [(Protocol::V3_1_1, "v311"), (Protocol::V5, "v5")] {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
            for (size, size_tag) in [(64, "64B"), (4096, "4KiB")] {
                let name = format!("publish_{tag}_qos{}_{size_tag}", qos as u8);
                bench_case(c, &name, &publish(v, qos, size), v);
            }
        }
    }
    bench_case(c, "connect_v5", &connect(), Protocol::V5);
}

criterion_group!(codec, benches);
criterion_main!(codec);
