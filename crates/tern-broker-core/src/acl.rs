//! Who may publish, subscribe to and receive what: an ACL file in Mosquitto's format, with
//! a `subscribe` permission of its own.
//!
//! ```text
//! # Lines before the first `user` apply to clients without a username.
//! topic read public/#
//! # Every client, by pattern: %c is its client id, %u its username.
//! pattern readwrite devices/%c/#
//! pattern read users/%u/inbox
//!
//! user alice
//! topic readwrite alice/#
//! topic deny alice/secret/#
//! topic subscribe,write chat/#
//! ```
//!
//! Permissions: `read` (receive and subscribe, as in Mosquitto), `receive`, `subscribe`,
//! `write` (publish), `readwrite` (all three), or a comma-separated list of them; `deny`
//! takes every permission away and wins over any grant. Rules are MQTT topic filters (`+`,
//! `#`). Nothing is allowed unless a rule grants it. A subscription is allowed when a
//! `subscribe` rule covers its whole filter and no `deny` rule does; each message is then
//! checked for `receive` when it would be delivered. A `%c`/`%u` rule does not apply to a
//! client whose id or username contains `/`, `+` or `#` (or, for `%u`, that has none).
//!
//! Parsing and checking only: reading the file is the server's (`tern_broker::acl::load`).

use tern_codec::{TopicFilter, TopicName};

/// One permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Having a message delivered.
    Receive = 1,
    /// Publishing.
    Write = 2,
    /// Subscribing with a filter.
    Subscribe = 4,
}

const DENY: u8 = 0;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    /// Bits of [`Permission`]; `DENY` for a deny rule.
    grants: u8,
    filter: String,
    /// Whether `%c` / `%u` are substituted.
    pattern: bool,
    /// A `topic` rule's filter, made once (a pattern is matched with its substitutions
    /// on the fly: checking a message allocates nothing).
    parsed: Option<TopicFilter>,
}

/// A parsed ACL file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    /// For clients without a username.
    anonymous: Vec<Rule>,
    /// Per username.
    users: std::collections::HashMap<String, Vec<Rule>>,
    /// For every client.
    patterns: Vec<Rule>,
}

impl Acl {
    /// Parses the text of an ACL file.
    pub fn parse(text: &str) -> Result<Acl, String> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (n, line) in text.lines().enumerate() {
            let at = |e: String| format!("line {}: {e}", n + 1);
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (keyword, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let rest = rest.trim();
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err(at("`user` needs a username".into()));
                    }
                    acl.users.entry(rest.to_string()).or_default();
                    user = Some(rest.to_string());
                }
                "topic" | "pattern" => {
                    let rule = rule(rest, keyword == "pattern").map_err(at)?;
                    match (keyword, &user) {
                        ("pattern", _) => acl.patterns.push(rule),
                        (_, Some(u)) => acl.users.entry(u.clone()).or_default().push(rule),
                        (_, None) => acl.anonymous.push(rule),
                    }
                }
                other => {
                    return Err(at(format!(
                        "unknown keyword {other:?} (expected user, topic or pattern)"
                    )));
                }
            }
        }
        Ok(acl)
    }

    /// Whether the client may publish to (`Write`) or receive from (`Receive`) `topic`.
    pub fn allows(
        &self,
        client_id: &str,
        username: Option<&str>,
        permission: Permission,
        topic: &TopicName,
    ) -> bool {
        let own = match username {
            Some(u) => self.users.get(u).map_or(&[][..], Vec::as_slice),
            None => &self.anonymous[..],
        };
        let mut granted = false;
        for rule in own.iter().chain(&self.patterns) {
            let matched = match &rule.parsed {
                Some(filter) => filter.matches(topic),
                None => pattern_matches(&rule.filter, topic.as_str(), client_id, username),
            };
            if !matched {
                continue;
            }
            if rule.grants == DENY {
                return false;
            }
            granted |= rule.grants & permission as u8 != 0;
        }
        granted
    }

    /// Whether the client may subscribe with `filter` (its share name, if any, ignored).
    pub fn allows_subscribe(
        &self,
        client_id: &str,
        username: Option<&str>,
        filter: &TopicFilter,
    ) -> bool {
        let wanted = filter.filter();
        let mut granted = false;
        for (rule, r) in self.rules(client_id, username) {
            if !covers(r.filter(), wanted) {
                continue;
            }
            if rule.grants == DENY {
                return false;
            }
            granted |= rule.grants & Permission::Subscribe as u8 != 0;
        }
        granted
    }

    /// Rules for this client with `%c`/`%u` substituted.
    fn rules<'a>(
        &'a self,
        client_id: &'a str,
        username: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a Rule, TopicFilter)> + 'a {
        let own = match username {
            Some(u) => self.users.get(u).map_or(&[][..], Vec::as_slice),
            None => &self.anonymous[..],
        };
        own.iter().chain(&self.patterns).filter_map(move |rule| {
            if !rule.pattern {
                return Some((rule, TopicFilter::new(rule.filter.clone()).ok()?));
            }
            let safe = |s: &str| !s.contains(['/', '+', '#']);
            let mut f = rule.filter.clone();
            if f.contains("%c") {
                if !safe(client_id) {
                    return None;
                }
                f = f.replace("%c", client_id);
            }
            if f.contains("%u") {
                let u = username.filter(|u| safe(u))?;
                f = f.replace("%u", u);
            }
            Some((rule, TopicFilter::new(f).ok()?))
        })
    }
}

