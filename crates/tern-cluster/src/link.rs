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

use crate::shares::{self, SHARE_HEADER};
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
    /// Replicas of the cluster's stream of QoS 1/2 messages.
    pub replicas: usize,
    /// How long after a node's last sign of life its clients, reconnecting to another
    /// node, are refused there (the node may be back with their sessions) rather than
    /// started afresh (`crate::moves`). Zero: afresh at once.
    pub session_wait: std::time::Duration,
}

/// The JetStream stream holding the cluster's QoS 1/2 messages, one message each, on
/// `tern.m.` and the topic's subject.
pub const STREAM: &str = "TERN";
const STREAM_PREFIX: &str = "tern.m.";
const NODE_HEADER: &str = "Tern-Node";
const QOS_HEADER: &str = "Tern-Qos";
const RETAIN_HEADER: &str = "Tern-Retain";

/// What the core hands the link after a round: QoS 0 messages its clients published, and
/// filters its sessions started (`true`) or stopped (`false`) holding.
#[derive(Debug, Default)]
pub struct Out {
    /// Messages for the other nodes.
    pub forwards: Vec<Forward>,
    /// Interest changes, in order.
    pub interest: Vec<Interest>,
    /// Told once every QoS 1/2 message of `forwards` is in the cluster's stream (the
    /// round's acknowledgements wait for it).
    pub stored: Option<tokio::sync::oneshot::Sender<()>>,
    /// The stream is applied and committed through this sequence: read on.
    pub applied: Option<u64>,
    /// Client ids that connected to this node (the other nodes close their connections
    /// of the same ids).
    pub claims: Vec<String>,
    /// Wills of this node's connections, kept by the cluster while they last.
    pub wills: Vec<crate::wills::Change>,
    /// Client ids whose sessions to fetch from the nodes that have them
    /// ([`Inbound::Moved`] answers).
    pub fetches: Vec<String>,
    /// Client ids to claim before their clients are answered, by compare-and-set on the
    /// client table's revision the fetch read ([`Inbound::Claimed`] answers): a session
    /// that moved here (or one this node gave and resumes) is the client's only once the
    /// cluster says so, so no two nodes ever serve it.
    pub first_claims: Vec<(String, u64)>,
    /// QoS 1/2 messages for shared groups no member on this node could take (the
    /// subscription and the message): put in the stream again for another node's members.
    pub handed_back: Vec<(Message, String)>,
}

/// The JetStream stream holding the cluster's retained messages: the last message of each
/// topic (an empty one: cleared), on `tern.r.` and the topic's subject.
pub const RETAINED: &str = "TERN_RETAINED";
const RETAINED_PREFIX: &str = "tern.r.";

/// A message of this node's clients for the other nodes.
#[derive(Debug, Clone)]
pub struct Forward {
    /// The message.
    pub message: Message,
    /// The client that published it and its packet id (QoS 1/2).
    pub origin: Option<(String, u16)>,
    /// A QoS 1/2 message's number among this node's forwards, counted across restarts.
    pub number: u64,
}

/// Headers of this node's QoS 1/2 messages: the process that put it in the stream (its
/// boot), the message's number among the node's forwards, the client and packet id.
const BOOT_HEADER: &str = "Tern-Boot";
/// The header of the stream's marker message (not an MQTT message).
const MARKER_HEADER: &str = "Tern-Marker";
const NUMBER_HEADER: &str = "Tern-Number";
const ORIGIN_HEADER: &str = "Tern-Origin";
/// On a message a node handed back to the cluster for a shared group (its first node had
/// no member left to take it): for the group its `Tern-Share` names, not for plain
/// subscribers (they had it).
const HANDED_HEADER: &str = "Tern-Handed";

/// A filter a session of this node started (`add`) or stopped holding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interest {
    /// The filter (of a shared subscription: without `$share/GROUP/`).
    pub filter: String,
    /// For a shared subscription, the whole `$share/GROUP/FILTER`.
    pub share: Option<String>,
    /// Started (true) or stopped holding.
    pub add: bool,
}

/// A message from the cluster and who on this node gets it.
#[derive(Debug, Clone)]
pub struct Remote {
    /// The message.
    pub message: Message,
    /// Whether this node's plain (not shared) subscribers get it: false for this node's
    /// own message, back for its shared groups.
    pub plain: bool,
    /// The shared subscriptions (`$share/GROUP/FILTER`) it was given to this node for.
    pub shared: Vec<String>,
    /// This node's own QoS 1/2 message put in the stream by an earlier run of the node:
    /// its number among the node's forwards, and the client and packet id it came with.
    pub earlier: Option<(u64, Option<(String, u16)>)>,
    /// For a message of the cluster's stream, where it comes from.
    pub source: Option<Source>,
}

/// Where a message of the cluster's stream comes from (the sessions that moved to this
/// node take only what their last node did not give them).
#[derive(Debug, Clone)]
pub struct Source {
    /// Its stream sequence.
    pub seq: u64,
    /// The node that put it there ("" for a message from outside Tern).
    pub node: std::sync::Arc<str>,
    /// Its number among that node's QoS 1/2 forwards (0 if none).
    pub number: u64,
    /// This node's own message, read back for the sessions that moved here only.
    pub own: bool,
    /// For this node's own message, the client that published it (a subscription of its
    /// own with No Local does not get it).
    pub publisher: Option<String>,
    /// Handed back by a node none of whose members could take it: for the shared group
    /// its `Tern-Share` names only.
    pub handed: bool,
}

