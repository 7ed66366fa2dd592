//! A node's link to NATS: publishes the QoS 0 messages its clients publish, subscribes to
//! the subjects of the filters its sessions hold, and hands what arrives to the core.
//!
//! One NATS connection per node, with `no_echo`: a node never gets back what it published
//! itself. NATS delivers a message once per matching subscription of a connection; where
//! two of the node's filters overlap (`a/+` and `a/b`), only the copy that came through the
//! first matching subscription (in subject order) is taken, so each message reaches the
//! core once, as it would from a local publisher.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use futures_util::StreamExt;
use tern_codec::{QoS, TopicName};
use tern_proto::Message;
use tokio::sync::mpsc;

use crate::subject::{filter_to_subjects, subject_to_topic, topic_to_subject};

/// How a node reaches NATS.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// `nats://host:port` URLs of the NATS cluster (any of them).
    pub urls: Vec<String>,
    /// This node's name (in NATS's connection list and in logs).
    pub node_id: String,
    /// NATS username and password, if the cluster asks for them.
    pub user: Option<(String, String)>,
    /// A NATS token, if the cluster asks for one.
    pub token: Option<String>,
}

/// What the core hands the link after a round: QoS 0 messages its clients published, and
/// filters its sessions started (`true`) or stopped (`false`) holding.
#[derive(Debug, Default)]
pub struct Out {
    /// Messages for the other nodes.
    pub forwards: Vec<Message>,
    /// Interest changes, in order.
    pub interest: Vec<(String, bool)>,
}

/// Why the link could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No NATS server could be reached.
    #[error("cannot connect to NATS at {urls}: {source}")]
    Connect {
        /// The URLs tried.
        urls: String,
        /// Why.
        source: async_nats::ConnectError,
    },
}

/// Connects to NATS (waiting for a server to answer, retrying).
pub async fn connect(config: &Config) -> Result<async_nats::Client, Error> {
    let mut options = match (&config.user, &config.token) {
        (Some((u, p)), _) => {
            async_nats::ConnectOptions::with_user_and_password(u.clone(), p.clone())
        }
        (None, Some(t)) => async_nats::ConnectOptions::with_token(t.clone()),
        (None, None) => async_nats::ConnectOptions::new(),
    };
    options = options
        .no_echo()
        .name(format!("tern-{}", config.node_id))
        .retry_on_initial_connect();
    let urls: Vec<String> = config.urls.clone();
    options
        .connect(urls.as_slice())
        .await
        .map_err(|source| Error::Connect {
            urls: config.urls.join(","),
            source,
        })
}

/// Runs the link until `out` closes: forwards, subscriptions by interest, and messages from
/// other nodes handed to `deliver` in batches.
pub async fn run(
    client: async_nats::Client,
    mut out: mpsc::UnboundedReceiver<Out>,
    deliver: impl Fn(Vec<Message>) + Send + 'static,
) {
    // Subject -> (how many filters need it, the task reading its subscription).
    let mut subs: BTreeMap<String, (usize, tokio::task::JoinHandle<()>)> = BTreeMap::new();
    // Filter -> its subjects, as subscribed.
    let mut filters: HashMap<String, (usize, Vec<String>)> = HashMap::new();
    let (in_tx, mut in_rx) = mpsc::unbounded_channel::<(String, async_nats::Message)>();
    // The subjects subscribed, shared with nothing: checked here, where copies arrive.
    loop {
        tokio::select! {
            o = out.recv() => {
                let Some(o) = o else { break };
                for (filter, add) in o.interest {
                    interest(&client, &mut subs, &mut filters, &in_tx, filter, add).await;
                }
                for m in o.forwards {
                    let Ok(subject) = topic_to_subject(m.topic.as_str()) else {
                        tracing::debug!(topic = m.topic.as_str(), "a topic with no NATS subject stays on this node");
                        continue;
                    };
                    let sent = match props_header(&m) {
                        Some(props) => {
                            let mut headers = async_nats::HeaderMap::new();
                            headers.insert(PROPS_HEADER, props.as_str());
                            client.publish_with_headers(subject, headers, m.payload.clone()).await
                        }
                        None => client.publish(subject, m.payload.clone()).await,
                    };
                    if let Err(e) = sent {
                        tracing::warn!(error = %e, "publishing to NATS failed: a QoS 0 message did not reach the other nodes");
                    }
                }
            }
            Some((via, first)) = in_rx.recv() => {
                let mut batch = Vec::new();
                let mut next = Some((via, first));
                while let Some((via, m)) = next.take() {
                    if let Some(message) = take(&subs, &via, m) {
                        batch.push(message);
                    }
                    if batch.len() >= 1024 {
                        break;
                    }
                    next = in_rx.try_recv().ok();
                }
                if !batch.is_empty() {
                    deliver(batch);
                }
            }
        }
    }
    for (_, (_, task)) in subs {
        task.abort();
    }
}

