//! `BlockGenerator` under concurrency: every record lands in exactly one block with ranges that
//! describe it exactly, and a stalled store blocks producers with bounded memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use proptest::prelude::*;
use sluice_blockstore::{Block, ManualClock, Position, Record, SequenceNumber};
use sluice_receiver::testing::RecordingHandler;
use sluice_receiver::{BlockGenerator, BlockGeneratorConfig, GeneratorMetrics, StopMode};

const WAIT: Duration = Duration::from_secs(30);

fn shard_records(shard: &str, count: usize, data_len: impl Fn(usize) -> usize) -> Vec<Record> {
    let shard: Arc<str> = shard.into();
    (0..count)
        .map(|i| Record {
            shard_id: shard.clone(),
            // Gaps between sequence numbers, like Kinesis: ranges must not assume contiguity.
            position: Position::new(SequenceNumber::from_u128(1_000 + 7 * i as u128), (i % 3) as u64),
            partition_key: format!("k{}", i % 5).into(),
            approximate_arrival_ms: i as i64,
            data: vec![b'x'; data_len(i)].into(),
        })
        .collect()
}

/// Checks every invariant of a run and returns the records per shard, in block order.
fn check_blocks(blocks: &[Block]) -> HashMap<String, Vec<Position>> {
    let mut per_shard: HashMap<String, Vec<Position>> = HashMap::new();
    let mut last_seq = None;
    for block in blocks {
        assert!(last_seq < Some(block.id().seq), "blocks are stored in id order");
        last_seq = Some(block.id().seq);
        let records = block.records().expect("block decodes");
        assert!(!records.is_empty(), "no empty blocks");
        assert_eq!(block.meta().num_records, records.len() as u64);
        assert_eq!(block.meta().ranges.record_count(), records.len() as u64);
        let mut by_shard: BTreeMap<String, Vec<Position>> = BTreeMap::new();
        for r in &records {
            by_shard
                .entry(r.shard_id.to_string())
                .or_default()
                .push(r.position.clone());
        }
        for (shard, positions) in &by_shard {
            assert!(positions.windows(2).all(|w| w[0] < w[1]), "shard order kept in a block");
            let ranges: Vec<_> = block.meta().ranges.iter().filter(|r| &*r.shard_id == shard).collect();
            // The ranges of a shard equal the min/max positions and the count of its records…
            assert_eq!(ranges.iter().map(|r| &r.from).min(), positions.first());
            assert_eq!(ranges.iter().map(|r| &r.to).max(), positions.last());
            assert_eq!(
                ranges.iter().map(|r| r.record_count).sum::<u64>(),
                positions.len() as u64
            );
            // …and each range covers exactly the records it counts.
            for range in &ranges {
                let inside = positions
                    .iter()
                    .filter(|p| range.from <= **p && **p <= range.to)
                    .count();
                assert_eq!(
                    inside as u64,
                    range.record_count,
                    "range {range} in block {}",
                    block.id()
                );
            }
            per_shard
                .entry(shard.clone())
                .or_default()
                .extend(positions.iter().cloned());
        }
        for range in &block.meta().ranges {
            assert!(by_shard.contains_key(&*range.shard_id), "no range without records");
        }
    }
    per_shard
}

