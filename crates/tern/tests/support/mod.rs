//! What the `tern` binary's tests and benchmarks share: a broker process started from a
//! config file (killed when dropped), Debian's Mosquitto on a free port, certificates made
//! with rcgen, the RSS of a process.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A `tern broker --config FILE` process; killed however the test ends.
pub struct BrokerProcess {
    pub child: Child,
    /// Every listener's address, in config order (`127.0.0.1:PORT`).
    pub addrs: Vec<String>,
    /// The metrics endpoint's address, if it has one.
    pub metrics: Option<String>,
    /// What it prints after its listening line, line by line.
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl BrokerProcess {
    /// Starts `command` (the `tern` binary, maybe behind `taskset`) as `tern broker
    /// --config config` with `RUST_LOG=log` (unset if `log` is empty) and waits for its listening line (so `log`
    /// must let `tern=info` through). Unless the file has a `[metrics]` table, the
    /// metrics endpoint goes on an ephemeral port (tests run side by side).
    pub fn spawn(mut command: Command, config: &std::path::Path, log: &str) -> BrokerProcess {
        command.args(["broker", "--config", config.to_str().unwrap()]);
        if !std::fs::read_to_string(config)
            .unwrap()
            .contains("[metrics]")
        {
            command.args(["--metrics", "127.0.0.1:0"]);
        }
        if log.is_empty() {
            // The config file's [log] level decides.
            command.env_remove("RUST_LOG");
        } else {
            command.env("RUST_LOG", log);
        }
        let mut child = command
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut metrics = None;
        let addrs = loop {
            let line = lines
                .next()
                .expect("the broker says where it listens")
                .unwrap();
            if let Some(rest) = line.split("metrics on http://").nth(1) {
                metrics = rest.split('/').next().map(str::to_string);
            }
            if let Some(rest) = line.split("listening on ").nth(1) {
                // "127.0.0.1:1883 (tcp), 127.0.0.1:8883 (tls) (state in ...)"
                break rest
                    .split(", ")
                    .filter_map(|a| {
                        let a = a.split_whitespace().next()?;
                        a.contains(':').then(|| a.to_string())
                    })
                    .collect();
            }
        };
        let (tx, rx) = std::sync::mpsc::channel();
        // TERN_TEST_LOG=file: every broker's lines appended there too (for a failure's
        // story), each after its config's path.
        let mut copy = std::env::var_os("TERN_TEST_LOG").and_then(|f| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(f)
                .ok()
        });
        let name = config.display().to_string();
        std::thread::spawn(move || {
            use std::io::Write;
            for line in lines.map_while(Result::ok) {
                if let Some(f) = copy.as_mut() {
                    let _ = writeln!(f, "{name}: {line}");
                }
                let _ = tx.send(line);
            }
        });
        BrokerProcess {
            child,
            addrs,
            metrics,
            lines: rx,
        }
    }

    /// `tern broker` with a config written to `dir`: one TCP listener on an ephemeral
    /// port, then `extra` (more keys for that listener, or more tables), state in
    /// `dir/data`.
    pub fn in_dir(dir: &std::path::Path, extra: &str) -> BrokerProcess {
        BrokerProcess::in_dir_with(Command::new(env!("CARGO_BIN_EXE_tern")), dir, extra, "")
    }

    /// As [`BrokerProcess::in_dir`], started by `command` (the `tern` binary with its
    /// environment), with `storage` (more `[storage]` keys) after the data directory.
    pub fn in_dir_with(
        command: Command,
        dir: &std::path::Path,
        extra: &str,
        storage: &str,
    ) -> BrokerProcess {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("tern.toml");
        std::fs::write(
            &config,
            format!(
                "[[listener]]\nbind = \"127.0.0.1:0\"\n{extra}\n[storage]\ndata_dir = \"{}\"\n{storage}",
                dir.join("data").display()
            ),
        )
        .unwrap();
        BrokerProcess::spawn(command, &config, "tern=info")
    }

    /// The port of listener `n`.
    pub fn port(&self, n: usize) -> &str {
        self.addrs[n].rsplit_once(':').unwrap().1
    }