fn rule(text: &str, pattern: bool) -> Result<Rule, String> {
    let (first, rest) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    let (grants, filter) = match permissions(first) {
        Some(g) => (g, rest.trim()),
        // No access keyword: read and write, as in Mosquitto.
        None => (7, text),
    };
    if filter.is_empty() {
        return Err("a rule needs a topic filter".into());
    }
    // Patterns are checked once substituted; the filter must be valid either way.
    TopicFilter::new(filter.replace("%c", "c").replace("%u", "u"))
        .map_err(|e| format!("{filter:?} is not a topic filter: {e}"))?;
    Ok(Rule {
        grants,
        filter: filter.to_string(),
        pattern,
        parsed: if pattern {
            None
        } else {
            TopicFilter::new(filter).ok()
        },
    })
}

/// Whether `topic` matches the pattern `filter` with `%c` standing for `client_id` and
/// `%u` for `username`: what matching the substituted filter gives, without making it.
/// A pattern naming `%c` or `%u` applies only to an id or username free of `/`, `+` and
/// `#` (and `%u` only to a client with a username).
fn pattern_matches(filter: &str, topic: &str, client_id: &str, username: Option<&str>) -> bool {
    let safe = |s: &str| !s.contains(['/', '+', '#']);
    if filter.contains("%c") && !safe(client_id) {
        return false;
    }
    let username = username.filter(|u| safe(u));
    if filter.contains("%u") && username.is_none() {
        return false;
    }
    // Substitutions contain no `/` or wildcard: the levels and wildcards are the filter's.
    tern_codec::matches_with(filter, topic, |f, t| {
        level_matches(f, t, client_id, username)
    })
}

/// Whether the topic level `topic` equals the filter level `level` with `%c` and `%u`
/// replaced.
fn level_matches(level: &str, topic: &str, client_id: &str, username: Option<&str>) -> bool {
    let (mut rest, mut topic) = (level, topic);
    loop {
        let Some(at) = rest.find('%') else {
            return rest == topic;
        };
        let Some(t) = topic.strip_prefix(&rest[..at]) else {
            return false;
        };
        let after = &rest[at..];
        let (stands_for, after) = if let Some(a) = after.strip_prefix("%c") {
            (client_id, a)
        } else if let Some(a) = after.strip_prefix("%u") {
            (username.unwrap_or_default(), a)
        } else {
            ("%", &after[1..])
        };
        let Some(t) = t.strip_prefix(stands_for) else {
            return false;
        };
        (rest, topic) = (after, t);
    }
}

