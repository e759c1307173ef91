//! Integration tests of the embedded local log: round trips, replay, crash recovery, resharding,
//! retention, cross-instance visibility.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use sluice_blockstore::{
    Block, BlockId, BlockMeta, ManualClock, Position, Record, Replay, ReplayError, SequenceNumberRange,
    SequenceNumberRanges,
};
use sluice_receiver::local_log::{LocalLog, LocalLogError, LocalStream, RetentionPolicy, StreamConfig};
use sluice_receiver::{ShardReader, Source, SourceError, StartingPosition};

fn read_all(reader: &mut dyn ShardReader) -> (Vec<Record>, Option<Vec<Arc<str>>>) {
    let mut out = Vec::new();
    loop {
        let batch = reader.read(7).unwrap();
        let empty = batch.records.is_empty();
        out.extend(batch.records);
        if batch.end_of_shard.is_some() {
            return (out, batch.end_of_shard);
        }
        if empty {
            return (out, None);
        }
    }
}

fn read_shard(stream: &LocalStream, shard: &str, start: &StartingPosition) -> Vec<Record> {
    read_all(&mut *stream.open_reader(shard, start).unwrap()).0
}

fn range(stream: &LocalStream, shard: &str, from: &Position, to: &Position, count: u64) -> SequenceNumberRanges {
    SequenceNumberRange {
        stream: Arc::from(stream.name()),
        shard_id: Arc::from(shard),
        from: from.clone(),
        to: to.clone(),
        record_count: count,
    }
    .into()
}

#[test]
fn append_read_replay_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let log = LocalLog::open(dir.path()).unwrap();
    let stream = log.create_stream("s", 3).unwrap();
    let mut producer = stream.producer().unwrap();
    let mut written: HashMap<String, Vec<(Position, String)>> = HashMap::new();
    for i in 0..300 {
        let key = format!("k{}", i % 17);
        let data = format!("record-{i}");
        let position = producer.put(&key, &data).unwrap();
        written.entry(key).or_default().push((position, data));
    }
    producer.flush().unwrap();
    let mut total = 0;
    for shard in stream.list_shards().unwrap() {
        let records = read_shard(&stream, &shard.shard_id, &StartingPosition::TrimHorizon);
        assert!(records.windows(2).all(|w| w[0].position < w[1].position));
        for r in &records {
            let key_records = &written[&*r.partition_key];
            assert!(
                key_records
                    .iter()
                    .any(|(p, d)| p == &r.position && d.as_bytes() == &r.data[..])
            );
        }
        total += records.len();
        if let (Some(first), Some(last)) = (records.first(), records.last()) {
            let replayed = stream
                .replay(&range(
                    &stream,
                    &shard.shard_id,
                    &first.position,
                    &last.position,
                    records.len() as u64,
                ))
                .unwrap();
            assert_eq!(replayed, records);
            // AFTER the first record skips exactly it; AT the last returns exactly it.
            let after = read_shard(
                &stream,
                &shard.shard_id,
                &StartingPosition::AfterPosition(first.position.clone()),
            );
            assert_eq!(after, records[1..]);
            let at = read_shard(
                &stream,
                &shard.shard_id,
                &StartingPosition::AtPosition(last.position.clone()),
            );
            assert_eq!(at, records[records.len() - 1..]);
        }
    }
    assert_eq!(total, 300);
    // Per-key order is write order.
    for (key, list) in &written {
        assert!(list.windows(2).all(|w| w[0].0 < w[1].0), "key {key}");
    }
}