#[derive(Debug, Clone)]
struct Scenario {
    producers: Vec<(usize, Vec<usize>)>,
    max_block_records: usize,
    max_block_bytes: usize,
    queue_capacity: usize,
    clock_ticks: usize,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop::collection::vec((1usize..200, prop::collection::vec(1usize..40, 1..8)), 1..5),
        1usize..64,
        40usize..2_000,
        1usize..4,
        0usize..6,
    )
        .prop_map(
            |(producers, max_block_records, max_block_bytes, queue_capacity, clock_ticks)| Scenario {
                producers,
                max_block_records,
                max_block_bytes,
                queue_capacity,
                clock_ticks,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Several producers add batches concurrently while the timer seals on a moving clock:
    /// every record lands in exactly one block, in order per shard, with exact ranges.
    #[test]
    fn every_record_lands_in_exactly_one_block(s in scenario()) {
        let clock = Arc::new(ManualClock::new(0));
        let handler = Arc::new(RecordingHandler::new());
        let config = BlockGeneratorConfig {
            max_block_records: s.max_block_records,
            max_block_bytes: s.max_block_bytes,
            queue_capacity: s.queue_capacity,
            ..BlockGeneratorConfig::default()
        };
        let generator = BlockGenerator::builder(config, "stream", handler.clone(), clock.clone())
            .start()
            .unwrap();
        let expected: HashMap<String, Vec<Position>> = std::thread::scope(|scope| {
            let mut expected = HashMap::new();
            for (p, (count, batch_sizes)) in s.producers.iter().enumerate() {
                let shard = format!("shard-{p}");
                let records = shard_records(&shard, *count, |i| (i * 13 + p) % 37);
                expected.insert(shard, records.iter().map(|r| r.position.clone()).collect::<Vec<_>>());
                let generator = &generator;
                scope.spawn(move || {
                    let mut rest = records;
                    let mut sizes = batch_sizes.iter().cycle();
                    while !rest.is_empty() {
                        let n = (*sizes.next().unwrap()).min(rest.len());
                        let tail = rest.split_off(n);
                        generator.add_batch(rest).unwrap();
                        rest = tail;
                    }
                });
            }
            for _ in 0..s.clock_ticks {
                clock.advance_ms(200);
                std::thread::yield_now();
            }
            expected
        });
        generator.stop(StopMode::Graceful).unwrap();
        let blocks = handler.blocks();
        let got = check_blocks(&blocks);
        prop_assert_eq!(got, expected);
        let stats = generator.stats();
        prop_assert_eq!(stats.buffered_records, 0);
        prop_assert_eq!(stats.records_added, stats.records_stored);
    }
}

/// With the store stalled, producers block once the queue and the current block are full:
/// nothing is dropped and the buffered bytes stay under the bound; resuming delivers everything.
#[test]
fn a_stalled_store_blocks_producers_with_bounded_memory() {
    let clock = Arc::new(ManualClock::new(0));
    let handler = Arc::new(RecordingHandler::new());
    handler.stall();
    let config = BlockGeneratorConfig {
        max_block_records: 10,
        max_block_bytes: 4_000,
        queue_capacity: 2,
        ..BlockGeneratorConfig::default()
    };
    let metrics = Arc::new(GeneratorMetrics::default());
    let generator = BlockGenerator::builder(config, "stream", handler.clone(), clock)
        .metrics(metrics.clone())
        .start()
        .unwrap();
    let producers = 3;
    let per_producer = 500;
    let record_bytes = shard_records("shard-0", 1, |_| 20)[0].memory_bytes();
    let (blocked, stats, waits, waits_later) = std::thread::scope(|scope| {
        for p in 0..producers {
            let generator = &generator;
            scope.spawn(move || {
                let records = shard_records(&format!("shard-{p}"), per_producer, |_| 20);
                for batch in records.chunks(7) {
                    generator.add_batch(batch.to_vec()).unwrap();
                }
            });
        }
        // The first sealed block reaches the handler and stalls there…
        let deadline = std::time::Instant::now() + WAIT;
        while !handler.is_waiting() && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        // …then the queue fills and every producer blocks. Nothing can move after that, so the
        // snapshot taken when the predicate holds is the steady state.
        let mut stats = generator.stats();
        let blocked = generator.wait_for(WAIT, |s| {
            stats = s.clone();
            s.waiting_producers == producers && s.queued_blocks == 2 && s.storing
        });
        // Blocked producers sleep until there is room: none wakes another (they once woke each
        // other in turn, each wake counted as a new wait, for as long as the store stalled).
        let waits = metrics.producer_waits.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(100));
        let waits_later = metrics.producer_waits.load(Ordering::Relaxed);
        // Release the producers before asserting, so a failed assertion cannot hang the scope.
        handler.resume();
        (blocked, stats, waits, waits_later)
    });
    assert!(blocked, "every producer blocks: {stats:?}");
    assert_eq!(
        waits_later, waits,
        "blocked producers stay asleep while the store stalls"
    );
    let bound = generator.memory_bound_bytes();
    assert_eq!(bound, (2 + 2) * 4_000);
    assert!(stats.buffered_bytes <= bound, "{} > {bound}", stats.buffered_bytes);
    assert!(stats.buffered_records <= (2 + 2) * 10, "{stats:?}");
    assert_eq!(stats.queued_blocks, 2, "{stats:?}");
    assert!(stats.storing, "one block is in flight, stalled in the handler");
    assert_eq!(stats.blocks_stored, 0);
    // Nothing was dropped: everything accepted is still buffered.
    assert_eq!(stats.records_added, stats.buffered_records as u64);
    assert_eq!(stats.buffered_bytes, stats.buffered_records * record_bytes);
    assert!(stats.records_added < (producers * per_producer) as u64);
    generator.stop(StopMode::Graceful).unwrap();
    let blocks = handler.blocks();
    let got = check_blocks(&blocks);
    assert_eq!(got.values().map(Vec::len).sum::<usize>(), producers * per_producer);
    assert!(blocks.iter().all(|b| b.len() <= 10));
}

/// A draining stop seals what is buffered even when nothing else would (no timer tick).
#[test]
fn stop_seals_and_stores_the_buffer() {
    let clock = Arc::new(ManualClock::new(0));
    let handler = Arc::new(RecordingHandler::new());
    let generator = BlockGenerator::builder(BlockGeneratorConfig::default(), "stream", handler.clone(), clock)
        .start()
        .unwrap();
    generator.add_batch(shard_records("a", 5, |_| 3)).unwrap();
    assert!(handler.blocks().is_empty());
    generator.stop(StopMode::Graceful).unwrap();
    let blocks = handler.blocks();
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].len(), 5);
    assert!(generator.is_idle());
}
