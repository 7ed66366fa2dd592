//! Shared subscriptions across nodes: each message to one member of a group, cluster-wide.
//!
//! Each node writes, for every shared subscription (`$share/GROUP/FILTER`) it has members
//! of, a key in the KV bucket [`SHARES`] (the subscription and the node, in hex), again
//! every [`REFRESH`]; every node watches the bucket, so each knows which nodes have members
//! of which subscriptions. The node that publishes a message picks, for each subscription
//! whose filter matches the topic, one of the nodes with members (in turn), and says so in
//! the message's `Tern-Share` header; each node gives the message to the subscriptions the
//! header names it for (one member each, by the group's strategy) and to no others. A
//! message from outside Tern (no header) is given by each node to the subscriptions a
//! hash of the message picks it for, from its own view of the table. A node whose entry
//! was not refreshed for [`STALE`] (it died, or lost NATS) is passed over.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;

/// The KV bucket of shared subscriptions and the nodes with members of them.
pub const SHARES: &str = "TERN_SHARES";
/// The header naming, for each shared subscription a message is for, the node that
/// delivers it: `SUB=NODE` pairs (both in hex) joined by `;`.
pub const SHARE_HEADER: &str = "Tern-Share";
/// How often a node writes its entries again.
pub const REFRESH: Duration = Duration::from_secs(5);
/// An entry older than this is a node that is gone.
pub const STALE: Duration = Duration::from_secs(20);

/// Who has members of which shared subscriptions, as this node knows it.
#[derive(Debug, Default)]
pub struct Table {
    /// Subscription -> node -> when its entry was last written (as seen here).
    nodes: BTreeMap<String, BTreeMap<String, Instant>>,
    /// This node's own subscriptions, with how many of its sessions hold each.
    mine: HashMap<String, usize>,
}

impl Table {
    /// A session of this node started (`add`) or stopped holding `share`. Returns true
    /// when this node starts or stops having members of it (its KV entry is to be written
    /// or deleted).
    pub fn local(&mut self, node: &str, share: &str, add: bool, now: Instant) -> bool {
        if add {
            let n = self.mine.entry(share.to_string()).or_default();
            *n += 1;
            if *n == 1 {
                self.seen(share, node, now);
                return true;
            }
            false
        } else {
            let Some(n) = self.mine.get_mut(share) else {
                return false;
            };
            *n -= 1;
            if *n > 0 {
                return false;
            }
            self.mine.remove(share);
            self.gone(share, node);
            true
        }
    }

    /// A live node other than `me` with members of `share` (the `turn`th of them), if any.
    pub fn other(&self, me: &str, share: &str, turn: u64, now: Instant) -> Option<String> {
        let nodes: Vec<&String> = self
            .nodes
            .get(share)?
            .iter()
            .filter(|(node, at)| node.as_str() != me && now.saturating_duration_since(**at) < STALE)
            .map(|(node, _)| node)
            .collect();
        if nodes.is_empty() {
            return None;
        }
        Some(nodes[(turn % nodes.len() as u64) as usize].clone())
    }

    /// Whether no node has members of any shared subscription.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// This node's subscriptions (to write again).
    pub fn mine(&self) -> Vec<String> {
        self.mine.keys().cloned().collect()
    }

    /// `node` has members of `share` (its entry was written).
    pub fn seen(&mut self, share: &str, node: &str, now: Instant) {
        self.nodes
            .entry(share.to_string())
            .or_default()
            .insert(node.to_string(), now);
    }

    /// `node` no longer has members of `share`.
    pub fn gone(&mut self, share: &str, node: &str) {
        if let Some(n) = self.nodes.get_mut(share) {
            n.remove(node);
            if n.is_empty() {
                self.nodes.remove(share);
            }
        }
    }

    /// For each shared subscription whose filter matches `topic`, the node that gets the
    /// message: the live nodes with members in name order, the `turn`th (plus a little of
    /// the subscription's own, so subscriptions do not all land on one node together).
    pub fn assign(&self, me: &str, topic: &str, turn: u64, now: Instant) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (share, nodes) in &self.nodes {
            let Some(filter) = filter_of(share) else {
                continue;
            };
            if !tern_codec::matches_with(filter, topic, |a, b| a == b) {
                continue;
            }
            // This node's own entry is live as long as it has members.
            let live: BTreeSet<&String> = nodes
                .iter()
                .filter(|(node, at)| {
                    node.as_str() == me || now.saturating_duration_since(**at) < STALE
                })
                .map(|(node, _)| node)
                .collect();
            if live.is_empty() {
                continue;
            }
            let i = (turn.wrapping_add(fnv(share.as_bytes()))) % live.len() as u64;
            if let Some(node) = live.iter().nth(i as usize) {
                out.push((share.clone(), (*node).clone()));
            }
        }
        out
    }
}

/// The filter of `$share/GROUP/FILTER`.
fn filter_of(share: &str) -> Option<&str> {
    let rest = share.strip_prefix("$share/")?;
    rest.split_once('/').map(|(_, f)| f)
}

/// FNV-1a: a stable hash (the same on every node).
pub fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn hex(s: &str) -> String {
    crate::hex::encode(s.as_bytes())
}

fn unhex(s: &str) -> Option<String> {
    crate::hex::text(s)
}

