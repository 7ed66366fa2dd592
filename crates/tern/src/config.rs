//! `tern broker --config FILE`: the TOML configuration. Every setting has a default (the
//! table in docs/configuration.md); an unknown key or a bad value stops startup with an
//! error naming the key and its line.

use std::time::Duration;

use serde::Deserialize;
use tern_broker::core::{QueuePolicy, Settings, SharedStrategy};
use tern_codec::QoS;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct File {
    /// One `[listener]` table or any number of `[[listener]]` tables.
    #[serde(deserialize_with = "one_or_many")]
    pub(crate) listener: Vec<Listener>,
    pub(crate) sessions: Sessions,
    pub(crate) limits: Limits,
    pub(crate) mqtt: Mqtt,
    pub(crate) storage: Storage,
    pub(crate) auth: Auth,
    pub(crate) metrics: Metrics,
    pub(crate) admin: Admin,
    pub(crate) sys: Sys,
    pub(crate) log: Log,
    pub(crate) idempotency: IdempotencyTable,
    /// `[[topic]]` tables: guarantee policies by topic filter, first match wins.
    #[serde(rename = "topic")]
    pub(crate) topics: Vec<TopicTable>,
    /// `[[bridge]]` tables: connections to other brokers (docs/bridge.md).
    #[serde(rename = "bridge")]
    pub(crate) bridges: Vec<BridgeTable>,
    /// `[cluster]`: this broker as a node of a cluster on NATS (docs/cluster.md).
    pub(crate) cluster: Option<ClusterTable>,
}

/// `[cluster]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ClusterTable {
    /// `nats://HOST:PORT` URLs of the NATS cluster.
    pub(crate) nats_urls: Vec<String>,
    /// This node's name; default: the host name and the listener's port.
    pub(crate) node_id: String,
    pub(crate) nats_user: Option<String>,
    pub(crate) nats_password: Option<String>,
    pub(crate) nats_token: Option<String>,
    /// Replicas of the cluster's stream of QoS 1/2 messages.
    pub(crate) replicas: u8,
    /// How long after a node's last sign of life its clients, reconnecting elsewhere,
    /// wait for it (refused) rather than start afresh.
    pub(crate) session_wait_secs: u64,
}

impl Default for ClusterTable {
    fn default() -> Self {
        ClusterTable {
            nats_urls: Vec::new(),
            node_id: String::new(),
            nats_user: None,
            nats_password: None,
            nats_token: None,
            replicas: 3,
            session_wait_secs: 10,
        }
    }
}

impl ClusterTable {
    /// What the NATS link needs.
    pub(crate) fn link_config(&self) -> tern_cluster::Config {
        tern_cluster::Config {
            urls: self.nats_urls.clone(),
            node_id: if self.node_id.is_empty() {
                std::fs::read_to_string("/etc/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "tern".into())
            } else {
                self.node_id.clone()
            },
            user: self.nats_user.clone().zip(self.nats_password.clone()),
            token: self.nats_token.clone(),
            replicas: usize::from(self.replicas),
            session_wait: Duration::from_secs(self.session_wait_secs),
        }
    }
}

/// One `[[bridge]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BridgeTable {
    pub(crate) name: String,
    /// `mqtt://`, `mqtts://`, `ws://` or `wss://` URL of the remote broker.
    pub(crate) address: String,
    /// `"5"` (default) or `"3.1.1"`.
    #[serde(default = "five")]
    pub(crate) protocol: String,
    /// The bridge's client id at the remote; default `tern-bridge-NAME`.
    pub(crate) client_id: Option<String>,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    /// TLS: CA certificates the remote is checked against (default: the system's).
    pub(crate) ca_file: Option<String>,
    /// TLS: a client certificate and key, for remotes that ask for one.
    pub(crate) cert_file: Option<String>,
    pub(crate) key_file: Option<String>,
    #[serde(default = "sixty")]
    pub(crate) keep_alive_secs: u16,
    /// How long the remote keeps the bridge's session while it is away (5.0).
    #[serde(default = "week")]
    pub(crate) session_expiry_secs: u32,
    /// The local broker as the bridge reaches it; default: the first TCP listener, on
    /// loopback.
    pub(crate) local_address: Option<String>,
    pub(crate) local_username: Option<String>,
    pub(crate) local_password: Option<String>,
    /// Messages that may wait for one broker before the bridge takes no more from the
    /// other.
    #[serde(default = "hundred_thousand")]
    pub(crate) max_waiting: usize,
    #[serde(default = "half_second")]
    pub(crate) reconnect_min_ms: u64,
    #[serde(default = "half_minute")]
    pub(crate) reconnect_max_ms: u64,
    #[serde(rename = "topic")]
    pub(crate) topics: Vec<BridgeTopic>,
}