/// What the link hands the core.
#[derive(Debug)]
pub enum Inbound {
    /// QoS 0 messages from the cluster, for this node's subscribers.
    Remote(Vec<Remote>),
    /// QoS 1/2 messages of the cluster's stream, through this stream sequence.
    Durable(u64, Vec<Remote>),
    /// Retained messages of the cluster (an empty payload clears the topic): what this
    /// node keeps as retained, delivered to nobody.
    Retained(Vec<Message>),
    /// The client connected to another node after its connection here.
    TakenOver(String),
    /// Another node says it has this client, which this run of the node never had: a
    /// copy of its session left here by an earlier run (its node restarted before it saw
    /// the client move) is stale.
    Elsewhere(String),
    /// The will of a client of a node that is gone, for this node to publish as that
    /// client's.
    Will(crate::wills::Will),
    /// This node cannot reach NATS (`true`) for long enough that the other nodes will soon
    /// take it for gone, or reaches it again (`false`): `crate::wills`.
    CutOff(bool),
    /// Another node asks for this client's session: the core closes its connection here
    /// and, once that is committed, answers with the session as the store has it (`None`:
    /// no session here to give).
    Give(
        String,
        tokio::sync::oneshot::Sender<Option<crate::moves::Given>>,
    ),
    /// The answer to a fetch ([`Out::fetches`]) of this client's session.
    Moved(String, crate::moves::Fetched),
    /// The answer to a first claim ([`Out::first_claims`]): whether the cluster now says
    /// the client is here (`false`: another node claimed it meanwhile, or NATS failed).
    Claimed(String, bool),
}

/// The KV bucket that says which node each client id last connected to.
pub const CLIENTS: &str = "TERN_CLIENTS";

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
        // Back within a second of NATS answering again (the default backs off to 4 s and
        // more): a node cut off closes its connections, and the sooner it is back, the
        // sooner it takes them again (`crate::wills`).
        .reconnect_delay_callback(|attempts| {
            std::time::Duration::from_millis((attempts as u64 * 100).min(1000))
        })
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