#[test]
fn replay_starts_and_ends_inside_aggregates() {
    let dir = tempfile::tempdir().unwrap();
    let stream = LocalLog::open(dir.path()).unwrap().create_stream("agg", 1).unwrap();
    let mut producer = stream.producer().unwrap();
    let p0 = producer.put("a", "plain-0").unwrap();
    let agg1: Vec<(String, String)> = (0..5).map(|i| (format!("k{i}"), format!("agg1-{i}"))).collect();
    let pos1 = producer.put_aggregated(&agg1).unwrap();
    let p2 = producer.put("b", "plain-2").unwrap();
    let agg3: Vec<(String, String)> = (0..4).map(|i| (format!("j{i}"), format!("agg3-{i}"))).collect();
    let pos3 = producer.put_aggregated(&agg3).unwrap();
    producer.flush().unwrap();
    assert!(pos1.iter().all(|p| p.sequence == pos1[0].sequence));
    assert_eq!(pos1[4].sub_sequence, 4);

    let shard = "shardId-000000000000";
    let all = read_shard(&stream, shard, &StartingPosition::TrimHorizon);
    assert_eq!(all.len(), 1 + 5 + 1 + 4);
    // [agg1 sub 2, agg3 sub 1]
    let replayed = stream
        .replay(&range(&stream, shard, &pos1[2], &pos3[1], 3 + 1 + 2))
        .unwrap();
    let data: Vec<&[u8]> = replayed.iter().map(|r| &r.data[..]).collect();
    assert_eq!(
        data,
        vec![&b"agg1-2"[..], b"agg1-3", b"agg1-4", b"plain-2", b"agg3-0", b"agg3-1"]
    );
    assert_eq!(replayed[0].position, pos1[2]);
    assert_eq!(&*replayed[0].partition_key, "k2");
    // Inside one aggregate.
    let inner = stream.replay(&range(&stream, shard, &pos1[1], &pos1[3], 3)).unwrap();
    assert_eq!(inner.len(), 3);
    // Wrong count is rejected.
    let err = stream.replay(&range(&stream, shard, &p0, &p2, 5)).unwrap_err();
    assert!(
        matches!(
            err,
            ReplayError::CountMismatch {
                expected: 5,
                found: 7,
                ..
            }
        ),
        "{err}"
    );
    // Reader positions inside an aggregate.
    let after = read_shard(&stream, shard, &StartingPosition::AfterPosition(pos1[3].clone()));
    assert_eq!(after[0].position, pos1[4]);
    assert_eq!(after.len(), 1 + 1 + 4);
    let at = read_shard(&stream, shard, &StartingPosition::AtPosition(pos3[2].clone()));
    assert_eq!(at.len(), 2);
    // Plain and aggregated frames, from inside one aggregate to inside the next.
    assert_replayed_block_is_the_records_block(&stream, &range(&stream, shard, &pos1[2], &pos3[1], 6));
}

#[test]
fn torn_tails_are_truncated_on_reopen() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for round in 0..25 {
        let dir = tempfile::tempdir().unwrap();
        let stream = LocalLog::open(dir.path()).unwrap().create_stream("crash", 1).unwrap();
        let shard = "shardId-000000000000";
        let n = 40;
        {
            let mut producer = stream.producer().unwrap();
            for i in 0..n {
                producer.put("same-key", format!("payload-{i:04}")).unwrap();
            }
            producer.flush().unwrap();
        }
        let segment = std::fs::read_dir(stream.dir().join(shard))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let len = std::fs::metadata(&segment).unwrap().len();
        let frame = len / n; // all frames have the same size
        let cut = rng.random_range(0..len);
        // Readers stop without error at a torn tail, before the producer repairs it.
        let file = OpenOptions::new().write(true).open(&segment).unwrap();
        file.set_len(cut).unwrap();
        drop(file);
        let survivors = (cut / frame) as usize;
        let before_repair = read_shard(&stream, shard, &StartingPosition::TrimHorizon);
        assert_eq!(before_repair.len(), survivors, "round {round}");
        // A replay into a block stops at the torn frame too.
        if let (Some(first), Some(last)) = (before_repair.first(), before_repair.last()) {
            let survived = range(&stream, shard, &first.position, &last.position, survivors as u64);
            assert_replayed_block_is_the_records_block(&stream, &survived);
        }

        let mut producer = stream.producer().unwrap();
        producer.put("same-key", "after-crash").unwrap();
        producer.flush().unwrap();
        let records = read_shard(&stream, shard, &StartingPosition::TrimHorizon);
        assert_eq!(records.len(), survivors + 1, "round {round} cut {cut}");
        for (i, r) in records[..survivors].iter().enumerate() {
            assert_eq!(r.data, format!("payload-{i:04}").as_bytes());
        }
        assert_eq!(&records[survivors].data[..], b"after-crash");
        assert!(records.windows(2).all(|w| w[0].position < w[1].position));
    }
}

