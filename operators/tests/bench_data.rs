//! The bench/test data generator is deterministic, sized as documented and Zipf-shaped.

use sluice_operators::bench_data::{SplitMix64, reference_word_count, vocabulary_word, zipf_lines};

/// FNV-1a 64: a hash fixed by its definition, so the pinned value below never depends on std.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[test]
fn splitmix64_matches_reference_values() {
    // First outputs of splitmix64 seeded with 0 (from the reference C implementation).
    let mut rng = SplitMix64::new(0);
    assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
    assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
}

#[test]
fn zipf_lines_are_deterministic_and_pinned() {
    let a = zipf_lines(2_000, 10_000, 42);
    let b = zipf_lines(2_000, 10_000, 42);
    assert_eq!(a, b);
    assert_ne!(a, zipf_lines(2_000, 10_000, 43));
    // A prefix of a longer run is the shorter run.
    assert_eq!(zipf_lines(10, 10_000, 42)[..], a[..10]);
    // Pinned: if this changes, every recorded benchmark and expected output changes with it.
    assert_eq!(a[0], PINNED_FIRST_LINE);
    assert_eq!(fnv1a(a[0].as_bytes()), PINNED_FIRST_LINE_HASH);
}

const PINNED_FIRST_LINE_HASH: u64 = 2_228_448_796_262_773_683;
const PINNED_FIRST_LINE: &str =
    "zedu biba doba gaba baba koku buba sagi gaba zobi boba tuba bube fabe rebu boba beba veba baba zada";

#[test]
fn zipf_lines_are_about_100_bytes() {
    let lines = zipf_lines(5_000, 10_000, 7);
    assert_eq!(lines.len(), 5_000);
    let total: usize = lines.iter().map(String::len).sum();
    let mean = total as f64 / lines.len() as f64;
    assert!(
        lines.iter().all(|l| l.len() <= 100 && l.len() >= 80),
        "line length out of range"
    );
    assert!((93.0..=100.0).contains(&mean), "mean line length {mean}");
    assert!(
        lines
            .iter()
            .all(|l| !l.starts_with(' ') && !l.ends_with(' ') && !l.contains("  "))
    );
}

#[test]
fn word_frequencies_are_zipf_shaped() {
    let lines = zipf_lines(20_000, 1_000, 1);
    let counts = reference_word_count(&lines);
    assert!(counts.len() <= 1_000);
    let top = counts[&vocabulary_word(0)];
    let second = counts[&vocabulary_word(1)];
    let tenth = counts[&vocabulary_word(9)];
    // With s = 1, rank 1 is ~2x rank 2 and ~10x rank 10.
    let ratio2 = top as f64 / second as f64;
    let ratio10 = top as f64 / tenth as f64;
    assert!((1.7..2.3).contains(&ratio2), "rank1/rank2 = {ratio2}");
    assert!((8.0..12.5).contains(&ratio10), "rank1/rank10 = {ratio10}");
}

#[test]
fn reference_count_sums_to_word_total() {
    let lines = zipf_lines(1_000, 500, 3);
    let counts = reference_word_count(&lines);
    let words: usize = lines.iter().map(|l| l.split_ascii_whitespace().count()).sum();
    assert_eq!(counts.values().sum::<u64>(), words as u64);
    let manual = reference_word_count(&["x  y\tx\n".to_owned(), String::new(), "y".to_owned()]);
    assert_eq!(manual.len(), 2);
    assert_eq!(manual["x"], 2);
    assert_eq!(manual["y"], 2);
}

#[test]
fn vocabulary_words_are_distinct() {
    let words: std::collections::HashSet<String> = (0..20_000).map(vocabulary_word).collect();
    assert_eq!(words.len(), 20_000);
}
