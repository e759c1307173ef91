//! Window kernels for `reduce_by_key_and_window`: reducing the per-batch results a window spans,
//! and sliding a window by adding the batches that enter it and taking back out, with the inverse
//! function, the batches that leave it. Pure functions over maps; the engine runs them in a task.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

/// Which keys a window keeps (for counts: `|_, c| *c > 0`).
pub type Keep<'a, K, V> = Option<&'a dyn Fn(&K, &V) -> bool>;

/// Folds `pairs` into `window` with `reduce`: a key already in the window becomes
/// `reduce(window value, value)`, a new key takes `value`.
pub fn fold_into<'a, K, V, H: BuildHasher>(
    window: &mut HashMap<K, V, H>,
    pairs: impl IntoIterator<Item = &'a (K, V)>,
    reduce: &impl Fn(V, V) -> V,
) where
    K: Hash + Eq + Clone + 'a,
    V: Clone + 'a,
{
    for (key, value) in pairs {
        match window.get_mut(key) {
            Some(acc) => *acc = reduce(acc.clone(), value.clone()),
            None => {
                window.insert(key.clone(), value.clone());
            }
        }
    }
}

/// Takes `pairs` back out of `window` with `inverse` (which must undo `reduce`:
/// `inverse(reduce(a, b), b) == a`). Keys not in the window are left alone; keys whose value no
/// longer matters are for the caller's filter to drop (for counts: zero).
pub fn take_out<'a, K, V, H: BuildHasher>(
    window: &mut HashMap<K, V, H>,
    pairs: impl IntoIterator<Item = &'a (K, V)>,
    inverse: &impl Fn(V, V) -> V,
) where
    K: Hash + Eq + 'a,
    V: Clone + 'a,
{
    for (key, value) in pairs {
        if let Some(acc) = window.get_mut(key) {
            *acc = inverse(acc.clone(), value.clone());
        }
    }
}

/// A window reduced from the per-batch results (`batches[i]`: the partitions of one batch) it
/// spans; `keep` then drops keys (e.g. zero counts).
pub fn reduce_window<K, V, H>(
    batches: &[&[Vec<(K, V)>]],
    reduce: &impl Fn(V, V) -> V,
    keep: Keep<'_, K, V>,
) -> HashMap<K, V, H>
where
    K: Hash + Eq + Clone,
    V: Clone,
    H: BuildHasher + Default,
{
    let mut window = HashMap::default();
    for parts in batches {
        fold_into(&mut window, parts.iter().flatten(), reduce);
    }
    if let Some(keep) = keep {
        window.retain(|k, v| keep(k, v));
    }
    window
}

/// The next window from the previous one: `previous` plus the batches `entering`, minus the
/// batches `leaving` (each as its partitions); `keep` then drops keys. Equal to
/// [`reduce_window`] over the new window's batches when `inverse` undoes `reduce` and `keep`
/// drops exactly the keys whose value is the identity.
pub fn slide_window<K, V, H>(
    previous: &HashMap<K, V, H>,
    entering: &[&[Vec<(K, V)>]],
    leaving: &[&[Vec<(K, V)>]],
    reduce: &impl Fn(V, V) -> V,
    inverse: &impl Fn(V, V) -> V,
    keep: Keep<'_, K, V>,
) -> HashMap<K, V, H>
where
    K: Hash + Eq + Clone,
    V: Clone,
    H: BuildHasher + Clone,
{
    let mut window = previous.clone();
    for parts in entering {
        fold_into(&mut window, parts.iter().flatten(), reduce);
    }
    for parts in leaving {
        take_out(&mut window, parts.iter().flatten(), inverse);
    }
    if let Some(keep) = keep {
        window.retain(|k, v| keep(k, v));
    }
    window
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rustc_hash::FxHashMap;

    use super::{reduce_window, slide_window};

    /// Per-batch counts: `batches[t]` is batch t's partitions of `(word, count)`.
    fn batches() -> impl Strategy<Value = Vec<Vec<Vec<(u8, i64)>>>> {
        prop::collection::vec(
            prop::collection::vec(prop::collection::vec((0u8..6, 1i64..5), 0..6), 1..3),
            4..12,
        )
    }

    proptest! {
        /// Sliding with the inverse gives the window reduced from scratch, at every step.
        #[test]
        fn sliding_equals_reducing_from_scratch(batches in batches(), length in 1usize..5, slide in 1usize..3) {
            let add = |a: i64, b: i64| a + b;
            let sub = |a: i64, b: i64| a - b;
            let nonzero = |_: &u8, v: &i64| *v != 0;
            let window_at = |end: usize| -> FxHashMap<u8, i64> {
                let spanned: Vec<&[Vec<(u8, i64)>]> =
                    (end.saturating_sub(length - 1)..=end).map(|t| &batches[t][..]).collect();
                reduce_window(&spanned, &add, Some(&nonzero))
            };
            let mut previous = window_at(0);
            let mut end = 0;
            while end + slide < batches.len() {
                let next = end + slide;
                let entering: Vec<&[Vec<(u8, i64)>]> = (end + 1..=next).map(|t| &batches[t][..]).collect();
                let leaving: Vec<&[Vec<(u8, i64)>]> = (end + 1..=next)
                    .filter_map(|t| t.checked_sub(length))
                    .map(|t| &batches[t][..])
                    .collect();
                let slid = slide_window(&previous, &entering, &leaving, &add, &sub, Some(&nonzero));
                prop_assert_eq!(&slid, &window_at(next), "window ending at batch {}", next);
                previous = slid;
                end = next;
            }
        }
    }

    #[test]
    fn keys_not_in_the_window_are_not_taken_out() {
        let previous: FxHashMap<&str, i64> = [("a", 2)].into_iter().collect();
        let leaving = [vec![("b", 1), ("a", 1)]];
        let slid = slide_window(&previous, &[], &[&leaving[..]], &|a, b| a + b, &|a, b| a - b, None);
        assert_eq!(slid, [("a", 1)].into_iter().collect());
    }
}
