//! Hostile input against the real `tern broker` process, while a well-behaved publisher and
//! subscriber exchange QoS 1 messages throughout and must lose nothing: thousands of random
//! and mutated byte streams (over TCP and WebSocket), sockets that send nothing or half a
//! packet (closed after the CONNECT timeout), oversized packets. The broker stays up, and
//! its resident memory afterwards is near what it was before (printed).
//!
//! `TERN_ABUSE_STREAMS` sets how many streams (default 2000), `TERN_ABUSE_SEED` the seed.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tern_codec::{
    Ack, Connect, Packet, Protocol, Publish, QoS, QosPid, Subscribe, Subscription,
    SubscriptionOptions, TopicFilter, TopicName,
};

/// xorshift64*: small, seedable, good enough to make garbage.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A bare client over TCP for the well-behaved pair.
struct Client {
    sock: TcpStream,
    buf: BytesMut,
}

impl Client {
    fn connect(addr: &str, id: &str) -> Client {
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut c = Client {
            sock,
            buf: BytesMut::new(),
        };
        c.send(&Packet::Connect(Box::new(Connect::new(Protocol::V5, id))));
        assert!(matches!(c.recv(), Packet::ConnAck(_)));
        c
    }
    fn send(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        tern_codec::encode(p, Protocol::V5, &mut out).unwrap();
        self.sock.write_all(&out).unwrap();
    }
    fn recv(&mut self) -> Packet {
        loop {
            if let Some(p) =
                tern_codec::decode(&mut self.buf, Protocol::V5, tern_codec::MAX_PACKET_SIZE)
                    .unwrap()
            {
                return p;
            }
            let mut chunk = [0u8; 4096];
            let n = self.sock.read(&mut chunk).unwrap();
            assert!(n > 0, "the well-behaved client was disconnected");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// A valid CONNECT + SUBSCRIBE + PUBLISH stream, the raw material for mutations.
fn valid_stream(rng: &mut Rng) -> Vec<u8> {
    let mut out = BytesMut::new();
    let v = [Protocol::V3_1_1, Protocol::V5][rng.below(2)];
    let c = Connect::new(v, format!("fuzz-{}", rng.next()));
    tern_codec::encode(&Packet::Connect(Box::new(c)), v, &mut out).unwrap();
    let s = Subscribe {
        packet_id: std::num::NonZeroU16::new(1).unwrap(),
        subscriptions: vec![Subscription {
            filter: TopicFilter::new("fuzz/#").unwrap(),
            options: SubscriptionOptions::default(),
        }],
        properties: Default::default(),
    };
    tern_codec::encode(&Packet::Subscribe(s), v, &mut out).unwrap();
    let p = Publish::new(
        TopicName::new("fuzz/x").unwrap(),
        QosPid::new(QoS::AtLeastOnce, std::num::NonZeroU16::new(2).unwrap()),
        vec![0u8; rng.below(64)],
    );
    tern_codec::encode(&Packet::Publish(p), v, &mut out).unwrap();
    out.to_vec()
}

fn garbage(rng: &mut Rng) -> Vec<u8> {
    match rng.below(4) {
        // Pure noise.
        0 => (0..rng.below(300)).map(|_| rng.next() as u8).collect(),
        // A valid stream with bytes flipped, dropped or inserted.
        1 | 2 => {
            let mut s = valid_stream(rng);
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(s.len());
                match rng.below(3) {
                    0 => s[at] ^= 1 << rng.below(8),
                    1 => {
                        s.remove(at);
                    }
                    _ => s.insert(at, rng.next() as u8),
                }
            }
            s
        }
        // A valid stream cut short.
        _ => {
            let s = valid_stream(rng);
            let n = rng.below(s.len());
            s[..n].to_vec()
        }
    }
}

fn websocket_frame(payload: &[u8]) -> Vec<u8> {
    // Client frames are masked; binary opcode, FIN set.
    let mut f = vec![0x82];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    let mask = [1u8, 2, 3, 4];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

fn websocket_upgrade(addr: &str) -> Option<TcpStream> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(
        b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Protocol: mqtt\r\n\r\n",
    )
    .ok()?;
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).ok()? == 0 {
            return None;
        }
        reply.push(byte[0]);
    }
    reply.starts_with(b"HTTP/1.1 101").then_some(s)
}

/// Sends `bytes`, half-closes, and reads until the broker closes (bounded).
fn throw(mut s: TcpStream, bytes: &[u8]) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 4096];
    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
}

