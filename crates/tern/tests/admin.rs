//! The admin API (`/api/v1/...` on the metrics endpoint) against a real broker with
//! sessions made by Mosquitto's clients: each listing checked against what the clients
//! did; each action's effect seen by the client and, after kill -9 and a restart, in the
//! store; requests without the token, with another one, or with the API off, refused.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::BrokerProcess;

const TOKEN: &str = "test-admin-token";

/// GET `path` with `token` as the bearer token (if any): the status and the JSON body.
fn api(addr: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1;
    (status, serde_json::from_str(body).unwrap())
}

fn mosquitto(tool: &str, port: &str, args: &[&str]) -> std::process::Child {
    Command::new(tool)
        .args(["-h", "127.0.0.1", "-p", port])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// `keeper`: an offline persistent session (mosquitto_sub) with a QoS 1 subscription to
/// `orders/#` and three 7-byte messages queued for it (mosquitto_pub).
fn keeper_with_three_queued(port: &str) {
    let status = mosquitto(
        "mosquitto_sub",
        port,
        &["-i", "keeper", "-c", "-q", "1", "-t", "orders/#", "-E"],
    )
    .wait()
    .unwrap();
    assert!(status.success());
    for n in 0..3 {
        let m = format!("order {n}");
        let status = mosquitto(
            "mosquitto_pub",
            port,
            &["-q", "1", "-t", "orders/new", "-m", &m],
        )
        .wait()
        .unwrap();
        assert!(status.success());
    }
}

#[test]
fn the_admin_api_lists_sessions_as_the_clients_left_them_and_refuses_without_the_token() {
    let dir = std::env::temp_dir().join(format!("tern-admin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let broker = BrokerProcess::in_dir(&dir, &format!("[admin]\ntoken = \"{TOKEN}\"\n"));
    let port = broker.port(0).to_string();
    let http = broker.metrics.clone().unwrap();
    keeper_with_three_queued(&port);
    // An online one, with a username and a will.
    let mut online = mosquitto(
        "mosquitto_sub",
        &port,
        &[
            "-i",
            "watcher",
            "-u",
            "bob",
            "-V",
            "mqttv5",
            "-t",
            "sensors/+/t",
            "--will-topic",
            "status/watcher",
            "--will-payload",
            "gone",
        ],
    );
    let listed = |search: &str| {
        api(
            &http,
            &format!("/api/v1/sessions?search={search}"),
            Some(TOKEN),
        )
    };
    let mut tries = 0;
    while listed("bob").1["total"] != 1 {
        tries += 1;
        assert!(tries < 100, "the online session shows up");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Refused: no token, another token.
    let (code, body) = api(&http, "/api/v1/sessions", None);
    assert_eq!(code, 401, "{body}");
    let (code, _) = api(&http, "/api/v1/sessions", Some("guess"));
    assert_eq!(code, 401);
    let (code, _) = api(&http, "/api/v1/overview", Some("test-admin-toke"));
    assert_eq!(code, 401);

    let (code, all) = api(&http, "/api/v1/sessions", Some(TOKEN));
    assert_eq!(code, 200, "{all}");
    assert_eq!(all["total"], 2, "{all}");
    let keeper = &all["sessions"][0];
    assert_eq!(keeper["client_id"], "keeper", "client id order: {all}");
    assert_eq!(keeper["online"], false);
    assert_eq!(keeper["queued"], 3, "{keeper}");
    assert_eq!(
        keeper["queued_bytes"], 21,
        "three 7-byte payloads: {keeper}"
    );
    assert_eq!(keeper["subscriptions"], 1);
    let (_, found) = listed("bob");
    let watcher = &found["sessions"][0];
    assert_eq!(watcher["client_id"], "watcher", "{found}");
    assert_eq!(watcher["online"], true);
    assert_eq!(watcher["username"], "bob");
    // Paging.
    let (_, second) = api(&http, "/api/v1/sessions?offset=1&limit=1", Some(TOKEN));
    assert_eq!(second["total"], 2);
    assert_eq!(second["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(second["sessions"][0]["client_id"], "watcher", "{second}");

    let (code, one) = api(&http, "/api/v1/sessions/keeper", Some(TOKEN));
    assert_eq!(code, 200, "{one}");
    assert_eq!(one["subscriptions"][0]["filter"], "orders/#", "{one}");
    assert_eq!(one["subscriptions"][0]["qos"], 1);
    assert_eq!(one["connection"], Value::Null);
    assert!(one["expiry_secs"].as_f64().unwrap() > 0.0, "{one}");
    let (_, one) = api(&http, "/api/v1/sessions/watcher", Some(TOKEN));
    assert_eq!(one["will"]["topic"], "status/watcher", "{one}");
    assert_eq!(one["will"]["payload_bytes"], 4);
    assert!(
        one["connection"]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{one}"
    );
    let (code, _) = api(&http, "/api/v1/sessions/nobody", Some(TOKEN));
    assert_eq!(code, 404);
    assert_eq!(one["inflight"], serde_json::json!([]), "{one}");
    // A client that never acknowledges: its QoS 1 message shows in flight.
    let mut slow = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    let connect = tern_codec::Connect::new(tern_codec::Protocol::V3_1_1, "slowpoke");
    slow.write_all(&support::encoded(tern_codec::Packet::Connect(Box::new(
        connect,
    ))))
    .unwrap();
    let subscribe = tern_codec::Subscribe {
        packet_id: std::num::NonZeroU16::new(1).unwrap(),
        subscriptions: vec![tern_codec::Subscription {
            filter: tern_codec::TopicFilter::new("slow/#").unwrap(),
            options: tern_codec::SubscriptionOptions {
                qos: tern_codec::QoS::AtLeastOnce,
                ..Default::default()
            },
        }],
        properties: Default::default(),
    };
    slow.write_all(&support::encoded(tern_codec::Packet::Subscribe(subscribe)))
        .unwrap();
    let mut acks = [0u8; 4 + 5];
    slow.read_exact(&mut acks).unwrap();
    let status = mosquitto(
        "mosquitto_pub",
        &port,
        &["-q", "1", "-t", "slow/1", "-m", "hello"],
    )
    .wait()
    .unwrap();
    assert!(status.success());
    let mut tries = 0;
    let flight = loop {
        let (_, v) = api(&http, "/api/v1/sessions/slowpoke", Some(TOKEN));
        if v["inflight"].as_array().is_some_and(|a| !a.is_empty()) {
            break v;
        }
        tries += 1;
        assert!(
            tries < 100,
            "the unacknowledged message shows in flight: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(flight["inflight"][0]["topic"], "slow/1", "{flight}");
    assert_eq!(flight["inflight"][0]["qos"], 1);
    assert_eq!(flight["inflight"][0]["state"], "awaiting PUBACK");
    assert_eq!(flight["inflight"][0]["payload_bytes"], 5);
    drop(slow);
    // A client id with characters a URL escapes.
    let (code, _) = api(&http, "/api/v1/sessions/kee%70er", Some(TOKEN));
    assert_eq!(code, 200);

    // (Once the broker has seen slowpoke's connection close.)
    let mut tries = 0;
    let (code, overview) = loop {
        let (code, o) = api(&http, "/api/v1/overview", Some(TOKEN));
        if o["sessions"]["online"] == 1 || tries > 100 {
            break (code, o);
        }
        tries += 1;
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, 200, "{overview}");
    assert_eq!(overview["sessions"]["online"], 1, "{overview}");
    assert_eq!(overview["sessions"]["offline"], 1);
    assert_eq!(overview["queued"], 3);
    assert_eq!(overview["deepest_queues"][0]["client_id"], "keeper");
    assert_eq!(
        overview["limits"]["max_queued_messages"], 1_000_000,
        "{overview}"
    );
    let v5 = overview["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["protocol"] == "5.0")
        .unwrap();
    assert_eq!(v5["connections"], 1, "{overview}");

    // Actions. A retained message to list and delete, a second offline session to delete.
    let status = mosquitto(
        "mosquitto_pub",
        &port,
        &["-q", "1", "-r", "-t", "orders/last", "-m", "order 2"],
    )
    .wait()
    .unwrap();
    assert!(status.success());
    let status = mosquitto(
        "mosquitto_sub",
        &port,
        &["-i", "spare", "-c", "-q", "1", "-t", "spare/#", "-E"],
    )
    .wait()
    .unwrap();
    assert!(status.success());
    let (_, retained) = api(&http, "/api/v1/retained?filter=orders/%23", Some(TOKEN));
    assert_eq!(retained["total"], 1, "{retained}");
    assert_eq!(retained["retained"][0]["topic"], "orders/last");
    assert_eq!(retained["retained"][0]["payload_bytes"], 7);
    let act = |method: &str, path: &str| {
        let mut s = std::net::TcpStream::connect(&http).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out[9..12].parse::<u16>().unwrap()
    };
    // Disconnect: the 5.0 client is told 0x98 and goes; its session ended with it, and its
    // will is published (the server ended the connection).
    let wills = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "status/#",
            "-C",
            "1",
            "-W",
            "10",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(act("POST", "/api/v1/sessions/watcher/disconnect"), 200);
    let will = wills.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&will.stdout).trim(),
        "gone",
        "the will"
    );
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        online.try_wait().unwrap().is_some()
    });
    assert!(gone, "the disconnected client exited");
    assert_eq!(listed("bob").1["total"], 0);
    assert_eq!(act("POST", "/api/v1/sessions/watcher/disconnect"), 404);
    // Purge: the queue empties, the session and its subscription stay.
    assert_eq!(act("POST", "/api/v1/sessions/keeper/purge"), 200);
    let (_, one) = api(&http, "/api/v1/sessions/keeper", Some(TOKEN));
    assert_eq!(one["queued"], 0, "{one}");
    assert_eq!(one["subscriptions"][0]["filter"], "orders/#");
    assert_eq!(act("DELETE", "/api/v1/sessions/spare"), 200);
    assert_eq!(act("DELETE", "/api/v1/sessions/spare"), 404);
    assert_eq!(act("DELETE", "/api/v1/retained/orders%2Flast"), 200);
    assert_eq!(act("DELETE", "/api/v1/retained/orders%2Flast"), 404);
    assert_eq!(act("PUT", "/api/v1/sessions/keeper"), 404);
    // Refused without the token, as the listings are.
    let (code, _) = api(&http, "/api/v1/sessions/keeper/purge", None);
    assert_eq!(code, 401);

    // kill -9 and a restart: the actions were stored.
    drop(broker);
    let broker = BrokerProcess::in_dir(&dir, &format!("[admin]\ntoken = \"{TOKEN}\"\n"));
    let http = broker.metrics.clone().unwrap();
    let ready = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(25));
        support::http_get(&http, "/readyz").0 == 200
    });
    assert!(ready, "ready after the restart");
    let (_, all) = api(&http, "/api/v1/sessions", Some(TOKEN));
    assert_eq!(all["total"], 1, "only keeper is left: {all}");
    assert_eq!(all["sessions"][0]["client_id"], "keeper");
    assert_eq!(all["sessions"][0]["queued"], 0, "{all}");
    let (_, retained) = api(&http, "/api/v1/retained", Some(TOKEN));
    assert_eq!(retained["total"], 0, "{retained}");
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);

    // Without a token the API is off.
    let broker = BrokerProcess::in_dir(&dir, "");
    let (code, body) = api(
        broker.metrics.as_deref().unwrap(),
        "/api/v1/overview",
        Some(TOKEN),
    );
    assert_eq!(code, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("[admin] token"));
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tern ctl`: the same listings and actions from the command line, tables or JSON, and
/// its exit codes (3 refused, 4 nothing there).
#[test]
fn tern_ctl_lists_and_acts_through_the_api() {
    let dir = std::env::temp_dir().join(format!("tern-ctl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let broker = BrokerProcess::in_dir(&dir, &format!("[admin]\ntoken = \"{TOKEN}\"\n"));
    let port = broker.port(0).to_string();
    let http = broker.metrics.clone().unwrap();
    let status = mosquitto(
        "mosquitto_sub",
        &port,
        &["-i", "dev/42", "-c", "-q", "1", "-t", "cmd/42", "-E"],
    )
    .wait()
    .unwrap();
    assert!(status.success());
    let status = mosquitto(
        "mosquitto_pub",
        &port,
        &["-q", "1", "-r", "-t", "cmd/42", "-m", "reboot"],
    )
    .wait()
    .unwrap();
    assert!(status.success());
    let ctl = |token: Option<&str>, args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tern"));
        c.args(["ctl", "--endpoint", &http])
            .env_remove("TERN_ADMIN_TOKEN");
        if let Some(t) = token {
            c.env("TERN_ADMIN_TOKEN", t);
        }
        let out = c.args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = ctl(Some(TOKEN), &["sessions"]);
    assert_eq!(code, Some(0), "{err}");
    let row = out.lines().find(|l| l.starts_with("dev/42")).unwrap();
    assert!(row.contains("false"), "offline: {out}");
    assert!(out.contains("(1 of 1)"), "{out}");
    // A client id with a slash goes through, percent-encoded.
    let (code, out, err) = ctl(Some(TOKEN), &["--json", "session", "dev/42"]);
    assert_eq!(code, Some(0), "{err}");
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["queued"], 1, "{json}");
    assert_eq!(json["subscriptions"][0]["filter"], "cmd/42");
    let (_, out, _) = ctl(Some(TOKEN), &["retained", "cmd/#"]);
    assert!(out.contains("cmd/42") && out.contains("(1 of 1)"), "{out}");
    let (code, out, _) = ctl(Some(TOKEN), &["purge", "dev/42"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("purged"), "{out}");
    let (_, out, _) = ctl(Some(TOKEN), &["--json", "session", "dev/42"]);
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["queued"], 0, "{json}");
    let (code, _, _) = ctl(Some(TOKEN), &["delete-retained", "cmd/42"]);
    assert_eq!(code, Some(0));
    let (code, _, _) = ctl(Some(TOKEN), &["delete-session", "dev/42"]);
    assert_eq!(code, Some(0));
    // Nothing there: 4. Not connected: 4. No token or a wrong one: 3, with the reason.
    let (code, _, err) = ctl(Some(TOKEN), &["session", "dev/42"]);
    assert_eq!(code, Some(4), "{err}");
    let (code, _, _) = ctl(Some(TOKEN), &["kick", "dev/42"]);
    assert_eq!(code, Some(4));
    let (code, _, err) = ctl(None, &["overview"]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("bearer token"), "{err}");
    let (code, _, _) = ctl(Some("wrong"), &["overview"]);
    assert_eq!(code, Some(3));
    let (code, out, _) = ctl(Some(TOKEN), &["overview"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("sessions: 0 online, 0 offline"), "{out}");
    drop(broker);
    // Nobody listening: 1.
    let (code, _, err) = ctl(Some(TOKEN), &["overview"]);
    assert_eq!(code, Some(1), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The dashboard in a real browser: Debian's headless Chromium driven by puppeteer-core
/// (`tests/interop/mqttjs/dashboard.js`; scripts/test installs both) opens `/` of the
/// metrics endpoint of a broker under a small QoS 1 load: a wrong token is refused, the
/// overview fills in and its delivery chart moves, the offline session made by
/// `mosquitto_sub` is listed with its queue, and disconnecting the online one from the page
/// (confirming the dialog) ends its `mosquitto_sub`; its live tail (MQTT.js, embedded,
/// over the broker's WebSocket listener) shows the load. The page's screenshot is written to
/// the test's output directory (`dashboard-overview.png` under `CARGO_TARGET_TMPDIR`).
#[test]
fn the_dashboard_in_headless_chromium_shows_the_broker_and_disconnects_a_client() {
    let js = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/interop/mqttjs");
    assert!(
        js.join("node_modules/puppeteer-core").exists(),
        "puppeteer-core is not installed: run `npm install` in {} (scripts/test does)",
        js.display()
    );
    let dir = std::env::temp_dir().join(format!("tern-dashboard-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let broker = BrokerProcess::in_dir(
        &dir,
        &format!(
            "[[listener]]\nbind = \"127.0.0.1:0\"\ntransport = \"ws\"\n[admin]\ntoken = \"{TOKEN}\"\n"
        ),
    );
    let port = broker.port(0).to_string();
    let http = broker.metrics.clone().unwrap();
    keeper_with_three_queued(&port);
    let mut watcher = mosquitto(
        "mosquitto_sub",
        &port,
        &["-i", "watcher", "-V", "mqttv5", "-q", "1", "-t", "load/#"],
    );
    // The load: QoS 1 lines from mosquitto_pub, one every 10 ms, while the page looks.
    let mut load = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            "1",
            "-t",
            "load/t",
            "-l",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut feed = load.stdin.take().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feeding = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if writeln!(feed, "tick").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let screenshot =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-overview.png");
    let out = Command::new("node")
        .current_dir(&js)
        .args(["dashboard.js", &http, TOKEN, screenshot.to_str().unwrap()])
        .output()
        .expect("node (Node 20)");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = feeding.join();
    let _ = load.kill();
    let _ = load.wait();
    assert!(
        out.status.success(),
        "the dashboard in Chromium:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        watcher.try_wait().unwrap().is_some()
    });
    let _ = watcher.kill();
    assert!(gone, "the client disconnected from the page has gone");
    assert!(screenshot.exists(), "the screenshot is written");
    eprintln!("dashboard screenshot: {}", screenshot.display());
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