/// Runs the link until `out` closes: forwards, subscriptions by interest, and what comes
/// from the cluster handed to `deliver` in batches.
pub async fn run(
    client: async_nats::Client,
    config: Config,
    (applied, fed): (u64, Fed),
    mut out: mpsc::UnboundedReceiver<Out>,
    ready: tokio::sync::oneshot::Sender<()>,
    deliver: impl Fn(Inbound) + Send + Sync + 'static,
) {
    let deliver = std::sync::Arc::new(deliver);
    let boot = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let boot_hex = format!("{boot:x}");
    let js = async_nats::jetstream::new(client.clone());
    let (claims_tx, claims_rx) = mpsc::unbounded_channel::<(String, Option<u64>)>();
    let to_core = deliver.clone();
    let takeovers = tokio::spawn(claim(js.clone(), config.clone(), claims_rx, move |i| {
        to_core(i)
    }));
    let table: shares::Shared = Default::default();
    let (share_tx, share_rx) = mpsc::unbounded_channel();
    let share_keeper = tokio::spawn(shares::run(
        js.clone(),
        config.node_id.clone(),
        config.replicas,
        table.clone(),
        share_rx,
    ));
    let (applied_tx, applied_rx) = tokio::sync::watch::channel(applied);
    let (moves_tx, moves_rx) = mpsc::unbounded_channel();
    // Whether the node has applied what the stream held when it started: it gives
    // sessions only then (a session of a publisher whose round a crash lost gets that
    // round's QoS 2 packet ids back first).
    let (caught_tx, caught_rx) = tokio::sync::watch::channel(false);
    let to_core = deliver.clone();
    let consumer = tokio::spawn(consume(
        js.clone(),
        config.clone(),
        table.clone(),
        (boot_hex.clone(), ready, caught_tx),
        (applied, applied_rx),
        (moves_rx, fed),
        move |inbound| to_core(inbound),
    ));
    let to_core = deliver.clone();
    let giver = tokio::spawn(crate::moves::serve(
        client.clone(),
        config.node_id.clone(),
        caught_rx,
        move |client_id, reply| to_core(Inbound::Give(client_id, reply)),
    ));
    let (fetch_tx, fetch_rx) = mpsc::unbounded_channel();
    let to_core = deliver.clone();
    let fetcher = tokio::spawn(crate::moves::fetch(
        client.clone(),
        js.clone(),
        config.clone(),
        fetch_rx,
        moves_tx,
        move |inbound| to_core(inbound),
    ));
    let me = config.node_id.clone();
    let mut turns: u64 = 0;
    let (wills_tx, wills_rx) = mpsc::unbounded_channel();
    let to_core = deliver.clone();
    let (awake, ticker) = crate::wills::Awake::start();
    let wills = tokio::spawn(crate::wills::run(
        js.clone(),
        config.node_id.clone(),
        boot_hex.clone(),
        config.replicas,
        wills_rx,
        move |inbound| to_core(inbound),
        awake.clone(),
    ));
    // Retained topics this node has written and not yet read back from [`RETAINED`].
    let pending: Pending = Default::default();
    let to_core = deliver.clone();
    let retained = tokio::spawn(consume_retained(
        js.clone(),
        config.clone(),
        pending.clone(),
        move |batch| to_core(Inbound::Retained(batch)),
    ));
    let mut published: u64 = 0;
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
                // Nothing of what the node did on waking from a freeze reaches the cluster.
                awake.check();
                if let Some(seq) = o.applied {
                    applied_tx.send_if_modified(|a| {
                        let newer = seq > *a;
                        *a = (*a).max(seq);
                        newer
                    });
                }
                for i in o.interest {
                    if let Some(share) = &i.share
                        && shares::lock(&table).local(&me, share, i.add, std::time::Instant::now())
                    {
                        let _ = share_tx.send(if i.add {
                            shares::Change::Join(share.clone())
                        } else {
                            shares::Change::Leave(share.clone())
                        });
                    }
                    interest(&client, &mut subs, &mut filters, &in_tx, i.filter, i.add).await;
                }
                for c in o.claims {
                    let _ = claims_tx.send((c, None));
                }
                for (c, revision) in o.first_claims {
                    let _ = claims_tx.send((c, Some(revision)));
                }
                for f in o.fetches {
                    let _ = fetch_tx.send(f);
                }
                for w in o.wills {
                    let _ = wills_tx.send(w);
                }
                let mut acks = Vec::new();
                let mut back = Vec::new();
                #[cfg(debug_assertions)]
                let crash = o.forwards.iter().any(|f| fault_hook(f.message.topic.as_str()));
                // Most clusters have no shared subscriptions: one look per batch.
                let any_shares = !shares::lock(&table).is_empty();
                for f in o.forwards {
                    let m = f.message;
                    // The node of each shared subscription that gets it.
                    turns += 1;
                    let assigned = if any_shares {
                        shares::lock(&table).assign(&me, m.topic.as_str(), turns, std::time::Instant::now())
                    } else {
                        Vec::new()
                    };
                    let share = (!assigned.is_empty()).then(|| shares::header(&assigned));
                    let subject = topic_to_subject(m.topic.as_str());
                    if m.retain && let Ok(subject) = &subject {
                        // The cluster's copy of a retained topic, one per topic; a QoS 1/2
                        // one is stored before the round's acknowledgements go out.
                        published += 1;
                        let headers = stream_headers(&config.node_id, &boot_hex, published, &m);
                        let subject = format!("{RETAINED_PREFIX}{subject}");
                        *lock(&pending).entry(subject.clone()).or_default() += 1;
                        let ack = js
                            .publish_with_headers(subject.clone(), headers.clone(), m.payload.clone())
                            .await;
                        if m.qos == QoS::AtMostOnce {
                            // Not waited for; a loss only leaves the topic as it was.
                            let pending = pending.clone();
                            tokio::spawn(async move {
                                let done = match ack {
                                    Ok(future) => future.await.map(|_| ()).map_err(|e| e.to_string()),
                                    Err(e) => Err(e.to_string()),
                                };
                                if let Err(e) = done {
                                    tracing::warn!(error = %e, subject = %subject, "the cluster's retained stream did not take a QoS 0 retained message");
                                    release(&pending, &subject);
                                }
                            });
                        } else {
                            acks.push((subject, headers, m.payload.clone(), ack));
                        }
                    }
                    if m.qos != QoS::AtMostOnce {
                        let Ok(subject) = &subject else {
                            tracing::warn!(topic = m.topic.as_str(), "a QoS 1/2 message whose topic has no NATS subject stays on this node");
                            continue;
                        };
                        published += 1;
                        let mut headers = stream_headers(&config.node_id, &boot_hex, published, &m);
                        headers.insert(BOOT_HEADER, boot_hex.as_str());
                        headers.insert(NUMBER_HEADER, f.number.to_string().as_str());
                        if let Some((client, pid)) = &f.origin {
                            let hex = crate::hex::encode(client.as_bytes());
                            headers.insert(ORIGIN_HEADER, format!("{hex}:{pid}").as_str());
                        }
                        if m.retain {
                            headers.insert(RETAIN_HEADER, "1");
                        }
                        if let Some(share) = &share {
                            headers.insert(SHARE_HEADER, share.as_str());
                        }
                        let subject = format!("{STREAM_PREFIX}{subject}");
                        let ack = js
                            .publish_with_headers(subject.clone(), headers.clone(), m.payload.clone())
                            .await;
                        acks.push((subject, headers, m.payload.clone(), ack));
                        continue;
                    }
                    let Ok(subject) = subject else {
                        tracing::debug!(topic = m.topic.as_str(), "a topic with no NATS subject stays on this node");
                        continue;
                    };
                    // This node's own shared groups get it here (NATS does not send a
                    // node what it published).
                    let mine: Vec<String> = assigned
                        .iter()
                        .filter(|(_, node)| *node == me)
                        .map(|(s, _)| s.clone())
                        .collect();
                    if !mine.is_empty() {
                        back.push(Remote { message: m.clone(), plain: false, shared: mine, earlier: None, source: None });
                    }
                    let props = props_header(&m);
                    let sent = if props.is_none() && !m.retain && share.is_none() {
                        client.publish(subject, m.payload.clone()).await
                    } else {
                        let mut headers = async_nats::HeaderMap::new();
                        if let Some(props) = props {
                            headers.insert(PROPS_HEADER, props.as_str());
                        }
                        if m.retain {
                            headers.insert(RETAIN_HEADER, "1");
                        }
                        if let Some(share) = &share {
                            headers.insert(SHARE_HEADER, share.as_str());
                        }
                        client.publish_with_headers(subject, headers, m.payload.clone()).await
                    };
                    if let Err(e) = sent {
                        tracing::warn!(error = %e, "publishing to NATS failed: a QoS 0 message did not reach the other nodes");
                    }
                }
                if !back.is_empty() {
                    deliver(Inbound::Remote(back));
                }
                for (m, share) in o.handed_back {
                    let Ok(subject) = topic_to_subject(m.topic.as_str()) else {
                        continue;
                    };
                    published += 1;
                    turns += 1;
                    let mut headers = stream_headers(&config.node_id, &boot_hex, published, &m);
                    headers.insert(HANDED_HEADER, "1");
                    tokio::spawn(hand_back(
                        js.clone(),
                        table.clone(),
                        (me.clone(), turns),
                        format!("{STREAM_PREFIX}{subject}"),
                        (headers, m.payload.clone()),
                        share,
                    ));
                }
                if let Some(stored) = o.stored {
                    // Waited for beside the loop: the round's acknowledgements wait for
                    // this, the loop does not. A message the stream did not take is
                    // published again with the same Nats-Msg-Id (the stream drops a
                    // repeat) until it does.
                    let js = js.clone();
                    tokio::spawn(async move {
                        for (subject, headers, payload, ack) in acks {
                            let ack = ack.map_err(|e| e.to_string());
                            until_stored(&js, &subject, &headers, &payload, ack).await;
                        }
                        // Test-only: the node dies between the stream and its commit.
                        #[cfg(debug_assertions)]
                        if crash {
                            tracing::warn!("fault hook: aborting after the stream stored the round, before its commit");
                            std::process::abort();
                        }
                        let _ = stored.send(());
                    });
                }
            }
            Some((via, first)) = in_rx.recv() => {
                let mut batch = Vec::new();
                let mut next = Some((via, first));
                while let Some((via, m)) = next.take() {
                    if let Some(message) = take(&subs, &via, m, &table, &me) {
                        batch.push(message);
                    }
                    if batch.len() >= 1024 {
                        break;
                    }
                    next = in_rx.try_recv().ok();
                }
                if !batch.is_empty() {
                    deliver(Inbound::Remote(batch));
                }
            }
        }
    }
    for (_, (_, task)) in subs {
        task.abort();
    }
    consumer.abort();
    giver.abort();
    fetcher.abort();
    takeovers.abort();
    retained.abort();
    share_keeper.abort();
    wills.abort();
    ticker.abort();
}