#[test]
fn hostile_input_closes_only_its_own_connection_and_memory_comes_back() {
    let dir = std::env::temp_dir().join(format!("tern-abuse-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("tern.toml");
    std::fs::write(
        &config,
        "[[listener]]\nbind = \"127.0.0.1:0\"\n[[listener]]\nbind = \"127.0.0.1:0\"\ntransport = \"ws\"\n\
         [limits]\nconnect_timeout_secs = 1\nmax_packet_size = 65536\n\
         [storage]\ndurability = \"none\"\n",
    )
    .unwrap();
    // The listening line, without a log line per hostile connection.
    let broker = support::BrokerProcess::spawn(
        Command::new(env!("CARGO_BIN_EXE_tern")),
        &config,
        "warn,tern=info,tern_broker=error",
    );
    let (tcp, ws) = (broker.addrs[0].clone(), broker.addrs[1].clone());
    let pid = broker.pid();

    // The well-behaved pair, throughout.
    let mut sub = Client::connect(&tcp, "good-sub");
    sub.send(&Packet::Subscribe(Subscribe {
        packet_id: std::num::NonZeroU16::new(1).unwrap(),
        subscriptions: vec![Subscription {
            filter: TopicFilter::new("good").unwrap(),
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
        }],
        properties: Default::default(),
    }));
    assert!(matches!(sub.recv(), Packet::SubAck(_)));
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (tcp, stop) = (tcp.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut p = Client::connect(&tcp, "good-pub");
            let mut sent = 0u32;
            while !stop.load(Ordering::Relaxed) || sent < 200 {
                let id = std::num::NonZeroU16::new((sent % 60_000 + 1) as u16).unwrap();
                p.send(&Packet::Publish(Publish::new(
                    TopicName::new("good").unwrap(),
                    QosPid::new(QoS::AtLeastOnce, id),
                    sent.to_be_bytes().to_vec(),
                )));
                assert!(matches!(p.recv(), Packet::PubAck(_)));
                sent += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            sent
        })
    };
    let receiver = std::thread::spawn(move || {
        let mut next = 0u32;
        loop {
            match sub.recv() {
                Packet::Publish(p) => {
                    let n = u32::from_be_bytes(p.payload[..4].try_into().unwrap());
                    assert_eq!(n, next, "the good subscriber lost or reordered a message");
                    next += 1;
                    sub.send(&Packet::PubAck(Ack::new(p.qos_pid.packet_id().unwrap())));
                    if p.payload.len() > 4 {
                        return next - 1; // the end marker
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    });

    let seed: u64 = std::env::var("TERN_ABUSE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7e12_5eed);
    let mut rng = Rng(seed);
    let streams: usize = std::env::var("TERN_ABUSE_STREAMS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    // Two identical rounds. The first grows the allocator's arenas to what the abuse
    // needs (kept for reuse, as glibc does); the second must leave memory where the first
    // did: nothing a connection held stays behind.
    let cold = support::rss_kib(pid);
    let mut rounds = Vec::new();
    for _ in 0..2 {
        let (closed_in, peak) = round(&tcp, &ws, pid, &mut rng, streams / 2);
        std::thread::sleep(Duration::from_millis(500));
        rounds.push((closed_in, peak, support::rss_kib(pid)));
    }
    stop.store(true, Ordering::Relaxed);
    let sent = publisher.join().unwrap();
    let mut end = Client::connect(&tcp, "good-end");
    end.send(&Packet::Publish(Publish::new(
        TopicName::new("good").unwrap(),
        QosPid::new(QoS::AtLeastOnce, std::num::NonZeroU16::new(1).unwrap()),
        [sent.to_be_bytes().to_vec(), b"end".to_vec()].concat(),
    )));
    assert!(matches!(end.recv(), Packet::PubAck(_)));
    let received = receiver.join().unwrap();
    assert_eq!(received, sent, "every good message arrived once, in order");

    let (first, second) = (rounds[0].2, rounds[1].2);
    println!(
        "abuse: {streams} streams in 2 rounds (seed {seed:#x}); silent sockets closed \
         {:?} / {:?} after each round's last stream; good messages {sent}; RSS KiB: before \
         {cold}, peak {} / {}, after round 1 {first}, after round 2 {second}",
        rounds[0].0, rounds[1].0, rounds[0].1, rounds[1].1
    );
    let mut broker = broker;
    assert!(
        broker.child.try_wait().unwrap().is_none(),
        "the broker is still running"
    );
    // Measured: +0.5 to +2 MiB in round 2 with 1,000 or 5,000 streams per round alike
    // (allocator fragmentation, not per connection); a leak of 4 KiB per stream would
    // show here.
    assert!(
        second <= first + 4 * 1024,
        "RSS {second} KiB after round 2 vs {first} KiB after round 1: memory was kept"
    );
    broker.stop();
}

/// One round of abuse: 200 sockets that send nothing or half a CONNECT (all must be closed
/// by the 1 s CONNECT timeout), `streams` random and mutated byte streams (one in four over
/// WebSocket), 20 packets over the maximum size. Returns how long after the last stream the
/// silent sockets were all closed, and the peak RSS seen.
fn round(tcp: &str, ws: &str, pid: u32, rng: &mut Rng, streams: usize) -> (Duration, u64) {
    let silent: Vec<TcpStream> = (0..200)
        .map(|i| {
            let mut s = TcpStream::connect(tcp).unwrap();
            if i % 2 == 1 {
                s.write_all(&[0x10, 0x20, 0x00, 0x04, b'M']).unwrap();
            }
            s
        })
        .collect();
    let mut peak = 0;
    for i in 0..streams {
        let bytes = garbage(rng);
        if i % 4 == 3 {
            if let Some(s) = websocket_upgrade(ws) {
                throw(s, &websocket_frame(&bytes));
            }
        } else {
            throw(TcpStream::connect(tcp).unwrap(), &bytes);
        }
        if i % 200 == 0 {
            peak = peak.max(support::rss_kib(pid));
        }
    }
    for _ in 0..20 {
        let mut big = vec![0x30, 0xFF, 0xFF, 0x7F];
        big.extend(std::iter::repeat_n(b'x', 100_000));
        throw(TcpStream::connect(tcp).unwrap(), &big);
    }
    let started = Instant::now();
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 16];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("a silent socket was not closed by the CONNECT timeout: {other:?}"),
        }
    }
    (started.elapsed(), peak)
}
