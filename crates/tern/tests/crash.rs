//! Crash injection: a `tern broker` child process under load is killed with SIGKILL at
//! random moments and restarted on the same data directory, again and again. The claims:
//! every publish the broker acknowledged reaches every matching persistent subscriber at
//! least once (QoS 1) and exactly once (QoS 2 publish to a QoS 2 subscription), first
//! arrivals in each publisher's order, and nothing arrives that was never published.
//!
//! Load: publishers at QoS 1 and QoS 2 keeping more than 20 messages in flight each;
//! persistent subscribers at QoS 1 and QoS 2, two connected throughout (reconnecting
//! after each crash) and two offline until the end. The clients are tern-proto engines
//! whose sessions outlive their connections (only the broker dies), resuming with DUP
//! and the same packet ids as any MQTT client must.
//!
//! `TERN_CRASH_CYCLES` sets the number of kills (default 50, what the gate runs, and half
//! as many with `batched` durability);
//! `scripts/crash-long` runs many more.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tern_codec::properties::ConnectProperties;
use tern_codec::{
    Connect, Disconnect, Packet, Protocol, QoS, ReasonCode, Subscribe, Subscription,
    SubscriptionOptions, TopicFilter, TopicName,
};
use tern_proto::{AckMode, Config, Connection, Event, Message, Role, SessionState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A tiny deterministic generator, so a failing run can be repeated from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the broker and waits until it listens. Its output is drained by a thread (a
/// full pipe would stall it).
fn start_broker(port: u16, dir: &Path, durability: &str) -> Child {
    // Default queue settings: they hold the whole run (nothing acknowledged is dropped
    // for room under defaults).
    let config = dir.with_extension("toml");
    std::fs::write(
        &config,
        format!("[storage]\ndurability = \"{durability}\"\nflush_interval_ms = 200\n"),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "broker",
            "--bind",
            &format!("127.0.0.1:{port}"),
            "--metrics",
            "off",
            "--data-dir",
        ])
        .arg(dir)
        .arg("--config")
        .arg(&config)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "warn,tern=info")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if line.contains("listening on") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the broker started and listens");
    child
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Publisher { qos: QoS, count: u32 },
    Subscriber { qos: QoS, offline: bool },
}

#[derive(Default)]
struct Shared {
    /// Payloads delivered to each subscriber, in arrival order.
    delivered: Mutex<HashMap<String, Vec<String>>>,
    /// Sequence numbers each publisher saw acknowledged (PUBACK / PUBCOMP, success).
    acked: Mutex<HashMap<String, Vec<u32>>>,
    /// Clients whose session is established (subscribed, or connected once).
    ready: AtomicUsize,
    /// Publishers done (every message acknowledged).
    finished: AtomicUsize,
    /// Offline subscribers may come back.
    drain: AtomicBool,
    /// Everyone stops.
    stop: AtomicBool,
    /// Most messages one publisher had unacknowledged at once.
    max_in_flight: AtomicUsize,
    /// A session the broker should have kept was not there.
    errors: Mutex<Vec<String>>,
}

fn encode(p: &Packet, out: &mut BytesMut) {
    tern_codec::encode(p, Protocol::V5, out).unwrap();
}

/// Reads one packet, or `None` if the connection ended or `limit` passed.
async fn read_packet(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    limit: Duration,
) -> Option<Packet> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Ok(Some(p)) = tern_codec::decode(buf, Protocol::V5, tern_codec::MAX_PACKET_SIZE) {
            return Some(p);
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return None,
        }
    }
}

