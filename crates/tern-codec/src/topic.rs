//! Topic names and topic filters (section 4.7) and shared subscriptions (4.8.2), as
//! validated newtypes. [`TopicFilter::matches`] is the simple reference implementation that
//! faster matchers are tested against.

use std::fmt;

use bytes::Bytes;

use crate::error::DecodeError;
use crate::types::Str;
use crate::wire::forbidden_chars;

const SHARE_PREFIX: &str = "$share/";

/// A topic name a message is published to: UTF-8, no U+0000, no wildcards, not empty
/// (except [`TopicName::empty`], which only a PUBLISH carrying a topic alias may use).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(Str);

impl TopicName {
    /// Validates a topic name.
    pub fn new(name: impl Into<Str>) -> Result<TopicName, DecodeError> {
        let name = name.into();
        TopicName::check(&name)?;
        Ok(TopicName(name))
    }

    /// Whether `name` would make a valid topic name, without making one (for a caller that
    /// wants to keep its string when it is refused).
    pub fn check(name: &str) -> Result<(), DecodeError> {
        if name.is_empty() {
            return Err(DecodeError::EmptyTopic);
        }
        forbidden_chars(name.as_bytes(), true)
    }

    /// The empty topic name of an MQTT 5 PUBLISH that relies on a Topic Alias.
    pub fn empty() -> TopicName {
        TopicName(Str::new())
    }

    /// Decodes from raw bytes: one pass for U+0000, surrogates and wildcards, then UTF-8.
    /// An empty name is returned as such; the caller decides whether a topic alias makes it
    /// legal.
    #[inline]
    pub(crate) fn from_wire(bytes: Bytes) -> Result<TopicName, DecodeError> {
        forbidden_chars(&bytes, true)?;
        Str::try_from(bytes)
            .map(TopicName)
            .map_err(|_| DecodeError::InvalidUtf8)
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The underlying shared string.
    pub fn as_bytestr(&self) -> &Str {
        &self.0
    }

    /// True only for [`TopicName::empty`].
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<&str> for TopicName {
    type Error = DecodeError;
    fn try_from(s: &str) -> Result<TopicName, DecodeError> {
        TopicName::new(s)
    }
}

/// A topic filter a client subscribes with: `+` occupies a whole level, `#` is the whole
/// last level. A filter of the form `$share/{group}/{filter}` is a shared subscription;
/// [`TopicFilter::share_group`] and [`TopicFilter::filter`] take it apart.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicFilter {
    full: Str,
    /// Byte offset of the filter proper: 0, or just past `$share/{group}/`.
    inner: usize,
}

impl TopicFilter {
    /// Validates a topic filter, including the shared-subscription form.
    pub fn new(filter: impl Into<Str>) -> Result<TopicFilter, DecodeError> {
        let full = filter.into();
        forbidden_chars(full.as_bytes(), false)?;
        let inner = match full.strip_prefix(SHARE_PREFIX) {
            Some(rest) => {
                let (group, tail) = rest.split_once('/').unwrap_or((rest, ""));
                if group.is_empty() || group.contains(['+', '#']) {
                    return Err(DecodeError::InvalidShareName);
                }
                if tail.is_empty() {
                    return Err(DecodeError::MissingShareFilter);
                }
                SHARE_PREFIX.len() + group.len() + 1
            }
            None => 0,
        };
        validate_filter(&full[inner..])?;
        Ok(TopicFilter { full, inner })
    }

    /// The filter as received, `$share/...` prefix included.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The underlying shared string.
    pub fn as_bytestr(&self) -> &Str {
        &self.full
    }

    /// The filter that topics are matched against (without any `$share/{group}/`).
    pub fn filter(&self) -> &str {
        &self.full[self.inner..]
    }

    /// The share name of a shared subscription.
    pub fn share_group(&self) -> Option<&str> {
        (self.inner > 0).then(|| &self.full[SHARE_PREFIX.len()..self.inner - 1])
    }

    /// True if the filter holds `+` or `#`.
    pub fn has_wildcards(&self) -> bool {
        self.filter().contains(['+', '#'])
    }

