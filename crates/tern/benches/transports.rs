//! `cargo bench -p tern --bench transports`: TLS handshakes per second, broker memory per
//! idle TLS (and plain TCP) connection, and QoS 0 throughput over WebSocket vs TCP, against
//! the real `tern broker` process (durability none, so the disk is not measured). Each
//! number is the median of 3 runs, with the min-max. Certificates are made with rcgen.
//!
//! `TERN_BENCH_IDLE` (default 2000) idle connections, `TERN_BENCH_MESSAGES` (default
//! 200000) messages per throughput run.

#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use tern_codec::{Connect, Packet, Protocol, Publish, QosPid, TopicName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::Message;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn connect_bytes(id: &str) -> Vec<u8> {
    let mut out = BytesMut::new();
    let c = Connect::new(Protocol::V3_1_1, id);
    tern_codec::encode(&Packet::Connect(Box::new(c)), Protocol::V3_1_1, &mut out).unwrap();
    out.to_vec()
}

/// CONNECT, then wait for the 4-byte CONNACK.
async fn mqtt_connect<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, id: &str) {
    s.write_all(&connect_bytes(id)).await.unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack[0], 0x20, "CONNACK");
}

fn tls_connector(ca_pem: &str) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn tls_connect(
    connector: &tokio_rustls::TlsConnector,
    addr: &str,
    id: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    mqtt_connect(&mut tls, id).await;
    tls
}

