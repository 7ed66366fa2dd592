//! The subscription trie: topic filters stored level by level, so routing a message costs
//! the depth of its topic times the wildcards on the way, not the number of subscriptions.
//!
//! Each node has children by exact level, one child for `+`, the subscribers whose filter
//! ends at the node, and the subscribers whose filter is the node's path followed by `#`.
//! Filters and topics are validated by tern-codec before they get here; the reference for
//! what matches is [`TopicFilter::matches`], which the trie is tested against.

use std::collections::HashMap;
use std::hash::Hash;

use tern_codec::{QoS, SubscriptionId, SubscriptionOptions, TopicFilter, TopicName};

#[derive(Debug, Clone)]
struct Entry {
    options: SubscriptionOptions,
    id: Option<SubscriptionId>,
}

#[derive(Debug)]
struct Node<K> {
    children: HashMap<Box<str>, Node<K>>,
    plus: Option<Box<Node<K>>>,
    /// Filters ending at this node.
    exact: HashMap<K, Entry>,
    /// Filters ending with `#` right after this node's path.
    rest: HashMap<K, Entry>,
}

impl<K> Default for Node<K> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            plus: None,
            exact: HashMap::new(),
            rest: HashMap::new(),
        }
    }
}

impl<K> Node<K> {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.exact.is_empty()
            && self.rest.is_empty()
    }

    fn count(&self) -> usize {
        1 + self.children.values().map(Node::count).sum::<usize>()
            + self.plus.as_ref().map_or(0, |p| p.count())
    }
}

/// What one subscriber gets for one message: a single copy, at the highest QoS of its
/// matching subscriptions, carrying the identifiers of all of them [MQTT-3.3.4-2]
/// [MQTT-3.3.4-3] [MQTT-3.3.4-5].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The highest QoS granted by a matching subscription (the caller still takes the
    /// minimum with the message's QoS).
    pub qos: QoS,
    /// Whether any matching subscription asked to keep the RETAIN flag as published.
    pub retain_as_published: bool,
    /// Subscription identifiers of the matching subscriptions, ascending.
    pub subscription_ids: Vec<SubscriptionId>,
}

/// Non-shared subscriptions of every client, keyed by a client key `K`.
#[derive(Debug)]
pub struct SubscriptionTrie<K> {
    root: Node<K>,
    len: usize,
}

impl<K> Default for SubscriptionTrie<K> {
    fn default() -> Self {
        SubscriptionTrie {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<K: Clone + Eq + Hash> SubscriptionTrie<K> {
    /// An empty trie.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many (client, filter) subscriptions are stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is subscribed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Nodes in the trie, root included (for tests that check unsubscribing prunes).
    pub fn node_count(&self) -> usize {
        self.root.count()
    }

    /// Adds or replaces `client`'s subscription to `filter` (a repeated SUBSCRIBE to the
    /// same filter replaces the options [MQTT-3.8.4-3]). Returns true if it is new. Shared
    /// subscriptions (`$share/...`) are kept elsewhere; this stores the filter as given.
    pub fn subscribe(
        &mut self,
        filter: &TopicFilter,
        client: K,
        options: SubscriptionOptions,
        id: Option<SubscriptionId>,
    ) -> bool {
        let mut node = &mut self.root;
        let mut levels = filter.filter().split('/').peekable();
        let mut multi = false;
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                multi = true;
                break;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Box::default)
            } else {
                node.children.entry(level.into()).or_default()
            };
        }
        let map = if multi {
            &mut node.rest
        } else {
            &mut node.exact
        };
        let new = map.insert(client, Entry { options, id }).is_none();
        self.len += usize::from(new);
        new
    }

    /// Removes `client`'s subscription to `filter`, pruning nodes left empty. Returns true
    /// if there was one.
    pub fn unsubscribe(&mut self, filter: &TopicFilter, client: &K) -> bool {
        let levels: Vec<&str> = filter.filter().split('/').collect();
        let removed = Self::remove(&mut self.root, &levels, client);
        self.len -= usize::from(removed);
        removed
    }

