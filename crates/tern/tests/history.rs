//! Topic history with replay (docs/history.md), against the real broker: tern-client and
//! mosquitto_sub as subscribers asking for a replay with a SUBSCRIBE user property.
//!
//! Claims: a replay from a time or from a position delivers the kept messages in order and
//! then the live ones, with nothing lost or doubled at the seam while publishing goes on;
//! the age and size bounds are honoured; the ACL applies to replayed messages; the history
//! survives a SIGKILL and restart, and positions go on after it.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::BrokerProcess;
use tern_client::{Client, Event, Options, QoS, SubscriptionOptions};

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tern-history-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn position(m: &tern_client::Message) -> u64 {
    m.properties
        .user_properties
        .iter()
        .find(|(k, _)| &**k == "history-position")
        .map(|(_, v)| v.parse().unwrap())
        .expect("a kept message carries its position")
}

/// Publishes `orders/o` with payloads `range` at QoS 1, pipelined, and waits for every
/// PUBACK.
async fn publish(client: &Client, range: std::ops::Range<usize>, pace: Option<Duration>) {
    let mut outcomes = Vec::new();
    for i in range {
        outcomes.push(
            client
                .publish("orders/o", i.to_string())
                .qos(QoS::AtLeastOnce)
                .send()
                .unwrap(),
        );
        if let Some(p) = pace {
            tokio::time::sleep(p).await;
        }
    }
    for o in outcomes {
        assert!(!o.await.unwrap().is_error());
    }
}

/// Subscribes to `orders/#` asking for a replay (`prop` = `value`) and collects until
/// `count` messages came (or 60 s): (payload, position).
async fn replay(port: u16, id: &str, prop: &str, value: &str, count: usize) -> Vec<(usize, u64)> {
    let (client, mut events) = Client::connect(Options::new("127.0.0.1", port, id))
        .await
        .unwrap();
    let options = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        ..Default::default()
    };
    let codes = client
        .subscribe_with_properties(&[("orders/#", options)], &[(prop, value)])
        .await
        .unwrap();
    assert!(!codes[0].is_error(), "{codes:?}");
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while got.len() < count {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::Message(m))) => {
                let payload: usize = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
                got.push((payload, position(&m)));
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    client.disconnect().await;
    got
}

/// 2,000 messages kept, then a subscriber asks for them all while a publisher adds 2,000
/// more: it receives the 4,000 in order, each once, the positions consecutive; another asks
/// from a position and gets exactly the rest.
#[test]
fn a_replay_then_live_has_no_gap_and_no_duplicate_at_the_seam() {
    let d = dir("seam");
    let broker = BrokerProcess::in_dir(
        &d,
        "[[topic]]\nfilter = \"orders/#\"\nhistory = \"1h\"\n[sessions]\nmemory_window = 100\n",
    );
    let port: u16 = broker.port(0).parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (publisher, _e) = Client::connect(Options::new("127.0.0.1", port, "maker"))
            .await
            .unwrap();
        publish(&publisher, 0..2000, None).await;
        // Live publishing goes on while the replay reads the first 2,000 back.
        let p = publisher.clone();
        let live = tokio::spawn(async move {
            publish(&p, 2000..4000, Some(Duration::from_micros(500))).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let got = replay(port, "reader-1", "replay-since", "1h", 4000).await;
        live.await.unwrap();
        let payloads: Vec<usize> = got.iter().map(|(p, _)| *p).collect();
        let expected: Vec<usize> = (0..4000).collect();
        assert_eq!(payloads.len(), 4000, "lost at the seam or after it");
        assert_eq!(payloads, expected, "in order, each once");
        for w in got.windows(2) {
            assert_eq!(w[1].1, w[0].1 + 1, "positions consecutive: {w:?}");
        }
        // From a position: exactly the messages from it on.
        let start = got[1500].1;
        let rest = replay(port, "reader-2", "replay-from", &start.to_string(), 2500).await;
        let payloads: Vec<usize> = rest.iter().map(|(p, _)| *p).collect();
        assert_eq!(payloads, (1500..4000).collect::<Vec<_>>());
        publisher.disconnect().await;
    });
}

