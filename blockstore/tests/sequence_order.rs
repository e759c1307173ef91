//! [`SequenceNumber`] orders exactly like the big integers it spells, for 1- to 128-digit values.

use num_bigint::BigUint;
use proptest::prelude::*;
use sluice_blockstore::{MAX_SEQUENCE_DIGITS, SequenceNumber};

/// A canonical decimal of 1 to 128 digits ("0", or no leading zero). Lengths are drawn uniformly,
/// so numbers of equal and of different lengths both come up often.
fn canonical_decimal() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just("0".to_owned()),
        20 => (1..=MAX_SEQUENCE_DIGITS).prop_flat_map(|len| {
            ("[1-9]", proptest::collection::vec("[0-9]", len - 1))
                .prop_map(|(first, rest)| format!("{first}{}", rest.concat()))
        }),
    ]
}

/// Two numbers that share a long common prefix, to exercise digit-by-digit comparison.
fn close_pair() -> impl Strategy<Value = (String, String)> {
    (canonical_decimal(), "[0-9]{0,3}", "[0-9]{0,3}").prop_map(|(base, a, b)| {
        if base == "0" {
            (format!("1{a}"), format!("1{b}"))
        } else {
            let cut = |s: String| s.chars().take(MAX_SEQUENCE_DIGITS).collect::<String>();
            (cut(format!("{base}{a}")), cut(format!("{base}{b}")))
        }
    })
}

fn check(a: &str, b: &str) -> Result<(), TestCaseError> {
    let (sa, sb) = (SequenceNumber::parse(a).unwrap(), SequenceNumber::parse(b).unwrap());
    let (ba, bb) = (a.parse::<BigUint>().unwrap(), b.parse::<BigUint>().unwrap());
    prop_assert_eq!(sa.cmp(&sb), ba.cmp(&bb), "{} vs {}", a, b);
    prop_assert_eq!(sa == sb, ba == bb);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn ordering_matches_big_integers(a in canonical_decimal(), b in canonical_decimal()) {
        check(&a, &b)?;
    }

    #[test]
    fn ordering_matches_for_numbers_with_a_common_prefix((a, b) in close_pair()) {
        check(&a, &b)?;
    }

    #[test]
    fn successor_is_plus_one(a in canonical_decimal()) {
        prop_assume!(a.len() < MAX_SEQUENCE_DIGITS || a.chars().any(|c| c != '9'));
        let next = SequenceNumber::parse(&a).unwrap().successor();
        prop_assert_eq!(next.as_str().parse::<BigUint>().unwrap(), a.parse::<BigUint>().unwrap() + 1_u32);
        prop_assert!(SequenceNumber::parse(&a).unwrap() < next);
    }
}
