//! Durability benchmarks (docs/BENCHMARKS.md): not a test, a command that prints numbers.
//!
//! `cargo run --release -p tern-broker --example durable_bench -- throughput`
//!   the broker in this process on a redb store (durability sync), P publishers with
//!   persistent sessions publishing QoS 1 or QoS 2 (each keeping up to 16 in flight) to one
//!   persistent subscriber; prints delivered messages per second and messages per commit
//!   (each commit is one fsync) for P = 1, 16, 256.
//! `cargo run --release -p tern-broker --example durable_bench -- batched`
//!   the same with `durability = "batched"` (log write per commit, fsync every 100 ms).
//! `cargo run --release -p tern-broker --example durable_bench -- restart`
//!   writes 1,000,000 queued messages across 10,000 offline sessions into a store, then
//!   times opening it, loading it and rebuilding the broker (all sessions restored, ready
//!   to accept connections); prints the time and the file size.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use tern_broker::core::{Broker, Settings};
use tern_codec::properties::ConnectProperties;
use tern_codec::{
    Connect, Packet, Protocol, QoS, Subscribe, Subscription, SubscriptionOptions, TopicFilter,
    TopicName,
};
use tern_proto::{AckMode, Change, Config, Connection, Event, Message, Role, SessionState};
use tern_store::{Op, RedbStore, SessionRecord, Snapshot, Store, StoreError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Counts commits and ops on the way to the real store.
struct Counting {
    inner: RedbStore,
    commits: Arc<AtomicU64>,
}

impl Store for Counting {
    fn commit(&mut self, batch: &[Op]) -> Result<tern_store::Committed, StoreError> {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.inner.commit(batch)
    }
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.inner.load()
    }
    fn load_spilled(&self) -> Result<Snapshot, StoreError> {
        self.inner.load_spilled()
    }
    fn read_queue(
        &self,
        client_id: &str,
        after: tern_store::MessageId,
        max: usize,
    ) -> Result<Vec<(tern_store::Entry, Option<tern_codec::Str>)>, StoreError> {
        self.inner.read_queue(client_id, after, max)
    }
    fn read_history(
        &self,
        read: &tern_store::HistoryRead,
    ) -> Result<Vec<tern_store::HistoryMessage>, StoreError> {
        self.inner.read_history(read)
    }
    fn flush(&mut self) -> Result<(), StoreError> {
        self.inner.flush()
    }
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tern-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn connect_packet(id: &str) -> Connect {
    let mut c = Connect::new(Protocol::V5, id);
    c.clean_start = true;
    c.keep_alive = 0;
    c.properties = ConnectProperties {
        session_expiry_interval: Some(3600),
        ..Default::default()
    }
    .into();
    c
}

/// Connects, optionally subscribes, then runs the engine: publishes `count` messages at
/// `qos` keeping at most `window` unacknowledged, or counts what arrives until `expect`.
async fn client(
    port: u16,
    id: String,
    subscribe: Option<QoS>,
    publish: Option<(QoS, u64, usize)>,
    received: Arc<AtomicU64>,
    expect: u64,
    start: Option<Arc<tokio::sync::Barrier>>,
) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let connect = connect_packet(&id);
    let mut out = BytesMut::new();
    tern_codec::encode(
        &Packet::Connect(Box::new(connect.clone())),
        Protocol::V5,
        &mut out,
    )
    .unwrap();
    if let Some(qos) = subscribe {
        let s = Subscribe {
            packet_id: std::num::NonZeroU16::new(1).unwrap(),
            subscriptions: vec![Subscription {
                filter: TopicFilter::new("bench/#").unwrap(),
                options: SubscriptionOptions {
                    qos,
                    ..Default::default()
                },
            }],
            properties: Default::default(),
        };
        tern_codec::encode(&Packet::Subscribe(s), Protocol::V5, &mut out).unwrap();
    }
    stream.write_all(&out).await.unwrap();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let ack = loop {
        if let Some(Packet::ConnAck(a)) =
            tern_codec::decode(&mut buf, Protocol::V5, tern_codec::MAX_PACKET_SIZE).unwrap()
        {
            break a;
        }
        stream.read_buf(&mut buf).await.unwrap();
    };
    // Everyone connected before the clock starts: connection setup is not the subject.
    if let Some(b) = start {
        b.wait().await;
    }
    let config = Config::negotiate(Role::Client, &connect, &ack, AckMode::Immediate, 32);
    let mut conn = Connection::new(config, SessionState::new(), false, Instant::now());
    let topic = TopicName::new(format!("bench/{id}")).unwrap();
    let mut sent = 0u64;
    let mut done = 0u64;
    let payload = bytes::Bytes::from_static(&[b'x'; 64]);
    loop {
        if let Some((qos, count, window)) = publish {
            while sent < count && (sent - done) < window as u64 {
                let mut m = Message::new(topic.clone(), payload.clone(), qos);
                m.retain = false;
                conn.publish(m, Instant::now());
                sent += 1;
            }
            if done == count {
                return;
            }
        } else if received.load(Ordering::Acquire) >= expect {
            return;
        }
        out.clear();
        while let Some(p) = conn.poll_transmit(Instant::now()) {
            tern_codec::encode(&p, Protocol::V5, &mut out).unwrap();
        }
        if !out.is_empty() {
            stream.write_all(&out).await.unwrap();
        }
        if stream.read_buf(&mut buf).await.unwrap() == 0 {
            return;
        }
        while let Some(p) =
            tern_codec::decode(&mut buf, Protocol::V5, tern_codec::MAX_PACKET_SIZE).unwrap()
        {
            conn.handle_packet(p, Instant::now()).unwrap();
        }
        while let Some(e) = conn.poll_event() {
            match e {
                Event::Message { .. } => {
                    received.fetch_add(1, Ordering::AcqRel);
                }
                Event::Acknowledged { .. } => done += 1,
                _ => {}
            }
        }
    }
}