/// A lost block is rebuilt across segment files, over the garbage a crash left at the end of a
/// closed segment, and with frames larger than one read of the segment (1 MiB).
#[test]
fn a_replayed_block_spans_segments_torn_tails_and_frames_larger_than_a_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StreamConfig::new(1);
    config.segment_bytes = 3 * 1024 * 1024;
    let stream = LocalLog::open(dir.path())
        .unwrap()
        .create_stream_with("seg", &config)
        .unwrap();
    let shard = "shardId-000000000000";
    let mut producer = stream.producer().unwrap();
    let big = |i: usize| vec![b'a' + (i % 26) as u8; 1024 * 1024 + 333 * i];
    for i in 0..6 {
        producer.put("big", big(i)).unwrap();
        for j in 0..300 {
            producer
                .append(&format!("key-{j}"), None, format!("small-{i}-{j}"))
                .unwrap();
        }
    }
    producer.flush().unwrap();
    drop(producer);
    let segments = stream.describe().unwrap().shards[0].segments;
    assert!(segments >= 3, "{segments} segments");
    // A crash's torn tail at the end of the oldest (closed) segment.
    let mut paths: Vec<_> = std::fs::read_dir(stream.dir().join(shard))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    let mut oldest = OpenOptions::new().append(true).open(&paths[0]).unwrap();
    std::io::Write::write_all(&mut oldest, &[0x17; 100]).unwrap();
    drop(oldest);

    let all = read_shard(&stream, shard, &StartingPosition::TrimHorizon);
    assert_eq!(all.len(), 6 * 301);
    assert_eq!(all[301].data, big(1));
    let whole = range(
        &stream,
        shard,
        &all[0].position,
        &all[all.len() - 1].position,
        all.len() as u64,
    );
    assert_replayed_block_is_the_records_block(&stream, &whole);
    // From inside the second aggregate run to the last big record.
    let part = range(&stream, shard, &all[350].position, &all[1505].position, 1505 - 350 + 1);
    assert_replayed_block_is_the_records_block(&stream, &part);
}

#[test]
fn split_and_merge_keep_per_key_order() {
    split_and_merge_keep_per_key_order_when(Write::Put);
}

/// With `append`, the split and the merge come while every open shard has an aggregate open:
/// closing a shard completes its aggregate first, so the parent's ending sequence number covers it.
#[test]
fn split_and_merge_keep_per_key_order_with_aggregated_appends() {
    split_and_merge_keep_per_key_order_when(Write::Append);
}

#[derive(Clone, Copy)]
enum Write {
    Put,
    Append,
}