/// QoS 0 messages/s from one publisher to one subscriber; `ws`: over WebSocket.
async fn throughput(addr: &str, ws: bool, n: usize, run: usize) -> f64 {
    let topic = format!("bench/{run}/{ws}");
    let mut sub_packets = BytesMut::new();
    sub_packets.extend_from_slice(&connect_bytes(&format!("sub-{run}-{ws}")));
    let s = tern_codec::Subscribe {
        packet_id: std::num::NonZeroU16::new(1).unwrap(),
        subscriptions: vec![tern_codec::Subscription {
            filter: tern_codec::TopicFilter::new(topic.as_str()).unwrap(),
            options: Default::default(),
        }],
        properties: Default::default(),
    };
    tern_codec::encode(&Packet::Subscribe(s), Protocol::V3_1_1, &mut sub_packets).unwrap();
    let mut one = BytesMut::new();
    let p = Publish::new(
        TopicName::new(topic.as_str()).unwrap(),
        QosPid::AtMostOnce,
        vec![7u8; 64],
    );
    tern_codec::encode(&Packet::Publish(p), Protocol::V3_1_1, &mut one).unwrap();
    let batch: Vec<u8> = one.repeat(100);
    let total_bytes = one.len() * n;
    // Subscriber: CONNACK (4) + SUBACK (5) then the messages.
    let expect = 4 + 5 + total_bytes;
    let pub_connect = connect_bytes(&format!("pub-{run}-{ws}"));
    if ws {
        let (mut sub, _) = ws_client(addr).await;
        sub.send(Message::Binary(sub_packets.freeze()))
            .await
            .unwrap();
        let mut got = 0;
        while got < 9 {
            got += frame_len(sub.next().await.unwrap().unwrap());
        }
        let (mut publ, _) = ws_client(addr).await;
        publ.send(Message::Binary(pub_connect.into()))
            .await
            .unwrap();
        frame_len(publ.next().await.unwrap().unwrap());
        let start = Instant::now();
        let writer = tokio::spawn(async move {
            for _ in 0..n / 100 {
                publ.send(Message::Binary(batch.clone().into()))
                    .await
                    .unwrap();
            }
            publ
        });
        while got < expect {
            got += frame_len(sub.next().await.unwrap().unwrap());
        }
        let secs = start.elapsed().as_secs_f64();
        drop(writer.await.unwrap());
        n as f64 / secs
    } else {
        let mut sub = TcpStream::connect(addr).await.unwrap();
        sub.write_all(&sub_packets).await.unwrap();
        let mut buf = vec![0u8; 9];
        sub.read_exact(&mut buf).await.unwrap();
        let mut publ = TcpStream::connect(addr).await.unwrap();
        mqtt_connect(&mut publ, &format!("pub-{run}")).await;
        let start = Instant::now();
        let writer = tokio::spawn(async move {
            for _ in 0..n / 100 {
                publ.write_all(&batch).await.unwrap();
            }
            publ
        });
        let mut got = 9;
        let mut chunk = vec![0u8; 64 * 1024];
        while got < expect {
            let k = sub.read(&mut chunk).await.unwrap();
            assert!(k > 0);
            got += k;
        }
        let secs = start.elapsed().as_secs_f64();
        drop(writer.await.unwrap());
        n as f64 / secs
    }
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn ws_client(addr: &str) -> (Ws, ()) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("ws://{addr}/mqtt").into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let (ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    (ws, ())
}

fn frame_len(m: Message) -> usize {
    match m {
        Message::Binary(b) => b.len(),
        _ => 0,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; nothing here is a test
    }
    let dir = std::env::temp_dir().join(format!("tern-bench-transports-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let [ca, _, _] = support::certificates(&dir);
    let ca_pem = std::fs::read_to_string(ca).unwrap();
    let config = dir.join("tern.toml");
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nbind = \"127.0.0.1:0\"\n[[listener]]\nbind = \"127.0.0.1:0\"\n\
             transport = \"tls\"\ncert_file = \"{0}/server.pem\"\nkey_file = \"{0}/server.key\"\n\
             [[listener]]\nbind = \"127.0.0.1:0\"\ntransport = \"ws\"\n\
             [storage]\ndurability = \"none\"\n",
            dir.display()
        ),
    )
    .unwrap();
    // The broker on core 0, the load on core 1 (when taskset is there).
    let cmd = if Command::new("taskset").arg("-V").output().is_ok() {
        let mut c = Command::new("taskset");
        c.args(["-c", "0", env!("CARGO_BIN_EXE_tern")]);
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_tern"))
    };
    let broker = support::BrokerProcess::spawn(cmd, &config, "warn,tern=info,tern_broker=warn");
    let pid = broker.pid();
    let addrs = &broker.addrs;
    let (tcp, tls, ws) = (addrs[0].clone(), addrs[1].clone(), addrs[2].clone());
    let _ = Command::new("taskset")
        .args(["-p", "-c", "1", &std::process::id().to_string()])
        .output();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let connector = tls_connector(&ca_pem);
    println!("tern transports benchmark (broker pid {pid}; medians of 3, min-max)");

    // 1. TLS handshakes (TCP connect + TLS 1.3 handshake + CONNECT/CONNACK), 8 at a time.
    let rates: Vec<f64> = (0..3)
        .map(|run| {
            rt.block_on(async {
                let start = Instant::now();
                let window = Duration::from_secs(2);
                let mut tasks = Vec::new();
                for t in 0..8 {
                    let (connector, tls) = (connector.clone(), tls.clone());
                    tasks.push(tokio::spawn(async move {
                        let mut n = 0u64;
                        while start.elapsed() < window {
                            let s = tls_connect(&connector, &tls, &format!("h{run}-{t}-{n}")).await;
                            drop(s);
                            n += 1;
                        }
                        n
                    }));
                }
                let mut total = 0;
                for t in tasks {
                    total += t.await.unwrap();
                }
                total as f64 / start.elapsed().as_secs_f64()
            })
        })
        .collect();
    let (m, lo, hi) = median(rates);
    println!("tls_handshakes_per_s        {m:>10.0}   ({lo:.0}-{hi:.0})");

    // 2. Memory per idle connection: RSS growth while N more idle MQTT connections open.
    // Connections are kept across runs (each run measures the next N), so memory freed by
    // an earlier run cannot hide the cost.
    let idle = env_or("TERN_BENCH_IDLE", 2000);
    let mut held_tcp = Vec::new();
    let mut held_tls = Vec::new();
    for (name, is_tls) in [("tcp", false), ("tls", true)] {
        let per: Vec<f64> = (0..3)
            .map(|run| {
                std::thread::sleep(Duration::from_millis(300));
                let before = support::rss_kib(pid);
                rt.block_on(async {
                    for i in 0..idle {
                        let id = format!("idle-{name}-{run}-{i}");
                        if is_tls {
                            held_tls.push(tls_connect(&connector, &tls, &id).await);
                        } else {
                            let mut s = TcpStream::connect(&tcp).await.unwrap();
                            mqtt_connect(&mut s, &id).await;
                            held_tcp.push(s);
                        }
                    }
                });
                std::thread::sleep(Duration::from_millis(300));
                let after = support::rss_kib(pid);
                (after.saturating_sub(before) as f64 * 1024.0) / idle as f64
            })
            .collect();
        let (m, lo, hi) = median(per);
        println!(
            "idle_{name}_bytes_per_conn      {m:>10.0}   ({lo:.0}-{hi:.0})  [{idle} connections per run]"
        );
    }
    drop((held_tcp, held_tls));

    // 3. QoS 0 throughput, one publisher to one subscriber, 64-byte payloads.
    let n = env_or("TERN_BENCH_MESSAGES", 200_000) / 100 * 100;
    for (name, addr, is_ws) in [("tcp", &tcp, false), ("ws", &ws, true)] {
        let rates: Vec<f64> = (0..3)
            .map(|run| rt.block_on(throughput(addr, is_ws, n, run)))
            .collect();
        let (m, lo, hi) = median(rates);
        println!("qos0_msgs_per_s_{name:<4}        {m:>10.0}   ({lo:.0}-{hi:.0})  [{n} messages]");
    }
    broker.stop();
}
