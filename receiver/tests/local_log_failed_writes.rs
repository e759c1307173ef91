//! A local-log producer whose segment write fails part-way, for real: each test re-runs this test
//! binary as a child process under a file-size limit (`RLIMIT_FSIZE`) with `SIGXFSZ` ignored, so
//! the kernel writes up to the limit, then `write` returns `EFBIG`. The child puts (or appends)
//! records until one fails, lifts the limit and goes on; the parent then checks the log it left:
//! every acknowledged record exactly once and in order, the failed one only if the child retried
//! it, and segments made of whole frames only.
#![cfg(unix)]

use std::path::Path;
use std::process::Command;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use sluice_blockstore::Record;
use sluice_receiver::local_log::{LocalLog, LocalLogError, LocalStream, Producer};
use sluice_receiver::{Source, StartingPosition};

/// Set in the child process: the log directory it writes.
const CHILD_ENV: &str = "SLUICE_TEST_FAILED_WRITES_DIR";
const STREAM: &str = "limited";
const SHARD: &str = "shardId-000000000000";
/// Payload bytes per record: a 1 MiB write buffer holds about 26 frames.
const DATA_BYTES: usize = 40_000;
/// The segment's size limit in the child: the second buffer write (at about 2 MiB) stops part-way,
/// after about 11 whole frames and inside the next one.
const FILE_SIZE_LIMIT: u64 = 1_500_000;
/// Records put after the limit is lifted.
const PUTS_AFTER: usize = 5;

/// How the child writes its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    /// `Producer::put`: a frame per record, each position printed.
    Put,
    /// `Producer::append` of records this many bytes long, aggregated into shared frames.
    Append(usize),
}

/// What the child does with the put that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// Puts the same record again once the limit is lifted.
    Retries,
    /// Drops it and goes on with the next records.
    GivesUp,
}

fn data(i: usize, len: usize) -> Vec<u8> {
    let mut data = format!("record-{i:05}-").into_bytes();
    data.resize(len, b'a' + (i % 26) as u8);
    data
}

impl Api {
    fn data_len(self) -> usize {
        match self {
            Api::Put => DATA_BYTES,
            Api::Append(len) => len,
        }
    }

    /// Writes record `i`; its sequence number when the call returns one.
    fn write(self, producer: &mut Producer, i: usize) -> Result<String, LocalLogError> {
        let data = data(i, self.data_len());
        match self {
            Api::Put => producer.put("key", data).map(|p| p.sequence.to_string()),
            Api::Append(_) => producer.append("key", None, data).map(|()| "-".to_owned()),
        }
    }
}

