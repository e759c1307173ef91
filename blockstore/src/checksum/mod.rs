//! The one checksum every stored byte carries: CRC-32C (Castagnoli), over encoded blocks, the local
//! log's frames, state snapshots and metadata-log records.
//!
//! Two implementations, the same values: the standard CRC-32C (`check` of `"123456789"` is
//! `0xE3069283`), so files written with earlier implementations read back unchanged.
//! - On x86-64 CPUs with AVX2 and VPCLMULQDQ (256-bit carry-less multiplication) but no AVX-512VL
//!   (AMD Zen 3 among them; Intel cores of that kind take it too, unmeasured), `x86`: four 256-bit registers folded with VPCLMULQDQ while the
//!   `crc32` instruction takes three other runs of the bytes at the same time. On the 2026-12-02
//!   machine (AMD EPYC, Zen 3) ~36 GB/s on a 64 KiB frame and 31–34 GB/s on a 4 MiB block, against
//!   ~17 GB/s for `crc-fast`, and faster on 44-byte and 1 KiB inputs too (figures in `x86`'s
//!   docs). It is this crate's one `unsafe` module (SIMD intrinsics and unaligned loads); its
//!   invariants are stated there.
//! - Everywhere else, AVX-512 CPUs included, `crc-fast`, which picks the widest carry-less-multiply
//!   fold the CPU has at run time (PCLMULQDQ beside the `crc32` instruction, AVX-512 VPCLMULQDQ,
//!   or NEON's PMULL): ~56 GB/s on a 4 MiB block on a CPU with AVX-512 VPCLMULQDQ, against
//!   ~27 GB/s for the `crc32` instruction alone (`docs/benchmarks.md`, block codec). `crc-fast`
//!   1.10 takes 256-bit registers only together with AVX-512VL, and folds 128 bits at a time
//!   without it (10–17 GB/s from 1 KiB to 4 MiB on the Zen 3 machine): hence `x86`.

#[cfg(target_arch = "x86_64")]
mod x86;

/// CRC-32C of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if let Some(crc) = x86::crc32c(bytes) {
        return crc;
    }
    portable(bytes)
}

/// CRC-32C by `crc-fast`.
fn portable(bytes: &[u8]) -> u32 {
    // Crc32Iscsi is CRC-32C: its 32-bit result is returned in a u64.
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, bytes) as u32
}

#[cfg(test)]
mod tests {
    use super::{crc32c, portable};

    /// Set (to anything) where the SIMD path must run: [`the_simd_path_agrees`] then fails
    /// instead of checking the fallback. `scripts/test` sets it when `/proc/cpuinfo` lists every
    /// feature the path needs, so run-time detection is checked against the kernel's list.
    const REQUIRE_SIMD: &str = "SLUICE_REQUIRE_SIMD_CRC";

    #[test]
    fn is_the_standard_crc32c() {
        // The catalogue's check value, and RFC 3720's 32 bytes of zeros and of ones (B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        assert_eq!(crc32c(b""), 0);
    }

    /// Every length up to 1,100 (all of `x86`'s short paths and most of its wide one without a
    /// chunk, which runs to 1,119) from eight starts, against the bitwise definition.
    #[test]
    fn every_short_length_from_every_start() {
        let data = sample(1_100 + 8);
        for len in 0..=1_100 {
            for start in 0..8 {
                let bytes = &data[start..start + len];
                assert_eq!(crc32c(bytes), bitwise(bytes), "len {len} from {start}");
            }
        }
    }

    /// Longer inputs, from eight starts: against the bitwise definition up to 64 KiB, against
    /// `crc-fast` (which its own tests check against the definition) beyond.
    #[test]
    fn long_lengths_from_every_start() {
        let data = sample((1 << 20) + 3 + 8);
        for len in [4_095, 4_096, 4_097, 65_535, 65_536, 65_537, (1 << 20) + 3] {
            for start in 0..8 {
                let bytes = &data[start..start + len];
                let expected = if len <= 65_537 { bitwise(bytes) } else { portable(bytes) };
                assert_eq!(crc32c(bytes), expected, "len {len} from {start}");
            }
        }
    }

    /// The SIMD path called directly, every length up to 3,000 (its short paths, its wide one
    /// with no, one and two chunks of 992 bytes) and the long lengths, from eight starts, against
    /// `crc-fast`. On a CPU without its features (or off x86-64) this checks the fallback instead
    /// and says so, unless [`REQUIRE_SIMD`] is set: then it fails.
    #[test]
    fn the_simd_path_agrees() {
        let under_test: fn(&[u8]) -> u32 = if simd(b"").is_some() {
            |bytes| simd(bytes).expect("the features were found before")
        } else {
            assert!(
                std::env::var_os(REQUIRE_SIMD).is_none(),
                "{REQUIRE_SIMD} is set, but the SIMD CRC-32C does not run here: it needs x86-64 with \
                 AVX2, VPCLMULQDQ, PCLMULQDQ and SSE4.2"
            );
            eprintln!("the SIMD CRC-32C does not run on this CPU: checking the fallback");
            crc32c
        };
        let data = sample((1 << 20) + 3 + 8);
        let lengths = (0..=3_000).chain([4_095, 4_096, 4_097, 65_535, 65_536, 65_537, (1 << 20) + 3]);
        for len in lengths {
            for start in 0..8 {
                let bytes = &data[start..start + len];
                assert_eq!(under_test(bytes), portable(bytes), "len {len} from {start}");
            }
        }
        assert_eq!(under_test(b"123456789"), 0xE306_9283);
    }

    /// The SIMD path alone (on AVX-512 CPUs too, where [`crc32c`] leaves the work to `crc-fast`),
    /// or `None` where it cannot run.
    fn simd(bytes: &[u8]) -> Option<u32> {
        #[cfg(target_arch = "x86_64")]
        return super::x86::crc32c_wherever_it_runs(bytes);
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = bytes;
            None
        }
    }

    /// `len` bytes of a multiplicative hash of their index.
    fn sample(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    /// CRC-32C one bit at a time (reflected polynomial 0x82F63B78).
    fn bitwise(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
}
