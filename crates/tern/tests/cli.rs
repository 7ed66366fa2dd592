//! The `tern` binary as a user runs it.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Command, Stdio};

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

#[test]
fn unknown_commands_and_options_are_named_with_exit_code_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("brokr")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown command 'brokr'"));
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
        .args(["broker", "--bind", "127.0.0.1:0", "--data-dir"])
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