/// The `Tern-Share` header value for these assignments.
pub fn header(assigned: &[(String, String)]) -> String {
    assigned
        .iter()
        .map(|(share, node)| format!("{}={}", hex(share), hex(node)))
        .collect::<Vec<_>>()
        .join(";")
}

/// The shared subscriptions a `Tern-Share` header value gives to `me`.
pub fn for_me(value: &str, me: &str) -> Vec<String> {
    value
        .split(';')
        .filter_map(|pair| {
            let (share, node) = pair.split_once('=')?;
            (unhex(node)? == me).then(|| unhex(share)).flatten()
        })
        .collect()
}

/// The KV key of `share` on `node`.
fn key(share: &str, node: &str) -> String {
    format!("{}.{}", hex(share), hex(node))
}

fn parse_key(key: &str) -> Option<(String, String)> {
    let (share, node) = key.split_once('.')?;
    Some((unhex(share)?, unhex(node)?))
}

/// The table shared by the link's tasks.
pub type Shared = std::sync::Arc<std::sync::Mutex<Table>>;

/// Locks the table (a panic elsewhere leaves it usable).
pub fn lock(t: &Shared) -> std::sync::MutexGuard<'_, Table> {
    t.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the KV task is asked to do.
#[derive(Debug)]
pub enum Change {
    /// This node has members of the subscription: write its entry.
    Join(String),
    /// It no longer has: delete its entry.
    Leave(String),
}

/// Keeps [`SHARES`]: writes this node's entries (and again every [`REFRESH`]), deletes
/// them when asked, and records every node's entries in `table` as the bucket changes.
pub async fn run(
    js: async_nats::jetstream::Context,
    node: String,
    replicas: usize,
    table: Shared,
    mut changes: tokio::sync::mpsc::UnboundedReceiver<Change>,
) {
    use async_nats::jetstream::kv;
    // Entries of nodes gone for good go in the end.
    let store = crate::kv::bucket(&js, SHARES, replicas, Duration::from_secs(3600)).await;
    let mut watch = crate::kv::watch_all(&store).await;
    let mut refresh = tokio::time::interval(REFRESH);
    loop {
        tokio::select! {
            c = changes.recv() => {
                let Some(c) = c else { return };
                let done = match &c {
                    Change::Join(share) => store
                        .put(key(share, &node), Bytes::from(node.clone()))
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    Change::Leave(share) => store
                        .delete(key(share, &node))
                        .await
                        .map_err(|e| e.to_string()),
                };
                if let Err(e) = done {
                    tracing::warn!(error = %e, change = ?c, "writing the cluster's shared subscriptions failed");
                }
            }
            _ = refresh.tick() => {
                let mine = lock(&table).mine();
                for share in mine {
                    if let Err(e) = store.put(key(&share, &node), Bytes::from(node.clone())).await {
                        tracing::warn!(error = %e, "refreshing the cluster's shared subscriptions failed");
                    }
                }
            }
            e = watch.next() => {
                let Some(Ok(entry)) = e else { continue };
                let Some((share, who)) = parse_key(&entry.key) else { continue };
                let mut t = lock(&table);
                match entry.operation {
                    kv::Operation::Put => t.seen(&share, &who, Instant::now()),
                    kv::Operation::Delete | kv::Operation::Purge => {
                        // This node's own entry stays while it has members (a delete
                        // overtaken by a new join).
                        if who != node || !t.mine.contains_key(&share) {
                            t.gone(&share, &who);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_matching_subscription_goes_to_one_live_node_in_turn() {
        let now = Instant::now();
        let mut t = Table::default();
        assert!(t.local("a", "$share/g/jobs/#", true, now));
        assert!(
            !t.local("a", "$share/g/jobs/#", true, now),
            "a second member"
        );
        t.seen("$share/g/jobs/#", "b", now);
        t.seen("$share/h/other", "b", now);
        let picks: Vec<String> = (0..4)
            .map(|turn| {
                let a = t.assign("a", "jobs/1", turn, now);
                assert_eq!(a.len(), 1, "one node for the one matching subscription");
                a[0].1.clone()
            })
            .collect();
        assert!(picks.contains(&"a".to_string()) && picks.contains(&"b".to_string()));
        // b goes quiet: passed over once stale; a's own entry stays live.
        let later = now + STALE + Duration::from_secs(1);
        for turn in 0..4 {
            assert_eq!(t.assign("a", "jobs/1", turn, later)[0].1, "a");
        }
        // a's last member leaves: its entry goes.
        assert!(!t.local("a", "$share/g/jobs/#", false, now));
        assert!(t.local("a", "$share/g/jobs/#", false, now));
        assert!(t.assign("a", "jobs/1", 0, later).is_empty());
    }

    #[test]
    fn the_header_names_each_subscription_for_its_node() {
        let v = header(&[
            ("$share/g/a/#".into(), "node-1".into()),
            ("$share/h/a/+".into(), "node;2".into()),
        ]);
        assert_eq!(for_me(&v, "node-1"), ["$share/g/a/#"]);
        assert_eq!(for_me(&v, "node;2"), ["$share/h/a/+"]);
        assert!(for_me(&v, "node-3").is_empty());
        assert_eq!(
            parse_key(&key("$share/g/a b", "n.1")),
            Some(("$share/g/a b".into(), "n.1".into()))
        );
    }
}
