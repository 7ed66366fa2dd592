//! `tern broker --config FILE`: the TOML configuration. Every setting has a default (the
//! table in docs/configuration.md); an unknown key or a bad value stops startup with an
//! error naming the key and its line.

use std::time::Duration;

use serde::Deserialize;
use tern_broker::core::{QueuePolicy, Settings, SharedStrategy};
use tern_codec::QoS;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct File {
    pub(crate) listener: Listener,
    pub(crate) sessions: Sessions,
    pub(crate) limits: Limits,
    pub(crate) mqtt: Mqtt,
    pub(crate) storage: Storage,
    pub(crate) auth: Auth,
}

/// Who may connect.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Auth {
    /// `user:hash` lines made with `tern passwd`.
    pub(crate) password_file: Option<String>,
    /// Clients without a username; default: only when listening on a loopback address.
    pub(crate) allow_anonymous: Option<bool>,
}

/// Where state is kept and when an acknowledgement may go.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Storage {
    /// The directory holding the store file.
    pub(crate) data_dir: String,
    pub(crate) durability: Durability,
    /// With `durability = "batched"`: the longest an acknowledged message may wait for
    /// its fsync.
    pub(crate) flush_interval_ms: u64,
}

/// `sync`: fsync, then acknowledge. `batched`: acknowledge once written, fsync at most
/// every `flush_interval_ms`. `none`: memory only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Durability {
    Sync,
    Batched,
    None,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            data_dir: "./tern-data".into(),
            durability: Durability::Sync,
            flush_interval_ms: 100,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Mqtt {
    maximum_qos: u8,
    retain_available: bool,
    response_information: Option<String>,
    shared_strategy: Strategy,
    server_reference: Option<String>,
    server_moved: bool,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Strategy {
    RoundRobin,
    Random,
    Sticky,
    HashClientId,
    HashTopic,
}

impl Default for Mqtt {
    fn default() -> Self {
        Mqtt {
            maximum_qos: 2,
            retain_available: true,
            response_information: None,
            shared_strategy: Strategy::RoundRobin,
            server_reference: None,
            server_moved: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Listener {
    /// Address to listen on.
    pub(crate) bind: String,
}

impl Default for Listener {
    fn default() -> Self {
        Listener {
            bind: "127.0.0.1:1883".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Sessions {
    max_queued_messages: usize,
    max_queued_bytes: usize,
    queue_policy: Policy,
    /// 0: no age limit.
    max_queued_age_secs: u64,
    queue_qos0: bool,
    max_session_expiry_3x_secs: u32,
}

impl Default for Sessions {
    fn default() -> Self {
        let s = Settings::default();
        Sessions {
            max_queued_messages: s.max_queued_messages,
            max_queued_bytes: s.max_queued_bytes,
            queue_policy: Policy::DropOldest,
            max_queued_age_secs: 0,
            queue_qos0: s.queue_qos0,
            max_session_expiry_3x_secs: u32::MAX,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Policy {
    DropOldest,
    DropNewest,
    Reject,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Limits {
    receive_maximum: u16,
    topic_alias_maximum: u16,
    inflight_3x: u16,
    connect_timeout_secs: u32,
    max_packet_size: u32,
    max_keep_alive: u16,
}

impl Default for Limits {
    fn default() -> Self {
        let s = Settings::default();
        Limits {
            receive_maximum: s.receive_maximum,
            topic_alias_maximum: s.topic_alias_maximum,
            inflight_3x: s.window_3x,
            connect_timeout_secs: s.connect_timeout.as_secs() as u32,
            max_packet_size: s.max_packet_size,
            max_keep_alive: s.max_keep_alive,
        }
    }
}

impl File {
    /// Parses and checks a configuration file's text; the error names the key and line.
    pub(crate) fn parse(text: &str) -> Result<File, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        if file.limits.receive_maximum == 0 {
            return Err("limits.receive_maximum must be at least 1".into());
        }
        if file.limits.connect_timeout_secs == 0 {
            return Err("limits.connect_timeout_secs must be at least 1".into());
        }
        if file.mqtt.maximum_qos > 2 {
            return Err(format!(
                "mqtt.maximum_qos: {} is not a QoS (0, 1 or 2)",
                file.mqtt.maximum_qos
            ));
        }
        if !(16..=tern_codec::MAX_PACKET_SIZE).contains(&file.limits.max_packet_size) {
            return Err(format!(
                "limits.max_packet_size: {} is outside 16..={}",
                file.limits.max_packet_size,
                tern_codec::MAX_PACKET_SIZE
            ));
        }
        if file.limits.inflight_3x == 0 {
            return Err("limits.inflight_3x must be at least 1".into());
        }
        if file.listener.bind.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!(
                "listener.bind: '{}' is not an address like 127.0.0.1:1883",
                file.listener.bind
            ));
        }
        Ok(file)
    }

    /// The broker core's settings.
    pub(crate) fn settings(&self) -> Settings {
        Settings {
            max_queued_messages: self.sessions.max_queued_messages,
            max_queued_bytes: self.sessions.max_queued_bytes,
            queue_policy: match self.sessions.queue_policy {
                Policy::DropOldest => QueuePolicy::DropOldest,
                Policy::DropNewest => QueuePolicy::DropNewest,
                Policy::Reject => QueuePolicy::Reject,
            },
            max_queued_age: (self.sessions.max_queued_age_secs > 0)
                .then(|| Duration::from_secs(self.sessions.max_queued_age_secs)),
            receive_maximum: self.limits.receive_maximum,
            topic_alias_maximum: self.limits.topic_alias_maximum,
            window_3x: self.limits.inflight_3x,
            queue_qos0: self.sessions.queue_qos0,
            connect_timeout: Duration::from_secs(u64::from(self.limits.connect_timeout_secs)),
            maximum_qos: match self.mqtt.maximum_qos {
                0 => QoS::AtMostOnce,
                1 => QoS::AtLeastOnce,
                _ => QoS::ExactlyOnce,
            },
            retain_available: self.mqtt.retain_available,
            max_packet_size: self.limits.max_packet_size,
            max_keep_alive: self.limits.max_keep_alive,
            response_information: self.mqtt.response_information.clone(),
            shared_strategy: match self.mqtt.shared_strategy {
                Strategy::RoundRobin => SharedStrategy::RoundRobin,
                Strategy::Random => SharedStrategy::Random,
                Strategy::Sticky => SharedStrategy::Sticky,
                Strategy::HashClientId => SharedStrategy::HashClientId,
                Strategy::HashTopic => SharedStrategy::HashTopic,
            },
            server_reference: self.mqtt.server_reference.clone(),
            server_moved: self.mqtt.server_moved,
            max_session_expiry_3x: Duration::from_secs(u64::from(
                self.sessions.max_session_expiry_3x_secs,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_every_default() {
        let f = File::parse("").unwrap();
        assert_eq!(f.listener.bind, "127.0.0.1:1883");
        assert_eq!(f.settings(), Settings::default());
    }

    #[test]
    fn settings_are_read() {
        let f = File::parse(
            "[listener]\nbind = \"0.0.0.0:1884\"\n[sessions]\nqueue_policy = \"drop-newest\"\nmax_queued_messages = 5\nqueue_qos0 = true\n[limits]\nreceive_maximum = 7\nconnect_timeout_secs = 3\nmax_keep_alive = 60\n[mqtt]\nmaximum_qos = 1\nshared_strategy = \"hash-topic\"\nresponse_information = \"replies/\"\n",
        )
        .unwrap();
        let s = f.settings();
        assert_eq!(f.listener.bind, "0.0.0.0:1884");
        assert_eq!(
            (
                s.queue_policy,
                s.max_queued_messages,
                s.queue_qos0,
                s.receive_maximum,
                s.connect_timeout
            ),
            (QueuePolicy::DropNewest, 5, true, 7, Duration::from_secs(3))
        );
        assert_eq!(
            (
                s.max_keep_alive,
                s.maximum_qos,
                s.shared_strategy,
                s.response_information.as_deref()
            ),
            (
                60,
                QoS::AtLeastOnce,
                SharedStrategy::HashTopic,
                Some("replies/")
            )
        );
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let e = File::parse("[listener]\nbind = \"127.0.0.1:1\"\n[sessions]\nmax_queued = 3\n")
            .unwrap_err();
        assert!(e.contains("max_queued") && e.contains("line 4"), "{e}");
    }

    #[test]
    fn a_bad_value_is_named_with_its_line() {
        let e = File::parse("[sessions]\nqueue_policy = \"drop-random\"\n").unwrap_err();
        assert!(e.contains("drop-random") && e.contains("line 2"), "{e}");
        let e = File::parse("[limits]\nreceive_maximum = 70000\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        let e = File::parse("[limits]\nreceive_maximum = 0\n").unwrap_err();
        assert!(e.contains("limits.receive_maximum"), "{e}");
        let e = File::parse("[listener]\nbind = \"localhost\"\n").unwrap_err();
        assert!(e.contains("listener.bind"), "{e}");
    }
}