/// mosquitto_sub asking for a replay of `filter` since an hour: `TOPIC PAYLOAD` lines,
/// until `count` came or 3 s passed.
fn mosq_replay(port: &str, filter: &str, count: usize) -> Vec<String> {
    let out = Command::new("mosquitto_sub")
        .args(["-p", port, "-t", filter, "-q", "1", "-V", "mqttv5"])
        .args(["-D", "subscribe", "user-property", "replay-since", "1h"])
        .args(["-F", "%t %p", "-W", "3", "-C", &count.to_string()])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn mosq_pub(port: &str, topic: &str, payload: &str) {
    assert!(
        Command::new("mosquitto_pub")
            .args(["-p", port, "-t", topic, "-m", payload, "-q", "1"])
            .status()
            .unwrap()
            .success()
    );
}

/// Age and size bounds, the ACL on replayed messages, and a SIGKILL between keeping and
/// replaying.
#[test]
fn history_keeps_its_bounds_and_the_acl_and_survives_a_sigkill() {
    let d = dir("bounds");
    let acl = d.join("acl");
    std::fs::write(
        &acl,
        "topic write #\ntopic subscribe #\ntopic receive short/#\ntopic receive capped/#\ntopic receive orders/public\n",
    )
    .unwrap();
    let extra = format!(
        "[auth]\nacl_file = \"{}\"\n\
         [[topic]]\nfilter = \"short/#\"\nhistory = \"3s\"\n\
         [[topic]]\nfilter = \"capped/#\"\nhistory = \"1h\"\nhistory_max_bytes = 2000\n\
         [[topic]]\nfilter = \"orders/#\"\nhistory = \"1h\"\n",
        acl.display()
    );
    let broker = BrokerProcess::in_dir(&d, &extra);
    let port = broker.port(0).to_string();
    mosq_pub(&port, "orders/public", "p1");
    mosq_pub(&port, "orders/secret", "s1");
    mosq_pub(&port, "orders/public", "p2");
    mosq_pub(&port, "short/a", "x1");
    mosq_pub(&port, "short/a", "x2");
    // 200 messages of 108 bytes (topic and payload) under a 2,000-byte bound.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (c, _e) = Client::connect(Options::new("127.0.0.1", port.parse().unwrap(), "filler"))
            .await
            .unwrap();
        for i in 0..200 {
            let payload = format!("{i:0>100}");
            c.publish("capped/c", payload)
                .qos(QoS::AtLeastOnce)
                .await
                .unwrap();
        }
        c.disconnect().await;
    });
    // The short history's two messages outlive their 3 s.
    std::thread::sleep(Duration::from_millis(4000));
    mosq_pub(&port, "short/a", "x3");
    // SIGKILL, and a new process on the same store.
    drop(broker);
    let broker = BrokerProcess::in_dir(&d, &extra);
    let port = broker.port(0).to_string();
    // First, while x3 is younger than its 3 s.
    assert_eq!(
        mosq_replay(&port, "short/#", 3),
        ["short/a x3"],
        "older than 3 s: gone"
    );
    assert_eq!(
        mosq_replay(&port, "orders/#", 3),
        ["orders/public p1", "orders/public p2"],
        "the ACL's receive rules apply to replayed messages"
    );
    let capped = mosq_replay(&port, "capped/#", 200);
    let kept: Vec<usize> = capped
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    // 18 x 108 = 1,944 bytes; the index trims in steps of a 32nd of the bound (62 bytes,
    // so one message here).
    assert_eq!(kept.len(), 18, "as many as fit in 2,000 bytes");
    assert_eq!(
        kept,
        (200 - kept.len()..200).collect::<Vec<_>>(),
        "the newest kept, in order"
    );
    // Positions go on after the restart.
    mosq_pub(&port, "orders/public", "p3");
    let out = Command::new("mosquitto_sub")
        .args(["-p", &port, "-t", "orders/#", "-q", "1", "-V", "mqttv5"])
        .args(["-D", "subscribe", "user-property", "replay-since", "1h"])
        .args(["-F", "%p %P", "-W", "3", "-C", "3"])
        .output()
        .unwrap();
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let pos = |l: &str| -> u64 {
        l.split("history-position:")
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(pos(&lines[2]) > pos(&lines[1]), "{lines:?}");
    let metrics = support::http_get(broker.metrics.as_ref().unwrap(), "/metrics").1;
    assert!(
        metrics.contains(&format!(
            "tern_history_messages{{policy=\"capped/#\"}} {}",
            kept.len()
        )),
        "{metrics}"
    );
}
