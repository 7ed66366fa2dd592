//! Claims about the store contract, checked on [`MemoryStore`]. Each claim takes a
//! constructor so the durable backend can be held to the same ones.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use tern_codec::{QoS, Str, SubscriptionOptions, TopicFilter, TopicName};
use tern_store::{
    Change, Entry, MemoryStore, Message, MessageId, Op, SessionRecord, SessionState, Store,
    StoreError, Subscription,
};

/// One instant for every entry, so stores opened at any anchor read it back exactly.
fn start() -> std::time::Instant {
    anchor().0
}

/// `m` as a session holds it, with an id no other entry in this process has (a session's
/// ids are unique).
fn entry(m: Message) -> Entry {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1 << 40);
    Entry {
        id: MessageId::new(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)).unwrap(),
        since: start(),
        message: m,
    }
}

/// `m` as a session puts it back in front of its queue: numbered below every message
/// [`entry`] numbers and every earlier one put back (a session's ids grow in queue order).
fn front_entry(m: Message) -> Entry {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new((1 << 40) - 1);
    Entry {
        id: MessageId::new(NEXT.fetch_sub(1, std::sync::atomic::Ordering::Relaxed)).unwrap(),
        since: start(),
        message: m,
    }
}

fn message(topic: &str, payload: &str) -> Message {
    Message::new(
        TopicName::new(topic).unwrap(),
        payload.to_string(),
        QoS::AtLeastOnce,
    )
}

fn record(expiry: u64) -> SessionRecord {
    SessionRecord {
        expiry: Duration::from_secs(expiry),
        expires_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(expiry)),
        subscriptions: vec![Subscription {
            filter: TopicFilter::new("a/#").unwrap(),
            options: SubscriptionOptions::default(),
            id: None,
        }],
        pending_will: None,
        username: expiry.is_multiple_of(2).then(|| "alice".into()),
        // Both with and without a username before it.
        fed: expiry.is_multiple_of(3).then(|| tern_store::Fed {
            after: expiry * 10,
            from: "node-b".into(),
            through: expiry,
        }),
    }
}

fn put(id: &str, expiry: u64) -> Op {
    Op::PutSession {
        client_id: id.into(),
        record: record(expiry),
    }
}

fn change(id: &str, change: Change) -> Op {
    Op::Change {
        client_id: id.into(),
        change,
        shared: None,
    }
}

fn enqueue(id: &str, payload: &str) -> Op {
    change(id, Change::Queued(entry(message("a/b", payload))))
}

fn queued(store: &dyn Store, id: &str) -> Vec<String> {
    let snapshot = store.load().unwrap();
    snapshot.sessions[&Str::from(id)]
        .delivery
        .queued()
        .map(|e| String::from_utf8(e.message.payload.to_vec()).unwrap())
        .collect()
}

fn load_returns_what_was_committed(store: &mut dyn Store) {
    store.commit(&[put("a", 10), enqueue("a", "1")]).unwrap();
    store
        .commit(&[
            enqueue("a", "2"),
            Op::PutRetained {
                message: message("r", "kept"),
            },
        ])
        .unwrap();
    let s = store.load().unwrap();
    assert_eq!(s.sessions[&Str::from("a")].record, record(10));
    assert_eq!(queued(store, "a"), ["1", "2"]);
    assert_eq!(s.retained.len(), 1);
}

fn a_batch_naming_a_missing_session_changes_nothing(store: &mut dyn Store) {
    store.commit(&[put("a", 10)]).unwrap();
    let before = store.load().unwrap();
    let err = store
        .commit(&[
            enqueue("a", "1"),
            Op::PutRetained {
                message: message("r", "x"),
            },
            enqueue("ghost", "2"),
        ])
        .unwrap_err();
    assert!(matches!(err, StoreError::NoSuchSession { index: 2, .. }));
    assert_eq!(store.load().unwrap(), before);
}

fn a_session_created_earlier_in_the_batch_can_be_used_and_a_deleted_one_cannot(
    store: &mut dyn Store,
) {
    store.commit(&[put("a", 10), enqueue("a", "1")]).unwrap();
    assert!(
        store
            .commit(&[
                Op::DeleteSession {
                    client_id: "a".into()
                },
                enqueue("a", "2")
            ])
            .is_err()
    );
    assert_eq!(queued(store, "a"), ["1"]);
}

