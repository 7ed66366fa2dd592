//! MQTT topics and filters as NATS subjects, the mapping nats-server's own MQTT gateway
//! uses, so a NATS application reads and writes the same data as MQTT clients of a Tern
//! cluster (and of nats-server's gateway):
//!
//! - `/` between two levels becomes `.` (`a/b` is `a.b`);
//! - an empty level keeps a `/` next to the `.` that separates it: a leading `/` is `/.`,
//!   a `/` followed by another or at the end is `./` (`/a` is `/.a`, `a//b` is `a./.b`,
//!   `a/` is `a./`);
//! - `.` inside a level becomes `//` (`v1.2/x` is `v1//2.x`);
//! - in filters `+` becomes `*` and `#` becomes `>`; a filter ending in `/#` also matches
//!   its parent level in MQTT, which `>` does not in NATS, so it stands for two subjects
//!   (`a/#` is `a.>` and `a`);
//! - whitespace and DEL have no subject: such topics do not cross the cluster.
//!
//! Sans-IO: strings in, strings out.

/// A topic or filter that has no NATS subject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// Whitespace or DEL, which NATS subjects cannot hold.
    #[error("'{0}' holds whitespace or DEL, which a NATS subject cannot")]
    Unsupported(String),
    /// A wildcard in a topic name.
    #[error("'{0}' holds a wildcard, which a topic name cannot")]
    Wildcard(String),
}

/// The subject of the topic name `topic` (a PUBLISH).
///
/// ```
/// use tern_cluster::subject::topic_to_subject;
/// assert_eq!(topic_to_subject("sensors/t1").unwrap(), "sensors.t1");
/// assert_eq!(topic_to_subject("/a//b/").unwrap(), "/.a./.b./");
/// assert_eq!(topic_to_subject("v1.2/x").unwrap(), "v1//2.x");
/// assert!(topic_to_subject("a b").is_err());
/// ```
pub fn topic_to_subject(topic: &str) -> Result<String, SubjectError> {
    convert(topic, false)
}

/// The subjects of the topic filter `filter` (a SUBSCRIBE): one, or two for a filter
/// ending in `/#` (the parent level too).
///
/// ```
/// use tern_cluster::subject::filter_to_subjects;
/// assert_eq!(filter_to_subjects("a/+/c").unwrap(), ["a.*.c"]);
/// assert_eq!(filter_to_subjects("a/#").unwrap(), ["a.>", "a"]);
/// assert_eq!(filter_to_subjects("#").unwrap(), [">"]);
/// ```
pub fn filter_to_subjects(filter: &str) -> Result<Vec<String>, SubjectError> {
    let s = convert(filter, true)?;
    if s.len() >= 3 && s.ends_with(".>") {
        let parent = s[..s.len() - 2].to_string();
        return Ok(vec![s, parent]);
    }
    Ok(vec![s])
}

fn convert(mt: &str, wildcards: bool) -> Result<String, SubjectError> {
    if !tern_codec::fits_nats_subject(mt) {
        return Err(SubjectError::Unsupported(mt.to_string()));
    }
    let b = mt.as_bytes();
    let mut res: Vec<u8> = Vec::with_capacity(b.len() + 4);
    let end = b.len().saturating_sub(1);
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'/' => {
                if i == 0 || res.last() == Some(&b'.') {
                    res.extend_from_slice(b"/.");
                } else if i == end || b.get(i + 1) == Some(&b'/') {
                    res.extend_from_slice(b"./");
                } else {
                    res.push(b'.');
                }
            }
            b'.' => res.extend_from_slice(b"//"),
            b'+' | b'#' => {
                if !wildcards {
                    return Err(SubjectError::Wildcard(mt.to_string()));
                }
                res.push(if c == b'+' { b'*' } else { b'>' });
            }
            _ => res.push(c),
        }
    }
    if res.last() == Some(&b'.') {
        res.push(b'/');
    }
    // Only ASCII bytes were replaced by ASCII: still UTF-8.
    String::from_utf8(res).map_err(|_| SubjectError::Unsupported(mt.to_string()))
}

/// The topic name of the subject `subject` (a message from NATS): the reverse of
/// [`topic_to_subject`].
///
/// ```
/// use tern_cluster::subject::subject_to_topic;
/// assert_eq!(subject_to_topic("sensors.t1"), "sensors/t1");
/// assert_eq!(subject_to_topic("/.a./.b./"), "/a//b/");
/// assert_eq!(subject_to_topic("v1//2.x"), "v1.2/x");
/// ```
pub fn subject_to_topic(subject: &str) -> String {
    let b = subject.as_bytes();
    let mut topic: Vec<u8> = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' => {
                match b.get(i + 1) {
                    Some(b'.') => {
                        topic.push(b'/');
                        i += 1;
                    }
                    Some(b'/') => {
                        topic.push(b'.');
                        i += 1;
                    }
                    // A lone `/` is not something the mapping writes.
                    _ => {}
                }
            }
            b'.' => topic.push(b'/'),
            c => topic.push(c),
        }
        i += 1;
    }
    String::from_utf8(topic).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn topics_go_to_subjects_and_back() {
        for (topic, subject) in [
            ("a", "a"),
            ("a/b/c", "a.b.c"),
            ("/a", "/.a"),
            ("a/", "a./"),
            ("/", "/./"),
            ("//", "/././"),
            ("a//b", "a./.b"),
            ("a///b", "a././.b"),
            ("v1.2/x", "v1//2.x"),
            ("a./b", "a//.b"),
            ("$SYS/x", "$SYS.x"),
            ("é/ü", "é.ü"),
        ] {
            assert_eq!(topic_to_subject(topic).unwrap(), subject, "{topic}");
            assert_eq!(subject_to_topic(subject), topic, "{subject}");
        }
    }

    #[test]
    fn filters_and_what_has_no_subject() {
        assert_eq!(filter_to_subjects("a/+/#").unwrap(), ["a.*.>", "a.*"]);
        assert_eq!(filter_to_subjects("+").unwrap(), ["*"]);
        assert_eq!(filter_to_subjects("/#").unwrap(), ["/.>", "/"]);
        assert_eq!(
            topic_to_subject("a/+"),
            Err(SubjectError::Wildcard("a/+".into()))
        );
        for bad in ["a b", "a\tb", "a\u{7f}"] {
            assert!(topic_to_subject(bad).is_err(), "{bad:?}");
        }
    }
}
