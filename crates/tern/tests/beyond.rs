//! Guarantees beyond MQTT's, against the `tern` binary with paho-mqtt 2 (MQTT 5,
//! `tests/interop/paho_beyond.py`) and tern-client: idempotency keys (paho's own QoS 2
//! replay after PUBREL shown and stopped; one key, three publishes, a kill -9 between two
//! of them: delivered once), delivery receipts (each outcome counted, the settled receipt
//! only after the last acknowledgement, kept for a publisher that is away), per-topic
//! policies (minimum QoS refused with the documented codes, maximum QoS delivered lower,
//! offline queueing off, expiry default, SIGHUP reload).

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::BrokerProcess;

fn script() -> String {
    format!(
        "{}/../../tests/interop/paho_beyond.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Runs the paho helper to its end (at most 60 s) and returns its lines.
fn paho(args: &[&str]) -> Vec<String> {
    finish(paho_watch(args))
}

/// Starts the paho helper in the background (a subscriber), returned once it printed
/// `ready` (subscribed); kill it when done.
fn paho_bg(args: &[&str]) -> Child {
    use std::io::BufRead;
    let mut child = Command::new("python3")
        .arg(script())
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "the subscriber subscribed");
    // The rest is read and dropped (the script must not write to a closed pipe).
    std::thread::spawn(move || for _ in reader.lines() {});
    child
}

/// Starts a paho subscriber whose output is read when it ends (`finish`).
fn paho_watch(args: &[&str]) -> Child {
    Command::new("timeout")
        .args(["60", "python3", &script()])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The lines a `paho_watch` subscriber printed, once it ended.
fn finish(child: Child) -> Vec<String> {
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// The `msg` lines of a subscriber's output: (QoS, topic, expiry, payload).
fn messages(lines: &[String]) -> Vec<(String, String, String, String)> {
    lines
        .iter()
        .filter_map(|l| {
            let mut f = l.splitn(5, ' ');
            (f.next()? == "msg").then(|| {
                (
                    f.next().unwrap().to_string(),
                    f.next().unwrap().to_string(),
                    f.next().unwrap().to_string(),
                    f.next().unwrap_or("").to_string(),
                )
            })
        })
        .collect()
}

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tern-beyond-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// paho-mqtt 2.2 sends a QoS 2 PUBLISH again after it sent PUBREL when two reconnects
/// fail in a row (it resets a message waiting to resend PUBREL to "publish"). The broker
/// completed that exchange, so by the standard the resend is a new message: without a
/// key the subscriber gets it twice; with one, once.
#[test]
fn paho_resends_a_completed_qos2_publish_and_an_idempotency_key_stops_the_duplicate() {
    let d = dir("replay");
    let broker = BrokerProcess::in_dir(&d, "");
    let port = broker.port(0).to_string();
    let sub = paho_watch(&["sub", &port, "watcher", "replay/#", "2", "--timeout", "12"]);
    std::thread::sleep(Duration::from_millis(1500));
    let plain = paho(&["replay", &port, "replayer-a", "replay/plain"]);
    assert!(
        plain.iter().any(|l| l.starts_with("done cut 2")),
        "{plain:?}"
    );
    let keyed = paho(&[
        "replay",
        &port,
        "replayer-b",
        "replay/keyed",
        "--key",
        "order-17",
    ]);
    assert!(
        keyed.iter().any(|l| l.starts_with("done cut 2")),
        "{keyed:?}"
    );
    let lines = finish(sub);
    let got = messages(&lines);
    let count = |t: &str| got.iter().filter(|m| m.1 == t).count();
    assert_eq!(
        count("replay/plain"),
        2,
        "paho's replay is a second message without a key: {lines:?}"
    );
    assert_eq!(
        count("replay/keyed"),
        1,
        "with a key the replay is acknowledged and not routed: {lines:?}"
    );
    let (_, metrics) = support::http_get(broker.metrics.as_ref().unwrap(), "/metrics");
    assert!(
        metrics.contains("tern_idempotent_repeats_total 1"),
        "{metrics}"
    );
}

/// One key published three times at QoS 1, each from a new clean session (paho, then
/// tern-client, then paho after a kill -9 and restart): a persistent subscriber gets it
/// once. Another publisher identity with the same key is not suppressed, and once the
/// window has passed the key is new again.
#[test]
fn a_key_published_three_times_across_a_kill_is_delivered_once() {
    let d = dir("keys");
    let extra = "[idempotency]\nwindow_secs = 8\n";
    let broker = BrokerProcess::in_dir(&d, extra);
    let port = broker.port(0).to_string();
    let done = paho(&[
        "sub",
        &port,
        "keeper",
        "k/#",
        "1",
        "--persistent",
        "--subscribe-only",
    ]);
    assert!(done.contains(&"done".to_string()), "{done:?}");
    let first = paho(&["pub", &port, "pub-1", "k/a", "1", "first", "--key", "pay-1"]);
    assert!(first.contains(&"ack 0".to_string()), "{first:?}");
    // tern-client, a new clean session, the same key in a user property.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let options = tern_client::Options::new("127.0.0.1", port.parse().unwrap(), "pub-1")
            .protocol(tern_codec::Protocol::V5);
        let (client, _events) = tern_client::Client::connect(options).await.unwrap();
        let mut props = tern_codec::properties::PublishProperties::default();
        props
            .user_properties
            .push(("msg-id".into(), "pay-1".into()));
        let r = client
            .publish("k/a", "second")
            .qos(tern_codec::QoS::AtLeastOnce)
            .properties(props)
            .await
            .unwrap();
        assert!(!r.is_error(), "{r:?}");
        client.disconnect().await;
    });
    // kill -9, and a new process on the same data.
    drop(broker);
    let broker = BrokerProcess::in_dir(&d, extra);
    let port = broker.port(0).to_string();
    let third = paho(&["pub", &port, "pub-1", "k/a", "1", "third", "--key", "pay-1"]);
    assert!(third.contains(&"ack 0".to_string()), "{third:?}");
    // Another identity, the same key: its own message.
    let other = paho(&["pub", &port, "pub-2", "k/a", "1", "other", "--key", "pay-1"]);
    assert!(other.contains(&"ack 0".to_string()), "{other:?}");
    // The window (8 s from the first publish) ends: the key is new again.
    std::thread::sleep(Duration::from_secs(9));
    let later = paho(&["pub", &port, "pub-1", "k/a", "1", "later", "--key", "pay-1"]);
    assert!(later.contains(&"ack 0".to_string()), "{later:?}");
    let lines = paho(&[
        "sub",
        &port,
        "keeper",
        "k/#",
        "1",
        "--persistent",
        "--timeout",
        "2",
    ]);
    let payloads: Vec<String> = messages(&lines).into_iter().map(|m| m.3).collect();
    assert_eq!(
        payloads,
        ["first", "other", "later"],
        "each key once per identity and window: {lines:?}"
    );
}

/// A routed receipt counts each outcome: sent to an online subscriber, queued for an
/// offline one, dropped by a full queue, denied by the ACL, and no match; the settled
/// receipt comes only once the offline subscriber has acknowledged, and waits in the
/// publisher's session while it is away.
#[test]
fn receipts_count_every_outcome_and_settle_after_the_last_acknowledgement() {
    let d = dir("receipts");
    std::fs::create_dir_all(&d).unwrap();
    let acl = d.join("acl");
    std::fs::write(
        &acl,
        "topic readwrite rc/#\ntopic readwrite rcpt/#\ntopic readwrite none/#\nuser blocked\ntopic subscribe rc/#\n",
    )
    .unwrap();
    let extra = format!(
        "[auth]\nacl_file = \"{}\"\n[[topic]]\nfilter = \"rc/full/#\"\nmax_queued_messages = 1\nqueue_policy = \"drop-newest\"\n",
        acl.display()
    );
    let broker = BrokerProcess::in_dir(&d, &extra);
    let port = broker.port(0).to_string();
    // Offline persistent subscribers: one to everything, one to the small queue only.
    paho(&[
        "sub",
        &port,
        "away",
        "rc/main/#",
        "1",
        "--persistent",
        "--subscribe-only",
    ]);
    paho(&[
        "sub",
        &port,
        "full",
        "rc/full/#",
        "1",
        "--persistent",
        "--subscribe-only",
    ]);
    let mut online = paho_bg(&["sub", &port, "here", "rc/#", "1", "--timeout", "60"]);
    let mut denied = paho_bg(&[
        "sub",
        &port,
        "blocked-1",
        "rc/#",
        "1",
        "--timeout",
        "60",
        "--user",
        "blocked",
        "--pw",
        "x",
    ]);
    // The small queue takes one message, then is full.
    let r = paho(&["pub", &port, "filler", "rc/full/1", "1", "fills"]);
    assert!(r.contains(&"ack 0".to_string()), "{r:?}");
    let receipt = |lines: &[String], kind: &str| -> serde_json::Value {
        let l = lines
            .iter()
            .find(|l| l.starts_with(&format!("receipt {kind} ")))
            .unwrap_or_else(|| panic!("a {kind} receipt: {lines:?}"));
        serde_json::from_str(l.splitn(4, ' ').nth(3).unwrap()).unwrap()
    };
    // Online `here` gets it, `blocked` is denied, `full` has no room.
    let r = paho(&[
        "pub",
        &port,
        "payer-f",
        "rc/full/2",
        "1",
        "x",
        "--receipt",
        "routed",
        "--response",
        "rcpt/f",
        "--corr",
        "c-f",
        "--receipts",
        "1",
    ]);
    let v = receipt(&r, "routed");
    assert_eq!(
        (
            &v["sent"],
            &v["queued"],
            &v["denied"],
            &v["dropped"]["queue_full"],
            &v["matched"]
        ),
        (&1.into(), &0.into(), &1.into(), &1.into(), &3.into()),
        "{r:?}"
    );
    assert!(
        r.iter().any(|l| l.starts_with("receipt routed c-f ")),
        "correlation data: {r:?}"
    );
    // A repeat of a key the broker has: acknowledged, not routed, and its receipt says so.
    let keyed = |client: &str| {
        paho(&[
            "pub",
            &port,
            client,
            "rc/k",
            "1",
            "once",
            "--key",
            "pay-9",
            "--receipt",
            "routed",
            "--response",
            "rcpt/k",
            "--receipts",
            "1",
        ])
    };
    let first = receipt(&keyed("payer-k"), "routed");
    let again = receipt(&keyed("payer-k"), "routed");
    assert_eq!(
        (&first["duplicate"], &again["duplicate"], &again["matched"]),
        (&false.into(), &true.into(), &0.into()),
        "{first} / {again}"
    );
    // No match at all.
    let r = paho(&[
        "pub",
        &port,
        "payer-n",
        "none/1",
        "1",
        "x",
        "--receipt",
        "routed",
        "--response",
        "rcpt/n",
        "--receipts",
        "1",
    ]);
    assert!(
        r.contains(&"ack 16".to_string()),
        "0x10 No matching subscribers: {r:?}"
    );
    assert_eq!(receipt(&r, "routed")["matched"], 0, "{r:?}");
    // Settled: `here` acknowledges at once, `away` is offline. The publisher is
    // persistent and leaves after the routed receipt.
    let r = paho(&[
        "pub",
        &port,
        "payer-s",
        "rc/main/1",
        "2",
        "pay",
        "--receipt",
        "settled",
        "--response",
        "rcpt/s",
        "--corr",
        "c-s",
        "--receipts",
        "1",
        "--persistent",
    ]);
    let v = receipt(&r, "routed");
    assert_eq!(
        (&v["sent"], &v["queued"], &v["denied"]),
        (&1.into(), &1.into(), &1.into()),
        "{r:?}"
    );
    assert!(
        !r.iter().any(|l| l.starts_with("receipt settled")),
        "nothing settled while `away` has not acknowledged: {r:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let (_, metrics) = support::http_get(broker.metrics.as_ref().unwrap(), "/metrics");
    assert!(metrics.contains("tern_receipts_waiting 1"), "{metrics}");
    // `away` comes back and acknowledges; the publisher, back too, finds the receipt.
    let got = paho(&[
        "sub",
        &port,
        "away",
        "rc/main/#",
        "1",
        "--persistent",
        "--count",
        "1",
    ]);
    assert_eq!(messages(&got).len(), 1, "{got:?}");
    let back = paho(&[
        "sub",
        &port,
        "payer-s",
        "rcpt/s",
        "1",
        "--persistent",
        "--count",
        "1",
        "--timeout",
        "5",
    ]);
    let settled = messages(&back);
    assert_eq!(
        settled.len(),
        1,
        "the settled receipt waited for its publisher: {back:?}"
    );
    let v: serde_json::Value = serde_json::from_str(&settled[0].3).unwrap();
    assert_eq!(
        (&v["receipt"], &v["copies"]),
        (&"settled".into(), &2.into()),
        "{back:?}"
    );
    for child in [&mut online, &mut denied] {
        let _ = child.kill();
        let _ = child.wait();
    }
    let (_, metrics) = support::http_get(broker.metrics.as_ref().unwrap(), "/metrics");
    assert!(
        metrics.contains("tern_receipts_total{kind=\"settled\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("tern_receipts_waiting 0"), "{metrics}");
}

/// Topic policies: below the minimum QoS refused (5.0 QoS 1: PUBACK 0x83; QoS 0:
/// DISCONNECT 0x9B), above the maximum delivered lower, telemetry never queued for an
/// offline session, a default and a longest expiry, a queue policy and limit of its own
/// (`reject` under a global `drop-newest`), QoS 0 queued offline for one filter; SIGHUP
/// puts a changed policy in force.
#[test]
fn topic_policies_refuse_downgrade_skip_offline_queues_and_reload_on_sighup() {
    let d = dir("policies");
    let config = "[sessions]\nqueue_policy = \"drop-newest\"\n\
        [[topic]]\nfilter = \"pay/#\"\nmin_qos = 2\n\
        [[topic]]\nfilter = \"tele/#\"\nmax_qos = 0\nqueue_offline = false\n\
        [[topic]]\nfilter = \"exp/#\"\nexpiry_default_secs = 100\nexpiry_max_secs = 200\n\
        [[topic]]\nfilter = \"orders/#\"\nqueue_policy = \"reject\"\nmax_queued_messages = 1\n\
        [[topic]]\nfilter = \"cursor/#\"\nqueue_qos0 = true\n";
    let broker = BrokerProcess::in_dir(&d, config);
    let port = broker.port(0).to_string();
    for (id, filter, qos) in [
        ("tele-away", "tele/#", "2"),
        ("orders-away", "orders/#", "1"),
        ("cursor-away", "cursor/#", "0"),
    ] {
        let r = paho(&[
            "sub",
            &port,
            id,
            filter,
            qos,
            "--persistent",
            "--subscribe-only",
        ]);
        assert!(r.contains(&"done".to_string()), "{r:?}");
    }
    let watcher = paho_watch(&["sub", &port, "watch", "#", "2", "--timeout", "12"]);
    std::thread::sleep(Duration::from_millis(1500));
    let publish = |args: &[&str]| {
        let mut all = vec!["pub", port.as_str()];
        all.extend_from_slice(args);
        paho(&all)
    };
    let r = publish(&["p0", "pay/1", "0", "q0"]);
    assert!(
        r.contains(&"disconnect 155".to_string()),
        "DISCONNECT 0x9B: {r:?}"
    );
    let r = publish(&["p1", "pay/1", "1", "q1"]);
    assert!(r.contains(&"ack 131".to_string()), "PUBACK 0x83: {r:?}");
    for args in [
        ["p2", "pay/1", "2", "q2"],
        ["t2", "tele/1", "2", "reading"],
        ["e1", "exp/1", "1", "expiring"],
    ] {
        let r = publish(&args);
        assert!(r.contains(&"ack 0".to_string()), "{args:?}: {r:?}");
    }
    let r = publish(&["e2", "exp/2", "1", "capped", "--expiry", "5000"]);
    assert!(r.contains(&"ack 0".to_string()), "{r:?}");
    // orders/# refuses when its offline subscriber's queue (one message) is full, although
    // the global policy drops: 0x97 Quota exceeded, and the message goes to nobody.
    let r = publish(&["o1", "orders/1", "1", "first-order"]);
    assert!(r.contains(&"ack 0".to_string()), "{r:?}");
    let r = publish(&["o2", "orders/2", "1", "second-order"]);
    assert!(r.contains(&"ack 151".to_string()), "PUBACK 0x97: {r:?}");
    // cursor/# queues QoS 0 for offline sessions.
    let r = publish(&["c0", "cursor/1", "0", "moved"]);
    assert!(!r.iter().any(|l| l.starts_with("disconnect")), "{r:?}");
    // The minimum goes to 0: QoS 0 passes after SIGHUP.
    std::fs::write(
        d.join("tern.toml"),
        std::fs::read_to_string(d.join("tern.toml"))
            .unwrap()
            .replace("min_qos = 2", "min_qos = 0"),
    )
    .unwrap();
    let _ = Command::new("kill")
        .args(["-HUP", &broker.pid().to_string()])
        .status();
    assert!(
        broker
            .wait_for("topic policies reloaded", Duration::from_secs(10))
            .is_some()
    );
    let r = publish(&["p0b", "pay/2", "0", "q0-after"]);
    assert!(!r.iter().any(|l| l.starts_with("disconnect")), "{r:?}");
    let lines = finish(watcher);
    let got = messages(&lines);
    let payloads: Vec<&str> = got.iter().map(|m| m.3.as_str()).collect();
    assert_eq!(
        payloads,
        [
            "q2",
            "reading",
            "expiring",
            "capped",
            "first-order",
            "moved",
            "q0-after"
        ],
        "{lines:?}"
    );
    assert_eq!(got[1].0, "0", "tele/# travels at QoS 0 at most: {lines:?}");
    let expiry: u32 = got[2].2.parse().unwrap();
    assert!(
        (90..=100).contains(&expiry),
        "the default expiry: {lines:?}"
    );
    let capped: u32 = got[3].2.parse().unwrap();
    assert!(
        (190..=200).contains(&capped),
        "the longest expiry: {lines:?}"
    );
    assert_eq!(got[0].2, "-", "pay/# has no expiry: {lines:?}");
    let drain = |id: &str, filter: &str, qos: &str| -> Vec<String> {
        let r = paho(&[
            "sub",
            &port,
            id,
            filter,
            qos,
            "--persistent",
            "--timeout",
            "2",
        ]);
        messages(&r).into_iter().map(|m| m.3).collect()
    };
    assert!(
        drain("tele-away", "tele/#", "2").is_empty(),
        "nothing queued for the offline telemetry subscriber"
    );
    assert_eq!(drain("orders-away", "orders/#", "1"), ["first-order"]);
    assert_eq!(
        drain("cursor-away", "cursor/#", "0"),
        ["moved"],
        "QoS 0 queued for the offline session"
    );
    let (_, metrics) = support::http_get(broker.metrics.as_ref().unwrap(), "/metrics");
    for line in [
        "tern_topic_policy_refused_total{filter=\"pay/#\"} 2",
        "tern_topic_policy_downgraded_total{filter=\"tele/#\"} 1",
        "tern_topic_policy_expiry_set_total{filter=\"exp/#\"} 2",
    ] {
        assert!(metrics.contains(line), "{line}: {metrics}");
    }
}
