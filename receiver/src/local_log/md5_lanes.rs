//! MD5 of many short partition keys at once, for [`hash_keys`](super::hash_keys).
//!
//! MD5 is 64 dependent steps per 64-byte block, so one key at a time leaves most of the CPU idle:
//! ~165 ns a key whatever the implementation (`docs/benchmarks.md`, "Append with an MD5 per
//! key"). Partition keys are short, one block each (up to 55 bytes), and the keys of a bulk
//! append are independent: [`LANES`] keys are hashed side by side, each step applied to every
//! lane before the next, which the compiler turns into SIMD over the lanes (2–3.5× the throughput
//! of one key at a time on x86-64's baseline SSE2: 47–76 ns a key against 163–172). Longer keys
//! take the one-at-a-time path.

use md5::{Digest, Md5};

/// Keys hashed side by side. 16 vectorises well; some other counts (8, 12) measured slower than
/// one key at a time, as the compiler then keeps the lanes in scalar registers. 32 measured a
/// little faster still, but a batch that does not fill the lanes hashes empty ones.
const LANES: usize = 16;

/// The longest key that fits one MD5 block with its padding and length.
const ONE_BLOCK: usize = 55;

/// Fewer keys than this are hashed one at a time: the lanes' fixed cost is not worth it.
const MIN_BATCH: usize = 4;

/// Per-step left rotations, a row per round.
#[rustfmt::skip]
const SHIFTS: [u32; 64] = [
    7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22,
    5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14, 20,
    4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23,
    6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
];

/// Per-step constants, `floor(|sin(i + 1)| × 2^32)` (RFC 1321).
#[rustfmt::skip]
const SINES: [u32; 64] = [
    0xd76a_a478, 0xe8c7_b756, 0x2420_70db, 0xc1bd_ceee, 0xf57c_0faf, 0x4787_c62a, 0xa830_4613, 0xfd46_9501,
    0x6980_98d8, 0x8b44_f7af, 0xffff_5bb1, 0x895c_d7be, 0x6b90_1122, 0xfd98_7193, 0xa679_438e, 0x49b4_0821,
    0xf61e_2562, 0xc040_b340, 0x265e_5a51, 0xe9b6_c7aa, 0xd62f_105d, 0x0244_1453, 0xd8a1_e681, 0xe7d3_fbc8,
    0x21e1_cde6, 0xc337_07d6, 0xf4d5_0d87, 0x455a_14ed, 0xa9e3_e905, 0xfcef_a3f8, 0x676f_02d9, 0x8d2a_4c8a,
    0xfffa_3942, 0x8771_f681, 0x6d9d_6122, 0xfde5_380c, 0xa4be_ea44, 0x4bde_cfa9, 0xf6bb_4b60, 0xbebf_bc70,
    0x289b_7ec6, 0xeaa1_27fa, 0xd4ef_3085, 0x0488_1d05, 0xd9d4_d039, 0xe6db_99e5, 0x1fa2_7cf8, 0xc4ac_5665,
    0xf429_2244, 0x432a_ff97, 0xab94_23a7, 0xfc93_a039, 0x655b_59c3, 0x8f0c_cc92, 0xffef_f47d, 0x8584_5dd1,
    0x6fa8_7e4f, 0xfe2c_e6e0, 0xa301_4314, 0x4e08_11a1, 0xf753_7e82, 0xbd3a_f235, 0x2ad7_d2bb, 0xeb86_d391,
];

const INIT: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];

/// Appends to `out` the MD5 of each key, as a big-endian `u128`, in order.
pub(crate) fn md5_of_keys<'k>(keys: impl IntoIterator<Item = &'k [u8]>, out: &mut Vec<u128>) {
    // Keys waiting for a lane, with the index of their digest in `out`.
    let mut lanes: Vec<(usize, &[u8])> = Vec::with_capacity(LANES);
    let flush = |lanes: &mut Vec<(usize, &[u8])>, out: &mut Vec<u128>| {
        if lanes.len() < MIN_BATCH {
            for (at, key) in lanes.drain(..) {
                out[at] = one(key);
            }
            return;
        }
        let mut batch = [&b""[..]; LANES];
        for (lane, (_, key)) in batch.iter_mut().zip(lanes.iter()) {
            *lane = key;
        }
        for ((at, _), digest) in lanes.drain(..).zip(md5_lanes(&batch)) {
            out[at] = digest;
        }
    };
    for key in keys {
        let at = out.len();
        if key.len() > ONE_BLOCK {
            out.push(one(key));
            continue;
        }
        out.push(0);
        lanes.push((at, key));
        if lanes.len() == LANES {
            flush(&mut lanes, out);
        }
    }
    flush(&mut lanes, out);
}

