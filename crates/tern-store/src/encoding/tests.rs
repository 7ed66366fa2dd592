//! Old layouts still read, and log records read back as written.

#![allow(clippy::unwrap_used)]

use super::batch::CHANGE_LEGACY;
use super::*;
use tern_codec::TopicName;

fn anchor() -> Anchor {
    Anchor {
        instant: Instant::now(),
        wall: SystemTime::now(),
    }
}

/// A message body as stores written before message ids hold it: the shared tag and
/// the queue time of the copy that wrote it.
fn old_body(m: &Message, shared: &str, queued_at: Instant, anchor: Anchor) -> Vec<u8> {
    let one = PacketId::new(1).unwrap();
    let p = Publish::new(m.topic.clone(), QosPid::new(m.qos, one), m.payload.clone());
    let mut wire = BytesMut::new();
    tern_codec::encode(&Packet::Publish(p), Protocol::V5, &mut wire).unwrap();
    let mut w = Writer::new();
    w.bytes(&wire);
    w.opt_time(None);
    shared_tag(&mut w, Some(&Str::from(shared)));
    w.time(anchor.to_wall(queued_at));
    w.finish()
}

#[test]
fn a_copy_stored_before_message_ids_reads_back_with_its_queue_time_and_shared_tag() {
    let anchor = anchor();
    let m = Message::new(TopicName::new("t").unwrap(), "job", QoS::AtLeastOnce);
    let queued_at = anchor.instant - Duration::from_secs(30);
    let body = read_body(&old_body(&m, "$share/g/t", queued_at, anchor), anchor).unwrap();
    // The old reference ends after its shared tag.
    let mut w = Writer::new();
    w.u64(7);
    w.u8(1);
    w.u8(0);
    w.u32(0);
    shared_tag(&mut w, Some(&Str::from("$share/g/t")));
    let (key, copy) = read_reference(&w.finish()).unwrap();
    assert_eq!(key, 7);
    assert_eq!(copy.id, None, "no id: the loader numbers it");
    assert_eq!(copy.shared.as_deref(), Some("$share/g/t"));
    let (message, since) = copy.of(&body, anchor, anchor.instant);
    assert_eq!(message, m);
    assert_eq!(since, queued_at, "the old body's queue time");
}

#[test]
fn a_log_written_before_message_ids_replays_with_fresh_ids_and_its_shared_tags() {
    let anchor = anchor();
    let m = Message::new(TopicName::new("t").unwrap(), "job", QoS::AtLeastOnce);
    let queued_at = anchor.instant - Duration::from_secs(5);
    let mut w = Writer::new();
    for _ in 0..2 {
        w.u8(CHANGE_LEGACY);
        w.bytes(b"c");
        w.u8(0); // Queued
        w.bytes(&old_body(&m, "$share/g/t", queued_at, anchor));
    }
    let ops = read_batch(&w.finish(), anchor).unwrap();
    let entries: Vec<(MessageId, Instant, Option<Str>)> = ops
        .into_iter()
        .map(|op| match op {
            crate::Op::Change {
                change: tern_proto::Change::Queued(e),
                shared,
                ..
            } => (e.id, e.since, shared),
            other => panic!("{other:?}"),
        })
        .collect();
    let first = MessageId::new((1 << 62) + 1).unwrap();
    let second = MessageId::new((1 << 62) + 2).unwrap();
    let tag = Some(Str::from("$share/g/t"));
    assert_eq!(
        entries,
        [(first, queued_at, tag.clone()), (second, queued_at, tag)]
    );
}

#[test]
fn a_logged_entry_reads_back_as_written() {
    let anchor = anchor();
    let e = Entry {
        id: MessageId::new(42).unwrap(),
        since: anchor.instant + Duration::from_millis(1500),
        message: Message::new(TopicName::new("t").unwrap(), "x", QoS::ExactlyOnce),
    };
    let op = crate::Op::Change {
        client_id: "c".into(),
        change: tern_proto::Change::Sent(PacketId::new(3).unwrap(), e),
        shared: Some("$share/g/t".into()),
    };
    let back = read_batch(&batch(std::slice::from_ref(&op), anchor).unwrap(), anchor).unwrap();
    assert_eq!(back, [op]);
}