fn deleting_a_session_drops_its_queue(store: &mut dyn Store) {
    store.commit(&[put("a", 10), enqueue("a", "1")]).unwrap();
    store
        .commit(&[
            Op::DeleteSession {
                client_id: "a".into(),
            },
            put("a", 5),
        ])
        .unwrap();
    assert!(queued(store, "a").is_empty());
    // Deleting what is not there is fine: clean start deletes whatever there was.
    store
        .commit(&[Op::DeleteSession {
            client_id: "nobody".into(),
        }])
        .unwrap();
}

fn dequeue_oldest_and_put_delivery(store: &mut dyn Store) {
    store
        .commit(&[put("a", 10), enqueue("a", "1"), enqueue("a", "2")])
        .unwrap();
    store.commit(&[change("a", Change::Unqueued)]).unwrap();
    assert_eq!(queued(store, "a"), ["2"]);
    store
        .commit(&[Op::PutDelivery {
            client_id: "a".into(),
            state: SessionState::new(),
            shared: Default::default(),
        }])
        .unwrap();
    assert!(queued(store, "a").is_empty());
    // Replacing the record keeps the delivery state.
    store.commit(&[enqueue("a", "3"), put("a", 99)]).unwrap();
    assert_eq!(queued(store, "a"), ["3"]);
}

fn payloads(v: &[(Entry, Option<Str>)]) -> Vec<String> {
    v.iter()
        .map(|(e, _)| String::from_utf8(e.message.payload.to_vec()).unwrap())
        .collect()
}

fn queues_are_read_back_in_parts_and_counted_without_reading(store: &mut dyn Store) {
    let entries: Vec<Entry> = ["1", "2", "3", "4", "5"]
        .iter()
        .map(|p| entry(message("a/b", p)))
        .collect();
    let mut batch = vec![put("a", 10), put("b", 10)];
    for e in &entries {
        batch.push(Op::Change {
            client_id: "a".into(),
            change: Change::Queued(e.clone()),
            shared: (e.message.payload == "4").then(|| "$share/g/a/#".into()),
        });
    }
    store.commit(&batch).unwrap();
    let none = MessageId::new(1).unwrap();
    let first = store.read_queue("a", none, 2).unwrap();
    assert_eq!(payloads(&first), ["1", "2"]);
    assert_eq!(
        first[0].0, entries[0],
        "read back whole: id, time and message"
    );
    let rest = store.read_queue("a", first[1].0.id, 10).unwrap();
    assert_eq!(payloads(&rest), ["3", "4", "5"]);
    assert_eq!(
        rest[1].1.as_deref(),
        Some("$share/g/a/#"),
        "with its shared group"
    );
    assert!(store.read_queue("b", none, 10).unwrap().is_empty());
    assert!(store.read_queue("nobody", none, 10).unwrap().is_empty());
    // Taken from the middle (expired, or gone to another member), and the front sent.
    store
        .commit(&[
            change("a", Change::Removed(entries[2].id)),
            change("a", Change::Unqueued),
        ])
        .unwrap();
    assert_eq!(
        payloads(&store.read_queue("a", none, 10).unwrap()),
        ["2", "4", "5"]
    );
    assert_eq!(queued(store, "a"), ["2", "4", "5"]);
    // Counted, not read: the queue waits in the store, ids go on above it.
    let spilled = store.load_spilled().unwrap();
    let a = &spilled.sessions[&Str::from("a")];
    assert_eq!(a.delivery.queued().count(), 0);
    assert_eq!(a.delivery.spilled_len(), 3);
    assert_eq!((a.delivery.queued_len(), a.delivery.queued_bytes()), (3, 3));
    assert!(
        a.shared.is_empty(),
        "the side map of what is spilled stays in the store"
    );
    let mut d = a.delivery.clone();
    let next = d.enqueue(message("a/b", "6"), start());
    assert!(
        next > entries[4].id,
        "{next} numbered above the stored queue"
    );
    assert_eq!(spilled.sessions[&Str::from("b")].delivery.queued_len(), 0);
}