/// One `[[bridge.topic]]` route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BridgeTopic {
    pub(crate) pattern: String,
    pub(crate) direction: BridgeDirection,
    #[serde(default = "one")]
    pub(crate) qos: u8,
    #[serde(default)]
    pub(crate) local_prefix: String,
    #[serde(default)]
    pub(crate) remote_prefix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum BridgeDirection {
    Out,
    In,
    Both,
}

fn five() -> String {
    "5".into()
}

fn sixty() -> u16 {
    60
}

fn week() -> u32 {
    7 * 24 * 3600
}

fn hundred_thousand() -> usize {
    100_000
}

fn half_second() -> u64 {
    500
}

fn half_minute() -> u64 {
    30_000
}

fn one() -> u8 {
    1
}

/// `[idempotency]`: publishers' message ids remembered to drop repeats.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct IdempotencyTable {
    /// The user property that carries the key; empty: keys are not looked at.
    pub(crate) property: String,
    pub(crate) window_secs: u64,
    pub(crate) max_keys: usize,
}

impl Default for IdempotencyTable {
    fn default() -> Self {
        let d = tern_broker::core::Idempotency::default();
        IdempotencyTable {
            property: d.property.map(|p| p.to_string()).unwrap_or_default(),
            window_secs: d.window.as_secs(),
            max_keys: d.max_keys,
        }
    }
}

/// One `[[topic]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TopicTable {
    filter: String,
    #[serde(default)]
    min_qos: u8,
    #[serde(default = "two")]
    max_qos: u8,
    queue_policy: Option<Policy>,
    max_queued_messages: Option<usize>,
    max_queued_bytes: Option<usize>,
    #[serde(default = "yes")]
    queue_offline: bool,
    queue_qos0: Option<bool>,
    expiry_default_secs: Option<u32>,
    expiry_max_secs: Option<u32>,
    /// Keep these topics' messages this long for replay (`90s`, `10m`, `24h`, `7d`).
    history: Option<String>,
    /// ... within this many topic and payload bytes.
    history_max_bytes: Option<u64>,
}

fn two() -> u8 {
    2
}

fn yes() -> bool {
    true
}