/// Puts a message this node handed back into the stream for the shared subscription
/// `share`, named for another node with members (one that joined may not be in this
/// node's view yet: looked for again for 5 s), until the stream takes it. Not waited for
/// by any round: a crash before it is stored loses it for the group (docs/cluster.md).
async fn hand_back(
    js: async_nats::jetstream::Context,
    table: shares::Shared,
    (me, turn): (String, u64),
    subject: String,
    (mut headers, payload): (async_nats::HeaderMap, Bytes),
    share: String,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let node = loop {
        if let Some(node) = shares::lock(&table).other(&me, &share, turn, std::time::Instant::now())
        {
            break node;
        }
        if std::time::Instant::now() > deadline {
            tracing::warn!(share = %share, subject = %subject, "no other node has members of a shared subscription: a message handed back for it reaches none");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    headers.insert(SHARE_HEADER, shares::header(&[(share, node)]).as_str());
    let ack = js
        .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
        .await
        .map_err(|e| e.to_string());
    until_stored(&js, &subject, &headers, &payload, ack).await;
}

/// Waits for a message's acknowledgement from the stream, publishing it again (the same
/// `Nats-Msg-Id`: the stream drops a repeat) until the stream has it.
async fn until_stored(
    js: &async_nats::jetstream::Context,
    subject: &str,
    headers: &async_nats::HeaderMap,
    payload: &Bytes,
    mut ack: Result<async_nats::jetstream::context::PublishAckFuture, String>,
) {
    loop {
        let done = match ack {
            Ok(future) => future.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let Err(e) = done else { return };
        tracing::warn!(error = %e, subject = %subject, "the cluster's stream did not take a message: publishing it again");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        ack = js
            .publish_with_headers(subject.to_string(), headers.clone(), payload.clone())
            .await
            .map_err(|e| e.to_string());
    }
}

/// Test-only fault injection (debug builds, `TERN_FAULT_HOOK=1`): a QoS 1/2 message on
/// `tern/fault/after-stream` makes the node abort once the stream has stored its round and
/// before the round is committed, as a SIGKILL at that moment would.
#[cfg(debug_assertions)]
fn fault_hook(topic: &str) -> bool {
    topic == "tern/fault/after-stream" && std::env::var("TERN_FAULT_HOOK").is_ok_and(|v| v == "1")
}

/// The headers every message this node puts in a stream carries: its `Nats-Msg-Id` (the
/// node, its boot, a count: JetStream drops a repeat), the node, the QoS and the
/// properties.
fn stream_headers(node: &str, boot: &str, n: u64, m: &Message) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("{node}-{boot}-{n}").as_str());
    headers.insert(NODE_HEADER, node);
    headers.insert(
        QOS_HEADER,
        match m.qos {
            QoS::ExactlyOnce => "2",
            QoS::AtLeastOnce => "1",
            QoS::AtMostOnce => "0",
        },
    );
    if let Some(props) = props_header(m) {
        headers.insert(PROPS_HEADER, props.as_str());
    }
    headers
}

/// Retained subjects (of [`RETAINED`]) this node wrote, with how many of its writes have
/// not come back from the stream yet.
type Pending = std::sync::Arc<std::sync::Mutex<HashMap<String, usize>>>;

fn lock(p: &Pending) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One of this node's writes of `subject` came back (or never will).
fn release(p: &Pending, subject: &str) {
    let mut p = lock(p);
    if let Some(n) = p.get_mut(subject) {
        *n -= 1;
        if *n == 0 {
            p.remove(subject);
        }
    }
}

/// Reads [`RETAINED`] for this node: first the last message of every subject (what the
/// cluster retains), then each change, handed to the core in batches to keep (not to
/// deliver). The stream's order is the cluster's: every node ends with the last write of
/// each topic. A node applies its own writes at once (its subscribers see a retained
/// message the moment it is published) and so, while a write of its own to a topic has
/// not come back from the stream, skips other nodes' writes to that topic that the
/// stream ordered before it.
async fn consume_retained(
    js: async_nats::jetstream::Context,
    config: Config,
    pending: Pending,
    deliver: impl Fn(Vec<Message>) + Send + 'static,
) {
    use async_nats::jetstream::{consumer, stream};
    let stream = crate::kv::stream(
        &js,
        stream::Config {
            name: RETAINED.into(),
            subjects: vec![format!("{RETAINED_PREFIX}>")],
            num_replicas: config.replicas.max(1),
            storage: stream::StorageType::File,
            max_messages_per_subject: 1,
            duplicate_window: std::time::Duration::from_secs(120),
            ..Default::default()
        },
        "retained stream",
    )
    .await;
    let mut messages = ordered_reader(
        &stream,
        consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            filter_subject: format!("{RETAINED_PREFIX}>"),
            ..Default::default()
        },
        "retained stream",
    )
    .await;
    tracing::info!("cluster: reading the retained messages");
    loop {
        let mut batch = Vec::new();
        let mut next = messages.next().await;
        loop {
            match next {
                Some(Ok(m)) => {
                    let own = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(NODE_HEADER))
                        .is_some_and(|n| n.as_str() == config.node_id);
                    let subject = m.subject.as_str();
                    if own {
                        release(&pending, subject);
                    }
                    if (own || !lock(&pending).contains_key(subject))
                        && let Some(message) = retained_from_stream(&m)
                    {
                        batch.push(message);
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "reading the retained stream: an error (the reader goes on)");
                }
                None => return,
            }
            if batch.len() >= 256 {
                break;
            }
            match futures_util::FutureExt::now_or_never(messages.next()) {
                Some(n) => next = n,
                None => break,
            }
        }
        if !batch.is_empty() {
            deliver(batch);
        }
    }
}