    /// Whether `topic` matches this filter (4.7): level by level, `+` matching one level,
    /// `#` the parent level and everything below, and no leading wildcard matching a topic
    /// that starts with `$` [MQTT-4.7.2-1].
    pub fn matches(&self, topic: &TopicName) -> bool {
        matches_with(self.filter(), topic.as_str(), |f, t| f == t)
    }
}

/// Whether `topic` (a topic name or filter) can be a NATS subject: it holds no whitespace
/// and no DEL. A Tern cluster carries only such topics between its nodes.
pub fn fits_nats_subject(topic: &str) -> bool {
    !topic
        .bytes()
        .any(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0c | 0x7f))
}

/// Whether `topic` matches the filter text `filter` as [`TopicFilter::matches`] says, with
/// `level_eq(filter_level, topic_level)` deciding whether a level that is not a wildcard
/// matches (a caller with placeholders in its levels, such as an ACL pattern, substitutes
/// there). The wildcards and the `$` rule are this function's.
pub fn matches_with(filter: &str, topic: &str, level_eq: impl Fn(&str, &str) -> bool) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if level_eq(a, b) => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn validate_filter(filter: &str) -> Result<(), DecodeError> {
    if filter.is_empty() {
        return Err(DecodeError::EmptyTopic);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(DecodeError::MultiLevelWildcardPlacement);
        }
        if level.contains('+') && level != "+" {
            return Err(DecodeError::SingleLevelWildcardPlacement);
        }
    }
    Ok(())
}

impl fmt::Debug for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<&str> for TopicFilter {
    type Error = DecodeError;
    fn try_from(s: &str) -> Result<TopicFilter, DecodeError> {
        TopicFilter::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(filter: &str, topic: &str) -> bool {
        TopicFilter::new(filter)
            .unwrap()
            .matches(&TopicName::new(topic).unwrap())
    }

    #[test]
    fn spec_matching_examples_hold() {
        // Section 4.7.1.2 and 4.7.1.3 examples.
        assert!(m("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(m("sport/tennis/player1/#", "sport/tennis/player1/ranking"));
        assert!(m(
            "sport/tennis/player1/#",
            "sport/tennis/player1/score/wimbledon"
        ));
        assert!(m("sport/#", "sport"));
        assert!(m("#", "sport/tennis"));
        assert!(m("sport/tennis/+", "sport/tennis/player1"));
        assert!(!m("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!m("sport/+", "sport"));
        assert!(m("sport/+", "sport/"));
        assert!(m("+/+", "/finance"));
        assert!(m("/+", "/finance"));
        assert!(!m("+", "/finance"));
        assert!(m("+/tennis/#", "sport/tennis/x"));
    }

    #[test]
    fn leading_wildcards_do_not_match_dollar_topics() {
        assert!(!m("#", "$SYS/broker"));
        assert!(!m("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(m("$SYS/#", "$SYS/monitor/Clients"));
        assert!(m("$SYS/monitor/+", "$SYS/monitor/Clients"));
    }

    #[test]
    fn shared_filters_are_taken_apart() {
        let f = TopicFilter::new("$share/group1/sensors/+/temp").unwrap();
        assert_eq!(f.share_group(), Some("group1"));
        assert_eq!(f.filter(), "sensors/+/temp");
        assert!(f.matches(&TopicName::new("sensors/a/temp").unwrap()));
        assert_eq!(TopicFilter::new("a/b").unwrap().share_group(), None);
        assert_eq!(TopicFilter::new("$share/g/#").unwrap().filter(), "#");
    }

    #[test]
    fn wildcard_placement_rules() {
        for ok in ["#", "+", "a/#", "+/+", "/+/", "a/+/b/#", "$SYS/#", "a//b"] {
            assert!(TopicFilter::new(ok).is_ok(), "{ok}");
        }
        for bad in ["a#", "a/#/b", "#/", "a/b#"] {
            assert_eq!(
                TopicFilter::new(bad),
                Err(DecodeError::MultiLevelWildcardPlacement),
                "{bad}"
            );
        }
        for bad in ["a+", "+a/b", "a/b+/c"] {
            assert_eq!(
                TopicFilter::new(bad),
                Err(DecodeError::SingleLevelWildcardPlacement),
                "{bad}"
            );
        }
    }
}
