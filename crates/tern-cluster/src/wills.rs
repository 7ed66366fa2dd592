//! Wills of the clients of a node that died, published once by a node that lives.
//!
//! Node liveness: each node writes its name and the time it started ("boot") to the KV
//! bucket [`NODES`] every [`BEAT`]; every node watches it. A node is gone when it has not
//! written for [`GONE_AFTER`], or when it wrote another boot (it restarted: its clients'
//! connections ended with the old process).
//!
//! Wills: while a client with a will is connected to a node, the node keeps the will in
//! the KV bucket [`WILLS`] under the client id (owner node and boot, and the will with the
//! client's user name as a CONNECT packet); it deletes it when the connection ends (the
//! node itself then publishes the will or not, as a single broker does), but only if the
//! entry is still its own (a later connection elsewhere may have written it). Every node
//! looks at the wills whose owner is gone: it claims one by compare-and-set (the owner
//! becomes itself, marked claimed); the one whose write wins waits for the will's delay,
//! checks that the entry is still its claim (the client did not come back), hands the will
//! to its core, which publishes it as the client's, and deletes the entry. A claimer that
//! dies before publishing is gone in its turn, and another node claims the will again.
//!
//! A node that cannot say it lives (cut off from NATS, or NATS without a quorum) for
//! [`CUT_OFF_AFTER`] is told so (`cut_off(true)`): its core closes its connections without
//! publishing their wills and takes none until NATS answers again (`cut_off(false)`). The
//! others take it for gone only later ([`GONE_AFTER`]), so they never publish the will of
//! a client that is still connected to it. Back in time, it claims its own entries as a
//! survivor would (compare-and-set on its revision), so each of those wills is published
//! once, by it or by a survivor. A will entry is claimed only once it has been known for
//! [`GONE_AFTER`]: a node just back writes new entries before every other node has seen it
//! say it lives again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tern_codec::{Connect, LastWill, Packet, Protocol, Str};

/// The KV bucket of node liveness.
pub const NODES: &str = "TERN_NODES";
/// The KV bucket of the wills of connected clients.
pub const WILLS: &str = "TERN_WILLS";
/// How often a node says it lives.
pub const BEAT: Duration = Duration::from_secs(2);
/// A node that has not said so for this long is gone.
pub const GONE_AFTER: Duration = Duration::from_secs(10);
/// A node that finds it did not run for this long (SIGSTOP, a paused VM: its clock moved
/// on, its tasks did not) stops at once ([`Awake::check`]).
pub const FROZEN_AFTER: Duration = Duration::from_secs(5);

/// When this process last ran its liveness ticker, to tell a node that was frozen.
///
/// A node frozen for seconds wakes up with stale views: its clients may have moved to
/// other nodes and sent again what it had read from them before it froze, the others may
/// be publishing their wills, and it has seen no other node say it lives for as long, so
/// it would take them for gone. It must not put any of that into the cluster: whatever
/// part of the node wakes first and finds the ticker this far behind aborts the process
/// (restarted, it recovers from its store and the stream, as after a SIGKILL).
#[derive(Debug, Clone)]
pub struct Awake {
    base: Instant,
    last: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Awake {
    /// Starts the ticker (a task of its own, every 250 ms).
    pub fn start() -> (Awake, tokio::task::JoinHandle<()>) {
        let awake = Awake {
            base: Instant::now(),
            last: Default::default(),
        };
        let ticking = awake.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                ticking.tick();
            }
        });
        (awake, task)
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// The ticker ran (after checking that it had not been frozen).
    fn tick(&self) {
        self.check();
        self.last
            .store(self.now(), std::sync::atomic::Ordering::SeqCst);
    }

    /// Aborts the process if the ticker has not run for [`FROZEN_AFTER`].
    pub fn check(&self) {
        let last = self.last.load(std::sync::atomic::Ordering::SeqCst);
        let gap = self.now().saturating_sub(last);
        if gap > FROZEN_AFTER.as_millis() as u64 {
            tracing::error!(
                frozen_ms = gap,
                "cluster: this node did not run for {} s (paused?): it stops now rather than act on what it knew before; restart it",
                gap / 1000
            );
            std::process::abort();
        }
    }
}

/// A node whose last write saying it lives that NATS acknowledged was sent this long ago
/// is cut off: the others will take it for gone within `GONE_AFTER - CUT_OFF_AFTER`, so it
/// closes its connections and leaves their wills to the cluster first.
pub const CUT_OFF_AFTER: Duration = Duration::from_secs(6);

