//! The `tern` binary as a user runs it.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Command, Stdio};

mod support;

#[test]
fn tern_broker_listens_and_exits_0_on_sigterm() {
    let data = std::env::temp_dir().join(format!("tern-cli-data-{}", std::process::id()));
    let (mut child, addr) = spawn_broker(&[
        "--bind",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    TcpStream::connect(&addr).expect("the broker accepts connections");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "clean exit on SIGTERM");
}

/// Every command answers `--help` (exit 0, its usage on stdout); `broker` and `passwd`
/// also `-h`, while `pub`, `sub` and `bench` keep `-h HOST` as in Mosquitto's clients;
/// `tern --version`; completion scripts for the shells.
#[test]
fn every_command_answers_help_and_the_version_and_completions_are_printed() {
    let tern = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    for command in [
        "broker",
        "passwd",
        "pub",
        "sub",
        "bench",
        "ctl",
        "completions",
    ] {
        let (code, out, err) = tern(&[command, "--help"]);
        assert_eq!(code, Some(0), "tern {command} --help: {err}");
        assert!(
            out.contains(&format!("Usage: tern {command}")),
            "tern {command} --help: {out}"
        );
    }
    for command in ["broker", "passwd"] {
        let (code, out, _) = tern(&[command, "-h"]);
        assert_eq!(code, Some(0));
        assert!(out.contains(&format!("Usage: tern {command}")), "{out}");
    }
    // -h is the host for the clients: a value is expected.
    let (code, _, err) = tern(&["pub", "-h"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--host <HOST>"), "{err}");
    let (code, out, _) = tern(&["--version"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("tern "), "{out}");
    let (code, out, _) = tern(&["completions", "bash"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("complete") && out.contains("broker"), "{out}");
    let (code, _, err) = tern(&["completions", "tcsh"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("'tcsh'"), "{err}");
}

#[test]
fn unknown_commands_and_options_are_named_with_exit_code_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("brokr")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unrecognized subcommand 'brokr'"));
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["broker", "--port", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("'--port'"));
}

#[test]
fn a_config_file_with_an_unknown_key_stops_startup_naming_key_and_line() {
    let dir = std::env::temp_dir().join(format!("tern-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[listener]\nbind = \"127.0.0.1:0\"\nbnid = 1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["broker", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bnid") && err.contains("line 3"), "{err}");
}

#[test]
fn a_data_directory_holding_something_that_is_not_a_store_stops_startup_and_is_left_alone() {
    let dir = std::env::temp_dir().join(format!("tern-cli-corrupt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tern.redb");
    std::fs::write(&file, b"not a store: someone's data").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "broker",
            "--bind",
            "127.0.0.1:0",
            "--metrics",
            "off",
            "--data-dir",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot open the store") && err.contains("tern.redb"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"not a store: someone's data",
        "never replaced"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts `tern broker` with `args`; returns it with the address it says it listens on
/// (its further output is drained).
fn spawn_broker(args: &[&str]) -> (std::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("broker")
        .args(["--metrics", "127.0.0.1:0"])
        .args(args)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the broker said where it listens")
            .unwrap();
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

fn mosquitto_pub(port: u16, user: &str, password: &str) -> Option<i32> {
    Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "t",
            "-m",
            "x",
        ])
        .args(["-u", user, "-P", password, "-q", "1"])
        .output()
        .expect("mosquitto_pub (scripts/test installs mosquitto-clients)")
        .status
        .code()
}

#[test]
fn tern_passwd_manages_users_that_tern_broker_then_checks() {
    let dir = std::env::temp_dir().join(format!("tern-cli-passwd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("passwords");
    let _ = std::fs::remove_file(&file);
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .arg("passwd")
            .args(args)
            .status()
            .unwrap()
            .code()
    };
    let f = file.to_str().unwrap();
    assert_eq!(run(&["-b", f, "ann", "s3cret"]), Some(0));
    assert_eq!(run(&["-b", f, "bob", "first"]), Some(0));
    assert_eq!(run(&["-b", f, "bob", "second"]), Some(0), "changed");
    assert_eq!(run(&["-b", f, "carl", "x"]), Some(0));
    assert_eq!(run(&["-D", f, "carl"]), Some(0), "deleted");
    assert_eq!(run(&["-D", f, "carl"]), Some(1), "not there any more");
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 2);
    assert!(text.starts_with("ann:$argon2id$"), "{text}");
    assert!(!text.contains("s3cret"), "only hashes are stored");

    let config = dir.join("tern.toml");
    std::fs::write(
        &config,
        format!(
            "[listener]\nbind = \"127.0.0.1:0\"\n[auth]\npassword_file = \"{f}\"\nallow_anonymous = false\n"
        ),
    )
    .unwrap();
    let data = dir.join("data");
    let (mut broker, addr) = spawn_broker(&[
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(mosquitto_pub(port, "ann", "s3cret"), Some(0));
    assert_eq!(mosquitto_pub(port, "bob", "second"), Some(0));
    assert_ne!(
        mosquitto_pub(port, "bob", "first"),
        Some(0),
        "the old password"
    );
    assert_ne!(mosquitto_pub(port, "carl", "x"), Some(0), "a deleted user");
    broker.kill().unwrap();
    broker.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

fn mosquitto(tool: &str, args: &[&str]) -> std::process::Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} (scripts/test installs mosquitto-clients): {e}"))
}

#[test]
fn tls_passwords_and_an_acl_from_the_config_and_sighup_reloads_the_files() {
    let dir = std::env::temp_dir().join(format!("tern-cli-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let [ca, cert, key] = support::certificates(&dir);
    let passwords = dir.join("passwords");
    let acl = dir.join("acl");
    let tern = env!("CARGO_BIN_EXE_tern");
    let passwd = |user: &str, pw: &str| {
        let ok = Command::new(tern)
            .args(["passwd", "-b", passwords.to_str().unwrap(), user, pw])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    passwd("alice", "apw");
    std::fs::write(&acl, "user alice\ntopic readwrite a/#\n").unwrap();
    let config = dir.join("tern.toml");
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nbind = \"127.0.0.1:0\"\nallow_anonymous = false\n\n\
             [[listener]]\nbind = \"127.0.0.1:0\"\ntransport = \"tls\"\n\
             cert_file = \"{cert}\"\nkey_file = \"{key}\"\n\n\
             [auth]\npassword_file = \"{}\"\nacl_file = \"{}\"\n\n\
             [storage]\ndurability = \"none\"\n",
            passwords.display(),
            acl.display()
        ),
    )
    .unwrap();
    let mut broker = support::BrokerProcess::spawn(Command::new(tern), &config, "info");
    let (tcp, tls) = (broker.port(0).to_string(), broker.port(1).to_string());
    let (tcp, tls) = (tcp.as_str(), tls.as_str());
    let tls_args = ["-h", "localhost", "-p", tls, "--cafile", &ca];

    // Over TLS, with the password, within the ACL: published (retained) and received.
    let out = mosquitto(
        "mosquitto_pub",
        &[
            &tls_args[..],
            &[
                "-u", "alice", "-P", "apw", "-t", "a/x", "-m", "hi", "-r", "-q", "1",
            ],
        ]
        .concat(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = mosquitto(
        "mosquitto_sub",
        &[
            &tls_args[..],
            &[
                "-u", "alice", "-P", "apw", "-t", "a/x", "-C", "1", "-W", "5",
            ],
        ]
        .concat(),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hi");
    // Outside the ACL: the subscription is refused.
    let denied = |user: &str, pw: &str, topic: &str| {
        let out = mosquitto(
            "mosquitto_sub",
            &[
                "-V",
                "5",
                "-h",
                "127.0.0.1",
                "-p",
                tcp,
                "-u",
                user,
                "-P",
                pw,
                "-t",
                topic,
                "-C",
                "1",
                "-W",
                "3",
            ],
        );
        String::from_utf8_lossy(&out.stderr).contains("denied")
    };
    assert!(denied("alice", "apw", "b/x"));
    // Anonymous clients are not let in on this listener; bob is not a user yet.
    let anonymous = mosquitto(
        "mosquitto_pub",
        &["-h", "127.0.0.1", "-p", tcp, "-t", "a/x", "-m", "x"],
    );
    assert!(!anonymous.status.success());
    let bob = ["-h", "127.0.0.1", "-p", tcp, "-u", "bob", "-P", "bpw"];
    let out = mosquitto(
        "mosquitto_pub",
        &[&bob[..], &["-t", "b/x", "-m", "yo", "-r"]].concat(),
    );
    assert!(!out.status.success(), "bob is not in the password file yet");

    // New files, SIGHUP: bob exists, alice has b/# instead of a/#; the broker stays up.
    passwd("bob", "bpw");
    std::fs::write(
        &acl,
        "user alice\ntopic read b/#\nuser bob\ntopic readwrite b/#\n",
    )
    .unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &broker.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let mut published = false;
    for _ in 0..50 {
        let out = mosquitto(
            "mosquitto_pub",
            &[&bob[..], &["-t", "b/x", "-m", "yo", "-r", "-q", "1"]].concat(),
        );
        if out.status.success() {
            published = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(published, "bob connects after the reload");
    assert!(
        broker.child.try_wait().unwrap().is_none(),
        "SIGHUP did not stop the broker"
    );
    let out = mosquitto(
        "mosquitto_sub",
        &[
            &tls_args[..],
            &[
                "-u", "alice", "-P", "apw", "-t", "b/x", "-C", "1", "-W", "5",
            ],
        ]
        .concat(),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "yo");
    assert!(denied("alice", "apw", "a/x"), "the old ACL is gone");
    assert_eq!(broker.stop(), Some(0));
}

#[test]
fn sighup_puts_a_renewed_certificate_in_force_and_keeps_connections_up() {
    let dir = std::env::temp_dir().join(format!("tern-cli-renew-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let [ca, cert, key] = support::certificates(&dir);
    let old_ca = dir.join("old-ca.pem");
    std::fs::copy(&ca, &old_ca).unwrap();
    let old_ca = old_ca.to_str().unwrap();
    let config = dir.join("tern.toml");
    std::fs::write(
        &config,
        format!(
            "[listener]\nbind = \"127.0.0.1:0\"\ntransport = \"tls\"\n\
             cert_file = \"{cert}\"\nkey_file = \"{key}\"\n\n\
             [storage]\ndurability = \"none\"\n"
        ),
    )
    .unwrap();
    let tern = env!("CARGO_BIN_EXE_tern");
    let broker = support::BrokerProcess::spawn(Command::new(tern), &config, "info");
    let port = broker.port(0).to_string();
    let tls = |cafile: &str| ["-h", "localhost", "-p", &port, "--cafile", cafile].map(String::from);
    let publish = |cafile: &str, message: &str, retain: bool| {
        let retain: &[&str] = if retain { &["-r"] } else { &[] };
        mosquitto(
            "mosquitto_pub",
            &[
                &tls(cafile).each_ref().map(String::as_str)[..],
                &["-t", "r/x", "-m", message, "-q", "1"],
                retain,
            ]
            .concat(),
        )
        .status
        .success()
    };
    assert!(
        publish(old_ca, "before", true),
        "the first certificate works"
    );
    // A subscriber connected under the old certificate for the rest of the test: its
    // first line (the retained message) says it is subscribed.
    let mut subscriber = Command::new("mosquitto_sub")
        .args(tls(old_ca))
        .args(["-t", "r/x", "-C", "2", "-W", "30", "-q", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (scripts/test installs mosquitto-clients)");
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(subscriber.stdout.take().unwrap()));
    assert_eq!(lines.next().unwrap().unwrap(), "before");
    // Renewed: a new CA, certificate and key in the same files.
    let _ = support::certificates(&dir);
    let hup = Command::new("kill")
        .args(["-HUP", &broker.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let mut renewed = false;
    for _ in 0..50 {
        if publish(&ca, "after", false) {
            renewed = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(renewed, "the renewed certificate is in force after SIGHUP");
    assert!(
        !publish(old_ca, "stale", false),
        "the old certificate is not offered any more"
    );
    assert_eq!(
        lines.next().unwrap().unwrap(),
        "after",
        "the subscriber connected before the reload is still served"
    );
    assert!(subscriber.wait().unwrap().success());
    // A renewal gone wrong (a truncated certificate): reported, and what works stays.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\n").unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &broker.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        publish(&ca, "still", false),
        "a certificate file that does not load leaves the one in force"
    );
    assert_eq!(broker.stop(), Some(0));
}

#[test]
fn check_config_accepts_a_good_file_and_names_the_problem_in_a_bad_one() {
    let dir = std::env::temp_dir().join(format!("tern-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let acl = dir.join("acl");
    std::fs::write(&acl, "topic readwrite #\n").unwrap();
    let check = |text: String| {
        let path = dir.join("tern.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["broker", "--check-config", path.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let good = format!(
        "[listener]\nbind = \"127.0.0.1:0\"\n[auth]\nacl_file = \"{}\"\n[metrics]\nbind = \"127.0.0.1:9999\"\n[log]\nlevel = \"info,tern_broker=debug\"\nformat = \"json\"\n",
        acl.display()
    );
    let (code, out, err) = check(good);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("OK") && out.contains("ACL loaded") && out.contains("127.0.0.1:9999"),
        "{out}"
    );
    let missing = dir.join("no-such-acl");
    let (code, _, err) = check(format!("[auth]\nacl_file = \"{}\"\n", missing.display()));
    assert_eq!(code, Some(2));
    assert!(err.contains("no-such-acl"), "{err}");
    let (code, _, err) = check("[metrics]\nbind = \"nowhere\"\n".into());
    assert_eq!(code, Some(2));
    assert!(err.contains("metrics.bind"), "{err}");
    let (code, _, err) = check("[log]\nlevel = \"tern=loud\"\n".into());
    assert_eq!(code, Some(2));
    assert!(err.contains("log.level"), "{err}");
    let (code, _, err) = check("[log]\nformat = \"xml\"\n".into());
    assert_eq!(code, Some(2));
    assert!(err.contains("format") && err.contains("line 2"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_broker_serves_metrics_and_health_logs_json_and_sighup_changes_the_log_levels() {
    let dir = std::env::temp_dir().join(format!("tern-observe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("tern.toml");
    let write = |level: &str| {
        std::fs::write(
            &config,
            format!(
                "[listener]\nbind = \"127.0.0.1:0\"\n[storage]\ndata_dir = \"{}\"\n[metrics]\nbind = \"127.0.0.1:0\"\n[log]\nlevel = \"{level}\"\nformat = \"json\"\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
    };
    write("warn,tern=info,tern_broker=warn");
    let broker =
        support::BrokerProcess::spawn(Command::new(env!("CARGO_BIN_EXE_tern")), &config, "");
    let metrics = broker
        .metrics
        .clone()
        .expect("the metrics address is logged");
    assert_eq!(support::http_get(&metrics, "/healthz").0, 200);
    // Ready once the store is loaded, which may come just after the listening line.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while support::http_get(&metrics, "/readyz").0 != 200 {
        assert!(std::time::Instant::now() < deadline, "never ready");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (status, body) = support::http_get(&metrics, "/metrics");
    assert_eq!(status, 200);
    assert!(
        body.contains("tern_build_info{version=")
            && body.contains("tern_sessions{state=\"online\"} 0"),
        "{body}"
    );

    // tern_broker logs at info are off: a new connection's "accepted" is not printed.
    let _first = TcpStream::connect(&broker.addrs[0]).unwrap();
    assert_eq!(
        broker.wait_for("accepted", std::time::Duration::from_millis(800)),
        None
    );
    // SIGHUP with the file now saying "info": the next connection is logged, as JSON.
    write("info");
    let hup = Command::new("kill")
        .args(["-HUP", &broker.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let reloaded = broker
        .wait_for("log levels reloaded", std::time::Duration::from_secs(10))
        .expect("the reload is logged");
    assert!(
        reloaded.starts_with('{') && reloaded.contains("\"level\":\"INFO\""),
        "JSON lines: {reloaded}"
    );
    let _second = TcpStream::connect(&broker.addrs[0]).unwrap();
    broker
        .wait_for("accepted", std::time::Duration::from_secs(10))
        .expect("tern_broker's info lines are on after the reload");
    assert_eq!(broker.stop(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}