    fn remove(node: &mut Node<K>, levels: &[&str], client: &K) -> bool {
        match levels {
            [] => node.exact.remove(client).is_some(),
            ["#"] => node.rest.remove(client).is_some(),
            [level, rest @ ..] if *level == "+" => {
                let Some(child) = node.plus.as_mut() else {
                    return false;
                };
                let removed = Self::remove(child, rest, client);
                if child.is_empty() {
                    node.plus = None;
                }
                removed
            }
            [level, rest @ ..] => {
                let Some(child) = node.children.get_mut(*level) else {
                    return false;
                };
                let removed = Self::remove(child, rest, client);
                if child.is_empty() {
                    node.children.remove(*level);
                }
                removed
            }
        }
    }

    /// Every client with a subscription matching `topic`, each once, with what it gets.
    /// Subscriptions with No Local do not match messages `publisher` sent
    /// [MQTT-3.8.3-3].
    pub fn route(&self, topic: &TopicName, publisher: Option<&K>) -> HashMap<K, Delivery> {
        let levels: Vec<&str> = topic.as_str().split('/').collect();
        let mut out: HashMap<K, Delivery> = HashMap::new();
        // [MQTT-4.7.2-1]: no leading wildcard matches a topic starting with '$'.
        let dollar = topic.as_str().starts_with('$');
        Self::walk(&self.root, &levels, dollar, publisher, &mut out);
        for d in out.values_mut() {
            d.subscription_ids.sort_unstable();
        }
        out
    }

    fn walk(
        node: &Node<K>,
        levels: &[&str],
        shield: bool,
        publisher: Option<&K>,
        out: &mut HashMap<K, Delivery>,
    ) {
        if !shield {
            // `path/#` matches the path itself and everything below it.
            Self::collect(&node.rest, publisher, out);
        }
        let Some((level, rest)) = levels.split_first() else {
            Self::collect(&node.exact, publisher, out);
            return;
        };
        if let Some(child) = node.children.get(*level) {
            Self::walk(child, rest, false, publisher, out);
        }
        if !shield && let Some(plus) = &node.plus {
            Self::walk(plus, rest, false, publisher, out);
        }
    }