fn retained_set_replaced_cleared(store: &mut dyn Store) {
    store
        .commit(&[Op::PutRetained {
            message: message("r", "1"),
        }])
        .unwrap();
    store
        .commit(&[Op::PutRetained {
            message: message("r", "2"),
        }])
        .unwrap();
    let r = TopicName::new("r").unwrap();
    assert_eq!(store.load().unwrap().retained[&r].payload, "2");
    store
        .commit(&[Op::DeleteRetained { topic: r.clone() }])
        .unwrap();
    assert!(store.load().unwrap().retained.is_empty());
}

macro_rules! claims {
    ($make:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let mut store = $make;
                super::$name(&mut store);
            }
        )*
    };
}

/// A fresh file in the system temp directory, removed when dropped.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new() -> TempFile {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        TempFile(std::env::temp_dir().join(format!("tern-store-{}-{n}.redb", std::process::id())))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_file(self.0.with_extension("wal"));
    }
}

/// The process's instant and wall time of one moment: every store a test opens uses the
/// same pair, as one broker process does, so instants read back are the instants written.
fn anchor() -> (std::time::Instant, SystemTime) {
    static ANCHOR: std::sync::OnceLock<(std::time::Instant, SystemTime)> =
        std::sync::OnceLock::new();
    *ANCHOR.get_or_init(|| (std::time::Instant::now(), SystemTime::now()))
}

