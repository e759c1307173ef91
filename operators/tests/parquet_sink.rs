//! `ParquetSink` and `DeadLetterSink` layout, idempotence and read-back on local disk,
//! `memory://` and S3 (moto).

use std::sync::Arc;

use arrow_array::{Array, BinaryArray, Int64Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use sluice_blockstore::{Bytes, Position, Record, SequenceNumber};
use sluice_operators::{
    DeadLetterRow, DeadLetterSink, ParquetSink, ToRecordBatch, batch_dir_name, dead_letter_schema, part_file_name,
};

/// The writer of most tests.
const W: &str = "worker-1";

fn part(rows: &[(&str, u64)]) -> RecordBatch {
    let rows: Vec<(String, u64)> = rows.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
    <(String, u64)>::to_record_batch(&rows).unwrap()
}

fn rows_of(committed: &[(i64, RecordBatch)]) -> Vec<(i64, String, u64)> {
    let mut out = Vec::new();
    for (time, batch) in committed {
        let keys = batch.column(0).as_any().downcast_ref::<StringArray>().unwrap();
        let values = batch.column(1).as_any().downcast_ref::<UInt64Array>().unwrap();
        for i in 0..batch.num_rows() {
            out.push((*time, keys.value(i).to_owned(), values.value(i)));
        }
    }
    out
}

/// Writes batch 1000 with 3 parts (one empty), batch 2000 with 1, then re-writes 1000 with 1
/// part; checks what `read_committed` sees after each step. Returns the sink for further checks.
fn replace_and_read_back(sink: &ParquetSink) {
    sink.write_batch(
        1_000,
        W,
        vec![part(&[("a", 1), ("b", 2)]), part(&[]), part(&[("c", 3)])],
    )
    .unwrap();
    sink.write_batch(2_000, W, vec![part(&[("z", 26)])]).unwrap();
    let first = sink.read_all_committed().unwrap();
    assert_eq!(
        rows_of(&first),
        vec![
            (1_000, "a".into(), 1),
            (1_000, "b".into(), 2),
            (1_000, "c".into(), 3),
            (2_000, "z".into(), 26)
        ]
    );
    assert_eq!(first[0].1.schema(), <(String, u64)>::schema());

    // The re-run produces different (fewer) parts: the old part 2 must disappear.
    sink.write_batch(1_000, W, vec![part(&[("a", 10)])]).unwrap();
    let second = ParquetSink::read_committed(sink.url()).unwrap();
    assert_eq!(rows_of(&second), vec![(1_000, "a".into(), 10), (2_000, "z".into(), 26)]);

    // Re-running with identical input is a no-op as far as readers can tell.
    sink.write_batch(1_000, W, vec![part(&[("a", 10)])]).unwrap();
    assert_eq!(rows_of(&sink.read_all_committed().unwrap()), rows_of(&second));
}

fn list_names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn local_dir_rewrite_replaces_parts_and_skips_uncommitted() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("out");
    let sink = ParquetSink::open(root.to_str().unwrap()).unwrap();
    replace_and_read_back(&sink);

    let batch_dir = root.join(batch_dir_name(1_000));
    assert_eq!(
        list_names(&batch_dir),
        vec!["_SUCCESS-worker-1".to_owned(), part_file_name(W, 0)]
    );
    assert_eq!(batch_dir.file_name().unwrap(), "batch_time=00000000000000001000");

    // A writer's parts without its marker (a crash mid-write) are invisible to readers.
    sink.write_batch(3_000, W, vec![part(&[("ghost", 1)])]).unwrap();
    std::fs::remove_file(root.join(batch_dir_name(3_000)).join("_SUCCESS-worker-1")).unwrap();
    let committed = ParquetSink::read_committed(&format!("file://{}", root.display())).unwrap();
    assert!(committed.iter().all(|(time, _)| *time != 3_000));
    assert_eq!(committed.len(), 2);

    // Re-running the crashed batch commits it.
    sink.write_batch(3_000, W, vec![part(&[("ghost", 1)])]).unwrap();
    assert_eq!(ParquetSink::read_committed(root.to_str().unwrap()).unwrap().len(), 3);
}

#[test]
fn memory_store_rewrite_replaces_parts() {
    let url = "memory://parquet-sink-test/some/prefix";
    let sink = ParquetSink::open(url).unwrap();
    replace_and_read_back(&sink);
    // Another root in the same named store is independent.
    assert!(
        ParquetSink::read_committed("memory://parquet-sink-test/other")
            .unwrap()
            .is_empty()
    );
}