fn split_and_merge_keep_per_key_order_when(write: Write) {
    let dir = tempfile::tempdir().unwrap();
    let stream = LocalLog::open(dir.path()).unwrap().create_stream("reshard", 2).unwrap();
    let mut producer = stream.producer().unwrap();
    let keys: Vec<String> = (0..20).map(|i| format!("key-{i}")).collect();
    let mut counter = 0u32;
    let mut put_round = |producer: &mut sluice_receiver::Producer| {
        for key in &keys {
            match write {
                Write::Put => drop(producer.put(key, counter.to_string()).unwrap()),
                Write::Append => producer.append(key, None, counter.to_string()).unwrap(),
            }
            counter += 1;
        }
    };
    put_round(&mut producer);
    producer.flush().unwrap();
    // A reader on shard 0 started before the split.
    let mut early = stream
        .open_reader("shardId-000000000000", &StartingPosition::TrimHorizon)
        .unwrap();
    let (early_records, end) = read_all(&mut *early);
    assert!(end.is_none());
    let (c1, c2) = producer.split_shard("shardId-000000000000", u128::MAX / 4).unwrap();
    put_round(&mut producer);
    let merged = producer.merge_shards(&c2, "shardId-000000000001").unwrap();
    put_round(&mut producer);
    producer.flush().unwrap();
    assert!(producer.put_aggregated::<&str, &[u8]>(&[]).is_err());
    assert!(matches!(
        producer.split_shard("shardId-000000000000", 5),
        Err(LocalLogError::ShardClosed { .. })
    ));

    let (rest, end) = read_all(&mut *early);
    assert!(rest.is_empty());
    assert_eq!(end, Some(vec![Arc::clone(&c1), Arc::clone(&c2)]));
    assert_eq!(
        early.read(10).unwrap(),
        sluice_receiver::ReadBatch::default(),
        "end_of_shard is reported once"
    );

    // Read parents before children, like the shard-reading loop.
    let shards = stream.list_shards().unwrap();
    let closed: Vec<_> = shards.iter().filter(|s| s.is_closed()).collect();
    assert_eq!(closed.len(), 3);
    for child in shards.iter().filter(|s| !s.parent_shard_ids.is_empty()) {
        for parent in &child.parent_shard_ids {
            let parent = shards.iter().find(|s| &s.shard_id == parent).unwrap();
            let child_first = read_shard(&stream, &child.shard_id, &StartingPosition::TrimHorizon);
            if let Some(first) = child_first.first() {
                assert!(&first.position.sequence > parent.ending_sequence.as_ref().unwrap());
            }
        }
    }
    let mut order = vec![
        Arc::from("shardId-000000000000"),
        Arc::from("shardId-000000000001"),
        c1,
        c2,
        merged,
    ];
    let mut per_key: HashMap<Arc<str>, Vec<u32>> = HashMap::new();
    let mut total = 0;
    for shard in order.drain(..) {
        let mut reader = stream.open_reader(&shard, &StartingPosition::TrimHorizon).unwrap();
        let (records, _) = read_all(&mut *reader);
        total += records.len();
        for r in records {
            per_key
                .entry(r.partition_key)
                .or_default()
                .push(std::str::from_utf8(&r.data).unwrap().parse().unwrap());
        }
    }
    assert_eq!(total, 60);
    assert!(!early_records.is_empty(), "MD5 sends some of the 20 keys to shard 0");
    let aggregated = early_records
        .windows(2)
        .any(|w| w[0].position.sequence == w[1].position.sequence);
    assert_eq!(aggregated, matches!(write, Write::Append));
    for (key, values) in per_key {
        assert!(values.windows(2).all(|w| w[0] < w[1]), "key {key}: {values:?}");
        assert_eq!(values.len(), 3);
    }
}

#[test]
fn trimmed_ranges_are_data_expired() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StreamConfig::new(1);
    config.segment_bytes = 1024;
    let stream = LocalLog::open(dir.path())
        .unwrap()
        .create_stream_with("ret", &config)
        .unwrap();
    let clock = Arc::new(ManualClock::new(1_000));
    let mut producer = stream.producer_with_clock(clock.clone()).unwrap();
    let shard = "shardId-000000000000";
    let mut positions = Vec::new();
    for i in 0..100 {
        positions.push(producer.put("k", format!("{i:0>50}")).unwrap());
        clock.advance_ms(10);
    }
    producer.flush().unwrap();
    producer
        .set_retention(RetentionPolicy {
            max_bytes: Some(3000),
            max_age_ms: None,
        })
        .unwrap();
    let report = producer.enforce_retention().unwrap();
    assert!(report.segments_deleted > 0);
    let kept = read_shard(&stream, shard, &StartingPosition::TrimHorizon);
    assert!(!kept.is_empty() && kept.len() < 100);
    assert_eq!(kept.last().unwrap().position, positions[99]);
    let first_kept = kept[0].position.clone();
    let trimmed = range(&stream, shard, &positions[0], &positions[1], 2);
    let err = stream.replay(&trimmed).unwrap_err();
    assert!(matches!(err, ReplayError::DataExpired { .. }), "{err}");
    assert!(!err.is_retryable());
    let lost_block = BlockMeta {
        id: BlockId {
            input_id: 0,
            run_id: 0,
            seq: 0,
        },
        ranges: trimmed,
        num_records: 2,
        num_bytes: 102,
    };
    let err = stream.replay_block(&lost_block).unwrap_err();
    assert!(matches!(err, ReplayError::DataExpired { .. }), "{err}");
    let err = stream
        .open_reader(shard, &StartingPosition::AtPosition(positions[0].clone()))
        .err()
        .unwrap();
    assert!(matches!(err, SourceError::DataExpired { .. }), "{err}");
    // Kept data still replays.
    let ok = stream
        .replay(&range(&stream, shard, &first_kept, &positions[99], kept.len() as u64))
        .unwrap();
    assert_eq!(ok, kept);
    // Age-based: everything but the active segment is older than 1 ms now.
    clock.advance_ms(10_000);
    producer
        .set_retention(RetentionPolicy {
            max_bytes: None,
            max_age_ms: Some(1),
        })
        .unwrap();
    producer.enforce_retention().unwrap();
    assert_eq!(stream.describe().unwrap().shards[0].segments, 1);
}