/// A will as the cluster keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// The client whose will it is.
    pub client_id: String,
    /// Its user name (the ACL decides with it).
    pub username: Option<String>,
    /// The will.
    pub will: LastWill,
    /// The session's expiry interval in seconds: the will waits for its delay or the
    /// session's end, whichever comes first.
    pub session_expiry: u32,
}

impl Will {
    /// How long after its connection ended the will is published.
    pub fn delay(&self) -> u32 {
        self.will
            .properties
            .will_delay_interval
            .unwrap_or(0)
            .min(self.session_expiry)
    }
}

/// A change the core made to the wills of this node's connections.
#[derive(Debug, Clone)]
pub enum Change {
    /// A client connected with this will.
    Put(Will),
    /// The connection of this client ended: its will is this node's business now.
    Delete(String),
}

/// The entry of a will: `owner`, `boot`, whether it is claimed, then the CONNECT.
fn encode(owner: &str, boot: &str, claimed: bool, will: &Will) -> Option<Bytes> {
    let mut c = Connect::new(Protocol::V5, will.client_id.as_str());
    c.will = Some(will.will.clone());
    c.username = will.username.as_deref().map(Str::from);
    c.properties.session_expiry_interval = Some(will.session_expiry);
    let mut out = BytesMut::new();
    out.extend_from_slice(format!("{owner}\n{boot}\n{}\n", u8::from(claimed)).as_bytes());
    tern_codec::encode(&Packet::Connect(Box::new(c)), Protocol::V5, &mut out).ok()?;
    Some(out.freeze())
}

/// An entry read back: owner, boot, claimed, the will.
fn decode(value: &[u8]) -> Option<(String, String, bool, Will)> {
    let mut parts = value.splitn(4, |b| *b == b'\n');
    let owner = String::from_utf8(parts.next()?.to_vec()).ok()?;
    let boot = String::from_utf8(parts.next()?.to_vec()).ok()?;
    let claimed = parts.next()? == b"1";
    let mut buf = BytesMut::from(parts.next()?);
    let Ok(Some(Packet::Connect(c))) =
        tern_codec::decode(&mut buf, Protocol::V5, tern_codec::MAX_PACKET_SIZE)
    else {
        return None;
    };
    Some((
        owner,
        boot,
        claimed,
        Will {
            client_id: c.client_id.to_string(),
            username: c.username.map(|u| u.to_string()),
            session_expiry: c.properties.session_expiry_interval.unwrap_or(0),
            will: c.will?,
        },
    ))
}

fn hex(s: &str) -> String {
    crate::hex::encode(s.as_bytes())
}

fn unhex(s: &str) -> Option<String> {
    crate::hex::text(s)
}

/// Who lives, as this node sees it.
#[derive(Debug, Default)]
pub struct Liveness {
    /// Node -> its boot and when this node last saw it write.
    nodes: HashMap<String, (String, Instant)>,
    /// When this node started watching (a node never seen is gone only after
    /// [`GONE_AFTER`] from then).
    since: Option<Instant>,
}

impl Liveness {
    /// `node` wrote `boot` (seen at `now`).
    pub fn beat(&mut self, node: &str, boot: &str, now: Instant) {
        self.nodes.insert(node.to_string(), (boot.to_string(), now));
    }

    /// Whether the process `(node, boot)` is gone at `now`.
    pub fn gone(&self, node: &str, boot: &str, now: Instant) -> bool {
        match self.nodes.get(node) {
            Some((b, _)) if b != boot => true,
            Some((_, at)) => now.saturating_duration_since(*at) >= GONE_AFTER,
            None => self
                .since
                .is_some_and(|s| now.saturating_duration_since(s) >= GONE_AFTER),
        }
    }
}

/// A will this node claimed: the revision of its claim, when to publish.
struct Claim {
    revision: u64,
    at: Instant,
    will: Will,
}