/// A redb store that keeps its file alive as long as it lives.
struct Redb(tern_store::RedbStore, #[allow(dead_code)] TempFile);

impl Store for Redb {
    fn commit(&mut self, batch: &[Op]) -> Result<tern_store::Committed, StoreError> {
        self.0.commit(batch)
    }
    fn load(&self) -> Result<tern_store::Snapshot, StoreError> {
        self.0.load()
    }
    fn load_spilled(&self) -> Result<tern_store::Snapshot, StoreError> {
        self.0.load_spilled()
    }
    fn read_queue(
        &self,
        client_id: &str,
        after: MessageId,
        max: usize,
    ) -> Result<Vec<(Entry, Option<Str>)>, StoreError> {
        self.0.read_queue(client_id, after, max)
    }
    fn read_history(
        &self,
        read: &tern_store::HistoryRead,
    ) -> Result<Vec<tern_store::HistoryMessage>, StoreError> {
        self.0.read_history(read)
    }
}

/// A cluster node gives a session to another: the reader beside the writer reads that one
/// session whole (queue, flights, inbound ids, shared side map) with the cluster positions
/// of the same commit, and it crosses to another process as bytes unchanged.
#[test]
fn one_session_is_read_whole_for_another_node_and_crosses_as_bytes() {
    let mut store = redb();
    let pid = |n| tern_codec::PacketId::new(n).unwrap();
    let mut batch = vec![put("a", 10), put("b", 11), enqueue("b", "b1")];
    for p in ["1", "2", "3"] {
        batch.push(Op::Change {
            client_id: "a".into(),
            change: Change::Queued(entry(message("a/b", p))),
            shared: (p == "2").then(|| "$share/g/a/#".into()),
        });
    }
    batch.push(change("a", Change::Launched(pid(7))));
    batch.push(change("a", Change::Released(pid(7))));
    batch.push(change(
        "a",
        Change::Inbound(pid(9), tern_proto::InboundState::Received),
    ));
    batch.push(Op::ClusterApplied(41));
    batch.push(Op::ClusterForwarded(5));
    store.commit(&batch).unwrap();
    let reader = store.0.reader().unwrap();
    let loaded = store.load().unwrap().sessions[&Str::from("a")].clone();
    let e = reader.export_session("a").unwrap().unwrap();
    assert_eq!(e.client_id, "a");
    assert_eq!((e.cluster_applied, e.cluster_forwarded), (41, 5));
    assert_eq!(e.session, loaded, "the session as a whole load has it");
    assert_eq!(e.session.delivery.inflight_len(), 1);
    assert_eq!(e.session.delivery.queued_len(), 2);
    assert_eq!(e.session.shared.len(), 1, "with its shared side map");
    assert!(reader.export_session("nobody").unwrap().is_none());
    let (now, wall) = anchor();
    let bytes = e.encode(now, wall).unwrap();
    let back = tern_store::Exported::decode(&bytes, now, wall).unwrap();
    assert_eq!(back.client_id, "a");
    assert_eq!(back.session, e.session, "read back as written");
    assert!(tern_store::Exported::decode(&bytes[..bytes.len() / 2], now, wall).is_err());
    // Put in another store, it is that session there.
    let mut other = redb();
    other
        .commit(&[
            Op::PutSession {
                client_id: "a".into(),
                record: back.session.record.clone(),
            },
            Op::PutDelivery {
                client_id: "a".into(),
                state: back.session.delivery.clone(),
                shared: back.session.shared.clone(),
            },
        ])
        .unwrap();
    assert_eq!(other.load().unwrap().sessions[&Str::from("a")], loaded);
}

fn redb() -> Redb {
    let f = TempFile::new();
    let (now, wall) = anchor();
    Redb(tern_store::RedbStore::open(&f.0, now, wall).unwrap(), f)
}

/// Every claim above, for one backend.
macro_rules! every_claim {
    ($make:expr) => {
        claims!($make;
            load_returns_what_was_committed,
            a_batch_naming_a_missing_session_changes_nothing,
            a_session_created_earlier_in_the_batch_can_be_used_and_a_deleted_one_cannot,
            deleting_a_session_drops_its_queue,
            dequeue_oldest_and_put_delivery,
            retained_set_replaced_cleared,
            queues_are_read_back_in_parts_and_counted_without_reading,
        );
    };
}

mod redb_backend {
    every_claim!(super::redb());
}

mod memory {
    use tern_store::MemoryStore;
    every_claim!(MemoryStore::new());
}

fn arb_op() -> impl Strategy<Value = Op> {
    let id = prop::sample::select(vec!["a", "b", "c"]);
    prop_oneof![
        (id.clone(), 1u64..100).prop_map(|(i, e)| put(i, e)),
        id.clone().prop_map(|i| Op::DeleteSession {
            client_id: i.into()
        }),
        (id.clone(), "[a-z]{0,3}").prop_map(|(i, p)| enqueue(i, &p)),
        id.prop_map(|i| change(i, Change::Unqueued)),
        "[a-z]{1,3}".prop_map(|p| Op::PutRetained {
            message: message("r", &p)
        }),
        Just(Op::DeleteRetained {
            topic: TopicName::new("r").unwrap()
        }),
    ]
}

proptest! {
    /// Committing ops one at a time (keeping the accepted ones) and committing the accepted
    /// ones as one batch give the same state: batching never changes what a commit means.
    #[test]
    fn one_batch_equals_the_same_ops_one_by_one(ops in prop::collection::vec(arb_op(), 0..40)) {
        let mut one_by_one = MemoryStore::new();
        let mut accepted = vec![];
        for op in ops {
            if one_by_one.commit(std::slice::from_ref(&op)).is_ok() {
                accepted.push(op);
            }
        }
        let mut batched = MemoryStore::new();
        batched.commit(&accepted).unwrap();
        prop_assert_eq!(batched.load().unwrap(), one_by_one.load().unwrap());
    }
}

/// Every kind of [`Change`], on a few packet ids so they meet each other.
fn arb_change() -> impl Strategy<Value = Change> {
    let pid = (1u16..4).prop_map(|n| tern_codec::PacketId::new(n).unwrap());
    // Payloads from a fixed set of static buffers: equal messages share their bytes, as
    // the copies of one fan-out do, so the store stores them once.
    let msg = (
        prop::sample::select(vec![&b""[..], b"x", b"yy", b"zzz"]),
        any::<bool>(),
    )
        .prop_map(|(p, two)| {
            let mut m = Message::new(
                TopicName::new("t/c").unwrap(),
                bytes::Bytes::from_static(p),
                QoS::AtLeastOnce,
            );
            if two {
                m.qos = QoS::ExactlyOnce;
            }
            m
        });
    let msg = msg.prop_map(entry);
    prop_oneof![
        msg.clone().prop_map(Change::Queued),
        Just(Change::Unqueued),
        msg.clone()
            .prop_map(|e| Change::Requeued(front_entry(e.message))),
        (pid.clone(), msg).prop_map(|(i, e)| Change::Sent(i, e)),
        pid.clone().prop_map(Change::Launched),
        pid.clone().prop_map(Change::Released),
        pid.clone().prop_map(Change::Completed),
        (pid.clone(), any::<bool>()).prop_map(|(i, r)| Change::Inbound(
            i,
            if r {
                tern_proto::InboundState::Received
            } else {
                tern_proto::InboundState::Delivered
            }
        )),
        pid.prop_map(Change::InboundDone),
    ]
}

fn arb_rich_op() -> impl Strategy<Value = Op> {
    // Messages with properties, expiry, a shared tag; records with subscriptions and a
    // delayed will; delivery states with flows in every state.
    let id = prop::sample::select(vec!["a", "b"]);
    prop_oneof![
        3 => arb_op(),
        1 => (id.clone(), any::<bool>(), 0u32..100).prop_map(|(i, put, delay)| if put {
            Op::PutWill {
                client_id: i.into(),
                will: tern_codec::LastWill {
                    topic: TopicName::new("wills/x").unwrap(),
                    payload: format!("bye {delay}").into(),
                    qos: QoS::AtLeastOnce,
                    retain: delay % 2 == 0,
                    properties: tern_codec::properties::WillProperties {
                        will_delay_interval: Some(delay),
                        user_properties: vec![("k".into(), "v".into())],
                        ..Default::default()
                    }
                    .into(),
                },
            }
        } else {
            Op::DeleteWill { client_id: i.into() }
        }),
        // Idempotency keys: a few identities and slots, so puts replace and deletes hit;
        // deadlines in whole milliseconds (what the file keeps).
        1 => (id.clone(), 0u32..3, any::<bool>(), 0u64..5).prop_map(|(i, slot, put, k)| {
            let identity = format!("user:{i}").into();
            if put {
                Op::PutKey {
                    identity,
                    slot,
                    key: format!("key-{k}").into(),
                    expires: SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_000 + k),
                }
            } else {
                Op::DeleteKey { identity, slot }
            }
        }),
        // A cluster node's progress through the stream.
        1 => (0u64..1000).prop_map(Op::ClusterApplied),
        1 => (0u64..1000).prop_map(Op::ClusterForwarded),
        // Topic histories: two policies, positions that repeat (a put replaces), trims;
        // times in whole milliseconds (what the file keeps).
        1 => (0u64..8, any::<bool>(), 0usize..2).prop_map(|(seq, put, p)| {
            let policy: Str = ["h/#", "x/+"][p].into();
            if put {
                Op::PutHistory {
                    policy,
                    seq,
                    at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_000 + seq),
                    message: message(["h/a", "x/b"][p], &format!("m{seq}")),
                }
            } else {
                Op::TrimHistory { policy, through: seq }
            }
        }),
        4 => (id.clone(), arb_change(), any::<bool>()).prop_map(|(i, c, shared)| Op::Change {
            client_id: i.into(),
            change: c,
            shared: shared.then(|| "$share/g/t/c".into()),
        }),
        1 => (id.clone(), 1u64..1000, any::<bool>()).prop_map(|(i, e, will)| {
            let mut r = record(e);
            r.subscriptions.push(Subscription {
                filter: TopicFilter::new("$share/g/x/+").unwrap(),
                options: SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    no_local: false,
                    retain_as_published: true,
                    retain_handling: tern_codec::RetainHandling::SendIfNew,
                },
                id: tern_codec::SubscriptionId::new(e as u32),
            });
            if will {
                r.pending_will = Some(tern_store::PendingWill {
                    at: SystemTime::UNIX_EPOCH + Duration::new(1_800_000_000, 123),
                    will: tern_codec::LastWill {
                        topic: TopicName::new("wills/x").unwrap(),
                        payload: "bye".into(),
                        qos: QoS::AtLeastOnce,
                        retain: true,
                        properties: tern_codec::properties::WillProperties {
                            will_delay_interval: Some(30),
                            content_type: Some("text/plain".into()),
                            ..Default::default()
                        }
                        .into(),
                    },
                });
            }
            Op::PutSession { client_id: i.into(), record: r }
        }),
        1 => (id.clone(), 1u16..5, "[a-z]{0,4}").prop_map(|(i, n, p)| {
            let mut shared = std::collections::BTreeMap::new();
            let flows: Vec<_> = (1..=n).map(|k| {
                let mut m = message("t/x", &p);
                m.qos = if k % 2 == 0 { QoS::ExactlyOnce } else { QoS::AtLeastOnce };
                m.properties.user_properties.push(("k".into(), format!("{k}").into()));
                m.expires_at = Some(std::time::Instant::now() + Duration::from_secs(u64::from(k) * 10));
                let e = entry(m);
                if k == 1 {
                    shared.insert(e.id, "$share/g/t/x".into());
                }
                let state = if k == 2 {
                    tern_proto::OutboundState::Released
                } else {
                    tern_proto::OutboundState::Published
                };
                (tern_codec::PacketId::new(k).unwrap(), e, state)
            }).collect();
            let inbound = [(tern_codec::PacketId::new(7).unwrap(), tern_proto::InboundState::Received)];
            let queue = [entry(message("t/q", "waiting"))];
            Op::PutDelivery {
                client_id: i.into(),
                state: SessionState::restore(n, flows, queue, inbound),
                shared,
            }
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// The durable store agrees with the reference model on every batch (accepted or
    /// refused), and a reopened file holds exactly the last committed state.
    #[test]
    fn redb_agrees_with_the_memory_model_and_reopens_to_the_last_commit(
        batches in prop::collection::vec(prop::collection::vec(arb_rich_op(), 1..6), 1..12)
    ) {
        let file = TempFile::new();
        let (now, wall) = anchor();
        let mut model = MemoryStore::new();
        {
            let mut real = tern_store::RedbStore::open(&file.0, now, wall).unwrap();
            for batch in &batches {
                let a = model.commit(batch).is_ok();
                let b = real.commit(batch).is_ok();
                prop_assert_eq!(a, b, "accepted by one store and not the other: {:?}", batch);
                let snapshot = model.load().unwrap();
                prop_assert_eq!(real.load().unwrap(), snapshot.clone());
                // Counted without reading, and read back in parts, the same.
                prop_assert_eq!(real.load_spilled().unwrap(), model.load_spilled().unwrap());
                for id in snapshot.sessions.keys() {
                    let mut after = MessageId::new(1).unwrap();
                    let mut read = Vec::new();
                    loop {
                        let part = real.read_queue(id, after, 2).unwrap();
                        let Some(last) = part.last() else { break };
                        after = last.0.id;
                        read.extend(part);
                    }
                    prop_assert_eq!(read, model.read_queue(id, MessageId::new(1).unwrap(), usize::MAX).unwrap());
                }
                for read in [
                    tern_store::HistoryRead {
                        policies: vec!["h/#".into(), "x/+".into()],
                        filter: "#".into(),
                        from: 0,
                        through: u64::MAX,
                        since: None,
                        max: usize::MAX,
                    },
                    tern_store::HistoryRead {
                        policies: vec!["h/#".into(), "x/+".into()],
                        filter: "h/+".into(),
                        from: 2,
                        through: 6,
                        since: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_003)),
                        max: 2,
                    },
                ] {
                    prop_assert_eq!(real.read_history(&read).unwrap(), model.read_history(&read).unwrap());
                }
                let copies: usize = snapshot
                    .sessions
                    .values()
                    .map(|s| s.delivery.queued_len() + s.delivery.inflight_len())
                    .sum();
                let bodies = real.stored_messages().unwrap() as usize;
                prop_assert!(bodies <= copies, "{} bodies for {} copies", bodies, copies);
            }
        }
        let reopened = tern_store::RedbStore::open(&file.0, now, wall).unwrap();
        prop_assert_eq!(reopened.load().unwrap(), model.load().unwrap());
    }
}