#[test]
fn writers_share_a_batch_directory_and_replace_only_their_own_parts() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("out");
    let url = root.to_str().unwrap();
    let sink = ParquetSink::open(url).unwrap();
    // Two workers with the same batch interval write the same batch time.
    sink.write_batch(1_000, "host-a", vec![part(&[("a", 1)]), part(&[("b", 2)])])
        .unwrap();
    sink.write_batch(1_000, "host-b", vec![part(&[("a", 5)])]).unwrap();
    // A name that extends another writer's name is a different writer.
    sink.write_batch(1_000, "host-a-2", vec![part(&[("x", 7)])]).unwrap();
    let sum = |url: &str| -> u64 {
        rows_of(&ParquetSink::read_committed(url).unwrap())
            .iter()
            .map(|(_, _, c)| c)
            .sum()
    };
    assert_eq!(sum(url), 1 + 2 + 5 + 7);
    // host-a re-runs the batch with fewer parts (a restart, or its adopter): only host-a's files
    // change.
    sink.write_batch(1_000, "host-a", vec![part(&[("a", 1), ("b", 2)])])
        .unwrap();
    assert_eq!(sum(url), 1 + 2 + 5 + 7);
    assert_eq!(
        list_names(&root.join(batch_dir_name(1_000))),
        [
            "_SUCCESS-host-a",
            "_SUCCESS-host-a-2",
            "_SUCCESS-host-b",
            "part-host-a-00000.parquet",
            "part-host-a-2-00000.parquet",
            "part-host-b-00000.parquet"
        ]
    );
    // Writer names become file names.
    for bad in ["", "a/b", "a b", "ü"] {
        let err = sink.write_batch(2_000, bad, vec![part(&[("a", 1)])]).unwrap_err();
        assert!(
            matches!(err, sluice_operators::Error::InvalidWriter { .. }),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn unsupported_scheme_is_rejected() {
    let err = ParquetSink::open("gopher://x/y").unwrap_err();
    assert!(matches!(err, sluice_operators::Error::InvalidLocation { .. }), "{err}");
    assert!(!err.is_retryable());
}

fn dead_letter(seq: u128, sub: u64, data: &'static [u8], error: &str, attempts: u32) -> DeadLetterRow {
    DeadLetterRow {
        record: Record {
            shard_id: Arc::from("shardId-000000000001"),
            position: Position::new(SequenceNumber::from_u128(seq), sub),
            partition_key: Arc::from(format!("pk-{seq}")),
            approximate_arrival_ms: 0,
            data: Bytes::from_static(data),
        },
        error: error.to_owned(),
        attempts,
        stage: "panic".to_owned(),
    }
}

#[test]
fn dead_letter_round_trip_and_replace() {
    let tmp = tempfile::tempdir().unwrap();
    let url = tmp.path().join("dlq");
    let url = url.to_str().unwrap();
    let sink = DeadLetterSink::open(url).unwrap();
    let big = "49590338271490256608559692538361571095921575989136588898";
    let mut rows = vec![
        dead_letter(7, 0, b"\x00\xffbinary", "bad utf-8", 3),
        dead_letter(8, 2, b"{}", "missing field `id`", 1),
    ];
    rows[1].record.position = Position::new(SequenceNumber::parse(big).unwrap(), 2);
    sink.write_batch(5_000, W, &rows).unwrap();
    sink.write_batch(5_000, W, &rows).unwrap();

    let committed = DeadLetterSink::read_committed(url).unwrap();
    assert_eq!(committed.len(), 1);
    let (time, batch) = &committed[0];
    assert_eq!(*time, 5_000);
    assert_eq!(batch.schema(), dead_letter_schema());
    assert_eq!(batch.num_rows(), 2);
    let col = |name: &str| batch.column_by_name(name).unwrap().clone();
    let batch_time = col("batch_time");
    let batch_time = batch_time.as_any().downcast_ref::<Int64Array>().unwrap();
    let seqs = col("sequence_number");
    let seqs = seqs.as_any().downcast_ref::<StringArray>().unwrap();
    let subs = col("sub_sequence");
    let subs = subs.as_any().downcast_ref::<UInt64Array>().unwrap();
    let shards = col("shard_id");
    let shards = shards.as_any().downcast_ref::<StringArray>().unwrap();
    let keys = col("partition_key");
    let keys = keys.as_any().downcast_ref::<StringArray>().unwrap();
    let data = col("data");
    let data = data.as_any().downcast_ref::<BinaryArray>().unwrap();
    let errors = col("error");
    let errors = errors.as_any().downcast_ref::<StringArray>().unwrap();
    let attempts = col("attempts");
    let attempts = attempts.as_any().downcast_ref::<UInt32Array>().unwrap();
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(batch_time.value(i), 5_000);
        assert_eq!(shards.value(i), &*row.record.shard_id);
        assert_eq!(seqs.value(i), row.record.position.sequence.as_str());
        assert_eq!(subs.value(i), row.record.position.sub_sequence);
        assert_eq!(keys.value(i), &*row.record.partition_key);
        assert_eq!(data.value(i), &row.record.data[..]);
        assert_eq!(errors.value(i), row.error);
        assert_eq!(attempts.value(i), row.attempts);
    }
    assert_eq!(seqs.value(1), big);
    assert!(data.null_count() == 0);

    // A re-run with fewer dead letters replaces the batch's output.
    sink.write_batch(5_000, W, &rows[..1]).unwrap();
    let committed = sink.read_all_committed().unwrap();
    assert_eq!(committed.iter().map(|(_, b)| b.num_rows()).sum::<usize>(), 1);
}

/// The moto endpoint and bucket exported by `scripts/with-emulators`; panics (never skips) if
/// they are missing.
fn moto() -> (String, String) {
    let get = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!(
                "{name} is not set: run S3 tests through the emulators, e.g. \
                 `scripts/with-emulators cargo test -p sluice-operators` or `scripts/test`"
            )
        })
    };
    (get("SLUICE_MOTO_ENDPOINT"), get("SLUICE_TEST_S3_BUCKET"))
}