    /// Waits up to `within` for a line containing `text`; the lines before it are gone.
    pub fn wait_for(&self, text: &str, within: std::time::Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(text) => return Some(line),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Whether the process has ended.
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, and the exit code.
    pub fn stop(mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap().code()
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA and a server certificate for localhost it signed, written to `dir` as ca.pem,
/// server.pem and server.key; returns their paths in that order.
pub fn certificates(dir: &std::path::Path) -> [String; 3] {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Tern test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let paths =
        ["ca.pem", "server.pem", "server.key"].map(|f| dir.join(f).to_str().unwrap().to_string());
    std::fs::write(&paths[0], ca_cert.pem()).unwrap();
    std::fs::write(&paths[1], cert.pem()).unwrap();
    std::fs::write(&paths[2], key.serialize_pem()).unwrap();
    paths
}

/// Resident memory of process `pid`, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// GET `path` from an HTTP server at `addr`: the status code and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

/// Debian's Mosquitto on a free port (anonymous, no persistence), killed when dropped.
pub struct Mosquitto {
    child: Child,
    config: std::path::PathBuf,
}

impl Mosquitto {
    /// Started, and listening: its port. A port found free can be taken before Mosquitto
    /// binds it (Mosquitto then exits), so it is started again on another.
    pub fn start() -> (Mosquitto, u16) {
        for _attempt in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let config = std::env::temp_dir().join(format!("tern-mosq-{port}.conf"));
            std::fs::write(
                &config,
                format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
            )
            .unwrap();
            let child = Command::new("/usr/sbin/mosquitto")
                .arg("-c")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("mosquitto (scripts/test installs it)");
            let mut m = Mosquitto { child, config };
            for _ in 0..250 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return (m, port);
                }
                if m.child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        panic!("Mosquitto did not start listening in 5 attempts");
    }
}

/// Debian's Mosquitto on a fixed port with persistence in `dir`, which [`PersistentMosquitto::stop`]
/// stops (SIGTERM: it saves its state) and [`PersistentMosquitto::start_again`] starts on the same port.
pub struct PersistentMosquitto {
    child: Child,
    config: std::path::PathBuf,
    pub port: u16,
}

impl PersistentMosquitto {
    pub fn start(dir: &std::path::Path, port: u16) -> PersistentMosquitto {
        std::fs::create_dir_all(dir).unwrap();
        // Started as root, Mosquitto writes its file as the `mosquitto` user.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let config = dir.join("mosquitto.conf");
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 0\n",
                dir.display()
            ),
        )
        .unwrap();
        let child = PersistentMosquitto::spawn(&config, port);
        PersistentMosquitto {
            child,
            config,
            port,
        }
    }

    fn spawn(config: &std::path::Path, port: u16) -> Child {
        let mut child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (scripts/test installs it)");
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return child;
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "mosquitto exited (port {port} taken?)"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("mosquitto did not listen on {port}");
    }

    /// SIGTERM (Mosquitto writes its state to its file), and the end of the process.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    /// Starts it again after [`PersistentMosquitto::stop`].
    pub fn start_again(&mut self) {
        self.child = PersistentMosquitto::spawn(&self.config, self.port);
    }
}

