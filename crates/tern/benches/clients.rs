//! `cargo bench -p tern --bench clients`: client publish throughput per QoS, the Tern
//! client SDK against rumqttc (3.1.1, both with 32 messages in flight), each publishing to
//! the real `tern broker` process (durability sync, the default) and to Debian's Mosquitto
//! (persistence off, its default), in the same run. A run publishes `TERN_BENCH_CLIENT`
//! (default 20,000) 64-byte messages on one connection and ends when the last is
//! acknowledged (QoS 1: PUBACK, QoS 2: PUBCOMP; QoS 0: a QoS 1 message sent after them is
//! acknowledged, so the broker has read them all). Median of 3 runs, with min-max.

#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::VecDeque;
use std::process::Command;
use std::time::{Duration, Instant};

use support::BrokerProcess;

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

const INFLIGHT: u16 = 32;

async fn tern_client(port: u16, qos: u8, count: usize, id: &str) -> Duration {
    use tern_client::{Client, Options, Protocol, QoS};
    let mut options = Options::new("127.0.0.1", port, id).protocol(Protocol::V3_1_1);
    options.inflight = INFLIGHT;
    let (client, _events) = Client::connect(options).await.unwrap();
    let q = match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let payload = bytes::Bytes::from(vec![b'x'; 64]);
    let start = Instant::now();
    let mut outcomes = VecDeque::new();
    for _ in 0..count {
        outcomes.push_back(
            client
                .publish("bench/c", payload.clone())
                .qos(q)
                .send()
                .unwrap(),
        );
        if outcomes.len() >= 1024 {
            outcomes.pop_front().unwrap().await.unwrap();
        }
    }
    if qos == 0 {
        outcomes.push_back(
            client
                .publish("bench/c", payload.clone())
                .qos(QoS::AtLeastOnce)
                .send()
                .unwrap(),
        );
    }
    for o in outcomes {
        o.await.unwrap();
    }
    let took = start.elapsed();
    client.disconnect().await;
    took
}

async fn rumqttc_client(port: u16, qos: u8, count: usize, id: &str) -> Duration {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_inflight(INFLIGHT);
    o.set_keep_alive(Duration::from_secs(60));
    let (client, mut el) = AsyncClient::new(o, 1024);
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = el.poll().await.unwrap() {
            break;
        }
    }
    let q = match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let payload = vec![b'x'; 64];
    let start = Instant::now();
    let publisher = {
        let client = client.clone();
        tokio::spawn(async move {
            for _ in 0..count {
                client
                    .publish("bench/c", q, false, payload.clone())
                    .await
                    .unwrap();
            }
            if qos == 0 {
                client
                    .publish("bench/c", QoS::AtLeastOnce, false, payload)
                    .await
                    .unwrap();
            }
        })
    };
    let want = if qos == 0 { 1 } else { count };
    let mut acked = 0;
    while acked < want {
        match el.poll().await.unwrap() {
            Event::Incoming(Packet::PubAck(_)) if qos < 2 => acked += 1,
            Event::Incoming(Packet::PubComp(_)) if qos == 2 => acked += 1,
            _ => {}
        }
    }
    let took = start.elapsed();
    publisher.await.unwrap();
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), el.poll()).await;
    took
}

fn main() {
    let count: usize = std::env::var("TERN_BENCH_CLIENT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let dir = std::env::temp_dir().join(format!("tern-bench-clients-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("tern.toml");
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nbind = \"127.0.0.1:0\"\n[storage]\ndata_dir = \"{}\"\n[metrics]\nenabled = false\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let tern = BrokerProcess::spawn(
        Command::new(env!("CARGO_BIN_EXE_tern")),
        &config,
        "tern=info",
    );
    let tern_port: u16 = tern.port(0).parse().unwrap();
    let (mosquitto, mosquitto_port) = support::Mosquitto::start();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "client publish throughput, {count} x 64 B on one connection, 3.1.1, {INFLIGHT} in flight (median of 3, min-max, msg/s)"
    );
    println!(
        "{:<10} {:<4} {:>30} {:>30} {:>7}",
        "broker", "qos", "tern-client", "rumqttc", "ratio"
    );
    for (broker, port) in [("tern", tern_port), ("mosquitto", mosquitto_port)] {
        for qos in [0u8, 1, 2] {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for run in 0..3 {
                let t = rt.block_on(tern_client(port, qos, count, &format!("tc-{qos}-{run}")));
                ours.push(count as f64 / t.as_secs_f64());
                let t = rt.block_on(rumqttc_client(port, qos, count, &format!("rq-{qos}-{run}")));
                theirs.push(count as f64 / t.as_secs_f64());
            }
            let (a, a0, a1) = median(ours);
            let (b, b0, b1) = median(theirs);
            println!(
                "{broker:<10} {qos:<4} {:>30} {:>30} {:>7.2}",
                format!("{a:.0} ({a0:.0}-{a1:.0})"),
                format!("{b:.0} ({b0:.0}-{b1:.0})"),
                a / b
            );
        }
    }
    drop(mosquitto);
    drop(tern);
    let _ = std::fs::remove_dir_all(&dir);
}