fn qos(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn queue_policy(p: Policy) -> QueuePolicy {
    match p {
        Policy::DropOldest => QueuePolicy::DropOldest,
        Policy::DropNewest => QueuePolicy::DropNewest,
        Policy::Reject => QueuePolicy::Reject,
        Policy::Block => QueuePolicy::Block,
    }
}

impl File {
    /// The `[[topic]]` policies, checked: a valid filter (not a shared subscription),
    /// QoS levels 0-2 with the minimum at most the maximum.
    pub(crate) fn topic_policies(&self) -> Result<Vec<tern_broker::core::TopicPolicy>, String> {
        let mut out = Vec::new();
        for (i, t) in self.topics.iter().enumerate() {
            let filter = tern_codec::TopicFilter::new(t.filter.clone())
                .map_err(|e| format!("topic[{i}].filter: '{}': {e}", t.filter))?;
            if filter.share_group().is_some() {
                return Err(format!(
                    "topic[{i}].filter: '{}': a policy covers topics, not a shared subscription",
                    t.filter
                ));
            }
            if t.min_qos > 2 || t.max_qos > 2 {
                return Err(format!(
                    "topic[{i}] ({}): QoS levels are 0, 1 or 2",
                    t.filter
                ));
            }
            if t.min_qos > t.max_qos {
                return Err(format!(
                    "topic[{i}] ({}): min_qos {} is above max_qos {}",
                    t.filter, t.min_qos, t.max_qos
                ));
            }
            if t.max_queued_messages == Some(0) {
                return Err(format!("topic[{i}].max_queued_messages must be at least 1"));
            }
            let mut p = tern_broker::core::TopicPolicy::new(filter);
            p.min_qos = qos(t.min_qos);
            p.max_qos = qos(t.max_qos);
            p.queue_policy = t.queue_policy.map(queue_policy);
            p.max_queued_messages = t.max_queued_messages;
            p.max_queued_bytes = t.max_queued_bytes;
            p.queue_offline = t.queue_offline;
            p.queue_qos0 = t.queue_qos0;
            p.expiry_default = t.expiry_default_secs.map(|s| Duration::from_secs(s.into()));
            p.expiry_max = t.expiry_max_secs.map(|s| Duration::from_secs(s.into()));
            p.history = match &t.history {
                None => None,
                Some(h) => match tern_broker::core::parse_duration(h) {
                    Some(d) if !d.is_zero() => Some(d),
                    _ => {
                        return Err(format!(
                            "topic[{i}].history: '{h}' is not a duration like \"90s\", \"10m\", \"24h\" or \"7d\""
                        ));
                    }
                },
            };
            if t.history_max_bytes.is_some() && p.history.is_none() {
                return Err(format!(
                    "topic[{i}].history_max_bytes needs history (how long messages are kept)"
                ));
            }
            p.history_max_bytes = t.history_max_bytes;
            out.push(p);
        }
        Ok(out)
    }
}

/// The HTTP endpoint: `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Metrics {
    pub(crate) enabled: bool,
    pub(crate) bind: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            enabled: true,
            bind: "127.0.0.1:9090".into(),
        }
    }
}

/// The admin API on the metrics endpoint (`/api/v1/...`): off without a token.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Admin {
    /// The bearer token every request must carry.
    pub(crate) token: Option<String>,
}

/// `$SYS/broker/...` topics.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Sys {
    /// Seconds between updates; 0: no `$SYS` topics.
    pub(crate) interval_secs: u64,
}

impl Default for Sys {
    fn default() -> Self {
        Sys { interval_secs: 10 }
    }
}

/// What is logged and how.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Log {
    /// Level, or per-module directives: `"info,tern_broker::server=debug"` (RUST_LOG,
    /// when set, wins).
    pub(crate) level: String,
    pub(crate) format: LogFormat,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// `text`: one human-readable line per event. `json`: one JSON object per line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum LogFormat {
    Text,
    Json,
}

