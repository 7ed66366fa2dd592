//! `$SYS/broker/...`: the broker's own retained QoS 0 messages about itself, with
//! Mosquitto's topic names and meanings where Mosquitto has them. Published every
//! interval (the server's timer), each topic only when its value changed. Never stored;
//! clients cannot publish there; who may read them is up to the ACL.

use super::*;

/// Counters the load averages follow, in [`LOADS`] order.
const LOADS: [&str; 7] = [
    "messages/received",
    "messages/sent",
    "bytes/received",
    "bytes/sent",
    "publish/received",
    "publish/sent",
    "connections",
];

/// Moving averages of per-minute rates, as Mosquitto's `$SYS/broker/load/...`.
#[derive(Default)]
pub(super) struct Sys {
    /// The last value published on each topic.
    last: HashMap<String, String>,
    /// When the previous values were taken, and the counters then.
    previous: Option<(Instant, [u64; 7])>,
    /// 1, 5 and 15 minute averages of each counter's rate per minute.
    load: [[f64; 3]; 7],
}

/// What the server counts and `$SYS` reports: the traffic its connections read and
/// wrote, passed in with each [`Broker::publish_sys`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// How long the server has been up.
    pub uptime: Duration,
    /// MQTT packets of every kind received / written.
    pub packets_received: u64,
    /// See `packets_received`.
    pub packets_sent: u64,
    /// Bytes received / written.
    pub bytes_received: u64,
    /// See `bytes_received`.
    pub bytes_sent: u64,
    /// PUBLISH packets received / written.
    pub publish_received: u64,
    /// See `publish_received`.
    pub publish_sent: u64,
    /// Network connections accepted.
    pub connections_accepted: u64,
}

impl Broker {
    /// Publishes what changed under `$SYS/broker/` since the last call; `traffic` is what
    /// the server counted up to `now`.
    pub fn publish_sys(&mut self, now: Instant, traffic: &Traffic) {
        let g = self.gauges(now, 0);
        let publish_received = traffic.publish_received;
        let publish_sent = traffic.publish_sent;
        let counters = [
            traffic.packets_received,
            traffic.packets_sent,
            traffic.bytes_received,
            traffic.bytes_sent,
            publish_received,
            publish_sent,
            traffic.connections_accepted,
        ];
        if let Some((at, before)) = self.sys.previous {
            let interval = now.saturating_duration_since(at).as_secs_f64();
            if interval > 0.0 {
                for (i, (c, b)) in counters.iter().zip(before).enumerate() {
                    let per_minute = c.saturating_sub(b) as f64 * 60.0 / interval;
                    for (j, period) in [60.0, 300.0, 900.0].iter().enumerate() {
                        let keep = (-interval / period).exp();
                        let load = &mut self.sys.load[i][j];
                        *load = per_minute + keep * (*load - per_minute);
                    }
                }
            }
        }
        self.sys.previous = Some((now, counters));
        let retained_bytes: usize = self
            .retained
            .values()
            .filter(|m| !super::routing::is_sys(&m.topic))
            .map(|m| m.payload.len())
            .sum();
        let dropped: u64 = self.counters.dropped.iter().sum();
        let mut values: Vec<(String, String)> = vec![
            (
                "version".into(),
                format!("tern version {}", env!("CARGO_PKG_VERSION")),
            ),
            (
                "uptime".into(),
                format!("{} seconds", traffic.uptime.as_secs()),
            ),
            ("clients/connected".into(), g.online.to_string()),
            ("clients/disconnected".into(), g.offline.to_string()),
            ("clients/total".into(), (g.online + g.offline).to_string()),
            (
                "clients/maximum".into(),
                self.counters.clients_maximum.to_string(),
            ),
            (
                "clients/expired".into(),
                self.counters.sessions_expired.to_string(),
            ),
            ("messages/received".into(), counters[0].to_string()),
            ("messages/sent".into(), counters[1].to_string()),
            ("messages/inflight".into(), g.inflight_out.to_string()),
            (
                "messages/stored".into(),
                (g.queued + g.retained).to_string(),
            ),
            (
                "store/messages/count".into(),
                (g.queued + g.retained).to_string(),
            ),
            (
                "store/messages/bytes".into(),
                (g.queued_bytes + retained_bytes).to_string(),
            ),
            (
                "publish/messages/received".into(),
                publish_received.to_string(),
            ),
            ("publish/messages/sent".into(), publish_sent.to_string()),
            ("publish/messages/dropped".into(), dropped.to_string()),
            ("bytes/received".into(), counters[2].to_string()),
            ("bytes/sent".into(), counters[3].to_string()),
            ("subscriptions/count".into(), g.subscriptions.to_string()),
            ("retained messages/count".into(), g.retained.to_string()),
        ];
        for (i, name) in LOADS.iter().enumerate() {
            for (j, period) in ["1min", "5min", "15min"].iter().enumerate() {
                values.push((
                    format!("load/{name}/{period}"),
                    format!("{:.2}", self.sys.load[i][j]),
                ));
            }
        }
        for (name, value) in values {
            if self.sys.last.get(&name) == Some(&value) {
                continue;
            }
            let Ok(topic) = TopicName::new(format!("$SYS/broker/{name}")) else {
                continue;
            };
            let mut message =
                Message::new(topic, bytes::Bytes::from(value.clone()), QoS::AtMostOnce);
            message.retain = true;
            self.route(message, None, now);
            self.sys.last.insert(name, value);
        }
        self.commit(now);
    }
}
