//! Deterministic text for word-count examples, engine tests and benches.
//!
//! [`zipf_lines`] produces lines of about [`TARGET_LINE_BYTES`] bytes of space-separated
//! pseudo-words whose frequencies follow Zipf's law with exponent [`ZIPF_EXPONENT`] (like words in
//! natural text: a few very hot keys, a long tail), which is what stresses a shuffle and a
//! reduce. The generator uses its own [`SplitMix64`] and its own word list ([`vocabulary_word`]),
//! never `rand`, so the output for a given `(lines, vocabulary, seed)` is fixed forever and results
//! can be compared across versions. [`reference_word_count`] is the obviously-correct
//! single-threaded answer to check engines against.

use std::collections::HashMap;

/// The Zipf exponent `s`: the word of rank `k` is drawn with probability proportional to `1/k^s`.
pub const ZIPF_EXPONENT: f64 = 1.0;
/// The most bytes a generated line holds; lines stop at the last word that fits.
pub const TARGET_LINE_BYTES: usize = 100;

const CONSONANTS: &[u8] = b"bdfghjklmnprstvz";
const VOWELS: &[u8] = b"aeiou";

/// The `splitmix64` generator (Steele, Lea, Flood 2014): tiny, fast, and fixed by this crate so
/// generated data never changes with a dependency upgrade. Not for cryptography.
///
/// ```
/// use sluice_operators::bench_data::SplitMix64;
/// let mut a = SplitMix64::new(7);
/// let mut b = SplitMix64::new(7);
/// assert_eq!(a.next_u64(), b.next_u64());
/// ```
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform float in `[0, 1)` (53 random bits).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1_u64 << 53) as f64)
    }
}

/// The pseudo-word of rank `index` (0 is the most frequent): consonant-vowel syllables spelling
/// `index` in base 80, at least two syllables, so distinct indexes give distinct words.
///
/// ```
/// use sluice_operators::bench_data::vocabulary_word;
/// assert_eq!(vocabulary_word(0), "baba");
/// assert_ne!(vocabulary_word(1), vocabulary_word(80));
/// ```
pub fn vocabulary_word(index: usize) -> String {
    let base = CONSONANTS.len() * VOWELS.len();
    let mut word = String::with_capacity(6);
    let mut n = index;
    let mut syllables = 0;
    while n > 0 || syllables < 2 {
        let digit = n % base;
        word.push(char::from(CONSONANTS[digit / VOWELS.len()]));
        word.push(char::from(VOWELS[digit % VOWELS.len()]));
        n /= base;
        syllables += 1;
    }
    word
}

/// `lines` lines of up to [`TARGET_LINE_BYTES`] bytes (typically 95-100) of space-separated words
/// drawn Zipf([`ZIPF_EXPONENT`]) from the first `vocabulary` [`vocabulary_word`]s, fully
/// determined by `seed`.
///
/// A `vocabulary` of 0 is treated as 1.
///
/// ```
/// use sluice_operators::bench_data::zipf_lines;
/// let lines = zipf_lines(10, 1_000, 42);
/// assert_eq!(lines, zipf_lines(10, 1_000, 42));
/// assert!(lines.iter().all(|l| l.len() <= 100));
/// ```
pub fn zipf_lines(lines: usize, vocabulary: usize, seed: u64) -> Vec<String> {
    let vocabulary = vocabulary.max(1);
    let words: Vec<String> = (0..vocabulary).map(vocabulary_word).collect();
    let mut cdf = Vec::with_capacity(vocabulary);
    let mut total = 0.0_f64;
    for rank in 1..=vocabulary {
        total += 1.0 / (rank as f64).powf(ZIPF_EXPONENT);
        cdf.push(total);
    }
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(lines);
    for _ in 0..lines {
        let mut line = String::with_capacity(TARGET_LINE_BYTES);
        loop {
            let target = rng.next_f64() * total;
            let index = cdf.partition_point(|&c| c <= target).min(vocabulary - 1);
            let word = &words[index];
            let needed = if line.is_empty() { word.len() } else { word.len() + 1 };
            if line.len() + needed > TARGET_LINE_BYTES {
                break;
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        out.push(line);
    }
    out
}

/// Word counts of `lines`, split on ASCII whitespace, computed the obvious single-threaded way.
///
/// ```
/// use sluice_operators::bench_data::reference_word_count;
/// let counts = reference_word_count(&["a b".to_owned(), "b".to_owned()]);
/// assert_eq!(counts["b"], 2);
/// ```
pub fn reference_word_count<S: AsRef<str>>(lines: &[S]) -> HashMap<String, u64> {
    let mut counts = HashMap::new();
    for line in lines {
        for word in line.as_ref().split_ascii_whitespace() {
            *counts.entry(word.to_owned()).or_insert(0) += 1;
        }
    }
    counts
}