/// Keeps this node's liveness and its clients' wills in NATS, and publishes (through
/// `publish`) the wills of clients whose node is gone, once across the cluster.
pub async fn run(
    js: async_nats::jetstream::Context,
    node: String,
    boot: String,
    replicas: usize,
    mut changes: tokio::sync::mpsc::UnboundedReceiver<Change>,
    to_core: impl Fn(crate::link::Inbound) + Send + Sync + 'static,
    awake: Awake,
) {
    let to_core = std::sync::Arc::new(to_core);
    let publish = {
        let to_core = to_core.clone();
        move |w: Will| to_core(crate::link::Inbound::Will(w))
    };
    let cut_off = {
        let to_core = to_core.clone();
        move |c: bool| to_core(crate::link::Inbound::CutOff(c))
    };
    use async_nats::jetstream::kv;
    let nodes = crate::kv::bucket(&js, NODES, replicas, Duration::ZERO).await;
    let wills = crate::kv::bucket(&js, WILLS, replicas, Duration::ZERO).await;
    let mut node_watch = crate::kv::watch_all(&nodes).await;
    let mut will_watch = crate::kv::watch_all(&wills).await;
    let mut live = Liveness {
        since: Some(Instant::now()),
        ..Default::default()
    };
    // Wills in the bucket: key -> (revision, owner, boot, claimed, will, when seen).
    let mut known: HashMap<String, (u64, String, String, bool, Will, Instant)> = HashMap::new();
    // Liveness, written beside this loop (whose KV calls may wait seconds while NATS is
    // away): the node learns here when it is cut off and when it is back.
    let (back_tx, mut back) = tokio::sync::mpsc::unbounded_channel::<()>();
    let beats = tokio::spawn(keep_saying_it_lives(
        nodes.clone(),
        hex(&node),
        boot.clone(),
        move |cut| {
            cut_off(cut);
            if !cut {
                let _ = back_tx.send(());
            }
        },
    ));
    // This node's own entries (of its connected clients), by client: the revision.
    let mut mine: HashMap<String, u64> = HashMap::new();
    let mut claims: HashMap<String, Claim> = HashMap::new();
    let mut look = tokio::time::interval(Duration::from_millis(500));
    tracing::info!(node = %node, boot = %boot, "cluster: keeping liveness and wills");
    loop {
        tokio::select! {
            Some(()) = back.recv() => {
                // The connections it closed when cut off: their wills are claimed here as a
                // survivor would claim them (unless one already has).
                let now = Instant::now();
                for (client_id, rev) in mine.drain() {
                    let key = hex(&client_id);
                    let Some((_, _, _, _, w, _)) = known.get(&key).filter(|k| k.0 == rev) else { continue };
                    let w = w.clone();
                    let Some(value) = encode(&node, &boot, true, &w) else { continue };
                    if let Ok(claimed) = wills.update(&key, value, rev).await {
                        tracing::info!(client_id = %w.client_id, "cluster: back from being cut off: the will of a connection closed then is this node's to publish");
                        let at = now + Duration::from_secs(u64::from(w.delay()));
                        claims.insert(key, Claim { revision: claimed, at, will: w });
                    }
                }
            }
            c = changes.recv() => {
                let Some(c) = c else {
                    beats.abort();
                    return;
                };
                match c {
                    Change::Put(w) => {
                        let Some(value) = encode(&node, &boot, false, &w) else { continue };
                        match wills.put(hex(&w.client_id), value).await {
                            Ok(rev) => {
                                mine.insert(w.client_id.clone(), rev);
                            }
                            Err(e) => tracing::warn!(error = %e, client_id = %w.client_id, "keeping a will in the cluster failed"),
                        }
                    }
                    Change::Delete(client_id) => {
                        if let Some(rev) = mine.remove(&client_id) {
                            // Only this node's own entry: a later connection elsewhere
                            // wrote a newer one, which stays.
                            let _ = wills.delete_expect_revision(hex(&client_id), Some(rev)).await;
                        }
                    }
                }
            }
            e = node_watch.next() => {
                let Some(Ok(entry)) = e else { continue };
                if entry.operation == kv::Operation::Put
                    && let Some(who) = unhex(&entry.key)
                {
                    live.beat(&who, &String::from_utf8_lossy(&entry.value), Instant::now());
                }
            }
            e = will_watch.next() => {
                let Some(Ok(entry)) = e else { continue };
                match entry.operation {
                    kv::Operation::Put => {
                        if let Some((owner, b, claimed, w)) = decode(&entry.value) {
                            known.insert(entry.key.clone(), (entry.revision, owner, b, claimed, w, Instant::now()));
                        }
                    }
                    kv::Operation::Delete | kv::Operation::Purge => {
                        known.remove(&entry.key);
                    }
                }
            }
            _ = look.tick() => {
                // Never claim on a view a freeze made stale.
                awake.check();
                let now = Instant::now();
                // Claim the wills of processes that are gone.
                let orphans: Vec<(String, u64, Will)> = known
                    .iter()
                    .filter(|(key, (_, owner, b, _, _, seen))| {
                        let alive_here = owner == &node && b == &boot;
                        !(claims.contains_key(*key) || alive_here)
                            && now.saturating_duration_since(*seen) >= GONE_AFTER
                            && live.gone(owner, b, now)
                    })
                    .map(|(key, (rev, _, _, _, w, _))| (key.clone(), *rev, w.clone()))
                    .collect();
                for (key, rev, w) in orphans {
                    let Some(value) = encode(&node, &boot, true, &w) else { continue };
                    if let Ok(claimed) = wills.update(&key, value, rev).await {
                        let delay = w.delay();
                        tracing::info!(client_id = %w.client_id, delay, "cluster: the will of a client of a node that is gone is this node's to publish");
                        claims.insert(key, Claim { revision: claimed, at: now + Duration::from_secs(u64::from(delay)), will: w });
                    }
                }
                // Publish the claims that are due, if still this node's.
                let due: Vec<String> = claims.iter().filter(|(_, c)| c.at <= now).map(|(k, _)| k.clone()).collect();
                for key in due {
                    let Some(c) = claims.remove(&key) else { continue };
                    match wills.entry(key.clone()).await {
                        Ok(Some(e)) if e.revision == c.revision && e.operation == kv::Operation::Put => {
                            tracing::info!(client_id = %c.will.client_id, "cluster: publishing the will of a client of a node that is gone");
                            publish(c.will);
                            let _ = wills.delete_expect_revision(&key, Some(c.revision)).await;
                        }
                        Ok(_) => {
                            tracing::info!(client_id = %c.will.client_id, "cluster: the client came back: its will is not published");
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "reading a claimed will failed: trying again");
                            claims.insert(key, c);
                        }
                    }
                }
            }
        }
    }
}

