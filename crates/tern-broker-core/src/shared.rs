//! Shared subscriptions (`$share/{group}/{filter}`): each matching message goes to ONE
//! member of the group, chosen by a [`SharedStrategy`].
//!
//! A group is keyed by its whole filter string (`$share/g/a/+`), so the same group name on
//! two filters is two groups, as the standard says. Groups are found through their own
//! [`SubscriptionTrie`] on the inner filter; members keep their own options (granted QoS,
//! Retain As Published, Subscription Identifier).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

use tern_codec::{QoS, Str, SubscriptionId, SubscriptionOptions, TopicFilter, TopicName};

use super::SubscriptionTrie;

/// How a group picks the member for a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SharedStrategy {
    /// Members take turns (the default, as in Mosquitto and EMQX).
    #[default]
    RoundRobin,
    /// A member at random (a deterministic generator: the core reads no entropy).
    Random,
    /// The same member while it stays online, then the next one.
    Sticky,
    /// By a hash of the publisher's client id: one publisher's messages go to one member.
    HashClientId,
    /// By a hash of the topic: one topic's messages go to one member.
    HashTopic,
}

/// One member's subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// Its options.
    pub options: SubscriptionOptions,
    /// Its Subscription Identifier.
    pub id: Option<SubscriptionId>,
}

#[derive(Debug, Default)]
struct Group {
    members: BTreeMap<Str, Member>,
    /// Round-robin position: the member after the last one chosen.
    cursor: usize,
    sticky: Option<Str>,
}

/// Every shared subscription.
#[derive(Debug, Default)]
pub struct SharedSubscriptions {
    groups: HashMap<Str, Group>,
    trie: SubscriptionTrie<Str>,
    strategy: SharedStrategy,
    rng: u64,
}

impl SharedSubscriptions {
    /// No groups yet.
    pub fn new(strategy: SharedStrategy) -> SharedSubscriptions {
        SharedSubscriptions {
            strategy,
            rng: 0x9E37_79B9_7F4A_7C15,
            ..Default::default()
        }
    }