#[test]
fn a_file_that_is_not_a_store_is_refused_not_replaced() {
    let f = TempFile::new();
    std::fs::write(
        &f.0,
        b"this is not a redb file, and it holds someone's data",
    )
    .unwrap();
    let (now, wall) = anchor();
    let err = tern_store::RedbStore::open(&f.0, now, wall).unwrap_err();
    assert!(matches!(err, StoreError::Backend(_)), "{err}");
    assert_eq!(
        std::fs::read(&f.0).unwrap(),
        b"this is not a redb file, and it holds someone's data",
        "left as it was"
    );
}

#[test]
fn a_message_fanned_out_to_many_sessions_is_stored_once_and_goes_with_its_last_copy() {
    let file = TempFile::new();
    let (now, wall) = anchor();
    let mut store = tern_store::RedbStore::open(&file.0, now, wall).unwrap();
    let m = message("a/b", "shared payload");
    let mut batch = vec![];
    for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
        batch.push(put(id, 10));
        // Each copy differs where sessions differ: QoS, RETAIN, Subscription Identifier.
        let mut copy = m.clone();
        copy.qos = if i == 0 {
            QoS::ExactlyOnce
        } else {
            QoS::AtLeastOnce
        };
        copy.retain = i == 1;
        copy.properties.subscription_identifiers =
            vec![tern_codec::SubscriptionId::new(i as u32 + 1).unwrap()];
        batch.push(change(id, Change::Queued(entry(copy))));
    }
    store.commit(&batch).unwrap();
    assert_eq!(store.stored_messages().unwrap(), 1);
    let loaded = store.load().unwrap();
    let b = loaded.sessions[&Str::from("b")]
        .delivery
        .queued()
        .next()
        .unwrap()
        .clone();
    assert!(b.message.retain && b.message.qos == QoS::AtLeastOnce);
    assert_eq!(b.message.properties.subscription_identifiers[0].get(), 2);
    store
        .commit(&[change("a", Change::Unqueued), change("b", Change::Unqueued)])
        .unwrap();
    assert_eq!(store.stored_messages().unwrap(), 1, "c still holds it");
    store
        .commit(&[Op::DeleteSession {
            client_id: "c".into(),
        }])
        .unwrap();
    assert_eq!(
        store.stored_messages().unwrap(),
        0,
        "gone with its last copy"
    );
}