fn throughput(
    rt: &tokio::runtime::Runtime,
    qos: QoS,
    publishers: usize,
    total: u64,
    batched: bool,
) {
    let dir = temp_dir("tp");
    let commits = Arc::new(AtomicU64::new(0));
    let mut inner =
        RedbStore::open(&dir.join("tern.redb"), Instant::now(), SystemTime::now()).unwrap();
    if batched {
        inner.set_sync(tern_store::Sync::OnFlush);
    }
    let store = Counting {
        inner,
        commits: commits.clone(),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let settings = Settings {
        max_queued_messages: 10_000_000,
        ..Settings::default()
    };
    let server = rt.spawn(tern_broker::server::serve(
        listener,
        settings,
        Some(tern_broker::server::Persistence {
            store: Box::new(store),
            flush_every: batched.then(|| Duration::from_millis(100)),
        }),
        tern_broker::auth::Access::open(),
        async {
            let _ = stop_rx.await;
        },
    ));
    let per = total / publishers as u64;
    let expect = per * publishers as u64;
    let received = Arc::new(AtomicU64::new(0));
    let sub = rt.spawn(client(
        port,
        "sub".into(),
        Some(qos),
        None,
        received.clone(),
        expect,
        None,
    ));
    std::thread::sleep(Duration::from_millis(200));
    let barrier = Arc::new(tokio::sync::Barrier::new(publishers + 1));
    let pubs: Vec<_> = (0..publishers)
        .map(|i| {
            rt.spawn(client(
                port,
                format!("p{i}"),
                None,
                Some((qos, per, 16)),
                received.clone(),
                0,
                Some(barrier.clone()),
            ))
        })
        .collect();
    rt.block_on(barrier.wait());
    let before = commits.load(Ordering::Relaxed);
    let start = Instant::now();
    for p in pubs {
        rt.block_on(p).unwrap();
    }
    rt.block_on(sub).unwrap();
    let elapsed = start.elapsed();
    let n = commits.load(Ordering::Relaxed) - before;
    let _ = stop_tx.send(());
    let _ = rt.block_on(server);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{} {qos:?} publishers={publishers:>3}: {expect} messages in {:.2} s = {:>7.0} msg/s delivered, {n} commits, {:.1} messages per commit",
        if batched { "batched" } else { "sync" },
        elapsed.as_secs_f64(),
        expect as f64 / elapsed.as_secs_f64(),
        expect as f64 / n.max(1) as f64
    );
}