/// The retained message a message of [`RETAINED`] is (an empty payload: cleared). Its
/// expiry counts from when the stream stored it; one expired by now clears the topic.
fn retained_from_stream(m: &async_nats::jetstream::Message) -> Option<Message> {
    let (mut message, expiry) = stream_message(m, RETAINED_PREFIX, QoS::AtMostOnce)?;
    message.retain = true;
    if let Some(secs) = expiry {
        let age = m.info().ok().map_or(0, |i| {
            let stored = i.published.unix_timestamp_nanos();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i128);
            u64::try_from((now - stored) / 1_000_000_000).unwrap_or(0)
        });
        let left = u64::from(secs).saturating_sub(age);
        if left == 0 {
            message.payload = Bytes::new();
        }
        message.expires_at = Some(std::time::Instant::now() + std::time::Duration::from_secs(left));
    }
    Some(message)
}

/// The MQTT message a stream message on `prefix` carries (topic, payload, QoS from its
/// header or `default`, properties), and its Message Expiry Interval for the caller to
/// count from where it stands.
fn stream_message(
    m: &async_nats::jetstream::Message,
    prefix: &str,
    default: QoS,
) -> Option<(Message, Option<u32>)> {
    let subject = m.subject.as_str().strip_prefix(prefix)?;
    let topic = TopicName::new(subject_to_topic(subject)).ok()?;
    let header = |name: &str| {
        m.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str())
    };
    let qos = match header(QOS_HEADER) {
        Some("2") => QoS::ExactlyOnce,
        Some("1") => QoS::AtLeastOnce,
        Some("0") => QoS::AtMostOnce,
        _ => default,
    };
    let mut message = Message::new(topic, Bytes::clone(&m.payload), qos);
    message.retain = header(RETAIN_HEADER) == Some("1");
    let mut expiry = None;
    if let Some(p) = header(PROPS_HEADER).and_then(read_props) {
        expiry = p.message_expiry_interval;
        message.properties = p;
        message.properties.message_expiry_interval = None;
    }
    Some((message, expiry))
}

/// Client ids in [`CLIENTS`]: the bytes in hex (a key allows few characters).
pub(crate) fn client_key(client_id: &str) -> String {
    crate::hex::encode(client_id.as_bytes())
}

fn client_of(key: &str) -> Option<String> {
    crate::hex::text(key)
}

