//! Block codec and tier throughput against the raw operations they are built on.
//!
//! Pairs (same bytes, a 4 MiB block of 4,096 records of 1 KiB):
//! - encode + decode  vs  a `memcpy` (`Vec` copy) of the encoded bytes — aim ≥ 0.25×; encode,
//!   decode and one CRC32C pass over the block alone, against the same `memcpy`, show where the
//!   time goes;
//! - memory tier put + get  vs  the same `memcpy`;
//! - disk tier put + get  vs  raw file write + read of the encoded bytes, without and with fsync —
//!   aim ≥ 0.5×.
//!
//! Criterion measures each case; at the end (only under `cargo bench`), a manual timing loop prints
//! the pairs side by side with their ratio.

use std::hint::black_box;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use sluice_blockstore::testing::{sample_block, sample_records};
use sluice_blockstore::{Block, BlockTier, Bytes, DiskSync, DiskTier, MemoryTier, StorageLevel, SystemClock};

const RECORDS: usize = 4_096;
const RECORD_BYTES: usize = 1_024;

fn four_mib_block() -> Block {
    sample_block(1, &sample_records("shard-0", 0, RECORDS, RECORD_BYTES))
}

fn encode_decode(block: &Block) -> Block {
    Block::decode(block.encode().expect("encode")).expect("decode")
}

fn memcpy(bytes: &Bytes) -> Vec<u8> {
    bytes.to_vec()
}

fn memory_put_get(tier: &MemoryTier, block: &Block) -> Block {
    tier.insert(block.clone(), StorageLevel::MEMORY_ONLY).expect("fits");
    tier.get_block(block.id()).expect("cached")
}

fn disk_put_get(tier: &DiskTier, block: &Block) -> Block {
    tier.put(block).expect("put");
    tier.get(block.id()).expect("get").expect("present")
}

fn raw_write_read(path: &Path, bytes: &[u8], sync: bool) -> Vec<u8> {
    let mut file = std::fs::File::create(path).expect("create");
    file.write_all(bytes).expect("write");
    if sync {
        file.sync_all().expect("fsync");
    }
    drop(file);
    std::fs::read(path).expect("read")
}

struct Fixture {
    block: Block,
    encoded: Bytes,
    _dir: tempfile::TempDir,
    raw_path: std::path::PathBuf,
    disk: DiskTier,
    disk_synced: DiskTier,
    memory: MemoryTier,
}

fn fixture() -> Fixture {
    let block = four_mib_block();
    let encoded = block.encode().expect("encode");
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = Arc::new(SystemClock);
    Fixture {
        disk: DiskTier::open(dir.path().join("blocks"), clock.clone(), DiskSync::Never).expect("disk tier"),
        disk_synced: DiskTier::open(dir.path().join("blocks-synced"), clock.clone(), DiskSync::Always)
            .expect("disk tier"),
        memory: MemoryTier::new(64 << 20, clock),
        raw_path: dir.path().join("raw.bin"),
        _dir: dir,
        block,
        encoded,
    }
}

fn benches(c: &mut Criterion, f: &Fixture) {
    let mut group = c.benchmark_group("4MiB_block");
    group.throughput(Throughput::Bytes(f.encoded.len() as u64));
    group.sample_size(20);
    group.bench_function("encode+decode", |b| b.iter(|| encode_decode(black_box(&f.block))));
    group.bench_function("memcpy", |b| b.iter(|| memcpy(black_box(&f.encoded))));
    group.bench_function("encode", |b| b.iter(|| black_box(&f.block).encode().expect("encode")));
    group.bench_function("decode", |b| {
        b.iter(|| Block::decode(black_box(f.encoded.clone())).expect("decode"));
    });
    group.bench_function("crc32c", |b| {
        b.iter(|| sluice_blockstore::crc32c(black_box(&f.encoded)));
    });
    group.bench_function("memory_tier_put+get", |b| {
        b.iter(|| memory_put_get(&f.memory, black_box(&f.block)));
    });
    group.bench_function("disk_tier_put+get", |b| {
        b.iter(|| disk_put_get(&f.disk, black_box(&f.block)));
    });
    group.bench_function("raw_file_write+read", |b| {
        b.iter(|| raw_write_read(&f.raw_path, black_box(&f.encoded), false));
    });
    group.bench_function("disk_tier_put+get_fsync", |b| {
        b.iter(|| disk_put_get(&f.disk_synced, black_box(&f.block)));
    });
    group.bench_function("raw_file_write+fsync+read", |b| {
        b.iter(|| raw_write_read(&f.raw_path, black_box(&f.encoded), true));
    });
    group.finish();
}

