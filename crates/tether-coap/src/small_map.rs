//! A map for the few entries a CoAP peer has in flight: a vector searched in order.
//!
//! A server holds one message layer per device, and a device has zero to a handful of
//! exchanges open at a time; a `HashMap` costs 48 bytes empty and a few hundred once used,
//! this costs 24 and exactly what it holds. Callers bound what they insert.

/// Keys to values, in insertion order.
#[derive(Debug)]
pub(crate) struct SmallMap<K, V> {
    entries: Vec<(K, V)>,
}

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        Self { entries: Vec::new() }
    }
}

impl<K: PartialEq, V> SmallMap<K, V> {
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn insert(&mut self, key: K, value: V) {
        match self.entries.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => self.entries.push((key, value)),
        }
    }

    pub(crate) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.entries.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub(crate) fn contains_key(&self, key: &K) -> bool {
        self.entries.iter().any(|(k, _)| k == key)
    }

    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        let at = self.entries.iter().position(|(k, _)| k == key)?;
        let (_, value) = self.entries.remove(at);
        self.release_if_empty();
        Some(value)
    }

    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        self.entries.retain_mut(|(k, v)| keep(k, v));
        self.release_if_empty();
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }

    /// An emptied map gives its storage back: idle peers hold none.
    fn release_if_empty(&mut self) {
        if self.entries.is_empty() {
            self.entries = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_a_map() {
        let mut m = SmallMap::default();
        m.insert(1u16, "a");
        m.insert(2, "b");
        m.insert(1, "c");
        assert_eq!(m.len(), 2);
        assert_eq!(m.get_mut(&1).map(|v| *v), Some("c"));
        assert!(m.contains_key(&2) && !m.contains_key(&3));
        m.retain(|k, _| *k != 2);
        assert_eq!(m.values().copied().collect::<Vec<_>>(), vec!["c"]);
        assert_eq!(m.remove(&1), Some("c"));
        assert!(m.len() == 0 && m.remove(&1).is_none());
        assert_eq!(m.entries.capacity(), 0, "an empty map holds no storage");
    }
}
