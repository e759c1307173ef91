//! `BlockGenerator` ingest of 100-byte records versus pushing the same records into a `Vec`,
//! printed side by side.
//!
//! `cargo bench -p sluice-receiver --bench block_generator` runs 2 M records (best of 5); without `--bench`
//! (as `cargo test --all-targets` runs it) it does a quick smoke pass.
//!
//! - **Vec baseline**: move every record into a `Vec` (one `push` each), one thread.
//! - **generator, producer side**: one producer thread adds pages of 1 000 records (one lock and
//!   one range per page) until the last `add_batch` returns; the pusher builds Arrow blocks and
//!   hands them to a handler that drops them, on the other core. The producer is blocked whenever
//!   the pusher falls behind (backpressure), so this is the sustained rate, not a buffer fill.
//! - **generator, end to end**: the same, until `stop(Drain)` returned (every block built and
//!   stored).
//! - **generator, one record per call**: `add` per record (one lock and one range per record).

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_blockstore::{Block, Position, Record, SequenceNumber, SystemClock};
use sluice_receiver::{BlockGenerator, BlockGeneratorConfig, BlockHandler, HandlerError, StopMode};

const RECORD_BYTES: usize = 100;
const PAGE: usize = 1_000;

#[derive(Default)]
struct DropHandler {
    records: AtomicU64,
}

impl BlockHandler for DropHandler {
    fn store_block(&self, block: Block) -> Result<(), HandlerError> {
        self.records.fetch_add(block.len() as u64, Ordering::Relaxed);
        black_box(block);
        Ok(())
    }
}

fn pages(n: usize) -> Vec<Vec<Record>> {
    let payload = Bytes::from(vec![b'x'; RECORD_BYTES * n]);
    let shard: Arc<str> = "shardId-000000000000".into();
    let key: Arc<str> = "partition-key".into();
    let base: u128 = 49_590_338_271_490_256_608_559_692_538_361_571_095;
    let records: Vec<Record> = (0..n)
        .map(|i| Record {
            shard_id: shard.clone(),
            position: Position::plain(SequenceNumber::from_u128(base + i as u128)),
            partition_key: key.clone(),
            approximate_arrival_ms: 0,
            data: payload.slice(i * RECORD_BYTES..(i + 1) * RECORD_BYTES),
        })
        .collect();
    records.chunks(PAGE).map(<[Record]>::to_vec).collect()
}

fn vec_baseline(pages: Vec<Vec<Record>>) -> Duration {
    let start = Instant::now();
    let mut out = Vec::new();
    for page in pages {
        for record in page {
            out.push(record);
        }
    }
    let elapsed = start.elapsed();
    black_box(&out);
    elapsed
}

/// Returns (producer side, end to end).
fn generator(pages: Vec<Vec<Record>>, per_record: bool) -> (Duration, Duration) {
    let n: usize = pages.iter().map(Vec::len).sum();
    let handler = Arc::new(DropHandler::default());
    let generator = BlockGenerator::builder(
        BlockGeneratorConfig::default(),
        "bench",
        handler.clone(),
        Arc::new(SystemClock),
    )
    .start()
    .expect("generator starts");
    let start = Instant::now();
    for page in pages {
        if per_record {
            for record in page {
                generator.add(record).expect("add");
            }
        } else {
            generator.add_batch(page).expect("add_batch");
        }
    }
    let produced = start.elapsed();
    generator.stop(StopMode::Graceful).expect("drain");
    let total = start.elapsed();
    assert_eq!(handler.records.load(Ordering::Relaxed), n as u64);
    (produced, total)
}

fn best(runs: usize, mut f: impl FnMut() -> Duration) -> Duration {
    (0..runs).map(|_| f()).min().expect("at least one run")
}

fn line(name: &str, n: usize, time: Duration, baseline: Duration) {
    let rate = n as f64 / time.as_secs_f64();
    println!(
        "{name:<40} {:>8.2} M records/s {:>8.1} MB/s {:>7.2}x of Vec",
        rate / 1e6,
        rate * RECORD_BYTES as f64 / 1e6,
        baseline.as_secs_f64() / time.as_secs_f64()
    );
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (n, runs) = if bench { (2_000_000, 5) } else { (20_000, 1) };
    let vec = best(runs, || vec_baseline(pages(n)));
    let mut producer = Duration::MAX;
    let mut end_to_end = Duration::MAX;
    for _ in 0..runs {
        let (p, t) = generator(pages(n), false);
        producer = producer.min(p);
        end_to_end = end_to_end.min(t);
    }
    let single = best(runs, || generator(pages(n / 4), true).1);
    println!("ingest of {n} records of {RECORD_BYTES} bytes, best of {runs}");
    line("Vec::push (baseline)", n, vec, vec);
    line("BlockGenerator::add_batch, producer", n, producer, vec);
    line("BlockGenerator::add_batch, end to end", n, end_to_end, vec);
    line("BlockGenerator::add, end to end", n / 4, single, vec.mul_f64(0.25));
}
