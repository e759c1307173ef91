//! Local log append and replay throughput against raw sequential file write/read of the same
//! bytes. Prints both side by side with ratios (`cargo bench -p sluice-receiver --bench local_log`).

use std::fs::File;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_blockstore::{Replay, SequenceNumberRange};
use sluice_receiver::local_log::LocalLog;

/// Records per run under `cargo bench`; `cargo test` runs the same code on a smoke-sized input.
const BENCH_RECORDS: usize = 200_000;
const SMOKE_RECORDS: usize = 2_000;
const RECORD_BYTES: usize = 100;

fn mib_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let records = if cfg!(debug_assertions) {
        SMOKE_RECORDS
    } else {
        BENCH_RECORDS
    };
    let dir = tempfile::tempdir()?;
    let payload = vec![b'x'; RECORD_BYTES];
    let total = records * RECORD_BYTES;

    // Raw: buffered sequential write of the same payload bytes, then fsync.
    let raw_path = dir.path().join("raw.bin");
    let start = Instant::now();
    {
        let mut file = std::io::BufWriter::with_capacity(1 << 20, File::create(&raw_path)?);
        for _ in 0..records {
            file.write_all(&payload)?;
        }
        file.into_inner()?.sync_all()?;
    }
    let raw_write = start.elapsed();
    let start = Instant::now();
    let mut raw_bytes = Vec::new();
    File::open(&raw_path)?.read_to_end(&mut raw_bytes)?;
    let raw_read = start.elapsed();
    assert_eq!(raw_bytes.len(), total);

    // Local log: put (one shard, fixed key) then flush (fsync).
    let log = LocalLog::open(dir.path().join("log"))?;
    let stream = log.create_stream("bench", 1)?;
    let mut producer = stream.producer()?;
    let start = Instant::now();
    let mut first = None;
    let mut last = None;
    for _ in 0..records {
        let p = producer.put("k", &payload)?;
        first.get_or_insert_with(|| p.clone());
        last = Some(p);
    }
    producer.flush()?;
    let log_write = start.elapsed();
    let range = SequenceNumberRange {
        stream: Arc::from("bench"),
        shard_id: Arc::from("shardId-000000000000"),
        from: first.expect("records written"),
        to: last.expect("records written"),
        record_count: records as u64,
    };
    let start = Instant::now();
    let replayed = stream.replay(&range.into())?;
    let log_read = start.elapsed();
    assert_eq!(replayed.len(), records);

    println!(
        "{records} records of {RECORD_BYTES} bytes ({:.1} MiB payload)",
        total as f64 / 1_048_576.0
    );
    println!("{:<22}{:>14}{:>14}{:>10}", "", "raw MiB/s", "log MiB/s", "ratio");
    for (name, raw, log) in [
        ("append + fsync", raw_write, log_write),
        ("read / replay", raw_read, log_read),
    ] {
        let (r, l) = (mib_per_s(total, raw), mib_per_s(total, log));
        println!("{name:<22}{r:>14.1}{l:>14.1}{:>10.2}", l / r);
    }
    println!(
        "log records/s: append {:.0}, replay {:.0}",
        records as f64 / log_write.as_secs_f64(),
        records as f64 / log_read.as_secs_f64()
    );
    Ok(())
}
