//! Maps keyed by packet id: outbound flows in flight, inbound QoS 2 ids, QoS 1
//! acknowledgements the application holds.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use tern_codec::PacketId;

/// A map keyed by packet id: hashed (a B-tree walked and shifted its nodes on every insert
/// and remove, a quarter of a QoS 1 round trip), made on the first insert (a session that
/// never carries QoS 1/2 pays one pointer, where an empty map costs 32 bytes), then kept as
/// it empties, so low-rate traffic going from 0 to 1 entry and back allocates nothing. A
/// table that emptied after a burst shrinks back. Order is never taken from the map:
/// inflight flows carry their send order, and the getters sort.
#[derive(Debug, Clone)]
pub(crate) struct IdMap<V>(Option<Box<Table<V>>>);

type Table<V> = HashMap<PacketId, V, BuildHasherDefault<IdHasher>>;

/// Tables at most this large are kept whatever their fill; larger ones shrink once an
/// eighth full (a burst of 65,535 flows would otherwise hold megabytes for the session's
/// life).
const KEEP: usize = 16;

impl<V> Default for IdMap<V> {
    fn default() -> Self {
        IdMap(None)
    }
}

impl<V> IdMap<V> {
    pub(crate) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |t| t.len())
    }

    pub(crate) fn get(&self, id: &PacketId) -> Option<&V> {
        self.0.as_ref()?.get(id)
    }

    pub(crate) fn get_mut(&mut self, id: &PacketId) -> Option<&mut V> {
        self.0.as_mut()?.get_mut(id)
    }

    pub(crate) fn contains_key(&self, id: &PacketId) -> bool {
        self.get(id).is_some()
    }

    pub(crate) fn insert(&mut self, id: PacketId, value: V) -> Option<V> {
        self.0.get_or_insert_with(Box::default).insert(id, value)
    }

    pub(crate) fn remove(&mut self, id: &PacketId) -> Option<V> {
        let table = self.0.as_mut()?;
        let value = table.remove(id)?;
        if table.capacity() > KEEP && table.len() < table.capacity() / 8 {
            table.shrink_to(KEEP.max(table.len() * 2));
        }
        Some(value)
    }

    /// In no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&PacketId, &V)> {
        self.0.iter().flat_map(|t| t.iter())
    }

    /// In no particular order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }
}

impl<V> Extend<(PacketId, V)> for IdMap<V> {
    fn extend<I: IntoIterator<Item = (PacketId, V)>>(&mut self, items: I) {
        for (id, value) in items {
            self.insert(id, value);
        }
    }
}

/// Equal when they hold the same entries (no table and an empty one are the same).
impl<V: PartialEq> PartialEq for IdMap<V> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(id, v)| other.get(id) == Some(v))
    }
}

impl<V: Eq> Eq for IdMap<V> {}

/// Packet ids are chosen by this side (outbound) or are at most Receive Maximum many
/// (inbound), so a keyed hash buys nothing: one multiplication spreads them.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u16(u16::from(b));
        }
    }

    fn write_u16(&mut self, id: u16) {
        self.0 = (self.0 ^ u64::from(id)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u16) -> PacketId {
        PacketId::new(n).expect("non-zero")
    }

    #[test]
    fn a_map_emptied_after_a_burst_gives_its_table_back_and_a_small_one_keeps_it() {
        let mut m = IdMap::default();
        assert!(m.0.is_none(), "no table before the first insert");
        for n in 1..=10_000 {
            m.insert(id(n), n);
        }
        for n in 1..=10_000 {
            assert_eq!(m.remove(&id(n)), Some(n));
        }
        let capacity = m.0.as_ref().expect("kept").capacity();
        assert!(
            capacity <= 2 * KEEP,
            "{capacity} slots held after the burst"
        );
        m.insert(id(1), 1);
        m.remove(&id(1));
        assert!(m.0.is_some(), "a small table is kept as it empties");
        assert_eq!(m, IdMap(None), "an empty table equals no table");
    }
}