fn batched_session(
    store: &mut tern_store::RedbStore,
    model: &mut MemoryStore,
    batches: &[Vec<Op>],
) {
    for b in batches {
        store.commit(b).unwrap();
        model.commit(b).unwrap();
    }
}

/// A store on `file` that does not fsync each commit (`durability = "batched"`).
fn without_fsync(file: &TempFile) -> tern_store::RedbStore {
    let (now, wall) = anchor();
    let mut store = tern_store::RedbStore::open(&file.0, now, wall).unwrap();
    store.set_sync(tern_store::Sync::OnFlush);
    store
}

#[test]
fn a_store_without_fsync_per_commit_reopens_to_every_commit_applied_exactly_once() {
    let file = TempFile::new();
    let (now, wall) = anchor();
    let mut model = MemoryStore::new();
    {
        let mut store = without_fsync(&file);
        batched_session(
            &mut store,
            &mut model,
            &[
                vec![put("a", 10), enqueue("a", "1")],
                vec![enqueue("a", "2")],
            ],
        );
        store.flush().unwrap();
        batched_session(
            &mut store,
            &mut model,
            &[
                vec![enqueue("a", "3")],
                vec![change("a", Change::Unqueued), enqueue("a", "4")],
            ],
        );
    }
    let reopened = tern_store::RedbStore::open(&file.0, now, wall).unwrap();
    assert_eq!(reopened.load().unwrap(), model.load().unwrap());
    assert_eq!(queued(&reopened, "a"), ["2", "3", "4"]);
    assert_eq!(
        std::fs::metadata(file.0.with_extension("wal"))
            .unwrap()
            .len(),
        0,
        "the log is emptied once its batches are durable"
    );
}

