//! Claims about the broker, checked over real TCP with paho-mqtt (PyPI), in MQTT 3.1.1 and
//! 5.0. Each test starts its own broker on an ephemeral port and runs one claim of
//! `tests/interop/paho_broker.py`.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

fn claim(name: &str) {
    for level in ["4", "5"] {
        let broker = common::Broker::start();
        let out = std::process::Command::new("python3")
            .arg(common::repo_root().join("tests/interop/paho_broker.py"))
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
}

#[test]
fn qos_is_delivered_at_the_lower_of_publisher_and_subscriber_qos_for_all_nine_combinations() {
    claim("qos_downgrade_table");
}

#[test]
fn overlapping_subscriptions_deliver_once_at_max_qos() {
    claim("overlapping_subscriptions_deliver_once_at_max_qos");
}

#[test]
fn plus_plus_does_not_match_sys_topics() {
    claim("plus_plus_does_not_match_sys_topics");
}

#[test]
fn offline_messages_are_queued_and_delivered_with_session_present() {
    claim("offline_messages_are_queued_and_delivered_with_session_present");
}

#[test]
fn will_is_published_on_abnormal_disconnect_not_on_disconnect() {
    claim("will_is_published_on_abnormal_disconnect_not_on_disconnect");
}

#[test]
fn retained_messages_are_set_replaced_and_cleared() {
    claim("retained_messages_are_set_replaced_and_cleared");
}

#[test]
fn a_second_connection_with_the_same_client_id_takes_over() {
    claim("a_second_connection_with_the_same_client_id_takes_over");
}

#[test]
fn empty_client_id_rules() {
    claim("empty_client_id_rules");
}

#[test]
fn a_publisher_with_64_qos2_messages_in_flight_loses_nothing() {
    claim("a_publisher_with_64_qos2_messages_in_flight_loses_nothing");
}

#[test]
fn clean_start_discards_the_session_and_its_queue() {
    claim("clean_start_discards_the_session_and_its_queue");
}
