//! CRC-32C on x86-64 CPUs with AVX2 and VPCLMULQDQ but no AVX-512VL (AMD Zen 3 among them):
//! 256-bit carry-less multiplication and the `crc32` instruction side by side. `crc-fast` 1.10
//! folds 256 or 512 bits at a time only with AVX-512VL; without it, it folds 128-bit registers:
//! ~17 GB/s on a 64 KiB frame here, against ~36 GB/s for this module.
//!
//! # Why `unsafe`, and its invariants
//!
//! This is the crate's one `unsafe` module. Two kinds of `unsafe` block, nothing else:
//! - calling [`update`], compiled for AVX2, VPCLMULQDQ, PCLMULQDQ and SSE4.2 (and so for what
//!   the compiler takes them to imply, AVX and SSE4.1 among them), which the baseline x86-64
//!   target does not assume: it is called only after [`cpu`] has seen every one of those
//!   features, the implied ones too, at run time (`is_x86_feature_detected!`, which reads each
//!   from its own CPUID bit, so an emulated CPU may report AVX2 without AVX; its answer cached in
//!   [`CPU`]);
//! - the unaligned vector loads, [`load256`] and [`load128`]: each reads exactly the 32 or 16
//!   bytes of the array reference it is given, so every load stays within the caller's slice.
//!
//! The intrinsics without pointers (carry-less multiply, XOR, `crc32`) are safe to call from
//! functions compiled with their features, and all the slicing is checked (the compiler drops all
//! the checks but one per call, as the chunk and block sizes are constants).
//!
//! # Design
//!
//! A CRC is linear: the message is the XOR of its parts, each multiplied by `x` to the power of
//! the bits after it, modulo the polynomial `P`. Two units compute parts at once:
//! - [`LANES`] (four) 256-bit accumulators, 128 bytes, fold with VPCLMULQDQ: each 128-bit lane is
//!   moved on by the block size (its halves carry-less multiplied by `x^(8·128+31)` and
//!   `x^(8·128−33)` mod `P`, [`fold_by`]) and XOR-ed with the next block. Alone they reach ~24
//!   GB/s here, whether 4, 6 or 8 of them: the multiplier's throughput is the limit, not its
//!   latency;
//! - the `crc32` instruction, on the integer units, idle meanwhile, takes [`STREAMS`] (three)
//!   independent runs of the message at the same time, 8 bytes a step.
//!
//! So the message is cut into chunks of [`CHUNK`] (992) bytes: the first 512 go to the
//! accumulators ([`ROUNDS`] blocks of 128), the next 3 × 160 to the three `crc32` runs, 40 bytes
//! each beside every block. At the end of a chunk, each run's CRC is moved to the 8 bytes after
//! the chunk by one 32 × 32-bit carry-less multiply ([`shift_by`]) and XOR-ed into the next block
//! the accumulators take in; the accumulators skip the runs' 480 bytes with a constant of their
//! own. The constants depend on the chunk's layout only, so all are computed at compile time
//! ([`x_pow_mod`]). At the end, the accumulators are folded into one 128-bit value, which two
//! `crc32` steps reduce, and `crc32` takes the last bytes under 16 too. This layout measured among
//! the best of a dozen tried here (2–5 accumulators beside 3 or 4 runs of 3–7 words, chunks of
//! 2–16 blocks; most within 15 % of each other). Loads are unaligned: aligning the start to 32 bytes
//! first measured no faster.
//!
//! Shorter inputs: under [`SERIAL_BELOW`] (160) bytes, `crc32` alone (the accumulators' set-up
//! and reduction cost more than they save); under [`WIDE_FROM`] (512), one 256-bit accumulator;
//! from 512 on, the four, and the runs join from 1,120 bytes (a chunk and a block after it).
//!
//! # Figures
//!
//! 2026-12-02, the 2-core AMD EPYC (Zen 3) VM, hot in cache, GB/s: the median of 31 rounds of a
//! throwaway program timing both on the same bytes in turn, from a 16-byte aligned start (0) and
//! 3 bytes on.
//!
//! | bytes  | `crc-fast` 1.10 (SSE), start 0 / 3 | this module, start 0 / 3 |
//! |--------|------------------------------------|--------------------------|
//! | 44     | 4.6 / 3.6                          | 5.8 / 5.6                |
//! | 1 KiB  | 10.0 / 9.3                         | 22.6 / 21.9              |
//! | 64 KiB | 16.9 / 16.5                        | 35.8 / 34.5              |
//! | 4 MiB  | 17.5 / 16.9                        | 33.7 / 31.0              |
//!
//! Other runs that hour, with a neighbour's load, were lower for both, by about the same ratios.