/// Runs `test` (this test's name) in a child process writing `dir`, with `SIGXFSZ` ignored:
/// POSIX keeps a signal that is ignored when a program starts ignored after `exec`, so a shell
/// `trap` does it without `unsafe` code here. Returns the child's stdout.
fn run_child(test: &str, dir: &Path) -> String {
    let output = Command::new("/bin/sh")
        .args(["-c", r#"trap '' XFSZ; exec "$0" "$@""#])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "child failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn set_file_size_limit(limit: Option<u64>) {
    let maximum = getrlimit(Resource::Fsize).maximum;
    setrlimit(
        Resource::Fsize,
        Rlimit {
            current: limit,
            maximum,
        },
    )
    .unwrap();
}

/// The child: writes records until the file-size limit fails one, handles it as `caller` does,
/// lifts the limit, writes [`PUTS_AFTER`] more and flushes. Prints `acked <i> <sequence>` (`-`
/// for an append) for every record acknowledged, in order.
fn child(dir: &Path, caller: Caller, api: Api) {
    let stream = LocalLog::open(dir).unwrap().stream(STREAM).unwrap();
    let mut producer = stream.producer().unwrap();
    let mut acked = Vec::new();
    set_file_size_limit(Some(FILE_SIZE_LIMIT));
    let failed = (0..1_000)
        .find(|&i| match api.write(&mut producer, i) {
            Ok(position) => {
                acked.push((i, position));
                false
            }
            Err(error) => {
                assert!(matches!(error, LocalLogError::Io { .. }), "{error}");
                assert!(error.is_retryable(), "{error}");
                true
            }
        })
        .expect("the file-size limit fails a put");
    assert!(failed > 30, "the first buffer write must succeed; put {failed} failed");
    // The records acknowledged since the last write cannot be written either (a few whole frames
    // may be): they stay buffered, and each flush that fails keeps what it could not write.
    for _ in 0..2 {
        let error = producer.flush().unwrap_err();
        assert!(matches!(error, LocalLogError::Io { .. }), "{error}");
    }
    set_file_size_limit(None);
    let next = match caller {
        Caller::Retries => failed,
        Caller::GivesUp => failed + 1,
    };
    for i in next..next + PUTS_AFTER {
        acked.push((i, api.write(&mut producer, i).unwrap()));
    }
    producer.flush().unwrap();
    println!("failed {failed}");
    for (i, sequence) in &acked {
        println!("acked {i} {sequence}");
    }
}

fn read_all(stream: &LocalStream) -> Vec<Record> {
    let mut reader = stream.open_reader(SHARD, &StartingPosition::TrimHorizon).unwrap();
    let mut records = Vec::new();
    loop {
        let batch = reader.read(100).unwrap();
        if batch.records.is_empty() {
            return records;
        }
        records.extend(batch.records);
    }
}

/// Walks the frames of every segment of the shard (`u32 body_len | u32 crc32c | body`): each must
/// be whole with a matching checksum, and the last must end exactly at the end of the file.
fn assert_whole_frames(stream: &LocalStream) {
    for entry in std::fs::read_dir(stream.dir().join(SHARD)).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let path = path.display();
        let mut at = 0;
        while at < bytes.len() {
            let header = bytes
                .get(at..at + 8)
                .unwrap_or_else(|| panic!("{path}: cut header at {at}"));
            let body_len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(header[4..].try_into().unwrap());
            let body = bytes
                .get(at + 8..at + 8 + body_len)
                .unwrap_or_else(|| panic!("{path}: cut frame at {at} of {}", bytes.len()));
            assert_eq!(sluice_blockstore::crc32c(body), crc, "{path}: torn frame at {at}");
            at += 8 + body_len;
        }
    }
}

/// Runs the child for `test` and checks the log it left, then that a new producer appends to it.
/// Returns the records read back before that and the record that failed (`None` in the child).
fn failed_write_is_undone(test: &str, caller: Caller, api: Api) -> Option<(Vec<Record>, usize)> {
    if let Some(child_dir) = std::env::var_os(CHILD_ENV) {
        child(Path::new(&child_dir), caller, api);
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let stream = LocalLog::open(dir.path()).unwrap().create_stream(STREAM, 1).unwrap();
    let stdout = run_child(test, dir.path());
    let acked: Vec<(usize, String)> = stdout
        .lines()
        // libtest may print the first line right after its "test <name> ... ".
        .filter_map(|line| line.split_once("acked ").map(|(_, rest)| rest))
        .map(|line| {
            let (i, sequence) = line.split_once(' ').unwrap();
            (i.parse().unwrap(), sequence.to_owned())
        })
        .collect();
    assert!(!acked.is_empty(), "the child printed no records:\n{stdout}");
    let failed: usize = stdout
        .lines()
        .find_map(|line| line.split_once("failed ").map(|(_, i)| i.parse().unwrap()))
        .unwrap();

    assert_whole_frames(&stream);
    let records = read_all(&stream);
    let read: Vec<(usize, String)> = records
        .iter()
        .map(|r| {
            let i = std::str::from_utf8(&r.data[7..12]).unwrap().parse().unwrap();
            assert_eq!(r.data, data(i, api.data_len()), "record {i}");
            let sequence = match api {
                Api::Put => r.position.sequence.to_string(),
                Api::Append(_) => "-".to_owned(),
            };
            (i, sequence)
        })
        .collect();
    assert!(records.windows(2).all(|w| w[0].position < w[1].position));
    assert_eq!(
        read, acked,
        "the log must hold the acknowledged records, once each, in order"
    );
    let gap = acked.windows(2).find(|w| w[1].0 != w[0].0 + 1).map(|w| w[0].0 + 1);
    let expected_gap = (caller == Caller::GivesUp).then_some(failed);
    assert_eq!(
        gap, expected_gap,
        "only a caller that gives up leaves a gap, where it gave up"
    );

    // A new producer finds nothing torn to cut and appends after the last record.
    let written = records;
    let mut producer = stream.producer().unwrap();
    producer.put("key", b"after reopen").unwrap();
    producer.flush().unwrap();
    drop(producer);
    let records = read_all(&stream);
    assert_eq!(records.len(), acked.len() + 1);
    assert_eq!(&records.last().unwrap().data[..], b"after reopen");
    assert_whole_frames(&stream);
    Some((written, failed))
}

#[test]
fn a_put_retried_after_a_write_fails_part_way_is_appended_once() {
    failed_write_is_undone(
        "a_put_retried_after_a_write_fails_part_way_is_appended_once",
        Caller::Retries,
        Api::Put,
    );
}

#[test]
fn a_put_given_up_after_a_write_fails_part_way_is_not_appended() {
    failed_write_is_undone(
        "a_put_given_up_after_a_write_fails_part_way_is_not_appended",
        Caller::GivesUp,
        Api::Put,
    );
}

/// Whether record `i` shares its stored (aggregated) record with record `i - 1`.
fn shares_aggregate_with_previous(records: &[Record], i: usize) -> bool {
    let at = records
        .iter()
        .position(|r| r.data.starts_with(format!("record-{i:05}-").as_bytes()))
        .unwrap();
    at > 0 && records[at - 1].position.sequence == records[at].position.sequence
}

/// Appends of 40 kB records: an aggregate holds one (two exceed its 64 KiB), so the failed append
/// takes its whole aggregate back out, with its sequence number.
#[test]
fn an_append_given_up_after_a_write_fails_part_way_is_not_appended() {
    let Some((records, failed)) = failed_write_is_undone(
        "an_append_given_up_after_a_write_fails_part_way_is_not_appended",
        Caller::GivesUp,
        Api::Append(DATA_BYTES),
    ) else {
        return;
    };
    assert!(
        records.iter().all(|r| r.position.sub_sequence == 0),
        "one record per aggregate"
    );
    assert!(!shares_aggregate_with_previous(&records, failed + 1));
}

/// Appends of 10 kB records, six to an aggregate: the failed append comes out of an aggregate that
/// keeps the records before it (rewritten with one record fewer when the next flush completes it),
/// and the retry appends it once, after them.
#[test]
fn an_append_retried_after_a_write_fails_part_way_is_appended_once() {
    let Some((records, failed)) = failed_write_is_undone(
        "an_append_retried_after_a_write_fails_part_way_is_appended_once",
        Caller::Retries,
        Api::Append(10_000),
    ) else {
        return;
    };
    assert!(
        records.iter().any(|r| r.position.sub_sequence == 5),
        "six records per aggregate"
    );
    assert!(
        shares_aggregate_with_previous(&records, failed - 1),
        "record {failed} failed inside an aggregate, behind records that stay in it"
    );
}