#[test]
fn sequence_numbers_never_collide_across_shards() {
    let dir = tempfile::tempdir().unwrap();
    let stream = LocalLog::open(dir.path()).unwrap().create_stream("uniq", 4).unwrap();
    let mut producer = stream.producer().unwrap();
    let mut seen = std::collections::HashSet::new();
    for i in 0..400 {
        let p = producer.put(&format!("key{i}"), "x").unwrap();
        assert_eq!(p.sequence.as_str().len(), 56);
        assert!(seen.insert(p.sequence), "duplicate sequence number");
    }
    let shards: std::collections::HashSet<Arc<str>> = {
        producer.flush().unwrap();
        stream
            .list_shards()
            .unwrap()
            .into_iter()
            .filter(|s| !read_shard(&stream, &s.shard_id, &StartingPosition::TrimHorizon).is_empty())
            .map(|s| s.shard_id)
            .collect()
    };
    assert_eq!(shards.len(), 4, "MD5 spreads 400 keys over all shards");
}

#[test]
fn reader_in_another_instance_sees_appends_and_latest_skips_old() {
    let dir = tempfile::tempdir().unwrap();
    let writer_log = LocalLog::open(dir.path()).unwrap();
    let stream = writer_log.create_stream("x", 1).unwrap();
    let mut producer = stream.producer().unwrap();
    producer.put("k", "old").unwrap();
    producer.flush().unwrap();

    let other = LocalLog::open(dir.path()).unwrap().stream("x").unwrap();
    assert!(matches!(other.producer(), Err(LocalLogError::WriterLocked { .. })));
    let shard = "shardId-000000000000";
    let mut latest = other.open_reader(shard, &StartingPosition::Latest).unwrap();
    let mut horizon = other.open_reader(shard, &StartingPosition::TrimHorizon).unwrap();
    assert!(latest.read(10).unwrap().records.is_empty());
    assert_eq!(horizon.read(10).unwrap().records.len(), 1);
    producer.put("k", "new").unwrap();
    producer.flush().unwrap();
    let batch = latest.read(10).unwrap();
    assert_eq!(batch.records.len(), 1);
    assert_eq!(&batch.records[0].data[..], b"new");
    assert_eq!(&horizon.read(10).unwrap().records[0].data[..], b"new");
    let ts = batch.records[0].approximate_arrival_ms;
    let at_ts = read_shard(&other, shard, &StartingPosition::AtTimestamp(ts + 1));
    assert!(at_ts.is_empty());
    assert!(!read_shard(&other, shard, &StartingPosition::AtTimestamp(ts)).is_empty());
}

/// An explicit hash key picks the shard whatever the partition key hashes to; the partition key
/// is stored as given. Counter keys spread by `spread_hash_key` fill every shard evenly, the way
/// `sluice log put` and the word-count example load them.
#[test]
fn an_explicit_hash_key_picks_the_shard_and_spread_keys_fill_every_shard_evenly() {
    use sluice_receiver::local_log::spread_hash_key;
    let dir = tempfile::tempdir().unwrap();
    let stream = LocalLog::open(dir.path())
        .unwrap()
        .create_stream("explicit", 4)
        .unwrap();
    let shards = stream.list_shards().unwrap();
    let mut producer = stream.producer().unwrap();
    // The same partition key to each shard in turn, by its range's start (its MD5 would have sent
    // all four to one shard).
    for shard in &shards {
        producer
            .put_with_hash_key("same key", shard.hash_key_range.0, shard.shard_id.as_bytes())
            .unwrap();
    }
    let per_shard = 4_000;
    for n in 0..per_shard * 4 {
        producer
            .put_with_hash_key(&n.to_string(), spread_hash_key(n), "spread")
            .unwrap();
    }
    producer.flush().unwrap();
    for shard in &shards {
        let records = read_shard(&stream, &shard.shard_id, &StartingPosition::TrimHorizon);
        assert_eq!(&*records[0].partition_key, "same key");
        assert_eq!(&records[0].data[..], shard.shard_id.as_bytes());
        let (lo, hi) = shard.hash_key_range;
        assert!((lo..=hi).contains(&spread_hash_key(records[1].partition_key.parse().unwrap())));
        let spread = records.len() as u64 - 1;
        assert!(
            spread.abs_diff(per_shard) <= per_shard / 50,
            "{}: {spread} of {} records",
            shard.shard_id,
            per_shard * 4
        );
    }
}

