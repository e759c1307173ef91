//! Helpers shared by the facade's process-level tests.
#![allow(dead_code)] // each test binary uses a subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The path of a built example. Integration tests live in `target/<profile>/deps`; cargo builds
/// examples into `target/<profile>/examples` before running tests — but not when the run picks
/// targets (`cargo test --test NAME`): then an example built earlier is used as it is, possibly
/// stale. Run `cargo build --all-features --examples` first in that case.
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let path = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: run through `cargo test` (it builds examples)",
        path.display()
    );
    path
}

/// The committed `(key, u64)` Parquet output under `location`, summed per key over batches; the
/// keys must be UTF-8 (see [`sum_parquet_bytes`] for any bytes).
pub fn sum_parquet(location: &Path) -> HashMap<String, u64> {
    sum_parquet_bytes(location)
        .into_iter()
        .map(|(k, v)| (String::from_utf8(k).expect("a UTF-8 key"), v))
        .collect()
}

/// The committed `(key, u64)` Parquet output under `location`, summed per key over batches, with
/// the keys as bytes: a `Binary` key column (word count) as it is, a `Utf8` one as its UTF-8.
pub fn sum_parquet_bytes(location: &Path) -> HashMap<Vec<u8>, u64> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::UInt64Type;
    let mut sums = HashMap::new();
    for (_time, batch) in sluice::operators::ParquetSink::read_committed(&location.display().to_string()).unwrap() {
        let values = batch.column(1).as_primitive::<UInt64Type>();
        let keys = batch.column(0);
        for i in 0..batch.num_rows() {
            let key = match keys.as_binary_opt::<i32>() {
                Some(binary) => binary.value(i).to_vec(),
                None => keys.as_string::<i32>().value(i).as_bytes().to_vec(),
            };
            *sums.entry(key).or_default() += values.value(i);
        }
    }
    sums
}

/// The committed rows of a one-string-column Parquet output under `location`, in the order the
/// engine produced them: batches by time, then writers, then parts, then rows.
pub fn read_lines(location: &Path) -> Vec<String> {
    use arrow_array::cast::AsArray;
    let mut lines = Vec::new();
    for (_time, batch) in sluice::operators::ParquetSink::read_committed(&location.display().to_string()).unwrap() {
        let column = batch.column(0).as_string::<i32>();
        lines.extend((0..batch.num_rows()).map(|i| column.value(i).to_owned()));
    }
    lines
}