fn permissions(word: &str) -> Option<u8> {
    let mut bits = 0;
    for p in word.split(',') {
        bits |= match p {
            "read" => Permission::Receive as u8 | Permission::Subscribe as u8,
            "receive" => Permission::Receive as u8,
            "subscribe" => Permission::Subscribe as u8,
            "write" => Permission::Write as u8,
            "readwrite" => 7,
            "deny" if word == "deny" => return Some(DENY),
            _ => return None,
        };
    }
    Some(bits)
}

/// Whether every topic matching `filter` also matches `rule`.
fn covers(rule: &str, filter: &str) -> bool {
    // A rule starting with a wildcard does not cover `$` topics [MQTT-4.7.2-1].
    if filter.starts_with('$') && rule.starts_with(['+', '#']) {
        return false;
    }
    let mut r = rule.split('/');
    let mut f = filter.split('/');
    loop {
        match (r.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b && b != "+" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{covers, pattern_matches};
    use proptest::prelude::*;
    use tern_codec::{TopicFilter, TopicName};

    /// What `allows` did before patterns were matched in place: substitute, make the
    /// filter, match.
    fn substituted(filter: &str, topic: &str, client_id: &str, username: Option<&str>) -> bool {
        let safe = |s: &str| !s.contains(['/', '+', '#']);
        let mut f = filter.to_string();
        if f.contains("%c") {
            if !safe(client_id) {
                return false;
            }
            f = f.replace("%c", client_id);
        }
        if f.contains("%u") {
            let Some(u) = username.filter(|u| safe(u)) else {
                return false;
            };
            f = f.replace("%u", u);
        }
        let (Ok(f), Ok(t)) = (TopicFilter::new(f), TopicName::new(topic)) else {
            return false;
        };
        f.matches(&t)
    }

    fn level() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "a", "b", "%c", "%u", "x%cy", "%c%u", "+", "#", "$s", "", "%", "c",
        ])
        .prop_map(String::from)
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            max_global_rejects: 1 << 20,
            ..ProptestConfig::default()
        })]
        #[test]
        fn a_pattern_matches_in_place_as_its_substituted_filter_does(
            f in prop::collection::vec(level(), 1..4),
            t in prop::collection::vec(
                prop::sample::select(vec!["a", "b", "c", "u", "xcy", "cu", "$s", "", "%", "x/y"]),
                1..4,
            ),
            // (An id or username holding `%u` was substituted twice before: not compared.)
            client_id in prop::sample::select(vec!["c", "", "x/y", "c+", "cu"]),
            username in prop::option::of(prop::sample::select(vec!["u", "", "a#", "b"])),
            // Half the topics are the filter itself, substituted (with the ids the other
            // way round half of those), wildcards filled: most of those match.
            from_filter in any::<bool>(),
            swapped in any::<bool>(),
        ) {
            let filter = f.join("/");
            // Only filters the ACL parser accepts.
            prop_assume!(TopicFilter::new(filter.replace("%c", "c").replace("%u", "u")).is_ok());
            let topic = if from_filter {
                let (c, u) = (client_id, username.unwrap_or("nobody"));
                let (c, u) = if swapped { (u, c) } else { (c, u) };
                filter.replace("%c", c).replace("%u", u).replace('+', "p").replace('#', "h/i")
            } else {
                t.join("/")
            };
            // Only topics a message can have.
            prop_assume!(TopicName::new(topic.as_str()).is_ok());
            prop_assert_eq!(
                pattern_matches(&filter, &topic, client_id, username),
                substituted(&filter, &topic, client_id, username),
                "{} on {}", filter, topic
            );
        }
    }

    #[test]
    fn coverage_is_containment_of_topic_sets() {
        assert!(covers("a/#", "a"));
        assert!(covers("a/#", "a/+/b"));
        assert!(covers("a/+", "a/+"));
        assert!(covers("a/+", "a/b"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("#", "$SYS/x"));
        assert!(covers("$SYS/#", "$SYS/x"));
        assert!(!covers("a/b", "a/b/c"));
    }
}
