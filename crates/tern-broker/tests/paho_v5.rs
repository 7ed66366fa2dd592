//! MQTT 5.0 server behaviours, checked over real TCP with paho-mqtt (PyPI) as a 5.0 client.
//! Each test starts its own broker (some with non-default settings) and runs one claim of
//! `tests/interop/paho_broker.py`.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

mod common;

use tern_broker::core::Settings;
use tern_codec::QoS;

fn claim(name: &str, settings: Settings) {
    common::paho_claim(name, "5", settings);
}

#[test]
fn no_local_skips_the_publishers_own_messages() {
    claim(
        "no_local_skips_the_publishers_own_messages",
        Settings::default(),
    );
}

#[test]
fn retain_as_published_and_retain_handling() {
    claim(
        "retain_as_published_and_retain_handling",
        Settings::default(),
    );
}

#[test]
fn message_expiry_drops_expired_messages_and_forwards_the_remaining_time() {
    claim(
        "message_expiry_drops_expired_messages_and_forwards_the_remaining_time",
        Settings::default(),
    );
}

#[test]
fn request_response_and_user_properties_are_forwarded_unchanged() {
    claim(
        "request_response_and_user_properties_are_forwarded_unchanged",
        Settings::default(),
    );
}

#[test]
fn payload_format_invalid_and_no_matching_subscribers_reason_codes() {
    claim(
        "payload_format_invalid_and_no_matching_subscribers_reason_codes",
        Settings::default(),
    );
}

#[test]
fn subscription_identifiers_are_delivered_with_every_matching_id() {
    claim(
        "subscription_identifiers_are_delivered_with_every_matching_id",
        Settings::default(),
    );
}

#[test]
fn inbound_topic_alias_is_resolved() {
    claim("inbound_topic_alias_is_resolved", Settings::default());
}

#[test]
fn receive_maximum_is_advertised_and_the_clients_is_honoured() {
    claim(
        "receive_maximum_is_advertised_and_the_clients_is_honoured",
        Settings::default(),
    );
}

#[test]
fn maximum_packet_size_both_ways() {
    claim(
        "maximum_packet_size_both_ways",
        Settings {
            max_packet_size: 1024,
            ..Settings::default()
        },
    );
}

#[test]
fn server_keep_alive_and_response_information() {
    claim(
        "server_keep_alive_and_response_information",
        Settings {
            max_keep_alive: 10,
            response_information: Some("replies/".into()),
            ..Settings::default()
        },
    );
}

#[test]
fn reason_strings_only_when_problem_information_is_wanted() {
    claim(
        "reason_strings_only_when_problem_information_is_wanted",
        Settings::default(),
    );
}

#[test]
fn session_expiry_can_change_at_disconnect() {
    claim(
        "session_expiry_can_change_at_disconnect",
        Settings::default(),
    );
}

#[test]
fn maximum_qos_and_retain_available_are_enforced() {
    claim(
        "maximum_qos_and_retain_available_are_enforced",
        Settings {
            maximum_qos: QoS::AtLeastOnce,
            retain_available: false,
            ..Settings::default()
        },
    );
}

#[test]
fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    claim(
        "no_local_on_a_shared_subscription_is_a_protocol_error",
        Settings::default(),
    );
}

#[test]
fn hash_topic_strategy_keeps_a_topic_on_one_member() {
    claim(
        "hash_topic_strategy_keeps_a_topic_on_one_member",
        Settings {
            shared_strategy: tern_broker::core::SharedStrategy::HashTopic,
            ..Settings::default()
        },
    );
}