impl Drop for PersistentMosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago (for a process that must come back on the same one).
/// A port free now for a server a test starts. Taken below the kernel's ephemeral range
/// (32768 and up here), where no outgoing connection can take it before the server binds
/// it (a port the kernel handed out for port 0 could be, and nats-server then failed to
/// listen); each test process starts at its own place (by pid) and counts up.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < SPAN, "no free port below the ephemeral range");
        let port = (LOW + (start + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// `p` as MQTT 3.1.1 bytes, for a raw client.
pub fn encoded(p: tern_codec::Packet) -> Vec<u8> {
    let mut b = bytes::BytesMut::new();
    tern_codec::encode(&p, tern_codec::Protocol::V3_1_1, &mut b).unwrap();
    b.to_vec()
}

/// What a [`Flow`]'s subscriber received of its publisher's messages.
#[derive(Debug)]
pub struct Delivered {
    /// Acknowledged to the publisher, never received.
    pub missing: Vec<usize>,
    /// QoS 2 messages received more than once.
    pub doubled_qos2: Vec<usize>,
    /// QoS 1 messages received more than once (allowed).
    pub again_qos1: usize,
    /// Messages received at another QoS than published.
    pub wrong_qos: Vec<usize>,
    /// Messages whose first copy came after the first copy of a later-published one.
    pub out_of_order: Vec<usize>,
}

impl Delivered {
    /// Says what arrived (`what` names the run), and asserts that every acknowledged
    /// message arrived, at its QoS, the QoS 2 ones exactly once.
    pub fn assert_each_once(&self, what: &str) {
        eprintln!(
            "{what}: missing {}; QoS 2 doubled: {}; QoS 1 delivered more than once: {}",
            self.missing.len(),
            self.doubled_qos2.len(),
            self.again_qos1
        );
        assert!(
            self.missing.is_empty(),
            "{what}: acknowledged, never received: {:?}",
            self.missing
        );
        assert!(
            self.wrong_qos.is_empty(),
            "{what}: at another QoS: {:?}",
            self.wrong_qos
        );
        assert!(
            self.doubled_qos2.is_empty(),
            "{what}: QoS 2 messages doubled: {:?}",
            self.doubled_qos2
        );
    }
}

/// A tern-client with a persistent session (an hour) that reconnects quickly (100 ms,
/// backing off to 1 s): the crash tests' clients.
pub fn persistent(port: u16, id: &str) -> tern_client::Options {
    tern_client::Options::new("127.0.0.1", port, id)
        .persistent(std::time::Duration::from_secs(3600))
        .reconnect(Some(tern_client::Backoff {
            initial: std::time::Duration::from_millis(100),
            max: std::time::Duration::from_secs(1),
        }))
}

/// [`persistent`] at the first of `ports`, failing over to the others in turn.
pub fn across(ports: &[u16], id: &str) -> tern_client::Options {
    ports[1..]
        .iter()
        .fold(persistent(ports[0], id), |o, &p| o.failover("127.0.0.1", p))
}

/// A crash test's traffic: a persistent QoS 2 subscriber at `sub_port` on `filter`, then a
/// persistent publisher at `pub_port` publishing `total` numbered messages to `topic` (QoS
/// 2 for even numbers, QoS 1 for odd), each awaited, `pace` apart; both reconnect quickly
/// to a broker that comes back on the same port.
pub struct Flow {
    rt: tokio::runtime::Runtime,
    seen: std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<usize, (usize, tern_client::QoS)>>,
    >,
    /// The messages in the order their first copies came.
    firsts: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    acked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    publisher: Option<tokio::task::JoinHandle<()>>,
    keeper: tern_client::Client,
    total: usize,
}

impl Flow {
    pub fn start(
        sub_port: u16,
        filter: &str,
        pub_port: u16,
        topic: &str,
        total: usize,
        pace: std::time::Duration,
    ) -> Flow {
        Flow::start_as("", sub_port, filter, pub_port, topic, total, pace)
    }

    /// [`Flow::start`] with its two clients' ids prefixed by `name` (for two flows at once).
    pub fn start_as(
        name: &str,
        sub_port: u16,
        filter: &str,
        pub_port: u16,
        topic: &str,
        total: usize,
        pace: std::time::Duration,
    ) -> Flow {
        Flow::start_bursts(
            name,
            &[sub_port],
            filter,
            &[pub_port],
            topic,
            total,
            pace,
            1,
        )
    }

    /// [`Flow::start_as`] with clients that connect to the first of their ports and
    /// reconnect to the next one each time (tern-client's failover: cluster nodes), and a
    /// publisher that sends, in turn, one message and `burst` messages at once (in order,
    /// all in flight together, each then awaited), `pace` after each: a broker reads a
    /// burst in one go and handles it as one round (`burst` 1: one at a time).
    #[allow(clippy::too_many_arguments)]
    pub fn start_bursts(
        name: &str,
        sub_ports: &[u16],
        filter: &str,
        pub_ports: &[u16],
        topic: &str,
        total: usize,
        pace: std::time::Duration,
        burst: usize,
    ) -> Flow {
        use std::sync::atomic::Ordering;
        use tern_client::{Client, Event, QoS};
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (keeper, mut events) = rt.block_on(async {
            let (c, e) = Client::connect(across(sub_ports, &format!("{name}keeper")))
                .await
                .unwrap();
            c.subscribe(filter, QoS::ExactlyOnce).await.unwrap();
            (c, e)
        });
        let seen: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<usize, (usize, QoS)>>> =
            Default::default();
        let record = seen.clone();
        let firsts: std::sync::Arc<std::sync::Mutex<Vec<usize>>> = Default::default();
        let first = firsts.clone();
        rt.spawn(async move {
            while let Some(e) = events.recv().await {
                if std::env::var_os("TERN_TEST_LOG").is_some() {
                    match &e {
                        Event::Message(m) => eprintln!(
                            "flow: got {} qos {:?}",
                            String::from_utf8_lossy(&m.payload),
                            m.qos
                        ),
                        other => eprintln!("flow: {other:?}"),
                    }
                }
                if let Event::Message(m) = e
                    && let Ok(i) = String::from_utf8_lossy(&m.payload).parse::<usize>()
                {
                    let mut seen = record.lock().unwrap();
                    let e = seen.entry(i).or_insert((0, m.qos));
                    if e.0 == 0 {
                        first.lock().unwrap().push(i);
                    }
                    e.0 += 1;
                }
            }
        });
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = acked.clone();
        let options = across(pub_ports, &format!("{name}maker"));
        let topic = topic.to_string();
        let publisher = rt.spawn(async move {
            let (c, _e) = Client::connect(options).await.unwrap();
            let mut i = 0;
            let mut turn = 0;
            while i < total {
                let n = if turn % 2 == 0 { 1 } else { burst.max(1) }.min(total - i);
                turn += 1;
                let sends = (i..i + n).map(|i| {
                    let qos = if i % 2 == 0 {
                        QoS::ExactlyOnce
                    } else {
                        QoS::AtLeastOnce
                    };
                    let c = &c;
                    let count = &count;
                    let topic = topic.as_str();
                    async move {
                        let r = c.publish(topic, i.to_string()).qos(qos).await.unwrap();
                        assert!(!r.is_error(), "message {i}: {r:?}");
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                });
                futures_util::future::join_all(sends).await;
                i += n;
                tokio::time::sleep(pace).await;
            }
            c.disconnect().await;
        });
        Flow {
            rt,
            seen,
            firsts,
            acked,
            publisher: Some(publisher),
            keeper,
            total,
        }
    }

    /// Messages the publisher's broker has acknowledged so far.
    pub fn acked(&self) -> usize {
        self.acked.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits (90 s at most) until `n` messages are acknowledged.
    pub fn wait_acked(&self, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        while self.acked() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "acknowledged {} of {n}",
                self.acked()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Waits for every message to be acknowledged and received (60 s at most, then half
    /// a second more for late duplicates), and says what arrived.
    pub fn finish(mut self) -> Delivered {
        use tern_client::QoS;
        self.wait_acked(self.total);
        if let Some(p) = self.publisher.take() {
            self.rt.block_on(p).unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while self.seen.lock().unwrap().len() < self.total && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        self.rt.block_on(self.keeper.disconnect());
        let seen = self.seen.lock().unwrap().clone();
        let mut d = Delivered {
            missing: (0..self.total).filter(|i| !seen.contains_key(i)).collect(),
            doubled_qos2: Vec::new(),
            again_qos1: 0,
            wrong_qos: Vec::new(),
            out_of_order: Vec::new(),
        };
        let mut latest = None;
        for &i in self.firsts.lock().unwrap().iter() {
            if latest.is_some_and(|l| i < l) {
                d.out_of_order.push(i);
            }
            latest = latest.max(Some(i));
        }
        let mut got: Vec<_> = seen.into_iter().collect();
        got.sort();
        for (i, (n, qos)) in got {
            let want = if i % 2 == 0 {
                QoS::ExactlyOnce
            } else {
                QoS::AtLeastOnce
            };
            if qos != want {
                d.wrong_qos.push(i);
            }
            match (want, n > 1) {
                (QoS::ExactlyOnce, true) => d.doubled_qos2.push(i),
                (_, true) => d.again_qos1 += 1,
                _ => {}
            }
        }
        d
    }
}
