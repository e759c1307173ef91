//! Kinesis-style sequence numbers and record positions.
//!
//! A Kinesis sequence number is a decimal string of up to 128 digits; today's are about 56 digits
//! (roughly 2^186), so they do **not** fit in a `u128`. [`SequenceNumber`] keeps the canonical
//! decimal text (no leading zeros) and orders numerically by `(length, bytes)`, which is exact for
//! canonical decimals. Raw string comparison is never used: `"9" > "10"` as strings.
//!
//! A [`Position`] adds the sub-sequence number: the index of a user record inside a KPL aggregated
//! record (0 for plain records). Positions are totally ordered by `(sequence, sub_sequence)`.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The largest number of decimal digits a sequence number may have (the Kinesis API limit).
pub const MAX_SEQUENCE_DIGITS: usize = 128;

/// Why a string is not a valid sequence number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseSequenceNumberError {
    /// The input was empty.
    #[error("sequence number is empty; expected 1 to 128 decimal digits")]
    Empty,
    /// The input contains a character that is not an ASCII digit.
    #[error("sequence number {input:?} contains {found:?} at byte {index}; only decimal digits 0-9 are allowed")]
    NotADigit {
        /// The rejected input (truncated to 160 characters).
        input: String,
        /// The first offending character.
        found: char,
        /// Its byte offset.
        index: usize,
    },
    /// The input has a leading zero (only `"0"` itself may start with `0`).
    #[error("sequence number {input:?} has a leading zero; write it in canonical form without leading zeros")]
    LeadingZero {
        /// The rejected input (truncated to 160 characters).
        input: String,
    },
    /// The input has more than [`MAX_SEQUENCE_DIGITS`] digits.
    #[error("sequence number has {digits} digits; at most 128 are allowed")]
    TooLong {
        /// How many digits the input had.
        digits: usize,
    },
}

fn excerpt(input: &str) -> String {
    input.chars().take(160).collect()
}

/// A canonical decimal sequence number of 1 to 128 digits, ordered numerically.
///
/// Cloning is cheap (the text is shared).
///
/// ```
/// use sluice_blockstore::SequenceNumber;
/// let small: SequenceNumber = "9".parse()?;
/// let big: SequenceNumber = "49590338271490256608559692538361571095921575989136588898".parse()?;
/// assert!(small < big);
/// assert!("007".parse::<SequenceNumber>().is_err());
/// # Ok::<(), sluice_blockstore::ParseSequenceNumberError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SequenceNumber(Arc<str>);

impl SequenceNumber {
    /// Parses a canonical decimal sequence number.
    ///
    /// # Errors
    /// [`ParseSequenceNumberError`] for empty input, a non-digit, a leading zero or more than
    /// 128 digits.
    pub fn parse(input: &str) -> Result<Self, ParseSequenceNumberError> {
        validate(input)?;
        Ok(Self(Arc::from(input)))
    }

    /// The sequence number of a `u128`, for local logs and tests.
    pub fn from_u128(value: u128) -> Self {
        Self(Arc::from(value.to_string()))
    }

    /// The canonical decimal text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `other` is a clone of this very value (the user records of one aggregate share
    /// their sequence number's allocation): a pointer comparison, where `==` compares digits.
    pub(crate) fn is_clone_of(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The value as a `u128` when it fits (at most 38 digits and in range), else `None`.
    pub fn to_u128(&self) -> Option<u128> {
        self.0.parse().ok()
    }

    /// The next sequence number (`self + 1`).
    ///
    /// # Panics
    /// If `self` is the 128-digit maximum `999…9`, whose successor has 129 digits.
    #[must_use]
    pub fn successor(&self) -> Self {
        let mut digits = self.0.as_bytes().to_vec();
        let mut i = digits.len();
        loop {
            if i == 0 {
                assert!(
                    digits.len() < MAX_SEQUENCE_DIGITS,
                    "sequence number overflow past 128 digits"
                );
                digits.insert(0, b'1');
                break;
            }
            i -= 1;
            if digits[i] == b'9' {
                digits[i] = b'0';
            } else {
                digits[i] += 1;
                break;
            }
        }
        // Only ASCII digits were written.
        Self(Arc::from(String::from_utf8(digits).expect("ascii digits")))
    }
}

/// Whether every byte is an ASCII digit, eight bytes per step (sources parse a 56-digit number
/// per record, so this is on the hot path of every read).
fn all_ascii_digits(bytes: &[u8]) -> bool {
    const HIGH_NIBBLES: u64 = 0xF0F0_F0F0_F0F0_F0F0;
    const ZEROS: u64 = 0x3030_3030_3030_3030;
    const SIXES: u64 = 0x0606_0606_0606_0606;
    let mut chunks = bytes.chunks_exact(8);
    // A byte is a digit iff it is 0x30..=0x3F and adding 6 keeps it below 0x40. When every byte
    // is 0x30..=0x3F, adding 6 to each carries into no neighbour.
    let words_ok = chunks.by_ref().all(|chunk| {
        let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        word & HIGH_NIBBLES == ZEROS && word.wrapping_add(SIXES) & HIGH_NIBBLES == ZEROS
    });
    words_ok && chunks.remainder().iter().all(u8::is_ascii_digit)
}

fn validate(input: &str) -> Result<(), ParseSequenceNumberError> {
    // The common case first (sources parse one number per record): canonical digits, checked
    // eight bytes at a time. Anything else goes the slow way, which names what is wrong.
    let bytes = input.as_bytes();
    if (1..=MAX_SEQUENCE_DIGITS).contains(&bytes.len())
        && (bytes[0] != b'0' || bytes.len() == 1)
        && all_ascii_digits(bytes)
    {
        return Ok(());
    }
    if input.is_empty() {
        return Err(ParseSequenceNumberError::Empty);
    }
    if let Some((index, found)) = input.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        return Err(ParseSequenceNumberError::NotADigit {
            input: excerpt(input),
            found,
            index,
        });
    }
    if input.len() > MAX_SEQUENCE_DIGITS {
        return Err(ParseSequenceNumberError::TooLong { digits: input.len() });
    }
    if input.len() > 1 && input.starts_with('0') {
        return Err(ParseSequenceNumberError::LeadingZero { input: excerpt(input) });
    }
    Ok(())
}