/// Writes this node's boot under its name every [`BEAT`] (each write waited for beside the
/// next), and tells `cut_off` when the last write NATS acknowledged was sent more than
/// [`CUT_OFF_AFTER`] ago (`true`) and when one is acknowledged again (`false`).
async fn keep_saying_it_lives(
    nodes: async_nats::jetstream::kv::Store,
    key: String,
    boot: String,
    cut_off: impl Fn(bool) + Send + 'static,
) {
    let last_ok = std::sync::Arc::new(std::sync::Mutex::new(Instant::now()));
    let mut cut = false;
    let mut next = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let now = Instant::now();
        if now >= next {
            next = now + BEAT;
            let (nodes, key, value, last_ok) = (
                nodes.clone(),
                key.clone(),
                Bytes::from(boot.clone()),
                last_ok.clone(),
            );
            tokio::spawn(async move {
                match nodes.put(key, value).await {
                    Ok(_) => {
                        let mut at = last_ok
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        *at = (*at).max(now);
                    }
                    Err(e) => tracing::warn!(error = %e, "saying this node lives failed"),
                }
            });
        }
        let at = *last_ok
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now_cut = now.saturating_duration_since(at) > CUT_OFF_AFTER;
        if now_cut != cut {
            cut = now_cut;
            cut_off(cut);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_will_entry_reads_back_as_written() {
        let w = Will {
            client_id: "dev-1".into(),
            username: Some("alice".into()),
            will: LastWill {
                topic: tern_codec::TopicName::new("wills/dev-1").unwrap(),
                payload: Bytes::from_static(b"gone\nfor good"),
                qos: tern_codec::QoS::AtLeastOnce,
                retain: true,
                properties: tern_codec::Props::NONE,
            },
            session_expiry: 7,
        };
        let v = encode("n\u{e9}", "b1", true, &w).unwrap();
        assert_eq!(decode(&v), Some(("n\u{e9}".into(), "b1".into(), true, w)));
    }

    #[test]
    fn a_node_is_gone_when_silent_or_restarted() {
        let t0 = Instant::now();
        let mut l = Liveness {
            since: Some(t0),
            ..Default::default()
        };
        l.beat("a", "1", t0);
        assert!(!l.gone("a", "1", t0 + Duration::from_secs(3)));
        assert!(l.gone("a", "0", t0), "an older boot is gone");
        assert!(l.gone("a", "1", t0 + GONE_AFTER));
        assert!(!l.gone("z", "1", t0), "never seen: given time");
        assert!(l.gone("z", "1", t0 + GONE_AFTER));
    }
}
