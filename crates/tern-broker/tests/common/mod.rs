//! A broker on an ephemeral port for one test, stopped when dropped.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::path::PathBuf;

/// GET `path` from the metrics/health endpoint on `port`: the status code and the body.
pub fn get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs one claim of `tests/interop/paho_broker.py` at protocol `level` against a fresh
/// broker with `settings`; fails the test with the script's output if the claim fails.
pub fn paho_claim(name: &str, level: &str, settings: tern_broker::core::Settings) {
    let broker = Broker::with(settings);
    let out = std::process::Command::new("python3")
        .arg(repo_root().join("tests/interop/paho_broker.py"))
        .arg(broker.port.to_string())
        .arg(level)
        .arg(name)
        .output()
        .expect("python3 with paho-mqtt (scripts/test installs it)");
    assert!(
        out.status.success(),
        "{name} (protocol level {level}):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One listener of a test broker.
pub struct Spec {
    pub transport: tern_broker::server::Transport,
    pub max_connections: Option<usize>,
    pub allow_anonymous: Option<bool>,
    pub cert_username: bool,
    pub write_coalesce: Option<std::time::Duration>,
}

impl Spec {
    pub fn new(transport: tern_broker::server::Transport) -> Spec {
        Spec {
            transport,
            max_connections: None,
            allow_anonymous: None,
            cert_username: false,
            write_coalesce: None,
        }
    }

    pub fn tcp() -> Spec {
        Spec::new(tern_broker::server::Transport::Tcp)
    }
}

pub struct Broker {
    /// The first listener's port.
    pub port: u16,
    /// Every listener's port, in the order given.
    pub ports: Vec<u16>,
    /// The metrics/health endpoint's port.
    pub monitor_port: u16,
    /// What the endpoint reports on.
    pub monitor: tern_broker::server::Monitor,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Broker {
    pub fn start() -> Broker {
        Broker::with(tern_broker::core::Settings::default())
    }

    pub fn with(settings: tern_broker::core::Settings) -> Broker {
        Broker::with_store(settings, Box::new(tern_store::MemoryStore::new()))
    }

    /// A broker persisting to `store` (group commit through the storage writer).
    pub fn with_store(
        settings: tern_broker::core::Settings,
        store: Box<dyn tern_store::Store>,
    ) -> Broker {
        Broker::with_all(settings, store, tern_broker::auth::Access::open())
    }

    /// A broker letting in whom `access` says.
    pub fn with_access(access: tern_broker::auth::Access) -> Broker {
        Broker::with_all(
            tern_broker::core::Settings::default(),
            Box::new(tern_store::MemoryStore::new()),
            access,
        )
    }

    fn with_all(
        settings: tern_broker::core::Settings,
        store: Box<dyn tern_store::Store>,
        access: tern_broker::auth::Access,
    ) -> Broker {
        Broker::run(
            settings,
            store,
            tern_broker::server::AccessControl::new(access),
            None,
            vec![Spec::tcp()],
        )
    }

    /// A broker with these listeners (each on an ephemeral loopback port), at most
    /// `max_connections` connections over all of them, and `access` (kept by the caller
    /// to replace it, as SIGHUP does).
    pub fn run(
        settings: tern_broker::core::Settings,
        store: Box<dyn tern_store::Store>,
        access: tern_broker::server::AccessControl,
        max_connections: Option<usize>,
        specs: Vec<Spec>,
    ) -> Broker {
        Broker::run_with_sys(settings, store, access, max_connections, specs, None)
    }

    /// As [`Broker::run`], publishing `$SYS` every `sys_interval`.
    pub fn run_with_sys(
        settings: tern_broker::core::Settings,
        store: Box<dyn tern_store::Store>,
        access: tern_broker::server::AccessControl,
        max_connections: Option<usize>,
        specs: Vec<Spec>,
        sys_interval: Option<std::time::Duration>,
    ) -> Broker {
        let monitor = tern_broker::server::Monitor::new();
        let server_monitor = monitor.clone();
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut listeners = Vec::new();
                let mut ports = Vec::new();
                for spec in specs {
                    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                    ports.push(socket.local_addr().unwrap().port());
                    listeners.push(tern_broker::server::Listener {
                        socket,
                        transport: spec.transport,
                        max_connections: spec.max_connections,
                        allow_anonymous: spec.allow_anonymous,
                        cert_username: spec.cert_username,
                        write_coalesce: spec.write_coalesce,
                    });
                }
                let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let monitor_port = http.local_addr().unwrap().port();
                let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
                let http = tokio::spawn(tern_broker::server::serve_monitor(
                    http,
                    server_monitor.clone(),
                    async {
                        let _ = http_stopped.await;
                    },
                ));
                port_tx.send((ports, monitor_port)).unwrap();
                let server = tern_broker::server::Server {
                    listeners,
                    settings,
                    persistence: Some(tern_broker::server::Persistence {
                        store,
                        flush_every: None,
                    }),
                    access,
                    max_connections,
                    monitor: server_monitor,
                    sys_interval,
                    cluster: None,
                };
                tern_broker::server::run(server, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
                let _ = http_stop.send(());
                let _ = http.await;
            });
        });
        let (ports, monitor_port) = port_rx.recv().unwrap();
        Broker {
            port: ports[0],
            ports,
            monitor_port,
            monitor,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A bare MQTT client over TCP, built on tern-codec, for tests that need exact control
/// (withholding acknowledgements, going silent, sending bad bytes).
pub struct Raw {
    sock: std::net::TcpStream,
    buf: bytes::BytesMut,
    pub v: tern_codec::Protocol,
}

impl Raw {
    pub fn connect(port: u16, connect: tern_codec::Connect) -> (Raw, tern_codec::ConnAck) {
        let sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut raw = Raw {
            sock,
            buf: bytes::BytesMut::new(),
            v: connect.protocol,
        };
        raw.send(tern_codec::Packet::Connect(Box::new(connect)));
        match raw.recv() {
            Some(tern_codec::Packet::ConnAck(a)) => (raw, a),
            other => panic!("want CONNACK, got {other:?}"),
        }
    }

    pub fn send(&mut self, p: tern_codec::Packet) {
        use std::io::Write;
        let mut out = bytes::BytesMut::new();
        tern_codec::encode(&p, self.v, &mut out).unwrap();
        self.sock.write_all(&out).unwrap();
    }

    /// Stops sending (TCP half-close); the read side stays open.
    pub fn shutdown_write(&self) {
        self.sock.shutdown(std::net::Shutdown::Write).unwrap();
    }

    /// A second handle on the socket, for writing from another thread.
    pub fn writer(&self) -> std::net::TcpStream {
        self.sock.try_clone().unwrap()
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.sock.write_all(bytes).unwrap();
    }

    /// Whether a packet arrives within `d` (the connection open); it is consumed.
    pub fn gets_within(&mut self, d: std::time::Duration) -> bool {
        use std::io::Read;
        if tern_codec::decode(&mut self.buf, self.v, tern_codec::MAX_PACKET_SIZE)
            .unwrap()
            .is_some()
        {
            return true;
        }
        self.sock.set_read_timeout(Some(d)).unwrap();
        let mut chunk = [0u8; 4096];
        let got = match self.sock.read(&mut chunk) {
            Ok(n) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            _ => false,
        };
        self.sock
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        got
    }

    /// Reads and drops whatever arrives until nothing has come for `quiet`.
    pub fn drain(&mut self, quiet: std::time::Duration) -> usize {
        use std::io::Read;
        self.sock.set_read_timeout(Some(quiet)).unwrap();
        let mut total = 0;
        let mut chunk = vec![0u8; 1 << 16];
        while let Ok(n) = self.sock.read(&mut chunk) {
            if n == 0 {
                break;
            }
            total += n;
        }
        self.buf.clear();
        total
    }

    /// The next packet, or None once the broker closed the connection.
    pub fn recv(&mut self) -> Option<tern_codec::Packet> {
        use std::io::Read;
        loop {
            if let Some(p) =
                tern_codec::decode(&mut self.buf, self.v, tern_codec::MAX_PACKET_SIZE).unwrap()
            {
                return Some(p);
            }
            let mut chunk = [0u8; 4096];
            match self.sock.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    pub fn subscribe(&mut self, filter: &str, qos: tern_codec::QoS) {
        let s = tern_codec::Subscribe {
            packet_id: std::num::NonZeroU16::new(1).unwrap(),
            subscriptions: vec![tern_codec::Subscription {
                filter: tern_codec::TopicFilter::new(filter).unwrap(),
                options: tern_codec::SubscriptionOptions {
                    qos,
                    ..Default::default()
                },
            }],
            properties: Default::default(),
        };
        self.send(tern_codec::Packet::Subscribe(s));
        assert!(matches!(self.recv(), Some(tern_codec::Packet::SubAck(_))));
    }
}
