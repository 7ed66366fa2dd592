//! Persistent sessions moving between nodes (docs/cluster.md, "How a session moves").
//!
//! A node whose client resumes a session asks the node [`crate::link::CLIENTS`] names for
//! the client (the node it last connected to) for the session, over core NATS
//! (`tern.give.NODE`, request and reply, in chunks for a large queue). That node's core
//! closes the client's connection there and, once that is committed, its store hands the
//! session out with the stream positions of the same commit ([`Given`]). The asking
//! node's stream reader then reads the stream from the giver's position to its own, for
//! that one session, and hands the session and those messages to its core together
//! ([`Fetched::Moved`]) between two of its batches, so that nothing is missed or taken
//! twice at the seam.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use crate::link::{CLIENTS, Config, Inbound, Remote};

const GIVE_PREFIX: &str = "tern.give.";
const OFFSET_HEADER: &str = "Tern-Offset";
const TOTAL_HEADER: &str = "Tern-Total";
const APPLIED_HEADER: &str = "Tern-Applied";
const FORWARDED_HEADER: &str = "Tern-Forwarded";
const NONE_HEADER: &str = "Tern-None";
/// Bytes of a session per reply (NATS's default maximum payload is 1 MB).
const CHUNK: usize = 256 * 1024;
/// How long a node keeps a session it gave, for the rest of its chunks to be fetched.
const KEEP_GIVEN: Duration = Duration::from_secs(60);
/// How long a fetch waits for the node that has the session.
const ASK_TIMEOUT: Duration = Duration::from_secs(15);

/// A session a node's store gave out: its bytes (`tern_store::Exported::encode`), and
/// the stream position that node had applied and the count of its own QoS 1/2 forwards,
/// both as of the commit the session was read from.
#[derive(Debug, Clone)]
pub struct Given {
    /// The session.
    pub session: Bytes,
    /// The stream sequence the giving node had applied.
    pub applied: u64,
    /// Its QoS 1/2 forwards.
    pub forwarded: u64,
}

/// A session that moved to this node, with what the stream had past it.
#[derive(Debug)]
pub struct Arrived {
    /// The session as given.
    pub given: Given,
    /// The node that gave it.
    pub from: String,
    /// The revision of the client table's entry that named that node: this node claims
    /// the client by compare-and-set on it before it answers the client
    /// ([`Out::first_claims`](crate::Out::first_claims)).
    pub revision: u64,
    /// The stream's messages after `given.applied` up to where this node's reader stood,
    /// in order.
    pub catch_up: Vec<Remote>,
}

/// The answer to a fetch of a session.
#[derive(Debug)]
pub enum Fetched {
    /// The session moved here.
    Moved(Box<Arrived>),
    /// This node has the latest of it, or nobody has it, or the node that had it is gone:
    /// the client goes on with what this node has. With the revision of the client
    /// table's entry read, if there was one.
    Nothing(Option<u64>),
    /// The node that has it did not answer in time (or the stream could not be read):
    /// the client is refused for now and tries again.
    Unavailable,
}

type Cache = Arc<Mutex<HashMap<String, (Arc<Given>, Instant)>>>;