async fn client(name: String, port: u16, kind: Kind, shared: Arc<Shared>) {
    let mut state = SessionState::new();
    let mut established = false;
    let mut next_seq = 0u32;
    let topic = TopicName::new(format!("crash/{name}")).unwrap();
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        if let Kind::Subscriber { offline: true, .. } = kind
            && established
            && !shared.drain.load(Ordering::Acquire)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut connect = Connect::new(Protocol::V5, name.as_str());
        // Until the session is known to exist, start it afresh.
        connect.clean_start = !established;
        connect.keep_alive = 0;
        connect.properties = ConnectProperties {
            session_expiry_interval: Some(3600),
            ..Default::default()
        }
        .into();
        let mut out = BytesMut::new();
        encode(&Packet::Connect(Box::new(connect.clone())), &mut out);
        if stream.write_all(&out).await.is_err() {
            continue;
        }
        let mut buf = BytesMut::new();
        let Some(Packet::ConnAck(ack)) =
            read_packet(&mut stream, &mut buf, Duration::from_secs(10)).await
        else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        if established && !ack.session_present {
            shared
                .errors
                .lock()
                .unwrap()
                .push(format!("{name}: the broker lost its session"));
            return;
        }
        let config = Config::negotiate(Role::Client, &connect, &ack, AckMode::Immediate, 32);
        let now = Instant::now();
        let mut conn = Connection::new(config, std::mem::take(&mut state), established, now);
        if !established {
            match kind {
                Kind::Subscriber { qos, .. } => {
                    let s = Subscribe {
                        packet_id: std::num::NonZeroU16::new(1).unwrap(),
                        subscriptions: vec![Subscription {
                            filter: TopicFilter::new("crash/#").unwrap(),
                            options: SubscriptionOptions {
                                qos,
                                ..Default::default()
                            },
                        }],
                        properties: Default::default(),
                    };
                    out.clear();
                    encode(&Packet::Subscribe(s), &mut out);
                    if stream.write_all(&out).await.is_err() {
                        state = conn.into_session();
                        continue;
                    }
                    // SUBACK comes once the subscription is committed.
                    match read_packet(&mut stream, &mut buf, Duration::from_secs(10)).await {
                        Some(Packet::SubAck(_)) => {}
                        _ => {
                            state = conn.into_session();
                            continue;
                        }
                    }
                }
                Kind::Publisher { .. } => {}
            }
            established = true;
            shared.ready.fetch_add(1, Ordering::AcqRel);
            if let Kind::Subscriber { offline: true, .. } = kind {
                out.clear();
                encode(
                    &Packet::Disconnect(Disconnect::new(ReasonCode::Success)),
                    &mut out,
                );
                let _ = stream.write_all(&out).await;
                state = conn.into_session();
                continue;
            }
        }
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        'conn: loop {
            tokio::select! {
                read = stream.read_buf(&mut buf) => {
                    match read {
                        Ok(n) if n > 0 => {}
                        _ => break 'conn,
                    }
                    loop {
                        match tern_codec::decode(&mut buf, Protocol::V5, tern_codec::MAX_PACKET_SIZE) {
                            Ok(Some(p)) => {
                                if conn.handle_packet(p, Instant::now()).is_err() {
                                    break 'conn;
                                }
                            }
                            Ok(None) => break,
                            Err(_) => break 'conn,
                        }
                    }
                }
                _ = tick.tick() => {
                    if shared.stop.load(Ordering::Acquire) {
                        out.clear();
                        encode(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)), &mut out);
                        let _ = stream.write_all(&out).await;
                        return;
                    }
                    if let Kind::Publisher { qos, count } = kind {
                        // Bursts of 30 every 20 ms (about 1,500 messages a second), up to
                        // 60 unacknowledged: more than 20 in flight at every burst.
                        let open = conn.session().inflight_len() + conn.session().queued_len();
                        for _ in 0..30 {
                            if next_seq >= count || open >= 60 {
                                break;
                            }
                            let m = Message::new(topic.clone(), format!("{name}-{next_seq}"), qos);
                            conn.publish(m, Instant::now());
                            next_seq += 1;
                        }
                        shared
                            .max_in_flight
                            .fetch_max(conn.session().inflight_len(), Ordering::AcqRel);
                    }
                }
            }
            while let Some(e) = conn.poll_event() {
                match e {
                    Event::Message { message, .. } => shared
                        .delivered
                        .lock()
                        .unwrap()
                        .entry(name.clone())
                        .or_default()
                        .push(String::from_utf8(message.payload.to_vec()).unwrap()),
                    // A QoS 2 flow completes only after a successful PUBREC; its PUBCOMP
                    // says 0x92 when the broker had finished the flow before a crash
                    // lost that PUBCOMP and the PUBREL was resent.
                    Event::Acknowledged {
                        message, reason, ..
                    } if !reason.is_error() || reason == ReasonCode::PacketIdentifierNotFound => {
                        let payload = String::from_utf8(message.payload.to_vec()).unwrap();
                        let seq = payload.rsplit('-').next().unwrap().parse().unwrap();
                        shared
                            .acked
                            .lock()
                            .unwrap()
                            .entry(name.clone())
                            .or_default()
                            .push(seq);
                    }
                    _ => {}
                }
            }
            out.clear();
            while let Some(p) = conn.poll_transmit(Instant::now()) {
                encode(&p, &mut out);
            }
            if !out.is_empty() && stream.write_all(&out).await.is_err() {
                break 'conn;
            }
            if let Kind::Publisher { count, .. } = kind
                && next_seq == count
                && conn.session().inflight_len() == 0
                && conn.session().queued_len() == 0
            {
                shared.finished.fetch_add(1, Ordering::AcqRel);
                out.clear();
                encode(
                    &Packet::Disconnect(Disconnect::new(ReasonCode::Success)),
                    &mut out,
                );
                let _ = stream.write_all(&out).await;
                return;
            }
        }
        state = conn.into_session();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn wait_until(limit: Duration, what: &str, cond: impl Fn() -> bool) {
    let until = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a subscriber received from one publisher, checked against the guarantee.
fn check(
    sub: &str,
    sub_qos: QoS,
    publisher: &str,
    pub_qos: QoS,
    count: u32,
    got: &[String],
) -> Result<(), String> {
    let mut seen: BTreeMap<u32, usize> = BTreeMap::new();
    let mut first_order = Vec::new();
    for payload in got {
        let Some(rest) = payload.strip_prefix(&format!("{publisher}-")) else {
            continue;
        };
        let seq: u32 = rest
            .parse()
            .map_err(|_| format!("{sub}: never published: {payload}"))?;
        if seq >= count {
            return Err(format!("{sub}: never published: {payload}"));
        }
        let n = seen.entry(seq).or_default();
        *n += 1;
        if *n == 1 {
            first_order.push(seq);
        }
    }
    let missing: Vec<u32> = (0..count).filter(|s| !seen.contains_key(s)).collect();
    if !missing.is_empty() {
        return Err(format!(
            "{sub}: {} acknowledged messages from {publisher} lost, first {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        ));
    }
    if pub_qos == QoS::ExactlyOnce && sub_qos == QoS::ExactlyOnce {
        let doubled: Vec<u32> = seen
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(s, _)| *s)
            .collect();
        if !doubled.is_empty() {
            return Err(format!(
                "{sub}: QoS 2 messages from {publisher} delivered twice: {:?}",
                &doubled[..doubled.len().min(10)]
            ));
        }
    }
    if first_order.windows(2).any(|w| w[0] > w[1]) {
        return Err(format!("{sub}: messages from {publisher} out of order"));
    }
    Ok(())
}

#[test]
fn acknowledged_messages_survive_kill_9_and_qos2_is_never_doubled() {
    let cycles: u32 = std::env::var("TERN_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    run(cycles, "sync");
}

/// `durability = "batched"` acknowledges before the fsync; a crash of the process (not of
/// the machine) must still lose nothing: the write-ahead log holds what redb forgot.
#[test]
fn with_batched_durability_a_process_crash_loses_nothing_acknowledged() {
    let cycles: u32 = std::env::var("TERN_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(25, |n: u32| n / 2);
    run(cycles, "batched");
}

fn run(cycles: u32, durability: &str) {
    let seed = std::env::var("TERN_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!(
        "crash suite ({durability}): {cycles} cycles, seed {seed} (TERN_CRASH_SEED to repeat)"
    );
    let mut rng = Rng(seed);
    let dir: PathBuf =
        std::env::temp_dir().join(format!("tern-crash-{}-{seed}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let port = free_port();
    let mut broker = start_broker(port, &dir, durability);

    // Messages per publisher: enough to keep them busy through every cycle.
    let count = 200 + cycles * 300;
    let publishers = [
        ("p1", QoS::AtLeastOnce),
        ("p2", QoS::ExactlyOnce),
        ("p3", QoS::ExactlyOnce),
    ];
    let subscribers = [
        ("s1", QoS::AtLeastOnce, false),
        ("s2", QoS::ExactlyOnce, false),
        ("s3", QoS::ExactlyOnce, true),
        ("s4", QoS::AtLeastOnce, true),
    ];
    let shared = Arc::new(Shared::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut tasks = vec![];
    for (name, qos, offline) in subscribers {
        tasks.push(rt.spawn(client(
            name.into(),
            port,
            Kind::Subscriber { qos, offline },
            shared.clone(),
        )));
    }
    wait_until(Duration::from_secs(20), "subscriptions", || {
        shared.ready.load(Ordering::Acquire) == subscribers.len()
    });
    for (name, qos) in publishers {
        tasks.push(rt.spawn(client(
            name.into(),
            port,
            Kind::Publisher { qos, count },
            shared.clone(),
        )));
    }

    let started = Instant::now();
    for _ in 0..cycles {
        std::thread::sleep(Duration::from_millis(rng.between(100, 500)));
        broker.kill().unwrap(); // SIGKILL
        broker.wait().unwrap();
        broker = start_broker(port, &dir, durability);
    }
    let crash_time = started.elapsed();
    wait_until(
        Duration::from_secs(120 + u64::from(count) / 500),
        "the publishers to finish",
        || {
            shared.finished.load(Ordering::Acquire) == publishers.len()
                || !shared.errors.lock().unwrap().is_empty()
        },
    );
    shared.drain.store(true, Ordering::Release);
    let complete = || {
        let delivered = shared.delivered.lock().unwrap();
        subscribers.iter().all(|(s, _, _)| {
            let got = delivered.get(*s).map_or(0, Vec::len);
            got >= publishers.len() * count as usize
        })
    };
    let drained = {
        let until = Instant::now() + Duration::from_secs(60 + u64::from(count) / 500);
        while !complete() && Instant::now() < until && shared.errors.lock().unwrap().is_empty() {
            std::thread::sleep(Duration::from_millis(100));
        }
        // Late duplicates would arrive now; give them a moment to show.
        std::thread::sleep(Duration::from_millis(300));
        complete()
    };
    shared.stop.store(true, Ordering::Release);
    for t in tasks {
        let _ = rt.block_on(t);
    }
    let _ = broker.kill();
    let _ = broker.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(dir.with_extension("toml"));

    let errors = shared.errors.lock().unwrap().clone();
    let in_flight = shared.max_in_flight.load(Ordering::Acquire);
    assert!(in_flight > 20, "the load kept only {in_flight} in flight");
    assert!(errors.is_empty(), "{errors:?}");
    let acked = shared.acked.lock().unwrap();
    for (p, _) in publishers {
        let n = acked.get(p).map_or(0, Vec::len);
        assert_eq!(
            n, count as usize,
            "{p}: every message acknowledged in the end"
        );
    }
    let delivered = shared.delivered.lock().unwrap();
    let mut problems = vec![];
    let mut duplicates = 0;
    for (s, sub_qos, _) in subscribers {
        let got = delivered.get(s).cloned().unwrap_or_default();
        duplicates += got.len().saturating_sub(publishers.len() * count as usize);
        for (p, pub_qos) in publishers {
            if let Err(e) = check(s, sub_qos, p, pub_qos, count, &got) {
                problems.push(e);
            }
        }
    }
    println!(
        "crash suite ({durability}): {cycles} kills in {crash_time:?}, {count} messages per publisher (up to {in_flight} in flight), {duplicates} QoS 1 duplicates (allowed), drained: {drained}"
    );
    assert!(problems.is_empty(), "seed {seed}: {problems:#?}");
}