#[test]
fn a_torn_record_at_the_end_of_the_log_is_cut_off() {
    let file = TempFile::new();
    let (now, wall) = anchor();
    let mut model = MemoryStore::new();
    {
        let mut store = without_fsync(&file);
        batched_session(
            &mut store,
            &mut model,
            &[vec![put("a", 10), enqueue("a", "1")]],
        );
    }
    // A process killed in the middle of appending its next record.
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(file.0.with_extension("wal"))
        .unwrap();
    std::io::Write::write_all(&mut log, &[200, 0, 0, 0, 7, 7, 7]).unwrap();
    drop(log);
    let reopened = tern_store::RedbStore::open(&file.0, now, wall).unwrap();
    assert_eq!(reopened.load().unwrap(), model.load().unwrap());
}

#[test]
fn a_queued_message_keeps_the_time_it_was_queued_across_a_reopen() {
    let file = TempFile::new();
    let (now, wall) = anchor();
    let mut store = tern_store::RedbStore::open(&file.0, now, wall).unwrap();
    let mut e = entry(message("a/b", "waiting"));
    e.since = now - Duration::from_secs(90);
    let mut just = entry(message("a/b", "just now"));
    just.since = now;
    store
        .commit(&[
            put("s", 10),
            change("s", Change::Queued(e)),
            change("s", Change::Queued(just)),
        ])
        .unwrap();
    drop(store);
    // The next process: its clock's instant for the same wall time is another one.
    let later = now + Duration::from_secs(1000);
    let store =
        tern_store::RedbStore::open(&file.0, later, wall + Duration::from_secs(1000)).unwrap();
    let snapshot = store.load().unwrap();
    let queued: Vec<_> = snapshot.sessions[&Str::from("s")]
        .delivery
        .queued()
        .map(|e| e.since)
        .collect();
    assert_eq!(
        queued,
        [
            later - Duration::from_secs(1090),
            later - Duration::from_secs(1000)
        ],
        "queued 1,090 s and 1,000 s before the reopened store's now"
    );
}