/// Answers the other nodes' requests for sessions this node has: `give` asks the core,
/// which answers once the session's connection here is closed and committed.
pub(crate) async fn serve(
    client: async_nats::Client,
    node_id: String,
    mut caught_up: tokio::sync::watch::Receiver<bool>,
    give: impl Fn(String, oneshot::Sender<Option<Given>>) + Send + Sync + 'static,
) {
    // Not before the node has applied what the stream held when it started: until then a
    // session here may lack what a crash lost (a publisher's QoS 2 packet id), and the
    // nodes that ask hear nobody answer (their clients wait, as for a node restarting).
    if caught_up.wait_for(|c| *c).await.is_err() {
        return;
    }
    let give = Arc::new(give);
    let cache: Cache = Arc::default();
    let subject = format!("{GIVE_PREFIX}{node_id}");
    let mut requests = loop {
        match client.subscribe(subject.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(error = %e, "subscribing to session requests failed: trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    while let Some(request) = requests.next().await {
        let Some(reply) = request.reply.clone() else {
            continue;
        };
        let Ok(client_id) = std::str::from_utf8(&request.payload).map(str::to_string) else {
            continue;
        };
        let offset: usize = request
            .headers
            .as_ref()
            .and_then(|h| h.get(OFFSET_HEADER))
            .and_then(|v| v.as_str().parse().ok())
            .unwrap_or(0);
        let (client, give, cache) = (client.clone(), give.clone(), cache.clone());
        tokio::spawn(async move {
            let given = if offset == 0 {
                let (tx, rx) = oneshot::channel();
                give(client_id.clone(), tx);
                let given = rx.await.ok().flatten().map(Arc::new);
                let mut c = lock(&cache);
                c.retain(|_, (_, at)| at.elapsed() < KEEP_GIVEN);
                if let Some(g) = &given {
                    c.insert(client_id.clone(), (g.clone(), Instant::now()));
                }
                given
            } else {
                lock(&cache).get(&client_id).map(|(g, _)| g.clone())
            };
            let mut headers = async_nats::HeaderMap::new();
            let body = match &given {
                Some(g) => {
                    let end = (offset + CHUNK).min(g.session.len());
                    headers.insert(APPLIED_HEADER, g.applied.to_string().as_str());
                    headers.insert(FORWARDED_HEADER, g.forwarded.to_string().as_str());
                    headers.insert(TOTAL_HEADER, g.session.len().to_string().as_str());
                    g.session.slice(offset.min(end)..end)
                }
                None => {
                    headers.insert(NONE_HEADER, "1");
                    Bytes::new()
                }
            };
            if let Err(e) = client.publish_with_headers(reply, headers, body).await {
                tracing::warn!(error = %e, client_id = %client_id, "answering a session request failed");
            }
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Fetches the sessions of this node's parked CONNECTs from the nodes that have them: a
/// session given goes to the stream reader (`to_reader`) to be caught up and handed to the
/// core; anything else is answered at once (`answer`).
pub(crate) async fn fetch(
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    config: Config,
    mut ids: mpsc::UnboundedReceiver<String>,
    to_reader: mpsc::UnboundedSender<(String, Given, String, u64)>,
    answer: impl Fn(Inbound) + Send + Sync + 'static,
) {
    let answer = Arc::new(answer);
    let clients = crate::kv::bucket(&js, CLIENTS, config.replicas, Duration::ZERO).await;
    let nodes = crate::kv::bucket(&js, crate::wills::NODES, config.replicas, Duration::ZERO).await;
    while let Some(client_id) = ids.recv().await {
        let wait = config.session_wait;
        let (client, clients, nodes, answer, to_reader, me) = (
            client.clone(),
            clients.clone(),
            nodes.clone(),
            answer.clone(),
            to_reader.clone(),
            config.node_id.clone(),
        );
        tokio::spawn(async move {
            // A read that fails (JetStream busy: a leader being elected) is tried again
            // before the client is refused.
            let key = crate::link::client_key(&client_id);
            let mut tries = 0;
            let entry = loop {
                // Each try bounded (a bucket with no leader yet, as in a cluster just made,
                // would hold the client for the request's whole timeout each time).
                let read = match tokio::time::timeout(
                    Duration::from_millis(1500),
                    clients.entry(key.clone()),
                )
                .await
                {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err("no answer in 1.5 s".to_string()),
                };
                match read {
                    Ok(e) => {
                        break e
                            .filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put);
                    }
                    Err(e) if tries < 4 => {
                        tries += 1;
                        tracing::debug!(error = %e, client_id = %client_id, "reading the cluster's client table failed: trying again");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, client_id = %client_id, "reading the cluster's client table failed: the client is refused for now");
                        answer(Inbound::Moved(client_id, Fetched::Unavailable));
                        return;
                    }
                }
            };
            let revision = entry.as_ref().map(|e| e.revision);
            let owner = entry.and_then(|e| String::from_utf8(e.value.to_vec()).ok());
            let Some(owner) = owner.filter(|o| *o != me) else {
                answer(Inbound::Moved(client_id, Fetched::Nothing(revision)));
                return;
            };
            let revision = revision.unwrap_or_default();
            match ask(&client, &owner, &client_id).await {
                Ok(Some(given)) => {
                    let _ = to_reader.send((client_id, given, owner, revision));
                }
                Ok(None) => answer(Inbound::Moved(client_id, Fetched::Nothing(Some(revision)))),
                Err(Asked::Gone) if lately_alive(&nodes, &owner, wait).await => {
                    tracing::warn!(client_id = %client_id, node = %owner, "cluster: the node that has this client's session is down, and may be back soon: the client is refused for now");
                    answer(Inbound::Moved(client_id, Fetched::Unavailable));
                }
                Err(Asked::Gone) => {
                    tracing::warn!(client_id = %client_id, node = %owner, "cluster: the node that had this client's session is gone: the session starts afresh here");
                    answer(Inbound::Moved(client_id, Fetched::Nothing(Some(revision))));
                }
                Err(Asked::Failed(e)) => {
                    tracing::warn!(error = %e, client_id = %client_id, node = %owner, "cluster: the node that has this client's session did not give it: the client is refused for now");
                    answer(Inbound::Moved(client_id, Fetched::Unavailable));
                }
            }
        });
    }
}

/// Whether `node` said it lives within `wait` (by the time NATS stored its last beat): a
/// node that died that recently may be restarting, with the sessions it holds.
async fn lately_alive(
    nodes: &async_nats::jetstream::kv::Store,
    node: &str,
    wait: Duration,
) -> bool {
    if wait.is_zero() {
        return false;
    }
    let Ok(Some(beat)) = nodes.entry(crate::hex::encode(node.as_bytes())).await else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    now - beat.created.unix_timestamp() < wait.as_secs() as i64
}

enum Asked {
    /// Nobody answers for that node.
    Gone,
    Failed(String),
}

/// Asks `owner` for `client_id`'s session, chunk by chunk.
async fn ask(
    client: &async_nats::Client,
    owner: &str,
    client_id: &str,
) -> Result<Option<Given>, Asked> {
    use async_nats::RequestErrorKind;
    let subject = format!("{GIVE_PREFIX}{owner}");
    let mut session = Vec::new();
    loop {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(OFFSET_HEADER, session.len().to_string().as_str());
        let request = async_nats::Request::new()
            .payload(Bytes::from(client_id.to_string()))
            .headers(headers)
            .timeout(Some(ASK_TIMEOUT));
        let reply = match client.send_request(subject.clone(), request).await {
            Ok(r) => r,
            Err(e) if e.kind() == RequestErrorKind::NoResponders => return Err(Asked::Gone),
            Err(e) => return Err(Asked::Failed(e.to_string())),
        };
        let header = |name: &str| {
            reply
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
        };
        if header(NONE_HEADER).is_some() {
            return if session.is_empty() {
                Ok(None)
            } else {
                Err(Asked::Failed("the session was forgotten half way".into()))
            };
        }
        let number = |name: &str| header(name).and_then(|v| v.parse::<u64>().ok());
        let (Some(applied), Some(forwarded), Some(total)) = (
            number(APPLIED_HEADER),
            number(FORWARDED_HEADER),
            number(TOTAL_HEADER),
        ) else {
            return Err(Asked::Failed("an answer without its headers".into()));
        };
        if reply.payload.is_empty() && (session.len() as u64) < total {
            return Err(Asked::Failed("an empty chunk".into()));
        }
        session.extend_from_slice(&reply.payload);
        if session.len() as u64 >= total {
            return Ok(Some(Given {
                session: Bytes::from(session),
                applied,
                forwarded,
            }));
        }
    }
}
