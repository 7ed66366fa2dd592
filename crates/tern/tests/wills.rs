//! Wills across a broker crash, with clients nobody here wrote: a client (`mosquitto_sub`)
//! connected with a QoS 1 will, the broker killed with SIGKILL and restarted; the crash
//! ended that client's connection without DISCONNECT, so its will reaches a persistent
//! subscriber, once.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Command, Stdio};

use support::BrokerProcess;

fn sub(port: &str, args: &[&str]) -> Command {
    let mut c = Command::new("mosquitto_sub");
    c.args(["-h", "127.0.0.1", "-p", port]).args(args);
    c
}

/// What the persistent keeper receives within `secs` (it stops at the first message).
fn keeper_gets(port: &str, secs: &str) -> String {
    let out = sub(
        port,
        &[
            "-i", "keeper", "-c", "-q", "1", "-t", "wills/#", "-C", "1", "-W", secs,
        ],
    )
    .output()
    .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_will_of_a_client_connected_at_a_kill_9_is_published_once_after_the_restart() {
    let dir = std::env::temp_dir().join(format!("tern-wills-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let broker = BrokerProcess::in_dir(&dir, "");
    let port = broker.port(0).to_string();
    // The keeper's persistent session and subscription.
    let status = sub(
        &port,
        &["-i", "keeper", "-c", "-q", "1", "-t", "wills/#", "-E"],
    )
    .status()
    .unwrap();
    assert!(status.success());
    // A client with a will, connected (the broker logs it).
    let mut willer = sub(
        &port,
        &[
            "-i",
            "willer",
            "-t",
            "nothing",
            "--will-topic",
            "wills/willer",
            "--will-payload",
            "willer is gone",
            "--will-qos",
            "1",
        ],
    )
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    assert!(
        broker
            .wait_for("client_id=willer", std::time::Duration::from_secs(10))
            .is_some(),
        "the client with the will connected"
    );
    // Its CONNECT (and so its will) is committed once the broker has answered it: wait
    // for the subscription, which comes after the CONNACK.
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SIGKILL: the connection ends without DISCONNECT and no will is sent by this process.
    drop(broker);
    let _ = willer.kill();
    let _ = willer.wait();
    let broker = BrokerProcess::in_dir(&dir, "");
    let port = broker.port(0).to_string();
    assert_eq!(keeper_gets(&port, "10"), "willer is gone\n");
    // The keeper acknowledged it (nothing more comes while this broker lives).
    assert_eq!(keeper_gets(&port, "2"), "");
    // Once: another crash and restart publish it no more.
    drop(broker);
    let broker = BrokerProcess::in_dir(&dir, "");
    let port = broker.port(0).to_string();
    assert_eq!(keeper_gets(&port, "2"), "", "published once");
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
