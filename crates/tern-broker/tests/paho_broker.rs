//! Claims about the broker, checked over real TCP with paho-mqtt (PyPI), in MQTT 3.1.1 and
//! 5.0. Each test starts its own broker on an ephemeral port and runs one claim of
//! `tests/interop/paho_broker.py`.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

fn claim(name: &str) {
    claim_at(name, &["4", "5"], tern_broker::core::Settings::default());
}

/// Runs the claim at each protocol level, each against a fresh broker with `settings`.
fn claim_at(name: &str, levels: &[&str], settings: tern_broker::core::Settings) {
    for level in levels {
        common::paho_claim(name, level, settings.clone());
    }
}

#[test]
fn qos_is_delivered_at_the_lower_of_publisher_and_subscriber_qos_for_all_nine_combinations() {
    // MQTT 3.1 ("MQIsdp") too.
    claim_at(
        "qos_downgrade_table",
        &["3", "4", "5"],
        tern_broker::core::Settings::default(),
    );
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

#[test]
fn unsubscribe_stops_delivery() {
    claim("unsubscribe_stops_delivery");
}

#[test]
fn a_v5_disconnect_with_reason_0x04_publishes_the_will() {
    claim_at(
        "disconnect_with_will_0x04_publishes_the_will",
        &["5"],
        tern_broker::core::Settings::default(),
    );
}

#[test]
fn will_delay_holds_the_will_and_a_reconnect_in_time_cancels_it() {
    claim_at(
        "will_delay_holds_the_will_and_a_reconnect_in_time_cancels_it",
        &["5"],
        tern_broker::core::Settings::default(),
    );
}

#[test]
fn session_expiry_ends_an_offline_session() {
    claim_at(
        "session_expiry_ends_an_offline_session",
        &["5"],
        tern_broker::core::Settings::default(),
    );
}

#[test]
fn the_offline_queue_is_bounded_and_drops_the_oldest() {
    claim_at(
        "offline_queue_is_bounded_and_drops_the_oldest",
        &["4", "5"],
        tern_broker::core::Settings {
            max_queued_messages: 3,
            queue_policy: tern_broker::core::QueuePolicy::DropOldest,
            ..Default::default()
        },
    );
}

#[test]
fn the_queue_behind_an_online_subscribers_full_window_is_bounded_and_drops_the_oldest() {
    claim_at(
        "online_queue_is_bounded_and_drops_the_oldest",
        &["4", "5"],
        tern_broker::core::Settings {
            // The byte limit bounds the queue: three 2-byte payloads.
            max_queued_bytes: 6,
            window_3x: 2,
            queue_policy: tern_broker::core::QueuePolicy::DropOldest,
            ..Default::default()
        },
    );
}

#[test]
fn the_will_is_published_when_keepalive_expires() {
    claim("will_is_published_when_keepalive_expires");
}

#[test]
fn stopping_the_broker_disconnects_clients_with_0x8b_in_v5() {
    use std::io::BufRead;
    for level in ["4", "5"] {
        let broker = common::Broker::start();
        let mut child = std::process::Command::new("python3")
            .arg(common::repo_root().join("tests/interop/paho_broker.py"))
            .arg(broker.port.to_string())
            .arg(level)
            .arg("stopping_the_broker_sends_0x8b")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python3 with paho-mqtt (scripts/test installs it)");
        let mut line = String::new();
        // Kept open until the script exits: it prints its verdict on it.
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the client connected (level {level})");
        drop(broker); // SIGINT/SIGTERM take this same path in `tern broker`
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "level {level}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_shared_subscription_gives_each_message_to_one_member_in_turn() {
    claim("a_shared_subscription_gives_each_message_to_one_member_in_turn");
}

#[test]
fn a_shared_member_leaving_mid_stream_loses_nothing() {
    claim("a_shared_member_leaving_mid_stream_loses_nothing");
}

#[test]
fn an_offline_shared_member_gets_its_share_when_it_returns() {
    claim("an_offline_shared_member_gets_its_share_when_it_returns");
}

#[test]
fn a_configured_server_reference_sends_clients_elsewhere() {
    claim_at(
        "a_configured_server_reference_sends_clients_elsewhere",
        &["4", "5"],
        tern_broker::core::Settings {
            server_reference: Some("elsewhere:1883".into()),
            ..Default::default()
        },
    );
}
