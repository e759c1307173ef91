//! The state kernel of `update_state_by_key`: one partition's step from the previous states and
//! the batch's new values to the next states. A pure function; the engine runs it in a task and
//! keeps the result only if every partition succeeds.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

use rustc_hash::FxHashMap;

use crate::shuffle::CombineMap;

/// The next states of one partition: `update(key, new values, previous state)` for every key
/// that has a previous state (with its new values, or none) and then for every key that only has
/// new values (previous state `None`); `None` from `update` removes the key. `previous` is not
/// changed, so a failed step can run again from it.
pub fn update_states<K, V, S, H: BuildHasher>(
    previous: Option<&HashMap<K, S, H>>,
    mut new_values: CombineMap<K, Vec<V>>,
    update: &impl Fn(&K, Vec<V>, Option<S>) -> Option<S>,
) -> FxHashMap<K, S>
where
    K: Hash + Eq + Clone,
    S: Clone,
{
    let mut next = FxHashMap::default();
    for (key, state) in previous.into_iter().flatten() {
        let values = new_values.remove(key).unwrap_or_default();
        if let Some(state) = update(key, values, Some(state.clone())) {
            next.insert(key.clone(), state);
        }
    }
    for (key, values) in new_values {
        if let Some(state) = update(&key, values, None) {
            next.insert(key, state);
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use rustc_hash::FxHashMap;

    use super::update_states;
    use crate::shuffle::{CombineMap, Group};

    proptest! {
        /// Running totals that drop a key when its total reaches a multiple of 7, against a
        /// plain reference.
        #[test]
        fn matches_a_reference(previous in prop::collection::btree_map(0u8..20, 1u32..50, 0..10),
                               values in prop::collection::vec((0u8..20, 1u32..5), 0..30)) {
            let update = |_k: &u8, new: Vec<u32>, old: Option<u32>| {
                let total = old.unwrap_or(0) + new.iter().sum::<u32>();
                (!total.is_multiple_of(7)).then_some(total)
            };
            let mut reference: BTreeMap<u8, u32> = BTreeMap::new();
            let mut keys: Vec<u8> = previous.keys().copied().chain(values.iter().map(|(k, _)| *k)).collect();
            keys.sort_unstable();
            keys.dedup();
            for k in keys {
                let new: Vec<u32> = values.iter().filter(|(key, _)| *key == k).map(|(_, v)| *v).collect();
                if let Some(s) = update(&k, new, previous.get(&k).copied()) {
                    reference.insert(k, s);
                }
            }
            let prev: FxHashMap<u8, u32> = previous.into_iter().collect();
            let mut grouped = CombineMap::new();
            for (k, v) in values {
                grouped.add(k, v, &Group::new());
            }
            let next = update_states(Some(&prev), grouped, &update);
            prop_assert_eq!(next.into_iter().collect::<BTreeMap<_, _>>(), reference);
        }
    }

    #[test]
    fn a_key_without_new_values_is_updated_with_none_and_can_be_removed() {
        let prev: FxHashMap<&str, u32> = [("idle", 3), ("kept", 1)].into_iter().collect();
        let next = update_states(Some(&prev), CombineMap::<&str, Vec<u32>>::new(), &|k, new, old| {
            assert!(new.is_empty());
            (*k == "kept").then_some(old.unwrap() + 1)
        });
        assert_eq!(next, [("kept", 2)].into_iter().collect());
    }
}
