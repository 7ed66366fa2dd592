//! Counters about what the broker did with messages, shared by the core, the connection
//! tasks and the storage writer (relaxed atomics: each is exact on its own, a scrape is
//! not one instant across all of them), and their Prometheus text rendering.
//!
//! Every metric is listed with its meaning in docs/observability.md.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tern_codec::{Packet, QoS};

pub use crate::core::DropReason;
use crate::core::{Counters, Gauges};

/// Upper bounds of the latency buckets, in seconds (the last bucket is +Inf).
const LATENCY_BOUNDS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

/// A Prometheus histogram of durations with fixed buckets ([`LATENCY_BOUNDS`]).
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; 15],
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        self.observe_n(d, 1);
    }

    /// Records `n` observations of the same duration.
    pub fn observe_n(&self, d: Duration, n: u64) {
        if n == 0 {
            return;
        }
        let secs = d.as_secs_f64();
        let i = LATENCY_BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i].fetch_add(n, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos() as u64 * n, Ordering::Relaxed);
    }

    /// The observations' total, in seconds.
    pub fn sum_secs(&self) -> f64 {
        self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = LATENCY_BOUNDS
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

/// Everything counted. One per server, shared by `Arc`.
pub struct Metrics {
    started: Instant,
    /// PUBLISH packets received from clients, by QoS.
    pub(crate) received: [AtomicU64; 3],
    /// PUBLISH packets written to clients, by QoS (retransmissions included).
    pub(crate) sent: [AtomicU64; 3],
    /// Payload bytes of those PUBLISH packets, by QoS.
    pub(crate) payload_received: [AtomicU64; 3],
    pub(crate) payload_sent: [AtomicU64; 3],
    /// MQTT packets of every kind received / written.
    pub(crate) packets_received: AtomicU64,
    pub(crate) packets_sent: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    /// PUBLISH written with DUP set (resent after a reconnect).
    pub(crate) retransmissions: AtomicU64,
    /// CONNACKs sent, by reason code (5.0 numbering whatever the version).
    pub(crate) connacks: [AtomicU64; 256],
    /// Network connections accepted.
    pub(crate) connections_accepted: AtomicU64,
    /// Storage writer: transactions, the core batches and ops in them, commit time.
    pub(crate) store_commits: AtomicU64,
    pub(crate) store_batches: AtomicU64,
    pub(crate) store_ops: AtomicU64,
    pub(crate) store_failures: AtomicU64,
    /// Queue reads: batches of queued messages read back from the store.
    pub(crate) store_loads: AtomicU64,
    /// The last commit failed (the store is not taking writes): not ready until one
    /// succeeds.
    pub(crate) store_failing: std::sync::atomic::AtomicBool,
    pub(crate) commit_latency: Histogram,
    /// From reading the input that produced a PUBLISH to writing it, by QoS.
    pub(crate) latency: [Histogram; 3],
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn qos_index(q: QoS) -> usize {
    q as usize
}

impl Metrics {
    /// All zero; uptime counts from now.
    pub fn new() -> Metrics {
        Metrics {
            started: Instant::now(),
            received: Default::default(),
            sent: Default::default(),
            payload_received: Default::default(),
            payload_sent: Default::default(),
            packets_received: AtomicU64::new(0),
            packets_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            retransmissions: AtomicU64::new(0),
            connacks: std::array::from_fn(|_| AtomicU64::new(0)),
            connections_accepted: AtomicU64::new(0),
            store_commits: AtomicU64::new(0),
            store_loads: AtomicU64::new(0),
            store_failing: std::sync::atomic::AtomicBool::new(false),
            store_batches: AtomicU64::new(0),
            store_ops: AtomicU64::new(0),
            store_failures: AtomicU64::new(0),
            commit_latency: Histogram::default(),
            latency: Default::default(),
        }
    }

    /// When these metrics started counting.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Counts the packets of one write to a client: `since` is when the input that
    /// produced them was read.
    pub(crate) fn written(&self, packets: &[Packet], bytes: usize, since: Instant, now: Instant) {
        self.packets_sent
            .fetch_add(packets.len() as u64, Ordering::Relaxed);
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
        // Summed here, added once per write: a write carries up to hundreds of packets.
        let (mut sent, mut payload, mut dup) = ([0u64; 3], [0u64; 3], 0);
        for p in packets {
            match p {
                Packet::Publish(p) => {
                    let q = qos_index(p.qos_pid.qos());
                    sent[q] += 1;
                    payload[q] += p.payload.len() as u64;
                    dup += u64::from(p.dup);
                }
                Packet::ConnAck(a) => {
                    self.connacks[a.reason as usize].fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        let waited = now.saturating_duration_since(since);
        for q in 0..3 {
            if sent[q] > 0 {
                self.sent[q].fetch_add(sent[q], Ordering::Relaxed);
                self.payload_sent[q].fetch_add(payload[q], Ordering::Relaxed);
                self.latency[q].observe_n(waited, sent[q]);
            }
        }
        if dup > 0 {
            self.retransmissions.fetch_add(dup, Ordering::Relaxed);
        }
    }

    /// What `$SYS` reports of the connections' traffic, as counted so far.
    pub fn traffic(&self) -> crate::core::Traffic {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        crate::core::Traffic {
            uptime: self.started.elapsed(),
            packets_received: r(&self.packets_received),
            packets_sent: r(&self.packets_sent),
            bytes_received: r(&self.bytes_received),
            bytes_sent: r(&self.bytes_sent),
            publish_received: load3(&self.received).iter().sum(),
            publish_sent: load3(&self.sent).iter().sum(),
            connections_accepted: r(&self.connections_accepted),
        }
    }

    /// A value by its Prometheus name and labels as rendered (`name{labels}`), for tests
    /// and tools: parses [`Metrics::render`]'s output format.
    pub fn find(rendered: &str, series: &str) -> Option<f64> {
        rendered.lines().find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
    }

    /// The Prometheus text exposition of every metric, with the core's gauges when the
    /// core answered.
    pub fn render(
        &self,
        gauges: Option<&Gauges>,
        connections: &[(String, &'static str, u64)],
    ) -> String {
        let mut out = String::with_capacity(8192);
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let qos = ["0", "1", "2"];
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };

        family(
            &mut out,
            "tern_build_info",
            "gauge",
            "Version of this broker.",
        );
        let _ = writeln!(
            out,
            "tern_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        family(
            &mut out,
            "tern_uptime_seconds",
            "gauge",
            "Seconds since the broker started.",
        );
        let _ = writeln!(
            out,
            "tern_uptime_seconds {}",
            self.started.elapsed().as_secs()
        );

        per_qos(
            &mut out,
            "tern_messages_received_total",
            "PUBLISH packets received from clients, by QoS.",
            &load3(&self.received),
        );
        per_qos(
            &mut out,
            "tern_messages_sent_total",
            "PUBLISH packets written to clients, by QoS (retransmissions included).",
            &load3(&self.sent),
        );
        per_qos(
            &mut out,
            "tern_payload_bytes_received_total",
            "Payload bytes of the PUBLISH packets received, by QoS.",
            &load3(&self.payload_received),
        );
        per_qos(
            &mut out,
            "tern_payload_bytes_sent_total",
            "Payload bytes of the PUBLISH packets written, by QoS.",
            &load3(&self.payload_sent),
        );
        family(
            &mut out,
            "tern_packets_received_total",
            "counter",
            "MQTT packets of every type received.",
        );
        let _ = writeln!(
            out,
            "tern_packets_received_total {}",
            r(&self.packets_received)
        );
        family(
            &mut out,
            "tern_packets_sent_total",
            "counter",
            "MQTT packets of every type written.",
        );
        let _ = writeln!(out, "tern_packets_sent_total {}", r(&self.packets_sent));
        family(
            &mut out,
            "tern_bytes_received_total",
            "counter",
            "Bytes read from client connections (MQTT bytes; TLS and WebSocket framing excluded).",
        );
        let _ = writeln!(out, "tern_bytes_received_total {}", r(&self.bytes_received));
        family(
            &mut out,
            "tern_bytes_sent_total",
            "counter",
            "Bytes written to client connections (MQTT bytes).",
        );
        let _ = writeln!(out, "tern_bytes_sent_total {}", r(&self.bytes_sent));
        family(
            &mut out,
            "tern_retransmissions_total",
            "counter",
            "PUBLISH packets resent with DUP set (unacknowledged when a connection ended).",
        );
        let _ = writeln!(
            out,
            "tern_retransmissions_total {}",
            r(&self.retransmissions)
        );
        if let Some(c) = gauges.map(|g| &g.counters) {
            self.render_core(&mut out, c);
        }
        family(
            &mut out,
            "tern_connect_total",
            "counter",
            "CONNACKs sent, by reason code (5.0 codes; 3.x return codes counted as their 5.0 equivalent).",
        );
        for (code, n) in self.connacks.iter().enumerate() {
            let n = r(n);
            if n > 0 || code == 0 {
                let name = tern_codec::ReasonCode::from_u8(code as u8)
                    .map_or_else(|| "unknown".to_string(), |c| format!("{c:?}"));
                let _ = writeln!(
                    out,
                    "tern_connect_total{{code=\"0x{code:02X}\",reason=\"{name}\"}} {n}"
                );
            }
        }
        family(
            &mut out,
            "tern_connections_accepted_total",
            "counter",
            "Network connections accepted, all listeners.",
        );
        let _ = writeln!(
            out,
            "tern_connections_accepted_total {}",
            r(&self.connections_accepted)
        );
        family(
            &mut out,
            "tern_connections",
            "gauge",
            "Open network connections by listener and the protocol version their CONNECT asked for (none: no CONNECT yet).",
        );
        for (listener, protocol, n) in connections {
            let _ = writeln!(
                out,
                "tern_connections{{listener=\"{listener}\",protocol=\"{protocol}\"}} {n}"
            );
        }
        family(
            &mut out,
            "tern_store_commits_total",
            "counter",
            "Store transactions committed (one sync each with durability sync).",
        );
        let _ = writeln!(out, "tern_store_commits_total {}", r(&self.store_commits));
        family(
            &mut out,
            "tern_store_queue_reads_total",
            "counter",
            "Batches of queued messages read back from the store as session windows drained.",
        );
        let _ = writeln!(out, "tern_store_queue_reads_total {}", r(&self.store_loads));
        family(
            &mut out,
            "tern_store_failing",
            "gauge",
            "1 while the store refuses commits (its last commit failed: disk full, I/O error); /readyz says not ready meanwhile.",
        );
        let _ = writeln!(
            out,
            "tern_store_failing {}",
            u8::from(
                self.store_failing
                    .load(std::sync::atomic::Ordering::Relaxed)
            )
        );
        family(
            &mut out,
            "tern_store_batches_total",
            "counter",
            "Core batches (one per input round) folded into those commits.",
        );
        let _ = writeln!(out, "tern_store_batches_total {}", r(&self.store_batches));
        family(
            &mut out,
            "tern_store_ops_total",
            "counter",
            "Store operations committed; divided by commits: operations per commit.",
        );
        let _ = writeln!(out, "tern_store_ops_total {}", r(&self.store_ops));
        family(
            &mut out,
            "tern_store_failures_total",
            "counter",
            "Commits the store refused or failed.",
        );
        let _ = writeln!(out, "tern_store_failures_total {}", r(&self.store_failures));
        family(
            &mut out,
            "tern_store_commit_seconds",
            "histogram",
            "Time to commit one group (write and sync).",
        );
        self.commit_latency
            .render(&mut out, "tern_store_commit_seconds", "");
        family(
            &mut out,
            "tern_internal_latency_seconds",
            "histogram",
            "From reading the input that produced a PUBLISH to writing it to the subscriber, by QoS (includes waiting for the commit).",
        );
        for (i, q) in qos.iter().enumerate() {
            self.latency[i].render(
                &mut out,
                "tern_internal_latency_seconds",
                &format!("qos=\"{q}\""),
            );
        }

        if let Some(g) = gauges {
            family(
                &mut out,
                "tern_sessions",
                "gauge",
                "Sessions by state: online (a connection is up) or offline (kept for a reconnect).",
            );
            let _ = writeln!(out, "tern_sessions{{state=\"online\"}} {}", g.online);
            let _ = writeln!(out, "tern_sessions{{state=\"offline\"}} {}", g.offline);
            family(
                &mut out,
                "tern_subscriptions",
                "gauge",
                "Subscriptions held by all sessions (shared ones included).",
            );
            let _ = writeln!(out, "tern_subscriptions {}", g.subscriptions);
            family(
                &mut out,
                "tern_retained_messages",
                "gauge",
                "Retained messages held.",
            );
            let _ = writeln!(out, "tern_retained_messages {}", g.retained);
            family(
                &mut out,
                "tern_queued_messages",
                "gauge",
                "Messages waiting in session queues (offline, or beyond the inflight window), all sessions.",
            );
            let _ = writeln!(out, "tern_queued_messages {}", g.queued);
            family(
                &mut out,
                "tern_queued_bytes",
                "gauge",
                "Payload bytes of those messages.",
            );
            let _ = writeln!(out, "tern_queued_bytes {}", g.queued_bytes);
            family(
                &mut out,
                "tern_idempotency_keys",
                "gauge",
                "Idempotency keys remembered (publishers' message ids within their window).",
            );
            let _ = writeln!(out, "tern_idempotency_keys {}", g.idempotency_keys);
            family(
                &mut out,
                "tern_receipts_waiting",
                "gauge",
                "Settled receipts waiting for their message's copies to be acknowledged.",
            );
            let _ = writeln!(out, "tern_receipts_waiting {}", g.receipts_waiting);
            if !g.history.is_empty() {
                family(
                    &mut out,
                    "tern_history_messages",
                    "gauge",
                    "Messages kept in each topic policy's history.",
                );
                for (policy, n, _) in &g.history {
                    let _ = writeln!(out, "tern_history_messages{{policy=\"{policy}\"}} {n}");
                }
                family(
                    &mut out,
                    "tern_history_bytes",
                    "gauge",
                    "Topic and payload bytes kept in each topic policy's history.",
                );
                for (policy, _, b) in &g.history {
                    let _ = writeln!(out, "tern_history_bytes{{policy=\"{policy}\"}} {b}");
                }
            }
            family(
                &mut out,
                "tern_replays_active",
                "gauge",
                "Replays of topic history under way.",
            );
            let _ = writeln!(out, "tern_replays_active {}", g.replaying);
            family(
                &mut out,
                "tern_queue_oldest_age_seconds",
                "gauge",
                "Age of the oldest queued message, all sessions (0 if none).",
            );
            let _ = writeln!(
                out,
                "tern_queue_oldest_age_seconds {}",
                g.oldest.as_secs_f64()
            );
            family(
                &mut out,
                "tern_session_queued_messages",
                "gauge",
                "Queue depth of the sessions with the deepest queues.",
            );
            for s in &g.largest {
                let _ = writeln!(
                    out,
                    "tern_session_queued_messages{{client_id=\"{}\"}} {}",
                    escape(&s.client_id),
                    s.queued
                );
            }
            family(
                &mut out,
                "tern_session_queue_oldest_age_seconds",
                "gauge",
                "Age of the oldest queued message of those sessions.",
            );
            for s in &g.largest {
                let _ = writeln!(
                    out,
                    "tern_session_queue_oldest_age_seconds{{client_id=\"{}\"}} {}",
                    escape(&s.client_id),
                    s.oldest.as_secs_f64()
                );
            }
            family(
                &mut out,
                "tern_inflight_messages",
                "gauge",
                "QoS 1/2 flows not yet complete: out (to subscribers) and in (QoS 2 from publishers awaiting PUBREL).",
            );
            let _ = writeln!(
                out,
                "tern_inflight_messages{{direction=\"out\"}} {}",
                g.inflight_out
            );
            let _ = writeln!(
                out,
                "tern_inflight_messages{{direction=\"in\"}} {}",
                g.inflight_in
            );
        }
        out
    }

    /// The families the core counts (omitted from a scrape the core did not answer: a
    /// counter that is missing is better than one that goes back to zero).
    fn render_core(&self, out: &mut String, c: &Counters) {
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        per_qos(
            out,
            "tern_deliveries_total",
            "Message copies handed to subscribers' sessions (online or queued), by effective QoS.",
            &c.deliveries,
        );
        family(
            out,
            "tern_qos_downgrades_total",
            "counter",
            "Copies delivered below the publisher's QoS (the subscriber was granted less).",
        );
        for (i, (from, to)) in [("1", "0"), ("2", "0"), ("2", "1")].iter().enumerate() {
            let _ = writeln!(
                out,
                "tern_qos_downgrades_total{{from=\"{from}\",to=\"{to}\"}} {}",
                c.downgrades[i]
            );
        }
        family(
            out,
            "tern_qos2_duplicates_suppressed_total",
            "counter",
            "Inbound QoS 2 resends of a message already received, answered and not delivered again.",
        );
        let _ = writeln!(
            out,
            "tern_qos2_duplicates_suppressed_total {}",
            c.qos2_duplicates
        );
        family(
            out,
            "tern_dropped_total",
            "counter",
            "Messages (or one subscriber's copy) not delivered, by reason.",
        );
        for reason in DropReason::ALL {
            let _ = writeln!(
                out,
                "tern_dropped_total{{reason=\"{}\"}} {}",
                reason.label(),
                c.dropped(reason)
            );
        }
        family(
            out,
            "tern_subscriptions_denied_total",
            "counter",
            "Subscriptions refused by the ACL.",
        );
        let _ = writeln!(
            out,
            "tern_subscriptions_denied_total {}",
            c.subscriptions_denied
        );
        family(
            out,
            "tern_sessions_expired_total",
            "counter",
            "Offline sessions removed when their expiry interval ran out.",
        );
        let _ = writeln!(out, "tern_sessions_expired_total {}", c.sessions_expired);
        family(
            out,
            "tern_idempotent_repeats_total",
            "counter",
            "Publishes whose idempotency key the broker already had: acknowledged, not routed again.",
        );
        let _ = writeln!(
            out,
            "tern_idempotent_repeats_total {}",
            c.idempotent_repeats
        );
        for (name, help, v) in [
            (
                "tern_replays_total",
                "Replays of topic history started.",
                c.replays,
            ),
            (
                "tern_replayed_total",
                "Messages read from topic histories and delivered by replays.",
                c.replayed,
            ),
            (
                "tern_history_trims_total",
                "Times the oldest messages of a topic history were forgotten (age or size).",
                c.history_trimmed,
            ),
        ] {
            family(out, name, "counter", help);
            let _ = writeln!(out, "{name} {v}");
        }
        family(
            out,
            "tern_receipts_total",
            "counter",
            "Delivery receipts sent to publishers, by kind.",
        );
        for (i, kind) in ["routed", "settled"].iter().enumerate() {
            let _ = writeln!(
                out,
                "tern_receipts_total{{kind=\"{kind}\"}} {}",
                c.receipts[i]
            );
        }
        if !c.policies.is_empty() {
            for (name, help) in [
                (
                    "tern_topic_policy_publishes_total",
                    "Publishes accepted under each topic policy.",
                ),
                (
                    "tern_topic_policy_refused_total",
                    "Publishes refused below a topic policy's minimum QoS.",
                ),
                (
                    "tern_topic_policy_downgraded_total",
                    "Publishes taken down to a topic policy's maximum QoS.",
                ),
                (
                    "tern_topic_policy_expiry_set_total",
                    "Publishes given a topic policy's default expiry or cut to its longest.",
                ),
            ] {
                family(out, name, "counter", help);
                for (filter, p) in &c.policies {
                    let v = match name {
                        "tern_topic_policy_publishes_total" => p.publishes,
                        "tern_topic_policy_refused_total" => p.refused,
                        "tern_topic_policy_downgraded_total" => p.downgraded,
                        _ => p.expiry_set,
                    };
                    let _ = writeln!(out, "{name}{{filter=\"{}\"}} {v}", escape(filter));
                }
            }
        }
    }
}

/// The values of three counters.
fn load3(a: &[AtomicU64; 3]) -> [u64; 3] {
    a.each_ref().map(|a| a.load(Ordering::Relaxed))
}

/// One counter family with a series per QoS.
fn per_qos(out: &mut String, name: &str, help: &str, values: &[u64; 3]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (q, v) in values.iter().enumerate() {
        let _ = writeln!(out, "{name}{{qos=\"{q}\"}} {v}");
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