#![allow(unsafe_code)]

use std::arch::x86_64::{
    __m128i, __m256i, _mm_clmulepi64_si128, _mm_crc32_u8, _mm_crc32_u16, _mm_crc32_u32, _mm_crc32_u64,
    _mm_cvtsi32_si128, _mm_cvtsi64_si128, _mm_cvtsi128_si64, _mm_extract_epi64, _mm_loadu_si128, _mm_set_epi64x,
    _mm_setzero_si128, _mm_xor_si128, _mm256_castsi256_si128, _mm256_clmulepi64_epi128, _mm256_extracti128_si256,
    _mm256_loadu_si256, _mm256_set_epi64x, _mm256_setzero_si256, _mm256_xor_si256, _mm256_zextsi128_si256,
};
use std::sync::atomic::{AtomicU8, Ordering};

/// CRC-32C of `bytes` (initial value and final XOR `!0`) on a CPU with the features this module
/// needs and without AVX-512VL, or `None`. Measured faster than `crc-fast` on AMD Zen 3 only;
/// Intel CPUs with AVX2 and VPCLMULQDQ but no AVX-512 (Alder Lake and later client cores) take
/// this path too, unmeasured. With AVX-512VL `crc-fast` folds 512 bits at a time (~56 GB/s on a
/// 4 MiB block, `docs/benchmarks.md`, against ~31–34 GB/s for this module on Zen 3; this module
/// is not measured on an AVX-512 CPU).
pub(super) fn crc32c(bytes: &[u8]) -> Option<u32> {
    if cpu() == PREFERRED {
        crc32c_wherever_it_runs(bytes)
    } else {
        None
    }
}

/// [`crc32c`] on any CPU with the features, AVX-512 or not (the tests run it there too), or
/// `None` on one without them.
pub(super) fn crc32c_wherever_it_runs(bytes: &[u8]) -> Option<u32> {
    if cpu() == ABSENT {
        return None;
    }
    // SAFETY: `cpu` has found every feature `update` is compiled with on this CPU.
    Some(!unsafe { update(!0, bytes) })
}

/// [`CPU`] before the first look.
const UNKNOWN: u8 = 0;
/// [`CPU`] when the CPU lacks a feature [`update`] is compiled with.
const ABSENT: u8 = 1;
/// [`CPU`] when it has them all, and no AVX-512VL: [`crc32c`] runs.
const PREFERRED: u8 = 2;
/// [`CPU`] when it has them all and AVX-512VL: `crc-fast` runs.
const AVX512: u8 = 3;

/// What this module found of the CPU's features: one relaxed load on every call after the first
/// (racing first calls all compute and store the same answer).
static CPU: AtomicU8 = AtomicU8::new(UNKNOWN);

fn cpu() -> u8 {
    let known = CPU.load(Ordering::Relaxed);
    if known != UNKNOWN {
        return known;
    }
    let found = if !(is_x86_feature_detected!("avx")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("sse4.1")
        && is_x86_feature_detected!("vpclmulqdq")
        && is_x86_feature_detected!("pclmulqdq")
        && is_x86_feature_detected!("sse4.2"))
    {
        ABSENT
    } else if is_x86_feature_detected!("avx512vl") {
        AVX512
    } else {
        PREFERRED
    };
    CPU.store(found, Ordering::Relaxed);
    found
}

/// 256-bit accumulators of the fold.
const LANES: usize = 4;
/// Bytes the accumulators take in at a time.
const BLOCK: usize = 32 * LANES;
/// Accumulator blocks in a chunk.
const ROUNDS: usize = 4;
/// Independent `crc32` runs beside the accumulators.
const STREAMS: usize = 3;
/// 8-byte words each run takes in a round.
const WORDS: usize = 5;
/// The accumulators' part of a chunk, at its start.
const VECTOR_PART: usize = ROUNDS * BLOCK;
/// One run's part of a chunk; the runs follow the accumulators' part, one after the other.
const STREAM_PART: usize = ROUNDS * WORDS * 8;
/// Bytes of a chunk: 992.
const CHUNK: usize = VECTOR_PART + STREAMS * STREAM_PART;

/// Inputs shorter than this go through `crc32` alone.
const SERIAL_BELOW: usize = 160;
/// Inputs from this length on take [`LANES`] accumulators (and the runs from `BLOCK + CHUNK` bytes
/// on); shorter ones one accumulator.
const WIDE_FROM: usize = 512;