/// A queued copy that no PUBLISH can carry (the largest payload, grown by a Subscription
/// Identifier) is refused with an error, in both durability modes, and the batch changes
/// nothing: it used to panic in the broker's storage writer.
#[test]
fn a_message_no_publish_can_carry_is_refused_not_a_panic() {
    let biggest = tern_codec::MAX_PACKET_SIZE as usize - 5 - 6; // header, topic, id, props
    let mut m = Message::new(
        TopicName::new("t").unwrap(),
        vec![0u8; biggest],
        QoS::AtLeastOnce,
    );
    m.properties.subscription_identifiers = vec![tern_codec::SubscriptionId::new(1).unwrap()];
    for sync in [tern_store::Sync::Always, tern_store::Sync::OnFlush] {
        let f = TempFile::new();
        let (now, wall) = anchor();
        let mut store = tern_store::RedbStore::open(&f.0, now, wall).unwrap();
        store.set_sync(sync);
        store.commit(&[put("a", 10)]).unwrap();
        let result = store.commit(&[
            change("a", Change::Queued(entry(m.clone()))),
            enqueue("a", "ok"),
        ]);
        assert!(
            matches!(result, Err(StoreError::Unencodable(_))),
            "{sync:?}: {result:?}"
        );
        assert!(
            queued(&store, "a").is_empty(),
            "{sync:?}: the batch changed nothing"
        );
        store.commit(&[enqueue("a", "after")]).unwrap();
        assert_eq!(
            queued(&store, "a"),
            ["after"],
            "{sync:?}: the store goes on"
        );
    }
}

/// "Never start empty over existing data": an empty or truncated store file stops the
/// open with an error naming the file, instead of a store with nothing in it.
#[test]
fn an_empty_or_truncated_store_file_is_refused_with_its_name() {
    let (now, wall) = anchor();
    let empty = TempFile::new();
    std::fs::write(&empty.0, b"").unwrap();
    match tern_store::RedbStore::open(&empty.0, now, wall) {
        Err(StoreError::Backend(e)) => {
            assert!(e.contains(&empty.0.display().to_string()), "{e}");
            assert!(e.contains("empty"), "{e}");
        }
        other => panic!("an empty file opened: {:?}", other.map(|_| ())),
    }
    let cut = TempFile::new();
    {
        let mut store = tern_store::RedbStore::open(&cut.0, now, wall).unwrap();
        store.commit(&[put("a", 10)]).unwrap();
    }
    let len = std::fs::metadata(&cut.0).unwrap().len();
    for keep in [len / 2, 100] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&cut.0)
            .unwrap()
            .set_len(keep)
            .unwrap();
        match tern_store::RedbStore::open(&cut.0, now, wall) {
            Err(StoreError::Backend(e)) => {
                assert!(
                    e.contains(&cut.0.display().to_string()),
                    "{keep} bytes: {e}"
                );
            }
            other => panic!("a file cut to {keep} bytes opened: {:?}", other.map(|_| ())),
        }
    }
}