/// The message a copy from NATS is, if this copy is the one to take: it came through the
/// first of this node's subscriptions that match its subject.
fn take(
    subs: &BTreeMap<String, (usize, tokio::task::JoinHandle<()>)>,
    via: &str,
    m: async_nats::Message,
) -> Option<Message> {
    let subject = m.subject.as_str();
    let first = subs.keys().find(|pattern| matches(pattern, subject))?;
    if first != via {
        return None;
    }
    let topic = TopicName::new(subject_to_topic(subject)).ok()?;
    let props = m
        .headers
        .as_ref()
        .and_then(|h| h.get(PROPS_HEADER))
        .and_then(|v| read_props(v.as_str()));
    let mut message = Message::new(topic, Bytes::clone(&m.payload), QoS::AtMostOnce);
    if let Some(p) = props {
        let expires_at = p.message_expiry_interval.map(|secs| {
            std::time::Instant::now() + std::time::Duration::from_secs(u64::from(secs))
        });
        message.properties = p;
        message.properties.message_expiry_interval = None;
        message.expires_at = expires_at;
    }
    Some(message)
}

/// The NATS header that carries a message's MQTT 5 properties between nodes: a PUBLISH
/// with no payload, in hex (NATS header values are text).
pub const PROPS_HEADER: &str = "Tern-Props";

/// The header value for `m`'s properties (its expiry as what is left of it), if it has
/// any.
fn props_header(m: &Message) -> Option<String> {
    if m.properties.is_empty() && m.expires_at.is_none() {
        return None;
    }
    let mut properties = m.properties.clone();
    if let Some(at) = m.expires_at {
        let left = at.saturating_duration_since(std::time::Instant::now());
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        properties.message_expiry_interval = Some(secs.clamp(1, u64::from(u32::MAX)) as u32);
    }
    let p = tern_codec::Publish {
        dup: false,
        qos_pid: tern_codec::QosPid::AtMostOnce,
        retain: false,
        topic: m.topic.clone(),
        payload: Bytes::new(),
        properties,
    };
    let mut out = bytes::BytesMut::new();
    tern_codec::encode(
        &tern_codec::Packet::Publish(p),
        tern_codec::Protocol::V5,
        &mut out,
    )
    .ok()?;
    Some(out.iter().map(|b| format!("{b:02x}")).collect())
}

/// The properties a [`PROPS_HEADER`] value carries.
fn read_props(hex: &str) -> Option<tern_codec::Props<tern_codec::properties::PublishProperties>> {
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    let mut buf = bytes::BytesMut::from(bytes?.as_slice());
    match tern_codec::decode(
        &mut buf,
        tern_codec::Protocol::V5,
        tern_codec::MAX_PACKET_SIZE,
    ) {
        Ok(Some(tern_codec::Packet::Publish(p))) => Some(p.properties),
        _ => None,
    }
}

/// Whether the NATS subject `subject` matches the pattern `pattern` (`*` one token, `>`
/// the rest).
pub fn matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

async fn interest(
    client: &async_nats::Client,
    subs: &mut BTreeMap<String, (usize, tokio::task::JoinHandle<()>)>,
    filters: &mut HashMap<String, (usize, Vec<String>)>,
    in_tx: &mpsc::UnboundedSender<(String, async_nats::Message)>,
    filter: String,
    add: bool,
) {
    if add {
        if let Some((n, _)) = filters.get_mut(&filter) {
            *n += 1;
            return;
        }
        let Ok(subjects) = filter_to_subjects(&filter) else {
            tracing::debug!(filter = %filter, "a filter with no NATS subject: messages of other nodes do not reach it");
            return;
        };
        for subject in &subjects {
            if let Some((n, _)) = subs.get_mut(subject) {
                *n += 1;
                continue;
            }
            match client.subscribe(subject.clone()).await {
                Ok(mut subscriber) => {
                    let tx = in_tx.clone();
                    let via = subject.clone();
                    let task = tokio::spawn(async move {
                        while let Some(m) = subscriber.next().await {
                            if tx.send((via.clone(), m)).is_err() {
                                break;
                            }
                        }
                    });
                    subs.insert(subject.clone(), (1, task));
                }
                Err(e) => {
                    tracing::warn!(subject = %subject, error = %e, "subscribing in NATS failed");
                }
            }
        }
        filters.insert(filter, (1, subjects));
    } else {
        let Some((n, _)) = filters.get_mut(&filter) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        let Some((_, subjects)) = filters.remove(&filter) else {
            return;
        };
        for subject in subjects {
            if let Some((n, _)) = subs.get_mut(&subject) {
                *n -= 1;
                if *n == 0
                    && let Some((_, task)) = subs.remove(&subject)
                {
                    // Dropping the subscriber unsubscribes it.
                    task.abort();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn subjects_match_patterns_as_nats_does() {
        assert!(matches("a.*.c", "a.b.c"));
        assert!(matches("a.>", "a.b.c"));
        assert!(!matches("a.>", "a"));
        assert!(matches(">", "a"));
        assert!(!matches("a.*", "a.b.c"));
        assert!(matches("a", "a"));
        assert!(!matches("a.b", "a"));
    }
}