/// Writes each client id that connects here to [`CLIENTS`] (this node's name, under the
/// id; with a revision: by compare-and-set on it, answered with [`Inbound::Claimed`]),
/// and watches the bucket: a later write of an id by another node (a higher revision
/// than this node's own) means the client connected there, and its connection here is
/// closed ([`Inbound::TakenOver`]).
async fn claim(
    js: async_nats::jetstream::Context,
    config: Config,
    mut claims: mpsc::UnboundedReceiver<(String, Option<u64>)>,
    to_core: impl Fn(Inbound) + Send + 'static,
) {
    use async_nats::jetstream::kv;
    let store = crate::kv::bucket(&js, CLIENTS, config.replicas, std::time::Duration::ZERO).await;
    // The last owner of every client first (a copy an earlier run of this node left of a
    // session whose client went elsewhere goes), then each change.
    let mut watch = crate::kv::watch_all_with_history(&store).await;
    // Each id this node wrote, with the revision of its write.
    let mut mine: HashMap<String, u64> = HashMap::new();
    // Writes under way, many at once (one at a time, a burst of connections would wait
    // seconds to be known as here, and a session fetched meanwhile would be missed).
    let mut writes = futures_util::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            c = claims.recv() => {
                let Some((client_id, expected)) = c else { return };
                let store = store.clone();
                let node = Bytes::from(config.node_id.clone());
                writes.push(async move {
                    let key = client_key(&client_id);
                    let put = match expected {
                        None => store.put(key, node).await.map_err(|e| e.to_string()),
                        Some(r) => store.update(key, node, r).await.map_err(|e| e.to_string()),
                    };
                    (client_id, expected.is_some(), put)
                });
            }
            Some((client_id, first, put)) = writes.next(), if !writes.is_empty() => {
                match &put {
                    Ok(revision) => {
                        let r = mine.entry(client_id.clone()).or_insert(*revision);
                        *r = (*r).max(*revision);
                    }
                    Err(e) if first => tracing::warn!(error = %e, client_id = %client_id, "cluster: claiming a client whose session moved here failed (another node claimed it, or NATS is busy): the client is refused for now"),
                    Err(e) => tracing::warn!(error = %e, client_id = %client_id, "writing the cluster's client table failed"),
                }
                if first {
                    to_core(Inbound::Claimed(client_id, put.is_ok()));
                }
            }
            e = watch.next() => {
                let Some(Ok(entry)) = e else { continue };
                if entry.operation != kv::Operation::Put || entry.value.as_ref() == config.node_id.as_bytes() {
                    continue;
                }
                let Some(client_id) = client_of(&entry.key) else { continue };
                match mine.get(&client_id) {
                    Some(r) if entry.revision > *r => {
                        mine.remove(&client_id);
                        to_core(Inbound::TakenOver(client_id));
                    }
                    Some(_) => {}
                    None => to_core(Inbound::Elsewhere(client_id)),
                }
            }
        }
    }
}