/// The CRC-32C polynomial `P`, bit-reflected (bit 31 is `x^0`, as in the whole module).
const POLY: u32 = 0x82F6_3B78;

/// `x^n mod P`, a bit at a time: for the constants below only, evaluated at compile time (called
/// at run time, it would cost more than the CRC).
const fn x_pow_mod(n: usize) -> u32 {
    let mut acc = 1 << 31;
    let mut i = 0;
    while i < n {
        acc = if acc & 1 == 1 { (acc >> 1) ^ POLY } else { acc >> 1 };
        i += 1;
    }
    acc
}

/// The two constants that move a 128-bit lane `distance` bytes on: its low half (the message's
/// earlier 8 bytes) is carry-less multiplied by the first, its high half by the second, and the
/// two products XOR-ed (the exponents are off by one from `8 · distance ± 32` as the reflected
/// product comes out shifted by a bit).
const fn fold_by(distance: usize) -> (u32, u32) {
    (x_pow_mod(8 * distance + 31), x_pow_mod(8 * distance - 33))
}

/// The constant that moves a CRC (the `crc32` instruction's state) `distance` bytes on: their
/// carry-less product is XOR-ed into the 8 message bytes that end `distance` bytes after the CRC's
/// own bytes.
const fn shift_by(distance: usize) -> u32 {
    x_pow_mod(8 * distance - 33)
}

/// From one accumulator block to the next.
const NEXT_BLOCK: (u32, u32) = fold_by(BLOCK);
/// From the last accumulator block of a chunk to the first of the next, over the runs' bytes.
const NEXT_CHUNK: (u32, u32) = fold_by(BLOCK + STREAMS * STREAM_PART);
/// From one 32-byte register to the next, in the last steps.
const NEXT_LANE: (u32, u32) = fold_by(32);
/// From one 16-byte register to the next, in the last steps.
const NEXT_HALF: (u32, u32) = fold_by(16);
/// From accumulator `i` to the last one, which the others are folded into at the end.
const TO_LAST_LANE: [(u32, u32); LANES - 1] = {
    let mut constants = [(0, 0); LANES - 1];
    let mut i = 0;
    while i < LANES - 1 {
        constants[i] = fold_by(32 * (LANES - 1 - i));
        i += 1;
    }
    constants
};
/// From each run's end to the end of the first 8 bytes after the chunk.
const RUN_TO_NEXT_CHUNK: [u32; STREAMS] = {
    let mut constants = [0; STREAMS];
    let mut i = 0;
    while i < STREAMS {
        constants[i] = shift_by((STREAMS - 1 - i) * STREAM_PART + 8);
        i += 1;
    }
    constants
};

/// The CRC state after `bytes`, given the state `crc` before them.
#[target_feature(enable = "avx2,vpclmulqdq,pclmulqdq,sse4.2")]
fn update(crc: u32, bytes: &[u8]) -> u32 {
    if bytes.len() < SERIAL_BELOW {
        serial(crc, bytes)
    } else if bytes.len() < WIDE_FROM {
        narrow(crc, bytes)
    } else {
        wide(crc, bytes)
    }
}

/// `crc32` alone: 8 bytes at a time, then 4, 2 and 1.
#[target_feature(enable = "sse4.2")]
fn serial(mut crc: u32, bytes: &[u8]) -> u32 {
    let (words, mut rest) = bytes.as_chunks::<8>();
    for word in words {
        crc = _mm_crc32_u64(u64::from(crc), u64::from_le_bytes(*word)) as u32;
    }
    if let Some((four, after)) = rest.split_first_chunk::<4>() {
        crc = _mm_crc32_u32(crc, u32::from_le_bytes(*four));
        rest = after;
    }
    if let Some((two, after)) = rest.split_first_chunk::<2>() {
        crc = _mm_crc32_u16(crc, u16::from_le_bytes(*two));
        rest = after;
    }
    if let Some(&byte) = rest.first() {
        crc = _mm_crc32_u8(crc, byte);
    }
    crc
}

/// One 256-bit accumulator (`bytes` has at least 32).
#[target_feature(enable = "avx2,vpclmulqdq,pclmulqdq,sse4.2")]
fn narrow(crc: u32, bytes: &[u8]) -> u32 {
    let (first, rest) = bytes.split_first_chunk::<32>().expect("at least 32 bytes");
    let acc = _mm256_xor_si256(load256(first), _mm256_zextsi128_si256(_mm_cvtsi32_si128(crc as i32)));
    finish(acc, rest)
}

