//! `tern pub` and `tern sub` as a user runs them: against `tern broker` and Debian's
//! Mosquitto, next to mosquitto_pub/mosquitto_sub; their exit codes and messages; and the
//! `--outbox` of `tern pub` surviving a `kill -9` of the publishing process.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::BrokerProcess;

fn tern(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tern"));
    c.args(args);
    c
}

fn run(args: &[&str]) -> Output {
    tern(args).stdin(Stdio::null()).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A child killed however the test ends.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tern sub ARGS -d`, returned once it has said it subscribed.
fn subscriber(args: &[&str]) -> Guard {
    let mut child = tern(&["sub"])
        .args(args)
        .arg("-d")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        let line = err.next().expect("tern sub says it subscribed").unwrap();
        if line.contains("subscribed to") {
            break;
        }
    }
    std::thread::spawn(move || for _ in err {});
    Guard(child)
}

/// Waits for the subscriber to exit (within 20 s): its exit code and what it printed.
fn finish(mut sub: Guard) -> (Option<i32>, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while sub.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "tern sub did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    sub.0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    (sub.0.wait().unwrap().code(), out)
}

/// The broker process (killed on drop, by its guard) and its config file.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every QoS in both protocol versions, retained, formats, and the Mosquitto tools on the
/// other end, through the broker at `port`.
fn pub_and_sub_through(port: &str, name: &str) {
    let sub = subscriber(&[
        "-p",
        port,
        "-t",
        "cli/#",
        "-q",
        "2",
        "-C",
        "4",
        "-F",
        "%t|%q|%r|%p",
    ]);
    for (topic, qos, version) in [
        ("cli/zero", "0", "5"),
        ("cli/one", "1", "5"),
        ("cli/two", "2", "5"),
        ("cli/old", "2", "311"),
    ] {
        let o = run(&[
            "pub", "-p", port, "-t", topic, "-m", "hello", "-q", qos, "-V", version,
        ]);
        assert_eq!(o.status.code(), Some(0), "{name} {topic}: {}", stderr(&o));
    }
    let (code, out) = finish(sub);
    assert_eq!(code, Some(0), "{name}: -C 4 reached");
    assert_eq!(
        out, "cli/zero|0|0|hello\ncli/one|1|0|hello\ncli/two|2|0|hello\ncli/old|2|0|hello\n",
        "{name}"
    );

    // Retained, with lines from stdin: the last line is what a later subscriber reads.
    let mut p = tern(&["pub", "-p", port, "-t", "cli/state", "-l", "-r", "-q", "1"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(b"off\non\n").unwrap();
    assert_eq!(p.wait().unwrap().code(), Some(0), "{name}");
    let o = run(&[
        "sub", "-p", port, "-t", "cli/+", "-C", "1", "-v", "-W", "10",
    ]);
    assert_eq!(
        (o.status.code(), String::from_utf8_lossy(&o.stdout).as_ref()),
        (Some(0), "cli/state on\n"),
        "{name}: {}",
        stderr(&o)
    );

    // mosquitto_pub to tern sub, tern pub to mosquitto_sub.
    let sub = subscriber(&["-p", port, "-t", "from/mosquitto", "-C", "1"]);
    let o = Command::new("mosquitto_pub")
        .args([
            "-p",
            port,
            "-t",
            "from/mosquitto",
            "-m",
            "hi tern",
            "-q",
            "1",
        ])
        .output()
        .expect("mosquitto_pub (scripts/test installs mosquitto-clients)");
    assert!(o.status.success(), "{name}");
    assert_eq!(finish(sub), (Some(0), "hi tern\n".to_string()), "{name}");
    let mut msub = Guard(
        Command::new("mosquitto_sub")
            .args([
                "-p",
                port,
                "-t",
                "from/tern",
                "-C",
                "1",
                "-W",
                "10",
                "-q",
                "1",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // mosquitto_sub says nothing when it has subscribed: publish until it has one.
    let deadline = Instant::now() + Duration::from_secs(10);
    while msub.0.try_wait().unwrap().is_none() && Instant::now() < deadline {
        let o = run(&["pub", "-p", port, "-t", "from/tern", "-m", "hi mosquitto"]);
        assert_eq!(o.status.code(), Some(0), "{name}: {}", stderr(&o));
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut out = String::new();
    msub.0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out, "hi mosquitto\n", "{name}");
}

#[test]
fn tern_pub_and_tern_sub_carry_every_qos_retained_and_formats_through_tern_and_mosquitto() {
    let dir = std::env::temp_dir().join(format!("tern-pubsub-{}", free_port()));
    let broker = BrokerProcess::in_dir(&dir, "");
    pub_and_sub_through(broker.port(0), "tern");
    let (_mosquitto, port) = support::Mosquitto::start();
    pub_and_sub_through(&port.to_string(), "mosquitto");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tern_pub_and_tern_sub_exit_codes_and_messages_say_what_happened() {
    let dir = std::env::temp_dir().join(format!("tern-pubsub-codes-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let passwords = dir.join("passwords");
    let acl = dir.join("acl");
    assert!(
        run(&[
            "passwd",
            "-b",
            passwords.to_str().unwrap(),
            "alice",
            "secret"
        ])
        .status
        .success()
    );
    std::fs::write(&acl, "user alice\ntopic readwrite alice/#\n").unwrap();
    let broker = BrokerProcess::in_dir(
        &dir,
        &format!(
            "[auth]\npassword_file = \"{}\"\nacl_file = \"{}\"\nallow_anonymous = false\n",
            passwords.display(),
            acl.display()
        ),
    );
    let port = broker.port(0);
    let check = |args: &[&str], code: i32, says: &[&str]| {
        let o = run(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
        for s in says {
            assert!(err.contains(s), "{args:?} should say '{s}': {err}");
        }
    };
    let alice = ["-p", port, "-u", "alice", "-P", "secret"];
    let with = |cmd: &str, extra: &[&'static str]| -> Vec<String> {
        let mut v = vec![cmd.to_string()];
        v.extend(alice.iter().map(|s| s.to_string()));
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };

    // Nothing listens: 1.
    let closed = free_port().to_string();
    check(
        &["pub", "-p", &closed, "-t", "a", "-m", "x"],
        1,
        &["cannot connect to", "refused"],
    );
    // Bad credentials, both versions: 3 with the reason.
    for v in ["5", "311"] {
        check(
            &[
                "pub", "-p", port, "-u", "alice", "-P", "wrong", "-V", v, "-t", "alice/x", "-m",
                "x",
            ],
            3,
            &["refused the connection", "bad username or password"],
        );
    }
    check(
        &["sub", "-p", port, "-t", "alice/x"],
        3,
        &["refused the connection", "not authorized"],
    );
    // The ACL: a publish refused (5.0 PUBACK 0x87) and a subscription refused: 4.
    check(
        &as_refs(&with("pub", &["-t", "bob/x", "-m", "x", "-q", "1"])),
        4,
        &["refused a message on 'bob/x'", "0x87"],
    );
    check(
        &as_refs(&with("sub", &["-t", "bob/#"])),
        4,
        &["refused the subscription to 'bob/#'", "0x87"],
    );
    // Allowed, and nothing comes: the timeout, 27.
    check(
        &as_refs(&with("sub", &["-t", "alice/#", "-W", "1"])),
        27,
        &["timed out after 1 s"],
    );
    // Usage: 2, naming the problem.
    check(
        &["pub", "-t", "a", "-m", "x", "-q", "3"],
        2,
        &["QoS is 0, 1 or 2"],
    );
    check(
        &["pub", "-t"],
        2,
        &["a value is required for '--topic <TOPIC>'"],
    );
    check(&["pub", "-t", "a"], 2, &["no message"]);
    check(
        &["pub", "-t", "a/#", "-m", "x", "-p", port],
        2,
        &["'a/#' is not a topic"],
    );
    check(&["sub", "-c", "-t", "a"], 2, &["needs a client id"]);
    check(
        &["sub", "-t", "a", "--bogus"],
        2,
        &["unexpected argument '--bogus'"],
    );
    check(
        &["sub", "-t", "a", "--cafile", "/nonexistent/ca.pem"],
        2,
        &["/nonexistent/ca.pem"],
    );
    check(&["sub", "--url", "http://x", "-t", "a"], 2, &["scheme"]);
    // And the happy path through the same ACL: 0.
    let o = run(&as_refs(&with(
        "pub",
        &["-t", "alice/x", "-m", "x", "-q", "2"],
    )));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

fn as_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// One MQTT packet from `s`: its bytes, or `None` at the end of the stream.
fn read_packet(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut packet = vec![0u8; 1];
    s.read_exact(&mut packet).ok()?;
    let mut len = 0usize;
    for shift in [0, 7, 14, 21] {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).ok()?;
        packet.push(b[0]);
        len |= usize::from(b[0] & 0x7F) << shift;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let start = packet.len();
    packet.resize(start + len, 0);
    s.read_exact(&mut packet[start..]).ok()?;
    Some(packet)
}

/// A proxy for one connection to `port` that lets the CONNECT and CONNACK through, then
/// the first `forward` PUBLISH packets (and everything else) from the client, but nothing
/// more from the broker: acknowledgements never reach the client. Counts the PUBLISH
/// packets the client sent.
fn withholding_proxy(port: u16, forward: usize) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = listener.local_addr().unwrap().port();
    let publishes = Arc::new(AtomicUsize::new(0));
    let counted = publishes.clone();
    std::thread::spawn(move || {
        let (mut client, _) = listener.accept().unwrap();
        let mut broker = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (mut client_w, mut broker_r) =
            (client.try_clone().unwrap(), broker.try_clone().unwrap());
        std::thread::spawn(move || {
            // The CONNACK only.
            if let Some(p) = read_packet(&mut broker_r) {
                let _ = client_w.write_all(&p);
            }
            while read_packet(&mut broker_r).is_some() {}
            let _ = client_w.shutdown(std::net::Shutdown::Both);
        });
        while let Some(p) = read_packet(&mut client) {
            if p[0] >> 4 == 3 {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                if n >= forward {
                    continue;
                }
            }
            if broker.write_all(&p).is_err() {
                break;
            }
        }
        let _ = broker.shutdown(std::net::Shutdown::Both);
    });
    (proxy, publishes)
}

#[test]
fn the_outbox_of_tern_pub_survives_kill_9_and_qos_2_arrives_exactly_once() {
    let dir = std::env::temp_dir().join(format!("tern-pubsub-outbox-{}", free_port()));
    let broker = BrokerProcess::in_dir(&dir, "");
    let port = broker.port(0).to_string();
    let outbox = dir.join("pub.outbox");
    let outbox = outbox.to_str().unwrap();
    let sub = subscriber(&["-p", &port, "-t", "box/#", "-q", "2"]);

    // 20 QoS 2 messages; the broker gets the first 8 and its answers never come back, the
    // other 12 never reach it. Then the publisher is killed.
    let count = 20;
    let (proxy, publishes) = withholding_proxy(port.parse().unwrap(), 8);
    let mut publisher = Guard(
        tern(&[
            "pub",
            "-p",
            &proxy.to_string(),
            "-i",
            "box-pub",
            "-c",
            "-q",
            "2",
            "-t",
            "box/m",
            "-l",
            "--outbox",
            outbox,
        ])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap(),
    );
    let mut stdin = publisher.0.stdin.take().unwrap();
    for i in 0..count {
        writeln!(stdin, "m{i}").unwrap();
    }
    stdin.flush().unwrap();
    // A PUBLISH on the wire was in the outbox before it was sent.
    let deadline = Instant::now() + Duration::from_secs(20);
    while publishes.load(Ordering::SeqCst) < count {
        assert!(
            Instant::now() < deadline,
            "the publisher sent every message"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    publisher.0.kill().unwrap(); // SIGKILL
    publisher.0.wait().unwrap();
    drop(stdin);

    // Started again on the same outbox, straight to the broker, with nothing new to send:
    // it resends what was unacknowledged and exits once all of it is.
    let o = run(&[
        "pub", "-p", &port, "-i", "box-pub", "-c", "-q", "2", "--outbox", outbox, "-W", "20",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    // Every message once: the 8 the broker had are not delivered again (same packet ids),
    // the 12 it never saw arrive now.
    std::thread::sleep(Duration::from_millis(500));
    let mut sub = sub;
    let _ = sub.0.kill();
    let (_, out) = finish(sub);
    let mut got: Vec<&str> = out.lines().collect();
    got.sort_unstable();
    let mut want: Vec<String> = (0..count).map(|i| format!("m{i}")).collect();
    want.sort_unstable();
    assert_eq!(got, want, "each QoS 2 message exactly once");
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tern_pub_and_tern_sub_speak_tls_and_secure_websocket_with_a_ca_file() {
    let dir = std::env::temp_dir().join(format!("tern-pubsub-tls-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let [ca, cert, key] = support::certificates(&dir);
    let broker = BrokerProcess::in_dir(
        &dir,
        &format!(
            "transport = \"tls\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n\
             [[listener]]\nbind = \"127.0.0.1:0\"\ntransport = \"wss\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n"
        ),
    );
    let (tls, wss) = (broker.port(0), broker.port(1));
    let url = format!("wss://localhost:{wss}/mqtt");
    let sub = subscriber(&[
        "--url", &url, "--cafile", &ca, "-t", "secure/#", "-C", "1", "-v",
    ]);
    let o = run(&[
        "pub",
        "-h",
        "localhost",
        "-p",
        tls,
        "--cafile",
        &ca,
        "-t",
        "secure/x",
        "-m",
        "s3",
        "-q",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(finish(sub), (Some(0), "secure/x s3\n".to_string()));
    // Without the CA the broker's certificate is not trusted: exit 1, saying why.
    let o = run(&[
        "pub",
        "--url",
        &format!("mqtts://localhost:{tls}/secure/x"),
        "-m",
        "no",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("certificate"), "{}", stderr(&o));
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn file_stdin_and_null_payloads_and_dedup_by_a_user_property() {
    let dir = std::env::temp_dir().join(format!("tern-pubsub-payloads-{}", free_port()));
    let broker = BrokerProcess::in_dir(&dir, "");
    let port = broker.port(0).to_string();
    let file = dir.join("payload.bin");
    std::fs::write(&file, b"from a file\nwith two lines").unwrap();
    let sub = subscriber(&["-p", &port, "-t", "p/#", "-C", "3", "-F", "%t:%l:%p"]);
    let o = run(&[
        "pub",
        "-p",
        &port,
        "-t",
        "p/f",
        "-f",
        file.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let mut s = tern(&["pub", "-p", &port, "-t", "p/s", "-s"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    s.stdin.take().unwrap().write_all(b"all\nof stdin").unwrap();
    assert_eq!(s.wait().unwrap().code(), Some(0));
    let o = run(&["pub", "-p", &port, "-t", "p/n", "-n"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (code, out) = finish(sub);
    assert_eq!(code, Some(0));
    assert_eq!(
        out,
        "p/f:26:from a file\nwith two lines\np/s:12:all\nof stdin\np/n:0:\n"
    );

    // The same msg-id twice (mosquitto_pub sets the user property): shown once.
    let sub = subscriber(&[
        "-p", &port, "-t", "d/#", "-q", "1", "--dedup", "msg-id", "-C", "2",
    ]);
    for (key, text) in [("k1", "first"), ("k1", "first again"), ("k2", "second")] {
        let o = Command::new("mosquitto_pub")
            .args(["-p", &port, "-V", "5", "-q", "1", "-t", "d/x", "-m", text])
            .args(["-D", "publish", "user-property", "msg-id", key])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(finish(sub), (Some(0), "first\nsecond\n".to_string()));
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tern_pub_exits_1_when_the_connection_is_lost_before_the_acknowledgement() {
    let dir = std::env::temp_dir().join(format!("tern-pubsub-lost-{}", free_port()));
    let broker = BrokerProcess::in_dir(&dir, "");
    // The broker gets the PUBLISH, its PUBACK never comes back; then the broker dies.
    let (proxy, publishes) = withholding_proxy(broker.port(0).parse().unwrap(), 1);
    let publisher = tern(&[
        "pub",
        "-p",
        &proxy.to_string(),
        "-t",
        "l/x",
        "-m",
        "x",
        "-q",
        "1",
    ])
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while publishes.load(Ordering::SeqCst) < 1 {
        assert!(Instant::now() < deadline, "the PUBLISH went out");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(broker);
    let o = publisher.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("not acknowledged"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}
