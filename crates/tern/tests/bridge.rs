//! `[[bridge]]` against real brokers: Debian's Mosquitto and a second `tern broker`, with
//! mosquitto_pub/sub and tern-client as the applications at either end.
//!
//! Claims: messages cross in both directions at QoS 0, 1 and 2, at the QoS they were
//! published with, on the mapped topics; a route both ways does not loop; a QoS 1/2
//! message acknowledged at the edge reaches the remote's persistent subscriber (QoS 2
//! exactly once) although the remote is stopped and started again and the edge is killed
//! with SIGKILL and restarted while publishing goes on.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{BrokerProcess, Flow, Mosquitto, PersistentMosquitto, free_port};

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tern-bridge-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A `[[bridge]]` table named `cloud` to `127.0.0.1:remote` with `routes` (TOML of
/// `[[bridge.topic]]` tables), quick to reconnect.
fn bridge_table(remote: u16, protocol: &str, routes: &str) -> String {
    format!(
        "[[bridge]]\nname = \"cloud\"\naddress = \"mqtt://127.0.0.1:{remote}\"\nprotocol = \"{protocol}\"\nreconnect_min_ms = 100\nreconnect_max_ms = 1000\n{routes}"
    )
}

fn route(pattern: &str, direction: &str, qos: u8, remote_prefix: &str) -> String {
    format!(
        "[[bridge.topic]]\npattern = \"{pattern}\"\ndirection = \"{direction}\"\nqos = {qos}\nremote_prefix = \"{remote_prefix}\"\n"
    )
}

/// A broker on `port` (0: any) with `extra` tables, state in `dir/data`.
fn broker_on(dir: &std::path::Path, port: u16, extra: &str) -> BrokerProcess {
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join("tern.toml");
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nbind = \"127.0.0.1:{port}\"\n[storage]\ndata_dir = \"{}\"\n{extra}",
            dir.join("data").display()
        ),
    )
    .unwrap();
    BrokerProcess::spawn(
        Command::new(env!("CARGO_BIN_EXE_tern")),
        &config,
        "tern=info,tern_client=info",
    )
}

/// Waits until the bridge has subscribed on each of `sides` ("local", "remote").
fn wait_subscribed(broker: &BrokerProcess, sides: &[&str]) {
    let mut left: Vec<&str> = sides.to_vec();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !left.is_empty() {
        let within = deadline.saturating_duration_since(Instant::now());
        let line = broker
            .wait_for("bridge subscribed", within)
            .unwrap_or_else(|| panic!("the bridge did not subscribe on {left:?}"));
        left.retain(|side| {
            !line.contains(&format!("side=\"{side}\"")) && !line.contains(&format!("side={side}"))
        });
    }
}