fn moto_options(endpoint: &str) -> Vec<(String, String)> {
    vec![
        ("aws_endpoint".to_owned(), endpoint.to_owned()),
        ("aws_allow_http".to_owned(), "true".to_owned()),
    ]
}

fn unique_prefix(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("operators-tests/{name}-{}-{nanos}", std::process::id())
}

#[test]
fn s3_moto_rewrite_replaces_parts_and_skips_uncommitted() {
    let (endpoint, bucket) = moto();
    let prefix = unique_prefix("parquet-sink");
    let url = format!("s3://{bucket}/{prefix}");
    let options = moto_options(&endpoint);
    let sink = ParquetSink::open_with_options(&url, &options).unwrap();

    sink.write_batch(1_000, W, vec![part(&[("a", 1)]), part(&[("b", 2)]), part(&[("c", 3)])])
        .unwrap();
    sink.write_batch(1_000, W, vec![part(&[("a", 10)])]).unwrap();
    sink.write_batch(2_000, W, vec![part(&[("z", 26)])]).unwrap();

    // Look at the raw objects: exactly one part and the marker in batch 1000.
    let store = AmazonS3Builder::from_env()
        .with_bucket_name(&bucket)
        .with_endpoint(&endpoint)
        .with_allow_http(true)
        .build()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = Path::from(prefix.as_str()).child(batch_dir_name(1_000));
    let mut names: Vec<String> = runtime
        .block_on(store.list_with_delimiter(Some(&dir)))
        .unwrap()
        .objects
        .into_iter()
        .map(|o| o.location.filename().unwrap().to_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["_SUCCESS-worker-1".to_owned(), part_file_name(W, 0)]);

    // An uncommitted directory (parts, no marker) is ignored.
    let ghost = Path::from(prefix.as_str())
        .child(batch_dir_name(3_000))
        .child(part_file_name(W, 0));
    let bytes = runtime.block_on(store.get(&dir.child(part_file_name(W, 0)))).unwrap();
    let bytes = runtime.block_on(bytes.bytes()).unwrap();
    runtime.block_on(store.put(&ghost, bytes.into())).unwrap();

    assert_eq!(
        rows_of(&sink.read_all_committed().unwrap()),
        vec![(1_000, "a".into(), 10), (2_000, "z".into(), 26)]
    );
}

#[test]
fn s3_moto_dead_letters() {
    let (endpoint, bucket) = moto();
    let url = format!("s3://{bucket}/{}", unique_prefix("dead-letter"));
    let sink = DeadLetterSink::open_with_options(&url, &moto_options(&endpoint)).unwrap();
    sink.write_batch(9_000, W, &[dead_letter(1, 0, b"x", "boom", 2)])
        .unwrap();
    let committed = sink.read_all_committed().unwrap();
    assert_eq!(committed.len(), 1);
    assert_eq!(committed[0].1.num_rows(), 1);
}
