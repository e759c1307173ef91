//! The one checksum every stored byte carries: CRC-32C (Castagnoli), over encoded blocks, the local
//! log's frames, state snapshots and metadata-log records.
//!
//! Computed by `crc-fast`, which folds 16–64 bytes at a time with carry-less multiplication
//! (PCLMULQDQ/VPCLMULQDQ, or NEON's PMULL) and picks the widest the CPU has at run time: ~58 GB/s
//! on a 4 MiB block on a CPU with AVX-512 VPCLMULQDQ, against ~27 GB/s for the SSE4.2 `crc32`
//! instruction, and faster on 44-byte frame bodies too (`docs/benchmarks.md`, block codec);
//! without AVX-512 it folds with SSE PCLMULQDQ, 7–10 GB/s on the 2026-12-02 machine. The
//! values are the standard CRC-32C (`check` of `"123456789"` is `0xE3069283`), so files written
//! with the earlier implementation read back unchanged.

/// CRC-32C of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    // Crc32Iscsi is CRC-32C: its 32-bit result is returned in a u64.
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, bytes) as u32
}

#[cfg(test)]
mod tests {
    use super::crc32c;

    #[test]
    fn is_the_standard_crc32c() {
        // The catalogue's check value, and RFC 3720's 32 bytes of zeros and of ones (B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn long_inputs_fold_like_short_ones() {
        // Lengths around the SIMD paths' block sizes, and unaligned starts: every result equals
        // the bitwise definition.
        let data: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in [1, 15, 16, 17, 63, 64, 65, 255, 256, 257, 4095, 4097, 65_537] {
            for start in [0, 1, 7] {
                let bytes = &data[start..start + len];
                assert_eq!(crc32c(bytes), bitwise(bytes), "len {len} from {start}");
            }
        }
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