/// Appends between two puts: the records read back in order with their keys and data, the appends
/// as one aggregated record (sub-sequences 0..4) between the puts' two stored records.
#[test]
fn appends_between_puts_share_one_aggregated_record_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let stream = LocalLog::open(dir.path()).unwrap().create_stream("append", 1).unwrap();
    let mut producer = stream.producer().unwrap();
    let first = producer.put("k0", "zero").unwrap();
    for i in 1..=3 {
        producer.append(&format!("k{i}"), None, format!("line {i}")).unwrap();
    }
    producer.append("k4", Some(7), "line 4").unwrap();
    let last = producer.put("k5", "five").unwrap();
    producer.flush().unwrap();
    let shard = &stream.list_shards().unwrap()[0].shard_id;
    let records = read_shard(&stream, shard, &StartingPosition::TrimHorizon);
    let read: Vec<(&str, &[u8])> = records.iter().map(|r| (&*r.partition_key, &r.data[..])).collect();
    assert_eq!(
        read,
        [
            ("k0", &b"zero"[..]),
            ("k1", b"line 1"),
            ("k2", b"line 2"),
            ("k3", b"line 3"),
            ("k4", b"line 4"),
            ("k5", b"five")
        ]
    );
    assert_eq!(records[0].position, first);
    assert_eq!(records[5].position, last);
    assert!(records.windows(2).all(|w| w[0].position < w[1].position));
    // The four appends (the explicit hash key picks the one shard as well) are one stored record
    // between the puts' two.
    let aggregate = &records[1].position.sequence;
    assert!(records[1..5].iter().all(|r| &r.position.sequence == aggregate));
    let subs: Vec<u64> = records[1..5].iter().map(|r| r.position.sub_sequence).collect();
    assert_eq!(subs, [0, 1, 2, 3]);
    assert!(first.sequence < *aggregate && *aggregate < last.sequence);
}