impl Ord for SequenceNumber {
    fn cmp(&self, other: &Self) -> Ordering {
        // Canonical decimals: a longer number is larger; equal lengths compare digit by digit.
        self.0
            .len()
            .cmp(&other.0.len())
            .then_with(|| self.0.as_bytes().cmp(other.0.as_bytes()))
    }
}

impl PartialOrd for SequenceNumber {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl FromStr for SequenceNumber {
    type Err = ParseSequenceNumberError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SequenceNumber({})", self.0)
    }
}

impl Serialize for SequenceNumber {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SequenceNumber {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Where a user record sits in a shard: its sequence number and its index inside a KPL aggregate.
///
/// Plain (non-aggregated) records have `sub_sequence == 0`. Ordered by sequence, then sub-sequence.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    /// The Kinesis (or local log) sequence number of the stored record.
    pub sequence: SequenceNumber,
    /// The index of the user record inside an aggregated record; 0 for plain records.
    #[serde(default)]
    pub sub_sequence: u64,
}

impl Position {
    /// A position with an explicit sub-sequence number.
    pub fn new(sequence: SequenceNumber, sub_sequence: u64) -> Self {
        Self { sequence, sub_sequence }
    }

    /// The position of a plain record (`sub_sequence = 0`).
    pub fn plain(sequence: SequenceNumber) -> Self {
        Self {
            sequence,
            sub_sequence: 0,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.sub_sequence == 0 {
            write!(f, "{}", self.sequence)
        } else {
            write!(f, "{}/{}", self.sequence, self.sub_sequence)
        }
    }
}

impl fmt::Debug for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Position({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_input_with_typed_errors() {
        assert_eq!(SequenceNumber::parse(""), Err(ParseSequenceNumberError::Empty));
        assert!(matches!(
            SequenceNumber::parse("12a"),
            Err(ParseSequenceNumberError::NotADigit {
                found: 'a',
                index: 2,
                ..
            })
        ));
        assert!(matches!(
            SequenceNumber::parse("-1"),
            Err(ParseSequenceNumberError::NotADigit { .. })
        ));
        assert!(matches!(
            SequenceNumber::parse("0012"),
            Err(ParseSequenceNumberError::LeadingZero { .. })
        ));
        assert!(matches!(
            SequenceNumber::parse(&"1".repeat(129)),
            Err(ParseSequenceNumberError::TooLong { digits: 129 })
        ));
        assert!(SequenceNumber::parse("0").is_ok());
        assert!(SequenceNumber::parse(&"9".repeat(128)).is_ok());
    }

    #[test]
    fn word_at_a_time_digit_check_agrees_with_the_byte_check() {
        let digits = b"49590338271490256608559692538361571095921575989136588898".to_vec();
        assert!(all_ascii_digits(&digits));
        for len in [0, 1, 7, 8, 9, 16, 56] {
            for at in 0..len {
                for byte in 0..=255u8 {
                    let mut input = digits[..len].to_vec();
                    input[at] = byte;
                    assert_eq!(
                        all_ascii_digits(&input),
                        input.iter().all(u8::is_ascii_digit),
                        "byte {byte:#x} at {at} of {len}"
                    );
                }
            }
        }
    }

    #[test]
    fn orders_numerically_not_lexically() {
        let nine: SequenceNumber = "9".parse().unwrap();
        let ten: SequenceNumber = "10".parse().unwrap();
        assert!(nine < ten);
        assert!("9" > "10", "raw strings would order these the other way");
    }

    #[test]
    fn successor_carries() {
        let n: SequenceNumber = "199".parse().unwrap();
        assert_eq!(n.successor().as_str(), "200");
        let n: SequenceNumber = "999".parse().unwrap();
        assert_eq!(n.successor().as_str(), "1000");
        assert_eq!(SequenceNumber::from_u128(0).successor().as_str(), "1");
    }

    #[test]
    fn positions_order_by_sequence_then_sub_sequence() {
        let a = Position::new("10".parse().unwrap(), 5);
        let b = Position::new("10".parse().unwrap(), 6);
        let c = Position::plain("11".parse().unwrap());
        assert!(a < b && b < c);
        assert_eq!(b.to_string(), "10/6");
    }

    #[test]
    fn serde_round_trip_and_validation() {
        let p = Position::new("123".parse().unwrap(), 2);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Position>(&json).unwrap(), p);
        assert!(serde_json::from_str::<SequenceNumber>("\"01\"").is_err());
    }
}
