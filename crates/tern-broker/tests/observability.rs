//! What operators see: `/metrics` after a scripted workload whose every count is known
//! (drops of each kind, an expiry, a QoS 2 resend, a broker retransmission, an ACL
//! denial, a refused CONNECT), `$SYS` read by paho-mqtt, and the health endpoints during
//! startup and shutdown.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::time::Duration;

use common::{Broker, Raw, Spec, get};
use tern_broker::acl::Acl;
use tern_broker::auth::Access;
use tern_broker::metrics::Metrics;
use tern_broker::server::AccessControl;
use tern_codec::{
    Ack, Connect, Disconnect, Packet, Protocol, Publish, QoS, QosPid, ReasonCode, TopicName,
};

/// The value of one series in a scrape, which must be there.
fn value(scrape: &str, series: &str) -> f64 {
    Metrics::find(scrape, series).unwrap_or_else(|| panic!("{series} missing from:\n{scrape}"))
}

fn access(acl: &str) -> AccessControl {
    AccessControl::new(Access {
        passwords: None,
        allow_anonymous: true,
        acl: Some(Arc::new(Acl::parse(acl).unwrap())),
    })
}

fn connect(port: u16, id: &str, resume: bool) -> Raw {
    connect_as(port, id, resume, None)
}

fn connect_as(port: u16, id: &str, resume: bool, user: Option<&str>) -> Raw {
    let mut c = Connect::new(Protocol::V5, id);
    c.username = user.map(Into::into);
    c.clean_start = !resume;
    c.properties.session_expiry_interval = Some(300);
    let (raw, ack) = Raw::connect(port, c);
    assert_eq!(ack.reason, ReasonCode::Success, "{id} connects");
    raw
}

fn publish(topic: &str, qos: QoS, id: u16) -> Publish {
    Publish::new(
        TopicName::new(topic).unwrap(),
        QosPid::new(qos, NonZeroU16::new(id).unwrap()),
        topic.to_string(),
    )
}

/// Publishes at QoS 1 and returns the PUBACK's reason.
fn publish_1(raw: &mut Raw, topic: &str) -> ReasonCode {
    raw.send(Packet::Publish(publish(topic, QoS::AtLeastOnce, 9)));
    match raw.recv() {
        Some(Packet::PubAck(a)) => a.reason,
        other => panic!("want PUBACK, got {other:?}"),
    }
}

/// The next PUBLISH `raw` receives, unacknowledged.
fn next(raw: &mut Raw) -> Publish {
    match raw.recv() {
        Some(Packet::Publish(p)) => p,
        other => panic!("want PUBLISH, got {other:?}"),
    }
}

/// Completes the subscriber's side of `p`'s flow.
fn ack(raw: &mut Raw, p: &Publish) {
    match p.qos_pid {
        QosPid::AtMostOnce => {}
        QosPid::AtLeastOnce(id) => raw.send(Packet::PubAck(Ack::new(id))),
        QosPid::ExactlyOnce(id) => {
            raw.send(Packet::PubRec(Ack::new(id)));
            assert!(matches!(raw.recv(), Some(Packet::PubRel(_))));
            raw.send(Packet::PubComp(Ack::new(id)));
        }
    }
}

/// The next message's topic, acknowledged.
fn take(raw: &mut Raw) -> (String, bool) {
    let p = next(raw);
    ack(raw, &p);
    (p.topic.as_str().to_string(), p.dup)
}