    /// Adds or replaces `client` in the group of `filter` (a `$share/...` filter). Returns
    /// true if it is new.
    pub fn subscribe(&mut self, filter: &TopicFilter, client: Str, member: Member) -> bool {
        let key = filter.as_bytestr().clone();
        let group = self.groups.entry(key.clone()).or_insert_with(|| {
            let options = SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                ..Default::default()
            };
            self.trie.subscribe(filter, key, options, None);
            Group::default()
        });
        group.members.insert(client, member).is_none()
    }

    /// Removes `client` from the group of `filter`; the group goes with its last member.
    /// Returns true if it was a member.
    pub fn unsubscribe(&mut self, filter: &TopicFilter, client: &Str) -> bool {
        let key = filter.as_bytestr();
        let Some(group) = self.groups.get_mut(key) else {
            return false;
        };
        let removed = group.members.remove(client).is_some();
        if group.members.is_empty() {
            self.groups.remove(key);
            self.trie.unsubscribe(filter, key);
        }
        removed
    }

    /// The groups whose filter matches `topic`.
    pub fn matching(&self, topic: &TopicName) -> Vec<Str> {
        // Most brokers have no shared groups: routing must not pay a trie walk for them.
        if self.groups.is_empty() {
            return Vec::new();
        }
        let mut keys: Vec<Str> = self.trie.route(topic, None).into_keys().collect();
        keys.sort_unstable();
        keys
    }

    /// The readiness of group `key`'s most ready member; `None` if there is no such group.
    pub fn best(&self, key: &Str, readiness: impl Fn(&Str) -> Readiness) -> Option<Readiness> {
        self.groups.get(key)?.members.keys().map(readiness).max()
    }

    /// Picks the member of group `key` for one message: among the most ready members
    /// (see [`Readiness`]: online before offline, whose persistent sessions get it when
    /// they return; under round robin and random, an online member with room in its window
    /// before one whose window is full, so a slow member is passed over rather than its
    /// queue filled); never `exclude` unless it is the only member. The hash strategies and
    /// sticky only tell online from offline, so a key keeps going to the same member.
    pub fn choose(
        &mut self,
        key: &Str,
        topic: &TopicName,
        publisher: Option<&Str>,
        exclude: Option<&Str>,
        readiness: impl Fn(&Str) -> Readiness,
    ) -> Option<(Str, Member)> {
        let strategy = self.strategy;
        let group = self.groups.get_mut(key)?;
        let by_window = matches!(
            strategy,
            SharedStrategy::RoundRobin | SharedStrategy::Random
        );
        // Each member with its readiness, asked once.
        let members: Vec<(&Str, &Member, Readiness)> = group
            .members
            .iter()
            .map(|(client, member)| {
                let tier = match readiness(client) {
                    Readiness::Busy if !by_window => Readiness::Ready,
                    r => r,
                };
                (client, member, tier)
            })
            .collect();
        let eligible = |i: &usize| Some(members[*i].0) != exclude;
        let best = (0..members.len())
            .filter(eligible)
            .map(|i| members[i].2)
            .max();
        let mut candidates: Vec<usize> = (0..members.len())
            .filter(eligible)
            .filter(|i| Some(members[*i].2) == best)
            .collect();
        if candidates.is_empty() {
            candidates = (0..members.len()).collect();
        }
        let hash = |h: &dyn Fn(&mut std::hash::DefaultHasher)| {
            let mut hasher = std::hash::DefaultHasher::new();
            h(&mut hasher);
            hasher.finish() as usize
        };
        let pick = match strategy {
            SharedStrategy::RoundRobin => None,
            SharedStrategy::Sticky => group
                .sticky
                .as_ref()
                .and_then(|s| candidates.iter().copied().find(|i| members[*i].0 == s)),
            SharedStrategy::Random => {
                // xorshift64
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                Some(candidates[self.rng as usize % candidates.len()])
            }
            SharedStrategy::HashClientId => {
                let h = hash(&|s| publisher.map(Str::as_ref).unwrap_or("").hash(s));
                Some(candidates[h % candidates.len()])
            }
            SharedStrategy::HashTopic => {
                let h = hash(&|s| topic.as_str().hash(s));
                Some(candidates[h % candidates.len()])
            }
        };
        // Round robin (and sticky's first choice): the first candidate at or after the
        // cursor, wrapping.
        let i = pick.unwrap_or_else(|| {
            candidates
                .iter()
                .copied()
                .find(|i| *i >= group.cursor)
                .unwrap_or(candidates[0])
        });
        group.cursor = i + 1;
        let (client, member) = (members[i].0.clone(), *members[i].1);
        if strategy == SharedStrategy::Sticky {
            group.sticky = Some(client.clone());
        }
        Some((client, member))
    }
}

