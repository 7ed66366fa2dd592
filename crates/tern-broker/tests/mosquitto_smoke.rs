//! The broker with Debian's `mosquitto_sub` and `mosquitto_pub`: the README's scenario.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

fn subscribe(port: u16, count: u32, extra: &[&str]) -> std::process::Child {
    Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "#",
            "-v",
            "-W",
            "10",
        ])
        .args(["-C", &count.to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (scripts/test installs mosquitto-clients)")
}

fn publish(port: u16, args: &[&str]) {
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .status()
        .expect("mosquitto_pub");
    assert!(status.success(), "mosquitto_pub {args:?}");
}

#[test]
fn mosquitto_sub_sees_what_mosquitto_pub_sends_at_every_qos_in_3_1_1_and_5() {
    let broker = common::Broker::start();
    for version in ["mqttv311", "mqttv5"] {
        let sub = subscribe(broker.port, 3, &["-V", version, "-q", "2"]);
        std::thread::sleep(Duration::from_millis(500));
        for qos in ["0", "1", "2"] {
            publish(
                broker.port,
                &[
                    "-V",
                    version,
                    "-t",
                    &format!("a/q{qos}"),
                    "-m",
                    "hi",
                    "-q",
                    qos,
                ],
            );
        }
        let out = sub.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "a/q0 hi\na/q1 hi\na/q2 hi\n",
            "{version}"
        );
    }
}

#[test]
fn a_retained_message_reaches_a_later_mosquitto_sub() {
    let broker = common::Broker::start();
    publish(
        broker.port,
        &["-t", "status/door", "-m", "open", "-r", "-q", "1"],
    );
    let out = subscribe(broker.port, 1, &[]).wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "status/door open\n");
}