/// `mosquitto_sub` printing `QOS TOPIC PAYLOAD` lines for `count` messages (10 s at most).
fn sub(port: u16, filter: &str, count: usize) -> Child {
    let child = Command::new("mosquitto_sub")
        .args([
            "-p",
            &port.to_string(),
            "-t",
            filter,
            "-q",
            "2",
            "-V",
            "mqttv5",
        ])
        .args(["-F", "%q %t %p", "-C", &count.to_string(), "-W", "10"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // mosquitto_sub says nothing once subscribed.
    std::thread::sleep(Duration::from_millis(500));
    child
}

fn lines(child: Child) -> Vec<String> {
    let out = child.wait_with_output().unwrap();
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

fn publish(port: u16, topic: &str, payload: &str, qos: u8) {
    let ok = Command::new("mosquitto_pub")
        .args(["-p", &port.to_string(), "-t", topic, "-m", payload])
        .args(["-q", &qos.to_string(), "-V", "mqttv5"])
        .status()
        .unwrap()
        .success();
    assert!(ok, "mosquitto_pub to {port} {topic}");
}

/// Out and in at QoS 0, 1 and 2 through a bridge to `remote_port`.
fn both_ways(name: &str, remote_port: u16, protocol: &str) {
    let d = dir(name);
    let routes = route("up/#", "out", 2, "site-1/") + &route("down/#", "in", 2, "site-1/");
    let edge = broker_on(&d, 0, &bridge_table(remote_port, protocol, &routes));
    wait_subscribed(&edge, &["local", "remote"]);
    let edge_port: u16 = edge.port(0).parse().unwrap();
    let at_remote = sub(remote_port, "site-1/up/#", 3);
    let at_edge = sub(edge_port, "down/#", 3);
    for q in 0..3u8 {
        publish(edge_port, &format!("up/q{q}"), &format!("u{q}"), q);
        publish(
            remote_port,
            &format!("site-1/down/q{q}"),
            &format!("d{q}"),
            q,
        );
    }
    assert_eq!(
        lines(at_remote),
        [
            "0 site-1/up/q0 u0",
            "1 site-1/up/q1 u1",
            "2 site-1/up/q2 u2"
        ],
        "out: each message at its QoS, under the remote prefix"
    );
    assert_eq!(
        lines(at_edge),
        ["0 down/q0 d0", "1 down/q1 d1", "2 down/q2 d2"],
        "in: each message at its QoS, the prefix taken off"
    );
    // A retained message stays retained at the remote (a subscriber that comes later gets
    // it, RETAIN set), with its user properties in 5.0.
    assert!(
        Command::new("mosquitto_pub")
            .args([
                "-p",
                &edge_port.to_string(),
                "-t",
                "up/state",
                "-m",
                "on",
                "-q",
                "1",
                "-r"
            ])
            .args(["-V", "mqttv5", "-D", "publish", "user-property", "k", "v"])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let want = if protocol == "5" {
        "1 site-1/up/state on k:v"
    } else {
        "1 site-1/up/state on "
    };
    loop {
        let out = Command::new("mosquitto_sub")
            .args([
                "-p",
                &remote_port.to_string(),
                "-t",
                "site-1/up/state",
                "-V",
                "mqttv5",
            ])
            .args(["-F", "%r %t %p %P", "-C", "1", "-W", "2"])
            .output()
            .unwrap();
        let got = String::from_utf8_lossy(&out.stdout)
            .trim_end_matches('\n')
            .to_string();
        if got == want.trim_end() || got == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "retained at the remote: got {got:?}, want {want:?}"
        );
    }
}

#[test]
fn a_bridge_to_mosquitto_carries_every_qos_both_ways() {
    let (_mosquitto, port) = Mosquitto::start();
    both_ways("mosq", port, "5");
}

#[test]
fn a_bridge_to_mosquitto_at_3_1_1_carries_every_qos_both_ways() {
    let (_mosquitto, port) = Mosquitto::start();
    both_ways("mosq311", port, "3.1.1");
}

#[test]
fn a_bridge_to_another_tern_carries_every_qos_both_ways() {
    let d = dir("cloud-both");
    let cloud = broker_on(&d, 0, "");
    both_ways("tern", cloud.port(0).parse().unwrap(), "5");
}

/// Two brokers, one route both ways on the same topics: a message published on either
/// reaches the subscribers of both once, and nothing comes back.
#[test]
fn a_route_both_ways_does_not_loop() {
    let d = dir("loop");
    let cloud = broker_on(&d.join("cloud"), 0, "");
    let cloud_port: u16 = cloud.port(0).parse().unwrap();
    let edge = broker_on(
        &d.join("edge"),
        0,
        &bridge_table(cloud_port, "5", &route("chat/#", "both", 2, "")),
    );
    wait_subscribed(&edge, &["local", "remote"]);
    let edge_port: u16 = edge.port(0).parse().unwrap();
    // More than two would come if anything looped; -W ends them.
    let at_cloud = sub(cloud_port, "chat/#", 10);
    let at_edge = sub(edge_port, "chat/#", 10);
    publish(edge_port, "chat/a", "from-edge", 1);
    publish(cloud_port, "chat/b", "from-cloud", 2);
    let (c, e) = (lines(at_cloud), lines(at_edge));
    assert_eq!(
        c,
        ["1 chat/a from-edge", "2 chat/b from-cloud"],
        "at the cloud"
    );
    assert_eq!(
        e,
        ["1 chat/a from-edge", "2 chat/b from-cloud"],
        "at the edge"
    );
    let metrics = support::http_get(edge.metrics.as_ref().unwrap(), "/metrics").1;
    for line in [
        "tern_bridge_forwarded_total{bridge=\"cloud\",direction=\"out\"} 1",
        "tern_bridge_forwarded_total{bridge=\"cloud\",direction=\"in\"} 1",
        "tern_bridge_connected{bridge=\"cloud\",side=\"remote\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
}

/// Publishes 600 messages to the edge (QoS 2 for even numbers, 1 for odd) while the
/// remote goes away (`remote_down`), the edge is killed with SIGKILL and restarted, the
/// remote comes back (`remote_up`) and the edge is killed and restarted again; then every
/// one must reach the remote's subscriber, QoS 2 ones once.
fn through_failures(
    d: &std::path::Path,
    remote_port: u16,
    mut remote_down: impl FnMut(),
    mut remote_up: impl FnMut(),
) {
    let edge_port = free_port();
    let edge_config = bridge_table(remote_port, "5", &route("up/#", "out", 2, "site-1/"));
    let mut edge = broker_on(&d.join("edge"), edge_port, &edge_config);
    wait_subscribed(&edge, &["local"]);
    // The remote's subscriber and the edge's publisher, both persistent: what the
    // publisher has in flight at a kill is resent to the restarted edge.
    let flow = Flow::start(
        remote_port,
        "site-1/up/#",
        edge_port,
        "up/m",
        600,
        Duration::from_millis(2),
    );
    let after = |more: usize| flow.acked() + more;
    flow.wait_acked(100);
    remote_down();
    // The edge goes on acknowledging while the remote is away; what it acknowledged
    // waits in the bridge's file, which a SIGKILL of the edge must not lose.
    flow.wait_acked(after(100));
    drop(edge);
    edge = broker_on(&d.join("edge"), edge_port, &edge_config);
    flow.wait_acked(after(100));
    remote_up();
    // SIGKILL the edge again while messages flow to the remote.
    flow.wait_acked(after(100));
    drop(edge);
    edge = broker_on(&d.join("edge"), edge_port, &edge_config);
    let got = flow.finish();
    assert!(
        got.missing.is_empty(),
        "acknowledged at the edge, never at the remote: {:?}",
        got.missing
    );
    assert!(
        got.doubled_qos2.is_empty(),
        "QoS 2 messages delivered twice: {:?}",
        got.doubled_qos2
    );
    assert!(
        got.wrong_qos.is_empty(),
        "at another QoS: {:?}",
        got.wrong_qos
    );
    drop(edge);
}

#[test]
fn everything_acknowledged_at_the_edge_reaches_a_tern_remote_through_sigkills() {
    let d = dir("kills-tern");
    let remote_port = free_port();
    let remote = Arc::new(Mutex::new(Some(broker_on(
        &d.join("cloud"),
        remote_port,
        "",
    ))));
    let (down, up) = (remote.clone(), remote.clone());
    let cloud = d.join("cloud");
    through_failures(
        &d,
        remote_port,
        move || drop(down.lock().unwrap().take()), // SIGKILL
        move || *up.lock().unwrap() = Some(broker_on(&cloud, remote_port, "")),
    );
}

#[test]
fn everything_acknowledged_at_the_edge_reaches_a_mosquitto_remote_across_its_restart() {
    let d = dir("kills-mosq");
    let mosquitto = Arc::new(Mutex::new(PersistentMosquitto::start(
        &d.join("mosquitto"),
        free_port(),
    )));
    let port = mosquitto.lock().unwrap().port;
    let (down, up) = (mosquitto.clone(), mosquitto.clone());
    through_failures(
        &d,
        port,
        move || down.lock().unwrap().stop(),
        move || up.lock().unwrap().start_again(),
    );
}

/// The remote reached over TLS (`mqtts://`) and over WebSocket on TLS (`wss://`), its
/// certificate checked against `ca_file`: messages go out at QoS 2 on each.
#[test]
fn a_bridge_reaches_its_remote_over_tls_and_secure_websocket() {
    let d = dir("tls");
    let [ca, cert, key] = support::certificates(&d);
    let cloud = BrokerProcess::in_dir(
        &d.join("cloud"),
        &format!(
            "transport = \"tls\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n\
             [[listener]]\nbind = \"127.0.0.1:0\"\ntransport = \"wss\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n\
             [[listener]]\nbind = \"127.0.0.1:0\"\n"
        ),
    );
    let plain: u16 = cloud.port(2).parse().unwrap();
    for (name, address) in [
        ("tls", format!("mqtts://localhost:{}", cloud.port(0))),
        ("wss", format!("wss://localhost:{}/mqtt", cloud.port(1))),
    ] {
        let table = format!(
            "[[bridge]]\nname = \"{name}\"\naddress = \"{address}\"\nca_file = \"{ca}\"\nreconnect_min_ms = 100\n{}",
            route("up/#", "out", 2, &format!("{name}/"))
        );
        let edge = broker_on(&d.join(name), 0, &table);
        wait_subscribed(&edge, &["local"]);
        let edge_port: u16 = edge.port(0).parse().unwrap();
        // The remote side is connected once its metric says so.
        let deadline = Instant::now() + Duration::from_secs(20);
        let connected = format!("tern_bridge_connected{{bridge=\"{name}\",side=\"remote\"}} 1");
        while !support::http_get(edge.metrics.as_ref().unwrap(), "/metrics")
            .1
            .contains(&connected)
        {
            assert!(
                Instant::now() < deadline,
                "{name}: the bridge did not connect"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let at_cloud = sub(plain, &format!("{name}/up/#"), 1);
        publish(edge_port, "up/x", name, 2);
        assert_eq!(
            lines(at_cloud),
            [format!("2 {name}/up/x {name}")],
            "over {name}"
        );
    }
}