/// Median wall time of `iterations` runs of `op`, after two warm-up runs.
fn median(iterations: usize, mut op: impl FnMut()) -> Duration {
    op();
    op();
    let mut times: Vec<Duration> = (0..iterations)
        .map(|_| {
            let start = Instant::now();
            op();
            start.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

fn comparison_table(f: &Fixture) {
    let bytes = f.encoded.len() as f64;
    let mib_s = |d: Duration| bytes / d.as_secs_f64() / (1024.0 * 1024.0);
    let n = 30;
    let rows: [(&str, Duration, &str, Duration, f64); 7] = [
        (
            "encode+decode",
            median(n, || drop(black_box(encode_decode(&f.block)))),
            "memcpy",
            median(n, || drop(black_box(memcpy(&f.encoded)))),
            0.25,
        ),
        // What encode+decode is made of: each pass of CRC32C over the block is most of it.
        (
            "  encode",
            median(n, || drop(black_box(f.block.encode().expect("encode")))),
            "memcpy",
            median(n, || drop(black_box(memcpy(&f.encoded)))),
            0.0,
        ),
        (
            "  decode",
            median(n, || drop(black_box(Block::decode(f.encoded.clone()).expect("decode")))),
            "memcpy",
            median(n, || drop(black_box(memcpy(&f.encoded)))),
            0.0,
        ),
        (
            "  crc32c (one pass)",
            median(n, || {
                black_box(sluice_blockstore::crc32c(&f.encoded));
            }),
            "memcpy",
            median(n, || drop(black_box(memcpy(&f.encoded)))),
            0.0,
        ),
        (
            "memory tier put+get",
            median(n, || drop(black_box(memory_put_get(&f.memory, &f.block)))),
            "memcpy",
            median(n, || drop(black_box(memcpy(&f.encoded)))),
            0.0,
        ),
        (
            "disk tier put+get",
            median(n, || drop(black_box(disk_put_get(&f.disk, &f.block)))),
            "raw file write+read",
            median(n, || drop(black_box(raw_write_read(&f.raw_path, &f.encoded, false)))),
            0.5,
        ),
        (
            "disk tier put+get (fsync)",
            median(n, || drop(black_box(disk_put_get(&f.disk_synced, &f.block)))),
            "raw write+fsync+read",
            median(n, || drop(black_box(raw_write_read(&f.raw_path, &f.encoded, true)))),
            0.5,
        ),
    ];
    println!(
        "\nblock store vs raw operations, {:.2} MiB encoded block, median of {n} runs",
        bytes / 1_048_576.0
    );
    println!(
        "{:<28} {:>11} {:>10} | {:<22} {:>11} {:>10} | {:>6} {:>6}",
        "operation", "median", "MiB/s", "baseline", "median", "MiB/s", "ratio", "aim"
    );
    for (name, time, base_name, base_time, aim) in rows {
        let ratio = base_time.as_secs_f64() / time.as_secs_f64();
        println!(
            "{name:<28} {:>9.3}ms {:>10.0} | {base_name:<22} {:>9.3}ms {:>10.0} | {ratio:>5.2}x {}",
            time.as_secs_f64() * 1e3,
            mib_s(time),
            base_time.as_secs_f64() * 1e3,
            mib_s(base_time),
            if aim > 0.0 {
                format!("{aim:>5.2}x")
            } else {
                "     -".into()
            },
        );
    }
}

fn main() {
    let f = fixture();
    let mut criterion = Criterion::default().configure_from_args();
    benches(&mut criterion, &f);
    criterion.final_summary();
    // `cargo test --benches` runs this binary without `--bench`: skip the slow table there.
    if std::env::args().any(|a| a == "--bench") {
        comparison_table(&f);
    }
}