/// [`LANES`] accumulators, and the `crc32` runs over whole chunks (`bytes` has at least a block).
#[target_feature(enable = "avx2,vpclmulqdq,pclmulqdq,sse4.2")]
fn wide(crc: u32, bytes: &[u8]) -> u32 {
    // At least one block is left after the chunks, to take in the last chunk's runs.
    let chunk_count = (bytes.len() - BLOCK) / CHUNK;
    let (chunked, tail) = bytes.split_at(chunk_count * CHUNK);
    let (chunks, _) = chunked.as_chunks::<CHUNK>();
    let (blocks, rest) = tail.as_chunks::<BLOCK>();
    let (tail_first, blocks) = blocks.split_first().expect("a block after the chunks");

    let next_block = broadcast(NEXT_BLOCK);
    let next_chunk = broadcast(NEXT_CHUNK);
    // What the next block's first 8 bytes are XOR-ed with: the initial state, then the runs' CRCs.
    let mut carry = u64::from(crc);
    let mut x;
    if let Some((first, others)) = chunks.split_first() {
        x = start(chunk_block(first, 0));
        inject(&mut x, carry);
        carry = chunk(&mut x, first, next_block);
        for c in others {
            fold_in(&mut x, next_chunk, chunk_block(c, 0));
            inject(&mut x, carry);
            carry = chunk(&mut x, c, next_block);
        }
        fold_in(&mut x, next_chunk, tail_first);
    } else {
        x = start(tail_first);
    }
    inject(&mut x, carry);
    for block in blocks {
        fold_in(&mut x, next_block, block);
    }

    let mut acc = x[LANES - 1];
    for (lane, constants) in x.iter().zip(TO_LAST_LANE) {
        acc = _mm256_xor_si256(acc, fold256(*lane, broadcast(constants)));
    }
    finish(acc, rest)
}

/// The rest of a chunk whose first block `x` has taken in: the other blocks, and the `crc32` runs
/// beside them. Returns the runs' CRCs moved to the first 8 bytes after the chunk.
#[target_feature(enable = "avx2,vpclmulqdq,pclmulqdq,sse4.2")]
fn chunk(x: &mut [__m256i; LANES], chunk: &[u8; CHUNK], next_block: __m256i) -> u64 {
    let (_, runs) = chunk.split_at(VECTOR_PART);
    let (runs, _) = runs.as_chunks::<STREAM_PART>();
    let mut crcs = [0u32; STREAMS];
    for round in 0..ROUNDS {
        if round > 0 {
            fold_in(x, next_block, chunk_block(chunk, round));
        }
        for word in round * WORDS..(round + 1) * WORDS {
            for (crc, run) in crcs.iter_mut().zip(runs) {
                let bytes = run[8 * word..][..8].try_into().expect("8 bytes");
                *crc = _mm_crc32_u64(u64::from(*crc), u64::from_le_bytes(bytes)) as u32;
            }
        }
    }
    let mut carry = _mm_setzero_si128();
    for (crc, constant) in crcs.into_iter().zip(RUN_TO_NEXT_CHUNK) {
        let product = _mm_clmulepi64_si128(_mm_cvtsi32_si128(crc as i32), _mm_cvtsi32_si128(constant as i32), 0x00);
        carry = _mm_xor_si128(carry, product);
    }
    _mm_cvtsi128_si64(carry) as u64
}

/// Block `round` of a chunk's accumulator part.
fn chunk_block(chunk: &[u8; CHUNK], round: usize) -> &[u8; BLOCK] {
    chunk[round * BLOCK..][..BLOCK]
        .try_into()
        .expect("a block of the chunk")
}

/// The accumulators, loaded with a first block.
#[target_feature(enable = "avx2")]
fn start(block: &[u8; BLOCK]) -> [__m256i; LANES] {
    let mut x = [_mm256_setzero_si256(); LANES];
    for (lane, bytes) in x.iter_mut().zip(block.as_chunks::<32>().0) {
        *lane = load256(bytes);
    }
    x
}

/// The accumulators moved on by `constants` and XOR-ed with `block`.
#[target_feature(enable = "avx2,vpclmulqdq")]
fn fold_in(x: &mut [__m256i; LANES], constants: __m256i, block: &[u8; BLOCK]) {
    for (lane, bytes) in x.iter_mut().zip(block.as_chunks::<32>().0) {
        *lane = _mm256_xor_si256(fold256(*lane, constants), load256(bytes));
    }
}