/// MD5 of one key, as a big-endian `u128`.
fn one(key: &[u8]) -> u128 {
    u128::from_be_bytes(Md5::digest(key).into())
}

/// MD5 of [`LANES`] keys of at most [`ONE_BLOCK`] bytes each.
fn md5_lanes(keys: &[&[u8]; LANES]) -> [u128; LANES] {
    // The padded block of every key, word by word: `words[w][lane]`.
    let mut words = [[0u32; LANES]; 16];
    for (lane, key) in keys.iter().enumerate() {
        debug_assert!(key.len() <= ONE_BLOCK);
        let mut block = [0u8; 64];
        block[..key.len()].copy_from_slice(key);
        block[key.len()] = 0x80;
        block[56..].copy_from_slice(&(key.len() as u64 * 8).to_le_bytes());
        for (w, word) in block.chunks_exact(4).enumerate() {
            words[w][lane] = u32::from_le_bytes(word.try_into().expect("4 bytes"));
        }
    }
    let [mut a, mut b, mut c, mut d] = INIT.map(|v| [v; LANES]);
    // One MD5 step on every lane: `f` is the round's function, `g` the step's message word.
    macro_rules! round {
        ($steps:expr, $g:expr, $f:expr) => {
            for i in $steps {
                let (word, shift, sine) = (&words[$g(i)], SHIFTS[i], SINES[i]);
                for l in 0..LANES {
                    let t = a[l]
                        .wrapping_add($f(b[l], c[l], d[l]))
                        .wrapping_add(sine)
                        .wrapping_add(word[l]);
                    (a[l], d[l], c[l]) = (d[l], c[l], b[l]);
                    b[l] = b[l].wrapping_add(t.rotate_left(shift));
                }
            }
        };
    }
    round!(0..16, |i| i, |b: u32, c: u32, d: u32| (b & c) | (!b & d));
    round!(16..32, |i| (5 * i + 1) % 16, |b: u32, c: u32, d: u32| (d & b)
        | (!d & c));
    round!(32..48, |i| (3 * i + 5) % 16, |b: u32, c: u32, d: u32| b ^ c ^ d);
    round!(48..64, |i| (7 * i) % 16, |b: u32, c: u32, d: u32| c ^ (b | !d));
    std::array::from_fn(|l| {
        let mut digest = [0u8; 16];
        for (bytes, (state, init)) in digest
            .chunks_exact_mut(4)
            .zip([a[l], b[l], c[l], d[l]].into_iter().zip(INIT))
        {
            bytes.copy_from_slice(&state.wrapping_add(init).to_le_bytes());
        }
        u128::from_be_bytes(digest)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_hashes_as_md5_in_any_lane_and_batch_size() {
        // Keys of every length up to two blocks (the lanes take those of one block), in batches
        // that fill the lanes, leave some empty, or fall below the batch minimum.
        let keys: Vec<Vec<u8>> = (0..200usize)
            .map(|i| (0..i % 70).map(|j| (i * 31 + j * 7) as u8).collect())
            .collect();
        for batch in [1, 3, 4, 5, 16, 17, 33, 200] {
            for chunk in keys.chunks(batch) {
                let mut out = vec![42];
                md5_of_keys(chunk.iter().map(Vec::as_slice), &mut out);
                assert_eq!(out[0], 42, "appends after what is there");
                let expected: Vec<u128> = chunk.iter().map(|k| one(k)).collect();
                assert_eq!(out[1..], expected, "batch of {batch}");
            }
        }
        // RFC 1321's test suite, through the lanes.
        let suite = ["", "a", "abc", "message digest", "abcdefghijklmnopqrstuvwxyz"];
        let mut out = Vec::new();
        md5_of_keys(suite.iter().map(|k| k.as_bytes()), &mut out);
        assert_eq!(
            out,
            [
                0xd41d_8cd9_8f00_b204_e980_0998_ecf8_427e,
                0x0cc1_75b9_c0f1_b6a8_31c3_99e2_6977_2661,
                0x9001_5098_3cd2_4fb0_d696_3f7d_28e1_7f72,
                0xf96b_697d_7cb7_938d_525a_2f31_aaf1_61d0,
                0xc3fc_d3d7_6192_e400_7dfb_496c_ca67_e13b,
            ]
        );
    }
}
