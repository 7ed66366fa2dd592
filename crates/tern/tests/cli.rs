//! The `tern` binary as a user runs it.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Command, Stdio};

#[test]
fn tern_broker_listens_and_exits_0_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["broker", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(std::env::temp_dir().join(format!("tern-cli-data-{}", std::process::id())))
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