/// XORs `carry` into the first 8 bytes the accumulators hold.
#[target_feature(enable = "avx2")]
fn inject(x: &mut [__m256i; LANES], carry: u64) {
    x[0] = _mm256_xor_si256(x[0], _mm256_zextsi128_si256(_mm_cvtsi64_si128(carry as i64)));
}

/// One accumulator, `acc`, holding everything before `rest`: takes in `rest` 32 and 16 bytes at a
/// time, reduces to 32 bits with `crc32` and finishes the last bytes with it.
#[target_feature(enable = "avx2,vpclmulqdq,pclmulqdq,sse4.2")]
fn finish(mut acc: __m256i, rest: &[u8]) -> u32 {
    let (lanes, rest) = rest.as_chunks::<32>();
    let next_lane = broadcast(NEXT_LANE);
    for bytes in lanes {
        acc = _mm256_xor_si256(fold256(acc, next_lane), load256(bytes));
    }
    let (low, high) = NEXT_HALF;
    let next_half = _mm_set_epi64x(i64::from(high), i64::from(low));
    let mut v = _mm_xor_si128(
        fold128(_mm256_castsi256_si128(acc), next_half),
        _mm256_extracti128_si256::<1>(acc),
    );
    let (halves, rest) = rest.as_chunks::<16>();
    for bytes in halves {
        v = _mm_xor_si128(fold128(v, next_half), load128(bytes));
    }
    // `crc32` from a zero state over the 16 bytes is their value times x^32 mod P: the state after
    // them.
    let crc = _mm_crc32_u64(0, _mm_cvtsi128_si64(v) as u64);
    let crc = _mm_crc32_u64(crc, _mm_extract_epi64::<1>(v) as u64) as u32;
    serial(crc, rest)
}

/// Both 128-bit lanes of a 256-bit register get the same fold constants.
#[target_feature(enable = "avx")]
fn broadcast((low, high): (u32, u32)) -> __m256i {
    _mm256_set_epi64x(i64::from(high), i64::from(low), i64::from(high), i64::from(low))
}

/// Each 128-bit lane of `x` moved on by the distance of `constants` ([`fold_by`]).
#[target_feature(enable = "avx2,vpclmulqdq")]
fn fold256(x: __m256i, constants: __m256i) -> __m256i {
    _mm256_xor_si256(
        _mm256_clmulepi64_epi128::<0x00>(x, constants),
        _mm256_clmulepi64_epi128::<0x11>(x, constants),
    )
}

/// [`fold256`] for one 128-bit register.
#[target_feature(enable = "sse2,pclmulqdq")]
fn fold128(x: __m128i, constants: __m128i) -> __m128i {
    _mm_xor_si128(
        _mm_clmulepi64_si128::<0x00>(x, constants),
        _mm_clmulepi64_si128::<0x11>(x, constants),
    )
}

/// `bytes` in a 256-bit register.
#[target_feature(enable = "avx")]
fn load256(bytes: &[u8; 32]) -> __m256i {
    // SAFETY: `bytes` is 32 readable bytes, all the load reads; `loadu` needs no alignment.
    unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
}

/// `bytes` in a 128-bit register.
#[target_feature(enable = "sse2")]
fn load128(bytes: &[u8; 16]) -> __m128i {
    // SAFETY: `bytes` is 16 readable bytes, all the load reads; `loadu` needs no alignment.
    unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) }
}

#[cfg(test)]
mod tests {
    use super::{CHUNK, fold_by, shift_by, x_pow_mod};

    #[test]
    fn the_constants_are_the_published_ones() {
        // The fold constants in `crc-fast`'s (and corsix/fast-crc32's) CRC-32C kernels, by distance.
        assert_eq!(fold_by(16), (0xF20C_0DFE, 0x493C_7D27));
        assert_eq!(fold_by(32), (0x3DA6_D0CB, 0xBA4F_C28E));
        assert_eq!(fold_by(48), (0x1C29_1D04, 0xDDC0_152B));
        assert_eq!(fold_by(64), (0x740E_EF02, 0x9E4A_DDF8));
        assert_eq!(fold_by(192), (0xA87A_B8A8, 0xAB7A_FF2A));
        assert_eq!(x_pow_mod(0), 1 << 31);
        assert_eq!(x_pow_mod(32), super::POLY);
        assert_eq!(shift_by(8), x_pow_mod(31));
        assert_eq!(CHUNK, 992);
    }
}