/// A bulk load through `append`: aggregates of at most 64 KiB per shard, read, started and
/// replayed from positions inside them exactly like any other record; arrival times never go
/// back, so a timestamp start misses nothing.
#[test]
fn appended_records_are_read_started_and_replayed_inside_their_aggregates() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000));
    let stream = LocalLog::open(dir.path()).unwrap().create_stream("bulk", 2).unwrap();
    let mut producer = stream.producer_with_clock(clock.clone()).unwrap();
    let n = 3_000u64;
    for i in 0..n {
        clock.advance_ms(1);
        let data = format!("{i:06}-{}", "x".repeat(93));
        producer
            .append(
                &i.to_string(),
                Some(sluice_receiver::local_log::spread_hash_key(i)),
                data,
            )
            .unwrap();
    }
    producer.flush().unwrap();
    let mut total = 0;
    let mut block_ranges = Vec::new();
    for shard in stream.list_shards().unwrap() {
        let shard = &*shard.shard_id;
        let all = read_shard(&stream, shard, &StartingPosition::TrimHorizon);
        total += all.len();
        assert!(all.windows(2).all(|w| w[0].position < w[1].position));
        assert!(
            all.windows(2)
                .all(|w| w[0].approximate_arrival_ms <= w[1].approximate_arrival_ms)
        );
        // ~110 encoded bytes per record: at most ~595 to a 64 KiB aggregate.
        let mut per_aggregate: HashMap<String, usize> = HashMap::new();
        for r in &all {
            *per_aggregate.entry(r.position.sequence.to_string()).or_default() += 1;
        }
        assert!(per_aggregate.len() >= 2, "{shard}: {} aggregates", per_aggregate.len());
        assert!(per_aggregate.values().all(|&count| count <= 600), "{per_aggregate:?}");
        // Positions inside aggregates: the first record past the first aggregate's middle, and
        // one near the end of the next.
        let i = all.iter().position(|r| r.position.sub_sequence == 100).unwrap();
        let j = all.len() - 3;
        assert!(all[j].position.sub_sequence > 0);
        let after = read_shard(
            &stream,
            shard,
            &StartingPosition::AfterPosition(all[i].position.clone()),
        );
        assert_eq!(after, all[i + 1..]);
        let at = read_shard(&stream, shard, &StartingPosition::AtPosition(all[j].position.clone()));
        assert_eq!(at, all[j..]);
        let replayed = stream
            .replay(&range(
                &stream,
                shard,
                &all[i].position,
                &all[j].position,
                (j - i + 1) as u64,
            ))
            .unwrap();
        assert_eq!(replayed, all[i..=j]);
        block_ranges.extend(range(&stream, shard, &all[i].position, &all[j].position, (j - i + 1) as u64).0);
        // Record `k` was appended at 1_001 + k: no record says it arrived before that, and a
        // start at that time keeps record `k` and everything after it.
        let appended_at = |r: &Record| 1_001 + std::str::from_utf8(&r.data[..6]).unwrap().parse::<i64>().unwrap();
        assert!(all.iter().all(|r| r.approximate_arrival_ms >= appended_at(r)));
        let from_time = read_shard(&stream, shard, &StartingPosition::AtTimestamp(appended_at(&all[j])));
        assert!(
            from_time.ends_with(&all[j..]),
            "a timestamp start keeps every later record"
        );
    }
    assert_eq!(total as u64, n);
    // A lost block of both shards' ranges, decoded straight into its columns, is the block its
    // records make.
    assert_replayed_block_is_the_records_block(&stream, &SequenceNumberRanges::from(block_ranges));
}

/// `replay_block` (frames decoded into the block's columns) builds exactly the block
/// `Block::from_records` builds from `replay`'s records, whatever byte count the lost block's
/// meta says (it only sizes the columns), and refuses a wrong record count as `replay` does.
fn assert_replayed_block_is_the_records_block(stream: &LocalStream, ranges: &SequenceNumberRanges) {
    let id = BlockId {
        input_id: 3,
        run_id: 9,
        seq: 27,
    };
    let records = stream.replay(ranges).unwrap();
    let expected = Block::from_records(id, ranges.clone(), &records).unwrap();
    let meta = expected.meta().clone();
    for num_bytes in [meta.num_bytes, 0, meta.num_bytes / 3, meta.num_bytes * 2] {
        let block = stream
            .replay_block(&BlockMeta {
                num_bytes,
                ..meta.clone()
            })
            .unwrap();
        assert_eq!(block, expected, "sized for {num_bytes} bytes");
        assert_eq!(block.records().unwrap(), records);
    }
    let mut wrong = meta;
    wrong.ranges.0[0].record_count += 1;
    let error = stream.replay_block(&wrong).unwrap_err();
    assert!(matches!(error, ReplayError::CountMismatch { .. }), "{error}");
}

#[test]
fn cli_commands_round_trip() {
    use sluice_receiver::local_log::cli;
    let dir = tempfile::tempdir().unwrap();
    cli::create(dir.path(), "c", 2).unwrap();
    let out = cli::put(dir.path(), "c", &b"a\nb\nc\n"[..], cli::KeyMode::Counter).unwrap();
    assert!(out.contains("put 3 records"));
    cli::split(dir.path(), "c", "shardId-000000000000", None).unwrap();
    let text = cli::describe(dir.path(), "c").unwrap();
    assert!(text.contains("CLOSED"), "{text}");
    assert!(text.contains("shardId-000000000003"), "{text}");
    assert!(cli::merge(dir.path(), "c", "shardId-000000000002", "shardId-000000000003").is_ok());
    assert!(cli::create(dir.path(), "c", 2).is_err());
}