fn restart(sessions: usize, messages: usize) {
    let dir = temp_dir("restart");
    let path = dir.join("tern.redb");
    let per = messages / sessions;
    {
        let mut store = RedbStore::open(&path, Instant::now(), SystemTime::now()).unwrap();
        let fill = Instant::now();
        let topic = TopicName::new("bench/queued").unwrap();
        for chunk in (0..sessions).collect::<Vec<_>>().chunks(100) {
            let mut batch = Vec::new();
            for s in chunk {
                let client_id: tern_codec::Str = format!("s{s}").into();
                batch.push(Op::PutSession {
                    client_id: client_id.clone(),
                    record: SessionRecord {
                        expiry: Duration::from_secs(86_400),
                        expires_at: Some(SystemTime::now() + Duration::from_secs(86_400)),
                        subscriptions: vec![tern_store::Subscription {
                            filter: TopicFilter::new("bench/#").unwrap(),
                            options: SubscriptionOptions {
                                qos: QoS::AtLeastOnce,
                                ..Default::default()
                            },
                            id: None,
                        }],
                        pending_will: None,
                        username: None,
                        fed: None,
                    },
                });
                for k in 0..per {
                    // Every message distinct (no fan-out sharing a stored body): the
                    // heavier case for the store.
                    let mut p = format!("s{s}-m{k}-").into_bytes();
                    p.resize(64, b'x');
                    batch.push(Op::Change {
                        client_id: client_id.clone(),
                        change: Change::Queued(tern_proto::Entry {
                            id: tern_proto::MessageId::new(k as u64 + 1).unwrap(),
                            since: Instant::now(),
                            message: Message::new(
                                topic.clone(),
                                bytes::Bytes::from(p),
                                QoS::AtLeastOnce,
                            ),
                        }),
                        shared: None,
                    });
                }
            }
            store.commit(&batch).unwrap();
        }
        println!(
            "restart: wrote {sessions} sessions with {} queued messages in {:.1} s",
            per * sessions,
            fill.elapsed().as_secs_f64()
        );
    }
    let size = std::fs::metadata(&path).unwrap().len();
    let start = Instant::now();
    let store = RedbStore::open(&path, Instant::now(), SystemTime::now()).unwrap();
    let opened = start.elapsed();
    let snapshot = store.load().unwrap();
    let loaded = start.elapsed();
    let broker = Broker::resume(
        Settings::default(),
        snapshot,
        Instant::now(),
        SystemTime::now(),
    );
    let ready = start.elapsed();
    let g = broker.gauges(Instant::now(), 0);
    assert_eq!(g.online + g.offline, sessions);
    println!(
        "restart: {} sessions, {} queued messages, file {:.0} MB: open {:.2} s, load {:.2} s, ready (all sessions restored) {:.2} s",
        sessions,
        per * sessions,
        size as f64 / 1e6,
        opened.as_secs_f64(),
        loaded.as_secs_f64(),
        ready.as_secs_f64()
    );
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let what = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for (name, batched) in [("throughput", false), ("batched", true)] {
        if what == name || what == "all" {
            for qos in [QoS::AtLeastOnce, QoS::ExactlyOnce] {
                for publishers in [1, 16, 256] {
                    throughput(&rt, qos, publishers, 20_480, batched);
                }
            }
        }
    }
    if what == "restart" || what == "all" {
        let sessions = std::env::args()
            .nth(2)
            .and_then(|s| s.parse().ok())
            .unwrap_or(10_000);
        let messages = std::env::args()
            .nth(3)
            .and_then(|s| s.parse().ok())
            .unwrap_or(1_000_000);
        restart(sessions, messages);
    }
}
