//! [`ByteKey`]: the owned key of a byte-string map-side combine, kept inline when short.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

/// Bytes a key holds inline, in the key itself: most words and identifiers fit.
const INLINE: usize = 22;

/// A byte string as a map key: up to 22 bytes inline (no allocation, and a lookup that hits
/// compares bytes in the map's own slot instead of following a pointer to them), longer ones
/// boxed. 24 bytes either way.
///
/// `flat_map_count_by_value` and `flat_map_reduce_by_key` with `[u8]` keys produce it. It
/// hashes, compares and orders exactly as the `[u8]` it holds (so a map of `ByteKey` is looked up
/// by `&[u8]`) and dereferences to `[u8]`. Two keys are the same when their bytes are: a Latin-1
/// `caf\xe9` and `caf\xe8` stay two keys (converting them to `String` would merge them). It
/// serializes as a string when it is UTF-8 and as bytes when not, so JSON state snapshots of text
/// stay as small as with `String` keys; it displays as UTF-8 with each invalid byte as `\xNN`.
///
/// ```
/// use sluice_operators::ByteKey;
///
/// let short = ByteKey::from(&b"word"[..]);
/// let long = ByteKey::from(&b"a key longer than twenty-two bytes"[..]);
/// assert_eq!(&*short, b"word");
/// assert_eq!(long.len(), 34);
/// assert!(short > long, "ordered as the bytes are");
/// assert_eq!(format!("{short:?}"), r#"b"word""#);
/// assert_eq!(ByteKey::from(&b"caf\xe9"[..]).to_string(), "caf\\xE9");
/// ```
#[derive(Clone)]
pub struct ByteKey(Repr);

#[derive(Clone)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<[u8]>),
}

impl ByteKey {
    /// The key's bytes.
    #[must_use]
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Repr::Heap(bytes) => bytes,
        }
    }
}

impl From<&[u8]> for ByteKey {
    #[inline]
    fn from(key: &[u8]) -> Self {
        if key.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..key.len()].copy_from_slice(key);
            // At most INLINE (22): fits a u8.
            #[allow(clippy::cast_possible_truncation)]
            let len = key.len() as u8;
            ByteKey(Repr::Inline { len, bytes })
        } else {
            ByteKey(Repr::Heap(key.into()))
        }
    }
}

impl Deref for ByteKey {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl AsRef<[u8]> for ByteKey {
    #[inline]
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl Borrow<[u8]> for ByteKey {
    #[inline]
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl Hash for ByteKey {
    /// As the `[u8]` it holds: `Borrow<[u8]>` requires it.
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl PartialEq for ByteKey {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for ByteKey {}

impl PartialOrd for ByteKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByteKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl fmt::Debug for ByteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b\"{}\"", self.as_bytes().escape_ascii())
    }
}

impl fmt::Display for ByteKey {
    /// UTF-8 as it is; each byte of an invalid sequence as `\xNN`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chunk in self.as_bytes().utf8_chunks() {
            f.write_str(chunk.valid())?;
            for b in chunk.invalid() {
                write!(f, "\\x{b:02X}")?;
            }
        }
        Ok(())
    }
}

impl serde::Serialize for ByteKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(self.as_bytes()) {
            Ok(text) => serializer.serialize_str(text),
            Err(_) => serializer.serialize_bytes(self.as_bytes()),
        }
    }
}

impl<'de> serde::Deserialize<'de> for ByteKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ByteKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key as a string or as bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<ByteKey, E> {
                Ok(ByteKey::from(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteKey, E> {
                Ok(ByteKey::from(v.as_bytes()))
            }
            // serde_json writes bytes as an array of numbers.
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<ByteKey, A::Error> {
                let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(b) = seq.next_element::<u8>()? {
                    bytes.push(b);
                }
                Ok(ByteKey::from(&bytes[..]))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::hash::BuildHasher;

    use proptest::prelude::*;
    use rustc_hash::FxBuildHasher;

    use super::*;

    #[test]
    fn a_key_is_24_bytes() {
        assert_eq!(std::mem::size_of::<ByteKey>(), 24);
    }

    proptest! {
        /// Inline or boxed, a key is its bytes: same hash, order, equality and round trip.
        #[test]
        fn a_key_behaves_as_its_bytes(a in prop::collection::vec(any::<u8>(), 0..40), b in prop::collection::vec(any::<u8>(), 0..40)) {
            let (ka, kb) = (ByteKey::from(&a[..]), ByteKey::from(&b[..]));
            prop_assert_eq!(&*ka, &a[..]);
            prop_assert_eq!(FxBuildHasher.hash_one(&ka), FxBuildHasher.hash_one(&a[..]));
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(ka == kb, a == b);
            let json = serde_json::to_string(&ka).unwrap();
            prop_assert_eq!(serde_json::from_str::<ByteKey>(&json).unwrap(), ka.clone());
            let mut map = HashMap::new();
            map.insert(ka, 1);
            prop_assert_eq!(map.get(&a[..]), Some(&1));
        }
    }
}