/// Reads the cluster's stream for this node (one ordered consumer per node, not per
/// session, from the sequence after the last one the node's store says it applied), a
/// batch at a time: hands it to the core and reads on once the core has committed it
/// (`applied`). Messages this node published itself are only counted (its sessions had
/// them when they were published).
async fn consume(
    js: async_nats::jetstream::Context,
    config: Config,
    table: shares::Shared,
    (boot, ready, caught): (
        String,
        tokio::sync::oneshot::Sender<()>,
        tokio::sync::watch::Sender<bool>,
    ),
    (start, mut applied): (u64, tokio::sync::watch::Receiver<u64>),
    (mut moves, fed): (
        mpsc::UnboundedReceiver<(String, crate::moves::Given, String, u64)>,
        Fed,
    ),
    deliver: impl Fn(Inbound) + Send + 'static,
) {
    use async_nats::jetstream::{consumer, stream};
    let stream = crate::kv::stream(
        &js,
        stream::Config {
            name: STREAM.into(),
            subjects: vec![format!("{STREAM_PREFIX}>")],
            num_replicas: config.replicas.max(1),
            storage: stream::StorageType::File,
            duplicate_window: std::time::Duration::from_secs(120),
            max_age: std::time::Duration::from_secs(7 * 86_400),
            ..Default::default()
        },
        "stream",
    )
    .await;
    // A node new to the cluster starts at the stream's end, and says so in a commit first
    // (so that, should it crash, it reads its own first messages back from there).
    let mut caught_up = stream.cached_info().state.last_sequence;
    if caught_up == 0 {
        // An empty stream gets one marker message (the same id from every node, so one),
        // so that a node's first commit can name a position in it.
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", "tern-marker");
        headers.insert(MARKER_HEADER, "1");
        loop {
            let put = match js
                .publish_with_headers(
                    format!("{STREAM_PREFIX}$tern"),
                    headers.clone(),
                    Bytes::new(),
                )
                .await
            {
                Ok(ack) => ack.await.map(|a| a.sequence).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match put {
                Ok(seq) => {
                    caught_up = seq;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "marking the cluster's new stream failed: trying again");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
            }
        }
    }
    let start = if start == 0 && caught_up > 0 {
        deliver(Inbound::Durable(caught_up, Vec::new()));
        if applied.wait_for(|a| *a >= caught_up).await.is_err() {
            return;
        }
        caught_up
    } else {
        start
    };
    let deliver_policy = consumer::DeliverPolicy::ByStartSequence {
        start_sequence: start + 1,
    };
    // An ordered consumer from where this node's store says it is: no acknowledgements
    // for JetStream to keep (the node's progress is in its own commits), in order, gaps
    // mended by the client; made again at each start, so one per node, never per session.
    let mut messages = ordered_reader(
        &stream,
        consumer::pull::OrderedConfig {
            deliver_policy,
            ..Default::default()
        },
        "cluster's stream",
    )
    .await;
    // The node serves its clients once it has applied what the stream held when it
    // started: messages of its own that a crash left without their round here are redone
    // before their publishers can send them again (docs/cluster.md, "After a crash").
    let mut ready = Some(ready);
    if caught_up <= start {
        ready.take().map(|r| r.send(()));
        let _ = caught.send(true);
    }
    tracing::info!(
        from = start,
        through = caught_up,
        "cluster: reading the stream of QoS 1/2 messages"
    );
    // Where this node has applied the stream to (its sessions have everything up to it).
    let mut pos = start;
    // The nodes' names, each allocated once.
    let mut names: Vec<std::sync::Arc<str>> = Vec::new();
    loop {
        // A batch: what has arrived, up to 256, waiting only for the first. Between two
        // batches, a session that moved here is caught up with the stream.
        let mut batch = Vec::new();
        let mut last = 0;
        let mut next = tokio::select! {
            n = messages.next() => n,
            Some((client_id, given, from, revision)) = moves.recv() => {
                let read = catch_up(&stream, given.applied, pos, &config.node_id, &mut names);
                let fetched = match tokio::time::timeout(CATCH_UP_TIMEOUT, read).await {
                    Ok(catch_up) => {
                        // From the next batch on, this node's own messages are read back
                        // for it.
                        fed.store(true, std::sync::atomic::Ordering::Release);
                        crate::moves::Fetched::Moved(Box::new(crate::moves::Arrived {
                            given,
                            from,
                            revision,
                            catch_up,
                        }))
                    }
                    Err(_) => {
                        tracing::warn!(client_id = %client_id, "cluster: reading the stream for a session that moved here took too long: the client is refused for now");
                        crate::moves::Fetched::Unavailable
                    }
                };
                deliver(Inbound::Moved(client_id, fetched));
                continue;
            }
        };
        let own_wanted = fed.load(std::sync::atomic::Ordering::Acquire);
        let mut reopen = false;
        loop {
            match next {
                // async-nats (0.46) makes an ordered consumer that resets before its first
                // message again from the stream's start (DeliverPolicy::All), whatever it
                // was asked: what this node applied already is skipped here, or it would
                // be routed twice.
                Some(Ok(m)) if m.info().is_ok_and(|i| i.stream_sequence <= pos.max(last)) => {
                    // Far behind: read on from where this node stands with a consumer
                    // of its own rather than skip through the whole stream.
                    if m.info()
                        .is_ok_and(|i| pos.max(last) - i.stream_sequence > 1_000)
                    {
                        reopen = true;
                        break;
                    }
                }
                Some(Ok(m)) => {
                    let Ok(info) = m.info() else { break };
                    last = info.stream_sequence;
                    let marker = m
                        .headers
                        .as_ref()
                        .is_some_and(|h| h.get(MARKER_HEADER).is_some());
                    let own = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(NODE_HEADER))
                        .is_some_and(|n| n.as_str() == config.node_id);
                    // This node's own messages come back only for its shared groups
                    // the publish gave them to.
                    let shared = shared_for_me(
                        m.headers.as_ref(),
                        &table,
                        &config.node_id,
                        own,
                        m.subject.as_str(),
                        || last,
                    );
                    // ... and, put there by an earlier run of this node, for the core to see
                    // whether a crash lost their round here.
                    let earlier = if own {
                        earlier_run(m.headers.as_ref(), &boot)
                    } else {
                        None
                    };
                    // ... and, once a session moved here, for such sessions.
                    let for_moved = own && own_wanted && earlier.is_none();
                    if !marker
                        && (!own || !shared.is_empty() || earlier.is_some() || for_moved)
                        && let Some(message) = from_stream(&m)
                    {
                        // (An earlier run's own message too: the sessions that moved here
                        // take it by their rule if its round was committed.)
                        let source = source_of(&m, last, own, &mut names);
                        let plain = (!own || for_moved) && !source.handed;
                        batch.push(Remote {
                            message,
                            plain,
                            shared,
                            earlier,
                            source: Some(source),
                        });
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "reading the cluster's stream: an error (the reader goes on)");
                }
                None => return,
            }
            if last > 0 && batch.len() >= 256 {
                break;
            }
            match futures_util::FutureExt::now_or_never(messages.next()) {
                Some(n) => next = n,
                None => break,
            }
        }
        if reopen {
            tracing::warn!(
                from = pos.max(last) + 1,
                "cluster: the stream's reader started again from the stream's start: read on from this node's position"
            );
            messages = ordered_reader(
                &stream,
                consumer::pull::OrderedConfig {
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: pos.max(last) + 1,
                    },
                    ..Default::default()
                },
                "cluster's stream",
            )
            .await;
        }
        if last == 0 {
            continue;
        }
        deliver(Inbound::Durable(last, batch));
        // One batch at a time: the next once this one is committed.
        if applied.wait_for(|a| *a >= last).await.is_err() {
            return;
        }
        pos = pos.max(last);
        if last >= caught_up
            && let Some(r) = ready.take()
        {
            tracing::info!(through = last, "cluster: caught up with the stream");
            let _ = r.send(());
            let _ = caught.send(true);
        }
    }
}

/// Set once this node has a session that moved here from another node: such a session
/// takes this node's own QoS 1/2 messages from the stream (docs/cluster.md), so the
/// reader hands them to the core too.
pub type Fed = std::sync::Arc<std::sync::atomic::AtomicBool>;
/// How long reading the stream for a session that moved here may take.
const CATCH_UP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where a message of the stream comes from (`seq`), its node's name taken from `names`.
fn source_of(
    m: &async_nats::jetstream::Message,
    seq: u64,
    own: bool,
    names: &mut Vec<std::sync::Arc<str>>,
) -> Source {
    let header = |name: &str| {
        m.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str())
    };
    let node = header(NODE_HEADER).unwrap_or("");
    let node = match names.iter().find(|n| &***n == node) {
        Some(n) => n.clone(),
        None => {
            let n: std::sync::Arc<str> = node.into();
            names.push(n.clone());
            n
        }
    };
    let publisher = own
        .then(|| header(ORIGIN_HEADER))
        .flatten()
        .and_then(|v| crate::hex::text(v.split_once(':')?.0));
    Source {
        seq,
        node,
        number: header(NUMBER_HEADER)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        own,
        publisher,
        handed: header(HANDED_HEADER).is_some(),
    }
}