/// How ready a shared subscription's member is to take a message now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Readiness {
    /// Cluster: its session was given to another node (it moves there): taken only when
    /// no other member can, and then held for the cluster ([`crate::Broker`] hands it on).
    Given,
    /// Its queue is full (offline, or online behind a full window): passed over while any
    /// other member can take the message.
    Full,
    /// Its session is offline (persistent: the message waits for its return).
    Offline,
    /// Online, but its window of QoS 1/2 messages in flight is full: the message would wait.
    Busy,
    /// Online with room in its window.
    Ready,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(strategy: SharedStrategy, members: &[&str]) -> (SharedSubscriptions, Str) {
        let mut s = SharedSubscriptions::new(strategy);
        let f = TopicFilter::new("$share/g/t/+").unwrap();
        for m in members {
            s.subscribe(
                &f,
                Str::from(*m),
                Member {
                    options: SubscriptionOptions::default(),
                    id: None,
                },
            );
        }
        (s, f.as_bytestr().clone())
    }

    fn picks(s: &mut SharedSubscriptions, key: &Str, topic: &str, n: usize) -> Vec<String> {
        picks_with(s, key, topic, n, |_| Readiness::Ready)
    }

    fn picks_with(
        s: &mut SharedSubscriptions,
        key: &Str,
        topic: &str,
        n: usize,
        readiness: impl Fn(&Str) -> Readiness + Copy,
    ) -> Vec<String> {
        let t = TopicName::new(topic).unwrap();
        (0..n)
            .map(|_| {
                s.choose(key, &t, None, None, readiness)
                    .unwrap()
                    .0
                    .to_string()
            })
            .collect()
    }

    /// `member` is `it`, every other member `rest`.
    fn one(member: &str, it: Readiness, rest: Readiness) -> impl Fn(&Str) -> Readiness + Copy {
        move |m: &Str| if m == member { it } else { rest }
    }

    #[test]
    fn round_robin_takes_turns() {
        let (mut s, key) = setup(SharedStrategy::RoundRobin, &["a", "b", "c"]);
        assert_eq!(picks(&mut s, &key, "t/1", 5), ["a", "b", "c", "a", "b"]);
    }

    #[test]
    fn online_members_are_preferred_and_exclude_is_honoured() {
        let (mut s, key) = setup(SharedStrategy::RoundRobin, &["a", "b", "c"]);
        let t = TopicName::new("t/1").unwrap();
        let only_b = one("b", Readiness::Ready, Readiness::Offline);
        for _ in 0..3 {
            assert_eq!(s.choose(&key, &t, None, None, only_b).unwrap().0, "b");
        }
        let b = Str::from("b");
        let got = s.choose(&key, &t, None, Some(&b), only_b).unwrap().0;
        assert_ne!(got, "b", "an offline member rather than the excluded one");
    }

    #[test]
    fn round_robin_passes_over_a_member_with_a_full_window_and_hash_topic_does_not() {
        use Readiness::{Busy, Offline, Ready};
        let (mut s, key) = setup(SharedStrategy::RoundRobin, &["a", "b", "c"]);
        let busy_a = one("a", Busy, Ready);
        assert_eq!(
            picks_with(&mut s, &key, "t/1", 4, busy_a),
            ["b", "c", "b", "c"]
        );
        // Everyone busy: turns as usual.
        assert_eq!(
            picks_with(&mut s, &key, "t/1", 3, |_| Busy),
            ["a", "b", "c"]
        );
        // A busy member is still online: preferred to an offline one.
        let a_busy_rest_offline = one("a", Busy, Offline);
        assert_eq!(
            picks_with(&mut s, &key, "t/1", 1, a_busy_rest_offline),
            ["a"]
        );
        // Hash by topic keeps the topic's member, busy or not.
        let (mut s, key) = setup(SharedStrategy::HashTopic, &["a", "b", "c"]);
        let home = picks(&mut s, &key, "t/1", 1).remove(0);
        let home_busy = one(&home, Busy, Ready);
        assert_eq!(
            picks_with(&mut s, &key, "t/1", 1, home_busy),
            std::slice::from_ref(&home)
        );
    }

    #[test]
    fn hash_topic_and_sticky_keep_choosing_the_same_member() {
        let (mut s, key) = setup(SharedStrategy::HashTopic, &["a", "b", "c"]);
        let first = picks(&mut s, &key, "t/x", 4);
        assert!(first.iter().all(|m| *m == first[0]));
        let (mut s, key) = setup(SharedStrategy::Sticky, &["a", "b", "c"]);
        assert_eq!(picks(&mut s, &key, "t/1", 3), ["a", "a", "a"]);
    }

    #[test]
    fn random_spreads_over_the_members() {
        let (mut s, key) = setup(SharedStrategy::Random, &["a", "b", "c"]);
        let got = picks(&mut s, &key, "t/1", 60);
        for m in ["a", "b", "c"] {
            assert!(got.iter().any(|g| g == m), "{m} never chosen");
        }
    }

    #[test]
    fn the_group_goes_with_its_last_member_and_matching_finds_it() {
        let (mut s, key) = setup(SharedStrategy::RoundRobin, &["a"]);
        let t = TopicName::new("t/1").unwrap();
        assert_eq!(s.matching(&t), [key]);
        let f = TopicFilter::new("$share/g/t/+").unwrap();
        assert!(s.unsubscribe(&f, &Str::from("a")));
        assert!(s.matching(&t).is_empty());
    }
}
