//! The subscription trie against the reference matcher: after random subscribe and
//! unsubscribe sequences over filters with `+`, `#`, empty levels and `$` levels, routing
//! any topic gives exactly the clients whose filters `TopicFilter::matches` the topic, each
//! once, at the highest QoS of its matching subscriptions; unsubscribing everything prunes
//! the trie back to its root.

// A failed unwrap in a test is a failed test, with the value in the message.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use proptest::prelude::*;
use tern_broker::core::SubscriptionTrie;
use tern_codec::{QoS, SubscriptionOptions, TopicFilter, TopicName};

fn level() -> impl Strategy<Value = String> {
    prop_oneof![Just("a"), Just("b"), Just("$s"), Just("")].prop_map(String::from)
}

fn filter() -> impl Strategy<Value = TopicFilter> {
    let lvl = prop_oneof![3 => level(), 1 => Just("+".to_string())];
    (proptest::collection::vec(lvl, 0..4), any::<bool>()).prop_filter_map(
        "valid",
        |(mut l, hash)| {
            if hash {
                l.push("#".into());
            }
            TopicFilter::new(l.join("/")).ok()
        },
    )
}

fn topic() -> impl Strategy<Value = TopicName> {
    proptest::collection::vec(level(), 1..5)
        .prop_filter_map("valid", |l| TopicName::new(l.join("/")).ok())
}

#[derive(Debug, Clone)]
enum Op {
    Sub(u8, TopicFilter, u8),
    Unsub(u8, TopicFilter),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..4, filter(), 0u8..3).prop_map(|(c, f, q)| Op::Sub(c, f, q)),
        1 => (0u8..4, filter()).prop_map(|(c, f)| Op::Unsub(c, f)),
    ]
}

fn expected(model: &HashMap<(u8, TopicFilter), QoS>, topic: &TopicName) -> HashMap<u8, QoS> {
    let mut out: HashMap<u8, QoS> = HashMap::new();
    for ((client, f), qos) in model {
        if f.matches(topic) {
            let e = out.entry(*client).or_insert(QoS::AtMostOnce);
            *e = (*e).max(*qos);
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn trie_routes_exactly_like_the_reference_matcher(
        ops in proptest::collection::vec(op(), 1..40),
        topics in proptest::collection::vec(topic(), 1..10),
    ) {
        let mut trie = SubscriptionTrie::new();
        let mut model: HashMap<(u8, TopicFilter), QoS> = HashMap::new();
        for op in ops {
            match op {
                Op::Sub(c, f, q) => {
                    let qos = QoS::from_bits(q).unwrap();
                    let options = SubscriptionOptions { qos, ..Default::default() };
                    let new = trie.subscribe(&f, c, options, None);
                    prop_assert_eq!(new, model.insert((c, f), qos).is_none());
                }
                Op::Unsub(c, f) => {
                    prop_assert_eq!(trie.unsubscribe(&f, &c), model.remove(&(c, f)).is_some());
                }
            }
            prop_assert_eq!(trie.len(), model.len());
            for t in &topics {
                let got: HashMap<u8, QoS> =
                    trie.route(t, None).into_iter().map(|(k, d)| (k, d.qos)).collect();
                prop_assert_eq!(got, expected(&model, t), "topic {}", t);
            }
        }
        for (c, f) in model.keys().cloned().collect::<Vec<_>>() {
            prop_assert!(trie.unsubscribe(&f, &c));
        }
        prop_assert_eq!((trie.len(), trie.node_count()), (0, 1));
    }
}