#[test]
fn metrics_count_a_scripted_workload_exactly() {
    let settings = tern_broker::core::Settings {
        max_queued_messages: 2,
        queue_policy: tern_broker::core::QueuePolicy::DropOldest,
        // The script's expired message makes room in a full queue: a queue in memory
        // (one kept in the store finds its expired messages when it reads them back).
        queue_window: None,
        ..Default::default()
    };
    let acl = "topic readwrite w/#\ntopic readwrite d/#\ntopic readwrite nobody/#\ntopic readwrite big/#\n";
    let broker = Broker::run(
        settings,
        Box::new(tern_store::MemoryStore::new()),
        access(acl),
        None,
        vec![Spec::tcp()],
    );
    let port = broker.port;
    let mut sub = connect(port, "sub", false);
    sub.subscribe("w/#", QoS::ExactlyOnce);
    sub.subscribe("d/#", QoS::AtMostOnce);
    let mut publisher = connect(port, "pub", false);
    // A subscriber that takes packets of at most 64 bytes.
    let mut c = Connect::new(Protocol::V5, "tiny");
    c.properties.maximum_packet_size = NonZeroU32::new(64);
    let (mut tiny, _) = Raw::connect(port, c);
    tiny.subscribe("big/#", QoS::AtLeastOnce);

    // One message at each QoS, online.
    publisher.send(Packet::Publish(publish("w/a", QoS::AtMostOnce, 1)));
    assert_eq!(take(&mut sub).0, "w/a");
    assert_eq!(publish_1(&mut publisher, "w/b"), ReasonCode::Success);
    assert_eq!(take(&mut sub).0, "w/b");
    // QoS 2, sent twice (the second with DUP) before PUBREL: delivered once.
    let mut c = publish("w/c", QoS::ExactlyOnce, 1);
    publisher.send(Packet::Publish(c.clone()));
    assert!(matches!(publisher.recv(), Some(Packet::PubRec(_))));
    c.dup = true;
    publisher.send(Packet::Publish(c));
    assert!(matches!(publisher.recv(), Some(Packet::PubRec(_))));
    publisher.send(Packet::PubRel(Ack::new(NonZeroU16::new(1).unwrap())));
    assert!(matches!(publisher.recv(), Some(Packet::PubComp(_))));
    assert_eq!(take(&mut sub).0, "w/c");
    // Downgraded: QoS 1 to a QoS 0 subscription.
    assert_eq!(publish_1(&mut publisher, "d/x"), ReasonCode::Success);
    let p = next(&mut sub);
    assert_eq!(
        (p.topic.as_str(), p.qos_pid.qos()),
        ("d/x", QoS::AtMostOnce)
    );
    // Matches nobody; refused by the ACL; $SYS is the broker's.
    assert_eq!(
        publish_1(&mut publisher, "nobody/here"),
        ReasonCode::NoMatchingSubscribers
    );
    assert_eq!(
        publish_1(&mut publisher, "secret/x"),
        ReasonCode::NotAuthorized
    );
    publisher.send(Packet::Publish(publish("$SYS/fake", QoS::AtMostOnce, 1)));
    // Too large for tiny: dropped for it (the publisher still hears it matched).
    let mut big = publish("big/x", QoS::AtLeastOnce, 9);
    big.payload = vec![b'x'; 200].into();
    publisher.send(Packet::Publish(big));
    assert!(matches!(publisher.recv(), Some(Packet::PubAck(a)) if a.reason == ReasonCode::Success));

    // A delivery left unacknowledged when the subscriber's connection drops: resent with
    // DUP on the next connection.
    assert_eq!(publish_1(&mut publisher, "w/r"), ReasonCode::Success);
    let p = next(&mut sub);
    assert_eq!((p.topic.as_str(), p.dup), ("w/r", false));
    drop(sub);
    let mut sub = connect(port, "sub", true);
    assert_eq!(take(&mut sub), ("w/r".to_string(), true));

    // Offline with a queue of 2: an expired message makes room, then the oldest is
    // dropped; QoS 0 is not queued.
    sub.send(Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
    assert!(sub.recv().is_none(), "the broker closes after DISCONNECT");
    let mut e = publish("w/e", QoS::AtLeastOnce, 9);
    e.properties.message_expiry_interval = Some(1);
    publisher.send(Packet::Publish(e));
    assert!(matches!(publisher.recv(), Some(Packet::PubAck(_))));
    assert_eq!(publish_1(&mut publisher, "w/q1"), ReasonCode::Success);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(publish_1(&mut publisher, "w/q2"), ReasonCode::Success);
    assert_eq!(publish_1(&mut publisher, "w/q3"), ReasonCode::Success);
    publisher.send(Packet::Publish(publish("w/z", QoS::AtMostOnce, 1)));
    // PINGREQ/PINGRESP: everything before it has been through the core.
    publisher.send(Packet::PingReq);
    assert!(matches!(publisher.recv(), Some(Packet::PingResp)));

    let (status, offline) = get(broker.monitor_port, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(value(&offline, "tern_sessions{state=\"offline\"}"), 1.0);
    assert_eq!(value(&offline, "tern_sessions{state=\"online\"}"), 2.0);
    assert_eq!(value(&offline, "tern_queued_messages"), 2.0);
    assert_eq!(
        value(&offline, "tern_session_queued_messages{client_id=\"sub\"}"),
        2.0
    );
    let age = value(&offline, "tern_queue_oldest_age_seconds");
    assert!((0.0..60.0).contains(&age), "oldest queued age {age}");

    let mut sub = connect(port, "sub", true);
    assert_eq!(take(&mut sub), ("w/q2".to_string(), false));
    assert_eq!(take(&mut sub), ("w/q3".to_string(), false));
    // A refused CONNECT: 3.1.1, no client id, persistent session (return code 2).
    let mut refused = Connect::new(Protocol::V3_1_1, "");
    refused.clean_start = false;
    let (_, ack) = Raw::connect(port, refused);
    assert_eq!(ack.reason, ReasonCode::ClientIdentifierNotValid);
    sub.send(Packet::PingReq);
    assert!(matches!(sub.recv(), Some(Packet::PingResp)));

    let (_, m) = get(broker.monitor_port, "/metrics");
    let expect = [
        // w/a, $SYS/fake, w/z | w/b, d/x, nobody, secret, big, w/r, w/e, w/q1-3 | w/c
        // twice.
        ("tern_messages_received_total{qos=\"0\"}", 3.0),
        ("tern_messages_received_total{qos=\"1\"}", 10.0),
        ("tern_messages_received_total{qos=\"2\"}", 2.0),
        // w/a, d/x | w/b, w/r, w/r again, w/q2, w/q3 | w/c.
        ("tern_messages_sent_total{qos=\"0\"}", 2.0),
        ("tern_messages_sent_total{qos=\"1\"}", 5.0),
        ("tern_messages_sent_total{qos=\"2\"}", 1.0),
        // Copies handed to sessions: w/a, d/x | w/b, big, w/r, w/e, w/q1-3 | w/c.
        ("tern_deliveries_total{qos=\"0\"}", 2.0),
        ("tern_deliveries_total{qos=\"1\"}", 7.0),
        ("tern_deliveries_total{qos=\"2\"}", 1.0),
        ("tern_qos_downgrades_total{from=\"1\",to=\"0\"}", 1.0),
        ("tern_qos_downgrades_total{from=\"2\",to=\"1\"}", 0.0),
        ("tern_retransmissions_total", 1.0),
        ("tern_qos2_duplicates_suppressed_total", 1.0),
        ("tern_dropped_total{reason=\"queue_full\"}", 1.0),
        ("tern_dropped_total{reason=\"expired\"}", 1.0),
        ("tern_dropped_total{reason=\"no_subscribers\"}", 1.0),
        ("tern_dropped_total{reason=\"not_authorized\"}", 2.0),
        ("tern_dropped_total{reason=\"offline_qos0\"}", 1.0),
        ("tern_dropped_total{reason=\"too_large\"}", 1.0),
        // Payloads are their topic names except big's 200 bytes: w/b + d/x + nobody/here
        // + secret/x + big + w/r + w/e + w/q1..3.
        (
            "tern_payload_bytes_received_total{qos=\"1\"}",
            (3 + 3 + 11 + 8 + 200 + 3 + 3 + 4 * 3) as f64,
        ),
        // w/b, w/r twice, w/q2, w/q3.
        (
            "tern_payload_bytes_sent_total{qos=\"1\"}",
            (3 * 3 + 4 * 2) as f64,
        ),
        ("tern_dropped_total{reason=\"quota\"}", 0.0),
        ("tern_dropped_total{reason=\"rate_limited\"}", 0.0),
        ("tern_dropped_total{reason=\"invalid\"}", 0.0),
        // sub three times, pub and tiny once; the refused one.
        ("tern_connect_total{code=\"0x00\",reason=\"Success\"}", 5.0),
        (
            "tern_connect_total{code=\"0x85\",reason=\"ClientIdentifierNotValid\"}",
            1.0,
        ),
        ("tern_connections_accepted_total", 6.0),
        ("tern_sessions_expired_total", 0.0),
        ("tern_internal_latency_seconds_count{qos=\"1\"}", 5.0),
        ("tern_sessions{state=\"online\"}", 3.0),
        ("tern_sessions{state=\"offline\"}", 0.0),
        ("tern_subscriptions", 3.0),
        ("tern_queued_messages", 0.0),
        ("tern_inflight_messages{direction=\"out\"}", 0.0),
        ("tern_inflight_messages{direction=\"in\"}", 0.0),
    ];
    let wrong: Vec<String> = expect
        .iter()
        .filter(|(series, want)| Metrics::find(&m, series) != Some(*want))
        .map(|(series, want)| format!("{series}: want {want}, got {:?}", Metrics::find(&m, series)))
        .collect();
    assert!(wrong.is_empty(), "{}\n\n{m}", wrong.join("\n"));
    // The store: every QoS 1/2 flow was committed, in fewer commits than batches.
    let commits = value(&m, "tern_store_commits_total");
    assert!(commits > 0.0 && value(&m, "tern_store_ops_total") >= commits);
    assert!(value(&m, "tern_store_batches_total") >= commits);
    assert_eq!(value(&m, "tern_store_commit_seconds_count"), commits);
    assert!(value(&m, "tern_bytes_received_total") > 0.0);
    let open = format!("tern_connections{{listener=\"tcp 127.0.0.1:{port}\",protocol=\"5.0\"}}");
    assert_eq!(value(&m, &open), 3.0, "sub, pub and tiny");
}

/// What paho_sys.py saw: the SUBACK codes, the last payload per topic, retained topics.
struct SysView {
    granted: String,
    messages: std::collections::HashMap<String, String>,
    retained: Vec<String>,
}

fn read_sys(port: u16, user: &str, seconds: &str) -> SysView {
    let out = std::process::Command::new("python3")
        .arg(common::repo_root().join("tests/interop/paho_sys.py"))
        .args([&port.to_string(), user, seconds])
        .output()
        .expect("python3 with paho-mqtt (scripts/test installs it)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut view = SysView {
        granted: String::new(),
        messages: Default::default(),
        retained: Vec::new(),
    };
    for line in text.lines() {
        if let Some(g) = line.strip_prefix("granted ") {
            view.granted = g.to_string();
        } else if let Some(m) = line.strip_prefix("message ") {
            let (topic, payload) = m.split_once('\t').unwrap();
            view.messages.insert(topic.to_string(), payload.to_string());
        } else if let Some(t) = line.strip_prefix("retained ") {
            view.retained.push(t.to_string());
        }
    }
    view
}

#[test]
fn sys_topics_are_read_with_paho_where_the_acl_allows_and_hidden_from_wildcards() {
    // app may read $SYS too: only the wildcard rule keeps it from its "#".
    let acl = "user app\ntopic readwrite #\ntopic read $SYS/#\n\nuser ops\ntopic read $SYS/#\n";
    let broker = Broker::run_with_sys(
        Default::default(),
        Box::new(tern_store::MemoryStore::new()),
        access(acl),
        None,
        vec![Spec::tcp()],
        Some(Duration::from_millis(300)),
    );
    let port = broker.port;
    // Known activity: a retained message, a subscription, 5 QoS 1 publishes.
    let mut app = connect_as(port, "app", false, Some("app"));
    app.subscribe("#", QoS::AtMostOnce);
    let mut publisher = connect_as(port, "pub", false, Some("app"));
    let mut retained = publish("app/state", QoS::AtMostOnce, 1);
    retained.retain = true;
    publisher.send(Packet::Publish(retained));
    assert_eq!(take(&mut app).0, "app/state");
    for _ in 0..4 {
        assert_eq!(publish_1(&mut publisher, "app/x"), ReasonCode::Success);
        assert_eq!(take(&mut app).0, "app/x");
    }

    // ops may read $SYS; it arrives retained (the first time) and describes the broker.
    let ops = read_sys(port, "ops", "1.0");
    assert_eq!(ops.granted, "0", "ops may subscribe to $SYS/#");
    let m = &ops.messages;
    let v = |t: &str| {
        m.get(&format!("$SYS/broker/{t}"))
            .unwrap_or_else(|| panic!("$SYS/broker/{t} not received; got {m:?}"))
            .clone()
    };
    assert_eq!(
        v("version"),
        format!("tern version {}", env!("CARGO_PKG_VERSION"))
    );
    assert!(v("uptime").ends_with(" seconds"), "{}", v("uptime"));
    // app, pub and the paho reader itself.
    assert_eq!(v("clients/connected"), "3");
    assert_eq!(v("clients/total"), "3");
    assert_eq!(v("clients/disconnected"), "0");
    // app's "#" and the reader's "$SYS/#".
    assert_eq!(v("subscriptions/count"), "2");
    assert_eq!(v("retained messages/count"), "1", "$SYS's own not counted");
    assert_eq!(v("publish/messages/received"), "5");
    assert!(v("bytes/received").parse::<u64>().unwrap() > 0);
    assert!(v("load/publish/received/1min").parse::<f64>().is_ok());
    assert!(ops.retained.contains(&"$SYS/broker/version".to_string()));

    // Anonymous clients are refused $SYS/# by this ACL (3.1.1: 0x80) and see nothing.
    let anonymous = read_sys(port, "-", "0.5");
    assert_eq!(anonymous.granted, "128");
    assert!(anonymous.messages.is_empty(), "{:?}", anonymous.messages);

    // "#" never matches $SYS [MQTT-4.7.2-1]: after several intervals, app's next message
    // is the marker.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(publish_1(&mut publisher, "app/marker"), ReasonCode::Success);
    assert_eq!(take(&mut app).0, "app/marker");
}

#[test]
fn readiness_follows_startup_and_shutdown_while_health_stays_up() {
    use tern_broker::server::{Listener, Monitor, Server, run, serve_monitor};
    let monitor = Monitor::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let http = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let http_port = http.local_addr().unwrap().port();
    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let endpoint = rt.spawn(serve_monitor(http, monitor.clone(), async {
        let _ = http_stopped.await;
    }));

    // Startup: the endpoint answers before the server runs; not ready yet.
    assert_eq!(get(http_port, "/healthz").0, 200);
    assert_eq!(get(http_port, "/readyz").0, 503);
    let (status, metrics) = get(http_port, "/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("tern_build_info"));
    assert!(
        !metrics.contains("tern_sessions{"),
        "no core, no gauges yet"
    );

    let socket = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = socket.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = Server {
        listeners: vec![Listener::tcp(socket)],
        settings: Default::default(),
        persistence: None,
        access: AccessControl::new(Access::open()),
        max_connections: None,
        monitor: monitor.clone(),
        sys_interval: None,
        cluster: None,
    };
    let running = rt.spawn(run(server, async {
        let _ = stopped.await;
    }));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while get(http_port, "/readyz").0 != 200 {
        assert!(std::time::Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    let client = connect(port, "c", false);
    let (_, metrics) = get(http_port, "/metrics");
    assert_eq!(value(&metrics, "tern_sessions{state=\"online\"}"), 1.0);
    assert_eq!(get(http_port, "/nothing").0, 404);

    // Shutdown: not ready as soon as it begins, and after; health still answers.
    stop.send(()).unwrap();
    rt.block_on(running).unwrap().unwrap();
    assert!(!monitor.is_ready());
    assert_eq!(get(http_port, "/readyz").0, 503);
    assert_eq!(get(http_port, "/healthz").0, 200);
    drop(client);
    http_stop.send(()).unwrap();
    rt.block_on(endpoint).unwrap();
}

/// `tern_internal_latency_seconds` runs from the read that brought a message to the write
/// that sends it on, not from whenever the core last woke up: at a few messages a second
/// the two differ by the idle time between messages (it used to be counted, so the
/// histogram showed milliseconds where the broker took microseconds).
#[test]
fn internal_latency_runs_from_the_read_not_from_the_idle_time_before_it() {
    let broker = Broker::run(
        tern_broker::core::Settings::default(),
        Box::new(tern_store::MemoryStore::new()),
        AccessControl::new(Access::open()),
        None,
        vec![Spec::tcp()],
    );
    let mut sub = connect(broker.port, "lat-sub", false);
    sub.subscribe("lat/#", QoS::AtMostOnce);
    let mut publisher = connect(broker.port, "lat-pub", false);
    for n in 1..=5 {
        // Idle in between: the core waits, then a tick (every 500 ms) may wake it.
        std::thread::sleep(Duration::from_millis(300));
        publisher.send(Packet::Publish(publish("lat/x", QoS::AtMostOnce, n)));
        assert_eq!(next(&mut sub).topic.as_str(), "lat/x");
    }
    let (_, m) = get(broker.monitor_port, "/metrics");
    assert_eq!(
        value(&m, "tern_internal_latency_seconds_count{qos=\"0\"}"),
        5.0
    );
    let total = value(&m, "tern_internal_latency_seconds_sum{qos=\"0\"}");
    // Five reads, routes and writes take well under a millisecond; the idle time they
    // were preceded by adds up to about a second.
    assert!(
        total < 0.1,
        "5 messages counted {total} s of internal latency"
    );
}