/// Who may connect.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Auth {
    /// `user:hash` lines made with `tern passwd`.
    pub(crate) password_file: Option<String>,
    /// Clients without a username, on listeners that do not say; default: only on
    /// listeners bound to a loopback address.
    pub(crate) allow_anonymous: Option<bool>,
    /// Mosquitto-style ACL file (`user`, `topic`, `pattern` lines); none: all allowed.
    pub(crate) acl_file: Option<String>,
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
    /// The budget for queued messages across all sessions (payload plus a fixed overhead
    /// each); past it, QoS 1/2 publishes that would be queued are refused. 0: no budget.
    max_queued_bytes: usize,
    /// The store's page cache in this process's memory, in MiB.
    pub(crate) cache_mb: usize,
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
            max_queued_bytes: Settings::default().max_queued_total,
            cache_mb: tern_store::DEFAULT_CACHE >> 20,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Listener {
    /// Address to listen on.
    pub(crate) bind: String,
    pub(crate) transport: TransportKind,
    /// TLS (`tls`, `wss`): PEM certificate chain and private key.
    pub(crate) cert_file: Option<String>,
    pub(crate) key_file: Option<String>,
    /// TLS: CA certificates (PEM) that client certificates are checked against.
    pub(crate) ca_file: Option<String>,
    /// With `ca_file`: refuse clients without a valid certificate (default true).
    pub(crate) require_certificate: bool,
    /// With `ca_file`: certificate revocation lists (PEM).
    pub(crate) crl_file: Option<String>,
    /// With `ca_file`: the certificate's CN is the username, no password asked.
    pub(crate) use_identity_as_username: bool,
    /// WebSocket (`ws`, `wss`): the upgrade path.
    pub(crate) path: String,
    /// 0: no limit of its own.
    pub(crate) max_connections: usize,
    /// Default: `[auth] allow_anonymous`, or else only on a loopback address.
    pub(crate) allow_anonymous: Option<bool>,
    /// 0: every write goes out at once; else a write within this many microseconds of a
    /// small one waits to go out with what follows.
    pub(crate) write_coalesce_us: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum TransportKind {
    Tcp,
    Tls,
    Ws,
    Wss,
}

impl Default for Listener {
    fn default() -> Self {
        Listener {
            bind: "127.0.0.1:1883".into(),
            transport: TransportKind::Tcp,
            cert_file: None,
            key_file: None,
            ca_file: None,
            require_certificate: true,
            crl_file: None,
            use_identity_as_username: false,
            path: "/mqtt".into(),
            max_connections: 0,
            allow_anonymous: None,
            write_coalesce_us: 0,
        }
    }
}

impl Default for File {
    fn default() -> Self {
        File {
            listener: vec![Listener::default()],
            sessions: Sessions::default(),
            limits: Limits::default(),
            mqtt: Mqtt::default(),
            storage: Storage::default(),
            auth: Auth::default(),
            metrics: Metrics::default(),
            admin: Admin::default(),
            sys: Sys::default(),
            log: Log::default(),
            idempotency: IdempotencyTable::default(),
            topics: Vec::new(),
            bridges: Vec::new(),
            cluster: None,
        }
    }
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Listener>, D::Error> {
    use serde::de::{MapAccess, SeqAccess, Visitor, value::MapAccessDeserializer};
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<Listener>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a [listener] table or [[listener]] tables")
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            Listener::deserialize(MapAccessDeserializer::new(map)).map(|l| vec![l])
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut all = Vec::new();
            while let Some(l) = seq.next_element()? {
                all.push(l);
            }
            Ok(all)
        }
    }
    d.deserialize_any(V)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Sessions {
    max_queued_messages: usize,
    max_queued_bytes: usize,
    queue_policy: Policy,
    /// Under `block`: how long a publish may be held before it is refused.
    block_timeout_ms: u64,
    /// 0: no age limit.
    max_queued_age_secs: u64,
    queue_qos0: bool,
    max_session_expiry_3x_secs: u32,
    /// Queued messages a connected persistent session keeps in memory; the rest stay in
    /// the store until the window drains. 0: all in memory (no window).
    memory_window: usize,
}

impl Default for Sessions {
    fn default() -> Self {
        let s = Settings::default();
        Sessions {
            max_queued_messages: s.max_queued_messages,
            max_queued_bytes: s.max_queued_bytes,
            queue_policy: match s.queue_policy {
                QueuePolicy::DropOldest => Policy::DropOldest,
                QueuePolicy::DropNewest => Policy::DropNewest,
                QueuePolicy::Reject => Policy::Reject,
                QueuePolicy::Block => Policy::Block,
            },
            block_timeout_ms: s.block_timeout.as_millis() as u64,
            max_queued_age_secs: 0,
            queue_qos0: s.queue_qos0,
            max_session_expiry_3x_secs: u32::MAX,
            memory_window: s.queue_window.unwrap_or(0),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Policy {
    DropOldest,
    DropNewest,
    Reject,
    Block,
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
    /// Connections open at once over all listeners; 0: no limit.
    pub(crate) max_connections: usize,
    max_topic_length: usize,
    max_topic_levels: usize,
    max_subscriptions_per_client: usize,
    /// Sessions held at once (online and offline); 0: no limit.
    max_sessions: usize,
    /// PUBLISH packets per second per client; 0: no limit.
    max_publish_rate: u32,
    /// Bytes waiting to be written to a connection past which its QoS 0 copies are
    /// dropped (a slow consumer).
    max_write_backlog_bytes: usize,
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
            max_connections: 0,
            max_topic_length: s.max_topic_length,
            max_topic_levels: s.max_topic_levels,
            max_subscriptions_per_client: s.max_subscriptions,
            max_sessions: 0,
            max_publish_rate: 0,
            max_write_backlog_bytes: s.max_write_backlog,
        }
    }
}

/// The longest write coalescing window: beyond it, added latency would be mistaken for a
/// stalled broker.
const MAX_WRITE_COALESCE_US: u32 = 100_000;

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
        if file.listener.is_empty() {
            return Err("at least one [[listener]] is needed".into());
        }
        for (n, l) in file.listener.iter().enumerate() {
            let at = if file.listener.len() == 1 {
                "listener".to_string()
            } else {
                format!("listener {}", n + 1)
            };
            if l.write_coalesce_us > MAX_WRITE_COALESCE_US {
                return Err(format!(
                    "{at}.write_coalesce_us: {} is over {MAX_WRITE_COALESCE_US} (100 ms)",
                    l.write_coalesce_us
                ));
            }
            if l.bind.parse::<std::net::SocketAddr>().is_err() {
                return Err(format!(
                    "{at}.bind: '{}' is not an address like 127.0.0.1:1883",
                    l.bind
                ));
            }
            let tls = matches!(l.transport, TransportKind::Tls | TransportKind::Wss);
            if tls && (l.cert_file.is_none() || l.key_file.is_none()) {
                return Err(format!(
                    "{at}: transport {:?} needs cert_file and key_file",
                    l.transport
                ));
            }
            if !tls && (l.cert_file.is_some() || l.key_file.is_some() || l.ca_file.is_some()) {
                return Err(format!(
                    "{at}: cert_file/key_file/ca_file need transport \"tls\" or \"wss\""
                ));
            }
            if l.crl_file.is_some() && l.ca_file.is_none() {
                return Err(format!("{at}: crl_file needs ca_file"));
            }
            if l.use_identity_as_username && l.ca_file.is_none() {
                return Err(format!("{at}: use_identity_as_username needs ca_file"));
            }
            if !l.path.starts_with('/') {
                return Err(format!("{at}.path: '{}' must start with /", l.path));
            }
        }
        if file.metrics.bind.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!(
                "metrics.bind: '{}' is not an address like 127.0.0.1:9090",
                file.metrics.bind
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&file.log.level) {
            return Err(format!("log.level: '{}': {e}", file.log.level));
        }
        for (key, v) in [
            (
                "max_write_backlog_bytes",
                file.limits.max_write_backlog_bytes,
            ),
            ("max_topic_length", file.limits.max_topic_length),
            ("max_topic_levels", file.limits.max_topic_levels),
            (
                "max_subscriptions_per_client",
                file.limits.max_subscriptions_per_client,
            ),
        ] {
            if v == 0 {
                return Err(format!("limits.{key} must be at least 1"));
            }
        }
        if file.idempotency.max_keys == 0 || file.idempotency.window_secs == 0 {
            return Err(
                "idempotency: window_secs and max_keys must be at least 1 (property = \"\" turns keys off)"
                    .into(),
            );
        }
        file.topic_policies()?;
        if file.storage.durability == Durability::None
            && file.topics.iter().any(|t| t.history.is_some())
        {
            return Err(
                "topic history keeps messages in the store: it needs storage.durability \"sync\" or \"batched\""
                    .into(),
            );
        }
        for b in &file.bridges {
            crate::bridges::bridge(b, std::path::Path::new("."), "127.0.0.1:1883")?;
        }
        file.check_cluster()?;
        let mut names: Vec<&str> = file.bridges.iter().map(|b| b.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("bridge '{}' is named twice", w[0]));
        }
        Ok(file)
    }

    /// The `[cluster]` table's mistakes, if it has any.
    pub(crate) fn check_cluster(&self) -> Result<(), String> {
        let Some(c) = &self.cluster else {
            return Ok(());
        };
        if c.nats_urls.is_empty() {
            return Err("cluster.nats_urls: at least one nats://HOST:PORT".into());
        }
        for u in &c.nats_urls {
            let rest = u
                .strip_prefix("nats://")
                .or_else(|| u.strip_prefix("tls://"))
                .unwrap_or(u);
            let ok = rest
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(format!("cluster.nats_urls: '{u}' is not nats://HOST:PORT"));
            }
        }
        if self.storage.durability == Durability::None {
            return Err(
                "a cluster node keeps what it applied of the cluster's stream in its store: it needs storage.durability \"sync\" or \"batched\""
                    .into(),
            );
        }
        if !(1..=5).contains(&c.replicas) {
            return Err(format!("cluster.replicas: {} is not 1 to 5", c.replicas));
        }
        if c.nats_user.is_some() != c.nats_password.is_some() {
            return Err("cluster: nats_user and nats_password go together".into());
        }
        Ok(())
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
                Policy::Block => QueuePolicy::Block,
            },
            block_timeout: Duration::from_millis(self.sessions.block_timeout_ms),
            max_queued_total: match self.storage.max_queued_bytes {
                0 => usize::MAX,
                n => n,
            },
            max_write_backlog: self.limits.max_write_backlog_bytes,
            // Without a store (durability none) the server turns the window off.
            queue_window: (self.sessions.memory_window > 0).then_some(self.sessions.memory_window),
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
            max_topic_length: self.limits.max_topic_length,
            max_topic_levels: self.limits.max_topic_levels,
            max_subscriptions: self.limits.max_subscriptions_per_client,
            max_sessions: (self.limits.max_sessions > 0).then_some(self.limits.max_sessions),
            max_publish_rate: (self.limits.max_publish_rate > 0)
                .then_some(self.limits.max_publish_rate),
            idempotency: tern_broker::core::Idempotency {
                property: (!self.idempotency.property.is_empty())
                    .then(|| self.idempotency.property.as_str().into()),
                window: Duration::from_secs(self.idempotency.window_secs),
                max_keys: self.idempotency.max_keys,
            },
            // Checked when the file was read.
            topics: self.topic_policies().unwrap_or_default().into(),
            cluster: self.cluster.is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_every_default() {
        let f = File::parse("").unwrap();
        assert_eq!(f.listener[0].bind, "127.0.0.1:1883");
        assert_eq!(f.settings(), Settings::default());
    }

    #[test]
    fn settings_are_read() {
        let f = File::parse(
            "[listener]\nbind = \"0.0.0.0:1884\"\n[sessions]\nqueue_policy = \"drop-newest\"\nmax_queued_messages = 5\nqueue_qos0 = true\n[limits]\nreceive_maximum = 7\nconnect_timeout_secs = 3\nmax_keep_alive = 60\n[mqtt]\nmaximum_qos = 1\nshared_strategy = \"hash-topic\"\nresponse_information = \"replies/\"\n",
        )
        .unwrap();
        let s = f.settings();
        assert_eq!(f.listener[0].bind, "0.0.0.0:1884");
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
    fn bridge_tables_are_read_and_their_mistakes_named() {
        let ok = "[[bridge]]\nname = \"cloud\"\naddress = \"mqtt://10.0.0.1:1884\"\n\
                  [[bridge.topic]]\npattern = \"sensors/#\"\ndirection = \"out\"\n\
                  remote_prefix = \"site/\"\n";
        let file = File::parse(ok).unwrap();
        let b = crate::bridges::bridge(
            &file.bridges[0],
            std::path::Path::new("/d"),
            "127.0.0.1:1883",
        )
        .unwrap();
        assert_eq!((b.remote.host.as_str(), b.remote.port), ("10.0.0.1", 1884));
        assert_eq!(
            (b.local.port, b.local.client_id.as_str()),
            (1883, "tern-bridge-cloud")
        );
        assert_eq!(b.store, std::path::Path::new("/d/bridge-cloud.redb"));
        assert_eq!(b.routes[0].qos, QoS::AtLeastOnce, "qos 1 by default");
        for (text, says) in [
            (ok.replace("\"out\"", "\"up\""), "line 6"),
            (ok.replace("\"out\"", "\"both\"") + "", ""),
            (
                ok.replace("name = \"cloud\"", "name = \"cloud\"\nprotocol = \"3.1.1\"")
                    .replace("\"out\"", "\"both\""),
                "both directions needs an MQTT 5.0 remote",
            ),
            (ok.replace("mqtt://", "http://"), "bridge 'cloud'.address"),
            (
                ok.replace("sensors/#", "sensors/#/x"),
                "is not a topic filter",
            ),
            (ok.replace("site/", "site/+/"), "holds a wildcard"),
            (ok.replace("cloud", "a b"), "bridge.name"),
            (format!("{ok}{ok}"), "named twice"),
            (
                ok.replace("\"out\"\n", "\"out\"\nqos = 3\n"),
                "is not 0, 1 or 2",
            ),
        ] {
            match File::parse(&text) {
                Ok(_) => assert!(says.is_empty(), "{text} should fail with {says}"),
                Err(e) => assert!(!says.is_empty() && e.contains(says), "{text}: {e}"),
            }
        }
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
        let e = File::parse("[[listener]]\nbind = \"127.0.0.1:1\"\n[[listener]]\nbind = \"127.0.0.1:2\"\ntransport = \"tls\"\n").unwrap_err();
        assert!(e.contains("listener 2") && e.contains("cert_file"), "{e}");
        let e = File::parse("[[listener]]\ntransport = \"quic\"\n").unwrap_err();
        assert!(e.contains("quic") && e.contains("line 2"), "{e}");
        let e = File::parse("[listener]\nwrite_coalesce_us = 200000\n").unwrap_err();
        assert!(
            e.contains("listener.write_coalesce_us") && e.contains("200000"),
            "{e}"
        );
        let f = File::parse("[listener]\nwrite_coalesce_us = 500\n").unwrap();
        assert_eq!(f.listener[0].write_coalesce_us, 500);
    }

    #[test]
    fn several_listeners_are_read() {
        let f = File::parse("[[listener]]\nbind = \"127.0.0.1:1883\"\n[[listener]]\nbind = \"0.0.0.0:8883\"\ntransport = \"wss\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\npath = \"/ws\"\nmax_connections = 5\n").unwrap();
        assert_eq!(f.listener.len(), 2);
        let l = &f.listener[1];
        assert_eq!(
            (l.transport, l.path.as_str(), l.max_connections),
            (TransportKind::Wss, "/ws", 5)
        );
    }

    #[test]
    fn a_revocation_list_is_read_and_needs_the_client_ca() {
        let tls = "[listener]\nbind = \"127.0.0.1:8883\"\ntransport = \"tls\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n";
        let f = File::parse(&format!(
            "{tls}ca_file = \"ca.pem\"\ncrl_file = \"crl.pem\"\n"
        ))
        .unwrap();
        assert_eq!(f.listener[0].crl_file.as_deref(), Some("crl.pem"));
        let e = File::parse(&format!("{tls}crl_file = \"crl.pem\"\n")).unwrap_err();
        assert!(e.contains("crl_file needs ca_file"), "{e}");
    }
}