    fn collect(entries: &HashMap<K, Entry>, publisher: Option<&K>, out: &mut HashMap<K, Delivery>) {
        for (client, entry) in entries {
            if entry.options.no_local && publisher == Some(client) {
                continue;
            }
            let d = out.entry(client.clone()).or_insert(Delivery {
                qos: QoS::AtMostOnce,
                retain_as_published: false,
                subscription_ids: Vec::new(),
            });
            d.qos = d.qos.max(entry.options.qos);
            d.retain_as_published |= entry.options.retain_as_published;
            d.subscription_ids.extend(entry.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(
        trie: &mut SubscriptionTrie<&'static str>,
        filter: &str,
        client: &'static str,
        qos: QoS,
    ) {
        let options = SubscriptionOptions {
            qos,
            ..Default::default()
        };
        trie.subscribe(&TopicFilter::new(filter).unwrap(), client, options, None);
    }

    fn route(trie: &SubscriptionTrie<&'static str>, topic: &str) -> Vec<(&'static str, QoS)> {
        let mut v: Vec<_> = trie
            .route(&TopicName::new(topic).unwrap(), None)
            .into_iter()
            .map(|(k, d)| (k, d.qos))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn overlapping_subscriptions_deliver_one_copy_at_the_highest_qos() {
        let mut t = SubscriptionTrie::new();
        sub(&mut t, "a/+", "c1", QoS::AtMostOnce);
        sub(&mut t, "a/#", "c1", QoS::ExactlyOnce);
        sub(&mut t, "a/b", "c1", QoS::AtLeastOnce);
        sub(&mut t, "a/b", "c2", QoS::AtMostOnce);
        assert_eq!(
            route(&t, "a/b"),
            [("c1", QoS::ExactlyOnce), ("c2", QoS::AtMostOnce)]
        );
    }

    #[test]
    fn plus_plus_does_not_match_sys_topics_but_explicit_dollar_filters_do() {
        let mut t = SubscriptionTrie::new();
        sub(&mut t, "+/+", "wild", QoS::AtMostOnce);
        sub(&mut t, "#", "all", QoS::AtMostOnce);
        sub(&mut t, "$SYS/#", "sys", QoS::AtMostOnce);
        sub(&mut t, "$SYS/+", "sys1", QoS::AtMostOnce);
        assert_eq!(
            route(&t, "$SYS/x"),
            [("sys", QoS::AtMostOnce), ("sys1", QoS::AtMostOnce)]
        );
        assert_eq!(
            route(&t, "a/x"),
            [("all", QoS::AtMostOnce), ("wild", QoS::AtMostOnce)]
        );
    }

    #[test]
    fn hash_matches_the_parent_level() {
        let mut t = SubscriptionTrie::new();
        sub(&mut t, "sport/#", "c", QoS::AtMostOnce);
        assert_eq!(route(&t, "sport").len(), 1);
        assert_eq!(route(&t, "sport/tennis/x").len(), 1);
        assert!(route(&t, "sports").is_empty());
    }

    #[test]
    fn resubscribing_replaces_options_and_unsubscribing_prunes() {
        let mut t = SubscriptionTrie::new();
        sub(&mut t, "a/+/c/#", "c", QoS::AtMostOnce);
        sub(&mut t, "a/+/c/#", "c", QoS::ExactlyOnce);
        assert_eq!(t.len(), 1);
        assert_eq!(route(&t, "a/b/c"), [("c", QoS::ExactlyOnce)]);
        assert!(t.unsubscribe(&TopicFilter::new("a/+/c/#").unwrap(), &"c"));
        assert!(!t.unsubscribe(&TopicFilter::new("a/+/c/#").unwrap(), &"c"));
        assert_eq!((t.len(), t.node_count()), (0, 1));
    }

    #[test]
    fn subscription_identifiers_of_every_matching_subscription_are_carried() {
        let mut t = SubscriptionTrie::new();
        let opts = SubscriptionOptions::default();
        t.subscribe(
            &TopicFilter::new("a/#").unwrap(),
            "c",
            opts,
            SubscriptionId::new(7),
        );
        t.subscribe(
            &TopicFilter::new("a/b").unwrap(),
            "c",
            opts,
            SubscriptionId::new(3),
        );
        t.subscribe(&TopicFilter::new("+/b").unwrap(), "c", opts, None);
        let d = &t.route(&TopicName::new("a/b").unwrap(), None)["c"];
        assert_eq!(
            d.subscription_ids,
            [
                SubscriptionId::new(3).unwrap(),
                SubscriptionId::new(7).unwrap()
            ]
        );
    }

    #[test]
    fn no_local_subscriptions_skip_the_publisher_but_its_other_subscriptions_match() {
        let mut t = SubscriptionTrie::new();
        let local = SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            no_local: true,
            ..Default::default()
        };
        t.subscribe(&TopicFilter::new("a/+").unwrap(), "me", local, None);
        sub(&mut t, "a/b", "other", QoS::AtLeastOnce);
        let a_b = TopicName::new("a/b").unwrap();
        assert!(!t.route(&a_b, Some(&"me")).contains_key("me"));
        assert!(t.route(&a_b, Some(&"you")).contains_key("me"));
        // A second, ordinary subscription of the publisher still matches, at its own QoS.
        sub(&mut t, "a/#", "me", QoS::AtMostOnce);
        assert_eq!(t.route(&a_b, Some(&"me"))["me"].qos, QoS::AtMostOnce);
    }
}
