//! Topic aliases (5.0 section 3.3.2.3.4): per connection, one table each way. Every
//! connection has both, most never use them: each takes no memory beyond a few words
//! until the first alias is bound.

use std::collections::HashMap;
use std::num::NonZeroU16;

use tern_codec::TopicName;

/// Aliases the peer set for us to resolve, bounded by the Topic Alias Maximum we advertised.
#[derive(Debug, Default)]
pub(crate) struct Inbound {
    maximum: u16,
    /// Topic bound to each alias, indexed by alias - 1 (empty: unbound). It grows to the
    /// highest alias used, which our own maximum bounds.
    topics: Vec<TopicName>,
}

/// Why an inbound alias could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AliasError {
    /// Above the maximum we advertised (0 is rejected by the codec).
    OutOfRange,
    /// An empty topic with an alias nothing was bound to.
    Unknown,
}

impl Inbound {
    pub(crate) fn new(maximum: u16) -> Inbound {
        Inbound {
            maximum,
            topics: Vec::new(),
        }
    }

    /// Binds `alias` to `topic` if the topic is given, or resolves it if not.
    pub(crate) fn resolve(
        &mut self,
        alias: NonZeroU16,
        topic: TopicName,
    ) -> Result<TopicName, AliasError> {
        if alias.get() > self.maximum {
            return Err(AliasError::OutOfRange);
        }
        let slot = usize::from(alias.get() - 1);
        if topic.is_empty() {
            return self
                .topics
                .get(slot)
                .filter(|t| !t.is_empty())
                .cloned()
                .ok_or(AliasError::Unknown);
        }
        if self.topics.len() <= slot {
            self.topics.resize(slot + 1, TopicName::empty());
        }
        self.topics[slot] = topic.clone();
        Ok(topic)
    }
}

/// Aliases we assign for the peer, bounded by the peer's Topic Alias Maximum. Topics are
/// given aliases on first use until the table is full; then the least recently bound alias
/// is rebound, so a steady set of hot topics settles into the table.
#[derive(Debug, Default)]
pub(crate) struct Outbound {
    maximum: u16,
    /// Made at the first binding.
    table: Option<Box<OutboundTable>>,
}

#[derive(Debug, Default)]
struct OutboundTable {
    by_topic: HashMap<TopicName, u16>,
    /// Topic bound to each alias, indexed by alias - 1.
    slots: Vec<TopicName>,
    /// Next slot to rebind once the table is full.
    next_victim: usize,
}

/// How to write a PUBLISH's topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Choice {
    /// No alias: the table is off.
    Plain,
    /// The topic is bound already: send an empty topic and the alias.
    Use(NonZeroU16),
    /// Bind: send the topic and the alias.
    Bind(NonZeroU16),
}

impl Outbound {
    pub(crate) fn new(maximum: u16) -> Outbound {
        Outbound {
            maximum,
            ..Outbound::default()
        }
    }

    /// What to send for `topic`, without changing the table (see [`Outbound::commit`]).
    pub(crate) fn choose(&self, topic: &TopicName) -> Choice {
        if self.maximum == 0 {
            return Choice::Plain;
        }
        let Some(table) = &self.table else {
            return Choice::Bind(NonZeroU16::MIN);
        };
        if let Some(&alias) = table.by_topic.get(topic) {
            return Choice::Use(NonZeroU16::new(alias).unwrap_or(NonZeroU16::MIN));
        }
        let slot = if table.slots.len() < usize::from(self.maximum) {
            table.slots.len()
        } else {
            table.next_victim
        };
        Choice::Bind(NonZeroU16::new(slot as u16 + 1).unwrap_or(NonZeroU16::MIN))
    }

    /// Records a [`Choice::Bind`] once the PUBLISH carrying it is really sent.
    pub(crate) fn commit(&mut self, topic: &TopicName, choice: Choice) {
        let Choice::Bind(alias) = choice else { return };
        let table = self.table.get_or_insert_default();
        let slot = usize::from(alias.get() - 1);
        if slot == table.slots.len() {
            table.slots.push(topic.clone());
        } else {
            let old = std::mem::replace(&mut table.slots[slot], topic.clone());
            table.by_topic.remove(&old);
            table.next_victim = (slot + 1) % table.slots.len();
        }
        table.by_topic.insert(topic.clone(), alias.get());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TopicName {
        TopicName::new(s).unwrap()
    }

    fn nz(n: u16) -> NonZeroU16 {
        NonZeroU16::new(n).unwrap()
    }

    #[test]
    fn outbound_binds_until_full_then_rebinds_least_recently_bound() {
        let mut out = Outbound::new(2);
        for (topic, want) in [("a", Choice::Bind(nz(1))), ("b", Choice::Bind(nz(2)))] {
            let c = out.choose(&t(topic));
            assert_eq!(c, want);
            out.commit(&t(topic), c);
        }
        assert_eq!(out.choose(&t("a")), Choice::Use(nz(1)));
        let c = out.choose(&t("c"));
        assert_eq!(c, Choice::Bind(nz(1)));
        out.commit(&t("c"), c);
        assert_eq!(
            out.choose(&t("a")),
            Choice::Bind(nz(2)),
            "a lost its alias to c"
        );
        assert_eq!(out.choose(&t("c")), Choice::Use(nz(1)));
    }

    #[test]
    fn outbound_is_plain_when_the_peer_takes_no_aliases() {
        assert_eq!(Outbound::new(0).choose(&t("a")), Choice::Plain);
    }

    #[test]
    fn inbound_binds_resolves_and_rejects() {
        let mut inb = Inbound::new(3);
        assert_eq!(inb.resolve(nz(2), t("x/y")), Ok(t("x/y")));
        assert_eq!(inb.resolve(nz(2), TopicName::empty()), Ok(t("x/y")));
        assert_eq!(
            inb.resolve(nz(1), TopicName::empty()),
            Err(AliasError::Unknown)
        );
        assert_eq!(inb.resolve(nz(4), t("z")), Err(AliasError::OutOfRange));
    }
}