/// The stream's messages after `after` through `through`, for a session that moved here
/// (read with a consumer of its own, gone when done).
async fn catch_up(
    stream: &async_nats::jetstream::stream::Stream,
    after: u64,
    through: u64,
    me: &str,
    names: &mut Vec<std::sync::Arc<str>>,
) -> Vec<Remote> {
    use async_nats::jetstream::consumer;
    let mut out = Vec::new();
    if after >= through {
        return out;
    }
    let mut messages = ordered_reader(
        stream,
        consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            },
            ..Default::default()
        },
        "cluster's stream (a session's catch-up)",
    )
    .await;
    while let Some(next) = messages.next().await {
        let Ok(m) = next else { continue };
        let Ok(info) = m.info() else { continue };
        let seq = info.stream_sequence;
        if seq <= after {
            // A reset consumer reading from the stream's start (see `consume`).
            continue;
        }
        if seq > through {
            break;
        }
        let headers = m.headers.as_ref();
        let marker = headers.is_some_and(|h| h.get(MARKER_HEADER).is_some());
        let own = headers
            .and_then(|h| h.get(NODE_HEADER))
            .is_some_and(|n| n.as_str() == me);
        if !marker && let Some(message) = from_stream(&m) {
            let source = source_of(&m, seq, own, names);
            out.push(Remote {
                message,
                plain: !source.handed,
                shared: Vec::new(),
                earlier: None,
                source: Some(source),
            });
        }
        if seq >= through {
            break;
        }
    }
    out
}

/// For this node's own message: its number and origin if an earlier run of the node put
/// it in the stream.
fn earlier_run(
    headers: Option<&async_nats::HeaderMap>,
    boot: &str,
) -> Option<(u64, Option<(String, u16)>)> {
    let h = headers?;
    if h.get(BOOT_HEADER)?.as_str() == boot {
        return None;
    }
    let number = h.get(NUMBER_HEADER)?.as_str().parse().ok()?;
    let origin = h.get(ORIGIN_HEADER).and_then(|v| {
        let (hex, pid) = v.as_str().split_once(':')?;
        Some((crate::hex::text(hex)?, pid.parse().ok()?))
    });
    Some((number, origin))
}

/// An ordered consumer of `stream` (made again until JetStream has it), read as messages.
async fn ordered_reader(
    stream: &async_nats::jetstream::stream::Stream,
    config: async_nats::jetstream::consumer::pull::OrderedConfig,
    what: &str,
) -> async_nats::jetstream::consumer::pull::Ordered {
    loop {
        let messages = match stream.create_consumer(config.clone()).await {
            Ok(c) => c.messages().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match messages {
            Ok(m) => return m,
            Err(e) => {
                tracing::warn!(error = %e, "this node's reader of the {what} is not there yet: trying again");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
}

/// A QoS 1/2 message of the cluster's stream.
fn from_stream(m: &async_nats::jetstream::Message) -> Option<Message> {
    let (mut message, expiry) = stream_message(m, STREAM_PREFIX, QoS::AtLeastOnce)?;
    message.expires_at = expiry
        .map(|secs| std::time::Instant::now() + std::time::Duration::from_secs(u64::from(secs)));
    Some(message)
}

/// The message a copy from NATS is, if this copy is the one to take: it came through the
/// first of this node's subscriptions that match its subject.
fn take(
    subs: &BTreeMap<String, (usize, tokio::task::JoinHandle<()>)>,
    via: &str,
    m: async_nats::Message,
    table: &shares::Shared,
    me: &str,
) -> Option<Remote> {
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
    // A retained message is retained on every node that takes it (an empty one clears).
    message.retain = m
        .headers
        .as_ref()
        .and_then(|h| h.get(RETAIN_HEADER))
        .is_some_and(|v| v.as_str() == "1");
    if let Some(p) = props {
        let expires_at = p.message_expiry_interval.map(|secs| {
            std::time::Instant::now() + std::time::Duration::from_secs(u64::from(secs))
        });
        message.properties = p;
        message.properties.message_expiry_interval = None;
        message.expires_at = expires_at;
    }
    let shared = shared_for_me(m.headers.as_ref(), table, me, false, subject, || {
        shares::fnv(&m.payload)
    });
    Some(Remote {
        message,
        plain: true,
        shared,
        earlier: None,
        source: None,
    })
}

/// The shared subscriptions of this node a message from the cluster is for: those its
/// `Tern-Share` header names this node for; for a message from outside Tern (no header),
/// those this node's view of the table picks it for (by `salt`, the same on every node).
/// With no shared subscription in the table (most clusters), one look at it and nothing
/// else per message: no topic made, no clock read, no hash.
fn shared_for_me(
    headers: Option<&async_nats::HeaderMap>,
    table: &shares::Shared,
    me: &str,
    own: bool,
    subject: &str,
    salt: impl FnOnce() -> u64,
) -> Vec<String> {
    match headers.and_then(|h| h.get(SHARE_HEADER)) {
        Some(v) => shares::for_me(v.as_str(), me),
        None if own => Vec::new(),
        None => {
            let table = shares::lock(table);
            if table.is_empty() {
                return Vec::new();
            }
            let subject = subject.strip_prefix(STREAM_PREFIX).unwrap_or(subject);
            let topic = subject_to_topic(subject);
            table
                .assign(me, &topic, salt(), std::time::Instant::now())
                .into_iter()
                .filter(|(_, node)| node == me)
                .map(|(s, _)| s)
                .collect()
        }
    }
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
    Some(crate::hex::encode(&out))
}

/// The properties a [`PROPS_HEADER`] value carries.
fn read_props(hex: &str) -> Option<tern_codec::Props<tern_codec::properties::PublishProperties>> {
    let mut buf = bytes::BytesMut::from(crate::hex::decode(hex)?.as_slice());
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
